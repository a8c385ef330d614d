//! SBOM attestations of `dockerfile.v0` (`attest:sbom=generator=IMAGE`), as v0.11.6's builtin
//! frontend makes them: the scanner image runs over the final stage and, with
//! `BUILDKIT_SBOM_SCAN_CONTEXT` / `BUILDKIT_SBOM_SCAN_STAGE` ARGs (build args overriding them),
//! over the build context and the stages the final one depends on; its statements land in the
//! pushed image's attestation manifest. Needs root, runc, overlayfs, the system Docker Engine
//! and a local registry.

use std::collections::BTreeMap;
use std::path::Path;

use integration::buildkit_client::{dockerfile_build as build, Berthd, BuildReport, Output};
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

fn push(name: &str) -> Output {
    Output::Raw(
        "image".into(),
        [
            ("name".to_string(), name.to_string()),
            ("push".to_string(), "true".to_string()),
        ]
        .into(),
    )
}

/// The scanner's statements in the pushed image `resp` names, as `name: files` (sorted), and
/// the platform image's config.
fn statements(reg: &Registry, resp: &BTreeMap<String, String>) -> (Vec<String>, serde_json::Value) {
    let index = json(&reg.stored_blob(&resp["containerimage.digest"]));
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 2, "{index}");
    assert_eq!(manifests[1]["platform"]["os"], "unknown", "{index}");
    let img = json(&reg.stored_blob(manifests[0]["digest"].as_str().unwrap()));
    let config = json(&reg.stored_blob(img["config"]["digest"].as_str().unwrap()));
    let att = json(&reg.stored_blob(manifests[1]["digest"].as_str().unwrap()));
    let mut got: Vec<String> = att["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let st = json(&reg.stored_blob(l["digest"].as_str().unwrap()));
            assert_eq!(st["predicateType"], "https://spdx.dev/Document");
            format!(
                "{}: {}",
                st["predicate"]["name"].as_str().unwrap(),
                st["predicate"]["files"].as_str().unwrap()
            )
        })
        .collect();
    got.sort();
    (got, config)
}

/// Writes one statement per source it is given: `core` for `$BUILDKIT_SCAN_SOURCE`, and one
/// named after each directory of `$BUILDKIT_SCAN_SOURCE_EXTRAS`; each lists the files there.
const SCAN_SH: &str = r#"set -e
files() { echo $(ls "$1"); }
st='{"_type":"https://in-toto.io/Statement/v0.1","predicateType":"https://spdx.dev/Document","predicate":{"name":"%s","files":"%s"}}'
printf "$st" core "$(files "$BUILDKIT_SCAN_SOURCE")" > "$BUILDKIT_SCAN_DESTINATION/spdx.json"
if [ -n "$BUILDKIT_SCAN_SOURCE_EXTRAS" ]; then
  for src in "$BUILDKIT_SCAN_SOURCE_EXTRAS"/*; do
    n=$(basename "$src")
    printf "$st" "$n" "$(files "$src")" > "$BUILDKIT_SCAN_DESTINATION/$n.spdx.json"
  done
fi
"#;

/// TestSBOMScannerImage / TestSBOMScannerArgs: the scanner runs over the final stage, the build
/// context (only what the Dockerfile reads of it) and the scanned stages the final one depends
/// on (not the others); build args turn the extras off; the scan ARGs are not in the image's
/// env; a bad generator and an unknown attestation type are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sbom_scanner_scans_final_stage_context_and_stages() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let registry = Registry::start().unwrap();
    let berthd = Berthd::start(&[]).unwrap();

    let scanner_dir = tempfile::tempdir().unwrap();
    write(scanner_dir.path(), "scan.sh", SCAN_SH);
    write(
        scanner_dir.path(),
        "Dockerfile",
        &format!(
            "FROM {}\nCOPY scan.sh /scan.sh\nCMD [\"sh\", \"/scan.sh\"]\n",
            base.reference()
        ),
    );
    let scanner = format!(
        "{}/{}:v1",
        registry.addr(),
        unique_name("berth-test/sbomscanner")
    );
    let report = build(&berthd, scanner_dir.path(), &[], push(&scanner)).await;
    ok(&report, &berthd);
    let generator = format!("generator={scanner}");

    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.txt", "data\n");
    write(dir.path(), "unread.txt", "not read\n");
    write(
        dir.path(),
        "Dockerfile",
        "ARG BUILDKIT_SBOM_SCAN_CONTEXT=true\n\
         FROM scratch AS file\nARG BUILDKIT_SBOM_SCAN_STAGE=true\nCOPY a.txt /file\n\
         FROM scratch AS base\nARG BUILDKIT_SBOM_SCAN_STAGE=true\nCOPY --from=file /file /foo\n\
         FROM scratch AS unused\nARG BUILDKIT_SBOM_SCAN_STAGE=true\nRUN non-existent-command\n\
         FROM base\nARG BUILDKIT_SBOM_SCAN_STAGE=true\n",
    );
    let target = format!(
        "{}/{}",
        registry.addr(),
        unique_name("berth-test/sbomscanned")
    );

    let report = build(
        &berthd,
        dir.path(),
        &[("attest:sbom", &generator)],
        push(&format!("{target}:all")),
    )
    .await;
    let (got, config) = statements(&registry, &ok(&report, &berthd));
    assert_eq!(
        got,
        [
            "core: foo",
            "sbom-base: foo",
            "sbom-context: a.txt",
            "sbom-file: file"
        ]
    );
    let env = config["config"]["Env"].to_string();
    assert!(!env.contains("BUILDKIT_SBOM"), "{env}");

    // Build args turn both off.
    let report = build(
        &berthd,
        dir.path(),
        &[
            ("attest:sbom", &generator),
            ("build-arg:BUILDKIT_SBOM_SCAN_STAGE", "false"),
            ("build-arg:BUILDKIT_SBOM_SCAN_CONTEXT", "false"),
        ],
        push(&format!("{target}:off")),
    )
    .await;
    let (got, _) = statements(&registry, &ok(&report, &berthd));
    assert_eq!(got, ["core: foo"]);

    // Build args alone (no ARG in the Dockerfile) scan nothing more.
    write(
        dir.path(),
        "Dockerfile",
        "FROM scratch AS base\nCOPY a.txt /foo\nFROM base AS other\nFROM other\n",
    );
    let report = build(
        &berthd,
        dir.path(),
        &[
            ("attest:sbom", &generator),
            ("build-arg:BUILDKIT_SBOM_SCAN_STAGE", "true"),
            ("build-arg:BUILDKIT_SBOM_SCAN_CONTEXT", "true"),
        ],
        push(&format!("{target}:args")),
    )
    .await;
    let (got, _) = statements(&registry, &ok(&report, &berthd));
    assert_eq!(got, ["core: foo"]);

    // A list of stage names scans those.
    write(
        dir.path(),
        "Dockerfile",
        "ARG BUILDKIT_SBOM_SCAN_STAGE=base\n\
         FROM scratch AS base\nCOPY a.txt /foo\nFROM base AS other\nFROM other\n",
    );
    let report = build(
        &berthd,
        dir.path(),
        &[("attest:sbom", &generator)],
        push(&format!("{target}:list")),
    )
    .await;
    let (got, _) = statements(&registry, &ok(&report, &berthd));
    assert_eq!(got, ["core: foo", "sbom-base: foo"]);

    for (attrs, want) in [
        (
            vec![("attest:sbom", "generator=")],
            "failed to parse sbom scanner",
        ),
        (vec![("attest:foo", "")], "unknown attestation type \"foo\""),
    ] {
        let report = build(&berthd, dir.path(), &attrs, Output::None).await;
        let e = report.solve.expect_err("must fail");
        assert!(e.message().contains(want), "{want}: {e:?}");
    }
}
