//! Caches interoperate with stock buildkitd v0.11.6 (issue #15 item 4), in both directions, for
//! a Dockerfile with `FROM`, two `RUN` (one writing random bytes), `COPY` of a context file, of
//! a context directory (`COPY dir/ /dst/`) and of a wildcard (`COPY *.txt /dst/`), built
//! through `dockerfile.v0`:
//!
//! - stock → berth: stock buildkitd exports its cache to a real registry (`mode=max`); berthd,
//!   bound to its own private dockerd, builds the same Dockerfile with that cache imported (the
//!   `cache-imports` frontend attribute, as buildctl passes `--import-cache`): every step is
//!   CACHED and the image has stock's RUN output, not a rerun. berth finds stock's records by
//!   BuildKit's own keys (`worker::bkkeys`, pinned there against a stock export).
//! - berth → stock: berthd builds and exports its cache (`type=registry,mode=max` and
//!   `type=local,mode=max`; berth's inline cache carries berth's records only), driven by stock
//!   buildctl;
//!   a fresh stock buildkitd builds the same Dockerfile with stock buildctl `--import-cache`:
//!   stock's own progress stream (`--progress plain`; v0.11.6's buildctl has no `rawjson`)
//!   shows every step CACHED, and stock's output has berth's RUN output.
//!
//! Needs root, runc, overlayfs, dockerd/containerd binaries, Debian's docker-registry, and a
//! stock buildkitd v0.11.6: `$BERTH_STOCK_BUILDKITD`, else `/work/anchors/bin/buildkitd` (and
//! stock buildctl next to it for the reverse direction). CI cannot build stock: without the
//! binaries the tests say so and pass without checking anything (the digests stay pinned by
//! `worker`'s unit tests).

mod export_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use export_support::*;
use integration::buildkit_client::{Berthd, BuildOptions, BuildReport, BuildkitClient, Output};
use integration::{require_root, unique_name, PrivateDockerd, Registry};
use protos::moby::buildkit::v1 as control;

fn stock_binary() -> Option<PathBuf> {
    let p = std::env::var_os("BERTH_STOCK_BUILDKITD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/work/anchors/bin/buildkitd"));
    p.is_file().then_some(p)
}

/// Stock buildctl v0.11.6: next to the stock buildkitd.
fn stock_buildctl(buildkitd: &Path) -> Option<PathBuf> {
    let p = buildkitd.with_file_name("buildctl");
    p.is_file().then_some(p)
}

/// Runs stock buildctl against `sock` with `args` (killed after 5 minutes); returns its
/// stderr (the progress) and panics when it fails.
async fn run_buildctl(buildctl: &Path, sock: &Path, args: &[String], what: &str) -> String {
    let mut cmd = tokio::process::Command::new(buildctl);
    cmd.arg("--addr")
        .arg(format!("unix://{}", sock.display()))
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what}: buildctl did not finish within 5 minutes"))
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{what}: buildctl {args:?} failed ({}):\n{stderr}",
        out.status
    );
    stderr
}

/// The Dockerfile steps (`[n/m] …`) of buildctl's plain progress, with whether each was
/// CACHED.
fn plain_steps(progress: &str) -> Vec<(String, bool)> {
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    let mut cached: BTreeMap<String, bool> = BTreeMap::new();
    for line in progress.lines() {
        let Some(rest) = line.strip_prefix('#') else {
            continue;
        };
        let Some((n, text)) = rest.split_once(' ') else {
            continue;
        };
        if text.starts_with('[') && !names.contains_key(n) {
            names.insert(n.to_string(), text.to_string());
        }
        if text == "CACHED" {
            cached.insert(n.to_string(), true);
        }
    }
    let mut v: Vec<(String, bool)> = names
        .into_iter()
        .filter(|(_, name)| !name.starts_with("[internal]"))
        .map(|(n, name)| {
            let c = cached.get(&n).copied().unwrap_or(false);
            (name, c)
        })
        .collect();
    v.sort();
    v
}

/// The Dockerfile of both directions (`base`: the base image) and its context in `dir`: a
/// file, a directory with a subdirectory, and files a wildcard takes; `marker` in the file.
fn write_context(dir: &Path, base: &str, marker: &str) {
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM {base}\n\
             SHELL [\"/bin/busybox\", \"sh\", \"-c\"]\n\
             RUN /bin/busybox head -c 100000 /dev/urandom > /rand && /bin/busybox md5sum /rand > /rand.sum && echo one > /one\n\
             RUN echo two > /two\n\
             COPY hello.txt /hello.txt\n\
             COPY dir/ /dst/\n\
             COPY *.txt /dst/\n"
        ),
    )
    .unwrap();
    std::fs::write(dir.join("hello.txt"), format!("{marker}\n")).unwrap();
    std::fs::write(dir.join("other.txt"), "other\n").unwrap();
    std::fs::write(dir.join("notes.md"), "not copied by the wildcard\n").unwrap();
    std::fs::create_dir_all(dir.join("dir/sub")).unwrap();
    std::fs::write(dir.join("dir/a"), "a\n").unwrap();
    std::fs::write(dir.join("dir/sub/b"), format!("b {marker}\n")).unwrap();
    std::os::unix::fs::symlink("a", dir.join("dir/link")).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir.join("dir/sub"), std::fs::Permissions::from_mode(0o750)).unwrap();
}

/// A stock buildkitd on its own root and socket, killed (by PID) on drop.
struct Stock {
    child: Child,
    dir: tempfile::TempDir,
}

impl Stock {
    fn start(bin: &Path, registry: &str) -> Stock {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("buildkitd.toml");
        std::fs::write(
            &config,
            format!("[worker.containerd]\n  enabled = false\n[registry.\"{registry}\"]\n  http = true\n"),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("buildkitd.log")).unwrap();
        let child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .arg("--root")
            .arg(dir.path().join("root"))
            .arg("--addr")
            .arg(format!("unix://{}", dir.path().join("sock").display()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Stock { child, dir }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("buildkitd.log")).unwrap_or_default()
    }

    async fn client(&self) -> BuildkitClient {
        let sock = self.dir.path().join("sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if sock.exists() {
                if let Ok(c) = BuildkitClient::connect_unix(&sock).await {
                    return c;
                }
            }
            assert!(
                Instant::now() < deadline,
                "stock buildkitd did not answer on {} within 30 s:\n{}",
                sock.display(),
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Stock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A one-layer base in the registry: busybox at `/bin/busybox`, `Env: ["PATH=/bin"]`.
async fn push_base(addr: &str, repo: &str) -> String {
    let reference = format!("{addr}/{repo}:v1");
    let r = registry::Reference::parse(&reference).unwrap();
    let client = registry::Registry::new(registry::Hosts::new(Default::default()));
    let session = client.session(Arc::new(registry::Anonymous));
    let dir = tempfile::tempdir().unwrap();
    let tar = layer_tar(&[("bin/busybox", &busybox(), 0o755)]);
    let blob = gzip(&tar);
    let d = sha(&blob);
    let p = dir.path().join("layer");
    std::fs::write(&p, &blob).unwrap();
    session
        .push_blob(&r, &d, blob.len() as u64, &p, None, None)
        .await
        .unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(&tar)]},
    }))
    .unwrap();
    let config_digest = sha(&config);
    let p = dir.path().join("config");
    std::fs::write(&p, &config).unwrap();
    session
        .push_blob(&r, &config_digest, config.len() as u64, &p, None, None)
        .await
        .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": registry::MEDIA_TYPE_DOCKER_MANIFEST,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "digest": d,
            "size": blob.len(),
        }],
    }))
    .unwrap();
    session
        .push_manifest(
            &r,
            "v1",
            registry::MEDIA_TYPE_DOCKER_MANIFEST,
            manifest.into(),
        )
        .await
        .unwrap();
    reference
}

/// The records of the cache config at `cache_ref` (for failure messages).
async fn stock_records(cache_ref: &str) -> String {
    let client = registry::Registry::new(registry::Hosts::new(Default::default()));
    let rs = client.session(Arc::new(registry::Anonymous));
    let r = registry::Reference::parse(cache_ref).unwrap();
    let index = rs.resolve(&r).await.unwrap();
    let index: serde_json::Value = serde_json::from_slice(&index.bytes).unwrap();
    let config = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mediaType"] == remotecache::CACHE_CONFIG_MEDIA_TYPE)
        .unwrap_or_else(|| panic!("no cache config in {index}"));
    let d = config["digest"].as_str().unwrap();
    let desc = registry::Descriptor {
        media_type: remotecache::CACHE_CONFIG_MEDIA_TYPE.into(),
        digest: d.into(),
        size: config["size"].as_u64().unwrap(),
        urls: vec![],
        platform: None,
    };
    let mut s = rs.open_blob(&[], &r, &desc, None).await.unwrap();
    let mut out = vec![];
    while let Some(c) = s.next_chunk().await.unwrap() {
        out.extend_from_slice(&c);
    }
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    v["records"].to_string()
}

fn entry(kind: &str, attrs: &[(&str, &str)]) -> control::CacheOptionsEntry {
    control::CacheOptionsEntry {
        r#type: kind.to_string(),
        attrs: attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn dockerfile_opts(dir: &Path, output: Output) -> BuildOptions {
    BuildOptions {
        frontend: Some("dockerfile.v0".into()),
        locals: BTreeMap::from([
            ("context".to_string(), dir.to_path_buf()),
            ("dockerfile".to_string(), dir.to_path_buf()),
        ]),
        output,
        ..Default::default()
    }
}

/// The Dockerfile steps of a report (`[n/m] …`), with whether each was cached.
fn steps(r: &BuildReport) -> Vec<(String, bool)> {
    let mut v: Vec<(String, bool)> = r
        .vertices()
        .values()
        .filter(|v| v.name.starts_with('['))
        .filter(|v| !v.name.starts_with("[internal]"))
        .map(|v| (v.name.clone(), v.cached))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berthd_imports_a_stock_buildkitd_cache_with_every_step_cached() {
    require_root();
    let Some(stock_bin) = stock_binary() else {
        eprintln!(
            "SKIPPED: no stock buildkitd v0.11.6 (set BERTH_STOCK_BUILDKITD or install \
             /work/anchors/bin/buildkitd); the stock key formulas stay pinned by worker's \
             bkkeys unit tests"
        );
        return;
    };
    let reg = Registry::start().unwrap();
    let addr = reg.addr().to_string();
    let marker = unique_name("stockinterop");
    let base = push_base(&addr, "berth-interop/base").await;
    let cache_ref = format!("{addr}/berth-interop/cache:{marker}");

    let ctx = tempfile::tempdir().unwrap();
    write_context(ctx.path(), &base, &marker);

    // Stock: builds everything and exports its cache.
    let stock = Stock::start(&stock_bin, &addr);
    let sc = stock.client().await;
    let mut opts = dockerfile_opts(ctx.path(), Output::None);
    opts.cache_exports = vec![entry("registry", &[("ref", &cache_ref), ("mode", "max")])];
    let rs = sc.build(opts).await.unwrap();
    if let Err(e) = &rs.solve {
        panic!("stock build failed: {e}\n{}", stock.log_text());
    }
    let ran: Vec<_> = steps(&rs).into_iter().filter(|(_, c)| !c).collect();
    assert!(ran.len() >= 3, "stock ran {ran:?}");
    drop(sc);
    drop(stock);
    let records = stock_records(&cache_ref).await;
    eprintln!("stock cache records: {records}");

    // berthd: same Dockerfile, importing stock's cache.
    let dockerd = PrivateDockerd::new(Default::default()).unwrap();
    let host = dockerd.engine().host();
    let berthd = Berthd::start(&["--docker-host", &host]).unwrap();
    let image = format!("berth-test/stock-interop:{marker}");
    let mut opts = dockerfile_opts(
        ctx.path(),
        Output::Raw(
            "image".into(),
            BTreeMap::from([("name".to_string(), image.clone())]),
        ),
    );
    let imports = serde_json::json!([{"Type": "registry", "Attrs": {"ref": cache_ref}}]);
    opts.frontend_attrs
        .insert("cache-imports".into(), imports.to_string());
    let client = berthd.client().await.unwrap();
    let rb = client.build(opts).await.unwrap();
    if let Err(e) = &rb.solve {
        panic!("berthd build failed: {e}\n{}", berthd.log_text());
    }
    let st = steps(&rb);
    assert!(st.len() >= 6, "steps: {st:?}");
    for (name, cached) in &st {
        assert!(
            *cached,
            "{name} ran on berthd: {st:?}\n{}",
            berthd.log_text()
        );
    }
    assert_eq!(run_cat(Some(&host), &image, "/one").trim(), "one");
    assert_eq!(run_cat(Some(&host), &image, "/two").trim(), "two");
    assert_eq!(run_cat(Some(&host), &image, "/hello.txt").trim(), marker);
    assert_eq!(
        run_cat(Some(&host), &image, "/dst/sub/b").trim(),
        format!("b {marker}")
    );
    assert_eq!(
        run_cat(Some(&host), &image, "/dst/other.txt").trim(),
        "other"
    );
    drop(client);
    drop(berthd);
    drop(dockerd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_buildkitd_imports_berthd_caches_with_every_step_cached() {
    require_root();
    let Some((stock_bin, buildctl)) =
        stock_binary().and_then(|b| stock_buildctl(&b).map(|c| (b, c)))
    else {
        eprintln!(
            "SKIPPED: no stock buildkitd/buildctl v0.11.6 (set BERTH_STOCK_BUILDKITD or install \
             /work/anchors/bin/buildkitd and buildctl); the stock key formulas stay pinned by \
             worker's bkkeys unit tests"
        );
        return;
    };
    let reg = Registry::start().unwrap();
    let addr = reg.addr().to_string();
    let marker = unique_name("stockexp");
    let base = push_base(&addr, "berth-interop/base").await;
    let ctx = tempfile::tempdir().unwrap();
    write_context(ctx.path(), &base, &marker);
    let work = tempfile::tempdir().unwrap();
    let local_cache = work.path().join("cache");
    let registry_cache = format!("{addr}/berth-interop/cache:{marker}");
    let dockerfile_args = |extra: &[String]| -> Vec<String> {
        let mut v: Vec<String> = [
            "build",
            "--progress",
            "plain",
            "--frontend",
            "dockerfile.v0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.push("--local".into());
        v.push(format!("context={}", ctx.path().display()));
        v.push("--local".into());
        v.push(format!("dockerfile={}", ctx.path().display()));
        v.extend_from_slice(extra);
        v
    };

    // berthd: builds once, exports its cache two ways (the later builds are cached locally,
    // so every export carries the same RUN output).
    let dockerd = PrivateDockerd::new(Default::default()).unwrap();
    let host = dockerd.engine().host();
    let berthd = Berthd::start(&["--docker-host", &host]).unwrap();
    let image = format!("berth-test/stock-exp:{marker}");
    let exports: [(&str, Vec<String>); 2] = [
        (
            "registry",
            vec![
                "--export-cache".into(),
                format!("type=registry,ref={registry_cache},mode=max"),
                "--output".into(),
                format!("type=image,name={image}"),
            ],
        ),
        (
            "local",
            vec![
                "--export-cache".into(),
                format!("type=local,dest={},mode=max", local_cache.display()),
            ],
        ),
    ];
    for (what, extra) in &exports {
        let progress = run_buildctl(
            &buildctl,
            berthd.socket(),
            &dockerfile_args(extra),
            &format!("berthd build exporting a {what} cache"),
        )
        .await;
        eprintln!("berthd ({what} export):\n{progress}");
    }
    let berth_sum = run_cat(Some(&host), &image, "/rand.sum");
    assert!(berth_sum.contains("/rand"), "{berth_sum}");
    drop(berthd);
    drop(dockerd);

    // Stock's own round trip of the same Dockerfile, for what "every step" means there: a
    // fresh stock importing stock's cache reports every step CACHED but `FROM` (a source whose
    // record carries no result in stock's export is resolved, not loaded).
    let stock_cache = format!("{addr}/berth-interop/cache:{marker}-stock");
    let st = Stock::start(&stock_bin, &addr);
    drop(st.client().await);
    run_buildctl(
        &buildctl,
        &st.dir.path().join("sock"),
        &dockerfile_args(&[
            "--export-cache".into(),
            format!("type=registry,ref={stock_cache},mode=max"),
        ]),
        "stock build exporting its cache",
    )
    .await;
    drop(st);
    let st = Stock::start(&stock_bin, &addr);
    drop(st.client().await);
    let progress = run_buildctl(
        &buildctl,
        &st.dir.path().join("sock"),
        &dockerfile_args(&[
            "--import-cache".into(),
            format!("type=registry,ref={stock_cache}"),
        ]),
        "stock build importing stock's cache",
    )
    .await;
    drop(st);
    let baseline = plain_steps(&progress);
    eprintln!("stock importing stock's cache: {baseline:?}");
    assert_eq!(baseline.len(), 6, "{progress}");
    for (name, cached) in &baseline {
        assert_eq!(
            *cached,
            !name.contains("] FROM "),
            "{baseline:?}\n{progress}"
        );
    }

    // A fresh stock buildkitd per cache of berth's imports it (no output, so nothing pulls
    // the result's layers after the steps): every step CACHED, as in stock's own round trip.
    // Then, with a local output, stock's files are berth's RUN output.
    let imports: [(&str, String); 2] = [
        ("registry", format!("type=registry,ref={registry_cache}")),
        ("local", format!("type=local,src={}", local_cache.display())),
    ];
    for (what, import) in &imports {
        let stock = Stock::start(&stock_bin, &addr);
        drop(stock.client().await);
        let sock = stock.dir.path().join("sock");
        let progress = run_buildctl(
            &buildctl,
            &sock,
            &dockerfile_args(&["--import-cache".into(), import.clone()]),
            &format!("stock build importing berth's {what} cache"),
        )
        .await;
        let st = plain_steps(&progress);
        assert_eq!(
            st,
            baseline,
            "{what}: stock importing berth's cache vs stock's own\n{progress}\n{}",
            stock.log_text()
        );
        let out = work.path().join(format!("out-{what}"));
        run_buildctl(
            &buildctl,
            &sock,
            &dockerfile_args(&[
                "--import-cache".into(),
                import.clone(),
                "--output".into(),
                format!("type=local,dest={}", out.display()),
            ]),
            &format!("stock build importing berth's {what} cache, local output"),
        )
        .await;
        let sum = std::fs::read_to_string(out.join("rand.sum")).unwrap();
        assert_eq!(sum, berth_sum, "{what}: stock's RUN output is not berth's");
        assert_eq!(
            std::fs::read_to_string(out.join("dst/sub/b"))
                .unwrap()
                .trim(),
            format!("b {marker}")
        );
        assert_eq!(
            std::fs::read_to_string(out.join("dst/other.txt"))
                .unwrap()
                .trim(),
            "other"
        );
    }
}
