//! Listening sockets: `unix://path` (parent directory created, mode 0660, optional group) and
//! `tcp://host:port` (plaintext, or TLS when a certificate and key are configured).

use anyhow::{bail, Context};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A bound listener.
pub enum Listener {
    /// A unix socket and its path (removed at shutdown).
    Unix(tokio::net::UnixListener, PathBuf),
    /// A TCP socket.
    Tcp(tokio::net::TcpListener, String),
}

impl Listener {
    /// The address as given.
    pub fn describe(&self) -> String {
        match self {
            Listener::Unix(_, p) => format!("unix://{}", p.display()),
            Listener::Tcp(_, a) => format!("tcp://{a}"),
        }
    }
}

fn resolve_group(g: &str) -> anyhow::Result<u32> {
    if let Ok(n) = g.parse::<u32>() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(g).context("look up group")? {
        Some(gr) => Ok(gr.gid.as_raw()),
        None => bail!("group {g:?} not found"),
    }
}

/// Binds one address.
pub async fn bind(addr: &str, group: Option<&str>) -> anyhow::Result<Listener> {
    if let Some(path) = addr.strip_prefix("unix://") {
        let path = Path::new(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("create {}", parent.display()))?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(md) => {
                use std::os::unix::fs::FileTypeExt;
                if !md.file_type().is_socket() {
                    bail!("{} exists and is not a socket", path.display());
                }
                // A live daemon would still answer; refuse to steal its socket.
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    bail!("{} is in use by another daemon", path.display());
                }
                std::fs::remove_file(path)
                    .with_context(|| format!("remove stale socket {}", path.display()))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("stat {}", path.display())),
        }
        let l = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("listen on {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .with_context(|| format!("chmod {}", path.display()))?;
        if let Some(g) = group {
            let gid = resolve_group(g)?;
            std::os::unix::fs::chown(path, None, Some(gid))
                .with_context(|| format!("chown {} to group {g}", path.display()))?;
        }
        Ok(Listener::Unix(l, path.to_path_buf()))
    } else if let Some(hp) = addr.strip_prefix("tcp://") {
        let l = tokio::net::TcpListener::bind(hp)
            .await
            .with_context(|| format!("listen on tcp://{hp}"))?;
        let local = l
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| hp.to_string());
        Ok(Listener::Tcp(l, local))
    } else {
        bail!("unsupported address {addr:?}: want unix:///path or tcp://host:port")
    }
}
