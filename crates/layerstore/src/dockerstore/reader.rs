//! Read-only access to a classic Docker data root.

use std::path::{Path, PathBuf};

use super::StorageDriver;
use crate::tar::{chain_ids, Digest};
use crate::{Error, Result};

/// One layer of Docker's layerdb.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerEntry {
    /// The layer's chainID (its layerdb directory name).
    pub chain_id: Digest,
    /// `diff`: the layer tar's sha256.
    pub diff_id: Digest,
    /// `size` (display only; see the spec §4.1).
    pub size: u64,
    /// `cache-id`: the graph driver directory name.
    pub cache_id: String,
    /// `parent`: the parent layer's chainID, absent for a base layer.
    pub parent: Option<Digest>,
    /// `<data-root>/<driver>/<cache-id>/diff`.
    pub diff_dir: PathBuf,
}

/// A classic Docker data root, read-only.
#[derive(Debug, Clone)]
pub struct DockerStore {
    data_root: PathBuf,
    driver: StorageDriver,
}

pub(crate) fn read_small(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io {
            op: "read",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::BadDockerStoreFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// A cache-id is a directory name under the driver dir: no separators, no dot names.
pub(crate) fn valid_cache_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s != "l"
        && !s.contains('/')
        && !s.contains('\0')
}

impl DockerStore {
    /// A store at `data_root` (e.g. `/var/lib/docker`) with the given driver.
    pub fn new(data_root: impl Into<PathBuf>, driver: StorageDriver) -> Self {
        DockerStore {
            data_root: data_root.into(),
            driver,
        }
    }

    /// The data root.
    pub fn data_root(&self) -> &Path {
        &self.data_root
    }

    /// The graph driver.
    pub fn driver(&self) -> StorageDriver {
        self.driver
    }

    /// `<data-root>/<driver>`.
    pub fn driver_dir(&self) -> PathBuf {
        self.data_root.join(self.driver.name())
    }

    /// `<data-root>/image/<driver>`.
    pub fn image_dir(&self) -> PathBuf {
        self.data_root.join("image").join(self.driver.name())
    }

    /// `<data-root>/image/<driver>/layerdb`.
    pub fn layerdb_dir(&self) -> PathBuf {
        self.image_dir().join("layerdb")
    }

    /// The layerdb entry of `chain_id`, or `None` if Docker has no such layer.
    pub fn layer(&self, chain_id: &Digest) -> Result<Option<LayerEntry>> {
        let dir = self.layerdb_dir().join("sha256").join(chain_id.hex());
        let Some(diff) = read_small(&dir.join("diff"))? else {
            return Ok(None);
        };
        let diff_id: Digest = diff
            .trim()
            .parse()
            .map_err(|_| bad(&dir.join("diff"), "not a sha256 digest"))?;
        let cache_id = read_small(&dir.join("cache-id"))?
            .ok_or_else(|| bad(&dir.join("cache-id"), "missing"))?;
        let cache_id = cache_id.trim().to_string();
        if !valid_cache_id(&cache_id) {
            return Err(bad(
                &dir.join("cache-id"),
                format!("unusable cache-id {cache_id:?}"),
            ));
        }
        let size = match read_small(&dir.join("size"))? {
            Some(s) => s
                .trim()
                .parse()
                .map_err(|_| bad(&dir.join("size"), "not a number"))?,
            None => 0,
        };
        let parent = match read_small(&dir.join("parent"))? {
            Some(p) => Some(
                p.trim()
                    .parse()
                    .map_err(|_| bad(&dir.join("parent"), "not a sha256 digest"))?,
            ),
            None => None,
        };
        let diff_dir = self.driver_dir().join(&cache_id).join("diff");
        Ok(Some(LayerEntry {
            chain_id: *chain_id,
            diff_id,
            size,
            cache_id,
            parent,
            diff_dir,
        }))
    }

    /// The layers of a diffID stack (bottom first); fails naming the first layer Docker lacks.
    pub fn layers_for_diff_ids(&self, diff_ids: &[Digest]) -> Result<Vec<LayerEntry>> {
        let mut out = Vec::with_capacity(diff_ids.len());
        for (cid, did) in chain_ids(diff_ids).iter().zip(diff_ids) {
            let entry = self.layer(cid)?.ok_or_else(|| Error::DockerLayerMissing {
                chain_id: cid.to_string(),
                data_root: self.data_root.clone(),
            })?;
            if entry.diff_id != *did {
                return Err(bad(
                    &self
                        .layerdb_dir()
                        .join("sha256")
                        .join(cid.hex())
                        .join("diff"),
                    format!("holds {} where the chain says {did}", entry.diff_id),
                ));
            }
            if !entry.diff_dir.is_dir() {
                return Err(bad(&entry.diff_dir, "layer directory missing"));
            }
            out.push(entry);
        }
        Ok(out)
    }

    /// The image config bytes of `image_id` from imagedb, checked against the id.
    pub fn image_config(&self, image_id: &Digest) -> Result<Vec<u8>> {
        let path = self
            .image_dir()
            .join("imagedb/content/sha256")
            .join(image_id.hex());
        let bytes = std::fs::read(&path).map_err(|source| Error::Io {
            op: "read",
            path: path.clone(),
            source,
        })?;
        let found = Digest::of(&bytes);
        if found != *image_id {
            return Err(Error::DigestMismatch {
                expected: image_id.to_string(),
                found: found.to_string(),
            });
        }
        Ok(bytes)
    }

    /// The diffIDs (`rootfs.diff_ids`) of an image config.
    pub fn config_diff_ids(config: &[u8]) -> Result<Vec<Digest>> {
        #[derive(serde::Deserialize)]
        struct RootFs {
            diff_ids: Vec<Digest>,
        }
        #[derive(serde::Deserialize)]
        struct Config {
            rootfs: RootFs,
        }
        let c: Config = serde_json::from_slice(config).map_err(|e| Error::BadImageConfig {
            reason: format!("rootfs.diff_ids: {e}"),
        })?;
        Ok(c.rootfs.diff_ids)
    }

    /// The layers of an image in imagedb, bottom first.
    pub fn image_layers(&self, image_id: &Digest) -> Result<Vec<LayerEntry>> {
        let config = self.image_config(image_id)?;
        self.layers_for_diff_ids(&Self::config_diff_ids(&config)?)
    }
}
