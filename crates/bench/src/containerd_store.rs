//! Scenario 11: the Docker Engine's containerd image store (issue #12).

use std::time::{Instant, SystemTime};

use anyhow::{ensure, Context as _, Result};

use crate::report::{median, ratio, secs, Unit};
use crate::{
    berthd, docker_cmd, docker_run, fixtures, human, remove_tree, sz, Bench, GIB, MIB, RUNS,
};

/// Scenario 11: the Engine's containerd image store (issue #12): a private Docker 26.1.5 with
/// `containerd-snapshotter` and its own containerd 1.7.24 (Debian 13's packages, unpacked by
/// `.ci/trixie-packages.sh`). Build end → runnable for a 50 MiB change on a 0.5 GiB and on a
/// 2 GiB base (berth's time must be flat in the base size) through a real berthd (base layers in
/// place, the new layer committed as a snapshot), each next to `docker load` of the same image
/// (its `docker save` archive, made untimed after berth's image was removed) into the same Engine
/// plus the first run, a plain `cp -a` of the change, and a container start of the base alone, in
/// the same run.
pub(crate) async fn scenario(b: &mut Bench) -> Result<()> {
    let change = sz(b.scale, 50 * MIB);
    eprintln!("scenario 11: Docker Engine on the containerd image store (private Docker 26.1.5)");
    let dockerd = tokio::task::block_in_place(|| {
        integration::PrivateDockerd::new(integration::PrivateDockerdOptions::containerd_store())
    })
    .context("start a private Docker 26.1.5 on the containerd store (.ci/trixie-packages.sh)")?;
    // Two base sizes: berth's time must stay flat in the base (issue #12).
    let mut small = None;
    for (k, base_size) in [(0, sz(b.scale, GIB / 2)), (1, sz(b.scale, 2 * GIB))] {
        let s = runs(b, &dockerd, base_size, change, k).await?;
        match small.take() {
            None => {
                b.row(
                    11,
                    format!(
                        "berthd `--output type=image` [containerd store], {} base + {} change: last vertex → first `docker run` done",
                        human(base_size),
                        human(change)
                    ),
                    s.berth.clone(),
                    Unit::Secs,
                    format!(
                        "{}; berth/(cp -a + start) {:.2}",
                        ratio("docker load/berth", median(&s.load), median(&s.berth)),
                        median(&s.berth) / (median(&s.floor) + median(&s.start))
                    ),
                    "the smaller base, for flatness in the base size".into(),
                );
                small = Some(s.berth);
            }
            Some(small_berth) => {
                rows(b, s, base_size, change, &small_berth);
            }
        }
    }
    drop(dockerd);
    Ok(())
}

/// Samples of one base size.
struct Samples {
    berth: Vec<f64>,
    load: Vec<f64>,
    floor: Vec<f64>,
    start: Vec<f64>,
}

/// One warm-up and [`RUNS`] runs of every case on a fresh base of `base_size` bytes.
async fn runs(
    b: &mut Bench,
    dockerd: &integration::PrivateDockerd,
    base_size: u64,
    change: u64,
    k: u64,
) -> Result<Samples> {
    let host = format!("unix://{}", dockerd.socket_path().display());
    let sock = dockerd.containerd_socket().display().to_string();
    let tag = format!("{}base-ctrd-{k}:bench", b.tag_prefix);
    {
        let (h, t) = (host.clone(), tag.clone());
        let started = Instant::now();
        tokio::task::spawn_blocking(move || {
            fixtures::load_base_image(Some(&h), &t, base_size, 2 + k)
        })
        .await??;
        eprintln!(
            "  fixture {tag} in the Engine: busybox + {} loaded in {:.1} s",
            human(base_size),
            started.elapsed().as_secs_f64()
        );
    }
    let ctx_dir = b.scratch.join("ctx-ctrd");
    let archive = b.scratch.join("ctrd-save.tar");
    let (mut berth, mut load, mut floor, mut start) = (vec![], vec![], vec![], vec![]);
    for i in 0..=RUNS {
        std::fs::create_dir_all(&ctx_dir)?;
        let seed = 1000 + b.builds;
        {
            let blob = ctx_dir.join("blob");
            tokio::task::spawn_blocking(move || fixtures::write_blob(&blob, change, seed))
                .await??;
        }
        let floor_dir = b.scratch.join("floor-ctrd");
        let t = Instant::now();
        let cp = tokio::process::Command::new("cp")
            .arg("-a")
            .arg(&ctx_dir)
            .arg(&floor_dir)
            .status()
            .await?;
        let cp_took = secs(t.elapsed());
        ensure!(cp.success(), "cp -a failed");
        std::fs::remove_dir_all(&floor_dir)?;
        let t = Instant::now();
        docker_run(&host, &tag).await?;
        let start_took = secs(t.elapsed());

        b.builds += 1;
        let dir = b.scratch.join(format!("berthd-{}", b.builds));
        let d = berthd::Berthd::start_with(
            &Bench::berthd_bin()?,
            &dir,
            &host,
            &["--containerd-worker-addr", &sock],
            &[("BERTH_CONTAINERD_ADDRESS", "")],
        )
        .await?;
        let name = format!("{}ctrd-{}:bench", b.tag_prefix, b.builds);
        let def = Bench::change_llb(&tag, Some("local"))
            .marshal()
            .context("marshal LLB")?;
        let g = d.build_image(def, &ctx_dir, &name).await?;
        docker_run(&host, &name).await?;
        let took = SystemTime::now()
            .duration_since(g.last_vertex)
            .context("the last vertex completed after docker run")?;
        d.stop().await?;
        if let Some(keep) = std::env::var_os("BERTH_BENCH_KEEP_LOGS") {
            let keep = std::path::Path::new(&keep);
            std::fs::create_dir_all(keep)?;
            std::fs::copy(
                dir.join("berthd.log"),
                keep.join(format!("ctrd-{}.log", b.builds)),
            )?;
        }
        remove_tree(&dir)?;

        // The stock path: the same image as `docker save` writes it, loaded again.
        docker_cmd(&["-H", &host, "save", "-o", &archive.to_string_lossy(), &name]).await?;
        let top = docker_cmd(&[
            "-H",
            &host,
            "image",
            "inspect",
            "--format",
            "{{range .RootFS.Layers}}{{println .}}{{end}}",
            &name,
        ])
        .await?;
        let top = top
            .lines()
            .rfind(|l| !l.is_empty())
            .unwrap_or_default()
            .to_string();
        docker_cmd(&["-H", &host, "rmi", "-f", &name]).await?;
        // containerd's GC frees the new layer's blob (berth stores it uncompressed: digest =
        // diffID) a moment after the image is removed; a `docker load` before that would find
        // it and skip it, favouring the baseline.
        let gone = Instant::now();
        while dockerd
            .ctr_ok(&["content", "ls", "-q"])
            .lines()
            .any(|l| l.trim() == top)
        {
            ensure!(
                gone.elapsed() < std::time::Duration::from_secs(60),
                "containerd kept blob {top} of the removed image for 60 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let t = Instant::now();
        docker_cmd(&["-H", &host, "load", "-q", "-i", &archive.to_string_lossy()]).await?;
        docker_run(&host, &name).await?;
        let load_took = secs(t.elapsed());
        let _ = docker_cmd(&["-H", &host, "rmi", "-f", &name]).await;
        std::fs::remove_file(&archive)?;
        std::fs::remove_dir_all(&ctx_dir)?;
        eprintln!(
            "    {} {}: berthd {:.2} s, docker load {load_took:.2} s, cp -a {cp_took:.2} s, container start {start_took:.2} s",
            if i == 0 { "warm-up" } else { "run" },
            human(change),
            secs(took)
        );
        if i > 0 {
            berth.push(secs(took));
            load.push(load_took);
            floor.push(cp_took);
            start.push(start_took);
        }
    }
    let _ = docker_cmd(&["-H", &host, "rmi", "-f", &tag]).await;
    Ok(Samples {
        berth,
        load,
        floor,
        start,
    })
}

/// The rows of the large base; `small_berth` are berth's samples on the smaller base.
fn rows(b: &mut Bench, s: Samples, base_size: u64, change: u64, small_berth: &[f64]) {
    let (mb, ml) = (median(&s.berth), median(&s.load));
    let target = median(&s.floor) + median(&s.start);
    b.row(
        11,
        format!(
            "berthd `--output type=image` [containerd store], private Docker 26.1.5 (containerd 1.7.24, overlayfs snapshotter), {} base + {} change: last vertex → first `docker run` done",
            human(base_size),
            human(change)
        ),
        s.berth,
        Unit::Secs,
        format!(
            "{}; berth/(cp -a + start) {:.2}; ÷ smaller-base case = {:.2}×",
            ratio("docker load/berth", ml, mb),
            mb / target,
            mb / median(small_berth)
        ),
        "base layers used in place; only the new layer becomes a snapshot".into(),
    );
    b.row(
        11,
        "`docker load` of the same image (`docker save` archive, base present) into the same Engine + first `docker run`".into(),
        s.load,
        Unit::Secs,
        String::new(),
        "export only (no solve, no gRPC)".into(),
    );
    b.row(
        11,
        format!("`cp -a` of the {} change (floor)", human(change)),
        s.floor,
        Unit::Secs,
        String::new(),
        String::new(),
    );
    b.row(
        11,
        "`docker run` of the base image alone (container start)".into(),
        s.start,
        Unit::Secs,
        String::new(),
        String::new(),
    );
}
