//! Export into a containerd image store, against a real private containerd (the machine's
//! containerd binary with its own root, state and socket): the image record, content and
//! committed snapshots are what `ctr run` needs, a whiteout hides a lower file, and a second image
//! sharing the base layer writes only its new snapshot.
//! Needs root, `containerd`, `ctr`, `containerd-shim-runc-v2` and runc.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use exporter::image::{build_config, ConfigInput, LayerInfo, Platform};
use exporter::{ContainerdLayer, ContainerdStore, LayerFiles};
use integration::PrivateContainerd;

/// Copies a prepared test tree with `cp -a` (keeps devices, xattrs, hardlinks).
struct DirFiles(PathBuf);
impl LayerFiles for DirFiles {
    fn write_into(&self, dest: &Path) -> std::io::Result<()> {
        let st = Command::new("cp")
            .arg("-a")
            .arg(self.0.join("."))
            .arg(dest)
            .status()?;
        if st.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("cp -a failed: {st}")))
        }
    }
}

/// A digest and size for the test layer: the sha256 of a GNU tar of the tree. (The exporter only
/// needs diffIDs that identify the layers consistently; berth's own layer writer is tested in
/// `layerstore`.)
fn diff_id_of(dir: &Path) -> (String, u64) {
    use sha2::Digest;
    let tar = Command::new("tar")
        .args(["--sort=name", "-C"])
        .arg(dir)
        .args(["-cf", "-", "."])
        .output()
        .unwrap();
    assert!(tar.status.success());
    (
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&tar.stdout))),
        tar.stdout.len() as u64,
    )
}

fn layer(dir: &Path) -> ContainerdLayer {
    let (diff_id, size) = diff_id_of(dir);
    ContainerdLayer {
        diff_id,
        size,
        files: Some(Arc::new(DirFiles(dir.to_path_buf()))),
        // ctr run needs the snapshots only; the tar blob is the daemon tests' concern.
        tar: None,
        blob: None,
    }
}

fn config(layers: &[ContainerdLayer]) -> exporter::image::ImageConfig {
    let infos: Vec<LayerInfo> = layers
        .iter()
        .map(|l| LayerInfo {
            diff_id: l.diff_id.clone(),
            description: "t".into(),
            created: None,
        })
        .collect();
    build_config(&ConfigInput {
        base: None,
        layers: &infos,
        epoch: None,
        platform: &Platform::native(),
        now: chrono::Utc::now(),
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_into_containerd_runs_and_shares_base_snapshot() {
    let ctrd = PrivateContainerd::start();
    let work = tempfile::Builder::new()
        .prefix("berth-ctrd-layers-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let base = work.path().join("base");
    std::fs::create_dir_all(base.join("bin")).unwrap();
    std::fs::create_dir_all(base.join("etc")).unwrap();
    std::fs::copy("/bin/busybox", base.join("bin/busybox"))
        .expect("busybox-static must be installed");
    std::os::unix::fs::symlink("busybox", base.join("bin/sh")).unwrap();
    std::os::unix::fs::symlink("busybox", base.join("bin/cat")).unwrap();
    std::fs::write(base.join("etc/gone"), "lower file").unwrap();
    let top = work.path().join("top");
    std::fs::create_dir_all(top.join("etc")).unwrap();
    std::fs::write(top.join("etc/marker"), "from berth\n").unwrap();
    // Overlay whiteout for etc/gone.
    let st = Command::new("mknod")
        .arg(top.join("etc/gone"))
        .args(["c", "0", "0"])
        .status()
        .unwrap();
    assert!(st.success());

    let store = ContainerdStore::connect(&ctrd.socket(), "moby", "overlayfs")
        .await
        .unwrap();
    let layers = vec![layer(&base), layer(&top)];
    let cfg = config(&layers);
    let report = store
        .export(&cfg, &layers, "docker.io/berth-test/ctrd:one")
        .await
        .unwrap();
    assert_eq!(report.snapshots_written.len(), 2, "{report:?}");
    assert!(report.snapshots_skipped.is_empty());

    let (ok, out) = ctrd.ctr(&["images", "ls", "-q"]);
    assert!(ok && out.contains("docker.io/berth-test/ctrd:one"), "{out}");
    let (ok, out) = ctrd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "overlayfs",
        "docker.io/berth-test/ctrd:one",
        "berth-c1",
        "/bin/sh",
        "-c",
        "cat /etc/marker; test -e /etc/gone && echo still-there || echo gone",
    ]);
    assert!(ok, "ctr run failed: {out}\n{}", ctrd.log());
    assert_eq!(out, "from berth\ngone\n");

    // A second image on the same base: only the new layer's snapshot is written.
    let top2 = work.path().join("top2");
    std::fs::create_dir_all(&top2).unwrap();
    std::fs::write(top2.join("two"), "2").unwrap();
    let layers2 = vec![
        ContainerdLayer {
            files: None,
            ..layers[0].clone()
        },
        layer(&top2),
    ];
    let cfg2 = config(&layers2);
    let report2 = store
        .export(&cfg2, &layers2, "docker.io/berth-test/ctrd:two")
        .await
        .unwrap();
    assert_eq!(report2.snapshots_skipped, vec![layers[0].diff_id.clone()]);
    assert_eq!(report2.snapshots_written.len(), 1);
    let (ok, out) = ctrd.ctr(&[
        "run",
        "--rm",
        "docker.io/berth-test/ctrd:two",
        "berth-c2",
        "/bin/cat",
        "/two",
    ]);
    assert!(ok, "{out}");
    assert_eq!(out, "2");

    // Exporting the same image again writes nothing new and keeps the record.
    let again = store
        .export(&cfg2, &layers2, "docker.io/berth-test/ctrd:two")
        .await
        .unwrap();
    assert!(again.snapshots_written.is_empty());
    assert_eq!(again.manifest_digest, report2.manifest_digest);
}
