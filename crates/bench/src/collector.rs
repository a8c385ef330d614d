//! A stand-in for an OpenTelemetry collector: an OTLP/gRPC trace receiver on 127.0.0.1 that
//! decodes each export request and counts its spans (what a collector does before it forwards
//! them), so scenario 7 measures berthd with a real exporter at work.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Result;
use opentelemetry_proto::tonic::collector::trace::v1 as otlp;

struct Counting(Arc<AtomicU64>);

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
        Ok(tonic::Response::new(Default::default()))
    }
}

/// The running receiver; stops when dropped.
pub struct Collector {
    /// `host:port` it listens on.
    pub addr: String,
    spans: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    /// Starts a receiver on a free 127.0.0.1 port.
    pub async fn start() -> Result<Collector> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let spans = Arc::new(AtomicU64::new(0));
        let svc = otlp::trace_service_server::TraceServiceServer::new(Counting(spans.clone()));
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        Ok(Collector { addr, spans, task })
    }

    /// Spans received so far.
    pub fn spans(&self) -> u64 {
        self.spans.load(Ordering::Relaxed)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}
