//! Mounts for gateway containers, prepared exactly as an `ExecOp`'s are (BuildKit's
//! `frontend/gateway/container.go` calls the same `PrepareMounts` as `ops/exec.go`).
//!
//! A [`ContainerMounts`] holds everything the container's processes need for as long as the
//! container lives: the root's mutable snapshot mounted on the host, bind mounts of results,
//! cache directories (with their `LOCKED`/`PRIVATE` claims), secret data and SSH agent
//! sockets. Nothing is ever committed: [`ContainerMounts::release`] (or dropping it) unmounts
//! everything and removes the mutable snapshots.

use std::path::Path;
use std::sync::Arc;

use protos::pb;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::ops::exec::{prepare_mounts, PreparedMounts};
use crate::ops::BuildEnv;
use crate::result::{Snap, SolvedRef};
use crate::session::SessionProvider;
use crate::worker::Worker;

/// The prepared mounts of one gateway container; released on [`ContainerMounts::release`] or
/// drop.
pub struct ContainerMounts {
    prepared: Option<PreparedMounts>,
}

impl std::fmt::Debug for ContainerMounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerMounts")
            .field("rootfs", &self.rootfs())
            .finish_non_exhaustive()
    }
}

impl ContainerMounts {
    fn get(&self) -> &PreparedMounts {
        self.prepared.as_ref().expect("released only by value")
    }

    /// The host directory of the container's root filesystem (writable on the host; see
    /// [`ContainerMounts::readonly_rootfs`]).
    pub fn rootfs(&self) -> &Path {
        &self.get().rootfs
    }

    /// Whether the root mount asked to be read-only inside the container.
    pub fn readonly_rootfs(&self) -> bool {
        self.get().readonly_rootfs
    }

    /// The other mounts, as the executor takes them.
    pub fn mounts(&self) -> &[executor::Mount] {
        &self.get().mounts
    }

    /// Unmounts everything and removes the mutable snapshots (on the blocking pool).
    pub async fn release(mut self) {
        if let Some(p) = self.prepared.take() {
            let _ = tokio::task::spawn_blocking(move || p.discard()).await;
        }
    }
}

impl Drop for ContainerMounts {
    fn drop(&mut self) {
        if let Some(p) = self.prepared.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn_blocking(move || p.discard());
                }
                Err(_) => p.discard(),
            }
        }
    }
}

impl Worker {
    /// Prepares the mounts of a gateway container. `mounts[i].input` indexes `refs` (`-1`: no
    /// input, e.g. scratch, tmpfs, cache without seed); `name` names the mutable snapshots
    /// (`container <id>`). Secrets and SSH agents come from `session`. Errors as an exec's
    /// mounts fail (a root mount that is not a bind, a missing required secret...). Waits for
    /// the pins of the refs' base images first ([`SolvedRef::wait_for_pins`]).
    pub async fn prepare_container(
        &self,
        name: &str,
        mounts: &[pb::Mount],
        refs: &[SolvedRef],
        session: Arc<dyn SessionProvider>,
        cancel: &CancellationToken,
    ) -> Result<ContainerMounts> {
        let mut root = 0;
        for m in mounts {
            if m.dest == "/" {
                root += 1;
                if m.mount_type != pb::MountType::Bind as i32 {
                    return Err(Error::InvalidRequest {
                        reason: format!(
                            "invalid mount type {} for {}",
                            pb::MountType::try_from(m.mount_type)
                                .map(|t| t.as_str_name())
                                .unwrap_or("UNKNOWN"),
                            m.dest
                        ),
                    });
                }
            }
            if m.input >= refs.len() as i64 {
                return Err(Error::InvalidRequest {
                    reason: format!("missing input {}", m.input),
                });
            }
        }
        if root == 0 {
            return Err(Error::InvalidRequest {
                reason: "container has no root mount".into(),
            });
        }
        // The container reads the refs' files: their base images' pins must run first.
        for r in refs {
            r.wait_for_pins().await?;
        }
        let env = BuildEnv {
            store: self.inner.store.clone(),
            shared: self.inner.shared.clone(),
            session,
            opts: self.inner.opts.clone(),
            // The refs mounted hold their own base images' pins.
            bases: Default::default(),
            build_id: String::new(),
            pin_delay: std::time::Duration::ZERO,
            stock_keys: false,
        };
        // Scratch refs have no snapshot: their mounts become input-less.
        let mut inputs: Vec<Snap> = Vec::new();
        let mut index = Vec::with_capacity(refs.len());
        for r in refs {
            match &r.snap {
                Some(s) => {
                    index.push(inputs.len() as i64);
                    inputs.push(s.clone());
                }
                None => index.push(-1),
            }
        }
        let mounts: Vec<pb::Mount> = mounts
            .iter()
            .map(|m| {
                let mut m = m.clone();
                if m.input >= 0 {
                    m.input = index[m.input as usize];
                }
                m
            })
            .collect();
        let prepared = prepare_mounts(&env, name, &mounts, &inputs, cancel).await?;
        Ok(ContainerMounts {
            prepared: Some(prepared),
        })
    }

    /// The runc executor this worker runs build steps with (created on first use; stale
    /// containers of an earlier run are cleaned up then).
    pub async fn executor(&self) -> Result<Arc<executor::RuncExecutor>> {
        let env = BuildEnv {
            store: self.inner.store.clone(),
            shared: self.inner.shared.clone(),
            session: Arc::new(crate::session::NoSession),
            opts: self.inner.opts.clone(),
            bases: Default::default(),
            build_id: String::new(),
            pin_delay: std::time::Duration::ZERO,
            stock_keys: false,
        };
        crate::ops::exec::executor_for(&env).await
    }
}
