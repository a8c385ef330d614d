//! SLSA provenance (`attest:provenance`) of a `dockerfile.v0` build pushed to a registry, as
//! BuildKit v0.11.6 makes it: the image becomes an index of the platform image and an
//! attestation manifest whose in-toto statement (`https://slsa.dev/provenance/v0.2`) names the
//! base image with its digest as material, the frontend, its options (credentials redacted,
//! build args only with `mode=max`), the local sources, the secrets and SSH sockets RUN
//! mounted, and with `mode=max` the build steps and the pushed layers of each step. Needs root,
//! runc, overlayfs, the system Docker Engine and a local registry.

use std::collections::BTreeMap;
use std::path::Path;

use integration::buildkit_client::{dockerfile_build as build, Berthd, Output};
use integration::{busybox_image, require_root, unique_name, DockerEngine, Registry};

fn blob(reg: &Registry, digest: &str) -> serde_json::Value {
    serde_json::from_slice(&reg.stored_blob(digest)).unwrap()
}

/// Pushes the build of `dir` with `attrs` and returns the image manifest, its digest and the
/// provenance statement of its attestation manifest.
async fn push_with_provenance(
    berthd: &Berthd,
    registry: &Registry,
    dir: &Path,
    attrs: &[(&str, &str)],
) -> (serde_json::Value, String, serde_json::Value) {
    let name = format!("{}/{}:v1", registry.addr(), unique_name("berth-test/prov"));
    let out: BTreeMap<String, String> = [
        ("name".to_string(), name),
        ("push".to_string(), "true".to_string()),
    ]
    .into();
    let report = build(berthd, dir, attrs, Output::Raw("image".into(), out)).await;
    let resp: BTreeMap<String, String> = match &report.solve {
        Ok(r) => r.exporter_response.clone().into_iter().collect(),
        Err(e) => panic!("solve failed: {e:?}\n{}", berthd.log_text()),
    };
    let index = blob(registry, &resp["containerimage.digest"]);
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 2, "{index}");
    let img_digest = manifests[0]["digest"].as_str().unwrap().to_string();
    let att = &manifests[1];
    assert_eq!(
        att["annotations"]["vnd.docker.reference.type"],
        "attestation-manifest"
    );
    assert_eq!(
        att["annotations"]["vnd.docker.reference.digest"],
        img_digest.as_str()
    );
    let am = blob(registry, att["digest"].as_str().unwrap());
    let layers = am["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{am}");
    assert_eq!(
        layers[0]["annotations"]["in-toto.io/predicate-type"],
        "https://slsa.dev/provenance/v0.2"
    );
    let stmt = blob(registry, layers[0]["digest"].as_str().unwrap());
    assert_eq!(stmt["_type"], "https://in-toto.io/Statement/v0.1");
    assert_eq!(stmt["predicateType"], "https://slsa.dev/provenance/v0.2");
    assert_eq!(
        stmt["subject"][0]["digest"]["sha256"],
        img_digest.strip_prefix("sha256:").unwrap()
    );
    (blob(registry, &img_digest), img_digest, stmt)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerfile_build_pushes_slsa_provenance() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let registry = Registry::start().unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = format!(
        "FROM {}\nARG WHO\nRUN --mount=type=secret,id=tok --mount=type=ssh echo \"hi $WHO\" > /hi\n",
        base.reference()
    );
    std::fs::write(dir.path().join("Dockerfile"), &dockerfile).unwrap();
    let common = [
        ("build-arg:WHO", "me"),
        ("filename", "Dockerfile"),
        ("vcs:source", "https://user:pass@example.invalid/repo.git"),
        ("vcs:revision", "abc123"),
        ("context:foo", "https://user:pass@example.invalid/foo.html"),
    ];

    // mode=max
    let mut attrs = common.to_vec();
    attrs.push((
        "attest:provenance",
        "mode=max,builder-id=https://berth.example/b",
    ));
    let (manifest, _, stmt) = push_with_provenance(&berthd, &registry, dir.path(), &attrs).await;
    let p = &stmt["predicate"];
    assert_eq!(p["buildType"], "https://mobyproject.org/buildkit@v1", "{p}");
    assert_eq!(p["builder"]["id"], "https://berth.example/b");
    // The base image is the one material, as a package URL with its platform and a digest.
    let materials = p["materials"].as_array().unwrap();
    assert_eq!(materials.len(), 1, "{p}");
    let uri = materials[0]["uri"].as_str().unwrap();
    let (repo, tag) = base.reference().rsplit_once(':').unwrap();
    assert_eq!(
        uri,
        format!("pkg:docker/{repo}@{tag}?platform=linux%2Famd64"),
        "{p}"
    );
    let digest = materials[0]["digest"]["sha256"].as_str().unwrap();
    assert_eq!(digest.len(), 64, "{p}");
    let inv = &p["invocation"];
    assert_eq!(inv["configSource"]["entryPoint"], "Dockerfile");
    assert!(inv["configSource"].get("uri").is_none(), "{inv}");
    assert_eq!(inv["environment"]["platform"], "linux/amd64");
    let params = &inv["parameters"];
    assert_eq!(params["frontend"], "dockerfile.v0");
    assert_eq!(
        params["args"],
        serde_json::json!({
            "build-arg:WHO": "me",
            "context:foo": "https://xxxxx:xxxxx@example.invalid/foo.html",
        })
    );
    assert_eq!(
        params["locals"],
        serde_json::json!([{"name": "context"}, {"name": "dockerfile"}])
    );
    assert_eq!(
        params["secrets"],
        serde_json::json!([{"id": "tok", "optional": true}])
    );
    assert_eq!(
        params["ssh"],
        serde_json::json!([{"id": "default", "optional": true}])
    );
    let md = &p["metadata"];
    assert_eq!(
        md["completeness"],
        serde_json::json!({"parameters": true, "environment": true, "materials": false})
    );
    assert_eq!(md["reproducible"], false);
    // local sources and a RUN with network: not hermetic
    assert!(md
        .get("https://mobyproject.org/buildkit@v1#hermetic")
        .is_none());
    let started =
        chrono::DateTime::parse_from_rfc3339(md["buildStartedOn"].as_str().unwrap()).unwrap();
    let finished =
        chrono::DateTime::parse_from_rfc3339(md["buildFinishedOn"].as_str().unwrap()).unwrap();
    assert!(started < finished, "{md}");
    assert!(!md["buildInvocationID"].as_str().unwrap().is_empty());
    let bk = &md["https://mobyproject.org/buildkit@v1#metadata"];
    assert_eq!(
        bk["vcs"],
        serde_json::json!({"source": "https://xxxxx:xxxxx@example.invalid/repo.git", "revision": "abc123"})
    );
    // The Dockerfile, and the steps: the image, the RUN, the terminal.
    let info = &bk["source"]["infos"][0];
    assert_eq!(info["filename"], "Dockerfile");
    use base64::Engine as _;
    let data = base64::engine::general_purpose::STANDARD
        .decode(info["data"].as_str().unwrap())
        .unwrap();
    assert_eq!(data, dockerfile.as_bytes());
    let steps = p["buildConfig"]["llbDefinition"].as_array().unwrap();
    assert_eq!(steps.len(), 3, "{p}");
    assert_eq!(
        steps[0]["op"]["Op"]["source"]["identifier"],
        format!("docker-image://docker.io/{}", base.reference())
    );
    assert_eq!(steps[1]["inputs"], serde_json::json!(["step0:0"]));
    assert!(
        steps[1]["op"]["Op"]["exec"]["meta"]["args"].is_array(),
        "{p}"
    );
    assert!(steps[2]["op"]["Op"].is_null());
    // The layers of each step are the pushed ones: the base's, then the base's and the RUN's.
    let pushed: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    let layer_digests = |step: &str| -> Vec<String> {
        bk["layers"][step][0]
            .as_array()
            .unwrap_or_else(|| panic!("no layers of {step}: {bk}"))
            .iter()
            .map(|d| d["digest"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(layer_digests("step1:0"), pushed, "{bk}");
    assert_eq!(layer_digests("step0:0"), pushed[..pushed.len() - 1], "{bk}");

    // mode=min, built again (cached): no build args, secrets, SSH, steps or layers.
    let mut attrs = common.to_vec();
    attrs.push(("attest:provenance", "mode=min"));
    let (_, _, stmt) = push_with_provenance(&berthd, &registry, dir.path(), &attrs).await;
    let p = &stmt["predicate"];
    let params = &p["invocation"]["parameters"];
    assert_eq!(
        params["args"],
        serde_json::json!({"context:foo": "https://xxxxx:xxxxx@example.invalid/foo.html"})
    );
    assert!(params.get("secrets").is_none(), "{p}");
    assert!(params.get("ssh").is_none(), "{p}");
    assert_eq!(p["metadata"]["completeness"]["parameters"], false);
    assert!(p.get("buildConfig").is_none(), "{p}");
    let bk = &p["metadata"]["https://mobyproject.org/buildkit@v1#metadata"];
    assert!(
        bk.get("layers").is_none() && bk.get("source").is_none(),
        "{p}"
    );
    assert_eq!(p["materials"][0]["uri"], uri);

    // A mode BuildKit does not know is refused.
    let report = build(
        &berthd,
        dir.path(),
        &[("attest:provenance", "mode=most")],
        Output::None,
    )
    .await;
    let err = report.solve.unwrap_err();
    assert!(err.message().contains("invalid mode \"most\""), "{err:?}");
}
