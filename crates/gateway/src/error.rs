//! The crate's error type and the outcome of a failed process.

/// What a container call can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `NewContainer` with an id this build already uses.
    #[error("Container {id} already exists")]
    AlreadyExists {
        /// The container id.
        id: String,
    },
    /// A process for a container that was released or never created.
    #[error("container {id:?} previously released or not created")]
    NoContainer {
        /// The container id.
        id: String,
    },
    /// `ReleaseContainer` of an unknown container.
    #[error("container details for {id} not found")]
    ReleaseUnknown {
        /// The container id.
        id: String,
    },
    /// The request is malformed.
    #[error("{reason}")]
    Invalid {
        /// What is wrong.
        reason: String,
    },
    /// The build did not ask for (or the daemon does not allow) an entitlement the request
    /// needs.
    #[error("{entitlement} is not allowed")]
    Entitlement {
        /// `network.host` or `security.insecure`.
        entitlement: &'static str,
    },
    /// The frontend image lacks a capability the request needs (its
    /// `moby.buildkit.frontend.caps` label does not list it).
    #[error("unsupported frontend capability {cap}")]
    UnsupportedFrontendCap {
        /// The missing capability.
        cap: String,
    },
    /// Writing the frontend's metadata directory failed.
    #[error("frontend metadata {path}")]
    Io {
        /// The file or directory.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Preparing the mounts failed.
    #[error(transparent)]
    Worker(#[from] worker::Error),
    /// The executor failed before a process could start.
    #[error(transparent)]
    Executor(#[from] executor::Error),
    /// A process of the container failed (what `ReleaseContainer` reports, as buildkitd).
    #[error(transparent)]
    Process(#[from] ProcessError),
}

/// Coarse classification for the daemon's gRPC mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// `AlreadyExists`.
    AlreadyExists,
    /// `NotFound`.
    NotFound,
    /// `InvalidArgument`.
    InvalidArgument,
    /// `PermissionDenied`.
    PermissionDenied,
    /// `Canceled`.
    Canceled,
    /// `Unimplemented` (a frontend capability the image lacks, as buildkitd).
    Unimplemented,
    /// Anything else (`Unknown` for process failures, as buildkitd).
    Unknown,
    /// A fault inside the daemon.
    Internal,
}

impl Error {
    /// Classification of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            Error::NoContainer { .. } => ErrorKind::NotFound,
            Error::ReleaseUnknown { .. } => ErrorKind::Unknown,
            Error::Invalid { .. } => ErrorKind::InvalidArgument,
            Error::UnsupportedFrontendCap { .. } => ErrorKind::Unimplemented,
            Error::Io { .. } => ErrorKind::Internal,
            Error::Entitlement { .. } => ErrorKind::PermissionDenied,
            Error::Worker(e) => match e.kind() {
                worker::ErrorKind::InvalidArgument => ErrorKind::InvalidArgument,
                worker::ErrorKind::NotFound => ErrorKind::NotFound,
                worker::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
                worker::ErrorKind::Canceled => ErrorKind::Canceled,
                _ => ErrorKind::Internal,
            },
            Error::Executor(e) => match e.kind() {
                executor::ErrorKind::InvalidArgument => ErrorKind::InvalidArgument,
                executor::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
                executor::ErrorKind::Cancelled => ErrorKind::Canceled,
                _ => ErrorKind::Internal,
            },
            Error::Process(p) if p.canceled() => ErrorKind::Canceled,
            Error::Process(_) => ErrorKind::Unknown,
        }
    }
}

/// Why a process did not end with exit code 0, worded as buildkitd's `ExitError`:
/// `exit code: N`, with `: context canceled` appended when the container was released (or the
/// build ended) while it ran.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    /// The process exited with a non-zero code (128 + N when signal N killed it).
    #[error("exit code: {code}{}", if *canceled { ": context canceled" } else { "" })]
    Exit {
        /// The exit code.
        code: u32,
        /// The container was released while the process ran (it was killed).
        canceled: bool,
    },
    /// The process could not be run; its exit status is unknown (255, as buildkitd).
    #[error("{message}")]
    Failed {
        /// What went wrong.
        message: String,
    },
}

impl ProcessError {
    /// buildkitd's `UnknownExitStatus`.
    pub const UNKNOWN_EXIT_STATUS: u32 = 255;

    /// The exit code to report (`ExitMessage.Code`).
    pub fn code(&self) -> u32 {
        match self {
            ProcessError::Exit { code, .. } => *code,
            ProcessError::Failed { .. } => Self::UNKNOWN_EXIT_STATUS,
        }
    }

    /// Whether the process was killed because its container was released.
    pub fn canceled(&self) -> bool {
        matches!(self, ProcessError::Exit { canceled: true, .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wording_matches_buildkitd() {
        let cases = [
            (
                ProcessError::Exit {
                    code: 99,
                    canceled: false,
                },
                "exit code: 99",
                99,
            ),
            (
                ProcessError::Exit {
                    code: 137,
                    canceled: true,
                },
                "exit code: 137: context canceled",
                137,
            ),
            (
                ProcessError::Failed {
                    message: "boom".into(),
                },
                "boom",
                255,
            ),
        ];
        for (e, text, code) in cases {
            assert_eq!(e.to_string(), text);
            assert_eq!(e.code(), code);
        }
        assert_eq!(
            Error::from(ProcessError::Exit {
                code: 137,
                canceled: true
            })
            .kind(),
            ErrorKind::Canceled
        );
        assert_eq!(
            Error::AlreadyExists { id: "x".into() }.to_string(),
            "Container x already exists"
        );
    }
}
