//! Imported caches whose steps copy from a step that has no result in the cache (BuildKit's
//! TestCacheImportExport and TestCacheMultiPlatformImportExport, built-in Dockerfile frontend).
//!
//! A `COPY --from=base` is keyed by the content it copies, so the copied-from step (a RUN) would
//! have to run to checksum it; a `mode=min` (or inline) cache records no result for that RUN, so
//! the RUN ran again, wrote new random bytes, and the copy missed the cache. berth records with
//! each content-keyed step an alias (its definition and its inputs' keys, BuildKit's
//! definition-based key) linked to the step's key, so an importing node finds the copy's key
//! without building its inputs: the RUN does not run and the result is the exporter's.
//!
//! Two berthd with their own roots (so nothing is cached locally on node B), the system Docker
//! Engine for the base image, Debian's docker-registry. Needs root, runc, overlayfs.

use std::collections::BTreeMap;
use std::path::Path;

use integration::buildkit_client::{Berthd, BuildOptions, BuildReport, Output};
use integration::{busybox_image, require_root, unique_name, DockerEngine, Registry};
use protos::moby::buildkit::v1 as control;

fn entry(kind: &str, attrs: &[(&str, &str)]) -> control::CacheOptionsEntry {
    control::CacheOptionsEntry {
        r#type: kind.to_string(),
        attrs: attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

async fn build(
    berthd: &Berthd,
    dir: &Path,
    attrs: &[(&str, &str)],
    output: Output,
    cache_exports: Vec<control::CacheOptionsEntry>,
) -> BuildReport {
    let locals = BTreeMap::from([
        ("context".to_string(), dir.to_path_buf()),
        ("dockerfile".to_string(), dir.to_path_buf()),
    ]);
    let r = berthd
        .client()
        .await
        .unwrap()
        .build(BuildOptions {
            frontend: Some("dockerfile.v0".into()),
            frontend_attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            locals,
            output,
            cache_exports,
            ..Default::default()
        })
        .await
        .unwrap();
    if let Err(e) = &r.solve {
        panic!("build failed: {e}\nberthd log:\n{}", berthd.log_text());
    }
    r
}

/// The RUN steps of a build that were not cached.
fn runs_executed(r: &BuildReport) -> Vec<String> {
    r.vertices()
        .values()
        .filter(|v| v.name.contains("] RUN ") && !v.cached)
        .map(|v| v.name.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_cache_copy_from_a_run_without_result_imports_without_running_it() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("foo"), "foobar").unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!(
            "FROM {} AS base\nCOPY foo const\n\
             RUN head -c 100 /dev/urandom | sha256sum > unique\n\
             FROM scratch\nCOPY --from=base const /\nCOPY --from=base unique /\n",
            base.reference()
        ),
    )
    .unwrap();
    let cache_ref = format!(
        "{}/{}:latest",
        reg.addr(),
        unique_name("berth-test/min-copy")
    );

    // Node A: mode=min (the default), so only the final COPY's record has a result.
    let a = Berthd::start(&[]).unwrap();
    let out_a = tempfile::tempdir().unwrap();
    build(
        &a,
        dir.path(),
        &[],
        Output::Local(out_a.path().to_path_buf()),
        vec![entry("registry", &[("ref", &cache_ref)])],
    )
    .await;
    let unique_a = std::fs::read_to_string(out_a.path().join("unique")).unwrap();
    assert_eq!(unique_a.len(), 68, "{unique_a:?}");

    // Node B imports through the frontend's `cache-from`: the RUN does not run and the output
    // is node A's.
    let b = Berthd::start(&[]).unwrap();
    let out_b = tempfile::tempdir().unwrap();
    let rb = build(
        &b,
        dir.path(),
        &[("cache-from", &cache_ref)],
        Output::Local(out_b.path().to_path_buf()),
        vec![],
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(out_b.path().join("unique")).unwrap(),
        unique_a,
        "node B's RUN ran again: {:?}\n{}",
        runs_executed(&rb),
        b.log_text()
    );
    assert_eq!(
        std::fs::read_to_string(out_b.path().join("const")).unwrap(),
        "foobar"
    );
    assert!(runs_executed(&rb).is_empty(), "{:?}", runs_executed(&rb));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_platform_inline_cache_rebuilds_the_same_index() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The RUN runs on the build platform for each target platform; the arm64 image only copies.
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!(
            "FROM --platform=$BUILDPLATFORM {} AS base\nARG TARGETARCH\n\
             RUN echo -n $TARGETARCH > arch && head -c 100 /dev/urandom | sha256sum > unique\n\
             FROM scratch\nCOPY --from=base unique /\nCOPY --from=base arch /\n",
            base.reference()
        ),
    )
    .unwrap();
    let image = format!(
        "{}/{}:img",
        reg.addr(),
        unique_name("berth-test/multi-inline")
    );
    let push = || {
        Output::Raw(
            "image".into(),
            BTreeMap::from([
                ("name".to_string(), image.clone()),
                ("push".to_string(), "true".to_string()),
            ]),
        )
    };
    let platforms = ("platform", "linux/amd64,linux/arm64");

    let a = Berthd::start(&[]).unwrap();
    let ra = build(
        &a,
        dir.path(),
        &[platforms],
        push(),
        vec![entry("inline", &[])],
    )
    .await;
    let digest_a = ra.solve.as_ref().unwrap().exporter_response["containerimage.digest"].clone();
    // Node B rebuilds from the pushed index: nothing runs and the index is the same.
    let b = Berthd::start(&[]).unwrap();
    let rb = build(
        &b,
        dir.path(),
        &[platforms, ("cache-from", &image)],
        push(),
        vec![entry("inline", &[])],
    )
    .await;
    assert!(
        runs_executed(&rb).is_empty(),
        "{:?}\n{}",
        runs_executed(&rb),
        b.log_text()
    );
    assert_eq!(
        rb.solve.as_ref().unwrap().exporter_response["containerimage.digest"],
        digest_a
    );
}
