//! Docker Engine API clients whose requests are counted and traced.
//!
//! Every Docker call berth makes (image inspect and load, tags, base-image pins, `/info`) goes
//! through a `bollard::Docker`. With metrics or traces on, [`connect`] gives one whose transport
//! wraps each HTTP request: it opens a `docker.api` span (`http.method`, the path without its
//! query) under the caller's current span, counts the request in
//! [`DOCKER_REQUESTS`](crate::metrics::DOCKER_REQUESTS), and counts failures (4xx/5xx answers,
//! no answer) in [`DOCKER_ERRORS`](crate::metrics::DOCKER_ERRORS). The transport itself is the
//! same hyper client bollard builds for a unix socket or TCP address (no pooled idle
//! connections, bollard's request timeout on top). With both off, [`connect`] returns bollard's
//! own client, untouched.
//!
//! Errors reported inside a 200 answer (a `docker load` progress stream) are invisible here; the
//! exporter counts those itself.

use std::sync::atomic::Ordering;

use bollard::{BollardRequest, ClientVersion, Docker};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::Instrument as _;

/// A client for `host` (`unix:///path`, a bare socket path, `tcp://h:p` or `http://h:p`) with a
/// request timeout of `timeout_secs`.
pub fn connect(
    host: &str,
    timeout_secs: u64,
    version: &ClientVersion,
) -> Result<Docker, bollard::errors::Error> {
    let tcp = host
        .strip_prefix("tcp://")
        .or_else(|| host.strip_prefix("http://"));
    if !crate::INSTRUMENT_DOCKER.load(Ordering::Relaxed) {
        return match tcp {
            Some(a) => Docker::connect_with_http(&format!("http://{a}"), timeout_secs, version),
            None => Docker::connect_with_unix(host, timeout_secs, version),
        };
    }
    match tcp {
        Some(a) => {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_max_idle_per_host(0);
            let client = b.build(hyper_util::client::legacy::connect::HttpConnector::new());
            Docker::connect_with_custom_transport(
                move |req: BollardRequest| {
                    let client = client.clone();
                    instrumented(req, move |req| async move {
                        client
                            .request(req)
                            .await
                            .map_err(bollard::errors::Error::from)
                    })
                },
                Some(format!("http://{a}")),
                timeout_secs,
                version,
            )
        }
        None => {
            let path = std::path::PathBuf::from(host.strip_prefix("unix://").unwrap_or(host));
            if !path.exists() {
                return Err(bollard::errors::Error::SocketNotFoundError(
                    path.display().to_string(),
                ));
            }
            let connector = tower_service_fn(path);
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_max_idle_per_host(0);
            let client = b.build(connector);
            Docker::connect_with_custom_transport(
                move |req: BollardRequest| {
                    let client = client.clone();
                    instrumented(req, move |req| async move {
                        client
                            .request(req)
                            .await
                            .map_err(bollard::errors::Error::from)
                    })
                },
                Some("http://docker.sock"),
                timeout_secs,
                version,
            )
        }
    }
}

/// A connector that dials the unix socket at `path` whatever the URI says.
#[derive(Clone)]
struct UnixConnector(std::sync::Arc<std::path::PathBuf>);

fn tower_service_fn(path: std::path::PathBuf) -> UnixConnector {
    UnixConnector(std::sync::Arc::new(path))
}

impl tower_service::Service<http::Uri> for UnixConnector {
    type Response = TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let p = self.0.clone();
        Box::pin(async move { Ok(TokioIo::new(tokio::net::UnixStream::connect(&*p).await?)) })
    }
}

/// The `endpoint` label of a Docker API path: its first segment after the optional `/vX.Y`
/// version prefix, from a fixed set (anything else is `other`).
pub fn endpoint(path: &str) -> &'static str {
    let mut segs = path.trim_start_matches('/').split('/');
    let mut first = segs.next().unwrap_or("");
    if first.starts_with('v') && first[1..].chars().all(|c| c.is_ascii_digit() || c == '.') {
        first = segs.next().unwrap_or("");
    }
    crate::metrics::bounded(
        first,
        &[
            "_ping",
            "info",
            "version",
            "images",
            "containers",
            "distribution",
            "volumes",
            "networks",
            "build",
            "system",
            "events",
            "plugins",
            "exec",
        ],
    )
}

fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        _ => "other",
    }
}

async fn instrumented<F, Fut>(
    req: BollardRequest,
    send: F,
) -> Result<http::Response<hyper::body::Incoming>, bollard::errors::Error>
where
    F: FnOnce(BollardRequest) -> Fut,
    Fut: std::future::Future<
        Output = Result<http::Response<hyper::body::Incoming>, bollard::errors::Error>,
    >,
{
    let method = method_label(req.method());
    let path = req.uri().path().to_string();
    let ep = endpoint(&path);
    let span = tracing::debug_span!(
        "docker.api",
        otel.name = %format_args!("docker {method} {ep}"),
        otel.kind = "client",
        http.method = method,
        http.path = %path,
        http.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    ::metrics::counter!(crate::metrics::DOCKER_REQUESTS, "method" => method, "endpoint" => ep)
        .increment(1);
    let res = send(req).instrument(span.clone()).await;
    let kind = match &res {
        Ok(r) => {
            span.record("http.status_code", r.status().as_u16());
            if r.status().is_client_error() {
                Some("client")
            } else if r.status().is_server_error() {
                Some("server")
            } else {
                None
            }
        }
        Err(_) => Some("transport"),
    };
    if let Some(kind) = kind {
        span.record("otel.status_code", "ERROR");
        ::metrics::counter!(
            crate::metrics::DOCKER_ERRORS,
            "method" => method,
            "endpoint" => ep,
            "kind" => kind
        )
        .increment(1);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_labels() {
        for (path, want) in [
            ("/v1.41/images/sha256:abc/json", "images"),
            ("/images/load", "images"),
            ("/v1.49/containers/create", "containers"),
            ("/_ping", "_ping"),
            ("/v1.41/info", "info"),
            ("/v1.41/secret-thing/x", "other"),
            ("/", "other"),
        ] {
            assert_eq!(endpoint(path), want, "{path}");
        }
    }
}
