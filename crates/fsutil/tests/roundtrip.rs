//! Sender ↔ receiver over in-memory channels: trees arrive intact, re-syncs are incremental,
//! hostile listings are refused.

use fsutil::walk::{MapResult, WalkOptions};
use fsutil::{receive, send, Error, Packet, ReceiveOptions, SendOptions, Stat};
use futures::StreamExt;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

async fn transfer(
    src: &Path,
    dest: &Path,
    send_opts: SendOptions,
    recv_opts: ReceiveOptions,
) -> fsutil::receive::ReceiveStats {
    let (to_recv, from_send) = mpsc::channel::<Packet>(64);
    let (to_send, from_recv) = mpsc::channel::<Packet>(64);
    let s = tokio::spawn(send(
        src.to_path_buf(),
        send_opts,
        to_recv,
        ReceiverStream::new(from_recv).map(Ok::<_, Error>),
    ));
    let r = receive(
        dest.to_path_buf(),
        recv_opts,
        to_send,
        ReceiverStream::new(from_send).map(Ok::<_, Error>),
    );
    let stats = r.await.expect("receive");
    s.await.unwrap().expect("send");
    stats
}

fn listing(root: &Path) -> Vec<Stat> {
    let mut out = Vec::new();
    fsutil::walk::walk(
        root,
        &WalkOptions::default(),
        &mut |_| MapResult::Keep,
        &mut |st| {
            out.push(st);
            Ok(())
        },
    )
    .unwrap();
    out
}

fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("dir/sub")).unwrap();
    fs::write(root.join("dir/sub/small.txt"), "hello\n").unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(root.join("big.bin"), &big).unwrap();
    fs::write(root.join("empty"), "").unwrap();
    fs::write(root.join("exec.sh"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(root.join("exec.sh"), fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::symlink("dir/sub/small.txt", root.join("link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/abs", root.join("abslink")).unwrap();
    fs::hard_link(root.join("big.bin"), root.join("dir/hard.bin")).unwrap();
    fs::set_permissions(root.join("dir"), fs::Permissions::from_mode(0o750)).unwrap();
}

#[tokio::test]
async fn full_tree_roundtrip_and_incremental_resync() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let dest = dst.path().join("out");

    let stats = transfer(
        src.path(),
        &dest,
        SendOptions::default(),
        ReceiveOptions::default(),
    )
    .await;
    // big.bin, dir/sub/small.txt, empty, exec.sh (the hardlink is linked, not requested)
    assert_eq!(stats.files_requested, 4, "{stats:?}");
    assert_eq!(stats.bytes_written, 300_000 + 6 + 10);
    let a = listing(src.path());
    let b = listing(&dest);
    assert_eq!(a, b, "trees differ after transfer");
    assert_eq!(
        fs::read(dest.join("big.bin")).unwrap(),
        fs::read(src.path().join("big.bin")).unwrap()
    );
    let m1 = fs::metadata(dest.join("big.bin")).unwrap();
    let m2 = fs::metadata(dest.join("dir/hard.bin")).unwrap();
    assert_eq!(m1.ino(), m2.ino(), "hardlink must share the inode");
    assert_eq!(
        fs::metadata(dest.join("exec.sh")).unwrap().mode() & 0o7777,
        0o4755
    );

    // unchanged re-sync: nothing requested, nothing deleted
    let stats = transfer(
        src.path(),
        &dest,
        SendOptions::default(),
        ReceiveOptions::default(),
    )
    .await;
    assert_eq!(stats.files_requested, 0, "{stats:?}");
    assert_eq!(stats.bytes_written, 0);
    assert_eq!(stats.deleted, 0);

    // change one file, delete one, add one: only the changed/new are requested, the deleted goes
    fs::write(src.path().join("dir/sub/small.txt"), "changed content\n").unwrap();
    fs::remove_file(src.path().join("empty")).unwrap();
    fs::write(src.path().join("new.txt"), "new").unwrap();
    fs::write(dest.join("stale-only-in-dest"), "x").unwrap();
    let stats = transfer(
        src.path(),
        &dest,
        SendOptions::default(),
        ReceiveOptions::default(),
    )
    .await;
    assert_eq!(stats.files_requested, 2, "{stats:?}");
    assert_eq!(stats.deleted, 2, "{stats:?}");
    assert_eq!(listing(src.path()), listing(&dest));

    // differ none re-requests every regular file
    let stats = transfer(
        src.path(),
        &dest,
        SendOptions::default(),
        ReceiveOptions {
            differ_none: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(stats.files_requested, 4, "{stats:?}");
}

#[tokio::test]
async fn filtered_send_and_uid_map() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let opts = SendOptions {
        walk: WalkOptions {
            include_patterns: vec!["dir".into(), "*.sh".into()],
            exclude_patterns: vec!["**/hard.bin".into()],
            follow_paths: vec![],
        },
        map: Some(std::sync::Arc::new(|st: &mut Stat| {
            st.uid = 1234;
            st.gid = 5678;
            MapResult::Keep
        })),
        progress: None,
    };
    transfer(src.path(), dst.path(), opts, ReceiveOptions::default()).await;
    let got: Vec<(String, u32)> = listing(dst.path())
        .into_iter()
        .map(|s| (s.path, s.uid))
        .collect();
    assert_eq!(
        got,
        [
            ("dir".to_string(), 1234),
            ("dir/sub".into(), 1234),
            ("dir/sub/small.txt".into(), 1234),
            ("exec.sh".into(), 1234)
        ]
    );
}

#[tokio::test]
async fn merge_mode_replaces_symlink_and_never_escapes() {
    let outside = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    fs::create_dir(src.path().join("d")).unwrap();
    fs::write(src.path().join("d/x"), "payload").unwrap();
    // the destination holds a symlink named like the incoming directory, pointing outside
    std::os::unix::fs::symlink(outside.path(), dst.path().join("d")).unwrap();
    fs::write(dst.path().join("keep"), "kept").unwrap();
    transfer(
        src.path(),
        dst.path(),
        SendOptions::default(),
        ReceiveOptions {
            merge: true,
            ..Default::default()
        },
    )
    .await;
    assert!(
        !outside.path().join("x").exists(),
        "write escaped through a symlink"
    );
    assert!(fs::symlink_metadata(dst.path().join("d")).unwrap().is_dir());
    assert_eq!(
        fs::read_to_string(dst.path().join("d/x")).unwrap(),
        "payload"
    );
    assert_eq!(
        fs::read_to_string(dst.path().join("keep")).unwrap(),
        "kept",
        "merge must not delete"
    );
}

/// Drives a receiver with a hand-written packet sequence and returns its result.
async fn receive_script(
    dest: &Path,
    packets: Vec<Packet>,
) -> Result<fsutil::receive::ReceiveStats, Error> {
    let (to_recv, from_send) = mpsc::channel::<Packet>(64);
    let (to_send, mut from_recv) = mpsc::channel::<Packet>(64);
    for p in packets {
        to_recv.send(p).await.unwrap();
    }
    drop(to_recv);
    let drain = tokio::spawn(async move { while from_recv.recv().await.is_some() {} });
    let r = receive(
        dest.to_path_buf(),
        ReceiveOptions::default(),
        to_send,
        ReceiverStream::new(from_send).map(Ok::<_, Error>),
    )
    .await;
    drain.await.unwrap();
    r
}

#[tokio::test]
async fn hostile_listings_are_rejected() {
    let file = |p: &str| Stat {
        path: p.into(),
        mode: 0o644,
        ..Default::default()
    };
    let symlink = |p: &str, target: &str| Stat {
        path: p.into(),
        mode: fsutil::filemode::MODE_SYMLINK | 0o777,
        linkname: target.into(),
        ..Default::default()
    };
    let cases: Vec<(&str, Vec<Packet>)> = vec![
        (
            "parent escape",
            vec![Packet::Stat(Some(file("../evil"))), Packet::Stat(None)],
        ),
        (
            "absolute",
            vec![Packet::Stat(Some(file("/evil"))), Packet::Stat(None)],
        ),
        (
            "through symlink",
            vec![
                Packet::Stat(Some(symlink("a", "/"))),
                Packet::Stat(Some(file("a/evil"))),
                Packet::Stat(None),
            ],
        ),
        (
            "out of order",
            vec![
                Packet::Stat(Some(file("b"))),
                Packet::Stat(Some(file("a"))),
                Packet::Stat(None),
            ],
        ),
        (
            "data before listing end",
            vec![Packet::Data {
                id: 0,
                data: "x".into(),
            }],
        ),
        (
            "unrequested id",
            vec![
                Packet::Stat(Some(file("a"))),
                Packet::Stat(None),
                Packet::Data {
                    id: 7,
                    data: "x".into(),
                },
            ],
        ),
        ("sender error", vec![Packet::Err("boom".into())]),
        ("early eof", vec![Packet::Stat(Some(file("a")))]),
    ];
    for (name, packets) in cases {
        let dst = tempfile::tempdir().unwrap();
        let res = receive_script(dst.path(), packets).await;
        assert!(res.is_err(), "{name}: accepted");
    }
    assert!(!Path::new("/evil").exists());
}

/// When writing a file's data fails, the receiver returns (and sends the peer) that failure —
/// the operation, the file and the errno — not the "file writer stopped" its data loop sees
/// after the writer quit. Here the temporary files vanish between the listing and the data, as
/// when a second receiver into the same directory deletes what its listing does not hold.
#[tokio::test]
async fn a_failed_file_write_is_reported_as_the_cause() {
    let dst = tempfile::tempdir().unwrap();
    let file = |p: &str| Stat {
        path: p.into(),
        mode: 0o644,
        size: 1 << 20,
        mod_time: 1_000_000_000,
        ..Default::default()
    };
    let (to_recv, from_send) = mpsc::channel::<Packet>(256);
    let (to_send, mut from_recv) = mpsc::channel::<Packet>(64);
    let dest = dst.path().to_path_buf();
    let recv = tokio::spawn(receive(
        dest.clone(),
        ReceiveOptions::default(),
        to_send,
        ReceiverStream::new(from_send).map(Ok::<_, Error>),
    ));
    for st in [file("a"), file("b")] {
        to_recv.send(Packet::Stat(Some(st))).await.unwrap();
    }
    to_recv.send(Packet::Stat(None)).await.unwrap();
    // Each REQ comes after the receiver created that file's temporary file.
    for _ in 0..2 {
        match from_recv.recv().await {
            Some(Packet::Req { .. }) => {}
            other => panic!("expected a REQ, got {other:?}"),
        }
    }
    let tmps: Vec<_> = fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        tmps.len(),
        2,
        "one temporary file per requested file: {tmps:?}"
    );
    for t in &tmps {
        fs::remove_file(t).unwrap();
    }
    // More chunks than the writer's queue holds: the data loop outlives the writer.
    for id in [0u32, 1] {
        for _ in 0..64 {
            let chunk = bytes::Bytes::from(vec![b'x'; 16 << 10]);
            if to_recv
                .send(Packet::Data { id, data: chunk })
                .await
                .is_err()
            {
                break;
            }
        }
    }
    drop(to_recv);
    let sent_err = tokio::spawn(async move {
        let mut err = None;
        while let Some(p) = from_recv.recv().await {
            if let Packet::Err(m) = p {
                err = Some(m);
            }
        }
        err
    });
    let e = recv.await.unwrap().expect_err("the writes cannot succeed");
    match &e {
        Error::Io { op, path, source } => {
            assert_eq!(*op, "open the temporary file for", "{e}");
            assert_eq!(path, &dest.join("a"), "{e}");
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound, "{e}");
        }
        other => panic!("expected the writer's open error, got {other:?}"),
    }
    let msg = sent_err.await.unwrap().expect("the sender is told why");
    assert!(
        msg.contains("open the temporary file for") && msg.contains("No such file"),
        "{msg}"
    );
}

/// A receive owns its destination until every thread that can still write into it has finished:
/// it holds an exclusive `flock` on the directory, and the next receive waits for it. Here the
/// test holds that lock (as an earlier, cancelled receive's file writer still would): the new
/// receive neither deletes nor writes anything until the lock is released, then completes.
#[tokio::test]
async fn a_receive_waits_while_the_destination_is_still_owned() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let dest = dst.path().join("out");
    fs::create_dir_all(&dest).unwrap();
    fs::write(dest.join("left-by-the-earlier-receive"), "x").unwrap();
    let holder = fs::File::open(&dest).unwrap();
    rustix::fs::flock(&holder, rustix::fs::FlockOperation::LockExclusive).unwrap();

    let (s, d) = (src.path().to_path_buf(), dest.clone());
    let t = tokio::spawn(async move {
        transfer(&s, &d, SendOptions::default(), ReceiveOptions::default()).await
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!t.is_finished(), "the receive must wait for the lock");
    let names: Vec<_> = fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("left-by-the-earlier-receive")],
        "nothing may be deleted or created while another receive owns the destination"
    );

    drop(holder);
    let stats = tokio::time::timeout(std::time::Duration::from_secs(30), t)
        .await
        .expect("the receive completes once the lock is released")
        .unwrap();
    assert_eq!(stats.deleted, 1, "{stats:?}");
    assert_eq!(listing(src.path()), listing(&dest));
}

/// Receive options keeping the destination's state in `dir/state`.
fn with_state(dir: &Path) -> ReceiveOptions {
    ReceiveOptions {
        state: Some(dir.join("state")),
        ..Default::default()
    }
}

/// With a state file, a re-sync diffs the listing against the listing the last receive applied
/// instead of walking the destination; it still catches every kind of change, and it falls back
/// to the walk when the destination's root was changed behind its back.
#[tokio::test]
async fn resync_with_a_state_file_diffs_against_the_last_listing() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let dest = dst.path().join("out");
    let state = dst.path().join("state");
    let sync = || {
        transfer(
            src.path(),
            &dest,
            SendOptions::default(),
            with_state(dst.path()),
        )
    };

    let first = sync().await;
    assert!(!first.state_reused, "{first:?}");
    assert!(state.exists(), "the first receive leaves its state");
    assert_eq!(listing(src.path()), listing(&dest));

    // Nothing changed: the state is read, nothing requested or touched, the file stays.
    let written = fs::metadata(&state).unwrap().modified().unwrap();
    let noop = sync().await;
    assert!(noop.state_reused && noop.unchanged(), "{noop:?}");
    assert_eq!(noop.files_requested, 0, "{noop:?}");
    assert_eq!(fs::metadata(&state).unwrap().modified().unwrap(), written);

    // Same size, same mtime second, other nanoseconds: caught.
    let f = src.path().join("dir/sub/small.txt");
    let m = fs::metadata(&f).unwrap();
    fs::write(&f, "HELLO\n").unwrap();
    let same_second = std::time::UNIX_EPOCH
        + std::time::Duration::new(
            m.mtime() as u64,
            (m.mtime_nsec() as u32 + 1) % 1_000_000_000,
        );
    fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(same_second)
        .unwrap();
    let changed = sync().await;
    assert!(changed.state_reused, "{changed:?}");
    assert_eq!(changed.files_requested, 1, "{changed:?}");
    assert_eq!(
        fs::read_to_string(dest.join("dir/sub/small.txt")).unwrap(),
        "HELLO\n"
    );
    assert_eq!(listing(src.path()), listing(&dest));

    // A directory with contents becomes a file, a file becomes a directory with contents, a
    // file is removed, one is added below a new directory.
    fs::remove_dir_all(src.path().join("dir/sub")).unwrap();
    fs::write(src.path().join("dir/sub"), "now a file").unwrap();
    fs::remove_file(src.path().join("exec.sh")).unwrap();
    fs::create_dir(src.path().join("exec.sh")).unwrap();
    fs::write(src.path().join("exec.sh/inner"), "inside").unwrap();
    fs::remove_file(src.path().join("empty")).unwrap();
    fs::create_dir_all(src.path().join("new/deeper")).unwrap();
    fs::write(src.path().join("new/deeper/f"), "f").unwrap();
    let reshaped = sync().await;
    assert!(reshaped.state_reused, "{reshaped:?}");
    assert_eq!(reshaped.deleted, 1, "only `empty` is gone: {reshaped:?}");
    assert_eq!(listing(src.path()), listing(&dest));
    assert_eq!(sync().await.changed, 0);

    // Something else wrote into the destination's root: the state is not trusted.
    fs::write(dest.join("stray"), "x").unwrap();
    let walked = sync().await;
    assert!(!walked.state_reused, "{walked:?}");
    assert_eq!(walked.deleted, 1, "{walked:?}");
    assert_eq!(listing(src.path()), listing(&dest));
    assert!(sync().await.state_reused);
}

/// A receive that fails after changing the destination leaves no state behind: the next one
/// walks the destination instead of trusting a listing it no longer matches.
#[tokio::test]
async fn a_failed_receive_drops_the_state() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let dest = dst.path().join("out");
    let state = dst.path().join("state");
    transfer(
        src.path(),
        &dest,
        SendOptions::default(),
        with_state(dst.path()),
    )
    .await;
    assert!(state.exists());

    let file = |p: &str| Stat {
        path: p.into(),
        mode: 0o644,
        ..Default::default()
    };
    let (to_recv, from_send) = mpsc::channel::<Packet>(64);
    let (to_send, mut from_recv) = mpsc::channel::<Packet>(64);
    // A new file (applied at once: its temporary file is created), then a listing error.
    for p in [
        Packet::Stat(Some(file("a"))),
        Packet::Stat(Some(file("0"))),
        Packet::Stat(None),
    ] {
        to_recv.send(p).await.unwrap();
    }
    drop(to_recv);
    let drain = tokio::spawn(async move { while from_recv.recv().await.is_some() {} });
    let res = receive(
        dest.clone(),
        with_state(dst.path()),
        to_send,
        ReceiverStream::new(from_send).map(Ok::<_, Error>),
    )
    .await;
    drain.await.unwrap();
    assert!(
        matches!(res, Err(Error::Protocol { .. })),
        "out of order: {res:?}"
    );
    assert!(
        !state.exists(),
        "the destination changed: the state must go"
    );

    let again = transfer(
        src.path(),
        &dest,
        SendOptions::default(),
        with_state(dst.path()),
    )
    .await;
    assert!(!again.state_reused, "{again:?}");
    assert_eq!(listing(src.path()), listing(&dest));
}
