//! Frontends run inside berthd: the one place that maps a frontend name to its
//! implementation ([`solve`], used by `Control.Solve` and `LLBBridge.Solve`), and the
//! in-process bridge the built-in `dockerfile.v0` talks to (the `frontend` crate's
//! [`Bridge`]: solves on the job's backend and session, file reads from results,
//! `ResolveImageConfig` as the gateway answers it, warnings into the job's progress).
//!
//! `gateway.v0` (frontend images) is its own arm; a `# syntax=` line naming an image re-enters
//! here as `gateway.v0` with `source=<image>`, as buildkitd's built-in frontend forwards it.
//! The image (from Docker's store in place, else its registry) runs as a container whose
//! stdin/stdout carry the LLBBridge gRPC connection, served by [`crate::gateway::Gateway`]
//! bound to the build ([`crate::gateway::FrontendScope`]); the `gateway` crate runs the
//! container. As buildkitd (`frontend/gateway/gateway.go`, v0.11.6): an error the frontend
//! returned wins over its exit status, which wins over a result it returned; a frontend that
//! exits 0 without returning is an error. A failed frontend's error names the image, its exit
//! code and the end of its standard error.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use frontend::dockerfile::{self as dockerfile, Bridge, BridgeError};
use protos::moby::buildkit::v1::frontend as gw;
use protos::moby::buildkit::v1::types::WorkerRecord;
use protos::pb;

use crate::errors::{Error, Result};
use crate::jobs::{BuildResult, Job};
use crate::solver::{Backend, FsRef, SolveCtx};

/// What frontends need from the daemon.
pub struct Frontends {
    /// Solve backend.
    pub backend: Arc<Backend>,
    /// Docker access for image configs.
    pub docker: Arc<crate::docker::Docker>,
    /// The worker record (platforms).
    pub worker: WorkerRecord,
}

/// Runs frontend `name` for `job` with `opts` and `inputs`.
pub fn solve<'a>(
    fe: &'a Frontends,
    job: &'a Arc<Job>,
    name: &'a str,
    opts: BTreeMap<String, String>,
    inputs: BTreeMap<String, pb::Definition>,
) -> Pin<Box<dyn Future<Output = Result<BuildResult>> + Send + 'a>> {
    Box::pin(async move {
        match name {
            "dockerfile.v0" => dockerfile_v0(fe, job, opts, inputs).await,
            "gateway.v0" => gateway_v0(fe, job, opts, inputs).await,
            _ => Err(Error::invalid(format!("unsupported frontend {name}"))),
        }
    })
}

/// `BUILDKIT_EXPORTEDPRODUCT` (buildkitd's `apicaps.ExportedProduct`).
const EXPORTED_PRODUCT: &str = "buildkit";

/// Message size limit of a frontend's LLBBridge connection (the main listener's).
const MAX_MESSAGE: usize = 64 << 20;

/// `gateway.v0`: runs the frontend image named by option `source` (see the module docs).
async fn gateway_v0(
    fe: &Frontends,
    job: &Arc<Job>,
    opts: BTreeMap<String, String>,
    inputs: BTreeMap<String, pb::Definition>,
) -> Result<BuildResult> {
    let source = opts
        .get("source")
        .ok_or_else(|| Error::invalid("no source specified for gateway"))?;
    let reference = llb::normalize_ref(source);
    let (digest, config) = resolve_with_progress(
        fe,
        job,
        gw::ResolveImageConfigRequest {
            r#ref: reference.clone(),
            session_id: job.session_id.clone(),
            log_name: format!("resolve image config for {reference}"),
            ..Default::default()
        },
    )
    .await?;
    let image = frontend_image(&config)
        .map_err(|e| Error::invalid(format!("frontend image {reference}: config: {e}")))?;
    // An image in the bound Docker Engine is used in place (the worker finds it by name);
    // one from a registry is pinned to the digest it resolved to.
    let in_docker =
        matches!(fe.docker.image_config(&reference, None).await, Ok((_, c)) if c == config);
    let pinned = if in_docker || digest.is_empty() || reference.contains('@') {
        reference.clone()
    } else {
        format!("{reference}@{digest}")
    };
    let definition = llb::image(&pinned)
        .record_type("frontend")
        .state()
        .marshal()
        .map_err(|e| Error::internal(format!("frontend image {pinned}: definition: {e}")))?;
    let ctx = SolveCtx {
        job_id: job.id.clone(),
        session_id: job.session_id.clone(),
        progress: job.progress.clone(),
        cancel: job.cancel.clone(),
        entitlements: job.entitlements.clone(),
        cache_imports: job.cache_imports.lock().unwrap().clone(),
        cache_export: job.cache_export.load(std::sync::atomic::Ordering::Relaxed),
    };
    let rootfs = match fe.backend.solve(Some(definition.clone()), &ctx).await {
        Err(_) if job.cancel.is_cancelled() => return Err(job.cancel_error()),
        Err(e) => return Err(e.context(format!("frontend image {pinned}"))),
        Ok(FsRef::Solved(r)) => r,
        Ok(FsRef::Scratch) => {
            return Err(Error::invalid(format!(
                "gateway source {pinned} didn't return default result"
            )))
        }
    };
    let spec = gateway::FrontendSpec {
        rootfs,
        definition,
        image,
        opts,
        has_inputs: !inputs.is_empty(),
        session_id: job.session_id.clone(),
        workers_json: workers_json(&fe.worker),
        product: EXPORTED_PRODUCT.to_string(),
    };
    let session = Arc::new(crate::session::provider::JobSession::new(
        fe.backend.sessions.clone(),
        job.session_id.clone(),
    ));
    let run = gateway::run_frontend(
        fe.backend.worker(),
        spec,
        session,
        fe.backend.root.clone(),
        &job.cancel,
    )
    .await
    .map_err(crate::containers::gateway_error)?;
    let scope = Arc::new(crate::gateway::FrontendScope {
        job: job.clone(),
        inputs,
        returned: std::sync::Mutex::new(None),
    });
    let bridge = crate::gateway::Gateway {
        scope: Some(scope.clone()),
        jobs: crate::jobs::Jobs::new(),
        backend: fe.backend.clone(),
        worker: fe.worker.clone(),
        docker: fe.docker.clone(),
    };
    let svc = gw::llb_bridge_server::LlbBridgeServer::new(bridge)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let conn = tokio_stream::once(Ok::<_, std::io::Error>(FrontendIo(run.conn)));
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(conn),
    );
    // The process ending (or being killed when the build is canceled) ends the wait.
    let outcome = run.done.await;
    server.abort();
    let outcome =
        outcome.map_err(|e| Error::internal(format!("frontend {reference}: runner: {e}")))?;
    let returned = scope.returned.lock().unwrap().take();
    if job.cancel.is_cancelled() {
        return Err(job.cancel_error());
    }
    match (returned, outcome.result) {
        (Some(Err(e)), _) => Err(e),
        (_, Err(p)) => {
            let mut message = format!("frontend {reference} failed: {p}");
            if !outcome.stderr.is_empty() {
                message.push_str(": ");
                message.push_str(&outcome.stderr);
            }
            let base = crate::containers::gateway_error(p.into());
            Err(Error::Remote {
                code: base.code(),
                message,
            }
            .with_details(base.details()))
        }
        (Some(Ok(r)), Ok(())) => Ok(r),
        (None, Ok(())) => Err(Error::failed(format!(
            "frontend {reference} exited without returning a result"
        ))),
    }
}

/// The parts of an image config (JSON) a frontend container uses.
fn frontend_image(config: &[u8]) -> std::result::Result<gateway::FrontendImage, serde_json::Error> {
    #[derive(serde::Deserialize, Default)]
    #[serde(rename_all = "PascalCase", default)]
    struct Config {
        env: Option<Vec<String>>,
        entrypoint: Option<Vec<String>>,
        working_dir: Option<String>,
        labels: Option<BTreeMap<String, String>>,
    }
    #[derive(serde::Deserialize, Default)]
    #[serde(default)]
    struct Image {
        config: Config,
    }
    let img: Image = serde_json::from_slice(config)?;
    Ok(gateway::FrontendImage {
        env: img.config.env.unwrap_or_default(),
        entrypoint: img.config.entrypoint.unwrap_or_default(),
        working_dir: img.config.working_dir.unwrap_or_default(),
        labels: img.config.labels.unwrap_or_default(),
    })
}

/// `BUILDKIT_WORKERS`: the worker as Go's `client.WorkerInfo` JSON array.
fn workers_json(w: &WorkerRecord) -> String {
    let platforms: Vec<_> = w
        .platforms
        .iter()
        .map(|p| {
            let mut v = serde_json::json!({ "architecture": p.architecture, "os": p.os });
            if !p.variant.is_empty() {
                v["variant"] = p.variant.clone().into();
            }
            v
        })
        .collect();
    serde_json::json!([{ "id": w.id, "labels": w.labels, "platforms": platforms }]).to_string()
}

/// `ResolveImageConfig` for a frontend, shown as a vertex in the build's progress.
async fn resolve_with_progress(
    fe: &Frontends,
    job: &Arc<Job>,
    req: gw::ResolveImageConfigRequest,
) -> Result<(String, Vec<u8>)> {
    let d = crate::progress::synthetic_digest(&format!(
        "resolve-image-config-{}-{}",
        job.id, req.r#ref
    ));
    job.progress
        .vertex_started(&d, &req.log_name, &[], None, std::time::SystemTime::now());
    let res = crate::gateway::resolve_config(&fe.backend, &fe.docker, job, &req).await;
    job.progress.vertex_completed(
        &d,
        false,
        res.as_ref().err().map(|e| e.to_string()),
        std::time::SystemTime::now(),
    );
    res
}

/// A frontend's stdio connection as tonic's server takes it.
struct FrontendIo(gateway::StdioConn);

impl tonic::transport::server::Connected for FrontendIo {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl tokio::io::AsyncRead for FrontendIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for FrontendIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The registry digest berth's pull of `reference` recorded for the image whose config is
/// `config` (the pull source of its top layer, `name:tag@digest` for this name), if any.
fn pulled_digest(backend: &Backend, reference: &str, config: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct RootFs {
        diff_ids: Vec<String>,
    }
    #[derive(serde::Deserialize)]
    struct Cfg {
        rootfs: RootFs,
    }
    let cfg: Cfg = serde_json::from_slice(config).ok()?;
    let top = cfg.rootfs.diff_ids.last()?;
    let record = backend.image_export.blobs.source(top)?;
    let (name, digest) = record.reference.split_once('@')?;
    let norm = |r: &str| exporter::normalize_name(r).unwrap_or_else(|_| r.to_string());
    (norm(name) == norm(reference)).then(|| digest.to_string())
}

async fn dockerfile_v0(
    fe: &Frontends,
    job: &Arc<Job>,
    opts: BTreeMap<String, String>,
    inputs: BTreeMap<String, pb::Definition>,
) -> Result<BuildResult> {
    let recorder = Arc::new(crate::provenance::Recorder::default());
    let captured = crate::provenance::Captured {
        frontend: "dockerfile.v0".into(),
        opts: opts.clone(),
        has_inputs: !inputs.is_empty(),
        recorder: recorder.clone(),
    };
    let bridge = InProcess {
        fe,
        job,
        recorder,
        forwarded: Default::default(),
        forwarded_attestations: Default::default(),
        opts: dockerfile::BuildOpts {
            opts,
            session_id: job.session_id.clone(),
            inputs,
            worker_platforms: fe
                .worker
                .platforms
                .iter()
                .map(|p| dockerfile::Platform {
                    os: p.os.clone(),
                    architecture: p.architecture.clone(),
                    variant: p.variant.clone(),
                })
                .collect(),
        },
    };
    let res = dockerfile::build(&bridge).await.map_err(|e| {
        if job.cancel.is_cancelled() {
            return job.cancel_error();
        }
        to_error(e)
    })?;
    // A result another frontend made (`# syntax=`) has that frontend's provenance.
    let provenance = match bridge.forwarded.lock().unwrap().take() {
        Some(p) => p,
        None => {
            let captured = Arc::new(captured);
            let keys: Vec<String> = if res.refs.is_empty() {
                vec![String::new()]
            } else {
                res.refs.keys().cloned().collect()
            };
            keys.into_iter().map(|k| (k, captured.clone())).collect()
        }
    };
    // Likewise its attestations (a `# syntax=` frontend's SBOM or its own statements).
    let attestations = match bridge.forwarded_attestations.lock().unwrap().take() {
        Some(a) => a,
        None => res
            .attestations
            .into_iter()
            .map(|(k, atts)| (k, atts.into_iter().map(attestation).collect()))
            .collect(),
    };
    Ok(BuildResult {
        fs: res.r#ref,
        refs: res.refs,
        defs: res.defs,
        metadata: res
            .metadata
            .into_iter()
            .map(|(k, v)| (k, Bytes::from(v)))
            .collect(),
        attestations,
        provenance,
    })
}

/// A frontend attestation as the daemon keeps it.
fn attestation(a: dockerfile::Attestation<FsRef>) -> crate::attestations::ResultAttestation {
    crate::attestations::ResultAttestation {
        kind: match a.kind {
            dockerfile::AttestationKind::InToto => crate::attestations::Kind::InToto,
            dockerfile::AttestationKind::Bundle => crate::attestations::Kind::Bundle,
        },
        metadata: a
            .metadata
            .into_iter()
            .map(|(k, v)| (k, Bytes::from(v)))
            .collect(),
        fs: a.r#ref,
        path: a.path,
        predicate_type: a.predicate_type,
        subjects: vec![],
        content: None,
        provenance_layers: vec![],
    }
}

/// The daemon error of a frontend error: a daemon error passed through keeps its code and
/// details; Dockerfile lines become an `errdefs.Source` detail.
fn to_error(e: dockerfile::Error) -> Error {
    use protos::details::JsonDetail as _;
    let source = e.location().and_then(|l| {
        l.source.as_ref().map(|sm| {
            protos::errdefs::Source {
                info: Some(pb::SourceInfo {
                    filename: sm.filename.clone(),
                    data: sm.data.clone().into(),
                    definition: sm.definition.clone(),
                    language: sm.language.clone(),
                }),
                ranges: l.pb_ranges(),
            }
            .to_any()
        })
    });
    let message = e.to_string();
    let base = match e {
        dockerfile::Error::Bridge { source, .. } => match source.downcast::<Error>() {
            Ok(inner) if inner.to_string() == message => *inner,
            Ok(inner) => Error::Remote {
                code: inner.code(),
                message,
            }
            .with_details(inner.details()),
            Err(_) => Error::failed(message),
        },
        _ => Error::failed(message),
    };
    match source {
        Some(s) => base.with_details(vec![s]),
        None => base,
    }
}

struct InProcess<'a> {
    fe: &'a Frontends,
    job: &'a Arc<Job>,
    opts: dockerfile::BuildOpts,
    /// What the frontend asked for (provenance).
    recorder: Arc<crate::provenance::Recorder>,
    /// The provenance of the last result another frontend made for this one.
    forwarded: std::sync::Mutex<Option<BTreeMap<String, Arc<crate::provenance::Captured>>>>,
    /// The attestations of that result, kept as the daemon holds them (with their subjects):
    /// the Dockerfile frontend returns that result as it is (`# syntax=`).
    forwarded_attestations: std::sync::Mutex<Option<crate::attestations::Attestations>>,
}

fn boxed(e: Error) -> BridgeError {
    Box::new(e)
}

impl InProcess<'_> {
    fn ctx(&self) -> SolveCtx {
        SolveCtx {
            job_id: self.job.id.clone(),
            session_id: self.job.session_id.clone(),
            progress: self.job.progress.clone(),
            cancel: self.job.cancel.clone(),
            entitlements: self.job.entitlements.clone(),
            // The build's --import-cache (Control.Solve's Cache.Imports, which buildctl and
            // buildx send along with the cache-imports attribute).
            cache_imports: self.job.cache_imports.lock().unwrap().clone(),
            cache_export: self
                .job
                .cache_export
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Resolves an image config for the frontend behind its own progress vertex (named
    /// `log_name`), as buildkitd shows `[internal] load metadata for …`.
    async fn resolve_config_step(
        &self,
        req: &gw::ResolveImageConfigRequest,
        reference: &str,
        log_name: &str,
    ) -> Result<(String, Vec<u8>)> {
        let job = self.job;
        let d = crate::progress::synthetic_digest(&format!(
            "resolve-image-config-{}-{}",
            job.id, reference
        ));
        job.progress
            .vertex_started(&d, log_name, &[], None, std::time::SystemTime::now());
        let res = crate::gateway::resolve_config(&self.fe.backend, &self.fe.docker, job, req).await;
        job.progress.vertex_completed(
            &d,
            false,
            res.as_ref().err().map(|e| e.to_string()),
            std::time::SystemTime::now(),
        );
        res
    }
}

impl Bridge for InProcess<'_> {
    type Ref = FsRef;

    fn build_opts(&self) -> &dockerfile::BuildOpts {
        &self.opts
    }

    async fn solve(
        &self,
        req: dockerfile::SolveRequest,
    ) -> std::result::Result<dockerfile::BuildResult<FsRef>, BridgeError> {
        if !req.frontend.is_empty() {
            let r = solve(
                self.fe,
                self.job,
                &req.frontend,
                req.frontend_opt,
                req.frontend_inputs,
            )
            .await
            .map_err(boxed)?;
            *self.forwarded.lock().unwrap() = Some(r.provenance.clone());
            *self.forwarded_attestations.lock().unwrap() = Some(r.attestations.clone());
            return Ok(dockerfile::BuildResult {
                r#ref: r.fs,
                refs: r.refs,
                defs: r.defs,
                metadata: r
                    .metadata
                    .into_iter()
                    .map(|(k, v)| (k, v.to_vec()))
                    .collect(),
                attestations: BTreeMap::new(),
            });
        }
        if !req.cache_imports.is_empty() && self.job.cache_imports.lock().unwrap().is_empty() {
            // The frontend's `cache-imports` (a client that set the attribute without
            // Control.Solve's Cache.Imports): read once, then used by every solve of the build.
            let imports = crate::cache::resolve_imports(
                &self.fe.backend,
                &self.fe.backend.sessions,
                &self.job.session_id,
                &req.cache_imports,
            )
            .await;
            let mut held = self.job.cache_imports.lock().unwrap();
            if held.is_empty() {
                *held = imports;
            }
        }
        let def = req.definition.clone();
        // Not waiting for the base images' pins: a read of the result's files, or an export that
        // reads them, waits for them then (`FsRef::wait_for_pins`); the Dockerfile frontend
        // handing the result to the image exporter into this Docker reads nothing.
        let fs = match self
            .fe
            .backend
            .solve_unread(req.definition, &self.ctx())
            .await
        {
            Err(_) if self.job.cancel.is_cancelled() => return Err(boxed(self.job.cancel_error())),
            r => r.map_err(boxed)?,
        };
        crate::provenance::record_solved(&Some(self.recorder.clone()), &def, &fs);
        Ok(dockerfile::BuildResult {
            r#ref: Some(fs),
            refs: BTreeMap::new(),
            defs: BTreeMap::new(),
            metadata: BTreeMap::new(),
            attestations: BTreeMap::new(),
        })
    }

    async fn read_file(&self, r: &FsRef, path: &str) -> std::result::Result<Vec<u8>, BridgeError> {
        let view = self.fe.backend.view(r).await.map_err(boxed)?;
        crate::fsread::read_file(view.path(), path, 0, 0)
            .await
            .map_err(boxed)
    }

    async fn read_file_head(
        &self,
        r: &FsRef,
        path: &str,
        len: usize,
    ) -> std::result::Result<Vec<u8>, BridgeError> {
        let view = self.fe.backend.view(r).await.map_err(boxed)?;
        crate::fsread::read_file(view.path(), path, 0, len as i64)
            .await
            .map_err(boxed)
    }

    async fn resolve_oci_layout_config(
        &self,
        reference: &str,
        platform: &dockerfile::Platform,
        session_id: &str,
        store_id: &str,
        log_name: &str,
    ) -> std::result::Result<(String, Vec<u8>), BridgeError> {
        let req = gw::ResolveImageConfigRequest {
            r#ref: reference.to_string(),
            platform: Some(pb::Platform {
                architecture: platform.architecture.clone(),
                os: platform.os.clone(),
                variant: platform.variant.clone(),
                ..Default::default()
            }),
            log_name: log_name.to_string(),
            resolver_type: crate::gateway::RESOLVER_TYPE_OCI_LAYOUT,
            session_id: session_id.to_string(),
            store_id: store_id.to_string(),
            ..Default::default()
        };
        let res = self.resolve_config_step(&req, reference, log_name).await;
        res.map_err(boxed)
    }

    async fn resolve_image_config(
        &self,
        reference: &str,
        platform: &dockerfile::Platform,
        resolve_mode: &str,
        log_name: &str,
    ) -> std::result::Result<(String, Vec<u8>), BridgeError> {
        let job = self.job;
        let req = gw::ResolveImageConfigRequest {
            r#ref: reference.to_string(),
            platform: Some(pb::Platform {
                architecture: platform.architecture.clone(),
                os: platform.os.clone(),
                variant: platform.variant.clone(),
                ..Default::default()
            }),
            resolve_mode: resolve_mode.to_string(),
            log_name: log_name.to_string(),
            session_id: job.session_id.clone(),
            ..Default::default()
        };
        let res = self.resolve_config_step(&req, reference, log_name).await;
        let (digest, config) = res.map_err(boxed)?;
        // An image the bound Docker Engine has is not pinned as `name@digest`: Docker indexes
        // repository digests only for what it pulled itself (an image built, loaded or
        // imported there has none, or one of another repository), so the worker would not
        // find it by that reference and would go to the registry. The worker pins images by
        // ID for the whole build instead.
        let id = format!(
            "sha256:{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&config))
        );
        // Provenance and build information name what the tag resolved to in its registry, as
        // buildkitd does: for an image berth pulled into Docker earlier (answered from Docker,
        // by ID), the digest its pull recorded for this reference.
        let recorded = (digest == id)
            .then(|| pulled_digest(&self.fe.backend, reference, &config))
            .flatten();
        self.recorder.image(
            reference,
            Some(crate::provenance::Platform {
                os: platform.os.clone(),
                architecture: platform.architecture.clone(),
                variant: platform.variant.clone(),
            }),
            recorded.as_deref().unwrap_or(&digest),
        );
        let wanted = Some((
            platform.os.clone(),
            platform.architecture.clone(),
            platform.variant.clone(),
        ));
        let local = digest == id
            || (resolve_mode != "pull"
                && matches!(self.fe.docker.image_config(reference, wanted).await, Ok((_, c)) if c == config));
        let digest = if local { String::new() } else { digest };
        Ok((digest, config))
    }

    async fn warn(&self, w: dockerfile::Warning) {
        let (info, ranges) = match w.location {
            Some((i, r)) => (Some(i), r),
            None => (None, vec![]),
        };
        self.job
            .progress
            .warning(protos::moby::buildkit::v1::VertexWarning {
                vertex: w.vertex,
                level: 1,
                short: w.short.into_bytes().into(),
                detail: w.detail.into_iter().map(Bytes::from).collect(),
                url: w.url,
                info,
                ranges,
            });
    }
}
