//! docker-image sources, MergeOp and DiffOp through the worker, against the system Docker
//! Engine, runc and overlayfs. Needs root, runc and busybox-static.

mod worker_ops_support;

use anyhow::Result;
use integration::{busybox_image, multi_layer_image, DockerEngine};
use llb::RunOpts;
use worker::{ErrorKind, LayerRef};
use worker_ops_support::*;

/// The image's layers are Docker's own directories, used in place; the multi-layer image's
/// whiteouts and opaque dir are honoured.
#[tokio::test]
async fn image_in_place_from_docker() -> Result<()> {
    let w = TestWorker::new()?;
    let engine = DockerEngine::system()?;
    let img = multi_layer_image(&engine).await?;
    let info = engine.client().info().await?;
    let data_root = info.docker_root_dir.unwrap();
    // The results hold the base image's pin; they are dropped at the end of this block.
    {
        let s = solve(&w.worker, &llb::image(img.reference()).state()).await;
        let r = s.ok();
        let layers = r.chain().layers();
        assert_eq!(layers.len(), 3);
        for l in layers {
            match l {
                LayerRef::Docker(d) => assert!(
                    d.diff_dir.starts_with(&data_root),
                    "{} not under {data_root}",
                    d.diff_dir.display()
                ),
                other => panic!("layer copied into berth: {other:?}"),
            }
        }
        // No berth layer was written for the image.
        let berth_layers = std::fs::read_dir(w.root().join("snapshots/layers"))?.count();
        assert_eq!(berth_layers, 0);
        for (path, content) in integration::MULTI_LAYER_FILES {
            assert_eq!(read(r, path).await?.as_deref(), Some(*content), "{path}");
        }
        for path in integration::MULTI_LAYER_ABSENT {
            assert_eq!(read(r, path).await?, None, "{path}");
        }
        // The vertex reported its resolve status.
        assert!(s.events.iter().any(|e| matches!(e,
        worker::ProgressEvent::VertexStatus { name, .. } if name.starts_with("resolve "))));
        // layerlimit keeps the bottom layers only.
        let s = solve(
            &w.worker,
            &llb::image(img.reference()).layer_limit(1).state(),
        )
        .await;
        assert_eq!(s.ok().chain().layers().len(), 1);
        assert_eq!(read(s.ok(), "/data/keep/a.txt").await?, None);
    }
    // The pins taken during the builds are released once their results are dropped.
    let label = format!("dev.berth.pin=worker:{}", w.root().display());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let filters = std::collections::HashMap::from([("label".to_string(), vec![label.clone()])]);
        let opts = integration::bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let left = engine.client().list_containers(Some(opts)).await?;
        if left.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "pins left: {left:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Re-tagging the reference to another image re-runs dependent steps (cache key = image ID);
/// a missing image with resolvemode=local is NotFound.
#[tokio::test]
async fn image_retag_invalidates_and_local_mode() -> Result<()> {
    let w = TestWorker::new()?;
    let engine = DockerEngine::system()?;
    let a = busybox_image(&engine).await?;
    let b = multi_layer_image(&engine).await?;
    let tag = format!("berth-test/retag:{}", integration::unique_name("t"));
    let t = a.tag_as(&tag).await?;
    let st = llb::image(&tag)
        .state()
        .run(RunOpts::shell("ls /data > /ls 2>&1 || echo none > /ls"))
        .root();
    let s1 = solve(&w.worker, &st).await;
    assert_eq!(read(s1.ok(), "/ls").await?.as_deref(), Some("none\n"));
    let again = solve(&w.worker, &st).await;
    assert!(again.completed().iter().all(|(_, c)| *c));
    engine.tag(b.reference(), &tag).await?;
    let s2 = solve(&w.worker, &st).await;
    assert_eq!(
        read(s2.ok(), "/ls").await?.as_deref(),
        Some("keep\nopaque\n")
    );
    assert!(
        s2.completed().iter().all(|(_, c)| !*c),
        "{:?}",
        s2.completed()
    );
    drop(t);

    let missing = format!("berth-test/absent:{}", integration::unique_name("m"));
    let s = solve(
        &w.worker,
        &llb::image(&missing).resolve_mode("local").state(),
    )
    .await;
    let err = s.result.expect_err("missing image");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    Ok(())
}

/// Merge concatenates chains (whiteouts of an input apply below it); a diff against an
/// ancestor reuses the layer; a diff between siblings is one computed layer with deletions.
#[tokio::test]
async fn merge_and_diff() -> Result<()> {
    let w = TestWorker::new()?;
    let engine = DockerEngine::system()?;
    let img = busybox_image(&engine).await?;
    let base = llb::image(img.reference()).state();
    let a = base.run(RunOpts::shell("echo a > /a.txt")).root();
    let b = base
        .run(RunOpts::shell(
            "echo b > /b.txt; rm -r /home; rm /etc/group",
        ))
        .root();
    let base_len = solve(&w.worker, &base).await.ok().chain().layers().len();

    let da = solve(&w.worker, &llb::diff(&base, &a)).await;
    let da_layers = da.ok().chain().layers().to_vec();
    assert_eq!(da_layers.len(), 1);
    let a_top = solve(&w.worker, &a)
        .await
        .ok()
        .chain()
        .layers()
        .last()
        .cloned();
    assert_eq!(
        Some(da_layers[0].clone()),
        a_top,
        "diff did not reuse the layer"
    );
    assert_eq!(read(da.ok(), "/a.txt").await?.as_deref(), Some("a\n"));
    assert_eq!(read(da.ok(), "/bin/sh").await?, None);

    let m = llb::merge(&[base.clone(), llb::diff(&base, &a), llb::diff(&base, &b)]);
    let s = solve(&w.worker, &m).await;
    let r = s.ok();
    assert_eq!(r.chain().layers().len(), base_len + 2);
    assert_eq!(read(r, "/a.txt").await?.as_deref(), Some("a\n"));
    assert_eq!(read(r, "/b.txt").await?.as_deref(), Some("b\n"));
    let mnt = r.mount().await?;
    assert!(!mnt.path().join("home").exists(), "whiteout not applied");
    assert!(
        !mnt.path().join("etc/group").exists(),
        "nested whiteout not applied"
    );
    assert!(mnt.path().join("etc/passwd").exists());
    assert!(mnt.path().join("bin/sh").exists());
    drop(mnt);

    // Not an ancestor: computed layer; merge(a, diff(a, b)) == b, with a top-level deletion
    // (/home) and one nested in a directory both sides have (/etc/group).
    let dab = solve(&w.worker, &llb::diff(&a, &b)).await;
    assert_eq!(dab.ok().chain().layers().len(), 1);
    let ab = llb::merge(&[a.clone(), llb::diff(&a, &b)]);
    let s = solve(&w.worker, &ab).await;
    let r = s.ok();
    assert_eq!(read(r, "/b.txt").await?.as_deref(), Some("b\n"));
    assert_eq!(read(r, "/a.txt").await?, None);
    let mnt = r.mount().await?;
    assert!(!mnt.path().join("home").exists());
    assert!(!mnt.path().join("etc/group").exists());
    assert!(mnt.path().join("etc/passwd").exists());
    drop(mnt);
    // Rebuild: every vertex cached.
    let again = solve(&w.worker, &ab).await;
    assert!(
        again.completed().iter().all(|(_, c)| *c),
        "{:?}",
        again.completed()
    );
    Ok(())
}
