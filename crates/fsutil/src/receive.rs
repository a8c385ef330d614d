//! The receiver role: write a tree sent by a peer into a destination directory.
//!
//! Follows `tonistiigi/fsutil` `receive.go`, `validator.go` and `diskwriter.go`, and like them
//! diffs while the listing streams in:
//!
//! 1. Open and lock the destination and learn what it holds (unless in merge mode, where it counts
//!    as empty): the listing the previous receive left in [`ReceiveOptions::state`] when that file
//!    is there and the destination's root directory is as that receive left it, else a walk of the
//!    destination. Either way the previous entries are in listing order.
//! 2. For each `STAT` packet as it arrives: validate it (clean, relative, ordered after its
//!    previous sibling bytewise with `/` lowest, below a directory listed earlier; a hardlink
//!    names an earlier non-directory entry), then merge it with the previous entries: previous
//!    entries ordered before it are gone and are deleted (top-most only); an entry whose metadata
//!    is unchanged (mode, uid, gid, device numbers, link target, and for non-directories size and
//!    mtime in nanoseconds) is left alone without a system call; anything else is applied at once
//!    by the applier thread: directories, symlinks, devices and fifos are created, regular files
//!    are created under a temporary name and then requested with `REQ`.
//! 3. `DATA` (which may arrive while the listing still streams) fills the temporary files; a
//!    file's empty `DATA` renames it into place. Hardlinks are made after all file data arrived.
//! 4. Restore the mtimes of the directories whose entries changed, write the new listing to the
//!    state file (when anything changed), send `FIN`, and read until the peer ends the stream.
//!
//! A no-op receive into a destination with a state file thus costs one pass over the packets and
//! no system call per entry. The state file is removed before the first change to the destination
//! and written again only once the receive has completed, so a receive that fails or is cancelled
//! half-way leaves no state file, and the next one walks the destination.
//!
//! Every path is resolved inside the destination with `openat2(RESOLVE_IN_ROOT)`; entries are
//! created with `*at` calls relative to their parent directory, so a symlink in the tree can never
//! redirect a write outside the destination.

use crate::filemode::{posix_perm_from_go_mode, FileKind};
use crate::walk::{walk, MapResult, WalkOptions};
use crate::{Error, Packet, Stat};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use std::collections::{BTreeSet, HashMap, HashSet};
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
    /// A file outside the destination where the receive keeps the listing it applied, so the
    /// next receive into the same destination diffs against it instead of walking the
    /// destination. `None`: every receive walks the destination. The file is trusted only while
    /// the destination's root directory has the inode and change time recorded with it: nothing
    /// but these receives may change the tree below it.
    pub state: Option<PathBuf>,
    /// Optional progress callback.
    pub progress: Option<ProgressFn>,
}

impl std::fmt::Debug for ReceiveOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiveOptions")
            .field("merge", &self.merge)
            .field("differ_none", &self.differ_none)
            .field("state", &self.state)
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
    /// Whether the destination's previous content came from the state file
    /// ([`ReceiveOptions::state`]) instead of a walk of the destination.
    pub state_reused: bool,
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

fn task_failed(what: &'static str) -> impl FnOnce(tokio::task::JoinError) -> Error {
    move |e| Error::Transport {
        message: format!("{what} task failed: {e}"),
    }
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
    // 1. the destination and what it holds
    let prepared = {
        let dest = dest.to_path_buf();
        let (merge, state) = (opts.merge, opts.state.clone());
        let span = tracing::debug_span!(
            "local.sync.prepare",
            state_reused = tracing::field::Empty,
            previous = tracing::field::Empty
        );
        tokio::task::spawn_blocking(move || {
            span.in_scope(|| {
                let p = prepare(&dest, merge, state.as_deref())?;
                span.record("state_reused", p.state_reused);
                span.record("previous", p.previous.len());
                Ok::<_, Error>(p)
            })
        })
        .await
        .map_err(task_failed("prepare"))??
    };
    let Prepared {
        root,
        previous,
        state_reused,
    } = prepared;

    // The applier makes the changes on a blocking thread, in the order they are found; a file's
    // REQ goes out (through the request task, so a sender slow to read requests cannot block
    // the applier) once its temporary file exists.
    let (req_tx, mut req_rx) = mpsc::unbounded_channel::<u32>();
    let (atx, arx) = mpsc::channel::<Apply>(64);
    let applier = {
        let root = root.clone();
        // A state file that was read stays until the first change; one that was not is gone.
        let stale_state = opts.state.clone().filter(|_| state_reused);
        tokio::task::spawn_blocking(move || run_applier(&root, arx, req_tx, stale_state))
    };
    let req_task = {
        let out = out.clone();
        tokio::spawn(async move {
            while let Some(id) = req_rx.recv().await {
                if out.send(Packet::Req { id }).await.is_err() {
                    return;
                }
            }
        })
    };

    let mut rx = Receiving {
        opts,
        received: 0,
        listing: Vec::new(),
        validator: Validator::default(),
        previous,
        cursor: 0,
        last_deleted: None,
        pending: HashSet::new(),
        hardlinks: Vec::new(),
        touched: BTreeSet::new(),
        stats: ReceiveStats {
            state_reused,
            ..Default::default()
        },
        atx,
    };
    // 2 + 3. the listing (with any early data), then the rest of the data
    let listing_span = tracing::debug_span!(
        "local.sync.listing",
        entries = tracing::field::Empty,
        changed = tracing::field::Empty,
        deleted = tracing::field::Empty,
        state_reused
    );
    let mut loop_result = rx.listing(incoming).instrument(listing_span.clone()).await;
    listing_span.record("entries", rx.listing.len());
    listing_span.record("changed", rx.stats.changed);
    listing_span.record("deleted", rx.stats.deleted);
    if loop_result.is_ok() {
        let data_span = tracing::debug_span!("local.sync.data", files = rx.pending.len());
        loop_result = rx.data(incoming).instrument(data_span).await;
    }
    let Receiving {
        listing,
        hardlinks,
        touched,
        mut stats,
        atx,
        received,
        ..
    } = rx;
    drop(atx);
    let written = applier.await.map_err(task_failed("applier"))?;
    req_task.abort();
    // The applier stops early only on an error of its own (which file, which operation); the
    // receive loop then fails with just "file writer stopped", so the applier's error is the
    // cause.
    stats.bytes_written = match (loop_result, written) {
        (Ok(()), Ok(n)) => n,
        (Err(e), Ok(_)) => return Err(e),
        (Ok(()), Err(cause)) => return Err(cause),
        (Err(e), Err(cause)) if is_writer_gone(&e) => return Err(cause),
        (Err(e), Err(_)) => return Err(e),
    };
    stats.entries = listing.len() as u64;

    // 3c + 4. hardlinks, directory mtimes, the state for the next receive.
    {
        let write_state = opts
            .state
            .clone()
            // Not needed when the state file read at the start is still true.
            .filter(|_| !(opts.merge || state_reused && stats.unchanged()));
        let span = tracing::debug_span!(
            "local.sync.finish",
            dirs = touched.len(),
            state_written = write_state.is_some()
        );
        tokio::task::spawn_blocking(move || -> Result<(), Error> {
            let _entered = span.enter();
            for &idx in &hardlinks {
                root.make_hardlink(&listing[idx])?;
            }
            for st in listing.iter().rev().filter(|s| s.is_dir()) {
                if touched.contains(st.path.as_str()) {
                    root.set_mtime(&st.path, st.mod_time)?;
                }
            }
            if let Some(path) = write_state {
                write_state_file(&path, &root, &listing)?;
            }
            Ok(())
        })
        .await
        .map_err(task_failed("finish"))??;
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
    if let Some(p) = &opts.progress {
        p(received, true);
    }
    Ok(stats)
}

/// The state of one receive between packets.
struct Receiving<'a> {
    opts: &'a ReceiveOptions,
    /// Packet bytes so far (for progress).
    received: u64,
    /// The entries received so far (entry `id` is `listing[id]`).
    listing: Vec<Stat>,
    validator: Validator,
    /// What the destination held, in listing order, and the first entry not yet merged.
    previous: Vec<Stat>,
    cursor: usize,
    /// The last previous entry deleted (its descendants go with it).
    last_deleted: Option<String>,
    /// Requested files whose data has not ended yet.
    pending: HashSet<u32>,
    /// Listing positions of the hardlinks to make once all data arrived.
    hardlinks: Vec<usize>,
    /// Directories (by path) whose entries were changed: their mtimes are restored at the end.
    touched: BTreeSet<String>,
    stats: ReceiveStats,
    atx: mpsc::Sender<Apply>,
}

impl Receiving<'_> {
    async fn next<S>(&mut self, incoming: &mut S) -> Result<Packet, Error>
    where
        S: Stream<Item = Result<Packet, Error>> + Unpin + Send,
    {
        let pkt = next_packet(incoming).await?;
        self.received += packet_size(&pkt);
        if let Some(p) = &self.opts.progress {
            p(self.received, false);
        }
        Ok(pkt)
    }

    /// Reads until the end of the listing, applying each entry as it arrives.
    async fn listing<S>(&mut self, incoming: &mut S) -> Result<(), Error>
    where
        S: Stream<Item = Result<Packet, Error>> + Unpin + Send,
    {
        loop {
            match self.next(incoming).await? {
                Packet::Stat(Some(st)) => self.entry(st).await?,
                Packet::Stat(None) => {
                    // Whatever the destination still holds after the last entry is gone.
                    while self.cursor < self.previous.len() {
                        self.delete_previous().await?;
                    }
                    return Ok(());
                }
                pkt @ Packet::Data { .. } => self.data_packet(pkt).await?,
                other => return Err(unexpected(other, "before the end of the listing")),
            }
        }
    }

    /// Reads until every requested file has arrived.
    async fn data<S>(&mut self, incoming: &mut S) -> Result<(), Error>
    where
        S: Stream<Item = Result<Packet, Error>> + Unpin + Send,
    {
        while !self.pending.is_empty() {
            match self.next(incoming).await? {
                pkt @ Packet::Data { .. } => self.data_packet(pkt).await?,
                other => return Err(unexpected(other, "while receiving file data")),
            }
        }
        Ok(())
    }

    async fn apply(&self, cmd: Apply) -> Result<(), Error> {
        self.atx.send(cmd).await.map_err(|_| writer_gone())
    }

    async fn data_packet(&mut self, pkt: Packet) -> Result<(), Error> {
        let Packet::Data { id, data } = pkt else {
            unreachable!("called with DATA only")
        };
        if !self.pending.contains(&id) {
            return Err(Error::protocol(format!("invalid file request {id}")));
        }
        if data.is_empty() {
            self.pending.remove(&id);
            self.apply(Apply::FileDone { id }).await
        } else {
            self.apply(Apply::Chunk { id, data }).await
        }
    }

    /// Deletes `previous[cursor]` (unless below a deleted directory) and moves past it.
    async fn delete_previous(&mut self) -> Result<(), Error> {
        let path = std::mem::take(&mut self.previous[self.cursor].path);
        self.cursor += 1;
        if self
            .last_deleted
            .as_deref()
            .is_some_and(|d| is_below(&path, d))
        {
            return Ok(());
        }
        self.touch_parent(&path);
        self.stats.deleted += 1;
        self.last_deleted = Some(path.clone());
        self.apply(Apply::Delete(path)).await
    }

    fn touch_parent(&mut self, path: &str) {
        if let Some((dir, _)) = path.rsplit_once('/') {
            if !self.touched.contains(dir) {
                self.touched.insert(dir.to_string());
            }
        }
    }

    /// One listing entry: validated, merged with the previous entries, applied if it differs.
    async fn entry(&mut self, st: Stat) -> Result<(), Error> {
        self.validator.check(&st, &self.listing)?;
        let id = self.listing.len();
        while self.cursor < self.previous.len()
            && compare_path(&self.previous[self.cursor].path, &st.path) == std::cmp::Ordering::Less
        {
            self.delete_previous().await?;
        }
        let mut replaces_dir = false;
        if self.cursor < self.previous.len() && self.previous[self.cursor].path == st.path {
            let old = &self.previous[self.cursor];
            self.cursor += 1;
            if !self.opts.differ_none && same_file(old, &st) {
                self.listing.push(st);
                return Ok(());
            }
            replaces_dir = old.is_dir() && !st.is_dir();
        }
        self.stats.changed += 1;
        self.touch_parent(&st.path);
        if replaces_dir {
            // The old directory and everything below it go before the new entry takes its
            // place; its previous descendants, next in line, are skipped as deleted.
            self.last_deleted = Some(st.path.clone());
            self.apply(Apply::Delete(st.path.clone())).await?;
        }
        if st.is_hardlink() {
            self.hardlinks.push(id);
        } else {
            match st.kind() {
                FileKind::Regular | FileKind::Irregular => {
                    self.pending.insert(id as u32);
                    self.stats.files_requested += 1;
                    self.apply(Apply::File {
                        id: id as u32,
                        stat: st.clone(),
                    })
                    .await?;
                }
                kind => {
                    if kind == FileKind::Dir {
                        // Its own mtime is set now; changes below it would move it again.
                        self.touched.insert(st.path.clone());
                    }
                    self.apply(Apply::Entry(st.clone())).await?;
                }
            }
        }
        self.listing.push(st);
        Ok(())
    }
}

/// Whether `path` is strictly below directory `dir`.
fn is_below(path: &str, dir: &str) -> bool {
    path.len() > dir.len() && path.starts_with(dir) && path.as_bytes()[dir.len()] == b'/'
}

fn unexpected(p: Packet, when: &str) -> Error {
    match p {
        Packet::Err(message) => Error::Remote {
            peer: "sender",
            message,
        },
        other => Error::protocol(format!(
            "unexpected {} packet {when}",
            crate::send::packet_kind(&other)
        )),
    }
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

/// A change for the applier thread.
enum Apply {
    /// Remove this previous entry and everything below it.
    Delete(String),
    /// Create or update a directory, symlink, device or fifo.
    Entry(Stat),
    /// Create the temporary file of requested entry `id`, then request it.
    File { id: u32, stat: Stat },
    /// Content of file `id`.
    Chunk { id: u32, data: Bytes },
    /// File `id` is complete: give it its metadata and rename it into place.
    FileDone { id: u32 },
}

#[derive(Debug)]
struct PendingFile {
    rel: String,
    tmp_name: String,
    stat: Stat,
}

/// Runs the changes of one receive in order; returns the content bytes written.
fn run_applier(
    root: &Root,
    mut rx: mpsc::Receiver<Apply>,
    reqs: mpsc::UnboundedSender<u32>,
    mut stale_state: Option<PathBuf>,
) -> Result<u64, Error> {
    let mut files: HashMap<u32, (PendingFile, Option<std::fs::File>)> = HashMap::new();
    let mut written = 0u64;
    while let Some(cmd) = rx.blocking_recv() {
        if let Some(path) = stale_state.take() {
            // From here on the destination no longer matches the listing in the state file.
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove", path, e)),
            }
        }
        match cmd {
            Apply::Delete(rel) => root.remove_all(&rel)?,
            Apply::Entry(st) => root.create_entry(&st)?,
            Apply::File { id, stat } => {
                let tmp_name = root.create_tmp_file(&stat)?;
                let pf = PendingFile {
                    rel: stat.path.clone(),
                    tmp_name,
                    stat,
                };
                files.insert(id, (pf, None));
                // The request task ends only after this thread (abort after the receive).
                let _ = reqs.send(id);
            }
            Apply::Chunk { id, data } => {
                let Some((pf, f)) = files.get_mut(&id) else {
                    return Err(Error::protocol(format!("invalid file request {id}")));
                };
                if f.is_none() {
                    *f = Some(root.open_tmp_for_write(pf)?);
                }
                let f = f.as_mut().expect("opened above");
                f.write_all(&data)
                    .map_err(|e| Error::io("write", root.display(&pf.rel), e))?;
                written += data.len() as u64;
            }
            Apply::FileDone { id } => {
                let Some((pf, f)) = files.remove(&id) else {
                    return Err(Error::protocol(format!("invalid file request {id}")));
                };
                root.finish_file(&pf, f)?;
            }
        }
    }
    Ok(written)
}

/// The locked destination and what it held before this receive.
struct Prepared {
    root: Arc<Root>,
    previous: Vec<Stat>,
    state_reused: bool,
}

fn prepare(dest: &Path, merge: bool, state: Option<&Path>) -> Result<Prepared, Error> {
    std::fs::create_dir_all(dest).map_err(|e| Error::io("mkdir", dest, e))?;
    let root = Arc::new(Root::open(dest)?);
    if merge {
        return Ok(Prepared {
            root,
            previous: Vec::new(),
            state_reused: false,
        });
    }
    if let Some(path) = state {
        match read_state_file(path, &root) {
            Ok(Some(previous)) => {
                return Ok(Prepared {
                    root,
                    previous,
                    state_reused: true,
                })
            }
            Ok(None) => {}
            Err(reason) => {
                tracing::debug!(state = %path.display(), %reason, "walking the destination");
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io("remove", path, e)),
                }
            }
        }
    }
    let mut previous = Vec::new();
    walk(
        dest,
        &WalkOptions::default(),
        &mut |_| MapResult::Keep,
        &mut |st| {
            previous.push(st);
            Ok(())
        },
    )?;
    Ok(Prepared {
        root,
        previous,
        state_reused: false,
    })
}

/// First line of a state file.
const STATE_MAGIC: &[u8] = b"berth.fsutil.receive-state.v1\n";

/// What identifies the destination's root directory as a receive left it: device, inode and
/// change time (any entry created, renamed or removed directly in it, or a change of its own
/// metadata, moves the change time; a directory replaced by another has another inode).
fn root_identity(root: &Root) -> Result<[i64; 4], Error> {
    let st = rustix::fs::fstat(&root.fd).map_err(errno("stat", root.path.clone()))?;
    Ok([
        st.st_dev as i64,
        st.st_ino as i64,
        st.st_ctime as i64,
        st.st_ctime_nsec as i64,
    ])
}

/// The listing in the state file at `path`: `Ok(None)` when there is none, `Err(reason)` when
/// it cannot be trusted.
///
/// Layout (hand-written, as small as the data: the entries are the wire's `fsutil.types.Stat`
/// messages, so no second encoding of a stat exists): [`STATE_MAGIC`], the root identity as four
/// little-endian `i64`, the entry count as a little-endian `u64`, then each entry as a
/// length-delimited protobuf `Stat`.
fn read_state_file(path: &Path, root: &Root) -> Result<Option<Vec<Stat>>, String> {
    use prost::Message as _;
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("read: {e}")),
    };
    let mut buf = data
        .strip_prefix(STATE_MAGIC)
        .ok_or("not a receive state file")?;
    let mut word = || -> Result<[u8; 8], String> {
        let (w, rest) = buf.split_first_chunk::<8>().ok_or("truncated header")?;
        buf = rest;
        Ok(*w)
    };
    let mut identity = [0i64; 4];
    for v in &mut identity {
        *v = i64::from_le_bytes(word()?);
    }
    let count = u64::from_le_bytes(word()?);
    let now = root_identity(root).map_err(|e| crate::error_chain(&e))?;
    if identity != now {
        return Err("the destination changed since the state was written".into());
    }
    let mut listing = Vec::with_capacity(count.min(1 << 20) as usize);
    for _ in 0..count {
        let st = protos::fsutil::types::Stat::decode_length_delimited(&mut buf)
            .map_err(|e| format!("entry {}: {e}", listing.len()))?;
        listing.push(Stat::from(st));
    }
    if !buf.is_empty() {
        return Err("trailing bytes".into());
    }
    Ok(Some(listing))
}

/// Writes `listing` as the state of the destination `root` (temporary file + rename: a reader
/// sees the old file, none, or the new one).
fn write_state_file(path: &Path, root: &Root, listing: &[Stat]) -> Result<(), Error> {
    use prost::Message as _;
    let mut data = Vec::with_capacity(STATE_MAGIC.len() + 40 + listing.len() * 48);
    data.extend_from_slice(STATE_MAGIC);
    for v in root_identity(root)? {
        data.extend_from_slice(&v.to_le_bytes());
    }
    data.extend_from_slice(&(listing.len() as u64).to_le_bytes());
    for st in listing {
        protos::fsutil::types::Stat::from(st.clone())
            .encode_length_delimited(&mut data)
            .expect("a Vec grows as needed");
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, &data).map_err(|e| Error::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io("rename", path, e))
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

/// Checks listing order, cleanliness and hardlink targets, without allocating per entry.
///
/// Invariant: every accepted entry sorts after the previous one in [`compare_path`] order
/// (siblings strictly increasing, a directory before its contents), so the accepted entries form
/// a sorted list in which a hardlink's target is found by binary search.
#[derive(Default)]
struct Validator {
    /// Stack of (listed directory, last child name seen); the bottom is the root `""`.
    parents: Vec<(String, String)>,
}

impl Validator {
    /// Checks `st`, to come after the entries `earlier` (all accepted by this validator).
    fn check(&mut self, st: &Stat, earlier: &[Stat]) -> Result<(), Error> {
        let p = st.path.as_str();
        if p.starts_with('/') {
            return Err(Error::protocol(format!("absolute path {p:?}")));
        }
        if p == ".." || p.starts_with("../") {
            return Err(Error::protocol(format!(
                "path escapes the destination: {p:?}"
            )));
        }
        // Clean in Go's sense (`path.Clean(p) == p`) and not the root: no empty, `.` or `..`
        // component.
        if p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            return Err(Error::protocol(format!("unclean path {p:?}")));
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
        // Back up to the parent of this entry. What remains on top is the root or a directory
        // that was listed (only listed directories are pushed), so a parent that is not on the
        // stack was never listed, or the entry is out of order.
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
        if st.is_hardlink() {
            let target = earlier
                .binary_search_by(|e| compare_path(&e.path, &st.linkname))
                .ok()
                .map(|i| &earlier[i]);
            if target.is_none_or(|t| t.is_dir()) {
                return Err(Error::protocol(format!(
                    "invalid hardlink {p:?} to {:?}",
                    st.linkname
                )));
            }
        }
        top.1.clear();
        top.1.push_str(base);
        if st.is_dir() {
            self.parents.push((p.to_string(), String::new()));
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

    /// Feeds `list` to a fresh validator, keeping the accepted entries as the receiver does.
    fn validate(list: &[Stat]) -> Result<(), Error> {
        let mut v = Validator::default();
        let mut accepted: Vec<Stat> = vec![];
        for s in list {
            v.check(s, &accepted)?;
            accepted.push(s.clone());
        }
        Ok(())
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
        let stats =
            |list: &[(&str, u32)]| -> Vec<Stat> { list.iter().map(|(p, m)| st(p, *m)).collect() };
        for list in ok {
            validate(&stats(list)).unwrap_or_else(|e| panic!("{list:?}: {e}"));
        }
        let bad: &[&[(&str, u32)]] = &[
            &[("b", 0o644), ("a", 0o644)],
            &[("a", 0o644), ("a", 0o644)],
            &[("a/b", 0o644)],
            &[("a", 0o644), ("a/b", 0o644)],
            &[("../x", 0o644)],
            &[("..", 0o644)],
            &[("/etc/passwd", 0o644)],
            &[("a/./b", 0o644)],
            &[(".", D)],
            &[("", 0o644)],
            &[("a//b", 0o644)],
            &[("a/", 0o644)],
            &[("a", D), ("a/../../x", 0o644)],
            &[("a-b", 0o644), ("a", D), ("a/x", 0o644)],
        ];
        for list in bad {
            assert!(
                validate(&stats(list)).is_err(),
                "{list:?} should be rejected"
            );
        }
        let hardlink = |p: &str, target: &str| {
            let mut hl = st(p, 0o644);
            hl.linkname = target.into();
            hl
        };
        // A hardlink names an earlier non-directory entry, anywhere in the listing so far.
        let good = [
            st("a", D),
            st("a/f", 0o644),
            st("b", 0o644),
            hardlink("c", "a/f"),
            hardlink("d", "c"),
        ];
        validate(&good).unwrap();
        for bad in [
            vec![hardlink("b", "nope")],
            vec![st("a", D), hardlink("b", "a")],
            vec![st("a", 0o644), hardlink("b", "c")],
            vec![hardlink("a", "a")],
        ] {
            assert!(validate(&bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
