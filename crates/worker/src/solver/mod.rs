//! The solver core: schedules a DAG of vertices with cache keys, free of LLB specifics.
//!
//! A vertex is an [`Op`] plus edges to outputs of other vertices. For each build the solver
//! evaluates what the target needs, in two phases per vertex:
//! 1. **key**: wait for the inputs' keys; when the op can key itself from them
//!    ([`Op::key_from_input_keys`]: its key reads no input content) no input result is needed,
//!    otherwise wait for the inputs' results and ask [`Op::cache_key`] (which may look at input
//!    content). The vertex is announced ([`ProgressEvent::VertexStarted`]) here.
//! 2. **result**, only when a user of the vertex (or the build) needs it: unless the vertex
//!    ignores the cache, load the result for the key from the [`CacheStore`], else from the
//!    build's [`ImportStore`] (`--import-cache`): a hit completes the vertex as `cached`;
//!    otherwise wait for the inputs' results and execute it ([`Op::exec`]), at most
//!    `max_parallelism` executions at once across all builds, and store the result. Identical
//!    vertices (same cache key) of concurrent builds execute once: the first build runs it, the
//!    others wait for its result.
//!
//! So a cached step never builds its inputs: a vertex whose result nothing needed is completed
//! as `cached` when the build succeeds (buildkitd reports them so too). An input that ignores
//! the cache is always built before its users.
//!
//! Invariants: every announced vertex gets exactly one completion event; when a build fails or is
//! canceled, all its in-progress work is dropped (which releases mounts held by ops) and the
//! still-running vertices are completed with `context canceled`.
//!
//! Ported concept: `moby/buildkit` `solver/jobs.go` + `solver/scheduler.go` (much simplified:
//! one cache-key computation per vertex, content keys instead of separate "slow" key phases).
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
    /// The cache key from the inputs' output keys alone, for ops whose key reads no input
    /// content: the solver then finds a cached result without building the inputs. `None` (the
    /// default): the key needs the inputs' results ([`Op::cache_key`]). When `Some`, it must
    /// equal what `cache_key` returns for inputs with these keys.
    fn key_from_input_keys(&self, _input_keys: &[&str]) -> Option<String> {
        None
    }
    /// For ops keyed by input content ([`Op::key_from_input_keys`] is `None`): a key of the
    /// definition and the inputs' keys alone (BuildKit's definition-based key next to the
    /// content-based one). A build records it with the vertex's key, so that an imported cache
    /// gives the vertex's key for this alias without building the inputs to checksum them (a
    /// `mode=min` cache has no result for them). `None` (the default): no alias.
    fn alias_key(&self, _input_keys: &[&str]) -> Option<String> {
        None
    }
    /// Executes the vertex; returns one result per output.
    async fn exec(&self, ctx: &OpContext, inputs: &[Solved<R>]) -> Result<Vec<R>>;
    /// What a source resolved to in this build, once its cache key is known (BuildKit's
    /// `SourceOp.Pin`: a git commit, an HTTP content digest, an image digest); `None` for other
    /// ops and before resolution.
    fn pin(&self) -> Option<String> {
        None
    }
    /// BuildKit v0.11.6's own cache map of the vertex (`crate::bkkeys`), asked once its key is
    /// known (a source knows it after resolving): an imported cache exported by stock
    /// buildkitd is searched by it when berth's key misses. `None` (the default): the op has no
    /// stock key (or one berth cannot compute yet).
    fn stock_map(&self) -> Option<crate::bkkeys::StockMap> {
        None
    }
}

/// A cache imported for one build (`--import-cache`), asked when the local store misses. A hit
/// is recorded in the local store too.
#[async_trait]
pub(crate) trait ImportStore<R>: Send + Sync {
    /// The results for `key`, one per output (`needed.len()` of them), if the imported cache
    /// has every output whose `needed` is true; the others are loaded only when the cache has
    /// them and are `None` otherwise (a `mode=min` export records only the build result's
    /// output of a step with several). May download layers (statuses go to `ctx`). Failures are
    /// misses: the vertex then runs.
    async fn load(&self, ctx: &OpContext, key: &str, needed: &[bool]) -> Option<Vec<Option<R>>>;
    /// As [`ImportStore::load`], for a vertex whose outputs have the stock record ids `ids`
    /// (`crate::bkkeys::stock_record_id`; `None`: that output has none).
    async fn load_stock(
        &self,
        _ctx: &OpContext,
        _ids: &[Option<String>],
        _needed: &[bool],
    ) -> Option<Vec<Option<R>>> {
        None
    }
    /// The vertex key the imported cache recorded for the alias key `alias` ([`Op::alias_key`]).
    fn alias(&self, _alias: &str) -> Option<String> {
        None
    }
}

/// Persistent map from cache keys to results.
#[async_trait]
pub(crate) trait CacheStore<R>: Send + Sync {
    /// The results for `key`, one per output (`needed.len()` of them), if every output whose
    /// `needed` is true is present and still usable; others are `None` when absent.
    async fn load(&self, key: &str, needed: &[bool]) -> Result<Option<Vec<Option<R>>>>;
    /// Records the present results for `key` (output `i` is `results[i]`).
    async fn save(&self, key: &str, results: &[Option<R>]) -> Result<()>;
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

/// The outputs of a vertex, by output index. `None`: an output an imported (or earlier
/// partially imported) cache did not have and that no vertex of the build uses.
pub(crate) type Outputs<R> = Arc<Vec<Option<Solved<R>>>>;
/// A vertex's cache key, and the span its work runs in.
struct Keyed {
    key: String,
    /// The op's alias key ([`Op::alias_key`]), recorded with `key` in exports.
    alias: Option<String>,
    /// `key` came from an imported alias, not from the inputs' content.
    via_alias: bool,
    /// Per output: its stock record id (`crate::bkkeys::stock_record_id`), when the op and all
    /// its inputs have one.
    stock: Vec<Option<String>>,
    /// The op's stock cache map, when `stock` has ids.
    stock_map: Option<crate::bkkeys::StockMap>,
    span: tracing::Span,
}
type KeyFuture = Shared<BoxFuture<'static, std::result::Result<Arc<Keyed>, Arc<Error>>>>;
type SharedResult<R> = std::result::Result<Outputs<R>, Arc<Error>>;
type VertexFuture<R> = Shared<BoxFuture<'static, SharedResult<R>>>;

/// Counters of what a build did (for tests and logs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SolveStats {
    /// Vertices whose result came from the cache.
    pub cached: usize,
    /// Vertices executed by this build.
    pub executed: usize,
    /// Of `cached`, the vertices whose result came from an imported cache.
    pub imported: usize,
}

/// What a build found for one vertex: its cache key, and its outputs when the build needed them
/// (a vertex whose users were cached has a key only).
#[derive(Clone)]
pub(crate) struct Evaluation<R> {
    /// The vertex's cache key (outputs: [`output_key`]).
    pub key: String,
    /// Its alias key ([`Op::alias_key`]), if the op has one.
    pub alias: Option<String>,
    /// Its stock cache map ([`Op::stock_map`]), when the op and every input have stock
    /// records (see [`Keyed::stock`]).
    pub stock: Option<crate::bkkeys::StockMap>,
    /// The outputs, when built or loaded.
    pub outputs: Option<Outputs<R>>,
}

/// Every vertex a build evaluated, by graph index (`None`: the target did not depend on it, or
/// the build failed before its key), for cache exports.
pub(crate) type Evaluated<R> = Vec<Option<Evaluation<R>>>;

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
struct Job<R> {
    progress: ProgressSink,
    cancel: CancellationToken,
    /// Vertices announced but not yet completed: digest → (name, inputs, started).
    running: Mutex<HashMap<String, Running>>,
    stats: Mutex<SolveStats>,
    /// Outputs of the vertices evaluated so far, by graph index.
    evaluated: Mutex<HashMap<usize, Outputs<R>>>,
    /// Cache keys (and alias keys) of the vertices keyed so far, by graph index.
    keys: Mutex<HashMap<usize, KeyRecord>>,
    /// The build's imported cache, if any.
    import: Option<Arc<dyn ImportStore<R>>>,
    /// Parent of the vertex spans.
    span: tracing::Span,
}

/// What a build records of a vertex's key: the key, its alias key ([`Op::alias_key`]), and the
/// op's stock cache map ([`Op::stock_map`]) when every input has stock records.
type KeyRecord = (String, Option<String>, Option<crate::bkkeys::StockMap>);

/// Counter of vertex executions (`telemetry::metrics::VERTEX_EXECUTIONS`).
const EXECUTIONS: &str = "berth_vertex_executions_total";
/// Counter of vertex cache hits (`telemetry::metrics::VERTEX_CACHE_HITS`).
const CACHE_HITS: &str = "berth_vertex_cache_hits_total";

impl<R> Job<R> {
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

    /// Completes every still-running vertex as cached (after a successful build: their key was
    /// found and nothing needed their result).
    fn complete_unneeded(&self) {
        let running: Vec<_> = self.running.lock().unwrap().drain().collect();
        for (digest, (name, inputs, started)) in running {
            self.stats.lock().unwrap().cached += 1;
            metrics::counter!(CACHE_HITS).increment(1);
            self.progress.send(ProgressEvent::VertexCompleted {
                digest,
                name,
                inputs,
                started,
                completed: SystemTime::now(),
                cached: true,
                error: None,
            });
        }
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
    #[cfg(test)]
    pub(crate) async fn solve(
        self: &Arc<Self>,
        graph: Vec<Vertex<R>>,
        target: (usize, usize),
        progress: ProgressSink,
        cancel: CancellationToken,
    ) -> Result<(Solved<R>, SolveStats)> {
        self.solve_with(graph, target, progress, cancel, None)
            .await
            .map(|(s, st, _)| (s, st))
    }

    /// [`Solver::solve`] consulting `import` after the local cache, and returning what every
    /// evaluated vertex produced.
    pub(crate) async fn solve_with(
        self: &Arc<Self>,
        graph: Vec<Vertex<R>>,
        target: (usize, usize),
        progress: ProgressSink,
        cancel: CancellationToken,
        import: Option<Arc<dyn ImportStore<R>>>,
    ) -> Result<(Solved<R>, SolveStats, Evaluated<R>)> {
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
            evaluated: Mutex::new(HashMap::new()),
            keys: Mutex::new(HashMap::new()),
            import,
            span: tracing::Span::current(),
        });
        let needed = needed_outputs(&graph, target);
        let graph: Vec<Arc<Vertex<R>>> = graph.into_iter().map(Arc::new).collect();
        let mut keys: Vec<Option<KeyFuture>> = vec![None; graph.len()];
        let mut futs: Vec<Option<VertexFuture<R>>> = vec![None; graph.len()];
        for &i in &order {
            let v = graph[i].clone();
            // Each input vertex once, however many of its outputs are used: a vertex whose
            // inputs are several outputs of one vertex (an exec with many mounts) would
            // otherwise poll that shared future once per edge, and a chain of such vertices
            // multiplies the polls at every wake-up (TestLLBMountPerformance never started).
            let in_keys = unique_inputs(&v.inputs, &keys);
            let in_res = unique_inputs(&v.inputs, &futs);
            // An input that ignores the cache always runs, so its users wait for it.
            let eager = v.inputs.iter().any(|&(vi, _)| graph[vi].ignore_cache);
            let input_digests: Vec<String> = v
                .inputs
                .iter()
                .map(|&(vi, _)| graph[vi].digest.clone())
                .collect();
            let keyf: KeyFuture = {
                let (solver, job, v, in_res) =
                    (self.clone(), job.clone(), v.clone(), in_res.clone());
                async move {
                    let k = solver
                        .vertex_key(&job, &v, in_keys, in_res, input_digests, eager)
                        .await
                        .map_err(Arc::new)?;
                    job.keys
                        .lock()
                        .unwrap()
                        .insert(i, (k.key.clone(), k.alias.clone(), k.stock_map.clone()));
                    Ok(Arc::new(k))
                }
                .boxed()
                .shared()
            };
            let resf: VertexFuture<R> = {
                let (solver, job, keyf) = (self.clone(), job.clone(), keyf.clone());
                let needed = needed[i].clone();
                async move {
                    let k = keyf.await?;
                    let outs = solver
                        .vertex_result(&job, i, &v, &k, &needed, in_res)
                        .await
                        .map_err(Arc::new)?;
                    job.evaluated.lock().unwrap().insert(i, outs.clone());
                    Ok(outs)
                }
                .boxed()
                .shared()
            };
            keys[i] = Some(keyf);
            futs[i] = Some(resf);
        }
        let target_fut = futs[target.0].clone().expect("target in graph");
        // Only the futures the target needs are ever polled.
        drop(futs);
        drop(keys);
        let res = tokio::select! {
            r = target_fut => r.map_err(unshare),
            _ = cancel.cancelled() => Err(Error::Canceled),
        };
        // Stop whatever is still running (siblings of a failed vertex, or everything on cancel).
        job_cancel.cancel();
        if res.is_ok() {
            // Vertices whose key was found but whose result nothing needed (a user of theirs
            // was cached): cached, as buildkitd reports them.
            job.complete_unneeded();
        }
        job.cancel_running();
        let outputs = res?;
        let solved = outputs
            .get(target.1)
            .cloned()
            .flatten()
            .ok_or_else(|| Error::Internal(format!("target output {} missing", target.1)))?;
        let stats = *job.stats.lock().unwrap();
        let mut evaluated: Evaluated<R> = vec![None; graph.len()];
        let mut outs = std::mem::take(&mut *job.evaluated.lock().unwrap());
        for (i, (key, alias, stock)) in job.keys.lock().unwrap().drain() {
            evaluated[i] = Some(Evaluation {
                key,
                alias,
                stock,
                outputs: outs.remove(&i),
            });
        }
        Ok((solved, stats, evaluated))
    }

    /// The outputs of the inputs `edges` (`(vertex, output)` in op order) from the input
    /// vertices' futures `in_res` (built or loaded as needed); the first failure drops the rest.
    async fn input_results(
        edges: &[(usize, usize)],
        in_res: Vec<(usize, VertexFuture<R>)>,
    ) -> Result<Vec<Solved<R>>> {
        let input_outputs = futures::future::try_join_all(
            in_res
                .into_iter()
                .map(|(vi, f)| f.map(move |r| r.map(|o| (vi, o)))),
        )
        .await
        .map_err(unshare)?;
        let mut solved = Vec::with_capacity(edges.len());
        for &(vi, idx) in edges {
            let outs = input_outputs
                .iter()
                .find(|(i, _)| *i == vi)
                .map(|(_, o)| o)
                .ok_or_else(|| Error::Internal(format!("input vertex {vi} missing")))?;
            solved.push(
                outs.get(idx)
                    .cloned()
                    .flatten()
                    .ok_or_else(|| Error::Internal(format!("input output index {idx} missing")))?,
            );
        }
        Ok(solved)
    }

    /// The vertex's cache key: from its inputs' keys when the op allows it, else from their
    /// results. Announces the vertex.
    async fn vertex_key(
        self: &Arc<Self>,
        job: &Arc<Job<R>>,
        v: &Vertex<R>,
        in_keys: Vec<(usize, KeyFuture)>,
        in_res: Vec<(usize, VertexFuture<R>)>,
        input_digests: Vec<String>,
        eager: bool,
    ) -> Result<Keyed> {
        // Inputs' keys first; the first failure cancels the rest (dropping their futures).
        let vertex_keys = futures::future::try_join_all(
            in_keys
                .into_iter()
                .map(|(vi, f)| f.map(move |r| r.map(|k| (vi, k)))),
        )
        .await
        .map_err(unshare)?;
        let mut input_keys = Vec::with_capacity(v.inputs.len());
        for &(vi, out) in &v.inputs {
            let k = vertex_keys
                .iter()
                .find(|(i, _)| *i == vi)
                .map(|(_, k)| k)
                .ok_or_else(|| Error::Internal(format!("input vertex {vi} missing")))?;
            input_keys.push(output_key(&k.key, out));
        }
        let (mut from_keys, mut alias, mut via_alias) = (None, None, false);
        if !v.inputs.is_empty() && !eager {
            let refs: Vec<&str> = input_keys.iter().map(String::as_str).collect();
            from_keys = v.op.key_from_input_keys(&refs);
            if from_keys.is_none() {
                alias = v.op.alias_key(&refs);
            }
        }
        // A key the imported cache recorded for the alias: the inputs need not be built to
        // checksum their content (their records may have no result, `mode=min`).
        if let (None, Some(a), Some(import), false) =
            (&from_keys, &alias, &job.import, v.ignore_cache)
        {
            from_keys = import.alias(a);
            via_alias = from_keys.is_some();
            if let Some(k) = &from_keys {
                tracing::debug!(vertex = %v.digest, alias = %a, key = %k, "key from imported alias");
            }
        }
        let solved = if v.inputs.is_empty() || from_keys.is_some() {
            Vec::new()
        } else {
            Self::input_results(&v.inputs, in_res).await?
        };
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
        let key = match from_keys {
            Some(k) => Ok(k),
            None => {
                v.op.cache_key(&ctx, &solved)
                    .instrument(tracing::debug_span!(parent: &span, "cache_key"))
                    .await
            }
        };
        match key {
            Ok(key) => {
                let (stock, stock_map) = stock_ids(v, &vertex_keys);
                Ok(Keyed {
                    key,
                    alias,
                    via_alias,
                    stock,
                    stock_map,
                    span,
                })
            }
            Err(e) => {
                span.record("otel.status_code", "ERROR");
                job.complete(&v.digest, false, Some(e.to_string()));
                Err(vertex_error(v, e))
            }
        }
    }

    /// The vertex's outputs: from the cache, the imported cache, or by executing it (after its
    /// inputs' results).
    async fn vertex_result(
        self: &Arc<Self>,
        job: &Arc<Job<R>>,
        index: usize,
        v: &Vertex<R>,
        k: &Keyed,
        needed: &[bool],
        in_res: Vec<(usize, VertexFuture<R>)>,
    ) -> Result<Outputs<R>> {
        let ctx = OpContext {
            vertex: v.digest.clone(),
            progress: job.progress.clone(),
            cancel: job.cancel.clone(),
        };
        let mut key = &k.key;
        let wrap = |key: &str, results: Vec<Option<R>>| -> Outputs<R> {
            Arc::new(
                results
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| {
                        r.map(|result| Solved {
                            key: output_key(key, i),
                            result,
                        })
                    })
                    .collect(),
            )
        };
        let mut res = self
            .cached_result(job, v, &ctx, key, needed)
            .instrument(k.span.clone())
            .await;
        if matches!(res, Ok(None)) {
            res = self
                .stock_result(job, v, &ctx, key, &k.stock, needed)
                .instrument(k.span.clone())
                .await;
        }
        let res = match res {
            Ok(Some(results)) => Ok((wrap(key, results), true)),
            Ok(None) => {
                // A failed input is reported by its own vertex; this one stays running until
                // the build ends (then it is completed as canceled).
                let inputs = Self::input_results(&v.inputs, in_res).await?;
                // A key taken from an imported alias stands for the exporter's input content;
                // built here, the inputs may differ (a RUN with random output ran again), and
                // the result must not be recorded under a content key it does not have.
                let real;
                let mut again = None;
                if k.via_alias {
                    real =
                        v.op.cache_key(&ctx, &inputs)
                            .instrument(k.span.clone())
                            .await?;
                    if real != *key {
                        tracing::debug!(vertex = %v.digest, alias_key = %key, key = %real, "inputs built differ from the imported alias's");
                        job.keys
                            .lock()
                            .unwrap()
                            .insert(index, (real.clone(), k.alias.clone(), k.stock_map.clone()));
                        key = &real;
                        again = self
                            .cached_result(job, v, &ctx, key, needed)
                            .instrument(k.span.clone())
                            .await?;
                    }
                }
                match again {
                    Some(results) => Ok((wrap(key, results), true)),
                    None => self
                        .execute(job, v, &ctx, key, &inputs)
                        .instrument(k.span.clone())
                        .await
                        .map(|r| (wrap(key, r.iter().cloned().map(Some).collect()), false)),
                }
            }
            Err(e) => Err(e),
        };
        match &res {
            Ok((_, cached)) => k.span.record("cached", *cached),
            Err(_) => k.span.record("otel.status_code", "ERROR"),
        };
        match &res {
            Ok((_, cached)) => job.complete(&v.digest, *cached, None),
            Err(e) => job.complete(&v.digest, false, Some(e.to_string())),
        }
        res.map(|(o, _)| o).map_err(|e| vertex_error(v, e))
    }

    /// The results for `key` from the local cache, else from the build's imported cache.
    async fn cached_result(
        &self,
        job: &Job<R>,
        v: &Vertex<R>,
        ctx: &OpContext,
        key: &str,
        needed: &[bool],
    ) -> Result<Option<Vec<Option<R>>>> {
        if v.ignore_cache {
            return Ok(None);
        }
        let loaded = self
            .cache
            .load(key, needed)
            .instrument(tracing::debug_span!("cache_load"))
            .await?;
        if let Some(results) = loaded {
            job.stats.lock().unwrap().cached += 1;
            metrics::counter!(CACHE_HITS).increment(1);
            tracing::debug!(vertex = %v.digest, key = %key, "cache hit");
            return Ok(Some(results));
        }
        if let Some(import) = &job.import {
            if let Some(results) = import.load(ctx, key, needed).await {
                let complete = results.len() == v.outputs
                    && results.iter().zip(needed).all(|(r, n)| r.is_some() || !n);
                if complete {
                    self.cache.save(key, &results).await?;
                    let mut st = job.stats.lock().unwrap();
                    st.cached += 1;
                    st.imported += 1;
                    metrics::counter!(CACHE_HITS).increment(1);
                    tracing::debug!(vertex = %v.digest, key = %key, "imported cache hit");
                    return Ok(Some(results));
                }
            }
        }
        Ok(None)
    }

    /// The results for the vertex's stock record ids from the build's imported cache (a cache
    /// exported by stock buildkitd), recorded in the local cache under `key`.
    async fn stock_result(
        &self,
        job: &Job<R>,
        v: &Vertex<R>,
        ctx: &OpContext,
        key: &str,
        ids: &[Option<String>],
        needed: &[bool],
    ) -> Result<Option<Vec<Option<R>>>> {
        let Some(import) = &job.import else {
            return Ok(None);
        };
        if v.ignore_cache || ids.iter().all(Option::is_none) {
            return Ok(None);
        }
        let Some(results) = import.load_stock(ctx, ids, needed).await else {
            tracing::debug!(vertex = %v.digest, stock = ?ids, "no imported stock record");
            return Ok(None);
        };
        let complete = results.len() == v.outputs
            && results.iter().zip(needed).all(|(r, n)| r.is_some() || !n);
        if !complete {
            return Ok(None);
        }
        self.cache.save(key, &results).await?;
        let mut st = job.stats.lock().unwrap();
        st.cached += 1;
        st.imported += 1;
        metrics::counter!(CACHE_HITS).increment(1);
        tracing::debug!(vertex = %v.digest, key = %key, "imported cache hit by stock record");
        Ok(Some(results))
    }

    /// Executes the vertex (identical keys of concurrent builds execute once).
    async fn execute(
        &self,
        job: &Job<R>,
        v: &Vertex<R>,
        ctx: &OpContext,
        key: &str,
        inputs: &[Solved<R>],
    ) -> Result<Arc<Vec<R>>> {
        let exec = || async {
            let _permit = tokio::select! {
                p = self.limit.clone().acquire_owned() => p.map_err(|_| Error::Internal("semaphore closed".into()))?,
                _ = ctx.cancel.cancelled() => return Err(Error::Canceled),
            };
            if !v.ignore_cache {
                // Another build may have finished the same work while we waited.
                let all = vec![true; v.outputs];
                if let Some(results) = self.cache.load(key, &all).await? {
                    if let Some(results) = results.into_iter().collect::<Option<Vec<R>>>() {
                        metrics::counter!(CACHE_HITS).increment(1);
                        return Ok(Arc::new(results));
                    }
                }
            }
            tracing::debug!(vertex = %v.digest, key = %key, name = %v.name, "executing");
            let results = tokio::select! {
                r = v.op.exec(ctx, inputs).instrument(tracing::debug_span!("exec")) => r?,
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
            let saved: Vec<Option<R>> = results.iter().cloned().map(Some).collect();
            self.cache.save(key, &saved).await?;
            Ok(Arc::new(results))
        };
        if v.ignore_cache {
            return exec().await;
        }
        let cell = self
            .inflight
            .lock()
            .unwrap()
            .entry(key.to_string())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let r = cell.get_or_try_init(exec).await.cloned();
        let mut map = self.inflight.lock().unwrap();
        // Last user of this entry: forget it (the result is in the cache store now).
        if map.get(key).is_some_and(|c| Arc::ptr_eq(c, &cell)) && Arc::strong_count(&cell) <= 2 {
            map.remove(key);
        }
        r
    }
}

/// The stock record id of each output of `v` ([`Op::stock_map`] with its inputs' ids), or
/// `None` per output when the op or one of its inputs has none; and the op's stock map when
/// the ids are there.
fn stock_ids<R>(
    v: &Vertex<R>,
    input_keys: &[(usize, Arc<Keyed>)],
) -> (Vec<Option<String>>, Option<crate::bkkeys::StockMap>) {
    let none = || (vec![None; v.outputs], None);
    let Some(map) = v.op.stock_map() else {
        return none();
    };
    tracing::debug!(vertex = %v.digest, record = %crate::bkkeys::root_key(&map.digest, 0), "stock record of output 0");
    let mut slots = Vec::with_capacity(v.inputs.len());
    for (j, &(vi, out)) in v.inputs.iter().enumerate() {
        if let Some(Some(content)) = map.content.get(j) {
            slots.push((String::new(), content.clone()));
            continue;
        }
        let id = input_keys
            .iter()
            .find(|(i, _)| *i == vi)
            .and_then(|(_, k)| k.stock.get(out).cloned().flatten());
        let Some(id) = id else {
            return none();
        };
        slots.push((map.selectors.get(j).cloned().unwrap_or_default(), id));
    }
    let slots: Vec<(&str, &str)> = slots
        .iter()
        .map(|(s, i)| (s.as_str(), i.as_str()))
        .collect();
    let ids = (0..v.outputs)
        .map(|o| {
            let record = crate::bkkeys::root_key(&map.digest, o as i64);
            Some(crate::bkkeys::stock_record_id(&record, &slots))
        })
        .collect();
    (ids, Some(map))
}

/// Which outputs of each vertex the build can use: the target's output and every output that a
/// vertex the target depends on takes as an input. A cache hit needs these outputs only.
fn needed_outputs<R>(graph: &[Vertex<R>], target: (usize, usize)) -> Vec<Arc<Vec<bool>>> {
    let mut needed: Vec<Vec<bool>> = graph.iter().map(|v| vec![false; v.outputs]).collect();
    let mut seen = vec![false; graph.len()];
    let mut stack = vec![target.0];
    if let Some(n) = needed[target.0].get_mut(target.1) {
        *n = true;
    }
    while let Some(i) = stack.pop() {
        if std::mem::replace(&mut seen[i], true) {
            continue;
        }
        for &(vi, out) in &graph[i].inputs {
            if let Some(n) = needed[vi].get_mut(out) {
                *n = true;
            }
            stack.push(vi);
        }
    }
    needed.into_iter().map(Arc::new).collect()
}

/// The future of each distinct input vertex of `edges` (`(vertex, output)`), in first-use
/// order. `futs` holds the futures of the vertices already scheduled.
fn unique_inputs<F: Clone>(edges: &[(usize, usize)], futs: &[Option<F>]) -> Vec<(usize, F)> {
    let mut unique: Vec<(usize, F)> = Vec::new();
    for &(vi, _) in edges {
        if !unique.iter().any(|(seen, _)| *seen == vi) {
            unique.push((vi, futs[vi].clone().expect("topological order")));
        }
    }
    unique
}

/// `e` as the error of vertex `v` (errors that already name a vertex, and cancellation, stay).
fn vertex_error<R>(v: &Vertex<R>, e: Error) -> Error {
    match e {
        Error::Canceled | Error::Vertex { .. } => e,
        e => Error::Vertex {
            name: v.name.clone(),
            digest: v.digest.clone(),
            error: Box::new(e),
        },
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
