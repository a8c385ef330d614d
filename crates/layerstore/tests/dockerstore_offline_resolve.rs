//! Offline resolution of base images from a stopped daemon's data root: names (normalised as
//! dockerd does), digests, full IDs and unique ID prefixes; missing and ambiguous references;
//! and that resolving reads only (the data root's tree is byte-for-byte the same afterwards).
//! The data root is written by `OfflineWriter` (checked against a real dockerd by
//! `dockerstore_direct_write`; the berthd end-to-end test `daemon_offline_base` resolves images
//! dockerd itself wrote).

use std::collections::BTreeMap;
use std::path::Path;

use layerstore::dockerstore::{
    offline_driver, resolve_offline_image, DaemonCheck, DockerStore, LayerSource, OfflineWriter,
    StorageDriver,
};
use layerstore::{Digest, Error};

fn layer_tar(files: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1);
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data.as_bytes()).unwrap();
    }
    b.into_inner().unwrap()
}

fn config(diff_ids: &[Digest], tag: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": [format!("T={tag}")]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

/// Every file under `root` with its contents (dirs as empty entries).
fn snapshot(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root) {
        let e = e.unwrap();
        let rel = e.path().strip_prefix(root).unwrap().display().to_string();
        let md = e.path().symlink_metadata().unwrap();
        let v = if md.is_file() {
            std::fs::read(e.path()).unwrap()
        } else {
            format!("{:?}", md.file_type()).into_bytes()
        };
        out.insert(rel, v);
    }
    out
}

struct Image {
    id: Digest,
    diff_ids: Vec<Digest>,
}

fn write_image(w: &OfflineWriter, layers: &[&[(&str, &str)]], tags: &[&str], seed: &str) -> Image {
    let mut parent: Option<Digest> = None;
    let mut diff_ids = vec![];
    for files in layers {
        let tar = layer_tar(files);
        let r = w
            .write_layer(
                parent.as_ref(),
                LayerSource::Tar {
                    reader: Box::new(std::io::Cursor::new(tar)),
                    diff_id: None,
                },
            )
            .unwrap();
        diff_ids.push(r.diff_id);
        parent = Some(r.chain_id);
    }
    let id = w.write_image(&config(&diff_ids, seed)).unwrap();
    for t in tags {
        w.tag(t, &id).unwrap();
    }
    Image { id, diff_ids }
}

#[test]
fn resolves_like_dockerd_and_reads_only() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    std::fs::create_dir(&root).unwrap();
    let store = DockerStore::new(&root, StorageDriver::Overlay2);
    let (a, b) = {
        let w = OfflineWriter::open(store.clone(), &DaemonCheck::default()).unwrap();
        let a = write_image(
            &w,
            &[&[("bin/sh", "sh")], &[("etc/a", "a")]],
            &["busybox", "docker.io/foo/bar:1", "127.0.0.1:5000/x/y:z"],
            "a",
        );
        let b = write_image(&w, &[&[("bin/sh", "sh")]], &["other:2"], "b");
        (a, b)
    };
    assert_eq!(offline_driver(&root), StorageDriver::Overlay2);
    // A digest reference as a pull records it (written by hand: the writer only tags).
    let repo_digest = format!("busybox@sha256:{}", "5".repeat(64));
    let path = root.join("image/overlay2/repositories.json");
    let mut doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    doc["Repositories"]["busybox"][&repo_digest] = a.id.to_string().into();
    std::fs::write(&path, serde_json::to_vec(&doc).unwrap()).unwrap();

    let before = snapshot(&root);
    let id_hex = a.id.hex();
    // A prefix unique to `a` (the two IDs differ somewhere in the first 8 hex digits, surely).
    let unique = (1..=64)
        .map(|n| &id_hex[..n])
        .find(|p| !b.id.hex().starts_with(p))
        .unwrap();
    for r in [
        "busybox",
        "busybox:latest",
        "docker.io/library/busybox:latest",
        "library/busybox",
        "foo/bar:1",
        "docker.io/foo/bar:1",
        "127.0.0.1:5000/x/y:z",
        &repo_digest,
        &format!("docker.io/library/{repo_digest}"),
        &format!(
            "busybox:nosuchtag@{}",
            repo_digest.split_once('@').unwrap().1
        ),
        &a.id.to_string(),
        &id_hex,
        unique,
        &format!("sha256:{unique}"),
    ] {
        let img = resolve_offline_image(&store, r).unwrap_or_else(|e| panic!("{r}: {e}"));
        assert_eq!(img.id, a.id, "{r}");
        assert_eq!(img.diff_ids, a.diff_ids, "{r}");
        assert_eq!(img.layer_dirs.len(), 2);
        for (dir, cid) in img.layer_dirs.iter().zip(&img.chain_ids) {
            let e = store.layer(cid).unwrap().unwrap();
            assert_eq!(*dir, e.diff_dir);
            assert!(dir.is_dir());
        }
        assert!(img.layer_dirs[1].join("etc/a").is_file());
        assert_eq!(Digest::of(&img.config), a.id);
    }
    assert_eq!(resolve_offline_image(&store, "other:2").unwrap().id, b.id);
    assert_eq!(
        store.repo_digests(&a.id).unwrap(),
        vec![repo_digest.clone()]
    );
    assert!(store.repo_digests(&b.id).unwrap().is_empty());

    for missing in [
        "busybox:1",
        "nosuch",
        "foo/bar",
        "other",
        &format!("sha256:{}", "0".repeat(64)),
    ] {
        match resolve_offline_image(&store, missing) {
            Err(e @ Error::DockerImageNotFound { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(missing) && msg.contains(&root.display().to_string()),
                    "{msg}"
                );
                assert!(msg.contains("start dockerd to pull it"), "{msg}");
            }
            other => panic!("{missing}: {other:?}"),
        }
    }
    // The common prefix of both IDs (if any) is ambiguous; the empty-ish and non-hex are not IDs.
    let common: String = id_hex
        .chars()
        .zip(b.id.hex().chars())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x)
        .collect();
    if !common.is_empty() {
        assert!(matches!(
            resolve_offline_image(&store, &common),
            Err(Error::AmbiguousImageId { .. })
        ));
    }
    assert!(matches!(
        resolve_offline_image(&store, "Busybox"),
        Err(Error::InvalidImageReference { .. })
    ));
    assert_eq!(snapshot(&root), before, "resolution changed the data root");
}

#[test]
fn ambiguous_prefix_and_missing_layer() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    std::fs::create_dir(&root).unwrap();
    let store = DockerStore::new(&root, StorageDriver::Overlay2);
    let w = OfflineWriter::open(store.clone(), &DaemonCheck::default()).unwrap();
    // Enough images that some two share a first hex digit.
    let ids: Vec<Digest> = (0..17)
        .map(|i| write_image(&w, &[&[("f", "x")]], &[], &i.to_string()).id)
        .collect();
    let mut by_first: BTreeMap<char, usize> = BTreeMap::new();
    for id in &ids {
        *by_first
            .entry(id.hex().chars().next().unwrap())
            .or_default() += 1;
    }
    let (c, _) = by_first.iter().find(|(_, n)| **n > 1).unwrap();
    let err = resolve_offline_image(&store, &c.to_string()).unwrap_err();
    assert!(matches!(err, Error::AmbiguousImageId { .. }), "{err}");
    // An image whose layer is gone from layerdb: named in the error, not a silent partial chain.
    let gone = write_image(&w, &[&[("g", "y")]], &["gone:1"], "gone");
    let cid = layerstore::tar::chain_ids(&gone.diff_ids)[0];
    drop(w);
    std::fs::remove_dir_all(root.join("image/overlay2/layerdb/sha256").join(cid.hex())).unwrap();
    let err = resolve_offline_image(&store, "gone:1").unwrap_err();
    assert!(matches!(err, Error::DockerLayerMissing { .. }), "{err}");
}
