//! berthd's observability: logs (`--log-format text|json`), Prometheus metrics and the debug
//! HTTP server (`--debugaddr`), and OpenTelemetry traces that continue the client's trace.
//!
//! | module | owns |
//! |---|---|
//! | [`metrics`] | metric names, help texts, buckets; the Prometheus recorder |
//! | [`otel`] | the `OTEL_*` environment, the tracer provider, W3C trace context from gRPC metadata |
//! | [`debug`] | the `--debugaddr` HTTP server: `/metrics`, `/healthz`, `/debug/state` |
//! | [`docker`] | Docker Engine API clients whose requests are counted and traced |
//!
//! **Everything is off unless asked for.** Without `--debugaddr` no recorder is installed: the
//! `metrics` macros in the library crates reach the facade's no-op recorder (one atomic load).
//! Without an `OTEL_*` exporter no OpenTelemetry layer exists, tonic gets no per-request span
//! and Docker clients are bollard's own; the spans the code declares at `debug` level are then
//! disabled at their callsite unless `--debug` logging asks for them.
//!
//! **Why the `metrics` facade and `metrics-exporter-prometheus`** (rather than
//! `prometheus-client`): the numbers worth showing are born deep in library crates (a vertex
//! executed or found in the cache in `worker`, a `docker load` retried in `exporter`). With a facade those crates count at the point where
//! the thing happens and depend on nothing but `metrics` (the `log`/`tracing` of metrics: no
//! backend, no registry to thread through their APIs), while the backend and its one recorder
//! live here and are installed only by the binary. `prometheus-client` has no facade: every
//! library would need a registry handle in its options or a dependency on this crate, which
//! would point the dependency arrow the wrong way. The exporter crate is used as a recorder only
//! (no HTTP listener or push gateway features); [`debug`] serves its rendering next to the
//! debug state.
//!
//! The subscriber and the recorder are process-global and set once by [`init`]; library crates
//! only emit (`tracing` spans and events with structured fields, `metrics` counters and gauges).

#![forbid(unsafe_code)]

pub mod debug;
pub mod docker;
pub mod metrics;
pub mod otel;

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

pub use metrics_exporter_prometheus::PrometheusHandle;

/// Errors of setting up telemetry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `--log-format` / `[log] format` names no known format (buildkitd's wording).
    #[error("unsupported log type {0:?}")]
    LogFormat(String),
    /// `OTEL_TRACES_EXPORTER` names an exporter berthd does not have (buildkitd's wording).
    #[error("unsupported opentelemetry tracer {0}")]
    TracesExporter(String),
    /// `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL` is not `grpc` or `http/protobuf`.
    #[error("unsupported otlp protocol {0}")]
    OtlpProtocol(String),
    /// The OTLP exporter could not be built from the environment.
    #[error("build the OTLP span exporter")]
    OtlpExporter(#[source] opentelemetry_otlp::ExporterBuildError),
    /// The OTLP exporter's TLS settings are incomplete or unreadable.
    #[error("otlp tls: {0}")]
    OtlpTls(String),
    /// The metrics recorder could not be built or installed.
    #[error("install the Prometheus recorder: {0}")]
    Recorder(String),
    /// The global tracing subscriber was already set.
    #[error("install the tracing subscriber")]
    Subscriber(#[source] tracing_subscriber::util::TryInitError),
    /// The debug address could not be bound.
    #[error("listen on debug address {addr}")]
    DebugListen {
        /// The address asked for.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Log line format (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = Error;
    /// `text` (or empty) and `json`, as buildkitd accepts them.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "text" | "" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(Error::LogFormat(other.to_string())),
        }
    }
}

/// What [`init`] sets up.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Format of log lines on stderr.
    pub log_format: LogFormat,
    /// `tracing_subscriber::EnvFilter` directives for the log lines (e.g. `info`).
    pub log_filter: String,
    /// Also log one line per closed span with its busy and idle time (for finding where a
    /// build's time goes without a trace collector; only spans the filter enables).
    pub log_span_close: bool,
    /// Install the Prometheus recorder (berthd does when `--debugaddr` is given).
    pub metrics: bool,
    /// `service.name` of the traces unless `OTEL_SERVICE_NAME` says otherwise.
    pub service_name: String,
    /// `service.version` of the traces.
    pub service_version: String,
}

/// Handles to what [`init`] installed.
pub struct Telemetry {
    tracer: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    metrics: Option<PrometheusHandle>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("tracing", &self.tracer.is_some())
            .field("metrics", &self.metrics.is_some())
            .finish()
    }
}

/// Whether Docker clients made by [`docker::connect`] count and trace their requests.
static INSTRUMENT_DOCKER: AtomicBool = AtomicBool::new(false);

/// Installs the global tracing subscriber (log lines, plus OpenTelemetry when the `OTEL_*`
/// environment configures an exporter) and, with `opts.metrics`, the Prometheus recorder.
///
/// Must run inside a tokio runtime: the OTLP exporters and the batch span processor run on it.
pub fn init(opts: &Options) -> Result<Telemetry> {
    let filter = tracing_subscriber::EnvFilter::try_new(&opts.log_filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let span_events = if opts.log_span_close {
        tracing_subscriber::fmt::format::FmtSpan::CLOSE
    } else {
        tracing_subscriber::fmt::format::FmtSpan::NONE
    };
    let fmt = match opts.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_span_events(span_events)
            .with_writer(std::io::stderr)
            // Colours only on a terminal: `docker logs` and log files get plain text.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_span_events(span_events)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let tracer = otel::provider_from_env(&opts.service_name, &opts.service_version)?;
    let otel_layer = tracer.as_ref().map(otel::layer);
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel_layer)
        .try_init()
        .map_err(Error::Subscriber)?;
    let metrics = if opts.metrics {
        Some(crate::metrics::install()?)
    } else {
        None
    };
    if let Some(p) = &tracer {
        otel::set_global(p.clone());
    }
    INSTRUMENT_DOCKER.store(tracer.is_some() || metrics.is_some(), Ordering::Relaxed);
    Ok(Telemetry { tracer, metrics })
}

impl Telemetry {
    /// Whether traces are exported.
    pub fn tracing(&self) -> bool {
        self.tracer.is_some()
    }

    /// The Prometheus recorder's handle, when metrics are on.
    pub fn metrics(&self) -> Option<&PrometheusHandle> {
        self.metrics.as_ref()
    }

    /// The span tonic should open for each gRPC request (continuing the client's trace context),
    /// when traces are exported; `None` leaves tonic without per-request spans.
    pub fn grpc_trace_fn(&self) -> Option<fn(&http::Request<()>) -> tracing::Span> {
        self.tracer.as_ref().map(|_| otel::grpc_request_span as _)
    }

    /// Flushes and stops the span exporter (waits at most for the exporter's own timeout).
    pub fn shutdown(self) {
        if let Some(p) = self.tracer {
            if let Err(e) = p.shutdown() {
                tracing::warn!(error = %e, "flushing traces failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats_parse_like_buildkitd() {
        assert_eq!("text".parse::<LogFormat>().unwrap(), LogFormat::Text);
        assert_eq!("".parse::<LogFormat>().unwrap(), LogFormat::Text);
        assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert_eq!(
            "xml".parse::<LogFormat>().unwrap_err().to_string(),
            "unsupported log type \"xml\""
        );
    }
}
