//! Directory → layer tar, with diffID, size and tar-split in the same single pass.
//!
//! The tree is walked through directory file descriptors (`openat` with `O_NOFOLLOW`, no
//! path strings, so depth is not limited by `PATH_MAX`), each directory's names sorted
//! bytewise, a directory's header before its contents. Only one directory listing per level
//! and a fixed copy buffer are held in memory; file contents are streamed.

use super::Xattrs;
use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use super::digest::{Digest, HashingWriter};
use super::header::{self, HeaderSpec};
use super::split::{TarSplitWriter, CRC64};
use super::WhiteoutFormat;
use crate::{Error, Result};

/// How [`write_layer`] reads the source tree.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// How deletions are recorded in the source tree.
    pub whiteouts: WhiteoutFormat,
    /// Directories (paths relative to the tree's root, no leading or trailing `/`) left out of
    /// the tar together with everything below them.
    pub omit_dirs: Vec<Vec<u8>>,
    /// Do not hash the tar (the returned `diff_id` is then all zeros): for copies of a layer
    /// whose diffID is known, where nothing reads the digest.
    pub skip_digest: bool,
}

/// What [`write_layer`] (and [`apply_layer`](super::apply_layer)) measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDigest {
    /// sha256 of the uncompressed tar (Docker's diffID).
    pub diff_id: Digest,
    /// Length of the uncompressed tar in bytes.
    pub size: u64,
    /// Number of tar members (PAX headers not counted).
    pub entries: u64,
}

const COPY_BUF: usize = 1 << 20;
const XATTR_BUF: usize = 1 << 16;

/// Writes the tar of the layer rooted at `dir` to `out`.
///
/// With [`WhiteoutFormat::Overlay`], a character device 0:0 named `x` becomes an empty
/// file `.wh.x`, and a directory with `trusted.overlay.opaque=y` is followed by
/// `dir/.wh..wh..opq`. `trusted.overlay.*` and `user.overlay.*` xattrs are never written;
/// every other xattr becomes a `SCHILY.xattr.` PAX record. Sockets are skipped, as Docker
/// does. The same tree always gives the same bytes (mtimes are whole seconds, owner names
/// are left empty). When `tar_split` is given it receives the gzipped tar-split records.
pub fn write_layer(
    dir: &Path,
    out: impl Write,
    tar_split: Option<&mut dyn Write>,
    opts: &WriteOptions,
) -> Result<LayerDigest> {
    let root = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("open layer dir", dir, e))?;
    let mut w = LayerWriter {
        // Headers are small writes; content goes through in 1 MiB chunks.
        out: {
            let buffered = std::io::BufWriter::with_capacity(1 << 18, out);
            if opts.skip_digest {
                HashingWriter::counting(buffered)
            } else {
                HashingWriter::new(buffered)
            }
        },
        split: tar_split.map(TarSplitWriter::new),
        pending: Vec::with_capacity(4096),
        links: HashMap::new(),
        buf: vec![0u8; COPY_BUF],
        xlist: vec![0u8; XATTR_BUF],
        xval: vec![0u8; XATTR_BUF],
        overlay: matches!(opts.whiteouts, WhiteoutFormat::Overlay),
        omit: opts.omit_dirs.iter().cloned().collect(),
        entries: 0,
        src: dir,
    };
    let mut prefix = Vec::new();
    w.walk(root.as_fd(), &mut prefix)?;
    w.finish()
}

struct LayerWriter<'s, 'a, W> {
    out: HashingWriter<W>,
    split: Option<TarSplitWriter<'a>>,
    /// Tar bytes since the end of the last member's data, not yet written out.
    pending: Vec<u8>,
    /// First path seen for each multiply-linked inode.
    links: HashMap<(u64, u64), Vec<u8>>,
    buf: Vec<u8>,
    xlist: Vec<u8>,
    xval: Vec<u8>,
    overlay: bool,
    omit: HashSet<Vec<u8>>,
    entries: u64,
    src: &'s Path,
}

impl<W: Write> LayerWriter<'_, '_, W> {
    fn walk(&mut self, dirfd: BorrowedFd<'_>, prefix: &mut Vec<u8>) -> Result<()> {
        let names = self.list(dirfd, prefix)?;
        for name in names {
            let plen = prefix.len();
            prefix.extend_from_slice(name.to_bytes());
            self.one(dirfd, &name, prefix)?;
            prefix.truncate(plen);
        }
        Ok(())
    }

    fn list(&self, dirfd: BorrowedFd<'_>, prefix: &[u8]) -> Result<Vec<CString>> {
        let mut dir = rustix::fs::Dir::read_from(dirfd)
            .map_err(|e| io_err("read dir", &self.path_of(prefix), e))?;
        let mut names = Vec::new();
        while let Some(ent) = dir.read() {
            let ent = ent.map_err(|e| io_err("read dir", &self.path_of(prefix), e))?;
            let n = ent.file_name();
            if n.to_bytes() == b"." || n.to_bytes() == b".." {
                continue;
            }
            names.push(n.to_owned());
        }
        names.sort_unstable_by(|a, b| a.to_bytes().cmp(b.to_bytes()));
        Ok(names)
    }

    fn path_of(&self, rel: &[u8]) -> PathBuf {
        self.src.join(OsStr::from_bytes(rel))
    }

    fn one(&mut self, dirfd: BorrowedFd<'_>, name: &CStr, path: &mut Vec<u8>) -> Result<()> {
        let st = rustix::fs::statat(dirfd, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err("lstat", &self.path_of(path), e))?;
        let ft = FileType::from_raw_mode(st.st_mode);
        let perm = st.st_mode & 0o7777;
        let (uid, gid, mtime) = (st.st_uid as u64, st.st_gid as u64, st.st_mtime);
        let mut spec = HeaderSpec {
            name: &[],
            typeflag: b'0',
            mode: perm,
            uid,
            gid,
            mtime,
            size: 0,
            linkname: &[],
            devmajor: 0,
            devminor: 0,
            xattrs: &[],
        };
        match ft {
            FileType::Directory if self.omit.contains(path.as_slice()) => Ok(()),
            FileType::Directory => {
                let fd = rustix::fs::openat(
                    dirfd,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| io_err("open dir", &self.path_of(path), e))?;
                let xattrs = self.xattrs_fd(fd.as_fd(), path)?;
                let opaque = self.overlay && self.is_opaque(fd.as_fd());
                path.push(b'/');
                spec.name = path;
                spec.typeflag = b'5';
                spec.xattrs = &xattrs;
                self.member(&spec, None)?;
                if opaque {
                    let plen = path.len();
                    path.extend_from_slice(b".wh..wh..opq");
                    let opq = HeaderSpec {
                        name: path,
                        typeflag: b'0',
                        mode: perm & 0o777,
                        uid,
                        gid,
                        mtime: 0,
                        size: 0,
                        linkname: &[],
                        devmajor: 0,
                        devminor: 0,
                        xattrs: &[],
                    };
                    self.member(&opq, None)?;
                    path.truncate(plen);
                }
                self.walk(fd.as_fd(), path)
            }
            FileType::RegularFile => {
                if let Some(r) = self.hardlink(&st, &spec, path) {
                    return r;
                }
                let fd = rustix::fs::openat(
                    dirfd,
                    name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| io_err("open", &self.path_of(path), e))?;
                let xattrs = self.xattrs_fd(fd.as_fd(), path)?;
                spec.name = path;
                spec.size = st.st_size as u64;
                spec.xattrs = &xattrs;
                self.member(&spec, Some(File::from(fd)))
            }
            FileType::Symlink => {
                if let Some(r) = self.hardlink(&st, &spec, path) {
                    return r;
                }
                let target = rustix::fs::readlinkat(dirfd, name, Vec::new())
                    .map_err(|e| io_err("readlink", &self.path_of(path), e))?;
                let xattrs = self.xattrs_at(dirfd, name, path)?;
                spec.name = path;
                spec.typeflag = b'2';
                spec.linkname = target.to_bytes();
                spec.xattrs = &xattrs;
                self.member(&spec, None)
            }
            FileType::CharacterDevice if self.overlay && st.st_rdev == 0 => {
                // Overlay whiteout: `.wh.<name>`, an empty 0600 file (Docker's conversion).
                let plen = path.len() - name.to_bytes().len();
                let mut wh = path[..plen].to_vec();
                wh.extend_from_slice(b".wh.");
                wh.extend_from_slice(name.to_bytes());
                spec.name = &wh;
                spec.mode = 0o600;
                self.member(&spec, None)
            }
            FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo => {
                if let Some(r) = self.hardlink(&st, &spec, path) {
                    return r;
                }
                let xattrs = self.xattrs_at(dirfd, name, path)?;
                spec.name = path;
                spec.typeflag = match ft {
                    FileType::CharacterDevice => b'3',
                    FileType::BlockDevice => b'4',
                    _ => b'6',
                };
                if ft != FileType::Fifo {
                    spec.devmajor = rustix::fs::major(st.st_rdev);
                    spec.devminor = rustix::fs::minor(st.st_rdev);
                }
                spec.xattrs = &xattrs;
                self.member(&spec, None)
            }
            // Sockets (and anything unknown) cannot be carried in a layer; Docker skips them too.
            _ => {
                tracing::debug!(path = %self.path_of(path).display(), "skipping socket");
                Ok(())
            }
        }
    }

    /// For an inode with several names: records the first path seen, or for a later one
    /// emits a link member to it (any non-directory, as Docker does). Whiteouts are never
    /// linked: overlayfs shares one inode among all of them.
    fn hardlink(
        &mut self,
        st: &rustix::fs::Stat,
        spec: &HeaderSpec<'_>,
        path: &[u8],
    ) -> Option<Result<()>> {
        if st.st_nlink <= 1 {
            return None;
        }
        let key = (st.st_dev, st.st_ino);
        match self.links.get(&key) {
            Some(first) => {
                let first = first.clone();
                let link = HeaderSpec {
                    name: path,
                    typeflag: b'1',
                    linkname: &first,
                    xattrs: &[],
                    size: 0,
                    devmajor: 0,
                    devminor: 0,
                    ..*spec
                };
                Some(self.member(&link, None))
            }
            None => {
                self.links.insert(key, path.to_vec());
                None
            }
        }
    }

    fn is_opaque(&mut self, fd: BorrowedFd<'_>) -> bool {
        matches!(
            rustix::fs::fgetxattr(fd, c"trusted.overlay.opaque", &mut self.xval[..]),
            Ok(1) if self.xval[0] == b'y'
        )
    }

    fn xattrs_fd(&mut self, fd: BorrowedFd<'_>, path: &[u8]) -> Result<Xattrs> {
        self.xattrs(XTarget::Fd(fd), path)
    }

    /// Xattrs of something we cannot open (symlink, device, fifo): through the parent's fd
    /// in `/proc/self/fd`, with the `l*` calls so the last component is not followed.
    fn xattrs_at(&mut self, dirfd: BorrowedFd<'_>, name: &CStr, path: &[u8]) -> Result<Xattrs> {
        let p = proc_path(dirfd, name);
        self.xattrs(XTarget::Path(&p), path)
    }

    fn xattrs(&mut self, t: XTarget<'_>, path: &[u8]) -> Result<Xattrs> {
        let listed = match t {
            XTarget::Fd(fd) => rustix::fs::flistxattr(fd, &mut self.xlist[..]),
            XTarget::Path(p) => rustix::fs::llistxattr(p, &mut self.xlist[..]),
        };
        let n = match listed {
            Ok(n) => n,
            Err(e) if is_unsupported(e) => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list xattrs", &self.path_of(path), e)),
        };
        let mut out = Vec::new();
        for xname in self.xlist[..n].split(|&c| c == 0).filter(|s| !s.is_empty()) {
            if UNSUPPORTED_OVERLAY.contains(&xname) {
                // The content or name lives in a lower layer: this upperdir cannot be
                // turned into a self-contained layer.
                return Err(Error::OverlayFeature {
                    path: self.path_of(path),
                    xattr: String::from_utf8_lossy(xname).into_owned(),
                });
            }
            if skip_xattr(xname) {
                continue;
            }
            let cname = CString::new(xname).unwrap_or_default();
            let got = match t {
                XTarget::Fd(fd) => rustix::fs::fgetxattr(fd, &cname, &mut self.xval[..]),
                XTarget::Path(p) => rustix::fs::lgetxattr(p, &cname, &mut self.xval[..]),
            };
            let len = got.map_err(|e| io_err("get xattr", &self.path_of(path), e))?;
            out.push((xname.to_vec(), self.xval[..len].to_vec()));
        }
        out.sort();
        Ok(out)
    }

    /// Emits one member: header bytes (recorded as a tar-split segment together with the
    /// previous member's padding), then the content, then the member's file record.
    fn member(&mut self, spec: &HeaderSpec<'_>, content: Option<File>) -> Result<()> {
        header::encode(spec, &mut self.pending);
        self.out.put(&self.pending).map_err(out_err)?;
        if let Some(s) = &mut self.split {
            s.segment(&self.pending).map_err(out_err)?;
        }
        self.pending.clear();
        let mut crc = None;
        if let Some(mut f) = content {
            let mut digest = CRC64.digest();
            let mut left = spec.size;
            while left > 0 {
                let want = left.min(self.buf.len() as u64) as usize;
                let n = match f.read(&mut self.buf[..want]) {
                    Ok(0) => {
                        return Err(Error::SourceChanged {
                            path: self.path_of(spec.name),
                        })
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(Error::Io {
                            op: "read",
                            path: self.path_of(spec.name),
                            source: e,
                        })
                    }
                };
                self.out.put(&self.buf[..n]).map_err(out_err)?;
                if self.split.is_some() {
                    digest.update(&self.buf[..n]);
                }
                left -= n as u64;
            }
            crc = Some(digest.finalize());
        }
        if let Some(s) = &mut self.split {
            s.file(spec.name, spec.size, crc).map_err(out_err)?;
        }
        self.pending.resize(header::padding(spec.size), 0);
        self.entries += 1;
        Ok(())
    }

    fn finish(mut self) -> Result<LayerDigest> {
        self.pending.extend_from_slice(&[0u8; 1024]);
        self.out.put(&self.pending).map_err(out_err)?;
        if let Some(mut s) = self.split.take() {
            s.segment(&self.pending).map_err(out_err)?;
            s.finish().map_err(out_err)?;
        }
        self.out.inner.flush().map_err(out_err)?;
        Ok(LayerDigest {
            diff_id: super::digest::finish(self.out.hash.take()),
            size: self.out.pos,
            entries: self.entries,
        })
    }
}

/// Overlay xattrs whose files depend on a lower layer (metacopy: data below; redirect: a
/// renamed lower directory). Mount snapshots without `metacopy` and `redirect_dir`.
const UNSUPPORTED_OVERLAY: [&[u8]; 4] = [
    b"trusted.overlay.metacopy",
    b"trusted.overlay.redirect",
    b"user.overlay.metacopy",
    b"user.overlay.redirect",
];

#[derive(Clone, Copy)]
enum XTarget<'a> {
    Fd(BorrowedFd<'a>),
    Path(&'a Path),
}

/// Xattrs that describe overlayfs itself, never carried in a layer.
pub(crate) fn skip_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

pub(crate) fn proc_path(dirfd: BorrowedFd<'_>, name: &CStr) -> PathBuf {
    let mut p = format!("/proc/self/fd/{}/", dirfd.as_raw_fd()).into_bytes();
    p.extend_from_slice(name.to_bytes());
    PathBuf::from(OsStr::from_bytes(&p))
}

fn is_unsupported(e: rustix::io::Errno) -> bool {
    e == rustix::io::Errno::NOTSUP || e == rustix::io::Errno::OPNOTSUPP
}

fn io_err(op: &'static str, path: &Path, e: rustix::io::Errno) -> Error {
    Error::Io {
        op,
        path: path.to_owned(),
        source: e.into(),
    }
}

fn out_err(e: io::Error) -> Error {
    Error::TarOutput { source: e }
}
