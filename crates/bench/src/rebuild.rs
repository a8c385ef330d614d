//! Scenario 9: rebuilds with a local context, berthd next to stock buildkitd v0.11.6, both driven
//! by the same stock `buildctl` binary (`BERTH_BENCH_BUILDCTL`) in the same run.
//!
//! The graph is a FileOp on scratch that copies the whole `local://ctx` to `/ctx` and adds a
//! file, built without an exporter (`buildctl build` with no `--output`): what is timed is the
//! session, the context transfer, the cache-key work and the solve, which is what a rebuild of a
//! project directory costs before any export. Two contexts: 20 small files, and 20 000 files
//! totalling 1 GiB (100 files per directory). Cases per context: a no-op rebuild (nothing
//! changed since the last build), and a one-file-changed rebuild (one file rewritten with new
//! content of the same size before each round, so the copy runs again on both daemons).
//!
//! Each case runs in rounds; a round builds once on each daemon, the order swapped every round,
//! so both see the same machine load; the 1-minute load average is sampled every round. Times
//! are `buildctl build`'s wall time (process start to exit), the same binary for both. For the
//! no-op cases, `buildctl`'s own CPU time is reported too: the client's walk of the context and
//! the listing it streams are the floor no daemon can go below (the target for the
//! 20 000-file no-op is 0.5× stock, so the floor row shows how much of that is the client's).
//!
//! Everything runs twice: on fresh roots (after one warm-up build), and on roots aged by
//! `BERTH_BENCH_AGE_BUILDS` earlier builds (default [`DEFAULT_AGE_BUILDS`]; the issue's "few
//! hundred" is e.g. 300), each with its own local name and [`AGE_CONTEXT_BYTES`] of fresh data,
//! so both roots hold their results and synced contexts.
//!
//! Last, berthd is restarted on its aged root with OpenTelemetry on (OTLP/gRPC to the collector
//! stand-in) and `buildctl` runs under a `TRACEPARENT`, so each build's spans share one trace:
//! the per-phase table is the median, over those builds, of each span name's summed duration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use llb::{CopyOpts, MkfileOpts};
use prost::Message as _;
use tokio::io::AsyncWriteExt as _;

use crate::report::{median, secs, Unit};
use crate::{berthd, buildkitd, collector, fixtures, human, loadavg_value, sz, Bench, GIB};

/// Paired rounds per case (after the warm-up).
const ROUNDS: usize = 9;
/// Paired rounds of the one-file-changed case with the large context (each copies 1 GiB twice).
const ROUNDS_LARGE_CHANGED: usize = 5;
/// Aging builds per daemon unless `BERTH_BENCH_AGE_BUILDS` says otherwise.
pub const DEFAULT_AGE_BUILDS: usize = 40;
/// Bytes of fresh data in each aging build's context (scaled by `--scale`).
const AGE_CONTEXT_BYTES: u64 = 8 << 20;
/// Traced berthd builds for the per-phase breakdown, per case.
const TRACED_BUILDS: usize = 7;

/// A client context and what it holds.
struct Ctx {
    label: &'static str,
    dir: PathBuf,
    files: u64,
    bytes: u64,
    /// The file the one-file-changed case rewrites.
    changed: PathBuf,
}

/// Where one build goes: a daemon address (the same buildctl for both).
struct Target<'a> {
    name: &'static str,
    addr: String,
    buildctl: &'a Path,
}

/// CPU time (user + system) of this process's children that have ended and been waited for,
/// from `/proc/self/stat` (`cutime`, `cstime`, in USER_HZ ticks, 100 per second on Linux).
/// Around one `buildctl` run (the daemons keep running, so they are not counted), the
/// difference is that `buildctl`'s CPU time: its walk of the context and sending the listing.
fn children_cpu() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) start at field 3.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            // cutime and cstime are fields 16 and 17 of the whole line.
            Some(f.get(13)?.parse::<u64>().ok()? + f.get(14)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// One `buildctl build`: wall time, and its own CPU time (see [`children_cpu`]).
struct Run {
    wall: Duration,
    client_cpu: Duration,
}

/// `buildctl --addr <addr> build --local <name>=<dir>` with `def` on stdin and no output;
/// returns its wall time.
async fn buildctl_build(
    t: &Target<'_>,
    def: &[u8],
    locals: &[(&str, &Path)],
    env: &[(&str, String)],
) -> Result<Duration> {
    Ok(buildctl_run(t, def, locals, env).await?.wall)
}

/// [`buildctl_build`] with the client's CPU time.
async fn buildctl_run(
    t: &Target<'_>,
    def: &[u8],
    locals: &[(&str, &Path)],
    env: &[(&str, String)],
) -> Result<Run> {
    let mut cmd = tokio::process::Command::new(t.buildctl);
    cmd.arg("--addr").arg(&t.addr).arg("build");
    for (name, dir) in locals {
        cmd.arg("--local").arg(format!("{name}={}", dir.display()));
    }
    cmd.env_remove("TRACEPARENT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let cpu_before = children_cpu();
    let start = Instant::now();
    let mut child = cmd
        .arg("--progress=plain")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("run {}", t.buildctl.display()))?;
    let mut stdin = child.stdin.take().context("buildctl stdin")?;
    stdin.write_all(def).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    let took = start.elapsed();
    let client_cpu = children_cpu().saturating_sub(cpu_before);
    ensure!(
        out.status.success(),
        "buildctl build against {} failed ({}): {}",
        t.name,
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(Run {
        wall: took,
        client_cpu,
    })
}

/// The scenario's graph for local name `name`.
fn graph(name: &str) -> Result<Vec<u8>> {
    let local: llb::State = llb::local(name).into();
    let st = llb::scratch()
        .file(llb::copy(
            &local,
            "/",
            "/ctx",
            CopyOpts::default().create_dest_path(true),
        ))
        .file(llb::mkfile(
            "/built",
            0o644,
            b"rebuild".to_vec(),
            MkfileOpts::default(),
        ));
    Ok(st.marshal()?.encode_to_vec())
}

fn make_ctx(dir: PathBuf, label: &'static str, files: u64, bytes: u64, seed: u64) -> Result<Ctx> {
    std::fs::create_dir_all(&dir)?;
    fixtures::write_tree(&dir, files, bytes, seed)?;
    Ok(Ctx {
        label,
        changed: dir.join("d0000/f000000"),
        dir,
        files,
        bytes,
    })
}

/// Samples of one case.
#[derive(Default)]
struct Pair {
    berth: Vec<f64>,
    stock: Vec<f64>,
    load: Vec<f64>,
    /// `buildctl`'s own CPU time per build (both daemons).
    client_cpu: Vec<f64>,
}

/// Runs `rounds` paired rounds; `before` runs before each round (e.g. changes a file).
async fn paired(
    targets: &[Target<'_>; 2],
    def: &[u8],
    ctx: &Ctx,
    rounds: usize,
    mut before: impl FnMut(usize) -> Result<()>,
) -> Result<Pair> {
    let mut p = Pair::default();
    for round in 0..rounds {
        before(round)?;
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let run = buildctl_run(&targets[i], def, &[("ctx", &ctx.dir)], &[]).await?;
            if i == 0 { &mut p.berth } else { &mut p.stock }.push(secs(run.wall));
            p.client_cpu.push(secs(run.client_cpu));
        }
        p.load.push(loadavg_value());
    }
    Ok(p)
}

fn rewrite(path: &Path, seed: u64) -> Result<()> {
    let len = std::fs::metadata(path)?.len();
    fixtures::write_blob(path, len, seed)
}

/// Scenario 9 (see the module docs).
pub async fn scenario_rebuild(b: &mut Bench) -> Result<()> {
    let Some((buildkitd_bin, buildctl)) = buildkitd::from_env() else {
        eprintln!("scenario 9: not run (no stock buildkitd/buildctl: --stock-bin DIR or BERTH_BENCH_BUILDKITD/BERTH_BENCH_BUILDCTL)");
        b.row(
            9,
            "rebuilds with a local context vs stock buildkitd".into(),
            vec![],
            Unit::Secs,
            String::new(),
            "not run: needs stock `buildctl` and `buildkitd` (`--stock-bin DIR`, or `BERTH_BENCH_BUILDCTL` and `BERTH_BENCH_BUILDKITD`)".into(),
        );
        return Ok(());
    };
    let age_builds = std::env::var("BERTH_BENCH_AGE_BUILDS")
        .ok()
        .map(|v| v.parse::<usize>())
        .transpose()
        .context("BERTH_BENCH_AGE_BUILDS: not a number")?
        .unwrap_or(DEFAULT_AGE_BUILDS);
    let bin = Bench::berthd_bin()?;
    let dir = b.scratch.join("rebuild");
    eprintln!("scenario 9: rebuilds with a local context, berthd vs stock buildkitd");
    let t = Instant::now();
    let (small, large) = {
        let (d1, d2) = (dir.join("ctx-small"), dir.join("ctx-large"));
        let large_bytes = sz(b.scale, GIB);
        tokio::task::spawn_blocking(move || -> Result<(Ctx, Ctx)> {
            Ok((
                make_ctx(d1, "20 files", 20, 20 * 4096, 81)?,
                make_ctx(d2, "20 000 files", 20_000, large_bytes, 82)?,
            ))
        })
        .await??
    };
    eprintln!(
        "  contexts: {} files / {}, {} files / {} made in {:.1} s",
        small.files,
        human(small.bytes),
        large.files,
        human(large.bytes),
        t.elapsed().as_secs_f64()
    );
    let def = graph("ctx")?;
    let berth_dir = dir.join("berthd");
    let daemon = berthd::Berthd::start(&bin, &berth_dir, crate::SYSTEM_DOCKER).await?;
    let stock = buildkitd::Stock::start(&buildkitd_bin, &buildctl, &dir.join("buildkitd")).await?;
    let targets = [
        Target {
            name: "berthd",
            addr: daemon.addr(),
            buildctl: &buildctl,
        },
        Target {
            name: "buildkitd",
            addr: stock.addr().to_string(),
            buildctl: &buildctl,
        },
    ];
    let mut seed = 1000;
    for aged in [false, true] {
        let root_label = if aged {
            format!("root aged by {age_builds} builds")
        } else {
            "fresh root".to_string()
        };
        if aged {
            let t = Instant::now();
            age(&targets, &dir, age_builds, sz(b.scale, AGE_CONTEXT_BYTES)).await?;
            eprintln!(
                "  aged both roots by {age_builds} builds in {:.0} s (berthd root {}, buildkitd root {})",
                t.elapsed().as_secs_f64(),
                human(du(&berth_dir.join("root"))),
                human(du(&dir.join("buildkitd/root")))
            );
        }
        for ctx in [&small, &large] {
            // Warm-up: the first build of this context on this root (or after aging).
            for t in &targets {
                buildctl_build(t, &def, &[("ctx", &ctx.dir)], &[]).await?;
            }
            eprintln!("  {root_label}, {}: no-op rebuilds", ctx.label);
            let noop = paired(&targets, &def, ctx, ROUNDS, |_| Ok(())).await?;
            let rounds = if ctx.files > 1000 {
                ROUNDS_LARGE_CHANGED
            } else {
                ROUNDS
            };
            eprintln!("  {root_label}, {}: one-file-changed rebuilds", ctx.label);
            let changed = paired(&targets, &def, ctx, rounds, |_| {
                seed += 1;
                rewrite(&ctx.changed, seed)
            })
            .await?;
            let what = format!("{} / {}, {root_label}", ctx.label, human(ctx.bytes));
            for (case, p) in [("no-op rebuild", noop), ("one file changed", changed)] {
                let (mb, ms) = (median(&p.berth), median(&p.stock));
                let lo = p.load.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = p.load.iter().copied().fold(0.0, f64::max);
                let note = format!(
                    "{} paired rounds; load 1 min {lo:.1}–{hi:.1}",
                    p.berth.len()
                );
                b.row(
                    9,
                    format!("{case}, {what}: stock buildkitd v0.11.6"),
                    p.stock,
                    Unit::Secs,
                    String::new(),
                    note.clone(),
                );
                b.row(
                    9,
                    format!("{case}, {what}: berthd"),
                    p.berth,
                    Unit::Secs,
                    if ms > 0.0 {
                        format!("berthd / stock = {:.2}×", mb / ms)
                    } else {
                        "n/a".into()
                    },
                    note.clone(),
                );
                if case == "no-op rebuild" {
                    let floor = median(&p.client_cpu);
                    b.row(
                        9,
                        format!("{case}, {what}: client floor (`buildctl`'s own CPU time, user + system)"),
                        p.client_cpu,
                        Unit::Secs,
                        if ms > 0.0 {
                            format!("floor / stock = {:.2}×", floor / ms)
                        } else {
                            "n/a".into()
                        },
                        format!(
                            "{note}; both daemons' builds; the walk of the context and the listing it \
                             streams, which every daemon waits for (Go may spread it over both cores, so \
                             its wall time can be lower)"
                        ),
                    );
                }
            }
        }
    }
    stock.stop().await?;
    daemon.terminate().await?;
    phases(b, &bin, &berth_dir, &buildctl, &def, &small, &large).await?;
    Ok(())
}

/// `n` builds on each daemon, each with its own local name and fresh context data.
async fn age(targets: &[Target<'_>; 2], dir: &Path, n: usize, age_bytes: u64) -> Result<()> {
    let ctx = dir.join("ctx-age");
    for i in 0..n {
        let c = ctx.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            if c.exists() {
                std::fs::remove_dir_all(&c)?;
            }
            std::fs::create_dir_all(&c)?;
            fixtures::write_tree(&c, 20, age_bytes, 10_000 + i as u64)
        })
        .await??;
        let name = format!("age{i}");
        let def = graph(&name)?;
        for t in targets {
            buildctl_build(t, &def, &[(&name, &ctx)], &[]).await?;
        }
    }
    Ok(())
}

/// Bytes under `path` (`du -sb`), 0 when it cannot be measured.
fn du(path: &Path) -> u64 {
    std::process::Command::new("du")
        .arg("-sb")
        .arg(path)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The per-phase breakdown: berthd with OTLP traces on its aged root.
async fn phases(
    b: &mut Bench,
    bin: &Path,
    berth_dir: &Path,
    buildctl: &Path,
    def: &[u8],
    small: &Ctx,
    large: &Ctx,
) -> Result<()> {
    let collector = collector::Collector::start().await?;
    let endpoint = format!("http://{}", collector.addr);
    let daemon = berthd::Berthd::start_with(
        bin,
        berth_dir,
        crate::SYSTEM_DOCKER,
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await?;
    let t = Target {
        name: "berthd (traced)",
        addr: daemon.addr(),
        buildctl,
    };
    let mut section = String::from(
        "### Scenario 9: where berthd's time goes (per phase)\n\n\
         berthd restarted on its aged root with OTLP traces on; each build under its own \
         `TRACEPARENT`, so its spans share one trace. Median over the builds of each span's \
         summed duration per build (spans nest: `solve` contains the vertices, a vertex its \
         cache-key work, `local.sync` its `local.sync.*` steps: `prepare` opens the sync \
         directory and reads the listing the last sync left, `listing` runs until the listing's \
         last packet and includes the diff (done per entry as the listing streams in), `data` \
         receives the requested files, `finish` makes hardlinks, restores the changed \
         directories' mtimes and writes the new listing). Tracing itself costs time, so \
         these totals exceed the untraced times above.\n\n",
    );
    let mut seed = 5000;
    for ctx in [small, large] {
        for changed in [false, true] {
            let mut traces = vec![];
            // One untraced build first: the restarted daemon's first build of the context.
            buildctl_build(&t, def, &[("ctx", &ctx.dir)], &[]).await?;
            let mut wall = vec![];
            for _ in 0..TRACED_BUILDS {
                if changed {
                    seed += 1;
                    rewrite(&ctx.changed, seed)?;
                }
                let trace = crate::rand_bytes::<16>();
                let env = [(
                    "TRACEPARENT",
                    format!(
                        "00-{}-{}-01",
                        hex::encode(trace),
                        hex::encode(crate::rand_bytes::<8>())
                    ),
                )];
                let took = buildctl_build(&t, def, &[("ctx", &ctx.dir)], &env).await?;
                wall.push(secs(took));
                traces.push(trace.to_vec());
            }
            // Let the batch processor export the last spans.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let spans = collector.spans_by_trace();
            let mut per_name: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            for tr in &traces {
                let mut sums: BTreeMap<String, f64> = BTreeMap::new();
                for (name, ns) in spans.get(tr).into_iter().flatten() {
                    *sums.entry(name.clone()).or_default() += *ns as f64 / 1e9;
                }
                for (k, v) in sums {
                    per_name.entry(k).or_default().push(v);
                }
            }
            let case = if changed {
                "one file changed"
            } else {
                "no-op rebuild"
            };
            section.push_str(&format!(
                "**{case}, {} / {}** ({TRACED_BUILDS} traced builds, wall median {:.0} ms, load 1 min {:.1}):\n\n",
                ctx.label,
                human(ctx.bytes),
                median(&wall) * 1000.0,
                loadavg_value()
            ));
            section.push_str("| span | builds with it | median per build |\n|---|---|---|\n");
            let mut rows: Vec<_> = per_name.into_iter().collect();
            rows.sort_by(|a, b| median(&b.1).total_cmp(&median(&a.1)));
            for (name, v) in rows {
                section.push_str(&format!(
                    "| `{name}` | {} | {:.1} ms |\n",
                    v.len(),
                    median(&v) * 1000.0
                ));
            }
            section.push('\n');
        }
    }
    daemon.terminate().await?;
    b.sections.push(section);
    Ok(())
}
