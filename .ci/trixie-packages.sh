#!/usr/bin/env bash
# Fetches Debian 13 (trixie) docker.io 26.1.5, docker-cli 26.1.5, containerd 1.7.24,
# docker-buildx 0.13.1 and tini with `apt-get download` and unpacks them with `dpkg -x` into a
# fixed cache directory, for tests that run a private Docker Engine on the containerd image store
# (Debian 12's docker.io is 20.10, which has no containerd store). Installs the buildx plugin as
# ~/.docker/cli-plugins/docker-buildx.
#
# Nothing is installed into the system: apt runs with a private state (its own sources list,
# lists and cache under the cache directory; the system's sources.list.d, lists and dpkg status
# are not read or written), and the system's Docker Engine and containerd are never touched.
# The Debian mirror is the one this machine's apt sources already use for the release it runs.
#
# Layout (BERTH_TRIXIE_DIR, default /var/cache/berth/trixie):
#   root/usr/sbin/dockerd, root/usr/bin/{docker,containerd,ctr,containerd-shim-runc-v2,docker-init}
#   root/usr/libexec/docker/cli-plugins/docker-buildx
#   root/.complete         the package versions unpacked (written last: present = usable)
#   apt/                   the private apt state; debs/ the downloaded packages
#
# Idempotent: with root/.complete naming the expected versions it only re-checks the plugin and
# exits without touching the network.
set -euo pipefail

dir=${BERTH_TRIXIE_DIR:-/var/cache/berth/trixie}
# Upstream versions the tests are written against; the Debian revision may move.
want_docker=26.1.5
want_containerd=1.7.24
want_buildx=0.13.1
packages=(docker.io docker-cli containerd docker-buildx tini)

plugin_dir="${HOME:-/root}/.docker/cli-plugins"

install_plugin() {
    local src="$dir/root/usr/libexec/docker/cli-plugins/docker-buildx"
    mkdir -p "$plugin_dir"
    if ! cmp -s "$src" "$plugin_dir/docker-buildx"; then
        install -m 0755 "$src" "$plugin_dir/docker-buildx.tmp"
        mv -f "$plugin_dir/docker-buildx.tmp" "$plugin_dir/docker-buildx"
        echo "installed $plugin_dir/docker-buildx"
    fi
}

versions_ok() {
    # $1: a file of "package version" lines.
    grep -q "^docker.io $want_docker+" "$1" &&
        grep -q "^docker-cli $want_docker+" "$1" &&
        grep -q "^containerd $want_containerd~" "$1" &&
        grep -q "^docker-buildx $want_buildx+" "$1"
}

if [ -f "$dir/root/.complete" ] && versions_ok "$dir/root/.complete" &&
    [ -x "$dir/root/usr/sbin/dockerd" ] && [ -x "$dir/root/usr/bin/containerd" ]; then
    install_plugin
    echo "trixie packages already unpacked in $dir/root:" $(tr '\n' ' ' <"$dir/root/.complete")
    exit 0
fi

# The Debian mirror this machine uses for its own release (e.g. http://deb.debian.org/debian/).
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(TARGET_OF)' 2>/dev/null |
    awk -v c="$codename" '$2 == c && $3 == "deb" { print $1; exit }')
mirror=${mirror:-http://deb.debian.org/debian/}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || { echo "error: $keyring missing (package debian-archive-keyring)" >&2; exit 1; }
echo "fetching trixie packages from $mirror into $dir"

mkdir -p "$dir/apt/lists/partial" "$dir/apt/cache/archives/partial" "$dir/debs"
echo "deb [signed-by=$keyring] $mirror trixie main" >"$dir/apt/sources.list"
apt_opts=(
    -o "Dir::Etc::sourcelist=$dir/apt/sources.list"
    -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::Lists=$dir/apt/lists"
    -o "Dir::Cache=$dir/apt/cache"
    -o "Dir::State::status=/dev/null"
    -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false"
    -o "APT::Sandbox::User=root"
)
apt-get "${apt_opts[@]}" -qq update </dev/null

# The candidate version of each package, checked against the upstream versions wanted.
: >"$dir/versions.new"
for p in "${packages[@]}"; do
    v=$(apt-cache "${apt_opts[@]}" policy "$p" | awk '/Candidate:/ { print $2 }')
    [ -n "$v" ] && [ "$v" != "(none)" ] || { echo "error: trixie has no package $p at $mirror" >&2; exit 1; }
    echo "$p $v" >>"$dir/versions.new"
done
if ! versions_ok "$dir/versions.new"; then
    echo "error: trixie at $mirror does not carry docker $want_docker, containerd $want_containerd" \
        "and buildx $want_buildx; it has:" >&2
    cat "$dir/versions.new" >&2
    exit 1
fi

rm -f "$dir/debs/"*.deb
(cd "$dir/debs" && apt-get "${apt_opts[@]}" -qq download "${packages[@]}" </dev/null)

# Unpack into a fresh tree and swap it in, so an interrupted run never leaves a half tree behind
# a .complete marker.
rm -rf "$dir/root.new"
mkdir "$dir/root.new"
for deb in "$dir/debs/"*.deb; do
    dpkg -x "$deb" "$dir/root.new"
done
for bin in usr/sbin/dockerd usr/bin/docker usr/bin/containerd usr/bin/ctr \
    usr/bin/containerd-shim-runc-v2 usr/bin/docker-init usr/libexec/docker/cli-plugins/docker-buildx; do
    [ -x "$dir/root.new/$bin" ] || { echo "error: $bin missing from the unpacked packages" >&2; exit 1; }
done
"$dir/root.new/usr/sbin/dockerd" --version
"$dir/root.new/usr/bin/containerd" --version
mv "$dir/versions.new" "$dir/root.new/.complete"
rm -rf "$dir/root.old"
[ ! -e "$dir/root" ] || mv "$dir/root" "$dir/root.old"
mv "$dir/root.new" "$dir/root"
rm -rf "$dir/root.old"
install_plugin
echo "trixie packages unpacked in $dir/root:" $(tr '\n' ' ' <"$dir/root/.complete")
