//! The worker's [`worker::SessionProvider`] for one job, on top of this daemon's sessions.
//!
//! Local sources go to the session named by `local.session` (or the job's session) through
//! `FileSync/DiffCopy`; `oci-layout://` sources read the content store the client serves
//! (`oci.session`, else the job's session); secrets, registry credentials, SSH agents and
//! uploads (`http://buildkit-session/…` sources) go to the job's session.
//! Each SSH agent connection is one `SSH/ForwardAgent` stream, bridged to an in-memory duplex
//! pipe that the worker copies to and from the exec's socket. Errors carry
//! the worker's [`worker::ErrorKind`] so the gRPC code comes out right.

use super::calls::{self, LocalSyncRequest};
use super::content::SessionContentStore;
use super::SessionManager;
use crate::errors::Error as DaemonError;
use async_trait::async_trait;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument as _;
use worker::{Credentials, ErrorKind, LocalDiffer, LocalSync, SshAgentConn, TransferProgress};

/// Least time between two transfer progress reports of one local sync (buildkitd's limit).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Buffer of the in-memory pipe between the worker and one `ForwardAgent` stream.
const SSH_PIPE_BUFFER: usize = 64 * 1024;

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

/// A content store failure; the store's messages already name the store and the digest
/// (remotecache's errors are text only: the kind is read from the words).
fn content_err(e: remotecache::Error) -> worker::Error {
    let msg = e.to_string();
    let kind = if msg.contains("does not serve the content store") {
        ErrorKind::Unimplemented
    } else if msg.contains("not found") {
        ErrorKind::NotFound
    } else {
        ErrorKind::Unavailable
    };
    worker::Error::session(kind, msg, None)
}

fn to_worker(what: &str, e: DaemonError) -> worker::Error {
    let kind = kind_of(e.code());
    // The worker shows `what` (vertex errors do not print sources), so the cause goes into it.
    worker::Error::session(kind, format!("{what}: {}", e.full_message()), None)
}

#[async_trait]
impl worker::SessionProvider for JobSession {
    async fn sync_local(
        &self,
        req: &LocalSync,
        dest: &Path,
        progress: &TransferProgress,
    ) -> worker::Result<worker::SyncStats> {
        let what = format!("sync local {:?}", req.name);
        let session = self.session(req.session_id.as_deref(), &what).await?;
        let sync = LocalSyncRequest {
            name: req.name.clone(),
            include_patterns: req.include_patterns.clone(),
            exclude_patterns: req.exclude_patterns.clone(),
            follow_paths: req.follow_paths.clone(),
            differ_none: req.differ == LocalDiffer::None,
            state: req.receive_state.clone(),
        };
        // The receiver calls back once per packet, so the callback only stores the count; it is
        // reported at most every PROGRESS_INTERVAL (and once at the end), as buildkitd
        // rate-limits its transfer status to one per 100 ms. A report per packet cost a wake-up,
        // a status event and a Status message to the client per STAT of a no-op listing.
        let received = Arc::new(AtomicU64::new(0));
        let cb: fsutil::receive::ProgressFn = {
            let received = received.clone();
            Arc::new(move |n: u64, _last: bool| received.store(n, Ordering::Relaxed))
        };
        let span = tracing::debug_span!(
            "local.sync",
            name = %req.name,
            bytes = tracing::field::Empty,
            changed = tracing::field::Empty,
            state_reused = tracing::field::Empty,
            progress_reports = tracing::field::Empty
        );
        let fut = calls::sync_local(&session, &sync, dest.to_path_buf(), Some(cb))
            .instrument(span.clone());
        tokio::pin!(fut);
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut reported, mut reports) = (0u64, 0u32);
        let stats = loop {
            tokio::select! {
                r = &mut fut => break r,
                _ = tick.tick() => {
                    let n = received.load(Ordering::Relaxed);
                    if n != reported {
                        reported = n;
                        reports += 1;
                        progress.report(n);
                    }
                }
            }
        }
        .map_err(|e| to_worker(&what, e))?;
        progress.report(received.load(Ordering::Relaxed));
        span.record("progress_reports", reports + 1);
        span.record("bytes", stats.bytes_written);
        span.record("changed", stats.changed);
        span.record("state_reused", stats.state_reused);
        crate::observe::local_bytes(stats.bytes_written);
        Ok(worker::SyncStats {
            bytes: stats.bytes_written,
            unchanged: stats.unchanged(),
        })
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

    async fn registry_token(
        &self,
        req: &registry::TokenRequest,
    ) -> worker::Result<Option<registry::Token>> {
        let what = format!("token for {}", req.host);
        let session = self.session(None, &what).await?;
        calls::fetch_token(&session, req)
            .await
            .map_err(|e| to_worker(&what, e))
    }

    async fn check_ssh_agent(&self, id: &str) -> worker::Result<()> {
        let what = format!("ssh agent {id:?}");
        let session = self.session(None, &what).await?;
        if !session.supports(calls::SSH_CHECK) {
            // What buildkitd sees when the client has no SSH attachable (gRPC Unimplemented).
            return Err(worker::Error::session(
                ErrorKind::Unimplemented,
                format!("{what}: the session forwards no SSH agent"),
                None,
            ));
        }
        calls::ssh_check_agent(&session, id)
            .await
            .map_err(|e| to_worker(&what, e))
    }

    async fn content_info(
        &self,
        session: Option<&str>,
        store: &str,
        digest: &str,
    ) -> worker::Result<Option<u64>> {
        use remotecache::ContentStore as _;
        let what = format!("content store {store:?}");
        let session = self.session(session, &what).await?;
        SessionContentStore::new(session, store)
            .info(digest)
            .await
            .map_err(content_err)
    }

    async fn content_read(
        &self,
        session: Option<&str>,
        store: &str,
        digest: &str,
    ) -> worker::Result<Box<dyn std::io::Read + Send>> {
        use remotecache::ContentStore as _;
        let what = format!("content store {store:?}");
        let session = self.session(session, &what).await?;
        SessionContentStore::new(session, store)
            .open(digest)
            .await
            .map_err(content_err)
    }

    async fn upload_pull(&self, host: &str, path: &str) -> worker::Result<worker::UploadStream> {
        use futures::StreamExt as _;
        let what = format!("http://{host}{path}");
        let session = self.session(None, &what).await?;
        let stream = calls::upload_pull(&session, host, path)
            .await
            .map_err(|e| to_worker(&what, e))?;
        Ok(stream
            .map(move |r| r.map_err(|e| to_worker(&what, e)))
            .boxed())
    }

    async fn forward_ssh_agent(&self, id: &str) -> worker::Result<SshAgentConn> {
        use futures::StreamExt as _;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let what = format!("ssh agent {id:?}");
        let session = self.session(None, &what).await?;
        let (tx, mut from_agent) = calls::ssh_forward_agent(&session, id)
            .await
            .map_err(|e| to_worker(&what, e))?;
        let (ours, theirs) = tokio::io::duplex(SSH_PIPE_BUFFER);
        let (mut rd, mut wr) = tokio::io::split(ours);
        // Worker → agent; EOF from the worker half-closes the stream (tx dropped).
        let up = async move {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx
                            .send(bytes::Bytes::copy_from_slice(&buf[..n]))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
        };
        // Agent → worker; the end of the stream shuts the worker's read side.
        let id_owned = id.to_string();
        let down = async move {
            while let Some(chunk) = from_agent.next().await {
                match chunk {
                    Ok(b) => {
                        if wr.write_all(&b).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(ssh_id = %id_owned, error = %e, "ssh agent stream failed");
                        break;
                    }
                }
            }
            let _ = wr.shutdown().await;
        };
        tokio::spawn(async move {
            tokio::join!(up, down);
        });
        Ok(Box::new(theirs))
    }
}
