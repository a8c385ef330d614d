//! The `image` exporter into the data root of a STOPPED private dockerd: the Docker base layers
//! already there are skipped, the berth layer is written directly with tar-split, and after the
//! daemon starts the image is listed under its tag, runs, and `docker save` reproduces the new
//! layer's diffID. A running daemon on that data root is refused. Needs root and dockerd.

use std::process::Command;

use exporter::{ImageExportRequest, ImageTarget, TargetOptions};
use integration::{busybox_image, unique_name, PrivateDockerd, PrivateDockerdOptions};
use layerstore::dockerstore::{resolve_base_image, DaemonCheck, DockerStore, StorageDriver};
use layerstore::snapshot::{LayerMeta, SnapshotOptions, SnapshotStore, StoreOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_into_stopped_data_root_then_start_and_run() {
    let mut dockerd = PrivateDockerd::new(PrivateDockerdOptions::default()).unwrap();
    let base = busybox_image(dockerd.engine()).await.unwrap();
    let docker = dockerd.engine().client().clone();
    let dstore = DockerStore::new(
        dockerd.data_root(),
        StorageDriver::from_name(dockerd.storage_driver()).unwrap(),
    );
    let bi = resolve_base_image(&docker, &dstore, base.id())
        .await
        .unwrap();

    // A berth layer on top of the base, used in place.
    let root = tempfile::Builder::new()
        .prefix("berth-offline-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let store = SnapshotStore::open(StoreOptions::new(root.path())).unwrap();
    let base_snap = store
        .create_from_chain(bi.chain(), &[], &SnapshotOptions::new("base"))
        .unwrap();
    let (top, _) = store
        .add_layer(Some(&base_snap), &SnapshotOptions::new("top"), |dir| {
            std::fs::write(
                dir.join("offline.txt"),
                "written while dockerd was stopped\n",
            )
            .unwrap();
            Ok(LayerMeta::default())
        })
        .unwrap();
    let chain = store.info(&top).unwrap().chain;

    let check = DaemonCheck {
        pidfile: Some(dockerd.pidfile()),
        socket: Some(dockerd.socket_path()),
    };
    let target = ImageTarget::ClassicOffline {
        data_root: dockerd.data_root(),
        driver: StorageDriver::from_name(dockerd.storage_driver()).unwrap(),
        check: check.clone(),
    };
    let name = format!("{}:1", unique_name("berth-test/offline"));
    let req = ImageExportRequest {
        chain: chain.layers(),
        config: None,
        names: vec![name.clone()],
        epoch: None,
    };

    // Refused while the daemon runs, and nothing is written.
    let err = target.export(&store, req.clone()).await.unwrap_err();
    assert!(
        format!("{err:?}").contains("DockerDaemonRunning"),
        "{err:?}"
    );

    dockerd.stop().unwrap();
    // Detection picks the offline mode when the engine does not answer and a data root is given.
    let detected = ImageTarget::detect(
        docker.clone(),
        &TargetOptions {
            data_root: Some(dockerd.data_root()),
            offline_check: check,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(
        matches!(detected, ImageTarget::ClassicOffline { .. }),
        "{}",
        detected.mode()
    );
    let result = detected.export(&store, req).await.unwrap();
    assert_eq!(
        (result.layers_sent, result.layers_skipped),
        (1, 1),
        "{result:?}"
    );

    dockerd.start().unwrap();
    let engine = dockerd.engine();
    let out = engine.run(&name, &["cat", "/offline.txt"]).await.unwrap();
    out.assert_success();
    assert_eq!(out.stdout, "written while dockerd was stopped\n");
    let inspect = engine.inspect_image(&name).await.unwrap();
    assert_eq!(inspect.id.as_deref(), Some(result.config_digest.as_str()));

    // docker save reproduces the new layer: its tar hashes to the diffID in the config.
    let tmp = tempfile::tempdir().unwrap();
    let tarball = tmp.path().join("img.tar");
    let st = Command::new("docker")
        .args([
            "-H",
            &format!("unix://{}", dockerd.socket_path().display()),
            "save",
            "-o",
        ])
        .arg(&tarball)
        .arg(&name)
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("tar")
        .arg("-xf")
        .arg(&tarball)
        .arg("-C")
        .arg(tmp.path())
        .status()
        .unwrap();
    assert!(st.success());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("manifest.json")).unwrap()).unwrap();
    let layers = manifest[0]["Layers"].as_array().unwrap();
    let diff_ids = inspect.root_fs.unwrap().layers.unwrap();
    assert_eq!(layers.len(), diff_ids.len());
    for (path, diff_id) in layers.iter().zip(&diff_ids) {
        use sha2::Digest;
        let data = std::fs::read(tmp.path().join(path.as_str().unwrap())).unwrap();
        assert_eq!(
            &format!("sha256:{}", hex::encode(sha2::Sha256::digest(&data))),
            diff_id
        );
    }
    drop(base);
}
