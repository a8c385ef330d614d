//! `--export-cache type=s3` / `--import-cache type=s3` against a real S3 API server (moto, with
//! SigV4 authentication on, [`MotoS3`]): node A builds and exports; its objects are where
//! buildkitd v0.11.6 puts them (`<prefix>manifests/<name>` holding the cache config whose layers
//! carry their annotations, `<prefix>blobs/<digest>` per layer blob); a fresh berthd (own root,
//! nothing cached) imports it and every step is CACHED, its output node A's bytes, and its own
//! export to the same place uploads no blob (each is there already). Bad credentials, a missing
//! bucket and an unreachable endpoint fail the build with an error that says so, and
//! `ignore-error=true` lets it succeed.
//!
//! Needs root, runc, overlayfs, the system Docker Engine and moto (`.ci/run` installs it).

use std::collections::BTreeMap;
use std::path::Path;

use integration::buildkit_client::{Berthd, BuildOptions, BuildReport, Output};
use integration::{busybox_image, require_root, unique_name, DockerEngine, MotoS3, TestImage};
use llb::{Mount, RunOpts};
use protos::moby::buildkit::v1 as control;

fn entry(kind: &str, attrs: &[(&str, &str)]) -> control::CacheOptionsEntry {
    control::CacheOptionsEntry {
        r#type: kind.to_string(),
        attrs: attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// The attributes of a cache in `s3`'s bucket under `prefix`, with its credentials; `extra`
/// added (or replacing).
fn s3_attrs<'a>(
    s3: &'a MotoS3,
    prefix: &'a str,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut m: BTreeMap<&str, &str> = BTreeMap::from([
        ("endpoint_url", s3.endpoint()),
        ("bucket", s3.bucket()),
        ("region", "us-east-1"),
        ("access_key_id", s3.access_key_id()),
        ("secret_access_key", s3.secret_access_key()),
        ("use_path_style", "true"),
        ("prefix", prefix),
    ]);
    m.extend(extra.iter().copied());
    m.into_iter().collect()
}

/// Two RUN steps on busybox writing into a scratch mount: a marker and random bytes, then a
/// copy of the marker. The base image stays in Docker while its [`TestImage`] lives.
async fn definition(marker: &str) -> (protos::pb::Definition, TestImage) {
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let busybox = llb::State::from(llb::image(base.reference()));
    let first = busybox
        .run(
            RunOpts::shell(format!(
                "echo {marker} > /wd/a && head -c 100000 /dev/urandom > /wd/rand"
            ))
            .mount(Mount::bind("/wd", &llb::scratch())),
        )
        .get_mount("/wd")
        .unwrap();
    let def = busybox
        .run(RunOpts::shell("cat /wd/a > /wd/b").mount(Mount::bind("/wd", &first)))
        .get_mount("/wd")
        .unwrap()
        .marshal()
        .unwrap();
    (def, base)
}

fn solved(r: &BuildReport, log: &str) {
    if let Err(e) = &r.solve {
        panic!("build failed: {e}\nberthd log:\n{log}");
    }
}

fn failure(r: &BuildReport) -> String {
    match &r.solve {
        Ok(_) => panic!("build succeeded, expected a failed cache export"),
        Err(e) => e.message().to_string(),
    }
}

fn layer_writes(r: &BuildReport) -> Vec<String> {
    let mut v: Vec<String> = r
        .vertex_statuses()
        .into_iter()
        .filter(|s| s.id.starts_with("writing layer "))
        .map(|s| s.id)
        .collect();
    v.sort();
    v.dedup();
    v
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_node_builds_from_an_s3_cache_without_running_anything() {
    require_root();
    let s3 = MotoS3::start("berth-cache").unwrap();
    let marker = unique_name("s3cache");
    let (def, _base) = definition(&marker).await;
    let prefix = "team/";
    let out_a = tempfile::tempdir().unwrap();
    let out_b = tempfile::tempdir().unwrap();

    // Node A runs both steps and exports everything under two names.
    let berthd_a = Berthd::start(&[]).unwrap();
    let ra = berthd_a
        .client()
        .await
        .unwrap()
        .build(BuildOptions {
            definition: Some(def.clone()),
            output: Output::Local(out_a.path().to_path_buf()),
            cache_exports: vec![entry(
                "s3",
                &s3_attrs(&s3, prefix, &[("mode", "max"), ("name", "main;v1")]),
            )],
            ..Default::default()
        })
        .await
        .unwrap();
    solved(&ra, &berthd_a.log_text());
    let ran_a = ra.vertices().values().filter(|v| !v.cached).count();
    assert!(ran_a >= 2, "node A ran {ran_a} steps: {:#?}", ra.vertices());
    assert!(
        ra.vertices()
            .values()
            .any(|v| v.name == "exporting cache to s3" && v.error.is_empty()),
        "{:#?}",
        ra.vertices()
    );
    let resp = &ra.solve.as_ref().unwrap().exporter_response;
    assert!(
        !resp.contains_key("cache.manifest"),
        "the s3 exporter returns no descriptor, as buildkitd's: {resp:?}"
    );

    // The objects, read with boto3: both configs (same bytes), and one blob per layer, named
    // by its digest, whose bytes have that digest.
    let keys = s3.list(s3.bucket()).unwrap();
    assert!(
        keys.contains(&"team/manifests/main".to_string()),
        "{keys:?}"
    );
    assert!(keys.contains(&"team/manifests/v1".to_string()), "{keys:?}");
    let config_bytes = s3.get(s3.bucket(), "team/manifests/main").unwrap();
    assert_eq!(
        config_bytes,
        s3.get(s3.bucket(), "team/manifests/v1").unwrap()
    );
    let config: serde_json::Value = serde_json::from_slice(&config_bytes).unwrap();
    let layers = config["layers"].as_array().unwrap();
    assert!(layers.len() >= 3, "busybox + 2 RUN layers: {config}");
    let blobs: Vec<&String> = keys
        .iter()
        .filter(|k| k.starts_with("team/blobs/"))
        .collect();
    let mut expected_blobs = vec![];
    for l in layers {
        let digest = l["blob"].as_str().unwrap();
        let a = &l["annotations"];
        assert!(
            a["diffID"].as_str().unwrap_or("").starts_with("sha256:"),
            "{l}"
        );
        assert!(
            a["mediaType"].as_str().unwrap_or("").contains("layer"),
            "{l}"
        );
        assert!(a["createdAt"].is_string(), "{l}");
        let key = format!("team/blobs/{digest}");
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
        let bytes = s3.get(s3.bucket(), &key).unwrap();
        assert_eq!(a["size"].as_u64(), Some(bytes.len() as u64), "{l}");
        use sha2::Digest as _;
        assert_eq!(
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes))),
            digest
        );
        expected_blobs.push(key);
    }
    expected_blobs.sort();
    expected_blobs.dedup();
    assert_eq!(blobs.len(), expected_blobs.len(), "{keys:?}");
    assert!(config["records"].as_array().unwrap().len() >= 3, "{config}");
    assert_eq!(
        layer_writes(&ra).len(),
        expected_blobs.len(),
        "node A uploaded each blob once"
    );

    // Node B: a fresh berthd (own root) imports `main`, runs nothing, and has node A's bytes;
    // its export to the same place finds every blob there and uploads none.
    let berthd_b = Berthd::start(&[]).unwrap();
    let rb = berthd_b
        .client()
        .await
        .unwrap()
        .build(BuildOptions {
            definition: Some(def.clone()),
            output: Output::Local(out_b.path().to_path_buf()),
            cache_imports: vec![entry("s3", &s3_attrs(&s3, prefix, &[("name", "main")]))],
            cache_exports: vec![entry(
                "s3",
                &s3_attrs(&s3, prefix, &[("mode", "max"), ("name", "b")]),
            )],
            ..Default::default()
        })
        .await
        .unwrap();
    solved(&rb, &berthd_b.log_text());
    for v in rb.vertices().values() {
        if v.name.starts_with("exporting") {
            continue;
        }
        assert!(
            v.cached,
            "{} ran on node B: {:#?}\n{}",
            v.name,
            rb.vertices(),
            berthd_b.log_text()
        );
    }
    assert_eq!(read(out_b.path(), "rand"), read(out_a.path(), "rand"));
    assert_eq!(
        String::from_utf8(read(out_b.path(), "b")).unwrap().trim(),
        marker
    );
    assert_eq!(layer_writes(&rb), Vec::<String>::new(), "blobs re-uploaded");
    assert!(s3
        .list(s3.bucket())
        .unwrap()
        .contains(&"team/manifests/b".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_cache_failures_are_named_and_ignore_error_lets_the_build_pass() {
    require_root();
    let s3 = MotoS3::start("berth-errors").unwrap();
    let (def, _base) = definition(&unique_name("s3err")).await;
    let berthd = Berthd::start(&[]).unwrap();
    let client = berthd.client().await.unwrap();
    let out = tempfile::tempdir().unwrap();
    let build = |exports: Vec<control::CacheOptionsEntry>,
                 imports: Vec<control::CacheOptionsEntry>| {
        let client = &client;
        let def = def.clone();
        let out = out.path().to_path_buf();
        async move {
            client
                .build(BuildOptions {
                    definition: Some(def),
                    output: Output::Local(out),
                    cache_exports: exports,
                    cache_imports: imports,
                    ..Default::default()
                })
                .await
                .unwrap()
        }
    };

    // A wrong secret: moto checks the signature as AWS does.
    let r = build(
        vec![entry(
            "s3",
            &s3_attrs(&s3, "", &[("secret_access_key", "not-the-secret")]),
        )],
        vec![],
    )
    .await;
    let m = failure(&r);
    assert!(
        m.contains("failed to check file presence in cache")
            && m.contains("operation error S3: HeadObject")
            && m.contains("StatusCode: 403"),
        "{m}"
    );
    // An unknown key id.
    let r = build(
        vec![entry(
            "s3",
            &s3_attrs(&s3, "", &[("access_key_id", "AKIANOSUCHKEY0000000")]),
        )],
        vec![],
    )
    .await;
    let m = failure(&r);
    assert!(m.contains("StatusCode: 403"), "{m}");

    // A bucket that does not exist: the HEAD finds nothing, the upload says why.
    let r = build(
        vec![entry(
            "s3",
            &s3_attrs(&s3, "", &[("bucket", "no-such-bucket")]),
        )],
        vec![],
    )
    .await;
    let m = failure(&r);
    assert!(
        m.contains("error writing layer blob")
            && m.contains("operation error S3: PutObject")
            && m.contains("api error NoSuchBucket"),
        "{m}"
    );
    assert!(s3.list(s3.bucket()).unwrap().is_empty());

    // An endpoint that does not resolve: Go's words, which clients match on.
    let r = build(
        vec![entry(
            "s3",
            &s3_attrs(&s3, "", &[("endpoint_url", "http://fake-url:9000")]),
        )],
        vec![],
    )
    .await;
    let m = failure(&r);
    assert!(
        m.contains("dial tcp: lookup fake-url") && m.contains("no such host"),
        "{m}"
    );

    // No credentials anywhere (berthd's environment has no AWS_* keys).
    let no_creds: Vec<(&str, &str)> = s3_attrs(&s3, "", &[])
        .into_iter()
        .filter(|(k, _)| !k.ends_with("_key") && *k != "access_key_id")
        .collect();
    let r = build(vec![entry("s3", &no_creds)], vec![]).await;
    let m = failure(&r);
    assert!(m.contains("no credentials for s3 cache"), "{m}");

    // ignore-error=true: the same failures do not fail the build.
    let r = build(
        vec![entry(
            "s3",
            &s3_attrs(
                &s3,
                "",
                &[("bucket", "no-such-bucket"), ("ignore-error", "true")],
            ),
        )],
        vec![],
    )
    .await;
    solved(&r, &berthd.log_text());
    assert!(r
        .vertices()
        .values()
        .any(|v| v.name == "exporting cache to s3" && v.error.contains("NoSuchBucket")));

    // An import from a missing bucket is skipped (as buildkitd does) and the build runs.
    let r = build(
        vec![],
        vec![entry(
            "s3",
            &s3_attrs(&s3, "", &[("bucket", "no-such-bucket")]),
        )],
    )
    .await;
    solved(&r, &berthd.log_text());
}
