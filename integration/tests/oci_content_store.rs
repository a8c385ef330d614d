//! `--output type=oci,tar=false` and `type=docker,tar=false` through berthd's gRPC API: the image's
//! blobs go into the client's content store `export` over the session (the test client serves
//! `containerd.services.content.v1.Content` on an OCI layout directory, as buildctl and BuildKit's
//! Go client do for an output directory), as buildkitd v0.11.6 writes them:
//!
//! - every blob written is named by its digest and is byte-identical to the same blob in the
//!   tar the same build streams with `tar=true` (as upstream's TestOCIExporterContentStore checks);
//! - the manifest named by `containerimage.digest` is there, with its config and every layer
//!   (gzip layers decompress to the config's diffIDs);
//! - the manifest is committed last, after everything it names;
//! - exporting again into the same directory writes nothing (the store has every blob);
//! - a session without a content store gets a clear error and nothing is written.
//!
//! Needs root, runc, overlayfs and the system Docker Engine (busybox base).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};

use integration::buildkit_client::{Berthd, BuildOptions, BuildkitClient, Output};
use integration::tar_files;
use integration::{busybox_image, require_root, DockerEngine};
use llb::RunOpts;
use sha2::{Digest as _, Sha256};

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Every file under `dir`, by path relative to it.
fn dir_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn blob<'a>(files: &'a BTreeMap<String, Vec<u8>>, digest: &str) -> &'a [u8] {
    let p = format!("blobs/sha256/{}", digest.strip_prefix("sha256:").unwrap());
    files
        .get(&p)
        .unwrap_or_else(|| panic!("no {p} among {:?}", files.keys().collect::<Vec<_>>()))
}

async fn build(
    client: &BuildkitClient,
    berthd: &Berthd,
    def: &protos::pb::Definition,
    output: Output,
    stores: BTreeMap<String, std::path::PathBuf>,
) -> (
    Result<BTreeMap<String, String>, tonic::Status>,
    Vec<(String, String)>,
) {
    let writes = Arc::new(Mutex::new(vec![]));
    let report = client
        .build(BuildOptions {
            definition: Some(def.clone()),
            output,
            content_stores: stores,
            content_writes: writes.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("build: {e:#}\n{}", berthd.log_text()));
    let w = writes.lock().unwrap().clone();
    (report.solve.map(|r| r.exporter_response), w)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tar_false_writes_the_image_blobs_into_the_clients_content_store() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let client = berthd.client().await.unwrap();
    // The base layer from Docker's store and two steps of the build's own.
    let def = llb::State::from(llb::image(base.reference()))
        .run(RunOpts::shell("echo -n first > /foo"))
        .root()
        .run(RunOpts::shell(
            "echo -n second > /bar && head -c 200000 /bin/busybox > /blob",
        ))
        .root()
        .marshal()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();

    for exp in ["oci", "docker"] {
        let name = "example.com/berth/content-store:latest";
        let mut attrs = BTreeMap::new();
        attrs.insert("name".to_string(), name.to_string());
        let tar_path = tmp.path().join(format!("{exp}.tar"));
        let out = if exp == "oci" {
            Output::Oci(tar_path.clone(), attrs.clone())
        } else {
            Output::Docker(tar_path.clone(), attrs.clone())
        };
        let (tar_resp, _) = build(&client, &berthd, &def, out, BTreeMap::new()).await;
        let tar_resp = tar_resp.unwrap_or_else(|e| panic!("{exp} tar: {e}\n{}", berthd.log_text()));

        let dir = tmp.path().join(format!("{exp}.d"));
        std::fs::create_dir_all(&dir).unwrap();
        let stores: BTreeMap<_, _> = [("export".to_string(), dir.clone())].into();
        attrs.insert("tar".to_string(), "false".to_string());
        let (resp, writes) = build(
            &client,
            &berthd,
            &def,
            Output::Raw(exp.to_string(), attrs.clone()),
            stores.clone(),
        )
        .await;
        let resp = resp.unwrap_or_else(|e| panic!("{exp} tar=false: {e}\n{}", berthd.log_text()));
        // The same image as the tar's (the second build is cached), so the same answer.
        for k in [
            "containerimage.digest",
            "containerimage.config.digest",
            "image.name",
        ] {
            assert_eq!(resp.get(k), tar_resp.get(k), "{exp}: {k}: {resp:?}");
        }
        assert_eq!(resp["image.name"], name);
        let desc: serde_json::Value =
            serde_json::from_slice(&base64_decode(&resp["containerimage.descriptor"])).unwrap();
        assert_eq!(desc["digest"], resp["containerimage.digest"].as_str());

        // Only blobs (nothing left in ingest/), each named by its digest and identical to the
        // tar's file of the same name.
        let files = dir_files(&dir);
        let tar = tar_files(&tar_path);
        assert!(files.len() >= 5, "{exp}: {:?}", files.keys());
        for (p, data) in &files {
            let hex = p
                .strip_prefix("blobs/sha256/")
                .unwrap_or_else(|| panic!("{exp}: unexpected file {p} in the store"));
            assert_eq!(sha256(data), format!("sha256:{hex}"), "{exp}: {p}");
            assert_eq!(tar.get(p), Some(data), "{exp}: {p} differs from the tar's");
        }
        // The manifest, its config and every layer; the manifest is committed last.
        let manifest_digest = resp["containerimage.digest"].clone();
        let manifest: serde_json::Value =
            serde_json::from_slice(blob(&files, &manifest_digest)).unwrap();
        let config_digest = manifest["config"]["digest"].as_str().unwrap().to_string();
        assert_eq!(config_digest, resp["containerimage.config.digest"]);
        let config: serde_json::Value =
            serde_json::from_slice(blob(&files, &config_digest)).unwrap();
        let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), diff_ids.len(), "{exp}: {manifest}");
        assert_eq!(layers.len(), 3, "{exp}: base + two steps: {manifest}");
        for (l, diff_id) in layers.iter().zip(diff_ids) {
            let data = blob(&files, l["digest"].as_str().unwrap());
            assert_eq!(l["size"].as_u64(), Some(data.len() as u64));
            let plain = match l["mediaType"].as_str().unwrap() {
                "application/vnd.oci.image.layer.v1.tar+gzip" => {
                    let mut v = vec![];
                    flate2::read::GzDecoder::new(data)
                        .read_to_end(&mut v)
                        .unwrap();
                    v
                }
                "application/vnd.docker.image.rootfs.diff.tar" => data.to_vec(),
                other => panic!("{exp}: layer media type {other}"),
            };
            assert_eq!(sha256(&plain), diff_id.as_str().unwrap(), "{exp}: {l}");
        }
        let written: Vec<&str> = writes.iter().map(|(_, d)| d.as_str()).collect();
        assert!(
            writes.iter().all(|(s, _)| s == "export"),
            "{exp}: {writes:?}"
        );
        assert_eq!(written.len(), files.len(), "{exp}: {writes:?}");
        assert_eq!(written.last(), Some(&manifest_digest.as_str()), "{exp}");

        // Again into the same store: it has every blob, nothing is written.
        let (again, writes) = build(
            &client,
            &berthd,
            &def,
            Output::Raw(exp.to_string(), attrs.clone()),
            stores,
        )
        .await;
        let again = again.unwrap_or_else(|e| panic!("{exp} again: {e}\n{}", berthd.log_text()));
        assert_eq!(again["containerimage.digest"], manifest_digest);
        assert!(writes.is_empty(), "{exp}: written again: {writes:?}");
        assert_eq!(dir_files(&dir), files, "{exp}");

        // A session serving no content store: a clear error.
        let (res, _) = build(
            &client,
            &berthd,
            &def,
            Output::Raw(exp.to_string(), attrs),
            BTreeMap::new(),
        )
        .await;
        let err = res.expect_err("tar=false without a content store must fail");
        assert!(
            err.message().contains("content store"),
            "{exp}: {}",
            err.message()
        );
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}
