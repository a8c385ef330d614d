//! Path resolution confined to a root directory.
//!
//! Every path a build gives is resolved with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`
//! relative to an fd of the root: `..` stops at the root and absolute or relative symlinks are
//! resolved as if the root were `/`, so nothing outside the root can be reached. Operations on the
//! final component use the resolved parent directory fd with `*at` calls and `AT_SYMLINK_NOFOLLOW`
//! (or `O_NOFOLLOW`), so a symlink in the last position is never followed unless asked for.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{
    statat, AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat, Timespec, Timestamps, CWD,
};

/// A directory used as `/` for path resolution.
#[derive(Debug)]
pub(crate) struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

/// Go's `filepath.Clean(filepath.Join("/", p))`: an absolute, clean path (`..` stops at `/`).
pub(crate) fn clean_abs(p: &str) -> String {
    let mut parts: Vec<&str> = vec![];
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Splits a clean absolute path into (parent, base name); `None` for `/`.
pub(crate) fn split(p: &str) -> Option<(String, String)> {
    let p = clean_abs(p);
    if p == "/" {
        return None;
    }
    let i = p.rfind('/').expect("absolute");
    let parent = if i == 0 {
        "/".to_string()
    } else {
        p[..i].to_string()
    };
    Some((parent, p[i + 1..].to_string()))
}

fn rel(p: &str) -> String {
    let c = clean_abs(p);
    if c == "/" {
        ".".into()
    } else {
        c[1..].to_string()
    }
}

impl Root {
    /// Opens `path` as a root.
    pub(crate) fn open(path: &Path) -> io::Result<Root> {
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Root {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The root's host path (for messages only).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Opens `p` (absolute inside the root) following symlinks inside the root.
    pub(crate) fn open_at(&self, p: &str, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
        Ok(layerstore::openat2_retry(
            &self.fd,
            rel(p),
            flags | OFlags::CLOEXEC,
            mode,
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        )?)
    }

    /// Opens directory `p` for reading entries and as a dirfd.
    pub(crate) fn open_dir(&self, p: &str) -> io::Result<OwnedFd> {
        self.open_at(p, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
    }

    /// The parent directory of `p` (resolved in the root, following symlinks) and the last
    /// component, which is NOT resolved. `None` for `/`.
    pub(crate) fn parent(&self, p: &str) -> io::Result<Option<(OwnedFd, String)>> {
        let Some((parent, name)) = split(p) else {
            return Ok(None);
        };
        Ok(Some((self.open_dir(&parent)?, name)))
    }

    /// `stat` of `p`; `follow` resolves a symlink in the last component (inside the root).
    pub(crate) fn stat(&self, p: &str, follow: bool) -> io::Result<Stat> {
        if follow {
            let fd = self.open_at(p, OFlags::PATH, Mode::empty())?;
            Ok(rustix::fs::fstat(&fd)?)
        } else {
            match self.parent(p)? {
                None => Ok(rustix::fs::fstat(&self.fd)?),
                Some((dir, name)) => Ok(statat(&dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)?),
            }
        }
    }

    /// Resolves `p` fully (following symlinks inside the root) and returns the resulting clean
    /// absolute in-root path, if it exists. Used where later steps need a path string.
    pub(crate) fn resolve_existing(&self, p: &str) -> io::Result<String> {
        let fd = self.open_at(p, OFlags::PATH, Mode::empty())?;
        in_root_path(&self.fd, &fd)
    }

    /// Resolves `p` lexically inside the root, following every symlink on the way, dangling ones
    /// included (continuity's `fs.RootPath`): a link to a missing target yields the target's
    /// in-root path, so that creating it creates what the link points at. Components that do
    /// not exist are kept as they are.
    pub(crate) fn resolve_through_links(&self, p: &str) -> io::Result<String> {
        const MAX_LINKS: usize = 255;
        let mut todo: Vec<String> = clean_abs(p)
            .split('/')
            .filter(|c| !c.is_empty())
            .rev()
            .map(str::to_string)
            .collect();
        let mut cur = String::from("/");
        let mut links = 0;
        while let Some(comp) = todo.pop() {
            let next = if cur == "/" {
                format!("/{comp}")
            } else {
                format!("{cur}/{comp}")
            };
            let st = match self.stat(&next, false) {
                Ok(st) => st,
                Err(e)
                    if e.kind() == io::ErrorKind::NotFound
                        || e.raw_os_error() == Some(libc::ENOTDIR) =>
                {
                    // Nothing further exists: the rest is taken as written.
                    let mut out = next;
                    while let Some(c) = todo.pop() {
                        out = format!("{out}/{c}");
                    }
                    return Ok(clean_abs(&out));
                }
                Err(e) => return Err(e),
            };
            if file_type(&st) != FileType::Symlink {
                cur = next;
                continue;
            }
            links += 1;
            if links > MAX_LINKS {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            let (dir, name) = self.parent(&next)?.expect("not the root");
            let target = rustix::fs::readlinkat(&dir, name.as_str(), vec![])?;
            let target = target.to_string_lossy().into_owned();
            let base = if target.starts_with('/') {
                target
            } else {
                format!("{cur}/{target}")
            };
            // `..` in the link stops at the root (clean_abs), as it does for openat2.
            for c in clean_abs(&base).split('/').filter(|c| !c.is_empty()).rev() {
                todo.push(c.to_string());
            }
            cur = String::from("/");
        }
        Ok(cur)
    }
}

/// The in-root path of `fd`, computed from `/proc/self/fd` and checked to lie inside the root.
fn in_root_path(root: &OwnedFd, fd: &OwnedFd) -> io::Result<String> {
    let read = |f: &OwnedFd| -> io::Result<PathBuf> {
        let link = rustix::fs::readlinkat(
            CWD,
            format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(f)),
            vec![],
        )?;
        Ok(PathBuf::from(std::ffi::OsString::from(
            link.into_string()
                .map_err(|_| io::Error::other("non-utf8 path"))?,
        )))
    };
    let r = read(root)?;
    let p = read(fd)?;
    let relp = p
        .strip_prefix(&r)
        .map_err(|_| io::Error::other("resolved path is outside the root"))?;
    Ok(clean_abs(&relp.to_string_lossy()))
}

/// File type of a stat.
pub(crate) fn file_type(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// Sets owner on `name` in `dir` without following symlinks.
pub(crate) fn lchown(dir: impl AsFd, name: &str, uid: u32, gid: u32) -> io::Result<()> {
    rustix::fs::chownat(
        dir,
        name,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

/// Sets atime and mtime (ns since epoch) on `name` in `dir` without following symlinks.
pub(crate) fn lutimes(
    dir: impl AsFd,
    name: &str,
    atime: (i64, i64),
    mtime: (i64, i64),
) -> io::Result<()> {
    let ts = Timestamps {
        last_access: Timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1 as _,
        },
        last_modification: Timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1 as _,
        },
    };
    rustix::fs::utimensat(dir, name, &ts, AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

/// Splits ns since the epoch into (sec, nsec).
pub(crate) fn split_nanos(ns: i64) -> (i64, i64) {
    (ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_and_split() {
        for (i, o) in [
            ("", "/"),
            ("/", "/"),
            ("a/b/../c", "/a/c"),
            ("../../etc/passwd", "/etc/passwd"),
            ("/a/./b//", "/a/b"),
        ] {
            assert_eq!(clean_abs(i), o, "{i}");
        }
        assert_eq!(split("/a/b"), Some(("/a".into(), "b".into())));
        assert_eq!(split("/a"), Some(("/".into(), "a".into())));
        assert_eq!(split("/.."), None);
    }

    #[test]
    fn symlinks_resolve_inside_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/passwd"), "inside").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../../etc", root.join("rel")).unwrap();
        let r = Root::open(&root).unwrap();
        for p in ["/abs/passwd", "/rel/passwd", "/../../etc/passwd"] {
            let fd = r
                .open_at(p, OFlags::RDONLY, Mode::empty())
                .unwrap_or_else(|e| panic!("{p}: {e}"));
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut s).unwrap();
            assert_eq!(s, "inside", "{p} must resolve inside the root");
        }
        assert_eq!(r.resolve_existing("/abs/passwd").unwrap(), "/etc/passwd");
        let (dir, name) = r.parent("/abs/passwd").unwrap().unwrap();
        assert_eq!(name, "passwd");
        assert!(statat(&dir, "passwd", AtFlags::empty()).is_ok());
        // Last component not followed.
        let st = r.stat("/abs", false).unwrap();
        assert_eq!(file_type(&st), FileType::Symlink);
        assert_eq!(
            file_type(&r.stat("/abs", true).unwrap()),
            FileType::Directory
        );
    }
}
