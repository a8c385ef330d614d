//! Mount stubs of a Dockerfile `RUN` (issue #11): on a base without `/etc`, the executor
//! creates `/etc` for the `/etc/hosts` and `/etc/resolv.conf` mount points. The Dockerfile
//! frontend marshals every ExecOp with `removeMountStubsRecursive` (as upstream's LLB client
//! does), so the executor removes the created `etc/` again and the RUN layer holds exactly what
//! stock buildkitd v0.11.6 writes for the same Dockerfile: `dev/`, `proc/`, `sys/` (created by
//! runc) and the file the command wrote — measured against stock, see the stubs helper note.
//! Needs root, runc, overlayfs and the system Docker Engine.

use std::collections::BTreeMap;

use integration::buildkit_client::{dockerfile_build, Berthd, Output};
use integration::tar_files;
use integration::{busybox_image, require_root, DockerEngine};

fn blob<'a>(files: &'a BTreeMap<String, Vec<u8>>, digest: &serde_json::Value) -> &'a [u8] {
    let d = digest.as_str().unwrap().strip_prefix("sha256:").unwrap();
    files
        .get(&format!("blobs/sha256/{d}"))
        .unwrap_or_else(|| panic!("blob {d} missing from the layout"))
}

/// (type, path, mode) of each entry of an uncompressed layer tar, in tar order.
fn layer_entries(layer: &[u8]) -> Vec<(String, String, u32)> {
    let mut ar = tar::Archive::new(layer);
    ar.entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let h = e.header();
            let kind = match h.entry_type() {
                tar::EntryType::Directory => "dir",
                tar::EntryType::Regular => "file",
                tar::EntryType::Symlink => "symlink",
                other => panic!("unexpected entry type {other:?}"),
            };
            (
                kind.to_string(),
                e.path().unwrap().to_string_lossy().into_owned(),
                h.mode().unwrap() & 0o7777,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_on_a_base_without_etc_keeps_no_mount_stubs() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let tools = busybox_image(&engine).await.unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    // The final stage's base has only /bin/busybox: no /etc, /dev, /proc or /sys.
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {} AS tools\n\
             FROM scratch\n\
             COPY --from=tools /bin/busybox /bin/busybox\n\
             RUN [\"/bin/busybox\", \"sh\", \"-c\", \"/bin/busybox echo hi > /x\"]\n",
            tools.reference()
        ),
    )
    .unwrap();
    let out = tmp.path().join("oci.tar");
    let attrs = BTreeMap::from([("compression".to_string(), "uncompressed".to_string())]);
    let report = dockerfile_build(&berthd, &ctx, &[], Output::Oci(out.clone(), attrs)).await;
    if let Err(e) = &report.solve {
        panic!("solve failed: {e:?}\n{}", berthd.log_text());
    }

    let files = tar_files(&out);
    let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(blob(&files, &index["manifests"][0]["digest"])).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "COPY and RUN layers: {manifest}");
    let run_layer = layer_entries(blob(&files, &layers[1]["digest"]));
    // Stock buildkitd v0.11.6 writes exactly these entries for this Dockerfile.
    let want: Vec<(String, String, u32)> = [
        ("dir", "dev/", 0o755),
        ("dir", "proc/", 0o755),
        ("dir", "sys/", 0o755),
        ("file", "x", 0o644),
    ]
    .iter()
    .map(|(k, p, m)| (k.to_string(), p.to_string(), *m))
    .collect();
    assert_eq!(run_layer, want, "RUN layer entries");
    assert!(
        !run_layer.iter().any(|(_, p, _)| p.starts_with("etc")),
        "the etc/ stub was kept"
    );
}
