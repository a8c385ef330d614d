//! Layer tar → directory, for untrusted tars.
//!
//! Safety rules (every refusal names the entry):
//! - a name with a `..` component, an absolute name, or a NUL is refused outright;
//! - each entry's parent directory is opened with `openat2(RESOLVE_BENEATH |
//!   RESOLVE_NO_MAGICLINKS)` from the destination's fd, so a symlink (from this tar or
//!   already there) that would lead outside makes the entry fail instead of being followed;
//! - the entry itself is created with `*at` calls on that parent fd and never followed
//!   (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`); hardlink targets go through the same checks;
//! - whiteouts name a single component other than `.`/`..`;
//! - `trusted.overlay.*`/`user.overlay.*` xattrs from the tar are dropped (an opaque marker
//!   comes only from `.wh..wh..opq`, redirects never);
//! - limits: number of members, path depth, size of PAX/long-name members.
//!
//! On error the caller may ask for the destination to be removed (`remove_on_error`).
//! Directory mtimes are set after all entries, as children change them.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::rc::Rc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use rustix::io::Errno;

use super::digest::Digest;
use super::read::{RawEntry, TarReader};
use super::split::TarSplitWriter;
use super::write::{proc_path, skip_xattr};
use super::WhiteoutFormat;
use crate::{Error, Result};

/// How [`apply_layer`] writes the tree.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// How deletions are recorded: overlay whiteout devices and opaque xattrs in a layer
    /// directory, or carried out on a flat tree.
    pub whiteouts: WhiteoutFormat,
    /// Most members accepted (guards against tar bombs of many small files).
    pub max_entries: u64,
    /// Most path components in a member name.
    pub max_depth: usize,
    /// Most bytes of uncompressed tar accepted (guards against decompression bombs).
    pub max_size: u64,
    /// Remove `dest` entirely when applying fails.
    pub remove_on_error: bool,
    /// Do not hash the tar (the returned `diff_id` is then all zeros): for copies of a layer
    /// whose diffID is known, where nothing reads the digest.
    pub skip_digest: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            whiteouts: WhiteoutFormat::Overlay,
            max_entries: 10_000_000,
            max_depth: 1024,
            max_size: u64::MAX,
            remove_on_error: false,
            skip_digest: false,
        }
    }
}

/// Compression found on an applied stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip (possibly several members).
    Gzip,
    /// zstd.
    Zstd,
}

/// What [`apply_layer`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyStats {
    /// sha256 of the uncompressed tar (the layer's diffID).
    pub diff_id: Digest,
    /// Length of the uncompressed tar.
    pub size: u64,
    /// Members applied (PAX headers not counted; whiteouts counted).
    pub entries: u64,
    /// Compression detected on the input.
    pub compression: Compression,
}

/// Applies a layer tar (plain, gzip or zstd, detected from its first bytes) to `dest`,
/// creating `dest` if it is missing. With `tar_split`, the tar-split records of the
/// uncompressed stream are written there (gzipped), as Docker does on load.
pub fn apply_layer(
    input: impl Read,
    dest: &Path,
    tar_split: Option<&mut dyn Write>,
    opts: &ApplyOptions,
) -> Result<ApplyStats> {
    let res = apply_inner(input, dest, tar_split, opts);
    if res.is_err() && opts.remove_on_error {
        if let Err(e) = std::fs::remove_dir_all(dest) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(dest = %dest.display(), error = %e, "removing partial layer failed");
            }
        }
    }
    res
}

fn apply_inner(
    mut input: impl Read,
    dest: &Path,
    tar_split: Option<&mut dyn Write>,
    opts: &ApplyOptions,
) -> Result<ApplyStats> {
    // Sniff the compression from the first bytes (read fully: pipes return short reads).
    let mut head = [0u8; 6];
    let mut got = 0;
    while got < head.len() {
        match input.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::TarRead {
                    entry: String::new(),
                    offset: 0,
                    source: e,
                })
            }
        }
    }
    let head = &head[..got];
    let stream = io::Cursor::new(head.to_vec()).chain(input);
    let (compression, reader): (Compression, Box<dyn Read>) = if head.starts_with(&[0x1f, 0x8b]) {
        (
            Compression::Gzip,
            Box::new(BufReader::with_capacity(
                1 << 18,
                flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 16, stream)),
            )),
        )
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let dec = zstd::stream::read::Decoder::new(stream).map_err(|e| Error::TarRead {
            entry: String::new(),
            offset: 0,
            source: e,
        })?;
        (
            Compression::Zstd,
            Box::new(BufReader::with_capacity(1 << 18, dec)),
        )
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) || head.starts_with(b"BZh") {
        return Err(Error::CorruptTar {
            entry: String::new(),
            offset: 0,
            reason: "xz and bzip2 compressed layers are not supported".into(),
        });
    } else {
        (
            Compression::None,
            Box::new(BufReader::with_capacity(1 << 18, stream)),
        )
    };

    match std::fs::create_dir(dest) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(Error::Io {
                op: "create layer dir",
                path: dest.to_owned(),
                source: e,
            })
        }
    }
    let root = rustix::fs::open(
        dest,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::Io {
        op: "open layer dir",
        path: dest.to_owned(),
        source: e.into(),
    })?;

    let split = tar_split.map(TarSplitWriter::new);
    let mut tr = if opts.skip_digest {
        TarReader::unhashed(reader, split, opts.max_size)
    } else {
        TarReader::new(reader, split, opts.max_size)
    };
    let mut ap = Applier {
        root: Rc::new(root),
        cache: None,
        opts,
        dirs: Vec::new(),
        buf: vec![0u8; 1 << 20],
        entries: 0,
    };
    while let Some(e) = tr.next_entry()? {
        ap.entries += 1;
        if ap.entries > opts.max_entries {
            return Err(Error::TarLimit {
                entry: e.display_name(),
                limit: "max_entries",
                max: opts.max_entries,
            });
        }
        ap.entry(&e, &mut tr)?;
    }
    ap.set_dir_times()?;
    let entries = ap.entries;
    let (diff_id, size) = tr.digest();
    Ok(ApplyStats {
        diff_id,
        size,
        entries,
        compression,
    })
}

/// The components of a member name: no `..`, not absolute, no NUL; `.` and empty parts dropped.
pub(crate) fn clean_name(raw: &[u8]) -> std::result::Result<Vec<&[u8]>, &'static str> {
    if raw.is_empty() {
        return Err("empty name");
    }
    if raw[0] == b'/' {
        return Err("absolute path");
    }
    if raw.contains(&0) {
        return Err("NUL byte in name");
    }
    let mut out = Vec::new();
    for c in raw.split(|&c| c == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("'..' path component would escape the root"),
            c => out.push(c),
        }
    }
    Ok(out)
}

struct Applier<'o> {
    root: Rc<OwnedFd>,
    /// The last parent directory opened, by path.
    cache: Option<(Vec<u8>, Rc<OwnedFd>)>,
    opts: &'o ApplyOptions,
    /// Directories created or updated, with the mtime to set at the end.
    dirs: Vec<(Vec<u8>, i64)>,
    buf: Vec<u8>,
    entries: u64,
}

impl Applier<'_> {
    fn entry<R: Read>(&mut self, e: &RawEntry, tr: &mut TarReader<'_, R>) -> Result<()> {
        let name = e.display_name();
        let reject = |reason: &str| Error::TarEntryRejected {
            entry: name.clone(),
            reason: reason.to_owned(),
        };
        let comps = clean_name(&e.name).map_err(reject)?;
        if e.uid > u32::MAX as u64 || e.gid > u32::MAX as u64 {
            return Err(reject("uid or gid out of range"));
        }
        if comps.len() > self.opts.max_depth {
            return Err(Error::TarLimit {
                entry: name,
                limit: "max_depth",
                max: self.opts.max_depth as u64,
            });
        }
        let Some((base, parent)) = comps.split_last() else {
            // The root itself ("./"): only a directory may describe it.
            if e.typeflag != b'5' {
                return Err(reject("non-directory entry for the root"));
            }
            let root = self.root.clone();
            self.set_meta_fd(root.as_fd(), e, &name)?;
            self.dirs.push((Vec::new(), e.mtime));
            return Ok(());
        };
        let base = *base;

        if let Some(target) = base.strip_prefix(b".wh.") {
            return self.whiteout(e, &name, parent, target);
        }

        let pfd = self.parent(parent, &name)?;
        let cbase = cstr(base, &name)?;
        let ap = |op: &'static str| {
            let name = name.clone();
            move |err: Errno| Error::TarApply {
                entry: name,
                op,
                source: err.into(),
            }
        };
        match e.typeflag {
            b'0' | 0 | b'7' => {
                let fd = self.create(&pfd, &cbase, &name, false, |p, n| {
                    rustix::fs::openat(
                        p,
                        n,
                        OFlags::WRONLY
                            | OFlags::CREATE
                            | OFlags::EXCL
                            | OFlags::NOFOLLOW
                            | OFlags::CLOEXEC,
                        Mode::from_raw_mode(0o600),
                    )
                    .map(Some)
                })?;
                let fd = fd.ok_or_else(|| reject("could not create file"))?;
                let mut f = File::from(fd);
                loop {
                    let n = tr.read_data(&mut self.buf)?;
                    if n == 0 {
                        break;
                    }
                    f.write_all(&self.buf[..n]).map_err(|err| Error::TarApply {
                        entry: name.clone(),
                        op: "write",
                        source: err,
                    })?;
                }
                self.set_meta_fd(f.as_fd(), e, &name)?;
                rustix::fs::futimens(&f, &times(e.mtime)).map_err(ap("set mtime"))?;
            }
            b'5' => {
                self.create(&pfd, &cbase, &name, true, |p, n| {
                    rustix::fs::mkdirat(p, n, Mode::from_raw_mode(0o700)).map(|_| None::<()>)
                })?;
                let fd = rustix::fs::openat(
                    &*pfd,
                    &cbase,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(ap("open dir"))?;
                self.set_meta_fd(fd.as_fd(), e, &name)?;
                self.dirs.push((comps.join(&b'/'), e.mtime));
            }
            b'2' => {
                let target = cstr(&e.link, &name)?;
                self.create(&pfd, &cbase, &name, false, |p, n| {
                    rustix::fs::symlinkat(&target, p, n).map(|_| None::<()>)
                })?;
                self.set_meta_at(pfd.as_fd(), &cbase, e, &name, false)?;
            }
            b'1' => {
                let tcomps = clean_name(&e.link).map_err(|r| {
                    reject(&format!(
                        "hardlink target {:?}: {r}",
                        String::from_utf8_lossy(&e.link)
                    ))
                })?;
                let Some((tbase, tparent)) = tcomps.split_last() else {
                    return Err(reject("hardlink to the root"));
                };
                if tcomps == comps {
                    return Err(reject("hardlink to itself"));
                }
                let tpfd = self.resolve(tparent, &name, false)?;
                let ctbase = cstr(tbase, &name)?;
                self.create(&pfd, &cbase, &name, false, |p, n| {
                    rustix::fs::linkat(&*tpfd, &ctbase, p, n, AtFlags::empty()).map(|_| None::<()>)
                })?;
            }
            b'3' | b'4' | b'6' => {
                let (ft, dev) = match e.typeflag {
                    b'3' => (
                        FileType::CharacterDevice,
                        rustix::fs::makedev(e.devmajor, e.devminor),
                    ),
                    b'4' => (
                        FileType::BlockDevice,
                        rustix::fs::makedev(e.devmajor, e.devminor),
                    ),
                    _ => (FileType::Fifo, 0),
                };
                self.create(&pfd, &cbase, &name, false, |p, n| {
                    rustix::fs::mknodat(p, n, ft, Mode::from_raw_mode(0o600), dev)
                        .map(|_| None::<()>)
                })?;
                self.set_meta_at(pfd.as_fd(), &cbase, e, &name, true)?;
            }
            t => {
                return Err(reject(&format!(
                    "unsupported entry type {:?}",
                    char::from(t)
                )))
            }
        }
        Ok(())
    }

    /// Creates `base` in `pfd`; if something is already there it is replaced, except that
    /// an existing directory is kept for a directory entry.
    fn create<T>(
        &mut self,
        pfd: &OwnedFd,
        base: &CString,
        name: &str,
        is_dir: bool,
        mut make: impl FnMut(BorrowedFd<'_>, &CString) -> rustix::io::Result<Option<T>>,
    ) -> Result<Option<T>> {
        match make(pfd.as_fd(), base) {
            Ok(v) => return Ok(v),
            Err(Errno::EXIST) => {}
            Err(err) => return Err(apply_err(name, "create", err)),
        }
        let st = rustix::fs::statat(pfd, base, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|err| apply_err(name, "lstat existing", err))?;
        let existing_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
        if is_dir && existing_dir {
            return Ok(None);
        }
        self.cache = None;
        remove_at(pfd.as_fd(), base, existing_dir)
            .map_err(|err| apply_err(name, "replace existing", err))?;
        make(pfd.as_fd(), base).map_err(|err| apply_err(name, "create", err))
    }

    fn whiteout(
        &mut self,
        e: &RawEntry,
        name: &str,
        parent: &[&[u8]],
        target: &[u8],
    ) -> Result<()> {
        let reject = |reason: &str| Error::TarEntryRejected {
            entry: name.to_owned(),
            reason: reason.to_owned(),
        };
        let overlay = matches!(self.opts.whiteouts, WhiteoutFormat::Overlay);
        if target == b".wh..opq" {
            let pfd = self.parent(parent, name)?;
            if overlay {
                rustix::fs::fsetxattr(
                    &*pfd,
                    c"trusted.overlay.opaque",
                    b"y",
                    rustix::fs::XattrFlags::empty(),
                )
                .map_err(|err| apply_err(name, "set opaque xattr", err))?;
            } else {
                self.cache = None;
                clear_dir(pfd.as_fd()).map_err(|err| apply_err(name, "clear opaque dir", err))?;
            }
            return Ok(());
        }
        if target.starts_with(b".wh.") {
            // Other `.wh..wh.` names are aufs metadata; Docker skips them too.
            return Ok(());
        }
        if target.is_empty() || target == b"." || target == b".." {
            return Err(reject("whiteout names no file inside its directory"));
        }
        let pfd = self.parent(parent, name)?;
        let ctarget = cstr(target, name)?;
        if overlay {
            let ft = FileType::CharacterDevice;
            self.create(&pfd, &ctarget, name, false, |p, n| {
                rustix::fs::mknodat(p, n, ft, Mode::empty(), 0).map(|_| None::<()>)
            })?;
            rustix::fs::chownat(
                &*pfd,
                &ctarget,
                Some(rustix::fs::Uid::from_raw(e.uid as u32)),
                Some(rustix::fs::Gid::from_raw(e.gid as u32)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|err| apply_err(name, "chown whiteout", err))?;
            rustix::fs::utimensat(&*pfd, &ctarget, &times(e.mtime), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|err| apply_err(name, "set whiteout mtime", err))?;
        } else {
            match rustix::fs::statat(&*pfd, &ctarget, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => {
                    self.cache = None;
                    let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
                    remove_at(pfd.as_fd(), &ctarget, is_dir)
                        .map_err(|err| apply_err(name, "remove whited-out path", err))?;
                }
                Err(Errno::NOENT) => {}
                Err(err) => return Err(apply_err(name, "lstat whited-out path", err)),
            }
        }
        Ok(())
    }

    /// The parent directory of an entry, created (0755, root-owned, as Docker does) if
    /// missing.
    fn parent(&mut self, comps: &[&[u8]], name: &str) -> Result<Rc<OwnedFd>> {
        self.resolve(comps, name, true)
    }

    fn resolve(&mut self, comps: &[&[u8]], name: &str, create: bool) -> Result<Rc<OwnedFd>> {
        if comps.is_empty() {
            return Ok(self.root.clone());
        }
        let key = comps.join(&b'/');
        if let Some((k, fd)) = &self.cache {
            if *k == key {
                return Ok(fd.clone());
            }
        }
        let fd = match self.open_beneath(&key, name)? {
            Some(fd) => fd,
            None if create => {
                for i in 1..=comps.len() {
                    let sub = comps[..i].join(&b'/');
                    if self.open_beneath(&sub, name)?.is_some() {
                        continue;
                    }
                    let up = self.resolve_nocache(&comps[..i - 1], name)?;
                    let c = cstr(comps[i - 1], name)?;
                    match rustix::fs::mkdirat(&*up, &c, Mode::from_raw_mode(0o755)) {
                        Ok(()) => {}
                        // Exists, yet could not be opened as a directory: a dangling symlink.
                        Err(Errno::EXIST) => {
                            return Err(Error::TarEntryRejected {
                                entry: name.to_owned(),
                                reason: format!(
                                    "{:?} is a dangling symlink",
                                    String::from_utf8_lossy(&sub)
                                ),
                            })
                        }
                        Err(err) => return Err(apply_err(name, "create parent dir", err)),
                    }
                }
                self.open_beneath(&key, name)?
                    .ok_or_else(|| Error::TarEntryRejected {
                        entry: name.to_owned(),
                        reason: "parent directory vanished".into(),
                    })?
            }
            None => {
                return Err(Error::TarEntryRejected {
                    entry: name.to_owned(),
                    reason: format!(
                        "link target directory {:?} does not exist",
                        String::from_utf8_lossy(&key)
                    ),
                })
            }
        };
        let fd = Rc::new(fd);
        self.cache = Some((key, fd.clone()));
        Ok(fd)
    }

    fn resolve_nocache(&self, comps: &[&[u8]], name: &str) -> Result<Rc<OwnedFd>> {
        if comps.is_empty() {
            return Ok(self.root.clone());
        }
        let key = comps.join(&b'/');
        self.open_beneath(&key, name)?
            .map(Rc::new)
            .ok_or_else(|| Error::TarEntryRejected {
                entry: name.to_owned(),
                reason: "parent directory vanished".into(),
            })
    }

    /// Opens a directory under the root; `None` if a component is missing.
    fn open_beneath(&self, rel: &[u8], name: &str) -> Result<Option<OwnedFd>> {
        let r = crate::openat2_retry(
            &*self.root,
            OsStr::from_bytes(rel),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        );
        let reject = |reason: String| Error::TarEntryRejected {
            entry: name.to_owned(),
            reason,
        };
        let shown = String::from_utf8_lossy(rel);
        match r {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::NOENT) => Ok(None),
            Err(Errno::XDEV) => Err(reject(format!(
                "{shown:?} leads outside the root through a symlink"
            ))),
            Err(Errno::LOOP) => Err(reject(format!("{shown:?}: too many levels of symlinks"))),
            Err(Errno::NOTDIR) => Err(reject(format!("{shown:?} is not a directory"))),
            Err(err) => Err(apply_err(name, "open parent dir", err)),
        }
    }

    /// Owner, mode and xattrs through an fd we hold (files and directories).
    fn set_meta_fd(&mut self, fd: BorrowedFd<'_>, e: &RawEntry, name: &str) -> Result<()> {
        rustix::fs::fchown(
            fd,
            Some(rustix::fs::Uid::from_raw(e.uid as u32)),
            Some(rustix::fs::Gid::from_raw(e.gid as u32)),
        )
        .map_err(|err| apply_err(name, "chown", err))?;
        rustix::fs::fchmod(fd, Mode::from_raw_mode(e.mode))
            .map_err(|err| apply_err(name, "chmod", err))?;
        for (k, v) in &e.xattrs {
            if skip_xattr(k) {
                continue;
            }
            let ck = cstr(k, name)?;
            tolerate_xattr(
                name,
                k,
                rustix::fs::fsetxattr(fd, &ck, v, rustix::fs::XattrFlags::empty()),
            )?;
        }
        Ok(())
    }

    /// Owner, mode, xattrs and mtime of something we do not open (symlinks, devices, fifos).
    fn set_meta_at(
        &mut self,
        pfd: BorrowedFd<'_>,
        base: &CString,
        e: &RawEntry,
        name: &str,
        chmod: bool,
    ) -> Result<()> {
        rustix::fs::chownat(
            pfd,
            base,
            Some(rustix::fs::Uid::from_raw(e.uid as u32)),
            Some(rustix::fs::Gid::from_raw(e.gid as u32)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|err| apply_err(name, "chown", err))?;
        if chmod {
            // `base` was just created by us as a device or fifo, not a symlink.
            rustix::fs::chmodat(pfd, base, Mode::from_raw_mode(e.mode), AtFlags::empty())
                .map_err(|err| apply_err(name, "chmod", err))?;
        }
        if !e.xattrs.is_empty() {
            let p = proc_path(pfd, base);
            for (k, v) in &e.xattrs {
                if skip_xattr(k) {
                    continue;
                }
                let ck = cstr(k, name)?;
                tolerate_xattr(
                    name,
                    k,
                    rustix::fs::lsetxattr(&p, &ck, v, rustix::fs::XattrFlags::empty()),
                )?;
            }
        }
        rustix::fs::utimensat(pfd, base, &times(e.mtime), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|err| apply_err(name, "set mtime", err))?;
        Ok(())
    }

    fn set_dir_times(&mut self) -> Result<()> {
        for (path, mtime) in std::mem::take(&mut self.dirs) {
            let name = String::from_utf8_lossy(&path).into_owned();
            let fd = if path.is_empty() {
                None
            } else {
                match crate::openat2_retry(
                    &*self.root,
                    OsStr::from_bytes(&path),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
                ) {
                    Ok(fd) => Some(fd),
                    // Removed or replaced by a later entry.
                    Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => continue,
                    Err(err) => return Err(apply_err(&name, "open dir for mtime", err)),
                }
            };
            let target = fd.as_ref().map(|f| f.as_fd()).unwrap_or(self.root.as_fd());
            rustix::fs::futimens(target, &times(mtime))
                .map_err(|err| apply_err(&name, "set dir mtime", err))?;
        }
        Ok(())
    }
}

fn times(mtime: i64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn cstr(b: &[u8], name: &str) -> Result<CString> {
    CString::new(b).map_err(|_| Error::TarEntryRejected {
        entry: name.to_owned(),
        reason: "NUL byte in name".into(),
    })
}

/// Like Docker, an xattr the filesystem does not support (or refuses on this file type)
/// is skipped with a warning rather than failing the layer.
fn tolerate_xattr(name: &str, key: &[u8], r: rustix::io::Result<()>) -> Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(err @ (Errno::OPNOTSUPP | Errno::PERM)) => {
            tracing::warn!(entry = name, xattr = %String::from_utf8_lossy(key), error = %err, "xattr not applied");
            Ok(())
        }
        Err(err) => Err(apply_err(name, "set xattr", err)),
    }
}

fn apply_err(name: &str, op: &'static str, err: Errno) -> Error {
    Error::TarApply {
        entry: name.to_owned(),
        op,
        source: err.into(),
    }
}

/// Removes `name` in `dir`; a directory is removed with everything under it, without
/// following symlinks.
fn remove_at(dir: BorrowedFd<'_>, name: &CString, is_dir: bool) -> rustix::io::Result<()> {
    if !is_dir {
        return rustix::fs::unlinkat(dir, name, AtFlags::empty());
    }
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    clear_dir(fd.as_fd())?;
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
}

/// Removes everything inside the directory `fd`.
fn clear_dir(fd: BorrowedFd<'_>) -> rustix::io::Result<()> {
    let mut names = Vec::new();
    let mut d = rustix::fs::Dir::read_from(fd)?;
    while let Some(ent) = d.read() {
        let ent = ent?;
        let n = ent.file_name();
        if n.to_bytes() != b"." && n.to_bytes() != b".." {
            let ft = match ent.file_type() {
                FileType::Unknown => FileType::from_raw_mode(
                    rustix::fs::statat(fd, n, AtFlags::SYMLINK_NOFOLLOW)?.st_mode,
                ),
                ft => ft,
            };
            names.push((n.to_owned(), ft == FileType::Directory));
        }
    }
    for (n, is_dir) in names {
        remove_at(fd, &n, is_dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_names() {
        let ok: &[(&[u8], &[&[u8]])] = &[
            (b"a/b", &[b"a", b"b"]),
            (b"./a//b/", &[b"a", b"b"]),
            (b"./", &[]),
            (b".", &[]),
            (b"a/./b", &[b"a", b"b"]),
        ];
        for (raw, want) in ok {
            assert_eq!(clean_name(raw).unwrap(), *want);
        }
        for (raw, why) in [
            (&b""[..], "empty"),
            (b"/etc/passwd", "absolute"),
            (b"../x", ".."),
            (b"a/../../x", ".."),
            (b"a/..", ".."),
            (b"a\0b", "NUL"),
        ] {
            assert!(clean_name(raw).unwrap_err().contains(why), "{raw:?}");
        }
    }
}
