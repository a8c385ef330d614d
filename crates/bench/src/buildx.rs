//! Scenario 10: a cached Dockerfile rebuild through `docker buildx` (issue #11), berthd next to
//! stock buildkitd v0.11.6 in the same run, both reached through buildx's `remote` driver (the way
//! users attach buildx to a daemon they run themselves).
//!
//! buildx is Debian 13's `docker-buildx` 0.13.1 (`.ci/run` unpacks it), run in standalone mode
//! with its own `DOCKER_CONFIG` so the builders it creates never touch the user's. The Dockerfile
//! is the everyday shape: `FROM` a base in a local registry (stock cannot use Docker's images, so
//! both daemons resolve the same registry reference), a `RUN`, a `COPY` of a 20-file context, and a
//! second `RUN`. After one executing build and one cached warm-up per daemon, paired rounds (order
//! swapped every round) time buildx's whole process:
//! - no output (what a CI lint/test stage or `docker buildx build .` with the remote driver does);
//! - the image made runnable in the local Docker: stock with `--load` (buildx streams the
//!   docker-format tar from buildkitd and `docker load`s it) and berthd with
//!   `--output type=image,name=…` (berth's fast path: the image lands in the Docker Engine berthd
//!   is bound to, here the same one), plus berthd with `--load` too, for the same flags.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use anyhow::{ensure, Context as _, Result};

use crate::report::{median, Unit};
use crate::{berthd, buildkitd, Bench, SYSTEM_DOCKER};

/// Paired rounds per case after the warm-up.
const ROUNDS: usize = 9;

/// Where docker-buildx is looked for unless `BERTH_BENCH_BUILDX` names it.
const BUILDX_PATHS: &[&str] = &[
    "/var/cache/berth/trixie/root/usr/libexec/docker/cli-plugins/docker-buildx",
    "/root/.docker/cli-plugins/docker-buildx",
    "/usr/libexec/docker/cli-plugins/docker-buildx",
];

fn buildx_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BERTH_BENCH_BUILDX") {
        return Some(p.into());
    }
    BUILDX_PATHS.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// buildx in standalone mode with a private config dir.
struct Buildx {
    bin: PathBuf,
    config: PathBuf,
}

impl Buildx {
    async fn run(&self, args: &[&str]) -> Result<String> {
        let out = tokio::process::Command::new(&self.bin)
            .args(args)
            .env("DOCKER_CONFIG", &self.config)
            .env("BUILDX_NO_DEFAULT_ATTESTATIONS", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("run {}", self.bin.display()))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            out.status.success(),
            "buildx {} failed ({}):\n{text}",
            args.join(" "),
            out.status
        );
        Ok(text)
    }

    /// A `remote` builder named `name` for the daemon at `addr` (`unix://…`).
    async fn create(&self, name: &str, addr: &str) -> Result<()> {
        self.run(&["create", "--name", name, "--driver", "remote", addr])
            .await?;
        // `inspect --bootstrap` fails unless the daemon answers the remote driver's checks.
        self.run(&["inspect", "--bootstrap", name]).await?;
        Ok(())
    }

    /// One `buildx build`; returns its wall time and its progress log.
    async fn build(&self, builder: &str, ctx: &Path, output: &[&str]) -> Result<(f64, String)> {
        let ctx = ctx.display().to_string();
        let mut args = vec!["build", "--builder", builder, "--progress=plain"];
        args.extend_from_slice(output);
        args.push(&ctx);
        let t = Instant::now();
        let log = self.run(&args).await?;
        Ok((t.elapsed().as_secs_f64(), log))
    }
}

/// Whether every step of a buildx progress log was served from the cache (no `RUN` executed).
pub(crate) fn all_cached(log: &str) -> bool {
    // A step that ran prints its output or `DONE` without a preceding `CACHED`; plain progress
    // prints `#N CACHED` for steps served from the cache.
    let run_steps: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("] RUN "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    !run_steps.is_empty()
        && run_steps
            .iter()
            .all(|n| log.lines().any(|l| l.trim() == format!("{n} CACHED")))
}

/// Scenario 10 (see the module docs).
pub async fn scenario_buildx(b: &mut Bench) -> Result<()> {
    let Some(bin) = buildx_bin() else {
        eprintln!("scenario 10: not run (no docker-buildx: set BERTH_BENCH_BUILDX; .ci/run unpacks Debian 13's)");
        return Ok(());
    };
    let Some((stock_d, stock_c)) = buildkitd::from_env() else {
        eprintln!("scenario 10: not run (no stock buildkitd/buildctl: --stock-bin DIR)");
        return Ok(());
    };
    eprintln!("scenario 10: cached Dockerfile rebuild through buildx, berthd vs stock buildkitd");
    let bx = Buildx {
        bin,
        config: b.scratch.join("buildx-config"),
    };
    std::fs::create_dir_all(&bx.config)?;
    let base = b.base_image("buildx-base", 0, 10).await?;
    let stock =
        buildkitd::Stock::start(&stock_d, &stock_c, &b.scratch.join("buildx-stock")).await?;
    let remote_base = stock.push(&base).await?;
    let ctx = b.scratch.join("buildx-ctx");
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
            "FROM {remote_base}\nRUN echo built > /built\nCOPY src /app/src\nRUN ls /app/src > /app/listing\n"
        ),
    )?;
    let bin_berthd = Bench::berthd_bin()?;
    let berth =
        berthd::Berthd::start(&bin_berthd, &b.scratch.join("buildx-berthd"), SYSTEM_DOCKER).await?;
    let tag = std::process::id();
    let (bb, bs) = (format!("berth-bench-{tag}"), format!("stock-bench-{tag}"));
    bx.create(&bb, &format!("unix://{}", berth.socket().display()))
        .await?;
    bx.create(&bs, stock.addr()).await?;
    let name_image = format!("{}buildx-image:bench", b.tag_prefix);
    let name_load_b = format!("{}buildx-load-berth:bench", b.tag_prefix);
    let name_load_s = format!("{}buildx-load-stock:bench", b.tag_prefix);
    b.images
        .extend([name_image.clone(), name_load_b.clone(), name_load_s.clone()]);
    let out_image = format!("type=image,name={name_image}");
    let tag_b = format!("--tag={name_load_b}");
    let tag_s = format!("--tag={name_load_s}");
    // (label, builder, output flags)
    let cases: [(&str, &str, Vec<&str>); 5] = [
        ("berthd, no output", &bb, vec![]),
        ("stock, no output", &bs, vec![]),
        (
            "berthd, `--output type=image`",
            &bb,
            vec!["--output", &out_image],
        ),
        ("berthd, `--load`", &bb, vec!["--load", &tag_b]),
        ("stock, `--load`", &bs, vec!["--load", &tag_s]),
    ];
    let mut samples: Vec<Vec<f64>> = vec![vec![]; cases.len()];
    let res = async {
        // The executing build and a cached warm-up of every case.
        for (label, builder, out) in &cases {
            for _ in 0..2 {
                bx.build(builder, &ctx, out)
                    .await
                    .with_context(|| format!("warm-up: {label}"))?;
            }
        }
        for round in 0..ROUNDS {
            let order: Vec<usize> = if round % 2 == 0 {
                (0..cases.len()).collect()
            } else {
                (0..cases.len()).rev().collect()
            };
            for i in order {
                let (label, builder, out) = &cases[i];
                let (took, log) = bx.build(builder, &ctx, out).await?;
                ensure!(
                    all_cached(&log),
                    "{label}: a RUN step was not served from the cache:\n{log}"
                );
                samples[i].push(took);
            }
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let _ = bx.run(&["rm", &bb]).await;
    let _ = bx.run(&["rm", &bs]).await;
    berth.terminate().await?;
    stock.stop().await?;
    res?;
    let m: Vec<f64> = samples.iter().map(|s| median(s)).collect();
    let ratio = |num: f64, den: f64, what: &str| {
        if den > 0.0 {
            format!("{what} = {:.2}×", num / den)
        } else {
            "n/a".into()
        }
    };
    let note = "buildx 0.13.1 remote driver; FROM (local registry) + RUN + COPY 20 files + RUN; every RUN CACHED (checked)";
    let mut s = samples.into_iter();
    b.row(
        10,
        "cached Dockerfile rebuild through buildx, no output: berthd".into(),
        s.next().unwrap_or_default(),
        Unit::Secs,
        ratio(m[0], m[1], "berthd / stock"),
        note.into(),
    );
    b.row(
        10,
        "same, stock buildkitd".into(),
        s.next().unwrap_or_default(),
        Unit::Secs,
        String::new(),
        note.into(),
    );
    b.row(10, "cached rebuild made runnable in Docker: berthd `--output type=image` (lands in the bound Docker)".into(), s.next().unwrap_or_default(), Unit::Secs, ratio(m[2], m[4], "berthd type=image / stock --load"), note.into());
    b.row(
        10,
        "same, berthd with `--load` (docker-format tar to buildx, `docker load`)".into(),
        s.next().unwrap_or_default(),
        Unit::Secs,
        ratio(m[3], m[4], "berthd --load / stock --load"),
        note.into(),
    );
    b.row(
        10,
        "same, stock buildkitd with `--load`".into(),
        s.next().unwrap_or_default(),
        Unit::Secs,
        String::new(),
        note.into(),
    );
    Ok(())
}
