//! Work per Dockerfile → LLB conversion, independent of machine load (issue #11): converts and
//! marshals the bench Dockerfile of `convert.rs` ITERATIONS times (default 200) after one
//! warm-up conversion, for counting tools. Build with
//! `cargo bench -p frontend --bench convert_count --no-run`, then run the printed binary as
//! `perf stat -e instructions BIN ITERATIONS` (instructions per conversion: the difference
//! to a run with 0 iterations, divided by ITERATIONS) or
//! `valgrind --tool=dhat BIN ITERATIONS` (allocations).

// A harness-less bench binary.
#![allow(missing_docs)]

mod common;

use frontend::dockerfile::{dockerfile_to_llb, Platform};

fn main() {
    // `cargo bench` passes `--bench`; the first number is the iteration count.
    let n: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200);
    let df = common::dockerfile();
    let resolver = common::resolver();
    let opt = common::options(Platform::parse("linux/amd64").expect("platform"));
    let once = || {
        let conv = futures::executor::block_on(dockerfile_to_llb(df.as_bytes(), &opt, &resolver))
            .expect("convert the bench Dockerfile");
        conv.state.marshal().expect("marshal")
    };
    // One conversion outside the count: lazily built statics are not per-conversion work.
    assert!(once().def.len() > 80);
    for _ in 0..n {
        std::hint::black_box(once());
    }
}
