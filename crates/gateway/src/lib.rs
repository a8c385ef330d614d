//! BuildKit's gateway capabilities that are more than a call into the solver: containers a
//! frontend (or `buildctl`'s client) starts from build results, and their processes; and the
//! `gateway.v0` frontend container ([`run_frontend`]), whose stdio carries the LLBBridge
//! connection the daemon serves.
//!
//! The counterpart of BuildKit's `frontend/gateway/container.go` (v0.11.6). The daemon serves
//! the `LLBBridge` gRPC calls (`NewContainer`, `ReleaseContainer`, `ExecProcess`) and adapts
//! them to this crate's plain types; this crate knows no gRPC.
//!
//! * [`ContainerSet`] — the containers of one build, by the client's container id; released
//!   one by one ([`ContainerSet::release`]) or all at once when the build ends
//!   ([`ContainerSet::release_all`]).
//! * [`Container`] — mounts prepared by the worker exactly as an exec's
//!   ([`worker::Worker::prepare_container`]); no process runs until the first
//!   [`Container::start`], which runs the container's first process (runc `run`); later starts
//!   are further processes in it (runc `exec`), as buildkitd does. When the first process exits
//!   the container is gone and the others are killed with it (exit code 137).
//! * [`Process`] — a started process: resize, signal, and its outcome ([`ProcessError`] with
//!   buildkitd's wording, `exit code: N`).
//!
//! Invariants: a container's mounts are released only after every process of it has ended;
//! release kills every process first (each ends within the executor's kill grace), so a
//! release never hangs on a process.

#![forbid(unsafe_code)]

mod container;
mod error;
mod frontend;

pub use container::{Container, ContainerMount, ContainerSet, NewContainer, Process, StartRequest};
pub use error::{Error, ErrorKind, ProcessError};
pub use executor::{HostIp, NetMode, SecurityMode, WinSize};
pub use frontend::{
    run_frontend, FrontendImage, FrontendOutcome, FrontendRun, FrontendSpec, StdioConn, LABEL_CAPS,
    LABEL_NETWORK_NONE, METADATA_DIR, STDERR_TAIL,
};

/// Entitlement a container with `NetMode::Host` needs.
pub const ENTITLEMENT_NETWORK_HOST: &str = "network.host";
/// Entitlement a process with `SecurityMode::Insecure` needs.
pub const ENTITLEMENT_SECURITY_INSECURE: &str = "security.insecure";
