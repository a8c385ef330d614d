//! The Docker Engine berthd is bound to: image config lookups for `ResolveImageConfig` and the
//! data root (`--docker-data-root`, else `GET /info`).
//!
//! With `--docker-data-root` and an Engine that does not answer (dockerd stopped), image configs
//! come from that data root alone, resolved as dockerd would
//! ([`layerstore::dockerstore::resolve_offline_image`]); reading only.

use crate::errors::{Error, Result};
use std::path::PathBuf;
use tokio::sync::OnceCell;

/// A lazily-connected Docker client.
pub struct Docker {
    host: String,
    data_root: OnceCell<(PathBuf, String)>,
    configured_root: Option<PathBuf>,
    containerd: containerdstore::EndpointOptions,
}

impl Docker {
    /// A client for `host` (`unix:///path` or `tcp://h:p`).
    pub fn new(
        host: String,
        data_root: Option<PathBuf>,
        containerd: containerdstore::EndpointOptions,
    ) -> Self {
        Docker {
            host,
            data_root: OnceCell::new(),
            configured_root: data_root,
            containerd,
        }
    }

    fn client(&self) -> Result<bollard::Docker> {
        connect(&self.host)
    }

    /// Docker's data root and storage driver.
    pub async fn data_root(&self) -> Result<(PathBuf, String)> {
        self.data_root
            .get_or_try_init(|| async {
                let info = self.client()?.info().await.map_err(|e| {
                    Error::unavailable(format!("docker at {}: GET /info: {e}", self.host))
                })?;
                let root = self
                    .configured_root
                    .clone()
                    .or(info.docker_root_dir.map(PathBuf::from))
                    .ok_or_else(|| Error::unavailable("docker did not report its data root"))?;
                Ok((root, info.driver.unwrap_or_default()))
            })
            .await
            .cloned()
    }

    /// Whether the Engine answers `/_ping` (within 3 s).
    async fn answers(&self) -> bool {
        let Ok(c) = self.client() else { return false };
        matches!(
            tokio::time::timeout(std::time::Duration::from_secs(3), c.ping()).await,
            Ok(Ok(_))
        )
    }

    /// The raw config JSON of an image in Docker's store and the digest to report (the manifest
    /// digest when Docker knows one, else the image id).
    ///
    /// `platform` (`os`, `architecture`, `variant`; default: the host's) picks the manifest of a
    /// multi-platform image on the containerd image store.
    pub async fn image_config(
        &self,
        reference: &str,
        platform: Option<(String, String, String)>,
    ) -> Result<(String, Vec<u8>)> {
        if let Some(root) = &self.configured_root {
            if !self.answers().await {
                return offline_image_config(root.clone(), reference.to_string()).await;
            }
        }
        let name = reference.split('@').next().unwrap_or(reference);
        let c = self.client()?;
        let img = match c.inspect_image(reference).await {
            Ok(i) => i,
            Err(_) if name != reference => c
                .inspect_image(name)
                .await
                .map_err(|e| map_err(reference, e))?,
            Err(e) => return Err(map_err(reference, e)),
        };
        let id = img
            .id
            .ok_or_else(|| Error::internal(format!("docker returned no id for {reference}")))?;
        let info = c
            .info()
            .await
            .map_err(|e| Error::unavailable(format!("docker at {}: GET /info: {e}", self.host)))?;
        if let Some(ep) = containerdstore::Endpoint::detect(&info, &self.containerd) {
            // containerd image store: the image ID is the manifest (or index) digest; the
            // config comes from containerd's content store.
            let ctrd = containerdstore::Client::connect(&ep)
                .await
                .map_err(|e| Error::unavailable(e.to_string()))?;
            let p = platform.unwrap_or_else(|| {
                let h = worker::Platform::host();
                (h.os, h.architecture, h.variant)
            });
            let (_, config) =
                ctrd.image_config(&id, (&p.0, &p.1, &p.2))
                    .await
                    .map_err(|e| match e {
                        e if e.is_not_found() => Error::not_found(e.to_string()),
                        containerdstore::Error::NoPlatform { .. } => {
                            Error::not_found(e.to_string())
                        }
                        e => Error::unavailable(e.to_string()),
                    })?;
            let digest = img
                .repo_digests
                .unwrap_or_default()
                .iter()
                .find_map(|d| d.split_once('@').map(|(_, dg)| dg.to_string()))
                .unwrap_or(id);
            return Ok((digest, config));
        }
        let hex = id.strip_prefix("sha256:").unwrap_or(&id).to_string();
        let (root, driver) = self.data_root().await?;
        let path = root
            .join("image")
            .join(&driver)
            .join("imagedb/content/sha256")
            .join(&hex);
        let config = tokio::fs::read(&path).await.map_err(|e| {
            Error::unavailable(format!(
                "read image config of {reference} at {}: {e}",
                path.display()
            ))
        })?;
        // The classic store keeps one image per tag: one of another platform is not this
        // platform's config (the caller then asks the registry, and the build pulls it).
        if let Some((os, arch, _)) = &platform {
            #[derive(serde::Deserialize)]
            struct Plat {
                #[serde(default)]
                os: String,
                #[serde(default)]
                architecture: String,
            }
            if let Ok(p) = serde_json::from_slice::<Plat>(&config) {
                let differs =
                    |have: &str, want: &str| !have.is_empty() && !want.is_empty() && have != want;
                if differs(&p.os, os) || differs(&p.architecture, arch) {
                    return Err(Error::not_found(format!(
                        "image {reference} in Docker is {}/{}, not {os}/{arch}",
                        p.os, p.architecture
                    )));
                }
            }
        }
        let digest = img
            .repo_digests
            .unwrap_or_default()
            .iter()
            .find_map(|d| d.split_once('@').map(|(_, dg)| dg.to_string()))
            .unwrap_or(id);
        Ok((digest, config))
    }
}

/// [`Docker::image_config`] from a stopped daemon's data root: the reference (or, failing that,
/// its name without the digest, as the live lookup does) resolved as dockerd would.
async fn offline_image_config(root: PathBuf, reference: String) -> Result<(String, Vec<u8>)> {
    use layerstore::dockerstore::{offline_driver, resolve_offline_image, DockerStore};
    tokio::task::spawn_blocking(move || {
        let store = DockerStore::new(&root, offline_driver(&root));
        let name = reference.split('@').next().unwrap_or(&reference);
        let image = match resolve_offline_image(&store, &reference) {
            Err(layerstore::Error::DockerImageNotFound { .. }) if name != reference => {
                resolve_offline_image(&store, name)
            }
            r => r,
        }
        .map_err(|e| match e {
            layerstore::Error::DockerImageNotFound { .. } => Error::not_found(e.to_string()),
            layerstore::Error::InvalidImageReference { .. }
            | layerstore::Error::AmbiguousImageId { .. } => Error::invalid(e.to_string()),
            e => Error::layerstore(format!("read image {reference} from {}", root.display()), e),
        })?;
        let digest = store
            .repo_digests(&image.id)
            .map_err(|e| Error::layerstore("read repositories.json", e))?
            .into_iter()
            .find_map(|d| d.split_once('@').map(|(_, dg)| dg.to_string()))
            .unwrap_or_else(|| image.id.to_string());
        Ok((digest, image.config))
    })
    .await
    .map_err(|e| Error::internal(format!("image config task: {e}")))?
}

/// A Docker Engine client for `host` (`unix:///path`, `tcp://h:p`, or a bare socket path). The
/// request timeout is long enough for an image load of many GiB.
pub(crate) fn connect(host: &str) -> Result<bollard::Docker> {
    // Counted and traced when telemetry is on; bollard's own client otherwise.
    telemetry::docker::connect(host, 600, bollard::API_DEFAULT_VERSION)
        .map_err(|e| Error::unavailable(format!("docker at {host}: {e}")))
}

fn map_err(reference: &str, e: bollard::errors::Error) -> Error {
    match e {
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        } => Error::not_found(format!("{reference}: not found in the docker image store")),
        e => Error::unavailable(format!("inspect image {reference}: {e}")),
    }
}
