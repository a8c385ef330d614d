//! A streaming docker-archive (`docker save` format) writer that carries only some layer tars.
//!
//! Layout written, in this order:
//!
//! ```text
//! <diffID-hex>/layer.tar   one per layer that must travel, in chain order, each unique path once
//! <configID-hex>.json      the image config bytes
//! manifest.json            [{"Config":…,"RepoTags":[…],"Layers":[every layer's path, bottom→top]}]
//! ```
//!
//! With an [`OciLayout`] (the `type=docker` client output) the archive is at the same time an OCI
//! image layout, as buildkitd's `docker` exporter writes it: every blob lives under its digest,
//!
//! ```text
//! blobs/ blobs/sha256/           directories
//! blobs/sha256/<diffID-hex>      one uncompressed layer tar per layer that must travel
//! blobs/sha256/<configID-hex>    the image config
//! blobs/sha256/<manifest-hex>    the Docker schema 2 manifest (uncompressed layers)
//! index.json                     the manifest's descriptor, one per name
//! manifest.json                  as above, with `blobs/sha256/…` paths
//! oci-layout                     {"imageLayoutVersion":"1.0.0"}
//! ```
//!
//! The manifest always lists every layer; a layer whose tar is left out must already be present in
//! the receiving Docker Engine, which looks it up by chainID and never opens the file (see
//! `shared/spec/docker-store.md` §2). Layer tars are streamed from their [`LayerSource`] straight
//! into the output: nothing is buffered beyond one copy buffer, and the size each source produces
//! is checked against the size declared in the tar header.

use std::io::{self, Write};
use std::sync::Arc;

use serde::Serialize;

use crate::image::ImageConfig;
use crate::{Error, Result};

/// Something that can write a layer's uncompressed tar on demand.
pub trait LayerSource: Send + Sync {
    /// Writes the whole layer tar to `out`. The bytes must hash to the layer's diffID and their
    /// count must equal the size announced for the layer.
    fn write_tar(&self, out: &mut dyn Write) -> io::Result<()>;
}

/// One layer of an exported image, bottom to top.
#[derive(Clone)]
pub struct ExportLayer {
    /// `sha256:<hex>` of the uncompressed tar.
    pub diff_id: String,
    /// Size of the uncompressed tar in bytes.
    pub size: u64,
    /// Where its tar comes from; `None` for a layer berth never holds (it came from Docker).
    pub source: Option<Arc<dyn LayerSource>>,
}

impl std::fmt::Debug for ExportLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportLayer")
            .field("diff_id", &self.diff_id)
            .field("size", &self.size)
            .field("has_source", &self.source.is_some())
            .finish()
    }
}

/// Counts of what an archive carried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveStats {
    /// diffIDs whose tars were written.
    pub layers_sent: Vec<String>,
    /// Sum of the sizes of the tars written.
    pub layer_bytes_sent: u64,
    /// All bytes written, headers included.
    pub archive_bytes: u64,
}

#[derive(Serialize)]
pub(crate) struct ManifestEntry<'a> {
    #[serde(rename = "Config")]
    pub(crate) config: String,
    /// `null` without names, as Go writes a nil slice.
    #[serde(rename = "RepoTags")]
    pub(crate) repo_tags: Option<&'a [String]>,
    #[serde(rename = "Layers")]
    pub(crate) layers: Vec<String>,
}

fn layer_path(diff_id: &str, oci: bool) -> String {
    if oci {
        return crate::oci::blob_path(diff_id);
    }
    format!(
        "{}/layer.tar",
        diff_id.strip_prefix("sha256:").unwrap_or(diff_id)
    )
}

/// The OCI image layout documents a docker-archive carries too (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct OciLayout<'a> {
    /// The image manifest's bytes (its blob).
    pub manifest: &'a [u8],
    /// `index.json`.
    pub index: &'a [u8],
}

/// Writes a docker-archive to `out`. `include[i]` says whether layer `i`'s tar travels; a layer
/// that must travel needs a source. With `oci`, the archive is an OCI image layout too.
pub fn write_docker_archive(
    out: &mut dyn Write,
    config: &ImageConfig,
    layers: &[ExportLayer],
    include: &[bool],
    repo_tags: &[String],
    oci: Option<OciLayout<'_>>,
) -> Result<ArchiveStats> {
    assert_eq!(layers.len(), include.len(), "one include flag per layer");
    let mut out = CountingWriter::new(out);
    let mut stats = ArchiveStats::default();
    let mut written = std::collections::HashSet::new();
    let mut sent = Vec::new();
    for (layer, &inc) in layers.iter().zip(include) {
        let path = layer_path(&layer.diff_id, oci.is_some());
        if inc && written.insert(path.clone()) {
            sent.push((path, layer));
        }
    }
    let config_name = match oci {
        Some(_) => crate::oci::blob_path(&config.digest),
        None => format!(
            "{}.json",
            config
                .digest
                .strip_prefix("sha256:")
                .unwrap_or(&config.digest)
        ),
    };
    let manifest = [ManifestEntry {
        config: config_name.clone(),
        repo_tags: (!repo_tags.is_empty()).then_some(repo_tags),
        layers: layers
            .iter()
            .map(|l| layer_path(&l.diff_id, oci.is_some()))
            .collect(),
    }];
    let manifest = serde_json::to_vec(&manifest).map_err(|source| Error::ImageConfig {
        what: "encode manifest.json",
        source,
    })?;
    match oci {
        None => {
            for (path, layer) in sent {
                write_dir(&mut out, path.trim_end_matches("layer.tar"))?;
                write_layer(&mut out, &path, layer, 0o644, &mut stats)?;
            }
            write_file(&mut out, &config_name, &config.bytes, 0o644)?;
            write_file(&mut out, "manifest.json", &manifest, 0o644)?;
        }
        Some(l) => {
            // An OCI layout as buildkitd's docker exporter writes it: blobs read-only and in
            // name order (containerd's archive exporter sorts its records), then the documents.
            write_dir(&mut out, "blobs/")?;
            write_dir(&mut out, "blobs/sha256/")?;
            let manifest_path = crate::oci::blob_path(&crate::oci::sha256_digest(l.manifest));
            let mut blobs: Vec<(&str, Option<&ExportLayer>, &[u8])> = sent
                .iter()
                .map(|(p, layer)| (p.as_str(), Some(*layer), &[][..]))
                .collect();
            if !written.contains(&config_name) {
                blobs.push((&config_name, None, &config.bytes));
            }
            if !written.contains(&manifest_path) {
                blobs.push((&manifest_path, None, l.manifest));
            }
            blobs.sort_by(|a, b| a.0.cmp(b.0));
            for (path, layer, data) in blobs {
                match layer {
                    Some(layer) => write_layer(&mut out, path, layer, 0o444, &mut stats)?,
                    None => write_file(&mut out, path, data, 0o444)?,
                }
            }
            write_file(&mut out, "index.json", l.index, 0o644)?;
            write_file(&mut out, "manifest.json", &manifest, 0o644)?;
            write_file(&mut out, "oci-layout", crate::oci::OCI_LAYOUT, 0o444)?;
        }
    }
    finish(&mut out)?;
    stats.archive_bytes = out.count;
    Ok(stats)
}

/// Writes one layer's tar as the file `path` (header, data from its source, padding).
fn write_layer(
    out: &mut CountingWriter<'_>,
    path: &str,
    layer: &ExportLayer,
    mode: u32,
    stats: &mut ArchiveStats,
) -> Result<()> {
    let source = layer
        .source
        .as_ref()
        .ok_or_else(|| Error::LayerUnavailable {
            diff_id: layer.diff_id.clone(),
        })?;
    write_header(out, path, layer.size, mode)?;
    let start = out.count;
    source.write_tar(out).map_err(|source| Error::LayerStream {
        diff_id: layer.diff_id.clone(),
        source,
    })?;
    let produced = out.count - start;
    if produced != layer.size {
        return Err(Error::LayerSizeMismatch {
            diff_id: layer.diff_id.clone(),
            expected: layer.size,
            found: produced,
        });
    }
    pad(out, layer.size)?;
    stats.layers_sent.push(layer.diff_id.clone());
    stats.layer_bytes_sent += layer.size;
    Ok(())
}

/// Ends an archive: two zero blocks, then a flush.
pub(crate) fn finish(out: &mut dyn Write) -> Result<()> {
    out.write_all(&[0u8; 1024]).map_err(archive_io)?;
    out.flush().map_err(archive_io)
}

fn archive_io(source: io::Error) -> Error {
    Error::ArchiveWrite { source }
}

/// A ustar header as Go's `archive/tar` writes it for buildkitd's archives: every numeric field
/// written (device numbers `0000000`), the checksum as six octal digits, NUL, space.
fn header(path: &str, size: u64, kind: tar::EntryType, mode: u32) -> Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path).map_err(archive_io)?;
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(kind);
    h.set_device_major(0).map_err(archive_io)?;
    h.set_device_minor(0).map_err(archive_io)?;
    let bytes = h.as_mut_bytes();
    bytes[148..156].fill(b' ');
    let sum: u32 = bytes.iter().map(|&b| u32::from(b)).sum();
    bytes[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    Ok(h)
}

/// Writes a directory entry (`path` ends with `/`).
pub(crate) fn write_dir(out: &mut dyn Write, path: &str) -> Result<()> {
    let h = header(path, 0, tar::EntryType::Directory, 0o755)?;
    out.write_all(h.as_bytes()).map_err(archive_io)
}

/// Writes the header of a regular file of `size` bytes; its data and [`pad`] must follow.
pub(crate) fn write_header(out: &mut dyn Write, path: &str, size: u64, mode: u32) -> Result<()> {
    let h = header(path, size, tar::EntryType::Regular, mode)?;
    out.write_all(h.as_bytes()).map_err(archive_io)
}

/// Pads a file of `size` bytes to the next 512-byte block.
pub(crate) fn pad(out: &mut dyn Write, size: u64) -> Result<()> {
    let rem = (size % 512) as usize;
    if rem != 0 {
        out.write_all(&[0u8; 512][..512 - rem])
            .map_err(archive_io)?;
    }
    Ok(())
}

/// Writes a whole small file.
pub(crate) fn write_file(out: &mut dyn Write, path: &str, data: &[u8], mode: u32) -> Result<()> {
    write_header(out, path, data.len() as u64, mode)?;
    out.write_all(data).map_err(archive_io)?;
    pad(out, data.len() as u64)
}

/// A writer that counts the bytes it passes on.
pub(crate) struct CountingWriter<'a> {
    inner: &'a mut dyn Write,
    count: u64,
}

impl<'a> CountingWriter<'a> {
    pub(crate) fn new(inner: &'a mut dyn Write) -> Self {
        CountingWriter { inner, count: 0 }
    }
}

impl Write for CountingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Bytes(Vec<u8>);
    impl LayerSource for Bytes {
        fn write_tar(&self, out: &mut dyn Write) -> io::Result<()> {
            out.write_all(&self.0)
        }
    }

    fn cfg() -> ImageConfig {
        ImageConfig {
            bytes: b"{}".to_vec(),
            digest: format!("sha256:{}", "c".repeat(64)),
        }
    }

    fn layer(n: u8, len: usize) -> ExportLayer {
        ExportLayer {
            diff_id: format!("sha256:{}", hex::encode([n; 32])),
            size: len as u64,
            source: Some(Arc::new(Bytes(vec![n; len]))),
        }
    }

    #[test]
    fn thin_archive_lists_all_layers_but_carries_only_included() {
        let layers = [layer(1, 700), layer(2, 512), layer(3, 1)];
        let mut buf = Vec::new();
        let stats = write_docker_archive(
            &mut buf,
            &cfg(),
            &layers,
            &[false, true, true],
            &["a:b".into()],
            None,
        )
        .unwrap();
        assert_eq!(
            stats.layers_sent,
            vec![layers[1].diff_id.clone(), layers[2].diff_id.clone()]
        );
        assert_eq!(stats.layer_bytes_sent, 513);
        assert_eq!(stats.archive_bytes, buf.len() as u64);

        let mut ar = tar::Archive::new(&buf[..]);
        let mut names = Vec::new();
        let mut manifest = None;
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            if name == "manifest.json" {
                let mut s = String::new();
                io::Read::read_to_string(&mut e, &mut s).unwrap();
                manifest = Some(s);
            } else if name.ends_with("layer.tar") {
                let mut data = Vec::new();
                io::Read::read_to_end(&mut e, &mut data).unwrap();
                assert!(data.iter().all(|b| *b == data[0]));
            }
            names.push(name);
        }
        assert!(!names.iter().any(|n| n.starts_with(&hex::encode([1u8; 32]))));
        let m: serde_json::Value = serde_json::from_str(&manifest.unwrap()).unwrap();
        assert_eq!(m[0]["Layers"].as_array().unwrap().len(), 3);
        assert_eq!(m[0]["RepoTags"][0], "a:b");
        assert_eq!(m[0]["Config"], format!("{}.json", "c".repeat(64)));
    }

    #[test]
    fn wrong_source_size_is_an_error_naming_the_layer() {
        let mut l = layer(1, 10);
        l.size = 11;
        let err =
            write_docker_archive(&mut Vec::new(), &cfg(), &[l], &[true], &[], None).unwrap_err();
        assert!(err.to_string().contains(&hex::encode([1u8; 32])), "{err}");
    }

    #[test]
    fn included_layer_without_source_is_an_error() {
        let mut l = layer(1, 10);
        l.source = None;
        let err =
            write_docker_archive(&mut Vec::new(), &cfg(), &[l], &[true], &[], None).unwrap_err();
        assert!(matches!(err, Error::LayerUnavailable { .. }), "{err}");
    }
}
