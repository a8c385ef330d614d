//! The exporters' error type.

/// Result alias for exporters.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while exporting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The image config could not be read or written.
    #[error("image config: {what}")]
    ImageConfig {
        /// What was being done.
        what: &'static str,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A registry operation (push) failed.
    #[error("{what}: {source}")]
    Registry {
        /// What was being done.
        what: String,
        /// The registry client's error (names the reference and step).
        #[source]
        source: Box<registry::Error>,
    },
    /// A layer had to be sent but berth holds no copy of it.
    #[error("layer {diff_id} is needed but neither Docker nor berth has it")]
    LayerUnavailable {
        /// The layer's diffID.
        diff_id: String,
    },
    /// A base layer of the Engine's containerd store cannot be read as a tar.
    #[error("layer {diff_id} (blob {blob} in containerd's content store): {message}")]
    ContainerdBlob {
        /// The layer's diffID.
        diff_id: String,
        /// Its blob's digest.
        blob: String,
        /// What is wrong.
        message: String,
    },
    /// Producing a layer's tar failed.
    #[error("stream layer {diff_id}")]
    LayerStream {
        /// The layer's diffID.
        diff_id: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A layer source produced a different number of bytes than announced.
    #[error("layer {diff_id}: expected {expected} bytes of tar, produced {found}")]
    LayerSizeMismatch {
        /// The layer's diffID.
        diff_id: String,
        /// Announced size.
        expected: u64,
        /// Produced size.
        found: u64,
    },
    /// Writing the archive failed.
    #[error("write docker archive")]
    ArchiveWrite {
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The Docker Engine refused or failed the load.
    #[error("docker load: {message}")]
    DockerLoad {
        /// What the daemon (or the client) said.
        message: String,
    },
    /// Tagging the image failed.
    #[error("tag {name}: {message}")]
    DockerTag {
        /// The name being applied.
        name: String,
        /// What the daemon said.
        message: String,
    },
    /// An image name could not be used.
    #[error("invalid image name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// An attestation of the result cannot be exported.
    #[error("attestation {path}: {reason}")]
    InvalidAttestation {
        /// The attestation's path in its result.
        path: String,
        /// Why.
        reason: String,
    },
    /// The Engine's containerd image store cannot be used (unreachable socket, bad image).
    #[error(transparent)]
    ContainerdStore(#[from] containerdstore::Error),
    /// A containerd call failed.
    #[error("containerd: {what}: {code:?}: {message}")]
    Containerd {
        /// What was being done.
        what: String,
        /// The gRPC code containerd answered.
        code: tonic::Code,
        /// Its message.
        message: String,
    },
    /// The layer store failed.
    #[error("{what}")]
    Store {
        /// What was being done.
        what: String,
        /// The layer store's error.
        #[source]
        source: layerstore::Error,
    },
    /// Writing a blob into a content store (the client's, for `tar=false`) failed.
    #[error("write blob {digest} to {store}")]
    ContentStore {
        /// The store.
        store: String,
        /// The blob's digest.
        digest: String,
        /// What the store (or the writer) said.
        #[source]
        source: std::io::Error,
    },
    /// A file operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}
