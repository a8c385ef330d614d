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
}
