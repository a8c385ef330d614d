//! `local://NAME` sources: the client directory, received through the session
//! (`source/local/local.go`, `session.md` §4.3).
//!
//! Cache-key phase: the directory is synced through [`SessionProvider::sync_local`] into a
//! persistent per-(name, shared key hint) directory under `<root>/worker/local/` (so a re-sync
//! only transfers changes), and its content checksum (paths, modes, owners, contents; no
//! times) becomes the key together with the name and filters — not the session id or
//! `local.unique`, which change between invocations. Exec phase (cache miss only): the synced
//! tree is copied into a new committed snapshot (record type `source.local`).
//!
//! The sync directory is locked from the sync until the copy is done (or the build no longer
//! needs it), so concurrent builds of the same name cannot interleave.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use layerstore::snapshot::{LayerMeta, RecordType, SnapshotOptions, SnapshotStore};
use protos::pb;

use crate::error::{Error, Result};
use crate::file::checksum::checksum;
use crate::file::root::Root;
use crate::llbsolver::cache::blocking;
use crate::llbsolver::definition::{json_list_attr, LoadedOp};
use crate::ops::{BuildEnv, Shared};
use crate::progress::ProgressEvent;
use crate::result::Snap;
use crate::session::{LocalDiffer, LocalSync, SessionProvider, TransferProgress};
use crate::solver::{Op, OpContext, Solved};

struct LocalSource {
    req: LocalSync,
    dir: PathBuf,
    lock_key: String,
    shared: Arc<Shared>,
    session: Arc<dyn SessionProvider>,
    store: SnapshotStore,
    guard: Mutex<Option<tokio::sync::OwnedMutexGuard<()>>>,
}

/// The solver op for `op`.
pub(crate) fn new(op: &LoadedOp, env: &Arc<BuildEnv>) -> Result<Arc<dyn Op<Snap>>> {
    let Some(pb::op::Op::Source(src)) = &op.op.op else {
        return Err(Error::Internal(
            "source_local::new on a non-source op".into(),
        ));
    };
    let name = src
        .identifier
        .strip_prefix("local://")
        .ok_or_else(|| Error::invalid_op(&op.digest, "not a local source"))?
        .to_string();
    let mut req = LocalSync::new(name.clone());
    // `local.session` may be `prefix:ID`; the prefix only renames the source.
    req.session_id = src
        .attrs
        .get("local.session")
        .map(|s| s.rsplit(':').next().unwrap_or(s).to_string())
        .filter(|s| !s.is_empty());
    req.include_patterns = json_list_attr(&src.attrs, "local.includepattern");
    req.exclude_patterns = json_list_attr(&src.attrs, "local.excludepatterns");
    req.follow_paths = json_list_attr(&src.attrs, "local.followpaths");
    req.shared_key_hint = src.attrs.get("local.sharedkeyhint").cloned();
    req.differ = match src.attrs.get("local.differ").map(String::as_str) {
        Some("none") => LocalDiffer::None,
        _ => LocalDiffer::Metadata,
    };
    let lock_key = format!(
        "{}:{}",
        name,
        req.shared_key_hint.clone().unwrap_or_default()
    );
    let dir = env
        .shared
        .local_root
        .join(&crate::digest::sha256_hex(lock_key.as_bytes())[..32]);
    Ok(Arc::new(LocalSource {
        req,
        dir,
        lock_key,
        shared: env.shared.clone(),
        session: env.session.clone(),
        store: env.store.clone(),
        guard: Mutex::new(None),
    }))
}

#[async_trait]
impl Op<Snap> for LocalSource {
    async fn cache_key(&self, ctx: &OpContext, _inputs: &[Solved<Snap>]) -> Result<String> {
        let guard = self.shared.local_lock(&self.lock_key).lock_owned().await;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| Error::io("create directory", &self.dir, e))?;
        let id = format!("transferring {}:", self.req.name);
        let started = SystemTime::now();
        let (progress, vertex, id2) = (ctx.progress.clone(), ctx.vertex.clone(), id.clone());
        let reporter = TransferProgress::new(move |bytes| {
            progress.send(ProgressEvent::VertexStatus {
                vertex: vertex.clone(),
                id: id2.clone(),
                name: "transferring".into(),
                current: bytes as i64,
                total: 0,
                timestamp: SystemTime::now(),
                started: Some(started),
                completed: None,
            })
        });
        let res = self
            .session
            .sync_local(&self.req, &self.dir, &reporter)
            .await;
        let bytes = res.as_ref().copied().unwrap_or(0);
        ctx.progress.send(ProgressEvent::VertexStatus {
            vertex: ctx.vertex.clone(),
            id,
            name: "transferring".into(),
            current: bytes as i64,
            total: 0,
            timestamp: SystemTime::now(),
            started: Some(started),
            completed: Some(SystemTime::now()),
        });
        res?;
        let dir = self.dir.clone();
        let sum = blocking(move || {
            let root = Root::open(&dir).map_err(|e| Error::io("open", &dir, e))?;
            checksum(&root, "/", false).map_err(|e| Error::io("checksum", &dir, e))
        })
        .await?;
        *self.guard.lock().unwrap() = Some(guard);
        let mut h = crate::digest::KeyHasher::new("berth.local.v1");
        h.field(self.req.name.as_bytes());
        for list in [
            &self.req.include_patterns,
            &self.req.exclude_patterns,
            &self.req.follow_paths,
        ] {
            h.field(list.join("\0").as_bytes());
        }
        h.field(sum.as_bytes());
        Ok(h.finish())
    }

    async fn exec(&self, ctx: &OpContext, _inputs: &[Solved<Snap>]) -> Result<Vec<Snap>> {
        let store = self.store.clone();
        let dir = self.dir.clone();
        let desc = format!("local source for {}", self.req.name);
        let cancel = ctx.cancel.clone();
        let res = blocking(move || {
            let src = Root::open(&dir).map_err(|e| Error::io("open", &dir, e))?;
            let opts = SnapshotOptions {
                description: desc,
                record_type: RecordType::LocalSource,
            };
            let mut failure = None;
            let added = store.add_layer(None, &opts, |diff| {
                let run = || -> Result<()> {
                    let dst = Root::open(diff).map_err(|e| Error::io("open", diff, e))?;
                    let action = pb::FileActionCopy {
                        src: "/".into(),
                        dest: "/".into(),
                        mode: -1,
                        timestamp: -1,
                        create_dest_path: true,
                        dir_copy_contents: true,
                        ..Default::default()
                    };
                    crate::file::copy(&src, &dst, &action, None, &|| cancel.is_cancelled())
                };
                match run() {
                    Ok(()) => Ok(LayerMeta::default()),
                    Err(e) => {
                        failure = Some(e);
                        Err(layerstore::Error::Io {
                            op: "copy local source",
                            path: diff.to_path_buf(),
                            source: std::io::Error::other("copy failed"),
                        })
                    }
                }
            });
            let (id, _layer) = match added {
                Ok(x) => x,
                Err(e) => return Err(failure.unwrap_or_else(|| Error::store("add layer")(e))),
            };
            Snap::acquire(&store, id)
        })
        .await;
        // The synced directory may change again now.
        self.guard.lock().unwrap().take();
        Ok(vec![res?])
    }
}
