//! Imported build cache ([`crate::CacheSource`]) as the solver's [`ImportStore`]: a key found in
//! one of the build's sources becomes a committed snapshot made of the layers this node already
//! has (a chain prefix in the bound Docker Engine, berth layers by diffID) plus the blobs it
//! downloads, each checked against its digest and diffID (see `crate::remote`).

use std::io::{self, Read};
use std::time::SystemTime;

use async_trait::async_trait;
use layerstore::dockerstore::{self, DockerStore, StorageDriver};
use layerstore::snapshot::{
    Chain, DockerLayer, LayerMeta, LayerRef, SnapshotId, SnapshotOptions, SnapshotStore,
};
use layerstore::tar::{apply_layer, chain_ids, write_layer, ApplyOptions, Digest, WriteOptions};
use rustix::fs::AtFlags;
use sha2::{Digest as _, Sha256};
use tokio::sync::OnceCell;

use crate::error::{Error, ErrorKind, Result};
use crate::llbsolver::cache::blocking;
use crate::progress::ProgressEvent;
use crate::remote::{CacheSourceRef, RemoteLayer};
use crate::result::Snap;
use crate::solver::{ImportStore, OpContext};
use crate::worker::WorkerOptions;

/// The imported caches of one build.
pub(crate) struct Imported {
    pub(crate) sources: Vec<CacheSourceRef>,
    pub(crate) store: SnapshotStore,
    pub(crate) opts: WorkerOptions,
    /// Docker's store as the bound Engine reports it (None: no Engine and no data root).
    docker: OnceCell<Option<DockerStore>>,
}

impl Imported {
    pub(crate) fn new(
        sources: Vec<CacheSourceRef>,
        store: SnapshotStore,
        opts: WorkerOptions,
    ) -> Self {
        Imported {
            sources,
            store,
            opts,
            docker: OnceCell::new(),
        }
    }

    async fn docker_store(&self) -> Option<DockerStore> {
        self.docker
            .get_or_init(|| async {
                let engine = crate::ops::source_image::answering_engine(
                    self.opts.docker.as_ref(),
                    self.opts.docker_host.as_deref(),
                )
                .await;
                match (engine, &self.opts.docker_data_root) {
                    (Some(d), _) => {
                        let info = d.info().await.ok()?;
                        let driver =
                            StorageDriver::from_name(info.driver.as_deref().unwrap_or_default())
                                .ok()?;
                        let root = info
                            .docker_root_dir
                            .unwrap_or_else(|| "/var/lib/docker".into());
                        Some(DockerStore::new(root, driver))
                    }
                    (None, Some(root)) => {
                        Some(DockerStore::new(root, dockerstore::offline_driver(root)))
                    }
                    (None, None) => None,
                }
            })
            .await
            .clone()
    }

    /// Builds the snapshot of `layers` (bottom first) from `source`. Also used by
    /// `oci-layout://` sources (`ops::source_oci_layout`), whose blobs come from the client.
    pub(crate) async fn materialize(
        &self,
        ctx: &OpContext,
        source: &CacheSourceRef,
        layers: &[RemoteLayer],
    ) -> Result<Snap> {
        let docker = self.docker_store().await;
        let store = self.store.clone();
        let diff_ids = layers
            .iter()
            .map(|l| {
                l.diff_id.parse::<Digest>().map_err(|_| Error::Op {
                    message: format!(
                        "{} {}: layer {} has an invalid diffID {:?}",
                        source.noun(),
                        source.describe(),
                        l.digest,
                        l.diff_id
                    ),
                    kind: ErrorKind::InvalidArgument,
                    source: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // The longest prefix Docker has, used in place. Its layers keep the cache's creation
        // times in berth's records (Docker's own time is when it registered them), so an image
        // rebuilt from the cache has the exporter's history, as with a downloaded layer.
        let prefix = {
            let diff_ids = diff_ids.clone();
            let times: Vec<Option<SystemTime>> = layers.iter().map(|l| l.created_at).collect();
            let st = store.clone();
            blocking(move || {
                let prefix = docker_prefix(docker.as_ref(), &diff_ids);
                let known: Vec<(String, SystemTime)> = prefix
                    .iter()
                    .zip(&times)
                    .filter_map(|(r, t)| match (r, t) {
                        (LayerRef::Docker(d), Some(t)) => Some((d.chain_id.clone(), *t)),
                        _ => None,
                    })
                    .collect();
                st.set_docker_layer_created_at(&known)
                    .map_err(Error::store("record imported layer times"))?;
                Ok(prefix)
            })
            .await?
        };
        let mut chain = Chain(prefix);
        // Snapshots made on the way (each applied layer needs its parent as one); removed once
        // the result's snapshot holds their layers.
        let mut temps: Vec<SnapshotId> = vec![];
        let mut res = Ok(());
        for (l, did) in layers.iter().zip(&diff_ids).skip(chain.0.len()) {
            let st = store.clone();
            let d = did.to_string();
            let known = blocking(move || {
                st.layers_by_diff_id(&d)
                    .map_err(Error::store("find layer by diffID"))
            })
            .await;
            match known.map(|k| k.into_iter().next()) {
                Ok(Some(lid)) => chain.0.push(LayerRef::Berth(lid)),
                Ok(None) => match self
                    .download(ctx, source, l, chain.clone(), &mut temps)
                    .await
                {
                    Ok(c) => chain = c,
                    Err(e) => {
                        res = Err(e);
                        break;
                    }
                },
                Err(e) => {
                    res = Err(e);
                    break;
                }
            }
        }
        let st = store.clone();
        let desc = format!("{} {}", source.noun(), source.describe());
        blocking(move || {
            let snap = res.and_then(|()| {
                let id = st
                    .create_from_chain(chain, &[], &SnapshotOptions::new(desc))
                    .map_err(Error::store("record imported snapshot"))?;
                Snap::acquire(&st, id)
            });
            for t in temps.iter().rev() {
                remove_quietly(&st, t);
            }
            snap
        })
        .await
    }

    /// Fetches and applies one layer on top of `chain`; returns the longer chain. The snapshots
    /// it records go to `temps`.
    async fn download(
        &self,
        ctx: &OpContext,
        source: &CacheSourceRef,
        l: &RemoteLayer,
        chain: Chain,
        temps: &mut Vec<SnapshotId>,
    ) -> Result<Chain> {
        let what = format!(
            "layer {} of {} {}",
            l.digest,
            source.noun(),
            source.describe()
        );
        let started = SystemTime::now();
        let status = |current: u64, done: bool| {
            ctx.progress.send(ProgressEvent::VertexStatus {
                vertex: ctx.vertex.clone(),
                id: format!("importing {}", l.digest),
                name: format!("importing {}", l.digest),
                current: current as i64,
                total: l.size as i64,
                timestamp: SystemTime::now(),
                started: Some(started),
                completed: done.then(SystemTime::now),
            })
        };
        status(0, false);
        let reader = source.open(l).await.map_err(|e| Error::Op {
            message: format!("{what}: {e}"),
            kind: ErrorKind::Unavailable,
            source: None,
        })?;
        let store = self.store.clone();
        let layer = l.clone();
        let (made, chain) = blocking(move || {
            let mut made = vec![];
            let parent = if chain.0.is_empty() {
                None
            } else {
                let p = store
                    .create_from_chain(chain, &[], &SnapshotOptions::new(what.clone()))
                    .map_err(Error::store("record imported chain"))?;
                made.push(p.clone());
                Some(p)
            };
            let res = store.add_layer(
                parent.as_ref(),
                &SnapshotOptions::new(what.clone()),
                |dir| apply_blob(reader, dir, &layer, &what),
            );
            let (id, _) = match res {
                Ok(r) => r,
                Err(e) => {
                    for t in &made {
                        remove_quietly(&store, t);
                    }
                    return Err(Error::Op {
                        message: format!("{what}: {}", with_sources(&e)),
                        kind: ErrorKind::Internal,
                        source: Some(Box::new(e)),
                    });
                }
            };
            made.push(id.clone());
            let chain = store
                .info(&id)
                .map_err(Error::store("imported snapshot"))?
                .chain;
            Ok((made, chain))
        })
        .await?;
        temps.extend(made);
        status(l.size, true);
        Ok(chain)
    }
}

/// An error and its sources, `: `-separated.
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Removes a temporary snapshot (its layers stay: a later snapshot references them).
fn remove_quietly(store: &SnapshotStore, id: &SnapshotId) {
    if let Err(e) = store.remove(id) {
        tracing::debug!(snapshot = %id, error = %e, "removing a temporary import snapshot failed");
    }
}

/// Applies blob `reader` into `dir`, checking the blob digest and the diffID. The layer's
/// metadata records the diffID only when berth's own tar of the applied tree gives the same
/// bytes (exports of the layer then keep the blob's diffID); otherwise exports hash it anew.
fn apply_blob(
    reader: Box<dyn Read + Send>,
    dir: &std::path::Path,
    l: &RemoteLayer,
    what: &str,
) -> layerstore::Result<LayerMeta> {
    let bad = |m: String| layerstore::Error::Io {
        op: "import",
        path: dir.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidData, m),
    };
    let mut hashing = HashingReader {
        inner: reader,
        hasher: Sha256::new(),
        n: 0,
    };
    let stats = apply_layer(&mut hashing, dir, None, &ApplyOptions::default())?;
    io::copy(&mut hashing, &mut io::sink()).map_err(|e| bad(format!("{what}: {e}")))?;
    let digest = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
    if digest != l.digest {
        return Err(bad(format!(
            "{what}: content is {digest} ({} bytes)",
            hashing.n
        )));
    }
    if stats.diff_id.to_string() != l.diff_id {
        return Err(bad(format!(
            "{what}: uncompressed content is {}, expected diffID {}",
            stats.diff_id, l.diff_id
        )));
    }
    if let Some(t) = l.created_at {
        // The exporter's creation time (layer times are the tree root's mtime): an image
        // rebuilt from this cache gets the history, so the digest, the exporter's image had.
        let ts = rustix::fs::Timestamps {
            last_access: timespec(SystemTime::now()),
            last_modification: timespec(t),
        };
        if let Err(e) = rustix::fs::utimensat(rustix::fs::CWD, dir, &ts, AtFlags::empty()) {
            tracing::debug!(layer = %l.digest, error = %e, "keeping the import time of a layer");
        }
    }
    let again = write_layer(dir, io::sink(), None, &WriteOptions::default())?;
    Ok(if again.diff_id == stats.diff_id {
        LayerMeta {
            diff_id: Some(l.diff_id.clone()),
            tar_size: Some(stats.size),
            has_tar_split: false,
        }
    } else {
        LayerMeta::default()
    })
}

fn timespec(t: SystemTime) -> rustix::fs::Timespec {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    rustix::fs::Timespec {
        tv_sec: d.as_secs() as i64,
        tv_nsec: d.subsec_nanos() as _,
    }
}

struct HashingReader {
    inner: Box<dyn Read + Send>,
    hasher: Sha256,
    n: u64,
}

impl Read for HashingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
}

/// The Docker layers of the longest prefix of `diff_ids` the store holds.
fn docker_prefix(docker: Option<&DockerStore>, diff_ids: &[Digest]) -> Vec<LayerRef> {
    let Some(docker) = docker else {
        return vec![];
    };
    let wf = docker.driver().whiteout_format();
    let mut out = vec![];
    for (cid, did) in chain_ids(diff_ids).iter().zip(diff_ids) {
        match docker.layer(cid) {
            Ok(Some(e)) if e.diff_id == *did && e.diff_dir.is_dir() => {
                out.push(LayerRef::Docker(DockerLayer {
                    chain_id: cid.to_string(),
                    diff_id: did.to_string(),
                    diff_dir: e.diff_dir,
                    whiteouts: wf,
                    blob: None,
                }))
            }
            _ => break,
        }
    }
    out
}

#[async_trait]
impl ImportStore<Snap> for Imported {
    async fn load(&self, ctx: &OpContext, key: &str, needed: &[bool]) -> Option<Vec<Option<Snap>>> {
        let keys: Vec<Option<String>> = (0..needed.len())
            .map(|i| Some(crate::solver::output_key(key, i)))
            .collect();
        self.load_keys(ctx, &keys, needed).await
    }

    async fn load_stock(
        &self,
        ctx: &OpContext,
        ids: &[Option<String>],
        needed: &[bool],
    ) -> Option<Vec<Option<Snap>>> {
        self.load_keys(ctx, ids, needed).await
    }

    fn alias(&self, alias: &str) -> Option<String> {
        self.sources.iter().find_map(|s| s.alias(alias))
    }
}

impl Imported {
    /// The results recorded for `keys` (one per output; `None`: none), see [`ImportStore::load`].
    async fn load_keys(
        &self,
        ctx: &OpContext,
        keys: &[Option<String>],
        needed: &[bool],
    ) -> Option<Vec<Option<Snap>>> {
        let mut out = Vec::with_capacity(needed.len());
        for (i, &need) in needed.iter().enumerate() {
            let k = keys.get(i).cloned().flatten().unwrap_or_default();
            let found = self
                .sources
                .iter()
                .filter(|_| !k.is_empty())
                .find_map(|s| s.lookup(&k).map(|l| (s.clone(), l)));
            // An output the build does not use is not fetched (a mode=min export records only
            // the build result's output of a step with several).
            let Some((source, layers)) = found.filter(|_| need) else {
                if need {
                    return None;
                }
                out.push(None);
                continue;
            };
            match self.materialize(ctx, &source, &layers).await {
                Ok(s) => out.push(Some(s)),
                Err(e) => {
                    tracing::warn!(key = %k, cache = %source.describe(), error = %e, "imported cache result unusable; the step runs");
                    return None;
                }
            }
        }
        Some(out)
    }
}

impl std::fmt::Debug for Imported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Imported")
            .field("sources", &self.sources.len())
            .finish_non_exhaustive()
    }
}
