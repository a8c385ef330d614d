//! MergeOp: stacks input layer chains (`solver/llbsolver/ops/merge.go`).
//!
//! Lazy, as in buildkitd: the result is a committed snapshot whose chain is the inputs' chains
//! concatenated in order ([`SnapshotStore::merge`](layerstore::snapshot::SnapshotStore::merge)).
//! Nothing is copied or mounted; deletions inside an input's layers apply to the inputs below
//! because the layers keep their overlay whiteouts. Empty inputs (scratch) vanish; a merge of
//! nothing is scratch; a merge of a single non-empty input is that input itself.
//!
//! Cache key: the op without input digests plus the inputs' keys (`ops::standard_key`).

use std::sync::Arc;

use async_trait::async_trait;
use layerstore::snapshot::{Chain, SnapshotOptions};
use protos::pb;
use protos::pb::op::Op as OpPayload;

use crate::error::{Error, Result};
use crate::llbsolver::cache::blocking;
use crate::llbsolver::definition::LoadedOp;
use crate::ops::BuildEnv;
use crate::result::Snap;
use crate::solver::{Op, OpContext, Solved};

/// The solver op for `op`.
pub(crate) fn new(op: &LoadedOp, env: &Arc<BuildEnv>) -> Result<Arc<dyn Op<Snap>>> {
    let OpPayload::Merge(m) = op.payload() else {
        return Err(Error::Internal("merge::new called with another op".into()));
    };
    Ok(Arc::new(MergeOp {
        op: op.op.clone(),
        indices: m.inputs.iter().map(|i| i.input).collect(),
        name: op.name.clone(),
        env: env.clone(),
    }))
}

struct MergeOp {
    op: pb::Op,
    /// Index into the op inputs of each merge input, bottom first.
    indices: Vec<i64>,
    name: String,
    env: Arc<BuildEnv>,
}

#[async_trait]
impl Op<Snap> for MergeOp {
    async fn cache_key(&self, _ctx: &OpContext, inputs: &[Solved<Snap>]) -> Result<String> {
        Ok(crate::ops::standard_key("merge", &self.op, inputs))
    }

    fn key_from_input_keys(&self, input_keys: &[&str]) -> Option<String> {
        Some(crate::ops::standard_key_from("merge", &self.op, input_keys))
    }

    async fn exec(&self, _ctx: &OpContext, inputs: &[Solved<Snap>]) -> Result<Vec<Snap>> {
        let mut parts = Vec::with_capacity(self.indices.len());
        for &i in &self.indices {
            let s = usize::try_from(i)
                .ok()
                .and_then(|i| inputs.get(i))
                .ok_or_else(|| Error::Internal(format!("merge input {i} missing")))?;
            if !s.result.chain().is_empty() {
                parts.push(s.result.clone());
            }
        }
        if parts.len() == 1 {
            return Ok(parts);
        }
        let store = self.env.store.clone();
        let desc = self.name.clone();
        let snap = blocking(move || {
            let opts = SnapshotOptions::new(desc);
            let id = if parts.is_empty() {
                store.create_from_chain(Chain::default(), &[], &opts)
            } else {
                let ids: Vec<_> = parts.iter().map(|p| p.id().clone()).collect();
                store.merge(&ids, &opts)
            }
            .map_err(crate::ops::exec::store_err("merge"))?;
            Snap::acquire(&store, id)
        })
        .await?;
        Ok(vec![snap])
    }
}
