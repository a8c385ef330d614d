//! [`Client::pull`]: an image berth resolved in a registry lands in the Engine's containerd the
//! way Docker's own pull puts it there, through containerd's API directly.
//!
//! Under the build's base-image lease ([`Client::lease`], labelled with the berthd instance),
//! taken before the pull starts and kept after it for the build ([`Client::base_image`]), so
//! nothing the pull wrote or found is ever unheld before the build ends:
//! - first, every blob the image names and every chainID of its layers are added to the lease
//!   (containerd records a lease resource whether it exists yet or not): what other images
//!   already provide cannot be collected midway either;
//! - each layer blob the content store lacks is streamed from the registry into it, chunk by
//!   chunk (never whole in memory; the registry stream checks size and digest, containerd checks
//!   them again at commit), labelled `containerd.io/distribution.source.<host>=<repository>` and
//!   `containerd.io/uncompressed=<diffID>`; [`MAX_DOWNLOADS`] layers at a time, each with its
//!   own progress;
//! - each layer whose chainID has no snapshot in the Engine's snapshotter is unpacked: the
//!   blob is decompressed and applied (berth's hostile-tar applier, overlay whiteouts) into a
//!   snapshot prepared on its parent, checked against the config's diffID, and committed under
//!   the chainID (labelled `containerd.io/snapshot.ref`). A layer needs its parent committed,
//!   so unpacks go bottom up, one at a time: the first layer to unpack is unpacked from its
//!   download's own stream (the same chunks go to the content writer and the unpacker), each
//!   later one from the content store as soon as its blob is committed and its parent
//!   unpacked, while the other downloads go on. Layers whose snapshot exists are not unpacked
//!   again (and not downloaded when their blob is there too); a blob present without its
//!   snapshot is unpacked from the content store;
//! - config (`containerd.io/gc.ref.snapshot.<snapshotter>` = top chainID), manifest
//!   (`gc.ref.content.config`, `gc.ref.content.l.<i>`) and index (`gc.ref.content.m.<i>` for the
//!   platform's manifest) are written with the distribution-source label (blobs already there
//!   get the labels they lack);
//! - last, the image record, named as Docker 26 names the images it pulls: the normalised
//!   reference (`docker.io/library/busybox:latest`, `host/repo@sha256:…` for a digest), its
//!   target what the reference points at (Docker's image ID on this store). `docker images`
//!   lists containerd's records directly, so the image shows at once. A record of that name
//!   pointing elsewhere is moved, and its previous image kept as `moby-dangling@<digest>` when no
//!   other name holds it (as Docker does).
//!
//! The lease is deleted when the build drops it: from then on the record holds everything
//! through the GC labels (a `docker image prune -a` meanwhile removes the record, and the GC
//! frees the image once the build ends, as for any base image removed while in use).
//! A berthd killed at any point leaves only leased content, snapshots and ingests, which the
//! next berthd on the same root deletes before its first resolution
//! ([`Client::remove_leftovers`]) and containerd's GC then frees; the prepared snapshots of a
//! killed unpack are removed by the same sweep.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::PathBuf;

use bytes::Bytes;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    content_client::ContentClient, images_client::ImagesClient, AbortRequest, CreateImageRequest,
    GetImageRequest, Image, Info, InfoRequest, ListImagesRequest, ListStatusesRequest,
    ReadContentRequest, UpdateImageRequest, UpdateRequest, WriteAction, WriteContentRequest,
};
use containerd_client::types::Descriptor;
use layerstore::dockerstore::fault_point;
use tonic::Code;

use futures::StreamExt;

use crate::image::{cd_err, sha256, token, CONTENT};
use crate::{BaseLease, Client, Error, Result};

/// Prefix of the leases pulls of berthd before 2026-12-08 took (a pull now writes under the
/// build's base-image lease); swept like those.
pub(crate) const PULL_LEASE_PREFIX: &str = "berth-pull-";
/// Prefix of the keys of snapshots a pull prepares to unpack a layer into.
pub(crate) const UNPACK_PREFIX: &str = "berth-unpack-";
/// Prefix of a pull's content ingest refs (`berth-pull-<owner hash>-…`).
const INGEST_PREFIX: &str = "berth-pull-";
/// Layer downloads of one pull at a time (containerd's and Docker's default is 3).
pub const MAX_DOWNLOADS: usize = 3;
/// Docker's record name for an image no name holds.
const DANGLING_PREFIX: &str = "moby-dangling@";
/// Chunks in flight between the registry stream, the content writer and the unpacker.
const CHANNEL_CHUNKS: usize = 8;

/// Fault points of a pull (`BERTH_FAULT_KILL`, see `layerstore::dockerstore::fault`), in order.
pub const PULL_STEPS: &[&str] = &[
    // The pull's lease exists; nothing else.
    "containerd-pull:lease",
    // Half of the first layer to unpack went to the content writer and the unpacker; nothing
    // committed.
    "containerd-pull:mid-layer",
    // The first unpacked layer's blob and snapshot are committed (under the lease).
    "containerd-pull:layer-committed",
    // Every blob and snapshot is written; no image record.
    "containerd-pull:content",
    // The image record exists; the build's lease still holds the image.
    "containerd-pull:image",
];

/// Per-layer progress of a pull.
pub trait PullProgress: Send + Sync {
    /// A layer's download starts: the function told the bytes received so far.
    fn downloading(&self, digest: &str, size: u64) -> Option<registry::ProgressFn>;
    /// A layer needs no download: its blob is in the content store already.
    fn present(&self, digest: &str, size: u64);
}

/// What [`Client::pull`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pulled {
    /// Docker's image ID on this store: the digest the reference points at.
    pub id: String,
    /// The image record's name.
    pub name: String,
    /// Layer blobs downloaded.
    pub fetched: Vec<String>,
    /// chainIDs unpacked and committed.
    pub unpacked: Vec<String>,
    /// chainIDs whose snapshot was there already.
    pub skipped: Vec<String>,
}

/// The name Docker 26 gives the image record of a pull of `r`: the normalised reference, by
/// digest when it has one, else by tag (`latest` when it has neither).
pub fn record_name(r: &registry::Reference) -> String {
    match (r.digest(), r.tag()) {
        (Some(d), _) => format!("{}@{d}", r.name()),
        (None, t) => format!("{}:{}", r.name(), t.unwrap_or("latest")),
    }
}

/// The distribution-source label of blobs from `r`'s repository: the key names the registry
/// host without its port (label keys take no `:`), as containerd's fetcher writes it.
fn source_label(r: &registry::Reference) -> (String, String) {
    let host = r.domain().split(':').next().unwrap_or_default();
    (
        format!("containerd.io/distribution.source.{host}"),
        r.repository().to_string(),
    )
}

/// A stable short hash of `owner` in ingest refs (refs carry no labels).
fn owner_tag(owner: &str) -> String {
    sha256(owner.as_bytes())[7..19].to_string()
}

/// The directory a prepared snapshot's writes go to: `upperdir=` of an overlay mount, or the
/// source of a bind mount (a snapshot without parent).
fn writable_dir(mounts: &[containerd_client::types::Mount]) -> Option<PathBuf> {
    let m = mounts.first()?;
    match m.r#type.as_str() {
        "overlay" => m
            .options
            .iter()
            .find_map(|o| o.strip_prefix("upperdir="))
            .map(PathBuf::from),
        "bind" => Some(PathBuf::from(&m.source)),
        _ => None,
    }
}

/// A blocking reader over chunks sent through a channel (the unpacker's side of the tee).
struct ChunkReader {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    buf: Bytes,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.buf.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.buf = b,
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        self.buf = self.buf.slice(n..);
        Ok(n)
    }
}

/// Where a layer's bytes come from.
enum Source {
    Registry(Box<registry::BlobStream>),
    Content(Box<tonic::Streaming<containerd_client::services::v1::ReadContentResponse>>),
}

impl Source {
    async fn next(&mut self) -> std::result::Result<Option<Bytes>, String> {
        match self {
            Source::Registry(s) => s.next_chunk().await.map_err(|e| e.to_string()),
            Source::Content(s) => s
                .message()
                .await
                .map(|m| m.map(|m| Bytes::from(m.data)))
                .map_err(|s| format!("read from containerd: {}", s.message())),
        }
    }
}

fn pull_error(r: &registry::Reference, message: String) -> Error {
    Error::Pull {
        reference: r.to_string(),
        message,
    }
}

impl Client {
    /// Pulls `img` (resolved by `session`) into the Engine's containerd under `lease` (from
    /// [`Client::lease`]; module docs). The lease holds everything the image names from the
    /// start and is not deleted here: hand it to [`Client::base_image`], so no prune can take
    /// the image between its pull and its use. Safe to call again for an image that is (partly)
    /// there: only what is missing is fetched and unpacked.
    pub async fn pull(
        &self,
        session: &registry::Session,
        img: &registry::Image,
        lease: &BaseLease,
        progress: &dyn PullProgress,
    ) -> Result<Pulled> {
        fault_point("containerd-pull:lease");
        let r = &img.reference;
        let (owner, lease) = (lease.owner(), lease.id());
        let diff_ids = img
            .diff_ids
            .iter()
            .map(|d| d.parse::<layerstore::Digest>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| pull_error(r, format!("diffID: {e}")))?;
        let chains: Vec<String> = layerstore::tar::chain_ids(&diff_ids)
            .iter()
            .map(ToString::to_string)
            .collect();
        if img.manifest.layers.len() != chains.len() {
            return Err(pull_error(
                r,
                format!(
                    "manifest lists {} layers, config {} diffIDs",
                    img.manifest.layers.len(),
                    chains.len()
                ),
            ));
        }
        let source = source_label(r);
        let mut out = Pulled {
            id: img.digest.clone(),
            name: record_name(r),
            ..Default::default()
        };

        // Everything the image names is added to the lease before it is looked at: what is
        // there already (blobs and snapshots of other images) cannot be collected while the rest
        // is written, nor afterwards while the build uses the image.
        let snapshot = self.snapshot_resource();
        let mut held = vec![
            (CONTENT, img.digest.as_str()),
            (CONTENT, img.manifest_digest.as_str()),
            (CONTENT, img.config_digest()),
        ];
        held.extend(
            img.manifest
                .layers
                .iter()
                .map(|l| (CONTENT, l.digest.as_str())),
        );
        held.extend(chains.iter().map(|c| (snapshot.as_str(), c.as_str())));
        self.hold(lease, &held).await?;

        // The snapshots present: a chainID's snapshot implies its parents'.
        let mut present = 0;
        for i in (0..chains.len()).rev() {
            if self.has_snapshot(&chains[i]).await? {
                present = i + 1;
                break;
            }
        }
        let mut labels = Vec::new();
        let mut missing = Vec::new();
        for (i, (desc, diff_id)) in img.manifest.layers.iter().zip(&img.diff_ids).enumerate() {
            let l = HashMap::from([
                source.clone(),
                ("containerd.io/uncompressed".to_string(), diff_id.clone()),
            ]);
            match self.blob_info(&desc.digest, lease).await? {
                Some(info) => {
                    self.ensure_labels(&info, &l, lease).await?;
                    progress.present(&desc.digest, desc.size);
                }
                None => missing.push(i),
            }
            labels.push(l);
        }

        // Downloads run [`MAX_DOWNLOADS`] at a time, each streamed into the content store. The
        // first layer to unpack is unpacked from its download's stream as it arrives (its
        // parent is there); each later one is unpacked from the content store once its blob is
        // committed and its parent unpacked, while the next downloads go on.
        let tee = (present < chains.len() && missing.contains(&present)).then_some(present);
        let mut done = HashMap::new();
        let mut senders = HashMap::new();
        for &i in &missing {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            senders.insert(i, tx);
            done.insert(i, rx);
        }
        let failed = std::sync::atomic::AtomicBool::new(false);
        let layer = |i: usize| Layer {
            reference: r,
            desc: &img.manifest.layers[i],
            diff_id: &img.diff_ids[i],
            chain: &chains[i],
            parent: if i == 0 { "" } else { chains[i - 1].as_str() },
            labels: None,
            unpack: false,
            owner,
            lease,
        };
        // Boxed and collected first: a stream over a borrowing closure trips the compiler's
        // `Send` check of the caller's future (higher-ranked lifetimes).
        let mut jobs: Vec<futures::future::BoxFuture<'_, Result<()>>> = Vec::new();
        for &i in &missing {
            let (layer, labels, failed) = (&layer, &labels, &failed);
            let sender = senders.remove(&i);
            jobs.push(Box::pin(async move {
                if failed.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok(());
                }
                let desc = &img.manifest.layers[i];
                let result = async {
                    let src = session
                        .open_image_blob(img, desc, progress.downloading(&desc.digest, desc.size))
                        .await
                        .map_err(|e| pull_error(r, e.to_string()))?;
                    let l = Layer {
                        labels: Some(labels[i].clone()),
                        unpack: tee == Some(i),
                        ..layer(i)
                    };
                    self.layer(l, Source::Registry(Box::new(src))).await?;
                    if tee == Some(i) {
                        fault_point("containerd-pull:layer-committed");
                    }
                    Ok(())
                }
                .await;
                match &result {
                    Ok(()) => {
                        if let Some(tx) = sender {
                            let _ = tx.send(());
                        }
                    }
                    Err(_) => failed.store(true, std::sync::atomic::Ordering::Relaxed),
                }
                result
            }));
        }
        let downloads = futures::stream::iter(jobs)
            .buffer_unordered(MAX_DOWNLOADS)
            .collect::<Vec<Result<()>>>();
        let unpacks = async {
            for i in present..chains.len() {
                if let Some(rx) = done.remove(&i) {
                    // The download failed when this ends without a signal: its own error says why.
                    if rx.await.is_err() {
                        failed.store(true, std::sync::atomic::Ordering::Relaxed);
                        return Ok(());
                    }
                }
                if tee == Some(i) {
                    continue;
                }
                let desc = &img.manifest.layers[i];
                let src = ContentClient::new(self.channel.clone())
                    .read(self.req(
                        ReadContentRequest {
                            digest: desc.digest.clone(),
                            offset: 0,
                            size: 0,
                        },
                        Some(lease),
                    ))
                    .await
                    .map_err(cd_err(format!("read content {}", desc.digest)))?
                    .into_inner();
                let l = Layer {
                    unpack: true,
                    ..layer(i)
                };
                if let Err(e) = self.layer(l, Source::Content(Box::new(src))).await {
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    return Err(e);
                }
                fault_point("containerd-pull:layer-committed");
            }
            Ok::<_, Error>(())
        };
        let (downloaded, unpacked) = tokio::join!(downloads, unpacks);
        for r in downloaded {
            r?;
        }
        unpacked?;
        out.fetched = missing
            .iter()
            .map(|&i| img.manifest.layers[i].digest.clone())
            .collect();
        out.skipped = chains[..present].to_vec();
        out.unpacked = chains[present..].to_vec();

        let mut config_labels = HashMap::from([source.clone()]);
        if let Some(top) = chains.last() {
            config_labels.insert(
                format!(
                    "containerd.io/gc.ref.snapshot.{}",
                    self.endpoint.snapshotter
                ),
                top.clone(),
            );
        }
        self.put_document(&img.config, img.config_digest(), config_labels, lease)
            .await?;
        let mut manifest_labels = HashMap::from([
            source.clone(),
            (
                "containerd.io/gc.ref.content.config".to_string(),
                img.config_digest().to_string(),
            ),
        ]);
        for (i, l) in img.manifest.layers.iter().enumerate() {
            manifest_labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest.clone(),
            );
        }
        self.put_document(
            &img.manifest_bytes,
            &img.manifest_digest,
            manifest_labels,
            lease,
        )
        .await?;
        let target = match &img.index {
            Some(index) => {
                let doc: crate::image::Document = serde_json::from_slice(&index.bytes)
                    .map_err(|e| pull_error(r, format!("index {}: {e}", index.digest)))?;
                let pos = doc
                    .manifests
                    .unwrap_or_default()
                    .iter()
                    .position(|m| m.digest == img.manifest_digest)
                    .ok_or_else(|| {
                        pull_error(
                            r,
                            format!(
                                "index {} does not list manifest {}",
                                index.digest, img.manifest_digest
                            ),
                        )
                    })?;
                let labels = HashMap::from([
                    source.clone(),
                    (
                        format!("containerd.io/gc.ref.content.m.{pos}"),
                        img.manifest_digest.clone(),
                    ),
                ]);
                self.put_document(&index.bytes, &index.digest, labels, lease)
                    .await?;
                Descriptor {
                    media_type: index.media_type.clone(),
                    digest: index.digest.clone(),
                    size: index.bytes.len() as i64,
                    annotations: HashMap::new(),
                }
            }
            None => Descriptor {
                media_type: img.manifest_media_type.clone(),
                digest: img.manifest_digest.clone(),
                size: img.manifest_bytes.len() as i64,
                annotations: HashMap::new(),
            },
        };
        fault_point("containerd-pull:content");
        self.put_record(&out.name, target, lease).await?;
        fault_point("containerd-pull:image");
        Ok(out)
    }

    async fn has_snapshot(&self, key: &str) -> Result<bool> {
        match SnapshotsClient::new(self.channel.clone())
            .stat(self.req(
                StatSnapshotRequest {
                    snapshotter: self.endpoint.snapshotter.clone(),
                    key: key.to_string(),
                },
                None,
            ))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(cd_err(format!("stat snapshot {key}"))(s)),
        }
    }

    async fn blob_info(&self, digest: &str, lease: &str) -> Result<Option<Info>> {
        match ContentClient::new(self.channel.clone())
            .info(self.req(
                InfoRequest {
                    digest: digest.to_string(),
                },
                Some(lease),
            ))
            .await
        {
            Ok(r) => Ok(r.into_inner().info),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(cd_err(format!("content info {digest}"))(s)),
        }
    }

    /// Gives an existing blob the labels it lacks; a distribution-source label gains the
    /// repository in its comma-separated list.
    async fn ensure_labels(
        &self,
        info: &Info,
        want: &HashMap<String, String>,
        lease: &str,
    ) -> Result<()> {
        let mut set = HashMap::new();
        for (k, v) in want {
            let new = match info.labels.get(k) {
                Some(old) if k.starts_with("containerd.io/distribution.source.") => {
                    if old.split(',').any(|r| r == v) {
                        continue;
                    }
                    format!("{old},{v}")
                }
                Some(old) if old == v => continue,
                _ => v.clone(),
            };
            set.insert(k.clone(), new);
        }
        if set.is_empty() {
            return Ok(());
        }
        let paths = set.keys().map(|k| format!("labels.{k}")).collect();
        ContentClient::new(self.channel.clone())
            .update(self.req(
                UpdateRequest {
                    info: Some(Info {
                        digest: info.digest.clone(),
                        labels: set,
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask { paths }),
                },
                Some(lease),
            ))
            .await
            .map_err(cd_err(format!("label content {}", info.digest)))?;
        Ok(())
    }

    /// Stores a manifest, index or config (a few KiB, held whole) with `labels`, or gives the
    /// stored blob the labels it lacks.
    async fn put_document(
        &self,
        data: &[u8],
        digest: &str,
        labels: HashMap<String, String>,
        lease: &str,
    ) -> Result<()> {
        if let Some(info) = self.blob_info(digest, lease).await? {
            return self.ensure_labels(&info, &labels, lease).await;
        }
        if sha256(data) != digest {
            return Err(Error::BadImage {
                image: digest.to_string(),
                message: "content does not match its digest".into(),
            });
        }
        let r#ref = format!("{INGEST_PREFIX}doc-{}-{}", &digest[7..19], token());
        let msgs = vec![WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref,
            total: data.len() as i64,
            expected: digest.to_string(),
            offset: 0,
            data: data.to_vec(),
            labels,
        }];
        let written = async {
            let mut s = ContentClient::new(self.channel.clone())
                .write(self.req(futures::stream::iter(msgs), Some(lease)))
                .await?
                .into_inner();
            while s.message().await?.is_some() {}
            Ok::<_, tonic::Status>(())
        }
        .await;
        match written {
            Err(s) if s.code() != Code::AlreadyExists => {
                Err(cd_err(format!("write content {digest}"))(s))
            }
            _ => Ok(()),
        }
    }

    /// Streams one layer from `src` into the content store (when `labels` is set: the blob is
    /// missing) and, when `unpack`, into a new snapshot committed under its chainID.
    async fn layer(&self, l: Layer<'_>, mut src: Source) -> Result<()> {
        let r = l.reference;
        let digest = l.desc.digest.clone();
        // The unpacker: a prepared snapshot and a blocking task applying the stream into it.
        let mut unpacker = None;
        if l.unpack {
            let key = format!("{UNPACK_PREFIX}{}-{}", &l.chain[7..19], token());
            let prepared = SnapshotsClient::new(self.channel.clone())
                .prepare(self.req(
                    PrepareSnapshotRequest {
                        snapshotter: self.endpoint.snapshotter.clone(),
                        key: key.clone(),
                        parent: l.parent.to_string(),
                        labels: HashMap::from([(
                            crate::OWNER_LABEL.to_string(),
                            l.owner.to_string(),
                        )]),
                    },
                    Some(l.lease),
                ))
                .await
                .map_err(cd_err(format!("prepare snapshot for {}", l.chain)))?
                .into_inner();
            let upper = writable_dir(&prepared.mounts).ok_or_else(|| Error::Containerd {
                what: format!("prepare snapshot for {}", l.chain),
                code: Code::Unimplemented,
                message: format!(
                    "snapshotter {} returned mounts berth cannot write into: {:?}",
                    self.endpoint.snapshotter, prepared.mounts
                ),
            })?;
            let compression = registry::Compression::from_media_type(&l.desc.media_type)
                .ok_or_else(|| {
                    pull_error(
                        r,
                        format!(
                            "layer {digest}: unsupported media type {:?}",
                            l.desc.media_type
                        ),
                    )
                })?;
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(CHANNEL_CHUNKS);
            let (diff_id, what) = (
                l.diff_id.to_string(),
                format!("pull {r}: layer {digest} (diffID {})", l.diff_id),
            );
            let task = tokio::task::spawn_blocking(move || -> std::result::Result<(), String> {
                let reader = ChunkReader {
                    rx,
                    buf: Bytes::new(),
                };
                let mut verified =
                    registry::LayerVerifier::decompressed(reader, compression, &diff_id, what)
                        .map_err(|e| e.to_string())?;
                layerstore::tar::apply_layer(
                    &mut verified,
                    &upper,
                    None,
                    &layerstore::tar::ApplyOptions::default(),
                )
                .map_err(|e| e.to_string())?;
                // The rest (tar padding) and the diffID check at the end.
                io::copy(&mut verified, &mut io::sink()).map_err(|e| e.to_string())?;
                Ok(())
            });
            unpacker = Some((key, tx, task));
        }

        // The content writer: WRITEs with the running offset, then a COMMIT stating the total.
        let ingest = format!(
            "{INGEST_PREFIX}{}-{}-{}",
            owner_tag(l.owner),
            &digest[7..19],
            token()
        );
        let (wtx, mut wrx) = tokio::sync::mpsc::channel::<WriteContentRequest>(CHANNEL_CHUNKS);
        let writing = l.labels.is_some();
        let writer = async {
            if !writing {
                return Ok(());
            }
            let msgs = futures::stream::poll_fn(move |cx| wrx.poll_recv(cx));
            let mut s = ContentClient::new(self.channel.clone())
                .write(self.req(msgs, Some(l.lease)))
                .await?
                .into_inner();
            while s.message().await?.is_some() {}
            Ok::<_, tonic::Status>(())
        };
        let mut apply_tx = unpacker.as_ref().map(|(_, tx, _)| tx.clone());
        let pump = async {
            let mut offset = 0i64;
            let mut halfway = false;
            loop {
                let chunk = match src.next().await {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(e) => return Err(e),
                };
                let n = chunk.len() as i64;
                if let Some(tx) = &apply_tx {
                    if tx.send(chunk.clone()).await.is_err() {
                        // The unpacker stopped early: its own error says why.
                        return Err(String::new());
                    }
                }
                if writing {
                    let m = WriteContentRequest {
                        action: WriteAction::Write as i32,
                        r#ref: ingest.clone(),
                        offset,
                        data: chunk.to_vec(),
                        ..Default::default()
                    };
                    if wtx.send(m).await.is_err() {
                        return Err("containerd ended the blob write".into());
                    }
                }
                offset += n;
                if l.unpack && !halfway && offset as u64 >= l.desc.size / 2 {
                    halfway = true;
                    fault_point("containerd-pull:mid-layer");
                }
            }
            // The whole blob arrived and matched its digest: end the unpacker's input.
            apply_tx = None;
            if writing {
                let m = WriteContentRequest {
                    action: WriteAction::Commit as i32,
                    r#ref: ingest.clone(),
                    total: offset,
                    expected: digest.clone(),
                    offset,
                    labels: l.labels.clone().unwrap_or_default(),
                    ..Default::default()
                };
                if wtx.send(m).await.is_err() {
                    return Err("containerd ended the blob write".into());
                }
            }
            drop(wtx);
            Ok(())
        };
        let (pumped, written) = tokio::join!(pump, writer);
        // The unpacker's verdict (its input is closed once the pump ended).
        let mut applied = Ok(());
        let mut key = None;
        if let Some((k, tx, task)) = unpacker {
            drop(tx);
            key = Some(k);
            applied = task
                .await
                .unwrap_or_else(|e| Err(format!("unpacker task: {e}")));
        }
        let failure = match (&pumped, &written, &applied) {
            (Err(e), _, _) if !e.is_empty() => Some(format!("layer {digest}: {e}")),
            (_, _, Err(e)) => Some(format!("unpack layer {digest}: {e}")),
            (_, Err(s), _) if s.code() != Code::AlreadyExists => Some(format!(
                "write layer blob {digest} into containerd: {:?}: {}",
                s.code(),
                s.message()
            )),
            (Err(_), _, _) => Some(format!("layer {digest}: stream ended early")),
            _ => None,
        };
        if let Some(message) = failure {
            if writing {
                let _ = ContentClient::new(self.channel.clone())
                    .abort(self.req(AbortRequest { r#ref: ingest }, Some(l.lease)))
                    .await;
            }
            if let Some(k) = key {
                self.remove_prepared(&k, l.lease).await;
            }
            return Err(pull_error(r, message));
        }
        let Some(key) = key else { return Ok(()) };
        let committed = SnapshotsClient::new(self.channel.clone())
            .commit(self.req(
                CommitSnapshotRequest {
                    snapshotter: self.endpoint.snapshotter.clone(),
                    name: l.chain.to_string(),
                    key: key.clone(),
                    labels: HashMap::from([(
                        "containerd.io/snapshot.ref".to_string(),
                        l.chain.to_string(),
                    )]),
                },
                Some(l.lease),
            ))
            .await;
        match committed {
            Ok(_) => Ok(()),
            // A concurrent unpack (another process) committed the same chainID first.
            Err(s) if s.code() == Code::AlreadyExists => {
                self.remove_prepared(&key, l.lease).await;
                Ok(())
            }
            Err(s) => {
                self.remove_prepared(&key, l.lease).await;
                Err(cd_err(format!("commit snapshot {}", l.chain))(s))
            }
        }
    }

    async fn remove_prepared(&self, key: &str, lease: &str) {
        let removed = SnapshotsClient::new(self.channel.clone())
            .remove(self.req(
                RemoveSnapshotRequest {
                    snapshotter: self.endpoint.snapshotter.clone(),
                    key: key.to_string(),
                },
                Some(lease),
            ))
            .await;
        if let Err(s) = removed {
            tracing::warn!(key, status = %s, "could not remove a prepared snapshot; removed at the next start");
        }
    }

    /// Creates the image record `name` → `target`, or moves an existing one (its previous
    /// image kept as dangling when no other record names it).
    async fn put_record(&self, name: &str, target: Descriptor, lease: &str) -> Result<()> {
        let mut images = ImagesClient::new(self.channel.clone());
        let image = Image {
            name: name.to_string(),
            labels: HashMap::new(),
            target: Some(target.clone()),
            created_at: None,
            updated_at: None,
        };
        let old = match images
            .get(self.req(
                GetImageRequest {
                    name: name.to_string(),
                },
                Some(lease),
            ))
            .await
        {
            Ok(r) => r.into_inner().image.and_then(|i| i.target),
            Err(s) if s.code() == Code::NotFound => None,
            Err(s) => return Err(cd_err(format!("get image {name}"))(s)),
        };
        match old {
            Some(old) if old.digest == target.digest => return Ok(()),
            Some(old) => {
                images
                    .update(self.req(
                        UpdateImageRequest {
                            image: Some(image),
                            update_mask: None,
                            source_date_epoch: None,
                        },
                        Some(lease),
                    ))
                    .await
                    .map_err(cd_err(format!("update image {name}")))?;
                let others = images
                    .list(self.req(
                        ListImagesRequest {
                            filters: vec![format!("target.digest=={}", old.digest)],
                        },
                        Some(lease),
                    ))
                    .await
                    .map_err(cd_err("list images"))?
                    .into_inner()
                    .images;
                if others.is_empty() {
                    let dangling = Image {
                        name: format!("{DANGLING_PREFIX}{}", old.digest),
                        labels: HashMap::new(),
                        target: Some(old),
                        created_at: None,
                        updated_at: None,
                    };
                    match images
                        .create(self.req(
                            CreateImageRequest {
                                image: Some(dangling),
                                source_date_epoch: None,
                            },
                            Some(lease),
                        ))
                        .await
                    {
                        Ok(_) => {}
                        Err(s) if s.code() == Code::AlreadyExists => {}
                        Err(s) => return Err(cd_err("create dangling image")(s)),
                    }
                }
            }
            None => {
                match images
                    .create(self.req(
                        CreateImageRequest {
                            image: Some(image),
                            source_date_epoch: None,
                        },
                        Some(lease),
                    ))
                    .await
                {
                    Ok(_) => {}
                    // A concurrent pull of the same name (another berthd or Docker) won.
                    Err(s) if s.code() == Code::AlreadyExists => {}
                    Err(s) => return Err(cd_err(format!("create image {name}"))(s)),
                }
            }
        }
        Ok(())
    }

    /// Aborts the unfinished blob writes of `owner`'s pulls (a killed berthd's).
    pub(crate) async fn abort_pull_ingests(&self, owner: &str) -> Result<usize> {
        let prefix = format!("{INGEST_PREFIX}{}-", owner_tag(owner));
        let mut content = ContentClient::new(self.channel.clone());
        let statuses = content
            .list_statuses(self.req(ListStatusesRequest { filters: vec![] }, None))
            .await
            .map_err(cd_err("list content ingests"))?
            .into_inner()
            .statuses;
        let mut n = 0;
        for s in statuses
            .into_iter()
            .filter(|s| s.r#ref.starts_with(&prefix))
        {
            match content
                .abort(self.req(
                    AbortRequest {
                        r#ref: s.r#ref.clone(),
                    },
                    None,
                ))
                .await
            {
                Ok(_) => n += 1,
                Err(st) if st.code() == Code::NotFound => {}
                Err(st) => return Err(cd_err(format!("abort ingest {}", s.r#ref))(st)),
            }
        }
        Ok(n)
    }
}

/// One layer of a pull, for [`Client::layer`].
struct Layer<'a> {
    reference: &'a registry::Reference,
    desc: &'a registry::Descriptor,
    diff_id: &'a str,
    chain: &'a str,
    parent: &'a str,
    /// The blob's labels when it must be written (it is missing).
    labels: Option<HashMap<String, String>>,
    unpack: bool,
    owner: &'a str,
    lease: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_names_as_docker_26() {
        let name = |s: &str| record_name(&registry::Reference::parse(s).unwrap());
        assert_eq!(name("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(name("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(
            name("127.0.0.1:5000/explore/bb:v1"),
            "127.0.0.1:5000/explore/bb:v1"
        );
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            name(&format!("localhost:5000/a/b@{d}")),
            format!("localhost:5000/a/b@{d}")
        );
        assert_eq!(
            name(&format!("busybox:1@{d}")),
            format!("docker.io/library/busybox@{d}")
        );
    }

    #[test]
    fn distribution_source_key_has_no_port() {
        let r = registry::Reference::parse("127.0.0.1:33379/explore/bb:v1").unwrap();
        assert_eq!(
            source_label(&r),
            (
                "containerd.io/distribution.source.127.0.0.1".to_string(),
                "explore/bb".to_string()
            )
        );
        let r = registry::Reference::parse("busybox").unwrap();
        assert_eq!(
            source_label(&r).0,
            "containerd.io/distribution.source.docker.io"
        );
    }

    #[test]
    fn chunk_reader_reads_across_chunks() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.try_send(Bytes::from_static(b"abc")).unwrap();
        tx.try_send(Bytes::from_static(b"")).unwrap();
        tx.try_send(Bytes::from_static(b"defg")).unwrap();
        drop(tx);
        let mut r = ChunkReader {
            rx,
            buf: Bytes::new(),
        };
        let mut out = String::new();
        r.read_to_string(&mut out).unwrap();
        assert_eq!(out, "abcdefg");
    }
}
