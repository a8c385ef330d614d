//! A BuildKit client for end-to-end tests, following the protocol path of `buildctl build`.
//!
//! [`Berthd`] runs the daemon binary as a child process (temporary `--root` and unix socket; killed
//! in `Drop`). [`BuildkitClient`] talks to it like buildctl v0.11.6 does: `ListWorkers`, then in
//! parallel `Control.Session` (this side is the HTTP/2 **server** inside the tunnel and serves
//! FileSync, FileSend, Auth, Secrets and Health with the real fsutil packet protocol),
//! `Control.Solve` with an empty definition, `Control.Status`, and `LLBBridge` `Ping`/`Solve`/`Return`
//! tagged with `buildkit-controlapi-buildid`. [`BuildReport`] keeps everything a test wants to assert:
//! the solve outcome, every `StatusResponse`, how the streams ended, and transfer counters.

use anyhow::{bail, Context as _};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use protos::fsutil::types::Packet as WirePacket;
use protos::moby::buildkit::v1 as control;
use protos::moby::buildkit::v1::control_client::ControlClient;
use protos::moby::buildkit::v1::frontend as gw;
use protos::moby::buildkit::v1::frontend::llb_bridge_client::LlbBridgeClient;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// Message size limit used by the client (buildctl: 16 MiB; we allow more to test the daemon's limit).
pub const CLIENT_MAX_MESSAGE: usize = 128 << 20;

/// Path of the `berthd` binary: `$BERTHD_BIN` if set, else built (once per test process) with
/// the cargo that runs the tests.
pub fn berthd_binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("BERTHD_BIN") {
        let p = PathBuf::from(p);
        if !p.exists() {
            bail!("BERTHD_BIN={} does not exist", p.display());
        }
        return Ok(p);
    }
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| build_binary("daemon", "berthd").map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Path of berth's `buildctl` (crates/buildctl), built (once per test process) with the cargo
/// that runs the tests.
pub fn buildctl_binary() -> anyhow::Result<PathBuf> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| build_binary("buildctl", "buildctl").map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build_binary(package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-q", "-p", package, "--bin", bin])
        .current_dir(&root)
        .status()
        .with_context(|| format!("run cargo build for {bin}"))?;
    if !status.success() {
        bail!("building {bin} failed: {status}");
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let path = target.join("debug").join(bin);
    if !path.exists() {
        bail!("{bin} binary not found at {}", path.display());
    }
    Ok(path)
}

/// A berthd child process with its own root and socket.
pub struct Berthd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    socket: PathBuf,
    root: PathBuf,
    log: PathBuf,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Berthd {
    /// Starts berthd and waits until its socket answers (≤ 15 s).
    pub fn start(extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_env(extra_args, &[])
    }

    /// Like [`Berthd::start`], with extra environment variables for the daemon (also on
    /// [`Berthd::restart`] unless changed with [`Berthd::set_env`]).
    pub fn start_with_env(extra_args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("berthd-test-").tempdir()?;
        let socket = dir.path().join("run").join("buildkitd.sock");
        let root = dir.path().join("root");
        let log = dir.path().join("berthd.log");
        let mut d = Berthd {
            child: None,
            dir,
            socket,
            root,
            log,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        d.spawn()?;
        Ok(d)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = berthd_binary()?;
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(bin);
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--addr")
            .arg(format!("unix://{}", self.socket.display()))
            .arg("--debug")
            .args(&self.extra_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        let child = cmd.spawn().context("spawn berthd")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!("berthd exited early ({st}); log:\n{}", self.log_text());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "berthd did not answer on {} within 15 s; log:\n{}",
                    self.socket.display(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The `--root` directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A scratch directory that lives as long as the daemon.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The child's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends SIGTERM and waits for exit (≤ `timeout`); returns the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("berthd not running")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "berthd did not exit within {timeout:?} after SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Replaces the extra environment used by the next [`Berthd::restart`].
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// Waits (≤ `timeout`) for the daemon to exit by itself; returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let child = self.child.as_mut().context("berthd not running")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait()? {
                self.child = None;
                return Ok(st);
            }
            if Instant::now() > deadline {
                bail!("berthd still runs after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGKILL (a real `kill -9`) and reaps the process.
    pub fn kill(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("berthd not running")?;
        let _ = child.kill();
        Ok(child.wait()?)
    }

    /// Restarts the daemon on the same root and socket.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            self.terminate(Duration::from_secs(10))?;
        }
        self.spawn()
    }

    /// A client connected to this daemon.
    pub async fn client(&self) -> anyhow::Result<BuildkitClient> {
        BuildkitClient::connect_unix(&self.socket).await
    }
}

/// How long a dropped [`Berthd`] gets to stop after SIGTERM before it is killed.
const DROP_GRACE: Duration = Duration::from_secs(10);

impl Drop for Berthd {
    /// Stops berthd as a service manager would (SIGTERM, so it removes its pins, unmounts and
    /// closes its stores; SIGKILL after [`DROP_GRACE`]): a test that means a crash calls
    /// [`Berthd::kill`].
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Err(e) = crate::process::terminate(&mut c, "berthd", DROP_GRACE) {
                eprintln!("stopping berthd at drop: {e:#}");
            }
        }
    }
}

/// A random 25-character id (like buildctl's refs and session ids).
pub fn new_id() -> String {
    use rand::Rng;
    const A: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut r = rand::thread_rng();
    (0..25).map(|_| A[r.gen_range(0..36)] as char).collect()
}

/// A connection to a BuildKit-compatible daemon.
#[derive(Clone)]
pub struct BuildkitClient {
    channel: Channel,
}

impl BuildkitClient {
    /// Connects to `unix://path`.
    pub async fn connect_unix(path: &Path) -> anyhow::Result<Self> {
        let path = path.to_path_buf();
        let channel = Endpoint::try_from("http://localhost")?
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .context("connect to the daemon socket")?;
        Ok(BuildkitClient { channel })
    }

    /// A Control client.
    pub fn control(&self) -> ControlClient<Channel> {
        ControlClient::new(self.channel.clone())
            .max_decoding_message_size(CLIENT_MAX_MESSAGE)
            .max_encoding_message_size(CLIENT_MAX_MESSAGE)
    }

    /// An LLBBridge client.
    pub fn gateway(&self) -> LlbBridgeClient<Channel> {
        LlbBridgeClient::new(self.channel.clone())
            .max_decoding_message_size(CLIENT_MAX_MESSAGE)
            .max_encoding_message_size(CLIENT_MAX_MESSAGE)
    }

    /// Opens a session serving `attach`; the returned handle closes it like buildctl does.
    pub async fn open_session(&self, attach: Attachables) -> anyhow::Result<SessionHandle> {
        let id = new_id();
        let (tx, rx) = mpsc::channel::<control::BytesMessage>(32);
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        let md = req.metadata_mut();
        md.insert("x-docker-expose-session-uuid", id.parse()?);
        md.insert("x-docker-expose-session-name", "berth-test".parse()?);
        md.insert(
            "x-docker-expose-session-sharedkey",
            attach.shared_key.parse()?,
        );
        for m in attach.methods() {
            md.append("x-docker-expose-session-grpc-method", m.parse()?);
        }
        let resp = self
            .control()
            .session(req)
            .await
            .context("Control.Session")?;
        let inbound = resp.into_inner();
        let (server_io, pipe) = tokio::io::duplex(256 * 1024);
        let (mut pipe_r, mut pipe_w) = tokio::io::split(pipe);
        // daemon -> pipe
        let ended_ok = Arc::new(Mutex::new(None::<bool>));
        let in_task = {
            let ended_ok = ended_ok.clone();
            tokio::spawn(async move {
                let mut inbound = inbound;
                let mut ok = true;
                while let Some(m) = inbound.next().await {
                    match m {
                        Ok(m) => {
                            if pipe_w.write_all(&m.data).await.is_err() {
                                break;
                            }
                        }
                        Err(_) => {
                            ok = false;
                            break;
                        }
                    }
                }
                *ended_ok.lock().unwrap() = Some(ok);
                let _ = pipe_w.shutdown().await;
            })
        };
        // pipe -> daemon
        let out_tx = tx.clone();
        let out_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match pipe_r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if out_tx
                            .send(control::BytesMessage {
                                data: Bytes::copy_from_slice(&buf[..n]),
                            })
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
        });
        let state = Arc::new(attach);
        let svc = SessionServer {
            state: state.clone(),
        };
        let server_task = tokio::spawn(async move {
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .max_frame_size(1 << 20)
                .serve_connection(
                    hyper_util::rt::TokioIo::new(server_io),
                    hyper_util::service::TowerToHyperService::new(svc),
                )
                .await;
        });
        Ok(SessionHandle {
            id,
            tx: Some(tx),
            in_task: Some(in_task),
            out_task: Some(out_task),
            server_task: Some(server_task),
            ended_ok,
            state,
        })
    }

    /// Runs a build the way `buildctl build` does and reports everything observed.
    pub async fn build(&self, opts: BuildOptions) -> anyhow::Result<BuildReport> {
        let workers = self
            .control()
            .list_workers(control::ListWorkersRequest::default())
            .await?
            .into_inner();
        if workers.record.is_empty() {
            bail!("ListWorkers returned no worker");
        }
        let attach = Attachables {
            locals: opts.locals.clone(),
            output: opts.output.clone(),
            secrets: opts.secrets.clone(),
            ssh_agents: opts.ssh_agents.clone(),
            registry_auth: opts.registry_auth.clone(),
            shared_key: String::new(),
            content_stores: opts.content_stores.clone(),
            content_writes: opts.content_writes.clone(),
            ..Default::default()
        };
        let mut session = self.open_session(attach).await?;
        let build_ref = new_id();
        let (exporter, exporter_attrs) = match &opts.output {
            Output::None => (String::new(), BTreeMap::new()),
            Output::Local(_) => ("local".to_string(), BTreeMap::new()),
            Output::Tar(_) => ("tar".to_string(), BTreeMap::new()),
            Output::Docker(_, a) => ("docker".to_string(), a.clone()),
            Output::Oci(_, a) => ("oci".to_string(), a.clone()),
            Output::Raw(t, a) | Output::Declined(t, a) => (t.clone(), a.clone()),
        };
        #[allow(deprecated)]
        let solve_req = control::SolveRequest {
            r#ref: build_ref.clone(),
            session: session.id.clone(),
            exporter_deprecated: exporter,
            exporter_attrs_deprecated: exporter_attrs,
            frontend_attrs: opts.frontend_attrs.clone(),
            definition: if opts.direct {
                opts.definition.clone()
            } else {
                None
            },
            cache: (!opts.cache_exports.is_empty()).then(|| control::CacheOptions {
                exports: opts.cache_exports.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let started = Instant::now();
        let mut control = self.control();
        let md = opts.metadata.clone();
        let solve = tokio::spawn(async move {
            let r = control
                .solve(with_metadata(tonic::Request::new(solve_req), &md))
                .await
                .map(|r| r.into_inner());
            (r, Instant::now())
        });
        let mut status_client = self.control();
        let status_ref = build_ref.clone();
        let md = opts.metadata.clone();
        let status = tokio::spawn(async move {
            let mut out = Vec::new();
            let stream = status_client
                .status(with_metadata(
                    tonic::Request::new(control::StatusRequest { r#ref: status_ref }),
                    &md,
                ))
                .await;
            let mut stream = match stream {
                Ok(s) => s.into_inner(),
                Err(e) => return (out, Err(e), Instant::now()),
            };
            loop {
                match stream.next().await {
                    Some(Ok(m)) => out.push(m),
                    Some(Err(e)) => return (out, Err(e), Instant::now()),
                    None => return (out, Ok(()), Instant::now()),
                }
            }
        });
        // gateway: Ping, Solve, Return
        let mut g = self.gateway();
        let md = &opts.metadata;
        let pong = if opts.direct {
            Err(tonic::Status::failed_precondition(
                "direct solve: no gateway calls",
            ))
        } else {
            g.ping(with_metadata(
                with_build_id(gw::PingRequest {}, &build_ref),
                md,
            ))
            .await
            .map(|r| r.into_inner())
        };
        let gw_solve = match &pong {
            Ok(_) => {
                let req = gw::SolveRequest {
                    definition: opts.definition.clone(),
                    frontend: opts.frontend.clone().unwrap_or_default(),
                    // a gateway client (buildx) sends the frontend's options with the call
                    frontend_opt: if opts.frontend.is_some() {
                        opts.frontend_attrs.clone()
                    } else {
                        Default::default()
                    },
                    allow_result_return: true,
                    allow_result_array_ref: true,
                    // Solved at once, so a failing definition fails this call (what the tests
                    // check); without it the daemon solves lazily, on first use of the ref.
                    evaluate: true,
                    cache_imports: opts
                        .cache_imports
                        .iter()
                        .map(|e| gw::CacheOptionsEntry {
                            r#type: e.r#type.clone(),
                            attrs: e.attrs.clone(),
                        })
                        .collect(),
                    ..Default::default()
                };
                Some(
                    g.solve(with_metadata(with_build_id(req, &build_ref), md))
                        .await
                        .map(|r| r.into_inner()),
                )
            }
            Err(_) => None,
        };
        let ret = match &gw_solve {
            Some(Ok(res)) => ReturnRequest::Result(res.result.clone().unwrap_or_default()),
            Some(Err(st)) => ReturnRequest::Error(st.clone()),
            None => ReturnRequest::Error(tonic::Status::unavailable("ping failed")),
        };
        let return_req = match ret {
            ReturnRequest::Result(r) => gw::ReturnRequest {
                result: Some(r),
                error: None,
            },
            ReturnRequest::Error(st) => gw::ReturnRequest {
                result: None,
                error: Some(protos::google::rpc::Status {
                    code: st.code() as i32,
                    message: st.message().to_string(),
                    // a Go client returns the error with its typed details (grpcerrors)
                    details: <protos::google::rpc::Status as prost::Message>::decode(st.details())
                        .map(|s| s.details)
                        .unwrap_or_default(),
                }),
            },
        };
        let gw_return = if pong.is_ok() {
            Some(
                g.r#return(with_metadata(with_build_id(return_req, &build_ref), md))
                    .await
                    .map(|r| r.into_inner()),
            )
        } else {
            None
        };
        let (solve_result, solve_done) = solve.await?;
        // buildctl cancels Status 3 s after Solve returns
        let status_res = tokio::time::timeout(Duration::from_secs(3), status).await;
        let (statuses, status_end, status_done) = match status_res {
            Ok(r) => r?,
            Err(_) => (
                vec![],
                Err(tonic::Status::deadline_exceeded(
                    "Status did not end within 3 s after Solve",
                )),
                Instant::now(),
            ),
        };
        let session_closed_ok = session.close(Duration::from_secs(5)).await;
        let exporter_md = session.state.exporter_md.lock().unwrap().clone();
        Ok(BuildReport {
            build_ref,
            pong,
            gateway_solve: gw_solve,
            gateway_return: gw_return,
            solve: solve_result,
            statuses,
            status_end,
            status_lag: status_done.saturating_duration_since(solve_done),
            solve_duration: solve_done.duration_since(started),
            session_closed_ok,
            file_sync_bytes: session.state.file_sync_bytes.load(Ordering::Relaxed),
            file_sync_requests: session.state.file_sync_requests.load(Ordering::Relaxed),
            exporter_md,
        })
    }
}

/// A request tagged with `buildkit-controlapi-buildid`.
pub fn with_build_id<T>(m: T, build_ref: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut().insert(
        "buildkit-controlapi-buildid",
        build_ref.parse().expect("ascii build ref"),
    );
    r
}

/// `r` with `md` added to its metadata (keys must be lowercase ASCII, values ASCII).
pub fn with_metadata<T>(mut r: tonic::Request<T>, md: &[(String, String)]) -> tonic::Request<T> {
    for (k, v) in md {
        let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes()).expect("metadata key");
        r.metadata_mut()
            .insert(key, v.parse().expect("ascii metadata value"));
    }
    r
}

enum ReturnRequest {
    Result(gw::Result),
    Error(tonic::Status),
}

/// Where the build output goes.
#[derive(Debug, Clone, Default)]
pub enum Output {
    /// No exporter.
    #[default]
    None,
    /// `--output type=local,dest=DIR`.
    Local(PathBuf),
    /// `--output type=tar,dest=FILE`.
    Tar(PathBuf),
    /// `--output type=docker,dest=FILE` with these attributes (e.g. `name`).
    Docker(PathBuf, BTreeMap<String, String>),
    /// `--output type=oci,dest=FILE` with these attributes (e.g. `name`, `compression`).
    Oci(PathBuf, BTreeMap<String, String>),
    /// Any exporter type and attributes (no client-side target).
    Raw(String, BTreeMap<String, String>),
    /// An exporter type and attributes whose client-side file target declines the stream with
    /// `AlreadyExists`, as BuildKit's client does when its output callback returns no writer.
    Declined(String, BTreeMap<String, String>),
}

/// What to build.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// LLB (sent through `LLBBridge.Solve`, or in `Control.Solve` itself with `direct`).
    pub definition: Option<protos::pb::Definition>,
    /// Send `definition` in `Control.Solve` itself, as `buildctl build` does with LLB on stdin,
    /// instead of through the gateway (`LLBBridge` `Ping`/`Solve`/`Return`, as BuildKit's Go
    /// client's `Build` and buildx do). The report's gateway fields are then absent.
    pub direct: bool,
    /// Frontend name instead of LLB.
    pub frontend: Option<String>,
    /// `--local name=dir`.
    pub locals: BTreeMap<String, PathBuf>,
    /// `--output`.
    pub output: Output,
    /// `--secret id=...`.
    pub secrets: BTreeMap<String, Vec<u8>>,
    /// `--ssh id=SOCKET`: agent id → path of a running ssh-agent's socket.
    pub ssh_agents: BTreeMap<String, PathBuf>,
    /// `--opt` values.
    pub frontend_attrs: BTreeMap<String, String>,
    /// gRPC metadata sent with every call of the build (e.g. W3C `traceparent`, as buildctl
    /// sends it under a traced context).
    pub metadata: Vec<(String, String)>,
    /// `--export-cache` entries (`Control.Solve`'s `Cache.Exports`).
    pub cache_exports: Vec<control::CacheOptionsEntry>,
    /// `--import-cache` entries, sent with the `LLBBridge.Solve` of the definition (as BuildKit's
    /// Go client and frontends pass them).
    pub cache_imports: Vec<control::CacheOptionsEntry>,
    /// Registry credentials the session's `Auth.Credentials` gives: host → (username, secret),
    /// as buildctl answers from the Docker config's `auths`.
    pub registry_auth: BTreeMap<String, (String, String)>,
    /// Content stores the session serves (see [`Attachables::content_stores`]).
    pub content_stores: BTreeMap<String, PathBuf>,
    /// Filled with the blobs committed into those stores (see [`Attachables::content_writes`]).
    pub content_writes: Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

/// A `dockerfile.v0` build of `dir` (both the `context` and the `dockerfile` local) with the
/// frontend attributes `attrs` and `output`, through a fresh client of `berthd`.
pub async fn dockerfile_build(
    berthd: &Berthd,
    dir: &std::path::Path,
    attrs: &[(&str, &str)],
    output: Output,
) -> BuildReport {
    let client = berthd.client().await.expect("connect to berthd");
    let locals = BTreeMap::from([
        ("context".to_string(), dir.to_path_buf()),
        ("dockerfile".to_string(), dir.to_path_buf()),
    ]);
    client
        .build(BuildOptions {
            frontend: Some("dockerfile.v0".into()),
            frontend_attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            locals,
            output,
            ..Default::default()
        })
        .await
        .expect("build through berthd")
}

/// Everything observed during one build.
#[derive(Debug)]
pub struct BuildReport {
    /// The build ref.
    pub build_ref: String,
    /// `LLBBridge.Ping`.
    pub pong: Result<gw::PongResponse, tonic::Status>,
    /// `LLBBridge.Solve` (absent if Ping failed).
    pub gateway_solve: Option<Result<gw::SolveResponse, tonic::Status>>,
    /// `LLBBridge.Return` (absent if Ping failed).
    pub gateway_return: Option<Result<gw::ReturnResponse, tonic::Status>>,
    /// `Control.Solve`.
    pub solve: Result<control::SolveResponse, tonic::Status>,
    /// Every `StatusResponse`.
    pub statuses: Vec<control::StatusResponse>,
    /// How the Status stream ended (`Ok` = EOF with OK).
    pub status_end: Result<(), tonic::Status>,
    /// Time from Solve returning to Status ending.
    pub status_lag: Duration,
    /// Time Solve took.
    pub solve_duration: Duration,
    /// Whether the daemon ended the Session with OK after we half-closed.
    pub session_closed_ok: bool,
    /// Content bytes the client's FileSync sent.
    pub file_sync_bytes: u64,
    /// Files the daemon requested from FileSync.
    pub file_sync_requests: u64,
    /// The `exporter-md-*` headers of the daemon's FileSend stream (prefix stripped).
    pub exporter_md: BTreeMap<String, String>,
}

impl BuildReport {
    /// The last state of every vertex.
    pub fn vertices(&self) -> BTreeMap<String, control::Vertex> {
        let mut m = BTreeMap::new();
        for r in &self.statuses {
            for v in &r.vertexes {
                m.insert(v.digest.clone(), v.clone());
            }
        }
        m
    }

    /// Every status update.
    pub fn vertex_statuses(&self) -> Vec<control::VertexStatus> {
        self.statuses
            .iter()
            .flat_map(|r| r.statuses.iter().cloned())
            .collect()
    }
}

/// What the client side of a session serves.
#[derive(Debug, Clone, Default)]
pub struct Attachables {
    /// `--local` directories.
    pub locals: BTreeMap<String, PathBuf>,
    /// The output target.
    pub output: Output,
    /// Secrets.
    pub secrets: BTreeMap<String, Vec<u8>>,
    /// SSH agents (id → agent socket), served through `SSH/CheckAgent` and `SSH/ForwardAgent`.
    pub ssh_agents: BTreeMap<String, PathBuf>,
    /// Registry credentials (host → (username, secret)) served through `Auth/Credentials`;
    /// other hosts get empty credentials (anonymous).
    pub registry_auth: BTreeMap<String, (String, String)>,
    /// `x-docker-expose-session-sharedkey`.
    pub shared_key: String,
    /// Content bytes FileSync sent (filled in while the session runs).
    pub file_sync_bytes: Arc<AtomicU64>,
    /// Files the daemon requested through FileSync (filled in while the session runs).
    pub file_sync_requests: Arc<AtomicU64>,
    /// The `exporter-md-*` headers of the daemon's FileSend stream, prefix stripped.
    pub exporter_md: Arc<std::sync::Mutex<BTreeMap<String, String>>>,
    /// Content stores served through `containerd.services.content.v1.Content` (`Info`, `Read`,
    /// `Write`), by store id (`export` for an `oci`/`docker` output directory, `oci:NAME` for
    /// `oci-layout://` sources, `local:DIR` for `type=local` caches): each an OCI layout
    /// directory whose blobs are `blobs/sha256/<hex>`, as BuildKit's client keeps them.
    pub content_stores: BTreeMap<String, PathBuf>,
    /// The blobs committed into [`Attachables::content_stores`], in order: (store id, digest).
    pub content_writes: Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

impl Attachables {
    fn record_exporter_md(&self, headers: &http::HeaderMap) {
        let mut md = self.exporter_md.lock().unwrap();
        for (k, v) in headers {
            if let Some(k) = k.as_str().strip_prefix("exporter-md-") {
                md.insert(k.to_string(), v.to_str().unwrap_or_default().to_string());
            }
        }
    }

    fn methods(&self) -> Vec<&'static str> {
        let mut m = vec![
            "/grpc.health.v1.Health/Check",
            "/moby.filesync.v1.Auth/Credentials",
            "/moby.filesync.v1.Auth/FetchToken",
            "/moby.filesync.v1.Auth/GetTokenAuthority",
            "/moby.filesync.v1.Auth/VerifyTokenAuthority",
        ];
        if !self.locals.is_empty() {
            m.push("/moby.filesync.v1.FileSync/DiffCopy");
            m.push("/moby.filesync.v1.FileSync/TarStream");
        }
        if matches!(
            self.output,
            Output::Local(_)
                | Output::Tar(_)
                | Output::Docker(..)
                | Output::Oci(..)
                | Output::Declined(..)
        ) {
            m.push("/moby.filesync.v1.FileSend/DiffCopy");
        }
        if !self.secrets.is_empty() {
            m.push("/moby.buildkit.secrets.v1.Secrets/GetSecret");
        }
        if !self.ssh_agents.is_empty() {
            m.push("/moby.sshforward.v1.SSH/CheckAgent");
            m.push("/moby.sshforward.v1.SSH/ForwardAgent");
        }
        if !self.content_stores.is_empty() {
            m.push(content::INFO);
            m.push(content::READ);
            m.push(content::WRITE);
        }
        m
    }
}

/// An open session; [`SessionHandle::close`] ends it like buildctl.
pub struct SessionHandle {
    /// Session id.
    pub id: String,
    tx: Option<mpsc::Sender<control::BytesMessage>>,
    in_task: Option<tokio::task::JoinHandle<()>>,
    out_task: Option<tokio::task::JoinHandle<()>>,
    server_task: Option<tokio::task::JoinHandle<()>>,
    ended_ok: Arc<Mutex<Option<bool>>>,
    state: Arc<Attachables>,
}

impl SessionHandle {
    /// Half-closes and waits (≤ `timeout`) for the daemon to end the stream; true if it ended with OK.
    pub async fn close(&mut self, timeout: Duration) -> bool {
        self.tx.take();
        if let Some(t) = self.out_task.take() {
            t.abort();
        }
        let res = match self.in_task.take() {
            Some(t) => tokio::time::timeout(timeout, t).await.is_ok(),
            None => true,
        };
        if let Some(t) = self.server_task.take() {
            t.abort();
        }
        res && self.ended_ok.lock().unwrap().unwrap_or(false)
    }

    /// Drops the session abruptly (no half-close; the RPC is canceled).
    pub fn abort(&mut self) {
        for t in [
            self.in_task.take(),
            self.out_task.take(),
            self.server_task.take(),
        ]
        .into_iter()
        .flatten()
        {
            t.abort();
        }
        self.tx.take();
    }
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        self.abort();
    }
}

/// The HTTP/2 service inside the tunnel.
#[derive(Clone)]
struct SessionServer {
    state: Arc<Attachables>,
}

type BoxBodyStream<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send + 'static>>;

macro_rules! streaming_svc {
    ($name:ident, $field:ty, $req:ty, $resp:ty, $f:ident) => {
        struct $name($field);
        impl tonic::server::StreamingService<$req> for $name {
            type Response = $resp;
            type ResponseStream = BoxBodyStream<$resp>;
            type Future = Pin<
                Box<
                    dyn std::future::Future<
                            Output = Result<tonic::Response<Self::ResponseStream>, tonic::Status>,
                        > + Send,
                >,
            >;
            fn call(&mut self, request: tonic::Request<tonic::Streaming<$req>>) -> Self::Future {
                Box::pin($f(self.0.clone(), request))
            }
        }
    };
}

streaming_svc!(
    FileSyncSvc,
    Arc<Attachables>,
    WirePacket,
    WirePacket,
    file_sync
);
streaming_svc!(
    FileReceiveSvc,
    PathBuf,
    WirePacket,
    WirePacket,
    file_receive
);
streaming_svc!(
    SshForwardSvc,
    Arc<Attachables>,
    protos::moby::sshforward::v1::BytesMessage,
    protos::moby::sshforward::v1::BytesMessage,
    ssh_forward
);
streaming_svc!(
    FileWriteSvc,
    PathBuf,
    protos::moby::filesync::v1::BytesMessage,
    protos::moby::filesync::v1::BytesMessage,
    file_write
);

struct Unary<F>(F);

impl<Req, Resp, F, Fut> tonic::server::UnaryService<Req> for Unary<F>
where
    F: Fn(tonic::Request<Req>) -> Fut + Clone + Send + 'static,
    Fut:
        std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>> + Send + 'static,
    Req: Send + 'static,
    Resp: Send + 'static,
{
    type Response = Resp;
    type Future = Pin<
        Box<dyn std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>> + Send>,
    >;

    fn call(&mut self, request: tonic::Request<Req>) -> Self::Future {
        Box::pin((self.0)(request))
    }
}

fn md_values(md: &tonic::metadata::MetadataMap, key: &str) -> Vec<String> {
    md.get_all(key)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_string)
        .collect()
}

impl tower::Service<http::Request<hyper::body::Incoming>> for SessionServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<hyper::body::Incoming>) -> Self::Future {
        let state = self.state.clone();
        let req = req.map(tonic::body::Body::new);
        Box::pin(async move {
            let path = req.uri().path().to_string();
            let resp = match path.as_str() {
                "/grpc.health.v1.Health/Check" => {
                    let codec: tonic_prost::ProstCodec<
                        protos::grpc::health::v1::HealthCheckResponse,
                        protos::grpc::health::v1::HealthCheckRequest,
                    > = Default::default();
                    let svc = Unary(
                        |_r: tonic::Request<protos::grpc::health::v1::HealthCheckRequest>| async {
                            Ok(tonic::Response::new(
                                protos::grpc::health::v1::HealthCheckResponse { status: 1 },
                            ))
                        },
                    );
                    tonic::server::Grpc::new(codec).unary(svc, req).await
                }
                "/moby.filesync.v1.Auth/Credentials" => {
                    let codec: tonic_prost::ProstCodec<
                        protos::moby::filesync::v1::CredentialsResponse,
                        protos::moby::filesync::v1::CredentialsRequest,
                    > = Default::default();
                    let st = state.clone();
                    let svc = Unary(
                        move |r: tonic::Request<protos::moby::filesync::v1::CredentialsRequest>| {
                            let found = st.registry_auth.get(&r.get_ref().host).cloned();
                            async move {
                                let (username, secret) = found.unwrap_or_default();
                                Ok(tonic::Response::new(
                                    protos::moby::filesync::v1::CredentialsResponse {
                                        username,
                                        secret,
                                    },
                                ))
                            }
                        },
                    );
                    tonic::server::Grpc::new(codec).unary(svc, req).await
                }
                "/moby.buildkit.secrets.v1.Secrets/GetSecret" => {
                    let codec: tonic_prost::ProstCodec<
                        protos::moby::buildkit::secrets::v1::GetSecretResponse,
                        protos::moby::buildkit::secrets::v1::GetSecretRequest,
                    > = Default::default();
                    let st = state.clone();
                    let svc = Unary(
                        move |r: tonic::Request<
                            protos::moby::buildkit::secrets::v1::GetSecretRequest,
                        >| {
                            let st = st.clone();
                            async move {
                                match st.secrets.get(&r.get_ref().id) {
                                    Some(v) => Ok(tonic::Response::new(
                                        protos::moby::buildkit::secrets::v1::GetSecretResponse {
                                            data: Bytes::from(v.clone()),
                                        },
                                    )),
                                    None => Err(tonic::Status::not_found(format!(
                                        "secret {} not found",
                                        r.get_ref().id
                                    ))),
                                }
                            }
                        },
                    );
                    tonic::server::Grpc::new(codec).unary(svc, req).await
                }
                "/moby.sshforward.v1.SSH/CheckAgent" => {
                    let codec: tonic_prost::ProstCodec<
                        protos::moby::sshforward::v1::CheckAgentResponse,
                        protos::moby::sshforward::v1::CheckAgentRequest,
                    > = Default::default();
                    let st = state.clone();
                    let svc = Unary(
                        move |r: tonic::Request<
                            protos::moby::sshforward::v1::CheckAgentRequest,
                        >| {
                            let st = st.clone();
                            async move {
                                let id = ssh_id(&r.get_ref().id);
                                if st.ssh_agents.contains_key(&id) {
                                    Ok(tonic::Response::new(
                                        protos::moby::sshforward::v1::CheckAgentResponse {},
                                    ))
                                } else {
                                    // buildctl's agent provider answers with a plain error.
                                    Err(tonic::Status::unknown(format!(
                                        "unset ssh forward key {id}"
                                    )))
                                }
                            }
                        },
                    );
                    tonic::server::Grpc::new(codec).unary(svc, req).await
                }
                "/moby.sshforward.v1.SSH/ForwardAgent" => {
                    let codec: tonic_prost::ProstCodec<
                        protos::moby::sshforward::v1::BytesMessage,
                        protos::moby::sshforward::v1::BytesMessage,
                    > = Default::default();
                    tonic::server::Grpc::new(codec)
                        .streaming(SshForwardSvc(state.clone()), req)
                        .await
                }
                "/moby.filesync.v1.FileSync/DiffCopy" => {
                    let codec: tonic_prost::ProstCodec<WirePacket, WirePacket> = Default::default();
                    tonic::server::Grpc::new(codec)
                        .streaming(FileSyncSvc(state.clone()), req)
                        .await
                }
                "/moby.filesync.v1.FileSend/DiffCopy" => {
                    state.record_exporter_md(req.headers());
                    match &state.output {
                        Output::Declined(..) => {
                            tonic::Status::already_exists("target already exists").into_http()
                        }
                        Output::Local(dir) => {
                            let codec: tonic_prost::ProstCodec<WirePacket, WirePacket> =
                                Default::default();
                            tonic::server::Grpc::new(codec)
                                .streaming(FileReceiveSvc(dir.clone()), req)
                                .await
                        }
                        Output::Tar(file) | Output::Docker(file, _) | Output::Oci(file, _) => {
                            let codec: tonic_prost::ProstCodec<
                                protos::moby::filesync::v1::BytesMessage,
                                protos::moby::filesync::v1::BytesMessage,
                            > = Default::default();
                            tonic::server::Grpc::new(codec)
                                .streaming(FileWriteSvc(file.clone()), req)
                                .await
                        }
                        _ => tonic::Status::unimplemented("no output target").into_http(),
                    }
                }
                content::INFO | content::READ | content::WRITE
                    if !state.content_stores.is_empty() =>
                {
                    content::serve(state.clone(), req).await
                }
                other => {
                    tonic::Status::unimplemented(format!("{other} is not served by this session"))
                        .into_http()
                }
            };
            Ok(resp)
        })
    }
}

async fn file_sync(
    st: Arc<Attachables>,
    r: tonic::Request<tonic::Streaming<WirePacket>>,
) -> Result<tonic::Response<BoxBodyStream<WirePacket>>, tonic::Status> {
    let md = r.metadata().clone();
    let name = md_values(&md, "dir-name")
        .into_iter()
        .next()
        .unwrap_or_default();
    let Some(dir) = st.locals.get(&name).cloned() else {
        return Err(tonic::Status::not_found(format!(
            "no access allowed to dir {name:?}"
        )));
    };
    let opts = fsutil::SendOptions {
        walk: fsutil::walk::WalkOptions {
            include_patterns: md_values(&md, "include-patterns"),
            exclude_patterns: md_values(&md, "exclude-patterns"),
            follow_paths: md_values(&md, "followpaths"),
        },
        // buildctl rewrites ownership to 0:0
        map: Some(Arc::new(|s: &mut fsutil::Stat| {
            s.uid = 0;
            s.gid = 0;
            fsutil::walk::MapResult::Keep
        })),
        progress: {
            let bytes = st.file_sync_bytes.clone();
            Some(Arc::new(move |n: u64, _last: bool| {
                bytes.fetch_max(n, Ordering::Relaxed);
            }))
        },
    };
    let requests = st.file_sync_requests.clone();
    let incoming = r.into_inner().map(move |p| match p {
        Ok(p) => {
            if p.r#type == fsutil::packet_type::REQ {
                requests.fetch_add(1, Ordering::Relaxed);
            }
            fsutil::Packet::try_from(p)
        }
        Err(e) => Err(fsutil::Error::Transport {
            message: e.to_string(),
        }),
    });
    let (tx, rx) = mpsc::channel::<fsutil::Packet>(64);
    let (out_tx, out_rx) = mpsc::channel::<Result<WirePacket, tonic::Status>>(64);
    tokio::spawn(async move {
        let sender = fsutil::send(dir, opts, tx, Box::pin(incoming));
        let fwd = async {
            let mut rx = rx;
            while let Some(p) = rx.recv().await {
                if out_tx.send(Ok(p.into())).await.is_err() {
                    break;
                }
            }
            out_tx
        };
        let (res, out_tx) = tokio::join!(sender, fwd);
        if let Err(e) = res {
            let _ = out_tx
                .send(Err(tonic::Status::unknown(e.to_string())))
                .await;
        }
    });
    Ok(tonic::Response::new(Box::pin(ReceiverStream::new(out_rx))))
}

async fn file_receive(
    dir: PathBuf,
    r: tonic::Request<tonic::Streaming<WirePacket>>,
) -> Result<tonic::Response<BoxBodyStream<WirePacket>>, tonic::Status> {
    let incoming = r.into_inner().map(|p| match p {
        Ok(p) => fsutil::Packet::try_from(p),
        Err(e) => Err(fsutil::Error::Transport {
            message: e.to_string(),
        }),
    });
    let (tx, rx) = mpsc::channel::<fsutil::Packet>(64);
    let (out_tx, out_rx) = mpsc::channel::<Result<WirePacket, tonic::Status>>(64);
    tokio::spawn(async move {
        let opts = fsutil::ReceiveOptions {
            merge: true,
            ..Default::default()
        };
        let recv = fsutil::receive(dir, opts, tx, Box::pin(incoming));
        let fwd = async {
            let mut rx = rx;
            while let Some(p) = rx.recv().await {
                if out_tx.send(Ok(p.into())).await.is_err() {
                    break;
                }
            }
            out_tx
        };
        let (res, out_tx) = tokio::join!(recv, fwd);
        if let Err(e) = res {
            let _ = out_tx
                .send(Err(tonic::Status::unknown(e.to_string())))
                .await;
        }
    });
    Ok(tonic::Response::new(Box::pin(ReceiverStream::new(out_rx))))
}

/// An SSH agent id as buildctl's provider reads it (empty: `default`).
fn ssh_id(id: &str) -> String {
    if id.is_empty() { "default" } else { id }.to_string()
}

/// `SSH/ForwardAgent`: one connection to the agent named by the `buildkit.ssh.id` metadata,
/// bytes copied both ways.
async fn ssh_forward(
    st: Arc<Attachables>,
    r: tonic::Request<tonic::Streaming<protos::moby::sshforward::v1::BytesMessage>>,
) -> Result<tonic::Response<BoxBodyStream<protos::moby::sshforward::v1::BytesMessage>>, tonic::Status>
{
    let id = ssh_id(
        &md_values(r.metadata(), "buildkit.ssh.id")
            .into_iter()
            .next()
            .unwrap_or_default(),
    );
    let Some(sock) = st.ssh_agents.get(&id).cloned() else {
        return Err(tonic::Status::unknown(format!(
            "unset ssh forward key {id}"
        )));
    };
    let conn = tokio::net::UnixStream::connect(&sock)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect {}: {e}", sock.display())))?;
    let (rd, mut wr) = conn.into_split();
    let mut incoming = r.into_inner();
    tokio::spawn(async move {
        while let Some(Ok(m)) = incoming.next().await {
            if wr.write_all(&m.data).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    let out = tokio_util::io::ReaderStream::new(rd).map(|r| {
        r.map(|data| protos::moby::sshforward::v1::BytesMessage { data })
            .map_err(|e| tonic::Status::internal(e.to_string()))
    });
    Ok(tonic::Response::new(Box::pin(out)))
}

async fn file_write(
    file: PathBuf,
    r: tonic::Request<tonic::Streaming<protos::moby::filesync::v1::BytesMessage>>,
) -> Result<tonic::Response<BoxBodyStream<protos::moby::filesync::v1::BytesMessage>>, tonic::Status>
{
    let mut s = r.into_inner();
    let mut f = tokio::fs::File::create(&file)
        .await
        .map_err(|e| tonic::Status::internal(format!("create {}: {e}", file.display())))?;
    let mut chunks = Vec::new();
    while let Some(m) = s.next().await {
        let m = m?;
        chunks.push(m.data.len());
        f.write_all(&m.data)
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
    }
    f.flush()
        .await
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    // Record the chunk sizes next to the file, so tests can check the daemon's chunking.
    let sizes = chunks
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    let _ = tokio::fs::write(file.with_extension("chunks"), sizes).await;
    Ok(tonic::Response::new(Box::pin(futures::stream::empty())))
}

/// The client's content stores (`containerd.services.content.v1.Content`, chosen by the
/// `buildkit-attachable-store-id` header), as BuildKit's client serves them over the session:
/// `Info`, `Read` and `Write` on OCI layout directories. Messages are containerd's
/// (`api/services/content/v1/content.proto`), declared with the fields used.
mod content {
    use super::*;
    use sha2::{Digest as _, Sha256};

    pub const INFO: &str = "/containerd.services.content.v1.Content/Info";
    pub const READ: &str = "/containerd.services.content.v1.Content/Read";
    pub const WRITE: &str = "/containerd.services.content.v1.Content/Write";
    const STORE_ID: &str = "buildkit-attachable-store-id";
    const STAT: i32 = 0;
    const COMMIT: i32 = 2;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct InfoRequest {
        #[prost(string, tag = "1")]
        pub digest: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Info {
        #[prost(string, tag = "1")]
        pub digest: String,
        #[prost(int64, tag = "2")]
        pub size: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct InfoResponse {
        #[prost(message, optional, tag = "1")]
        pub info: Option<Info>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ReadContentRequest {
        #[prost(string, tag = "1")]
        pub digest: String,
        #[prost(int64, tag = "2")]
        pub offset: i64,
        #[prost(int64, tag = "3")]
        pub size: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ReadContentResponse {
        #[prost(int64, tag = "1")]
        pub offset: i64,
        #[prost(bytes = "bytes", tag = "2")]
        pub data: Bytes,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WriteContentRequest {
        #[prost(int32, tag = "1")]
        pub action: i32,
        #[prost(string, tag = "2")]
        pub r#ref: String,
        #[prost(int64, tag = "3")]
        pub total: i64,
        #[prost(string, tag = "4")]
        pub expected: String,
        #[prost(int64, tag = "5")]
        pub offset: i64,
        #[prost(bytes = "bytes", tag = "6")]
        pub data: Bytes,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WriteContentResponse {
        #[prost(int32, tag = "1")]
        pub action: i32,
        #[prost(int64, tag = "4")]
        pub offset: i64,
        #[prost(int64, tag = "5")]
        pub total: i64,
        #[prost(string, tag = "6")]
        pub digest: String,
    }

    /// `<dir>/blobs/sha256/<hex>` of a well-formed digest.
    fn blob(dir: &Path, digest: &str) -> Result<PathBuf, tonic::Status> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| tonic::Status::invalid_argument(format!("invalid digest {digest:?}")))?;
        Ok(dir.join("blobs").join("sha256").join(hex))
    }

    fn store<T>(
        st: &Attachables,
        r: &tonic::Request<T>,
    ) -> Result<(String, PathBuf), tonic::Status> {
        let id = md_values(r.metadata(), STORE_ID)
            .into_iter()
            .next()
            .unwrap_or_default();
        match st.content_stores.get(&id) {
            Some(d) => Ok((id, d.clone())),
            // BuildKit's client answers an unknown id with a plain error.
            None => Err(tonic::Status::unknown(format!(
                "content store {id} not found"
            ))),
        }
    }

    pub async fn serve(
        state: Arc<Attachables>,
        req: http::Request<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        match req.uri().path() {
            INFO => {
                let codec: tonic_prost::ProstCodec<InfoResponse, InfoRequest> = Default::default();
                let svc = Unary(move |r: tonic::Request<InfoRequest>| {
                    let st = state.clone();
                    async move {
                        let (_, dir) = store(&st, &r)?;
                        let d = r.get_ref().digest.clone();
                        match std::fs::metadata(blob(&dir, &d)?) {
                            Ok(m) => Ok(tonic::Response::new(InfoResponse {
                                info: Some(Info {
                                    digest: d,
                                    size: m.len() as i64,
                                }),
                            })),
                            Err(_) => Err(tonic::Status::not_found(format!(
                                "content digest {d}: not found"
                            ))),
                        }
                    }
                });
                tonic::server::Grpc::new(codec).unary(svc, req).await
            }
            READ => {
                let codec: tonic_prost::ProstCodec<ReadContentResponse, ReadContentRequest> =
                    Default::default();
                tonic::server::Grpc::new(codec)
                    .server_streaming(ReadSvc(state), req)
                    .await
            }
            _ => {
                let codec: tonic_prost::ProstCodec<WriteContentResponse, WriteContentRequest> =
                    Default::default();
                tonic::server::Grpc::new(codec)
                    .streaming(WriteSvc(state), req)
                    .await
            }
        }
    }

    struct ReadSvc(Arc<Attachables>);
    impl tonic::server::ServerStreamingService<ReadContentRequest> for ReadSvc {
        type Response = ReadContentResponse;
        type ResponseStream = BoxBodyStream<ReadContentResponse>;
        type Future = Pin<
            Box<
                dyn std::future::Future<
                        Output = Result<tonic::Response<Self::ResponseStream>, tonic::Status>,
                    > + Send,
            >,
        >;
        fn call(&mut self, r: tonic::Request<ReadContentRequest>) -> Self::Future {
            let st = self.0.clone();
            Box::pin(async move {
                let (_, dir) = store(&st, &r)?;
                let req = r.into_inner();
                let path = blob(&dir, &req.digest)?;
                let data = tokio::fs::read(&path).await.map_err(|_| {
                    tonic::Status::not_found(format!("content digest {}: not found", req.digest))
                })?;
                let start = (req.offset.max(0) as usize).min(data.len());
                let end = if req.size > 0 {
                    (start + req.size as usize).min(data.len())
                } else {
                    data.len()
                };
                let data = Bytes::from(data).slice(start..end);
                let chunks: Vec<Result<ReadContentResponse, tonic::Status>> = (0..data.len())
                    .step_by(1 << 20)
                    .map(|o| {
                        Ok(ReadContentResponse {
                            offset: (start + o) as i64,
                            data: data.slice(o..(o + (1 << 20)).min(data.len())),
                        })
                    })
                    .collect();
                Ok(tonic::Response::new(
                    Box::pin(futures::stream::iter(chunks)) as BoxBodyStream<_>,
                ))
            })
        }
    }

    struct WriteSvc(Arc<Attachables>);
    impl tonic::server::StreamingService<WriteContentRequest> for WriteSvc {
        type Response = WriteContentResponse;
        type ResponseStream = BoxBodyStream<WriteContentResponse>;
        type Future = Pin<
            Box<
                dyn std::future::Future<
                        Output = Result<tonic::Response<Self::ResponseStream>, tonic::Status>,
                    > + Send,
            >,
        >;
        fn call(
            &mut self,
            r: tonic::Request<tonic::Streaming<WriteContentRequest>>,
        ) -> Self::Future {
            let st = self.0.clone();
            Box::pin(async move {
                let (id, dir) = store(&st, &r)?;
                let (tx, rx) = mpsc::channel(16);
                tokio::spawn(write(st, id, dir, r.into_inner(), tx));
                Ok(tonic::Response::new(
                    Box::pin(ReceiverStream::new(rx)) as BoxBodyStream<_>
                ))
            })
        }
    }

    /// One `Write` stream, as containerd's content service answers it: the blob goes to
    /// `ingest/<sha256 of ref>/data`, each message is answered with the offset reached, and the
    /// commit checks size and digest, then moves it into `blobs/sha256/`. An expected digest the
    /// store already has ends the stream with `AlreadyExists`.
    async fn write(
        st: Arc<Attachables>,
        id: String,
        dir: PathBuf,
        mut s: tonic::Streaming<WriteContentRequest>,
        tx: mpsc::Sender<Result<WriteContentResponse, tonic::Status>>,
    ) {
        let mut file: Option<(PathBuf, tokio::fs::File)> = None;
        let mut hash = Sha256::new();
        let (mut offset, mut total, mut expected) = (0i64, 0i64, String::new());
        while let Some(m) = s.next().await {
            let m = match m {
                Ok(m) => m,
                Err(_) => return,
            };
            let res: Result<WriteContentResponse, tonic::Status> = async {
                if m.total > 0 {
                    total = m.total;
                }
                if !m.expected.is_empty() {
                    expected = m.expected.clone();
                }
                if file.is_none() {
                    if !expected.is_empty() && blob(&dir, &expected)?.exists() {
                        return Err(tonic::Status::already_exists(format!(
                            "content {expected}: already exists"
                        )));
                    }
                    let ingest = dir
                        .join("ingest")
                        .join(hex::encode(Sha256::digest(m.r#ref.as_bytes())));
                    std::fs::create_dir_all(&ingest)
                        .map_err(|e| tonic::Status::internal(e.to_string()))?;
                    let f = tokio::fs::File::create(ingest.join("data"))
                        .await
                        .map_err(|e| tonic::Status::internal(e.to_string()))?;
                    file = Some((ingest, f));
                }
                let (ingest, f) = file.as_mut().expect("opened above");
                if m.action != STAT && !m.data.is_empty() {
                    if m.offset != offset {
                        return Err(tonic::Status::invalid_argument(format!(
                            "write at offset {} but {offset} bytes were written",
                            m.offset
                        )));
                    }
                    f.write_all(&m.data)
                        .await
                        .map_err(|e| tonic::Status::internal(e.to_string()))?;
                    hash.update(&m.data);
                    offset += m.data.len() as i64;
                }
                let mut resp = WriteContentResponse {
                    action: m.action,
                    offset,
                    total,
                    digest: String::new(),
                };
                if m.action == COMMIT {
                    f.flush()
                        .await
                        .map_err(|e| tonic::Status::internal(e.to_string()))?;
                    let got = format!("sha256:{}", hex::encode(hash.clone().finalize()));
                    if total > 0 && total != offset {
                        return Err(tonic::Status::failed_precondition(format!(
                            "unexpected commit size {offset}, expected {total}"
                        )));
                    }
                    if !expected.is_empty() && expected != got {
                        return Err(tonic::Status::failed_precondition(format!(
                            "unexpected commit digest {got}, expected {expected}"
                        )));
                    }
                    let target = blob(&dir, &got)?;
                    std::fs::create_dir_all(target.parent().expect("blob dir"))
                        .map_err(|e| tonic::Status::internal(e.to_string()))?;
                    std::fs::rename(ingest.join("data"), &target)
                        .map_err(|e| tonic::Status::internal(e.to_string()))?;
                    let _ = std::fs::remove_dir_all(&*ingest);
                    st.content_writes
                        .lock()
                        .unwrap()
                        .push((id.clone(), got.clone()));
                    resp.digest = got;
                }
                Ok(resp)
            }
            .await;
            let stop = res.is_err() || m.action == COMMIT;
            if tx.send(res).await.is_err() || stop {
                return;
            }
        }
    }
}
