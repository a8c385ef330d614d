//! The sender role: list a directory tree and serve the file contents the receiver asks for.
//!
//! Follows `tonistiigi/fsutil` `send.go`: every walked entry is sent as `STAT` (entries numbered
//! from 0 in send order), regular files are remembered by number, an empty `STAT` ends the
//! listing. Concurrently, `REQ{id}` queues a file (each id at most once); up to four files are
//! streamed at a time as `DATA` chunks of at most 32 KiB, each file ended by an empty `DATA`.
//! `FIN` from the receiver is answered with `FIN` once every queued file is fully sent.

use crate::walk::{walk, MapResult, WalkOptions};
use crate::{Error, Packet, Stat};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Size of one `DATA` chunk.
pub const CHUNK_SIZE: usize = 32 * 1024;
const PARALLEL_FILES: usize = 4;

/// A stat rewrite applied to every sent entry (e.g. uid/gid mapping).
pub type MapFn = Arc<dyn Fn(&mut Stat) -> MapResult + Send + Sync>;
/// Progress callback: total bytes of content sent so far, and whether this is the last call.
pub type ProgressFn = Arc<dyn Fn(u64, bool) + Send + Sync>;

/// Options of [`send`].
#[derive(Default, Clone)]
pub struct SendOptions {
    /// Include/exclude/follow filters.
    pub walk: WalkOptions,
    /// Optional per-entry rewrite.
    pub map: Option<MapFn>,
    /// Optional progress callback.
    pub progress: Option<ProgressFn>,
}

impl std::fmt::Debug for SendOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendOptions")
            .field("walk", &self.walk)
            .finish_non_exhaustive()
    }
}

/// Runs the sender for the tree at `root`.
///
/// Outgoing packets go to `out`; packets from the receiver come from `incoming`. Returns after the
/// `FIN` reply was queued; dropping `out` then half-closes the transport.
pub async fn send<S>(
    root: PathBuf,
    opts: SendOptions,
    out: mpsc::Sender<Packet>,
    incoming: S,
) -> Result<(), Error>
where
    S: Stream<Item = Result<Packet, Error>> + Unpin + Send,
{
    let files: Files = Arc::default();
    let walker = {
        let files = files.clone();
        let out = out.clone();
        let root = root.clone();
        let opts = opts.clone();
        tokio::task::spawn_blocking(move || -> Result<(), Error> {
            let mut next_id: u32 = 0;
            let mut map = |st: &mut Stat| match &opts.map {
                Some(m) => m(st),
                None => MapResult::Keep,
            };
            let res = walk(&root, &opts.walk, &mut map, &mut |st: Stat| {
                if st.can_request_data() {
                    let full = root.join(&st.path);
                    files.lock().unwrap().insert(next_id, Source::Path(full));
                }
                next_id += 1;
                out.blocking_send(Packet::Stat(Some(st)))
                    .map_err(|_| transport_closed())
            });
            match res {
                Ok(()) => out
                    .blocking_send(Packet::Stat(None))
                    .map_err(|_| transport_closed()),
                Err(e) => {
                    let _ = out.blocking_send(Packet::Err(e.to_string()));
                    Err(e)
                }
            }
        })
    };
    serve(files, walker, opts.progress, out, incoming).await
}

/// Where the content of a sent entry comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// No content (directories, symlinks, devices, hardlink entries).
    None,
    /// A file on disk, opened without following a final symlink.
    Path(PathBuf),
    /// Bytes held by the sender (small generated files).
    Data(Bytes),
}

/// One entry of a tree given as a list ([`send_entries`]).
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its stat (path relative to the tree's root).
    pub stat: Stat,
    /// Its content.
    pub content: Source,
}

/// Runs the sender for a tree given as `entries`, already in fsutil's walk order (parents
/// before children, paths sorted component by component), e.g. several directories merged
/// under prefixes with generated files. Only `opts.progress` is used.
pub async fn send_entries<S>(
    entries: Vec<Entry>,
    opts: SendOptions,
    out: mpsc::Sender<Packet>,
    incoming: S,
) -> Result<(), Error>
where
    S: Stream<Item = Result<Packet, Error>> + Unpin + Send,
{
    let files: Files = Arc::default();
    let walker = {
        let files = files.clone();
        let out = out.clone();
        tokio::task::spawn_blocking(move || -> Result<(), Error> {
            for (id, e) in entries.into_iter().enumerate() {
                if e.stat.can_request_data() && !matches!(e.content, Source::None) {
                    files.lock().unwrap().insert(id as u32, e.content);
                }
                out.blocking_send(Packet::Stat(Some(e.stat)))
                    .map_err(|_| transport_closed())?;
            }
            out.blocking_send(Packet::Stat(None))
                .map_err(|_| transport_closed())
        })
    };
    serve(files, walker, opts.progress, out, incoming).await
}

/// Content sources of the listed files by entry number.
type Files = Arc<Mutex<HashMap<u32, Source>>>;

/// Serves the receiver's requests for `files` while `walker` lists the tree.
async fn serve<S>(
    files: Files,
    walker: tokio::task::JoinHandle<Result<(), Error>>,
    progress: Option<ProgressFn>,
    out: mpsc::Sender<Packet>,
    mut incoming: S,
) -> Result<(), Error>
where
    S: Stream<Item = Result<Packet, Error>> + Unpin + Send,
{
    let sent_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    tokio::pin!(walker);
    let mut walker_done = false;
    let semaphore = Arc::new(tokio::sync::Semaphore::new(PARALLEL_FILES));
    let mut tasks = tokio::task::JoinSet::new();

    let result = loop {
        tokio::select! {
            res = &mut walker, if !walker_done => {
                walker_done = true;
                match res {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Err(e),
                    Err(e) => break Err(Error::Transport { message: format!("walker task failed: {e}") }),
                }
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                match done {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Err(e),
                    Err(e) => break Err(Error::Transport { message: format!("file task failed: {e}") }),
                }
            }
            pkt = incoming.next() => {
                match pkt {
                    None => break Err(Error::Transport { message: "receiver closed the stream before FIN".into() }),
                    Some(Err(e)) => break Err(e),
                    Some(Ok(Packet::Err(message))) => break Err(Error::Remote { peer: "receiver", message }),
                    Some(Ok(Packet::Req { id })) => {
                        let source = files.lock().unwrap().remove(&id);
                        let Some(source) = source else {
                            break Err(Error::protocol(format!("invalid file id {id}")));
                        };
                        let permit = semaphore.clone().acquire_owned().await.map_err(|_| transport_closed());
                        let permit = match permit { Ok(p) => p, Err(e) => break Err(e) };
                        let out = out.clone();
                        let sent_bytes = sent_bytes.clone();
                        let progress = progress.clone();
                        tasks.spawn(async move {
                            let _permit = permit;
                            send_file(id, source, out, sent_bytes, progress).await
                        });
                    }
                    Some(Ok(Packet::Fin)) => {
                        while let Some(done) = tasks.join_next().await {
                            match done {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => return Err(e),
                                Err(e) => return Err(Error::Transport { message: format!("file task failed: {e}") }),
                            }
                        }
                        if !walker_done {
                            match (&mut walker).await {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => return Err(e),
                                Err(e) => return Err(Error::Transport { message: format!("walker task failed: {e}") }),
                            }
                        }
                        break out.send(Packet::Fin).await.map_err(|_| transport_closed());
                    }
                    Some(Ok(other)) => {
                        tracing::debug!(packet = ?packet_kind(&other), "sender ignores unexpected packet");
                    }
                }
            }
        }
    };
    if let Some(p) = &progress {
        p(sent_bytes.load(std::sync::atomic::Ordering::Relaxed), true);
    }
    if let Err(e) = &result {
        if !matches!(e, Error::Remote { .. } | Error::Transport { .. }) {
            let _ = out.try_send(Packet::Err(e.to_string()));
        }
    }
    result
}

async fn send_file(
    id: u32,
    source: Source,
    out: mpsc::Sender<Packet>,
    sent: Arc<std::sync::atomic::AtomicU64>,
    progress: Option<ProgressFn>,
) -> Result<(), Error> {
    // Reading happens on a blocking thread; chunks are handed to the async transport.
    let (tx, mut rx) = mpsc::channel::<Result<Bytes, Error>>(4);
    let full = match source {
        Source::Path(p) => p,
        Source::Data(b) => {
            for start in (0..b.len()).step_by(CHUNK_SIZE) {
                let data = b.slice(start..(start + CHUNK_SIZE).min(b.len()));
                let n = data.len() as u64;
                out.send(Packet::Data { id, data })
                    .await
                    .map_err(|_| transport_closed())?;
                let total = sent.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
                if let Some(p) = &progress {
                    p(total, false);
                }
            }
            PathBuf::new()
        }
        Source::None => PathBuf::new(),
    };
    let reader = tokio::task::spawn_blocking(move || {
        if full.as_os_str().is_empty() {
            return;
        }
        let mut f = match open_nofollow(&full) {
            Ok(f) => f,
            Err(e) => {
                // Upstream sends an empty file when the entry vanished; keep that behaviour.
                tracing::debug!(path = %full.display(), error = %e, "file to send cannot be opened");
                return;
            }
        };
        loop {
            let mut buf = vec![0u8; CHUNK_SIZE];
            match f.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    let _ = tx.blocking_send(Err(Error::io("read", full.clone(), source)));
                    return;
                }
            }
        }
    });
    while let Some(chunk) = rx.recv().await {
        let data = chunk?;
        let n = data.len() as u64;
        out.send(Packet::Data { id, data })
            .await
            .map_err(|_| transport_closed())?;
        let total = sent.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        if let Some(p) = &progress {
            p(total, false);
        }
    }
    let _ = reader.await;
    out.send(Packet::Data {
        id,
        data: Bytes::new(),
    })
    .await
    .map_err(|_| transport_closed())
}

fn open_nofollow(p: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(p)
}

fn transport_closed() -> Error {
    Error::Transport {
        message: "peer closed the stream".into(),
    }
}

pub(crate) fn packet_kind(p: &Packet) -> &'static str {
    match p {
        Packet::Stat(_) => "STAT",
        Packet::Req { .. } => "REQ",
        Packet::Data { .. } => "DATA",
        Packet::Fin => "FIN",
        Packet::Err(_) => "ERR",
    }
}
