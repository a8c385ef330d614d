//! Scenario 12: a second build node's cached build from a registry cache (issue #15), berthd next
//! to stock buildkitd v0.11.6 in the same run, both driven by the same stock `buildctl`.
//!
//! Node A of each daemon builds a Dockerfile (`FROM` a base in a local registry, two `RUN`s that
//! write incompressible layers, a `COPY` of a small context) and exports its cache with
//! `--export-cache type=registry,mode=max` to that registry (each daemon its own cache ref: the
//! two use different cache keys). Then, every round, node B is a daemon started on an empty root
//! that builds the same Dockerfile with `--import-cache type=registry,ref=…` through the
//! `dockerfile.v0` frontend (buildctl passes imports to a frontend, not to LLB on stdin), every
//! `RUN` must come from the cache (checked in the progress), and the image must end up runnable in
//! the local Docker:
//! - berthd: `--output type=image,name=…` (the image lands in the Docker Engine berthd is bound
//!   to; the base is already there, as on a build host whose Docker holds it, so only the cached
//!   layers Docker lacks are downloaded and registered);
//! - stock: `--output type=docker,name=… | docker load` (how stock gets an image into Docker; a
//!   fresh root pulls the base from the registry as well, which is what stock has to do);
//! - stock without an output, for the cost of the cache import alone.
//!
//! The time is `buildctl build`'s wall time (with `docker load` for the piped case); daemon start
//! and stop are outside it. The result image is removed from Docker before each round.

use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use anyhow::{ensure, Context as _, Result};

use crate::report::{median, Unit};
use crate::{berthd, buildkitd, buildx, rmi, sz, Bench, MIB, SYSTEM_DOCKER};

/// Measured rounds (each starts fresh node-B daemons).
const ROUNDS: usize = 5;

/// What node B's build writes.
enum Output<'a> {
    None,
    /// `--output type=image,name=…` (berthd: into the bound Docker).
    Image(&'a str),
    /// `--output type=docker,name=…` piped into `docker load`.
    DockerLoad(&'a str),
}

/// `buildctl build --frontend dockerfile.v0` of `ctx` with `extra` flags; returns the wall time
/// (until `docker load` has exited for [`Output::DockerLoad`]) and the plain progress log.
async fn build(
    buildctl: &Path,
    addr: &str,
    ctx: &Path,
    extra: &[String],
    output: Output<'_>,
) -> Result<(f64, String)> {
    let mut cmd = tokio::process::Command::new(buildctl);
    cmd.arg("--addr")
        .arg(addr)
        .arg("build")
        .arg("--progress=plain")
        .arg("--frontend")
        .arg("dockerfile.v0")
        .arg("--local")
        .arg(format!("context={}", ctx.display()))
        .arg("--local")
        .arg(format!("dockerfile={}", ctx.display()))
        .args(extra);
    match output {
        Output::None => {}
        Output::Image(name) => {
            cmd.arg("--output").arg(format!("type=image,name={name}"));
        }
        Output::DockerLoad(name) => {
            cmd.arg("--output").arg(format!("type=docker,name={name}"));
        }
    }
    let t = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("run {}", buildctl.display()))?;
    let stdout = child.stdout.take().context("buildctl stdout")?;
    let load = match output {
        Output::DockerLoad(_) => {
            let archive: Stdio = stdout
                .try_into()
                .context("pipe buildctl into docker load")?;
            Some(
                tokio::process::Command::new("docker")
                    .arg("load")
                    .stdin(archive)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .context("run docker load")?,
            )
        }
        _ => None,
    };
    let out = child.wait_with_output().await?;
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        out.status.success(),
        "buildctl build against {addr} failed ({}):\n{log}",
        out.status
    );
    if let Some(load) = load {
        let l = load.wait_with_output().await?;
        ensure!(
            l.status.success(),
            "docker load failed: {}",
            String::from_utf8_lossy(&l.stderr).trim()
        );
    }
    Ok((t.elapsed().as_secs_f64(), log))
}

/// `docker run --rm IMAGE cat /one` prints what node A's first RUN wrote.
async fn check_runs(image: &str) -> Result<()> {
    let out = crate::docker_cmd(&["run", "--rm", image, "cat", "/one"]).await?;
    ensure!(
        out.trim() == "one",
        "docker run of {image} printed {out:?}, not node A's /one"
    );
    Ok(())
}

/// Scenario 12 (see the module docs).
pub async fn scenario_node_b(b: &mut Bench) -> Result<()> {
    let Some((stock_d, buildctl)) = buildkitd::from_env() else {
        eprintln!("scenario 12: not run (no stock buildkitd/buildctl: --stock-bin DIR)");
        return Ok(());
    };
    let (l1, l2) = (sz(b.scale, 64 * MIB), sz(b.scale, 16 * MIB));
    let base_bytes = sz(b.scale, 256 * MIB);
    eprintln!(
        "scenario 12: node B's cached build from a registry cache, berthd vs stock buildkitd"
    );
    let dir = b.scratch.join("nodeb");
    let base = b.base_image("nodeb-base", base_bytes, 12).await?;
    let stock_a = buildkitd::Stock::start(&stock_d, &buildctl, &dir.join("stock-a")).await?;
    let registry = stock_a.registry_addr().to_string();
    let remote_base = stock_a.push(&base).await?;
    // berthd pulls the base into Docker on its first build; remove it with the bench's images.
    b.images.push(remote_base.clone());
    let ctx = dir.join("ctx");
    std::fs::create_dir_all(ctx.join("src"))?;
    for i in 0..20 {
        std::fs::write(
            ctx.join("src").join(format!("f{i}.txt")),
            format!("context file {i}\n"),
        )?;
    }
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {remote_base}\n\
             RUN busybox head -c {l1} /dev/urandom > /layer1 && echo one > /one\n\
             RUN busybox head -c {l2} /dev/urandom > /layer2\n\
             COPY src /app/src\n"
        ),
    )?;
    let cache = |who: &str| format!("{registry}/nodeb/cache:{who}");
    let export = |who: &str| {
        vec![
            "--export-cache".to_string(),
            format!("type=registry,ref={},mode=max", cache(who)),
        ]
    };
    let import = |who: &str| {
        vec![
            "--import-cache".to_string(),
            format!("type=registry,ref={}", cache(who)),
        ]
    };
    let berthd_bin = Bench::berthd_bin()?;
    let (name_b, name_s) = (
        format!("{}nodeb-berth:bench", b.tag_prefix),
        format!("{}nodeb-stock:bench", b.tag_prefix),
    );
    b.images.extend([name_b.clone(), name_s.clone()]);
    let mut samples: [Vec<f64>; 3] = Default::default();
    let res = async {
        // Node A of each daemon: the executing build that exports the cache.
        let berth_a =
            berthd::Berthd::start(&berthd_bin, &dir.join("berth-a"), SYSTEM_DOCKER).await?;
        let a = build(
            &buildctl,
            &berth_a.addr(),
            &ctx,
            &export("berth"),
            Output::None,
        )
        .await;
        berth_a.terminate().await?;
        a.context("node A (berthd): build and export the cache")?;
        build(
            &buildctl,
            stock_a.addr(),
            &ctx,
            &export("stock"),
            Output::None,
        )
        .await
        .context("node A (stock): build and export the cache")?;
        for round in 0..ROUNDS {
            let order: [usize; 3] = if round % 2 == 0 { [0, 1, 2] } else { [2, 1, 0] };
            for i in order {
                let node = dir.join(format!("node-b-{round}-{i}"));
                let (took, log) = if i == 0 {
                    rmi(&name_b).await;
                    let d = berthd::Berthd::start(&berthd_bin, &node, SYSTEM_DOCKER).await?;
                    let r = build(
                        &buildctl,
                        &d.addr(),
                        &ctx,
                        &import("berth"),
                        Output::Image(&name_b),
                    )
                    .await;
                    d.terminate().await?;
                    let r = r.context("node B (berthd)")?;
                    check_runs(&name_b).await?;
                    r
                } else {
                    let out = if i == 1 {
                        rmi(&name_s).await;
                        Output::DockerLoad(&name_s)
                    } else {
                        Output::None
                    };
                    let s =
                        buildkitd::Stock::start_on(&stock_d, &buildctl, &node, &registry).await?;
                    let r = build(&buildctl, s.addr(), &ctx, &import("stock"), out).await;
                    s.stop().await?;
                    let r = r.with_context(|| format!("node B (stock, case {i})"))?;
                    if i == 1 {
                        check_runs(&name_s).await?;
                    }
                    r
                };
                ensure!(
                    buildx::all_cached(&log),
                    "node B case {i}: a RUN step was not served from the imported cache:\n{log}"
                );
                samples[i].push(took);
                let _ = std::fs::remove_dir_all(&node);
            }
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    stock_a.stop().await?;
    res?;
    let m: Vec<f64> = samples.iter().map(|s| median(s)).collect();
    let note = format!(
        "FROM base {} (in Docker for berthd; pulled by stock's empty root) + RUN {} + RUN {} + COPY 20 files; node A exported `mode=max` to a local registry; node B an empty root, every RUN CACHED (checked), image runs (checked)",
        crate::human(base_bytes),
        crate::human(l1),
        crate::human(l2)
    );
    let [berth, stock_load, stock_none] = samples;
    b.row(
        12,
        "node B cached build from a registry cache, runnable in Docker: berthd `--output type=image`".into(),
        berth,
        Unit::Secs,
        if m[1] > 0.0 {
            format!("berthd / stock type=docker|docker load = {:.2}×", m[0] / m[1])
        } else {
            "n/a".into()
        },
        note.clone(),
    );
    b.row(
        12,
        "same, stock buildkitd `--output type=docker | docker load`".into(),
        stock_load,
        Unit::Secs,
        String::new(),
        note.clone(),
    );
    b.row(
        12,
        "same, stock buildkitd without an output (cache import alone, not runnable)".into(),
        stock_none,
        Unit::Secs,
        if m[2] > 0.0 {
            format!(
                "berthd (runnable) / stock (no output) = {:.2}×",
                m[0] / m[2]
            )
        } else {
            "n/a".into()
        },
        note,
    );
    Ok(())
}
