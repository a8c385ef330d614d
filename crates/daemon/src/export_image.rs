//! The `image` exporter (alias `moby`): the result becomes an image in the Docker Engine berthd is
//! bound to, through [`exporter::ImageTarget`] (thin load into a live classic store, direct write
//! into a stopped daemon's data root, or containerd). This module maps attributes, progress and
//! the exporter response the way buildkitd does (`control-api.md` §6.2, §8.3):
//!
//! - attrs: `name` (comma-separated; `*` takes `image.name` from the result metadata),
//!   `source-date-epoch`, `push` (push every name with berth's registry client and the session's
//!   registry credentials: [`exporter::push_image`], with `compression`, `compression-level`,
//!   `force-compression`, `oci-mediatypes`, `push-by-digest`, `registry.insecure`,
//!   `prefer-nondist-layers`),
//!   `store`/`unpack` (accepted, the image is always stored);
//! - annotations (`annotation[-index|-index-descriptor|-manifest|-manifest-descriptor][[platform]].key`,
//!   from the result's metadata with the attributes over them) go into pushed manifests and
//!   indexes where BuildKit puts them;
//! - a multi-platform result (ref map + `refs.platforms`) is only pushed ([`export_multi`]): an
//!   index over one manifest per platform, then one attestation manifest per platform that has
//!   attestations ([`exporter::attestation`]; they force OCI media types); Docker's classic store
//!   holds one image per name, so without `push=true` it is refused;
//! - progress: a vertex `exporting to image` with the statuses `exporting layers` (bytes of the
//!   layers Docker lacked), one per layer (`layer sha256:… registered` with its size, or
//!   `layer sha256:… already in Docker` with the bytes not sent), `writing image sha256:…`, one
//!   `naming to <name>` per name, and with `push=true` `pushing <name>` (bytes uploaded, all
//!   blobs), one status per blob (its digest, bytes sent) and `pushing manifest for
//!   <name>@<digest>`;
//! - response: `containerimage.digest`, `containerimage.config.digest`,
//!   `containerimage.descriptor` and `image.name`. After a push, `containerimage.digest` and the
//!   descriptor are those of the manifest the registry holds (compressed layers, so it differs
//!   from the uncompressed manifest of the local image).
//!
//! Crash safety: [`recover_at_start`] removes what a killed berthd left in the image store (a
//! stopped data root's temp dirs and unfinished layer dirs, its containerd leases and prepared
//! snapshots, its base-image pins); every store write is a `BERTH_FAULT_KILL` fault point
//! (`layerstore::dockerstore::fault`).
//!
//! Test/expert knob: `BERTH_CONTAINERD_ADDRESS=<socket>` sends `type=image` to that containerd
//! (namespace `BERTH_CONTAINERD_NAMESPACE`, default `moby`; snapshotter `overlayfs`) whatever the
//! Docker Engine reports, for engines whose `/info` does not show their containerd store and for
//! testing against containerd itself. Tags still go through the Docker Engine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use exporter::{ContainerdStore, ImageExportRequest, ImageTarget, TargetOptions};
use layerstore::snapshot::SnapshotStore;
use sha2::Digest as _;

use crate::errors::{Error, Result};
use crate::progress::{synthetic_digest, Progress};
use crate::session::SessionManager;
use crate::solver::FsRef;

/// Where the image exporter sends images.
#[derive(Debug, Clone)]
pub struct ImageExportOptions {
    /// Docker Engine address (`unix:///…` or `tcp://…`).
    pub docker_host: String,
    /// `--docker-data-root`, if given.
    pub data_root: Option<PathBuf>,
    /// The Engine's containerd (containerd image store), if configured.
    pub containerd: containerdstore::EndpointOptions,
    /// Registry client for `push=true`.
    pub registry: registry::Registry,
    /// Compressed layer blobs, shared by pushes (`<root>/blobs`).
    pub blobs: registry::BlobCache,
}

/// Environment variable: a containerd socket `type=image` writes to instead of detecting.
pub const CONTAINERD_ADDRESS_ENV: &str = "BERTH_CONTAINERD_ADDRESS";
/// Environment variable: the containerd namespace with [`CONTAINERD_ADDRESS_ENV`].
pub const CONTAINERD_NAMESPACE_ENV: &str = "BERTH_CONTAINERD_NAMESPACE";

/// The name under which this berthd's containerd leases and prepared snapshots are labelled:
/// stable across restarts of one `--root`, different for two berthds.
fn owner(store: &SnapshotStore) -> String {
    let root = std::fs::canonicalize(store.dir()).unwrap_or_else(|_| store.dir().to_path_buf());
    let h = sha2::Sha256::digest(root.as_os_str().as_encoded_bytes());
    format!("berthd-{}", hex::encode(&h[..8]))
}

/// The export target: `BERTH_CONTAINERD_ADDRESS` if set, else detected from `GET /info`.
async fn target(opts: &ImageExportOptions, store: &SnapshotStore) -> Result<ImageTarget> {
    let docker = match crate::docker::connect(&opts.docker_host) {
        Ok(d) => d,
        // A stopped dockerd usually removed its socket, and the client refuses a missing one:
        // with a data root that is the offline mode, as when the daemon does not answer.
        Err(e) => match &opts.data_root {
            Some(root) => return Ok(offline_target(root)),
            None => return Err(e),
        },
    };
    let unavailable = |e: exporter::Error| Error::unavailable(format!("exporter image: {e}"));
    if let Some(addr) = std::env::var_os(CONTAINERD_ADDRESS_ENV).filter(|a| !a.is_empty()) {
        let ns = std::env::var(CONTAINERD_NAMESPACE_ENV).unwrap_or_else(|_| "moby".into());
        let cstore = ContainerdStore::connect(Path::new(&addr), &ns, "overlayfs")
            .await
            .map_err(unavailable)?
            .with_owner(owner(store));
        return Ok(ImageTarget::Containerd {
            docker,
            store: cstore,
        });
    }
    let target = ImageTarget::detect(
        docker,
        &TargetOptions {
            data_root: opts.data_root.clone(),
            containerd: opts.containerd.clone(),
            ..Default::default()
        },
    )
    .await
    .map_err(unavailable)?;
    Ok(match target {
        ImageTarget::Containerd { docker, store: s } => ImageTarget::Containerd {
            docker,
            store: s.with_owner(owner(store)),
        },
        t => t,
    })
}

/// The offline target for a data root whose daemon cannot be reached: the storage driver is the
/// one whose `image/<driver>/layerdb` exists (`overlay2` for an empty data root).
fn offline_target(root: &Path) -> ImageTarget {
    let driver = layerstore::dockerstore::offline_driver(root);
    ImageTarget::ClassicOffline {
        data_root: root.to_path_buf(),
        driver,
        check: Default::default(),
    }
}

/// Removes what a previous berthd on this root left behind when it was killed mid-export: in a
/// stopped daemon's data root the unfinished layer dirs, write-sets and temp files
/// (`OfflineWriter` recovery); in a containerd store this berthd's leases and prepared
/// snapshots; in a live Docker Engine the base-image pins of `worker_root`. Runs before berthd
/// serves; failures are logged, never fatal (the next export recovers again).
pub async fn recover_at_start(
    opts: &ImageExportOptions,
    store: &SnapshotStore,
    worker_root: &Path,
) {
    let work = async {
        match target(opts, store).await? {
            ImageTarget::ClassicOffline {
                data_root,
                driver,
                check,
            } => {
                tokio::task::spawn_blocking(move || {
                    let ds = layerstore::dockerstore::DockerStore::new(data_root, driver);
                    // Opening runs the recovery (and refuses a data root a daemon uses).
                    layerstore::dockerstore::OfflineWriter::open(ds, &check).map(drop)
                })
                .await
                .map_err(|e| Error::internal(format!("recovery task: {e}")))?
                .map_err(|e| Error::unavailable(format!("recover Docker data root: {e}")))?;
            }
            ImageTarget::Containerd { store: s, docker } => {
                remove_base_leases(&docker, &opts.containerd, worker_root).await?;
                let r = s
                    .remove_leftovers()
                    .await
                    .map_err(|e| Error::unavailable(format!("containerd leftovers: {e}")))?;
                if r.leases + r.snapshots > 0 {
                    tracing::info!(
                        leases = r.leases,
                        snapshots = r.snapshots,
                        "removed containerd leftovers of an interrupted export"
                    );
                }
            }
            ImageTarget::ClassicLive { engine } => {
                let instance = format!("worker:{}", worker_root.display());
                let n = layerstore::dockerstore::remove_stale_pins(engine.client(), &instance)
                    .await
                    .map_err(|e| Error::unavailable(format!("remove stale pins: {e}")))?;
                if n > 0 {
                    tracing::info!(removed = n, "removed base-image pins of a previous berthd");
                }
            }
        }
        Ok::<_, Error>(())
    };
    match tokio::time::timeout(Duration::from_secs(20), work).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "image store recovery at start failed"),
        Err(_) => tracing::warn!("image store recovery at start timed out"),
    }
}

/// Deletes the base-image leases and views a killed berthd on this worker root left in the
/// Engine's containerd (the worker does it again before its first lease, see
/// `worker::ops::source_image`).
async fn remove_base_leases(
    docker: &bollard::Docker,
    configured: &containerdstore::EndpointOptions,
    worker_root: &Path,
) -> Result<()> {
    let info = docker
        .info()
        .await
        .map_err(|e| Error::unavailable(format!("docker info: {e}")))?;
    let Some(ep) = containerdstore::Endpoint::detect(&info, configured) else {
        return Ok(());
    };
    let client = containerdstore::Client::connect(&ep)
        .await
        .map_err(|e| Error::unavailable(e.to_string()))?;
    let r = client
        .remove_leftovers(&format!("worker:{}", worker_root.display()))
        .await
        .map_err(|e| Error::unavailable(format!("containerd base-image leases: {e}")))?;
    if r.leases + r.views > 0 {
        tracing::info!(
            leases = r.leases,
            views = r.views,
            "removed base-image leases of a previous berthd"
        );
    }
    Ok(())
}

/// At berthd's stop: no new base-image pins, and removes this root's pins from the live Docker
/// Engine (builds canceled by the stop may still hold some). Bounded; failures are logged (the
/// next start removes what is left).
pub async fn remove_pins_at_stop(
    opts: &ImageExportOptions,
    store: &SnapshotStore,
    worker_root: &Path,
) {
    layerstore::dockerstore::stop_pinning();
    let work = async {
        if let ImageTarget::ClassicLive { engine } = target(opts, store).await? {
            let instance = format!("worker:{}", worker_root.display());
            let n = layerstore::dockerstore::remove_stale_pins(engine.client(), &instance)
                .await
                .map_err(|e| Error::unavailable(format!("remove pins: {e}")))?;
            tracing::info!(removed = n, "base-image pins removed at stop");
        }
        Ok::<_, Error>(())
    };
    match tokio::time::timeout(Duration::from_secs(10), work).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "removing base-image pins at stop failed"),
        Err(_) => tracing::warn!("removing base-image pins at stop timed out"),
    }
}

/// Names to apply: the `name` attr split on commas; `*` stands for the result's `image.name`.
pub(crate) fn names(
    attrs: &BTreeMap<String, String>,
    metadata: &BTreeMap<String, Bytes>,
) -> Vec<String> {
    let mut out = Vec::new();
    for n in attrs
        .get("name")
        .map(String::as_str)
        .unwrap_or("")
        .split(',')
    {
        let n = n.trim();
        if n == "*" {
            if let Some(v) = metadata.get("image.name") {
                out.extend(
                    String::from_utf8_lossy(v)
                        .split(',')
                        .map(|s| s.trim().to_string()),
                );
            }
        } else if !n.is_empty() {
            out.push(n.to_string());
        }
    }
    out.retain(|n| !n.is_empty());
    out
}

pub(crate) fn truthy(attrs: &BTreeMap<String, String>, key: &str) -> Result<bool> {
    match attrs.get(key).map(String::as_str) {
        None | Some("") | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(v) => Err(Error::invalid(format!(
            "invalid boolean {v:?} for exporter attribute {key}"
        ))),
    }
}

/// Exports `fs` as an image; returns the exporter response.
#[allow(clippy::too_many_arguments)]
pub async fn export(
    opts: &ImageExportOptions,
    store: &SnapshotStore,
    sessions: &Arc<SessionManager>,
    session_id: &str,
    progress: &Arc<Progress>,
    attrs: &BTreeMap<String, String>,
    metadata: &BTreeMap<String, Bytes>,
    fs: &FsRef,
) -> Result<BTreeMap<String, String>> {
    let push = truthy(attrs, "push")?;
    let epoch = epoch_attr(attrs)?;
    let annotations = Annotations::parse(metadata)?;
    if !annotations.index.is_empty() || !annotations.index_descriptor.is_empty() {
        return Err(Error::invalid(
            "index annotations not supported for single platform export",
        ));
    }
    let names = names(attrs, metadata);
    if push && names.is_empty() {
        return Err(Error::invalid(
            "exporter image: push=true needs a name (attribute name=…)",
        ));
    }
    let chain = match fs {
        FsRef::Scratch => Vec::new(),
        FsRef::Solved(r) => r.chain().layers().to_vec(),
    };
    let config = metadata.get("containerimage.config").map(|b| b.to_vec());

    let vertex = synthetic_digest(&format!("{session_id}-export"));
    progress.vertex_started(&vertex, "exporting to image", &[], None, SystemTime::now());
    let res = async {
        let t = std::time::Instant::now();
        // The diffIDs of berth's new layers (one hashing pass each, unless known) do not depend
        // on the target: compute them while the target is detected (GET /info, connects); the
        // export then finds them in the layers' metadata. Its errors come back from the export.
        let berth_layers: Vec<_> = chain
            .iter()
            .filter(|l| matches!(l, layerstore::snapshot::LayerRef::Berth(_)))
            .cloned()
            .collect();
        let st = store.clone();
        let digests = tokio::task::spawn_blocking(move || {
            if !berth_layers.is_empty() {
                let _ = exporter::export_layers(&st, &berth_layers);
            }
        });
        let (target, _) = tokio::join!(target(opts, store), digests);
        let target = target?;
        tracing::debug!(
            mode = target.mode(),
            ?chain,
            target_ms = t.elapsed().as_secs_f64() * 1000.0,
            "exporting image"
        );
        let started = SystemTime::now();
        progress.status(&vertex, "exporting layers", "", 0, 0, Some(started), None);
        let result = target
            .export(
                store,
                ImageExportRequest {
                    chain: &chain,
                    config: config.as_deref(),
                    names: names.clone(),
                    epoch,
                },
            )
            .await
            .map_err(|e| Error::unavailable(format!("exporter image ({}): {e}", target.mode())))?;
        crate::observe::export_layers(
            crate::observe::image_mode(&target),
            result.layers_sent,
            result.bytes_sent,
            result.layers_skipped,
            result.bytes_skipped,
        );
        let done = SystemTime::now();
        progress.status(
            &vertex,
            "exporting layers",
            "",
            result.bytes_sent as i64,
            result.bytes_sent as i64,
            Some(started),
            Some(done),
        );
        for l in &result.layers {
            let id = if l.sent {
                format!("layer {} registered ({} bytes)", l.diff_id, l.size)
            } else {
                format!(
                    "layer {} already in Docker ({} bytes not sent)",
                    l.diff_id, l.size
                )
            };
            let n = l.size as i64;
            progress.status(&vertex, &id, "", n, n, Some(started), Some(done));
        }
        if result.layers_skipped > 0 {
            let id = format!(
                "{} layers already in Docker ({} bytes not sent)",
                result.layers_skipped, result.bytes_skipped
            );
            progress.status(&vertex, &id, "", 0, 0, Some(started), Some(done));
        }
        progress.status(
            &vertex,
            &format!("writing image {}", result.config_digest),
            "",
            0,
            0,
            Some(started),
            Some(done),
        );
        for n in &result.names {
            progress.status(
                &vertex,
                &format!("naming to {n}"),
                "",
                0,
                0,
                Some(done),
                Some(SystemTime::now()),
            );
        }
        let mut response = BTreeMap::new();
        response.insert(
            "containerimage.digest".to_string(),
            result.manifest_digest.clone(),
        );
        response.insert(
            "containerimage.config.digest".to_string(),
            result.config_digest.clone(),
        );
        response.insert(
            "containerimage.descriptor".to_string(),
            result.descriptor.clone(),
        );
        if !result.names.is_empty() {
            response.insert("image.name".to_string(), result.names.join(","));
        }
        if push {
            let pushed = push_names(
                opts,
                store,
                sessions,
                session_id,
                progress,
                &vertex,
                attrs,
                &result.names,
                &{
                    let mut p = push_options(attrs)?;
                    p.annotations = annotations.for_platform("").0;
                    p.oci |= annotations.needs_oci();
                    p
                },
                PushWhat::Image {
                    chain: &chain,
                    config: &result.config,
                },
            )
            .await?;
            response.insert("containerimage.digest".to_string(), pushed.digest.clone());
            response.insert(
                "containerimage.descriptor".to_string(),
                Pushed {
                    digest: pushed.digest,
                    size: pushed.size,
                    media_type: pushed.media_type,
                }
                .descriptor(),
            );
        }
        Ok::<_, Error>(response)
    }
    .await;
    match &res {
        Ok(_) => progress.vertex_completed(&vertex, false, None, SystemTime::now()),
        Err(e) => progress.vertex_completed(&vertex, false, Some(e.to_string()), SystemTime::now()),
    }
    res
}

/// The push attributes of the image exporter.
fn push_options(attrs: &BTreeMap<String, String>) -> Result<exporter::PushOptions> {
    let compression = match attrs.get("compression").map(String::as_str) {
        None | Some("") => registry::Compression::Gzip,
        Some(v) => registry::Compression::from_attr(v).ok_or_else(|| {
            Error::invalid(format!(
                "exporter image: unsupported compression {v:?} (gzip, zstd or uncompressed)"
            ))
        })?,
    };
    let level = match attrs.get("compression-level").map(String::as_str) {
        None | Some("") => None,
        Some(v) => Some(v.parse::<i32>().map_err(|_| {
            Error::invalid(format!(
                "exporter image: invalid compression-level {v:?}: want an integer"
            ))
        })?),
    };
    Ok(exporter::PushOptions {
        compression,
        level,
        force: truthy(attrs, "force-compression")?,
        oci: truthy(attrs, "oci-mediatypes")?,
        by_digest: truthy(attrs, "push-by-digest")?,
        prefer_nondist: truthy(attrs, "prefer-nondist-layers")?,
        annotations: BTreeMap::new(),
    })
}

/// Pushes every name of the export with berth's registry client (module docs). Names go in one
/// push (so later repositories on a registry mount the blobs of the first); with
/// `registry.insecure` each name gets a client of its own for its domain.
#[allow(clippy::too_many_arguments)]
async fn push_names(
    opts: &ImageExportOptions,
    store: &SnapshotStore,
    sessions: &Arc<SessionManager>,
    session_id: &str,
    progress: &Arc<Progress>,
    vertex: &str,
    attrs: &BTreeMap<String, String>,
    names: &[String],
    popts: &exporter::PushOptions,
    what: PushWhat<'_>,
) -> Result<exporter::PushedImage> {
    let insecure = truthy(attrs, "registry.insecure")?;
    let auth = worker::RegistryAuth(Arc::new(crate::session::provider::JobSession::new(
        sessions.clone(),
        session_id.to_string(),
    )));
    let auth: Arc<dyn registry::AuthProvider> = Arc::new(auth);
    let started = SystemTime::now();
    let mut groups: Vec<(registry::Registry, Vec<String>)> = Vec::new();
    for name in names {
        let r = registry::Reference::parse(name)
            .map_err(|e| Error::invalid(format!("exporter image: push {name}: {e}")))?;
        if insecure {
            groups.push((
                registry::Registry::insecure_for(r.domain()),
                vec![name.clone()],
            ));
        } else if let Some(g) = groups.first_mut() {
            g.1.push(name.clone());
        } else {
            groups.push((opts.registry.clone(), vec![name.clone()]));
        }
    }
    for name in names {
        progress.status(
            vertex,
            &format!("pushing {name}"),
            "",
            0,
            0,
            Some(started),
            None,
        );
    }
    // Per name: bytes of each blob (current, total), for the `pushing <name>` status.
    type Sent = BTreeMap<String, BTreeMap<String, (u64, u64)>>;
    let sent: Arc<std::sync::Mutex<Sent>> = Default::default();
    let (p, v) = (progress.clone(), vertex.to_string());
    let report: exporter::PushProgress = Arc::new(move |ev| {
        let now = SystemTime::now();
        match ev {
            exporter::PushEvent::Blob {
                name,
                digest,
                current,
                total,
                done,
                ..
            } => {
                p.status(
                    &v,
                    &digest,
                    "",
                    current as i64,
                    total as i64,
                    Some(started),
                    done.then_some(now),
                );
                let mut m = sent.lock().unwrap();
                let per = m.entry(name.clone()).or_default();
                per.insert(digest, (current, total));
                let cur: u64 = per.values().map(|x| x.0).sum();
                let all: u64 = per.values().map(|x| x.1).sum();
                let id = format!("pushing {name}");
                p.status(&v, &id, "", cur as i64, all as i64, Some(started), None);
            }
            exporter::PushEvent::Manifest { name, digest } => {
                let all: u64 = sent
                    .lock()
                    .unwrap()
                    .get(&name)
                    .map(|per| per.values().map(|x| x.1).sum())
                    .unwrap_or(0);
                let id = format!("pushing {name}");
                p.status(
                    &v,
                    &id,
                    "",
                    all as i64,
                    all as i64,
                    Some(started),
                    Some(now),
                );
                p.status(
                    &v,
                    &format!("pushing manifest for {name}@{digest}"),
                    "",
                    0,
                    0,
                    Some(now),
                    Some(SystemTime::now()),
                );
            }
        }
    });
    let mut pushed = None;
    for (client, names) in groups {
        let session = client.session(auth.clone());
        let p = match &what {
            PushWhat::Image { chain, config } => {
                exporter::push_image(
                    store,
                    chain,
                    config,
                    &names,
                    &session,
                    &opts.blobs,
                    popts,
                    report.clone(),
                )
                .await
            }
            PushWhat::Index {
                images,
                annotations,
                epoch,
            } => {
                exporter::push_index(
                    store,
                    images,
                    annotations,
                    *epoch,
                    &names,
                    &session,
                    &opts.blobs,
                    popts,
                    report.clone(),
                )
                .await
            }
        }
        .map_err(|e| Error::unavailable(format!("exporter image: {e}")))?;
        tracing::info!(names = ?names, digest = %p.digest, uploaded = p.bytes_uploaded, compressed = p.layers_compressed, "pushed");
        pushed.get_or_insert(p);
    }
    pushed
        .ok_or_else(|| Error::invalid("exporter image: push=true needs a name (attribute name=…)"))
}

/// What [`push_names`] pushes.
enum PushWhat<'a> {
    /// One image: its layers and exported config.
    Image {
        chain: &'a [layerstore::snapshot::LayerRef],
        config: &'a [u8],
    },
    /// A multi-platform image: an index over one manifest per platform.
    Index {
        images: &'a [exporter::PlatformImage],
        annotations: &'a BTreeMap<String, String>,
        epoch: Option<chrono::DateTime<chrono::Utc>>,
    },
}

/// `source-date-epoch`.
fn epoch_attr(attrs: &BTreeMap<String, String>) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
    match attrs.get("source-date-epoch").map(String::as_str) {
        None | Some("") => Ok(None),
        Some(v) => {
            let secs: i64 = v.parse().map_err(|_| {
                Error::invalid(format!(
                    "invalid source-date-epoch {v:?}: want seconds since the epoch"
                ))
            })?;
            Ok(Some(chrono::DateTime::from_timestamp(secs, 0).ok_or_else(
                || Error::invalid(format!("source-date-epoch {v} is out of range")),
            )?))
        }
    }
}

/// The `refs.platforms` metadata of a multi-platform result (`exptypes.Platforms`).
#[derive(serde::Deserialize)]
struct ExpPlatforms {
    // Go writes the field names of untagged structs and reads them case-insensitively.
    #[serde(rename = "Platforms", alias = "platforms")]
    platforms: Vec<ExpPlatform>,
}

#[derive(serde::Deserialize)]
struct ExpPlatform {
    #[serde(rename = "ID", alias = "id")]
    id: String,
    #[serde(rename = "Platform", alias = "platform")]
    platform: OciPlatform,
}

#[derive(serde::Deserialize)]
struct OciPlatform {
    architecture: String,
    os: String,
    #[serde(default)]
    variant: String,
}

/// `os/arch[/variant]` as containerd's `platforms.Format` writes it.
fn format_platform(p: &exporter::image::Platform) -> String {
    if p.variant.is_empty() {
        format!("{}/{}", p.os, p.architecture)
    } else {
        format!("{}/{}/{}", p.os, p.architecture, p.variant)
    }
}

/// The platforms of a multi-platform result, in the frontend's order.
pub(crate) fn parse_platforms(
    metadata: &BTreeMap<String, Bytes>,
) -> Result<Vec<(String, exporter::image::Platform)>> {
    let raw = metadata.get(PLATFORMS_KEY).ok_or_else(|| {
        Error::invalid("unable to export multiple refs, missing platforms mapping")
    })?;
    let ps: ExpPlatforms = serde_json::from_slice(raw).map_err(|e| {
        Error::invalid(format!("failed to parse platforms passed to exporter: {e}"))
    })?;
    Ok(ps
        .platforms
        .into_iter()
        .map(|p| {
            let mut variant = p.platform.variant;
            // containerd normalizes arm64's v8 away
            if p.platform.architecture == "arm64" && matches!(variant.as_str(), "v8" | "8") {
                variant.clear();
            }
            (
                p.id,
                exporter::image::Platform {
                    os: p.platform.os,
                    architecture: p.platform.architecture,
                    variant,
                },
            )
        })
        .collect())
}

/// Metadata key of a multi-platform result's platforms (`exptypes.ExporterPlatformsKey`).
const PLATFORMS_KEY: &str = "refs.platforms";

/// Exporter annotations (`exptypes.ParseAnnotationKey`): `annotation[-TYPE][[PLATFORM]].KEY`
/// with TYPE `index`, `index-descriptor`, `manifest` (the default) or `manifest-descriptor`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Annotations {
    pub(crate) index: BTreeMap<String, String>,
    pub(crate) index_descriptor: BTreeMap<String, String>,
    /// Manifest annotations by platform (`""` = every platform).
    manifest: BTreeMap<String, BTreeMap<String, String>>,
    /// Manifest descriptor annotations by platform (`""` = every platform).
    manifest_descriptor: BTreeMap<String, BTreeMap<String, String>>,
}

impl Annotations {
    /// The annotations among `metadata` (the result's, the exporter attributes over them).
    pub(crate) fn parse(metadata: &BTreeMap<String, Bytes>) -> Result<Self> {
        let mut a = Annotations::default();
        for (k, v) in metadata {
            let Some(rest) = k.strip_prefix("annotation") else {
                continue;
            };
            let (tp, rest) = match rest.strip_prefix('-') {
                Some(r) => {
                    let end = r.find(['[', '.']).unwrap_or(r.len());
                    (&r[..end], &r[end..])
                }
                None => ("", rest),
            };
            let (platform, rest) = match rest.strip_prefix('[') {
                Some(r) => match r.split_once(']') {
                    Some((p, r)) => (p, r),
                    None => continue,
                },
                None => ("", rest),
            };
            let Some(key) = rest
                .strip_prefix('.')
                .filter(|k| !k.is_empty() && !k.chars().any(char::is_whitespace))
            else {
                continue;
            };
            if !tp.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                || !platform
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '/' | '-'))
            {
                continue;
            }
            let v = String::from_utf8_lossy(v).into_owned();
            let platform = normalize_platform(platform);
            match tp {
                "index" => {
                    a.index.insert(key.to_string(), v);
                }
                "index-descriptor" => {
                    a.index_descriptor.insert(key.to_string(), v);
                }
                "" | "manifest" => {
                    a.manifest
                        .entry(platform)
                        .or_default()
                        .insert(key.to_string(), v);
                }
                "manifest-descriptor" => {
                    a.manifest_descriptor
                        .entry(platform)
                        .or_default()
                        .insert(key.to_string(), v);
                }
                other => {
                    return Err(Error::invalid(format!(
                        "unrecognized annotation type {other}"
                    )))
                }
            }
        }
        Ok(a)
    }

    /// Forces OCI media types (Docker's have no index or descriptor annotations).
    pub(crate) fn needs_oci(&self) -> bool {
        !self.index.is_empty()
            || !self.index_descriptor.is_empty()
            || self.manifest_descriptor.values().any(|m| !m.is_empty())
    }

    /// The annotations of one platform's manifest and its descriptor (generic ones, then the
    /// platform's over them).
    pub(crate) fn for_platform(
        &self,
        platform: &str,
    ) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
        let pick = |m: &BTreeMap<String, BTreeMap<String, String>>| {
            let mut out = m.get("").cloned().unwrap_or_default();
            if !platform.is_empty() {
                out.extend(m.get(platform).cloned().unwrap_or_default());
            }
            out
        };
        (pick(&self.manifest), pick(&self.manifest_descriptor))
    }

    /// Platforms named by annotation keys.
    fn platforms(&self) -> impl Iterator<Item = &String> {
        self.manifest
            .keys()
            .chain(self.manifest_descriptor.keys())
            .filter(|p| !p.is_empty())
    }
}

/// A platform in an annotation key, normalized as `platforms.Parse` + `Format` would for the
/// forms clients write (`linux/arm64/v8` = `linux/arm64`).
fn normalize_platform(p: &str) -> String {
    match p.strip_suffix("/v8").or_else(|| p.strip_suffix("/8")) {
        Some(base) if base.ends_with("/arm64") => base.to_string(),
        _ => p.to_string(),
    }
}

/// The images of a multi-platform result (`metadata` has its platforms and the annotations,
/// the exporter attributes over the result's), one per platform in the frontend's order, each
/// with its config (`containerimage.config/<id>`, else the result's), annotations and
/// attestations; and the annotations, whose platforms must be the result's.
pub(crate) fn platform_images(
    metadata: &BTreeMap<String, Bytes>,
    refs: &BTreeMap<String, FsRef>,
    attestations: &BTreeMap<String, Vec<exporter::attestation::Attestation>>,
) -> Result<(Vec<exporter::PlatformImage>, Annotations)> {
    let platforms = parse_platforms(metadata)?;
    let annotations = Annotations::parse(metadata)?;
    for p in annotations.platforms() {
        if !platforms.iter().any(|(_, pl)| &format_platform(pl) == p) {
            return Err(Error::invalid(format!(
                "invalid annotation: no platform {p} found in source"
            )));
        }
    }
    let mut images = Vec::with_capacity(platforms.len());
    for (id, platform) in &platforms {
        let fs = refs
            .get(id)
            .ok_or_else(|| Error::invalid(format!("failed to find ref for ID {id}")))?;
        let chain = match fs {
            FsRef::Scratch => Vec::new(),
            FsRef::Solved(r) => r.chain().layers().to_vec(),
        };
        let config = metadata
            .get(&format!("containerimage.config/{id}"))
            .or_else(|| metadata.get("containerimage.config"))
            .map(|b| b.to_vec());
        let (manifest_annotations, descriptor_annotations) =
            annotations.for_platform(&format_platform(platform));
        images.push(exporter::PlatformImage {
            platform: platform.clone(),
            chain,
            config,
            manifest_annotations,
            descriptor_annotations,
            attestations: attestations.get(id).cloned().unwrap_or_default(),
        });
    }
    Ok((images, annotations))
}

/// The `image` exporter for a multi-platform result: an index pushed to every name (Docker's
/// classic store holds one image per name, so berth does not store it there). Annotations
/// from the result and the attributes go where BuildKit puts them; index or descriptor
/// annotations force OCI media types.
#[allow(clippy::too_many_arguments)]
pub async fn export_multi(
    opts: &ImageExportOptions,
    store: &SnapshotStore,
    sessions: &Arc<SessionManager>,
    session_id: &str,
    progress: &Arc<Progress>,
    attrs: &BTreeMap<String, String>,
    metadata: &BTreeMap<String, Bytes>,
    refs: &BTreeMap<String, FsRef>,
    attestations: &BTreeMap<String, Vec<exporter::attestation::Attestation>>,
) -> Result<BTreeMap<String, String>> {
    let (images, annotations) = platform_images(metadata, refs, attestations)?;
    let push = truthy(attrs, "push")?;
    let names = names(attrs, metadata);
    if !push || names.is_empty() {
        return Err(Error::unimplemented(format!(
            "exporter image: a multi-platform result ({} platforms) cannot be stored in Docker's image store; push it to a registry (push=true with name=…)",
            images.len()
        )));
    }
    let mut popts = push_options(attrs)?;
    // Attestation manifests (and index or descriptor annotations) need OCI media types.
    popts.oci |= annotations.needs_oci() || images.iter().any(|i| !i.attestations.is_empty());
    let epoch = epoch_attr(attrs)?;

    let vertex = synthetic_digest(&format!("{session_id}-export"));
    progress.vertex_started(&vertex, "exporting to image", &[], None, SystemTime::now());
    let res = push_names(
        opts,
        store,
        sessions,
        session_id,
        progress,
        &vertex,
        attrs,
        &names,
        &popts,
        PushWhat::Index {
            images: &images,
            annotations: &annotations.index,
            epoch,
        },
    )
    .await;
    let err = res.as_ref().err().map(|e| e.to_string());
    progress.vertex_completed(&vertex, false, err, SystemTime::now());
    let pushed = res?;
    let mut response = BTreeMap::new();
    response.insert("containerimage.digest".to_string(), pushed.digest.clone());
    response.insert(
        "containerimage.descriptor".to_string(),
        Pushed {
            digest: pushed.digest,
            size: pushed.size,
            media_type: pushed.media_type,
        }
        .descriptor_with(&annotations.index_descriptor),
    );
    response.insert("image.name".to_string(), names.join(","));
    Ok(response)
}

/// The manifest a push left in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pushed {
    digest: String,
    size: u64,
    media_type: String,
}

impl Pushed {
    /// `containerimage.descriptor`: base64 of the pushed manifest's descriptor.
    fn descriptor(&self) -> String {
        self.descriptor_with(&BTreeMap::new())
    }

    /// [`Self::descriptor`] with the descriptor's annotations.
    fn descriptor_with(&self, annotations: &BTreeMap<String, String>) -> String {
        use base64::Engine as _;
        let mut d = serde_json::json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        });
        if !annotations.is_empty() {
            d["annotations"] = serde_json::json!(annotations);
        }
        base64::engine::general_purpose::STANDARD.encode(d.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_and_star_takes_metadata() {
        let mut attrs = BTreeMap::new();
        attrs.insert("name".to_string(), "a:1, b ,*".to_string());
        let mut md = BTreeMap::new();
        md.insert("image.name".to_string(), Bytes::from_static(b"c:2,d"));
        assert_eq!(names(&attrs, &md), ["a:1", "b", "c:2", "d"]);
        assert!(names(&BTreeMap::new(), &md).is_empty());
    }

    #[test]
    fn push_attributes() {
        let mut attrs = BTreeMap::new();
        let o = push_options(&attrs).unwrap();
        assert_eq!(o.compression, registry::Compression::Gzip);
        assert!(!o.oci && !o.by_digest && !o.force && o.level.is_none());
        attrs.insert("compression".to_string(), "zstd".to_string());
        attrs.insert("compression-level".to_string(), "9".to_string());
        attrs.insert("push-by-digest".to_string(), "true".to_string());
        let o = push_options(&attrs).unwrap();
        assert_eq!(o.compression, registry::Compression::Zstd);
        assert_eq!(o.level, Some(9));
        assert!(o.by_digest);
        attrs.insert("compression".to_string(), "lz4".to_string());
        assert!(push_options(&attrs).is_err());
        attrs.insert("compression".to_string(), "gzip".to_string());
        attrs.insert("compression-level".to_string(), "high".to_string());
        assert!(push_options(&attrs).is_err());
    }

    #[test]
    fn annotation_keys() {
        let md: BTreeMap<String, Bytes> = [
            ("annotation.gd", "generic default"),
            ("annotation-index.gi", "index"),
            ("annotation-index-descriptor.gid", "index descriptor"),
            ("annotation-manifest.gm", "manifest"),
            ("annotation-manifest[linux/amd64].m", "amd64"),
            (
                "annotation-manifest-descriptor[linux/arm64/v8].md",
                "arm64 descriptor",
            ),
            ("annotation-manifest-descriptor.gmd", "generic descriptor"),
            ("annotations", "not an annotation key"),
            ("containerimage.config", "{}"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), Bytes::from(v)))
        .collect();
        let a = Annotations::parse(&md).unwrap();
        assert_eq!(a.index.get("gi").unwrap(), "index");
        assert_eq!(a.index_descriptor.get("gid").unwrap(), "index descriptor");
        assert!(a.needs_oci());
        let (m, d) = a.for_platform("linux/amd64");
        assert_eq!(
            m.into_iter().collect::<Vec<_>>(),
            [
                ("gd".to_string(), "generic default".to_string()),
                ("gm".to_string(), "manifest".to_string()),
                ("m".to_string(), "amd64".to_string()),
            ]
        );
        assert_eq!(d.keys().collect::<Vec<_>>(), ["gmd"]);
        let (m, d) = a.for_platform("linux/arm64");
        assert!(!m.contains_key("m"));
        assert_eq!(d.get("md").unwrap(), "arm64 descriptor");
        assert_eq!(
            a.platforms().collect::<Vec<_>>(),
            ["linux/amd64", "linux/arm64"]
        );

        // manifest annotations alone keep Docker media types
        let only: BTreeMap<String, Bytes> =
            [("annotation-manifest.a".to_string(), Bytes::from("b"))].into();
        assert!(!Annotations::parse(&only).unwrap().needs_oci());
        let bad: BTreeMap<String, Bytes> =
            [("annotation-bogus.a".to_string(), Bytes::from("b"))].into();
        let e = Annotations::parse(&bad).unwrap_err();
        assert!(
            e.to_string().contains("unrecognized annotation type bogus"),
            "{e}"
        );
    }

    #[test]
    fn platforms_of_a_multi_platform_result() {
        let md: BTreeMap<String, Bytes> = [(
            PLATFORMS_KEY.to_string(),
            Bytes::from(
                r#"{"Platforms":[{"ID":"linux/amd64","Platform":{"architecture":"amd64","os":"linux"}},{"ID":"linux/arm64","Platform":{"architecture":"arm64","os":"linux","variant":"v8"}}]}"#,
            ),
        )]
        .into();
        let ps = parse_platforms(&md).unwrap();
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[0].0, "linux/amd64");
        assert_eq!(format_platform(&ps[1].1), "linux/arm64");
        let e = parse_platforms(&BTreeMap::new()).unwrap_err();
        assert!(e.to_string().contains("missing platforms mapping"), "{e}");
    }

    #[test]
    fn push_must_be_a_boolean() {
        let mut attrs = BTreeMap::new();
        attrs.insert("push".to_string(), "yes".to_string());
        assert!(truthy(&attrs, "push").is_err());
        attrs.insert("push".to_string(), "false".to_string());
        assert!(!truthy(&attrs, "push").unwrap());
    }
}
