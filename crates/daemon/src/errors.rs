//! The daemon's error type and the one place where errors become gRPC statuses.
//!
//! Every handler returns [`Error`]; `impl From<Error> for tonic::Status` picks the code BuildKit
//! would use (InvalidArgument for malformed requests, NotFound for missing things, Unavailable for
//! a lost session, Canceled...). Errors of library crates are wrapped with their own variant and
//! classified here, nowhere else.

use tonic::Code;

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed.
    #[error("{what}")]
    InvalidArgument {
        /// What is wrong, naming the field/op.
        what: String,
    },
    /// Something the request names does not exist.
    #[error("{what}")]
    NotFound {
        /// What is missing.
        what: String,
    },
    /// The client's session (or another service) went away or is not there.
    #[error("{what}")]
    Unavailable {
        /// What is unreachable.
        what: String,
    },
    /// The request was canceled.
    #[error("context canceled")]
    Canceled,
    /// A feature berth does not have (yet).
    #[error("{what}")]
    Unimplemented {
        /// The missing feature.
        what: String,
    },
    /// Not allowed by the daemon's policy.
    #[error("{what}")]
    PermissionDenied {
        /// What was refused.
        what: String,
    },
    /// A build step ran and failed.
    #[error("{what}")]
    Failed {
        /// What failed.
        what: String,
    },
    /// An error reported by the client (LLBBridge.Return, a session callback), with its code.
    #[error("{message}")]
    Remote {
        /// The gRPC code the client used.
        code: Code,
        /// Its message.
        message: String,
    },
    /// An unexpected failure inside berthd.
    #[error("{what}")]
    Internal {
        /// What went wrong.
        what: String,
    },
    /// A file transfer failed.
    #[error("{context}: {source}")]
    Fsutil {
        /// What was being transferred.
        context: String,
        /// The cause.
        #[source]
        source: fsutil::Error,
    },
    /// The worker (LLB solver) failed.
    #[error(transparent)]
    Worker(#[from] worker::Error),
    /// The layer store failed.
    #[error("{context}: {source}")]
    Layerstore {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: layerstore::Error,
    },
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(what: impl Into<String>) -> Self {
        Error::InvalidArgument { what: what.into() }
    }
    /// Shorthand for [`Error::NotFound`].
    pub fn not_found(what: impl Into<String>) -> Self {
        Error::NotFound { what: what.into() }
    }
    /// Shorthand for [`Error::Unavailable`].
    pub fn unavailable(what: impl Into<String>) -> Self {
        Error::Unavailable { what: what.into() }
    }
    /// Shorthand for [`Error::Unimplemented`].
    pub fn unimplemented(what: impl Into<String>) -> Self {
        Error::Unimplemented { what: what.into() }
    }
    /// Shorthand for [`Error::Internal`].
    pub fn internal(what: impl Into<String>) -> Self {
        Error::Internal { what: what.into() }
    }
    /// Shorthand for [`Error::Failed`].
    pub fn failed(what: impl Into<String>) -> Self {
        Error::Failed { what: what.into() }
    }
    /// Wraps a transfer error.
    pub fn fsutil(context: impl Into<String>, source: fsutil::Error) -> Self {
        Error::Fsutil {
            context: context.into(),
            source,
        }
    }
    /// Wraps a layer store error.
    pub fn layerstore(context: impl Into<String>, source: layerstore::Error) -> Self {
        Error::Layerstore {
            context: context.into(),
            source,
        }
    }

    /// Prefixes the message with context, keeping the classification.
    pub fn context(self, ctx: impl std::fmt::Display) -> Self {
        let code = self.code();
        let message = format!("{ctx}: {self}");
        match self {
            Error::Canceled => Error::Canceled,
            _ => Error::Remote { code, message },
        }
    }

    /// The gRPC code for this error.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::NotFound { .. } => Code::NotFound,
            Error::Unavailable { .. } => Code::Unavailable,
            Error::Canceled => Code::Cancelled,
            Error::Unimplemented { .. } => Code::Unimplemented,
            Error::PermissionDenied { .. } => Code::PermissionDenied,
            Error::Failed { .. } => Code::Unknown,
            Error::Remote { code, .. } => *code,
            Error::Internal { .. } => Code::Internal,
            Error::Fsutil { source, .. } => match source {
                fsutil::Error::Transport { .. } => Code::Unavailable,
                fsutil::Error::Protocol { .. } | fsutil::Error::InvalidPattern { .. } => {
                    Code::InvalidArgument
                }
                fsutil::Error::NotADirectory { .. } => Code::InvalidArgument,
                fsutil::Error::Remote { .. } => Code::Unknown,
                _ => Code::Internal,
            },
            Error::Layerstore { .. } => Code::Internal,
            Error::Worker(e) => match e.kind() {
                worker::ErrorKind::InvalidArgument => Code::InvalidArgument,
                worker::ErrorKind::NotFound => Code::NotFound,
                worker::ErrorKind::Unavailable => Code::Unavailable,
                worker::ErrorKind::Canceled => Code::Cancelled,
                worker::ErrorKind::PermissionDenied => Code::PermissionDenied,
                worker::ErrorKind::Unimplemented => Code::Unimplemented,
                worker::ErrorKind::FailedPrecondition => Code::Unknown,
                _ => Code::Internal,
            },
        }
    }

    /// Builds an error from a status received from a peer.
    pub fn from_status(context: &str, st: &tonic::Status) -> Self {
        Error::Remote {
            code: st.code(),
            message: if context.is_empty() {
                st.message().to_string()
            } else {
                format!("{context}: {}", st.message())
            },
        }
    }
}

impl Error {
    /// The full message: this error's text followed by each cause not already contained in it.
    pub fn full_message(&self) -> String {
        let mut message = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(s) = src {
            let part = s.to_string();
            if !message.contains(&part) {
                message.push_str(": ");
                message.push_str(&part);
            }
            src = s.source();
        }
        message
    }

    /// The error as the `google.rpc.Status` buildkitd stores in build history records.
    pub fn rpc_status(&self) -> protos::google::rpc::Status {
        protos::google::rpc::Status {
            code: self.code() as i32,
            message: self.full_message(),
            details: Vec::new(),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::new(e.code(), e.full_message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let cases: Vec<(Error, Code)> = vec![
            (Error::invalid("bad op"), Code::InvalidArgument),
            (Error::not_found("no image"), Code::NotFound),
            (Error::unavailable("session lost"), Code::Unavailable),
            (Error::Canceled, Code::Cancelled),
            (Error::unimplemented("x"), Code::Unimplemented),
            (
                Error::fsutil(
                    "sync",
                    fsutil::Error::Transport {
                        message: "eof".into(),
                    },
                ),
                Code::Unavailable,
            ),
            (Error::invalid("a").context("solve"), Code::InvalidArgument),
        ];
        for (e, code) in cases {
            let st: tonic::Status = e.into();
            assert_eq!(st.code(), code, "{st:?}");
        }
        let st: tonic::Status = Error::fsutil(
            "sync context",
            fsutil::Error::Transport {
                message: "eof".into(),
            },
        )
        .into();
        assert_eq!(st.message(), "sync context: transport: eof");
    }
}
