//! `oci-layout://` sources: an image out of an OCI image layout the client serves over its
//! session as a content store (`source/containerimage/ocilayout.go` and the OCI-layout cases of
//! `pull.go` in moby/buildkit v0.11.6; Go clients' `llb.OCILayout` with `SolveOpt.OCIStores`,
//! Dockerfile named contexts `context:NAME=oci-layout://STORE@sha256:…`).
//!
//! Identifier `oci-layout://<name>@sha256:<hex>`: the name only labels the image in progress
//! and errors; the digest (required, "reference … must have digest") is that of the root blob
//! in the store, an image index or a manifest. Attributes: `oci.store` names the store (the
//! session's content store `oci:<store>`), `oci.session` the session serving it (else the
//! build's), `oci.layerlimit` keeps only the first N layers.
//!
//! Resolution reads the root blob (at most [`MAX_MANIFEST`] bytes, checked against its digest),
//! picks the manifest of the op's platform (the worker's default without one) out of an index
//! (nested indexes followed; entries without a platform are judged by their config, as
//! containerd's `images.Manifest` does), then reads the manifest and the image config (both
//! checked) for the layers' diffIDs. Every blob the client sends is verified: a layer against
//! its digest and its diffID while it is applied.
//!
//! Cache key: the root digest, the platform and the layer limit; content-addressed, so no
//! session call is needed for it and a rebuild with the same layout is CACHED without reading
//! anything from the client. The result is materialised as an imported cache result is
//! ([`Imported::materialize`]): a layer prefix the bound Docker Engine has (same chainIDs) is used
//! in place, a layer berth already holds (same diffID) is reused, and only the others are read
//! from the client.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use async_trait::async_trait;
use protos::pb::op::Op as OpPayload;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::error::{BoxError, Error, ErrorKind, Result};
use crate::llbsolver::cache::blocking;
use crate::llbsolver::definition::LoadedOp;
use crate::llbsolver::import::Imported;
use crate::ops::BuildEnv;
use crate::progress::ProgressEvent;
use crate::remote::{CacheSource, CacheSourceRef, RemoteLayer};
use crate::result::Snap;
use crate::session::SessionProvider;
use crate::solver::{Op, OpContext, Solved};

/// Largest index or manifest read from the client (buildkitd's `maxReadSize`).
pub const MAX_MANIFEST: u64 = 4 << 20;
/// Largest image config read from the client.
const MAX_CONFIG: u64 = 16 << 20;
/// Index nesting followed at most.
const MAX_DEPTH: usize = 4;

const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Where an `oci-layout://` image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciLayoutRef {
    /// The reference as given (`name@sha256:…`), for messages.
    pub reference: String,
    /// `sha256:<hex>` of the root blob.
    pub digest: String,
    /// The content store id in the session (`oci:` + `oci.store`).
    pub store: String,
    /// `oci.session`, if set.
    pub session: Option<String>,
}

impl OciLayoutRef {
    /// Parses `reference` (`name@sha256:…`, without the `oci-layout://` scheme) for store
    /// `store_id` (the `oci.store` attribute, without the `oci:` prefix).
    pub fn parse(reference: &str, store_id: &str, session: Option<&str>) -> Result<Self> {
        let invalid = |m: String| op_err(ErrorKind::InvalidArgument, m);
        let Some((name, digest)) = reference.rsplit_once('@') else {
            return Err(invalid(format!("reference {reference:?} must have digest")));
        };
        if name.is_empty() {
            return Err(invalid(format!("invalid reference {reference:?}: no name")));
        }
        let hex = digest.strip_prefix("sha256:").unwrap_or_default();
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(invalid(format!(
                "invalid reference {reference:?}: digest {digest:?} is not sha256:<64 lowercase hex digits>"
            )));
        }
        Ok(OciLayoutRef {
            reference: reference.to_string(),
            digest: digest.to_string(),
            store: format!("oci:{store_id}"),
            session: session.filter(|s| !s.is_empty()).map(str::to_string),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: i64,
    #[serde(default)]
    platform: Option<DescPlatform>,
}

#[derive(Debug, Deserialize)]
struct DescPlatform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: String,
}

/// An index or a manifest (both read into one shape; `manifests` tells them apart).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RootBlob {
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

#[derive(Debug, Default, Deserialize)]
struct ConfigHead {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: String,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// The image an `oci-layout://` reference resolved to for one platform.
#[derive(Debug, Clone)]
pub struct ResolvedOciImage {
    /// Digest of the platform's manifest.
    pub manifest: String,
    /// The image config JSON.
    pub config: Vec<u8>,
    /// The layers, bottom first, with their diffIDs.
    layers: Vec<RemoteLayer>,
}

/// Reads the image `r` names for `platform` from the client's store: root, manifest, config.
pub async fn resolve(
    session: &dyn SessionProvider,
    r: &OciLayoutRef,
    platform: &registry::Platform,
) -> Result<ResolvedOciImage> {
    let client = Client { session, r };
    let size = client
        .info(&r.digest)
        .await
        .map_err(|e| {
            op_err(
                e.kind(),
                format!("{}: unable to get info about digest: {e}", r.reference),
            )
        })?
        .ok_or_else(|| {
            op_err(
                ErrorKind::NotFound,
                format!(
                    "{}: unable to get info about digest: content {} not found in the client's content store {}",
                    r.reference, r.digest, r.store
                ),
            )
        })?;
    let mut desc = Descriptor {
        media_type: String::new(),
        digest: r.digest.clone(),
        size: size as i64,
        platform: None,
    };
    for _ in 0..=MAX_DEPTH {
        let dt = client
            .read_small(&desc, MAX_MANIFEST, "root manifest")
            .await?;
        let blob: RootBlob = serde_json::from_slice(&dt).map_err(|e| {
            op_err(
                ErrorKind::InvalidArgument,
                format!(
                    "reference {:?} contains neither an index nor a manifest: {e}",
                    r.reference
                ),
            )
        })?;
        let is_index = blob.manifests.is_some() || INDEX_TYPES.contains(&blob.media_type.as_str());
        if is_index {
            desc = client
                .pick(blob.manifests.unwrap_or_default(), platform, &desc.digest)
                .await?;
            continue;
        }
        let (Some(config), Some(layers)) = (blob.config, blob.layers) else {
            return Err(op_err(
                ErrorKind::InvalidArgument,
                format!(
                    "reference {:?} contains neither an index nor a manifest",
                    r.reference
                ),
            ));
        };
        let cfg = client
            .read_small(&config, MAX_CONFIG, "image config")
            .await?;
        let head: ConfigHead = serde_json::from_slice(&cfg).map_err(|e| {
            op_err(
                ErrorKind::InvalidArgument,
                format!(
                    "{}: invalid image config {}: {e}",
                    r.reference, config.digest
                ),
            )
        })?;
        let diff_ids = head.rootfs.map(|f| f.diff_ids).unwrap_or_default();
        if diff_ids.len() != layers.len() {
            return Err(op_err(
                ErrorKind::InvalidArgument,
                format!(
                    "{}: manifest {} has {} layers, its config {} lists {} diffIDs",
                    r.reference,
                    desc.digest,
                    layers.len(),
                    config.digest,
                    diff_ids.len()
                ),
            ));
        }
        let layers = layers
            .into_iter()
            .zip(diff_ids)
            .map(|(l, diff_id)| RemoteLayer {
                digest: l.digest,
                media_type: l.media_type,
                size: l.size.max(0) as u64,
                diff_id,
                created_at: None,
            })
            .collect();
        return Ok(ResolvedOciImage {
            manifest: desc.digest,
            config: cfg,
            layers,
        });
    }
    Err(op_err(
        ErrorKind::InvalidArgument,
        format!("{}: indexes nested more than {MAX_DEPTH} deep", r.reference),
    ))
}

fn op_err(kind: ErrorKind, message: String) -> Error {
    Error::Op {
        message,
        kind,
        source: None,
    }
}

/// Content store access for one reference.
struct Client<'a> {
    session: &'a dyn SessionProvider,
    r: &'a OciLayoutRef,
}

impl Client<'_> {
    async fn info(&self, digest: &str) -> Result<Option<u64>> {
        self.session
            .content_info(self.r.session.as_deref(), &self.r.store, digest)
            .await
    }

    /// Reads blob `d` (at most `max` bytes) and checks it against its digest and size.
    async fn read_small(&self, d: &Descriptor, max: u64, what: &str) -> Result<Vec<u8>> {
        let name = &self.r.reference;
        if d.size < 0 || d.size as u64 > max {
            return Err(op_err(
                ErrorKind::InvalidArgument,
                format!(
                    "{name}: {what} {} is {} bytes, more than {max}",
                    d.digest, d.size
                ),
            ));
        }
        let reader = self
            .session
            .content_read(self.r.session.as_deref(), &self.r.store, &d.digest)
            .await
            .map_err(|e| {
                op_err(
                    e.kind(),
                    format!("{name}: unable to read {what} {}: {e}", d.digest),
                )
            })?;
        let (digest, want) = (d.digest.clone(), d.size as u64);
        let what2 = format!("{name}: unable to read {what} {}", d.digest);
        let dt = blocking(move || {
            let mut dt = Vec::new();
            reader
                .take(max + 1)
                .read_to_end(&mut dt)
                .map_err(|e| op_err(ErrorKind::Unavailable, format!("{what2}: {e}")))?;
            Ok(dt)
        })
        .await?;
        let got = format!("sha256:{}", hex::encode(Sha256::digest(&dt)));
        if got != digest || dt.len() as u64 != want {
            return Err(op_err(
                ErrorKind::InvalidArgument,
                format!(
                    "{name}: {what} {digest} from the client's content store {} is {got} ({} bytes, expected {want})",
                    self.r.store,
                    dt.len()
                ),
            ));
        }
        Ok(dt)
    }

    /// The manifest of `platform` among an index's entries.
    async fn pick(
        &self,
        entries: Vec<Descriptor>,
        platform: &registry::Platform,
        index: &str,
    ) -> Result<Descriptor> {
        for e in entries {
            match &e.platform {
                Some(p) => {
                    let p = registry::Platform {
                        os: p.os.clone(),
                        architecture: p.architecture.clone(),
                        variant: p.variant.clone(),
                    };
                    if platform.matches(&p) {
                        return Ok(e);
                    }
                }
                None if INDEX_TYPES.contains(&e.media_type.as_str()) => return Ok(e),
                None => {
                    // No platform on the entry: its config says.
                    let dt = self.read_small(&e, MAX_MANIFEST, "manifest").await?;
                    let Ok(RootBlob {
                        config: Some(c), ..
                    }) = serde_json::from_slice::<RootBlob>(&dt)
                    else {
                        continue;
                    };
                    let cfg = self.read_small(&c, MAX_CONFIG, "image config").await?;
                    let head: ConfigHead = serde_json::from_slice(&cfg).unwrap_or_default();
                    let p = registry::Platform {
                        os: head.os,
                        architecture: head.architecture,
                        variant: head.variant,
                    };
                    if platform.matches(&p) {
                        return Ok(e);
                    }
                }
            }
        }
        Err(op_err(
            ErrorKind::NotFound,
            format!(
                "{}: no match for platform {platform} in manifest {index}: not found",
                self.r.reference
            ),
        ))
    }
}

/// The solver op for `op`.
pub(crate) fn new(op: &LoadedOp, env: &Arc<BuildEnv>) -> Result<Arc<dyn Op<Snap>>> {
    let OpPayload::Source(s) = op.payload() else {
        return Err(Error::Internal(
            "source_oci_layout::new called with another op".into(),
        ));
    };
    let reference = s
        .identifier
        .strip_prefix("oci-layout://")
        .unwrap_or(&s.identifier);
    let attr = |k: &str| s.attrs.get(k).map(String::as_str);
    let r = OciLayoutRef::parse(
        reference,
        attr("oci.store").unwrap_or_default(),
        attr("oci.session"),
    )
    .map_err(|e| Error::invalid_op(&op.digest, e.to_string()))?;
    let layer_limit = layer_limit(&s.attrs).map_err(|m| Error::invalid_op(&op.digest, m))?;
    let platform = match op.op.platform.as_ref() {
        Some(p) => registry::Platform {
            os: p.os.clone(),
            architecture: p.architecture.clone(),
            variant: p.variant.clone(),
        },
        None => {
            let d = &env.opts.default_platform;
            registry::Platform {
                os: d.os.clone(),
                architecture: d.architecture.clone(),
                variant: d.variant.clone(),
            }
        }
    };
    Ok(Arc::new(OciLayoutSource {
        r,
        layer_limit,
        platform,
        env: env.clone(),
    }))
}

fn layer_limit(attrs: &BTreeMap<String, String>) -> std::result::Result<Option<usize>, String> {
    match attrs.get("oci.layerlimit") {
        None => Ok(None),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(format!("invalid layer limit {v}")),
        },
    }
}

struct OciLayoutSource {
    r: OciLayoutRef,
    layer_limit: Option<usize>,
    platform: registry::Platform,
    env: Arc<BuildEnv>,
}

/// The client's store as a [`CacheSource`] for [`Imported::materialize`].
struct SessionBlobs {
    session: Arc<dyn SessionProvider>,
    r: OciLayoutRef,
}

#[async_trait]
impl CacheSource for SessionBlobs {
    fn describe(&self) -> String {
        self.r.reference.clone()
    }

    fn noun(&self) -> &'static str {
        "oci-layout"
    }

    fn lookup(&self, _key: &str) -> Option<Vec<RemoteLayer>> {
        None
    }

    async fn open(
        &self,
        layer: &RemoteLayer,
    ) -> std::result::Result<Box<dyn Read + Send>, BoxError> {
        Ok(self
            .session
            .content_read(self.r.session.as_deref(), &self.r.store, &layer.digest)
            .await?)
    }
}

#[async_trait]
impl Op<Snap> for OciLayoutSource {
    async fn cache_key(&self, _ctx: &OpContext, _inputs: &[Solved<Snap>]) -> Result<String> {
        let mut h = crate::digest::KeyHasher::new("oci-layout");
        h.field(self.r.digest.as_bytes())
            .field(self.platform.os.as_bytes())
            .field(self.platform.architecture.as_bytes())
            .field(self.platform.variant.as_bytes())
            .field(self.layer_limit.unwrap_or(0).to_string().as_bytes());
        Ok(h.finish())
    }

    async fn exec(&self, ctx: &OpContext, _inputs: &[Solved<Snap>]) -> Result<Vec<Snap>> {
        let started = std::time::SystemTime::now();
        let id = format!("resolve {}", self.r.reference);
        let status = |done: bool| {
            ctx.progress.send(ProgressEvent::VertexStatus {
                vertex: ctx.vertex.clone(),
                id: id.clone(),
                name: id.clone(),
                current: 0,
                total: 0,
                timestamp: std::time::SystemTime::now(),
                started: Some(started),
                completed: done.then(std::time::SystemTime::now),
            })
        };
        status(false);
        let mut img = resolve(self.env.session.as_ref(), &self.r, &self.platform).await?;
        status(true);
        if let Some(n) = self.layer_limit {
            if n > img.layers.len() {
                return Err(op_err(
                    ErrorKind::InvalidArgument,
                    format!(
                        "layer limit {n} is greater than the number of layers in the image {}",
                        img.layers.len()
                    ),
                ));
            }
            img.layers.truncate(n);
        }
        tracing::debug!(reference = %self.r.reference, manifest = %img.manifest, layers = img.layers.len(), "oci-layout image resolved");
        let source: CacheSourceRef = Arc::new(SessionBlobs {
            session: self.env.session.clone(),
            r: self.r.clone(),
        });
        let imported = Imported::new(vec![], self.env.store.clone(), self.env.opts.clone());
        let snap = imported.materialize(ctx, &source, &img.layers).await?;
        Ok(vec![snap])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn references() {
        let r = OciLayoutRef::parse(&format!("not/real@{D}"), "my-store", Some("")).unwrap();
        assert_eq!(r.digest, D);
        assert_eq!(r.store, "oci:my-store");
        assert_eq!(r.session, None);
        let r =
            OciLayoutRef::parse(&format!("docker.io/library/foo@{D}"), "s", Some("sess")).unwrap();
        assert_eq!(r.session.as_deref(), Some("sess"));
        for (bad, msg) in [
            ("not/real:latest", "must have digest"),
            ("not/real", "must have digest"),
            (&format!("@{D}") as &str, "no name"),
            ("x@sha256:abc", "not sha256:<64"),
            (
                &format!("x@{}", D.to_uppercase().replace("SHA256", "sha256")),
                "not sha256:<64",
            ),
            (
                &format!("x@{}", D.replace("sha256", "sha512")),
                "not sha256:<64",
            ),
        ] {
            let e = OciLayoutRef::parse(bad, "s", None).unwrap_err().to_string();
            assert!(e.contains(msg), "{bad}: {e}");
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn layer_limits() {
        let a = |v: &str| BTreeMap::from([("oci.layerlimit".to_string(), v.to_string())]);
        assert_eq!(layer_limit(&BTreeMap::new()), Ok(None));
        assert_eq!(layer_limit(&a("2")), Ok(Some(2)));
        for bad in ["0", "-1", "x", ""] {
            assert_eq!(
                layer_limit(&a(bad)),
                Err(format!("invalid layer limit {bad}"))
            );
        }
    }
}
