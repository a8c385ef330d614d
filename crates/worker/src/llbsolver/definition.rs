//! Loading and validating a `pb.Definition` (`llb.md` §1–§9).
//!
//! Parsing is separate from I/O: [`load`] only decodes, checks and names; nothing is executed.
//! Every problem is an `InvalidArgument` error naming the op (its digest, or `def[i]`).
//!
//! Rules (following buildkitd's loader and `ops.Validate`, see `solver/llbsolver/vertex.go`):
//! * op digest = `sha256:` + hex(sha256(exact bytes)); identical entries collapse;
//! * the last entry is the terminal op: no op payload, `inputs[0]` names the result;
//! * only ops reachable from the terminal's input are loaded; every input digest must be present
//!   and its output index in range; the graph must be acyclic;
//! * every cap in op metadata must be one the worker supports;
//! * per-op structural checks (exec mounts, file action indices, merge/diff inputs...),
//!   the OS of exec ops, and exec entitlements.

use std::collections::{BTreeMap, HashMap};

use prost::Message;
use protos::pb;
use protos::pb::op::Op as OpPayload;

use crate::error::{Error, Result};
use crate::worker::{Platform, ENTITLEMENT_NETWORK_HOST, ENTITLEMENT_SECURITY_INSECURE};

/// A validated op of the build graph.
#[derive(Debug, Clone)]
pub(crate) struct LoadedOp {
    /// `sha256:<hex>` of the op bytes.
    pub digest: String,
    /// The decoded op (payload guaranteed present).
    pub op: pb::Op,
    /// Its metadata (default when absent).
    pub meta: pb::OpMetadata,
    /// Display name.
    pub name: String,
    /// `(index in LoadedDef::ops, output index)` per `op.inputs` entry.
    pub inputs: Vec<(usize, usize)>,
}

impl LoadedOp {
    /// The op payload (validated to be present).
    pub(crate) fn payload(&self) -> &OpPayload {
        self.op.op.as_ref().expect("validated op has a payload")
    }
}

/// A validated definition.
#[derive(Debug, Clone, Default)]
pub(crate) struct LoadedDef {
    /// Reachable ops, inputs before users.
    pub ops: Vec<LoadedOp>,
    /// `(op index, output index)` of the result; `None` for an empty definition.
    pub target: Option<(usize, usize)>,
}

/// What validation needs from the worker and the request.
#[derive(Debug, Clone)]
pub(crate) struct ValidateOpts<'a> {
    pub platform: &'a Platform,
    pub allowed_entitlements: &'a [String],
    pub requested_entitlements: &'a [String],
}

fn invalid(op: &str, reason: impl Into<String>) -> Error {
    Error::invalid_op(op, reason)
}

/// Decodes and validates `def`.
pub(crate) fn load(def: &pb::Definition, opts: &ValidateOpts<'_>) -> Result<LoadedDef> {
    if def.def.is_empty() {
        return Ok(LoadedDef::default());
    }
    if def.def.len() < 2 {
        return Err(Error::InvalidRequest {
            reason: "definition has a single op: expected at least one op and the terminal op"
                .into(),
        });
    }
    // Decode everything; identical bytes collapse to one op.
    let mut by_digest: HashMap<String, pb::Op> = HashMap::new();
    let mut last = String::new();
    for (i, bytes) in def.def.iter().enumerate() {
        let digest = crate::digest::sha256_digest(bytes);
        let op = pb::Op::decode(bytes.as_ref()).map_err(|e| {
            invalid(
                &format!("def[{i}] ({digest})"),
                format!("cannot decode op: {e}"),
            )
        })?;
        by_digest.insert(digest.clone(), op);
        last = digest;
    }
    for key in def.metadata.keys() {
        if !by_digest.contains_key(key) {
            tracing::debug!(digest = %key, "metadata for an op that is not in the definition");
        }
    }
    let terminal = &by_digest[&last];
    if terminal.op.is_some() {
        return Err(invalid(
            &last,
            "the last op must be the terminal op (no payload)",
        ));
    }
    let Some(result_input) = terminal.inputs.first() else {
        return Err(invalid(&last, "terminal op has no input"));
    };
    check_caps(&last, def.metadata.get(&last))?;

    // Collect reachable ops depth-first from the terminal input, detecting cycles.
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut ops: Vec<LoadedOp> = Vec::new();
    #[derive(PartialEq)]
    enum Mark {
        Active,
        Done,
    }
    let mut marks: HashMap<String, Mark> = HashMap::new();
    // Stack of (digest, next input position).
    let root = result_input.digest.clone();
    if !by_digest.contains_key(&root) {
        return Err(invalid(
            &last,
            format!("input {root} is not in the definition"),
        ));
    }
    let mut stack: Vec<(String, usize)> = vec![(root.clone(), 0)];
    marks.insert(root.clone(), Mark::Active);
    while let Some((dgst, pos)) = stack.last_mut() {
        let op = &by_digest[dgst.as_str()];
        if *pos < op.inputs.len() {
            let inp = &op.inputs[*pos];
            *pos += 1;
            if !by_digest.contains_key(&inp.digest) {
                return Err(invalid(
                    dgst,
                    format!("input {} is not in the definition", inp.digest),
                ));
            }
            match marks.get(&inp.digest) {
                Some(Mark::Done) => {}
                Some(Mark::Active) => {
                    return Err(invalid(dgst, format!("cycle through input {}", inp.digest)))
                }
                None => {
                    marks.insert(inp.digest.clone(), Mark::Active);
                    stack.push((inp.digest.clone(), 0));
                }
            }
        } else {
            let dgst = dgst.clone();
            stack.pop();
            marks.insert(dgst.clone(), Mark::Done);
            let op = by_digest[&dgst].clone();
            let meta = def.metadata.get(&dgst).cloned().unwrap_or_default();
            let loaded = validate_op(&dgst, op, meta, &index, &ops, opts)?;
            index.insert(dgst, ops.len());
            ops.push(loaded);
        }
    }
    let target_op = index[&root];
    let target_out = output_index(&last, result_input.index, num_outputs(&ops[target_op].op))?;
    Ok(LoadedDef {
        ops,
        target: Some((target_op, target_out)),
    })
}

fn output_index(op: &str, index: i64, outputs: usize) -> Result<usize> {
    if index < 0 || index as usize >= outputs {
        return Err(invalid(
            op,
            format!("output index {index} out of range (the input op has {outputs} outputs)"),
        ));
    }
    Ok(index as usize)
}

/// Number of outputs of a (payload-checked) op.
pub(crate) fn num_outputs(op: &pb::Op) -> usize {
    match &op.op {
        // One result per bind mount with an output, in mount order (buildkitd `PrepareMounts`).
        Some(OpPayload::Exec(e)) => e
            .mounts
            .iter()
            .filter(|m| m.output >= 0 && m.mount_type == pb::MountType::Bind as i32)
            .count(),
        Some(OpPayload::File(f)) => f.actions.iter().filter(|a| a.output >= 0).count(),
        Some(_) => 1,
        None => 0,
    }
}

fn check_caps(dgst: &str, meta: Option<&pb::OpMetadata>) -> Result<()> {
    if let Some(meta) = meta {
        for cap in meta.caps.keys() {
            if !super::caps::is_supported(cap) {
                return Err(invalid(
                    dgst,
                    format!("requested feature {cap:?} is not supported by berth"),
                ));
            }
        }
    }
    Ok(())
}

fn validate_op(
    dgst: &str,
    op: pb::Op,
    meta: pb::OpMetadata,
    index: &HashMap<String, usize>,
    loaded: &[LoadedOp],
    opts: &ValidateOpts<'_>,
) -> Result<LoadedOp> {
    check_caps(dgst, Some(&meta))?;
    let mut inputs = Vec::with_capacity(op.inputs.len());
    for inp in &op.inputs {
        let i = index[&inp.digest];
        let out = output_index(dgst, inp.index, num_outputs(&loaded[i].op)).map_err(|_| {
            invalid(
                dgst,
                format!(
                    "input {} output index {} out of range ({} outputs)",
                    inp.digest,
                    inp.index,
                    num_outputs(&loaded[i].op)
                ),
            )
        })?;
        inputs.push((i, out));
    }
    // Only processes need the worker's platform: source, file, merge and diff ops of any
    // platform run here (buildkitd builds `FROM scratch` stages for darwin or windows alike).
    let n_in = op.inputs.len() as i64;
    let payload = op
        .op
        .as_ref()
        .ok_or_else(|| invalid(dgst, "unknown or missing op type"))?;
    match payload {
        OpPayload::Source(s) => validate_source(dgst, s)?,
        OpPayload::Exec(e) => validate_exec(dgst, &op, e, n_in, opts)?,
        OpPayload::File(f) => validate_file(dgst, f, n_in)?,
        OpPayload::Merge(m) => {
            if m.inputs.is_empty() {
                return Err(invalid(dgst, "merge op has no inputs"));
            }
            for mi in &m.inputs {
                if mi.input < 0 || mi.input >= n_in {
                    return Err(invalid(
                        dgst,
                        format!("merge input index {} out of range", mi.input),
                    ));
                }
            }
        }
        OpPayload::Diff(d) => {
            let (Some(lower), Some(upper)) = (&d.lower, &d.upper) else {
                return Err(invalid(dgst, "diff op needs both lower and upper"));
            };
            for (what, i) in [("lower", lower.input), ("upper", upper.input)] {
                if i < -1 || i >= n_in {
                    return Err(invalid(dgst, format!("diff {what} index {i} out of range")));
                }
            }
        }
        OpPayload::Build(_) => {
            return Err(Error::NotImplemented {
                what: format!("BuildOp (op {dgst})"),
            })
        }
        OpPayload::Passthrough(_) => {
            return Err(Error::NotImplemented {
                what: format!("PassthroughOp (op {dgst})"),
            })
        }
    }
    let name = vertex_name(&op, &meta, &inputs, loaded);
    Ok(LoadedOp {
        digest: dgst.to_string(),
        op,
        meta,
        name,
        inputs,
    })
}

const KNOWN_SCHEMES: &[&str] = &[
    "docker-image",
    "local",
    "git",
    "http",
    "https",
    "oci-layout",
];

fn validate_source(dgst: &str, s: &pb::SourceOp) -> Result<()> {
    let Some((scheme, rest)) = s.identifier.split_once("://") else {
        return Err(invalid(
            dgst,
            format!("invalid source identifier {:?}", s.identifier),
        ));
    };
    if !KNOWN_SCHEMES.contains(&scheme) {
        return Err(invalid(dgst, format!("unknown source type {scheme:?}")));
    }
    if rest.is_empty() {
        return Err(invalid(
            dgst,
            format!("empty source identifier {:?}", s.identifier),
        ));
    }
    if scheme == "local" {
        for key in [
            "local.includepattern",
            "local.excludepatterns",
            "local.followpaths",
        ] {
            if let Some(v) = s.attrs.get(key) {
                serde_json::from_str::<Vec<String>>(v).map_err(|e| {
                    invalid(
                        dgst,
                        format!("attr {key} is not a JSON array of strings: {e}"),
                    )
                })?;
            }
        }
    }
    Ok(())
}

fn validate_exec(
    dgst: &str,
    op: &pb::Op,
    e: &pb::ExecOp,
    n_in: i64,
    opts: &ValidateOpts<'_>,
) -> Result<()> {
    let Some(meta) = &e.meta else {
        return Err(invalid(dgst, "exec op has no meta"));
    };
    if meta.args.is_empty() {
        return Err(invalid(dgst, "exec op has no args"));
    }
    if e.mounts.is_empty() {
        return Err(invalid(dgst, "exec op has no mounts"));
    }
    if !e.mounts.iter().any(|m| m.dest == "/") {
        return Err(invalid(dgst, "exec op has no root mount"));
    }
    for m in &e.mounts {
        // The Go client leaves `input` (and `output`) at 0 on secret/ssh/tmpfs mounts, where
        // they mean nothing: only bind and cache mounts read an input.
        let reads_input = m.mount_type == pb::MountType::Bind as i32
            || m.mount_type == pb::MountType::Cache as i32;
        if reads_input && (m.input < -1 || m.input >= n_in) {
            return Err(invalid(
                dgst,
                format!("mount {} input index {} out of range", m.dest, m.input),
            ));
        }
    }
    // A process of another architecture runs as it is, as buildkitd runs it without an
    // emulator (its binaries may be the worker's: a stage built on $BUILDPLATFORM used by a
    // target-platform RUN); one of another OS cannot run in a Linux container at all.
    if let Some(p) = &op.platform {
        if !p.os.is_empty() && p.os != opts.platform.os {
            return Err(invalid(
                dgst,
                format!(
                    "cannot run {}/{} processes on a {} worker",
                    p.os, p.architecture, opts.platform
                ),
            ));
        }
    }
    let need = |ent: &str| -> Result<()> {
        let asked = opts.requested_entitlements.iter().any(|x| x == ent);
        let allowed = opts.allowed_entitlements.iter().any(|x| x == ent);
        if asked && allowed {
            Ok(())
        } else {
            Err(Error::EntitlementDenied {
                entitlement: ent.to_string(),
            })
        }
    };
    if e.network == pb::NetMode::Host as i32 {
        need(ENTITLEMENT_NETWORK_HOST)?;
    }
    if e.security == pb::SecurityMode::Insecure as i32 {
        need(ENTITLEMENT_SECURITY_INSECURE)?;
    }
    Ok(())
}

fn check_contiguous(dgst: &str, what: &str, mut outputs: Vec<i64>) -> Result<()> {
    outputs.sort_unstable();
    for (i, o) in outputs.iter().enumerate() {
        if *o != i as i64 {
            return Err(invalid(
                dgst,
                format!(
                    "{what} output indices must be unique and contiguous from 0, got {outputs:?}"
                ),
            ));
        }
    }
    Ok(())
}

fn validate_file(dgst: &str, f: &pb::FileOp, n_in: i64) -> Result<()> {
    use pb::file_action::Action;
    if f.actions.is_empty() {
        return Err(invalid(dgst, "file op has no actions"));
    }
    let mut outputs = vec![];
    for (k, a) in f.actions.iter().enumerate() {
        // An action may refer to the op's inputs and to the results of earlier actions.
        let limit = n_in + k as i64;
        let check = |what: &str, i: i64| -> Result<()> {
            if i < -1 || i >= limit {
                return Err(invalid(
                    dgst,
                    format!(
                        "action {k}: {what} index {i} out of range (must be -1..{})",
                        limit - 1
                    ),
                ));
            }
            Ok(())
        };
        check("input", a.input)?;
        let action = a
            .action
            .as_ref()
            .ok_or_else(|| invalid(dgst, format!("action {k}: unknown or missing action type")))?;
        let owner = |o: &Option<pb::ChownOpt>| -> Result<()> {
            if let Some(o) = o {
                for u in [&o.user, &o.group].into_iter().flatten() {
                    if let Some(pb::user_opt::User::ByName(n)) = &u.user {
                        check("owner input", n.input)?;
                    }
                }
            }
            Ok(())
        };
        let path_nonempty = |p: &str| -> Result<()> {
            if p.is_empty() {
                return Err(invalid(dgst, format!("action {k}: empty path")));
            }
            Ok(())
        };
        match action {
            Action::Copy(c) => {
                check("secondary input", a.secondary_input)?;
                path_nonempty(&c.src)?;
                path_nonempty(&c.dest)?;
                owner(&c.owner)?;
            }
            Action::Mkfile(m) => {
                path_nonempty(&m.path)?;
                owner(&m.owner)?;
            }
            Action::Mkdir(m) => {
                path_nonempty(&m.path)?;
                owner(&m.owner)?;
            }
            Action::Rm(r) => path_nonempty(&r.path)?,
            Action::Symlink(s) => {
                path_nonempty(&s.newpath)?;
                owner(&s.owner)?;
            }
        }
        if a.output >= 0 {
            outputs.push(a.output);
        } else if a.output < -1 {
            return Err(invalid(
                dgst,
                format!("action {k}: output index {} invalid", a.output),
            ));
        }
    }
    check_contiguous(dgst, "action", outputs)
}

/// Display name of a vertex (`llb.md` §9).
fn vertex_name(
    op: &pb::Op,
    meta: &pb::OpMetadata,
    inputs: &[(usize, usize)],
    loaded: &[LoadedOp],
) -> String {
    if let Some(n) = meta.description.get("llb.customname") {
        return n.clone();
    }
    let input_name = |i: i64| -> String {
        if i < 0 {
            return "scratch".into();
        }
        inputs
            .get(i as usize)
            .map(|(vi, _)| loaded[*vi].name.clone())
            .unwrap_or_else(|| "scratch".into())
    };
    match op.op.as_ref() {
        Some(OpPayload::Source(s)) => {
            let mut name = s.identifier.clone();
            if s.identifier.starts_with("local://") {
                if let Some(p) = s.attrs.get("local.includepattern") {
                    if let Ok(pats) = serde_json::from_str::<Vec<String>>(p) {
                        if pats.len() == 1 {
                            name = format!("{name} ({})", pats[0]);
                        }
                    }
                }
            }
            name
        }
        Some(OpPayload::Exec(e)) => e
            .meta
            .as_ref()
            .map(|m| m.args.join(" "))
            .unwrap_or_default(),
        Some(OpPayload::File(f)) => f
            .actions
            .iter()
            .map(|a| {
                use pb::file_action::Action;
                match &a.action {
                    Some(Action::Mkdir(m)) => format!("mkdir {}", m.path),
                    Some(Action::Mkfile(m)) => format!("mkfile {}", m.path),
                    Some(Action::Rm(r)) => format!("rm {}", r.path),
                    Some(Action::Copy(c)) => format!("copy {} {}", c.src, c.dest),
                    Some(Action::Symlink(s)) => format!("symlink {} -> {}", s.newpath, s.oldpath),
                    None => "unknown".into(),
                }
            })
            .collect::<Vec<_>>()
            .join(", "),
        Some(OpPayload::Build(_)) => "build".into(),
        Some(OpPayload::Merge(m)) => format!(
            "merge ({})",
            m.inputs
                .iter()
                .map(|mi| input_name(mi.input))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Some(OpPayload::Diff(d)) => format!(
            "diff ({}) -> ({})",
            input_name(d.lower.as_ref().map(|l| l.input).unwrap_or(-1)),
            input_name(d.upper.as_ref().map(|u| u.input).unwrap_or(-1))
        ),
        Some(OpPayload::Passthrough(_)) => "passthrough".into(),
        None => "unknown".into(),
    }
}

/// Source attrs helper: a JSON array attr, empty when absent.
pub(crate) fn json_list_attr(attrs: &BTreeMap<String, String>, key: &str) -> Vec<String> {
    attrs
        .get(key)
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
