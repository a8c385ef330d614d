//! What `dockerfile.v0` returns: with `platform=a,b` one result per platform (each built with
//! its own `TARGETARCH`), pushed as an index, with the Dockerfile's warnings shown once, and
//! buildable without an exporter; with a target platform the worker cannot run
//! (darwin/ppc64le), the stages that run nothing there, and target-platform RUNs on a
//! build-platform stage; and, through `LLBBridge.Solve`, refs
//! that carry the definition they were solved from, which solves again to the same files (a
//! gateway client's `Ref.ToState`). Needs root, runc, overlayfs, the system Docker Engine and
//! a local registry.

use std::collections::BTreeMap;
use std::path::Path;

use integration::buildkit_client::{
    dockerfile_build as build, Berthd, BuildOptions, BuildReport, Output,
};
use integration::{busybox_image, require_root, unique_name, DockerEngine, Registry};

fn write(dir: &Path, rel: &str, content: &str) {
    std::fs::write(dir.join(rel), content).unwrap();
}

fn ok(report: &BuildReport, berthd: &Berthd) -> BTreeMap<String, String> {
    match &report.solve {
        Ok(r) => r.exporter_response.clone().into_iter().collect(),
        Err(e) => panic!("solve failed: {e:?}\n{}", berthd.log_text()),
    }
}

fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_target_platforms_build_one_image_each() {
    require_root();
    let registry = Registry::start().unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The empty continuation line makes the parser warn.
    write(
        dir.path(),
        "Dockerfile",
        "FROM scratch\nARG TARGETARCH\nCOPY arch-$TARGETARCH whoami\nCOPY Dockerfile \\\n\n.\n",
    );
    write(dir.path(), "arch-amd64", "i am amd64");
    write(dir.path(), "arch-arm64", "i am arm64");
    let platforms = ("platform", "linux/amd64,linux/arm64");

    // No exporter: both platforms build, the warning shows once.
    let report = build(&berthd, dir.path(), &[platforms], Output::None).await;
    ok(&report, &berthd);
    let warnings: Vec<_> = report
        .statuses
        .iter()
        .flat_map(|s| s.warnings.clone())
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(
        String::from_utf8_lossy(&warnings[0].short),
        "Empty continuation line found in: COPY Dockerfile ."
    );
    let names: Vec<String> = report.vertices().values().map(|v| v.name.clone()).collect();
    for p in ["linux/amd64", "linux/arm64"] {
        assert!(
            names
                .iter()
                .any(|n| n.starts_with(&format!("[{p} ")) && n.contains("] COPY arch-")),
            "no step prefixed with {p}: {names:?}"
        );
    }

    // Pushed: an index with one manifest per platform, each with its own file.
    let repo = unique_name("berth-test/multi");
    let name = format!("{}/{repo}:v1", registry.addr());
    let out: BTreeMap<String, String> = [
        ("name".to_string(), name.clone()),
        ("push".to_string(), "true".to_string()),
    ]
    .into();
    let report = build(
        &berthd,
        dir.path(),
        &[platforms],
        Output::Raw("image".into(), out),
    )
    .await;
    let resp = ok(&report, &berthd);
    let index = json(&registry.stored_blob(&resp["containerimage.digest"]));
    let manifests = index["manifests"].as_array().unwrap();
    let got: Vec<String> = manifests
        .iter()
        .map(|m| {
            format!(
                "{}/{}",
                m["platform"]["os"].as_str().unwrap(),
                m["platform"]["architecture"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(got, ["linux/amd64", "linux/arm64"], "{index}");
    let mut layers = vec![];
    for m in manifests {
        let manifest = json(&registry.stored_blob(m["digest"].as_str().unwrap()));
        let config = json(&registry.stored_blob(manifest["config"]["digest"].as_str().unwrap()));
        assert_eq!(config["architecture"], m["platform"]["architecture"]);
        assert_eq!(config["os"], "linux");
        let l = manifest["layers"].as_array().unwrap();
        assert_eq!(l.len(), 2, "{manifest}");
        layers.push(l[0]["digest"].as_str().unwrap().to_string());
    }
    // whoami differs per platform, so the first layers do too.
    assert_ne!(layers[0], layers[1]);
    // `multi-platform=false` with several platforms is refused, as buildkitd does.
    let report = build(
        &berthd,
        dir.path(),
        &[platforms, ("multi-platform", "false")],
        Output::None,
    )
    .await;
    let err = report.solve.unwrap_err();
    assert!(
        err.message()
            .contains("returning multiple target platforms is not allowed"),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_target_platform_builds_what_runs_on_the_build_platform() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "Dockerfile",
        &format!(
            "FROM --platform=$BUILDPLATFORM {} AS build\nARG TARGETPLATFORM\nARG TARGETOS\n\
             RUN mkdir /out && echo -n $TARGETPLATFORM > /out/platform && echo -n $TARGETOS > /out/os\n\
             FROM scratch\nCOPY --from=build out .\n",
            base.reference()
        ),
    );
    let dest = tempfile::tempdir().unwrap();
    let report = build(
        &berthd,
        dir.path(),
        &[
            ("platform", "darwin/ppc64le"),
            ("build-arg:TARGETOS", "freebsd"),
        ],
        Output::Local(dest.path().to_path_buf()),
    )
    .await;
    ok(&report, &berthd);
    let read = |f: &str| std::fs::read_to_string(dest.path().join(f)).unwrap();
    assert_eq!(read("platform"), "darwin/ppc64le");
    assert_eq!(read("os"), "freebsd");

    // A RUN of the target platform (arm64) in a stage holding the build platform's binaries
    // runs them as they are, as buildkitd does without an emulator.
    write(
        dir.path(),
        "Dockerfile",
        &format!(
            "FROM --platform=$BUILDPLATFORM {} AS base\nFROM scratch AS build\n\
             COPY --from=base / /\nARG TARGETARCH\n\
             RUN echo -n $TARGETARCH > /arch\nFROM scratch\nCOPY --from=build /arch /\n",
            base.reference()
        ),
    );
    let dest = tempfile::tempdir().unwrap();
    let report = build(
        &berthd,
        dir.path(),
        &[("platform", "linux/arm64")],
        Output::Local(dest.path().to_path_buf()),
    )
    .await;
    ok(&report, &berthd);
    assert_eq!(
        std::fs::read_to_string(dest.path().join("arch")).unwrap(),
        "arm64"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn solved_frontend_results_carry_their_definition() {
    require_root();
    let berthd = Berthd::start(&[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // No local context in the result, so its definition solves in any session.
    write(
        dir.path(),
        "Dockerfile",
        "FROM scratch\nCOPY <<EOF /foo2\ndata\nEOF\n",
    );
    let report = build(&berthd, dir.path(), &[], Output::None).await;
    ok(&report, &berthd);
    let solved = report.gateway_solve.unwrap().unwrap();
    let def = match solved.result.unwrap().result.unwrap() {
        protos::moby::buildkit::v1::frontend::result::Result::Ref(r) => r.def,
        other => panic!("not a ref: {other:?}"),
    }
    .expect("the ref carries its definition");
    assert!(!def.def.is_empty());

    let client = berthd.client().await.unwrap();
    let dest = tempfile::tempdir().unwrap();
    let report = client
        .build(BuildOptions {
            definition: Some(def),
            output: Output::Local(dest.path().to_path_buf()),
            ..Default::default()
        })
        .await
        .unwrap();
    ok(&report, &berthd);
    assert_eq!(
        std::fs::read_to_string(dest.path().join("foo2")).unwrap(),
        "data\n"
    );
}
