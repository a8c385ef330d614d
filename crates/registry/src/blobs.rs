//! Layer blobs on this side of the wire:
//!
//! - [`BlockingBlob`]: a [`BlobStream`] as a blocking `Read`, for the tar writers that run on the
//!   blocking pool;
//! - [`LayerVerifier`]: passes a compressed layer through unchanged while decompressing a copy
//!   into a hash, and fails at the end instead of finishing when the blob does not decompress
//!   or its content is not the diffID the config promised; [`LayerVerifier::decompressed`]
//!   yields the uncompressed tar instead, with the same checks;
//! - [`BlobCache`]: compressed layer blobs kept under berth's root, keyed by (diffID,
//!   compression), so a layer is compressed once for every push, `type=oci` export and cache
//!   export that needs it in that compression.
//!
//! Cache layout (under the directory given to [`BlobCache::open`]):
//!
//! ```text
//! sha256/<hex>                         a compressed blob, named by its digest
//! by-diffid/<diffid-hex>.<compression> JSON {"digest","size","level"}: the blob of that layer
//! by-diffid/<diffid-hex>.source        JSON: the registry descriptor the layer was pulled with
//! tmp/                                 blobs being written (removed at open)
//! ```
//!
//! Writers compress into `tmp/`, fsync, then rename into `sha256/` and write the index entry by
//! rename, so a reader sees a whole blob or none; concurrent writers of one layer each write
//! theirs and the last rename wins (same bytes for the same level). Nothing is ever modified in
//! place. Eviction is not done yet (the cache grows with every distinct layer pushed).

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::client::BlobStream;
use crate::{Error, Result};

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// A plain tar.
    Uncompressed,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// From a layer media type (Docker's or OCI's; foreign layers included).
    pub fn from_media_type(mt: &str) -> Option<Self> {
        if mt.ends_with("+gzip")
            || mt.ends_with(".tar.gzip")
            || mt == "application/vnd.docker.image.rootfs.diff.tar.gzip"
            || mt == "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
        {
            Some(Compression::Gzip)
        } else if mt.ends_with("+zstd") || mt.ends_with(".tar.zstd") {
            Some(Compression::Zstd)
        } else if mt.ends_with(".tar") || mt.ends_with("diff.tar") {
            Some(Compression::Uncompressed)
        } else {
            None
        }
    }

    /// From BuildKit's `compression` attribute value.
    pub fn from_attr(s: &str) -> Option<Self> {
        match s {
            "gzip" => Some(Compression::Gzip),
            "zstd" => Some(Compression::Zstd),
            "uncompressed" => Some(Compression::Uncompressed),
            _ => None,
        }
    }

    /// The attribute spelling (`gzip`, `zstd`, `uncompressed`).
    pub fn name(self) -> &'static str {
        match self {
            Compression::Uncompressed => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }

    /// The layer media type in an OCI (`oci = true`) or Docker manifest. zstd has no media type
    /// in the Docker image spec; BuildKit v0.11.6 writes `….diff.tar.zstd` there.
    pub fn layer_media_type(self, oci: bool) -> &'static str {
        match (self, oci) {
            (Compression::Uncompressed, true) => "application/vnd.oci.image.layer.v1.tar",
            (Compression::Gzip, true) => "application/vnd.oci.image.layer.v1.tar+gzip",
            (Compression::Zstd, true) => "application/vnd.oci.image.layer.v1.tar+zstd",
            (Compression::Uncompressed, false) => "application/vnd.docker.image.rootfs.diff.tar",
            (Compression::Gzip, false) => "application/vnd.docker.image.rootfs.diff.tar.gzip",
            (Compression::Zstd, false) => "application/vnd.docker.image.rootfs.diff.tar.zstd",
        }
    }

    /// Sniffs the compression from the first bytes of a blob.
    pub fn detect(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::Uncompressed
        }
    }
}

/// A [`BlobStream`] read synchronously. Must be used outside the async runtime's worker threads
/// (e.g. in `spawn_blocking`): each read blocks on the next chunk.
pub struct BlockingBlob {
    stream: BlobStream,
    handle: tokio::runtime::Handle,
    buf: Bytes,
    failed: Option<String>,
    /// The registry error that ended the stream, if any (the `io::Error` carries only its text).
    pub error: std::sync::Arc<std::sync::Mutex<Option<Error>>>,
}

impl BlockingBlob {
    /// Wraps `stream`, blocking on `handle` for each chunk.
    pub fn new(stream: BlobStream, handle: tokio::runtime::Handle) -> Self {
        BlockingBlob {
            stream,
            handle,
            buf: Bytes::new(),
            failed: None,
            error: Default::default(),
        }
    }
}

impl Read for BlockingBlob {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if let Some(m) = &self.failed {
            return Err(io::Error::other(m.clone()));
        }
        while self.buf.is_empty() {
            match self.handle.block_on(self.stream.next_chunk()) {
                Ok(Some(b)) => self.buf = b,
                Ok(None) => return Ok(0),
                Err(e) => {
                    let m = e.to_string();
                    self.failed = Some(m.clone());
                    *self.error.lock().unwrap() = Some(e);
                    return Err(io::Error::other(m));
                }
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        let _ = self.buf.split_to(n);
        Ok(n)
    }
}

struct HashWriter {
    hasher: Sha256,
    n: u64,
}

impl Write for HashWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.hasher.update(b);
        self.n += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Decoder {
    Plain(HashWriter),
    Gzip(Box<flate2::write::MultiGzDecoder<HashWriter>>),
    Zstd(Box<zstd::stream::write::Decoder<'static, HashWriter>>),
}

impl Decoder {
    fn new(c: Compression) -> io::Result<Self> {
        let h = HashWriter {
            hasher: Sha256::new(),
            n: 0,
        };
        Ok(match c {
            Compression::Uncompressed => Decoder::Plain(h),
            Compression::Gzip => Decoder::Gzip(Box::new(flate2::write::MultiGzDecoder::new(h))),
            Compression::Zstd => Decoder::Zstd(Box::new(zstd::stream::write::Decoder::new(h)?)),
        })
    }

    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            Decoder::Plain(h) => h.write_all(b),
            Decoder::Gzip(d) => d.write_all(b),
            Decoder::Zstd(d) => d.write_all(b),
        }
    }

    fn finish(self) -> io::Result<(String, u64)> {
        let h = match self {
            Decoder::Plain(h) => h,
            Decoder::Gzip(d) => d.finish()?,
            Decoder::Zstd(mut d) => {
                d.flush()?;
                d.into_inner()
            }
        };
        Ok((format!("sha256:{}", hex::encode(h.hasher.finalize())), h.n))
    }
}

/// Passes a compressed layer through while checking that it decompresses to `diff_id` (see the
/// module docs). The end of the inner reader is only reported once the check passed.
pub struct LayerVerifier<R> {
    inner: R,
    decoder: Option<Decoder>,
    diff_id: String,
    what: String,
    uncompressed: u64,
}

impl<R: Read> LayerVerifier<R> {
    /// Verifies `inner` (compressed as `compression`) against `diff_id`; `what` names the layer
    /// in errors (`layer sha256:… of docker.io/library/busybox:latest`).
    pub fn new(
        inner: R,
        compression: Compression,
        diff_id: &str,
        what: String,
    ) -> io::Result<Self> {
        Ok(LayerVerifier {
            inner,
            decoder: Some(Decoder::new(compression)?),
            diff_id: diff_id.to_string(),
            what,
            uncompressed: 0,
        })
    }

    /// Bytes of uncompressed tar seen (after the end).
    pub fn uncompressed_size(&self) -> u64 {
        self.uncompressed
    }

    /// The uncompressed tar of a compressed layer, checked against `diff_id` (the end is an
    /// error when it does not match).
    pub fn decompressed(
        inner: R,
        compression: Compression,
        diff_id: &str,
        what: String,
    ) -> io::Result<Box<dyn Read + Send>>
    where
        R: Send + 'static,
    {
        let dec: Box<dyn Read + Send> = match compression {
            Compression::Uncompressed => Box::new(inner),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(inner)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(inner)?),
        };
        Ok(Box::new(LayerVerifier::new(
            dec,
            Compression::Uncompressed,
            diff_id,
            what,
        )?))
    }
}

impl<R: Read> Read for LayerVerifier<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        let Some(dec) = self.decoder.as_mut() else {
            return Ok(n);
        };
        if n > 0 {
            dec.write_all(&out[..n]).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: does not decompress: {e}", self.what),
                )
            })?;
            return Ok(n);
        }
        let dec = self.decoder.take().expect("decoder present");
        let (found, size) = dec.finish().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: does not decompress: {e}", self.what),
            )
        })?;
        self.uncompressed = size;
        if found != self.diff_id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: content is {found}, the image config says {}",
                    self.what, self.diff_id
                ),
            ));
        }
        Ok(0)
    }
}

/// A compressed blob in the [`BlobCache`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedBlob {
    /// `sha256:…` of the compressed bytes.
    pub digest: String,
    /// Compressed size.
    pub size: u64,
    /// Compression level used (`None`: the default).
    #[serde(default)]
    pub level: Option<i32>,
    /// Where the bytes are.
    #[serde(skip)]
    pub path: PathBuf,
}

/// Where a layer came from: its descriptor in the registry it was pulled from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSourceRecord {
    /// The reference it was pulled with.
    pub reference: String,
    /// Layer media type there (compression, foreign or not).
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// Blob digest there.
    pub digest: String,
    /// Blob size.
    pub size: u64,
    /// URLs of a non-distributable (foreign) layer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
}

impl LayerSourceRecord {
    /// True for a non-distributable (foreign) layer.
    pub fn is_foreign(&self) -> bool {
        self.media_type.contains(".foreign.") || self.media_type.contains("nondistributable")
    }
}

/// Compressed layer blobs by (diffID, compression); see the module docs.
#[derive(Debug, Clone)]
pub struct BlobCache {
    dir: PathBuf,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

fn hex_of(d: &str) -> &str {
    d.strip_prefix("sha256:").unwrap_or(d)
}

impl BlobCache {
    /// Opens (creating) the cache in `dir`, removing unfinished temp files.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        for sub in ["sha256", "by-diffid", "tmp"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(io_err("create", &p))?;
        }
        let tmp = dir.join("tmp");
        if let Ok(rd) = std::fs::read_dir(&tmp) {
            let own = format!("{}.", std::process::id());
            for e in rd.flatten() {
                if !e.file_name().to_string_lossy().starts_with(&own) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(BlobCache { dir })
    }

    /// The file of blob `digest` (whether or not it exists).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir.join("sha256").join(hex_of(digest))
    }

    fn index_path(&self, diff_id: &str, c: Compression) -> PathBuf {
        self.dir
            .join("by-diffid")
            .join(format!("{}.{}", hex_of(diff_id), c.name()))
    }

    /// The cached blob of layer `diff_id` in compression `c`, if there is one.
    pub fn get(&self, diff_id: &str, c: Compression) -> Option<CachedBlob> {
        let text = std::fs::read(self.index_path(diff_id, c)).ok()?;
        let mut b: CachedBlob = serde_json::from_slice(&text).ok()?;
        b.path = self.blob_path(&b.digest);
        let meta = std::fs::metadata(&b.path).ok()?;
        (meta.len() == b.size).then_some(b)
    }

    fn tmp_file(&self) -> Result<(PathBuf, File)> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = self
            .dir
            .join("tmp")
            .join(format!("{}.{n}", std::process::id()));
        let f = File::create(&p).map_err(io_err("create", &p))?;
        Ok((p, f))
    }

    /// Remembers where layer `diff_id` was pulled from (`by-diffid/<hex>.source`).
    pub fn record_source(&self, diff_id: &str, rec: &LayerSourceRecord) -> Result<()> {
        let (tmp, mut f) = self.tmp_file()?;
        f.write_all(&serde_json::to_vec(rec).expect("record serialises"))
            .and_then(|_| f.sync_all())
            .map_err(io_err("write", &tmp))?;
        let path = self
            .dir
            .join("by-diffid")
            .join(format!("{}.source", hex_of(diff_id)));
        std::fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))
    }

    /// Where layer `diff_id` was pulled from, if berth pulled it.
    pub fn source(&self, diff_id: &str) -> Option<LayerSourceRecord> {
        let path = self
            .dir
            .join("by-diffid")
            .join(format!("{}.source", hex_of(diff_id)));
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// Stores `bytes` (a config or manifest) as a blob; returns it.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<CachedBlob> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        let path = self.blob_path(&digest);
        if std::fs::metadata(&path).map(|m| m.len()).ok() != Some(bytes.len() as u64) {
            let (tmp, mut f) = self.tmp_file()?;
            f.write_all(bytes)
                .and_then(|_| f.sync_all())
                .map_err(io_err("write", &tmp))?;
            std::fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
        }
        Ok(CachedBlob {
            digest,
            size: bytes.len() as u64,
            level: None,
            path,
        })
    }

    /// The blob of layer `diff_id` compressed as `c` (at `level`, `None` = default): from the
    /// cache, or made now by compressing what `write_tar` writes (blocking). With `exact_level`,
    /// a cached blob made at another level is made again.
    pub fn get_or_compress(
        &self,
        diff_id: &str,
        c: Compression,
        level: Option<i32>,
        exact_level: bool,
        write_tar: &dyn Fn(&mut dyn Write) -> io::Result<()>,
    ) -> Result<(CachedBlob, bool)> {
        if let Some(b) = self.get(diff_id, c) {
            if !exact_level || b.level == level {
                return Ok((b, true));
            }
        }
        let (tmp, file) = self.tmp_file()?;
        let res = (|| -> io::Result<(String, u64)> {
            let mut hw = HashingFile {
                file: io::BufWriter::with_capacity(1 << 20, file),
                hasher: Sha256::new(),
                n: 0,
            };
            match c {
                Compression::Uncompressed => write_tar(&mut hw)?,
                Compression::Gzip => {
                    let lvl = level.map_or(flate2::Compression::default(), |l| {
                        flate2::Compression::new(l.clamp(0, 9) as u32)
                    });
                    let mut enc = flate2::write::GzEncoder::new(&mut hw, lvl);
                    write_tar(&mut enc)?;
                    enc.finish()?;
                }
                Compression::Zstd => {
                    let lvl = level.unwrap_or(3).clamp(1, 22);
                    let mut enc = zstd::stream::write::Encoder::new(&mut hw, lvl)?;
                    write_tar(&mut enc)?;
                    enc.finish()?;
                }
            }
            hw.file.flush()?;
            hw.file.get_ref().sync_all()?;
            Ok((
                format!("sha256:{}", hex::encode(hw.hasher.finalize())),
                hw.n,
            ))
        })();
        let (digest, size) = match res {
            Ok(v) => v,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(Error::Io {
                    what: "compress layer",
                    path: diff_id.to_string(),
                    source: e,
                });
            }
        };
        let path = self.blob_path(&digest);
        std::fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
        let blob = CachedBlob {
            digest,
            size,
            level,
            path,
        };
        let (itmp, mut ifile) = self.tmp_file()?;
        ifile
            .write_all(&serde_json::to_vec(&blob).expect("index entry serialises"))
            .and_then(|_| ifile.sync_all())
            .map_err(io_err("write", &itmp))?;
        let index = self.index_path(diff_id, c);
        std::fs::rename(&itmp, &index).map_err(io_err("rename", &itmp))?;
        Ok((blob, false))
    }
}

struct HashingFile<W: Write> {
    file: W,
    hasher: Sha256,
    n: u64,
}

impl<W: Write> Write for HashingFile<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.file.write(b)?;
        self.hasher.update(&b[..n]);
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(b)))
    }

    fn gz(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn verifier_passes_good_layers_and_fails_bad_ones_at_the_end() {
        let tar = vec![7u8; 100_000];
        let diff = sha(&tar);
        for (c, blob) in [
            (Compression::Gzip, gz(&tar)),
            (Compression::Zstd, zstd::encode_all(&tar[..], 3).unwrap()),
            (Compression::Uncompressed, tar.clone()),
        ] {
            let mut v = LayerVerifier::new(&blob[..], c, &diff, "layer".into()).unwrap();
            let mut out = Vec::new();
            v.read_to_end(&mut out).unwrap();
            assert_eq!(out, blob, "{c:?} passes through unchanged");
            assert_eq!(v.uncompressed_size(), tar.len() as u64);
            let mut out = Vec::new();
            LayerVerifier::decompressed(
                std::io::Cursor::new(blob.clone()),
                c,
                &diff,
                "layer".into(),
            )
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
            assert_eq!(out, tar, "{c:?} decompresses");
            // Wrong diffID: the end is an error.
            let mut out = Vec::new();
            let e = LayerVerifier::new(&blob[..], c, &sha(b"x"), "layer L".into())
                .unwrap()
                .read_to_end(&mut out)
                .unwrap_err();
            assert!(e.to_string().contains("layer L: content is"), "{e}");
        }
        // Garbage that claims to be gzip.
        let mut junk = gz(&tar);
        let mid = junk.len() / 2;
        junk[mid] ^= 0xff;
        junk.truncate(junk.len() - 4);
        let mut out = Vec::new();
        let e = LayerVerifier::new(&junk[..], Compression::Gzip, &diff, "layer J".into())
            .unwrap()
            .read_to_end(&mut out)
            .unwrap_err();
        assert!(e.to_string().contains("layer J"), "{e}");
    }

    #[test]
    fn cache_compresses_once_per_diffid_and_compression() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(dir.path()).unwrap();
        let tar = vec![3u8; 50_000];
        let diff = sha(&tar);
        let calls = std::sync::atomic::AtomicU32::new(0);
        let write = |w: &mut dyn Write| {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            w.write_all(&tar)
        };
        let (a, hit) = cache
            .get_or_compress(&diff, Compression::Gzip, None, false, &write)
            .unwrap();
        assert!(!hit);
        let bytes = std::fs::read(&a.path).unwrap();
        assert_eq!(sha(&bytes), a.digest);
        assert_eq!(bytes.len() as u64, a.size);
        let (b, hit) = cache
            .get_or_compress(&diff, Compression::Gzip, None, false, &write)
            .unwrap();
        assert!(hit);
        assert_eq!(a, b);
        let (z, hit) = cache
            .get_or_compress(&diff, Compression::Zstd, None, false, &write)
            .unwrap();
        assert!(!hit);
        assert_ne!(z.digest, a.digest);
        let (_, hit) = cache
            .get_or_compress(&diff, Compression::Gzip, Some(9), true, &write)
            .unwrap();
        assert!(!hit, "another level with exact_level compresses again");
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 3);
        let (u, _) = cache
            .get_or_compress(&diff, Compression::Uncompressed, None, false, &write)
            .unwrap();
        assert_eq!(u.digest, diff);
        // A failing writer leaves nothing behind.
        let fail = |_: &mut dyn Write| Err(io::Error::other("boom"));
        let other = sha(b"other");
        assert!(cache
            .get_or_compress(&other, Compression::Gzip, None, false, &fail)
            .is_err());
        assert!(cache.get(&other, Compression::Gzip).is_none());
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
