//! `FileActionCopy`: `cp -a`-like copy between two roots (fsutil `copy.Copy` semantics).
//!
//! Top level: wildcards expand the source; the destination's missing parents are created
//! (0755, with the action's owner and time); the destination rule of `llb.md` §5 decides
//! between `dest` and `dest/<basename(src)>`. The tree copy then works only with directory fds
//! and `*at` calls with no symlink following below the resolved top entries, so neither the
//! source tree nor an existing destination tree can redirect it out of its root.
//!
//! Per entry: include/exclude patterns (dockerignore syntax, matched on the path relative to the
//! copied source; directories that do not match are created only when something inside them
//! is copied); regular files are copied (hardlinks within the copy are preserved), symlinks
//! recreated as is, devices/fifos recreated; then owner (override or source's), mode
//! (permission bits overridden by `mode` when set), times (override or source's) and xattrs.
//! An existing destination directory is merged into; an existing non-directory is replaced;
//! replacing a directory with a file is an error.
//!
//! Regular files (the bulk of a context copy) are handled on their two open fds: an exclusive
//! create (an existing destination is only looked at when the create finds one), the data, then
//! `fchown`, `fchmod`, xattrs and `futimens`. Data goes by `FICLONE` where the filesystem shares
//! extents, else `copy_file_range(2)` (no user-space round trip), else `pread`/`pwrite`; the
//! mechanism steps down once per copy at the first refusal ([`DataCopy`]). Sparse files are
//! copied extent by extent, so holes stay holes. Nothing is synced here: the layer store makes
//! the whole layer durable with one `syncfs` when it commits it.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::rc::Rc;

use fsutil::patterns::{MatchInfo, PatternMatcher};
use protos::pb;
use rustix::fs::{
    chmodat, linkat, mkdirat, mknodat, openat, readlinkat, statat, symlinkat, unlinkat, AtFlags,
    Dir, FileType, Mode, OFlags, Stat,
};

use super::root::{clean_abs, file_type, lchown, lutimes, split, split_nanos, Root};
use super::{glob, io_to_action, mkdir_all, Attrs};
use crate::error::{Error, Result};

/// Go `cleanPath` for copy paths: absolute and clean, keeping a trailing `/` or `/.`.
fn clean_keep_suffix(s: &str) -> String {
    let mut c = clean_abs(s);
    if s.ends_with("/.") {
        if c != "/" {
            c.push('/');
        }
        c.push('.');
    } else if s.ends_with('/') && c != "/" {
        c.push('/');
    }
    c
}

/// Go `filepath.Base`.
fn go_base(p: &str) -> String {
    let t = p.trim_end_matches('/');
    if t.is_empty() {
        return "/".into();
    }
    t.rsplit('/').next().unwrap_or(t).to_string()
}

fn join(a: &str, b: &str) -> String {
    clean_abs(&format!("{a}/{b}"))
}

/// Resolves `p` in `root` following symlinks for the existing prefix; a missing tail is kept.
fn resolve_lenient(root: &Root, p: &str) -> io::Result<String> {
    match root.resolve_existing(p) {
        Ok(r) => Ok(r),
        Err(e) if e.kind() == io::ErrorKind::NotFound => match split(p) {
            None => Ok("/".into()),
            Some((parent, name)) => Ok(join(&resolve_lenient(root, &parent)?, &name)),
        },
        Err(e) => Err(e),
    }
}

/// Runs a copy action from `src` onto `dst`.
pub(crate) fn copy(
    src: &Root,
    dst: &Root,
    a: &pb::FileActionCopy,
    owner: Option<(u32, u32)>,
    cancelled: &dyn Fn() -> bool,
) -> Result<()> {
    let src_path = clean_keep_suffix(&a.src);
    let dest_path = clean_keep_suffix(&a.dest);
    let attrs = Attrs {
        owner,
        time: Attrs::time_from_pb(a.timestamp),
    };
    if !a.create_dest_path {
        if let Some((parent, _)) = split(&a.dest) {
            dst.stat(&parent, true).map_err(|e| Error::FileAction {
                action: "copy",
                path: a.dest.clone(),
                reason: format!(
                    "destination directory {parent}: {}",
                    io_to_action("copy", &parent, e)
                ),
            })?;
        }
    }
    let matcher = |pats: &[String], what: &str| -> Result<Option<PatternMatcher>> {
        if pats.is_empty() {
            return Ok(None);
        }
        PatternMatcher::new(pats)
            .map(Some)
            .map_err(|e| Error::FileAction {
                action: "copy",
                path: a.src.clone(),
                reason: format!("invalid {what} patterns: {e}"),
            })
    };
    let mut c = Copier {
        owner,
        mode: (a.mode != -1).then_some((a.mode as u32) & 0o777),
        time: attrs.time,
        include: matcher(&a.include_patterns, "include")?,
        exclude: matcher(&a.exclude_patterns, "exclude")?,
        inodes: HashMap::new(),
        stack: vec![],
        cancelled,
        replace: a.always_replace_existing_dest_paths,
        data: DataCopy::Clone,
    };
    let srcs = if a.allow_wildcard {
        let m = glob::resolve_wildcards(src, &src_path, a.follow_symlink)
            .map_err(|e| io_to_action("copy", &a.src, e))?;
        if m.is_empty() {
            if a.allow_empty_wildcard {
                return Ok(());
            }
            return Err(Error::PathNotFound {
                path: a.src.clone(),
            });
        }
        m
    } else {
        vec![src_path.clone()]
    };
    for s in srcs {
        if a.attempt_unpack_docker_compatibility
            && super::unpack::unpack(src, &s, dst, &dest_path, &attrs)?
        {
            continue;
        }
        c.copy_one(
            src,
            dst,
            &s,
            &dest_path,
            a.dir_copy_contents,
            a.follow_symlink,
            &attrs,
        )?;
    }
    Ok(())
}

struct Level {
    /// Source stat of the directory.
    st: Stat,
    /// Name in the destination parent.
    name: Vec<u8>,
    /// Destination fd once created or opened.
    fd: Option<Rc<OwnedFd>>,
    /// Whether the destination directory was created by this copy.
    created: bool,
    /// Overwrite-metadata flag of the copy call that pushed it.
    overwrite: bool,
}

struct Copier<'a> {
    owner: Option<(u32, u32)>,
    mode: Option<u32>,
    time: Option<i64>,
    include: Option<PatternMatcher>,
    exclude: Option<PatternMatcher>,
    /// (dev, ino) of copied multi-link files → where the first copy went.
    inodes: HashMap<(u64, u64), (Rc<OwnedFd>, Vec<u8>)>,
    /// Directory levels; level 0 is the destination parent of the top entry.
    stack: Vec<Level>,
    cancelled: &'a dyn Fn() -> bool,
    /// `alwaysReplaceExistingDestPaths`: an existing destination of another type is replaced.
    replace: bool,
    /// How file data is copied; narrowed at the first refusal (see [`DataCopy`]).
    data: DataCopy,
}

fn cerr(path: &[u8], e: impl Into<io::Error>) -> Error {
    io_to_action("copy", &String::from_utf8_lossy(path), e.into())
}

impl Copier<'_> {
    #[allow(clippy::too_many_arguments)]
    fn copy_one(
        &mut self,
        src: &Root,
        dst: &Root,
        s: &str,
        dest: &str,
        contents: bool,
        follow: bool,
        attrs: &Attrs,
    ) -> Result<()> {
        // The destination's parent (or the destination itself when it names a directory).
        let ensure = match dest.rsplit_once('/') {
            Some((d, f)) if !f.is_empty() && f != "." => {
                if d.is_empty() {
                    "/".to_string()
                } else {
                    d.to_string()
                }
            }
            _ => dest.to_string(),
        };
        // Symlinks on the way are followed even when dangling, so `COPY f /link/` with `link`
        // pointing at a missing directory creates that directory (as fsutil does).
        let ensure = dst
            .resolve_through_links(&ensure)
            .map_err(|e| io_to_action("copy", dest, e))?;
        mkdir_all(dst, &ensure, Mode::from_raw_mode(0o755), attrs)?;
        let dst_resolved =
            resolve_lenient(dst, &clean_abs(dest)).map_err(|e| io_to_action("copy", dest, e))?;
        let not_found = |e: io::Error| {
            if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) {
                Error::PathNotFound {
                    path: s.to_string(),
                }
            } else {
                io_to_action("copy", s, e)
            }
        };
        let src_followed = if follow {
            src.resolve_existing(s).map_err(not_found)?
        } else {
            match split(s) {
                None => "/".to_string(),
                Some((parent, name)) => {
                    join(&src.resolve_existing(&parent).map_err(not_found)?, &name)
                }
            }
        };
        let fi_src = src.stat(&src_followed, false).map_err(not_found)?;
        let src_is_dir = file_type(&fi_src) == FileType::Directory;
        let fi_dest = match dst.stat(&dst_resolved, true) {
            Ok(st) => Some(st),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_to_action("copy", dest, e)),
        };
        let dest_is_dir = fi_dest
            .as_ref()
            .is_some_and(|st| file_type(st) == FileType::Directory);
        let mut dest_path = dst_resolved.clone();
        if (!contents && src_is_dir && fi_dest.is_some()) || (!src_is_dir && dest_is_dir) {
            dest_path = join(&dest_path, &go_base(s));
        }
        let target = if contents && src_is_dir && fi_dest.is_none() {
            dest_path.clone()
        } else {
            split(&dest_path).map(|x| x.0).unwrap_or_else(|| "/".into())
        };
        mkdir_all(dst, &target, Mode::from_raw_mode(0o755), attrs)?;

        let (src_parent, src_name): (OwnedFd, Vec<u8>) = match split(&src_followed) {
            None => (src.open_dir("/").map_err(not_found)?, b".".to_vec()),
            Some((p, n)) => (src.open_dir(&p).map_err(not_found)?, n.into_bytes()),
        };
        let (dst_parent, dst_name): (OwnedFd, Vec<u8>) = match split(&dest_path) {
            None => (
                dst.open_dir("/")
                    .map_err(|e| io_to_action("copy", dest, e))?,
                b".".to_vec(),
            ),
            Some((p, n)) => (
                dst.open_dir(&p).map_err(|e| io_to_action("copy", &p, e))?,
                n.into_bytes(),
            ),
        };
        self.stack.clear();
        self.stack.push(Level {
            st: fi_src,
            name: vec![],
            fd: Some(Rc::new(dst_parent)),
            created: false,
            overwrite: false,
        });
        self.copy_entry(
            0,
            &src_parent,
            &src_name,
            &dst_name,
            "",
            false,
            &MatchInfo::default(),
            &MatchInfo::default(),
        )
    }

    /// The destination directory of level `l`, creating delayed parents (directories that did
    /// not match include patterns themselves) on first use.
    fn dst_dir(&mut self, l: usize) -> Result<Rc<OwnedFd>> {
        if let Some(fd) = &self.stack[l].fd {
            return Ok(fd.clone());
        }
        let parent = self.dst_dir(l - 1)?;
        let (st, name, overwrite) = {
            let lv = &self.stack[l];
            (lv.st, lv.name.clone(), lv.overwrite)
        };
        let created = copy_dir_only(&parent, &name, &st, overwrite, self.replace)?;
        if created {
            self.copy_file_info(&st, &parent, &name)?;
        }
        let fd = Rc::new(open_dir_at(&parent, &name).map_err(|e| cerr(&name, e))?);
        let lv = &mut self.stack[l];
        lv.fd = Some(fd.clone());
        lv.created = created;
        Ok(fd)
    }

    #[allow(clippy::too_many_arguments)]
    fn copy_entry(
        &mut self,
        level: usize,
        src_parent: &OwnedFd,
        name: &[u8],
        dst_name: &[u8],
        rel: &str,
        overwrite: bool,
        pinc: &MatchInfo,
        pexc: &MatchInfo,
    ) -> Result<()> {
        if (self.cancelled)() {
            return Err(Error::Canceled);
        }
        let st = statat(src_parent, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| cerr(name, e))?;
        let ft = file_type(&st);
        let mut include = true;
        let mut inc_info = MatchInfo::default();
        let mut exc_info = MatchInfo::default();
        if !rel.is_empty() {
            if let Some(m) = &self.include {
                let (ok, info) = m
                    .matches_using_parent_results(rel, pinc)
                    .map_err(|e| Error::Internal(format!("include patterns: {e}")))?;
                include = ok;
                inc_info = info;
            }
            if let Some(m) = &self.exclude {
                let (ex, info) = m
                    .matches_using_parent_results(rel, pexc)
                    .map_err(|e| Error::Internal(format!("exclude patterns: {e}")))?;
                if ex {
                    include = false;
                }
                exc_info = info;
            }
        }
        if ft == FileType::Directory {
            let src_fd = open_dir_at(src_parent, name).map_err(|e| cerr(name, e))?;
            let target_existed = if include {
                let p = self.dst_dir(level)?;
                statat(&*p, dst_name, AtFlags::SYMLINK_NOFOLLOW).is_ok()
            } else {
                false
            };
            self.stack.push(Level {
                st,
                name: dst_name.to_vec(),
                fd: None,
                created: false,
                overwrite,
            });
            let me = self.stack.len() - 1;
            if include {
                self.dst_dir(me)?;
            }
            // A directory excluded without exceptions below it is skipped whole.
            let skip = !include
                && self.include.is_none()
                && self.exclude.as_ref().is_some_and(|m| !m.has_exclusions());
            if !skip {
                let mut names = vec![];
                for ent in Dir::read_from(&src_fd).map_err(|e| cerr(name, e))? {
                    let ent = ent.map_err(|e| cerr(name, e))?;
                    let n = ent.file_name().to_bytes();
                    if n == b"." || n == b".." {
                        continue;
                    }
                    names.push(n.to_vec());
                }
                names.sort();
                for n in names {
                    let child_rel = if rel.is_empty() {
                        String::from_utf8_lossy(&n).into_owned()
                    } else {
                        format!("{rel}/{}", String::from_utf8_lossy(&n))
                    };
                    self.copy_entry(me, &src_fd, &n, &n, &child_rel, true, &inc_info, &exc_info)?;
                }
            }
            let lv = self.stack.pop().expect("pushed");
            if include {
                let parent = self.dst_dir(level)?;
                if !overwrite {
                    if lv.created {
                        self.copy_file_info(&st, &parent, dst_name)?;
                        copy_xattrs(src_parent, name, &parent, dst_name);
                    } else if target_existed {
                        self.copy_times(&st, &parent, dst_name)?;
                    }
                } else {
                    self.copy_file_info(&st, &parent, dst_name)?;
                    copy_xattrs(src_parent, name, &parent, dst_name);
                }
            }
            return Ok(());
        }
        if !include {
            return Ok(());
        }
        let parent = self.dst_dir(level)?;
        let key = (st.st_dev, st.st_ino);
        if ft == FileType::RegularFile && (st.st_nlink <= 1 || !self.inodes.contains_key(&key)) {
            // The common case, on open fds: create (an existing entry is handled only when the
            // exclusive create finds one), copy the data, then owner, mode, xattrs and times.
            self.copy_regular(&st, src_parent, name, &parent, dst_name)?;
            if st.st_nlink > 1 {
                self.inodes.insert(key, (parent.clone(), dst_name.to_vec()));
            }
            return Ok(());
        }
        self.clear_dest(&parent, dst_name)?;
        match ft {
            FileType::RegularFile => {
                // A further name of an inode copied earlier in this copy.
                let (dfd, dname) = self.inodes.get(&key).expect("checked above");
                linkat(
                    &**dfd,
                    dname.as_slice(),
                    &*parent,
                    dst_name,
                    AtFlags::empty(),
                )
                .map_err(|e| cerr(dst_name, e))?;
            }
            FileType::Symlink => {
                let target = readlinkat(src_parent, name, vec![]).map_err(|e| cerr(name, e))?;
                symlinkat(target.as_c_str(), &*parent, dst_name).map_err(|e| cerr(dst_name, e))?;
            }
            FileType::CharacterDevice
            | FileType::BlockDevice
            | FileType::Fifo
            | FileType::Socket => {
                mknodat(
                    &*parent,
                    dst_name,
                    ft,
                    Mode::from_raw_mode(st.st_mode & 0o7777),
                    st.st_rdev,
                )
                .map_err(|e| cerr(dst_name, e))?;
            }
            _ => {
                return Err(Error::FileAction {
                    action: "copy",
                    path: String::from_utf8_lossy(name).into_owned(),
                    reason: "unsupported file type".into(),
                })
            }
        }
        self.copy_file_info(&st, &parent, dst_name)?;
        if ft != FileType::Symlink {
            copy_xattrs(src_parent, name, &parent, dst_name);
        }
        Ok(())
    }

    fn copy_file_info(&self, st: &Stat, dir: &OwnedFd, name: &[u8]) -> Result<()> {
        let (uid, gid) = self.owner.unwrap_or((st.st_uid, st.st_gid));
        let n = OsStr::from_bytes(name).to_string_lossy().into_owned();
        lchown(dir, &n, uid, gid).map_err(|e| cerr(name, e))?;
        if file_type(st) != FileType::Symlink {
            let mut m = st.st_mode & 0o7777;
            if let Some(mode) = self.mode {
                m = (m & !0o777) | mode;
            }
            chmodat(dir, name, Mode::from_raw_mode(m), AtFlags::empty())
                .map_err(|e| cerr(name, e))?;
        }
        self.copy_times(st, dir, name)
    }

    fn copy_times(&self, st: &Stat, dir: &OwnedFd, name: &[u8]) -> Result<()> {
        let n = OsStr::from_bytes(name).to_string_lossy().into_owned();
        let (a, m) = match self.time {
            Some(t) => (split_nanos(t), split_nanos(t)),
            None => (
                (st.st_atime, st.st_atime_nsec as i64),
                (st.st_mtime, st.st_mtime_nsec as i64),
            ),
        };
        lutimes(dir, &n, a, m).map_err(|e| cerr(name, e))
    }

    /// Makes room for a new non-directory `dst_name`: an existing non-directory is removed, an
    /// existing directory is an error unless `replace` is set.
    fn clear_dest(&self, parent: &OwnedFd, dst_name: &[u8]) -> Result<()> {
        match statat(parent, dst_name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(t) if file_type(&t) == FileType::Directory && self.replace => {
                super::remove_all_at(parent, dst_name).map_err(|e| cerr(dst_name, e))
            }
            Ok(t) if file_type(&t) == FileType::Directory => Err(Error::FileAction {
                action: "copy",
                path: String::from_utf8_lossy(dst_name).into_owned(),
                reason: "cannot replace a directory with a file".into(),
            }),
            Ok(_) => unlinkat(parent, dst_name, AtFlags::empty()).map_err(|e| cerr(dst_name, e)),
            Err(_) => Ok(()),
        }
    }

    /// Copies regular file `name` (stat `st`) to `dst_name` with its metadata, all on the two
    /// open fds: 7 syscalls for a small file without xattrs where the name-based sequence took
    /// 19 (two extra stats and opens, `std::io::copy`'s two `statx` and EOF probe).
    fn copy_regular(
        &mut self,
        st: &Stat,
        src_dir: &OwnedFd,
        name: &[u8],
        dst_dir: &OwnedFd,
        dst_name: &[u8],
    ) -> Result<()> {
        let s = openat(
            src_dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| cerr(name, e))?;
        let create = || {
            openat(
                dst_dir,
                dst_name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
        };
        let d = match create() {
            Ok(d) => d,
            Err(rustix::io::Errno::EXIST) => {
                self.clear_dest(dst_dir, dst_name)?;
                create().map_err(|e| cerr(dst_name, e))?
            }
            Err(e) => return Err(cerr(dst_name, e)),
        };
        let (s, d) = (std::fs::File::from(s), std::fs::File::from(d));
        copy_data(&mut self.data, &s, &d, st).map_err(|e| cerr(name, e))?;
        let (uid, gid) = self.owner.unwrap_or((st.st_uid, st.st_gid));
        rustix::fs::fchown(
            &d,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        )
        .map_err(|e| cerr(dst_name, e))?;
        let mut m = st.st_mode & 0o7777;
        if let Some(mode) = self.mode {
            m = (m & !0o777) | mode;
        }
        rustix::fs::fchmod(&d, Mode::from_raw_mode(m)).map_err(|e| cerr(dst_name, e))?;
        if let Err(e) = copy_xattrs_fd(&s, &d) {
            tracing::warn!(file = %String::from_utf8_lossy(name), error = %e, "copying xattrs failed");
        }
        let (a, mt) = match self.time {
            Some(t) => (split_nanos(t), split_nanos(t)),
            None => (
                (st.st_atime, st.st_atime_nsec as i64),
                (st.st_mtime, st.st_mtime_nsec as i64),
            ),
        };
        let ts = |(tv_sec, ns): (i64, i64)| rustix::fs::Timespec {
            tv_sec,
            tv_nsec: ns as _,
        };
        rustix::fs::futimens(
            &d,
            &rustix::fs::Timestamps {
                last_access: ts(a),
                last_modification: ts(mt),
            },
        )
        .map_err(|e| cerr(dst_name, e))
    }
}

/// How file data is copied. A copy starts with [`DataCopy::Clone`] and steps down for the rest
/// of the copy when the filesystems refuse, so a copy on ext4 (no reflinks) pays one failed
/// `FICLONE` in all, and a copy across filesystems that refuse `copy_file_range` one failed
/// call before falling back to user-space reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DataCopy {
    /// `ioctl(FICLONE)`: shares the extents (btrfs, xfs with reflink); nothing is read.
    Clone,
    /// `copy_file_range(2)`: the kernel copies (or splices) without a user-space round trip.
    Range,
    /// `pread`/`pwrite` through a user-space buffer.
    ReadWrite,
}

/// Errors that mean "this mechanism is not available here", not "the copy failed".
fn unsupported(e: rustix::io::Errno) -> bool {
    use rustix::io::Errno;
    matches!(
        e,
        Errno::XDEV | Errno::NOSYS | Errno::OPNOTSUPP | Errno::INVAL | Errno::NOTTY | Errno::BADF
    )
}

/// Copies the contents of `s` (stat `st`) into the empty file `d`. A sparse source (fewer
/// blocks than its size needs) is copied extent by extent (`SEEK_DATA`/`SEEK_HOLE`) and its
/// holes stay holes.
pub(super) fn copy_data(
    how: &mut DataCopy,
    s: &std::fs::File,
    d: &std::fs::File,
    st: &Stat,
) -> io::Result<()> {
    let size = st.st_size as u64;
    if size == 0 {
        return Ok(());
    }
    if *how == DataCopy::Clone {
        match rustix::fs::ioctl_ficlone(d, s) {
            Ok(()) => return Ok(()),
            Err(e) if unsupported(e) => *how = DataCopy::Range,
            Err(e) => return Err(e.into()),
        }
    }
    let sparse = (st.st_blocks as u64).saturating_mul(512) < size;
    if !sparse {
        return copy_range(how, s, d, 0, size);
    }
    let mut pos = 0;
    while pos < size {
        let start = match rustix::fs::seek(s, rustix::fs::SeekFrom::Data(pos)) {
            Ok(p) => p,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = rustix::fs::seek(s, rustix::fs::SeekFrom::Hole(start))?.min(size);
        copy_range(how, s, d, start, end)?;
        pos = end;
    }
    rustix::fs::ftruncate(d, size)?;
    Ok(())
}

/// Copies bytes `off..end` of `s` to the same offsets of `d` (less if `s` turns out shorter).
fn copy_range(
    how: &mut DataCopy,
    s: &std::fs::File,
    d: &std::fs::File,
    mut off: u64,
    end: u64,
) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = Vec::new();
    while off < end {
        let len = (end - off).min(1 << 30) as usize;
        if *how != DataCopy::ReadWrite {
            let (mut so, mut dof) = (off, off);
            match rustix::fs::copy_file_range(s, Some(&mut so), d, Some(&mut dof), len) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    off += n as u64;
                    continue;
                }
                Err(e) if unsupported(e) => *how = DataCopy::ReadWrite,
                Err(e) => return Err(e.into()),
            }
        }
        // Sized to what is left (a context file is often a few KiB), at most 256 KiB. This
        // path is the common one when the source is an overlay mount and the destination a
        // plain upper dir: `copy_file_range` refuses across superblocks (EXDEV).
        if buf.is_empty() {
            buf = vec![0u8; len.min(256 * 1024)];
        }
        let want = len.min(buf.len());
        let n = s.read_at(&mut buf[..want], off)?;
        if n == 0 {
            return Ok(());
        }
        d.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// Copies the extended attributes of open file `s` to `d`. Most files have none: one
/// `flistxattr` into a stack buffer, no allocation.
fn copy_xattrs_fd(s: &impl AsFd, d: &impl AsFd) -> io::Result<()> {
    let mut small = [0u8; 1024];
    let mut big;
    let names: &[u8] = match rustix::fs::flistxattr(s, &mut small[..]) {
        Ok(0) => return Ok(()),
        Ok(n) => &small[..n],
        Err(rustix::io::Errno::RANGE) => {
            big = vec![0u8; 64 * 1024];
            let n = rustix::fs::flistxattr(s, &mut big[..])?;
            &big[..n]
        }
        Err(e) => return Err(e.into()),
    };
    let mut val = vec![0u8; 64 * 1024];
    for key in names.split(|b| *b == 0).filter(|k| !k.is_empty()) {
        let key_c = std::ffi::CString::new(key).map_err(io::Error::other)?;
        let vn = rustix::fs::fgetxattr(s, key_c.as_c_str(), &mut val[..])?;
        rustix::fs::fsetxattr(
            d,
            key_c.as_c_str(),
            &val[..vn],
            rustix::fs::XattrFlags::empty(),
        )?;
    }
    Ok(())
}

fn open_dir_at(dir: &impl AsFd, name: &[u8]) -> io::Result<OwnedFd> {
    Ok(openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Creates directory `name` (mode from `st`) unless it exists; an existing non-directory is an
/// error. With `overwrite`, an existing directory gets the source mode. Returns whether it was
/// created.
fn copy_dir_only(
    parent: &OwnedFd,
    name: &[u8],
    st: &Stat,
    overwrite: bool,
    replace: bool,
) -> Result<bool> {
    match statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(t) if file_type(&t) != FileType::Directory && replace => {
            unlinkat(parent, name, AtFlags::empty()).map_err(|e| cerr(name, e))?;
            mkdirat(parent, name, Mode::from_raw_mode(st.st_mode & 0o777))
                .map_err(|e| cerr(name, e))?;
            Ok(true)
        }
        Ok(t) if file_type(&t) == FileType::Directory => {
            if overwrite {
                chmodat(
                    parent,
                    name,
                    Mode::from_raw_mode(st.st_mode & 0o7777),
                    AtFlags::empty(),
                )
                .map_err(|e| cerr(name, e))?;
            }
            Ok(false)
        }
        Ok(_) => Err(Error::FileAction {
            action: "copy",
            path: String::from_utf8_lossy(name).into_owned(),
            reason: "cannot copy a directory onto a non-directory".into(),
        }),
        Err(rustix::io::Errno::NOENT) => {
            mkdirat(parent, name, Mode::from_raw_mode(st.st_mode & 0o777))
                .map_err(|e| cerr(name, e))?;
            Ok(true)
        }
        Err(e) => Err(cerr(name, e)),
    }
}

/// Copies extended attributes; failures are logged, as upstream does.
fn copy_xattrs(src_dir: &OwnedFd, name: &[u8], dst_dir: &OwnedFd, dst_name: &[u8]) {
    let res = (|| -> io::Result<()> {
        let open = |d: &OwnedFd, n: &[u8]| {
            openat(
                d,
                n,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
                Mode::empty(),
            )
        };
        let st = statat(src_dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
        if !matches!(file_type(&st), FileType::RegularFile | FileType::Directory) {
            return Ok(());
        }
        let s = open(src_dir, name)?;
        if rustix::fs::flistxattr(&s, &mut [0u8; 0][..]).is_ok_and(|n| n == 0) {
            return Ok(());
        }
        let d = open(dst_dir, dst_name)?;
        copy_xattrs_fd(&s, &d)
    })();
    if let Err(e) = res {
        tracing::warn!(file = %String::from_utf8_lossy(name), error = %e, "copying xattrs failed");
    }
}
