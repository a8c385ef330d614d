//! `make bench`: berth against the path users have today, on this machine, with fixtures made
//! here (no registry), printed as a table and written to `docs/benchmarks.md`.
//!
//! Every scenario runs one warm-up and then several measured runs; the table reports min,
//! median and max. Sizes are the issue's (`--scale F` multiplies every size, for a quick smoke
//! run; the report says so). Nothing here knows the sizes or names beyond generating them.
//!
//! Paths: scenarios 1, 2 and 6 build through a real berthd (the built binary, its own `--root`,
//! bound to a Docker Engine) over its gRPC API, with the integration crate's BuildKit client
//! (buildctl's protocol path) and `--output type=image,name=…`. The baselines: a full
//! docker-archive of the same layers through `docker load`, and, when `BERTH_BENCH_BUILDKITD` /
//! `BERTH_BENCH_BUILDCTL` name stock binaries, stock buildkitd with
//! `--output type=docker | docker load`. The offline mode (dockerd stopped) runs the worker and
//! exporter in this process: berthd's worker resolves `docker-image` sources through the Engine
//! API, so a build cannot run while the daemon is stopped. Scenarios 3 to 5 drive the worker in
//! this process. Scenario 8 calls the pin API directly and builds through two berthds. Scenario 11
//! builds through a berthd bound to a private Docker Engine on the containerd image store. The
//! scenario lines in the report say which path each row took.

mod berthd;
mod buildkitd;
mod buildx;
mod collector;
mod containerd_store;
mod fixtures;
mod nodeb;
mod rebuild;
mod report;
mod session;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context as _, Result};
use exporter::image::{build_config, ConfigInput, LayerInfo, Platform};
use exporter::{export_layers, DockerEngine, ImageExportRequest, ImageTarget, TargetOptions};
use llb::{CopyOpts, MkdirOpts, MkfileOpts};
use report::{median, ratio, secs, Row, Unit};
use session::DirSession;
use tokio_util::sync::CancellationToken;
use worker::{ProgressEvent, ProgressSink, SessionProvider, SolveContext, SolvedRef, Worker};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Measured runs of the expensive cases (after one warm-up).
const RUNS: usize = 3;
/// Measured runs of the cheap cases (after one warm-up).
const RUNS_CHEAP: usize = 5;

struct Opts {
    scale: f64,
    out: PathBuf,
    /// `--only N,M`: run only these scenario groups (for iterating on one; the report says so).
    only: Option<Vec<u32>>,
}

fn parse_args() -> Result<Opts> {
    let mut o = Opts {
        scale: 1.0,
        out: Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/benchmarks.md"),
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--scale" => {
                o.scale = args
                    .next()
                    .context("--scale needs a value")?
                    .parse()
                    .context("--scale: not a number")?;
                ensure!(o.scale > 0.0, "--scale must be positive");
            }
            "--out" => o.out = args.next().context("--out needs a path")?.into(),
            "--stock-bin" => {
                let dir: PathBuf = args.next().context("--stock-bin needs a directory")?.into();
                ensure!(
                    dir.join("buildkitd").is_file() && dir.join("buildctl").is_file(),
                    "--stock-bin {}: no buildkitd and buildctl there",
                    dir.display()
                );
                let _ = buildkitd::STOCK_BIN.set(dir);
            }
            "--only" => {
                let v = args.next().context("--only needs scenario numbers")?;
                let nums = v
                    .split(',')
                    .map(|n| n.trim().parse::<u32>())
                    .collect::<Result<Vec<_>, _>>()
                    .with_context(|| format!("--only {v:?}: not a list of numbers"))?;
                o.only = Some(nums);
            }
            "-h" | "--help" => {
                println!(
                    "berth-bench [--scale F] [--only N,M] [--out docs/benchmarks.md] [--stock-bin DIR]\n\n\
                     --scale F        multiply the data sizes by F (the report says so)\n\
                     --only N,M       run only these scenario groups; rows of the others are kept\n                  \
                     from the report at --out\n\
                     --out PATH       where the report goes (default docs/benchmarks.md)\n\
                     --stock-bin DIR  stock buildkitd and buildctl v0.11.6 for the stock rows (scenario\n                  \
                     9 and the `docker load` path); default {}, overridden by\n                  \
                     BERTH_BENCH_BUILDKITD and BERTH_BENCH_BUILDCTL\n\n\
                     Environment: BERTH_BENCH_AGE_BUILDS (scenario 9's aging builds, default {}),\n                  \
                     BERTH_BENCH_KEEP_LOGS=DIR (scenario 11 copies each berthd's log there; with\n                  \
                     BERTHD_LOG=info,exporter=debug,daemon::export_image=debug it has the export phases)",
                    buildkitd::DEFAULT_STOCK_BIN,
                    rebuild::DEFAULT_AGE_BUILDS
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(o)
}

/// The run's state: its scratch dir, Docker, what it created, what it measured.
struct Bench {
    scale: f64,
    scratch: PathBuf,
    docker: bollard::Docker,
    target: ImageTarget,
    tag_prefix: String,
    images: Vec<String>,
    rows: Vec<Row>,
    /// The headline ratios of scenario 1, phrased.
    headline: Vec<String>,
    builds: u64,
    /// Extra Markdown sections for the report (after the results table).
    sections: Vec<String>,
}

fn sz(scale: f64, bytes: u64) -> u64 {
    ((bytes as f64 * scale) as u64).max(4096)
}

fn human(bytes: u64) -> String {
    if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else {
        format!("{:.0} MiB", bytes as f64 / MIB as f64)
    }
}

/// Reads a `kB` field of /proc/<pid>/status, in bytes.
fn proc_status_kb(pid: &str, field: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("{field} not in /proc/{pid}/status"))?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("malformed status line")?
        .parse()?;
    Ok(kb * 1024)
}

/// Free bytes on the filesystem of `path` (`df`).
fn free_bytes(path: &Path) -> Result<u64> {
    let out = std::process::Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .context("run df")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .context("df printed no value")?
        .trim()
        .parse()
        .context("df value")
}

async fn docker_cmd(args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new("docker")
        .args(args)
        .output()
        .await
        .context("run docker")?;
    if !out.status.success() {
        bail!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The first `docker run` of the image on the Engine at `host`: it is runnable when this returns.
async fn docker_run(host: &str, image: &str) -> Result<()> {
    docker_cmd(&[
        "-H",
        host,
        "run",
        "--rm",
        "--network",
        "none",
        image,
        "/bin/true",
    ])
    .await?;
    Ok(())
}

/// The system Docker Engine's address.
const SYSTEM_DOCKER: &str = "unix:///var/run/docker.sock";

/// A Docker Engine the bench builds into: its address and a client.
#[derive(Clone)]
struct Dock {
    host: String,
    client: bollard::Docker,
}

/// Samples of one change series (warm-up excluded).
#[derive(Default)]
struct Series {
    /// berthd: solve's last vertex → first successful `docker run`.
    berth: Vec<f64>,
    /// Full docker-archive → `docker load` → first `docker run`.
    stock: Vec<f64>,
    /// `cp -a` of the change.
    floor: Vec<f64>,
    /// berthd's VmHWM during the build (bytes).
    peak: Vec<f64>,
}

async fn rmi(image: &str) {
    let _ = docker_cmd(&["rmi", "-f", image]).await;
}

/// What a solve did.
struct Solved {
    result: SolvedRef,
    executed: usize,
    cached: usize,
    took: Duration,
}

impl Bench {
    fn worker(&self, name: &str) -> Result<(Worker, PathBuf)> {
        self.worker_on(name, "unix:///var/run/docker.sock")
    }

    /// A worker whose images come from the Docker Engine at `docker_host`.
    fn worker_on(&self, name: &str, docker_host: &str) -> Result<(Worker, PathBuf)> {
        let root = self.scratch.join(name);
        let mut opts = worker::WorkerOptions::new(&root);
        opts.docker_host = Some(docker_host.into());
        Ok((Worker::new(opts).context("open worker")?, root))
    }

    async fn solve(
        &mut self,
        w: &Worker,
        st: &llb::State,
        session: Arc<dyn SessionProvider>,
    ) -> Result<Solved> {
        self.builds += 1;
        let def = st.marshal().context("marshal LLB")?;
        let (sink, mut rx) = ProgressSink::channel();
        let ctx = SolveContext::new(
            format!("{}-{}", self.tag_prefix.replace('/', "-"), self.builds),
            session,
            sink,
            CancellationToken::new(),
        );
        let t = Instant::now();
        let result = w.solve(def, ctx).await.context("solve")?;
        let took = t.elapsed();
        let (mut executed, mut cached) = (0, 0);
        while let Ok(ev) = rx.try_recv() {
            if let ProgressEvent::VertexCompleted {
                cached: c,
                error: None,
                ..
            } = ev
            {
                if c {
                    cached += 1;
                } else {
                    executed += 1;
                }
            }
        }
        Ok(Solved {
            result,
            executed,
            cached,
            took,
        })
    }

    async fn base_image(&mut self, name: &str, data: u64, seed: u64) -> Result<String> {
        let tag = format!("{}{name}:bench", self.tag_prefix);
        rmi(&tag).await;
        let t = Instant::now();
        let tag2 = tag.clone();
        let id =
            tokio::task::spawn_blocking(move || fixtures::load_base_image(None, &tag2, data, seed))
                .await??;
        self.images.push(id.clone());
        eprintln!(
            "  fixture {tag}: busybox + {} loaded in {:.1} s",
            human(data),
            t.elapsed().as_secs_f64()
        );
        Ok(tag)
    }

    /// An LLB build on `base` that copies a fresh `change`-byte file from the client context.
    async fn build_change(
        &mut self,
        w: &Worker,
        base: &str,
        ctx_dir: &Path,
        change: u64,
        seed: u64,
    ) -> Result<Solved> {
        let blob = ctx_dir.join("blob");
        tokio::task::spawn_blocking(move || fixtures::write_blob(&blob, change, seed)).await??;
        let st = Self::change_llb(base, Some("local"));
        let s = self
            .solve(w, &st, Arc::new(DirSession::with("ctx", ctx_dir)))
            .await?;
        ensure!(s.executed >= 1, "the change step did not execute");
        Ok(s)
    }

    /// The LLB of the change build: `base` (used from the Engine) plus a FileOp copying `/blob`
    /// from the client's `local://ctx`. `resolve_mode`: `None` for the source's default.
    fn change_llb(base: &str, resolve_mode: Option<&str>) -> llb::State {
        let ctx: llb::State = llb::local("ctx").into();
        let mut img = llb::image(base);
        if let Some(m) = resolve_mode {
            img = img.resolve_mode(m);
        }
        img.state()
            .file(llb::copy(&ctx, "/blob", "/blob", CopyOpts::default()))
    }

    /// The berthd binary next to this one (`make bench` builds it).
    fn berthd_bin() -> Result<PathBuf> {
        let bin = std::env::current_exe()?.with_file_name("berthd");
        ensure!(
            bin.is_file(),
            "{} missing: `make bench` builds it (cargo build --release -p daemon --bin berthd)",
            bin.display()
        );
        Ok(bin)
    }

    /// berth: a build through a fresh berthd bound to `dock` with `--output type=image`, then
    /// the first `docker run`. Returns (seconds from the solve's last vertex to runnable,
    /// berthd's peak RSS during the build).
    async fn berth_via_berthd(
        &mut self,
        dock: &Dock,
        base: &str,
        ctx_dir: &Path,
        change: u64,
    ) -> Result<(f64, u64)> {
        self.builds += 1;
        let dir = self.scratch.join(format!("berthd-{}", self.builds));
        let d = berthd::Berthd::start(&Self::berthd_bin()?, &dir, &dock.host).await?;
        let name = format!("{}out-{}:bench", self.tag_prefix, self.builds);
        let def = Self::change_llb(base, Some("local"))
            .marshal()
            .context("marshal LLB")?;
        d.reset_peak_rss()?;
        let g = d.build_image(def, ctx_dir, &name).await?;
        let built = SystemTime::now();
        docker_run(&dock.host, &name).await?;
        let end = SystemTime::now();
        eprintln!(
            "      berthd: last vertex → client done {:.2} s, docker run {:.2} s",
            secs(built.duration_since(g.last_vertex).unwrap_or_default()),
            secs(end.duration_since(built).unwrap_or_default())
        );
        let peak = proc_status_kb(d.pid(), "VmHWM:")?;
        let took = end
            .duration_since(g.last_vertex)
            .context("the last vertex completed after docker run")?;
        let _ = docker_cmd(&["-H", &dock.host, "rmi", "-f", &name]).await;
        d.stop().await?;
        remove_tree(&dir)?;
        ensure!(
            g.skipped_layers,
            "berthd did not report base layers already in Docker"
        );
        // Only the new layer moves: its tar is the change plus headers and padding.
        let sent = g
            .bytes_sent
            .context("berthd reported no `exporting layers` total")?;
        ensure!(
            sent <= change + change / 64 + MIB,
            "berthd sent {sent} bytes for a {change}-byte change"
        );
        Ok((secs(took), peak))
    }

    /// The stock path: the same image as a full docker-archive (every layer) streamed into
    /// `POST /images/load` with the base already present, then the first `docker run`. The
    /// archive is made from a solve in this process (untimed).
    async fn stock_to_runnable(&mut self, w: &Worker, s: &Solved, dock: &Dock) -> Result<f64> {
        let t = Instant::now();
        let chain = s.result.chain().layers().to_vec();
        let store = w.snapshot_store().clone();
        let (layers, _) =
            tokio::task::spawn_blocking(move || export_layers(&store, &chain)).await??;
        let infos: Vec<LayerInfo> = layers
            .iter()
            .map(|l| LayerInfo {
                diff_id: l.diff_id.clone(),
                description: "bench".into(),
                created: None,
            })
            .collect();
        let cfg = build_config(&ConfigInput {
            base: Some(fixtures::BASE_CONFIG.as_bytes()),
            layers: &infos,
            epoch: None,
            platform: &Platform::native(),
            now: chrono::Utc::now(),
        })?;
        let engine = DockerEngine::new(dock.client.clone(), None);
        let rep = engine
            .load_thin(&cfg, &layers, &vec![false; layers.len()])
            .await
            .context("full docker load")?;
        ensure!(
            rep.sent.layers_sent.len() == layers.len(),
            "full load sent {} of {} layers",
            rep.sent.layers_sent.len(),
            layers.len()
        );
        docker_run(&dock.host, &cfg.digest).await?;
        let took = secs(t.elapsed());
        let _ = docker_cmd(&["-H", &dock.host, "rmi", "-f", &cfg.digest]).await;
        Ok(took)
    }

    /// Runs build → berth (and optionally stock and the `cp -a` floor) `1 + runs` times on
    /// `base` in `dock` with a `change`-byte change.
    async fn change_series(
        &mut self,
        dock: &Dock,
        base: &str,
        change: u64,
        runs: usize,
        with_stock: bool,
    ) -> Result<Series> {
        let ctx_dir = self.scratch.join("ctx-change");
        let mut out = Series::default();
        for i in 0..=runs {
            std::fs::create_dir_all(&ctx_dir)?;
            let seed = 1000 + self.builds;
            {
                let blob = ctx_dir.join("blob");
                tokio::task::spawn_blocking(move || fixtures::write_blob(&blob, change, seed))
                    .await??;
            }
            let floor_dir = self.scratch.join("floor");
            let t = Instant::now();
            let cp = tokio::process::Command::new("cp")
                .arg("-a")
                .arg(&ctx_dir)
                .arg(&floor_dir)
                .status()
                .await?;
            let floor = secs(t.elapsed());
            ensure!(cp.success(), "cp -a failed");
            std::fs::remove_dir_all(&floor_dir)?;
            let (b, peak) = self.berth_via_berthd(dock, base, &ctx_dir, change).await?;
            let st = if with_stock {
                // A fresh in-process worker on the same Engine solves the same LLB for the
                // archive; its snapshots are removed afterwards (disk).
                let (w, root) = self.worker_on(&format!("w-{}", self.builds), &dock.host)?;
                let st = Self::change_llb(base, Some("local"));
                let s = self
                    .solve(&w, &st, Arc::new(DirSession::with("ctx", &ctx_dir)))
                    .await?;
                ensure!(s.executed >= 1, "the change step did not execute");
                let x = self.stock_to_runnable(&w, &s, dock).await?;
                drop(s);
                drop(w);
                remove_tree(&root)?;
                Some(x)
            } else {
                None
            };
            std::fs::remove_dir_all(&ctx_dir)?;
            eprintln!(
                "    {} {}: berthd {b:.2} s (peak RSS {:.1} MiB), stock {}, cp -a {floor:.2} s",
                if i == 0 { "warm-up" } else { "run" },
                human(change),
                peak as f64 / MIB as f64,
                st.map(|x| format!("{x:.2} s")).unwrap_or("-".into())
            );
            if i > 0 {
                out.berth.push(b);
                if let Some(x) = st {
                    out.stock.push(x);
                }
                out.floor.push(floor);
                out.peak.push(peak as f64);
            }
        }
        Ok(out)
    }

    fn row(
        &mut self,
        scenario: u32,
        case: String,
        samples: Vec<f64>,
        unit: Unit,
        ratio: String,
        note: String,
    ) {
        self.rows.push(Row {
            scenario,
            case,
            samples,
            unit,
            ratio,
            note,
        });
    }
}

/// Removes a scratch tree, unmounting anything left mounted under it first.
fn remove_tree(root: &Path) -> Result<()> {
    let prefix = root.to_string_lossy().into_owned();
    if let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") {
        let mut mounts: Vec<String> = mi
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&m)
                .status();
        }
    }
    if root.exists() {
        std::fs::remove_dir_all(root).with_context(|| format!("remove {}", root.display()))?;
    }
    Ok(())
}

/// Scenario 1 and 2: build end → runnable.
async fn scenario_build_end(b: &mut Bench) -> Result<()> {
    let system = Dock {
        host: SYSTEM_DOCKER.into(),
        client: b.docker.clone(),
    };
    let base2 = b.base_image("base-2g", sz(b.scale, 2 * GIB), 2).await?;
    let change = sz(b.scale, 50 * MIB);
    eprintln!(
        "scenario 1: base {} + change {} (berthd over gRPC, system dockerd)",
        human(sz(b.scale, 2 * GIB)),
        human(change)
    );
    let small = b.change_series(&system, &base2, change, RUNS, true).await?;
    let (mb, ms, mf) = (
        median(&small.berth),
        median(&small.stock),
        median(&small.floor),
    );
    let (b2, c1) = (human(sz(b.scale, 2 * GIB)), human(change));
    let mode = b.target.mode();
    b.row(
        1,
        format!("berthd `--output type=image` [{mode}], {b2} base + {c1} change"),
        small.berth.clone(),
        Unit::Secs,
        ratio("full load/berth", ms, mb),
        "system dockerd (fuse-overlayfs); last vertex → export → client done → first `docker run`; only the new layer sent".into(),
    );
    b.headline.push(ratio("full docker load/berth", ms, mb));
    b.row(
        1,
        "full docker-archive → `POST /images/load`, same image, base present".into(),
        small.stock.clone(),
        Unit::Secs,
        ratio("full load/floor", ms, mf),
        "every layer streamed; dockerd untars all, registers only the new layer; export only (no solve, no gRPC)".into(),
    );
    b.row(
        1,
        format!("floor: `cp -a` of the {c1} once, same disk"),
        small.floor.clone(),
        Unit::Secs,
        ratio("berth/floor", mb, mf),
        "page cache warm".into(),
    );
    scenario_stock_buildkitd(b, &base2, change, mb).await?;

    eprintln!("scenario 2: change scaling on the {b2} base");
    let mut change_rows = vec![(change, small.berth.clone())];
    let mut peak_big = (change, small.peak.clone());
    for c in [500 * MIB, 2 * GIB] {
        let c = sz(b.scale, c);
        let s = b.change_series(&system, &base2, c, RUNS, false).await?;
        change_rows.push((c, s.berth));
        peak_big = (c, s.peak);
    }
    let m_small = median(&change_rows[0].1);
    for (c, s) in change_rows {
        let m = median(&s);
        b.row(
            2,
            format!("berthd, {b2} base, {} change", human(c)),
            s,
            Unit::Secs,
            ratio(&format!("÷ {c1}-change case"), m, m_small),
            format!("{:.1} s per GiB of change", m / (c as f64 / GIB as f64)),
        );
    }

    // One big base at a time: the disk is shared with Docker's own copies.
    rmi(&base2).await;
    scenario_private_dockerd(b).await?;

    eprintln!("scenario 2: base scaling with a {c1} change");
    let docker_root = PathBuf::from("/var/lib/docker");
    let mut base_rows = vec![(
        sz(b.scale, 2 * GIB),
        small.berth.clone(),
        small.stock.clone(),
        String::new(),
    )];
    for (name, size, seed) in [("base-512m", GIB / 2, 3), ("base-8g", 8 * GIB, 4)] {
        let size = sz(b.scale, size);
        let free = free_bytes(&docker_root).unwrap_or(0);
        if free < size + 2 * GIB {
            eprintln!("  skipping the {} base: {} free", human(size), human(free));
            base_rows.push((
                size,
                vec![],
                vec![],
                format!("skipped: {} free on Docker's disk", human(free)),
            ));
            continue;
        }
        let tag = b.base_image(name, size, seed).await?;
        // dockerd unpacks a whole docker-archive into its tmp dir before registering it.
        let free = free_bytes(&docker_root).unwrap_or(0);
        let with_stock = free > size + change + 2 * GIB;
        let s = b
            .change_series(&system, &tag, change, RUNS, with_stock)
            .await?;
        let note = if with_stock {
            String::new()
        } else {
            format!(
                "full load not run: its temp copy needs {} and {} are free",
                human(size + change),
                human(free)
            )
        };
        base_rows.push((size, s.berth, s.stock, note));
        rmi(&tag).await;
    }
    base_rows.sort_by_key(|r| r.0);
    let small_base = median(&base_rows[0].1);
    let small_name = human(base_rows[0].0);
    for (size, be, st, note) in base_rows {
        let (m, s) = (median(&be), median(&st));
        b.row(
            2,
            format!("berthd, {} base, {c1} change", human(size)),
            be,
            Unit::Secs,
            ratio(&format!("÷ {small_name}-base case"), m, small_base),
            String::new(),
        );
        b.row(
            2,
            format!("full docker load, {} base, {c1} change", human(size)),
            st.clone(),
            Unit::Secs,
            if st.is_empty() {
                String::new()
            } else {
                ratio("full load/berth", s, m)
            },
            note,
        );
    }

    b.row(
        6,
        format!("berthd peak RSS (VmHWM) during a build + export, {c1} change on {b2} base"),
        small.peak.clone(),
        Unit::Bytes,
        String::new(),
        "real berthd; VmHWM reset before each build (context receive, copy, export)".into(),
    );
    let (p1, p2) = (median(&small.peak), median(&peak_big.1));
    b.row(
        6,
        format!(
            "berthd peak RSS (VmHWM) during a build + export, {} change on {b2} base",
            human(peak_big.0)
        ),
        peak_big.1,
        Unit::Bytes,
        ratio(&format!("÷ {c1}-change case"), p2, p1),
        "must stay flat in the layer size".into(),
    );
    Ok(())
}

/// Scenario 1, stock buildkitd (when `BERTH_BENCH_BUILDKITD`/`BERTH_BENCH_BUILDCTL` are set):
/// the base pushed to a local registry and pulled by buildkitd in the warm-up, then the same
/// LLB built with `--output type=docker | docker load` into the system dockerd.
async fn scenario_stock_buildkitd(
    b: &mut Bench,
    base: &str,
    change: u64,
    berth_median: f64,
) -> Result<()> {
    let Some((daemon, client)) = buildkitd::from_env() else {
        eprintln!("scenario 1: stock buildkitd not run (BERTH_BENCH_BUILDKITD/BERTH_BENCH_BUILDCTL unset)");
        return Ok(());
    };
    eprintln!("scenario 1: stock buildkitd ({})", daemon.display());
    let dir = b.scratch.join("buildkitd");
    let stock = buildkitd::Stock::start(&daemon, &client, &dir).await?;
    let res = async {
        let t = Instant::now();
        let remote = stock.push(base).await?;
        eprintln!(
            "  pushed {base} to {remote} in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let def = Bench::change_llb(&remote, None)
            .marshal()
            .context("marshal LLB")?;
        let ctx_dir = b.scratch.join("ctx-stock");
        let mut samples = vec![];
        for i in 0..=RUNS {
            std::fs::create_dir_all(&ctx_dir)?;
            b.builds += 1;
            let seed = 1000 + b.builds;
            let blob = ctx_dir.join("blob");
            tokio::task::spawn_blocking(move || fixtures::write_blob(&blob, change, seed))
                .await??;
            let name = format!("{}stock-bk-{i}:bench", b.tag_prefix);
            let t = Instant::now();
            let last = stock.build_docker_load(&def, &ctx_dir, &name).await?;
            docker_run(SYSTEM_DOCKER, &name).await?;
            let took = secs(
                SystemTime::now()
                    .duration_since(last)
                    .context("clock went backwards")?,
            );
            rmi(&name).await;
            std::fs::remove_dir_all(&ctx_dir)?;
            eprintln!(
                "    {}: buildctl | docker load {:.2} s in all, last vertex → runnable {took:.2} s",
                if i == 0 {
                    "warm-up (pulls the base)"
                } else {
                    "run"
                },
                t.elapsed().as_secs_f64()
            );
            if i > 0 {
                samples.push(took);
            }
        }
        Ok::<_, anyhow::Error>(samples)
    }
    .await;
    let stopped = stock.stop().await;
    remove_tree(&dir)?;
    let samples = res?;
    stopped?;
    let m = median(&samples);
    b.row(
        1,
        format!(
            "stock buildkitd `--output type=docker | docker load`, {} base + {} change",
            human(sz(b.scale, 2 * GIB)),
            human(change)
        ),
        samples,
        Unit::Secs,
        ratio("stock buildkitd/berth", m, berth_median),
        "oci worker (runc, overlayfs); base pulled once (warm-up) from a local registry; last vertex from plain progress".into(),
    );
    b.headline
        .push(ratio("stock buildkitd/berth", m, berth_median));
    Ok(())
}

/// Scenario 1 on a private dockerd with the kernel overlay2 driver (own data root): berthd's live
/// classic mode next to a full `docker load` into that daemon; then the offline mode, where the
/// daemon is stopped when the build ends (that is the mode's premise), berth writes the image into
/// its data root, and the time runs until dockerd has started again and `docker run` succeeded.
async fn scenario_private_dockerd(b: &mut Bench) -> Result<()> {
    let base_size = sz(b.scale, 2 * GIB);
    let change = sz(b.scale, 50 * MIB);
    eprintln!("scenario 1: private dockerd (kernel overlay2): live mode, then offline mode");
    let mut dockerd = tokio::task::block_in_place(|| {
        integration::PrivateDockerd::new(integration::PrivateDockerdOptions::default())
    })
    .context("start a private dockerd")?;
    let host = format!("unix://{}", dockerd.socket_path().display());
    let tag = format!("{}base-private:bench", b.tag_prefix);
    {
        let (h, t) = (host.clone(), tag.clone());
        let started = Instant::now();
        tokio::task::spawn_blocking(move || fixtures::load_base_image(Some(&h), &t, base_size, 2))
            .await??;
        eprintln!(
            "  fixture {tag} in the private dockerd: busybox + {} loaded in {:.1} s",
            human(base_size),
            started.elapsed().as_secs_f64()
        );
    }
    let driver = dockerd.storage_driver().to_string();
    let dock = Dock {
        host: host.clone(),
        client: dockerd.engine().client().clone(),
    };
    let live = b.change_series(&dock, &tag, change, RUNS, true).await?;
    let (mb, ms) = (median(&live.berth), median(&live.stock));
    b.row(
        1,
        format!(
            "berthd `--output type=image` [docker (classic store, thin load)], private dockerd ({driver}), {} base + {} change",
            human(base_size),
            human(change)
        ),
        live.berth,
        Unit::Secs,
        ratio("full load/berth", ms, mb),
        "kernel overlay2 as on production dockerds (the system one here uses fuse-overlayfs)".into(),
    );
    b.row(
        1,
        format!(
            "full docker-archive → `POST /images/load` into the same private dockerd ({driver})"
        ),
        live.stock,
        Unit::Secs,
        String::new(),
        "export only (no solve, no gRPC)".into(),
    );

    let (w, root) = b.worker_on("w-offline", &host)?;
    let ctx_dir = b.scratch.join("ctx-offline");
    std::fs::create_dir_all(&ctx_dir)?;
    let target = ImageTarget::ClassicOffline {
        data_root: dockerd.data_root(),
        driver: layerstore::dockerstore::StorageDriver::from_name(&driver)?,
        check: layerstore::dockerstore::DaemonCheck {
            pidfile: Some(dockerd.pidfile()),
            socket: Some(dockerd.socket_path()),
        },
    };
    let (mut total, mut write) = (vec![], vec![]);
    for i in 0..=RUNS {
        let seed = 1000 + b.builds;
        let s = b.build_change(&w, &tag, &ctx_dir, change, seed).await?;
        tokio::task::block_in_place(|| dockerd.stop()).context("stop the private dockerd")?;
        let name = format!("{}offline-{i}:bench", b.tag_prefix);
        let chain = s.result.chain().layers().to_vec();
        let t = Instant::now();
        let r = target
            .export(
                w.snapshot_store(),
                ImageExportRequest {
                    chain: &chain,
                    config: Some(fixtures::BASE_CONFIG.as_bytes()),
                    names: vec![name.clone()],
                    epoch: None,
                },
            )
            .await
            .context("offline export")?;
        let wrote = secs(t.elapsed());
        tokio::task::block_in_place(|| dockerd.start()).context("restart the private dockerd")?;
        docker_cmd(&[
            "-H",
            &host,
            "run",
            "--rm",
            "--network",
            "none",
            &name,
            "/bin/true",
        ])
        .await?;
        let took = secs(t.elapsed());
        ensure!(
            r.layers_sent == 1,
            "offline export wrote {} layers",
            r.layers_sent
        );
        let _ = docker_cmd(&["-H", &host, "rmi", "-f", &name]).await;
        eprintln!(
            "    {}: direct write {wrote:.2} s, to runnable (incl. dockerd start) {took:.2} s",
            if i == 0 { "warm-up" } else { "run" }
        );
        if i > 0 {
            total.push(took);
            write.push(wrote);
        }
    }
    drop(w);
    remove_tree(&root)?;
    std::fs::remove_dir_all(&ctx_dir)?;
    tokio::task::block_in_place(|| dockerd.stop()).context("stop the private dockerd")?;
    let (mt, mw) = (median(&total), median(&write));
    b.row(
        1,
        format!(
            "berth `type=image` [{}], {} base + {} change: write + dockerd start + first `docker run`",
            target.mode(),
            human(base_size),
            human(change)
        ),
        total,
        Unit::Secs,
        ratio("(write + start + run)/write", mt, mw),
        "private dockerd (overlay2, own data root), stopped when the build ends".into(),
    );
    b.row(
        1,
        "  of which: the direct write into the stopped daemon's data root".into(),
        write,
        Unit::Secs,
        String::new(),
        "layer dir + tar-split + layerdb/imagedb + tag".into(),
    );
    Ok(())
}

/// Scenario 3: cached rebuilds.
async fn scenario_cache(b: &mut Bench) -> Result<()> {
    eprintln!("scenario 3: cached rebuilds");
    let (w, root) = b.worker("w-cache")?;
    // 201 vertices: 20 chains of 10 FileOps, gathered by one FileOp copying from each.
    let graph = || {
        let mut gather = llb::mkdir("/out", 0o755, MkdirOpts::default());
        let mut tips = vec![];
        for c in 0..20 {
            let mut s = llb::scratch();
            for v in 0..10 {
                s = s.file(llb::mkfile(
                    format!("/c{c}-v{v}"),
                    0o644,
                    format!("chain {c} vertex {v}\n"),
                    MkfileOpts::default(),
                ));
            }
            tips.push(s);
        }
        for (c, s) in tips.iter().enumerate() {
            gather = gather.copy(
                s,
                format!("/c{c}-v9"),
                format!("/out/c{c}"),
                CopyOpts::default(),
            );
        }
        llb::scratch().file(gather)
    };
    let session: Arc<dyn SessionProvider> = Arc::new(worker::NoSession);
    let cold = b.solve(&w, &graph(), session.clone()).await?;
    ensure!(
        cold.executed == 201,
        "cold build executed {} vertices, expected 201",
        cold.executed
    );
    let mut t = vec![];
    let mut counts = (0, 0);
    for i in 0..=RUNS_CHEAP {
        let s = b.solve(&w, &graph(), session.clone()).await?;
        ensure!(s.executed == 0, "rebuild executed {} vertices", s.executed);
        if i > 0 {
            t.push(secs(s.took));
        }
        counts = (s.executed, s.cached);
    }
    let m = median(&t);
    b.row(
        3,
        "201-vertex FileOp graph rebuilt, nothing changed".into(),
        t,
        Unit::Secs,
        ratio("cold/rebuild", secs(cold.took), m),
        format!(
            "executed {} / cached {}; cold build {:.2} s",
            counts.0,
            counts.1,
            secs(cold.took)
        ),
    );

    // A Dockerfile-sized graph: FROM, COPY context, 9 more steps; step 2 changes every run.
    let bb = b.base_image("busybox", 0, 0).await?;
    let ctx_dir = b.scratch.join("ctx-small");
    std::fs::create_dir_all(&ctx_dir)?;
    fixtures::write_tree(&ctx_dir, 100, sz(b.scale, 4 * MIB), 9)?;
    let mut payload = vec![0u8; 256 << 10];
    fixtures::Prng::new(5).fill(&mut payload);
    let dockerfile = |changed: u64| {
        let ctx: llb::State = llb::local("ctx").into();
        let mut s = llb::image(&bb).resolve_mode("local").state();
        s = s.file(llb::copy(
            &ctx,
            "/",
            "/app",
            CopyOpts::default()
                .dir_contents_only(true)
                .create_dest_path(true),
        ));
        s = s.file(llb::mkfile(
            "/app/version",
            0o644,
            format!("build {changed}\n"),
            MkfileOpts::default(),
        ));
        for step in 3..=10 {
            s = s.file(llb::mkfile(
                format!("/app/step{step}"),
                0o644,
                payload.clone(),
                MkfileOpts::default(),
            ));
        }
        s
    };
    let session: Arc<dyn SessionProvider> = Arc::new(DirSession::with("ctx", &ctx_dir));
    b.solve(&w, &dockerfile(0), session.clone()).await?;
    let mut t = vec![];
    let mut counts = (0, 0);
    for i in 0..=RUNS_CHEAP {
        let s = b
            .solve(&w, &dockerfile(i as u64 + 1), session.clone())
            .await?;
        ensure!(
            s.executed >= 9,
            "changed rebuild executed only {} vertices",
            s.executed
        );
        if i > 0 {
            t.push(secs(s.took));
        }
        counts = (s.executed, s.cached);
    }
    b.row(
        3,
        "10-step Dockerfile-shaped graph (FROM, COPY, 9 FileOps), step 2 changed".into(),
        t,
        Unit::Secs,
        String::new(),
        format!("executed {} / cached {} (FileOps only)", counts.0, counts.1),
    );
    drop(w);
    remove_tree(&root)?;
    std::fs::remove_dir_all(&ctx_dir)?;
    rmi(&bb).await;
    Ok(())
}

/// Scenarios 4 and 5 share a 1 GiB tree of 20 000 files.
async fn scenario_context_and_tar(b: &mut Bench) -> Result<()> {
    let tree = b.scratch.join("ctx-1g");
    let bytes = sz(b.scale, GIB);
    let files = ((20_000.0 * b.scale.min(1.0)) as u64).max(100);
    eprintln!(
        "scenario 4: local context of {} in {files} files",
        human(bytes)
    );
    {
        let tree = tree.clone();
        tokio::task::spawn_blocking(move || fixtures::write_tree(&tree, files, bytes, 11))
            .await??;
    }
    let (mut full, mut one) = (vec![], vec![]);
    let mut note = String::new();
    let mut workers = vec![];
    for i in 0..=RUNS {
        let (w, root) = b.worker(&format!("w-ctx-{i}"))?;
        let session: Arc<dyn SessionProvider> = Arc::new(DirSession::with("ctx", &tree));
        let st: llb::State = llb::local("ctx").into();
        let s1 = b.solve(&w, &st, session.clone()).await?;
        let victim = tree.join("d0001").join("f000123");
        let len = std::fs::metadata(&victim)?.len();
        fixtures::write_blob(&victim, len, 500 + i as u64)?;
        let s2 = b.solve(&w, &st, session.clone()).await?;
        ensure!(s2.executed >= 1, "changed context was not re-sent");
        eprintln!(
            "    {}: full {:.2} s, one file changed {:.2} s",
            if i == 0 { "warm-up" } else { "run" },
            secs(s1.took),
            secs(s2.took)
        );
        if i > 0 {
            full.push(secs(s1.took));
            one.push(secs(s2.took));
        }
        note = format!(
            "solve of `local://ctx` on a fresh worker; executed {}/{}",
            s1.executed, s2.executed
        );
        drop(w);
        workers.push(root);
    }
    // Removed only now: on a filesystem that avoids reusing recently freed inodes (ext4 without
    // a journal skips inodes freed in the last minutes, one inode-table lookup each), removing
    // each run's 20 000 synced files before the next run made every later run's file creation
    // slower than the one before.
    for root in workers {
        remove_tree(&root)?;
    }
    let (mf, mo) = (median(&full), median(&one));
    b.row(
        4,
        format!(
            "send {} context of {files} files (first sync)",
            human(bytes)
        ),
        full,
        Unit::Secs,
        String::new(),
        note,
    );
    b.row(
        4,
        "same context again, one file changed".into(),
        one,
        Unit::Secs,
        ratio("first/again", mf, mo),
        String::new(),
    );

    eprintln!("scenario 5: layer tar of the same tree");
    let (mut ours, mut theirs) = (vec![], vec![]);
    for i in 0..=RUNS {
        let t2 = tree.clone();
        let t = Instant::now();
        let digest = tokio::task::spawn_blocking(move || {
            let mut split = std::io::sink();
            layerstore::tar::write_layer(
                &t2,
                std::io::sink(),
                Some(&mut split),
                &layerstore::tar::WriteOptions::default(),
            )
        })
        .await??;
        let a = secs(t.elapsed());
        let t = Instant::now();
        let st = tokio::process::Command::new("sh")
            .arg("-c")
            .arg("tar -C \"$1\" -cf - . | sha256sum >/dev/null")
            .arg("sh")
            .arg(&tree)
            .status()
            .await?;
        ensure!(st.success(), "tar | sha256sum failed");
        let c = secs(t.elapsed());
        eprintln!(
            "    tar+diffID+tar-split {a:.2} s ({}), tar c | sha256sum {c:.2} s",
            digest.diff_id
        );
        if i > 0 {
            ours.push(a);
            theirs.push(c);
        }
    }
    let (mo, mt) = (median(&ours), median(&theirs));
    b.row(
        5,
        format!(
            "berth `write_layer`: tar + diffID + tar-split of {}",
            human(bytes)
        ),
        ours,
        Unit::Secs,
        ratio("berth/(tar c | sha256sum)", mo, mt),
        "output to /dev/null, page cache warm".into(),
    );
    b.row(
        5,
        "`tar c | sha256sum` (GNU tar, coreutils)".into(),
        theirs,
        Unit::Secs,
        String::new(),
        String::new(),
    );
    remove_tree(&tree)?;
    Ok(())
}

/// Scenario 6 (idle part): berthd's RSS once started and idle.
async fn scenario_idle_rss(b: &mut Bench) -> Result<()> {
    let bin = Bench::berthd_bin()?;
    eprintln!("scenario 6: berthd idle RSS");
    let mut samples = vec![];
    for i in 0..=RUNS {
        let dir = b.scratch.join(format!("berthd-idle-{i}"));
        let d = berthd::Berthd::start(&bin, &dir, SYSTEM_DOCKER).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = proc_status_kb(d.pid(), "VmRSS:")?;
        d.stop().await?;
        remove_tree(&dir)?;
        if i > 0 {
            samples.push(rss as f64);
        }
    }
    b.row(
        6,
        "berthd idle RSS (VmRSS 2 s after its socket answers)".into(),
        samples,
        Unit::Bytes,
        String::new(),
        "real berthd process".into(),
    );
    Ok(())
}

/// Scenario 7: what telemetry costs on a cached rebuild through berthd. Three daemons built from
/// the same commit take turns (order rotated every round, so machine load hits all alike):
/// - **baseline**: berthd built with every `tracing` callsite compiled out
///   (`--features tracing/max_level_off`, `make bench` builds it into `target/bench-baseline`,
///   path in `BERTH_BENCH_BASELINE_BERTHD`): no spans, no log events, no subscriber work, no
///   recorder: a lower bound for what berthd cost before telemetry existed, without the
///   confounding of comparing against an older commit. (The `metrics` macros stay compiled in;
///   without a recorder each is one atomic load.)
/// - **off**: the release berthd without `--debugaddr` or `OTEL_*` (the default).
/// - **on**: `--debugaddr` and OTLP/gRPC traces to a local collector stand-in.
async fn scenario_telemetry(b: &mut Bench) -> Result<()> {
    const ROUNDS: usize = 15;
    let bin = Bench::berthd_bin()?;
    let baseline_bin = match std::env::var_os("BERTH_BENCH_BASELINE_BERTHD") {
        Some(p) => {
            let p = PathBuf::from(p);
            ensure!(
                p.is_file(),
                "BERTH_BENCH_BASELINE_BERTHD={} is not a file (`make bench` builds it)",
                p.display()
            );
            Some(p)
        }
        None => {
            eprintln!(
                "scenario 7: BERTH_BENCH_BASELINE_BERTHD unset: no compiled-out baseline row \
                 (`make bench` builds one)"
            );
            None
        }
    };
    eprintln!("scenario 7: telemetry compiled out vs off vs on, cached rebuild through berthd");
    let base = b.base_image("telemetry-base", sz(b.scale, MIB), 7).await?;
    let ctx = b.scratch.join("telemetry-ctx");
    std::fs::create_dir_all(&ctx)?;
    for i in 0..20 {
        std::fs::write(ctx.join(format!("f{i}")), format!("context file {i}\n"))?;
    }
    let local: llb::State = llb::local("ctx").into();
    let def = llb::State::from(llb::image(&base))
        .run(llb::RunOpts::shell("echo telemetry > /t"))
        .root()
        .file(llb::copy(
            &local,
            "/",
            "/ctx",
            CopyOpts::default().create_dest_path(true),
        ))
        .file(llb::mkfile(
            "/done",
            0o644,
            b"done".to_vec(),
            MkfileOpts::default(),
        ))
        .marshal()?;
    let collector = collector::Collector::start().await?;
    let debug_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let debug_addr = format!("127.0.0.1:{debug_port}");
    let endpoint = format!("http://{}", collector.addr);
    // (daemon, image name, samples); index 0 = off, 1 = on, 2 = compiled-out baseline.
    let mut daemons = vec![
        berthd::Berthd::start(&bin, &b.scratch.join("berthd-tel-off"), SYSTEM_DOCKER).await?,
        berthd::Berthd::start_with(
            &bin,
            &b.scratch.join("berthd-tel-on"),
            SYSTEM_DOCKER,
            &["--debugaddr", &debug_addr],
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)],
        )
        .await?,
    ];
    if let Some(bb) = &baseline_bin {
        daemons.push(
            berthd::Berthd::start(bb, &b.scratch.join("berthd-tel-baseline"), SYSTEM_DOCKER)
                .await?,
        );
    }
    let names: Vec<String> = ["off", "on", "baseline"][..daemons.len()]
        .iter()
        .map(|k| format!("{}telemetry-{k}:bench", b.tag_prefix))
        .collect();
    b.images.extend(names.iter().cloned());
    let mut samples: Vec<Vec<f64>> = vec![vec![]; daemons.len()];
    // Round 0 executes everything and round 1 is the cached warm-up; rounds 2.. are measured.
    for round in 0..ROUNDS + 2 {
        // Every build is traced by the client, as buildctl/buildx under a traced context: the
        // daemon with telemetry on records and exports every span of it.
        let md = vec![(
            "traceparent".to_string(),
            format!(
                "00-{}-{}-01",
                hex::encode(rand_bytes::<16>()),
                hex::encode(rand_bytes::<8>())
            ),
        )];
        let n = daemons.len();
        for k in 0..n {
            let i = (k + round) % n;
            let took = daemons[i]
                .timed_build(def.clone(), &ctx, &names[i], &md)
                .await?;
            if round >= 2 {
                samples[i].push(secs(took));
            }
        }
    }
    let metrics = {
        let a = debug_addr.clone();
        tokio::task::spawn_blocking(move || integration::http_get(&a, "/metrics")).await??
    };
    let body = String::from_utf8_lossy(&metrics.body).into_owned();
    let finished: f64 = body
        .lines()
        .filter(|l| l.starts_with("berth_builds_finished_total"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    ensure!(
        finished >= (ROUNDS + 2) as f64,
        "telemetry-on berthd's /metrics counted {finished} finished builds, expected {}",
        ROUNDS + 2
    );
    for d in daemons {
        d.terminate().await?;
    }
    let spans = collector.spans();
    ensure!(
        spans > 0,
        "the collector stand-in received no spans: tracing was not on"
    );
    let t_base = samples.get(2).cloned();
    let t_on = samples.remove(1);
    let t_off = samples.remove(0);
    let (m_off, m_on) = (median(&t_off), median(&t_on));
    if let Some(t_base) = t_base {
        let m_base = median(&t_base);
        let (lo, hi) = t_base
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        b.row(
            7,
            "cached rebuild through berthd built with tracing compiled out \
             (`tracing/max_level_off`): the baseline"
                .into(),
            t_base,
            Unit::Secs,
            String::new(),
            format!(
                "same commit; no spans, no logs, no recorder; range {:.0}-{:.0} ms",
                lo * 1e3,
                hi * 1e3
            ),
        );
        b.row(
            7,
            "same, release berthd, telemetry off (the default)".into(),
            t_off,
            Unit::Secs,
            if m_base > 0.0 {
                format!("off / baseline = {:.2}×", m_off / m_base)
            } else {
                "n/a".into()
            },
            "no `--debugaddr`, no `OTEL_*`".into(),
        );
    } else {
        b.row(
            7,
            "cached rebuild through berthd (`--output type=image`, client-traced), telemetry off"
                .into(),
            t_off,
            Unit::Secs,
            "no baseline row: BERTH_BENCH_BASELINE_BERTHD unset".into(),
            "no `--debugaddr`, no `OTEL_*`".into(),
        );
    }
    b.row(
        7,
        "same, telemetry on: `--debugaddr` + OTLP/gRPC to a local collector stand-in".into(),
        t_on,
        Unit::Secs,
        if m_off > 0.0 { format!("on / off = {:.2}×", m_on / m_off) } else { "n/a".into() },
        format!(
            "{spans} spans received by the collector ({:.0} per build), {finished} builds on /metrics",
            spans as f64 / (ROUNDS + 2) as f64
        ),
    );
    Ok(())
}

/// Scenario 8: what pinning a base image costs a build (issue #17). Directly through
/// `layerstore::dockerstore` on the system dockerd: the pin container's create and create →
/// running (stdin attach and start), and the release (stop and remove, in the background after
/// the build). Then through two real berthds, builds alternating between them: one whose base
/// pin is already held by a long build of its own (shared, so no pin work) and one holding no
/// pin of the base (it waits until the previous pin, which lingers 3 s after its build, is
/// gone), followed at once by a back-to-back build on the same berthd (which reuses a lingering
/// pin); without an export and with one (`--output type=image`). Neither waits for the pin,
/// which berthd makes only once a build outlives its pin delay (250 ms; the steps are confirmed
/// before they are kept meanwhile), so these short builds make none; a last pair of builds
/// outlives the delay (a RUN sleeping 0.35 s longer) and makes the pin while it runs. The differences
/// of the medians are the pin's cost on a build's critical path.
async fn scenario_pins(b: &mut Bench) -> Result<()> {
    const ROUNDS: usize = 9;
    eprintln!("scenario 8: base-image pins");
    let base = b.base_image("pin-base", sz(b.scale, MIB), 8).await?;
    let id = b
        .docker
        .inspect_image(&base)
        .await?
        .id
        .context("base image without ID")?;
    // Named like a berthd's (`worker:<root>`): the pin program is bind-mounted from that root.
    let instance = format!("worker:{}", b.scratch.join("pins-root").display());
    let (mut create, mut start, mut release) = (vec![], vec![], vec![]);
    for round in 0..ROUNDS + 1 {
        let t = Instant::now();
        let pin = layerstore::dockerstore::pin_image(&b.docker, &id, &instance, "bench").await?;
        let created = t.elapsed();
        ensure!(
            pin.wait_running(Duration::from_secs(60)).await,
            "pin container of {base} did not run within 60 s"
        );
        let running = t.elapsed();
        let t = Instant::now();
        pin.release().await?;
        let released = t.elapsed();
        if round > 0 {
            create.push(secs(created));
            start.push(secs(running - created));
            release.push(secs(released));
        }
    }
    layerstore::dockerstore::remove_stale_pins(&b.docker, &instance).await?;
    let on_path = median(&create) + median(&start);
    b.row(
        8,
        "pin: create the pin container (in the background of the build)".into(),
        create,
        Unit::Secs,
        String::new(),
        "system dockerd, `POST /containers/create` of the base with the pin's config".into(),
    );
    b.row(
        8,
        "pin: created → running (stdin attach, start; the pin program is bind-mounted)".into(),
        start,
        Unit::Secs,
        format!("create + start = {:.0} ms", on_path * 1000.0),
        "in the background: the build's steps read the base meanwhile (confirmed before kept); \
         a build whose result is exported ends its solve once the pin runs"
            .into(),
    );
    b.row(
        8,
        "pin: release (stop + remove the running container)".into(),
        release,
        Unit::Secs,
        String::new(),
        "off the critical path: berthd does it in the background after the export".into(),
    );

    // Through berthd: the same solve (base + a RUN that differs per build, no export) on a berthd
    // whose pin of the base is held by a long build (warm) and on one that pins afresh (cold).
    let bin = Bench::berthd_bin()?;
    let warm =
        berthd::Berthd::start(&bin, &b.scratch.join("berthd-pin-warm"), SYSTEM_DOCKER).await?;
    let cold =
        berthd::Berthd::start(&bin, &b.scratch.join("berthd-pin-cold"), SYSTEM_DOCKER).await?;
    let holder_def = llb::State::from(llb::image(&base))
        .run(llb::RunOpts::shell("sleep 3600"))
        .root()
        .marshal()?;
    let holder = warm.spawn_solve(holder_def);
    // The holder's pin runs before the first measured build.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = docker_cmd(&[
            "ps",
            "-q",
            "--filter",
            &format!(
                "label=dev.berth.pin=worker:{}",
                warm.root().join("worker").display()
            ),
        ])
        .await?;
        if !out.trim().is_empty() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the holder build's pin did not run within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cold_pins = format!(
        "label=dev.berth.pin=worker:{}",
        cold.root().join("worker").display()
    );
    // Per client path: [0] through the gateway (`LLBBridge.Solve` + `Return`, as BuildKit's Go
    // client's `Build` and buildx send a build), [1] LLB in `Control.Solve` itself (as
    // `buildctl build` sends it).
    type PerPath = [Vec<f64>; 2];
    let (mut t_warm, mut t_cold, mut t_next): (PerPath, PerPath, PerPath) = Default::default();
    let (mut x_warm, mut x_cold): (PerPath, PerPath) = Default::default();
    let ctx_dir = b.scratch.join("pins-ctx");
    std::fs::create_dir_all(&ctx_dir)?;
    let mut exported = Vec::new();
    for direct in [false, true] {
        let d = usize::from(direct);
        for round in 0..ROUNDS + 1 {
            let order = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for is_cold in order {
                let def = llb::State::from(llb::image(&base))
                    .run(llb::RunOpts::shell(format!(
                        "echo {} > /r",
                        hex::encode(rand_bytes::<8>())
                    )))
                    .root()
                    .marshal()?;
                if !is_cold {
                    let took = warm.timed_solve_via(def, direct).await?;
                    if round > 0 {
                        t_warm[d].push(secs(took));
                    }
                    continue;
                }
                // Afresh: the lingering pin of the cold berthd's previous build is gone.
                let deadline = Instant::now() + Duration::from_secs(60);
                while !docker_cmd(&["ps", "-aq", "--filter", &cold_pins])
                    .await?
                    .trim()
                    .is_empty()
                {
                    ensure!(
                        Instant::now() < deadline,
                        "the cold berthd's pin was not removed within 60 s"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let took = cold.timed_solve_via(def, direct).await?;
                let next = llb::State::from(llb::image(&base))
                    .run(llb::RunOpts::shell(format!(
                        "echo {} > /r",
                        hex::encode(rand_bytes::<8>())
                    )))
                    .root()
                    .marshal()?;
                let took_next = cold.timed_solve_via(next, direct).await?;
                if round > 0 {
                    t_cold[d].push(secs(took));
                    t_next[d].push(secs(took_next));
                }
            }
            // The same with an export into Docker, warm and afresh (the pin of the solves above
            // gone first).
            for is_cold in order {
                let def = llb::State::from(llb::image(&base))
                    .run(llb::RunOpts::shell(format!(
                        "echo {} > /r",
                        hex::encode(rand_bytes::<8>())
                    )))
                    .root()
                    .marshal()?;
                let name = format!("berth-bench-pins-export:{round}-{is_cold}-{direct}");
                let took = if is_cold {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while !docker_cmd(&["ps", "-aq", "--filter", &cold_pins])
                        .await?
                        .trim()
                        .is_empty()
                    {
                        ensure!(
                            Instant::now() < deadline,
                            "the cold berthd's pin was not removed within 60 s"
                        );
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    cold.timed_build_via(def, &ctx_dir, &name, &[], direct)
                        .await?
                } else {
                    warm.timed_build_via(def, &ctx_dir, &name, &[], direct)
                        .await?
                };
                exported.push(name);
                if round > 0 {
                    if is_cold {
                        &mut x_cold[d]
                    } else {
                        &mut x_warm[d]
                    }
                    .push(secs(took));
                }
            }
        }
    }
    // Builds that outlive the pin delay (berthd's `BERTH_PIN_DELAY_MS`, 250 ms by default, which
    // berthd inherits from this process): the fresh pin is made while the build runs.
    let delay_ms: u64 = std::env::var("BERTH_PIN_DELAY_MS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(250);
    let sleep = format!("{:.2}", (delay_ms + 350) as f64 / 1000.0);
    let (mut l_warm, mut l_cold) = (vec![], vec![]);
    for round in 0..ROUNDS + 1 {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for is_cold in order {
            let def = llb::State::from(llb::image(&base))
                .run(llb::RunOpts::shell(format!(
                    "sleep {sleep}; echo {} > /r",
                    hex::encode(rand_bytes::<8>())
                )))
                .root()
                .marshal()?;
            let took = if is_cold {
                let deadline = Instant::now() + Duration::from_secs(60);
                while !docker_cmd(&["ps", "-aq", "--filter", &cold_pins])
                    .await?
                    .trim()
                    .is_empty()
                {
                    ensure!(
                        Instant::now() < deadline,
                        "the cold berthd's pin was not removed within 60 s"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let took = cold.timed_solve_via(def, true).await?;
                ensure!(
                    !docker_cmd(&["ps", "-aq", "--filter", &cold_pins])
                        .await?
                        .trim()
                        .is_empty(),
                    "a build of over {sleep} s made no pin"
                );
                took
            } else {
                warm.timed_solve_via(def, true).await?
            };
            if round > 0 {
                if is_cold { &mut l_cold } else { &mut l_warm }.push(secs(took));
            }
        }
    }
    for name in &exported {
        let _ = docker_cmd(&["rmi", name]).await;
    }
    holder.abort();
    let roots = [warm.root().to_path_buf(), cold.root().to_path_buf()];
    warm.stop().await?;
    cold.stop().await?;
    // berthd removes its pins when it stops; this only catches what a failed stop left.
    for root in roots {
        layerstore::dockerstore::remove_stale_pins(
            &b.docker,
            &format!("worker:{}", root.join("worker").display()),
        )
        .await?;
    }
    for d in [0, 1] {
        let (path, wait) = if d == 0 {
            (
                "gateway (`LLBBridge.Solve`, as buildx)",
                "nothing waits for the pin (a read of the ref's files would, then), which is made \
                 only if the build outlives the pin delay (`BERTH_PIN_DELAY_MS`, 250 ms)",
            )
        } else {
            (
                "LLB in `Control.Solve` (as `buildctl build`)",
                "nothing waits for the pin, which is made only if the build outlives the pin \
                 delay (`BERTH_PIN_DELAY_MS`, 250 ms): a shorter one makes none",
            )
        };
        let (m_warm, m_cold, m_next) = (median(&t_warm[d]), median(&t_cold[d]), median(&t_next[d]));
        b.row(
            8,
            format!("{path}: build (docker-image base + RUN, no export), base pin already held"),
            std::mem::take(&mut t_warm[d]),
            Unit::Secs,
            String::new(),
            "a long build of the same base on this berthd holds the (shared) pin".into(),
        );
        b.row(
            8,
            "same, on a berthd holding no pin of the base (pinning afresh)".into(),
            std::mem::take(&mut t_cold[d]),
            Unit::Secs,
            format!(
                "cold − warm = {:.0} ms (the pin's cost on the build's critical path), cold / warm = {:.2}×",
                (m_cold - m_warm) * 1000.0,
                if m_warm > 0.0 { m_cold / m_warm } else { 0.0 }
            ),
            format!(
                "builds alternate between the two berthds (order swapped each round), each once \
                 the previous build's pin is gone; {wait}"
            ),
        );
        b.row(
            8,
            "same, a back-to-back build right after the fresh one (reuses a lingering pin)".into(),
            std::mem::take(&mut t_next[d]),
            Unit::Secs,
            format!(
                "back-to-back − warm = {:.0} ms (pin on the critical path)",
                (m_next - m_warm) * 1000.0
            ),
            "pins linger 3 s after their last build".into(),
        );
        let (mx_warm, mx_cold) = (median(&x_warm[d]), median(&x_cold[d]));
        b.row(
            8,
            format!("{path}: build with an export (`--output type=image`), base pin already held"),
            std::mem::take(&mut x_warm[d]),
            Unit::Secs,
            String::new(),
            "the same solve, then loaded into the system dockerd".into(),
        );
        b.row(
            8,
            "same with an export, on a berthd holding no pin of the base".into(),
            std::mem::take(&mut x_cold[d]),
            Unit::Secs,
            format!(
                "cold − warm = {:.0} ms (the pin's cost on the build's critical path)",
                (mx_cold - mx_warm) * 1000.0
            ),
            "the thin load reads no base file: neither the solve nor the export waits for the \
             pin, made only after the pin delay (250 ms)"
                .into(),
        );
    }
    let (ml_warm, ml_cold) = (median(&l_warm), median(&l_cold));
    b.row(
        8,
        format!(
            "LLB in `Control.Solve`: build outliving the pin delay (RUN `sleep {sleep}`, no export), base pin already held"
        ),
        l_warm,
        Unit::Secs,
        String::new(),
        "the same two berthds".into(),
    );
    b.row(
        8,
        "same, on a berthd holding no pin of the base: the pin is made during the build".into(),
        l_cold,
        Unit::Secs,
        format!(
            "cold − warm = {:.0} ms (the pin's cost on the build's critical path when it is made)",
            (ml_cold - ml_warm) * 1000.0
        ),
        "checked: the build made a pin; its create and start run in the background".into(),
    );
    Ok(())
}

fn rand_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mut x = (t as u64) ^ (u64::from(std::process::id()) << 32) | 1;
    for v in b.iter_mut() {
        // xorshift: ids only need to differ between builds
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *v = x as u8;
    }
    b
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

async fn machine(docker: &bollard::Docker) -> Result<Vec<(String, String)>> {
    let info = docker.info().await.context("docker info")?;
    let version = docker.version().await.context("docker version")?;
    let mem = proc_status_mem()?;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    Ok(vec![
        (
            "cores".into(),
            format!("{} ({cpu})", std::thread::available_parallelism()?.get()),
        ),
        (
            "memory".into(),
            format!("{:.1} GiB", mem as f64 / GIB as f64),
        ),
        (
            "kernel".into(),
            std::fs::read_to_string("/proc/sys/kernel/osrelease")?
                .trim()
                .to_string(),
        ),
        (
            "Docker".into(),
            format!(
                "server {} (API {}), client {}",
                version.version.unwrap_or_default(),
                version.api_version.unwrap_or_default(),
                first_line("docker", &["version", "--format", "{{.Client.Version}}"])
            ),
        ),
        (
            "storage driver".into(),
            format!(
                "{} (data root {})",
                info.driver.unwrap_or_default(),
                info.docker_root_dir.unwrap_or_default()
            ),
        ),
        (
            "disk of the scratch dir and Docker".into(),
            first_line(
                "sh",
                &["-c", "df -h --output=source,fstype,size /var/tmp | tail -1"],
            ),
        ),
        (
            "berth commit (`-dirty`: built from a tree with uncommitted changes)".into(),
            first_line(
                "git",
                &[
                    "-C",
                    env!("CARGO_MANIFEST_DIR"),
                    "describe",
                    "--always",
                    "--dirty",
                ],
            ),
        ),
    ])
}

/// The 1-minute load average as a number (0 when unreadable).
fn loadavg_value() -> f64 {
    loadavg().parse().unwrap_or(0.0)
}

/// The 1-minute load average.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

fn proc_status_mem() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/meminfo")?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("MemTotal")?
        .parse()?;
    Ok(kb * 1024)
}

const SCENARIOS: &[&str] = &[
    "1. **Build end → runnable** (headline): time from the solve's last vertex to the first successful `docker run --network none <image> /bin/true`, for an LLB build (docker-image base of busybox + 2 GiB incompressible data already in Docker, then a FileOp copying a fresh 50 MiB file from the local context). berth: a real berthd (fresh `--root` per run, bound to the dockerd) driven over gRPC as buildctl does (Session + FileSync, Solve, Status) with `--output type=image,name=…`; the last vertex is the latest completion timestamp in the Status stream outside the exporter's vertex, and the time includes the export, the client's end of the build (Status and Session closing) and the `docker run`. Baselines: (a) the same layers as a full docker-archive streamed into `POST /images/load` (made in this process from an untimed solve; export and load only, which favours it), (b) when `BERTH_BENCH_BUILDKITD`/`BERTH_BENCH_BUILDCTL` are set, stock buildkitd (OCI worker, base pulled once from a local registry in the warm-up) building the same LLB with `buildctl build --output type=docker,name=… | docker load` into the system dockerd, from the arrival of its last solve vertex's `DONE` line (plain progress) to `docker run`. Floor: `cp -a` of the 50 MiB once. Also on a private dockerd with the kernel overlay2 driver (the system dockerd here uses fuse-overlayfs): berthd live mode next to a full `docker load`, and the offline mode (daemon stopped when the build ends, berth writes its data root, time includes restarting dockerd) with the worker and exporter in this process.",
    "2. **Scaling**: berthd as in 1 with a 50 MiB / 500 MiB / 2 GiB change on the 2 GiB base, and a 50 MiB change on a 0.5 / 2 / 8 GiB base: berth's cost must follow the change and stay flat in the base.",
    "3. **Cached rebuild** (worker in this process): a 201-vertex FileOp graph re-solved with nothing changed, and a 10-step Dockerfile-shaped graph with step 2 changed; executed vs cached counted from progress events.",
    "4. **Local context** (worker in this process, fsutil DiffCopy sender → receiver over in-memory channels, no gRPC): first sync of a 1 GiB context of 20 000 files, then again with one file changed.",
    "5. **Layer tars**: berth's `write_layer` (tar + diffID + tar-split in one pass) of the 1 GiB tree, as a ratio to `tar c | sha256sum`.",
    "6. **Memory**: berthd's idle RSS, and berthd's peak RSS (VmHWM, reset before each build) during the builds of scenario 2 with a 50 MiB and a 2 GiB change: it must stay flat in the layer size.",
    "7. **Telemetry cost** (issue #18): a cached rebuild (docker-image base + RUN + a 20-file local context copy + a file, `--output type=image`) through three real berthds at once, built from the same commit: the baseline built with every `tracing` callsite compiled out (`--features tracing/max_level_off`: no spans, no log events, no recorder; `make bench` builds it into `target/bench-baseline`), the release berthd with telemetry off (the default), and one with `--debugaddr` and `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at an OTLP/gRPC collector stand-in in the bench process (it decodes and counts spans). Every build carries a client `traceparent`, so the traced daemon records and exports all its spans. Builds rotate between the daemons, the order shifted each round; one executing and one cached warm-up round, then 15 measured rounds. Wall time of the client's whole build.",
    "8. **Base-image pins** (issue #17): the pin container that keeps a base image used in place from Docker's prunes, directly through `layerstore::dockerstore` on the system dockerd (create; created → running, i.e. the stdin attach and the start, the pin program bind-mounted from the pinning root; both in the background of a build, whose steps read the base meanwhile and are confirmed before they are kept; release = stop + remove, which berthd does in the background), then the same solve (docker-image base + a RUN differing per build) through two real berthds, builds alternating: one whose pin of the base is held by a long build (shared pin: no pin work), one that pins afresh every build (waiting until the previous pin, which lingers 3 s, is gone) followed at once by a back-to-back build that reuses the lingering pin; without an export (nothing waits for the pin) and with `--output type=image` (the solve ends once the pin runs); cold − warm and back-to-back − warm are the pin's cost on a build's critical path (target < 50 ms).",
    "9. **Rebuilds with a local context vs stock buildkitd** (issue #14): berthd and stock buildkitd v0.11.6 (OCI worker) side by side, both driven by the same stock `buildctl` (`BERTH_BENCH_BUILDCTL`) with `buildctl build --local ctx=… --progress=plain` and no `--output`; the graph copies the whole context onto scratch and adds a file (FileOps). Contexts: 20 files (80 KiB) and 20 000 files (1 GiB, 100 per directory). Cases: no-op rebuild, and one file rewritten (same size, new content) before each round. Paired rounds, order swapped each round, 1-min load sampled per round; wall time of `buildctl`. On fresh roots, then on roots aged by `BERTH_BENCH_AGE_BUILDS` earlier builds (default 40 in `make bench`; 300 for the issue's \"few hundred\"), each with its own local name and 8 MiB of fresh data. For the no-op cases also the client floor: `buildctl`'s own CPU time per build (its walk of the context and the listing it streams, which any daemon waits for), from the bench's children CPU counters. Then a per-phase breakdown from berthd's own OTLP spans (see below the table; `local.sync.listing` runs from the receiver's start to the listing's last packet and includes the diff, which is done per entry as the listing streams in).",
    "10. **Dockerfile rebuilds through buildx vs stock buildkitd** (issue #11): Debian 13's `docker-buildx` 0.13.1 (standalone, private `DOCKER_CONFIG`) with a `remote` builder on berthd and one on stock buildkitd v0.11.6, same run. Dockerfile: `FROM` a base in a local registry (both daemons resolve the same reference), `RUN`, `COPY` of a 20-file context, `RUN`. One executing build and one cached warm-up per case, then 9 rounds (order reversed every other round); every timed build is checked to have served each `RUN` from the cache. Cases: no output; the image made runnable in the local Docker (stock `--load`, berthd `--output type=image` and berthd `--load`). Wall time of the buildx process.",
    "11. **Docker Engine on the containerd image store** (issue #12): a private Docker 26.1.5 with `containerd-snapshotter` and its own containerd 1.7.24 (Debian 13's packages); build end → runnable for a 50 MiB change on a 0.5 GiB and on a 2 GiB base (flatness in the base size) through a real berthd bound to it (base layers used in place as snapshots, the new layer committed as a snapshot), each next to `docker load` of the same image (its `docker save` archive) into the same Engine plus the first run, a plain `cp -a` of the change, and a container start of the base alone, in the same run.",
    "12. **A second build node's cached build from a registry cache** (issue #15): node A of berthd and of stock buildkitd v0.11.6 builds a Dockerfile (`FROM` a 256 MiB base in a local registry, `RUN` writing 64 MiB, `RUN` writing 16 MiB, `COPY` of 20 files) and exports its cache (`--export-cache type=registry,mode=max`, each its own ref); each round, node B is a daemon on an empty root building the same Dockerfile with `--import-cache type=registry` through `dockerfile.v0` (same stock `buildctl` for both), every `RUN` checked CACHED, the image checked runnable: berthd with `--output type=image` (lands in the bound Docker, which holds the base), stock with `--output type=docker | docker load` (its empty root pulls the base too), and stock without an output. 5 rounds, order reversed every other round; wall time of `buildctl` (and `docker load`); daemon start/stop outside it.",
];

async fn cleanup(b: &Bench) {
    for id in &b.images {
        rmi(id).await;
    }
    // Pin containers of this run's builds (normally removed when each build's graph drops).
    if let Ok(out) = docker_cmd(&["ps", "-aq", "--filter", "label=dev.berth.pin.build"]).await {
        for id in out.split_whitespace() {
            if let Ok(l) = docker_cmd(&[
                "inspect",
                "--format",
                "{{index .Config.Labels \"dev.berth.pin.build\"}}",
                id,
            ])
            .await
            {
                if l.trim().starts_with(&b.tag_prefix.replace('/', "-")) {
                    let _ = docker_cmd(&["rm", "-f", id]).await;
                }
            }
        }
    }
    if let Err(e) = remove_tree(&b.scratch) {
        eprintln!("cleanup: {e:#}");
    }
}

async fn run() -> Result<()> {
    let opts = parse_args()?;
    let started = Instant::now();
    let docker = bollard::Docker::connect_with_local_defaults().context("connect to Docker")?;
    let target = ImageTarget::detect(docker.clone(), &TargetOptions::default())
        .await
        .context("detect the image store")?;
    let pid = std::process::id();
    let scratch = PathBuf::from(format!("/var/tmp/berth-bench-{pid}"));
    std::fs::create_dir_all(&scratch)?;
    let mut b = Bench {
        scale: opts.scale,
        scratch,
        docker: docker.clone(),
        target,
        tag_prefix: format!("berth-bench-{pid}/"),
        images: vec![],
        rows: vec![],
        headline: vec![],
        builds: 0,
        sections: vec![],
    };
    let machine = machine(&docker).await?;
    let mut machine = machine;
    if let Some((d, c)) = buildkitd::from_env() {
        machine.push((
            "stock BuildKit (`BERTH_BENCH_BUILDKITD`, `BERTH_BENCH_BUILDCTL`)".into(),
            format!(
                "{} (`{}`), {} (`{}`)",
                d.display(),
                first_line(&d.to_string_lossy(), &["--version"]),
                c.display(),
                first_line(&c.to_string_lossy(), &["--version"])
            ),
        ));
    }
    let load_start = loadavg();
    eprintln!(
        "berth-bench: scratch {}, mode {}",
        b.scratch.display(),
        b.target.mode()
    );
    let wants = |ns: &[u32]| match &opts.only {
        None => true,
        Some(only) => ns.iter().any(|n| only.contains(n)),
    };
    let res = async {
        if wants(&[6]) {
            scenario_idle_rss(&mut b).await?;
        }
        if wants(&[7]) {
            scenario_telemetry(&mut b).await?;
        }
        if wants(&[8]) {
            scenario_pins(&mut b).await?;
        }
        if wants(&[9]) {
            rebuild::scenario_rebuild(&mut b).await?;
        }
        if wants(&[10]) {
            buildx::scenario_buildx(&mut b).await?;
        }
        if wants(&[3]) {
            scenario_cache(&mut b).await?;
        }
        if wants(&[4, 5]) {
            scenario_context_and_tar(&mut b).await?;
        }
        if wants(&[1, 2]) {
            scenario_build_end(&mut b).await?;
        }
        if wants(&[11]) {
            containerd_store::scenario(&mut b).await?;
        }
        if wants(&[12]) {
            nodeb::scenario_node_b(&mut b).await?;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    cleanup(&b).await;
    res?;
    let total = started.elapsed();

    let mut rows = std::mem::take(&mut b.rows);
    rows.sort_by_key(|r| r.scenario);
    // With `--only`, the scenarios not run keep their rows from the report already at `--out`,
    // each group labelled with the run it came from.
    let earlier = match &opts.only {
        Some(only) => match std::fs::read_to_string(&opts.out) {
            Ok(old) => report::earlier(&old, only),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => report::Earlier::default(),
            Err(e) => return Err(e).with_context(|| format!("read {}", opts.out.display())),
        },
        None => report::Earlier::default(),
    };
    let headline = if b.headline.is_empty() {
        "not measured".to_string()
    } else {
        b.headline.join(", ")
    };
    let mut md = String::new();
    md.push_str("# Benchmarks\n\nWritten by `make bench` (`crates/bench`, binary `berth-bench`) from a real run; do not edit by hand.\n\n");
    match &earlier.headline {
        Some(h) => md.push_str(&format!("{h}\n\n")),
        None => md.push_str(&format!("**Headline (scenario 1, {} base + {} change, system dockerd):** {headline} — the median time from the solve's last vertex to a runnable image on each stock path divided by berthd's (`--output type=image`).\n\n", human(sz(b.scale, 2 * GIB)), human(sz(b.scale, 50 * MIB)))),
    }
    md.push_str("## Machine\n\n");
    for (k, v) in &machine {
        md.push_str(&format!("- {k}: {v}\n"));
    }
    md.push_str(&format!(
        "- run: {} UTC, total {:.1} min, {} warm-up + {RUNS} runs (expensive) / {RUNS_CHEAP} runs (cheap) per case{}\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M"),
        total.as_secs_f64() / 60.0,
        1,
        if b.scale != 1.0 { format!(", **sizes scaled by {}** (not the issue's sizes)", b.scale) } else { String::new() }
    ));
    if let Some(only) = &opts.only {
        md.push_str(&format!(
            "- **only scenario groups {only:?} were run** (`--only`); the other rows come from the earlier runs listed under Runs\n"
        ));
    }
    md.push_str(&format!(
        "- load average (1 min) at start {load_start}, at end {}: other work on the machine shares its 2 cores, so read ratios rather than absolute times\n\n",
        loadavg()
    ));
    if let Some(only) = &opts.only {
        md.push_str("## Runs\n\n");
        let commit = machine
            .iter()
            .find(|(k, _)| k.starts_with("berth commit"))
            .map_or("?", |(_, v)| v.as_str());
        md.push_str(&format!(
            "{}\n",
            report::run_entry(
                only,
                &format!(
                    "{} UTC, berth commit {commit}, load {load_start} → {}",
                    chrono::Utc::now().format("%Y-%m-%d %H:%M"),
                    loadavg()
                )
            )
        ));
        for r in &earlier.runs {
            md.push_str(&format!("{r}\n"));
        }
        md.push('\n');
    }
    md.push_str("## Scenarios\n\n");
    for s in SCENARIOS {
        md.push_str(&format!("{s}\n"));
    }
    md.push_str("\n## Results\n\n");
    md.push_str(&report::merged_table(&rows, &earlier));
    for section in report::merged_sections(&b.sections, &earlier) {
        md.push('\n');
        md.push_str(&section);
    }
    md.push_str("\n## Not measured yet\n\n");
    if buildkitd::from_env().is_none() {
        md.push_str("- Stock buildkitd with `--output type=docker | docker load`: `--stock-bin DIR` or `BERTH_BENCH_BUILDKITD` and `BERTH_BENCH_BUILDCTL` name stock binaries (none found for this run).\n");
    }
    md.push_str("- The offline mode through berthd: the offline rows run the worker and exporter (the code berthd runs) in this process; berthd itself can build from a stopped daemon's data root since c06460d (tested in `integration/tests/daemon_offline_base.rs`), but the bench does not drive it that way yet.\n");
    md.push_str(
        "- Scenarios 3 and 4 through berthd's gRPC API (they drive the worker in this process).\n",
    );
    md.push_str("- ExecOp steps in scenario 3 (its graphs are FileOps only).\n");
    println!("{md}");
    if let Some(dir) = opts.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&opts.out, &md).with_context(|| format!("write {}", opts.out.display()))?;
    eprintln!("wrote {}", opts.out.display());
    Ok(())
}

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run())
}
