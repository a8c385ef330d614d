//! The solver core: schedules a DAG of vertices with cache keys, free of LLB specifics.
//!
//! A vertex is an [`Op`] plus edges to outputs of other vertices. For each build the solver
//! evaluates the vertices reachable from the target:
//! 1. wait for the inputs (independent branches run concurrently);
//! 2. announce the vertex ([`ProgressEvent::VertexStarted`]) and ask the op for its cache key,
//!    given the inputs' keys and results ([`Op::cache_key`]) — the op may look at input content;
//! 3. unless the vertex ignores the cache, load the result for that key from the [`CacheStore`]:
//!    a hit completes the vertex as `cached`;
//! 4. otherwise execute it ([`Op::exec`]), at most `max_parallelism` executions at once across all
//!    builds, and store the result. Identical vertices (same cache key) of concurrent builds
//!    execute once: the first build runs it, the others wait for its result.
//!
//! Invariants: every announced vertex gets exactly one completion event; when a build fails or is
//! canceled, all its in-progress work is dropped (which releases mounts held by ops) and the
//! still-running vertices are completed with `context canceled`.
//!
//! Ported concept: `moby/buildkit` `solver/jobs.go` + `solver/scheduler.go` (much simplified:
//! one cache-key phase per vertex, no cache-key "slow" phases).
//!
//! Observability: each announced vertex runs in a `vertex` span (debug level, child of the span
//! current when [`Solver::solve`] was called, `cached` recorded at the end), and the solver
//! counts `berth_vertex_executions_total` (once per execution, however many builds waited for
//! it) and `berth_vertex_cache_hits_total` through the `metrics` facade (no-ops unless the
//! daemon installed a recorder; names documented in `telemetry::metrics`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::{OnceCell, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::error::{Error, Result};
use crate::progress::{ProgressEvent, ProgressGroup, ProgressSink};

/// One solved output of a vertex: its cache key and its result.
#[derive(Debug, Clone)]
pub(crate) struct Solved<R> {
    /// Cache key of this output (vertex key + output index).
    pub key: String,
    /// The result.
    pub result: R,
}

/// What an op sees while computing its key or executing.
#[derive(Clone, Debug)]
pub(crate) struct OpContext {
    /// The vertex digest (for statuses and logs).
    pub vertex: String,
    /// Progress of the build.
    pub progress: ProgressSink,
    /// Canceled when the build is canceled or failed.
    pub cancel: CancellationToken,
}

/// The work behind a vertex.
#[async_trait]
pub(crate) trait Op<R>: Send + Sync {
    /// Cache key of the vertex, from its inputs. Must depend on everything that affects the
    /// result.
    async fn cache_key(&self, ctx: &OpContext, inputs: &[Solved<R>]) -> Result<String>;
    /// Executes the vertex; returns one result per output.
    async fn exec(&self, ctx: &OpContext, inputs: &[Solved<R>]) -> Result<Vec<R>>;
}

/// Persistent map from cache keys to results.
#[async_trait]
pub(crate) trait CacheStore<R>: Send + Sync {
    /// The `outputs` results for `key`, if all are present and still usable.
    async fn load(&self, key: &str, outputs: usize) -> Result<Option<Vec<R>>>;
    /// Records the results for `key`.
    async fn save(&self, key: &str, results: &[R]) -> Result<()>;
}

/// One vertex of a build graph.
pub(crate) struct Vertex<R> {
    /// Identity for progress (LLB: op digest).
    pub digest: String,
    /// Display name.
    pub name: String,
    /// `(vertex index, output index)` for each input, in op order.
    pub inputs: Vec<(usize, usize)>,
    /// Number of outputs the op produces.
    pub outputs: usize,
    /// Always execute, never load from cache.
    pub ignore_cache: bool,
    /// Progress group, if any.
    pub progress_group: Option<ProgressGroup>,
    /// The work.
    pub op: Arc<dyn Op<R>>,
}

type Outputs<R> = Arc<Vec<Solved<R>>>;
type SharedResult<R> = std::result::Result<Outputs<R>, Arc<Error>>;
type VertexFuture<R> = Shared<BoxFuture<'static, SharedResult<R>>>;

/// Counters of what a build did (for tests and logs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SolveStats {
    /// Vertices whose result came from the cache.
    pub cached: usize,
    /// Vertices executed by this build.
    pub executed: usize,
}

/// The scheduler shared by all builds of a worker.
pub(crate) struct Solver<R> {
    cache: Arc<dyn CacheStore<R>>,
    limit: Arc<Semaphore>,
    #[allow(clippy::type_complexity)]
    inflight: Mutex<HashMap<String, Arc<OnceCell<Arc<Vec<R>>>>>>,
}

/// An announced vertex: (name, input digests, start).
type Running = (String, Vec<String>, SystemTime);

/// Per-build state shared by the vertex futures.
struct Job {
    progress: ProgressSink,
    cancel: CancellationToken,
    /// Vertices announced but not yet completed: digest → (name, inputs, started).
    running: Mutex<HashMap<String, Running>>,
    stats: Mutex<SolveStats>,
    /// Parent of the vertex spans.
    span: tracing::Span,
}

/// Counter of vertex executions (`telemetry::metrics::VERTEX_EXECUTIONS`).
const EXECUTIONS: &str = "berth_vertex_executions_total";
/// Counter of vertex cache hits (`telemetry::metrics::VERTEX_CACHE_HITS`).
const CACHE_HITS: &str = "berth_vertex_cache_hits_total";

impl Job {
    fn start(
        &self,
        digest: &str,
        name: &str,
        inputs: Vec<String>,
        group: Option<ProgressGroup>,
    ) -> SystemTime {
        let started = SystemTime::now();
        self.running.lock().unwrap().insert(
            digest.to_string(),
            (name.to_string(), inputs.clone(), started),
        );
        self.progress.send(ProgressEvent::VertexStarted {
            digest: digest.to_string(),
            name: name.to_string(),
            inputs,
            progress_group: group,
            started,
        });
        started
    }

    fn complete(&self, digest: &str, cached: bool, error: Option<String>) {
        let Some((name, inputs, started)) = self.running.lock().unwrap().remove(digest) else {
            return;
        };
        self.progress.send(ProgressEvent::VertexCompleted {
            digest: digest.to_string(),
            name,
            inputs,
            started,
            completed: SystemTime::now(),
            cached,
            error,
        });
    }

    /// Completes every still-running vertex as canceled.
    fn cancel_running(&self) {
        let running: Vec<_> = self.running.lock().unwrap().drain().collect();
        for (digest, (name, inputs, started)) in running {
            self.progress.send(ProgressEvent::VertexCompleted {
                digest,
                name,
                inputs,
                started,
                completed: SystemTime::now(),
                cached: false,
                error: Some("context canceled".into()),
            });
        }
    }
}

impl<R: Clone + Send + Sync + 'static> Solver<R> {
    pub(crate) fn new(cache: Arc<dyn CacheStore<R>>, max_parallelism: usize) -> Self {
        Solver {
            cache,
            limit: Arc::new(Semaphore::new(max_parallelism.max(1))),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// Solves output `target.1` of vertex `target.0` of `graph`. `graph` must be acyclic with
    /// every input index in range (see [`topo_order`]).
    pub(crate) async fn solve(
        self: &Arc<Self>,
        graph: Vec<Vertex<R>>,
        target: (usize, usize),
        progress: ProgressSink,
        cancel: CancellationToken,
    ) -> Result<(Solved<R>, SolveStats)> {
        let order = topo_order(graph.len(), |i| {
            graph[i].inputs.iter().map(|e| e.0).collect()
        })
        .map_err(|cycle| Error::InvalidRequest {
            reason: format!("cycle through vertex {}", graph[cycle].digest),
        })?;
        let job_cancel = cancel.child_token();
        let job = Arc::new(Job {
            progress,
            cancel: job_cancel.clone(),
            running: Mutex::new(HashMap::new()),
            stats: Mutex::new(SolveStats::default()),
            span: tracing::Span::current(),
        });
        let graph: Vec<Arc<Vertex<R>>> = graph.into_iter().map(Arc::new).collect();
        let mut futs: Vec<Option<VertexFuture<R>>> = vec![None; graph.len()];
        for &i in &order {
            let v = graph[i].clone();
            // Each input vertex once, however many of its outputs are used: a vertex whose
            // inputs are several outputs of one vertex (an exec with many mounts) would
            // otherwise poll that shared future once per edge, and a chain of such vertices
            // multiplies the polls at every wake-up (TestLLBMountPerformance never started).
            let mut inputs: Vec<(usize, VertexFuture<R>)> = Vec::new();
            for &(vi, _) in &v.inputs {
                if !inputs.iter().any(|(seen, _)| *seen == vi) {
                    inputs.push((vi, futs[vi].clone().expect("topological order")));
                }
            }
            let input_digests: Vec<String> = v
                .inputs
                .iter()
                .map(|&(vi, _)| graph[vi].digest.clone())
                .collect();
            let solver = self.clone();
            let job = job.clone();
            let fut = async move {
                solver
                    .run_vertex(&job, &v, inputs, input_digests)
                    .await
                    .map_err(Arc::new)
            }
            .boxed()
            .shared();
            futs[i] = Some(fut);
        }
        let target_fut = futs[target.0].clone().expect("target in graph");
        // Only the futures reachable from the target are ever polled.
        drop(futs);
        let res = tokio::select! {
            r = target_fut => r.map_err(unshare),
            _ = cancel.cancelled() => Err(Error::Canceled),
        };
        // Stop whatever is still running (siblings of a failed vertex, or everything on cancel).
        job_cancel.cancel();
        job.cancel_running();
        let outputs = res?;
        let solved = outputs
            .get(target.1)
            .cloned()
            .ok_or_else(|| Error::Internal(format!("target output {} missing", target.1)))?;
        let stats = *job.stats.lock().unwrap();
        Ok((solved, stats))
    }

    async fn run_vertex(
        self: &Arc<Self>,
        job: &Arc<Job>,
        v: &Vertex<R>,
        inputs: Vec<(usize, VertexFuture<R>)>,
        input_digests: Vec<String>,
    ) -> Result<Outputs<R>> {
        // Inputs first; the first failure cancels the rest (dropping their futures).
        let input_outputs = futures::future::try_join_all(
            inputs
                .into_iter()
                .map(|(vi, f)| f.map(move |r| r.map(|o| (vi, o)))),
        )
        .await
        .map_err(unshare)?;
        let mut solved_inputs = Vec::with_capacity(v.inputs.len());
        for &(vi, idx) in &v.inputs {
            let outs = input_outputs
                .iter()
                .find(|(i, _)| *i == vi)
                .map(|(_, o)| o)
                .ok_or_else(|| Error::Internal(format!("input vertex {vi} missing")))?;
            let s = outs
                .get(idx)
                .cloned()
                .ok_or_else(|| Error::Internal(format!("input output index {idx} missing")))?;
            solved_inputs.push(s);
        }
        if job.cancel.is_cancelled() {
            return Err(Error::Canceled);
        }
        job.start(&v.digest, &v.name, input_digests, v.progress_group.clone());
        let ctx = OpContext {
            vertex: v.digest.clone(),
            progress: job.progress.clone(),
            cancel: job.cancel.clone(),
        };
        let span = tracing::debug_span!(
            parent: &job.span,
            "vertex",
            otel.name = %v.name,
            vertex = %v.digest,
            cached = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let res = self
            .run_started(job, v, &ctx, &solved_inputs)
            .instrument(span.clone())
            .await;
        match &res {
            Ok((_, cached)) => span.record("cached", *cached),
            Err(_) => span.record("otel.status_code", "ERROR"),
        };
        match &res {
            Ok((_, cached)) => job.complete(&v.digest, *cached, None),
            Err(e) => job.complete(&v.digest, false, Some(e.to_string())),
        }
        let (outs, _) = res.map_err(|e| match e {
            Error::Canceled | Error::Vertex { .. } => e,
            e => Error::Vertex {
                name: v.name.clone(),
                digest: v.digest.clone(),
                error: Box::new(e),
            },
        })?;
        Ok(outs)
    }

    /// Key, cache lookup, execution. Returns the outputs and whether they came from the cache.
    async fn run_started(
        &self,
        job: &Job,
        v: &Vertex<R>,
        ctx: &OpContext,
        inputs: &[Solved<R>],
    ) -> Result<(Outputs<R>, bool)> {
        let key = v.op.cache_key(ctx, inputs).await?;
        let wrap = |results: Arc<Vec<R>>| -> Outputs<R> {
            Arc::new(
                results
                    .iter()
                    .enumerate()
                    .map(|(i, r)| Solved {
                        key: output_key(&key, i),
                        result: r.clone(),
                    })
                    .collect(),
            )
        };
        if !v.ignore_cache {
            if let Some(results) = self.cache.load(&key, v.outputs).await? {
                job.stats.lock().unwrap().cached += 1;
                metrics::counter!(CACHE_HITS).increment(1);
                tracing::debug!(vertex = %v.digest, key = %key, "cache hit");
                return Ok((wrap(Arc::new(results)), true));
            }
        }
        let exec = || async {
            let _permit = tokio::select! {
                p = self.limit.clone().acquire_owned() => p.map_err(|_| Error::Internal("semaphore closed".into()))?,
                _ = ctx.cancel.cancelled() => return Err(Error::Canceled),
            };
            if !v.ignore_cache {
                // Another build may have finished the same work while we waited.
                if let Some(results) = self.cache.load(&key, v.outputs).await? {
                    metrics::counter!(CACHE_HITS).increment(1);
                    return Ok(Arc::new(results));
                }
            }
            tracing::debug!(vertex = %v.digest, key = %key, name = %v.name, "executing");
            let results = tokio::select! {
                r = v.op.exec(ctx, inputs) => r?,
                _ = ctx.cancel.cancelled() => return Err(Error::Canceled),
            };
            job.stats.lock().unwrap().executed += 1;
            metrics::counter!(EXECUTIONS).increment(1);
            if results.len() != v.outputs {
                return Err(Error::Internal(format!(
                    "op returned {} results, expected {}",
                    results.len(),
                    v.outputs
                )));
            }
            self.cache.save(&key, &results).await?;
            Ok(Arc::new(results))
        };
        let results = if v.ignore_cache {
            exec().await?
        } else {
            let cell = self
                .inflight
                .lock()
                .unwrap()
                .entry(key.clone())
                .or_insert_with(|| Arc::new(OnceCell::new()))
                .clone();
            let r = cell.get_or_try_init(exec).await.cloned();
            let mut map = self.inflight.lock().unwrap();
            // Last user of this entry: forget it (the result is in the cache store now).
            if map.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) && Arc::strong_count(&cell) <= 2
            {
                map.remove(&key);
            }
            r?
        };
        Ok((wrap(results), false))
    }
}

fn unshare(e: Arc<Error>) -> Error {
    Arc::try_unwrap(e).unwrap_or_else(Error::Shared)
}

/// Cache key of output `i` of a vertex whose key is `key`.
pub(crate) fn output_key(key: &str, i: usize) -> String {
    let mut h = crate::digest::KeyHasher::new("output");
    h.field(key.as_bytes()).field(&(i as u64).to_le_bytes());
    h.finish()
}

/// Topological order (inputs before users) of `n` nodes whose edges are given by `inputs`.
/// Err(node) names a node on a cycle. Input indices must be `< n`.
pub(crate) fn topo_order(
    n: usize,
    inputs: impl Fn(usize) -> Vec<usize>,
) -> std::result::Result<Vec<usize>, usize> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    let mut mark = vec![Mark::New; n];
    let mut order = Vec::with_capacity(n);
    for root in 0..n {
        if mark[root] != Mark::New {
            continue;
        }
        // Iterative DFS: (node, next input position).
        let mut stack: Vec<(usize, Vec<usize>, usize)> = vec![(root, inputs(root), 0)];
        mark[root] = Mark::Active;
        while let Some((node, ins, pos)) = stack.last_mut() {
            if *pos < ins.len() {
                let next = ins[*pos];
                *pos += 1;
                match mark[next] {
                    Mark::Done => {}
                    Mark::Active => return Err(next),
                    Mark::New => {
                        mark[next] = Mark::Active;
                        let nins = inputs(next);
                        stack.push((next, nins, 0));
                    }
                }
            } else {
                mark[*node] = Mark::Done;
                order.push(*node);
                stack.pop();
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests;
