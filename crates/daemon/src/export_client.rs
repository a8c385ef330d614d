//! Exporters that stream the result to the client: `type=local` (a directory, fsutil packets over
//! `FileSend`) and `type=tar` (a tarball, raw bytes over `FileSend`). Image exporters live in the
//! `exporter` crate.
//!
//! Progress follows buildkitd (`control-api.md` §8.3): a synthetic vertex with digest
//! `sha256(<session>-export)` named `exporting to client directory` / `exporting to client tarball`,
//! with one status (`copying files` / `sending tarball`, action `transferring`, bytes so far).

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

/// Parses an exporter type; unknown types are `InvalidArgument`, `docker`/`oci` (not available yet) `Unimplemented`.
pub fn parse_exporter(ty: &str) -> Result<ExporterKind> {
    match ty {
        "" => Ok(ExporterKind::None),
        "local" => Ok(ExporterKind::Client(ClientExporter::Local)),
        "tar" => Ok(ExporterKind::Client(ClientExporter::Tar)),
        "docker" => Ok(ExporterKind::Client(ClientExporter::Docker)),
        "image" | "moby" => Ok(ExporterKind::Image),
        "oci" => Err(Error::unimplemented(format!(
            "exporter {ty:?} is not supported by berthd yet"
        ))),
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

/// Exports `fs` through `session` and returns the exporter response (empty for these types).
pub async fn export(
    backend: &Arc<Backend>,
    session: &Arc<Session>,
    progress: &Arc<Progress>,
    kind: ClientExporter,
    attrs: &BTreeMap<String, String>,
    metadata: &BTreeMap<String, Bytes>,
    fs: &FsRef,
) -> Result<BTreeMap<String, String>> {
    let epoch = source_date_epoch(attrs)?;
    let vertex = synthetic_digest(&format!("{}-export", session.id));
    let (name, status) = match kind {
        ClientExporter::Local => ("exporting to client directory", "copying files"),
        ClientExporter::Tar => ("exporting to client tarball", "sending tarball"),
        ClientExporter::Docker => ("exporting to docker image format", "sending tarball"),
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
        if kind == ClientExporter::Docker {
            return send_docker(backend, session, attrs, metadata, epoch, fs, report.clone()).await;
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
            ClientExporter::Docker => unreachable!("handled above"),
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

/// `type=docker`: the image as a complete docker-archive streamed to the client (which writes it
/// to `dest` or stdout, for `docker load`). Layers come from the layer store and Docker's own
/// store (exact bytes via tar-split), one at a time; nothing is buffered whole.
async fn send_docker(
    backend: &Arc<Backend>,
    session: &Arc<Session>,
    attrs: &BTreeMap<String, String>,
    metadata: &BTreeMap<String, Bytes>,
    epoch: Option<i64>,
    fs: &FsRef,
    report: Arc<dyn Fn(u64, bool) + Send + Sync>,
) -> Result<BTreeMap<String, String>> {
    let chain = match fs {
        FsRef::Scratch => Vec::new(),
        FsRef::Solved(r) => r.chain().layers().to_vec(),
    };
    let names = crate::export_image::names(attrs, metadata);
    let config = metadata.get("containerimage.config").map(|b| b.to_vec());
    let epoch = match epoch {
        None => None,
        Some(e) => Some(
            chrono::DateTime::from_timestamp(e, 0)
                .ok_or_else(|| Error::invalid(format!("source-date-epoch {e} is out of range")))?,
        ),
    };
    let store = backend.store.clone();
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let counted = counted(rx, report);
    let producer = tokio::task::spawn_blocking(move || {
        let mut w = ChunkWriter::new(tx);
        let req = exporter::ImageExportRequest {
            chain: &chain,
            config: config.as_deref(),
            names,
            epoch,
        };
        let r = exporter::write_docker_image_archive(&store, &req, &mut w)
            .map_err(|e| Error::unavailable(format!("exporter docker: {e}")))?;
        w.flush()
            .map_err(|e| Error::unavailable(format!("exporter docker: {e}")))?;
        Ok::<_, Error>(r)
    });
    let send = calls::send_bytes(session, counted, &[]);
    let (sent, produced) = tokio::join!(send, producer);
    let produced = produced.map_err(|e| Error::internal(format!("docker archive task: {e}")))?;
    sent?;
    let r = produced?;
    let mut response = BTreeMap::new();
    response.insert("containerimage.digest".to_string(), r.manifest_digest);
    response.insert("containerimage.config.digest".to_string(), r.config_digest);
    response.insert("containerimage.descriptor".to_string(), r.descriptor);
    if !r.names.is_empty() {
        response.insert("image.name".to_string(), r.names.join(","));
    }
    Ok(response)
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
    sent?;
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
    use fsutil::filemode::FileKind;
    let mut b = tar::Builder::new(w);
    b.follow_symlinks(false);
    let tar_err = |p: &str, e: std::io::Error| Error::internal(format!("write tar entry {p}: {e}"));
    let mut entries = Vec::new();
    walk(
        root,
        &WalkOptions::default(),
        &mut |_| MapResult::Keep,
        &mut |st| {
            entries.push(st);
            Ok(())
        },
    )
    .map_err(|e| Error::fsutil("walk result for tar export", e))?;
    for st in entries {
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
                let f = std::fs::File::open(root.join(&path)).map_err(|e| tar_err(&path, e))?;
                let len = f.metadata().map_err(|e| tar_err(&path, e))?.len();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(len);
                b.append_data(&mut h, &path, std::io::Read::take(f, len))
                    .map_err(|e| tar_err(&path, e))?;
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
            tonic::Status::from(parse_exporter("oci").unwrap_err()).code(),
            tonic::Code::Unimplemented
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
