//! berth's own snapshots on overlayfs under berth's root (`--root`, default `/var/lib/berth`).
//!
//! This module owns everything under `<root>/snapshots/`. Nobody else writes there.
//!
//! # Model
//!
//! - A **layer** is immutable and lives in `layers/<layer-id>/diff` in overlay upperdir format (a deletion is a
//!   character device 0:0, an opaque directory carries `trusted.overlay.opaque=y`). It may carry a diffID, a size and
//!   a tar-split file once it has been exported as a tar. A layer never changes after it is committed.
//! - A **chain** ([`Chain`]) is an ordered list of layers, bottom → top. Its entries are either berth layers or
//!   Docker's own layer directories (read-only lower dirs of a base image, see [`DockerLayer`]). MergeOp results are
//!   concatenated chains; DiffOp results are layer ranges or one computed layer.
//! - A **snapshot** is a named chain recorded in the metadata DB. A *committed* snapshot is read-only. A *mutable*
//!   snapshot additionally owns an `upper/` and `work/` dir and mounts read-write; [`SnapshotStore::commit`] turns its
//!   upper dir into a new layer by `rename(2)` (no copy) and records a committed snapshot with that layer on top.
//!   Before that the upper dir is normalised against its parent's view as BuildKit's overlay differ does (opaque dirs
//!   become explicit whiteouts, unchanged copy-ups are dropped; see `normalize.rs`), so the layer holds only changes
//!   and stays right as a MergeOp input.
//!
//! Merge is lazy: a merged snapshot is only the concatenation of its inputs' chains; it is materialised (as stacked
//! lowerdirs) only when mounted.
//!
//! # On-disk layout (under `<root>/snapshots/`)
//!
//! ```text
//! metadata.redb            redb database: snapshots, layers, cache keys, leases (the commit point of every change)
//! layers/<layer-id>/diff/  immutable layer tree, overlay format (also the generated AUFS adapter layers)
//! layers/<layer-id>/tar-split.json.gz   optional, written by the exporter
//! layers/<layer-id>/tar-omit            optional, written at commit: the layer's quiet dirs (mtime-only changes,
//!                                       kept for the view, left out of its tar and of DiffOp results; normalize.rs)
//! l/<layer-id>             symlink ../layers/<layer-id>/diff (short lowerdir name for the legacy mount path)
//! l/<dk-xxxxxxxxxx>        symlink to a Docker layer diff dir (absolute), legacy mount path only
//! mutable/<snapshot-id>/{upper,work}/   rw dirs of mutable snapshots
//! mounts/<n>/              mount points created by [`SnapshotStore::mount`] when no target is given
//! tmp/                     staging area; everything in it is garbage after a crash
//! empty/, empty2/          empty dirs: the bottom lowerdir of every mount (so whiteouts in the lowest real layer
//!                          are hidden, and a read-only mount of scratch still has the two lowers overlay needs)
//! ```
//!
//! # Crash safety
//!
//! Filesystem work happens first in `tmp/` and is moved into place by `rename(2)`; the redb transaction that records
//! the result is the commit point. Deletions commit the DB first, then remove files. [`SnapshotStore::open`] therefore
//! only has to delete: files that no record points to (orphans), `tmp/*`, leftover mounts under the root (from
//! `/proc/self/mountinfo`) and process-bound leases of the previous run.
//!
//! # Concurrency
//!
//! All methods block (filesystem, fsync, mount syscalls); async callers use `tokio::task::spawn_blocking`. A store is
//! cheap to clone and may be shared between threads. One process opens a root at a time (an `flock` on
//! `metadata.redb`, held by redb).
//!
//! # Mounting long chains
//!
//! The legacy `mount(2)` takes all options in one page (4096 bytes). Docker's layer store caps chains at 125 layers
//! and uses 26-character link names relative to the driver dir for this reason. berth mounts with the new mount API
//! (`fsopen("overlay")` + one `fsconfig("lowerdir+", dir)` per layer + `fsmount` + `move_mount`), which has no total
//! length limit, when the kernel supports `lowerdir+` (Linux ≥ 6.8). Otherwise it falls back to `mount(2)` with
//! relative `l/<id>` names, resolved by a short-lived thread that unshares its fs context (`CLONE_FS`) and `chdir`s
//! into `snapshots/`, so the process's working directory never changes.
//!
//! Measured (test `long_chain_both_mount_methods`, 130 one-file layers, kernel 6.18, ext4, 2 busy vCPUs, debug
//! build; `SnapshotStore::mount` end to end, which includes one metadata write): new API 14–26 ms per mount on a
//! quiet machine and 30–41 ms under load; short links 22–37 ms quiet and 46–93 ms under load (the extra is the helper
//! thread and path lookups through the `l/` symlinks); unmount 1–13 ms for both. The short-link path also fails past
//! ~270 layers (12-character ids). So `Auto` picks the new API whenever the kernel accepts `lowerdir+`.
//!
//! Deeper than a method can stack (overlayfs: 500 lower dirs; short links: 240), the bottom of the chain is
//! flattened for that mount into one plain dir under `tmp/` (files hardlinked from the layers, whiteouts and opaque
//! dirs applied) and removed after unmount (test `deep_chains_are_flattened_at_the_bottom`). Measured there for a
//! 505-layer chain: new API (7 layers flattened, 500 stacked) 0.61 s, short links (267 flattened, 240 stacked)
//! 0.17 s; stacking near overlayfs' maximum is itself slow in the kernel.
//!
//! # Docker layers in a chain
//!
//! [`LayerRef::Docker`] entries are used in place as lower dirs and never written. A layer of Docker's
//! `fuse-overlayfs` driver stores deletions in AUFS form ([`WhiteoutFormat::Aufs`]); for each such layer that has
//! markers the store generates, once, two small berth layers (recorded in the `docker_adapters` table, kept while a
//! snapshot references the Docker layer): one stacked right below it with the overlay whiteouts/opaque dirs the
//! markers stand for, and one right above it with whiteouts hiding the marker files themselves (its directories copy
//! the Docker layer's metadata, so nothing else changes in the merged view).
mod db;
mod diff;
mod mount;
mod normalize;
mod store;

pub(crate) use diff::{copy_meta, make_whiteout};
pub use mount::{Mount, MountMethod};
pub(crate) use store::{dir_size, fsync_path};
pub use store::{SnapshotStore, StoreCounts};

/// A random `[a-z0-9]` string of `len` characters (ids, temp names).
pub(crate) fn random_token(len: usize) -> String {
    store::random_id(len)
}

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Options for [`SnapshotStore::open`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// berth's root (`--root`); the store lives in `<root>/snapshots`.
    pub root: PathBuf,
    /// How overlay mounts are made. [`MountMethod::Auto`] probes the kernel.
    pub mount_method: MountMethod,
}

impl StoreOptions {
    /// Options with the given root and automatic mount method.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StoreOptions {
            root: root.into(),
            mount_method: MountMethod::Auto,
        }
    }
}

/// Identifies a snapshot (committed or mutable). Random, 26 characters `[a-z0-9]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SnapshotId(pub(crate) String);

/// Identifies an immutable berth layer. Random, 12 characters `[a-z0-9]` (short, because it is also the legacy
/// mount path's link name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LayerId(pub(crate) String);

macro_rules! string_id {
    ($t:ty) => {
        impl $t {
            /// The id as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::str::FromStr for $t {
            type Err = crate::Error;
            fn from_str(s: &str) -> crate::Result<Self> {
                if s.is_empty()
                    || s.len() > 64
                    || !s
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                {
                    return Err(crate::Error::InvalidSnapshotId { id: s.to_string() });
                }
                Ok(Self(s.to_string()))
            }
        }
    };
}
string_id!(SnapshotId);
string_id!(LayerId);

/// How deletions and opaque directories are stored in a Docker layer dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WhiteoutFormat {
    /// Kernel overlay format (char device 0:0, `trusted.overlay.opaque=y`): Docker's `overlay2` driver.
    Overlay,
    /// AUFS format (`.wh.<name>` and `.wh..wh..opq` regular files): Docker's `fuse-overlayfs` driver applies layers
    /// this way. Kernel overlayfs does not understand it, so the store stacks two small generated layers around such
    /// a layer (one below it that deletes/opaques what the markers name, one above it that hides the markers).
    Aufs,
}

/// A layer directory owned by dockerd (or, on the containerd image store, by the Engine's
/// containerd snapshotter), used read-only as a lowerdir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerLayer {
    /// `sha256:<hex>` chainID of the layer in Docker's layerdb (or the snapshot's name in the
    /// containerd snapshotter, which is the same chainID).
    pub chain_id: String,
    /// `sha256:<hex>` diffID of the layer.
    pub diff_id: String,
    /// `<data-root>/<driver>/<cache-id>/diff`, or a containerd `overlayfs` snapshot's
    /// `snapshots/<n>/fs`.
    pub diff_dir: PathBuf,
    /// How the driver stores whiteouts in `diff_dir`.
    pub whiteouts: WhiteoutFormat,
    /// On the containerd image store: the layer's blob in containerd's content store, as the
    /// base image's manifest lists it (exports reference it instead of writing the layer again).
    /// `None` for the classic store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<BlobDescriptor>,
}

/// An OCI descriptor of a layer blob in a content store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobDescriptor {
    /// `mediaType` (e.g. `application/vnd.oci.image.layer.v1.tar+gzip`).
    pub media_type: String,
    /// `sha256:<hex>` of the blob (compressed as stored).
    pub digest: String,
    /// Size of the blob in bytes.
    pub size: u64,
}

/// One entry of a [`Chain`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerRef {
    /// A layer under berth's root.
    Berth(LayerId),
    /// A layer in Docker's store.
    Docker(DockerLayer),
}

/// An ordered list of layers, bottom → top. The empty chain is `scratch`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chain(pub Vec<LayerRef>);

impl Chain {
    /// The layers, bottom → top.
    pub fn layers(&self) -> &[LayerRef] {
        &self.0
    }

    /// True for scratch.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// MergeOp's layer model: the inputs' chains concatenated in order (later inputs on top). Empty inputs vanish.
    pub fn merge<'a>(inputs: impl IntoIterator<Item = &'a Chain>) -> Chain {
        Chain(
            inputs
                .into_iter()
                .flat_map(|c| c.0.iter().cloned())
                .collect(),
        )
    }

    /// If `lower` is a prefix of `self` (an ancestor), the layers between them; else `None`.
    pub fn strip_prefix(&self, lower: &Chain) -> Option<Chain> {
        self.0
            .starts_with(&lower.0)
            .then(|| Chain(self.0[lower.0.len()..].to_vec()))
    }
}

/// Committed (read-only) or mutable (has an upper dir).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotKind {
    /// Read-only; its chain is fixed.
    Committed,
    /// Read-write overlay on top of its parent's chain.
    Mutable,
}

/// BuildKit's usage record types (`client.UsageRecordType`), spelled as on the wire by [`RecordType::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordType {
    /// `regular`
    Regular,
    /// `source.local`
    LocalSource,
    /// `source.git.checkout`
    GitCheckout,
    /// `exec.cachemount`
    CacheMount,
    /// `frontend`
    Frontend,
    /// `internal`
    Internal,
}

impl RecordType {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordType::Regular => "regular",
            RecordType::LocalSource => "source.local",
            RecordType::GitCheckout => "source.git.checkout",
            RecordType::CacheMount => "exec.cachemount",
            RecordType::Frontend => "frontend",
            RecordType::Internal => "internal",
        }
    }
}

/// Options for creating a snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    /// Human-readable description (shown by `buildctl du`).
    pub description: String,
    /// Record type for disk-usage reports.
    pub record_type: RecordType,
}

impl SnapshotOptions {
    /// A regular record with this description.
    pub fn new(description: impl Into<String>) -> Self {
        SnapshotOptions {
            description: description.into(),
            record_type: RecordType::Regular,
        }
    }
}

/// Metadata of a berth layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerMeta {
    /// `sha256:<hex>` of the layer's uncompressed tar, once known.
    pub diff_id: Option<String>,
    /// Byte size of the uncompressed tar, once known.
    pub tar_size: Option<u64>,
    /// Whether `layers/<id>/tar-split.json.gz` exists.
    pub has_tar_split: bool,
}

/// What [`SnapshotStore::info`] reports.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    /// The snapshot.
    pub id: SnapshotId,
    /// Committed or mutable.
    pub kind: SnapshotKind,
    /// Snapshots this one was made from (one for exec/commit, several for merge, lower+upper for diff).
    pub parents: Vec<SnapshotId>,
    /// Its layers (for a mutable snapshot: the read-only lower chain under its upper dir).
    pub chain: Chain,
    /// Description.
    pub description: String,
    /// Record type.
    pub record_type: RecordType,
    /// Creation time.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Last time it was mounted or leased.
    pub last_used_at: Option<chrono::DateTime<chrono::Utc>>,
    /// How many times it was mounted or leased.
    pub usage_count: u64,
}

/// One entry of [`SnapshotStore::disk_usage`], shaped like BuildKit's `UsageRecord`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    /// Snapshot id.
    pub id: String,
    /// Mutable snapshot.
    pub mutable: bool,
    /// Held by a lease or mounted.
    pub in_use: bool,
    /// Bytes on disk owned by this record: its own top layer (or upper dir), hardlinks counted once.
    pub size: u64,
    /// Parent snapshot ids.
    pub parents: Vec<String>,
    /// Creation time.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Last use.
    pub last_used_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Use count.
    pub usage_count: u64,
    /// Description.
    pub description: String,
    /// Record type.
    pub record_type: RecordType,
    /// Its own layer is also in another snapshot's chain.
    pub shared: bool,
}

/// What [`SnapshotStore::prune`] removes.
#[derive(Debug, Clone, Default)]
pub struct PruneOptions {
    /// Remove everything not in use (BuildKit `--all`); otherwise internal/frontend records are kept.
    pub all: bool,
    /// Only records unused for at least this long.
    pub keep_duration: Option<std::time::Duration>,
    /// Stop once the remaining total is at most this many bytes (oldest-used removed first).
    pub keep_bytes: Option<u64>,
    /// Only records whose type is in this list (empty: any type).
    pub filter_types: Vec<RecordType>,
    /// Only records whose description contains this text.
    pub filter_description: Option<String>,
}

/// A lease: while it is alive, the snapshots added to it are not pruned or removed.
///
/// Dropping it releases it (for leases made by [`SnapshotStore::lease`]); leases with an expiry survive a restart
/// until they expire.
pub use store::Lease;
