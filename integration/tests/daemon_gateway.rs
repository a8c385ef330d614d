//! berthd's LLBBridge beyond buildctl's plain flow (ResolveImageConfig from Docker's store,
//! result file access), and buildkitd's own test-harness command line.

use integration::buildkit_client::{new_id, with_build_id, Attachables, Berthd};
use integration::{busybox_image, require_root, DockerEngine};
use prost::Message;
use protos::moby::buildkit::v1 as control;
use protos::moby::buildkit::v1::frontend as gw;
use protos::pb::{self, file_action::Action, op::Op as OpKind};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn resolve_image_config_and_result_file_access() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let image = busybox_image(&engine).await.unwrap();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let mut session = c.open_session(Attachables::default()).await.unwrap();
    let build_ref = new_id();
    let mut ctl = c.control();
    let sid = session.id.clone();
    let br = build_ref.clone();
    let solve = tokio::spawn(async move {
        ctl.solve(control::SolveRequest {
            r#ref: br,
            session: sid,
            ..Default::default()
        })
        .await
    });
    let mut g = c.gateway();
    let r = g
        .resolve_image_config(with_build_id(
            gw::ResolveImageConfigRequest {
                r#ref: image.reference().to_string(),
                log_name: format!("[internal] load metadata for {}", image.reference()),
                ..Default::default()
            },
            &build_ref,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(r.digest.starts_with("sha256:"), "{}", r.digest);
    let cfg: serde_json::Value = serde_json::from_slice(&r.config).unwrap();
    assert_eq!(cfg["rootfs"]["type"], "layers", "{cfg}");
    assert!(cfg["architecture"].is_string());
    let missing = g
        .resolve_image_config(with_build_id(
            gw::ResolveImageConfigRequest {
                r#ref: "berth.test/does-not-exist:nope".into(),
                ..Default::default()
            },
            &build_ref,
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");

    // a result's files are readable through ReadFile/ReadDir/StatFile, inside the result only
    let op = pb::Op {
        op: Some(OpKind::File(pb::FileOp {
            actions: vec![pb::FileAction {
                input: -1,
                secondary_input: -1,
                output: 0,
                action: Some(Action::Mkfile(pb::FileActionMkFile {
                    path: "/hello.txt".into(),
                    mode: 0o644,
                    data: "0123456789".into(),
                    timestamp: -1,
                    ..Default::default()
                })),
            }],
        })),
        ..Default::default()
    };
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
    let def = pb::Definition {
        def: vec![ob.into(), term.encode_to_vec().into()],
        ..Default::default()
    };
    let res = g
        .solve(with_build_id(
            gw::SolveRequest {
                definition: Some(def),
                allow_result_return: true,
                allow_result_array_ref: true,
                ..Default::default()
            },
            &build_ref,
        ))
        .await
        .unwrap()
        .into_inner();
    let Some(gw::result::Result::Ref(rf)) = res.result.and_then(|r| r.result) else {
        panic!("expected a ref result");
    };
    let data = g
        .read_file(with_build_id(
            gw::ReadFileRequest {
                r#ref: rf.id.clone(),
                file_path: "/hello.txt".into(),
                range: Some(gw::FileRange {
                    offset: 2,
                    length: 3,
                }),
                ..Default::default()
            },
            &build_ref,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&data.data[..], b"234");
    let esc = g
        .read_file(with_build_id(
            gw::ReadFileRequest {
                r#ref: rf.id.clone(),
                file_path: "../../../../etc/passwd".into(),
                ..Default::default()
            },
            &build_ref,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        esc.code(),
        tonic::Code::NotFound,
        "path must stay inside the result: {esc:?}"
    );
    let dir = g
        .read_dir(with_build_id(
            gw::ReadDirRequest {
                r#ref: rf.id.clone(),
                dir_path: "/".into(),
                ..Default::default()
            },
            &build_ref,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dir.entries.len(), 1);
    assert_eq!(dir.entries[0].path, "hello.txt");
    assert_eq!(dir.entries[0].size, 10);
    let st = g
        .stat_file(with_build_id(
            gw::StatFileRequest {
                r#ref: rf.id.clone(),
                path: "hello.txt".into(),
                ..Default::default()
            },
            &build_ref,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.stat.unwrap().mode, 0o644);

    // end the build with an empty result
    g.r#return(with_build_id(gw::ReturnRequest::default(), &build_ref))
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), solve)
        .await
        .unwrap()
        .unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert!(session.close(Duration::from_secs(5)).await);
    drop(image);
}

/// `Solve` without `Evaluate` only registers the definition: a step that would fail does not run
/// (the call succeeds), the first use of the ref runs it (and fails), and a ref never used is
/// never run. With `Evaluate` the same definition fails at `Solve`.
#[tokio::test(flavor = "multi_thread")]
async fn solve_without_evaluate_is_lazy() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let image = busybox_image(&engine).await.unwrap();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let mut session = c.open_session(Attachables::default()).await.unwrap();
    let build_ref = new_id();
    let mut ctl = c.control();
    let sid = session.id.clone();
    let br = build_ref.clone();
    let solve = tokio::spawn(async move {
        ctl.solve(control::SolveRequest {
            r#ref: br,
            session: sid,
            ..Default::default()
        })
        .await
    });
    let failing = |marker: &str| {
        llb::State::from(llb::image(image.reference()))
            .run(llb::RunOpts::shell(format!("echo {marker}; exit 3")))
            .root()
            .marshal()
            .unwrap()
    };
    let mut g = c.gateway();
    let gw_solve = |def: pb::Definition, evaluate: bool| gw::SolveRequest {
        definition: Some(def),
        evaluate,
        allow_result_return: true,
        allow_result_array_ref: true,
        ..Default::default()
    };
    let unused_marker = format!("never-run-{}", new_id());
    let unused = g
        .solve(with_build_id(
            gw_solve(failing(&unused_marker), false),
            &build_ref,
        ))
        .await;
    assert!(unused.is_ok(), "lazy solve ran the step: {unused:?}");
    let used_marker = format!("run-on-use-{}", new_id());
    let res = g
        .solve(with_build_id(
            gw_solve(failing(&used_marker), false),
            &build_ref,
        ))
        .await
        .unwrap()
        .into_inner();
    let Some(gw::result::Result::Ref(rf)) = res.result.and_then(|r| r.result) else {
        panic!("expected a ref result");
    };
    let err = g
        .stat_file(with_build_id(
            gw::StatFileRequest {
                r#ref: rf.id.clone(),
                path: "/".into(),
                ..Default::default()
            },
            &build_ref,
        ))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("exit code: 3"),
        "the first use runs the step: {err:?}"
    );
    let err = g
        .solve(with_build_id(
            gw_solve(failing(&format!("eager-{}", new_id())), true),
            &build_ref,
        ))
        .await
        .unwrap_err();
    assert!(err.message().contains("exit code: 3"), "{err:?}");

    g.r#return(with_build_id(gw::ReturnRequest::default(), &build_ref))
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(30), solve)
        .await
        .unwrap()
        .unwrap();
    assert!(r.is_ok(), "{r:?}");
    // The build's progress (replayed by Status after the end) names every step that ran: the
    // used ref's exec is there, the unused one's is not.
    let mut status = c
        .control()
        .status(control::StatusRequest {
            r#ref: build_ref.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut names = Vec::new();
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(10), status.message())
        .await
        .unwrap()
        .unwrap()
    {
        names.extend(msg.vertexes.into_iter().map(|v| v.name));
    }
    assert!(names.iter().any(|n| n.contains(&used_marker)), "{names:?}");
    assert!(
        !names.iter().any(|n| n.contains(&unused_marker)),
        "a ref that was never used ran: {names:?}"
    );
    assert!(session.close(Duration::from_secs(5)).await);
    drop(image);
}

/// A frontend that solves without `Evaluate`, warns on the step and returns the ref (upstream
/// TestWarnings' shape; `# syntax=` frontends work so): the step runs at `Return`, and the
/// build's Status shows its vertex and the warning, the warning not before the vertex.
#[tokio::test(flavor = "multi_thread")]
async fn lazily_solved_step_shows_its_vertex_and_warning_in_status() {
    require_root();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let mut session = c.open_session(Attachables::default()).await.unwrap();
    let build_ref = new_id();
    let mut ctl = c.control();
    let sid = session.id.clone();
    let br = build_ref.clone();
    let solve = tokio::spawn(async move {
        ctl.solve(control::SolveRequest {
            r#ref: br,
            session: sid,
            ..Default::default()
        })
        .await
    });
    let mut g = c.gateway();
    // unique content, so the step is not one an earlier build left in the cache
    let mkfile = mkfile_op("/dummy", &new_id());
    let vertex = op_digest(&mkfile);
    let res = g
        .solve(with_build_id(
            gw::SolveRequest {
                definition: Some(definition_of(vec![mkfile])),
                allow_result_return: true,
                ..Default::default()
            },
            &build_ref,
        ))
        .await
        .unwrap()
        .into_inner();
    let Some(gw::result::Result::Ref(rf)) = res.result.and_then(|r| r.result) else {
        panic!("expected a ref result");
    };
    g.warn(with_build_id(
        gw::WarnRequest {
            digest: vertex.clone(),
            level: 3,
            short: "this is warning".into(),
            detail: vec!["this is detail".into()],
            url: "https://example.com".into(),
            info: Some(pb::SourceInfo {
                filename: "mydockerfile".into(),
                data: "filedata".into(),
                ..Default::default()
            }),
            ranges: vec![pb::Range {
                start: Some(pb::Position {
                    line: 2,
                    character: 0,
                }),
                end: Some(pb::Position {
                    line: 4,
                    character: 0,
                }),
            }],
        },
        &build_ref,
    ))
    .await
    .unwrap();
    g.r#return(with_build_id(
        gw::ReturnRequest {
            result: Some(gw::Result {
                result: Some(gw::result::Result::Ref(rf)),
                ..Default::default()
            }),
            ..Default::default()
        },
        &build_ref,
    ))
    .await
    .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(30), solve)
        .await
        .unwrap()
        .unwrap();
    assert!(r.is_ok(), "{r:?}");
    let mut status = c
        .control()
        .status(control::StatusRequest {
            r#ref: build_ref.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut msgs = Vec::new();
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(10), status.message())
        .await
        .unwrap()
        .unwrap()
    {
        msgs.push(msg);
    }
    let first_vertex = msgs
        .iter()
        .position(|m| m.vertexes.iter().any(|v| v.digest == vertex))
        .unwrap_or_else(|| panic!("the step's vertex is not in Status: {msgs:?}"));
    let ran = msgs
        .iter()
        .flat_map(|m| m.vertexes.iter())
        .rfind(|v| v.digest == vertex)
        .unwrap();
    assert!(
        ran.completed.is_some() && ran.error.is_empty() && !ran.cached,
        "{ran:?}"
    );
    let warnings: Vec<_> = msgs
        .iter()
        .enumerate()
        .flat_map(|(i, m)| m.warnings.iter().map(move |w| (i, w)))
        .collect();
    assert_eq!(warnings.len(), 1, "{msgs:?}");
    let (at, w) = warnings[0];
    assert!(
        at >= first_vertex,
        "warning sent before its vertex: {msgs:?}"
    );
    assert_eq!(w.vertex, vertex);
    assert_eq!(&w.short[..], b"this is warning");
    assert_eq!(w.level, 3);
    assert_eq!(w.url, "https://example.com");
    assert_eq!(w.detail.len(), 1);
    assert_eq!(w.info.as_ref().unwrap().filename, "mydockerfile");
    assert_eq!(w.ranges.len(), 1);
    assert_eq!(w.ranges[0].start.as_ref().unwrap().line, 2);
    assert!(session.close(Duration::from_secs(5)).await);
}

/// The `errdefs.Solve` detail of a gateway call's error.
fn solve_detail(err: &tonic::Status) -> protos::errdefs::Solve {
    let st = protos::google::rpc::Status::decode(err.details()).unwrap();
    st.details
        .iter()
        .find_map(|d| protos::details::solve_from_any(d).ok())
        .unwrap_or_else(|| panic!("no errdefs.Solve detail in {err:?}"))
}

/// A failed gateway solve carries buildkitd's `errdefs.Solve` detail: the failing exec op, and
/// per mount its input and its state as the process left it, as refs of the build (readable like
/// any result). A selected read-only mount whose selector is missing fails its content checksum
/// before the step runs: subject `cache`, the input it failed on, no mounts. A failed file op
/// names the failed action (subject `file`) and has one state per action.
#[tokio::test(flavor = "multi_thread")]
async fn failed_solve_hands_out_the_failed_states() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let image = busybox_image(&engine).await.unwrap();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let mut session = c.open_session(Attachables::default()).await.unwrap();
    let build_ref = new_id();
    let mut ctl = c.control();
    let sid = session.id.clone();
    let br = build_ref.clone();
    let solve = tokio::spawn(async move {
        ctl.solve(control::SolveRequest {
            r#ref: br,
            session: sid,
            ..Default::default()
        })
        .await
    });
    let mut g = c.gateway();
    let evaluate = |def: pb::Definition| gw::SolveRequest {
        definition: Some(def),
        evaluate: true,
        ..Default::default()
    };
    let read = |id: &str, path: &str| gw::ReadFileRequest {
        r#ref: id.to_string(),
        file_path: path.to_string(),
        ..Default::default()
    };
    let marker = new_id();

    // An exec that writes into its root and a writable scratch mount, then fails.
    let st = llb::State::from(llb::image(image.reference()))
        .run(
            llb::RunOpts::shell(format!(
                "echo {marker} > /data && echo {marker} > /rw/data && exit 3"
            ))
            .mount(llb::Mount::bind("/rw", &llb::scratch())),
        )
        .root();
    let err = g
        .solve(with_build_id(evaluate(st.marshal().unwrap()), &build_ref))
        .await
        .unwrap_err();
    assert!(err.message().contains("exit code: 3"), "{err:?}");
    let se = solve_detail(&err);
    let Some(OpKind::Exec(exec)) = se.op.as_ref().and_then(|o| o.op.clone()) else {
        panic!("the detail names the exec op: {se:?}");
    };
    assert_eq!(exec.mounts.len(), 2);
    assert_eq!(se.input_i_ds.len(), 2, "{se:?}");
    assert_eq!(se.mount_i_ds.len(), 2, "{se:?}");
    assert!(!se.input_i_ds[0].is_empty(), "the root has an input");
    assert!(se.input_i_ds[1].is_empty(), "scratch is no input");
    assert!(se.subject.is_none());
    for (i, path) in [(0, "/data"), (1, "/data")] {
        let data = g
            .read_file(with_build_id(read(&se.mount_i_ds[i], path), &build_ref))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(String::from_utf8_lossy(&data.data).trim(), marker);
    }
    // The input is the state before the run.
    let before = g
        .read_file(with_build_id(read(&se.input_i_ds[0], "/data"), &build_ref))
        .await
        .unwrap_err();
    assert_eq!(before.code(), tonic::Code::NotFound, "{before:?}");

    // The content checksum of a missing selector.
    let input = llb::scratch().file(llb::mkdir("/found", 0o700, Default::default()).mkfile(
        "/found/data",
        0o600,
        marker.clone(),
        Default::default(),
    ));
    let st = llb::State::from(llb::image(image.reference()))
        .run(
            llb::RunOpts::shell("echo never").mount(
                llb::Mount::bind("/src", &input)
                    .selector("/notfound")
                    .readonly(),
            ),
        )
        .root();
    let err = g
        .solve(with_build_id(evaluate(st.marshal().unwrap()), &build_ref))
        .await
        .unwrap_err();
    let se = solve_detail(&err);
    assert!(matches!(
        se.op.as_ref().and_then(|o| o.op.as_ref()),
        Some(OpKind::Exec(_))
    ));
    assert!(
        matches!(se.subject, Some(protos::errdefs::solve::Subject::Cache(_))),
        "{se:?}"
    );
    assert_eq!(se.input_i_ds.len(), 1, "{se:?}");
    assert!(se.mount_i_ds.is_empty(), "{se:?}");
    let data = g
        .read_file(with_build_id(
            read(&se.input_i_ds[0], "/found/data"),
            &build_ref,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(String::from_utf8_lossy(&data.data), marker);

    // A file op whose third action fails: subject `file` with that index, no op inputs, one
    // state per action; the failed action's state has what the earlier actions made.
    let st = llb::scratch().file(
        llb::mkdir("/found", 0o700, Default::default())
            .mkfile("/found/foo", 0o600, marker.clone(), Default::default())
            .mkfile("/notfound/foo", 0o600, marker.clone(), Default::default()),
    );
    let err = g
        .solve(with_build_id(evaluate(st.marshal().unwrap()), &build_ref))
        .await
        .unwrap_err();
    let se = solve_detail(&err);
    let Some(OpKind::File(file)) = se.op.as_ref().and_then(|o| o.op.clone()) else {
        panic!("the detail names the file op: {se:?}");
    };
    let Some(protos::errdefs::solve::Subject::File(fa)) = se.subject else {
        panic!("subject file: {se:?}");
    };
    assert_eq!(fa.index, 2);
    assert!(matches!(
        file.actions[2].action,
        Some(pb::file_action::Action::Mkfile(_))
    ));
    assert!(se.input_i_ds.is_empty(), "{se:?}");
    assert_eq!(se.mount_i_ds.len(), 3, "{se:?}");
    let data = g
        .read_file(with_build_id(
            read(&se.mount_i_ds[2], "/found/foo"),
            &build_ref,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(String::from_utf8_lossy(&data.data), marker);

    g.r#return(with_build_id(gw::ReturnRequest::default(), &build_ref))
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(30), solve)
        .await
        .unwrap()
        .unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert!(session.close(Duration::from_secs(5)).await);
    drop(image);
}

#[tokio::test(flavor = "multi_thread")]
async fn accepts_buildkitd_harness_command_line_and_config() {
    require_root();
    let cfgdir = tempfile::tempdir().unwrap();
    let cfg = cfgdir.path().join("buildkitd.toml");
    std::fs::write(
        &cfg,
        "insecure-entitlements = [\"network.host\", \"security.insecure\"]\n[registry.\"docker.io\"]\nmirrors = [\"127.0.0.1:5000\"]\n",
    )
    .unwrap();
    let cfg_arg = format!("--config={}", cfg.display());
    let d = Berthd::start(&[
        "--oci-worker=true",
        "--containerd-worker=false",
        "--oci-worker-gc=false",
        "--oci-worker-labels=org.mobyproject.buildkit.worker.sandbox=true",
        &cfg_arg,
    ])
    .unwrap();
    let c = d.client().await.unwrap();
    let w = c
        .control()
        .list_workers(control::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        w.record[0].labels["org.mobyproject.buildkit.worker.sandbox"],
        "true"
    );
    assert!(
        w.record[0].gc_policy.is_empty(),
        "--oci-worker-gc=false means no GC policy"
    );
    assert!(
        d.log_text().contains("docker.io"),
        "registry config is loaded: {}",
        d.log_text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn control_solve_with_a_definition_and_local_output() {
    require_root();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let out = d.scratch().join("out");
    let mut session = c
        .open_session(Attachables {
            output: integration::buildkit_client::Output::Local(out.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let op = pb::Op {
        op: Some(OpKind::File(pb::FileOp {
            actions: vec![pb::FileAction {
                input: -1,
                secondary_input: -1,
                output: 0,
                action: Some(Action::Mkdir(pb::FileActionMkDir {
                    path: "/made/by/direct".into(),
                    mode: 0o700,
                    make_parents: true,
                    timestamp: -1,
                    ..Default::default()
                })),
            }],
        })),
        ..Default::default()
    };
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
    let def = pb::Definition {
        def: vec![ob.into(), term.encode_to_vec().into()],
        ..Default::default()
    };
    // buildx-style: the definition goes straight into Control.Solve, no LLBBridge calls
    #[allow(deprecated)]
    let r = c
        .control()
        .solve(control::SolveRequest {
            r#ref: new_id(),
            session: session.id.clone(),
            definition: Some(def.clone()),
            exporter_deprecated: "local".into(),
            ..Default::default()
        })
        .await;
    assert!(r.is_ok(), "{r:?}\n{}", d.log_text());
    let md = std::fs::metadata(out.join("made/by/direct")).unwrap();
    assert!(md.is_dir());
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o777,
        0o700
    );
    // both a definition and a frontend: InvalidArgument; the dockerfile frontend without a
    // session cannot load the Dockerfile
    for (frontend, code) in [("dockerfile.v0", tonic::Code::InvalidArgument)] {
        let e = c
            .control()
            .solve(control::SolveRequest {
                r#ref: new_id(),
                definition: Some(def.clone()),
                frontend: frontend.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
    }
    let e = c
        .control()
        .solve(control::SolveRequest {
            r#ref: new_id(),
            frontend: "dockerfile.v0".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        e.message().contains("failed to resolve dockerfile"),
        "{e:?}"
    );
    assert!(session.close(Duration::from_secs(5)).await);
}

#[test]
fn version_and_debug_workers_subcommand() {
    require_root();
    let bin = integration::buildkit_client::berthd_binary().unwrap();
    let out = std::process::Command::new(&bin)
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let fields: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(fields.len(), 4, "{text:?}");
    assert_eq!(fields[0], "berthd");
    assert_eq!(fields[1], "github.com/berth-build/berth");
    assert!(fields[2].starts_with('v'));
    let d = Berthd::start(&[]).unwrap();
    let out = std::process::Command::new(&bin)
        .arg("--addr")
        .arg(format!("unix://{}", d.socket().display()))
        .args(["debug", "workers"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("ID\tPLATFORMS\n"), "{text}");
    assert!(text.contains("linux/"), "{text}");
}

/// A digest of an encoded op, as LLB names it.
fn op_digest(b: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b))
    )
}

/// A definition whose last op is `op` (encoded), its terminal op pointing at it.
fn definition_of(ops: Vec<Vec<u8>>) -> pb::Definition {
    let last = op_digest(ops.last().unwrap());
    let term = pb::Op {
        inputs: vec![pb::Input {
            digest: last,
            index: 0,
        }],
        ..Default::default()
    };
    let mut def: Vec<bytes::Bytes> = ops.into_iter().map(Into::into).collect();
    def.push(term.encode_to_vec().into());
    pb::Definition {
        def,
        ..Default::default()
    }
}

/// `reference.output`: a gateway `Solve` of a definition answers its ref with that definition,
/// so a client (`Ref.ToState`) builds on it in a second `Solve`; `Evaluate` accepts the ref.
/// Go's LLB client sends one source-map entry per op, empty ones included; berth leaves out the
/// empty ones, which Go would decode as nil and dereference.
#[tokio::test(flavor = "multi_thread")]
async fn solve_returns_definitions_that_later_solves_build_on() {
    require_root();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let mut session = c.open_session(Attachables::default()).await.unwrap();
    let build_ref = new_id();
    let mut ctl = c.control();
    let sid = session.id.clone();
    let br = build_ref.clone();
    let solve = tokio::spawn(async move {
        ctl.solve(control::SolveRequest {
            r#ref: br,
            session: sid,
            ..Default::default()
        })
        .await
    });
    let mut g = c.gateway();
    let caps = g
        .ping(with_build_id(gw::PingRequest {}, &build_ref))
        .await
        .unwrap()
        .into_inner()
        .frontend_api_caps;
    for cap in ["reference.output", "gateway.evaluate"] {
        assert!(caps.iter().any(|c| c.id == cap && c.enabled), "{cap}");
    }

    let mkfile = pb::Op {
        op: Some(OpKind::File(pb::FileOp {
            actions: vec![pb::FileAction {
                input: -1,
                secondary_input: -1,
                output: 0,
                action: Some(Action::Mkfile(pb::FileActionMkFile {
                    path: "/foo".into(),
                    mode: 0o600,
                    data: "data".into(),
                    timestamp: -1,
                    ..Default::default()
                })),
            }],
        })),
        ..Default::default()
    }
    .encode_to_vec();
    let mut def = definition_of(vec![mkfile.clone()]);
    let located = pb::Locations {
        locations: vec![pb::Location {
            source_index: 0,
            ranges: vec![pb::Range::default()],
        }],
    };
    def.source = Some(pb::Source {
        infos: vec![pb::SourceInfo {
            filename: "Dockerfile".into(),
            data: "FROM scratch".into(),
            ..Default::default()
        }],
        locations: [
            (op_digest(&mkfile), located.clone()),
            (op_digest(&def.def[1]), pb::Locations::default()),
        ]
        .into_iter()
        .collect(),
    });
    let res = g
        .solve(with_build_id(
            gw::SolveRequest {
                definition: Some(def.clone()),
                allow_result_return: true,
                allow_result_array_ref: true,
                ..Default::default()
            },
            &build_ref,
        ))
        .await
        .unwrap()
        .into_inner();
    let Some(gw::result::Result::Ref(rf)) = res.result.and_then(|r| r.result) else {
        panic!("expected a ref result");
    };
    let out = rf.def.expect("Solve returns the ref's definition");
    assert_eq!(out.def, def.def, "the same ops, in order");
    let src = out.source.expect("source maps kept");
    assert_eq!(src.infos, def.source.as_ref().unwrap().infos);
    assert_eq!(
        src.locations.into_iter().collect::<Vec<_>>(),
        vec![(op_digest(&mkfile), located)],
        "only the entries with locations"
    );
    g.evaluate(with_build_id(
        gw::EvaluateRequest {
            r#ref: rf.id.clone(),
        },
        &build_ref,
    ))
    .await
    .unwrap();
    let e = g
        .evaluate(with_build_id(
            gw::EvaluateRequest {
                r#ref: "nosuchref".into(),
            },
            &build_ref,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");

    // build on the returned definition: copy /foo of its output to /foo2 on scratch
    let prev_last = out.def[out.def.len() - 2].to_vec();
    let copy = pb::Op {
        inputs: vec![pb::Input {
            digest: op_digest(&prev_last),
            index: 0,
        }],
        op: Some(OpKind::File(pb::FileOp {
            actions: vec![pb::FileAction {
                input: -1,
                secondary_input: 0,
                output: 0,
                action: Some(Action::Copy(pb::FileActionCopy {
                    src: "/foo".into(),
                    dest: "/foo2".into(),
                    mode: -1,
                    timestamp: -1,
                    ..Default::default()
                })),
            }],
        })),
        ..Default::default()
    }
    .encode_to_vec();
    let def2 = definition_of(vec![prev_last, copy]);
    let res = g
        .solve(with_build_id(
            gw::SolveRequest {
                definition: Some(def2),
                allow_result_return: true,
                ..Default::default()
            },
            &build_ref,
        ))
        .await
        .unwrap()
        .into_inner();
    let Some(gw::result::Result::Ref(rf2)) = res.result.and_then(|r| r.result) else {
        panic!("expected a ref result");
    };
    let data = g
        .read_file(with_build_id(
            gw::ReadFileRequest {
                r#ref: rf2.id.clone(),
                file_path: "/foo2".into(),
                ..Default::default()
            },
            &build_ref,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&data.data[..], b"data");

    g.r#return(with_build_id(gw::ReturnRequest::default(), &build_ref))
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), solve)
        .await
        .unwrap()
        .unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert!(session.close(Duration::from_secs(5)).await);
}

/// A file op making `/platform` with `data` on scratch.
fn mkfile_op(path: &str, data: &str) -> Vec<u8> {
    pb::Op {
        op: Some(OpKind::File(pb::FileOp {
            actions: vec![pb::FileAction {
                input: -1,
                secondary_input: -1,
                output: 0,
                action: Some(Action::Mkfile(pb::FileActionMkFile {
                    path: path.into(),
                    mode: 0o600,
                    data: data.as_bytes().to_vec().into(),
                    timestamp: -1,
                    ..Default::default()
                })),
            }],
        })),
        ..Default::default()
    }
    .encode_to_vec()
}

const PLATFORMS: [&str; 2] = ["linux/amd64", "linux/arm64"];

/// Runs a gateway build that returns a ref map (one `/platform` file per platform of
/// [`PLATFORMS`], `refs.platforms` and `metadata` as the result's metadata) and exports it
/// with the image exporter and `attrs`.
async fn multi_platform_build(
    c: &integration::buildkit_client::BuildkitClient,
    attrs: &[(&str, &str)],
    metadata: &[(&str, &str)],
) -> std::result::Result<control::SolveResponse, tonic::Status> {
    let mut session = c.open_session(Attachables::default()).await.unwrap();
    let build_ref = new_id();
    let mut ctl = c.control();
    let sid = session.id.clone();
    let br = build_ref.clone();
    let attrs = attrs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let solve = tokio::spawn(async move {
        ctl.solve(control::SolveRequest {
            r#ref: br,
            session: sid,
            exporter_deprecated: "image".into(),
            exporter_attrs_deprecated: attrs,
            ..Default::default()
        })
        .await
    });
    let mut g = c.gateway();
    let mut refs = std::collections::BTreeMap::new();
    let mut platforms = vec![];
    for p in PLATFORMS {
        let res = g
            .solve(with_build_id(
                gw::SolveRequest {
                    definition: Some(definition_of(vec![mkfile_op("/platform", p)])),
                    allow_result_return: true,
                    allow_result_array_ref: true,
                    ..Default::default()
                },
                &build_ref,
            ))
            .await
            .unwrap()
            .into_inner();
        let Some(gw::result::Result::Ref(rf)) = res.result.and_then(|r| r.result) else {
            panic!("expected a ref result");
        };
        refs.insert(p.to_string(), rf);
        let (os, arch) = p.split_once('/').unwrap();
        platforms.push(serde_json::json!({"ID": p, "Platform": {"os": os, "architecture": arch}}));
    }
    let mut md: std::collections::BTreeMap<String, bytes::Bytes> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), bytes::Bytes::from(v.to_string())))
        .collect();
    md.insert(
        "refs.platforms".into(),
        serde_json::json!({ "Platforms": platforms })
            .to_string()
            .into(),
    );
    g.r#return(with_build_id(
        gw::ReturnRequest {
            result: Some(gw::Result {
                result: Some(gw::result::Result::Refs(gw::RefMap { refs })),
                metadata: md,
                ..Default::default()
            }),
            ..Default::default()
        },
        &build_ref,
    ))
    .await
    .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(120), solve)
        .await
        .unwrap()
        .unwrap();
    assert!(session.close(Duration::from_secs(5)).await);
    r.map(|r| r.into_inner())
}

async fn fetch(reference: &str) -> registry::Fetched {
    let client = registry::Registry::new(registry::Hosts::new(Default::default()));
    let s = client.session(std::sync::Arc::new(registry::Anonymous));
    s.resolve(&registry::Reference::parse(reference).unwrap())
        .await
        .unwrap()
}

/// A multi-platform result (`Return` with a ref map and `refs.platforms`), exported with
/// `type=image,push=true`: the registry holds an index over one manifest per platform, each
/// with that platform's file, and the annotations of the result and of the attributes where
/// BuildKit puts them. Index (or descriptor) annotations make it an OCI index; manifest
/// annotations alone keep Docker's manifest list. Without push, the export is refused clearly.
#[tokio::test(flavor = "multi_thread")]
async fn multi_platform_result_pushes_an_index_with_annotations() {
    require_root();
    let reg = integration::Registry::start().unwrap();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();

    let name = format!("{}/berth-test/multi:v1", reg.addr());
    let resp = multi_platform_build(
        &c,
        &[
            ("name", &name),
            ("push", "true"),
            ("annotation-index.gio", "generic index opt"),
            (
                "annotation-manifest-descriptor[linux/arm64].mdo",
                "arm64 descriptor opt",
            ),
        ],
        &[
            ("annotation-index.gi", "generic index"),
            ("annotation.gd", "generic default"),
            ("annotation-manifest[linux/amd64].m", "amd64 manifest"),
        ],
    )
    .await
    .unwrap();
    let index = fetch(&name).await;
    assert_eq!(
        resp.exporter_response["containerimage.digest"],
        index.digest
    );
    assert_eq!(index.media_type, registry::MEDIA_TYPE_OCI_INDEX);
    let idx: serde_json::Value = serde_json::from_slice(&index.bytes).unwrap();
    assert_eq!(idx["annotations"]["gi"], "generic index");
    assert_eq!(idx["annotations"]["gio"], "generic index opt");
    let manifests = idx["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 2);
    for (desc, p) in manifests.iter().zip(PLATFORMS) {
        let (os, arch) = p.split_once('/').unwrap();
        assert_eq!(desc["platform"]["os"], os);
        assert_eq!(desc["platform"]["architecture"], arch);
        assert_eq!(desc["mediaType"], registry::MEDIA_TYPE_OCI_MANIFEST);
        let descriptor_opt = desc["annotations"]["mdo"].as_str();
        assert_eq!(
            descriptor_opt,
            (arch == "arm64").then_some("arm64 descriptor opt"),
            "{desc}"
        );
        let dg = desc["digest"].as_str().unwrap();
        let m = fetch(&format!("{}/berth-test/multi@{dg}", reg.addr())).await;
        let mf: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap();
        assert_eq!(mf["annotations"]["gd"], "generic default");
        assert_eq!(
            mf["annotations"]["m"].as_str(),
            (arch == "amd64").then_some("amd64 manifest"),
            "{mf}"
        );
        let layers = mf["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1);
        // the layer holds this platform's file
        let blob = reqwest_blob(
            reg.addr(),
            "berth-test/multi",
            layers[0]["digest"].as_str().unwrap(),
        )
        .await;
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&blob[..]));
        let mut found = None;
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            if e.path().unwrap().to_str() == Some("platform") {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut e, &mut s).unwrap();
                found = Some(s);
            }
        }
        assert_eq!(found.as_deref(), Some(p));
        let cfg = reqwest_blob(
            reg.addr(),
            "berth-test/multi",
            mf["config"]["digest"].as_str().unwrap(),
        )
        .await;
        let cfg: serde_json::Value = serde_json::from_slice(&cfg).unwrap();
        assert_eq!(cfg["architecture"], arch);
    }

    // manifest annotations alone: Docker's manifest list
    let name2 = format!("{}/berth-test/multi:v2", reg.addr());
    multi_platform_build(
        &c,
        &[
            ("name", &name2),
            ("push", "true"),
            ("annotation-manifest.a", "b"),
        ],
        &[],
    )
    .await
    .unwrap();
    let index = fetch(&name2).await;
    assert_eq!(index.media_type, registry::MEDIA_TYPE_DOCKER_LIST);

    // an annotation for a platform the result lacks, and no push: clear errors
    let e = multi_platform_build(
        &c,
        &[
            ("name", &name2),
            ("push", "true"),
            ("annotation-manifest[linux/s390x].a", "b"),
        ],
        &[],
    )
    .await
    .unwrap_err();
    assert!(
        e.message()
            .contains("invalid annotation: no platform linux/s390x found in source"),
        "{e:?}"
    );
    let e = multi_platform_build(&c, &[("name", "berth-test/multi:local")], &[])
        .await
        .unwrap_err();
    assert!(
        e.message().contains("multi-platform result (2 platforms)"),
        "{e:?}"
    );
}

/// A blob's bytes from the local registry.
async fn reqwest_blob(addr: &str, repo: &str, digest: &str) -> Vec<u8> {
    let r = integration::http_get(addr, &format!("/v2/{repo}/blobs/{digest}")).unwrap();
    assert_eq!(r.status, 200, "blob {digest}");
    r.body
}
