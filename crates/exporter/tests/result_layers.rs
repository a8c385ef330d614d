//! A result made of a Docker base image used in place plus a berth layer becomes exportable
//! layers whose tars hash to their diffIDs (Docker's layer reassembled from its own tar-split,
//! berth's written by the layer writer), and a thin load of it runs in the real dockerd with the
//! berth layer's whiteout applied. Needs root, overlayfs and the system Docker Engine.

use std::io::Write;
use std::process::Command;
use std::sync::Arc;

use exporter::image::{build_config, ConfigInput, LayerInfo, Platform};
use exporter::{export_layers, DockerEngine, ExportLayer, LayerSource};
use layerstore::dockerstore::{resolve_base_image, DockerStore, StorageDriver};
use layerstore::snapshot::{LayerMeta, SnapshotOptions, SnapshotStore, StoreOptions};
use sha2::{Digest, Sha256};

struct MemLayer(Vec<u8>);
impl LayerSource for MemLayer {
    fn write_tar(&self, out: &mut dyn Write) -> std::io::Result<()> {
        out.write_all(&self.0)
    }
}

struct HashCount(Sha256, u64);
impl Write for HashCount {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.update(b);
        self.1 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn busybox_tar() -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static must be installed");
    let mut b = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    b.append_data(&mut dir, "bin/", std::io::empty()).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(busybox.len() as u64);
    h.set_mode(0o755);
    b.append_data(&mut h, "bin/busybox", &busybox[..]).unwrap();
    for app in ["sh", "cat"] {
        let mut l = tar::Header::new_gnu();
        l.set_entry_type(tar::EntryType::Symlink);
        l.set_size(0);
        l.set_mode(0o777);
        b.append_link(&mut l, format!("bin/{app}"), "busybox")
            .unwrap();
    }
    b.into_inner().unwrap()
}

fn config(layers: &[ExportLayer], cmd: &str) -> exporter::image::ImageConfig {
    let infos: Vec<LayerInfo> = layers
        .iter()
        .map(|l| LayerInfo {
            diff_id: l.diff_id.clone(),
            description: "t".into(),
            created: None,
        })
        .collect();
    let base = format!(
        r#"{{"os":"linux","architecture":"amd64","config":{{"Cmd":["/bin/sh","-c","{cmd}"]}}}}"#
    );
    build_config(&ConfigInput {
        base: Some(base.as_bytes()),
        layers: &infos,
        epoch: None,
        platform: &Platform::native(),
        now: chrono::Utc::now(),
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_base_plus_berth_layer_exports_exact_tars_and_runs() {
    let docker = bollard::Docker::connect_with_local_defaults().expect("docker socket");
    let info = docker.info().await.expect("docker info");
    let driver = StorageDriver::from_name(info.driver.as_deref().unwrap_or_default())
        .expect("supported storage driver");
    let data_root = info.docker_root_dir.clone().expect("docker root dir");
    let engine = DockerEngine::new(docker.clone(), None);

    // A base image in Docker (loaded once in full, as a user's base image would be).
    let tar = busybox_tar();
    let base = ExportLayer {
        diff_id: format!("sha256:{}", hex::encode(Sha256::digest(&tar))),
        size: tar.len() as u64,
        source: Some(Arc::new(MemLayer(tar))),
    };
    let base_cfg = config(std::slice::from_ref(&base), "true");
    engine
        .load_thin(&base_cfg, std::slice::from_ref(&base), &[false])
        .await
        .unwrap();
    let _rm_base = Rmi(base_cfg.digest.clone());

    // Used in place: its layers are Docker's own dirs.
    let dstore = DockerStore::new(&data_root, driver);
    let bi = resolve_base_image(&docker, &dstore, &base_cfg.digest)
        .await
        .unwrap();
    let root = tempfile::Builder::new()
        .prefix("berth-exp-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let store = SnapshotStore::open(StoreOptions::new(root.path())).unwrap();
    let base_snap = store
        .create_from_chain(bi.chain(), &[], &SnapshotOptions::new("base"))
        .unwrap();

    // A berth layer on top: a new file and a whiteout of /bin/cat.
    let (top_snap, _lid) = store
        .add_layer(Some(&base_snap), &SnapshotOptions::new("top"), |dir| {
            std::fs::create_dir_all(dir.join("etc")).unwrap();
            std::fs::write(dir.join("etc/marker"), "from a berth layer\n").unwrap();
            std::fs::create_dir_all(dir.join("bin")).unwrap();
            let st = Command::new("mknod")
                .arg(dir.join("bin/cat"))
                .args(["c", "0", "0"])
                .status()
                .unwrap();
            assert!(st.success());
            Ok(LayerMeta::default())
        })
        .unwrap();
    let chain = store.info(&top_snap).unwrap().chain;
    let (layers, in_docker) = tokio::task::spawn_blocking({
        let store = store.clone();
        move || export_layers(&store, chain.layers())
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(in_docker, vec![true, false]);
    assert_eq!(layers[0].diff_id, base.diff_id);

    // Every layer's tar hashes to its diffID and has its announced size.
    for l in &layers {
        let mut h = HashCount(Sha256::new(), 0);
        l.source.as_ref().unwrap().write_tar(&mut h).unwrap();
        assert_eq!(format!("sha256:{}", hex::encode(h.0.finalize())), l.diff_id);
        assert_eq!(h.1, l.size);
    }
    // The berth layer's diffID is remembered for the next export.
    let again = export_layers(&store, store.info(&top_snap).unwrap().chain.layers()).unwrap();
    assert_eq!(again.0[1].diff_id, layers[1].diff_id);

    // Thin load: only the berth layer travels; the image runs with the whiteout applied.
    let cfg = config(
        &layers,
        "busybox cat /etc/marker; test -e /bin/cat && echo cat-here || echo cat-gone",
    );
    let r = engine.load_thin(&cfg, &layers, &in_docker).await.unwrap();
    let _rm = Rmi(cfg.digest.clone());
    assert_eq!(r.sent.layers_sent, vec![layers[1].diff_id.clone()]);
    let out = Command::new("docker")
        .args(["run", "--rm", "--network", "none", &cfg.digest])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "from a berth layer\ncat-gone\n"
    );
}

struct Rmi(String);
impl Drop for Rmi {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
    }
}
