//! Build history through berthd's gRPC API (`ListenBuildHistory`, `UpdateBuildHistory`, `Status`
//! replay of finished builds), as BuildKit's own client tests use it after every test: list the
//! records with `EarlyExit`, delete each one.

use futures::StreamExt;
use integration::buildkit_client::{new_id, with_build_id, Attachables, Berthd, BuildOptions};
use integration::require_root;
use protos::moby::buildkit::v1 as control;
use protos::moby::buildkit::v1::frontend as gw;
use std::time::Duration;

async fn records(
    c: &integration::buildkit_client::BuildkitClient,
    req: control::BuildHistoryRequest,
) -> Vec<control::BuildHistoryEvent> {
    let s = c
        .control()
        .listen_build_history(req)
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(
        Duration::from_secs(10),
        s.map(|e| e.unwrap()).collect::<Vec<_>>(),
    )
    .await
    .expect("EarlyExit ends the stream")
}

fn early_exit() -> control::BuildHistoryRequest {
    control::BuildHistoryRequest {
        early_exit: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn history_records_of_builds_persist_pin_delete_and_replay() {
    require_root();
    let mut d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();

    // a build that succeeds, with an exporter and frontend attributes
    let def = llb::scratch()
        .file(llb::mkfile("/hello", 0o644, "hi", Default::default()))
        .marshal()
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    let ok = c
        .build(BuildOptions {
            definition: Some(def),
            output: integration::buildkit_client::Output::Local(out.path().to_path_buf()),
            frontend_attrs: [("build-arg:FOO".to_string(), "bar".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(ok.solve.is_ok(), "{:?}", ok.solve);

    // a build that fails
    let bad = llb::scratch()
        .file(llb::copy(
            llb::scratch(),
            "/does-not-exist",
            "/x",
            Default::default(),
        ))
        .marshal()
        .unwrap();
    let failed = c
        .build(BuildOptions {
            definition: Some(bad),
            ..Default::default()
        })
        .await
        .unwrap();
    let err = failed.solve.as_ref().unwrap_err();

    let all = records(&c, early_exit()).await;
    assert_eq!(all.len(), 2, "{all:#?}");
    for e in &all {
        assert_eq!(e.r#type, control::BuildHistoryEventType::Complete as i32);
    }
    let rec = |r: &str| {
        all.iter()
            .map(|e| e.record.clone().unwrap())
            .find(|x| x.r#ref == r)
            .unwrap_or_else(|| panic!("no record for {r}"))
    };
    let okr = rec(&ok.build_ref);
    assert!(okr.error.is_none(), "{okr:?}");
    assert_eq!(okr.frontend_attrs.get("build-arg:FOO").unwrap(), "bar");
    assert_eq!(okr.exporters.len(), 1);
    assert_eq!(okr.exporters[0].r#type, "local");
    assert!(okr.created_at.is_some() && okr.completed_at.is_some());
    let logs = okr.logs.as_ref().expect("progress log blob");
    assert_eq!(logs.media_type, "application/vnd.buildkit.status.v0");
    assert!(logs.digest.starts_with("sha256:") && logs.size > 0);
    assert_eq!(okr.num_total_steps, ok.vertices().len() as i32);
    assert_eq!(okr.num_completed_steps, okr.num_total_steps);
    let badr = rec(&failed.build_ref);
    let st = badr.error.as_ref().expect("failed build records its error");
    assert_eq!(st.code, err.code() as i32);
    assert_eq!(st.message, err.message());

    // Status of a finished build replays its stored log, even after the job is long gone
    // (buildkitd keeps jobs ~10 s; the history keeps the log)
    d.restart().unwrap();
    let c = d.client().await.unwrap();
    let mut s = c
        .control()
        .status(control::StatusRequest {
            r#ref: ok.build_ref.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut replay = Vec::new();
    while let Some(m) = tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .unwrap()
    {
        replay.push(m.unwrap());
    }
    let names: std::collections::BTreeSet<String> = replay
        .iter()
        .flat_map(|r| r.vertexes.iter().map(|v| v.name.clone()))
        .collect();
    let live: std::collections::BTreeSet<String> =
        ok.vertices().values().map(|v| v.name.clone()).collect();
    assert_eq!(names, live);

    // records survived the restart; pin one (generation bumps), delete both
    assert_eq!(records(&c, early_exit()).await.len(), 2);
    c.control()
        .update_build_history(control::UpdateBuildHistoryRequest {
            r#ref: ok.build_ref.clone(),
            pinned: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let one = records(
        &c,
        control::BuildHistoryRequest {
            r#ref: ok.build_ref.clone(),
            early_exit: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(one.len(), 1);
    let r = one[0].record.as_ref().unwrap();
    assert!(r.pinned);
    assert_eq!(r.generation, 1);
    for e in records(&c, early_exit()).await {
        c.control()
            .update_build_history(control::UpdateBuildHistoryRequest {
                r#ref: e.record.unwrap().r#ref,
                delete: true,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(records(&c, early_exit()).await.is_empty());
    let blobs = std::fs::read_dir(d.root().join("history/blobs/sha256"))
        .unwrap()
        .count();
    assert_eq!(blobs, 0, "deleting the records removes their log blobs");
    let gone = c
        .control()
        .update_build_history(control::UpdateBuildHistoryRequest {
            r#ref: ok.build_ref.clone(),
            delete: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound, "{gone:?}");
}

async fn next(
    live: &mut tonic::Streaming<control::BuildHistoryEvent>,
) -> control::BuildHistoryEvent {
    tokio::time::timeout(Duration::from_secs(10), live.next())
        .await
        .expect("event")
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn live_history_events_for_a_running_build() {
    require_root();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let mut live = c
        .control()
        .listen_build_history(control::BuildHistoryRequest::default())
        .await
        .unwrap()
        .into_inner();

    // a forwarder build that stays open until we Return
    let mut session = c.open_session(Attachables::default()).await.unwrap();
    let build_ref = new_id();
    let mut ctl = c.control();
    let (br, sid) = (build_ref.clone(), session.id.clone());
    let solve = tokio::spawn(async move {
        ctl.solve(control::SolveRequest {
            r#ref: br,
            session: sid,
            frontend_attrs: [("target".to_string(), "x".to_string())].into(),
            ..Default::default()
        })
        .await
    });
    let ev = next(&mut live).await;
    assert_eq!(ev.r#type, control::BuildHistoryEventType::Started as i32);
    let r = ev.record.unwrap();
    assert_eq!(r.r#ref, build_ref);
    assert!(r.completed_at.is_none());
    assert_eq!(r.frontend_attrs.get("target").unwrap(), "x");

    // while it runs: ActiveOnly lists it; EarlyExit does not
    let active = c
        .control()
        .listen_build_history(control::BuildHistoryRequest {
            active_only: true,
            r#ref: build_ref.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .next()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        active.r#type,
        control::BuildHistoryEventType::Started as i32
    );
    assert!(records(&c, early_exit()).await.is_empty());

    c.gateway()
        .r#return(with_build_id(gw::ReturnRequest::default(), &build_ref))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), solve)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let ev = next(&mut live).await;
    assert_eq!(ev.r#type, control::BuildHistoryEventType::Complete as i32);
    let r = ev.record.unwrap();
    assert_eq!(r.r#ref, build_ref);
    assert!(r.completed_at.is_some());
    // the record is there as soon as Solve has answered
    assert_eq!(records(&c, early_exit()).await.len(), 1);
    assert!(session.close(Duration::from_secs(5)).await);
}
