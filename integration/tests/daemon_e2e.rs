//! End-to-end tests of berthd through its gRPC API, following buildctl's protocol path
//! (`integration::buildkit_client`). Needs root (layer store, chown in the receiver).

use integration::buildkit_client::{
    new_id, with_build_id, Attachables, Berthd, BuildOptions, BuildReport, Output,
};
use integration::require_root;
use prost::Message;
use protos::moby::buildkit::v1 as control;
use protos::moby::buildkit::v1::frontend as gw;
use protos::pb::{self, file_action::Action, op::Op as OpKind};
use sha2::Digest;
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

/// Builds a definition from ops (last = result) and returns it with each op's digest.
fn definition(ops: &[pb::Op]) -> (pb::Definition, Vec<String>) {
    let mut def = pb::Definition::default();
    let mut digests = Vec::new();
    for op in ops {
        let b = op.encode_to_vec();
        digests.push(digest(&b));
        def.def.push(b.into());
    }
    let last = digests.last().unwrap().clone();
    let term = pb::Op {
        inputs: vec![pb::Input {
            digest: last,
            index: 0,
        }],
        ..Default::default()
    };
    def.def.push(term.encode_to_vec().into());
    (def, digests)
}

fn local(name: &str, attrs: &[(&str, &str)]) -> pb::Op {
    pb::Op {
        op: Some(OpKind::Source(pb::SourceOp {
            identifier: format!("local://{name}"),
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })),
        ..Default::default()
    }
}

fn action(input: i64, secondary: i64, output: i64, a: Action) -> pb::FileAction {
    pb::FileAction {
        input,
        secondary_input: secondary,
        output,
        action: Some(a),
    }
}

/// The same graph as the Go fixture: mkdir, mkfile, copy the context, rm *.skip.
fn assemble_op(src_digest: &str) -> pb::Op {
    pb::Op {
        inputs: vec![pb::Input {
            digest: src_digest.into(),
            index: 0,
        }],
        op: Some(OpKind::File(pb::FileOp {
            actions: vec![
                action(
                    -1,
                    -1,
                    -1,
                    Action::Mkdir(pb::FileActionMkDir {
                        path: "/out/sub".into(),
                        mode: 0o755,
                        make_parents: true,
                        timestamp: -1,
                        ..Default::default()
                    }),
                ),
                action(
                    1,
                    -1,
                    -1,
                    Action::Mkfile(pb::FileActionMkFile {
                        path: "/out/sub/hello.txt".into(),
                        mode: 0o640,
                        data: "hello from berth\n".into(),
                        timestamp: 1_600_000_000_000_000_000,
                        ..Default::default()
                    }),
                ),
                action(
                    2,
                    0,
                    -1,
                    Action::Copy(pb::FileActionCopy {
                        src: "/".into(),
                        dest: "/out/ctx/".into(),
                        mode: -1,
                        dir_copy_contents: true,
                        create_dest_path: true,
                        allow_wildcard: true,
                        allow_empty_wildcard: true,
                        timestamp: -1,
                        ..Default::default()
                    }),
                ),
                action(
                    3,
                    -1,
                    0,
                    Action::Rm(pb::FileActionRm {
                        path: "/out/ctx/*.skip".into(),
                        allow_not_found: true,
                        allow_wildcard: true,
                    }),
                ),
            ],
        })),
        ..Default::default()
    }
}

fn make_context(dir: &Path) {
    std::fs::create_dir_all(dir.join("dir")).unwrap();
    std::fs::write(dir.join("a.txt"), "hello context\n").unwrap();
    std::fs::write(dir.join("c.skip"), "skip me\n").unwrap();
    std::fs::write(dir.join("dir/b.txt"), "nested\n").unwrap();
    std::fs::set_permissions(
        dir.join("dir/b.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::os::unix::fs::symlink("a.txt", dir.join("link")).unwrap();
}

fn assert_clean_finish(r: &BuildReport) {
    assert!(
        r.status_end.is_ok(),
        "status stream must end with OK: {:?}",
        r.status_end
    );
    assert!(
        r.status_lag < Duration::from_secs(3),
        "status ended {:?} after Solve",
        r.status_lag
    );
    assert!(
        r.session_closed_ok,
        "daemon must end the Session with OK after the client half-closes"
    );
    for (d, v) in r.vertices() {
        assert!(
            v.started.is_some() && v.completed.is_some(),
            "vertex {d} ({}) not completed: {v:?}",
            v.name
        );
    }
}

fn tree(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in walk(root) {
        let rel = e.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let md = std::fs::symlink_metadata(&e).unwrap();
        let desc = if md.file_type().is_symlink() {
            format!("link:{}", std::fs::read_link(&e).unwrap().display())
        } else if md.is_dir() {
            format!("dir:{:o}", md.mode() & 0o7777)
        } else {
            format!(
                "file:{:o}:{}",
                md.mode() & 0o7777,
                std::fs::read_to_string(&e).unwrap()
            )
        };
        out.push((rel, desc));
    }
    out.sort();
    out
}

fn walk(p: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap().path();
        out.push(e.clone());
        if std::fs::symlink_metadata(&e).unwrap().is_dir() {
            out.extend(walk(&e));
        }
    }
    out
}

fn expected_tree() -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = [
        ("out", "dir:755"),
        ("out/sub", "dir:755"),
        ("out/sub/hello.txt", "file:640:hello from berth\n"),
        ("out/ctx", "dir:755"),
        ("out/ctx/a.txt", "file:644:hello context\n"),
        ("out/ctx/dir", "dir:755"),
        ("out/ctx/dir/b.txt", "file:600:nested\n"),
        ("out/ctx/link", "link:a.txt"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn control_api_workers_info_du_prune() {
    require_root();
    let mut d =
        Berthd::start(&["--oci-worker-labels=org.mobyproject.buildkit.worker.sandbox=true"])
            .unwrap();
    let c = d.client().await.unwrap();
    let mut ctl = c.control();
    let w = ctl
        .list_workers(control::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.record.len(), 1);
    let rec = &w.record[0];
    assert_eq!(rec.id.len(), 25);
    assert_eq!(
        rec.labels["org.mobyproject.buildkit.worker.executor"],
        "oci"
    );
    assert_eq!(
        rec.labels["org.mobyproject.buildkit.worker.sandbox"],
        "true"
    );
    assert!(!rec.platforms.is_empty() && rec.platforms[0].os == "linux");
    for (f, n) in [
        (format!("id=={}", rec.id), 1),
        ("id==nope".to_string(), 0),
        (
            r#"labels."org.mobyproject.buildkit.worker.executor"==oci"#.to_string(),
            1,
        ),
        (
            r#"labels."org.mobyproject.buildkit.worker.executor"==containerd"#.to_string(),
            0,
        ),
    ] {
        let r = ctl
            .list_workers(control::ListWorkersRequest {
                filter: vec![f.clone()],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.record.len(), n, "filter {f}");
    }
    let bad = ctl
        .list_workers(control::ListWorkersRequest {
            filter: vec!["id==\"x".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let info = ctl
        .info(control::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let v = info.buildkit_version.unwrap();
    assert_eq!(v.package, "github.com/berth-build/berth");
    assert!(v.version.starts_with('v'));

    // a build leaves records; DU reports them, filters select, prune deletes and streams them
    let ctx = d.scratch().join("ctx");
    make_context(&ctx);
    let (def, _) = {
        let src = local("context", &[]);
        let sd = digest(&src.encode_to_vec());
        definition(&[src, assemble_op(&sd)])
    };
    let r = c
        .build(BuildOptions {
            definition: Some(def),
            locals: [("context".to_string(), ctx.clone())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    r.solve.as_ref().unwrap();
    let du = ctl
        .disk_usage(control::DiskUsageRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(du.record.len() >= 2, "{du:?}");
    for rec in &du.record {
        assert!(rec.created_at.is_some());
        assert!(rec.size > 0, "{rec:?}");
    }
    let locals = ctl
        .disk_usage(control::DiskUsageRequest {
            filter: vec!["type==source.local".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(locals.record.len(), 1, "{locals:?}");
    assert_eq!(locals.record[0].description, "local source for context");
    // the job's lease is released when it ends: everything is reclaimable
    let du = ctl
        .disk_usage(control::DiskUsageRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(du.record.iter().all(|r| !r.in_use), "{du:?}");
    let mut pruned = Vec::new();
    let mut s = ctl
        .prune(control::PruneRequest {
            filter: vec!["type==source.local".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(m) = s.message().await.unwrap() {
        pruned.push(m);
    }
    assert_eq!(pruned.len(), 1);
    assert_eq!(pruned[0].id, locals.record[0].id);
    let mut s = ctl
        .prune(control::PruneRequest {
            all: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while s.message().await.unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, du.record.len() - 1);
    let du = ctl
        .disk_usage(control::DiskUsageRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(du.record.is_empty(), "{du:?}");
    // deleting a build record that does not exist (daemon_history tests the rest)
    let e = ctl
        .update_build_history(control::UpdateBuildHistoryRequest {
            r#ref: "no-such-build".into(),
            delete: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    // the worker id persists across restarts
    drop(c);
    d.restart().unwrap();
    let c = d.client().await.unwrap();
    let w2 = c
        .control()
        .list_workers(control::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w2.record[0].id, rec.id);
}

#[tokio::test(flavor = "multi_thread")]
async fn build_local_output_tree_status_and_incremental_resync() {
    require_root();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let ctx = d.scratch().join("ctx");
    make_context(&ctx);
    let src = local("context", &[("local.sharedkeyhint", "context")]);
    let sd = digest(&src.encode_to_vec());
    let op = assemble_op(&sd);
    let (def, digests) = definition(&[src, op]);
    let out = d.scratch().join("out");
    let r = c
        .build(BuildOptions {
            definition: Some(def.clone()),
            locals: [("context".to_string(), ctx.clone())].into(),
            output: Output::Local(out.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(r.solve.is_ok(), "{:?}\n{}", r.solve, d.log_text());
    assert_clean_finish(&r);
    assert_eq!(tree(&out), expected_tree());
    let hello = std::fs::metadata(out.join("out/sub/hello.txt")).unwrap();
    assert_eq!(
        hello.mtime(),
        1_600_000_000,
        "mkfile timestamp must survive the export"
    );
    // progress: source, file op and export vertices with buildkitd's names and statuses
    let vs = r.vertices();
    assert_eq!(vs[&digests[0]].name, "local://context");
    assert_eq!(
        vs[&digests[1]].name,
        "mkdir /out/sub, mkfile /out/sub/hello.txt, copy / /out/ctx/, rm /out/ctx/*.skip"
    );
    assert_eq!(vs[&digests[1]].inputs, vec![digests[0].clone()]);
    let export = vs
        .values()
        .find(|v| v.name == "exporting to client directory")
        .expect("export vertex");
    assert!(export.error.is_empty() && !export.cached);
    let sts = r.vertex_statuses();
    assert!(sts.iter().any(|s| s.id == "transferring context:"
        && s.vertex == digests[0]
        && s.completed.is_some()));
    assert!(sts
        .iter()
        .any(|s| s.id == "copying files" && s.vertex == export.digest && s.completed.is_some()));
    // every vertex was announced (started) before its first status
    let mut seen = std::collections::HashSet::new();
    for m in &r.statuses {
        for v in &m.vertexes {
            if v.started.is_some() {
                seen.insert(v.digest.clone());
            }
        }
        for s in &m.statuses {
            assert!(
                seen.contains(&s.vertex),
                "status {} before its vertex",
                s.id
            );
        }
    }
    assert_eq!(
        r.file_sync_requests, 3,
        "first sync requests every regular file"
    );
    // Ping advertised the caps buildctl needs
    let pong = r.pong.as_ref().unwrap();
    for cap in ["return", "proto.refarray", "solve.base"] {
        assert!(
            pong.frontend_api_caps
                .iter()
                .any(|c| c.id == cap && c.enabled),
            "{cap}"
        );
    }
    for cap in [
        "source.local",
        "file.base",
        "mergeop",
        "diffop",
        "constraints",
        "platform",
    ] {
        assert!(
            pong.llb_caps.iter().any(|c| c.id == cap && c.enabled),
            "{cap}"
        );
    }

    // unchanged context: the receiver diffs against its previous copy and requests no file
    let out2 = d.scratch().join("out2");
    let r2 = c
        .build(BuildOptions {
            definition: Some(def.clone()),
            locals: [("context".to_string(), ctx.clone())].into(),
            output: Output::Local(out2.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(r2.solve.is_ok(), "{:?}", r2.solve);
    assert_eq!(
        r2.file_sync_requests, 0,
        "unchanged files must not be re-sent"
    );
    assert_eq!(tree(&out2), expected_tree());

    // change one file, delete one: only the changed one is sent, the deleted one disappears
    std::fs::write(ctx.join("a.txt"), "changed\n").unwrap();
    std::fs::remove_file(ctx.join("dir/b.txt")).unwrap();
    let out3 = d.scratch().join("out3");
    let r3 = c
        .build(BuildOptions {
            definition: Some(def),
            locals: [("context".to_string(), ctx.clone())].into(),
            output: Output::Local(out3.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(r3.solve.is_ok(), "{:?}", r3.solve);
    assert_eq!(r3.file_sync_requests, 1);
    assert_eq!(
        std::fs::read_to_string(out3.join("out/ctx/a.txt")).unwrap(),
        "changed\n"
    );
    assert!(!out3.join("out/ctx/dir/b.txt").exists());
}

/// A local sync reports its transfer progress at most every 100 ms and once at the end (as
/// buildkitd rate-limits it), not once per received packet: the receiver's callback runs per
/// listing entry, and a status per entry cost berthd a status event and the client a Status
/// message per file of a large context.
#[tokio::test(flavor = "multi_thread")]
async fn local_sync_progress_is_rate_limited() {
    require_root();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let ctx = d.scratch().join("ctx");
    for i in 0..3000 {
        let dir = ctx.join(format!("d{:02}", i / 100));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("f{i:04}")), format!("file {i}\n")).unwrap();
    }
    let src = local("context", &[]);
    let sd = digest(&src.encode_to_vec());
    let (def, digests) = definition(&[src, assemble_op(&sd)]);
    let start = Instant::now();
    let r = c
        .build(BuildOptions {
            definition: Some(def),
            locals: [("context".to_string(), ctx.clone())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let took = start.elapsed();
    assert!(r.solve.is_ok(), "{:?}\n{}", r.solve, d.log_text());
    let transfers: Vec<_> = r
        .statuses
        .iter()
        .flat_map(|m| &m.statuses)
        .filter(|s| s.id == "transferring context:" && s.vertex == digests[0])
        .collect();
    // The final status carries the whole listing's size.
    let last = transfers.last().expect("a transferring status");
    assert!(last.completed.is_some() && last.current > 3000, "{last:?}");
    let limit = 2 + took.as_millis() / 100;
    assert!(
        transfers.len() as u128 <= limit,
        "{} transferring statuses in {took:?} (at most {limit})",
        transfers.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn build_go_fixture_definition_to_tar() {
    require_root();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/protos/tests/fixtures/definition_local_fileop.pb");
    let bytes = std::fs::read(&fixture).expect("Go-produced LLB fixture");
    let def = pb::Definition::decode(bytes.as_slice()).unwrap();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let ctx = d.scratch().join("ctx");
    make_context(&ctx);
    let tar_path = d.scratch().join("out.tar");
    let r = c
        .build(BuildOptions {
            definition: Some(def),
            locals: [("context".to_string(), ctx)].into(),
            output: Output::Tar(tar_path.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(r.solve.is_ok(), "{:?}\n{}", r.solve, d.log_text());
    assert_clean_finish(&r);
    assert!(r
        .vertices()
        .values()
        .any(|v| v.name == "exporting to client tarball"));
    assert!(r
        .vertex_statuses()
        .iter()
        .any(|s| s.id == "sending tarball" && s.completed.is_some()));
    let data = std::fs::read(&tar_path).unwrap();
    let mut names = Vec::new();
    let mut a = tar::Archive::new(data.as_slice());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let p = e.path().unwrap().to_string_lossy().into_owned();
        if p == "out/ctx/a.txt" {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut e, &mut s).unwrap();
            assert_eq!(s, "hello context\n");
        }
        names.push((p, e.header().entry_type()));
    }
    assert!(
        names.contains(&("out/".to_string(), tar::EntryType::Directory)),
        "{names:?}"
    );
    assert!(
        names.contains(&("out/ctx/link".to_string(), tar::EntryType::Symlink)),
        "{names:?}"
    );
    assert!(
        names.iter().any(|(p, _)| p == "out/sub/hello.txt"),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|(p, _)| p.ends_with(".skip")),
        "{names:?}"
    );
    let chunks = std::fs::read_to_string(tar_path.with_extension("chunks")).unwrap();
    for n in chunks.lines() {
        assert!(
            n.parse::<usize>().unwrap() <= 1 << 20,
            "tar chunk of {n} bytes"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn large_messages_and_a_16mib_file() {
    require_root();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    // a 15 MiB mkfile travels in one LLBBridge.Solve message and is exported through the tar stream
    let data: Vec<u8> = (0..15 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let op = pb::Op {
        op: Some(OpKind::File(pb::FileOp {
            actions: vec![action(
                -1,
                -1,
                0,
                Action::Mkfile(pb::FileActionMkFile {
                    path: "/big".into(),
                    mode: 0o644,
                    data: data.clone().into(),
                    timestamp: -1,
                    ..Default::default()
                }),
            )],
        })),
        ..Default::default()
    };
    let (def, _) = definition(&[op]);
    assert!(def.encoded_len() > 15 << 20);
    let tar_path = d.scratch().join("big.tar");
    let r = c
        .build(BuildOptions {
            definition: Some(def),
            output: Output::Tar(tar_path.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(r.solve.is_ok(), "{:?}", r.solve);
    let mut a = tar::Archive::new(std::fs::File::open(&tar_path).unwrap());
    let mut e = a.entries().unwrap().next().unwrap().unwrap();
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut e, &mut got).unwrap();
    assert!(got == data, "15 MiB file content differs");

    // a message over the daemon's limit is refused with an error, and the daemon keeps serving
    let huge = pb::Definition {
        def: vec![vec![0u8; 70 << 20].into()],
        ..Default::default()
    };
    let id = new_id();
    let e = c
        .gateway()
        .solve(with_build_id(
            gw::SolveRequest {
                definition: Some(huge),
                ..Default::default()
            },
            &id,
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            tonic::Code::ResourceExhausted | tonic::Code::OutOfRange
        ),
        "{e:?}"
    );
    c.control().info(control::InfoRequest {}).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_get_typed_errors() {
    require_root();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let src = local("context", &[]);
    let sd = digest(&src.encode_to_vec());
    let term = |dg: &str, idx: i64| pb::Op {
        inputs: vec![pb::Input {
            digest: dg.into(),
            index: idx,
        }],
        ..Default::default()
    };
    let raw = |ops: Vec<Vec<u8>>| pb::Definition {
        def: ops.into_iter().map(Into::into).collect(),
        ..Default::default()
    };
    let cases: Vec<(&str, pb::Definition, tonic::Code)> = vec![
        (
            "garbage protobuf",
            raw(vec![vec![0xff, 0xff, 0xff], term(&sd, 0).encode_to_vec()]),
            tonic::Code::InvalidArgument,
        ),
        (
            "missing input",
            raw(vec![
                src.encode_to_vec(),
                term("sha256:0000", 0).encode_to_vec(),
            ]),
            tonic::Code::InvalidArgument,
        ),
        (
            "output index out of range",
            raw(vec![src.encode_to_vec(), term(&sd, 3).encode_to_vec()]),
            tonic::Code::InvalidArgument,
        ),
        (
            "op without operation",
            raw(vec![
                pb::Op::default().encode_to_vec(),
                term(&digest(&[]), 0).encode_to_vec(),
            ]),
            tonic::Code::InvalidArgument,
        ),
        (
            "only the terminal op",
            raw(vec![term(&sd, 0).encode_to_vec()]),
            tonic::Code::InvalidArgument,
        ),
        (
            "unknown op (passthrough)",
            {
                let p = pb::Op {
                    op: Some(OpKind::Passthrough(pb::PassthroughOp::default())),
                    ..Default::default()
                };
                raw(vec![
                    p.encode_to_vec(),
                    term(&digest(&p.encode_to_vec()), 0).encode_to_vec(),
                ])
            },
            tonic::Code::Unimplemented,
        ),
    ];
    for (name, def, code) in cases {
        let r = c
            .build(BuildOptions {
                definition: Some(def),
                ..Default::default()
            })
            .await
            .unwrap();
        let gs = r.gateway_solve.as_ref().unwrap().as_ref().expect_err(name);
        assert_eq!(gs.code(), code, "{name}: {gs:?}");
        let e = r.solve.as_ref().expect_err(name);
        assert_eq!(
            e.code(),
            code,
            "{name}: Control.Solve must fail with the returned error: {e:?}"
        );
        assert!(
            r.status_end.is_ok(),
            "{name}: status must end: {:?}",
            r.status_end
        );
    }
    // unknown exporter: InvalidArgument from Control.Solve
    let r = c
        .build(BuildOptions {
            definition: None,
            output: Output::Raw("bogus".into(), BTreeMap::new()),
            ..Default::default()
        })
        .await
        .unwrap();
    let e = r.solve.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("bogus"), "{e:?}");
    // the dockerfile frontend without the client's `dockerfile` directory says it could not
    // load the Dockerfile; an unknown frontend is InvalidArgument
    let r = c
        .build(BuildOptions {
            frontend: Some("dockerfile.v0".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let e = r.gateway_solve.unwrap().unwrap_err();
    assert!(
        e.message().contains("failed to resolve dockerfile"),
        "{e:?}"
    );
    let r = c
        .build(BuildOptions {
            frontend: Some("nosuch.v0".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let e = r.gateway_solve.unwrap().unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("unsupported frontend nosuch.v0"),
        "{e:?}"
    );
    // gateway calls need the build id header; unknown builds are NotFound; unknown calls name themselves
    let mut g = c.gateway();
    let e = g.ping(gw::PingRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = g
        .ping(with_build_id(gw::PingRequest {}, "nosuchbuild"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = g
        .resolve_source_meta(gw::ResolveSourceMetaRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);
    assert!(e.message().contains("ResolveSourceMeta"), "{e:?}");
    // missing image: NotFound from ResolveImageConfig (needs a job)
    let empty = c.build(BuildOptions::default()).await.unwrap();
    assert!(
        empty.solve.is_ok(),
        "empty definition = empty result: {:?}",
        empty.solve
    );
    // Status of an unknown ref fails after waiting
    let t = Instant::now();
    let e = c
        .control()
        .status(control::StatusRequest {
            r#ref: "nosuchref".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(t.elapsed() >= Duration::from_secs(5));
    // still alive
    c.control().info(control::InfoRequest {}).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn lost_session_cancels_the_build_within_2s() {
    require_root();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let mut session = c.open_session(Attachables::default()).await.unwrap();
    let build_ref = new_id();
    let mut ctl = c.control();
    let sid = session.id.clone();
    let br = build_ref.clone();
    // forwarder mode: Solve waits for LLBBridge.Return, which never comes
    let solve = tokio::spawn(async move {
        let r = ctl
            .solve(control::SolveRequest {
                r#ref: br,
                session: sid,
                ..Default::default()
            })
            .await;
        (r, Instant::now())
    });
    // the build is registered and the session is used
    c.gateway()
        .ping(with_build_id(gw::PingRequest {}, &build_ref))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    session.abort();
    let (r, done) = tokio::time::timeout(Duration::from_secs(10), solve)
        .await
        .expect("solve must end")
        .unwrap();
    let e = r.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(
        done.duration_since(t0) < Duration::from_secs(2),
        "canceled after {:?}",
        done.duration_since(t0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_cancels_builds_and_removes_the_socket() {
    require_root();
    let mut d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let session = c.open_session(Attachables::default()).await.unwrap();
    let mut ctl = c.control();
    let sid = session.id.clone();
    let solve = tokio::spawn(async move {
        ctl.solve(control::SolveRequest {
            r#ref: new_id(),
            session: sid,
            ..Default::default()
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = d.terminate(Duration::from_secs(10)).unwrap();
    assert!(st.success(), "berthd exit status {st}\n{}", d.log_text());
    assert!(!d.socket().exists(), "socket must be removed");
    let r = tokio::time::timeout(Duration::from_secs(5), solve)
        .await
        .expect("solve must end")
        .unwrap();
    assert!(r.is_err(), "running build must fail at shutdown");
    drop(session);
}
