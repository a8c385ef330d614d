//! Pushing an exported image to registries with berth's own client (no Docker Engine involved),
//! as BuildKit's image exporter does with `push=true` (`exporter/containerimage/export.go`,
//! `util/push/push.go` at v0.11.6):
//!
//! - every layer is compressed once per (diffID, compression) into the [`BlobCache`] and reused
//!   by later pushes (and other exports); `compression` = `gzip` (default), `zstd` or
//!   `uncompressed`, `compression-level`, and `force-compression` (a cached blob made at another
//!   level is made again);
//! - the manifest is Docker schema 2 by default, OCI with `oci-mediatypes=true` (zstd layers in
//!   a Docker manifest get `….diff.tar.zstd`: BuildKit v0.11.6 does not force OCI types for zstd);
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

use crate::image::{build_config, ConfigInput, LayerInfo, Platform};
use crate::layers::{export_layer_tars, layer_created};
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
    /// Annotations of the image manifest (`annotation.*`, `annotation-manifest.*`).
    pub annotations: BTreeMap<String, String>,
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
            annotations: BTreeMap::new(),
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
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    config: Desc<'a>,
    layers: Vec<Desc<'a>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: &'a BTreeMap<String, String>,
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
    let refs = parse_names(names)?;
    let oci = opts.oci;
    let (push_layers, _, compressed) = prepare_layers(store, chain, cache, opts, oci).await?;
    let m = manifest(&push_layers, config, cache, oci, &opts.annotations)?;
    let mut uploaded = 0;
    // First repository pushed on each registry domain: later names mount from it.
    let mut first_repo: BTreeMap<String, String> = BTreeMap::new();
    let mut digest = String::new();
    for (name, r) in names.iter().zip(&refs) {
        let mount_from = first_repo.get(r.domain()).cloned();
        uploaded += upload_blobs(
            session,
            name,
            r,
            m.blobs(),
            mount_from.as_deref(),
            &progress,
        )
        .await?;
        let top = (m.media_type, &m.bytes, m.digest.as_str());
        digest = push_top(session, name, r, opts.by_digest, top, &progress).await?;
        first_repo
            .entry(r.domain().to_string())
            .or_insert_with(|| r.repository().to_string());
    }
    Ok(PushedImage {
        digest,
        size: m.bytes.len() as u64,
        media_type: m.media_type.to_string(),
        bytes_uploaded: uploaded,
        layers_compressed: compressed,
    })
}

fn parse_names(names: &[String]) -> Result<Vec<Reference>> {
    names
        .iter()
        .map(|n| Reference::parse(n).map_err(reg_err(format!("push {n}"))))
        .collect()
}

/// A manifest ready to push, with the blobs it needs.
struct BuiltManifest {
    bytes: Bytes,
    digest: String,
    media_type: &'static str,
    config: CachedBlob,
    layers: Vec<CachedBlob>,
}

impl BuiltManifest {
    /// The blobs to upload: layers (not foreign ones kept by reference), then the config.
    fn blobs(&self) -> impl Iterator<Item = &CachedBlob> {
        self.layers.iter().chain(std::iter::once(&self.config))
    }
}

/// Compresses (or finds) every layer's blob of `chain` once.
async fn prepare_layers(
    store: &SnapshotStore,
    chain: &[LayerRef],
    cache: &BlobCache,
    opts: &PushOptions,
    oci: bool,
) -> Result<(Vec<PushLayer>, Vec<crate::archive::ExportLayer>, usize)> {
    let st = store.clone();
    let chain_v = chain.to_vec();
    let (layers, _) = tokio::task::spawn_blocking(move || export_layer_tars(&st, &chain_v))
        .await
        .map_err(|e| Error::DockerLoad {
            message: format!("layer digest task: {e}"),
        })??;
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
    Ok((push_layers, layers, compressed))
}

/// The manifest over `layers` and `config`, its blobs stored in the cache.
fn manifest(
    layers: &[PushLayer],
    config: &[u8],
    cache: &BlobCache,
    oci: bool,
    annotations: &BTreeMap<String, String>,
) -> Result<BuiltManifest> {
    let config_blob = cache
        .put_bytes(config)
        .map_err(reg_err("store image config".into()))?;
    let media_type = if oci {
        registry::MEDIA_TYPE_OCI_MANIFEST
    } else {
        registry::MEDIA_TYPE_DOCKER_MANIFEST
    };
    let config_type = if oci {
        "application/vnd.oci.image.config.v1+json"
    } else {
        "application/vnd.docker.container.image.v1+json"
    };
    // Field order and two-space indentation as buildkitd writes it (Go's `json.MarshalIndent`
    // of `ocispecs.Manifest`), so the same image has the same manifest digest.
    let bytes = serde_json::to_vec_pretty(&Manifest {
        schema_version: 2,
        media_type,
        config: Desc {
            media_type: config_type,
            digest: &config_blob.digest,
            size: config_blob.size,
            urls: &[],
        },
        layers: layers
            .iter()
            .map(|l| Desc {
                media_type: &l.media_type,
                digest: &l.blob.digest,
                size: l.blob.size,
                urls: &l.urls,
            })
            .collect(),
        annotations,
    })
    .expect("manifest serialises");
    Ok(BuiltManifest {
        digest: sha256_digest(&bytes),
        bytes: Bytes::from(bytes),
        media_type,
        config: config_blob,
        layers: layers
            .iter()
            .filter(|l| l.upload)
            .map(|l| l.blob.clone())
            .collect(),
    })
}

/// Gives the core SPDX SBOMs among `atts` the layer (its pushed blob's digest) of each file they
/// list: the topmost layer whose tar has the file (whiteouts skipped), as BuildKit's
/// `supplementSBOM`. Layers are listed only when such an SBOM asks, each at most once.
async fn supplement_sboms(
    atts: &mut [crate::attestation::Attestation],
    exported: &[crate::archive::ExportLayer],
    layers: &[PushLayer],
) -> Result<()> {
    use crate::attestation as at;
    if !atts
        .iter()
        .any(|a| a.sbom_core && a.predicate_type == at::PREDICATE_SPDX)
    {
        return Ok(());
    }
    let exported = exported.to_vec();
    let digests: Vec<String> = layers.iter().map(|l| l.blob.digest.clone()).collect();
    let mut list = atts.to_vec();
    let list = tokio::task::spawn_blocking(move || -> Result<Vec<_>> {
        supplement_sboms_blocking(&mut list, &exported, &digests)?;
        Ok(list)
    })
    .await
    .map_err(|e| Error::DockerLoad {
        message: format!("sbom layer task: {e}"),
    })??;
    atts.clone_from_slice(&list);
    Ok(())
}

/// [`supplement_sboms`] on the calling thread: `digests` are the blob digests of `exported`.
pub(crate) fn supplement_sboms_blocking(
    atts: &mut [crate::attestation::Attestation],
    exported: &[crate::archive::ExportLayer],
    digests: &[String],
) -> Result<()> {
    use crate::attestation as at;
    // file -> layer digest, filled from the top layer down as files are asked for
    let mut found: BTreeMap<String, String> = BTreeMap::new();
    let mut next = exported.len();
    for a in atts
        .iter_mut()
        .filter(|a| a.sbom_core && a.predicate_type == at::PREDICATE_SPDX)
    {
        let mut find = |name: &str| -> Result<Option<String>> {
            let name = format!("/{}", name.trim_start_matches('/'));
            let name = name.trim_end_matches('/').to_string();
            while !found.contains_key(&name) && next > 0 {
                next -= 1;
                for f in layer_files(&exported[next])? {
                    found.entry(f).or_insert_with(|| digests[next].clone());
                }
            }
            Ok(found.get(&name).cloned())
        };
        if let Some(p) = at::supplement_spdx(&a.predicate, &mut find)? {
            a.predicate = p;
        }
    }
    Ok(())
}

/// The paths (`/`-rooted, no trailing `/`) of a layer's tar, whiteouts left out; the tar is
/// streamed through a pipe, never held.
fn layer_files(layer: &crate::archive::ExportLayer) -> Result<Vec<String>> {
    let Some(source) = layer.source.clone() else {
        return Err(Error::LayerUnavailable {
            diff_id: layer.diff_id.clone(),
        });
    };
    let io = |source: std::io::Error| Error::LayerStream {
        diff_id: layer.diff_id.clone(),
        source,
    };
    let (reader, mut writer) = std::io::pipe().map_err(io)?;
    let producer = std::thread::spawn(move || source.write_tar(&mut writer));
    let mut out = Vec::new();
    let mut ar = tar::Archive::new(reader);
    let listed = (|| -> std::io::Result<()> {
        for e in ar.entries()? {
            let e = e?;
            let p = e.path()?.to_string_lossy().into_owned();
            let p = format!("/{}", p.trim_start_matches("./").trim_matches('/'));
            if p.rsplit('/').next().is_some_and(|b| b.starts_with(".wh.")) {
                continue;
            }
            out.push(p);
        }
        Ok(())
    })();
    // Reading to the end (the tar's trailing blocks) lets the producer finish; after a read
    // error, dropping the reader stops it.
    if listed.is_ok() {
        let mut rest = ar.into_inner();
        std::io::copy(&mut rest, &mut std::io::sink()).map_err(io)?;
    } else {
        drop(ar);
    }
    let produced = producer
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("layer tar writer panicked")));
    listed.map_err(io)?;
    // A writer stopped by the closed pipe after a read error is reported by the read.
    produced.map_err(io)?;
    Ok(out)
}

/// The attestation manifest of `img`'s attestations about its manifest `target` (its default
/// subjects: each name's package URL with `target`), its blobs stored in the cache, and the
/// annotations of its index descriptor.
fn attestation_manifest(
    img: &PlatformImage,
    names: &[String],
    target: &str,
    cache: &BlobCache,
    oci: bool,
) -> Result<(BuiltManifest, BTreeMap<String, String>)> {
    let m = attestation_document(img, names, target, oci)?;
    let put = |b: &[u8], what: &str| cache.put_bytes(b).map_err(reg_err(format!("store {what}")));
    let layers = m
        .layers
        .iter()
        .map(|l| put(l, "attestation"))
        .collect::<Result<Vec<_>>>()?;
    let built = BuiltManifest {
        bytes: Bytes::from(m.manifest),
        digest: m.digest,
        media_type: m.media_type,
        config: put(&m.config, "attestation config")?,
        layers,
    };
    Ok((built, attestation_descriptor_annotations(target)))
}

/// The attestation manifest (and its blobs) of `img`'s attestations about its manifest
/// `target`, whose default subjects are each name's package URL with `target`.
pub(crate) fn attestation_document(
    img: &PlatformImage,
    names: &[String],
    target: &str,
    oci: bool,
) -> Result<crate::attestation::AttestationManifest> {
    use crate::attestation as at;
    let defaults = names
        .iter()
        .map(|n| {
            Ok(at::DefaultSubject {
                name: at::purl(n, Some(&img.platform))?,
                digest: target.to_string(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let statements = img
        .attestations
        .iter()
        .map(|a| Ok((a.predicate_type.clone(), at::statement(a, &defaults)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(at::attestation_manifest(&statements, oci))
}

/// The index descriptor annotations of an attestation manifest about `target`.
pub(crate) fn attestation_descriptor_annotations(target: &str) -> BTreeMap<String, String> {
    use crate::attestation as at;
    BTreeMap::from([
        (at::REFERENCE_DIGEST.to_string(), target.to_string()),
        (
            at::REFERENCE_TYPE.to_string(),
            at::ATTESTATION_MANIFEST.to_string(),
        ),
    ])
}

fn sha256_digest(b: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b))
    )
}

/// Puts the top manifest (`media_type`, `bytes`, `digest`: an image manifest or an index) under
/// `r`'s tag, or under its digest with push-by-digest or a name without a tag, and reports it;
/// returns the digest the registry answered with.
async fn push_top(
    session: &Session,
    name: &str,
    r: &Reference,
    by_digest: bool,
    (media_type, bytes, digest): (&str, &Bytes, &str),
    progress: &PushProgress,
) -> Result<String> {
    let target = match (by_digest, r.tag()) {
        (false, Some(t)) => t,
        _ => digest,
    };
    let pushed = session
        .push_manifest(r, target, media_type, bytes.clone())
        .await
        .map_err(reg_err(format!("push {name}")))?;
    progress(PushEvent::Manifest {
        name: name.to_string(),
        digest: pushed.clone(),
    });
    Ok(pushed)
}

/// Uploads `blobs` to `r` (HEAD first; mounted from `mount_from` when the registry allows);
/// returns the bytes uploaded.
async fn upload_blobs(
    session: &Session,
    name: &str,
    r: &Reference,
    blobs: impl Iterator<Item = &CachedBlob>,
    mount_from: Option<&str>,
    progress: &PushProgress,
) -> Result<u64> {
    let mut uploaded = 0;
    for b in blobs {
        let p = progress.clone();
        let (n, d, total) = (name.to_string(), b.digest.clone(), b.size);
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
            .push_blob(r, &b.digest, b.size, &b.path, mount_from, Some(report))
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
            name: name.to_string(),
            digest: b.digest.clone(),
            current: b.size,
            total: b.size,
            done: true,
            how,
        });
    }
    Ok(uploaded)
}

/// One platform's image of a multi-platform push ([`push_index`]).
#[derive(Debug, Clone)]
pub struct PlatformImage {
    /// Its platform (the index descriptor's `platform`; also the default config's).
    pub platform: Platform,
    /// Its layers, bottom to top.
    pub chain: Vec<LayerRef>,
    /// The frontend's `containerimage.config` for this platform, if any.
    pub config: Option<Vec<u8>>,
    /// Annotations of its manifest.
    pub manifest_annotations: BTreeMap<String, String>,
    /// Annotations of its descriptor in the index.
    pub descriptor_annotations: BTreeMap<String, String>,
    /// Its attestations (un-bundled, predicates read): when any, an attestation manifest about
    /// this platform's manifest follows the platform manifests in the index.
    pub attestations: Vec<crate::attestation::Attestation>,
}

#[derive(Serialize)]
pub(crate) struct IndexPlatform<'a> {
    pub(crate) architecture: &'a str,
    pub(crate) os: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub(crate) variant: &'a str,
}

#[derive(Serialize)]
pub(crate) struct IndexDesc<'a> {
    #[serde(rename = "mediaType")]
    pub(crate) media_type: &'a str,
    pub(crate) digest: &'a str,
    pub(crate) size: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) annotations: &'a BTreeMap<String, String>,
    pub(crate) platform: IndexPlatform<'a>,
}

#[derive(Serialize)]
pub(crate) struct Index<'a> {
    #[serde(rename = "mediaType")]
    pub(crate) media_type: &'a str,
    #[serde(rename = "schemaVersion")]
    pub(crate) schema_version: u32,
    pub(crate) manifests: Vec<IndexDesc<'a>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) annotations: &'a BTreeMap<String, String>,
}

/// Pushes a multi-platform image (BuildKit's `ImageWriter.Commit` for a ref map): one manifest
/// per platform, pushed by digest, then the index over them under each name's tag (by digest
/// with `push-by-digest`). The index is an OCI index with OCI media types
/// (`opts.oci`, which the caller forces for index and descriptor annotations), else a Docker
/// manifest list. `epoch` clamps times as for a single image.
#[allow(clippy::too_many_arguments)]
pub async fn push_index(
    store: &SnapshotStore,
    images: &[PlatformImage],
    index_annotations: &BTreeMap<String, String>,
    epoch: Option<chrono::DateTime<chrono::Utc>>,
    names: &[String],
    session: &Session,
    cache: &BlobCache,
    opts: &PushOptions,
    progress: PushProgress,
) -> Result<PushedImage> {
    let refs = parse_names(names)?;
    let oci = opts.oci;
    let mut manifests = Vec::with_capacity(images.len());
    // Attestation manifests, each with the digest of the manifest it is about.
    let mut attestations: Vec<(BuiltManifest, BTreeMap<String, String>)> = Vec::new();
    let mut compressed = 0;
    // The descriptor of every layer pushed so far (provenance layers).
    let mut known: Vec<(LayerRef, serde_json::Value)> = Vec::new();
    for img in images {
        let (layers, exported, n) = prepare_layers(store, &img.chain, cache, opts, oci).await?;
        compressed += n;
        for (r, l) in img.chain.iter().zip(&layers) {
            if !known.iter().any(|(k, _)| k == r) {
                let mut d = serde_json::json!({
                    "mediaType": l.media_type,
                    "digest": l.blob.digest,
                    "size": l.blob.size,
                });
                if !l.urls.is_empty() {
                    d["urls"] = serde_json::json!(l.urls);
                }
                known.push((r.clone(), d));
            }
        }
        let infos: Vec<LayerInfo> = exported
            .iter()
            .zip(&img.chain)
            .map(|(l, r)| LayerInfo {
                diff_id: l.diff_id.clone(),
                description: "created by berth".into(),
                created: layer_created(store, r),
            })
            .collect();
        let config = build_config(&ConfigInput {
            base: img.config.as_deref(),
            layers: &infos,
            epoch,
            platform: &img.platform,
            now: chrono::Utc::now(),
        })?;
        let m = manifest(
            &layers,
            &config.bytes,
            cache,
            oci,
            &img.manifest_annotations,
        )?;
        if !img.attestations.is_empty() {
            let mut img = img.clone();
            supplement_sboms(&mut img.attestations, &exported, &layers).await?;
            for a in img.attestations.iter_mut() {
                let find =
                    |r: &LayerRef| known.iter().find(|(k, _)| k == r).map(|(_, d)| d.clone());
                if let Some(p) = crate::attestation::supplement_provenance(
                    &a.predicate,
                    &a.provenance_layers,
                    &find,
                ) {
                    a.predicate = p;
                }
            }
            attestations.push(attestation_manifest(&img, names, &m.digest, cache, oci)?);
        }
        manifests.push(m);
    }
    let media_type = if oci {
        registry::MEDIA_TYPE_OCI_INDEX
    } else {
        registry::MEDIA_TYPE_DOCKER_LIST
    };
    let index = serde_json::to_vec_pretty(&Index {
        media_type,
        schema_version: 2,
        manifests: manifests
            .iter()
            .zip(images)
            .map(|(m, img)| IndexDesc {
                media_type: m.media_type,
                digest: &m.digest,
                size: m.bytes.len() as u64,
                annotations: &img.descriptor_annotations,
                platform: IndexPlatform {
                    architecture: &img.platform.architecture,
                    os: &img.platform.os,
                    variant: &img.platform.variant,
                },
            })
            .chain(attestations.iter().map(|(m, annotations)| IndexDesc {
                media_type: m.media_type,
                digest: &m.digest,
                size: m.bytes.len() as u64,
                annotations,
                platform: IndexPlatform {
                    architecture: "unknown",
                    os: "unknown",
                    variant: "",
                },
            }))
            .collect(),
        annotations: index_annotations,
    })
    .expect("index serialises");
    let index = Bytes::from(index);
    let index_digest = sha256_digest(&index);
    let mut uploaded = 0;
    let mut first_repo: BTreeMap<String, String> = BTreeMap::new();
    let mut digest = String::new();
    for (name, r) in names.iter().zip(&refs) {
        let mount_from = first_repo.get(r.domain()).cloned();
        for m in manifests.iter().chain(attestations.iter().map(|(m, _)| m)) {
            uploaded += upload_blobs(
                session,
                name,
                r,
                m.blobs(),
                mount_from.as_deref(),
                &progress,
            )
            .await?;
            session
                .push_manifest(r, &m.digest, m.media_type, m.bytes.clone())
                .await
                .map_err(reg_err(format!("push {name}")))?;
        }
        let top = (media_type, &index, index_digest.as_str());
        digest = push_top(session, name, r, opts.by_digest, top, &progress).await?;
        first_repo
            .entry(r.domain().to_string())
            .or_insert_with(|| r.repository().to_string());
    }
    Ok(PushedImage {
        digest,
        size: index.len() as u64,
        media_type: media_type.to_string(),
        bytes_uploaded: uploaded,
        layers_compressed: compressed,
    })
}
