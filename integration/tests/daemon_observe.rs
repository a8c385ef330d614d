//! Observability (issue #18) through berthd's own surfaces: the `--debugaddr` server's
//! Prometheus metrics follow real builds (executions vs cache hits, bytes Docker already had,
//! local context bytes, build outcomes), `/healthz` and `/debug/state` answer, `--log-format
//! json` writes JSON lines, and a build whose gRPC calls carry a W3C `traceparent` yields
//! OpenTelemetry spans under the client's trace ID, received by a tiny OTLP receiver on
//! 127.0.0.1 (over HTTP/protobuf and over gRPC). Needs root, runc, overlayfs and the system
//! Docker Engine.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration::buildkit_client::{Berthd, BuildOptions, BuildReport, Output};
use integration::{busybox_image, http_get, require_root, unique_name, DockerEngine};
use llb::RunOpts;
use opentelemetry_proto::tonic::collector::trace::v1 as otlp;
use prost::Message as _;
use sha2::Digest as _;

/// One scrape of `/metrics`: series → value.
struct Scrape(Vec<(String, BTreeMap<String, String>, f64)>);

impl Scrape {
    /// Sum of the series of `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    fn labels_of(&self, name: &str) -> Vec<BTreeMap<String, String>> {
        self.0
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, l, _)| l.clone())
            .collect()
    }
}

fn parse_metrics(text: &str) -> Scrape {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("series and value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((n, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let mut m = BTreeMap::new();
                // Values here never contain `",` (bounded label sets).
                for pair in body.split("\",") {
                    let (k, v) = pair.split_once("=\"").expect("label pair");
                    m.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
                (n.to_string(), m)
            }
        };
        out.push((name, labels, value));
    }
    Scrape(out)
}

async fn scrape(addr: &str) -> Scrape {
    let addr = addr.to_string();
    let r = tokio::task::spawn_blocking(move || http_get(&addr, "/metrics"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        r.headers
    );
    parse_metrics(std::str::from_utf8(&r.body).unwrap())
}

/// The debug address berthd reported (it was started with `--debugaddr 127.0.0.1:0`).
fn debug_addr(berthd: &Berthd) -> String {
    let log = berthd.log_text();
    for line in log.lines() {
        if line.contains("debug handlers listening") {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                if let Some(a) = v["address"].as_str() {
                    return a.to_string();
                }
            }
            if let Some(rest) = line.split("address=").nth(1) {
                return rest.split_whitespace().next().unwrap().to_string();
            }
        }
    }
    panic!("no debug address in the log:\n{log}");
}

/// Sizes of the image's layer tars as `docker save` writes them (what Docker would have to be
/// sent if it lacked them).
async fn saved_layer_bytes(engine: &DockerEngine, image: &str) -> (usize, u64) {
    use futures::StreamExt;
    let mut stream = engine.client().export_image(image);
    let mut tar_bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        tar_bytes.extend_from_slice(&chunk.unwrap());
    }
    let mut sizes = HashMap::new();
    let mut manifest = None;
    let mut ar = tar::Archive::new(&tar_bytes[..]);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        if path == "manifest.json" {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut e, &mut s).unwrap();
            manifest = Some(s);
        } else {
            sizes.insert(path, e.header().size().unwrap());
        }
    }
    let m: serde_json::Value = serde_json::from_str(&manifest.expect("manifest.json")).unwrap();
    let layers = m[0]["Layers"].as_array().unwrap();
    let total = layers
        .iter()
        .map(|l| sizes[l.as_str().unwrap()])
        .sum::<u64>();
    (layers.len(), total)
}

/// Of the vertices `def` has, how many the build reported executed and how many cached.
fn vertex_outcomes(report: &BuildReport, def: &protos::pb::Definition) -> (usize, usize) {
    let digests: BTreeSet<String> = def
        .def
        .iter()
        .map(|op| format!("sha256:{}", hex::encode(sha2::Sha256::digest(op))))
        .collect();
    let vs = report.vertices();
    let ours: Vec<_> = vs
        .values()
        .filter(|v| digests.contains(&v.digest))
        .collect();
    assert!(!ours.is_empty(), "no vertex of the definition in {vs:?}");
    for v in &ours {
        assert!(v.completed.is_some() && v.error.is_empty(), "{v:?}");
    }
    let cached = ours.iter().filter(|v| v.cached).count();
    (ours.len() - cached, cached)
}

struct RemoveImage(String);
impl Drop for RemoveImage {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rmi", "-f", &self.0])
            .output();
    }
}

const EXEC: &str = "berth_vertex_executions_total";
const HITS: &str = "berth_vertex_cache_hits_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_real_builds() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let (base_layers, base_bytes) = saved_layer_bytes(&engine, base.reference()).await;
    assert!(base_bytes > 0);

    let berthd = Berthd::start(&["--debugaddr", "127.0.0.1:0", "--log-format", "json"]).unwrap();
    let addr = debug_addr(&berthd);
    let client = berthd.client().await.unwrap();

    let health = {
        let a = addr.clone();
        tokio::task::spawn_blocking(move || http_get(&a, "/healthz"))
            .await
            .unwrap()
            .unwrap()
    };
    assert_eq!((health.status, &health.body[..]), (200, &b"ok\n"[..]));

    let m0 = scrape(&addr).await;
    assert_eq!(m0.sum(EXEC, &[]), 0.0);
    assert_eq!(m0.sum(HITS, &[]), 0.0);

    // 1. A build on a base image Docker has, exported as an image.
    let state = llb::State::from(llb::image(base.reference()))
        .run(RunOpts::shell("echo observed > /made"))
        .root()
        .file(llb::mkfile("/etc/observed", 0o644, "o", Default::default()));
    let def = state.marshal().unwrap();
    let name = format!("{}:1", unique_name("berth-test/observe"));
    let attrs = BTreeMap::from([("name".to_string(), name.clone())]);
    let opts = BuildOptions {
        definition: Some(def.clone()),
        output: Output::Raw("image".into(), attrs),
        ..Default::default()
    };
    let report = client.build(opts.clone()).await.unwrap();
    let resp = report
        .solve
        .as_ref()
        .unwrap_or_else(|e| panic!("solve failed: {e}\n{}", berthd.log_text()));
    let _cleanup = integration::TestImage::adopt(&engine, &name).await.unwrap();
    let _remove = RemoveImage(resp.exporter_response["containerimage.config.digest"].clone());
    let (executed, cached) = vertex_outcomes(&report, &def);
    assert!(executed >= 2, "exec and file ops ran: {executed}");
    let registered: u64 = report
        .vertex_statuses()
        .iter()
        .filter_map(|s| {
            let rest = s.id.split(" registered (").nth(1)?;
            rest.strip_suffix(" bytes)")?.parse::<u64>().ok()
        })
        .sum();
    assert!(registered > 0, "{:?}", report.vertex_statuses());

    let m1 = scrape(&addr).await;
    let d = |name: &str, labels: &[(&str, &str)]| m1.sum(name, labels) - m0.sum(name, labels);
    assert_eq!(d(EXEC, &[]), executed as f64);
    assert_eq!(d(HITS, &[]), cached as f64);
    let build = [("frontend", "client"), ("exporter", "image")];
    assert_eq!(d("berth_builds_started_total", &build), 1.0);
    assert_eq!(d("berth_builds_finished_total", &build), 1.0);
    assert_eq!(d("berth_builds_failed_total", &[]), 0.0);
    // Docker had the base: exactly its bytes were not sent; the new layers were.
    assert_eq!(
        d("berth_export_layer_bytes_skipped_total", &[]),
        base_bytes as f64
    );
    assert_eq!(
        d("berth_export_layers_skipped_total", &[]),
        base_layers as f64
    );
    assert_eq!(
        d("berth_export_layer_bytes_registered_total", &[]),
        registered as f64
    );
    let modes: Vec<_> = m1
        .labels_of("berth_export_layer_bytes_skipped_total")
        .into_iter()
        .map(|l| l["mode"].clone())
        .collect();
    assert!(
        modes
            .iter()
            .all(|m| ["classic-live", "classic-offline", "containerd"].contains(&m.as_str())),
        "{modes:?}"
    );
    assert_eq!(
        d(
            "berth_export_duration_seconds_count",
            &[("exporter", "image")]
        ),
        1.0
    );
    assert_eq!(
        d(
            "berth_solve_duration_seconds_count",
            &[("frontend", "client")]
        ),
        1.0
    );
    assert!(d("berth_docker_api_requests_total", &[("endpoint", "images")]) >= 1.0);

    // 2. The same build again: everything from the cache, nothing executed.
    let report2 = client.build(opts.clone()).await.unwrap();
    report2.solve.as_ref().unwrap();
    let (executed2, cached2) = vertex_outcomes(&report2, &def);
    assert_eq!(executed2, 0);
    let m2 = scrape(&addr).await;
    let d = |name: &str, labels: &[(&str, &str)]| m2.sum(name, labels) - m1.sum(name, labels);
    assert_eq!(d(EXEC, &[]), 0.0);
    assert_eq!(d(HITS, &[]), cached2 as f64);
    assert!(cached2 >= 3, "image, exec and file cached: {cached2}");
    assert_eq!(d("berth_builds_finished_total", &build), 1.0);

    // 3. A failing build counts as failed, with the code the client got.
    let bad = llb::State::from(llb::image(base.reference()))
        .run(RunOpts::shell("exit 3"))
        .root()
        .marshal()
        .unwrap();
    let r3 = client
        .build(BuildOptions {
            definition: Some(bad),
            ..Default::default()
        })
        .await
        .unwrap();
    let err = r3.solve.as_ref().expect_err("exit 3 fails the build");
    let m3 = scrape(&addr).await;
    let d = |name: &str, labels: &[(&str, &str)]| m3.sum(name, labels) - m2.sum(name, labels);
    let code = format!("{:?}", err.code());
    assert_eq!(
        d(
            "berth_builds_failed_total",
            &[("frontend", "client"), ("exporter", "none")]
        ),
        1.0,
        "{code}"
    );
    assert_eq!(d("berth_builds_finished_total", &[]), 0.0);

    // 4. A local context: its file bytes are counted as the client sent them.
    let ctx = berthd.scratch().join("observe-ctx");
    std::fs::create_dir_all(ctx.join("sub")).unwrap();
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(ctx.join("big.bin"), &big).unwrap();
    std::fs::write(ctx.join("sub/small"), b"small").unwrap();
    let local_def = llb::State::from(llb::local("context")).marshal().unwrap();
    let r4 = client
        .build(BuildOptions {
            definition: Some(local_def),
            locals: [("context".to_string(), ctx.clone())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    r4.solve.as_ref().unwrap();
    assert_eq!(r4.file_sync_bytes, 100_005);
    let m4 = scrape(&addr).await;
    assert_eq!(
        m4.sum("berth_local_context_bytes_total", &[])
            - m3.sum("berth_local_context_bytes_total", &[]),
        100_005.0
    );
    assert!(m4.sum("berth_snapshots", &[]) >= 1.0);
    assert_eq!(m4.sum("berth_jobs_running", &[]), 0.0);

    // The debug state is JSON with the tables it promises.
    let st = {
        let a = addr.clone();
        tokio::task::spawn_blocking(move || http_get(&a, "/debug/state"))
            .await
            .unwrap()
            .unwrap()
    };
    assert_eq!(st.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&st.body).unwrap();
    assert!(v["jobs"].is_array() && v["sessions"].is_array(), "{v}");
    assert!(v["snapshots"].as_u64().unwrap() >= 1, "{v}");
    for k in ["pins", "leases", "mounts"] {
        assert!(v[k].is_u64(), "{k} in {v}");
    }

    // --log-format json: every line berthd wrote is a JSON object with a level and a message.
    let log = berthd.log_text();
    let mut lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
        lines += 1;
    }
    assert!(lines >= 3, "{log}");
}

/// Spans received by a test OTLP receiver.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>);

impl Received {
    fn add(&self, req: otlp::ExportTraceServiceRequest) {
        let mut v = self.0.lock().unwrap();
        for rs in req.resource_spans {
            for ss in rs.scope_spans {
                v.extend(ss.spans);
            }
        }
    }
    fn spans(&self) -> Vec<opentelemetry_proto::tonic::trace::v1::Span> {
        self.0.lock().unwrap().clone()
    }
}

/// An OTLP/HTTP receiver on 127.0.0.1: `POST /v1/traces` with a protobuf body.
async fn otlp_http_receiver() -> (String, Received, tokio::task::JoinHandle<()>) {
    use http_body_util::BodyExt as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let got = Received::default();
    let g = got.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let g = g.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let g = g.clone();
                        async move {
                            let ok = req.method() == http::Method::POST
                                && req.uri().path() == "/v1/traces";
                            let body = req.into_body().collect().await?.to_bytes();
                            let status = match otlp::ExportTraceServiceRequest::decode(body) {
                                Ok(m) if ok => {
                                    g.add(m);
                                    200
                                }
                                _ => 400,
                            };
                            let resp = otlp::ExportTraceServiceResponse::default().encode_to_vec();
                            Ok::<_, hyper::Error>(
                                http::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/x-protobuf")
                                    .body(http_body_util::Full::new(bytes::Bytes::from(resp)))
                                    .unwrap(),
                            )
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, got, task)
}

struct GrpcCollector(Received);

#[tonic::async_trait]
impl otlp::trace_service_server::TraceService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<otlp::ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<otlp::ExportTraceServiceResponse>, tonic::Status> {
        self.0.add(request.into_inner());
        Ok(tonic::Response::new(Default::default()))
    }
}

/// An OTLP/gRPC receiver on 127.0.0.1.
async fn otlp_grpc_receiver() -> (String, Received, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let got = Received::default();
    let svc = otlp::trace_service_server::TraceServiceServer::new(GrpcCollector(got.clone()));
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    (addr, got, task)
}

/// An OTLP/gRPC receiver on 127.0.0.1 over TLS with client certificates required, from
/// `certs` (`deploy/tls/make-certs.sh`: a server certificate for localhost).
async fn otlp_grpc_tls_receiver(
    certs: &std::path::Path,
) -> (String, Received, tokio::task::JoinHandle<()>) {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let got = Received::default();
    let svc = otlp::trace_service_server::TraceServiceServer::new(GrpcCollector(got.clone()));
    let read = |f: &str| std::fs::read(certs.join("server").join(f)).unwrap();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(read("cert.pem"), read("key.pem")))
        .client_ca_root(Certificate::from_pem(read("ca.pem")));
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    (addr, got, task)
}

/// Runs a traced build on `base` (the client sends `traceparent`), stops berthd so it flushes
/// its spans, and checks the spans `got` received: the server's spans are in the client's trace,
/// the request spans are children of the client's span, and every other span of the trace hangs
/// off a span of the same trace.
async fn traced_build(berthd: &mut Berthd, base: &str, export: bool, got: &Received) {
    let trace_id: [u8; 16] = rand::random();
    let client_span: [u8; 8] = rand::random();
    let traceparent = format!(
        "00-{}-{}-01",
        hex::encode(trace_id),
        hex::encode(client_span)
    );
    let client = berthd.client().await.unwrap();
    let state = llb::State::from(llb::image(base)).run(RunOpts::shell("echo traced > /t"));
    let def = state.root().marshal().unwrap();
    let name = format!("{}:1", unique_name("berth-test/traced"));
    let output = if export {
        Output::Raw(
            "image".into(),
            BTreeMap::from([("name".to_string(), name.clone())]),
        )
    } else {
        Output::None
    };
    let report = client
        .build(BuildOptions {
            definition: Some(def),
            output,
            metadata: vec![("traceparent".into(), traceparent.clone())],
            ..Default::default()
        })
        .await
        .unwrap();
    let resp = report
        .solve
        .as_ref()
        .unwrap_or_else(|e| panic!("solve failed: {e}\n{}", berthd.log_text()));
    let _remove =
        export.then(|| RemoveImage(resp.exporter_response["containerimage.config.digest"].clone()));
    drop(client);
    // SIGTERM: berthd flushes its span exporter before it exits.
    let st = berthd.terminate(Duration::from_secs(20)).unwrap();
    assert!(st.success(), "{st}\n{}", berthd.log_text());

    let spans = got.spans();
    let ours: Vec<_> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let names: BTreeSet<&str> = ours.iter().map(|s| s.name.as_str()).collect();
    let ids: BTreeSet<&[u8]> = ours.iter().map(|s| &s.span_id[..]).collect();
    for want in [
        "moby.buildkit.v1.Control/Solve",
        "moby.buildkit.v1.frontend.LLBBridge/Solve",
        "solve",
        "/bin/sh -c echo traced > /t",
    ] {
        assert!(
            names.contains(want),
            "no span {want:?} in the client's trace: {names:?}"
        );
    }
    if export {
        for want in ["export", "export.layers", "export.register"] {
            assert!(names.contains(want), "no span {want:?}: {names:?}");
        }
        assert!(
            names.iter().any(|n| n.starts_with("docker POST images")),
            "no Docker API span: {names:?}"
        );
    }
    let solve_req = ours
        .iter()
        .find(|s| s.name == "moby.buildkit.v1.Control/Solve")
        .unwrap();
    assert_eq!(
        solve_req.parent_span_id, client_span,
        "server span continues the client's"
    );
    for s in &ours {
        assert!(
            s.parent_span_id == client_span || ids.contains(&s.parent_span_id[..]),
            "span {:?} hangs off a span outside the trace",
            s.name
        );
    }
    // Spans outside the client's trace come only from calls that carried no context (the
    // session, which this client opens without metadata).
    assert!(
        spans.iter().any(|s| s.name == "session.attach"),
        "no session.attach span: {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_continue_the_clients_trace_over_otlp_http() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let (addr, got, task) = otlp_http_receiver().await;
    let endpoint = format!("http://{addr}/v1/traces");
    let mut berthd = Berthd::start_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ],
    )
    .unwrap();
    traced_build(&mut berthd, base.reference(), true, &got).await;
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_continue_the_clients_trace_over_otlp_grpc() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let (addr, got, task) = otlp_grpc_receiver().await;
    // buildkitd's default protocol is gRPC: only the endpoint is given.
    let endpoint = format!("http://{addr}");
    let mut berthd =
        Berthd::start_with_env(&[], &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)]).unwrap();
    traced_build(&mut berthd, base.reference(), false, &got).await;
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_over_otlp_grpc_with_mutual_tls() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let certs = tempfile::tempdir().unwrap();
    integration::make_certs(certs.path(), &["localhost", "127.0.0.1"]).unwrap();
    let (addr, got, task) = otlp_grpc_tls_receiver(certs.path()).await;
    let port = addr.rsplit_once(':').unwrap().1;
    let endpoint = format!("https://localhost:{port}");
    let client = certs.path().join("client");
    let file = |f: &str| client.join(f).to_str().unwrap().to_string();
    let (ca, cert, key) = (file("ca.pem"), file("cert.pem"), file("key.pem"));
    let mut berthd = Berthd::start_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", &cert),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", &key),
        ],
    )
    .unwrap();
    traced_build(&mut berthd, base.reference(), false, &got).await;
    task.abort();

    // Without the client certificate the collector refuses berthd's spans; over http/protobuf
    // berthd refuses https settings at start instead of dropping spans later.
    let (addr, got, task) = otlp_grpc_tls_receiver(certs.path()).await;
    let port = addr.rsplit_once(':').unwrap().1;
    let endpoint = format!("https://localhost:{port}");
    let mut berthd = Berthd::start_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca),
        ],
    )
    .unwrap();
    let client = berthd.client().await.unwrap();
    let def = llb::State::from(llb::image(base.reference()))
        .run(RunOpts::shell("echo untraced > /t"))
        .root()
        .marshal()
        .unwrap();
    let report = client
        .build(BuildOptions {
            definition: Some(def),
            metadata: vec![(
                "traceparent".into(),
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            )],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(report.solve.is_ok(), "{}", berthd.log_text());
    drop(client);
    let st = berthd.terminate(Duration::from_secs(20)).unwrap();
    assert!(st.success(), "{st}\n{}", berthd.log_text());
    task.abort();
    assert!(
        got.spans().is_empty(),
        "the collector took spans from a client without a certificate"
    );
    let e = match Berthd::start_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ],
    ) {
        Ok(_) => panic!("berthd started with an https http/protobuf endpoint"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("otlp tls: https"), "{e}");
}

/// buildctl's own way of joining a trace: `TRACEPARENT` in its environment (OpenTelemetry's
/// environment carrier, which stock buildctl v0.11.6 reads at start and whose span context its
/// gRPC interceptors send as `traceparent`). berth's buildctl does the same; berthd's spans for
/// the build land under the caller's span. With `BERTH_STOCK_BUILDCTL` naming a stock buildctl
/// binary, that one is checked too (the test says which clients it ran).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buildctl_traceparent_env_is_continued() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let mut clients = vec![(
        "berth's buildctl",
        integration::buildkit_client::buildctl_binary().unwrap(),
    )];
    if let Some(stock) = std::env::var_os("BERTH_STOCK_BUILDCTL") {
        clients.push(("stock buildctl", std::path::PathBuf::from(stock)));
    }
    for (what, bin) in &clients {
        let (addr, got, task) = otlp_http_receiver().await;
        let endpoint = format!("http://{addr}/v1/traces");
        let mut berthd = Berthd::start_with_env(
            &[],
            &[
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &endpoint),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ],
        )
        .unwrap();
        let trace_id: [u8; 16] = rand::random();
        let caller_span: [u8; 8] = rand::random();
        let def = llb::State::from(llb::image(base.reference()))
            .run(RunOpts::shell("echo traced by env > /t"))
            .root()
            .marshal()
            .unwrap()
            .encode_to_vec();
        let mut child = std::process::Command::new(bin)
            .arg("--addr")
            .arg(format!("unix://{}", berthd.socket().display()))
            .args(["build", "--progress", "plain"])
            .env(
                "TRACEPARENT",
                format!(
                    "00-{}-{}-01",
                    hex::encode(trace_id),
                    hex::encode(caller_span)
                ),
            )
            // No exporter of its own: the client only propagates the context.
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_TRACES_EXPORTER")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(&def).unwrap();
        }
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert!(
            out.status.success(),
            "{what} build failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            berthd.log_text()
        );
        let st = berthd.terminate(Duration::from_secs(20)).unwrap();
        assert!(st.success(), "{st}\n{}", berthd.log_text());
        task.abort();
        let spans = got.spans();
        let ours: Vec<_> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
        let names: BTreeSet<&str> = ours.iter().map(|s| s.name.as_str()).collect();
        for want in [
            "moby.buildkit.v1.Control/Solve",
            "solve",
            "/bin/sh -c echo traced by env > /t",
        ] {
            assert!(
                names.contains(want),
                "{what}: no span {want:?} in the TRACEPARENT's trace: {names:?}"
            );
        }
        let solve = ours
            .iter()
            .find(|s| s.name == "moby.buildkit.v1.Control/Solve")
            .unwrap();
        assert_eq!(
            solve.parent_span_id, caller_span,
            "{what}: the Solve request span is not a child of TRACEPARENT's span"
        );
        eprintln!("{what}: {} spans under the TRACEPARENT trace", ours.len());
    }
    eprintln!(
        "checked: {}",
        clients.iter().map(|c| c.0).collect::<Vec<_>>().join(", ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_off_by_default_and_bad_settings_refused() {
    require_root();
    // No --debugaddr: nothing listens besides the gRPC socket; the log says so by omission.
    let berthd = Berthd::start(&[]).unwrap();
    assert!(!berthd.log_text().contains("debug handlers listening"));
    drop(berthd);
    // An unknown log format or OTLP protocol stops berthd at start with buildkitd's wording.
    for (args, env, want) in [
        (
            vec!["--log-format", "xml"],
            vec![],
            "unsupported log type \"xml\"",
        ),
        (
            vec![],
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ],
            "unsupported otlp protocol http/json",
        ),
        (
            vec![],
            vec![("OTEL_TRACES_EXPORTER", "zipkin")],
            "unsupported opentelemetry tracer zipkin",
        ),
    ] {
        let e = match Berthd::start_with_env(&args, &env) {
            Ok(_) => panic!("berthd started with {args:?} {env:?}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(e.contains(want), "{want:?} not in: {e}");
    }
}
