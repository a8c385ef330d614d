//! BuildKit v0.11.6's own cache keys ("stock keys"), computed from LLB ops, so that berth can
//! find records of a cache exported by stock buildkitd and write records stock buildkitd finds
//! (issue #15: caches interoperate in both directions).
//!
//! berth's solver keys vertices with its own keys (`crate::remote`, node independent, inputs
//! included). Stock keys differ in shape: a stock record digest is
//! [`root_key`]`(cache map digest, output)` and does **not** contain the inputs; what ties a
//! record to its inputs are the record's links (see `remotecache::import`). This module computes
//! the per-vertex part:
//!
//! - [`exec_cache_map`]: `sha256(GoJSON({Type: "buildkit.exec.v0", Exec, OS, Arch, Variant}))`
//!   over the exec op with mount selectors, `proxy_env` and extra-host IPs cleared, and the mount
//!   list dropped when it is the single default root mount (stock's compatibility case for
//!   Dockerfile `RUN`); `solver/llbsolver/ops/exec.go` `CacheMap`.
//! - [`file_cache_map`]: `sha256(GoJSON({Type: "buildkit.file.v0", Actions: [GoJSON(action)…],
//!   indexes}))`, a copy's `src` reduced to its base name when it reads a secondary input;
//!   `solver/llbsolver/ops/file.go` `CacheMap`.
//! - [`image_manifest_key`], [`image_config_key`], [`source_key`]: the two records of an image
//!   source (output 0 keyed by the manifest, and by the config's `ChainID` of its diffIDs);
//!   `source/containerimage/pull.go`, `solver/llbsolver/ops/source.go`.
//! - [`file_content_checksum`]: the content-based ("slow") key of a regular file read by a copy,
//!   the tarsum-like header of `cache/contenthash/{filehash,tarsum}.go` followed by the data;
//!   [`content_key`] turns the checksums of a dependency's selectors into its `@-1` record.
//!
//! Go's `encoding/json` output is reproduced by hand ([`GoJson`]) rather than through serde:
//! the digests depend on Go's field order, its per-field `omitempty` rules (from the gogo
//! protobuf tags of `solver/pb/ops.pb.go`: `Mount.input`/`output` and `NamedUserOpt.input`
//! are always written), enums as integers, `[]byte` as standard base64, and Go 1.19's string
//! escaping (`<`, `>`, `&`, U+2028/U+2029 and control characters as `\u00XX`; stock v0.11.6 is
//! built with go1.19.8, which has no `\b`/`\f` short forms). Fields berth's LLB has and v0.11.6
//! does not (`cdi_devices`, `valid_exit_codes`, `content_cache`, newer copy options, symlink
//! actions) have no stock key: the functions return `None` when one is set, as stock would not
//! accept such an op.
//!
//! Every formula is pinned by the tests below against the record digests of a real stock export
//! (commands in the test module doc).

use base64::Engine as _;
use protos::pb;
use protos::pb::file_action::Action;
use protos::pb::user_opt::User;

use crate::digest::sha256_digest;

/// `buildkit.source.v0`: the cache type of source ops.
const SOURCE_CACHE_TYPE: &str = "buildkit.source.v0";
/// `buildkit.exec.v0`.
const EXEC_CACHE_TYPE: &str = "buildkit.exec.v0";
/// `buildkit.file.v0`.
const FILE_CACHE_TYPE: &str = "buildkit.file.v0";

/// A record digest: `sha256("<cache map digest>@<output>")` (stock `solver/cachemanager.go`
/// `rootKey`). Content-based keys use output `-1`.
pub(crate) fn root_key(cache_map: &str, output: i64) -> String {
    sha256_digest(format!("{cache_map}@{output}").as_bytes())
}

/// The cache map digest of a source whose source key is `key`:
/// `sha256("buildkit.source.v0:" + key)`. Keys of session sources (`session:…`, the local
/// context) are random in stock and never exported: `None`.
pub(crate) fn source_key(key: &str) -> Option<String> {
    if key.starts_with("session:") {
        return None;
    }
    Some(sha256_digest(
        format!("{SOURCE_CACHE_TYPE}:{key}").as_bytes(),
    ))
}

/// The source key of output 0 of an image source, by its manifest:
/// `sha256(GoJSON({Digest, OS, Arch, Variant (omitempty), Limit (omitempty)}))` where `Digest`
/// is the digest the reference resolved to (the image manifest). Matching uses the config key
/// (berth knows it from Docker's layers without the manifest); this one is for writing stock's
/// records (not yet done).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn image_manifest_key(
    manifest_digest: &str,
    os: &str,
    arch: &str,
    variant: &str,
    layer_limit: Option<i64>,
) -> String {
    let mut j = GoJson::default();
    j.begin();
    j.key("Digest").string(manifest_digest);
    j.key("OS").string(os);
    j.key("Arch").string(arch);
    if !variant.is_empty() {
        j.key("Variant").string(variant);
    }
    if let Some(l) = layer_limit {
        j.key("Limit").int(l);
    }
    j.end();
    sha256_digest(j.0.as_bytes())
}

/// The source key of an image source by its config: the `ChainID` of the config's diffIDs
/// (cut to the layer limit). `None` for an image without layers (stock then keys it by the
/// manifest only).
pub(crate) fn image_config_key(diff_ids: &[String], layer_limit: Option<usize>) -> Option<String> {
    let ids = match layer_limit {
        Some(l) if l <= diff_ids.len() => &diff_ids[..l],
        Some(_) => return None,
        None => diff_ids,
    };
    let (first, rest) = ids.split_first()?;
    Some(rest.iter().fold(first.clone(), |chain, d| {
        sha256_digest(format!("{chain} {d}").as_bytes())
    }))
}

/// The cache map digest of an exec op on `platform` (`None`: the op names no platform; stock
/// then uses its host's, linux/amd64 here). `None` when the op uses a field v0.11.6 lacks.
pub(crate) fn exec_cache_map(exec: &pb::ExecOp, platform: Option<&pb::Platform>) -> Option<String> {
    if !exec.cdi_devices.is_empty()
        || exec.mounts.iter().any(|m| m.content_cache != 0)
        || exec
            .meta
            .as_ref()
            .is_some_and(|m| !m.valid_exit_codes.is_empty())
    {
        return None;
    }
    let (os, arch, variant) = match platform {
        Some(p) => (p.os.as_str(), p.architecture.as_str(), p.variant.as_str()),
        None => ("linux", host_arch(), ""),
    };
    // Stock's special case: the single default root mount is left out of the key.
    let default_root = exec.mounts.len() == 1 && {
        let m = &exec.mounts[0];
        m.dest == "/"
            && !m.readonly
            && m.mount_type == pb::MountType::Bind as i32
            && m.cache_opt.is_none()
            && m.ssh_opt.is_none()
            && m.secret_opt.is_none()
            && m.result_id.is_empty()
    };
    let mut j = GoJson::default();
    j.begin();
    j.key("Type").string(EXEC_CACHE_TYPE);
    j.key("Exec");
    j.begin();
    if let Some(meta) = &exec.meta {
        j.key("meta");
        write_meta(&mut j, meta);
    }
    if !default_root && !exec.mounts.is_empty() {
        j.key("mounts").array(&exec.mounts, write_mount);
    }
    j.int_omit("network", exec.network.into());
    j.int_omit("security", exec.security.into());
    if !exec.secretenv.is_empty() {
        j.key("secretenv").array(&exec.secretenv, |j, s| {
            j.begin();
            j.str_omit("ID", &s.id);
            j.str_omit("name", &s.name);
            j.bool_omit("optional", s.optional);
            j.end();
        });
    }
    j.end();
    j.key("OS").string(os);
    j.key("Arch").string(arch);
    if !variant.is_empty() {
        j.key("Variant").string(variant);
    }
    j.end();
    Some(sha256_digest(j.0.as_bytes()))
}

/// The architecture stock uses for an op without a platform (Go's `runtime.GOARCH` names).
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

fn write_meta(j: &mut GoJson, m: &pb::Meta) {
    j.begin();
    j.strs_omit("args", &m.args);
    j.strs_omit("env", &m.env);
    j.str_omit("cwd", &m.cwd);
    j.str_omit("user", &m.user);
    // proxy_env: cleared by stock before hashing.
    if !m.extra_hosts.is_empty() {
        // IPs cleared by stock: a host keeps only its name.
        j.key("extraHosts").array(&m.extra_hosts, |j, h| {
            j.begin();
            j.str_omit("Host", &h.host);
            j.end();
        });
    }
    j.str_omit("hostname", &m.hostname);
    if !m.ulimit.is_empty() {
        j.key("ulimit").array(&m.ulimit, |j, u| {
            j.begin();
            j.str_omit("Name", &u.name);
            j.int_omit("Soft", u.soft);
            j.int_omit("Hard", u.hard);
            j.end();
        });
    }
    j.str_omit("cgroupParent", &m.cgroup_parent);
    j.bool_omit("removeMountStubsRecursive", m.remove_mount_stubs_recursive);
    j.end();
}

fn write_mount(j: &mut GoJson, m: &pb::Mount) {
    j.begin();
    j.key("input").int(m.input);
    // selector: cleared by stock before hashing.
    j.str_omit("dest", &m.dest);
    j.key("output").int(m.output);
    j.bool_omit("readonly", m.readonly);
    j.int_omit("mountType", m.mount_type.into());
    if let Some(t) = &m.tmpfs_opt {
        j.key("TmpfsOpt");
        j.begin();
        j.int_omit("size", t.size);
        j.end();
    }
    if let Some(c) = &m.cache_opt {
        j.key("cacheOpt");
        j.begin();
        j.str_omit("ID", &c.id);
        j.int_omit("sharing", c.sharing.into());
        j.end();
    }
    let secret_like = |j: &mut GoJson, id: &str, uid: u32, gid: u32, mode: u32, optional: bool| {
        j.begin();
        j.str_omit("ID", id);
        j.int_omit("uid", uid.into());
        j.int_omit("gid", gid.into());
        j.int_omit("mode", mode.into());
        j.bool_omit("optional", optional);
        j.end();
    };
    if let Some(s) = &m.secret_opt {
        j.key("secretOpt");
        secret_like(j, &s.id, s.uid, s.gid, s.mode, s.optional);
    }
    if let Some(s) = &m.ssh_opt {
        j.key("SSHOpt");
        secret_like(j, &s.id, s.uid, s.gid, s.mode, s.optional);
    }
    j.str_omit("resultID", &m.result_id);
    j.end();
}

/// The cache map digest of a file op with `num_inputs` inputs. `None` when an action is one
/// v0.11.6 lacks (symlink) or uses a newer field.
pub(crate) fn file_cache_map(file: &pb::FileOp, num_inputs: usize) -> Option<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut actions = Vec::with_capacity(file.actions.len());
    let mut indexes = Vec::with_capacity(file.actions.len());
    for a in &file.actions {
        let mut j = GoJson::default();
        match a.action.as_ref()? {
            Action::Copy(c) => {
                if c.always_replace_existing_dest_paths
                    || !c.mode_str.is_empty()
                    || !c.required_paths.is_empty()
                {
                    return None;
                }
                let reads_secondary =
                    a.secondary_input != -1 && a.secondary_input < num_inputs as i64;
                let src = if reads_secondary {
                    go_path_base(&c.src)
                } else {
                    c.src.clone()
                };
                j.begin();
                j.str_omit("src", &src);
                j.str_omit("dest", &c.dest);
                write_owner(&mut j, c.owner.as_ref());
                j.int_omit("mode", c.mode.into());
                j.bool_omit("followSymlink", c.follow_symlink);
                j.bool_omit("dirCopyContents", c.dir_copy_contents);
                j.bool_omit(
                    "attemptUnpackDockerCompatibility",
                    c.attempt_unpack_docker_compatibility,
                );
                j.bool_omit("createDestPath", c.create_dest_path);
                j.bool_omit("allowWildcard", c.allow_wildcard);
                j.bool_omit("allowEmptyWildcard", c.allow_empty_wildcard);
                j.int_omit("timestamp", c.timestamp);
                j.strs_omit("include_patterns", &c.include_patterns);
                j.strs_omit("exclude_patterns", &c.exclude_patterns);
                j.end();
            }
            Action::Mkfile(m) => {
                j.begin();
                j.str_omit("path", &m.path);
                j.int_omit("mode", m.mode.into());
                if !m.data.is_empty() {
                    j.key("data").string(&b64.encode(&m.data));
                }
                write_owner(&mut j, m.owner.as_ref());
                j.int_omit("timestamp", m.timestamp);
                j.end();
            }
            Action::Mkdir(m) => {
                j.begin();
                j.str_omit("path", &m.path);
                j.int_omit("mode", m.mode.into());
                j.bool_omit("makeParents", m.make_parents);
                write_owner(&mut j, m.owner.as_ref());
                j.int_omit("timestamp", m.timestamp);
                j.end();
            }
            Action::Rm(r) => {
                j.begin();
                j.str_omit("path", &r.path);
                j.bool_omit("allowNotFound", r.allow_not_found);
                j.bool_omit("allowWildcard", r.allow_wildcard);
                j.end();
            }
            Action::Symlink(_) => return None,
        }
        actions.push(b64.encode(j.0.as_bytes()));
        indexes.push([a.input, a.secondary_input, a.output]);
    }
    let mut j = GoJson::default();
    j.begin();
    j.key("Type").string(FILE_CACHE_TYPE);
    j.key("Actions").array(&actions, |j, a| {
        j.string(a);
    });
    if !default_indexes(&indexes) {
        j.key("indexes").array(&indexes, |j, idx| {
            j.array(idx, |j, i| {
                j.int(*i);
            });
        });
    }
    j.end();
    Some(sha256_digest(j.0.as_bytes()))
}

/// Stock leaves the action indexes out of the key for the common chain: the first action reads
/// input 0, each next one the previous action, secondary inputs are 1 or none, and only the last
/// action makes the output.
fn default_indexes(idxs: &[[i64; 3]]) -> bool {
    let n = idxs.len() as i64;
    !idxs.is_empty()
        && idxs.iter().enumerate().all(|(i, idx)| {
            let i = i as i64;
            let input_ok = if i == 0 {
                idx[0] == 0
            } else {
                idx[0] == n + i - 1
            };
            let output_ok = if i == n - 1 {
                idx[2] == 0
            } else {
                idx[2] == -1
            };
            input_ok && (idx[1] == -1 || idx[1] == 1) && output_ok
        })
}

fn write_owner(j: &mut GoJson, owner: Option<&pb::ChownOpt>) {
    let Some(o) = owner else { return };
    j.key("owner");
    j.begin();
    let user_opt = |j: &mut GoJson, u: &pb::UserOpt| {
        j.begin();
        j.key("User");
        match &u.user {
            None => {
                j.0.push_str("null");
            }
            Some(User::ByName(n)) => {
                j.begin();
                j.key("byName");
                j.begin();
                j.str_omit("name", &n.name);
                j.key("input").int(n.input);
                j.end();
                j.end();
            }
            Some(User::ById(id)) => {
                j.begin();
                j.int_omit("byID", (*id).into());
                j.end();
            }
        }
        j.end();
    };
    if let Some(u) = &o.user {
        j.key("user");
        user_opt(j, u);
    }
    if let Some(g) = &o.group {
        j.key("group");
        user_opt(j, g);
    }
    j.end();
}

/// Go's `path.Base`: the last element of a slash path, `.` for an empty one, `/` for only
/// slashes.
fn go_path_base(p: &str) -> String {
    if p.is_empty() {
        return ".".into();
    }
    let trimmed = p.trim_end_matches('/');
    if trimmed.is_empty() {
        return "/".into();
    }
    match trimmed.rfind('/') {
        Some(i) => trimmed[i + 1..].to_string(),
        None => trimmed.to_string(),
    }
}

/// What a vertex's stock records are made of: its cache map digest (a record per output is
/// [`root_key`]`(digest, output)`) and, per input, the selector stock writes on the link to that
/// input's record (empty for none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StockMap {
    /// The cache map digest.
    pub digest: String,
    /// Per input, in op order: the link selector.
    pub selectors: Vec<String>,
    /// Per input (may be shorter): the input's content record ([`content_key`]) when the op
    /// reads it by content and berth computed it; the link is then to that record, with no
    /// selector, as stock links a content-keyed input (a local source has no record of its own).
    pub content: Vec<Option<String>>,
}

/// berth's id of a stock record *with its inputs*: stock record digests leave the inputs out
/// (they are in the links), so an importer indexes each record by the record digest and, per
/// input slot, the link selector and the id of one linked record; a vertex computes the same
/// from its stock record digest and its inputs' ids. A record without inputs is its digest.
pub fn stock_record_id(record: &str, slots: &[(&str, &str)]) -> String {
    if slots.is_empty() {
        return record.to_string();
    }
    let mut h = crate::digest::KeyHasher::new("berth.stock-record.v1");
    h.field(record.as_bytes());
    for (selector, id) in slots {
        h.field(selector.as_bytes()).field(id.as_bytes());
    }
    h.finish()
}

/// The link selectors of an exec op's inputs: `sha256(join(path.Join("/", selector), "\0"))`
/// over the selectors of the mounts of that input, in mount order; empty when none has one.
pub(crate) fn exec_selectors(exec: &pb::ExecOp, num_inputs: usize) -> Vec<String> {
    let mut per_input: Vec<Vec<String>> = vec![Vec::new(); num_inputs];
    for m in &exec.mounts {
        let Ok(i) = usize::try_from(m.input) else {
            continue;
        };
        if i < num_inputs && !m.selector.is_empty() {
            per_input[i].push(go_path_clean(&format!("/{}", m.selector)));
        }
    }
    per_input
        .into_iter()
        .map(|s| selector_digest(s, false))
        .collect()
}

/// The link selectors of a file op's inputs: for an input read as a copy source (and not
/// modified by an action), `sha256(join(paths, "\0"))` over the copy sources (and the
/// `/etc/passwd`, `/etc/group` of by-name owners) read from it, sorted in descending byte order.
pub(crate) fn file_selectors(file: &pb::FileOp, num_inputs: usize) -> Vec<String> {
    let mut per_input: Vec<Vec<String>> = vec![Vec::new(); num_inputs];
    let mut invalid = vec![false; num_inputs];
    let mut add = |i: i64, p: &str| {
        if let Some(v) = usize::try_from(i).ok().and_then(|i| per_input.get_mut(i)) {
            v.push(p.to_string());
        }
    };
    for a in &file.actions {
        if let Some(slot) = usize::try_from(a.input)
            .ok()
            .and_then(|i| invalid.get_mut(i))
        {
            *slot = true;
        }
        let owner = match &a.action {
            Some(Action::Copy(c)) => c.owner.as_ref(),
            Some(Action::Mkfile(m)) => m.owner.as_ref(),
            Some(Action::Mkdir(m)) => m.owner.as_ref(),
            _ => None,
        };
        if let Some(o) = owner {
            for (u, file) in [(&o.user, "/etc/passwd"), (&o.group, "/etc/group")] {
                if let Some(pb::UserOpt {
                    user: Some(User::ByName(n)),
                }) = u
                {
                    add(n.input, file);
                }
            }
        }
        if let Some(Action::Copy(c)) = &a.action {
            if a.secondary_input != -1 && a.secondary_input < num_inputs as i64 {
                add(a.secondary_input, &c.src);
            }
        }
    }
    per_input
        .into_iter()
        .zip(invalid)
        .map(|(s, invalid)| {
            if invalid {
                String::new()
            } else {
                selector_digest(s, true)
            }
        })
        .collect()
}

fn selector_digest(mut paths: Vec<String>, sort_desc: bool) -> String {
    if paths.is_empty() {
        return String::new();
    }
    if sort_desc {
        paths.sort_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
    }
    sha256_digest(paths.join("\0").as_bytes())
}

/// Go's `path.Clean` for an absolute slash path (`path.Join("/", p)`).
fn go_path_clean(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            x => out.push(x),
        }
    }
    format!("/{}", out.join("/"))
}

/// What the content checksum of one filesystem entry covers besides its data (stock's
/// `fsutil` stat as the tar header of `cache/contenthash/filehash.go` sees it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct EntryStat {
    /// `st_mode` (type and permission bits).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size (counted for regular files only).
    pub size: u64,
    /// Symlink target.
    pub linkname: String,
    /// Device numbers.
    pub devmajor: u64,
    /// Device numbers.
    pub devminor: u64,
    /// Extended attributes (name, value).
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// The tarsum-v1-like header stock hashes before an entry's data: `name` (always empty),
/// `mode` (permission bits with setuid/setgid/sticky as in a tar header), `uid`, `gid`, `size`
/// (regular files only), `typeflag`, `linkname`, `uname`, `gname` (empty), `devmajor`,
/// `devminor`, then xattrs sorted by name (only `security.capability` of `security.*` and none
/// of `system.*`), each as its name followed by its value.
pub(crate) fn tarsum_header(st: &EntryStat) -> Vec<u8> {
    let fmt = st.mode & libc::S_IFMT;
    let (typeflag, size, linkname) = match fmt {
        libc::S_IFREG => ('0', st.size, ""),
        libc::S_IFDIR => ('5', 0, ""),
        libc::S_IFLNK => ('2', 0, st.linkname.as_str()),
        libc::S_IFCHR => ('3', 0, ""),
        libc::S_IFBLK => ('4', 0, ""),
        libc::S_IFIFO => ('6', 0, ""),
        _ => ('0', 0, ""),
    };
    // Symlinks are hashed with all permission bits set (stock's `NewFileHash`).
    let mode = if fmt == libc::S_IFLNK {
        0o777
    } else {
        st.mode & 0o7777
    };
    let mut h = Vec::new();
    let mut field = |k: &str, v: &[u8]| {
        h.extend_from_slice(k.as_bytes());
        h.extend_from_slice(v);
    };
    field("name", b"");
    field("mode", mode.to_string().as_bytes());
    field("uid", st.uid.to_string().as_bytes());
    field("gid", st.gid.to_string().as_bytes());
    field("size", size.to_string().as_bytes());
    field("typeflag", typeflag.to_string().as_bytes());
    field("linkname", linkname.as_bytes());
    field("uname", b"");
    field("gname", b"");
    field("devmajor", st.devmajor.to_string().as_bytes());
    field("devminor", st.devminor.to_string().as_bytes());
    let mut xattrs: Vec<&(String, Vec<u8>)> = st
        .xattrs
        .iter()
        .filter(|(k, _)| {
            k == "security.capability" || !(k.starts_with("security.") || k.starts_with("system."))
        })
        .collect();
    xattrs.sort_by(|a, b| a.0.cmp(&b.0));
    for (k, v) in xattrs {
        field(k, v);
    }
    h
}

/// The content checksum of a regular file (or of a symlink, device or fifo with empty `data`):
/// `sha256(header + data)`.
pub(crate) fn file_content_checksum(st: &EntryStat, data: &[u8]) -> String {
    let mut b = tarsum_header(st);
    b.extend_from_slice(data);
    sha256_digest(&b)
}

/// As [`file_content_checksum`], reading the data from `r` (a regular file of any size).
pub(crate) fn file_content_checksum_from(
    st: &EntryStat,
    r: &mut dyn std::io::Read,
) -> std::io::Result<String> {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(tarsum_header(st));
    std::io::copy(r, &mut h)?;
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// The content checksum of a directory (`cache/contenthash` `checksum` of a directory record):
/// `sha256("\0" + header + ("\0" + name + checksum)…)` where `header` is the directory's own
/// [`file_content_checksum`] (no data) and the entries are its direct children in byte order
/// of their names, each with its own content checksum (a subdirectory's is this one, recursively;
/// a symlink's is its header with its target, not followed). Checksums are written as their
/// `sha256:…` text.
pub(crate) fn dir_content_checksum(header: &str, entries: &[(Vec<u8>, String)]) -> String {
    let mut b = Vec::new();
    b.push(0);
    b.extend_from_slice(header.as_bytes());
    for (name, sum) in entries {
        b.push(0);
        b.extend_from_slice(name);
        b.extend_from_slice(sum.as_bytes());
    }
    sha256_digest(&b)
}

/// The checksum of a selector with a wildcard (stock's `Checksum` with `Wildcard`): `included`
/// are the paths the pattern takes, as stock lists them (in tree order: a matched file, or a
/// matched directory's header followed by everything below it, files with their content
/// checksums and subdirectories with their headers; directory records themselves are not
/// included), each with its checksum. Nothing included: the digest of no bytes; one entry
/// with the pattern's base name: its checksum; else `sha256` over `base name + checksum` of
/// each entry, separated by `\0`.
pub(crate) fn wildcard_checksum(pattern: &str, included: &[(String, String)]) -> String {
    if included.is_empty() {
        return sha256_digest(b"");
    }
    if let [(p, sum)] = included {
        if go_path_base(pattern) == go_path_base(p) {
            return sum.clone();
        }
    }
    let mut b = Vec::new();
    for (i, (p, sum)) in included.iter().enumerate() {
        if i != 0 {
            b.push(0);
        }
        b.extend_from_slice(go_path_base(p).as_bytes());
        b.extend_from_slice(sum.as_bytes());
    }
    sha256_digest(&b)
}

/// The selectors stock checksums in an input read by copies (`solver/llbsolver/ops/file.go`
/// `dedupeSelectors`): `(path, wildcard)` per copy source as the op writes it, literal paths
/// without those below another one, all sorted by path. `None` when a copy has
/// include/exclude patterns, or the copies differ in following symlinks (not reproduced).
pub(crate) fn copy_selectors(copies: &[pb::FileActionCopy]) -> Option<Vec<(String, bool)>> {
    let follow = copies.first()?.follow_symlink;
    let mut literal: Vec<String> = vec![];
    let mut sels: Vec<(String, bool)> = vec![];
    for c in copies {
        if !c.include_patterns.is_empty()
            || !c.exclude_patterns.is_empty()
            || c.follow_symlink != follow
        {
            return None;
        }
        if c.allow_wildcard && go_contains_wildcards(&c.src) {
            sels.push((c.src.clone(), true));
        } else if !literal.contains(&c.src) {
            literal.push(c.src.clone());
        }
    }
    for p in &literal {
        if !literal
            .iter()
            .any(|q| q != p && p.starts_with(&format!("{q}/")))
        {
            sels.push((p.clone(), false));
        }
    }
    sels.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Some(sels)
}

/// Go's `containsWildcards` of the file op: an unescaped `*`, `?` or `[`.
fn go_contains_wildcards(p: &str) -> bool {
    let b = p.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'*' | b'?' | b'[' => return true,
            _ => {}
        }
        i += 1;
    }
    false
}

/// The content-based record of a dependency from the checksums of its selectors (in the
/// op's selector order): `rootKey(sha256(join(checksums, "\0")), -1)`.
pub(crate) fn content_key(checksums: &[String]) -> String {
    root_key(&sha256_digest(checksums.join("\0").as_bytes()), -1)
}

/// A writer of Go `encoding/json` output (compact, Go 1.19 escaping); objects and arrays are
/// written in the caller's field order, commas placed automatically.
#[derive(Default)]
struct GoJson(String);

impl GoJson {
    fn comma(&mut self) {
        if !matches!(self.0.chars().last(), None | Some('{' | '[' | ':')) {
            self.0.push(',');
        }
    }
    fn begin(&mut self) {
        self.comma();
        self.0.push('{');
    }
    fn end(&mut self) {
        self.0.push('}');
    }
    fn key(&mut self, k: &str) -> &mut Self {
        self.comma();
        go_string(&mut self.0, k);
        self.0.push(':');
        self
    }
    fn string(&mut self, s: &str) -> &mut Self {
        self.comma();
        go_string(&mut self.0, s);
        self
    }
    fn int(&mut self, i: i64) -> &mut Self {
        self.comma();
        self.0.push_str(&i.to_string());
        self
    }
    fn array<T>(&mut self, items: &[T], mut f: impl FnMut(&mut Self, &T)) -> &mut Self {
        self.comma();
        self.0.push('[');
        for it in items {
            f(self, it);
        }
        self.0.push(']');
        self
    }
    fn str_omit(&mut self, k: &str, v: &str) {
        if !v.is_empty() {
            self.key(k).string(v);
        }
    }
    fn int_omit(&mut self, k: &str, v: i64) {
        if v != 0 {
            self.key(k).int(v);
        }
    }
    fn bool_omit(&mut self, k: &str, v: bool) {
        if v {
            self.key(k);
            self.0.push_str("true");
        }
    }
    fn strs_omit(&mut self, k: &str, v: &[String]) {
        if !v.is_empty() {
            self.key(k).array(v, |j, s| {
                j.string(s);
            });
        }
    }
}

/// A JSON string as Go 1.19's `encoding/json` writes it (HTML-safe escaping on).
fn go_string(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' | '>' | '&' | '\u{0}'..='\u{1f}' => {
                let b = c as u8;
                out.push_str("\\u00");
                out.push(HEX[(b >> 4) as usize] as char);
                out.push(HEX[(b & 0xf) as usize] as char);
            }
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests;
