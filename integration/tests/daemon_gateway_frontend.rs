//! `gateway.v0`: frontend images run as containers speaking LLBBridge over their stdio.
//!
//! The frontend is `src/bin/berth-test-frontend.rs`, packaged with its shared libraries as an
//! image in the system Docker Engine (never in a registry, so berthd must use it from Docker's
//! store in place). Builds go through it as buildctl drives them
//! (`--frontend gateway.v0 --opt source=IMAGE`) and through a Dockerfile's `# syntax=IMAGE`
//! line with the built-in `dockerfile.v0`. The frontend itself checks what it sees (its
//! environment, `frontend.bin`, the client's Dockerfile through Solve + ReadFile of a local
//! source, ReadFile of its own result) and writes it into `/hello`, which the tests read from a
//! local export. Failures of the frontend (a returned error, a non-zero exit with stderr, a
//! capability the image lacks) must reach the client with what went wrong. Needs root, runc,
//! overlayfs and the system Docker Engine.

use std::collections::BTreeMap;
use std::path::Path;

use integration::buildkit_client::{Berthd, BuildOptions, BuildReport, Output};
use integration::{program_image, require_root, DockerEngine, TestImage};

const FRONTEND: &str = env!("CARGO_BIN_EXE_berth-test-frontend");

async fn frontend_image(engine: &DockerEngine) -> TestImage {
    program_image(engine, Path::new(FRONTEND), "berth-test-frontend", &[])
        .await
        .unwrap()
}

async fn build(
    berthd: &Berthd,
    dir: &Path,
    frontend: &str,
    attrs: &[(&str, &str)],
    out: Option<&Path>,
) -> BuildReport {
    let client = berthd.client().await.unwrap();
    let mut locals = BTreeMap::new();
    locals.insert("context".to_string(), dir.to_path_buf());
    locals.insert("dockerfile".to_string(), dir.to_path_buf());
    client
        .build(BuildOptions {
            frontend: Some(frontend.into()),
            frontend_attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            locals,
            output: out.map_or(Output::None, |o| Output::Local(o.to_path_buf())),
            ..Default::default()
        })
        .await
        .unwrap()
}

/// The error of a build that must fail (the gateway Solve's, as the client sees it first).
fn failure(report: &BuildReport) -> tonic::Status {
    assert!(report.solve.is_err(), "build succeeded: {report:?}");
    match &report.gateway_solve {
        Some(Err(st)) => st.clone(),
        other => panic!("gateway solve did not fail: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_image_builds_through_llbbridge_on_stdio() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let image = frontend_image(&engine).await;
    let berthd = Berthd::start(&[]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();

    // buildctl build --frontend gateway.v0 --opt source=IMAGE --opt message=hi
    std::fs::write(ctx.join("Dockerfile"), "plain text the frontend reads\n").unwrap();
    let out = tmp.path().join("out1");
    let r = build(
        &berthd,
        &ctx,
        "gateway.v0",
        &[("source", image.reference()), ("message", "hi")],
        Some(&out),
    )
    .await;
    if let Err(e) = &r.solve {
        panic!("solve failed: {e:?}\n{}", berthd.log_text());
    }
    let hello = std::fs::read_to_string(out.join("hello")).unwrap();
    assert_eq!(
        hello,
        "hi session=true workers=1 frontend.bin=true product=buildkit\n\
         plain text the frontend reads\n"
    );
    let meta = &r.gateway_solve.as_ref().unwrap().as_ref().unwrap();
    let md = &meta.result.as_ref().unwrap().metadata;
    assert_eq!(md.get("frontend.test").map(|v| &v[..]), Some(&b"ok"[..]));

    // a Dockerfile naming the frontend image in `# syntax=`, built with dockerfile.v0
    let dockerfile = format!("# syntax={}\nFROM scratch\n", image.reference());
    std::fs::write(ctx.join("Dockerfile"), &dockerfile).unwrap();
    let out = tmp.path().join("out2");
    let r = build(&berthd, &ctx, "dockerfile.v0", &[], Some(&out)).await;
    if let Err(e) = &r.solve {
        panic!("solve failed: {e:?}\n{}", berthd.log_text());
    }
    let hello = std::fs::read_to_string(out.join("hello")).unwrap();
    assert_eq!(
        hello,
        format!(" session=true workers=1 frontend.bin=true product=buildkit\n{dockerfile}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_failures_reach_the_client() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let image = frontend_image(&engine).await;
    let berthd = Berthd::start(&[]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("Dockerfile"), "x\n").unwrap();
    let source = image.reference();

    // an error the frontend returns
    let r = build(
        &berthd,
        tmp.path(),
        "gateway.v0",
        &[("source", source), ("fail", "the frontend says no")],
        None,
    )
    .await;
    let st = failure(&r);
    assert!(st.message().contains("the frontend says no"), "{st:?}");

    // a frontend that exits without returning: exit code and its stderr
    let r = build(
        &berthd,
        tmp.path(),
        "gateway.v0",
        &[("source", source), ("exit", "3")],
        None,
    )
    .await;
    let st = failure(&r);
    assert!(st.message().contains("exit code: 3"), "{st:?}");
    assert!(
        st.message()
            .contains("berth-test-frontend: exiting with code 3 as asked"),
        "{st:?}"
    );
    assert!(st.message().contains(source), "{st:?}");

    // a capability the image does not list in moby.buildkit.frontend.caps
    let r = build(
        &berthd,
        tmp.path(),
        "gateway.v0",
        &[
            ("source", source),
            ("frontend.caps", "moby.buildkit.frontend.contexts"),
        ],
        None,
    )
    .await;
    let st = failure(&r);
    assert_eq!(st.code(), tonic::Code::Unimplemented, "{st:?}");
    assert!(
        st.message()
            .contains("unsupported frontend capability moby.buildkit.frontend.contexts"),
        "{st:?}"
    );

    // no source at all
    let r = build(&berthd, tmp.path(), "gateway.v0", &[], None).await;
    let st = failure(&r);
    assert!(
        st.message().contains("no source specified for gateway"),
        "{st:?}"
    );

    // the daemon still builds after all of these
    let out = tmp.path().join("out");
    let r = build(
        &berthd,
        tmp.path(),
        "gateway.v0",
        &[("source", source)],
        Some(&out),
    )
    .await;
    if let Err(e) = &r.solve {
        panic!("solve failed: {e:?}\n{}", berthd.log_text());
    }
    assert!(std::fs::read_to_string(out.join("hello"))
        .unwrap()
        .ends_with("\nx\n"));
}

/// A `# syntax=` frontend's attestations reach the exporter as the built-in frontend's do
/// (they were dropped when `dockerfile.v0` forwarded to `gateway.v0`): the frontend returns an
/// in-toto attestation of its own predicate type, and the local export writes its statement
/// beside the result, its subjects the result's files, as buildkitd does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syntax_frontend_attestations_are_exported() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let image = frontend_image(&engine).await;
    let berthd = Berthd::start(&[]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    let dockerfile = format!("# syntax={}\nFROM scratch\n", image.reference());
    std::fs::write(ctx.join("Dockerfile"), &dockerfile).unwrap();
    let predicate_type = "https://example.com/berth-test/v1";
    let out = tmp.path().join("out");
    let r = build(
        &berthd,
        &ctx,
        "dockerfile.v0",
        &[("attest-predicate", predicate_type)],
        Some(&out),
    )
    .await;
    if let Err(e) = &r.solve {
        panic!("solve failed: {e:?}\n{}", berthd.log_text());
    }
    assert!(out.join("hello").is_file(), "result file missing");
    let stmt = std::fs::read(out.join("predicate.json"))
        .unwrap_or_else(|e| panic!("statement predicate.json: {e}\n{}", berthd.log_text()));
    let stmt: serde_json::Value = serde_json::from_slice(&stmt).unwrap();
    assert_eq!(stmt["_type"], "https://in-toto.io/Statement/v0.1", "{stmt}");
    assert_eq!(stmt["predicateType"], predicate_type, "{stmt}");
    assert_eq!(stmt["predicate"]["frontend"], "berth-test", "{stmt}");
    let subjects: Vec<&str> = stmt["subject"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(subjects.len(), 1, "{stmt}");
    assert_eq!(subjects[0].trim_start_matches('/'), "hello", "{stmt}");
}
