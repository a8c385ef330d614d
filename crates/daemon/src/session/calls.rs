//! Calls berthd makes into a client session: FileSync (pull a local directory), FileSend (push an
//! output as fsutil packets or raw tar bytes), Auth, Secrets, SSH, Upload and Health.
//!
//! FileSend's proto says `BytesMessage`, but for `type=local` the client expects fsutil `Packet`s
//! on the same method path; both are sent here with a prost codec of the right message type.

use super::{channel::SessionChannel, Session};
use crate::errors::{Error, Result};
use bytes::Bytes;
use futures::StreamExt;
use protos::fsutil::types::Packet as WirePacket;
use protos::moby::filesync::v1::BytesMessage;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::MetadataValue;
use tonic_prost::ProstCodec;
use tracing::Instrument as _;

/// `FileSync/DiffCopy`.
pub const FILESYNC_DIFFCOPY: &str = "/moby.filesync.v1.FileSync/DiffCopy";
/// `FileSend/DiffCopy`.
pub const FILESEND_DIFFCOPY: &str = "/moby.filesync.v1.FileSend/DiffCopy";
/// `Auth/Credentials`.
pub const AUTH_CREDENTIALS: &str = "/moby.filesync.v1.Auth/Credentials";
/// `Auth/FetchToken` method path.
pub const AUTH_FETCH_TOKEN: &str = "/moby.filesync.v1.Auth/FetchToken";
/// `Secrets/GetSecret`.
pub const SECRETS_GET: &str = "/moby.buildkit.secrets.v1.Secrets/GetSecret";
/// `SSH/CheckAgent`.
pub const SSH_CHECK: &str = "/moby.sshforward.v1.SSH/CheckAgent";
/// `SSH/ForwardAgent`.
pub const SSH_FORWARD: &str = "/moby.sshforward.v1.SSH/ForwardAgent";
/// `Upload/Pull`.
pub const UPLOAD_PULL: &str = "/moby.upload.v1.Upload/Pull";

const MAX_MSG: usize = 64 << 20;

fn grpc(session: &Session) -> tonic::client::Grpc<SessionChannel> {
    tonic::client::Grpc::with_origin(session.channel.clone(), SessionChannel::origin())
        .max_decoding_message_size(MAX_MSG)
        .max_encoding_message_size(MAX_MSG)
}

async fn ready(g: &mut tonic::client::Grpc<SessionChannel>, session: &Session) -> Result<()> {
    g.ready()
        .await
        .map_err(|e| Error::unavailable(format!("session {} is not usable: {e}", session.id)))
}

fn require(session: &Session, method: &str, what: &str) -> Result<()> {
    if session.supports(method) {
        Ok(())
    } else {
        Err(Error::unavailable(format!(
            "{what}: session {} does not serve {method}",
            session.id
        )))
    }
}

fn insert_md(req: &mut tonic::metadata::MetadataMap, key: &'static str, value: &str) -> Result<()> {
    let v = MetadataValue::try_from(value)
        .map_err(|_| Error::invalid(format!("invalid header value for {key}: {value:?}")))?;
    req.append(key, v);
    Ok(())
}

/// `Health/Check`.
pub async fn health_check(session: &Session) -> Result<()> {
    let mut g = grpc(session);
    ready(&mut g, session).await?;
    let path = PathAndQuery::from_static("/grpc.health.v1.Health/Check");
    let codec: ProstCodec<
        protos::grpc::health::v1::HealthCheckRequest,
        protos::grpc::health::v1::HealthCheckResponse,
    > = ProstCodec::default();
    g.unary(tonic::Request::new(Default::default()), path, codec)
        .await
        .map_err(|st| Error::from_status("health check", &st))?;
    Ok(())
}

/// What to pull with [`sync_local`].
#[derive(Debug, Clone, Default)]
pub struct LocalSyncRequest {
    /// `dir-name`.
    pub name: String,
    /// `include-patterns`.
    pub include_patterns: Vec<String>,
    /// `exclude-patterns`.
    pub exclude_patterns: Vec<String>,
    /// `followpaths`.
    pub follow_paths: Vec<String>,
    /// Re-request every file (`local.differ=none`).
    pub differ_none: bool,
    /// Where the receiver keeps the destination's listing between syncs
    /// (`fsutil::ReceiveOptions::state`).
    pub state: Option<PathBuf>,
}

/// Receives the client directory `req.name` into `dest` (incremental against what `dest` holds).
pub async fn sync_local(
    session: &Session,
    req: &LocalSyncRequest,
    dest: PathBuf,
    progress: Option<fsutil::receive::ProgressFn>,
) -> Result<fsutil::ReceiveStats> {
    if !session.supports(FILESYNC_DIFFCOPY) {
        return Err(Error::unavailable(format!(
            "no local sources enabled: session {} does not serve {FILESYNC_DIFFCOPY}",
            session.id
        )));
    }
    let what = format!("transfer local {:?}", req.name);
    // Until the client answers the DiffCopy call (with its first STAT).
    let negotiate = tracing::debug_span!("local.sync.negotiate");
    let mut g = grpc(session);
    ready(&mut g, session).instrument(negotiate.clone()).await?;
    let (tx, rx) = mpsc::channel::<fsutil::Packet>(64);
    let mut request = tonic::Request::new(ReceiverStream::new(rx).map(WirePacket::from));
    {
        let md = request.metadata_mut();
        insert_md(md, "dir-name", &req.name)?;
        for p in &req.include_patterns {
            insert_md(md, "include-patterns", p)?;
        }
        for p in &req.exclude_patterns {
            insert_md(md, "exclude-patterns", p)?;
        }
        for p in &req.follow_paths {
            insert_md(md, "followpaths", p)?;
        }
    }
    let codec: ProstCodec<WirePacket, WirePacket> = ProstCodec::default();
    let tx_for_recv = tx.clone();
    let call = g.streaming(request, PathAndQuery::from_static(FILESYNC_DIFFCOPY), codec);
    // The call resolves when the client answers with headers, which it does with its first STAT.
    let resp = tokio::select! {
        r = call.instrument(negotiate) => r.map_err(|st| Error::from_status(&what, &st))?,
        _ = session.closed.cancelled() => return Err(Error::unavailable(format!("{what}: session {} closed", session.id))),
    };
    drop(tx);
    // A status the client ends the stream with (e.g. NotFound for an unknown dir name) is kept
    // so the error keeps its code instead of becoming a transport error.
    let remote: Arc<std::sync::Mutex<Option<tonic::Status>>> = Arc::default();
    let slot = remote.clone();
    let incoming = resp.into_inner().map(move |r| match r {
        Ok(p) => fsutil::Packet::try_from(p),
        Err(st) => {
            let message = st.message().to_string();
            *slot.lock().unwrap() = Some(st);
            Err(fsutil::Error::Transport { message })
        }
    });
    let opts = fsutil::ReceiveOptions {
        merge: false,
        differ_none: req.differ_none,
        state: req.state.clone(),
        progress,
    };
    let fut = fsutil::receive(dest, opts, tx_for_recv, Box::pin(incoming));
    let res = tokio::select! {
        r = fut => r,
        _ = session.closed.cancelled() => return Err(Error::unavailable(format!("{what}: session {} closed", session.id))),
    };
    match res {
        Ok(stats) => Ok(stats),
        Err(e) => match remote.lock().unwrap().take() {
            Some(st) => Err(Error::from_status(&what, &st)),
            None => Err(Error::fsutil(what, e)),
        },
    }
}

fn code_name(c: tonic::Code) -> String {
    format!("{c:?}")
}

/// Sends the tree at `root` to the client's output directory (`type=local`), as the fsutil sender.
pub async fn send_local(
    session: &Session,
    root: PathBuf,
    map: Option<fsutil::send::MapFn>,
    progress: Option<fsutil::send::ProgressFn>,
) -> Result<()> {
    send_local_tree(session, LocalTree::Dir { root, map }, progress).await
}

/// What [`send_local_tree`] sends.
pub enum LocalTree {
    /// The tree at `root`, each entry passed through `map`.
    Dir {
        /// The directory.
        root: PathBuf,
        /// Per-entry rewrite.
        map: Option<fsutil::send::MapFn>,
    },
    /// A listing in fsutil's walk order ([`fsutil::send::send_entries`]).
    Entries(Vec<fsutil::send::Entry>),
}

/// Sends `tree` to the client's output directory (`type=local`), as the fsutil sender.
pub async fn send_local_tree(
    session: &Session,
    tree: LocalTree,
    progress: Option<fsutil::send::ProgressFn>,
) -> Result<()> {
    require(session, FILESEND_DIFFCOPY, "export to client directory")?;
    let what = "send output to client directory";
    let mut g = grpc(session);
    ready(&mut g, session).await?;
    let (tx, rx) = mpsc::channel::<fsutil::Packet>(64);
    let request = tonic::Request::new(ReceiverStream::new(rx).map(WirePacket::from));
    let codec: ProstCodec<WirePacket, WirePacket> = ProstCodec::default();
    let tx_send = tx.clone();
    drop(tx);
    // Start the sender before awaiting response headers: the client answers only once it sees data.
    let (in_tx, in_rx) = mpsc::channel::<std::result::Result<fsutil::Packet, fsutil::Error>>(64);
    let incoming = ReceiverStream::new(in_rx);
    let sender = match tree {
        LocalTree::Dir { root, map } => {
            let opts = fsutil::SendOptions {
                progress,
                map,
                ..Default::default()
            };
            tokio::spawn(fsutil::send(root, opts, tx_send, incoming))
        }
        LocalTree::Entries(entries) => {
            let opts = fsutil::SendOptions {
                progress,
                ..Default::default()
            };
            tokio::spawn(fsutil::send::send_entries(entries, opts, tx_send, incoming))
        }
    };
    let resp = tokio::select! {
        r = g.streaming(request, PathAndQuery::from_static(FILESEND_DIFFCOPY), codec) => r,
        _ = session.closed.cancelled() => return Err(Error::unavailable(format!("{what}: session {} closed", session.id))),
    };
    let resp = match resp {
        Ok(r) => r,
        Err(st) => {
            sender.abort();
            return Err(Error::from_status(what, &st));
        }
    };
    let mut stream = resp.into_inner();
    let forward = async {
        while let Some(item) = stream.next().await {
            let item = match item {
                Ok(p) => fsutil::Packet::try_from(p),
                Err(st) => Err(fsutil::Error::Transport {
                    message: format!("{}: {}", code_name(st.code()), st.message()),
                }),
            };
            let stop = item.is_err();
            if in_tx.send(item).await.is_err() || stop {
                break;
            }
        }
        drop(in_tx);
    };
    let (_, res) = tokio::join!(forward, sender);
    match res {
        Ok(r) => r.map_err(|e| Error::fsutil(what, e)),
        Err(e) => Err(Error::internal(format!("{what}: sender task: {e}"))),
    }
}

/// Streams raw bytes (a tarball) to the client's output file (`type=tar|docker|oci`).
///
/// `chunks` yields the file content in order (each chunk should be ≤ 1 MiB); `md` becomes
/// `exporter-md-<k>: <v>` headers. Returns false when the client declined the target
/// (`AlreadyExists`, e.g. its output callback returned no writer), which buildkitd treats as
/// success.
pub async fn send_bytes(
    session: &Session,
    chunks: mpsc::Receiver<Bytes>,
    md: &[(String, String)],
) -> Result<bool> {
    require(session, FILESEND_DIFFCOPY, "export to client file")?;
    let what = "send output to client file";
    let mut g = grpc(session);
    ready(&mut g, session).await?;
    let mut request =
        tonic::Request::new(ReceiverStream::new(chunks).map(|data| BytesMessage { data }));
    for (k, v) in md {
        let key = format!("exporter-md-{k}");
        let key = tonic::metadata::MetadataKey::from_bytes(key.as_bytes())
            .map_err(|_| Error::invalid(format!("invalid exporter metadata key {k:?}")))?;
        let val = MetadataValue::try_from(v.as_str())
            .map_err(|_| Error::invalid(format!("invalid exporter metadata value for {k}")))?;
        request.metadata_mut().append(key, val);
    }
    let codec: ProstCodec<BytesMessage, BytesMessage> = ProstCodec::default();
    let res = tokio::select! {
        r = g.streaming(request, PathAndQuery::from_static(FILESEND_DIFFCOPY), codec) => r,
        _ = session.closed.cancelled() => return Err(Error::unavailable(format!("{what}: session {} closed", session.id))),
    };
    match res {
        Ok(resp) => {
            let mut s = resp.into_inner();
            while let Some(m) = s.next().await {
                if let Err(st) = m {
                    if st.code() == tonic::Code::AlreadyExists {
                        return Ok(false);
                    }
                    return Err(Error::from_status(what, &st));
                }
            }
            Ok(true)
        }
        // The client declined the target: buildkitd treats it as success.
        Err(st) if st.code() == tonic::Code::AlreadyExists => Ok(false),
        Err(st) => Err(Error::from_status(what, &st)),
    }
}

/// Registry credentials for `host` from the client's `Auth` service (`None` = anonymous).
pub async fn credentials(session: &Session, host: &str) -> Result<Option<(String, String)>> {
    if !session.supports(AUTH_CREDENTIALS) {
        return Ok(None);
    }
    let mut g = grpc(session);
    ready(&mut g, session).await?;
    let codec: ProstCodec<
        protos::moby::filesync::v1::CredentialsRequest,
        protos::moby::filesync::v1::CredentialsResponse,
    > = ProstCodec::default();
    let req = protos::moby::filesync::v1::CredentialsRequest {
        host: host.to_string(),
    };
    match g
        .unary(
            tonic::Request::new(req),
            PathAndQuery::from_static(AUTH_CREDENTIALS),
            codec,
        )
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            if r.username.is_empty() && r.secret.is_empty() {
                Ok(None)
            } else {
                Ok(Some((r.username, r.secret)))
            }
        }
        Err(st) if st.code() == tonic::Code::Unimplemented => Ok(None),
        Err(st) => Err(Error::from_status(&format!("credentials for {host}"), &st)),
    }
}

/// A registry token fetched by the client (`Auth/FetchToken`); `None` when the client does not
/// offer the call (then berthd fetches the token with [`credentials`]).
pub async fn fetch_token(
    session: &Session,
    req: &registry::TokenRequest,
) -> Result<Option<registry::Token>> {
    if !session.supports(AUTH_FETCH_TOKEN) {
        return Ok(None);
    }
    let mut g = grpc(session);
    ready(&mut g, session).await?;
    let codec: ProstCodec<
        protos::moby::filesync::v1::FetchTokenRequest,
        protos::moby::filesync::v1::FetchTokenResponse,
    > = ProstCodec::default();
    let msg = protos::moby::filesync::v1::FetchTokenRequest {
        client_id: "buildkit-client".into(),
        host: req.host.clone(),
        realm: req.realm.clone(),
        service: req.service.clone(),
        scopes: req.scopes.clone(),
    };
    match g
        .unary(
            tonic::Request::new(msg),
            PathAndQuery::from_static(AUTH_FETCH_TOKEN),
            codec,
        )
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            if r.token.is_empty() {
                return Ok(None);
            }
            Ok(Some(registry::Token {
                token: r.token,
                expires_in: u64::try_from(r.expires_in).ok().filter(|s| *s > 0),
            }))
        }
        Err(st) if st.code() == tonic::Code::Unimplemented => Ok(None),
        Err(st) => Err(Error::from_status(&format!("token for {}", req.host), &st)),
    }
}

/// The secret `id` from the client's `Secrets` service (`None` when it does not exist).
pub async fn get_secret(session: &Session, id: &str) -> Result<Option<Bytes>> {
    if !session.supports(SECRETS_GET) {
        return Ok(None);
    }
    let mut g = grpc(session);
    ready(&mut g, session).await?;
    let codec: ProstCodec<
        protos::moby::buildkit::secrets::v1::GetSecretRequest,
        protos::moby::buildkit::secrets::v1::GetSecretResponse,
    > = ProstCodec::default();
    let req = protos::moby::buildkit::secrets::v1::GetSecretRequest {
        id: id.to_string(),
        annotations: Default::default(),
    };
    match g
        .unary(
            tonic::Request::new(req),
            PathAndQuery::from_static(SECRETS_GET),
            codec,
        )
        .await
    {
        Ok(r) => Ok(Some(r.into_inner().data)),
        Err(st)
            if matches!(
                st.code(),
                tonic::Code::NotFound | tonic::Code::Unimplemented
            ) =>
        {
            Ok(None)
        }
        Err(st) => Err(Error::from_status(&format!("secret {id:?}"), &st)),
    }
}

/// Checks that the client can forward SSH agent `id` (`default` when empty).
pub async fn ssh_check_agent(session: &Session, id: &str) -> Result<()> {
    require(session, SSH_CHECK, "ssh forwarding")?;
    let id = if id.is_empty() { "default" } else { id };
    let mut g = grpc(session);
    ready(&mut g, session).await?;
    let codec: ProstCodec<
        protos::moby::sshforward::v1::CheckAgentRequest,
        protos::moby::sshforward::v1::CheckAgentResponse,
    > = ProstCodec::default();
    let req = protos::moby::sshforward::v1::CheckAgentRequest { id: id.to_string() };
    g.unary(
        tonic::Request::new(req),
        PathAndQuery::from_static(SSH_CHECK),
        codec,
    )
    .await
    .map_err(|st| Error::from_status(&format!("ssh agent {id:?}"), &st))?;
    Ok(())
}

/// Opens one SSH agent connection through the client (`ForwardAgent` with `buildkit.ssh.id`).
///
/// Bytes sent on the returned sender go to the agent (dropping it half-closes); the stream
/// yields the agent's bytes.
pub async fn ssh_forward_agent(
    session: &Session,
    id: &str,
) -> Result<(
    mpsc::Sender<Bytes>,
    futures::stream::BoxStream<'static, Result<Bytes>>,
)> {
    require(session, SSH_FORWARD, "ssh forwarding")?;
    let id = if id.is_empty() { "default" } else { id };
    let mut g = grpc(session);
    ready(&mut g, session).await?;
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let mut request = tonic::Request::new(
        ReceiverStream::new(rx).map(|data| protos::moby::sshforward::v1::BytesMessage { data }),
    );
    insert_md(request.metadata_mut(), "buildkit.ssh.id", id)?;
    let codec: ProstCodec<
        protos::moby::sshforward::v1::BytesMessage,
        protos::moby::sshforward::v1::BytesMessage,
    > = ProstCodec::default();
    let resp = g
        .streaming(request, PathAndQuery::from_static(SSH_FORWARD), codec)
        .await
        .map_err(|st| Error::from_status(&format!("ssh agent {id:?}"), &st))?;
    let stream = resp
        .into_inner()
        .map(|r| {
            r.map(|m| m.data)
                .map_err(|st| Error::from_status("ssh agent stream", &st))
        })
        .boxed();
    Ok((tx, stream))
}

/// Pulls the file the client serves at `http://<host><path>` (`Upload/Pull` with the
/// `urlhost`/`urlpath` headers, as buildkitd's HTTP source sends for host `buildkit-session`).
/// Nothing is sent to the client; the returned stream yields its bytes as they arrive (the
/// HTTP/2 flow control of the session holds the client back while they are not read).
pub async fn upload_pull(
    session: &Session,
    host: &str,
    path: &str,
) -> Result<futures::stream::BoxStream<'static, Result<Bytes>>> {
    require(session, UPLOAD_PULL, "upload")?;
    let mut g = grpc(session);
    ready(&mut g, session).await?;
    let mut request = tonic::Request::new(futures::stream::empty::<
        protos::moby::upload::v1::BytesMessage,
    >());
    insert_md(request.metadata_mut(), "urlpath", path)?;
    insert_md(request.metadata_mut(), "urlhost", host)?;
    let codec: ProstCodec<
        protos::moby::upload::v1::BytesMessage,
        protos::moby::upload::v1::BytesMessage,
    > = ProstCodec::default();
    let resp = tokio::select! {
        r = g.streaming(request, PathAndQuery::from_static(UPLOAD_PULL), codec) => r,
        _ = session.closed.cancelled() => {
            return Err(Error::unavailable(format!("session {} closed", session.id)))
        }
    }
    // The caller names the URL.
    .map_err(|st| Error::from_status("", &st))?;
    let closed = session.closed.clone();
    let sid = session.id.clone();
    let stream = resp.into_inner();
    // The session's end ends the stream with an error, never a silent short read.
    let stream = futures::stream::unfold(
        (stream, closed, sid, false),
        |(mut s, closed, sid, done)| async move {
            if done {
                return None;
            }
            let item = tokio::select! {
                biased;
                m = s.next() => m,
                _ = closed.cancelled() => Some(Err(tonic::Status::unavailable(format!("session {sid} closed")))),
            }?;
            match item {
                Ok(m) => Some((Ok(m.data), (s, closed, sid, false))),
                Err(st) => {
                    let e = Error::from_status("", &st);
                    Some((Err(e), (s, closed, sid, true)))
                }
            }
        },
    )
    .boxed();
    Ok(stream)
}
