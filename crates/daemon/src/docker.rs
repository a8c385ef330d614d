//! The Docker Engine berthd is bound to: image config lookups for `ResolveImageConfig` and the
//! data root (`--docker-data-root`, else `GET /info`).

use crate::errors::{Error, Result};
use std::path::PathBuf;
use tokio::sync::OnceCell;

/// A lazily-connected Docker client.
pub struct Docker {
    host: String,
    data_root: OnceCell<(PathBuf, String)>,
    configured_root: Option<PathBuf>,
}

impl Docker {
    /// A client for `host` (`unix:///path` or `tcp://h:p`).
    pub fn new(host: String, data_root: Option<PathBuf>) -> Self {
        Docker {
            host,
            data_root: OnceCell::new(),
            configured_root: data_root,
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

    /// The raw config JSON of an image in Docker's store and the digest to report (the manifest
    /// digest when Docker knows one, else the image id).
    pub async fn image_config(&self, reference: &str) -> Result<(String, Vec<u8>)> {
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
        let digest = img
            .repo_digests
            .unwrap_or_default()
            .iter()
            .find_map(|d| d.split_once('@').map(|(_, dg)| dg.to_string()))
            .unwrap_or(id);
        Ok((digest, config))
    }
}

/// A Docker Engine client for `host` (`unix:///path`, `tcp://h:p`, or a bare socket path). The
/// request timeout is long enough for an image load of many GiB.
pub(crate) fn connect(host: &str) -> Result<bollard::Docker> {
    let res = if let Some(p) = host.strip_prefix("unix://") {
        bollard::Docker::connect_with_unix(p, 600, bollard::API_DEFAULT_VERSION)
    } else if let Some(a) = host.strip_prefix("tcp://") {
        bollard::Docker::connect_with_http(
            &format!("http://{a}"),
            600,
            bollard::API_DEFAULT_VERSION,
        )
    } else {
        bollard::Docker::connect_with_unix(host, 600, bollard::API_DEFAULT_VERSION)
    };
    res.map_err(|e| Error::unavailable(format!("docker at {host}: {e}")))
}

fn map_err(reference: &str, e: bollard::errors::Error) -> Error {
    match e {
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        } => Error::not_found(format!("{reference}: not found in the docker image store")),
        e => Error::unavailable(format!("inspect image {reference}: {e}")),
    }
}
