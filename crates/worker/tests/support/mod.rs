//! Test support for the worker tests: a worker on a temporary root, and a session that serves
//! real client directories through fsutil's DiffCopy sender and receiver (the same protocol
//! code the daemon uses, connected by in-memory channels instead of gRPC).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use worker::{
    LocalDiffer, LocalSync, ProgressEvent, ProgressSink, SessionProvider, SolveContext, SolvedRef,
    TransferProgress, Worker, WorkerOptions,
};

/// Fails loudly when not root (overlay mounts and chown need it).
pub fn require_root() {
    assert!(
        rustix_is_root(),
        "these tests need root (overlayfs mounts, chown); run them as root"
    );
}

fn rustix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// A session whose local directories are real directories on this machine.
#[derive(Default)]
pub struct DirSession {
    pub dirs: HashMap<String, PathBuf>,
    pub syncs: AtomicUsize,
    pub requests: Mutex<Vec<LocalSync>>,
}

impl DirSession {
    pub fn with(name: &str, dir: &Path) -> Arc<Self> {
        let mut s = DirSession::default();
        s.dirs.insert(name.to_string(), dir.to_path_buf());
        Arc::new(s)
    }
}

#[async_trait::async_trait]
impl SessionProvider for DirSession {
    async fn sync_local(
        &self,
        req: &LocalSync,
        dest: &Path,
        progress: &TransferProgress,
    ) -> worker::Result<worker::SyncStats> {
        self.syncs.fetch_add(1, Ordering::SeqCst);
        self.requests.lock().unwrap().push(req.clone());
        let Some(src) = self.dirs.get(&req.name).cloned() else {
            return Err(worker::Error::session(
                worker::ErrorKind::NotFound,
                format!("no access allowed to dir {:?}", req.name),
                None,
            ));
        };
        let (to_recv_tx, to_recv_rx) = tokio::sync::mpsc::channel(64);
        let (to_send_tx, to_send_rx) = tokio::sync::mpsc::channel(64);
        let send_opts = fsutil::SendOptions {
            walk: fsutil::walk::WalkOptions {
                include_patterns: req.include_patterns.clone(),
                exclude_patterns: req.exclude_patterns.clone(),
                follow_paths: req.follow_paths.clone(),
            },
            ..Default::default()
        };
        let sender = tokio::spawn(fsutil::send(
            src,
            send_opts,
            to_recv_tx,
            ReceiverStream::new(to_send_rx).map(Ok),
        ));
        let recv_opts = fsutil::ReceiveOptions {
            differ_none: req.differ == LocalDiffer::None,
            state: req.receive_state.clone(),
            ..Default::default()
        };
        let stats = fsutil::receive(
            dest.to_path_buf(),
            recv_opts,
            to_send_tx,
            ReceiverStream::new(to_recv_rx).map(Ok),
        )
        .await
        .map_err(|e| {
            worker::Error::session(worker::ErrorKind::Unavailable, "receive", Some(Box::new(e)))
        })?;
        sender
            .await
            .map_err(|e| {
                worker::Error::session(
                    worker::ErrorKind::Internal,
                    "sender task",
                    Some(Box::new(e)),
                )
            })?
            .map_err(|e| {
                worker::Error::session(worker::ErrorKind::Unavailable, "send", Some(Box::new(e)))
            })?;
        progress.report(stats.bytes_written);
        Ok(worker::SyncStats {
            bytes: stats.bytes_written,
            unchanged: stats.unchanged(),
        })
    }
}

/// A worker on a fresh temporary root.
pub struct TestWorker {
    pub worker: Worker,
    pub root: tempfile::TempDir,
}

impl TestWorker {
    pub fn new() -> Result<Self> {
        require_root();
        let root = tempfile::Builder::new()
            .prefix("berth-worker-test-")
            .tempdir_in("/var/tmp")?;
        let mut opts = WorkerOptions::new(root.path());
        opts.max_parallelism = 4;
        let worker = Worker::new(opts).context("opening worker")?;
        Ok(TestWorker { worker, root })
    }
}

/// What one solve did.
pub struct Solve {
    pub result: worker::Result<SolvedRef>,
    pub events: Vec<ProgressEvent>,
}

impl Solve {
    pub fn ok(&self) -> &SolvedRef {
        match &self.result {
            Ok(r) => r,
            Err(e) => panic!("solve failed: {e}"),
        }
    }

    pub fn err(&self) -> &worker::Error {
        match &self.result {
            Ok(_) => panic!("solve succeeded but an error was expected"),
            Err(e) => e,
        }
    }

    /// `(name, cached)` of every completed vertex, in completion order.
    pub fn completed(&self) -> Vec<(String, bool)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                ProgressEvent::VertexCompleted {
                    name,
                    cached,
                    error: None,
                    ..
                } => Some((name.clone(), *cached)),
                _ => None,
            })
            .collect()
    }

    /// Names of vertices that executed (completed, not cached).
    pub fn executed(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .completed()
            .into_iter()
            .filter(|(_, c)| !c)
            .map(|(n, _)| n)
            .collect();
        v.sort();
        v
    }
}

pub async fn solve_def(
    w: &Worker,
    def: protos::pb::Definition,
    session: Arc<dyn SessionProvider>,
) -> Solve {
    let (sink, mut rx) = ProgressSink::channel();
    let ctx = SolveContext::new("test-build", session, sink, CancellationToken::new());
    let result = w.solve(def, ctx).await;
    let mut events = vec![];
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    // Progress invariant: every started vertex completes exactly once.
    let started = events
        .iter()
        .filter(|e| matches!(e, ProgressEvent::VertexStarted { .. }))
        .count();
    let completed = events
        .iter()
        .filter(|e| matches!(e, ProgressEvent::VertexCompleted { .. }))
        .count();
    assert_eq!(
        started, completed,
        "every started vertex completes: {events:#?}"
    );
    Solve { result, events }
}

pub async fn solve(w: &Worker, st: &llb::State, session: Arc<dyn SessionProvider>) -> Solve {
    solve_def(w, st.marshal().expect("marshal"), session).await
}

/// Reads a file of a result (None if absent).
pub async fn read(r: &SolvedRef, path: &str) -> Result<Option<String>> {
    let m = r.mount().await?;
    let p = m.path().join(path.trim_start_matches('/'));
    match std::fs::read_to_string(&p) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// `lstat` of a path in a result.
pub async fn meta(r: &SolvedRef, path: &str) -> Result<Option<std::fs::Metadata>> {
    let m = r.mount().await?;
    let p = m.path().join(path.trim_start_matches('/'));
    match std::fs::symlink_metadata(&p) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("stat {}", p.display())),
    }
}

/// Sorted listing of a directory in a result.
pub async fn list(r: &SolvedRef, path: &str) -> Result<Vec<String>> {
    let m = r.mount().await?;
    let p = m.path().join(path.trim_start_matches('/'));
    let mut v: Vec<String> = std::fs::read_dir(&p)
        .with_context(|| format!("listing {}", p.display()))?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    Ok(v)
}

pub fn no_session() -> Arc<dyn SessionProvider> {
    Arc::new(worker::NoSession)
}
