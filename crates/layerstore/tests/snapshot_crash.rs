//! kill -9 safety of the snapshot store: a child process (this test binary re-executed with
//! `BERTH_SNAP_CRASH_CHILD=<root>`) creates, commits, mounts, leases and removes snapshots in a loop; the parent
//! SIGKILLs it at random moments, reopens the store and checks that it is consistent. Needs root.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use layerstore::snapshot::{
    LayerRef, MountMethod, PruneOptions, SnapshotKind, SnapshotOptions, SnapshotStore, StoreOptions,
};
use rand::Rng;

const CHILD_ENV: &str = "BERTH_SNAP_CRASH_CHILD";

fn open(root: &Path) -> SnapshotStore {
    SnapshotStore::open(StoreOptions {
        root: root.to_path_buf(),
        mount_method: MountMethod::Auto,
    })
    .unwrap()
}

/// The child's work loop; runs until killed.
fn child_loop(root: &Path) -> ! {
    let store = open(root);
    let mut rng = rand::thread_rng();
    let mut n = 0u64;
    loop {
        n += 1;
        let committed: Vec<_> = store
            .list()
            .unwrap()
            .into_iter()
            .filter(|s| s.kind == SnapshotKind::Committed)
            .map(|s| s.id)
            .collect();
        let parent = if committed.is_empty() || rng.gen_bool(0.3) {
            None
        } else {
            Some(committed[rng.gen_range(0..committed.len())].clone())
        };
        let token = format!("t{n}x{}", rng.gen::<u32>());
        match rng.gen_range(0..10) {
            0..=4 => {
                let id = store
                    .prepare(parent.as_ref(), &SnapshotOptions::new(token.clone()))
                    .unwrap();
                let up = store.upper_dir(&id).unwrap();
                fs::write(up.join("marker"), &token).unwrap();
                for i in 0..rng.gen_range(1..20) {
                    fs::write(up.join(format!("f{i}")), vec![b'x'; 4096]).unwrap();
                }
                if rng.gen_bool(0.5) {
                    let m = store.mount(&id, None).unwrap();
                    fs::write(m.path().join("via-mount"), &token).unwrap();
                    drop(m);
                }
                if rng.gen_bool(0.9) {
                    store.commit(&id).unwrap();
                }
            }
            5..=6 => {
                let (id, _) = store
                    .add_layer(parent.as_ref(), &SnapshotOptions::new(token.clone()), |d| {
                        fs::write(d.join("marker"), &token).unwrap();
                        Ok(Default::default())
                    })
                    .unwrap();
                store.set_cache_key(&format!("k{n}"), &id).unwrap();
            }
            7 => {
                if let Some(p) = parent {
                    let lease = store.lease().unwrap();
                    lease.add(&p).unwrap();
                    let m = store.mount(&p, None).unwrap();
                    std::thread::sleep(Duration::from_millis(rng.gen_range(0..30)));
                    drop(m);
                    drop(lease);
                }
            }
            _ => {
                if let Some(p) = parent {
                    let _ = store.remove(&p);
                }
            }
        }
    }
}

/// Entry point of the child process; does nothing unless the parent test set `BERTH_SNAP_CRASH_CHILD`.
#[test]
fn crash_child_entry() {
    if let Ok(root) = std::env::var(CHILD_ENV) {
        child_loop(Path::new(&root));
    }
}

fn check_consistent(store: &SnapshotStore) -> Result<usize> {
    let dir = store.dir();
    ensure!(
        fs::read_dir(dir.join("tmp"))?.next().is_none(),
        "tmp/ not empty after open"
    );
    let mi = fs::read_to_string("/proc/self/mountinfo")?;
    ensure!(
        !mi.contains(dir.to_str().unwrap()),
        "leftover mounts after open"
    );
    let snaps = store.list()?;
    let mut used_layers = BTreeSet::new();
    for s in &snaps {
        for l in s.chain.layers() {
            let LayerRef::Berth(lid) = l else { continue };
            used_layers.insert(lid.to_string());
            ensure!(
                store.layer_path(lid).join("diff").is_dir(),
                "layer {lid} of {} missing",
                s.id
            );
            ensure!(
                dir.join("l").join(lid.as_str()).join(".").exists(),
                "link l/{lid} broken"
            );
        }
        match s.kind {
            SnapshotKind::Mutable => {
                let up = store.upper_dir(&s.id)?;
                ensure!(
                    up.is_dir() && up.with_file_name("work").is_dir(),
                    "mutable {} lacks dirs",
                    s.id
                );
            }
            SnapshotKind::Committed => {
                // The top layer holds exactly what the child wrote for this snapshot: no half-committed layer.
                if let Some(LayerRef::Berth(top)) = s.chain.layers().last() {
                    let marker = store.layer_path(top).join("diff/marker");
                    if s.description.starts_with('t') {
                        let got = fs::read_to_string(&marker)
                            .with_context(|| format!("{}", marker.display()))?;
                        ensure!(got == s.description, "layer of {} holds {got}", s.id);
                    }
                }
            }
        }
    }
    // No layer dir without a record (and so without a snapshot using it, since removal drops unused layers).
    for e in fs::read_dir(dir.join("layers"))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        ensure!(used_layers.contains(&name), "orphan layer dir {name}");
    }
    let mutable: BTreeSet<String> = snaps
        .iter()
        .filter(|s| s.kind == SnapshotKind::Mutable)
        .map(|s| s.id.to_string())
        .collect();
    for e in fs::read_dir(dir.join("mutable"))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        ensure!(mutable.contains(&name), "orphan mutable dir {name}");
    }
    // Every committed snapshot mounts and shows its marker.
    for s in snaps.iter().filter(|s| s.kind == SnapshotKind::Committed) {
        let m = store.mount(&s.id, None)?;
        ensure!(m.path().join("marker").is_file() || s.chain.is_empty());
    }
    Ok(snaps.len())
}

#[test]
fn kill_9_leaves_a_consistent_store() -> Result<()> {
    assert!(
        rustix::process::geteuid().is_root(),
        "needs root (overlay mounts)"
    );
    let root = tempfile::Builder::new()
        .prefix("berth-crash-")
        .tempdir_in("/var/tmp")?;
    let exe = std::env::current_exe()?;
    let mut rng = rand::thread_rng();
    let mut counts = vec![];
    for round in 0..5 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, root.path())
            .stdout(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..1500)));
        ensure!(
            child.try_wait()?.is_none(),
            "child exited early in round {round}"
        );
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
            rustix::process::Signal::KILL,
        )?;
        child.wait()?;
        let store = open(root.path());
        counts.push(check_consistent(&store).with_context(|| format!("round {round}"))?);
    }
    eprintln!("snapshots after each kill: {counts:?}");
    ensure!(
        counts.iter().any(|c| *c > 0),
        "the child never committed anything"
    );
    // Nothing is stuck in use after the crashes (process-bound leases were dropped): prune --all empties the store.
    let store = open(root.path());
    store.prune(&PruneOptions {
        all: true,
        ..Default::default()
    })?;
    ensure!(store.list()?.is_empty());
    ensure!(fs::read_dir(store.dir().join("layers"))?.next().is_none());
    Ok(())
}
