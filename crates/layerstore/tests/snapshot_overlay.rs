//! Snapshot store against real overlayfs (needs root; fails loudly otherwise).

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use layerstore::snapshot::{
    Chain, MountMethod, PruneOptions, RecordType, SnapshotKind, SnapshotOptions, SnapshotStore,
    StoreOptions,
};

fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "snapshot tests need root (overlay mounts)"
    );
}

fn root_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("berth-snap-test-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn open(root: &Path, method: MountMethod) -> SnapshotStore {
    SnapshotStore::open(StoreOptions {
        root: root.to_path_buf(),
        mount_method: method,
    })
    .unwrap()
}

fn opts(d: &str) -> SnapshotOptions {
    SnapshotOptions::new(d)
}

/// Every mount point of this process at or under `dir`.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .filter(|p| p.starts_with(dir))
        .collect()
}

#[test]
fn mutable_write_commit_delete_and_whiteout() -> Result<()> {
    require_root();
    let root = root_dir();
    let store = open(root.path(), MountMethod::Auto);

    let a = store.prepare(None, &opts("base"))?;
    {
        let m = store.mount(&a, None)?;
        fs::create_dir(m.path().join("etc"))?;
        fs::write(m.path().join("etc/keep"), "keep")?;
        fs::write(m.path().join("etc/gone"), "gone")?;
        ensure!(store.commit(&a).is_err(), "commit while mounted must fail");
    }
    let la = store.commit(&a)?;
    ensure!(store.info(&a)?.kind == SnapshotKind::Committed);
    ensure!(store.layer_path(&la).join("diff/etc/keep").is_file());

    let b = store.prepare(Some(&a), &opts("child"))?;
    {
        let m = store.mount(&b, None)?;
        ensure!(fs::read_to_string(m.path().join("etc/keep"))? == "keep");
        fs::remove_file(m.path().join("etc/gone"))?;
        // Renaming a lower dir must not create a redirect in the upper dir (it would not export as a plain tree).
        let e = fs::rename(m.path().join("etc"), m.path().join("etc2")).unwrap_err();
        ensure!(
            e.raw_os_error() == Some(libc::EXDEV),
            "rename of a lower dir: {e}"
        );
        fs::write(m.path().join("etc/new"), "new")?;
    }
    let lb = store.commit(&b)?;
    // The deletion is an overlay whiteout in the new layer.
    let wh = fs::symlink_metadata(store.layer_path(&lb).join("diff/etc/gone"))?;
    ensure!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "whiteout expected"
    );

    let mb = store.mount(&b, None)?;
    ensure!(!mb.path().join("etc/gone").exists());
    ensure!(fs::read_to_string(mb.path().join("etc/new"))? == "new");
    ensure!(
        fs::write(mb.path().join("x"), "y").is_err(),
        "committed mount is read-only"
    );
    let ma = store.mount(&a, None)?;
    ensure!(fs::read_to_string(ma.path().join("etc/gone"))? == "gone");
    let (pa, pb) = (ma.path().to_path_buf(), mb.path().to_path_buf());
    drop(ma);
    mb.unmount()?;
    ensure!(
        !pa.exists() && !pb.exists(),
        "store-made mount points are removed"
    );
    ensure!(mounts_under(root.path()).is_empty());
    Ok(())
}

fn build_chain(store: &SnapshotStore, n: usize) -> Result<layerstore::snapshot::SnapshotId> {
    let mut parent = None;
    for i in 0..n {
        let (id, _) = store.add_layer(parent.as_ref(), &opts(&format!("layer {i}")), |dir| {
            fs::write(dir.join(format!("f{i}")), format!("{i}")).unwrap();
            fs::write(dir.join("top"), format!("{i}")).unwrap();
            Ok(Default::default())
        })?;
        parent = Some(id);
    }
    Ok(parent.unwrap())
}

/// Mounts a 130-layer chain with both methods, checks every layer is visible, and prints timings.
#[test]
fn long_chain_both_mount_methods() -> Result<()> {
    require_root();
    let root = root_dir();
    let n = 130;
    let mut report = vec![];
    for method in [MountMethod::NewApi, MountMethod::ShortLinks] {
        let store = open(root.path(), method);
        ensure!(store.mount_method() == method);
        let top = build_chain(&store, n)?;
        ensure!(store.info(&top)?.chain.layers().len() == n);
        let mut times = vec![];
        for _ in 0..5 {
            let t = Instant::now();
            let m = store.mount(&top, None)?;
            let mount_t = t.elapsed();
            for i in 0..n {
                ensure!(fs::read_to_string(m.path().join(format!("f{i}")))? == i.to_string());
            }
            ensure!(fs::read_to_string(m.path().join("top"))? == (n - 1).to_string());
            let t = Instant::now();
            m.unmount()?;
            times.push((mount_t, t.elapsed()));
        }
        // Writable mount on top of the long chain as well.
        let rw = store.prepare(Some(&top), &opts("rw"))?;
        let m = store.mount(&rw, None)?;
        fs::write(m.path().join("f0"), "changed")?;
        drop(m);
        ensure!(fs::read_to_string(store.upper_dir(&rw)?.join("f0"))? == "changed");
        report.push(format!("{method:?}: {:?}", times));
    }
    eprintln!("130-layer mount/unmount timings: {report:#?}");
    Ok(())
}

/// Chains deeper than a mount method can stack (overlayfs: 500 lowers; short links: one option page) mount with
/// their bottom flattened into one hardlinked dir; whiteouts and opaque dirs above and inside the flattened part
/// still apply.
#[test]
fn deep_chains_are_flattened_at_the_bottom() -> Result<()> {
    require_root();
    let root = root_dir();
    let n = 505;
    let store = open(root.path(), MountMethod::NewApi);
    let mut parent = None;
    for i in 0..n {
        let (id, _) = store.add_layer(parent.as_ref(), &opts(&format!("layer {i}")), |dir| {
            let wh = |p: &Path| {
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    p,
                    rustix::fs::FileType::CharacterDevice,
                    rustix::fs::Mode::empty(),
                    0,
                )
                .unwrap()
            };
            fs::write(dir.join(format!("f{i}")), format!("{i}")).unwrap();
            fs::write(dir.join("top"), format!("{i}")).unwrap();
            match i {
                0 => {
                    fs::create_dir(dir.join("d")).unwrap();
                    fs::write(dir.join("d/x"), "x").unwrap();
                    fs::write(dir.join("gone"), "gone").unwrap();
                    fs::write(dir.join("h1"), "h").unwrap();
                    fs::hard_link(dir.join("h1"), dir.join("h2")).unwrap();
                }
                3 => wh(&dir.join("gone")),
                4 => {
                    fs::create_dir(dir.join("d")).unwrap();
                    rustix::fs::lsetxattr(
                        dir.join("d"),
                        "trusted.overlay.opaque",
                        b"y",
                        rustix::fs::XattrFlags::empty(),
                    )
                    .unwrap();
                    fs::write(dir.join("d/y"), "y").unwrap();
                }
                504 => wh(&dir.join("f1")),
                _ => {}
            }
            Ok(Default::default())
        })?;
        parent = Some(id);
    }
    let top = parent.unwrap();
    drop(store);
    for method in [MountMethod::NewApi, MountMethod::ShortLinks] {
        let store = open(root.path(), method);
        let t = Instant::now();
        let m = store.mount(&top, None)?;
        eprintln!(
            "{method:?}: {n}-layer chain mounted in {:?} (bottom flattened)",
            t.elapsed()
        );
        let p = m.path();
        ensure!(
            fs::read_to_string(p.join("top"))? == (n - 1).to_string(),
            "{method:?}"
        );
        ensure!(
            !p.join("gone").exists() && !p.join("f1").exists(),
            "{method:?}: whiteouts"
        );
        let d: Vec<_> = fs::read_dir(p.join("d"))?
            .map(|e| e.unwrap().file_name())
            .collect();
        ensure!(
            d == vec![std::ffi::OsString::from("y")],
            "{method:?}: opaque dir shows {d:?}"
        );
        for i in [0, 2, 250, 499, 503] {
            ensure!(
                fs::read_to_string(p.join(format!("f{i}")))? == i.to_string(),
                "{method:?}: f{i}"
            );
        }
        ensure!(
            fs::metadata(p.join("h1"))?.ino() == fs::metadata(p.join("h2"))?.ino(),
            "{method:?}: hardlink"
        );
        ensure!(
            fs::read_dir(store.dir().join("tmp"))?.count() == 1,
            "flattened dir lives in tmp/"
        );
        m.unmount()?;
        ensure!(
            fs::read_dir(store.dir().join("tmp"))?.next().is_none(),
            "flattened dir removed after unmount"
        );
    }
    Ok(())
}

#[test]
fn open_cleans_leftover_mounts_tmp_and_orphans() -> Result<()> {
    require_root();
    let root = root_dir();
    let store = open(root.path(), MountMethod::Auto);
    let a = build_chain(&store, 2)?;
    let m = store.mount(&a, None)?;
    let path = m.path().to_path_buf();
    std::mem::forget(m); // simulate a crash: the guard never runs
    fs::create_dir_all(store.dir().join("tmp/l-leftover/diff"))?;
    fs::create_dir_all(store.dir().join("layers/orphanlayer/diff"))?;
    ensure!(mounts_under(root.path()).contains(&path));
    drop(store);

    let store = open(root.path(), MountMethod::Auto);
    ensure!(
        mounts_under(root.path()).is_empty(),
        "leftover mount not cleaned"
    );
    ensure!(!path.exists());
    ensure!(fs::read_dir(store.dir().join("tmp"))?.next().is_none());
    ensure!(!store.dir().join("layers/orphanlayer").exists());
    // The leftover mount no longer counts as a use: the snapshot can be removed.
    store.remove(&a)?;
    // Its parent's layer is still used by the parent snapshot; the top layer is gone.
    ensure!(fs::read_dir(store.dir().join("layers"))?.count() == 1);
    for s in store.list()? {
        store.remove(&s.id)?;
    }
    ensure!(
        fs::read_dir(store.dir().join("layers"))?.next().is_none(),
        "layers left"
    );
    Ok(())
}

#[test]
fn leases_protect_and_prune_respects_filters() -> Result<()> {
    require_root();
    let root = root_dir();
    let store = open(root.path(), MountMethod::Auto);
    let base = build_chain(&store, 1)?;
    let (child, child_layer) = store.add_layer(Some(&base), &opts("child"), |d| {
        fs::write(d.join("big"), vec![7u8; 10_000]).unwrap();
        Ok(Default::default())
    })?;
    let mut o = opts("internal thing");
    o.record_type = RecordType::Internal;
    let (internal, _) = store.add_layer(None, &o, |d| {
        fs::write(d.join("i"), "i").unwrap();
        Ok(Default::default())
    })?;
    store.set_cache_key("key-child", &child)?;

    let du = store.disk_usage()?;
    ensure!(du.len() == 3);
    let c = du
        .iter()
        .find(|r| r.id == child.as_str())
        .context("child in du")?;
    ensure!(c.size == 10_000 && !c.mutable && c.parents == vec![base.to_string()]);
    let b = du
        .iter()
        .find(|r| r.id == base.as_str())
        .context("base in du")?;
    ensure!(b.shared, "base layer is also in child's chain");

    let lease = store.lease()?;
    lease.add(&child)?;
    ensure!(
        store.remove(&child).is_err(),
        "leased snapshot must not be removed"
    );
    ensure!(store
        .disk_usage()?
        .iter()
        .any(|r| r.id == child.as_str() && r.in_use));

    // Prune (not --all): removes base (not in use), keeps the leased child and the internal record.
    let pruned = store.prune(&PruneOptions::default())?;
    let ids: Vec<_> = pruned.iter().map(|r| r.id.clone()).collect();
    ensure!(ids == vec![base.to_string()], "pruned {ids:?}");
    // Base's layer is still used by the child's chain, so its files stay and the child still mounts.
    {
        let m = store.mount(&child, None)?;
        ensure!(m.path().join("f0").is_file() && m.path().join("big").is_file());
    }
    // keep-duration: nothing is older than an hour.
    lease.release()?;
    let pruned = store.prune(&PruneOptions {
        all: true,
        keep_duration: Some(std::time::Duration::from_secs(3600)),
        ..Default::default()
    })?;
    ensure!(pruned.is_empty());
    // keep-bytes: with 10 KB allowed, only the small internal record may go... it is enough to drop to the limit.
    let pruned = store.prune(&PruneOptions {
        all: true,
        keep_bytes: Some(10_000),
        ..Default::default()
    })?;
    ensure!(pruned.len() == 1, "keep-bytes pruned {pruned:?}");
    let pruned = store.prune(&PruneOptions {
        all: true,
        ..Default::default()
    })?;
    ensure!(pruned.len() == 1);
    ensure!(store.list()?.is_empty());
    ensure!(
        store.cache_key("key-child")?.is_none(),
        "cache key of a pruned snapshot is dropped"
    );
    ensure!(!store.layer_path(&child_layer).exists());
    let _ = internal;
    ensure!(fs::read_dir(store.dir().join("layers"))?.next().is_none());
    ensure!(fs::read_dir(store.dir().join("l"))?.next().is_none());
    Ok(())
}

#[test]
fn chain_model_helpers() {
    use layerstore::snapshot::{LayerRef, SnapshotId};
    let l = |s: &str| LayerRef::Berth(s.parse().unwrap());
    let a = Chain(vec![l("a1"), l("a2")]);
    let b = Chain(vec![l("a1"), l("a2"), l("b1")]);
    assert_eq!(Chain::merge([&a, &Chain::default(), &b]).layers().len(), 5);
    assert_eq!(b.strip_prefix(&a), Some(Chain(vec![l("b1")])));
    assert_eq!(a.strip_prefix(&b), None);
    assert!("BAD/id".parse::<SnapshotId>().is_err());
}

/// Process-bound leases do not wait for the disk, yet a thousand of them (as a thousand
/// cached builds take and release) leave the metadata file small, and the durable records
/// (snapshots, cache keys) and what the leases changed are there after a reopen, with no
/// lease left.
#[test]
fn many_process_bound_leases_keep_the_metadata_file_small() -> Result<()> {
    require_root();
    let root = root_dir();
    let db_file = root.path().join("snapshots/metadata.redb");
    let (snap, _) = {
        let store = open(root.path(), MountMethod::Auto);
        let added = store.add_layer(None, &opts("leased"), |d| {
            fs::write(d.join("f"), "f").unwrap();
            Ok(Default::default())
        })?;
        store.set_cache_key("key", &added.0)?;
        let before = fs::metadata(&db_file)?.len();
        for _ in 0..1000 {
            let lease = store.lease()?;
            lease.add(&added.0)?;
            ensure!(
                store.disk_usage()?.iter().any(|r| r.in_use),
                "a lease protects at once"
            );
            lease.release()?;
        }
        let after = fs::metadata(&db_file)?.len();
        ensure!(
            after < before + (4 << 20),
            "metadata file grew from {before} to {after} bytes over 1000 leases"
        );
        added
    };
    let store = open(root.path(), MountMethod::Auto);
    ensure!(store.cache_key("key")? == Some(snap.clone()));
    let du = store.disk_usage()?;
    ensure!(du.len() == 1 && !du[0].in_use, "{du:?}");
    ensure!(du[0].usage_count >= 1, "use counts survive: {du:?}");
    Ok(())
}
