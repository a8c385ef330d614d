//! The crate's single error type.

use std::path::PathBuf;

/// What can go wrong while preparing, running or cleaning up a container.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The [`ProcessSpec`](crate::ProcessSpec) is unusable.
    #[error("invalid process spec: {reason}")]
    InvalidSpec {
        /// What is wrong.
        reason: String,
    },

    /// `SecurityMode::Insecure` was requested but the executor was built without
    /// `allow_insecure`.
    #[error("insecure (privileged) execution was requested but is not allowed by this executor")]
    InsecureNotAllowed,

    /// The runc binary could not be found or is not executable.
    #[error("runc binary {path:?} not found or not executable")]
    RuncNotFound {
        /// Path that was tried.
        path: PathBuf,
    },

    /// Creating, writing or removing something in the executor's state directory failed.
    #[error("state directory operation on {path:?} failed: {op}")]
    State {
        /// File or directory concerned.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },

    /// The root filesystem could not be opened.
    #[error("cannot open root filesystem {path:?}")]
    Rootfs {
        /// The rootfs path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: pathrs::error::Error,
    },

    /// A path inside the rootfs (mount point, working directory, stub) could not be resolved
    /// or created safely.
    #[error("cannot prepare {path:?} inside the root filesystem: {op}")]
    InRoot {
        /// Path inside the rootfs.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },

    /// The user or group of the process could not be resolved.
    #[error("cannot resolve user {user:?}: {reason}")]
    User {
        /// The user spec as given.
        user: String,
        /// Why.
        reason: String,
    },

    /// A mount source on the host is missing or unusable.
    #[error("mount source {source_path:?} for {dest:?} is unusable")]
    MountSource {
        /// Container destination.
        dest: PathBuf,
        /// Host source path.
        source_path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },

    /// Setting up the private tmpfs for secret files failed.
    #[error("cannot set up secret storage at {path:?}: {op}")]
    Secret {
        /// Directory or file concerned.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },

    /// The OCI runtime spec could not be built or serialised.
    #[error("cannot build OCI runtime spec: {reason}")]
    Spec {
        /// Why.
        reason: String,
    },

    /// Starting a runc command failed.
    #[error("cannot spawn {program:?}")]
    Spawn {
        /// Program.
        program: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },

    /// A runc management command (`kill`, `delete`, `list`) failed.
    #[error("runc {command} failed ({status}): {stderr}")]
    Runc {
        /// Subcommand and container id, e.g. `delete --force berth-1`.
        command: String,
        /// Exit status description.
        status: String,
        /// runc's standard error, trimmed.
        stderr: String,
    },

    /// runc could not start the process (bad executable, mount failure, ...). The process
    /// never ran.
    #[error("runc run failed for container {id} (exit code {code}): {message}")]
    RuncRun {
        /// Container id.
        id: String,
        /// runc's exit code.
        code: i32,
        /// Error lines from runc's log.
        message: String,
    },

    /// Waiting for runc failed.
    #[error("waiting for runc (container {id}) failed")]
    Wait {
        /// Container id.
        id: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },

    /// `exec` into a container that is not running.
    #[error("container {id} is not running: {reason}")]
    NotRunning {
        /// Container id.
        id: String,
        /// Why.
        reason: String,
    },

    /// Setting up the pseudo-terminal of a process failed.
    #[error("terminal setup failed: {op}")]
    Terminal {
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },

    /// The run was cancelled; the container was killed and deleted.
    #[error("execution of container {id} was cancelled")]
    Cancelled {
        /// Container id.
        id: String,
    },
}

/// Coarse classification of an [`Error`], for mapping to a gRPC status in one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request itself is wrong (bad spec, unknown user, missing mount source).
    InvalidArgument,
    /// The request needs a privilege that was not granted.
    PermissionDenied,
    /// The run was cancelled.
    Cancelled,
    /// The target is not in the state the call needs (a container that is not running).
    FailedPrecondition,
    /// Anything else: a fault of the host, runc or the daemon.
    Internal,
}

impl Error {
    /// Classification of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidSpec { .. } | Self::User { .. } | Self::MountSource { .. } => {
                ErrorKind::InvalidArgument
            }
            Self::RuncRun { .. } => ErrorKind::InvalidArgument,
            Self::NotRunning { .. } => ErrorKind::FailedPrecondition,
            Self::InsecureNotAllowed => ErrorKind::PermissionDenied,
            Self::Cancelled { .. } => ErrorKind::Cancelled,
            _ => ErrorKind::Internal,
        }
    }
}

pub(crate) fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidSpec {
        reason: reason.into(),
    }
}
