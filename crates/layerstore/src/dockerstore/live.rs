//! Base images used in place through a live dockerd, and pins that keep them from being deleted.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use bollard::Docker;

use super::{DockerStore, StorageDriver};
use crate::snapshot::{Chain, DockerLayer, LayerRef};
use crate::tar::{chain_ids, Digest};
use crate::{Error, Result};

/// Label on pin containers: the berth instance that made them.
pub const PIN_LABEL: &str = "dev.berth.pin";
/// Label on pin containers: the build that needed the image.
pub const PIN_BUILD_LABEL: &str = "dev.berth.pin.build";

/// [`Pin`]s alive in this process.
static PINS_HELD: AtomicUsize = AtomicUsize::new(0);

/// How many [`Pin`]s this process holds now (for metrics and debugging).
pub fn pins_held() -> usize {
    PINS_HELD.load(Ordering::Relaxed)
}

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
    let entries = store.layers_for_diff_ids(&diff_ids)?;
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
    let config = store.image_config(&id)?;
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

/// Keeps an image (and so its layers) from being deleted by `docker rmi` while a build uses it: a created,
/// never-started container of the image, labelled with the berth instance and build.
///
/// Release it with [`Pin::release`]. If it is dropped while still held, `Drop` removes it: synchronously on a
/// multi-thread tokio runtime (`block_in_place`) or outside any runtime (a helper thread with its own runtime), as a
/// spawned task on a current-thread runtime. Whatever still fails is logged, and [`remove_stale_pins`] removes it at
/// the next start.
#[derive(Debug)]
#[must_use = "the pin is removed when dropped"]
pub struct Pin {
    docker: Docker,
    container_id: String,
    held: bool,
}

/// Pins `image` (an ID or reference) for `build_id` of berth instance `instance`.
pub async fn pin_image(
    docker: &Docker,
    image: &str,
    instance: &str,
    build_id: &str,
) -> Result<Pin> {
    let name = format!(
        "berth-pin-{}-{}",
        sanitize(instance),
        crate::snapshot::random_token(12)
    );
    let labels = HashMap::from([
        (PIN_LABEL.to_string(), instance.to_string()),
        (PIN_BUILD_LABEL.to_string(), build_id.to_string()),
    ]);
    let body = bollard::models::ContainerCreateBody {
        image: Some(image.to_string()),
        // Never started; a command is only required because images without CMD cannot be created otherwise.
        cmd: Some(vec!["/berth-pin-never-started".to_string()]),
        labels: Some(labels),
        network_disabled: Some(true),
        ..Default::default()
    };
    let opts = bollard::query_parameters::CreateContainerOptions {
        name: Some(name),
        platform: String::new(),
    };
    let resp = docker
        .create_container(Some(opts), body)
        .await
        .map_err(api_err("create pin container"))?;
    tracing::debug!(container = %resp.id, image, build_id, "image pinned");
    PINS_HELD.fetch_add(1, Ordering::Relaxed);
    Ok(Pin {
        docker: docker.clone(),
        container_id: resp.id,
        held: true,
    })
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect()
}

async fn remove_container(docker: &Docker, id: &str) -> Result<()> {
    let opts = bollard::query_parameters::RemoveContainerOptions {
        v: true,
        force: true,
        link: false,
    };
    match docker.remove_container(id, Some(opts)).await {
        Ok(()) => Ok(()),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(e) => Err(api_err("remove pin container")(e)),
    }
}

impl Pin {
    /// The pin container's ID.
    pub fn container_id(&self) -> &str {
        &self.container_id
    }

    /// Removes the pin container.
    pub async fn release(mut self) -> Result<()> {
        self.held = false;
        PINS_HELD.fetch_sub(1, Ordering::Relaxed);
        remove_container(&self.docker, &self.container_id).await
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        PINS_HELD.fetch_sub(1, Ordering::Relaxed);
        let (docker, id) = (self.docker.clone(), self.container_id.clone());
        let log = |r: Result<()>| {
            if let Err(e) = r {
                tracing::warn!(container = %id, error = %e, "removing dropped pin failed (remove_stale_pins retries)");
            }
        };
        match tokio::runtime::Handle::try_current() {
            // Removed before drop returns, so a runtime shutting down right after cannot lose it.
            Ok(rt) if rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                log(tokio::task::block_in_place(|| {
                    rt.block_on(remove_container(&docker, &id))
                }));
            }
            // A current-thread runtime cannot block here: best effort.
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(e) = remove_container(&docker, &id).await {
                        tracing::warn!(container = %id, error = %e, "removing dropped pin failed");
                    }
                });
            }
            Err(_) => {
                let r = std::thread::scope(|s| {
                    s.spawn(|| {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .map_err(|e| Error::Io {
                                op: "start runtime for pin removal",
                                path: Default::default(),
                                source: e,
                            })?;
                        rt.block_on(remove_container(&docker, &id))
                    })
                    .join()
                    .unwrap_or_else(|_| {
                        Err(Error::DockerStoreMismatch {
                            what: "pin removal thread panicked".into(),
                        })
                    })
                });
                log(r);
            }
        }
    }
}

/// Removes every pin container of berth instance `instance` (call at daemon start); returns how many.
pub async fn remove_stale_pins(docker: &Docker, instance: &str) -> Result<usize> {
    let filters = HashMap::from([("label".to_string(), vec![format!("{PIN_LABEL}={instance}")])]);
    let opts = bollard::query_parameters::ListContainersOptions {
        all: true,
        filters: Some(filters),
        ..Default::default()
    };
    let list = docker
        .list_containers(Some(opts))
        .await
        .map_err(api_err("list pin containers"))?;
    let mut n = 0;
    for c in list {
        // The filter is applied by dockerd; check the label again so nothing else is ever removed.
        let ours = c
            .labels
            .as_ref()
            .and_then(|l| l.get(PIN_LABEL))
            .is_some_and(|v| v == instance);
        if let (true, Some(id)) = (ours, c.id) {
            remove_container(docker, &id).await?;
            n += 1;
        }
    }
    Ok(n)
}
