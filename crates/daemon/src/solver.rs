//! The daemon's solve backend: turns a definition into a filesystem result the exporters and the
//! gateway can read.
//!
//! Results are snapshots in berth's layer store (`<root>/snapshots`), leased for the job's
//! lifetime so `prune` cannot remove them mid-build. Until the worker crate's solver is wired in,
//! [`crate::interim_solver`] executes the subset of LLB the end-to-end tests need.

use crate::errors::{Error, Result};
use crate::progress::Progress;
use crate::session::SessionManager;
use layerstore::snapshot::{LayerRef, Mount, SnapshotId, SnapshotStore};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// A solved filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsRef {
    /// The empty filesystem.
    Scratch,
    /// A committed snapshot in the layer store.
    Snapshot(SnapshotId),
}

/// Per-solve context.
#[derive(Clone)]
pub struct SolveCtx {
    /// Job (build ref).
    pub job_id: String,
    /// The job's session id (for local sources without `local.session`).
    pub session_id: String,
    /// Progress of the job.
    pub progress: Arc<Progress>,
    /// Cancels the solve.
    pub cancel: CancellationToken,
    /// Keeps results alive until the job ends.
    pub lease: Arc<layerstore::snapshot::Lease>,
}

/// The backend shared by all jobs.
pub struct Backend {
    /// berth's layer store.
    pub store: SnapshotStore,
    /// State directory.
    pub root: PathBuf,
    /// Client sessions.
    pub sessions: Arc<SessionManager>,
    pub(crate) interim: crate::interim_solver::InterimState,
}

/// A readable view of a result; unmounted/removed on drop.
pub struct FsView {
    path: PathBuf,
    _guard: ViewGuard,
}

/// Keeps the view's backing alive (dropping it removes the temp dir or unmounts).
enum ViewGuard {
    None,
    Temp(#[allow(dead_code)] tempfile::TempDir),
    Mount(#[allow(dead_code)] Mount),
}

impl FsView {
    /// The root directory of the result.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Backend {
    /// Opens the backend over the layer store at `root`.
    pub fn open(root: &Path, sessions: Arc<SessionManager>) -> anyhow::Result<Arc<Self>> {
        let store = SnapshotStore::open(layerstore::snapshot::StoreOptions::new(root))
            .map_err(|e| anyhow::anyhow!("open layer store under {}: {e}", root.display()))?;
        Ok(Arc::new(Backend {
            store,
            root: root.to_path_buf(),
            sessions,
            interim: Default::default(),
        }))
    }

    /// A new job lease.
    pub fn lease(&self) -> Result<Arc<layerstore::snapshot::Lease>> {
        self.store
            .lease()
            .map(Arc::new)
            .map_err(|e| Error::layerstore("create lease", e))
    }

    /// Solves `def` (`None` or empty → scratch).
    pub async fn solve(
        self: &Arc<Self>,
        def: Option<protos::pb::Definition>,
        ctx: &SolveCtx,
    ) -> Result<FsRef> {
        let Some(def) = def else {
            return Ok(FsRef::Scratch);
        };
        let Some(loaded) = crate::definition::load(&def)? else {
            return Ok(FsRef::Scratch);
        };
        tokio::select! {
            r = crate::interim_solver::solve(self, loaded, ctx) => r,
            _ = ctx.cancel.cancelled() => Err(Error::Canceled),
        }
    }

    /// Makes a result readable.
    pub async fn view(&self, r: &FsRef) -> Result<FsView> {
        match r {
            FsRef::Scratch => {
                let tmp = tempfile::Builder::new()
                    .prefix("scratch-")
                    .tempdir_in(self.tmp_dir()?)
                    .map_err(|e| Error::internal(format!("create scratch dir: {e}")))?;
                Ok(FsView {
                    path: tmp.path().to_path_buf(),
                    _guard: ViewGuard::Temp(tmp),
                })
            }
            FsRef::Snapshot(id) => {
                let info = self
                    .store
                    .info(id)
                    .map_err(|e| Error::layerstore(format!("result {id}"), e))?;
                let layers = info.chain.layers();
                if layers.len() == 1 {
                    if let LayerRef::Berth(lid) = &layers[0] {
                        return Ok(FsView {
                            path: self.store.layer_path(lid).join("diff"),
                            _guard: ViewGuard::None,
                        });
                    }
                }
                if layers.is_empty() {
                    return Box::pin(self.view(&FsRef::Scratch)).await;
                }
                let store = self.store.clone();
                let id = id.clone();
                let m = tokio::task::spawn_blocking(move || store.mount(&id, None))
                    .await
                    .map_err(|e| Error::internal(format!("mount task: {e}")))?
                    .map_err(|e| Error::layerstore("mount result", e))?;
                Ok(FsView {
                    path: m.path().to_path_buf(),
                    _guard: ViewGuard::Mount(m),
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
