//! MergeOp / DiffOp on the snapshot store, table-driven, against real overlayfs. Needs root.
//!
//! The invariant checked everywhere: `Merge(lower, Diff(lower, upper))` mounts to the same tree as `upper`
//! (type, content, mode, owner, mtime, xattrs, symlink targets, hardlink groups).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use layerstore::snapshot::{
    Chain, MountMethod, SnapshotId, SnapshotOptions, SnapshotStore, StoreOptions,
};

fn store(root: &Path) -> SnapshotStore {
    assert!(
        rustix::process::geteuid().is_root(),
        "needs root (overlay mounts)"
    );
    SnapshotStore::open(StoreOptions {
        root: root.to_path_buf(),
        mount_method: MountMethod::Auto,
    })
    .unwrap()
}

type Op = fn(&Path) -> std::io::Result<()>;

/// Makes a committed snapshot by running `op` on a read-write mount over `parent`.
fn snap(
    store: &SnapshotStore,
    parent: Option<&SnapshotId>,
    name: &str,
    op: Op,
) -> Result<SnapshotId> {
    let id = store.prepare(parent, &SnapshotOptions::new(name))?;
    {
        let m = store.mount(&id, None)?;
        op(m.path()).with_context(|| format!("op {name}"))?;
    }
    store.commit(&id)?;
    Ok(id)
}

fn set_mtime(p: &Path, secs: i64) -> std::io::Result<()> {
    let ts = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &ts,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

/// Base tree shared by lower and upper.
fn base(r: &Path) -> std::io::Result<()> {
    fs::create_dir_all(r.join("d/sub"))?;
    fs::write(r.join("d/a"), "a")?;
    fs::write(r.join("d/sub/deep"), "deep")?;
    fs::write(r.join("f"), "f")?;
    fs::write(r.join("gone"), "gone")?;
    std::os::unix::fs::symlink("f", r.join("ln"))?;
    fs::create_dir(r.join("dir2file"))?;
    fs::write(r.join("dir2file/x"), "x")?;
    fs::write(r.join("file2dir"), "y")?;
    fs::write(r.join("same"), "same")?;
    set_mtime(&r.join("same"), 1_000_000)?;
    Ok(())
}

/// Snapshot of a whole tree (relative path → description of everything a diff must preserve).
fn tree(root: &Path) -> Result<BTreeMap<PathBuf, String>> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).sort_by_file_name() {
        let e = e?;
        let rel = e.path().strip_prefix(root)?.to_path_buf();
        let md = fs::symlink_metadata(e.path())?;
        let ft = md.file_type();
        let content = if ft.is_file() {
            format!("{:?}", fs::read(e.path())?)
        } else if ft.is_symlink() {
            format!("-> {:?}", fs::read_link(e.path())?)
        } else {
            String::new()
        };
        let mut xattrs = vec![];
        let mut buf = vec![0u8; 4096];
        if let Ok(n) = rustix::fs::llistxattr(e.path(), &mut buf) {
            for name in buf[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
                let name = std::str::from_utf8(name)?.to_string();
                let mut v = vec![0u8; 1024];
                let k = rustix::fs::lgetxattr(e.path(), name.as_str(), &mut v)?;
                xattrs.push(format!("{name}={:?}", &v[..k]));
            }
        }
        let link = if !ft.is_dir() && md.nlink() > 1 {
            let first = inodes.entry((md.dev(), md.ino())).or_insert(rel.clone());
            format!(" hardlink-of {first:?}")
        } else {
            String::new()
        };
        // The root's mtime depends on the mount, not on the content.
        let mtime = if rel.as_os_str().is_empty() {
            0
        } else {
            md.mtime()
        };
        out.insert(
            rel,
            format!(
                "{:?} mode={:o} {}:{} mtime={mtime} {content} {xattrs:?}{link}",
                ft,
                md.mode(),
                md.uid(),
                md.gid()
            ),
        );
    }
    Ok(out)
}

fn mounted_tree(store: &SnapshotStore, id: &SnapshotId) -> Result<BTreeMap<PathBuf, String>> {
    let m = store.mount(id, None)?;
    tree(m.path())
}

struct Case {
    name: &'static str,
    lower: Op,
    upper: Op,
    /// Paths that must appear in the computed diff layer (relative), and whether each is a whiteout.
    in_diff: &'static [(&'static str, bool)],
    /// Paths that must not appear in the diff layer.
    not_in_diff: &'static [&'static str],
}

fn noop(_: &Path) -> std::io::Result<()> {
    Ok(())
}

const CASES: &[Case] = &[
    Case {
        name: "content change",
        lower: noop,
        upper: |r| fs::write(r.join("d/a"), "A!"),
        in_diff: &[("d/a", false)],
        not_in_diff: &["f", "same", "d/sub"],
    },
    Case {
        name: "mode only",
        lower: noop,
        upper: |r| fs::set_permissions(r.join("f"), fs::Permissions::from_mode(0o600)),
        in_diff: &[("f", false)],
        not_in_diff: &["d"],
    },
    Case {
        name: "owner only",
        lower: noop,
        upper: |r| std::os::unix::fs::lchown(r.join("f"), Some(1234), Some(99)),
        in_diff: &[("f", false)],
        not_in_diff: &["d"],
    },
    Case {
        name: "mtime only",
        lower: noop,
        upper: |r| set_mtime(&r.join("same"), 2_000_000),
        in_diff: &[("same", false)],
        not_in_diff: &["f"],
    },
    Case {
        name: "atime only is not a change",
        lower: noop,
        upper: |r| {
            let ts = rustix::fs::Timestamps {
                last_access: rustix::fs::Timespec {
                    tv_sec: 5,
                    tv_nsec: 0,
                },
                last_modification: rustix::fs::Timespec {
                    tv_sec: 1_000_000,
                    tv_nsec: 0,
                },
            };
            rustix::fs::utimensat(
                rustix::fs::CWD,
                r.join("same"),
                &ts,
                rustix::fs::AtFlags::empty(),
            )?;
            Ok(())
        },
        in_diff: &[],
        not_in_diff: &["same"],
    },
    Case {
        name: "xattr",
        lower: noop,
        upper: |r| {
            rustix::fs::lsetxattr(
                r.join("f"),
                "user.berth",
                b"v",
                rustix::fs::XattrFlags::empty(),
            )?;
            Ok(())
        },
        in_diff: &[("f", false)],
        not_in_diff: &["d"],
    },
    Case {
        name: "deletions",
        lower: noop,
        upper: |r| {
            fs::remove_file(r.join("gone"))?;
            fs::remove_dir_all(r.join("d/sub"))
        },
        in_diff: &[("gone", true), ("d/sub", true)],
        not_in_diff: &["d/a", "f"],
    },
    Case {
        // Two levels below the root, in directories present on both sides: the diff layer must
        // create the parents before the whiteout.
        name: "deletion deep in shared dirs",
        lower: noop,
        upper: |r| fs::remove_file(r.join("d/sub/deep")),
        in_diff: &[("d/sub/deep", true)],
        not_in_diff: &["d/a", "f"],
    },
    Case {
        name: "dir to file and file to dir",
        lower: noop,
        upper: |r| {
            fs::remove_dir_all(r.join("dir2file"))?;
            fs::write(r.join("dir2file"), "now a file")?;
            fs::remove_file(r.join("file2dir"))?;
            fs::create_dir(r.join("file2dir"))?;
            fs::write(r.join("file2dir/inner"), "i")
        },
        in_diff: &[("dir2file", false), ("file2dir/inner", false)],
        not_in_diff: &["dir2file/x"],
    },
    Case {
        name: "symlink target and hardlinks",
        lower: noop,
        upper: |r| {
            fs::remove_file(r.join("ln"))?;
            std::os::unix::fs::symlink("d/a", r.join("ln"))?;
            fs::write(r.join("h1"), "shared")?;
            fs::hard_link(r.join("h1"), r.join("d/h2"))
        },
        in_diff: &[("ln", false), ("h1", false), ("d/h2", false)],
        not_in_diff: &["f"],
    },
    Case {
        name: "siblings: lower changed too",
        lower: |r| {
            fs::write(r.join("only-in-lower"), "l")?;
            fs::write(r.join("d/a"), "lower's a")
        },
        upper: |r| fs::write(r.join("only-in-upper"), "u"),
        in_diff: &[
            ("only-in-lower", true),
            ("d/a", false),
            ("only-in-upper", false),
        ],
        not_in_diff: &["f", "same"],
    },
];

#[test]
fn merge_of_lower_and_diff_equals_upper() -> Result<()> {
    let root = tempfile::Builder::new()
        .prefix("berth-mergediff-")
        .tempdir_in("/var/tmp")?;
    let store = store(root.path());
    let b = snap(&store, None, "base", base)?;
    for case in CASES {
        let ctx = || format!("case {:?}", case.name);
        // Siblings on the same base: lower is not an ancestor of upper, so the diff is computed.
        let lower = snap(&store, Some(&b), "lower", case.lower)?;
        let upper = snap(&store, Some(&b), "upper", case.upper)?;
        let d = store
            .diff(Some(&lower), Some(&upper), &SnapshotOptions::new("diff"))
            .with_context(ctx)?;
        let chain = store.info(&d)?.chain;
        ensure!(
            chain.layers().len() == 1,
            "{}: computed diff is one layer",
            ctx()
        );
        let layerstore::snapshot::LayerRef::Berth(lid) = &chain.layers()[0] else {
            unreachable!()
        };
        let ldir = store.layer_path(lid).join("diff");
        for (p, whiteout) in case.in_diff {
            let md = fs::symlink_metadata(ldir.join(p))
                .with_context(|| format!("{}: {p} in diff", ctx()))?;
            let is_wh =
                std::os::unix::fs::FileTypeExt::is_char_device(&md.file_type()) && md.rdev() == 0;
            ensure!(is_wh == *whiteout, "{}: {p} whiteout={is_wh}", ctx());
        }
        for p in case.not_in_diff {
            ensure!(
                fs::symlink_metadata(ldir.join(p)).is_err(),
                "{}: {p} must not be in the diff",
                ctx()
            );
        }
        let merged = store.merge(&[lower.clone(), d.clone()], &SnapshotOptions::new("merge"))?;
        let (got, want) = (
            mounted_tree(&store, &merged)?,
            mounted_tree(&store, &upper)?,
        );
        ensure!(
            got == want,
            "{}: merge(lower, diff) != upper:\n got {got:#?}\nwant {want:#?}",
            ctx()
        );
        // The lower side alone is untouched.
        ensure!(
            mounted_tree(&store, &lower)? != want || case.name.starts_with("atime"),
            "{}",
            ctx()
        );
    }
    Ok(())
}

#[test]
fn diff_reuses_layers_of_an_ancestor_and_handles_scratch() -> Result<()> {
    let root = tempfile::Builder::new()
        .prefix("berth-mergediff-")
        .tempdir_in("/var/tmp")?;
    let store = store(root.path());
    let a = snap(&store, None, "a", base)?;
    let b1 = snap(&store, Some(&a), "b1", |r| fs::write(r.join("b1"), "1"))?;
    let b2 = snap(&store, Some(&b1), "b2", |r| fs::remove_file(r.join("gone")))?;
    let layers_before = fs::read_dir(store.dir().join("layers"))?.count();

    let d = store.diff(Some(&a), Some(&b2), &SnapshotOptions::new("d"))?;
    let (ca, cb) = (store.info(&a)?.chain, store.info(&b2)?.chain);
    ensure!(
        Some(store.info(&d)?.chain) == cb.strip_prefix(&ca),
        "ancestor diff = the layers between"
    );
    ensure!(
        fs::read_dir(store.dir().join("layers"))?.count() == layers_before,
        "no new layer"
    );
    let m = store.merge(&[a.clone(), d.clone()], &SnapshotOptions::new("m"))?;
    ensure!(store.info(&m)?.chain == cb);
    // Mounted alone, the diff shows its additions and no trace of its deletion.
    {
        let mnt = store.mount(&d, None)?;
        ensure!(mnt.path().join("b1").is_file() && !mnt.path().join("gone").exists());
        ensure!(!mnt.path().join("f").exists());
    }
    // Lower scratch: the upper unchanged. Both scratch: empty.
    let s = store.diff(None, Some(&b1), &SnapshotOptions::new("s"))?;
    ensure!(store.info(&s)?.chain == store.info(&b1)?.chain);
    let e = store.diff(None, None, &SnapshotOptions::new("e"))?;
    ensure!(store.info(&e)?.chain == Chain::default());
    // Same ref: empty.
    let same = store.diff(Some(&b1), Some(&b1), &SnapshotOptions::new("same"))?;
    ensure!(store.info(&same)?.chain.is_empty());
    // Upper scratch: a layer that deletes lower's contents; merge(lower, it) is empty.
    let del = store.diff(Some(&a), None, &SnapshotOptions::new("del"))?;
    let md = store.merge(&[a.clone(), del], &SnapshotOptions::new("md"))?;
    let t = mounted_tree(&store, &md)?;
    ensure!(t.len() == 1, "only the root remains: {t:?}");
    Ok(())
}

#[test]
fn merge_stacks_inputs_later_wins() -> Result<()> {
    let root = tempfile::Builder::new()
        .prefix("berth-merge-")
        .tempdir_in("/var/tmp")?;
    let store = store(root.path());
    let x = snap(&store, None, "x", |r| {
        fs::create_dir(r.join("d"))?;
        fs::write(r.join("d/a"), "xa")?;
        fs::write(r.join("p"), "file in x")?;
        fs::write(r.join("common"), "x")
    })?;
    let y = snap(&store, None, "y", |r| {
        fs::create_dir(r.join("d"))?;
        fs::write(r.join("d/b"), "yb")?;
        fs::create_dir(r.join("p"))?;
        fs::write(r.join("p/inside"), "dir in y")?;
        fs::write(r.join("common"), "y")
    })?;
    let m = store.merge(&[x.clone(), y.clone()], &SnapshotOptions::new("m"))?;
    let mnt = store.mount(&m, None)?;
    let p = mnt.path();
    ensure!(
        fs::read_to_string(p.join("d/a"))? == "xa" && fs::read_to_string(p.join("d/b"))? == "yb"
    );
    ensure!(fs::read_to_string(p.join("p/inside"))? == "dir in y");
    ensure!(fs::read_to_string(p.join("common"))? == "y");
    ensure!(store.info(&m)?.parents == vec![x, y]);
    Ok(())
}
