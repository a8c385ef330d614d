//! `push=true` with berth's registry client: several comma-separated names (the second repository
//! on the same registry mounts the blobs of the first instead of uploading them), `compression`
//! (zstd gives zstd blobs, in a Docker manifest unless `oci-mediatypes=true`), `push-by-digest`
//! (no tag), and the blob cache (a second push of the same layers compresses nothing and uploads
//! nothing the registry has).
//! Needs root, runc, overlayfs, the system dockerd and Debian's docker-registry.

mod export_support;

use std::sync::Arc;

use export_support::*;
use integration::buildkit_client::Berthd;
use integration::{require_root, unique_name, Registry};

fn count_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// Access-log lines of the registry containing every needle (the access log quotes the request
/// line: `"PUT /v2/… HTTP/1.1" 201 …`).
fn log_lines(reg: &Registry, needle: &[&str]) -> usize {
    reg.log_tail()
        .lines()
        .filter(|l| needle.iter().all(|n| l.contains(n)))
        .count()
}

async fn fetch(reference: &str) -> registry::Fetched {
    let client = registry::Registry::new(registry::Hosts::new(Default::default()));
    let s = client.session(Arc::new(registry::Anonymous));
    s.resolve(&registry::Reference::parse(reference).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_names_compression_by_digest_and_blob_cache() {
    require_root();
    let reg = Registry::start().unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let client = berthd.client().await.unwrap();
    let data = unique_name("push");
    let def = image_def(None, None, &data, 1 << 20);

    // Two names, zstd. The image exporter's default is Docker media types, and zstd does not
    // force OCI ones (v0.11.6): a Docker manifest with `….diff.tar.zstd` layers.
    let (repo_a, repo_b) = (unique_name("berth-test/pa"), unique_name("berth-test/pb"));
    let names = [
        format!("{}/{repo_a}:v1", reg.addr()),
        format!("{}/{repo_b}:v2", reg.addr()),
    ];
    let report = export_image(
        &client,
        &def,
        &names,
        &[("push", "true"), ("compression", "zstd")],
    )
    .await
    .unwrap();
    let resp = response(&report, &berthd.log_text());
    let id = resp["containerimage.config.digest"].clone();
    let _cleanup = RemoveImages(None, vec![names[0].clone(), names[1].clone(), id.clone()]);
    assert_eq!(reg.tags(&repo_a).unwrap(), ["v1"]);
    assert_eq!(reg.tags(&repo_b).unwrap(), ["v2"]);
    let m = fetch(&names[1]).await;
    assert_eq!(m.digest, resp["containerimage.digest"]);
    assert_eq!(m.media_type, registry::MEDIA_TYPE_DOCKER_MANIFEST);
    let manifest: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert!(!layers.is_empty());
    for l in layers {
        assert_eq!(
            l["mediaType"],
            "application/vnd.docker.image.rootfs.diff.tar.zstd"
        );
    }
    assert_eq!(manifest["config"]["digest"], id.as_str());
    // Blobs were uploaded to the first repository only; the second mounted them.
    let n_blobs = layers.len() + 1;
    assert_eq!(
        log_lines(&reg, &[&format!("\"PUT /v2/{repo_a}/blobs/uploads/")]),
        n_blobs,
        "{}",
        reg.log_tail()
    );
    assert_eq!(
        log_lines(&reg, &[&format!("\"PUT /v2/{repo_b}/blobs/uploads/")]),
        0
    );
    assert_eq!(
        log_lines(
            &reg,
            &[
                &format!("\"POST /v2/{repo_b}/blobs/uploads/?mount="),
                "\" 201 "
            ]
        ),
        n_blobs
    );

    // Same layers again, by digest, into a third repository: nothing compressed again.
    let blobs = berthd.root().join("blobs/sha256");
    let before = count_files(&blobs);
    let repo_c = unique_name("berth-test/pc");
    let name_c = format!("{}/{repo_c}", reg.addr());
    let report = export_image(
        &client,
        &def,
        std::slice::from_ref(&name_c),
        &[
            ("push", "true"),
            ("compression", "zstd"),
            ("push-by-digest", "true"),
        ],
    )
    .await
    .unwrap();
    let resp_c = response(&report, &berthd.log_text());
    assert_eq!(
        resp_c["containerimage.digest"],
        resp["containerimage.digest"]
    );
    assert_eq!(
        count_files(&blobs),
        before,
        "the blob cache had every layer"
    );
    assert!(
        reg.tags(&repo_c).unwrap_or_default().is_empty(),
        "push-by-digest leaves no tag"
    );
    let by_digest = fetch(&format!("{name_c}@{}", resp_c["containerimage.digest"])).await;
    assert_eq!(by_digest.digest, resp_c["containerimage.digest"]);
    // Gzip (the default) of the same image: another manifest (other layer blobs).
    let report = export_image(
        &client,
        &def,
        std::slice::from_ref(&names[0]),
        &[("push", "true")],
    )
    .await
    .unwrap();
    let resp_g = response(&report, &berthd.log_text());
    let m = fetch(&names[0]).await;
    assert_eq!(m.digest, resp_g["containerimage.digest"]);
    assert_eq!(m.media_type, registry::MEDIA_TYPE_DOCKER_MANIFEST);
    assert_ne!(
        resp_g["containerimage.digest"],
        resp["containerimage.digest"]
    );
    // It pulls back into the system dockerd as the same image ID berth reported.
    docker(None, &["rmi", "-f", &id]);
    docker(None, &["pull", &names[0]]);
    assert_eq!(tag_target(None, &names[0]).as_deref(), Some(id.as_str()));
    assert_eq!(run_cat(None, &names[0], "/data"), data);
}
