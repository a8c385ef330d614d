//! FileOp through the Worker on real overlay snapshots: every action and flag, chained
//! actions, owners by name, and hostile paths. Needs root.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use anyhow::Result;
use llb::{ChownOpt, CopyOpts, CopySource, MkdirOpts, MkfileOpts, RmOpts};
use support::*;
use worker::ErrorKind;

const T1: i64 = 1_600_000_000_000_000_123; // 2020-09-13, with nanoseconds

/// A base state with an /etc/passwd and /etc/group, some files and symlinks.
fn base() -> llb::State {
    llb::scratch().file(
        llb::mkdir("/etc", 0o755, MkdirOpts::default())
            .mkfile(
                "/etc/passwd",
                0o644,
                "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
                MkfileOpts::default(),
            )
            .mkfile(
                "/etc/group",
                0o644,
                "root:x:0:\nstaff:x:50:\napp:x:1001:\n",
                MkfileOpts::default(),
            )
            .mkdir("/src/sub", 0o755, MkdirOpts::default().parents(true))
            .mkfile("/src/a.txt", 0o640, "A", MkfileOpts::default())
            .mkfile("/src/b.txt", 0o600, "B", MkfileOpts::default())
            .mkfile("/src/c.md", 0o644, "C", MkfileOpts::default())
            .mkfile("/src/sub/d.txt", 0o644, "D", MkfileOpts::default()),
    )
}

#[tokio::test]
async fn mkdir_and_mkfile_flags() -> Result<()> {
    let w = TestWorker::new()?;
    let st = base().file(
        llb::mkdir(
            "/opt/x/y",
            0o751,
            MkdirOpts::default()
                .parents(true)
                .owner(ChownOpt::ids(123, 456))
                .created(T1),
        )
        .mkdir("/single", 0o700, MkdirOpts::default())
        .mkfile(
            "/opt/x/y/file",
            0o604,
            "content\n",
            MkfileOpts::default()
                .owner(ChownOpt::names("app", Some("staff".into())))
                .created(T1),
        )
        .mkfile(
            "/byname",
            0o644,
            "",
            MkfileOpts::default().owner(ChownOpt::names("app", None)),
        ),
    );
    let s = solve(&w.worker, &st, no_session()).await;
    let r = s.ok();
    for p in ["/opt", "/opt/x", "/opt/x/y"] {
        let m = meta(r, p).await?.expect(p);
        assert!(m.is_dir(), "{p}");
        assert_eq!(m.permissions().mode() & 0o7777, 0o751, "{p}");
        assert_eq!((m.uid(), m.gid()), (123, 456), "{p}");
    }
    // Created parents carry the timestamp (the leaf's changes when the file is added to it).
    for p in ["/opt", "/opt/x"] {
        let m = meta(r, p).await?.unwrap();
        assert_eq!(
            (m.mtime(), m.mtime_nsec()),
            (1_600_000_000, 123),
            "{p} time"
        );
    }
    let m = meta(r, "/single").await?.unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o700);
    assert_eq!((m.uid(), m.gid()), (0, 0));
    assert_eq!(
        read(r, "/opt/x/y/file").await?.as_deref(),
        Some("content\n")
    );
    let m = meta(r, "/opt/x/y/file").await?.unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o604);
    assert_eq!((m.uid(), m.gid()), (1000, 50), "user app, group staff");
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_600_000_000, 123));
    let m = meta(r, "/byname").await?.unwrap();
    assert_eq!((m.uid(), m.gid()), (1000, 1001), "user's primary group");
    Ok(())
}

#[tokio::test]
async fn rm_flags() -> Result<()> {
    let w = TestWorker::new()?;
    let st = base().file(
        llb::rm("/src/*.txt", RmOpts::default().allow_wildcard(true))
            .rm("/does/not/exist", RmOpts::default().allow_not_found(true))
            .rm("/src/sub", RmOpts::default()),
    );
    let s = solve(&w.worker, &st, no_session()).await;
    let r = s.ok();
    assert_eq!(list(r, "/src").await?, vec!["c.md"]);
    // The lower layer's files are hidden by whiteouts in the new layer.
    assert_eq!(r.chain().layers().len(), 2);

    // allowNotFound in one action: a missing file, a missing parent directory and a wildcard
    // that matches nothing all succeed, on a base and on scratch.
    let nf = || RmOpts::default().allow_not_found(true);
    let chain = || {
        llb::rm("/src/nope", nf())
            .rm("/x/nope", nf())
            .rm("/src/*.nope", nf().allow_wildcard(true))
            .rm("/x/y/*", nf().allow_wildcard(true))
    };
    let s = solve(&w.worker, &base().file(chain()), no_session()).await;
    assert_eq!(
        list(s.ok(), "/src").await?,
        vec!["a.txt", "b.txt", "c.md", "sub"]
    );
    let s = solve(&w.worker, &llb::scratch().file(chain()), no_session()).await;
    assert_eq!(list(s.ok(), "/").await?, Vec::<String>::new());

    let st = base().file(llb::rm("/nope", RmOpts::default()));
    let s = solve(&w.worker, &st, no_session()).await;
    let e = s.err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    // Worded like buildkitd's lstat error, which clients match on (TestFileOpInputSwap).
    assert!(
        e.to_string().contains("/nope: no such file or directory"),
        "names the path: {e}"
    );
    assert!(e.vertex_digest().is_some(), "names the vertex: {e:?}");
    Ok(())
}

#[tokio::test]
async fn copy_flags() -> Result<()> {
    let w = TestWorker::new()?;
    let src = base();
    let st = llb::scratch().file(
        llb::copy(
            &src,
            "/src",
            "/plain",
            CopyOpts::default().create_dest_path(true),
        )
        .copy(
            &src,
            "/src/*.txt",
            "/wild/",
            CopyOpts::default()
                .allow_wildcard(true)
                .create_dest_path(true),
        )
        .copy(
            &src,
            "/src/*.none",
            "/empty/",
            CopyOpts::default()
                .allow_wildcard(true)
                .allow_empty_wildcard(true)
                .create_dest_path(true),
        )
        .copy(
            &src,
            "/src",
            "/contents",
            CopyOpts::default()
                .dir_contents_only(true)
                .create_dest_path(true),
        )
        .copy(
            &src,
            "/src",
            "/owned",
            CopyOpts::default()
                .owner(ChownOpt::ids(7, 8))
                .mode(0o700)
                .created(T1)
                .create_dest_path(true),
        )
        .copy(
            &src,
            "/src",
            "/filtered",
            CopyOpts::default()
                .include(["*.txt", "sub"])
                .exclude(["b.txt"])
                .create_dest_path(true),
        ),
    );
    let s = solve(&w.worker, &st, no_session()).await;
    let r = s.ok();
    assert_eq!(
        list(r, "/plain").await?,
        vec!["a.txt", "b.txt", "c.md", "sub"]
    );
    let m = meta(r, "/plain/a.txt").await?.unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o640, "source mode kept");
    assert_eq!(list(r, "/wild").await?, vec!["a.txt", "b.txt"]);
    assert!(
        meta(r, "/empty").await?.is_none(),
        "an empty wildcard copies nothing"
    );
    assert_eq!(
        list(r, "/contents").await?,
        vec!["a.txt", "b.txt", "c.md", "sub"]
    );
    for p in ["/owned", "/owned/a.txt", "/owned/sub/d.txt"] {
        let m = meta(r, p).await?.unwrap();
        assert_eq!((m.uid(), m.gid()), (7, 8), "{p}");
        assert_eq!(m.permissions().mode() & 0o777, 0o700, "{p}");
        assert_eq!(m.mtime(), 1_600_000_000, "{p}");
    }
    assert_eq!(list(r, "/filtered").await?, vec!["a.txt", "sub"]);
    assert_eq!(list(r, "/filtered/sub").await?, vec!["d.txt"]);

    // Missing source without wildcard, and wildcard without allowEmptyWildcard: errors.
    for opts in [
        CopyOpts::default(),
        CopyOpts::default().allow_wildcard(true),
    ] {
        let st = llb::scratch().file(llb::copy(&src, "/src/*.none", "/x", opts));
        let s = solve(&w.worker, &st, no_session()).await;
        assert_eq!(s.err().kind(), ErrorKind::NotFound, "{}", s.err());
    }
    // createDestPath=false with a missing parent.
    let st = llb::scratch().file(llb::copy(
        &src,
        "/src/a.txt",
        "/no/such/dir/a",
        CopyOpts::default(),
    ));
    let s = solve(&w.worker, &st, no_session()).await;
    assert!(
        s.err().to_string().contains("/no/such/dir/a"),
        "{}",
        s.err()
    );
    Ok(())
}

#[tokio::test]
async fn copy_follow_symlinks_and_replace() -> Result<()> {
    let w = TestWorker::new()?;
    let src = base().file(
        llb::mkfile("/target.txt", 0o644, "T", MkfileOpts::default()).copy(
            llb::scratch(),
            "/",
            "/",
            CopyOpts::default()
                .allow_wildcard(true)
                .allow_empty_wildcard(true),
        ),
    );
    // Symlinks cannot be made with file actions in v0.11.6; make one with a local source.
    let dir = tempfile::tempdir()?;
    std::os::unix::fs::symlink("/target.txt", dir.path().join("link"))?;
    std::fs::write(dir.path().join("target.txt"), "T")?;
    let ctx: llb::State = llb::local("ctx").into();
    let st = src.file(
        llb::copy(
            &ctx,
            "/link",
            "/followed",
            CopyOpts::default().follow_symlinks(true),
        )
        .copy(&ctx, "/link", "/kept", CopyOpts::default())
        // Replacing an existing file.
        .copy(&ctx, "/target.txt", "/src/a.txt", CopyOpts::default()),
    );
    let s = solve(&w.worker, &st, DirSession::with("ctx", dir.path())).await;
    let r = s.ok();
    assert_eq!(read(r, "/followed").await?.as_deref(), Some("T"));
    assert!(meta(r, "/followed").await?.unwrap().is_file());
    assert!(meta(r, "/kept").await?.unwrap().file_type().is_symlink());
    assert_eq!(read(r, "/src/a.txt").await?.as_deref(), Some("T"));
    Ok(())
}

#[tokio::test]
async fn chained_actions_with_secondary_inputs() -> Result<()> {
    let w = TestWorker::new()?;
    // A copy whose source is an intermediate action chain of the same op.
    let staged = llb::mkfile("/gen.txt", 0o644, "generated", MkfileOpts::default());
    let st = base().file(
        llb::mkdir("/out", 0o755, MkdirOpts::default())
            .copy(
                CopySource::Action(llb::scratch(), Box::new(staged)),
                "/gen.txt",
                "/out/",
                CopyOpts::default(),
            )
            .rm("/src", RmOpts::default()),
    );
    let def = st.marshal()?;
    let s = solve_def(&w.worker, def, no_session()).await;
    let r = s.ok();
    assert_eq!(read(r, "/out/gen.txt").await?.as_deref(), Some("generated"));
    assert!(meta(r, "/src").await?.is_none());
    assert!(
        meta(r, "/gen.txt").await?.is_none(),
        "the staged state is separate"
    );
    assert!(meta(r, "/etc/passwd").await?.is_some());
    Ok(())
}

/// Hostile paths: `..`, absolute and relative symlinks in the destination must not lead
/// outside the state's root; the host is untouched.
#[tokio::test]
async fn hostile_paths_stay_inside_the_root() -> Result<()> {
    let w = TestWorker::new()?;
    let host = tempfile::tempdir()?;
    let host_dir = host.path().to_string_lossy().into_owned();
    let ctxdir = tempfile::tempdir()?;
    // The client context carries symlinks pointing at the host directory and far up.
    std::os::unix::fs::symlink(&host_dir, ctxdir.path().join("abs"))?;
    std::os::unix::fs::symlink("../../../../../../..", ctxdir.path().join("up"))?;
    std::fs::write(ctxdir.path().join("payload"), "pwned")?;
    let ctx: llb::State = llb::local("ctx").into();
    let with_links = llb::scratch().file(llb::copy(&ctx, "/", "/", CopyOpts::default()));
    let cases = [
        format!("{host_dir}/via-abs-path"),
        "/../../../../tmp/berth-escape-dotdot".to_string(),
        "/up/tmp/berth-escape-up".to_string(),
        "/abs/via-symlink".to_string(),
    ];
    for dest in &cases {
        let st = with_links.file(
            llb::mkfile(format!("{dest}-mkfile"), 0o644, "x", MkfileOpts::default())
                .copy(
                    &ctx,
                    "/payload",
                    dest.clone(),
                    CopyOpts::default().create_dest_path(true),
                )
                .mkdir(
                    format!("{dest}-dir"),
                    0o755,
                    MkdirOpts::default().parents(true),
                ),
        );
        let s = solve(&w.worker, &st, DirSession::with("ctx", ctxdir.path())).await;
        // Either refused with a clear error or written inside the root; never outside.
        if let Err(e) = &s.result {
            assert!(
                matches!(
                    e.kind(),
                    ErrorKind::FailedPrecondition | ErrorKind::NotFound
                ),
                "{dest}: {e}"
            );
        }
    }
    assert_eq!(
        std::fs::read_dir(host.path())?.count(),
        0,
        "nothing written to the host dir"
    );
    for p in ["/tmp/berth-escape-dotdot", "/tmp/berth-escape-up"] {
        assert!(
            !std::path::Path::new(&format!("{p}-mkfile")).exists(),
            "{p}"
        );
        assert!(!std::path::Path::new(p).exists(), "{p}");
    }
    // The `..` case lands at the root of the state.
    let st = with_links.file(llb::mkfile(
        "/../../escaped",
        0o644,
        "x",
        MkfileOpts::default(),
    ));
    let s = solve(&w.worker, &st, DirSession::with("ctx", ctxdir.path())).await;
    assert_eq!(read(s.ok(), "/escaped").await?.as_deref(), Some("x"));
    // rm through a symlinked parent cannot delete host files.
    std::fs::write(host.path().join("victim"), "v")?;
    let st = with_links.file(llb::rm(
        "/abs/victim",
        RmOpts::default().allow_not_found(true),
    ));
    let s = solve(&w.worker, &st, DirSession::with("ctx", ctxdir.path())).await;
    s.ok();
    assert!(
        host.path().join("victim").exists(),
        "host file survives rm through symlink"
    );
    Ok(())
}
