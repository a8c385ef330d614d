//! Export into a containerd image store (Docker 24+ with the containerd snapshotter, the default
//! on Engine 29), live, through containerd's own API.
//!
//! For each layer whose chainID has no snapshot yet, a snapshot is prepared on top of its parent,
//! the layer's files are written straight into the prepared upper directory (overlay whiteout
//! format, which the overlayfs snapshotter uses too) and the snapshot is committed under the
//! chainID — the new bytes are written once, and nothing re-hashes them. Present chainIDs are
//! skipped. The image config and an OCI manifest are ingested into the content store with the GC
//! labels containerd expects (manifest → config and layers, config → top snapshot), then the
//! image record is created. All of it happens under a lease, so a crash at any point leaves only
//! garbage that containerd's GC collects; the record is the last write. See
//! `shared/spec/docker-store.md` §5.
//!
//! Docker names images itself: the caller gives the record name (for Docker, the dangling name
//! `moby-dangling@<manifest digest>`) and applies tags through the Docker Engine API afterwards.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    content_client::ContentClient, images_client::ImagesClient, leases_client::LeasesClient,
    CreateImageRequest, Image, InfoRequest, UpdateImageRequest, WriteAction, WriteContentRequest,
};
use containerd_client::services::v1::{
    CreateRequest as LeaseCreate, DeleteRequest as LeaseDelete, ListRequest as LeaseList,
};
use containerd_client::types::Descriptor;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::docker_load::chain_ids;
use crate::image::ImageConfig;
use crate::{Error, Result};
use layerstore::dockerstore::fault_point;

/// Media type of the manifest berth writes.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of the config.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of an uncompressed layer.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";

/// Writes a layer's files, in overlay format, into an empty directory.
pub trait LayerFiles: Send + Sync {
    /// Fills `dest` (an empty snapshot upper directory) with the layer's tree.
    fn write_into(&self, dest: &Path) -> std::io::Result<()>;

    /// Whether [`LayerFiles::write_into_with_tar`] gives the layer's tar (default: no).
    fn gives_tar(&self) -> bool {
        false
    }

    /// [`LayerFiles::write_into`], and in the same pass the layer's tar (whose sha256 is its
    /// diffID) to `tar`, for sources that make the tree from their tar ([`LayerFiles::gives_tar`]);
    /// the default writes only the tree.
    fn write_into_with_tar(
        &self,
        dest: &Path,
        tar: &mut (dyn std::io::Write + Send),
    ) -> std::io::Result<()> {
        let _ = tar;
        self.write_into(dest)
    }
}

/// One layer of an image exported to containerd, bottom to top.
#[derive(Clone)]
pub struct ContainerdLayer {
    /// `sha256:<hex>` of the layer's uncompressed tar.
    pub diff_id: String,
    /// Size of the uncompressed tar.
    pub size: u64,
    /// Its files, when berth holds them; `None` for layers containerd must already have.
    pub files: Option<Arc<dyn LayerFiles>>,
    /// Its tar, when berth holds it: stored as an uncompressed blob (digest = diffID) in the
    /// content store when that blob is missing, so `docker save` and `docker push` find it.
    pub tar: Option<Arc<dyn crate::LayerSource>>,
    /// The blob a layer of the Engine's store already has in the content store (a base image's
    /// layer): the manifest references it as it is.
    pub blob: Option<layerstore::snapshot::BlobDescriptor>,
}

/// Size of the chunks a layer tar is streamed to containerd's content store in.
const CHUNK: usize = 1 << 20;

/// An `io::Write` that hands full chunks to an async receiver.
struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::other("content write ended"))
    }
}

/// What an export into containerd did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerdReport {
    /// Manifest digest (Docker's image ID in this store).
    pub manifest_digest: String,
    /// Config digest.
    pub config_digest: String,
    /// chainIDs committed as new snapshots.
    pub snapshots_written: Vec<String>,
    /// chainIDs that were already present.
    pub snapshots_skipped: Vec<String>,
}

/// A containerd instance and the namespace/snapshotter an image store uses.
#[derive(Debug, Clone)]
pub struct ContainerdStore {
    channel: Channel,
    namespace: String,
    snapshotter: String,
    owner: String,
}

/// Label on berth's export leases and prepared snapshots naming the berthd instance that made
/// them, so that instance removes its own leftovers ([`ContainerdStore::remove_leftovers`]).
pub const OWNER_LABEL: &str = "berth.dev/export-owner";
/// Prefix of the keys of snapshots berth prepares to write a layer into.
const EXTRACT_PREFIX: &str = "berth-extract-";

/// What [`ContainerdStore::remove_leftovers`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerdLeftovers {
    /// Export leases deleted.
    pub leases: usize,
    /// Prepared (never committed) snapshots removed.
    pub snapshots: usize,
}

#[derive(Serialize)]
struct OciDescriptor<'a> {
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    digest: &'a str,
    size: u64,
}

#[derive(Serialize)]
struct OciManifest<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    config: OciDescriptor<'a>,
    layers: Vec<OciDescriptor<'a>>,
}

/// The OCI manifest berth writes for an image: uncompressed layers, digests = diffIDs.
pub fn oci_manifest(config: &ImageConfig, layers: &[(String, u64)]) -> Vec<u8> {
    let descs: Vec<(String, String, u64)> = layers
        .iter()
        .map(|(d, n)| (LAYER_MEDIA_TYPE.to_string(), d.clone(), *n))
        .collect();
    oci_manifest_with(config, &descs)
}

/// The layer descriptors (media type, digest, size) of an export into containerd: a base
/// layer's existing blob, else the uncompressed tar (digest = diffID).
pub fn layer_descriptors(layers: &[ContainerdLayer]) -> Vec<(String, String, u64)> {
    layers
        .iter()
        .map(|l| match &l.blob {
            Some(b) => (b.media_type.clone(), b.digest.clone(), b.size),
            None => (LAYER_MEDIA_TYPE.to_string(), l.diff_id.clone(), l.size),
        })
        .collect()
}

/// The OCI manifest with the given layer descriptors (media type, digest, size).
pub fn oci_manifest_with(config: &ImageConfig, layers: &[(String, String, u64)]) -> Vec<u8> {
    let m = OciManifest {
        schema_version: 2,
        media_type: MANIFEST_MEDIA_TYPE,
        config: OciDescriptor {
            media_type: CONFIG_MEDIA_TYPE,
            digest: &config.digest,
            size: config.bytes.len() as u64,
        },
        layers: layers
            .iter()
            .map(|(m, d, s)| OciDescriptor {
                media_type: m,
                digest: d,
                size: *s,
            })
            .collect(),
    };
    serde_json::to_vec(&m).expect("manifest serialises")
}

/// 16 hex digits unique to this call (process id, time and a counter, hashed).
fn unique_token() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let seed = format!(
        "{}-{:?}-{n}",
        std::process::id(),
        std::time::SystemTime::now()
    );
    sha256(seed.as_bytes())[7..23].to_string()
}

/// The outcome of a layer blob's stream: a blob another writer stored first is success.
fn blob_written(
    sent: std::result::Result<(), tonic::Status>,
    diff_id: &str,
    size: u64,
) -> Result<()> {
    match sent {
        Err(s) if s.code() != Code::AlreadyExists => {
            Err(cd_err(format!("write layer blob {diff_id} ({size} bytes)"))(s))
        }
        _ => Ok(()),
    }
}

/// Logs how long a phase of an export into containerd took (debug, target
/// `exporter::containerd`: `BERTHD_LOG=exporter::containerd=debug`).
fn phase(name: &'static str, started: Instant) {
    tracing::debug!(
        phase = name,
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "containerd export phase"
    );
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn cd_err(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> Error {
    let what = what.into();
    move |status| Error::Containerd {
        what,
        code: status.code(),
        message: status.message().to_string(),
    }
}

impl ContainerdStore {
    /// Connects to containerd's socket.
    pub async fn connect(socket: &Path, namespace: &str, snapshotter: &str) -> Result<Self> {
        let channel = containerd_client::connect(socket)
            .await
            .map_err(|e| Error::Containerd {
                what: format!("connect {}", socket.display()),
                code: Code::Unavailable,
                message: e.to_string(),
            })?;
        Ok(ContainerdStore {
            channel,
            namespace: namespace.into(),
            snapshotter: snapshotter.into(),
            owner: format!("pid-{}", std::process::id()),
        })
    }

    /// Names the berthd instance whose leases and prepared snapshots this store makes (default:
    /// this process). A restarted instance passes the same owner to
    /// [`ContainerdStore::remove_leftovers`].
    pub fn with_owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = owner.into();
        self
    }

    /// Removes what an export of this owner left when its process died: its leases (whose
    /// content and committed-but-unreferenced snapshots containerd's GC then collects) and the
    /// snapshots it had prepared but not committed. Call when berthd starts, before any export.
    pub async fn remove_leftovers(&self) -> Result<ContainerdLeftovers> {
        let mut out = ContainerdLeftovers::default();
        let mut leases = LeasesClient::new(self.channel.clone());
        let filter = format!("labels.\"{OWNER_LABEL}\"=={}", self.owner);
        let list = leases
            .list(self.req(
                LeaseList {
                    filters: vec![filter],
                },
                None,
            ))
            .await
            .map_err(cd_err("list leases"))?
            .into_inner();
        out.snapshots = containerdstore::remove_snapshots(
            &self.channel,
            &self.namespace,
            &self.snapshotter,
            (OWNER_LABEL, &self.owner),
            EXTRACT_PREFIX,
        )
        .await?;
        for lease in list.leases {
            match leases
                .delete(self.req(
                    LeaseDelete {
                        id: lease.id.clone(),
                        sync: true,
                    },
                    None,
                ))
                .await
            {
                Ok(_) => out.leases += 1,
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(cd_err(format!("delete lease {}", lease.id))(s)),
            }
        }
        Ok(out)
    }

    fn req<T>(&self, msg: T, lease: Option<&str>) -> Request<T> {
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        md.insert(
            "containerd-namespace",
            self.namespace.parse().expect("namespace is ascii"),
        );
        if let Some(l) = lease {
            md.insert("containerd-lease", l.parse().expect("lease id is ascii"));
        }
        r
    }

    /// Exports an image: snapshots for missing layers, config and manifest content, then the
    /// image record `record_name` pointing at the manifest.
    pub async fn export(
        &self,
        config: &ImageConfig,
        layers: &[ContainerdLayer],
        record_name: &str,
    ) -> Result<ContainerdReport> {
        // Test hook: the build's solve is over (its op graph dropped), nothing exported yet.
        layerstore::dockerstore::fault::hold_point("containerd-export:start").await;
        let lease_id = format!("berth-export-{}", unique_token());
        let mut leases = LeasesClient::new(self.channel.clone());
        let mut labels = HashMap::new();
        // Expire on its own if berthd dies before deleting it.
        let expire = chrono::Utc::now() + chrono::Duration::hours(1);
        labels.insert(
            "containerd.io/gc.expire".to_string(),
            expire.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        );
        labels.insert(OWNER_LABEL.to_string(), self.owner.clone());
        let t = Instant::now();
        leases
            .create(self.req(
                LeaseCreate {
                    id: lease_id.clone(),
                    labels,
                },
                None,
            ))
            .await
            .map_err(cd_err("create lease"))?;
        phase("lease-create", t);
        fault_point("containerd:lease");
        let result = self
            .export_leased(config, layers, record_name, &lease_id)
            .await;
        let t = Instant::now();
        let deleted = leases
            .delete(self.req(
                LeaseDelete {
                    id: lease_id.clone(),
                    sync: false,
                },
                None,
            ))
            .await;
        phase("lease-delete", t);
        if let Err(status) = deleted {
            tracing::warn!(lease = %lease_id, %status, "could not delete export lease; it expires on its own");
        }
        result
    }

    async fn export_leased(
        &self,
        config: &ImageConfig,
        layers: &[ContainerdLayer],
        record_name: &str,
        lease: &str,
    ) -> Result<ContainerdReport> {
        let chains = chain_ids(layers.iter().map(|l| l.diff_id.as_str()))?;
        let mut report = ContainerdReport {
            config_digest: config.digest.clone(),
            ..Default::default()
        };
        let top = chains.last().cloned().unwrap_or_default();
        let mut config_labels = HashMap::new();
        if !top.is_empty() {
            config_labels.insert(
                format!("containerd.io/gc.ref.snapshot.{}", self.snapshotter),
                top,
            );
        }
        let layer_descs = layer_descriptors(layers);
        let manifest = oci_manifest_with(config, &layer_descs);
        let manifest_digest = sha256(&manifest);
        let mut manifest_labels = HashMap::new();
        manifest_labels.insert(
            "containerd.io/gc.ref.content.config".to_string(),
            config.digest.clone(),
        );
        for (i, (_, d, _)) in layer_descs.iter().enumerate() {
            manifest_labels.insert(format!("containerd.io/gc.ref.content.l.{i}"), d.clone());
        }

        // Everything below the image record is independent and held by the lease (GC labels
        // may name what is not written yet): the new layers (snapshots and tar blobs) and the
        // config and manifest are written at once. A new layer's snapshot and blob come from
        // one pass over its files: the tar that fills the snapshot streams into the content
        // store too. containerd commits each write in its own metadata transaction, one after
        // another, so the small config and manifest wait until the first snapshot is
        // prepared: the big layer copy starts first. Each branch cleans up after itself, so all
        // are awaited even when one fails.
        let started = Instant::now();
        let (prepared_tx, prepared_rx) = tokio::sync::oneshot::channel();
        let new_layers = async {
            let t = Instant::now();
            // Layer blobs berth holds and the content store lacks (docker save/push read them).
            let mut blob_needed = Vec::with_capacity(layers.len());
            for l in layers {
                blob_needed.push(
                    l.blob.is_none()
                        && l.tar.is_some()
                        && !self.has_blob(&l.diff_id, lease).await?,
                );
            }
            let (written, skipped, streamed) = self
                .write_snapshots(layers, &chains, lease, prepared_tx, &blob_needed)
                .await?;
            phase("snapshots", t);
            // Blobs of layers whose snapshot was there already.
            for ((l, needed), done) in layers.iter().zip(&blob_needed).zip(&streamed) {
                if let (true, false, Some(tar)) = (*needed, *done, &l.tar) {
                    self.write_tar_blob(&l.diff_id, l.size, tar.clone(), lease)
                        .await?;
                }
            }
            fault_point("containerd:layer-blobs");
            phase("layers", t);
            Ok::<_, Error>((written, skipped))
        };
        let small = async {
            // Sent after the first prepare, or dropped when there is none (or it failed).
            let _ = prepared_rx.await;
            let config_written = async {
                let t = Instant::now();
                self.write_blob(&config.bytes, &config.digest, config_labels, lease)
                    .await?;
                fault_point("containerd:config");
                phase("config", t);
                Ok::<_, Error>(())
            };
            let manifest_written = async {
                let t = Instant::now();
                self.write_blob(&manifest, &manifest_digest, manifest_labels, lease)
                    .await?;
                fault_point("containerd:manifest");
                phase("manifest", t);
                Ok::<_, Error>(())
            };
            let (c, m) = tokio::join!(config_written, manifest_written);
            c.and(m)
        };
        let (new_layers, small) = tokio::join!(new_layers, small);
        (report.snapshots_written, report.snapshots_skipped) = new_layers?;
        small?;
        phase("content", started);

        let t = Instant::now();
        let image = Image {
            name: record_name.to_string(),
            labels: HashMap::new(),
            target: Some(Descriptor {
                media_type: MANIFEST_MEDIA_TYPE.into(),
                digest: manifest_digest.clone(),
                size: manifest.len() as i64,
                annotations: HashMap::new(),
            }),
            created_at: None,
            updated_at: None,
        };
        let mut images = ImagesClient::new(self.channel.clone());
        // Create first (the usual case); a record of that name already there is updated.
        let created = images
            .create(self.req(
                CreateImageRequest {
                    image: Some(image.clone()),
                    source_date_epoch: None,
                },
                Some(lease),
            ))
            .await;
        match created {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {
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
                    .map_err(cd_err(format!("update image {record_name}")))?;
            }
            Err(s) => return Err(cd_err(format!("create image {record_name}"))(s)),
        }
        fault_point("containerd:image");
        phase("image", t);
        report.manifest_digest = manifest_digest;
        Ok(report)
    }

    /// Commits a snapshot under its chainID for each layer whose chainID has none yet, bottom
    /// to top; returns the chainIDs written and those already present.
    /// `first_prepared` is sent once the first snapshot is prepared. The tar blob of a layer
    /// whose `blob_needed` is set is streamed into the content store while its snapshot is
    /// written, when its files can give their tar in the same pass; the third list says for
    /// which layers that happened.
    async fn write_snapshots(
        &self,
        layers: &[ContainerdLayer],
        chains: &[String],
        lease: &str,
        first_prepared: tokio::sync::oneshot::Sender<()>,
        blob_needed: &[bool],
    ) -> Result<(Vec<String>, Vec<String>, Vec<bool>)> {
        let mut first_prepared = Some(first_prepared);
        let (mut written, mut skipped) = (Vec::new(), Vec::new());
        let mut streamed = vec![false; layers.len()];
        let mut snaps = SnapshotsClient::new(self.channel.clone());
        for (i, (layer, chain)) in layers.iter().zip(chains).enumerate() {
            let stat = snaps
                .stat(self.req(
                    StatSnapshotRequest {
                        snapshotter: self.snapshotter.clone(),
                        key: chain.clone(),
                    },
                    Some(lease),
                ))
                .await;
            match stat {
                Ok(_) => {
                    skipped.push(chain.clone());
                    continue;
                }
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(cd_err(format!("stat snapshot {chain}"))(s)),
            }
            let files = layer
                .files
                .as_ref()
                .ok_or_else(|| Error::LayerUnavailable {
                    diff_id: layer.diff_id.clone(),
                })?;
            let parent = if i == 0 {
                String::new()
            } else {
                chains[i - 1].clone()
            };
            // Unique per export: concurrent exports of the same layer each write their own
            // snapshot, and the first commit wins.
            let key = format!("{EXTRACT_PREFIX}{}-{}", &chain[7..19], unique_token());
            let t = Instant::now();
            let prepared = snaps
                .prepare(self.req(
                    PrepareSnapshotRequest {
                        snapshotter: self.snapshotter.clone(),
                        key: key.clone(),
                        parent,
                        labels: HashMap::from([(OWNER_LABEL.to_string(), self.owner.clone())]),
                    },
                    Some(lease),
                ))
                .await
                .map_err(cd_err(format!("prepare snapshot for {chain}")))?
                .into_inner();
            phase("snapshot-prepare", t);
            if let Some(p) = first_prepared.take() {
                let _ = p.send(());
            }
            let upper = writable_dir(&prepared.mounts).ok_or_else(|| Error::Containerd {
                what: format!("prepare snapshot for {chain}"),
                code: Code::Unimplemented,
                message: format!(
                    "snapshotter {} returned mounts berth cannot write into",
                    self.snapshotter
                ),
            })?;
            fault_point("containerd:snapshot-prepared");
            let t = Instant::now();
            let files = files.clone();
            let with_blob = blob_needed[i] && files.gives_tar();
            let written_into = if with_blob {
                let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
                let producer = tokio::task::spawn_blocking(move || {
                    let mut w = ChunkWriter {
                        tx,
                        buf: Vec::with_capacity(CHUNK),
                    };
                    files.write_into_with_tar(&upper, &mut w)?;
                    std::io::Write::flush(&mut w)
                });
                let sent = self.stream_blob(&layer.diff_id, rx, lease).await;
                match producer.await {
                    Ok(Ok(())) => blob_written(sent, &layer.diff_id, layer.size),
                    // Unless containerd ended the stream: then its answer says why.
                    Ok(Err(_))
                        if sent
                            .as_ref()
                            .is_err_and(|s| s.code() != Code::AlreadyExists) =>
                    {
                        blob_written(sent, &layer.diff_id, layer.size)
                    }
                    Ok(Err(source)) => Err(Error::LayerStream {
                        diff_id: layer.diff_id.clone(),
                        source,
                    }),
                    Err(e) => Err(Error::LayerStream {
                        diff_id: layer.diff_id.clone(),
                        source: std::io::Error::other(e),
                    }),
                }
            } else {
                match tokio::task::spawn_blocking(move || files.write_into(&upper)).await {
                    Ok(r) => r.map_err(|source| Error::LayerStream {
                        diff_id: layer.diff_id.clone(),
                        source,
                    }),
                    Err(e) => Err(Error::LayerStream {
                        diff_id: layer.diff_id.clone(),
                        source: std::io::Error::other(e),
                    }),
                }
            };
            phase("snapshot-write", t);
            if let Err(e) = written_into {
                let _ = snaps
                    .remove(self.req(
                        RemoveSnapshotRequest {
                            snapshotter: self.snapshotter.clone(),
                            key: key.clone(),
                        },
                        Some(lease),
                    ))
                    .await;
                return Err(e);
            }
            streamed[i] = with_blob;
            fault_point("containerd:snapshot-written");
            let t = Instant::now();
            let committed = snaps
                .commit(self.req(
                    CommitSnapshotRequest {
                        snapshotter: self.snapshotter.clone(),
                        name: chain.clone(),
                        key: key.clone(),
                        labels: HashMap::new(),
                    },
                    Some(lease),
                ))
                .await;
            phase("snapshot-commit", t);
            match committed {
                Ok(_) => {
                    fault_point("containerd:snapshot-committed");
                    written.push(chain.clone())
                }
                Err(s) if s.code() == Code::AlreadyExists => {
                    // Another export committed the same chainID meanwhile: drop ours.
                    let _ = snaps
                        .remove(self.req(
                            RemoveSnapshotRequest {
                                snapshotter: self.snapshotter.clone(),
                                key,
                            },
                            Some(lease),
                        ))
                        .await;
                    skipped.push(chain.clone());
                }
                Err(s) => return Err(cd_err(format!("commit snapshot {chain}"))(s)),
            }
        }
        Ok((written, skipped, streamed))
    }

    /// Whether the content store has `digest`.
    async fn has_blob(&self, digest: &str, lease: &str) -> Result<bool> {
        let mut content = ContentClient::new(self.channel.clone());
        match content
            .info(self.req(
                InfoRequest {
                    digest: digest.to_string(),
                },
                Some(lease),
            ))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(cd_err(format!("content info {digest}"))(s)),
        }
    }

    /// Streams a layer's tar into the content store as an uncompressed blob (digest = diffID),
    /// unless it is there already; containerd verifies the digest and size at commit.
    async fn write_tar_blob(
        &self,
        diff_id: &str,
        size: u64,
        tar: Arc<dyn crate::LayerSource>,
        lease: &str,
    ) -> Result<()> {
        if self.has_blob(diff_id, lease).await? {
            return Ok(());
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let producer = tokio::task::spawn_blocking(move || {
            let mut w = ChunkWriter {
                tx,
                buf: Vec::with_capacity(CHUNK),
            };
            tar.write_tar(&mut w)?;
            std::io::Write::flush(&mut w)
        });
        let sent = self.stream_blob(diff_id, rx, lease).await;
        let produced = producer.await.map_err(|e| Error::LayerStream {
            diff_id: diff_id.to_string(),
            source: std::io::Error::other(e),
        })?;
        // The producer's error explains a failed write best (the stream just ended early).
        produced.map_err(|source| Error::LayerStream {
            diff_id: diff_id.to_string(),
            source,
        })?;
        blob_written(sent, diff_id, size)
    }

    /// Writes the chunks `rx` yields into the content store as blob `diff_id`: WRITEs carry
    /// the running offset; the COMMIT after the last one states the total and the digest.
    async fn stream_blob(
        &self,
        diff_id: &str,
        rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
        lease: &str,
    ) -> std::result::Result<(), tonic::Status> {
        let r#ref = format!("berth-{}-{}", &diff_id[7..19], unique_token());
        let expected = diff_id.to_string();
        let msgs = futures::stream::unfold(
            (rx, 0i64, false, r#ref, expected),
            |(mut rx, offset, done, r#ref, expected)| async move {
                if done {
                    return None;
                }
                match rx.recv().await {
                    Some(data) => {
                        let n = data.len() as i64;
                        let m = WriteContentRequest {
                            action: WriteAction::Write as i32,
                            r#ref: r#ref.clone(),
                            offset,
                            data,
                            ..Default::default()
                        };
                        Some((m, (rx, offset + n, false, r#ref, expected)))
                    }
                    None => {
                        let m = WriteContentRequest {
                            action: WriteAction::Commit as i32,
                            r#ref: r#ref.clone(),
                            total: offset,
                            expected: expected.clone(),
                            offset,
                            ..Default::default()
                        };
                        Some((m, (rx, offset, true, r#ref, expected)))
                    }
                }
            },
        );
        let mut content = ContentClient::new(self.channel.clone());
        let mut stream = content
            .write(self.req(msgs, Some(lease)))
            .await?
            .into_inner();
        while stream.message().await?.is_some() {}
        Ok(())
    }

    async fn write_blob(
        &self,
        data: &[u8],
        digest: &str,
        labels: HashMap<String, String>,
        lease: &str,
    ) -> Result<()> {
        let mut content = ContentClient::new(self.channel.clone());
        match content
            .info(self.req(
                InfoRequest {
                    digest: digest.to_string(),
                },
                Some(lease),
            ))
            .await
        {
            Ok(_) => return Ok(()),
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(cd_err(format!("content info {digest}"))(s)),
        }
        let r#ref = format!("berth-{}", &digest[7..]);
        let total = data.len() as i64;
        let msgs = vec![
            WriteContentRequest {
                action: WriteAction::Stat as i32,
                r#ref: r#ref.clone(),
                ..Default::default()
            },
            // Data rides on the commit: containerd truncates a write whose offset is 0 when data
            // is already there, so a separate WRITE would have to carry the running offset.
            WriteContentRequest {
                action: WriteAction::Commit as i32,
                r#ref,
                total,
                expected: digest.to_string(),
                offset: 0,
                data: data.to_vec(),
                labels,
            },
        ];
        let resp = content
            .write(self.req(futures::stream::iter(msgs), Some(lease)))
            .await;
        let drained = match resp {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(_)) => continue,
                        Ok(None) => break Ok(()),
                        Err(s) => break Err(s),
                    }
                }
            }
            Err(s) => Err(s),
        };
        match drained {
            // A concurrent writer stored the same blob first: that is success.
            Err(s) if s.code() != Code::AlreadyExists => {
                Err(cd_err(format!("write content {digest}"))(s))
            }
            _ => Ok(()),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_client::types::Mount;

    #[test]
    fn writable_dir_from_mounts() {
        let overlay = Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![
                "workdir=/w".into(),
                "upperdir=/u".into(),
                "lowerdir=/l".into(),
            ],
        };
        assert_eq!(writable_dir(&[overlay]), Some(PathBuf::from("/u")));
        let bind = Mount {
            r#type: "bind".into(),
            source: "/s/fs".into(),
            target: String::new(),
            options: vec!["rbind".into()],
        };
        assert_eq!(writable_dir(&[bind]), Some(PathBuf::from("/s/fs")));
        assert_eq!(writable_dir(&[]), None);
    }

    #[test]
    fn manifest_lists_config_and_layers() {
        let cfg = ImageConfig {
            bytes: b"{}".to_vec(),
            digest: sha256(b"{}"),
        };
        let m = oci_manifest(&cfg, &[("sha256:aa".into(), 5)]);
        let v: serde_json::Value = serde_json::from_slice(&m).unwrap();
        assert_eq!(v["schemaVersion"], 2);
        assert_eq!(v["config"]["digest"], cfg.digest);
        assert_eq!(v["config"]["size"], 2);
        assert_eq!(v["layers"][0]["mediaType"], LAYER_MEDIA_TYPE);
    }
}
