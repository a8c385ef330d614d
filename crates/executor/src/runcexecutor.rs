//! [`RuncExecutor`]: runs one [`ProcessSpec`] in a fresh runc container and waits for it.
//!
//! Port of the `Run` path of BuildKit's `executor/runcexecutor/executor.go`
//! (<https://github.com/moby/buildkit/blob/v0.11.6/executor/runcexecutor/executor.go>), without
//! rootless mode or user namespaces. [`RuncExecutor::run_with_id`] and [`RuncExecutor::exec`] add
//! BuildKit's `Exec` (further processes in a running container, for gateway containers) and
//! [`ProcessIo`] its stdin, TTY, resize and signal plumbing (module `stdio`).
//!
//! On-disk layout under `state_root` (this executor is its only writer):
//!
//! ```text
//! <state_root>/runc/                 runc --root (container state)
//! <state_root>/bundles/<id>/         one bundle per run, removed when the run ends
//!     config.json                    the OCI runtime spec
//!     hosts, resolv.conf             bind-mounted read-only at /etc/hosts, /etc/resolv.conf
//!     runc.log                       runc's JSON log (start-up errors)
//!     exec-<n>.json, .pid, .log      process spec, pid file and log of one `runc exec`
//!     secrets/                       tmpfs with secret files (only when there are secrets)
//! ```
//!
//! One run: validate the spec; create the bundle (RAII [`Bundle`]: secret tmpfs unmounted and
//! directory removed on drop); on the blocking pool open the rootfs with `pathrs`, resolve the
//! user, create mount stubs and the working directory inside the rootfs, write the generated
//! files and `config.json`; then `runc run` under `tokio::process` with stdin `/dev/null` and
//! both output pipes pumped into the caller's channels; on cancellation `runc kill <id> KILL`
//! (retried every 50 ms until runc exits, then the runc process group is killed after 7 s),
//! then `runc delete --force`; finally remove the mount stubs. If the `run` future itself is
//! dropped, `kill_on_drop` kills runc, a [`ContainerGuard`] schedules `runc delete --force`, and
//! the stub and bundle guards clean the filesystem.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use oci_spec::runtime::{Capability, LinuxDevice};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::{invalid, Error};
use crate::oci::{hosts, spec, user};
use crate::runc::{log_errors, Runc};
use crate::secrets::SecretStore;
use crate::stdio::Streams;
use crate::stubs::{clean_abs, ensure_path, pathrs_io, Leaf, MountStubs};
use crate::types::{
    ExecResult, ExecSpec, ExitStatus, MountKind, ProcessIo, ProcessSpec, SecurityMode,
    DEFAULT_HOSTNAME, DEFAULT_PATH,
};

/// How long `runc kill` is retried before the runc process group is killed.
const KILL_GRACE: Duration = Duration::from_secs(7);
/// How long output pipes may stay open after runc exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `exec` waits for a container that is still starting.
const EXEC_START_WAIT: Duration = Duration::from_secs(30);

/// Options of a [`RuncExecutor`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RuncOptions {
    /// The runc binary: an absolute path, or a bare name looked up in `PATH`.
    pub runc_path: PathBuf,
    /// The executor's private state directory (see the module docs for its layout).
    pub state_root: PathBuf,
    /// Whether [`SecurityMode::Insecure`] may be used (buildkitd's
    /// `--allow-insecure-entitlement security.insecure`). Default false.
    pub allow_insecure: bool,
    /// cgroup parent used when a [`ProcessSpec`] names none. Default empty (`/buildkit/<id>`).
    pub default_cgroup_parent: String,
    /// The host resolver configuration copied into containers. Default `/etc/resolv.conf`.
    pub host_resolv_conf: PathBuf,
}

impl RuncOptions {
    /// Options with the given runc binary and state directory and defaults elsewhere.
    pub fn new(runc_path: impl Into<PathBuf>, state_root: impl Into<PathBuf>) -> Self {
        Self {
            runc_path: runc_path.into(),
            state_root: state_root.into(),
            allow_insecure: false,
            default_cgroup_parent: String::new(),
            host_resolv_conf: PathBuf::from("/etc/resolv.conf"),
        }
    }
}

/// Runs build processes with runc. Cheap to share behind an `Arc`; runs may be concurrent.
#[derive(Debug)]
pub struct RuncExecutor {
    runc: Runc,
    bundles: PathBuf,
    opts: RuncOptions,
    id_prefix: String,
    next_id: AtomicU64,
    insecure_caps: Vec<Capability>,
    insecure_devices: Vec<LinuxDevice>,
    /// Containers whose `run` is in progress (targets of [`RuncExecutor::exec`]).
    running: std::sync::Mutex<std::collections::HashSet<String>>,
}

fn state_err(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> Error + use<> {
    let path = path.to_owned();
    move |source| Error::State { path, op, source }
}

fn find_runc(p: &Path) -> Result<PathBuf, Error> {
    let candidates: Vec<PathBuf> = if p.components().count() > 1 || p.is_absolute() {
        vec![p.to_owned()]
    } else {
        std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).map(|d| d.join(p)).collect())
            .unwrap_or_default()
    };
    candidates
        .into_iter()
        .find(|c| {
            std::fs::metadata(c)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
        .ok_or_else(|| Error::RuncNotFound { path: p.to_owned() })
}

impl RuncExecutor {
    /// Checks the runc binary and creates the state directory.
    pub fn new(opts: RuncOptions) -> Result<Self, Error> {
        let runc_path = find_runc(&opts.runc_path)?;
        let root = &opts.state_root;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(root)
            .map_err(state_err(root, "create directory"))?;
        let root = std::fs::canonicalize(root).map_err(state_err(root, "canonicalize"))?;
        let runc_root = root.join("runc");
        let bundles = root.join("bundles");
        for (dir, mode) in [(&runc_root, 0o700), (&bundles, 0o711)] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(dir)
                .map_err(state_err(dir, "create directory"))?;
        }
        let (insecure_caps, insecure_devices) = if opts.allow_insecure {
            let status = std::fs::read_to_string("/proc/self/status")
                .map_err(state_err(Path::new("/proc/self/status"), "read"))?;
            let mask = spec::cap_bnd_mask(&status).unwrap_or(0);
            (
                spec::caps_from_mask(mask),
                spec::insecure_devices(host_loop_max())?,
            )
        } else {
            (Vec::new(), Vec::new())
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        Ok(Self {
            runc: Runc::new(runc_path, runc_root),
            bundles,
            opts: RuncOptions {
                state_root: root,
                ..opts
            },
            id_prefix: format!("berth-{nanos:x}"),
            next_id: AtomicU64::new(1),
            insecure_caps,
            insecure_devices,
            running: Default::default(),
        })
    }

    /// The runc state directory (`runc --root`).
    pub fn runc_root(&self) -> PathBuf {
        self.opts.state_root.join("runc")
    }

    /// Kills and deletes every container in this executor's runc root and removes leftover
    /// bundles (unmounting their secret tmpfs first). Meant for daemon start-up, before any
    /// run: containers of runs in flight would be killed too. Returns the number of containers
    /// deleted.
    pub async fn cleanup_stale(&self) -> Result<usize, Error> {
        let containers = self.runc.list().await?;
        let mut first_err = None;
        for c in &containers {
            tracing::info!(id = %c.id, pid = c.pid, status = %c.status, "deleting stale container");
            if let Err(e) = self.runc.delete_force(&c.id).await {
                tracing::warn!(id = %c.id, error = %e, "failed to delete stale container");
                first_err.get_or_insert(e);
            }
        }
        let bundles = self.bundles.clone();
        let removed = tokio::task::spawn_blocking(move || remove_stale_bundles(&bundles))
            .await
            .map_err(|e| Error::State {
                path: self.bundles.clone(),
                op: "clean up bundles",
                source: std::io::Error::other(e),
            })??;
        tracing::info!(
            containers = containers.len(),
            bundles = removed,
            "stale runc state cleaned"
        );
        match first_err {
            Some(e) => Err(e),
            None => Ok(containers.len()),
        }
    }

    /// Runs `spec` to completion (or cancellation).
    ///
    /// Returns the exit status for any process that ran, including a non-zero one. Errors:
    /// invalid spec or mounts, [`Error::InsecureNotAllowed`], [`Error::RuncRun`] when runc
    /// could not start the process, [`Error::Cancelled`] when `cancel` fired (the container is
    /// then killed and deleted before this returns). In every case the bundle is removed and
    /// the mount stubs are cleaned up before this returns.
    pub async fn run(
        &self,
        spec: ProcessSpec,
        io: ProcessIo,
        cancel: CancellationToken,
    ) -> Result<ExecResult, Error> {
        self.run_with_id(self.new_container_id(), spec, io, cancel)
            .await
    }

    /// A fresh container id for [`RuncExecutor::run_with_id`].
    pub fn new_container_id(&self) -> String {
        format!(
            "{}-{}",
            self.id_prefix,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// [`RuncExecutor::run`] as container `id` (from [`RuncExecutor::new_container_id`]), so
    /// that [`RuncExecutor::exec`] can start further processes in it while it runs.
    pub async fn run_with_id(
        &self,
        id: String,
        spec: ProcessSpec,
        io: ProcessIo,
        cancel: CancellationToken,
    ) -> Result<ExecResult, Error> {
        if !id.starts_with(&self.id_prefix) {
            return Err(invalid(format!(
                "container id {id:?} was not made by this executor"
            )));
        }
        if !self.running.lock().unwrap().insert(id.clone()) {
            return Err(invalid(format!("container {id} is already running")));
        }
        let _running = RunningGuard {
            set: &self.running,
            id: id.clone(),
        };
        let span = tracing::info_span!("exec", id = %id, args = ?spec.args);
        self.run_inner(id, spec, io, cancel).instrument(span).await
    }

    /// Starts a further process in the running container `id` (BuildKit's `Executor.Exec`)
    /// and waits for it: `runc exec` with the container's process spec, changed by `spec`.
    ///
    /// Waits (polling every 100 ms) for a container whose run is still starting. Errors when
    /// no run of `id` is in progress or it ends first ([`Error::NotRunning`]), and as
    /// [`RuncExecutor::run`] does. On cancellation the process is killed (`SIGKILL` to its pid
    /// from runc's pid file) and [`Error::Cancelled`] returned once runc has exited. The
    /// process also dies with the container's first process (exit code 137).
    pub async fn exec(
        &self,
        id: &str,
        spec: ExecSpec,
        io: ProcessIo,
        cancel: CancellationToken,
    ) -> Result<ExitStatus, Error> {
        if spec.args.is_empty() {
            return Err(invalid("args must not be empty"));
        }
        let span = tracing::info_span!("exec", id = %id, args = ?spec.args);
        self.exec_inner(id, spec, io, cancel).instrument(span).await
    }

    async fn exec_inner(
        &self,
        id: &str,
        spec: ExecSpec,
        io: ProcessIo,
        cancel: CancellationToken,
    ) -> Result<ExitStatus, Error> {
        let not_running = |reason: &str| Error::NotRunning {
            id: id.to_owned(),
            reason: reason.to_owned(),
        };
        let deadline = Instant::now() + EXEC_START_WAIT;
        loop {
            if !self.running.lock().unwrap().contains(id) {
                return Err(not_running("its first process is not running"));
            }
            if let Ok(Some(st)) = self.runc.state(id).await {
                if st.status == "running" {
                    break;
                }
            }
            if Instant::now() >= deadline {
                return Err(not_running("it did not start in time"));
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
                () = cancel.cancelled() => return Err(Error::Cancelled { id: id.to_owned() }),
            }
        }
        let bundle = self.bundles.join(id);
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let files = ExecFiles {
            process: bundle.join(format!("exec-{n}.json")),
            pid: bundle.join(format!("exec-{n}.pid")),
            log: bundle.join(format!("exec-{n}.log")),
        };
        let tty = io.tty;
        let config = bundle.join("config.json");
        let process = files.process.clone();
        tokio::task::spawn_blocking(move || write_exec_process(&config, &process, spec, tty))
            .await
            .map_err(|e| Error::State {
                path: bundle.clone(),
                op: "prepare exec process",
                source: std::io::Error::other(e),
            })??;
        let cmd = self
            .runc
            .exec_command(&files.process, &files.pid, &files.log, id);
        let res = self
            .wait_runc(
                cmd,
                id,
                &files.log,
                io,
                &cancel,
                Kill::ExecProcess(&files.pid),
            )
            .await;
        for f in [&files.process, &files.pid, &files.log] {
            let _ = std::fs::remove_file(f);
        }
        res
    }

    async fn run_inner(
        &self,
        id: String,
        spec: ProcessSpec,
        io: ProcessIo,
        cancel: CancellationToken,
    ) -> Result<ExecResult, Error> {
        validate(&spec, self.opts.allow_insecure)?;
        if cancel.is_cancelled() {
            return Err(Error::Cancelled { id });
        }
        let started = Instant::now();
        let bundle = Bundle::create(self.bundles.join(&id))?;
        let ctx = PrepareCtx {
            terminal: io.tty,
            id: id.clone(),
            cgroup_parent: if spec.cgroup_parent.is_empty() {
                self.opts.default_cgroup_parent.clone()
            } else {
                spec.cgroup_parent.clone()
            },
            host_resolv_conf: self.opts.host_resolv_conf.clone(),
            insecure_caps: self.insecure_caps.clone(),
            insecure_devices: self.insecure_devices.clone(),
        };
        let (bundle, mut stubs) = tokio::task::spawn_blocking(move || prepare(ctx, spec, bundle))
            .await
            .map_err(|e| Error::State {
                path: self.bundles.join(&id),
                op: "prepare bundle",
                source: std::io::Error::other(e),
            })??;
        tracing::debug!(elapsed = ?started.elapsed(), "bundle prepared");

        let result = if cancel.is_cancelled() {
            // Nothing started yet: no container to kill.
            Err(Error::Cancelled { id: id.clone() })
        } else {
            self.run_container(&id, &bundle.dir, io, &cancel).await
        };

        let removed = tokio::task::spawn_blocking(move || stubs.cleanup())
            .await
            .unwrap_or_default();
        drop(bundle);
        tracing::debug!(elapsed = ?started.elapsed(), result = ?result.as_ref().map(|s| s.code()), "exec finished");
        result.map(|exit| ExecResult {
            exit,
            mount_stubs: removed,
        })
    }

    async fn run_container(
        &self,
        id: &str,
        bundle: &Path,
        io: ProcessIo,
        cancel: &CancellationToken,
    ) -> Result<ExitStatus, Error> {
        let log = bundle.join("runc.log");
        let mut guard = ContainerGuard {
            runc: self.runc.clone(),
            id: id.to_owned(),
            armed: true,
        };
        let cmd = self.runc.run_command(bundle, &log, id);
        let res = self
            .wait_runc(cmd, id, &log, io, cancel, Kill::Container)
            .await;
        if matches!(
            res,
            Ok(_) | Err(Error::Cancelled { .. }) | Err(Error::RuncRun { .. })
        ) {
            guard.armed = false;
        }
        res
    }

    /// Spawns a runc `run` or `exec` command with the streams of `io`, waits for it (killing
    /// on cancellation), drains the output and turns runc's exit into the process' status.
    async fn wait_runc(
        &self,
        mut cmd: tokio::process::Command,
        id: &str,
        log: &Path,
        mut io: ProcessIo,
        cancel: &CancellationToken,
        kill: Kill<'_>,
    ) -> Result<ExitStatus, Error> {
        let streams = Streams::attach(&mut cmd, &io)?;
        let mut child = cmd.spawn().map_err(|e| Error::Spawn {
            program: self.runc.program().to_owned(),
            source: e,
        })?;
        // closes the daemon's copies of a terminal's slave
        drop(cmd);
        tracing::debug!(pid = ?child.id(), "runc started");
        let running = streams.start(&mut child, &mut io);
        if let Some(tx) = io.started.take() {
            let _ = tx.send(());
        }
        let wait_err = |source| Error::Wait {
            id: id.to_owned(),
            source,
        };

        let waited = tokio::select! {
            s = child.wait() => Some(s),
            () = cancel.cancelled() => None,
        };
        let cancelled = waited.is_none();
        let status = match waited {
            Some(s) => s.map_err(wait_err)?,
            None => {
                tracing::debug!("cancelled, killing the process");
                match kill {
                    Kill::Container => self.kill_until_exit(&mut child, id).await,
                    Kill::ExecProcess(pid_file) => kill_exec(&mut child, pid_file).await,
                }
                .map_err(wait_err)?
            }
        };
        for t in &running.background {
            t.abort();
        }

        let aborts: Vec<_> = running.outputs.iter().map(|t| t.abort_handle()).collect();
        let drain = async {
            for t in running.outputs {
                let _ = t.await;
            }
        };
        if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
            tracing::warn!(
                "output pipes still open {DRAIN_TIMEOUT:?} after runc exited; dropping them"
            );
            for a in aborts {
                a.abort();
            }
        }

        use std::os::unix::process::ExitStatusExt;
        let code = match (status.code(), status.signal()) {
            (Some(c), _) => c,
            (None, Some(sig)) => 128 + sig,
            (None, None) => 255,
        };
        if matches!(kill, Kill::Container) && (cancelled || status.code().is_none()) {
            // runc itself may have died without deleting the container: make sure nothing is
            // left. "does not exist" is the normal answer.
            if let Err(e) = self.runc.delete_force(id).await {
                tracing::debug!(error = %e, "runc delete after kill");
            }
        }
        if cancelled {
            return Err(Error::Cancelled { id: id.to_owned() });
        }
        if code != 0 {
            let errors = log_errors(&tokio::fs::read(log).await.unwrap_or_default());
            if !errors.is_empty() {
                return Err(Error::RuncRun {
                    id: id.to_owned(),
                    code,
                    message: errors.join("; "),
                });
            }
        }
        Ok(ExitStatus::from_code(code))
    }

    /// Sends SIGKILL through runc until `runc run` exits; past [`KILL_GRACE`] kills runc's
    /// process group and force-deletes the container.
    async fn kill_until_exit(
        &self,
        child: &mut tokio::process::Child,
        id: &str,
    ) -> std::io::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + KILL_GRACE;
        loop {
            if let Err(e) = self.runc.kill(id, "KILL").await {
                // Expected while runc is still creating the container.
                tracing::debug!(error = %e, "runc kill");
            }
            tokio::select! {
                s = child.wait() => return s,
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            if Instant::now() >= deadline {
                tracing::warn!("runc kill ineffective, killing the runc process group");
                if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                if let Err(e) = self.runc.delete_force(id).await {
                    tracing::warn!(error = %e, "runc delete --force after kill timeout");
                }
                return child.wait().await;
            }
        }
    }
}

/// Largest N of the host's `/dev/loopN` devices.
fn host_loop_max() -> Option<i64> {
    std::fs::read_dir("/dev")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("loop")?
                .parse::<i64>()
                .ok()
        })
        .max()
}

fn validate(spec: &ProcessSpec, allow_insecure: bool) -> Result<(), Error> {
    if spec.args.is_empty() {
        return Err(invalid("args must not be empty"));
    }
    if !spec.rootfs.is_absolute() {
        return Err(invalid(format!(
            "rootfs {:?} is not an absolute path",
            spec.rootfs
        )));
    }
    if spec.security == SecurityMode::Insecure && !allow_insecure {
        return Err(Error::InsecureNotAllowed);
    }
    for m in &spec.mounts {
        match &m.kind {
            MountKind::Bind { source, .. } | MountKind::SshSocket { source, .. }
                if !source.is_absolute() =>
            {
                return Err(invalid(format!(
                    "mount source {source:?} for {:?} is not absolute",
                    m.dest
                )));
            }
            _ => {}
        }
    }
    for e in &spec.env {
        if e.contains('\0') {
            return Err(invalid("environment entries must not contain NUL"));
        }
    }
    spec::rlimits(&spec.ulimits)?;
    Ok(())
}

/// The bundle directory and the secret tmpfs inside it.
struct Bundle {
    dir: PathBuf,
    secrets: SecretStore,
}

impl Bundle {
    fn create(dir: PathBuf) -> Result<Self, Error> {
        std::fs::DirBuilder::new()
            .mode(0o711)
            .create(&dir)
            .map_err(state_err(&dir, "create bundle directory"))?;
        let secrets = SecretStore::new(dir.join("secrets"));
        Ok(Self { dir, secrets })
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        // Unmount the secret tmpfs before removing the directory.
        self.secrets.unmount();
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(path = %self.dir.display(), error = %e, "failed to remove bundle");
        }
    }
}

/// Force-deletes the container if the run future is dropped before runc was reaped.
struct ContainerGuard {
    runc: Runc,
    id: String,
    armed: bool,
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (runc, id) = (self.runc.clone(), std::mem::take(&mut self.id));
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(async move {
                    if let Err(e) = runc.delete_force(&id).await {
                        tracing::debug!(id = %id, error = %e, "runc delete --force of abandoned run");
                    }
                });
            }
            Err(_) => {
                tracing::warn!(id = %id, "run abandoned outside a runtime; container may be left for cleanup_stale")
            }
        }
    }
}

/// How a cancelled runc command is stopped.
#[derive(Clone, Copy)]
enum Kill<'a> {
    /// `runc kill <id> KILL` until `runc run` exits (the whole container goes).
    Container,
    /// `SIGKILL` to the exec'd process (its pid from runc's pid file); runc then exits.
    ExecProcess(&'a Path),
}

/// Files of one `runc exec`, inside the container's bundle.
struct ExecFiles {
    process: PathBuf,
    pid: PathBuf,
    log: PathBuf,
}

/// Removes a container id from the running set when its run ends.
struct RunningGuard<'a> {
    set: &'a std::sync::Mutex<std::collections::HashSet<String>>,
    id: String,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.set.lock().unwrap().remove(&self.id);
    }
}

/// Kills a cancelled `runc exec`'s process; past [`KILL_GRACE`] kills runc itself.
async fn kill_exec(
    child: &mut tokio::process::Child,
    pid_file: &Path,
) -> std::io::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + KILL_GRACE;
    loop {
        match std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            Some(pid) if pid > 0 => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            // not started yet: runc itself is stopped, nothing ran
            _ => {
                let _ = child.start_kill();
            }
        }
        tokio::select! {
            s = child.wait() => return s,
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        if Instant::now() >= deadline {
            let _ = child.start_kill();
            return child.wait().await;
        }
    }
}

/// Writes the process spec of a `runc exec`: the container's own process, with `spec`'s
/// non-empty fields (the user resolved inside the container's rootfs) and `terminal`.
fn write_exec_process(
    config: &Path,
    out: &Path,
    spec: ExecSpec,
    terminal: bool,
) -> Result<(), Error> {
    let data = std::fs::read(config).map_err(state_err(config, "read"))?;
    let oci: oci_spec::runtime::Spec = serde_json::from_slice(&data).map_err(|e| Error::Spec {
        reason: format!("container config {}: {e}", config.display()),
    })?;
    let mut process = oci.process().clone().ok_or_else(|| Error::Spec {
        reason: format!("container config {} has no process", config.display()),
    })?;
    process.set_args(Some(spec.args));
    process.set_terminal(Some(terminal));
    if !spec.env.is_empty() {
        if spec.env.iter().any(|e| e.contains('\0')) {
            return Err(invalid("environment entries must not contain NUL"));
        }
        process.set_env(Some(spec.env));
    }
    if !spec.cwd.is_empty() {
        process.set_cwd(clean_abs(Path::new(&spec.cwd)));
    }
    if !spec.user.is_empty() {
        let rootfs = oci
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .ok_or_else(|| Error::Spec {
                reason: format!("container config {} has no root", config.display()),
            })?;
        let root = pathrs::Root::open(&rootfs).map_err(|source| Error::Rootfs {
            path: rootfs.clone(),
            source,
        })?;
        let u = user::resolve(&root, &spec.user)?;
        let mut ou = process.user().clone();
        ou.set_uid(u.uid);
        ou.set_gid(u.gid);
        ou.set_additional_gids(Some(u.additional_gids));
        process.set_user(ou);
    }
    let json = serde_json::to_vec(&process).map_err(|e| Error::Spec {
        reason: e.to_string(),
    })?;
    std::fs::write(out, json).map_err(state_err(out, "write"))
}

/// What `prepare` needs besides the spec.
struct PrepareCtx {
    terminal: bool,
    id: String,
    cgroup_parent: String,
    host_resolv_conf: PathBuf,
    insecure_caps: Vec<Capability>,
    insecure_devices: Vec<LinuxDevice>,
}

/// Blocking part of a run: everything that touches the rootfs and the bundle.
fn prepare(
    ctx: PrepareCtx,
    spec: ProcessSpec,
    mut bundle: Bundle,
) -> Result<(Bundle, MountStubs), Error> {
    let root = pathrs::Root::open(&spec.rootfs).map_err(|source| Error::Rootfs {
        path: spec.rootfs.clone(),
        source,
    })?;
    let mut stubs = MountStubs::new(root, spec.remove_mount_stubs_recursive);
    let exec_user = user::resolve(stubs.root(), &spec.user)?;

    let hostname = if spec.hostname.is_empty() {
        DEFAULT_HOSTNAME.to_owned()
    } else {
        spec.hostname.clone()
    };
    let hosts_path = bundle.dir.join("hosts");
    std::fs::write(&hosts_path, hosts::hosts_file(&hostname, &spec.extra_hosts))
        .map_err(state_err(&hosts_path, "write"))?;
    let resolv_path = bundle.dir.join("resolv.conf");
    let resolv = hosts::resolv_conf(&ctx.host_resolv_conf)
        .map_err(state_err(&ctx.host_resolv_conf, "read"))?;
    std::fs::write(&resolv_path, resolv).map_err(state_err(&resolv_path, "write"))?;

    let cwd = clean_abs(Path::new(if spec.cwd.is_empty() { "/" } else { &spec.cwd }));

    // Mount points. `covering` holds (destination as given, resolved destination) of every
    // mount applied so far; a destination below one of them lives inside that mount, where runc
    // creates its mount point itself, so no stub is made in the rootfs for it.
    let mut covering: Vec<(PathBuf, PathBuf)> = spec::DEFAULT_MOUNT_DESTS
        .iter()
        .map(|d| (PathBuf::from(d), PathBuf::from(d)))
        .collect();
    let mut spec_mounts = Vec::with_capacity(spec.mounts.len() + 2);
    for (dest, source) in [
        ("/etc/resolv.conf", &resolv_path),
        ("/etc/hosts", &hosts_path),
    ] {
        let resolved = stubs.prepare(Path::new(dest), Leaf::File)?;
        spec_mounts.push(spec::SpecMount::new(
            resolved,
            "bind",
            source.clone(),
            &spec::RO_FILE_BIND,
        ));
    }

    let mut mounts: Vec<(PathBuf, &MountKind)> = spec
        .mounts
        .iter()
        .map(|m| (clean_abs(&cwd.join(&m.dest)), &m.kind))
        .collect();
    if let Some((d, _)) = mounts.iter().find(|(d, _)| d == Path::new("/")) {
        return Err(invalid(format!(
            "mount destination {d:?} is the root; the root filesystem is ProcessSpec::rootfs"
        )));
    }
    mounts.sort_by(|a, b| a.0.cmp(&b.0));

    for (dest, kind) in mounts {
        let leaf = match kind {
            MountKind::Bind { source, .. } => {
                let md = std::fs::metadata(source).map_err(|e| Error::MountSource {
                    dest: dest.clone(),
                    source_path: source.clone(),
                    source: e,
                })?;
                if md.is_dir() {
                    Leaf::Dir
                } else {
                    Leaf::File
                }
            }
            MountKind::Tmpfs { .. } => Leaf::Dir,
            MountKind::SecretFile { .. } | MountKind::SshSocket { .. } => Leaf::File,
        };
        let parent = covering
            .iter()
            .filter(|(orig, _)| dest.starts_with(orig))
            .max_by_key(|(orig, _)| orig.components().count());
        let resolved = match parent {
            Some((orig, res)) => res.join(dest.strip_prefix(orig).unwrap_or(Path::new(""))),
            None => stubs.prepare(&dest, leaf)?,
        };
        if resolved == Path::new("/") {
            return Err(invalid(format!(
                "mount destination {dest:?} resolves to the root inside the rootfs"
            )));
        }
        let m = match kind {
            MountKind::Bind { source, readonly } => {
                let opts: &[&str] = if *readonly {
                    &["rbind", "ro"]
                } else {
                    &["rbind"]
                };
                spec::SpecMount::new(&resolved, "bind", source.clone(), opts)
            }
            MountKind::Tmpfs { size } => {
                let mut m = spec::SpecMount::new(&resolved, "tmpfs", "tmpfs", &["nosuid"]);
                if *size > 0 {
                    m.options.push(format!("size={size}"));
                }
                m
            }
            MountKind::SecretFile {
                data,
                uid,
                gid,
                mode,
            } => {
                let path = bundle.secrets.add(data, *uid, *gid, *mode)?;
                spec::SpecMount::new(
                    &resolved,
                    "bind",
                    path,
                    &["ro", "rbind", "nodev", "nosuid", "noexec"],
                )
            }
            MountKind::SshSocket {
                source,
                uid,
                gid,
                mode,
            } => {
                let src_err = |e| Error::MountSource {
                    dest: dest.clone(),
                    source_path: source.clone(),
                    source: e,
                };
                std::os::unix::fs::lchown(source, Some(*uid), Some(*gid)).map_err(src_err)?;
                std::fs::set_permissions(source, std::fs::Permissions::from_mode(mode & 0o777))
                    .map_err(src_err)?;
                spec::SpecMount::new(&resolved, "bind", source.clone(), &["rbind"])
            }
        };
        spec_mounts.push(m);
        covering.push((dest, resolved));
    }

    // Working directory, after the stubs so that a stub it reuses is still recorded as one
    // (BuildKit computes the stub list before creating the working directory).
    let root = stubs.root();
    ensure_path(root, &cwd, Leaf::Dir, |c| {
        let p = c.path;
        let f = root
            .resolve_nofollow(p)
            .and_then(|h| {
                h.reopen(pathrs::flags::OpenFlags::O_RDONLY | pathrs::flags::OpenFlags::O_DIRECTORY)
            })
            .map_err(|e| Error::InRoot {
                path: p.to_owned(),
                op: "open working directory",
                source: pathrs_io(e),
            })?;
        std::os::unix::fs::fchown(&f, Some(exec_user.uid), Some(exec_user.gid)).map_err(|e| {
            Error::InRoot {
                path: p.to_owned(),
                op: "chown working directory",
                source: e,
            }
        })
    })?;

    let mut env = spec.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }

    let input = spec::SpecInput {
        rootfs: spec.rootfs.clone(),
        readonly_rootfs: spec.readonly_rootfs,
        args: spec.args.clone(),
        terminal: ctx.terminal,
        env,
        cwd,
        user: exec_user,
        hostname,
        network: spec.network,
        security: spec.security,
        mounts: spec_mounts,
        cgroups_path: spec::cgroups_path(&ctx.cgroup_parent, &ctx.id),
        ulimits: spec.ulimits.clone(),
        insecure_caps: ctx.insecure_caps,
        insecure_devices: ctx.insecure_devices,
    };
    let oci = spec::generate(&input)?;
    let config = bundle.dir.join("config.json");
    let json = serde_json::to_vec(&oci).map_err(|e| Error::Spec {
        reason: e.to_string(),
    })?;
    std::fs::write(&config, json).map_err(state_err(&config, "write"))?;
    Ok((bundle, stubs))
}

/// Unmounts whatever is mounted below `bundles` and removes every bundle directory.
fn remove_stale_bundles(bundles: &Path) -> Result<usize, Error> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(state_err(Path::new("/proc/self/mountinfo"), "read"))?;
    let mut targets: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(bundles) && p != bundles)
        .collect();
    targets.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for t in targets {
        if let Err(e) = nix::mount::umount2(&t, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(path = %t.display(), error = %e, "failed to unmount stale bundle mount");
        }
    }
    let mut n = 0;
    for entry in std::fs::read_dir(bundles).map_err(state_err(bundles, "read directory"))? {
        let entry = entry.map_err(state_err(bundles, "read directory"))?;
        let p = entry.path();
        std::fs::remove_dir_all(&p).map_err(state_err(&p, "remove stale bundle"))?;
        n += 1;
    }
    Ok(n)
}

/// Decodes the octal escapes (`\040` etc.) of a mountinfo path.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape_table() {
        for (i, o) in [
            ("/a/b", "/a/b"),
            ("/a\\040b", "/a b"),
            ("/x\\134y", "/x\\y"),
            ("/end\\", "/end\\"),
        ] {
            assert_eq!(unescape_mountinfo(i), o);
        }
    }

    #[test]
    fn validate_table() {
        let ok = ProcessSpec {
            rootfs: "/r".into(),
            args: vec!["true".into()],
            ..Default::default()
        };
        assert!(validate(&ok, false).is_ok());
        let cases = [
            ProcessSpec {
                args: vec![],
                ..ok.clone()
            },
            ProcessSpec {
                rootfs: "rel".into(),
                ..ok.clone()
            },
            ProcessSpec {
                security: SecurityMode::Insecure,
                ..ok.clone()
            },
            ProcessSpec {
                mounts: vec![crate::Mount {
                    dest: "/m".into(),
                    kind: MountKind::Bind {
                        source: "relative".into(),
                        readonly: false,
                    },
                }],
                ..ok.clone()
            },
            ProcessSpec {
                ulimits: vec![crate::Ulimit {
                    name: "bogus".into(),
                    soft: 1,
                    hard: 1,
                }],
                ..ok.clone()
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            assert!(validate(c, false).is_err(), "case {i}");
        }
        assert!(validate(&cases[2], true).is_ok());
    }
}
