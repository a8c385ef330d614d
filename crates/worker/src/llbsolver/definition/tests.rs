//! Definition loader tests (pure: no I/O).

use super::*;
use prost::Message;

fn dg(b: &[u8]) -> String {
    crate::digest::sha256_digest(b)
}

fn term(d: &str, index: i64) -> prost::bytes::Bytes {
    pb::Op {
        inputs: vec![pb::Input {
            digest: d.into(),
            index,
        }],
        ..Default::default()
    }
    .encode_to_vec()
    .into()
}

fn load_ops(ops: Vec<pb::Op>, requested: &[String], allowed: &[String]) -> Result<LoadedDef> {
    let mut def = pb::Definition::default();
    let mut last = String::new();
    for op in ops {
        let b = op.encode_to_vec();
        last = dg(&b);
        def.def.push(b.into());
    }
    def.def.push(term(&last, 0));
    let platform = Platform::host();
    load(
        &def,
        &ValidateOpts {
            platform: &platform,
            allowed_entitlements: allowed,
            requested_entitlements: requested,
        },
    )
}

fn exec_op(mounts: Vec<pb::Mount>, network: pb::NetMode) -> pb::Op {
    pb::Op {
        op: Some(OpPayload::Exec(pb::ExecOp {
            meta: Some(pb::Meta {
                args: vec!["sh".into(), "-c".into(), "true".into()],
                ..Default::default()
            }),
            mounts,
            network: network as i32,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn root_mount() -> pb::Mount {
    pb::Mount {
        input: -1,
        dest: "/".into(),
        output: 0,
        ..Default::default()
    }
}

#[test]
fn exec_outputs_count_bind_mounts_only_and_names_join_args() {
    let secret = pb::Mount {
        dest: "/run/secrets/x".into(),
        mount_type: pb::MountType::Secret as i32,
        ..Default::default()
    };
    let d = load_ops(
        vec![exec_op(vec![root_mount(), secret], pb::NetMode::Unset)],
        &[],
        &[],
    )
    .unwrap();
    let op = &d.ops[0];
    assert_eq!(num_outputs(&op.op), 1);
    assert_eq!(op.name, "sh -c true");
    assert_eq!(d.target, Some((0, 0)));
}

#[test]
fn host_network_needs_requested_and_allowed_entitlement() {
    let op = || vec![exec_op(vec![root_mount()], pb::NetMode::Host)];
    let host = vec!["network.host".to_string()];
    for (req, allow, ok) in [
        (vec![], vec![], false),
        (host.clone(), vec![], false),
        (vec![], host.clone(), false),
        (host.clone(), host.clone(), true),
    ] {
        let r = load_ops(op(), &req, &allow);
        assert_eq!(r.is_ok(), ok, "req {req:?} allow {allow:?}: {r:?}");
        if let Err(e) = r {
            assert_eq!(e.kind(), crate::ErrorKind::PermissionDenied);
        }
    }
}

#[test]
fn file_action_indices_may_refer_to_earlier_actions_only() {
    let mk = |input: i64, output: i64| pb::FileAction {
        input,
        secondary_input: -1,
        output,
        action: Some(pb::file_action::Action::Mkdir(pb::FileActionMkDir {
            path: "/d".into(),
            mode: 0o755,
            ..Default::default()
        })),
    };
    let file = |actions| pb::Op {
        op: Some(OpPayload::File(pb::FileOp { actions })),
        ..Default::default()
    };
    assert!(load_ops(vec![file(vec![mk(-1, -1), mk(0, 0)])], &[], &[]).is_ok());
    // Action 0 cannot use its own result; outputs must be contiguous.
    assert!(load_ops(vec![file(vec![mk(0, 0)])], &[], &[]).is_err());
    assert!(load_ops(vec![file(vec![mk(-1, 1)])], &[], &[]).is_err());
    assert!(load_ops(vec![file(vec![])], &[], &[]).is_err());
}

#[test]
fn local_source_names_and_attr_validation() {
    let src = |attrs: Vec<(&str, &str)>| pb::Op {
        op: Some(OpPayload::Source(pb::SourceOp {
            identifier: "local://context".into(),
            attrs: attrs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })),
        ..Default::default()
    };
    let d = load_ops(
        vec![src(vec![("local.includepattern", r#"["*.go"]"#)])],
        &[],
        &[],
    )
    .unwrap();
    assert_eq!(d.ops[0].name, "local://context (*.go)");
    let d = load_ops(vec![src(vec![])], &[], &[]).unwrap();
    assert_eq!(d.ops[0].name, "local://context");
    let e = load_ops(
        vec![src(vec![("local.excludepatterns", "not json")])],
        &[],
        &[],
    )
    .unwrap_err();
    assert!(e.to_string().contains("local.excludepatterns"), "{e}");
}

#[test]
fn duplicate_ops_collapse_and_unreachable_ops_are_ignored() {
    let a = pb::Op {
        op: Some(OpPayload::Source(pb::SourceOp {
            identifier: "local://a".into(),
            attrs: Default::default(),
        })),
        ..Default::default()
    };
    let unreachable = pb::Op {
        op: Some(OpPayload::Source(pb::SourceOp {
            identifier: "bogus".into(),
            attrs: Default::default(),
        })),
        ..Default::default()
    };
    let ab = a.encode_to_vec();
    let def = pb::Definition {
        def: vec![
            unreachable.encode_to_vec().into(),
            ab.clone().into(),
            ab.clone().into(),
            term(&dg(&ab), 0),
        ],
        ..Default::default()
    };
    let p = Platform::host();
    let d = load(
        &def,
        &ValidateOpts {
            platform: &p,
            allowed_entitlements: &[],
            requested_entitlements: &[],
        },
    )
    .unwrap();
    assert_eq!(d.ops.len(), 1);
}

/// Untrusted input: random corruptions of a valid definition must give errors, never panics.
#[test]
fn corrupted_definitions_never_panic() {
    let mk = |path: &str| pb::FileAction {
        input: -1,
        secondary_input: -1,
        output: 0,
        action: Some(pb::file_action::Action::Mkfile(pb::FileActionMkFile {
            path: path.into(),
            mode: 0o644,
            data: "x".into(),
            ..Default::default()
        })),
    };
    let src = pb::Op {
        op: Some(OpPayload::Source(pb::SourceOp {
            identifier: "local://ctx".into(),
            attrs: [("local.includepattern".to_string(), r#"["a"]"#.to_string())].into(),
        })),
        ..Default::default()
    };
    let sb = src.encode_to_vec();
    let file = pb::Op {
        inputs: vec![pb::Input {
            digest: dg(&sb),
            index: 0,
        }],
        op: Some(OpPayload::File(pb::FileOp {
            actions: vec![mk("/a")],
        })),
        ..Default::default()
    };
    let fb = file.encode_to_vec();
    let base = pb::Definition {
        def: vec![sb.into(), fb.clone().into(), term(&dg(&fb), 0)],
        ..Default::default()
    };
    let encoded = base.encode_to_vec();
    let p = Platform::host();
    let opts = ValidateOpts {
        platform: &p,
        allowed_entitlements: &[],
        requested_entitlements: &[],
    };
    assert!(load(&base, &opts).is_ok());
    let mut state: u64 = 0x9e3779b97f4a7c15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut errors = 0;
    for _ in 0..5000 {
        let mut b = encoded.clone();
        for _ in 0..(1 + next() % 4) {
            let i = (next() as usize) % b.len();
            b[i] = next() as u8;
        }
        if let Ok(def) = pb::Definition::decode(b.as_slice()) {
            if load(&def, &opts).is_err() {
                errors += 1;
            }
        }
        // Also corrupt one op's bytes directly (the definition still decodes).
        let mut d = base.clone();
        let k = (next() as usize) % d.def.len();
        let mut ob = d.def[k].to_vec();
        let i = (next() as usize) % ob.len();
        ob[i] = next() as u8;
        d.def[k] = ob.into();
        let _ = load(&d, &opts);
    }
    assert!(errors > 0, "corruptions must be detected");
}

/// A file op may carry any platform (a `FROM scratch` stage built for darwin) and an exec op
/// any architecture (it runs as it is, as without an emulator in buildkitd); an exec op of
/// another OS than the worker's is refused before anything runs.
#[test]
fn only_exec_ops_must_match_the_worker_os() {
    let darwin = pb::Platform {
        os: "darwin".into(),
        architecture: "ppc64le".into(),
        ..Default::default()
    };
    let file = pb::Op {
        op: Some(OpPayload::File(pb::FileOp {
            actions: vec![pb::FileAction {
                input: -1,
                secondary_input: -1,
                output: 0,
                action: Some(pb::file_action::Action::Mkdir(pb::FileActionMkDir {
                    path: "/out".into(),
                    mode: 0o755,
                    ..Default::default()
                })),
            }],
        })),
        platform: Some(darwin.clone()),
        ..Default::default()
    };
    load_ops(vec![file], &[], &[]).expect("a darwin file op loads");

    let host = Platform::host();
    let other_arch = if host.architecture == "arm64" {
        "amd64"
    } else {
        "arm64"
    };
    let mut exec = exec_op(vec![root_mount()], pb::NetMode::Unset);
    exec.platform = Some(pb::Platform {
        os: host.os.clone(),
        architecture: other_arch.into(),
        ..Default::default()
    });
    load_ops(vec![exec], &[], &[]).expect("an exec op of another architecture loads");

    let mut exec = exec_op(vec![root_mount()], pb::NetMode::Unset);
    exec.platform = Some(pb::Platform {
        os: "windows".into(),
        architecture: host.architecture.clone(),
        ..Default::default()
    });
    let err = load_ops(vec![exec], &[], &[]).unwrap_err().to_string();
    assert!(
        err.contains("cannot run windows/") && err.contains("processes on a"),
        "{err}"
    );
}
