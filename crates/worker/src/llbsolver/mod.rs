//! LLB on top of the generic solver: loads the definition, builds one solver vertex per op
//! (through the op registry in `crate::ops`), runs the solver and wraps the result.

pub(crate) mod cache;
pub(crate) mod caps;
pub(crate) mod definition;
pub(crate) mod import;

use std::sync::Arc;

use layerstore::snapshot::{SnapshotStore, StoreOptions};
use protos::pb;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::ops::{self, BuildEnv, Shared};
use crate::remote::{SolveTrace, StockLink, StockVertex, TracedOutput, TracedVertex};
use crate::result::{Snap, SolvedRef};
use crate::solver::{Solver, Vertex};
use crate::worker::{SolveContext, WorkerOptions};
use cache::SnapshotCache;

/// State shared by every build of a worker.
pub(crate) struct Inner {
    pub(crate) opts: WorkerOptions,
    pub(crate) store: SnapshotStore,
    pub(crate) solver: Arc<Solver<Snap>>,
    pub(crate) shared: Arc<Shared>,
}

impl Inner {
    pub(crate) fn open(opts: WorkerOptions, store: Option<SnapshotStore>) -> Result<Self> {
        let root = opts.root.clone();
        std::fs::create_dir_all(&root).map_err(|e| Error::io("create worker root", &root, e))?;
        let store = match store {
            Some(s) => s,
            None => SnapshotStore::open(StoreOptions::new(&root))
                .map_err(Error::store("open snapshot store"))?,
        };
        let cache = Arc::new(SnapshotCache {
            store: store.clone(),
        });
        let solver = Arc::new(Solver::new(cache, opts.max_parallelism));
        let shared = Arc::new(Shared::new(&root.join("worker"))?);
        Ok(Inner {
            opts,
            store,
            solver,
            shared,
        })
    }

    pub(crate) fn scratch(&self) -> SolvedRef {
        SolvedRef {
            snap: None,
            store: self.store.clone(),
            sources: Default::default(),
            bases: None,
            trace: None,
            definition: None,
        }
    }
}

/// Solves `def` (see [`crate::Worker::solve`]).
pub(crate) async fn solve(
    inner: &Inner,
    def: pb::Definition,
    ctx: SolveContext,
) -> Result<SolvedRef> {
    solve_traced(inner, def, ctx).await.map(|(r, _)| r)
}

/// How many times a build runs at most when a base image goes before its pin ran (see
/// [`solve_traced`]).
const MAX_ATTEMPTS: usize = 3;

/// Solves `def`, consulting the context's imported caches, and returns what was evaluated (see
/// [`crate::Worker::solve_traced`]).
///
/// Base images used in place are pinned in the background (`ops::source_image`): the build's
/// steps read their layers while the pin starts, and nothing a step made is kept before
/// [`Gated`] confirmed the layers were there all along. When a base went before its pin ran (a
/// `docker system prune` in that window), what was made from it was dropped, and the build runs
/// again from its definition, resolving the base again (pulling it if it can); steps that did
/// not use it are cache hits then. If that resolution fails, the error is the one naming the
/// lost base.
pub(crate) async fn solve_traced(
    inner: &Inner,
    def: pb::Definition,
    ctx: SolveContext,
) -> Result<(SolvedRef, SolveTrace)> {
    let mut first_loss: Option<(String, Error)> = None;
    for attempt in 1..=MAX_ATTEMPTS {
        let (r, bases) = solve_once(inner, &def, ctx.clone()).await;
        match r {
            Err(Attempt::Failed(e)) => {
                return Err(match first_loss {
                    // The lost base could not be resolved again: that is what the user needs.
                    Some((reference, lost)) if !bases.has(&reference) => {
                        tracing::warn!(build_id = %ctx.build_id, %reference, error = %e, "resolving a lost base image again failed");
                        lost
                    }
                    _ => e,
                });
            }
            Err(Attempt::BaseLost(reference, lost)) if attempt < MAX_ATTEMPTS => {
                tracing::warn!(build_id = %ctx.build_id, %reference, attempt, error = %lost, "a base image went before its pin ran; running the build again");
                first_loss.get_or_insert((reference, lost));
            }
            Err(Attempt::BaseLost(_, lost)) => return Err(first_loss.map(|l| l.1).unwrap_or(lost)),
            Ok(r) => return Ok(r),
        }
    }
    unreachable!("the last attempt returns")
}

/// How one run of a build ended unsuccessfully.
enum Attempt {
    /// With this error.
    Failed(Error),
    /// A base image (this reference) went before its pin ran: the build may run again.
    BaseLost(String, Error),
}

impl From<Error> for Attempt {
    fn from(e: Error) -> Self {
        Attempt::Failed(e)
    }
}

/// Why a failed run failed: a base lost before its pin ran explains it (and makes it worth
/// running again); a base lost after (removed by force) gives the clear error naming it.
async fn failed(bases: &ops::source_image::BaseImages, e: Error) -> Attempt {
    if matches!(e, Error::Canceled) {
        return Attempt::Failed(e);
    }
    if let Some((reference, lost)) = bases.lost_before_pinned().await {
        return Attempt::BaseLost(reference, lost.in_vertex_of(&e));
    }
    match bases.check().await {
        Err(lost) => Attempt::Failed(lost.in_vertex_of(&e)),
        Ok(()) => Attempt::Failed(e),
    }
}

/// One run of [`solve_traced`]; also returns the bases it resolved.
async fn solve_once(
    inner: &Inner,
    def: &pb::Definition,
    ctx: SolveContext,
) -> (
    std::result::Result<(SolvedRef, SolveTrace), Attempt>,
    Arc<ops::source_image::BaseImages>,
) {
    let bases: Arc<ops::source_image::BaseImages> = Default::default();
    let r = solve_with_bases(inner, def, ctx, bases.clone()).await;
    (r, bases)
}

async fn solve_with_bases(
    inner: &Inner,
    def: &pb::Definition,
    ctx: SolveContext,
    bases: Arc<ops::source_image::BaseImages>,
) -> std::result::Result<(SolvedRef, SolveTrace), Attempt> {
    let span = tracing::info_span!("solve", build_id = %ctx.build_id);
    let loaded = span.in_scope(|| {
        definition::load(
            def,
            &definition::ValidateOpts {
                platform: &inner.opts.default_platform,
                allowed_entitlements: &inner.opts.allowed_entitlements,
                requested_entitlements: &ctx.entitlements,
            },
        )
    })?;
    let Some(target) = loaded.target else {
        let trace = SolveTrace {
            vertices: vec![],
            target: None,
        };
        return Ok((inner.scratch(), trace));
    };
    // An exec with no-cache starts from empty cache mounts (buildkitd prunes them first).
    let no_cache_ids: Vec<String> = loaded
        .ops
        .iter()
        .filter(|op| op.meta.ignore_cache)
        .flat_map(|op| match op.payload() {
            pb::op::Op::Exec(e) => e
                .mounts
                .iter()
                .filter(|m| m.mount_type == pb::MountType::Cache as i32)
                .filter_map(|m| {
                    m.cache_opt.as_ref().map(|c| {
                        if c.id.is_empty() {
                            m.dest.clone()
                        } else {
                            c.id.clone()
                        }
                    })
                })
                .collect::<Vec<_>>(),
            _ => Vec::new(),
        })
        .collect();
    if !no_cache_ids.is_empty() {
        let root = inner.opts.root.clone();
        cache::blocking(move || ops::exec::prune_cache_mounts(&root, &no_cache_ids)).await?;
    }
    let env = Arc::new(BuildEnv {
        store: inner.store.clone(),
        shared: inner.shared.clone(),
        session: ctx.session.clone(),
        opts: inner.opts.clone(),
        bases,
        build_id: ctx.build_id.clone(),
        // A result that is read waits for its pins: they start at once.
        pin_delay: if ctx.result_read {
            std::time::Duration::ZERO
        } else {
            ops::source_image::pin_delay()
        },
        stock_keys: ctx.stock_keys || !ctx.cache_imports.is_empty(),
    });
    let bases = env.bases.clone();
    let mut graph: Vec<Vertex<Snap>> = Vec::with_capacity(loaded.ops.len());
    // The source ops, kept to read what they resolved to once the build ran.
    let mut source_ops: Vec<(usize, Arc<dyn crate::solver::Op<Snap>>)> = Vec::new();
    for (i, op) in loaded.ops.iter().enumerate() {
        let imp = ops::make_op(op, &env)?;
        let imp: Arc<dyn crate::solver::Op<Snap>> = if matches!(op.payload(), pb::op::Op::Source(_))
        {
            source_ops.push((i, imp.clone()));
            imp
        } else {
            Arc::new(Gated {
                op: imp,
                bases: bases.clone(),
            })
        };
        graph.push(Vertex {
            digest: op.digest.clone(),
            name: op.name.clone(),
            inputs: op.inputs.clone(),
            outputs: definition::num_outputs(&op.op),
            ignore_cache: op.meta.ignore_cache,
            progress_group: op
                .meta
                .progress_group
                .as_ref()
                .map(|g| crate::ProgressGroup {
                    id: g.id.clone(),
                    name: g.name.clone(),
                    weak: g.weak,
                }),
            op: imp,
        });
    }
    // Per vertex: digest, inputs, ignore_cache, number of outputs.
    type Shape = (String, Vec<(usize, usize)>, bool, usize);
    let shape: Vec<Shape> = graph
        .iter()
        .map(|v| {
            (
                v.digest.clone(),
                v.inputs.clone(),
                v.ignore_cache,
                v.outputs,
            )
        })
        .collect();
    let import: Option<Arc<dyn crate::solver::ImportStore<Snap>>> = if ctx.cache_imports.is_empty()
    {
        None
    } else {
        Some(Arc::new(import::Imported::new(
            ctx.cache_imports.clone(),
            inner.store.clone(),
            inner.opts.clone(),
        )))
    };
    let r = inner
        .solver
        .solve_with(
            graph,
            target,
            ctx.progress.clone(),
            ctx.cancel.clone(),
            import,
        )
        .instrument(span)
        .await;
    // A base image used in place that lost its layers during the build explains any failure
    // (and makes a success suspect: a step may have read a vanishing lower dir).
    let (solved, stats, evaluated) = match r {
        Err(e) => {
            let why = failed(&bases, e).await;
            if let Attempt::BaseLost(_, e) = &why {
                tracing::warn!(build_id = %ctx.build_id, error = %e, "build failed after a base image went before its pin ran");
            }
            return Err(why);
        }
        Ok(r) => {
            // What reads the result's files next (an export) needs the pins to run by then (a
            // cached build read no layer yet); a build whose result nobody reads does not wait.
            if ctx.result_read {
                bases.wait_running().await;
            }
            if let Err(e) = bases.confirm().await {
                return Err(failed(&bases, e).await);
            }
            r
        }
    };
    tracing::info!(build_id = %ctx.build_id, cached = stats.cached, imported = stats.imported, executed = stats.executed, "solved");
    let mut sources: Vec<crate::result::ResultSource> = source_ops
        .iter()
        .filter_map(|(i, imp)| match loaded.ops[*i].payload() {
            pb::op::Op::Source(s) => Some(crate::result::ResultSource {
                identifier: s.identifier.clone(),
                attrs: s.attrs.clone().into_iter().collect(),
                pin: imp.pin().unwrap_or_default(),
            }),
            _ => None,
        })
        .collect();
    sources.sort();
    sources.dedup();
    let sources = Arc::new(sources);
    let vertices = evaluated
        .into_iter()
        .zip(shape)
        .map(|(ev, (digest, inputs, ignore_cache, n))| {
            ev.map(|ev| TracedVertex {
                digest,
                key: ev.key.clone(),
                alias: ev.alias.clone(),
                stock: ev.stock.as_ref().map(|m| StockVertex {
                    records: (0..n)
                        .map(|o| crate::bkkeys::root_key(&m.digest, o as i64))
                        .collect(),
                    inputs: (0..inputs.len())
                        .map(|j| match m.content.get(j) {
                            Some(Some(c)) => StockLink::Content(c.clone()),
                            _ => StockLink::Input(m.selectors.get(j).cloned().unwrap_or_default()),
                        })
                        .collect(),
                }),
                inputs,
                ignore_cache,
                outputs: (0..n)
                    .map(|i| TracedOutput {
                        key: crate::solver::output_key(&ev.key, i),
                        result: ev
                            .outputs
                            .as_ref()
                            .and_then(|o| o.get(i))
                            .and_then(Option::as_ref)
                            .map(|o| SolvedRef {
                                snap: Some(o.result.clone()),
                                store: inner.store.clone(),
                                sources: sources.clone(),
                                bases: Some(bases.clone()),
                                trace: None,
                                definition: None,
                            }),
                    })
                    .collect(),
            })
        })
        .collect();
    let trace = SolveTrace {
        vertices,
        target: Some(target),
    };
    Ok((
        SolvedRef {
            snap: Some(solved.result),
            store: inner.store.clone(),
            sources,
            bases: Some(bases),
            trace: Some(Arc::new(trace.clone())),
            definition: Some(Arc::new(def.clone())),
        },
        trace,
    ))
}

/// A step of a build that may use base images in place: what it made (its results, or its cache
/// key when that reads its inputs' content) is handed on only once [`BaseImages::confirm`] says
/// the bases' layers were there all along (their pins start in the background while steps run).
///
/// [`BaseImages::confirm`]: ops::source_image::BaseImages::confirm
struct Gated {
    op: Arc<dyn crate::solver::Op<Snap>>,
    bases: Arc<ops::source_image::BaseImages>,
}

#[async_trait::async_trait]
impl crate::solver::Op<Snap> for Gated {
    async fn cache_key(
        &self,
        ctx: &crate::solver::OpContext,
        inputs: &[crate::solver::Solved<Snap>],
    ) -> Result<String> {
        let key = self
            .op
            .cache_key(ctx, inputs)
            .await
            .map_err(|e| e.with_bases(&self.bases))?;
        self.bases.confirm().await?;
        Ok(key)
    }

    fn key_from_input_keys(&self, input_keys: &[&str]) -> Option<String> {
        self.op.key_from_input_keys(input_keys)
    }

    fn alias_key(&self, input_keys: &[&str]) -> Option<String> {
        self.op.alias_key(input_keys)
    }

    async fn exec(
        &self,
        ctx: &crate::solver::OpContext,
        inputs: &[crate::solver::Solved<Snap>],
    ) -> Result<Vec<Snap>> {
        // The states a failed step left hold the bases' pins (a client may read them).
        let results = self
            .op
            .exec(ctx, inputs)
            .await
            .map_err(|e| e.with_bases(&self.bases))?;
        self.bases.confirm().await?;
        Ok(results)
    }

    fn pin(&self) -> Option<String> {
        self.op.pin()
    }

    fn stock_map(&self) -> Option<crate::bkkeys::StockMap> {
        self.op.stock_map()
    }
}
