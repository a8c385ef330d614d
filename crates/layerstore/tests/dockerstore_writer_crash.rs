//! kill -9 safety of the offline writer: a child process (this test binary re-executed with
//! `BERTH_DW_CRASH_CHILD=<data-root>`) writes layer chains into a data root in a loop; the parent SIGKILLs it at
//! random moments, reopens the writer (which runs `recover`) and checks that Docker would find a consistent store:
//! every layerdb entry complete and pointing at a full layer dir, no unreferenced or marked layer dirs, no dangling
//! `l/` links, no leftover write-sets. Needs root (device nodes for whiteouts).

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use layerstore::dockerstore::{
    DaemonCheck, DockerStore, LayerSource, OfflineWriter, StorageDriver,
};
use rand::Rng;

const CHILD_ENV: &str = "BERTH_DW_CRASH_CHILD";

/// A small random layer tar (in memory; test data only).
fn random_tar(rng: &mut impl Rng) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let n = rng.gen_range(1..30);
    for i in 0..n {
        let data: Vec<u8> = (0..rng.gen_range(0..20_000)).map(|_| rng.gen()).collect();
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append_data(&mut h, format!("dir{}/f{i}", i % 3), &data[..])
            .unwrap();
    }
    b.into_inner().unwrap()
}

fn child_loop(root: &Path) -> ! {
    let store = DockerStore::new(root, StorageDriver::Overlay2);
    let w = OfflineWriter::open(store, &DaemonCheck::default()).unwrap();
    let mut rng = rand::thread_rng();
    loop {
        let mut parent = None;
        for _ in 0..rng.gen_range(1..5) {
            let tar = random_tar(&mut rng);
            let l = w
                .write_layer(
                    parent.as_ref(),
                    LayerSource::Tar {
                        reader: Box::new(&tar[..]),
                        diff_id: None,
                    },
                )
                .unwrap();
            parent = Some(l.chain_id);
        }
    }
}

/// Entry point of the child process; does nothing unless the parent test set `BERTH_DW_CRASH_CHILD`.
#[test]
fn crash_child_entry() {
    if let Ok(root) = std::env::var(CHILD_ENV) {
        child_loop(Path::new(&root));
    }
}

fn check(store: &DockerStore) -> Result<usize> {
    let drv = store.driver_dir();
    let sha = store.layerdb_dir().join("sha256");
    let mut referenced = BTreeSet::new();
    let mut n = 0;
    for e in fs::read_dir(&sha)? {
        let e = e?;
        let chain: layerstore::Digest =
            format!("sha256:{}", e.file_name().to_string_lossy()).parse()?;
        let entry = store
            .layer(&chain)?
            .with_context(|| format!("entry {chain}"))?;
        for f in ["diff", "size", "cache-id", "tar-split.json.gz"] {
            ensure!(e.path().join(f).is_file(), "{chain}: {f} missing");
        }
        if let Some(p) = entry.parent {
            ensure!(store.layer(&p)?.is_some(), "{chain}: parent {p} missing");
            ensure!(drv.join(&entry.cache_id).join("lower").is_file());
        }
        let dir = drv.join(&entry.cache_id);
        ensure!(entry.diff_dir.is_dir(), "{chain}: diff dir missing");
        ensure!(
            !dir.join("berth-incomplete").exists(),
            "{chain}: marker left"
        );
        let link = fs::read_to_string(dir.join("link"))?;
        ensure!(fs::canonicalize(drv.join("l").join(&link))? == fs::canonicalize(&entry.diff_dir)?);
        referenced.insert(entry.cache_id);
        n += 1;
    }
    for e in fs::read_dir(&drv)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        ensure!(
            name == "l" || referenced.contains(&name),
            "unreferenced layer dir {name}"
        );
    }
    for e in fs::read_dir(drv.join("l"))? {
        let p = e?.path();
        ensure!(p.join(".").exists(), "dangling link {}", p.display());
    }
    for e in fs::read_dir(store.layerdb_dir().join("tmp"))? {
        ensure!(false, "leftover write-set {:?}", e?.file_name());
    }
    Ok(n)
}

#[test]
fn kill_9_during_direct_writes_is_recovered() -> Result<()> {
    assert!(rustix::process::geteuid().is_root(), "needs root");
    let root = tempfile::Builder::new()
        .prefix("berth-dw-crash-")
        .tempdir_in("/var/tmp")?;
    let exe = std::env::current_exe()?;
    let mut rng = rand::thread_rng();
    let mut counts = vec![];
    let mut recovered_any = false;
    for round in 0..6 {
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
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..1200)));
        ensure!(
            child.try_wait()?.is_none(),
            "child exited early in round {round}"
        );
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
            rustix::process::Signal::KILL,
        )?;
        child.wait()?;
        let store = DockerStore::new(root.path(), StorageDriver::Overlay2);
        let report = layerstore::dockerstore::recover(&store)?;
        recovered_any |= report != Default::default();
        let w = OfflineWriter::open(store.clone(), &DaemonCheck::default())?;
        counts.push(check(w.store()).with_context(|| format!("round {round}"))?);
    }
    eprintln!("layers after each kill: {counts:?}; recover had work: {recovered_any}");
    ensure!(
        counts.last().copied().unwrap_or(0) > 0,
        "the child never wrote a layer"
    );
    Ok(())
}
