//! ExecOp through the worker with real runc and overlayfs, on a busybox base image used in
//! place from the system Docker Engine. Needs root, runc and busybox-static.

mod worker_ops_support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use integration::{busybox_image, DockerEngine};
use llb::{CacheSharing, Mount, NetMode, RunOpts};
use worker::ErrorKind;
use worker_ops_support::*;

/// Timing tests run alone (write lock); the others share (read lock), so that the
/// parallelism measurement is not skewed by the rest of this file on a 2-core machine.
static TIMING: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn shared() -> tokio::sync::RwLockReadGuard<'static, ()> {
    TIMING.read().await
}

async fn exclusive() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    TIMING.write().await
}

async fn base() -> Result<(integration::TestImage, llb::State)> {
    let engine = DockerEngine::system()?;
    let img = busybox_image(&engine).await?;
    let st = llb::image(img.reference()).state();
    Ok((img, st))
}

/// Files written by the process land in the result; env (with default PATH), cwd, user and
/// hostname are applied; a second writable bind mount on scratch is an output of its own.
#[tokio::test]
async fn exec_env_cwd_user_and_outputs() -> Result<()> {
    let _timing = shared().await;
    let w = TestWorker::new()?;
    let (_img, base) = base().await?;
    let script = "echo \"$FOO\" > /tmp/res; pwd >> /tmp/res; id -u >> /tmp/res; \
                  echo \"$PATH\" >> /tmp/res; hostname >> /tmp/res";
    let first = base
        .env("FOO", "bar baz")
        .dir("/work/dir")
        .user("user")
        .run(RunOpts::shell(script).hostname("berth-test-host"))
        .root();
    // Second step as root on top of the first, with an extra output mount.
    let run = first.user("0").dir("/").run(
        RunOpts::shell("echo side > /out/side.txt").mount(Mount::bind("/out", &llb::scratch())),
    );
    let s = solve(&w.worker, &run.root()).await;
    let root = s.ok();
    assert_eq!(
        read(root, "/tmp/res").await?.as_deref(),
        Some(
            "bar baz\n/work/dir\n1000\n/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\nberth-test-host\n"
        )
    );
    // The /out mount's writes are not in the root layer (the mount point stub was removed).
    assert_eq!(read(root, "/out/side.txt").await?, None);
    let s2 = solve(&w.worker, &run.get_mount("/out").unwrap()).await;
    assert_eq!(read(s2.ok(), "/side.txt").await?.as_deref(), Some("side\n"));
    // Same graph again: every vertex cached, nothing executed.
    let again = solve(&w.worker, &run.root()).await;
    again.ok();
    let done = again.completed();
    assert!(!done.is_empty());
    assert!(done.iter().all(|(_, c)| *c), "not all cached: {done:?}");
    Ok(())
}

/// A non-zero exit fails the step with buildkitd's message plus the last output lines.
#[tokio::test]
async fn exec_exit_code_error() -> Result<()> {
    let _timing = shared().await;
    let w = TestWorker::new()?;
    let (_img, base) = base().await?;
    let run = base.run(RunOpts::shell(
        "echo first-line; echo oops-line >&2; exit 3",
    ));
    let s = solve(&w.worker, &run.root()).await;
    let err = s.result.as_ref().expect_err("exit 3 must fail");
    let msg = err.to_string();
    assert!(
        msg.contains(
            "process \"/bin/sh -c echo first-line; echo oops-line >&2; exit 3\" did not complete successfully: exit code: 3"
        ),
        "{msg}"
    );
    assert!(msg.contains("oops-line"), "{msg}");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    // Output was streamed as logs too.
    assert!(s.logs().contains("first-line"), "{}", s.logs());
    // Nothing left mounted.
    assert_eq!(mounts_under(&w.root()), Vec::<String>::new());

    // A process that cannot start at all is named the same way, with runc's reason
    // (TestClientGatewayEmptyImageExec).
    let run = base.run(RunOpts::args(["no-such-binary-berth", "x"]));
    let s = solve(&w.worker, &run.root()).await;
    let err = s
        .result
        .as_ref()
        .expect_err("a missing executable must fail");
    let msg = err.to_string();
    assert!(
        msg.contains("process \"no-such-binary-berth x\" did not complete successfully: "),
        "{msg}"
    );
    assert!(msg.contains("no-such-binary-berth"), "{msg}");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert_eq!(mounts_under(&w.root()), Vec::<String>::new());
    Ok(())
}

/// A cache mount keeps its content across builds (different steps, same ID); a tmpfs is a
/// tmpfs and leaves nothing in the layer.
#[tokio::test]
async fn exec_cache_mount_and_tmpfs() -> Result<()> {
    let _timing = shared().await;
    let w = TestWorker::new()?;
    let (_img, base) = base().await?;
    for (i, sharing) in [CacheSharing::Shared, CacheSharing::Locked]
        .into_iter()
        .enumerate()
    {
        let run = base.run(
            RunOpts::shell(format!("echo run{i} >> /cache/log; cp /cache/log /log"))
                .mount(Mount::cache("/cache", "berth-test-cache", sharing)),
        );
        let s = solve(&w.worker, &run.root()).await;
        let want: String = (0..=i).map(|j| format!("run{j}\n")).collect();
        assert_eq!(read(s.ok(), "/log").await?.as_deref(), Some(want.as_str()));
        assert_eq!(
            read(s.ok(), "/cache/log").await?,
            None,
            "cache content in layer"
        );
    }
    let run = base.run(
        RunOpts::shell("grep ' /scratch tmpfs ' /proc/mounts > /m; echo x > /scratch/f")
            .mount(Mount::tmpfs("/scratch", 1 << 20)),
    );
    let s = solve(&w.worker, &run.root()).await;
    let m = read(s.ok(), "/m").await?.unwrap();
    assert!(m.contains("size=1024k"), "{m}");
    assert_eq!(read(s.ok(), "/scratch/f").await?, None);
    Ok(())
}

/// `network=none` has only loopback.
#[tokio::test]
async fn exec_network_none() -> Result<()> {
    let _timing = shared().await;
    let w = TestWorker::new()?;
    let (_img, base) = base().await?;
    let run =
        base.run(RunOpts::shell("ls /sys/class/net | tr '\\n' ' ' > /ifs").network(NetMode::None));
    let s = solve(&w.worker, &run.root()).await;
    assert_eq!(read(s.ok(), "/ifs").await?.as_deref(), Some("lo "));
    Ok(())
}

/// Two independent one-second steps run concurrently.
#[tokio::test]
async fn exec_parallel() -> Result<()> {
    let _timing = exclusive().await;
    let w = TestWorker::new()?;
    let (_img, base) = base().await?;
    // Resolve the image first so that only the execs are timed.
    solve(&w.worker, &base).await.ok();
    let a = base.run(RunOpts::shell("sleep 1; echo a > /a")).root();
    let b = base.run(RunOpts::shell("sleep 1; echo b > /b")).root();
    let both = llb::merge(&[llb::diff(&base, &a), llb::diff(&base, &b)]);
    let s = solve(&w.worker, &both).await;
    let r = s.ok();
    eprintln!("two parallel 1 s execs + merge: {:?}", s.elapsed);
    assert_eq!(read(r, "/a").await?.as_deref(), Some("a\n"));
    assert_eq!(read(r, "/b").await?.as_deref(), Some("b\n"));
    assert!(s.elapsed < Duration::from_secs(2), "took {:?}", s.elapsed);
    Ok(())
}

/// Canceling a build kills the process and releases every mount.
#[tokio::test]
async fn exec_cancel() -> Result<()> {
    let _timing = shared().await;
    let w = TestWorker::new()?;
    let (_img, base) = base().await?;
    solve(&w.worker, &base).await.ok();
    let run = base.run(RunOpts::shell("touch /started; sleep 60"));
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        c2.cancel();
    });
    let start = Instant::now();
    let s = solve_with(
        &w.worker,
        &run.root(),
        Arc::new(TestSession::default()),
        cancel,
    )
    .await;
    let err = s.result.expect_err("canceled");
    assert_eq!(err.kind(), ErrorKind::Canceled, "{err}");
    assert!(start.elapsed() < Duration::from_secs(10));
    // Cleanup finishes in the exec task; poll for it.
    let runc_root = w.root().join("executor/runc");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mounts = mounts_under(&w.root());
        let list = std::process::Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["list", "-q"])
            .output()?;
        let containers = String::from_utf8_lossy(&list.stdout).trim().to_string();
        if mounts.is_empty() && containers.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: mounts {mounts:?}, containers {containers:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Selectors mount a sub-directory or a single file of the input, read-only or writable with
/// an output (the output is the whole input with the changes); a read-only root stays
/// read-only; mount stubs are removed from the root layer.
#[tokio::test]
async fn exec_selectors_and_readonly() -> Result<()> {
    let _timing = shared().await;
    let w = TestWorker::new()?;
    let (_img, base) = base().await?;
    let data = base
        .run(RunOpts::shell(
            "mkdir -p /d/sub && echo inner > /d/sub/f && echo single > /d/one",
        ))
        .root();
    let run = base.run(
        RunOpts::shell(
            "cat /ro/f > /res; cat /file >> /res; echo new > /rw/g; \
             touch /ro/x 2>/dev/null && echo ro-writable >> /res; true",
        )
        .mount(Mount::bind("/ro", &data).selector("/d/sub").readonly())
        .mount(Mount::bind("/file", &data).selector("/d/one").readonly())
        .mount(Mount::bind("/rw", &data).selector("/d/sub")),
    );
    let s = solve(&w.worker, &run.root()).await;
    let root = s.ok();
    assert_eq!(
        read(root, "/res").await?.as_deref(),
        Some("inner\nsingle\n")
    );
    let m = root.mount().await?;
    for stub in ["ro", "file", "rw"] {
        assert!(!m.path().join(stub).exists(), "mount stub /{stub} left");
    }
    drop(m);
    let rw = solve(&w.worker, &run.get_mount("/rw").unwrap()).await;
    assert_eq!(read(rw.ok(), "/d/sub/g").await?.as_deref(), Some("new\n"));
    assert_eq!(read(rw.ok(), "/d/sub/f").await?.as_deref(), Some("inner\n"));

    // Selector escaping through a symlink stays inside the input.
    let esc = base
        .run(RunOpts::shell("ln -s ../../../../etc /esc"))
        .root();
    let run = base.run(
        RunOpts::shell("cat /m > /res")
            .mount(Mount::bind("/m", &esc).selector("/esc/passwd").readonly()),
    );
    let s = solve(&w.worker, &run.root()).await;
    // /esc resolves to the input's own /etc/passwd (busybox's), not the host's.
    let got = read(s.ok(), "/res").await?.unwrap();
    let host = std::fs::read_to_string("/etc/passwd")?;
    assert!(
        got.contains("user:x:1000:1000:user:/home/user:/bin/sh") && got != host,
        "{got}"
    );

    let ro_out = base.run(
        RunOpts::shell("(touch /x 2>/dev/null && echo writable || echo readonly) > /out/r")
            .readonly_root()
            .mount(Mount::bind("/out", &llb::scratch())),
    );
    let s = solve(&w.worker, &ro_out.get_mount("/out").unwrap()).await;
    assert_eq!(read(s.ok(), "/r").await?.as_deref(), Some("readonly\n"));
    Ok(())
}

/// Cache sharing: LOCKED users of one cache run one after the other, SHARED ones at the same
/// time, PRIVATE ones concurrently in different directories.
#[tokio::test]
async fn exec_cache_sharing_modes() -> Result<()> {
    let _timing = exclusive().await;
    let w = TestWorker::new()?;
    let (_img, base) = base().await?;
    solve(&w.worker, &base).await.ok();
    let pair = |sharing: CacheSharing, id: &str| {
        let run = |n: u32| {
            base.run(
                RunOpts::shell(format!(
                    "ls /c > /seen; echo {n} > /c/{n}; sleep 2; cp /seen /out/seen"
                ))
                .mount(Mount::cache("/c", id.to_string(), sharing))
                .mount(Mount::bind("/out", &llb::scratch())),
            )
            .get_mount("/out")
            .unwrap()
        };
        llb::merge(&[run(1), run(2)])
    };
    let s = solve(&w.worker, &pair(CacheSharing::Locked, "locked")).await;
    s.ok();
    eprintln!("locked pair: {:?}", s.elapsed);
    // Serialized: at least two full sleeps; concurrent: less than that.
    assert!(s.elapsed >= Duration::from_secs(4), "{:?}", s.elapsed);
    let s = solve(&w.worker, &pair(CacheSharing::Shared, "shared")).await;
    s.ok();
    eprintln!("shared pair: {:?}", s.elapsed);
    assert!(s.elapsed < Duration::from_secs(4), "{:?}", s.elapsed);
    let s = solve(&w.worker, &pair(CacheSharing::Private, "private")).await;
    eprintln!("private pair: {:?}", s.elapsed);
    assert!(s.elapsed < Duration::from_secs(4), "{:?}", s.elapsed);
    // Each private user started from an empty directory of its own.
    assert_eq!(read(s.ok(), "/seen").await?.as_deref(), Some(""));
    let dirs = std::fs::read_dir(w.root().join("worker/cache"))?
        .flatten()
        .map(|e| {
            std::fs::read_dir(e.path())
                .unwrap()
                .flatten()
                .filter(|i| i.path().is_dir())
                .count()
        })
        .max();
    assert_eq!(dirs, Some(2), "private users should get two instances");
    Ok(())
}

/// An exec with no-cache (`ignore_cache`) starts from empty cache mounts of its IDs, which
/// buildkitd prunes before such a build; other caches keep their content (TestCacheMountNoCache).
#[tokio::test]
async fn exec_no_cache_empties_its_cache_mounts() -> Result<()> {
    let _timing = shared().await;
    let w = TestWorker::new()?;
    let (_img, base) = base().await?;
    let m1 = || Mount::cache("/m1", "berth-test-nocache-1", CacheSharing::Locked);
    let m2 = || Mount::cache("/m2", "berth-test-nocache-2", CacheSharing::Locked);
    let first = base.run(
        RunOpts::shell("touch /m1/foo /m2/bar")
            .mount(m1())
            .mount(m2()),
    );
    solve(&w.worker, &first.root()).await.ok();
    let check = "test -f /m1/foo && test -f /m2/bar && echo kept > /seen";
    let kept = base.run(RunOpts::shell(check).mount(m1()).mount(m2()));
    let s = solve(&w.worker, &kept.root()).await;
    assert_eq!(read(s.ok(), "/seen").await?.as_deref(), Some("kept\n"));
    let no_cache = base
        .run(RunOpts::shell("test ! -e /m1/foo && touch /m1/foo2").mount(m1()))
        .root()
        .ignore_cache();
    solve(&w.worker, &no_cache).await.ok();
    let after = base.run(
        RunOpts::shell(
            "test ! -e /m1/foo && test -f /m1/foo2 && test -f /m2/bar && echo ok > /seen",
        )
        .mount(m1())
        .mount(m2()),
    );
    let s = solve(&w.worker, &after.root()).await;
    assert_eq!(read(s.ok(), "/seen").await?.as_deref(), Some("ok\n"));
    Ok(())
}

/// `security=insecure` needs the entitlement from both the worker and the build; granted, the
/// process has the full capability set. `network=host` sees the host's interfaces.
#[tokio::test]
async fn exec_entitlements() -> Result<()> {
    let _timing = shared().await;
    let (_img, base) = base().await?;
    let caps = base.run(
        RunOpts::shell("grep CapEff /proc/self/status > /caps")
            .security(llb::SecurityMode::Insecure),
    );
    // Worker does not allow it.
    let w = TestWorker::new()?;
    let def = caps.root().marshal()?;
    let (sink, _rx) = worker::ProgressSink::channel();
    let ctx = worker::SolveContext::new(
        "ent",
        Arc::new(TestSession::default()),
        sink,
        CancellationToken::new(),
    )
    .with_entitlements(vec!["security.insecure".into()]);
    let err = w.worker.solve(def, ctx).await.expect_err("not allowed");
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");

    let w = TestWorker::with_entitlements(&["security.insecure", "network.host"])?;
    let ents = vec!["security.insecure".to_string(), "network.host".to_string()];
    let s = solve_ent(&w.worker, &caps.root(), ents.clone()).await;
    let c = read(s.ok(), "/caps").await?.unwrap();
    let host = std::fs::read_to_string("/proc/self/status")?;
    let host_eff = host.lines().find(|l| l.starts_with("CapEff")).unwrap();
    assert_eq!(
        c.trim(),
        host_eff.trim(),
        "insecure exec lacks capabilities"
    );
    let sandbox = base.run(RunOpts::shell("grep CapEff /proc/self/status > /caps"));
    let s = solve_ent(&w.worker, &sandbox.root(), ents.clone()).await;
    assert_ne!(
        read(s.ok(), "/caps").await?.unwrap().trim(),
        host_eff.trim()
    );

    let net = base.run(RunOpts::shell("ls /sys/class/net | wc -l > /n").network(NetMode::Host));
    let s = solve_ent(&w.worker, &net.root(), ents).await;
    let n: usize = read(s.ok(), "/n").await?.unwrap().trim().parse()?;
    let host_n = std::fs::read_dir("/sys/class/net")?.count();
    assert_eq!(n, host_n);
    Ok(())
}

/// A cache mount with an input is seeded from it (its selector) when first created; the llb
/// crate has no constructor for this, so the exec op is edited by hand and re-digested.
#[tokio::test]
async fn exec_cache_mount_seeded_from_input() -> Result<()> {
    let _timing = shared().await;
    use prost::Message as _;
    use sha2::Digest as _;
    let w = TestWorker::new()?;
    let (_img, base) = base().await?;
    let run = base
        .run(
            RunOpts::shell("cat /c/group > /seen; echo more >> /c/group").mount(Mount::cache(
                "/c",
                "seeded",
                CacheSharing::Shared,
            )),
        )
        .root();
    let mut def = run.marshal()?;
    let n = def.def.len();
    // The exec op is the one before the terminal op; its input 0 is the image.
    let mut op = llb::pb::Op::decode(def.def[n - 2].clone())?;
    let Some(llb::pb::op::Op::Exec(e)) = op.op.as_mut() else {
        panic!("not an exec op")
    };
    let m = e.mounts.iter_mut().find(|m| m.dest == "/c").unwrap();
    m.input = 0;
    m.selector = "/etc".into();
    let bytes = op.encode_to_vec();
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)));
    let mut term = llb::pb::Op::decode(def.def[n - 1].clone())?;
    term.inputs[0].digest = digest;
    def.def[n - 2] = bytes.into();
    def.def[n - 1] = term.encode_to_vec().into();
    def.metadata.clear();
    let s = solve_def(
        &w.worker,
        def.clone(),
        Arc::new(TestSession::default()),
        CancellationToken::new(),
    )
    .await;
    let seen = read(s.ok(), "/seen").await?.unwrap();
    assert!(seen.starts_with("root:x:0:"), "{seen}");
    assert!(!seen.contains("more"));
    // The image's own /etc/group is untouched.
    assert!(!read(s.ok(), "/etc/group").await?.unwrap().contains("more"));
    Ok(())
}

/// A read-only mount with a selector keys the step by the selected content: a change elsewhere
/// in that input keeps the step cached, a change inside the selection re-runs it.
#[tokio::test]
async fn exec_selector_content_key() -> Result<()> {
    let _timing = shared().await;
    let w = TestWorker::new()?;
    let (_img, base) = base().await?;
    let data = |inner: &str, other: &str| {
        base.run(RunOpts::shell(format!(
            "mkdir -p /d/sub && echo {inner} > /d/sub/f && echo {other} > /other"
        )))
        .root()
    };
    let step = |d: &llb::State| {
        base.run(
            RunOpts::shell("cat /m/f > /res")
                .mount(Mount::bind("/m", d).selector("/d/sub").readonly()),
        )
        .root()
    };
    let s1 = solve(&w.worker, &step(&data("x", "1"))).await;
    assert_eq!(read(s1.ok(), "/res").await?.as_deref(), Some("x\n"));
    // Only /other differs: the data step runs, the reading step is cached.
    let s2 = solve(&w.worker, &step(&data("x", "2"))).await;
    s2.ok();
    let done = s2.completed();
    let cat = done.iter().find(|(n, _)| n.contains("cat /m/f")).unwrap();
    assert!(cat.1, "step re-ran: {done:?}");
    let writer = done.iter().find(|(n, _)| n.contains("echo 2")).unwrap();
    assert!(!writer.1);
    // The selected file differs: the step runs.
    let s3 = solve(&w.worker, &step(&data("y", "2"))).await;
    assert_eq!(read(s3.ok(), "/res").await?.as_deref(), Some("y\n"));
    let done = s3.completed();
    assert!(!done.iter().find(|(n, _)| n.contains("cat /m/f")).unwrap().1);
    Ok(())
}

/// A writable mount without an output (a Dockerfile `RUN --mount=from=…,src=…,rw`) is keyed by
/// the selected content too, as buildkitd does (upstream TestMountRWCache): the step's own
/// writes to it are discarded, so a change elsewhere in the input keeps the step cached.
#[tokio::test]
async fn exec_rw_no_output_mount_content_key() -> Result<()> {
    let _timing = shared().await;
    let w = TestWorker::new()?;
    let (_img, base) = base().await?;
    let data = |other: &str| {
        base.run(RunOpts::shell(format!(
            "mkdir -p /out && echo foo > /out/foo && echo {other} > /other"
        )))
        .root()
    };
    let step = |d: &llb::State| {
        base.run(
            RunOpts::shell("touch /m/bar && head -c 32 /dev/urandom | od -x > /unique")
                .mount(Mount::bind("/m", d).selector("/out").no_output()),
        )
        .root()
    };
    let s1 = solve(&w.worker, &step(&data("1"))).await;
    let u1 = read(s1.ok(), "/unique").await?.unwrap();
    // Only /other differs: the data step runs, the step mounting /out is cached.
    let s2 = solve(&w.worker, &step(&data("2"))).await;
    let u2 = read(s2.ok(), "/unique").await?.unwrap();
    let done = s2.completed();
    assert!(!done.iter().find(|(n, _)| n.contains("echo 2")).unwrap().1);
    let rw = done
        .iter()
        .find(|(n, _)| n.contains("touch /m/bar"))
        .unwrap();
    assert!(rw.1, "step re-ran: {done:?}");
    assert_eq!(u1, u2);
    Ok(())
}

/// One exec mounting the same cache twice (same ID, LOCKED, also PRIVATE) gets one directory at
/// both mount points, as buildkitd's per-exec mount manager gives; a LOCKED cache does not wait
/// for itself (upstream TestDuplicateCacheMount deadlocked berthd).
#[tokio::test]
async fn exec_same_cache_mounted_twice() -> Result<()> {
    let _timing = shared().await;
    let w = TestWorker::new()?;
    let (_img, base) = base().await?;
    for (sharing, id) in [
        (CacheSharing::Locked, "dup-locked"),
        (CacheSharing::Private, "dup-private"),
    ] {
        let run = base
            .run(
                RunOpts::shell("[ ! -f /m2/foo ]; touch /m1/foo; [ -f /m2/foo ]")
                    .mount(Mount::cache("/m1", id, sharing))
                    .mount(Mount::cache("/m2", id, sharing)),
            )
            .root();
        let s = tokio::time::timeout(Duration::from_secs(60), solve(&w.worker, &run))
            .await
            .context("a cache mounted twice in one exec must not wait for itself")?;
        s.ok();
    }
    Ok(())
}

/// A rootfs without `/dev`, `/proc` and `/sys`: runc creates them as mount points and, as in
/// stock BuildKit (v0.11.6 and master), they stay in the result as empty root-owned 0755 dirs;
/// the `/etc/hosts` and `/etc/resolv.conf` stubs do not.
#[tokio::test]
async fn exec_keeps_runc_mount_points() -> Result<()> {
    let _timing = shared().await;
    let w = TestWorker::new()?;
    let (_img, base) = base().await?;
    let stripped = base.file(
        llb::rm("/dev", llb::RmOpts::default())
            .rm("/proc", llb::RmOpts::default())
            .rm("/sys", llb::RmOpts::default())
            .rm("/etc/hosts", llb::RmOpts::default().allow_not_found(true))
            .rm(
                "/etc/resolv.conf",
                llb::RmOpts::default().allow_not_found(true),
            ),
    );
    let run = stripped.run(RunOpts::shell("true")).root();
    let s = solve(&w.worker, &run).await;
    let m = s.ok().mount().await?;
    for d in ["dev", "proc", "sys"] {
        let md = std::fs::symlink_metadata(m.path().join(d))?;
        assert!(md.is_dir(), "{d}");
        assert_eq!(md.permissions().mode() & 0o7777, 0o755, "{d}");
        assert_eq!((md.uid(), md.gid()), (0, 0), "{d}");
        assert_eq!(
            std::fs::read_dir(m.path().join(d))?.count(),
            0,
            "{d} is empty"
        );
    }
    for f in ["etc/hosts", "etc/resolv.conf"] {
        assert!(
            std::fs::symlink_metadata(m.path().join(f)).is_err(),
            "{f} stub left behind"
        );
    }
    Ok(())
}

/// upstream TestMountStubsTimestamp: dirs a step only touched keep their new mtime in its result,
/// also the parents of file mount stubs (`/etc` for hosts/resolv.conf) and of tmpfs mount points
/// (`/var`, `/tmp`), whose stubs are removed with the parent's times put back.
#[tokio::test]
async fn exec_touched_dirs_keep_their_mtime() -> Result<()> {
    let _timing = shared().await;
    let w = TestWorker::new()?;
    let (_img, base) = base().await?;
    let run = base
        .run(
            RunOpts::args([
                "/bin/touch",
                "--date=@1234567890",
                "/bin",
                "/etc",
                "/var",
                "/var/foo",
                "/tmp",
                "/tmp/foo2",
                "/tmp/foo2/bar",
            ])
            .mount(Mount::tmpfs("/var/foo", 0))
            .mount(Mount::tmpfs("/tmp/foo2/bar", 0)),
        )
        .root();
    let s = solve(&w.worker, &run).await;
    let m = s.ok().mount().await?;
    for d in ["bin", "etc", "var", "tmp"] {
        let md = std::fs::symlink_metadata(m.path().join(d))?;
        assert_eq!(md.mtime(), 1_234_567_890, "{d}");
    }
    Ok(())
}
