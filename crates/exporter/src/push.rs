//! Pushing an exported image to registries with berth's own client (no Docker Engine involved),
//! as BuildKit's image exporter does with `push=true` (`exporter/containerimage/export.go`,
//! `util/push/push.go` at v0.11.6):
//!
//! - every layer is compressed once per (diffID, compression) into the [`BlobCache`] and reused
//!   by later pushes (and other exports); `compression` = `gzip` (default), `zstd` or
//!   `uncompressed`, `compression-level`, and `force-compression` (a cached blob made at another
//!   level is made again);
//! - the manifest is Docker schema 2 by default, OCI with `oci-mediatypes=true` (zstd always uses
//!   OCI media types, as BuildKit forces for it);
//! - for each name (comma-separated `name`), each blob is checked with `HEAD` first and only sent
//!   when missing; from the second name on a registry's repository, blobs are mounted from the
//!   first repository pushed there (cross-repository mount) when the registry allows it;
//! - the manifest goes under the tag, or only by digest with `push-by-digest=true`.
//!
//! The config is the one the export wrote into Docker, so the pushed image has the same image ID.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use layerstore::snapshot::{LayerRef, SnapshotStore};
use registry::{BlobCache, CachedBlob, Compression, Reference, Session};
use serde::Serialize;

use crate::layers::export_layers;
use crate::{Error, Result};

/// How to push (the exporter's push attributes).
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// `compression`.
    pub compression: Compression,
    /// `compression-level`.
    pub level: Option<i32>,
    /// `force-compression`.
    pub force: bool,
    /// `oci-mediatypes`.
    pub oci: bool,
    /// `push-by-digest`.
    pub by_digest: bool,
    /// `prefer-nondist-layers`: foreign layers of a pulled base keep their descriptor (and URLs)
    /// and are not uploaded.
    pub prefer_nondist: bool,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            compression: Compression::Gzip,
            level: None,
            force: false,
            oci: false,
            by_digest: false,
            prefer_nondist: false,
        }
    }
}

/// Progress of a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushEvent {
    /// Bytes of one blob sent to `name` (`done` once it is there, sent or not).
    Blob {
        /// The reference being pushed.
        name: String,
        /// The blob.
        digest: String,
        /// Bytes sent so far (= `total` when the registry had it).
        current: u64,
        /// Blob size.
        total: u64,
        /// Finished.
        done: bool,
        /// What happened: `uploaded`, `exists`, `mounted` (when done).
        how: &'static str,
    },
    /// The manifest of `name` was pushed.
    Manifest {
        /// The reference.
        name: String,
        /// Its digest.
        digest: String,
    },
}

/// Receives [`PushEvent`]s.
pub type PushProgress = Arc<dyn Fn(PushEvent) + Send + Sync>;

/// The manifest the registries hold after a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedImage {
    /// Its digest.
    pub digest: String,
    /// Its size.
    pub size: u64,
    /// Its media type.
    pub media_type: String,
    /// Bytes of layer blobs uploaded (not counting blobs the registries had or mounted).
    pub bytes_uploaded: u64,
    /// Layers compressed for this push (the others came from the blob cache).
    pub layers_compressed: usize,
}

#[derive(Serialize)]
struct Desc<'a> {
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    digest: &'a str,
    size: u64,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    urls: &'a [String],
}

/// One layer as the manifest will list it.
struct PushLayer {
    media_type: String,
    blob: CachedBlob,
    urls: Vec<String>,
    /// Sent to the registry (false for a foreign layer kept by reference).
    upload: bool,
}

#[derive(Serialize)]
struct Manifest<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    config: Desc<'a>,
    layers: Vec<Desc<'a>>,
}

fn reg_err(what: String) -> impl FnOnce(registry::Error) -> Error {
    move |source| Error::Registry {
        what,
        source: Box::new(source),
    }
}

/// Pushes the image of `chain` with `config` (the exported config bytes) to every name.
#[allow(clippy::too_many_arguments)]
pub async fn push_image(
    store: &SnapshotStore,
    chain: &[LayerRef],
    config: &[u8],
    names: &[String],
    session: &Session,
    cache: &BlobCache,
    opts: &PushOptions,
    progress: PushProgress,
) -> Result<PushedImage> {
    let refs = names
        .iter()
        .map(|n| Reference::parse(n).map_err(reg_err(format!("push {n}"))))
        .collect::<Result<Vec<_>>>()?;
    let st = store.clone();
    let chain_v = chain.to_vec();
    let (layers, _) = tokio::task::spawn_blocking(move || export_layers(&st, &chain_v))
        .await
        .map_err(|e| Error::DockerLoad {
            message: format!("layer digest task: {e}"),
        })??;
    let oci = opts.oci || opts.compression == Compression::Zstd;
    // Compress (or find) every layer's blob once. Layers berth pulled keep what they were
    // (BuildKit reuses existing blobs unless force-compression): a foreign layer stays a
    // reference with prefer-nondist-layers, an uncompressed one stays uncompressed.
    let mut push_layers: Vec<PushLayer> = Vec::with_capacity(layers.len());
    let mut compressed = 0;
    for l in &layers {
        let src = if opts.force {
            None
        } else {
            cache.source(&l.diff_id)
        };
        if let Some(src) = src
            .as_ref()
            .filter(|s| s.is_foreign() && opts.prefer_nondist)
        {
            push_layers.push(PushLayer {
                media_type: src.media_type.clone(),
                blob: CachedBlob {
                    digest: src.digest.clone(),
                    size: src.size,
                    level: None,
                    path: Default::default(),
                },
                urls: src.urls.clone(),
                upload: false,
            });
            continue;
        }
        let compression = match src
            .as_ref()
            .and_then(|s| Compression::from_media_type(&s.media_type))
        {
            Some(Compression::Uncompressed) => Compression::Uncompressed,
            _ => opts.compression,
        };
        let source = l.source.clone().ok_or_else(|| Error::LayerUnavailable {
            diff_id: l.diff_id.clone(),
        })?;
        let (cache2, diff_id, o) = (cache.clone(), l.diff_id.clone(), opts.clone());
        let (blob, hit) = tokio::task::spawn_blocking(move || {
            cache2.get_or_compress(&diff_id, compression, o.level, o.force, &|w| {
                source.write_tar(w)
            })
        })
        .await
        .map_err(|e| Error::DockerLoad {
            message: format!("compress task: {e}"),
        })?
        .map_err(reg_err(format!("compress layer {}", l.diff_id)))?;
        if !hit {
            compressed += 1;
        }
        push_layers.push(PushLayer {
            media_type: compression.layer_media_type(oci).to_string(),
            blob,
            urls: vec![],
            upload: true,
        });
    }
    let config_blob = cache
        .put_bytes(config)
        .map_err(reg_err("store image config".into()))?;
    let manifest_type = if oci {
        registry::MEDIA_TYPE_OCI_MANIFEST
    } else {
        registry::MEDIA_TYPE_DOCKER_MANIFEST
    };
    let config_type = if oci {
        "application/vnd.oci.image.config.v1+json"
    } else {
        "application/vnd.docker.container.image.v1+json"
    };
    let manifest = serde_json::to_vec(&Manifest {
        schema_version: 2,
        media_type: manifest_type,
        config: Desc {
            media_type: config_type,
            digest: &config_blob.digest,
            size: config_blob.size,
            urls: &[],
        },
        layers: push_layers
            .iter()
            .map(|l| Desc {
                media_type: &l.media_type,
                digest: &l.blob.digest,
                size: l.blob.size,
                urls: &l.urls,
            })
            .collect(),
    })
    .expect("manifest serialises");
    let manifest = Bytes::from(manifest);
    let mut uploaded = 0;
    // First repository pushed on each registry domain: later names mount from it.
    let mut first_repo: BTreeMap<String, String> = BTreeMap::new();
    let mut digest = String::new();
    for (name, r) in names.iter().zip(&refs) {
        let mount_from = first_repo.get(r.domain()).cloned();
        let uploads = push_layers.iter().filter(|l| l.upload).map(|l| &l.blob);
        for b in uploads.chain(std::iter::once(&config_blob)) {
            let p = progress.clone();
            let (n, d, total) = (name.clone(), b.digest.clone(), b.size);
            let report: registry::ProgressFn = Arc::new(move |cur| {
                p(PushEvent::Blob {
                    name: n.clone(),
                    digest: d.clone(),
                    current: cur,
                    total,
                    done: false,
                    how: "",
                })
            });
            let how = session
                .push_blob(
                    r,
                    &b.digest,
                    b.size,
                    &b.path,
                    mount_from.as_deref(),
                    Some(report),
                )
                .await
                .map_err(reg_err(format!("push {name}")))?;
            let how = match how {
                registry::PushedBlob::Existed => "exists",
                registry::PushedBlob::Mounted => "mounted",
                registry::PushedBlob::Uploaded => {
                    uploaded += b.size;
                    "uploaded"
                }
            };
            progress(PushEvent::Blob {
                name: name.clone(),
                digest: b.digest.clone(),
                current: b.size,
                total: b.size,
                done: true,
                how,
            });
        }
        let target = match (opts.by_digest, r.tag()) {
            (false, Some(t)) => t.to_string(),
            _ => format!(
                "sha256:{}",
                hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&manifest))
            ),
        };
        digest = session
            .push_manifest(r, &target, manifest_type, manifest.clone())
            .await
            .map_err(reg_err(format!("push {name}")))?;
        progress(PushEvent::Manifest {
            name: name.clone(),
            digest: digest.clone(),
        });
        first_repo
            .entry(r.domain().to_string())
            .or_insert_with(|| r.repository().to_string());
    }
    Ok(PushedImage {
        digest,
        size: manifest.len() as u64,
        media_type: manifest_type.to_string(),
        bytes_uploaded: uploaded,
        layers_compressed: compressed,
    })
}
