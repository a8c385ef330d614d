//! Loading and validating a `pb.Definition` before anything runs (`llb.md` §1–2, §9).
//!
//! Digests are computed over the received bytes. The graph reachable from the terminal op is
//! checked: every op parses, has an operation, names existing inputs with in-range output indexes,
//! has well-formed action/mount indexes, declares only supported caps, and there is no cycle.
//! Errors are `InvalidArgument` naming the op.

use crate::errors::{Error, Result};
use prost::Message;
use protos::pb::{self, file_action::Action, op::Op as OpKind};
use sha2::Digest;
use std::collections::HashMap;

/// One op of a loaded definition.
#[derive(Debug, Clone)]
pub struct LoadedOp {
    /// `sha256:<hex>` of its bytes.
    pub digest: String,
    /// The op.
    pub op: pb::Op,
    /// Display name (`llb.customname` or derived).
    pub name: String,
    /// Digests of its inputs, in order.
    pub inputs: Vec<String>,
    /// Its metadata, if any.
    pub meta: Option<pb::OpMetadata>,
}

/// A validated definition.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Ops by digest.
    pub ops: HashMap<String, LoadedOp>,
    /// Reachable ops, inputs before users.
    pub order: Vec<String>,
    /// The result: op digest and output index.
    pub result: (String, i64),
}

/// `sha256:<hex>` of bytes.
pub fn digest_of(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

/// Loads `def`; `Ok(None)` for the empty definition (the result is scratch).
pub fn load(def: &pb::Definition) -> Result<Option<Loaded>> {
    if def.def.is_empty() {
        return Ok(None);
    }
    if def.def.len() < 2 {
        return Err(Error::invalid(
            "invalid LLB definition: need at least one op and the terminal op",
        ));
    }
    let mut ops: HashMap<String, pb::Op> = HashMap::new();
    let mut last = String::new();
    for (i, bytes) in def.def.iter().enumerate() {
        let op = pb::Op::decode(bytes.as_ref()).map_err(|e| {
            Error::invalid(format!(
                "invalid LLB definition: def[{i}]: failed to parse op: {e}"
            ))
        })?;
        let d = digest_of(bytes);
        last = d.clone();
        ops.insert(d, op);
    }
    let terminal = ops.get(&last).expect("inserted").clone();
    if terminal.op.is_some() {
        return Err(Error::invalid(format!(
            "invalid LLB definition: the last op {last} must be the terminal op (no operation, one input)"
        )));
    }
    let Some(res) = terminal.inputs.first() else {
        return Err(Error::invalid(format!(
            "invalid LLB definition: terminal op {last} has no input"
        )));
    };
    for (dgst, meta) in &def.metadata {
        if !ops.contains_key(dgst) {
            continue;
        }
        for (cap, on) in &meta.caps {
            if *on && !crate::caps::llb_cap_supported(cap) {
                return Err(Error::invalid(format!(
                    "op {dgst} requires LLB capability {cap:?}, which berth does not support"
                )));
            }
        }
    }

    // DFS from the result with cycle detection (iterative, no recursion limit).
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    let mut marks: HashMap<String, Mark> = HashMap::new();
    let mut order = Vec::new();
    let mut stack: Vec<(String, usize)> = vec![(res.digest.clone(), 0)];
    if !ops.contains_key(&res.digest) || res.digest == last {
        return Err(Error::invalid(format!(
            "invalid LLB definition: terminal op refers to missing op {}",
            res.digest
        )));
    }
    marks.insert(res.digest.clone(), Mark::Visiting);
    while let Some((d, next)) = stack.pop() {
        let op = &ops[&d];
        if next < op.inputs.len() {
            stack.push((d.clone(), next + 1));
            let inp = &op.inputs[next];
            if !ops.contains_key(&inp.digest) || inp.digest == last {
                return Err(Error::invalid(format!(
                    "invalid LLB definition: op {d} refers to missing input {}",
                    inp.digest
                )));
            }
            match marks.get(&inp.digest) {
                Some(Mark::Visiting) => {
                    return Err(Error::invalid(format!(
                        "invalid LLB definition: cycle through op {}",
                        inp.digest
                    )))
                }
                Some(Mark::Done) => {}
                None => {
                    marks.insert(inp.digest.clone(), Mark::Visiting);
                    stack.push((inp.digest.clone(), 0));
                }
            }
        } else {
            marks.insert(d.clone(), Mark::Done);
            order.push(d);
        }
    }

    let mut loaded = HashMap::new();
    for d in &order {
        let op = ops[d].clone();
        validate_op(d, &op, &ops)?;
        let meta = def.metadata.get(d).cloned();
        let name = vertex_name(&op, meta.as_ref());
        let inputs = op.inputs.iter().map(|i| i.digest.clone()).collect();
        loaded.insert(
            d.clone(),
            LoadedOp {
                digest: d.clone(),
                op,
                name,
                inputs,
                meta,
            },
        );
    }
    check_index(&res.digest, res.index, &ops[&res.digest], "terminal op")?;
    Ok(Some(Loaded {
        ops: loaded,
        order,
        result: (res.digest.clone(), res.index),
    }))
}

/// Number of outputs an op has.
pub fn output_count(op: &pb::Op) -> i64 {
    match &op.op {
        Some(OpKind::Source(_))
        | Some(OpKind::Merge(_))
        | Some(OpKind::Diff(_))
        | Some(OpKind::Build(_)) => 1,
        Some(OpKind::Exec(e)) => e.mounts.iter().filter(|m| m.output >= 0).count() as i64,
        Some(OpKind::File(f)) => f.actions.iter().filter(|a| a.output >= 0).count() as i64,
        Some(OpKind::Passthrough(p)) => p.outputs.len() as i64,
        None => 0,
    }
}

fn check_index(d: &str, index: i64, target: &pb::Op, by: &str) -> Result<()> {
    let n = output_count(target);
    if index < 0 || index >= n {
        return Err(Error::invalid(format!(
            "invalid LLB definition: {by} uses output {index} of op {d}, which has {n} output(s)"
        )));
    }
    Ok(())
}

fn validate_op(d: &str, op: &pb::Op, all: &HashMap<String, pb::Op>) -> Result<()> {
    for inp in &op.inputs {
        check_index(
            &inp.digest,
            inp.index,
            &all[&inp.digest],
            &format!("op {d}"),
        )?;
    }
    let n_inputs = op.inputs.len() as i64;
    let bad = |what: String| {
        Err(Error::invalid(format!(
            "invalid LLB definition: op {d}: {what}"
        )))
    };
    match &op.op {
        None => bad("no operation".into()),
        Some(OpKind::Source(s)) => {
            if s.identifier.is_empty() {
                return bad("source without identifier".into());
            }
            if !s.identifier.contains("://") {
                return bad(format!("invalid source identifier {:?}", s.identifier));
            }
            Ok(())
        }
        Some(OpKind::Exec(e)) => {
            let Some(meta) = &e.meta else {
                return bad("exec without meta".into());
            };
            if meta.args.is_empty() {
                return bad("exec without args".into());
            }
            if e.mounts.is_empty() {
                return bad("exec without mounts".into());
            }
            if !e.mounts.iter().any(|m| m.dest == "/") {
                return bad("exec without a root mount".into());
            }
            for m in &e.mounts {
                if m.input < -1 || m.input >= n_inputs {
                    return bad(format!(
                        "mount {} uses input {} of {n_inputs}",
                        m.dest, m.input
                    ));
                }
            }
            let mut outs: Vec<i64> = e
                .mounts
                .iter()
                .map(|m| m.output)
                .filter(|o| *o >= 0)
                .collect();
            outs.sort();
            if outs.iter().enumerate().any(|(i, o)| *o != i as i64) {
                return bad("mount outputs are not 0..n".into());
            }
            Ok(())
        }
        Some(OpKind::File(f)) => {
            if f.actions.is_empty() {
                return bad("file op without actions".into());
            }
            let mut outs = Vec::new();
            for (k, a) in f.actions.iter().enumerate() {
                let limit = n_inputs + k as i64;
                if a.input < -1 || a.input >= limit {
                    return bad(format!(
                        "action {k} uses input {} (valid: -1..{limit})",
                        a.input
                    ));
                }
                if a.secondary_input < -1 || a.secondary_input >= limit {
                    return bad(format!(
                        "action {k} uses secondary input {} (valid: -1..{limit})",
                        a.secondary_input
                    ));
                }
                if a.action.is_none() {
                    return bad(format!("action {k} has no action"));
                }
                if a.output >= 0 {
                    outs.push(a.output);
                }
            }
            outs.sort();
            if outs.iter().enumerate().any(|(i, o)| *o != i as i64) {
                return bad("action outputs are not unique and contiguous from 0".into());
            }
            Ok(())
        }
        Some(OpKind::Merge(m)) => {
            if m.inputs.is_empty() {
                return bad("merge without inputs".into());
            }
            for i in &m.inputs {
                if i.input < 0 || i.input >= n_inputs {
                    return bad(format!("merge input {} out of range", i.input));
                }
            }
            Ok(())
        }
        Some(OpKind::Diff(df)) => {
            let (Some(l), Some(u)) = (&df.lower, &df.upper) else {
                return bad("diff without lower or upper".into());
            };
            for i in [l.input, u.input] {
                if i < -1 || i >= n_inputs {
                    return bad(format!("diff input {i} out of range"));
                }
            }
            Ok(())
        }
        Some(OpKind::Build(_)) => Err(Error::unimplemented(format!(
            "op {d}: BuildOp is not supported"
        ))),
        Some(OpKind::Passthrough(_)) => Err(Error::unimplemented(format!(
            "op {d}: PassthroughOp is not supported"
        ))),
    }
}

/// The progress name of an op (`llb.md` §9).
pub fn vertex_name(op: &pb::Op, meta: Option<&pb::OpMetadata>) -> String {
    if let Some(n) = meta.and_then(|m| m.description.get("llb.customname")) {
        return n.clone();
    }
    match &op.op {
        Some(OpKind::Source(s)) => {
            let mut name = s.identifier.clone();
            if s.identifier.starts_with("local://") {
                if let Some(p) = s.attrs.get("local.includepattern") {
                    if let Ok(v) = serde_json::from_str::<Vec<String>>(p) {
                        if v.len() == 1 {
                            name = format!("{name} ({})", v[0]);
                        }
                    }
                }
            }
            name
        }
        Some(OpKind::Exec(e)) => e
            .meta
            .as_ref()
            .map(|m| m.args.join(" "))
            .unwrap_or_default(),
        Some(OpKind::File(f)) => f
            .actions
            .iter()
            .map(|a| match &a.action {
                Some(Action::Mkdir(m)) => format!("mkdir {}", m.path),
                Some(Action::Mkfile(m)) => format!("mkfile {}", m.path),
                Some(Action::Rm(m)) => format!("rm {}", m.path),
                Some(Action::Copy(c)) => format!("copy {} {}", c.src, c.dest),
                Some(Action::Symlink(s)) => format!("symlink {} -> {}", s.newpath, s.oldpath),
                None => "unknown".into(),
            })
            .collect::<Vec<_>>()
            .join(", "),
        Some(OpKind::Build(_)) => "build".into(),
        Some(OpKind::Merge(_)) => "merge".into(),
        Some(OpKind::Diff(_)) => "diff".into(),
        Some(OpKind::Passthrough(_)) => "passthrough".into(),
        None => String::new(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn enc(op: &pb::Op) -> bytes::Bytes {
        op.encode_to_vec().into()
    }

    pub(crate) fn local_src(name: &str) -> pb::Op {
        pb::Op {
            op: Some(OpKind::Source(pb::SourceOp {
                identifier: format!("local://{name}"),
                attrs: Default::default(),
            })),
            ..Default::default()
        }
    }

    pub(crate) fn terminal(d: &str, index: i64) -> pb::Op {
        pb::Op {
            inputs: vec![pb::Input {
                digest: d.into(),
                index,
            }],
            ..Default::default()
        }
    }

    fn def(ops: &[pb::Op]) -> pb::Definition {
        pb::Definition {
            def: ops.iter().map(enc).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn valid_and_invalid_definitions() {
        let src = local_src("context");
        let sd = digest_of(&enc(&src));
        let ok = load(&def(&[src.clone(), terminal(&sd, 0)]))
            .unwrap()
            .unwrap();
        assert_eq!(ok.result, (sd.clone(), 0));
        assert_eq!(ok.ops[&sd].name, "local://context");
        assert!(load(&pb::Definition::default()).unwrap().is_none());

        let mkdir = pb::Op {
            inputs: vec![pb::Input {
                digest: sd.clone(),
                index: 0,
            }],
            op: Some(OpKind::File(pb::FileOp {
                actions: vec![pb::FileAction {
                    input: 0,
                    secondary_input: -1,
                    output: 0,
                    action: Some(Action::Mkdir(pb::FileActionMkDir {
                        path: "/a".into(),
                        mode: 0o755,
                        ..Default::default()
                    })),
                }],
            })),
            ..Default::default()
        };
        let md = digest_of(&enc(&mkdir));
        let l = load(&def(&[src.clone(), mkdir.clone(), terminal(&md, 0)]))
            .unwrap()
            .unwrap();
        assert_eq!(l.order, vec![sd.clone(), md.clone()]);
        assert_eq!(l.ops[&md].name, "mkdir /a");

        let mut bad_action = mkdir.clone();
        if let Some(OpKind::File(f)) = &mut bad_action.op {
            f.actions[0].input = 5;
        }
        let bd = digest_of(&enc(&bad_action));
        let mut caps_meta = pb::OpMetadata::default();
        caps_meta.caps.insert("source.ocilayout".into(), true);
        let mut with_caps = def(&[src.clone(), terminal(&sd, 0)]);
        with_caps.metadata.insert(sd.clone(), caps_meta);
        let cases: Vec<(&str, pb::Definition)> = vec![
            ("one op", def(std::slice::from_ref(&src))),
            (
                "garbage",
                pb::Definition {
                    def: vec![bytes::Bytes::from_static(b"\xff\xff\xff\xff")],
                    ..Default::default()
                },
            ),
            (
                "garbage two",
                pb::Definition {
                    def: vec![
                        bytes::Bytes::from_static(b"\xff\xff\xff"),
                        enc(&terminal(&sd, 0)),
                    ],
                    ..Default::default()
                },
            ),
            ("terminal has op", def(&[src.clone(), src.clone()])),
            (
                "missing input",
                def(&[src.clone(), terminal("sha256:nope", 0)]),
            ),
            ("index out of range", def(&[src.clone(), terminal(&sd, 1)])),
            ("negative index", def(&[src.clone(), terminal(&sd, -1)])),
            (
                "action index",
                def(&[src.clone(), bad_action, terminal(&bd, 0)]),
            ),
            ("unsupported cap", with_caps),
            (
                "no op",
                def(&[
                    pb::Op::default(),
                    terminal(&digest_of(&enc(&pb::Op::default())), 0),
                ]),
            ),
        ];
        for (name, d) in cases {
            let err = load(&d).expect_err(name);
            let st: tonic::Status = err.into();
            assert_eq!(st.code(), tonic::Code::InvalidArgument, "{name}: {st:?}");
        }
    }
}
