//! The `image` exporter (alias `moby`): the result becomes an image in the Docker Engine berthd is
//! bound to, by the cheapest correct path for that engine's store:
//!
//! | store | how |
//! |---|---|
//! | classic, daemon running | thin `POST /images/load` ([`DockerEngine::load_thin`]): only missing layers travel |
//! | classic, daemon stopped | direct write into the data root (`layerstore::dockerstore::OfflineWriter`) |
//! | containerd snapshotter | snapshots, content and record through containerd ([`ContainerdStore`]) |
//!
//! In both live modes tags are applied through `POST /images/{id}/tag` once the image exists,
//! never by writing Docker's files; only the offline mode edits `repositories.json` (atomically,
//! with no daemon running). The config follows BuildKit's rules ([`crate::image`]); its digest is
//! the Docker image ID in the classic store. A Docker-style manifest (uncompressed layers, digests
//! = diffIDs) gives `containerimage.digest`.

use std::io::Write;
use std::path::PathBuf;

use base64::Engine as _;
use bollard::Docker;
use chrono::{DateTime, Utc};
use layerstore::dockerstore::{DaemonCheck, DockerStore, OfflineWriter, StorageDriver};
use layerstore::snapshot::{LayerRef, SnapshotStore};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tracing::Instrument as _;

use crate::archive::ExportLayer;
use crate::containerd::{ContainerdLayer, ContainerdStore, LayerFiles};
use crate::docker_load::{chain_ids, DockerEngine};
use crate::image::{build_config, ConfigInput, ImageConfig, LayerInfo, Platform};
use crate::layers::{berth_layer_dir, export_layers, layer_created};
use crate::{Error, Result};

/// Media type of the manifest berth reports for the classic store.
pub const DOCKER_MANIFEST_MEDIA_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Where images go.
#[derive(Debug, Clone)]
pub enum ImageTarget {
    /// A running Docker Engine with the classic (graphdriver) store.
    ClassicLive {
        /// The engine.
        engine: DockerEngine,
    },
    /// The data root of a stopped dockerd (written directly).
    ClassicOffline {
        /// Its data root.
        data_root: PathBuf,
        /// Its storage driver.
        driver: StorageDriver,
        /// How to tell it is really stopped.
        check: DaemonCheck,
    },
    /// A running Docker Engine whose images live in containerd.
    Containerd {
        /// The engine (for tags).
        docker: Docker,
        /// The containerd store Docker uses.
        store: ContainerdStore,
    },
}

/// What to export.
#[derive(Debug, Clone)]
pub struct ImageExportRequest<'a> {
    /// The result's layers, bottom first.
    pub chain: &'a [LayerRef],
    /// The frontend's `containerimage.config`, if any.
    pub config: Option<&'a [u8]>,
    /// Names to tag (`name` attr split on commas).
    pub names: Vec<String>,
    /// `source-date-epoch`.
    pub epoch: Option<DateTime<Utc>>,
}

/// What the export did, with the values of BuildKit's exporter response keys.
#[derive(Debug, Clone, Default)]
pub struct ImageExportResult {
    /// `containerimage.config.digest`: the config digest (the Docker image ID in the classic store).
    pub config_digest: String,
    /// The config's bytes (what a push sends).
    pub config: Vec<u8>,
    /// `containerimage.digest`: the manifest digest.
    pub manifest_digest: String,
    /// `containerimage.descriptor`: base64 of the manifest's JSON descriptor.
    pub descriptor: String,
    /// The names applied.
    pub names: Vec<String>,
    /// Layers written or sent to the store.
    pub layers_sent: usize,
    /// Bytes of layer tar written or sent.
    pub bytes_sent: u64,
    /// Layers the store already had.
    pub layers_skipped: usize,
    /// Bytes of layer tar not sent because the store had them.
    pub bytes_skipped: u64,
    /// Each layer, bottom first: sent/written, or skipped because the store had it.
    pub layers: Vec<LayerOutcome>,
}

/// What an export did with one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerOutcome {
    /// `sha256:<hex>` of the layer tar.
    pub diff_id: String,
    /// Size of the layer tar.
    pub size: u64,
    /// True if the layer was sent or written; false if the store had it already.
    pub sent: bool,
}

#[derive(Serialize)]
struct Desc<'a> {
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    digest: &'a str,
    size: u64,
}

#[derive(Serialize)]
struct DockerManifest<'a> {
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    config: Desc<'a>,
    layers: Vec<Desc<'a>>,
}

pub(crate) fn docker_manifest(config: &ImageConfig, layers: &[ExportLayer]) -> Vec<u8> {
    let m = DockerManifest {
        schema_version: 2,
        media_type: DOCKER_MANIFEST_MEDIA_TYPE,
        config: Desc {
            media_type: "application/vnd.docker.container.image.v1+json",
            digest: &config.digest,
            size: config.bytes.len() as u64,
        },
        layers: layers
            .iter()
            .map(|l| Desc {
                media_type: "application/vnd.docker.image.rootfs.diff.tar",
                digest: &l.diff_id,
                size: l.size,
            })
            .collect(),
    };
    // As buildkitd writes it (Go's `json.MarshalIndent` with two spaces).
    serde_json::to_vec_pretty(&m).expect("manifest serialises")
}

pub(crate) fn descriptor(media_type: &str, manifest: &[u8]) -> (String, String) {
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(manifest)));
    let d = Desc {
        media_type,
        digest: &digest,
        size: manifest.len() as u64,
    };
    let json = serde_json::to_vec(&d).expect("descriptor serialises");
    (
        digest,
        base64::engine::general_purpose::STANDARD.encode(json),
    )
}

/// Copies a berth layer's tree into a containerd snapshot's upper directory by piping the layer
/// writer into the applier: both keep overlay whiteouts, opaque dirs, hardlinks and xattrs exactly,
/// and both are the code that defines berth's layer format. The same tar can go to the content
/// store in the same pass ([`LayerFiles::write_into_with_tar`]).
struct BerthFiles(PathBuf, layerstore::tar::WriteOptions);

impl BerthFiles {
    fn copy(
        &self,
        dest: &std::path::Path,
        tee: Option<&mut (dyn Write + Send)>,
    ) -> std::io::Result<()> {
        use layerstore::tar::{apply_layer, write_layer, ApplyOptions};
        let (rd, wr) = std::io::pipe()?;
        // The diffID is known: neither side hashes (containerd checks the blob it receives).
        let opts = layerstore::tar::WriteOptions {
            skip_digest: true,
            ..self.1.clone()
        };
        let apply_opts = ApplyOptions {
            skip_digest: true,
            ..ApplyOptions::default()
        };
        std::thread::scope(|scope| {
            let producer = scope.spawn(move || {
                let r = match tee {
                    Some(t) => write_layer(&self.0, Tee(wr, t), None, &opts),
                    None => write_layer(&self.0, wr, None, &opts),
                };
                r.map(|_| ())
            });
            let applied = apply_layer(rd, dest, None, &apply_opts);
            let written = producer
                .join()
                .map_err(|_| std::io::Error::other("layer writer panicked"))?;
            written.map_err(std::io::Error::other)?;
            applied.map_err(std::io::Error::other)?;
            Ok(())
        })
    }
}

/// Writes everything to both: the applier's pipe and the content stream.
struct Tee<'a>(std::io::PipeWriter, &'a mut (dyn Write + Send));

impl Write for Tee<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(data)?;
        self.1.write_all(data)?;
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()?;
        self.1.flush()
    }
}

impl LayerFiles for BerthFiles {
    fn write_into(&self, dest: &std::path::Path) -> std::io::Result<()> {
        self.copy(dest, None)
    }

    fn gives_tar(&self) -> bool {
        true
    }

    fn write_into_with_tar(
        &self,
        dest: &std::path::Path,
        tar: &mut (dyn Write + Send),
    ) -> std::io::Result<()> {
        self.copy(dest, Some(tar))
    }
}

impl ImageTarget {
    /// Exports `req` (blocking work runs on the blocking pool).
    pub async fn export(
        &self,
        store: &SnapshotStore,
        req: ImageExportRequest<'_>,
    ) -> Result<ImageExportResult> {
        let chain = req.chain.to_vec();
        let st = store.clone();
        let t = std::time::Instant::now();
        let (layers, in_docker) = tokio::task::spawn_blocking(move || export_layers(&st, &chain))
            .instrument(tracing::debug_span!(
                "export.layers",
                layers = req.chain.len()
            ))
            .await
            .map_err(|e| Error::DockerLoad {
                message: format!("layer digest task: {e}"),
            })??;
        tracing::debug!(
            ms = t.elapsed().as_secs_f64() * 1000.0,
            "export layers: diffIDs known"
        );
        let span = tracing::debug_span!("export.register", mode = self.mode());
        let config = image_config(store, &req, &layers)?;
        let mut result = ImageExportResult {
            config_digest: config.digest.clone(),
            config: config.bytes.clone(),
            ..Default::default()
        };
        match self {
            ImageTarget::ClassicLive { engine } => {
                let manifest = docker_manifest(&config, &layers);
                (result.manifest_digest, result.descriptor) =
                    descriptor(DOCKER_MANIFEST_MEDIA_TYPE, &manifest);
                // Until it is tagged the loaded image is dangling, and a prune running at that
                // moment deletes it (the tag then finds no image): load it again, a few times.
                let mut attempt = 0;
                let report = loop {
                    attempt += 1;
                    let report = engine
                        .load_thin(&config, &layers, &in_docker)
                        .instrument(span.clone())
                        .await?;
                    match engine
                        .tag(&config.digest, &req.names)
                        .instrument(tracing::debug_span!("export.tag"))
                        .await
                    {
                        // "No such image", or the image vanishing under the tag request
                        // ("failed to get digest …: no such file or directory").
                        Err(Error::DockerTag { message, .. })
                            if attempt < 3
                                && (message.contains("No such image")
                                    || message.contains("no such file or directory")) =>
                        {
                            tracing::warn!(%message, "image removed between load and tag (a prune?); loading it again");
                        }
                        r => break r.map(|()| report)?,
                    }
                };
                result.layers_sent = report.sent.layers_sent.len();
                result.bytes_sent = report.sent.layer_bytes_sent;
                result.layers_skipped = report.layers_skipped;
                result.bytes_skipped = report.bytes_skipped;
                result.layers = layers
                    .iter()
                    .map(|l| LayerOutcome {
                        diff_id: l.diff_id.clone(),
                        size: l.size,
                        sent: report.sent.layers_sent.contains(&l.diff_id),
                    })
                    .collect();
            }
            ImageTarget::ClassicOffline {
                data_root,
                driver,
                check,
            } => {
                let manifest = docker_manifest(&config, &layers);
                (result.manifest_digest, result.descriptor) =
                    descriptor(DOCKER_MANIFEST_MEDIA_TYPE, &manifest);
                let (data_root, driver, check) = (data_root.clone(), *driver, check.clone());
                let chain = req.chain.to_vec();
                let store = store.clone();
                let names = req.names.clone();
                let cfg = config.clone();
                let outcomes = tokio::task::spawn_blocking(move || {
                    write_offline(
                        &store, &chain, &layers, &cfg, &names, data_root, driver, &check,
                    )
                })
                .instrument(span.clone())
                .await
                .map_err(|e| Error::DockerLoad {
                    message: format!("offline writer task: {e}"),
                })??;
                for o in &outcomes {
                    if o.sent {
                        result.layers_sent += 1;
                        result.bytes_sent += o.size;
                    } else {
                        result.layers_skipped += 1;
                        result.bytes_skipped += o.size;
                    }
                }
                result.layers = outcomes;
            }
            ImageTarget::Containerd {
                docker,
                store: cstore,
            } => {
                let clayers: Vec<ContainerdLayer> = req
                    .chain
                    .iter()
                    .zip(&layers)
                    .map(|(r, l)| {
                        Ok(ContainerdLayer {
                            diff_id: l.diff_id.clone(),
                            size: l.size,
                            files: match r {
                                LayerRef::Berth(id) => {
                                    let opts = store.layer_write_options(id).map_err(|source| {
                                        Error::Store {
                                            what: format!("layer {id} tar options"),
                                            source,
                                        }
                                    })?;
                                    Some(std::sync::Arc::new(BerthFiles(
                                        berth_layer_dir(store, id),
                                        opts,
                                    ))
                                        as std::sync::Arc<dyn LayerFiles>)
                                }
                                LayerRef::Docker(_) => None,
                            },
                            tar: match r {
                                LayerRef::Berth(_) => l.source.clone(),
                                LayerRef::Docker(_) => None,
                            },
                            blob: match r {
                                LayerRef::Docker(d) => d.blob.clone(),
                                LayerRef::Berth(_) => None,
                            },
                        })
                    })
                    .collect::<Result<_>>()?;
                let layer_descs = crate::containerd::layer_descriptors(&clayers);
                let manifest = crate::containerd::oci_manifest_with(&config, &layer_descs);
                (result.manifest_digest, result.descriptor) =
                    descriptor(crate::containerd::MANIFEST_MEDIA_TYPE, &manifest);
                let record = format!("moby-dangling@{}", result.manifest_digest);
                let report = cstore
                    .export(&config, &clayers, &record)
                    .instrument(span.clone())
                    .await?;
                result.layers_sent = report.snapshots_written.len();
                result.layers_skipped = report.snapshots_skipped.len();
                for (l, c) in layers
                    .iter()
                    .zip(chain_ids(layers.iter().map(|l| l.diff_id.as_str()))?)
                {
                    let sent = report.snapshots_written.contains(&c);
                    if sent {
                        result.bytes_sent += l.size;
                    } else {
                        result.bytes_skipped += l.size;
                    }
                    result.layers.push(LayerOutcome {
                        diff_id: l.diff_id.clone(),
                        size: l.size,
                        sent,
                    });
                }
                let engine = DockerEngine::new(docker.clone(), None);
                let t = std::time::Instant::now();
                engine
                    .tag(&result.manifest_digest, &req.names)
                    .instrument(tracing::debug_span!("export.tag"))
                    .await?;
                tracing::debug!(
                    ms = t.elapsed().as_secs_f64() * 1000.0,
                    names = req.names.len(),
                    "export: tagged through the Docker API"
                );
            }
        }
        result.names = req.names;
        Ok(result)
    }
}

/// The image config for `req` over its exportable `layers` (BuildKit's rules, layer times from
/// the layers themselves so a cached rebuild reproduces the image ID).
pub(crate) fn image_config(
    store: &SnapshotStore,
    req: &ImageExportRequest<'_>,
    layers: &[ExportLayer],
) -> Result<ImageConfig> {
    image_config_for(
        store,
        req.chain,
        req.config,
        req.epoch,
        &Platform::native(),
        layers,
    )
}

/// [`image_config`] of one image of `chain` for `platform` (the default config's, when the
/// frontend gave none).
pub(crate) fn image_config_for(
    store: &SnapshotStore,
    chain: &[LayerRef],
    config: Option<&[u8]>,
    epoch: Option<DateTime<Utc>>,
    platform: &Platform,
    layers: &[ExportLayer],
) -> Result<ImageConfig> {
    let infos: Vec<LayerInfo> = layers
        .iter()
        .zip(chain)
        .map(|(l, r)| LayerInfo {
            diff_id: l.diff_id.clone(),
            description: "created by berth".into(),
            created: layer_created(store, r),
        })
        .collect();
    build_config(&ConfigInput {
        base: config,
        layers: &infos,
        epoch,
        platform,
        now: Utc::now(),
    })
}

#[allow(clippy::too_many_arguments)]
fn write_offline(
    store: &SnapshotStore,
    chain: &[LayerRef],
    layers: &[ExportLayer],
    config: &ImageConfig,
    names: &[String],
    data_root: PathBuf,
    driver: StorageDriver,
    check: &DaemonCheck,
) -> Result<Vec<LayerOutcome>> {
    let dstore = DockerStore::new(data_root, driver);
    let writer = OfflineWriter::open(dstore, check).map_err(|source| Error::Store {
        what: "open Docker data root".into(),
        source,
    })?;
    let mut outcomes = Vec::with_capacity(layers.len());
    let mut parent: Option<layerstore::Digest> = None;
    for (r, l) in chain.iter().zip(layers) {
        let diff_id: layerstore::Digest = l.diff_id.parse().map_err(|source| Error::Store {
            what: format!("diffID {}", l.diff_id),
            source,
        })?;
        let written = match r {
            LayerRef::Berth(id) => {
                let dir = berth_layer_dir(store, id);
                let split = store.layer_path(id).join("tar-split.json.gz");
                writer.write_layer(
                    parent.as_ref(),
                    layerstore::dockerstore::LayerSource::Dir {
                        path: &dir,
                        diff_id,
                        tar_split_gz: &split,
                    },
                )
            }
            LayerRef::Docker(_) => {
                // A layer of another Docker store: stream its exact tar from that store.
                let source = l.source.clone().ok_or_else(|| Error::LayerUnavailable {
                    diff_id: l.diff_id.clone(),
                })?;
                let (mut rd, mut wr) = std::io::pipe().map_err(|source| Error::LayerStream {
                    diff_id: l.diff_id.clone(),
                    source,
                })?;
                let producer = std::thread::spawn(move || {
                    let r = source.write_tar(&mut wr);
                    drop(wr);
                    r
                });
                let res = writer.write_layer(
                    parent.as_ref(),
                    layerstore::dockerstore::LayerSource::Tar {
                        reader: Box::new(&mut rd),
                        diff_id: Some(diff_id),
                    },
                );
                drop(rd);
                let _ = producer.join();
                res
            }
        }
        .map_err(|source| Error::Store {
            what: format!("write layer {}", l.diff_id),
            source,
        })?;
        outcomes.push(LayerOutcome {
            diff_id: l.diff_id.clone(),
            size: l.size,
            sent: !written.existed,
        });
        parent = Some(written.chain_id);
    }
    let id = writer
        .write_image(&config.bytes)
        .map_err(|source| Error::Store {
            what: "write image config".into(),
            source,
        })?;
    for n in names {
        writer.tag(n, &id).map_err(|source| Error::Store {
            what: format!("tag {n}"),
            source,
        })?;
    }
    Ok(outcomes)
}

/// How [`ImageTarget::detect`] finds the store.
#[derive(Debug, Clone, Default)]
pub struct TargetOptions {
    /// Docker's data root when berthd was told it (`--docker-data-root`); needed for the offline
    /// mode, and used as a read-only presence hint in the live classic mode.
    pub data_root: Option<PathBuf>,
    /// The Engine's containerd when it uses the containerd image store (configured address and
    /// namespace; see [`containerdstore::Endpoint::detect`]).
    pub containerd: containerdstore::EndpointOptions,
    /// Evidence checks that a daemon is really stopped (offline mode).
    pub offline_check: DaemonCheck,
}

impl ImageTarget {
    /// Picks the mode from `GET /info`: containerd snapshotter → [`ImageTarget::Containerd`];
    /// graphdriver → [`ImageTarget::ClassicLive`]; no daemon answering but a data root given →
    /// [`ImageTarget::ClassicOffline`].
    pub async fn detect(docker: Docker, opts: &TargetOptions) -> Result<ImageTarget> {
        let info = match docker.info().await {
            Ok(info) => info,
            Err(e) => {
                let Some(root) = &opts.data_root else {
                    return Err(Error::DockerLoad {
                        message: format!("the Docker Engine does not answer ({e}) and no --docker-data-root was given"),
                    });
                };
                let driver = layerstore::dockerstore::offline_driver(root);
                return Ok(ImageTarget::ClassicOffline {
                    data_root: root.clone(),
                    driver,
                    check: opts.offline_check.clone(),
                });
            }
        };
        let driver = info.driver.clone().unwrap_or_default();
        if let Some(ep) = containerdstore::Endpoint::detect(&info, &opts.containerd) {
            // The same reachability check (and error naming what to set) as base images.
            containerdstore::Client::connect(&ep).await?;
            let store =
                ContainerdStore::connect(&ep.address, &ep.namespace, &ep.snapshotter).await?;
            return Ok(ImageTarget::Containerd { docker, store });
        }
        let data_root = opts
            .data_root
            .clone()
            .or_else(|| info.docker_root_dir.clone().map(PathBuf::from));
        let layerdb = data_root
            .map(|r| r.join("image").join(&driver).join("layerdb"))
            .filter(|p| p.is_dir());
        Ok(ImageTarget::ClassicLive {
            engine: DockerEngine::new(docker, layerdb),
        })
    }

    /// A short name of the mode, for progress and logs.
    pub fn mode(&self) -> &'static str {
        match self {
            ImageTarget::ClassicLive { .. } => "docker (classic store, thin load)",
            ImageTarget::ClassicOffline { .. } => "docker data root (daemon stopped, direct write)",
            ImageTarget::Containerd { .. } => "docker (containerd store)",
        }
    }
}
