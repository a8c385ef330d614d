//! The `fsutil.types.Stat` record as plain Rust data, and building it from the filesystem.

use crate::filemode::{self, go_mode_from_posix, MODE_SOCKET};
use crate::Error;
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// One entry of a transferred tree (wire message `fsutil.types.Stat`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stat {
    /// Relative, clean, `/`-separated path.
    pub path: String,
    /// Go `os.FileMode` bits (see [`crate::filemode`]).
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Size in bytes (0 for directories and hardlink entries, link length for symlinks).
    pub size: i64,
    /// Modification time in nanoseconds since the Unix epoch.
    pub mod_time: i64,
    /// Symlink target, or for a hardlink the path of the first entry sharing the inode.
    pub linkname: String,
    /// Device major number.
    pub devmajor: i64,
    /// Device minor number.
    pub devminor: i64,
    /// Extended attributes.
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

impl Stat {
    /// Whether this entry is a directory.
    pub fn is_dir(&self) -> bool {
        self.mode & filemode::MODE_DIR != 0
    }

    /// The entry kind.
    pub fn kind(&self) -> filemode::FileKind {
        filemode::kind(self.mode)
    }

    /// Whether the receiver may request this entry's content.
    pub fn can_request_data(&self) -> bool {
        filemode::can_request_data(self.mode)
    }

    /// Whether this regular-file entry is a hardlink to an earlier entry.
    pub fn is_hardlink(&self) -> bool {
        self.can_request_data() && !self.linkname.is_empty()
    }
}

/// Tracks inodes seen during one walk, so later links to the same inode become hardlink entries.
#[derive(Debug, Default)]
pub(crate) struct InodeMap(HashMap<(u64, u64), String>);

/// Builds the stat of `full` (not following symlinks), recorded under `rel`.
pub(crate) fn mkstat(full: &Path, rel: &str, seen: Option<&mut InodeMap>) -> Result<Stat, Error> {
    let md = std::fs::symlink_metadata(full).map_err(|source| Error::Io {
        op: "lstat",
        path: full.to_path_buf(),
        source,
    })?;
    let mut st = Stat {
        path: rel.to_string(),
        mode: go_mode_from_posix(md.mode()),
        uid: md.uid(),
        gid: md.gid(),
        mod_time: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        ..Default::default()
    };
    if !md.is_dir() {
        st.size = md.size() as i64;
        let ft = md.mode() & 0o170000;
        if ft == 0o060000 || ft == 0o020000 {
            let rdev = md.rdev();
            st.devmajor = ((rdev >> 8) & 0xfff) as i64;
            st.devminor = ((rdev & 0xff) | ((rdev >> 12) & 0xfff00)) as i64;
        }
        if let Some(seen) = seen {
            let key = (md.dev(), md.ino());
            let mut linked = false;
            if md.nlink() > 1 {
                if let Some(first) = seen.0.get(&key) {
                    st.linkname = first.clone();
                    st.size = 0;
                    linked = true;
                }
            }
            if !linked {
                seen.0.insert(key, rel.to_string());
            }
        }
        if md.file_type().is_symlink() {
            let target = std::fs::read_link(full).map_err(|source| Error::Io {
                op: "readlink",
                path: full.to_path_buf(),
                source,
            })?;
            st.linkname = target.to_string_lossy().into_owned();
        }
    }
    st.xattrs = read_xattrs(full)?;
    st.mode &= !MODE_SOCKET;
    Ok(st)
}

fn read_xattrs(full: &Path) -> Result<BTreeMap<String, Vec<u8>>, Error> {
    let mut out = BTreeMap::new();
    let mut buf = vec![0u8; 4096];
    let n = match rustix::fs::llistxattr(full, &mut buf[..]) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => return Ok(out),
        Err(rustix::io::Errno::RANGE) => {
            let need =
                rustix::fs::llistxattr(full, &mut [0u8; 0][..]).map_err(|e| xattr_err(full, e))?;
            buf.resize(need, 0);
            rustix::fs::llistxattr(full, &mut buf[..]).map_err(|e| xattr_err(full, e))?
        }
        Err(e) => return Err(xattr_err(full, e)),
    };
    for name in buf[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        let mut val = vec![0u8; 65536];
        if let Ok(len) = rustix::fs::lgetxattr(full, name.as_str(), &mut val[..]) {
            val.truncate(len);
            out.insert(name, val);
        }
    }
    Ok(out)
}

fn xattr_err(full: &Path, e: rustix::io::Errno) -> Error {
    Error::Io {
        op: "listxattr",
        path: full.to_path_buf(),
        source: e.into(),
    }
}

/// The stat of one entry (not following a final symlink), recorded under `rel`.
pub fn stat_path(full: &Path, rel: &str) -> Result<Stat, Error> {
    mkstat(full, rel, None)
}
