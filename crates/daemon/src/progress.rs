//! Per-job progress log and the `Status` stream built from it.
//!
//! Owns the sequencing rules buildctl's renderers depend on (`control-api.md` §8):
//! * every update is a full snapshot of the vertex or status it describes;
//! * a vertex is announced (with name and start) before its statuses and logs — updates for an
//!   unknown vertex are dropped here rather than sent;
//! * when a vertex starts, its inputs that have not completed are re-sent as cached, recursively;
//! * [`Progress::finish`] completes every vertex still running (`context canceled` unless cached),
//!   then ends every subscriber's stream;
//! * subscribers get the whole history first (replay), then live updates, in one or more
//!   `StatusResponse`s of at most ~1 MiB each.

use futures::Stream;
use prost::Message;
use prost_types::Timestamp;
use protos::moby::buildkit::v1::{StatusResponse, Vertex, VertexLog, VertexStatus, VertexWarning};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::sync::watch;

/// Soft limit for one `StatusResponse`.
const MAX_BATCH: usize = 1 << 20;
/// Largest log chunk put in one `VertexLog`.
const MAX_LOG_CHUNK: usize = 512 * 1024;

/// Progress of one job.
pub struct Progress {
    state: Mutex<State>,
    version: watch::Sender<usize>,
}

#[derive(Default)]
struct State {
    events: Vec<StatusResponse>,
    vertices: HashMap<String, Vertex>,
    statuses: HashMap<(String, String), VertexStatus>,
    /// Warnings for vertices not announced yet (a frontend warns on a step it solved lazily,
    /// before the step runs): sent with the vertex's announcement, or at the end.
    pending_warnings: Vec<VertexWarning>,
    done: bool,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress")
    }
}

fn ts(t: SystemTime) -> Option<Timestamp> {
    Some(Timestamp::from(t))
}

impl Progress {
    /// An empty log.
    pub fn new() -> Arc<Self> {
        let (version, _) = watch::channel(0);
        Arc::new(Progress {
            state: Mutex::new(State::default()),
            version,
        })
    }

    fn push(&self, st: &mut State, ev: StatusResponse) {
        st.events.push(ev);
        let n = st.events.len();
        self.version.send_replace(n);
    }

    /// A vertex starts an execution interval.
    pub fn vertex_started(
        &self,
        digest: &str,
        name: &str,
        inputs: &[String],
        group: Option<protos::pb::ProgressGroup>,
        at: SystemTime,
    ) {
        let mut st = self.state.lock().unwrap();
        if st.done {
            return;
        }
        let mut out = Vec::new();
        for input in inputs {
            promote_cached(&mut st, input, at, &mut out, 0);
        }
        let v = st
            .vertices
            .entry(digest.to_string())
            .or_insert_with(|| Vertex {
                digest: digest.to_string(),
                ..Default::default()
            });
        v.name = name.to_string();
        v.inputs = inputs.to_vec();
        v.progress_group = group;
        v.started = ts(at);
        v.completed = None;
        v.cached = false;
        v.error.clear();
        out.push(v.clone());
        // Warnings given before the vertex was known follow its announcement (same message:
        // renderers read a message's vertices before its warnings).
        let (warnings, rest) = std::mem::take(&mut st.pending_warnings)
            .into_iter()
            .partition(|w| w.vertex == digest);
        st.pending_warnings = rest;
        self.push(
            &mut st,
            StatusResponse {
                vertexes: out,
                warnings,
                ..Default::default()
            },
        );
    }

    /// The vertex's current interval ends.
    pub fn vertex_completed(
        &self,
        digest: &str,
        cached: bool,
        error: Option<String>,
        at: SystemTime,
    ) {
        let mut st = self.state.lock().unwrap();
        if st.done {
            return;
        }
        let Some(v) = st.vertices.get_mut(digest) else {
            tracing::debug!(digest, "completion for an unannounced vertex dropped");
            return;
        };
        if v.started.is_none() {
            v.started = ts(at);
        }
        v.completed = ts(at);
        v.cached = cached;
        v.error = error.unwrap_or_default();
        let v = v.clone();
        self.push(
            &mut st,
            StatusResponse {
                vertexes: vec![v],
                ..Default::default()
            },
        );
    }

    /// Announces a vertex that was served from the cache (one instant interval).
    pub fn vertex_cached(&self, digest: &str, name: &str, inputs: &[String], at: SystemTime) {
        self.vertex_started(digest, name, inputs, None, at);
        self.vertex_completed(digest, true, None, at);
    }

    /// A sub-status of a vertex (full snapshot; keyed by vertex and `id`).
    #[allow(clippy::too_many_arguments)]
    pub fn status(
        &self,
        vertex: &str,
        id: &str,
        action: &str,
        current: i64,
        total: i64,
        started: Option<SystemTime>,
        completed: Option<SystemTime>,
    ) {
        let mut st = self.state.lock().unwrap();
        if st.done || !st.vertices.contains_key(vertex) {
            return;
        }
        let now = SystemTime::now();
        let key = (vertex.to_string(), id.to_string());
        let s = st.statuses.entry(key).or_insert_with(|| VertexStatus {
            id: id.to_string(),
            vertex: vertex.to_string(),
            started: ts(started.unwrap_or(now)),
            ..Default::default()
        });
        s.name = action.to_string();
        s.current = current;
        s.total = total;
        s.timestamp = ts(now);
        if let Some(c) = completed {
            s.completed = ts(c);
        }
        let s = s.clone();
        self.push(
            &mut st,
            StatusResponse {
                statuses: vec![s],
                ..Default::default()
            },
        );
    }

    /// Output bytes of a vertex (1 = stdout, 2 = stderr).
    pub fn log(&self, vertex: &str, stream: i64, data: &[u8]) {
        let mut st = self.state.lock().unwrap();
        if st.done || !st.vertices.contains_key(vertex) {
            return;
        }
        for chunk in data.chunks(MAX_LOG_CHUNK) {
            let l = VertexLog {
                vertex: vertex.to_string(),
                timestamp: ts(SystemTime::now()),
                stream,
                msg: bytes::Bytes::copy_from_slice(chunk),
            };
            self.push(
                &mut st,
                StatusResponse {
                    logs: vec![l],
                    ..Default::default()
                },
            );
        }
    }

    /// A warning attached to a vertex (from the gateway's `Warn`), with its source location
    /// when the frontend gave one. A warning for a vertex not announced yet waits for the
    /// announcement (renderers skip warnings of unknown vertices); one whose vertex never runs
    /// is sent when the job ends, as buildkitd sends every warning.
    pub fn warning(&self, w: VertexWarning) {
        let mut st = self.state.lock().unwrap();
        if st.done {
            return;
        }
        if !st.vertices.contains_key(&w.vertex) {
            st.pending_warnings.push(w);
            return;
        }
        self.push(
            &mut st,
            StatusResponse {
                warnings: vec![w],
                ..Default::default()
            },
        );
    }

    /// Ends the job: completes running vertices and ends all streams.
    pub fn finish(&self) {
        let mut st = self.state.lock().unwrap();
        if st.done {
            return;
        }
        let now = SystemTime::now();
        let mut out = Vec::new();
        let mut keys: Vec<String> = st.vertices.keys().cloned().collect();
        keys.sort();
        for k in keys {
            let v = st.vertices.get_mut(&k).expect("key from map");
            if v.completed.is_some() {
                continue;
            }
            if v.started.is_none() {
                v.started = ts(now);
                v.cached = true;
            }
            v.completed = ts(now);
            if !v.cached && v.error.is_empty() {
                v.error = "context canceled".into();
            }
            out.push(v.clone());
        }
        // Open statuses are closed too, so no sub-row keeps spinning.
        let mut statuses = Vec::new();
        for s in st.statuses.values_mut() {
            if s.completed.is_none() {
                s.completed = ts(now);
                s.timestamp = ts(now);
                statuses.push(s.clone());
            }
        }
        let warnings = std::mem::take(&mut st.pending_warnings);
        if !out.is_empty() || !statuses.is_empty() || !warnings.is_empty() {
            st.events.push(StatusResponse {
                vertexes: out,
                statuses,
                warnings,
                ..Default::default()
            });
        }
        st.done = true;
        let n = st.events.len();
        self.version.send_replace(n + 1);
    }

    /// Every update sent so far, in order (the build's log for its history record).
    pub fn events(&self) -> Vec<StatusResponse> {
        self.state.lock().unwrap().events.clone()
    }

    /// Whether [`Progress::finish`] was called.
    pub fn is_done(&self) -> bool {
        self.state.lock().unwrap().done
    }

    /// Every vertex as last sent (for tests and diagnostics).
    pub fn vertices(&self) -> Vec<Vertex> {
        self.state
            .lock()
            .unwrap()
            .vertices
            .values()
            .cloned()
            .collect()
    }

    /// The full history then live updates; ends after [`Progress::finish`].
    pub fn subscribe(self: &Arc<Self>) -> impl Stream<Item = StatusResponse> + Send + 'static {
        let rx = self.version.subscribe();
        futures::stream::unfold(
            (self.clone(), 0usize, rx),
            |(p, mut idx, mut rx)| async move {
                loop {
                    {
                        let st = p.state.lock().unwrap();
                        if idx < st.events.len() {
                            let mut batch = StatusResponse::default();
                            let mut size = 0usize;
                            while idx < st.events.len() {
                                let ev = &st.events[idx];
                                let len = ev.encoded_len();
                                if size > 0 && size + len > MAX_BATCH {
                                    break;
                                }
                                size += len;
                                batch.vertexes.extend(ev.vertexes.iter().cloned());
                                batch.statuses.extend(ev.statuses.iter().cloned());
                                batch.logs.extend(ev.logs.iter().cloned());
                                batch.warnings.extend(ev.warnings.iter().cloned());
                                idx += 1;
                            }
                            drop(st);
                            // buildkitd's order within one message: vertexes by start (unset
                            // first), statuses and logs by timestamp; stable, so the updates of
                            // one vertex keep their order.
                            let key =
                                |t: &Option<Timestamp>| t.as_ref().map(|t| (t.seconds, t.nanos));
                            batch.vertexes.sort_by_key(|v| key(&v.started));
                            batch.statuses.sort_by_key(|s| key(&s.timestamp));
                            batch.logs.sort_by_key(|l| key(&l.timestamp));
                            return Some((batch, (p, idx, rx)));
                        }
                        if st.done {
                            return None;
                        }
                    }
                    if rx.changed().await.is_err() {
                        return None;
                    }
                }
            },
        )
    }
}

fn promote_cached(
    st: &mut State,
    digest: &str,
    at: SystemTime,
    out: &mut Vec<Vertex>,
    depth: usize,
) {
    if depth > 1000 {
        return;
    }
    let inputs = match st.vertices.get_mut(digest) {
        Some(v) if v.completed.is_none() => {
            if v.started.is_none() {
                v.started = ts(at);
            }
            v.completed = ts(at);
            v.cached = true;
            out.push(v.clone());
            v.inputs.clone()
        }
        _ => return,
    };
    for i in inputs {
        promote_cached(st, &i, at, out, depth + 1);
    }
}

/// `sha256:<hex>` of a string (synthetic vertex digests, e.g. the export vertex).
pub fn synthetic_digest(s: &str) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(s.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::time::Duration;

    async fn collect(p: &Arc<Progress>) -> Vec<StatusResponse> {
        tokio::time::timeout(Duration::from_secs(5), p.subscribe().collect::<Vec<_>>())
            .await
            .expect("stream must end after finish")
    }

    #[tokio::test]
    async fn replay_promotion_and_finish() {
        let p = Progress::new();
        let t = SystemTime::now();
        p.vertex_started("a", "local://context", &[], None, t);
        p.status(
            "a",
            "transferring context:",
            "transferring",
            10,
            0,
            None,
            None,
        );
        p.status("zzz", "dropped", "x", 1, 0, None, None);
        p.log("zzz", 1, b"dropped");
        // b starts while a has not completed: a must be promoted to cached
        p.vertex_started("b", "mkdir /x", &["a".to_string()], None, t);
        p.vertex_completed("b", false, None, t);
        p.vertex_started("c", "never completes", &[], None, t);
        p.log("c", 1, b"hello\n");
        // late subscriber gets everything, then the stream ends at finish
        let sub = p.subscribe();
        p.finish();
        let all: Vec<StatusResponse> = tokio::time::timeout(Duration::from_secs(5), sub.collect())
            .await
            .unwrap();
        let vs: Vec<&Vertex> = all.iter().flat_map(|r| r.vertexes.iter()).collect();
        let last = |d: &str| {
            vs.iter()
                .rev()
                .find(|v| v.digest == d)
                .copied()
                .unwrap()
                .clone()
        };
        let a = last("a");
        assert!(a.cached && a.completed.is_some(), "{a:?}");
        let b = last("b");
        assert!(!b.cached && b.completed.is_some() && b.error.is_empty());
        let c = last("c");
        assert_eq!(c.error, "context canceled");
        assert_eq!(
            all.iter()
                .flat_map(|r| r.statuses.iter())
                .filter(|s| s.vertex == "zzz")
                .count(),
            0
        );
        assert_eq!(all.iter().flat_map(|r| r.logs.iter()).count(), 1);
        // a started before its status was sent
        let first_a = vs.iter().position(|v| v.digest == "a").unwrap();
        assert_eq!(first_a, 0);
        // replay after finish still works and ends
        let again = collect(&p).await;
        assert_eq!(
            again.iter().map(|r| r.vertexes.len()).sum::<usize>(),
            all.iter().map(|r| r.vertexes.len()).sum::<usize>()
        );
        // nothing is accepted after finish
        p.vertex_started("d", "late", &[], None, t);
        assert!(!p.vertices().iter().any(|v| v.digest == "d"));
    }

    fn warning(vertex: &str, short: &str) -> VertexWarning {
        VertexWarning {
            vertex: vertex.into(),
            short: short.as_bytes().to_vec().into(),
            level: 1,
            ..Default::default()
        }
    }

    /// A warning for a vertex that is not announced yet (a lazily solved step) is sent with the
    /// vertex's announcement; one whose vertex never runs is sent at the end; none is lost.
    #[tokio::test]
    async fn warnings_before_their_vertex_wait_for_it() {
        let p = Progress::new();
        let t = SystemTime::now();
        p.vertex_started("known", "known", &[], None, t);
        p.warning(warning("known", "now"));
        p.warning(warning("lazy", "early"));
        p.warning(warning("never", "orphan"));
        p.vertex_started("lazy", "lazy step", &[], None, t);
        p.vertex_completed("lazy", false, None, t);
        p.finish();
        // the updates as made (subscribers get them batched, in this order)
        let all = p.events();
        assert_eq!(
            collect(&p)
                .await
                .iter()
                .map(|r| r.warnings.len())
                .sum::<usize>(),
            3
        );
        let at = |short: &str| {
            all.iter()
                .position(|r| r.warnings.iter().any(|w| &w.short[..] == short.as_bytes()))
                .unwrap_or_else(|| panic!("warning {short} not sent: {all:?}"))
        };
        assert!(all[at("now")].vertexes.is_empty());
        // sent together with the lazy vertex's announcement, not before it
        let early = &all[at("early")];
        assert!(
            early.vertexes.iter().any(|v| v.digest == "lazy"),
            "{early:?}"
        );
        let first_lazy = all
            .iter()
            .position(|r| r.vertexes.iter().any(|v| v.digest == "lazy"))
            .unwrap();
        assert_eq!(first_lazy, at("early"));
        assert_eq!(at("orphan"), all.len() - 1);
        assert_eq!(all.iter().map(|r| r.warnings.len()).sum::<usize>(), 3);
    }

    #[tokio::test]
    async fn large_logs_are_split_into_bounded_batches() {
        let p = Progress::new();
        p.vertex_started("a", "big", &[], None, SystemTime::now());
        let big = vec![b'x'; 5 * 1024 * 1024];
        p.log("a", 1, &big);
        p.finish();
        let all = collect(&p).await;
        assert!(
            all.len() >= 5,
            "5 MiB of logs must span several messages, got {}",
            all.len()
        );
        for r in &all {
            assert!(
                r.encoded_len() <= 2 * MAX_BATCH,
                "batch too big: {}",
                r.encoded_len()
            );
        }
        let total: usize = all
            .iter()
            .flat_map(|r| r.logs.iter())
            .map(|l| l.msg.len())
            .sum();
        assert_eq!(total, big.len());
    }
}
