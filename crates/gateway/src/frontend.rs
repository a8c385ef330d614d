//! The frontend-container runner of `gateway.v0`: a frontend image's process with the LLBBridge
//! connection on its standard streams.
//!
//! Follows `gatewayFrontend.Solve` of BuildKit's `frontend/gateway/gateway.go` (v0.11.6):
//! the process is the image's entrypoint (default `/run`) in its working directory (default
//! `/`), with the image's environment plus `BUILDKIT_FRONTEND_OPT_<i>=<key>=<value>` for every
//! frontend option, `BUILDKIT_SESSION_ID`, `BUILDKIT_WORKERS` (JSON) and
//! `BUILDKIT_EXPORTEDPRODUCT`; its root is a writable layer on the image; the frontend
//! image's own definition is readable at `/run/config/buildkit/metadata/frontend.bin`
//! (read-only bind); the label `moby.buildkit.frontend.network.none=true` gives it no
//! network. The frontend is a gRPC client over its stdin/stdout; [`FrontendRun::conn`] is the
//! daemon's end of that connection (the daemon serves `LLBBridge` on it). Its standard error is
//! logged.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use executor::{Mount, MountKind, ProcessIo, ProcessSpec};
use protos::pb;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, PollSender};

use crate::error::{Error, ProcessError};

/// Where the frontend finds its own definition.
pub const METADATA_DIR: &str = "/run/config/buildkit/metadata";
/// Image label listing the caps a frontend image supports (`name[+version],...`).
pub const LABEL_CAPS: &str = "moby.buildkit.frontend.caps";
/// Image label asking for no network.
pub const LABEL_NETWORK_NONE: &str = "moby.buildkit.frontend.network.none";

/// The parts of the frontend image's config the runner uses.
#[derive(Debug, Clone, Default)]
pub struct FrontendImage {
    /// `config.Env`.
    pub env: Vec<String>,
    /// `config.Entrypoint` (empty: `/run`).
    pub entrypoint: Vec<String>,
    /// `config.WorkingDir` (empty: `/`).
    pub working_dir: String,
    /// `config.Labels`.
    pub labels: BTreeMap<String, String>,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct FrontendSpec {
    /// The solved frontend image.
    pub rootfs: worker::SolvedRef,
    /// Its definition (written to `frontend.bin`).
    pub definition: pb::Definition,
    /// Its config.
    pub image: FrontendImage,
    /// Frontend options (all of them, `source` included, as buildkitd passes them).
    pub opts: BTreeMap<String, String>,
    /// Whether the request has frontend inputs (needs the `moby.buildkit.frontend.inputs` cap).
    pub has_inputs: bool,
    /// The build's session id.
    pub session_id: String,
    /// `BUILDKIT_WORKERS`: the worker infos as JSON.
    pub workers_json: String,
    /// `BUILDKIT_EXPORTEDPRODUCT`.
    pub product: String,
}

/// The caps named in a label or option (`a,b+1.0` → `a`, `b`).
fn caps(list: &str) -> Vec<String> {
    list.split(',')
        .filter_map(|c| c.split('+').next())
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

/// The environment of the frontend process: the image's, then the options, session id,
/// workers and product.
fn frontend_env(
    image_env: &[String],
    opts: &BTreeMap<String, String>,
    session_id: &str,
    workers_json: &str,
    product: &str,
) -> Vec<String> {
    let mut env = image_env.to_vec();
    for (i, (k, v)) in opts.iter().enumerate() {
        env.push(format!("BUILDKIT_FRONTEND_OPT_{i}={k}={v}"));
    }
    env.push(format!("BUILDKIT_SESSION_ID={session_id}"));
    env.push(format!("BUILDKIT_WORKERS={workers_json}"));
    env.push(format!("BUILDKIT_EXPORTEDPRODUCT={product}"));
    env
}

/// How much of the frontend's standard error [`FrontendOutcome::stderr`] keeps.
pub const STDERR_TAIL: usize = 4096;

/// How a frontend process ended.
#[derive(Debug, Clone)]
pub struct FrontendOutcome {
    /// Exit code 0, or why not.
    pub result: Result<(), ProcessError>,
    /// The last [`STDERR_TAIL`] bytes of its standard error (lossy UTF-8, trimmed).
    pub stderr: String,
}

/// A running frontend.
pub struct FrontendRun {
    /// The daemon's end of the frontend's gRPC connection (reads its stdout, writes its stdin).
    pub conn: StdioConn,
    /// The process' outcome; it holds the mounts until the process has ended.
    pub done: JoinHandle<FrontendOutcome>,
    /// Kills the process.
    pub cancel: CancellationToken,
}

impl std::fmt::Debug for FrontendRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontendRun").finish_non_exhaustive()
    }
}

/// Starts the frontend (see the module docs). The caps the request needs (option
/// `frontend.caps`, `moby.buildkit.frontend.inputs` with inputs) must be in the image's
/// [`LABEL_CAPS`]; otherwise [`Error::UnsupportedFrontendCap`].
pub async fn run_frontend(
    worker: &worker::Worker,
    spec: FrontendSpec,
    session: Arc<dyn worker::SessionProvider>,
    tmp: PathBuf,
    cancel: &CancellationToken,
) -> Result<FrontendRun, Error> {
    let have = caps(spec.image.labels.get(LABEL_CAPS).map_or("", |s| s));
    let mut need = caps(spec.opts.get("frontend.caps").map_or("", |s| s));
    if spec.has_inputs {
        need.push("moby.buildkit.frontend.inputs".into());
    }
    if let Some(c) = need.into_iter().find(|c| !have.contains(c)) {
        return Err(Error::UnsupportedFrontendCap { cap: c });
    }
    let executor = worker.executor().await?;
    let root = pb::Mount {
        dest: "/".into(),
        input: 0,
        mount_type: pb::MountType::Bind as i32,
        ..Default::default()
    };
    let prepared = worker
        .prepare_container(
            "gateway frontend",
            &[root],
            std::slice::from_ref(&spec.rootfs),
            session,
            cancel,
        )
        .await?;
    // frontend.bin: the frontend image's definition, read-only
    let meta = tempfile_dir(&tmp)?;
    let bin = meta.path.join("frontend.bin");
    {
        use prost::Message as _;
        std::fs::write(&bin, spec.definition.encode_to_vec())
            .map_err(|source| Error::Io { path: bin, source })?;
    }
    let mut mounts = prepared.mounts().to_vec();
    mounts.push(Mount {
        dest: METADATA_DIR.into(),
        kind: MountKind::Bind {
            source: meta.path.clone(),
            readonly: true,
        },
    });
    let network = match spec
        .image
        .labels
        .get(LABEL_NETWORK_NONE)
        .map(|v| v.as_str())
    {
        Some("1" | "t" | "T" | "true" | "TRUE" | "True") => executor::NetMode::None,
        _ => executor::NetMode::Sandbox,
    };
    let args = if spec.image.entrypoint.is_empty() {
        vec!["/run".to_string()]
    } else {
        spec.image.entrypoint.clone()
    };
    let cwd = if spec.image.working_dir.is_empty() {
        "/".to_string()
    } else {
        spec.image.working_dir.clone()
    };
    let pspec = ProcessSpec {
        rootfs: prepared.rootfs().to_path_buf(),
        readonly_rootfs: false,
        args,
        env: frontend_env(
            &spec.image.env,
            &spec.opts,
            &spec.session_id,
            &spec.workers_json,
            &spec.product,
        ),
        cwd,
        network,
        mounts,
        remove_mount_stubs_recursive: true,
        ..Default::default()
    };
    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(16);
    let (stdout_tx, stdout_rx) = mpsc::channel::<Bytes>(16);
    let (stderr_tx, mut stderr_rx) = mpsc::channel::<Bytes>(16);
    // The frontend's standard error goes to the daemon's log and its last bytes into the
    // outcome (they explain a failed frontend to the client).
    let stderr_task = tokio::spawn(async move {
        let mut tail = Vec::new();
        while let Some(b) = stderr_rx.recv().await {
            tracing::info!(target: "frontend", "{}", String::from_utf8_lossy(&b).trim_end());
            tail.extend_from_slice(&b);
            if tail.len() > STDERR_TAIL {
                tail.drain(..tail.len() - STDERR_TAIL);
            }
        }
        String::from_utf8_lossy(&tail).trim().to_string()
    });
    let io = ProcessIo {
        stdin: Some(stdin_rx),
        stdout: Some(stdout_tx),
        stderr: Some(stderr_tx),
        ..Default::default()
    };
    let cancel = cancel.child_token();
    let task_cancel = cancel.clone();
    let done = tokio::spawn(async move {
        let res = executor.run(pspec, io, task_cancel.clone()).await;
        prepared.release().await;
        drop(meta);
        // the stream ends with the process (the executor drops its sender)
        let stderr = stderr_task.await.unwrap_or_default();
        let result = match res {
            Ok(r) if r.exit.success() => Ok(()),
            Ok(r) => Err(ProcessError::Exit {
                code: r.exit.code() as u32,
                canceled: task_cancel.is_cancelled(),
            }),
            Err(executor::Error::Cancelled { .. }) => Err(ProcessError::Exit {
                code: 137,
                canceled: true,
            }),
            Err(e) => Err(ProcessError::Failed {
                message: e.to_string(),
            }),
        };
        FrontendOutcome { result, stderr }
    });
    Ok(FrontendRun {
        conn: StdioConn {
            rx: stdout_rx,
            pending: Bytes::new(),
            tx: PollSender::new(stdin_tx),
        },
        done,
        cancel,
    })
}

/// A temporary directory removed on drop.
struct TempDir {
    path: PathBuf,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn tempfile_dir(parent: &std::path::Path) -> Result<TempDir, Error> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let path = parent.join(format!(
        "frontend-metadata-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    Ok(TempDir { path })
}

/// The daemon's end of a frontend's stdio connection: reads what the frontend writes to its
/// stdout, writes to its stdin. Shutdown closes the frontend's stdin.
pub struct StdioConn {
    rx: mpsc::Receiver<Bytes>,
    pending: Bytes,
    tx: PollSender<Bytes>,
}

impl AsyncRead for StdioConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(b)) => self.pending = b,
                // end of file
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl AsyncWrite for StdioConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let closed = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        match self.tx.poll_reserve(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => return Poll::Ready(Err(closed())),
            Poll::Pending => return Poll::Pending,
        }
        match self.tx.send_item(Bytes::copy_from_slice(data)) {
            Ok(()) => Poll::Ready(Ok(data.len())),
            Err(_) => Poll::Ready(Err(closed())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.tx.close();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_parse() {
        assert_eq!(caps(""), Vec::<String>::new());
        assert_eq!(caps("a,b+1.2,,c"), ["a", "b", "c"]);
    }

    #[test]
    fn env_order() {
        let opts: BTreeMap<String, String> = [
            ("source".to_string(), "img".to_string()),
            ("x".into(), "a=b".into()),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            frontend_env(&["PATH=/bin".into()], &opts, "s", "[]", "buildkit"),
            [
                "PATH=/bin",
                "BUILDKIT_FRONTEND_OPT_0=source=img",
                "BUILDKIT_FRONTEND_OPT_1=x=a=b",
                "BUILDKIT_SESSION_ID=s",
                "BUILDKIT_WORKERS=[]",
                "BUILDKIT_EXPORTEDPRODUCT=buildkit"
            ]
        );
    }
}
