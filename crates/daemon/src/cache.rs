//! `--export-cache` and `--import-cache` for berthd: the `remotecache` crate over berth's registry
//! client (credentials from the job's session) and the client's content store (`type=local`).
//!
//! - Imports come from `SolveRequest.cache.imports` (every solve of the job uses them, also the
//!   solves a client makes through `LLBBridge.Solve`), from a gateway `SolveRequest`'s
//!   `CacheImports`, and, for frontends, from the `cache-imports` frontend attribute
//!   ([`frontend_cache_imports`] + [`resolve_imports`], for the Dockerfile frontend). An import
//!   that cannot be read is skipped with a warning, as buildkitd does.
//! - Exports run after the result's exporter, each as a vertex named as buildkitd names it
//!   (`exporting content cache`, `exporting inline cache`), with `writing layer …`,
//!   `writing config …`, `writing manifest …` statuses; their descriptors come back as
//!   `cache.manifest` (buildctl writes the local store's `index.json` from it). `ignore-error`
//!   keeps a failed export from failing the build.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use protos::moby::buildkit::v1 as pb;
use remotecache::{ExportSpec, ExportTarget, ImportSpec};

use crate::errors::{Error, Result};
use crate::progress::{synthetic_digest, Progress};
use crate::session::content::SessionContentStore;
use crate::session::SessionManager;
use crate::solver::Backend;

/// The parsed `--export-cache` entries of a request (errors name the bad attribute).
pub fn parse_exports(entries: &[pb::CacheOptionsEntry]) -> Result<Vec<ExportSpec>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = vec![];
    for e in entries {
        let attrs: BTreeMap<String, String> = e
            .attrs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let key = format!("{}:{:?}", e.r#type, attrs);
        if !seen.insert(key) {
            return Err(Error::invalid(format!(
                "duplicate cache exports [{}]",
                e.r#type
            )));
        }
        let spec = remotecache::parse_export(&e.r#type, &attrs).map_err(|err| {
            Error::invalid(match err {
                remotecache::Error::Invalid(m) => m,
                other => other.to_string(),
            })
        })?;
        out.push(spec);
    }
    Ok(out)
}

/// `(type, attrs)` of each `--import-cache` entry of a request.
pub fn request_imports(
    entries: &[pb::CacheOptionsEntry],
) -> Vec<(String, BTreeMap<String, String>)> {
    entries
        .iter()
        .map(|e| {
            (
                e.r#type.clone(),
                e.attrs
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            )
        })
        .collect()
}

/// The imports a frontend was given in its `cache-imports` attribute (empty when absent;
/// an unreadable value is skipped with a warning).
pub fn frontend_cache_imports(
    frontend_attrs: &BTreeMap<String, String>,
) -> Vec<(String, BTreeMap<String, String>)> {
    let Some(v) = frontend_attrs
        .get("cache-imports")
        .filter(|v| !v.is_empty())
    else {
        return vec![];
    };
    match remotecache::parse_frontend_cache_imports(v) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring cache-imports frontend attribute");
            vec![]
        }
    }
}

fn registry_session(
    backend: &Backend,
    sessions: &Arc<SessionManager>,
    session_id: &str,
) -> registry::Session {
    let auth = worker::RegistryAuth(Arc::new(crate::session::provider::JobSession::new(
        sessions.clone(),
        session_id.to_string(),
    )));
    backend.registry.session(Arc::new(auth))
}

/// Reads each import (index and config only; layers are fetched when a step matches).
pub async fn resolve_imports(
    backend: &Backend,
    sessions: &Arc<SessionManager>,
    session_id: &str,
    entries: &[(String, BTreeMap<String, String>)],
) -> Vec<worker::CacheSourceRef> {
    let mut out: Vec<worker::CacheSourceRef> = vec![];
    for (kind, attrs) in entries {
        let spec = match remotecache::parse_import(kind, attrs) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "skipping cache import");
                continue;
            }
        };
        let r = match &spec {
            ImportSpec::Registry { reference } => {
                let s = registry_session(backend, sessions, session_id);
                remotecache::RemoteCache::from_registry(s, reference).await
            }
            ImportSpec::S3(cfg) => match remotecache::S3Client::new((**cfg).clone()) {
                Ok(c) => remotecache::RemoteCache::from_s3(c).await,
                Err(e) => Err(e),
            },
            ImportSpec::Local { src, digest } => match sessions.get(session_id).await {
                Ok(session) => {
                    let store = Arc::new(SessionContentStore::new(session, format!("local:{src}")));
                    remotecache::RemoteCache::from_store(store, digest).await
                }
                Err(e) => Err(remotecache::Error::Other(format!(
                    "local cache importer requires session: {e}"
                ))),
            },
        };
        match r {
            Ok(c) => out.push(Arc::new(c)),
            Err(e) => tracing::warn!(error = %e, "failed to import cache; continuing without it"),
        }
    }
    out
}

/// Runs the non-inline exports of `specs` for `trace`; returns `cache.manifest` when an export
/// wrote an index.
pub async fn export(
    backend: &Backend,
    sessions: &Arc<SessionManager>,
    session_id: &str,
    progress: &Arc<Progress>,
    specs: &[ExportSpec],
    trace: Option<&worker::SolveTrace>,
) -> Result<BTreeMap<String, String>> {
    let mut response = BTreeMap::new();
    for (i, spec) in specs.iter().enumerate() {
        if spec.target == ExportTarget::Inline {
            continue;
        }
        // buildkitd's names of its cache exporters.
        let name = match spec.target {
            ExportTarget::S3(_) => "exporting cache to s3",
            _ => "exporting content cache",
        };
        let vertex = synthetic_digest(&format!(
            "{session_id}-cache-{i}-{}",
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        progress.vertex_started(&vertex, name, &[], None, SystemTime::now());
        let r = export_one(
            backend, sessions, session_id, progress, &vertex, spec, trace,
        )
        .await;
        match r {
            Ok(Some(desc)) => {
                progress.vertex_completed(&vertex, false, None, SystemTime::now());
                response.insert("cache.manifest".to_string(), desc);
            }
            Ok(None) => progress.vertex_completed(&vertex, false, None, SystemTime::now()),
            Err(e) => {
                progress.vertex_completed(&vertex, false, Some(e.to_string()), SystemTime::now());
                if !spec.ignore_error {
                    return Err(e);
                }
                tracing::warn!(error = %e, "cache export failed (ignore-error)");
            }
        }
    }
    Ok(response)
}

async fn export_one(
    backend: &Backend,
    sessions: &Arc<SessionManager>,
    session_id: &str,
    progress: &Arc<Progress>,
    vertex: &str,
    spec: &ExportSpec,
    trace: Option<&worker::SolveTrace>,
) -> Result<Option<String>> {
    let p = progress.clone();
    let v = vertex.to_string();
    let started = SystemTime::now();
    let report: remotecache::ExportProgress = Arc::new(move |id: &str, done: bool| {
        p.status(&v, id, "", 0, 0, Some(started), done.then(SystemTime::now));
    });
    let empty = worker::SolveTrace {
        vertices: vec![],
        target: None,
    };
    let trace = trace.unwrap_or(&empty);
    // The S3 client (its credentials, its endpoint) is checked before any layer is compressed
    // for it.
    let s3 = match &spec.target {
        ExportTarget::S3(cfg) => Some(
            remotecache::S3Client::new((**cfg).clone())
                .map_err(|e| Error::invalid(format!("export cache: {e}")))?,
        ),
        _ => None,
    };
    let built = remotecache::build(
        trace,
        spec.mode,
        spec.compression,
        spec.oci,
        &backend.image_export.blobs,
        &report,
    )
    .await
    .map_err(|e| Error::unavailable(format!("export cache: {e}")))?;
    let exported = match &spec.target {
        ExportTarget::Registry { reference } => {
            let s = registry_session(backend, sessions, session_id);
            built
                .push(&s, reference, &backend.image_export.blobs, &report)
                .await
        }
        ExportTarget::Local { dest } => {
            let session = sessions.get(session_id).await.map_err(|e| {
                Error::invalid(format!("local cache exporter requires session: {e}"))
            })?;
            let store = SessionContentStore::new(session, format!("local:{dest}"));
            match store.check_id() {
                Ok(()) => built.write_to(&store, &report).await,
                Err(e) => Err(e),
            }
        }
        ExportTarget::S3(_) => {
            let client = s3.expect("made above for s3");
            let sent = built
                .write_s3(&client, &report)
                .await
                .map_err(|e| Error::unavailable(format!("export cache: {e}")))?;
            tracing::info!(
                cache = %client.config().describe(),
                records = built.config.records.len(),
                layers = built.config.layers.len(),
                sent,
                "cache exported"
            );
            // As buildkitd's s3 exporter: no descriptor in the response.
            return Ok(None);
        }
        ExportTarget::Inline => return Ok(None),
    }
    .map_err(|e| Error::unavailable(format!("export cache: {e}")))?;
    tracing::info!(
        digest = %exported.digest,
        records = built.config.records.len(),
        layers = built.config.layers.len(),
        sent = exported.bytes_sent,
        "cache exported"
    );
    Ok(Some(exported.descriptor_json()))
}

/// `containerimage.config` with the inline cache of the build (`--export-cache type=inline`)
/// added as `moby.buildkit.cache.v0` (base64 of the records, as Go writes `[]byte`): the records
/// of `trace` (mode min, as buildkitd's inline exporter), results given as indexes into the
/// image's layers. `None` when no record has a result in the image.
pub async fn inline_config(
    backend: &Backend,
    trace: &worker::SolveTrace,
    chain: &[layerstore::snapshot::LayerRef],
    base: Option<&[u8]>,
) -> Result<Option<Vec<u8>>> {
    use base64::Engine as _;
    let quiet: remotecache::ExportProgress = Arc::new(|_: &str, _: bool| {});
    let built = remotecache::build(
        trace,
        remotecache::Mode::Min,
        remotecache::CompressionOpts {
            compression: registry::Compression::Gzip,
            level: None,
            force: false,
        },
        true,
        &backend.image_export.blobs,
        &quiet,
    )
    .await
    .map_err(|e| Error::unavailable(format!("export inline cache: {e}")))?;
    let store = backend.store.clone();
    let chain = chain.to_vec();
    let (layers, _) = tokio::task::spawn_blocking(move || exporter::export_layers(&store, &chain))
        .await
        .map_err(|e| Error::internal(format!("layer task: {e}")))?
        .map_err(|e| Error::unavailable(format!("export inline cache: {e}")))?;
    let diff_ids: Vec<String> = layers.into_iter().map(|l| l.diff_id).collect();
    let Some(records) = built.inline_records(&diff_ids) else {
        tracing::warn!("failed to match any cache with layers");
        return Ok(None);
    };
    let base = match base.filter(|b| !b.is_empty()) {
        Some(b) => b.to_vec(),
        None => exporter::image::default_config(&exporter::image::Platform::native())
            .map_err(|e| Error::internal(format!("default image config: {e}")))?,
    };
    let mut doc: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&base)
        .map_err(|e| Error::invalid(format!("parse containerimage.config: {e}")))?;
    doc.insert(
        remotecache::config::INLINE_CACHE_FIELD.to_string(),
        serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(records)),
    );
    Ok(Some(serde_json::to_vec(&doc).map_err(|e| {
        Error::internal(format!("encode config: {e}"))
    })?))
}
