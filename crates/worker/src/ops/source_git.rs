//! `git://` sources (placeholder until the git CLI wrapper lands).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::llbsolver::definition::LoadedOp;
use crate::ops::BuildEnv;
use crate::result::Snap;
use crate::solver::Op;

/// The solver op for `op`.
pub(crate) fn new(op: &LoadedOp, env: &Arc<BuildEnv>) -> Result<Arc<dyn Op<Snap>>> {
    let _ = (op, env);
    Err(Error::not_implemented("git sources"))
}
