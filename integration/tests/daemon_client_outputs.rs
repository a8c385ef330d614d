//! Image outputs streamed to the client through berthd's gRPC API (buildctl's protocol path):
//!
//! - `--output type=oci`: the OCI layout tar is checked blob by blob (every blob hashes to its
//!   name, each decompressed layer to the config's diffID, the base layer to Docker's), then
//!   imported with `ctr images import` into a private containerd and run there with `ctr run`
//!   (containerd re-checks diffIDs while unpacking), for gzip, zstd and uncompressed layers;
//! - `--output type=docker,thin=true` (and the `[exporter.docker] thin` config default): the
//!   archive carries only the layers the system dockerd lacks, and `docker load` of it into that
//!   dockerd gives a runnable image with the build's image ID;
//! - `type=docker` archives are OCI image layouts too (as buildkitd's), and both formats tell the
//!   client the digests in the stream's `exporter-md-*` headers before any byte; a client that
//!   declines the target (`AlreadyExists`) still gets the exporter response.
//!
//! Needs root, runc, overlayfs, containerd/ctr and the system Docker Engine.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use integration::buildkit_client::{Berthd, BuildOptions, BuildReport, Output};
use integration::tar_files;
use integration::{busybox_image, require_root, unique_name, DockerEngine};
use llb::RunOpts;
use sha2::{Digest as _, Sha256};

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Decompresses with the system tool (`gzip -dc` / `zstd -dc`).
fn decompress(tool: &str, data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new(tool)
        .arg("-dc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "{tool} -dc failed");
    out.stdout
}

fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b).unwrap()
}

fn statuses(r: &BuildReport) -> Vec<String> {
    r.vertex_statuses().into_iter().map(|s| s.id).collect()
}

/// Checks the layout in `path` against the exporter response and the base image's diffIDs;
/// returns (manifest, config) JSON.
fn check_layout(
    path: &Path,
    resp: &BTreeMap<String, String>,
    name: &str,
    layer_type: &str,
    base_diff_ids: &[String],
) -> (serde_json::Value, serde_json::Value) {
    let files = tar_files(path);
    assert_eq!(
        json(&files["oci-layout"]),
        serde_json::json!({"imageLayoutVersion": "1.0.0"})
    );
    for (p, data) in &files {
        if let Some(hex) = p.strip_prefix("blobs/sha256/") {
            assert_eq!(sha256(data), format!("sha256:{hex}"), "blob {p}");
        }
    }
    let blob = |d: &str| {
        files
            .get(&format!(
                "blobs/sha256/{}",
                d.strip_prefix("sha256:").unwrap()
            ))
            .unwrap_or_else(|| panic!("blob {d} missing"))
    };
    let index = json(&files["index.json"]);
    assert_eq!(index["schemaVersion"], 2);
    let m = &index["manifests"][0];
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(
        m["digest"].as_str(),
        resp.get("containerimage.digest").map(|s| s.as_str())
    );
    let (repo, tag) = name.rsplit_once(':').unwrap();
    assert_eq!(
        m["annotations"]["io.containerd.image.name"],
        format!("docker.io/{repo}:{tag}")
    );
    assert_eq!(m["annotations"]["org.opencontainers.image.ref.name"], tag);
    assert!(m["annotations"]["org.opencontainers.image.created"].is_string());
    let manifest_bytes = blob(m["digest"].as_str().unwrap());
    assert_eq!(m["size"].as_u64(), Some(manifest_bytes.len() as u64));
    let manifest = json(manifest_bytes);
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        manifest["config"]["digest"].as_str(),
        resp.get("containerimage.config.digest").map(|s| s.as_str())
    );
    let config = json(blob(manifest["config"]["digest"].as_str().unwrap()));
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), diff_ids.len());
    assert!(diff_ids.len() > base_diff_ids.len());
    assert_eq!(&diff_ids[..base_diff_ids.len()], base_diff_ids);
    for (l, diff_id) in layers.iter().zip(&diff_ids) {
        assert_eq!(l["mediaType"], layer_type);
        let data = blob(l["digest"].as_str().unwrap());
        assert_eq!(l["size"].as_u64(), Some(data.len() as u64));
        let plain = match layer_type.rsplit_once('+').map(|(_, c)| c) {
            Some("gzip") => decompress("gzip", data),
            Some("zstd") => decompress("zstd", data),
            _ => data.clone(),
        };
        assert_eq!(&sha256(&plain), diff_id, "layer {}", l["digest"]);
    }
    // containerimage.descriptor: base64 JSON of the manifest descriptor.
    use base64_decode::decode;
    let desc = json(&decode(&resp["containerimage.descriptor"]));
    assert_eq!(desc["digest"], m["digest"]);
    assert_eq!(desc["mediaType"], m["mediaType"]);
    (manifest, config)
}

/// Minimal standard base64 decoding for the descriptor (the integration crate has no base64 dep).
mod base64_decode {
    pub fn decode(s: &str) -> Vec<u8> {
        let val = |c: u8| -> u32 {
            match c {
                b'A'..=b'Z' => (c - b'A') as u32,
                b'a'..=b'z' => (c - b'a' + 26) as u32,
                b'0'..=b'9' => (c - b'0' + 52) as u32,
                b'+' => 62,
                b'/' => 63,
                _ => panic!("bad base64 byte {c}"),
            }
        };
        let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
        let mut out = Vec::new();
        for chunk in bytes.chunks(4) {
            let mut n = 0u32;
            for (i, &c) in chunk.iter().enumerate() {
                n |= val(c) << (18 - 6 * i);
            }
            for i in 0..chunk.len().saturating_sub(1) {
                out.push((n >> (16 - 8 * i)) as u8);
            }
        }
        out
    }
}

/// `ctr` against a private containerd (the one a [`integration::PrivateDockerd`] runs).
fn ctr(socket: &Path, args: &[&str]) -> String {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(socket)
        .args(["--namespace", "berth-oci-test"])
        .args(args)
        .output()
        .expect("ctr must be installed");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ctr {args:?}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_output_is_a_valid_layout_that_containerd_imports_and_runs() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let base_diff_ids = engine.image_layers(base.reference()).await.unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let client = berthd.client().await.unwrap();
    let def = llb::State::from(llb::image(base.reference()))
        .run(RunOpts::shell(
            "echo oci-layout > /made && head -c 300000 /bin/busybox > /blob",
        ))
        .root()
        .marshal()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dockerd =
        integration::PrivateDockerd::new(integration::PrivateDockerdOptions::default()).unwrap();
    let socket = dockerd.containerd_socket();

    let cases = [
        ("", "application/vnd.oci.image.layer.v1.tar+gzip"),
        ("zstd", "application/vnd.oci.image.layer.v1.tar+zstd"),
        ("uncompressed", "application/vnd.oci.image.layer.v1.tar"),
    ];
    let mut config_digest = None;
    for (i, (compression, layer_type)) in cases.iter().enumerate() {
        let name = format!("{}:c{i}", unique_name("berth-test/oci-output"));
        let path = dir.path().join(format!("image-{i}.tar"));
        let mut attrs = BTreeMap::new();
        attrs.insert("name".to_string(), name.clone());
        if !compression.is_empty() {
            attrs.insert("compression".to_string(), compression.to_string());
        }
        let report = client
            .build(BuildOptions {
                definition: Some(def.clone()),
                output: Output::Oci(path.clone(), attrs),
                ..Default::default()
            })
            .await
            .unwrap();
        let resp = &report
            .solve
            .as_ref()
            .unwrap_or_else(|e| panic!("solve failed: {e}\n{}", berthd.log_text()))
            .exporter_response;
        assert_eq!(
            resp.get("image.name"),
            Some(&format!("docker.io/{name}")),
            "{resp:?}"
        );
        check_layout(&path, resp, &name, layer_type, &base_diff_ids);
        // Compression changes the blobs, never the image config.
        let cd = resp["containerimage.config.digest"].clone();
        assert_eq!(config_digest.get_or_insert(cd.clone()), &cd);

        let names: Vec<String> = report.vertices().values().map(|v| v.name.clone()).collect();
        assert!(
            names.iter().any(|n| n == "exporting to oci image format"),
            "{names:?}"
        );
        let st = statuses(&report);
        for want in ["exporting layers", "sending tarball"] {
            assert!(st.iter().any(|s| s == want), "no {want:?} in {st:?}");
        }
        for want in ["exporting config sha256:", "exporting manifest sha256:"] {
            assert!(
                st.iter().any(|s| s.starts_with(want)),
                "no {want:?} in {st:?}"
            );
        }
        let cname = if compression.is_empty() {
            "gzip"
        } else {
            compression
        };
        assert!(
            st.iter()
                .any(|s| s.starts_with("layer sha256:") && s.contains(&format!("{cname} blob"))),
            "no per-layer size status in {st:?}"
        );

        // A real consumer: containerd imports the layout, unpacks it (checking diffIDs) and runs it.
        let out = ctr(&socket, &["images", "import", path.to_str().unwrap()]);
        assert!(out.contains(&format!("docker.io/{name}")), "{out}");
        let id = format!("berth-oci-{i}-{}", std::process::id());
        let out = ctr(
            &socket,
            &[
                "run",
                "--rm",
                &format!("docker.io/{name}"),
                &id,
                "cat",
                "/made",
            ],
        );
        assert_eq!(out.trim(), "oci-layout");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_output_attributes_follow_buildkitd() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let base_diff_ids = engine.image_layers(base.reference()).await.unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let client = berthd.client().await.unwrap();
    let def = llb::State::from(llb::image(base.reference()))
        .run(RunOpts::shell("echo attrs > /made"))
        .root()
        .marshal()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let build = |attrs: BTreeMap<String, String>, path: std::path::PathBuf| {
        let client = &client;
        let def = def.clone();
        async move {
            client
                .build(BuildOptions {
                    definition: Some(def),
                    output: Output::Oci(path, attrs),
                    ..Default::default()
                })
                .await
                .unwrap()
        }
    };
    let attrs = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };

    // oci-mediatypes=false: Docker schema 2 types, gzip layers.
    let path = dir.path().join("docker-types.tar");
    let r = build(
        attrs(&[("oci-mediatypes", "false"), ("compression-level", "1")]),
        path.clone(),
    )
    .await;
    let resp = &r.solve.as_ref().expect("solve").exporter_response;
    assert!(!resp.contains_key("image.name"));
    let files = tar_files(&path);
    let index = json(&files["index.json"]);
    let m = &index["manifests"][0];
    assert_eq!(
        m["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert!(m["annotations"].get("io.containerd.image.name").is_none());
    let manifest = json(
        &files[&format!(
            "blobs/sha256/{}",
            m["digest"]
                .as_str()
                .unwrap()
                .strip_prefix("sha256:")
                .unwrap()
        )],
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.docker.container.image.v1+json"
    );
    for l in manifest["layers"].as_array().unwrap() {
        assert_eq!(
            l["mediaType"],
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        );
    }
    assert_eq!(
        manifest["layers"].as_array().unwrap().len(),
        base_diff_ids.len() + 1
    );

    // source-date-epoch sets the created annotation.
    let path = dir.path().join("epoch.tar");
    let r = build(attrs(&[("source-date-epoch", "1700000000")]), path.clone()).await;
    r.solve.as_ref().expect("solve");
    let index = json(&tar_files(&path)["index.json"]);
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.created"],
        "2023-11-14T22:13:20Z"
    );

    // Bad attributes are refused before anything is sent, naming what was wrong.
    for (kv, code, needle) in [
        (("compression", "lz4"), tonic::Code::InvalidArgument, "lz4"),
        (
            ("compression", "estargz"),
            tonic::Code::InvalidArgument,
            "estargz",
        ),
        (
            ("compression-level", "x"),
            tonic::Code::InvalidArgument,
            "compression-level",
        ),
        (
            ("compression-level", "10"),
            tonic::Code::InvalidArgument,
            "out of range",
        ),
        (
            ("oci-mediatypes", "maybe"),
            tonic::Code::InvalidArgument,
            "oci-mediatypes",
        ),
        // A session that serves no content store (an output file, not a directory).
        (
            ("tar", "false"),
            tonic::Code::InvalidArgument,
            "tar=false needs the client's content store",
        ),
        (
            ("name", "Bad/Name"),
            tonic::Code::InvalidArgument,
            "lowercase",
        ),
    ] {
        let path = dir.path().join("bad.tar");
        let r = build(attrs(&[kv]), path).await;
        let err = r.solve.as_ref().expect_err("bad attribute accepted");
        assert_eq!(err.code(), code, "{kv:?}: {err}");
        assert!(err.message().contains(needle), "{kv:?}: {err}");
    }
}

/// Size of every layer tar a docker-archive carries (the `manifest.json` layers present as
/// files), their count, and the manifest's layer count.
fn docker_archive_layers(path: &Path) -> (u64, usize, usize) {
    let files = tar_files(path);
    let manifest = json(&files["manifest.json"]);
    let listed: Vec<&str> = manifest[0]["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    let mut carried: Vec<&str> = listed
        .iter()
        .copied()
        .filter(|l| files.contains_key(*l))
        .collect();
    carried.dedup();
    (
        carried.iter().map(|l| files[*l].len() as u64).sum(),
        carried.len(),
        listed.len(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_output_is_an_oci_layout_too_and_headers_carry_the_digests() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let base_diff_ids = engine.image_layers(base.reference()).await.unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let client = berthd.client().await.unwrap();
    let def = llb::State::from(llb::image(base.reference()))
        .run(RunOpts::shell("echo layout > /made"))
        .root()
        .marshal()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let name = format!("{}:1", unique_name("berth-test/docker-layout"));
    let build = |output: Output| {
        let client = &client;
        let def = def.clone();
        let berthd = &berthd;
        async move {
            let report = client
                .build(BuildOptions {
                    definition: Some(def),
                    output,
                    ..Default::default()
                })
                .await
                .unwrap();
            let resp = report
                .solve
                .as_ref()
                .unwrap_or_else(|e| panic!("solve failed: {e}\n{}", berthd.log_text()))
                .exporter_response
                .clone();
            (resp, report.exporter_md)
        }
    };
    let named = BTreeMap::from([("name".to_string(), name.clone())]);

    // The docker archive: manifest.json for docker load, and an OCI layout of the same image.
    let path = dir.path().join("docker.tar");
    let (resp, md) = build(Output::Docker(path.clone(), named.clone())).await;
    assert_eq!(resp["image.name"], format!("docker.io/{name}"));
    for k in [
        "containerimage.digest",
        "containerimage.config.digest",
        "containerimage.descriptor",
        "image.name",
    ] {
        assert_eq!(md.get(k), resp.get(k), "header {k}: {md:?} vs {resp:?}");
    }
    let files = tar_files(&path);
    assert_eq!(
        json(&files["oci-layout"]),
        serde_json::json!({"imageLayoutVersion": "1.0.0"})
    );
    for (p, data) in &files {
        if let Some(hex) = p.strip_prefix("blobs/sha256/") {
            assert_eq!(sha256(data), format!("sha256:{hex}"), "blob {p}");
        }
    }
    let index = json(&files["index.json"]);
    let m = &index["manifests"][0];
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(
        m["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        m["digest"].as_str(),
        Some(resp["containerimage.digest"].as_str())
    );
    assert_eq!(
        m["annotations"]["io.containerd.image.name"],
        format!("docker.io/{name}")
    );
    assert_eq!(m["annotations"]["org.opencontainers.image.ref.name"], "1");
    let blob = |d: &str| &files[&format!("blobs/sha256/{}", d.strip_prefix("sha256:").unwrap())];
    let manifest = json(blob(m["digest"].as_str().unwrap()));
    assert_eq!(
        manifest["config"]["digest"].as_str(),
        Some(resp["containerimage.config.digest"].as_str())
    );
    let config = json(blob(&resp["containerimage.config.digest"]));
    let diff_ids: Vec<&str> = config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert_eq!(&diff_ids[..base_diff_ids.len()], &base_diff_ids[..]);
    let layers: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    assert_eq!(
        layers, diff_ids,
        "uncompressed layers: blob digest = diffID"
    );
    let dm = json(&files["manifest.json"]);
    assert_eq!(dm.as_array().unwrap().len(), 1);
    assert_eq!(dm[0]["RepoTags"], serde_json::json!([name]));
    assert_eq!(
        dm[0]["Config"],
        format!(
            "blobs/sha256/{}",
            resp["containerimage.config.digest"]
                .strip_prefix("sha256:")
                .unwrap()
        )
    );
    let dm_layers: Vec<String> = diff_ids
        .iter()
        .map(|d| format!("blobs/sha256/{}", d.strip_prefix("sha256:").unwrap()))
        .collect();
    assert_eq!(dm[0]["Layers"], serde_json::json!(dm_layers));

    // containerimage.buildinfo: the sources of the result, images named as BuildKit does; an
    // image only Docker has (no registry digest) is pinned to its image ID.
    use base64_decode::decode;
    let bi = json(&decode(&resp["containerimage.buildinfo"]));
    assert_eq!(
        bi["sources"],
        serde_json::json!([{
            "type": "docker-image",
            "ref": format!("docker.io/{}", base.reference()),
            "pin": base.id(),
        }]),
        "{bi}"
    );

    // Attributes the exporter does not know are result metadata, as in buildkitd: a config
    // given as `containerimage.config`, with SOURCE_DATE_EPOCH clamping its times.
    let cfg = r#"{"architecture":"amd64","os":"linux","config":{"Env":["FROM_ATTR=1"]},"history":[{"created":"2001-01-01T00:00:00Z","created_by":"base"}]}"#;
    let mut attrs = named.clone();
    attrs.insert("containerimage.config".into(), cfg.into());
    attrs.insert("source-date-epoch".into(), "1262304000".into());
    let epoch_path = dir.path().join("epoch.tar");
    let (epoch_resp, _) = build(Output::Docker(epoch_path.clone(), attrs)).await;
    let files = tar_files(&epoch_path);
    let config = json(
        &files[&format!(
            "blobs/sha256/{}",
            epoch_resp["containerimage.config.digest"]
                .strip_prefix("sha256:")
                .unwrap()
        )],
    );
    assert_eq!(config["config"]["Env"], serde_json::json!(["FROM_ATTR=1"]));
    assert_eq!(config["created"], "2010-01-01T00:00:00Z", "{config}");
    let history = config["history"].as_array().unwrap();
    assert_eq!(history[0]["created"], "2001-01-01T00:00:00Z", "{config}");
    assert_eq!(
        history.last().unwrap()["created"],
        "2010-01-01T00:00:00Z",
        "{config}"
    );
    let index = json(&files["index.json"]);
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.created"],
        "2010-01-01T00:00:00Z"
    );

    // Declined targets (BuildKit's client returns no writer when the target exists): the export
    // succeeds with the same digests it would have sent, for both formats.
    let (declined, md) = build(Output::Declined("docker".into(), named.clone())).await;
    assert_eq!(
        declined["containerimage.digest"],
        resp["containerimage.digest"]
    );
    assert_eq!(
        md.get("containerimage.digest"),
        resp.get("containerimage.digest")
    );
    let oci_path = dir.path().join("oci.tar");
    let (oci_resp, oci_md) = build(Output::Oci(oci_path, BTreeMap::new())).await;
    assert_eq!(
        oci_md.get("containerimage.digest"),
        oci_resp.get("containerimage.digest")
    );
    let (declined, md) = build(Output::Declined("oci".into(), BTreeMap::new())).await;
    assert_eq!(
        declined["containerimage.digest"],
        oci_resp["containerimage.digest"]
    );
    assert_eq!(
        declined["containerimage.config.digest"],
        resp["containerimage.config.digest"]
    );
    assert_eq!(
        md.get("containerimage.digest"),
        oci_resp.get("containerimage.digest")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thin_docker_output_carries_only_new_layers_and_loads_into_docker() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let base_layers = engine.image_layers(base.reference()).await.unwrap();
    // thin by default through the config file; thin=false per request gives the whole archive.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("buildkitd.toml");
    std::fs::write(&cfg, "[exporter.docker]\nthin = true\n").unwrap();
    let berthd = Berthd::start(&["--config", cfg.to_str().unwrap()]).unwrap();
    let client = berthd.client().await.unwrap();
    let def = llb::State::from(llb::image(base.reference()))
        .run(RunOpts::shell("echo thin > /made"))
        .root()
        .marshal()
        .unwrap();
    let name = format!("{}:1", unique_name("berth-test/thin-docker"));
    let mut archives = Vec::new();
    for thin in [None, Some("false")] {
        let path = dir
            .path()
            .join(format!("image-{}.tar", thin.unwrap_or("default")));
        let mut attrs = BTreeMap::new();
        attrs.insert("name".to_string(), name.clone());
        if let Some(t) = thin {
            attrs.insert("thin".to_string(), t.to_string());
        }
        let report = client
            .build(BuildOptions {
                definition: Some(def.clone()),
                output: Output::Docker(path.clone(), attrs),
                ..Default::default()
            })
            .await
            .unwrap();
        let resp = report
            .solve
            .as_ref()
            .unwrap_or_else(|e| panic!("solve failed: {e}\n{}", berthd.log_text()))
            .exporter_response
            .clone();
        archives.push((path, resp, statuses(&report)));
    }
    let (thin_path, thin_resp, thin_status) = &archives[0];
    let (full_path, full_resp, full_status) = &archives[1];
    assert_eq!(
        thin_resp["containerimage.config.digest"],
        full_resp["containerimage.config.digest"]
    );
    let (thin_bytes, thin_tars, thin_listed) = docker_archive_layers(thin_path);
    let (full_bytes, full_tars, full_listed) = docker_archive_layers(full_path);
    let thin_size = std::fs::metadata(thin_path).unwrap().len();
    let full_size = std::fs::metadata(full_path).unwrap().len();
    eprintln!(
        "thin archive: {thin_size} bytes ({thin_tars} layer tars, {thin_bytes} bytes); \
         full archive: {full_size} bytes ({full_tars} layer tars, {full_bytes} bytes)"
    );
    assert_eq!(thin_listed, full_listed);
    assert_eq!(full_tars, full_listed);
    assert_eq!(thin_tars, full_tars - base_layers.len());
    let base_bytes = full_bytes - thin_bytes;
    assert!(
        base_bytes > 1_000_000,
        "busybox base layer is >1 MB: {base_bytes}"
    );
    // The thin archive is the new layers plus a few KB of headers, config and manifest.
    assert!(
        thin_size < thin_bytes + 16 * 1024,
        "{thin_size} vs {thin_bytes}"
    );
    assert!(
        thin_status.iter().any(|s| s
            == &format!(
                "{} layers already in Docker ({base_bytes} bytes not sent)",
                base_layers.len()
            )),
        "{thin_status:?}"
    );
    assert!(!full_status.iter().any(|s| s.contains("already in Docker")));

    // docker load of the thin archive into the dockerd berthd is bound to: runnable, right ID.
    let out = Command::new("docker")
        .args(["-H", &engine.host(), "load", "-i"])
        .arg(thin_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker load: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _remove = RemoveImage(thin_resp["containerimage.config.digest"].clone());
    let _cleanup = integration::TestImage::adopt(&engine, &name).await.unwrap();
    let inspect = engine.inspect_image(&name).await.unwrap();
    assert_eq!(
        inspect.id.as_deref(),
        Some(thin_resp["containerimage.config.digest"].as_str())
    );
    let run = engine.run(&name, &["cat", "/made"]).await.unwrap();
    run.assert_success();
    assert_eq!(run.stdout, "thin\n");
    let layers = engine.image_layers(&name).await.unwrap();
    assert_eq!(&layers[..base_layers.len()], &base_layers[..]);
}

/// Removes an image by ID when the test ends (also on panic), after its tag guard.
struct RemoveImage(String);
impl Drop for RemoveImage {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
    }
}
