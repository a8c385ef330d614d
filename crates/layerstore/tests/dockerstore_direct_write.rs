//! Acceptance test of the stopped-daemon writer: a multi-layer image (whiteout, opaque dir, hardlinks, xattrs, a
//! symlink, a non-ASCII name) is written into the data root of a stopped **private** dockerd (overlay2, own
//! containerd, own roots; the system dockerd is never touched). After start the image must list, run, show every
//! feature, and `docker save` must reproduce each layer with sha256 == diffID.
//!
//! Needs root, dockerd, containerd, runc and `/bin/busybox`. (It lives here rather than in `integration/` because
//! the integration crate does not depend on `layerstore`; it starts its daemons the same way `PrivateDockerd` does.)

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use layerstore::dockerstore::{
    DaemonCheck, DockerStore, LayerSource, OfflineWriter, StorageDriver,
};
use layerstore::tar::{write_layer, WriteOptions};
use layerstore::Digest;

/// A throwaway dockerd + containerd on a temp dir; stopped (by PID) on drop.
struct Daemon {
    driver: StorageDriver,
    dir: tempfile::TempDir,
    dockerd: Option<Child>,
    containerd: Option<Child>,
}

impl Daemon {
    fn new(driver: StorageDriver) -> Result<Daemon> {
        let dir = tempfile::Builder::new()
            .prefix("berth-dw-")
            .tempdir_in("/var/tmp")?;
        for sub in ["data", "exec", "containerd/root", "containerd/state"] {
            fs::create_dir_all(dir.path().join(sub))?;
        }
        let mut d = Daemon {
            driver,
            dir,
            dockerd: None,
            containerd: None,
        };
        d.start()?;
        Ok(d)
    }
    fn p(&self, s: &str) -> PathBuf {
        self.dir.path().join(s)
    }
    fn data_root(&self) -> PathBuf {
        self.p("data")
    }
    fn check(&self) -> DaemonCheck {
        DaemonCheck {
            pidfile: Some(self.p("docker.pid")),
            socket: Some(self.p("docker.sock")),
        }
    }
    fn start(&mut self) -> Result<()> {
        let ctr_sock = self.p("containerd/containerd.sock");
        let cfg = format!(
            "version = 2\nroot = {:?}\nstate = {:?}\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\n[grpc]\n  address = {:?}\n",
            self.p("containerd/root"),
            self.p("containerd/state"),
            ctr_sock
        );
        fs::write(self.p("containerd/config.toml"), cfg)?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.p("containerd.log"))?;
        self.containerd = Some(
            Command::new("containerd")
                .arg("--config")
                .arg(self.p("containerd/config.toml"))
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("containerd must be installed")?,
        );
        wait_for(
            || std::os::unix::net::UnixStream::connect(&ctr_sock).is_ok(),
            "containerd",
        )?;
        fs::write(self.p("daemon.json"), "{}")?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.p("dockerd.log"))?;
        self.dockerd = Some(
            // Own network namespace: dockerd with `--bridge=none` deletes `docker0`, which in
            // the host namespace is the system daemon's bridge.
            Command::new("unshare")
                .args(["--net", "--", "dockerd"])
                .arg("--config-file")
                .arg(self.p("daemon.json"))
                .arg("--data-root")
                .arg(self.data_root())
                .arg("--exec-root")
                .arg(self.p("exec"))
                .arg("--pidfile")
                .arg(self.p("docker.pid"))
                .arg("--host")
                .arg(format!("unix://{}", self.p("docker.sock").display()))
                .arg("--containerd")
                .arg(&ctr_sock)
                .args([
                    "--storage-driver",
                    self.driver.name(),
                    "--bridge=none",
                    "--iptables=false",
                ])
                .args([
                    "--ip-masq=false",
                    "--ip-forward=false",
                    "--userland-proxy=false",
                ])
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("dockerd must be installed")?,
        );
        let sock = self.p("docker.sock");
        wait_for(
            || {
                Command::new("docker")
                    .arg("-H")
                    .arg(format!("unix://{}", sock.display()))
                    .arg("version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
            },
            "dockerd",
        )
        .with_context(|| fs::read_to_string(self.p("dockerd.log")).unwrap_or_default())
    }
    fn stop(&mut self) -> Result<()> {
        for child in [self.dockerd.take(), self.containerd.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }
    fn docker(&self, args: &[&str]) -> Result<std::process::Output> {
        let out = Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.p("docker.sock").display()))
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(out)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.stop();
        // Unmount whatever the daemon left under its dir (deepest first).
        if let Ok(mi) = fs::read_to_string("/proc/self/mountinfo") {
            let mut ms: Vec<PathBuf> = mi
                .lines()
                .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
                .filter(|p| p.starts_with(self.dir.path()))
                .collect();
            ms.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for m in ms {
                let _ = rustix::mount::unmount(&m, rustix::mount::UnmountFlags::DETACH);
            }
        }
    }
}

fn wait_for(mut f: impl FnMut() -> bool, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        if Instant::now() > deadline {
            bail!("{what} did not come up");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

struct Layer {
    tar: PathBuf,
    split: PathBuf,
    diff_id: Digest,
    dir: PathBuf,
}

/// Exports an overlay-format layer dir with berth's tar writer.
fn export(dir: &Path, out: &Path, name: &str) -> Result<Layer> {
    let tar = out.join(format!("{name}.tar"));
    let split = out.join(format!("{name}.tar-split.json.gz"));
    let mut ts = fs::File::create(&split)?;
    let d = write_layer(
        dir,
        fs::File::create(&tar)?,
        Some(&mut ts),
        &WriteOptions::default(),
    )?;
    Ok(Layer {
        tar,
        split,
        diff_id: d.diff_id,
        dir: dir.to_path_buf(),
    })
}

const UNICODE: &str = "ünïcødé-файл";

fn build_layers(work: &Path) -> Result<Vec<Layer>> {
    let busybox =
        fs::read("/bin/busybox").context("busybox-static must be installed at /bin/busybox")?;
    let mk = |n: &str| -> Result<PathBuf> {
        let p = work.join(n);
        fs::create_dir_all(&p)?;
        Ok(p)
    };
    // L0: busybox.
    let l0 = mk("l0")?;
    fs::create_dir_all(l0.join("bin"))?;
    fs::write(l0.join("bin/busybox"), &busybox)?;
    fs::set_permissions(
        l0.join("bin/busybox"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    for app in ["sh", "cat", "ls", "stat", "readlink", "test"] {
        std::os::unix::fs::symlink("busybox", l0.join("bin").join(app))?;
    }
    // L1: files, hardlinks, symlink, xattrs, non-ASCII name, things to delete later.
    let l1 = mk("l1")?;
    fs::create_dir_all(l1.join("data"))?;
    fs::create_dir_all(l1.join("olddir"))?;
    fs::write(l1.join("data/a"), "alpha\n")?;
    fs::write(l1.join("data/hl1"), "linked\n")?;
    fs::hard_link(l1.join("data/hl1"), l1.join("data/hl2"))?;
    std::os::unix::fs::symlink("a", l1.join("data/link"))?;
    fs::write(l1.join("data").join(UNICODE), "unicode\n")?;
    rustix::fs::lsetxattr(
        l1.join("data/a"),
        "user.berth",
        b"yes",
        rustix::fs::XattrFlags::empty(),
    )?;
    fs::write(l1.join("olddir/x"), "x\n")?;
    fs::write(l1.join("gone"), "gone\n")?;
    // L2: a whiteout and an opaque dir (overlay format).
    let l2 = mk("l2")?;
    rustix::fs::mknodat(
        rustix::fs::CWD,
        l2.join("gone"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::empty(),
        0,
    )?;
    fs::create_dir_all(l2.join("olddir"))?;
    rustix::fs::lsetxattr(
        l2.join("olddir"),
        "trusted.overlay.opaque",
        b"y",
        rustix::fs::XattrFlags::empty(),
    )?;
    fs::write(l2.join("olddir/new"), "new\n")?;
    // L3: one more file.
    let l3 = mk("l3")?;
    fs::write(l3.join("last"), "last\n")?;
    let out = mk("tars")?;
    [("l0", &l0), ("l1", &l1), ("l2", &l2), ("l3", &l3)]
        .iter()
        .map(|(n, d)| export(d, &out, n))
        .collect()
}

#[test]
fn direct_write_into_stopped_dockerd_overlay2() -> Result<()> {
    direct_write(StorageDriver::Overlay2)
}

/// The system dockerd's driver: layers are written in AUFS whiteout format.
#[test]
fn direct_write_into_stopped_dockerd_fuse_overlayfs() -> Result<()> {
    direct_write(StorageDriver::FuseOverlayfs)
}

fn direct_write(driver: StorageDriver) -> Result<()> {
    assert!(rustix::process::geteuid().is_root(), "needs root");
    let work = tempfile::Builder::new()
        .prefix("berth-dw-layers-")
        .tempdir_in("/var/tmp")?;
    let layers = build_layers(work.path())?;
    let mut daemon = Daemon::new(driver)?;
    let store = DockerStore::new(daemon.data_root(), driver);

    // Refused while the daemon runs (pidfile + socket + process scan).
    let err = OfflineWriter::open(store.clone(), &daemon.check()).unwrap_err();
    ensure!(err.to_string().contains("running"), "{err}");
    let err = OfflineWriter::open(store.clone(), &DaemonCheck::default()).unwrap_err();
    ensure!(
        err.to_string().contains("data root"),
        "process scan must find it: {err}"
    );
    daemon.stop()?;

    let w = OfflineWriter::open(store.clone(), &daemon.check())?;
    let mut parent: Option<Digest> = None;
    for (i, l) in layers.iter().enumerate() {
        // Alternate the two sources: tars through the applier, dirs copied with the exporter's digests.
        let src = if i % 2 == 0 {
            LayerSource::Tar {
                reader: Box::new(fs::File::open(&l.tar)?),
                diff_id: None,
            }
        } else {
            LayerSource::Dir {
                path: &l.dir,
                diff_id: l.diff_id,
                tar_split_gz: &l.split,
            }
        };
        let written = w.write_layer(parent.as_ref(), src)?;
        ensure!(
            !written.existed && written.diff_id == l.diff_id,
            "layer {i}: {written:?}"
        );
        parent = Some(written.chain_id);
    }
    // Writing L0 again is skipped.
    let again = w.write_layer(
        None,
        LayerSource::Tar {
            reader: Box::new(fs::File::open(&layers[0].tar)?),
            diff_id: Some(layers[0].diff_id),
        },
    )?;
    ensure!(again.existed);
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.to_string()).collect();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created_by": "l0"}, {"created_by": "l1"}, {"created_by": "l2"}, {"created_by": "l3"},
            {"created_by": "ENV PATH=/bin", "empty_layer": true}
        ],
    });
    let config = serde_json::to_vec(&config)?;
    let image_id = w.write_image(&config)?;
    w.tag("direct:written", &image_id)?;
    // Layout details Docker relies on.
    let top = store
        .layer(parent.as_ref().unwrap())?
        .context("top layer")?;
    let tdir = store.driver_dir().join(&top.cache_id);
    let link = fs::read_to_string(tdir.join("link"))?;
    ensure!(
        link.len() == 26
            && fs::read_link(store.driver_dir().join("l").join(&link))?
                == Path::new(&format!("../{}/diff", top.cache_id))
    );
    ensure!(fs::read_to_string(tdir.join("lower"))?.split(':').count() == 3);
    ensure!(tdir.join("work").is_dir() && !tdir.join("berth-incomplete").exists());
    ensure!(store
        .driver_dir()
        .join(store.layer(&top.parent.unwrap())?.unwrap().cache_id)
        .join("committed")
        .exists());
    drop(w);

    daemon.start()?;
    let images = String::from_utf8(
        daemon
            .docker(&["images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}"])?
            .stdout,
    )?;
    ensure!(
        images.contains(&format!("direct:written {}", &image_id.hex()[..12])),
        "images: {images}"
    );
    let script = format!(
        "test ! -e /gone && echo no-gone; ls /olddir; cat /data/a; readlink /data/link; \
         test $(stat -c %i /data/hl1) = $(stat -c %i /data/hl2) && echo same-inode; cat /data/{UNICODE}; cat /last"
    );
    let out = daemon.docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "direct:written",
        "/bin/sh",
        "-c",
        &script,
    ])?;
    let out = String::from_utf8(out.stdout)?;
    ensure!(
        out == "no-gone\nnew\nalpha\na\nsame-inode\nunicode\nlast\n",
        "container saw:\n{out}"
    );

    // save reproduces every layer byte for byte; the xattr is in the saved tar.
    let save = work.path().join("save.tar");
    daemon.docker(&["save", "-o", save.to_str().unwrap(), "direct:written"])?;
    let mut ar = tar::Archive::new(fs::File::open(&save)?);
    let mut files = std::collections::BTreeMap::new();
    for e in ar.entries()? {
        let mut e = e?;
        let name = e.path()?.to_string_lossy().into_owned();
        let mut buf = vec![];
        e.read_to_end(&mut buf)?;
        files.insert(name, buf);
    }
    let manifest: serde_json::Value = serde_json::from_slice(&files["manifest.json"])?;
    let saved: Vec<&str> = manifest[0]["Layers"]
        .as_array()
        .context("Layers")?
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    ensure!(saved.len() == 4);
    for (i, (name, l)) in saved.iter().zip(&layers).enumerate() {
        ensure!(
            Digest::of(&files[*name]) == l.diff_id,
            "saved layer {i} differs from its diffID"
        );
        ensure!(
            files[*name] == fs::read(&l.tar)?,
            "saved layer {i} bytes differ"
        );
    }
    let mut l1 = tar::Archive::new(&files[saved[1]][..]);
    let mut found_xattr = false;
    for e in l1.entries()? {
        let mut e = e?;
        if e.path()?.ends_with("data/a") {
            if let Some(pax) = e.pax_extensions()? {
                for x in pax {
                    let x = x?;
                    found_xattr |=
                        x.key()? == "SCHILY.xattr.user.berth" && x.value_bytes() == b"yes";
                }
            }
        }
    }
    ensure!(found_xattr, "user.berth xattr missing from the saved layer");
    // On the host, the layer dir dockerd mounts has the xattr too.
    let l1_entry = store
        .layer(&layerstore::chain_id(
            Some(&layers[0].diff_id),
            &layers[1].diff_id,
        ))?
        .context("l1")?;
    let mut v = [0u8; 8];
    let n = rustix::fs::lgetxattr(l1_entry.diff_dir.join("data/a"), "user.berth", &mut v)?;
    ensure!(&v[..n] == b"yes");
    if driver == StorageDriver::FuseOverlayfs {
        let ids: Vec<Digest> = layers.iter().map(|l| l.diff_id).collect();
        let l2 = store
            .layer(&layerstore::tar::chain_ids(&ids)[2])?
            .context("l2")?;
        ensure!(
            l2.diff_dir.join(".wh.gone").is_file(),
            "AUFS whiteout expected"
        );
        ensure!(
            l2.diff_dir.join("olddir/.wh..wh..opq").is_file(),
            "AUFS opaque marker expected"
        );
    }
    ensure!(
        fs::metadata(l1_entry.diff_dir.join("data/hl1"))?.ino()
            == fs::metadata(l1_entry.diff_dir.join("data/hl2"))?.ino()
    );
    daemon.docker(&["rmi", "direct:written"])?;
    Ok(())
}
