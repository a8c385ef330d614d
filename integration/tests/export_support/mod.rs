//! Shared pieces of the `export_*` tests: the images they build (from scratch, so the same LLB
//! works for every store: the system dockerd, a stopped private dockerd's data root, a private
//! containerd), a private containerd, and checks of what berth may leave in each store.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use integration::buildkit_client::{BuildOptions, BuildReport, BuildkitClient, Output};

/// The static busybox every test image carries as its first layer.
pub fn busybox() -> Vec<u8> {
    std::fs::read("/bin/busybox").expect("/bin/busybox (Debian busybox-static) is needed")
}

/// `len` bytes that depend only on `seed` (xorshift), so two builds with different seeds have
/// different layers and a rerun has the same ones.
pub fn noise(seed: &str, len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in seed.bytes() {
        x = (x ^ u64::from(b)).wrapping_mul(0x100_0000_01B3);
    }
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// LLB of a test image: layer 1 `/bin/busybox` (shared by all; or the Docker image `base`),
/// then optionally a shared `/shared` layer, then `/big` (`big` bytes of noise from `data`) and
/// `/data` = `data`.
pub fn image_def(
    base: Option<&str>,
    shared: Option<&str>,
    data: &str,
    big: usize,
) -> protos::pb::Definition {
    let mut st = match base {
        Some(b) => llb::State::from(llb::image(b)),
        None => llb::scratch().file(llb::mkdir("/bin", 0o755, Default::default()).mkfile(
            "/bin/busybox",
            0o755,
            busybox(),
            Default::default(),
        )),
    };
    if let Some(s) = shared {
        st = st.file(llb::mkfile("/shared", 0o644, s, Default::default()));
    }
    if big > 0 {
        st = st.file(llb::mkfile(
            "/big",
            0o644,
            noise(data, big),
            Default::default(),
        ));
    }
    st.file(llb::mkfile("/data", 0o644, data, Default::default()))
        .marshal()
        .unwrap()
}

/// Builds `def` with `--output type=image` and these names (may be empty).
pub async fn export_image(
    client: &BuildkitClient,
    def: &protos::pb::Definition,
    names: &[String],
    extra: &[(&str, &str)],
) -> anyhow::Result<BuildReport> {
    let mut attrs = BTreeMap::new();
    if !names.is_empty() {
        attrs.insert("name".to_string(), names.join(","));
    }
    for (k, v) in extra {
        attrs.insert(k.to_string(), v.to_string());
    }
    client
        .build(BuildOptions {
            definition: Some(def.clone()),
            output: Output::Raw("image".into(), attrs),
            ..Default::default()
        })
        .await
}

/// The same build without an exporter (warms berth's cache).
pub async fn solve_only(client: &BuildkitClient, def: &protos::pb::Definition) {
    let r = client
        .build(BuildOptions {
            definition: Some(def.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    r.solve.as_ref().expect("solve");
}

/// The exporter response of a successful build (panics with the daemon log otherwise).
pub fn response(report: &BuildReport, log: &str) -> BTreeMap<String, String> {
    match &report.solve {
        Ok(r) => r.exporter_response.clone(),
        Err(e) => panic!("build failed: {e}\nberthd log:\n{log}"),
    }
}

/// Runs `docker` (optionally against `host`) and returns stdout; panics on failure.
pub fn docker(host: Option<&str>, args: &[&str]) -> String {
    let mut cmd = Command::new("docker");
    if let Some(h) = host {
        cmd.args(["-H", h]);
    }
    let out = cmd.args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a tag resolves to (`None`: no such image).
pub fn tag_target(host: Option<&str>, name: &str) -> Option<String> {
    let mut cmd = Command::new("docker");
    if let Some(h) = host {
        cmd.args(["-H", h]);
    }
    let out = cmd
        .args(["image", "inspect", "--format", "{{.Id}}", name])
        .output()
        .unwrap();
    if out.status.success() {
        Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("No such image") || err.contains("no such image"),
            "docker image inspect {name} failed otherwise: {err}"
        );
        None
    }
}

/// Runs `cat /data` in `image` (`--network none`) and returns its output.
pub fn run_cat(host: Option<&str>, image: &str, path: &str) -> String {
    docker(
        host,
        &[
            "run",
            "--rm",
            "--network",
            "none",
            image,
            "/bin/busybox",
            "cat",
            path,
        ],
    )
}

/// Removes images by ID at the end of a test (also on panic).
pub struct RemoveImages(pub Option<String>, pub Vec<String>);
impl Drop for RemoveImages {
    fn drop(&mut self) {
        for id in &self.1 {
            let mut cmd = Command::new("docker");
            if let Some(h) = &self.0 {
                cmd.args(["-H", h]);
            }
            let _ = cmd.args(["rmi", "-f", id]).output();
        }
    }
}

/// berth's leftovers in a classic data root: names of anything `OfflineWriter` makes only
/// transiently, plus overlay2 dirs no layerdb entry points to and dangling `l/` links.
pub fn offline_leftovers(data_root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let drv = data_root.join("overlay2");
    let layerdb = data_root.join("image/overlay2/layerdb");
    let mut referenced = std::collections::BTreeSet::new();
    if let Ok(rd) = std::fs::read_dir(layerdb.join("sha256")) {
        for e in rd.flatten() {
            if let Ok(c) = std::fs::read_to_string(e.path().join("cache-id")) {
                referenced.insert(c.trim().to_string());
            }
        }
    }
    // Container layers (dockerd's own: <id>-init and mounts) are referenced from layerdb/mounts.
    if let Ok(rd) = std::fs::read_dir(layerdb.join("mounts")) {
        for e in rd.flatten() {
            for f in ["mount-id", "init-id"] {
                if let Ok(c) = std::fs::read_to_string(e.path().join(f)) {
                    referenced.insert(c.trim().to_string());
                }
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(&drv) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n == "l" {
                continue;
            }
            if n.starts_with("berth-") || e.path().join("berth-incomplete").exists() {
                found.push(format!("overlay2/{n} (berth marker)"));
            } else if !referenced.contains(&n) {
                found.push(format!("overlay2/{n} (no layerdb entry)"));
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(drv.join("l")) {
        for e in rd.flatten() {
            if !e.path().exists() {
                found.push(format!(
                    "overlay2/l/{} (dangling)",
                    e.file_name().to_string_lossy()
                ));
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(layerdb.join("tmp")) {
        for e in rd.flatten() {
            found.push(format!("layerdb/tmp/{}", e.file_name().to_string_lossy()));
        }
    }
    for d in ["image/overlay2", "image/overlay2/imagedb/content/sha256"] {
        if let Ok(rd) = std::fs::read_dir(data_root.join(d)) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(".berth-tmp-") {
                    found.push(format!("{d}/{n}"));
                }
            }
        }
    }
    found
}

/// `sha256:<hex>` of a blob.
pub fn sha(b: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

/// An uncompressed layer tar of regular files `(path, content, mode)` with a fixed mtime.
pub fn layer_tar(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_mtime(1_600_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Gzip of a blob (fast level).
pub fn gzip(b: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// One platform's image of a [`push_index`].
pub struct PushedPlatform {
    /// `amd64`, `arm64`.
    pub architecture: String,
    /// The platform manifest's digest.
    pub manifest_digest: String,
    /// Its config's digest (Docker's image ID on the classic store).
    pub config_digest: String,
    /// Its layer blobs (gzip).
    pub layer_digests: Vec<String>,
    /// Its layers' diffIDs.
    pub diff_ids: Vec<String>,
}

/// A multi-platform image pushed by [`push_index`].
pub struct PushedIndex {
    /// `addr/repo:tag`.
    pub reference: String,
    /// The index's digest.
    pub digest: String,
    /// The platforms, in the index's order.
    pub platforms: Vec<PushedPlatform>,
}

/// Pushes `addr/repo:tag` as an OCI index of one `linux/<architecture>` image per entry of
/// `platforms`, made of its layers (uncompressed tars, pushed gzip-compressed), with berth's
/// registry client. The images need not run on this host: nothing checks a layer's machine code.
pub async fn push_index(
    addr: &str,
    repo: &str,
    tag: &str,
    platforms: &[(&str, Vec<Vec<u8>>)],
) -> PushedIndex {
    let reference = format!("{addr}/{repo}:{tag}");
    let r = registry::Reference::parse(&reference).unwrap();
    let client = registry::Registry::new(registry::Hosts::new(Default::default()));
    let session = client.session(std::sync::Arc::new(registry::Anonymous));
    let dir = tempfile::tempdir().unwrap();
    let mut pushed = Vec::new();
    let mut entries = Vec::new();
    for (arch, layers) in platforms {
        let diff_ids: Vec<String> = layers.iter().map(|t| sha(t)).collect();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/busybox", "sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap();
        let mut descs = Vec::new();
        let mut layer_digests = Vec::new();
        for tar in layers {
            let blob = gzip(tar);
            let d = sha(&blob);
            let p = dir.path().join(d.replace(':', "-"));
            std::fs::write(&p, &blob).unwrap();
            session
                .push_blob(&r, &d, blob.len() as u64, &p, None, None)
                .await
                .unwrap();
            descs.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": d,
                "size": blob.len(),
            }));
            layer_digests.push(d);
        }
        let config_digest = sha(&config);
        let p = dir.path().join(config_digest.replace(':', "-"));
        std::fs::write(&p, &config).unwrap();
        session
            .push_blob(&r, &config_digest, config.len() as u64, &p, None, None)
            .await
            .unwrap();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": registry::MEDIA_TYPE_OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": descs,
        }))
        .unwrap();
        let manifest_digest = sha(&manifest);
        let size = manifest.len();
        session
            .push_manifest(
                &r,
                &manifest_digest,
                registry::MEDIA_TYPE_OCI_MANIFEST,
                manifest.into(),
            )
            .await
            .unwrap();
        entries.push(serde_json::json!({
            "mediaType": registry::MEDIA_TYPE_OCI_MANIFEST,
            "digest": manifest_digest,
            "size": size,
            "platform": {"os": "linux", "architecture": arch},
        }));
        pushed.push(PushedPlatform {
            architecture: arch.to_string(),
            manifest_digest,
            config_digest,
            layer_digests,
            diff_ids,
        });
    }
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": registry::MEDIA_TYPE_OCI_INDEX,
        "manifests": entries,
    }))
    .unwrap();
    let digest = session
        .push_manifest(&r, tag, registry::MEDIA_TYPE_OCI_INDEX, index.into())
        .await
        .unwrap();
    PushedIndex {
        reference,
        digest,
        platforms: pushed,
    }
}
