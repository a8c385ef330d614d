//! Runs one build process in an OCI container with runc, from plain mount specs.
//!
//! The counterpart of BuildKit's `executor` package with its `runcexecutor` and `oci`
//! sub-packages. This crate knows nothing of snapshots, LLB or protobuf: the worker turns an
//! `ExecOp` into a mounted root directory plus [`Mount`]s and calls [`RuncExecutor::run`].
//!
//! ```no_run
//! # async fn example() -> Result<(), executor::Error> {
//! use executor::{CancellationToken, ProcessIo, ProcessSpec, RuncExecutor, RuncOptions};
//! let exec = RuncExecutor::new(RuncOptions::new("runc", "/var/lib/berth/executor"))?;
//! exec.cleanup_stale().await?; // once, at daemon start-up
//! let (tx, _rx) = tokio::sync::mpsc::channel(16);
//! let spec = ProcessSpec {
//!     rootfs: "/var/lib/berth/mnt/abc".into(),
//!     args: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
//!     ..Default::default()
//! };
//! let io = ProcessIo { stdout: Some(tx.clone()), stderr: Some(tx) };
//! let res = exec.run(spec, io, CancellationToken::new()).await?;
//! assert!(res.exit.success());
//! # Ok(()) }
//! ```
//!
//! Modules: `types` (inputs and outputs), `runcexecutor` (the run itself, bundle layout),
//! `oci` (runtime spec, user lookup, hosts file), `stubs` (safe paths inside the rootfs),
//! `runc` (typed runc client), `secrets` (secret tmpfs). No `unsafe` anywhere.

#![forbid(unsafe_code)]

mod error;
mod oci;
mod runc;
mod runcexecutor;
mod secrets;
mod stubs;
mod types;

pub use bytes::Bytes;
pub use error::{Error, ErrorKind};
pub use runcexecutor::{RuncExecutor, RuncOptions};
pub use tokio_util::sync::CancellationToken;
pub use types::{
    ExecResult, ExitStatus, HostIp, Mount, MountKind, NetMode, ProcessIo, ProcessSpec,
    SecurityMode, Ulimit, DEFAULT_HOSTNAME, DEFAULT_PATH,
};
