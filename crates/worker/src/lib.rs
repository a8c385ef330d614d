//! berth's worker: solves LLB definitions into filesystem results.
//!
//! * [`Worker`] — entry point: [`Worker::solve`] takes a `pb.Definition` and a [`SolveContext`]
//!   and returns a [`SolvedRef`].
//! * [`SessionProvider`] — what the worker needs from the client session (implemented by the
//!   daemon).
//! * [`ProgressEvent`] / [`ProgressSink`] — progress in plain Rust types.
//! * [`Error`] / [`ErrorKind`] — one error type; `kind()` drives the daemon's gRPC mapping.
//!
//! Internals: `solver` (generic DAG scheduler and cache, no LLB), `llbsolver` (definition
//! loading, validation, vertex names, cache mapping), `ops` (one module per op kind). Results are
//! committed snapshots of layerstore's [`SnapshotStore`].
#![deny(unsafe_code)]

mod digest;
mod error;
mod file;
mod llbsolver;
mod ops;
mod progress;
mod result;
mod session;
mod solver;
mod worker;

pub use error::{BoxError, Error, ErrorKind, Result};
pub use layerstore::snapshot::{Chain, LayerRef, SnapshotId, SnapshotStore};
pub use progress::{LogStream, ProgressEvent, ProgressGroup, ProgressSink};
pub use result::{ReadOnlyMount, SolvedRef};
pub use session::{
    Credentials, LocalDiffer, LocalSync, NoSession, SessionProvider, TransferProgress,
};
pub use worker::{
    Platform, SolveContext, Worker, WorkerOptions, ENTITLEMENT_NETWORK_HOST,
    ENTITLEMENT_SECURITY_INSECURE,
};
