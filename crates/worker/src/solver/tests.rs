//! Scheduler tests with in-memory ops: strings as results, a HashMap as cache.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Results by output key, as the snapshot cache records them.
#[derive(Default)]
struct MemCache(Mutex<HashMap<String, String>>);

#[async_trait]
impl CacheStore<String> for MemCache {
    async fn load(&self, key: &str, needed: &[bool]) -> Result<Option<Vec<Option<String>>>> {
        let map = self.0.lock().unwrap();
        let mut out = vec![];
        for (i, &need) in needed.iter().enumerate() {
            match map.get(&output_key(key, i)) {
                Some(r) => out.push(Some(r.clone())),
                None if need => return Ok(None),
                None => out.push(None),
            }
        }
        Ok(Some(out))
    }
    async fn save(&self, key: &str, results: &[Option<String>]) -> Result<()> {
        let mut map = self.0.lock().unwrap();
        for (i, r) in results.iter().enumerate() {
            if let Some(r) = r {
                map.insert(output_key(key, i), r.clone());
            }
        }
        Ok(())
    }
}

/// Concatenates its inputs' results and its own label; counts executions; can wait on a
/// barrier or block forever.
struct Concat {
    label: String,
    execs: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    max_running: Arc<AtomicUsize>,
    barrier: Option<Arc<tokio::sync::Barrier>>,
    block: bool,
    fail: bool,
    delay: Duration,
    /// Key from the inputs' keys alone ([`Op::key_from_input_keys`]).
    keys_only: bool,
}

impl Concat {
    fn new(label: &str, execs: &Arc<AtomicUsize>) -> Self {
        Concat {
            label: label.into(),
            execs: execs.clone(),
            running: Arc::new(AtomicUsize::new(0)),
            max_running: Arc::new(AtomicUsize::new(0)),
            barrier: None,
            block: false,
            fail: false,
            delay: Duration::ZERO,
            keys_only: false,
        }
    }
}

#[async_trait]
impl Op<String> for Concat {
    async fn cache_key(&self, _ctx: &OpContext, inputs: &[Solved<String>]) -> Result<String> {
        let mut h = crate::digest::KeyHasher::new("concat");
        h.field(self.label.as_bytes());
        for i in inputs {
            h.field(i.key.as_bytes());
        }
        Ok(h.finish())
    }

    fn key_from_input_keys(&self, input_keys: &[&str]) -> Option<String> {
        if !self.keys_only {
            return None;
        }
        let mut h = crate::digest::KeyHasher::new("concat");
        h.field(self.label.as_bytes());
        for k in input_keys {
            h.field(k.as_bytes());
        }
        Some(h.finish())
    }

    async fn exec(&self, _ctx: &OpContext, inputs: &[Solved<String>]) -> Result<Vec<String>> {
        self.execs.fetch_add(1, Ordering::SeqCst);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        if let Some(b) = &self.barrier {
            b.wait().await;
        }
        if self.block {
            futures::future::pending::<()>().await;
        }
        tokio::time::sleep(self.delay).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        if self.fail {
            return Err(Error::FileAction {
                action: "test",
                path: self.label.clone(),
                reason: "boom".into(),
            });
        }
        let mut parts: Vec<String> = inputs.iter().map(|i| i.result.clone()).collect();
        parts.push(self.label.clone());
        Ok(vec![parts.join("+")])
    }
}

fn vertex(name: &str, inputs: Vec<usize>, op: Concat) -> Vertex<String> {
    Vertex {
        digest: format!("sha256:{name}"),
        name: name.into(),
        inputs: inputs.into_iter().map(|i| (i, 0)).collect(),
        outputs: 1,
        ignore_cache: false,
        progress_group: None,
        op: Arc::new(op),
    }
}

fn events() -> (ProgressSink, Arc<Mutex<Vec<ProgressEvent>>>) {
    let evs = Arc::new(Mutex::new(vec![]));
    let e2 = evs.clone();
    (
        ProgressSink::from_fn(move |e| e2.lock().unwrap().push(e)),
        evs,
    )
}

/// a, b independent; c = a+b; d = c.
fn diamond(execs: &Arc<AtomicUsize>, b_label: &str) -> Vec<Vertex<String>> {
    vec![
        vertex("a", vec![], Concat::new("a", execs)),
        vertex("b", vec![], Concat::new(b_label, execs)),
        vertex("c", vec![0, 1], Concat::new("c", execs)),
        vertex("d", vec![2], Concat::new("d", execs)),
    ]
}

#[test]
fn topo_order_orders_and_detects_cycles() {
    let edges = [vec![1, 2], vec![2], vec![]];
    let order = topo_order(3, |i| edges[i].clone()).unwrap();
    let pos = |n| order.iter().position(|&x| x == n).unwrap();
    assert!(pos(2) < pos(1) && pos(1) < pos(0));

    let cyc = [vec![1], vec![2], vec![0]];
    assert!(topo_order(3, |i| cyc[i].clone()).is_err());
    let selfloop = [vec![0]];
    assert_eq!(topo_order(1, |i| selfloop[i].clone()), Err(0));
}

#[tokio::test]
async fn cycle_is_invalid_argument() {
    let execs = Arc::new(AtomicUsize::new(0));
    let solver = Arc::new(Solver::new(Arc::new(MemCache::default()), 2));
    let g = vec![
        vertex("a", vec![1], Concat::new("a", &execs)),
        vertex("b", vec![0], Concat::new("b", &execs)),
    ];
    let err = solver
        .solve(g, (0, 0), ProgressSink::discard(), CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("cycle"), "{err}");
    assert_eq!(execs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn rebuild_is_fully_cached_and_change_reruns_dependents_only() {
    let execs = Arc::new(AtomicUsize::new(0));
    let solver = Arc::new(Solver::new(Arc::new(MemCache::default()), 4));
    let (sink, evs) = events();
    let (r, stats) = solver
        .solve(
            diamond(&execs, "b"),
            (3, 0),
            sink.clone(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(r.result, "a+b+c+d");
    assert_eq!(
        stats,
        SolveStats {
            cached: 0,
            executed: 4,
            imported: 0,
        }
    );
    assert_eq!(execs.load(Ordering::SeqCst), 4);

    evs.lock().unwrap().clear();
    let (r2, stats) = solver
        .solve(
            diamond(&execs, "b"),
            (3, 0),
            sink.clone(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(r2.result, "a+b+c+d");
    assert_eq!(r2.key, r.key);
    assert_eq!(
        stats,
        SolveStats {
            cached: 4,
            executed: 0,
            imported: 0,
        }
    );
    assert_eq!(
        execs.load(Ordering::SeqCst),
        4,
        "nothing executed on rebuild"
    );
    let completed: Vec<bool> = evs
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            ProgressEvent::VertexCompleted { cached, error, .. } => {
                assert!(error.is_none());
                Some(*cached)
            }
            _ => None,
        })
        .collect();
    assert_eq!(completed, vec![true; 4]);

    // Change b: b, c, d re-run; a stays cached.
    let (r3, stats) = solver
        .solve(diamond(&execs, "B"), (3, 0), sink, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(r3.result, "a+B+c+d");
    assert_eq!(
        stats,
        SolveStats {
            cached: 1,
            executed: 3,
            imported: 0,
        }
    );
}

#[tokio::test]
async fn independent_vertices_run_in_parallel() {
    let execs = Arc::new(AtomicUsize::new(0));
    let solver = Arc::new(Solver::new(Arc::new(MemCache::default()), 2));
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let mut a = Concat::new("a", &execs);
    a.barrier = Some(barrier.clone());
    let mut b = Concat::new("b", &execs);
    b.barrier = Some(barrier);
    let g = vec![
        vertex("a", vec![], a),
        vertex("b", vec![], b),
        vertex("c", vec![0, 1], Concat::new("c", &execs)),
    ];
    // With sequential execution the barrier would never open.
    let (r, _) = tokio::time::timeout(
        Duration::from_secs(5),
        solver.solve(g, (2, 0), ProgressSink::discard(), CancellationToken::new()),
    )
    .await
    .expect("a and b must run concurrently")
    .unwrap();
    assert_eq!(r.result, "a+b+c");
}

#[tokio::test]
async fn parallelism_limit_is_respected() {
    let execs = Arc::new(AtomicUsize::new(0));
    let solver = Arc::new(Solver::new(Arc::new(MemCache::default()), 1));
    let running = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let mut g = vec![];
    for l in ["a", "b", "c", "d"] {
        let mut op = Concat::new(l, &execs);
        op.running = running.clone();
        op.max_running = max.clone();
        op.delay = Duration::from_millis(20);
        g.push(vertex(l, vec![], op));
    }
    g.push(vertex("top", vec![0, 1, 2, 3], Concat::new("top", &execs)));
    solver
        .solve(g, (4, 0), ProgressSink::discard(), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(max.load(Ordering::SeqCst), 1);
    assert_eq!(execs.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn concurrent_builds_share_identical_vertices() {
    let execs = Arc::new(AtomicUsize::new(0));
    let solver = Arc::new(Solver::new(Arc::new(MemCache::default()), 4));
    let mk = || {
        let mut op = Concat::new("slow", &execs);
        op.delay = Duration::from_millis(200);
        vec![vertex("slow", vec![], op)]
    };
    let (r1, r2) = tokio::join!(
        solver.solve(
            mk(),
            (0, 0),
            ProgressSink::discard(),
            CancellationToken::new()
        ),
        solver.solve(
            mk(),
            (0, 0),
            ProgressSink::discard(),
            CancellationToken::new()
        ),
    );
    assert_eq!(r1.unwrap().0.result, "slow");
    assert_eq!(r2.unwrap().0.result, "slow");
    assert_eq!(
        execs.load(Ordering::SeqCst),
        1,
        "identical vertex executed once"
    );
}

#[tokio::test]
async fn ignore_cache_executes_again() {
    let execs = Arc::new(AtomicUsize::new(0));
    let solver = Arc::new(Solver::new(Arc::new(MemCache::default()), 4));
    for _ in 0..2 {
        let mut v = vertex("a", vec![], Concat::new("a", &execs));
        v.ignore_cache = true;
        solver
            .solve(
                vec![v],
                (0, 0),
                ProgressSink::discard(),
                CancellationToken::new(),
            )
            .await
            .unwrap();
    }
    assert_eq!(execs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn cancel_stops_and_completes_running_vertices() {
    let execs = Arc::new(AtomicUsize::new(0));
    let solver = Arc::new(Solver::new(Arc::new(MemCache::default()), 4));
    let mut op = Concat::new("forever", &execs);
    op.block = true;
    let g = vec![
        vertex("forever", vec![], op),
        vertex("after", vec![0], Concat::new("after", &execs)),
    ];
    let (sink, evs) = events();
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c2.cancel();
    });
    let err = tokio::time::timeout(
        Duration::from_secs(5),
        solver.solve(g, (1, 0), sink, cancel),
    )
    .await
    .expect("cancel must stop the build")
    .unwrap_err();
    assert_eq!(err.kind(), crate::ErrorKind::Canceled);
    let evs = evs.lock().unwrap();
    let started: Vec<_> = evs
        .iter()
        .filter_map(|e| match e {
            ProgressEvent::VertexStarted { digest, .. } => Some(digest.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(started, vec!["sha256:forever".to_string()]);
    let completed: Vec<_> = evs
        .iter()
        .filter_map(|e| match e {
            ProgressEvent::VertexCompleted { digest, error, .. } => {
                Some((digest.clone(), error.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        completed,
        vec![(
            "sha256:forever".to_string(),
            Some("context canceled".to_string())
        )]
    );
}

#[tokio::test]
async fn failure_names_the_vertex_and_cancels_siblings() {
    let execs = Arc::new(AtomicUsize::new(0));
    let solver = Arc::new(Solver::new(Arc::new(MemCache::default()), 4));
    let mut bad = Concat::new("bad", &execs);
    bad.fail = true;
    let mut slow = Concat::new("slow", &execs);
    slow.block = true;
    let g = vec![
        vertex("bad", vec![], bad),
        vertex("slow", vec![], slow),
        vertex("top", vec![0, 1], Concat::new("top", &execs)),
    ];
    let (sink, evs) = events();
    let err = tokio::time::timeout(
        Duration::from_secs(5),
        solver.solve(g, (2, 0), sink, CancellationToken::new()),
    )
    .await
    .expect("failure must not wait for the blocked sibling")
    .unwrap_err();
    // the message is the op's error alone; the vertex travels as its digest
    assert_eq!(err.to_string(), "test \"bad\": boom");
    assert_eq!(err.vertex_digest(), Some("sha256:bad"));
    let evs = evs.lock().unwrap();
    let n_started = evs
        .iter()
        .filter(|e| matches!(e, ProgressEvent::VertexStarted { .. }))
        .count();
    let n_completed = evs
        .iter()
        .filter(|e| matches!(e, ProgressEvent::VertexCompleted { .. }))
        .count();
    assert_eq!(n_started, n_completed, "every started vertex completes");
}

/// Returns its label; its key hashes the label and the inputs' keys.
struct Label(String, Duration);

#[async_trait]
impl Op<String> for Label {
    async fn cache_key(&self, _ctx: &OpContext, inputs: &[Solved<String>]) -> Result<String> {
        let mut h = crate::digest::KeyHasher::new("label");
        h.field(self.0.as_bytes());
        for i in inputs {
            h.field(i.key.as_bytes());
        }
        Ok(h.finish())
    }

    async fn exec(&self, _ctx: &OpContext, _inputs: &[Solved<String>]) -> Result<Vec<String>> {
        tokio::time::sleep(self.1).await;
        Ok(vec![self.0.clone()])
    }
}

/// A chain of vertices each using its predecessor through many edges (an exec mounting many
/// outputs of the previous one, as TestLLBMountPerformance builds) is solved at once: each
/// input vertex is awaited once, not once per edge, which multiplied the polls along the chain
/// at every wake-up (20 links never finished).
#[test]
fn many_edges_to_one_vertex_do_not_multiply_polls() {
    let (tx, rx) = std::sync::mpsc::channel();
    // Its own thread and runtime: without the fix the solve spins in one poll and could not be
    // interrupted by a timeout on the same runtime.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let r = rt.block_on(async {
            let solver = Arc::new(Solver::new(Arc::new(MemCache::default()), 4));
            let mut graph = vec![Vertex {
                digest: "sha256:v0".into(),
                name: "v0".into(),
                inputs: vec![],
                outputs: 1,
                ignore_cache: false,
                progress_group: None,
                op: Arc::new(Label("v0".into(), Duration::from_millis(200))) as Arc<dyn Op<String>>,
            }];
            for i in 1..20 {
                graph.push(Vertex {
                    digest: format!("sha256:v{i}"),
                    name: format!("v{i}"),
                    inputs: vec![(i - 1, 0); i + 1],
                    outputs: 1,
                    ignore_cache: false,
                    progress_group: None,
                    op: Arc::new(Label(format!("v{i}"), Duration::from_millis(10))),
                });
            }
            let (sink, _) = events();
            solver
                .solve(graph, (19, 0), sink, CancellationToken::new())
                .await
                .map(|(r, _)| r.result)
        });
        let _ = tx.send(r);
    });
    let r = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("a chain of 20 many-edged vertices must solve quickly");
    assert_eq!(r.unwrap(), "v19");
}

/// A chain a → b → c whose keys need no input results.
fn keyed_chain(execs: &Arc<AtomicUsize>) -> Vec<Vertex<String>> {
    let op = |l: &str| {
        let mut c = Concat::new(l, execs);
        c.keys_only = true;
        c
    };
    vec![
        vertex("a", vec![], op("a")),
        vertex("b", vec![0], op("b")),
        vertex("c", vec![1], op("c")),
    ]
}

/// Counts loads per key.
#[derive(Default)]
struct CountingCache {
    inner: MemCache,
    loads: Mutex<Vec<String>>,
}

#[async_trait]
impl CacheStore<String> for CountingCache {
    async fn load(&self, key: &str, needed: &[bool]) -> Result<Option<Vec<Option<String>>>> {
        self.loads.lock().unwrap().push(key.to_string());
        self.inner.load(key, needed).await
    }
    async fn save(&self, key: &str, results: &[Option<String>]) -> Result<()> {
        self.inner.save(key, results).await
    }
}

#[tokio::test]
async fn cached_target_needs_no_input_results() {
    let execs = Arc::new(AtomicUsize::new(0));
    let cache = Arc::new(CountingCache::default());
    let solver = Arc::new(Solver::new(cache.clone(), 4));
    let (r, _) = solver
        .solve(
            keyed_chain(&execs),
            (2, 0),
            ProgressSink::discard(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(r.result, "a+b+c");
    assert_eq!(execs.load(Ordering::SeqCst), 3);
    cache.loads.lock().unwrap().clear();
    let (sink, evs) = events();
    let (r2, stats, evaluated) = solver
        .solve_with(
            keyed_chain(&execs),
            (2, 0),
            sink,
            CancellationToken::new(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(r2.result, "a+b+c");
    assert_eq!(execs.load(Ordering::SeqCst), 3, "nothing ran");
    assert_eq!(
        cache.loads.lock().unwrap().len(),
        1,
        "only the target's result is loaded"
    );
    assert_eq!(stats.cached, 3, "{stats:?}");
    // Every vertex announced once and completed as cached.
    let evs = evs.lock().unwrap();
    let completed: Vec<(String, bool)> = evs
        .iter()
        .filter_map(|e| match e {
            ProgressEvent::VertexCompleted {
                digest,
                cached,
                error,
                ..
            } => {
                assert!(error.is_none());
                Some((digest.clone(), *cached))
            }
            _ => None,
        })
        .collect();
    assert_eq!(completed.len(), 3, "{completed:?}");
    assert!(completed.iter().all(|c| c.1), "{completed:?}");
    // The trace has every key; only the target's outputs.
    assert!(evaluated.iter().all(|e| e.is_some()));
    assert!(evaluated[2].as_ref().unwrap().outputs.is_some());
    assert!(evaluated[0].as_ref().unwrap().outputs.is_none());
}

#[tokio::test]
async fn missing_result_builds_inputs_then_runs() {
    let execs = Arc::new(AtomicUsize::new(0));
    let solver = Arc::new(Solver::new(Arc::new(MemCache::default()), 4));
    let (r, stats) = solver
        .solve(
            keyed_chain(&execs),
            (2, 0),
            ProgressSink::discard(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(r.result, "a+b+c");
    assert_eq!(stats.executed, 3);
    // Only c changes: a and b come from the cache, c runs on b's result.
    let mut g = keyed_chain(&execs);
    let mut c = Concat::new("C", &execs);
    c.keys_only = true;
    g[2].op = Arc::new(c);
    let (r, stats) = solver
        .solve(g, (2, 0), ProgressSink::discard(), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(r.result, "a+b+C");
    assert_eq!(stats.executed, 1, "{stats:?}");
    assert_eq!(stats.cached, 2, "{stats:?}");
}

/// Imported results by output key, as exports write them; counts lookups.
struct MemImport(HashMap<String, String>, Arc<AtomicUsize>);

#[async_trait]
impl ImportStore<String> for MemImport {
    async fn load(
        &self,
        _ctx: &OpContext,
        key: &str,
        needed: &[bool],
    ) -> Option<Vec<Option<String>>> {
        self.1.fetch_add(1, Ordering::SeqCst);
        let mut out = vec![];
        for (i, &need) in needed.iter().enumerate() {
            match self.0.get(&output_key(key, i)) {
                Some(r) if need => out.push(Some(r.clone())),
                None if need => return None,
                _ => out.push(None),
            }
        }
        Some(out)
    }
}

#[tokio::test]
async fn imported_target_is_cached_without_running_its_inputs() {
    // Node A builds and records what it evaluated.
    let execs_a = Arc::new(AtomicUsize::new(0));
    let a = Arc::new(Solver::new(Arc::new(MemCache::default()), 4));
    let (_, _, ev) = a
        .solve_with(
            keyed_chain(&execs_a),
            (2, 0),
            ProgressSink::discard(),
            CancellationToken::new(),
            None,
        )
        .await
        .unwrap();
    let exported: HashMap<String, String> = ev
        .iter()
        .flatten()
        .filter_map(|e| {
            let o = e.outputs.as_ref()?;
            Some((output_key(&e.key, 0), o[0].as_ref()?.result.clone()))
        })
        .collect();
    assert_eq!(exported.len(), 3);
    // Node B: empty local cache, imports.
    let execs_b = Arc::new(AtomicUsize::new(0));
    let lookups = Arc::new(AtomicUsize::new(0));
    let b = Arc::new(Solver::new(Arc::new(MemCache::default()), 4));
    let import: Arc<dyn ImportStore<String>> = Arc::new(MemImport(exported, lookups.clone()));
    let (r, stats, _) = b
        .solve_with(
            keyed_chain(&execs_b),
            (2, 0),
            ProgressSink::discard(),
            CancellationToken::new(),
            Some(import),
        )
        .await
        .unwrap();
    assert_eq!(r.result, "a+b+c");
    assert_eq!(execs_b.load(Ordering::SeqCst), 0, "nothing ran on B");
    assert_eq!(
        lookups.load(Ordering::SeqCst),
        1,
        "only the target was fetched"
    );
    assert_eq!(stats.imported, 1);
    assert_eq!(stats.cached, 3);
}

/// Two outputs: `<label>:0` and `<label>:1`, keyed from the inputs' keys.
struct TwoOut(String, Arc<AtomicUsize>);

#[async_trait]
impl Op<String> for TwoOut {
    async fn cache_key(&self, _ctx: &OpContext, inputs: &[Solved<String>]) -> Result<String> {
        let keys: Vec<&str> = inputs.iter().map(|i| i.key.as_str()).collect();
        Ok(self.key_from_input_keys(&keys).expect("keyed from inputs"))
    }

    fn key_from_input_keys(&self, input_keys: &[&str]) -> Option<String> {
        let mut h = crate::digest::KeyHasher::new("two");
        h.field(self.0.as_bytes());
        for k in input_keys {
            h.field(k.as_bytes());
        }
        Some(h.finish())
    }

    async fn exec(&self, _ctx: &OpContext, inputs: &[Solved<String>]) -> Result<Vec<String>> {
        self.1.fetch_add(1, Ordering::SeqCst);
        let base: Vec<String> = inputs.iter().map(|i| i.result.clone()).collect();
        let base = base.join("+");
        Ok(vec![
            format!("{base}>{}:0", self.0),
            format!("{base}>{}:1", self.0),
        ])
    }
}

/// x (two outputs) → y (two outputs) using x's output 1; the build wants y's output 1, as
/// an exec whose result is a mount (TestBasicRegistryCacheImportExport).
fn two_output_chain(execs: &Arc<AtomicUsize>) -> Vec<Vertex<String>> {
    let v = |name: &str, inputs: Vec<(usize, usize)>| Vertex {
        digest: format!("sha256:{name}"),
        name: name.into(),
        inputs,
        outputs: 2,
        ignore_cache: false,
        progress_group: None,
        op: Arc::new(TwoOut(name.into(), execs.clone())) as Arc<dyn Op<String>>,
    };
    vec![v("x", vec![]), v("y", vec![(0, 1)])]
}

/// A mode=min export records only the build result's output of a step with several outputs;
/// importing it is a hit all the same (the other output is used by nothing), nothing runs, and
/// the local cache then serves the next build without the import.
#[tokio::test]
async fn import_with_only_the_used_output_of_a_multi_output_step_is_a_hit() {
    let execs_a = Arc::new(AtomicUsize::new(0));
    let a = Arc::new(Solver::new(Arc::new(MemCache::default()), 4));
    let (ra, _, ev) = a
        .solve_with(
            two_output_chain(&execs_a),
            (1, 1),
            ProgressSink::discard(),
            CancellationToken::new(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(ra.result, ">x:1>y:1");
    // mode=min: the target's output only.
    let y = ev[1].as_ref().unwrap();
    let exported: HashMap<String, String> = [(
        output_key(&y.key, 1),
        y.outputs.as_ref().unwrap()[1]
            .as_ref()
            .unwrap()
            .result
            .clone(),
    )]
    .into();
    let execs_b = Arc::new(AtomicUsize::new(0));
    let cache_b = Arc::new(MemCache::default());
    let b = Arc::new(Solver::new(cache_b.clone(), 4));
    let import: Arc<dyn ImportStore<String>> =
        Arc::new(MemImport(exported, Arc::new(AtomicUsize::new(0))));
    let (rb, stats, ev) = b
        .solve_with(
            two_output_chain(&execs_b),
            (1, 1),
            ProgressSink::discard(),
            CancellationToken::new(),
            Some(import),
        )
        .await
        .unwrap();
    assert_eq!(rb.result, ">x:1>y:1");
    assert_eq!(execs_b.load(Ordering::SeqCst), 0, "nothing ran on B");
    assert_eq!(stats.imported, 1, "{stats:?}");
    let y = ev[1].as_ref().unwrap().outputs.as_ref().unwrap();
    assert!(y[0].is_none(), "the unused output stays absent: {y:?}");
    // B's own cache now has the used output: the next build needs no import.
    let (rb2, stats) = b
        .solve(
            two_output_chain(&execs_b),
            (1, 1),
            ProgressSink::discard(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(rb2.result, ">x:1>y:1");
    assert_eq!(execs_b.load(Ordering::SeqCst), 0, "{stats:?}");
    // A build that uses y's other output cannot take the partial result: y runs (on x's
    // output 1, which x must now build since nothing has it).
    let (r0, _) = b
        .solve(
            two_output_chain(&execs_b),
            (1, 0),
            ProgressSink::discard(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(r0.result, ">x:1>y:0");
    assert_eq!(execs_b.load(Ordering::SeqCst), 2, "x and y ran");
}

/// A step whose output differs on every run (a RUN writing random bytes): `<label>#<n>`, `n`
/// from its own counter (the second one counts executions).
struct Random(String, Arc<AtomicUsize>, Arc<AtomicUsize>);

#[async_trait]
impl Op<String> for Random {
    async fn cache_key(&self, _ctx: &OpContext, inputs: &[Solved<String>]) -> Result<String> {
        let keys: Vec<&str> = inputs.iter().map(|i| i.key.as_str()).collect();
        Ok(self.key_from_input_keys(&keys).expect("keyed from inputs"))
    }

    fn key_from_input_keys(&self, input_keys: &[&str]) -> Option<String> {
        let mut h = crate::digest::KeyHasher::new("random");
        h.field(self.0.as_bytes());
        for k in input_keys {
            h.field(k.as_bytes());
        }
        Some(h.finish())
    }

    async fn exec(&self, _ctx: &OpContext, _inputs: &[Solved<String>]) -> Result<Vec<String>> {
        self.2.fetch_add(1, Ordering::SeqCst);
        let n = self.1.fetch_add(1, Ordering::SeqCst);
        Ok(vec![format!("{}#{n}", self.0)])
    }
}

/// A copy: keyed by its inputs' content (their results), with an alias of its inputs' keys.
struct CopyContent(String, Arc<AtomicUsize>);

#[async_trait]
impl Op<String> for CopyContent {
    async fn cache_key(&self, _ctx: &OpContext, inputs: &[Solved<String>]) -> Result<String> {
        let mut h = crate::digest::KeyHasher::new("copy-content");
        h.field(self.0.as_bytes());
        for i in inputs {
            h.field(i.result.as_bytes());
        }
        Ok(h.finish())
    }

    fn alias_key(&self, input_keys: &[&str]) -> Option<String> {
        let mut h = crate::digest::KeyHasher::new("copy-alias");
        h.field(self.0.as_bytes());
        for k in input_keys {
            h.field(k.as_bytes());
        }
        Some(h.finish())
    }

    async fn exec(&self, _ctx: &OpContext, inputs: &[Solved<String>]) -> Result<Vec<String>> {
        self.1.fetch_add(1, Ordering::SeqCst);
        let parts: Vec<String> = inputs.iter().map(|i| i.result.clone()).collect();
        Ok(vec![format!("copy({})", parts.join(","))])
    }
}

/// [`MemImport`] with alias keys → vertex keys, as an export records them.
struct AliasImport(MemImport, HashMap<String, String>);

#[async_trait]
impl ImportStore<String> for AliasImport {
    async fn load(
        &self,
        ctx: &OpContext,
        key: &str,
        needed: &[bool],
    ) -> Option<Vec<Option<String>>> {
        self.0.load(ctx, key, needed).await
    }

    fn alias(&self, alias: &str) -> Option<String> {
        self.1.get(alias).cloned()
    }
}

/// source → random RUN (numbered from `first`) → copy from the RUN (keyed by content).
fn copy_from_random(execs: &Arc<AtomicUsize>, first: usize) -> Vec<Vertex<String>> {
    let v = |name: &str, inputs: Vec<usize>, op: Arc<dyn Op<String>>| Vertex {
        digest: format!("sha256:{name}"),
        name: name.into(),
        inputs: inputs.into_iter().map(|i| (i, 0)).collect(),
        outputs: 1,
        ignore_cache: false,
        progress_group: None,
        op,
    };
    vec![
        v("src", vec![], Arc::new(Concat::new("src", execs))),
        v(
            "run",
            vec![0],
            Arc::new(Random(
                "run".into(),
                Arc::new(AtomicUsize::new(first)),
                execs.clone(),
            )),
        ),
        v(
            "copy",
            vec![1],
            Arc::new(CopyContent("copy".into(), execs.clone())),
        ),
    ]
}

/// A mode=min import of a step keyed by its input's content: the imported alias gives its key
/// without running the input (whose record has no result), so the result is the exporter's
/// (BuildKit's TestCacheImportExport). Without the alias the input runs, its new output gives
/// another key, and the step runs too.
#[tokio::test]
async fn imported_alias_keys_a_content_keyed_step_without_running_its_input() {
    let execs_a = Arc::new(AtomicUsize::new(0));
    let a = Arc::new(Solver::new(Arc::new(MemCache::default()), 4));
    let (ra, _, ev) = a
        .solve_with(
            copy_from_random(&execs_a, 1),
            (2, 0),
            ProgressSink::discard(),
            CancellationToken::new(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(ra.result, "copy(run#1)");
    let copy = ev[2].as_ref().unwrap();
    let alias = copy.alias.clone().expect("the copy has an alias");
    assert_ne!(alias, copy.key);
    assert!(ev[1].as_ref().unwrap().alias.is_none(), "keyed from inputs");
    // mode=min: the target's result only, and the alias.
    let exported: HashMap<String, String> = [(output_key(&copy.key, 0), ra.result.clone())].into();
    let aliases: HashMap<String, String> = [(alias, copy.key.clone())].into();

    for with_alias in [true, false] {
        let execs_b = Arc::new(AtomicUsize::new(0));
        let b = Arc::new(Solver::new(Arc::new(MemCache::default()), 4));
        let import = MemImport(exported.clone(), Arc::new(AtomicUsize::new(0)));
        let import: Arc<dyn ImportStore<String>> = if with_alias {
            Arc::new(AliasImport(import, aliases.clone()))
        } else {
            Arc::new(import)
        };
        let (rb, stats, _) = b
            .solve_with(
                copy_from_random(&execs_b, 2),
                (2, 0),
                ProgressSink::discard(),
                CancellationToken::new(),
                Some(import),
            )
            .await
            .unwrap();
        if with_alias {
            assert_eq!(rb.result, "copy(run#1)");
            assert_eq!(execs_b.load(Ordering::SeqCst), 0, "nothing ran on B");
            assert_eq!((stats.imported, stats.executed), (1, 0), "{stats:?}");
        } else {
            assert_eq!(rb.result, "copy(run#2)", "the input ran again: {stats:?}");
            assert_eq!(execs_b.load(Ordering::SeqCst), 3, "{stats:?}");
        }
    }
}

/// An imported alias whose step has no result and must run (a later step missed): its inputs
/// are built and differ from the exporter's (the RUN ran again), so the step is recorded under
/// the key of its real input content, never under the alias's key, which stands for other
/// content.
#[tokio::test]
async fn alias_step_that_runs_is_recorded_under_its_real_key() {
    let execs_a = Arc::new(AtomicUsize::new(0));
    let a = Arc::new(Solver::new(Arc::new(MemCache::default()), 4));
    let (_, _, ev) = a
        .solve_with(
            copy_from_random(&execs_a, 1),
            (2, 0),
            ProgressSink::discard(),
            CancellationToken::new(),
            None,
        )
        .await
        .unwrap();
    let copy = ev[2].as_ref().unwrap();
    let aliases: HashMap<String, String> = [(copy.alias.clone().unwrap(), copy.key.clone())].into();
    // Node B builds one more step after the copy; the import has no result at all.
    let execs_b = Arc::new(AtomicUsize::new(0));
    let mut g = copy_from_random(&execs_b, 2);
    let mut last = Concat::new("last", &execs_b);
    last.keys_only = true;
    g.push(vertex("last", vec![2], last));
    let cache_b = Arc::new(MemCache::default());
    let b = Arc::new(Solver::new(cache_b.clone(), 4));
    let import: Arc<dyn ImportStore<String>> = Arc::new(AliasImport(
        MemImport(HashMap::new(), Arc::new(AtomicUsize::new(0))),
        aliases,
    ));
    let (rb, _, evb) = b
        .solve_with(
            g,
            (3, 0),
            ProgressSink::discard(),
            CancellationToken::new(),
            Some(import),
        )
        .await
        .unwrap();
    assert_eq!(rb.result, "copy(run#2)+last");
    let copy_b = evb[2].as_ref().unwrap();
    assert_ne!(copy_b.key, copy.key, "recorded under the alias's key");
    let map = cache_b.0.lock().unwrap();
    assert!(!map.contains_key(&output_key(&copy.key, 0)));
    assert_eq!(
        map.get(&output_key(&copy_b.key, 0)).map(String::as_str),
        Some("copy(run#2)")
    );
}
