//! FileOp actions on a mounted state: mkdir, mkfile, rm, copy.
//!
//! Owns the filesystem semantics of LLB file actions (`llb.md` §5), following buildkitd v0.11.6
//! `solver/llbsolver/file/backend.go` and fsutil's `copy` package (facts, not code). Every path
//! is resolved inside the state's root (see [`root`]); nothing here can write outside it.
//!
//! Deliberate differences from upstream, each for determinism or clarity:
//! * modes are applied exactly (no process umask);
//! * `rm` of a missing path fails unless `allowNotFound` (upstream's `os.RemoveAll` ignores it).

pub(crate) mod checksum;
mod copy;
pub(crate) mod glob;
pub(crate) mod root;
mod unpack;
pub(crate) mod user;

use std::io;

use protos::pb;
use rustix::fs::{mkdirat, statat, unlinkat, AtFlags, Dir, FileType, Mode, OFlags};

use crate::error::{Error, Result};
pub(crate) use copy::copy;
use root::{clean_abs, file_type, lchown, lutimes, split_nanos, Root};

/// Owner and timestamp to apply to created entries.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Attrs {
    /// `(uid, gid)` to set; `None` keeps the creator's (root).
    pub owner: Option<(u32, u32)>,
    /// atime = mtime in ns since the epoch; `None` keeps "now".
    pub time: Option<i64>,
}

impl Attrs {
    pub(crate) fn time_from_pb(ts: i64) -> Option<i64> {
        (ts != -1).then_some(ts)
    }

    /// Applies owner and time to `name` in `dir` (no symlink following).
    fn apply(&self, dir: &impl std::os::fd::AsFd, name: &str) -> io::Result<()> {
        if let Some((u, g)) = self.owner {
            lchown(dir, name, u, g)?;
        }
        if let Some(t) = self.time {
            let t = split_nanos(t);
            lutimes(dir, name, t, t)?;
        }
        Ok(())
    }
}

pub(crate) fn io_to_action(action: &'static str, path: &str, e: io::Error) -> Error {
    let reason = match e.raw_os_error() {
        Some(libc::ENOENT) => "no such file or directory".to_string(),
        Some(libc::ENOTDIR) => "not a directory".to_string(),
        Some(libc::EEXIST) => "file exists".to_string(),
        Some(libc::EISDIR) => "is a directory".to_string(),
        Some(libc::ELOOP) => "too many levels of symbolic links".to_string(),
        Some(libc::EXDEV) => "path escapes the root".to_string(),
        _ => e.to_string(),
    };
    Error::FileAction {
        action,
        path: path.to_string(),
        reason,
    }
}

fn perm(mode: i32) -> Mode {
    Mode::from_raw_mode((mode as u32) & 0o777)
}

/// Creates every missing directory of `p` with `mode`, applying `attrs` to the created ones
/// (Go fsutil `MkdirAll`). Existing components (symlinks resolved inside the root) are kept.
///
/// Times are applied after all directories exist, so every created directory (not only the
/// last) carries the requested timestamp: reproducible where upstream leaves parents at "now".
pub(crate) fn mkdir_all(root: &Root, p: &str, mode: Mode, attrs: &Attrs) -> Result<()> {
    let p = clean_abs(p);
    let mut cur = String::from("/");
    let mut created = vec![];
    for comp in p.split('/').filter(|c| !c.is_empty()) {
        let next = if cur == "/" {
            format!("/{comp}")
        } else {
            format!("{cur}/{comp}")
        };
        match root.stat(&next, true) {
            Ok(st) if file_type(&st) == FileType::Directory => {}
            Ok(_) => {
                return Err(Error::FileAction {
                    action: "mkdir",
                    path: next,
                    reason: "not a directory".into(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let dir = root
                    .open_dir(&cur)
                    .map_err(|e| io_to_action("mkdir", &cur, e))?;
                mkdirat(&dir, comp, mode).map_err(|e| io_to_action("mkdir", &next, e.into()))?;
                rustix::fs::chmodat(&dir, comp, mode, AtFlags::empty())
                    .map_err(|e| io_to_action("chmod", &next, e.into()))?;
                let owner_only = Attrs {
                    owner: attrs.owner,
                    time: None,
                };
                owner_only
                    .apply(&dir, comp)
                    .map_err(|e| io_to_action("mkdir", &next, e))?;
                created.push((cur.clone(), comp.to_string()));
            }
            Err(e) => return Err(io_to_action("mkdir", &next, e)),
        }
        cur = next;
    }
    if let Some(t) = attrs.time {
        let t = split_nanos(t);
        for (parent, name) in created.iter().rev() {
            let dir = root
                .open_dir(parent)
                .map_err(|e| io_to_action("mkdir", parent, e))?;
            lutimes(&dir, name, t, t).map_err(|e| io_to_action("utimes", name, e))?;
        }
    }
    Ok(())
}

/// `FileActionMkDir`.
pub(crate) fn mkdir(root: &Root, a: &pb::FileActionMkDir, attrs: &Attrs) -> Result<()> {
    if a.make_parents {
        return mkdir_all(root, &a.path, perm(a.mode), attrs);
    }
    let Some((dir, name)) = root
        .parent(&a.path)
        .map_err(|e| io_to_action("mkdir", &a.path, e))?
    else {
        return Ok(()); // "/" exists
    };
    match mkdirat(&dir, name.as_str(), perm(a.mode)) {
        Ok(()) => {}
        // Existing path: no-op success, like upstream.
        Err(rustix::io::Errno::EXIST) => return Ok(()),
        Err(e) => return Err(io_to_action("mkdir", &a.path, e.into())),
    }
    rustix::fs::chmodat(&dir, name.as_str(), perm(a.mode), AtFlags::empty())
        .map_err(|e| io_to_action("chmod", &a.path, e.into()))?;
    attrs
        .apply(&dir, &name)
        .map_err(|e| io_to_action("mkdir", &a.path, e))
}

/// `FileActionMkFile`: create (exact mode) or truncate (keeps mode), write, chown, set times.
/// A symlink at the path is followed inside the root.
pub(crate) fn mkfile(root: &Root, a: &pb::FileActionMkFile, attrs: &Attrs) -> Result<()> {
    use std::io::Write;
    if clean_abs(&a.path) == "/" {
        return Err(io_to_action(
            "mkfile",
            &a.path,
            io::Error::from_raw_os_error(libc::EISDIR),
        ));
    }
    let fd = match root.open_at(
        &a.path,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
        perm(a.mode),
    ) {
        Ok(fd) => {
            rustix::fs::fchmod(&fd, perm(a.mode))
                .map_err(|e| io_to_action("chmod", &a.path, e.into()))?;
            fd
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => root
            .open_at(&a.path, OFlags::WRONLY | OFlags::TRUNC, Mode::empty())
            .map_err(|e| io_to_action("mkfile", &a.path, e))?,
        Err(e) => return Err(io_to_action("mkfile", &a.path, e)),
    };
    let mut f = std::fs::File::from(fd);
    f.write_all(&a.data)
        .map_err(|e| io_to_action("mkfile", &a.path, e))?;
    if let Some((u, g)) = attrs.owner {
        rustix::fs::fchown(
            &f,
            Some(rustix::fs::Uid::from_raw(u)),
            Some(rustix::fs::Gid::from_raw(g)),
        )
        .map_err(|e| io_to_action("chown", &a.path, e.into()))?;
    }
    if let Some(t) = attrs.time {
        let (s, n) = split_nanos(t);
        let ts = rustix::fs::Timespec {
            tv_sec: s,
            tv_nsec: n as _,
        };
        rustix::fs::futimens(
            &f,
            &rustix::fs::Timestamps {
                last_access: ts,
                last_modification: ts,
            },
        )
        .map_err(|e| io_to_action("utimes", &a.path, e.into()))?;
    }
    Ok(())
}

/// `FileActionSymlink` (newer than v0.11.6): a symlink at `newpath` pointing to `oldpath`
/// (stored as given, never resolved), then owner and time.
pub(crate) fn symlink(root: &Root, a: &pb::FileActionSymlink, attrs: &Attrs) -> Result<()> {
    let Some((dir, name)) = root
        .parent(&a.newpath)
        .map_err(|e| io_to_action("symlink", &a.newpath, e))?
    else {
        return Err(io_to_action(
            "symlink",
            &a.newpath,
            io::Error::from_raw_os_error(libc::EEXIST),
        ));
    };
    rustix::fs::symlinkat(a.oldpath.as_str(), &dir, name.as_str())
        .map_err(|e| io_to_action("symlink", &a.newpath, e.into()))?;
    attrs
        .apply(&dir, &name)
        .map_err(|e| io_to_action("symlink", &a.newpath, e))
}

/// `FileActionRm`.
pub(crate) fn rm(root: &Root, a: &pb::FileActionRm) -> Result<()> {
    if a.allow_wildcard {
        let matches = glob::resolve_wildcards(root, &clean_abs(&a.path), false)
            .map_err(|e| io_to_action("rm", &a.path, e))?;
        for m in matches {
            rm_path(root, &m, a.allow_not_found)?;
        }
        return Ok(());
    }
    rm_path(root, &a.path, a.allow_not_found)
}

fn rm_path(root: &Root, p: &str, allow_not_found: bool) -> Result<()> {
    let not_found = || {
        if allow_not_found {
            Ok(())
        } else {
            Err(Error::PathNotFound {
                path: p.to_string(),
            })
        }
    };
    let (dir, name) = match root.parent(p) {
        Ok(Some(x)) => x,
        Ok(None) => {
            return Err(Error::FileAction {
                action: "rm",
                path: p.to_string(),
                reason: "cannot remove the root directory".into(),
            })
        }
        Err(e)
            if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) =>
        {
            return not_found()
        }
        Err(e) => return Err(io_to_action("rm", p, e)),
    };
    match statat(&dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(_) => {}
        Err(rustix::io::Errno::NOENT) => return not_found(),
        Err(e) => return Err(io_to_action("rm", p, e.into())),
    }
    remove_all_at(&dir, name.as_str()).map_err(|e| io_to_action("rm", p, e))
}

/// Removes `name` in `dir` recursively, never following symlinks.
pub(crate) fn remove_all_at<N: rustix::path::Arg + Copy>(
    dir: &impl std::os::fd::AsFd,
    name: N,
) -> io::Result<()> {
    let st = statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if file_type(&st) != FileType::Directory {
        unlinkat(dir, name, AtFlags::empty())?;
        return Ok(());
    }
    let sub = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut names = vec![];
    for ent in Dir::read_from(&sub)? {
        let ent = ent?;
        let n = ent.file_name().to_bytes();
        if n == b"." || n == b".." {
            continue;
        }
        names.push(n.to_vec());
    }
    for n in &names {
        remove_all_at(&sub, n.as_slice())?;
    }
    unlinkat(dir, name, AtFlags::REMOVEDIR)?;
    Ok(())
}

#[cfg(test)]
mod tests;
