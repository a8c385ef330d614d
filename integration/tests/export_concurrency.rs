//! Eight builds that share layers (same base, the same first step, different last steps) export
//! `type=image` through one berthd at once: into the system dockerd (thin loads), and into a
//! stopped private dockerd's data root (direct writes). All succeed, each image runs with its own
//! content, the shared layers are one layer in Docker (identical chainIDs at the bottom of every
//! image) and berth wrote no duplicate or orphaned layer dirs.
//! Needs root, runc, overlayfs, the system dockerd and the dockerd binary.

mod export_support;

use export_support::*;
use integration::buildkit_client::Berthd;
use integration::{busybox_image, require_root, unique_name, DockerEngine, PrivateDockerd};

const N: usize = 8;

/// Starts N exports at once; returns (data, config digest) per build.
async fn export_n(berthd: &Berthd, base: Option<&str>, prefix: &str) -> Vec<(String, String)> {
    let shared = unique_name("shared");
    let mut tasks = Vec::new();
    for i in 0..N {
        let client = berthd.client().await.unwrap();
        let data = format!("{prefix}-{i}");
        let def = image_def(base, Some(&shared), &data, 256 << 10);
        let names = vec![format!("{prefix}:{i}")];
        tasks.push(tokio::spawn(async move {
            let r = export_image(&client, &def, &names, &[]).await.unwrap();
            (data, r)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        let (data, r) = t.await.unwrap();
        let resp = response(&r, &berthd.log_text());
        out.push((data, resp["containerimage.config.digest"].clone()));
    }
    out
}

fn layers(host: Option<&str>, image: &str) -> Vec<String> {
    docker(
        host,
        &[
            "image",
            "inspect",
            "--format",
            "{{json .RootFS.Layers}}",
            image,
        ],
    )
    .trim()
    .trim_matches(|c| c == '[' || c == ']')
    .split(',')
    .map(|s| s.trim_matches('"').to_string())
    .collect()
}

fn check_images(host: Option<&str>, prefix: &str, built: &[(String, String)], shared: usize) {
    let first = layers(host, &format!("{prefix}:0"));
    for (i, (data, id)) in built.iter().enumerate() {
        let name = format!("{prefix}:{i}");
        assert_eq!(
            tag_target(host, &name).as_deref(),
            Some(id.as_str()),
            "{name}"
        );
        assert_eq!(run_cat(host, &name, "/data"), *data);
        let l = layers(host, &name);
        assert_eq!(l.len(), first.len());
        assert_eq!(l[..shared], first[..shared], "{name}: shared layers differ");
        assert_ne!(l.last(), first.last().filter(|_| i != 0), "{name}");
    }
    let ids: std::collections::BTreeSet<_> = built.iter().map(|(_, id)| id).collect();
    assert_eq!(ids.len(), N, "distinct images");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_exports_into_the_live_daemon() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let base_layers = engine.image_layers(base.reference()).await.unwrap().len();
    let berthd = Berthd::start(&[]).unwrap();
    let prefix = unique_name("berth-test/concurrent-live");
    let t = std::time::Instant::now();
    let built = export_n(&berthd, Some(base.reference()), &prefix).await;
    eprintln!("{N} concurrent live exports: {:?}", t.elapsed());
    let _cleanup = RemoveImages(None, built.iter().map(|(_, id)| id.clone()).collect());
    // Base layers plus the shared /shared layer are common to all.
    check_images(None, &prefix, &built, base_layers + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_exports_into_a_stopped_data_root() {
    require_root();
    let mut dockerd = PrivateDockerd::new(Default::default()).unwrap();
    let host = dockerd.engine().host();
    dockerd.stop().unwrap();
    let root = dockerd.data_root();
    let berthd = Berthd::start(&[
        "--docker-host",
        "unix:///nonexistent/berth-test-docker.sock",
        "--docker-data-root",
        &root.display().to_string(),
    ])
    .unwrap();
    let prefix = unique_name("berth-test/concurrent-offline");
    let t = std::time::Instant::now();
    let built = export_n(&berthd, None, &prefix).await;
    eprintln!("{N} concurrent offline exports: {:?}", t.elapsed());
    // No duplicate layer dirs: every overlay2 dir is one layerdb entry's, nothing half-made.
    let left = offline_leftovers(&root);
    assert!(left.is_empty(), "{left:?}");
    let entries = std::fs::read_dir(root.join("image/overlay2/layerdb/sha256"))
        .unwrap()
        .count();
    // busybox + shared + N × (big, data)
    assert_eq!(entries, 2 + 2 * N, "layerdb entries");
    dockerd.start().unwrap();
    check_images(Some(&host), &prefix, &built, 2);
}
