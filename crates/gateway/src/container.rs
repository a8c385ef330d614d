//! Gateway containers: [`ContainerSet`], [`Container`], [`Process`].
//!
//! Follows `frontend/gateway/container.go` and the container parts of `gateway.go` in BuildKit
//! v0.11.6 (<https://github.com/moby/buildkit/blob/v0.11.6/frontend/gateway/container.go>):
//!
//! * the first [`Container::start`] runs the container (`Executor.Run` → runc `run`) and
//!   returns once runc has started; later starts exec into it (`Executor.Exec` → runc `exec`,
//!   which first waits for the container to be running);
//! * the environment gets `PATH` for the container's platform OS when it has none, and
//!   `TERM=xterm` with a TTY; the working directory defaults to `/`;
//! * [`Container::release`] cancels every process (the executor kills them and waits for
//!   runc), waits for them all, then releases the mounts; it returns the first process error in
//!   completion order, as buildkitd's errgroup does (so releasing a container whose first
//!   process is still running reports `exit code: 137: context canceled`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use executor::{ExecSpec, ProcessIo, ProcessSpec, RuncExecutor, SecurityMode, WinSize};
use protos::pb;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, ProcessError};
use crate::{ENTITLEMENT_NETWORK_HOST, ENTITLEMENT_SECURITY_INSECURE};

/// `PATH` of a container whose platform OS is Windows (BuildKit's `DefaultPathEnvWindows`).
const DEFAULT_PATH_WINDOWS: &str = "c:\\Windows\\System32;c:\\Windows";

/// One mount of a new container: the LLB mount (type, destination, selector, options) and the
/// result it mounts, if any.
#[derive(Debug, Clone)]
pub struct ContainerMount {
    /// The mount; its `input` and `output` fields are ignored.
    pub mount: pb::Mount,
    /// The result mounted (bind mounts, a cache mount's seed); `None`: empty.
    pub result: Option<worker::SolvedRef>,
}

/// What `NewContainer` asks for.
#[derive(Debug, Clone, Default)]
pub struct NewContainer {
    /// The client's container id.
    pub id: String,
    /// Mounts; exactly one has destination `/` and is a bind mount.
    pub mounts: Vec<ContainerMount>,
    /// Network mode of every process.
    pub network: executor::NetMode,
    /// Extra `/etc/hosts` entries.
    pub extra_hosts: Vec<executor::HostIp>,
    /// The platform OS (`linux`, `windows`...; empty: linux): chooses the default `PATH`.
    pub platform_os: String,
}

/// What `ExecProcess`'s init message asks for, with the process' streams.
#[derive(Debug, Default)]
pub struct StartRequest {
    /// argv.
    pub args: Vec<String>,
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    /// User (`""`: root for the first process, the first process' user otherwise).
    pub user: String,
    /// Working directory (`""`: `/`).
    pub cwd: String,
    /// Run on a terminal.
    pub tty: bool,
    /// Security mode (the first process only, as buildkitd).
    pub security: SecurityMode,
    /// Remove the parents of mount stubs too.
    pub remove_mount_stubs_recursive: bool,
    /// Standard input chunks; closing the channel is end of file. `None`: `/dev/null`.
    pub stdin: Option<mpsc::Receiver<Bytes>>,
    /// Standard output (everything, with a TTY).
    pub stdout: Option<mpsc::Sender<Bytes>>,
    /// Standard error.
    pub stderr: Option<mpsc::Sender<Bytes>>,
}

/// A started process.
#[derive(Debug)]
pub struct Process {
    resize: mpsc::Sender<WinSize>,
    signal: mpsc::Sender<i32>,
    done: oneshot::Receiver<Result<(), ProcessError>>,
}

impl Process {
    /// Resizes the process' terminal (ignored without a TTY or once it has ended).
    pub async fn resize(&self, size: WinSize) {
        let _ = self.resize.send(size).await;
    }

    /// Sends signal `sig` to the process (ignored once it has ended).
    pub async fn signal(&self, sig: i32) {
        let _ = self.signal.send(sig).await;
    }

    /// Senders for resizes and signals that stay usable while [`Process::wait`] runs.
    pub fn controls(&self) -> (mpsc::Sender<WinSize>, mpsc::Sender<i32>) {
        (self.resize.clone(), self.signal.clone())
    }

    /// Waits for the process to end: `Ok` for exit code 0.
    pub async fn wait(self) -> Result<(), ProcessError> {
        self.done.await.unwrap_or_else(|_| {
            Err(ProcessError::Failed {
                message: "process task ended without a result".into(),
            })
        })
    }
}

#[derive(Default)]
struct State {
    /// The first process was started (later ones exec).
    started: bool,
    /// Every process task, for release.
    tasks: Vec<JoinHandle<()>>,
    /// Process failures in completion order.
    errors: Vec<ProcessError>,
    /// Released: no more starts.
    released: bool,
}

/// A gateway container (see the module docs).
pub struct Container {
    id: String,
    exec_id: String,
    executor: Arc<RuncExecutor>,
    mounts: tokio::sync::Mutex<Option<worker::ContainerMounts>>,
    base: ProcessSpec,
    default_path: String,
    entitlements: Vec<String>,
    cancel: CancellationToken,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Container")
            .field("id", &self.id)
            .field("exec_id", &self.exec_id)
            .finish_non_exhaustive()
    }
}

fn add_default_env(env: &mut Vec<String>, key: &str, value: &str) {
    let prefix = format!("{key}=");
    if !env.iter().any(|e| e.starts_with(&prefix)) {
        env.push(format!("{prefix}{value}"));
    }
}

impl Container {
    /// Prepares a container's mounts; no process runs yet. `entitlements` are the build's
    /// (requested and allowed by the daemon).
    pub async fn new(
        worker: &worker::Worker,
        req: NewContainer,
        session: Arc<dyn worker::SessionProvider>,
        entitlements: Vec<String>,
        cancel: &CancellationToken,
    ) -> Result<Container, Error> {
        if req.network == executor::NetMode::Host
            && !entitlements.iter().any(|e| e == ENTITLEMENT_NETWORK_HOST)
        {
            return Err(Error::Entitlement {
                entitlement: ENTITLEMENT_NETWORK_HOST,
            });
        }
        let mut refs = Vec::new();
        let mut mounts = Vec::with_capacity(req.mounts.len());
        for m in req.mounts {
            let mut pm = m.mount;
            pm.input = match m.result {
                Some(r) => {
                    refs.push(r);
                    refs.len() as i64 - 1
                }
                None => -1,
            };
            mounts.push(pm);
        }
        let executor = worker.executor().await?;
        let prepared = worker
            .prepare_container(
                &format!("container {}", req.id),
                &mounts,
                &refs,
                session,
                cancel,
            )
            .await?;
        let base = ProcessSpec {
            rootfs: prepared.rootfs().to_path_buf(),
            readonly_rootfs: prepared.readonly_rootfs(),
            mounts: prepared.mounts().to_vec(),
            network: req.network,
            extra_hosts: req.extra_hosts,
            ..Default::default()
        };
        let default_path = if req.platform_os.eq_ignore_ascii_case("windows") {
            DEFAULT_PATH_WINDOWS.to_string()
        } else {
            executor::DEFAULT_PATH.to_string()
        };
        Ok(Container {
            exec_id: executor.new_container_id(),
            id: req.id,
            executor,
            mounts: tokio::sync::Mutex::new(Some(prepared)),
            base,
            default_path,
            entitlements,
            cancel: CancellationToken::new(),
            state: Default::default(),
        })
    }

    /// The client's container id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Starts a process (see the module docs). Returns once it has been started (the first
    /// process: once runc runs; others: at once, their start happens in the background and a
    /// failure to start is their outcome).
    pub async fn start(&self, req: StartRequest) -> Result<Process, Error> {
        if req.args.is_empty() {
            return Err(Error::Invalid {
                reason: "process args must not be empty".into(),
            });
        }
        let first = {
            let mut st = self.state.lock().unwrap();
            if st.released {
                return Err(Error::NoContainer {
                    id: self.id.clone(),
                });
            }
            let first = !st.started;
            st.started = true;
            first
        };
        if first
            && req.security == SecurityMode::Insecure
            && !self
                .entitlements
                .iter()
                .any(|e| e == ENTITLEMENT_SECURITY_INSECURE)
        {
            return Err(Error::Entitlement {
                entitlement: ENTITLEMENT_SECURITY_INSECURE,
            });
        }
        let mut env = req.env;
        add_default_env(&mut env, "PATH", &self.default_path);
        if req.tty {
            add_default_env(&mut env, "TERM", "xterm");
        }
        let cwd = if req.cwd.is_empty() {
            "/".to_string()
        } else {
            req.cwd
        };
        let (resize_tx, resize_rx) = mpsc::channel(8);
        let (signal_tx, signal_rx) = mpsc::channel(8);
        let (started_tx, started_rx) = oneshot::channel();
        let io = ProcessIo {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            tty: req.tty,
            resize: Some(resize_rx),
            signal: Some(signal_rx),
            started: Some(started_tx),
        };
        let (done_tx, done_rx) = oneshot::channel();
        let executor = self.executor.clone();
        let exec_id = self.exec_id.clone();
        let cancel = self.cancel.child_token();
        let state = self.state.clone();
        let task_cancel = cancel.clone();
        let base = self.base.clone();
        let run = async move {
            let res: Result<i32, executor::Error> = if first {
                let spec = ProcessSpec {
                    args: req.args,
                    env,
                    cwd,
                    user: req.user,
                    security: req.security,
                    remove_mount_stubs_recursive: req.remove_mount_stubs_recursive,
                    ..base
                };
                executor
                    .run_with_id(exec_id, spec, io, task_cancel.clone())
                    .await
                    .map(|r| r.exit.code())
            } else {
                let spec = ExecSpec {
                    args: req.args,
                    env,
                    cwd,
                    user: req.user,
                };
                executor
                    .exec(&exec_id, spec, io, task_cancel.clone())
                    .await
                    .map(|s| s.code())
            };
            outcome(res, task_cancel.is_cancelled())
        };
        // The process task owns nothing of the container but the executor; its outcome goes
        // to the waiter and into the container's error list.
        let task = tokio::spawn(async move {
            let out = run.await;
            if let Err(e) = &out {
                state.lock().unwrap().errors.push(e.clone());
            }
            let _ = done_tx.send(out);
        });
        self.state.lock().unwrap().tasks.push(task);
        if first {
            // wait for runc to start (or the run to fail before that)
            let _ = started_rx.await;
        }
        Ok(Process {
            resize: resize_tx,
            signal: signal_tx,
            done: done_rx,
        })
    }

    /// Kills every process, waits for them, releases the mounts; the first process error.
    pub async fn release(&self) -> Result<(), Error> {
        let tasks = {
            let mut st = self.state.lock().unwrap();
            st.released = true;
            std::mem::take(&mut st.tasks)
        };
        self.cancel.cancel();
        for t in tasks {
            let _ = t.await;
        }
        if let Some(m) = self.mounts.lock().await.take() {
            m.release().await;
        }
        let first = self.state.lock().unwrap().errors.first().cloned();
        match first {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

/// The outcome of a process from the executor's answer.
fn outcome(res: Result<i32, executor::Error>, cancelled: bool) -> Result<(), ProcessError> {
    match res {
        Ok(0) => Ok(()),
        Ok(code) => Err(ProcessError::Exit {
            code: u32::try_from(code).unwrap_or(ProcessError::UNKNOWN_EXIT_STATUS),
            canceled: cancelled,
        }),
        // killed by the release: buildkitd reports runc's SIGKILL status
        Err(executor::Error::Cancelled { .. }) => Err(ProcessError::Exit {
            code: 128 + 9,
            canceled: true,
        }),
        Err(e) => Err(ProcessError::Failed {
            message: e.to_string(),
        }),
    }
}

/// The containers of one build.
#[derive(Default, Debug)]
pub struct ContainerSet {
    map: Mutex<HashMap<String, Arc<Container>>>,
}

impl ContainerSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a container (`NewContainer`); an id in use is [`Error::AlreadyExists`] and the new
    /// container is released.
    pub async fn insert(&self, c: Container) -> Result<(), Error> {
        let c = Arc::new(c);
        let dup = {
            let mut m = self.map.lock().unwrap();
            if m.contains_key(c.id()) {
                true
            } else {
                m.insert(c.id().to_string(), c.clone());
                false
            }
        };
        if dup {
            let _ = c.release().await;
            return Err(Error::AlreadyExists {
                id: c.id().to_string(),
            });
        }
        Ok(())
    }

    /// The container `id` (for `ExecProcess`).
    pub fn get(&self, id: &str) -> Result<Arc<Container>, Error> {
        self.map
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NoContainer { id: id.to_string() })
    }

    /// Releases and forgets container `id` (`ReleaseContainer`).
    pub async fn release(&self, id: &str) -> Result<(), Error> {
        let c = self
            .map
            .lock()
            .unwrap()
            .remove(id)
            .ok_or_else(|| Error::ReleaseUnknown { id: id.to_string() })?;
        c.release().await
    }

    /// Releases every container (the build ended); errors are only logged.
    pub async fn release_all(&self) {
        let all: Vec<Arc<Container>> = self.map.lock().unwrap().drain().map(|(_, c)| c).collect();
        for c in all {
            if let Err(e) = c.release().await {
                tracing::debug!(container = %c.id(), error = %e, "container released at the end of the build");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_env_only_when_missing() {
        let mut env = vec!["PATH=/x".to_string(), "A=b".to_string()];
        add_default_env(&mut env, "PATH", "/y");
        add_default_env(&mut env, "TERM", "xterm");
        assert_eq!(env, ["PATH=/x", "A=b", "TERM=xterm"]);
    }

    #[test]
    fn outcomes() {
        assert_eq!(outcome(Ok(0), false), Ok(()));
        assert_eq!(
            outcome(Ok(99), false),
            Err(ProcessError::Exit {
                code: 99,
                canceled: false
            })
        );
        let killed = outcome(Err(executor::Error::Cancelled { id: "c".into() }), true).unwrap_err();
        assert_eq!(killed.to_string(), "exit code: 137: context canceled");
    }
}
