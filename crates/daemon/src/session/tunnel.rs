//! `Control.Session`: the byte tunnel and the HTTP/2 client connection running inside it.
//!
//! Inbound `BytesMessage` payloads are written into one end of an in-memory duplex pipe, whose
//! other end hyper's HTTP/2 client uses as its transport; what hyper writes is read back and sent
//! out as `BytesMessage`s (≤ 64 KiB each). Message boundaries carry no meaning.
//!
//! EOF handling (`session.md` §1): when the client half-closes, the pipe's write side is shut
//! down, hyper sees EOF and ends the connection, the pipe is dropped, the outbound pump reads EOF
//! and the response stream ends, so the RPC finishes with OK. Closing the session from our side
//! (shutdown, failed health checks) drops the connection the same way.

use super::{channel::SessionChannel, Session, SessionManager};
use crate::errors::Error;
use bytes::Bytes;
use futures::StreamExt;
use protos::moby::buildkit::v1::BytesMessage;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// Header names on the `Session` call.
pub const HDR_UUID: &str = "x-docker-expose-session-uuid";
/// Session name header.
pub const HDR_NAME: &str = "x-docker-expose-session-name";
/// Shared key header.
pub const HDR_SHAREDKEY: &str = "x-docker-expose-session-sharedkey";
/// Multi-valued list of served methods.
pub const HDR_METHOD: &str = "x-docker-expose-session-grpc-method";

const OUT_CHUNK: usize = 64 * 1024;
const HEALTH_METHOD: &str = "/grpc.health.v1.Health/Check";

/// The response stream type of `Control.Session`.
pub type SessionStream = futures::stream::BoxStream<'static, Result<BytesMessage, tonic::Status>>;

/// Serves one `Control.Session` call.
pub async fn serve(
    manager: Arc<SessionManager>,
    req: tonic::Request<tonic::Streaming<BytesMessage>>,
) -> Result<SessionStream, Error> {
    let md = req.metadata();
    let get = |k: &str| {
        md.get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .unwrap_or_default()
    };
    let id = get(HDR_UUID);
    if id.is_empty() {
        return Err(Error::invalid(format!(
            "session request without {HDR_UUID} header"
        )));
    }
    let name = get(HDR_NAME);
    let shared_key = get(HDR_SHAREDKEY);
    let methods: HashSet<String> = md
        .get_all(HDR_METHOD)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|m| m.trim().to_ascii_lowercase())
        .filter(|m| !m.is_empty())
        .collect();
    let mut inbound = req.into_inner();

    let (client_io, server_io) = tokio::io::duplex(256 * 1024);
    let (mut pipe_read, mut pipe_write) = tokio::io::split(server_io);

    // inbound BytesMessages -> pipe
    let pump_in = tokio::spawn(async move {
        while let Some(msg) = inbound.next().await {
            match msg {
                Ok(m) => {
                    if m.data.is_empty() {
                        continue;
                    }
                    if pipe_write.write_all(&m.data).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "session inbound stream failed");
                    break;
                }
            }
        }
        let _ = pipe_write.shutdown().await;
    });

    // pipe -> outbound BytesMessages
    let (out_tx, out_rx) = mpsc::channel::<Result<BytesMessage, tonic::Status>>(16);
    let pump_out = tokio::spawn(async move {
        let mut buf = vec![0u8; OUT_CHUNK];
        loop {
            match pipe_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let msg = BytesMessage {
                        data: Bytes::copy_from_slice(&buf[..n]),
                    };
                    if out_tx.send(Ok(msg)).await.is_err() {
                        break;
                    }
                }
            }
        }
    });

    let (sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .initial_stream_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(8 * 1024 * 1024)
            .max_frame_size(1 << 20)
            .handshake::<_, tonic::body::Body>(hyper_util::rt::TokioIo::new(client_io))
            .await
            .map_err(|e| Error::unavailable(format!("session {id}: http/2 handshake: {e}")))?;

    let closed = CancellationToken::new();
    let session = Arc::new(Session {
        id: id.clone(),
        name,
        shared_key,
        methods,
        channel: SessionChannel::new(sender),
        closed: closed.clone(),
    });
    tracing::debug!(session = %id, methods = ?session.methods, "session connected");
    manager.insert(session.clone());

    // connection driver: ends on EOF/error or when the session is closed from our side
    {
        let manager = manager.clone();
        let session = session.clone();
        let shutdown = manager.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                res = conn => {
                    if let Err(e) = res {
                        tracing::debug!(session = %session.id, error = %e, "session connection ended with error");
                    }
                }
                _ = session.closed.cancelled() => {}
                _ = shutdown.cancelled() => {}
            }
            session.closed.cancel();
            manager.remove(&session.id, &session);
            pump_in.abort();
            tracing::debug!(session = %session.id, "session closed");
            // pump_out ends by itself once the pipe's other end is dropped (done above by
            // dropping `conn`); give it a moment to flush, then make sure it is gone.
            let _ = tokio::time::timeout(Duration::from_secs(2), pump_out).await;
        });
    }

    if session.supports(HEALTH_METHOD) {
        tokio::spawn(health_monitor(session.clone()));
    }

    Ok(ReceiverStream::new(out_rx).boxed())
}

/// Calls `Health/Check` every 5 s; three failures in a row close the session.
async fn health_monitor(session: Arc<Session>) {
    let mut failures = 0;
    loop {
        tokio::select! {
            _ = session.closed.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        let res = tokio::time::timeout(
            Duration::from_secs(30),
            super::calls::health_check(&session),
        )
        .await;
        match res {
            Ok(Ok(())) => failures = 0,
            Ok(Err(e)) => {
                failures += 1;
                tracing::debug!(session = %session.id, error = %e, failures, "session health check failed");
            }
            Err(_) => {
                failures += 1;
                tracing::debug!(session = %session.id, failures, "session health check timed out");
            }
        }
        if failures >= 3 {
            tracing::warn!(session = %session.id, "session unhealthy, closing");
            session.closed.cancel();
            return;
        }
    }
}
