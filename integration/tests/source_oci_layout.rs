//! `oci-layout://` sources through berthd's gRPC API: the image comes from an OCI layout the
//! client serves as content store `oci:NAME` over the session (the test client serves
//! `containerd.services.content.v1.Content` on a layout directory, as BuildKit's Go client does
//! for `SolveOpt.OCIStores`), as with buildkitd v0.11.6:
//!
//! - an image berthd exported with `type=oci`, referenced by its manifest digest, is the root
//!   of a step that runs and sees the image's files;
//! - the manifest of the op's platform is picked out of an index; a platform the index lacks is
//!   an error naming the platform;
//! - a digest the store lacks, a missing or corrupt layer blob, a reference without digest are
//!   clear errors naming the reference (and the blob), and nothing is cached for them.
//!
//! Needs root, runc, overlayfs and the system Docker Engine (busybox base).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use integration::buildkit_client::{Berthd, BuildOptions, BuildkitClient, Output};
use integration::{busybox_image, require_root, DockerEngine};
use llb::RunOpts;
use sha2::{Digest as _, Sha256};

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Unpacks an OCI layout tar into `dir`.
fn untar(tar_path: &Path, dir: &Path) {
    let mut ar = tar::Archive::new(std::fs::File::open(tar_path).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let p = dir.join(e.path().unwrap());
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let mut v = Vec::new();
        e.read_to_end(&mut v).unwrap();
        std::fs::write(p, v).unwrap();
    }
}

/// Writes `data` as a blob of the layout `dir`; returns its descriptor.
fn put_blob(dir: &Path, media_type: &str, data: &[u8]) -> serde_json::Value {
    let d = sha256(data);
    let p = dir
        .join("blobs/sha256")
        .join(d.trim_start_matches("sha256:"));
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
    serde_json::json!({"mediaType": media_type, "digest": d, "size": data.len()})
}

fn blob_path(dir: &Path, digest: &str) -> PathBuf {
    dir.join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// A one-layer image in layout `dir` whose layer holds `/platform` = `content`; returns the
/// manifest descriptor and the layer digest.
fn put_image(dir: &Path, os: &str, arch: &str, content: &str) -> (serde_json::Value, String) {
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(content.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mtime(1_600_000_000);
    h.set_cksum();
    tar.append_data(&mut h, "platform", content.as_bytes())
        .unwrap();
    let plain = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&plain).unwrap();
    let gz = gz.finish().unwrap();
    let layer = put_blob(dir, "application/vnd.oci.image.layer.v1.tar+gzip", &gz);
    let config = serde_json::json!({
        "architecture": arch, "os": os,
        "config": {"Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(&plain)]},
    });
    let config = put_blob(
        dir,
        "application/vnd.oci.image.config.v1+json",
        config.to_string().as_bytes(),
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": [layer],
    });
    let mut desc = put_blob(
        dir,
        "application/vnd.oci.image.manifest.v1+json",
        manifest.to_string().as_bytes(),
    );
    desc["platform"] = serde_json::json!({"os": os, "architecture": arch});
    (desc, layer["digest"].as_str().unwrap().to_string())
}

fn platform(s: &str) -> llb::Platform {
    let (os, arch) = s.split_once('/').unwrap();
    llb::Platform {
        os: os.into(),
        architecture: arch.into(),
        variant: String::new(),
    }
}

/// Builds `def` with the layout `dir` served as store `oci:my-store`, exporting to a new
/// directory; returns that directory or the solve error's message.
async fn build(
    client: &BuildkitClient,
    berthd: &Berthd,
    def: &protos::pb::Definition,
    dir: &Path,
) -> Result<tempfile::TempDir, String> {
    let out = tempfile::tempdir().unwrap();
    let report = client
        .build(BuildOptions {
            definition: Some(def.clone()),
            output: Output::Local(out.path().to_path_buf()),
            content_stores: [("oci:my-store".to_string(), dir.to_path_buf())].into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("build: {e:#}\n{}", berthd.log_text()));
    match report.solve {
        Ok(_) => Ok(out),
        Err(st) => Err(st.message().to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_image_by_digest_is_the_root_of_a_step_that_runs() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let client = berthd.client().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();

    // An image of three layers (busybox and two steps), exported as an OCI layout.
    let def = llb::State::from(llb::image(base.reference()))
        .run(RunOpts::shell("echo -n first > /foo"))
        .root()
        .run(RunOpts::shell("echo -n second > /bar"))
        .root()
        .marshal()
        .unwrap();
    let tar_path = tmp.path().join("oci.tar");
    let report = client
        .build(BuildOptions {
            definition: Some(def),
            output: Output::Oci(tar_path.clone(), BTreeMap::new()),
            ..Default::default()
        })
        .await
        .unwrap();
    report
        .solve
        .unwrap_or_else(|e| panic!("oci export: {e}\n{}", berthd.log_text()));
    let dir = tmp.path().join("layout");
    untar(&tar_path, &dir);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "{index}");
    let digest = manifests[0]["digest"].as_str().unwrap().to_string();

    // A step run on the image from the layout sees its files.
    let def = llb::State::from(llb::oci_layout(format!("not/real@{digest}")).store("", "my-store"))
        .run(RunOpts::shell(
            "cat /foo /bar > /out && test -x /bin/busybox",
        ))
        .root()
        .marshal()
        .unwrap();
    let out = build(&client, &berthd, &def, &dir)
        .await
        .unwrap_or_else(|e| panic!("oci-layout build: {e}\n{}", berthd.log_text()));
    assert_eq!(
        std::fs::read_to_string(out.path().join("out")).unwrap(),
        "firstsecond"
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("foo")).unwrap(),
        "first"
    );

    // The same layout again: cached (the key is the digest), nothing read from the client.
    let hidden = tmp.path().join("hidden");
    std::fs::rename(&dir, &hidden).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    let out = build(&client, &berthd, &def, &dir)
        .await
        .unwrap_or_else(|e| panic!("cached oci-layout build: {e}\n{}", berthd.log_text()));
    assert_eq!(
        std::fs::read_to_string(out.path().join("out")).unwrap(),
        "firstsecond"
    );

    // A layer limit of 1 keeps busybox only.
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::rename(&hidden, &dir).unwrap();
    let def = llb::State::from(
        llb::oci_layout(format!("not/real@{digest}"))
            .store("", "my-store")
            .layer_limit(1),
    )
    .marshal()
    .unwrap();
    let out = build(&client, &berthd, &def, &dir)
        .await
        .unwrap_or_else(|e| panic!("layer limit: {e}\n{}", berthd.log_text()));
    assert!(out.path().join("bin/busybox").exists());
    assert!(!out.path().join("foo").exists());
    let def = llb::State::from(
        llb::oci_layout(format!("not/real@{digest}"))
            .store("", "my-store")
            .layer_limit(4),
    )
    .marshal()
    .unwrap();
    let err = build(&client, &berthd, &def, &dir).await.unwrap_err();
    assert!(
        err.contains("layer limit 4 is greater than the number of layers in the image 3"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_platforms_manifest_is_picked_from_an_index() {
    require_root();
    let berthd = Berthd::start(&[]).unwrap();
    let client = berthd.client().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Unique contents: berthd has none of these layers yet.
    let tag = integration::unique_name("oci");
    let (amd, _) = put_image(dir, "linux", "amd64", &format!("amd64 {tag}"));
    let (arm, _) = put_image(dir, "linux", "arm64", &format!("arm64 {tag}"));
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [amd, arm],
    });
    let index = put_blob(
        dir,
        "application/vnd.oci.image.index.v1+json",
        index.to_string().as_bytes(),
    );
    let digest = index["digest"].as_str().unwrap();
    for p in ["linux/arm64", "linux/amd64"] {
        let def = llb::State::from(
            llb::oci_layout(format!("example/multi@{digest}"))
                .store("", "my-store")
                .platform(platform(p)),
        )
        .marshal()
        .unwrap();
        let out = build(&client, &berthd, &def, dir)
            .await
            .unwrap_or_else(|e| panic!("{p}: {e}\n{}", berthd.log_text()));
        let want = format!("{} {tag}", p.trim_start_matches("linux/"));
        assert_eq!(
            std::fs::read_to_string(out.path().join("platform")).unwrap(),
            want
        );
    }
    let def = llb::State::from(
        llb::oci_layout(format!("example/multi@{digest}"))
            .store("", "my-store")
            .platform(platform("linux/s390x")),
    )
    .marshal()
    .unwrap();
    let err = build(&client, &berthd, &def, dir).await.unwrap_err();
    assert!(
        err.contains("no match for platform linux/s390x") && err.contains(digest),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_references_and_blobs_are_clear_errors() {
    require_root();
    let berthd = Berthd::start(&[]).unwrap();
    let client = berthd.client().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let tag = integration::unique_name("oci");
    let (m, layer) = put_image(dir, "linux", "amd64", &format!("missing {tag}"));
    let manifest = m["digest"].as_str().unwrap().to_string();
    let src = |r: String| {
        llb::State::from(
            llb::oci_layout(r)
                .store("", "my-store")
                .platform(platform("linux/amd64")),
        )
        .marshal()
        .unwrap()
    };

    // A digest the store does not have.
    let absent = sha256(tag.as_bytes());
    let err = build(&client, &berthd, &src(format!("not/real@{absent}")), dir)
        .await
        .unwrap_err();
    assert!(
        err.contains(&format!("not/real@{absent}")) && err.contains("not found"),
        "{err}"
    );

    // No digest.
    let err = build(&client, &berthd, &src("not/real:latest".into()), dir)
        .await
        .unwrap_err();
    assert!(
        err.contains("reference \"not/real:latest\" must have digest"),
        "{err}"
    );

    // A layer blob the store lacks.
    let saved = std::fs::read(blob_path(dir, &layer)).unwrap();
    std::fs::remove_file(blob_path(dir, &layer)).unwrap();
    let def = src(format!("not/real@{manifest}"));
    let err = build(&client, &berthd, &def, dir).await.unwrap_err();
    assert!(
        err.contains(&layer) && err.contains(&format!("not/real@{manifest}")),
        "{err}"
    );

    // A corrupt layer blob (other bytes under its digest).
    let mut bad = saved.clone();
    bad.truncate(saved.len() / 2);
    std::fs::write(blob_path(dir, &layer), &bad).unwrap();
    let err = build(&client, &berthd, &def, dir).await.unwrap_err();
    assert!(err.contains(&layer), "{err}");

    // Nothing was cached for the failures: the same definition with the blob back builds.
    std::fs::write(blob_path(dir, &layer), &saved).unwrap();
    let out = build(&client, &berthd, &def, dir)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", berthd.log_text()));
    assert_eq!(
        std::fs::read_to_string(out.path().join("platform")).unwrap(),
        format!("missing {tag}")
    );
}

/// The config JSON and layer count of the image in an OCI layout tar with one manifest.
fn oci_tar_image(path: &Path) -> (serde_json::Value, usize) {
    let mut files = BTreeMap::new();
    let mut ar = tar::Archive::new(std::fs::File::open(path).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let p = e.path().unwrap().to_string_lossy().into_owned();
        let mut v = Vec::new();
        e.read_to_end(&mut v).unwrap();
        files.insert(p, v);
    }
    let json = |p: &str| -> serde_json::Value { serde_json::from_slice(&files[p]).unwrap() };
    let blob = |d: &serde_json::Value| {
        format!(
            "blobs/sha256/{}",
            d.as_str().unwrap().trim_start_matches("sha256:")
        )
    };
    let index = json("index.json");
    let manifest = json(&blob(&index["manifests"][0]["digest"]));
    let config = json(&blob(&manifest["config"]["digest"]));
    (config, manifest["layers"].as_array().unwrap().len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerfile_named_contexts_take_oci_layout_images() {
    require_root();
    let berthd = Berthd::start(&[]).unwrap();
    let client = berthd.client().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let tag = integration::unique_name("oci");
    // An index whose amd64 image has config env FOO=bar.
    let (amd, _) = put_image(&layout, "linux", "amd64", &format!("amd64 {tag}"));
    let (arm, _) = put_image(&layout, "linux", "arm64", &format!("arm64 {tag}"));
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [arm, amd],
    });
    let index = put_blob(
        &layout,
        "application/vnd.oci.image.index.v1+json",
        index.to_string().as_bytes(),
    );
    let digest = index["digest"].as_str().unwrap().to_string();
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM base\nENV second=2\n").unwrap();
    let build_with = |spec: String| {
        let client = &client;
        let ctx = ctx.clone();
        let layout = layout.clone();
        let out = tmp
            .path()
            .join(format!("{}.tar", integration::unique_name("out")));
        async move {
            let report = client
                .build(BuildOptions {
                    frontend: Some("dockerfile.v0".into()),
                    frontend_attrs: [
                        ("context:base".to_string(), spec),
                        ("platform".to_string(), "linux/amd64".to_string()),
                    ]
                    .into(),
                    locals: [
                        ("context".to_string(), ctx.clone()),
                        ("dockerfile".to_string(), ctx),
                    ]
                    .into(),
                    content_stores: [("oci:ocione".to_string(), layout)].into(),
                    output: Output::Oci(out.clone(), BTreeMap::new()),
                    ..Default::default()
                })
                .await
                .unwrap();
            report
                .solve
                .map(|_| out)
                .map_err(|e| e.message().to_string())
        }
    };
    let out = build_with(format!("oci-layout:ocione@{digest}"))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", berthd.log_text()));
    let (config, layers) = oci_tar_image(&out);
    assert_eq!(layers, 1, "{config}");
    let env: Vec<&str> = config["config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        env.contains(&"PATH=/bin") && env.contains(&"second=2"),
        "{config}"
    );
    assert_eq!(config["architecture"], "amd64");

    // Malformed and unknown references.
    let err = build_with("oci-layout://ocione".into()).await.unwrap_err();
    assert!(err.contains("has no digest"), "{err}");
    let absent = sha256(tag.as_bytes());
    let err = build_with(format!("oci-layout://ocione@{absent}"))
        .await
        .unwrap_err();
    assert!(err.contains(&absent) && err.contains("not found"), "{err}");
}
