//! The layer store's error type.

use std::path::PathBuf;

/// Result alias for the layer store.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the layer store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation on a path failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done (`open`, `rename`, ...).
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    // -- tar module variants below (owned by the tar module) --
    // -- dockerstore module variants below --
    // -- snapshot module variants below --
    /// A snapshot or layer id has the wrong form.
    #[error("invalid snapshot or layer id {id:?}")]
    InvalidSnapshotId {
        /// The rejected id.
        id: String,
    },
    /// No snapshot with this id.
    #[error("snapshot {id} not found")]
    SnapshotNotFound {
        /// The snapshot id.
        id: String,
    },
    /// No layer with this id.
    #[error("layer {id} not found")]
    LayerNotFound {
        /// The layer id.
        id: String,
    },
    /// No lease with this id (already released).
    #[error("lease {id} not found")]
    LeaseNotFound {
        /// The lease id.
        id: String,
    },
    /// The operation needs a mutable snapshot.
    #[error("snapshot {id} is not mutable")]
    SnapshotNotMutable {
        /// The snapshot id.
        id: String,
    },
    /// The operation needs a committed snapshot.
    #[error("snapshot {id} is not committed")]
    SnapshotNotCommitted {
        /// The snapshot id.
        id: String,
    },
    /// The snapshot is leased or mounted.
    #[error("snapshot {id} is in use by {by}")]
    SnapshotInUse {
        /// The snapshot id.
        id: String,
        /// What holds it.
        by: &'static str,
    },
    /// The snapshot metadata database failed.
    #[error("snapshot database: {op}")]
    SnapshotDb {
        /// What was being done.
        op: &'static str,
        /// The redb error.
        #[source]
        source: Box<redb::Error>,
    },
    /// A metadata record could not be decoded.
    #[error("snapshot database: bad record {key:?} in table {table}")]
    SnapshotMetadata {
        /// Table name.
        table: &'static str,
        /// Record key.
        key: String,
        /// The decode error.
        #[source]
        source: serde_json::Error,
    },
    /// An overlay mount failed.
    #[error("mounting overlay with {layers} lower dirs at {}", target.display())]
    Mount {
        /// The mount point.
        target: PathBuf,
        /// Number of lower dirs.
        layers: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Unmounting failed.
    #[error("unmounting {}", target.display())]
    Unmount {
        /// The mount point.
        target: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The legacy mount path cannot fit the options into one page.
    #[error("overlay options for {layers} layers take {len} bytes, over the 4095-byte page")]
    MountOptionsTooLong {
        /// Option string length.
        len: usize,
        /// Number of lower dirs.
        layers: usize,
    },
    /// More layers than overlayfs can stack.
    #[error("chain of {layers} layers exceeds overlayfs' limit of {max}")]
    TooManyLayers {
        /// Layers in the chain (with generated ones).
        layers: usize,
        /// The limit.
        max: usize,
    },
}
