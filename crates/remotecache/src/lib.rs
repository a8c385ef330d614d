//! Build cache export and import in BuildKit's cache format, so build nodes share work through a
//! registry (or a client-side content store) the way buildkitd does.
//!
//! - [`config`]: the cache config JSON (`application/vnd.buildkit.cacheconfig.v0`).
//! - [`attrs`]: `--export-cache` / `--import-cache` entries and the `cache-imports` frontend
//!   attribute.
//! - [`export`]: a worker [`worker::SolveTrace`] → records and layer blobs ([`Built`]), written
//!   as BuildKit v0.11.6 writes them: an index (OCI image index, or a Docker manifest list with
//!   `oci-mediatypes=false`) listing every layer blob (annotated with its diffID and creation
//!   time) and the config blob; pushed under a registry reference, or written into a
//!   [`ContentStore`] (the client's store for `type=local`); or, for `type=inline`, the records
//!   alone for the image config's `moby.buildkit.cache.v0`.
//! - [`s3`]: `type=s3`, a bucket holding the config and the layer blobs under their own keys
//!   (BuildKit's layout, no index).
//! - [`import`]: such an index (or an image carrying inline cache) read back into a
//!   [`worker::CacheSource`] whose layers are fetched only when a matching step's result is
//!   built.
//!
//! Keys are berth's cache keys (node independent, see `worker::remote`). A cache written by
//! stock buildkitd is also found by BuildKit's own keys: [`import::stock_ids`] indexes its
//! records with their inputs (`worker::stock_record_id`), which berth's solver computes per vertex
//! (`docs/cache.md`). Exports write stock's records next to berth's ([`export`]: the trace's
//! `worker::StockVertex`), so stock buildkitd importing them finds its steps too.

pub mod attrs;
pub mod config;
pub mod export;
pub mod import;
pub mod s3;
pub mod store;

pub use attrs::{
    parse_export, parse_frontend_cache_imports, parse_import, CompressionOpts, ExportSpec,
    ExportTarget, ImportSpec, Mode,
};
pub use config::{CacheConfig, CACHE_CONFIG_MEDIA_TYPE};
pub use export::{build, Built, ExportProgress, Exported};
pub use import::RemoteCache;
pub use s3::{S3Client, S3Config};
pub use store::{ContentStore, LocalDir};

/// Errors of cache export and import. Messages name the cache (reference or directory) and the
/// step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad attribute or a malformed cache.
    #[error("{0}")]
    Invalid(String),
    /// A registry failed.
    #[error("{what}: {source}")]
    Registry {
        /// What was being done.
        what: String,
        /// The registry error.
        #[source]
        source: Box<registry::Error>,
    },
    /// Reading layers from berth's store failed.
    #[error("{what}: {source}")]
    Export {
        /// What was being done.
        what: String,
        /// The exporter error.
        #[source]
        source: Box<exporter::Error>,
    },
    /// An S3 call failed (the text reads as the Go SDK's: `operation error S3: …`).
    #[error("{0}")]
    S3(String),
    /// Anything else (content store, I/O, tasks).
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub(crate) fn invalid(m: impl Into<String>) -> Self {
        Error::Invalid(m.into())
    }
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;
