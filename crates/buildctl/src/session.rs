//! The client side of a BuildKit session, as buildctl opens one for a build.
//!
//! `Control.Session` is a byte tunnel: the daemon runs an HTTP/2 gRPC **client** over it and
//! this side is the **server**. The headers announce the session id, a name, a shared key and
//! every method served. Served here: `grpc.health.v1.Health/Check`, `moby.filesync.v1.Auth`
//! `Credentials` (anonymous: berthd pulls through the bound Docker Engine, whose own credentials
//! apply) and, for `--local name=dir`, `moby.filesync.v1.FileSync/DiffCopy` with the fsutil
//! packet protocol (the `fsutil` crate's sender; ownership rewritten to 0:0 as buildctl does).
//! Ending the session half-closes the tunnel and waits a bounded time for the daemon's end.

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use protos::fsutil::types::Packet as WirePacket;
use protos::grpc::health::v1 as health;
use protos::moby::buildkit::v1 as control;
use protos::moby::filesync::v1 as filesync;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::transport::Channel;

/// A random id like BuildKit's `identity.NewID()` (25 base-36 characters).
pub fn new_id() -> String {
    use rand::Rng;
    const A: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut r = rand::thread_rng();
    (0..25).map(|_| A[r.gen_range(0..36)] as char).collect()
}

/// An open session; [`Session::close`] ends it.
pub struct Session {
    /// The session id to put in `SolveRequest.Session`.
    pub id: String,
    tx: Option<mpsc::Sender<control::BytesMessage>>,
    inbound: Option<tokio::task::JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Session {
    /// Opens a session serving `locals` (name → directory).
    pub async fn open(
        channel: Channel,
        locals: BTreeMap<String, PathBuf>,
    ) -> anyhow::Result<Session> {
        let id = new_id();
        let mut methods = vec![
            "/grpc.health.v1.Health/Check",
            "/moby.filesync.v1.Auth/Credentials",
        ];
        if !locals.is_empty() {
            methods.push("/moby.filesync.v1.FileSync/DiffCopy");
        }
        let (tx, rx) = mpsc::channel::<control::BytesMessage>(32);
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        let md = req.metadata_mut();
        md.insert("x-docker-expose-session-uuid", id.parse()?);
        md.insert("x-docker-expose-session-name", "buildctl".parse()?);
        md.insert("x-docker-expose-session-sharedkey", "".parse()?);
        for m in methods {
            md.append("x-docker-expose-session-grpc-method", m.parse()?);
        }
        let inbound = control::control_client::ControlClient::new(crate::connect::traced(channel))
            .session(req)
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))
            .context("open session")?
            .into_inner();

        let (server_io, pipe) = tokio::io::duplex(256 << 10);
        let (mut pipe_r, mut pipe_w) = tokio::io::split(pipe);
        // daemon → in-process server
        let inbound = tokio::spawn(async move {
            let mut inbound = inbound;
            while let Some(Ok(m)) = inbound.next().await {
                if pipe_w.write_all(&m.data).await.is_err() {
                    break;
                }
            }
            let _ = pipe_w.shutdown().await;
        });
        // in-process server → daemon
        let out = tx.clone();
        let outbound = tokio::spawn(async move {
            let mut buf = vec![0u8; 32 << 10];
            while let Ok(n) = pipe_r.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let data = Bytes::copy_from_slice(&buf[..n]);
                if out.send(control::BytesMessage { data }).await.is_err() {
                    break;
                }
            }
        });
        let server = tonic::transport::Server::builder()
            .add_service(health::health_server::HealthServer::new(HealthSvc))
            .add_service(filesync::auth_server::AuthServer::new(AuthSvc))
            .add_service(filesync::file_sync_server::FileSyncServer::new(
                FileSyncSvc {
                    locals: Arc::new(locals),
                },
            ));
        let serve = tokio::spawn(async move {
            let incoming = futures::stream::iter([Ok::<_, std::io::Error>(server_io)]);
            if let Err(e) = server.serve_with_incoming(incoming).await {
                eprintln!("session server: {e}");
            }
        });
        Ok(Session {
            id,
            tx: Some(tx),
            inbound: Some(inbound),
            tasks: vec![outbound, serve],
        })
    }

    /// Half-closes the tunnel and waits (at most `timeout`) for the daemon to end it.
    pub async fn close(mut self, timeout: Duration) {
        self.tx.take();
        if let Some(t) = self.inbound.take() {
            let _ = tokio::time::timeout(timeout, t).await;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(t) = self.inbound.take() {
            t.abort();
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

struct HealthSvc;

#[tonic::async_trait]
impl health::health_server::Health for HealthSvc {
    async fn check(
        &self,
        _: tonic::Request<health::HealthCheckRequest>,
    ) -> Result<tonic::Response<health::HealthCheckResponse>, tonic::Status> {
        // SERVING
        Ok(tonic::Response::new(health::HealthCheckResponse {
            status: 1,
        }))
    }
}

struct AuthSvc;

#[tonic::async_trait]
impl filesync::auth_server::Auth for AuthSvc {
    async fn credentials(
        &self,
        _: tonic::Request<filesync::CredentialsRequest>,
    ) -> Result<tonic::Response<filesync::CredentialsResponse>, tonic::Status> {
        Ok(tonic::Response::new(
            filesync::CredentialsResponse::default(),
        ))
    }
}

struct FileSyncSvc {
    locals: Arc<BTreeMap<String, PathBuf>>,
}

fn md_values(md: &tonic::metadata::MetadataMap, key: &str) -> Vec<String> {
    md.get_all(key)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_string)
        .collect()
}

#[tonic::async_trait]
impl filesync::file_sync_server::FileSync for FileSyncSvc {
    async fn diff_copy(
        &self,
        r: tonic::Request<tonic::Streaming<WirePacket>>,
    ) -> Result<tonic::Response<BoxStream<WirePacket>>, tonic::Status> {
        let md = r.metadata().clone();
        let name = md_values(&md, "dir-name")
            .into_iter()
            .next()
            .unwrap_or_default();
        let Some(dir) = self.locals.get(&name).cloned() else {
            return Err(tonic::Status::not_found(format!(
                "no access allowed to dir \"{name}\""
            )));
        };
        let opts = fsutil::SendOptions {
            walk: fsutil::walk::WalkOptions {
                include_patterns: md_values(&md, "include-patterns"),
                exclude_patterns: md_values(&md, "exclude-patterns"),
                follow_paths: md_values(&md, "followpaths"),
            },
            map: Some(Arc::new(|s: &mut fsutil::Stat| {
                s.uid = 0;
                s.gid = 0;
                fsutil::walk::MapResult::Keep
            })),
            progress: None,
        };
        let incoming = r.into_inner().map(|p| match p {
            Ok(p) => fsutil::Packet::try_from(p),
            Err(e) => Err(fsutil::Error::Transport {
                message: e.to_string(),
            }),
        });
        let (tx, rx) = mpsc::channel::<fsutil::Packet>(64);
        let (out_tx, out_rx) = mpsc::channel::<Result<WirePacket, tonic::Status>>(64);
        tokio::spawn(async move {
            let send = fsutil::send(dir, opts, tx, Box::pin(incoming));
            let forward = async {
                let mut rx = rx;
                while let Some(p) = rx.recv().await {
                    if out_tx.send(Ok(p.into())).await.is_err() {
                        break;
                    }
                }
                out_tx
            };
            let (res, out_tx) = tokio::join!(send, forward);
            if let Err(e) = res {
                let _ = out_tx
                    .send(Err(tonic::Status::unknown(e.to_string())))
                    .await;
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}
