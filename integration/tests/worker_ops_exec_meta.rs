//! ExecOp `Meta` fields through the worker with real runc: `validExitCodes` (BuildKit cap
//! `exec.validexitcode`: an exit code in the list succeeds and its outputs are kept, any other
//! code fails naming the code, the default list is `[0]`), extra hosts and ulimits. Needs root,
//! runc and busybox-static.

mod worker_ops_support;

use anyhow::Result;
use integration::{busybox_image, DockerEngine};
use llb::RunOpts;
use worker::ErrorKind;
use worker_ops_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_exit_codes() -> Result<()> {
    let w = TestWorker::new()?;
    let engine = DockerEngine::system()?;
    let img = busybox_image(&engine).await?;
    let base = llb::image(img.reference()).state();
    let run = |script: &str, codes: &[i32]| {
        base.run(RunOpts::shell(script).valid_exit_codes(codes.iter().copied()))
            .root()
    };

    // 3 is listed: success, and the layer written before exiting is the result.
    let s = solve(&w.worker, &run("echo three > /made; exit 3", &[0, 3])).await;
    assert_eq!(read(s.ok(), "/made").await?.as_deref(), Some("three\n"));

    // 3 is not listed.
    let s = solve(&w.worker, &run("echo x > /made; exit 3", &[0, 1])).await;
    let e = s.result.as_ref().expect_err("exit 3 must fail");
    assert!(e.to_string().contains("exit code: 3"), "{e}");
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);

    // A list without 0 makes 0 a failure.
    let s = solve(&w.worker, &run("true", &[2])).await;
    let e = s.result.as_ref().expect_err("exit 0 must fail");
    assert!(e.to_string().contains("exit code: 0"), "{e}");

    // Default: only 0.
    let s = solve(&w.worker, &run("exit 1", &[])).await;
    assert!(s.result.is_err());
    let s = solve(&w.worker, &run("echo ok > /made", &[])).await;
    assert_eq!(read(s.ok(), "/made").await?.as_deref(), Some("ok\n"));
    Ok(())
}

/// Extra hosts land in the container's `/etc/hosts` (not in the layer); ulimits apply; an
/// invalid extra-host IP is rejected naming the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_hosts_and_ulimits() -> Result<()> {
    let w = TestWorker::new()?;
    let engine = DockerEngine::system()?;
    let img = busybox_image(&engine).await?;
    let base = llb::image(img.reference()).state();
    let run = base
        .run(
            RunOpts::shell(
                "cat /etc/hosts > /hosts; ping -c1 -W1 berth-extra.test > /ping 2>&1; \
                 ulimit -n > /nofile; ulimit -Hn >> /nofile",
            )
            .extra_host("berth-extra.test", "127.0.0.1")
            .extra_host("berth-v6.test", "::1")
            .ulimit("nofile", 321, 654),
        )
        .root();
    let s = solve(&w.worker, &run).await;
    let r = s.ok();
    let hosts = read(r, "/hosts").await?.unwrap();
    assert!(
        hosts
            .lines()
            .any(|l| l.split_whitespace().eq(["127.0.0.1", "berth-extra.test"])),
        "{hosts}"
    );
    assert!(
        hosts
            .lines()
            .any(|l| l.split_whitespace().eq(["::1", "berth-v6.test"])),
        "{hosts}"
    );
    let ping = read(r, "/ping").await?.unwrap();
    assert!(ping.contains("127.0.0.1"), "name not resolved: {ping}");
    assert_eq!(read(r, "/nofile").await?.as_deref(), Some("321\n654\n"));
    let layer_hosts = read(r, "/etc/hosts").await?.unwrap_or_default();
    assert!(!layer_hosts.contains("berth-extra.test"), "{layer_hosts}");

    let bad = base
        .run(RunOpts::shell("true").extra_host("broken.test", "300.1.1.1"))
        .root();
    let s = solve(&w.worker, &bad).await;
    let e = s.result.as_ref().expect_err("invalid IP must fail");
    assert!(
        e.to_string().contains("broken.test") && e.to_string().contains("300.1.1.1"),
        "{e}"
    );
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    Ok(())
}
