//! Docker's store used in place, against the real system dockerd (read-only use of its store; the test creates and
//! removes only its own images and containers). Needs root, `/var/run/docker.sock` and `/bin/busybox`.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use bollard::Docker;
use layerstore::dockerstore::{
    pin_image, remove_stale_pins, resolve_base_image, DockerStore, StorageDriver, PIN_LABEL,
};
use layerstore::snapshot::{
    MountMethod, SnapshotOptions, SnapshotStore, StoreOptions, WhiteoutFormat,
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

fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// Removes the test's images at the end, whatever happens.
struct Images(Vec<String>);
impl Drop for Images {
    fn drop(&mut self) {
        for i in self.0.iter().rev() {
            let _ = Command::new("docker").args(["rmi", "-f", i]).output();
        }
    }
}

fn tar_of(dir: &Path) -> Result<Vec<u8>> {
    let out = Command::new("tar")
        .arg("-C")
        .arg(dir)
        .args(["-cf", "-", "."])
        .output()?;
    ensure!(out.status.success(), "tar failed");
    Ok(out.stdout)
}

/// Three images sharing a busybox base layer A:
/// - `<tag>-base`: A (docker import);
/// - `<tag>-top`: A + B, B committed by dockerd from a container that deleted a file and re-created a dir;
/// - `<tag>-opq`: A + C, loaded from a hand-made archive whose C has an opaque-dir marker and a whiteout.
fn make_images(tag: &str, images: &mut Images) -> Result<(String, String, String)> {
    let busybox =
        fs::read("/bin/busybox").context("busybox-static must be installed at /bin/busybox")?;
    let rootfs = tempfile::tempdir()?;
    let r = rootfs.path();
    for d in ["bin", "etc", "d", "tmp"] {
        fs::create_dir(r.join(d))?;
    }
    fs::write(r.join("bin/busybox"), &busybox)?;
    fs::set_permissions(
        r.join("bin/busybox"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    for app in ["sh", "rm", "mkdir", "cat", "ls"] {
        std::os::unix::fs::symlink("busybox", r.join("bin").join(app))?;
    }
    fs::write(r.join("etc/keep"), "keep")?;
    fs::write(r.join("etc/gone"), "gone")?;
    fs::write(r.join("d/old"), "old")?;
    let base_tag = format!("{tag}-base");
    let layer_a = tar_of(r)?;
    let mut import = Command::new("docker")
        .args(["import", "-", &base_tag])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(import.stdin.as_mut().unwrap(), &layer_a)?;
    drop(import.stdin.take());
    ensure!(
        import.wait_with_output()?.status.success(),
        "docker import failed"
    );
    images.0.push(base_tag.clone());

    let ctr = format!("{tag}-ctr");
    sh(Command::new("docker").args([
        "run",
        "--name",
        &ctr,
        "--network",
        "none",
        &base_tag,
        "/bin/sh",
        "-c",
        "rm /etc/gone && rm -rf /d && mkdir /d && echo new > /d/new && echo top > /etc/top",
    ]))?;
    let top_tag = format!("{tag}-top");
    let res = sh(Command::new("docker").args(["commit", &ctr, &top_tag]));
    let _ = Command::new("docker").args(["rm", "-f", &ctr]).output();
    res?;
    images.0.push(top_tag.clone());

    let c = tempfile::tempdir()?;
    fs::create_dir_all(c.path().join("d"))?;
    fs::create_dir_all(c.path().join("etc"))?;
    fs::write(c.path().join("d/.wh..wh..opq"), "")?;
    fs::write(c.path().join("d/new2"), "new2")?;
    fs::write(c.path().join("etc/.wh.keep"), "")?;
    let layer_c = tar_of(c.path())?;
    let (da, dc) = (
        layerstore::Digest::of(&layer_a),
        layerstore::Digest::of(&layer_c),
    );
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [da.to_string(), dc.to_string()]},
    });
    let opq_tag = format!("{tag}-opq");
    let arch = tempfile::tempdir()?;
    fs::write(arch.path().join("a.tar"), &layer_a)?;
    fs::write(arch.path().join("c.tar"), &layer_c)?;
    fs::write(
        arch.path().join("config.json"),
        serde_json::to_vec(&config)?,
    )?;
    let manifest = serde_json::json!([{
        "Config": "config.json", "RepoTags": [format!("{opq_tag}:latest")], "Layers": ["a.tar", "c.tar"],
    }]);
    fs::write(
        arch.path().join("manifest.json"),
        serde_json::to_vec(&manifest)?,
    )?;
    let archive = tar_of(arch.path())?;
    let mut load = Command::new("docker")
        .args(["load", "-q"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(load.stdin.as_mut().unwrap(), &archive)?;
    drop(load.stdin.take());
    ensure!(
        load.wait_with_output()?.status.success(),
        "docker load failed"
    );
    images.0.push(opq_tag.clone());
    Ok((base_tag, top_tag, opq_tag))
}

fn listing(dirs: &[PathBuf]) -> Result<Vec<(PathBuf, i64, u64)>> {
    let mut out = vec![];
    for d in dirs {
        for e in walkdir::WalkDir::new(d) {
            let e = e?;
            let md = e.metadata()?;
            out.push((e.path().to_path_buf(), md.mtime(), md.size()));
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_image_in_place_through_overlay_and_pins() -> Result<()> {
    assert!(rustix::process::geteuid().is_root(), "needs root");
    let docker = docker();
    let info = docker
        .info()
        .await
        .context("system dockerd must answer on /var/run/docker.sock")?;
    let driver = StorageDriver::from_name(info.driver.as_deref().unwrap_or_default())?;
    let data_root = PathBuf::from(info.docker_root_dir.clone().context("DockerRootDir")?);
    let store = DockerStore::new(&data_root, driver);

    let tag = format!("berth-test-ds-{}", std::process::id());
    let mut images = Images(vec![]);
    let (_base, top, opq) = make_images(&tag, &mut images)?;

    let img = resolve_base_image(&docker, &store, &top).await?;
    ensure!(
        img.diff_ids.len() == 2 && img.layer_dirs.len() == 2 && img.chain_ids[0] == img.diff_ids[0]
    );
    ensure!(img.layer_dirs[0].join("bin/busybox").is_file());
    ensure!(layerstore::Digest::of(&img.config) == img.id);
    // Reader agrees with the live answer.
    let entries = store.image_layers(&img.id)?;
    ensure!(
        entries
            .iter()
            .map(|e| e.diff_dir.clone())
            .collect::<Vec<_>>()
            == img.layer_dirs
    );
    ensure!(entries[1].parent == Some(img.chain_ids[0]));

    // What did the driver store for the deletion? (The fact behind WhiteoutFormat::Aufs.)
    let top_dir = &img.layer_dirs[1];
    let gone_marker = fs::symlink_metadata(top_dir.join("etc/.wh.gone"));
    let gone_dev = fs::symlink_metadata(top_dir.join("etc/gone"));
    match driver.whiteout_format() {
        WhiteoutFormat::Aufs => {
            ensure!(
                gone_marker.map(|m| m.is_file()).unwrap_or(false),
                "fuse-overlayfs stores .wh. files"
            );
            ensure!(
                top_dir.join("d/.wh.old").is_file(),
                "dockerd's commit diff lists d/old as deleted"
            );
            eprintln!(
                "verified: {} stores AUFS whiteouts (etc/.wh.gone, d/.wh.old)",
                driver.name()
            );
        }
        WhiteoutFormat::Overlay => {
            let m = gone_dev?;
            ensure!(
                std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type()) && m.rdev() == 0
            );
        }
    }

    // Mount the image in place through berth's snapshot store and read through the overlay.
    let before = listing(&img.layer_dirs)?;
    let root = tempfile::Builder::new()
        .prefix("berth-ds-")
        .tempdir_in("/var/tmp")?;
    let snaps = SnapshotStore::open(StoreOptions {
        root: root.path().into(),
        mount_method: MountMethod::Auto,
    })?;
    let base = snaps.create_from_chain(img.chain(), &[], &SnapshotOptions::new(&top))?;
    {
        let m = snaps.mount(&base, None)?;
        let p = m.path();
        ensure!(fs::read_to_string(p.join("etc/keep"))? == "keep");
        ensure!(fs::read_to_string(p.join("etc/top"))?.trim() == "top");
        ensure!(
            !p.join("etc/gone").exists(),
            "deleted file visible through kernel overlay"
        );
        ensure!(
            !p.join("etc/.wh.gone").exists(),
            "AUFS marker visible through kernel overlay"
        );
        let d: Vec<_> = fs::read_dir(p.join("d"))?
            .map(|e| e.unwrap().file_name())
            .collect();
        ensure!(
            d == vec![std::ffi::OsString::from("new")],
            "opaque dir shows {d:?}"
        );
        // Run busybox from the mounted tree.
        let out = sh(Command::new("chroot")
            .arg(p)
            .args(["/bin/cat", "/etc/keep"]))?;
        ensure!(out == "keep");
    }
    // The loaded image: an AUFS opaque marker and a whiteout in its top layer.
    let opq_img = resolve_base_image(&docker, &store, &opq).await?;
    ensure!(
        opq_img.layer_dirs[0] == img.layer_dirs[0],
        "layer A shared by chainID"
    );
    if driver.whiteout_format() == WhiteoutFormat::Aufs {
        ensure!(
            opq_img.layer_dirs[1].join("d/.wh..wh..opq").is_file(),
            "fuse-overlayfs keeps the opaque marker"
        );
    }
    let o = snaps.create_from_chain(opq_img.chain(), &[], &SnapshotOptions::new(&opq))?;
    {
        let m = snaps.mount(&o, None)?;
        let p = m.path();
        let d: Vec<_> = fs::read_dir(p.join("d"))?
            .map(|e| e.unwrap().file_name())
            .collect();
        ensure!(
            d == vec![std::ffi::OsString::from("new2")],
            "opaque dir shows {d:?}"
        );
        ensure!(!p.join("etc/keep").exists() && p.join("etc/gone").is_file());
        ensure!(fs::read_dir(p.join("etc"))?.all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".wh.")));
    }
    // A mutable snapshot over Docker's layers writes only to berth's upper dir.
    let rw = snaps.prepare(Some(&base), &SnapshotOptions::new("rw"))?;
    {
        let m = snaps.mount(&rw, None)?;
        fs::write(m.path().join("etc/keep"), "changed")?;
        fs::remove_file(m.path().join("etc/top"))?;
    }
    // DiffOp over Docker layers: an exec result on top of the image is one reused layer; two siblings sharing the
    // busybox layer (the opaque-marker image vs the committed one) get a computed layer, and
    // merge(lower, diff(lower, upper)) shows exactly upper, through the AUFS adapters.
    snaps.commit(&rw)?;
    let d = snaps.diff(Some(&base), Some(&rw), &SnapshotOptions::new("d"))?;
    ensure!(snaps.info(&d)?.chain.layers().len() == 1);
    let d2 = snaps.diff(Some(&o), Some(&base), &SnapshotOptions::new("d2"))?;
    let merged = snaps.merge(&[o.clone(), d2], &SnapshotOptions::new("m"))?;
    let view = |id: &layerstore::snapshot::SnapshotId| -> Result<Vec<String>> {
        let m = snaps.mount(id, None)?;
        let mut out = vec![];
        for e in walkdir::WalkDir::new(m.path())
            .min_depth(1)
            .sort_by_file_name()
        {
            let e = e?;
            let md = fs::symlink_metadata(e.path())?;
            let content = if md.is_file() {
                fs::read(e.path())?
            } else {
                vec![]
            };
            out.push(format!(
                "{:?} {:o} {} {:?}",
                e.path().strip_prefix(m.path())?,
                md.mode(),
                md.mtime(),
                content
            ));
        }
        Ok(out)
    };
    let (got, want) = (view(&merged)?, view(&base)?);
    ensure!(
        got == want,
        "merge(opq, diff(opq, top)) != top:\n{got:#?}\n{want:#?}"
    );
    ensure!(
        listing(&img.layer_dirs)? == before,
        "docker's layer dirs were modified"
    );
    drop(snaps);

    // Pinning: rmi of the only tag fails while pinned, works after release (pins_live.rs tests
    // the pin container itself).
    let instance = format!("berth-test-{}", std::process::id());
    let pin = pin_image(&docker, &img.id.to_string(), &instance, "build-1").await?;
    let rmi = Command::new("docker").args(["rmi", &top]).output()?;
    ensure!(!rmi.status.success(), "rmi must fail while pinned");
    ensure!(img.layer_dirs[1].is_dir());
    let insp = docker
        .inspect_container(
            &pin.container_id(),
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await?;
    ensure!(
        insp.config
            .and_then(|c| c.labels)
            .and_then(|l| l.get(PIN_LABEL).cloned())
            == Some(instance.clone())
    );
    pin.check(&top, &img.layer_dirs).await?;
    pin.release().await?;

    // Stale pins (a crashed process's, made by hand here with the same label) are removed by
    // instance label; another instance's pin is kept.
    let stale = sh(Command::new("docker").args([
        "create",
        "--label",
        &format!("{PIN_LABEL}={instance}"),
        &top,
        "/bin/true",
    ]))?;
    let other = pin_image(&docker, &img.id.to_string(), "another-instance", "b").await?;
    let n = remove_stale_pins(&docker, &instance).await?;
    ensure!(n == 1, "expected the stale pin only, removed {n}");
    ensure!(
        docker
            .inspect_container(
                &stale,
                None::<bollard::query_parameters::InspectContainerOptions>
            )
            .await
            .is_err(),
        "stale pin kept"
    );
    ensure!(
        docker
            .inspect_container(
                &other.container_id(),
                None::<bollard::query_parameters::InspectContainerOptions>
            )
            .await
            .is_ok(),
        "other instance's pin kept"
    );
    other.release().await?;
    ensure!(remove_stale_pins(&docker, &instance).await? == 0);
    sh(Command::new("docker").args(["rmi", &top]))?;
    Ok(())
}

#[test]
fn reader_reports_missing_layers_and_bad_configs() -> Result<()> {
    let root = tempfile::tempdir()?;
    let store = DockerStore::new(root.path(), StorageDriver::Overlay2);
    let d: layerstore::Digest = format!("sha256:{}", "ab".repeat(32)).parse()?;
    ensure!(store.layer(&d)?.is_none());
    let err = store.layers_for_diff_ids(&[d]).unwrap_err().to_string();
    ensure!(err.contains("not in docker's store"), "{err}");
    let img = store.image_dir().join("imagedb/content/sha256");
    fs::create_dir_all(&img)?;
    fs::write(img.join(d.hex()), b"{}")?;
    let err = store.image_config(&d).unwrap_err().to_string();
    ensure!(err.contains("digest mismatch"), "{err}");
    ensure!(StorageDriver::from_name("btrfs").is_err());
    let _ = Path::new("/");
    Ok(())
}

/// A pin dropped outside any tokio runtime is still removed (through a helper thread with its own runtime).
#[test]
fn pin_dropped_outside_a_runtime_is_removed() -> Result<()> {
    let tag = format!("berth-test-pin-{}", std::process::id());
    let mut images = Images(vec![]);
    let dir = tempfile::tempdir()?;
    fs::write(dir.path().join("file"), "x")?;
    let layer = tar_of(dir.path())?;
    let mut import = Command::new("docker")
        .args(["import", "-", &tag])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(import.stdin.as_mut().unwrap(), &layer)?;
    drop(import.stdin.take());
    ensure!(
        import.wait_with_output()?.status.success(),
        "docker import failed"
    );
    images.0.push(tag.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let docker = rt.block_on(async { docker() });
    let pin = rt.block_on(pin_image(&docker, &tag, "berth-test-noruntime", "b"))?;
    let id = pin.container_id().to_string();
    drop(rt);
    drop(pin);
    let out = Command::new("docker").args(["inspect", &id]).output()?;
    ensure!(
        !out.status.success(),
        "pin container {id} survived its drop"
    );
    Ok(())
}
