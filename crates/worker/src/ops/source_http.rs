//! `http://` and `https://` sources: one downloaded file (`source/http/httpsource.go` in
//! moby/buildkit v0.11.6).
//!
//! The result is a snapshot with a single layer holding one file at `/<filename>`:
//! * `http.filename`, else the `Content-Disposition` filename, else the last URL path segment,
//!   else `download` (a name is one path component: no `/`, not `.` or `..`);
//! * mode `http.perm` (octal, default `0600`), owner `http.uid`/`http.gid` (default 0);
//! * mtime from `Last-Modified` (in any of the three forms Go's `http.ParseTime` reads: RFC 1123,
//!   RFC 850 and ANSI C, with `GMT` or `UTC`), else the Unix epoch, as buildkitd;
//! * `http.checksum` (`sha256:<hex>`) is verified; a mismatch fails the step.
//!
//! Cache: with `http.checksum` the cache key is known without any request (the checksum plus the
//! file options). Without it the download happens while computing the key, which is the content
//! digest plus the file options and the `Last-Modified` value, as in buildkitd. The last download of each (URL, file options)
//! is recorded in `<root>/worker/http/<key>.json` (ETag, Last-Modified, content digest,
//! snapshot): the next build sends `If-None-Match`/`If-Modified-Since`, and a `304 Not Modified`
//! reuses the recorded snapshot without transferring the body.
//!
//! Host `buildkit-session` (`http://buildkit-session/<id>`, e.g. a build context a client sends
//! as a tar stream): the file comes from the build's session (`Upload/Pull`, see
//! [`crate::SessionProvider::upload_pull`]), never from the network, streamed the same way; no
//! record is kept for it.
//!
//! Client: `reqwest` with rustls (no system OpenSSL), streaming the body to a temporary file
//! while hashing it, so a download is never held in memory. Redirects are followed (10 at most).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use futures::StreamExt as _;
use layerstore::snapshot::{LayerMeta, SnapshotId, SnapshotOptions};
use protos::pb::op::Op as OpPayload;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

use crate::error::{Error, ErrorKind, Result};
use crate::llbsolver::cache::blocking;
use crate::llbsolver::definition::LoadedOp;
use crate::ops::exec::store_err;
use crate::ops::BuildEnv;
use crate::progress::ProgressEvent;
use crate::result::Snap;
use crate::solver::{Op, OpContext, Solved};

/// The host of URLs the client serves through its session (BuildKit's `uploadprovider`).
const SESSION_HOST: &str = "buildkit-session";

/// The solver op for `op`.
pub(crate) fn new(op: &LoadedOp, env: &Arc<BuildEnv>) -> Result<Arc<dyn Op<Snap>>> {
    let OpPayload::Source(s) = op.payload() else {
        return Err(Error::Internal(
            "source_http::new called with another op".into(),
        ));
    };
    let opts = FileOpts::parse(&s.attrs).map_err(|r| Error::invalid_op(&op.digest, r))?;
    let checksum = match s.attrs.get("http.checksum") {
        None => None,
        Some(c) => Some(parse_checksum(c).map_err(|r| Error::invalid_op(&op.digest, r))?),
    };
    Ok(Arc::new(HttpSource {
        url: s.identifier.clone(),
        opts,
        checksum,
        env: env.clone(),
        fetched: tokio::sync::OnceCell::new(),
    }))
}

/// The attributes that shape the result file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileOpts {
    filename: Option<String>,
    perm: u32,
    uid: u32,
    gid: u32,
}

impl FileOpts {
    fn parse(attrs: &BTreeMap<String, String>) -> std::result::Result<FileOpts, String> {
        let filename = match attrs.get("http.filename") {
            Some(f) => Some(check_filename(f).ok_or(format!("invalid http.filename {f:?}"))?),
            None => None,
        };
        let perm = match attrs.get("http.perm") {
            Some(p) => u32::from_str_radix(p, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or(format!("invalid http.perm {p:?}: expected octal mode"))?,
            None => 0o600,
        };
        let id = |k: &str| -> std::result::Result<u32, String> {
            match attrs.get(k) {
                Some(v) => v.parse().map_err(|_| format!("invalid {k} {v:?}")),
                None => Ok(0),
            }
        };
        Ok(FileOpts {
            filename,
            perm,
            uid: id("http.uid")?,
            gid: id("http.gid")?,
        })
    }
}

/// A file name usable as the single entry of the result, or `None`.
fn check_filename(name: &str) -> Option<String> {
    (!name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0'))
        .then(|| name.to_string())
}

fn parse_checksum(c: &str) -> std::result::Result<String, String> {
    match c.split_once(':') {
        Some(("sha256", hex)) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(format!("sha256:{}", hex.to_ascii_lowercase()))
        }
        _ => Err(format!(
            "invalid http.checksum {c:?}: expected sha256:<64 hex digits>"
        )),
    }
}

/// The name from a `Content-Disposition` header (`filename="x"` or `filename=x`).
fn disposition_filename(v: &str) -> Option<String> {
    v.split(';').find_map(|part| {
        let (k, val) = part.trim().split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("filename") {
            return None;
        }
        let val = val.trim().trim_matches('"');
        let base = val.rsplit(['/', '\\']).next().unwrap_or(val);
        check_filename(base)
    })
}

/// The last non-empty path segment of `url`.
fn url_filename(url: &reqwest::Url) -> Option<String> {
    let seg = url.path_segments()?.rev().find(|s| !s.is_empty())?;
    check_filename(seg)
}

/// What is recorded about the last download of a (URL, options) pair.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    etag: Option<String>,
    last_modified: Option<String>,
    /// `sha256:<hex>` of the content.
    digest: String,
    snapshot: SnapshotId,
}

struct HttpSource {
    url: String,
    opts: FileOpts,
    checksum: Option<String>,
    env: Arc<BuildEnv>,
    /// Content digest, `Last-Modified` and the result, once fetched in this build.
    fetched: tokio::sync::OnceCell<(String, Option<String>, Snap)>,
}

fn http_err(kind: ErrorKind, message: String, source: Option<crate::error::BoxError>) -> Error {
    Error::Op {
        message,
        kind,
        source,
    }
}

impl HttpSource {
    fn key_for(&self, digest: &str, last_modified: Option<&str>) -> String {
        let mut h = crate::digest::KeyHasher::new("http");
        h.field(digest.as_bytes())
            .field(&serde_json::to_vec(&self.opts).unwrap_or_default());
        if let Some(m) = last_modified {
            h.field(b"last-modified").field(m.as_bytes());
        }
        h.finish()
    }

    fn record_path(&self) -> PathBuf {
        let mut h = crate::digest::KeyHasher::new("http-record");
        h.field(self.url.as_bytes())
            .field(&serde_json::to_vec(&self.opts).unwrap_or_default());
        let k = h.finish();
        self.env
            .opts
            .root
            .join("worker")
            .join("http")
            .join(format!("{}.json", k.trim_start_matches("sha256:")))
    }

    fn status(&self, ctx: &OpContext, started: SystemTime, current: i64, done: bool) {
        let id = format!("downloading {}", self.url);
        ctx.progress.send(ProgressEvent::VertexStatus {
            vertex: ctx.vertex.clone(),
            id: id.clone(),
            name: id,
            current,
            total: 0,
            timestamp: SystemTime::now(),
            started: Some(started),
            completed: done.then(SystemTime::now),
        });
    }

    async fn fetch(&self, ctx: &OpContext) -> Result<&(String, Option<String>, Snap)> {
        self.fetched
            .get_or_try_init(|| async {
                tokio::select! {
                    r = self.fetch_now(ctx) => r,
                    _ = ctx.cancel.cancelled() => Err(Error::Canceled),
                }
            })
            .await
    }

    async fn fetch_now(&self, ctx: &OpContext) -> Result<(String, Option<String>, Snap)> {
        if let Some(url) = self.session_url() {
            return self.fetch_from_session(ctx, &url).await;
        }
        let store = self.env.store.clone();
        let record_path = self.record_path();
        let previous: Option<Record> = std::fs::read(&record_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::limited(10))
            .build()
            .map_err(|e| http_err(ErrorKind::Internal, format!("http client: {e}"), None))?;
        let mut req = client.get(&self.url);
        if let Some(p) = &previous {
            if let Some(e) = &p.etag {
                req = req.header(reqwest::header::IF_NONE_MATCH, e);
            }
            if let Some(m) = &p.last_modified {
                req = req.header(reqwest::header::IF_MODIFIED_SINCE, m);
            }
        }
        let started = SystemTime::now();
        self.status(ctx, started, 0, false);
        let resp = req.send().await.map_err(|e| {
            http_err(
                ErrorKind::Unavailable,
                format!("GET {}: {e}", self.url),
                Some(Box::new(e)),
            )
        })?;
        if resp.status() == reqwest::StatusCode::NOT_MODIFIED {
            if let Some(p) = previous {
                let id = p.snapshot.clone();
                let st = store.clone();
                match blocking(move || Snap::acquire(&st, id)).await {
                    Ok(snap) => {
                        self.status(ctx, started, 0, true);
                        tracing::debug!(url = %self.url, "not modified; reusing the last download");
                        return Ok((p.digest, p.last_modified, snap));
                    }
                    Err(e) => {
                        tracing::debug!(url = %self.url, error = %e, "recorded download gone; fetching again")
                    }
                }
            }
            // Nothing usable recorded: ask again unconditionally.
            return self.download(ctx, client.get(&self.url), started).await;
        }
        self.finish_download(ctx, resp, started).await
    }

    async fn download(
        &self,
        ctx: &OpContext,
        req: reqwest::RequestBuilder,
        started: SystemTime,
    ) -> Result<(String, Option<String>, Snap)> {
        let resp = req.send().await.map_err(|e| {
            http_err(
                ErrorKind::Unavailable,
                format!("GET {}: {e}", self.url),
                Some(Box::new(e)),
            )
        })?;
        self.finish_download(ctx, resp, started).await
    }

    async fn finish_download(
        &self,
        ctx: &OpContext,
        resp: reqwest::Response,
        started: SystemTime,
    ) -> Result<(String, Option<String>, Snap)> {
        if !resp.status().is_success() {
            let kind = if resp.status() == reqwest::StatusCode::NOT_FOUND {
                ErrorKind::NotFound
            } else {
                ErrorKind::Unavailable
            };
            return Err(http_err(
                kind,
                format!("invalid response status {} for {}", resp.status(), self.url),
                None,
            ));
        }
        let header = |n: reqwest::header::HeaderName| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let etag = header(reqwest::header::ETAG);
        let last_modified = header(reqwest::header::LAST_MODIFIED);
        let filename = self
            .opts
            .filename
            .clone()
            .or_else(|| {
                header(reqwest::header::CONTENT_DISPOSITION).and_then(|d| disposition_filename(&d))
            })
            .or_else(|| url_filename(resp.url()))
            .unwrap_or_else(|| "download".into());
        let mtime = last_modified
            .as_deref()
            .and_then(parse_http_time)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let url = &self.url;
        let body = resp.bytes_stream().map(|chunk| {
            chunk.map_err(|e| {
                http_err(
                    ErrorKind::Unavailable,
                    format!("reading {url}: {e}"),
                    Some(Box::new(e)),
                )
            })
        });
        let (digest, snap) = self.store_body(ctx, body, filename, mtime, started).await?;
        let record = Record {
            etag,
            last_modified: last_modified.clone(),
            digest: digest.clone(),
            snapshot: snap.id().clone(),
        };
        let path = self.record_path();
        if let Err(e) = write_record(&path, &record) {
            tracing::warn!(path = %path.display(), error = %e, "recording download failed");
        }
        Ok((digest, last_modified, snap))
    }

    /// The URL when it names the client's session (host `buildkit-session`): the file comes
    /// through the session's `Upload/Pull`, never from the network.
    fn session_url(&self) -> Option<reqwest::Url> {
        let url = reqwest::Url::parse(&self.url).ok()?;
        (url.host_str() == Some(SESSION_HOST)).then_some(url)
    }

    /// A file the client uploads through its session (`session/upload` and the HTTP source's
    /// session transport in buildkitd): no headers, so the name is `http.filename` or the
    /// URL's last path segment, the mtime the Unix epoch; nothing is recorded for conditional
    /// requests (each upload is served once).
    async fn fetch_from_session(
        &self,
        ctx: &OpContext,
        url: &reqwest::Url,
    ) -> Result<(String, Option<String>, Snap)> {
        let key = format!(
            "{}\n{}\n{}",
            self.env.build_id,
            self.url,
            serde_json::to_string(&self.opts).unwrap_or_default()
        );
        let cell = self.env.shared.uploads.cell(&key);
        let mut fresh = None;
        let (digest, id) = cell
            .get_or_try_init(|| async {
                let (digest, snap) = self.pull_from_session(ctx, url).await?;
                let id = snap.id().clone();
                fresh = Some(snap);
                Ok::<_, Error>((digest, id))
            })
            .await?
            .clone();
        let snap = match fresh {
            Some(s) => s,
            None => {
                // An earlier solve of this build pulled it.
                let store = self.env.store.clone();
                blocking(move || Snap::acquire(&store, id)).await?
            }
        };
        Ok((digest, None, snap))
    }

    async fn pull_from_session(
        &self,
        ctx: &OpContext,
        url: &reqwest::Url,
    ) -> Result<(String, Snap)> {
        let started = SystemTime::now();
        self.status(ctx, started, 0, false);
        let body = self
            .env
            .session
            .upload_pull(SESSION_HOST, url.path())
            .await?;
        let filename = self
            .opts
            .filename
            .clone()
            .or_else(|| url_filename(url))
            .unwrap_or_else(|| "download".into());
        self.store_body(ctx, body, filename, SystemTime::UNIX_EPOCH, started)
            .await
    }

    /// Streams `body` into a temporary file while hashing it, checks `http.checksum` and makes
    /// the one-file layer; returns the content digest and the snapshot.
    async fn store_body(
        &self,
        ctx: &OpContext,
        body: impl futures::Stream<Item = Result<bytes::Bytes>>,
        filename: String,
        mtime: SystemTime,
        started: SystemTime,
    ) -> Result<(String, Snap)> {
        // Stream into a temporary file next to the store (same filesystem: renamed into the
        // layer, never copied).
        let tmp_dir = self.env.opts.root.join("worker").join("http").join("tmp");
        tokio::fs::create_dir_all(&tmp_dir)
            .await
            .map_err(|e| Error::io("create directory", &tmp_dir, e))?;
        let tmp = tmp_dir.join(format!(
            "{}-{}",
            std::process::id(),
            crate::digest::sha256_hex(format!("{:?}{}", SystemTime::now(), self.url).as_bytes())
        ));
        let guard = TempFile(tmp.clone());
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| Error::io("create", &tmp, e))?;
        let mut hasher = Sha256::new();
        let mut n: u64 = 0;
        let mut last_report = std::time::Instant::now();
        let body = std::pin::pin!(body);
        let mut body = body;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| Error::io("write", &tmp, e))?;
            n += chunk.len() as u64;
            if last_report.elapsed().as_millis() > 200 {
                self.status(ctx, started, n as i64, false);
                last_report = std::time::Instant::now();
            }
        }
        file.sync_all()
            .await
            .map_err(|e| Error::io("fsync", &tmp, e))?;
        drop(file);
        self.status(ctx, started, n as i64, true);
        let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
        if let Some(want) = &self.checksum {
            if *want != digest {
                return Err(http_err(
                    ErrorKind::FailedPrecondition,
                    format!(
                        "digest mismatch for {}: expected {want}, got {digest}",
                        self.url
                    ),
                    None,
                ));
            }
        }

        let store = self.env.store.clone();
        let opts = self.opts.clone();
        let desc = format!("{} ({filename})", self.url);
        let snap = blocking(move || {
            let (id, _) = store
                .add_layer(None, &SnapshotOptions::new(desc), |dir| {
                    place_file(&guard.0, dir, &filename, &opts, mtime).map_err(|e| {
                        layerstore::Error::Io {
                            op: "write downloaded file",
                            path: dir.to_path_buf(),
                            source: e,
                        }
                    })?;
                    Ok(LayerMeta::default())
                })
                .map_err(store_err("record download"))?;
            drop(guard);
            Snap::acquire(&store, id)
        })
        .await?;
        Ok((digest, snap))
    }
}

/// Moves the downloaded file into the layer dir and applies mode, owner and mtime.
fn place_file(
    src: &Path,
    dir: &Path,
    name: &str,
    opts: &FileOpts,
    mtime: SystemTime,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let dst = dir.join(name);
    std::fs::rename(src, &dst)?;
    std::os::unix::fs::lchown(&dst, Some(opts.uid), Some(opts.gid))?;
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(opts.perm))?;
    let f = std::fs::File::options().write(true).open(&dst)?;
    f.set_times(
        std::fs::FileTimes::new()
            .set_modified(mtime)
            .set_accessed(mtime),
    )?;
    Ok(())
}

/// An HTTP date as Go's `http.ParseTime` reads it: RFC 1123, RFC 850 or ANSI C. Go's parser
/// takes any zone name there, and Go servers write RFC 850 dates with `UTC` (upstream's test
/// server does); `httpdate` wants `GMT`, so `UTC` is read as the same zone.
fn parse_http_time(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    httpdate::parse_http_date(s).ok().or_else(|| {
        let gmt = s.strip_suffix(" UTC")?;
        httpdate::parse_http_date(&format!("{gmt} GMT")).ok()
    })
}

fn write_record(path: &Path, r: &Record) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(r).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, path)
}

/// Removes a temporary download on drop (it is gone already once renamed into a layer).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[async_trait]
impl Op<Snap> for HttpSource {
    fn pin(&self) -> Option<String> {
        self.checksum
            .clone()
            .or_else(|| self.fetched.get().map(|(digest, _, _)| digest.clone()))
    }

    async fn cache_key(&self, ctx: &OpContext, _inputs: &[Solved<Snap>]) -> Result<String> {
        if let Some(c) = &self.checksum {
            return Ok(self.key_for(c, None));
        }
        let (digest, last_modified, _) = self.fetch(ctx).await?;
        Ok(self.key_for(digest, last_modified.as_deref()))
    }

    async fn exec(&self, ctx: &OpContext, _inputs: &[Solved<Snap>]) -> Result<Vec<Snap>> {
        let (_, _, snap) = self.fetch(ctx).await?;
        Ok(vec![snap.clone()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_opts() {
        let a = |kv: &[(&str, &str)]| {
            FileOpts::parse(
                &kv.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        assert_eq!(
            a(&[]).unwrap(),
            FileOpts {
                filename: None,
                perm: 0o600,
                uid: 0,
                gid: 0
            }
        );
        let o = a(&[
            ("http.filename", "x.tgz"),
            ("http.perm", "0755"),
            ("http.uid", "1000"),
            ("http.gid", "50"),
        ])
        .unwrap();
        assert_eq!((o.perm, o.uid, o.gid), (0o755, 1000, 50));
        assert!(a(&[("http.filename", "../x")]).is_err());
        assert!(a(&[("http.filename", "..")]).is_err());
        assert!(a(&[("http.perm", "9")]).is_err());
        assert!(a(&[("http.uid", "-1")]).is_err());
    }

    #[test]
    fn names() {
        assert_eq!(
            disposition_filename("attachment; filename=\"a b.txt\""),
            Some("a b.txt".into())
        );
        assert_eq!(
            disposition_filename("attachment; filename=../../etc/passwd"),
            Some("passwd".into())
        );
        assert_eq!(disposition_filename("inline"), None);
        let u = reqwest::Url::parse("http://h/dir/file.tar.gz?x=1").unwrap();
        assert_eq!(url_filename(&u), Some("file.tar.gz".into()));
        let u = reqwest::Url::parse("http://h/").unwrap();
        assert_eq!(url_filename(&u), None);
        assert!(parse_checksum("sha256:abc").is_err());
        assert!(parse_checksum(&format!("sha256:{}", "A".repeat(64))).is_ok());
        assert!(parse_checksum(&format!("md5:{}", "a".repeat(64))).is_err());
    }

    #[test]
    fn http_times() {
        let t = |s: &str| {
            parse_http_time(s).map(|t| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs())
        };
        let want = Some(1_445_412_480);
        for s in [
            "Wed, 21 Oct 2015 07:28:00 GMT",
            "Wednesday, 21-Oct-15 07:28:00 GMT",
            "Wednesday, 21-Oct-15 07:28:00 UTC",
            "Wed Oct 21 07:28:00 2015",
        ] {
            assert_eq!(t(s), want, "{s}");
        }
        assert_eq!(t("yesterday"), None);
    }
}
