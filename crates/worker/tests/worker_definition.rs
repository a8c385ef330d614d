//! Malformed definitions are rejected as InvalidArgument naming the op, before anything runs;
//! an empty definition gives the empty result. Needs root (the worker root uses overlayfs).

mod support;

use anyhow::Result;
use llb::{CopyOpts, MkfileOpts};
use prost::Message;
use protos::pb;
use sha2::Digest as _;
use support::*;
use worker::ErrorKind;

fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

fn terminal(d: &str, index: i64) -> Vec<u8> {
    pb::Op {
        inputs: vec![pb::Input {
            digest: d.into(),
            index,
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

fn file_op(actions: Vec<pb::FileAction>, inputs: Vec<pb::Input>) -> Vec<u8> {
    pb::Op {
        inputs,
        op: Some(pb::op::Op::File(pb::FileOp { actions })),
        ..Default::default()
    }
    .encode_to_vec()
}

fn mkfile_action(input: i64, output: i64) -> pb::FileAction {
    pb::FileAction {
        input,
        secondary_input: -1,
        output,
        action: Some(pb::file_action::Action::Mkfile(pb::FileActionMkFile {
            path: "/f".into(),
            mode: 0o644,
            data: "x".into(),
            owner: None,
            timestamp: -1,
        })),
    }
}

async fn expect_invalid(w: &worker::Worker, def: pb::Definition, needle: &str) {
    let s = solve_def(w, def, no_session()).await;
    let e = s.err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(
        e.to_string().contains(needle),
        "error {e:?} should mention {needle}"
    );
    assert!(s.events.is_empty(), "nothing may start: {:?}", s.events);
}

#[tokio::test]
async fn malformed_definitions_are_rejected() -> Result<()> {
    let w = TestWorker::new()?;
    let good = llb::scratch()
        .file(llb::mkfile("/f", 0o644, "x", MkfileOpts::default()))
        .marshal()?;

    // Bad digest: the op bytes were altered after the graph was built, so the terminal's input
    // digest names nothing in the definition.
    let mut bad = good.clone();
    let mut op = pb::Op::decode(bad.def[0].as_ref())?;
    if let Some(pb::op::Op::File(f)) = &mut op.op {
        if let Some(pb::file_action::Action::Mkfile(m)) = &mut f.actions[0].action {
            m.data = "tampered".into();
        }
    }
    bad.def[0] = op.encode_to_vec().into();
    let want = digest(&good.def[0]);
    expect_invalid(&w.worker, bad, &want).await;

    // Output index out of range on the terminal's input.
    let f = file_op(vec![mkfile_action(-1, 0)], vec![]);
    let def = pb::Definition {
        def: vec![f.clone().into(), terminal(&digest(&f), 3).into()],
        ..Default::default()
    };
    expect_invalid(&w.worker, def, "output index 3").await;

    // Action input index out of range.
    let f2 = file_op(vec![mkfile_action(5, 0)], vec![]);
    let def = pb::Definition {
        def: vec![f2.clone().into(), terminal(&digest(&f2), 0).into()],
        ..Default::default()
    };
    expect_invalid(&w.worker, def, &digest(&f2)).await;

    // Unknown op: a payload field this version does not know (field 9, a length-delimited
    // message) decodes to an op without payload.
    let unknown = vec![0x4a, 0x02, 0x08, 0x01];
    let def = pb::Definition {
        def: vec![
            unknown.clone().into(),
            terminal(&digest(&unknown), 0).into(),
        ],
        ..Default::default()
    };
    expect_invalid(&w.worker, def, "unknown or missing op type").await;

    // An input digest that is not in the definition.
    let f3 = file_op(
        vec![mkfile_action(0, 0)],
        vec![pb::Input {
            digest: digest(b"nothing"),
            index: 0,
        }],
    );
    let def = pb::Definition {
        def: vec![f3.clone().into(), terminal(&digest(&f3), 0).into()],
        ..Default::default()
    };
    expect_invalid(&w.worker, def, "is not in the definition").await;

    // Undecodable bytes.
    let def = pb::Definition {
        def: vec![
            vec![0xff, 0xff, 0xff].into(),
            terminal("sha256:x", 0).into(),
        ],
        ..Default::default()
    };
    expect_invalid(&w.worker, def, "cannot decode op").await;

    // An unsupported cap in op metadata.
    let mut def = good.clone();
    let d = digest(&def.def[0]);
    def.metadata
        .get_mut(&d)
        .unwrap()
        .caps
        .insert("source.git.signatureverify".into(), true);
    expect_invalid(&w.worker, def, "source.git.signatureverify").await;

    // Terminal op without an input.
    let def = pb::Definition {
        def: vec![f.clone().into(), pb::Op::default().encode_to_vec().into()],
        ..Default::default()
    };
    expect_invalid(&w.worker, def, "terminal op has no input").await;

    // Exec without a root mount.
    let e = pb::Op {
        op: Some(pb::op::Op::Exec(pb::ExecOp {
            meta: Some(pb::Meta {
                args: vec!["true".into()],
                ..Default::default()
            }),
            mounts: vec![pb::Mount {
                input: -1,
                dest: "/data".into(),
                output: 0,
                ..Default::default()
            }],
            ..Default::default()
        })),
        ..Default::default()
    }
    .encode_to_vec();
    let def = pb::Definition {
        def: vec![e.clone().into(), terminal(&digest(&e), 0).into()],
        ..Default::default()
    };
    expect_invalid(&w.worker, def, "no root mount").await;

    // Unknown source scheme.
    let src = pb::Op {
        op: Some(pb::op::Op::Source(pb::SourceOp {
            identifier: "ftp://example/x".into(),
            attrs: Default::default(),
        })),
        ..Default::default()
    }
    .encode_to_vec();
    let def = pb::Definition {
        def: vec![src.clone().into(), terminal(&digest(&src), 0).into()],
        ..Default::default()
    };
    expect_invalid(&w.worker, def, "unknown source type").await;
    Ok(())
}

#[tokio::test]
async fn empty_definition_is_scratch_and_names_show_in_progress() -> Result<()> {
    let w = TestWorker::new()?;
    let s = solve_def(&w.worker, pb::Definition::default(), no_session()).await;
    let r = s.ok();
    assert!(r.is_empty() && r.snapshot_id().is_none());
    assert!(list(r, "/").await?.is_empty());

    // Derived names (llb.md §9) and custom names.
    let a = llb::scratch().file(llb::mkfile("/a", 0o644, "a", MkfileOpts::default()));
    let b = llb::scratch()
        .file(llb::mkfile("/b", 0o644, "b", MkfileOpts::default()))
        .custom_name("[stage] make b");
    let st = a.file(llb::copy(&b, "/b", "/c", CopyOpts::default()));
    let s = solve(&w.worker, &st, no_session()).await;
    let mut names: Vec<String> = s.completed().into_iter().map(|(n, _)| n).collect();
    names.sort();
    assert_eq!(names, vec!["[stage] make b", "copy /b /c", "mkfile /a"]);
    let inputs = s
        .events
        .iter()
        .find_map(|e| match e {
            worker::ProgressEvent::VertexStarted { name, inputs, .. } if name == "copy /b /c" => {
                Some(inputs.clone())
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(
        inputs.len(),
        2,
        "progress inputs are the op's input digests"
    );
    Ok(())
}
