//! The plain input and output types of one execution.
//!
//! This is the Rust counterpart of BuildKit's `executor/executor.go` (`Meta`, `Mount`,
//! `ProcessInfo`), reduced to what a runc execution needs. Nothing here knows about
//! snapshots, LLB or protobuf: the worker resolves an `ExecOp` into a mounted root
//! directory plus a list of [`Mount`]s and hands them over.

use std::net::IpAddr;
use std::path::PathBuf;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

/// `PATH` added to the environment when the caller sets none (BuildKit cap
/// `exec.meta.setsdefaultpath`).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Hostname used when [`ProcessSpec::hostname`] is empty.
pub const DEFAULT_HOSTNAME: &str = "buildkitsandbox";

/// Everything needed to run one build process.
///
/// Build it with struct syntax and `..Default::default()`; only `rootfs` and `args` are required.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessSpec {
    /// Absolute path of the already-mounted root filesystem (the caller owns the mount and keeps
    /// it mounted until `run` returns). Mount stubs, `/etc/hosts` and `/etc/resolv.conf`
    /// mount points and a missing working directory are created inside it.
    pub rootfs: PathBuf,
    /// Mount the root filesystem read-only inside the container.
    pub readonly_rootfs: bool,
    /// argv of the process; must not be empty.
    pub args: Vec<String>,
    /// `KEY=VALUE` entries. [`DEFAULT_PATH`] is appended when no `PATH=` entry is present.
    pub env: Vec<String>,
    /// Working directory inside the container; empty means `/`. Created (owned by the process
    /// user, mode 0755) when missing, and not removed afterwards, as BuildKit does.
    pub cwd: String,
    /// `""` (root), `"uid"`, `"uid:gid"`, `"name"`, `"name:group"` (names and numbers may be
    /// mixed). Names are looked up in the rootfs' `/etc/passwd` and `/etc/group`, opened with
    /// in-root resolution so a symlink cannot point the lookup outside the rootfs.
    pub user: String,
    /// Hostname; empty means [`DEFAULT_HOSTNAME`].
    pub hostname: String,
    /// Extra `/etc/hosts` entries, appended after the localhost lines.
    pub extra_hosts: Vec<HostIp>,
    /// Network namespace mode.
    pub network: NetMode,
    /// Security mode; [`SecurityMode::Insecure`] needs [`RuncOptions::allow_insecure`].
    ///
    /// [`RuncOptions::allow_insecure`]: crate::RuncOptions::allow_insecure
    pub security: SecurityMode,
    /// Mounts besides the root. Applied sorted by destination (parents first) whatever their
    /// order here; a later mount with the same destination replaces an earlier one.
    pub mounts: Vec<Mount>,
    /// Resource limits (`nofile`, `nproc`, ...). Empty: the limits of the daemon are inherited.
    pub ulimits: Vec<Ulimit>,
    /// cgroup parent; empty means the executor default ([`RuncOptions::default_cgroup_parent`]).
    /// A systemd slice ending in `:` (`machine.slice:`) gets the container id appended; anything
    /// else becomes `/<parent>/buildkit/<id>`.
    ///
    /// [`RuncOptions::default_cgroup_parent`]: crate::RuncOptions::default_cgroup_parent
    pub cgroup_parent: String,
    /// When removing mount stubs after the run, also remove parent directories that were
    /// created for them (BuildKit `removeMountStubsRecursive`). Without it only the mount
    /// point itself is removed.
    pub remove_mount_stubs_recursive: bool,
}

/// One extra `/etc/hosts` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostIp {
    /// Host name.
    pub host: String,
    /// Address it resolves to.
    pub ip: IpAddr,
}

/// Network namespace of the process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NetMode {
    /// BuildKit's default (`NetMode UNSET`). berth has no CNI network provider, so, like
    /// buildkitd's `auto` mode without CNI configuration, this shares the host's network
    /// namespace (with a private UTS namespace, so the hostname is still the sandbox's).
    #[default]
    Sandbox,
    /// Share the host network namespace (`NetMode HOST`, entitlement `network.host`).
    Host,
    /// A new, empty network namespace with only `lo` up (`NetMode NONE`).
    None,
}

/// Privilege level of the process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SecurityMode {
    /// Docker's default capability set, masked and read-only `/proc` paths, read-only `/sys`,
    /// device access limited to runc's default devices. No seccomp profile is applied yet.
    #[default]
    Sandbox,
    /// Privileged (entitlement `security.insecure`): every capability the daemon holds, all
    /// devices allowed, `/dev/fuse`, `/dev/kvm`, `/dev/net/tun`, loop devices created,
    /// writable `/sys` and cgroupfs, no masked paths.
    Insecure,
}

/// A mount besides the root filesystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// Destination inside the container. A relative path is taken relative to
    /// [`ProcessSpec::cwd`]. It is resolved inside the rootfs: symlinks in the rootfs are
    /// followed as if the rootfs were `/`, never out of it. `/` itself is rejected.
    pub dest: PathBuf,
    /// What to mount.
    pub kind: MountKind,
}

/// The kinds of mount the executor knows.
#[derive(Clone, PartialEq, Eq)]
pub enum MountKind {
    /// Recursive bind mount of a host path (directory or single file). The caller prepares
    /// the source (a snapshot mount, a cache directory, a sub-path of either).
    Bind {
        /// Absolute host path.
        source: PathBuf,
        /// Mount read-only.
        readonly: bool,
    },
    /// A fresh tmpfs (`nosuid`).
    Tmpfs {
        /// Size limit in bytes; 0 means the kernel default (half of RAM).
        size: u64,
    },
    /// A file holding `data`, bind-mounted read-only. The data is written to a private tmpfs
    /// inside the bundle directory (never to disk) and that tmpfs is unmounted after the run.
    SecretFile {
        /// File content.
        data: Vec<u8>,
        /// Owner inside the container.
        uid: u32,
        /// Group inside the container.
        gid: u32,
        /// Permission bits (`& 0o777` is applied).
        mode: u32,
    },
    /// A listening unix socket on the host (the SSH agent forwarder), bind-mounted at the
    /// destination. The executor sets the socket file's owner and mode to `uid`/`gid`/`mode`,
    /// so the socket must be dedicated to this mount.
    SshSocket {
        /// Absolute host path of the socket.
        source: PathBuf,
        /// Owner inside the container.
        uid: u32,
        /// Group inside the container.
        gid: u32,
        /// Permission bits (`& 0o777` is applied).
        mode: u32,
    },
}

impl std::fmt::Debug for MountKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bind { source, readonly } => f
                .debug_struct("Bind")
                .field("source", source)
                .field("readonly", readonly)
                .finish(),
            Self::Tmpfs { size } => f.debug_struct("Tmpfs").field("size", size).finish(),
            // Never print secret content.
            Self::SecretFile {
                data,
                uid,
                gid,
                mode,
            } => f
                .debug_struct("SecretFile")
                .field("len", &data.len())
                .field("uid", uid)
                .field("gid", gid)
                .field("mode", &format_args!("{mode:o}"))
                .finish(),
            Self::SshSocket {
                source,
                uid,
                gid,
                mode,
            } => f
                .debug_struct("SshSocket")
                .field("source", source)
                .field("uid", uid)
                .field("gid", gid)
                .field("mode", &format_args!("{mode:o}"))
                .finish(),
        }
    }
}

/// One resource limit (`RLIMIT_<NAME>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ulimit {
    /// Limit name as in Dockerfile/LLB, case-insensitive, without `RLIMIT_`: `nofile`, `nproc`, ...
    pub name: String,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// Where the process' input comes from and its output goes, and how it is steered while it
/// runs.
///
/// Output is read in chunks of at most 32 KiB and sent as it arrives; a full channel makes the
/// executor wait (and so the process block on its write), which bounds memory. A dropped
/// receiver is not an error: further output is read and discarded. `None` discards output.
///
/// Build it with struct syntax and `..Default::default()`: a plain build step sets only
/// `stdout`/`stderr`; a gateway container process (BuildKit's `ProcessInfo` with its
/// `Stdin`, `Tty`, `Resize` and `Signal`) may set every field.
#[derive(Debug, Default)]
pub struct ProcessIo {
    /// Standard input, chunk by chunk; the sender closing the channel is end of file. `None`
    /// gives the process `/dev/null`.
    pub stdin: Option<mpsc::Receiver<Bytes>>,
    /// Receives standard output (with `tty`, everything the terminal prints).
    pub stdout: Option<mpsc::Sender<Bytes>>,
    /// Receives standard error (runc's own start-up errors arrive here too; nothing with
    /// `tty`, where the process' standard error is the terminal).
    pub stderr: Option<mpsc::Sender<Bytes>>,
    /// Run the process on a terminal (OCI `process.terminal`): the executor opens a
    /// pseudo-terminal pair, gives runc the slave as its standard streams (runc, in the
    /// foreground, makes the container's own terminal and copies between the two) and
    /// connects `stdin`/`stdout` to the master. Default 80x24 until the first resize.
    pub tty: bool,
    /// Terminal size changes (only with `tty`): the master is resized and runc is sent
    /// `SIGWINCH`, which makes it resize the container's terminal to match.
    pub resize: Option<mpsc::Receiver<WinSize>>,
    /// Signals (numbers, e.g. `libc::SIGINT`) for the process: they are sent to the runc
    /// process, which forwards them to the process in the container, as buildkitd does.
    pub signal: Option<mpsc::Receiver<i32>>,
    /// Told once runc has been started (BuildKit's `started` channel).
    pub started: Option<oneshot::Sender<()>>,
}

/// A terminal size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WinSize {
    /// Rows.
    pub rows: u32,
    /// Columns.
    pub cols: u32,
}

/// A further process in a running container ([`RuncExecutor::exec`]): what differs from the
/// container's first process. Empty fields keep that process' values, as BuildKit's `Exec`
/// does (its environment, working directory and user).
///
/// [`RuncExecutor::exec`]: crate::RuncExecutor::exec
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecSpec {
    /// argv of the process; must not be empty.
    pub args: Vec<String>,
    /// `KEY=VALUE` entries; empty keeps the first process' environment.
    pub env: Vec<String>,
    /// Working directory; empty keeps the first process'.
    pub cwd: String,
    /// User as in [`ProcessSpec::user`]; empty keeps the first process' user.
    pub user: String,
}

/// How the process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitStatus {
    code: i32,
}

impl ExitStatus {
    /// An exit status with runc's exit code `code` (for callers' tests and fakes).
    pub fn from_code(code: i32) -> Self {
        Self { code }
    }

    /// Exit code as runc reports it: the process' own code, or 128 + N when signal N killed it.
    pub fn code(&self) -> i32 {
        self.code
    }

    /// Exit code 0.
    pub fn success(&self) -> bool {
        self.code == 0
    }

    /// The signal that killed the process, when the code says so (code > 128).
    pub fn signal(&self) -> Option<i32> {
        (self.code > 128 && self.code < 128 + 65).then_some(self.code - 128)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code: {}", self.code)
    }
}

/// Result of a completed run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecResult {
    /// How the process ended. A non-zero code is not an error of `run`; the caller formats
    /// `process "<args>" did not complete successfully: exit code: N`.
    pub exit: ExitStatus,
    /// Mount stubs (empty files and directories created in the rootfs only to serve as mount
    /// points), as paths inside the rootfs. They have already been removed when `run` returns
    /// (as long as they were still empty), with the parent directory's timestamps restored; the
    /// list is informational.
    pub mount_stubs: Vec<PathBuf>,
}
