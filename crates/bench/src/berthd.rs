//! A real berthd for the bench: the built binary as a child process (own `--root` and socket,
//! bound to one Docker Engine), driven through its gRPC API by the integration crate's BuildKit
//! client (the protocol path of `buildctl build`: Session with FileSync, Control.Solve, Status,
//! LLBBridge). Also reads and resets the daemon's peak RSS.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context as _, Result};
use integration::buildkit_client::{BuildOptions, BuildkitClient, Output};

/// A running berthd, killed (by its PID, through the child handle) when dropped without
/// [`Berthd::stop`] or [`Berthd::terminate`].
pub struct Berthd {
    child: tokio::process::Child,
    pid: String,
    socket: PathBuf,
    root: PathBuf,
}

/// What one build through berthd showed.
pub struct GrpcBuild {
    /// When the solve's last vertex completed (the daemon's timestamp in the Status stream;
    /// vertices of the exporter excluded).
    pub last_vertex: SystemTime,
    /// Layer bytes the exporter reported sending to Docker (`exporting layers` status total).
    pub bytes_sent: Option<u64>,
    /// Whether the exporter reported layers skipped because Docker had them.
    pub skipped_layers: bool,
}

impl Berthd {
    /// The daemon's gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Starts `bin` on `dir/root` with its socket in `dir`, bound to the Docker Engine at
    /// `docker_host`; returns once the socket accepts connections (≤ 30 s).
    pub async fn start(bin: &Path, dir: &Path, docker_host: &str) -> Result<Self> {
        Self::start_with(bin, dir, docker_host, &[], &[]).await
    }

    /// [`Berthd::start`] with extra flags and environment variables.
    pub async fn start_with(
        bin: &Path,
        dir: &Path,
        docker_host: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("buildkitd.sock");
        let log = std::fs::File::create(dir.join("berthd.log"))?;
        let mut child = tokio::process::Command::new(bin)
            .arg("--addr")
            .arg(format!("unix://{}", socket.display()))
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--docker-host")
            .arg(docker_host)
            .args(args)
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let pid = child.id().context("berthd pid")?.to_string();
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Some(st) = child.try_wait()? {
                bail!(
                    "berthd exited early ({st}); log:\n{}",
                    std::fs::read_to_string(dir.join("berthd.log")).unwrap_or_default()
                );
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("berthd did not answer on {} within 30 s", socket.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Berthd {
            child,
            pid,
            socket,
            root: dir.join("root"),
        })
    }

    /// The daemon's gRPC address (`unix://…`), as `buildctl --addr` takes it.
    pub fn addr(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The daemon's PID.
    pub fn pid(&self) -> &str {
        &self.pid
    }

    /// The daemon's `--root` (its pins are labelled `dev.berth.pin=worker:<root>`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// One build of `def` without exports (solve only); the client's wall time of the build.
    /// With `direct`, the definition goes in `Control.Solve` itself (as `buildctl build` sends
    /// LLB) instead of through the gateway.
    pub async fn timed_solve_via(
        &self,
        def: protos::pb::Definition,
        direct: bool,
    ) -> Result<Duration> {
        let t = Instant::now();
        let client = BuildkitClient::connect_unix(&self.socket).await?;
        let report = client
            .build(BuildOptions {
                definition: Some(def),
                direct,
                ..Default::default()
            })
            .await
            .context("build through berthd's gRPC API")?;
        let took = t.elapsed();
        if let Err(e) = &report.solve {
            bail!("berthd: Control.Solve failed: {e}");
        }
        Ok(took)
    }

    /// Starts a build of `def` (no exports) in a task of its own; aborting the task drops the
    /// client's calls, which cancels the build.
    pub fn spawn_solve(&self, def: protos::pb::Definition) -> tokio::task::JoinHandle<()> {
        let socket = self.socket.clone();
        tokio::spawn(async move {
            match BuildkitClient::connect_unix(&socket).await {
                Ok(client) => {
                    let _ = client
                        .build(BuildOptions {
                            definition: Some(def),
                            ..Default::default()
                        })
                        .await;
                }
                Err(e) => eprintln!("holder build: {e}"),
            }
        })
    }

    /// Resets the daemon's peak RSS (`VmHWM`) to its current RSS.
    pub fn reset_peak_rss(&self) -> Result<()> {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5")
            .context("reset berthd's VmHWM via /proc/PID/clear_refs")
    }

    /// Stops the daemon with SIGTERM (it flushes its trace exporter) and waits up to 30 s.
    pub async fn terminate(mut self) -> Result<()> {
        let st = tokio::process::Command::new("kill")
            .args(["-TERM", &self.pid])
            .status()
            .await
            .context("run kill -TERM")?;
        ensure!(st.success(), "kill -TERM {} failed", self.pid);
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(st) => {
                let st = st?;
                ensure!(st.success(), "berthd exited with {st} on SIGTERM");
                Ok(())
            }
            Err(_) => bail!("berthd did not exit within 30 s of SIGTERM"),
        }
    }

    /// One `--output type=image,name=<name>` build of `def` with `--local ctx=<ctx>`, the
    /// client sending `metadata` with every call; the client's wall time of the whole build.
    pub async fn timed_build(
        &self,
        def: protos::pb::Definition,
        ctx: &Path,
        name: &str,
        metadata: &[(String, String)],
    ) -> Result<Duration> {
        self.timed_build_via(def, ctx, name, metadata, false).await
    }

    /// [`Berthd::timed_build`], with `direct`: the definition in `Control.Solve` itself (as
    /// `buildctl build` sends LLB) instead of through the gateway.
    pub async fn timed_build_via(
        &self,
        def: protos::pb::Definition,
        ctx: &Path,
        name: &str,
        metadata: &[(String, String)],
        direct: bool,
    ) -> Result<Duration> {
        let t = Instant::now();
        let client = BuildkitClient::connect_unix(&self.socket).await?;
        let report = client
            .build(BuildOptions {
                definition: Some(def),
                locals: BTreeMap::from([("ctx".to_string(), ctx.to_path_buf())]),
                output: Output::Raw(
                    "image".into(),
                    BTreeMap::from([("name".to_string(), name.to_string())]),
                ),
                metadata: metadata.to_vec(),
                direct,
                ..Default::default()
            })
            .await
            .context("build through berthd's gRPC API")?;
        let took = t.elapsed();
        if let Err(e) = &report.solve {
            bail!("berthd: Control.Solve failed: {e}");
        }
        Ok(took)
    }

    /// Stops the daemon as a service manager would: SIGTERM (it removes its base-image pins and
    /// unmounts), SIGKILL if it has not exited after 20 s; waits for it either way. (Not a
    /// crash: a killed berthd's pins go by themselves, but its mounts stay until its next start.)
    pub async fn stop(mut self) -> Result<()> {
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &self.pid])
            .status()
            .await;
        match tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await {
            Ok(st) => st.map(drop).context("wait for berthd"),
            Err(_) => {
                self.child.kill().await.context("kill berthd")?;
                bail!("berthd did not exit within 20 s of SIGTERM and was killed")
            }
        }
    }

    /// Builds `def` with `--local ctx=<ctx>` and `--output type=image,name=<name>` the way
    /// buildctl does, and checks that the solve succeeded.
    pub async fn build_image(
        &self,
        def: protos::pb::Definition,
        ctx: &Path,
        name: &str,
    ) -> Result<GrpcBuild> {
        let client = BuildkitClient::connect_unix(&self.socket).await?;
        let report = client
            .build(BuildOptions {
                definition: Some(def),
                locals: BTreeMap::from([("ctx".to_string(), ctx.to_path_buf())]),
                output: Output::Raw(
                    "image".into(),
                    BTreeMap::from([("name".to_string(), name.to_string())]),
                ),
                ..Default::default()
            })
            .await
            .context("build through berthd's gRPC API")?;
        if let Err(e) = &report.solve {
            bail!("berthd: Control.Solve failed: {e}");
        }
        let vertices = report.vertices();
        let mut last = None;
        for v in vertices.values() {
            if v.name.starts_with("exporting to") {
                continue;
            }
            ensure!(
                v.error.is_empty(),
                "vertex {:?} failed: {}",
                v.name,
                v.error
            );
            let c = v
                .completed
                .as_ref()
                .with_context(|| format!("vertex {:?} never completed", v.name))?;
            let t = SystemTime::UNIX_EPOCH
                + Duration::new(c.seconds.max(0) as u64, c.nanos.max(0) as u32);
            last = last.max(Some(t));
        }
        let last_vertex = last.context("the Status stream showed no solve vertex")?;
        let statuses = report.vertex_statuses();
        let bytes_sent = statuses
            .iter()
            .filter(|s| s.id == "exporting layers" && s.completed.is_some())
            .map(|s| s.total.max(0) as u64)
            .next_back();
        let skipped_layers = statuses.iter().any(|s| s.id.contains("already in Docker"));
        Ok(GrpcBuild {
            last_vertex,
            bytes_sent,
            skipped_layers,
        })
    }
}
