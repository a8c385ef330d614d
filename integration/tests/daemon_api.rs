//! berthd's Control/LLBBridge surface in the cases BuildKit's own client tests exercise beyond
//! buildctl's flow: direct solves of empty definitions, warnings with source locations, error
//! details.

use integration::buildkit_client::{new_id, Berthd};
use integration::require_root;
use protos::moby::buildkit::v1 as control;
use std::time::Duration;

/// `client.Solve(llb.Scratch())`: the definition is present but has no ops. buildkitd solves it
/// to the empty result at once; it must not wait for LLBBridge calls that never come.
#[tokio::test(flavor = "multi_thread")]
async fn solve_of_an_empty_definition_returns() {
    require_root();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let build_ref = new_id();
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        c.control().solve(control::SolveRequest {
            r#ref: build_ref.clone(),
            definition: Some(Default::default()),
            ..Default::default()
        }),
    )
    .await
    .expect("Solve of an empty definition must not hang");
    let r = r.unwrap().into_inner();
    assert!(r.exporter_response.is_empty(), "{r:?}");
}
