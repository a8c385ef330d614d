//! From a solved layer chain to exportable layers: a diffID, a size and a way to produce the
//! exact tar for every layer, whoever owns it.
//!
//! - A **berth layer** (`layers/<id>/diff` under berth's root, overlay format) is written by
//!   `layerstore::tar::write_layer`. Its diffID, size and tar-split are computed once, by one
//!   hashing pass that keeps no bytes, and remembered in the layer's metadata (tar-split next to
//!   the layer, for the offline Docker writer); later exports reuse them. The tar is
//!   deterministic, so a second pass gives the bytes the diffID promises.
//! - A **Docker layer** is never re-tarred: its original bytes are reassembled from Docker's own
//!   `tar-split.json.gz` and the files of its diff dir, as `docker save` does, so the result
//!   hashes to the diffID Docker recorded. Live exports into the same Docker never open it.
//! - A **layer of the Engine's containerd store** (a base image used in place) stays there for
//!   `type=image`; outputs that carry its tar ([`export_layer_tars`]) stream its blob from
//!   containerd's content store ([`containerdstore::content_blob_path`]), decompressing on the
//!   fly and checking the result against the diffID. A compressed blob's uncompressed size (the
//!   tar header and the manifest need it first) costs one decompression pass, remembered per
//!   blob for the life of the process.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use layerstore::snapshot::{
    BlobDescriptor, DockerLayer, LayerId, LayerMeta, LayerRef, SnapshotStore,
};
use layerstore::tar::{write_layer, WriteOptions};
use registry::{Compression, LayerVerifier};
use serde::Deserialize;

use crate::archive::{ExportLayer, LayerSource};
use crate::{Error, Result};

/// Turns a chain into exportable layers, computing missing diffIDs (blocking: may read whole
/// layers once). `in_docker[i]` is true for layers that came from Docker's store.
pub fn export_layers(
    store: &SnapshotStore,
    chain: &[LayerRef],
) -> Result<(Vec<ExportLayer>, Vec<bool>)> {
    let mut layers = Vec::with_capacity(chain.len());
    let mut in_docker = Vec::with_capacity(chain.len());
    for l in chain {
        match l {
            LayerRef::Berth(id) => {
                layers.push(berth_layer(store, id)?);
                in_docker.push(false);
            }
            LayerRef::Docker(d) => {
                layers.push(docker_layer(d)?);
                in_docker.push(true);
            }
        }
    }
    Ok((layers, in_docker))
}

/// [`export_layers`] for outputs that carry every layer's tar (`type=docker`, `type=oci`,
/// pushes, cache exports): layers of the Engine's containerd store get a source too, reading
/// their blob from containerd's content store (module docs). Blocking.
pub fn export_layer_tars(
    store: &SnapshotStore,
    chain: &[LayerRef],
) -> Result<(Vec<ExportLayer>, Vec<bool>)> {
    let (mut layers, in_docker) = export_layers(store, chain)?;
    for (l, r) in layers.iter_mut().zip(chain) {
        if let (LayerRef::Docker(d), None) = (r, &l.source) {
            if let Some(blob) = &d.blob {
                *l = containerd_layer(d, blob)?;
            }
        }
    }
    Ok((layers, in_docker))
}

/// Uncompressed sizes of compressed containerd blobs, by blob digest (module docs).
static BLOB_TAR_SIZES: std::sync::Mutex<Option<std::collections::HashMap<String, u64>>> =
    std::sync::Mutex::new(None);

fn containerd_layer(d: &DockerLayer, blob: &BlobDescriptor) -> Result<ExportLayer> {
    let fail = |message: String| Error::ContainerdBlob {
        diff_id: d.diff_id.clone(),
        blob: blob.digest.clone(),
        message,
    };
    let path = containerdstore::content_blob_path(&d.diff_dir, &blob.digest).ok_or_else(|| {
        fail(format!(
            "its snapshot {} is not in an overlayfs snapshotter directory next to a content store",
            d.diff_dir.display()
        ))
    })?;
    let compression = Compression::from_media_type(&blob.media_type)
        .ok_or_else(|| fail(format!("unsupported layer media type {}", blob.media_type)))?;
    let source = ContainerdBlobTar {
        path,
        compression,
        diff_id: d.diff_id.clone(),
        blob: blob.digest.clone(),
    };
    let size = match compression {
        Compression::Uncompressed => blob.size,
        _ => {
            let known = BLOB_TAR_SIZES
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .and_then(|m| m.get(&blob.digest).copied());
            match known {
                Some(n) => n,
                None => {
                    let n = source
                        .write_tar(&mut io::sink())
                        .map_err(|e| fail(e.to_string()))?;
                    BLOB_TAR_SIZES
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert_with(Default::default)
                        .insert(blob.digest.clone(), n);
                    n
                }
            }
        }
    };
    Ok(ExportLayer {
        diff_id: d.diff_id.clone(),
        size,
        source: Some(Arc::new(source)),
    })
}

/// A base layer's tar, decompressed from its blob in containerd's content store.
struct ContainerdBlobTar {
    path: PathBuf,
    compression: Compression,
    diff_id: String,
    blob: String,
}

impl ContainerdBlobTar {
    /// Streams the tar into `out` and returns its length; fails when the blob does not
    /// decompress to the diffID.
    fn write_tar(&self, out: &mut dyn Write) -> io::Result<u64> {
        let file = File::open(&self.path)
            .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", self.path.display())))?;
        let mut tar = LayerVerifier::decompressed(
            file,
            self.compression,
            &self.diff_id,
            format!("blob {}", self.blob),
        )?;
        io::copy(&mut tar, out)
    }
}

impl LayerSource for ContainerdBlobTar {
    fn write_tar(&self, out: &mut dyn Write) -> io::Result<()> {
        ContainerdBlobTar::write_tar(self, out).map(|_| ())
    }
}

/// When a layer was created, as image history reports it. A berth layer: the mtime of its tree's
/// root directory (layers are immutable once committed, and an imported layer's root gets the
/// cache's creation time), so it is stable across exports, which keeps the image config (and so
/// the image ID) of a fully cached rebuild identical, as with BuildKit. A Docker layer: the time
/// berth recorded for its chainID (an imported cache's, when the cache's chain was found in
/// Docker and used in place), else its diff dir's mtime (when Docker registered it).
pub fn layer_created(
    store: &SnapshotStore,
    layer: &LayerRef,
) -> Option<chrono::DateTime<chrono::Utc>> {
    let dir = match layer {
        LayerRef::Berth(id) => berth_layer_dir(store, id),
        LayerRef::Docker(d) => {
            if let Ok(Some(t)) = store.docker_layer_created_at(&d.chain_id) {
                return Some(t);
            }
            d.diff_dir.clone()
        }
    };
    let modified = std::fs::metadata(dir).and_then(|m| m.modified()).ok()?;
    Some(chrono::DateTime::<chrono::Utc>::from(modified))
}

/// The tree of a berth layer.
pub fn berth_layer_dir(store: &SnapshotStore, id: &LayerId) -> PathBuf {
    store.layer_path(id).join("diff")
}

/// Removes tar-split temp files that a killed berthd left in a layer dir (those of other pids;
/// this process's are in use by concurrent exports).
fn remove_dead_split_temps(layer_dir: &Path) {
    let own = format!(".tar-split.{}.", std::process::id());
    let Ok(rd) = std::fs::read_dir(layer_dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".tar-split.") && name.ends_with(".tmp") && !name.starts_with(&own) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn berth_layer(store: &SnapshotStore, id: &LayerId) -> Result<ExportLayer> {
    let dir = berth_layer_dir(store, id);
    let opts = store
        .layer_write_options(id)
        .map_err(|source| Error::Store {
            what: format!("layer {id} tar options"),
            source,
        })?;
    let meta = store.layer_meta(id).map_err(|source| Error::Store {
        what: format!("layer {id} metadata"),
        source,
    })?;
    let (diff_id, size) = match (&meta.diff_id, meta.tar_size) {
        (Some(d), Some(s)) if meta.has_tar_split => (d.clone(), s),
        _ => {
            // One hashing pass; the tar-split goes next to the layer (temp + rename, so a
            // concurrent export of the same layer never sees half a file). Each call has its own
            // temp name: concurrent exports of one layer in this process each write theirs and
            // the last rename wins (the contents are identical).
            let split_path = store.layer_path(id).join("tar-split.json.gz");
            remove_dead_split_temps(&store.layer_path(id));
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let tmp = store
                .layer_path(id)
                .join(format!(".tar-split.{}.{n}.tmp", std::process::id()));
            let mut split = File::create(&tmp).map_err(|source| Error::Io {
                what: "create",
                path: tmp.clone(),
                source,
            })?;
            let digest =
                write_layer(&dir, io::sink(), Some(&mut split), &opts).map_err(|source| {
                    Error::Store {
                        what: format!("tar of layer {id}"),
                        source,
                    }
                })?;
            split.sync_all().map_err(|source| Error::Io {
                what: "fsync",
                path: tmp.clone(),
                source,
            })?;
            std::fs::rename(&tmp, &split_path).map_err(|source| Error::Io {
                what: "rename",
                path: tmp,
                source,
            })?;
            let diff_id = digest.diff_id.to_string();
            store
                .set_layer_meta(
                    id,
                    LayerMeta {
                        diff_id: Some(diff_id.clone()),
                        tar_size: Some(digest.size),
                        has_tar_split: true,
                    },
                )
                .map_err(|source| Error::Store {
                    what: format!("layer {id} metadata"),
                    source,
                })?;
            (diff_id, digest.size)
        }
    };
    Ok(ExportLayer {
        diff_id,
        size,
        source: Some(Arc::new(BerthLayerTar {
            dir,
            opts,
            expect: size,
        })),
    })
}

struct BerthLayerTar {
    dir: PathBuf,
    opts: WriteOptions,
    expect: u64,
}

impl LayerSource for BerthLayerTar {
    fn write_tar(&self, out: &mut dyn Write) -> io::Result<()> {
        let d = write_layer(&self.dir, out, None, &self.opts).map_err(io::Error::other)?;
        if d.size != self.expect {
            return Err(io::Error::other(format!(
                "layer {} changed since it was hashed ({} bytes, now {})",
                self.dir.display(),
                self.expect,
                d.size
            )));
        }
        Ok(())
    }
}

/// Docker's `layerdb/sha256/<chainID>` dir for one of its layers, derived from the diff dir
/// `<data-root>/<driver>/<cache-id>/diff`.
pub fn docker_layerdb_dir(d: &DockerLayer) -> Option<PathBuf> {
    let driver_dir = d.diff_dir.parent()?.parent()?;
    let driver = driver_dir.file_name()?;
    let data_root = driver_dir.parent()?;
    let hex = d.chain_id.strip_prefix("sha256:").unwrap_or(&d.chain_id);
    Some(
        data_root
            .join("image")
            .join(driver)
            .join("layerdb")
            .join("sha256")
            .join(hex),
    )
}

fn docker_layer(d: &DockerLayer) -> Result<ExportLayer> {
    if let Some(blob) = &d.blob {
        // A layer of the Engine's containerd store: it stays there (its blob and snapshot);
        // its size here is the blob's.
        return Ok(ExportLayer {
            diff_id: d.diff_id.clone(),
            size: blob.size,
            source: None,
        });
    }
    let db = docker_layerdb_dir(d).ok_or_else(|| Error::Io {
        what: "locate layerdb of",
        path: d.diff_dir.clone(),
        source: io::Error::from(io::ErrorKind::NotFound),
    })?;
    let split = db.join("tar-split.json.gz");
    let size = tar_split_size(&split)?;
    Ok(ExportLayer {
        diff_id: d.diff_id.clone(),
        size,
        source: Some(Arc::new(TarSplitTar {
            split,
            diff_dir: d.diff_dir.clone(),
        })),
    })
}

#[derive(Deserialize)]
struct Entry {
    #[serde(rename = "type")]
    kind: u8,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    name_raw: Option<String>,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    payload: Option<String>,
}

fn b64(s: &str) -> io::Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(io::Error::other)
}

fn for_each_entry(split: &Path, mut f: impl FnMut(Entry) -> io::Result<()>) -> io::Result<()> {
    let file = File::open(split)?;
    let reader = BufReader::new(flate2::read::GzDecoder::new(file));
    for line in reader.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let e: Entry = serde_json::from_str(&line).map_err(io::Error::other)?;
        f(e)?;
    }
    Ok(())
}

/// Length of the tar a tar-split file describes.
fn tar_split_size(split: &Path) -> Result<u64> {
    let mut size = 0u64;
    for_each_entry(split, |e| {
        match e.kind {
            1 => size += e.size,
            2 => size += b64(e.payload.as_deref().unwrap_or(""))?.len() as u64,
            k => {
                return Err(io::Error::other(format!(
                    "unknown tar-split entry type {k}"
                )))
            }
        }
        Ok(())
    })
    .map_err(|source| Error::Io {
        what: "read tar-split",
        path: split.to_path_buf(),
        source,
    })?;
    Ok(size)
}

/// Docker's original layer bytes, reassembled from tar-split and the diff dir.
struct TarSplitTar {
    split: PathBuf,
    diff_dir: PathBuf,
}

impl LayerSource for TarSplitTar {
    fn write_tar(&self, out: &mut dyn Write) -> io::Result<()> {
        let root = File::open(&self.diff_dir)?;
        let mut buf = vec![0u8; 1 << 20];
        for_each_entry(&self.split, |e| match e.kind {
            2 => out.write_all(&b64(e.payload.as_deref().unwrap_or(""))?),
            1 if e.size == 0 => Ok(()),
            1 => {
                let name = match (&e.name_raw, &e.name) {
                    (Some(raw), _) => b64(raw)?,
                    (None, Some(n)) => n.clone().into_bytes(),
                    (None, None) => {
                        return Err(io::Error::other("tar-split file entry without a name"))
                    }
                };
                let mut f = open_in_root(&root, &name)?;
                let mut left = e.size;
                while left > 0 {
                    let want = buf.len().min(left as usize);
                    let n = f.read(&mut buf[..want])?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "{} is shorter than its tar entry",
                                String::from_utf8_lossy(&name)
                            ),
                        ));
                    }
                    out.write_all(&buf[..n])?;
                    left -= n as u64;
                }
                Ok(())
            }
            k => Err(io::Error::other(format!(
                "unknown tar-split entry type {k}"
            ))),
        })
    }
}

/// Opens `name` (a path from the tar) for reading, resolved inside `root` (no `..` or symlink
/// escapes).
fn open_in_root(root: &File, name: &[u8]) -> io::Result<File> {
    use std::os::unix::ffi::OsStrExt;
    let path = Path::new(std::ffi::OsStr::from_bytes(name));
    let how = rustix::fs::ResolveFlags::IN_ROOT | rustix::fs::ResolveFlags::NO_MAGICLINKS;
    let fd = layerstore::openat2_retry(
        root.as_fd(),
        path,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC | rustix::fs::OFlags::NOFOLLOW,
        rustix::fs::Mode::empty(),
        how,
    )
    .map_err(io::Error::from)?;
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layerdb_dir_is_derived_from_the_diff_dir() {
        let d = DockerLayer {
            chain_id: format!("sha256:{}", "a".repeat(64)),
            diff_id: String::new(),
            diff_dir: PathBuf::from("/var/lib/docker/fuse-overlayfs/abc/diff"),
            whiteouts: layerstore::snapshot::WhiteoutFormat::Aufs,
            blob: None,
        };
        assert_eq!(
            docker_layerdb_dir(&d).unwrap(),
            PathBuf::from(format!(
                "/var/lib/docker/image/fuse-overlayfs/layerdb/sha256/{}",
                "a".repeat(64)
            ))
        );
    }
}
