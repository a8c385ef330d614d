//! ExecOp: runs a process with runc on top of its input snapshots
//! (`solver/llbsolver/ops/exec.go` and `solver/llbsolver/mounts/mount.go` in moby/buildkit v0.11.6).
//!
//! # Mounts (`llb.md` §4)
//!
//! | mount | what berth does |
//! |---|---|
//! | root `BIND` | a mutable snapshot on top of the input's chain, mounted read-write on the host (a read-only root is made read-only inside the container; its layer is discarded unless it has an output) |
//! | other `BIND`, read-only | the input mounted read-only; with an output, the input is re-exported unchanged |
//! | other `BIND`, writable | a mutable snapshot on the input; committed as the output, or removed when `output = -1` |
//! | `CACHE` | a persistent directory `<root>/worker/cache/<sha256(key)>/<instance>` (see below) |
//! | `TMPFS` | a fresh tmpfs of `size` bytes |
//! | `SECRET` | the bytes from [`SessionProvider::get_secret`](crate::SessionProvider::get_secret), on a private tmpfs (never in a layer or log); a missing optional secret skips the mount |
//! | `SSH` | a unix socket forwarding each connection to the client's SSH agent through the session (see [`ssh`]); a missing agent is an error unless `optional` (then skipped) |
//!
//! A `selector` mounts a sub-path of the input; it is resolved inside the mounted input with
//! `RESOLVE_IN_ROOT` semantics (pathrs), so symlinks cannot leave the input.
//!
//! # Cache mounts
//!
//! The key of a cache directory is the cache `ID`, plus the input's cache key and selector when
//! the mount has an input (the input seeds the directory when it is created, as buildkitd does).
//! Directories persist across builds and restarts. `sharing`: `SHARED` — every user gets
//! instance `0` concurrently; `LOCKED` — users of instance `0` wait for each other; `PRIVATE` —
//! a user gets the lowest-numbered instance nobody is using, a new one when all are busy.
//! Within one exec, mounts of the same cache share one instance whatever their sharing mode
//! (buildkitd's per-exec mount manager), so a LOCKED cache mounted twice never waits for itself.
//! These directories are not snapshots: `buildctl du`/prune do not see them yet.
//!
//! # Network and security
//!
//! `NONE` gets an empty network namespace, `HOST` the host's (entitlement checked when the
//! definition is loaded). `UNSET` (BuildKit's sandbox) also shares the host network namespace:
//! berth has no CNI provider, like buildkitd's `auto` mode without CNI configuration.
//! `security=INSECURE` is accepted only when the worker allows `security.insecure`.
//!
//! # Running
//!
//! The run happens in a spawned task that owns every mount, so that when the solver drops the
//! op's future (cancellation, failure of a sibling) the container is still killed (the build's
//! cancel token fires) and every mount released before the task ends. Output is streamed as
//! [`ProgressEvent::VertexLog`]; the last lines are kept for the error of a failed process.
//! The process succeeds when its exit code is in `Meta.validExitCodes` (field 12, BuildKit cap
//! `exec.validexitcode`), or is 0 when that list is empty; outputs are committed only then.
//!
//! # Cache key
//!
//! Like buildkitd: the op without extra-host IPs and proxy env (which do not change what is
//! built), the platform, and per input either its cache key or, when every mount of that input
//! is a bind with a selector that is read-only and not the root, or writable without an output
//! (a Dockerfile `RUN --mount=…,rw`), a content checksum of the selected paths
//! (`file::checksum`, mtimes excluded), so a change elsewhere in such an input does not re-run
//! the step. Selectors stay in the key. (buildkitd also content-hashes read-only mounts without
//! a selector; berth does not, to avoid hashing whole base images.)

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use async_trait::async_trait;
use executor::{
    Bytes, HostIp, Mount as ExecMount, MountKind, NetMode, ProcessIo, ProcessSpec, RuncExecutor,
    RuncOptions, SecurityMode, Ulimit,
};
use layerstore::snapshot::{Chain, Mount, RecordType, SnapshotId, SnapshotOptions, SnapshotStore};
use protos::pb;
use protos::pb::op::Op as OpPayload;

use crate::error::{BoxError, Error, ErrorKind, Result};
use crate::llbsolver::cache::blocking;
use crate::llbsolver::definition::LoadedOp;
use crate::ops::BuildEnv;
use crate::progress::{LogStream, ProgressEvent, ProgressSink};
use crate::result::Snap;
use crate::solver::{Op, OpContext, Solved};
use crate::worker::ENTITLEMENT_SECURITY_INSECURE;

mod ssh;

/// How many bytes of combined output are kept for the error message of a failed process.
const TAIL_BYTES: usize = 4096;
/// How many lines of that output the error message shows.
const TAIL_LINES: usize = 10;

/// The solver op for `op`.
pub(crate) fn new(op: &LoadedOp, env: &Arc<BuildEnv>) -> Result<Arc<dyn Op<Snap>>> {
    let OpPayload::Exec(exec) = op.payload() else {
        return Err(Error::Internal("exec::new called with another op".into()));
    };
    Ok(Arc::new(ExecOp(Arc::new(Inner {
        op: op.op.clone(),
        exec: exec.clone(),
        name: op.name.clone(),
        env: env.clone(),
    }))))
}

struct ExecOp(Arc<Inner>);

struct Inner {
    op: pb::Op,
    exec: pb::ExecOp,
    name: String,
    env: Arc<BuildEnv>,
}

#[async_trait]
impl Op<Snap> for ExecOp {
    async fn cache_key(&self, _ctx: &OpContext, inputs: &[Solved<Snap>]) -> Result<String> {
        let content = selector_checksums(&self.0.env.store, &self.0.exec, inputs).await?;
        let keys: Vec<&str> = inputs.iter().map(|i| i.key.as_str()).collect();
        Ok(cache_key(
            &self.0.op,
            &self.0.exec,
            &self.0.env.opts.default_platform,
            &keys,
            &content,
        ))
    }

    fn key_from_input_keys(&self, input_keys: &[&str]) -> Option<String> {
        // Inputs mounted by selector are keyed by their content: that needs their results.
        if (0..input_keys.len()).any(|i| content_keyed(&self.0.exec, i)) {
            return None;
        }
        Some(cache_key(
            &self.0.op,
            &self.0.exec,
            &self.0.env.opts.default_platform,
            input_keys,
            &vec![None; input_keys.len()],
        ))
    }

    fn alias_key(&self, input_keys: &[&str]) -> Option<String> {
        // As if no input were keyed by content: every input by its key.
        let as_keys = cache_key(
            &self.0.op,
            &self.0.exec,
            &self.0.env.opts.default_platform,
            input_keys,
            &vec![None; input_keys.len()],
        );
        let mut h = crate::digest::KeyHasher::new("berth.exec.alias.v1");
        h.field(as_keys.as_bytes());
        Some(h.finish())
    }

    fn stock_map(&self) -> Option<crate::bkkeys::StockMap> {
        let n = self.0.op.inputs.len();
        Some(crate::bkkeys::StockMap {
            digest: crate::bkkeys::exec_cache_map(&self.0.exec, self.0.op.platform.as_ref())?,
            selectors: crate::bkkeys::exec_selectors(&self.0.exec, n),
            content: vec![],
        })
    }

    async fn exec(&self, ctx: &OpContext, inputs: &[Solved<Snap>]) -> Result<Vec<Snap>> {
        let inner = self.0.clone();
        let ctx = ctx.clone();
        let inputs: Vec<Snap> = inputs.iter().map(|s| s.result.clone()).collect();
        // A task of its own: see the module docs (cleanup survives the caller dropping us).
        tokio::spawn(async move { inner.run(&ctx, &inputs).await })
            .await
            .map_err(|e| Error::Internal(format!("exec task: {e}")))?
    }
}

/// Whether input `i` is keyed by content: every mount of it is a bind mount with a selector
/// whose changes are not kept, that is read-only and not the root, or writable without an
/// output (`output = -1`: a Dockerfile `RUN --mount=…,rw`), as buildkitd's exec op allows a
/// content-based key for an input unless a mount of it is writable or the root and has an
/// output.
fn content_keyed(exec: &pb::ExecOp, i: usize) -> bool {
    let uses: Vec<&pb::Mount> = exec.mounts.iter().filter(|m| m.input == i as i64).collect();
    !uses.is_empty()
        && uses.iter().all(|m| {
            m.mount_type == pb::MountType::Bind as i32
                && ((m.readonly && m.dest != "/") || m.output == -1)
                && !m.selector.trim_matches('/').is_empty()
        })
}

/// For each input, a checksum of the selected content when that input is keyed by content
/// ([`content_keyed`]: buildkitd's content-based dependency keys); `None` otherwise (the
/// input's cache key is used).
async fn selector_checksums(
    store: &SnapshotStore,
    exec: &pb::ExecOp,
    inputs: &[Solved<Snap>],
) -> Result<Vec<Option<String>>> {
    let mut out = vec![None; inputs.len()];
    for (i, input) in inputs.iter().enumerate() {
        if !content_keyed(exec, i) {
            continue;
        }
        let uses: Vec<&pb::Mount> = exec.mounts.iter().filter(|m| m.input == i as i64).collect();
        let mut selectors: Vec<String> = uses.iter().map(|m| m.selector.clone()).collect();
        selectors.sort();
        selectors.dedup();
        let store2 = store.clone();
        let snap = input.result.clone();
        let store = store.clone();
        // A checksum that fails (a selector that does not exist) leaves the input for
        // inspection, as buildkitd's `SlowCacheError` does.
        let failed = |e: Error| {
            e.with_failure(crate::error::StepFailure {
                inputs: vec![Some(crate::SolvedRef::of_snap(
                    &store2,
                    input.result.clone(),
                ))],
                mounts: vec![],
                subject: Some(crate::error::FailedSubject::ContentCache(i)),
            })
        };
        out[i] = Some(
            blocking(move || {
                let m = store
                    .mount(snap.id(), None)
                    .map_err(store_err("mount input for checksum"))?;
                let root = crate::file::root::Root::open(m.path())
                    .map_err(|e| Error::io("open input", m.path(), e))?;
                let mut h = crate::digest::KeyHasher::new("exec-selectors");
                for sel in &selectors {
                    // Unlike a copy source, a selected mount must exist: buildkitd's content
                    // checksum fails on a missing selector, before the step runs.
                    select(m.path(), sel)?;
                    let sum = crate::file::checksum::checksum(&root, sel, true).map_err(|e| {
                        Error::io("checksum", m.path().join(sel.trim_start_matches('/')), e)
                    })?;
                    h.field(sel.as_bytes()).field(sum.as_bytes());
                }
                Ok(h.finish())
            })
            .await
            .map_err(failed)?,
        );
    }
    Ok(out)
}

/// The cache key: op without volatile fields, platform, and per input its content checksum
/// (`content[i]`) or its cache key.
fn cache_key(
    op: &pb::Op,
    exec: &pb::ExecOp,
    default_platform: &crate::worker::Platform,
    input_keys: &[&str],
    content: &[Option<String>],
) -> String {
    let mut exec = exec.clone();
    if let Some(meta) = exec.meta.as_mut() {
        for h in &mut meta.extra_hosts {
            h.ip.clear();
        }
        meta.proxy_env = None;
    }
    let mut op = op.clone();
    op.op = Some(OpPayload::Exec(exec));
    let p = op.platform.get_or_insert_with(Default::default);
    if p.os.is_empty() {
        p.os = default_platform.os.clone();
    }
    if p.architecture.is_empty() {
        p.architecture = default_platform.architecture.clone();
        p.variant = default_platform.variant.clone();
    }
    let mut h = crate::digest::KeyHasher::new("exec");
    h.field(&crate::ops::base_key(&op));
    for (i, key) in input_keys.iter().enumerate() {
        match content.get(i).and_then(|c| c.as_deref()) {
            Some(c) => h.field(b"content").field(c.as_bytes()),
            None => h.field(b"key").field(key.as_bytes()),
        };
    }
    h.finish()
}

fn op_err(kind: ErrorKind, message: impl Into<String>, source: Option<BoxError>) -> Error {
    Error::Op {
        message: message.into(),
        kind,
        source,
    }
}

/// A snapshot store error with its cause in the message (the vertex error shows only the
/// message, not the source chain).
pub(crate) fn store_err(what: &'static str) -> impl FnOnce(layerstore::Error) -> Error {
    move |e| {
        let kind = match &e {
            layerstore::Error::SnapshotNotFound { .. } => ErrorKind::NotFound,
            _ => ErrorKind::Internal,
        };
        let mut message = format!("snapshot store: {what}: {e}");
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            message.push_str(&format!(": {s}"));
            src = s.source();
        }
        op_err(kind, message, Some(Box::new(e)))
    }
}

fn executor_err(e: executor::Error) -> Error {
    let kind = match e.kind() {
        executor::ErrorKind::InvalidArgument => ErrorKind::InvalidArgument,
        executor::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        executor::ErrorKind::Cancelled => return Error::Canceled,
        _ => ErrorKind::Internal,
    };
    op_err(kind, format!("executor: {e}"), Some(Box::new(e)))
}

/// One executor per worker root, shared by all builds of that worker.
pub(crate) async fn executor_for(env: &BuildEnv) -> Result<Arc<RuncExecutor>> {
    type Cell = Arc<tokio::sync::OnceCell<Arc<RuncExecutor>>>;
    static EXECUTORS: OnceLock<Mutex<HashMap<PathBuf, Cell>>> = OnceLock::new();
    let cell = EXECUTORS
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .entry(env.opts.root.clone())
        .or_default()
        .clone();
    let allow_insecure = env
        .opts
        .allowed_entitlements
        .iter()
        .any(|e| e == ENTITLEMENT_SECURITY_INSECURE);
    let state = env.opts.root.join("executor");
    let root = env.opts.root.clone();
    cell.get_or_try_init(|| async move {
        let mut opts = RuncOptions::new("runc", state);
        opts.allow_insecure = allow_insecure;
        let exec = RuncExecutor::new(opts).map_err(executor_err)?;
        // First use of this root in this process: containers left by a previous run are stale.
        if let Err(e) = exec.cleanup_stale().await {
            tracing::warn!(error = %e, "cleaning up stale runc state failed");
        }
        ssh::cleanup_stale(&root);
        Ok::<_, Error>(Arc::new(exec))
    })
    .await
    .cloned()
}

/// A mutable snapshot that is removed unless committed.
struct MutableSnap {
    store: SnapshotStore,
    id: Option<SnapshotId>,
}

impl MutableSnap {
    fn prepare(store: &SnapshotStore, parent: Option<&Snap>, what: &str) -> Result<MutableSnap> {
        let mut o = SnapshotOptions::new(what.to_string());
        o.record_type = RecordType::Regular;
        let id = store
            .prepare(parent.map(|p| p.id()), &o)
            .map_err(store_err("prepare exec snapshot"))?;
        Ok(MutableSnap {
            store: store.clone(),
            id: Some(id),
        })
    }

    fn id(&self) -> &SnapshotId {
        self.id.as_ref().expect("not yet committed")
    }

    /// Commits (the mount must be gone) and leases the result.
    fn commit(mut self) -> Result<Snap> {
        let id = self.id.take().expect("committed once");
        if let Err(e) = self.store.commit(&id) {
            self.id = Some(id);
            return Err(store_err("commit exec output")(e));
        }
        Snap::acquire(&self.store, id)
    }
}

impl Drop for MutableSnap {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            if let Err(e) = self.store.remove(&id) {
                tracing::warn!(snapshot = %id, error = %e, "removing discarded exec snapshot failed");
            }
        }
    }
}

/// What becomes of a mount after the run.
enum After {
    /// Nothing (read-only, tmpfs, secret, cache).
    Nothing,
    /// Commit this mutable snapshot as the next output.
    Commit(MutableSnap),
    /// Discard this mutable snapshot (writable, no output).
    Discard(MutableSnap),
    /// Re-export this input as the next output (read-only mount with an output).
    Reexport(Snap),
}

/// A prepared mount: its host mount (if any) and its fate.
struct Prepared {
    /// Held until the run ends; dropped (unmounted) before commits.
    mount: Option<Mount>,
    after: After,
    /// Whether this mount produces an output (bind with `output >= 0`).
    outputs: bool,
    /// Its index in the op's mounts.
    index: usize,
}

/// Everything held while the process runs.
#[derive(Default)]
struct Held {
    /// Bind mounts (root included), in mount order.
    binds: Vec<Prepared>,
    caches: Vec<CacheUse>,
}

impl Inner {
    async fn run(&self, ctx: &OpContext, inputs: &[Snap]) -> Result<Vec<Snap>> {
        let env = &self.env;
        let meta = self
            .exec
            .meta
            .clone()
            .ok_or_else(|| Error::Internal("exec op without meta".into()))?;
        let executor = executor_for(env).await?;

        let mut env_list = meta.env.clone();
        if let Some(p) = &meta.proxy_env {
            for (upper, v) in [
                ("HTTP_PROXY", &p.http_proxy),
                ("HTTPS_PROXY", &p.https_proxy),
                ("FTP_PROXY", &p.ftp_proxy),
                ("NO_PROXY", &p.no_proxy),
                ("ALL_PROXY", &p.all_proxy),
            ] {
                if !v.is_empty() {
                    env_list.push(format!("{upper}={v}"));
                    env_list.push(format!("{}={v}", upper.to_ascii_lowercase()));
                }
            }
        }
        if !env_list.iter().any(|e| e.starts_with("PATH=")) {
            env_list.push(format!("PATH={}", executor::DEFAULT_PATH));
        }
        for se in &self.exec.secretenv {
            match env.session.get_secret(&se.id).await? {
                Some(data) => {
                    let v = String::from_utf8(data).map_err(|_| {
                        op_err(
                            ErrorKind::InvalidArgument,
                            format!(
                                "secret {} used as env {} is not valid UTF-8",
                                se.id, se.name
                            ),
                            None,
                        )
                    })?;
                    env_list.push(format!("{}={v}", se.name));
                }
                None if se.optional => {}
                None => {
                    return Err(op_err(
                        ErrorKind::NotFound,
                        format!("secret {}: not found", se.id),
                        None,
                    ))
                }
            }
        }

        // Validate what is left before holding any mount.
        let mut extra_hosts = Vec::new();
        for h in &meta.extra_hosts {
            let ip = h.ip.parse().map_err(|_| {
                op_err(
                    ErrorKind::InvalidArgument,
                    format!("extra host {}: invalid IP address {:?}", h.host, h.ip),
                    None,
                )
            })?;
            extra_hosts.push(HostIp {
                host: h.host.clone(),
                ip,
            });
        }
        let network = match pb::NetMode::try_from(self.exec.network) {
            Ok(pb::NetMode::Unset) => NetMode::Sandbox,
            Ok(pb::NetMode::Host) => NetMode::Host,
            Ok(pb::NetMode::None) => NetMode::None,
            Err(_) => {
                return Err(op_err(
                    ErrorKind::InvalidArgument,
                    format!("unknown network mode {}", self.exec.network),
                    None,
                ))
            }
        };
        let security = match pb::SecurityMode::try_from(self.exec.security) {
            Ok(pb::SecurityMode::Sandbox) => SecurityMode::Sandbox,
            Ok(pb::SecurityMode::Insecure) => SecurityMode::Insecure,
            Err(_) => {
                return Err(op_err(
                    ErrorKind::InvalidArgument,
                    format!("unknown security mode {}", self.exec.security),
                    None,
                ))
            }
        };
        let PreparedMounts {
            held,
            ssh_socks,
            rootfs,
            readonly_rootfs,
            mounts: spec_mounts,
        } = prepare_mounts(env, &self.name, &self.exec.mounts, inputs, &ctx.cancel).await?;

        let spec = ProcessSpec {
            rootfs,
            readonly_rootfs,
            args: meta.args.clone(),
            env: env_list,
            cwd: meta.cwd.clone(),
            user: meta.user.clone(),
            hostname: meta.hostname.clone(),
            extra_hosts,
            network,
            security,
            mounts: spec_mounts,
            ulimits: meta
                .ulimit
                .iter()
                .map(|u| Ulimit {
                    name: u.name.clone(),
                    soft: u.soft.max(0) as u64,
                    hard: u.hard.max(0) as u64,
                })
                .collect(),
            cgroup_parent: meta.cgroup_parent.clone(),
            remove_mount_stubs_recursive: meta.remove_mount_stubs_recursive,
        };

        // Run, streaming output.
        let tail = Arc::new(Mutex::new(VecDeque::<u8>::new()));
        let (out_tx, out_rx) = tokio::sync::mpsc::channel::<Bytes>(64);
        let (err_tx, err_rx) = tokio::sync::mpsc::channel::<Bytes>(64);
        let pumps = [
            tokio::spawn(pump(
                out_rx,
                LogStream::Stdout,
                ctx.vertex.clone(),
                ctx.progress.clone(),
                tail.clone(),
            )),
            tokio::spawn(pump(
                err_rx,
                LogStream::Stderr,
                ctx.vertex.clone(),
                ctx.progress.clone(),
                tail.clone(),
            )),
        ];
        let io = ProcessIo {
            stdout: Some(out_tx),
            stderr: Some(err_tx),
            ..Default::default()
        };
        let res = executor.run(spec, io, ctx.cancel.clone()).await;
        drop(ssh_socks);
        for p in pumps {
            let _ = p.await;
        }
        // Unmount and commit (or discard) whatever the outcome.
        let valid = |code: i32| {
            if meta.valid_exit_codes.is_empty() {
                code == 0
            } else {
                meta.valid_exit_codes.contains(&code)
            }
        };
        let ok = matches!(&res, Ok(r) if valid(r.exit.code()));
        layerstore::dockerstore::fault::hold_point("exec:before-commit").await;
        if !ok {
            let left = blocking(move || Ok(finish_failed(held))).await?;
            let err = self.run_error(res, &meta, &tail);
            return Err(err.with_failure(self.failure(inputs, left)));
        }
        blocking(move || finish(held, true)).await
    }

    /// The error of a run that did not succeed.
    fn run_error(
        &self,
        res: std::result::Result<executor::ExecResult, executor::Error>,
        meta: &pb::Meta,
        tail: &Mutex<VecDeque<u8>>,
    ) -> Error {
        let res = match res {
            // The process never started (no such executable, …): buildkitd says which process,
            // as for a failing one.
            Err(executor::Error::RuncRun { message, .. }) => {
                return op_err(
                    ErrorKind::FailedPrecondition,
                    format!(
                        "process \"{}\" did not complete successfully: {message}",
                        meta.args.join(" ")
                    ),
                    None,
                );
            }
            Err(e) => return executor_err(e),
            Ok(r) => r,
        };
        let lines = tail_lines(&tail.lock().unwrap());
        let mut message = format!(
            "process \"{}\" did not complete successfully: {}",
            meta.args.join(" "),
            res.exit
        );
        if !lines.is_empty() {
            message.push_str("\nlast output:\n");
            message.push_str(&lines);
        }
        op_err(ErrorKind::FailedPrecondition, message, None)
    }

    /// What a failed run left: per mount its input, and its state after the run (a writable
    /// mount's committed state, else the input).
    fn failure(&self, inputs: &[Snap], left: Vec<(usize, Snap)>) -> crate::error::StepFailure {
        let store = &self.env.store;
        let ins: Vec<Option<crate::SolvedRef>> = self
            .exec
            .mounts
            .iter()
            .map(|m| {
                usize::try_from(m.input)
                    .ok()
                    .and_then(|i| inputs.get(i))
                    .map(|s| crate::SolvedRef::of_snap(store, s.clone()))
            })
            .collect();
        let mut mounts = ins.clone();
        for (i, snap) in left {
            if let Some(slot) = mounts.get_mut(i) {
                *slot = Some(crate::SolvedRef::of_snap(store, snap));
            }
        }
        crate::error::StepFailure {
            inputs: ins,
            mounts,
            subject: None,
        }
    }
}

/// The mounts of an exec (or a gateway container), prepared and held: secrets fetched, SSH
/// agent sockets listening, cache directories taken, snapshots mounted (BuildKit's
/// `PrepareMounts`). `inputs[m.input]` is each bind or cache mount's input.
pub(crate) struct PreparedMounts {
    held: Held,
    ssh_socks: HashMap<usize, ssh::SshSocket>,
    pub(crate) rootfs: PathBuf,
    pub(crate) readonly_rootfs: bool,
    pub(crate) mounts: Vec<ExecMount>,
}

impl PreparedMounts {
    /// Releases everything without committing any output (blocking: unmounts and removes the
    /// mutable snapshots).
    pub(crate) fn discard(self) {
        drop(self.ssh_socks);
        if let Err(e) = finish(self.held, false) {
            tracing::warn!(error = %e, "releasing mounts failed");
        }
    }
}

/// Prepares `mounts` (see [`PreparedMounts`]); `name` names the mutable snapshots.
pub(crate) async fn prepare_mounts(
    env: &BuildEnv,
    name: &str,
    mounts: &[pb::Mount],
    inputs: &[Snap],
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<PreparedMounts> {
    // Session-provided data first (no mounts held while waiting on the client).
    let mut secrets: HashMap<usize, Vec<u8>> = HashMap::new();
    for (i, m) in mounts.iter().enumerate() {
        if m.mount_type == pb::MountType::Secret as i32 {
            let opt = m.secret_opt.clone().unwrap_or_default();
            match env.session.get_secret(&opt.id).await? {
                Some(data) => {
                    secrets.insert(i, data);
                }
                None if opt.optional => {}
                None => {
                    return Err(op_err(
                        ErrorKind::NotFound,
                        format!("secret {}: not found", opt.id),
                        None,
                    ))
                }
            }
        }
    }
    // SSH agents: checked with the client before anything is mounted.
    let mut ssh_ids: HashMap<usize, String> = HashMap::new();
    for (i, m) in mounts.iter().enumerate() {
        if m.mount_type == pb::MountType::Ssh as i32 {
            let opt = m.ssh_opt.clone().unwrap_or_default();
            if ssh::check(env.session.as_ref(), &m.dest, &opt.id, opt.optional).await? {
                ssh_ids.insert(i, opt.id);
            }
        }
    }
    // Agent sockets, held (listening) until the process has ended.
    let mut ssh_socks: HashMap<usize, ssh::SshSocket> = HashMap::new();
    for (i, id) in &ssh_ids {
        let sock = ssh::SshSocket::listen(&env.opts.root, id, env.session.clone())?;
        ssh_socks.insert(*i, sock);
    }
    let ssh_paths: HashMap<usize, PathBuf> = ssh_socks
        .iter()
        .map(|(i, s)| (*i, s.path().to_path_buf()))
        .collect();
    // Cache mount directories (may wait for LOCKED users).
    // Mounts of one cache (same ID and seed) within this exec share one directory, whatever
    // their sharing mode, as buildkitd's per-exec mount manager does; so a LOCKED cache
    // mounted twice does not wait for itself.
    let mut held = Held::default();
    let mut cache_dirs: HashMap<usize, PathBuf> = HashMap::new();
    let mut by_key: HashMap<String, PathBuf> = HashMap::new();
    for (i, m) in mounts.iter().enumerate() {
        if m.mount_type != pb::MountType::Cache as i32 {
            continue;
        }
        let input = input_of(m, inputs)?;
        let key = CacheUse::key(m, input)?;
        if let Some(dir) = by_key.get(&key) {
            cache_dirs.insert(i, dir.clone());
            continue;
        }
        let u = CacheUse::acquire(env, m, &key, input, cancel).await?;
        cache_dirs.insert(i, u.dir.clone());
        by_key.insert(key, u.dir.clone());
        held.caches.push(u);
    }

    // Snapshot mounts (blocking store work).
    let store = env.store.clone();
    let mounts_pb = mounts.to_vec();
    let inputs_v = inputs.to_vec();
    let name = name.to_string();
    let (held, spec_mounts, rootfs, readonly_rootfs) = blocking(move || {
        let mut held = held;
        let mut spec_mounts = Vec::new();
        let mut rootfs = None;
        let mut readonly_rootfs = false;
        for (i, m) in mounts_pb.iter().enumerate() {
            let mt = pb::MountType::try_from(m.mount_type).map_err(|_| {
                op_err(
                    ErrorKind::InvalidArgument,
                    format!("mount {}: unknown mount type {}", m.dest, m.mount_type),
                    None,
                )
            })?;
            match mt {
                pb::MountType::Bind => {
                    let input = input_of(m, &inputs_v)?;
                    let p = prepare_bind(&store, i, m, input, &name)?;
                    let path = p.mount.as_ref().expect("bind mounts").path().to_path_buf();
                    let source = select(&path, &m.selector)?;
                    held.binds.push(p);
                    if m.dest == "/" {
                        readonly_rootfs = m.readonly;
                        rootfs = Some(source);
                    } else {
                        spec_mounts.push(ExecMount {
                            dest: m.dest.clone().into(),
                            kind: MountKind::Bind {
                                source,
                                readonly: m.readonly,
                            },
                        });
                    }
                }
                pb::MountType::Cache => {
                    let dir = cache_dirs[&i].clone();
                    spec_mounts.push(ExecMount {
                        dest: m.dest.clone().into(),
                        kind: MountKind::Bind {
                            source: dir,
                            readonly: m.readonly,
                        },
                    });
                }
                pb::MountType::Tmpfs => spec_mounts.push(ExecMount {
                    dest: m.dest.clone().into(),
                    kind: MountKind::Tmpfs {
                        size: m.tmpfs_opt.map(|t| t.size.max(0) as u64).unwrap_or(0),
                    },
                }),
                pb::MountType::Secret => {
                    let Some(data) = secrets.remove(&i) else {
                        continue; // optional and missing
                    };
                    let opt = m.secret_opt.clone().unwrap_or_default();
                    spec_mounts.push(ExecMount {
                        dest: m.dest.clone().into(),
                        kind: MountKind::SecretFile {
                            data,
                            uid: opt.uid,
                            gid: opt.gid,
                            mode: opt.mode,
                        },
                    });
                }
                pb::MountType::Ssh => {
                    let Some(source) = ssh_paths.get(&i).cloned() else {
                        continue; // optional and missing
                    };
                    let opt = m.ssh_opt.clone().unwrap_or_default();
                    spec_mounts.push(ExecMount {
                        dest: m.dest.clone().into(),
                        kind: MountKind::SshSocket {
                            source,
                            uid: opt.uid,
                            gid: opt.gid,
                            mode: opt.mode,
                        },
                    });
                }
            }
        }
        let rootfs = rootfs.ok_or_else(|| Error::Internal("exec op without root mount".into()))?;
        Ok((held, spec_mounts, rootfs, readonly_rootfs))
    })
    .await?;

    Ok(PreparedMounts {
        held,
        ssh_socks,
        rootfs,
        readonly_rootfs,
        mounts: spec_mounts,
    })
}

/// The input snapshot of a bind or cache mount (`None` for `-1`, scratch).
fn input_of<'a>(m: &pb::Mount, inputs: &'a [Snap]) -> Result<Option<&'a Snap>> {
    if m.input < 0 {
        return Ok(None);
    }
    inputs
        .get(m.input as usize)
        .map(Some)
        .ok_or_else(|| Error::Internal(format!("mount {} input {} missing", m.dest, m.input)))
}

fn prepare_bind(
    store: &SnapshotStore,
    index: usize,
    m: &pb::Mount,
    input: Option<&Snap>,
    name: &str,
) -> Result<Prepared> {
    let outputs = m.output >= 0;
    let ro_mount = |input: Option<&Snap>| -> Result<Mount> {
        match input {
            Some(s) => store.mount(s.id(), None),
            None => store.mount_chain(&Chain::default(), None),
        }
        .map_err(store_err("mount exec input"))
    };
    // The root always gets a writable layer on the host (the executor creates mount points and
    // `/etc/hosts`/`resolv.conf` stubs in it); a read-only root is enforced in the container.
    if m.readonly && m.dest != "/" {
        let mount = ro_mount(input)?;
        let after = if outputs {
            let snap = match input {
                Some(s) => s.clone(),
                None => {
                    let id = store
                        .create_from_chain(Chain::default(), &[], &SnapshotOptions::new("scratch"))
                        .map_err(store_err("create scratch snapshot"))?;
                    Snap::acquire(store, id)?
                }
            };
            After::Reexport(snap)
        } else {
            After::Nothing
        };
        return Ok(Prepared {
            mount: Some(mount),
            after,
            outputs,
            index,
        });
    }
    let what = format!("mount {} from exec {}", m.dest, name);
    let ms = MutableSnap::prepare(store, input, &what)?;
    let mount = store
        .mount(ms.id(), None)
        .map_err(store_err("mount exec snapshot"))?;
    Ok(Prepared {
        mount: Some(mount),
        after: if outputs {
            After::Commit(ms)
        } else {
            After::Discard(ms)
        },
        outputs,
        index,
    })
}

/// The host path of `selector` inside the mounted input at `root`, resolved without leaving it.
fn select(root: &Path, selector: &str) -> Result<PathBuf> {
    let rel = selector.trim_start_matches('/');
    if rel.is_empty() || rel == "." {
        return Ok(root.to_path_buf());
    }
    let invalid = |reason: String| Error::InvalidPath {
        path: selector.to_string(),
        reason,
    };
    let r = pathrs::Root::open(root).map_err(|e| invalid(format!("open mount: {e}")))?;
    let h = r.resolve(rel).map_err(|e| {
        if e.kind() == pathrs::error::ErrorKind::OsError(Some(libc::ENOENT)) {
            Error::PathNotFound {
                path: selector.to_string(),
            }
        } else {
            invalid(e.to_string())
        }
    })?;
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd_path = format!("/proc/self/fd/{}", h.as_fd().as_raw_fd());
    let real = std::fs::read_link(&fd_path).map_err(|e| Error::io("readlink", &fd_path, e))?;
    drop(h);
    if !real.starts_with(root) {
        return Err(invalid("resolves outside its mount".into()));
    }
    Ok(real)
}

/// After the run: unmount everything, then commit outputs (only when `ok`) in mount order.
fn finish(held: Held, ok: bool) -> Result<Vec<Snap>> {
    let Held { mut binds, caches } = held;
    drop(caches);
    // Unmount everything first: a mounted snapshot cannot be committed.
    for p in &mut binds {
        if let Some(m) = p.mount.take() {
            if let Err(e) = m.unmount() {
                tracing::warn!(error = %e, "unmounting exec mount failed");
            }
        }
    }
    let mut out = Vec::new();
    let mut first_err = None;
    for p in binds {
        match p.after {
            After::Nothing => {}
            After::Discard(ms) => drop(ms),
            After::Reexport(s) => {
                if p.outputs {
                    out.push(s)
                }
            }
            After::Commit(ms) => {
                if !ok {
                    drop(ms);
                    continue;
                }
                match ms.commit() {
                    Ok(s) => out.push(s),
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// After a failed run: unmount everything and commit every writable mount's state as the
/// process left it (outputs or not, as buildkitd's exec does for `ExecError`), by mount index.
/// A state that cannot be committed is logged and left out: the step's own error matters more.
fn finish_failed(held: Held) -> Vec<(usize, Snap)> {
    let Held { mut binds, caches } = held;
    drop(caches);
    for p in &mut binds {
        if let Some(m) = p.mount.take() {
            if let Err(e) = m.unmount() {
                tracing::warn!(error = %e, "unmounting exec mount failed");
            }
        }
    }
    let mut out = Vec::new();
    for p in binds {
        match p.after {
            After::Commit(ms) | After::Discard(ms) => match ms.commit() {
                Ok(s) => out.push((p.index, s)),
                Err(e) => {
                    tracing::warn!(error = %e, mount = p.index, "keeping a failed exec's state failed")
                }
            },
            After::Nothing | After::Reexport(_) => {}
        }
    }
    out
}

async fn pump(
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
    stream: LogStream,
    vertex: String,
    progress: ProgressSink,
    tail: Arc<Mutex<VecDeque<u8>>>,
) {
    while let Some(chunk) = rx.recv().await {
        {
            let mut t = tail.lock().unwrap();
            t.extend(chunk.iter());
            let excess = t.len().saturating_sub(TAIL_BYTES);
            t.drain(..excess);
        }
        progress.send(ProgressEvent::VertexLog {
            vertex: vertex.clone(),
            stream,
            data: chunk.to_vec(),
            timestamp: SystemTime::now(),
        });
    }
}

/// The last [`TAIL_LINES`] lines of `buf`, lossily decoded.
fn tail_lines(buf: &VecDeque<u8>) -> String {
    let bytes: Vec<u8> = buf.iter().copied().collect();
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.trim_end_matches('\n').lines().collect();
    let start = lines.len().saturating_sub(TAIL_LINES);
    lines[start..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Cache mounts

/// Instances in use per cache instance directory (all workers of this process).
fn busy() -> &'static Mutex<HashMap<PathBuf, usize>> {
    static BUSY: OnceLock<Mutex<HashMap<PathBuf, usize>>> = OnceLock::new();
    BUSY.get_or_init(Default::default)
}

/// The file in a cache's base directory that names its cache ID (caches of one ID with
/// different seeds have different base directories).
const CACHE_ID_FILE: &str = ".cache-id";

/// Empties the cache mounts with these IDs (all seeds and instances), as buildkitd does before a
/// build in which an exec with `ignore_cache` (no-cache) mounts them: such a build starts from
/// empty caches. Instances in use by a running build are left alone. Blocking.
pub(crate) fn prune_cache_mounts(root: &Path, ids: &[String]) -> Result<()> {
    let caches = root.join("worker").join("cache");
    let rd = match std::fs::read_dir(&caches) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("read cache mounts", &caches, e)),
    };
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    for entry in rd.flatten() {
        let base = entry.path();
        let Ok(id) = std::fs::read_to_string(base.join(CACHE_ID_FILE)) else {
            continue;
        };
        if !ids.contains(&id) {
            continue;
        }
        let instances: Vec<PathBuf> = std::fs::read_dir(&base)
            .map_err(|e| Error::io("read cache mount", &base, e))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        for dir in instances {
            let gone = caches.join(format!(
                ".pruned-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            {
                // Under the busy map's lock: an acquire marks its instance busy before it looks
                // at the directory, so it either keeps this one or creates a fresh one.
                let b = busy().lock().unwrap();
                if b.contains_key(&dir) {
                    continue;
                }
                std::fs::rename(&dir, &gone)
                    .map_err(|e| Error::io("prune cache mount", &dir, e))?;
            }
            std::fs::remove_dir_all(&gone)
                .map_err(|e| Error::io("remove cache mount", &gone, e))?;
        }
    }
    Ok(())
}

/// Locks for `LOCKED` sharing, per instance directory.
fn lock_for(dir: &Path) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .entry(dir.to_path_buf())
        .or_default()
        .clone()
}

/// One use of a cache directory; releases its busy mark (and lock) on drop.
struct CacheUse {
    dir: PathBuf,
    _lock: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for CacheUse {
    fn drop(&mut self) {
        let mut b = busy().lock().unwrap();
        if let Some(n) = b.get_mut(&self.dir) {
            *n -= 1;
            if *n == 0 {
                b.remove(&self.dir);
            }
        }
    }
}

impl CacheUse {
    /// The cache's identity: its ID, plus the seed input and selector when it has an input
    /// (seeded caches are distinct per seed content).
    fn key(m: &pb::Mount, input: Option<&Snap>) -> Result<String> {
        let opt = m.cache_opt.clone().unwrap_or_default();
        if opt.id.is_empty() {
            return Err(op_err(
                ErrorKind::InvalidArgument,
                format!("cache mount {} has no ID", m.dest),
                None,
            ));
        }
        let mut h = crate::digest::KeyHasher::new("cache-mount");
        h.field(opt.id.as_bytes());
        if let Some(i) = input {
            h.field(i.id().as_str().as_bytes())
                .field(m.selector.as_bytes());
        }
        Ok(h.finish())
    }

    /// Takes an instance directory of the cache `key` (from [`CacheUse::key`]) for mount `m`,
    /// waiting for other users of a `LOCKED` cache.
    async fn acquire(
        env: &BuildEnv,
        m: &pb::Mount,
        key: &str,
        input: Option<&Snap>,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<CacheUse> {
        let opt = m.cache_opt.clone().unwrap_or_default();
        let base = env
            .opts
            .root
            .join("worker")
            .join("cache")
            .join(key.trim_start_matches("sha256:"));
        let sharing = pb::CacheSharingOpt::try_from(opt.sharing).unwrap_or_default();
        let (dir, lock) = match sharing {
            pb::CacheSharingOpt::Shared => (base.join("0"), None),
            pb::CacheSharingOpt::Locked => {
                let dir = base.join("0");
                let lock = lock_for(&dir);
                let g = tokio::select! {
                    g = lock.lock_owned() => g,
                    _ = cancel.cancelled() => return Err(Error::Canceled),
                };
                (dir, Some(g))
            }
            pb::CacheSharingOpt::Private => {
                let b = busy().lock().unwrap();
                let mut n = 0;
                while b.contains_key(&base.join(n.to_string())) {
                    n += 1;
                }
                (base.join(n.to_string()), None)
            }
        };
        *busy().lock().unwrap().entry(dir.clone()).or_insert(0) += 1;
        let use_ = CacheUse { dir, _lock: lock };
        let id_file = base.join(CACHE_ID_FILE);
        if !id_file.exists() {
            let id = opt.id.clone();
            blocking(move || {
                std::fs::create_dir_all(id_file.parent().expect("has a parent"))
                    .and_then(|_| std::fs::write(&id_file, id))
                    .map_err(|e| Error::io("write cache mount id", &id_file, e))
            })
            .await?;
        }
        if !use_.dir.exists() {
            let dir = use_.dir.clone();
            let store = env.store.clone();
            let seed = input.cloned();
            let selector = m.selector.clone();
            blocking(move || create_cache_dir(&store, &dir, seed.as_ref(), &selector)).await?;
        }
        Ok(use_)
    }
}

/// Creates a cache directory, seeded from `seed` (its `selector` sub-path) if given. Built in a
/// temporary sibling and renamed into place, so a crash never leaves a half-seeded cache.
fn create_cache_dir(
    store: &SnapshotStore,
    dir: &Path,
    seed: Option<&Snap>,
    selector: &str,
) -> Result<()> {
    let parent = dir.parent().expect("cache dirs have a parent");
    std::fs::create_dir_all(parent).map_err(|e| Error::io("create cache dir", parent, e))?;
    // Unique per call: two builds may create the same cache dir at once in this process.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = parent.join(format!(
        ".tmp-{}-{}-{}",
        dir.file_name().unwrap().to_string_lossy(),
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| Error::io("create cache dir", &tmp, e))?;
    if let Some(seed) = seed {
        let m = store
            .mount(seed.id(), None)
            .map_err(store_err("mount cache seed"))?;
        let src = select(m.path(), selector)?;
        let out = std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", src.display()))
            .arg(&tmp)
            .output()
            .map_err(|e| Error::io("run cp", &tmp, e))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(op_err(
                ErrorKind::Internal,
                format!(
                    "seeding cache dir {}: cp: {}",
                    dir.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                None,
            ));
        }
    }
    match std::fs::rename(&tmp, dir) {
        Ok(()) => Ok(()),
        // Another build created it first (rename onto a non-empty dir): use theirs.
        Err(_) if dir.is_dir() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => Err(Error::io("rename cache dir", dir, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_lines() {
        let mut b = VecDeque::new();
        for i in 0..25 {
            b.extend(format!("line {i}\n").bytes());
        }
        let t = tail_lines(&b);
        assert!(t.starts_with("line 15\n"), "{t}");
        assert!(t.ends_with("line 24"), "{t}");
    }

    fn exec_with(hosts_ip: &str, proxy: Option<&str>, selector: &str) -> (pb::Op, pb::ExecOp) {
        let exec = pb::ExecOp {
            meta: Some(pb::Meta {
                args: vec!["true".into()],
                extra_hosts: vec![pb::HostIp {
                    host: "h".into(),
                    ip: hosts_ip.into(),
                }],
                proxy_env: proxy.map(|p| pb::ProxyEnv {
                    http_proxy: p.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            mounts: vec![pb::Mount {
                dest: "/".into(),
                selector: selector.into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let op = pb::Op {
            op: Some(OpPayload::Exec(exec.clone())),
            ..Default::default()
        };
        (op, exec)
    }

    #[test]
    fn key_ignores_volatile_fields_only() {
        let p = crate::worker::Platform::host();
        let key = |ip: &str, proxy: Option<&str>, sel: &str| {
            let (op, e) = exec_with(ip, proxy, sel);
            cache_key(&op, &e, &p, &[], &[])
        };
        let base = key("1.2.3.4", None, "");
        assert_eq!(base, key("5.6.7.8", None, ""));
        assert_eq!(base, key("1.2.3.4", Some("http://proxy:3128"), ""));
        assert_ne!(base, key("1.2.3.4", None, "/sub"));
        // An explicit platform equal to the default gives the same key.
        let (mut op, e) = exec_with("1.2.3.4", None, "");
        op.platform = Some(pb::Platform {
            os: p.os.clone(),
            architecture: p.architecture.clone(),
            ..Default::default()
        });
        assert_eq!(base, cache_key(&op, &e, &p, &[], &[]));
        op.platform.as_mut().unwrap().architecture = "s390x-other".into();
        assert_ne!(base, cache_key(&op, &e, &p, &[], &[]));
    }

    #[test]
    fn select_stays_inside() {
        let d = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(d.path()).unwrap();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("esc")).unwrap();
        std::os::unix::fs::symlink("../../..", root.join("a/up")).unwrap();
        assert_eq!(select(&root, "/a/b").unwrap(), root.join("a/b"));
        assert_eq!(select(&root, "").unwrap(), root);
        // Absolute symlink: resolved inside the root, where /etc does not exist.
        assert!(matches!(
            select(&root, "/esc"),
            Err(Error::PathNotFound { .. })
        ));
        // `..` through a symlink stays at the root.
        assert_eq!(select(&root, "/a/up").unwrap(), root);
    }
}
