//! The snapshot store's metadata database (redb). Values are JSON so that records can grow fields.
//!
//! Tables: `snapshots` (id → [`SnapRec`]), `layers` (id → [`LayerRec`]), `cache_keys` (key → snapshot id),
//! `leases` (id → [`LeaseRec`]), `docker_adapters` (Docker diff dir → [`AdapterRec`]),
//! `docker_layer_times` (a Docker layer's chainID → its creation time as berth knows it, RFC 3339).

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use redb::{ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Chain, LayerId, LayerMeta, RecordType, SnapshotId, SnapshotKind};
use crate::{Error, Result};

pub(crate) const SNAPSHOTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("snapshots");
pub(crate) const LAYERS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("layers");
pub(crate) const CACHE_KEYS: TableDefinition<'_, &str, &str> = TableDefinition::new("cache_keys");
pub(crate) const LEASES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("leases");
pub(crate) const ADAPTERS: TableDefinition<'_, &str, &[u8]> =
    TableDefinition::new("docker_adapters");
pub(crate) const DOCKER_LAYER_TIMES: TableDefinition<'_, &str, &[u8]> =
    TableDefinition::new("docker_layer_times");

/// A snapshot record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SnapRec {
    pub kind: SnapshotKind,
    pub parents: Vec<SnapshotId>,
    /// Committed: all layers. Mutable: the lower chain under `mutable/<id>/upper`.
    pub chain: Chain,
    /// The layer this snapshot created (commit, diff, tar import), counted as its size in disk usage.
    pub own_layer: Option<LayerId>,
    pub description: String,
    pub record_type: RecordType,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub usage_count: u64,
}

/// A layer record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LayerRec {
    pub meta: LayerMeta,
    pub created_at: DateTime<Utc>,
    /// Bytes of `diff/` (lstat sizes of non-dirs, hardlinks once), computed at commit.
    pub disk_size: u64,
    /// Set for the generated layers around an AUFS-format Docker layer: that layer's diff dir.
    pub adapter_for: Option<String>,
}

/// A lease record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LeaseRec {
    pub snapshots: Vec<SnapshotId>,
    /// `None`: bound to the process that made it (dropped at the next `open`).
    pub expires_at: Option<DateTime<Utc>>,
}

/// Generated layers for an AUFS-format Docker layer (both `None` when it has no whiteout markers).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct AdapterRec {
    pub below: Option<LayerId>,
    pub above: Option<LayerId>,
}

fn db_err(op: &'static str) -> impl FnOnce(redb::Error) -> Error {
    move |source| Error::SnapshotDb {
        op,
        source: Box::new(source),
    }
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail (no maps with non-string keys, no custom serialisers).
    serde_json::to_vec(v).expect("snapshot metadata serialises")
}

fn dec<T: DeserializeOwned>(table: &'static str, key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|source| Error::SnapshotMetadata {
        table,
        key: key.to_string(),
        source,
    })
}

/// The whole metadata state, read in one transaction.
#[derive(Debug, Default, Clone)]
pub(crate) struct State {
    pub snapshots: BTreeMap<SnapshotId, SnapRec>,
    pub layers: BTreeMap<LayerId, LayerRec>,
    pub cache_keys: BTreeMap<String, SnapshotId>,
    pub leases: BTreeMap<String, LeaseRec>,
    pub adapters: BTreeMap<String, AdapterRec>,
    pub docker_layer_times: BTreeMap<String, DateTime<Utc>>,
}

impl State {
    fn apply(&mut self, b: Batch) {
        for id in b.del_snapshots {
            self.snapshots.remove(&id);
        }
        self.snapshots.extend(b.put_snapshots);
        for id in b.del_layers {
            self.layers.remove(&id);
        }
        self.layers.extend(b.put_layers);
        for k in b.del_cache_keys {
            self.cache_keys.remove(&k);
        }
        self.cache_keys.extend(b.put_cache_keys);
        for k in b.del_leases {
            self.leases.remove(&k);
        }
        self.leases.extend(b.put_leases);
        for k in b.del_adapters {
            self.adapters.remove(&k);
        }
        self.adapters.extend(b.put_adapters);
        self.docker_layer_times.extend(b.put_docker_layer_times);
    }
}

/// One batch of changes, applied atomically by [`Db::apply`].
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub put_snapshots: Vec<(SnapshotId, SnapRec)>,
    pub del_snapshots: Vec<SnapshotId>,
    pub put_layers: Vec<(LayerId, LayerRec)>,
    pub del_layers: Vec<LayerId>,
    pub put_cache_keys: Vec<(String, SnapshotId)>,
    pub del_cache_keys: Vec<String>,
    pub put_leases: Vec<(String, LeaseRec)>,
    pub del_leases: Vec<String>,
    pub put_adapters: Vec<(String, AdapterRec)>,
    pub del_adapters: Vec<String>,
    pub put_docker_layer_times: Vec<(String, DateTime<Utc>)>,
}

/// The database plus an in-memory copy of its state. The store holds the only handle (redb locks the file), so the
/// copy is updated after each successful commit and reads never touch the disk.
///
/// The copy is shared (`Arc`): [`Db::load`] hands out a reference instead of cloning every table, so a lookup costs
/// the same on a root with thousands of records as on a fresh one. A commit clones the tables only while an
/// earlier [`Db::load`] result is still held (copy on write).
pub(crate) struct Db {
    db: redb::Database,
    cache: std::sync::Mutex<std::sync::Arc<State>>,
    /// Volatile commits since the last durable one (see [`Db::apply_volatile`]).
    volatile: std::sync::atomic::AtomicU32,
}

/// At most this many volatile commits in a row: the next one is made durable, so the pages they
/// leave behind are freed (redb frees pages only in durable commits) and the file stays small.
const MAX_VOLATILE_RUN: u32 = 16;

impl Db {
    pub fn open(path: &Path) -> Result<Db> {
        let db = redb::Database::create(path).map_err(|e| db_err("open")(e.into()))?;
        let db = Db {
            db,
            cache: std::sync::Mutex::new(std::sync::Arc::new(State::default())),
            volatile: std::sync::atomic::AtomicU32::new(0),
        };
        // Create the tables so that readers never see "table does not exist".
        db.apply(Batch::default())?;
        let st = db.read_all()?;
        *db.cache.lock().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(st);
        Ok(db)
    }

    /// Numbers of snapshots, layers and leases, without copying the state.
    pub fn counts(&self) -> (usize, usize, usize) {
        let st = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        (st.snapshots.len(), st.layers.len(), st.leases.len())
    }

    /// The current state: a shared, immutable view of the in-memory state (later commits do not change it).
    pub fn load(&self) -> Result<std::sync::Arc<State>> {
        Ok(self.cache.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    fn read_all(&self) -> Result<State> {
        let tx = self
            .db
            .begin_read()
            .map_err(|e| db_err("begin read")(e.into()))?;
        let mut st = State::default();
        let read = |e: redb::TableError| db_err("open table")(e.into());
        let t = tx.open_table(SNAPSHOTS).map_err(read)?;
        for row in t.iter().map_err(|e| db_err("read")(e.into()))? {
            let (k, v) = row.map_err(|e| db_err("read")(e.into()))?;
            st.snapshots.insert(
                SnapshotId(k.value().to_string()),
                dec("snapshots", k.value(), v.value())?,
            );
        }
        let t = tx.open_table(LAYERS).map_err(read)?;
        for row in t.iter().map_err(|e| db_err("read")(e.into()))? {
            let (k, v) = row.map_err(|e| db_err("read")(e.into()))?;
            st.layers.insert(
                LayerId(k.value().to_string()),
                dec("layers", k.value(), v.value())?,
            );
        }
        let t = tx.open_table(CACHE_KEYS).map_err(read)?;
        for row in t.iter().map_err(|e| db_err("read")(e.into()))? {
            let (k, v) = row.map_err(|e| db_err("read")(e.into()))?;
            st.cache_keys
                .insert(k.value().to_string(), SnapshotId(v.value().to_string()));
        }
        let t = tx.open_table(LEASES).map_err(read)?;
        for row in t.iter().map_err(|e| db_err("read")(e.into()))? {
            let (k, v) = row.map_err(|e| db_err("read")(e.into()))?;
            st.leases
                .insert(k.value().to_string(), dec("leases", k.value(), v.value())?);
        }
        let t = tx.open_table(ADAPTERS).map_err(read)?;
        for row in t.iter().map_err(|e| db_err("read")(e.into()))? {
            let (k, v) = row.map_err(|e| db_err("read")(e.into()))?;
            st.adapters.insert(
                k.value().to_string(),
                dec("docker_adapters", k.value(), v.value())?,
            );
        }
        let t = tx.open_table(DOCKER_LAYER_TIMES).map_err(read)?;
        for row in t.iter().map_err(|e| db_err("read")(e.into()))? {
            let (k, v) = row.map_err(|e| db_err("read")(e.into()))?;
            st.docker_layer_times.insert(
                k.value().to_string(),
                dec("docker_layer_times", k.value(), v.value())?,
            );
        }
        Ok(st)
    }

    /// Applies a batch in one durable write transaction (the commit point).
    pub fn apply(&self, b: Batch) -> Result<()> {
        self.commit(b, true)
    }

    /// Applies a batch without waiting for the disk: the change is visible at once and reaches
    /// the disk with the next durable commit (or is lost in a crash before it). Only for records
    /// a crash may lose: process-bound leases (dropped at the next open anyway) and use times.
    /// Every [`MAX_VOLATILE_RUN`]th volatile commit in a row is made durable.
    pub fn apply_volatile(&self, b: Batch) -> Result<()> {
        use std::sync::atomic::Ordering;
        let durable = self.volatile.fetch_add(1, Ordering::Relaxed) + 1 >= MAX_VOLATILE_RUN;
        self.commit(b, durable)
    }

    fn commit(&self, b: Batch, durable: bool) -> Result<()> {
        let mut tx = self
            .db
            .begin_write()
            .map_err(|e| db_err("begin write")(e.into()))?;
        if durable {
            self.volatile.store(0, std::sync::atomic::Ordering::Relaxed);
        } else {
            tx.set_durability(redb::Durability::None);
        }
        {
            let open = |e: redb::TableError| db_err("open table")(e.into());
            let w = |e: redb::StorageError| db_err("write")(e.into());
            let mut t = tx.open_table(SNAPSHOTS).map_err(open)?;
            for id in &b.del_snapshots {
                t.remove(id.as_str()).map_err(w)?;
            }
            for (id, rec) in &b.put_snapshots {
                t.insert(id.as_str(), enc(rec).as_slice()).map_err(w)?;
            }
            let mut t = tx.open_table(LAYERS).map_err(open)?;
            for id in &b.del_layers {
                t.remove(id.as_str()).map_err(w)?;
            }
            for (id, rec) in &b.put_layers {
                t.insert(id.as_str(), enc(rec).as_slice()).map_err(w)?;
            }
            let mut t = tx.open_table(CACHE_KEYS).map_err(open)?;
            for k in &b.del_cache_keys {
                t.remove(k.as_str()).map_err(w)?;
            }
            for (k, id) in &b.put_cache_keys {
                t.insert(k.as_str(), id.as_str()).map_err(w)?;
            }
            let mut t = tx.open_table(LEASES).map_err(open)?;
            for k in &b.del_leases {
                t.remove(k.as_str()).map_err(w)?;
            }
            for (k, rec) in &b.put_leases {
                t.insert(k.as_str(), enc(rec).as_slice()).map_err(w)?;
            }
            let mut t = tx.open_table(ADAPTERS).map_err(open)?;
            for k in &b.del_adapters {
                t.remove(k.as_str()).map_err(w)?;
            }
            for (k, rec) in &b.put_adapters {
                t.insert(k.as_str(), enc(rec).as_slice()).map_err(w)?;
            }
            let mut t = tx.open_table(DOCKER_LAYER_TIMES).map_err(open)?;
            for (k, at) in &b.put_docker_layer_times {
                t.insert(k.as_str(), enc(at).as_slice()).map_err(w)?;
            }
        }
        tx.commit().map_err(|e| db_err("commit")(e.into()))?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        std::sync::Arc::make_mut(&mut cache).apply(b);
        Ok(())
    }
}
