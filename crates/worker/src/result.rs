//! Build results: committed snapshots of layerstore's [`SnapshotStore`], kept alive by leases.

use std::path::Path;
use std::sync::Arc;

use layerstore::snapshot::{Chain, Lease, Mount, SnapshotId, SnapshotStore};

use crate::error::{Error, Result};

/// A committed snapshot protected from pruning by a lease for as long as any clone lives.
/// This is the solver's result type.
#[derive(Clone)]
pub(crate) struct Snap(Arc<SnapInner>);

struct SnapInner {
    id: SnapshotId,
    chain: Chain,
    _lease: Lease,
}

impl std::fmt::Debug for Snap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Snap({})", self.0.id)
    }
}

impl Snap {
    /// Leases committed snapshot `id` (blocking: DB writes). Fails if it no longer exists.
    pub(crate) fn acquire(store: &SnapshotStore, id: SnapshotId) -> Result<Snap> {
        let lease = store.lease().map_err(Error::store("lease"))?;
        lease.add(&id).map_err(Error::store("lease snapshot"))?;
        let chain = store
            .info(&id)
            .map_err(Error::store("snapshot info"))?
            .chain;
        Ok(Snap(Arc::new(SnapInner {
            id,
            chain,
            _lease: lease,
        })))
    }

    pub(crate) fn id(&self) -> &SnapshotId {
        &self.0.id
    }

    pub(crate) fn chain(&self) -> &Chain {
        &self.0.chain
    }
}

/// A solved build result: an immutable filesystem state (a committed snapshot in layerstore's
/// [`SnapshotStore`]). Cheap to clone; the snapshot cannot be pruned while a clone lives.
///
/// The empty result (scratch) has no snapshot.
#[derive(Clone)]
pub struct SolvedRef {
    pub(crate) snap: Option<Snap>,
    pub(crate) store: SnapshotStore,
    pub(crate) sources: Arc<Vec<ResultSource>>,
    /// The Docker base images the result was built on, pinned while a clone lives.
    pub(crate) bases: Option<Arc<crate::ops::source_image::BaseImages>>,
    /// What the solve that made this result evaluated (set on results of [`crate::Worker::solve`]).
    pub(crate) trace: Option<Arc<crate::remote::SolveTrace>>,
    /// The definition the result was solved from (set on results of [`crate::Worker::solve`]):
    /// solving it again makes the same result on base images resolved again.
    pub(crate) definition: Option<Arc<protos::pb::Definition>>,
}

/// A source op of the definition a result was solved from (build information: BuildKit's
/// `containerimage.buildinfo` lists them).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ResultSource {
    /// The source identifier (`docker-image://…`, `git://…`, `https://…`, `local://…`).
    pub identifier: String,
    /// Its attributes (`git.fullurl`, `http.checksum`, …).
    pub attrs: std::collections::BTreeMap<String, String>,
    /// What the build resolved it to (empty when the build did not resolve it): a git commit,
    /// an HTTP content digest, an image's digest (the one the reference pins, else the image ID
    /// the worker used).
    pub pin: String,
}

impl std::fmt::Debug for SolvedRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SolvedRef")
            .field("snapshot", &self.snap.as_ref().map(|s| s.id().to_string()))
            .finish()
    }
}

static EMPTY_CHAIN: std::sync::OnceLock<Chain> = std::sync::OnceLock::new();

impl SolvedRef {
    /// A bare result for snapshot `snap` (a failed step's state handed out for inspection; no
    /// sources, bases or trace).
    pub(crate) fn of_snap(store: &SnapshotStore, snap: Snap) -> SolvedRef {
        SolvedRef {
            snap: Some(snap),
            store: store.clone(),
            sources: Default::default(),
            bases: None,
            trace: None,
            definition: None,
        }
    }

    /// The source ops of the definition this result was solved from (those its target depends
    /// on), sorted and without duplicates; empty for scratch.
    pub fn sources(&self) -> &[ResultSource] {
        &self.sources
    }

    /// True for the empty filesystem (no layers).
    pub fn is_empty(&self) -> bool {
        self.chain().is_empty()
    }

    /// The committed snapshot, `None` for the scratch result of an empty definition.
    pub fn snapshot_id(&self) -> Option<&SnapshotId> {
        self.snap.as_ref().map(|s| s.id())
    }

    /// The layer chain, bottom first (berth layers and Docker layers). Exporters turn each
    /// layer into a tar or reuse Docker's.
    pub fn chain(&self) -> &Chain {
        match &self.snap {
            Some(s) => s.chain(),
            None => EMPTY_CHAIN.get_or_init(Chain::default),
        }
    }

    /// Checks that the Docker base images the result was built on in place still have all their
    /// layers. An exporter that failed calls it: if a base was removed (its pin removed by force,
    /// dockerd restarted), this error names the image and what removed it, which is what the
    /// user needs instead of the exporter's own (a missing file deep in Docker's store).
    pub async fn check_base_images(&self) -> Result<()> {
        match &self.bases {
            Some(b) => b.check().await,
            None => Ok(()),
        }
    }

    /// The error naming a Docker base image the result was built on in place that went before
    /// its pin ever ran (a routine cleanup in the window before a build is pinned, see
    /// `layerstore::dockerstore::pin_image_after`), if one did: what failed on it (an export
    /// into Docker) may succeed when the build runs again on the image resolved again.
    pub async fn base_lost_before_pinned(&self) -> Option<Error> {
        match &self.bases {
            Some(b) => b.lost_before_pinned().await.map(|(_, e)| e),
            None => None,
        }
    }

    /// Before the result's files are read: waits until the pins of the Docker base images it was
    /// built on in place run (a solve whose result nothing was to read did not wait for them, and
    /// made them only if it outlived the pin delay, see `crate::SolveContext::result_unread`;
    /// waiting here makes a delayed pin at once), then checks that their layers were there all
    /// along. [`SolvedRef::mount`] and gateway containers do this themselves; an exporter that
    /// reads the layers of [`SolvedRef::chain`] calls it first. Cheap once the pins run.
    ///
    /// Errors: a base that went (before its pin ran, or removed by force), naming the image and
    /// what removed it; [`SolvedRef::base_lost_before_pinned`] tells whether solving
    /// [`SolvedRef::definition`] again may help.
    pub async fn wait_for_pins(&self) -> Result<()> {
        let Some(bases) = &self.bases else {
            return Ok(());
        };
        bases.wait_running().await;
        bases.confirm().await
    }

    /// The definition this result was solved from (`None` for scratch, a failed step's state
    /// and results inside a trace): solving it again (e.g. after a base image went before its
    /// pin ran) makes the same result.
    pub fn definition(&self) -> Option<&protos::pb::Definition> {
        self.definition.as_deref()
    }

    /// What the solve that produced this result evaluated (for cache exports); `None` for
    /// results inside a trace and for scratch.
    pub fn trace(&self) -> Option<&crate::remote::SolveTrace> {
        self.trace.as_deref()
    }

    /// The snapshot store the result lives in.
    pub fn store(&self) -> &SnapshotStore {
        &self.store
    }

    /// Mounts the result read-only; the mount lives as long as the returned guard. Waits for
    /// the base images' pins first ([`SolvedRef::wait_for_pins`]).
    pub async fn mount(&self) -> Result<ReadOnlyMount> {
        self.wait_for_pins().await?;
        let store = self.store.clone();
        let snap = self.snap.clone();
        let m = tokio::task::spawn_blocking(move || match &snap {
            Some(s) => store.mount(s.id(), None),
            None => store.mount_chain(&Chain::default(), None),
        })
        .await
        .map_err(|e| Error::Internal(format!("mount task: {e}")))?
        .map_err(Error::store("mount result"))?;
        Ok(ReadOnlyMount { mount: m })
    }
}

/// A read-only view of a [`SolvedRef`] at [`ReadOnlyMount::path`]; unmounted on drop.
#[derive(Debug)]
pub struct ReadOnlyMount {
    mount: Mount,
}

impl ReadOnlyMount {
    /// Where the result's root directory is visible.
    pub fn path(&self) -> &Path {
        self.mount.path()
    }
}
