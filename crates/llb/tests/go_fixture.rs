//! Compares the builder's output with definitions marshalled by Go's `client/llb` v0.11.6
//! (fixtures captured in `crates/protos/tests/fixtures`, see its README): the same graph must
//! give the same op bytes (hence digests) and the same metadata.

use llb::{CopyOpts, MkdirOpts, MkfileOpts, RmOpts};
use prost::Message;
use protos::pb;

fn fixture(name: &str) -> pb::Definition {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../protos/tests/fixtures")
        .join(name);
    let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    pb::Definition::decode(bytes.as_slice()).unwrap()
}

fn ops(def: &pb::Definition) -> Vec<pb::Op> {
    def.def
        .iter()
        .map(|b| pb::Op::decode(b.as_ref()).unwrap())
        .collect()
}

#[test]
fn local_fileop_matches_go_byte_for_byte() {
    let go = fixture("definition_local_fileop.pb");
    let go_ops = ops(&go);
    let Some(pb::op::Op::Source(src)) = &go_ops[0].op else {
        panic!("fixture op 0 is the local source")
    };
    let unique = src.attrs["local.unique"].clone();
    let amd64 = llb::Platform {
        os: "linux".into(),
        architecture: "amd64".into(),
        variant: String::new(),
    };
    let ctx = llb::local("context")
        .shared_key_hint("context")
        .unique_id(unique)
        .state();
    let st = llb::scratch()
        .with_platform(amd64)
        .file(
            llb::mkdir("/out/sub", 0o755, MkdirOpts::default().parents(true))
                .mkfile(
                    "/out/sub/hello.txt",
                    0o644,
                    "hello from berth fixture\n",
                    MkfileOpts::default(),
                )
                .copy(
                    &ctx,
                    "/",
                    "/out/ctx/",
                    CopyOpts::default()
                        .dir_contents_only(true)
                        .create_dest_path(true)
                        .allow_wildcard(true),
                )
                .rm(
                    "/out/ctx/*.skip",
                    RmOpts::default().allow_not_found(true).allow_wildcard(true),
                ),
        )
        .custom_name("assemble output");
    let ours = st.marshal().unwrap();
    let our_ops = ops(&ours);
    assert_eq!(our_ops, go_ops, "decoded op structure");
    assert_eq!(ours.def, go.def, "op bytes (and so digests) identical");
    assert_eq!(ours.metadata, go.metadata, "metadata and caps identical");
}

#[test]
fn full_fixture_decodes_with_expected_shape() {
    // The full graph uses features (exec, merge, diff) whose structure the worker must
    // accept; check the shapes the llb builder also produces: secret/ssh mounts keep
    // input/output 0, merge/diff have no platform.
    let go = fixture("definition_full.pb");
    let go_ops = ops(&go);
    let exec = go_ops
        .iter()
        .find_map(|o| match &o.op {
            Some(pb::op::Op::Exec(e)) => Some(e.clone()),
            _ => None,
        })
        .expect("an exec op");
    let secret = exec
        .mounts
        .iter()
        .find(|m| m.mount_type == pb::MountType::Secret as i32)
        .expect("secret mount");
    assert_eq!((secret.input, secret.output), (0, 0));
    for o in &go_ops {
        if matches!(o.op, Some(pb::op::Op::Merge(_)) | Some(pb::op::Op::Diff(_))) {
            assert!(o.platform.is_none());
        }
    }
}
