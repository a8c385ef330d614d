//! berthd's Control/LLBBridge surface in the cases BuildKit's own client tests exercise beyond
//! buildctl's flow: direct solves of empty definitions, warnings with source locations, error
//! details.

use integration::buildkit_client::{new_id, Berthd};
use integration::require_root;
use protos::moby::buildkit::v1 as control;
use std::time::Duration;

/// `client.Solve(llb.Scratch())`: the definition is present but has no ops. buildkitd solves it
/// to the empty result at once; it must not wait for LLBBridge calls that never come.
#[tokio::test(flavor = "multi_thread")]
async fn solve_of_an_empty_definition_returns() {
    require_root();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let build_ref = new_id();
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        c.control().solve(control::SolveRequest {
            r#ref: build_ref.clone(),
            definition: Some(Default::default()),
            ..Default::default()
        }),
    )
    .await
    .expect("Solve of an empty definition must not hang");
    let r = r.unwrap().into_inner();
    assert!(r.exporter_response.is_empty(), "{r:?}");
}

/// A build asking for an entitlement the daemon does not grant (`insecure-entitlements`) fails
/// before anything runs, with buildkitd's wording (TestSecurityModeErrors); unknown ones too.
/// Granted by the daemon, the same request runs.
#[tokio::test(flavor = "multi_thread")]
async fn solve_refuses_entitlements_the_daemon_does_not_grant() {
    require_root();
    let def = llb::scratch()
        .file(llb::mkfile("/f", 0o600, "x", Default::default()))
        .marshal()
        .unwrap();
    let solve = |c: &integration::buildkit_client::BuildkitClient, ent: &str| {
        let mut control = c.control();
        let req = control::SolveRequest {
            r#ref: new_id(),
            definition: Some(def.clone()),
            entitlements: vec![ent.to_string()],
            ..Default::default()
        };
        async move { control.solve(req).await }
    };
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    for (ent, want) in [
        (
            "security.insecure",
            "granting entitlement security.insecure is not allowed by build daemon configuration",
        ),
        (
            "network.host",
            "granting entitlement network.host is not allowed by build daemon configuration",
        ),
        ("bogus", "unknown entitlement bogus"),
    ] {
        let err = solve(&c, ent).await.expect_err(ent);
        assert!(err.message().contains(want), "{ent}: {err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("buildkitd.toml");
    std::fs::write(&cfg, "insecure-entitlements = [\"security.insecure\"]\n").unwrap();
    let d = Berthd::start(&["--config", cfg.to_str().unwrap()]).unwrap();
    let c = d.client().await.unwrap();
    solve(&c, "security.insecure").await.unwrap();
}

/// A forwarder build driven by hand: Control.Solve and Status run while the caller talks to the
/// gateway; returns the Solve answer and every status message after the caller's `Return`.
struct GatewayBuild {
    build_ref: String,
    session: integration::buildkit_client::SessionHandle,
    solve: tokio::task::JoinHandle<Result<control::SolveResponse, tonic::Status>>,
    status: tokio::task::JoinHandle<Vec<control::StatusResponse>>,
}

impl GatewayBuild {
    async fn start(c: &integration::buildkit_client::BuildkitClient) -> Self {
        let session = c
            .open_session(integration::buildkit_client::Attachables::default())
            .await
            .unwrap();
        let build_ref = new_id();
        let mut ctl = c.control();
        let (br, sid) = (build_ref.clone(), session.id.clone());
        let solve = tokio::spawn(async move {
            ctl.solve(control::SolveRequest {
                r#ref: br,
                session: sid,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
        });
        let mut ctl = c.control();
        let br = build_ref.clone();
        let status = tokio::spawn(async move {
            let mut s = ctl
                .status(control::StatusRequest { r#ref: br })
                .await
                .unwrap()
                .into_inner();
            let mut out = Vec::new();
            while let Some(m) = s.message().await.unwrap() {
                out.push(m);
            }
            out
        });
        GatewayBuild {
            build_ref,
            session,
            solve,
            status,
        }
    }

    fn req<T>(&self, m: T) -> tonic::Request<T> {
        integration::buildkit_client::with_build_id(m, &self.build_ref)
    }

    async fn finish(
        mut self,
        c: &integration::buildkit_client::BuildkitClient,
        ret: protos::moby::buildkit::v1::frontend::ReturnRequest,
    ) -> (
        Result<control::SolveResponse, tonic::Status>,
        Vec<control::StatusResponse>,
    ) {
        c.gateway().r#return(self.req(ret)).await.unwrap();
        let solve = tokio::time::timeout(Duration::from_secs(30), self.solve)
            .await
            .expect("Solve answers after Return")
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(10), self.status)
            .await
            .expect("Status ends")
            .unwrap();
        assert!(self.session.close(Duration::from_secs(5)).await);
        (solve, status)
    }
}

/// `LLBBridge.Warn` with a source location reaches Status with that location (upstream's
/// testWarnings dereferences `SourceInfo` and `Range`).
#[tokio::test(flavor = "multi_thread")]
async fn warnings_keep_source_info_and_ranges() {
    use protos::moby::buildkit::v1::frontend as gw;
    require_root();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let b = GatewayBuild::start(&c).await;
    let def = llb::scratch()
        .file(llb::mkfile("/dummy", 0o600, "foo", Default::default()))
        .marshal()
        .unwrap();
    // the file op is the definition's first op; its digest is what Go's client computes
    let dgst = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&def.def[0]))
    );
    let res = c
        .gateway()
        .solve(b.req(gw::SolveRequest {
            definition: Some(def),
            allow_result_return: true,
            allow_result_array_ref: true,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let range = protos::pb::Range {
        start: Some(protos::pb::Position {
            line: 2,
            character: 0,
        }),
        end: Some(protos::pb::Position {
            line: 4,
            character: 0,
        }),
    };
    c.gateway()
        .warn(b.req(gw::WarnRequest {
            digest: dgst.clone(),
            level: 3,
            short: "this is warning".into(),
            detail: vec!["this is detail".into(), "and more detail".into()],
            url: "https://example.com".into(),
            info: Some(protos::pb::SourceInfo {
                filename: "mydockerfile".into(),
                data: "filedata".into(),
                ..Default::default()
            }),
            ranges: vec![range],
        }))
        .await
        .unwrap();
    let (solve, status) = b
        .finish(
            &c,
            gw::ReturnRequest {
                result: res.result,
                error: None,
            },
        )
        .await;
    solve.unwrap();
    let warnings: Vec<_> = status.iter().flat_map(|s| s.warnings.clone()).collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let w = &warnings[0];
    assert_eq!(w.vertex, dgst);
    assert_eq!(&w.short[..], b"this is warning");
    assert_eq!(w.detail.len(), 2);
    assert_eq!(w.url, "https://example.com");
    assert_eq!(w.level, 3);
    let info = w.info.as_ref().expect("source info kept");
    assert_eq!(info.filename, "mydockerfile");
    assert_eq!(&info.data[..], b"filedata");
    assert_eq!(w.ranges, vec![range]);
    let vertices: std::collections::BTreeSet<String> = status
        .iter()
        .flat_map(|s| s.vertexes.iter().map(|v| v.digest.clone()))
        .collect();
    assert_eq!(vertices.len(), 1, "{vertices:?}");
    assert!(vertices.contains(&dgst));
}

fn details_of(st: &tonic::Status) -> Vec<prost_types::Any> {
    use prost::Message as _;
    protos::google::rpc::Status::decode(st.details())
        .map(|s| s.details)
        .unwrap_or_default()
}

/// A failing vertex's error carries `errdefs.Vertex` and one `errdefs.Source` per source
/// location of that vertex (last location first, as buildkitd serializes its wrappers), with
/// the source's own definition when the frontend gave one; a client's `Return` with such an
/// error hands its details on to `Control.Solve`.
#[tokio::test(flavor = "multi_thread")]
async fn failing_vertex_errors_carry_vertex_and_source_details() {
    use protos::details::JsonDetail;
    use protos::moby::buildkit::v1::frontend as gw;
    use protos::pb;
    require_root();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    // mkdir foo/bar fails: /foo does not exist
    let mut def = llb::scratch()
        .file(llb::mkdir("foo/bar", 0o600, Default::default()))
        .marshal()
        .unwrap();
    let dgst = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&def.def[0]))
    );
    let src_def = llb::scratch()
        .file(llb::mkfile("foo", 0o600, "data", Default::default()))
        .marshal()
        .unwrap();
    let range = |line: i32, ch: i32| pb::Range {
        start: Some(pb::Position {
            line,
            character: ch,
        }),
        end: Some(pb::Position {
            line,
            character: ch,
        }),
    };
    def.source = Some(pb::Source {
        locations: [(
            dgst.clone(),
            pb::Locations {
                locations: vec![
                    pb::Location {
                        source_index: 0,
                        ranges: vec![range(7, 0)],
                    },
                    pb::Location {
                        source_index: 1,
                        ranges: vec![range(8, 1)],
                    },
                ],
            },
        )]
        .into(),
        infos: vec![
            pb::SourceInfo {
                filename: "foo".into(),
                data: "data1".into(),
                ..Default::default()
            },
            pb::SourceInfo {
                filename: "bar".into(),
                data: "bardata".into(),
                definition: Some(src_def.clone()),
                ..Default::default()
            },
        ],
    });

    let check = |details: &[prost_types::Any]| {
        let sources: Vec<protos::errdefs::Source> = details
            .iter()
            .filter_map(|a| protos::errdefs::Source::from_any(a).ok())
            .collect();
        assert_eq!(sources.len(), 2, "{details:?}");
        // last location first on the wire
        let s0 = sources[0].info.as_ref().unwrap();
        assert_eq!(s0.filename, "bar");
        assert_eq!(s0.definition.as_ref().unwrap().def, src_def.def);
        assert_eq!(sources[0].ranges, vec![range(8, 1)]);
        let s1 = sources[1].info.as_ref().unwrap();
        assert_eq!(s1.filename, "foo");
        assert_eq!(&s1.data[..], b"data1");
        assert!(s1.definition.is_none());
        let vertex: Vec<_> = details
            .iter()
            .filter_map(|a| protos::errdefs::Vertex::from_any(a).ok())
            .collect();
        assert_eq!(vertex.len(), 1, "{details:?}");
        assert_eq!(vertex[0].digest, dgst);
    };

    // direct Control.Solve
    let e = c
        .control()
        .solve(control::SolveRequest {
            r#ref: new_id(),
            definition: Some(def.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    check(&details_of(&e));
    assert!(
        !e.message().contains("mkdir foo/bar:"),
        "no vertex-name prefix: {e:?}"
    );

    // LLBBridge.Solve, then the client returns that error (as Go's gateway client does)
    let b = GatewayBuild::start(&c).await;
    let ge = c
        .gateway()
        .solve(b.req(gw::SolveRequest {
            definition: Some(def),
            evaluate: true,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    let gd = details_of(&ge);
    check(&gd);
    let (solve, _) = b
        .finish(
            &c,
            gw::ReturnRequest {
                result: None,
                error: Some(protos::google::rpc::Status {
                    code: ge.code() as i32,
                    message: ge.message().to_string(),
                    details: gd,
                }),
            },
        )
        .await;
    let se = solve.unwrap_err();
    check(&details_of(&se));

    // the history record keeps the details too
    let recs = c
        .control()
        .listen_build_history(control::BuildHistoryRequest {
            early_exit: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    use futures::StreamExt;
    let recs: Vec<_> = recs.map(|r| r.unwrap()).collect().await;
    assert_eq!(recs.len(), 2);
    for r in recs {
        check(&r.record.unwrap().error.unwrap().details);
    }
}
