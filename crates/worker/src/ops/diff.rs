//! DiffOp: the changes from `lower` to `upper` (`solver/llbsolver/ops/diff.go`).
//!
//! Through [`SnapshotStore::diff`](layerstore::snapshot::SnapshotStore::diff): when `lower`'s
//! chain is a prefix of `upper`'s (an ancestor), the result is the layers between them (no
//! copy, the layers and their exported blobs are reused); otherwise both sides are mounted
//! read-only, compared, and the difference becomes one new layer (deletions as whiteouts).
//! Special cases as in buildkitd: both scratch → scratch; lower scratch → upper itself; the same
//! snapshot on both sides → scratch; upper scratch → a layer deleting lower's contents.
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
    let OpPayload::Diff(d) = op.payload() else {
        return Err(Error::Internal("diff::new called with another op".into()));
    };
    let (Some(lower), Some(upper)) = (&d.lower, &d.upper) else {
        return Err(Error::invalid_op(
            &op.digest,
            "diff op needs both lower and upper",
        ));
    };
    Ok(Arc::new(DiffOp {
        op: op.op.clone(),
        lower: lower.input,
        upper: upper.input,
        name: op.name.clone(),
        env: env.clone(),
    }))
}

struct DiffOp {
    op: pb::Op,
    /// Op input index of the lower side, `-1` for scratch.
    lower: i64,
    /// Op input index of the upper side, `-1` for scratch.
    upper: i64,
    name: String,
    env: Arc<BuildEnv>,
}

fn side(inputs: &[Solved<Snap>], i: i64) -> Result<Option<Snap>> {
    if i < 0 {
        return Ok(None);
    }
    let s = inputs
        .get(i as usize)
        .ok_or_else(|| Error::Internal(format!("diff input {i} missing")))?;
    // An empty chain is scratch whatever its snapshot.
    Ok((!s.result.chain().is_empty()).then(|| s.result.clone()))
}

#[async_trait]
impl Op<Snap> for DiffOp {
    async fn cache_key(&self, _ctx: &OpContext, inputs: &[Solved<Snap>]) -> Result<String> {
        Ok(crate::ops::standard_key("diff", &self.op, inputs))
    }

    fn key_from_input_keys(&self, input_keys: &[&str]) -> Option<String> {
        Some(crate::ops::standard_key_from("diff", &self.op, input_keys))
    }

    async fn exec(&self, _ctx: &OpContext, inputs: &[Solved<Snap>]) -> Result<Vec<Snap>> {
        let lower = side(inputs, self.lower)?;
        let upper = side(inputs, self.upper)?;
        if let (None, Some(u)) = (&lower, &upper) {
            return Ok(vec![u.clone()]);
        }
        let store = self.env.store.clone();
        let desc = self.name.clone();
        let snap = blocking(move || {
            let opts = SnapshotOptions::new(desc);
            let same = matches!((&lower, &upper), (Some(l), Some(u)) if l.chain() == u.chain());
            let id = if same || (lower.is_none() && upper.is_none()) {
                store.create_from_chain(Chain::default(), &[], &opts)
            } else {
                store.diff(
                    lower.as_ref().map(|s| s.id()),
                    upper.as_ref().map(|s| s.id()),
                    &opts,
                )
            }
            .map_err(crate::ops::exec::store_err("diff"))?;
            Snap::acquire(&store, id)
        })
        .await?;
        Ok(vec![snap])
    }
}
