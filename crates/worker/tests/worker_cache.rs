//! Cache behaviour through the Worker with a real local source: an unchanged rebuild executes
//! nothing, a change re-runs only what depends on it, ignore_cache re-runs, copies are keyed by
//! the content they copy, and results survive a worker restart. Needs root.

mod support;

use std::sync::atomic::Ordering;

use anyhow::Result;
use llb::{CopyOpts, MkdirOpts, MkfileOpts};
use prost::Message;
use support::*;

/// context → copy /app into an image-like base; a separate independent mkfile branch; merge.
fn graph() -> llb::State {
    let ctx: llb::State = llb::local("context").shared_key_hint("context").into();
    let base = llb::scratch()
        .file(llb::mkdir("/etc", 0o755, MkdirOpts::default()))
        .custom_name("base");
    let app = base
        .file(llb::copy(
            &ctx,
            "/app",
            "/srv/app",
            CopyOpts::default().create_dest_path(true),
        ))
        .custom_name("copy app");
    let docs = base
        .file(llb::copy(
            &ctx,
            "/docs",
            "/srv/docs",
            CopyOpts::default().create_dest_path(true),
        ))
        .custom_name("copy docs");
    app.file(llb::copy(
        &docs,
        "/srv/docs",
        "/srv/docs",
        CopyOpts::default(),
    ))
    .custom_name("combine")
}

#[tokio::test]
async fn rebuild_cached_and_changes_rerun_only_dependents() -> Result<()> {
    let w = TestWorker::new()?;
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("app"))?;
    std::fs::create_dir_all(dir.path().join("docs"))?;
    std::fs::write(dir.path().join("app/main.rs"), "fn main() {}\n")?;
    std::fs::write(dir.path().join("docs/README"), "v1\n")?;
    let session = DirSession::with("context", dir.path());

    let s1 = solve(&w.worker, &graph(), session.clone()).await;
    let r1 = s1.ok();
    assert_eq!(
        read(r1, "/srv/app/main.rs").await?.as_deref(),
        Some("fn main() {}\n")
    );
    assert_eq!(read(r1, "/srv/docs/README").await?.as_deref(), Some("v1\n"));
    assert_eq!(
        s1.executed(),
        vec![
            "base",
            "combine",
            "copy app",
            "copy docs",
            "local://context"
        ]
    );

    // Unchanged rebuild: the context is synced again, nothing executes.
    let s2 = solve(&w.worker, &graph(), session.clone()).await;
    assert!(s2.executed().is_empty(), "executed: {:?}", s2.executed());
    assert_eq!(s2.completed().len(), 5);
    assert!(s2.completed().iter().all(|(_, cached)| *cached));
    assert_eq!(
        s2.ok().snapshot_id(),
        r1.snapshot_id(),
        "same result snapshot"
    );
    assert_eq!(session.syncs.load(Ordering::SeqCst), 2);

    // Touching a file (new mtime, same content) keeps everything cached.
    let f = std::fs::File::options()
        .write(true)
        .open(dir.path().join("app/main.rs"))?;
    f.set_modified(std::time::SystemTime::UNIX_EPOCH)?;
    drop(f);
    let s3 = solve(&w.worker, &graph(), session.clone()).await;
    assert!(s3.executed().is_empty(), "executed: {:?}", s3.executed());

    // Changing docs: the local source gets a new snapshot; "copy app" only copies /app, whose
    // content is unchanged, so it stays cached; "copy docs" and "combine" re-run.
    std::fs::write(dir.path().join("docs/README"), "v2\n")?;
    let s4 = solve(&w.worker, &graph(), session.clone()).await;
    assert_eq!(
        s4.executed(),
        vec!["combine", "copy docs", "local://context"],
        "completed: {:?}",
        s4.completed()
    );
    assert_eq!(
        read(s4.ok(), "/srv/docs/README").await?.as_deref(),
        Some("v2\n")
    );
    assert_eq!(
        read(s4.ok(), "/srv/app/main.rs").await?.as_deref(),
        Some("fn main() {}\n")
    );
    Ok(())
}

#[tokio::test]
async fn ignore_cache_reruns_and_cache_survives_restart() -> Result<()> {
    let root = tempfile::Builder::new()
        .prefix("berth-worker-restart-")
        .tempdir_in("/var/tmp")?;
    require_root();
    let st = llb::scratch()
        .file(llb::mkfile("/f", 0o644, "x", MkfileOpts::default()))
        .custom_name("make f");
    let def = st.marshal()?;
    {
        let w = worker::Worker::new(worker::WorkerOptions::new(root.path()))?;
        let s = solve_def(&w, def.clone(), no_session()).await;
        assert_eq!(s.executed(), vec!["make f"]);
    }
    // A new worker on the same root finds the result in the persisted cache.
    let w = worker::Worker::new(worker::WorkerOptions::new(root.path()))?;
    let s = solve_def(&w, def.clone(), no_session()).await;
    assert!(
        s.executed().is_empty(),
        "cached across restart: {:?}",
        s.completed()
    );
    assert_eq!(read(s.ok(), "/f").await?.as_deref(), Some("x"));
    // ignore_cache executes again.
    let s = solve(&w, &st.clone().ignore_cache(), no_session()).await;
    assert_eq!(s.executed(), vec!["make f"]);
    Ok(())
}

#[tokio::test]
async fn concurrent_identical_builds_execute_once() -> Result<()> {
    let w = TestWorker::new()?;
    // A big enough file that the two builds overlap.
    let data = vec![b'z'; 8 << 20];
    let st = llb::scratch()
        .file(llb::mkfile("/big", 0o644, data, MkfileOpts::default()))
        .custom_name("big");
    let (a, b) = tokio::join!(
        solve(&w.worker, &st, no_session()),
        solve(&w.worker, &st, no_session())
    );
    // Had the vertex run twice, each build would have committed its own snapshot. (The waiting
    // build reports the vertex as running, not cached: it waited for the shared execution.)
    assert_eq!(
        a.ok().snapshot_id(),
        b.ok().snapshot_id(),
        "a: {:?} b: {:?}",
        a.completed(),
        b.completed()
    );
    Ok(())
}

#[tokio::test]
async fn go_fixture_definition_solves() -> Result<()> {
    // The definition buildctl v0.11.6 sent in the captured `build-local` scenario, with the
    // same build context (see crates/protos/tests/fixtures/README.md).
    let w = TestWorker::new()?;
    let bytes = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../protos/tests/fixtures/definition_local_fileop.pb"),
    )?;
    let def = protos::pb::Definition::decode(bytes.as_slice())?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("a.txt"), "hello context\n")?;
    std::fs::write(dir.path().join("c.skip"), "skip me\n")?;
    std::fs::create_dir(dir.path().join("dir"))?;
    std::fs::write(dir.path().join("dir/b.txt"), "nested\n")?;
    std::os::unix::fs::symlink("a.txt", dir.path().join("link"))?;
    let s = solve_def(&w.worker, def, DirSession::with("context", dir.path())).await;
    let r = s.ok();
    assert_eq!(
        read(r, "/out/sub/hello.txt").await?.as_deref(),
        Some("hello from berth fixture\n")
    );
    assert_eq!(list(r, "/out/ctx").await?, vec!["a.txt", "dir", "link"]);
    assert_eq!(
        read(r, "/out/ctx/dir/b.txt").await?.as_deref(),
        Some("nested\n")
    );
    let names: Vec<String> = s.completed().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"assemble output".to_string()), "{names:?}");
    assert!(names.contains(&"local://context".to_string()), "{names:?}");
    // Vertex digests are the Go op digests (the keys of the definition's metadata).
    let bytes = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../protos/tests/fixtures/definition_local_fileop.pb"),
    )?;
    let def = protos::pb::Definition::decode(bytes.as_slice())?;
    for e in &s.events {
        if let worker::ProgressEvent::VertexStarted { digest, .. } = e {
            assert!(def.metadata.contains_key(digest), "{digest}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn cancel_releases_everything() -> Result<()> {
    let w = TestWorker::new()?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("f"), "x")?;
    // A session that never finishes syncing: the build can only end by cancellation.
    struct Stuck;
    #[async_trait::async_trait]
    impl worker::SessionProvider for Stuck {
        async fn sync_local(
            &self,
            _req: &worker::LocalSync,
            _dest: &std::path::Path,
            _p: &worker::TransferProgress,
        ) -> worker::Result<worker::SyncStats> {
            futures::future::pending().await
        }
    }
    let ctx: llb::State = llb::local("context").into();
    let st = ctx.file(llb::mkfile("/x", 0o644, "x", MkfileOpts::default()));
    let (sink, mut rx) = worker::ProgressSink::channel();
    let cancel = tokio_util::sync::CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        c2.cancel();
    });
    let ctx = worker::SolveContext::new("cancel-test", std::sync::Arc::new(Stuck), sink, cancel);
    let res = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        w.worker.solve(st.marshal()?, ctx),
    )
    .await?;
    assert_eq!(res.unwrap_err().kind(), worker::ErrorKind::Canceled);
    let mut canceled = 0;
    while let Ok(e) = rx.try_recv() {
        if let worker::ProgressEvent::VertexCompleted { error: Some(e), .. } = e {
            assert_eq!(e, "context canceled");
            canceled += 1;
        }
    }
    assert_eq!(
        canceled, 1,
        "the running local source is completed as canceled"
    );
    // No mounts left under the worker root.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let root = w.root.path().to_string_lossy().into_owned();
    assert!(!mounts.contains(&root), "mounts left under {root}");
    Ok(())
}
