//! Dockerfile → LLB conversion time (issue #11: a 200-line Dockerfile converts in under 10 ms).
//!
//! The Dockerfile is generated: three stages (a builder, a tools stage, the final image) with
//! every instruction kind the converter handles, `RUN --mount` of each type, heredocs, ARG/ENV
//! expansion and `COPY --from`/`--link`/`--chown`/`--chmod`, 200 lines in all. Image configs come
//! from a fixed in-memory resolver, so what is timed is parsing, expansion, dispatch and marshalling
//! the definition (`llb::State::marshal`), as the frontend does for every build.
//!
//! Run with `cargo bench -p frontend --bench convert`; criterion prints the time per conversion.

// criterion_group!/criterion_main! generate undocumented public functions.
#![allow(missing_docs)]

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use frontend::dockerfile::{dockerfile_to_llb, Platform};

fn convert(c: &mut Criterion) {
    let df = common::dockerfile();
    assert_eq!(
        df.lines().count(),
        200,
        "the bench's Dockerfile must have 200 lines"
    );
    let resolver = common::resolver();
    let opt = common::options(Platform::host());
    // The conversion must succeed and produce a non-trivial definition, or the timing is empty.
    let def = futures::executor::block_on(dockerfile_to_llb(df.as_bytes(), &opt, &resolver))
        .expect("convert the bench Dockerfile")
        .state
        .marshal()
        .expect("marshal");
    // builder (44 RUN/COPY) and tools (32) stages feed the final one: some 90 ops in all.
    assert!(def.def.len() > 80, "only {} ops", def.def.len());
    c.bench_function("dockerfile_to_llb 200 lines (convert + marshal)", |b| {
        b.iter(|| {
            let conv =
                futures::executor::block_on(dockerfile_to_llb(df.as_bytes(), &opt, &resolver))
                    .expect("convert");
            conv.state.marshal().expect("marshal")
        })
    });
}

criterion_group!(benches, convert);
criterion_main!(benches);
