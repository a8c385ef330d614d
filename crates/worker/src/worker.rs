//! [`Worker`]: solves LLB definitions into [`SolvedRef`]s.

use std::path::PathBuf;
use std::sync::Arc;

use layerstore::snapshot::SnapshotStore;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::progress::ProgressSink;
use crate::result::SolvedRef;
use crate::session::SessionProvider;

/// Entitlement allowing `network=host` execs.
pub const ENTITLEMENT_NETWORK_HOST: &str = "network.host";
/// Entitlement allowing `security=insecure` execs.
pub const ENTITLEMENT_SECURITY_INSECURE: &str = "security.insecure";

/// The platform the worker builds for (`os/arch[/variant]`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// GOARCH-style name (`amd64`, `arm64`...).
    pub architecture: String,
    /// `v8`, `v7`... or empty.
    pub variant: String,
}

impl Platform {
    /// The platform of the machine berth runs on.
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "arm" => "arm",
            "powerpc64" => "ppc64le",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            other => other,
        };
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: String::new(),
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if !self.variant.is_empty() {
            write!(f, "/{}", self.variant)?;
        }
        Ok(())
    }
}

/// How to construct a [`Worker`]. Start from [`WorkerOptions::new`] and set fields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkerOptions {
    /// berth's root (`--root`): the snapshot store lives in `<root>/snapshots` (layers, metadata
    /// DB with the cache keys), the worker's own files in `<root>/worker` (local syncs).
    pub root: PathBuf,
    /// Maximum number of vertices executing at once, across all builds (at least 1).
    pub max_parallelism: usize,
    /// Docker Engine API address (`unix:///var/run/docker.sock`), for image sources.
    pub docker_host: Option<String>,
    /// A ready client for that Engine (e.g. the daemon's instrumented one); when `None` the
    /// worker connects to `docker_host` itself.
    pub docker: Option<bollard::Docker>,
    /// The data root of the dockerd at `docker_host` (`--docker-data-root`): when that daemon
    /// does not answer, image sources resolve base images from this data root in place
    /// (see `ops::source_image`).
    pub docker_data_root: Option<PathBuf>,
    /// Where the Engine's containerd listens when that Engine keeps its images in containerd
    /// (`--containerd-worker-addr`/`-namespace`; unset: what `GET /info` reports, else
    /// containerd's default socket). Base images are then used in place from its snapshots.
    pub containerd: containerdstore::EndpointOptions,
    /// Registry client (buildkitd.toml's `[registry."host"]`) for images Docker lacks.
    pub registry: registry::Registry,
    /// Where pulls record each layer's registry descriptor (pushes reuse foreign and
    /// uncompressed layers as they were); `None`: not recorded.
    pub blobs: Option<registry::BlobCache>,
    /// Entitlements the daemon allows at all (`network.host`, `security.insecure`); a build
    /// gets an entitlement only if it asks for it and it is listed here.
    pub allowed_entitlements: Vec<String>,
    /// Platform used for ops without one.
    pub default_platform: Platform,
}

impl WorkerOptions {
    /// Options with defaults: parallelism = number of CPUs, no docker host, no entitlements,
    /// host platform.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        WorkerOptions {
            root: root.into(),
            max_parallelism: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            docker_host: None,
            docker: None,
            docker_data_root: None,
            containerd: Default::default(),
            registry: registry::Registry::new(registry::Hosts::new(Default::default())),
            blobs: None,
            allowed_entitlements: vec![],
            default_platform: Platform::host(),
        }
    }
}

/// Per-build context given to [`Worker::solve`].
#[derive(Clone)]
#[non_exhaustive]
pub struct SolveContext {
    /// Build (job) id, used in logs and as the session-owner key.
    pub build_id: String,
    /// Access to the client session.
    pub session: Arc<dyn SessionProvider>,
    /// Where progress goes.
    pub progress: ProgressSink,
    /// Cancels the build; every running step stops and releases its mounts.
    pub cancel: CancellationToken,
    /// Entitlements the client asked for (`SolveRequest.Entitlements`).
    pub entitlements: Vec<String>,
    /// Caches imported for this build (`--import-cache`), asked after the local cache.
    pub cache_imports: Vec<crate::remote::CacheSourceRef>,
    /// Whether anything reads the result's files after the solve (an export, a frontend): then
    /// the solve ends only once the pins of the base images used in place run (see
    /// [`SolveContext::result_unread`]).
    pub result_read: bool,
    /// Whether the build's cache is exported (`--export-cache`): then its steps compute
    /// BuildKit v0.11.6's own cache keys too (content keys of copied files), so that the export
    /// carries records stock buildkitd finds. A build with an imported cache computes them
    /// anyway (to find a stock export's records); other builds skip that work.
    pub stock_keys: bool,
}

impl std::fmt::Debug for SolveContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SolveContext")
            .field("build_id", &self.build_id)
            .field("entitlements", &self.entitlements)
            .finish_non_exhaustive()
    }
}

impl SolveContext {
    /// A context with no entitlements.
    pub fn new(
        build_id: impl Into<String>,
        session: Arc<dyn SessionProvider>,
        progress: ProgressSink,
        cancel: CancellationToken,
    ) -> Self {
        SolveContext {
            build_id: build_id.into(),
            session,
            progress,
            cancel,
            entitlements: vec![],
            cache_imports: vec![],
            result_read: true,
            stock_keys: false,
        }
    }

    /// Sets whether the build's cache is exported (see [`SolveContext::stock_keys`]).
    pub fn with_cache_export(mut self, exported: bool) -> Self {
        self.stock_keys = exported;
        self
    }

    /// Nothing reads the result's files after the solve (a build without exports, or one only
    /// loaded into Docker by the image exporter): the solve does not wait for the pins of its
    /// base images to run, and they are made only if the build outlives a short delay
    /// (`BERTH_PIN_DELAY_MS`, see `layerstore::dockerstore::pin_image_after`). Whatever reads
    /// the result's files later waits for them then ([`SolvedRef::wait_for_pins`]; a mount of
    /// the result and a gateway container do): `docker container prune` removes a pin container
    /// that does not run yet, and the base with it.
    ///
    /// [`SolvedRef::wait_for_pins`]: crate::SolvedRef::wait_for_pins
    pub fn result_unread(mut self) -> Self {
        self.result_read = false;
        self
    }

    /// Sets the caches imported for this build.
    pub fn with_cache_imports(mut self, imports: Vec<crate::remote::CacheSourceRef>) -> Self {
        self.cache_imports = imports;
        self
    }

    /// Sets the requested entitlements.
    pub fn with_entitlements(mut self, entitlements: Vec<String>) -> Self {
        self.entitlements = entitlements;
        self
    }
}

/// The LLB worker. Cheap to clone; all clones share the cache and the parallelism limit.
#[derive(Clone)]
pub struct Worker {
    pub(crate) inner: Arc<crate::llbsolver::Inner>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("root", &self.inner.opts.root)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Opens (creating) the worker state under `opts.root`.
    pub fn new(opts: WorkerOptions) -> Result<Self> {
        if opts.max_parallelism == 0 {
            return Err(Error::InvalidRequest {
                reason: "max_parallelism must be at least 1".into(),
            });
        }
        Ok(Worker {
            inner: Arc::new(crate::llbsolver::Inner::open(opts, None)?),
        })
    }

    /// Like [`Worker::new`], with a snapshot store the caller already opened on the same root
    /// (the daemon shares it for DiskUsage/Prune).
    pub fn with_store(opts: WorkerOptions, store: SnapshotStore) -> Result<Self> {
        if opts.max_parallelism == 0 {
            return Err(Error::InvalidRequest {
                reason: "max_parallelism must be at least 1".into(),
            });
        }
        Ok(Worker {
            inner: Arc::new(crate::llbsolver::Inner::open(opts, Some(store))?),
        })
    }

    /// The snapshot store holding the worker's results (for DiskUsage, Prune, exporters).
    pub fn snapshot_store(&self) -> &SnapshotStore {
        &self.inner.store
    }

    /// The options the worker was built with.
    pub fn options(&self) -> &WorkerOptions {
        &self.inner.opts
    }

    /// LLB cap IDs this worker supports (`LLBCaps` to advertise; definitions whose metadata
    /// requires any other cap are rejected).
    pub fn supported_caps() -> &'static [&'static str] {
        crate::llbsolver::caps::SUPPORTED
    }

    /// Solves `def` and returns its result. An empty definition (no ops) yields the empty
    /// result (scratch), as buildkitd does.
    ///
    /// Errors: malformed definitions → [`crate::ErrorKind::InvalidArgument`] naming the op; a
    /// failing step → an [`Error::Vertex`] naming the step; cancellation → `Canceled`.
    pub async fn solve(&self, def: protos::pb::Definition, ctx: SolveContext) -> Result<SolvedRef> {
        crate::llbsolver::solve(&self.inner, def, ctx).await
    }

    /// [`Worker::solve`], also returning every evaluated vertex's output keys and results (for
    /// cache exports).
    pub async fn solve_traced(
        &self,
        def: protos::pb::Definition,
        ctx: SolveContext,
    ) -> Result<(SolvedRef, crate::remote::SolveTrace)> {
        crate::llbsolver::solve_traced(&self.inner, def, ctx).await
    }

    /// The empty result (scratch).
    pub fn scratch(&self) -> SolvedRef {
        self.inner.scratch()
    }
}
