//! Secret mounts through the worker with real runc and overlayfs (busybox base image from the
//! system Docker Engine). Needs root, runc and busybox-static.

mod worker_ops_support;

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Result;
use integration::{busybox_image, DockerEngine};
use llb::{Mount, RunOpts};
use worker::ErrorKind;
use worker_ops_support::*;

async fn base() -> Result<(integration::TestImage, llb::State)> {
    let engine = DockerEngine::system()?;
    let img = busybox_image(&engine).await?;
    let st = llb::image(img.reference()).state();
    Ok((img, st))
}

/// A secret is readable by the process but in no layer and no log; a missing optional secret
/// is skipped; a missing required one fails with NotFound.
#[tokio::test]
async fn exec_secret_mount() -> Result<()> {
    let w = TestWorker::new()?;
    let (_img, base) = base().await?;
    let secret = "TOPSECRET-4f1c9e";
    let session = Arc::new(TestSession {
        secrets: HashMap::from([("tok".to_string(), secret.as_bytes().to_vec())]),
    });
    let run = base.run(
        RunOpts::shell(
            "test \"$(cat /run/secrets/tok)\" = TOPSECRET-4f1c9e && touch /ok; \
             test -e /run/secrets/none || touch /no-optional; \
             ls -ln /run/secrets/tok > /perm",
        )
        .mount(Mount::secret("/run/secrets/tok", "tok", false))
        .mount(Mount::secret("/run/secrets/none", "absent", true)),
    );
    let s = solve_with(
        &w.worker,
        &run.root(),
        session.clone(),
        CancellationToken::new(),
    )
    .await;
    let r = s.ok();
    assert!(read(r, "/ok").await?.is_some(), "secret content not seen");
    assert!(read(r, "/no-optional").await?.is_some());
    let perm = read(r, "/perm").await?.unwrap();
    assert!(perm.starts_with("-r--------"), "{perm}");
    assert_eq!(read(r, "/run/secrets/tok").await?, None, "secret stub left");
    assert!(!s.logs().contains(secret));
    // Scan every berth layer on disk for the secret bytes.
    let layers = w.root().join("snapshots/layers");
    let mut hits = vec![];
    for e in walk(&layers) {
        if let Ok(b) = std::fs::read(&e) {
            if b.windows(secret.len()).any(|x| x == secret.as_bytes()) {
                hits.push(e);
            }
        }
    }
    assert!(hits.is_empty(), "secret found in {hits:?}");

    let missing =
        base.run(RunOpts::shell("true").mount(Mount::secret("/run/secrets/x", "absent", false)));
    let s = solve_with(
        &w.worker,
        &missing.root(),
        session,
        CancellationToken::new(),
    )
    .await;
    let err = s.result.expect_err("missing secret");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(
        err.to_string().contains("secret absent: not found"),
        "{err}"
    );
    Ok(())
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            out.extend(walk(&p));
        } else if ft.is_file() {
            out.push(p);
        }
    }
    out
}
