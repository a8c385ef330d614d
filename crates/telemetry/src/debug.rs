//! The `--debugaddr` HTTP server (plain HTTP/1.1, opt-in; who may connect is decided by the
//! address it listens on, as with buildkitd's debug handlers).
//!
//! | path | answers |
//! |---|---|
//! | `GET /metrics` | Prometheus text exposition (format 0.0.4) of every metric in [`crate::metrics`] |
//! | `GET /healthz` | `200 ok` while the daemon serves |
//! | `GET /debug/state` | JSON: running jobs, sessions, pins, snapshots, leases and mounts held |
//!
//! Each answer is cheap: the state comes from in-memory tables and one read of the snapshot
//! store's metadata; nothing calls the Docker Engine. A request taking longer than
//! [`REQUEST_TIMEOUT`] is answered `503`, so a stuck provider never hangs a scraper.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::{Error, Result};

/// Longest time one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the daemon knows about itself, for the debug server.
pub trait DebugState: Send + Sync + 'static {
    /// Sets the state gauges (jobs, sessions, snapshots, leases, mounts) before a scrape.
    fn refresh_gauges(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// The runtime state as JSON.
    fn state(&self) -> Pin<Box<dyn Future<Output = serde_json::Value> + Send + '_>>;
}

/// A bound debug server; [`DebugServer::serve`] runs it.
pub struct DebugServer {
    listener: tokio::net::TcpListener,
    metrics: Option<PrometheusHandle>,
    state: Arc<dyn DebugState>,
}

impl DebugServer {
    /// Binds `addr` (`host:port`; a `tcp://` prefix is accepted).
    pub async fn bind(
        addr: &str,
        metrics: Option<PrometheusHandle>,
        state: Arc<dyn DebugState>,
    ) -> Result<Self> {
        let a = addr.strip_prefix("tcp://").unwrap_or(addr);
        let listener =
            tokio::net::TcpListener::bind(a)
                .await
                .map_err(|source| Error::DebugListen {
                    addr: addr.to_string(),
                    source,
                })?;
        Ok(DebugServer {
            listener,
            metrics,
            state,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes; connections in flight are dropped then.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let inner = Arc::new(Inner {
            metrics: self.metrics,
            state: self.state,
        });
        if let Some(h) = inner.metrics.clone() {
            // Histograms keep samples until drained; drain them even when nobody scrapes.
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    h.run_upkeep();
                }
            });
        }
        let mut conns = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                r = self.listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "debug server: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            };
            let inner = inner.clone();
            conns.spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let inner = inner.clone();
                    async move { Ok::<_, Infallible>(inner.handle(req).await) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .header_read_timeout(REQUEST_TIMEOUT)
                    .timer(hyper_util::rt::TokioTimer::new())
                    .serve_connection(io, svc)
                    .await
                {
                    tracing::debug!(%peer, error = %e, "debug server connection ended");
                }
            });
        }
        conns.abort_all();
    }
}

struct Inner {
    metrics: Option<PrometheusHandle>,
    state: Arc<dyn DebugState>,
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("static response parts")
}

impl Inner {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "method not allowed\n",
            );
        }
        let work = async {
            match req.uri().path() {
                "/metrics" => match &self.metrics {
                    Some(h) => {
                        self.state.refresh_gauges().await;
                        h.run_upkeep();
                        reply(
                            StatusCode::OK,
                            "text/plain; version=0.0.4; charset=utf-8",
                            h.render(),
                        )
                    }
                    None => reply(StatusCode::NOT_FOUND, "text/plain", "metrics are off\n"),
                },
                "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
                "/debug/state" => {
                    let v = self.state.state().await;
                    let mut body = serde_json::to_vec_pretty(&v).unwrap_or_default();
                    body.push(b'\n');
                    reply(StatusCode::OK, "application/json", body)
                }
                _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
            }
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "timed out gathering the answer\n",
            ),
        }
    }
}
