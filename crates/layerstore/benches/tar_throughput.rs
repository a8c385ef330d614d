//! Layer export throughput: `write_layer` (tar + diffID + tar-split in one pass) against
//! `tar -c | sha256sum` on the same tree, plus `apply_layer` of the result.
//!
//! Run: `cargo bench -p layerstore --bench tar_throughput` (as root not required).
//! `BERTH_BENCH_BYTES` sets the tree size (default 1 GiB); the tree is generated under
//! /var/tmp and removed afterwards. Timings are wall clock with a warm page cache.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use layerstore::tar::{apply_layer, write_layer, ApplyOptions, WriteOptions};

/// Writes a tree of `total` bytes: 90% in ~4 MiB files, 10% in ~16 KiB files, spread
/// over directories, with pseudo-random (incompressible) content.
fn generate(root: &Path, total: u64) -> (u64, u64) {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut fill = |buf: &mut [u8]| {
        for chunk in buf.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let b = state.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    };
    let mut files = 0u64;
    let mut written = 0u64;
    let big = 4u64 << 20;
    let small = 16u64 << 10;
    let mut buf = vec![0u8; big as usize];
    let big_total = total / 10 * 9;
    let mut i = 0u64;
    while written < big_total {
        let dir = root.join(format!("big/{:03}", i % 64));
        std::fs::create_dir_all(&dir).unwrap();
        let n = big.min(big_total - written) as usize;
        fill(&mut buf[..n]);
        std::fs::write(dir.join(format!("blob-{i:06}")), &buf[..n]).unwrap();
        written += n as u64;
        files += 1;
        i += 1;
    }
    while written < total {
        let dir = root.join(format!("small/{:03}/{:02}", i % 97, i % 13));
        std::fs::create_dir_all(&dir).unwrap();
        let n = small.min(total - written) as usize;
        fill(&mut buf[..n]);
        std::fs::write(dir.join(format!("f-{i:07}.dat")), &buf[..n]).unwrap();
        written += n as u64;
        files += 1;
        i += 1;
    }
    (written, files)
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn shell_tar_sha(root: &Path) -> (Duration, String) {
    let t = Instant::now();
    let mut tar = Command::new("tar")
        .args(["--sort=name", "-C"])
        .arg(root)
        .args(["-cf", "-", "."])
        .stdout(Stdio::piped())
        .spawn()
        .expect("tar");
    let sha = Command::new("sha256sum")
        .stdin(tar.stdout.take().unwrap())
        .output()
        .expect("sha256sum");
    assert!(tar.wait().unwrap().success());
    (
        t.elapsed(),
        String::from_utf8_lossy(&sha.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_owned(),
    )
}

/// A sink that only counts (the bench measures producing the stream, not storing it).
struct Count(u64);
impl Write for Count {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass other flags: only
    // run the real thing under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("tar_throughput: run with `cargo bench` (skipped)");
        return;
    }
    let total: u64 = std::env::var("BERTH_BENCH_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30);
    let work = tempfile::Builder::new()
        .prefix("berth-bench-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let t = Instant::now();
    let (bytes, files) = generate(&src, total);
    println!(
        "tree: {:.0} MiB in {files} files (generated in {:.1?})",
        bytes as f64 / 1048576.0,
        t.elapsed()
    );

    // Warm the page cache the same way for both contenders.
    let _ = shell_tar_sha(&src);

    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut size = 0;
    for _ in 0..3 {
        let mut split = Vec::new();
        let t = Instant::now();
        let d = write_layer(&src, Count(0), Some(&mut split), &WriteOptions::default()).unwrap();
        ours.push(t.elapsed());
        size = d.size;
        let (dt, _) = shell_tar_sha(&src);
        theirs.push(dt);
    }
    ours.sort();
    theirs.sort();
    let (o, s) = (ours[1], theirs[1]);
    println!(
        "write_layer (tar + sha256 diffID + tar-split): median {o:.2?} = {:.0} MB/s",
        mbps(size, o)
    );
    println!(
        "tar -c | sha256sum:                           median {s:.2?} = {:.0} MB/s",
        mbps(size, s)
    );
    println!(
        "ratio: write_layer is {:.2}x the speed of tar | sha256sum",
        s.as_secs_f64() / o.as_secs_f64()
    );

    // Apply: tar file → new directory (writes every byte to disk).
    let tar_path = work.path().join("layer.tar");
    write_layer(
        &src,
        std::io::BufWriter::new(std::fs::File::create(&tar_path).unwrap()),
        None,
        &WriteOptions::default(),
    )
    .unwrap();
    let dst = work.path().join("dst");
    let t = Instant::now();
    let st = apply_layer(
        std::fs::File::open(&tar_path).unwrap(),
        &dst,
        None,
        &ApplyOptions::default(),
    )
    .unwrap();
    let a = t.elapsed();
    println!(
        "apply_layer (untar + sha256 + dir creation, no fsync): {a:.2?} = {:.0} MB/s ({} entries)",
        mbps(st.size, a),
        st.entries
    );
}
