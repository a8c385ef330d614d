//! berthd's metrics: names, help texts and histogram buckets, and the Prometheus recorder.
//!
//! Names follow Prometheus conventions (`berth_` prefix, `_total` counters, base units in the
//! name: `_seconds`, `_bytes`). Labels take values from small fixed sets only (exporter types,
//! frontend kinds, export modes, HTTP methods, Docker API path roots, gRPC code names), never a
//! build ref, digest, image name or path.
//!
//! Who emits what: the daemon counts builds, durations, export bytes and local-context bytes,
//! and sets the state gauges before each scrape (pins from `layerstore`'s own count; snapshots,
//! leases and mounts from its store); `worker` counts vertex executions and cache hits;
//! `exporter` the `docker load` retries and load-stream errors; [`crate::docker`] every Docker
//! Engine API request it carries. The library crates use the literal names below through the
//! `metrics` macros; the integration tests scrape them.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::{Error, Result};

/// Builds started (`frontend`, `exporter`).
pub const BUILDS_STARTED: &str = "berth_builds_started_total";
/// Builds that ended successfully (`frontend`, `exporter`).
pub const BUILDS_FINISHED: &str = "berth_builds_finished_total";
/// Builds that ended with an error, cancellation included (`frontend`, `exporter`, `code`: the
/// gRPC code name the client got, e.g. `Canceled`, `InvalidArgument`).
pub const BUILDS_FAILED: &str = "berth_builds_failed_total";
/// Time from a build's start to its solved result, before export (`frontend`).
pub const SOLVE_DURATION: &str = "berth_solve_duration_seconds";
/// Time an exporter took, from the solved result to its response (`exporter`): for `image`, the
/// time from the last vertex to an image in Docker.
pub const EXPORT_DURATION: &str = "berth_export_duration_seconds";
/// Vertices whose op executed (once per execution, however many builds waited for it).
pub const VERTEX_EXECUTIONS: &str = "berth_vertex_executions_total";
/// Vertices whose result came from the cache.
pub const VERTEX_CACHE_HITS: &str = "berth_vertex_cache_hits_total";
/// Uncompressed layer bytes an export wrote or sent to its target (`mode`).
pub const EXPORT_BYTES_REGISTERED: &str = "berth_export_layer_bytes_registered_total";
/// Uncompressed layer bytes an export did not send because the target Docker had them (`mode`).
pub const EXPORT_BYTES_SKIPPED: &str = "berth_export_layer_bytes_skipped_total";
/// Layers an export wrote or sent (`mode`).
pub const EXPORT_LAYERS_REGISTERED: &str = "berth_export_layers_registered_total";
/// Layers an export left out because the target Docker had them (`mode`).
pub const EXPORT_LAYERS_SKIPPED: &str = "berth_export_layers_skipped_total";
/// File content bytes received from clients' local sources (`--local`).
pub const LOCAL_BYTES: &str = "berth_local_context_bytes_total";
/// Base-image pins held in the bound Docker Engine (containers keeping images from removal).
pub const PINS: &str = "berth_pins";
/// Snapshots in berth's layer store.
pub const SNAPSHOTS: &str = "berth_snapshots";
/// Leases on snapshots held by running work.
pub const LEASES: &str = "berth_leases";
/// Snapshot mounts held by running work.
pub const MOUNTS: &str = "berth_mounts";
/// Builds running now.
pub const JOBS_RUNNING: &str = "berth_jobs_running";
/// Client sessions connected now.
pub const SESSIONS: &str = "berth_sessions";
/// Docker Engine API requests (`method`, `endpoint`: the first path segment after the version,
/// e.g. `images`, `containers`, `info`).
pub const DOCKER_REQUESTS: &str = "berth_docker_api_requests_total";
/// Docker Engine API requests that failed (`method`, `endpoint`, `kind`: `client` for 4xx,
/// `server` for 5xx, `transport` when no answer came, `stream` for an error inside a 200
/// `docker load` progress stream).
pub const DOCKER_ERRORS: &str = "berth_docker_api_errors_total";
/// Docker Engine API operations berth retried (`op`).
pub const DOCKER_RETRIES: &str = "berth_docker_api_retries_total";
/// Constant 1 with the daemon's `version` and `revision`.
pub const BUILD_INFO: &str = "berth_build_info";

/// Bucket bounds (seconds) of the duration histograms: builds take from milliseconds (all
/// cached) to tens of minutes.
pub const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// Help texts of every metric, in the order they are documented.
pub const DESCRIPTIONS: &[(&str, &str)] = &[
    (BUILDS_STARTED, "Builds started, by frontend and exporter."),
    (
        BUILDS_FINISHED,
        "Builds that ended successfully, by frontend and exporter.",
    ),
    (
        BUILDS_FAILED,
        "Builds that ended with an error, by frontend, exporter and gRPC code.",
    ),
    (
        SOLVE_DURATION,
        "Seconds from a build's start to its solved result, by frontend.",
    ),
    (
        EXPORT_DURATION,
        "Seconds an exporter took, from the solved result to its response, by exporter.",
    ),
    (VERTEX_EXECUTIONS, "Vertices whose op was executed."),
    (
        VERTEX_CACHE_HITS,
        "Vertices whose result came from the cache.",
    ),
    (
        EXPORT_BYTES_REGISTERED,
        "Uncompressed layer bytes written or sent to the export target, by mode.",
    ),
    (
        EXPORT_BYTES_SKIPPED,
        "Uncompressed layer bytes not sent because the target Docker already had them, by mode.",
    ),
    (
        EXPORT_LAYERS_REGISTERED,
        "Layers written or sent to the export target, by mode.",
    ),
    (
        EXPORT_LAYERS_SKIPPED,
        "Layers not sent because the target Docker already had them, by mode.",
    ),
    (
        LOCAL_BYTES,
        "File content bytes received from clients' local sources.",
    ),
    (PINS, "Base-image pins held in the bound Docker Engine."),
    (SNAPSHOTS, "Snapshots in berth's layer store."),
    (LEASES, "Leases on snapshots held by running work."),
    (MOUNTS, "Snapshot mounts held by running work."),
    (JOBS_RUNNING, "Builds running now."),
    (SESSIONS, "Client sessions connected now."),
    (
        DOCKER_REQUESTS,
        "Docker Engine API requests, by method and endpoint.",
    ),
    (
        DOCKER_ERRORS,
        "Docker Engine API requests that failed, by method, endpoint and kind.",
    ),
    (
        DOCKER_RETRIES,
        "Docker Engine API operations retried, by operation.",
    ),
    (
        BUILD_INFO,
        "Constant 1, labelled with berthd's version and revision.",
    ),
];

/// Builds the recorder, installs it as the process's global one, and registers help texts and
/// the series that exist from the start (so a scrape shows zeros rather than nothing).
pub(crate) fn install() -> Result<PrometheusHandle> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), DURATION_BUCKETS)
        .map_err(|e| Error::Recorder(e.to_string()))?
        .build_recorder();
    let handle = recorder.handle();
    ::metrics::set_global_recorder(recorder).map_err(|e| Error::Recorder(e.to_string()))?;
    for (name, help) in DESCRIPTIONS {
        if name.ends_with("_seconds") {
            ::metrics::describe_histogram!(*name, ::metrics::Unit::Seconds, *help);
        } else if name.ends_with("_total") {
            ::metrics::describe_counter!(*name, *help);
        } else {
            ::metrics::describe_gauge!(*name, *help);
        }
    }
    for name in [VERTEX_EXECUTIONS, VERTEX_CACHE_HITS, LOCAL_BYTES] {
        ::metrics::counter!(name).absolute(0);
    }
    for name in [PINS, SNAPSHOTS, LEASES, MOUNTS, JOBS_RUNNING, SESSIONS] {
        ::metrics::gauge!(name).increment(0.0);
    }
    Ok(handle)
}

/// Bounds a label value to `known`; anything else becomes `other` (labels must not carry
/// client-chosen strings).
pub fn bounded(value: &str, known: &[&'static str]) -> &'static str {
    known
        .iter()
        .find(|k| **k == value)
        .copied()
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        for (name, help) in DESCRIPTIONS {
            assert!(name.starts_with("berth_"), "{name}");
            assert!(
                name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name}"
            );
            assert!(!help.is_empty());
        }
        let mut names: Vec<_> = DESCRIPTIONS.iter().map(|d| d.0).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), DESCRIPTIONS.len(), "duplicate metric");
    }

    #[test]
    fn bounded_labels() {
        assert_eq!(bounded("image", &["image", "docker"]), "image");
        assert_eq!(bounded("x/../evil", &["image", "docker"]), "other");
    }
}
