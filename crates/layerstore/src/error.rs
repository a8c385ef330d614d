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
    /// A digest string is not `sha256:<64 lowercase hex>`.
    #[error("invalid digest {value:?}")]
    InvalidDigest {
        /// The string given.
        value: String,
    },
    /// A file changed size while it was being archived.
    #[error("{} changed while being archived", path.display())]
    SourceChanged {
        /// The file.
        path: PathBuf,
    },
    /// Writing a layer tar or its tar-split to the caller's sink failed.
    #[error("write layer tar output")]
    TarOutput {
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or decompressing a tar stream failed.
    #[error("read tar at offset {offset} (entry {entry:?})")]
    TarRead {
        /// The member being read (or the last one read).
        entry: String,
        /// Offset in the uncompressed stream.
        offset: u64,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A tar stream is malformed or truncated.
    #[error("corrupt tar at offset {offset} (entry {entry:?}): {reason}")]
    CorruptTar {
        /// The member being read (or the last one read).
        entry: String,
        /// Offset in the uncompressed stream.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A tar member was refused: it would land outside the root, or is not supported.
    #[error("tar entry {entry:?} rejected: {reason}")]
    TarEntryRejected {
        /// The member name.
        entry: String,
        /// Why.
        reason: String,
    },
    /// An overlay upperdir uses a feature that makes it depend on its lower layers.
    #[error("{}: overlay {xattr} cannot be exported as a layer", path.display())]
    OverlayFeature {
        /// The file or directory.
        path: PathBuf,
        /// The overlay xattr found.
        xattr: String,
    },
    /// A tar stream exceeds a configured limit.
    #[error("tar entry {entry:?} exceeds the {limit} limit of {max}")]
    TarLimit {
        /// The member that crossed the limit.
        entry: String,
        /// Which limit (`max_entries`, `max_depth`).
        limit: &'static str,
        /// The limit's value.
        max: u64,
    },
    /// Creating a tar member on disk failed.
    #[error("apply tar entry {entry:?}: {op}")]
    TarApply {
        /// The member name.
        entry: String,
        /// What was being done (`create`, `chown`, `set xattr`, ...).
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    // -- dockerstore module variants below --
    /// A graph driver berth cannot read or write.
    #[error("unsupported docker storage driver {driver:?} (need overlay2 or fuse-overlayfs)")]
    UnsupportedStorageDriver {
        /// The driver name.
        driver: String,
    },
    /// A Docker Engine API call failed.
    #[error("docker engine api: {op}")]
    DockerApi {
        /// The call.
        op: &'static str,
        /// The client error.
        #[source]
        source: Box<bollard::errors::Error>,
    },
    /// A base image a build used in place lost its layers while the build ran (its pin container
    /// was removed by force, stopped, or dockerd restarted, and the image was then deleted).
    #[error(
        "base image {reference} ({image}) was removed from Docker while the build used it: {cause}"
    )]
    BaseImageLost {
        /// The reference the build named.
        reference: String,
        /// The image ID.
        image: String,
        /// What removed it, as far as berth saw.
        cause: String,
    },
    /// What dockerd reports does not match the store on disk.
    #[error("docker store mismatch: {what}")]
    DockerStoreMismatch {
        /// What differs.
        what: String,
    },
    /// Docker's layerdb has no such layer.
    #[error("layer {chain_id} is not in docker's store at {}", data_root.display())]
    DockerLayerMissing {
        /// The chainID.
        chain_id: String,
        /// The data root.
        data_root: PathBuf,
    },
    /// A file of Docker's store is malformed.
    #[error("bad docker store file {}: {reason}", path.display())]
    BadDockerStoreFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Content does not hash to the digest it is stored under.
    #[error("digest mismatch: expected {expected}, found {found}")]
    DigestMismatch {
        /// The expected digest.
        expected: String,
        /// The computed digest.
        found: String,
    },
    /// An image config is unusable.
    #[error("bad image config: {reason}")]
    BadImageConfig {
        /// What is wrong.
        reason: String,
    },
    /// The offline writer refuses a data root a dockerd is using.
    #[error("dockerd is running on {}: {evidence}", data_root.display())]
    DockerDaemonRunning {
        /// The data root.
        data_root: PathBuf,
        /// How it was detected.
        evidence: String,
    },
    /// Docker refuses chains deeper than this.
    #[error("layer chain deeper than docker's limit of {max}")]
    DockerChainTooDeep {
        /// The limit.
        max: usize,
    },
    /// An image reference cannot be used as a tag.
    #[error("invalid image reference {reference:?}")]
    InvalidImageReference {
        /// The reference.
        reference: String,
    },
    /// A stopped daemon's data root has no image for a reference (and nothing can pull it).
    #[error(
        "image {reference} not found in the stopped Docker data root {}; start dockerd to pull it",
        data_root.display()
    )]
    DockerImageNotFound {
        /// The reference as given.
        reference: String,
        /// The data root.
        data_root: PathBuf,
    },
    /// A short image ID matches more than one image.
    #[error("image ID prefix {prefix:?} matches several images in {}", data_root.display())]
    AmbiguousImageId {
        /// The prefix as given.
        prefix: String,
        /// The data root.
        data_root: PathBuf,
    },
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
