//! [`SnapshotStore`]: the store itself (see the module doc of [`crate::snapshot`] for the model and layout).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use rand::Rng;

use super::db::{AdapterRec, Batch, Db, LayerRec, LeaseRec, SnapRec, State};
use super::diff;
use super::mount::{self, Mount, MountMethod, OverlaySpec};
use super::normalize;
use super::{
    Chain, DockerLayer, LayerId, LayerMeta, LayerRef, PruneOptions, RecordType, SnapshotId,
    SnapshotInfo, SnapshotKind, SnapshotOptions, StoreOptions, UsageRecord, WhiteoutFormat,
};
use crate::tar::WriteOptions;
use crate::{Error, Result};

/// In a layer dir next to `diff/`: the quiet dirs its commit found (NUL-terminated relative paths), which its tar
/// leaves out (see `normalize.rs`). Absent when there are none.
const TAR_OMIT: &str = "tar-omit";

const ID_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

pub(crate) fn random_id(len: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| ID_CHARS[rng.gen_range(0..ID_CHARS.len())] as char)
        .collect()
}

pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// fsyncs a file or directory.
pub(crate) fn fsync_path(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path).map_err(io_err("open for fsync", path))?;
    f.sync_all().map_err(io_err("fsync", path))
}

struct Inner {
    dir: PathBuf,
    db: Db,
    method: MountMethod,
    /// Serialises read-modify-write sequences on the DB and the layout.
    lock: Mutex<()>,
    /// Number of live [`Mount`] guards per snapshot.
    mounted: Mutex<HashMap<SnapshotId, usize>>,
    /// Mutable snapshots whose upper dir [`SnapshotStore::commit`] is normalising (outside `lock`): not mountable,
    /// committable or removable meanwhile.
    committing: Mutex<BTreeSet<SnapshotId>>,
}

/// How much a [`SnapshotStore`] holds now (see [`SnapshotStore::counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreCounts {
    /// Snapshot records.
    pub snapshots: usize,
    /// Layer records.
    pub layers: usize,
    /// Live leases.
    pub leases: usize,
    /// Live [`Mount`] guards.
    pub mounts: usize,
}

/// berth's snapshot store. Cheap to clone; all methods block.
#[derive(Clone)]
pub struct SnapshotStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SnapshotStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotStore")
            .field("dir", &self.inner.dir)
            .field("method", &self.inner.method)
            .finish()
    }
}

impl SnapshotStore {
    /// Opens (creating if needed) the store under `<opts.root>/snapshots` and cleans up after a crash: unmounts
    /// leftover mounts under it, empties `tmp/`, drops process-bound and expired leases, and deletes layer and
    /// mutable dirs that no record points to (and records whose dirs are gone).
    pub fn open(opts: StoreOptions) -> Result<SnapshotStore> {
        let dir = opts.root.join("snapshots");
        for sub in [
            "", "layers", "l", "mutable", "mounts", "tmp", "empty", "empty2",
        ] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(io_err("create dir", &p))?;
        }
        for m in mount::mounts_under(&dir)? {
            tracing::info!(target = %m.display(), "unmounting leftover snapshot mount");
            if let Err(e) = mount::unmount(&m) {
                tracing::warn!(target = %m.display(), error = %e, "leftover mount could not be unmounted");
            }
        }
        let db = Db::open(&dir.join("metadata.redb"))?;
        let method = match opts.mount_method {
            MountMethod::Auto => {
                if mount::probe_new_api(&dir.join("empty")) {
                    MountMethod::NewApi
                } else {
                    MountMethod::ShortLinks
                }
            }
            m => m,
        };
        let store = SnapshotStore {
            inner: Arc::new(Inner {
                dir,
                db,
                method,
                lock: Mutex::new(()),
                mounted: Mutex::new(HashMap::new()),
                committing: Mutex::new(BTreeSet::new()),
            }),
        };
        store.recover()?;
        Ok(store)
    }

    /// The mount method in use (after probing).
    pub fn mount_method(&self) -> MountMethod {
        self.inner.method
    }

    /// The store dir (`<root>/snapshots`).
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn locked(&self) -> MutexGuard<'_, ()> {
        self.inner.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn recover(&self) -> Result<()> {
        let _g = self.locked();
        let dir = &self.inner.dir;
        for sub in ["tmp", "mounts"] {
            remove_children(&dir.join(sub))?;
        }
        let st = self.inner.db.load()?;
        let now = Utc::now();
        let mut b = Batch::default();
        for (id, lease) in &st.leases {
            if lease.expires_at.is_none_or(|t| t <= now) {
                b.del_leases.push(id.clone());
            }
        }
        // Records whose files are gone (cannot happen through this API; handled so a damaged store still opens).
        let mut dead_layers = BTreeSet::new();
        for id in st.layers.keys() {
            if !self.layer_diff(id).is_dir() {
                tracing::warn!(layer = %id, "layer dir missing; dropping its record and the snapshots using it");
                dead_layers.insert(id.clone());
                b.del_layers.push(id.clone());
            }
        }
        for (id, rec) in &st.snapshots {
            let broken_chain = rec.chain.0.iter().any(|l| matches!(l, LayerRef::Berth(lid) if dead_layers.contains(lid) || !st.layers.contains_key(lid)));
            let broken_mutable = rec.kind == SnapshotKind::Mutable
                && !(self.mutable_dir(id).join("upper").is_dir()
                    && self.mutable_dir(id).join("work").is_dir());
            if broken_chain || broken_mutable {
                tracing::warn!(snapshot = %id, "dropping snapshot record whose files are gone");
                b.del_snapshots.push(id.clone());
            }
        }
        for (k, id) in &st.cache_keys {
            if b.del_snapshots.contains(id) || !st.snapshots.contains_key(id) {
                b.del_cache_keys.push(k.clone());
            }
        }
        self.inner.db.apply(b)?;
        let st = self.inner.db.load()?;
        // Orphan files: no record points to them (a crash between moving files into place and the DB commit).
        for (sub, known) in [
            (
                "layers",
                st.layers
                    .keys()
                    .map(|l| l.0.clone())
                    .collect::<BTreeSet<_>>(),
            ),
            (
                "mutable",
                st.snapshots
                    .iter()
                    .filter(|(_, r)| r.kind == SnapshotKind::Mutable)
                    .map(|(i, _)| i.0.clone())
                    .collect(),
            ),
        ] {
            let d = dir.join(sub);
            for e in std::fs::read_dir(&d).map_err(io_err("read dir", &d))? {
                let e = e.map_err(io_err("read dir", &d))?;
                let name = e.file_name().to_string_lossy().into_owned();
                if !known.contains(&name) {
                    tracing::info!(path = %e.path().display(), "removing orphan snapshot dir");
                    remove_tree(&e.path())?;
                }
            }
        }
        let l = dir.join("l");
        for e in std::fs::read_dir(&l).map_err(io_err("read dir", &l))? {
            let e = e.map_err(io_err("read dir", &l))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let keep = if name.starts_with("dk") {
                e.path().exists()
            } else {
                st.layers.contains_key(&LayerId(name))
            };
            if !keep {
                std::fs::remove_file(e.path()).map_err(io_err("remove", &e.path()))?;
            }
        }
        for id in st.layers.keys() {
            self.ensure_link(id)?;
        }
        // Adapter records whose layers are gone, then layers no snapshot (or adapter in use) references.
        let stale: Vec<String> = st
            .adapters
            .iter()
            .filter(|(_, a)| {
                a.below
                    .iter()
                    .chain(a.above.iter())
                    .any(|l| !st.layers.contains_key(l))
            })
            .map(|(k, _)| k.clone())
            .collect();
        if !stale.is_empty() {
            self.inner.db.apply(Batch {
                del_adapters: stale,
                ..Default::default()
            })?;
        }
        let st = self.inner.db.load()?;
        self.remove_locked(&st, &[])
    }

    fn layer_dir(&self, id: &LayerId) -> PathBuf {
        self.inner.dir.join("layers").join(id.as_str())
    }

    fn layer_diff(&self, id: &LayerId) -> PathBuf {
        self.layer_dir(id).join("diff")
    }

    fn mutable_dir(&self, id: &SnapshotId) -> PathBuf {
        self.inner.dir.join("mutable").join(id.as_str())
    }

    fn ensure_link(&self, id: &LayerId) -> Result<()> {
        let link = self.inner.dir.join("l").join(id.as_str());
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("../layers/{id}/diff"), &link)
                .map_err(io_err("symlink", &link))?;
        }
        Ok(())
    }

    /// The directory of a berth layer (`layers/<id>`): its tree is in `diff/`; the exporter may put
    /// `tar-split.json.gz` next to it.
    pub fn layer_path(&self, id: &LayerId) -> PathBuf {
        self.layer_dir(id)
    }

    /// How to write a berth layer's tar: overlay whiteouts, and the quiet dirs its commit found left out (see
    /// `normalize.rs`), so the tar records what upstream's differ would.
    pub fn layer_write_options(&self, id: &LayerId) -> Result<WriteOptions> {
        Ok(WriteOptions {
            whiteouts: crate::tar::WhiteoutFormat::Overlay,
            omit_dirs: self.quiet_dirs(id)?,
            skip_digest: false,
        })
    }

    /// The quiet dirs of a berth layer (relative paths; empty for most layers).
    fn quiet_dirs(&self, id: &LayerId) -> Result<Vec<Vec<u8>>> {
        let p = self.layer_dir(id).join(TAR_OMIT);
        match std::fs::read(&p) {
            Ok(b) => Ok(b
                .split(|c| *c == 0)
                .filter(|q| !q.is_empty())
                .map(<[u8]>::to_vec)
                .collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_err("read", &p)(e)),
        }
    }

    /// Metadata of a berth layer.
    pub fn layer_meta(&self, id: &LayerId) -> Result<LayerMeta> {
        let st = self.inner.db.load()?;
        st.layers
            .get(id)
            .map(|r| r.meta.clone())
            .ok_or_else(|| Error::LayerNotFound { id: id.to_string() })
    }

    /// When a berth layer was committed (the creation time image history reports for it).
    pub fn layer_created_at(&self, id: &LayerId) -> Result<DateTime<Utc>> {
        let st = self.inner.db.load()?;
        st.layers
            .get(id)
            .map(|r| r.created_at)
            .ok_or_else(|| Error::LayerNotFound { id: id.to_string() })
    }

    /// When berth last learnt that the Docker layer with this chainID was created (an imported
    /// cache's creation time for a layer its chain found in Docker), if it did: image history
    /// reports that time instead of the time Docker registered the layer.
    pub fn docker_layer_created_at(&self, chain_id: &str) -> Result<Option<DateTime<Utc>>> {
        Ok(self
            .inner
            .db
            .load()?
            .docker_layer_times
            .get(chain_id)
            .copied())
    }

    /// Records the creation time of Docker layers by chainID (see
    /// [`SnapshotStore::docker_layer_created_at`]); a later record replaces an earlier one.
    pub fn set_docker_layer_created_at(
        &self,
        times: &[(String, std::time::SystemTime)],
    ) -> Result<()> {
        if times.is_empty() {
            return Ok(());
        }
        let _g = self.locked();
        self.inner.db.apply(Batch {
            put_docker_layer_times: times
                .iter()
                .map(|(k, t)| (k.clone(), (*t).into()))
                .collect(),
            ..Default::default()
        })
    }

    /// Records a layer's diffID, tar size and tar-split presence (after the exporter wrote its tar).
    pub fn set_layer_meta(&self, id: &LayerId, meta: LayerMeta) -> Result<()> {
        let _g = self.locked();
        let st = self.inner.db.load()?;
        let mut rec = st
            .layers
            .get(id)
            .cloned()
            .ok_or_else(|| Error::LayerNotFound { id: id.to_string() })?;
        rec.meta = meta;
        self.inner.db.apply(Batch {
            put_layers: vec![(id.clone(), rec)],
            ..Default::default()
        })
    }

    /// Berth layers with this diffID (lets a tar import reuse an existing layer).
    pub fn layers_by_diff_id(&self, diff_id: &str) -> Result<Vec<LayerId>> {
        let st = self.inner.db.load()?;
        Ok(st
            .layers
            .iter()
            .filter(|(_, r)| r.meta.diff_id.as_deref() == Some(diff_id))
            .map(|(i, _)| i.clone())
            .collect())
    }

    fn new_snap_rec(
        kind: SnapshotKind,
        parents: Vec<SnapshotId>,
        chain: Chain,
        own: Option<LayerId>,
        opts: &SnapshotOptions,
    ) -> SnapRec {
        SnapRec {
            kind,
            parents,
            chain,
            own_layer: own,
            description: opts.description.clone(),
            record_type: opts.record_type,
            created_at: Utc::now(),
            last_used_at: None,
            usage_count: 0,
        }
    }

    fn committed_chain(st: &State, id: &SnapshotId) -> Result<Chain> {
        let rec = st
            .snapshots
            .get(id)
            .ok_or_else(|| Error::SnapshotNotFound { id: id.to_string() })?;
        if rec.kind != SnapshotKind::Committed {
            return Err(Error::SnapshotNotCommitted { id: id.to_string() });
        }
        Ok(rec.chain.clone())
    }

    /// Records a committed snapshot made of an existing chain (a Docker base image, an imported chain).
    pub fn create_from_chain(
        &self,
        chain: Chain,
        parents: &[SnapshotId],
        opts: &SnapshotOptions,
    ) -> Result<SnapshotId> {
        let _g = self.locked();
        let st = self.inner.db.load()?;
        for l in &chain.0 {
            if let LayerRef::Berth(lid) = l {
                if !st.layers.contains_key(lid) {
                    return Err(Error::LayerNotFound {
                        id: lid.to_string(),
                    });
                }
            }
        }
        for p in parents {
            if !st.snapshots.contains_key(p) {
                return Err(Error::SnapshotNotFound { id: p.to_string() });
            }
        }
        let id = SnapshotId(random_id(26));
        let rec = Self::new_snap_rec(SnapshotKind::Committed, parents.to_vec(), chain, None, opts);
        self.inner.db.apply(Batch {
            put_snapshots: vec![(id.clone(), rec)],
            ..Default::default()
        })?;
        Ok(id)
    }

    /// Creates a mutable snapshot on top of `parent` (committed), or on scratch.
    pub fn prepare(
        &self,
        parent: Option<&SnapshotId>,
        opts: &SnapshotOptions,
    ) -> Result<SnapshotId> {
        let _g = self.locked();
        let st = self.inner.db.load()?;
        let chain = match parent {
            Some(p) => Self::committed_chain(&st, p)?,
            None => Chain::default(),
        };
        let id = SnapshotId(random_id(26));
        let tmp = self.inner.dir.join("tmp").join(format!("m-{id}"));
        for sub in ["upper", "work"] {
            let p = tmp.join(sub);
            std::fs::create_dir_all(&p).map_err(io_err("create dir", &p))?;
        }
        let dst = self.mutable_dir(&id);
        std::fs::rename(&tmp, &dst).map_err(io_err("rename", &dst))?;
        fsync_path(&self.inner.dir.join("mutable"))?;
        let rec = Self::new_snap_rec(
            SnapshotKind::Mutable,
            parent.into_iter().cloned().collect(),
            chain,
            None,
            opts,
        );
        if let Err(e) = self.inner.db.apply(Batch {
            put_snapshots: vec![(id.clone(), rec)],
            ..Default::default()
        }) {
            let _ = remove_tree(&dst);
            return Err(e);
        }
        Ok(id)
    }

    /// The upper dir of a mutable snapshot (writes there show up in its mounts).
    pub fn upper_dir(&self, id: &SnapshotId) -> Result<PathBuf> {
        let st = self.inner.db.load()?;
        let rec = st
            .snapshots
            .get(id)
            .ok_or_else(|| Error::SnapshotNotFound { id: id.to_string() })?;
        if rec.kind != SnapshotKind::Mutable {
            return Err(Error::SnapshotNotMutable { id: id.to_string() });
        }
        Ok(self.mutable_dir(id).join("upper"))
    }

    fn committing(&self) -> MutexGuard<'_, BTreeSet<SnapshotId>> {
        self.inner
            .committing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn is_mounted(&self, id: &SnapshotId) -> bool {
        self.inner
            .mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
            .unwrap_or(0)
            > 0
    }

    /// Commits a mutable snapshot: its upper dir becomes a new immutable layer (by rename, no copy) and the snapshot
    /// becomes committed with that layer on top of its chain. Keeps the snapshot id. Fails if it is mounted.
    ///
    /// The upper dir is first normalised against the parent's view (see `normalize.rs`): opaque dirs become explicit
    /// whiteouts and unchanged copy-ups are removed, so the layer carries only changes.
    pub fn commit(&self, id: &SnapshotId) -> Result<LayerId> {
        // The parent's layer dirs, resolved before taking the lock (AUFS adapters are made under it). A mutable
        // snapshot's chain never changes.
        let chain = self
            .inner
            .db
            .load()?
            .snapshots
            .get(id)
            .map(|r| r.chain.clone());
        let lowers: Vec<PathBuf> = match &chain {
            Some(c) => self
                .resolve_lowers(c)?
                .into_iter()
                .rev()
                .map(|(p, _)| p)
                .collect(),
            None => Vec::new(),
        };
        let check = |st: &State| -> Result<SnapRec> {
            let rec = st
                .snapshots
                .get(id)
                .cloned()
                .ok_or_else(|| Error::SnapshotNotFound { id: id.to_string() })?;
            if rec.kind != SnapshotKind::Mutable {
                return Err(Error::SnapshotNotMutable { id: id.to_string() });
            }
            if self.is_mounted(id) {
                return Err(Error::SnapshotInUse {
                    id: id.to_string(),
                    by: "a mount",
                });
            }
            Ok(rec)
        };
        // Normalising walks the whole upper dir; it runs outside the store lock, with the snapshot marked as being
        // committed (mount, commit and remove of it fail meanwhile).
        let _committing = {
            let _g = self.locked();
            check(&*self.inner.db.load()?)?;
            let mut c = self.committing();
            if !c.insert(id.clone()) {
                return Err(Error::SnapshotInUse {
                    id: id.to_string(),
                    by: "a commit",
                });
            }
            CommitGuard { store: self, id }
        };
        let mdir = self.mutable_dir(id);
        let upper = mdir.join("upper");
        let t = std::time::Instant::now();
        let (stats, quiet) = normalize::normalize_upper(&upper, &lowers)?;
        tracing::debug!(
            snapshot = %id,
            visited = stats.visited,
            dropped = stats.dropped,
            opaque_cleared = stats.opaque_cleared,
            whiteouts_added = stats.whiteouts_added,
            quiet_dirs = quiet.len(),
            elapsed_us = t.elapsed().as_micros() as u64,
            "upper dir normalised for commit"
        );
        let _g = self.locked();
        let rec = check(&*self.inner.db.load()?)?;
        let lid = LayerId(random_id(12));
        let staged = self.inner.dir.join("tmp").join(format!("l-{lid}"));
        std::fs::create_dir(&staged).map_err(io_err("create dir", &staged))?;
        std::fs::rename(&upper, staged.join("diff")).map_err(io_err("rename", &upper))?;
        if !quiet.is_empty() {
            let p = staged.join(TAR_OMIT);
            let mut bytes = Vec::new();
            for q in &quiet {
                bytes.extend_from_slice(q);
                bytes.push(0);
            }
            std::fs::write(&p, bytes).map_err(io_err("write", &p))?;
        }
        let lrec = self.finish_layer(&lid, &staged, LayerMeta::default(), None)?;
        let mut new = rec.clone();
        new.kind = SnapshotKind::Committed;
        new.chain.0.push(LayerRef::Berth(lid.clone()));
        new.own_layer = Some(lid.clone());
        self.inner.db.apply(Batch {
            put_layers: vec![(lid.clone(), lrec)],
            put_snapshots: vec![(id.clone(), new)],
            ..Default::default()
        })?;
        if let Err(e) = remove_tree(&mdir) {
            tracing::warn!(path = %mdir.display(), error = %e, "removing committed mutable dir failed");
        }
        Ok(lid)
    }

    /// Moves a staged layer dir (`tmp/…` with a filled `diff/`) to `layers/<lid>` durably; returns its record.
    fn finish_layer(
        &self,
        lid: &LayerId,
        staged: &Path,
        meta: LayerMeta,
        adapter_for: Option<String>,
    ) -> Result<LayerRec> {
        let diff = staged.join("diff");
        diff::mark_whiteout_dirs(&diff)?;
        let disk_size = dir_size(&diff)?;
        fsync_tree(&diff)?;
        fsync_path(staged)?;
        let dst = self.layer_dir(lid);
        std::fs::rename(staged, &dst).map_err(io_err("rename", &dst))?;
        self.ensure_link(lid)?;
        fsync_path(&self.inner.dir.join("layers"))?;
        fsync_path(&self.inner.dir.join("l"))?;
        Ok(LayerRec {
            meta,
            created_at: Utc::now(),
            disk_size,
            adapter_for,
        })
    }

    /// Creates a committed snapshot with one new layer on top of `parent`, whose tree `fill` writes into the empty
    /// directory it is given (in overlay format; e.g. the tar applier). The layer gets the metadata `fill` returns.
    pub fn add_layer(
        &self,
        parent: Option<&SnapshotId>,
        opts: &SnapshotOptions,
        fill: impl FnOnce(&Path) -> Result<LayerMeta>,
    ) -> Result<(SnapshotId, LayerId)> {
        let lid = LayerId(random_id(12));
        let staged = self.inner.dir.join("tmp").join(format!("l-{lid}"));
        let diff = staged.join("diff");
        std::fs::create_dir_all(&diff).map_err(io_err("create dir", &diff))?;
        let meta = match fill(&diff) {
            Ok(m) => m,
            Err(e) => {
                let _ = remove_tree(&staged);
                return Err(e);
            }
        };
        let _g = self.locked();
        let st = self.inner.db.load()?;
        let mut chain = match parent {
            Some(p) => Self::committed_chain(&st, p).inspect_err(|_| {
                let _ = remove_tree(&staged);
            })?,
            None => Chain::default(),
        };
        drop(st);
        let lrec = self.finish_layer(&lid, &staged, meta, None)?;
        chain.0.push(LayerRef::Berth(lid.clone()));
        let id = SnapshotId(random_id(26));
        let rec = Self::new_snap_rec(
            SnapshotKind::Committed,
            parent.into_iter().cloned().collect(),
            chain,
            Some(lid.clone()),
            opts,
        );
        self.inner.db.apply(Batch {
            put_layers: vec![(lid.clone(), lrec)],
            put_snapshots: vec![(id.clone(), rec)],
            ..Default::default()
        })?;
        Ok((id, lid))
    }

    /// Snapshot metadata.
    pub fn info(&self, id: &SnapshotId) -> Result<SnapshotInfo> {
        let st = self.inner.db.load()?;
        let rec = st
            .snapshots
            .get(id)
            .ok_or_else(|| Error::SnapshotNotFound { id: id.to_string() })?;
        Ok(to_info(id, rec))
    }

    /// Counts of records, leases and mounts, from memory (cheap; for metrics and debugging).
    pub fn counts(&self) -> StoreCounts {
        let (snapshots, layers, leases) = self.inner.db.counts();
        let mounts = self.inner.mounted.lock().unwrap().values().sum();
        StoreCounts {
            snapshots,
            layers,
            leases,
            mounts,
        }
    }

    /// All snapshots.
    pub fn list(&self) -> Result<Vec<SnapshotInfo>> {
        let st = self.inner.db.load()?;
        Ok(st.snapshots.iter().map(|(id, r)| to_info(id, r)).collect())
    }

    /// Lower dirs (bottom → top) that mounting `chain` stacks, creating AUFS adapter layers as needed.
    fn resolve_lowers(&self, chain: &Chain) -> Result<Vec<(PathBuf, String)>> {
        let mut out = vec![(self.inner.dir.join("empty"), "empty".to_string())];
        for l in &chain.0 {
            match l {
                LayerRef::Berth(lid) => out.push((self.layer_diff(lid), format!("l/{lid}"))),
                LayerRef::Docker(d) => {
                    let (below, above) = match d.whiteouts {
                        WhiteoutFormat::Overlay => (None, None),
                        WhiteoutFormat::Aufs => self.aufs_adapters(d)?,
                    };
                    if let Some(b) = below {
                        out.push((self.layer_diff(&b), format!("l/{b}")));
                    }
                    out.push((d.diff_dir.clone(), self.docker_link(&d.diff_dir)?));
                    if let Some(a) = above {
                        out.push((self.layer_diff(&a), format!("l/{a}")));
                    }
                }
            }
        }
        // A layer can occur more than once (a merge of inputs that share a base). overlayfs refuses a dir stacked
        // twice (ELOOP); only the topmost occurrence can change the view (every path it has is resolved there
        // first, and whatever it lacks the lower copy lacks too), so the lower ones are dropped.
        let mut seen = std::collections::HashSet::new();
        let mut out: Vec<_> = out
            .into_iter()
            .rev()
            .filter(|(p, _)| seen.insert(p.clone()))
            .collect();
        out.reverse();
        Ok(out)
    }

    /// `l/dk<hash>` → absolute Docker diff dir (used only by the short-link mount path).
    fn docker_link(&self, diff_dir: &Path) -> Result<String> {
        use sha2::Digest as _;
        let h = sha2::Sha256::digest(diff_dir.as_os_str().as_encoded_bytes());
        let name = format!("dk{}", &hex::encode(h)[..10]);
        if self.inner.method == MountMethod::ShortLinks {
            let link = self.inner.dir.join("l").join(&name);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(diff_dir, &link).map_err(io_err("symlink", &link))?;
            }
        }
        Ok(format!("l/{name}"))
    }

    /// The generated layers below/above an AUFS-format Docker layer (made once, then cached in the DB).
    fn aufs_adapters(&self, d: &DockerLayer) -> Result<(Option<LayerId>, Option<LayerId>)> {
        let key = d.diff_dir.display().to_string();
        let _g = self.locked();
        let st = self.inner.db.load()?;
        if let Some(a) = st.adapters.get(&key) {
            return Ok((a.below.clone(), a.above.clone()));
        }
        let markers = diff::find_aufs_markers(&d.diff_dir)?;
        let mut b = Batch::default();
        let mut rec = AdapterRec {
            below: None,
            above: None,
        };
        if !markers.is_empty() {
            for (which, slot) in [("below", &mut rec.below), ("above", &mut rec.above)] {
                let lid = LayerId(random_id(12));
                let staged = self.inner.dir.join("tmp").join(format!("l-{lid}"));
                let diff_dir = staged.join("diff");
                std::fs::create_dir_all(&diff_dir).map_err(io_err("create dir", &diff_dir))?;
                if which == "below" {
                    diff::write_aufs_below(&d.diff_dir, &markers, &diff_dir)?;
                } else {
                    diff::write_aufs_above(&d.diff_dir, &markers, &diff_dir)?;
                }
                let lrec =
                    self.finish_layer(&lid, &staged, LayerMeta::default(), Some(key.clone()))?;
                b.put_layers.push((lid.clone(), lrec));
                *slot = Some(lid);
            }
        }
        tracing::debug!(docker_dir = %key, markers = markers.len(), "aufs whiteout adapters prepared");
        b.put_adapters.push((key, rec.clone()));
        self.inner.db.apply(b)?;
        Ok((rec.below, rec.above))
    }

    /// Mounts a snapshot: a committed one read-only, a mutable one read-write. With `target = None` the store makes
    /// a mount point under `mounts/` (removed again on unmount). The snapshot counts as in use while the guard lives.
    pub fn mount(&self, id: &SnapshotId, target: Option<&Path>) -> Result<Mount> {
        let rec = {
            let _g = self.locked();
            if self.committing().contains(id) {
                return Err(Error::SnapshotInUse {
                    id: id.to_string(),
                    by: "a commit",
                });
            }
            let st = self.inner.db.load()?;
            let mut rec = st
                .snapshots
                .get(id)
                .cloned()
                .ok_or_else(|| Error::SnapshotNotFound { id: id.to_string() })?;
            rec.last_used_at = Some(Utc::now());
            rec.usage_count += 1;
            drop(st);
            // Only use statistics: a crash may lose them.
            self.inner.db.apply_volatile(Batch {
                put_snapshots: vec![(id.clone(), rec.clone())],
                ..Default::default()
            })?;
            rec
        };
        let upper = (rec.kind == SnapshotKind::Mutable).then(|| {
            let m = self.mutable_dir(id);
            (m.join("upper"), m.join("work"))
        });
        self.mount_chain_inner(&rec.chain, upper, target, Some(id.clone()))
    }

    /// Mounts any chain read-only (e.g. the lower or upper side of a DiffOp) without recording a snapshot.
    pub fn mount_chain(&self, chain: &Chain, target: Option<&Path>) -> Result<Mount> {
        self.mount_chain_inner(chain, None, target, None)
    }

    fn mount_chain_inner(
        &self,
        chain: &Chain,
        upper: Option<(PathBuf, PathBuf)>,
        target: Option<&Path>,
        snap: Option<SnapshotId>,
    ) -> Result<Mount> {
        let mut lowers = self.resolve_lowers(chain)?;
        // Deeper than the mount method can stack: the bottom of the chain becomes one flattened (hardlinked) dir,
        // made for this mount and removed after it.
        let max = match self.inner.method {
            MountMethod::ShortLinks => mount::SHORT_LINKS_MAX_STACK,
            _ => mount::OVL_MAX_STACK,
        };
        let mut flat_dir = None;
        if lowers.len() > max {
            let k = lowers.len() - max + 1;
            let name = format!("tmp/flat-{}", random_id(12));
            let dir = self.inner.dir.join(&name);
            let diff = dir.join("diff");
            std::fs::create_dir_all(&diff).map_err(io_err("create dir", &diff))?;
            let srcs: Vec<PathBuf> = lowers[..k].iter().rev().map(|(p, _)| p.clone()).collect();
            let t = std::time::Instant::now();
            if let Err(e) = diff::flatten(&srcs, &diff) {
                let _ = remove_tree(&dir);
                return Err(e);
            }
            tracing::info!(
                layers = k,
                elapsed_ms = t.elapsed().as_millis() as u64,
                "flattened the bottom of a deep chain"
            );
            lowers.splice(..k, [(diff, format!("{name}/diff"))]);
            flat_dir = Some(dir);
        }
        if upper.is_none() && lowers.len() < 2 {
            // Overlay needs two lower dirs when it has no upper dir.
            lowers.insert(0, (self.inner.dir.join("empty2"), "empty2".to_string()));
        }
        let spec = OverlaySpec {
            lowers: lowers.iter().rev().map(|(p, _)| p.clone()).collect(),
            short_lowers: lowers.iter().rev().map(|(_, s)| s.clone()).collect(),
            upper,
        };
        let (target, remove_dir) = match target {
            Some(t) => (t.to_path_buf(), false),
            None => {
                let t = self.inner.dir.join("mounts").join(random_id(12));
                std::fs::create_dir(&t).map_err(io_err("create dir", &t))?;
                (t, true)
            }
        };
        if let Err(e) = mount::mount_overlay(self.inner.method, &self.inner.dir, &spec, &target) {
            if remove_dir {
                let _ = std::fs::remove_dir(&target);
            }
            if let Some(d) = &flat_dir {
                let _ = remove_tree(d);
            }
            return Err(e);
        }
        tracing::debug!(target = %target.display(), layers = spec.lowers.len(), rw = spec.upper.is_some(), "overlay mounted");
        let count: Option<Arc<dyn Fn() + Send + Sync>> = snap.map(|id| {
            *self
                .inner
                .mounted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(id.clone())
                .or_insert(0) += 1;
            // Weak: a leaked guard must not keep the store (and its DB lock) alive.
            let inner = Arc::downgrade(&self.inner);
            Arc::new(move || {
                let Some(inner) = inner.upgrade() else { return };
                let mut m = inner.mounted.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(n) = m.get_mut(&id) {
                    *n -= 1;
                    if *n == 0 {
                        m.remove(&id);
                    }
                }
            }) as Arc<dyn Fn() + Send + Sync>
        });
        let on_release: Option<Arc<dyn Fn() + Send + Sync>> = match (count, flat_dir) {
            (count, Some(dir)) => Some(Arc::new(move || {
                if let Err(e) = remove_tree(&dir) {
                    tracing::warn!(dir = %dir.display(), error = %e, "removing flattened lower dir failed");
                }
                if let Some(f) = &count {
                    f();
                }
            })),
            (count, None) => count,
        };
        Ok(Mount {
            target,
            remove_dir,
            mounted: true,
            on_release,
        })
    }

    /// MergeOp: a committed snapshot whose chain is the inputs' chains concatenated (lazy; nothing is copied).
    pub fn merge(&self, inputs: &[SnapshotId], opts: &SnapshotOptions) -> Result<SnapshotId> {
        let chains = {
            let st = self.inner.db.load()?;
            inputs
                .iter()
                .map(|i| Self::committed_chain(&st, i))
                .collect::<Result<Vec<_>>>()?
        };
        self.create_from_chain(Chain::merge(&chains), inputs, opts)
    }

    /// DiffOp: what must be applied on top of `lower` to get `upper` (`None` = scratch). Reuses layers when `lower`'s
    /// chain is a prefix of `upper`'s; otherwise mounts both, walks the trees and writes one new layer.
    pub fn diff(
        &self,
        lower: Option<&SnapshotId>,
        upper: Option<&SnapshotId>,
        opts: &SnapshotOptions,
    ) -> Result<SnapshotId> {
        let (lc, uc) = {
            let st = self.inner.db.load()?;
            let lc = lower
                .map(|l| Self::committed_chain(&st, l))
                .transpose()?
                .unwrap_or_default();
            let uc = upper
                .map(|u| Self::committed_chain(&st, u))
                .transpose()?
                .unwrap_or_default();
            (lc, uc)
        };
        let parents: Vec<SnapshotId> = lower.into_iter().chain(upper).cloned().collect();
        if let Some(range) = uc.strip_prefix(&lc) {
            if lc.0.is_empty() {
                return self.create_from_chain(range, &parents, opts);
            }
            return self.diff_range(range, &parents, opts);
        }
        let lm = self.mount_chain(&lc, None)?;
        let um = self.mount_chain(&uc, None)?;
        let parent_for_layer: Option<&SnapshotId> = None;
        let (id, _lid) = self.add_layer(parent_for_layer, opts, |out| {
            diff::compute_diff(lm.path(), um.path(), out)?;
            Ok(LayerMeta::default())
        })?;
        drop(lm);
        drop(um);
        // add_layer records no parents (the layer sits on scratch); record the diff inputs as parents.
        let _g = self.locked();
        let st = self.inner.db.load()?;
        if let Some(mut rec) = st.snapshots.get(&id).cloned() {
            rec.parents = parents;
            self.inner.db.apply(Batch {
                put_snapshots: vec![(id.clone(), rec)],
                ..Default::default()
            })?;
        }
        Ok(id)
    }

    /// A DiffOp result reusing the layers `range` of its upper chain. A layer with quiet dirs (see `normalize.rs`) is
    /// replaced by a copy without them (files hardlinked): upstream's diff holds only what its differ records, and a
    /// quiet dir is not a change (mounted alone it would show up as an empty dir).
    fn diff_range(
        &self,
        range: Chain,
        parents: &[SnapshotId],
        opts: &SnapshotOptions,
    ) -> Result<SnapshotId> {
        let mut chain = Vec::with_capacity(range.0.len());
        let mut staged: Vec<(LayerId, PathBuf)> = Vec::new();
        let cleanup = |staged: &[(LayerId, PathBuf)]| {
            for (_, p) in staged {
                let _ = remove_tree(p);
            }
        };
        for l in range.0 {
            let LayerRef::Berth(lid) = &l else {
                chain.push(l);
                continue;
            };
            let quiet = self.quiet_dirs(lid).inspect_err(|_| cleanup(&staged))?;
            if quiet.is_empty() {
                chain.push(l);
                continue;
            }
            let new = LayerId(random_id(12));
            let dir = self.inner.dir.join("tmp").join(format!("l-{new}"));
            let res = std::fs::create_dir_all(dir.join("diff"))
                .map_err(io_err("create dir", &dir))
                .and_then(|()| {
                    diff::copy_layer_omitting(
                        &self.layer_dir(lid).join("diff"),
                        &dir.join("diff"),
                        &quiet.into_iter().collect(),
                    )
                });
            staged.push((new.clone(), dir));
            if let Err(e) = res {
                cleanup(&staged);
                return Err(e);
            }
            chain.push(LayerRef::Berth(new));
        }
        if staged.is_empty() {
            return self.create_from_chain(Chain(chain), parents, opts);
        }
        // The new layers and the snapshot referencing them are recorded under one lock, so a concurrent removal
        // never sees them unreferenced.
        let _g = self.locked();
        let st = self.inner.db.load()?;
        let missing = chain.iter().find_map(|l| match l {
            LayerRef::Berth(lid)
                if !st.layers.contains_key(lid) && !staged.iter().any(|(n, _)| n == lid) =>
            {
                Some(Error::LayerNotFound {
                    id: lid.to_string(),
                })
            }
            _ => None,
        });
        let missing = missing.or_else(|| {
            parents
                .iter()
                .find(|p| !st.snapshots.contains_key(*p))
                .map(|p| Error::SnapshotNotFound { id: p.to_string() })
        });
        if let Some(e) = missing {
            cleanup(&staged);
            return Err(e);
        }
        let mut put_layers = Vec::with_capacity(staged.len());
        for (i, (lid, dir)) in staged.iter().enumerate() {
            match self.finish_layer(lid, dir, LayerMeta::default(), None) {
                Ok(rec) => put_layers.push((lid.clone(), rec)),
                Err(e) => {
                    cleanup(&staged[i..]);
                    for (done, _) in &put_layers {
                        let _ = remove_tree(&self.layer_dir(done));
                    }
                    return Err(e);
                }
            }
        }
        let id = SnapshotId(random_id(26));
        let rec = Self::new_snap_rec(
            SnapshotKind::Committed,
            parents.to_vec(),
            Chain(chain),
            None,
            opts,
        );
        self.inner.db.apply(Batch {
            put_layers,
            put_snapshots: vec![(id.clone(), rec)],
            ..Default::default()
        })?;
        Ok(id)
    }

    /// Maps a cache key to a snapshot (replacing any previous mapping).
    pub fn set_cache_key(&self, key: &str, id: &SnapshotId) -> Result<()> {
        let _g = self.locked();
        let st = self.inner.db.load()?;
        if !st.snapshots.contains_key(id) {
            return Err(Error::SnapshotNotFound { id: id.to_string() });
        }
        // A view held across a commit makes the commit copy the state.
        drop(st);
        self.inner.db.apply(Batch {
            put_cache_keys: vec![(key.to_string(), id.clone())],
            ..Default::default()
        })
    }

    /// The snapshot a cache key maps to.
    pub fn cache_key(&self, key: &str) -> Result<Option<SnapshotId>> {
        Ok(self.inner.db.load()?.cache_keys.get(key).cloned())
    }

    /// A process-bound lease (released on drop, and at the next `open` after a crash).
    pub fn lease(&self) -> Result<Lease> {
        self.make_lease(None)
    }

    /// A lease that survives restarts until `expires_at` (or until released).
    pub fn lease_until(&self, expires_at: DateTime<Utc>) -> Result<Lease> {
        self.make_lease(Some(expires_at))
    }

    fn make_lease(&self, expires_at: Option<DateTime<Utc>>) -> Result<Lease> {
        let id = random_id(20);
        let _g = self.locked();
        let b = Batch {
            put_leases: vec![(
                id.clone(),
                LeaseRec {
                    snapshots: vec![],
                    expires_at,
                },
            )],
            ..Default::default()
        };
        // A process-bound lease does not outlive the process (the next open drops it), so its
        // records need not wait for the disk.
        if expires_at.is_none() {
            self.inner.db.apply_volatile(b)?;
        } else {
            self.inner.db.apply(b)?;
        }
        Ok(Lease {
            store: self.clone(),
            id,
            released: false,
            process_bound: expires_at.is_none(),
        })
    }

    fn in_use_set(&self, st: &State) -> BTreeSet<SnapshotId> {
        let now = Utc::now();
        let mut set: BTreeSet<SnapshotId> = self
            .inner
            .mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        set.extend(self.committing().iter().cloned());
        for l in st.leases.values() {
            if l.expires_at.is_none_or(|t| t > now) {
                set.extend(l.snapshots.iter().cloned());
            }
        }
        set
    }

    /// Removes a snapshot (fails if it is leased or mounted). Layers no other snapshot uses are deleted.
    pub fn remove(&self, id: &SnapshotId) -> Result<()> {
        let _g = self.locked();
        let st = self.inner.db.load()?;
        if !st.snapshots.contains_key(id) {
            return Err(Error::SnapshotNotFound { id: id.to_string() });
        }
        if self.in_use_set(&st).contains(id) {
            return Err(Error::SnapshotInUse {
                id: id.to_string(),
                by: "a lease or mount",
            });
        }
        self.remove_locked(&st, std::slice::from_ref(id))
    }

    /// Deletes snapshot records and then their unreferenced files. Caller holds the lock.
    fn remove_locked(&self, st: &State, ids: &[SnapshotId]) -> Result<()> {
        let gone: BTreeSet<&SnapshotId> = ids.iter().collect();
        let mut b = Batch {
            del_snapshots: ids.to_vec(),
            ..Default::default()
        };
        for (k, v) in &st.cache_keys {
            if gone.contains(v) {
                b.del_cache_keys.push(k.clone());
            }
        }
        // Layers still referenced by a remaining snapshot (directly, or as the adapters of a Docker layer).
        let mut used_layers = BTreeSet::new();
        let mut used_docker = BTreeSet::new();
        for (sid, rec) in &st.snapshots {
            if gone.contains(sid) {
                continue;
            }
            for l in &rec.chain.0 {
                match l {
                    LayerRef::Berth(lid) => {
                        used_layers.insert(lid.clone());
                    }
                    LayerRef::Docker(d) => {
                        used_docker.insert(d.diff_dir.display().to_string());
                    }
                }
            }
        }
        for (key, a) in &st.adapters {
            if used_docker.contains(key) {
                used_layers.extend(a.below.iter().chain(a.above.iter()).cloned());
            } else {
                b.del_adapters.push(key.clone());
            }
        }
        let dead_layers: Vec<LayerId> = st
            .layers
            .keys()
            .filter(|l| !used_layers.contains(*l))
            .cloned()
            .collect();
        b.del_layers = dead_layers.clone();
        let dead_mutables: Vec<SnapshotId> = ids
            .iter()
            .filter(|i| {
                st.snapshots
                    .get(*i)
                    .is_some_and(|r| r.kind == SnapshotKind::Mutable)
            })
            .cloned()
            .collect();
        self.inner.db.apply(b)?;
        for lid in dead_layers {
            let link = self.inner.dir.join("l").join(lid.as_str());
            let _ = std::fs::remove_file(&link);
            let d = self.layer_dir(&lid);
            if let Err(e) = remove_tree(&d) {
                tracing::warn!(path = %d.display(), error = %e, "removing layer dir failed (removed at next open)");
            }
        }
        for sid in dead_mutables {
            let d = self.mutable_dir(&sid);
            if let Err(e) = remove_tree(&d) {
                tracing::warn!(path = %d.display(), error = %e, "removing mutable dir failed (removed at next open)");
            }
        }
        Ok(())
    }

    fn usage_records(&self, st: &State) -> Result<Vec<UsageRecord>> {
        let in_use = self.in_use_set(st);
        let mut layer_users: HashMap<&LayerId, usize> = HashMap::new();
        for rec in st.snapshots.values() {
            for l in &rec.chain.0 {
                if let LayerRef::Berth(lid) = l {
                    *layer_users.entry(lid).or_default() += 1;
                }
            }
        }
        let mut out = Vec::new();
        for (id, rec) in &st.snapshots {
            let (size, shared) = match (rec.kind, &rec.own_layer) {
                (SnapshotKind::Mutable, _) => (
                    dir_size(&self.mutable_dir(id).join("upper")).unwrap_or(0),
                    false,
                ),
                (SnapshotKind::Committed, Some(l)) => (
                    st.layers.get(l).map(|r| r.disk_size).unwrap_or(0),
                    layer_users.get(l).copied().unwrap_or(0) > 1,
                ),
                (SnapshotKind::Committed, None) => (0, false),
            };
            out.push(UsageRecord {
                id: id.to_string(),
                mutable: rec.kind == SnapshotKind::Mutable,
                in_use: in_use.contains(id),
                size,
                parents: rec.parents.iter().map(|p| p.to_string()).collect(),
                created_at: rec.created_at,
                last_used_at: rec.last_used_at,
                usage_count: rec.usage_count,
                description: rec.description.clone(),
                record_type: rec.record_type,
                shared,
            });
        }
        Ok(out)
    }

    /// Disk usage of every snapshot, shaped like BuildKit's `UsageRecord`s.
    pub fn disk_usage(&self) -> Result<Vec<UsageRecord>> {
        let st = self.inner.db.load()?;
        self.usage_records(&st)
    }

    /// Removes snapshots that are not in use and match `opts`; returns what was removed.
    pub fn prune(&self, opts: &PruneOptions) -> Result<Vec<UsageRecord>> {
        let _g = self.locked();
        let st = self.inner.db.load()?;
        let mut records = self.usage_records(&st)?;
        let now = Utc::now();
        let mut total: u64 = records.iter().map(|r| r.size).sum();
        // Oldest use first.
        records.sort_by_key(|r| r.last_used_at.unwrap_or(r.created_at));
        let mut victims = Vec::new();
        for r in records {
            if r.in_use {
                continue;
            }
            if !opts.all && matches!(r.record_type, RecordType::Internal | RecordType::Frontend) {
                continue;
            }
            if !opts.filter_types.is_empty() && !opts.filter_types.contains(&r.record_type) {
                continue;
            }
            if let Some(f) = &opts.filter_description {
                if !r.description.contains(f.as_str()) {
                    continue;
                }
            }
            if let Some(keep) = opts.keep_duration {
                let last = r.last_used_at.unwrap_or(r.created_at);
                let age = now.signed_duration_since(last).to_std().unwrap_or_default();
                if age < keep {
                    continue;
                }
            }
            if let Some(kb) = opts.keep_bytes {
                if total <= kb {
                    break;
                }
            }
            total = total.saturating_sub(r.size);
            victims.push(r);
        }
        let ids: Vec<SnapshotId> = victims.iter().map(|r| SnapshotId(r.id.clone())).collect();
        if !ids.is_empty() {
            self.remove_locked(&st, &ids)?;
        }
        Ok(victims)
    }
}

/// Unmarks a snapshot as being committed when [`SnapshotStore::commit`] returns.
struct CommitGuard<'a> {
    store: &'a SnapshotStore,
    id: &'a SnapshotId,
}

impl Drop for CommitGuard<'_> {
    fn drop(&mut self) {
        self.store.committing().remove(self.id);
    }
}

fn to_info(id: &SnapshotId, rec: &SnapRec) -> SnapshotInfo {
    SnapshotInfo {
        id: id.clone(),
        kind: rec.kind,
        parents: rec.parents.clone(),
        chain: rec.chain.clone(),
        description: rec.description.clone(),
        record_type: rec.record_type,
        created_at: rec.created_at,
        last_used_at: rec.last_used_at,
        usage_count: rec.usage_count,
    }
}

/// A lease: snapshots added to it are neither pruned nor removed while it lives.
#[derive(Debug)]
pub struct Lease {
    store: SnapshotStore,
    id: String,
    released: bool,
    process_bound: bool,
}

impl Lease {
    /// The lease id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Protects a snapshot for the life of the lease.
    pub fn add(&self, snapshot: &SnapshotId) -> Result<()> {
        let store = &self.store;
        let _g = store.locked();
        let st = store.inner.db.load()?;
        let mut snap =
            st.snapshots
                .get(snapshot)
                .cloned()
                .ok_or_else(|| Error::SnapshotNotFound {
                    id: snapshot.to_string(),
                })?;
        let mut rec = st
            .leases
            .get(&self.id)
            .cloned()
            .ok_or_else(|| Error::LeaseNotFound {
                id: self.id.clone(),
            })?;
        if !rec.snapshots.contains(snapshot) {
            rec.snapshots.push(snapshot.clone());
        }
        snap.last_used_at = Some(Utc::now());
        snap.usage_count += 1;
        drop(st);
        let volatile = rec.expires_at.is_none();
        let b = Batch {
            put_leases: vec![(self.id.clone(), rec)],
            put_snapshots: vec![(snapshot.clone(), snap)],
            ..Default::default()
        };
        if volatile {
            store.inner.db.apply_volatile(b)
        } else {
            store.inner.db.apply(b)
        }
    }

    /// Releases the lease now.
    pub fn release(mut self) -> Result<()> {
        self.release_inner()
    }

    fn release_inner(&mut self) -> Result<()> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        let _g = self.store.locked();
        let volatile = self
            .store
            .inner
            .db
            .load()?
            .leases
            .get(&self.id)
            .is_none_or(|r| r.expires_at.is_none());
        let b = Batch {
            del_leases: vec![self.id.clone()],
            ..Default::default()
        };
        if volatile {
            self.store.inner.db.apply_volatile(b)
        } else {
            self.store.inner.db.apply(b)
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.process_bound {
            if let Err(e) = self.release_inner() {
                tracing::error!(lease = %self.id, error = %e, "releasing lease failed");
            }
        }
    }
}

/// Sum of lstat sizes of non-directories with size > 0, hardlinks counted once (Docker's `directory.Size`).
pub(crate) fn dir_size(dir: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    for e in walkdir::WalkDir::new(dir) {
        let e = e.map_err(|e| Error::Io {
            op: "walk",
            path: e.path().unwrap_or(dir).to_path_buf(),
            source: e
                .into_io_error()
                .unwrap_or_else(|| std::io::Error::other("walk loop")),
        })?;
        if e.file_type().is_dir() {
            continue;
        }
        let md = e.metadata().map_err(|err| Error::Io {
            op: "lstat",
            path: e.path().to_path_buf(),
            source: err
                .into_io_error()
                .unwrap_or_else(|| std::io::Error::other("lstat")),
        })?;
        if md.size() == 0 {
            continue;
        }
        if md.nlink() > 1 && !seen.insert((md.dev(), md.ino())) {
            continue;
        }
        total += md.size();
    }
    Ok(total)
}

/// Makes a tree durable: one `syncfs(2)` of the filesystem holding it (cheaper than an fsync per file for layers
/// with many files, and it covers the directory entries too).
pub(crate) fn fsync_tree(dir: &Path) -> Result<()> {
    let f = std::fs::File::open(dir).map_err(io_err("open for syncfs", dir))?;
    rustix::fs::syncfs(&f).map_err(|e| Error::Io {
        op: "syncfs",
        path: dir.to_path_buf(),
        source: e.into(),
    })
}

/// Removes a tree that may be missing.
pub(crate) fn remove_tree(p: &Path) -> Result<()> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Io {
            op: "remove tree",
            path: p.to_path_buf(),
            source: e,
        }),
    }
}

fn remove_children(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(io_err("read dir", dir))? {
        let e = e.map_err(io_err("read dir", dir))?;
        let p = e.path();
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_tree(&p)?;
        } else {
            std::fs::remove_file(&p).map_err(io_err("remove", &p))?;
        }
    }
    Ok(())
}
