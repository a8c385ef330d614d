//! A stand-in for an OpenTelemetry collector: an OTLP/gRPC trace receiver on 127.0.0.1 that
//! decodes each export request, counts its spans and keeps each span's name and duration by trace (what a collector does before it forwards
//! them), so scenario 7 measures berthd with a real exporter at work.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use opentelemetry_proto::tonic::collector::trace::v1 as otlp;

/// Span name and duration (ns) of every span received, by trace id.
pub type SpansByTrace = HashMap<Vec<u8>, Vec<(String, u64)>>;

struct Counting(Arc<AtomicU64>, Arc<Mutex<SpansByTrace>>);

#[tonic::async_trait]
impl otlp::trace_service_server::TraceService for Counting {
    async fn export(
        &self,
        request: tonic::Request<otlp::ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<otlp::ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(n as u64, Ordering::Relaxed);
        let mut by_trace = self.1.lock().unwrap();
        for s in request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
        {
            by_trace.entry(s.trace_id.clone()).or_default().push((
                s.name.clone(),
                s.end_time_unix_nano.saturating_sub(s.start_time_unix_nano),
            ));
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

/// The running receiver; stops when dropped.
pub struct Collector {
    /// `host:port` it listens on.
    pub addr: String,
    spans: Arc<AtomicU64>,
    by_trace: Arc<Mutex<SpansByTrace>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    /// Starts a receiver on a free 127.0.0.1 port.
    pub async fn start() -> Result<Collector> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let spans = Arc::new(AtomicU64::new(0));
        let by_trace = Arc::new(Mutex::new(HashMap::new()));
        let svc = otlp::trace_service_server::TraceServiceServer::new(Counting(
            spans.clone(),
            by_trace.clone(),
        ));
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        Ok(Collector {
            addr,
            spans,
            by_trace,
            task,
        })
    }

    /// Spans received so far.
    pub fn spans(&self) -> u64 {
        self.spans.load(Ordering::Relaxed)
    }

    /// The names and durations of the spans received so far, by trace id.
    pub fn spans_by_trace(&self) -> SpansByTrace {
        self.by_trace.lock().unwrap().clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}
