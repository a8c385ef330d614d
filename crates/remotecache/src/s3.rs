//! `type=s3` caches: the cache config JSON under `<prefix><manifests_prefix><name>` and each layer
//! blob under `<prefix><blobs_prefix><digest>` in one bucket, as BuildKit v0.11.6 lays them out
//! (`cache/remotecache/s3`). There is no index: the config's layers carry their own annotations
//! (media type, diffID, size, creation time). An export uploads only the blobs the bucket lacks
//! (a HEAD first) and refreshes the modification time of those older than `touch_refresh` with a
//! copy onto themselves, so a bucket lifecycle rule can expire unused blobs; then it writes the
//! config under every `name`. An import reads the config of the first `name` (none there: an empty
//! cache) and fetches a layer blob only when a step's result is built from it.
//!
//! The S3 API is spoken over `reqwest` (already berth's HTTP client for registries and HTTP
//! sources) with requests signed by `aws-sigv4`, the signing crate of AWS's own Rust SDK, instead
//! of the whole SDK (`aws-sdk-s3` and its runtime are large for the five calls used here) or
//! `rust-s3` (its own HTTP stack and TLS choices). Calls that fail on the network or with a
//! server error are tried [`registry::ATTEMPTS`] times, as the Go SDK retries; errors read as the
//! Go SDK's do (`operation error S3: PutObject, …`, with Go's `net` wording for network failures,
//! `dial tcp: lookup HOST: no such host`), because clients match on those words.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use worker::RemoteLayer;

use crate::config::{CacheConfig, LayerAnnotations};
use crate::export::{Built, ExportProgress};
use crate::import::{aliases, results_by_key};
use crate::{Error, Result};

/// Largest cache config read back (the config of a `mode=max` export of a large build is a few
/// MiB; this bounds what a hostile bucket can make berthd hold).
const MAX_CONFIG: u64 = 64 << 20;
/// Largest object one PUT may write (S3's limit for a single-part upload).
const MAX_PUT: u64 = 5 << 30;

/// The attributes of a `type=s3` cache (`--export-cache` and `--import-cache` take the same).
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    /// `bucket` (or `$AWS_BUCKET`).
    pub bucket: String,
    /// `region` (or `$AWS_REGION`).
    pub region: String,
    /// `prefix` of every key.
    pub prefix: String,
    /// `manifests_prefix` (`manifests/`).
    pub manifests_prefix: String,
    /// `blobs_prefix` (`blobs/`).
    pub blobs_prefix: String,
    /// `name`, `;`-separated (`buildkit`): an export writes the config under each, an import
    /// reads the first.
    pub names: Vec<String>,
    /// `touch_refresh` (Go duration, `24h`).
    pub touch_refresh: Duration,
    /// `endpoint_url` (else AWS's endpoint of the region).
    pub endpoint_url: Option<String>,
    /// `use_path_style` (with `endpoint_url`): `ENDPOINT/BUCKET/KEY` instead of
    /// `BUCKET.HOST/KEY`.
    pub use_path_style: bool,
    /// `access_key_id`.
    pub access_key_id: String,
    /// `secret_access_key`.
    pub secret_access_key: String,
    /// `session_token`.
    pub session_token: String,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets stay out of logs.
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .field("names", &self.names)
            .field("endpoint_url", &self.endpoint_url)
            .field("use_path_style", &self.use_path_style)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// Go's `time.ParseDuration` for the units a user writes (`90s`, `1h30m`, `1.5h`, `500ms`).
fn parse_go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[u..];
        total += value * unit;
    }
    Duration::try_from_secs_f64(total).ok()
}

fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

impl S3Config {
    /// Reads the attributes as buildkitd does (`bucket` and `region` fall back to `$AWS_BUCKET`
    /// and `$AWS_REGION`; an unreadable `touch_refresh` or `use_path_style` keeps its default).
    pub fn from_attrs(attrs: &BTreeMap<String, String>) -> Result<S3Config> {
        let from = |attr: &str, env: &str| {
            attrs
                .get(attr)
                .cloned()
                .or_else(|| std::env::var(env).ok())
                .filter(|v| !v.is_empty())
        };
        let bucket = from("bucket", "AWS_BUCKET")
            .ok_or_else(|| Error::invalid("bucket ($AWS_BUCKET) not set for s3 cache"))?;
        let region = from("region", "AWS_REGION")
            .ok_or_else(|| Error::invalid("region ($AWS_REGION) not set for s3 cache"))?;
        let get =
            |k: &str, default: &str| attrs.get(k).cloned().unwrap_or_else(|| default.to_string());
        let names: Vec<String> = match attrs.get("name") {
            Some(n) => n.split(';').map(str::to_string).collect(),
            None => vec!["buildkit".to_string()],
        };
        let touch_refresh = attrs
            .get("touch_refresh")
            .and_then(|v| parse_go_duration(v))
            .unwrap_or(Duration::from_secs(24 * 3600));
        let use_path_style = attrs
            .get("use_path_style")
            .and_then(|v| parse_go_bool(v))
            .unwrap_or(false);
        Ok(S3Config {
            bucket,
            region,
            prefix: get("prefix", ""),
            manifests_prefix: get("manifests_prefix", "manifests/"),
            blobs_prefix: get("blobs_prefix", "blobs/"),
            names,
            touch_refresh,
            endpoint_url: attrs.get("endpoint_url").filter(|v| !v.is_empty()).cloned(),
            use_path_style,
            access_key_id: get("access_key_id", ""),
            secret_access_key: get("secret_access_key", ""),
            session_token: get("session_token", ""),
        })
    }

    /// The key of the config named `name`.
    pub fn manifest_key(&self, name: &str) -> String {
        format!("{}{}{name}", self.prefix, self.manifests_prefix)
    }

    /// The key of the blob `digest`.
    pub fn blob_key(&self, digest: &str) -> String {
        format!("{}{}{digest}", self.prefix, self.blobs_prefix)
    }

    /// Names the cache in messages (`s3://bucket/prefix`).
    pub fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }
}

/// Bytes of a key left as they are in a URL path (RFC 3986 unreserved and `/`), as S3 and its
/// signature want them.
const KEY_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// A body of a request: bytes, or a file whose SHA-256 is known (a blob by its digest).
enum Body<'a> {
    Empty,
    Bytes(Bytes),
    File {
        path: &'a Path,
        size: u64,
        sha256_hex: String,
    },
}

/// An object's answer to HEAD: when it was last written.
type Modified = Option<DateTime<Utc>>;

/// A client of one bucket.
pub struct S3Client {
    cfg: S3Config,
    creds: Credentials,
    http: reqwest::Client,
}

impl std::fmt::Debug for S3Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Client")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

struct Failure {
    /// HTTP status (0 when no answer came).
    status: u16,
    /// S3's error code (`NoSuchKey`, `NoSuchBucket`, …; `NotFound` for a HEAD's 404).
    code: String,
    message: String,
}

impl S3Client {
    /// A client for `cfg`; credentials from its attributes, else `$AWS_ACCESS_KEY_ID`,
    /// `$AWS_SECRET_ACCESS_KEY` and `$AWS_SESSION_TOKEN`.
    pub fn new(cfg: S3Config) -> Result<S3Client> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let creds = if !cfg.access_key_id.is_empty() && !cfg.secret_access_key.is_empty() {
            Credentials::new(
                cfg.access_key_id.clone(),
                cfg.secret_access_key.clone(),
                Some(cfg.session_token.clone()).filter(|t| !t.is_empty()),
                None,
                "s3 cache attributes",
            )
        } else if let (Some(id), Some(secret)) =
            (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))
        {
            Credentials::new(id, secret, env("AWS_SESSION_TOKEN"), None, "environment")
        } else {
            return Err(Error::invalid(format!(
                "no credentials for s3 cache {}: set access_key_id and secret_access_key, or \
                 $AWS_ACCESS_KEY_ID and $AWS_SECRET_ACCESS_KEY for berthd",
                cfg.describe()
            )));
        };
        if let Some(u) = &cfg.endpoint_url {
            let parsed = reqwest::Url::parse(u)
                .map_err(|e| Error::invalid(format!("invalid s3 endpoint_url {u:?}: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                return Err(Error::invalid(format!(
                    "invalid s3 endpoint_url {u:?}: want http(s)://host[:port]"
                )));
            }
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| Error::Other(format!("s3 http client: {e}")))?;
        Ok(S3Client { cfg, creds, http })
    }

    /// The configuration.
    pub fn config(&self) -> &S3Config {
        &self.cfg
    }

    /// The URL of `key` (empty key: the bucket).
    fn url(&self, key: &str) -> Result<reqwest::Url> {
        let key = utf8_percent_encode(key, KEY_ENCODE).to_string();
        let bucket = &self.cfg.bucket;
        let s = match &self.cfg.endpoint_url {
            Some(e) if self.cfg.use_path_style => {
                format!("{}/{bucket}/{key}", e.trim_end_matches('/'))
            }
            Some(e) => {
                let mut u = reqwest::Url::parse(e)
                    .map_err(|err| Error::invalid(format!("invalid s3 endpoint_url: {err}")))?;
                let host = format!("{bucket}.{}", u.host_str().unwrap_or_default());
                u.set_host(Some(&host)).map_err(|err| {
                    Error::invalid(format!("invalid s3 bucket {bucket:?}: {err}"))
                })?;
                format!("{}/{key}", u.as_str().trim_end_matches('/'))
            }
            None if bucket.contains('.') => {
                format!(
                    "https://s3.{}.amazonaws.com/{bucket}/{key}",
                    self.cfg.region
                )
            }
            None => format!(
                "https://{bucket}.s3.{}.amazonaws.com/{key}",
                self.cfg.region
            ),
        };
        reqwest::Url::parse(&s).map_err(|e| Error::invalid(format!("s3 url {s:?}: {e}")))
    }

    /// Signs and sends one request, retrying network failures and server errors.
    async fn send(
        &self,
        op: &str,
        method: reqwest::Method,
        key: &str,
        headers: &[(&str, String)],
        body: Body<'_>,
    ) -> Result<std::result::Result<reqwest::Response, Failure>> {
        let url = self.url(key)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let payload = match &body {
                Body::Empty => SignableBody::Bytes(&[]),
                Body::Bytes(b) => SignableBody::Bytes(b),
                Body::File { sha256_hex, .. } => SignableBody::Precomputed(sha256_hex.clone()),
            };
            let signed = self.sign(method.as_str(), url.as_str(), headers, payload)?;
            let mut req = self.http.request(method.clone(), url.clone());
            for (k, v) in headers.iter().map(|(k, v)| (*k, v.as_str())) {
                req = req.header(k, v);
            }
            for (k, v) in &signed {
                req = req.header(k.as_str(), v.as_str());
            }
            req = match &body {
                Body::Empty => req,
                Body::Bytes(b) => req.body(b.clone()),
                Body::File { path, size, .. } => {
                    let f = tokio::fs::File::open(path)
                        .await
                        .map_err(|e| Error::Other(format!("open blob {}: {e}", path.display())))?;
                    req.header(reqwest::header::CONTENT_LENGTH, *size)
                        .body(reqwest::Body::from(f))
                }
            };
            let verb = method.as_str();
            let (retry, failure) = match req.send().await {
                Ok(resp) if resp.status().is_success() => return Ok(Ok(resp)),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let request_id = resp
                        .headers()
                        .get("x-amz-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    let text = resp.text().await.unwrap_or_default();
                    let (code, message) = error_code(&text).unwrap_or_else(|| {
                        // HEAD answers carry no body.
                        let code = match status {
                            404 => "NotFound".to_string(),
                            _ => reqwest::StatusCode::from_u16(status)
                                .ok()
                                .and_then(|s| s.canonical_reason())
                                .unwrap_or("UnknownError")
                                .replace(' ', ""),
                        };
                        (code, String::new())
                    });
                    let mut m = format!(
                        "https response error StatusCode: {status}, RequestID: {request_id}, api error {code}"
                    );
                    if !message.is_empty() {
                        m.push_str(": ");
                        m.push_str(&message);
                    }
                    (
                        status >= 500 || status == 429,
                        Failure {
                            status,
                            code,
                            message: m,
                        },
                    )
                }
                Err(e) => {
                    let host = format!(
                        "{}:{}",
                        url.host_str().unwrap_or_default(),
                        url.port_or_known_default().unwrap_or(0)
                    );
                    let reason = registry::network_reason(&host, &e);
                    let verb = verb[..1].to_string() + &verb[1..].to_ascii_lowercase();
                    (
                        true,
                        Failure {
                            status: 0,
                            code: String::new(),
                            message: format!("request send failed, {verb} \"{url}\": {reason}"),
                        },
                    )
                }
            };
            if retry && attempt < registry::ATTEMPTS {
                tokio::time::sleep(Duration::from_millis(200 * 3u64.pow(attempt))).await;
                continue;
            }
            return Ok(Err(Failure {
                message: if attempt > 1 {
                    format!(
                        "operation error S3: {op}, exceeded maximum number of attempts, {attempt}, {}",
                        failure.message
                    )
                } else {
                    format!("operation error S3: {op}, {}", failure.message)
                },
                ..failure
            }));
        }
    }

    /// The SigV4 headers of a request.
    fn sign(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, String)],
        payload: SignableBody<'_>,
    ) -> Result<Vec<(String, String)>> {
        let bad = |e: &dyn std::fmt::Display| Error::Other(format!("sign s3 request: {e}"));
        let mut settings = SigningSettings::default();
        // S3's rules: keys are encoded once, not normalised, and the payload hash is sent.
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        let identity = self.creds.clone().into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.cfg.region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| bad(&e))?
            .into();
        let req = SignableRequest::new(
            method,
            url,
            headers.iter().map(|(k, v)| (*k, v.as_str())),
            payload,
        )
        .map_err(|e| bad(&e))?;
        let (instructions, _) = sign(req, &params).map_err(|e| bad(&e))?.into_parts();
        Ok(instructions
            .headers()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }

    /// When `key` was last written, `None` when there is no such object.
    pub async fn exists(&self, key: &str) -> Result<Option<Modified>> {
        match self
            .send("HeadObject", reqwest::Method::HEAD, key, &[], Body::Empty)
            .await?
        {
            Ok(resp) => Ok(Some(
                resp.headers()
                    .get(reqwest::header::LAST_MODIFIED)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| DateTime::parse_from_rfc2822(v).ok())
                    .map(|t| t.with_timezone(&Utc)),
            )),
            Err(f) if f.status == 404 => Ok(None),
            Err(f) => Err(Error::S3(f.message)),
        }
    }

    /// Writes `bytes` under `key`.
    pub async fn put_bytes(&self, key: &str, bytes: Bytes) -> Result<()> {
        let op = "PutObject";
        self.send(op, reqwest::Method::PUT, key, &[], Body::Bytes(bytes))
            .await?
            .map(drop)
            .map_err(|f| Error::S3(f.message))
    }

    /// Writes the file `path` (`size` bytes, SHA-256 `digest`) under `key`.
    pub async fn put_file(&self, key: &str, path: &Path, size: u64, digest: &str) -> Result<()> {
        if size > MAX_PUT {
            return Err(Error::invalid(format!(
                "blob {digest} is {size} bytes: berthd writes s3 objects in one PUT, at most {MAX_PUT} bytes"
            )));
        }
        let sha256_hex = digest
            .strip_prefix("sha256:")
            .ok_or_else(|| Error::invalid(format!("blob digest {digest} is not sha256")))?
            .to_string();
        let body = Body::File {
            path,
            size,
            sha256_hex,
        };
        self.send("PutObject", reqwest::Method::PUT, key, &[], body)
            .await?
            .map(drop)
            .map_err(|f| Error::S3(f.message))
    }

    /// Copies `key` onto itself with new metadata, which renews its modification time.
    pub async fn touch(&self, key: &str) -> Result<()> {
        let source = format!(
            "{}/{}",
            self.cfg.bucket,
            utf8_percent_encode(key, KEY_ENCODE)
        );
        let headers = [
            ("x-amz-copy-source", source),
            ("x-amz-metadata-directive", "REPLACE".to_string()),
            (
                "x-amz-meta-updated-at",
                Utc::now().format("%Y-%m-%d %H:%M:%S%.f %z UTC").to_string(),
            ),
        ];
        self.send(
            "CopyObject",
            reqwest::Method::PUT,
            key,
            &headers,
            Body::Empty,
        )
        .await?
        .map(drop)
        .map_err(|f| Error::S3(f.message))
    }

    /// The object `key`, `None` when there is none.
    async fn get(&self, key: &str) -> Result<Option<reqwest::Response>> {
        match self
            .send("GetObject", reqwest::Method::GET, key, &[], Body::Empty)
            .await?
        {
            Ok(r) => Ok(Some(r)),
            Err(f) if f.code == "NoSuchKey" || f.code == "NotFound" => Ok(None),
            Err(f) => Err(Error::S3(f.message)),
        }
    }

    /// The whole (small) object `key`, at most `limit` bytes; `None` when there is none.
    pub async fn get_small(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let Some(mut resp) = self.get(key).await? else {
            return Ok(None);
        };
        let mut out = vec![];
        while let Some(c) = resp
            .chunk()
            .await
            .map_err(|e| Error::S3(format!("operation error S3: GetObject, read {key}: {e}")))?
        {
            out.extend_from_slice(&c);
            if out.len() as u64 > limit {
                return Err(Error::invalid(format!(
                    "s3 object {key} is too large (> {limit} bytes)"
                )));
            }
        }
        Ok(Some(out))
    }
}

/// `<Code>` and `<Message>` of an S3 error document.
fn error_code(xml: &str) -> Option<(String, String)> {
    let field = |tag: &str| {
        let open = format!("<{tag}>");
        let start = xml.find(&open)? + open.len();
        let end = xml[start..].find(&format!("</{tag}>"))? + start;
        Some(xml[start..end].trim().to_string())
    };
    let code = field("Code").filter(|c| !c.is_empty())?;
    Some((code, field("Message").unwrap_or_default()))
}

impl Built {
    /// Writes the cache into the bucket of `client` as buildkitd does: each layer blob the
    /// bucket lacks (refreshing old ones), then the config (with each layer's annotations)
    /// under every name.
    pub async fn write_s3(&self, client: &S3Client, progress: &ExportProgress) -> Result<u64> {
        let cfg = client.config();
        let mut sent = 0;
        let mut seen = HashSet::new();
        for b in &self.blobs {
            if !seen.insert(b.digest.clone()) {
                continue;
            }
            let key = cfg.blob_key(&b.digest);
            let exists = client
                .exists(&key)
                .await
                .map_err(|e| Error::S3(format!("failed to check file presence in cache: {e}")))?;
            match exists {
                Some(modified) => {
                    let old = modified.is_none_or(|t| {
                        (Utc::now() - t).to_std().unwrap_or_default() > cfg.touch_refresh
                    });
                    if old {
                        client
                            .touch(&key)
                            .await
                            .map_err(|e| Error::S3(format!("failed to touch file: {e}")))?;
                    }
                }
                None => {
                    let id = format!("writing layer {}", b.digest);
                    progress(&id, false);
                    client
                        .put_file(&key, &b.path, b.size, &b.digest)
                        .await
                        .map_err(|e| Error::S3(format!("error writing layer blob: {e}")))?;
                    sent += b.size;
                    progress(&id, true);
                }
            }
        }
        let mut config = self.config.clone();
        for (l, b) in config.layers.iter_mut().zip(&self.blobs) {
            l.annotations = Some(LayerAnnotations {
                media_type: b.media_type.clone(),
                diff_id: b.diff_id.clone(),
                size: b.size as i64,
                created_at: b.created_at,
            });
        }
        let dt = Bytes::from(serde_json::to_vec(&config).expect("config serialises"));
        for name in &cfg.names {
            client
                .put_bytes(&cfg.manifest_key(name), dt.clone())
                .await
                .map_err(|e| Error::S3(format!("error writing manifest: {name}: {e}")))?;
        }
        Ok(sent)
    }
}

/// The cache keys of the config named first in `client`'s names (empty when the bucket has no
/// such config), each with its layers.
pub(crate) async fn load(client: &S3Client) -> Result<crate::import::Parsed> {
    let cfg = client.config();
    let key = cfg.manifest_key(cfg.names.first().map(String::as_str).unwrap_or("buildkit"));
    let Some(dt) = client.get_small(&key, MAX_CONFIG).await? else {
        tracing::info!(cache = %cfg.describe(), key, "no s3 cache config");
        return Ok(Default::default());
    };
    let config: CacheConfig = serde_json::from_slice(&dt)
        .map_err(|e| Error::invalid(format!("invalid s3 cache config {key}: {e}")))?;
    let mut descs = HashMap::new();
    for l in &config.layers {
        let a = l
            .annotations
            .as_ref()
            .ok_or_else(|| Error::invalid("cache layer with missing annotations"))?;
        if a.diff_id.is_empty() {
            return Err(Error::invalid("cache layer with missing diffid"));
        }
        descs.insert(
            l.blob.clone(),
            RemoteLayer {
                digest: l.blob.clone(),
                media_type: a.media_type.clone(),
                size: u64::try_from(a.size).unwrap_or(0),
                diff_id: a.diff_id.clone(),
                created_at: a.created_at.map(SystemTime::from),
            },
        );
    }
    Ok((results_by_key(&config, &descs), aliases(&config)))
}

/// A blob being read from S3 on a blocking thread.
pub(crate) struct BlockingObject {
    resp: reqwest::Response,
    handle: tokio::runtime::Handle,
    buf: Bytes,
}

impl Read for BlockingObject {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.buf.is_empty() {
            match self.handle.block_on(self.resp.chunk()) {
                Ok(Some(b)) => self.buf = b,
                Ok(None) => return Ok(0),
                Err(e) => return Err(std::io::Error::other(format!("read s3 object: {e}"))),
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        self.buf = self.buf.slice(n..);
        Ok(n)
    }
}

/// Opens the blob `digest` for reading on a blocking thread.
pub(crate) async fn open_blob(client: &Arc<S3Client>, digest: &str) -> Result<BlockingObject> {
    let key = client.config().blob_key(digest);
    let resp = client
        .get(&key)
        .await?
        .ok_or_else(|| Error::invalid(format!("s3 cache has no blob {key}")))?;
    Ok(BlockingObject {
        resp,
        handle: tokio::runtime::Handle::current(),
        buf: Bytes::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn attrs_defaults_and_keys() {
        let c = S3Config::from_attrs(&a(&[("bucket", "b"), ("region", "r")])).unwrap();
        assert_eq!(c.names, vec!["buildkit"]);
        assert_eq!(c.touch_refresh, Duration::from_secs(86400));
        assert_eq!(c.manifest_key("buildkit"), "manifests/buildkit");
        assert_eq!(c.blob_key("sha256:ab"), "blobs/sha256:ab");
        let c = S3Config::from_attrs(&a(&[
            ("bucket", "b"),
            ("region", "r"),
            ("prefix", "p/"),
            ("manifests_prefix", "m/"),
            ("blobs_prefix", "x/"),
            ("name", "one;two"),
            ("touch_refresh", "1h30m"),
            ("use_path_style", "true"),
            ("secret_access_key", "hidden"),
        ]))
        .unwrap();
        assert_eq!(c.names, vec!["one", "two"]);
        assert_eq!(c.touch_refresh, Duration::from_secs(5400));
        assert!(c.use_path_style);
        assert_eq!(c.manifest_key("two"), "p/m/two");
        assert_eq!(c.blob_key("sha256:ab"), "p/x/sha256:ab");
        assert!(!format!("{c:?}").contains("hidden"));
        // Unreadable values keep the defaults, as with buildkitd.
        let c = S3Config::from_attrs(&a(&[
            ("bucket", "b"),
            ("region", "r"),
            ("touch_refresh", "soon"),
            ("use_path_style", "yes"),
        ]))
        .unwrap();
        assert_eq!(c.touch_refresh, Duration::from_secs(86400));
        assert!(!c.use_path_style);
        if std::env::var_os("AWS_REGION").is_none() {
            assert_eq!(
                S3Config::from_attrs(&a(&[("bucket", "b")]))
                    .unwrap_err()
                    .to_string(),
                "region ($AWS_REGION) not set for s3 cache"
            );
        }
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_go_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration(""), None);
        assert_eq!(parse_go_duration("5"), None);
        assert_eq!(parse_go_duration("5d"), None);
    }

    #[test]
    fn urls_follow_the_addressing_style() {
        let mut cfg = S3Config::from_attrs(&a(&[
            ("bucket", "my-bucket"),
            ("region", "eu-west-1"),
            ("access_key_id", "k"),
            ("secret_access_key", "s"),
        ]))
        .unwrap();
        let c = S3Client::new(cfg.clone()).unwrap();
        assert_eq!(
            c.url("blobs/sha256:ab").unwrap().as_str(),
            "https://my-bucket.s3.eu-west-1.amazonaws.com/blobs/sha256%3Aab"
        );
        cfg.endpoint_url = Some("http://127.0.0.1:9000/".into());
        cfg.use_path_style = true;
        let c = S3Client::new(cfg.clone()).unwrap();
        assert_eq!(
            c.url("manifests/a b").unwrap().as_str(),
            "http://127.0.0.1:9000/my-bucket/manifests/a%20b"
        );
        cfg.endpoint_url = Some("http://minio.local:9000".into());
        cfg.use_path_style = false;
        let c = S3Client::new(cfg.clone()).unwrap();
        assert_eq!(
            c.url("k").unwrap().as_str(),
            "http://my-bucket.minio.local:9000/k"
        );
        cfg.endpoint_url = Some("ftp://x".into());
        assert!(S3Client::new(cfg)
            .unwrap_err()
            .to_string()
            .contains("endpoint_url"));
    }

    #[test]
    fn error_documents() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message><BucketName>b</BucketName></Error>"#;
        assert_eq!(
            error_code(xml),
            Some((
                "NoSuchBucket".into(),
                "The specified bucket does not exist".into()
            ))
        );
        assert_eq!(error_code(""), None);
    }
}
