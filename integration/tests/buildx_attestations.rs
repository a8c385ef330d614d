//! Attestations of `docker buildx build` (0.13.1, remote driver on berthd's unix socket) and of
//! the `docker` exporter, as BuildKit v0.11.6 exports them (issue #11). berthd advertises
//! `exporter.image.attestations`, so buildx sends `--sbom`/`--provenance` and adds a provenance
//! (`mode=min,inline-only=true`) to every build:
//! - a push carries the attestation manifest in an index (`vnd.docker.reference.type=
//!   attestation-manifest`, `vnd.docker.reference.digest`, in-toto layers with their predicate
//!   types), and the image also lands in the bound Docker Engine as it does without them;
//! - `--output type=image` registers the image alone (Docker's store holds no index), with the
//!   image ID it has without attestations; `--load` leaves the inline-only provenance out;
//! - `--provenance=mode=max --load` is refused as by buildkitd (buildx asks for a ref map);
//! - a `docker` archive of a single result with a `mode=max` provenance is an index in its OCI
//!   layout, and its `manifest.json` loads the image into Docker with the same image ID.
//!
//! Needs root, runc, overlayfs, the system Docker Engine, buildx 0.13.1 and the registry binary.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use integration::buildkit_client::{dockerfile_build, Berthd, BuildReport, Output};
use integration::{
    busybox_image, require_root, unique_name, BuildxBuilder, DockerEngine, Registry, TestImage,
};
use serde_json::Value;

const SPDX: &str = "https://spdx.dev/Document";
const SLSA: &str = "https://slsa.dev/provenance/v0.2";

/// A scanner writing one SPDX statement listing the scanned root.
const SCAN_SH: &str = r#"set -e
st='{"_type":"https://in-toto.io/Statement/v0.1","predicateType":"https://spdx.dev/Document","predicate":{"name":"core","files":"%s"}}'
printf "$st" "$(echo $(ls "$BUILDKIT_SCAN_SOURCE"))" > "$BUILDKIT_SCAN_DESTINATION/spdx.json"
"#;

fn write(dir: &Path, rel: &str, content: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(rel), content).unwrap();
}

fn ok(report: &BuildReport, berthd: &Berthd) -> BTreeMap<String, String> {
    match &report.solve {
        Ok(r) => r.exporter_response.clone().into_iter().collect(),
        Err(e) => panic!("solve failed: {e:?}\n{}", berthd.log_text()),
    }
}

/// A buildx remote builder on berthd, removed on drop.
struct Builder(BuildxBuilder);

impl Builder {
    fn create(berthd: &Berthd) -> Self {
        Builder(BuildxBuilder::create("berth-attest", berthd.socket()))
    }

    /// `docker buildx build` with `args` on `dir`; `no_default` sets
    /// `BUILDX_NO_DEFAULT_ATTESTATIONS=1`.
    fn build(&self, args: &[&str], dir: &Path, no_default: bool) -> std::process::Output {
        let mut cmd = Command::new("docker");
        cmd.args([
            "buildx",
            "build",
            "--builder",
            self.0.name(),
            "--progress",
            "plain",
        ])
        .args(args)
        .arg(dir);
        if no_default {
            cmd.env("BUILDX_NO_DEFAULT_ATTESTATIONS", "1");
        } else {
            cmd.env_remove("BUILDX_NO_DEFAULT_ATTESTATIONS");
        }
        cmd.output().unwrap()
    }
}

fn succeeded(out: &std::process::Output, what: &str, berthd: &Berthd) {
    assert!(
        out.status.success(),
        "buildx build {what}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        berthd.log_text()
    );
}

fn blob_json(registry: &Registry, digest: &str) -> Value {
    serde_json::from_slice(&registry.stored_blob(digest)).unwrap()
}

/// The digest a tag points at, as the registry's filesystem driver stored it.
fn tag_digest(registry: &Registry, repo: &str, tag: &str) -> String {
    let link = registry
        .storage_dir()
        .join("docker/registry/v2/repositories")
        .join(repo)
        .join("_manifests/tags")
        .join(tag)
        .join("current/link");
    std::fs::read_to_string(&link)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", link.display(), registry.log_tail()))
}

/// Checks an index of one image and its attestation manifest, as buildkitd pushes it; returns
/// the image manifest's config digest and the in-toto statements by predicate type.
fn check_index(
    index: &Value,
    blob: &dyn Fn(&str) -> Value,
    want_types: &[&str],
) -> (String, BTreeMap<String, Value>, String) {
    assert_eq!(
        index["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{index}"
    );
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 2, "{index}");
    let (image, att) = (&manifests[0], &manifests[1]);
    assert_eq!(
        image["mediaType"], "application/vnd.oci.image.manifest.v1+json",
        "{index}"
    );
    assert_eq!(image["platform"]["os"], "linux", "{index}");
    assert_eq!(
        att["annotations"]["vnd.docker.reference.type"], "attestation-manifest",
        "{index}"
    );
    assert_eq!(
        att["annotations"]["vnd.docker.reference.digest"], image["digest"],
        "{index}"
    );
    assert_eq!(att["platform"]["os"], "unknown", "{index}");
    assert_eq!(att["platform"]["architecture"], "unknown", "{index}");
    let image_digest = image["digest"].as_str().unwrap().to_string();
    let config = blob(&image_digest)["config"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let att_manifest = blob(att["digest"].as_str().unwrap());
    let mut types = vec![];
    let mut statements = BTreeMap::new();
    for l in att_manifest["layers"].as_array().unwrap() {
        assert_eq!(
            l["mediaType"], "application/vnd.in-toto+json",
            "{att_manifest}"
        );
        let ty = l["annotations"]["in-toto.io/predicate-type"]
            .as_str()
            .unwrap()
            .to_string();
        let stmt = blob(l["digest"].as_str().unwrap());
        assert_eq!(stmt["predicateType"], ty.as_str(), "{stmt}");
        // The statement is about the image manifest.
        let sha = image_digest.strip_prefix("sha256:").unwrap();
        assert!(
            stmt["subject"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["digest"]["sha256"] == sha),
            "{stmt}"
        );
        types.push(ty.clone());
        statements.insert(ty, stmt);
    }
    assert_eq!(types, want_types, "{att_manifest}");
    (config, statements, image_digest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buildx_sbom_and_provenance_push_carry_attestation_manifests() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let registry = Registry::start().unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let tmp = tempfile::tempdir().unwrap();

    // the SBOM generator, pushed to the test registry (buildx's default one is on Docker Hub)
    let scanner_dir = tmp.path().join("scanner");
    write(&scanner_dir, "scan.sh", SCAN_SH);
    write(
        &scanner_dir,
        "Dockerfile",
        &format!(
            "FROM {}\nCOPY scan.sh /scan.sh\nCMD [\"sh\", \"/scan.sh\"]\n",
            base.reference()
        ),
    );
    let scanner = format!(
        "{}/{}:v1",
        registry.addr(),
        unique_name("berth-test/attest-scanner")
    );
    let push = Output::Raw(
        "image".into(),
        BTreeMap::from([
            ("name".to_string(), scanner.clone()),
            ("push".to_string(), "true".to_string()),
        ]),
    );
    ok(
        &dockerfile_build(&berthd, &scanner_dir, &[], push).await,
        &berthd,
    );
    // the push registered it in Docker too
    let _scanner_img = TestImage::adopt(&engine, &scanner).await.unwrap();

    let dir = tmp.path().join("ctx");
    write(
        &dir,
        "Dockerfile",
        &format!(
            "FROM {}\nRUN echo \"hi buildx\" > /hi\nCMD [\"cat\", \"/hi\"]\n",
            base.reference()
        ),
    );
    let builder = Builder::create(&berthd);
    let repo = unique_name("berth-test/attest-pushed");
    let sbom_arg = format!("--sbom=generator={scanner}");
    for (tag, args, want) in [
        ("sbom", vec![sbom_arg.as_str()], vec![SPDX, SLSA]),
        ("max", vec!["--provenance=mode=max"], vec![SLSA]),
    ] {
        let name = format!("{}/{repo}:{tag}", registry.addr());
        let mut all = args.clone();
        all.extend(["--push", "-t", name.as_str()]);
        succeeded(&builder.build(&all, &dir, false), tag, &berthd);
        let _img = TestImage::adopt(&engine, &name).await.unwrap();
        let index = blob_json(&registry, &tag_digest(&registry, &repo, tag));
        let (config, statements, _) =
            check_index(&index, &|d: &str| blob_json(&registry, d), &want);
        if tag == "sbom" {
            let files = statements[SPDX]["predicate"]["files"].as_str().unwrap();
            assert!(files.split(' ').any(|f| f == "hi"), "{files}");
        }
        let slsa = &statements[SLSA]["predicate"];
        assert_eq!(slsa["buildType"], "https://mobyproject.org/buildkit@v1");
        // mode=max records the build's steps; the default (min) does not
        assert_eq!(
            slsa["buildConfig"].is_object(),
            tag == "max",
            "{}",
            statements[SLSA]
        );

        // the image landed in Docker too, with the config the index names
        let inspect = engine.inspect_image(&name).await.unwrap();
        assert_eq!(inspect.id.as_deref(), Some(config.as_str()));
        let run = engine.run(&name, &[]).await.unwrap();
        run.assert_success();
        assert_eq!(run.stdout.trim_end(), "hi buildx");

        // what `docker buildx imagetools inspect` makes of it
        let out = Command::new("docker")
            .args(["buildx", "imagetools", "inspect", &name, "--format"])
            .arg("{{json .Provenance}}")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "imagetools inspect: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let prov: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            prov["SLSA"]["buildType"], "https://mobyproject.org/buildkit@v1",
            "{prov}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buildx_default_provenance_keeps_image_ids() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ctx");
    write(
        &dir,
        "Dockerfile",
        &format!(
            "FROM {}\nRUN echo \"hi buildx\" > /hi\nCMD [\"cat\", \"/hi\"]\n",
            base.reference()
        ),
    );
    let builder = Builder::create(&berthd);
    let repo = unique_name("berth-test/attest-default");
    let mut ids = vec![];
    for (i, (output, no_default)) in [
        ("--output=type=image,name={NAME}", false),
        ("--output=type=image,name={NAME}", true),
        ("--load", false),
        ("--load", true),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("{repo}:{i}");
        let out = builder.build(
            &[output.replace("{NAME}", &name).as_str(), "-t", &name],
            &dir,
            no_default,
        );
        succeeded(&out, output, &berthd);
        let _img = TestImage::adopt(&engine, &name).await.unwrap();
        let run = engine.run(&name, &[]).await.unwrap();
        run.assert_success();
        assert_eq!(run.stdout.trim_end(), "hi buildx");
        ids.push(engine.inspect_image(&name).await.unwrap().id.unwrap());
    }
    // with and without the default provenance: the same image
    assert!(ids.iter().all(|id| id == &ids[0]), "{ids:?}");

    // buildx asks for a ref map with a non-default attestation; `docker` refuses it as
    // buildkitd v0.11.6 does
    let out = builder.build(&["--provenance=mode=max", "--load"], &dir, false);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("docker exporter does not currently support exporting manifest lists"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_archive_with_attestations_is_an_index_docker_loads() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ctx");
    write(
        &dir,
        "Dockerfile",
        &format!(
            "FROM {}\nRUN echo \"hi docker\" > /hi\nCMD [\"cat\", \"/hi\"]\n",
            base.reference()
        ),
    );
    let name = format!("{}:1", unique_name("berth-test/attest-dtar"));
    let mut image_ids = vec![];
    for (i, attest) in ["mode=max", "mode=min,inline-only=true"].iter().enumerate() {
        let tar = tmp.path().join(format!("out{i}.tar"));
        let attrs = BTreeMap::from([("name".to_string(), name.clone())]);
        let report = dockerfile_build(
            &berthd,
            &dir,
            &[("attest:provenance", attest)],
            Output::Docker(tar.clone(), attrs),
        )
        .await;
        let response = ok(&report, &berthd);
        let root = tmp.path().join(format!("out{i}"));
        std::fs::create_dir_all(&root).unwrap();
        let st = Command::new("tar")
            .arg("-xf")
            .arg(&tar)
            .arg("-C")
            .arg(&root)
            .status()
            .unwrap();
        assert!(st.success());
        let read = |rel: &str| -> Value {
            serde_json::from_slice(&std::fs::read(root.join(rel)).unwrap()).unwrap()
        };
        let blob = |d: &str| {
            read(&format!(
                "blobs/sha256/{}",
                d.strip_prefix("sha256:").unwrap()
            ))
        };
        let layout = read("index.json");
        let top = &layout["manifests"][0];
        assert_eq!(
            top["annotations"]["io.containerd.image.name"],
            format!("docker.io/{name}"),
            "{layout}"
        );
        assert_eq!(
            response.get("containerimage.digest").map(String::as_str),
            top["digest"].as_str()
        );
        let manifest_json = read("manifest.json");
        let entry = &manifest_json[0];
        assert_eq!(entry["RepoTags"][0], name.as_str(), "{manifest_json}");
        let config = if i == 0 {
            // mode=max: an index of the image and its provenance
            let (config, statements, _) =
                check_index(&blob(top["digest"].as_str().unwrap()), &blob, &[SLSA]);
            assert!(statements[SLSA]["predicate"]["buildConfig"].is_object());
            config
        } else {
            // inline-only: left out, a plain image
            assert_eq!(
                top["mediaType"], "application/vnd.docker.distribution.manifest.v2+json",
                "{layout}"
            );
            blob(top["digest"].as_str().unwrap())["config"]["digest"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(
            entry["Config"],
            format!("blobs/sha256/{}", config.strip_prefix("sha256:").unwrap())
        );
        let load = Command::new("docker")
            .arg("load")
            .arg("-i")
            .arg(&tar)
            .output()
            .unwrap();
        assert!(
            load.status.success(),
            "docker load: {}",
            String::from_utf8_lossy(&load.stderr)
        );
        let _img = TestImage::adopt(&engine, &name).await.unwrap();
        let id = engine.inspect_image(&name).await.unwrap().id.unwrap();
        assert_eq!(id, config);
        let run = engine.run(&name, &[]).await.unwrap();
        run.assert_success();
        assert_eq!(run.stdout.trim_end(), "hi docker");
        image_ids.push(id);
    }
    assert_eq!(image_ids[0], image_ids[1]);
}
