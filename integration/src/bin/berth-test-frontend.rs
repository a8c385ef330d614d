//! A minimal `gateway.v0` frontend for berth's tests: a gRPC client of `LLBBridge` over its own
//! stdin/stdout, as BuildKit's `grpcclient` is. The `daemon_gateway_frontend` test puts it
//! (with the shared libraries it needs) into an image and builds with
//! `--frontend gateway.v0 --opt source=<image>` and through a Dockerfile's `# syntax=` line.
//!
//! Behaviour, chosen by frontend options (read from `BUILDKIT_FRONTEND_OPT_<i>=<key>=<value>`):
//! * default: `Ping`; `Solve` the client's local `dockerfile` directory and `ReadFile` the
//!   Dockerfile (option `filename`, default `Dockerfile`) from it; then `Solve` a definition
//!   with one `FileOp` making `/hello` whose content is the value of option `message`, what the
//!   process saw of its environment (`BUILDKIT_SESSION_ID` set, `BUILDKIT_WORKERS` entries, its
//!   own `frontend.bin` present, `BUILDKIT_EXPORTEDPRODUCT`) and the Dockerfile's text; `ReadFile`
//!   `/hello` back from that result and check it; `Return` the ref with metadata
//!   `frontend.test=ok`;
//! * `attest-predicate=<type>`: also `Solve` a file `/predicate.json` (`{"frontend":"berth-test"}`)
//!   and return it as an in-toto attestation of that predicate type for the host platform
//!   (`linux/<arch>`), as a frontend's own SBOM would be returned;
//! * `fail=<text>`: `Return` an error with that message (code Unknown);
//! * `exit=<n>`: write a line to stderr and exit with code n without returning.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prost::Message as _;
use protos::moby::buildkit::v1::frontend as gw;
use protos::pb;

fn opts() -> BTreeMap<String, String> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("BUILDKIT_FRONTEND_OPT_"))
        .filter_map(|(_, v)| {
            v.split_once('=')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect()
}

/// A definition of `op` alone (its output 0 is the result).
fn definition(op: pb::Op) -> pb::Definition {
    let ob = op.encode_to_vec();
    let dg = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&ob))
    );
    let term = pb::Op {
        inputs: vec![pb::Input {
            digest: dg,
            index: 0,
        }],
        ..Default::default()
    };
    pb::Definition {
        def: vec![ob.into(), term.encode_to_vec().into()],
        ..Default::default()
    }
}

/// The client's local directory `name` of session `session`.
fn local_def(name: &str, session: &str) -> pb::Definition {
    definition(pb::Op {
        op: Some(pb::op::Op::Source(pb::SourceOp {
            identifier: format!("local://{name}"),
            attrs: [
                ("local.session".to_string(), session.to_string()),
                ("local.sharedkeyhint".to_string(), name.to_string()),
            ]
            .into_iter()
            .collect(),
        })),
        ..Default::default()
    })
}

fn mkfile_def(path: &str, data: &[u8]) -> pb::Definition {
    use pb::file_action::Action;
    definition(pb::Op {
        op: Some(pb::op::Op::File(pb::FileOp {
            actions: vec![pb::FileAction {
                input: -1,
                secondary_input: -1,
                output: 0,
                action: Some(Action::Mkfile(pb::FileActionMkFile {
                    path: path.into(),
                    mode: 0o644,
                    data: data.to_vec().into(),
                    timestamp: -1,
                    ..Default::default()
                })),
            }],
        })),
        ..Default::default()
    })
}

/// The ref id of a solve response's single result.
fn ref_id(res: gw::SolveResponse) -> anyhow::Result<String> {
    match res.result.and_then(|r| r.result) {
        Some(gw::result::Result::Ref(r)) => Ok(r.id),
        Some(gw::result::Result::RefDeprecated(id)) => Ok(id),
        other => anyhow::bail!("unexpected solve result {other:?}"),
    }
}

/// Runs the frontend and exits with its outcome. The exit is explicit: tokio reads stdin on a
/// blocking thread that a runtime shutdown would wait for until the daemon closes the pipe.
fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match runtime.block_on(run()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("berth-test-frontend: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

async fn run() -> anyhow::Result<()> {
    let opts = opts();
    if let Some(code) = opts.get("exit") {
        eprintln!("berth-test-frontend: exiting with code {code} as asked");
        std::process::exit(code.parse().unwrap_or(1));
    }
    let stdio = Mutex::new(Some(tokio::io::join(
        tokio::io::stdin(),
        tokio::io::stdout(),
    )));
    let stdio = std::sync::Arc::new(stdio);
    let channel = tonic::transport::Endpoint::try_from("http://localhost")?
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let conn = stdio.lock().unwrap().take();
            async move {
                let conn = conn.ok_or_else(|| std::io::Error::other("stdio already used"))?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(conn))
            }
        }))
        .await?;
    let mut g = gw::llb_bridge_client::LlbBridgeClient::new(channel);
    let pong = g.ping(gw::PingRequest {}).await?.into_inner();
    anyhow::ensure!(
        pong.frontend_api_caps.iter().any(|c| c.id == "solve.base"),
        "no solve.base cap"
    );
    if let Some(msg) = opts.get("fail") {
        g.r#return(gw::ReturnRequest {
            error: Some(protos::google::rpc::Status {
                code: tonic::Code::Unknown as i32,
                message: msg.clone(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await?;
        return Ok(());
    }
    let session = std::env::var("BUILDKIT_SESSION_ID").unwrap_or_default();
    let workers: serde_json::Value =
        serde_json::from_str(&std::env::var("BUILDKIT_WORKERS").unwrap_or_default())
            .unwrap_or_default();
    let frontend_bin = std::fs::metadata("/run/config/buildkit/metadata/frontend.bin")
        .map(|m| m.len() > 0)
        .unwrap_or(false);
    let filename = opts
        .get("filename")
        .cloned()
        .unwrap_or_else(|| "Dockerfile".into());
    let local = g
        .solve(gw::SolveRequest {
            definition: Some(local_def("dockerfile", &session)),
            allow_result_return: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let dockerfile = g
        .read_file(gw::ReadFileRequest {
            r#ref: ref_id(local)?,
            file_path: filename,
            ..Default::default()
        })
        .await?
        .into_inner()
        .data;
    let content = format!(
        "{} session={} workers={} frontend.bin={} product={}\n{}",
        opts.get("message").map(String::as_str).unwrap_or(""),
        !session.is_empty(),
        workers.as_array().map(|a| a.len()).unwrap_or(0),
        frontend_bin,
        std::env::var("BUILDKIT_EXPORTEDPRODUCT").unwrap_or_default(),
        String::from_utf8_lossy(&dockerfile),
    );
    let res = g
        .solve(gw::SolveRequest {
            definition: Some(mkfile_def("/hello", content.as_bytes())),
            allow_result_return: true,
            allow_result_array_ref: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut result = res.result.clone().unwrap_or_default();
    let back = g
        .read_file(gw::ReadFileRequest {
            r#ref: ref_id(res)?,
            file_path: "/hello".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .data;
    anyhow::ensure!(
        back == content.as_bytes(),
        "ReadFile of /hello returned {back:?}"
    );
    result
        .metadata
        .insert("frontend.test".into(), bytes::Bytes::from_static(b"ok"));
    if let Some(predicate_type) = opts.get("attest-predicate") {
        let res = g
            .solve(gw::SolveRequest {
                definition: Some(mkfile_def(
                    "/predicate.json",
                    br#"{"frontend":"berth-test"}"#,
                )),
                allow_result_return: true,
                ..Default::default()
            })
            .await?
            .into_inner();
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            a => a,
        };
        result.attestations.insert(
            format!("linux/{arch}"),
            gw::Attestations {
                attestation: vec![gw::Attestation {
                    kind: gw::AttestationKind::InToto as i32,
                    r#ref: Some(gw::Ref {
                        id: ref_id(res)?,
                        def: None,
                    }),
                    path: "/predicate.json".into(),
                    in_toto_predicate_type: predicate_type.clone(),
                    ..Default::default()
                }],
            },
        );
    }
    g.r#return(gw::ReturnRequest {
        result: Some(result),
        ..Default::default()
    })
    .await?;
    Ok(())
}
