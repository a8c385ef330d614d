//! Measures a local-context build through the Worker: first build (sync + snapshot + copy),
//! unchanged rebuild (sync check + cache hits), and a one-file change.
//!
//! `cargo run --release -p worker --example bench_local -- [files] [bytes-per-file]` (as root).
//! The session is the in-memory fsutil DiffCopy pair used by the tests (no gRPC).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use llb::CopyOpts;
use support::*;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let files: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(2000);
    let size: usize = args
        .get(2)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(50_000);
    let w = TestWorker::new()?;
    let dir = tempfile::tempdir_in("/var/tmp")?;
    for i in 0..files {
        let d = dir.path().join(format!("d{}", i % 50));
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(format!("f{i}")), vec![(i % 251) as u8; size])?;
    }
    let ctx: llb::State = llb::local("ctx").shared_key_hint("ctx").into();
    let st = llb::scratch().file(llb::copy(
        &ctx,
        "/",
        "/app",
        CopyOpts::default().create_dest_path(true),
    ));
    let session = DirSession::with("ctx", dir.path());
    let total_mb = (files * size) as f64 / 1e6;
    for label in ["first build", "unchanged rebuild", "one file changed"] {
        if label == "one file changed" {
            std::fs::write(dir.path().join("d0/f0"), "changed")?;
        }
        let t = Instant::now();
        let s = solve(&w.worker, &st, session.clone()).await;
        s.ok();
        println!(
            "{label}: {:.2}s ({files} files, {total_mb:.0} MB; executed {:?})",
            t.elapsed().as_secs_f64(),
            s.executed()
        );
    }
    Ok(())
}
