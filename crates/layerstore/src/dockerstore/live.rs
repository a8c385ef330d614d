//! Base images used in place through a live dockerd (the pins that keep them from being deleted
//! are in `pin`).

use std::path::PathBuf;

use bollard::Docker;

use super::{DockerStore, StorageDriver};
use crate::snapshot::{Chain, DockerLayer, LayerRef};
use crate::tar::{chain_ids, Digest};
use crate::{Error, Result};

fn api_err(op: &'static str) -> impl FnOnce(bollard::errors::Error) -> Error {
    move |source| Error::DockerApi {
        op,
        source: Box::new(source),
    }
}

/// An image in Docker's store, ready to be mounted in place.
#[derive(Debug, Clone)]
pub struct BaseImage {
    /// Image ID (sha256 of `config`).
    pub id: Digest,
    /// `rootfs.diff_ids`, bottom first.
    pub diff_ids: Vec<Digest>,
    /// Chain IDs, bottom first.
    pub chain_ids: Vec<Digest>,
    /// The layers' `diff/` dirs, bottom first.
    pub layer_dirs: Vec<PathBuf>,
    /// The exact config bytes.
    pub config: Vec<u8>,
    /// The driver holding the layers (decides the whiteout format).
    pub driver: StorageDriver,
}

impl BaseImage {
    /// The layers as a snapshot chain (Docker layers, read-only).
    pub fn chain(&self) -> Chain {
        let wf = self.driver.whiteout_format();
        Chain(
            self.chain_ids
                .iter()
                .zip(&self.diff_ids)
                .zip(&self.layer_dirs)
                .map(|((c, d), dir)| {
                    LayerRef::Docker(DockerLayer {
                        chain_id: c.to_string(),
                        diff_id: d.to_string(),
                        diff_dir: dir.clone(),
                        whiteouts: wf,
                        blob: None,
                    })
                })
                .collect(),
        )
    }
}

/// Resolves an image reference or ID through the Engine API (`GET /images/{name}/json`) and maps its layers to
/// their directories in `store` (which must be the data root that daemon uses).
///
/// Cross-checks the top layer's dir against the `UpperDir` dockerd reports (`GraphDriver.Data`), so a wrong data
/// root or driver is an error, not a silent mix-up.
pub async fn resolve_base_image(
    docker: &Docker,
    store: &DockerStore,
    reference: &str,
) -> Result<BaseImage> {
    let inspect = docker
        .inspect_image(reference)
        .await
        .map_err(api_err("inspect image"))?;
    let id: Digest = inspect
        .id
        .as_deref()
        .ok_or_else(|| Error::DockerStoreMismatch {
            what: format!("image {reference} has no Id"),
        })?
        .parse()?;
    let layers = inspect
        .root_fs
        .as_ref()
        .and_then(|r| r.layers.clone())
        .unwrap_or_default();
    let diff_ids = layers
        .iter()
        .map(|l| l.parse())
        .collect::<Result<Vec<Digest>>>()?;
    if let Some(gd) = &inspect.graph_driver {
        if gd.name != store.driver().name() {
            return Err(Error::DockerStoreMismatch {
                what: format!(
                    "dockerd uses driver {} but the store was opened for {}",
                    gd.name,
                    store.driver().name()
                ),
            });
        }
    }
    let read = || -> Result<_> {
        let entries = store.layers_for_diff_ids(&diff_ids)?;
        let config = store.image_config(&id)?;
        Ok((entries, config))
    };
    let (entries, config) = match read() {
        Ok(r) => r,
        // The image may have been deleted (a prune) between the lookup and reading its layerdb
        // and imagedb entries: then say so (the caller resolves it again), else read once more
        // (dockerd replaces those files atomically; a second failure is real).
        Err(e) => match docker.inspect_image(&id.to_string()).await {
            Err(
                gone @ bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                },
            ) => return Err(api_err("inspect image")(gone)),
            Ok(_) => read()?,
            Err(_) => return Err(e),
        },
    };
    if let (Some(top), Some(upper)) = (
        entries.last(),
        inspect
            .graph_driver
            .as_ref()
            .and_then(|g| g.data.get("UpperDir")),
    ) {
        if std::path::Path::new(upper) != top.diff_dir {
            return Err(Error::DockerStoreMismatch {
                what: format!(
                    "dockerd reports UpperDir {upper}, the layerdb maps to {}",
                    top.diff_dir.display()
                ),
            });
        }
    }
    let from_config = DockerStore::config_diff_ids(&config)?;
    if from_config != diff_ids {
        return Err(Error::DockerStoreMismatch {
            what: format!("image {id}: config diff_ids differ from RootFS.Layers"),
        });
    }
    Ok(BaseImage {
        id,
        chain_ids: chain_ids(&diff_ids),
        diff_ids,
        layer_dirs: entries.into_iter().map(|e| e.diff_dir).collect(),
        config,
        driver: store.driver(),
    })
}
