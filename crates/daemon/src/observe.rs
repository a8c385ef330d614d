//! The daemon's side of `telemetry`: label values of builds, the metrics it records itself, and
//! the runtime state the `--debugaddr` server shows ([`State`]).
//!
//! Labels are bounded here (see `telemetry::metrics`): a client-chosen frontend or exporter name
//! becomes `other`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use telemetry::metrics as m;

use crate::jobs::Jobs;
use crate::session::SessionManager;

/// The `frontend` and `exporter` labels of one build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildLabels {
    /// `llb` (definition in the request), `client` (a client-side frontend through LLBBridge,
    /// buildctl's and buildx's forwarder flow), or the frontend name.
    pub frontend: &'static str,
    /// The exporter type, `none` without one.
    pub exporter: &'static str,
}

impl BuildLabels {
    /// Labels of a solve request with exporter type `exporter`.
    pub fn of(has_definition: bool, frontend: &str, exporter: &str) -> Self {
        let frontend = if has_definition {
            "llb"
        } else if frontend.is_empty() {
            "client"
        } else {
            m::bounded(frontend, &["dockerfile.v0", "gateway.v0"])
        };
        let exporter = if exporter.is_empty() {
            "none"
        } else {
            m::bounded(
                exporter,
                &["image", "moby", "docker", "oci", "local", "tar"],
            )
        };
        BuildLabels { frontend, exporter }
    }

    /// Counts a build start.
    pub fn started(&self) {
        metrics::counter!(m::BUILDS_STARTED, "frontend" => self.frontend, "exporter" => self.exporter)
            .increment(1);
    }

    /// Counts a build end: success, or failure with the gRPC code the client gets.
    pub fn ended(&self, failure: Option<tonic::Code>) {
        match failure {
            None => metrics::counter!(
                m::BUILDS_FINISHED,
                "frontend" => self.frontend,
                "exporter" => self.exporter
            )
            .increment(1),
            Some(code) => metrics::counter!(
                m::BUILDS_FAILED,
                "frontend" => self.frontend,
                "exporter" => self.exporter,
                "code" => code_name(code)
            )
            .increment(1),
        }
    }

    /// Records how long the solve took.
    pub fn solved(&self, took: Duration) {
        metrics::histogram!(m::SOLVE_DURATION, "frontend" => self.frontend).record(took);
    }

    /// Records how long the export took.
    pub fn exported(&self, took: Duration) {
        metrics::histogram!(m::EXPORT_DURATION, "exporter" => self.exporter).record(took);
    }
}

/// Counts what an export did with its layers (`mode`: the image exporter's target mode from
/// [`image_mode`], or `docker`/`docker-thin` for `type=docker`).
pub fn export_layers(
    mode: &'static str,
    layers_sent: usize,
    bytes_sent: u64,
    layers_skipped: usize,
    bytes_skipped: u64,
) {
    metrics::counter!(m::EXPORT_LAYERS_REGISTERED, "mode" => mode).increment(layers_sent as u64);
    metrics::counter!(m::EXPORT_BYTES_REGISTERED, "mode" => mode).increment(bytes_sent);
    metrics::counter!(m::EXPORT_LAYERS_SKIPPED, "mode" => mode).increment(layers_skipped as u64);
    metrics::counter!(m::EXPORT_BYTES_SKIPPED, "mode" => mode).increment(bytes_skipped);
}

/// The `mode` label of an image export: `classic-live`, `classic-offline` or `containerd`.
pub fn image_mode(t: &exporter::ImageTarget) -> &'static str {
    match t {
        exporter::ImageTarget::ClassicLive { .. } => "classic-live",
        exporter::ImageTarget::ClassicOffline { .. } => "classic-offline",
        exporter::ImageTarget::Containerd { .. } => "containerd",
    }
}

/// Counts file bytes received from a client's local source.
pub fn local_bytes(n: u64) {
    metrics::counter!(m::LOCAL_BYTES).increment(n);
}

/// Go's name of a gRPC code (what buildctl prints), e.g. `Canceled`.
pub fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// What `/debug/state` shows and the gauges set before each scrape.
pub struct State {
    /// Jobs.
    pub jobs: Arc<Jobs>,
    /// Sessions.
    pub sessions: Arc<SessionManager>,
    /// berth's layer store.
    pub store: layerstore::snapshot::SnapshotStore,
}

impl telemetry::debug::DebugState for State {
    fn refresh_gauges(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let c = self.store.counts();
            metrics::gauge!(m::PINS).set(layerstore::dockerstore::pins_held() as f64);
            metrics::gauge!(m::SNAPSHOTS).set(c.snapshots as f64);
            metrics::gauge!(m::LEASES).set(c.leases as f64);
            metrics::gauge!(m::MOUNTS).set(c.mounts as f64);
            metrics::gauge!(m::JOBS_RUNNING).set(self.jobs.running() as f64);
            metrics::gauge!(m::SESSIONS).set(self.sessions.list().len() as f64);
        })
    }

    fn state(&self) -> Pin<Box<dyn Future<Output = serde_json::Value> + Send + '_>> {
        Box::pin(async move {
            let c = self.store.counts();
            let jobs: Vec<_> = self
                .jobs
                .list()
                .into_iter()
                .map(|j| {
                    serde_json::json!({
                        "ref": j.id,
                        "session": j.session_id,
                        "running": j.running,
                        "age_seconds": j.age.as_secs_f64(),
                    })
                })
                .collect();
            let sessions: Vec<_> = self
                .sessions
                .list()
                .into_iter()
                .map(|(id, name)| serde_json::json!({ "id": id, "name": name }))
                .collect();
            serde_json::json!({
                "jobs": jobs,
                "sessions": sessions,
                "pins": layerstore::dockerstore::pins_held(),
                "snapshots": c.snapshots,
                "layers": c.layers,
                "leases": c.leases,
                "mounts": c.mounts,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_labels_are_bounded() {
        let l = BuildLabels::of(true, "", "image");
        assert_eq!((l.frontend, l.exporter), ("llb", "image"));
        let l = BuildLabels::of(false, "", "");
        assert_eq!((l.frontend, l.exporter), ("client", "none"));
        let l = BuildLabels::of(false, "dockerfile.v0", "docker");
        assert_eq!((l.frontend, l.exporter), ("dockerfile.v0", "docker"));
        let l = BuildLabels::of(false, "my/evil\nfrontend", "weird");
        assert_eq!((l.frontend, l.exporter), ("other", "other"));
        assert_eq!(code_name(tonic::Code::Cancelled), "Canceled");
    }
}
