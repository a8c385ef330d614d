//! An in-process client session: `local://NAME` directories served by fsutil's DiffCopy sender
//! into the worker's receiver over in-memory channels (the protocol code berthd uses, without
//! gRPC framing or a socket).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;
use worker::{ErrorKind, LocalDiffer, LocalSync, SessionProvider, TransferProgress};

/// Serves named directories of this machine.
pub struct DirSession(pub HashMap<String, PathBuf>);

impl DirSession {
    /// A session serving `dir` as `local://name`.
    pub fn with(name: &str, dir: &Path) -> Self {
        DirSession(HashMap::from([(name.to_string(), dir.to_path_buf())]))
    }
}

fn err(
    kind: ErrorKind,
    what: &str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> worker::Error {
    worker::Error::session(kind, what.to_string(), Some(Box::new(e)))
}

#[async_trait::async_trait]
impl SessionProvider for DirSession {
    async fn sync_local(
        &self,
        req: &LocalSync,
        dest: &Path,
        progress: &TransferProgress,
    ) -> worker::Result<worker::SyncStats> {
        let Some(src) = self.0.get(&req.name).cloned() else {
            return Err(worker::Error::session(
                ErrorKind::NotFound,
                format!("no local directory {:?}", req.name),
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
        .map_err(|e| err(ErrorKind::Unavailable, "receive", e))?;
        sender
            .await
            .map_err(|e| err(ErrorKind::Internal, "sender task", e))?
            .map_err(|e| err(ErrorKind::Unavailable, "send", e))?;
        progress.report(stats.bytes_written);
        Ok(worker::SyncStats {
            bytes: stats.bytes_written,
            unchanged: stats.unchanged(),
        })
    }
}
