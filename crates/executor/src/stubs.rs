//! Safe creation of paths inside the rootfs (mount points, working directory) and removal of
//! the mount stubs afterwards.
//!
//! Owns: every file or directory the executor creates inside the caller's rootfs.
//!
//! Invariants:
//! * Every filesystem operation on the rootfs goes through a [`pathrs::Root`] handle, so no
//!   symlink, `..` or rename race can make it touch anything outside the rootfs.
//! * Symlinks in a destination are followed *as if the rootfs were `/`* (absolute targets
//!   restart at the rootfs, `..` stops at it), like runc's `securejoin`. A dangling symlink is
//!   followed too and its target created inside the rootfs. The walk returns the resolved,
//!   symlink-free path, and that is what runc is given as mount destination, so runc never has
//!   to resolve a symlink of the image itself.
//! * [`MountStubs`] records each path it created (in creation order, so parents come first).
//!   Removal ([`MountStubs::cleanup`], also run on drop) goes deepest first, removes only empty
//!   directories and empty regular files, and restores the parent directory's atime/mtime so
//!   the layer diff does not see a changed parent (BuildKit issue 3148). Without the recursive
//!   flag only each mount's own leaf is removed, as in BuildKit's
//!   `executor/stubs.go` `MountStubsCleaner`
//!   (<https://github.com/moby/buildkit/blob/v0.11.6/executor/stubs.go>).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use pathrs::flags::OpenFlags;
use pathrs::{InodeType, Root};
use rustix::fs::{FileType, Timespec, Timestamps};

use crate::error::Error;

/// Maximum symlinks followed while resolving one path (as the kernel's `MAXSYMLINKS`).
const MAX_SYMLINKS: usize = 40;

/// Converts a pathrs error to an `io::Error` keeping the errno kind and the message.
pub(crate) fn pathrs_io(e: pathrs::error::Error) -> std::io::Error {
    let kind = match e.kind() {
        pathrs::error::ErrorKind::OsError(Some(errno)) => {
            std::io::Error::from_raw_os_error(errno).kind()
        }
        pathrs::error::ErrorKind::SafetyViolation => std::io::ErrorKind::PermissionDenied,
        pathrs::error::ErrorKind::InvalidArgument => std::io::ErrorKind::InvalidInput,
        _ => std::io::ErrorKind::Other,
    };
    std::io::Error::new(kind, e)
}

fn os_err(errno: i32, what: &str) -> std::io::Error {
    let base = std::io::Error::from_raw_os_error(errno);
    std::io::Error::new(base.kind(), format!("{what}: {base}"))
}

/// Lexically normalises `p` to an absolute path: `.` dropped, `..` applied (never above `/`).
/// Equivalent to Go's `filepath.Join("/", p)`.
pub(crate) fn clean_abs(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// What to create at the end of a path when it is missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Leaf {
    Dir,
    File,
}

/// (atime, mtime) of an inode, as (seconds, nanoseconds) pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Times {
    atime: (i64, i64),
    mtime: (i64, i64),
}

// The stat field types differ between architectures; the casts are no-ops on x86_64.
#[allow(clippy::unnecessary_cast)]
fn times_of(st: &rustix::fs::Stat) -> Times {
    Times {
        atime: (st.st_atime as i64, st.st_atime_nsec as i64),
        mtime: (st.st_mtime as i64, st.st_mtime_nsec as i64),
    }
}

/// Times of the directory `dir` inside `root`, if it can be stat'ed.
fn dir_times(root: &Root, dir: &Path) -> Option<Times> {
    let h = root.resolve(dir).ok()?;
    rustix::fs::fstat(&h).ok().map(|st| times_of(&st))
}

/// A path [`ensure_path`] created, with its parent's times just before and just after.
pub(crate) struct Created<'a> {
    pub path: &'a Path,
    pub is_leaf: bool,
    parent_before: Option<Times>,
    parent_after: Option<Times>,
}

/// Resolves `path` inside `root`, creating missing components (directories, and the leaf as
/// `leaf`), following symlinks in-root. Calls `created` for each path created.
/// Returns the resolved path (absolute, relative to the rootfs, no symlinks).
pub(crate) fn ensure_path(
    root: &Root,
    path: &Path,
    leaf: Leaf,
    mut created: impl FnMut(Created<'_>) -> Result<(), Error>,
) -> Result<PathBuf, Error> {
    let path = clean_abs(path);
    let err = |p: &Path, op: &'static str, source: std::io::Error| Error::InRoot {
        path: p.to_owned(),
        op,
        source,
    };
    let mut pending: VecDeque<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            _ => None,
        })
        .collect();
    let mut resolved = PathBuf::from("/");
    let mut links = 0usize;
    while let Some(comp) = pending.pop_front() {
        if comp == ".." {
            resolved.pop();
            continue;
        }
        if comp == "." || comp.is_empty() {
            continue;
        }
        let candidate = resolved.join(&comp);
        let is_last = pending.is_empty();
        match root.resolve_nofollow(&candidate) {
            Ok(handle) => {
                let st =
                    rustix::fs::fstat(&handle).map_err(|e| err(&candidate, "stat", e.into()))?;
                match FileType::from_raw_mode(st.st_mode) {
                    FileType::Symlink => {
                        links += 1;
                        if links > MAX_SYMLINKS {
                            return Err(err(
                                &path,
                                "resolve",
                                os_err(libc_eloop(), "too many levels of symbolic links"),
                            ));
                        }
                        let target = root
                            .readlink(&candidate)
                            .map_err(|e| err(&candidate, "readlink", pathrs_io(e)))?;
                        if target.is_absolute() {
                            resolved = PathBuf::from("/");
                        }
                        for c in target.components().rev() {
                            match c {
                                Component::Normal(n) => pending.push_front(n.to_owned()),
                                Component::ParentDir => pending.push_front("..".into()),
                                _ => {}
                            }
                        }
                    }
                    FileType::Directory => resolved = candidate,
                    _ if is_last && leaf == Leaf::File => resolved = candidate,
                    _ => {
                        return Err(err(
                            &candidate,
                            "resolve",
                            os_err(rustix::io::Errno::NOTDIR.raw_os_error(), "not a directory"),
                        ))
                    }
                }
            }
            Err(e) => {
                let e = pathrs_io(e);
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(err(&candidate, "resolve", e));
                }
                let parent_before = dir_times(root, &resolved);
                let made = if is_last && leaf == Leaf::File {
                    root.create_file(
                        &candidate,
                        OpenFlags::O_EXCL | OpenFlags::O_WRONLY | OpenFlags::O_CLOEXEC,
                        &std::os::unix::fs::PermissionsExt::from_mode(0o644),
                    )
                    .map(drop)
                    .map_err(|e| ("create file", pathrs_io(e)))
                } else {
                    root.create(
                        &candidate,
                        &InodeType::Directory(std::os::unix::fs::PermissionsExt::from_mode(0o755)),
                    )
                    .map_err(|e| ("create directory", pathrs_io(e)))
                };
                match made {
                    Ok(()) => {}
                    // A concurrent run on the same rootfs created it first: it is not our stub;
                    // resolve it again as an existing entry.
                    Err((_, e)) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        pending.push_front(candidate.file_name().unwrap_or_default().to_owned());
                        continue;
                    }
                    Err((what, e)) => return Err(err(&candidate, what, e)),
                }
                created(Created {
                    path: &candidate,
                    is_leaf: is_last,
                    parent_before,
                    parent_after: dir_times(root, &resolved),
                })?;
                resolved = candidate;
            }
        }
    }
    Ok(resolved)
}

fn libc_eloop() -> i32 {
    rustix::io::Errno::LOOP.raw_os_error()
}

struct Stub {
    path: PathBuf,
    /// The mount point itself (not a parent created for it).
    is_leaf: bool,
    parent_before: Option<Times>,
    parent_after: Option<Times>,
}

/// Mount points created in a rootfs for one run; removed on [`cleanup`](Self::cleanup) or drop.
pub(crate) struct MountStubs {
    root: Root,
    /// Created stubs, parents before children.
    created: Vec<Stub>,
    recursive: bool,
    done: bool,
}

impl MountStubs {
    pub(crate) fn new(root: Root, recursive: bool) -> Self {
        Self {
            root,
            created: Vec::new(),
            recursive,
            done: false,
        }
    }

    pub(crate) fn root(&self) -> &Root {
        &self.root
    }

    /// Creates the mount point `dest` (kind `leaf`) and records what was created.
    /// Returns the resolved destination.
    pub(crate) fn prepare(&mut self, dest: &Path, leaf: Leaf) -> Result<PathBuf, Error> {
        let created = &mut self.created;
        ensure_path(&self.root, dest, leaf, |c| {
            created.push(Stub {
                path: c.path.to_owned(),
                is_leaf: c.is_leaf,
                parent_before: c.parent_before,
                parent_after: c.parent_after,
            });
            Ok(())
        })
    }

    /// Removes the recorded stubs that are still empty; returns the paths removed.
    pub(crate) fn cleanup(&mut self) -> Vec<PathBuf> {
        self.done = true;
        let mut removed = Vec::new();
        for stub in std::mem::take(&mut self.created).into_iter().rev() {
            if !stub.is_leaf && !self.recursive {
                continue;
            }
            match remove_stub(&self.root, &stub) {
                Ok(true) => removed.push(stub.path),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(path = %stub.path.display(), error = %e, "failed to remove mount stub")
                }
            }
        }
        removed
    }
}

impl Drop for MountStubs {
    fn drop(&mut self) {
        if !self.done {
            self.cleanup();
        }
    }
}

/// Removes the stub if it is an empty directory or an empty regular file, then resets the
/// parent's atime/mtime: to what they were before the stub was created if nothing else changed
/// the parent since, else to what they were just before removal (BuildKit's behaviour).
/// Returns whether it was removed.
fn remove_stub(root: &Root, stub: &Stub) -> std::io::Result<bool> {
    let path = stub.path.as_path();
    let handle = match root.resolve_nofollow(path) {
        Ok(h) => h,
        Err(e) => {
            let e = pathrs_io(e);
            return if e.kind() == std::io::ErrorKind::NotFound {
                Ok(false)
            } else {
                Err(e)
            };
        }
    };
    let st = rustix::fs::fstat(&handle)?;
    let ftype = FileType::from_raw_mode(st.st_mode);
    let parent = path.parent().unwrap_or(Path::new("/"));
    let parent_dir = root
        .resolve(parent)
        .and_then(|h| h.reopen(OpenFlags::O_RDONLY | OpenFlags::O_DIRECTORY))
        .map_err(pathrs_io)?;
    let pst = rustix::fs::fstat(&parent_dir)?;
    let result = match ftype {
        FileType::Directory => match root.remove_dir(path) {
            Ok(()) => true,
            Err(e) => {
                let e = pathrs_io(e);
                if e.raw_os_error() == Some(rustix::io::Errno::NOTEMPTY.raw_os_error())
                    || e.kind() == std::io::ErrorKind::DirectoryNotEmpty
                {
                    false
                } else {
                    return Err(e);
                }
            }
        },
        FileType::RegularFile if st.st_size == 0 => {
            root.remove_file(path).map_err(pathrs_io)?;
            true
        }
        _ => false,
    };
    if result {
        let now = times_of(&pst);
        let restore = match (stub.parent_before, stub.parent_after) {
            (Some(before), Some(after)) if after.mtime == now.mtime => before,
            _ => now,
        };
        let ts = |(s, n): (i64, i64)| Timespec {
            tv_sec: s as _,
            tv_nsec: n as _,
        };
        let times = Timestamps {
            last_access: ts(restore.atime),
            last_modification: ts(restore.mtime),
        };
        if let Err(e) = rustix::fs::futimens(&parent_dir, &times) {
            tracing::warn!(path = %parent.display(), error = %e, "failed to restore timestamps of mount stub parent");
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn clean_abs_table() {
        for (input, want) in [
            ("/a/b", "/a/b"),
            ("a/./b/", "/a/b"),
            ("/../../etc", "/etc"),
            ("/a/../b/..", "/"),
            ("", "/"),
        ] {
            assert_eq!(clean_abs(Path::new(input)), Path::new(want), "{input:?}");
        }
    }

    fn setup() -> (tempfile::TempDir, tempfile::TempDir) {
        let rootfs = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        (rootfs, outside)
    }

    #[test]
    fn creates_and_records_missing_parents() {
        let (rootfs, _o) = setup();
        std::fs::create_dir(rootfs.path().join("a")).unwrap();
        let mut stubs = MountStubs::new(Root::open(rootfs.path()).unwrap(), true);
        let r = stubs.prepare(Path::new("/a/b/c/file"), Leaf::File).unwrap();
        assert_eq!(r, Path::new("/a/b/c/file"));
        assert!(rootfs.path().join("a/b/c/file").is_file());
        let removed = stubs.cleanup();
        assert_eq!(
            removed,
            vec![
                PathBuf::from("/a/b/c/file"),
                PathBuf::from("/a/b/c"),
                PathBuf::from("/a/b")
            ]
        );
        assert!(rootfs.path().join("a").is_dir());
        assert!(!rootfs.path().join("a/b").exists());
    }

    #[test]
    fn non_recursive_removes_only_leaf_and_keeps_nonempty() {
        let (rootfs, _o) = setup();
        let mut stubs = MountStubs::new(Root::open(rootfs.path()).unwrap(), false);
        stubs.prepare(Path::new("/x/y"), Leaf::Dir).unwrap();
        stubs.prepare(Path::new("/x/z"), Leaf::File).unwrap();
        std::fs::write(rootfs.path().join("x/z"), "written by the process").unwrap();
        let removed = stubs.cleanup();
        assert_eq!(removed, vec![PathBuf::from("/x/y")]);
        assert!(rootfs.path().join("x/z").is_file());
    }

    #[test]
    fn parent_timestamps_restored() {
        let (rootfs, _o) = setup();
        let dir = rootfs.path().join("p");
        std::fs::create_dir(&dir).unwrap();
        let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        std::fs::File::open(&dir)
            .unwrap()
            .set_times(
                std::fs::FileTimes::new()
                    .set_modified(old)
                    .set_accessed(old),
            )
            .unwrap();
        let mut stubs = MountStubs::new(Root::open(rootfs.path()).unwrap(), true);
        stubs.prepare(Path::new("/p/mnt"), Leaf::Dir).unwrap();
        assert_ne!(std::fs::metadata(&dir).unwrap().modified().unwrap(), old);
        assert_eq!(stubs.cleanup().len(), 1);
        assert_eq!(std::fs::metadata(&dir).unwrap().modified().unwrap(), old);
    }

    #[test]
    fn hostile_symlinks_stay_inside_root() {
        let (rootfs, outside) = setup();
        // Absolute symlink to a host directory that exists.
        symlink(outside.path(), rootfs.path().join("abs")).unwrap();
        // Relative symlink climbing far above the root.
        symlink("../../../../../../../..", rootfs.path().join("rel")).unwrap();
        // Dangling absolute symlink.
        symlink("/host-escape-test-target", rootfs.path().join("etc")).unwrap();
        let mut stubs = MountStubs::new(Root::open(rootfs.path()).unwrap(), true);

        let r = stubs.prepare(Path::new("/abs/m1"), Leaf::Dir).unwrap();
        assert_eq!(r, outside.path().join("m1"));
        assert!(rootfs.path().join(r.strip_prefix("/").unwrap()).is_dir());

        let r = stubs.prepare(Path::new("/rel/m2"), Leaf::File).unwrap();
        assert_eq!(r, Path::new("/m2"));
        assert!(rootfs.path().join("m2").is_file());

        let r = stubs.prepare(Path::new("/etc/hosts"), Leaf::File).unwrap();
        assert_eq!(r, Path::new("/host-escape-test-target/hosts"));
        assert!(rootfs
            .path()
            .join("host-escape-test-target/hosts")
            .is_file());

        // Nothing was created outside.
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        assert!(!Path::new("/host-escape-test-target").exists());
        stubs.cleanup();
        assert!(!rootfs.path().join("host-escape-test-target").exists());
        assert!(!rootfs.path().join("m2").exists());
    }

    #[test]
    fn symlink_loop_and_file_component_fail() {
        let (rootfs, _o) = setup();
        symlink("/loop2", rootfs.path().join("loop1")).unwrap();
        symlink("/loop1", rootfs.path().join("loop2")).unwrap();
        std::fs::write(rootfs.path().join("f"), "x").unwrap();
        let mut stubs = MountStubs::new(Root::open(rootfs.path()).unwrap(), true);
        assert!(stubs.prepare(Path::new("/loop1/x"), Leaf::Dir).is_err());
        assert!(stubs.prepare(Path::new("/f/x"), Leaf::Dir).is_err());
        // An existing file is fine as a file mount point, not as a directory one.
        assert!(stubs.prepare(Path::new("/f"), Leaf::File).is_ok());
        assert!(stubs.prepare(Path::new("/f"), Leaf::Dir).is_err());
        assert!(stubs.cleanup().is_empty());
        assert!(rootfs.path().join("f").is_file());
    }
}
