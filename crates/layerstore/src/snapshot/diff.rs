//! Tree walks: the DiffOp tree comparison, and the adapter layers for AUFS-format Docker layers.
//!
//! A changed entry is one whose type, content, mode, owner, xattrs, mtime, symlink target or device number differ;
//! atime and ctime are ignored. Deletions become overlay whiteouts (char device 0:0). Hardlinks among copied files
//! are kept as hardlinks.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, Timespec, Timestamps, CWD};

use super::store::io_err;
use crate::{Error, Result};

fn lstat(p: &Path) -> Result<Option<std::fs::Metadata>> {
    match std::fs::symlink_metadata(p) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io {
            op: "lstat",
            path: p.to_path_buf(),
            source: e,
        }),
    }
}

fn xattrs(p: &Path) -> Result<BTreeMap<OsString, Vec<u8>>> {
    let mut names = vec![0u8; 4096];
    let n = loop {
        match rustix::fs::llistxattr(p, &mut names) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) => names.resize(names.len() * 4, 0),
            Err(rustix::io::Errno::NOTSUP) => return Ok(BTreeMap::new()),
            Err(e) => {
                return Err(Error::Io {
                    op: "listxattr",
                    path: p.to_path_buf(),
                    source: e.into(),
                })
            }
        }
    };
    let mut out = BTreeMap::new();
    for name in names[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let name = OsStr::from_bytes(name);
        // Overlay's private attributes describe the layer format, not the file.
        if name.as_bytes().starts_with(b"trusted.overlay.") {
            continue;
        }
        let mut val = vec![0u8; 256];
        let len = loop {
            match rustix::fs::lgetxattr(p, name, &mut val) {
                Ok(n) => break n,
                Err(rustix::io::Errno::RANGE) => val.resize(val.len() * 16, 0),
                Err(rustix::io::Errno::NODATA) => break usize::MAX,
                Err(e) => {
                    return Err(Error::Io {
                        op: "getxattr",
                        path: p.to_path_buf(),
                        source: e.into(),
                    })
                }
            }
        };
        if len != usize::MAX {
            val.truncate(len);
            out.insert(name.to_os_string(), val);
        }
    }
    Ok(out)
}

fn same_content(a: &Path, b: &Path) -> Result<bool> {
    let mut fa = std::fs::File::open(a).map_err(io_err("open", a))?;
    let mut fb = std::fs::File::open(b).map_err(io_err("open", b))?;
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let na = read_full(&mut fa, &mut ba).map_err(io_err("read", a))?;
        let nb = read_full(&mut fb, &mut bb).map_err(io_err("read", b))?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// True if the entry at `u` (upper) equals the one at `l` (lower) in everything a diff counts, ignoring a
/// directory's children.
fn same_entry(u: &Path, um: &std::fs::Metadata, l: &Path, lm: &std::fs::Metadata) -> Result<bool> {
    let (ut, lt) = (um.file_type(), lm.file_type());
    let same_type = (ut.is_dir() && lt.is_dir())
        || (ut.is_file() && lt.is_file())
        || (ut.is_symlink() && lt.is_symlink())
        || (ut.is_char_device() && lt.is_char_device())
        || (ut.is_block_device() && lt.is_block_device())
        || (ut.is_fifo() && lt.is_fifo())
        || (ut.is_socket() && lt.is_socket());
    if !same_type
        || um.mode() != lm.mode()
        || um.uid() != lm.uid()
        || um.gid() != lm.gid()
        || um.mtime() != lm.mtime()
        || um.mtime_nsec() != lm.mtime_nsec()
        || um.rdev() != lm.rdev()
    {
        return Ok(false);
    }
    // The same underlying file seen through both mounts (a layer shared by both chains: same inode, same ctime) is
    // equal without reading it; anything else of equal size is compared byte by byte.
    let same_inode =
        um.ino() == lm.ino() && um.ctime() == lm.ctime() && um.ctime_nsec() == lm.ctime_nsec();
    if ut.is_file() && (um.size() != lm.size() || (!same_inode && !same_content(u, l)?)) {
        return Ok(false);
    }
    if ut.is_symlink()
        && std::fs::read_link(u).map_err(io_err("readlink", u))?
            != std::fs::read_link(l).map_err(io_err("readlink", l))?
    {
        return Ok(false);
    }
    Ok(xattrs(u)? == xattrs(l)?)
}

/// Copies owner, mode, xattrs and times of `src`'s metadata onto `dst` (no-follow).
pub(crate) fn copy_meta(src: &Path, md: &std::fs::Metadata, dst: &Path) -> Result<()> {
    let is_link = md.file_type().is_symlink();
    rustix::fs::chownat(
        CWD,
        dst,
        Some(rustix::fs::Uid::from_raw(md.uid())),
        Some(rustix::fs::Gid::from_raw(md.gid())),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| Error::Io {
        op: "chown",
        path: dst.to_path_buf(),
        source: e.into(),
    })?;
    if !is_link {
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(md.mode() & 0o7777))
            .map_err(io_err("chmod", dst))?;
    }
    for (k, v) in xattrs(src)? {
        rustix::fs::lsetxattr(dst, k.as_os_str(), &v, rustix::fs::XattrFlags::empty()).map_err(
            |e| Error::Io {
                op: "setxattr",
                path: dst.to_path_buf(),
                source: e.into(),
            },
        )?;
    }
    let ts = Timestamps {
        last_access: Timespec {
            tv_sec: md.atime(),
            tv_nsec: md.atime_nsec() as _,
        },
        last_modification: Timespec {
            tv_sec: md.mtime(),
            tv_nsec: md.mtime_nsec() as _,
        },
    };
    rustix::fs::utimensat(CWD, dst, &ts, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| Error::Io {
        op: "utimensat",
        path: dst.to_path_buf(),
        source: e.into(),
    })
}

/// Creates an overlay whiteout (char device 0:0) at `p`.
pub(crate) fn make_whiteout(p: &Path) -> Result<()> {
    rustix::fs::mknodat(CWD, p, FileType::CharacterDevice, Mode::empty(), 0).map_err(|e| {
        Error::Io {
            op: "mknod whiteout",
            path: p.to_path_buf(),
            source: e.into(),
        }
    })
}

struct Copier {
    /// (dev, ino) of an upper file with nlink > 1 → where it was copied.
    links: HashMap<(u64, u64), PathBuf>,
}

impl Copier {
    /// Copies one non-directory entry.
    fn copy_entry(&mut self, src: &Path, md: &std::fs::Metadata, dst: &Path) -> Result<()> {
        let ft = md.file_type();
        if !ft.is_dir() && md.nlink() > 1 {
            if let Some(first) = self.links.get(&(md.dev(), md.ino())) {
                return std::fs::hard_link(first, dst).map_err(io_err("link", dst));
            }
        }
        if ft.is_file() {
            std::fs::copy(src, dst).map_err(io_err("copy", src))?;
        } else if ft.is_symlink() {
            let t = std::fs::read_link(src).map_err(io_err("readlink", src))?;
            std::os::unix::fs::symlink(&t, dst).map_err(io_err("symlink", dst))?;
        } else {
            let kind = if ft.is_char_device() {
                FileType::CharacterDevice
            } else if ft.is_block_device() {
                FileType::BlockDevice
            } else if ft.is_fifo() {
                FileType::Fifo
            } else {
                FileType::Socket
            };
            rustix::fs::mknodat(
                CWD,
                dst,
                kind,
                Mode::from_raw_mode(md.mode() & 0o7777),
                md.rdev(),
            )
            .map_err(|e| Error::Io {
                op: "mknod",
                path: dst.to_path_buf(),
                source: e.into(),
            })?;
        }
        copy_meta(src, md, dst)?;
        if !ft.is_dir() && md.nlink() > 1 {
            self.links.insert((md.dev(), md.ino()), dst.to_path_buf());
        }
        Ok(())
    }

    /// Copies a whole subtree (`src` is a directory).
    fn copy_tree(&mut self, src: &Path, md: &std::fs::Metadata, dst: &Path) -> Result<()> {
        std::fs::create_dir(dst).map_err(io_err("create dir", dst))?;
        for name in sorted_names(src)? {
            let (s, d) = (src.join(&name), dst.join(&name));
            let m = lstat(&s)?.ok_or_else(|| Error::Io {
                op: "lstat",
                path: s.clone(),
                source: std::io::ErrorKind::NotFound.into(),
            })?;
            if m.is_dir() {
                self.copy_tree(&s, &m, &d)?;
            } else {
                self.copy_entry(&s, &m, &d)?;
            }
        }
        copy_meta(src, md, dst)
    }
}

fn sorted_names(dir: &Path) -> Result<BTreeSet<OsString>> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(dir).map_err(io_err("read dir", dir))? {
        out.insert(e.map_err(io_err("read dir", dir))?.file_name());
    }
    Ok(out)
}

/// Writes into `out` (an empty dir) the overlay-format layer that turns the tree `lower` into the tree `upper`.
pub(crate) fn compute_diff(lower: &Path, upper: &Path, out: &Path) -> Result<()> {
    let mut c = Copier {
        links: HashMap::new(),
    };
    let um = lstat(upper)?.ok_or_else(|| Error::Io {
        op: "lstat",
        path: upper.into(),
        source: std::io::ErrorKind::NotFound.into(),
    })?;
    diff_dir(&mut c, Some(lower), upper, out, true)?;
    // The layer root always carries the upper root's metadata.
    copy_meta(upper, &um, out)
}

/// Compares directory `upper` against `lower` (a directory, or `None` if lower has no directory here) and writes
/// changes under `out`, creating `out` on first need unless `out_exists`. Returns whether anything was written.
fn diff_dir(
    c: &mut Copier,
    lower: Option<&Path>,
    upper: &Path,
    out: &Path,
    out_exists: bool,
) -> Result<bool> {
    let mut created = out_exists;
    let mut wrote = false;
    let mut ensure = |created: &mut bool| -> Result<()> {
        wrote = true;
        if !*created {
            // Parents too: a change deep in a directory present on both sides is found before its
            // ancestors' entries are written (their metadata is applied as the walk unwinds).
            std::fs::create_dir_all(out).map_err(io_err("create dir", out))?;
            *created = true;
        }
        Ok(())
    };
    let unames = sorted_names(upper)?;
    for name in &unames {
        let u = upper.join(name);
        let o = out.join(name);
        let Some(um) = lstat(&u)? else { continue };
        let l = lower.map(|l| l.join(name));
        let lm = match &l {
            Some(l) => lstat(l)?,
            None => None,
        };
        if um.is_dir() {
            match (&l, &lm) {
                (Some(l), Some(lm)) if lm.is_dir() => {
                    let meta_same = same_entry(&u, &um, l, lm)?;
                    let child_changed = diff_dir(c, Some(l), &u, &o, false)?;
                    if child_changed || !meta_same {
                        ensure(&mut created)?;
                        if !child_changed {
                            std::fs::create_dir(&o).map_err(io_err("create dir", &o))?;
                        }
                        copy_meta(&u, &um, &o)?;
                    }
                }
                _ => {
                    ensure(&mut created)?;
                    c.copy_tree(&u, &um, &o)?;
                }
            }
        } else {
            let unchanged = match (&l, &lm) {
                (Some(l), Some(lm)) => same_entry(&u, &um, l, lm)?,
                _ => false,
            };
            if !unchanged {
                ensure(&mut created)?;
                c.copy_entry(&u, &um, &o)?;
            }
        }
    }
    if let Some(lower) = lower {
        for name in sorted_names(lower)? {
            if !unames.contains(&name) {
                ensure(&mut created)?;
                make_whiteout(&out.join(&name))?;
            }
        }
    }
    Ok(wrote)
}

/// AUFS whiteout markers in a Docker layer dir: paths (relative) of `.wh.<name>` and `.wh..wh..opq` files.
pub(crate) fn find_aufs_markers(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(dir).min_depth(1) {
        let e = e.map_err(|e| Error::Io {
            op: "walk",
            path: e.path().unwrap_or(dir).to_path_buf(),
            source: e
                .into_io_error()
                .unwrap_or_else(|| std::io::Error::other("walk loop")),
        })?;
        if e.file_name().as_bytes().starts_with(b".wh.") {
            out.push(e.path().strip_prefix(dir).unwrap_or(e.path()).to_path_buf());
        }
    }
    Ok(out)
}

const AUFS_OPAQUE: &[u8] = b".wh..wh..opq";

/// Creates `rel`'s parent directories under `out`, copying each one's metadata from `src` (so that the generated
/// layer never changes how a directory looks).
fn mkdirs_like(src: &Path, out: &Path, rel: &Path) -> Result<()> {
    let mut cur = PathBuf::new();
    for comp in rel.components() {
        cur.push(comp);
        let d = out.join(&cur);
        if lstat(&d)?.is_none() {
            std::fs::create_dir(&d).map_err(io_err("create dir", &d))?;
        }
    }
    // Metadata deepest first does not matter for dirs (times are set explicitly); walk back up to set them.
    let mut cur = rel.to_path_buf();
    loop {
        let s = src.join(&cur);
        if let Some(m) = lstat(&s)? {
            copy_meta(&s, &m, &out.join(&cur))?;
        }
        if !cur.pop() || cur.as_os_str().is_empty() {
            break;
        }
    }
    Ok(())
}

/// The layer placed directly *below* an AUFS-format layer: for each `.wh.<name>` a whiteout of `<name>`, for each
/// `.wh..wh..opq` an opaque directory. It hides from the layers below what the AUFS layer deleted.
pub(crate) fn write_aufs_below(src: &Path, markers: &[PathBuf], out: &Path) -> Result<()> {
    for m in markers {
        let name = m.file_name().map(|n| n.as_bytes()).unwrap_or_default();
        let parent = m.parent().unwrap_or(Path::new(""));
        mkdirs_like(src, out, parent)?;
        if name == AUFS_OPAQUE {
            let d = out.join(parent);
            rustix::fs::lsetxattr(
                &d,
                "trusted.overlay.opaque",
                b"y",
                rustix::fs::XattrFlags::empty(),
            )
            .map_err(|e| Error::Io {
                op: "setxattr opaque",
                path: d.clone(),
                source: e.into(),
            })?;
        } else {
            let target = out.join(parent).join(OsStr::from_bytes(&name[4..]));
            if lstat(&target)?.is_none() {
                make_whiteout(&target)?;
            }
        }
    }
    copy_meta(
        src,
        &std::fs::symlink_metadata(src).map_err(io_err("lstat", src))?,
        out,
    )
}

/// The layer placed directly *above* an AUFS-format layer: a whiteout for each marker file, hiding the markers.
pub(crate) fn write_aufs_above(src: &Path, markers: &[PathBuf], out: &Path) -> Result<()> {
    for m in markers {
        let parent = m.parent().unwrap_or(Path::new(""));
        mkdirs_like(src, out, parent)?;
        make_whiteout(&out.join(m))?;
        // Creating the whiteout changed the dir's mtime; restore it.
        let sp = src.join(parent);
        copy_meta(
            &sp,
            &std::fs::symlink_metadata(&sp).map_err(io_err("lstat", &sp))?,
            &out.join(parent),
        )?;
    }
    copy_meta(
        src,
        &std::fs::symlink_metadata(src).map_err(io_err("lstat", src))?,
        out,
    )
}

/// Marks every directory of a layer that holds a whiteout with `trusted.overlay.origin`.
///
/// overlayfs filters whiteouts out of a directory listing only when it expects the directory to hold some: when the
/// directory is merged from several layers or carries an origin xattr. A directory that exists in just one layer of a
/// mount (a DiffOp result mounted alone, or a delete whose target no lower layer has) is otherwise listed as is, and
/// its whiteouts show up as entries that cannot be stat'ed. The value is never decoded for a lower layer (no index,
/// no NFS export); tars never carry `trusted.overlay.*` and a mounted view never shows it.
pub(crate) fn mark_whiteout_dirs(layer: &Path) -> Result<()> {
    let mut marked = BTreeSet::new();
    for e in walkdir::WalkDir::new(layer).min_depth(1) {
        let e = e.map_err(|e| Error::Io {
            op: "walk",
            path: e.path().unwrap_or(layer).to_path_buf(),
            source: e
                .into_io_error()
                .unwrap_or_else(|| std::io::Error::other("walk loop")),
        })?;
        if !e.file_type().is_char_device() {
            continue;
        }
        let Some(md) = lstat(e.path())? else { continue };
        let Some(parent) = e.path().parent() else {
            continue;
        };
        if is_whiteout(&md) && parent != layer && marked.insert(parent.to_path_buf()) {
            rustix::fs::lsetxattr(
                parent,
                "trusted.overlay.origin",
                b"\0",
                rustix::fs::XattrFlags::empty(),
            )
            .map_err(|e| Error::Io {
                op: "setxattr overlay origin",
                path: parent.to_path_buf(),
                source: e.into(),
            })?;
        }
    }
    Ok(())
}

fn is_whiteout(md: &std::fs::Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

fn is_opaque(p: &Path) -> bool {
    let mut v = [0u8; 4];
    matches!(rustix::fs::lgetxattr(p, "trusted.overlay.opaque", &mut v), Ok(1) if v[0] == b'y')
}

/// Writes into `out` (an empty dir) the merged view of the overlay-format layer dirs `srcs` (topmost first), as a
/// plain tree: what overlayfs would show, with whiteouts and opaque dirs applied. Regular files are hardlinked from
/// the layers (they are immutable), or copied across filesystems. Used where a chain is deeper than overlayfs can
/// stack: the bottom of the chain is flattened into one lower dir.
pub(crate) fn flatten(srcs: &[PathBuf], out: &Path) -> Result<()> {
    let mut c = Copier {
        links: HashMap::new(),
    };
    flatten_dir(&mut c, srcs, out)?;
    if let Some(top) = srcs.first() {
        copy_meta(
            top,
            &std::fs::symlink_metadata(top).map_err(io_err("lstat", top))?,
            out,
        )?;
    }
    Ok(())
}

fn flatten_dir(c: &mut Copier, srcs: &[PathBuf], out: &Path) -> Result<()> {
    let mut names = BTreeSet::new();
    for s in srcs {
        names.extend(sorted_names(s)?);
    }
    for name in names {
        let o = out.join(&name);
        for (i, s) in srcs.iter().enumerate() {
            let p = s.join(&name);
            let Some(md) = lstat(&p)? else { continue };
            if is_whiteout(&md) {
                break;
            }
            if !md.is_dir() {
                if md.file_type().is_file() {
                    if std::fs::hard_link(&p, &o).is_err() {
                        std::fs::copy(&p, &o).map_err(io_err("copy", &p))?;
                        copy_meta(&p, &md, &o)?;
                    }
                } else {
                    c.copy_entry(&p, &md, &o)?;
                }
                break;
            }
            // A directory: it merges with the same-named dirs below, down to an opaque one or a non-dir.
            let mut sub = vec![p.clone()];
            if !is_opaque(&p) {
                for lower in &srcs[i + 1..] {
                    let lp = lower.join(&name);
                    match lstat(&lp)? {
                        Some(m) if m.is_dir() => {
                            let opaque = is_opaque(&lp);
                            sub.push(lp);
                            if opaque {
                                break;
                            }
                        }
                        Some(_) => break,
                        None => continue,
                    }
                }
            }
            std::fs::create_dir(&o).map_err(io_err("create dir", &o))?;
            flatten_dir(c, &sub, &o)?;
            copy_meta(&p, &md, &o)?;
            break;
        }
    }
    Ok(())
}

/// Copies the overlay-format layer tree `src` into `out` (an empty dir), leaving out the dirs in `omit` (paths
/// relative to `src`) with everything below them. Regular files are hardlinked (layers are immutable), or copied
/// across filesystems; everything else is recreated with its metadata, opaque markers included.
pub(crate) fn copy_layer_omitting(src: &Path, out: &Path, omit: &HashSet<Vec<u8>>) -> Result<()> {
    let mut c = Copier {
        links: HashMap::new(),
    };
    let mut rel = Vec::new();
    copy_omitting_dir(&mut c, src, out, omit, &mut rel)?;
    copy_meta(src, &lstat_existing(src)?, out)
}

fn copy_omitting_dir(
    c: &mut Copier,
    src: &Path,
    out: &Path,
    omit: &HashSet<Vec<u8>>,
    rel: &mut Vec<u8>,
) -> Result<()> {
    for name in sorted_names(src)? {
        let plen = rel.len();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(name.as_bytes());
        let (s, o) = (src.join(&name), out.join(&name));
        let md = lstat_existing(&s)?;
        if md.is_dir() {
            if !omit.contains(rel.as_slice()) {
                std::fs::create_dir(&o).map_err(io_err("create dir", &o))?;
                copy_omitting_dir(c, &s, &o, omit, rel)?;
                if is_opaque(&s) {
                    rustix::fs::lsetxattr(
                        &o,
                        "trusted.overlay.opaque",
                        b"y",
                        rustix::fs::XattrFlags::empty(),
                    )
                    .map_err(|e| Error::Io {
                        op: "setxattr",
                        path: o.clone(),
                        source: e.into(),
                    })?;
                }
                copy_meta(&s, &md, &o)?;
            }
        } else if md.file_type().is_file() {
            if std::fs::hard_link(&s, &o).is_err() {
                c.copy_entry(&s, &md, &o)?;
            }
        } else {
            c.copy_entry(&s, &md, &o)?;
        }
        rel.truncate(plen);
    }
    Ok(())
}

fn lstat_existing(p: &Path) -> Result<std::fs::Metadata> {
    std::fs::symlink_metadata(p).map_err(io_err("lstat", p))
}
