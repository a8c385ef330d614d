//! `--output type=image,name=…` through berthd's gRPC API (buildctl's protocol path): a build on a
//! Docker base image used in place lands in the machine's real dockerd, runs at once with the
//! built files and config, keeps the base layers as they are in Docker (only the new layer is
//! sent), and a rebuild is fully cached. Needs root, runc, overlayfs and the system Docker Engine.

use std::collections::BTreeMap;

use integration::buildkit_client::{Berthd, BuildOptions, Output};
use integration::{busybox_image, require_root, unique_name, DockerEngine};
use llb::RunOpts;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_export_runs_in_docker_and_sends_only_new_layers() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let base_layers = engine.image_layers(base.reference()).await.unwrap();

    let berthd = Berthd::start(&[]).unwrap();
    let client = berthd.client().await.unwrap();
    let state = llb::State::from(llb::image(base.reference()))
        .run(RunOpts::shell("echo built-by-berth > /made"))
        .root()
        .file(llb::mkfile(
            "/etc/extra",
            0o600,
            "extra",
            Default::default(),
        ));
    let def = state.marshal().unwrap();
    let name = format!("{}:1", unique_name("berth-test/image-export"));
    let mut attrs = BTreeMap::new();
    attrs.insert("name".to_string(), name.clone());
    let opts = BuildOptions {
        definition: Some(def),
        output: Output::Raw("image".into(), attrs),
        ..Default::default()
    };
    let report = client.build(opts.clone()).await.unwrap();
    let resp = report
        .solve
        .as_ref()
        .unwrap_or_else(|e| panic!("solve failed: {e}\n{}", berthd.log_text()));
    let keys = &resp.exporter_response;
    assert_eq!(keys.get("image.name"), Some(&name));
    let config_digest = keys
        .get("containerimage.config.digest")
        .expect("config digest key")
        .clone();
    assert!(keys
        .get("containerimage.digest")
        .is_some_and(|d| d.starts_with("sha256:")));
    assert!(keys.contains_key("containerimage.descriptor"));
    let _cleanup = integration::TestImage::adopt(&engine, &name).await.unwrap();
    let _remove_image = RemoveImage(config_digest.clone());

    // Runnable at once, with the files the build made.
    let out = engine
        .run(&name, &["cat", "/made", "/etc/extra"])
        .await
        .unwrap();
    out.assert_success();
    assert_eq!(out.stdout, "built-by-berth\nextra");
    let inspect = engine.inspect_image(&name).await.unwrap();
    assert_eq!(inspect.id.as_deref(), Some(config_digest.as_str()));

    // The base layers are Docker's own (same diffIDs, first in the chain); the build added layers
    // on top, and progress says what Docker already had.
    let layers = engine.image_layers(&name).await.unwrap();
    assert!(layers.len() > base_layers.len(), "{layers:?}");
    assert_eq!(&layers[..base_layers.len()], &base_layers[..]);
    let statuses: Vec<String> = report.vertex_statuses().into_iter().map(|s| s.id).collect();
    assert!(
        statuses.iter().any(|s| s.contains("already in Docker")),
        "no skipped-layer status in {statuses:?}"
    );
    assert!(
        statuses.iter().any(|s| s == &format!("naming to {name}")),
        "{statuses:?}"
    );
    let names: Vec<String> = report.vertices().values().map(|v| v.name.clone()).collect();
    assert!(names.iter().any(|n| n == "exporting to image"), "{names:?}");

    // Rebuild: every build vertex is cached, and the image is the same.
    let again = client.build(opts).await.unwrap();
    let resp2 = again.solve.as_ref().unwrap();
    for v in again.vertices().values() {
        if v.name != "exporting to image" {
            assert!(v.cached, "vertex {:?} was not cached on rebuild", v.name);
        }
    }
    let second = resp2
        .exporter_response
        .get("containerimage.config.digest")
        .cloned()
        .unwrap_or_default();
    if second != config_digest {
        let show = |d: &str| {
            let o = std::process::Command::new("docker")
                .args([
                    "history",
                    "--no-trunc",
                    "--format",
                    "{{.CreatedAt}} {{.CreatedBy}} {{.Comment}}",
                    d,
                ])
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        panic!(
            "rebuild gave another image:\n{}\n{}",
            show(&config_digest),
            show(&second)
        );
    }
}

/// Removes an image by ID when the test ends (also on panic): the tag guard alone would leave the
/// built image dangling.
struct RemoveImage(String);
impl Drop for RemoveImage {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rmi", "-f", &self.0])
            .output();
    }
}

/// `--output type=docker,name=…,dest=FILE`: the client receives a complete docker-archive (the
/// Docker base layer reassembled byte-exactly from Docker's tar-split), which `docker load`
/// accepts into a daemon that has none of its layers, and the image runs there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_output_loads_into_a_daemon_without_the_base() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let client = berthd.client().await.unwrap();
    let def = llb::State::from(llb::image(base.reference()))
        .run(RunOpts::shell("echo archived > /made"))
        .root()
        .marshal()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("image.tar");
    let name = format!("{}:1", unique_name("berth-test/docker-output"));
    let mut attrs = BTreeMap::new();
    attrs.insert("name".to_string(), name.clone());
    let report = client
        .build(BuildOptions {
            definition: Some(def),
            output: Output::Docker(archive.clone(), attrs),
            ..Default::default()
        })
        .await
        .unwrap();
    let resp = report
        .solve
        .as_ref()
        .unwrap_or_else(|e| panic!("solve failed: {e}\n{}", berthd.log_text()));
    // Normalized, as buildkitd reports it; the archive's RepoTags keep the familiar name.
    assert_eq!(
        resp.exporter_response.get("image.name"),
        Some(&format!("docker.io/{name}"))
    );
    let config_digest = resp.exporter_response["containerimage.config.digest"].clone();

    // A private dockerd has none of the layers: the archive must carry all of them.
    let dockerd =
        integration::PrivateDockerd::new(integration::PrivateDockerdOptions::default()).unwrap();
    let out = std::process::Command::new("docker")
        .args(["-H", &dockerd.engine().host(), "load", "-i"])
        .arg(&archive)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker load: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = dockerd
        .engine()
        .run(&name, &["cat", "/made"])
        .await
        .unwrap();
    run.assert_success();
    assert_eq!(run.stdout, "archived\n");
    let inspect = dockerd.engine().inspect_image(&name).await.unwrap();
    assert_eq!(inspect.id.as_deref(), Some(config_digest.as_str()));
    let base_layers = engine.image_layers(base.reference()).await.unwrap();
    let layers = dockerd.engine().image_layers(&name).await.unwrap();
    assert_eq!(&layers[..base_layers.len()], &base_layers[..]);
}
