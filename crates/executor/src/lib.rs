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
//! let io = ProcessIo { stdout: Some(tx.clone()), stderr: Some(tx), ..Default::default() };
//! let res = exec.run(spec, io, CancellationToken::new()).await?;
//! assert!(res.exit.success());
//! # Ok(()) }
//! ```
//!
//! # Translating an `ExecOp` (the worker's side)
//!
//! * Root mount (`dest` `/`): mount its writable layer (overlay) on a host directory and pass
//!   it as [`ProcessSpec::rootfs`]; a read-only root sets [`ProcessSpec::readonly_rootfs`].
//!   Keep it mounted until `run` returns, then diff it.
//! * `BIND` / `CACHE` mounts: mount the snapshot or cache directory on the host, resolve the
//!   `selector` inside it safely (pathrs), and pass [`MountKind::Bind`]. `TMPFS`:
//!   [`MountKind::Tmpfs`]. `SECRET`: fetch the bytes from the session (skip when optional and
//!   missing), [`MountKind::SecretFile`]. `SSH`: create the forwarding socket,
//!   [`MountKind::SshSocket`]. `dest` may stay relative: it is taken relative to `cwd` here.
//! * `Meta`: `args`, `env` (proxy and secret env already appended; `PATH` is defaulted here),
//!   `cwd`, `user`, `hostname`, `extraHosts`, `ulimit`, `cgroupParent`,
//!   `removeMountStubsRecursive` map field for field. `NetMode`/`SecurityMode` map to
//!   [`NetMode`]/[`SecurityMode`] once entitlements are checked.
//! * A non-zero [`ExitStatus`] is not an error here; report it as
//!   `process "<args joined by spaces>" did not complete successfully: exit code: N`.
//!   [`Error::kind`] classifies failures for the gRPC status.
//! * Mount stubs are already removed when `run` returns ([`ExecResult::mount_stubs`] lists
//!   them). Call [`RuncExecutor::cleanup_stale`] once at start-up.
//!
//! Modules: `types` (inputs and outputs), `runcexecutor` (the run itself, bundle layout),
//! `oci` (runtime spec, user lookup, hosts file), `stubs` (safe paths inside the rootfs),
//! `runc` (typed runc client), `secrets` (secret tmpfs), `stdio` (pipes, pseudo-terminal,
//! resize and signal forwarding). No `unsafe` anywhere.

#![forbid(unsafe_code)]

mod error;
mod oci;
mod runc;
mod runcexecutor;
mod secrets;
mod stdio;
mod stubs;
mod types;

pub use bytes::Bytes;
pub use error::{Error, ErrorKind};
pub use runcexecutor::{RuncExecutor, RuncOptions};
pub use tokio_util::sync::CancellationToken;
pub use types::{
    ExecResult, ExecSpec, ExitStatus, HostIp, Mount, MountKind, NetMode, ProcessIo, ProcessSpec,
    SecurityMode, Ulimit, WinSize, DEFAULT_HOSTNAME, DEFAULT_PATH,
};
