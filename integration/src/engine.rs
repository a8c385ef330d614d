//! [`DockerEngine`]: one Docker Engine reached over its unix socket, with the calls tests need.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig, ImageInspect};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptionsBuilder, PushImageOptions,
    RemoveContainerOptions, RemoveImageOptions, TagImageOptions, WaitContainerOptions,
};
use bollard::{ClientVersion, Docker};
use futures::StreamExt as _;

/// The Docker API version this crate speaks: 1.41, Docker 20.10's (the oldest engine we support;
/// newer engines accept it too). Pinned rather than negotiated so that connecting needs no I/O.
pub const MIN_API_VERSION: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};

/// The socket used when `DOCKER_HOST` is unset.
const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// Request timeout for API calls, in seconds (bollard's unit).
const API_TIMEOUT_SECS: u64 = 300;

/// A Docker Engine reached over a unix socket: the socket path plus a bollard client.
///
/// Cheap to clone. All calls are async and need a tokio runtime.
#[derive(Debug, Clone)]
pub struct DockerEngine {
    socket: PathBuf,
    client: Docker,
}

/// What a container run with [`DockerEngine::run`] printed and how it exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The container's exit code.
    pub exit_code: i64,
    /// Everything it wrote to stdout (lossy UTF-8).
    pub stdout: String,
    /// Everything it wrote to stderr (lossy UTF-8).
    pub stderr: String,
}

impl Output {
    /// Whether the exit code is 0.
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }

    /// Panics with the exit code, stdout and stderr unless the run succeeded; returns `self`.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        assert!(
            self.success(),
            "container exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.exit_code,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Options for [`DockerEngine::run_with`]; `Default` gives what [`DockerEngine::run`] uses.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// `--user` (e.g. `"1000:1000"` or `"nobody"`); the image's default when `None`.
    pub user: Option<String>,
    /// Extra environment, `KEY=value`.
    pub env: Vec<String>,
    /// Working directory; the image's default when `None`.
    pub workdir: Option<String>,
    /// Replaces the image's entrypoint when `Some`.
    pub entrypoint: Option<Vec<String>>,
    /// Bind mounts, `host:container[:ro]`.
    pub binds: Vec<String>,
    /// Network mode; `"none"` by default, which also works on a [`crate::PrivateDockerd`]
    /// (started with `--bridge=none`).
    pub network: String,
    /// How long the container may run before it is killed and the run fails.
    pub timeout: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            user: None,
            env: Vec::new(),
            workdir: None,
            entrypoint: None,
            binds: Vec::new(),
            network: "none".to_string(),
            timeout: Duration::from_secs(120),
        }
    }
}

impl DockerEngine {
    /// The machine's Docker Engine: `DOCKER_HOST` when set (only `unix://` is supported), else
    /// `/var/run/docker.sock`. Fails when the socket does not exist; does not contact the daemon
    /// (see [`DockerEngine::ping`]).
    pub fn system() -> Result<Self> {
        match std::env::var("DOCKER_HOST") {
            Ok(host) if !host.is_empty() => {
                let path = host.strip_prefix("unix://").ok_or_else(|| {
                    anyhow!("DOCKER_HOST={host:?}: only unix:// sockets are supported here")
                })?;
                Self::connect(path)
            }
            _ => Self::connect(DEFAULT_SOCKET),
        }
    }

    /// An engine listening on the unix socket `socket` (no I/O yet).
    pub fn connect(socket: impl Into<PathBuf>) -> Result<Self> {
        let socket = socket.into();
        let text = socket
            .to_str()
            .ok_or_else(|| anyhow!("socket path {} is not UTF-8", socket.display()))?;
        let client = Docker::connect_with_unix(text, API_TIMEOUT_SECS, &MIN_API_VERSION)
            .with_context(|| format!("connecting to Docker Engine at {}", socket.display()))?;
        Ok(Self { socket, client })
    }

    /// The bollard client, for calls this type does not wrap.
    pub fn client(&self) -> &Docker {
        &self.client
    }

    /// The engine's unix socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The engine as a `DOCKER_HOST` value: `unix://<socket>`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// `GET /_ping`: fails unless the daemon answers `OK`.
    pub async fn ping(&self) -> Result<()> {
        let answer = self
            .client
            .ping()
            .await
            .with_context(|| format!("pinging Docker Engine at {}", self.socket.display()))?;
        if answer.trim() != "OK" {
            bail!(
                "Docker Engine at {} answered ping with {answer:?}",
                self.socket.display()
            );
        }
        Ok(())
    }

    /// Runs `cmd` in a new container of `image` to completion (network `none`, the image's
    /// entrypoint), then removes the container. A non-zero exit is not an error: check
    /// [`Output::exit_code`] or call [`Output::assert_success`].
    pub async fn run(&self, image: &str, cmd: &[&str]) -> Result<Output> {
        self.run_with(image, cmd, &RunOptions::default()).await
    }

    /// [`DockerEngine::run`] with options (user, env, binds, ...).
    pub async fn run_with(&self, image: &str, cmd: &[&str], opts: &RunOptions) -> Result<Output> {
        let name = crate::unique_name("berth-run");
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            cmd: Some(cmd.iter().map(|s| s.to_string()).collect()),
            entrypoint: opts.entrypoint.clone(),
            user: opts.user.clone(),
            env: Some(opts.env.clone()),
            working_dir: opts.workdir.clone(),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            host_config: Some(HostConfig {
                binds: Some(opts.binds.clone()),
                network_mode: Some(opts.network.clone()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = self
            .client
            .create_container(
                Some(CreateContainerOptionsBuilder::new().name(&name).build()),
                body,
            )
            .await
            .with_context(|| format!("creating container of {image} running {cmd:?}"))?;
        let id = created.id;
        let result = tokio::time::timeout(opts.timeout, self.attach_start_wait(&id))
            .await
            .unwrap_or_else(|_| {
                Err(anyhow!(
                    "container did not finish within {:?}",
                    opts.timeout
                ))
            })
            .with_context(|| format!("running {cmd:?} in {image} (container {name})"));
        // Remove it whatever happened; a removal failure only matters if the run succeeded.
        let removed = self.remove_container(&id).await;
        let output = result?;
        removed?;
        Ok(output)
    }

    async fn attach_start_wait(&self, id: &str) -> Result<Output> {
        let attached = self
            .client
            .attach_container(
                id,
                Some(AttachContainerOptions {
                    stdout: true,
                    stderr: true,
                    stream: true,
                    // Attached before start, so the stream sees everything; replaying logs
                    // as well would duplicate output.
                    logs: false,
                    ..Default::default()
                }),
            )
            .await
            .context("attaching")?;
        self.client
            .start_container(id, None::<bollard::query_parameters::StartContainerOptions>)
            .await
            .context("starting")?;
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let mut output = attached.output;
        while let Some(chunk) = output.next().await {
            match chunk.context("reading container output")? {
                LogOutput::StdOut { message } | LogOutput::Console { message } => {
                    stdout.extend_from_slice(&message)
                }
                LogOutput::StdErr { message } => stderr.extend_from_slice(&message),
                LogOutput::StdIn { .. } => {}
            }
        }
        let exit_code = self.wait_exit_code(id).await?;
        Ok(Output {
            exit_code,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    }

    /// Waits for a container to stop and returns its exit code.
    async fn wait_exit_code(&self, id: &str) -> Result<i64> {
        let mut waits = self
            .client
            .wait_container(id, Some(WaitContainerOptions::default()));
        match waits.next().await {
            Some(Ok(response)) => match response.error.and_then(|e| e.message) {
                Some(message) if !message.is_empty() => bail!("waiting: {message}"),
                _ => Ok(response.status_code),
            },
            // bollard reports a non-zero exit as this error; it is a normal outcome here.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, error }))
                if error.is_empty() =>
            {
                Ok(code)
            }
            Some(Err(err)) => Err(err).context("waiting"),
            None => bail!("wait stream ended without a status"),
        }
    }

    /// `GET /images/<image>/json`.
    pub async fn inspect_image(&self, image: &str) -> Result<ImageInspect> {
        self.client
            .inspect_image(image)
            .await
            .with_context(|| format!("inspecting image {image} on {}", self.socket.display()))
    }

    /// Whether `image` (a reference or ID) exists on this engine.
    pub async fn image_exists(&self, image: &str) -> Result<bool> {
        match self.client.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(err) => Err(err).with_context(|| format!("inspecting image {image}")),
        }
    }

    /// The image's layer diffIDs (`RootFS.Layers`), lowest first.
    pub async fn image_layers(&self, image: &str) -> Result<Vec<String>> {
        let inspect = self.inspect_image(image).await?;
        inspect
            .root_fs
            .and_then(|fs| fs.layers)
            .ok_or_else(|| anyhow!("image {image} has no RootFS.Layers"))
    }

    /// `docker tag image repo:tag`; `target` is `repo:tag` (a tag is required).
    pub async fn tag(&self, image: &str, target: &str) -> Result<()> {
        let (repo, tag) = split_reference(target)?;
        self.client
            .tag_image(
                image,
                Some(TagImageOptions {
                    repo: Some(repo.to_string()),
                    tag: Some(tag.to_string()),
                }),
            )
            .await
            .with_context(|| format!("tagging {image} as {target}"))
    }

    /// `docker push repo:tag`, failing on any error reported in the progress stream.
    pub async fn push(&self, reference: &str) -> Result<()> {
        let (repo, tag) = split_reference(reference)?;
        let mut progress = self.client.push_image(
            repo,
            Some(PushImageOptions {
                tag: Some(tag.to_string()),
                platform: None,
            }),
            None,
        );
        while let Some(item) = progress.next().await {
            let info = item.with_context(|| format!("pushing {reference}"))?;
            if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                bail!("pushing {reference}: {detail}");
            }
        }
        Ok(())
    }

    /// Removes one image reference (tag) or ID with `force`, without touching other tags of the
    /// same image. Missing images are not an error.
    pub async fn remove_image(&self, image: &str) -> Result<()> {
        match self
            .client
            .remove_image(
                image,
                Some(RemoveImageOptions {
                    force: true,
                    noprune: false,
                }),
                None,
            )
            .await
        {
            Ok(_)
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(err) => Err(err).with_context(|| format!("removing image {image}")),
        }
    }

    /// Removes a container (forcefully, with its anonymous volumes). Missing is not an error.
    pub async fn remove_container(&self, id: &str) -> Result<()> {
        match self
            .client
            .remove_container(
                id,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    link: false,
                }),
            )
            .await
        {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(err) => Err(err).with_context(|| format!("removing container {id}")),
        }
    }

    /// The `RepoTags` of every image on this engine.
    pub async fn image_tags(&self) -> Result<Vec<String>> {
        let images = self
            .client
            .list_images(None::<bollard::query_parameters::ListImagesOptions>)
            .await
            .with_context(|| format!("listing images on {}", self.socket.display()))?;
        Ok(images.into_iter().flat_map(|i| i.repo_tags).collect())
    }
}

/// Splits `repo:tag` at the last colon that is not part of a registry `host:port`.
pub(crate) fn split_reference(reference: &str) -> Result<(&str, &str)> {
    match reference.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') && !repo.is_empty() && !tag.is_empty() => {
            Ok((repo, tag))
        }
        _ => bail!("image reference {reference:?} must be repo:tag"),
    }
}

#[cfg(test)]
mod tests {
    use super::split_reference;

    #[test]
    fn splits_references() {
        assert_eq!(split_reference("a/b:c").unwrap(), ("a/b", "c"));
        assert_eq!(
            split_reference("127.0.0.1:5000/x/y:t1").unwrap(),
            ("127.0.0.1:5000/x/y", "t1")
        );
        assert!(split_reference("127.0.0.1:5000/x/y").is_err());
        assert!(split_reference("plain").is_err());
        assert!(split_reference("a:").is_err());
    }
}
