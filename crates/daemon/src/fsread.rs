//! Read-only access to a result's files for the gateway (`ReadFile`, `ReadDir`, `StatFile`).
//! Paths are resolved inside the result root with `openat2(RESOLVE_IN_ROOT)`.

use crate::errors::{Error, Result};
use protos::fsutil::types::Stat as WireStat;
use rustix::fs::{Mode, OFlags, ResolveFlags};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

fn open_in(root: &Path, rel: &str, flags: OFlags) -> Result<OwnedFd> {
    let rfd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::internal(format!("open result root: {e}")))?;
    let clean = fsutil::patterns::go_clean(&format!("/{rel}"));
    let rel = clean.trim_start_matches('/');
    let rel = if rel.is_empty() { "." } else { rel };
    rustix::fs::openat2(
        &rfd,
        rel,
        flags | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| match e {
        rustix::io::Errno::NOENT => Error::not_found(format!("{rel}: no such file or directory")),
        rustix::io::Errno::NOTDIR => Error::invalid(format!("{rel}: not a directory")),
        e => Error::internal(format!("open {rel}: {e}")),
    })
}

fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Reads `len` bytes at `off` (`len == 0`: to the end) of a file in the result.
pub async fn read_file(root: &Path, path: &str, off: i64, len: i64) -> Result<Vec<u8>> {
    let root = root.to_path_buf();
    let path = path.to_string();
    tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
        let fd = open_in(&root, &path, OFlags::RDONLY)?;
        let mut f = std::fs::File::from(fd);
        if f.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            return Err(Error::invalid(format!("{path} is a directory")));
        }
        if off < 0 || len < 0 {
            return Err(Error::invalid(format!("invalid range {off}+{len}")));
        }
        f.seek(SeekFrom::Start(off as u64))
            .map_err(|e| Error::internal(format!("seek {path}: {e}")))?;
        let mut out = Vec::new();
        let limit = if len == 0 {
            16 << 20
        } else {
            len.min(16 << 20) as u64
        };
        f.take(limit)
            .read_to_end(&mut out)
            .map_err(|e| Error::internal(format!("read {path}: {e}")))?;
        Ok(out)
    })
    .await
    .map_err(|e| Error::internal(format!("read task: {e}")))?
}

/// Lists a directory of the result (names filtered by `include`, a glob on the entry name).
pub async fn read_dir(root: &Path, dir: &str, include: &str) -> Result<Vec<WireStat>> {
    let root = root.to_path_buf();
    let dir = dir.to_string();
    let include = include.to_string();
    tokio::task::spawn_blocking(move || -> Result<Vec<WireStat>> {
        let fd = open_in(&root, &dir, OFlags::RDONLY | OFlags::DIRECTORY)?;
        let base = fd_path(&fd);
        let m = if include.is_empty() {
            None
        } else {
            Some(
                fsutil::patterns::PatternMatcher::new(&[include.as_str()])
                    .map_err(|e| Error::invalid(e.to_string()))?,
            )
        };
        let mut names: Vec<String> = std::fs::read_dir(&base)
            .map_err(|e| Error::internal(format!("readdir {dir}: {e}")))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut out = Vec::new();
        for n in names {
            if let Some(m) = &m {
                if !m.matches_or_parent_matches(&n).unwrap_or(false) {
                    continue;
                }
            }
            let st = fsutil::stat_path(&base.join(&n), &n)
                .map_err(|e| Error::fsutil(format!("stat {dir}/{n}"), e))?;
            out.push(st.into());
        }
        Ok(out)
    })
    .await
    .map_err(|e| Error::internal(format!("readdir task: {e}")))?
}

/// Stats one entry of the result (the final symlink is not followed).
pub async fn stat(root: &Path, path: &str) -> Result<WireStat> {
    let root = root.to_path_buf();
    let path = path.to_string();
    tokio::task::spawn_blocking(move || -> Result<WireStat> {
        let clean = fsutil::patterns::go_clean(&format!("/{path}"));
        let rel = clean.trim_start_matches('/');
        let (dir, name) = match rel.rsplit_once('/') {
            Some((d, n)) => (d.to_string(), n.to_string()),
            None => (String::new(), rel.to_string()),
        };
        let fd = open_in(&root, &dir, OFlags::PATH | OFlags::DIRECTORY)?;
        let full = if name.is_empty() {
            fd_path(&fd)
        } else {
            fd_path(&fd).join(&name)
        };
        if std::fs::symlink_metadata(&full).is_err() {
            return Err(Error::not_found(format!(
                "{path}: no such file or directory"
            )));
        }
        let shown = if name.is_empty() {
            ".".to_string()
        } else {
            name
        };
        let st = fsutil::stat_path(&full, &shown)
            .map_err(|e| Error::fsutil(format!("stat {path}"), e))?;
        Ok(st.into())
    })
    .await
    .map_err(|e| Error::internal(format!("stat task: {e}")))?
}
