//! The worker's [`worker::SessionProvider`] for one job, on top of this daemon's sessions.
//!
//! Local sources go to the session named by `local.session` (or the job's session) through
//! `FileSync/DiffCopy`; secrets and registry credentials go to the job's session. Errors carry
//! the worker's [`worker::ErrorKind`] so the gRPC code comes out right.

use super::calls::{self, LocalSyncRequest};
use super::SessionManager;
use crate::errors::Error as DaemonError;
use async_trait::async_trait;
use std::path::Path;
use std::sync::Arc;
use worker::{Credentials, ErrorKind, LocalDiffer, LocalSync, TransferProgress};

/// Session access for one job.
pub struct JobSession {
    sessions: Arc<SessionManager>,
    default_session: String,
}

impl JobSession {
    /// Access for a job whose own session is `default_session`.
    pub fn new(sessions: Arc<SessionManager>, default_session: String) -> Self {
        JobSession {
            sessions,
            default_session,
        }
    }

    async fn session(&self, id: Option<&str>, what: &str) -> worker::Result<Arc<super::Session>> {
        let id = id
            .filter(|s| !s.is_empty())
            .unwrap_or(&self.default_session);
        if id.is_empty() {
            return Err(worker::Error::session(
                ErrorKind::Unavailable,
                format!("{what}: the build has no session"),
                None,
            ));
        }
        self.sessions.get(id).await.map_err(|e| to_worker(what, e))
    }
}

fn kind_of(code: tonic::Code) -> ErrorKind {
    match code {
        tonic::Code::InvalidArgument => ErrorKind::InvalidArgument,
        tonic::Code::NotFound => ErrorKind::NotFound,
        tonic::Code::Unavailable => ErrorKind::Unavailable,
        tonic::Code::Cancelled => ErrorKind::Canceled,
        tonic::Code::PermissionDenied => ErrorKind::PermissionDenied,
        tonic::Code::Unimplemented => ErrorKind::Unimplemented,
        _ => ErrorKind::Internal,
    }
}

fn to_worker(what: &str, e: DaemonError) -> worker::Error {
    let kind = kind_of(e.code());
    // The worker shows `what` (vertex errors do not print sources), so the cause goes into it.
    worker::Error::session(kind, format!("{what}: {e}"), None)
}

#[async_trait]
impl worker::SessionProvider for JobSession {
    async fn sync_local(
        &self,
        req: &LocalSync,
        dest: &Path,
        progress: &TransferProgress,
    ) -> worker::Result<u64> {
        let what = format!("sync local {:?}", req.name);
        let session = self.session(req.session_id.as_deref(), &what).await?;
        let sync = LocalSyncRequest {
            name: req.name.clone(),
            include_patterns: req.include_patterns.clone(),
            exclude_patterns: req.exclude_patterns.clone(),
            follow_paths: req.follow_paths.clone(),
            differ_none: req.differ == LocalDiffer::None,
        };
        // TransferProgress is borrowed; forward byte counts through a channel.
        let (tx, mut rx) = tokio::sync::watch::channel(0u64);
        let cb: fsutil::receive::ProgressFn = Arc::new(move |n: u64, _last: bool| {
            let _ = tx.send(n);
        });
        let fut = calls::sync_local(&session, &sync, dest.to_path_buf(), Some(cb));
        tokio::pin!(fut);
        let stats = loop {
            tokio::select! {
                r = &mut fut => break r,
                changed = rx.changed() => {
                    if changed.is_ok() {
                        progress.report(*rx.borrow());
                    }
                }
            }
        }
        .map_err(|e| to_worker(&what, e))?;
        progress.report(*rx.borrow());
        Ok(stats.bytes_written)
    }

    async fn get_secret(&self, id: &str) -> worker::Result<Option<Vec<u8>>> {
        let what = format!("secret {id:?}");
        let session = self.session(None, &what).await?;
        calls::get_secret(&session, id)
            .await
            .map(|o| o.map(|b| b.to_vec()))
            .map_err(|e| to_worker(&what, e))
    }

    async fn registry_credentials(&self, host: &str) -> worker::Result<Option<Credentials>> {
        let what = format!("credentials for {host}");
        let session = self.session(None, &what).await?;
        calls::credentials(&session, host)
            .await
            .map(|o| o.map(|(username, secret)| Credentials { username, secret }))
            .map_err(|e| to_worker(&what, e))
    }
}
