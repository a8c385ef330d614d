//! [`Client`]: blobs, base images in place and their leases (crate docs).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    RemoveSnapshotRequest, StatSnapshotRequest, ViewSnapshotRequest,
};
use containerd_client::services::v1::{
    content_client::ContentClient, leases_client::LeasesClient, AddResourceRequest,
    CreateRequest as LeaseCreate, DeleteRequest as LeaseDelete, InfoRequest,
    ListRequest as LeaseList, ReadContentRequest, Resource,
};
use containerd_client::types::Mount;
use layerstore::dockerstore::fault_point;
use layerstore::snapshot::{BlobDescriptor, Chain, DockerLayer, LayerRef, WhiteoutFormat};
use layerstore::Digest;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::{Endpoint, Error, Result};

/// Label on berth's base-image leases and views naming the berthd instance that made them.
pub const OWNER_LABEL: &str = "berth.dev/base-owner";
/// How long a base-image lease outlives a berthd killed before deleting it.
pub const LEASE_EXPIRY: Duration = Duration::from_secs(24 * 3600);
/// Prefix of berth's base-image lease ids and view keys.
const LEASE_PREFIX: &str = "berth-base-";
const VIEW_PREFIX: &str = "berth-view-";
/// Fault points of a base image's resolution (`BERTH_FAULT_KILL`, see
/// `layerstore::dockerstore::fault`), in order.
pub const BASE_STEPS: &[&str] = &[
    // The build's lease holds the image's blobs and top snapshot; no view yet.
    "containerd-base:held",
    // The short-lived view of the top snapshot exists (an active snapshot), not removed yet.
    "containerd-base:view",
];
/// The lease resource type of a blob.
pub(crate) const CONTENT: &str = "content";
/// Largest manifest, index or config berth reads (they are JSON documents of a few KiB).
const MAX_DOCUMENT: i64 = 16 << 20;
/// How long connecting to the socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to the Engine's containerd.
#[derive(Debug, Clone)]
pub struct Client {
    pub(crate) channel: Channel,
    pub(crate) endpoint: Endpoint,
}

/// A base image resolved in place.
#[derive(Debug, Clone)]
pub struct BaseImage {
    /// Docker's image ID on this store: the digest of the manifest or index the image names.
    pub id: String,
    /// The platform's manifest digest (= `id` without an index).
    pub manifest_digest: String,
    /// The config's digest.
    pub config_digest: String,
    /// The exact config bytes.
    pub config: Vec<u8>,
    /// The layers, bottom first: diffID, chainID, snapshot directory and blob.
    pub layers: Vec<DockerLayer>,
}

impl BaseImage {
    /// The layers as a snapshot chain (read-only lower dirs, overlay whiteouts).
    pub fn chain(&self) -> Chain {
        Chain(self.layers.iter().cloned().map(LayerRef::Docker).collect())
    }
}

/// Keeps a [`BaseImage`]'s content and snapshots from containerd's garbage collector until
/// dropped (then the lease is deleted in the background).
#[derive(Debug)]
pub struct BaseLease {
    id: String,
    /// The berthd instance it is labelled with.
    owner: String,
    client: Option<Client>,
}

impl BaseLease {
    /// The lease id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The berthd instance the lease is labelled with.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Deletes the lease now (dropping it deletes it in the background).
    pub async fn release(mut self) -> Result<()> {
        match self.client.take() {
            Some(client) => client.delete_lease(&self.id).await,
            None => Ok(()),
        }
    }
}

impl Drop for BaseLease {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let id = std::mem::take(&mut self.id);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(lease = %id, "no runtime to delete the base-image lease; it expires on its own");
            return;
        };
        rt.spawn(async move {
            if let Err(e) = client.delete_lease(&id).await {
                tracing::warn!(lease = %id, error = %e, "could not delete a base-image lease; it expires on its own");
            }
        });
    }
}

/// What [`Client::remove_leftovers`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// Leases deleted.
    pub leases: usize,
    /// Views removed.
    pub views: usize,
    /// Snapshots a pull had prepared to unpack a layer into, never committed.
    pub unpacks: usize,
    /// Unfinished blob writes of a pull.
    pub ingests: usize,
}

#[derive(Deserialize)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    pub(crate) digest: String,
    #[serde(default)]
    size: i64,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct Document {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    pub(crate) manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

#[derive(Deserialize)]
struct ConfigRootfs {
    rootfs: Rootfs,
}

#[derive(Deserialize)]
struct Rootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

pub(crate) fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

pub(crate) fn token() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let seed = format!(
        "{}-{:?}-{n}",
        std::process::id(),
        std::time::SystemTime::now()
    );
    sha256(seed.as_bytes())[7..23].to_string()
}

pub(crate) fn cd_err(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> Error {
    let what = what.into();
    move |s| Error::Containerd {
        what,
        code: s.code(),
        message: s.message().to_string(),
    }
}

/// Picks the manifest of `want` (`os`, `architecture`, `variant`) from an index's entries:
/// attestation manifests (`vnd.docker.reference.type`) never; an exact variant first, then an
/// entry without variant.
fn pick_manifest<'a>(
    manifests: &'a [Descriptor],
    want: (&str, &str, &str),
) -> Option<&'a Descriptor> {
    let candidates = manifests.iter().filter(|m| {
        !m.annotations.contains_key("vnd.docker.reference.type")
            && m.platform
                .as_ref()
                .is_some_and(|p| p.os == want.0 && p.architecture == want.1)
    });
    let mut fallback = None;
    for m in candidates {
        let v = m
            .platform
            .as_ref()
            .and_then(|p| p.variant.as_deref())
            .unwrap_or("");
        if v == want.2 {
            return Some(m);
        }
        if v.is_empty() || want.2.is_empty() {
            fallback.get_or_insert(m);
        }
    }
    fallback
}

/// The layer directories of a view's mounts, bottom first: a `bind` mount is one directory, an
/// `overlay` mount lists its `lowerdir=` top first (and, for a view, nothing else).
fn view_dirs(mounts: &[Mount]) -> Option<Vec<PathBuf>> {
    let [m] = mounts else { return None };
    match m.r#type.as_str() {
        "bind" => Some(vec![PathBuf::from(&m.source)]),
        "overlay" => {
            if m.options.iter().any(|o| o.starts_with("upperdir=")) {
                return None;
            }
            let lower = m.options.iter().find_map(|o| o.strip_prefix("lowerdir="))?;
            Some(lower.split(':').rev().map(PathBuf::from).collect())
        }
        _ => None,
    }
}

impl Client {
    /// Connects to the endpoint's socket (within 10 s). The error names the setting to fix.
    pub async fn connect(endpoint: &Endpoint) -> Result<Client> {
        if endpoint.snapshotter != "overlayfs" {
            return Err(Error::UnsupportedSnapshotter {
                snapshotter: endpoint.snapshotter.clone(),
            });
        }
        let unreachable = |message: String| Error::Unreachable {
            address: endpoint.address.display().to_string(),
            source_kind: endpoint.address_source,
            message,
        };
        let channel = tokio::time::timeout(
            CONNECT_TIMEOUT,
            containerd_client::connect(&endpoint.address),
        )
        .await
        .map_err(|_| unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| {
            // tonic's transport error hides the io error behind "transport error".
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg = format!("{msg}: {s}");
                src = s.source();
            }
            unreachable(msg)
        })?;
        Ok(Client {
            channel,
            endpoint: endpoint.clone(),
        })
    }

    /// The endpoint connected to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub(crate) fn req<T>(&self, msg: T, lease: Option<&str>) -> Request<T> {
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        if let Ok(ns) = self.endpoint.namespace.parse() {
            md.insert("containerd-namespace", ns);
        }
        if let Some(l) = lease.and_then(|l| l.parse().ok()) {
            md.insert("containerd-lease", l);
        }
        r
    }

    /// A blob of the content store, at most `max` bytes; its digest is verified.
    pub async fn read_blob(&self, digest: &str, max: i64) -> Result<Vec<u8>> {
        let mut content = ContentClient::new(self.channel.clone());
        let info = content
            .info(self.req(
                InfoRequest {
                    digest: digest.to_string(),
                },
                None,
            ))
            .await
            .map_err(cd_err(format!("content info {digest}")))?
            .into_inner()
            .info
            .unwrap_or_default();
        if info.size > max {
            return Err(Error::BadImage {
                image: digest.into(),
                message: format!("blob of {} bytes is larger than {max}", info.size),
            });
        }
        let mut stream = content
            .read(self.req(
                ReadContentRequest {
                    digest: digest.to_string(),
                    offset: 0,
                    size: 0,
                },
                None,
            ))
            .await
            .map_err(cd_err(format!("read content {digest}")))?
            .into_inner();
        let mut out = Vec::with_capacity(info.size.max(0) as usize);
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(cd_err(format!("read content {digest}")))?
        {
            out.extend_from_slice(&chunk.data);
            if out.len() as i64 > max {
                return Err(Error::BadImage {
                    image: digest.into(),
                    message: format!("blob longer than {max} bytes"),
                });
            }
        }
        if sha256(&out) != digest {
            return Err(Error::BadImage {
                image: digest.into(),
                message: format!("content does not match its digest (got {})", sha256(&out)),
            });
        }
        Ok(out)
    }

    /// The manifest (and its digest) an image ID names for a platform. With `lease`, each blob
    /// is added to it before it is read: once read, it is held.
    async fn manifest(
        &self,
        id: &str,
        platform: (&str, &str, &str),
        lease: Option<&str>,
    ) -> Result<(String, Document)> {
        if let Some(lease) = lease {
            self.hold(lease, &[(CONTENT, id)]).await?;
        }
        let top = self.read_blob(id, MAX_DOCUMENT).await.map_err(|e| {
            if e.is_not_found() {
                Error::ImageNotFound {
                    image: id.into(),
                    address: self.endpoint.address.display().to_string(),
                    namespace: self.endpoint.namespace.clone(),
                }
            } else {
                e
            }
        })?;
        let bad = |message: String| Error::BadImage {
            image: id.into(),
            message,
        };
        let doc: Document =
            serde_json::from_slice(&top).map_err(|e| bad(format!("manifest or index: {e}")))?;
        let Some(manifests) = &doc.manifests else {
            return Ok((id.to_string(), doc));
        };
        let m = pick_manifest(manifests, platform).ok_or_else(|| Error::NoPlatform {
            image: id.into(),
            platform: [platform.0, platform.1, platform.2]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join("/"),
        })?;
        if let Some(lease) = lease {
            self.hold(lease, &[(CONTENT, &m.digest)]).await?;
        }
        let bytes = self.read_blob(&m.digest, MAX_DOCUMENT).await?;
        let doc: Document = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("manifest {}: {e}", m.digest)))?;
        if doc.manifests.is_some() {
            return Err(bad(format!("nested index {}", m.digest)));
        }
        Ok((m.digest.clone(), doc))
    }

    /// The config of an image (Docker image ID = manifest or index digest) for a platform
    /// (`os`, `architecture`, `variant`): (manifest digest, config bytes).
    pub async fn image_config(
        &self,
        id: &str,
        platform: (&str, &str, &str),
    ) -> Result<(String, Vec<u8>)> {
        let (manifest_digest, doc) = self.manifest(id, platform, None).await?;
        let config = doc.config.ok_or_else(|| Error::BadImage {
            image: id.into(),
            message: format!("manifest {manifest_digest} has no config"),
        })?;
        let bytes = self.read_blob(&config.digest, MAX_DOCUMENT).await?;
        Ok((manifest_digest, bytes))
    }

    /// Resolves an image in place for a build (crate docs) under `lease` (from [`Client::lease`],
    /// possibly the one a [`Client::pull`] of the image wrote under). Each blob and the top
    /// snapshot are added to the lease before they are read or looked at, so what this finds
    /// is held until the lease is dropped, with no window in which a `docker image prune` or
    /// `docker rmi` could let containerd's GC take it; an image removed before that fails
    /// with an error for which [`Error::is_not_found`] holds (the caller may pull it again).
    pub async fn base_image(
        &self,
        id: &str,
        platform: (&str, &str, &str),
        lease: BaseLease,
    ) -> Result<(BaseImage, BaseLease)> {
        let (manifest_digest, doc) = self.manifest(id, platform, Some(&lease.id)).await?;
        let bad = |message: String| Error::BadImage {
            image: id.into(),
            message,
        };
        if !doc.media_type.is_empty() && !doc.media_type.contains("manifest") {
            return Err(bad(format!("unexpected media type {}", doc.media_type)));
        }
        let config_desc = doc
            .config
            .ok_or_else(|| bad(format!("manifest {manifest_digest} has no config")))?;
        let blobs = doc.layers.unwrap_or_default();
        let mut held = vec![(CONTENT, config_desc.digest.as_str())];
        held.extend(blobs.iter().map(|b| (CONTENT, b.digest.as_str())));
        self.hold(&lease.id, &held).await?;
        let config = self.read_blob(&config_desc.digest, MAX_DOCUMENT).await?;
        let rootfs: ConfigRootfs = serde_json::from_slice(&config)
            .map_err(|e| bad(format!("config {}: {e}", config_desc.digest)))?;
        if blobs.len() != rootfs.rootfs.diff_ids.len() {
            return Err(bad(format!(
                "manifest lists {} layers, config {} diffIDs",
                blobs.len(),
                rootfs.rootfs.diff_ids.len()
            )));
        }
        let diff_ids = rootfs
            .rootfs
            .diff_ids
            .iter()
            .map(|d| d.parse::<Digest>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("diffID: {e}")))?;
        let chain_ids = layerstore::tar::chain_ids(&diff_ids);
        if let Some(top) = chain_ids.last() {
            // The top snapshot holds every parent.
            let kind = self.snapshot_resource();
            self.hold(&lease.id, &[(&kind, &top.to_string())]).await?;
        }
        let owner = lease.owner.clone();
        fault_point("containerd-base:held");

        let dirs = match chain_ids.last() {
            None => Vec::new(),
            Some(top) => {
                self.layer_dirs(id, &top.to_string(), &owner, &lease.id)
                    .await?
            }
        };
        if dirs.len() != chain_ids.len() {
            return Err(bad(format!(
                "snapshot {} has {} layers, the image {}",
                chain_ids.last().map(|c| c.to_string()).unwrap_or_default(),
                dirs.len(),
                chain_ids.len()
            )));
        }
        let layers = diff_ids
            .iter()
            .zip(&chain_ids)
            .zip(dirs)
            .zip(&blobs)
            .map(|(((d, c), dir), b)| DockerLayer {
                chain_id: c.to_string(),
                diff_id: d.to_string(),
                diff_dir: dir,
                whiteouts: WhiteoutFormat::Overlay,
                blob: Some(BlobDescriptor {
                    media_type: b.media_type.clone(),
                    digest: b.digest.clone(),
                    size: b.size.max(0) as u64,
                }),
            })
            .collect();
        Ok((
            BaseImage {
                id: id.to_string(),
                manifest_digest,
                config_digest: config_desc.digest,
                config,
                layers,
            },
            lease,
        ))
    }

    /// The directories of the committed snapshot `top` and its parents, bottom first, read
    /// from a view that is removed again at once.
    async fn layer_dirs(
        &self,
        image: &str,
        top: &str,
        owner: &str,
        lease: &str,
    ) -> Result<Vec<PathBuf>> {
        let mut snaps = SnapshotsClient::new(self.channel.clone());
        match snaps
            .stat(self.req(
                StatSnapshotRequest {
                    snapshotter: self.endpoint.snapshotter.clone(),
                    key: top.to_string(),
                },
                None,
            ))
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {
                return Err(Error::NotUnpacked {
                    image: image.into(),
                    chain_id: top.into(),
                    snapshotter: self.endpoint.snapshotter.clone(),
                })
            }
            Err(s) => return Err(cd_err(format!("stat snapshot {top}"))(s)),
        }
        let key = format!("{VIEW_PREFIX}{}", token());
        let view = snaps
            .view(self.req(
                ViewSnapshotRequest {
                    snapshotter: self.endpoint.snapshotter.clone(),
                    key: key.clone(),
                    parent: top.to_string(),
                    labels: HashMap::from([(OWNER_LABEL.to_string(), owner.to_string())]),
                },
                Some(lease),
            ))
            .await
            .map_err(cd_err(format!("view snapshot {top}")))?
            .into_inner();
        fault_point("containerd-base:view");
        let removed = snaps
            .remove(self.req(
                RemoveSnapshotRequest {
                    snapshotter: self.endpoint.snapshotter.clone(),
                    key: key.clone(),
                },
                Some(lease),
            ))
            .await;
        if let Err(s) = removed {
            tracing::warn!(view = %key, status = %s, "could not remove a base-image view; removed at the next start");
        }
        view_dirs(&view.mounts).ok_or_else(|| Error::Containerd {
            what: format!("view snapshot {top}"),
            code: Code::Unimplemented,
            message: format!(
                "snapshotter returned mounts berth cannot use as lower dirs: {:?}",
                view.mounts
            ),
        })
    }

    /// A new base-image lease labelled with `owner` (the berthd instance; expiring on its own
    /// after [`LEASE_EXPIRY`]): take it before the image is pulled or looked up, and hand it
    /// to [`Client::pull`] and [`Client::base_image`].
    pub async fn lease(&self, owner: &str) -> Result<BaseLease> {
        let id = format!("{LEASE_PREFIX}{}", token());
        let expire = chrono::Utc::now()
            + chrono::Duration::from_std(LEASE_EXPIRY).unwrap_or(chrono::Duration::hours(24));
        let labels = HashMap::from([
            (
                "containerd.io/gc.expire".to_string(),
                expire.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            ),
            (OWNER_LABEL.to_string(), owner.to_string()),
        ]);
        LeasesClient::new(self.channel.clone())
            .create(self.req(
                LeaseCreate {
                    id: id.clone(),
                    labels,
                },
                None,
            ))
            .await
            .map_err(cd_err(format!("create lease {id}")))?;
        Ok(BaseLease {
            id,
            owner: owner.to_string(),
            client: Some(self.clone()),
        })
    }

    /// The lease resource type of a snapshot in the Engine's snapshotter.
    pub(crate) fn snapshot_resource(&self) -> String {
        format!("snapshots/{}", self.endpoint.snapshotter)
    }

    /// Adds resources `(type, id)` to lease `lease`. containerd records a resource whether or
    /// not it exists yet: added before it is read or written, it is held from then on.
    pub(crate) async fn hold(&self, lease: &str, resources: &[(&str, &str)]) -> Result<()> {
        let mut leases = LeasesClient::new(self.channel.clone());
        for (kind, rid) in resources {
            leases
                .add_resource(self.req(
                    AddResourceRequest {
                        id: lease.to_string(),
                        resource: Some(Resource {
                            id: rid.to_string(),
                            r#type: kind.to_string(),
                        }),
                    },
                    None,
                ))
                .await
                .map_err(cd_err(format!("add {kind} {rid} to lease {lease}")))?;
        }
        Ok(())
    }

    pub(crate) async fn delete_lease(&self, id: &str) -> Result<()> {
        match LeasesClient::new(self.channel.clone())
            .delete(self.req(
                LeaseDelete {
                    id: id.to_string(),
                    sync: false,
                },
                None,
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(cd_err(format!("delete lease {id}"))(s)),
        }
    }

    /// Deletes the base-image leases and views labelled with `owner` (a previous berthd on the
    /// same root that was killed). Call before serving.
    pub async fn remove_leftovers(&self, owner: &str) -> Result<Leftovers> {
        let mut out = Leftovers::default();
        let filter = format!("labels.\"{OWNER_LABEL}\"=={owner}");
        out.views = crate::remove_snapshots(
            &self.channel,
            &self.endpoint.namespace,
            &self.endpoint.snapshotter,
            (OWNER_LABEL, owner),
            VIEW_PREFIX,
        )
        .await?;
        let leases = LeasesClient::new(self.channel.clone())
            .list(self.req(
                LeaseList {
                    filters: vec![filter],
                },
                None,
            ))
            .await
            .map_err(cd_err("list leases"))?
            .into_inner()
            .leases;
        out.unpacks = crate::remove_snapshots(
            &self.channel,
            &self.endpoint.namespace,
            &self.endpoint.snapshotter,
            (OWNER_LABEL, owner),
            crate::pull::UNPACK_PREFIX,
        )
        .await?;
        out.ingests = self.abort_pull_ingests(owner).await?;
        for l in leases {
            if l.id.starts_with(LEASE_PREFIX) || l.id.starts_with(crate::pull::PULL_LEASE_PREFIX) {
                self.delete_lease(&l.id).await?;
                out.leases += 1;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(t: &str, source: &str, options: &[&str]) -> Mount {
        Mount {
            r#type: t.into(),
            source: source.into(),
            target: String::new(),
            options: options.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn view_dirs_from_mounts() {
        assert_eq!(
            view_dirs(&[mount("bind", "/s/1/fs", &["ro", "rbind"])]),
            Some(vec![PathBuf::from("/s/1/fs")])
        );
        assert_eq!(
            view_dirs(&[mount(
                "overlay",
                "overlay",
                &["index=off", "lowerdir=/s/3/fs:/s/2/fs:/s/1/fs"]
            )]),
            Some(vec!["/s/1/fs".into(), "/s/2/fs".into(), "/s/3/fs".into()])
        );
        // A writable mount is not a view.
        assert_eq!(
            view_dirs(&[mount("overlay", "overlay", &["upperdir=/u", "lowerdir=/l"])]),
            None
        );
        assert_eq!(view_dirs(&[]), None);
        assert_eq!(view_dirs(&[mount("erofs", "/x", &[])]), None);
    }

    #[test]
    fn manifests_by_platform() {
        let index: Document = serde_json::from_str(
            r#"{"manifests":[
              {"digest":"sha256:att","platform":{"os":"unknown","architecture":"unknown"},
               "annotations":{"vnd.docker.reference.type":"attestation-manifest"}},
              {"digest":"sha256:arm7","platform":{"os":"linux","architecture":"arm","variant":"v7"}},
              {"digest":"sha256:arm6","platform":{"os":"linux","architecture":"arm","variant":"v6"}},
              {"digest":"sha256:amd","platform":{"os":"linux","architecture":"amd64"}}]}"#,
        )
        .unwrap();
        let m = index.manifests.unwrap();
        let pick = |p| pick_manifest(&m, p).map(|d| d.digest.as_str());
        assert_eq!(pick(("linux", "amd64", "")), Some("sha256:amd"));
        assert_eq!(pick(("linux", "arm", "v6")), Some("sha256:arm6"));
        assert_eq!(pick(("linux", "arm64", "")), None);
        assert_eq!(pick(("unknown", "unknown", "")), None);
    }
}
