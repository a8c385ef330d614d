//! Build cache shared between two build nodes through a real registry: two berthd, each bound to
//! its own private dockerd (own data root and network namespace, stopped by PID), share one
//! `docker-registry`. Node A builds (its RUN steps execute) and exports the cache in BuildKit's
//! format (`--export-cache type=registry,mode=max`); node B builds the same definition with
//! `--import-cache`: every step is CACHED, nothing executes, its image runs in its own dockerd,
//! and the blobs B downloads are exactly the layers its Docker lacked (the base image's, pulled
//! when its source resolves, and the RUN layers, fetched from the cache), each once.
//!
//! Needs root, runc, overlayfs, dockerd/containerd binaries and Debian's docker-registry.

mod export_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use export_support::*;
use integration::buildkit_client::{Berthd, BuildOptions, BuildReport, Output};
use integration::{require_root, unique_name, PrivateDockerd, Registry};
use protos::moby::buildkit::v1 as control;

/// The base image in the registry: busybox plus a unique `/hello` (two layers).
struct Base {
    reference: String,
    config_digest: String,
    /// (blob digest, blob size) per layer.
    layers: Vec<(String, u64)>,
}

async fn push_base(addr: &str, repo: &str, hello: &str) -> Base {
    let reference = format!("{addr}/{repo}:v1");
    let r = registry::Reference::parse(&reference).unwrap();
    let client = registry::Registry::new(registry::Hosts::new(Default::default()));
    let session = client.session(Arc::new(registry::Anonymous));
    let dir = tempfile::tempdir().unwrap();
    let bb = busybox();
    let tars = [
        layer_tar(&[("bin/busybox", &bb, 0o755)]),
        layer_tar(&[("hello", hello.as_bytes(), 0o644)]),
    ];
    let diff_ids: Vec<String> = tars.iter().map(|t| sha(t)).collect();
    let mut descs = vec![];
    let mut layers = vec![];
    for (i, t) in tars.iter().enumerate() {
        let blob = gzip(t);
        let d = sha(&blob);
        let p = dir.path().join(format!("l{i}"));
        std::fs::write(&p, &blob).unwrap();
        session
            .push_blob(&r, &d, blob.len() as u64, &p, None, None)
            .await
            .unwrap();
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "digest": d,
            "size": blob.len(),
        }));
        layers.push((d, blob.len() as u64));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/busybox", "sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_digest = sha(&config);
    let p = dir.path().join("config");
    std::fs::write(&p, &config).unwrap();
    session
        .push_blob(&r, &config_digest, config.len() as u64, &p, None, None)
        .await
        .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": registry::MEDIA_TYPE_DOCKER_MANIFEST,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": descs,
    }))
    .unwrap();
    session
        .push_manifest(
            &r,
            "v1",
            registry::MEDIA_TYPE_DOCKER_MANIFEST,
            manifest.into(),
        )
        .await
        .unwrap();
    Base {
        reference,
        config_digest,
        layers,
    }
}

fn entry(kind: &str, attrs: &[(&str, &str)]) -> control::CacheOptionsEntry {
    control::CacheOptionsEntry {
        r#type: kind.to_string(),
        attrs: attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn registry_log(reg: &Registry) -> PathBuf {
    reg.storage_dir().parent().unwrap().join("registry.log")
}

/// `(digest, bytes written)` of every successful `GET /v2/<repo>/blobs/<digest>` the registry
/// logged after byte `offset` of its log (logrus text lines of distribution 2.8).
fn blob_gets(reg: &Registry, offset: usize) -> Vec<(String, String, u64)> {
    let log = std::fs::read_to_string(registry_log(reg)).unwrap();
    let field = |l: &str, k: &str| -> Option<String> {
        let i = l.find(&format!(" {k}="))? + k.len() + 2;
        let rest = &l[i..];
        let v = if let Some(r) = rest.strip_prefix('"') {
            &r[..r.find('"')?]
        } else {
            rest.split(' ').next()?
        };
        Some(v.to_string())
    };
    log[offset.min(log.len())..]
        .lines()
        .filter(|l| l.contains("response completed"))
        .filter_map(|l| {
            if field(l, "http.request.method")? != "GET"
                || field(l, "http.response.status")? != "200"
            {
                return None;
            }
            let uri = field(l, "http.request.uri")?;
            let (repo, digest) = uri.strip_prefix("/v2/")?.split_once("/blobs/")?;
            let n = field(l, "http.response.written")?.parse().ok()?;
            Some((repo.to_string(), digest.to_string(), n))
        })
        .collect()
}

fn report_ok(r: &BuildReport, log: &str) {
    if let Err(e) = &r.solve {
        panic!("build failed: {e}\nberthd log:\n{log}");
    }
}

/// Two nodes (a private dockerd and a berthd each), one registry, a base image in it and a
/// two-RUN definition on it whose first RUN writes `marker` and random bytes.
struct Nodes {
    reg: Registry,
    base: Base,
    marker: String,
    def: protos::pb::Definition,
    // Fields drop in order: the berthds before their dockerds.
    berthd_a: Berthd,
    berthd_b: Berthd,
    dockerd_a: PrivateDockerd,
    dockerd_b: PrivateDockerd,
}

impl Nodes {
    async fn start(prefix: &str) -> Nodes {
        let reg = Registry::start().unwrap();
        let addr = reg.addr().to_string();
        let marker = unique_name(prefix);
        let base = push_base(&addr, "berth-cache/base", &marker).await;
        let dockerd_a = PrivateDockerd::new(Default::default()).unwrap();
        let dockerd_b = PrivateDockerd::new(Default::default()).unwrap();
        let berthd_a = Berthd::start(&["--docker-host", &dockerd_a.engine().host()]).unwrap();
        let berthd_b = Berthd::start(&["--docker-host", &dockerd_b.engine().host()]).unwrap();
        let def = llb::State::from(llb::image(&base.reference))
            .run(llb::RunOpts::args([
                "/bin/busybox",
                "sh",
                "-c",
                &format!("echo {marker} > /a && /bin/busybox head -c 200000 /dev/urandom > /rand"),
            ]))
            .root()
            .run(llb::RunOpts::args([
                "/bin/busybox",
                "sh",
                "-c",
                "echo two > /b",
            ]))
            .root()
            .marshal()
            .unwrap();
        Nodes {
            reg,
            base,
            marker,
            def,
            berthd_a,
            berthd_b,
            dockerd_a,
            dockerd_b,
        }
    }

    fn host_a(&self) -> String {
        self.dockerd_a.engine().host()
    }

    fn host_b(&self) -> String {
        self.dockerd_b.engine().host()
    }

    /// Asserts that every step of node B's build was CACHED and that its image has node A's
    /// RUN output.
    fn assert_b_reused_a(&self, rb: &BuildReport, image_a: &str, image_b: &str) {
        for v in rb.vertices().values() {
            if v.name.starts_with("exporting") {
                continue;
            }
            assert!(
                v.cached,
                "{} ran on node B: {:#?}\n{}",
                v.name,
                rb.vertices(),
                self.berthd_b.log_text()
            );
        }
        let (ha, hb) = (self.host_a(), self.host_b());
        assert_eq!(run_cat(Some(&hb), image_b, "/a").trim(), self.marker);
        assert_eq!(run_cat(Some(&hb), image_b, "/b").trim(), "two");
        assert_eq!(
            run_cat(Some(&ha), image_a, "/rand"),
            run_cat(Some(&hb), image_b, "/rand"),
            "node B has node A's RUN output, not a rerun"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_b_builds_from_node_a_cache_without_running_anything() {
    require_root();
    let n = Nodes::start("twonodes").await;
    let (reg, base, marker, def) = (&n.reg, &n.base, &n.marker, &n.def);
    let (berthd_a, berthd_b) = (&n.berthd_a, &n.berthd_b);
    let host_a = n.host_a();
    let addr = reg.addr().to_string();
    let cache_ref = format!("{addr}/berth-cache/cache:{marker}");
    let name =
        |n: &str| BTreeMap::from([("name".to_string(), format!("berth-test/two-nodes:{n}"))]);

    // Node A: runs both steps and exports everything.
    let client_a = berthd_a.client().await.unwrap();
    let ra = client_a
        .build(BuildOptions {
            definition: Some(def.clone()),
            output: Output::Raw("image".into(), name("a")),
            cache_exports: vec![entry("registry", &[("ref", &cache_ref), ("mode", "max")])],
            ..Default::default()
        })
        .await
        .unwrap();
    report_ok(&ra, &berthd_a.log_text());
    let ran_a = ra.vertices().values().filter(|v| !v.cached).count();
    assert!(ran_a >= 2, "node A ran {ran_a} steps: {:#?}", ra.vertices());
    let resp = ra.solve.as_ref().unwrap().exporter_response.clone();
    let desc: serde_json::Value = serde_json::from_str(
        resp.get("cache.manifest")
            .unwrap_or_else(|| panic!("no cache.manifest in {resp:?}")),
    )
    .unwrap();
    assert_eq!(desc["mediaType"], registry::MEDIA_TYPE_OCI_INDEX, "{desc}");
    assert!(reg.tags("berth-cache/cache").unwrap().contains(marker));
    let a_out = run_cat(Some(&host_a), "berth-test/two-nodes:a", "/a");
    assert_eq!(a_out.trim(), marker.as_str());

    // The cache as BuildKit lays it out: an index with every layer (diffID annotated) and the
    // config blob; the RUN layers are those whose diffID is not the base's.
    let rclient = registry::Registry::new(registry::Hosts::new(Default::default()));
    let rs = rclient.session(Arc::new(registry::Anonymous));
    let cref = registry::Reference::parse(&cache_ref).unwrap();
    let index = rs.resolve(&cref).await.unwrap();
    let index: serde_json::Value = serde_json::from_slice(&index.bytes).unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    let config_desc = manifests
        .iter()
        .find(|m| m["mediaType"] == remotecache::CACHE_CONFIG_MEDIA_TYPE)
        .unwrap_or_else(|| panic!("no cache config in {index}"));
    let cache_config_digest = config_desc["digest"].as_str().unwrap().to_string();
    let base_diff_ids: BTreeSet<String> = {
        let img = rs
            .resolve_image(
                &registry::Reference::parse(&base.reference).unwrap(),
                &registry::Platform::native(),
            )
            .await
            .unwrap();
        img.diff_ids.iter().map(|d| d.to_string()).collect()
    };
    let mut run_layers: BTreeMap<String, u64> = BTreeMap::new();
    for m in manifests {
        if m["mediaType"] == remotecache::CACHE_CONFIG_MEDIA_TYPE {
            continue;
        }
        let diff = m["annotations"]["containerd.io/uncompressed"]
            .as_str()
            .unwrap_or_else(|| panic!("layer without diffID annotation: {m}"));
        assert!(m["annotations"]["buildkit/createdat"].is_string(), "{m}");
        if !base_diff_ids.contains(diff) {
            run_layers.insert(
                m["digest"].as_str().unwrap().to_string(),
                m["size"].as_u64().unwrap(),
            );
        }
    }
    assert_eq!(run_layers.len(), 2, "two RUN layers in {index}");

    // Node B: same definition, importing; its Docker has nothing yet.
    let offset = std::fs::read_to_string(registry_log(reg)).unwrap().len();
    let client_b = berthd_b.client().await.unwrap();
    let rb = client_b
        .build(BuildOptions {
            definition: Some(def.clone()),
            output: Output::Raw("image".into(), name("b")),
            cache_imports: vec![entry("registry", &[("ref", &cache_ref)])],
            ..Default::default()
        })
        .await
        .unwrap();
    report_ok(&rb, &berthd_b.log_text());
    n.assert_b_reused_a(&rb, "berth-test/two-nodes:a", "berth-test/two-nodes:b");

    // What B downloaded: the base's layers (its Docker lacked the image; the source pulled it)
    // and the RUN layers from the cache, each once; besides those only the two configs.
    let gets = blob_gets(reg, offset);
    let mut layer_gets: BTreeMap<String, (u64, usize)> = BTreeMap::new();
    let mut other = vec![];
    for (repo, digest, n) in &gets {
        if *digest == base.config_digest || *digest == cache_config_digest {
            other.push((repo.clone(), digest.clone(), *n));
            continue;
        }
        let e = layer_gets.entry(digest.clone()).or_insert((0, 0));
        e.0 += n;
        e.1 += 1;
    }
    let mut expected: BTreeMap<String, u64> = run_layers.clone();
    for (d, n) in &base.layers {
        expected.insert(d.clone(), *n);
    }
    let got: BTreeMap<String, u64> = layer_gets
        .iter()
        .map(|(d, (n, _))| (d.clone(), *n))
        .collect();
    assert_eq!(
        got, expected,
        "layer blobs node B downloaded (configs: {other:?}); all GETs: {gets:?}"
    );
    assert!(
        layer_gets.values().all(|(_, c)| *c == 1),
        "a layer was downloaded twice: {layer_gets:?}"
    );
    let total: u64 = got.values().sum();
    let lacked: u64 = expected.values().sum();
    assert_eq!(total, lacked);
    eprintln!(
        "node B downloaded {total} layer bytes ({} from the cache, {} for the base image) and {} config bytes",
        run_layers.values().sum::<u64>(),
        base.layers.iter().map(|l| l.1).sum::<u64>(),
        other.iter().map(|o| o.2).sum::<u64>()
    );
}

/// `--export-cache type=inline` (mode min, as buildkitd's): node A pushes its image with the
/// cache records in its config; node B imports from that image reference and runs nothing —
/// the intermediate step has no result in the records and is still CACHED (its user matched).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_cache_in_a_pushed_image_serves_node_b() {
    require_root();
    let n = Nodes::start("inline").await;
    let image_ref = format!("{}/berth-cache/app:{}", n.reg.addr(), n.marker);
    let client_a = n.berthd_a.client().await.unwrap();
    let ra = client_a
        .build(BuildOptions {
            definition: Some(n.def.clone()),
            output: Output::Raw(
                "image".into(),
                BTreeMap::from([
                    ("name".to_string(), image_ref.clone()),
                    ("push".to_string(), "true".to_string()),
                ]),
            ),
            cache_exports: vec![entry("inline", &[])],
            ..Default::default()
        })
        .await
        .unwrap();
    report_ok(&ra, &n.berthd_a.log_text());
    // The pushed config carries the records; results point into the image's layers.
    let rclient = registry::Registry::new(registry::Hosts::new(Default::default()));
    let rs = rclient.session(Arc::new(registry::Anonymous));
    let img = rs
        .resolve_image(
            &registry::Reference::parse(&image_ref).unwrap(),
            &registry::Platform::native(),
        )
        .await
        .unwrap();
    let config: serde_json::Value = serde_json::from_slice(&img.config).unwrap();
    let inline = config["moby.buildkit.cache.v0"]
        .as_str()
        .unwrap_or_else(|| panic!("no inline cache in {config}"));
    use base64::Engine as _;
    let records: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(inline)
            .unwrap(),
    )
    .unwrap();
    let with_results = records
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r.get("layers").is_some() || r.get("chains").is_some())
        .count();
    assert_eq!(
        with_results, 1,
        "mode min: only the result's record: {records}"
    );
    assert!(records.as_array().unwrap().len() >= 3, "{records}");

    // Node B rebuilds from that image and pushes with the inline cache again (BuildKit's
    // TestBasicInlineCacheImportExport): the image is byte for byte node A's — same layer
    // blobs, same history times (the cache's, not the download's), same records.
    let image_b = format!("{}/berth-cache/app:{}-b", n.reg.addr(), n.marker);
    let client_b = n.berthd_b.client().await.unwrap();
    let rb = client_b
        .build(BuildOptions {
            definition: Some(n.def.clone()),
            output: Output::Raw(
                "image".into(),
                BTreeMap::from([
                    ("name".to_string(), image_b.clone()),
                    ("push".to_string(), "true".to_string()),
                ]),
            ),
            cache_exports: vec![entry("inline", &[])],
            cache_imports: vec![entry("registry", &[("ref", &image_ref)])],
            ..Default::default()
        })
        .await
        .unwrap();
    report_ok(&rb, &n.berthd_b.log_text());
    n.assert_b_reused_a(&rb, &image_ref, &image_b);
    // The layers that came from the cache are node A's: same blobs, same history entries (the
    // exporter's creation times, not the download's), same records and `created`. The base
    // image's history entries are each node's pull time, as with buildkitd (a pulled layer is
    // created when it is pulled; an LLB build carries no base config with its history).
    let img_b = rs
        .resolve_image(
            &registry::Reference::parse(&image_b).unwrap(),
            &registry::Platform::native(),
        )
        .await
        .unwrap();
    let config_b: serde_json::Value = serde_json::from_slice(&img_b.config).unwrap();
    let both = format!(
        "A: {}\nB: {}",
        String::from_utf8_lossy(&img.config),
        String::from_utf8_lossy(&img_b.config)
    );
    assert_eq!(img.manifest.layers, img_b.manifest.layers, "{both}");
    let base_n = n.base.layers.len();
    let history = |c: &serde_json::Value| c["history"].as_array().unwrap()[base_n..].to_vec();
    assert_eq!(history(&config), history(&config_b), "{both}");
    assert_eq!(history(&config).len(), 2, "{both}");
    for k in ["moby.buildkit.cache.v0", "created", "rootfs", "config"] {
        assert_eq!(config[k], config_b[k], "{k}: {both}");
    }
}
