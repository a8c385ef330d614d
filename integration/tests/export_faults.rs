//! Crash safety of `type=image`: berthd is killed with SIGKILL (a real `kill -9`, by itself at a
//! named step through `BERTH_FAULT_KILL`, or by the test at a random moment) in the middle of an
//! export, in each of the three modes, and then
//!
//! (a) the store is usable: the system dockerd answers and no tag points at a missing or partial
//!     image (live); a private dockerd starts on the data root, lists images and runs every tagged
//!     image (offline); containerd holds no image record whose image does not run (containerd);
//! (b) restarting berthd removes its own leftovers (unfinished layer dirs, write-sets and temp
//!     files in the data root; its containerd leases and prepared snapshots; its base-image pins);
//! (c) rerunning the same build and export succeeds, every name points at the rerun's image
//!     (which is the image a tag already pointed at after the kill, if any) and the image runs.
//!
//! Needs root, runc, overlayfs, the system dockerd, `dockerd`/`containerd`/`ctr` binaries.
//! `random_kills_many` (ignored) repeats the random variant 10 times per mode.

mod export_support;

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use export_support::*;
use integration::buildkit_client::Berthd;
use integration::{
    busybox_image, require_root, unique_name, DockerEngine, PrivateContainerd, PrivateDockerd,
    TestImage,
};
use layerstore::dockerstore::fault::{CONTAINERD_STEPS, FAULT_ENV, LIVE_STEPS, OFFLINE_STEPS};

/// Bytes of the noise layer: enough for the `live:mid-load` point (2 MiB into the request) and
/// for a random kill to land inside the export.
const BIG: usize = 6 << 20;

enum Store {
    /// The system dockerd; the base image is a Docker image (so pins exist during builds).
    Live { base: TestImage },
    /// A stopped private dockerd's data root.
    Offline { dockerd: PrivateDockerd },
    /// A private containerd.
    Containerd { ctrd: PrivateContainerd },
}

struct Harness {
    store: Store,
    berthd: Berthd,
    base_env: Vec<(String, String)>,
    cleanup: RemoveImages,
    seen_records: std::collections::BTreeSet<String>,
}

impl Harness {
    async fn new(mode: &str) -> Harness {
        require_root();
        #[allow(clippy::type_complexity)]
        let (store, args, env, host): (
            Store,
            Vec<String>,
            Vec<(String, String)>,
            Option<String>,
        ) = match mode {
            "live" => {
                let engine = DockerEngine::system().unwrap();
                let base = busybox_image(&engine).await.unwrap();
                (Store::Live { base }, vec![], vec![], None)
            }
            "offline" => {
                let mut dockerd = PrivateDockerd::new(Default::default()).unwrap();
                let host = dockerd.engine().host();
                dockerd.stop().unwrap();
                let args = vec![
                    "--docker-host".into(),
                    "unix:///nonexistent/berth-test-docker.sock".into(),
                    "--docker-data-root".into(),
                    dockerd.data_root().display().to_string(),
                ];
                (Store::Offline { dockerd }, args, vec![], Some(host))
            }
            "containerd" => {
                let ctrd = PrivateContainerd::start();
                let env = vec![(
                    "BERTH_CONTAINERD_ADDRESS".to_string(),
                    ctrd.socket().display().to_string(),
                )];
                (Store::Containerd { ctrd }, vec![], env, None)
            }
            m => panic!("unknown mode {m}"),
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let envs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let berthd = Berthd::start_with_env(&args, &envs).unwrap();
        Harness {
            store,
            berthd,
            base_env: env,
            cleanup: RemoveImages(host, Vec::new()),
            seen_records: Default::default(),
        }
    }

    fn def(&self, tag: &str) -> protos::pb::Definition {
        let base = match &self.store {
            Store::Live { base } => Some(base.reference().to_string()),
            _ => None,
        };
        image_def(base.as_deref(), Some("shared"), tag, BIG)
    }

    fn names(&self, tag: &str) -> Vec<String> {
        match self.store {
            // The containerd record is Docker's dangling name; tags would go to a Docker Engine.
            Store::Containerd { .. } => vec![],
            _ => vec![format!("{tag}:a"), format!("{tag}:b")],
        }
    }

    fn restart(&mut self, fault: Option<&str>) {
        let mut env: Vec<(&str, &str)> = self
            .base_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if let Some(f) = fault {
            env.push((FAULT_ENV, f));
        }
        self.berthd.set_env(&env);
        // An idle berthd is killed rather than stopped: SIGTERM waits for streams to close.
        let _ = self.berthd.kill();
        self.berthd.restart().unwrap();
    }

    /// Builds with berthd armed to kill itself at `step`; asserts it died there by SIGKILL.
    async fn killed_at(&mut self, step: &str, tag: &str) {
        self.restart(Some(step));
        let client = self.berthd.client().await.unwrap();
        let def = self.def(tag);
        let names = self.names(tag);
        let r = tokio::time::timeout(
            Duration::from_secs(120),
            export_image(&client, &def, &names, &[]),
        )
        .await
        .expect("the client noticed the daemon's death");
        let st = self
            .berthd
            .wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|e| {
                panic!(
                    "{e}: berthd did not die at {step} (build: {:?})\n{}",
                    r.map(|r| r.solve.map(|s| s.exporter_response)),
                    self.berthd.log_text()
                )
            });
        assert_eq!(st.signal(), Some(9), "{st:?}");
        let log = self.berthd.log_text();
        assert!(
            log.contains(&format!("SIGKILL at {step}")),
            "berthd died elsewhere than {step}:\n{log}"
        );
    }

    /// Starts a build and SIGKILLs berthd after `delay` (the build's solve is cached, so the
    /// delay lands in or around the export).
    async fn killed_after(&mut self, delay: Duration, tag: &str) {
        self.restart(None);
        let client = self.berthd.client().await.unwrap();
        let def = self.def(tag);
        solve_only(&client, &def).await;
        let names = self.names(tag);
        let build = tokio::spawn(async move { export_image(&client, &def, &names, &[]).await });
        tokio::time::sleep(delay).await;
        let st = self.berthd.kill();
        let _ = tokio::time::timeout(Duration::from_secs(60), build).await;
        // The build may have finished before the kill: then berthd was still killed, idle.
        st.unwrap();
    }

    /// (a): what the store shows right after the kill; returns the image each name points at.
    async fn check_after_kill(&mut self, tag: &str, what: &str) -> Vec<Option<String>> {
        let names = self.names(tag);
        match &mut self.store {
            Store::Live { .. } => {
                docker(None, &["images", "-q"]);
                let targets: Vec<Option<String>> =
                    names.iter().map(|n| tag_target(None, n)).collect();
                for (n, t) in names.iter().zip(&targets) {
                    if t.is_some() {
                        assert_eq!(run_cat(None, n, "/data"), tag, "{what}: {n}");
                    }
                }
                targets
            }
            Store::Offline { dockerd } => {
                dockerd
                    .start()
                    .unwrap_or_else(|e| panic!("{what}: dockerd does not start: {e:#}"));
                let host = dockerd.engine().host();
                docker(Some(&host), &["images"]);
                let targets: Vec<Option<String>> =
                    names.iter().map(|n| tag_target(Some(&host), n)).collect();
                for (n, t) in names.iter().zip(&targets) {
                    if t.is_some() {
                        assert_eq!(run_cat(Some(&host), n, "/data"), tag, "{what}: {n}");
                    }
                }
                targets
            }
            Store::Containerd { ctrd } => {
                // Every record must be an image that runs (berth writes no layer blobs, so
                // `ctr images check` would call every record incomplete; running is the test).
                let list = ctrd.ctr_ok(&["images", "ls", "-q"]);
                for rec in list.lines().filter(|l| !l.is_empty()) {
                    if !self.seen_records.insert(rec.to_string()) {
                        continue;
                    }
                    let id = unique_name("berth-fault");
                    let (ok, out) = ctrd.ctr(&[
                        "run",
                        "--rm",
                        "--snapshotter",
                        "overlayfs",
                        rec,
                        &id,
                        "/bin/busybox",
                        "cat",
                        "/shared",
                    ]);
                    assert!(
                        ok && out == "shared",
                        "{what}: record {rec} does not run: {out}"
                    );
                }
                vec![]
            }
        }
    }

    /// (b): after a restart, berthd's own leftovers are gone.
    fn check_leftovers(&mut self, what: &str) {
        if let Store::Offline { dockerd } = &mut self.store {
            if dockerd.is_running() {
                dockerd.stop().unwrap();
            }
        }
        self.restart(None);
        match &mut self.store {
            Store::Live { .. } => {
                let label = format!(
                    "label=dev.berth.pin=worker:{}",
                    self.berthd.root().join("worker").display()
                );
                let pins = docker(None, &["ps", "-aq", "--filter", &label]);
                assert_eq!(pins.trim(), "", "{what}: pins left: {pins}");
            }
            Store::Offline { dockerd } => {
                let left = offline_leftovers(&dockerd.data_root());
                assert!(left.is_empty(), "{what}: leftovers {left:?}");
            }
            Store::Containerd { ctrd } => {
                let leases = ctrd.ctr_ok(&["leases", "ls"]);
                let snaps = ctrd.ctr_ok(&["snapshots", "--snapshotter", "overlayfs", "ls"]);
                assert!(!snaps.contains("berth-extract-"), "{what}: {snaps}");
                assert!(!leases.contains("berth-export-"), "{what}: {leases}");
            }
        }
    }

    /// (c): the rerun succeeds, names point at its image, which runs.
    async fn rerun(&mut self, tag: &str, after_kill: &[Option<String>], what: &str) {
        let client = self.berthd.client().await.unwrap();
        let names = self.names(tag);
        let report = export_image(&client, &self.def(tag), &names, &[])
            .await
            .unwrap();
        let resp = response(&report, &self.berthd.log_text());
        let id = resp["containerimage.config.digest"].clone();
        match &mut self.store {
            Store::Live { .. } => {
                self.cleanup.1.push(id.clone());
                for n in &names {
                    assert_eq!(tag_target(None, n).as_deref(), Some(id.as_str()), "{n}");
                }
                assert_eq!(run_cat(None, &names[1], "/data"), tag);
                assert_eq!(run_cat(None, &names[0], "/shared"), "shared");
            }
            Store::Offline { dockerd } => {
                dockerd.start().unwrap();
                let host = dockerd.engine().host();
                for n in &names {
                    assert_eq!(tag_target(Some(&host), n).as_deref(), Some(id.as_str()));
                }
                assert_eq!(run_cat(Some(&host), &names[1], "/data"), tag);
                dockerd.stop().unwrap();
            }
            Store::Containerd { ctrd } => {
                let rec = format!("moby-dangling@{}", resp["containerimage.digest"]);
                let ctr_id = unique_name("berth-fault");
                let out = ctrd.ctr_ok(&[
                    "run",
                    "--rm",
                    "--snapshotter",
                    "overlayfs",
                    &rec,
                    &ctr_id,
                    "/bin/busybox",
                    "cat",
                    "/data",
                ]);
                assert_eq!(out, tag, "{what}");
                self.seen_records.insert(rec);
            }
        }
        for t in after_kill.iter().flatten() {
            assert_eq!(
                t, &id,
                "{what}: a tag pointed at another image after the kill"
            );
        }
    }
}

async fn kill_at_each_step(mode: &str, steps: &[&str]) {
    let t0 = Instant::now();
    let mut h = Harness::new(mode).await;
    for step in steps {
        let tag = unique_name(&format!("berth-test/fault-{mode}"));
        let t = Instant::now();
        h.killed_at(step, &tag).await;
        let t1 = t.elapsed();
        let after = h.check_after_kill(&tag, step).await;
        let t2 = t.elapsed();
        h.check_leftovers(step);
        let t3 = t.elapsed();
        h.rerun(&tag, &after, step).await;
        eprintln!(
            "{step}: killed {t1:?}, checked {t2:?}, restarted {t3:?}, rerun {:?}",
            t.elapsed()
        );
    }
    eprintln!("{mode}: {} steps in {:?}", steps.len(), t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_kill_at_each_step() {
    kill_at_each_step("live", LIVE_STEPS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_kill_at_each_step() {
    kill_at_each_step("offline", OFFLINE_STEPS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_kill_at_each_step() {
    kill_at_each_step("containerd", CONTAINERD_STEPS).await;
}

async fn random_kills(mode: &str, reps: usize) {
    let mut h = Harness::new(mode).await;
    for rep in 0..reps {
        let delay = Duration::from_millis(rand::random::<u64>() % 1500);
        let what = format!("{mode} rep {rep}: kill after {delay:?}");
        let tag = unique_name(&format!("berth-test/random-{mode}"));
        h.killed_after(delay, &tag).await;
        let after = h.check_after_kill(&tag, &what).await;
        h.check_leftovers(&what);
        h.rerun(&tag, &after, &what).await;
    }
}

/// One random kill per mode (three in all) in the default run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kill_during_export() {
    for mode in ["live", "offline", "containerd"] {
        random_kills(mode, 1).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: 10 random kills per mode"]
async fn random_kills_many() {
    for mode in ["live", "offline", "containerd"] {
        random_kills(mode, 10).await;
    }
}
