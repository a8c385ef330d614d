//! `--export-cache type=inline` rebuilt on the same node (BuildKit's
//! TestBasicInlineCacheImportExport): berthd builds an image with the inline cache and pushes it;
//! the image is also in the bound Docker Engine. After a prune of berth's cache, the same build
//! with `--import-cache type=registry,ref=<image>` runs nothing and gives the same manifest digest.
//!
//! The imported chain is found in Docker (the image is there) and used in place, so the layers'
//! creation times must be the cache's, which berth records by chainID, not the time Docker
//! registered the layers (which is what an image rebuilt from them had before: another history,
//! another config, another digest).
//!
//! Needs root, runc, overlayfs, the system Docker Engine and Debian's docker-registry.

mod export_support;

use std::collections::BTreeMap;

use export_support::*;
use integration::buildkit_client::{Berthd, BuildOptions, Output};
use integration::{busybox_image, require_root, unique_name, DockerEngine, Registry};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_cache_rebuild_on_the_same_node_keeps_the_digest() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let reg = Registry::start().unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let client = berthd.client().await.unwrap();

    // Upstream's shape: two steps writing into a scratch mount; the result is that mount.
    let busybox = llb::State::from(llb::image(base.reference()));
    let first = busybox
        .run(
            RunOpts::shell("echo -n foobar > /wd/const").mount(Mount::bind("/wd", &llb::scratch())),
        )
        .get_mount("/wd")
        .unwrap();
    let def = busybox
        .run(
            RunOpts::shell("head -c 100 /dev/urandom | sha256sum > /wd/unique")
                .mount(Mount::bind("/wd", &first)),
        )
        .get_mount("/wd")
        .unwrap()
        .marshal()
        .unwrap();
    let target = format!(
        "{}/{}:latest",
        reg.addr(),
        unique_name("berth-test/inline-rebuild")
    );
    let build = |imports: Vec<control::CacheOptionsEntry>| {
        let client = &client;
        let def = def.clone();
        let target = target.clone();
        async move {
            client
                .build(BuildOptions {
                    definition: Some(def),
                    output: Output::Raw(
                        "image".into(),
                        BTreeMap::from([
                            ("name".to_string(), target),
                            ("push".to_string(), "true".to_string()),
                        ]),
                    ),
                    cache_exports: vec![entry("inline", &[])],
                    cache_imports: imports,
                    ..Default::default()
                })
                .await
                .unwrap()
        }
    };

    let first = build(vec![]).await;
    let r1 = response(&first, &berthd.log_text());
    let id1 = r1["containerimage.config.digest"].clone();
    let _cleanup = RemoveImages(None, vec![target.clone(), id1.clone()]);
    // The image (so its layers) is in Docker: the import below finds its chain there.
    assert_eq!(tag_target(None, &target).as_deref(), Some(id1.as_str()));

    // Everything berth holds goes.
    let mut ctl = client.control();
    let mut s = ctl
        .prune(control::PruneRequest {
            all: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut pruned = 0;
    while s.message().await.unwrap().is_some() {
        pruned += 1;
    }
    assert!(pruned > 0, "prune removed nothing");
    // Let a moment pass, so a creation time taken now could not pass for the first build's.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    let second = build(vec![entry("registry", &[("ref", &target)])]).await;
    let r2 = response(&second, &berthd.log_text());
    let log = berthd.log_text();
    assert!(
        log.contains("imported=1 executed=0"),
        "the rebuild ran a step:\n{log}"
    );
    assert_eq!(
        r2["containerimage.config.digest"], id1,
        "the rebuilt image's config differs (history times?)"
    );
    assert_eq!(r2["containerimage.digest"], r1["containerimage.digest"]);
}
