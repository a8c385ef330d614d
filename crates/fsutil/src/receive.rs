//! The receiver role: write a tree sent by a peer into a destination directory.
//!
//! Follows `tonistiigi/fsutil` `receive.go`, `validator.go` and `diskwriter.go`:
//!
//! 1. Read the listing (`STAT` packets until the empty one), validating that every path is clean,
//!    relative, ordered after its previous sibling (bytewise, `/` lowest) and below a directory
//!    listed earlier, and that hardlinks name an earlier non-directory entry.
//! 2. Unless in merge mode, walk the destination and diff: entries whose metadata is unchanged
//!    (mode, uid, gid, device numbers, link target, and for non-directories size and mtime) are
//!    left alone and never requested; destination entries missing from the listing are deleted.
//! 3. Create directories, symlinks, devices and fifos at once; regular files are created under a
//!    temporary name, requested with `REQ`, filled from `DATA` and renamed into place when their
//!    empty `DATA` arrives. Hardlinks are made after all file data arrived.
//! 4. Restore directory mtimes, send `FIN`, and read until the peer ends the stream.
//!
//! Every path is resolved inside the destination with `openat2(RESOLVE_IN_ROOT)`; entries are
//! created with `*at` calls relative to their parent directory, so a symlink in the tree can never
//! redirect a write outside the destination.

use crate::filemode::{posix_perm_from_go_mode, FileKind};
use crate::patterns::go_clean;
use crate::walk::{walk, MapResult, WalkOptions};
use crate::{Error, Packet, Stat};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::Instrument as _;

/// Progress callback: bytes of packets received so far, and whether this is the last call.
pub type ProgressFn = Arc<dyn Fn(u64, bool) + Send + Sync>;

/// Options of [`receive`].
#[derive(Default, Clone)]
pub struct ReceiveOptions {
    /// Treat the destination as empty and never delete (used for exports to a client directory).
    pub merge: bool,
    /// Re-request every regular file even when its metadata is unchanged (`local.differ=none`).
    pub differ_none: bool,
    /// Optional progress callback.
    pub progress: Option<ProgressFn>,
}

impl std::fmt::Debug for ReceiveOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiveOptions")
            .field("merge", &self.merge)
            .field("differ_none", &self.differ_none)
            .finish_non_exhaustive()
    }
}

/// What a receive did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiveStats {
    /// Entries in the listing.
    pub entries: u64,
    /// Regular files whose content was requested.
    pub files_requested: u64,
    /// Content bytes written.
    pub bytes_written: u64,
    /// Destination entries deleted because the listing no longer has them.
    pub deleted: u64,
    /// Listing entries created or replaced in the destination (requested files, hardlinks,
    /// directories, symlinks, devices and fifos whose metadata differed or that were missing).
    pub changed: u64,
}

impl ReceiveStats {
    /// Whether the receive left the destination's tree as it found it: nothing created,
    /// replaced or deleted (directory times are restored either way; they are not content).
    pub fn unchanged(&self) -> bool {
        self.changed == 0 && self.deleted == 0
    }
}

/// Runs the receiver into `dest` (created if missing).
pub async fn receive<S>(
    dest: PathBuf,
    opts: ReceiveOptions,
    out: mpsc::Sender<Packet>,
    mut incoming: S,
) -> Result<ReceiveStats, Error>
where
    S: Stream<Item = Result<Packet, Error>> + Unpin + Send,
{
    let res = receive_inner(&dest, &opts, &out, &mut incoming).await;
    if let Err(e) = &res {
        if !matches!(e, Error::Remote { .. } | Error::Transport { .. }) {
            let _ = out.send(Packet::Err(crate::error_chain(e))).await;
        }
    }
    res
}

async fn receive_inner<S>(
    dest: &Path,
    opts: &ReceiveOptions,
    out: &mpsc::Sender<Packet>,
    incoming: &mut S,
) -> Result<ReceiveStats, Error>
where
    S: Stream<Item = Result<Packet, Error>> + Unpin + Send,
{
    let mut received: u64 = 0;
    let progress = |n: u64, last: bool| {
        if let Some(p) = &opts.progress {
            p(n, last)
        }
    };

    // 1. listing
    let listing_span = tracing::debug_span!("local.sync.listing", entries = tracing::field::Empty);
    let listing: Vec<Stat> = async {
        let mut listing = Vec::new();
        let mut validator = Validator::default();
        loop {
            let pkt = next_packet(incoming).await?;
            received += packet_size(&pkt);
            progress(received, false);
            match pkt {
                Packet::Stat(None) => break,
                Packet::Stat(Some(st)) => {
                    validator.check(&st)?;
                    listing.push(st);
                }
                Packet::Err(message) => {
                    return Err(Error::Remote {
                        peer: "sender",
                        message,
                    })
                }
                other => {
                    return Err(Error::protocol(format!(
                        "unexpected {} packet before the end of the listing",
                        crate::send::packet_kind(&other)
                    )))
                }
            }
        }
        Ok(listing)
    }
    .instrument(listing_span.clone())
    .await?;
    listing_span.record("entries", listing.len());

    // 2 + 3a. diff and apply metadata changes on a blocking thread.
    let plan = {
        let dest = dest.to_path_buf();
        let opts = opts.clone();
        let span = tracing::debug_span!("local.sync.diff");
        tokio::task::spawn_blocking(move || span.in_scope(|| apply_listing(&dest, listing, &opts)))
            .await
            .map_err(|e| Error::Transport {
                message: format!("apply task failed: {e}"),
            })??
    };
    let Plan {
        root,
        listing,
        mut pending,
        hardlinks,
        deleted,
        changed,
    } = plan;
    let mut stats = ReceiveStats {
        entries: listing.len() as u64,
        files_requested: pending.len() as u64,
        deleted,
        changed,
        ..Default::default()
    };

    // 3b. request and receive file data. Files are written on a blocking writer thread.
    let (wtx, mut wrx) = mpsc::channel::<WriteCmd>(16);
    let writer = {
        let root = root.clone();
        tokio::task::spawn_blocking(move || -> Result<u64, Error> {
            let mut open: HashMap<u32, (std::fs::File, PendingFile)> = HashMap::new();
            let mut written = 0u64;
            while let Some(cmd) = wrx.blocking_recv() {
                match cmd {
                    WriteCmd::Chunk(pf, data) => {
                        let id = pf.id;
                        let (f, pf) = match open.entry(id) {
                            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                            std::collections::hash_map::Entry::Vacant(e) => {
                                let f = root.open_tmp_for_write(&pf)?;
                                e.insert((f, pf))
                            }
                        };
                        f.write_all(&data)
                            .map_err(|e| Error::io("write", root.display(&pf.rel), e))?;
                        written += data.len() as u64;
                    }
                    WriteCmd::Finish(pf) => {
                        let f = open.remove(&pf.id).map(|(f, _)| f);
                        root.finish_file(&pf, f)?;
                    }
                }
            }
            Ok(written)
        })
    };
    let mut ids: Vec<u32> = pending.keys().copied().collect();
    ids.sort_unstable();
    // Requests are sent from a separate task so a slow sender cannot deadlock us.
    let req_task = {
        let out = out.clone();
        tokio::spawn(async move {
            for id in ids {
                if out.send(Packet::Req { id }).await.is_err() {
                    return;
                }
            }
        })
    };
    let data_span = tracing::debug_span!("local.sync.data", files = pending.len());
    let data_result: Result<(), Error> = async {
        while !pending.is_empty() {
            let pkt = next_packet(incoming).await?;
            received += packet_size(&pkt);
            progress(received, false);
            match pkt {
                Packet::Data { id, data } => {
                    let Some(pf) = pending.get(&id) else {
                        return Err(Error::protocol(format!("invalid file request {id}")));
                    };
                    if data.is_empty() {
                        let pf = pending.remove(&id).expect("checked above");
                        wtx.send(WriteCmd::Finish(pf))
                            .await
                            .map_err(|_| writer_gone())?;
                    } else {
                        wtx.send(WriteCmd::Chunk(pf.clone(), data))
                            .await
                            .map_err(|_| writer_gone())?;
                    }
                }
                Packet::Err(message) => {
                    return Err(Error::Remote {
                        peer: "sender",
                        message,
                    })
                }
                other => {
                    return Err(Error::protocol(format!(
                        "unexpected {} packet while receiving file data",
                        crate::send::packet_kind(&other)
                    )))
                }
            }
        }
        Ok(())
    }
    .instrument(data_span)
    .await;
    drop(wtx);
    req_task.abort();
    let written = writer.await.map_err(|e| Error::Transport {
        message: format!("writer task failed: {e}"),
    })?;
    // The writer stops early only on an error of its own (which file, which operation); the
    // data loop then fails with just "file writer stopped", so the writer's error is the cause.
    stats.bytes_written = match (data_result, written) {
        (Ok(()), Ok(n)) => n,
        (Err(e), Ok(_)) => return Err(e),
        (Ok(()), Err(cause)) => return Err(cause),
        (Err(e), Err(cause)) if is_writer_gone(&e) => return Err(cause),
        (Err(e), Err(_)) => return Err(e),
    };

    // 3c + 4. hardlinks, directory mtimes.
    {
        let root = root.clone();
        let span = tracing::debug_span!("local.sync.finish");
        tokio::task::spawn_blocking(move || -> Result<(), Error> {
            let _entered = span.enter();
            for st in &hardlinks {
                root.make_hardlink(st)?;
            }
            for st in listing.iter().rev().filter(|s| s.is_dir()) {
                root.set_mtime(&st.path, st.mod_time)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::Transport {
            message: format!("finish task failed: {e}"),
        })??;
    }
    out.send(Packet::Fin).await.map_err(|_| Error::Transport {
        message: "sender closed the stream before FIN".into(),
    })?;
    // The sender answers FIN and then ends the stream.
    loop {
        match incoming.next().await {
            None => break,
            Some(Ok(Packet::Err(message))) => {
                return Err(Error::Remote {
                    peer: "sender",
                    message,
                })
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e),
        }
    }
    progress(received, true);
    Ok(stats)
}

const WRITER_GONE: &str = "file writer stopped";

fn writer_gone() -> Error {
    Error::Transport {
        message: WRITER_GONE.into(),
    }
}

fn is_writer_gone(e: &Error) -> bool {
    matches!(e, Error::Transport { message } if message == WRITER_GONE)
}

async fn next_packet<S>(incoming: &mut S) -> Result<Packet, Error>
where
    S: Stream<Item = Result<Packet, Error>> + Unpin + Send,
{
    match incoming.next().await {
        Some(r) => r,
        None => Err(Error::Transport {
            message: "sender closed the stream unexpectedly".into(),
        }),
    }
}

fn packet_size(p: &Packet) -> u64 {
    match p {
        Packet::Data { data, .. } => data.len() as u64 + 8,
        Packet::Stat(Some(st)) => st.path.len() as u64 + st.linkname.len() as u64 + 32,
        _ => 4,
    }
}

enum WriteCmd {
    Chunk(PendingFile, Bytes),
    Finish(PendingFile),
}

#[derive(Debug, Clone)]
struct PendingFile {
    id: u32,
    rel: String,
    tmp_name: String,
    stat: Stat,
}

struct Plan {
    root: Arc<Root>,
    listing: Vec<Stat>,
    pending: HashMap<u32, PendingFile>,
    hardlinks: Vec<Stat>,
    deleted: u64,
    changed: u64,
}

fn apply_listing(dest: &Path, listing: Vec<Stat>, opts: &ReceiveOptions) -> Result<Plan, Error> {
    std::fs::create_dir_all(dest).map_err(|e| Error::io("mkdir", dest, e))?;
    let root = Arc::new(Root::open(dest)?);
    let mut existing: HashMap<String, Stat> = HashMap::new();
    if !opts.merge {
        walk(
            dest,
            &WalkOptions::default(),
            &mut |_| MapResult::Keep,
            &mut |st| {
                existing.insert(st.path.clone(), st);
                Ok(())
            },
        )?;
    }
    // deletions: existing paths not in the listing, top-most only
    let wanted: HashSet<&str> = listing.iter().map(|s| s.path.as_str()).collect();
    let mut deletions: Vec<&String> = existing
        .keys()
        .filter(|p| !wanted.contains(p.as_str()))
        .collect();
    deletions.sort();
    let mut deleted = 0u64;
    let mut last_deleted: Option<String> = None;
    for p in deletions {
        if let Some(ld) = &last_deleted {
            if p.starts_with(&format!("{ld}/")) {
                continue;
            }
        }
        root.remove_all(p)?;
        deleted += 1;
        last_deleted = Some(p.clone());
    }

    let mut pending = HashMap::new();
    let mut hardlinks = Vec::new();
    let mut changed = 0u64;
    for (idx, st) in listing.iter().enumerate() {
        let id = idx as u32;
        let old = existing.get(&st.path);
        if let Some(old) = old {
            if !opts.differ_none && same_file(old, st) {
                continue;
            }
        }
        changed += 1;
        if st.is_hardlink() {
            hardlinks.push(st.clone());
            continue;
        }
        match st.kind() {
            FileKind::Regular | FileKind::Irregular => {
                let tmp_name = root.create_tmp_file(st)?;
                pending.insert(
                    id,
                    PendingFile {
                        id,
                        rel: st.path.clone(),
                        tmp_name,
                        stat: st.clone(),
                    },
                );
            }
            _ => root.create_entry(st)?,
        }
    }
    Ok(Plan {
        root,
        listing,
        pending,
        hardlinks,
        deleted,
        changed,
    })
}

fn same_file(old: &Stat, new: &Stat) -> bool {
    if !new.is_dir() && (old.size != new.size || old.mod_time != new.mod_time) {
        return false;
    }
    old.mode == new.mode
        && old.uid == new.uid
        && old.gid == new.gid
        && old.devmajor == new.devmajor
        && old.devminor == new.devminor
        && old.linkname == new.linkname
}

/// Bytewise path order where `/` sorts before every other byte (upstream `ComparePath`).
pub(crate) fn compare_path(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let (a, b) = (a.as_bytes(), b.as_bytes());
    for (x, y) in a.iter().zip(b.iter()) {
        if x == y {
            continue;
        }
        if *x == b'/' {
            return Ordering::Less;
        }
        if *y == b'/' {
            return Ordering::Greater;
        }
        return x.cmp(y);
    }
    a.len().cmp(&b.len())
}

/// Checks listing order, cleanliness and hardlink targets.
#[derive(Default)]
struct Validator {
    /// Stack of (dir, last child name seen).
    parents: Vec<(String, String)>,
    seen_files: HashSet<String>,
    dirs: HashSet<String>,
}

impl Validator {
    fn check(&mut self, st: &Stat) -> Result<(), Error> {
        let p = st.path.as_str();
        if p.is_empty() || p != go_clean(p) || p == "." {
            return Err(Error::protocol(format!("unclean path {p:?}")));
        }
        if p.starts_with('/') {
            return Err(Error::protocol(format!("absolute path {p:?}")));
        }
        if p == ".." || p.starts_with("../") {
            return Err(Error::protocol(format!(
                "path escapes the destination: {p:?}"
            )));
        }
        if p.contains('\0') {
            return Err(Error::protocol(format!("path contains NUL: {p:?}")));
        }
        let (dir, base) = match p.rsplit_once('/') {
            Some((d, b)) => (d, b),
            None => ("", p),
        };
        if self.parents.is_empty() {
            self.parents.push((String::new(), String::new()));
        }
        // pop back to the parent of this entry
        while self.parents.len() > 1
            && compare_path(&self.parents.last().unwrap().0, dir) == std::cmp::Ordering::Greater
        {
            self.parents.pop();
        }
        while self.parents.len() > 1 && self.parents.last().unwrap().0 != dir {
            self.parents.pop();
        }
        let top = self.parents.last_mut().unwrap();
        if top.0 != dir || (!top.1.is_empty() && top.1.as_str() >= base) {
            return Err(Error::protocol(format!(
                "changes out of order: {p:?} after {:?}/{:?}",
                top.0, top.1
            )));
        }
        if !dir.is_empty() && !self.dirs.contains(dir) {
            return Err(Error::protocol(format!(
                "parent of {p:?} is not a listed directory"
            )));
        }
        top.1 = base.to_string();
        if st.is_dir() {
            self.parents.push((p.to_string(), String::new()));
            self.dirs.insert(p.to_string());
        } else {
            if st.is_hardlink() && !self.seen_files.contains(&st.linkname) {
                return Err(Error::protocol(format!(
                    "invalid hardlink {p:?} to {:?}",
                    st.linkname
                )));
            }
            self.seen_files.insert(p.to_string());
        }
        Ok(())
    }
}

/// The destination root, with every operation resolved inside it.
struct Root {
    path: PathBuf,
    fd: OwnedFd,
    /// An open description of the destination holding an exclusive `flock` for as long as any
    /// part of this receive can still write into it. The blocking threads (listing diff, file
    /// writer, finish) each hold the `Root`, and they run to completion even when the receive's
    /// future is dropped (a cancelled build, a closed session); the next receive into the same
    /// destination waits here for them instead of racing them (it would delete their temporary
    /// files mid-write, and they would write into its tree). Released when the last holder drops.
    _lock: OwnedFd,
}

fn errno(op: &'static str, path: PathBuf) -> impl FnOnce(rustix::io::Errno) -> Error {
    move |e| Error::io(op, path, e)
}

impl Root {
    /// Opens the destination and waits for the exclusive lock on it (see `_lock`). Runs on a
    /// blocking thread; the wait ends when an earlier receive's threads have finished their
    /// bounded remaining work.
    fn open(path: &Path) -> Result<Self, Error> {
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno("open", path.to_path_buf()))?;
        // flock needs a real open description (not O_PATH); a read-only one of the same inode.
        let lock = rustix::fs::openat(
            &fd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno("open", path.to_path_buf()))?;
        loop {
            match rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive) {
                Err(rustix::io::Errno::INTR) => continue,
                other => break other,
            }
        }
        .map_err(errno("lock", path.to_path_buf()))?;
        Ok(Root {
            path: path.to_path_buf(),
            fd,
            _lock: lock,
        })
    }

    fn display(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// Opens the parent directory of `rel` inside the root and returns it with the final name.
    fn parent(&self, rel: &str) -> Result<(OwnedFd, String), Error> {
        let (dir, name) = match rel.rsplit_once('/') {
            Some((d, n)) => (d, n),
            None => (".", rel),
        };
        // The kernel answers EAGAIN when a rename or mount elsewhere raced with a `..` step of a
        // scoped lookup; that is transient, so the lookup is repeated.
        let mut tries = 0;
        let fd = loop {
            match rustix::fs::openat2(
                &self.fd,
                dir,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
            ) {
                Err(rustix::io::Errno::AGAIN) if tries < 256 => tries += 1,
                other => break other,
            }
        }
        .map_err(errno("open parent of", self.display(rel)))?;
        Ok((fd, name.to_string()))
    }

    fn proc_path(fd: &OwnedFd, name: &str) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}/{}", fd.as_raw_fd(), name))
    }

    fn lstat_at(fd: &OwnedFd, name: &str) -> Option<rustix::fs::Stat> {
        rustix::fs::statat(fd, name, AtFlags::SYMLINK_NOFOLLOW).ok()
    }

    fn remove_all(&self, rel: &str) -> Result<(), Error> {
        let (pfd, name) = self.parent(rel)?;
        let Some(st) = Self::lstat_at(&pfd, &name) else {
            return Ok(());
        };
        if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory {
            // std's remove_dir_all does not follow symlinks below the directory.
            std::fs::remove_dir_all(Self::proc_path(&pfd, &name))
                .map_err(|e| Error::io("remove", self.display(rel), e))
        } else {
            rustix::fs::unlinkat(&pfd, name.as_str(), AtFlags::empty())
                .map_err(errno("unlink", self.display(rel)))
        }
    }

    /// Creates a non-regular entry (dir, symlink, device, fifo) with its metadata.
    fn create_entry(&self, st: &Stat) -> Result<(), Error> {
        let (pfd, name) = self.parent(&st.path)?;
        let shown = self.display(&st.path);
        let existing = Self::lstat_at(&pfd, &name);
        let existing_is_dir = existing
            .map(|e| {
                rustix::fs::FileType::from_raw_mode(e.st_mode) == rustix::fs::FileType::Directory
            })
            .unwrap_or(false);
        let kind = st.kind();
        if kind == FileKind::Dir && existing_is_dir {
            // Keep the directory (and its unchanged contents); only update its metadata.
            return self.apply_meta(&pfd, &name, st);
        }
        let tmp = tmp_name(&name);
        let mode = Mode::from_raw_mode(posix_perm_from_go_mode(st.mode));
        match kind {
            FileKind::Dir => rustix::fs::mkdirat(&pfd, tmp.as_str(), mode)
                .map_err(errno("mkdir", shown.clone()))?,
            FileKind::Symlink => rustix::fs::symlinkat(st.linkname.as_str(), &pfd, tmp.as_str())
                .map_err(errno("symlink", shown.clone()))?,
            FileKind::BlockDevice | FileKind::CharDevice => {
                let ft = if kind == FileKind::BlockDevice {
                    rustix::fs::FileType::BlockDevice
                } else {
                    rustix::fs::FileType::CharacterDevice
                };
                let dev = rustix::fs::makedev(st.devmajor as u32, st.devminor as u32);
                rustix::fs::mknodat(&pfd, tmp.as_str(), ft, mode, dev)
                    .map_err(errno("mknod", shown.clone()))?
            }
            FileKind::NamedPipe => {
                rustix::fs::mknodat(&pfd, tmp.as_str(), rustix::fs::FileType::Fifo, mode, 0)
                    .map_err(errno("mkfifo", shown.clone()))?
            }
            FileKind::Socket => {
                // Sockets cannot be transferred; upstream senders never send them.
                return Ok(());
            }
            FileKind::Regular | FileKind::Irregular => {
                unreachable!("regular files go through create_tmp_file")
            }
        }
        self.apply_meta(&pfd, &tmp, st)?;
        self.replace(&pfd, &tmp, &name, existing_is_dir, &shown)
    }

    fn replace(
        &self,
        pfd: &OwnedFd,
        tmp: &str,
        name: &str,
        existing_is_dir: bool,
        shown: &Path,
    ) -> Result<(), Error> {
        if existing_is_dir {
            std::fs::remove_dir_all(Self::proc_path(pfd, name))
                .map_err(|e| Error::io("remove", shown, e))?;
        } else if let Some(tmp_st) = Self::lstat_at(pfd, tmp) {
            // rename(2) cannot put a directory over a non-directory: remove the old entry first.
            let tmp_is_dir = rustix::fs::FileType::from_raw_mode(tmp_st.st_mode)
                == rustix::fs::FileType::Directory;
            if tmp_is_dir && Self::lstat_at(pfd, name).is_some() {
                rustix::fs::unlinkat(pfd, name, AtFlags::empty())
                    .map_err(errno("unlink", shown.to_path_buf()))?;
            }
        }
        rustix::fs::renameat(pfd, tmp, pfd, name).map_err(errno("rename", shown.to_path_buf()))
    }

    fn create_tmp_file(&self, st: &Stat) -> Result<String, Error> {
        let (pfd, name) = self.parent(&st.path)?;
        let tmp = tmp_name(&name);
        let fd = rustix::fs::openat(
            &pfd,
            tmp.as_str(),
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(errno("create", self.display(&st.path)))?;
        drop(fd);
        Ok(tmp)
    }

    fn open_tmp_for_write(&self, pf: &PendingFile) -> Result<std::fs::File, Error> {
        let (pfd, _) = self.parent(&pf.rel)?;
        let fd = rustix::fs::openat(
            &pfd,
            pf.tmp_name.as_str(),
            OFlags::WRONLY | OFlags::APPEND | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno("open the temporary file for", self.display(&pf.rel)))?;
        Ok(std::fs::File::from(fd))
    }

    fn finish_file(&self, pf: &PendingFile, f: Option<std::fs::File>) -> Result<(), Error> {
        drop(f);
        let (pfd, name) = self.parent(&pf.rel)?;
        let shown = self.display(&pf.rel);
        let existing_is_dir = Self::lstat_at(&pfd, &name)
            .map(|e| {
                rustix::fs::FileType::from_raw_mode(e.st_mode) == rustix::fs::FileType::Directory
            })
            .unwrap_or(false);
        self.apply_meta(&pfd, &pf.tmp_name, &pf.stat)?;
        self.replace(&pfd, &pf.tmp_name, &name, existing_is_dir, &shown)
    }

    fn make_hardlink(&self, st: &Stat) -> Result<(), Error> {
        let (opfd, oname) = self.parent(&st.linkname)?;
        let (pfd, name) = self.parent(&st.path)?;
        let shown = self.display(&st.path);
        let tmp = tmp_name(&name);
        rustix::fs::linkat(&opfd, oname.as_str(), &pfd, tmp.as_str(), AtFlags::empty())
            .map_err(errno("link", shown.clone()))?;
        let existing_is_dir = Self::lstat_at(&pfd, &name)
            .map(|e| {
                rustix::fs::FileType::from_raw_mode(e.st_mode) == rustix::fs::FileType::Directory
            })
            .unwrap_or(false);
        self.replace(&pfd, &tmp, &name, existing_is_dir, &shown)
    }

    fn set_mtime(&self, rel: &str, mtime_ns: i64) -> Result<(), Error> {
        let (pfd, name) = self.parent(rel)?;
        let ts = timespec(mtime_ns);
        rustix::fs::utimensat(
            &pfd,
            name.as_str(),
            &Timestamps {
                last_access: ts,
                last_modification: ts,
            },
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(errno("utimes", self.display(rel)))
    }

    /// xattrs, owner, permissions (not for symlinks) and mtime of `name` in `pfd`.
    fn apply_meta(&self, pfd: &OwnedFd, name: &str, st: &Stat) -> Result<(), Error> {
        let shown = self.display(&st.path);
        if !st.xattrs.is_empty() {
            let p = Self::proc_path(pfd, name);
            for (k, v) in &st.xattrs {
                match rustix::fs::lsetxattr(&p, k.as_str(), v, rustix::fs::XattrFlags::empty()) {
                    Ok(()) | Err(rustix::io::Errno::NOTSUP) => {}
                    Err(e) => return Err(Error::io("setxattr", shown, e)),
                }
            }
        }
        let uid = rustix::fs::Uid::from_raw(st.uid);
        let gid = rustix::fs::Gid::from_raw(st.gid);
        match rustix::fs::chownat(pfd, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(()) => {}
            // Unprivileged receivers keep their own ownership.
            Err(rustix::io::Errno::PERM) if !rustix::process::geteuid().is_root() => {}
            Err(e) => return Err(Error::io("chown", shown, e)),
        }
        if st.kind() != FileKind::Symlink {
            rustix::fs::chmodat(
                pfd,
                name,
                Mode::from_raw_mode(posix_perm_from_go_mode(st.mode)),
                AtFlags::empty(),
            )
            .map_err(errno("chmod", shown.clone()))?;
        }
        let ts = timespec(st.mod_time);
        rustix::fs::utimensat(
            pfd.as_fd(),
            name,
            &Timestamps {
                last_access: ts,
                last_modification: ts,
            },
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(errno("utimes", shown))
    }
}

fn timespec(ns: i64) -> Timespec {
    Timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000) as _,
    }
}

fn tmp_name(name: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let short: String = name.chars().take(64).collect();
    format!(".{short}.berth-tmp-{}-{n}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(path: &str, mode: u32) -> Stat {
        Stat {
            path: path.into(),
            mode,
            ..Default::default()
        }
    }

    #[test]
    fn compare_path_orders_slash_first() {
        use std::cmp::Ordering::*;
        assert_eq!(compare_path("a/b", "a-b"), Less);
        assert_eq!(compare_path("a", "a/b"), Less);
        assert_eq!(compare_path("b", "a/z"), Greater);
        assert_eq!(compare_path("abc", "abc"), Equal);
    }

    #[test]
    fn validator_table() {
        const D: u32 = crate::filemode::MODE_DIR | 0o755;
        let ok: &[&[(&str, u32)]] = &[
            &[("a", D), ("a/b", 0o644), ("a-b", 0o644), ("b", 0o644)],
            &[
                ("a", D),
                ("a/b", D),
                ("a/b/c", 0o644),
                ("a/c", 0o644),
                ("z", 0o644),
            ],
        ];
        for list in ok {
            let mut v = Validator::default();
            for (p, m) in list.iter() {
                v.check(&st(p, *m))
                    .unwrap_or_else(|e| panic!("{list:?}: {e}"));
            }
        }
        let bad: &[&[(&str, u32)]] = &[
            &[("b", 0o644), ("a", 0o644)],
            &[("a", 0o644), ("a", 0o644)],
            &[("a/b", 0o644)],
            &[("a", 0o644), ("a/b", 0o644)],
            &[("../x", 0o644)],
            &[("/etc/passwd", 0o644)],
            &[("a/./b", 0o644)],
            &[("a", D), ("a/../../x", 0o644)],
            &[("a-b", 0o644), ("a", D), ("a/x", 0o644)],
        ];
        for list in bad {
            let mut v = Validator::default();
            let res: Result<(), Error> = list.iter().try_for_each(|(p, m)| v.check(&st(p, *m)));
            assert!(res.is_err(), "{list:?} should be rejected");
        }
        let mut v = Validator::default();
        let mut hl = st("b", 0o644);
        hl.linkname = "nope".into();
        assert!(v.check(&hl).is_err());
    }
}
