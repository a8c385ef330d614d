//! berth's worker: solves LLB definitions into filesystem results.
//!
//! * [`Worker`] — entry point: [`Worker::solve`] takes a `pb.Definition` and a [`SolveContext`]
//!   and returns a [`SolvedRef`].
//! * [`ContainerMounts`] — a gateway container's mounts, prepared as an exec's
//!   ([`Worker::prepare_container`]); [`Worker::executor`] runs its processes.
//! * [`SessionProvider`] — what the worker needs from the client session (implemented by the
//!   daemon).
//! * [`ProgressEvent`] / [`ProgressSink`] — progress in plain Rust types.
//! * [`Error`] / [`ErrorKind`] — one error type; `kind()` drives the daemon's gRPC mapping.
//!
//! Internals: `solver` (generic DAG scheduler and cache, no LLB), `llbsolver` (definition
//! loading, validation, vertex names, caps, cache-key → snapshot mapping in the snapshot
//! store's DB), `ops` (one module per op kind: the op registry), `file` (file actions on a
//! mounted state, all path resolution confined to the state's root). Results are committed
//! snapshots of layerstore's [`SnapshotStore`], protected by leases while referenced.
//!
//! On-disk: `<root>/snapshots/` belongs to layerstore; the worker owns `<root>/worker/local/`
//! (one persistent receive directory per local source name and shared key hint, written only
//! under that source's lock).
#![deny(unsafe_code)]

mod bkkeys;
mod container;
mod digest;
mod error;
mod file;
mod llbsolver;
mod ops;
mod progress;
mod remote;
mod result;
mod session;
mod solver;
mod worker;

pub use bkkeys::stock_record_id;
pub use container::ContainerMounts;
pub use error::{BoxError, Error, ErrorKind, FailedSubject, Result, StepFailure};
pub use layerstore::snapshot::{Chain, LayerRef, SnapshotId, SnapshotStore};
pub use ops::image_pull::SessionAuth as RegistryAuth;
pub use ops::source_oci_layout::{
    resolve as resolve_oci_layout, OciLayoutRef, ResolvedOciImage, MAX_MANIFEST,
};
pub use progress::{LogStream, ProgressEvent, ProgressGroup, ProgressSink};
pub use remote::{
    CacheSource, CacheSourceRef, RemoteLayer, SolveTrace, StockLink, StockVertex, TracedOutput,
    TracedVertex,
};
pub use result::{ReadOnlyMount, ResultSource, SolvedRef};
pub use session::{
    registry_host, Credentials, LocalDiffer, LocalSync, NoSession, SessionProvider, SshAgentConn,
    SshAgentStream, SyncStats, TransferProgress, UploadStream,
};
pub use worker::{
    Platform, SolveContext, Worker, WorkerOptions, ENTITLEMENT_NETWORK_HOST,
    ENTITLEMENT_SECURITY_INSECURE,
};
