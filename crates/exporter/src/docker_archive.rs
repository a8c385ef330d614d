//! The `docker` client output: the image as a docker-archive (`docker save` format) streamed to
//! the client, for `docker load`. With `thin`, the layers the Docker Engine berthd is bound to
//! already has are listed in the manifest but carry no tar, so `buildctl … --output type=docker |
//! docker load` into that engine moves only the new layers (the engine looks present layers up by
//! chainID and never opens their files, as with the thin live load of the `image` exporter).

use std::path::PathBuf;

use bollard::Docker;
use layerstore::snapshot::SnapshotStore;

use base64::Engine as _;

use crate::archive::{ExportLayer, OciLayout};
use crate::docker_image::{
    docker_manifest, image_config, ImageExportRequest, ImageExportResult,
    DOCKER_MANIFEST_MEDIA_TYPE,
};
use crate::docker_load::chain_ids;
use crate::layers::export_layer_tars;
use crate::oci::{familiar_name, index_and_descriptor, sha256_digest};
use crate::Result;

/// Writes the result as a docker-archive (`docker save` format) that is an OCI image layout too,
/// as buildkitd's `docker` exporter writes it, to `out`: the `docker` exporter's stream to the
/// client, which `docker load` accepts. `req.names` are normalized names: `index.json` carries
/// them, `RepoTags` their familiar form (names pinned only by digest get no tag). Blocking;
/// streams each layer, never holding one in memory. Layers travel uncompressed (their digests
/// are their diffIDs, known before anything is written, and `docker load` takes them as they
/// are). `ready` is called with the result before the first byte is written.
///
/// With `thin`, the layers that Docker Engine has (see [`DockerPresence`]) are listed in the
/// manifest but their tars are left out, so `docker load` of the archive into that engine moves
/// only the new layers; `on_layer(diff_id, size, sent)` is told about every layer first.
pub fn write_docker_client_archive(
    store: &SnapshotStore,
    req: &ImageExportRequest<'_>,
    thin: Option<&DockerPresence>,
    created: &chrono::DateTime<chrono::Utc>,
    on_layer: &mut dyn FnMut(&str, u64, bool),
    ready: &mut dyn FnMut(&ImageExportResult) -> Result<()>,
    out: &mut dyn std::io::Write,
) -> Result<ImageExportResult> {
    let (layers, in_docker) = export_layer_tars(store, req.chain)?;
    let config = image_config(store, req, &layers)?;
    let manifest = docker_manifest(&config, &layers);
    let (index, descriptor) = index_and_descriptor(
        DOCKER_MANIFEST_MEDIA_TYPE,
        &manifest,
        &req.names,
        created,
        &Default::default(),
        Some(&crate::oci::config_platform(&config.bytes)),
    )?;
    let include = match thin {
        Some(p) => p.include(&layers, &in_docker)?,
        None => vec![true; layers.len()],
    };
    let (mut layers_skipped, mut bytes_skipped) = (0, 0);
    for (l, &inc) in layers.iter().zip(&include) {
        on_layer(&l.diff_id, l.size, inc);
        if !inc {
            layers_skipped += 1;
            bytes_skipped += l.size;
        }
    }
    let mut result = ImageExportResult {
        config_digest: config.digest.clone(),
        manifest_digest: sha256_digest(&manifest),
        descriptor: base64::engine::general_purpose::STANDARD.encode(descriptor),
        names: req.names.clone(),
        layers_skipped,
        bytes_skipped,
        ..Default::default()
    };
    ready(&result)?;
    let repo_tags: Vec<String> = req
        .names
        .iter()
        .filter(|n| !n.contains('@'))
        .map(|n| familiar_name(n))
        .collect();
    let layout = OciLayout {
        manifest: &manifest,
        index: &index,
    };
    let stats = crate::archive::write_docker_archive(
        out,
        &config,
        &layers,
        &include,
        &repo_tags,
        Some(layout),
    )?;
    result.layers_sent = stats.layers_sent.len();
    result.bytes_sent = stats.layer_bytes_sent;
    Ok(result)
}

/// What a Docker Engine is known to hold, for thin docker-archives (`type=docker,thin=true`).
///
/// Same rule as the thin live load ([`DockerEngine::load_thin`]): a layer is present when it came
/// from that engine's own store, or when its `layerdb/sha256/<chainID>/diff` exists under the
/// engine's data root (read-only; berthd must see the data root); and only while every layer
/// below it is present too, since Docker looks layers up by chainID.
#[derive(Debug, Clone)]
pub enum DockerPresence {
    /// A classic-store engine; its layerdb when readable.
    Classic {
        /// `<data-root>/image/<driver>/layerdb`, if berthd can read it.
        layerdb: Option<PathBuf>,
    },
    /// Nothing can be left out (containerd store, or the engine did not answer); why.
    Unknown(String),
}

impl DockerPresence {
    /// Asks the engine (`GET /info`) where its layers are; `data_root` overrides the data root it
    /// reports (as `--docker-data-root` does).
    pub async fn detect(docker: &Docker, data_root: Option<&std::path::Path>) -> DockerPresence {
        let info = match docker.info().await {
            Ok(i) => i,
            Err(e) => {
                return DockerPresence::Unknown(format!("the Docker Engine did not answer: {e}"))
            }
        };
        let containerd_store = info.driver_status.iter().flatten().any(|kv| {
            kv.len() == 2 && kv[0] == "driver-type" && kv[1] == "io.containerd.snapshotter.v1"
        });
        if containerd_store {
            return DockerPresence::Unknown(
                "the Docker Engine uses the containerd image store, whose docker load needs every layer".into(),
            );
        }
        let driver = info.driver.clone().unwrap_or_default();
        let layerdb = data_root
            .map(PathBuf::from)
            .or_else(|| info.docker_root_dir.clone().map(PathBuf::from))
            .map(|r| r.join("image").join(&driver).join("layerdb"))
            .filter(|p| p.is_dir());
        DockerPresence::Classic { layerdb }
    }

    /// `include[i]`: whether layer `i`'s tar must travel.
    pub fn include(&self, layers: &[ExportLayer], in_docker: &[bool]) -> Result<Vec<bool>> {
        let layerdb = match self {
            DockerPresence::Unknown(_) => return Ok(vec![true; layers.len()]),
            DockerPresence::Classic { layerdb } => layerdb,
        };
        let chains = chain_ids(layers.iter().map(|l| l.diff_id.as_str()))?;
        let mut include = Vec::with_capacity(layers.len());
        let mut missing_below = false;
        for (chain, &from_docker) in chains.iter().zip(in_docker) {
            let hinted = layerdb.as_ref().is_some_and(|db| {
                let hex = chain.strip_prefix("sha256:").unwrap_or(chain);
                db.join("sha256").join(hex).join("diff").is_file()
            });
            let present = !missing_below && (from_docker || hinted);
            missing_below |= !present;
            include.push(!present);
        }
        Ok(include)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    struct Nothing;
    impl crate::LayerSource for Nothing {
        fn write_tar(&self, _: &mut dyn std::io::Write) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn layer(n: u8) -> ExportLayer {
        ExportLayer {
            diff_id: format!("sha256:{}", hex::encode([n; 32])),
            size: 10,
            source: Some(Arc::new(Nothing)),
        }
    }

    #[test]
    fn thin_leaves_out_present_chains_only() {
        let layers = [layer(1), layer(2), layer(3), layer(4)];
        let chains = chain_ids(layers.iter().map(|l| l.diff_id.as_str())).unwrap();
        let db = tempfile::tempdir().unwrap();
        // Docker has layer 3's chain in its layerdb, but not layer 2's: layer 3 must travel anyway.
        let mark = |c: &str| {
            let d = db
                .path()
                .join("sha256")
                .join(c.strip_prefix("sha256:").unwrap());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("diff"), c).unwrap();
        };
        mark(&chains[2]);
        let p = DockerPresence::Classic {
            layerdb: Some(db.path().to_path_buf()),
        };
        let from_docker = [true, false, false, false];
        assert_eq!(
            p.include(&layers, &from_docker).unwrap(),
            [false, true, true, true]
        );
        // With layer 2 in the layerdb too, 1–3 stay out and only 4 travels.
        mark(&chains[1]);
        assert_eq!(
            p.include(&layers, &from_docker).unwrap(),
            [false, false, false, true]
        );
        // Without a readable layerdb only Docker's own layers are left out.
        let p = DockerPresence::Classic { layerdb: None };
        assert_eq!(
            p.include(&layers, &from_docker).unwrap(),
            [false, true, true, true]
        );
        // A containerd-store engine gets everything.
        let p = DockerPresence::Unknown("containerd".into());
        assert_eq!(p.include(&layers, &from_docker).unwrap(), [true; 4]);
    }
}
