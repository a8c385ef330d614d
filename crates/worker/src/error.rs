//! The worker's error type and its coarse classification ([`ErrorKind`]).
//!
//! The daemon maps [`Error::kind`] to a gRPC status code in exactly one place; nothing in the
//! worker knows about gRPC.

use std::path::PathBuf;

/// Result alias for the worker.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Boxed error used as a `#[source]` for causes from other crates or from the daemon.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Coarse classification of an [`Error`], for mapping to a gRPC status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request (definition, op, path...) is malformed or refers to something impossible.
    InvalidArgument,
    /// Something the build refers to does not exist (session dir, secret, file to copy...).
    NotFound,
    /// A required service (session, docker, registry) is not reachable right now.
    Unavailable,
    /// The build was canceled.
    Canceled,
    /// The build asked for something that is not allowed (entitlements).
    PermissionDenied,
    /// The build needs a feature berth does not implement (yet).
    Unimplemented,
    /// A build step ran and failed (e.g. a process exited non-zero): the build's own fault.
    FailedPrecondition,
    /// A bug or an unexpected system failure inside berth.
    Internal,
}

/// What a failed step left for inspection, in BuildKit's terms (`solver/errdefs.Solve`).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct StepFailure {
    /// The step's inputs: for an exec one per mount (`None` where the mount has no input), for
    /// a file op one per op input; for a content checksum, the input it failed on.
    pub inputs: Vec<Option<crate::SolvedRef>>,
    /// The states after the failure: for an exec one per mount (a writable mount's state as the
    /// process left it, else the mount's input), for a file op one per action.
    pub mounts: Vec<Option<crate::SolvedRef>>,
    /// What failed inside the step.
    pub subject: Option<FailedSubject>,
}

/// The part of a step that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailedSubject {
    /// The file action at this index of the file op.
    FileAction(usize),
    /// The content checksum of the op's input at this index (a selected read-only mount).
    ContentCache(usize),
}

/// Everything that can go wrong while solving a build.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The LLB definition is malformed; `op` names the op (digest, or `def[i]` before the digest
    /// is known).
    #[error("invalid definition: op {op}: {reason}")]
    InvalidDefinition {
        /// The offending op (digest, or `def[<index>]`).
        op: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A definition-level problem that is not about one op.
    #[error("invalid definition: {reason}")]
    InvalidRequest {
        /// What is wrong.
        reason: String,
    },
    /// A feature berth does not implement.
    #[error("{what} is not implemented yet")]
    NotImplemented {
        /// The missing feature (`ExecOp`, `git source`...).
        what: String,
    },
    /// An op needs an entitlement that was not granted.
    #[error("{entitlement} is not allowed")]
    EntitlementDenied {
        /// The entitlement (`network.host`, `security.insecure`).
        entitlement: String,
    },
    /// A path given by the build is invalid or tries to leave its root.
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath {
        /// The path as given by the build.
        path: String,
        /// Why it is refused.
        reason: String,
    },
    /// A path that the build needs does not exist in its state (worded like the `lstat` error
    /// buildkitd reports, which clients match on).
    #[error("{path}: no such file or directory")]
    PathNotFound {
        /// The path as given by the build.
        path: String,
    },
    /// A file operation failed in a way that is the build's fault (e.g. copying a directory onto a
    /// file, mkdir under a regular file).
    #[error("{action} {path:?}: {reason}")]
    FileAction {
        /// The action (`mkdir`, `copy`...).
        action: &'static str,
        /// The path as given by the build.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// An I/O operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done (`open`, `mount overlay`...).
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The session (client side) failed; `kind` says how the daemon should classify it.
    #[error("session: {what}")]
    Session {
        /// What was asked of the session (`sync local "context"`, `secret "id"`...).
        what: String,
        /// Classification chosen by the [`crate::SessionProvider`] implementation.
        kind: ErrorKind,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// The snapshot store (layerstore) failed.
    #[error("snapshot store: {what}")]
    Store {
        /// What was being done (`commit`, `mount`...).
        what: &'static str,
        /// The underlying error.
        #[source]
        source: layerstore::Error,
    },
    /// A vertex failed; wraps the op's error with the vertex it happened in. The message is the
    /// op's error alone, as buildkitd's (the failing step is named by the progress stream and by
    /// the `errdefs.Vertex` detail the daemon attaches from [`Error::vertex_digest`]); the op's
    /// error is not exposed as a separate `source()` so that chains are not printed twice.
    #[error("{error}")]
    Vertex {
        /// The vertex display name.
        name: String,
        /// The op digest of the vertex (`sha256:…`).
        digest: String,
        /// The op's error.
        error: Box<Error>,
    },
    /// An op failed in a way the op classifies itself (a process exit code, a download, a git
    /// command, the Docker Engine); `message` is shown to the user as is.
    #[error("{message}")]
    Op {
        /// What failed, complete (e.g. `process "sh -c false" did not complete successfully:
        /// exit code: 1`).
        message: String,
        /// Classification for the daemon.
        kind: ErrorKind,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// The build was canceled.
    #[error("context canceled")]
    Canceled,
    /// A step failed and left states a client can inspect (BuildKit's `ExecError`,
    /// `FileActionError` and `SlowCacheError`): the gateway hands them out as refs in the
    /// `errdefs.Solve` detail, so that a client can open a container on the failed state.
    /// The message is the step's error alone.
    #[error("{error}")]
    StepFailed {
        /// The step's error.
        error: Box<Error>,
        /// What was left.
        failure: Box<StepFailure>,
    },
    /// An error shared by several waiters (the same failed vertex seen from several users).
    #[error(transparent)]
    Shared(std::sync::Arc<Error>),
    /// Unexpected internal failure (a bug).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The coarse classification of this error, for mapping to a gRPC status code.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidDefinition { .. } | Error::InvalidRequest { .. } => {
                ErrorKind::InvalidArgument
            }
            Error::InvalidPath { .. } => ErrorKind::InvalidArgument,
            Error::NotImplemented { .. } => ErrorKind::Unimplemented,
            Error::EntitlementDenied { .. } => ErrorKind::PermissionDenied,
            Error::PathNotFound { .. } => ErrorKind::NotFound,
            Error::FileAction { .. } => ErrorKind::FailedPrecondition,
            Error::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => ErrorKind::NotFound,
                _ => ErrorKind::Internal,
            },
            Error::Session { kind, .. } => *kind,
            Error::Store { source, .. } => match source {
                layerstore::Error::SnapshotNotFound { .. } => ErrorKind::NotFound,
                _ => ErrorKind::Internal,
            },
            Error::Vertex { error, .. } => error.kind(),
            Error::StepFailed { error, .. } => error.kind(),
            Error::Op { kind, .. } => *kind,
            Error::Canceled => ErrorKind::Canceled,
            Error::Shared(e) => e.kind(),
            Error::Internal(_) => ErrorKind::Internal,
        }
    }

    /// The op digest of the vertex that failed, if the error comes from one.
    pub fn vertex_digest(&self) -> Option<&str> {
        match self {
            Error::Vertex { digest, .. } => Some(digest),
            Error::Shared(e) => e.vertex_digest(),
            _ => None,
        }
    }

    /// The states a failed step left (see [`Error::StepFailed`]), if this error has them.
    pub fn step_failure(&self) -> Option<&StepFailure> {
        match self {
            Error::StepFailed { failure, .. } => Some(failure),
            Error::Vertex { error, .. } => error.step_failure(),
            Error::Shared(e) => e.step_failure(),
            _ => None,
        }
    }

    /// Gives the states a failed step left (see [`Error::StepFailed`]) the base images of the
    /// build that made them: their pins live as long as those states do, and whatever reads
    /// their files waits for the pins ([`crate::SolvedRef::wait_for_pins`]).
    pub(crate) fn with_bases(
        mut self,
        bases: &std::sync::Arc<crate::ops::source_image::BaseImages>,
    ) -> Error {
        if let Error::StepFailed { failure, .. } = &mut self {
            let refs = failure.inputs.iter_mut().chain(failure.mounts.iter_mut());
            for r in refs.flatten() {
                r.bases.get_or_insert_with(|| bases.clone());
            }
        }
        self
    }

    /// Wraps this error with the states its step left.
    pub(crate) fn with_failure(self, failure: StepFailure) -> Error {
        Error::StepFailed {
            error: Box::new(self),
            failure: Box::new(failure),
        }
    }

    /// Builds a [`Error::Session`]; for [`crate::SessionProvider`] implementations.
    pub fn session(kind: ErrorKind, what: impl Into<String>, source: Option<BoxError>) -> Self {
        Error::Session {
            what: what.into(),
            kind,
            source,
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Maps a layerstore error, naming what was being done.
    /// This error, attributed to the vertex `other` failed in (if it did), so that the daemon
    /// reports it on that step.
    pub(crate) fn in_vertex_of(self, other: &Error) -> Error {
        match other {
            Error::Vertex { name, digest, .. } => Error::Vertex {
                name: name.clone(),
                digest: digest.clone(),
                error: Box::new(self),
            },
            Error::Shared(e) => self.in_vertex_of(e),
            _ => self,
        }
    }

    pub(crate) fn store(what: &'static str) -> impl FnOnce(layerstore::Error) -> Error {
        move |source| Error::Store { what, source }
    }

    pub(crate) fn invalid_op(op: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidDefinition {
            op: op.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn not_implemented(what: impl Into<String>) -> Self {
        Error::NotImplemented { what: what.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vertex_error_keeps_inner_kind() {
        let inner = Error::PathNotFound { path: "/a".into() };
        let e = Error::Vertex {
            name: "copy /a /b".into(),
            digest: "sha256:ab".into(),
            error: Box::new(inner),
        };
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.to_string(), "/a: no such file or directory");
        let shared = Error::Shared(std::sync::Arc::new(e));
        assert_eq!(shared.vertex_digest(), Some("sha256:ab"));
    }

    #[test]
    fn kinds() {
        assert_eq!(Error::Canceled.kind(), ErrorKind::Canceled);
        assert_eq!(
            Error::invalid_op("sha256:ab", "bad").kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            Error::not_implemented("ExecOp").to_string(),
            "ExecOp is not implemented yet"
        );
    }
}
