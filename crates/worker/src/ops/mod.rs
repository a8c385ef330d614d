//! The op registry: one module per LLB op kind, each turning a validated op into a solver
//! [`Op`](crate::solver::Op) over layer chains.
//!
//! | op | module |
//! |---|---|
//! | `SourceOp` `local://` | [`source_local`] |
//! | `SourceOp` `docker-image://` | [`source_image`] |
//! | `SourceOp` `oci-layout://` | [`source_oci_layout`] |
//! | `FileOp` | [`file`] |
//! | `ExecOp` | [`exec`] |
//! | `MergeOp` | [`merge`] |
//! | `DiffOp` | [`diff`] |
//!
//! A module exposes `pub(crate) fn new(op: &LoadedOp, env: &Arc<BuildEnv>) -> Result<Arc<dyn
//! Op<Snap>>>`; [`make_op`] dispatches. Cache keys: each op hashes its own definition without
//! volatile fields (input digests, session ids) plus its inputs' cache keys ([`base_key`] helps).

pub(crate) mod diff;
pub(crate) mod exec;
pub(crate) mod file;
pub(crate) mod image_pull;
pub(crate) mod merge;
pub(crate) mod source_git;
pub(crate) mod source_http;
pub(crate) mod source_image;
pub(crate) mod source_local;
pub(crate) mod source_oci_layout;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use prost::Message;
use protos::pb;
use protos::pb::op::Op as OpPayload;

use crate::error::{Error, Result};
use crate::llbsolver::definition::LoadedOp;
use crate::result::Snap;
use crate::session::SessionProvider;
use crate::solver::{Op, Solved};
use crate::worker::WorkerOptions;
use layerstore::snapshot::{SnapshotId, SnapshotStore};

/// Worker-wide state that ops share across builds.
pub(crate) struct Shared {
    /// `<root>/local`: one persistent directory per (local name, shared key).
    pub(crate) local_root: PathBuf,
    /// Locks serializing syncs into the same local directory.
    local_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Content checksums of paths in committed snapshots (see [`ChecksumMemo`]).
    pub(crate) checksums: ChecksumMemo,
    /// Files the clients uploaded through their sessions, per build (see [`SessionUploads`]).
    pub(crate) uploads: SessionUploads,
}

/// What a file uploaded through a client's session (`http://buildkit-session/…`) became: the
/// content digest and the snapshot holding it.
pub(crate) type Upload = (String, SnapshotId);

/// Session uploads by (build, URL, file options). A client serves each upload once, while a
/// build may solve the same source several times (a frontend reads the context, then solves
/// the build on it): later solves of the build take the first one's snapshot. Only the last
/// [`SessionUploads::KEEP`] uploads are remembered (a build only needs its own while it runs).
#[derive(Default)]
pub(crate) struct SessionUploads(Mutex<std::collections::VecDeque<(String, UploadCell)>>);

type UploadCell = Arc<tokio::sync::OnceCell<Upload>>;

impl SessionUploads {
    const KEEP: usize = 256;

    /// The cell for `key`, created empty if new.
    pub(crate) fn cell(&self, key: &str) -> UploadCell {
        let mut q = self.0.lock().unwrap();
        if let Some((_, c)) = q.iter().find(|(k, _)| k == key) {
            return c.clone();
        }
        if q.len() >= Self::KEEP {
            q.pop_front();
        }
        let c = UploadCell::default();
        q.push_back((key.to_string(), c.clone()));
        c
    }
}

/// What a content checksum was taken of: a path in a committed snapshot, whether a symlink at
/// the path was followed, and the copy's include and exclude patterns.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ChecksumKey {
    pub(crate) snapshot: SnapshotId,
    /// The path, cleaned and absolute (`/a/b`).
    pub(crate) path: String,
    pub(crate) follow: bool,
    pub(crate) include: Vec<String>,
    pub(crate) exclude: Vec<String>,
}

/// Content checksums already computed, shared by the builds of this worker. A committed
/// snapshot never changes, so a checksum taken of it stays true for as long as its id exists
/// (ids are random and never reused): a cached rebuild looks its copy sources' checksums up
/// here instead of mounting them and reading every file again. Local sources put the
/// checksum of a new snapshot's root here when they create it (they computed it for their own
/// cache key). Bounded: emptied when it reaches [`ChecksumMemo::MAX`] entries.
#[derive(Debug, Default)]
pub(crate) struct ChecksumMemo {
    sums: Mutex<HashMap<ChecksumKey, String>>,
}

impl ChecksumMemo {
    /// Entries kept at most.
    const MAX: usize = 16 * 1024;

    /// The checksum recorded for `key`, if any.
    pub(crate) fn get(&self, key: &ChecksumKey) -> Option<String> {
        self.sums.lock().unwrap().get(key).cloned()
    }

    /// Records the checksum of `key`.
    pub(crate) fn insert(&self, key: ChecksumKey, sum: String) {
        let mut m = self.sums.lock().unwrap();
        if m.len() >= Self::MAX {
            m.clear();
        }
        m.insert(key, sum);
    }

    /// Records `sum` as the unfiltered checksum of the root of `snapshot` (the same whether a
    /// symlink at the path is followed or not: the root is no symlink).
    pub(crate) fn insert_root(&self, snapshot: &SnapshotId, sum: &str) {
        for follow in [false, true] {
            self.insert(
                ChecksumKey {
                    snapshot: snapshot.clone(),
                    path: "/".into(),
                    follow,
                    include: vec![],
                    exclude: vec![],
                },
                sum.to_string(),
            );
        }
    }
}

impl Shared {
    pub(crate) fn new(root: &Path) -> Result<Self> {
        let local_root = root.join("local");
        // `root` is `<berth root>/worker`: the worker's own files next to the snapshot store.
        std::fs::create_dir_all(&local_root)
            .map_err(|e| Error::io("create directory", &local_root, e))?;
        Ok(Shared {
            local_root,
            local_locks: Mutex::new(HashMap::new()),
            checksums: ChecksumMemo::default(),
            uploads: SessionUploads::default(),
        })
    }

    /// The lock for local directory `key`.
    pub(crate) fn local_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.local_locks
            .lock()
            .unwrap()
            .entry(key.to_string())
            .or_default()
            .clone()
    }
}

/// Per-build environment given to op constructors.
pub(crate) struct BuildEnv {
    pub(crate) store: SnapshotStore,
    pub(crate) shared: Arc<Shared>,
    pub(crate) session: Arc<dyn SessionProvider>,
    /// Worker options (docker host, platform...) for the exec and image ops.
    #[allow(dead_code)]
    pub(crate) opts: WorkerOptions,
    /// The base images this build uses in place from Docker, with their pins; the build's
    /// result keeps them (so they stay pinned until it is exported).
    pub(crate) bases: Arc<source_image::BaseImages>,
    /// The build (job) the solve belongs to (empty outside a build).
    pub(crate) build_id: String,
    /// How long a base image used in place waits before its pin container is made
    /// ([`layerstore::dockerstore::pin_image_after`]): zero when something reads the build's
    /// result (it waits for the pins to run), else [`source_image::pin_delay`].
    pub(crate) pin_delay: std::time::Duration,
    /// Whether ops compute BuildKit v0.11.6's content keys of what they copy (`crate::bkkeys`):
    /// only a build that imports or exports a cache needs them (they read every copied file).
    pub(crate) stock_keys: bool,
}

/// The solver op for a validated LLB op.
pub(crate) fn make_op(op: &LoadedOp, env: &Arc<BuildEnv>) -> Result<Arc<dyn Op<Snap>>> {
    match op.payload() {
        OpPayload::Source(s) => {
            let scheme = s.identifier.split_once("://").map(|x| x.0).unwrap_or("");
            match scheme {
                "local" => source_local::new(op, env),
                "docker-image" => source_image::new(op, env),
                "https" | "http" => source_http::new(op, env),
                "git" => source_git::new(op, env),
                "oci-layout" => source_oci_layout::new(op, env),
                other => Err(Error::not_implemented(format!("{other} sources"))),
            }
        }
        OpPayload::File(_) => file::new(op, env),
        OpPayload::Exec(_) => exec::new(op, env),
        OpPayload::Merge(_) => merge::new(op, env),
        OpPayload::Diff(_) => diff::new(op, env),
        OpPayload::Build(_) => Err(Error::not_implemented("BuildOp")),
        OpPayload::Passthrough(_) => Err(Error::not_implemented("PassthroughOp")),
    }
}

/// Key material of an op without its input digests (which change with volatile attributes of
/// the inputs, e.g. a local source's session id, while the inputs' content may not).
pub(crate) fn base_key(op: &pb::Op) -> Vec<u8> {
    let mut op = op.clone();
    op.inputs.clear();
    op.encode_to_vec()
}

/// Standard cache key: op kind, op without input digests, and each input's key.
pub(crate) fn standard_key(kind: &str, op: &pb::Op, inputs: &[Solved<Snap>]) -> String {
    let keys: Vec<&str> = inputs.iter().map(|i| i.key.as_str()).collect();
    standard_key_from(kind, op, &keys)
}

/// [`standard_key`] from the inputs' keys.
pub(crate) fn standard_key_from(kind: &str, op: &pb::Op, input_keys: &[&str]) -> String {
    let mut h = crate::digest::KeyHasher::new(kind);
    h.field(&base_key(op));
    for k in input_keys {
        h.field(k.as_bytes());
    }
    h.finish()
}
