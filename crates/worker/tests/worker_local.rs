//! `local://` sources through a session serving a real directory with fsutil's DiffCopy
//! sender/receiver: filters reach the session, re-syncs are incremental, transfer progress is
//! reported, unknown names fail as NotFound. Needs root.

mod support;

use anyhow::Result;
use support::*;
use worker::{ErrorKind, ProgressEvent};

/// Bytes reported by the final `transferring <name>:` status of a solve.
fn transferred(s: &Solve) -> Option<i64> {
    s.events.iter().rev().find_map(|e| match e {
        ProgressEvent::VertexStatus {
            id,
            current,
            completed: Some(_),
            ..
        } if id.starts_with("transferring ") => Some(*current),
        _ => None,
    })
}

#[tokio::test]
async fn filters_incremental_sync_and_progress() -> Result<()> {
    let w = TestWorker::new()?;
    let dir = tempfile::tempdir()?;
    std::fs::create_dir(dir.path().join("sub"))?;
    std::fs::write(dir.path().join("a.txt"), vec![b'a'; 100_000])?;
    std::fs::write(dir.path().join("b.log"), "log")?;
    std::fs::write(dir.path().join("sub/c.txt"), "c")?;
    let session = DirSession::with("ctx", dir.path());
    let st: llb::State = llb::local("ctx")
        .include(["*.txt", "sub"])
        .exclude(["sub/c.txt"])
        .shared_key_hint("ctx")
        .into();

    let s1 = solve(&w.worker, &st, session.clone()).await;
    let r = s1.ok();
    assert_eq!(list(r, "/").await?, vec!["a.txt", "sub"]);
    assert!(list(r, "/sub").await?.is_empty());
    let req = session.requests.lock().unwrap()[0].clone();
    assert_eq!(req.include_patterns, vec!["*.txt", "sub"]);
    assert_eq!(req.exclude_patterns, vec!["sub/c.txt"]);
    assert_eq!(req.shared_key_hint.as_deref(), Some("ctx"));
    let first = transferred(&s1).expect("transfer status");
    assert!(
        first >= 100_000,
        "first sync transfers the content: {first}"
    );
    assert_eq!(
        s1.completed()
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>(),
        vec!["local://ctx"],
        "two include patterns: no pattern suffix in the name"
    );

    // Unchanged: the receiver keeps the previous tree, nothing is re-sent.
    let s2 = solve(&w.worker, &st, session.clone()).await;
    assert_eq!(
        transferred(&s2),
        Some(0),
        "incremental re-sync sends nothing"
    );
    assert!(s2.executed().is_empty());

    // One changed file: only it is transferred, and the result has the new content.
    std::fs::write(dir.path().join("a.txt"), "small now")?;
    let s3 = solve(&w.worker, &st, session.clone()).await;
    let third = transferred(&s3).unwrap();
    assert!(
        third > 0 && third < 1000,
        "only the changed file moves: {third}"
    );
    assert_eq!(read(s3.ok(), "/a.txt").await?.as_deref(), Some("small now"));
    // The earlier result is unchanged (results are immutable snapshots).
    assert_eq!(read(r, "/a.txt").await?.map(|s| s.len()), Some(100_000));
    Ok(())
}

#[tokio::test]
async fn unknown_local_name_is_not_found() -> Result<()> {
    let w = TestWorker::new()?;
    let dir = tempfile::tempdir()?;
    let st: llb::State = llb::local("other").into();
    let s = solve(&w.worker, &st, DirSession::with("ctx", dir.path())).await;
    let e = s.err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(
        e.to_string().contains("local://other"),
        "names the vertex: {e}"
    );
    Ok(())
}
