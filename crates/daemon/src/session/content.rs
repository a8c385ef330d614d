//! The client's content store over the session (`containerd.services.content.v1.Content`, the
//! store chosen by the `buildkit-attachable-store-id` header), as buildkitd uses it for
//! `--export-cache type=local,dest=DIR` / `--import-cache type=local,src=DIR` (store id
//! `local:DIR`; the client keeps `DIR` as an OCI layout and writes its `index.json`).
//!
//! The messages are containerd's (`api/services/content/v1/content.proto`), declared here with
//! the few fields berthd uses.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::AsyncReadExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::uri::PathAndQuery;
use tonic_prost::ProstCodec;

use super::channel::SessionChannel;
use super::Session;

/// `Content/Info`.
pub const CONTENT_INFO: &str = "/containerd.services.content.v1.Content/Info";
/// `Content/Read`.
pub const CONTENT_READ: &str = "/containerd.services.content.v1.Content/Read";
/// `Content/Write`.
pub const CONTENT_WRITE: &str = "/containerd.services.content.v1.Content/Write";
/// Header naming the store.
const STORE_ID_HEADER: &str = "buildkit-attachable-store-id";
/// Bytes per write message (the client's gRPC server takes 4 MiB messages at most).
const CHUNK: usize = 1 << 20;

#[derive(Clone, PartialEq, prost::Message)]
struct InfoRequest {
    #[prost(string, tag = "1")]
    digest: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Info {
    #[prost(string, tag = "1")]
    digest: String,
    #[prost(int64, tag = "2")]
    size: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct InfoResponse {
    #[prost(message, optional, tag = "1")]
    info: Option<Info>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ReadContentRequest {
    #[prost(string, tag = "1")]
    digest: String,
    #[prost(int64, tag = "2")]
    offset: i64,
    #[prost(int64, tag = "3")]
    size: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ReadContentResponse {
    #[prost(int64, tag = "1")]
    offset: i64,
    #[prost(bytes = "bytes", tag = "2")]
    data: Bytes,
}

/// `WriteAction`: STAT = 0, WRITE = 1, COMMIT = 2.
const WRITE: i32 = 1;
const COMMIT: i32 = 2;

#[derive(Clone, PartialEq, prost::Message)]
struct WriteContentRequest {
    #[prost(int32, tag = "1")]
    action: i32,
    #[prost(string, tag = "2")]
    r#ref: String,
    #[prost(int64, tag = "3")]
    total: i64,
    #[prost(string, tag = "4")]
    expected: String,
    #[prost(int64, tag = "5")]
    offset: i64,
    #[prost(bytes = "bytes", tag = "6")]
    data: Bytes,
}

#[derive(Clone, PartialEq, prost::Message)]
struct WriteContentResponse {
    #[prost(int32, tag = "1")]
    action: i32,
    #[prost(int64, tag = "4")]
    offset: i64,
    #[prost(string, tag = "6")]
    digest: String,
}

/// The content store `id` of a client session.
pub struct SessionContentStore {
    session: Arc<Session>,
    id: String,
}

impl SessionContentStore {
    /// Store `id` (e.g. `local:/tmp/cache`) of `session`.
    pub fn new(session: Arc<Session>, id: impl Into<String>) -> Self {
        SessionContentStore {
            session,
            id: id.into(),
        }
    }

    fn grpc(&self) -> tonic::client::Grpc<SessionChannel> {
        tonic::client::Grpc::with_origin(self.session.channel.clone(), SessionChannel::origin())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// Refuses a store id that cannot travel in the `buildkit-attachable-store-id` header, in the
    /// words of grpc-go (which buildkitd's session client is): header values are printable ASCII
    /// only, so `local:éèç` fails before anything is read or written.
    pub fn check_id(&self) -> remotecache::Result<()> {
        if self.id.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Ok(());
        }
        Err(remotecache::Error::Other(format!(
            "rpc error: code = Internal desc = header key {STORE_ID_HEADER:?} contains value with non-printable ASCII characters"
        )))
    }

    fn request<T>(&self, msg: T) -> remotecache::Result<tonic::Request<T>> {
        self.check_id()?;
        let mut req = tonic::Request::new(msg);
        let v = tonic::metadata::MetadataValue::try_from(self.id.as_str())
            .map_err(|_| remotecache::Error::Other(format!("invalid store id {:?}", self.id)))?;
        req.metadata_mut().insert(STORE_ID_HEADER, v);
        Ok(req)
    }

    fn err(&self, what: &str, st: &tonic::Status) -> remotecache::Error {
        remotecache::Error::Other(format!(
            "{what} in the client's content store {}: {}",
            self.id,
            st.message()
        ))
    }

    async fn ready(&self) -> remotecache::Result<tonic::client::Grpc<SessionChannel>> {
        if !self.session.supports(CONTENT_INFO) {
            return Err(remotecache::Error::Other(format!(
                "session {} does not serve the content store {} ({CONTENT_INFO})",
                self.session.id, self.id
            )));
        }
        let mut g = self.grpc();
        g.ready().await.map_err(|e| {
            remotecache::Error::Other(format!("session {} is not usable: {e}", self.session.id))
        })?;
        Ok(g)
    }

    /// Streams `size` bytes from `src` into the store under `digest`.
    pub(crate) async fn write_from(
        &self,
        digest: &str,
        size: u64,
        mut src: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    ) -> remotecache::Result<()> {
        let mut g = self.ready().await?;
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(4);
        let r#ref = format!("berth-cache-{digest}");
        let (ref2, expected) = (r#ref.clone(), digest.to_string());
        let feeder = tokio::spawn(async move {
            let mut offset = 0u64;
            loop {
                let mut buf = vec![0u8; CHUNK];
                let mut n = 0;
                while n < CHUNK {
                    let k = src.read(&mut buf[n..]).await?;
                    if k == 0 {
                        break;
                    }
                    n += k;
                }
                buf.truncate(n);
                let last = offset + n as u64 >= size || n == 0;
                let msg = WriteContentRequest {
                    action: if last { COMMIT } else { WRITE },
                    r#ref: ref2.clone(),
                    total: size as i64,
                    expected: expected.clone(),
                    offset: offset as i64,
                    data: Bytes::from(buf),
                };
                offset += n as u64;
                if tx.send(msg).await.is_err() || last {
                    return Ok::<u64, std::io::Error>(offset);
                }
            }
        });
        let codec: ProstCodec<WriteContentRequest, WriteContentResponse> = ProstCodec::default();
        let res = g
            .streaming(
                self.request(ReceiverStream::new(rx))?,
                PathAndQuery::from_static(CONTENT_WRITE),
                codec,
            )
            .await;
        let mut stream = match res {
            Ok(r) => r.into_inner(),
            Err(st) if st.code() == tonic::Code::AlreadyExists => {
                feeder.abort();
                return Ok(());
            }
            Err(st) => {
                feeder.abort();
                return Err(self.err(&format!("write {digest}"), &st));
            }
        };
        let mut committed = false;
        while let Some(m) = stream.next().await {
            match m {
                Ok(m) if m.action == COMMIT => {
                    committed = true;
                    break;
                }
                Ok(_) => {}
                Err(st) if st.code() == tonic::Code::AlreadyExists => {
                    committed = true;
                    break;
                }
                Err(st) => {
                    feeder.abort();
                    return Err(self.err(&format!("write {digest}"), &st));
                }
            }
        }
        let sent = feeder
            .await
            .map_err(|e| remotecache::Error::Other(format!("write task: {e}")))?
            .map_err(|e| remotecache::Error::Other(format!("read blob {digest}: {e}")))?;
        if !committed {
            return Err(remotecache::Error::Other(format!(
                "write {digest} in the client's content store {}: no commit after {sent} bytes",
                self.id
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl remotecache::ContentStore for SessionContentStore {
    fn describe(&self) -> String {
        self.id
            .strip_prefix("local:")
            .unwrap_or(&self.id)
            .to_string()
    }

    async fn info(&self, digest: &str) -> remotecache::Result<Option<u64>> {
        let mut g = self.ready().await?;
        let codec: ProstCodec<InfoRequest, InfoResponse> = ProstCodec::default();
        let req = self.request(InfoRequest {
            digest: digest.to_string(),
        })?;
        match g
            .unary(req, PathAndQuery::from_static(CONTENT_INFO), codec)
            .await
        {
            Ok(r) => Ok(r.into_inner().info.map(|i| i.size.max(0) as u64)),
            Err(st) if st.code() == tonic::Code::NotFound => Ok(None),
            Err(st) => Err(self.err(&format!("info {digest}"), &st)),
        }
    }

    async fn write_file(&self, digest: &str, size: u64, path: &Path) -> remotecache::Result<()> {
        let f = tokio::fs::File::open(path)
            .await
            .map_err(|e| remotecache::Error::Other(format!("open {}: {e}", path.display())))?;
        self.write_from(digest, size, f).await
    }

    async fn write_bytes(&self, digest: &str, bytes: Bytes) -> remotecache::Result<()> {
        let size = bytes.len() as u64;
        self.write_from(digest, size, std::io::Cursor::new(bytes.to_vec()))
            .await
    }

    async fn open(&self, digest: &str) -> remotecache::Result<Box<dyn Read + Send>> {
        let mut g = self.ready().await?;
        let codec: ProstCodec<ReadContentRequest, ReadContentResponse> = ProstCodec::default();
        let req = self.request(ReadContentRequest {
            digest: digest.to_string(),
            offset: 0,
            size: 0,
        })?;
        let mut stream = g
            .server_streaming(req, PathAndQuery::from_static(CONTENT_READ), codec)
            .await
            .map_err(|st| self.err(&format!("read {digest}"), &st))?
            .into_inner();
        let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<Bytes>>(8);
        let what = format!("read {digest} from the client's content store {}", self.id);
        tokio::spawn(async move {
            while let Some(m) = stream.next().await {
                let item = m
                    .map(|m| m.data)
                    .map_err(|st| std::io::Error::other(format!("{what}: {}", st.message())));
                let stop = item.is_err();
                let tx2 = tx.clone();
                if tokio::task::spawn_blocking(move || tx2.send(item))
                    .await
                    .map_or(true, |r| r.is_err())
                    || stop
                {
                    return;
                }
            }
        });
        Ok(Box::new(ChannelReader {
            rx,
            cur: Bytes::new(),
        }))
    }
}

/// Chunks from a channel as a blocking reader.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.recv() {
                Ok(Ok(b)) => self.cur = b,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len());
        out[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}
