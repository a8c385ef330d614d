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

fn truthy(attrs: &BTreeMap<String, String>, key: &str) -> Result<bool> {
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
    let epoch =
        match attrs.get("source-date-epoch").map(String::as_str) {
            None | Some("") => None,
            Some(v) => {
                let secs: i64 = v.parse().map_err(|_| {
                    Error::invalid(format!(
                        "invalid source-date-epoch {v:?}: want seconds since the epoch"
                    ))
                })?;
                Some(chrono::DateTime::from_timestamp(secs, 0).ok_or_else(|| {
                    Error::invalid(format!("source-date-epoch {v} is out of range"))
                })?)
            }
        };
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
        let target = target(opts, store).await?;
        tracing::debug!(mode = target.mode(), ?chain, "exporting image");
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
                opts, store, sessions, session_id, progress, &vertex, attrs, &chain, &result,
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
    chain: &[layerstore::snapshot::LayerRef],
    result: &exporter::ImageExportResult,
) -> Result<exporter::PushedImage> {
    let popts = push_options(attrs)?;
    let insecure = truthy(attrs, "registry.insecure")?;
    let auth = worker::RegistryAuth(Arc::new(crate::session::provider::JobSession::new(
        sessions.clone(),
        session_id.to_string(),
    )));
    let auth: Arc<dyn registry::AuthProvider> = Arc::new(auth);
    let started = SystemTime::now();
    let mut groups: Vec<(registry::Registry, Vec<String>)> = Vec::new();
    for name in &result.names {
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
    for name in &result.names {
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
        let p = exporter::push_image(
            store,
            chain,
            &result.config,
            &names,
            &session,
            &opts.blobs,
            &popts,
            report.clone(),
        )
        .await
        .map_err(|e| Error::unavailable(format!("exporter image: {e}")))?;
        tracing::info!(names = ?names, digest = %p.digest, uploaded = p.bytes_uploaded, compressed = p.layers_compressed, "pushed");
        pushed.get_or_insert(p);
    }
    pushed
        .ok_or_else(|| Error::invalid("exporter image: push=true needs a name (attribute name=…)"))
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
        use base64::Engine as _;
        let d = serde_json::json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        });
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
    fn push_must_be_a_boolean() {
        let mut attrs = BTreeMap::new();
        attrs.insert("push".to_string(), "yes".to_string());
        assert!(truthy(&attrs, "push").is_err());
        attrs.insert("push".to_string(), "false".to_string());
        assert!(!truthy(&attrs, "push").unwrap());
    }
}
