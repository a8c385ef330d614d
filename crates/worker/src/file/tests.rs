//! File action tests on real temporary directories (chown needs root; these tests fail loudly
//! without it).

use super::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

fn root_of(p: &Path) -> Root {
    Root::open(p).unwrap()
}

fn mkdir_pb(path: &str, mode: i32, parents: bool) -> pb::FileActionMkDir {
    pb::FileActionMkDir {
        path: path.into(),
        mode,
        make_parents: parents,
        owner: None,
        timestamp: -1,
    }
}

fn copy_pb(src: &str, dest: &str) -> pb::FileActionCopy {
    pb::FileActionCopy {
        src: src.into(),
        dest: dest.into(),
        mode: -1,
        timestamp: -1,
        create_dest_path: true,
        ..Default::default()
    }
}

fn never() -> bool {
    false
}

#[test]
fn mkdir_parents_mode_owner_time() {
    let d = tempfile::tempdir().unwrap();
    let r = root_of(d.path());
    let attrs = Attrs {
        owner: Some((1234, 5678)),
        time: Some(1_000_000_000 * 86_400 + 5),
    };
    mkdir(&r, &mkdir_pb("/a/b/c", 0o750, true), &attrs).unwrap();
    for p in ["a", "a/b", "a/b/c"] {
        let m = std::fs::metadata(d.path().join(p)).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.permissions().mode() & 0o7777, 0o750, "{p}");
        assert_eq!((m.uid(), m.gid()), (1234, 5678), "{p}");
        assert_eq!((m.mtime(), m.mtime_nsec()), (86_400, 5), "{p}");
    }
    // Existing: no-op (mode unchanged).
    mkdir(&r, &mkdir_pb("/a", 0o700, false), &Attrs::default()).unwrap();
    assert_eq!(
        std::fs::metadata(d.path().join("a"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o750
    );
    // Without parents, a missing parent is an error naming the path.
    let e = mkdir(&r, &mkdir_pb("/x/y", 0o755, false), &Attrs::default()).unwrap_err();
    assert!(e.to_string().contains("/x/y"), "{e}");
}

#[test]
fn mkfile_creates_truncates_and_follows_symlinks_inside_root() {
    let d = tempfile::tempdir().unwrap();
    let r = root_of(d.path());
    let mut a = pb::FileActionMkFile {
        path: "/f".into(),
        mode: 0o640,
        data: "hello".into(),
        owner: None,
        timestamp: 1_000_000_000,
    };
    mkfile(
        &r,
        &a,
        &Attrs {
            owner: Some((7, 8)),
            time: Some(1_000_000_000),
        },
    )
    .unwrap();
    let m = std::fs::metadata(d.path().join("f")).unwrap();
    assert_eq!(
        std::fs::read_to_string(d.path().join("f")).unwrap(),
        "hello"
    );
    assert_eq!(m.permissions().mode() & 0o777, 0o640);
    assert_eq!((m.uid(), m.gid(), m.mtime()), (7, 8, 1));
    a.data = "hi".into();
    a.mode = 0o600;
    mkfile(&r, &a, &Attrs::default()).unwrap();
    assert_eq!(std::fs::read_to_string(d.path().join("f")).unwrap(), "hi");
    // An absolute symlink pointing "outside" lands inside the root.
    std::fs::create_dir(d.path().join("etc")).unwrap();
    std::os::unix::fs::symlink("/etc", d.path().join("link")).unwrap();
    a.path = "/link/evil".into();
    mkfile(&r, &a, &Attrs::default()).unwrap();
    assert!(d.path().join("etc/evil").exists());
    assert!(!Path::new("/etc/evil").exists());
}

#[test]
fn rm_semantics() {
    let d = tempfile::tempdir().unwrap();
    let r = root_of(d.path());
    std::fs::create_dir_all(d.path().join("dir/sub")).unwrap();
    std::fs::write(d.path().join("dir/sub/f"), "x").unwrap();
    std::fs::write(d.path().join("a.log"), "x").unwrap();
    std::fs::write(d.path().join("b.log"), "x").unwrap();
    std::fs::write(d.path().join("keep"), "x").unwrap();
    // A symlink as last element is removed itself, not its target.
    std::os::unix::fs::symlink("/keep", d.path().join("ln")).unwrap();
    let rm_pb = |p: &str, nf: bool, wc: bool| pb::FileActionRm {
        path: p.into(),
        allow_not_found: nf,
        allow_wildcard: wc,
    };
    rm(&r, &rm_pb("/dir", false, false)).unwrap();
    assert!(!d.path().join("dir").exists());
    rm(&r, &rm_pb("/ln", false, false)).unwrap();
    assert!(d.path().join("keep").exists());
    assert!(d.path().join("ln").symlink_metadata().is_err());
    let e = rm(&r, &rm_pb("/nope", false, false)).unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::NotFound);
    rm(&r, &rm_pb("/nope", true, false)).unwrap();
    rm(&r, &rm_pb("/*.log", false, true)).unwrap();
    assert!(!d.path().join("a.log").exists() && !d.path().join("b.log").exists());
    assert!(d.path().join("keep").exists());
    assert!(rm(&r, &rm_pb("/", false, false)).is_err());
    // allowNotFound: a missing file, a missing parent directory and a wildcard matching nothing.
    rm(&r, &rm_pb("/x/nope", true, false)).unwrap();
    rm(&r, &rm_pb("/x/nope", true, true)).unwrap();
    rm(&r, &rm_pb("/nope*", true, true)).unwrap();
    rm(&r, &rm_pb("/x/nope*", true, true)).unwrap();
    rm(&r, &rm_pb("/keep/nope", true, false)).unwrap();
}

#[test]
fn copy_file_dir_and_destination_rules() {
    let s = tempfile::tempdir().unwrap();
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(s.path().join("src/sub")).unwrap();
    std::fs::write(s.path().join("src/a"), "A").unwrap();
    std::fs::write(s.path().join("src/sub/b"), "B").unwrap();
    std::fs::set_permissions(
        s.path().join("src/a"),
        std::fs::Permissions::from_mode(0o751),
    )
    .unwrap();
    std::os::unix::fs::symlink("a", s.path().join("src/ln")).unwrap();
    let (sr, tr) = (root_of(s.path()), root_of(t.path()));
    // Dir to missing dest: dest becomes the dir.
    copy(&sr, &tr, &copy_pb("/src", "/out"), None, &never).unwrap();
    assert_eq!(
        std::fs::read_to_string(t.path().join("out/sub/b")).unwrap(),
        "B"
    );
    assert_eq!(
        std::fs::metadata(t.path().join("out/a"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o751
    );
    assert_eq!(
        std::fs::read_link(t.path().join("out/ln")).unwrap(),
        Path::new("a")
    );
    // Dir to existing dest: dest/<base>.
    copy(&sr, &tr, &copy_pb("/src", "/out"), None, &never).unwrap();
    assert!(t.path().join("out/src/sub/b").exists());
    // Contents only into existing dir.
    let mut c = copy_pb("/src", "/flat");
    c.dir_copy_contents = true;
    copy(&sr, &tr, &c, None, &never).unwrap();
    assert!(t.path().join("flat/a").exists() && !t.path().join("flat/src").exists());
    // File into existing dir → dir/<base>; file to new name.
    copy(&sr, &tr, &copy_pb("/src/a", "/flat/sub/"), None, &never).unwrap();
    assert!(t.path().join("flat/sub/a").exists());
    copy(&sr, &tr, &copy_pb("/src/a", "/renamed"), None, &never).unwrap();
    assert_eq!(
        std::fs::read_to_string(t.path().join("renamed")).unwrap(),
        "A"
    );
    // A destination "into this dir" that is a file is an error.
    let e = copy(&sr, &tr, &copy_pb("/src/a", "/flat/sub/a/"), None, &never).unwrap_err();
    assert!(e.to_string().contains("not a directory"), "{e}");
    std::fs::create_dir(t.path().join("isdir")).unwrap();
    std::fs::create_dir(t.path().join("isdir/a")).unwrap();
    let e = copy(&sr, &tr, &copy_pb("/src/a", "/isdir/a"), None, &never);
    assert!(e.is_ok(), "dest dir exists → copied into it: {e:?}");
    assert!(t.path().join("isdir/a/a").exists());
    // Missing source.
    let e = copy(&sr, &tr, &copy_pb("/nope", "/x"), None, &never).unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::NotFound, "{e}");
}

#[test]
fn copy_into_dangling_symlink_dir_creates_its_target() {
    let s = tempfile::tempdir().unwrap();
    let t = tempfile::tempdir().unwrap();
    std::fs::write(s.path().join("foo"), "content0").unwrap();
    // `/symlink -> ../tmp/symlink-target` (missing): `COPY foo /symlink/` lands in the target,
    // and `..` past the root stays inside it.
    std::os::unix::fs::symlink("../tmp/symlink-target", t.path().join("symlink")).unwrap();
    std::os::unix::fs::symlink("/../../nested/dir", t.path().join("abs")).unwrap();
    let (sr, tr) = (root_of(s.path()), root_of(t.path()));
    copy(&sr, &tr, &copy_pb("/foo", "/symlink/"), None, &never).unwrap();
    assert_eq!(
        std::fs::read_to_string(t.path().join("tmp/symlink-target/foo")).unwrap(),
        "content0"
    );
    assert!(std::fs::symlink_metadata(t.path().join("symlink"))
        .unwrap()
        .file_type()
        .is_symlink());
    copy(&sr, &tr, &copy_pb("/foo", "/abs/sub/"), None, &never).unwrap();
    assert!(t.path().join("nested/dir/sub/foo").is_file());
    assert_eq!(
        tr.resolve_through_links("/abs/sub/x").unwrap(),
        "/nested/dir/sub/x"
    );
}

#[test]
fn copy_owner_mode_timestamp_follow_and_create_dest_path() {
    let s = tempfile::tempdir().unwrap();
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(s.path().join("d")).unwrap();
    std::fs::write(s.path().join("d/f"), "F").unwrap();
    std::os::unix::fs::symlink("/d/f", s.path().join("abslink")).unwrap();
    let (sr, tr) = (root_of(s.path()), root_of(t.path()));
    let mut c = copy_pb("/d", "/x/y/z");
    c.mode = 0o600;
    c.timestamp = 42_000_000_000;
    copy(&sr, &tr, &c, Some((11, 22)), &never).unwrap();
    for p in ["x", "x/y", "x/y/z", "x/y/z/f"] {
        let m = std::fs::symlink_metadata(t.path().join(p)).unwrap();
        assert_eq!((m.uid(), m.gid()), (11, 22), "{p}");
    }
    // Copied entries carry the timestamp (created parents get modified by their children).
    for p in ["x/y/z", "x/y/z/f"] {
        let m = std::fs::symlink_metadata(t.path().join(p)).unwrap();
        assert_eq!(m.mtime(), 42, "{p}");
    }
    assert_eq!(
        std::fs::metadata(t.path().join("x/y/z/f"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // follow_symlink: the absolute link resolves inside the source root.
    let mut c = copy_pb("/abslink", "/followed");
    c.follow_symlink = true;
    copy(&sr, &tr, &c, None, &never).unwrap();
    assert_eq!(
        std::fs::read_to_string(t.path().join("followed")).unwrap(),
        "F"
    );
    let c = copy_pb("/abslink", "/notfollowed");
    copy(&sr, &tr, &c, None, &never).unwrap();
    assert_eq!(
        std::fs::read_link(t.path().join("notfollowed")).unwrap(),
        Path::new("/d/f")
    );
    // create_dest_path=false with a missing parent fails.
    let mut c = copy_pb("/d/f", "/missing/parent/f");
    c.create_dest_path = false;
    assert!(copy(&sr, &tr, &c, None, &never).is_err());
    assert!(!t.path().join("missing").exists());
}

#[test]
fn copy_wildcards_and_patterns() {
    let s = tempfile::tempdir().unwrap();
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(s.path().join("app/pkg/inner")).unwrap();
    std::fs::create_dir_all(s.path().join("app/node_modules/m")).unwrap();
    for f in [
        "app/main.go",
        "app/README.md",
        "app/pkg/x.go",
        "app/pkg/inner/y.go",
        "app/node_modules/m/i.js",
    ] {
        std::fs::write(s.path().join(f), f).unwrap();
    }
    let (sr, tr) = (root_of(s.path()), root_of(t.path()));
    let mut c = copy_pb("/app/*.go", "/w/");
    c.allow_wildcard = true;
    copy(&sr, &tr, &c, None, &never).unwrap();
    assert!(t.path().join("w/main.go").exists());
    assert!(!t.path().join("w/README.md").exists());
    let mut c = copy_pb("/app/*.none", "/w/");
    c.allow_wildcard = true;
    assert_eq!(
        copy(&sr, &tr, &c, None, &never).unwrap_err().kind(),
        crate::ErrorKind::NotFound
    );
    c.allow_empty_wildcard = true;
    copy(&sr, &tr, &c, None, &never).unwrap();
    // Include/exclude patterns relative to the source.
    let mut c = copy_pb("/app", "/p");
    c.include_patterns = vec!["**/*.go".into()];
    c.exclude_patterns = vec!["pkg/inner".into()];
    copy(&sr, &tr, &c, None, &never).unwrap();
    assert!(t.path().join("p/main.go").exists());
    assert!(t.path().join("p/pkg/x.go").exists());
    assert!(!t.path().join("p/pkg/inner").exists());
    assert!(!t.path().join("p/README.md").exists());
    assert!(
        !t.path().join("p/node_modules").exists(),
        "dirs without matches are not created"
    );
}

#[test]
fn copy_never_writes_outside_destination_root() {
    let s = tempfile::tempdir().unwrap();
    let t = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(s.path().join("d/escape")).unwrap();
    std::fs::write(s.path().join("d/escape/pwned"), "x").unwrap();
    std::fs::write(s.path().join("f"), "x").unwrap();
    // Destination has a symlink pointing outside (absolute host path) at d/escape.
    std::fs::create_dir(t.path().join("dst")).unwrap();
    std::os::unix::fs::symlink(outside.path(), t.path().join("dst/escape")).unwrap();
    std::os::unix::fs::symlink("../../../../..", t.path().join("up")).unwrap();
    let (sr, tr) = (root_of(s.path()), root_of(t.path()));
    let mut c = copy_pb("/d", "/dst");
    c.dir_copy_contents = true;
    let e = copy(&sr, &tr, &c, None, &never);
    assert!(
        e.is_err(),
        "copying a dir onto a symlink must fail, not follow it"
    );
    // A symlinked parent pointing to a host path is resolved inside the root: its (missing)
    // target is created there, as fsutil does, and the write lands in it.
    let abs_outside = outside.path().to_string_lossy().into_owned();
    assert!(!t.path().join(&abs_outside[1..]).exists());
    copy(&sr, &tr, &copy_pb("/f", "/dst/escape/f2"), None, &never).unwrap();
    // `..` and relative symlinks climbing up stop at the root.
    copy(&sr, &tr, &copy_pb("/f", "/up/f3"), None, &never).unwrap();
    copy(&sr, &tr, &copy_pb("/f", "/../../f4"), None, &never).unwrap();
    copy(
        &sr,
        &tr,
        &copy_pb("/f", &format!("{abs_outside}/f5")),
        None,
        &never,
    )
    .unwrap();
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        0,
        "nothing written outside the root"
    );
    assert!(t.path().join(&abs_outside[1..]).join("f2").exists());
    assert!(t.path().join("f3").exists());
    assert!(t.path().join("f4").exists());
}

#[test]
fn copy_preserves_hardlinks() {
    let s = tempfile::tempdir().unwrap();
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir(s.path().join("d")).unwrap();
    std::fs::write(s.path().join("d/a"), "x").unwrap();
    std::fs::hard_link(s.path().join("d/a"), s.path().join("d/b")).unwrap();
    copy(
        &root_of(s.path()),
        &root_of(t.path()),
        &copy_pb("/d", "/d"),
        None,
        &never,
    )
    .unwrap();
    let a = std::fs::metadata(t.path().join("d/a")).unwrap();
    let b = std::fs::metadata(t.path().join("d/b")).unwrap();
    assert_eq!(a.ino(), b.ino());
}

#[test]
fn copy_always_replace_existing_dest_paths() {
    let s = tempfile::tempdir().unwrap();
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(s.path().join("src/x")).unwrap();
    std::fs::write(s.path().join("src/x/f"), "F").unwrap();
    std::fs::write(s.path().join("src/y"), "Y").unwrap();
    // Destination has the opposite types: x is a file, y is a directory.
    std::fs::create_dir_all(t.path().join("dst/y/inner")).unwrap();
    std::fs::write(t.path().join("dst/x"), "old").unwrap();
    let (sr, tr) = (root_of(s.path()), root_of(t.path()));
    let mut c = copy_pb("/src", "/dst");
    c.dir_copy_contents = true;
    assert!(
        copy(&sr, &tr, &c, None, &never).is_err(),
        "type clash without the flag"
    );
    c.always_replace_existing_dest_paths = true;
    copy(&sr, &tr, &c, None, &never).unwrap();
    assert_eq!(
        std::fs::read_to_string(t.path().join("dst/x/f")).unwrap(),
        "F"
    );
    assert_eq!(
        std::fs::read_to_string(t.path().join("dst/y")).unwrap(),
        "Y"
    );
}

#[test]
fn copy_attempt_unpack_extracts_archives_only() {
    let s = tempfile::tempdir().unwrap();
    let t = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(2);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    b.append_data(&mut h, "inside.txt", &b"in"[..]).unwrap();
    std::fs::write(s.path().join("a.tar"), b.into_inner().unwrap()).unwrap();
    std::fs::write(s.path().join("plain.txt"), "p").unwrap();
    let (sr, tr) = (root_of(s.path()), root_of(t.path()));
    for src in ["/a.tar", "/plain.txt"] {
        let mut c = copy_pb(src, "/dest/");
        c.attempt_unpack_docker_compatibility = true;
        copy(&sr, &tr, &c, None, &never).unwrap();
    }
    assert_eq!(
        std::fs::read_to_string(t.path().join("dest/inside.txt")).unwrap(),
        "in"
    );
    assert!(!t.path().join("dest/a.tar").exists());
    assert_eq!(
        std::fs::read_to_string(t.path().join("dest/plain.txt")).unwrap(),
        "p"
    );
}

#[test]
fn symlink_action_creates_link_inside_root() {
    let d = tempfile::tempdir().unwrap();
    let r = root_of(d.path());
    std::fs::create_dir(d.path().join("dir")).unwrap();
    let a = pb::FileActionSymlink {
        oldpath: "/etc/passwd".into(),
        newpath: "/dir/link".into(),
        owner: None,
        timestamp: 5_000_000_000,
    };
    symlink(
        &r,
        &a,
        &Attrs {
            owner: Some((3, 4)),
            time: Some(5_000_000_000),
        },
    )
    .unwrap();
    let p = d.path().join("dir/link");
    assert_eq!(std::fs::read_link(&p).unwrap(), Path::new("/etc/passwd"));
    let m = std::fs::symlink_metadata(&p).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mtime()), (3, 4, 5));
    // Existing path: error.
    assert!(symlink(&r, &a, &Attrs::default()).is_err());
}

#[test]
fn copy_regular_files_keep_xattrs_and_replace_existing_files() {
    let s = tempfile::tempdir().unwrap();
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir(s.path().join("d")).unwrap();
    let f = s.path().join("d/f");
    std::fs::write(&f, "new contents").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o4751)).unwrap();
    rustix::fs::setxattr(&f, "user.berth", b"kept", rustix::fs::XattrFlags::empty()).unwrap();
    std::fs::create_dir(t.path().join("d")).unwrap();
    std::fs::write(t.path().join("d/f"), "old contents that are longer").unwrap();
    // Before the copy: reading the source may move its atime.
    let ms = std::fs::metadata(&f).unwrap();
    copy(
        &root_of(s.path()),
        &root_of(t.path()),
        &copy_pb("/d", "/"),
        None,
        &never,
    )
    .unwrap();
    let out = t.path().join("d/f");
    let md = std::fs::metadata(&out).unwrap();
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "new contents");
    assert_eq!(md.permissions().mode() & 0o7777, 0o4751);
    assert_eq!(
        (md.mtime(), md.mtime_nsec(), md.atime(), md.atime_nsec()),
        (ms.mtime(), ms.mtime_nsec(), ms.atime(), ms.atime_nsec())
    );
    let mut v = [0u8; 16];
    let n = rustix::fs::getxattr(&out, "user.berth", &mut v[..]).unwrap();
    assert_eq!(&v[..n], b"kept");
}

/// A sparse file larger than 4 GiB: the data extents land at the same offsets, the size is
/// kept and the holes stay holes (the copy writes a few blocks, not gigabytes).
#[test]
fn copy_large_sparse_file() {
    use std::os::unix::fs::FileExt;
    let s = tempfile::tempdir().unwrap();
    let t = tempfile::tempdir().unwrap();
    let size: u64 = 5 << 30;
    let marks: [(u64, &[u8]); 3] = [
        (0, b"head"),
        ((5 << 30) / 2 + 12_345, b"middle"),
        (size - 4, b"tail"),
    ];
    {
        let f = std::fs::File::create(s.path().join("big")).unwrap();
        f.set_len(size).unwrap();
        for (off, data) in marks {
            f.write_all_at(data, off).unwrap();
        }
    }
    copy(
        &root_of(s.path()),
        &root_of(t.path()),
        &copy_pb("/big", "/big"),
        None,
        &never,
    )
    .unwrap();
    let out = std::fs::File::open(t.path().join("big")).unwrap();
    let md = out.metadata().unwrap();
    assert_eq!(md.len(), size);
    for (off, data) in marks {
        let mut buf = vec![0u8; data.len()];
        out.read_exact_at(&mut buf, off).unwrap();
        assert_eq!(buf, data, "bytes at {off}");
    }
    // Zeros between the marks read back as zeros.
    let mut gap = vec![1u8; 4096];
    out.read_exact_at(&mut gap, 1 << 30).unwrap();
    assert!(gap.iter().all(|b| *b == 0));
    assert!(
        md.blocks() * 512 < 64 << 20,
        "holes were filled: {} blocks",
        md.blocks()
    );
}

/// Every data-copy mechanism gives the same bytes, and a copy across filesystems (tmpfs to
/// the test's disk, where `copy_file_range` may refuse with EXDEV) falls back instead of
/// failing.
#[test]
fn copy_data_mechanisms_and_cross_filesystem_fallback() {
    use super::copy::{copy_data, DataCopy};
    let s = tempfile::tempdir().unwrap();
    let t = tempfile::tempdir().unwrap();
    let content: Vec<u8> = (0..3 * 1024 * 1024 + 17)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let src = s.path().join("src");
    std::fs::write(&src, &content).unwrap();
    let st = rustix::fs::stat(&src).unwrap();
    for start in [DataCopy::Clone, DataCopy::Range, DataCopy::ReadWrite] {
        let dst = t.path().join(format!("{start:?}"));
        let mut how = start;
        copy_data(
            &mut how,
            &std::fs::File::open(&src).unwrap(),
            &std::fs::File::create(&dst).unwrap(),
            &st,
        )
        .unwrap();
        assert!(std::fs::read(&dst).unwrap() == content, "{start:?}");
    }
    let shm = tempfile::tempdir_in("/dev/shm").expect("tmpfs at /dev/shm");
    std::fs::write(shm.path().join("f"), &content).unwrap();
    copy(
        &root_of(shm.path()),
        &root_of(t.path()),
        &copy_pb("/f", "/from-tmpfs"),
        None,
        &never,
    )
    .unwrap();
    assert!(std::fs::read(t.path().join("from-tmpfs")).unwrap() == content);
}
