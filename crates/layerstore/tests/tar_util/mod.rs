//! Helpers shared by the `tar_*` integration tests: tree snapshots, a tar-split
//! reassembler (what `docker save` does), tree builders and raw tar crafting.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

pub mod gen;
use base64::Engine as _;

/// Fails loudly unless running as root (the tests need mknod, chown, trusted.* xattrs).
pub fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the tar tests need root (mknod, chown, trusted.* xattrs)"
    );
}

/// A temp dir on a real filesystem (not tmpfs), so trusted.* and user.* xattrs work.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("berth-tar-test-")
        .tempdir_in("/var/tmp")
        .expect("tempdir in /var/tmp")
}

/// Everything about one path that a layer must preserve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub size: u64,
    pub rdev: u64,
    pub content: Option<String>,
    pub link: Option<Vec<u8>>,
    /// First path (in walk order) of the same inode, for hardlinks.
    pub same_inode_as: Option<Vec<u8>>,
    pub nlink: u64,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// The tree under `root` (root itself excluded), keyed by relative path bytes.
pub fn snapshot(root: &Path) -> Result<BTreeMap<Vec<u8>, Node>> {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    for ent in walkdir::WalkDir::new(root)
        .min_depth(1)
        .sort_by(|a, b| a.file_name().as_bytes().cmp(b.file_name().as_bytes()))
    {
        let ent = ent?;
        let rel = ent
            .path()
            .strip_prefix(root)?
            .as_os_str()
            .as_bytes()
            .to_vec();
        let md = std::fs::symlink_metadata(ent.path())?;
        let ft = md.file_type();
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "other"
        };
        let content = if ft.is_file() {
            let mut h = sha2::Sha256::default();
            let mut f = std::fs::File::open(ent.path())
                .with_context(|| format!("open {}", ent.path().display()))?;
            std::io::copy(&mut f, &mut h)?;
            use sha2::Digest as _;
            Some(hex::encode(h.finalize()))
        } else {
            None
        };
        let link = if ft.is_symlink() {
            Some(
                std::fs::read_link(ent.path())?
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            )
        } else {
            None
        };
        let same = if !ft.is_dir() && md.nlink() > 1 {
            let key = (md.dev(), md.ino());
            let first = inodes.entry(key).or_insert_with(|| rel.clone()).clone();
            (first != rel).then_some(first)
        } else {
            None
        };
        out.insert(
            rel,
            Node {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                mtime: md.mtime(),
                size: if ft.is_file() { md.size() } else { 0 },
                rdev: md.rdev(),
                content,
                link,
                same_inode_as: same,
                nlink: if ft.is_dir() { 0 } else { md.nlink() },
                xattrs: xattrs(ent.path())?,
            },
        );
    }
    Ok(out)
}

pub fn xattrs(p: &Path) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut list = vec![0u8; 65536];
    let n = match rustix::fs::llistxattr(p, &mut list[..]) {
        Ok(n) => n,
        Err(rustix::io::Errno::OPNOTSUPP) => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("llistxattr {}", p.display())),
    };
    let mut val = vec![0u8; 65536];
    for name in list[..n].split(|&c| c == 0).filter(|s| !s.is_empty()) {
        let c = CString::new(name)?;
        let len = rustix::fs::lgetxattr(p, &c, &mut val[..]).with_context(|| {
            format!(
                "lgetxattr {} {}",
                p.display(),
                String::from_utf8_lossy(name)
            )
        })?;
        out.insert(name.to_vec(), val[..len].to_vec());
    }
    Ok(out)
}

/// Asserts two snapshots are equal, reporting the first differing path.
pub fn assert_same_tree(a: &BTreeMap<Vec<u8>, Node>, b: &BTreeMap<Vec<u8>, Node>) {
    let ka: Vec<_> = a
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    let kb: Vec<_> = b
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert_eq!(ka, kb, "same paths");
    for (k, va) in a {
        assert_eq!(Some(va), b.get(k), "path {:?}", String::from_utf8_lossy(k));
    }
}

/// One decoded tar-split record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitRecord {
    Segment(Vec<u8>),
    File {
        name: Vec<u8>,
        size: u64,
        crc: Option<Vec<u8>>,
    },
}

/// Decodes a gzipped tar-split stream, checking positions count up from 0.
pub fn decode_tar_split(gz: &[u8]) -> Result<Vec<SplitRecord>> {
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(gz).read_to_string(&mut text)?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).context("tar-split line")?;
        ensure!(
            v["position"] == i as u64,
            "position {} at line {i}",
            v["position"]
        );
        let payload = match &v["payload"] {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(b64.decode(s)?),
            other => bail!("bad payload {other}"),
        };
        match v["type"].as_u64() {
            Some(2) => out.push(SplitRecord::Segment(payload.unwrap_or_default())),
            Some(1) => {
                let name = if let Some(raw) = v.get("name_raw").and_then(|r| r.as_str()) {
                    b64.decode(raw)?
                } else {
                    v["name"].as_str().context("name")?.as_bytes().to_vec()
                };
                out.push(SplitRecord::File {
                    name,
                    size: v.get("size").and_then(|s| s.as_u64()).unwrap_or(0),
                    crc: payload,
                });
            }
            t => bail!("bad type {t:?}"),
        }
    }
    Ok(out)
}

/// Rebuilds the tar from tar-split records and the files of the extracted layer, as
/// dockerd's `asm.WriteOutputTarStream` does: segments are copied, each file with size > 0
/// is read by name from `dir` and its CRC-64/ISO checked.
pub fn reassemble(gz: &[u8], dir: &Path) -> Result<Vec<u8>> {
    let crc = crc::Crc::<u64>::new(&crc::CRC_64_GO_ISO);
    let mut out = Vec::new();
    for rec in decode_tar_split(gz)? {
        match rec {
            SplitRecord::Segment(b) => out.extend_from_slice(&b),
            SplitRecord::File {
                name,
                size,
                crc: want,
            } => {
                if size == 0 {
                    continue;
                }
                let p = dir.join(OsStr::from_bytes(&name));
                let data = std::fs::read(&p).with_context(|| format!("read {}", p.display()))?;
                ensure!(data.len() as u64 == size, "size of {}", p.display());
                let got = crc.checksum(&data).to_be_bytes().to_vec();
                ensure!(Some(got) == want, "crc of {}", p.display());
                out.extend_from_slice(&data);
            }
        }
    }
    Ok(out)
}

pub fn sha256(b: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

// ---- building trees ----

pub fn set_times(p: &Path, mtime: i64) {
    let t = rustix::fs::Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap_or_else(|e| panic!("utimensat {}: {e}", p.display()));
}

pub fn chown(p: &Path, uid: u32, gid: u32) {
    rustix::fs::chownat(
        rustix::fs::CWD,
        p,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
}

pub fn chmod(p: &Path, mode: u32) {
    rustix::fs::chmod(p, rustix::fs::Mode::from_raw_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

pub fn setxattr(p: &Path, k: &str, v: &[u8]) {
    rustix::fs::lsetxattr(p, k, v, rustix::fs::XattrFlags::empty())
        .unwrap_or_else(|e| panic!("setxattr {k} on {}: {e}", p.display()));
}

pub fn mknod(p: &Path, ft: rustix::fs::FileType, mode: u32, dev: u64) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p,
        ft,
        rustix::fs::Mode::from_raw_mode(mode),
        dev,
    )
    .unwrap_or_else(|e| panic!("mknod {}: {e}", p.display()));
}

pub fn path(root: &Path, rel: &[u8]) -> PathBuf {
    root.join(OsStr::from_bytes(rel))
}

/// A valid VFS_CAP_REVISION_2 `security.capability` value granting CAP_NET_RAW (effective).
pub const CAP_NET_RAW_V2: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// A valid `system.posix_acl_access` value: user::rwx, user:1234:r-x, group::r-x, mask::r-x,
/// other::r--.
pub fn acl_access() -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 7u16, u32::MAX),
        (0x02, 5, 1234),
        (0x04, 5, u32::MAX),
        (0x10, 5, u32::MAX),
        (0x20, 4, u32::MAX),
    ] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// A fixed tree with one of everything a layer can carry. With `overlay`, it also has a
/// whiteout (char 0:0) and an opaque directory.
pub fn rich_tree(root: &Path, overlay: bool, nonce: &[u8]) {
    use rustix::fs::FileType;
    let w = |rel: &[u8], data: &[u8]| std::fs::write(path(root, rel), data).unwrap();
    let d = |rel: &[u8]| std::fs::create_dir(path(root, rel)).unwrap();
    d(b"etc");
    w(b"etc/hosts", b"127.0.0.1 localhost\n");
    w(b"etc/nonce", nonce);
    chmod(&path(root, b"etc/hosts"), 0o644);
    d(b"bin");
    w(b"bin/tool", &vec![0xabu8; 70_000]);
    chmod(&path(root, b"bin/tool"), 0o4755);
    setxattr(
        &path(root, b"bin/tool"),
        "security.capability",
        &CAP_NET_RAW_V2,
    );
    std::fs::hard_link(path(root, b"bin/tool"), path(root, b"bin/tool-link")).unwrap();
    std::os::unix::fs::symlink("tool", path(root, b"bin/sym")).unwrap();
    std::os::unix::fs::symlink("/etc/../../outside/absolute", path(root, b"bin/abs-sym")).unwrap();
    d(b"data");
    w(b"data/user-xattr", b"x");
    setxattr(
        &path(root, b"data/user-xattr"),
        "user.comment",
        b"hello\0world\xff",
    );
    setxattr(&path(root, b"data"), "user.dirattr", b"d");
    w(b"data/acl", b"acl");
    chmod(&path(root, b"data/acl"), 0o755);
    setxattr(
        &path(root, b"data/acl"),
        "system.posix_acl_access",
        &acl_access(),
    );
    let long = format!("data/{}", "n".repeat(150));
    w(long.as_bytes(), b"long name");
    let deep = format!("data/{}/{}", "d".repeat(120), "f".repeat(90));
    std::fs::create_dir(path(root, format!("data/{}", "d".repeat(120)).as_bytes())).unwrap();
    w(deep.as_bytes(), b"prefix split");
    std::os::unix::fs::symlink("x".repeat(180), path(root, b"data/long-link-target")).unwrap();
    w(b"data/caf\xc3\xa9", b"utf8");
    w(b"data/bad\xff\xfe", b"not utf8");
    w(b"data/empty", b"");
    mknod(&path(root, b"data/fifo"), FileType::Fifo, 0o640, 0);
    mknod(
        &path(root, b"data/null"),
        FileType::CharacterDevice,
        0o666,
        rustix::fs::makedev(1, 3),
    );
    mknod(
        &path(root, b"data/blk"),
        FileType::BlockDevice,
        0o600,
        rustix::fs::makedev(7, 200),
    );
    chown(&path(root, b"data/user-xattr"), 1000, 1001);
    chown(&path(root, b"bin/sym"), 3_000_000, 42);
    if overlay {
        mknod(&path(root, b"etc/gone"), FileType::CharacterDevice, 0, 0);
        d(b"opq");
        setxattr(&path(root, b"opq"), "trusted.overlay.opaque", b"y");
        w(b"opq/kept", b"kept");
    }
    // mtimes last, children before parents.
    let mut all: Vec<PathBuf> = walkdir::WalkDir::new(root)
        .min_depth(1)
        .into_iter()
        .map(|e| e.unwrap().into_path())
        .collect();
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (i, p) in all.iter().enumerate() {
        set_times(p, 1_600_000_000 + i as i64 * 1000);
    }
}

// ---- crafting raw tars ----

/// One raw member: a USTAR header with `name`/`link` copied byte for byte (no checks), and
/// its padded data.
pub fn raw_member(name: &[u8], typeflag: u8, link: &[u8], data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    {
        let v7 = h.as_old_mut();
        v7.name[..name.len()].copy_from_slice(name);
        v7.linkname[..link.len()].copy_from_slice(link);
        v7.linkflag[0] = typeflag;
    }
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_size(data.len() as u64);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// Members followed by the end-of-archive marker.
pub fn raw_tar(members: &[Vec<u8>]) -> Vec<u8> {
    let mut out: Vec<u8> = members.concat();
    out.extend_from_slice(&[0u8; 1024]);
    out
}
