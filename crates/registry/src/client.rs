//! The distribution protocol (`/v2/…`) over the endpoints of [`crate::hosts`], with the auth of
//! [`crate::auth`]: resolve a reference to a manifest (choosing a platform from an index), fetch
//! blobs as verified streams, check and mount blobs, push blobs and manifests.
//!
//! Why not `oci-client`: it was checked (0.18) and lacks what buildkitd.toml and BuildKit's
//! session need here — client certificates (`keypair`), the session's `FetchToken` (a token the
//! client fetches, per challenge), OAuth identity tokens, one token covering two repositories
//! for a cross-repository mount, ordered mirror fallback per host config, and retries. The
//! protocol part is small; HTTP, TLS and the image types come from `reqwest`, `rustls` and
//! `oci-spec`.
//!
//! Every request to one endpoint is tried at most [`ATTEMPTS`] times on transient failures
//! (connection errors, 5xx, 429), with a short backoff; a blob stream that breaks or ends early
//! is resumed with a `Range` request at most [`RESUMES`] times. All content is verified against
//! its digest before its last byte is handed out as final: a [`BlobStream`] returns an error
//! instead of its end when the bytes do not match, so a consumer never finishes with bad data.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use reqwest::header::{
    HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RANGE,
    WWW_AUTHENTICATE,
};
use reqwest::StatusCode;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::auth::{self, AuthProvider, Challenge, TokenCache, TokenRequest};
use crate::hosts::{Capability, Endpoint, Hosts};
use crate::platform::Platform;
use crate::reference::{check_digest, Reference};
use crate::{Error, Result};

/// Attempts per request and endpoint for transient failures.
pub const ATTEMPTS: u32 = 3;
/// Resumptions of one blob stream after it broke.
pub const RESUMES: u32 = 3;
/// Largest manifest or index accepted (containerd's limit).
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;
/// Largest image config accepted.
pub const MAX_CONFIG_SIZE: u64 = 64 << 20;

/// Docker's schema 2 manifest.
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker's manifest list.
pub const MEDIA_TYPE_DOCKER_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image manifest.
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

const MANIFEST_ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*";

/// Progress callback: bytes transferred so far.
pub type ProgressFn = Arc<dyn Fn(u64) + Send + Sync>;

/// A registry client configured like buildkitd (cheap to clone; share one per daemon).
#[derive(Debug, Clone)]
pub struct Registry {
    hosts: Arc<Hosts>,
}

impl Registry {
    /// A client for these hosts.
    pub fn new(hosts: Hosts) -> Self {
        Registry {
            hosts: Arc::new(hosts),
        }
    }

    /// The host configuration.
    pub fn hosts(&self) -> &Hosts {
        &self.hosts
    }

    /// A client for pushing to `domain` with `registry.insecure=true`: that domain alone,
    /// plain HTTP first, then HTTPS without verification (BuildKit's `util/push` does the same).
    pub fn insecure_for(domain: &str) -> Registry {
        let mut m = std::collections::BTreeMap::new();
        m.insert(
            domain.to_string(),
            crate::hosts::HostConfig {
                http: Some(true),
                insecure: Some(true),
                ..Default::default()
            },
        );
        Registry::new(Hosts::new(m))
    }

    /// A session that authenticates with `auth` (one per build or client session).
    pub fn session(&self, auth: Arc<dyn AuthProvider>) -> Session {
        Session {
            inner: Arc::new(Inner {
                hosts: self.hosts.clone(),
                auth,
                tokens: Mutex::new(TokenCache::default()),
            }),
        }
    }
}

struct Inner {
    hosts: Arc<Hosts>,
    auth: Arc<dyn AuthProvider>,
    tokens: Mutex<TokenCache>,
}

/// Registry operations with one set of credentials.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

/// A manifest or index as fetched.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Where it came from.
    pub endpoint: Endpoint,
    /// `sha256:…` of `bytes`.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// The exact bytes.
    pub bytes: Bytes,
}

/// One blob as a manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Descriptor {
    /// Media type.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// `sha256:…`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Where a non-distributable (foreign) layer can be fetched.
    #[serde(default)]
    pub urls: Vec<String>,
    /// Platform of an index entry.
    #[serde(default)]
    pub platform: Option<IndexPlatform>,
}

/// `platform` of an index entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct IndexPlatform {
    /// `os`.
    #[serde(default)]
    pub os: String,
    /// `architecture`.
    #[serde(default)]
    pub architecture: String,
    /// `variant`.
    #[serde(default)]
    pub variant: String,
}

/// An image manifest (Docker schema 2 or OCI), the fields berth reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// `schemaVersion` (2).
    #[serde(rename = "schemaVersion", default)]
    pub schema_version: u32,
    /// `mediaType`, if present.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// The config blob.
    pub config: Descriptor,
    /// The layers, bottom first.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Index {
    #[serde(rename = "schemaVersion", default)]
    schema_version: u32,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct ConfigRootfs {
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// An image resolved for one platform: manifest, config and the diffIDs of its layers.
#[derive(Debug, Clone)]
pub struct Image {
    /// The reference asked for.
    pub reference: Reference,
    /// The endpoint that served the manifest (blobs are fetched there first).
    pub endpoint: Endpoint,
    /// Digest of what the reference points at (the index for a multi-platform image).
    pub digest: String,
    /// The index as fetched when the reference points at an index (`digest` is its digest).
    pub index: Option<Fetched>,
    /// Digest of the platform's manifest.
    pub manifest_digest: String,
    /// Media type of the platform's manifest.
    pub manifest_media_type: String,
    /// The manifest's exact bytes.
    pub manifest_bytes: Bytes,
    /// The manifest.
    pub manifest: Manifest,
    /// The config's exact bytes.
    pub config: Bytes,
    /// `rootfs.diff_ids` of the config, one per layer.
    pub diff_ids: Vec<String>,
}

impl Image {
    /// The image ID Docker gives it (the config digest).
    pub fn config_digest(&self) -> &str {
        &self.manifest.config.digest
    }
}

/// Outcome of starting an upload.
enum UploadStart {
    Mounted,
    Location(String),
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn status_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Errs {
        errors: Vec<E>,
    }
    #[derive(Deserialize)]
    struct E {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    if let Ok(e) = serde_json::from_slice::<Errs>(body) {
        let parts: Vec<String> = e
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.code, e.message))
            .collect();
        if !parts.is_empty() {
            return parts.join("; ");
        }
    }
    let s = String::from_utf8_lossy(&body[..body.len().min(300)]);
    s.trim().to_string()
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200 * 3u64.pow(attempt.min(4)))
}

/// Describes a failed request to `host` (`name:port`) the way Go's `net` package does, because
/// clients and tests of buildkitd match on those words (`dial tcp: lookup fake-url`, `no such
/// host`, `connection refused`); anything else is the innermost cause's own text.
pub fn network_reason(host: &str, e: &(dyn std::error::Error + 'static)) -> String {
    let mut chain: Vec<&(dyn std::error::Error + 'static)> = vec![e];
    while let Some(next) = chain.last().and_then(|c| c.source()) {
        chain.push(next);
    }
    let name = match host.rsplit_once(':') {
        Some((n, port)) if !port.contains(']') => n,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    // hyper-util wraps resolver failures as "dns error"; the io error below says what failed.
    if chain.iter().any(|c| c.to_string().starts_with("dns error")) {
        return format!("dial tcp: lookup {name}: no such host");
    }
    for c in &chain {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    return format!("dial tcp {host}: connect: connection refused")
                }
                std::io::ErrorKind::TimedOut => return format!("dial tcp {host}: i/o timeout"),
                _ => {}
            }
        }
    }
    chain.last().map(|c| c.to_string()).unwrap_or_default()
}

/// Context naming a request in errors.
struct Step<'a> {
    reference: &'a Reference,
    step: &'a str,
}

impl Step<'_> {
    fn unreachable(&self, ep: &Endpoint, e: impl Into<crate::error::BoxError>) -> Error {
        let source = e.into();
        Error::Unreachable {
            reference: self.reference.to_string(),
            step: self.step.to_string(),
            host: ep.host.clone(),
            reason: network_reason(&ep.host, source.as_ref()),
            source,
        }
    }

    async fn status_error(&self, ep: &Endpoint, resp: reqwest::Response) -> Error {
        let status = resp.status().as_u16();
        let body = resp.bytes().await.unwrap_or_default();
        let message = status_message(&body);
        match status {
            404 => Error::NotFound {
                reference: self.reference.to_string(),
                step: self.step.to_string(),
            },
            401 | 403 => Error::Unauthorized {
                reference: self.reference.to_string(),
                step: self.step.to_string(),
                host: ep.host.clone(),
                status,
                message,
            },
            _ => Error::Http {
                reference: self.reference.to_string(),
                step: self.step.to_string(),
                host: ep.host.clone(),
                status,
                message,
            },
        }
    }
}

fn pull_scope(repo: &str) -> String {
    format!("repository:{repo}:pull")
}

fn push_scope(repo: &str) -> String {
    format!("repository:{repo}:pull,push")
}

impl Session {
    /// Sends the request built by `build` to `ep`, authenticating on a 401 challenge (once), and
    /// retrying transient failures. Returns any response that is not a transient failure.
    async fn send(
        &self,
        ep: &Endpoint,
        st: &Step<'_>,
        scopes: &[String],
        build: &(dyn Fn(&reqwest::Client) -> reqwest::RequestBuilder + Send + Sync),
    ) -> Result<reqwest::Response> {
        let client = self.inner.hosts.client(ep)?;
        let scope_key = scopes.join(" ");
        let mut authed = false;
        let mut attempt = 0;
        loop {
            let mut rb = build(&client);
            let cached = {
                let t = self.inner.tokens.lock().unwrap();
                t.get(&ep.host, &scope_key)
                    .or_else(|| t.get(&ep.host, "*basic*"))
            };
            if let Some(h) = cached {
                rb = rb.header(AUTHORIZATION, h);
            }
            let res = rb.send().await;
            let retry = match &res {
                Err(e) => !e.is_builder(),
                Ok(r) => {
                    r.status().is_server_error() || r.status() == StatusCode::TOO_MANY_REQUESTS
                }
            };
            if retry && attempt + 1 < ATTEMPTS {
                tracing::debug!(host = %ep.host, step = st.step, attempt, "transient registry failure, retrying");
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
                continue;
            }
            let resp = res.map_err(|e| st.unreachable(ep, e))?;
            if resp.status() == StatusCode::UNAUTHORIZED && !authed {
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(auth::parse_challenge);
                let Some(challenge) = challenge else {
                    return Ok(resp);
                };
                authed = true;
                self.authorize(ep, st, &client, &challenge, scopes, &scope_key)
                    .await?;
                continue;
            }
            return Ok(resp);
        }
    }

    async fn authorize(
        &self,
        ep: &Endpoint,
        st: &Step<'_>,
        client: &reqwest::Client,
        challenge: &Challenge,
        scopes: &[String],
        scope_key: &str,
    ) -> Result<()> {
        let host = ep.host.as_str();
        match challenge {
            Challenge::Basic => {
                let creds = self
                    .inner
                    .auth
                    .credentials(host)
                    .await
                    .map_err(|e| auth::auth_err(host, e))?;
                let Some(c) = creds.filter(|c| !c.username.is_empty()) else {
                    return Err(Error::Unauthorized {
                        reference: st.reference.to_string(),
                        step: st.step.to_string(),
                        host: host.to_string(),
                        status: 401,
                        message: "the registry asks for a user name and password and the client sent none (docker login?)".into(),
                    });
                };
                self.inner.tokens.lock().unwrap().put(
                    host,
                    "*basic*",
                    auth::basic_header(&c),
                    None,
                );
            }
            Challenge::Bearer { realm, service } => {
                let req = TokenRequest {
                    host: host.to_string(),
                    realm: realm.clone(),
                    service: service.clone(),
                    scopes: scopes.to_vec(),
                };
                let from_session = self
                    .inner
                    .auth
                    .fetch_token(&req)
                    .await
                    .map_err(|e| auth::auth_err(host, e))?;
                let (header, ttl) = match from_session {
                    Some(t) => (format!("Bearer {}", t.token), Some(auth::ttl(t.expires_in))),
                    None => {
                        let creds = self
                            .inner
                            .auth
                            .credentials(host)
                            .await
                            .map_err(|e| auth::auth_err(host, e))?;
                        auth::fetch_token(client, &req, creds.as_ref())
                            .await
                            .map_err(|f| match f.network {
                                Some(e) => st.unreachable(ep, e),
                                None => Error::Unauthorized {
                                    reference: st.reference.to_string(),
                                    step: st.step.to_string(),
                                    host: host.to_string(),
                                    status: f.status,
                                    message: f.message,
                                },
                            })?
                    }
                };
                self.inner
                    .tokens
                    .lock()
                    .unwrap()
                    .put(host, scope_key, header, ttl);
            }
        }
        Ok(())
    }

    fn endpoints(&self, domain: &str, push: bool) -> Vec<Endpoint> {
        self.inner
            .hosts
            .endpoints(domain)
            .into_iter()
            .filter(|e| !push || e.capability == Capability::PullPush)
            .collect()
    }

    /// Reads a body of at most `limit` bytes.
    async fn read_limited(
        st: &Step<'_>,
        ep: &Endpoint,
        resp: reqwest::Response,
        limit: u64,
    ) -> Result<Bytes> {
        if resp.content_length().is_some_and(|n| n > limit) {
            return Err(Error::Manifest {
                reference: st.reference.to_string(),
                step: st.step.to_string(),
                reason: format!("larger than the {limit} bytes allowed"),
            });
        }
        let mut out = Vec::new();
        let mut s = resp.bytes_stream();
        while let Some(chunk) = s.next().await {
            let chunk = chunk.map_err(|e| st.unreachable(ep, e))?;
            if out.len() as u64 + chunk.len() as u64 > limit {
                return Err(Error::Manifest {
                    reference: st.reference.to_string(),
                    step: st.step.to_string(),
                    reason: format!("larger than the {limit} bytes allowed"),
                });
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out.into())
    }

    /// Fetches the manifest or index `object` (tag or digest) of `r` from `ep`.
    async fn get_manifest(
        &self,
        ep: &Endpoint,
        r: &Reference,
        object: &str,
        step: &str,
    ) -> Result<Fetched> {
        let st = Step { reference: r, step };
        let url = format!("{}/{}/manifests/{}", ep.base_url(), r.repository(), object);
        let scopes = [pull_scope(r.repository())];
        let resp = self
            .send(ep, &st, &scopes, &|c| {
                c.get(&url).header(ACCEPT, MANIFEST_ACCEPT)
            })
            .await?;
        if !resp.status().is_success() {
            return Err(st.status_error(ep, resp).await);
        }
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
        let bytes = Self::read_limited(&st, ep, resp, MAX_MANIFEST_SIZE).await?;
        let digest = sha256(&bytes);
        let expected = if check_digest(object) {
            Some(object.to_string())
        } else {
            header_digest.filter(|d| d.starts_with("sha256:"))
        };
        if let Some(expected) = expected {
            if expected != digest {
                return Err(Error::DigestMismatch {
                    reference: r.to_string(),
                    step: step.to_string(),
                    expected,
                    found: digest,
                });
            }
        }
        #[derive(Deserialize)]
        struct Probe {
            #[serde(rename = "mediaType", default)]
            media_type: String,
            #[serde(rename = "schemaVersion", default)]
            schema_version: u32,
            #[serde(default)]
            manifests: Option<serde_json::Value>,
        }
        let probe: Probe = serde_json::from_slice(&bytes).map_err(|e| Error::Manifest {
            reference: r.to_string(),
            step: step.to_string(),
            reason: format!("not a manifest: {e}"),
        })?;
        if probe.schema_version == 1 {
            return Err(Error::Manifest {
                reference: r.to_string(),
                step: step.to_string(),
                reason: "Docker schema 1 manifests are not supported".into(),
            });
        }
        let media_type = if !probe.media_type.is_empty() {
            probe.media_type
        } else if let Some(ct) =
            content_type.filter(|c| c.contains("manifest") || c.contains("index"))
        {
            ct
        } else if probe.manifests.is_some() {
            MEDIA_TYPE_OCI_INDEX.to_string()
        } else {
            MEDIA_TYPE_OCI_MANIFEST.to_string()
        };
        Ok(Fetched {
            endpoint: ep.clone(),
            digest,
            media_type,
            bytes,
        })
    }

    /// Tries `f` on each endpoint in order; returns the first success, else the first error that
    /// is not "not found" (or not found).
    async fn on_endpoints<T, F, Fut>(
        &self,
        eps: &[Endpoint],
        r: &Reference,
        step: &str,
        f: F,
    ) -> Result<T>
    where
        F: Fn(Endpoint) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut first_err = None;
        for ep in eps {
            match f(ep.clone()).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    tracing::debug!(host = %ep.host, error = %e, "registry endpoint failed, trying the next");
                    if !matches!(e, Error::NotFound { .. }) && first_err.is_none() {
                        first_err = Some(e);
                    }
                }
            }
        }
        Err(first_err.unwrap_or_else(|| Error::NotFound {
            reference: r.to_string(),
            step: step.to_string(),
        }))
    }

    /// Resolves `r` to what it points at (manifest or index), trying mirrors first.
    pub async fn resolve(&self, r: &Reference) -> Result<Fetched> {
        let eps = self.endpoints(r.domain(), false);
        self.on_endpoints(&eps, r, "resolve", |ep| async move {
            self.get_manifest(&ep, r, r.object(), "resolve").await
        })
        .await
    }

    /// Resolves `r` for `platform`: the manifest (picked from an index), its config and diffIDs.
    pub async fn resolve_image(&self, r: &Reference, platform: &Platform) -> Result<Image> {
        let top = self.resolve(r).await?;
        let mut eps = vec![top.endpoint.clone()];
        eps.extend(
            self.endpoints(r.domain(), false)
                .into_iter()
                .filter(|e| *e != top.endpoint),
        );
        let is_index =
            top.media_type == MEDIA_TYPE_OCI_INDEX || top.media_type == MEDIA_TYPE_DOCKER_LIST;
        let manifest = if is_index {
            let index: Index = serde_json::from_slice(&top.bytes).map_err(|e| Error::Manifest {
                reference: r.to_string(),
                step: "resolve".into(),
                reason: format!("invalid index: {e}"),
            })?;
            if index.schema_version != 2 {
                return Err(Error::Manifest {
                    reference: r.to_string(),
                    step: "resolve".into(),
                    reason: format!("unsupported index schemaVersion {}", index.schema_version),
                });
            }
            let pick = index.manifests.iter().find(|d| {
                d.platform.as_ref().is_some_and(|p| {
                    platform.matches(&Platform {
                        os: p.os.clone(),
                        architecture: p.architecture.clone(),
                        variant: p.variant.clone(),
                    })
                })
            });
            let Some(d) = pick else {
                let have: Vec<String> = index
                    .manifests
                    .iter()
                    .filter_map(|d| d.platform.as_ref())
                    .map(|p| {
                        format!(
                            "{}/{}{}{}",
                            p.os,
                            p.architecture,
                            if p.variant.is_empty() { "" } else { "/" },
                            p.variant
                        )
                    })
                    .collect();
                return Err(Error::NotFound {
                    reference: r.to_string(),
                    step: format!(
                        "pick platform {platform} (the index has {})",
                        have.join(", ")
                    ),
                });
            };
            let digest = d.digest.clone();
            if !check_digest(&digest) {
                return Err(Error::Manifest {
                    reference: r.to_string(),
                    step: "resolve".into(),
                    reason: format!("invalid manifest digest {digest:?} in index"),
                });
            }
            let step = format!("fetch manifest {digest}");
            self.on_endpoints(&eps, r, &step, |ep| {
                let (digest, step) = (digest.clone(), step.clone());
                async move { self.get_manifest(&ep, r, &digest, &step).await }
            })
            .await?
        } else {
            top.clone()
        };
        let parsed: Manifest =
            serde_json::from_slice(&manifest.bytes).map_err(|e| Error::Manifest {
                reference: r.to_string(),
                step: format!("parse manifest {}", manifest.digest),
                reason: e.to_string(),
            })?;
        if parsed.schema_version != 2 {
            return Err(Error::Manifest {
                reference: r.to_string(),
                step: format!("parse manifest {}", manifest.digest),
                reason: format!("unsupported schemaVersion {}", parsed.schema_version),
            });
        }
        for d in std::iter::once(&parsed.config).chain(&parsed.layers) {
            if !check_digest(&d.digest) {
                return Err(Error::Manifest {
                    reference: r.to_string(),
                    step: format!("parse manifest {}", manifest.digest),
                    reason: format!("invalid digest {:?}", d.digest),
                });
            }
        }
        if parsed.config.size > MAX_CONFIG_SIZE {
            return Err(Error::Manifest {
                reference: r.to_string(),
                step: "fetch config".into(),
                reason: format!(
                    "config of {} bytes is larger than allowed",
                    parsed.config.size
                ),
            });
        }
        let config = self.fetch_blob_bytes(&eps, r, &parsed.config).await?;
        let rootfs: ConfigRootfs =
            serde_json::from_slice(&config).map_err(|e| Error::Manifest {
                reference: r.to_string(),
                step: format!("parse config {}", parsed.config.digest),
                reason: e.to_string(),
            })?;
        let diff_ids = rootfs.rootfs.map(|r| r.diff_ids).unwrap_or_default();
        if diff_ids.len() != parsed.layers.len() {
            return Err(Error::Manifest {
                reference: r.to_string(),
                step: format!("parse config {}", parsed.config.digest),
                reason: format!(
                    "the config lists {} diffIDs for {} layers",
                    diff_ids.len(),
                    parsed.layers.len()
                ),
            });
        }
        if let Some(bad) = diff_ids.iter().find(|d| !check_digest(d)) {
            return Err(Error::Manifest {
                reference: r.to_string(),
                step: format!("parse config {}", parsed.config.digest),
                reason: format!("invalid diffID {bad:?}"),
            });
        }
        Ok(Image {
            reference: r.clone(),
            endpoint: manifest.endpoint.clone(),
            index: is_index.then(|| top.clone()),
            digest: top.digest,
            manifest_digest: manifest.digest,
            manifest_media_type: manifest.media_type,
            manifest_bytes: manifest.bytes,
            manifest: parsed,
            config,
            diff_ids,
        })
    }

    async fn fetch_blob_bytes(
        &self,
        eps: &[Endpoint],
        r: &Reference,
        d: &Descriptor,
    ) -> Result<Bytes> {
        let mut s = self.open_blob(eps, r, d, None).await?;
        let mut out = Vec::with_capacity(d.size as usize);
        while let Some(c) = s.next_chunk().await? {
            out.extend_from_slice(&c);
        }
        Ok(out.into())
    }

    /// Opens blob `d` of `r` as a verified stream, trying `eps` in order (foreign layers: their
    /// `urls` first). `progress` is called with the bytes received so far.
    pub async fn open_blob(
        &self,
        eps: &[Endpoint],
        r: &Reference,
        d: &Descriptor,
        progress: Option<ProgressFn>,
    ) -> Result<BlobStream> {
        let step = format!("fetch blob {}", d.digest);
        let mut first_err = None;
        for url in &d.urls {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                continue;
            }
            let mut s = BlobStream::new(
                self.clone(),
                None,
                r.clone(),
                d.clone(),
                url.clone(),
                progress.clone(),
            );
            match s.start(0).await {
                Ok(()) => return Ok(s),
                Err(e) => {
                    tracing::debug!(url, error = %e, "foreign layer URL failed");
                    first_err.get_or_insert(e);
                }
            }
        }
        let eps = if eps.is_empty() {
            self.endpoints(r.domain(), false)
        } else {
            eps.to_vec()
        };
        for ep in eps {
            let url = format!("{}/{}/blobs/{}", ep.base_url(), r.repository(), d.digest);
            let mut s = BlobStream::new(
                self.clone(),
                Some(ep.clone()),
                r.clone(),
                d.clone(),
                url,
                progress.clone(),
            );
            match s.start(0).await {
                Ok(()) => return Ok(s),
                Err(e) => {
                    tracing::debug!(host = %ep.host, error = %e, "blob fetch failed, trying the next endpoint");
                    if !matches!(e, Error::NotFound { .. }) && first_err.is_none() {
                        first_err = Some(e);
                    }
                }
            }
        }
        Err(first_err.unwrap_or(Error::NotFound {
            reference: r.to_string(),
            step,
        }))
    }

    /// Opens the blobs of a resolved image (served by its endpoint first).
    pub async fn open_image_blob(
        &self,
        img: &Image,
        d: &Descriptor,
        progress: Option<ProgressFn>,
    ) -> Result<BlobStream> {
        let mut eps = vec![img.endpoint.clone()];
        eps.extend(
            self.endpoints(img.reference.domain(), false)
                .into_iter()
                .filter(|e| *e != img.endpoint),
        );
        self.open_blob(&eps, &img.reference, d, progress).await
    }

    /// The endpoint pushes go to: the first push-capable one (as containerd's pusher).
    fn push_endpoint(&self, r: &Reference) -> Result<Endpoint> {
        self.endpoints(r.domain(), true)
            .into_iter()
            .next()
            .ok_or_else(|| Error::InvalidReference {
                reference: r.to_string(),
                reason: "no endpoint can push".into(),
            })
    }

    /// Whether the registry of `r` has blob `digest` in `r`'s repository (HEAD).
    pub async fn blob_exists(&self, r: &Reference, digest: &str) -> Result<bool> {
        let step = format!("check blob {digest}");
        let eps = vec![self.push_endpoint(r)?];
        self.on_endpoints(&eps, r, &step, |ep| {
            let step = step.clone();
            async move {
                let st = Step {
                    reference: r,
                    step: &step,
                };
                let url = format!("{}/{}/blobs/{}", ep.base_url(), r.repository(), digest);
                let scopes = [push_scope(r.repository())];
                let resp = self.send(&ep, &st, &scopes, &|c| c.head(&url)).await?;
                match resp.status() {
                    s if s.is_success() => Ok(true),
                    StatusCode::NOT_FOUND => Ok(false),
                    _ => Err(st.status_error(&ep, resp).await),
                }
            }
        })
        .await
    }

    async fn start_upload(
        &self,
        ep: &Endpoint,
        r: &Reference,
        mount: Option<(&str, &str)>,
    ) -> Result<UploadStart> {
        let step = match mount {
            Some((d, from)) => format!("mount blob {d} from {from}"),
            None => "start upload".to_string(),
        };
        let st = Step {
            reference: r,
            step: &step,
        };
        let mut url = format!("{}/{}/blobs/uploads/", ep.base_url(), r.repository());
        let mut scopes = vec![push_scope(r.repository())];
        if let Some((d, from)) = mount {
            url.push_str(&format!("?mount={d}&from={from}"));
            if from != r.repository() {
                scopes.push(pull_scope(from));
            }
        }
        let resp = self
            .send(ep, &st, &scopes, &|c| {
                c.post(&url).header(CONTENT_LENGTH, "0")
            })
            .await?;
        match resp.status() {
            StatusCode::CREATED if mount.is_some() => Ok(UploadStart::Mounted),
            StatusCode::ACCEPTED | StatusCode::CREATED => {
                let loc = resp
                    .headers()
                    .get(LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| Error::Http {
                        reference: r.to_string(),
                        step: step.clone(),
                        host: ep.host.clone(),
                        status: resp.status().as_u16(),
                        message: "upload started without a Location".into(),
                    })?;
                Ok(UploadStart::Location(absolute(ep, loc)))
            }
            _ => Err(st.status_error(ep, resp).await),
        }
    }

    /// Pushes blob `digest` of `size` bytes into `r`'s repository: skipped when the registry
    /// has it (HEAD), mounted from `mount_from` (another repository of the same registry) when
    /// possible, else uploaded from the file at `path` (re-read on a retry). Returns what was
    /// done.
    pub async fn push_blob(
        &self,
        r: &Reference,
        digest: &str,
        size: u64,
        path: &std::path::Path,
        mount_from: Option<&str>,
        progress: Option<ProgressFn>,
    ) -> Result<PushedBlob> {
        if self.blob_exists(r, digest).await? {
            return Ok(PushedBlob::Existed);
        }
        let ep = self.push_endpoint(r)?;
        let step = format!("push blob {digest}");
        let mut attempt = 0;
        loop {
            let r = self
                .upload_once(
                    &ep,
                    r,
                    digest,
                    size,
                    path,
                    mount_from,
                    progress.clone(),
                    &step,
                )
                .await;
            match r {
                Err(e) if e.transient() && attempt + 1 < ATTEMPTS => {
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn upload_once(
        &self,
        ep: &Endpoint,
        r: &Reference,
        digest: &str,
        size: u64,
        path: &std::path::Path,
        mount_from: Option<&str>,
        progress: Option<ProgressFn>,
        step: &str,
    ) -> Result<PushedBlob> {
        let mount = mount_from
            .filter(|f| *f != r.repository())
            .map(|f| (digest, f));
        let location = match self.start_upload(ep, r, mount).await? {
            UploadStart::Mounted => return Ok(PushedBlob::Mounted),
            UploadStart::Location(l) => l,
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{sep}digest={digest}");
        let st = Step { reference: r, step };
        let path = path.to_path_buf();
        let scopes = [push_scope(r.repository())];
        let client = self.inner.hosts.client(ep)?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|source| Error::Io {
                what: "open blob",
                path: path.display().to_string(),
                source,
            })?;
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = sent.clone();
        let stream = tokio_util_reader_stream(file).map(move |chunk| {
            if let Ok(c) = &chunk {
                let n = counter.fetch_add(c.len() as u64, std::sync::atomic::Ordering::Relaxed)
                    + c.len() as u64;
                if let Some(p) = &progress {
                    p(n);
                }
            }
            chunk
        });
        let mut rb = client
            .put(&url)
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, size)
            .body(reqwest::Body::wrap_stream(stream));
        let cached = {
            let t = self.inner.tokens.lock().unwrap();
            t.get(&ep.host, &scopes.join(" "))
                .or_else(|| t.get(&ep.host, "*basic*"))
        };
        if let Some(h) = cached {
            rb = rb.header(AUTHORIZATION, h);
        }
        let resp = rb.send().await.map_err(|e| st.unreachable(ep, e))?;
        if resp.status() != StatusCode::CREATED && !resp.status().is_success() {
            return Err(st.status_error(ep, resp).await);
        }
        Ok(PushedBlob::Uploaded)
    }

    /// Pushes a manifest or index under `tag_or_digest` of `r`'s repository; returns its digest.
    pub async fn push_manifest(
        &self,
        r: &Reference,
        tag_or_digest: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<String> {
        let digest = sha256(&bytes);
        let step = format!("push manifest {digest}");
        let ep = self.push_endpoint(r)?;
        let st = Step {
            reference: r,
            step: &step,
        };
        let url = format!(
            "{}/{}/manifests/{}",
            ep.base_url(),
            r.repository(),
            tag_or_digest
        );
        let scopes = [push_scope(r.repository())];
        let mt = media_type.to_string();
        let resp = self
            .send(&ep, &st, &scopes, &|c| {
                c.put(&url)
                    .header(CONTENT_TYPE, mt.as_str())
                    .body(bytes.clone())
            })
            .await?;
        if !resp.status().is_success() {
            return Err(st.status_error(&ep, resp).await);
        }
        if let Some(h) = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
        {
            if h != digest {
                return Err(Error::DigestMismatch {
                    reference: r.to_string(),
                    step,
                    expected: digest,
                    found: h.to_string(),
                });
            }
        }
        Ok(digest)
    }
}

/// What [`Session::push_blob`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushedBlob {
    /// The registry had it.
    Existed,
    /// Mounted from another repository.
    Mounted,
    /// Uploaded.
    Uploaded,
}

fn absolute(ep: &Endpoint, loc: &str) -> String {
    if loc.starts_with("http://") || loc.starts_with("https://") {
        loc.to_string()
    } else {
        let scheme = if ep.plain_http { "http" } else { "https" };
        format!("{scheme}://{}{}", ep.host, loc)
    }
}

fn tokio_util_reader_stream(
    file: tokio::fs::File,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    use tokio::io::AsyncReadExt as _;
    futures::stream::unfold(file, |mut file| async move {
        let mut buf = vec![0u8; 256 << 10];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    })
}

/// A blob being received: chunks come out as they arrive; the size and digest are checked at
/// the end, and a mismatch is returned as an error instead of the end. Breaks are resumed with
/// `Range` (at most [`RESUMES`] times).
pub struct BlobStream {
    session: Session,
    endpoint: Option<Endpoint>,
    reference: Reference,
    desc: Descriptor,
    url: String,
    body: Option<futures::stream::BoxStream<'static, reqwest::Result<Bytes>>>,
    got: u64,
    hasher: Sha256,
    resumes: u32,
    progress: Option<ProgressFn>,
    done: bool,
}

impl std::fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStream")
            .field("digest", &self.desc.digest)
            .field("got", &self.got)
            .finish_non_exhaustive()
    }
}

impl BlobStream {
    fn new(
        session: Session,
        endpoint: Option<Endpoint>,
        reference: Reference,
        desc: Descriptor,
        url: String,
        progress: Option<ProgressFn>,
    ) -> Self {
        BlobStream {
            session,
            endpoint,
            reference,
            desc,
            url,
            body: None,
            got: 0,
            hasher: Sha256::new(),
            resumes: 0,
            progress,
            done: false,
        }
    }

    fn step(&self) -> String {
        format!("fetch blob {}", self.desc.digest)
    }

    /// The descriptor being fetched.
    pub fn descriptor(&self) -> &Descriptor {
        &self.desc
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.got
    }

    async fn start(&mut self, offset: u64) -> Result<()> {
        let step = self.step();
        let st = Step {
            reference: &self.reference,
            step: &step,
        };
        let url = self.url.clone();
        let range = (offset > 0).then(|| format!("bytes={offset}-"));
        let build = move |c: &reqwest::Client| {
            let mut rb = c.get(&url);
            if let Some(r) = &range {
                rb = rb.header(RANGE, HeaderValue::from_str(r).expect("ascii range"));
            }
            rb
        };
        let resp = match &self.endpoint {
            Some(ep) => {
                let scopes = [pull_scope(self.reference.repository())];
                self.session.send(ep, &st, &scopes, &build).await?
            }
            None => {
                // A foreign layer URL: a plain GET, no registry auth.
                let ep = foreign_endpoint(&self.url);
                let client = self.session.inner.hosts.client(&ep)?;
                build(&client)
                    .send()
                    .await
                    .map_err(|e| st.unreachable(&ep, e))?
            }
        };
        let ep = self
            .endpoint
            .clone()
            .unwrap_or_else(|| foreign_endpoint(&self.url));
        let status = resp.status();
        if !status.is_success() {
            return Err(st.status_error(&ep, resp).await);
        }
        let mut stream: futures::stream::BoxStream<'static, reqwest::Result<Bytes>> =
            resp.bytes_stream().boxed();
        if offset > 0 && status != StatusCode::PARTIAL_CONTENT {
            // The server ignored Range: skip what was already received.
            let mut skip = offset;
            while skip > 0 {
                match stream.next().await {
                    Some(Ok(mut c)) => {
                        if (c.len() as u64) <= skip {
                            skip -= c.len() as u64;
                        } else {
                            let rest = c.split_off(skip as usize);
                            skip = 0;
                            stream = futures::stream::once(async move { Ok(rest) })
                                .chain(stream)
                                .boxed();
                        }
                    }
                    Some(Err(e)) => return Err(st.unreachable(&ep, e)),
                    None => break,
                }
            }
        }
        self.body = Some(stream);
        Ok(())
    }

    /// The next chunk; `Ok(None)` only after the whole blob arrived and matched its digest.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        loop {
            if self.done {
                return Ok(None);
            }
            let Some(body) = self.body.as_mut() else {
                return Err(Error::Truncated {
                    reference: self.reference.to_string(),
                    step: self.step(),
                    expected: self.desc.size,
                    got: self.got,
                });
            };
            let next = body.next().await;
            match next {
                Some(Ok(chunk)) => {
                    if chunk.is_empty() {
                        continue;
                    }
                    self.got += chunk.len() as u64;
                    if self.got > self.desc.size {
                        return Err(Error::Manifest {
                            reference: self.reference.to_string(),
                            step: self.step(),
                            reason: format!(
                                "the blob is larger than the {} bytes its descriptor declares",
                                self.desc.size
                            ),
                        });
                    }
                    self.hasher.update(&chunk);
                    if let Some(p) = &self.progress {
                        p(self.got);
                    }
                    return Ok(Some(chunk));
                }
                Some(Err(e)) if self.resumes < RESUMES => {
                    tracing::debug!(digest = %self.desc.digest, got = self.got, error = %e, "blob stream broke, resuming");
                    self.resume().await?;
                }
                Some(Err(e)) => {
                    let ep = self
                        .endpoint
                        .clone()
                        .unwrap_or_else(|| foreign_endpoint(&self.url));
                    let step = self.step();
                    return Err(Step {
                        reference: &self.reference,
                        step: &step,
                    }
                    .unreachable(&ep, e));
                }
                None if self.got < self.desc.size => {
                    if self.resumes < RESUMES {
                        tracing::debug!(digest = %self.desc.digest, got = self.got, "blob stream ended early, resuming");
                        self.resume().await?;
                    } else {
                        return Err(Error::Truncated {
                            reference: self.reference.to_string(),
                            step: self.step(),
                            expected: self.desc.size,
                            got: self.got,
                        });
                    }
                }
                None => {
                    let found = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
                    if found != self.desc.digest {
                        return Err(Error::DigestMismatch {
                            reference: self.reference.to_string(),
                            step: self.step(),
                            expected: self.desc.digest.clone(),
                            found,
                        });
                    }
                    self.done = true;
                    return Ok(None);
                }
            }
        }
    }

    async fn resume(&mut self) -> Result<()> {
        self.resumes += 1;
        self.body = None;
        tokio::time::sleep(backoff(self.resumes - 1)).await;
        let offset = self.got;
        match self.start(offset).await {
            Ok(()) => Ok(()),
            Err(e) if self.resumes < RESUMES && e.transient() => Box::pin(self.resume()).await,
            Err(e) => {
                // The stream had ended early and cannot be continued: that is what to report.
                tracing::debug!(digest = %self.desc.digest, error = %e, "resuming a blob failed");
                Err(Error::Truncated {
                    reference: self.reference.to_string(),
                    step: self.step(),
                    expected: self.desc.size,
                    got: self.got,
                })
            }
        }
    }
}

fn foreign_endpoint(url: &str) -> Endpoint {
    let plain = url.starts_with("http://");
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.split('/').next().unwrap_or(rest).to_string();
    Endpoint {
        host,
        prefix: String::new(),
        plain_http: plain,
        skip_verify: false,
        capability: Capability::Pull,
        config_key: None,
    }
}

#[cfg(test)]
mod tests {
    use super::network_reason;

    /// hyper-util's shape of a failed lookup: "dns error" over the resolver's io error.
    #[derive(Debug)]
    struct Dns(std::io::Error);

    impl std::fmt::Display for Dns {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("dns error")
        }
    }

    impl std::error::Error for Dns {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn network_errors_read_as_go_writes_them() {
        let lookup = Dns(std::io::Error::other(
            "failed to lookup address information: Name or service not known",
        ));
        assert_eq!(
            network_reason("fake-url:5000", &lookup),
            "dial tcp: lookup fake-url: no such host"
        );
        let refused = std::net::TcpStream::connect("127.0.0.1:1").unwrap_err();
        assert_eq!(
            network_reason("127.0.0.1:1", &refused),
            "dial tcp 127.0.0.1:1: connect: connection refused"
        );
        assert_eq!(
            network_reason("[::1]:5000", &Dns(std::io::Error::other("x"))),
            "dial tcp: lookup ::1: no such host"
        );
        let other = std::io::Error::other("broken pipe");
        assert_eq!(network_reason("h:1", &other), "broken pipe");
    }
}
