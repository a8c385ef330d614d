//! Content stores a cache is written into and read from by digest: the client's store over the
//! session for `type=local` (implemented by the daemon), or an OCI layout directory ([`LocalDir`],
//! `blobs/sha256/<hex>`, for tests and tools).

use std::io::Read;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use crate::{Error, Result};

/// A content-addressed store.
#[async_trait]
pub trait ContentStore: Send + Sync {
    /// Names the store in errors.
    fn describe(&self) -> String;
    /// The size of `digest`, if the store has it.
    async fn info(&self, digest: &str) -> Result<Option<u64>>;
    /// Writes `size` bytes from `path` (a file whose sha256 is `digest`) unless present.
    async fn write_file(&self, digest: &str, size: u64, path: &Path) -> Result<()>;
    /// Writes `bytes` under `digest` unless present.
    async fn write_bytes(&self, digest: &str, bytes: Bytes) -> Result<()>;
    /// Opens `digest` for reading on a blocking thread.
    async fn open(&self, digest: &str) -> Result<Box<dyn Read + Send>>;
}

/// Reads a whole (small) blob, refusing more than `limit` bytes.
pub async fn read_all(store: &dyn ContentStore, digest: &str, limit: u64) -> Result<Vec<u8>> {
    let r = store.open(digest).await?;
    let what = format!("{} blob {digest}", store.describe());
    tokio::task::spawn_blocking(move || {
        let mut out = vec![];
        r.take(limit + 1)
            .read_to_end(&mut out)
            .map_err(|e| Error::Other(format!("read {what}: {e}")))?;
        if out.len() as u64 > limit {
            return Err(Error::invalid(format!(
                "{what} is too large (> {limit} bytes)"
            )));
        }
        Ok(out)
    })
    .await
    .map_err(|e| Error::Other(format!("read task: {e}")))?
}

/// An OCI layout directory's blobs (`<dir>/blobs/sha256/<hex>`).
#[derive(Debug, Clone)]
pub struct LocalDir {
    dir: PathBuf,
}

impl LocalDir {
    /// The store under `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LocalDir { dir: dir.into() }
    }

    fn path(&self, digest: &str) -> Result<PathBuf> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| Error::invalid(format!("invalid digest {digest:?}")))?;
        Ok(self.dir.join("blobs").join("sha256").join(hex))
    }

    fn put(&self, digest: &str, write: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<()> {
        let p = self.path(digest)?;
        if p.exists() {
            return Ok(());
        }
        let parent = p.parent().expect("blob path has a parent");
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::Other(format!("create {}: {e}", parent.display())))?;
        let tmp = parent.join(format!(".{}.tmp", std::process::id()));
        write(&tmp).map_err(|e| Error::Other(format!("write {}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, &p).map_err(|e| Error::Other(format!("rename {}: {e}", p.display())))
    }
}

#[async_trait]
impl ContentStore for LocalDir {
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    async fn info(&self, digest: &str) -> Result<Option<u64>> {
        Ok(std::fs::metadata(self.path(digest)?).ok().map(|m| m.len()))
    }

    async fn write_file(&self, digest: &str, _size: u64, path: &Path) -> Result<()> {
        self.put(digest, |tmp| std::fs::copy(path, tmp).map(|_| ()))
    }

    async fn write_bytes(&self, digest: &str, bytes: Bytes) -> Result<()> {
        self.put(digest, |tmp| std::fs::write(tmp, &bytes))
    }

    async fn open(&self, digest: &str) -> Result<Box<dyn Read + Send>> {
        let p = self.path(digest)?;
        let f = std::fs::File::open(&p)
            .map_err(|e| Error::Other(format!("open {}: {e}", p.display())))?;
        Ok(Box::new(f))
    }
}
