//! The daemon's solve backend: the worker crate's LLB solver, fed with this daemon's session
//! provider and progress log, and readable views of its results for exporters and the gateway.
//!
//! Results are committed snapshots in the layer store (`<root>/snapshots`), shared with
//! DiskUsage/Prune; a [`FsRef::Solved`] keeps its snapshot leased while any clone lives.

use crate::errors::{Error, Result};
use crate::progress::Progress;
use crate::session::provider::JobSession;
use crate::session::SessionManager;
use layerstore::snapshot::SnapshotStore;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// A solved filesystem.
#[derive(Debug, Clone)]
pub enum FsRef {
    /// The empty filesystem.
    Scratch,
    /// A worker result.
    Solved(worker::SolvedRef),
}

impl FsRef {
    /// What the solve of this result evaluated (for cache exports).
    pub fn trace(&self) -> Option<&worker::SolveTrace> {
        match self {
            FsRef::Scratch => None,
            FsRef::Solved(r) => r.trace(),
        }
    }

    /// Whether this is the empty filesystem.
    pub fn is_scratch(&self) -> bool {
        match self {
            FsRef::Scratch => true,
            FsRef::Solved(r) => r.is_empty() && r.snapshot_id().is_none(),
        }
    }

    /// The definition the result was solved from, if the worker kept it (see
    /// [`worker::SolvedRef::definition`]).
    pub fn definition(&self) -> Option<&protos::pb::Definition> {
        match self {
            FsRef::Scratch => None,
            FsRef::Solved(r) => r.definition(),
        }
    }

    /// Before the result's files are read by anything but a mount of it (which waits itself):
    /// waits for the pins of the base images it uses in place (see
    /// [`worker::SolvedRef::wait_for_pins`]).
    pub async fn wait_for_pins(&self) -> Result<()> {
        match self {
            FsRef::Scratch => Ok(()),
            FsRef::Solved(r) => r.wait_for_pins().await.map_err(Error::from),
        }
    }
}

/// The error of a base image of `fs` that lost its layers (see
/// [`worker::SolvedRef::check_base_images`]), if one did.
pub async fn base_image_lost(fs: &FsRef) -> Option<Error> {
    match fs {
        FsRef::Solved(r) => r.check_base_images().await.err().map(Error::from),
        FsRef::Scratch => None,
    }
}

/// The error naming a base image of `fs` that went before its pin ever ran (see
/// [`worker::SolvedRef::base_lost_before_pinned`]), if one did.
pub async fn base_lost_before_pinned(fs: &FsRef) -> Option<Error> {
    match fs {
        FsRef::Solved(r) => r.base_lost_before_pinned().await.map(Error::from),
        FsRef::Scratch => None,
    }
}

/// Per-solve context.
#[derive(Clone)]
pub struct SolveCtx {
    /// Job (build ref).
    pub job_id: String,
    /// The job's session id (used when a local source names none).
    pub session_id: String,
    /// Progress of the job.
    pub progress: Arc<Progress>,
    /// Cancels the solve.
    pub cancel: CancellationToken,
    /// Entitlements the client asked for.
    pub entitlements: Vec<String>,
    /// Caches imported for this solve (`crate::cache`).
    pub cache_imports: Vec<worker::CacheSourceRef>,
    /// The job exports its build cache ([`crate::jobs::Job::cache_export`]).
    pub cache_export: bool,
}

/// Options the backend takes from the daemon config.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// Docker Engine address.
    pub docker_host: String,
    /// Entitlements the daemon allows (`insecure-entitlements`).
    pub allowed_entitlements: Vec<String>,
    /// Worker parallelism (default: CPUs).
    pub max_parallelism: Option<usize>,
    /// `--docker-data-root`, if given (base images and the image exporter's offline mode when
    /// the daemon does not answer; presence hints).
    pub docker_data_root: Option<PathBuf>,
    /// Registry client (`[registry."host"]`) for pulls and pushes.
    pub registry: registry::Registry,
    /// The Engine's containerd (containerd image store): `--containerd-worker-addr`/`-namespace`.
    pub containerd: containerdstore::EndpointOptions,
    /// Defaults of the exporters that stream to the client.
    pub client_export: crate::export_client::ClientExportOptions,
}

/// The backend shared by all jobs.
pub struct Backend {
    /// berth's layer store (shared with the worker).
    pub store: SnapshotStore,
    /// State directory.
    pub root: PathBuf,
    /// Client sessions.
    pub sessions: Arc<SessionManager>,
    /// Where the `image` exporter sends images.
    pub image_export: crate::export_image::ImageExportOptions,
    /// Defaults of the exporters that stream to the client.
    pub client_export: crate::export_client::ClientExportOptions,
    worker: worker::Worker,
    /// Registry client (`[registry."host"]`) for pulls, `ResolveImageConfig` and pushes.
    pub registry: registry::Registry,
    /// Entitlements the daemon allows (`insecure-entitlements`).
    pub allowed_entitlements: Vec<String>,
}

/// A readable view of a result; unmounted/removed on drop.
pub struct FsView {
    path: PathBuf,
    _guard: ViewGuard,
}

/// Keeps the view's backing alive (dropping it removes the temp dir or unmounts).
enum ViewGuard {
    Temp(#[allow(dead_code)] tempfile::TempDir),
    Mount(#[allow(dead_code)] worker::ReadOnlyMount),
}

impl FsView {
    /// The root directory of the result.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Backend {
    /// Opens the layer store under `root` and the worker on it.
    pub fn open(
        root: &Path,
        sessions: Arc<SessionManager>,
        opts: BackendOptions,
    ) -> anyhow::Result<Arc<Self>> {
        let store = SnapshotStore::open(layerstore::snapshot::StoreOptions::new(root))
            .map_err(|e| anyhow::anyhow!("open layer store under {}: {e}", root.display()))?;
        let mut wopts = worker::WorkerOptions::new(root.join("worker"));
        wopts.docker_host = Some(opts.docker_host.clone());
        // The daemon's client (counted and traced with telemetry on); a missing socket is left
        // to the worker, which then reports it when an image source needs Docker.
        wopts.docker = crate::docker::connect(&opts.docker_host).ok();
        wopts.docker_data_root = opts.docker_data_root.clone();
        wopts.containerd = opts.containerd.clone();
        wopts.allowed_entitlements = opts.allowed_entitlements.clone();
        wopts.registry = opts.registry.clone();
        if let Some(n) = opts.max_parallelism.filter(|n| *n > 0) {
            wopts.max_parallelism = n;
        }
        let blobs = registry::BlobCache::open(root.join("blobs"))
            .map_err(|e| anyhow::anyhow!("open blob cache under {}: {e}", root.display()))?;
        wopts.blobs = Some(blobs.clone());
        let worker = worker::Worker::with_store(wopts, store.clone())
            .map_err(|e| anyhow::anyhow!("open worker under {}: {e}", root.display()))?;
        Ok(Arc::new(Backend {
            store,
            root: root.to_path_buf(),
            sessions,
            image_export: crate::export_image::ImageExportOptions {
                docker_host: opts.docker_host.clone(),
                data_root: opts.docker_data_root.clone(),
                containerd: opts.containerd.clone(),
                registry: opts.registry.clone(),
                blobs,
            },
            client_export: opts.client_export.clone(),
            allowed_entitlements: opts.allowed_entitlements.clone(),
            registry: opts.registry.clone(),
            worker,
        }))
    }

    /// The worker (gateway containers prepare their mounts and run through it).
    pub fn worker(&self) -> &worker::Worker {
        &self.worker
    }

    /// LLB caps the worker supports.
    pub fn llb_caps() -> &'static [&'static str] {
        worker::Worker::supported_caps()
    }

    /// Solves `def` (`None` or empty → scratch).
    pub async fn solve(
        self: &Arc<Self>,
        def: Option<protos::pb::Definition>,
        ctx: &SolveCtx,
    ) -> Result<FsRef> {
        self.solve_read(def, ctx, true).await
    }

    /// [`Backend::solve`] of a result whose files nothing reads yet (a build without exports, one
    /// only loaded into this Docker by the image exporter, a frontend's solve): the solve does not
    /// wait for the pins of its base images, which start only if it outlives a short delay
    /// (`worker::SolveContext::result_unread`). Whatever reads the result's files later waits for
    /// them first ([`FsRef::wait_for_pins`]; [`Backend::view`] does).
    pub async fn solve_unread(
        self: &Arc<Self>,
        def: Option<protos::pb::Definition>,
        ctx: &SolveCtx,
    ) -> Result<FsRef> {
        self.solve_read(def, ctx, false).await
    }

    async fn solve_read(
        self: &Arc<Self>,
        def: Option<protos::pb::Definition>,
        ctx: &SolveCtx,
        read: bool,
    ) -> Result<FsRef> {
        let Some(def) = def else {
            return Ok(FsRef::Scratch);
        };
        if def.def.is_empty() {
            return Ok(FsRef::Scratch);
        }
        let provider = Arc::new(JobSession::new(
            self.sessions.clone(),
            ctx.session_id.clone(),
        ));
        let sink = progress_sink(ctx.progress.clone());
        let wctx =
            worker::SolveContext::new(ctx.job_id.clone(), provider, sink, ctx.cancel.clone())
                .with_entitlements(ctx.entitlements.clone())
                .with_cache_imports(ctx.cache_imports.clone())
                .with_cache_export(ctx.cache_export);
        let wctx = if read { wctx } else { wctx.result_unread() };
        let source = def.source.clone();
        let r = self.worker.solve(def, wctx).await.map_err(|e| {
            let details = vertex_details(source.as_ref(), &e);
            Error::from(e).with_details(details)
        })?;
        Ok(FsRef::Solved(r))
    }

    /// Makes a result readable.
    pub async fn view(&self, r: &FsRef) -> Result<FsView> {
        match r {
            FsRef::Solved(s) if !s.is_empty() => {
                let m = s.mount().await.map_err(Error::from)?;
                Ok(FsView {
                    path: m.path().to_path_buf(),
                    _guard: ViewGuard::Mount(m),
                })
            }
            _ => {
                let tmp = tempfile::Builder::new()
                    .prefix("scratch-")
                    .tempdir_in(self.tmp_dir()?)
                    .map_err(|e| Error::internal(format!("create scratch dir: {e}")))?;
                Ok(FsView {
                    path: tmp.path().to_path_buf(),
                    _guard: ViewGuard::Temp(tmp),
                })
            }
        }
    }

    /// `<root>/tmp`, created on demand.
    pub fn tmp_dir(&self) -> Result<PathBuf> {
        let p = self.root.join("tmp");
        std::fs::create_dir_all(&p)
            .map_err(|e| Error::internal(format!("create {}: {e}", p.display())))?;
        Ok(p)
    }
}

/// The typed details buildkitd attaches to the error of a failed vertex: one `errdefs.Source`
/// per source location the definition gives for that vertex (last location first, the order in
/// which upstream's wrappers are serialized, so that clients list them first-to-last), then
/// `errdefs.Vertex` with its digest.
pub fn vertex_details(
    source: Option<&protos::pb::Source>,
    e: &worker::Error,
) -> Vec<prost_types::Any> {
    use protos::details::JsonDetail;
    let Some(digest) = e.vertex_digest() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(locs) = source.and_then(|s| s.locations.get(digest).map(|l| (s, l))) {
        let (src, locs) = locs;
        for loc in locs.locations.iter().rev() {
            let Some(info) = usize::try_from(loc.source_index)
                .ok()
                .and_then(|i| src.infos.get(i))
            else {
                continue;
            };
            out.push(
                protos::errdefs::Source {
                    info: Some(info.clone()),
                    ranges: loc.ranges.clone(),
                }
                .to_any(),
            );
        }
    }
    out.push(
        protos::errdefs::Vertex {
            digest: digest.to_string(),
        }
        .to_any(),
    );
    out
}

/// Converts the worker's progress events into the job's Status log.
fn progress_sink(p: Arc<Progress>) -> worker::ProgressSink {
    worker::ProgressSink::from_fn(move |ev| match ev {
        worker::ProgressEvent::VertexStarted {
            digest,
            name,
            inputs,
            progress_group,
            started,
        } => {
            let group = progress_group.map(|g| protos::pb::ProgressGroup {
                id: g.id,
                name: g.name,
                weak: g.weak,
            });
            p.vertex_started(&digest, &name, &inputs, group, started);
        }
        worker::ProgressEvent::VertexCompleted {
            digest,
            completed,
            cached,
            error,
            ..
        } => p.vertex_completed(&digest, cached, error, completed),
        worker::ProgressEvent::VertexStatus {
            vertex,
            id,
            name,
            current,
            total,
            started,
            completed,
            ..
        } => p.status(&vertex, &id, &name, current, total, started, completed),
        worker::ProgressEvent::VertexLog {
            vertex,
            stream,
            data,
            ..
        } => p.log(&vertex, stream as i64, &data),
        other => tracing::debug!(event = ?other, "progress event not shown"),
    })
}
