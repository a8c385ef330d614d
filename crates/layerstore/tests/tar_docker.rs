//! Our layer tar through the system dockerd (needs root, docker CLI and a running daemon on
//! /var/run/docker.sock with the classic store).
//!
//! Loads a one-layer docker-archive holding our tar (`docker load`), then:
//! - `docker save` gives back a layer whose sha256 is our diffID: dockerd accepted the tar,
//!   re-read it, and reproduced it byte for byte from its own tar-split and extracted files;
//! - the tar-split dockerd computed on load equals ours record for record (same file
//!   entries with names, sizes and CRCs; same concatenated raw bytes), so writing our
//!   tar-split straight into `layerdb` gives Docker what it would have made itself.
//!
//! The image gets a unique tag and is removed afterwards; nothing else is touched.

mod tar_util;

use std::io::Read;
use std::process::Command;

use layerstore::tar::{write_layer, WhiteoutFormat, WriteOptions};
use layerstore::{chain_id, Digest};
use tar_util::*;

fn docker(args: &[&str]) -> std::process::Output {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("the docker CLI must be installed for this test");
    assert!(
        out.status.success(),
        "docker {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Removes the test image even when an assertion fails.
struct ImageGuard(String);

impl Drop for ImageGuard {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", &self.0]).output();
    }
}

fn split_parts(records: &[SplitRecord]) -> (Vec<SplitRecord>, Vec<u8>) {
    let mut files = Vec::new();
    let mut raw = Vec::new();
    for r in records {
        match r {
            SplitRecord::Segment(b) => raw.extend_from_slice(b),
            f => files.push(f.clone()),
        }
    }
    (files, raw)
}

#[test]
fn docker_load_then_save_reproduces_our_layer_and_tar_split() {
    require_root();
    let work = tempdir();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let nonce = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    rich_tree(&src, true, nonce.as_bytes());

    let layer_path = work.path().join("layer.tar");
    let mut split = Vec::new();
    let d = write_layer(
        &src,
        std::fs::File::create(&layer_path).unwrap(),
        Some(&mut split),
        &WriteOptions {
            whiteouts: WhiteoutFormat::Overlay,
            ..Default::default()
        },
    )
    .unwrap();

    // A one-layer docker-archive.
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [d.diff_id.to_string()]},
        "history": [{"created_by": "berth layerstore tar_docker test"}],
    })
    .to_string();
    let image_id = Digest::of(config.as_bytes());
    let tag = format!("berth-tar-test:{nonce}");
    let manifest = serde_json::json!([{
        "Config": format!("{}.json", image_id.hex()),
        "RepoTags": [tag],
        "Layers": [format!("{}/layer.tar", d.diff_id.hex())],
    }])
    .to_string();
    let archive = work.path().join("image.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&archive).unwrap());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        };
        add("manifest.json", manifest.as_bytes());
        add(&format!("{}.json", image_id.hex()), config.as_bytes());
        add(
            &format!("{}/layer.tar", d.diff_id.hex()),
            &std::fs::read(&layer_path).unwrap(),
        );
        b.finish().unwrap();
    }

    docker(&["load", "-i", archive.to_str().unwrap()]);
    let _guard = ImageGuard(tag.clone());
    let inspect = docker(&[
        "image",
        "inspect",
        "--format",
        "{{json .RootFS.Layers}}",
        &tag,
    ]);
    let layers: Vec<String> = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(layers, vec![d.diff_id.to_string()]);

    // docker save: the layer comes back byte for byte.
    let saved = work.path().join("saved.tar");
    docker(&["save", "-o", saved.to_str().unwrap(), &tag]);
    let saved_bytes = std::fs::read(&saved).unwrap();
    let mut manifest_json = None;
    let mut layer_files = std::collections::HashMap::new();
    for e in tar::Archive::new(&saved_bytes[..]).entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        if name == "manifest.json" {
            manifest_json = Some(data);
        } else if name.ends_with("layer.tar") {
            layer_files.insert(name, data);
        }
    }
    let m: serde_json::Value = serde_json::from_slice(&manifest_json.unwrap()).unwrap();
    let layer_name = m[0]["Layers"][0].as_str().unwrap();
    let saved_layer = &layer_files[layer_name];
    assert_eq!(sha256(saved_layer), d.diff_id.to_string());
    assert!(
        *saved_layer == std::fs::read(&layer_path).unwrap(),
        "docker save reproduces our layer tar"
    );

    // dockerd's own tar-split for this layer equals ours.
    let driver = docker(&["info", "--format", "{{.Driver}}"]);
    let driver = String::from_utf8_lossy(&driver.stdout).trim().to_owned();
    let chain = chain_id(None, &d.diff_id);
    let theirs_path = format!(
        "/var/lib/docker/image/{driver}/layerdb/sha256/{}/tar-split.json.gz",
        chain.hex()
    );
    let theirs = std::fs::read(&theirs_path)
        .unwrap_or_else(|e| panic!("read dockerd's tar-split {theirs_path}: {e}"));
    let (their_files, their_raw) = split_parts(&decode_tar_split(&theirs).unwrap());
    let (our_files, our_raw) = split_parts(&decode_tar_split(&split).unwrap());
    assert_eq!(our_files, their_files, "file records equal dockerd's");
    assert!(our_raw == their_raw, "raw segment bytes equal dockerd's");
    assert!(our_files.len() as u64 == d.entries);
}
