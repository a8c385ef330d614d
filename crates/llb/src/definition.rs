//! A graph read back from a `pb.Definition` (Go `llb.NewDefinitionOp`): frontend inputs and
//! other solved definitions become states that new ops can build on.

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message as _;
use sha2::{Digest as _, Sha256};

use crate::{pb, scratch, Error, Meta, Node, Output, Platform, Result, State};

fn invalid(reason: impl Into<String>) -> Error {
    Error::Invalid {
        what: "definition",
        reason: reason.into(),
    }
}

struct Reader<'a> {
    ops: HashMap<String, pb::Op>,
    metadata: &'a std::collections::BTreeMap<String, pb::OpMetadata>,
    nodes: HashMap<String, Arc<Node>>,
}

impl Reader<'_> {
    fn node(&mut self, dgst: &str, depth: usize) -> Result<Arc<Node>> {
        if let Some(n) = self.nodes.get(dgst) {
            return Ok(n.clone());
        }
        if depth > 10_000 {
            return Err(invalid("graph too deep"));
        }
        let mut op = self
            .ops
            .get(dgst)
            .cloned()
            .ok_or_else(|| invalid(format!("missing op {dgst}")))?;
        let mut inputs = Vec::with_capacity(op.inputs.len());
        for i in std::mem::take(&mut op.inputs) {
            inputs.push(Output {
                node: self.node(&i.digest, depth + 1)?,
                index: i.index,
            });
        }
        let md = self.metadata.get(dgst).cloned().unwrap_or_default();
        let meta = Meta {
            ignore_cache: md.ignore_cache,
            locations: vec![],
            description: md.description.into_iter().collect(),
            caps: md
                .caps
                .into_iter()
                .filter(|(_, on)| *on)
                .map(|(c, _)| c)
                .collect(),
            progress_group: md.progress_group,
        };
        let n = Arc::new(Node { op, inputs, meta });
        self.nodes.insert(dgst.to_string(), n.clone());
        Ok(n)
    }
}

impl State {
    /// The state a marshalled definition ends in. Ops keep their bytes' meaning (and so their
    /// digests) and their metadata; source locations are not carried over. A definition with
    /// no ops (what a client sends for a nil one) is an error, as in Go.
    pub fn from_definition(def: &pb::Definition) -> Result<State> {
        if def.def.is_empty() {
            return Err(invalid("invalid nil input definition to definition op"));
        }
        let mut ops = HashMap::new();
        let mut last = String::new();
        for b in &def.def {
            let op = pb::Op::decode(b.as_ref())
                .map_err(|e| invalid(format!("failed to parse llb proto op: {e}")))?;
            last = format!("sha256:{}", hex::encode(Sha256::digest(b)));
            ops.insert(last.clone(), op);
        }
        let terminal = ops.get(&last).cloned().expect("just inserted");
        let Some(head) = terminal.inputs.first() else {
            return Ok(scratch());
        };
        let mut r = Reader {
            ops,
            metadata: &def.metadata,
            nodes: HashMap::new(),
        };
        let node = r.node(&head.digest, 0)?;
        let platform = node
            .op
            .platform
            .as_ref()
            .map(|p| Platform {
                os: p.os.clone(),
                architecture: p.architecture.clone(),
                variant: p.variant.clone(),
            })
            .unwrap_or_else(Platform::host);
        Ok(State::from_output(
            Output {
                node,
                index: head.index,
            },
            platform,
        ))
    }
}
