//! The bench Dockerfile's conversion output, pinned: the digest of the marshalled definition and
//! of the image config, as the converter wrote them before its speed work (issue #11). Any change
//! to the bytes of either — op order, field contents, metadata, source locations — fails here, so
//! optimizations of the converter cannot change what it produces. Re-pinned once on purpose
//! (issue #15 item 4): exec ops now carry `cwd: "/"` when no directory is set and
//! `removeMountStubsRecursive: true`, as BuildKit's LLB client writes them, so the ops (and stock
//! buildkitd's cache keys of them) are stock's.

#[path = "../benches/common/mod.rs"]
mod common;

use frontend::dockerfile::{dockerfile_to_llb, Platform};
use prost::Message as _;
use sha2::{Digest as _, Sha256};

fn sha256(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// (definition digest, image config digest, op count, warnings) for the bench Dockerfile.
fn convert(platform: &str) -> (String, String, usize, usize) {
    let opt = common::options(Platform::parse(platform).unwrap());
    let df = common::dockerfile();
    let conv =
        futures::executor::block_on(dockerfile_to_llb(df.as_bytes(), &opt, &common::resolver()))
            .expect("convert the bench Dockerfile");
    let def = conv.state.marshal().expect("marshal");
    (
        sha256(&def.encode_to_vec()),
        sha256(&conv.image.to_go_json()),
        def.def.len(),
        conv.warnings.len(),
    )
}

#[test]
fn bench_dockerfile_linux_amd64() {
    let (def, image, ops, warnings) = convert("linux/amd64");
    assert_eq!(ops, 86);
    assert_eq!(warnings, 0);
    assert_eq!(
        def,
        "07a4bf9fb8087c485929a0471b709bdbc118f038e0bf0f4784082fbc6732f617"
    );
    assert_eq!(
        image,
        "39e42330a127078f43c2a61154b6ee8c56c376307cdfb8a758d403521629281c"
    );
}

#[test]
fn bench_dockerfile_linux_arm64_v8() {
    let (def, image, ops, warnings) = convert("linux/arm64/v8");
    assert_eq!(ops, 86);
    assert_eq!(warnings, 0);
    assert_eq!(
        def,
        "02250a6ea258239e5e2826100712663dccba990eada78664ced36b16f3cf2f52"
    );
    assert_eq!(
        image,
        "7bf2376cca5304c9169eb9816205ccbcb481e39dee38638d2f10f6676e1a296c"
    );
}
