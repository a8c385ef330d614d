#!/usr/bin/env bash
# `make fresh-check`: the README's first command on a fresh Debian 12 machine.
#
# Makes a plain Debian 12 (bookworm) image locally (debootstrap --variant=minbase from the Debian
# mirror this machine's apt uses, imported with `docker import`; no registry), then runs a
# container from it that has, besides Debian itself, only what "a machine with Docker running and
# the Rust toolchain" has:
#   - the Rust toolchain this machine builds with, mounted read-only (rustc, cargo, std), plus the
#     C toolchain Rust links with and make (gcc, libc6-dev, make from Debian);
#   - the Docker socket and Docker's data root, mounted as deploy/README.md describes;
#   - a copy of this repository (without target/), an empty CARGO_HOME and target dir.
# No protoc, no runc, no git. Inside, `make run` must build berthd and bring it up listening on
# unix:///run/buildkit/buildkitd.sock; `berthd debug workers` must then list its worker.
#
# Slow (a cold release build of berthd: 10+ minutes on 2 idle cores), hence a make target and not
# part of `make test`. Needs root and Docker. Removes the container and image it made.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${BERTH_FRESH_CACHE:-/var/cache/berth/fresh-debian12}
tag="berth-fresh-debian12:$$-$RANDOM"
name="berth-fresh-check-$$-$RANDOM"
timeout_s=${BERTH_FRESH_TIMEOUT:-5400}

log() { printf '[fresh-check] %s\n' "$*" >&2; }
cleanup() {
    docker rm -f "$name" >/dev/null 2>&1 || true
    docker rmi -f "$tag" >/dev/null 2>&1 || true
}
trap cleanup EXIT

[ "$(id -u)" -eq 0 ] || { echo "fresh-check needs root (debootstrap, docker)" >&2; exit 1; }

# 1. A plain Debian 12 root filesystem (cached as a tarball; rebuilt when missing).
if [ ! -s "$cache/rootfs.tar" ]; then
    command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap </dev/null; }
    mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(TARGET_OF)' 2>/dev/null |
        awk '$2 == "bookworm" && $3 == "deb" { print $1; exit }')
    mirror=${mirror:-http://deb.debian.org/debian/}
    log "debootstrap bookworm from $mirror"
    rm -rf "$cache/rootfs" "$cache/rootfs.tar.tmp"
    mkdir -p "$cache"
    debootstrap --variant=minbase bookworm "$cache/rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 ||
        { tail -n 30 "$cache/debootstrap.log" >&2; exit 1; }
    tar -C "$cache/rootfs" --numeric-owner -cf "$cache/rootfs.tar.tmp" .
    mv "$cache/rootfs.tar.tmp" "$cache/rootfs.tar"
    rm -rf "$cache/rootfs"
fi
log "importing the Debian 12 root filesystem as $tag"
docker import --change 'CMD ["/bin/bash"]' "$cache/rootfs.tar" "$tag" >/dev/null

# 2. The Rust toolchain of this machine.
toolchain=$(rustc --print sysroot)
[ -x "$toolchain/bin/cargo" ] || { echo "no cargo in the toolchain $toolchain" >&2; exit 1; }
log "toolchain $toolchain ($("$toolchain/bin/rustc" --version))"

# 3. The container: Docker mounted as documented, privileges as berthd needs.
data_root=$(docker info --format '{{.DockerRootDir}}')
privileges=(--privileged)
bnd=$(awk '/^CapBnd:/ { print $2 }' /proc/self/status)
last=$(cat /proc/sys/kernel/cap_last_cap)
if [ "$((0x$bnd))" -ne "$(((1 << (last + 1)) - 1))" ]; then
    # A sandboxed host whose bounding set lacks capabilities: --privileged cannot work here
    # (deploy/README.md); drop what is missing instead.
    privileges=(--cap-add ALL --security-opt seccomp=unconfined --security-opt apparmor=unconfined
        --security-opt systempaths=unconfined)
    names=(CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE
        NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO
        SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME
        SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG
        WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE)
    for i in $(seq 0 "$last"); do
        if [ $(((0x$bnd >> i) & 1)) -eq 0 ] && [ "$i" -lt "${#names[@]}" ]; then
            privileges+=(--cap-drop "${names[$i]}")
        fi
    done
fi
# The host's CA bundle, read by cargo only (CARGO_HTTP_CAINFO): where egress goes through a
# TLS-intercepting proxy, a machine on that network trusts the proxy's CA, and crates.io is
# reached through it. Debian's own trust store in the container is left as it is.
ca_mount=()
if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
    ca_mount=(-v /etc/ssl/certs/ca-certificates.crt:/etc/host-ca.crt:ro -e CARGO_HTTP_CAINFO=/etc/host-ca.crt)
fi
log "starting $name"
docker run -d --name "$name" "${privileges[@]}" --init \
    -v /var/run/docker.sock:/var/run/docker.sock \
    -v "$data_root:$data_root:rslave" \
    -v "$toolchain:/opt/rust:ro" \
    -v "$repo:/repo:ro" \
    "${ca_mount[@]}" \
    -e PATH=/opt/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    -e CARGO_HOME=/root/.cargo -e CARGO_TARGET_DIR=/build/target -e DEBIAN_FRONTEND=noninteractive \
    "$tag" sleep infinity >/dev/null

in_ctr() { docker exec "$name" bash -c "$1"; }

# 4. What the machine has: no protoc, no runc.
in_ctr '! command -v protoc && ! command -v runc && ! command -v cc' >/dev/null ||
    { echo "the Debian image is not plain: it has protoc, runc or a C compiler" >&2; exit 1; }
log "installing the C toolchain Rust links with, and make"
in_ctr 'apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev make ca-certificates >/dev/null'
in_ctr 'mkdir -p /build && tar -C /repo --exclude=./target -cf - . | tar -C /build -xf -'

# 5. make run, until berthd listens (or fails, or the time runs out).
log "make run (cold release build)"
start=$(date +%s)
# Niced (BERTH_FRESH_NICE, default 10): the check shares the machine with other work, and the
# processes `docker exec` starts do not inherit this script's niceness.
docker exec -d "$name" bash -c "cd /build && nice -n ${BERTH_FRESH_NICE:-10} make run >/build/make-run.log 2>&1; echo \"exit \$?\" >>/build/make-run.log"
while :; do
    if in_ctr 'test -S /run/buildkit/buildkitd.sock' 2>/dev/null &&
        in_ctr '/build/target/release/berthd debug workers' >/tmp/fresh-check-workers.$$ 2>&1; then
        break
    fi
    if in_ctr 'grep -q "^exit " /build/make-run.log' 2>/dev/null; then
        in_ctr 'tail -n 60 /build/make-run.log' >&2
        echo "make run ended before berthd listened" >&2
        exit 1
    fi
    if [ $(($(date +%s) - start)) -gt "$timeout_s" ]; then
        in_ctr 'tail -n 60 /build/make-run.log' >&2
        echo "berthd did not listen within ${timeout_s}s" >&2
        exit 1
    fi
    sleep 10
done
took=$(($(date +%s) - start))
in_ctr 'grep -E "vendored|PROTOC|protoc" /build/make-run.log | head -n 3' >&2 || true
in_ctr 'grep -E "listening" /build/make-run.log | tail -n 1' >&2
cat /tmp/fresh-check-workers.$$
rm -f /tmp/fresh-check-workers.$$
echo "fresh-check: make run on a plain Debian 12 (Rust toolchain, gcc, make; no protoc, no runc) reached a listening berthd in ${took}s"
