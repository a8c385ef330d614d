//! Exporters that stream the result to the client: `type=local` (a directory, fsutil packets over
//! `FileSend`), `type=tar` (a tarball), `type=docker` (a docker-archive, optionally thin) and
//! `type=oci` (an OCI image layout tar), the last three as raw bytes over `FileSend`. The archive
//! writers live in the `exporter` crate; this module maps attributes, progress and the exporter
//! response the way buildkitd does.
//!
//! Progress follows buildkitd (`control-api.md` §8.3): a synthetic vertex with digest
//! `sha256(<session>-export)` named `exporting to client directory` / `exporting to client tarball`
//! / `exporting to docker image format` / `exporting to oci image format`, with a status
//! `copying files` / `sending tarball` (action `transferring`, bytes so far). The image formats add
//! `exporting layers` and one status per layer with its sizes (for `oci`: uncompressed and
//! compressed, then `exporting config …`/`exporting manifest …`; for a thin `docker` archive: the
//! layers left out because Docker has them, with the bytes saved).
//!
//! The image formats answer as buildkitd's: `containerimage.digest`, `containerimage.config.digest`,
//! `containerimage.descriptor` and `image.name` (normalized names), also sent to the client as the
//! stream's `exporter-md-*` headers before any byte (so they are known before the tar is
//! written); a client that declines the target (`AlreadyExists`) gets the same response. A
//! `docker` archive is an OCI image layout too (`oci-layout`, `index.json`, `blobs/sha256/…`
//! beside `manifest.json`, whose `RepoTags` are the familiar names), with uncompressed layers.
//!
//! Attributes: `docker` takes `name`, `source-date-epoch` and `thin` (berth's: leave out the
//! layers the bound Docker Engine has; default from `[exporter.docker] thin` in the config).
//! `oci` takes `name`, `source-date-epoch`, `compression` (`gzip` default, `zstd`,
//! `uncompressed`), `compression-level`, `force-compression` (every layer is compressed afresh
//! anyway: berth keeps layers as trees, not blobs), `oci-mediatypes` (default true; zstd does not
//! force it, as in v0.11.6) and `tar`. Both (and `image`) take `buildinfo` and
//! `buildinfo-attrs`, which decide the config's `moby.buildkit.buildinfo.v1`
//! ([`crate::buildinfo::patch_image_configs`]).
//!
//! `tar=false` (`oci` and `docker`, as buildkitd's): no stream; the image's blobs (layers,
//! config, manifest, children before the manifest, blobs the store has skipped) are written into
//! the client's content store `export` over the session (`containerd.services.content.v1.Content`,
//! which buildctl and the Go client serve on the output directory), and the client writes
//! `index.json` from `containerimage.descriptor`. The blobs are the ones the tar would carry.

use crate::errors::{Error, Result};
use crate::progress::{synthetic_digest, Progress};
use crate::session::{calls, Session};
use crate::solver::{Backend, FsRef};
use bytes::Bytes;
use fsutil::walk::{walk, MapResult, WalkOptions};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::mpsc;

/// Largest chunk sent on the tar stream.
pub const TAR_CHUNK: usize = 1 << 20;

/// An exporter that writes to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientExporter {
    /// `type=local`.
    Local,
    /// `type=tar`.
    Tar,
    /// `type=docker`: a docker-archive of the image (`docker load` format).
    Docker,
    /// `type=oci`: an OCI image layout tar.
    Oci,
}

/// Daemon-wide defaults of the client exporters.
#[derive(Debug, Clone, Default)]
pub struct ClientExportOptions {
    /// `type=docker` leaves out layers the bound Docker Engine has unless `thin=false`
    /// (`[exporter.docker] thin = true` in the config).
    pub docker_thin: bool,
}

/// What `SolveRequest.Exporter` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExporterKind {
    /// No export.
    None,
    /// Streamed to the client.
    Client(ClientExporter),
    /// `type=image` / `type=moby`: into the Docker Engine berthd is bound to.
    Image,
}

/// Parses an exporter type; unknown types are `InvalidArgument`.
pub fn parse_exporter(ty: &str) -> Result<ExporterKind> {
    match ty {
        "" => Ok(ExporterKind::None),
        "local" => Ok(ExporterKind::Client(ClientExporter::Local)),
        "tar" => Ok(ExporterKind::Client(ClientExporter::Tar)),
        "docker" => Ok(ExporterKind::Client(ClientExporter::Docker)),
        "image" | "moby" => Ok(ExporterKind::Image),
        "oci" => Ok(ExporterKind::Client(ClientExporter::Oci)),
        other => Err(Error::invalid(format!("unknown exporter type {other:?}"))),
    }
}

fn source_date_epoch(attrs: &BTreeMap<String, String>) -> Result<Option<i64>> {
    match attrs.get("source-date-epoch") {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => v.parse::<i64>().map(Some).map_err(|_| {
            Error::invalid(format!(
                "invalid source-date-epoch {v:?}: want seconds since the epoch"
            ))
        }),
    }
}

/// Exports `fs` through `session` and returns the exporter response (empty for `local` and
/// `tar`). With `index` (`type=oci` only), the result is a multi-platform one (or a single one
/// with attestations): an image index over those images, `fs` unused.
#[allow(clippy::too_many_arguments)]
pub async fn export(
    backend: &Arc<Backend>,
    session: &Arc<Session>,
    progress: &Arc<Progress>,
    kind: ClientExporter,
    attrs: &BTreeMap<String, String>,
    metadata: &BTreeMap<String, Bytes>,
    fs: &FsRef,
    index: Option<&[exporter::PlatformImage]>,
) -> Result<BTreeMap<String, String>> {
    match (kind, index) {
        (_, None) | (ClientExporter::Oci, Some(_)) => {}
        // A single image with its attestations (a multi-platform result is refused by the
        // caller, as buildkitd does).
        (ClientExporter::Docker, Some([_])) => {}
        (ClientExporter::Docker, Some(_)) => {
            // buildkitd's wording.
            return Err(Error::invalid(
                "docker exporter does not currently support exporting manifest lists",
            ));
        }
        (_, Some(_)) => {
            return Err(Error::internal(
                "an image index is only exported by the oci and docker exporters",
            ))
        }
    }
    let epoch = source_date_epoch(attrs)?;
    let vertex = synthetic_digest(&format!("{}-export", session.id));
    let (name, status) = match kind {
        ClientExporter::Local => ("exporting to client directory", "copying files"),
        ClientExporter::Tar => ("exporting to client tarball", "sending tarball"),
        ClientExporter::Docker => ("exporting to docker image format", "sending tarball"),
        ClientExporter::Oci => ("exporting to oci image format", "sending tarball"),
    };
    // Attributes are checked before anything is shown or sent.
    let oci = match kind {
        ClientExporter::Oci => Some(oci_attrs(attrs)?),
        _ => None,
    };
    let thin = match kind {
        ClientExporter::Docker => {
            bool_attr(attrs, "thin", true)?.unwrap_or(backend.client_export.docker_thin)
        }
        _ => false,
    };
    let docker_tar = match kind {
        ClientExporter::Docker => bool_attr(attrs, "tar", true)?.unwrap_or(true),
        _ => true,
    };
    progress.vertex_started(&vertex, name, &[], None, SystemTime::now());
    let started = SystemTime::now();
    let report = {
        let p = progress.clone();
        let v = vertex.clone();
        Arc::new(move |n: u64, last: bool| {
            p.status(
                &v,
                status,
                "transferring",
                n as i64,
                0,
                Some(started),
                last.then(SystemTime::now),
            );
        })
    };
    let res = async {
        let image = ImageCtx {
            backend,
            session,
            progress,
            vertex: &vertex,
            metadata,
            epoch,
            fs,
            index,
            report: report.clone(),
        };
        if kind == ClientExporter::Docker && index.is_some() {
            return send_docker_index(&image, attrs, docker_tar).await;
        }
        if kind == ClientExporter::Docker && !docker_tar {
            return store_docker(&image, attrs).await;
        }
        if kind == ClientExporter::Docker {
            return send_docker(&image, attrs, thin).await;
        }
        if let Some(oci) = oci {
            return send_oci(&image, attrs, oci).await;
        }
        let view = backend.view(fs).await?;
        let root = view.path().to_path_buf();
        match kind {
            ClientExporter::Local => {
                let map: Option<fsutil::send::MapFn> = epoch.map(|e| {
                    Arc::new(move |st: &mut fsutil::Stat| {
                        st.mod_time = e * 1_000_000_000;
                        MapResult::Keep
                    }) as fsutil::send::MapFn
                });
                calls::send_local(session, root, map, Some(report.clone())).await?;
            }
            ClientExporter::Tar => {
                send_tar(session, root, epoch, report.clone()).await?;
            }
            ClientExporter::Docker | ClientExporter::Oci => unreachable!("handled above"),
        }
        drop(view);
        Ok::<_, Error>(BTreeMap::new())
    }
    .await;
    match &res {
        Ok(_) => progress.vertex_completed(&vertex, false, None, SystemTime::now()),
        Err(e) => progress.vertex_completed(&vertex, false, Some(e.to_string()), SystemTime::now()),
    }
    res
}

/// Exports a multi-platform result with `type=local` or `type=tar` as buildkitd does: one
/// directory per platform (`linux/arm64` → `linux_arm64`, mode 0755; without `subdirs`, for a
/// single result with attestations, its one platform at the top) holding that platform's
/// result and, for each of its attestations that is not inline-only, the in-toto statement
/// (indented JSON, mode 0600) named `<attestation-prefix><base name of its path>`, whose default
/// subjects are the platform's regular files with their sha256. Returns the (empty) response.
#[allow(clippy::too_many_arguments)]
pub async fn export_multi(
    backend: &Arc<Backend>,
    session: &Arc<Session>,
    progress: &Arc<Progress>,
    kind: ClientExporter,
    attrs: &BTreeMap<String, String>,
    platforms: &[(String, exporter::image::Platform)],
    refs: &BTreeMap<String, FsRef>,
    attestations: &crate::attestations::Attestations,
    subdirs: bool,
) -> Result<BTreeMap<String, String>> {
    let epoch = source_date_epoch(attrs)?;
    let prefix = attrs.get("attestation-prefix").cloned().unwrap_or_default();
    let vertex = synthetic_digest(&format!("{}-export", session.id));
    let (name, status) =
        match kind {
            ClientExporter::Local => ("exporting to client directory", "copying files"),
            ClientExporter::Tar => ("exporting to client tarball", "sending tarball"),
            _ => {
                return Err(Error::unimplemented(format!(
                "exporter {}: multi-platform results ({} platforms) are not exported by berthd yet",
                if kind == ClientExporter::Docker { "docker" } else { "oci" },
                platforms.len()
            )))
            }
        };
    progress.vertex_started(&vertex, name, &[], None, SystemTime::now());
    let started = SystemTime::now();
    let report: Arc<dyn Fn(u64, bool) + Send + Sync> = {
        let p = progress.clone();
        let v = vertex.clone();
        Arc::new(move |n: u64, last: bool| {
            p.status(
                &v,
                status,
                "transferring",
                n as i64,
                0,
                Some(started),
                last.then(SystemTime::now),
            );
        })
    };
    let res = async {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let mut views = Vec::new();
        let mut entries = Vec::new();
        for (id, _) in platforms {
            let fs = refs
                .get(id)
                .ok_or_else(|| Error::invalid(format!("failed to find ref for ID {id}")))?;
            let atts: Vec<_> = attestations
                .get(id)
                .map(|a| {
                    a.iter()
                        .filter(|a| !crate::attestations::inline_only(a))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            let atts = crate::attestations::resolve(backend, &atts).await?;
            let view = backend.view(fs).await?;
            let root = view.path().to_path_buf();
            let dir = if subdirs {
                id.replace('/', "_")
            } else {
                String::new()
            };
            let prefix = prefix.clone();
            let part = tokio::task::spawn_blocking(move || {
                platform_entries(&root, &dir, &atts, &prefix, epoch, now)
            })
            .await
            .map_err(|e| Error::internal(format!("list result: {e}")))??;
            entries.extend(part);
            views.push(view);
        }
        entries.sort_by(|a, b| a.stat.path.split('/').cmp(b.stat.path.split('/')));
        match kind {
            ClientExporter::Local => {
                calls::send_local_tree(
                    session,
                    calls::LocalTree::Entries(entries),
                    Some(report.clone()),
                )
                .await?
            }
            _ => {
                let (tx, rx) = mpsc::channel::<Bytes>(8);
                let counted = counted(rx, report.clone());
                let producer = tokio::task::spawn_blocking(move || {
                    write_tar_entries(entries, epoch, ChunkWriter::new(tx))
                });
                let send = calls::send_bytes(session, counted, &[]);
                let (sent, produced) = tokio::join!(send, producer);
                let produced = produced.map_err(|e| Error::internal(format!("tar task: {e}")))?;
                if sent? {
                    produced?;
                }
            }
        }
        drop(views);
        Ok::<_, Error>(BTreeMap::new())
    }
    .await;
    match &res {
        Ok(_) => progress.vertex_completed(&vertex, false, None, SystemTime::now()),
        Err(e) => progress.vertex_completed(&vertex, false, Some(e.to_string()), SystemTime::now()),
    }
    res
}

/// One platform's part of a multi-platform local/tar export: its directory `dir`, the result at
/// `root` under it, and the statements of `atts` (blocking: walks and hashes the result).
fn platform_entries(
    root: &std::path::Path,
    dir: &str,
    atts: &[exporter::attestation::Attestation],
    prefix: &str,
    epoch: Option<i64>,
    now: i64,
) -> Result<Vec<fsutil::send::Entry>> {
    use fsutil::send::{Entry, Source};
    // `dir` empty: the result at the top of the output.
    let under = |p: &str| {
        if dir.is_empty() {
            p.to_string()
        } else {
            format!("{dir}/{p}")
        }
    };
    let mut out = Vec::new();
    if !dir.is_empty() {
        out.push(Entry {
            stat: fsutil::Stat {
                path: dir.to_string(),
                mode: fsutil::filemode::MODE_DIR | 0o755,
                mod_time: epoch.map_or(0, |e| e * 1_000_000_000),
                ..Default::default()
            },
            content: Source::None,
        });
    }
    let mut files = Vec::new();
    walk(
        root,
        &WalkOptions::default(),
        &mut |_| MapResult::Keep,
        &mut |mut st| {
            let full = root.join(&st.path);
            if st.kind() == fsutil::filemode::FileKind::Regular {
                files.push((st.path.clone(), full.clone()));
            }
            if st.is_hardlink() {
                st.linkname = under(&st.linkname);
            }
            st.path = under(&st.path);
            if let Some(e) = epoch {
                st.mod_time = e * 1_000_000_000;
            }
            out.push(Entry {
                stat: st,
                content: Source::Path(full),
            });
            Ok(())
        },
    )
    .map_err(|e| Error::fsutil("walk result for export", e))?;
    if atts.is_empty() {
        return Ok(out);
    }
    let mut subjects = Vec::with_capacity(files.len());
    for (path, full) in files {
        use sha2::Digest as _;
        let mut f =
            std::fs::File::open(&full).map_err(|e| Error::internal(format!("open {path}: {e}")))?;
        let mut h = sha2::Sha256::new();
        std::io::copy(&mut f, &mut h).map_err(|e| Error::internal(format!("read {path}: {e}")))?;
        subjects.push(exporter::attestation::DefaultSubject {
            name: path,
            digest: format!("sha256:{}", hex::encode(h.finalize())),
        });
    }
    let mut names = std::collections::BTreeSet::new();
    for a in atts {
        let stmt = exporter::attestation::statement(a, &subjects)
            .map_err(|e| Error::invalid(e.to_string()))?;
        let data = Bytes::from(exporter::attestation::indent(&stmt));
        let base = a.path.rsplit('/').next().unwrap_or(&a.path);
        let name = format!("{prefix}{base}");
        if !names.insert(name.clone()) {
            return Err(Error::invalid(format!(
                "duplicate attestation path name {name}"
            )));
        }
        out.push(Entry {
            stat: fsutil::Stat {
                path: under(&name),
                mode: 0o600,
                size: data.len() as i64,
                mod_time: epoch.unwrap_or(now) * 1_000_000_000,
                ..Default::default()
            },
            content: Source::Data(data),
        });
    }
    Ok(out)
}

/// What the image formats need to know about the export.
struct ImageCtx<'a> {
    backend: &'a Arc<Backend>,
    session: &'a Arc<Session>,
    progress: &'a Arc<Progress>,
    vertex: &'a str,
    metadata: &'a BTreeMap<String, Bytes>,
    epoch: Option<i64>,
    fs: &'a FsRef,
    /// The images of a multi-platform `oci` export (`fs` unused).
    index: Option<&'a [exporter::PlatformImage]>,
    report: Arc<dyn Fn(u64, bool) + Send + Sync>,
}

impl ImageCtx<'_> {
    fn chain(&self) -> Vec<layerstore::snapshot::LayerRef> {
        match self.fs {
            FsRef::Scratch => Vec::new(),
            FsRef::Solved(r) => r.chain().layers().to_vec(),
        }
    }

    fn epoch(&self) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
        self.epoch
            .map(|e| {
                chrono::DateTime::from_timestamp(e, 0)
                    .ok_or_else(|| Error::invalid(format!("source-date-epoch {e} is out of range")))
            })
            .transpose()
    }

    /// The client's content store `export` as a blob sink for `tar=false`; refused up front when
    /// the session serves no content store.
    fn content_sink(&self) -> Result<SessionBlobSink> {
        if !self.session.supports(crate::session::content::CONTENT_INFO) {
            return Err(Error::invalid(format!(
                "tar=false needs the client's content store, which session {} does not serve (an output directory, e.g. buildctl --output type=oci,tar=false,dest=DIR)",
                self.session.id
            )));
        }
        Ok(SessionBlobSink {
            rt: tokio::runtime::Handle::current(),
            store: Arc::new(crate::session::content::SessionContentStore::new(
                self.session.clone(),
                "export",
            )),
        })
    }

    /// A finished status of the export vertex.
    fn done(&self, id: &str, current: u64, total: u64, started: SystemTime) {
        self.progress.status(
            self.vertex,
            id,
            "",
            current as i64,
            total as i64,
            Some(started),
            Some(SystemTime::now()),
        );
    }

    /// Runs `write` on the blocking pool with a writer whose chunks go to the client through
    /// FileSend, counted into the `sending tarball` status. `write` calls its `ready` argument
    /// with the image's digests before it writes anything: the stream opens only then, with the
    /// exporter response as `exporter-md-*` headers, as buildkitd sends them (the client's
    /// output callback sees them). When the client declines the target (`AlreadyExists`), the
    /// export succeeds with that response, as in buildkitd.
    async fn stream_image(
        &self,
        what: &'static str,
        write: impl FnOnce(
                &mut dyn Write,
                &mut dyn FnMut(&exporter::ImageExportResult) -> exporter::Result<()>,
            ) -> exporter::Result<exporter::ImageExportResult>
            + Send
            + 'static,
    ) -> Result<BTreeMap<String, String>> {
        let (tx, rx) = mpsc::channel::<Bytes>(8);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<exporter::ImageExportResult>();
        let producer = tokio::task::spawn_blocking(move || {
            let mut w = ChunkWriter::new(tx);
            let mut ready_tx = Some(ready_tx);
            let mut ready = |r: &exporter::ImageExportResult| {
                if let Some(t) = ready_tx.take() {
                    // The receiver is gone only when the export was abandoned; the next write
                    // then fails with the reason.
                    let _ = t.send(r.clone());
                }
                Ok(())
            };
            let r = write(&mut w, &mut ready)
                .map_err(|e| Error::unavailable(format!("{what}: {}", chain_err(&e))))?;
            w.flush()
                .map_err(|e| Error::unavailable(format!("{what}: {e}")))?;
            Ok::<_, Error>(r)
        });
        let first = match ready_rx.await {
            Ok(r) => r,
            // The writer failed before it knew the digests: nothing was sent.
            Err(_) => {
                return match producer.await {
                    Ok(Err(e)) => Err(e),
                    Ok(Ok(_)) => Err(Error::internal(format!(
                        "{what}: the writer finished without announcing the image"
                    ))),
                    Err(e) => Err(Error::internal(format!("{what} task: {e}"))),
                }
            }
        };
        let md: Vec<(String, String)> = image_response(&first).into_iter().collect();
        let counted = counted(rx, self.report.clone());
        let send = calls::send_bytes(self.session, counted, &md);
        let (sent, produced) = tokio::join!(send, producer);
        let produced = produced.map_err(|e| Error::internal(format!("{what} task: {e}")))?;
        // The client's error (it stopped reading) explains a failed write better than the write.
        if !sent? {
            return Ok(image_response(&first));
        }
        produced.map(|r| image_response(&r))
    }
}

/// An error with its causes, `: `-separated.
fn chain_err(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A boolean attribute as buildkitd parses it (`strconv.ParseBool`; an empty value means
/// `empty`); `None` when absent.
pub(crate) fn bool_attr(
    attrs: &BTreeMap<String, String>,
    key: &str,
    empty: bool,
) -> Result<Option<bool>> {
    match attrs.get(key).map(String::as_str) {
        None => Ok(None),
        Some("") => Ok(Some(empty)),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(Some(true)),
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(Some(false)),
        Some(v) => Err(Error::invalid(format!(
            "non-bool value {v:?} specified for exporter attribute {key}"
        ))),
    }
}

/// `type=oci` attributes, checked.
#[derive(Debug, Clone, PartialEq)]
struct OciAttrs {
    /// `tar` (default true); false: the blobs go into the client's content store `export`.
    tar: bool,
    compression: exporter::Compression,
    level: Option<i32>,
    oci_types: bool,
}

fn oci_attrs(attrs: &BTreeMap<String, String>) -> Result<OciAttrs> {
    let tar = bool_attr(attrs, "tar", true)?.unwrap_or(true);
    let compression = match attrs.get("compression").map(String::as_str) {
        None | Some("") => exporter::Compression::Gzip,
        Some(v) => exporter::Compression::parse(v)
            .map_err(|e| Error::invalid(format!("exporter oci: {e}")))?,
    };
    let level = match attrs.get("compression-level").map(String::as_str) {
        None | Some("") => None,
        Some(v) => {
            let l: i32 = v.parse().map_err(|_| {
                Error::invalid(format!(
                    "exporter oci: non-int value {v:?} specified for compression-level"
                ))
            })?;
            let range = compression.levels();
            if compression != exporter::Compression::Uncompressed && !range.contains(&l) {
                return Err(Error::invalid(format!(
                    "exporter oci: compression-level {l} is out of range for {} ({}..={})",
                    compression.name(),
                    range.start(),
                    range.end()
                )));
            }
            Some(l)
        }
    };
    // Accepted for compatibility: berth compresses every layer afresh whatever it says.
    bool_attr(attrs, "force-compression", true)?;
    let oci_types = bool_attr(attrs, "oci-mediatypes", true)?.unwrap_or(true);
    Ok(OciAttrs {
        tar,
        compression,
        level,
        oci_types,
    })
}

/// Normalized names for the image formats (`name`, `*` = the result's `image.name`).
fn normalized_names(
    attrs: &BTreeMap<String, String>,
    metadata: &BTreeMap<String, Bytes>,
) -> Result<Vec<String>> {
    crate::export_image::names(attrs, metadata)
        .iter()
        .map(|n| exporter::normalize_name(n).map_err(|e| Error::invalid(format!("exporter: {e}"))))
        .collect()
}

fn image_response(r: &exporter::ImageExportResult) -> BTreeMap<String, String> {
    let mut response = BTreeMap::new();
    response.insert(
        "containerimage.digest".to_string(),
        r.manifest_digest.clone(),
    );
    // An index has no config.
    if !r.config_digest.is_empty() {
        response.insert(
            "containerimage.config.digest".to_string(),
            r.config_digest.clone(),
        );
    }
    response.insert(
        "containerimage.descriptor".to_string(),
        r.descriptor.clone(),
    );
    if !r.names.is_empty() {
        response.insert("image.name".to_string(), r.names.join(","));
    }
    response
}

/// `type=docker`: the image as a docker-archive streamed to the client (which writes it to
/// `dest` or stdout, for `docker load`). Layers come from the layer store and Docker's own store
/// (exact bytes via tar-split), one at a time; nothing is buffered whole. With `thin`, the layers
/// the bound Docker Engine has are listed but not carried.
async fn send_docker(
    cx: &ImageCtx<'_>,
    attrs: &BTreeMap<String, String>,
    thin: bool,
) -> Result<BTreeMap<String, String>> {
    let chain = cx.chain();
    let names = normalized_names(attrs, cx.metadata)?;
    let config = cx.metadata.get("containerimage.config").map(|b| b.to_vec());
    let epoch = cx.epoch()?;
    let created = epoch.unwrap_or_else(chrono::Utc::now);
    let started = SystemTime::now();
    let presence = if thin {
        let opts = &cx.backend.image_export;
        let docker = crate::docker::connect(&opts.docker_host)?;
        let p = exporter::DockerPresence::detect(&docker, opts.data_root.as_deref()).await;
        if let exporter::DockerPresence::Unknown(why) = &p {
            cx.done(
                &format!("thin archive not possible: {why}; sending every layer"),
                0,
                0,
                started,
            );
        }
        Some(p)
    } else {
        None
    };
    let store = cx.backend.store.clone();
    let progress = cx.progress.clone();
    let vertex = cx.vertex.to_string();
    let (sent_tx, sent_rx) = std::sync::mpsc::channel::<(usize, u64, usize, u64)>();
    let response = cx
        .stream_image("exporter docker", move |w, ready| {
            let req = exporter::ImageExportRequest {
                chain: &chain,
                config: config.as_deref(),
                names,
                epoch,
            };
            let mut on_layer = |diff_id: &str, size: u64, sent: bool| {
                layer_status(
                    &progress,
                    &vertex,
                    started,
                    diff_id,
                    size,
                    sent,
                    "in Docker",
                );
            };
            let r = exporter::write_docker_client_archive(
                &store,
                &req,
                presence.as_ref(),
                &created,
                &mut on_layer,
                ready,
                w,
            )?;
            let _ = sent_tx.send((
                r.layers_sent,
                r.bytes_sent,
                r.layers_skipped,
                r.bytes_skipped,
            ));
            Ok(r)
        })
        .await?;
    // Counts only when the archive was written (not when the client declined it).
    if let Ok((layers_sent, bytes_sent, layers_skipped, bytes_skipped)) = sent_rx.try_recv() {
        cx.done("exporting layers", bytes_sent, bytes_sent, started);
        crate::observe::export_layers(
            if thin { "docker-thin" } else { "docker" },
            layers_sent,
            bytes_sent,
            layers_skipped,
            bytes_skipped,
        );
        if layers_skipped > 0 {
            let id = format!(
                "{layers_skipped} layers already in Docker ({bytes_skipped} bytes not sent)"
            );
            cx.done(&id, bytes_skipped, bytes_skipped, started);
        }
    }
    Ok(response)
}

/// `type=docker` of a single image with attestations that are not inline-only, as buildkitd
/// writes it: the OCI layout of an index over the image and its attestation manifests (OCI
/// media types, uncompressed layers as every `docker` archive of berthd), with `manifest.json`
/// listing the image for `docker load`, which loads it with the image ID it has without
/// attestations. Every layer travels (no thin archive: the layout's blobs must be complete).
/// With `tar=false` the blobs go into the client's content store as `type=oci,tar=false`'s.
async fn send_docker_index(
    cx: &ImageCtx<'_>,
    attrs: &BTreeMap<String, String>,
    tar: bool,
) -> Result<BTreeMap<String, String>> {
    let names = normalized_names(attrs, cx.metadata)?;
    let raw_names = crate::export_image::names(attrs, cx.metadata);
    let epoch = cx.epoch()?;
    let annotations = crate::export_image::Annotations::parse(cx.metadata)?;
    let temp_dir = cx.backend.root.join("export-tmp");
    std::fs::create_dir_all(&temp_dir).map_err(|e| {
        Error::unavailable(format!(
            "exporter docker: create {}: {e}",
            temp_dir.display()
        ))
    })?;
    let repo_tags: Vec<String> = names
        .iter()
        .filter(|n| !n.contains('@'))
        .map(|n| exporter::familiar_name(n))
        .collect();
    let compression = exporter::Compression::Uncompressed;
    let opts = exporter::OciOptions {
        compression,
        level: None,
        oci_types: true,
        names,
        created: epoch.unwrap_or_else(chrono::Utc::now),
        temp_dir,
        manifest_annotations: BTreeMap::new(),
        descriptor_annotations: annotations.index_descriptor.clone(),
    };
    let store = cx.backend.store.clone();
    let progress = cx.progress.clone();
    let vertex = cx.vertex.to_string();
    let started = SystemTime::now();
    let images = cx.index.map(<[_]>::to_vec).unwrap_or_default();
    let index_annotations = annotations.index;
    if !tar {
        let sink = cx.content_sink()?;
        return tokio::task::spawn_blocking(move || {
            let mut on = oci_progress(progress, vertex, compression, started);
            let mut sink = sink;
            let req = exporter::OciIndexRequest {
                images: &images,
                names: &raw_names,
                index_annotations: &index_annotations,
                epoch,
            };
            exporter::write_oci_index_blobs(&store, &req, &opts, &mut sink, &mut on)
                .map(|r| image_response(&r))
                .map_err(|e| Error::unavailable(format!("exporter docker: {}", chain_err(&e))))
        })
        .await
        .map_err(|e| Error::internal(format!("exporter docker task: {e}")))?;
    }
    cx.stream_image("exporter docker", move |w, ready| {
        let mut on = oci_progress(progress, vertex, compression, started);
        let req = exporter::OciIndexRequest {
            images: &images,
            names: &raw_names,
            index_annotations: &index_annotations,
            epoch,
        };
        exporter::write_docker_index_archive(&store, &req, &opts, &repo_tags, w, &mut on, ready)
    })
    .await
}

/// `type=oci`: the image (or, for a multi-platform result, the index over its images) as an OCI
/// image layout tar streamed to the client, or with `tar=false` its blobs written into the
/// client's content store. Annotations (`annotation*` keys of the result's metadata and the
/// attributes) go where buildkitd puts them; index and descriptor annotations, and attestations,
/// force OCI media types.
async fn send_oci(
    cx: &ImageCtx<'_>,
    attrs: &BTreeMap<String, String>,
    oci: OciAttrs,
) -> Result<BTreeMap<String, String>> {
    let chain = cx.chain();
    let names = normalized_names(attrs, cx.metadata)?;
    let raw_names = crate::export_image::names(attrs, cx.metadata);
    let config = cx.metadata.get("containerimage.config").map(|b| b.to_vec());
    let epoch = cx.epoch()?;
    let annotations = crate::export_image::Annotations::parse(cx.metadata)?;
    let (manifest_annotations, descriptor_annotations) = match cx.index {
        Some(_) => (BTreeMap::new(), annotations.index_descriptor.clone()),
        None => {
            if !annotations.index.is_empty() || !annotations.index_descriptor.is_empty() {
                // buildkitd's wording.
                return Err(Error::invalid(
                    "index annotations not supported for single platform export",
                ));
            }
            annotations.for_platform("")
        }
    };
    let with_attestations = cx
        .index
        .is_some_and(|i| i.iter().any(|i| !i.attestations.is_empty()));
    let temp_dir = cx.backend.root.join("export-tmp");
    std::fs::create_dir_all(&temp_dir).map_err(|e| {
        Error::unavailable(format!("exporter oci: create {}: {e}", temp_dir.display()))
    })?;
    let opts = exporter::OciOptions {
        compression: oci.compression,
        level: oci.level,
        oci_types: oci.oci_types || annotations.needs_oci() || with_attestations,
        names,
        created: epoch.unwrap_or_else(chrono::Utc::now),
        temp_dir,
        manifest_annotations,
        descriptor_annotations,
    };
    let store = cx.backend.store.clone();
    let progress = cx.progress.clone();
    let vertex = cx.vertex.to_string();
    let started = SystemTime::now();
    let images = cx.index.map(<[_]>::to_vec);
    let index_annotations = annotations.index;
    if !oci.tar {
        let sink = cx.content_sink()?;
        return tokio::task::spawn_blocking(move || {
            let mut on = oci_progress(progress, vertex, opts.compression, started);
            let mut sink = sink;
            let r = match &images {
                Some(images) => {
                    let req = exporter::OciIndexRequest {
                        images,
                        names: &raw_names,
                        index_annotations: &index_annotations,
                        epoch,
                    };
                    exporter::write_oci_index_blobs(&store, &req, &opts, &mut sink, &mut on)
                }
                None => {
                    let req = exporter::ImageExportRequest {
                        chain: &chain,
                        config: config.as_deref(),
                        names: opts.names.clone(),
                        epoch,
                    };
                    exporter::write_oci_image_blobs(&store, &req, &opts, &mut sink, &mut on)
                }
            };
            r.map(|r| image_response(&r))
                .map_err(|e| Error::unavailable(format!("exporter oci: {}", chain_err(&e))))
        })
        .await
        .map_err(|e| Error::internal(format!("exporter oci task: {e}")))?;
    }
    cx.stream_image("exporter oci", move |w, ready| {
        let mut on = oci_progress(progress, vertex, opts.compression, started);
        match &images {
            Some(images) => {
                let req = exporter::OciIndexRequest {
                    images,
                    names: &raw_names,
                    index_annotations: &index_annotations,
                    epoch,
                };
                exporter::write_oci_index_archive(&store, &req, &opts, w, &mut on, ready)
            }
            None => {
                let req = exporter::ImageExportRequest {
                    chain: &chain,
                    config: config.as_deref(),
                    names: opts.names.clone(),
                    epoch,
                };
                exporter::write_oci_image_archive(&store, &req, &opts, w, &mut on, ready)
            }
        }
    })
    .await
}

/// The `type=oci` export's statuses: one per layer while it is compressed or sent, then its
/// sizes, `exporting layers` in total, the config and the manifest.
fn oci_progress(
    progress: Arc<Progress>,
    vertex: String,
    compression: exporter::Compression,
    started: SystemTime,
) -> impl FnMut(exporter::OciProgress) {
    let mut layer_started = SystemTime::now();
    let mut done_bytes = 0u64;
    move |p: exporter::OciProgress| {
        let st = |id: &str, action: &str, cur: u64, tot: u64, from: SystemTime, end: bool| {
            progress.status(
                &vertex,
                id,
                action,
                cur as i64,
                tot as i64,
                Some(from),
                end.then(SystemTime::now),
            );
        };
        match p {
            exporter::OciProgress::Layer {
                diff_id,
                done,
                size,
            } => {
                if done == 0 {
                    layer_started = SystemTime::now();
                }
                let action = if compression == exporter::Compression::Uncompressed {
                    "sending"
                } else {
                    "compressing"
                };
                st(
                    &format!("exporting layer {diff_id}"),
                    action,
                    done,
                    size,
                    layer_started,
                    false,
                );
                st("exporting layers", "", done_bytes + done, 0, started, false);
            }
            exporter::OciProgress::LayerDone {
                diff_id,
                size,
                blob_digest,
                blob_size,
            } => {
                done_bytes += size;
                st(
                    &format!("exporting layer {diff_id}"),
                    "done",
                    size,
                    size,
                    layer_started,
                    true,
                );
                let id = format!(
                    "layer {diff_id}: {size} bytes, {} blob {blob_digest}: {blob_size} bytes",
                    compression.name()
                );
                st(&id, "", blob_size, blob_size, layer_started, true);
            }
            exporter::OciProgress::Config { digest } => {
                st(
                    "exporting layers",
                    "",
                    done_bytes,
                    done_bytes,
                    started,
                    true,
                );
                st(
                    &format!("exporting config {digest}"),
                    "",
                    0,
                    0,
                    SystemTime::now(),
                    true,
                );
            }
            exporter::OciProgress::Manifest { digest } => {
                st(
                    &format!("exporting manifest {digest}"),
                    "",
                    0,
                    0,
                    SystemTime::now(),
                    true,
                );
            }
        }
    }
}

/// `type=docker,tar=false`: the image's blobs (uncompressed layers, config, manifest) written into
/// the client's content store `export`, as buildkitd does; the client names the manifest in the
/// directory's `index.json`.
async fn store_docker(
    cx: &ImageCtx<'_>,
    attrs: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>> {
    let chain = cx.chain();
    let names = normalized_names(attrs, cx.metadata)?;
    let config = cx.metadata.get("containerimage.config").map(|b| b.to_vec());
    let epoch = cx.epoch()?;
    let created = epoch.unwrap_or_else(chrono::Utc::now);
    let sink = cx.content_sink()?;
    let store = cx.backend.store.clone();
    let progress = cx.progress.clone();
    let vertex = cx.vertex.to_string();
    let started = SystemTime::now();
    tokio::task::spawn_blocking(move || {
        let req = exporter::ImageExportRequest {
            chain: &chain,
            config: config.as_deref(),
            names,
            epoch,
        };
        let mut on_layer = |diff_id: &str, size: u64, written: bool| {
            let place = "in the client's store";
            layer_status(&progress, &vertex, started, diff_id, size, written, place);
        };
        let mut sink = sink;
        exporter::write_docker_image_blobs(&store, &req, &created, &mut sink, &mut on_layer)
            .map(|r| image_response(&r))
            .map_err(|e| Error::unavailable(format!("exporter docker: {}", chain_err(&e))))
    })
    .await
    .map_err(|e| Error::internal(format!("exporter docker task: {e}")))?
}

/// The client's content store `export` (what buildctl and the Go client serve for an `oci` or
/// `docker` output directory) as the exporter's blob sink: blocking calls from the exporter's
/// thread, each write streamed to the session in chunks.
struct SessionBlobSink {
    rt: tokio::runtime::Handle,
    store: Arc<crate::session::content::SessionContentStore>,
}

impl exporter::BlobSink for SessionBlobSink {
    fn describe(&self) -> String {
        "the client's content store export".into()
    }

    fn has(&mut self, digest: &str) -> std::io::Result<bool> {
        use remotecache::ContentStore as _;
        self.rt
            .block_on(self.store.info(digest))
            .map(|s| s.is_some())
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn write(
        &mut self,
        digest: &str,
        size: u64,
        fill: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(8);
        let store = self.store.clone();
        let d = digest.to_string();
        let task = self.rt.spawn(async move {
            let reader =
                tokio_util::io::StreamReader::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            store.write_from(&d, size, reader).await
        });
        let mut w = BlockingChunks {
            tx,
            buf: Vec::with_capacity(TAR_CHUNK),
        };
        let filled = fill(&mut w).and_then(|()| w.send_buf());
        if let Err(e) = &filled {
            // The store must not commit a short blob: end the stream with the error.
            let _ =
                w.tx.blocking_send(Err(std::io::Error::new(e.kind(), e.to_string())));
        }
        drop(w);
        let stored = self
            .rt
            .block_on(task)
            .map_err(|e| std::io::Error::other(format!("content store write task: {e}")))?;
        filled?;
        stored.map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// A blocking writer whose bytes go out as chunks of at most [`TAR_CHUNK`] on a channel.
struct BlockingChunks {
    tx: mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl BlockingChunks {
    fn send_buf(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(TAR_CHUNK),
        ));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::other("the content store write ended early"))
    }
}

impl Write for BlockingChunks {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(TAR_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == TAR_CHUNK {
            self.send_buf()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Forwards chunks from `rx`, reporting the running byte count (and a final report at the end).
fn counted(
    mut rx: mpsc::Receiver<Bytes>,
    report: Arc<dyn Fn(u64, bool) + Send + Sync>,
) -> mpsc::Receiver<Bytes> {
    let (ctx, crx) = mpsc::channel::<Bytes>(8);
    tokio::spawn(async move {
        let mut total = 0u64;
        while let Some(b) = rx.recv().await {
            total += b.len() as u64;
            report(total, false);
            if ctx.send(b).await.is_err() {
                break;
            }
        }
        report(total, true);
    });
    crx
}

async fn send_tar(
    session: &Arc<Session>,
    root: PathBuf,
    epoch: Option<i64>,
    report: Arc<dyn Fn(u64, bool) + Send + Sync>,
) -> Result<()> {
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let counted = counted(rx, report);
    let producer =
        tokio::task::spawn_blocking(move || write_tar(&root, epoch, ChunkWriter::new(tx)));
    let send = calls::send_bytes(session, counted, &[]);
    let (sent, produced) = tokio::join!(send, producer);
    let produced = produced.map_err(|e| Error::internal(format!("tar task: {e}")))?;
    if !sent? {
        return Ok(()); // the client declined the target
    }
    produced
}

/// A `Write` that hands out chunks of at most [`TAR_CHUNK`] bytes on a channel.
struct ChunkWriter {
    buf: Vec<u8>,
    tx: mpsc::Sender<Bytes>,
}

impl ChunkWriter {
    fn new(tx: mpsc::Sender<Bytes>) -> Self {
        ChunkWriter {
            buf: Vec::with_capacity(TAR_CHUNK),
            tx,
        }
    }

    fn flush_chunk(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(TAR_CHUNK));
        self.tx.blocking_send(Bytes::from(chunk)).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "client stopped reading the tarball",
            )
        })
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = TAR_CHUNK - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= TAR_CHUNK {
            self.flush_chunk()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.flush_chunk()
    }
}

/// Writes a tar of `root` (walk order, numeric ids, dirs with a trailing `/`, hardlinks as links,
/// xattrs as PAX `SCHILY.xattr.*`).
fn write_tar(root: &std::path::Path, epoch: Option<i64>, w: ChunkWriter) -> Result<()> {
    let mut entries = Vec::new();
    walk(
        root,
        &WalkOptions::default(),
        &mut |_| MapResult::Keep,
        &mut |st| {
            let content = fsutil::send::Source::Path(root.join(&st.path));
            entries.push(fsutil::send::Entry { stat: st, content });
            Ok(())
        },
    )
    .map_err(|e| Error::fsutil("walk result for tar export", e))?;
    write_tar_entries(entries, epoch, w)
}

/// Writes a tar of `entries` (as [`write_tar`]; contents from their sources).
fn write_tar_entries(
    entries: Vec<fsutil::send::Entry>,
    epoch: Option<i64>,
    w: ChunkWriter,
) -> Result<()> {
    use fsutil::filemode::FileKind;
    let mut b = tar::Builder::new(w);
    b.follow_symlinks(false);
    let tar_err = |p: &str, e: std::io::Error| Error::internal(format!("write tar entry {p}: {e}"));
    for fsutil::send::Entry { stat: st, content } in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(fsutil::filemode::posix_perm_from_go_mode(st.mode));
        h.set_uid(st.uid as u64);
        h.set_gid(st.gid as u64);
        let mtime = match epoch {
            Some(e) => e.max(0) as u64,
            None => (st.mod_time.div_euclid(1_000_000_000)).max(0) as u64,
        };
        h.set_mtime(mtime);
        if !st.xattrs.is_empty() {
            let pax: Vec<(String, Vec<u8>)> = st
                .xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.clone()))
                .collect();
            b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .map_err(|e| tar_err(&st.path, e))?;
        }
        let path = st.path.clone();
        if st.is_hardlink() {
            h.set_entry_type(tar::EntryType::Link);
            h.set_size(0);
            b.append_link(&mut h, &path, &st.linkname)
                .map_err(|e| tar_err(&path, e))?;
            continue;
        }
        match st.kind() {
            FileKind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, format!("{path}/"), std::io::empty())
                    .map_err(|e| tar_err(&path, e))?;
            }
            FileKind::Symlink => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, &path, &st.linkname)
                    .map_err(|e| tar_err(&path, e))?;
            }
            FileKind::Regular | FileKind::Irregular => {
                h.set_entry_type(tar::EntryType::Regular);
                match content {
                    fsutil::send::Source::Data(data) => {
                        h.set_size(data.len() as u64);
                        b.append_data(&mut h, &path, &data[..])
                            .map_err(|e| tar_err(&path, e))?;
                    }
                    fsutil::send::Source::Path(full) => {
                        let f = std::fs::File::open(full).map_err(|e| tar_err(&path, e))?;
                        let len = f.metadata().map_err(|e| tar_err(&path, e))?.len();
                        h.set_size(len);
                        b.append_data(&mut h, &path, std::io::Read::take(f, len))
                            .map_err(|e| tar_err(&path, e))?;
                    }
                    fsutil::send::Source::None => {
                        h.set_size(0);
                        b.append_data(&mut h, &path, std::io::empty())
                            .map_err(|e| tar_err(&path, e))?;
                    }
                }
            }
            FileKind::CharDevice | FileKind::BlockDevice | FileKind::NamedPipe => {
                h.set_entry_type(match st.kind() {
                    FileKind::CharDevice => tar::EntryType::Char,
                    FileKind::BlockDevice => tar::EntryType::Block,
                    _ => tar::EntryType::Fifo,
                });
                h.set_size(0);
                h.set_device_major(st.devmajor as u32)
                    .map_err(|e| tar_err(&path, e))?;
                h.set_device_minor(st.devminor as u32)
                    .map_err(|e| tar_err(&path, e))?;
                b.append_data(&mut h, &path, std::io::empty())
                    .map_err(|e| tar_err(&path, e))?;
            }
            FileKind::Socket => {}
        }
    }
    let mut w = b.into_inner().map_err(|e| tar_err("<end>", e))?;
    w.flush().map_err(|e| tar_err("<end>", e))?;
    Ok(())
}

/// One completed status line per exported layer: its size when sent, or that `place` already
/// had it (the docker archive for the Engine and the client's content store say the same).
fn layer_status(
    progress: &Progress,
    vertex: &str,
    started: SystemTime,
    diff_id: &str,
    size: u64,
    sent: bool,
    place: &str,
) {
    let id = if sent {
        format!("layer {diff_id}: {size} bytes")
    } else {
        format!("layer {diff_id}: already {place}, {size} bytes not sent")
    };
    progress.status(
        vertex,
        &id,
        "",
        size as i64,
        size as i64,
        Some(started),
        Some(SystemTime::now()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exporter_types() {
        assert_eq!(parse_exporter("").unwrap(), ExporterKind::None);
        assert_eq!(
            parse_exporter("local").unwrap(),
            ExporterKind::Client(ClientExporter::Local)
        );
        assert_eq!(
            parse_exporter("tar").unwrap(),
            ExporterKind::Client(ClientExporter::Tar)
        );
        assert_eq!(
            tonic::Status::from(parse_exporter("bogus").unwrap_err()).code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(parse_exporter("image").unwrap(), ExporterKind::Image);
        assert_eq!(parse_exporter("moby").unwrap(), ExporterKind::Image);
        assert_eq!(
            parse_exporter("docker").unwrap(),
            ExporterKind::Client(ClientExporter::Docker)
        );
        assert_eq!(
            parse_exporter("oci").unwrap(),
            ExporterKind::Client(ClientExporter::Oci)
        );
    }

    #[test]
    fn tar_chunks_are_bounded_and_complete() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("dir")).unwrap();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(d.path().join("dir/big"), &big).unwrap();
        std::os::unix::fs::symlink("dir/big", d.path().join("link")).unwrap();
        std::fs::hard_link(d.path().join("dir/big"), d.path().join("hard")).unwrap();
        let (tx, mut rx) = mpsc::channel(1000);
        write_tar(d.path(), Some(1234), ChunkWriter::new(tx)).unwrap();
        let mut all = Vec::new();
        while let Ok(c) = rx.try_recv() {
            assert!(c.len() <= TAR_CHUNK);
            all.extend_from_slice(&c);
        }
        let mut a = tar::Archive::new(&all[..]);
        let mut seen = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let p = e.path().unwrap().to_string_lossy().into_owned();
            assert_eq!(e.header().mtime().unwrap(), 1234);
            if p == "dir/big" {
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut v).unwrap();
                assert_eq!(v, big);
            }
            seen.push((p, e.header().entry_type()));
        }
        assert_eq!(
            seen,
            vec![
                ("dir/".to_string(), tar::EntryType::Directory),
                ("dir/big".to_string(), tar::EntryType::Regular),
                ("hard".to_string(), tar::EntryType::Link),
                ("link".to_string(), tar::EntryType::Symlink),
            ]
        );
    }
}
