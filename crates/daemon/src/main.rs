//! berthd: BuildKit-compatible build daemon on Docker's image store.
//!
//! Wiring only: parse flags and `buildkitd.toml`, open the state directory and layer store, bind
//! the listeners and serve `moby.buildkit.v1.Control` and `LLBBridge` on each until SIGTERM or
//! SIGINT, then cancel running builds, close sessions and remove the unix sockets.

use anyhow::Context;
use clap::Parser;
use daemon::{cli, config, control, docker, gateway, jobs, listener, session, solver, workers};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// gRPC message size limit in both directions (buildctl allows 16 MiB; accept more).
const MAX_MESSAGE: usize = 64 << 20;

fn main() -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    if cli.version {
        let name = cli::program_name(std::env::args_os().next().as_deref());
        println!("{name} {} {} {}", cli::PACKAGE, cli::VERSION, cli::REVISION);
        return Ok(());
    }
    if cli.daemon.rootless == Some(true) {
        anyhow::bail!(
            "--rootless is not supported: berthd runs as root (it mounts overlayfs and runs runc)"
        );
    }
    if let Some(cmd) = &cli.command {
        let addr = cli
            .daemon
            .addr
            .first()
            .cloned()
            .unwrap_or_else(|| config::DEFAULT_ADDR.to_string());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        return match cmd {
            cli::Command::Debug { what } => match what.first().map(String::as_str) {
                Some("workers") => rt.block_on(debug_workers(&addr)),
                _ => anyhow::bail!("usage: berthd [--addr ADDR] debug workers"),
            },
            cli::Command::DialStdio => rt.block_on(dial_stdio(&addr)),
        };
    }
    let cfg = config::load(&cli.daemon)?;
    let filter = if cli.daemon.trace {
        "trace"
    } else if cfg.debug {
        "debug,h2=info,hyper=info,tower=info,tonic=info"
    } else {
        "info"
    };
    let log_filter = std::env::var("BERTHD_LOG").unwrap_or_else(|_| filter.to_string());
    let ignored = cli.daemon.ignored_flags();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start tokio runtime")?;
    rt.block_on(async {
        // Inside the runtime: the OTLP exporters run on it.
        let telemetry = telemetry::init(&telemetry::Options {
            log_format: cfg.log_format,
            log_filter,
            // `BERTHD_LOG_SPANS=1`: a line with busy/idle time per closed span (debugging aid).
            log_span_close: std::env::var_os("BERTHD_LOG_SPANS").is_some_and(|v| v == "1"),
            metrics: cfg.debug_address.is_some(),
            service_name: "berthd".into(),
            service_version: cli::VERSION.into(),
        })?;
        for flag in ignored {
            tracing::warn!(
                "{flag} is accepted for compatibility with buildkitd and has no effect in berthd"
            );
        }
        let r = run(cfg, &telemetry).await;
        telemetry.shutdown();
        r
    })
}

async fn run(cfg: config::Config, telemetry: &telemetry::Telemetry) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.root)
        .with_context(|| format!("create root {}", cfg.root.display()))?;
    let worker_id = workers::load_or_create_id(&cfg.root)?;
    let record = workers::record(&cfg, &worker_id);
    tracing::info!(
        root = %cfg.root.display(),
        worker = %worker_id,
        registries = ?cfg.registries.keys().collect::<Vec<_>>(),
        insecure_entitlements = ?cfg.insecure_entitlements,
        "starting berthd {} {}",
        cli::VERSION,
        cli::REVISION
    );
    metrics::gauge!(telemetry::metrics::BUILD_INFO, "version" => cli::VERSION, "revision" => cli::REVISION).set(1.0);
    let sessions = session::SessionManager::new();
    let backend = solver::Backend::open(
        &cfg.root,
        sessions.clone(),
        solver::BackendOptions {
            docker_host: cfg.docker_host.clone(),
            allowed_entitlements: cfg.insecure_entitlements.clone(),
            max_parallelism: cfg.max_parallelism,
            docker_data_root: cfg.docker_data_root.clone(),
            registry: registry::Registry::new(registry::Hosts::new(cfg.registries.clone())),
            containerd: cfg.containerd.clone(),
            client_export: daemon::export_client::ClientExportOptions {
                docker_thin: cfg.docker_thin,
            },
        },
    )?;
    daemon::export_image::recover_at_start(
        &backend.image_export,
        &backend.store,
        &cfg.root.join("worker"),
    )
    .await;
    let jobs = jobs::Jobs::new();
    let history = daemon::history::History::open(&cfg.root, cfg.history)?;
    history.spawn_gc();
    let docker = Arc::new(docker::Docker::new(
        cfg.docker_host.clone(),
        cfg.docker_data_root.clone(),
        cfg.containerd.clone(),
    ));
    let control = Arc::new(control::Control {
        jobs: jobs.clone(),
        sessions: sessions.clone(),
        backend: backend.clone(),
        worker: record.clone(),
        history: history.clone(),
        docker: docker.clone(),
    });
    let gateway = Arc::new(gateway::Gateway {
        scope: None,
        jobs: jobs.clone(),
        backend: backend.clone(),
        worker: record,
        docker,
    });

    let tls = match (&cfg.tls.cert, &cfg.tls.key) {
        (Some(c), Some(k)) => {
            let id =
                tonic::transport::Identity::from_pem(config::read_file(c)?, config::read_file(k)?);
            let mut t = tonic::transport::ServerTlsConfig::new().identity(id);
            if let Some(ca) = &cfg.tls.ca {
                t = t.client_ca_root(tonic::transport::Certificate::from_pem(config::read_file(
                    ca,
                )?));
            }
            Some(t)
        }
        (None, None) => None,
        _ => anyhow::bail!("--tlscert and --tlskey must be given together"),
    };

    let shutdown = CancellationToken::new();
    let mut servers = tokio::task::JoinSet::new();
    if let Some(addr) = &cfg.debug_address {
        let state = Arc::new(daemon::observe::State {
            jobs: jobs.clone(),
            sessions: sessions.clone(),
            store: backend.store.clone(),
        });
        let server =
            telemetry::debug::DebugServer::bind(addr, telemetry.metrics().cloned(), state).await?;
        tracing::info!(address = %server.local_addr()?, "debug handlers listening");
        let stop = shutdown.clone();
        tokio::spawn(server.serve(stop.cancelled_owned()));
    }
    let mut sockets = Vec::new();
    for addr in &cfg.addrs {
        let l = listener::bind(addr, cfg.group.as_deref()).await?;
        tracing::info!(address = %l.describe(), "listening");
        let control_svc =
            protos::moby::buildkit::v1::control_server::ControlServer::from_arc(control.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
        let gateway_svc =
            protos::moby::buildkit::v1::frontend::llb_bridge_server::LlbBridgeServer::from_arc(
                gateway.clone(),
            )
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let mut builder = tonic::transport::Server::builder()
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(8 << 20)
            .max_frame_size(1 << 20);
        if let Some(f) = telemetry.grpc_trace_fn() {
            builder = builder.trace_fn(f);
        }
        let stop = shutdown.clone();
        match l {
            listener::Listener::Unix(u, path) => {
                sockets.push(path);
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(u);
                let router = builder.add_service(control_svc).add_service(gateway_svc);
                servers.spawn(async move {
                    router
                        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                        .await
                });
            }
            listener::Listener::Tcp(t, _) => {
                if let Some(tls) = &tls {
                    builder = builder.tls_config(tls.clone()).context("configure TLS")?;
                }
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(t);
                let router = builder.add_service(control_svc).add_service(gateway_svc);
                servers.spawn(async move {
                    router
                        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                        .await
                });
            }
        }
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("install SIGINT handler")?;
    let failed = tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); None }
        _ = int.recv() => { tracing::info!("SIGINT: shutting down"); None }
        r = servers.join_next() => Some(r),
    };
    jobs.cancel_all("berthd is shutting down");
    history.close_listeners();
    sessions.close_all();
    shutdown.cancel();
    // Give builds a moment to report cancellation, then stop waiting for open streams.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while servers.join_next().await.is_some() {}
    })
    .await;
    daemon::export_image::remove_pins_at_stop(
        &backend.image_export,
        &backend.store,
        &cfg.root.join("worker"),
    )
    .await;
    for s in &sockets {
        let _ = std::fs::remove_file(s);
    }
    if let Some(Some(r)) = failed {
        r.context("server task")?.context("serve")?;
    }
    tracing::info!("berthd stopped");
    Ok(())
}

async fn connect(addr: &str) -> anyhow::Result<Box<dyn AsyncStream>> {
    if let Some(p) = addr.strip_prefix("unix://") {
        Ok(Box::new(
            tokio::net::UnixStream::connect(p)
                .await
                .with_context(|| format!("connect to {addr}"))?,
        ))
    } else if let Some(hp) = addr.strip_prefix("tcp://") {
        Ok(Box::new(
            tokio::net::TcpStream::connect(hp)
                .await
                .with_context(|| format!("connect to {addr}"))?,
        ))
    } else {
        anyhow::bail!("unsupported address {addr:?}")
    }
}

trait AsyncStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AsyncStream for T {}

/// `berthd debug workers`: the daemon's worker table, like `buildctl debug workers`.
async fn debug_workers(addr: &str) -> anyhow::Result<()> {
    let addr = addr.to_string();
    let channel = tonic::transport::Endpoint::try_from("http://localhost")?
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let addr = addr.clone();
            async move {
                connect(&addr)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
                    .map_err(|e| std::io::Error::other(format!("{e:#}")))
            }
        }))
        .await
        .context("connect to berthd")?;
    let mut c = protos::moby::buildkit::v1::control_client::ControlClient::new(channel);
    let r = c
        .list_workers(protos::moby::buildkit::v1::ListWorkersRequest::default())
        .await
        .context("ListWorkers")?
        .into_inner();
    println!("ID\tPLATFORMS");
    for w in r.record {
        let plats: Vec<String> = w
            .platforms
            .iter()
            .map(|p| {
                if p.variant.is_empty() {
                    format!("{}/{}", p.os, p.architecture)
                } else {
                    format!("{}/{}/{}", p.os, p.architecture, p.variant)
                }
            })
            .collect();
        println!("{}\t{}", w.id, plats.join(","));
    }
    Ok(())
}

/// `berthd dial-stdio`: proxies stdin/stdout to the daemon socket (for `buildx` over ssh).
async fn dial_stdio(addr: &str) -> anyhow::Result<()> {
    let s = connect(addr).await?;
    let (mut r, mut w) = tokio::io::split(s);
    let up = async {
        tokio::io::copy(&mut tokio::io::stdin(), &mut w).await?;
        tokio::io::AsyncWriteExt::shutdown(&mut w).await
    };
    let down = async {
        tokio::io::copy(&mut r, &mut tokio::io::stdout()).await?;
        tokio::io::AsyncWriteExt::flush(&mut tokio::io::stdout()).await
    };
    let (a, b) = tokio::join!(up, down);
    a.context("copy stdin to the daemon")?;
    b.context("copy the daemon to stdout")?;
    Ok(())
}
