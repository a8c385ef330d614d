//! The registry client's error type.
//!
//! Every error that comes from talking to a registry names the reference it was for and the step
//! that failed (`resolve`, `fetch manifest`, `fetch blob sha256:…`, `push blob`, …), so the
//! message a build shows says what to fix without a log.

/// Result alias for the registry client.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Boxed cause from a caller (the session's auth provider).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Coarse classification of an [`Error`] (mapped to a gRPC status by the daemon).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The reference or configuration is malformed.
    InvalidArgument,
    /// The registry has no such manifest/blob, or no manifest for the platform.
    NotFound,
    /// The registry refused the credentials (or there were none).
    Unauthenticated,
    /// The registry could not be reached (after retries).
    Unavailable,
    /// The registry sent content that does not match its digest, is truncated or undecodable.
    DataLoss,
    /// Anything else.
    Internal,
}

/// Everything that can go wrong talking to a registry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An image reference that cannot be parsed.
    #[error("invalid reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A `[registry."host"]` setting that cannot be used (a CA or key pair file, …).
    #[error("registry config for {host}: {what}")]
    Config {
        /// The host whose config is wrong.
        host: String,
        /// What failed.
        what: String,
        /// The cause.
        #[source]
        source: Option<BoxError>,
    },
    /// No endpoint of the registry answered.
    #[error("{step} {reference}: {host} unreachable: {reason}")]
    Unreachable {
        /// The reference.
        reference: String,
        /// The step (`resolve`, `fetch blob sha256:…`, …).
        step: String,
        /// The endpoint last tried.
        host: String,
        /// Why, in the words Go's `net` package (so buildkitd) uses: `dial tcp: lookup HOST: no
        /// such host`, `dial tcp HOST:PORT: connect: connection refused`, …
        reason: String,
        /// The network error.
        #[source]
        source: BoxError,
    },
    /// The registry refused the request for lack of (valid) credentials.
    #[error("{step} {reference}: {host}: authentication failed (HTTP {status}): {message}")]
    Unauthorized {
        /// The reference.
        reference: String,
        /// The step.
        step: String,
        /// The endpoint.
        host: String,
        /// 401 or 403.
        status: u16,
        /// What the registry or token server said.
        message: String,
    },
    /// The registry does not have what was asked for.
    #[error("{step} {reference}: not found")]
    NotFound {
        /// The reference.
        reference: String,
        /// The step.
        step: String,
    },
    /// Any other unexpected HTTP status.
    #[error("{step} {reference}: {host} answered HTTP {status}: {message}")]
    Http {
        /// The reference.
        reference: String,
        /// The step.
        step: String,
        /// The endpoint.
        host: String,
        /// The status code.
        status: u16,
        /// The body (first bytes), or the registry's error message.
        message: String,
    },
    /// Content whose sha256 is not the digest it was asked by.
    #[error("{step} {reference}: digest mismatch: expected {expected}, got {found}")]
    DigestMismatch {
        /// The reference.
        reference: String,
        /// The step.
        step: String,
        /// The digest asked for.
        expected: String,
        /// The digest of what arrived.
        found: String,
    },
    /// A blob that ended before its declared size (also after resuming).
    #[error("{step} {reference}: truncated: got {got} of {expected} bytes")]
    Truncated {
        /// The reference.
        reference: String,
        /// The step.
        step: String,
        /// Declared size.
        expected: u64,
        /// Bytes received.
        got: u64,
    },
    /// A manifest or index that cannot be used.
    #[error("{step} {reference}: {reason}")]
    Manifest {
        /// The reference.
        reference: String,
        /// The step.
        step: String,
        /// What is wrong.
        reason: String,
    },
    /// The session's auth provider failed.
    #[error("credentials for {host}")]
    Auth {
        /// The registry host.
        host: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// Local I/O (blob cache, temp files).
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The coarse class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidReference { .. } | Error::Config { .. } => ErrorKind::InvalidArgument,
            Error::Unreachable { .. } => ErrorKind::Unavailable,
            Error::Unauthorized { .. } => ErrorKind::Unauthenticated,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::Http { status, .. } if *status >= 500 || *status == 429 => {
                ErrorKind::Unavailable
            }
            Error::Http { .. } => ErrorKind::Internal,
            Error::DigestMismatch { .. } | Error::Truncated { .. } | Error::Manifest { .. } => {
                ErrorKind::DataLoss
            }
            Error::Auth { .. } => ErrorKind::Unauthenticated,
            Error::Io { .. } => ErrorKind::Internal,
        }
    }

    /// True for failures worth trying again (network, 5xx, 429).
    pub(crate) fn transient(&self) -> bool {
        matches!(self.kind(), ErrorKind::Unavailable)
    }
}
