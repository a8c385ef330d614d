//! The `oci` client output: the image as an OCI image layout in a tar (`oci-layout`,
//! `index.json`, `blobs/sha256/…`), the format buildkitd's `type=oci` exporter streams to the
//! client and `ctr images import`, skopeo (`oci-archive:`) and podman load.
//!
//! Layout written, in this order:
//!
//! ```text
//! blobs/  blobs/sha256/            directories
//! blobs/sha256/<layer blob>        one per distinct layer, bottom first (gzip, zstd or plain tar)
//! blobs/sha256/<config>            the image config (same bytes, same digest as the Docker image ID)
//! blobs/sha256/<manifest>          the image manifest
//! index.json                       one descriptor of the manifest per name (or one unnamed)
//! oci-layout                       {"imageLayoutVersion":"1.0.0"}
//! ```
//!
//! buildkitd (containerd's archive writer) sorts entries by name; layout readers look blobs up
//! by digest, so the order here is chosen for streaming instead: the layer blobs first, and the
//! documents that name every blob last.
//!
//! **Compressed blobs and the tar header.** A tar entry announces its size before its bytes, the
//! manifest needs every compressed digest, and buildkitd tells the client the manifest digest
//! (`containerimage.digest`) in the headers of the stream, before any byte of it. Each layer is
//! therefore compressed once, hashed on the way (both the uncompressed stream, checked against
//! the diffID, and the compressed stream), into an unnamed temporary file (`O_TMPFILE` in
//! berth's state directory: nothing is left behind if berthd dies); once all are staged the
//! digests are known, the stream opens and the files are copied into the tar. Disk use is the
//! sum of the compressed layers for the duration of the export (buildkitd keeps the same blobs in
//! its content store for good); memory is bounded by the copy buffers. The alternative, two
//! compression passes (one to learn size and digest, one to send), needs no disk but doubles the
//! CPU time of the slowest step of the export (gzip runs at ~50–150 MB/s per core against
//! several hundred MB/s of sequential disk), so it loses on the large images berth is for.
//! Uncompressed layers need neither: their size and digest (the diffID) are known and they are
//! streamed straight from the layer store.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Seek, Write};
use std::path::PathBuf;

use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use layerstore::snapshot::SnapshotStore;
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::archive::{self, CountingWriter};
use crate::docker_image::{image_config, image_config_for, ImageExportRequest, ImageExportResult};
use crate::image::Platform;
use crate::layers::export_layer_tars;
use crate::push::PlatformImage;
use crate::{Error, Result};
use layerstore::snapshot::LayerRef;

/// `org.opencontainers.image.ref.name`: the tag part of a name (OCI image layout).
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// `io.containerd.image.name`: the full normalized name, as containerd and buildkitd write it.
pub const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";
/// `org.opencontainers.image.created`.
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";

/// Layer blob compression (`compression` exporter attribute).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar (`uncompressed`).
    Uncompressed,
    /// `gzip` (buildkitd's default).
    Gzip,
    /// `zstd` (OCI media types only).
    Zstd,
}

impl Compression {
    /// Parses the attribute value as buildkitd spells it; `estargz` and anything else are
    /// refused with the list of what berth supports.
    pub fn parse(v: &str) -> std::result::Result<Self, String> {
        match v {
            "uncompressed" => Ok(Compression::Uncompressed),
            "gzip" => Ok(Compression::Gzip),
            "zstd" => Ok(Compression::Zstd),
            "estargz" => Err(
                "compression estargz is not supported by berthd (use gzip, zstd or uncompressed)"
                    .into(),
            ),
            other => Err(format!(
                "unsupported compression type {other:?} (want gzip, zstd or uncompressed)"
            )),
        }
    }

    /// The name used in attributes and progress.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Uncompressed => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }

    /// Valid `compression-level` values.
    pub fn levels(self) -> std::ops::RangeInclusive<i32> {
        match self {
            Compression::Uncompressed => 0..=0,
            Compression::Gzip => 0..=9,
            Compression::Zstd => 1..=22,
        }
    }

    fn layer_media_type(self, oci: bool) -> &'static str {
        match (self, oci) {
            (Compression::Uncompressed, true) => "application/vnd.oci.image.layer.v1.tar",
            (Compression::Gzip, true) => "application/vnd.oci.image.layer.v1.tar+gzip",
            (Compression::Zstd, true) => "application/vnd.oci.image.layer.v1.tar+zstd",
            (Compression::Uncompressed, false) => "application/vnd.docker.image.rootfs.diff.tar",
            (Compression::Gzip, false) => "application/vnd.docker.image.rootfs.diff.tar.gzip",
            // Not in the Docker image spec, but what BuildKit v0.11.6 writes (containerd reads it).
            (Compression::Zstd, false) => "application/vnd.docker.image.rootfs.diff.tar.zstd",
        }
    }
}

/// How to write the layout.
#[derive(Debug, Clone)]
pub struct OciOptions {
    /// Layer compression.
    pub compression: Compression,
    /// Compression level; `None` for the compressor's default (gzip 6, zstd 3).
    pub level: Option<i32>,
    /// OCI media types (`oci-mediatypes`); Docker schema 2 types otherwise.
    pub oci_types: bool,
    /// Normalized names (see [`normalize_name`]); one index entry each.
    pub names: Vec<String>,
    /// Value of the `org.opencontainers.image.created` annotation of the manifest descriptor.
    pub created: DateTime<Utc>,
    /// Directory for the unnamed temporary files compressed layers pass through.
    pub temp_dir: PathBuf,
    /// Annotations of a single image's manifest (`annotation-manifest.*`); a multi-platform
    /// image carries its own per platform.
    pub manifest_annotations: BTreeMap<String, String>,
    /// Annotations of the descriptor of the layout's top document in `index.json` and
    /// `containerimage.descriptor` (`annotation-manifest-descriptor.*` for a single image,
    /// `annotation-index-descriptor.*` for an index); they may replace
    /// `org.opencontainers.image.created`.
    pub descriptor_annotations: BTreeMap<String, String>,
}

/// Progress of an OCI export, reported from the writing thread.
#[derive(Debug, Clone)]
pub enum OciProgress {
    /// A layer is being read (and compressed): `done` of `size` uncompressed bytes.
    Layer {
        /// The layer's diffID.
        diff_id: String,
        /// Uncompressed bytes read so far.
        done: u64,
        /// Uncompressed size.
        size: u64,
    },
    /// A layer blob is complete and in the tar.
    LayerDone {
        /// The layer's diffID.
        diff_id: String,
        /// Uncompressed size.
        size: u64,
        /// The blob's digest.
        blob_digest: String,
        /// The blob's size.
        blob_size: u64,
    },
    /// The config blob was written.
    Config {
        /// Its digest.
        digest: String,
    },
    /// The manifest blob was written.
    Manifest {
        /// Its digest.
        digest: String,
    },
}

#[derive(Serialize)]
struct Desc<'a> {
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    digest: &'a str,
    size: u64,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    annotations: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    platform: Option<crate::push::IndexPlatform<'a>>,
}

impl<'a> Desc<'a> {
    fn new(media_type: &'a str, digest: &'a str, size: u64) -> Self {
        Desc {
            media_type,
            digest,
            size,
            annotations: Default::default(),
            platform: None,
        }
    }
}

/// The platform an image config names (`architecture`, `os`, `variant`), else berthd's own, as
/// buildkitd's exporter takes a single image's platform from its config (`ParsePlatforms`, with
/// containerd's normalization: arm64's `v8` variant is dropped).
pub(crate) fn config_platform(config: &[u8]) -> Platform {
    #[derive(serde::Deserialize)]
    struct Cfg {
        #[serde(default)]
        os: String,
        #[serde(default)]
        architecture: String,
        #[serde(default)]
        variant: String,
    }
    match serde_json::from_slice::<Cfg>(config) {
        Ok(c) if !c.os.is_empty() && !c.architecture.is_empty() => {
            let variant = if c.architecture == "arm64" && matches!(c.variant.as_str(), "v8" | "8") {
                String::new()
            } else {
                c.variant
            };
            Platform {
                os: c.os,
                architecture: c.architecture,
                variant,
            }
        }
        _ => Platform::native(),
    }
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

#[derive(Serialize)]
struct Index<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    manifests: Vec<Desc<'a>>,
}

/// The blob of one layer as it went into the tar.
#[derive(Clone)]
struct Blob {
    media_type: &'static str,
    digest: String,
    size: u64,
}

pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub(crate) fn blob_path(digest: &str) -> String {
    format!(
        "blobs/sha256/{}",
        digest.strip_prefix("sha256:").unwrap_or(digest)
    )
}

/// The `index.json` of a layout holding one manifest, and the manifest's descriptor (what
/// `containerimage.descriptor` carries): one index entry per normalized name (with
/// `io.containerd.image.name` and `org.opencontainers.image.ref.name`), or one unnamed entry;
/// every descriptor has `org.opencontainers.image.created` and the image's `platform` (none for
/// an index), as
/// buildkitd's `oci` and `docker` exporters write them.
pub(crate) fn index_and_descriptor(
    manifest_type: &str,
    manifest: &[u8],
    names: &[String],
    created: &DateTime<Utc>,
    annotations: &BTreeMap<String, String>,
    platform: Option<&Platform>,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let index_platform = || {
        platform.map(|p| crate::push::IndexPlatform {
            architecture: &p.architecture,
            os: &p.os,
            variant: &p.variant,
        })
    };
    let manifest_digest = sha256_digest(manifest);
    let created = created.to_rfc3339_opts(SecondsFormat::Secs, true);
    let mut base: BTreeMap<&str, &str> = BTreeMap::new();
    base.insert(ANNOTATION_CREATED, &created);
    for (k, v) in annotations {
        base.insert(k, v);
    }
    let mut desc = Desc::new(manifest_type, &manifest_digest, manifest.len() as u64);
    desc.annotations = base.clone();
    desc.platform = index_platform();
    let descriptor = serde_json::to_vec(&desc).map_err(|source| Error::ImageConfig {
        what: "encode manifest descriptor",
        source,
    })?;
    let ref_names: Vec<String> = names.iter().map(|n| oci_ref_name(n)).collect();
    let manifests = if names.is_empty() {
        vec![desc]
    } else {
        names
            .iter()
            .zip(&ref_names)
            .map(|(name, tag)| {
                let mut d = Desc::new(manifest_type, &manifest_digest, manifest.len() as u64);
                d.annotations = base.clone();
                d.annotations.insert(ANNOTATION_IMAGE_NAME, name);
                d.annotations.insert(ANNOTATION_REF_NAME, tag);
                d.platform = index_platform();
                d
            })
            .collect()
    };
    let index = serde_json::to_vec(&Index {
        schema_version: 2,
        manifests,
    })
    .map_err(|source| Error::ImageConfig {
        what: "encode index.json",
        source,
    })?;
    Ok((index, descriptor))
}

/// `oci-layout` of an OCI image layout.
pub(crate) const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// A layer blob ready to go into the tar.
enum Staged {
    /// Uncompressed: streamed from the layer store while the tar is written.
    Plain,
    /// Compressed into an unnamed temporary file.
    File(File),
    /// The same layer as an earlier one in the chain: one blob serves both.
    Again,
}

/// An image's layout, staged: compressed layers in unnamed temporary files, the documents naming
/// every blob encoded, the digests known.
struct StagedOci {
    image: StagedImage,
    index: Vec<u8>,
    result: ImageExportResult,
}

/// One image, staged: its layers, their blobs (in order), its config and manifest.
struct StagedImage {
    layers: Vec<crate::ExportLayer>,
    blobs: Vec<Blob>,
    staged: Vec<Staged>,
    config: crate::image::ImageConfig,
    manifest: Vec<u8>,
    manifest_type: &'static str,
}

/// What one image of a layout is made of.
struct ImageInput<'a> {
    chain: &'a [LayerRef],
    config: Option<&'a [u8]>,
    epoch: Option<DateTime<Utc>>,
    platform: &'a Platform,
    annotations: &'a BTreeMap<String, String>,
}

/// Stages one image's layers (compressed ones into temporary files, reporting progress) and
/// encodes its config and manifest. A layer already in `seen` (by diffID: an earlier layer of
/// this image or of another image of the same layout) is not staged again: one blob serves all.
fn stage_image(
    store: &SnapshotStore,
    input: &ImageInput<'_>,
    opts: &OciOptions,
    seen: &mut BTreeMap<String, Blob>,
    progress: &mut dyn FnMut(OciProgress),
) -> Result<StagedImage> {
    let (layers, _) = export_layer_tars(store, input.chain)?;
    let config = image_config_for(
        store,
        input.chain,
        input.config,
        input.epoch,
        input.platform,
        &layers,
    )?;
    let oci = opts.oci_types;
    let media_type = opts.compression.layer_media_type(oci);

    let mut staged: Vec<Staged> = Vec::with_capacity(layers.len());
    let mut blobs: Vec<Blob> = Vec::with_capacity(layers.len());
    for layer in &layers {
        if let Some(b) = seen.get(&layer.diff_id) {
            blobs.push(b.clone());
            staged.push(Staged::Again);
            continue;
        }
        let source = layer
            .source
            .as_ref()
            .ok_or_else(|| Error::LayerUnavailable {
                diff_id: layer.diff_id.clone(),
            })?;
        if opts.compression == Compression::Uncompressed {
            let b = Blob {
                media_type,
                digest: layer.diff_id.clone(),
                size: layer.size,
            };
            seen.insert(layer.diff_id.clone(), b.clone());
            blobs.push(b);
            staged.push(Staged::Plain);
            continue;
        }
        let stream_err = |source: io::Error| Error::LayerStream {
            diff_id: layer.diff_id.clone(),
            source,
        };
        let mut report = |done: u64| {
            progress(OciProgress::Layer {
                diff_id: layer.diff_id.clone(),
                done,
                size: layer.size,
            })
        };
        report(0);
        let tmp = tempfile::tempfile_in(&opts.temp_dir).map_err(|source| Error::Io {
            what: "create temporary file for a compressed layer in",
            path: opts.temp_dir.clone(),
            source,
        })?;
        let (tmp, digest, size) = compress_layer(
            tmp,
            source.as_ref(),
            opts.compression,
            opts.level,
            &layer.diff_id,
            layer.size,
            &mut report,
        )
        .map_err(stream_err)?;
        progress(OciProgress::LayerDone {
            diff_id: layer.diff_id.clone(),
            size: layer.size,
            blob_digest: digest.clone(),
            blob_size: size,
        });
        let b = Blob {
            media_type,
            digest,
            size,
        };
        seen.insert(layer.diff_id.clone(), b.clone());
        blobs.push(b);
        staged.push(Staged::File(tmp));
    }

    let (manifest_type, config_type) = if oci {
        (
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.config.v1+json",
        )
    } else {
        (
            crate::DOCKER_MANIFEST_MEDIA_TYPE,
            "application/vnd.docker.container.image.v1+json",
        )
    };
    let manifest = Manifest {
        media_type: manifest_type,
        schema_version: 2,
        config: Desc::new(config_type, &config.digest, config.bytes.len() as u64),
        layers: blobs
            .iter()
            .map(|b| Desc::new(b.media_type, &b.digest, b.size))
            .collect(),
        annotations: input.annotations,
    };
    // Indented like buildkitd's (Go's json.MarshalIndent with two spaces).
    let manifest = serde_json::to_vec_pretty(&manifest).map_err(|source| Error::ImageConfig {
        what: "encode image manifest",
        source,
    })?;
    Ok(StagedImage {
        layers,
        blobs,
        staged,
        config,
        manifest,
        manifest_type,
    })
}

/// Stages a single image and encodes its `index.json`.
fn stage_oci_image(
    store: &SnapshotStore,
    req: &ImageExportRequest<'_>,
    opts: &OciOptions,
    progress: &mut dyn FnMut(OciProgress),
) -> Result<StagedOci> {
    let input = ImageInput {
        chain: req.chain,
        config: req.config,
        epoch: req.epoch,
        platform: &Platform::native(),
        annotations: &opts.manifest_annotations,
    };
    let image = stage_image(store, &input, opts, &mut BTreeMap::new(), progress)?;
    let (index, descriptor) = index_and_descriptor(
        image.manifest_type,
        &image.manifest,
        &opts.names,
        &opts.created,
        &opts.descriptor_annotations,
        Some(&config_platform(&image.config.bytes)),
    )?;
    let result = ImageExportResult {
        config_digest: image.config.digest.clone(),
        manifest_digest: sha256_digest(&image.manifest),
        descriptor: base64::engine::general_purpose::STANDARD.encode(descriptor),
        names: opts.names.clone(),
        ..Default::default()
    };
    Ok(StagedOci {
        image,
        index,
        result,
    })
}

/// Writes `image`'s blobs (layers not staged earlier, its config and manifest) into the tar in
/// name order, as containerd's archive exporter sorts its records for buildkitd; `written` holds
/// the digests of the blobs already in it.
fn write_image_blobs<W: Write>(
    out: &mut W,
    image: StagedImage,
    written: &mut BTreeSet<String>,
    result: &mut ImageExportResult,
    progress: &mut dyn FnMut(OciProgress),
) -> Result<()> {
    let StagedImage {
        layers,
        blobs,
        staged,
        config,
        manifest,
        ..
    } = image;
    enum Item<'a> {
        Layer(&'a archive::ExportLayer, &'a Blob, Staged),
        Config,
        Manifest,
    }
    let manifest_digest = sha256_digest(&manifest);
    let mut items: Vec<(String, Item<'_>)> = Vec::with_capacity(layers.len() + 2);
    for ((layer, blob), stage) in layers.iter().zip(&blobs).zip(staged) {
        if matches!(stage, Staged::Again) || written.contains(&blob.digest) {
            continue;
        }
        items.push((blob.digest.clone(), Item::Layer(layer, blob, stage)));
    }
    items.push((config.digest.clone(), Item::Config));
    items.push((manifest_digest.clone(), Item::Manifest));
    items.sort_by(|a, b| a.0.cmp(&b.0));
    for (digest, item) in items {
        match item {
            Item::Layer(layer, blob, stage) => {
                let stream_err = |source: io::Error| Error::LayerStream {
                    diff_id: layer.diff_id.clone(),
                    source,
                };
                match stage {
                    Staged::Again => continue,
                    Staged::Plain => {
                        let source = layer.source.as_ref().expect("staged layers have a source");
                        let mut report = |done: u64| {
                            progress(OciProgress::Layer {
                                diff_id: layer.diff_id.clone(),
                                done,
                                size: layer.size,
                            })
                        };
                        report(0);
                        archive::write_header(out, &blob_path(&layer.diff_id), layer.size, 0o444)?;
                        let mut w = CheckedTar::new(out, &mut report);
                        source.write_tar(&mut w).map_err(stream_err)?;
                        w.verify(&layer.diff_id, layer.size).map_err(stream_err)?;
                        archive::pad(out, layer.size)?;
                        progress(OciProgress::LayerDone {
                            diff_id: layer.diff_id.clone(),
                            size: layer.size,
                            blob_digest: blob.digest.clone(),
                            blob_size: blob.size,
                        });
                    }
                    Staged::File(mut tmp) => {
                        tmp.rewind().map_err(stream_err)?;
                        archive::write_header(out, &blob_path(&blob.digest), blob.size, 0o444)?;
                        let copied = io::copy(&mut io::Read::take(&mut tmp, blob.size), out)
                            .map_err(|source| Error::ArchiveWrite { source })?;
                        if copied != blob.size {
                            return Err(stream_err(shrank(blob.size, copied)));
                        }
                        archive::pad(out, blob.size)?;
                    }
                }
                written.insert(blob.digest.clone());
                result.layers_sent += 1;
                result.bytes_sent += blob.size;
            }
            Item::Config => {
                if written.insert(digest.clone()) {
                    archive::write_file(out, &blob_path(&digest), &config.bytes, 0o444)?;
                }
                progress(OciProgress::Config { digest });
            }
            Item::Manifest => {
                if written.insert(digest.clone()) {
                    archive::write_file(out, &blob_path(&digest), &manifest, 0o444)?;
                }
                progress(OciProgress::Manifest { digest });
            }
        }
    }
    Ok(())
}

/// The `manifest.json` buildkitd's `oci` exporter writes beside a single image's layout
/// (containerd's archive exporter with `WithSkipDockerManifest`: the image's config and layer
/// blobs, `RepoTags` null), so `docker load` reads it too.
fn docker_manifest_json(image: &StagedImage) -> Result<Vec<u8>> {
    serde_json::to_vec(&[crate::archive::ManifestEntry {
        config: blob_path(&image.config.digest),
        repo_tags: None,
        layers: image.blobs.iter().map(|b| blob_path(&b.digest)).collect(),
    }])
    .map_err(|source| Error::ImageConfig {
        what: "encode manifest.json",
        source,
    })
}

/// Writes the result as an OCI image layout tar to `out`. Blocking; reads each layer from the
/// layer store (and Docker's store, via tar-split), never holding one in memory.
///
/// The digests are known before the first byte is written, as buildkitd's exporter knows them
/// (its blobs are in its content store): compressed layers are staged first, then `ready` is
/// called with the result (the exporter sends the manifest digest to the client with the stream's
/// headers), then the tar is written. Disk use is the sum of the compressed layers while the
/// export runs (unnamed temporary files, gone when it ends); uncompressed layers are streamed
/// straight from the layer store and need none.
pub fn write_oci_image_archive(
    store: &SnapshotStore,
    req: &ImageExportRequest<'_>,
    opts: &OciOptions,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(OciProgress),
    ready: &mut dyn FnMut(&ImageExportResult) -> Result<()>,
) -> Result<ImageExportResult> {
    let StagedOci {
        image,
        index,
        mut result,
    } = stage_oci_image(store, req, opts, progress)?;
    ready(&result)?;

    let mut out = CountingWriter::new(out);
    archive::write_dir(&mut out, "blobs/")?;
    archive::write_dir(&mut out, "blobs/sha256/")?;
    let docker_manifest = docker_manifest_json(&image)?;
    write_image_blobs(&mut out, image, &mut BTreeSet::new(), &mut result, progress)?;
    archive::write_file(&mut out, "index.json", &index, 0o644)?;
    archive::write_file(&mut out, "manifest.json", &docker_manifest, 0o644)?;
    archive::write_file(&mut out, "oci-layout", OCI_LAYOUT, 0o444)?;
    archive::finish(&mut out)?;
    Ok(result)
}

/// A multi-platform result (or a single one with attestations) as an OCI image index.
#[derive(Debug, Clone)]
pub struct OciIndexRequest<'a> {
    /// One image per platform, in the frontend's order.
    pub images: &'a [PlatformImage],
    /// The names as given (the default subjects of attestations are their package URLs).
    pub names: &'a [String],
    /// Annotations of the index (`annotation-index.*`).
    pub index_annotations: &'a BTreeMap<String, String>,
    /// `source-date-epoch`.
    pub epoch: Option<DateTime<Utc>>,
}

/// A staged index: its images, their attestation manifests and the index document.
struct StagedIndex {
    images: Vec<StagedImage>,
    attestations: Vec<crate::attestation::AttestationManifest>,
    index: Vec<u8>,
    layout_index: Vec<u8>,
    result: ImageExportResult,
}

/// Stages every platform's image, the attestation manifests about them, the index over them
/// (the platforms' manifests in order, then the attestation manifests, as buildkitd's image
/// writer) and `index.json` naming the index.
fn stage_oci_index(
    store: &SnapshotStore,
    req: &OciIndexRequest<'_>,
    opts: &OciOptions,
    progress: &mut dyn FnMut(OciProgress),
) -> Result<StagedIndex> {
    let oci = opts.oci_types;
    let mut seen = BTreeMap::new();
    let mut images = Vec::with_capacity(req.images.len());
    let mut attestations = Vec::new();
    let mut attestation_targets = Vec::new();
    for img in req.images {
        let input = ImageInput {
            chain: &img.chain,
            config: img.config.as_deref(),
            epoch: req.epoch,
            platform: &img.platform,
            annotations: &img.manifest_annotations,
        };
        let staged = stage_image(store, &input, opts, &mut seen, progress)?;
        if !img.attestations.is_empty() {
            let mut img = img.clone();
            let digests: Vec<String> = staged.blobs.iter().map(|b| b.digest.clone()).collect();
            crate::push::supplement_sboms_blocking(
                &mut img.attestations,
                &staged.layers,
                &digests,
            )?;
            let target = sha256_digest(&staged.manifest);
            attestations.push(crate::push::attestation_document(
                &img, req.names, &target, oci,
            )?);
            attestation_targets.push(crate::push::attestation_descriptor_annotations(&target));
        }
        images.push(staged);
    }
    let media_type = if oci {
        "application/vnd.oci.image.index.v1+json"
    } else {
        "application/vnd.docker.distribution.manifest.list.v2+json"
    };
    let digests: Vec<String> = images.iter().map(|i| sha256_digest(&i.manifest)).collect();
    let unknown = crate::push::IndexPlatform {
        architecture: "unknown",
        os: "unknown",
        variant: "",
    };
    let index = serde_json::to_vec_pretty(&crate::push::Index {
        media_type,
        schema_version: 2,
        manifests: images
            .iter()
            .zip(req.images)
            .zip(&digests)
            .map(|((staged, img), digest)| crate::push::IndexDesc {
                media_type: staged.manifest_type,
                digest,
                size: staged.manifest.len() as u64,
                annotations: &img.descriptor_annotations,
                platform: crate::push::IndexPlatform {
                    architecture: &img.platform.architecture,
                    os: &img.platform.os,
                    variant: &img.platform.variant,
                },
            })
            .chain(
                attestations
                    .iter()
                    .zip(&attestation_targets)
                    .map(|(m, annotations)| crate::push::IndexDesc {
                        media_type: m.media_type,
                        digest: &m.digest,
                        size: m.manifest.len() as u64,
                        annotations,
                        platform: crate::push::IndexPlatform { ..unknown },
                    }),
            )
            .collect(),
        annotations: req.index_annotations,
    })
    .map_err(|source| Error::ImageConfig {
        what: "encode image index",
        source,
    })?;
    let (layout_index, descriptor) = index_and_descriptor(
        media_type,
        &index,
        &opts.names,
        &opts.created,
        &opts.descriptor_annotations,
        None,
    )?;
    let result = ImageExportResult {
        manifest_digest: sha256_digest(&index),
        descriptor: base64::engine::general_purpose::STANDARD.encode(descriptor),
        names: opts.names.clone(),
        ..Default::default()
    };
    Ok(StagedIndex {
        images,
        attestations,
        index,
        layout_index,
        result,
    })
}

/// Writes a multi-platform result as an OCI image layout tar to `out`: every platform's blobs
/// (a layer shared by platforms once), the attestation manifests' blobs, the index, then
/// `index.json` naming the index (one entry per name, with the `annotation-index-descriptor.*`
/// annotations). As [`write_oci_image_archive`], everything is staged (and `ready` called with
/// the index's digest and descriptor) before the first byte. The result has no config digest.
pub fn write_oci_index_archive(
    store: &SnapshotStore,
    req: &OciIndexRequest<'_>,
    opts: &OciOptions,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(OciProgress),
    ready: &mut dyn FnMut(&ImageExportResult) -> Result<()>,
) -> Result<ImageExportResult> {
    write_index_archive(store, req, opts, None, out, progress, ready)
}

/// Writes a single image with attestations as buildkitd's `docker` exporter does: the OCI
/// image layout of [`write_oci_index_archive`] (the index over the image and its attestation
/// manifests, named in `index.json`) plus `manifest.json` listing the image (config and layer
/// blobs of the layout, `repo_tags` its familiar names), which is what `docker load` reads; the
/// attestation manifests stay in the layout only. `opts.compression` should be
/// [`Compression::Uncompressed`], as `docker load` of this archive reads its layer blobs as
/// they are.
pub fn write_docker_index_archive(
    store: &SnapshotStore,
    req: &OciIndexRequest<'_>,
    opts: &OciOptions,
    repo_tags: &[String],
    out: &mut dyn Write,
    progress: &mut dyn FnMut(OciProgress),
    ready: &mut dyn FnMut(&ImageExportResult) -> Result<()>,
) -> Result<ImageExportResult> {
    write_index_archive(store, req, opts, Some(repo_tags), out, progress, ready)
}

fn write_index_archive(
    store: &SnapshotStore,
    req: &OciIndexRequest<'_>,
    opts: &OciOptions,
    docker_tags: Option<&[String]>,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(OciProgress),
    ready: &mut dyn FnMut(&ImageExportResult) -> Result<()>,
) -> Result<ImageExportResult> {
    let StagedIndex {
        images,
        attestations,
        index,
        layout_index,
        mut result,
    } = stage_oci_index(store, req, opts, progress)?;
    ready(&result)?;
    let mut out = CountingWriter::new(out);
    archive::write_dir(&mut out, "blobs/")?;
    archive::write_dir(&mut out, "blobs/sha256/")?;
    let mut written = BTreeSet::new();
    // `manifest.json` of a docker archive: every image of the index, with the names.
    let docker_manifest = docker_tags.map(|tags| {
        images
            .iter()
            .map(|i| crate::archive::ManifestEntry {
                config: blob_path(&i.config.digest),
                repo_tags: (!tags.is_empty()).then_some(tags),
                layers: i.blobs.iter().map(|b| blob_path(&b.digest)).collect(),
            })
            .collect::<Vec<_>>()
    });
    let docker_manifest = docker_manifest
        .map(|m| serde_json::to_vec(&m))
        .transpose()
        .map_err(|source| Error::ImageConfig {
            what: "encode manifest.json",
            source,
        })?;
    for image in images {
        write_image_blobs(&mut out, image, &mut written, &mut result, progress)?;
    }
    for m in &attestations {
        for b in m.layers.iter().chain([&m.config, &m.manifest]) {
            let digest = sha256_digest(b);
            if written.insert(digest.clone()) {
                archive::write_file(&mut out, &blob_path(&digest), b, 0o444)?;
            }
        }
    }
    archive::write_file(&mut out, &blob_path(&result.manifest_digest), &index, 0o444)?;
    archive::write_file(&mut out, "index.json", &layout_index, 0o644)?;
    if let Some(m) = &docker_manifest {
        archive::write_file(&mut out, "manifest.json", m, 0o644)?;
    }
    archive::write_file(&mut out, "oci-layout", OCI_LAYOUT, 0o444)?;
    archive::finish(&mut out)?;
    Ok(result)
}

/// Writes a multi-platform result's blobs into `sink` (`type=oci,tar=false`): each image's as
/// [`write_oci_image_blobs`] does, the attestation manifests' blobs, then the index; the client
/// names the index in its `index.json` from `containerimage.descriptor`.
pub fn write_oci_index_blobs(
    store: &SnapshotStore,
    req: &OciIndexRequest<'_>,
    opts: &OciOptions,
    sink: &mut dyn BlobSink,
    progress: &mut dyn FnMut(OciProgress),
) -> Result<ImageExportResult> {
    let StagedIndex {
        images,
        attestations,
        index,
        mut result,
        ..
    } = stage_oci_index(store, req, opts, progress)?;
    for image in images {
        put_image_blobs(sink, image, &mut result, progress)?;
    }
    for m in &attestations {
        for b in m.layers.iter().chain([&m.config, &m.manifest]) {
            put_bytes(sink, &sha256_digest(b), b)?;
        }
    }
    let digest = result.manifest_digest.clone();
    put_bytes(sink, &digest, &index)?;
    Ok(result)
}

fn shrank(expected: u64, copied: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("compressed blob shrank from {expected} to {copied} bytes"),
    )
}

/// A content store an image's blobs are written into by digest, as buildkitd's `oci` and
/// `docker` exporters with `tar=false` write into the client's store (`export`, over the
/// session); the client then names the manifest in its `index.json`. Called on a blocking thread.
pub trait BlobSink {
    /// Names the store in errors.
    fn describe(&self) -> String;
    /// Whether the store already holds `digest` (it is then not written again).
    fn has(&mut self, digest: &str) -> io::Result<bool>;
    /// Writes blob `digest` of `size` bytes; `fill` produces the bytes (exactly `size` of them,
    /// hashing to `digest`).
    fn write(
        &mut self,
        digest: &str,
        size: u64,
        fill: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
    ) -> io::Result<()>;
}

fn sink_err(sink: &dyn BlobSink, digest: &str, source: io::Error) -> Error {
    Error::ContentStore {
        store: sink.describe(),
        digest: digest.to_string(),
        source,
    }
}

/// Writes `bytes` as blob `digest` unless the store has it.
fn put_bytes(sink: &mut dyn BlobSink, digest: &str, bytes: &[u8]) -> Result<bool> {
    if sink.has(digest).map_err(|e| sink_err(sink, digest, e))? {
        return Ok(false);
    }
    sink.write(digest, bytes.len() as u64, &mut |w| w.write_all(bytes))
        .map_err(|e| sink_err(sink, digest, e))?;
    Ok(true)
}

/// Writes layer `layer`'s uncompressed tar (its diffID is the blob digest) unless the store has
/// it, checking the bytes against the diffID; `report` sees the bytes written so far.
fn put_plain_layer(
    sink: &mut dyn BlobSink,
    layer: &crate::ExportLayer,
    report: &mut dyn FnMut(u64),
) -> Result<bool> {
    let digest = layer.diff_id.as_str();
    if sink.has(digest).map_err(|e| sink_err(sink, digest, e))? {
        return Ok(false);
    }
    let source = layer
        .source
        .as_ref()
        .ok_or_else(|| Error::LayerUnavailable {
            diff_id: layer.diff_id.clone(),
        })?;
    let mut produced: Option<io::Error> = None;
    let res = sink.write(digest, layer.size, &mut |w| {
        let mut w = w;
        let mut c = CheckedTar::new(&mut w, report);
        let r = source
            .write_tar(&mut c)
            .and_then(|()| c.verify(&layer.diff_id, layer.size));
        if let Err(e) = &r {
            produced = Some(io::Error::new(e.kind(), e.to_string()));
        }
        r
    });
    match (res, produced) {
        (Ok(()), _) => Ok(true),
        // The layer itself failed: that, not the store's view of the aborted write, is the cause.
        (Err(_), Some(e)) => Err(Error::LayerStream {
            diff_id: layer.diff_id.clone(),
            source: e,
        }),
        (Err(e), None) => Err(sink_err(sink, digest, e)),
    }
}

/// Writes the result's blobs (layers, config, manifest, in that order: a manifest is never in
/// the store before what it names) into `sink`, as `type=oci,tar=false` does. Blobs the store
/// already has are not written again. The client writes `index.json` from the descriptor in the
/// result (`containerimage.descriptor`). Blocking; layers are streamed as for the tar.
pub fn write_oci_image_blobs(
    store: &SnapshotStore,
    req: &ImageExportRequest<'_>,
    opts: &OciOptions,
    sink: &mut dyn BlobSink,
    progress: &mut dyn FnMut(OciProgress),
) -> Result<ImageExportResult> {
    let StagedOci {
        image, mut result, ..
    } = stage_oci_image(store, req, opts, progress)?;
    put_image_blobs(sink, image, &mut result, progress)?;
    Ok(result)
}

/// Writes one staged image's blobs (layers, config, manifest) into `sink`, counting layers.
fn put_image_blobs(
    sink: &mut dyn BlobSink,
    image: StagedImage,
    result: &mut ImageExportResult,
    progress: &mut dyn FnMut(OciProgress),
) -> Result<()> {
    let StagedImage {
        layers,
        blobs,
        staged,
        config,
        manifest,
        ..
    } = image;
    for ((layer, blob), stage) in layers.iter().zip(&blobs).zip(staged) {
        let written = match stage {
            Staged::Again => continue,
            Staged::Plain => {
                let mut report = |done: u64| {
                    progress(OciProgress::Layer {
                        diff_id: layer.diff_id.clone(),
                        done,
                        size: layer.size,
                    })
                };
                report(0);
                let w = put_plain_layer(sink, layer, &mut report)?;
                progress(OciProgress::LayerDone {
                    diff_id: layer.diff_id.clone(),
                    size: layer.size,
                    blob_digest: blob.digest.clone(),
                    blob_size: blob.size,
                });
                w
            }
            Staged::File(mut tmp) => {
                let digest = blob.digest.as_str();
                if sink.has(digest).map_err(|e| sink_err(sink, digest, e))? {
                    false
                } else {
                    let size = blob.size;
                    sink.write(digest, size, &mut |w| {
                        tmp.rewind()?;
                        let copied = io::copy(&mut io::Read::take(&mut tmp, size), w)?;
                        if copied != size {
                            return Err(shrank(size, copied));
                        }
                        Ok(())
                    })
                    .map_err(|e| sink_err(sink, digest, e))?;
                    true
                }
            }
        };
        if written {
            result.layers_sent += 1;
            result.bytes_sent += blob.size;
        } else {
            result.layers_skipped += 1;
            result.bytes_skipped += blob.size;
        }
    }
    put_bytes(sink, &config.digest, &config.bytes)?;
    progress(OciProgress::Config {
        digest: config.digest.clone(),
    });
    let manifest_digest = sha256_digest(&manifest);
    put_bytes(sink, &manifest_digest, &manifest)?;
    progress(OciProgress::Manifest {
        digest: manifest_digest,
    });
    Ok(())
}

/// Writes the blobs of the `docker` exporter's image (uncompressed layers, the config, the
/// Docker schema 2 manifest: the same blobs as its archive's `blobs/sha256/`) into `sink`, as
/// `type=docker,tar=false` does. `on_layer(diff_id, size, written)` is told about every distinct
/// layer.
pub fn write_docker_image_blobs(
    store: &SnapshotStore,
    req: &ImageExportRequest<'_>,
    created: &DateTime<Utc>,
    sink: &mut dyn BlobSink,
    on_layer: &mut dyn FnMut(&str, u64, bool),
) -> Result<ImageExportResult> {
    let (layers, _) = export_layer_tars(store, req.chain)?;
    let config = image_config(store, req, &layers)?;
    let manifest = crate::docker_image::docker_manifest(&config, &layers);
    let (_, descriptor) = index_and_descriptor(
        crate::DOCKER_MANIFEST_MEDIA_TYPE,
        &manifest,
        &req.names,
        created,
        &BTreeMap::new(),
        Some(&config_platform(&config.bytes)),
    )?;
    let mut result = ImageExportResult {
        config_digest: config.digest.clone(),
        manifest_digest: sha256_digest(&manifest),
        descriptor: base64::engine::general_purpose::STANDARD.encode(descriptor),
        names: req.names.clone(),
        ..Default::default()
    };
    for (i, layer) in layers.iter().enumerate() {
        if layers[..i].iter().any(|l| l.diff_id == layer.diff_id) {
            continue;
        }
        let written = put_plain_layer(sink, layer, &mut |_| {})?;
        on_layer(&layer.diff_id, layer.size, written);
        if written {
            result.layers_sent += 1;
            result.bytes_sent += layer.size;
        } else {
            result.layers_skipped += 1;
            result.bytes_skipped += layer.size;
        }
    }
    put_bytes(sink, &config.digest, &config.bytes)?;
    put_bytes(sink, &result.manifest_digest, &manifest)?;
    Ok(result)
}

/// Compresses `source` into `tmp`, checking the uncompressed bytes against `diff_id`/`size`;
/// returns the file with the compressed blob's digest and size.
fn compress_layer(
    tmp: File,
    source: &dyn crate::LayerSource,
    compression: Compression,
    level: Option<i32>,
    diff_id: &str,
    size: u64,
    report: &mut dyn FnMut(u64),
) -> io::Result<(File, String, u64)> {
    let blob = HashingWriter::new(io::BufWriter::with_capacity(1 << 20, tmp));
    let blob = match compression {
        Compression::Gzip => {
            let level = flate2::Compression::new(level.unwrap_or(6).clamp(0, 9) as u32);
            let mut enc = flate2::write::GzEncoder::new(blob, level);
            let mut w = CheckedTar::new(&mut enc, report);
            source.write_tar(&mut w)?;
            w.verify(diff_id, size)?;
            enc.finish()?
        }
        Compression::Zstd => {
            let mut enc = zstd::stream::write::Encoder::new(blob, level.unwrap_or(3))?;
            let mut w = CheckedTar::new(&mut enc, report);
            source.write_tar(&mut w)?;
            w.verify(diff_id, size)?;
            enc.finish()?
        }
        Compression::Uncompressed => unreachable!("uncompressed layers are not staged"),
    };
    let HashingWriter { inner, hash, count } = blob;
    let digest = format!("sha256:{}", hex::encode(hash.finalize()));
    let file = inner
        .into_inner()
        .map_err(|e| io::Error::other(format!("flush compressed layer: {}", e.error())))?;
    Ok((file, digest, count))
}

/// Counts and hashes what passes through.
struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hash: Sha256::new(),
            count: 0,
        }
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The uncompressed side of a layer: hashes and counts it, reports progress every 8 MiB, and
/// finally checks it against the diffID and size the config and manifest promise.
struct CheckedTar<'a, W: Write> {
    inner: HashingWriter<&'a mut W>,
    report: &'a mut dyn FnMut(u64),
    reported: u64,
}

impl<'a, W: Write> CheckedTar<'a, W> {
    fn new(inner: &'a mut W, report: &'a mut dyn FnMut(u64)) -> Self {
        CheckedTar {
            inner: HashingWriter::new(inner),
            report,
            reported: 0,
        }
    }

    fn verify(mut self, diff_id: &str, size: u64) -> io::Result<()> {
        (self.report)(self.inner.count);
        if self.inner.count != size {
            return Err(io::Error::other(format!(
                "layer tar has {} bytes, expected {size}",
                self.inner.count
            )));
        }
        let got = format!("sha256:{}", hex::encode(self.inner.hash.finalize_reset()));
        if got != diff_id {
            return Err(io::Error::other(format!(
                "layer tar hashes to {got}, not its diffID"
            )));
        }
        Ok(())
    }
}

impl<W: Write> Write for CheckedTar<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if self.inner.count - self.reported >= 8 << 20 {
            self.reported = self.inner.count;
            (self.report)(self.reported);
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Normalizes an image name the way buildkitd does before writing it (`docker.io/library/`
/// added to short names, `:latest` to names without tag or digest): `app` →
/// `docker.io/library/app:latest`, `localhost:5000/a/b` → `localhost:5000/a/b:latest`.
pub fn normalize_name(name: &str) -> Result<String> {
    let bad = |reason: &'static str| Error::InvalidName {
        name: name.to_string(),
        reason,
    };
    let (rest, digest) = match name.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (name, None),
    };
    if let Some(d) = digest {
        let ok = d.split_once(':').is_some_and(|(alg, hex)| {
            !alg.is_empty() && hex.len() >= 32 && hex.bytes().all(|c| c.is_ascii_hexdigit())
        });
        if !ok {
            return Err(bad("invalid digest after '@'"));
        }
    }
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (repo, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(t) = tag {
        let ok = !t.is_empty()
            && t.len() <= 128
            && t.bytes()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_')
            && t.bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(&c));
        if !ok {
            return Err(bad("invalid tag"));
        }
    }
    let (domain, path) = match repo.split_once('/') {
        Some((first, p)) if first.contains(['.', ':']) || first == "localhost" => {
            (first.to_string(), p.to_string())
        }
        _ => {
            let path = if repo.contains('/') {
                repo.to_string()
            } else {
                format!("library/{repo}")
            };
            ("docker.io".to_string(), path)
        }
    };
    if domain.is_empty() || domain.starts_with(['-', '.', ':']) {
        return Err(bad("invalid registry host"));
    }
    for component in path.split('/') {
        if component.is_empty() {
            return Err(bad("empty path component"));
        }
        if component.bytes().any(|c| c.is_ascii_uppercase()) {
            return Err(bad("repository name must be lowercase"));
        }
        let b = component.as_bytes();
        let ok = b
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c))
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric();
        if !ok {
            return Err(bad("invalid repository path component"));
        }
    }
    let mut out = format!("{domain}/{path}");
    match (tag, digest) {
        (None, None) => out.push_str(":latest"),
        (Some(t), _) => {
            out.push(':');
            out.push_str(t);
        }
        (None, Some(_)) => {}
    }
    if let Some(d) = digest {
        out.push('@');
        out.push_str(d);
    }
    Ok(out)
}

/// The familiar form of a normalized name, as Docker shows it and as `RepoTags` of a
/// docker-archive carry it: `docker.io/library/app:1` → `app:1`, `docker.io/u/app:1` → `u/app:1`,
/// other registries unchanged.
pub fn familiar_name(name: &str) -> String {
    match name.strip_prefix("docker.io/") {
        Some(rest) => match rest.strip_prefix("library/") {
            Some(official) if !official.contains('/') => official.to_string(),
            _ => rest.to_string(),
        },
        None => name.to_string(),
    }
}

/// The OCI reference name of a normalized name: what follows the repository (the tag, or
/// `@digest`), as containerd's archive writer computes it.
fn oci_ref_name(name: &str) -> String {
    let path_start = name.find('/').unwrap_or(0);
    match name[path_start..].find([':', '@']) {
        Some(i) => {
            let obj = &name[path_start + i..];
            obj.strip_prefix(':').unwrap_or(obj).to_string()
        }
        None => name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalize_like_docker_references() {
        let cases = [
            ("app", "docker.io/library/app:latest"),
            ("app:v1", "docker.io/library/app:v1"),
            ("user/app", "docker.io/user/app:latest"),
            ("localhost/app", "localhost/app:latest"),
            ("localhost:5000/a/b:t", "localhost:5000/a/b:t"),
            ("127.0.0.1:5000/x/app", "127.0.0.1:5000/x/app:latest"),
            ("quay.io/a/b:1.0-x", "quay.io/a/b:1.0-x"),
        ];
        for (i, want) in cases {
            assert_eq!(normalize_name(i).unwrap(), want, "{i}");
        }
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            normalize_name(&format!("app@{d}")).unwrap(),
            format!("docker.io/library/app@{d}")
        );
        for bad in [
            "App",
            "app:",
            "app:-x",
            "a//b",
            "app@sha256:zz",
            "-a",
            "a/b_",
        ] {
            assert!(normalize_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn familiar_names_drop_docker_io_and_library() {
        for (n, f) in [
            ("docker.io/library/app:1", "app:1"),
            ("docker.io/user/app:latest", "user/app:latest"),
            ("docker.io/library/a/b:1", "library/a/b:1"),
            (
                "example.com/buildkit/testoci:latest",
                "example.com/buildkit/testoci:latest",
            ),
            ("localhost:5000/app:t", "localhost:5000/app:t"),
        ] {
            assert_eq!(familiar_name(n), f, "{n}");
        }
    }

    #[test]
    fn ref_name_is_the_tag_or_digest() {
        assert_eq!(oci_ref_name("docker.io/library/app:v1"), "v1");
        assert_eq!(oci_ref_name("localhost:5000/a/b:t"), "t");
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            oci_ref_name(&format!("docker.io/library/app@{d}")),
            format!("@{d}")
        );
    }

    #[test]
    fn compression_attribute_values() {
        assert_eq!(Compression::parse("gzip").unwrap(), Compression::Gzip);
        assert_eq!(Compression::parse("zstd").unwrap(), Compression::Zstd);
        assert_eq!(
            Compression::parse("uncompressed").unwrap(),
            Compression::Uncompressed
        );
        assert!(Compression::parse("estargz")
            .unwrap_err()
            .contains("estargz"));
        assert!(Compression::parse("lz4").unwrap_err().contains("lz4"));
        assert_eq!(
            Compression::Gzip.layer_media_type(false),
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        );
        assert_eq!(
            Compression::Zstd.layer_media_type(true),
            "application/vnd.oci.image.layer.v1.tar+zstd"
        );
        // zstd does not force OCI media types (BuildKit v0.11.6's zstd is not OCI-only).
        assert_eq!(
            Compression::Zstd.layer_media_type(false),
            "application/vnd.docker.image.rootfs.diff.tar.zstd"
        );
    }

    struct Bytes(Vec<u8>);
    impl crate::LayerSource for Bytes {
        fn write_tar(&self, out: &mut dyn Write) -> io::Result<()> {
            for c in self.0.chunks(1000) {
                out.write_all(c)?;
            }
            Ok(())
        }
    }

    #[test]
    fn compressed_layer_round_trips_and_is_checked() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 97) as u8).collect();
        let diff_id = sha256_digest(&data);
        for c in [Compression::Gzip, Compression::Zstd] {
            let tmp = tempfile::tempfile().unwrap();
            let mut seen = 0;
            let (mut f, digest, size) = compress_layer(
                tmp,
                &Bytes(data.clone()),
                c,
                None,
                &diff_id,
                data.len() as u64,
                &mut |n| seen = n,
            )
            .unwrap();
            assert_eq!(seen, data.len() as u64);
            f.rewind().unwrap();
            let mut blob = Vec::new();
            io::Read::read_to_end(&mut f, &mut blob).unwrap();
            assert_eq!(blob.len() as u64, size);
            assert_eq!(sha256_digest(&blob), digest);
            assert!(size < data.len() as u64 / 4, "{c:?} did not compress");
            let mut plain = Vec::new();
            match c {
                Compression::Gzip => {
                    io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&blob[..]), &mut plain)
                        .unwrap();
                }
                _ => plain = zstd::stream::decode_all(&blob[..]).unwrap(),
            }
            assert_eq!(plain, data);
        }
        // A source that does not hash to its diffID is refused.
        let err = compress_layer(
            tempfile::tempfile().unwrap(),
            &Bytes(data.clone()),
            Compression::Gzip,
            Some(1),
            &sha256_digest(b"other"),
            data.len() as u64,
            &mut |_| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("not its diffID"), "{err}");
    }
}
