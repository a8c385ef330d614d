//! `berth-image` (run by `make image`): builds the berth container image with berthd itself.
//!
//! 1. Stages the image's root filesystem ([`stage`]: buildkitd = berthd, buildctl, runc, cp,
//!    their shared libraries, a few files and directories; every time set to
//!    `SOURCE_DATE_EPOCH`).
//! 2. Starts the berthd being packaged on a private socket and state directory, bound to the
//!    local Docker Engine.
//! 3. Sends it an LLB program built with the `llb` crate: the staged tree as a `local` source,
//!    returned through the gateway with the image config (entrypoint `buildkitd`, `PATH`, the
//!    `/var/lib/berth` volume, OCI labels), exported with `type=image` under the given tags and
//!    `source-date-epoch`, so the image lands in Docker without `docker build` or `docker load`.
//! 4. Stops berthd with SIGTERM (as `docker stop` would) and removes its state.
//!
//! Needs root (berthd mounts overlayfs) and a Docker Engine.

mod stage;

use anyhow::{bail, Context};
use clap::Parser;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Builds the berth image through berthd.
#[derive(Debug, Parser)]
#[command(name = "berth-image")]
struct Args {
    /// The berthd binary to package (and to build with).
    #[arg(long)]
    berthd: PathBuf,
    /// The buildctl binary to package.
    #[arg(long)]
    buildctl: PathBuf,
    /// The runc binary to package (default: runc on PATH).
    #[arg(long)]
    runc: Option<PathBuf>,
    /// Image names (repeatable), e.g. berth:0.1.0.
    #[arg(long = "tag", required = true)]
    tags: Vec<String>,
    /// Working directory (staged tree, berthd's state and log); recreated.
    #[arg(long)]
    work: PathBuf,
    /// Seconds since the epoch for file times and the image's dates.
    #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0)]
    epoch: i64,
    /// Value of the org.opencontainers.image.revision label.
    #[arg(long, default_value = "")]
    revision: String,
    /// Docker Engine address given to berthd.
    #[arg(
        long,
        env = "DOCKER_HOST",
        default_value = "unix:///var/run/docker.sock"
    )]
    docker_host: String,
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// The image config: what `docker run berth` runs and how it is labelled.
fn image_config(epoch: i64, revision: &str) -> anyhow::Result<Vec<u8>> {
    let created = chrono::DateTime::from_timestamp(epoch, 0)
        .context("SOURCE_DATE_EPOCH out of range")?
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let version = env!("CARGO_PKG_VERSION");
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "created": created,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Entrypoint": ["buildkitd"],
            "WorkingDir": "/",
            "Volumes": { "/var/lib/berth": {} },
            "Labels": {
                "org.opencontainers.image.title": "berth",
                "org.opencontainers.image.description": "berthd as buildkitd: a BuildKit-compatible build daemon on Docker's image store",
                "org.opencontainers.image.version": version,
                "org.opencontainers.image.revision": revision,
                "org.opencontainers.image.source": "https://github.com/berth-build/berth",
                "org.opencontainers.image.licenses": "Apache-2.0",
            },
        },
        "history": [{
            "created": created,
            "created_by": "make image: buildkitd (berthd), buildctl, runc and their shared libraries",
            "comment": "berth-image",
        }],
        "rootfs": { "type": "layers", "diff_ids": [] },
    });
    Ok(serde_json::to_vec(&config)?)
}

/// A berthd child process, stopped with SIGTERM when dropped.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(bin: &Path, work: &Path, docker_host: &str) -> anyhow::Result<(Daemon, String)> {
        let socket = work.join("berthd.sock");
        let log = work.join("berthd.log");
        let child = Command::new(bin)
            .arg("--root")
            .arg(work.join("root"))
            .arg("--addr")
            .arg(format!("unix://{}", socket.display()))
            .arg("--docker-host")
            .arg(docker_host)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let mut d = Daemon { child, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Some(st) = d.child.try_wait()? {
                bail!("berthd exited ({st}) before listening:\n{}", d.log_text());
            }
            if Instant::now() > deadline {
                bail!("berthd did not listen within 60 s:\n{}", d.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok((d, format!("unix://{}", socket.display())))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait()? {
                if !st.success() {
                    bail!(
                        "berthd exited with {st} after SIGTERM:\n{}",
                        self.log_text()
                    );
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("berthd did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.stop();
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !rustix::process::geteuid().is_root() {
        bail!("make image needs root: it runs berthd, which mounts overlayfs");
    }
    let runc = match &args.runc {
        Some(p) => p.clone(),
        None => find_on_path("runc").context(
            "runc not found on PATH: install it (Debian: apt-get install runc) or pass --runc",
        )?,
    };
    if args.work.exists() {
        std::fs::remove_dir_all(&args.work)
            .with_context(|| format!("remove {}", args.work.display()))?;
    }
    std::fs::create_dir_all(&args.work)?;
    let rootfs = args.work.join("rootfs");
    let staged = stage::stage(
        &rootfs,
        &[
            stage::Binary {
                source: args.berthd.clone(),
                dest: "/usr/bin/buildkitd",
                strip: true,
            },
            stage::Binary {
                source: args.buildctl.clone(),
                dest: "/usr/bin/buildctl",
                strip: true,
            },
            stage::Binary {
                source: runc,
                dest: "/usr/bin/runc",
                strip: false,
            },
            // The worker seeds cache mounts from another state with `cp -a`.
            stage::Binary {
                source: find_on_path("cp").context("cp (coreutils) not found on PATH")?,
                dest: "/usr/bin/cp",
                strip: false,
            },
        ],
        args.epoch,
    )?;
    eprintln!(
        "staged {}: {} and {}",
        rootfs.display(),
        staged.binaries.join(", "),
        staged.libraries.join(", ")
    );

    let definition = llb::local("rootfs")
        .shared_key_hint("berth-image-rootfs")
        .state()
        .custom_name("berth image root filesystem")
        .marshal()?;
    let (mut daemon, addr) = Daemon::start(&args.berthd, &args.work, &args.docker_host)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let target = buildctl::Target::new(
        &addr,
        &buildctl::TlsFlags::default(),
        Duration::from_secs(10),
    )?;
    let attrs = BTreeMap::from([
        ("name".to_string(), args.tags.join(",")),
        ("source-date-epoch".to_string(), args.epoch.to_string()),
    ]);
    let built = rt.block_on(buildctl::solve(
        &target,
        buildctl::SolveOptions {
            definition: Some(definition),
            locals: BTreeMap::from([("rootfs".to_string(), rootfs.clone())]),
            output: Some(("image".to_string(), attrs)),
            image_config: Some(image_config(args.epoch, &args.revision)?),
            ..Default::default()
        },
    ));
    let stopped = daemon.stop();
    let response = match built {
        Ok(r) => r,
        Err(e) => {
            eprintln!("berthd log:\n{}", daemon.log_text());
            return Err(e.context("build the image through berthd"));
        }
    };
    stopped?;
    std::fs::remove_dir_all(args.work.join("root"))
        .with_context(|| format!("remove berthd's state {}", args.work.display()))?;
    println!(
        "built {} (image ID {})",
        args.tags.join(", "),
        response
            .get("containerimage.config.digest")
            .map(String::as_str)
            .unwrap_or("?")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_runs_buildkitd() {
        let c: serde_json::Value =
            serde_json::from_slice(&image_config(1700000000, "abc").unwrap()).unwrap();
        assert_eq!(c["config"]["Entrypoint"], serde_json::json!(["buildkitd"]));
        assert_eq!(c["created"], "2023-11-14T22:13:20Z");
        assert_eq!(
            c["config"]["Labels"]["org.opencontainers.image.revision"],
            "abc"
        );
        assert!(c["config"]["Volumes"]["/var/lib/berth"].is_object());
    }
}
