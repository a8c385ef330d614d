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
}
