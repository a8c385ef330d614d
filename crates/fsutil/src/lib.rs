//! The fsutil file-transfer protocol used by BuildKit sessions, in plain Rust.
//!
//! BuildKit moves directory trees between client and daemon with the `DiffCopy` packet protocol of
//! `tonistiigi/fsutil`: the sender lists every entry as a `STAT` packet (then an empty `STAT`), the
//! receiver diffs that listing against its destination and requests the content of the regular
//! files it lacks with `REQ`, the sender answers with `DATA` chunks (an empty chunk ends a file),
//! and `FIN` closes the exchange. This crate owns:
//!
//! * [`filemode`]: Go `os.FileMode` bits, the mode encoding on the wire;
//! * [`patterns`]: dockerignore-style include/exclude patterns (moby/patternmatcher semantics);
//! * [`walk`]: the sender's ordered, filtered directory walk;
//! * [`send`] and [`receive`]: the two protocol roles over any packet transport.
//!
//! It speaks plain Rust types ([`Packet`], [`Stat`]); the gRPC edge converts them to and from the
//! generated `fsutil.types` messages. Paths received from a peer are hostile: the receiver resolves
//! every path inside its destination root (`openat2` with `RESOLVE_IN_ROOT`) and never follows a
//! symlink out of it.

#![forbid(unsafe_code)]

pub mod filemode;
pub mod patterns;

pub mod send;
mod stat;
pub mod walk;
mod wire;

pub mod receive;
pub use receive::{receive, ReceiveOptions, ReceiveStats};

pub use send::{send, SendOptions};
pub use stat::{stat_path, Stat};

use bytes::Bytes;
use std::path::PathBuf;

/// One protocol message (wire message `fsutil.types.Packet`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// `PACKET_STAT`: one entry of the listing, or `None` for the end of the listing.
    Stat(Option<Stat>),
    /// `PACKET_REQ`: the receiver asks for the content of entry `id`.
    Req {
        /// Entry number (position in the listing).
        id: u32,
    },
    /// `PACKET_DATA`: a chunk of entry `id`; an empty chunk ends that file.
    Data {
        /// Entry number.
        id: u32,
        /// Content bytes.
        data: Bytes,
    },
    /// `PACKET_FIN`: end of the exchange.
    Fin,
    /// `PACKET_ERR`: the peer failed with this message.
    Err(String),
}

/// Wire values of `fsutil.types.Packet.PacketType`.
pub mod packet_type {
    /// `PACKET_STAT`.
    pub const STAT: i32 = 0;
    /// `PACKET_REQ`.
    pub const REQ: i32 = 1;
    /// `PACKET_DATA`.
    pub const DATA: i32 = 2;
    /// `PACKET_FIN`.
    pub const FIN: i32 = 3;
    /// `PACKET_ERR`.
    pub const ERR: i32 = 4;
}

/// Errors of the fsutil protocol and its filesystem work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A filesystem operation failed.
    #[error("{op} {path}")]
    Io {
        /// The operation (`lstat`, `open`, `mkdir`, ...).
        op: &'static str,
        /// The path it was applied to.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The walk root is not a directory.
    #[error("walk root {path} is not a directory")]
    NotADirectory {
        /// The root.
        path: PathBuf,
    },
    /// A pattern is malformed.
    #[error("invalid pattern {pattern:?}: {reason}")]
    InvalidPattern {
        /// The pattern as given.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The peer broke the protocol (bad order, unknown id, unclean path...).
    #[error("fsutil protocol: {message}")]
    Protocol {
        /// What was wrong.
        message: String,
    },
    /// The peer reported an error with `PACKET_ERR`.
    #[error("error from {peer}: {message}")]
    Remote {
        /// `sender` or `receiver`.
        peer: &'static str,
        /// The peer's message.
        message: String,
    },
    /// The transport failed or closed early.
    #[error("transport: {message}")]
    Transport {
        /// What happened.
        message: String,
    },
}

/// `e` and its sources, `: `-joined (an [`Error::Io`]'s Display names the operation and the path,
/// its source the errno): for a peer that sees only the text.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

impl Error {
    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        Error::Protocol {
            message: message.into(),
        }
    }

    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
        source: impl Into<std::io::Error>,
    ) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source: source.into(),
        }
    }
}
