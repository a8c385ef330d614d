//! Shared helpers of the `worker_ops_*` tests: a worker on a temporary root bound to the system
//! Docker Engine, a session with in-memory secrets, solving with collected progress.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use worker::{
    LocalSync, ProgressEvent, ProgressSink, SessionProvider, SolveContext, SolvedRef,
    TransferProgress, Worker, WorkerOptions,
};

pub use tokio_util::sync::CancellationToken;

/// A session with secrets and nothing else.
#[derive(Default)]
pub struct TestSession {
    pub secrets: HashMap<String, Vec<u8>>,
}

#[async_trait::async_trait]
impl SessionProvider for TestSession {
    async fn sync_local(
        &self,
        req: &LocalSync,
        _dest: &Path,
        _progress: &TransferProgress,
    ) -> worker::Result<worker::SyncStats> {
        Err(worker::Error::session(
            worker::ErrorKind::NotFound,
            format!("test session has no local dir {:?}", req.name),
            None,
        ))
    }

    async fn get_secret(&self, id: &str) -> worker::Result<Option<Vec<u8>>> {
        Ok(self.secrets.get(id).cloned())
    }
}

/// A worker on a fresh temporary root, using the system Docker Engine for images.
pub struct TestWorker {
    pub worker: Worker,
    pub root: tempfile::TempDir,
}

impl TestWorker {
    pub fn new() -> Result<Self> {
        Self::with_entitlements(&[])
    }

    /// A worker allowing `entitlements` (builds must still ask for them).
    pub fn with_entitlements(entitlements: &[&str]) -> Result<Self> {
        integration::require_root();
        integration::require_tool("runc", "runc");
        let root = tempfile::Builder::new()
            .prefix("berth-worker-ops-")
            .tempdir_in("/var/tmp")?;
        let mut opts = WorkerOptions::new(root.path());
        opts.docker_host = Some("unix:///var/run/docker.sock".into());
        opts.max_parallelism = 4;
        opts.allowed_entitlements = entitlements.iter().map(|e| e.to_string()).collect();
        let worker = Worker::new(opts).context("opening worker")?;
        Ok(TestWorker { worker, root })
    }

    pub fn root(&self) -> PathBuf {
        self.root.path().to_path_buf()
    }
}

impl Drop for TestWorker {
    /// Removes image pins of this worker still present: the worker releases a pin on the
    /// runtime when a build ends, but a test's runtime may stop before that task runs.
    fn drop(&mut self) {
        let label = format!("dev.berth.pin=worker:{}", self.root.path().display());
        let done = std::thread::spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let engine = integration::DockerEngine::system()?;
                let filters = HashMap::from([("label".to_string(), vec![label])]);
                let opts = integration::bollard::query_parameters::ListContainersOptions {
                    all: true,
                    filters: Some(filters),
                    ..Default::default()
                };
                for c in engine.client().list_containers(Some(opts)).await? {
                    if let Some(id) = c.id {
                        // The worker's own release may be running: "already in progress" is fine.
                        if let Err(e) = engine.remove_container(&id).await {
                            if !format!("{e:#}").contains("409") {
                                return Err(e);
                            }
                        }
                    }
                }
                Ok(())
            })
        })
        .join();
        if let Ok(Err(e)) = done {
            eprintln!("removing pins of test worker: {e:#}");
        }
    }
}

/// What one solve did.
pub struct Solve {
    pub result: worker::Result<SolvedRef>,
    pub events: Vec<ProgressEvent>,
    pub elapsed: Duration,
}

impl Solve {
    pub fn ok(&self) -> &SolvedRef {
        match &self.result {
            Ok(r) => r,
            Err(e) => {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(e);
                while let Some(s) = src {
                    msg.push_str(&format!(": {s}"));
                    src = s.source();
                }
                panic!("solve failed: {msg}\nlogs:\n{}", self.logs())
            }
        }
    }

    /// All process output of the build.
    pub fn logs(&self) -> String {
        let mut s = Vec::new();
        for e in &self.events {
            if let ProgressEvent::VertexLog { data, .. } = e {
                s.extend_from_slice(data);
            }
        }
        String::from_utf8_lossy(&s).into_owned()
    }

    /// `(name, cached)` of every completed vertex.
    pub fn completed(&self) -> Vec<(String, bool)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                ProgressEvent::VertexCompleted {
                    name,
                    cached,
                    error: None,
                    ..
                } => Some((name.clone(), *cached)),
                _ => None,
            })
            .collect()
    }
}

pub async fn solve_with(
    w: &Worker,
    st: &llb::State,
    session: Arc<dyn SessionProvider>,
    cancel: CancellationToken,
) -> Solve {
    solve_def(w, st.marshal().expect("marshal"), session, cancel).await
}

/// A definition with one source op (the llb crate has no http/git constructors yet): the op
/// bytes, digest = sha256 of them, and the terminal op naming output 0.
pub fn source_def(identifier: &str, attrs: &[(&str, &str)]) -> llb::pb::Definition {
    use prost::Message as _;
    use sha2::Digest as _;
    let op = llb::pb::Op {
        op: Some(llb::pb::op::Op::Source(llb::pb::SourceOp {
            identifier: identifier.to_string(),
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })),
        ..Default::default()
    };
    let bytes = op.encode_to_vec();
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)));
    let terminal = llb::pb::Op {
        inputs: vec![llb::pb::Input { digest, index: 0 }],
        ..Default::default()
    };
    llb::pb::Definition {
        def: vec![bytes.into(), terminal.encode_to_vec().into()],
        ..Default::default()
    }
}

pub async fn solve_def(
    w: &Worker,
    def: llb::pb::Definition,
    session: Arc<dyn SessionProvider>,
    cancel: CancellationToken,
) -> Solve {
    let (sink, mut rx) = ProgressSink::channel();
    let ctx = SolveContext::new(integration::unique_name("build"), session, sink, cancel);
    let start = std::time::Instant::now();
    let result = w.solve(def, ctx).await;
    let elapsed = start.elapsed();
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    Solve {
        result,
        events,
        elapsed,
    }
}

/// Solves `st` asking for `entitlements`.
pub async fn solve_ent(w: &Worker, st: &llb::State, entitlements: Vec<String>) -> Solve {
    let def = st.marshal().expect("marshal");
    let (sink, mut rx) = ProgressSink::channel();
    let ctx = SolveContext::new(
        integration::unique_name("build"),
        Arc::new(TestSession::default()),
        sink,
        CancellationToken::new(),
    )
    .with_entitlements(entitlements);
    let start = std::time::Instant::now();
    let result = w.solve(def, ctx).await;
    let elapsed = start.elapsed();
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    Solve {
        result,
        events,
        elapsed,
    }
}

pub async fn solve(w: &Worker, st: &llb::State) -> Solve {
    solve_with(
        w,
        st,
        Arc::new(TestSession::default()),
        CancellationToken::new(),
    )
    .await
}

/// Reads `path` (absolute inside the result) from a mounted result; `None` if absent.
pub async fn read(r: &SolvedRef, path: &str) -> Result<Option<String>> {
    let m = r.mount().await?;
    let p = m.path().join(path.trim_start_matches('/'));
    match std::fs::read(&p) {
        Ok(b) => Ok(Some(String::from_utf8_lossy(&b).into_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// Mount points under `root` that are still mounted (from `/proc/self/mountinfo`).
pub fn mounts_under(root: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let root = root.to_string_lossy().into_owned();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|mp| mp.starts_with(&root))
        .map(str::to_string)
        .collect()
}
