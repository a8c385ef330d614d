//! `moby.buildkit.v1.Control`: the daemon's main service.
//!
//! `Solve` registers the job first (Status and LLBBridge calls may already be waiting for it),
//! announces it to the build history, then either solves a definition given directly or waits
//! for the client's `LLBBridge.Return` (buildctl's forwarder flow), exports, ends the job so the
//! `Status` stream closes at once, and writes the build's history record before answering.

use crate::errors::{Error, Result};
use crate::export_client::{self, ExporterKind};
use crate::filters::{Adaptor, Filters};
use crate::history::History;
use crate::jobs::{BuildResult, Job, Jobs};
use crate::session::{tunnel, SessionManager};
use crate::solver::{Backend, SolveCtx};
use bytes::Bytes;
use futures::StreamExt;
use protos::moby::buildkit::v1 as pb;
use protos::moby::buildkit::v1::types::WorkerRecord;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

/// How long `Status` waits for its job to be registered (buildkitd: 6 s).
pub const STATUS_WAIT: Duration = Duration::from_secs(6);
/// A lost session cancels its jobs within this time.
pub const SESSION_LOSS_GRACE: Duration = Duration::from_millis(500);

/// The Control service.
pub struct Control {
    /// Jobs.
    pub jobs: Arc<Jobs>,
    /// Sessions.
    pub sessions: Arc<SessionManager>,
    /// Solve backend.
    pub backend: Arc<Backend>,
    /// The worker record.
    pub worker: WorkerRecord,
    /// Build history.
    pub history: Arc<History>,
    /// Docker access for the built-in frontends' image config lookups.
    pub docker: Arc<crate::docker::Docker>,
}

/// What a successful solve produced besides the response.
struct Outcome {
    response: pb::SolveResponse,
    /// The result's metadata (recorded in the history as buildkitd does).
    metadata: BTreeMap<String, Bytes>,
}

/// The history record of a running build, completed exactly once.
struct PendingRecord {
    history: Arc<History>,
    record: pb::BuildHistoryRecord,
}

impl PendingRecord {
    /// Completes the record (blocking file writes happen on the blocking pool).
    fn complete(
        self,
        job: &Job,
        outcome: std::result::Result<&Outcome, &Error>,
    ) -> tokio::task::JoinHandle<()> {
        let mut rec = self.record;
        rec.completed_at = Some(SystemTime::now().into());
        match outcome {
            Ok(o) => {
                if !o.metadata.is_empty() {
                    rec.exporter_response = o
                        .metadata
                        .iter()
                        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                        .collect();
                }
                if let Some(d) = o
                    .response
                    .exporter_response
                    .get("containerimage.descriptor")
                    .and_then(|d| image_descriptor(d))
                {
                    rec.result = Some(pb::BuildResultInfo {
                        result_deprecated: Some(d),
                        ..Default::default()
                    });
                }
            }
            Err(e) => rec.error = Some(e.rpc_status()),
        }
        job.progress.finish();
        let log = job.progress.events();
        let history = self.history;
        let span = tracing::debug_span!("history.record");
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let r#ref = rec.r#ref.clone();
            if let Err(e) = history.completed(rec, &log) {
                tracing::warn!(build = %r#ref, error = %e, "build history record not written");
                history.abandon(&r#ref);
            }
        })
    }
}

/// The OCI descriptor of `containerimage.descriptor` (base64 of its JSON).
fn image_descriptor(b64: &str) -> Option<pb::Descriptor> {
    use base64::Engine as _;
    let json = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct D {
        media_type: String,
        digest: String,
        size: i64,
        #[serde(default)]
        annotations: BTreeMap<String, String>,
    }
    let d: D = serde_json::from_slice(&json).ok()?;
    Some(pb::Descriptor {
        media_type: d.media_type,
        digest: d.digest,
        size: d.size,
        annotations: d.annotations,
    })
}

/// Ends the job however `Solve` exits (including when the client drops the call).
struct JobGuard {
    jobs: Arc<Jobs>,
    job: Arc<Job>,
    record: Option<PendingRecord>,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        if let Some(rec) = self.record.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                rec.complete(&self.job, Err(&Error::Canceled));
            }
        }
        if !self.job.ended.is_cancelled() {
            self.job.cancel.cancel();
            self.jobs.end(&self.job);
        }
    }
}

/// The exporter of a solve request: newer clients fill `Exporters`, older ones the deprecated
/// pair. `build-arg:SOURCE_DATE_EPOCH` becomes the `source-date-epoch` attribute unless set.
fn exporter_of(req: &pb::SolveRequest) -> Result<(String, BTreeMap<String, String>)> {
    let (exp_type, mut exp_attrs) = match req.exporters.len() {
        0 => (
            req.exporter_deprecated.clone(),
            req.exporter_attrs_deprecated.clone(),
        ),
        1 => (
            req.exporters[0].r#type.clone(),
            req.exporters[0].attrs.clone(),
        ),
        _ => {
            return Err(Error::unimplemented(
                "multiple exporters are not supported by berthd yet",
            ))
        }
    };
    if let Some(v) = req.frontend_attrs.get("build-arg:SOURCE_DATE_EPOCH") {
        exp_attrs
            .entry("source-date-epoch".into())
            .or_insert_with(|| v.clone());
    }
    Ok((exp_type, exp_attrs))
}

/// The entitlements a build asks for must be known and allowed by the daemon's
/// `insecure-entitlements`, checked before anything runs, with buildkitd's wording.
/// Waits for the pins of the base images that every ref of `result` (and its attestations) uses
/// in place, before anything reads their files (see `Control::run`). A ref whose base went
/// before its pin ever ran (a routine cleanup in that window) is solved again from its
/// definition, on the base resolved again (pulled again if it can be), waiting for its pins this
/// time; any other loss gives the error naming the image and what removed it.
async fn wait_for_pins(backend: &Arc<Backend>, job: &Job, result: &mut BuildResult) -> Result<()> {
    for fs in result.fs.iter_mut().chain(result.refs.values_mut()) {
        let Err(e) = fs.wait_for_pins().await else {
            continue;
        };
        let Some(def) = fs.definition().cloned() else {
            return Err(e);
        };
        if crate::solver::base_lost_before_pinned(fs).await.is_none() {
            return Err(e);
        }
        tracing::warn!(build = %job.id, error = %e, "a base image went before its pin ran and the result is read; running the build again");
        *fs = backend.solve(Some(def), &job.solve_ctx()).await?;
    }
    for a in result.attestations.values().flatten() {
        if let Some(fs) = &a.fs {
            fs.wait_for_pins().await?;
        }
    }
    Ok(())
}

fn check_entitlements(requested: &[String], allowed: &[String]) -> Result<()> {
    for e in requested {
        if e != "security.insecure" && e != "network.host" {
            return Err(Error::invalid(format!("unknown entitlement {e}")));
        }
        if !allowed.contains(e) {
            return Err(Error::invalid(format!(
                "granting entitlement {e} is not allowed by build daemon configuration"
            )));
        }
    }
    Ok(())
}

impl Control {
    async fn solve_inner(&self, req: pb::SolveRequest) -> Result<pb::SolveResponse> {
        if req.r#ref.is_empty() {
            return Err(Error::invalid("solve request without a build ref"));
        }
        let (job, returned) = Job::new(
            req.r#ref.clone(),
            req.session.clone(),
            req.entitlements.clone(),
            req.frontend_attrs.clone(),
        );
        self.jobs.register(job.clone())?;
        let mut guard = JobGuard {
            jobs: self.jobs.clone(),
            job: job.clone(),
            record: None,
        };
        tracing::info!(build = %job.id, session = %job.session_id, "solve");
        let exporter = exporter_of(&req);
        if !req.internal {
            let mut record = pb::BuildHistoryRecord {
                r#ref: req.r#ref.clone(),
                frontend: req.frontend.clone(),
                frontend_attrs: req.frontend_attrs.clone(),
                created_at: Some(SystemTime::now().into()),
                ..Default::default()
            };
            if let Ok((t, attrs)) = &exporter {
                if !t.is_empty() {
                    record.exporters = vec![pb::Exporter {
                        r#type: t.clone(),
                        attrs: attrs.clone(),
                    }];
                }
            }
            self.history.started(record.clone());
            guard.record = Some(PendingRecord {
                history: self.history.clone(),
                record,
            });
        }
        let labels = crate::observe::BuildLabels::of(
            req.definition.is_some(),
            &req.frontend,
            exporter.as_ref().map(|e| e.0.as_str()).unwrap_or(""),
        );
        labels.started();
        let span = tracing::info_span!(
            "solve",
            build = %job.id,
            frontend = labels.frontend,
            exporter = labels.exporter,
            otel.status_code = tracing::field::Empty,
        );
        let res = match exporter {
            Ok(exporter) => {
                self.run(&job, req, exporter, returned, labels)
                    .instrument(span.clone())
                    .await
            }
            Err(e) => Err(e),
        };
        let res = match res {
            Err(_) if job.cancel.is_cancelled() => Err(job.cancel_error()),
            r => r,
        };
        labels.ended(res.as_ref().err().map(Error::code));
        if let Err(e) = &res {
            span.record("otel.status_code", "ERROR");
            tracing::info!(build = %job.id, error = %e, "solve failed");
        }
        job.cancel.cancel();
        // gateway containers go with the build, before it answers (their mounts are released)
        job.containers.release_all().await;
        if let Some(rec) = guard.record.take() {
            // the record is written before Solve answers, as buildkitd does
            let _ = rec.complete(&job, res.as_ref()).await;
        }
        self.jobs.end(&job);
        res.map(|o| o.response)
    }

    async fn run(
        &self,
        job: &Arc<Job>,
        mut req: pb::SolveRequest,
        (exp_type, exp_attrs): (String, BTreeMap<String, String>),
        returned: tokio::sync::oneshot::Receiver<Result<BuildResult>>,
        labels: crate::observe::BuildLabels,
    ) -> Result<Outcome> {
        let solve_started = std::time::Instant::now();
        check_entitlements(&job.entitlements, &self.backend.allowed_entitlements)?;
        let kind = export_client::parse_exporter(&exp_type)?;
        if req
            .source_policy
            .as_ref()
            .is_some_and(|p| !p.rules.is_empty())
        {
            return Err(Error::unimplemented(
                "source policies are not supported by berthd yet",
            ));
        }
        let cache_exports = match &req.cache {
            Some(c) => crate::cache::parse_exports(&c.exports)?,
            None => vec![],
        };
        job.cache_export.store(
            !cache_exports.is_empty(),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.watch_session(job);
        if let Some(c) = req.cache.as_ref().filter(|c| !c.imports.is_empty()) {
            let entries = crate::cache::request_imports(&c.imports);
            let imports = crate::cache::resolve_imports(
                &self.backend,
                &self.sessions,
                &req.session,
                &entries,
            )
            .await;
            *job.cache_imports.lock().unwrap() = imports;
        }

        // A definition that is present but empty (`llb.Scratch()` marshalled) is solved directly
        // to the empty result, as buildkitd does; only a request with neither a definition nor
        // a frontend waits for the client's LLBBridge calls.
        let direct = req.definition.is_some() || !req.frontend.is_empty();
        // Whether anything reads the result's files after the solve. Nothing does in a build
        // without exports, and the image exporter reads none of the base images' files when it
        // loads the result into this Docker (its thin load names their layers by chain ID, and
        // Docker takes its own references on them or refuses the load if they are gone). A
        // push, an SBOM scan, a cache export and the exporters that write files read the layers.
        // Solves do not wait for their base images' pins, which start only if the build outlives
        // a short delay (`worker::SolveContext::result_unread`), unless they are direct solves
        // of a result that is read; a result that is read waits for them before the export
        // (below), and a frontend that reads a ref's files or runs a container on it waits for
        // that ref's pins then (`worker::SolvedRef::wait_for_pins`).
        let loaded_only = kind == ExporterKind::Image
            && !crate::export_image::truthy(&exp_attrs, "push")?
            && crate::sbom::generator(&req.frontend_attrs)?.is_none();
        let unread = (kind == ExporterKind::None || loaded_only) && cache_exports.is_empty();
        let result = if direct {
            if req.definition.as_ref().is_some_and(|d| !d.def.is_empty())
                && !req.frontend.is_empty()
            {
                return Err(Error::invalid(
                    "solve request has both a definition and a frontend",
                ));
            }
            if !req.frontend.is_empty() {
                let fe = crate::frontends::Frontends {
                    backend: self.backend.clone(),
                    docker: self.docker.clone(),
                    worker: self.worker.clone(),
                };
                let r = crate::frontends::solve(
                    &fe,
                    job,
                    &req.frontend,
                    req.frontend_attrs.clone(),
                    std::mem::take(&mut req.frontend_inputs),
                );
                tokio::select! {
                    r = r => r?,
                    _ = job.cancel.cancelled() => return Err(job.cancel_error()),
                }
            } else {
                let ctx = SolveCtx {
                    job_id: job.id.clone(),
                    session_id: job.session_id.clone(),
                    progress: job.progress.clone(),
                    cancel: job.cancel.clone(),
                    entitlements: job.entitlements.clone(),
                    cache_imports: job.cache_imports.lock().unwrap().clone(),
                    cache_export: job.cache_export.load(std::sync::atomic::Ordering::Relaxed),
                };
                let def = req.definition.take();
                let fs = if unread {
                    self.backend.solve_unread(def.clone(), &ctx).await?
                } else {
                    self.backend.solve(def.clone(), &ctx).await?
                };
                // A direct solve's provenance: its definition, no frontend.
                let recorder = Arc::new(crate::provenance::Recorder::default());
                let mut defs = BTreeMap::new();
                if let Some(d) = def.filter(|d| !d.def.is_empty()) {
                    recorder.solved(&d, &fs);
                    defs.insert(String::new(), d);
                }
                BuildResult {
                    fs: Some(fs),
                    refs: Default::default(),
                    defs,
                    metadata: Default::default(),
                    attestations: Default::default(),
                    provenance: BTreeMap::from([(
                        String::new(),
                        Arc::new(crate::provenance::Captured {
                            frontend: String::new(),
                            opts: BTreeMap::new(),
                            has_inputs: false,
                            recorder,
                        }),
                    )]),
                }
            }
        } else {
            tokio::select! {
                r = returned => match r {
                    Ok(r) => r?,
                    Err(_) => return Err(Error::internal("build result channel closed")),
                },
                _ = job.cancel.cancelled() => return Err(job.cancel_error()),
            }
        };

        let mut result = result;
        if !unread {
            wait_for_pins(&self.backend, job, &mut result).await?;
        }
        if let Some(generator) = crate::sbom::generator(&req.frontend_attrs)? {
            let platforms = result_platforms(&result)?;
            let ctx = SolveCtx {
                job_id: job.id.clone(),
                session_id: job.session_id.clone(),
                progress: job.progress.clone(),
                cancel: job.cancel.clone(),
                entitlements: job.entitlements.clone(),
                cache_imports: job.cache_imports.lock().unwrap().clone(),
                cache_export: job.cache_export.load(std::sync::atomic::Ordering::Relaxed),
            };
            let no_cache = req
                .frontend_attrs
                .get("no-cache")
                .is_some_and(|v| v.is_empty());
            crate::sbom::scan(
                &self.backend,
                &self.docker,
                job,
                &ctx,
                &generator,
                no_cache,
                &platforms,
                &mut result,
            )
            .await?;
        }
        if let Some(attrs) = crate::provenance::requested(&req.frontend_attrs)? {
            let platforms = result_platforms(&result)?;
            let started = chrono::Utc::now()
                - chrono::Duration::from_std(job.started.elapsed()).unwrap_or_default();
            crate::provenance::attach(&attrs, &mut result, &platforms, started, &job.id)?;
        }
        // The `docker` exporter leaves out inline-only attestations (buildx's default
        // provenance) unless `attestation-inline=true`, as buildkitd's image writer does for
        // the `docker` and `oci` exporters (`oci` filters them where it builds its index).
        if kind == ExporterKind::Client(export_client::ClientExporter::Docker)
            && !crate::export_image::truthy(&exp_attrs, "attestation-inline")?
        {
            let before: usize = result.attestations.values().map(Vec::len).sum();
            for atts in result.attestations.values_mut() {
                atts.retain(|a| !crate::attestations::inline_only(a));
            }
            result.attestations.retain(|_, atts| !atts.is_empty());
            let after: usize = result.attestations.values().map(Vec::len).sum();
            if after < before {
                tracing::debug!(
                    dropped = before - after,
                    "exporter docker: inline-only attestations left out"
                );
            }
        }
        // An image of a single result with attestations for its platform is an index of that
        // one platform, as in buildkitd (whose `image` exporter keeps inline-only ones too).
        // Docker's classic image store holds one image per name, never an index: without push
        // the image is registered as without attestations (same image ID) and the
        // attestations are dropped; with push the index goes to the registry and the image is
        // registered in Docker too, as it is without attestations.
        let mut store_before_push = None;
        if kind == ExporterKind::Image && result.refs.is_empty() && !result.attestations.is_empty()
        {
            if !crate::export_image::truthy(&exp_attrs, "push")? {
                let n: usize = result.attestations.values().map(Vec::len).sum();
                tracing::debug!(
                    dropped = n,
                    "exporter image: Docker's image store holds no index; attestations dropped, image registered alone"
                );
                result.attestations.clear();
            } else if let (Some(fs), [(id, p)]) =
                (result.fs.clone(), &result_platforms(&result)?[..])
            {
                if result.attestations.contains_key(id) {
                    store_before_push = Some(fs.clone());
                    let ps = serde_json::json!({"Platforms": [{"ID": id, "Platform": {
                        "os": p.os, "architecture": p.architecture, "variant": p.variant}}]});
                    result
                        .metadata
                        .entry("refs.platforms".into())
                        .or_insert_with(|| Bytes::from(ps.to_string()));
                    if let Some(d) = result.defs.remove("") {
                        result.defs.insert(id.clone(), d);
                    }
                    result.refs.insert(id.clone(), fs);
                }
            }
        }
        if cache_exports
            .iter()
            .any(|c| c.target == remotecache::ExportTarget::Inline)
        {
            // The single result's config, or each platform's (`containerimage.config/ID`).
            let mut targets: Vec<(String, crate::solver::FsRef)> = vec![];
            if let Some(fs) = result.fs.clone() {
                targets.push(("containerimage.config".into(), fs));
            }
            for (id, fs) in &result.refs {
                targets.push((format!("containerimage.config/{id}"), fs.clone()));
            }
            for (md_key, fs) in targets {
                let crate::solver::FsRef::Solved(r) = &fs else {
                    continue;
                };
                if let Some(trace) = fs.trace() {
                    let base = result.metadata.get(&md_key).map(|b| b.to_vec());
                    let chain = r.chain().layers().to_vec();
                    if let Some(cfg) =
                        crate::cache::inline_config(&self.backend, trace, &chain, base.as_deref())
                            .await?
                    {
                        result.metadata.insert(md_key, cfg.into());
                    }
                }
            }
        }
        labels.solved(solve_started.elapsed());
        let export_started = std::time::Instant::now();
        let export_span = tracing::info_span!("export", exporter = labels.exporter);

        let mut response = BTreeMap::new();
        for (k, v) in &result.metadata {
            if k.starts_with("frontend.") {
                response.insert(k.clone(), String::from_utf8_lossy(v).into_owned());
            }
        }
        if let Some(crate::solver::FsRef::Solved(r)) = &result.fs {
            response.insert(
                crate::buildinfo::KEY.to_string(),
                crate::buildinfo::encode(
                    &crate::buildinfo::result_sources(&result, "", r),
                    crate::buildinfo::frontend_of(
                        &result,
                        "",
                        (!req.frontend.is_empty())
                            .then_some((req.frontend.as_str(), &req.frontend_attrs)),
                    ),
                    result
                        .provenance
                        .get("")
                        .map(|c| c.recorder.resolved_tags())
                        .as_ref(),
                ),
            );
        }
        // buildkitd's image exporters take the attributes they do not know as result metadata
        // (e.g. `containerimage.config`), over the frontend's.
        let mut export_md = result.metadata.clone();
        if matches!(
            kind,
            ExporterKind::Image
                | ExporterKind::Client(export_client::ClientExporter::Docker)
                | ExporterKind::Client(export_client::ClientExporter::Oci)
        ) {
            for (k, v) in &exp_attrs {
                export_md.insert(k.clone(), Bytes::from(v.clone()));
            }
        }
        if matches!(
            kind,
            ExporterKind::Image
                | ExporterKind::Client(export_client::ClientExporter::Docker)
                | ExporterKind::Client(export_client::ClientExporter::Oci)
        ) {
            crate::buildinfo::patch_image_configs(
                &mut export_md,
                &result,
                &exp_attrs,
                (!req.frontend.is_empty()).then_some((req.frontend.as_str(), &req.frontend_attrs)),
            )?;
        }
        let single_with_attestations =
            result.refs.is_empty() && result.attestations.values().any(|a| !a.is_empty());
        let oci = kind == ExporterKind::Client(export_client::ClientExporter::Oci);
        // `oci`: a single result with attestations (other than inline-only ones) is an index of
        // its one platform, as in buildkitd; a multi-platform result is an index (`docker`
        // refuses it, naming why).
        let docker = kind == ExporterKind::Client(export_client::ClientExporter::Docker);
        if docker && !result.refs.is_empty() {
            // buildkitd's wording.
            return Err(Error::invalid(
                "docker exporter does not currently support exporting manifest lists",
            ));
        }
        // `docker`: a single result with attestations left after the inline-only ones is an
        // index of its one platform too (in the archive's OCI layout; `docker load` reads
        // `manifest.json`).
        let image_index = (!result.refs.is_empty() && oci)
            || (docker && single_with_attestations)
            || (oci
                && result.refs.is_empty()
                && result
                    .attestations
                    .values()
                    .flatten()
                    .any(|a| !crate::attestations::inline_only(a)));
        if let (true, ExporterKind::Client(exp)) = (image_index, kind) {
            let mut metadata = export_md.clone();
            let refs = if result.refs.is_empty() {
                let platforms = result_platforms(&result)?;
                let fs = result.fs.clone().unwrap_or(crate::solver::FsRef::Scratch);
                if let [(id, p)] = &platforms[..] {
                    let ps = serde_json::json!({"Platforms": [{"ID": id, "Platform": {
                        "os": p.os, "architecture": p.architecture, "variant": p.variant}}]});
                    metadata
                        .entry("refs.platforms".into())
                        .or_insert_with(|| Bytes::from(ps.to_string()));
                }
                platforms
                    .into_iter()
                    .map(|(id, _)| (id, fs.clone()))
                    .collect()
            } else {
                result.refs.clone()
            };
            let mut attestations = BTreeMap::new();
            for (k, atts) in &result.attestations {
                attestations.insert(
                    k.clone(),
                    crate::attestations::resolve(&self.backend, atts).await?,
                );
            }
            let (images, _) =
                crate::export_image::platform_images(&metadata, &refs, &attestations)?;
            let session = self.sessions.get(&req.session).await?;
            let r = tokio::select! {
                r = export_client::export(
                    &self.backend,
                    &session,
                    &job.progress,
                    exp,
                    &exp_attrs,
                    &metadata,
                    &crate::solver::FsRef::Scratch,
                    Some(&images),
                ).instrument(export_span.clone()) => r?,
                _ = job.cancel.cancelled() => return Err(job.cancel_error()),
            };
            response.extend(r);
        } else if let (
            true,
            ExporterKind::Client(
                exp @ (export_client::ClientExporter::Local | export_client::ClientExporter::Tar),
            ),
        ) = (single_with_attestations, kind)
        {
            // The statements of the result's platform beside its files.
            let platforms = result_platforms(&result)?;
            let fs = result.fs.clone().unwrap_or(crate::solver::FsRef::Scratch);
            let refs = platforms
                .iter()
                .map(|(id, _)| (id.clone(), fs.clone()))
                .collect();
            let session = self.sessions.get(&req.session).await?;
            let r = tokio::select! {
                r = export_client::export_multi(
                    &self.backend,
                    &session,
                    &job.progress,
                    exp,
                    &exp_attrs,
                    &platforms,
                    &refs,
                    &result.attestations,
                    false,
                ).instrument(export_span.clone()) => r?,
                _ = job.cancel.cancelled() => return Err(job.cancel_error()),
            };
            response.extend(r);
        } else if single_with_attestations && kind != ExporterKind::None && !oci {
            // Dropping them would export without the attestations the frontend asked for.
            // (Reached only when the attestations name no platform of the result.)
            let keys: Vec<&String> = result.attestations.keys().collect();
            return Err(Error::invalid(format!(
                "exporter {exp_type}: attestations for {keys:?} match no platform of the result"
            )));
        } else if !result.refs.is_empty() && kind == ExporterKind::None {
            // A multi-platform result built for nothing (no exporter): solved, nothing to write.
        } else if !result.refs.is_empty() && kind != ExporterKind::Image {
            // A multi-platform result: a directory per platform (local, tar), or an index.
            let ExporterKind::Client(
                exp @ (export_client::ClientExporter::Local | export_client::ClientExporter::Tar),
            ) = kind
            else {
                return Err(Error::unimplemented(format!(
                    "exporter {exp_type}: multi-platform results ({} platforms) are only exported by the image (push=true), local, tar and oci exporters in berthd yet",
                    result.refs.len()
                )));
            };
            let platforms = crate::export_image::parse_platforms(&result.metadata)?;
            let session = self.sessions.get(&req.session).await?;
            let r = tokio::select! {
                r = export_client::export_multi(
                    &self.backend,
                    &session,
                    &job.progress,
                    exp,
                    &exp_attrs,
                    &platforms,
                    &result.refs,
                    &result.attestations,
                    true,
                ).instrument(export_span.clone()) => r?,
                _ = job.cancel.cancelled() => return Err(job.cancel_error()),
            };
            response.extend(r);
        } else if !result.refs.is_empty() {
            // A multi-platform result: only a pushed image can carry it (an index).
            if let Some(fs) = &store_before_push {
                // The single image of a pushed index with attestations lands in Docker as it
                // would without them (same image ID); the response is the index's.
                let mut store_attrs = exp_attrs.clone();
                store_attrs.remove("push");
                let mut store_md = export_md.clone();
                store_md.remove("push");
                // Docker gets the config the pushed index names for this platform (its image ID
                // is that config's digest): the per-platform config carries the buildinfo and
                // inline cache computed for the ref the index is made of.
                if let [id] = result.refs.keys().collect::<Vec<_>>()[..] {
                    if let Some(c) = export_md.get(&format!("containerimage.config/{id}")) {
                        store_md.insert("containerimage.config".into(), c.clone());
                    }
                }
                tokio::select! {
                    r = crate::export_image::export(
                        &self.backend.image_export,
                        &self.backend.store,
                        &self.sessions,
                        &req.session,
                        &job.progress,
                        &store_attrs,
                        &store_md,
                        fs,
                    ).instrument(export_span.clone()) => match r {
                        Ok(_) => {}
                        Err(e) => return Err(crate::solver::base_image_lost(fs).await.unwrap_or(e)),
                    },
                    _ = job.cancel.cancelled() => return Err(job.cancel_error()),
                };
            }
            let mut attestations = BTreeMap::new();
            for (k, atts) in &result.attestations {
                attestations.insert(
                    k.clone(),
                    crate::attestations::resolve(&self.backend, atts).await?,
                );
            }
            let r = tokio::select! {
                r = crate::export_image::export_multi(
                    &self.backend.image_export,
                    &self.backend.store,
                    &self.sessions,
                    &req.session,
                    &job.progress,
                    &exp_attrs,
                    &export_md,
                    &result.refs,
                    &attestations,
                ).instrument(export_span.clone()) => r?,
                _ = job.cancel.cancelled() => return Err(job.cancel_error()),
            };
            response.extend(r);
        } else if let ExporterKind::Client(exp) = kind {
            let fs = result.fs.clone().unwrap_or(crate::solver::FsRef::Scratch);
            let session = self.sessions.get(&req.session).await?;
            let r = tokio::select! {
                r = export_client::export(&self.backend, &session, &job.progress, exp, &exp_attrs, &export_md, &fs, None).instrument(export_span.clone()) => match r {
                    Ok(r) => r,
                    Err(e) => return Err(crate::solver::base_image_lost(&fs).await.unwrap_or(e)),
                },
                _ = job.cancel.cancelled() => return Err(job.cancel_error()),
            };
            response.extend(r);
        }
        if kind == ExporterKind::Image && result.refs.is_empty() {
            let mut fs = result.fs.clone().unwrap_or(crate::solver::FsRef::Scratch);
            // Whether the build ran again for the export already (at most once).
            let mut rerun = false;
            let r = loop {
                let r = tokio::select! {
                    r = crate::export_image::export(
                        &self.backend.image_export,
                        &self.backend.store,
                        &self.sessions,
                        &req.session,
                        &job.progress,
                        &exp_attrs,
                        &export_md,
                        &fs,
                    ).instrument(export_span.clone()) => r,
                    _ = job.cancel.cancelled() => return Err(job.cancel_error()),
                };
                match r {
                    Ok(r) => break r,
                    Err(e) => {
                        // Exported without waiting for the pins, the load may have found a base
                        // gone that a routine cleanup deleted before its pin ran: the build
                        // runs again, on the base resolved again (pulled again if it can be),
                        // and this time waits for the pins before the export.
                        if let Some(def) = fs.definition().filter(|_| !rerun).cloned() {
                            if let Some(lost) = crate::solver::base_lost_before_pinned(&fs).await {
                                tracing::warn!(build = %job.id, error = %lost, export_error = %e, "a base image went before its pin ran and the export failed on it; running the build again");
                                rerun = true;
                                fs = self.backend.solve(Some(def), &job.solve_ctx()).await?;
                                continue;
                            }
                        }
                        // A base image removed under the export explains its failure.
                        return Err(crate::solver::base_image_lost(&fs).await.unwrap_or(e));
                    }
                }
            };
            response.extend(r);
        }
        if kind != ExporterKind::None {
            labels.exported(export_started.elapsed());
        }
        if !cache_exports.is_empty() {
            let trace = result.fs.as_ref().and_then(|f| f.trace());
            let r = tokio::select! {
                r = crate::cache::export(&self.backend, &self.sessions, &req.session, &job.progress, &cache_exports, trace) => r?,
                _ = job.cancel.cancelled() => return Err(job.cancel_error()),
            };
            response.extend(r);
        }
        Ok(Outcome {
            response: pb::SolveResponse {
                exporter_response: response,
            },
            metadata: result.metadata,
        })
    }

    /// Cancels the job with `Unavailable` when its session goes away.
    fn watch_session(&self, job: &Arc<Job>) {
        if job.session_id.is_empty() {
            return;
        }
        let sessions = self.sessions.clone();
        let job = job.clone();
        tokio::spawn(async move {
            let session = tokio::select! {
                s = sessions.get(&job.session_id) => match s { Ok(s) => s, Err(_) => return },
                _ = job.ended.cancelled() => return,
            };
            tokio::select! {
                _ = session.closed.cancelled() => {
                    tokio::time::sleep(SESSION_LOSS_GRACE).await;
                    if !job.ended.is_cancelled() {
                        tracing::info!(build = %job.id, session = %session.id, "session lost, canceling build");
                        job.cancel_with(Error::unavailable(format!(
                            "session {} closed while build {} was running",
                            session.id, job.id
                        )));
                    }
                }
                _ = job.ended.cancelled() => {}
            }
        });
    }
}

struct UsageAdaptor<'a>(&'a layerstore::snapshot::UsageRecord);

impl Adaptor for UsageAdaptor<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        let r = self.0;
        let flag = |b: bool| b.then(String::new);
        match path.first().map(String::as_str)? {
            "id" => Some(r.id.clone()),
            "parents" | "parent" => Some(r.parents.join(";")),
            "description" => Some(r.description.clone()),
            "type" => Some(r.record_type.as_str().to_string()),
            "inuse" => flag(r.in_use),
            "mutable" => flag(r.mutable),
            "immutable" => flag(!r.mutable),
            "shared" => flag(r.shared),
            "private" => flag(!r.shared),
            _ => None,
        }
    }
}

fn ts(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

fn to_wire(r: &layerstore::snapshot::UsageRecord) -> pb::UsageRecord {
    #[allow(deprecated)]
    pb::UsageRecord {
        id: r.id.clone(),
        mutable: r.mutable,
        in_use: r.in_use,
        size: r.size as i64,
        parent: String::new(),
        created_at: Some(ts(r.created_at)),
        last_used_at: r.last_used_at.map(ts),
        usage_count: r.usage_count as i64,
        description: r.description.clone(),
        record_type: r.record_type.as_str().to_string(),
        shared: r.shared,
        parents: r.parents.clone(),
    }
}

fn ok<T>(r: Result<T>) -> std::result::Result<Response<T>, Status> {
    r.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl pb::control_server::Control for Control {
    async fn disk_usage(
        &self,
        request: Request<pb::DiskUsageRequest>,
    ) -> std::result::Result<Response<pb::DiskUsageResponse>, Status> {
        let req = request.into_inner();
        let store = self.backend.store.clone();
        ok(async {
            let filters = Filters::parse(&req.filter)?;
            let records = tokio::task::spawn_blocking(move || store.disk_usage())
                .await
                .map_err(|e| Error::internal(format!("disk usage task: {e}")))?
                .map_err(|e| Error::layerstore("disk usage", e))?;
            let now = chrono::Utc::now();
            let record = records
                .iter()
                .filter(|r| filters.matches(&UsageAdaptor(r)))
                .filter(|r| {
                    req.age_limit <= 0
                        || now
                            .signed_duration_since(r.last_used_at.unwrap_or(r.created_at))
                            .num_nanoseconds()
                            .unwrap_or(i64::MAX)
                            >= req.age_limit
                })
                .map(to_wire)
                .collect();
            Ok(pb::DiskUsageResponse { record })
        }
        .await)
    }

    async fn prune(
        &self,
        request: Request<pb::PruneRequest>,
    ) -> std::result::Result<Response<BoxStream<pb::UsageRecord>>, Status> {
        let req = request.into_inner();
        let filters = Filters::parse(&req.filter)?;
        let store = self.backend.store.clone();
        let keep_bytes = if req.max_used_space > 0 {
            req.max_used_space
        } else {
            req.reserved_space
        };
        let (tx, rx) =
            tokio::sync::mpsc::channel::<std::result::Result<pb::UsageRecord, Status>>(16);
        tokio::task::spawn_blocking(move || {
            let run = || -> Result<()> {
                let records = store
                    .disk_usage()
                    .map_err(|e| Error::layerstore("disk usage", e))?;
                let mut total: i64 = records.iter().map(|r| r.size as i64).sum();
                let now = chrono::Utc::now();
                let mut candidates: Vec<_> = records
                    .into_iter()
                    .filter(|r| !r.in_use)
                    .filter(|r| {
                        req.all
                            || !matches!(
                                r.record_type,
                                layerstore::snapshot::RecordType::Internal
                                    | layerstore::snapshot::RecordType::Frontend
                            )
                    })
                    .filter(|r| filters.matches(&UsageAdaptor(r)))
                    .filter(|r| {
                        req.keep_duration <= 0
                            || now
                                .signed_duration_since(r.last_used_at.unwrap_or(r.created_at))
                                .num_nanoseconds()
                                .unwrap_or(i64::MAX)
                                >= req.keep_duration
                    })
                    .collect();
                candidates.sort_by_key(|r| r.last_used_at.unwrap_or(r.created_at));
                for r in candidates {
                    if keep_bytes > 0 && total <= keep_bytes {
                        break;
                    }
                    let id: layerstore::snapshot::SnapshotId = match r.id.parse() {
                        Ok(id) => id,
                        Err(_) => continue,
                    };
                    match store.remove(&id) {
                        Ok(()) => {
                            total -= r.size as i64;
                            if tx.blocking_send(Ok(to_wire(&r))).is_err() {
                                return Ok(());
                            }
                        }
                        // in use or removed concurrently: skip, like buildkitd
                        Err(e) => tracing::debug!(id = %r.id, error = %e, "prune skipped record"),
                    }
                }
                Ok(())
            };
            if let Err(e) = run() {
                let _ = tx.blocking_send(Err(e.into()));
            }
        });
        Ok(Response::new(
            tokio_stream::wrappers::ReceiverStream::new(rx).boxed(),
        ))
    }

    async fn solve(
        &self,
        request: Request<pb::SolveRequest>,
    ) -> std::result::Result<Response<pb::SolveResponse>, Status> {
        ok(self.solve_inner(request.into_inner()).await)
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> std::result::Result<Response<BoxStream<pb::StatusResponse>>, Status> {
        let req = request.into_inner();
        if req.r#ref.is_empty() {
            return Err(Error::invalid("status request without a build ref").into());
        }
        // a finished build replays its stored log (buildkitd checks the history first)
        let history = self.history.clone();
        let r = req.r#ref.clone();
        let stored = tokio::task::spawn_blocking(move || history.logs(&r))
            .await
            .map_err(|e| Error::internal(format!("history task: {e}")))??;
        let stream = match stored {
            Some(events) => futures::stream::iter(events.into_iter().map(Ok)).boxed(),
            None => {
                let job = self.jobs.get(&req.r#ref, STATUS_WAIT).await?;
                job.progress.subscribe().map(Ok).boxed()
            }
        };
        let mut resp = Response::new(stream);
        if let Ok(v) = chrono::Utc::now()
            .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
            .parse()
        {
            resp.metadata_mut().insert("buildkit-current-timestamp", v);
        }
        Ok(resp)
    }

    async fn session(
        &self,
        request: Request<tonic::Streaming<pb::BytesMessage>>,
    ) -> std::result::Result<Response<BoxStream<pb::BytesMessage>>, Status> {
        let span = tracing::info_span!(
            "session.attach",
            session = request
                .metadata()
                .get(tunnel::HDR_UUID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        );
        let s = tunnel::serve(self.sessions.clone(), request)
            .instrument(span)
            .await?;
        Ok(Response::new(s))
    }

    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> std::result::Result<Response<pb::ListWorkersResponse>, Status> {
        let req = request.into_inner();
        ok(crate::workers::list(&self.worker, &req.filter)
            .map(|record| pb::ListWorkersResponse { record }))
    }

    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> std::result::Result<Response<pb::InfoResponse>, Status> {
        Ok(Response::new(pb::InfoResponse {
            buildkit_version: Some(crate::workers::version()),
        }))
    }

    async fn listen_build_history(
        &self,
        request: Request<pb::BuildHistoryRequest>,
    ) -> std::result::Result<Response<BoxStream<pb::BuildHistoryEvent>>, Status> {
        let req = request.into_inner();
        let history = self.history.clone();
        let stream = tokio::task::spawn_blocking(move || history.listen(req))
            .await
            .map_err(|e| Error::internal(format!("history task: {e}")))??;
        let mut resp = Response::new(stream);
        if let Ok(v) = chrono::Utc::now()
            .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
            .parse()
        {
            resp.metadata_mut().insert("buildkit-current-timestamp", v);
        }
        Ok(resp)
    }

    async fn update_build_history(
        &self,
        request: Request<pb::UpdateBuildHistoryRequest>,
    ) -> std::result::Result<Response<pb::UpdateBuildHistoryResponse>, Status> {
        let req = request.into_inner();
        let history = self.history.clone();
        tokio::task::spawn_blocking(move || history.update(&req))
            .await
            .map_err(|e| Error::internal(format!("history task: {e}")))??;
        Ok(Response::new(pb::UpdateBuildHistoryResponse {}))
    }
}

/// The platforms of a result (`exptypes.ParsePlatforms`): its `refs.platforms`, else the one of
/// its image config (or berthd's), keyed by its normalized `os/arch[/variant]`.
fn result_platforms(
    result: &crate::jobs::BuildResult,
) -> Result<Vec<(String, exporter::image::Platform)>> {
    if result.metadata.contains_key("refs.platforms") {
        return crate::export_image::parse_platforms(&result.metadata);
    }
    #[derive(serde::Deserialize)]
    struct Cfg {
        #[serde(default)]
        os: String,
        #[serde(default)]
        architecture: String,
        #[serde(default)]
        variant: String,
    }
    let mut p = exporter::image::Platform::native();
    if let Some(c) = result.metadata.get("containerimage.config") {
        let c: Cfg = serde_json::from_slice(c)
            .map_err(|e| Error::invalid(format!("containerimage.config: {e}")))?;
        if !c.os.is_empty() && !c.architecture.is_empty() {
            p = exporter::image::Platform {
                os: c.os,
                architecture: c.architecture,
                variant: c.variant,
            };
        }
    }
    Ok(vec![(exporter::attestation::format_platform(&p), p)])
}
