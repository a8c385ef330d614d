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
    assert!(e.to_string().contains("\"other\""), "names the local: {e}");
    assert!(e.vertex_digest().is_some(), "names the vertex: {e:?}");
    Ok(())
}

/// The worker's persistent sync directory of the only local source synced so far.
fn sync_dir(w: &TestWorker) -> Result<std::path::PathBuf> {
    let local = w.root.path().join("worker/local");
    let dirs: Vec<_> = std::fs::read_dir(&local)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()?
        .into_iter()
        .filter(|p| p.is_dir())
        .collect();
    anyhow::ensure!(dirs.len() == 1, "one sync directory in {local:?}: {dirs:?}");
    Ok(dirs[0].clone())
}

#[tokio::test]
async fn same_size_content_change_invalidates_and_keeps_metadata() -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let w = TestWorker::new()?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    std::fs::create_dir(d.join("sub"))?;
    std::fs::set_permissions(d.join("sub"), std::fs::Permissions::from_mode(0o750))?;
    std::fs::write(d.join("sub/a.txt"), "aaaa")?;
    std::fs::set_permissions(d.join("sub/a.txt"), std::fs::Permissions::from_mode(0o640))?;
    std::os::unix::fs::chown(d.join("sub/a.txt"), Some(1234), Some(5678))?;
    std::fs::write(d.join("b.txt"), "bbbb")?;
    std::os::unix::fs::symlink("sub/a.txt", d.join("link"))?;
    let session = DirSession::with("ctx", d);
    let st: llb::State = llb::local("ctx").into();

    let s1 = solve(&w.worker, &st, session.clone()).await;
    let r1 = s1.ok();
    assert_eq!(read(r1, "/sub/a.txt").await?.as_deref(), Some("aaaa"));
    let m = meta(r1, "/sub/a.txt").await?.expect("a.txt");
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o640, 1234, 5678));
    let m = meta(r1, "/sub").await?.expect("sub");
    assert_eq!(m.mode() & 0o7777, 0o750);
    let m = meta(r1, "/link").await?.expect("link");
    assert!(m.file_type().is_symlink());

    // Same size, new content, new mtime: fsutil's receiver (upstream's `sameFile` too) compares
    // size and mtime, so the mtime is what makes the sync notice; the key must follow.
    let f = d.join("sub/a.txt");
    let old_mtime = std::fs::metadata(&f)?.modified()?;
    std::fs::write(&f, "AAAA")?;
    std::fs::File::options()
        .write(true)
        .open(&f)?
        .set_modified(old_mtime + std::time::Duration::from_secs(7))?;
    let s2 = solve(&w.worker, &st, session.clone()).await;
    assert_eq!(
        s2.executed(),
        vec!["local://ctx"],
        "a changed file re-runs the source"
    );
    let r2 = s2.ok();
    assert_eq!(read(r2, "/sub/a.txt").await?.as_deref(), Some("AAAA"));
    assert_eq!(read(r2, "/b.txt").await?.as_deref(), Some("bbbb"));
    let m = meta(r2, "/sub/a.txt").await?.expect("a.txt");
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o640, 1234, 5678));
    // The first result still has the old content: results share no file a sync rewrites.
    assert_eq!(read(r1, "/sub/a.txt").await?.as_deref(), Some("aaaa"));

    // Changing it back gives the first key again: a cache hit on the first result.
    std::fs::write(&f, "aaaa")?;
    let s3 = solve(&w.worker, &st, session.clone()).await;
    assert!(
        s3.executed().is_empty(),
        "same content as the first build: cached"
    );
    assert_eq!(read(s3.ok(), "/sub/a.txt").await?.as_deref(), Some("aaaa"));
    Ok(())
}

#[tokio::test]
async fn unchanged_resync_reads_no_file_contents() -> Result<()> {
    let w = TestWorker::new()?;
    let dir = tempfile::tempdir()?;
    for i in 0..20 {
        std::fs::write(
            dir.path().join(format!("f{i:02}")),
            format!("content {i:02}"),
        )?;
    }
    let session = DirSession::with("ctx", dir.path());
    let st: llb::State = llb::local("ctx").into();
    let s1 = solve(&w.worker, &st, session.clone()).await;
    assert_eq!(s1.executed(), vec!["local://ctx"]);

    // Rewrite a synced file in place behind the worker's back, keeping its size, mtime and
    // inode: only a checksum that re-reads unchanged files' contents can notice. The re-sync
    // sends nothing (the client's tree did not change) and the key must come from the digests
    // kept for unchanged stat data, so the source stays cached.
    let synced = sync_dir(&w)?.join("f07");
    let before = std::fs::metadata(&synced)?;
    std::fs::write(&synced, "CONTENT 07")?;
    std::fs::File::options()
        .write(true)
        .open(&synced)?
        .set_modified(before.modified()?)?;
    let s2 = solve(&w.worker, &st, session.clone()).await;
    assert_eq!(transferred(&s2), Some(0), "nothing re-sent");
    assert!(
        s2.executed().is_empty(),
        "an unchanged re-sync must not re-read file contents: {:?}",
        s2.executed()
    );

    // A real change from the client still gets through (new inode, new stat).
    std::fs::write(dir.path().join("f03"), "changed 03")?;
    let s3 = solve(&w.worker, &st, session.clone()).await;
    assert_eq!(s3.executed(), vec!["local://ctx"]);
    assert_eq!(read(s3.ok(), "/f03").await?.as_deref(), Some("changed 03"));
    Ok(())
}

/// upstream TestFileOpCopyIncludeExclude: a copy with include/exclude patterns copies only what
/// they select, and a file they leave out, added to the local source later, does not invalidate
/// the copy (its cache key checksums only the selected content) nor what is built on it; a
/// change to a selected file does.
#[tokio::test]
async fn copy_patterns_decide_the_cache_key() -> Result<()> {
    use llb::CopyOpts;
    let w = TestWorker::new()?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    std::fs::write(d.join("myfile"), "data0")?;
    std::fs::create_dir(d.join("sub"))?;
    std::fs::write(d.join("sub/foo"), "foo0")?;
    std::fs::write(d.join("sub/bar"), "bar0")?;
    let session = DirSession::with("mylocal", d);
    let st = llb::scratch()
        .file(llb::copy(
            llb::State::from(llb::local("mylocal")),
            "/",
            "/",
            CopyOpts::default().include(["sub/*"]).exclude(["sub/bar"]),
        ))
        .file(llb::mkfile("/after", 0o644, "x", Default::default()));

    let s1 = solve(&w.worker, &st, session.clone()).await;
    assert_eq!(list(s1.ok(), "/").await?, vec!["after", "sub"]);
    assert_eq!(list(s1.ok(), "/sub").await?, vec!["foo"]);
    assert_eq!(s1.executed().len(), 3, "{:?}", s1.executed());

    // Files the patterns leave out: nothing after the source runs again.
    std::fs::write(d.join("unmatchedfile"), "data1")?;
    std::fs::write(d.join("sub/bar"), "bar1")?;
    let s2 = solve(&w.worker, &st, session.clone()).await;
    s2.ok();
    assert_eq!(
        s2.executed(),
        vec!["local://mylocal"],
        "{:?}",
        s2.completed()
    );

    // A selected file changed: the copy and the step after it run again.
    std::fs::write(d.join("sub/foo"), "foo1")?;
    let s3 = solve(&w.worker, &st, session.clone()).await;
    assert_eq!(read(s3.ok(), "/sub/foo").await?.as_deref(), Some("foo1"));
    assert_eq!(s3.executed().len(), 3, "{:?}", s3.completed());
    Ok(())
}

/// Sets `path`'s mtime to `secs` seconds and `nanos` nanoseconds after the epoch.
fn set_mtime(path: &std::path::Path, secs: u64, nanos: u32) -> Result<()> {
    std::fs::File::options()
        .write(true)
        .open(path)?
        .set_modified(std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos))?;
    Ok(())
}

/// A content change that keeps the size and the mtime's second (only the nanoseconds differ)
/// is still caught: the receiver compares mtimes in nanoseconds (with the listing it kept from
/// the last sync), re-requests the file, and the key follows; an untouched re-sync right after stays cached on the new content.
#[tokio::test]
async fn same_size_same_mtime_second_change_is_caught() -> Result<()> {
    let w = TestWorker::new()?;
    let dir = tempfile::tempdir()?;
    let f = dir.path().join("a.txt");
    std::fs::write(&f, "aaaa")?;
    std::fs::write(dir.path().join("b.txt"), "bbbb")?;
    set_mtime(&f, 1_700_000_000, 100_000_000)?;
    let session = DirSession::with("ctx", dir.path());
    let st: llb::State = llb::local("ctx").into();
    let s1 = solve(&w.worker, &st, session.clone()).await;
    assert_eq!(s1.executed(), vec!["local://ctx"]);
    // The re-syncs diff against the listing the receiver kept, not a walk of the directory.
    let state = sync_dir(&w)?.with_extension("listing");
    assert!(state.is_file(), "{state:?} kept after the sync");

    std::fs::write(&f, "AAAA")?;
    set_mtime(&f, 1_700_000_000, 200_000_000)?;
    let s2 = solve(&w.worker, &st, session.clone()).await;
    assert_eq!(
        s2.executed(),
        vec!["local://ctx"],
        "same size, same mtime second: still a change"
    );
    assert_eq!(read(s2.ok(), "/a.txt").await?.as_deref(), Some("AAAA"));

    let s3 = solve(&w.worker, &st, session.clone()).await;
    assert!(s3.executed().is_empty(), "nothing changed since: cached");
    assert_eq!(read(s3.ok(), "/a.txt").await?.as_deref(), Some("AAAA"));
    Ok(())
}

/// A re-sync that changes nothing takes the key from the checksum stored beside the sync
/// directory (`<dir>.sum`) instead of walking the tree again: a file replaced behind the
/// worker's back (new inode, new content, same size and mtime) goes unseen while the sum file
/// is there, and is seen by the full checksum once the sum file is gone.
#[tokio::test]
async fn unchanged_resync_reuses_the_stored_checksum() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let w = TestWorker::new()?;
    let dir = tempfile::tempdir()?;
    for i in 0..5 {
        std::fs::write(dir.path().join(format!("f{i}")), format!("file {i}"))?;
    }
    let session = DirSession::with("ctx", dir.path());
    let st: llb::State = llb::local("ctx").into();
    let s1 = solve(&w.worker, &st, session.clone()).await;
    assert_eq!(s1.executed(), vec!["local://ctx"]);
    let sync = sync_dir(&w)?;
    let sum_file = sync.with_extension("sum");
    assert!(
        sum_file.is_file(),
        "{sum_file:?} written after the checksum"
    );

    // Replace f2 in the sync directory: new inode, other content, same size, mode and mtime.
    let synced = sync.join("f2");
    let before = std::fs::metadata(&synced)?;
    let tmp = sync.join(".f2.tmp");
    std::fs::write(&tmp, "FILE 2")?;
    std::fs::File::options()
        .write(true)
        .open(&tmp)?
        .set_modified(before.modified()?)?;
    std::fs::rename(&tmp, &synced)?;
    assert_ne!(std::fs::metadata(&synced)?.ino(), before.ino());

    let s2 = solve(&w.worker, &st, session.clone()).await;
    assert_eq!(transferred(&s2), Some(0), "nothing re-sent");
    assert!(
        s2.executed().is_empty(),
        "unchanged sync: the stored checksum is the key, no second walk: {:?}",
        s2.executed()
    );
    assert!(sum_file.is_file(), "{sum_file:?} kept for the next build");

    // Without the sum file the tree is checksummed again and the new inode is read.
    std::fs::remove_file(&sum_file)?;
    let s3 = solve(&w.worker, &st, session.clone()).await;
    assert_eq!(s3.executed(), vec!["local://ctx"]);
    assert_eq!(read(s3.ok(), "/f2").await?.as_deref(), Some("FILE 2"));
    Ok(())
}

/// A copy from a new local-source snapshot takes the checksum the source computed for its
/// own key; a worker restarted on the same root computes it from the snapshot instead, and
/// must get the same copy keys (both copies stay cached), for a plain copy of `/` and for a
/// Dockerfile-style one (wildcards allowed, symlinks followed).
#[tokio::test]
async fn copy_keys_from_the_sources_checksum_match_computed_ones() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    require_root();
    let root = tempfile::Builder::new()
        .prefix("berth-worker-local-memo-")
        .tempdir_in("/var/tmp")?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    std::fs::create_dir(d.join("sub"))?;
    std::fs::set_permissions(d.join("sub"), std::fs::Permissions::from_mode(0o750))?;
    std::fs::write(d.join("sub/a"), "a")?;
    std::os::unix::fs::chown(d.join("sub/a"), Some(1234), Some(5678))?;
    std::fs::write(d.join("b"), "b")?;
    std::os::unix::fs::symlink("sub/a", d.join("link"))?;
    let session = DirSession::with("ctx", d);
    let local: llb::State = llb::local("ctx").into();
    let st = llb::scratch()
        .file(
            llb::copy(&local, "/", "/plain", llb::CopyOpts::default()).copy(
                &local,
                "/",
                "/docker",
                llb::CopyOpts::default()
                    .allow_wildcard(true)
                    .follow_symlinks(true)
                    .create_dest_path(true),
            ),
        )
        .custom_name("copy ctx");
    let def = st.marshal()?;
    for round in 0..2 {
        {
            let w = worker::Worker::new(worker::WorkerOptions::new(root.path()))?;
            let s = solve_def(&w, def.clone(), session.clone()).await;
            assert_eq!(
                s.executed(),
                vec!["copy ctx", "local://ctx"],
                "round {round}"
            );
            // Restarted: nothing in memory, the checksum comes from the snapshot.
            drop(s);
            drop(w);
            let w = worker::Worker::new(worker::WorkerOptions::new(root.path()))?;
            let s = solve_def(&w, def.clone(), session.clone()).await;
            assert!(
                s.executed().is_empty(),
                "round {round}: same keys after a restart: {:?}",
                s.executed()
            );
            assert_eq!(read(s.ok(), "/plain/sub/a").await?.as_deref(), Some("a"));
        }
        // Round 1: one file changed.
        std::fs::write(d.join("b"), "B2")?;
    }
    Ok(())
}
