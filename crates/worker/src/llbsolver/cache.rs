//! The solver's cache store over layerstore's snapshot DB: cache key → committed snapshot, one
//! mapping per output (`solver::output_key(key, i)`), recorded with
//! [`SnapshotStore::set_cache_key`]. Loading leases the snapshots; a mapping whose snapshot was
//! pruned, or whose chain uses Docker layers that are gone, is a miss.

use async_trait::async_trait;
use layerstore::snapshot::SnapshotStore;

use crate::error::{Error, Result};
use crate::result::Snap;
use crate::solver::{output_key, CacheStore};

/// [`CacheStore`] backed by the snapshot store's metadata DB.
pub(crate) struct SnapshotCache {
    pub(crate) store: SnapshotStore,
}

#[async_trait]
impl CacheStore<Snap> for SnapshotCache {
    async fn load(&self, key: &str, needed: &[bool]) -> Result<Option<Vec<Option<Snap>>>> {
        let store = self.store.clone();
        let key = key.to_string();
        let needed = needed.to_vec();
        blocking(move || {
            let mut out = Vec::with_capacity(needed.len());
            for (i, &need) in needed.iter().enumerate() {
                let k = output_key(&key, i);
                let Some(id) = store.cache_key(&k).map_err(Error::store("cache lookup"))? else {
                    if need {
                        return Ok(None);
                    }
                    out.push(None);
                    continue;
                };
                match Snap::acquire(&store, id) {
                    Ok(s) if docker_layers_present(s.chain()) => out.push(Some(s)),
                    Ok(_) if !need => out.push(None),
                    Err(_) if !need => out.push(None),
                    Ok(_) => {
                        tracing::debug!(key = %k, "cached snapshot uses Docker layers that are gone; cache miss");
                        return Ok(None);
                    }
                    Err(e) => {
                        tracing::debug!(key = %k, error = %e, "cached snapshot unusable; cache miss");
                        return Ok(None);
                    }
                }
            }
            Ok(Some(out))
        })
        .await
    }

    async fn save(&self, key: &str, results: &[Option<Snap>]) -> Result<()> {
        let store = self.store.clone();
        let key = key.to_string();
        let ids: Vec<_> = results
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().map(|r| (i, r.id().clone())))
            .collect();
        blocking(move || {
            for (i, id) in &ids {
                let i = *i;
                store
                    .set_cache_key(&output_key(&key, i), id)
                    .map_err(Error::store("record cache key"))?;
            }
            Ok(())
        })
        .await
    }
}

/// Whether every Docker layer of `chain` still exists where the chain says (Docker removes a
/// layer's directory with the last image using it; a re-pull puts it elsewhere).
fn docker_layers_present(chain: &layerstore::snapshot::Chain) -> bool {
    chain.0.iter().all(|l| match l {
        layerstore::snapshot::LayerRef::Docker(d) => d.diff_dir.is_dir(),
        layerstore::snapshot::LayerRef::Berth(_) => true,
    })
}

/// Runs blocking store work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("blocking task failed: {e}")))?
}
