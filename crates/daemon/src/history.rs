//! Build history: one record per build, as buildkitd keeps them (`Control.ListenBuildHistory`,
//! `Control.UpdateBuildHistory`, and `Status` replay of finished builds).
//!
//! Follows the behaviour of upstream's `solver/llbsolver/history.go` and `control/control.go`
//! (v0.11.6): a record is announced (`STARTED`) when a non-internal solve begins and written
//! (`COMPLETE`) before `Control.Solve` returns, with the frontend and its attributes, the
//! exporter and its attributes, the times, the error as a `google.rpc.Status`, the result
//! metadata, the exported image's descriptor, the step counts and the progress log.
//!
//! `ListenBuildHistory` sends the completed records (unless `ActiveOnly`), then — unless
//! `EarlyExit` — the builds that are running when it starts and every later event, until the
//! client goes away or the daemon stops. A `Ref` filters everything to one build; while such a
//! listener is open, deleting that build is deferred until the listener ends (upstream's
//! reference count). Deleting a record also deletes its log blob and sends a `DELETED` event.
//!
//! Old records are dropped like buildkitd does (`[history] maxAge`, `maxEntries`): only when
//! there are at least `maxEntries` unpinned records, and then only those beyond the newest
//! `maxEntries` that completed longer than `maxAge` ago. Checked at start-up, after each build
//! and every two minutes.
//!
//! On-disk layout (this module is the only writer; every change is under [`History`]'s lock and
//! lands through a temporary file and a rename, so a crash leaves old or new, never half):
//!
//! ```text
//! <root>/history/records/<sha256 of ref>   one BuildHistoryRecord, protobuf
//! <root>/history/blobs/sha256/<hex>        content blobs referenced by records (progress logs:
//!                                          application/vnd.buildkit.status.v0, a sequence of
//!                                          u32-LE length + StatusResponse protobuf, as upstream)
//! <root>/history/tmp/                      partial writes; emptied at start-up
//! ```
//!
//! Blobs no record references are removed at start-up (a crash between a blob and its record).

use crate::errors::{Error, Result};
use futures::StreamExt;
use prost::Message;
use protos::moby::buildkit::v1::{
    BuildHistoryEvent, BuildHistoryEventType, BuildHistoryRecord, BuildHistoryRequest, Descriptor,
    StatusResponse, UpdateBuildHistoryRequest,
};
use sha2::Digest;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tonic::codegen::BoxStream;

/// Media type of a progress-log blob (upstream's).
pub const STATUS_MEDIA_TYPE: &str = "application/vnd.buildkit.status.v0";
/// How often old records are dropped.
const GC_INTERVAL: Duration = Duration::from_secs(120);
/// Largest single message accepted when reading a log blob back.
const MAX_LOG_MESSAGE: usize = 64 << 20;

/// `[history]` of `buildkitd.toml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Records older than this may be dropped (`maxAge`, seconds in the file).
    pub max_age: Duration,
    /// Nothing is dropped while there are fewer unpinned records than this (`maxEntries`).
    pub max_entries: usize,
}

impl Default for HistoryConfig {
    /// buildkitd's defaults: 48 hours, 50 entries.
    fn default() -> Self {
        HistoryConfig {
            max_age: Duration::from_secs(48 * 3600),
            max_entries: 50,
        }
    }
}

/// The build history of this daemon.
pub struct History {
    dir: PathBuf,
    cfg: HistoryConfig,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Running builds (STARTED, not yet COMPLETE).
    active: BTreeMap<String, BuildHistoryRecord>,
    /// Live listeners.
    subscribers: HashMap<u64, mpsc::UnboundedSender<BuildHistoryEvent>>,
    next_subscriber: u64,
    /// Open listeners per ref (deletes wait for them).
    refs: HashMap<String, usize>,
    /// Refs whose delete waits for their listeners.
    deleted: HashSet<String>,
    /// What gc and deletes need of every completed record, kept in memory (read once at open)
    /// so that finishing a build costs the same with 5 records on disk as with 5 000.
    index: HashMap<String, Indexed>,
}

/// The fields of a stored record that gc and blob cleanup look at.
#[derive(Debug, Clone)]
struct Indexed {
    completed_at: (i64, i32),
    pinned: bool,
    blobs: Vec<String>,
}

impl Indexed {
    fn of(r: &BuildHistoryRecord) -> Self {
        Indexed {
            completed_at: ts_key(&r.completed_at),
            pinned: r.pinned,
            blobs: blob_digests(r),
        }
    }
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn io_err(what: &str, p: &Path, e: std::io::Error) -> Error {
    Error::internal(format!("build history: {what} {}: {e}", p.display()))
}

/// The step counts of a progress log: (cached, completed, total) distinct vertices.
pub fn step_counts(events: &[StatusResponse]) -> (i32, i32, i32) {
    let mut seen: HashMap<&str, (bool, bool)> = HashMap::new();
    for ev in events {
        for v in &ev.vertexes {
            let e = seen.entry(v.digest.as_str()).or_default();
            e.0 |= v.cached;
            e.1 |= v.completed.is_some();
        }
    }
    let cached = seen.values().filter(|(c, _)| *c).count();
    let completed = seen.values().filter(|(_, d)| *d).count();
    (cached as i32, completed as i32, seen.len() as i32)
}

/// Encodes a progress log as upstream's status blob.
pub fn encode_log(events: &[StatusResponse]) -> Vec<u8> {
    let mut out = Vec::new();
    for ev in events {
        let b = ev.encode_to_vec();
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(&b);
    }
    out
}

/// Decodes a status blob.
pub fn decode_log(mut data: &[u8]) -> Result<Vec<StatusResponse>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        if data.len() < 4 {
            return Err(Error::internal("build history: truncated log blob"));
        }
        let n = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
        data = &data[4..];
        if n > MAX_LOG_MESSAGE || n > data.len() {
            return Err(Error::internal("build history: truncated log blob"));
        }
        let m = StatusResponse::decode(&data[..n])
            .map_err(|e| Error::internal(format!("build history: bad log message: {e}")))?;
        out.push(m);
        data = &data[n..];
    }
    Ok(out)
}

fn ts_key(t: &Option<prost_types::Timestamp>) -> (i64, i32) {
    t.as_ref().map(|t| (t.seconds, t.nanos)).unwrap_or((0, 0))
}

impl History {
    /// Opens (creating) the history under `<root>/history`, cleans partial writes and orphaned
    /// blobs, and drops records past the limits.
    pub fn open(root: &Path, cfg: HistoryConfig) -> Result<Arc<Self>> {
        let dir = root.join("history");
        for d in ["records", "blobs/sha256", "tmp"] {
            let p = dir.join(d);
            std::fs::create_dir_all(&p).map_err(|e| io_err("create", &p, e))?;
        }
        let tmp = dir.join("tmp");
        for e in std::fs::read_dir(&tmp).map_err(|e| io_err("read", &tmp, e))? {
            let e = e.map_err(|e| io_err("read", &tmp, e))?;
            let _ = std::fs::remove_file(e.path());
        }
        let h = Arc::new(History {
            dir,
            cfg,
            state: Mutex::new(State::default()),
        });
        {
            let mut st = h.state.lock().unwrap();
            let records = h.read_all()?;
            st.index = records
                .iter()
                .map(|r| (r.r#ref.clone(), Indexed::of(r)))
                .collect();
            let used: HashSet<String> = records.iter().flat_map(blob_digests).collect();
            let blobs = h.dir.join("blobs/sha256");
            for e in std::fs::read_dir(&blobs).map_err(|e| io_err("read", &blobs, e))? {
                let e = e.map_err(|e| io_err("read", &blobs, e))?;
                let name = e.file_name().to_string_lossy().into_owned();
                if !used.contains(&format!("sha256:{name}")) {
                    tracing::info!(blob = %name, "build history: removing unreferenced blob");
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        if let Err(e) = h.gc() {
            tracing::warn!(error = %e, "build history gc");
        }
        Ok(h)
    }

    /// Drops old records every two minutes while the history lives.
    pub fn spawn_gc(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(GC_INTERVAL).await;
                let Some(h) = weak.upgrade() else { return };
                let r = tokio::task::spawn_blocking(move || h.gc()).await;
                if let Ok(Err(e)) = r {
                    tracing::warn!(error = %e, "build history gc");
                }
            }
        });
    }

    fn record_path(&self, r#ref: &str) -> PathBuf {
        let h = hex::encode(sha2::Sha256::digest(r#ref.as_bytes()));
        self.dir.join("records").join(h)
    }

    fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        let hex = digest.strip_prefix("sha256:")?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(self.dir.join("blobs/sha256").join(hex))
    }

    fn write_atomic(&self, dest: &Path, data: &[u8]) -> Result<()> {
        let tmpdir = self.dir.join("tmp");
        let mut f = tempfile::NamedTempFile::new_in(&tmpdir)
            .map_err(|e| io_err("create temp file in", &tmpdir, e))?;
        f.write_all(data)
            .and_then(|_| f.as_file().sync_all())
            .map_err(|e| io_err("write", f.path(), e))?;
        f.persist(dest)
            .map_err(|e| io_err("rename to", dest, e.error))?;
        Ok(())
    }

    fn read_record(&self, r#ref: &str) -> Result<Option<BuildHistoryRecord>> {
        let p = self.record_path(r#ref);
        match std::fs::read(&p) {
            Ok(b) => BuildHistoryRecord::decode(&b[..]).map(Some).map_err(|e| {
                Error::internal(format!("failed to unmarshal build record {ref}: {e}"))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &p, e)),
        }
    }

    /// Every completed record, sorted by ref (upstream iterates its bolt bucket by key).
    fn read_all(&self) -> Result<Vec<BuildHistoryRecord>> {
        let dir = self.dir.join("records");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(|e| io_err("read", &dir, e))? {
            let e = e.map_err(|e| io_err("read", &dir, e))?;
            let b = match std::fs::read(e.path()) {
                Ok(b) => b,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(io_err("read", &e.path(), err)),
            };
            match BuildHistoryRecord::decode(&b[..]) {
                Ok(r) => out.push(r),
                Err(err) => {
                    tracing::warn!(path = %e.path().display(), error = %err, "build history: unreadable record skipped")
                }
            }
        }
        out.sort_by(|a, b| a.r#ref.cmp(&b.r#ref));
        Ok(out)
    }

    fn publish(st: &mut State, ev: BuildHistoryEvent) {
        st.subscribers.retain(|_, tx| tx.send(ev.clone()).is_ok());
    }

    /// A build started.
    pub fn started(&self, rec: BuildHistoryRecord) {
        let mut st = self.state.lock().unwrap();
        st.active.insert(rec.r#ref.clone(), rec.clone());
        Self::publish(
            &mut st,
            BuildHistoryEvent {
                r#type: BuildHistoryEventType::Started as i32,
                record: Some(rec),
            },
        );
    }

    /// A build ended: stores its progress log and the record, then announces it.
    /// Blocking (file writes); call from a blocking context.
    pub fn completed(&self, mut rec: BuildHistoryRecord, log: &[StatusResponse]) -> Result<()> {
        let (cached, completed, total) = step_counts(log);
        rec.num_cached_steps = cached;
        rec.num_completed_steps = completed;
        rec.num_total_steps = total;
        let blob = encode_log(log);
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&blob)));
        let tmpdir = self.dir.join("tmp");
        let mut f = tempfile::NamedTempFile::new_in(&tmpdir)
            .map_err(|e| io_err("create temp file in", &tmpdir, e))?;
        f.write_all(&blob)
            .and_then(|_| f.as_file().sync_all())
            .map_err(|e| io_err("write", f.path(), e))?;
        rec.logs = Some(Descriptor {
            media_type: STATUS_MEDIA_TYPE.into(),
            digest: digest.clone(),
            size: blob.len() as i64,
            annotations: Default::default(),
        });
        let mut st = self.state.lock().unwrap();
        let dest = self.blob_path(&digest).expect("own digest");
        let r = f
            .persist(&dest)
            .map_err(|e| io_err("rename to", &dest, e.error))
            .and_then(|_| self.write_atomic(&self.record_path(&rec.r#ref), &rec.encode_to_vec()));
        st.active.remove(&rec.r#ref);
        r?;
        st.index.insert(rec.r#ref.clone(), Indexed::of(&rec));
        Self::publish(
            &mut st,
            BuildHistoryEvent {
                r#type: BuildHistoryEventType::Complete as i32,
                record: Some(rec),
            },
        );
        drop(st);
        if let Err(e) = self.gc() {
            tracing::warn!(error = %e, "build history gc");
        }
        Ok(())
    }

    /// Forgets a started build without a record (used only when writing the record failed).
    pub fn abandon(&self, r#ref: &str) {
        self.state.lock().unwrap().active.remove(r#ref);
    }

    /// The stored progress log of a completed build (`None`: no such record or no log).
    pub fn logs(&self, r#ref: &str) -> Result<Option<Vec<StatusResponse>>> {
        let _st = self.state.lock().unwrap();
        let Some(rec) = self.read_record(r#ref)? else {
            return Ok(None);
        };
        let Some(desc) = rec.logs else {
            return Ok(Some(Vec::new()));
        };
        let p = self
            .blob_path(&desc.digest)
            .ok_or_else(|| Error::internal(format!("build record {ref}: bad log digest")))?;
        let data = std::fs::read(&p).map_err(|e| io_err("read", &p, e))?;
        decode_log(&data).map(Some)
    }

    /// `UpdateBuildHistory`: pin/unpin (a `COMPLETE` event with the next generation) or delete.
    /// Blocking (file writes).
    pub fn update(&self, req: &UpdateBuildHistoryRequest) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        if req.delete {
            return self.delete_locked(&mut st, &req.r#ref);
        }
        let mut rec = self
            .read_record(&req.r#ref)?
            .ok_or_else(|| Error::not_found(format!("build record {} not found", req.r#ref)))?;
        rec.pinned = req.pinned;
        rec.generation += 1;
        self.write_atomic(&self.record_path(&rec.r#ref), &rec.encode_to_vec())?;
        st.index.insert(rec.r#ref.clone(), Indexed::of(&rec));
        Self::publish(
            &mut st,
            BuildHistoryEvent {
                r#type: BuildHistoryEventType::Complete as i32,
                record: Some(rec),
            },
        );
        Ok(())
    }

    fn delete_locked(&self, st: &mut State, r#ref: &str) -> Result<()> {
        if st.refs.contains_key(r#ref) {
            // a listener for this ref is open: delete when it ends
            if self.read_record(r#ref)?.is_none() {
                return Err(Error::not_found(format!("build record {ref} not found")));
            }
            st.deleted.insert(r#ref.to_string());
            return Ok(());
        }
        st.deleted.remove(r#ref);
        let Some(rec) = self.read_record(r#ref)? else {
            return Err(Error::not_found(format!("build record {ref} not found")));
        };
        let p = self.record_path(r#ref);
        std::fs::remove_file(&p).map_err(|e| io_err("remove", &p, e))?;
        st.index.remove(r#ref);
        let still_used: HashSet<&String> = st.index.values().flat_map(|i| &i.blobs).collect();
        for d in blob_digests(&rec) {
            if still_used.contains(&d) {
                continue;
            }
            if let Some(bp) = self.blob_path(&d) {
                if let Err(e) = std::fs::remove_file(&bp) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(blob = %bp.display(), error = %e, "build history: blob not removed");
                    }
                }
            }
        }
        Self::publish(
            st,
            BuildHistoryEvent {
                r#type: BuildHistoryEventType::Deleted as i32,
                record: Some(rec),
            },
        );
        Ok(())
    }

    /// Drops unpinned records beyond the newest `max_entries` that are older than `max_age`.
    pub fn gc(&self) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        let mut records: Vec<(String, (i64, i32))> = st
            .index
            .iter()
            .filter(|(_, i)| !i.pinned)
            .map(|(r, i)| (r.clone(), i.completed_at))
            .collect();
        if records.len() < self.cfg.max_entries {
            return Ok(());
        }
        records.sort_by_key(|(r, t)| (std::cmp::Reverse(*t), r.clone()));
        let cutoff = SystemTime::now()
            .checked_sub(self.cfg.max_age)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let cutoff = prost_types::Timestamp::from(cutoff);
        let cutoff = (cutoff.seconds, cutoff.nanos);
        for (r, completed_at) in &records[self.cfg.max_entries..] {
            if *completed_at < cutoff {
                tracing::debug!(build = %r, "build history: dropping old record");
                self.delete_locked(&mut st, r)?;
            }
        }
        Ok(())
    }

    /// `ListenBuildHistory`.
    pub fn listen(
        self: &Arc<Self>,
        req: BuildHistoryRequest,
    ) -> Result<BoxStream<BuildHistoryEvent>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let guard = {
            let mut st = self.state.lock().unwrap();
            if !req.r#ref.is_empty() && st.deleted.contains(&req.r#ref) {
                return Err(Error::not_found(format!("ref {} is deleted", req.r#ref)));
            }
            let id = st.next_subscriber;
            st.next_subscriber += 1;
            if !req.r#ref.is_empty() {
                *st.refs.entry(req.r#ref.clone()).or_default() += 1;
            }
            for rec in st.active.values() {
                if req.r#ref.is_empty() || rec.r#ref == req.r#ref {
                    let _ = tx.send(BuildHistoryEvent {
                        r#type: BuildHistoryEventType::Started as i32,
                        record: Some(rec.clone()),
                    });
                }
            }
            st.subscribers.insert(id, tx);
            ListenGuard {
                history: self.clone(),
                id,
                r#ref: req.r#ref.clone(),
            }
        };
        let completed: Vec<BuildHistoryEvent> = if req.active_only {
            Vec::new()
        } else {
            let _st = self.state.lock().unwrap();
            self.read_all()?
                .into_iter()
                .filter(|r| req.r#ref.is_empty() || r.r#ref == req.r#ref)
                .map(|r| BuildHistoryEvent {
                    r#type: BuildHistoryEventType::Complete as i32,
                    record: Some(r),
                })
                .collect()
        };
        let head = futures::stream::iter(completed.into_iter().map(Ok));
        if req.early_exit {
            drop(guard);
            return Ok(head.boxed());
        }
        let want = req.r#ref.clone();
        let live = tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
            .filter(move |e| {
                let keep = want.is_empty() || e.record.as_ref().is_some_and(|r| r.r#ref == want);
                futures::future::ready(keep)
            })
            .map(move |e| {
                let _keep = &guard;
                Ok(e)
            });
        Ok(head.chain(live).boxed())
    }

    /// Ends every live listener (daemon shutdown).
    pub fn close_listeners(&self) {
        self.state.lock().unwrap().subscribers.clear();
    }
}

/// Ends a listener: unsubscribes and runs a delete that waited for it.
struct ListenGuard {
    history: Arc<History>,
    id: u64,
    r#ref: String,
}

impl Drop for ListenGuard {
    fn drop(&mut self) {
        let h = &self.history;
        let mut st = h.state.lock().unwrap();
        st.subscribers.remove(&self.id);
        if self.r#ref.is_empty() {
            return;
        }
        let n = st.refs.get_mut(&self.r#ref).map(|n| {
            *n -= 1;
            *n
        });
        if n == Some(0) {
            st.refs.remove(&self.r#ref);
            if st.deleted.contains(&self.r#ref) {
                if let Err(e) = h.delete_locked(&mut st, &self.r#ref) {
                    tracing::warn!(build = %self.r#ref, error = %e, "build history: deferred delete failed");
                }
            }
        }
    }
}

/// Digests of the blobs a record references.
fn blob_digests(r: &BuildHistoryRecord) -> Vec<String> {
    let mut out = Vec::new();
    let mut add = |d: &Option<Descriptor>| {
        if let Some(d) = d {
            out.push(d.digest.clone());
        }
    };
    add(&r.logs);
    add(&r.trace);
    if let Some(res) = &r.result {
        for a in &res.attestations {
            out.push(a.digest.clone());
        }
    }
    for res in r.results.values() {
        for a in &res.attestations {
            out.push(a.digest.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use protos::moby::buildkit::v1::Vertex;

    fn rec(r: &str, completed: SystemTime) -> BuildHistoryRecord {
        BuildHistoryRecord {
            r#ref: r.into(),
            created_at: Some(completed.into()),
            completed_at: Some(completed.into()),
            ..Default::default()
        }
    }

    fn log() -> Vec<StatusResponse> {
        let t = Some(prost_types::Timestamp::from(SystemTime::now()));
        vec![
            StatusResponse {
                vertexes: vec![
                    Vertex {
                        digest: "a".into(),
                        started: t,
                        ..Default::default()
                    },
                    Vertex {
                        digest: "b".into(),
                        started: t,
                        completed: t,
                        cached: true,
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
            StatusResponse {
                vertexes: vec![Vertex {
                    digest: "a".into(),
                    started: t,
                    completed: t,
                    ..Default::default()
                }],
                ..Default::default()
            },
        ]
    }

    async fn drain(s: BoxStream<BuildHistoryEvent>) -> Vec<BuildHistoryEvent> {
        tokio::time::timeout(Duration::from_secs(5), s.map(|e| e.unwrap()).collect())
            .await
            .expect("early-exit stream ends")
    }

    #[test]
    fn log_round_trip_and_counts() {
        let l = log();
        assert_eq!(decode_log(&encode_log(&l)).unwrap(), l);
        assert_eq!(step_counts(&l), (1, 2, 2));
        assert!(decode_log(&[5, 0, 0, 0, 1]).is_err());
    }

    #[tokio::test]
    async fn records_persist_pin_and_delete() {
        let root = tempfile::tempdir().unwrap();
        let h = History::open(root.path(), HistoryConfig::default()).unwrap();
        h.started(rec("r1", SystemTime::now()));
        // a running build is only seen by live listeners, not by early-exit ones
        let req = BuildHistoryRequest {
            early_exit: true,
            ..Default::default()
        };
        assert!(drain(h.listen(req.clone()).unwrap()).await.is_empty());
        let mut live = h.listen(BuildHistoryRequest::default()).unwrap();
        let ev = live.next().await.unwrap().unwrap();
        assert_eq!(ev.r#type, BuildHistoryEventType::Started as i32);
        let l = log();
        h.completed(rec("r1", SystemTime::now()), &l).unwrap();
        let ev = live.next().await.unwrap().unwrap();
        assert_eq!(ev.r#type, BuildHistoryEventType::Complete as i32);
        let r = ev.record.unwrap();
        assert_eq!(r.num_total_steps, 2);
        assert_eq!(r.logs.as_ref().unwrap().media_type, STATUS_MEDIA_TYPE);
        assert_eq!(h.logs("r1").unwrap().unwrap(), l);

        // survives a restart
        drop(live);
        drop(h);
        let h = History::open(root.path(), HistoryConfig::default()).unwrap();
        let all = drain(h.listen(req.clone()).unwrap()).await;
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].record.as_ref().unwrap().r#ref, "r1");

        h.update(&UpdateBuildHistoryRequest {
            r#ref: "r1".into(),
            pinned: true,
            ..Default::default()
        })
        .unwrap();
        let all = drain(h.listen(req.clone()).unwrap()).await;
        let r = all[0].record.as_ref().unwrap();
        assert!(r.pinned);
        assert_eq!(r.generation, 1);

        // delete waits for a listener of that ref
        let by_ref = h
            .listen(BuildHistoryRequest {
                r#ref: "r1".into(),
                ..Default::default()
            })
            .unwrap();
        h.update(&UpdateBuildHistoryRequest {
            r#ref: "r1".into(),
            delete: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(drain(h.listen(req.clone()).unwrap()).await.len(), 1);
        let e = h
            .listen(BuildHistoryRequest {
                r#ref: "r1".into(),
                ..Default::default()
            })
            .err()
            .unwrap();
        assert!(e.to_string().contains("is deleted"), "{e}");
        drop(by_ref);
        assert!(drain(h.listen(req.clone()).unwrap()).await.is_empty());
        let blobs = std::fs::read_dir(root.path().join("history/blobs/sha256")).unwrap();
        assert_eq!(blobs.count(), 0, "log blob removed with its record");
        let e = h
            .update(&UpdateBuildHistoryRequest {
                r#ref: "r1".into(),
                delete: true,
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
    }

    #[tokio::test]
    async fn gc_keeps_newest_and_pinned() {
        let root = tempfile::tempdir().unwrap();
        let cfg = HistoryConfig {
            max_age: Duration::from_secs(3600),
            max_entries: 2,
        };
        let h = History::open(root.path(), cfg).unwrap();
        let old = SystemTime::now() - Duration::from_secs(7200);
        for (i, r) in ["a", "b", "c", "d"].iter().enumerate() {
            let t = if i < 3 {
                old + Duration::from_secs(i as u64)
            } else {
                SystemTime::now()
            };
            h.completed(rec(r, t), &[]).unwrap();
            if *r == "a" {
                h.update(&UpdateBuildHistoryRequest {
                    r#ref: "a".into(),
                    pinned: true,
                    ..Default::default()
                })
                .unwrap();
            }
        }
        let req = BuildHistoryRequest {
            early_exit: true,
            ..Default::default()
        };
        let refs: Vec<String> = drain(h.listen(req).unwrap())
            .await
            .into_iter()
            .map(|e| e.record.unwrap().r#ref)
            .collect();
        // pinned a stays; of the unpinned b, c, d the newest two (d, c) stay
        assert_eq!(refs, ["a", "c", "d"]);
    }
}
