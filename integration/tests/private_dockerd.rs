//! A private dockerd starts on its own roots (overlay2), runs the busybox image, stops cleanly
//! (its process gone, its socket and pidfile removed, no mounts left) and restarts on the same
//! data root with its images intact. The system daemon is not involved.

use std::path::Path;

use integration::{busybox_image, require_root, PrivateDockerd, PrivateDockerdOptions};

fn mounts_under(root: &Path) -> Vec<String> {
    let root = root.canonicalize().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(&root))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn private_dockerd_runs_stops_and_restarts_on_same_data_root() {
    require_root();
    let mut daemon = PrivateDockerd::new(PrivateDockerdOptions::default()).expect("start dockerd");
    let engine = daemon.engine().clone();
    engine.ping().await.unwrap();
    assert_ne!(engine.socket(), Path::new("/var/run/docker.sock"));

    let info = engine.client().info().await.unwrap();
    assert_eq!(info.driver.as_deref(), Some("overlay2"), "{info:?}");
    assert_eq!(
        Path::new(info.docker_root_dir.as_deref().unwrap()),
        daemon.data_root(),
        "dockerd must use the private data root"
    );
    let pid = daemon.pid().expect("running dockerd has a pid");
    let containerd_pid = daemon.containerd_pid().expect("own containerd");
    let pidfile = std::fs::read_to_string(daemon.pidfile()).unwrap();
    assert_eq!(pidfile.trim(), pid.to_string(), "pidfile names our child");

    let image = busybox_image(&engine)
        .await
        .expect("import busybox into private dockerd");
    let out = engine
        .run(image.reference(), &["/bin/sh", "-c", "echo private; id -u"])
        .await
        .expect("run on private dockerd");
    out.assert_success();
    assert_eq!(out.stdout, "private\n0\n");
    let layer_dir = daemon.data_root().join("image/overlay2/layerdb/sha256");
    assert!(
        std::fs::read_dir(&layer_dir).unwrap().count() >= 1,
        "layer registered under the private data root"
    );

    daemon.stop().expect("clean stop");
    assert!(!daemon.is_running());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "dockerd {pid} still exists"
    );
    assert!(
        !Path::new(&format!("/proc/{containerd_pid}")).exists(),
        "containerd {containerd_pid} still exists"
    );
    assert!(
        !daemon.socket_path().exists(),
        "dockerd left its socket behind"
    );
    assert!(
        !daemon.pidfile().exists(),
        "dockerd left its pidfile behind"
    );
    assert_eq!(mounts_under(daemon.root()), Vec::<String>::new());
    assert!(engine.ping().await.is_err(), "stopped daemon still answers");

    daemon.start().expect("restart on the same data root");
    let engine = daemon.engine().clone();
    assert_ne!(daemon.pid(), Some(pid));
    let tags = engine.image_tags().await.unwrap();
    assert!(
        tags.iter().any(|t| t == image.reference()),
        "{} missing after restart: {tags:?}",
        image.reference()
    );
    let out = engine
        .run(image.reference(), &["cat", "/etc/passwd"])
        .await
        .unwrap();
    assert!(out.stdout.starts_with("root:x:0:0:"), "{out:?}");

    let root = daemon.root().to_path_buf();
    drop(image);
    drop(daemon);
    assert!(!root.exists(), "temp dir {} not removed", root.display());
}
