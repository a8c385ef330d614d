//! SSH agent sockets of `SSH` exec mounts (upstream: `session/sshforward/ssh.go`,
//! `solver/llbsolver/mounts/mount.go`).
//!
//! Before the process starts, every SSH mount's agent id is checked with the session
//! ([`SessionProvider::check_ssh_agent`]): a missing agent fails the exec unless the mount is
//! `optional`, in which case the mount is left out. For each remaining mount a listening unix
//! socket is created in a private directory (mode 0711) under `<root>/worker/ssh/`; the executor
//! sets its owner and mode (`uid`, `gid`, `mode & 0o777`) and bind-mounts it at the mount's
//! destination. Every connection a process makes to the socket opens one
//! [`SessionProvider::forward_ssh_agent`] stream and bytes are copied both ways until either
//! side closes. Dropping the [`SshSocket`] stops accepting, ends open connections and removes
//! the directory. The socket lives outside every snapshot, so it never lands in a layer (the
//! empty mount point the executor creates in the rootfs is removed after the run).
//!
//! `SSH_AUTH_SOCK` is not set here: the LLB client adds it to the op's environment, as the Go
//! client does.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::session::SessionProvider;

/// The longest socket path `sockaddr_un` holds (108 bytes with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The directory holding the private socket directories of the worker rooted at `root`.
pub(super) fn base_dir(root: &Path) -> PathBuf {
    root.join("worker").join("ssh")
}

/// Removes socket directories left by a previous process on this root (called once per root,
/// before any exec of this process runs).
pub(super) fn cleanup_stale(root: &Path) {
    let dir = base_dir(root);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "removing stale ssh socket dirs failed");
        }
    }
}

/// Checks SSH mount `id` with the session. `Ok(false)`: missing but optional (skip the mount).
pub(super) async fn check(
    session: &dyn SessionProvider,
    dest: &str,
    id: &str,
    optional: bool,
) -> Result<bool> {
    match session.check_ssh_agent(id).await {
        Ok(()) => Ok(true),
        Err(_) if optional => Ok(false),
        Err(e) => {
            let shown = if id.is_empty() { "default" } else { id };
            let message = if e.kind() == ErrorKind::Unimplemented {
                format!("SSH mount {dest}: no SSH key {shown:?} forwarded from the client")
            } else {
                format!("SSH mount {dest}: SSH key {shown:?}: {e}")
            };
            Err(Error::Op {
                message,
                kind: if e.kind() == ErrorKind::Unimplemented {
                    ErrorKind::NotFound
                } else {
                    e.kind()
                },
                source: Some(Box::new(e)),
            })
        }
    }
}

/// A listening agent socket for one mount; see the module docs.
pub(super) struct SshSocket {
    dir: PathBuf,
    path: PathBuf,
    accept: tokio::task::JoinHandle<()>,
}

impl SshSocket {
    /// Creates the socket under [`base_dir`]`(root)` and starts forwarding connections to agent
    /// `id` of `session`. Must be called inside the runtime.
    pub(super) fn listen(
        root: &Path,
        id: &str,
        session: Arc<dyn SessionProvider>,
    ) -> Result<SshSocket> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let base = base_dir(root);
        std::fs::create_dir_all(&base).map_err(|e| Error::io("create ssh socket dir", &base, e))?;
        let dir = base.join(format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let path = dir.join("ssh_auth_sock");
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(Error::Op {
                message: format!(
                    "SSH agent socket path {} is longer than {MAX_SOCKET_PATH} bytes (use a shorter worker root)",
                    path.display()
                ),
                kind: ErrorKind::FailedPrecondition,
                source: None,
            });
        }
        // Stale leftovers of an earlier process with the same pid are replaced.
        let _ = std::fs::remove_dir_all(&dir);
        {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .mode(0o711)
                .create(&dir)
                .map_err(|e| Error::io("create ssh socket dir", &dir, e))?;
        }
        let listener = match tokio::net::UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(Error::io("listen on ssh socket", &path, e));
            }
        };
        let id = if id.is_empty() { "default" } else { id }.to_string();
        let accept = tokio::spawn(accept_loop(listener, id, session));
        Ok(SshSocket { dir, path, accept })
    }

    /// Host path of the socket.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SshSocket {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every open connection.
        self.accept.abort();
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "removing ssh socket dir failed");
        }
    }
}

async fn accept_loop(
    listener: tokio::net::UnixListener,
    id: String,
    session: Arc<dyn SessionProvider>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((conn, _)) => {
                    let session = session.clone();
                    let id = id.clone();
                    conns.spawn(forward(conn, id, session));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting on ssh agent socket failed");
                    return;
                }
            },
            // Reap finished connections so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Proxies one connection to a fresh agent stream of the session.
async fn forward(mut conn: tokio::net::UnixStream, id: String, session: Arc<dyn SessionProvider>) {
    let mut agent = match session.forward_ssh_agent(&id).await {
        Ok(a) => a,
        Err(e) => {
            // The process sees the connection close; later connections may still work.
            tracing::warn!(ssh_id = %id, error = %e, "forwarding ssh agent connection failed");
            return;
        }
    };
    if let Err(e) = tokio::io::copy_bidirectional(&mut conn, &mut agent).await {
        tracing::debug!(ssh_id = %id, error = %e, "ssh agent connection ended with an error");
    }
}
