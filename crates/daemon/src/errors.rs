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
    /// An error carrying typed details for the client (`google.rpc.Status.details`: BuildKit's
    /// `errdefs.Vertex`, `errdefs.Source`, `errdefs.Solve`, exit codes...).
    #[error("{error}")]
    Detailed {
        /// The error.
        error: Box<Error>,
        /// The details, in the order BuildKit sends them (outermost wrapper first).
        details: Vec<prost_types::Any>,
    },
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

    /// A registry client error, with its class kept.
    pub fn registry(e: registry::Error) -> Self {
        let what = e.to_string();
        match e.kind() {
            registry::ErrorKind::NotFound => Error::NotFound { what },
            registry::ErrorKind::InvalidArgument => Error::InvalidArgument { what },
            registry::ErrorKind::Unauthenticated => Error::PermissionDenied { what },
            _ => Error::Unavailable { what },
        }
    }

    /// Prefixes the message with context, keeping the classification and details.
    pub fn context(self, ctx: impl std::fmt::Display) -> Self {
        let code = self.code();
        let message = format!("{ctx}: {}", self.full_message());
        let details = self.details();
        match self {
            Error::Canceled => Error::Canceled,
            _ => Error::Remote { code, message }.with_details(details),
        }
    }

    /// Adds typed details (appended after the ones already there).
    pub fn with_details(self, details: Vec<prost_types::Any>) -> Self {
        if details.is_empty() {
            return self;
        }
        match self {
            Error::Detailed {
                error,
                details: mut d,
            } => {
                d.extend(details);
                Error::Detailed { error, details: d }
            }
            e => Error::Detailed {
                error: Box::new(e),
                details,
            },
        }
    }

    /// The typed details of this error.
    pub fn details(&self) -> Vec<prost_types::Any> {
        match self {
            Error::Detailed { error, details } => {
                let mut d = details.clone();
                d.extend(error.details());
                d
            }
            _ => Vec::new(),
        }
    }

    /// The worker's error inside this one (through details wrappers), if it is one.
    pub fn worker_error(&self) -> Option<&worker::Error> {
        match self {
            Error::Worker(e) => Some(e),
            Error::Detailed { error, .. } => error.worker_error(),
            _ => None,
        }
    }

    /// The error a peer reported as a `google.rpc.Status` (e.g. in `LLBBridge.Return`), with
    /// its details.
    pub fn from_rpc_status(st: &protos::google::rpc::Status) -> Self {
        let code = Code::from_i32(st.code);
        // Go clients format non-Unknown errors as "<Code>: <message>" before returning them;
        // strip that once so the client does not print the code twice.
        let prefix = format!("{code:?}: ");
        let message = st
            .message
            .strip_prefix(&prefix)
            .map(str::to_string)
            .unwrap_or_else(|| st.message.clone());
        Error::Remote { code, message }.with_details(st.details.clone())
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
            Error::Detailed { error, .. } => error.code(),
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

    /// Builds an error from a status received from a peer, keeping its typed details.
    pub fn from_status(context: &str, st: &tonic::Status) -> Self {
        use prost::Message as _;
        let details = protos::google::rpc::Status::decode(st.details())
            .map(|s| s.details)
            .unwrap_or_default();
        Error::Remote {
            code: st.code(),
            message: if context.is_empty() {
                st.message().to_string()
            } else {
                format!("{context}: {}", st.message())
            },
        }
        .with_details(details)
    }
}

impl Error {
    /// The full message: this error's text followed by each cause not already contained in it.
    pub fn full_message(&self) -> String {
        if let Error::Detailed { error, .. } = self {
            return error.full_message();
        }
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

    /// The error as a `google.rpc.Status` with its details (what buildkitd stores in build
    /// history records and sends in `grpc-status-details-bin`).
    pub fn rpc_status(&self) -> protos::google::rpc::Status {
        protos::google::rpc::Status {
            code: self.code() as i32,
            message: self.full_message(),
            details: self.details(),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use prost::Message as _;
        let st = e.rpc_status();
        if st.details.is_empty() {
            return tonic::Status::new(e.code(), st.message);
        }
        let details = st.encode_to_vec();
        tonic::Status::with_details(e.code(), st.message, details.into())
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
