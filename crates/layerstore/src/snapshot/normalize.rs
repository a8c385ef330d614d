//! Normalising a mutable snapshot's upper dir against its parent's view when it is committed as a layer.
//!
//! An overlay upper dir records *how* a tree was changed, not only *what* changed. Two of its habits make a raw upper
//! dir a poor layer (BuildKit's overlay differ, `util/overlay` upstream, drops both when it writes a layer blob):
//!
//! - A directory removed and re-created is an *opaque* dir (`trusted.overlay.opaque=y`): it hides everything below it.
//!   Stacked on its own parent that is right, but as a MergeOp input (stacked on other inputs) it also hides what the
//!   other inputs put in that dir. Here the marker is replaced by explicit whiteouts of every name the parent's view
//!   has in that dir (and, inside it, in every re-created subdir whose parent view is a dir) that the upper lacks.
//! - An entry copied up without a real change (`mv a b; mv b a`, a chown to the same owner, a dir that only held such
//!   entries) is not a change; kept, it would override other merge inputs. Such entries are removed, and so are
//!   whiteouts of names the parent's view does not have.
//!
//! What counts as unchanged follows upstream's `sameDirent`: same file type and permission bits, owner and device
//! number, and for non-directories the same size and mtime second, then the same mtime nanoseconds unless both are 0
//! (a time truncated by a tar), in which case the content (or symlink target) is compared. berth is stricter than
//! upstream in three places: all xattrs count (upstream: only `security.capability`; overlay's own `trusted.overlay.*`
//! never count), a symlink's target is always compared, and a file with several names in the upper is always kept
//! (hardlinks made in the layer stay whole).
//!
//! Directory mtimes are not part of `sameDirent`, but they are part of the snapshot's view, which must not change at
//! commit (buildkitd keeps its upper dirs as they are; `touch /bin` in a step shows in a `type=tar` export of it,
//! upstream `TestMountStubsTimestamp`). So an upper dir that is the same as its lower one except for its mtime, and
//! holds nothing but such dirs, stays in the layer as a *quiet* dir: [`normalize_upper`] returns the topmost ones,
//! and the layer's tar leaves them (and so their subtrees) out, as upstream's differ records nothing for them. A dir
//! whose mtime did not change either is dropped as before.
//!
//! Every step leaves the snapshot's own view unchanged, so a crash part way leaves a usable mutable snapshot: the
//! whiteouts of an opaque dir are all written before its marker is removed (while the marker is set they hide nothing
//! more), and only then are unchanged entries under it dropped. Directories whose entries were touched get their
//! timestamps back.
//!
//! Cost: only the upper tree is walked. For each upper entry the parent's view is looked up through the layers' dirs
//! (one `fstatat` per layer down to the first that has the name); a lower directory is listed only for an opaque
//! upper dir; file content is read only when all metadata match and both mtimes have zero nanoseconds.
//!
//! Names come from the build: every lookup is one component relative to an open directory (`O_NOFOLLOW`, and
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` for directories), so nothing resolves outside the upper and layer
//! dirs.

use std::collections::HashSet;
use std::ffi::{CStr, CString, OsStr};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat, Timespec, Timestamps};
use rustix::io::Errno;

use crate::{Error, Result};

const OPAQUE: &CStr = c"trusted.overlay.opaque";

/// What [`normalize_upper`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NormalizeStats {
    /// Upper entries looked at.
    pub visited: u64,
    /// Opaque markers removed.
    pub opaque_cleared: u64,
    /// Whiteouts written in place of opaque markers.
    pub whiteouts_added: u64,
    /// Unchanged entries (and whiteouts of nothing) removed.
    pub dropped: u64,
}

/// Normalises the upper dir `upper` (not mounted) against the view of the overlay-format layer dirs `lowers`
/// (topmost first): see the module doc. Returns what it did and the topmost quiet dirs (relative paths, sorted), which
/// the layer's tar leaves out.
pub(crate) fn normalize_upper(
    upper: &Path,
    lowers: &[PathBuf],
) -> Result<(NormalizeStats, Vec<Vec<u8>>)> {
    let open_root = |p: &Path| {
        rustix::fs::open(
            p,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err("open dir", p.to_path_buf(), e))
    };
    let ufd = open_root(upper)?;
    let ust = rustix::fs::fstat(&ufd).map_err(|e| io_err("stat", upper.to_path_buf(), e))?;
    let lower = lowers
        .iter()
        .map(|p| open_root(p))
        .collect::<Result<Vec<_>>>()?;
    let mut n = Normalizer {
        root: upper,
        stats: NormalizeStats::default(),
        bufs: (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]),
        quiet: Vec::new(),
    };
    let mut rel = Vec::new();
    n.walk(ufd.as_fd(), &lower, &mut rel, &ust)?;
    Ok((n.stats, topmost(n.quiet)))
}

/// The paths of `quiet` that have no ancestor in it, sorted.
fn topmost(mut quiet: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    quiet.sort();
    let mut out: Vec<Vec<u8>> = Vec::new();
    for q in quiet {
        let covered = out
            .last()
            .is_some_and(|top| q.len() > top.len() && q.starts_with(top) && q[top.len()] == b'/');
        if !covered {
            out.push(q);
        }
    }
    out
}

/// What the normal pass decided for one upper entry.
enum Verdict {
    /// It changes nothing: removed (with these `unlinkat` flags).
    Drop(AtFlags),
    /// A change: kept and written to the layer's tar.
    Keep,
    /// A quiet dir: kept for the view, left out of the layer's tar.
    Quiet,
}

/// What [`Normalizer::walk`] found in one upper dir.
struct DirOutcome {
    /// Nothing is left in it.
    empty: bool,
    /// Everything left in it is a quiet dir.
    all_quiet: bool,
}

struct Normalizer<'a> {
    root: &'a Path,
    stats: NormalizeStats,
    bufs: (Vec<u8>, Vec<u8>),
    /// Quiet dirs found so far (relative paths), nested ones included.
    quiet: Vec<Vec<u8>>,
}

/// A syscall's result.
type Sys<T> = std::result::Result<T, Errno>;

/// The topmost entry for a name in a dir's lower view: index of the layer dir it is in, and its stat.
type Found = Option<(usize, Stat)>;

impl Normalizer<'_> {
    fn path(&self, rel: &[u8]) -> PathBuf {
        self.root.join(OsStr::from_bytes(rel))
    }

    fn err(&self, op: &'static str, rel: &[u8], e: Errno) -> Error {
        io_err(op, self.path(rel), e)
    }

    /// The normal pass over one upper dir (whose view merges with `lower`, its dir in the layers below, topmost
    /// first).
    fn walk(
        &mut self,
        ufd: BorrowedFd<'_>,
        lower: &[OwnedFd],
        rel: &mut Vec<u8>,
        dir_st: &Stat,
    ) -> Result<DirOutcome> {
        let names = list(ufd).map_err(|e| self.err("read dir", rel, e))?;
        let mut remaining = names.len();
        let mut all_quiet = true;
        let mut modified = false;
        for name in &names {
            let plen = rel.len();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(name.to_bytes());
            match self.entry(ufd, lower, name, rel)? {
                Verdict::Drop(flags) => {
                    rustix::fs::unlinkat(ufd, name.as_c_str(), flags)
                        .map_err(|e| self.err("remove unchanged entry", rel, e))?;
                    self.stats.dropped += 1;
                    remaining -= 1;
                    modified = true;
                }
                Verdict::Keep => all_quiet = false,
                Verdict::Quiet => {}
            }
            rel.truncate(plen);
        }
        if modified {
            restore_times(ufd, dir_st).map_err(|e| self.err("restore dir times", rel, e))?;
        }
        Ok(DirOutcome {
            empty: remaining == 0,
            all_quiet,
        })
    }

    /// One upper entry of the normal pass.
    fn entry(
        &mut self,
        ufd: BorrowedFd<'_>,
        lower: &[OwnedFd],
        name: &CStr,
        rel: &mut Vec<u8>,
    ) -> Result<Verdict> {
        let keep_or = |drop: bool, flags: AtFlags| {
            if drop {
                Verdict::Drop(flags)
            } else {
                Verdict::Keep
            }
        };
        self.stats.visited += 1;
        let st = rustix::fs::statat(ufd, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.err("lstat", rel, e))?;
        let found = lookup(lower, name).map_err(|e| self.err("lstat in lower layers", rel, e))?;
        let ft = FileType::from_raw_mode(st.st_mode);
        if is_whiteout(&st) {
            // A whiteout of nothing hides nothing.
            return Ok(keep_or(found.is_none(), AtFlags::empty()));
        }
        if ft != FileType::Directory {
            let Some((i, lst)) = &found else {
                return Ok(Verdict::Keep);
            };
            let same = st.st_nlink == 1
                && same_meta(&st, lst, false)
                && self.same_nondir(ufd, &lower[*i], name, &st, lst, rel)?;
            return Ok(keep_or(same, AtFlags::empty()));
        }
        let cfd = open_dir(ufd, name).map_err(|e| self.err("open dir", rel, e))?;
        let child_lower = match &found {
            Some((i, lst)) if FileType::from_raw_mode(lst.st_mode) == FileType::Directory => {
                child_dirs(&lower[*i..], name).map_err(|e| self.err("open lower dir", rel, e))?
            }
            _ => Vec::new(),
        };
        if is_opaque(cfd.as_fd()) {
            if !child_lower.is_empty() {
                self.opaque_region(cfd.as_fd(), &child_lower, rel, &st)?;
            }
            // Every name of the lower view the upper lacks is now whited out (or there was no lower dir): the marker
            // hides nothing more.
            rustix::fs::fremovexattr(&cfd, OPAQUE)
                .map_err(|e| self.err("remove opaque xattr", rel, e))?;
            self.stats.opaque_cleared += 1;
        }
        let sub = self.walk(cfd.as_fd(), &child_lower, rel, &st)?;
        if !sub.all_quiet {
            return Ok(Verdict::Keep);
        }
        // An upper dir over a lower dir holding nothing but quiet dirs: unchanged unless its own metadata changed;
        // quiet if only its mtime did.
        let same = match &found {
            Some((i, lst)) if !child_lower.is_empty() && same_meta(&st, lst, true) => {
                same_xattrs(ufd, lower[*i].as_fd(), name).map_err(|e| self.err("xattrs", rel, e))?
            }
            _ => false,
        };
        if !same {
            return Ok(Verdict::Keep);
        }
        let same_mtime = found.as_ref().is_some_and(|(_, lst)| {
            st.st_mtime == lst.st_mtime && st.st_mtime_nsec == lst.st_mtime_nsec
        });
        if sub.empty && same_mtime {
            return Ok(Verdict::Drop(AtFlags::REMOVEDIR));
        }
        self.quiet.push(rel.clone());
        Ok(Verdict::Quiet)
    }

    /// Under an opaque upper dir (`ufd`, whose lower view `lower` is a dir): whites out every name of the lower view
    /// the upper dir lacks, and recurses into upper subdirs whose lower view is a dir too (they are hidden by the
    /// opaque ancestor as well). Nested opaque markers are removed once their subtree is done.
    fn opaque_region(
        &mut self,
        ufd: BorrowedFd<'_>,
        lower: &[OwnedFd],
        rel: &mut Vec<u8>,
        dir_st: &Stat,
    ) -> Result<()> {
        let names = list(ufd).map_err(|e| self.err("read dir", rel, e))?;
        let present: HashSet<&[u8]> = names.iter().map(|n| n.to_bytes()).collect();
        let mut modified = false;
        for vname in visible_names(lower).map_err(|e| self.err("read lower dir", rel, e))? {
            if present.contains(vname.to_bytes()) {
                continue;
            }
            rustix::fs::mknodat(
                ufd,
                vname.as_c_str(),
                FileType::CharacterDevice,
                Mode::empty(),
                0,
            )
            .map_err(|e| self.err("mknod whiteout", rel, e))?;
            self.stats.whiteouts_added += 1;
            modified = true;
        }
        for name in &names {
            let st = match rustix::fs::statat(ufd, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(e) => return Err(self.err("lstat", rel, e)),
            };
            if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
                continue;
            }
            let plen = rel.len();
            rel.push(b'/');
            rel.extend_from_slice(name.to_bytes());
            let found =
                lookup(lower, name).map_err(|e| self.err("lstat in lower layers", rel, e))?;
            if let Some((i, lst)) = found {
                if FileType::from_raw_mode(lst.st_mode) == FileType::Directory {
                    let child_lower = child_dirs(&lower[i..], name)
                        .map_err(|e| self.err("open lower dir", rel, e))?;
                    let cfd = open_dir(ufd, name).map_err(|e| self.err("open dir", rel, e))?;
                    self.opaque_region(cfd.as_fd(), &child_lower, rel, &st)?;
                    if is_opaque(cfd.as_fd()) {
                        rustix::fs::fremovexattr(&cfd, OPAQUE)
                            .map_err(|e| self.err("remove opaque xattr", rel, e))?;
                        self.stats.opaque_cleared += 1;
                    }
                }
            }
            rel.truncate(plen);
        }
        if modified {
            restore_times(ufd, dir_st).map_err(|e| self.err("restore dir times", rel, e))?;
        }
        Ok(())
    }

    /// Content (or symlink target) and xattrs of two non-directories whose metadata match.
    fn same_nondir(
        &mut self,
        ufd: BorrowedFd<'_>,
        lfd: &OwnedFd,
        name: &CStr,
        st: &Stat,
        lst: &Stat,
        rel: &[u8],
    ) -> Result<bool> {
        let ft = FileType::from_raw_mode(st.st_mode);
        if ft == FileType::Symlink {
            let a = rustix::fs::readlinkat(ufd, name, Vec::new())
                .map_err(|e| self.err("readlink", rel, e))?;
            let b = rustix::fs::readlinkat(lfd, name, Vec::new())
                .map_err(|e| self.err("readlink in lower layer", rel, e))?;
            if a != b {
                return Ok(false);
            }
        }
        // Equal nonzero nanoseconds: the same file (copy-up keeps times; a write sets them). Both zero: the time may
        // have been truncated (unpacked from a tar), so look at the content.
        if ft == FileType::RegularFile
            && st.st_mtime_nsec == 0
            && lst.st_mtime_nsec == 0
            && st.st_size > 0
            && !self
                .same_content(ufd, lfd.as_fd(), name)
                .map_err(|e| self.err("compare content", rel, e))?
        {
            return Ok(false);
        }
        same_xattrs(ufd, lfd.as_fd(), name).map_err(|e| self.err("xattrs", rel, e))
    }

    fn same_content(&mut self, a: BorrowedFd<'_>, b: BorrowedFd<'_>, name: &CStr) -> Sys<bool> {
        let open = |d: BorrowedFd<'_>| {
            rustix::fs::openat(
                d,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map(std::fs::File::from)
        };
        let (mut fa, mut fb) = (open(a)?, open(b)?);
        let (ba, bb) = (&mut self.bufs.0, &mut self.bufs.1);
        loop {
            let na = read_full(&mut fa, ba).map_err(errno)?;
            let nb = read_full(&mut fb, bb).map_err(errno)?;
            if na != nb || ba[..na] != bb[..nb] {
                return Ok(false);
            }
            if na == 0 {
                return Ok(true);
            }
        }
    }
}

/// upstream `sameDirent` without content: type and permission bits, owner, device number; for non-directories also
/// size and mtime (nanoseconds equal, or both zero and then the content decides).
fn same_meta(a: &Stat, b: &Stat, dir: bool) -> bool {
    if a.st_mode != b.st_mode
        || a.st_uid != b.st_uid
        || a.st_gid != b.st_gid
        || a.st_rdev != b.st_rdev
    {
        return false;
    }
    dir || (a.st_size == b.st_size
        && a.st_mtime == b.st_mtime
        && a.st_mtime_nsec == b.st_mtime_nsec)
}

fn is_whiteout(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0
}

fn is_opaque(fd: BorrowedFd<'_>) -> bool {
    let mut v = [0u8; 4];
    matches!(rustix::fs::fgetxattr(fd, OPAQUE, &mut v), Ok(1) if v[0] == b'y')
}

/// Names in a directory (without `.` and `..`), sorted.
fn list(fd: BorrowedFd<'_>) -> Sys<Vec<CString>> {
    let mut dir = rustix::fs::Dir::read_from(fd)?;
    let mut out = Vec::new();
    while let Some(e) = dir.read() {
        let e = e?;
        let n = e.file_name();
        if n.to_bytes() != b"." && n.to_bytes() != b".." {
            out.push(n.to_owned());
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Opens the subdirectory `name` of `dfd`, never following a symlink and never leaving `dfd`.
fn open_dir(dfd: BorrowedFd<'_>, name: &CStr) -> Sys<OwnedFd> {
    crate::openat2_retry(
        dfd,
        OsStr::from_bytes(name.to_bytes()),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
}

/// The topmost entry named `name` in the merged dir `lower` (topmost first); `None` if no layer has it or the
/// topmost occurrence is a whiteout.
fn lookup(lower: &[OwnedFd], name: &CStr) -> Sys<Found> {
    for (i, d) in lower.iter().enumerate() {
        match rustix::fs::statat(d, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(e),
            Ok(st) if is_whiteout(&st) => return Ok(None),
            Ok(st) => return Ok(Some((i, st))),
        }
    }
    Ok(None)
}

/// The merged dir `name` below: its dir in `lower[0]` (which has it as a dir) and in the layers under it, down to an
/// opaque one or to a layer where the name is something else (overlayfs' merge rule).
fn child_dirs(lower: &[OwnedFd], name: &CStr) -> Sys<Vec<OwnedFd>> {
    let mut out = Vec::new();
    for d in lower {
        match rustix::fs::statat(d, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(e),
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                let fd = open_dir(d.as_fd(), name)?;
                let opaque = is_opaque(fd.as_fd());
                out.push(fd);
                if opaque {
                    break;
                }
            }
            Ok(_) => break,
        }
    }
    Ok(out)
}

/// Names the merged dir `lower` (topmost first) shows: each name's topmost occurrence decides, a whiteout hides it.
fn visible_names(lower: &[OwnedFd]) -> Sys<Vec<CString>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for d in lower {
        for name in list(d.as_fd())? {
            if seen.contains(&name) {
                continue;
            }
            let st = rustix::fs::statat(d, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)?;
            if !is_whiteout(&st) {
                out.push(name.clone());
            }
            seen.insert(name);
        }
    }
    Ok(out)
}

/// All xattrs except overlay's own, of `name` in two dirs, compared.
fn same_xattrs(a: BorrowedFd<'_>, b: BorrowedFd<'_>, name: &CStr) -> Sys<bool> {
    Ok(xattrs(a, name)? == xattrs(b, name)?)
}

fn xattrs(dfd: BorrowedFd<'_>, name: &CStr) -> Sys<Vec<(Vec<u8>, Vec<u8>)>> {
    // Through the dir's fd in /proc, with the l* calls: the last component (a symlink, a device) is not followed.
    let mut p = format!("/proc/self/fd/{}/", dfd.as_raw_fd()).into_bytes();
    p.extend_from_slice(name.to_bytes());
    let p = PathBuf::from(OsStr::from_bytes(&p));
    let mut names = vec![0u8; 1024];
    let n = loop {
        match rustix::fs::llistxattr(&p, &mut names) {
            Ok(n) => break n,
            Err(Errno::RANGE) => names.resize(names.len() * 4, 0),
            Err(Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        }
    };
    let mut out = Vec::new();
    for xn in names[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
        if xn.starts_with(b"trusted.overlay.") || xn.starts_with(b"user.overlay.") {
            continue;
        }
        let mut val = vec![0u8; 256];
        loop {
            match rustix::fs::lgetxattr(&p, OsStr::from_bytes(xn), &mut val) {
                Ok(len) => {
                    val.truncate(len);
                    out.push((xn.to_vec(), val));
                    break;
                }
                Err(Errno::RANGE) => val.resize(val.len() * 16, 0),
                Err(Errno::NODATA) => break,
                Err(e) => return Err(e),
            }
        }
    }
    out.sort();
    Ok(out)
}

fn restore_times(fd: BorrowedFd<'_>, st: &Stat) -> Sys<()> {
    rustix::fs::futimens(
        fd,
        &Timestamps {
            last_access: Timespec {
                tv_sec: st.st_atime as _,
                tv_nsec: st.st_atime_nsec as _,
            },
            last_modification: Timespec {
                tv_sec: st.st_mtime as _,
                tv_nsec: st.st_mtime_nsec as _,
            },
        },
    )
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

fn errno(e: std::io::Error) -> Errno {
    Errno::from_io_error(&e).unwrap_or(Errno::IO)
}

fn io_err(op: &'static str, path: PathBuf, e: Errno) -> Error {
    Error::Io {
        op,
        path,
        source: e.into(),
    }
}
