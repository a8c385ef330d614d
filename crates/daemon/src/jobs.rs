//! Jobs (builds) by ref: registration, lookup with waiting, gateway state and the hand-off of the
//! client's `LLBBridge.Return` to the waiting `Control.Solve`.
//!
//! A job is registered as the first thing `Control.Solve` does. `Status` waits up to 6 s and
//! LLBBridge calls up to 3 s for it to appear. After the job ends it stays findable (for `Status`
//! replay) for [`KEEP_AFTER_END`], but no longer accepts gateway calls.

use crate::errors::{Error, Result};
use crate::progress::Progress;
use crate::solver::{Backend, FsRef, SolveCtx};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

/// How long a finished job stays visible to `Status`.
pub const KEEP_AFTER_END: Duration = Duration::from_secs(10);

/// What the client returned through `LLBBridge.Return`, or what a direct solve produced.
#[derive(Debug, Clone)]
pub struct BuildResult {
    /// The filesystem result (`None` = no result, nothing to export).
    pub fs: Option<FsRef>,
    /// A multi-platform result (a `Return` with a ref map): the refs by platform ID, their
    /// platforms in the `refs.platforms` metadata. Empty for a single result.
    pub refs: BTreeMap<String, FsRef>,
    /// Result metadata (`containerimage.config`...).
    pub metadata: BTreeMap<String, Bytes>,
    /// Attestations by platform key (from a gateway `Return`).
    pub attestations: crate::attestations::Attestations,
    /// Definitions of the returned refs as the client sent them (`""` for a single ref, else
    /// the platform key), for scanning the result ([`crate::sbom`]).
    pub defs: BTreeMap<String, protos::pb::Definition>,
    /// What the frontend berthd ran asked for, for provenance ([`crate::provenance`]), by the
    /// key of the ref it made (`""` for a single ref); none for a frontend image's result and
    /// for a gateway client's own definitions.
    pub provenance: BTreeMap<String, Arc<crate::provenance::Captured>>,
}

/// A gateway ref: a solved result, or a definition that is solved the first time the ref is
/// used. buildkitd's `LLBBridge.Solve` without `Evaluate` only loads the definition and hands
/// out a lazy result: nothing runs (and nothing can fail) until a file call, a container mount
/// or `Return` needs the filesystem.
#[derive(Clone)]
enum GatewayRef {
    Ready(FsRef),
    Lazy(Arc<LazyRef>),
}

struct LazyRef {
    def: protos::pb::Definition,
    ctx: SolveCtx,
    /// The result once solved. A failed solve is not kept: the next use solves again (and,
    /// with the same inputs, fails again from the solver's own state).
    solved: tokio::sync::OnceCell<FsRef>,
}

/// One build.
pub struct Job {
    /// Build ref.
    pub id: String,
    /// Session id from the solve request.
    pub session_id: String,
    /// Progress log.
    pub progress: Arc<Progress>,
    /// Canceled when the job must stop (client gone, session lost, shutdown).
    pub cancel: CancellationToken,
    /// Why the job was canceled, if not by the client.
    cancel_reason: Mutex<Option<Error>>,
    /// Entitlements requested.
    pub entitlements: Vec<String>,
    /// Frontend attributes of the solve request.
    pub frontend_attrs: BTreeMap<String, String>,
    /// Gateway results by ref id.
    refs: Mutex<HashMap<String, GatewayRef>>,
    /// For gateway refs a frontend berthd ran made: its provenance capture and the ref's
    /// definition, by ref id.
    ref_provenance:
        Mutex<HashMap<String, (Arc<crate::provenance::Captured>, protos::pb::Definition)>>,
    /// Where `Return` delivers.
    returned: Mutex<Option<oneshot::Sender<Result<BuildResult>>>>,
    /// Set when the job ended.
    pub ended: CancellationToken,
    /// When the job was registered.
    pub started: std::time::Instant,
    /// Gateway containers of this build (released when it ends).
    pub containers: gateway::ContainerSet,
    /// Caches imported for the job's solves (`SolveRequest.cache.imports`, see `crate::cache`).
    pub cache_imports: Mutex<Vec<worker::CacheSourceRef>>,
    /// The job exports its build cache (`SolveRequest.cache.exports`): its solves compute
    /// stock BuildKit's cache keys for the export (`worker::SolveContext::stock_keys`).
    pub cache_export: std::sync::atomic::AtomicBool,
}

/// A job as `/debug/state` shows it.
#[derive(Debug, Clone)]
pub struct JobInfo {
    /// Build ref.
    pub id: String,
    /// Session id.
    pub session_id: String,
    /// Not ended yet.
    pub running: bool,
    /// Time since registration.
    pub age: Duration,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Job {
    /// A context for solving in this job: its session, progress, cancellation, entitlements,
    /// imported caches and whether it exports its cache.
    pub fn solve_ctx(&self) -> SolveCtx {
        SolveCtx {
            job_id: self.id.clone(),
            session_id: self.session_id.clone(),
            progress: self.progress.clone(),
            cancel: self.cancel.clone(),
            entitlements: self.entitlements.clone(),
            cache_imports: self.cache_imports.lock().unwrap().clone(),
            cache_export: self.cache_export.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// A new job and the receiver of its `Return`.
    pub fn new(
        id: String,
        session_id: String,
        entitlements: Vec<String>,
        frontend_attrs: BTreeMap<String, String>,
    ) -> (Arc<Job>, oneshot::Receiver<Result<BuildResult>>) {
        let (tx, rx) = oneshot::channel();
        (
            Arc::new(Job {
                id,
                session_id,
                progress: Progress::new(),
                cancel: CancellationToken::new(),
                cancel_reason: Mutex::new(None),
                entitlements,
                frontend_attrs,
                refs: Mutex::new(HashMap::new()),
                ref_provenance: Mutex::new(HashMap::new()),
                returned: Mutex::new(Some(tx)),
                ended: CancellationToken::new(),
                started: std::time::Instant::now(),
                containers: gateway::ContainerSet::new(),
                cache_imports: Mutex::new(Vec::new()),
                cache_export: std::sync::atomic::AtomicBool::new(false),
            }),
            rx,
        )
    }

    /// Cancels the job with a reason.
    pub fn cancel_with(&self, reason: Error) {
        let mut r = self.cancel_reason.lock().unwrap();
        if r.is_none() {
            *r = Some(reason);
        }
        self.cancel.cancel();
    }

    /// The error to report for a canceled job.
    pub fn cancel_error(&self) -> Error {
        match &*self.cancel_reason.lock().unwrap() {
            Some(Error::Unavailable { what }) => Error::unavailable(what.clone()),
            Some(e) => Error::Remote {
                code: e.code(),
                message: e.to_string(),
            }
            .with_details(e.details()),
            None => Error::Canceled,
        }
    }

    /// Stores a gateway result and returns its ref id (`""` for scratch).
    pub fn add_ref(&self, r: FsRef) -> String {
        if r.is_scratch() {
            return String::new();
        }
        let id = crate::workers::new_id();
        self.refs
            .lock()
            .unwrap()
            .insert(id.clone(), GatewayRef::Ready(r));
        id
    }

    /// Records what made gateway ref `id` (a frontend berthd ran), for provenance.
    pub fn set_ref_provenance(
        &self,
        id: &str,
        captured: Arc<crate::provenance::Captured>,
        def: protos::pb::Definition,
    ) {
        if !id.is_empty() {
            self.ref_provenance
                .lock()
                .unwrap()
                .insert(id.to_string(), (captured, def));
        }
    }

    /// What [`Job::set_ref_provenance`] recorded for ref `id`.
    pub fn ref_provenance(
        &self,
        id: &str,
    ) -> Option<(Arc<crate::provenance::Captured>, protos::pb::Definition)> {
        self.ref_provenance.lock().unwrap().get(id).cloned()
    }

    /// Stores a definition that is solved (with `ctx`) when the ref is first used, and returns
    /// its ref id; an empty definition is scratch (`""`), as [`Backend::solve`] makes it.
    pub fn add_lazy_ref(&self, def: Option<protos::pb::Definition>, ctx: SolveCtx) -> String {
        let Some(def) = def.filter(|d| !d.def.is_empty()) else {
            return String::new();
        };
        let id = crate::workers::new_id();
        let lazy = LazyRef {
            def,
            ctx,
            solved: tokio::sync::OnceCell::new(),
        };
        self.refs
            .lock()
            .unwrap()
            .insert(id.clone(), GatewayRef::Lazy(Arc::new(lazy)));
        id
    }

    /// Looks up a gateway ref (`""` = scratch), solving it first if it is still lazy.
    pub async fn get_ref(&self, backend: &Arc<Backend>, id: &str) -> Result<FsRef> {
        if id.is_empty() {
            return Ok(FsRef::Scratch);
        }
        let r = self
            .refs
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("no such ref: {id}")))?;
        match r {
            GatewayRef::Ready(fs) => Ok(fs),
            GatewayRef::Lazy(lazy) => {
                let fs = lazy
                    .solved
                    .get_or_try_init(|| backend.solve_unread(Some(lazy.def.clone()), &lazy.ctx))
                    .await;
                match fs {
                    Err(_) if self.cancel.is_cancelled() => Err(self.cancel_error()),
                    Err(e) => Err(self.solve_error(&lazy.def, e)),
                    Ok(r) => Ok(r.clone()),
                }
            }
        }
    }

    /// The error of a gateway solve of `def` as buildkitd's LLBBridge returns it: with an
    /// `errdefs.Solve` detail (outermost) naming the op that failed and, when the step left
    /// states for inspection, their refs, registered in this job like any result so that a
    /// client can mount them in a container (`InputIDs`/`MountIDs`, `""` where there is none).
    pub fn solve_error(&self, def: &protos::pb::Definition, e: Error) -> Error {
        let Some(we) = e.worker_error() else {
            return e;
        };
        let op = we.vertex_digest().and_then(|d| op_of(def, d));
        let mut solve = protos::errdefs::Solve {
            op,
            ..Default::default()
        };
        if let Some(f) = we.step_failure() {
            let ids = |refs: &[Option<worker::SolvedRef>]| -> Vec<String> {
                refs.iter()
                    .map(|r| match r {
                        Some(r) => self.add_ref(FsRef::Solved(r.clone())),
                        None => String::new(),
                    })
                    .collect()
            };
            solve.input_i_ds = ids(&f.inputs);
            solve.mount_i_ds = ids(&f.mounts);
            use protos::errdefs::solve::Subject;
            solve.subject = f.subject.and_then(|s| match s {
                worker::FailedSubject::FileAction(i) => {
                    Some(Subject::File(protos::errdefs::FileAction {
                        index: i as i64,
                    }))
                }
                worker::FailedSubject::ContentCache(i) => {
                    Some(Subject::Cache(protos::errdefs::ContentCache {
                        index: i as i64,
                    }))
                }
                // The enum is non-exhaustive: a subject the protocol cannot name is left out.
                _ => None,
            });
        }
        Error::Detailed {
            error: Box::new(e),
            details: vec![protos::details::solve_to_any(&solve)],
        }
    }

    /// Delivers the client's `Return`; a second `Return` is an error.
    pub fn deliver(&self, r: Result<BuildResult>) -> Result<()> {
        match self.returned.lock().unwrap().take() {
            Some(tx) => {
                let _ = tx.send(r);
                Ok(())
            }
            None => Err(Error::invalid(format!(
                "build {}: result was already returned",
                self.id
            ))),
        }
    }
}

/// The op of `def` whose digest is `digest`.
fn op_of(def: &protos::pb::Definition, digest: &str) -> Option<protos::pb::Op> {
    use prost::Message as _;
    use sha2::Digest as _;
    def.def
        .iter()
        .find(|b| format!("sha256:{}", hex::encode(sha2::Sha256::digest(b))) == digest)
        .and_then(|b| protos::pb::Op::decode(&b[..]).ok())
}

/// All jobs.
#[derive(Default)]
pub struct Jobs {
    map: Mutex<HashMap<String, Arc<Job>>>,
    changed: Notify,
}

impl Jobs {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Jobs::default())
    }

    /// Registers a job; a ref already in use is an error.
    pub fn register(&self, job: Arc<Job>) -> Result<()> {
        let mut m = self.map.lock().unwrap();
        if m.contains_key(&job.id) {
            return Err(Error::invalid(format!("job ID {} exists", job.id)));
        }
        m.insert(job.id.clone(), job);
        drop(m);
        self.changed.notify_waiters();
        Ok(())
    }

    /// Finds a job, waiting up to `wait` for it to be registered.
    pub async fn get(&self, id: &str, wait: Duration) -> Result<Arc<Job>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            if let Some(j) = self.map.lock().unwrap().get(id) {
                return Ok(j.clone());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Error::not_found(format!("no such job {id}")));
            }
        }
    }

    /// Marks the job ended and forgets it after [`KEEP_AFTER_END`].
    pub fn end(self: &Arc<Self>, job: &Arc<Job>) {
        job.ended.cancel();
        job.progress.finish();
        // results are released (their leases dropped) when the job ends
        job.refs.lock().unwrap().clear();
        let jobs = self.clone();
        let job = job.clone();
        tokio::spawn(async move {
            // normally already done by Control.Solve before it answered
            job.containers.release_all().await;
            tokio::time::sleep(KEEP_AFTER_END).await;
            let mut m = jobs.map.lock().unwrap();
            if m.get(&job.id).is_some_and(|j| Arc::ptr_eq(j, &job)) {
                m.remove(&job.id);
            }
        });
    }

    /// Cancels every job (shutdown).
    pub fn cancel_all(&self, reason: &str) {
        for j in self.map.lock().unwrap().values() {
            j.cancel_with(Error::unavailable(reason.to_string()));
        }
    }

    /// Every known job (running, or ended less than [`KEEP_AFTER_END`] ago).
    pub fn list(&self) -> Vec<JobInfo> {
        let mut v: Vec<JobInfo> = self
            .map
            .lock()
            .unwrap()
            .values()
            .map(|j| JobInfo {
                id: j.id.clone(),
                session_id: j.session_id.clone(),
                running: !j.ended.is_cancelled(),
                age: j.started.elapsed(),
            })
            .collect();
        v.sort_by_key(|j| std::cmp::Reverse(j.age));
        v
    }

    /// Number of running jobs.
    pub fn running(&self) -> usize {
        self.map
            .lock()
            .unwrap()
            .values()
            .filter(|j| !j.ended.is_cancelled())
            .count()
    }
}
