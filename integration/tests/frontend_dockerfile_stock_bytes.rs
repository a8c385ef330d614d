//! Image bytes equal to stock buildkitd v0.11.6's (issue #11): the same Dockerfile and context
//! (fixed mtimes) with `SOURCE_DATE_EPOCH` gives the same image config (so the same image ID),
//! manifest, `index.json` and `manifest.json`. The pinned digests were taken from stock
//! buildkitd v0.11.6 (fresh root, `buildctl build --frontend dockerfile.v0 --opt
//! build-arg:SOURCE_DATE_EPOCH=1700000000 --output
//! type=oci,name=example.com/cmp/pinned:latest,compression=uncompressed,force-compression=true`)
//! on linux/amd64, and `type=docker` with the same attributes; see the ids11 helper note for the
//! comparison table.
//! Needs root, runc, overlayfs and the system Docker Engine.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use integration::buildkit_client::{dockerfile_build, Berthd, Output};
use integration::require_root;
use integration::tar_files;
use sha2::{Digest as _, Sha256};

/// Stock's config digest (the image ID) for the Dockerfile below.
const STOCK_CONFIG: &str =
    "sha256:ee25dbf5fd602f9c9b8f394c2ba02e0d96bd80ad343c3372e1f2839d8f377b96";
/// Stock's manifest digest (uncompressed layers).
const STOCK_MANIFEST: &str =
    "sha256:b00278d317c437ba2537c3e821266048b6a98e5d1501a917cff10415cc096efa";
/// sha256 of stock's `index.json`.
const STOCK_INDEX_JSON: &str = "78de36710a74ac837312b12ce4f192154785ac5efce31f749622fc591631b59e";
/// sha256 of stock's `manifest.json`.
const STOCK_MANIFEST_JSON: &str =
    "1a0b25c4a8eb1ab95023485c5451aec50de6e9325dae5d83f805b6a93e32394a";

const DOCKERFILE: &str = r#"FROM scratch
COPY a.txt /a.txt
COPY dir /dir
ENV A=1 B="two words"
LABEL org.example.k="v <&>"
USER 1000:1000
EXPOSE 8080/tcp
STOPSIGNAL SIGTERM
ENTRYPOINT ["/a.txt"]
CMD ["--flag"]
"#;

/// Stock's manifest digest for `type=docker` with uncompressed layers (what berth's docker
/// archive always carries; stock: `compression=uncompressed,force-compression=true`).
const STOCK_DOCKER_MANIFEST: &str =
    "sha256:899e5b0ebee638850f91e46cfdb68e209d8b62a6417cd3f0b6b994d03b92b31d";
/// sha256 of that archive's `index.json` and `manifest.json`.
const STOCK_DOCKER_INDEX_JSON: &str =
    "4c3647b6dd5b0a559dc65daa175f12ae6f784c34ba3d95d220ef85cfb243ac50";
const STOCK_DOCKER_MANIFEST_JSON: &str =
    "e7c1e76f995577382f7453b5fb607d9e9776ec95c50c80bbdab50e686aa7a1e6";

/// sha256 of stock's whole `type=oci` tar (uncompressed) and `type=docker` tar (uncompressed):
/// the tar framing too (entry order, modes, ustar headers as Go writes them).
const STOCK_OCI_TAR: &str = "597861dcb8ed7f0454f06c3ea19f4a2ad647a4d96a0c2d80e0fb3d806e0aa9ce";
const STOCK_DOCKER_TAR: &str = "1bd84cd8a16dde0de41194a3b21ec3b0cc64606803fe1f9bff3c1b9646cca5e4";

/// The build context, every entry with mode and mtime fixed (COPY keeps them).
fn context(dir: &Path) {
    std::fs::create_dir_all(dir.join("dir/sub")).unwrap();
    for (p, data) in [
        ("Dockerfile", DOCKERFILE),
        ("a.txt", "alpha\n"),
        ("dir/d", "dee\n"),
        ("dir/sub/c", "sea\n"),
    ] {
        std::fs::write(dir.join(p), data).unwrap();
    }
    for (p, mode) in [
        ("Dockerfile", "644"),
        ("a.txt", "644"),
        ("dir/d", "644"),
        ("dir/sub/c", "644"),
        ("dir/sub", "755"),
        ("dir", "755"),
    ] {
        let path = dir.join(p);
        let ok = Command::new("chmod").arg(mode).arg(&path).status().unwrap();
        assert!(ok.success(), "chmod {}", path.display());
        let ok = Command::new("touch")
            .args(["-h", "-d", "@1600000000"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(ok.success(), "touch {}", path.display());
    }
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn blob<'a>(files: &'a BTreeMap<String, Vec<u8>>, digest: &str) -> &'a [u8] {
    let d = digest.strip_prefix("sha256:").unwrap();
    files
        .get(&format!("blobs/sha256/{d}"))
        .unwrap_or_else(|| panic!("blob {d} missing from the archive"))
}

async fn build(
    berthd: &Berthd,
    ctx: &Path,
    attrs: &[(&str, &str)],
    output: Output,
) -> BTreeMap<String, String> {
    let report = dockerfile_build(berthd, ctx, attrs, output).await;
    match report.solve {
        Ok(r) => r.exporter_response.into_iter().collect(),
        Err(e) => panic!("solve failed: {e:?}\n{}", berthd.log_text()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_and_docker_exports_match_stock_bytes() {
    require_root();
    if std::env::consts::ARCH != "x86_64" {
        eprintln!("skipped: the pinned stock digests are for linux/amd64");
        return;
    }
    let berthd = Berthd::start(&[]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    context(&ctx);
    let epoch = [("build-arg:SOURCE_DATE_EPOCH", "1700000000")];

    // type=oci, uncompressed: every document byte-identical to stock's.
    let out = tmp.path().join("oci.tar");
    let attrs = BTreeMap::from([
        (
            "name".to_string(),
            "example.com/cmp/pinned:latest".to_string(),
        ),
        ("compression".to_string(), "uncompressed".to_string()),
    ]);
    let resp = build(&berthd, &ctx, &epoch, Output::Oci(out.clone(), attrs)).await;
    let files = tar_files(&out);
    let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let desc = &index["manifests"][0];
    assert_eq!(
        desc["platform"],
        serde_json::json!({"architecture": "amd64", "os": "linux"}),
        "index.json descriptor: {index}"
    );
    let manifest_digest = desc["digest"].as_str().unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(blob(&files, manifest_digest)).unwrap();
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let config = blob(&files, config_digest);
    let cfg: serde_json::Value = serde_json::from_slice(config).unwrap();
    // The build information stock writes: the frontend, no sources for FROM scratch.
    let bi = base64::engine::general_purpose::STANDARD
        .decode(cfg["moby.buildkit.buildinfo.v1"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        std::str::from_utf8(&bi).unwrap(),
        r#"{"frontend":"dockerfile.v0"}"#
    );
    assert_eq!(
        config_digest,
        STOCK_CONFIG,
        "config differs from stock's: {}",
        String::from_utf8_lossy(config)
    );
    assert_eq!(manifest_digest, STOCK_MANIFEST, "manifest: {manifest}");
    assert_eq!(
        sha256_hex(&files["index.json"]),
        STOCK_INDEX_JSON,
        "{index}"
    );
    assert_eq!(
        sha256_hex(&files["manifest.json"]),
        STOCK_MANIFEST_JSON,
        "manifest.json: {}",
        String::from_utf8_lossy(&files["manifest.json"])
    );
    assert_eq!(
        sha256_hex(&std::fs::read(&out).unwrap()),
        STOCK_OCI_TAR,
        "the oci tar's framing differs from stock's"
    );
    assert_eq!(
        resp.get("containerimage.digest").map(String::as_str),
        Some(STOCK_MANIFEST)
    );
    assert_eq!(
        resp.get("containerimage.config.digest").map(String::as_str),
        Some(STOCK_CONFIG)
    );

    // type=docker: the same image ID, and the archive's documents are those stock writes with
    // uncompressed layers (berth's docker archive always has them; stock's default is gzip).
    let out = tmp.path().join("docker.tar");
    let attrs = BTreeMap::from([(
        "name".to_string(),
        "example.com/cmp/pinned:latest".to_string(),
    )]);
    let resp = build(&berthd, &ctx, &epoch, Output::Docker(out.clone(), attrs)).await;
    assert_eq!(
        resp.get("containerimage.config.digest").map(String::as_str),
        Some(STOCK_CONFIG)
    );
    let files = tar_files(&out);
    let docker_manifest: serde_json::Value =
        serde_json::from_slice(&files["manifest.json"]).unwrap();
    assert_eq!(
        docker_manifest[0]["Config"],
        format!(
            "blobs/sha256/{}",
            STOCK_CONFIG.strip_prefix("sha256:").unwrap()
        )
    );
    sha256_matches(blob(&files, STOCK_CONFIG), STOCK_CONFIG);
    assert_eq!(
        resp.get("containerimage.digest").map(String::as_str),
        Some(STOCK_DOCKER_MANIFEST)
    );
    sha256_matches(blob(&files, STOCK_DOCKER_MANIFEST), STOCK_DOCKER_MANIFEST);
    assert_eq!(sha256_hex(&files["index.json"]), STOCK_DOCKER_INDEX_JSON);
    assert_eq!(
        sha256_hex(&std::fs::read(&out).unwrap()),
        STOCK_DOCKER_TAR,
        "the docker tar's framing differs from stock's"
    );
    assert_eq!(
        sha256_hex(&files["manifest.json"]),
        STOCK_DOCKER_MANIFEST_JSON,
        "{docker_manifest}"
    );

    // buildinfo=false (exporter attribute) leaves the field out, as stock does.
    let out = tmp.path().join("nobi.tar");
    let attrs = BTreeMap::from([
        ("compression".to_string(), "uncompressed".to_string()),
        ("buildinfo".to_string(), "false".to_string()),
    ]);
    let resp = build(&berthd, &ctx, &epoch, Output::Oci(out.clone(), attrs)).await;
    let digest = resp["containerimage.config.digest"].clone();
    assert_ne!(digest, STOCK_CONFIG);
    let files = tar_files(&out);
    let cfg: serde_json::Value = serde_json::from_slice(blob(&files, &digest)).unwrap();
    assert!(
        cfg.get("moby.buildkit.buildinfo.v1").is_none(),
        "buildinfo=false kept the field: {cfg}"
    );
    assert_eq!(cfg["config"]["User"], "1000:1000");

    // A bad value is refused, naming the attribute.
    let out = tmp.path().join("bad.tar");
    let attrs = BTreeMap::from([("buildinfo".to_string(), "maybe".to_string())]);
    let report = dockerfile_build(&berthd, &ctx, &epoch, Output::Oci(out, attrs)).await;
    let err = report.solve.expect_err("buildinfo=maybe accepted");
    assert!(err.message().contains("buildinfo"), "{err:?}");
}

fn sha256_matches(bytes: &[u8], digest: &str) {
    assert_eq!(format!("sha256:{}", sha256_hex(bytes)), digest);
}

/// Stock's pushed index for the Dockerfile above built for linux/amd64 and linux/arm64 with
/// uncompressed layers (a Docker manifest list; its amd64 child is [`STOCK_DOCKER_MANIFEST`]).
const STOCK_PUSHED_INDEX: &str =
    "sha256:021d27e0f62b85694946cda20390a99531c2adbde867a979c916ed9a3a2f27a5";
/// Its linux/arm64 child manifest.
const STOCK_PUSHED_ARM64: &str =
    "sha256:85fb50281be9e4cb26467d99f00cbfa9ea92480535fdb11d6801acc3a52a436b";

/// Removes the names a push registered in the system Docker Engine.
struct RemoveNames(Vec<String>);
impl Drop for RemoveNames {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("docker").args(["rmi", "-f", n]).output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_manifests_and_index_match_stock_bytes() {
    require_root();
    if std::env::consts::ARCH != "x86_64" {
        eprintln!("skipped: the pinned stock digests are for linux/amd64");
        return;
    }
    let registry = integration::Registry::start().unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    context(&ctx);
    let repo = integration::unique_name("berth-test/stock-bytes");
    let single = format!("{}/{repo}:single", registry.addr());
    let multi = format!("{}/{repo}:multi", registry.addr());
    let _cleanup = RemoveNames(vec![single.clone(), multi.clone()]);
    let push = |name: &str| {
        BTreeMap::from([
            ("name".to_string(), name.to_string()),
            ("push".to_string(), "true".to_string()),
            ("compression".to_string(), "uncompressed".to_string()),
        ])
    };

    // One platform: the pushed manifest is stock's, byte for byte (indented as Go writes it).
    let epoch = [("build-arg:SOURCE_DATE_EPOCH", "1700000000")];
    let resp = build(
        &berthd,
        &ctx,
        &epoch,
        Output::Raw("image".into(), push(&single)),
    )
    .await;
    assert_eq!(resp["containerimage.digest"], STOCK_DOCKER_MANIFEST);
    assert_eq!(resp["containerimage.config.digest"], STOCK_CONFIG);
    let stored = registry.stored_blob(STOCK_DOCKER_MANIFEST);
    sha256_matches(&stored, STOCK_DOCKER_MANIFEST);
    assert!(
        stored.starts_with(b"{\n  \"mediaType\": "),
        "{}",
        String::from_utf8_lossy(&stored)
    );

    // Two platforms: the index and both child manifests are stock's.
    let attrs = [
        ("build-arg:SOURCE_DATE_EPOCH", "1700000000"),
        ("platform", "linux/amd64,linux/arm64"),
    ];
    let resp = build(
        &berthd,
        &ctx,
        &attrs,
        Output::Raw("image".into(), push(&multi)),
    )
    .await;
    assert_eq!(resp["containerimage.digest"], STOCK_PUSHED_INDEX);
    let index = registry.stored_blob(STOCK_PUSHED_INDEX);
    sha256_matches(&index, STOCK_PUSHED_INDEX);
    let index: serde_json::Value = serde_json::from_slice(&index).unwrap();
    let children: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["digest"].as_str().unwrap())
        .collect();
    assert_eq!(children, [STOCK_DOCKER_MANIFEST, STOCK_PUSHED_ARM64]);
    sha256_matches(
        &registry.stored_blob(STOCK_PUSHED_ARM64),
        STOCK_PUSHED_ARM64,
    );
}
