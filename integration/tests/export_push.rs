//! `--output type=image,name=…,push=true`: berthd tags the image in the system dockerd, then
//! pushes it with its own registry client (credentials from the session's Auth service) to a real
//! registry on 127.0.0.1. The response's `containerimage.digest` is the manifest the registry
//! holds (checked by pulling the image back with `docker pull` after `docker rmi`: same image
//! ID), and progress shows the export and push steps.
//! Needs root, runc, overlayfs, the system dockerd and Debian's docker-registry.

mod export_support;

use export_support::*;
use integration::buildkit_client::Berthd;
use integration::{busybox_image, require_root, unique_name, DockerEngine, Registry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_true_pushes_and_reports_the_registry_digest() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let registry = Registry::start().unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let client = berthd.client().await.unwrap();

    let repo = unique_name("berth-test/push");
    let name = format!("{}/{repo}:v1", registry.addr());
    let data = unique_name("pushed");
    let def = image_def(Some(base.reference()), None, &data, 1 << 20);
    let report = export_image(
        &client,
        &def,
        std::slice::from_ref(&name),
        &[("push", "true")],
    )
    .await
    .unwrap();
    let resp = response(&report, &berthd.log_text());
    let id = resp["containerimage.config.digest"].clone();
    let mut cleanup = RemoveImages(None, vec![id.clone()]);
    assert_eq!(resp.get("image.name"), Some(&name));
    assert_eq!(tag_target(None, &name).as_deref(), Some(id.as_str()));
    let pushed = resp["containerimage.digest"].clone();
    assert!(
        pushed.starts_with("sha256:") && pushed.len() == 71,
        "{pushed}"
    );
    // The descriptor names the same manifest.
    let desc = {
        use std::io::Read as _;
        let out = std::process::Command::new("base64")
            .arg("-d")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write as _;
                c.stdin
                    .take()
                    .unwrap()
                    .write_all(resp["containerimage.descriptor"].as_bytes())?;
                let mut s = String::new();
                c.stdout.take().unwrap().read_to_string(&mut s)?;
                c.wait()?;
                Ok(s)
            })
            .unwrap();
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    assert_eq!(desc["digest"], pushed.as_str());
    assert_eq!(registry.tags(&repo).unwrap(), ["v1"]);

    // Progress: export steps, then the push.
    let statuses: Vec<String> = report.vertex_statuses().into_iter().map(|s| s.id).collect();
    for want in [
        "exporting layers".to_string(),
        format!("writing image {id}"),
        format!("naming to {name}"),
        format!("pushing {name}"),
        format!("pushing manifest for {name}@{pushed}"),
    ] {
        assert!(statuses.contains(&want), "no {want:?} in {statuses:?}");
    }
    assert!(
        statuses
            .iter()
            .any(|s| s.starts_with("layer sha256:") && s.ends_with("bytes)")),
        "{statuses:?}"
    );

    // Pull it back into an engine that no longer has it: same manifest digest, same content.
    docker(None, &["rmi", "-f", &id]);
    assert_eq!(tag_target(None, &name), None);
    docker(None, &["pull", &name]);
    let repo_digest = docker(
        None,
        &[
            "image",
            "inspect",
            "--format",
            "{{index .RepoDigests 0}}",
            &name,
        ],
    );
    assert_eq!(
        repo_digest.trim(),
        format!("{}/{repo}@{pushed}", registry.addr())
    );
    assert_eq!(tag_target(None, &name).as_deref(), Some(id.as_str()));
    assert_eq!(run_cat(None, &name, "/data"), data);
    cleanup.1.push(name);
}

/// `push=true` without a name is refused with an error naming the problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_without_a_name_is_an_error() {
    require_root();
    let berthd = Berthd::start(&[]).unwrap();
    let client = berthd.client().await.unwrap();
    let def = image_def(None, None, "x", 0);
    let report = export_image(&client, &def, &[], &[("push", "true")])
        .await
        .unwrap();
    let err = report.solve.unwrap_err();
    assert!(err.message().contains("push=true needs a name"), "{err:?}");
}
