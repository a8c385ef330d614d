//! [`PrivateDockerd`]: a throwaway dockerd with its own containerd, data root and exec root.
//!
//! Layout of its temp dir (`/tmp/berth-dockerd-<pid>-XXXXXX/`):
//!
//! ```text
//! data/                 --data-root (image store: data/image/<driver>/, data/<driver>/)
//! exec/                 --exec-root (runc state, fifos, netns, metrics socket)
//! docker.sock           -H unix://...
//! docker.pid            --pidfile
//! daemon.json           --config-file (never /etc/docker/daemon.json)
//! dockerd.log           dockerd's stdout+stderr, appended across restarts
//! containerd/           config.toml, root/, state/, containerd.sock, containerd.log
//! ```
//!
//! Why a containerd of our own: dockerd 20.10 without `--containerd` uses the system containerd
//! whenever `/run/containerd/containerd.sock` exists, and only starts a managed one otherwise. A
//! shared containerd would mix both daemons' containers in its `moby` namespace. So this module
//! starts `containerd` itself on a private socket and passes `--containerd`; nothing of it is
//! shared with the system daemon (shim sockets under `/run/containerd/s/` are named after a hash
//! of the containerd address, so they cannot clash either).
//!
//! Networking is off (`--bridge=none --iptables=false --ip-masq=false --ip-forward=false`) and
//! dockerd runs in a network namespace of its own (`unshare --net`), so the host's network
//! configuration is never touched: dockerd 20.10 started with `--bridge=none` deletes an existing
//! `docker0` interface, which in the host namespace would be the system daemon's bridge.
//! Containers must use network `none` (what [`crate::RunOptions`] does by default).
//!
//! The containerd image store: [`PrivateDockerdOptions::containerd_store`] runs Debian 13's
//! Docker Engine 26.1.5 and containerd 1.7.24 (unpacked by `.ci/trixie-packages.sh`, never
//! installed) with `"features": {"containerd-snapshotter": true}`; its images live in the private
//! containerd (namespace `moby`, snapshotter `overlayfs`), which [`PrivateDockerd::ctr`] inspects.
//!
//! Only the processes this type spawned are signalled, by PID; only mounts under its temp dir are
//! unmounted. Dropping it stops both daemons (also after a panic), unmounts leftovers and deletes
//! the temp dir.

use std::fs::OpenOptions;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use tempfile::TempDir;

use crate::engine::DockerEngine;
use crate::http::unix_http_get;
use crate::process::{log_tail, terminate, unmount_under};

/// How a [`PrivateDockerd`] is started.
#[derive(Debug, Clone)]
pub struct PrivateDockerdOptions {
    /// `--storage-driver`; `overlay2` by default; empty: not passed (dockerd's default, or the
    /// snapshotter's with the containerd image store).
    pub storage_driver: String,
    /// A root the Docker and containerd packages were unpacked into (`usr/sbin/dockerd`,
    /// `usr/bin/containerd`, `usr/bin/ctr`, the shims): the daemons, `ctr` and the shims come
    /// from there instead of `PATH` (see [`PrivateDockerdOptions::containerd_store`]).
    pub binaries: Option<PathBuf>,
    /// Extra keys for its `daemon.json` (e.g. `{"features": {...}}`). Must not repeat an option
    /// this module passes as a flag (dockerd refuses duplicates).
    pub daemon_json: serde_json::Map<String, serde_json::Value>,
    /// Extra command-line arguments, appended after ours.
    pub extra_args: Vec<String>,
    /// How long to wait for `/_ping` to answer after (re)start; 60 s by default.
    pub start_timeout: Duration,
    /// How long each daemon gets after SIGTERM before SIGKILL; 30 s by default.
    pub stop_timeout: Duration,
}

impl Default for PrivateDockerdOptions {
    fn default() -> Self {
        Self {
            storage_driver: "overlay2".to_string(),
            binaries: None,
            daemon_json: serde_json::Map::new(),
            extra_args: Vec::new(),
            start_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(30),
        }
    }
}

/// Where `.ci/trixie-packages.sh` unpacks Debian 13's docker.io 26.1.5 and containerd 1.7.24.
pub const TRIXIE_ROOT: &str = "/var/cache/berth/trixie/root";

impl PrivateDockerdOptions {
    /// Docker Engine 26.1.5 on the **containerd image store** (`"features":
    /// {"containerd-snapshotter": true}`, snapshotter `overlayfs`, namespace `moby`) with its
    /// own containerd 1.7.24, both from Debian 13's packages unpacked under [`TRIXIE_ROOT`]
    /// (`BERTH_TRIXIE_DIR/root` if set). Panics naming the script to run when they are missing:
    /// a test that needs this Engine never passes without it.
    pub fn containerd_store() -> Self {
        let root = std::env::var_os("BERTH_TRIXIE_DIR")
            .map(|d| PathBuf::from(d).join("root"))
            .unwrap_or_else(|| PathBuf::from(TRIXIE_ROOT));
        let complete = std::fs::read_to_string(root.join(".complete")).unwrap_or_default();
        assert!(
            complete.contains("docker.io 26.1.5") && complete.contains("containerd 1.7.24"),
            "this test needs Debian 13's docker.io 26.1.5 and containerd 1.7.24 unpacked in {} \
             (found: {complete:?}); run .ci/trixie-packages.sh (.ci/run does)",
            root.display()
        );
        let mut daemon_json = serde_json::Map::new();
        daemon_json.insert(
            "features".into(),
            serde_json::json!({ "containerd-snapshotter": true }),
        );
        Self {
            storage_driver: String::new(),
            binaries: Some(root),
            daemon_json,
            ..Self::default()
        }
    }

    /// The path of a binary of the unpacked packages (`usr/sbin`, then `usr/bin`), or the bare
    /// name (looked up in `PATH`) without [`PrivateDockerdOptions::binaries`].
    pub fn binary(&self, name: &str) -> PathBuf {
        match &self.binaries {
            Some(root) => ["usr/sbin", "usr/bin"]
                .iter()
                .map(|d| root.join(d).join(name))
                .find(|p| p.is_file())
                .unwrap_or_else(|| root.join("usr/bin").join(name)),
            None => PathBuf::from(name),
        }
    }

    /// `PATH` for the daemons: the packages' `usr/bin` and `usr/sbin` first (so containerd runs
    /// its own shim), then the inherited one.
    fn path_env(&self) -> Option<std::ffi::OsString> {
        let root = self.binaries.as_ref()?;
        let mut dirs = vec![root.join("usr/bin"), root.join("usr/sbin")];
        if let Some(p) = std::env::var_os("PATH") {
            dirs.extend(std::env::split_paths(&p));
        }
        std::env::join_paths(dirs).ok()
    }
}

/// A dockerd of the test's own; see the module docs for what it isolates and how.
#[derive(Debug)]
pub struct PrivateDockerd {
    options: PrivateDockerdOptions,
    dir: TempDir,
    dockerd: Option<Child>,
    containerd: Option<Child>,
    /// Connected after the first successful start (so always `Some` once `new` returned).
    engine: Option<DockerEngine>,
}

impl PrivateDockerd {
    /// Creates fresh temp roots and starts containerd and dockerd on them; returns once dockerd
    /// answers `/_ping`. Panics (see [`crate::require_root`]) when not root or a binary is
    /// missing; errors carry the daemon's log.
    pub fn new(options: PrivateDockerdOptions) -> Result<Self> {
        crate::require_root();
        if options.binaries.is_none() {
            crate::require_tool("dockerd", "docker.io");
            crate::require_tool("containerd", "containerd");
        }
        crate::require_tool("runc", "runc");
        crate::require_tool("unshare", "util-linux");
        let dir = tempfile::Builder::new()
            .prefix(&format!("berth-dockerd-{}-", std::process::id()))
            .tempdir()
            .context("creating private dockerd temp dir")?;
        for sub in ["data", "exec", "containerd/root", "containerd/state"] {
            std::fs::create_dir_all(dir.path().join(sub))
                .with_context(|| format!("creating {}", dir.path().join(sub).display()))?;
        }
        let mut this = Self {
            engine: None,
            options,
            dir,
            dockerd: None,
            containerd: None,
        };
        let root = this.root().display().to_string();
        this.start()
            .with_context(|| format!("starting private dockerd in {root}"))?;
        Ok(this)
    }

    /// Starts containerd and dockerd again on the same roots (after [`PrivateDockerd::stop`]).
    /// Fails if it is running.
    pub fn start(&mut self) -> Result<()> {
        if self.is_running() {
            bail!(
                "private dockerd in {} is already running",
                self.root().display()
            );
        }
        let result = self.start_containerd().and_then(|()| self.start_dockerd());
        if result.is_err() {
            // Leave nothing half-started behind.
            if let Err(err) = self.stop() {
                eprintln!("integration: cleaning up a failed start: {err:#}");
            }
        }
        result
    }

    fn start_containerd(&mut self) -> Result<()> {
        let base = self.root().join("containerd");
        let socket = self.containerd_socket();
        let config = format!(
            "version = 2\nroot = {root:?}\nstate = {state:?}\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\n\
             [grpc]\n  address = {socket:?}\n\n[debug]\n  level = \"info\"\n",
            root = base.join("root"),
            state = base.join("state"),
            socket = socket,
        );
        let config_path = base.join("config.toml");
        std::fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let log = base.join("containerd.log");
        let mut cmd = Command::new(self.options.binary("containerd"));
        cmd.arg("--config").arg(&config_path);
        if let Some(path) = self.options.path_env() {
            cmd.env("PATH", path);
        }
        let child = spawn_logged(&mut cmd, &log)?;
        let child = self.containerd.insert(child);
        let deadline = Instant::now() + self.options.start_timeout;
        loop {
            if UnixStream::connect(&socket).is_ok() {
                return Ok(());
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "containerd exited during start-up ({status}); its log:\n{}",
                    log_tail(&log, 8192)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "containerd did not listen on {} within {:?}; its log:\n{}",
                    socket.display(),
                    self.options.start_timeout,
                    log_tail(&log, 8192)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn start_dockerd(&mut self) -> Result<()> {
        let root = self.root().to_path_buf();
        let config_path = root.join("daemon.json");
        let json = serde_json::to_vec_pretty(&self.options.daemon_json)?;
        std::fs::write(&config_path, json)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let socket = self.socket_path();
        // dockerd runs in a network namespace of its own: with `--bridge=none` it deletes any
        // interface named `docker0` at start, and in the host's namespace that is the system
        // daemon's bridge. `unshare` execs dockerd in place, so the child's PID is dockerd's.
        let mut cmd = Command::new("unshare");
        cmd.args(["--net", "--"])
            .arg(self.options.binary("dockerd"))
            .arg("--config-file")
            .arg(&config_path)
            .arg("--data-root")
            .arg(self.data_root())
            .arg("--exec-root")
            .arg(self.exec_root())
            .arg("--pidfile")
            .arg(self.pidfile())
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .arg("--containerd")
            .arg(self.containerd_socket());
        if !self.options.storage_driver.is_empty() {
            cmd.arg("--storage-driver")
                .arg(&self.options.storage_driver);
        }
        if let Some(path) = self.options.path_env() {
            cmd.env("PATH", path);
        }
        cmd.args([
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
            "--ip-forward=false",
            "--userland-proxy=false",
        ])
        .args(&self.options.extra_args);
        let log = self.log_path();
        let child = self.dockerd.insert(spawn_logged(&mut cmd, &log)?);
        let deadline = Instant::now() + self.options.start_timeout;
        loop {
            let ping = unix_http_get(&socket, "/_ping");
            if matches!(&ping, Ok(r) if r.status == 200 && r.text().trim() == "OK") {
                break;
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "dockerd exited during start-up ({status}); its log:\n{}",
                    log_tail(&log, 8192)
                );
            }
            if Instant::now() >= deadline {
                let last = match ping {
                    Ok(r) => format!("HTTP {} {:?}", r.status, r.text()),
                    Err(err) => format!("{err:#}"),
                };
                bail!(
                    "dockerd did not answer /_ping on {} within {:?} (last: {last}); its log:\n{}",
                    socket.display(),
                    self.options.start_timeout,
                    log_tail(&log, 8192)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.engine = Some(DockerEngine::connect(&socket)?);
        Ok(())
    }

    /// Stops dockerd (SIGTERM, SIGKILL after the stop timeout), then containerd, then any shim
    /// still attached to this containerd, and unmounts whatever is left under the temp dir.
    /// Idempotent. An error means something had to be killed or could not be stopped; everything
    /// is still stopped as far as possible.
    pub fn stop(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        if let Some(mut child) = self.dockerd.take() {
            if let Err(err) = terminate(&mut child, "dockerd", self.options.stop_timeout) {
                errors.push(format!(
                    "{err:#}; dockerd log:\n{}",
                    log_tail(&self.log_path(), 4096)
                ));
            }
        }
        if let Some(mut child) = self.containerd.take() {
            if let Err(err) = terminate(&mut child, "containerd", self.options.stop_timeout) {
                errors.push(format!("{err:#}"));
            }
        }
        let shims = kill_shims_of(&self.containerd_socket());
        if !shims.is_empty() {
            errors.push(format!("killed leftover containerd shims {shims:?}"));
        }
        let unmounted = unmount_under(self.root());
        if !unmounted.is_empty() {
            errors.push(format!("unmounted leftover mounts {unmounted:?}"));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(anyhow!(
                "stopping private dockerd in {}: {}",
                self.root().display(),
                errors.join("; ")
            ))
        }
    }

    /// Whether dockerd was started and has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.dockerd.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The engine (socket + bollard client). Calls fail while the daemon is stopped.
    pub fn engine(&self) -> &DockerEngine {
        self.engine
            .as_ref()
            .expect("PrivateDockerd::new only returns after a successful start")
    }

    /// dockerd's PID while it is running (or has exited but was not yet stopped).
    pub fn pid(&self) -> Option<u32> {
        self.dockerd.as_ref().map(Child::id)
    }

    /// dockerd's network namespace (`/proc/<pid>/ns/net`) while it runs, e.g. for
    /// [`crate::Registry::start_in_netns`].
    pub fn netns(&self) -> Option<PathBuf> {
        self.pid()
            .map(|p| PathBuf::from(format!("/proc/{p}/ns/net")))
    }

    /// The PID of this daemon's own containerd.
    pub fn containerd_pid(&self) -> Option<u32> {
        self.containerd.as_ref().map(Child::id)
    }

    /// The temp dir holding everything (see the module docs).
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// `--data-root`: write into it only while the daemon is stopped.
    pub fn data_root(&self) -> PathBuf {
        self.root().join("data")
    }

    /// `--exec-root`.
    pub fn exec_root(&self) -> PathBuf {
        self.root().join("exec")
    }

    /// The API socket (`-H unix://...`).
    pub fn socket_path(&self) -> PathBuf {
        self.root().join("docker.sock")
    }

    /// `--pidfile`.
    pub fn pidfile(&self) -> PathBuf {
        self.root().join("docker.pid")
    }

    /// The private containerd's gRPC socket (`--containerd`).
    pub fn containerd_socket(&self) -> PathBuf {
        self.root().join("containerd/containerd.sock")
    }

    /// `ctr --address <its containerd> --namespace moby ARGS` (the packages' `ctr` with
    /// [`PrivateDockerdOptions::binaries`]): (success, stdout + stderr).
    pub fn ctr(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(self.options.binary("ctr"))
            .arg("--address")
            .arg(self.containerd_socket())
            .args(["--namespace", "moby"])
            .args(args)
            .output();
        match out {
            Ok(out) => (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr),
            ),
            Err(e) => (false, format!("running ctr: {e}")),
        }
    }

    /// [`PrivateDockerd::ctr`] that must succeed: its output. Panics with the output and the
    /// containerd log.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let (ok, out) = self.ctr(args);
        assert!(
            ok,
            "ctr {args:?}: {out}\ncontainerd log:\n{}",
            log_tail(&self.root().join("containerd/containerd.log"), 8192)
        );
        out
    }

    /// The storage driver it runs with (empty: dockerd's default).
    pub fn storage_driver(&self) -> &str {
        &self.options.storage_driver
    }

    /// dockerd's log file (stdout and stderr of every start).
    pub fn log_path(&self) -> PathBuf {
        self.root().join("dockerd.log")
    }

    /// The last 64 KiB of dockerd's log, for assertion messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path(), 64 * 1024)
    }
}

impl Drop for PrivateDockerd {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            eprintln!("integration: {err:#}");
        }
        // TempDir removes the directory tree after this.
    }
}

/// Spawns `cmd` with stdin closed and stdout+stderr appended to `log`.
fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Child> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("spawning {:?}", cmd.get_program()))
}

/// SIGKILLs processes whose command line names `containerd_socket` (the shims of a containerd we
/// started: they outlive it when containers were still running) and returns their PIDs.
fn kill_shims_of(containerd_socket: &Path) -> Vec<u32> {
    let needle = containerd_socket.as_os_str().as_encoded_bytes();
    let mut killed = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return killed;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let names_socket = cmdline.split(|b| *b == 0).any(|arg| arg == needle);
        if names_socket && pid != std::process::id() {
            if let Ok(raw) = i32::try_from(pid) {
                let target = nix::unistd::Pid::from_raw(raw);
                if nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL).is_ok() {
                    killed.push(pid);
                }
            }
        }
    }
    // Give the kernel a moment to tear them down before mounts are inspected.
    if !killed.is_empty() {
        let deadline = Instant::now() + Duration::from_secs(5);
        while killed.iter().any(|p| crate::process::pid_alive(*p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    killed
}
