//! OpenTelemetry traces: the exporter chosen by the `OTEL_*` environment the way buildkitd
//! v0.11.6 chooses it (`util/tracing/detect`), and W3C trace context taken from gRPC metadata.
//!
//! Environment (buildkitd's rules):
//! * `OTEL_TRACES_EXPORTER`: `otlp` turns tracing on, `none` keeps it off, anything else is an
//!   error at start;
//! * without it, tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set;
//! * `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, else `OTEL_EXPORTER_OTLP_PROTOCOL`: `grpc` (the
//!   default, as in buildkitd) or `http/protobuf`;
//! * endpoint, headers, timeout and compression variables are read by `opentelemetry-otlp`;
//!   `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` by the SDK's resource detectors.
//!
//! Trace context: buildctl and buildx send `traceparent` (and `tracestate`, `baggage`) in the
//! gRPC metadata of every call made under a traced context — buildctl v0.11.6 whenever its own
//! context carries a span, e.g. from `TRACEPARENT` in its environment or its own OTLP exporter.
//! [`grpc_request_span`] opens one span per request, parented on that context, and tonic runs
//! the handler inside it, so every span of the request (solve, vertices, exports, Docker calls)
//! lands in the client's trace.
//!
//! Which spans are exported: spans of berth's own crates down to `debug` level, and events of
//! `info` and above as span events; other crates' spans (h2, hyper, tonic) are not.

use opentelemetry::propagation::{Extractor, TextMapCompositePropagator, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_otlp::WithTonicConfig as _;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;

use crate::{Error, Result};

/// Crates whose spans are exported (their tracing targets start with these names).
const OWN_TARGETS: &[&str] = &[
    "berthd",
    "daemon",
    "worker",
    "exporter",
    "layerstore",
    "executor",
    "fsutil",
    "frontend",
    "telemetry",
];

/// The transport of OTLP spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP over gRPC (tonic).
    Grpc,
    /// OTLP over HTTP with protobuf bodies.
    HttpProtobuf,
}

/// Reads the `OTEL_*` variables through `var`: `None` when tracing stays off.
pub fn detect(var: impl Fn(&str) -> Option<String>) -> Result<Option<Protocol>> {
    let get = |k: &str| var(k).filter(|v| !v.is_empty());
    match get("OTEL_TRACES_EXPORTER").as_deref() {
        Some("none") => return Ok(None),
        Some("otlp") => {}
        Some(other) => return Err(Error::TracesExporter(other.to_string())),
        None => {
            if get("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
                && get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
            {
                return Ok(None);
            }
        }
    }
    let proto = get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| get("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "grpc".into());
    match proto.as_str() {
        "grpc" => Ok(Some(Protocol::Grpc)),
        "http/protobuf" => Ok(Some(Protocol::HttpProtobuf)),
        other => Err(Error::OtlpProtocol(other.to_string())),
    }
}

/// TLS of the OTLP/gRPC exporter, from the OpenTelemetry exporter variables (the traces-specific
/// one first): `OTEL_EXPORTER_OTLP_(TRACES_)CERTIFICATE` (PEM CA certificates that verify the
/// collector), `OTEL_EXPORTER_OTLP_(TRACES_)CLIENT_CERTIFICATE` and `…CLIENT_KEY` (PEM, mutual
/// TLS). Used when the endpoint is `https://` or one of them is set; without a CA file the
/// system's roots verify the collector. `None`: plaintext (an `http://` endpoint).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct GrpcTls {
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

pub(crate) fn grpc_tls(var: impl Fn(&str) -> Option<String>) -> Result<Option<GrpcTls>> {
    let get = |k: &str| {
        var(&format!("OTEL_EXPORTER_OTLP_TRACES_{k}"))
            .filter(|v| !v.is_empty())
            .or_else(|| var(&format!("OTEL_EXPORTER_OTLP_{k}")).filter(|v| !v.is_empty()))
    };
    let tls = GrpcTls {
        ca: get("CERTIFICATE"),
        cert: get("CLIENT_CERTIFICATE"),
        key: get("CLIENT_KEY"),
    };
    if tls.cert.is_some() != tls.key.is_some() {
        return Err(Error::OtlpTls(
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY go together"
                .into(),
        ));
    }
    let https = get("ENDPOINT")
        .is_some_and(|e| e.trim_start().to_ascii_lowercase().starts_with("https://"));
    if https || tls != GrpcTls::default() {
        Ok(Some(tls))
    } else {
        Ok(None)
    }
}

impl GrpcTls {
    fn config(&self) -> Result<opentelemetry_otlp::tonic_types::transport::ClientTlsConfig> {
        use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig, Identity};
        let read = |p: &str| std::fs::read(p).map_err(|e| Error::OtlpTls(format!("read {p}: {e}")));
        let mut c = ClientTlsConfig::new();
        c = match &self.ca {
            Some(ca) => c.ca_certificate(Certificate::from_pem(read(ca)?)),
            None => c.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            c = c.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(c)
    }
}

/// The tracer provider the environment asks for, or `None`.
pub(crate) fn provider_from_env(
    service_name: &str,
    service_version: &str,
) -> Result<Option<SdkTracerProvider>> {
    let Some(proto) = detect(|k| std::env::var(k).ok())? else {
        return Ok(None);
    };
    let exporter = match proto {
        Protocol::Grpc => {
            let mut b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            if let Some(tls) = grpc_tls(|k| std::env::var(k).ok())? {
                b = b.with_tls_config(tls.config()?);
            }
            b.build()
        }
        Protocol::HttpProtobuf if grpc_tls(|k| std::env::var(k).ok())?.is_some() => {
            return Err(Error::OtlpTls(
                "https and certificates need OTEL_EXPORTER_OTLP_PROTOCOL=grpc: berthd sends \
                 http/protobuf over plain HTTP only"
                    .into(),
            ))
        }
        Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build(),
    }
    .map_err(Error::OtlpExporter)?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service_name.to_string());
    }
    let resource = resource
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            service_version.to_string(),
        ))
        .build();
    // The batch processor runs on the daemon's tokio runtime: both OTLP clients (tonic and
    // hyper) need a reactor, which the SDK's default thread-based processor does not have.
    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource)
            .build(),
    ))
}

/// The propagator of incoming context: W3C trace context and baggage, like buildkitd's.
fn propagator() -> TextMapCompositePropagator {
    TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ])
}

/// Makes `p` the global provider (for code that asks `opentelemetry::global`).
pub(crate) fn set_global(p: SdkTracerProvider) {
    opentelemetry::global::set_tracer_provider(p);
}

/// The subscriber layer that turns berth's spans into OpenTelemetry spans.
pub(crate) fn layer<S>(p: &SdkTracerProvider) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    let tracer = p.tracer("berthd");
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_threads(false)
        .with_filter(tracing_subscriber::filter::filter_fn(exported))
        .boxed()
}

/// Spans of berth's crates down to `debug`; events at `info` and above (as span events).
fn exported(meta: &tracing::Metadata<'_>) -> bool {
    let own = OWN_TARGETS.iter().any(|t| {
        meta.target()
            .strip_prefix(t)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    });
    if meta.is_span() {
        own && *meta.level() <= tracing::Level::DEBUG
    } else {
        own && *meta.level() <= tracing::Level::INFO
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The trace context a client sent in the metadata of a gRPC request (empty when it sent none).
pub fn extract(headers: &http::HeaderMap) -> opentelemetry::Context {
    propagator().extract(&HeaderExtractor(headers))
}

/// The span of one gRPC request: named after the method (`moby.buildkit.v1.Control/Solve`),
/// parented on the client's trace context.
pub fn grpc_request_span(req: &http::Request<()>) -> tracing::Span {
    let path = req.uri().path().trim_start_matches('/');
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    let span = tracing::info_span!(
        "grpc.request",
        otel.name = %path,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
    );
    let _ = span.set_parent(extract(req.headers()));
    span
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt as _;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    type Case<'a> = (&'a [(&'a str, &'a str)], Option<Protocol>);

    #[test]
    fn exporter_detection_follows_buildkitd() {
        let cases: &[Case<'_>] = &[
            (&[], None),
            (&[("OTEL_TRACES_EXPORTER", "none")], None),
            (
                &[
                    ("OTEL_TRACES_EXPORTER", "none"),
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x:4317"),
                ],
                None,
            ),
            (&[("OTEL_TRACES_EXPORTER", "otlp")], Some(Protocol::Grpc)),
            (
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x:4317")],
                Some(Protocol::Grpc),
            ),
            (
                &[
                    (
                        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                        "http://x:4318/v1/traces",
                    ),
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ],
                Some(Protocol::HttpProtobuf),
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x"),
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                    ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
                ],
                Some(Protocol::Grpc),
            ),
        ];
        for (vars, want) in cases {
            assert_eq!(detect(env(vars)).unwrap(), *want, "{vars:?}");
        }
        assert_eq!(
            detect(env(&[("OTEL_TRACES_EXPORTER", "jaeger")]))
                .unwrap_err()
                .to_string(),
            "unsupported opentelemetry tracer jaeger"
        );
        assert_eq!(
            detect(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
            ]))
            .unwrap_err()
            .to_string(),
            "unsupported otlp protocol http/json"
        );
    }

    #[test]
    fn grpc_tls_from_otel_variables() {
        assert_eq!(
            grpc_tls(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")])).unwrap(),
            None
        );
        assert_eq!(
            grpc_tls(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4317")])).unwrap(),
            Some(GrpcTls::default())
        );
        let t = grpc_tls(env(&[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "HTTPS://c:4317"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/ca.pem"),
            ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "/traces-ca.pem"),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/c.pem"),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/k.pem"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(t.ca.as_deref(), Some("/traces-ca.pem"));
        assert_eq!(t.cert.as_deref(), Some("/c.pem"));
        let e = grpc_tls(env(&[("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/c.pem")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("go together"), "{e}");
        let e = grpc_tls(env(&[(
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
            "/nonexistent/ca.pem",
        )]))
        .unwrap()
        .unwrap()
        .config()
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn extracts_w3c_traceparent() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let cx = extract(&h);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_remote());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(!extract(&http::HeaderMap::new())
            .span()
            .span_context()
            .is_valid());
    }

    #[test]
    fn exports_only_own_spans() {
        struct Probe;
        impl tracing::Callsite for Probe {
            fn set_interest(&self, _: tracing::subscriber::Interest) {}
            fn metadata(&self) -> &tracing::Metadata<'_> {
                unreachable!()
            }
        }
        static PROBE: Probe = Probe;
        let meta = |target: &'static str, level, kind| {
            tracing::Metadata::new(
                "x",
                target,
                level,
                None,
                None,
                None,
                tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&PROBE)),
                kind,
            )
        };
        use tracing::metadata::Kind;
        use tracing::Level;
        assert!(exported(&meta("worker::solver", Level::DEBUG, Kind::SPAN)));
        assert!(exported(&meta("daemon", Level::INFO, Kind::SPAN)));
        assert!(!exported(&meta("worker::solver", Level::TRACE, Kind::SPAN)));
        assert!(!exported(&meta("workers", Level::INFO, Kind::SPAN)));
        assert!(!exported(&meta("h2::proto", Level::INFO, Kind::SPAN)));
        assert!(!exported(&meta(
            "worker::solver",
            Level::DEBUG,
            Kind::EVENT
        )));
        assert!(exported(&meta("worker::solver", Level::WARN, Kind::EVENT)));
    }
}
