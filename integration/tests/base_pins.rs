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
//! - berthd stopped mid-build removes its pins; berthd killed (SIGKILL) takes its running pin
//!   with it within seconds (nothing left in `docker ps -a`), and the next start removes a pin
//!   it had only created;
//! - at each phase of a build, reached exactly (berthd's hold points `BERTH_FAULT_HOLD` at the
//!   base's resolution once its pin runs, before the exec's commit, before the export's load and
//!   between load and tag; a RUN waiting for a file the test writes into its root for the
//!   running exec): every routine cleanup and `docker rmi` of the base's tag and ID with and
//!   without `-f` leave the build alone (one build, checked at each phase: the base is intact,
//!   `docker ps` shows its one running pin with the owner's labels); the pin and the base
//!   removed by force fail the build with the clear error and leave nothing, at every phase
//!   before the load (after it, the loaded image holds the layers and the build succeeds);
//! - pins start in the background, so a step may read the base before its pin runs: `docker
//!   container prune` and `image prune` deleting the base under such a RUN (its pin held before
//!   its start) make berth drop what the RUN made and run the build again on the base pulled
//!   again, which succeeds with the right image;
//! - a build whose result nothing reads (an image export into this Docker), sent as LLB with
//!   `Control.Solve` or through the Dockerfile frontend, makes no pin before its load (pin delay
//!   a minute), and a base deleted then makes berth run the build again; a gateway client's
//!   solve makes no pin either, its first `ReadFile` on the ref makes it (cleanups after leave
//!   the base, the bytes are right), and a base deleted before that pin runs fails the read with
//!   the error naming the image; the state a failed RUN left (the gateway's `errdefs.Solve`)
//!   holds its base's pin the same way;
//! - `soak_builds_under_prunes` (ignored): 200 builds with a prune every few seconds.
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

/// Pins go when berthd stops mid-build, and when it is killed (SIGKILL) without its help: the
/// pin's stdin attach closes with berthd's connection, the pin process exits and Docker removes
/// the container (a root never used again leaves nothing). A pin that was only created when berthd
/// died goes at the next start on the same root.
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
            let killed = Instant::now();
            // Gone within a few seconds, running or not, with nothing of berthd's doing.
            wait_no_pins(&s.host, "after berthd was killed").await;
            println!("pins of a killed berthd gone after {:?}", killed.elapsed());
            assert!(
                killed.elapsed() < Duration::from_secs(5),
                "the killed berthd's pin took {:?} to go",
                killed.elapsed()
            );
            // A pin container a killed berthd had only created (never started, so no attach):
            // the next start on the same root removes it.
            let instance = format!("worker:{}", s.berthd.root().join("worker").display());
            let label = format!("dev.berth.pin={instance}");
            let (ok, created, err) =
                docker(&s.host, &["create", "--label", &label, &s.base_id, "true"]);
            assert!(ok, "docker create: {err}");
            s.berthd.restart().unwrap();
            wait_no_pins(&s.host, "after restarting a killed berthd").await;
            let (gone, _, _) = docker(&s.host, &["inspect", created.trim()]);
            assert!(!gone, "created pin {created} left after the restart");
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

/// A dockerd restart mid-build stops the pin (its shim goes with containerd; Docker removes it,
/// `AutoRemove`); berthd pins the base again with a new container once dockerd answers, and the
/// build, whose RUN runs under berth's own runc, succeeds with a runnable image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dockerd_restart_mid_build_pins_the_base_again() {
    let (mut s, _base) = setup().await;
    let name = format!("{}:1", unique_name("berth-test/dockerd-restart"));
    let client = s.berthd.client().await.unwrap();
    let opts = long_build(&s.base_ref, 25, &name);
    let build = tokio::spawn(async move { client.build(opts).await });
    let first = wait_running_pin(&s.host, 60).await;
    tokio::task::block_in_place(|| {
        s.dockerd.stop().unwrap();
        s.dockerd.start().unwrap();
    });
    let again = wait_running_pin(&s.host, 60).await;
    assert_ne!(
        first, again,
        "the pin running after the restart is the old one"
    );
    let report = tokio::time::timeout(Duration::from_secs(240), build)
        .await
        .expect("the build did not end within 240 s")
        .unwrap()
        .unwrap();
    report
        .solve
        .as_ref()
        .unwrap_or_else(|e| panic!("build failed: {e}\nberthd log:\n{}", s.berthd.log_text()));
    let (ok, out, err) = docker(&s.host, &["run", "--rm", &name, "cat", "/sum"]);
    assert!(
        ok && out.contains("/bin/busybox"),
        "run {name}: {out} {err}"
    );
    wait_no_pins(&s.host, "after the build").await;
}

// ---------------------------------------------------------------------------------------------
// Each phase of a build, reached exactly through berthd's hold points (`BERTH_FAULT_HOLD`, see
// `layerstore::dockerstore::fault::hold_point`) and, for the running exec, a RUN that waits for
// a file the test writes into its root (found through /proc): no sleeps decide what is tested.
// ---------------------------------------------------------------------------------------------

/// The phases of a build on a base image used in place: (name, hold point; `None` for the
/// running exec, which the test holds itself).
const PHASES: &[(&str, Option<&str>)] = &[
    (
        "base resolution (pin running, no layer read yet)",
        Some("base:pinned"),
    ),
    ("a running exec", None),
    ("commit of the exec's output", Some("exec:before-commit")),
    ("export, before the load", Some("live:before-load")),
    ("export, loaded but not tagged", Some("live:loaded")),
];

/// berthd's hold points, armed through files in a directory of the test's.
struct Holds {
    dir: tempfile::TempDir,
}

impl Holds {
    fn new() -> Holds {
        Holds {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn env(&self) -> (&'static str, String) {
        (
            layerstore::dockerstore::fault::HOLD_ENV,
            self.dir.path().display().to_string(),
        )
    }

    fn arm(&self, step: &str) {
        std::fs::write(self.dir.path().join(step), b"").unwrap();
    }

    /// Waits (≤ 60 s) until berthd holds at `step`.
    async fn reached(&self, step: &str, berthd: &Berthd) {
        let held = self.dir.path().join(format!("{step}.held"));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !held.exists() {
            assert!(
                Instant::now() < deadline,
                "berthd did not reach {step} within 60 s\nberthd log:\n{}",
                berthd.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn release(&self, step: &str) {
        std::fs::remove_file(self.dir.path().join(format!("{step}.held"))).unwrap();
    }
}

/// A RUN that waits (≤ 60 s) for `/.berth-go`, then reads the base (checksum of /bin/busybox)
/// and writes 4 MB; `marker` makes its command line findable in /proc.
fn phased_build(base: &str, marker: &str, name: &str) -> BuildOptions {
    let script = format!(
        ": {marker}; i=0; until [ -e /.berth-go ] || [ $i -ge 1200 ]; do sleep 0.05; i=$((i+1)); done; \
         rm -f /.berth-go; md5sum /bin/busybox > /sum; cat /etc/passwd > /passwd; \
         dd if=/dev/urandom of=/big bs=1M count=4 2>/dev/null"
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

/// The host PID of the process whose command line contains `marker` (≤ 60 s).
async fn wait_process(marker: &str, berthd: &Berthd) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            // The shell itself (its script is one argument), not a `sleep` it started.
            if String::from_utf8_lossy(&cmd).contains(marker) {
                return pid;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the RUN with {marker} did not start within 60 s\nberthd log:\n{}",
            berthd.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Lets the RUN of process `pid` go on (it waits for `/.berth-go` in its root).
fn release_process(pid: u32) {
    std::fs::write(format!("/proc/{pid}/root/.berth-go"), b"").unwrap();
}

/// Whether process `pid` still runs.
fn running(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// What `docker ps` shows of the running pins: one, named after the base, labelled with the
/// berthd that owns it.
fn assert_one_running_pin(s: &Setup, phase: &str) {
    let (ok, out, err) = docker(
        &s.host,
        &[
            "ps",
            "--filter",
            "label=dev.berth.pin",
            "--format",
            "{{.Names}}|{{.Label \"dev.berth.pin\"}}|{{.Label \"dev.berth.pin.image\"}}|{{.Status}}",
        ],
    );
    assert!(ok, "docker ps: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{phase}: docker ps shows {lines:?}");
    let f: Vec<&str> = lines[0].split('|').collect();
    let short = s.base_id.trim_start_matches("sha256:").get(..12).unwrap();
    assert!(
        f[0].starts_with(&format!("berth-pin-{short}-")),
        "{phase}: pin named {}",
        f[0]
    );
    assert_eq!(
        f[1],
        format!("worker:{}", s.berthd.root().join("worker").display()),
        "{phase}: owner label"
    );
    assert_eq!(f[2], s.base_id, "{phase}: image label");
    assert!(f[3].starts_with("Up"), "{phase}: pin status {}", f[3]);
}

/// Every routine cleanup and every `docker rmi` of the base at one phase of a running build.
async fn routine_cleanups(s: &Setup, phase: &str) {
    for args in [
        vec!["system", "prune", "-af"],
        vec!["container", "prune", "-f"],
        vec!["image", "prune", "-af"],
    ] {
        let (ok, _, err) = docker_async(&s.host, &args).await;
        assert!(ok, "{phase}: docker {args:?}: {err}");
    }
    // The tag (must force), the ID, and the ID with -f (a running container: cannot be forced).
    for (args, want) in [
        (vec!["rmi", s.base_ref.as_str()], "must force"),
        (vec!["rmi", s.base_id.as_str()], "conflict"),
        (vec!["rmi", "-f", s.base_id.as_str()], "running container"),
    ] {
        let (ok, _, err) = docker_async(&s.host, &args).await;
        assert!(!ok, "{phase}: docker {args:?} removed the pinned base");
        assert!(err.contains(want), "{phase}: docker {args:?}: {err}");
    }
    assert!(
        docker_async(&s.host, &["image", "inspect", &s.base_id])
            .await
            .0,
        "{phase}: base gone"
    );
    assert_one_running_pin(s, phase);
    // `docker rmi -f <tag>` removes the tag only (Docker keeps an image a running container
    // uses): the build, which uses the image by ID, goes on. The test tags it again.
    let (ok, out, err) = docker_async(&s.host, &["rmi", "-f", &s.base_ref]).await;
    assert!(
        ok && out.contains("Untagged"),
        "{phase}: rmi -f of the tag: {out}{err}"
    );
    assert!(
        docker_async(&s.host, &["image", "inspect", &s.base_id])
            .await
            .0,
        "{phase}: base gone after rmi -f of its tag"
    );
    let (ok, _, err) = docker_async(&s.host, &["tag", &s.base_id, &s.base_ref]).await;
    assert!(ok, "tag the base again: {err}");
}

async fn setup_held(holds: &Holds) -> (Setup, integration::TestImage) {
    require_root();
    let dockerd = PrivateDockerd::new(PrivateDockerdOptions::default()).unwrap();
    let host = dockerd.engine().host();
    let base = busybox_image(dockerd.engine()).await.unwrap();
    let (k, v) = holds.env();
    let berthd = Berthd::start_with_env(&["--docker-host", &host], &[(k, &v)]).unwrap();
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

/// `docker system prune -af`, `docker container prune -f`, `docker image prune -af`, and `docker
/// rmi` of the base's tag and ID with and without `-f`, at each phase of one build (held there):
/// the build succeeds with a correct, runnable image, `docker ps` shows the one running pin at
/// every phase and no pin after the build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cleanup_at_each_phase_leaves_the_build_alone() {
    let holds = Holds::new();
    let (s, _base) = setup_held(&holds).await;
    for (_, step) in PHASES {
        if let Some(step) = step {
            holds.arm(step);
        }
    }
    let client = s.berthd.client().await.unwrap();
    let name = format!("{}:1", unique_name("berth-test/phases"));
    let marker = unique_name("berth-phase-run");
    let build = client.build(phased_build(&s.base_ref, &marker, &name));
    let drive = async {
        let t0 = Instant::now();
        for (phase, step) in PHASES {
            let t = Instant::now();
            match step {
                Some(step) => {
                    holds.reached(step, &s.berthd).await;
                    // The pin starts in the background; this test is about the build once it
                    // runs (the window before is `a_prune_while_a_step_reads_the_base_...`).
                    wait_running_pin(&s.host, 60).await;
                    routine_cleanups(&s, phase).await;
                    holds.release(step);
                }
                None => {
                    let pid = wait_process(&marker, &s.berthd).await;
                    wait_running_pin(&s.host, 60).await;
                    routine_cleanups(&s, phase).await;
                    assert!(
                        running(pid),
                        "{phase}: the RUN ended before the cleanups did"
                    );
                    release_process(pid);
                }
            }
            println!("{phase}: cleanups took {:?}", t.elapsed());
        }
        println!("all phases: {:?}", t0.elapsed());
    };
    let (report, ()) = tokio::join!(build, drive);
    let report = report.unwrap();
    let resp = report
        .solve
        .as_ref()
        .unwrap_or_else(|e| panic!("build failed: {e}\nberthd log:\n{}", s.berthd.log_text()));
    assert!(resp.exporter_response.contains_key("containerimage.digest"));
    // The prune at "loaded but not tagged" removed the untagged new image: berth loaded it again.
    let log = s.berthd.log_text();
    assert!(
        log.contains("image removed between load and tag"),
        "the image prune after the load did not hit the loaded image:\n{log}"
    );
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
            "cat /sum; md5sum /bin/busybox; wc -c < /big; test ! -e /.berth-go",
        ],
    );
    assert!(ok, "built image does not run: {err}");
    assert_eq!(got, format!("{want}{want}4194304\n"));
    wait_no_pins(&s.host, "after the build").await;
    assert!(docker(&s.host, &["image", "inspect", &s.base_id]).0);
}

/// The pin removed by force and the base deleted with `docker rmi -f` at each phase, each in a
/// build of its own: the build fails with the clear error and leaves nothing, or (later phases:
/// a pin container berth made again before the image went, or the loaded image, still holds
/// the layers) succeeds with the right image. Before the exec read the base it always fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_removal_at_each_phase_fails_clearly_or_succeeds() {
    let holds = Holds::new();
    let (mut s, base) = setup_held(&holds).await;
    std::mem::forget(base); // removed by force below
    let client = s.berthd.client().await.unwrap();
    let api = s.dockerd.engine().client().clone();
    let mut outcomes = Vec::new();
    for (i, (phase, step)) in PHASES.iter().enumerate() {
        if i > 0 {
            // A fresh base (the last one was deleted).
            let b = busybox_image(s.dockerd.engine()).await.unwrap();
            s.base_ref = b.reference().to_string();
            s.base_id = b.id().to_string();
            std::mem::forget(b);
        }
        let (_, images_before, _) = docker(&s.host, &["images", "-aq", "--no-trunc"]);
        if let Some(step) = step {
            holds.arm(step);
        }
        let name = format!("{}:1", unique_name("berth-test/forced-phase"));
        let marker = unique_name("berth-forced-run");
        let build = client.build(phased_build(&s.base_ref, &marker, &name));
        let force = async {
            let pid = match step {
                Some(step) => {
                    if i > 1 {
                        // Past the exec: let its RUN finish first.
                        release_process(wait_process(&marker, &s.berthd).await);
                    }
                    holds.reached(step, &s.berthd).await;
                    None
                }
                None => Some(wait_process(&marker, &s.berthd).await),
            };
            // Removed by force once it runs (before, a routine cleanup could remove it too:
            // `a_prune_while_a_step_reads_the_base_before_its_pin_runs_runs_the_build_again`).
            wait_running_pin(&s.host, 60).await;
            remove_base_by_force(&api, &s.base_id).await;
            match (step, pid) {
                (Some(step), _) => holds.release(step),
                (None, Some(pid)) => release_process(pid),
                _ => unreachable!(),
            }
        };
        let (report, ()) = tokio::join!(build, force);
        let report = report.unwrap();
        if let Ok(resp) = &report.solve {
            // The layers outlived the image record (a pin container berth made again before
            // the image went still references them, or the loaded image does): the result must
            // be the right image.
            assert!(resp.exporter_response.contains_key("containerimage.digest"));
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
            assert!(ok, "{phase}: built image does not run: {err}");
            assert_eq!(got, format!("{want}{want}4194304\n"), "{phase}");
            println!("{phase}: build succeeded with a correct image");
            outcomes.push((*phase, "succeeded, image correct"));
            let _ = docker(&s.host, &["rmi", &name]);
        } else {
            let err = report.solve.as_ref().unwrap_err().message().to_string();
            println!("{phase}: {err}");
            outcomes.push((*phase, "failed with the clear error"));
            for want in [
                "base image ".to_string(),
                s.base_ref.clone(),
                s.base_id.clone(),
                "was removed from Docker while the build used it".to_string(),
                "pin container berth-pin-".to_string(),
            ] {
                assert!(err.contains(&want), "{phase}: {want:?} not in: {err}");
            }
            assert!(!err.contains("No such file or directory"), "{phase}: {err}");
            // Nothing in Docker: no new image, no container, no orphan layer dir.
            let (_, images_after, _) = docker(&s.host, &["images", "-aq", "--no-trunc"]);
            let before: BTreeSet<&str> = images_before.lines().collect();
            let new: Vec<&str> = images_after
                .lines()
                .filter(|i| !before.contains(i))
                .collect();
            assert!(new.is_empty(), "{phase}: images left in Docker: {new:?}");
            let left = offline_leftovers(&s.dockerd.data_root());
            assert!(
                left.is_empty(),
                "{phase}: left in Docker's data root: {left:?}"
            );
            // Nothing half-written in berth's store: no mutable (unfinished) snapshot.
            let mutable: Vec<_> = du(&client)
                .await
                .into_iter()
                .filter(|r| r.mutable)
                .collect();
            assert!(
                mutable.is_empty(),
                "{phase}: unfinished snapshots: {mutable:?}"
            );
        }
        wait_no_pins(&s.host, phase).await;
        let (_, containers, _) = docker(&s.host, &["ps", "-aq"]);
        assert!(
            containers.trim().is_empty(),
            "{phase}: containers left: {containers}"
        );
    }
    println!("forced removal outcomes: {outcomes:?}");
    // Up to the exec's read of the base the layers are gone for good: those builds fail.
    for (phase, outcome) in &outcomes[..2] {
        assert_eq!(*outcome, "failed with the clear error", "{phase}");
    }
}

/// Removes the pins and the image `id` through the API until the image is gone (berth pins again
/// while the image is there, and a running pin makes even `docker rmi -f` fail).
async fn remove_base_by_force(api: &integration::bollard::Docker, id: &str) {
    use integration::bollard::query_parameters::{
        ListContainersOptions, RemoveContainerOptions, RemoveImageOptions,
    };
    for _ in 0..50 {
        let filters = std::collections::HashMap::from([(
            "label".to_string(),
            vec!["dev.berth.pin".to_string()],
        )]);
        let list = api
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .unwrap();
        for c in list {
            let _ = api
                .remove_container(
                    c.id.as_deref().unwrap_or_default(),
                    Some(RemoveContainerOptions {
                        force: true,
                        ..Default::default()
                    }),
                )
                .await;
        }
        let r = api
            .remove_image(
                id,
                Some(RemoveImageOptions {
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
}

/// Soak (ignored; run for the record): 200 builds, three at a time, of a base that lives in a
/// registry (so berth pulls it again whenever a prune deleted it between builds), while
/// `docker system prune -af`, `docker container prune -f`, `docker image prune -af` and `docker
/// rmi` of its tag and of its ID take turns every 2 s. No build may fail; each image
/// that is still there when its build ends runs with its own content; no pin is left.
/// `BERTH_SOAK_BUILDS` overrides the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "soak: 200 builds under prunes (minutes)"]
async fn soak_builds_under_prunes() {
    let total: usize = std::env::var("BERTH_SOAK_BUILDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let (s, base) = setup().await;
    let registry = integration::Registry::start().unwrap();
    let client = s.berthd.client().await.unwrap();
    let remote = push_base(&client, base.reference(), &registry).await;
    let remote_id = docker(&s.host, &["image", "inspect", "-f", "{{.Id}}", &remote])
        .1
        .trim()
        .to_string();
    drop(base);
    let done = AtomicBool::new(false);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures: Mutex<Vec<String>> = Default::default();
    let (verified, gone) = (
        std::sync::atomic::AtomicUsize::new(0),
        std::sync::atomic::AtomicUsize::new(0),
    );
    let prunes = std::sync::atomic::AtomicUsize::new(0);
    let t0 = Instant::now();
    let (next, failures_r, verified_r, gone_r, client_r, s_r, remote_r) =
        (&next, &failures, &verified, &gone, &client, &s, &remote);
    let worker = move || async move {
        let (failures, verified, gone, client, s, remote) =
            (failures_r, verified_r, gone_r, client_r, s_r, remote_r);
        loop {
            let i = next.fetch_add(1, Ordering::SeqCst);
            if i >= total {
                return;
            }
            let name = format!("{}:{i}", unique_name("berth-test/soak"));
            let def = llb::State::from(llb::image(remote))
                .run(RunOpts::shell(format!(
                    "test -e /soak-base && md5sum /bin/busybox > /sum && echo {i} > /i"
                )))
                .root()
                .marshal()
                .unwrap();
            let mut attrs = BTreeMap::new();
            attrs.insert("name".to_string(), name.clone());
            let r = client
                .build(BuildOptions {
                    definition: Some(def),
                    output: Output::Raw("image".into(), attrs),
                    ..Default::default()
                })
                .await;
            match r.map_err(|e| e.to_string()).and_then(|r| {
                r.solve
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| e.message().to_string())
            }) {
                Err(e) => failures.lock().unwrap().push(format!("build {i}: {e}")),
                Ok(()) => {
                    // The pruner may remove the check's own container between its create and
                    // start (`docker run` is both): run it again then.
                    let mut tries = 0;
                    let (ok, out, err) = loop {
                        tries += 1;
                        let r = docker_async(
                            &s.host,
                            &["run", "--rm", "--network", "none", &name, "cat", "/i"],
                        )
                        .await;
                        let pruned =
                            r.2.contains("marked for removal") || r.2.contains("No such container");
                        if r.0 || !pruned || tries == 5 {
                            break r;
                        }
                    };
                    if ok && out == format!("{i}\n") {
                        verified.fetch_add(1, Ordering::SeqCst);
                    } else if !docker_async(&s.host, &["image", "inspect", &name]).await.0 {
                        // A prune took the finished image before it ran: not a lost build.
                        gone.fetch_add(1, Ordering::SeqCst);
                    } else {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("build {i}: image does not run: {out}{err}"));
                    }
                    let _ = docker_async(&s.host, &["rmi", &name]).await;
                }
            }
            if (i + 1) % 20 == 0 {
                println!("{} builds in {:?}", i + 1, t0.elapsed());
            }
        }
    };
    let pruner = async {
        // Routine cleanups only (forced removals fail builds by design: see the tests above).
        let cleanups: [&[&str]; 6] = [
            &["system", "prune", "-af"],
            &["container", "prune", "-f"],
            &["image", "prune", "-af"],
            &["rmi", &remote],
            &["system", "prune", "-af"],
            &["rmi", &remote_id],
        ];
        let mut k = 0;
        while !done.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let _ = docker_async(&s.host, cleanups[k % cleanups.len()]).await;
            k += 1;
            prunes.fetch_add(1, Ordering::SeqCst);
        }
    };
    let builds = async {
        tokio::join!(worker(), worker(), worker());
        done.store(true, Ordering::SeqCst);
    };
    tokio::join!(builds, pruner);
    let failures = failures.into_inner().unwrap();
    let log = s.berthd.log_text();
    for what in [
        "base image deleted before its pin ran",
        "image deleted before it could be pinned",
        "deleted and stored again while it was pinned",
        "pulled image deleted before it was tagged",
        "image pin lost",
        "a base image went before its pin ran; running the build again",
        "the export failed on it; running the build again",
        "the result is read; running the build again",
    ] {
        println!("berthd log: {} × {what:?}", log.matches(what).count());
    }
    println!(
        "soak: {total} builds in {:?}, {} cleanups; {} images verified by docker run, {} pruned before \
         they ran, {} failures",
        t0.elapsed(),
        prunes.load(Ordering::SeqCst),
        verified.load(Ordering::SeqCst),
        gone.load(Ordering::SeqCst),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {total} builds lost:\n{}\nberthd log tail:\n{}",
        failures.len(),
        failures.join("\n"),
        s.berthd
            .log_text()
            .lines()
            .rev()
            .take(200)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
    wait_no_pins(&s.host, "after the soak").await;
}

/// Pushes `base` plus a file `/soak-base` to `registry` through berthd (the private dockerd
/// cannot reach the host's loopback from its network namespace; berthd pulls and pushes with its
/// own client); returns the pushed reference (also tagged in the dockerd).
async fn push_base(
    client: &BuildkitClient,
    base: &str,
    registry: &integration::Registry,
) -> String {
    let remote = format!(
        "{}/{}:1",
        registry.addr(),
        unique_name("berth-test/registry-base")
    );
    let def = llb::State::from(llb::image(base))
        .file(llb::mkfile(
            "/soak-base",
            0o644,
            b"soak".to_vec(),
            Default::default(),
        ))
        .marshal()
        .unwrap();
    let mut attrs = BTreeMap::new();
    attrs.insert("name".to_string(), remote.clone());
    attrs.insert("push".to_string(), "true".to_string());
    let r = client
        .build(BuildOptions {
            definition: Some(def),
            output: Output::Raw("image".into(), attrs),
            ..Default::default()
        })
        .await
        .unwrap();
    r.solve.as_ref().expect("push the base");
    remote
}

/// `docker system prune -af` while the base's first pin is only created (held there), shared by
/// two concurrent builds of the base: the prune removes the created container and then the image.
/// berth resolves the image again (pulls it from its registry): before the base's layers were
/// read, once, in the build that executes the base's vertex (the other shares that execution);
/// or, for a build whose RUN read them already (pins start in the background), by dropping what
/// it made and running it again. Both builds succeed with the right images.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_before_the_first_pin_runs_resolves_the_base_again() {
    let holds = Holds::new();
    let (s, base) = setup_held(&holds).await;
    let registry = integration::Registry::start().unwrap();
    let client = s.berthd.client().await.unwrap();
    let remote = push_base(&client, base.reference(), &registry).await;
    // The push build's pin is gone: the next pin of the base is a first one.
    wait_no_pins(&s.host, "after the push").await;
    holds.arm("pin:created");
    // The builds (image exports, which do not wait for their pins) are held before the base's
    // layers are read, so the prune comes before any step made something from them.
    holds.arm("base:pinned");
    let names: Vec<String> = (1..=2)
        .map(|i| format!("{}:{i}", unique_name("berth-test/repinned")))
        .collect();
    let build = |i: usize| {
        let def = llb::State::from(llb::image(&remote))
            .run(RunOpts::shell(format!(
                "test -e /soak-base && md5sum /bin/busybox > /sum && echo {i} > /i"
            )))
            .root()
            .marshal()
            .unwrap();
        let mut attrs = BTreeMap::new();
        attrs.insert("name".to_string(), names[i - 1].clone());
        client.build(BuildOptions {
            definition: Some(def),
            output: Output::Raw("image".into(), attrs),
            ..Default::default()
        })
    };
    let prune = async {
        holds.reached("pin:created", &s.berthd).await;
        // Both builds hold the created pin (each resolved the base) before the prune.
        let deadline = Instant::now() + Duration::from_secs(60);
        while s
            .berthd
            .log_text()
            .matches("image resolved in place")
            .count()
            < 3
        {
            assert!(
                Instant::now() < deadline,
                "the two builds did not resolve the base:\n{}",
                s.berthd.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (_, created, _) = docker_async(
            &s.host,
            &[
                "ps",
                "-a",
                "--filter",
                "label=dev.berth.pin",
                "--format",
                "{{.State}}",
            ],
        )
        .await;
        assert_eq!(created.trim(), "created", "the pin is not just created");
        let (ok, out, err) = docker_async(&s.host, &["system", "prune", "-af"]).await;
        assert!(ok, "docker system prune: {err}");
        assert!(
            !docker_async(&s.host, &["image", "inspect", &remote])
                .await
                .0,
            "the prune left the base: {out}"
        );
        holds.release("pin:created");
        holds.reached("base:pinned", &s.berthd).await;
        holds.release("base:pinned");
    };
    let (r1, r2, ()) = tokio::join!(build(1), build(2), prune);
    let log = s.berthd.log_text();
    for r in [r1, r2] {
        r.unwrap()
            .solve
            .as_ref()
            .unwrap_or_else(|e| panic!("build failed: {e}\nberthd log:\n{log}"));
    }
    // Resolved again before its layers were read (`base image deleted before its pin ran`, once
    // for the builds that share the base's vertex), or, when a build's RUN had read them
    // already, by running that build again.
    assert!(
        log.contains("base image deleted before its pin ran")
            || log.contains("running the build again"),
        "berth did not resolve the base again:\n{log}"
    );
    let want = Command::new("md5sum").arg("/bin/busybox").output().unwrap();
    let want = String::from_utf8_lossy(&want.stdout).into_owned();
    for (i, name) in names.iter().enumerate() {
        let (ok, got, err) = docker(
            &s.host,
            &[
                "run",
                "--rm",
                "--network",
                "none",
                name,
                "sh",
                "-c",
                "cat /sum /i",
            ],
        );
        assert!(ok, "built image does not run: {err}");
        assert_eq!(got, format!("{want}{}\n", i + 1));
    }
    wait_no_pins(&s.host, "after the builds").await;
}

/// The window pins starting in the background opened: a RUN reads the base while its pin is
/// only created (held there), and `docker container prune -f` (the created pin) then `docker
/// image prune -af` (the base, unused now) delete the layers under it. What the RUN made is
/// never kept or exported: berth drops it and runs the build again, pulling the base again from
/// its registry, and the build succeeds with the right image; no pin is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_while_a_step_reads_the_base_before_its_pin_runs_runs_the_build_again() {
    let holds = Holds::new();
    let (s, base) = setup_held(&holds).await;
    let registry = integration::Registry::start().unwrap();
    let client = s.berthd.client().await.unwrap();
    let remote = push_base(&client, base.reference(), &registry).await;
    wait_no_pins(&s.host, "after the push").await;
    holds.arm("pin:created");
    let name = format!("{}:1", unique_name("berth-test/early-prune"));
    let marker = unique_name("berth-early-run");
    let build = client.build(phased_build(&remote, &marker, &name));
    let drive = async {
        holds.reached("pin:created", &s.berthd).await;
        let first = wait_process(&marker, &s.berthd).await;
        let (_, state, _) = docker_async(
            &s.host,
            &[
                "ps",
                "-a",
                "--filter",
                "label=dev.berth.pin",
                "--format",
                "{{.State}}",
            ],
        )
        .await;
        assert_eq!(
            state.trim(),
            "created",
            "the RUN does not run before the pin"
        );
        for args in [
            vec!["container", "prune", "-f"],
            vec!["image", "prune", "-af"],
        ] {
            let (ok, _, err) = docker_async(&s.host, &args).await;
            assert!(ok, "docker {args:?}: {err}");
        }
        assert!(
            !docker_async(&s.host, &["image", "inspect", &remote])
                .await
                .0,
            "the prunes left the base"
        );
        // The RUN reads the deleted base now, and the pin's start finds its container gone.
        release_process(first);
        holds.release("pin:created");
        // The build again, on the base pulled again.
        let deadline = Instant::now() + Duration::from_secs(120);
        let second = loop {
            let pid = wait_process(&marker, &s.berthd).await;
            if pid != first {
                break pid;
            }
            assert!(
                Instant::now() < deadline,
                "the build did not run again:\n{}",
                s.berthd.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        release_process(second);
    };
    let (report, ()) = tokio::join!(build, drive);
    let log = s.berthd.log_text();
    let resp = report
        .unwrap()
        .solve
        .unwrap_or_else(|e| panic!("build failed: {e}\nberthd log:\n{log}"));
    assert!(resp.exporter_response.contains_key("containerimage.digest"));
    assert!(
        log.contains("a base image went before its pin ran; running the build again"),
        "{log}"
    );
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
            "cat /sum; md5sum /bin/busybox; wc -c < /big; cat /soak-base",
        ],
    );
    assert!(ok, "built image does not run: {err}");
    assert_eq!(got, format!("{want}{want}4194304\nsoak"));
    wait_no_pins(&s.host, "after the build").await;
}

/// A berthd (with hold points `holds`) whose pins are made only after a minute unless something
/// waits for them, on a private dockerd with the busybox base; and a registry holding that base
/// plus `/soak-base`, pushed by berthd (its reference, also tagged in the dockerd).
async fn setup_delayed(
    holds: &Holds,
) -> (Setup, integration::TestImage, integration::Registry, String) {
    require_root();
    let dockerd = PrivateDockerd::new(PrivateDockerdOptions::default()).unwrap();
    let host = dockerd.engine().host();
    let base = busybox_image(dockerd.engine()).await.unwrap();
    let (k, v) = holds.env();
    let berthd = Berthd::start_with_env(
        &["--docker-host", &host],
        &[(k, &v), ("BERTH_PIN_DELAY_MS", "60000")],
    )
    .unwrap();
    let registry = integration::Registry::start().unwrap();
    let client = berthd.client().await.unwrap();
    let remote = push_base(&client, base.reference(), &registry).await;
    wait_no_pins(&host, "after the push").await;
    let s = Setup {
        host,
        base_ref: base.reference().to_string(),
        base_id: base.id().to_string(),
        berthd,
        dockerd,
    };
    (s, base, registry, remote)
}

/// Holds `build` (an image export of `name` on `remote`, a RUN writing `/sum`) before its load,
/// checks that no pin was made (the pin delay is a minute: only a solve waiting for its pin makes
/// one at once), deletes the unpinned base with `docker system prune -af`, and lets the load go
/// on: the load fails on the missing layers and berth runs the build again on the base pulled
/// again; the build succeeds with the right image and no pin is left.
async fn prune_before_an_unpinned_load(
    s: &Setup,
    holds: &Holds,
    remote: &str,
    name: &str,
    build: impl std::future::Future<Output = BuildReport>,
) {
    holds.arm("live:before-load");
    let drive = async {
        holds.reached("live:before-load", &s.berthd).await;
        let made = pins(&s.host, false);
        assert!(
            made.is_empty(),
            "the build waited for its pin: {made:?}\nberthd log:\n{}",
            s.berthd.log_text()
        );
        let (ok, _, err) = docker_async(&s.host, &["system", "prune", "-af"]).await;
        assert!(ok, "docker system prune: {err}");
        assert!(
            !docker_async(&s.host, &["image", "inspect", remote]).await.0,
            "the prune left the base"
        );
        holds.release("live:before-load");
    };
    let (report, ()) = tokio::join!(build, drive);
    let log = s.berthd.log_text();
    let resp = report
        .solve
        .unwrap_or_else(|e| panic!("build failed: {e}\nberthd log:\n{log}"));
    assert!(resp.exporter_response.contains_key("containerimage.digest"));
    assert!(
        log.contains("the export failed on it; running the build again"),
        "{log}"
    );
    let want = Command::new("md5sum").arg("/bin/busybox").output().unwrap();
    let want = String::from_utf8_lossy(&want.stdout).into_owned();
    let (ok, got, err) = docker(
        &s.host,
        &[
            "run",
            "--rm",
            "--network",
            "none",
            name,
            "sh",
            "-c",
            "cat /sum; md5sum /bin/busybox; cat /soak-base",
        ],
    );
    assert!(ok, "built image does not run: {err}");
    assert_eq!(got, format!("{want}{want}soak"));
    wait_no_pins(&s.host, "after the build").await;
}

/// An image export of LLB sent with `Control.Solve` (as `buildctl build` sends it) does not
/// wait for the base's pin (its thin load reads no base file), so a routine cleanup may delete a
/// base that is not pinned yet before the load; berth runs the build again then, on the base
/// pulled again, pinned at once and waited for this time (`prune_before_an_unpinned_load`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_before_an_unpinned_export_loads_runs_the_build_again() {
    let holds = Holds::new();
    let (s, _base, _registry, remote) = setup_delayed(&holds).await;
    let client = s.berthd.client().await.unwrap();
    let name = format!("{}:1", unique_name("berth-test/unpinned-export"));
    let def = llb::State::from(llb::image(&remote))
        .run(RunOpts::shell("md5sum /bin/busybox > /sum"))
        .root()
        .marshal()
        .unwrap();
    let attrs = BTreeMap::from([("name".to_string(), name.clone())]);
    // Sent as `buildctl build` sends LLB: the exporter is known with the definition.
    let build = async {
        client
            .build(BuildOptions {
                definition: Some(def),
                direct: true,
                output: Output::Raw("image".into(), attrs),
                ..Default::default()
            })
            .await
            .unwrap()
    };
    prune_before_an_unpinned_load(&s, &holds, &remote, &name, build).await;
}

/// A Dockerfile build through `dockerfile.v0` (the frontend solving its LLB, as buildx sends
/// it) exported with `--output type=image` into this Docker does not wait for its base's pin
/// either: no pin container was made when the export is about to load, and a base deleted then
/// makes berth solve the result's definition again (`prune_before_an_unpinned_load`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dockerfile_image_build_does_not_wait_for_its_pin() {
    let holds = Holds::new();
    let (s, _base, _registry, remote) = setup_delayed(&holds).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!("FROM {remote}\nRUN md5sum /bin/busybox > /sum\n"),
    )
    .unwrap();
    let name = format!("{}:1", unique_name("berth-test/dockerfile-unpinned"));
    let attrs = BTreeMap::from([("name".to_string(), name.clone())]);
    let build = integration::buildkit_client::dockerfile_build(
        &s.berthd,
        dir.path(),
        &[],
        Output::Raw("image".into(), attrs),
    );
    prune_before_an_unpinned_load(&s, &holds, &remote, &name, build).await;
}

/// A gateway client's build: `LLBBridge.Solve` (evaluated) of a RUN on the base, then `Return`
/// of nothing, with `check` called in between with the gateway, the build's ref and how the
/// solve ended (the ref of the solved RUN, or its error). Returns how `Control.Solve` ended.
async fn gateway_build<F, Fut>(
    client: &BuildkitClient,
    base: &str,
    run: &str,
    check: F,
) -> Result<(), tonic::Status>
where
    F: FnOnce(
        protos::moby::buildkit::v1::frontend::llb_bridge_client::LlbBridgeClient<
            tonic::transport::Channel,
        >,
        String,
        Result<String, tonic::Status>,
    ) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use integration::buildkit_client::{new_id, with_build_id, Attachables};
    use protos::moby::buildkit::v1 as control;
    use protos::moby::buildkit::v1::frontend as gw;
    let mut session = client.open_session(Attachables::default()).await.unwrap();
    let build_ref = new_id();
    let mut ctl = client.control();
    let (sid, br) = (session.id.clone(), build_ref.clone());
    let solve = tokio::spawn(async move {
        ctl.solve(control::SolveRequest {
            r#ref: br,
            session: sid,
            ..Default::default()
        })
        .await
    });
    let mut g = client.gateway();
    let def = llb::State::from(llb::image(base))
        .run(RunOpts::shell(run))
        .root()
        .marshal()
        .unwrap();
    let res = g
        .solve(with_build_id(
            gw::SolveRequest {
                definition: Some(def),
                evaluate: true,
                allow_result_return: true,
                allow_result_array_ref: true,
                ..Default::default()
            },
            &build_ref,
        ))
        .await
        .map(|r| match r.into_inner().result.and_then(|r| r.result) {
            Some(gw::result::Result::Ref(rf)) => rf.id,
            other => panic!("expected a ref result, got {other:?}"),
        });
    check(g.clone(), build_ref.clone(), res).await;
    g.r#return(with_build_id(gw::ReturnRequest::default(), &build_ref))
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(60), solve)
        .await
        .expect("Control.Solve answers")
        .unwrap();
    assert!(session.close(Duration::from_secs(5)).await);
    r.map(|_| ())
}

/// `ReadFile` of a file of the result's base image through the gateway.
async fn gateway_read(
    mut g: protos::moby::buildkit::v1::frontend::llb_bridge_client::LlbBridgeClient<
        tonic::transport::Channel,
    >,
    build_ref: &str,
    id: &str,
    path: &str,
) -> Result<Vec<u8>, tonic::Status> {
    use protos::moby::buildkit::v1::frontend as gw;
    g.read_file(integration::buildkit_client::with_build_id(
        gw::ReadFileRequest {
            r#ref: id.to_string(),
            file_path: path.to_string(),
            ..Default::default()
        },
        build_ref,
    ))
    .await
    .map(|r| r.into_inner().data.to_vec())
}

/// A gateway client's evaluated solve does not wait for its base's pin (none made within the
/// minute's delay), and reading the ref's files waits for it then: the first `ReadFile` makes
/// the pin at once (`docker ps` shows it running after the read), every routine cleanup and
/// `docker rmi` of the base after that leave the base alone, and `ReadFile` of the base's
/// `/bin/busybox` gives its exact bytes. In a second build, the cleanups delete the base while
/// the read's pin is only created (held there): the read fails with the error naming the base
/// image, never with a missing file or wrong bytes; no pin is left after either build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_read_of_a_ref_waits_for_its_pin_then() {
    let holds = Holds::new();
    let (s, _base, _registry, _remote) = setup_delayed(&holds).await;
    let client = s.berthd.client().await.unwrap();
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let s_ref = &s;
    let r = gateway_build(
        &client,
        &s.base_ref,
        "md5sum /bin/busybox > /sum",
        |g, build_ref, id| async move {
            let s = s_ref;
            let id = id.expect("the RUN solves");
            let made = pins(&s.host, false);
            assert!(
                made.is_empty(),
                "the gateway solve waited for its pin: {made:?}"
            );
            let sum = gateway_read(g.clone(), &build_ref, &id, "/sum")
                .await
                .unwrap();
            assert!(
                String::from_utf8_lossy(&sum).contains("/bin/busybox"),
                "{sum:?}"
            );
            assert_one_running_pin(s, "after the first ReadFile");
            routine_cleanups(s, "between two ReadFiles").await;
            let got = gateway_read(g, &build_ref, &id, "/bin/busybox")
                .await
                .unwrap();
            assert!(
                got == busybox,
                "ReadFile gave other bytes than the base's /bin/busybox"
            );
        },
    )
    .await;
    r.unwrap_or_else(|e| panic!("build failed: {e}\nberthd log:\n{}", s.berthd.log_text()));
    wait_no_pins(&s.host, "after the first build").await;

    let holds_r = &holds;
    let r = gateway_build(
        &client,
        &s.base_ref,
        "md5sum /bin/busybox > /sum2",
        |g, build_ref, id| async move {
            let s = s_ref;
            let id = id.expect("the RUN solves");
            assert!(
                pins(&s.host, false).is_empty(),
                "the gateway solve waited for its pin"
            );
            holds_r.arm("pin:created");
            let read =
                tokio::spawn(async move { gateway_read(g, &build_ref, &id, "/bin/busybox").await });
            holds_r.reached("pin:created", &s.berthd).await;
            for args in [
                vec!["container", "prune", "-f"],
                vec!["image", "prune", "-af"],
            ] {
                let (ok, _, err) = docker_async(&s.host, &args).await;
                assert!(ok, "docker {args:?}: {err}");
            }
            assert!(
                !docker_async(&s.host, &["image", "inspect", &s.base_id])
                    .await
                    .0,
                "the prunes left the base"
            );
            holds_r.release("pin:created");
            let err = read.await.unwrap().expect_err("ReadFile of a deleted base");
            assert!(
                err.message().contains("was removed from Docker")
                    && err.message().contains(&s.base_id),
                "{err:?}\nberthd log:\n{}",
                s.berthd.log_text()
            );
        },
    )
    .await;
    assert!(r.is_ok(), "the build itself returned nothing: {r:?}");
    wait_no_pins(&s.host, "after the second build").await;
}

/// The state a failed RUN left (handed out in the gateway's `errdefs.Solve` detail, for a
/// client to inspect) holds its base image's pin like any result: the failed solve made no pin
/// (delay a minute), `ReadFile` of the base's `/bin/busybox` from the RUN's root state makes it
/// and gives the exact bytes, and every routine cleanup and `docker rmi` after that leave the base
/// (one running pin, the owner's labels) and the state readable; no pin is left after the build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_steps_state_holds_its_base_pin() {
    use prost::Message as _;
    let holds = Holds::new();
    let (s, _base, _registry, _remote) = setup_delayed(&holds).await;
    let client = s.berthd.client().await.unwrap();
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let s_ref = &s;
    let r = gateway_build(
        &client,
        &s.base_ref,
        "echo left > /left; exit 3",
        |g, build_ref, res| async move {
            let s = s_ref;
            let err = res.expect_err("the RUN fails");
            let st = protos::google::rpc::Status::decode(err.details()).unwrap();
            let detail = st
                .details
                .iter()
                .find_map(|d| protos::details::solve_from_any(d).ok())
                .unwrap_or_else(|| panic!("no errdefs.Solve detail in {err:?}"));
            let root = detail.mount_i_ds.first().cloned().unwrap_or_default();
            assert!(!root.is_empty(), "no state for the root mount: {detail:?}");
            assert!(
                pins(&s.host, false).is_empty(),
                "the failed solve made a pin"
            );
            let got = gateway_read(g.clone(), &build_ref, &root, "/bin/busybox")
                .await
                .unwrap();
            assert!(
                got == busybox,
                "ReadFile gave other bytes than the base's /bin/busybox"
            );
            assert_one_running_pin(s, "after reading the failed state");
            routine_cleanups(s, "after reading the failed state").await;
            let left = gateway_read(g, &build_ref, &root, "/left").await.unwrap();
            assert_eq!(left, b"left\n");
        },
    )
    .await;
    r.unwrap_or_else(|e| panic!("build failed: {e}\nberthd log:\n{}", s.berthd.log_text()));
    wait_no_pins(&s.host, "after the build").await;
}
