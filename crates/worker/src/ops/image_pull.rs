//! Pulling a `docker-image://` source that the bound Docker Engine lacks: berth resolves it with
//! its own registry client (buildkitd.toml's mirrors, TLS and auth, the session's credentials)
//! and registers it in Docker's store once, so the source then uses it in place like any base
//! image (and `docker run` of it works).
//!
//! - **Containerd image store** (an Engine whose `GET /info` reports the containerd
//!   snapshotter): straight into its containerd ([`containerdstore::Client::pull`]: blobs
//!   streamed into the content store with Docker's labels, layers unpacked under their chainIDs,
//!   the record named as Docker names it, all under a lease); no tag through the Engine.
//! - **Live engine** (classic store): a thin
//!   `POST /images/load` whose docker-archive lists every layer but carries only the blobs Docker
//!   lacks (Docker's `layerdb/sha256/<chainID>` is the read-only presence hint, as for exports;
//!   if the hint was wrong Docker says so and the load is sent again with every layer). The
//!   blobs go into the archive still compressed, streamed from the registry chunk by chunk;
//!   Docker decompresses while registering (Docker 20.10 cannot load zstd layers: those are
//!   decompressed into a temp file under berth's root first). Each blob passes through a
//!   [`registry::LayerVerifier`]: its digest, size, decompressibility and diffID are checked
//!   while it streams, and a failure ends the archive before `manifest.json` (which is written
//!   last), so Docker registers nothing. The tag comes afterwards through `POST /images/{id}/tag`.
//! - **Stopped daemon** (offline data root): each layer is decompressed on the fly into
//!   `layerstore::dockerstore::OfflineWriter`, which checks the diffID, then the config and tag
//!   are written; its recovery removes whatever an interrupted pull left.
//!
//! Concurrent builds pulling the same image (same config digest into the same Docker) wait for
//! one download: a process-wide lock per (Docker host, image ID), and whoever gets it second
//! finds the image in Docker. Progress: one status per layer named by its digest, with the
//! bytes received out of the blob's size (layers Docker had are reported done at once).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use bollard::Docker;
use bytes::Bytes;
use futures::StreamExt as _;
use registry::{BlockingBlob, Compression, Image, LayerVerifier, Reference, Session};

use crate::error::{Error, ErrorKind, Result};
use crate::progress::{ProgressEvent, ProgressSink};
use crate::session::SessionProvider;

/// A session's registry credentials and tokens, for berth's registry client (also used by the
/// daemon for `ResolveImageConfig` and pushes).
pub struct SessionAuth(pub Arc<dyn SessionProvider>);

#[async_trait]
impl registry::AuthProvider for SessionAuth {
    async fn credentials(
        &self,
        host: &str,
    ) -> std::result::Result<Option<registry::Credentials>, registry::BoxError> {
        let c = self.0.registry_credentials(host).await?;
        Ok(c.map(|c| registry::Credentials {
            username: c.username,
            secret: c.secret,
        }))
    }

    async fn fetch_token(
        &self,
        req: &registry::TokenRequest,
    ) -> std::result::Result<Option<registry::Token>, registry::BoxError> {
        Ok(self.0.registry_token(req).await?)
    }
}

/// A registry error as a worker error (kind kept, message naming reference and step).
pub(crate) fn registry_err(e: registry::Error) -> Error {
    let kind = match e.kind() {
        registry::ErrorKind::InvalidArgument => ErrorKind::InvalidArgument,
        registry::ErrorKind::NotFound => ErrorKind::NotFound,
        registry::ErrorKind::Unauthenticated => ErrorKind::PermissionDenied,
        registry::ErrorKind::Unavailable => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    };
    Error::Op {
        message: e.to_string(),
        kind,
        source: Some(Box::new(e)),
    }
}

fn pull_err(reference: &Reference, step: &str, message: impl std::fmt::Display) -> Error {
    Error::Op {
        message: format!("pull {reference}: {step}: {message}"),
        kind: ErrorKind::Unavailable,
        source: None,
    }
}

/// Sends per-layer byte counts as vertex statuses.
#[derive(Clone)]
pub(crate) struct PullProgress {
    pub(crate) sink: ProgressSink,
    pub(crate) vertex: String,
}

impl PullProgress {
    fn layer(&self, digest: &str, current: u64, total: u64, started: SystemTime, done: bool) {
        self.sink.send(ProgressEvent::VertexStatus {
            vertex: self.vertex.clone(),
            id: digest.to_string(),
            name: digest.to_string(),
            current: current as i64,
            total: total as i64,
            timestamp: SystemTime::now(),
            started: Some(started),
            completed: done.then(SystemTime::now),
        });
    }

    fn reporter(&self, digest: &str, total: u64) -> registry::ProgressFn {
        let me = self.clone();
        let digest = digest.to_string();
        let started = SystemTime::now();
        let last = Arc::new(Mutex::new(0u64));
        me.layer(&digest, 0, total, started, false);
        Arc::new(move |n: u64| {
            let mut l = last.lock().unwrap();
            // At most one status per MiB, plus the last one.
            if n >= total || n - *l >= 1 << 20 {
                *l = n;
                me.layer(&digest, n, total, started, n >= total);
            }
        })
    }
}

impl containerdstore::PullProgress for PullProgress {
    fn downloading(&self, digest: &str, size: u64) -> Option<registry::ProgressFn> {
        Some(self.reporter(digest, size))
    }

    fn present(&self, digest: &str, size: u64) {
        self.layer(digest, size, size, SystemTime::now(), true);
    }
}

/// The process-wide lock for pulling image `id` into the Docker at `docker_host`.
pub(crate) fn pull_lock(docker_host: &str, id: &str) -> Arc<tokio::sync::Mutex<()>> {
    type Map = Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>;
    static LOCKS: std::sync::OnceLock<Map> = std::sync::OnceLock::new();
    let mut m = LOCKS.get_or_init(Default::default).lock().unwrap();
    // Forget locks nobody holds (keeps the map small).
    m.retain(|_, l| Arc::strong_count(l) > 1);
    m.entry(format!("{docker_host}|{id}")).or_default().clone()
}

fn hex_of(d: &str) -> &str {
    d.strip_prefix("sha256:").unwrap_or(d)
}

/// chainIDs of an image's layers.
fn chain_ids(reference: &Reference, diff_ids: &[String]) -> Result<Vec<String>> {
    let ds = diff_ids
        .iter()
        .map(|d| d.parse::<layerstore::Digest>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| pull_err(reference, "read diffIDs", e))?;
    Ok(layerstore::tar::chain_ids(&ds)
        .iter()
        .map(ToString::to_string)
        .collect())
}

/// Registers `img` in a live Docker Engine (module docs) and tags it as `reference` when that
/// has a tag. `layerdb` is Docker's `<data-root>/image/<driver>/layerdb` when readable.
pub(crate) async fn pull_into_engine(
    docker: &Docker,
    session: &Session,
    img: &Image,
    layerdb: Option<PathBuf>,
    tmp_dir: &Path,
    progress: &PullProgress,
) -> Result<()> {
    let r = &img.reference;
    let chains = chain_ids(r, &img.diff_ids)?;
    let mut include = Vec::with_capacity(chains.len());
    let mut missing_below = false;
    for c in &chains {
        let present = !missing_below
            && layerdb
                .as_ref()
                .is_some_and(|db| db.join("sha256").join(hex_of(c)).join("diff").is_file());
        missing_below |= !present;
        include.push(!present);
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        match load_once(docker, session, img, &include, tmp_dir, progress).await {
            Ok(()) => break,
            Err(LoadError::Docker(m))
                if attempt == 1 && m.contains("layer.tar") && m.contains("no such file") =>
            {
                tracing::warn!(reference = %r, message = %m, "docker lacked a layer berth thought present; loading again with every layer");
                include.iter_mut().for_each(|i| *i = true);
            }
            Err(LoadError::Docker(m)) => return Err(pull_err(r, "register in Docker (load)", m)),
            Err(LoadError::Berth(e)) => return Err(e),
        }
    }
    Ok(())
}

/// Records where each layer of `img` came from in the blob cache (see
/// [`registry::LayerSourceRecord`]); failures are logged, never fatal.
pub(crate) fn record_sources(cache: Option<&registry::BlobCache>, img: &Image) {
    let Some(cache) = cache else { return };
    for (d, diff_id) in img.manifest.layers.iter().zip(&img.diff_ids) {
        let rec = registry::LayerSourceRecord {
            reference: img.reference.to_string(),
            media_type: d.media_type.clone(),
            digest: d.digest.clone(),
            size: d.size,
            urls: d.urls.clone(),
        };
        if let Err(e) = cache.record_source(diff_id, &rec) {
            tracing::warn!(%diff_id, error = %e, "recording a pulled layer's source failed");
        }
    }
}

/// Tags `img` in the Engine as its reference, when that has a tag (as `docker pull` does).
pub(crate) async fn tag_in_engine(docker: &Docker, img: &Image) -> Result<()> {
    let r = &img.reference;
    let Some(tag) = r.tag() else { return Ok(()) };
    let familiar = r.familiar();
    let repo = familiar
        .strip_suffix(&format!(":{tag}"))
        .unwrap_or(&familiar)
        .to_string();
    docker
        .tag_image(
            img.config_digest(),
            Some(bollard::query_parameters::TagImageOptions {
                repo: Some(repo),
                tag: Some(tag.to_string()),
            }),
        )
        .await
        .map_err(|e| pull_err(r, "tag in Docker", e))
}

enum LoadError {
    /// Docker refused the load (its message).
    Docker(String),
    /// berth failed (registry, verification, temp files).
    Berth(Error),
}

struct ChannelWriter(tokio::sync::mpsc::Sender<Bytes>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .blocking_send(Bytes::copy_from_slice(buf))
            .map_err(|_| {
                io::Error::new(io::ErrorKind::BrokenPipe, "docker closed the load request")
            })?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

async fn load_once(
    docker: &Docker,
    session: &Session,
    img: &Image,
    include: &[bool],
    tmp_dir: &Path,
    progress: &PullProgress,
) -> std::result::Result<(), LoadError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let handle = tokio::runtime::Handle::current();
    let (session_w, img_w, include_w, tmp_w, progress_w) = (
        session.clone(),
        img.clone(),
        include.to_vec(),
        tmp_dir.to_path_buf(),
        progress.clone(),
    );
    let writer = tokio::task::spawn_blocking(move || {
        let w = io::BufWriter::with_capacity(1 << 20, ChannelWriter(tx));
        write_archive(
            w,
            &session_w,
            &img_w,
            &include_w,
            &tmp_w,
            &progress_w,
            handle,
        )
    });
    let body = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut s = docker.import_image_stream(
        bollard::query_parameters::ImportImageOptions {
            quiet: true,
            ..Default::default()
        },
        body,
        None,
    );
    let mut docker_failure = None;
    while let Some(item) = s.next().await {
        match item {
            Ok(info) => {
                if let Some(m) = info.error_detail.and_then(|d| d.message).or(info.error) {
                    docker_failure = Some(m);
                }
            }
            Err(e) => docker_failure = Some(e.to_string()),
        }
    }
    drop(s);
    let written = writer
        .await
        .map_err(|e| LoadError::Berth(Error::Internal(format!("pull archive writer: {e}"))))?;
    match (written, docker_failure) {
        // berth's own failure explains a truncated archive better than Docker's EOF.
        (Err(WriteFailure::Berth(e)), _) => Err(LoadError::Berth(e)),
        (_, Some(m)) => Err(LoadError::Docker(m)),
        (Err(WriteFailure::Pipe(e)), None) => Err(LoadError::Docker(e.to_string())),
        (Ok(()), None) => {
            docker
                .inspect_image(img.config_digest())
                .await
                .map_err(|e| {
                    LoadError::Docker(format!(
                        "image {} not found after load: {e}",
                        img.config_digest()
                    ))
                })?;
            Ok(())
        }
    }
}

enum WriteFailure {
    /// The load request was closed by Docker.
    Pipe(io::Error),
    Berth(Error),
}

/// Writes the docker-archive of `img` (blobs of `include`d layers only) to `w`. Blocking.
fn write_archive(
    w: impl Write,
    session: &Session,
    img: &Image,
    include: &[bool],
    tmp_dir: &Path,
    progress: &PullProgress,
    handle: tokio::runtime::Handle,
) -> std::result::Result<(), WriteFailure> {
    let r = &img.reference;
    let mut tb = tar::Builder::new(w);
    tb.mode(tar::HeaderMode::Deterministic);
    let io_fail = |e: io::Error| {
        if e.kind() == io::ErrorKind::BrokenPipe {
            WriteFailure::Pipe(e)
        } else {
            WriteFailure::Berth(pull_err(r, "write load archive", e))
        }
    };
    let mut paths = Vec::with_capacity(img.manifest.layers.len());
    let mut written = std::collections::HashSet::new();
    for (i, (desc, diff_id)) in img.manifest.layers.iter().zip(&img.diff_ids).enumerate() {
        let path = format!("{}/layer.tar", hex_of(diff_id));
        paths.push(path.clone());
        if !include[i] {
            progress.layer(&desc.digest, desc.size, desc.size, SystemTime::now(), true);
            continue;
        }
        if !written.insert(path.clone()) {
            continue;
        }
        let compression = Compression::from_media_type(&desc.media_type).ok_or_else(|| {
            WriteFailure::Berth(pull_err(
                r,
                &format!("layer {}", desc.digest),
                format!("unsupported layer media type {:?}", desc.media_type),
            ))
        })?;
        let what = format!("pull {r}: layer {} (diffID {diff_id})", desc.digest);
        let stream = handle
            .block_on(session.open_image_blob(
                img,
                desc,
                Some(progress.reporter(&desc.digest, desc.size)),
            ))
            .map_err(|e| WriteFailure::Berth(registry_err(e)))?;
        let blob = BlockingBlob::new(stream, handle.clone());
        let blob_err = blob.error.clone();
        let fail = |e: io::Error| -> WriteFailure {
            if let Some(re) = blob_err.lock().unwrap().take() {
                return WriteFailure::Berth(registry_err(re));
            }
            if e.kind() == io::ErrorKind::InvalidData {
                return WriteFailure::Berth(Error::Op {
                    message: e.to_string(),
                    kind: ErrorKind::Internal,
                    source: None,
                });
            }
            io_fail(e)
        };
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        if compression == Compression::Zstd {
            // Docker 20.10 cannot load zstd layers: decompress into a temp file first.
            let mut tmp = tempfile::tempfile_in(tmp_dir)
                .map_err(|e| WriteFailure::Berth(pull_err(r, "temp file for a zstd layer", e)))?;
            let mut dec =
                LayerVerifier::decompressed(blob, compression, diff_id, what).map_err(fail)?;
            let size = io::copy(&mut dec, &mut tmp).map_err(fail)?;
            drop(dec);
            use std::io::Seek as _;
            tmp.seek(io::SeekFrom::Start(0))
                .map_err(|e| WriteFailure::Berth(pull_err(r, "temp file for a zstd layer", e)))?;
            header.set_size(size);
            tb.append_data(&mut header, &path, tmp).map_err(io_fail)?;
        } else {
            let verifier = LayerVerifier::new(blob, compression, diff_id, what).map_err(fail)?;
            header.set_size(desc.size);
            let mut counted = Exact {
                inner: verifier,
                left: desc.size,
            };
            // `append_data` copies until EOF: the verifier's errors (digest, decompression,
            // diffID) end the archive here, before manifest.json.
            let res = tb.append_data(&mut header, &path, &mut counted);
            if let Err(e) = res {
                return Err(fail(e));
            }
            if counted.left != 0 {
                return Err(WriteFailure::Berth(pull_err(
                    r,
                    &format!("layer {}", desc.digest),
                    "blob shorter than its descriptor",
                )));
            }
        }
    }
    let config_name = format!("{}.json", hex_of(img.config_digest()));
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o644);
    header.set_size(img.config.len() as u64);
    tb.append_data(&mut header, &config_name, &img.config[..])
        .map_err(io_fail)?;
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name,
        "RepoTags": [],
        "Layers": paths,
    }]))
    .expect("manifest serialises");
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o644);
    header.set_size(manifest.len() as u64);
    tb.append_data(&mut header, "manifest.json", &manifest[..])
        .map_err(io_fail)?;
    let mut w = tb.into_inner().map_err(io_fail)?;
    w.flush().map_err(io_fail)?;
    Ok(())
}

/// Reads `inner` and counts down from the declared size (a registry's blob stream already
/// enforces it; this keeps the tar entry honest whatever the reader).
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "blob longer than its descriptor",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Writes `img` into a stopped daemon's data root with the offline writer and tags it as
/// `reference` (module docs). Blocking.
pub(crate) fn pull_into_data_root(
    writer: &layerstore::dockerstore::OfflineWriter,
    session: &Session,
    img: &Image,
    progress: &PullProgress,
    handle: tokio::runtime::Handle,
) -> Result<layerstore::Digest> {
    let r = &img.reference;
    let mut parent: Option<layerstore::Digest> = None;
    for (desc, diff_id) in img.manifest.layers.iter().zip(&img.diff_ids) {
        let diff: layerstore::Digest = diff_id
            .parse()
            .map_err(|e| pull_err(r, "read diffIDs", e))?;
        let compression = Compression::from_media_type(&desc.media_type).ok_or_else(|| {
            pull_err(
                r,
                &format!("layer {}", desc.digest),
                format!("unsupported layer media type {:?}", desc.media_type),
            )
        })?;
        let stream = handle
            .block_on(session.open_image_blob(
                img,
                desc,
                Some(progress.reporter(&desc.digest, desc.size)),
            ))
            .map_err(registry_err)?;
        let blob = BlockingBlob::new(stream, handle.clone());
        let blob_err = blob.error.clone();
        let what = format!("pull {r}: layer {} (diffID {diff_id})", desc.digest);
        let reader = LayerVerifier::decompressed(blob, compression, diff_id, what)
            .map_err(|e| pull_err(r, "decompress", e))?;
        let written = writer
            .write_layer(
                parent.as_ref(),
                layerstore::dockerstore::LayerSource::Tar {
                    reader,
                    diff_id: Some(diff),
                },
            )
            .map_err(|e| {
                if let Some(re) = blob_err.lock().unwrap().take() {
                    return registry_err(re);
                }
                pull_err(
                    r,
                    &format!("write layer {} into the Docker data root", desc.digest),
                    e,
                )
            })?;
        parent = Some(written.chain_id);
    }
    let id = writer
        .write_image(&img.config)
        .map_err(|e| pull_err(r, "write image config into the Docker data root", e))?;
    if r.tag().is_some() {
        writer
            .tag(&r.familiar(), &id)
            .map_err(|e| pull_err(r, "tag in the Docker data root", e))?;
    }
    Ok(id)
}
