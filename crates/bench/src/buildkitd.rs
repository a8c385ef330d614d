//! The stock path with stock binaries: buildkitd (OCI worker, runc, its own `--root`) and buildctl
//! from `BERTH_BENCH_BUILDKITD` / `BERTH_BENCH_BUILDCTL`. Stock buildkitd cannot use Docker's
//! images in place, so the base image is pushed to a local registry (integration's `Registry`,
//! plain HTTP on 127.0.0.1, declared `http`/`insecure` in buildkitd.toml) and pulled once by the
//! warm-up build. Each build pipes `buildctl build --output type=docker,name=…` into
//! `docker load`, as users do today.
//!
//! buildctl v0.11.6 has no `rawjson` progress, so the solve's last vertex is taken from the
//! `--progress=plain` stream: the arrival of the last `#N DONE`/`#N CACHED` line of a vertex that
//! is not the exporter's (`exporting to …`). Arrival is later than the vertex's real completion,
//! which shortens the measured stock time (it favours stock).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context as _, Result};
use prost::Message as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// Where the stock v0.11.6 binaries are looked for when neither `BERTH_BENCH_BUILDKITD` /
/// `BERTH_BENCH_BUILDCTL` nor `--stock-bin` says: the directory this project's machines build
/// them into.
pub const DEFAULT_STOCK_BIN: &str = "/work/anchors/bin";

/// `--stock-bin DIR` (set once by argument parsing).
pub static STOCK_BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The stock `buildkitd` and `buildctl`: from `BERTH_BENCH_BUILDKITD` and `BERTH_BENCH_BUILDCTL`
/// when both are set, else `buildkitd` and `buildctl` in `--stock-bin DIR` (default
/// [`DEFAULT_STOCK_BIN`]) when both are there; `None` otherwise (the stock rows are not run).
pub fn from_env() -> Option<(PathBuf, PathBuf)> {
    if let (Some(d), Some(c)) = (
        std::env::var_os("BERTH_BENCH_BUILDKITD"),
        std::env::var_os("BERTH_BENCH_BUILDCTL"),
    ) {
        return Some((d.into(), c.into()));
    }
    let dir = STOCK_BIN
        .get()
        .cloned()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STOCK_BIN));
    let (d, c) = (dir.join("buildkitd"), dir.join("buildctl"));
    (d.is_file() && c.is_file()).then_some((d, c))
}

/// A running stock buildkitd and the registry holding its base images; both stopped on drop
/// (buildkitd through its child handle, a registry it started by integration's `Registry`).
pub struct Stock {
    buildctl: PathBuf,
    addr: String,
    daemon: tokio::process::Child,
    /// The registry this instance started (`None` when it uses another instance's).
    registry: Option<integration::Registry>,
    registry_addr: String,
}

impl Stock {
    /// Starts a registry and buildkitd (root and socket under `dir`).
    pub async fn start(buildkitd: &Path, buildctl: &Path, dir: &Path) -> Result<Self> {
        let registry = tokio::task::block_in_place(integration::Registry::start)
            .context("start a local registry")?;
        let addr = registry.addr().to_string();
        Self::start_with_registry(buildkitd, buildctl, dir, &addr, Some(registry)).await
    }

    /// Starts buildkitd (root and socket under `dir`) using the plain-HTTP registry at
    /// `registry_addr` (`host:port`), which another [`Stock`] started (a second build node).
    pub async fn start_on(
        buildkitd: &Path,
        buildctl: &Path,
        dir: &Path,
        registry_addr: &str,
    ) -> Result<Self> {
        Self::start_with_registry(buildkitd, buildctl, dir, registry_addr, None).await
    }

    async fn start_with_registry(
        buildkitd: &Path,
        buildctl: &Path,
        dir: &Path,
        registry_addr: &str,
        registry: Option<integration::Registry>,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("buildkitd.toml");
        std::fs::write(
            &config,
            format!(
                "[worker.oci]\n  enabled = true\n[worker.containerd]\n  enabled = false\n\
                 [registry.\"{registry_addr}\"]\n  http = true\n  insecure = true\n",
            ),
        )?;
        let socket = dir.join("buildkitd.sock");
        let addr = format!("unix://{}", socket.display());
        let log = std::fs::File::create(dir.join("buildkitd.log"))?;
        let mut daemon = tokio::process::Command::new(buildkitd)
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--addr")
            .arg(&addr)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", buildkitd.display()))?;
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Some(st) = daemon.try_wait()? {
                bail!(
                    "buildkitd exited early ({st}); log:\n{}",
                    std::fs::read_to_string(dir.join("buildkitd.log")).unwrap_or_default()
                );
            }
            ensure!(
                t.elapsed() < Duration::from_secs(60),
                "buildkitd did not answer on {addr} within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Stock {
            buildctl: buildctl.to_path_buf(),
            addr,
            daemon,
            registry,
            registry_addr: registry_addr.to_string(),
        })
    }

    /// The registry's `host:port` (plain HTTP).
    pub fn registry_addr(&self) -> &str {
        &self.registry_addr
    }

    /// buildkitd's gRPC address (`unix://…`).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Pushes the Docker image `image` to the registry; returns its reference there.
    pub async fn push(&self, image: &str) -> Result<String> {
        let path = image.replace([':', '/'], "-");
        let remote = format!("{}/{path}:bench", self.registry_addr);
        crate::docker_cmd(&["tag", image, &remote]).await?;
        let pushed = crate::docker_cmd(&["push", &remote]).await;
        crate::rmi(&remote).await;
        pushed?;
        Ok(remote)
    }

    /// `buildctl build --local ctx=<ctx> --output type=docker,name=<name> | docker load`.
    /// Returns when both have exited, with the arrival time of the solve's last vertex.
    pub async fn build_docker_load(
        &self,
        def: &protos::pb::Definition,
        ctx: &Path,
        name: &str,
    ) -> Result<SystemTime> {
        let mut build = tokio::process::Command::new(&self.buildctl)
            .arg("--addr")
            .arg(&self.addr)
            .arg("build")
            .arg("--progress=plain")
            .arg("--local")
            .arg(format!("ctx={}", ctx.display()))
            .arg("--output")
            .arg(format!("type=docker,name={name}"))
            // The plain printer's refresh interval (150 ms by default): as fine as it goes.
            .env("TTY_DISPLAY_RATE", "10")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("run buildctl build")?;
        let archive: Stdio = build
            .stdout
            .take()
            .context("buildctl stdout")?
            .try_into()
            .context("pipe buildctl into docker load")?;
        let load = tokio::process::Command::new("docker")
            .arg("load")
            .stdin(archive)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("run docker load")?;
        let mut stdin = build.stdin.take().context("buildctl stdin")?;
        stdin.write_all(&def.encode_to_vec()).await?;
        drop(stdin);
        let stderr = build.stderr.take().context("buildctl stderr")?;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let (mut names, mut done) = (HashMap::new(), HashMap::new());
        let mut log = String::new();
        while let Some(l) = lines.next_line().await? {
            let at = SystemTime::now();
            if let Some((n, rest)) = l.strip_prefix('#').and_then(|r| r.split_once(' ')) {
                if rest == "CACHED" || rest.starts_with("DONE") {
                    done.insert(n.to_string(), at);
                } else {
                    names
                        .entry(n.to_string())
                        .or_insert_with(|| rest.to_string());
                }
            }
            log.push_str(&l);
            log.push('\n');
        }
        let st = build.wait().await?;
        let out = load.wait_with_output().await?;
        ensure!(st.success(), "buildctl build failed ({st}):\n{log}");
        ensure!(
            out.status.success(),
            "docker load failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        done.iter()
            .filter(|(n, _)| {
                !names
                    .get(*n)
                    .is_some_and(|name: &String| name.starts_with("exporting to"))
            })
            .map(|(_, t)| *t)
            .max()
            .with_context(|| format!("no solve vertex finished in buildctl's progress:\n{log}"))
    }

    /// Stops buildkitd (SIGTERM to its PID, so it unmounts its snapshots; SIGKILL after 30 s)
    /// and the registry.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(pid) = self.daemon.id() {
            let _ = tokio::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
            if tokio::time::timeout(Duration::from_secs(30), self.daemon.wait())
                .await
                .is_err()
            {
                let _ = self.daemon.kill().await;
            }
        }
        match self.registry.take() {
            Some(mut r) => tokio::task::block_in_place(|| r.stop()),
            None => Ok(()),
        }
    }
}
