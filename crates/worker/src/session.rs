//! What the worker needs from the client session; implemented by the daemon.
//!
//! The worker never speaks the session protocol itself: the daemon owns the gRPC tunnel and the
//! fsutil receiver and implements [`SessionProvider`] on top of them. Tests implement it over a
//! real local directory.
//!
//! SSH agent forwarding (`SSH` exec mounts) is two calls: [`SessionProvider::check_ssh_agent`]
//! before the process starts, and [`SessionProvider::forward_ssh_agent`] once per connection a
//! process makes to the socket; the returned [`SshAgentConn`] carries the agent protocol bytes
//! both ways (upstream: `session/sshforward`).

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use crate::error::Result;

/// How the receiver decides that an existing file is unchanged (`local.differ`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LocalDiffer {
    /// Compare size, mtime, mode, uid/gid, link target (the default).
    #[default]
    Metadata,
    /// Re-request every regular file.
    None,
}

/// A request to receive a client directory (`local://NAME` source).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LocalSync {
    /// The local name (`dir-name` header), i.e. `NAME` in `local://NAME`.
    pub name: String,
    /// The session to use (`local.session` attr), without any `prefix:`. `None`: any session
    /// of the build.
    pub session_id: Option<String>,
    /// `include-patterns` (dockerignore syntax).
    pub include_patterns: Vec<String>,
    /// `exclude-patterns` (dockerignore syntax).
    pub exclude_patterns: Vec<String>,
    /// `followpaths`.
    pub follow_paths: Vec<String>,
    /// `local.sharedkeyhint`, if any.
    pub shared_key_hint: Option<String>,
    /// `local.differ`.
    pub differ: LocalDiffer,
    /// A file beside the destination where the receiver may keep the listing it applied, to
    /// diff the next sync into the same destination against instead of walking it
    /// (`fsutil::ReceiveOptions::state`). Set by the worker for its own sync directories,
    /// which nothing else changes.
    pub receive_state: Option<PathBuf>,
}

impl LocalSync {
    /// A request for `name` with no filters.
    pub fn new(name: impl Into<String>) -> Self {
        LocalSync {
            name: name.into(),
            session_id: None,
            include_patterns: vec![],
            exclude_patterns: vec![],
            follow_paths: vec![],
            shared_key_hint: None,
            differ: LocalDiffer::Metadata,
            receive_state: None,
        }
    }
}

/// What a [`SessionProvider::sync_local`] did to its destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// File content bytes received.
    pub bytes: u64,
    /// The destination was left exactly as it was: no entry created, replaced, changed or
    /// removed (directory times aside). `false` whenever that is not known for sure: the worker
    /// then checksums the whole directory again.
    pub unchanged: bool,
}

impl SyncStats {
    /// A sync that received `bytes` and may have changed the destination.
    pub fn changed(bytes: u64) -> Self {
        SyncStats {
            bytes,
            unchanged: false,
        }
    }
}

/// Receives byte counts during a transfer; the worker turns them into a
/// `transferring <name>:` status of the vertex.
pub struct TransferProgress {
    f: Box<dyn Fn(u64) + Send + Sync>,
}

impl std::fmt::Debug for TransferProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TransferProgress")
    }
}

impl TransferProgress {
    pub(crate) fn new(f: impl Fn(u64) + Send + Sync + 'static) -> Self {
        TransferProgress { f: Box::new(f) }
    }

    /// A reporter that drops updates (for callers outside a solve).
    pub fn discard() -> Self {
        TransferProgress::new(|_| {})
    }

    /// Reports the total number of bytes received so far.
    pub fn report(&self, bytes_so_far: u64) {
        (self.f)(bytes_so_far)
    }
}

/// Registry credentials returned by the session's Auth service.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name (may be empty for token auth).
    pub username: String,
    /// Password or identity token.
    pub secret: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// These credentials as the Docker Engine API takes them (`X-Registry-Auth`) for `host` (see
    /// [`registry_host`]): an empty user name with a secret is an identity token (a refresh token
    /// from `docker login`); Docker Hub is addressed as `https://index.docker.io/v1/`.
    pub fn to_docker(&self, host: &str) -> bollard::auth::DockerCredentials {
        let server = if host == DOCKER_HUB_HOST {
            "https://index.docker.io/v1/".to_string()
        } else {
            host.to_string()
        };
        if self.username.is_empty() {
            bollard::auth::DockerCredentials {
                identitytoken: Some(self.secret.clone()),
                serveraddress: Some(server),
                ..Default::default()
            }
        } else {
            bollard::auth::DockerCredentials {
                username: Some(self.username.clone()),
                password: Some(self.secret.clone()),
                serveraddress: Some(server),
                ..Default::default()
            }
        }
    }
}

/// Docker Hub as BuildKit names it to the session's Auth service.
const DOCKER_HUB_HOST: &str = "registry-1.docker.io";

/// The registry host of an image reference, as BuildKit asks the session's Auth service for
/// credentials: the first path component when it looks like a host (has `.` or `:`, or is
/// `localhost`), else Docker Hub (`registry-1.docker.io`, also for `docker.io` itself).
pub fn registry_host(reference: &str) -> String {
    match reference.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            if first == "docker.io" || first == "index.docker.io" {
                DOCKER_HUB_HOST.into()
            } else {
                first.to_string()
            }
        }
        _ => DOCKER_HUB_HOST.into(),
    }
}

/// One connection to a client's SSH agent: bytes written go to the agent, bytes read come from
/// it; shutting down the write half half-closes the connection.
pub trait SshAgentStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> SshAgentStream for T {}

/// A boxed [`SshAgentStream`], as returned by [`SessionProvider::forward_ssh_agent`].
pub type SshAgentConn = Box<dyn SshAgentStream>;

fn no_ssh(id: &str) -> crate::Error {
    crate::Error::session(
        crate::ErrorKind::Unimplemented,
        format!("ssh agent {id:?}: the session forwards no SSH agent"),
        None,
    )
}

/// Access to the client's session attachables for one build. Implemented by the daemon.
///
/// Errors should be built with [`crate::Error::session`], choosing the kind
/// (`NotFound` for an unknown dir name or secret, `Unavailable` when the session is gone...).
#[async_trait]
pub trait SessionProvider: Send + Sync {
    /// Receives the client directory described by `req` into `dest` (fsutil DiffCopy receiver
    /// semantics, `session.md` §4.2): `dest` may already hold a previous sync of the same
    /// directory, and must afterwards mirror the client's (filtered) directory exactly, with
    /// unchanged files left in place. Everything written must stay inside `dest`.
    /// Returns the bytes received and whether `dest` is unchanged.
    async fn sync_local(
        &self,
        req: &LocalSync,
        dest: &Path,
        progress: &TransferProgress,
    ) -> Result<SyncStats>;

    /// Returns the secret `id`, or `None` when the client does not have it.
    async fn get_secret(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let _ = id;
        Ok(None)
    }

    /// Returns credentials for registry `host`, or `None` for anonymous access.
    async fn registry_credentials(&self, host: &str) -> Result<Option<Credentials>> {
        let _ = host;
        Ok(None)
    }

    /// A registry token fetched by the client itself for a bearer challenge (the session's
    /// `Auth.FetchToken`); `Ok(None)` when the client does not offer it, and then the worker
    /// fetches the token with [`SessionProvider::registry_credentials`].
    async fn registry_token(
        &self,
        req: &registry::TokenRequest,
    ) -> Result<Option<registry::Token>> {
        let _ = req;
        Ok(None)
    }

    /// Checks that the client forwards SSH agent `id` (`""` means `default`), as buildkitd's
    /// `SSH/CheckAgent` call does. An error of kind `Unimplemented` means the session has no
    /// SSH forwarding at all; any other error (e.g. an unknown id) is shown as the cause.
    async fn check_ssh_agent(&self, id: &str) -> Result<()> {
        Err(no_ssh(id))
    }

    /// Opens one connection to the client's SSH agent `id` (`SSH/ForwardAgent`).
    async fn forward_ssh_agent(&self, id: &str) -> Result<SshAgentConn> {
        Err(no_ssh(id))
    }

    /// The size of blob `digest` in the client's content store `store` (the full store id, e.g.
    /// `oci:NAME` for an `oci-layout://` source), asked of session `session` (`None`: the
    /// build's session); `Ok(None)` when the store does not have it (`Content/Info`).
    async fn content_info(
        &self,
        session: Option<&str>,
        store: &str,
        digest: &str,
    ) -> Result<Option<u64>> {
        let _ = (session, digest);
        Err(no_content_store(store))
    }

    /// Opens blob `digest` of the client's content store `store` for reading
    /// (`Content/Read`); the reader blocks, so it is read on a blocking thread. The bytes are
    /// the client's: the caller checks them against `digest`.
    async fn content_read(
        &self,
        session: Option<&str>,
        store: &str,
        digest: &str,
    ) -> Result<Box<dyn std::io::Read + Send>> {
        let _ = (session, digest);
        Err(no_content_store(store))
    }

    /// Opens the file the client serves at `http://buildkit-session/<path>` (an `http` source
    /// on that host: BuildKit's session `Upload/Pull`, e.g. a build context sent as a tar
    /// stream). `host` and `path` are the URL's (`buildkit-session`, `/<id>`). The client hands
    /// each upload out once.
    async fn upload_pull(&self, host: &str, path: &str) -> Result<UploadStream> {
        Err(crate::Error::session(
            crate::ErrorKind::Unimplemented,
            format!("http://{host}{path}: the session serves no uploads"),
            None,
        ))
    }
}

/// The bytes of a file the client serves over its session (see
/// [`SessionProvider::upload_pull`]), in order.
pub type UploadStream = futures::stream::BoxStream<'static, Result<bytes::Bytes>>;

fn no_content_store(store: &str) -> crate::Error {
    crate::Error::session(
        crate::ErrorKind::Unimplemented,
        format!("content store {store:?}: the session serves no content store"),
        None,
    )
}

/// A session that has nothing: every local sync fails with `NotFound`.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoSession;

#[async_trait]
impl SessionProvider for NoSession {
    async fn sync_local(
        &self,
        req: &LocalSync,
        _dest: &Path,
        _progress: &TransferProgress,
    ) -> Result<SyncStats> {
        Err(crate::Error::session(
            crate::ErrorKind::NotFound,
            format!("no session to sync local {:?} from", req.name),
            None,
        ))
    }
}
