//! `docker-image://` sources that the bound Docker Engine lacks are pulled by berth's own registry
//! client from a real registry (Debian's docker-registry on 127.0.0.1, plain HTTP by default as
//! a localhost registry) and registered in the system dockerd once: the image then runs with
//! `docker run`, two concurrent builds download each blob once, and progress shows per-layer
//! bytes. Bad registries and bad blobs (unreachable, corrupted, truncated, undecompressable,
//! manifest not matching its digest) fail the build with an error naming the reference and the
//! step, and leave no image and no layer in Docker.
//!
//! Test images are pushed with the `registry` crate itself (so its push path is exercised too).
//! Needs root, runc, overlayfs, the system dockerd and Debian's docker-registry.

mod export_support;

use std::path::Path;
use std::sync::Arc;

use export_support::*;
use integration::buildkit_client::{Berthd, BuildOptions, BuildkitClient};
use integration::{require_root, unique_name, Registry};

/// An image pushed to a registry.
struct Pushed {
    reference: String,
    config_digest: String,
    manifest_digest: String,
    layer_digests: Vec<String>,
    diff_ids: Vec<String>,
}

/// Pushes an image of `layers` (uncompressed tar, blob as stored) to `addr/repo:tag`.
async fn push_image(addr: &str, repo: &str, tag: &str, layers: &[(Vec<u8>, Vec<u8>)]) -> Pushed {
    let reference = format!("{addr}/{repo}:{tag}");
    let r = registry::Reference::parse(&reference).unwrap();
    let client = registry::Registry::new(registry::Hosts::new(Default::default()));
    let session = client.session(Arc::new(registry::Anonymous));
    let dir = tempfile::tempdir().unwrap();
    let diff_ids: Vec<String> = layers.iter().map(|(t, _)| sha(t)).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/busybox", "sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let mut descs = Vec::new();
    let mut layer_digests = Vec::new();
    for (i, (_, blob)) in layers.iter().enumerate() {
        let d = sha(blob);
        let p = dir.path().join(format!("l{i}"));
        std::fs::write(&p, blob).unwrap();
        session
            .push_blob(&r, &d, blob.len() as u64, &p, None, None)
            .await
            .unwrap();
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "digest": d,
            "size": blob.len(),
        }));
        layer_digests.push(d);
    }
    let config_digest = sha(&config);
    let p = dir.path().join("config");
    std::fs::write(&p, &config).unwrap();
    session
        .push_blob(&r, &config_digest, config.len() as u64, &p, None, None)
        .await
        .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": registry::MEDIA_TYPE_DOCKER_MANIFEST,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": descs,
    }))
    .unwrap();
    let manifest_digest = session
        .push_manifest(
            &r,
            tag,
            registry::MEDIA_TYPE_DOCKER_MANIFEST,
            manifest.into(),
        )
        .await
        .unwrap();
    Pushed {
        reference,
        config_digest,
        manifest_digest,
        layer_digests,
        diff_ids,
    }
}

/// A two-layer busybox image with a unique `/hello`. The base layer is unique too (it carries
/// `/etc/berth-test-image`): were it the same bytes for every image, Docker would already hold it
/// whenever another test (this file's others run concurrently) pulled first, berth would rightly
/// skip its download, and "each blob fetched once" would depend on test order.
async fn push_busybox_image(addr: &str, repo: &str, hello: &str) -> Pushed {
    let bb = busybox();
    let base = layer_tar(&[
        ("bin/busybox", &bb, 0o755),
        ("etc/berth-test-image", hello.as_bytes(), 0o644),
    ]);
    let top = layer_tar(&[("hello", hello.as_bytes(), 0o644)]);
    let layers = [(base.clone(), gzip(&base)), (top.clone(), gzip(&top))];
    push_image(addr, repo, "v1", &layers).await
}

fn docker_has_image(id: &str) -> bool {
    std::process::Command::new("docker")
        .args(["image", "inspect", id])
        .output()
        .unwrap()
        .status
        .success()
}

fn docker_layerdb() -> std::path::PathBuf {
    let root = docker(None, &["info", "--format", "{{.DockerRootDir}}"]);
    let driver = docker(None, &["info", "--format", "{{.Driver}}"]);
    Path::new(root.trim())
        .join("image")
        .join(driver.trim())
        .join("layerdb/sha256")
}

fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(p) => sha(format!("{p} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

fn pull_def(reference: &str, data: &str) -> protos::pb::Definition {
    llb::State::from(llb::image(reference))
        .file(llb::mkfile("/data", 0o644, data, Default::default()))
        .marshal()
        .unwrap()
}

async fn solve(
    client: &BuildkitClient,
    def: &protos::pb::Definition,
) -> integration::buildkit_client::BuildReport {
    client
        .build(BuildOptions {
            definition: Some(def.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
}

/// The path of blob `digest` in the registry's filesystem storage.
fn blob_file(reg: &Registry, digest: &str) -> std::path::PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap();
    reg.storage_dir()
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

fn blob_gets(reg: &Registry, digest: &str) -> usize {
    reg.log_tail()
        .lines()
        .filter(|l| {
            l.contains("GET") && l.contains(&format!("blobs/{digest}")) && l.contains("\" 200 ")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_lands_in_docker_once_and_runs() {
    require_root();
    let reg = Registry::start().unwrap();
    let repo = unique_name("berth-test/pull");
    let hello = unique_name("hello");
    let img = push_busybox_image(reg.addr(), &repo, &hello).await;
    assert!(!docker_has_image(&img.config_digest));
    let berthd = Berthd::start(&[]).unwrap();
    let client = berthd.client().await.unwrap();
    let _cleanup = RemoveImages(None, vec![img.reference.clone(), img.config_digest.clone()]);

    // Two builds at once on the same image: one download.
    let (da, db) = (pull_def(&img.reference, "a"), pull_def(&img.reference, "b"));
    let (a, b) = tokio::join!(solve(&client, &da), solve(&client, &db));
    for r in [&a, &b] {
        if let Err(e) = &r.solve {
            panic!(
                "build failed: {e}\nberthd log:\n{}\nregistry log:\n{}",
                berthd.log_text(),
                reg.log_tail()
            );
        }
    }
    for d in &img.layer_digests {
        assert_eq!(
            blob_gets(&reg, d),
            1,
            "blob {d} fetched once\n{}",
            reg.log_tail()
        );
    }
    // Registered under its config digest and tagged as the reference.
    assert!(docker_has_image(&img.config_digest));
    assert_eq!(
        tag_target(None, &img.reference).as_deref(),
        Some(img.config_digest.as_str())
    );
    let out = docker(
        None,
        &[
            "run",
            "--rm",
            "--network",
            "none",
            &img.reference,
            "/bin/busybox",
            "cat",
            "/hello",
        ],
    );
    assert_eq!(out, hello);
    // Progress: one status per layer, ending at its size.
    let statuses = [a.vertex_statuses(), b.vertex_statuses()].concat();
    for d in &img.layer_digests {
        let last = statuses.iter().rfind(|s| &s.id == d);
        let last = last.unwrap_or_else(|| panic!("no progress for layer {d}: {statuses:?}"));
        assert!(last.total > 0 && last.current == last.total, "{last:?}");
        assert!(last.completed.is_some(), "{last:?}");
    }

    // A third build finds the image in Docker and downloads nothing more.
    let c = solve(&client, &pull_def(&img.reference, "c")).await;
    c.solve.unwrap();
    for d in &img.layer_digests {
        assert_eq!(blob_gets(&reg, d), 1, "blob {d} fetched once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_registries_and_blobs_fail_clearly_and_leave_nothing_in_docker() {
    require_root();
    let reg = Registry::start().unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let client = berthd.client().await.unwrap();
    let layerdb = docker_layerdb();

    // Each case: an image whose top layer is spoiled in the registry's storage after the push.
    type Spoil = fn(&Registry, &Pushed);
    let cases: [(&str, Spoil, &str); 4] = [
        (
            "corrupt",
            |reg, img| {
                let p = blob_file(reg, &img.layer_digests[1]);
                let mut b = std::fs::read(&p).unwrap();
                let n = b.len();
                b[n / 2] ^= 0xff;
                std::fs::write(&p, b).unwrap();
            },
            "digest mismatch",
        ),
        (
            "truncated",
            |reg, img| {
                let p = blob_file(reg, &img.layer_digests[1]);
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
            },
            "truncated",
        ),
        (
            "manifest",
            |reg, img| {
                let p = blob_file(reg, &img.manifest_digest);
                let mut b = std::fs::read(&p).unwrap();
                b.push(b' ');
                std::fs::write(&p, b).unwrap();
            },
            "digest mismatch",
        ),
        ("undecompressable", |_, _| {}, "does not decompress"),
    ];
    for (name, spoil, want) in cases {
        let repo = unique_name(&format!("berth-test/bad-{name}"));
        let img = if name == "undecompressable" {
            let bb = busybox();
            let base = layer_tar(&[("bin/busybox", &bb, 0o755)]);
            let top = layer_tar(&[("hello", unique_name("x").as_bytes(), 0o644)]);
            // Labelled gzip, but the tar itself.
            push_image(
                reg.addr(),
                &repo,
                "v1",
                &[(base.clone(), gzip(&base)), (top.clone(), top.clone())],
            )
            .await
        } else {
            push_busybox_image(reg.addr(), &repo, &unique_name("hello")).await
        };
        spoil(&reg, &img);
        let _cleanup = RemoveImages(None, vec![img.reference.clone()]);
        let r = solve(&client, &pull_def(&img.reference, name)).await;
        let e = r.solve.expect_err(name);
        let msg = e.message();
        assert!(msg.contains(want), "{name}: {msg}");
        assert!(
            msg.contains(&repo),
            "{name}: the error names the reference: {msg}"
        );
        assert!(
            !docker_has_image(&img.config_digest),
            "{name}: no image in Docker"
        );
        let chains = chain_ids(&img.diff_ids);
        let top = chains[1].strip_prefix("sha256:").unwrap();
        assert!(
            !layerdb.join(top).exists(),
            "{name}: no layer {top} in Docker"
        );
        assert!(tag_target(None, &img.reference).is_none(), "{name}: no tag");
    }

    // Nothing listens on the port: unreachable, after bounded retries.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let reference = format!("127.0.0.1:{port}/berth-test/nothing:v1");
    let started = std::time::Instant::now();
    let r = solve(&client, &pull_def(&reference, "x")).await;
    let msg = r.solve.expect_err("unreachable").message().to_string();
    assert!(
        msg.contains("unreachable") && msg.contains(&reference),
        "{msg}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "bounded: {:?}",
        started.elapsed()
    );
}

/// A multi-platform image (an index of a runnable linux/amd64 image and a linux/arm64 one made
/// of files only) on the classic store: a build for the host pulls the amd64 image and tags it;
/// a Dockerfile `FROM --platform=linux/arm64` + `COPY` of the same tag then pulls the arm64 image (the classic
/// store keeps one image per tag: the tag moves to it, as `docker pull --platform` moves it,
/// instead of the build using the amd64 image), and exports an arm64 image whose first layer
/// is the arm64 one. Each blob is fetched once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_platform_builds_pick_the_platform_on_the_classic_store() {
    require_root();
    let reg = Registry::start().unwrap();
    let repo = unique_name("berth-test/multi");
    let seed = unique_name("seed");
    let amd = vec![
        layer_tar(&[
            ("bin/busybox", &busybox(), 0o755),
            ("etc/berth-test-image", seed.as_bytes(), 0o644),
        ]),
        layer_tar(&[("platform", b"amd64\n", 0o644)]),
    ];
    let arm = vec![layer_tar(&[
        ("platform", b"arm64\n", 0o644),
        ("arm64-only", seed.as_bytes(), 0o644),
    ])];
    let idx = push_index(
        reg.addr(),
        &repo,
        "multi",
        &[("amd64", amd), ("arm64", arm)],
    )
    .await;
    let (amd, arm) = (&idx.platforms[0], &idx.platforms[1]);
    let berthd = Berthd::start(&[]).unwrap();
    let client = berthd.client().await.unwrap();
    let (out_amd, out_arm) = (
        unique_name("berth-test/multi-amd"),
        unique_name("berth-test/multi-arm"),
    );
    let _cleanup = RemoveImages(
        None,
        vec![
            out_amd.clone(),
            out_arm.clone(),
            idx.reference.clone(),
            amd.config_digest.clone(),
            arm.config_digest.clone(),
        ],
    );
    let inspect = |name: &str| {
        docker(
            None,
            &[
                "image",
                "inspect",
                "--format",
                "{{.Os}}/{{.Architecture}} {{json .RootFS.Layers}}",
                name,
            ],
        )
    };

    // The host's platform.
    let r = export_image(
        &client,
        &pull_def(&idx.reference, "amd"),
        std::slice::from_ref(&out_amd),
        &[],
    )
    .await
    .unwrap();
    if let Err(e) = &r.solve {
        panic!("build failed: {e}\nberthd log:\n{}", berthd.log_text());
    }
    assert_eq!(
        tag_target(None, &idx.reference).as_deref(),
        Some(amd.config_digest.as_str())
    );
    let out = docker(
        None,
        &[
            "run",
            "--rm",
            "--network",
            "none",
            &out_amd,
            "/bin/busybox",
            "cat",
            "/platform",
        ],
    );
    assert_eq!(out, "amd64\n");
    let info = inspect(&out_amd);
    assert!(info.starts_with("linux/amd64 "), "{info}");

    // linux/arm64 of the same tag, through the Dockerfile frontend (its image config, and so
    // the result's platform, comes from the base): the arm64 manifest and its layer.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!(
            "FROM --platform=linux/arm64 {}\nCOPY data /data\n",
            idx.reference
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("data"), b"arm").unwrap();
    let attrs = std::collections::BTreeMap::from([("name".to_string(), out_arm.clone())]);
    let r = integration::buildkit_client::dockerfile_build(
        &berthd,
        dir.path(),
        &[],
        integration::buildkit_client::Output::Raw("image".into(), attrs),
    )
    .await;
    if let Err(e) = &r.solve {
        panic!("build failed: {e}\nberthd log:\n{}", berthd.log_text());
    }
    let info = inspect(&out_arm);
    assert!(info.starts_with("linux/arm64 "), "{info}");
    let layers: Vec<String> = serde_json::from_str(info.split_once(' ').unwrap().1.trim()).unwrap();
    assert_eq!(layers.len(), 2, "{info}");
    assert_eq!(layers[0], arm.diff_ids[0], "{info}");
    assert_eq!(
        tag_target(None, &idx.reference).as_deref(),
        Some(arm.config_digest.as_str())
    );
    for d in amd.layer_digests.iter().chain(&arm.layer_digests) {
        assert_eq!(
            blob_gets(&reg, d),
            1,
            "blob {d} fetched once\n{}",
            reg.log_tail()
        );
    }
}
