//! [`Registry`]: Debian's `docker-registry` (distribution 2.8) on a free loopback port.
//!
//! Its temp dir holds `config.yml`, `storage/` (the filesystem driver's root) and
//! `registry.log`. It listens on `127.0.0.1` only, which Docker treats as an insecure (plain
//! HTTP) registry by default, so `docker push 127.0.0.1:PORT/...` works without configuration.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use tempfile::TempDir;

use crate::http::{http_get, HttpResponse};
use crate::process::{log_tail, terminate};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running local registry, stopped (by PID) and deleted on drop.
#[derive(Debug)]
pub struct Registry {
    dir: TempDir,
    child: Option<Child>,
    addr: String,
    /// The network namespace it listens in (`None`: the test's own).
    netns: Option<PathBuf>,
}

/// Runs `f` on a thread that joined the network namespace `netns` (a `/proc/<pid>/ns/net`
/// path): sockets it opens live there. Without `netns`, runs `f` here.
pub(crate) fn in_netns<T: Send>(
    netns: Option<&Path>,
    f: impl FnOnce() -> Result<T> + Send,
) -> Result<T> {
    let Some(netns) = netns else { return f() };
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(netns)
                    .with_context(|| format!("opening {}", netns.display()))?;
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("joining network namespace {}", netns.display()))?;
                f()
            })
            .join()
            .map_err(|_| anyhow!("network namespace thread panicked"))?
    })
}

impl Registry {
    /// Starts a registry with empty storage and waits until `GET /v2/` answers 200.
    ///
    /// Panics when `/usr/bin/docker-registry` (package `docker-registry`) is missing.
    pub fn start() -> Result<Self> {
        Self::start_in(None, None)
    }

    /// Like [`Registry::start`], with `auth: htpasswd` (Basic auth, realm `berth-registry`):
    /// `htpasswd` is the file's content, `user:$2y$…` lines (bcrypt, which is all distribution
    /// accepts). Requests without valid credentials get 401.
    pub fn start_with_htpasswd(htpasswd: &str) -> Result<Self> {
        Self::start_in(None, Some(htpasswd))
    }

    /// Like [`Registry::start`], listening on `127.0.0.1` of another network namespace (e.g.
    /// a [`crate::PrivateDockerd`]'s, [`crate::PrivateDockerd::netns`], whose loopback is
    /// brought up first), so that daemon can push to it. [`Registry::get`] and friends query
    /// it from that namespace.
    pub fn start_in_netns(netns: &Path) -> Result<Self> {
        let up = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(["--", "ip", "link", "set", "lo", "up"])
            .output()
            .context("running nsenter ip link set lo up")?;
        if !up.status.success() {
            bail!(
                "bringing up lo in {}: {}",
                netns.display(),
                String::from_utf8_lossy(&up.stderr)
            );
        }
        Self::start_in(Some(netns.to_path_buf()), None)
    }

    fn start_in(netns: Option<PathBuf>, htpasswd: Option<&str>) -> Result<Self> {
        let binary = crate::require_tool(REGISTRY_BIN, "docker-registry");
        let dir = tempfile::Builder::new()
            .prefix(&format!("berth-registry-{}-", std::process::id()))
            .tempdir()
            .context("creating registry temp dir")?;
        std::fs::create_dir(dir.path().join("storage"))?;
        if let Some(h) = htpasswd {
            std::fs::write(dir.path().join("htpasswd"), h)?;
        }
        let mut last_error = None;
        // The port is picked by binding :0 and released before the registry binds it; another
        // process could take it in between, so a start that fails early is retried on a new port.
        for _ in 0..5 {
            let port = in_netns(netns.as_deref(), free_port)?;
            match Self::launch(
                &binary,
                dir.path(),
                port,
                netns.as_deref(),
                htpasswd.is_some(),
            ) {
                Ok(child) => {
                    return Ok(Self {
                        dir,
                        child: Some(child),
                        addr: format!("127.0.0.1:{port}"),
                        netns,
                    })
                }
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("registry did not start")))
    }

    fn launch(
        binary: &std::path::Path,
        dir: &std::path::Path,
        port: u16,
        netns: Option<&Path>,
        htpasswd: bool,
    ) -> Result<Child> {
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: text\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
             \x20 maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            storage = dir.join("storage").display(),
        );
        if htpasswd {
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: berth-registry\n    path: {}\n",
                dir.join("htpasswd").display()
            ));
        }
        let config_path = dir.join("config.yml");
        std::fs::write(&config_path, config)?;
        let log = dir.join("registry.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        // nsenter execs the registry in place: the child's PID is the registry's.
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display()))
                    .arg("--")
                    .arg(binary);
                c
            }
            None => Command::new(binary),
        };
        cmd.arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        // Environment variables REGISTRY_* override the config file; ignore the caller's.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(key);
            }
        }
        let mut child = cmd.spawn().context("spawning docker-registry")?;
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match in_netns(netns, || http_get(&addr, "/v2/")) {
                // With htpasswd, an anonymous GET /v2/ answers 401 once the registry is up.
                Ok(r) if r.status == 200 || (htpasswd && r.status == 401) => return Ok(child),
                _ if Instant::now() >= deadline => {
                    let _ = terminate(&mut child, "docker-registry", Duration::from_secs(5));
                    bail!(
                        "registry on {addr} did not answer GET /v2/ within {START_TIMEOUT:?}; \
                         its log:\n{}",
                        log_tail(&log, 8192)
                    );
                }
                _ => {}
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "registry exited during start-up ({status}); its log:\n{}",
                    log_tail(&log, 8192)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `127.0.0.1:PORT`: the registry host to put in image references.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The registry's PID while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The filesystem driver's root directory.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// A blob (`sha256:<hex>`) as the filesystem driver stored it; panics naming the path when
    /// it is not there (tests read what a push must have written).
    pub fn stored_blob(&self, digest: &str) -> Vec<u8> {
        let hex = digest
            .strip_prefix("sha256:")
            .unwrap_or_else(|| panic!("not a sha256 digest: {digest}"));
        let p = self
            .storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data");
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// `GET <path>` on the registry (e.g. `/v2/_catalog`).
    pub fn get(&self, path: &str) -> Result<HttpResponse> {
        in_netns(self.netns.as_deref(), || http_get(&self.addr, path))
    }

    /// The repositories listed by `GET /v2/_catalog`.
    pub fn catalog(&self) -> Result<Vec<String>> {
        let response = self.get("/v2/_catalog")?;
        string_list(&response, "repositories")
    }

    /// The tags listed by `GET /v2/<repo>/tags/list`.
    pub fn tags(&self, repo: &str) -> Result<Vec<String>> {
        let response = self.get(&format!("/v2/{repo}/tags/list"))?;
        string_list(&response, "tags")
    }

    /// The last 64 KiB of the registry's log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.dir.path().join("registry.log"), 64 * 1024)
    }

    /// Stops the registry (SIGTERM, then SIGKILL after 10 s). Idempotent.
    pub fn stop(&mut self) -> Result<()> {
        match self.child.take() {
            Some(mut child) => {
                terminate(&mut child, "docker-registry", Duration::from_secs(10)).map(|_| ())
            }
            None => Ok(()),
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            eprintln!("integration: stopping registry: {err:#}");
        }
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// `body[key]` as a list of strings (`null` is an empty list), requiring HTTP 200.
fn string_list(response: &HttpResponse, key: &str) -> Result<Vec<String>> {
    if response.status != 200 {
        bail!(
            "registry answered HTTP {}: {}",
            response.status,
            response.text()
        );
    }
    let json = response.json()?;
    match &json[key] {
        serde_json::Value::Null => Ok(Vec::new()),
        serde_json::Value::Array(items) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("non-string in {key}: {v}"))
            })
            .collect(),
        other => bail!("registry answer has {key} = {other}, not a list"),
    }
}
