//! Daemon addresses and connections.
//!
//! Addresses are stock buildctl's: `unix:///path`, `tcp://host:port` (TLS when a CA, certificate or
//! `--tlsdir` is given, as buildctl does) and `docker-container://NAME[?context=CTX]`, which runs
//! `docker [--context CTX] exec -i NAME buildctl dial-stdio` and speaks gRPC over its pipes (the
//! connection helper buildx uses for the remote driver).

use anyhow::{bail, Context};
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// gRPC message size limit (stock buildctl: 16 MiB each way).
pub const MAX_MESSAGE: usize = 16 << 20;

/// W3C trace context from the environment (`TRACEPARENT`, `TRACESTATE`), read once.
///
/// Stock buildctl v0.11.6 starts from a context carrying the span of `TRACEPARENT` (OpenTelemetry's
/// environment carrier; its gRPC interceptors then send `traceparent`/`tracestate` on every call,
/// so buildkitd's spans continue the caller's trace); berth's buildctl sends the same values as
/// gRPC metadata. A malformed `TRACEPARENT` is ignored, as OpenTelemetry's propagator ignores it.
fn env_trace_context() -> &'static [(
    &'static str,
    tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
)] {
    static CTX: std::sync::OnceLock<
        Vec<(
            &'static str,
            tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
        )>,
    > = std::sync::OnceLock::new();
    CTX.get_or_init(|| {
        let Some(parent) = std::env::var("TRACEPARENT")
            .ok()
            .filter(|p| valid_traceparent(p))
        else {
            return vec![];
        };
        let mut v = vec![];
        if let Ok(p) = parent.parse() {
            v.push(("traceparent", p));
            if let Some(Ok(st)) = std::env::var("TRACESTATE")
                .ok()
                .filter(|s| !s.is_empty())
                .map(|s| s.parse())
            {
                v.push(("tracestate", st));
            }
        }
        v
    })
}

/// `version-traceid-spanid-flags` with lowercase hex fields of 2, 32, 16 and 2 digits, version
/// not `ff`, ids not all zero (W3C Trace Context).
fn valid_traceparent(s: &str) -> bool {
    let parts: Vec<&str> = s.trim().split('-').collect();
    let hex = |p: &str, n: usize| {
        p.len() == n
            && p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() >= 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
        && (parts[0] != "00" || parts.len() == 4)
}

/// A tonic interceptor adding the environment's trace context ([`env_trace_context`]) to a
/// request: every client of this crate is made with it.
pub fn trace_context(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    for (k, v) in env_trace_context() {
        req.metadata_mut().insert(*k, v.clone());
    }
    Ok(req)
}

/// A channel whose requests carry [`trace_context`].
pub type TracedChannel = tonic::service::interceptor::InterceptedService<
    Channel,
    fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
>;

/// Wraps `channel` so its requests carry the environment's trace context.
pub fn traced(channel: Channel) -> TracedChannel {
    tonic::service::interceptor::InterceptedService::new(channel, trace_context as fn(_) -> _)
}

/// A byte stream to the daemon.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Target {
    addr: Addr,
    tls: Option<Tls>,
    timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
enum Addr {
    Unix(PathBuf),
    Tcp {
        host: String,
        port: u16,
    },
    DockerContainer {
        name: String,
        context: Option<String>,
    },
}

/// TLS flags as given (`--tlsservername`, `--tlscacert`, `--tlscert`, `--tlskey`, `--tlsdir`).
#[derive(Debug, Clone, Default)]
pub struct TlsFlags {
    /// `--tlsservername`.
    pub server_name: Option<String>,
    /// `--tlscacert`.
    pub ca: Option<PathBuf>,
    /// `--tlscert`.
    pub cert: Option<PathBuf>,
    /// `--tlskey`.
    pub key: Option<PathBuf>,
    /// `--tlsdir` (`ca.pem`, `cert.pem`, `key.pem`).
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Clone)]
struct Tls {
    server_name: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

fn parse_addr(addr: &str) -> anyhow::Result<Addr> {
    let Some((scheme, rest)) = addr.split_once("://") else {
        bail!("invalid address {addr}");
    };
    match scheme {
        "unix" if !rest.is_empty() => Ok(Addr::Unix(PathBuf::from(rest))),
        "tcp" => {
            let (host, port) = rest
                .trim_end_matches('/')
                .rsplit_once(':')
                .with_context(|| format!("invalid address {addr}: want tcp://host:port"))?;
            let port = port
                .parse()
                .with_context(|| format!("invalid port in address {addr}"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            Ok(Addr::Tcp {
                host: host.to_string(),
                port,
            })
        }
        "docker-container" => {
            let (name, query) = match rest.split_once('?') {
                Some((n, q)) => (n.trim_end_matches('/'), Some(q)),
                None => (rest.trim_end_matches('/'), None),
            };
            if name.is_empty() {
                bail!("url lacks container name");
            }
            let context = query
                .into_iter()
                .flat_map(|q| q.split('&'))
                .find_map(|kv| kv.strip_prefix("context="))
                .filter(|c| !c.is_empty())
                .map(str::to_string);
            Ok(Addr::DockerContainer {
                name: name.to_string(),
                context,
            })
        }
        _ => bail!("invalid address {addr}: want unix://, tcp:// or docker-container://"),
    }
}

impl Target {
    /// From buildctl's global flags; `timeout` bounds connecting.
    pub fn new(addr: &str, flags: &TlsFlags, timeout: Duration) -> anyhow::Result<Target> {
        let parsed = parse_addr(addr)?;
        let mut ca = flags.ca.clone();
        let mut cert = flags.cert.clone();
        let mut key = flags.key.clone();
        if let Some(dir) = &flags.dir {
            // buildctl's --tlsdir: ca.pem, cert.pem and key.pem, explicit flags win.
            ca = ca.or_else(|| Some(dir.join("ca.pem")));
            cert = cert.or_else(|| Some(dir.join("cert.pem")));
            key = key.or_else(|| Some(dir.join("key.pem")));
        }
        if cert.is_some() != key.is_some() {
            bail!("--tlscert and --tlskey must be given together");
        }
        let tls = (ca.is_some() || cert.is_some()).then(|| Tls {
            server_name: flags.server_name.clone(),
            ca,
            cert,
            key,
        });
        if tls.is_some() && !matches!(parsed, Addr::Tcp { .. }) {
            bail!("TLS flags apply to tcp:// addresses only, not {addr}");
        }
        Ok(Target {
            addr: parsed,
            tls,
            timeout: timeout.max(Duration::from_secs(1)),
        })
    }

    /// A plain byte stream to the daemon (dial-stdio; no TLS).
    pub async fn raw_stream(&self) -> anyhow::Result<Box<dyn Stream>> {
        if self.tls.is_some() {
            bail!("dial-stdio does not speak TLS; give a unix:// address");
        }
        tokio::time::timeout(self.timeout, dial(self.addr.clone()))
            .await
            .map_err(|_| anyhow::anyhow!("connect to {}: timed out", self.describe()))?
    }

    fn describe(&self) -> String {
        match &self.addr {
            Addr::Unix(p) => format!("unix://{}", p.display()),
            Addr::Tcp { host, port } => format!("tcp://{host}:{port}"),
            Addr::DockerContainer { name, .. } => format!("docker-container://{name}"),
        }
    }

    /// A gRPC channel to the daemon.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        let what = self.describe();
        let channel = match (&self.addr, &self.tls) {
            (Addr::Tcp { host, port }, Some(tls)) => {
                let mut cfg = ClientTlsConfig::new()
                    .domain_name(tls.server_name.clone().unwrap_or_else(|| host.clone()));
                if let Some(ca) = &tls.ca {
                    let pem = std::fs::read(ca).with_context(|| {
                        format!("could not read ca certificate {}", ca.display())
                    })?;
                    cfg = cfg.ca_certificate(Certificate::from_pem(pem));
                }
                if let (Some(c), Some(k)) = (&tls.cert, &tls.key) {
                    let cert = std::fs::read(c)
                        .with_context(|| format!("could not read certificate {}", c.display()))?;
                    let key = std::fs::read(k)
                        .with_context(|| format!("could not read key {}", k.display()))?;
                    cfg = cfg.identity(Identity::from_pem(cert, key));
                }
                Endpoint::from_shared(format!("https://{}", host_port(host, *port)))?
                    .tls_config(cfg)
                    .context("configure TLS")?
                    .connect_timeout(self.timeout)
                    .connect()
                    .await
            }
            (Addr::Tcp { host, port }, None) => {
                Endpoint::from_shared(format!("http://{}", host_port(host, *port)))?
                    .connect_timeout(self.timeout)
                    .connect()
                    .await
            }
            (addr, _) => {
                let addr = addr.clone();
                Endpoint::from_static("http://localhost")
                    .connect_timeout(self.timeout)
                    .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                        let addr = addr.clone();
                        async move {
                            dial(addr)
                                .await
                                .map(hyper_util::rt::TokioIo::new)
                                .map_err(|e| std::io::Error::other(format!("{e:#}")))
                        }
                    }))
                    .await
            }
        };
        channel.with_context(|| format!("connect to buildkitd at {what}"))
    }
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

async fn dial(addr: Addr) -> anyhow::Result<Box<dyn Stream>> {
    match addr {
        Addr::Unix(p) => Ok(Box::new(
            tokio::net::UnixStream::connect(&p)
                .await
                .with_context(|| format!("connect to unix://{}", p.display()))?,
        )),
        Addr::Tcp { host, port } => Ok(Box::new(
            tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .with_context(|| format!("connect to tcp://{}", host_port(&host, port)))?,
        )),
        Addr::DockerContainer { name, context } => {
            let mut cmd = tokio::process::Command::new("docker");
            if let Some(c) = &context {
                cmd.arg(format!("--context={c}"));
            }
            cmd.args(["exec", "-i", &name, "buildctl", "dial-stdio"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::inherit())
                .kill_on_drop(true);
            let mut child = cmd
                .spawn()
                .context("run docker exec (is the docker CLI on PATH?)")?;
            let stdin = child.stdin.take().context("docker exec stdin")?;
            let stdout = child.stdout.take().context("docker exec stdout")?;
            Ok(Box::new(CommandConn {
                _child: child,
                stdin,
                stdout,
            }))
        }
    }
}

/// A connection over a child process's stdin and stdout; the child is killed when dropped.
struct CommandConn {
    _child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::process::ChildStdout,
}

impl AsyncRead for CommandConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stdout).poll_read(cx, buf)
    }
}

impl AsyncWrite for CommandConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stdin).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stdin).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stdin).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_validation() {
        assert!(valid_traceparent(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        ));
        assert!(!valid_traceparent(
            "00-00000000000000000000000000000000-b7ad6b7169203331-01"
        ));
        assert!(!valid_traceparent(
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01"
        ));
        assert!(!valid_traceparent(
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01"
        ));
        assert!(!valid_traceparent("garbage"));
        assert!(!valid_traceparent(
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        ));
    }

    #[test]
    fn parses_stock_addresses() {
        let cases: &[(&str, Option<Addr>)] = &[
            (
                "unix:///run/buildkit/buildkitd.sock",
                Some(Addr::Unix("/run/buildkit/buildkitd.sock".into())),
            ),
            (
                "tcp://127.0.0.1:1234",
                Some(Addr::Tcp {
                    host: "127.0.0.1".into(),
                    port: 1234,
                }),
            ),
            (
                "tcp://[::1]:1234",
                Some(Addr::Tcp {
                    host: "::1".into(),
                    port: 1234,
                }),
            ),
            (
                "docker-container://berthd",
                Some(Addr::DockerContainer {
                    name: "berthd".into(),
                    context: None,
                }),
            ),
            (
                "docker-container://berthd?context=remote",
                Some(Addr::DockerContainer {
                    name: "berthd".into(),
                    context: Some("remote".into()),
                }),
            ),
            ("docker-container://", None),
            ("tcp://host", None),
            ("tcp://host:port", None),
            ("/run/buildkit/buildkitd.sock", None),
            ("ssh://host", None),
            ("unix://", None),
        ];
        for (input, want) in cases {
            match (parse_addr(input), want) {
                (Ok(got), Some(want)) => assert_eq!(&got, want, "{input}"),
                (Err(_), None) => {}
                (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
            }
        }
    }

    fn target(addr: &str, f: &TlsFlags) -> anyhow::Result<Target> {
        Target::new(addr, f, Duration::from_secs(5))
    }

    #[test]
    fn tls_flags() {
        let f = TlsFlags {
            dir: Some("/certs".into()),
            cert: Some("/other/cert.pem".into()),
            ..Default::default()
        };
        let t = target("tcp://h:1", &f).unwrap();
        let tls = t.tls.unwrap();
        assert_eq!(tls.ca, Some("/certs/ca.pem".into()));
        assert_eq!(tls.cert, Some("/other/cert.pem".into()));
        assert_eq!(tls.key, Some("/certs/key.pem".into()));

        let f = TlsFlags {
            cert: Some("/c".into()),
            ..Default::default()
        };
        assert!(target("tcp://h:1", &f).is_err(), "cert without key");
        let f = TlsFlags {
            ca: Some("/ca".into()),
            ..Default::default()
        };
        assert!(target("unix:///s", &f).is_err(), "TLS on a unix socket");
        assert!(target("tcp://h:1", &TlsFlags::default())
            .unwrap()
            .tls
            .is_none());
    }
}
