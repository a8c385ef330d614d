//! Docker's routine cleanup against builds that use a base image in place (issue 17), through
//! berthd's gRPC API and a private dockerd of the test's own (prunes never touch the system
//! daemon):
//! - `docker system prune -af`, `docker container prune -f`, `docker image prune -af` and `docker
//!   rmi` (with and without `-f`) of the base, over and over from the moment the base is pinned
//!   until the build has been exported (exec, commit, export): the build succeeds, the image runs
//!   with the right files, the base is intact, `docker ps` showed the running pin, and no pin is
//!   left after the build;
//! - the pin removed by force and the base deleted with `docker rmi -f` mid-build: the build fails
//!   with an error naming the image and what removed it, and nothing half-written is left in
//!   Docker (no image, no container, no orphan layer dir) or in berth's store (no mutable
//!   snapshot);
//! - berthd stopped mid-build removes its pins; berthd killed (SIGKILL) leaves a running pin,
//!   which the next start removes.
//!
//! Needs root, runc, overlayfs, dockerd and containerd, busybox-static.

mod export_support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use export_support::offline_leftovers;
use integration::buildkit_client::{Berthd, BuildOptions, BuildReport, BuildkitClient, Output};
use integration::{
    busybox_image, require_root, unique_name, PrivateDockerd, PrivateDockerdOptions,
};
use llb::RunOpts;

/// Runs `docker -H host args…` (blocking); returns (success, stdout, stderr).
fn docker(host: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("docker")
        .args(["-H", host])
        .args(args)
        .output()
        .expect("run docker");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn docker_async(host: &str, args: &[&str]) -> (bool, String, String) {
    let host = host.to_string();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&host, &a)
    })
    .await
    .unwrap()
}

/// Pin containers (all berth instances) as `(id, name, state)`; `running_only` like `docker ps`.
fn pins(host: &str, running_only: bool) -> Vec<(String, String, String)> {
    let mut args = vec![
        "ps",
        "--no-trunc",
        "--filter",
        "label=dev.berth.pin",
        "--format",
        "{{.ID}} {{.Names}} {{.State}}",
    ];
    if !running_only {
        args.insert(1, "-a");
    }
    let (ok, out, err) = docker(host, &args);
    assert!(ok, "docker ps: {err}");
    out.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((
                it.next()?.to_string(),
                it.next()?.to_string(),
                it.next()?.to_string(),
            ))
        })
        .collect()
}

/// Waits (≤ `secs`) until `docker ps` shows a running pin; returns its name.
async fn wait_running_pin(host: &str, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let h = host.to_string();
        let p = tokio::task::spawn_blocking(move || pins(&h, true))
            .await
            .unwrap();
        if let Some((_, name, _)) = p.into_iter().next() {
            return name;
        }
        assert!(Instant::now() < deadline, "no running pin within {secs} s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (≤ 15 s) until no pin container is left.
async fn wait_no_pins(host: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let h = host.to_string();
        let p = tokio::task::spawn_blocking(move || pins(&h, false))
            .await
            .unwrap();
        if p.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "pins left {what}: {p:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A build of `base` whose RUN sleeps `sleep` seconds, then reads the base (checksum of
/// /bin/busybox) and writes 24 MB (so commit and export take a while), exported as `name`.
fn long_build(base: &str, sleep: u32, name: &str) -> BuildOptions {
    let script = format!(
        "sleep {sleep}; md5sum /bin/busybox > /sum; cat /etc/passwd > /passwd; \
         dd if=/dev/urandom of=/big bs=1M count=24 2>/dev/null"
    );
    let def = llb::State::from(llb::image(base))
        .run(RunOpts::shell(&script))
        .root()
        .marshal()
        .unwrap();
    let mut attrs = BTreeMap::new();
    attrs.insert("name".to_string(), name.to_string());
    BuildOptions {
        definition: Some(def),
        output: Output::Raw("image".into(), attrs),
        ..Default::default()
    }
}

struct Setup {
    dockerd: PrivateDockerd,
    host: String,
    base_ref: String,
    base_id: String,
    berthd: Berthd,
}

async fn setup() -> (Setup, integration::TestImage) {
    require_root();
    let dockerd = PrivateDockerd::new(PrivateDockerdOptions::default()).unwrap();
    let host = dockerd.engine().host();
    let base = busybox_image(dockerd.engine()).await.unwrap();
    let berthd = Berthd::start(&["--docker-host", &host]).unwrap();
    (
        Setup {
            host,
            base_ref: base.reference().to_string(),
            base_id: base.id().to_string(),
            berthd,
            dockerd,
        },
        base,
    )
}

/// Every routine cleanup, and `docker rmi` with and without `-f`, from the moment the base is
/// pinned until the build (exec, commit, export) is done: the build succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prunes_and_rmi_during_a_build_leave_the_base_and_the_build_alone() {
    let (s, _base) = setup().await;
    let client = s.berthd.client().await.unwrap();
    let name = format!("{}:1", unique_name("berth-test/pinned"));
    let opts = long_build(&s.base_ref, 4, &name);
    let done = AtomicBool::new(false);
    let seen_running: Mutex<BTreeSet<String>> = Default::default();
    let cleanups = Mutex::new(0usize);
    let build = async {
        let r = client.build(opts).await.unwrap();
        done.store(true, Ordering::SeqCst);
        r
    };
    // A second build of the same base that outlasts the first: it shares the pin, and keeps the
    // base pinned while the cleanup round under way when the first build ends finishes.
    let keeper_def = llb::State::from(llb::image(&s.base_ref))
        .run(RunOpts::shell("sleep 12; echo keeper > /k"))
        .root()
        .marshal()
        .unwrap();
    let keeper = client.build(BuildOptions {
        definition: Some(keeper_def),
        ..Default::default()
    });
    let prune = async {
        let first = wait_running_pin(&s.host, 30).await;
        seen_running.lock().unwrap().insert(first);
        while !done.load(Ordering::SeqCst) {
            for args in [
                vec!["system", "prune", "-af"],
                vec!["container", "prune", "-f"],
                vec!["image", "prune", "-af"],
            ] {
                let (ok, _, err) = docker_async(&s.host, &args).await;
                assert!(ok, "docker {args:?}: {err}");
            }
            // Docker's own conflicts: the tag (must force) and the ID (running container, cannot
            // be forced even with -f).
            for args in [
                vec!["rmi", s.base_ref.as_str()],
                vec!["rmi", s.base_id.as_str()],
                vec!["rmi", "-f", s.base_id.as_str()],
            ] {
                let (ok, _, err) = docker_async(&s.host, &args).await;
                if done.load(Ordering::SeqCst) {
                    break;
                }
                assert!(!ok, "docker {args:?} removed the pinned base");
                assert!(err.contains("conflict"), "docker {args:?}: {err}");
            }
            // The base is intact while the build runs (after the build, nothing holds it any
            // more and a prune still under way may take it: that is fine).
            let (ok, _, err) =
                docker_async(&s.host, &["image", "inspect", s.base_id.as_str()]).await;
            if !done.load(Ordering::SeqCst) {
                assert!(ok, "base gone during the build: {err}");
            }
            *cleanups.lock().unwrap() += 1;
            let h = s.host.clone();
            for (_, n, _) in tokio::task::spawn_blocking(move || pins(&h, true))
                .await
                .unwrap()
            {
                seen_running.lock().unwrap().insert(n);
            }
        }
    };
    let (report, keeper, ()) = tokio::join!(build, keeper, prune);
    let keeper = keeper.unwrap();
    keeper.solve.as_ref().unwrap_or_else(|e| {
        panic!(
            "second build failed: {e}\nberthd log:\n{}",
            s.berthd.log_text()
        )
    });
    let resp = report
        .solve
        .as_ref()
        .unwrap_or_else(|e| panic!("build failed: {e}\nberthd log:\n{}", s.berthd.log_text()));
    let cleanups = *cleanups.lock().unwrap();
    assert!(
        cleanups >= 2,
        "only {cleanups} cleanup rounds ran during the build"
    );
    let seen = seen_running.lock().unwrap().clone();
    assert!(
        seen.iter().all(|n| n.starts_with("berth-pin-")),
        "docker ps showed {seen:?}"
    );
    assert_eq!(
        seen.len(),
        1,
        "the two builds did not share one pin: {seen:?}"
    );
    let short = s.base_id.trim_start_matches("sha256:").get(..12).unwrap();
    assert!(
        seen.iter().any(|n| n.contains(short)),
        "no pin named after the base {short}: {seen:?}"
    );
    // `docker image prune -af` also removes the built image once it exists (nothing uses it):
    // if a round did, build again (no more prunes now; the base is still there thanks to the
    // second build); the result comes from the cache made under the prunes.
    if !docker(&s.host, &["image", "inspect", &name]).0 {
        let again = client
            .build(long_build(&s.base_ref, 4, &name))
            .await
            .unwrap();
        again.solve.as_ref().unwrap_or_else(|e| {
            panic!("rebuild failed: {e}\nberthd log:\n{}", s.berthd.log_text())
        });
        for v in again.vertices().values() {
            if v.name.starts_with("/bin/sh") {
                assert!(v.cached, "RUN not cached on the rebuild");
            }
        }
    }
    // The image is right: the RUN read the intact base (/bin/busybox is the host's).
    let want = Command::new("md5sum").arg("/bin/busybox").output().unwrap();
    let want = String::from_utf8_lossy(&want.stdout).into_owned();
    let (ok, got, err) = docker(
        &s.host,
        &[
            "run",
            "--rm",
            "--network",
            "none",
            &name,
            "sh",
            "-c",
            "cat /sum; md5sum /bin/busybox; wc -c < /big",
        ],
    );
    assert!(ok, "built image does not run: {err}");
    assert_eq!(got, format!("{want}{want}25165824\n"));
    assert!(resp.exporter_response.contains_key("containerimage.digest"));
    wait_no_pins(&s.host, "after the build").await;
    println!("{cleanups} cleanup rounds during the build; pins seen running: {seen:?}");
}

/// The pin removed by force and the base deleted with `docker rmi -f` while the RUN runs: the
/// build fails with the clear error, and nothing half-written is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_removal_mid_build_fails_clearly_and_leaves_nothing() {
    let (s, base) = setup().await;
    let client = s.berthd.client().await.unwrap();
    let (_, images_before, _) = docker(&s.host, &["images", "-aq", "--no-trunc"]);
    let name = format!("{}:1", unique_name("berth-test/forced"));
    let opts = long_build(&s.base_ref, 6, &name);
    let build = client.build(opts);
    let api = s.dockerd.engine().client().clone();
    let force = async {
        wait_running_pin(&s.host, 30).await;
        // berth pins again when its pin disappears while the image is still there, and a
        // running pin makes even `docker rmi -f` fail: remove pins and the image through the API
        // (quicker than the CLI) until the image is gone.
        for _ in 0..50 {
            let filters = std::collections::HashMap::from([(
                "label".to_string(),
                vec!["dev.berth.pin".to_string()],
            )]);
            let list = api
                .list_containers(Some(
                    integration::bollard::query_parameters::ListContainersOptions {
                        all: true,
                        filters: Some(filters),
                        ..Default::default()
                    },
                ))
                .await
                .unwrap();
            for c in list {
                let _ = api
                    .remove_container(
                        c.id.as_deref().unwrap_or_default(),
                        Some(
                            integration::bollard::query_parameters::RemoveContainerOptions {
                                force: true,
                                ..Default::default()
                            },
                        ),
                    )
                    .await;
            }
            let r = api
                .remove_image(
                    &s.base_id,
                    Some(integration::bollard::query_parameters::RemoveImageOptions {
                        force: true,
                        ..Default::default()
                    }),
                    None,
                )
                .await;
            if r.is_ok() {
                return;
            }
        }
        panic!("the base could not be removed by force");
    };
    let (report, ()) = tokio::join!(build, force);
    let report = report.unwrap();
    std::mem::forget(base); // its tag went with the image
    let err = match &report.solve {
        Ok(_) => panic!(
            "build succeeded without its base\nberthd log:\n{}",
            s.berthd.log_text()
        ),
        Err(e) => e.message().to_string(),
    };
    println!("forced removal: {err}");
    for want in [
        "base image ".to_string(),
        s.base_ref.clone(),
        s.base_id.clone(),
        "was removed from Docker while the build used it".to_string(),
        "pin container berth-pin-".to_string(),
    ] {
        assert!(err.contains(&want), "{want:?} not in: {err}");
    }
    assert!(!err.contains("No such file or directory"), "{err}");
    // Nothing in Docker: no new image (and the base is gone), no container, no orphan layer dir.
    let (_, images_after, _) = docker(&s.host, &["images", "-aq", "--no-trunc"]);
    let before: BTreeSet<&str> = images_before.lines().collect();
    let new: Vec<&str> = images_after
        .lines()
        .filter(|i| !before.contains(i))
        .collect();
    assert!(new.is_empty(), "images left in Docker: {new:?}");
    assert!(!images_after.contains(&s.base_id));
    wait_no_pins(&s.host, "after the failed build").await;
    let (_, containers, _) = docker(&s.host, &["ps", "-aq"]);
    assert!(
        containers.trim().is_empty(),
        "containers left: {containers}"
    );
    let left = offline_leftovers(&s.dockerd.data_root());
    assert!(left.is_empty(), "left in Docker's data root: {left:?}");
    // Nothing half-written in berth's store: no mutable (unfinished) snapshot.
    let du = du(&client).await;
    let mutable: Vec<_> = du.iter().filter(|r| r.mutable).collect();
    assert!(
        mutable.is_empty(),
        "unfinished snapshots in berth's store: {mutable:?}"
    );
}

async fn du(client: &BuildkitClient) -> Vec<protos::moby::buildkit::v1::UsageRecord> {
    client
        .control()
        .disk_usage(protos::moby::buildkit::v1::DiskUsageRequest::default())
        .await
        .unwrap()
        .into_inner()
        .record
}

/// Pins go when berthd stops mid-build; a killed berthd's running pin goes at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_go_when_berthd_stops_and_after_a_crash() {
    let (mut s, _base) = setup().await;
    let name = format!("{}:1", unique_name("berth-test/stop"));
    for crash in [false, true] {
        let client = s.berthd.client().await.unwrap();
        let opts = long_build(&s.base_ref, 60, &name);
        let build = tokio::spawn(async move { client.build(opts).await });
        wait_running_pin(&s.host, 30).await;
        if crash {
            s.berthd.kill().unwrap();
            // The killed berthd's pin keeps running: it still keeps the image.
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(pins(&s.host, true).len(), 1, "{:?}", pins(&s.host, false));
            let (ok, _, _) = docker(&s.host, &["rmi", &s.base_id]);
            assert!(!ok, "base removed while a crashed berthd's pin runs");
            s.berthd.restart().unwrap();
            wait_no_pins(&s.host, "after restarting a killed berthd").await;
        } else {
            s.berthd.terminate(Duration::from_secs(20)).unwrap();
            wait_no_pins(&s.host, "after berthd stopped").await;
            s.berthd.restart().unwrap();
        }
        let _: Result<anyhow::Result<BuildReport>, _> =
            tokio::time::timeout(Duration::from_secs(20), build)
                .await
                .map(|j| j.unwrap());
    }
    let log = s.berthd.log_text();
    assert!(
        log.contains("removed base-image pins of a previous berthd"),
        "no stale-pin removal in the log:\n{log}"
    );
}
