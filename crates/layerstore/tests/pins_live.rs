//! Pins against the real system dockerd: a running container of berth's pin process in an image
//! with no binaries at all, shared by builds, refused removal by Docker itself, costing no CPU;
//! `docker stop` ends it at once and it comes back; a forced removal is reported by
//! `Pin::check` with the image and what removed it; a pin made in the background returns at
//! once, runs shortly after (`Pin::holding`), and one of a deleted image gives up with the
//! reason. The test touches only its own image and
//! pin containers (no prunes on the system daemon). Needs root and `/var/run/docker.sock`.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bollard::query_parameters::{InspectContainerOptions, ListContainersOptions};
use bollard::Docker;
use futures::StreamExt as _;
use layerstore::dockerstore::{
    pin_image, pin_image_in_background, resolve_base_image, DockerStore, StorageDriver,
    PIN_IMAGE_LABEL, PIN_LABEL, PIN_PID_LABEL,
};

fn docker() -> Docker {
    Docker::connect_with_unix(
        "/var/run/docker.sock",
        120,
        &bollard::ClientVersion {
            major_version: 1,
            minor_version: 41,
        },
    )
    .expect("docker socket")
}

/// Removes the test's image at the end, whatever happens.
struct Image(String);
impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
    }
}

/// Pin containers of `instance`, running or not.
async fn pins(docker: &Docker, instance: &str) -> Result<Vec<bollard::models::ContainerSummary>> {
    let filters = HashMap::from([("label".to_string(), vec![format!("{PIN_LABEL}={instance}")])]);
    Ok(docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await?)
}

/// Waits (≤ 20 s) for a running pin container of `instance` other than `not`; returns its ID.
async fn running_pin(docker: &Docker, instance: &str, not: Option<&str>) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for c in pins(docker, instance).await? {
            if c.state.as_ref().map(|s| s.to_string()).as_deref() == Some("running")
                && c.id.as_deref() != not
            {
                return Ok(c.id.unwrap_or_default());
            }
        }
        ensure!(Instant::now() < deadline, "no running pin of {instance}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The container's cgroup CPU usage (ns), as dockerd reads it from the cgroup.
async fn cpu_ns(docker: &Docker, id: &str) -> Result<u64> {
    let opts = bollard::query_parameters::StatsOptions {
        stream: false,
        one_shot: true,
    };
    let s = docker
        .stats(id, Some(opts))
        .next()
        .await
        .context("no stats")??;
    s.cpu_stats
        .and_then(|c| c.cpu_usage)
        .and_then(|u| u.total_usage)
        .context("no cpu usage in stats")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_runs_in_an_empty_image_is_shared_costs_nothing_and_reports_loss() -> Result<()> {
    let docker = docker();
    // An image with one data file and no binaries.
    let tag = format!("berth-test-pins:{}", std::process::id());
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("data"), "pinned")?;
    let tar = Command::new("tar")
        .arg("-C")
        .arg(dir.path())
        .args(["-cf", "-", "."])
        .output()?;
    ensure!(tar.status.success(), "tar failed");
    let mut import = Command::new("docker")
        .args(["import", "-", &tag])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(import.stdin.as_mut().unwrap(), &tar.stdout)?;
    drop(import.stdin.take());
    ensure!(
        import.wait_with_output()?.status.success(),
        "docker import failed"
    );
    let _image = Image(tag.clone());
    let info = docker.info().await?;
    let store = DockerStore::new(
        info.docker_root_dir.clone().unwrap_or_default(),
        StorageDriver::from_name(info.driver.as_deref().unwrap_or_default())?,
    );
    let img = resolve_base_image(&docker, &store, &tag).await?;
    let id = img.id.to_string();
    // A berthd's instance names its worker root: the pin program is bind-mounted from a file
    // there (dockerd runs on this host and sees the same path).
    let root = tempfile::tempdir()?;
    let instance = format!("worker:{}", root.path().display());
    let _cleanup = PinsOf(instance.clone());

    // Created on the caller's path, started in the background.
    let t = Instant::now();
    let p1 = pin_image(&docker, &id, &instance, "build-1").await?;
    let created = t.elapsed();
    let cid = running_pin(&docker, &instance, None).await?;
    let started = t.elapsed();
    ensure!(cid == p1.container_id());
    // A second build shares it.
    let p2 = pin_image(&docker, &id, &instance, "build-2").await?;
    ensure!(p2.container_id() == cid, "second build got another pin");
    ensure!(pins(&docker, &instance).await?.len() == 1);

    // Recognisable and locked down.
    let c = docker
        .inspect_container(&cid, None::<InspectContainerOptions>)
        .await?;
    let name = c.name.clone().unwrap_or_default();
    let short = id
        .trim_start_matches("sha256:")
        .get(..12)
        .unwrap_or_default();
    ensure!(name.starts_with(&format!("/berth-pin-{short}-")), "{name}");
    let labels = c
        .config
        .as_ref()
        .and_then(|c| c.labels.clone())
        .unwrap_or_default();
    ensure!(labels.get(PIN_IMAGE_LABEL) == Some(&id), "{labels:?}");
    ensure!(labels.get(PIN_PID_LABEL) == Some(&std::process::id().to_string()));
    let hc = c.host_config.clone().unwrap_or_default();
    ensure!(hc.network_mode.as_deref() == Some("none"), "{hc:?}");
    ensure!(hc.cap_drop == Some(vec!["ALL".to_string()]));
    ensure!(c.config.as_ref().and_then(|c| c.user.clone()).as_deref() == Some("65534:65534"));
    let pid = c.state.as_ref().and_then(|s| s.pid).context("pid")?;
    // The pin program comes read-only from the root (nothing uploaded), and the pin holds its
    // stdin open through berth's attach.
    let mounts = c.mounts.clone().unwrap_or_default();
    ensure!(
        mounts
            .iter()
            .any(|m| m.destination.as_deref() == Some("/.berth-pin")
                && m.rw == Some(false)
                && m.source
                    .as_deref()
                    .is_some_and(|s| s.starts_with(&*root.path().to_string_lossy()))),
        "pin program not bind-mounted from the root: {mounts:?}"
    );
    let cfg = c.config.clone().unwrap_or_default();
    ensure!(
        cfg.open_stdin == Some(true) && cfg.stdin_once == Some(true),
        "{cfg:?}"
    );
    ensure!(hc.auto_remove == Some(true), "{hc:?}");

    // Docker itself refuses to remove the image, even with -f; prunes are not tried here (system
    // daemon; the integration tests prune a private one).
    let rmi = Command::new("docker").args(["rmi", &tag]).output()?;
    let err = String::from_utf8_lossy(&rmi.stderr);
    ensure!(
        !rmi.status.success() && err.contains("conflict"),
        "rmi tag: {err}"
    );
    let rmi = Command::new("docker").args(["rmi", "-f", &id]).output()?;
    let err = String::from_utf8_lossy(&rmi.stderr);
    ensure!(
        !rmi.status.success()
            && err.contains("cannot be forced")
            && err.contains("running container"),
        "rmi -f id: {err}"
    );

    // No CPU (the cgroup's counter does not move in 2 s) and a few KiB of memory.
    let u0 = cpu_ns(&docker, &cid).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let u1 = cpu_ns(&docker, &cid).await?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")?;
    println!(
        "pin: create {created:?}, running after {started:?}, VmRSS {rss_kb} kB, cgroup cpu {u0} ns, +{} ns in 2 s",
        u1 - u0
    );
    ensure!(u1 - u0 < 1_000_000, "pin used {} ns of CPU in 2 s", u1 - u0);
    ensure!(rss_kb < 1024, "pin RSS {rss_kb} kB");

    // docker stop: the pin ends at once (SIGTERM, exit 143) and berth pins the image again.
    let t = Instant::now();
    let out = Command::new("docker")
        .args(["stop", "-t", "10", &cid])
        .output()?;
    ensure!(out.status.success(), "docker stop failed");
    let stop = t.elapsed();
    ensure!(stop < Duration::from_secs(5), "docker stop took {stop:?}");
    let again = running_pin(&docker, &instance, Some(&cid)).await?;
    println!("pin: docker stop {stop:?}; pinned again as {again}");
    p1.check(&tag, &img.layer_dirs).await?;

    // Forced: remove the pin and the image (until the image is gone: berth re-pins quickly).
    let mut gone = false;
    for _ in 0..10 {
        for c in pins(&docker, &instance).await? {
            let _ = docker
                .remove_container(
                    c.id.as_deref().unwrap_or_default(),
                    Some(bollard::query_parameters::RemoveContainerOptions {
                        force: true,
                        ..Default::default()
                    }),
                )
                .await;
        }
        let r = docker
            .remove_image(
                &id,
                Some(bollard::query_parameters::RemoveImageOptions {
                    force: true,
                    ..Default::default()
                }),
                None,
            )
            .await;
        if r.is_ok() {
            gone = true;
            break;
        }
    }
    ensure!(gone, "could not remove the image by force");
    let err = match p1.check(&tag, &img.layer_dirs).await {
        Ok(()) => bail!("check passed after the image was removed"),
        Err(e) => e.to_string(),
    };
    println!("pin: after rm -f + rmi -f: {err}");
    for want in [
        tag.as_str(),
        id.as_str(),
        "was removed from Docker while the build used it",
        "pin container berth-pin-",
        "deleted",
    ] {
        ensure!(err.contains(want), "{want:?} not in {err}");
    }
    ensure!(!err.contains("No such file"), "{err}");

    // Released by the last handle: no pin container of this test is left when `release`
    // returns, not even one the supervisor was creating to pin the image again while the loop
    // above removed them (release waits for it to end).
    drop(p1);
    p2.release().await?;
    let left = pins(&docker, &instance).await?;
    ensure!(left.is_empty(), "pins left after release: {left:?}");
    Ok(())
}

/// Force-removes the test's pin containers at the end, whatever happens (they are named
/// `berth-pin-*` and labelled with the test's own instance).
struct PinsOf(String);
impl Drop for PinsOf {
    fn drop(&mut self) {
        let filter = format!("label={PIN_LABEL}={}", self.0);
        if let Ok(out) = Command::new("docker")
            .args(["ps", "-aq", "--filter", &filter])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
    }
}

/// Measures the pin's critical path (create, then created → running) with the pin program
/// bind-mounted (an instance naming a worker root) against uploaded (an instance naming none),
/// alternating, 9 rounds each after a warm-up; prints the medians. A measurement, not a check:
/// `cargo test -p layerstore --test pins_live -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement (about a minute)"]
async fn pin_start_bind_vs_upload() -> Result<()> {
    let docker = docker();
    let tag = format!("berth-test-pins-ab:{}", std::process::id());
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("data"), "pinned")?;
    let tar = Command::new("tar")
        .arg("-C")
        .arg(dir.path())
        .args(["-cf", "-", "."])
        .output()?;
    let mut import = Command::new("docker")
        .args(["import", "-", &tag])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(import.stdin.as_mut().unwrap(), &tar.stdout)?;
    drop(import.stdin.take());
    ensure!(
        import.wait_with_output()?.status.success(),
        "docker import failed"
    );
    let _image = Image(tag.clone());
    let id = docker.inspect_image(&tag).await?.id.context("image id")?;
    let root = tempfile::tempdir()?;
    let bound = format!("worker:{}", root.path().display());
    let uploaded = format!("berth-test-pins-ab-{}", std::process::id());
    let (_c1, _c2) = (PinsOf(bound.clone()), PinsOf(uploaded.clone()));
    let mut t: HashMap<&str, (Vec<f64>, Vec<f64>)> = HashMap::new();
    for round in 0..10 {
        for (what, instance) in [("bind", &bound), ("upload", &uploaded)] {
            let t0 = Instant::now();
            let pin = pin_image(&docker, &id, instance, "ab").await?;
            let created = t0.elapsed();
            ensure!(
                pin.wait_running(Duration::from_secs(60)).await,
                "{what}: not running"
            );
            let running = t0.elapsed();
            pin.release().await?;
            if round > 0 {
                let e = t.entry(what).or_default();
                e.0.push(created.as_secs_f64() * 1000.0);
                e.1.push((running - created).as_secs_f64() * 1000.0);
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    for (what, (mut c, mut s)) in t {
        let (mc, ms) = (median(&mut c), median(&mut s));
        println!(
            "{what}: create {mc:.0} ms, created->running {ms:.0} ms, sum {:.0} ms (create {:.0}-{:.0}, start {:.0}-{:.0})",
            mc + ms,
            c[0],
            c[c.len() - 1],
            s[0],
            s[s.len() - 1]
        );
    }
    Ok(())
}

/// Imports a one-file image without binaries as `tag`; returns its ID.
async fn import_image(docker: &Docker, tag: &str) -> Result<String> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("data"), "pinned")?;
    let tar = Command::new("tar")
        .arg("-C")
        .arg(dir.path())
        .args(["-cf", "-", "."])
        .output()?;
    let mut import = Command::new("docker")
        .args(["import", "-", tag])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(import.stdin.as_mut().unwrap(), &tar.stdout)?;
    drop(import.stdin.take());
    ensure!(
        import.wait_with_output()?.status.success(),
        "docker import failed"
    );
    docker.inspect_image(tag).await?.id.context("image id")
}

/// `pin_image_in_background` puts no Docker round trip on the caller's path: it returns before
/// the container exists; the pin then runs and holds (never lost), and is shared with a later
/// `pin_image`. For an image that is gone (deleted after the caller's lookup) it gives up, and
/// says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_in_the_background_returns_at_once_then_holds_or_gives_up() -> Result<()> {
    let docker = docker();
    let tag = format!("berth-test-pins-bg:{}", std::process::id());
    let id = import_image(&docker, &tag).await?;
    let _image = Image(tag.clone());
    let root = tempfile::tempdir()?;
    let instance = format!("worker:{}", root.path().display());
    let _cleanup = PinsOf(instance.clone());

    let t = Instant::now();
    let pin = pin_image_in_background(&docker, &id, &instance, "bg-1")?;
    let returned = t.elapsed();
    ensure!(!pin.holding() && !pin.ever_ran(), "holding before it ran");
    ensure!(
        pin.wait_running(Duration::from_secs(60)).await,
        "the background pin did not run"
    );
    println!(
        "pin_image_in_background returned in {returned:?}; running after {:?}",
        t.elapsed()
    );
    ensure!(
        returned < Duration::from_millis(20),
        "returned after {returned:?}"
    );
    ensure!(pin.holding() && pin.ever_ran() && !pin.lost());
    let cid = running_pin(&docker, &instance, None).await?;
    ensure!(cid == pin.container_id());
    let again = pin_image(&docker, &id, &instance, "bg-2").await?;
    ensure!(again.same_pin(&pin), "a later pin_image made another pin");
    // Released, not dropped: a dropped handle lingers (3 s), a released one does not.
    again.release().await?;
    pin.release().await?;
    ensure!(
        pins(&docker, &instance).await?.is_empty(),
        "the released pin is left"
    );

    // An image deleted between the caller's lookup and the pin's creation: given up, with the
    // reason; `check` names the image.
    let gone_tag = format!("berth-test-pins-gone:{}", std::process::id());
    let gone = import_image(&docker, &gone_tag).await?;
    ensure!(Command::new("docker")
        .args(["rmi", &gone_tag])
        .output()?
        .status
        .success());
    let pin = pin_image_in_background(&docker, &gone, &instance, "bg-3")?;
    ensure!(
        !pin.wait_running(Duration::from_secs(60)).await,
        "a pin of a deleted image runs"
    );
    ensure!(pin.given_up() && pin.lost() && !pin.ever_ran());
    let err = pin.check(&gone_tag, &[]).await.unwrap_err().to_string();
    ensure!(
        err.contains(&gone)
            && err.contains("deleted from Docker before its pin container was created"),
        "{err}"
    );
    ensure!(
        pins(&docker, &instance).await?.is_empty(),
        "a pin container is left"
    );
    Ok(())
}

/// `pin_image_after`: a pin whose every handle goes before its delay makes no container at all;
/// one still held when the delay ends is made and runs; one that something waits for
/// (`Pin::wait_running`) is made at once, without waiting out the delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_pin_is_made_only_if_still_held_or_waited_for() -> Result<()> {
    let docker = docker();
    let tag = format!("berth-test-pins-delay:{}", std::process::id());
    let id = import_image(&docker, &tag).await?;
    let _image = Image(tag.clone());
    let root = tempfile::tempdir()?;
    let instance = format!("worker:{}", root.path().display());
    let _cleanup = PinsOf(instance.clone());
    let delay = Duration::from_millis(500);

    // Dropped within the delay: nothing is ever made.
    let pin = layerstore::dockerstore::pin_image_after(&docker, &id, &instance, "d-1", delay)?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    ensure!(!pin.ever_ran() && pin.container_id().is_empty());
    drop(pin);
    tokio::time::sleep(delay + Duration::from_millis(700)).await;
    ensure!(
        pins(&docker, &instance).await?.is_empty(),
        "a pin dropped within its delay made a container"
    );

    // Held past the delay: made, and it runs.
    let t = Instant::now();
    let pin = layerstore::dockerstore::pin_image_after(&docker, &id, &instance, "d-2", delay)?;
    tokio::time::sleep(delay / 2).await;
    ensure!(
        pins(&docker, &instance).await?.is_empty(),
        "a container before the delay ended"
    );
    running_pin(&docker, &instance, None).await?;
    ensure!(t.elapsed() >= delay, "made after {:?}", t.elapsed());
    ensure!(pin.holding());
    pin.release().await?;
    ensure!(pins(&docker, &instance).await?.is_empty());

    // Waited for: made at once.
    let long = Duration::from_secs(60);
    let t = Instant::now();
    let pin = layerstore::dockerstore::pin_image_after(&docker, &id, &instance, "d-3", long)?;
    ensure!(
        pin.wait_running(Duration::from_secs(30)).await,
        "a delayed pin waited for did not run"
    );
    ensure!(
        t.elapsed() < Duration::from_secs(30),
        "ran after {:?}",
        t.elapsed()
    );
    pin.release().await?;
    ensure!(pins(&docker, &instance).await?.is_empty());
    Ok(())
}
