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
    // dockerd --bridge=none deletes an interface named docker0 in its network namespace; ours
    // must never be the host's (the system daemon's bridge).
    let host_bridge = Path::new("/sys/class/net/docker0");
    let had_bridge = host_bridge.exists();
    let label = format!("berth.test={}", integration::unique_name("private"));
    let mut options = PrivateDockerdOptions::default();
    options
        .daemon_json
        .insert("labels".into(), serde_json::json!([label]));
    let mut daemon = PrivateDockerd::new(options).expect("start dockerd");
    let engine = daemon.engine().clone();
    engine.ping().await.unwrap();
    assert_ne!(engine.socket(), Path::new("/var/run/docker.sock"));

    let info = engine.client().info().await.unwrap();
    assert_eq!(info.driver.as_deref(), Some("overlay2"), "{info:?}");
    assert_eq!(
        info.labels,
        Some(vec![label.clone()]),
        "daemon.json honoured"
    );
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
    assert_eq!(host_bridge.exists(), had_bridge, "host's docker0 changed");
}

#[test]
fn failed_start_reports_dockerd_log_and_leaves_nothing_running() {
    require_root();
    let options = PrivateDockerdOptions {
        storage_driver: "berth-no-such-driver".into(),
        ..Default::default()
    };
    let err = PrivateDockerd::new(options).expect_err("bogus storage driver must fail");
    let text = format!("{err:#}");
    assert!(text.contains("dockerd exited during start-up"), "{text}");
    assert!(
        text.contains("berth-no-such-driver"),
        "error must carry dockerd's log: {text}"
    );
    // The error names the temp dir; the failed start stopped containerd and unmounted what
    // dockerd had mounted, and dropping removed the dir.
    let start = text
        .find("/berth-dockerd-")
        .expect("error names the temp dir");
    let root: String = text[..start].rsplit(' ').next().unwrap().to_string()
        + text[start..].split([' ', ':']).next().unwrap();
    assert!(root.starts_with('/'), "{root}");
    assert!(!Path::new(&root).exists(), "{root} left behind");
    let needle = format!("{root}/");
    let procs: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect();
    assert_eq!(
        procs,
        Vec::<String>::new(),
        "processes of the failed daemon still run"
    );
    assert!(mounts_under_str(&root).is_empty());
}

fn mounts_under_str(root: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(root))
        .map(str::to_string)
        .collect()
}

#[test]
fn panicking_test_still_stops_its_daemon() {
    require_root();
    let seen = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let daemon = PrivateDockerd::new(PrivateDockerdOptions::default()).unwrap();
        *seen.lock().unwrap() = Some((
            daemon.pid().unwrap(),
            daemon.containerd_pid().unwrap(),
            daemon.root().to_path_buf(),
        ));
        panic!("simulated test failure");
    }));
    assert!(result.is_err());
    let (pid, containerd_pid, root) = seen.lock().unwrap().take().unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "dockerd survived the panic"
    );
    assert!(
        !Path::new(&format!("/proc/{containerd_pid}")).exists(),
        "containerd survived"
    );
    assert!(!root.exists(), "{} survived the panic", root.display());
}
