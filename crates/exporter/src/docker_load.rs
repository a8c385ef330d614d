//! Export into a live Docker Engine with the classic store: a thin `POST /images/load`.
//!
//! The archive's manifest lists every layer, but only the layers whose chainID the daemon lacks
//! carry a tar (see [`crate::write_docker_archive`]); the daemon looks present layers up by chainID
//! and never opens their files. Which layers are present is decided from what the caller knows
//! (layers that came from Docker's store) plus, when berthd can see Docker's data root, the
//! existence of `layerdb/sha256/<chainID>` — read-only, and only a hint: if the daemon answers that
//! a listed layer's tar is missing, the load is retried with every layer berth holds.
//!
//! Tags are applied afterwards through `POST /images/{id}/tag`, never by the load itself, so a tag
//! only ever points at an image that exists; the previous holder of a tag keeps its image, as with
//! `docker build`. Nothing here writes to Docker's store behind the daemon.

use std::io::{self, Write};
use std::path::PathBuf;

use bollard::Docker;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::archive::{write_docker_archive, ArchiveStats, ExportLayer};
use crate::image::ImageConfig;
use crate::{Error, Result};
use layerstore::dockerstore::fault::hold_point;
use layerstore::dockerstore::fault_point;

/// What a thin load did.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// The image ID (`sha256:<hex>` of the config).
    pub image_id: String,
    /// What the final archive carried.
    pub sent: ArchiveStats,
    /// Layers left out because Docker had them.
    pub layers_skipped: usize,
    /// Bytes of layer tar not sent because Docker had them.
    pub bytes_skipped: u64,
    /// Loads attempted (2 when the presence hint was wrong).
    pub attempts: u32,
}

/// A live Docker Engine with the classic image store.
#[derive(Debug, Clone)]
pub struct DockerEngine {
    docker: Docker,
    layerdb: Option<PathBuf>,
}

/// chainIDs (`sha256:<hex>`) of every prefix of a layer chain, as Docker computes them.
pub(crate) fn chain_ids<'a>(diff_ids: impl IntoIterator<Item = &'a str>) -> Result<Vec<String>> {
    let digests = diff_ids
        .into_iter()
        .map(|d| {
            d.parse::<layerstore::Digest>()
                .map_err(|source| Error::Store {
                    what: format!("diffID {d:?}"),
                    source,
                })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(layerstore::tar::chain_ids(&digests)
        .iter()
        .map(ToString::to_string)
        .collect())
}

impl DockerEngine {
    /// `layerdb` is Docker's `<data-root>/image/<driver>/layerdb` when berthd can read it.
    pub fn new(docker: Docker, layerdb: Option<PathBuf>) -> Self {
        DockerEngine { docker, layerdb }
    }

    /// The Docker client.
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    fn hinted_present(&self, chain_id: &str) -> bool {
        let Some(db) = &self.layerdb else {
            return false;
        };
        let hex = chain_id.strip_prefix("sha256:").unwrap_or(chain_id);
        db.join("sha256").join(hex).join("diff").is_file()
    }

    /// Registers the image with the daemon, sending only the layers it lacks.
    /// `in_docker[i]` is true for layers known to be in Docker already (base image layers).
    pub async fn load_thin(
        &self,
        config: &ImageConfig,
        layers: &[ExportLayer],
        in_docker: &[bool],
    ) -> Result<LoadReport> {
        assert_eq!(layers.len(), in_docker.len(), "one presence flag per layer");
        let chains = chain_ids(layers.iter().map(|l| l.diff_id.as_str()))?;
        // A layer is present only if its whole chain is: once one is missing, all above it are.
        let mut include = Vec::with_capacity(layers.len());
        let mut missing_below = false;
        for (i, chain) in chains.iter().enumerate() {
            let present = !missing_below && (in_docker[i] || self.hinted_present(chain));
            missing_below |= !present;
            include.push(!present);
        }
        fault_point("live:before-load");
        hold_point("live:before-load").await;
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.load_once(config, layers, &include).await {
                Ok(sent) => {
                    let (mut layers_skipped, mut bytes_skipped) = (0, 0);
                    for (l, inc) in layers.iter().zip(&include) {
                        if !inc {
                            layers_skipped += 1;
                            bytes_skipped += l.size;
                        }
                    }
                    fault_point("live:loaded");
                    hold_point("live:loaded").await;
                    return Ok(LoadReport {
                        image_id: config.digest.clone(),
                        sent,
                        layers_skipped,
                        bytes_skipped,
                        attempts,
                    });
                }
                Err(Error::DockerLoad { message })
                    if attempts == 1 && is_missing_layer(&message) =>
                {
                    // The hint was wrong: send every layer berth holds.
                    tracing::warn!(%message, "docker lacked a layer berth thought present; retrying with all layers");
                    // `telemetry::metrics::DOCKER_RETRIES` (a no-op without berthd's recorder)
                    metrics::counter!("berth_docker_api_retries_total", "op" => "images_load")
                        .increment(1);
                    let mut changed = false;
                    for (l, inc) in layers.iter().zip(include.iter_mut()) {
                        if !*inc && l.source.is_some() {
                            *inc = true;
                            changed = true;
                        }
                    }
                    if !changed {
                        return Err(Error::DockerLoad { message });
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn load_once(
        &self,
        config: &ImageConfig,
        layers: &[ExportLayer],
        include: &[bool],
    ) -> Result<ArchiveStats> {
        let (tx, rx) = mpsc::channel::<Bytes>(8);
        let config_w = config.clone();
        let layers_w = layers.to_vec();
        let include_w = include.to_vec();
        let writer = tokio::task::spawn_blocking(move || {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, ChannelWriter { tx, sent: 0 });
            let stats = write_docker_archive(&mut w, &config_w, &layers_w, &include_w, &[], None)?;
            w.flush().map_err(|source| Error::ArchiveWrite { source })?;
            Ok::<_, Error>(stats)
        });
        let body = tokio_stream_from(rx);
        let mut progress = self.docker.import_image_stream(
            bollard::query_parameters::ImportImageOptions {
                quiet: true,
                ..Default::default()
            },
            body,
            None,
        );
        let mut failure = None;
        let mut loaded = false;
        while let Some(item) = progress.next().await {
            match item {
                Ok(info) => {
                    if let Some(detail) = info.error_detail.and_then(|d| d.message).or(info.error) {
                        failure = Some(detail);
                    } else if let Some(s) = info.stream.as_deref() {
                        loaded |= s.contains("Loaded image");
                    }
                }
                Err(e) => failure = Some(e.to_string()),
            }
        }
        drop(progress);
        let stats = writer.await.map_err(|e| Error::DockerLoad {
            message: format!("archive writer: {e}"),
        })?;
        if let Some(message) = failure {
            // An error inside the 200 progress stream (`telemetry::metrics::DOCKER_ERRORS`).
            metrics::counter!(
                "berth_docker_api_errors_total",
                "method" => "POST",
                "endpoint" => "images",
                "kind" => "stream"
            )
            .increment(1);
            return Err(Error::DockerLoad { message });
        }
        let stats = stats?;
        if !loaded {
            // quiet=1 still reports "Loaded image ID"; check the image is really there.
            self.docker
                .inspect_image(&config.digest)
                .await
                .map_err(|e| Error::DockerLoad {
                    message: format!("image {} not found after load: {e}", config.digest),
                })?;
        }
        Ok(stats)
    }

    /// Points each name at the image through `POST /images/{id}/tag`. Fault points
    /// `live:tagged-first` and `live:tagged` (also in the containerd mode, whose tags go through
    /// the Engine too).
    pub async fn tag(&self, image_id: &str, names: &[String]) -> Result<()> {
        for (i, name) in names.iter().enumerate() {
            if i == 1 {
                fault_point("live:tagged-first");
            }
            let (repo, tag) = split_tag(name)?;
            self.docker
                .tag_image(
                    image_id,
                    Some(bollard::query_parameters::TagImageOptions {
                        repo: Some(repo),
                        tag: Some(tag),
                    }),
                )
                .await
                .map_err(|e| Error::DockerTag {
                    name: name.clone(),
                    message: e.to_string(),
                })?;
        }
        if !names.is_empty() {
            fault_point("live:tagged");
        }
        Ok(())
    }
}

fn is_missing_layer(message: &str) -> bool {
    message.contains("layer.tar") && message.contains("no such file")
}

/// Splits `repo[:tag]` (the registry part may carry a port) into repository and tag.
pub fn split_tag(name: &str) -> Result<(String, String)> {
    if name.is_empty() || name.contains('@') {
        return Err(Error::InvalidName {
            name: name.to_string(),
            reason: "expected repository[:tag]",
        });
    }
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    match name[last_slash..].rfind(':') {
        Some(i) => {
            let (repo, tag) = name.split_at(last_slash + i);
            let tag = &tag[1..];
            if repo.is_empty() || tag.is_empty() {
                return Err(Error::InvalidName {
                    name: name.to_string(),
                    reason: "empty repository or tag",
                });
            }
            Ok((repo.to_string(), tag.to_string()))
        }
        None => Ok((name.to_string(), "latest".to_string())),
    }
}

struct ChannelWriter {
    tx: mpsc::Sender<Bytes>,
    sent: u64,
}

/// Bytes of the load request after which the `live:mid-load` fault point fires.
const MID_LOAD_BYTES: u64 = 2 << 20;

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx
            .blocking_send(Bytes::copy_from_slice(buf))
            .map_err(|_| {
                io::Error::new(io::ErrorKind::BrokenPipe, "docker closed the load request")
            })?;
        let before = self.sent;
        self.sent += buf.len() as u64;
        if before < MID_LOAD_BYTES && self.sent >= MID_LOAD_BYTES {
            fault_point("live:mid-load");
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn tokio_stream_from(
    mut rx: mpsc::Receiver<Bytes>,
) -> impl futures::Stream<Item = Bytes> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest as _, Sha256};

    #[test]
    fn chain_ids_follow_docker() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let ids = chain_ids([a.as_str(), b.as_str()]).unwrap();
        assert_eq!(ids[0], a);
        let want = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(format!("{a} {b}").as_bytes()))
        );
        assert_eq!(ids[1], want);
        assert!(
            chain_ids(["sha256:zz"]).is_err(),
            "malformed diffIDs are rejected"
        );
    }

    #[test]
    fn split_tag_cases() {
        let ok = [
            ("app", ("app", "latest")),
            ("app:v1", ("app", "v1")),
            ("127.0.0.1:5000/x/app", ("127.0.0.1:5000/x/app", "latest")),
            ("127.0.0.1:5000/x/app:t", ("127.0.0.1:5000/x/app", "t")),
        ];
        for (name, (r, t)) in ok {
            assert_eq!(
                split_tag(name).unwrap(),
                (r.to_string(), t.to_string()),
                "{name}"
            );
        }
        for bad in ["", "app@sha256:00", "app:", ":x"] {
            assert!(split_tag(bad).is_err(), "{bad}");
        }
    }
}
