//! berthd bound to a Docker Engine on the **containerd image store**: Debian 13's Docker 26.1.5
//! with `"features": {"containerd-snapshotter": true}` and its own containerd 1.7.24
//! ([`PrivateDockerdOptions::containerd_store`], in its own network namespace, stopped by PID).
//!
//! What is checked, against the real Engine and containerd:
//! - base images by tag and by digest are used in place: the build's lower dirs are the Engine's
//!   `overlayfs` snapshots (whiteouts and opaque dirs of a 3-layer image included), no layer is
//!   pulled, copied or committed again, and the lease that held them is gone after the build;
//! - exec, MergeOp and DiffOp over such layers;
//! - `type=image` exports through containerd with tags through the Engine's API: the image is
//!   listed at once, runs, `docker save` carries every layer blob, `docker push` sends them to
//!   a registry (run in the Engine's network namespace), its base layers keep their blobs, and
//!   `docker image rm` lets containerd's GC free what the export added;
//! - pulls from a registry (host network; berthd pulls, not the Engine) land through
//!   containerd as Docker's own pull puts them there (record name, labels, snapshots under
//!   chainIDs), run, download each blob once for concurrent builds and only the missing layers
//!   of a partly present image, download layers in parallel; a SIGKILL at each pull step
//!   leaves nothing the next berthd and containerd's GC do not free;
//! - a `docker image prune -a` (with containerd's GC right after it) between a pull and the
//!   build's first read takes nothing the build needs; one between finding an image and
//!   holding it makes the build pull it again;
//! - a multi-platform index: a build for linux/arm64 after one for the host pulls the arm64
//!   manifest into the same index and exports an arm64 image;
//! - `--export-cache type=registry` of a build on such a base carries the base layer, read from
//!   containerd's content store;
//! - detection: without the containerd address (Engine 26 does not report it) the build fails
//!   naming `--containerd-worker-addr`.
//!
//! Needs root, runc, overlayfs and Debian 13's packages unpacked by `.ci/trixie-packages.sh`
//! (the test fails, naming the script, without them).

mod export_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use export_support::{export_image, response};
use futures::StreamExt;
use integration::buildkit_client::{Berthd, BuildOptions, BuildkitClient, Output};
use integration::{
    busybox_image, multi_layer_image, unique_name, PrivateDockerd, PrivateDockerdOptions, Registry,
    TestImage, MULTI_LAYER_ABSENT, MULTI_LAYER_FILES,
};
use llb::{RunOpts, State};

/// A private Engine on the containerd store and a berthd bound to it.
struct Env {
    dockerd: PrivateDockerd,
    berthd: Berthd,
}

impl Env {
    fn start(with_address: bool) -> Env {
        Env::start_with_env(with_address, &[])
    }

    fn start_with_env(with_address: bool, env: &[(&str, &str)]) -> Env {
        let dockerd = PrivateDockerd::new(PrivateDockerdOptions::containerd_store())
            .expect("private Docker 26.1.5 on the containerd store");
        let host = dockerd.engine().host();
        let sock = dockerd.containerd_socket().display().to_string();
        let mut args = vec!["--docker-host", host.as_str()];
        if with_address {
            args.extend(["--containerd-worker-addr", sock.as_str()]);
        }
        // A containerd address in the environment would hide what this test checks.
        let mut vars = vec![("BERTH_CONTAINERD_ADDRESS", "")];
        vars.extend_from_slice(env);
        let berthd = Berthd::start_with_env(&args, &vars).expect("berthd");
        Env { dockerd, berthd }
    }

    fn ctr(&self, args: &[&str]) -> String {
        self.dockerd.ctr_ok(args)
    }

    /// Names of the committed snapshots in the Engine's snapshotter (containers' active
    /// snapshots left out).
    fn snapshots(&self) -> Vec<String> {
        self.ctr(&["snapshots", "--snapshotter", "overlayfs", "ls"])
            .lines()
            .skip(1)
            .filter(|l| l.split_whitespace().last() == Some("Committed"))
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    }

    /// Digests in the content store.
    fn content(&self) -> Vec<String> {
        self.ctr(&["content", "ls", "-q"])
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    fn leases(&self) -> Vec<String> {
        self.ctr(&["leases", "ls", "-q"])
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    fn blob(&self, digest: &str) -> serde_json::Value {
        serde_json::from_str(&self.ctr(&["content", "get", digest])).expect("JSON blob")
    }

    /// Runs containerd's garbage collector now (the synchronous delete of a fresh lease
    /// collects everything nothing references).
    fn gc(&self) {
        let id = self.ctr(&["leases", "create"]).trim().to_string();
        assert!(id.len() > 8, "lease id {id:?}");
        self.ctr(&["leases", "delete", "--sync", &id]);
    }

    /// `docker image prune -a`: every image no container uses.
    async fn prune_all_images(&self) {
        let filters =
            std::collections::HashMap::from([("dangling".to_string(), vec!["false".to_string()])]);
        let opts = bollard::query_parameters::PruneImagesOptionsBuilder::default()
            .filters(&filters)
            .build();
        self.dockerd
            .engine()
            .client()
            .prune_images(Some(opts))
            .await
            .expect("docker image prune -a");
    }

    async fn client(&self) -> BuildkitClient {
        self.berthd.client().await.expect("berthd client")
    }

    /// Waits (≤ 20 s) for `cond`, which names what it waits for.
    fn wait_for(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; leases: {:?}; containerd log:\n{}",
                self.leases(),
                integration_log(&self.dockerd)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn integration_log(d: &PrivateDockerd) -> String {
    let p = d.root().join("containerd/containerd.log");
    let s = std::fs::read_to_string(p).unwrap_or_default();
    s[s.len().saturating_sub(4096)..].to_string()
}

/// The config's `rootfs.diff_ids` and the manifest's layer digests of an image (by ID).
fn layers_of(env: &Env, id: &str) -> (Vec<String>, Vec<String>) {
    let mut m = env.blob(id);
    if m.get("manifests").is_some() {
        let d = m["manifests"][0]["digest"].as_str().unwrap().to_string();
        m = env.blob(&d);
    }
    let config = env.blob(m["config"]["digest"].as_str().unwrap());
    let diff_ids = config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let blobs = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["digest"].as_str().unwrap().to_string())
        .collect();
    (diff_ids, blobs)
}

/// Every blob an image (by ID) references: its index (if any), manifest, config and layers.
/// Only these belong to the image; the content store can also hold transient blobs (left by
/// `docker load`) that containerd's GC frees on its own schedule.
fn image_content(env: &Env, id: &str) -> Vec<String> {
    let mut out = vec![id.to_string()];
    let mut m = env.blob(id);
    if let Some(list) = m.get("manifests").and_then(|l| l.as_array()) {
        let d = list[0]["digest"].as_str().unwrap().to_string();
        out.push(d.clone());
        m = env.blob(&d);
    }
    out.push(m["config"]["digest"].as_str().unwrap().to_string());
    for l in m["layers"].as_array().unwrap() {
        out.push(l["digest"].as_str().unwrap().to_string());
    }
    out
}

fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let parsed: Vec<layerstore::Digest> = diff_ids.iter().map(|d| d.parse().unwrap()).collect();
    layerstore::tar::chain_ids(&parsed)
        .iter()
        .map(|c| c.to_string())
        .collect()
}

async fn build_image(
    env: &Env,
    st: &State,
    name: &str,
) -> (BTreeMap<String, String>, BuildkitClient) {
    let client = env.client().await;
    let def = st.marshal().unwrap();
    let r = export_image(&client, &def, &[name.to_string()], &[])
        .await
        .expect("build");
    (response(&r, &env.berthd.log_text()), client)
}

fn sh(base: &State, script: &str) -> State {
    base.run(RunOpts::shell(script)).root()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_in_place_exec_export_run_save_rm() {
    let env = Env::start(true);
    let engine = env.dockerd.engine().clone();
    let ml = multi_layer_image(&engine).await.unwrap();
    // Facts of this store (recorded in docs/containerd-store.md): the image ID is the manifest
    // digest, the record carries the full name, snapshots are named by chainID.
    let records = env.ctr(&["images", "ls", "-q"]);
    let full = format!("docker.io/{}", ml.reference());
    assert!(records.lines().any(|l| l == full), "{records}");
    let (ml_diff_ids, ml_blobs) = layers_of(&env, ml.id());
    assert_eq!(ml_diff_ids.len(), 3);
    let ml_chains = chain_ids(&ml_diff_ids);
    let snaps_before = env.snapshots();
    for c in &ml_chains {
        assert!(snaps_before.contains(c), "{c} not in {snaps_before:?}");
    }
    let content_before = image_content(&env, ml.id());
    let all_content = env.content();
    for c in &content_before {
        assert!(all_content.contains(c), "{c} not in {all_content:?}");
    }

    // Exec over the 3 in-place layers: whiteouts and the opaque dir are honoured.
    let mut checks = String::from("set -e; ");
    for (path, text) in MULTI_LAYER_FILES {
        checks.push_str(&format!(
            "test \"$(cat {path})\" = \"{}\"; ",
            text.trim_end()
        ));
    }
    for path in MULTI_LAYER_ABSENT {
        checks.push_str(&format!("test ! -e {path}; "));
    }
    checks.push_str("echo built > /out");
    let st = sh(&llb::image(ml.reference()).state(), &checks);
    let name = format!("berth-test/ctrd-export:{}", unique_name("t"));
    let started = Instant::now();
    let (resp, _client) = build_image(&env, &st, &name).await;
    let digest = resp["containerimage.digest"].clone();

    // Listed at once, under the digest berth reported (= Docker's image ID on this store).
    let inspect = engine.inspect_image(&name).await.unwrap();
    assert_eq!(inspect.id.as_deref(), Some(digest.as_str()));
    let out = engine
        .run(&name, &["sh", "-c", "cat /out /data/keep/b.txt"])
        .await
        .unwrap();
    assert_eq!(out.assert_success().stdout, "built\nlayer3-b\n");
    eprintln!("build + export + run: {:?}", started.elapsed());

    // Nothing of the base was pulled, copied or committed again: the new image's first three
    // layers are the base's snapshots and blobs, one new snapshot was committed.
    let (diff_ids, blobs) = layers_of(&env, &digest);
    assert_eq!(diff_ids.len(), 4);
    assert_eq!(&diff_ids[..3], &ml_diff_ids[..]);
    assert_eq!(&blobs[..3], &ml_blobs[..], "base layers keep their blobs");
    assert_eq!(
        blobs[3], diff_ids[3],
        "the new layer is an uncompressed tar blob"
    );
    let chains = chain_ids(&diff_ids);
    let snaps_after = env.snapshots();
    let added: Vec<_> = snaps_after
        .iter()
        .filter(|s| !snaps_before.contains(s))
        .collect();
    assert_eq!(added, vec![&chains[3]], "snapshots added by the build");
    // The base-image lease was released (deleted in the background after the build).
    env.wait_for("berth's leases to be deleted", || {
        env.leases().iter().all(|l| !l.starts_with("berth-"))
    });

    // docker save carries every layer blob of the image.
    let mut tar = Vec::new();
    let mut s = engine.client().export_image(&name);
    while let Some(chunk) = s.next().await {
        tar.extend_from_slice(&chunk.expect("docker save"));
    }
    let mut entries = std::collections::BTreeSet::new();
    let mut a = tar::Archive::new(&tar[..]);
    for e in a.entries().unwrap() {
        entries.insert(e.unwrap().path().unwrap().display().to_string());
    }
    for b in &blobs {
        let p = format!("blobs/sha256/{}", &b[7..]);
        assert!(
            entries.contains(&p),
            "{p} not in the saved tar: {entries:?}"
        );
    }

    // docker push to a registry (in the Engine's network namespace) sends every layer.
    let registry = Registry::start_in_netns(&env.dockerd.netns().unwrap()).unwrap();
    let pushed = format!("{}/berth/ctrd:v1", registry.addr());
    engine.tag(&name, &pushed).await.unwrap();
    engine.push(&pushed).await.unwrap();
    assert_eq!(registry.tags("berth/ctrd").unwrap(), ["v1"]);
    for b in &blobs {
        let r = registry.get(&format!("/v2/berth/ctrd/blobs/{b}")).unwrap();
        assert_eq!(
            r.status,
            200,
            "blob {b} not in the registry: {}",
            registry.log_tail()
        );
    }
    engine.remove_image(&pushed).await.unwrap();

    // By digest (the Docker image ID on this store), again in place.
    let by_digest = format!("{}@{}", ml.reference().split(':').next().unwrap(), ml.id());
    let st2 = sh(
        &llb::image(&by_digest).state(),
        "cat /data/keep/a.txt > /out2",
    );
    let name2 = format!("berth-test/ctrd-export:{}", unique_name("d"));
    let (resp2, _c2) = build_image(&env, &st2, &name2).await;
    let out = engine.run(&name2, &["cat", "/out2"]).await.unwrap();
    assert_eq!(out.assert_success().stdout, "layer3-a\n");

    // docker image rm frees what the export added (GC labels right), and only that.
    engine.remove_image(&name).await.unwrap();
    engine.remove_image(&name2).await.unwrap();
    env.wait_for("containerd's GC to free the removed images", || {
        let c = env.content();
        let s = env.snapshots();
        !c.contains(&digest)
            && !c.contains(&resp2["containerimage.digest"])
            && !c.contains(&diff_ids[3])
            && !s.contains(&chains[3])
    });
    let snaps_end = env.snapshots();
    for c in &ml_chains {
        assert!(snaps_end.contains(c), "base snapshot {c} was freed");
    }
    let content_end = env.content();
    for c in &content_before {
        assert!(content_end.contains(c), "base content {c} was freed");
    }
    drop(ml);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_and_diff_over_containerd_layers() {
    let env = Env::start(true);
    let engine = env.dockerd.engine().clone();
    let bb: TestImage = busybox_image(&engine).await.unwrap();
    let ml = multi_layer_image(&engine).await.unwrap();
    let base = llb::image(bb.reference()).state();
    let multi = llb::image(ml.reference()).state();
    // diff(ml, ml + exec) is the exec's change alone; merged onto busybox it runs there.
    let changed = sh(
        &multi,
        "echo diffed > /data/keep/c.txt; rm /data/keep/a.txt",
    );
    let d = llb::diff(&multi, &changed);
    let merged = llb::merge(&[
        base.clone(),
        llb::scratch().file(llb::mkfile("/merged", 0o644, "m\n", Default::default())),
        d,
    ]);
    let checked = sh(
        &merged,
        "set -e; test \"$(cat /data/keep/c.txt /merged)\" = \"$(printf 'diffed\\nm')\"; \
         test ! -e /data/keep/b.txt; echo ok > /ok",
    );
    let name = format!("berth-test/ctrd-merge:{}", unique_name("m"));
    let (resp, _client) = build_image(&env, &checked, &name).await;
    let out = engine
        .run(
            &name,
            &[
                "sh",
                "-c",
                "cat /ok /merged /data/keep/c.txt; test ! -e /data/keep/a.txt",
            ],
        )
        .await
        .unwrap();
    assert_eq!(out.assert_success().stdout, "ok\nm\ndiffed\n");
    // The busybox layer under the merge is the Engine's own blob and snapshot.
    let (bb_diff, bb_blobs) = layers_of(&env, bb.id());
    let (diff_ids, blobs) = layers_of(&env, &resp["containerimage.digest"]);
    assert_eq!(diff_ids[0], bb_diff[0]);
    assert_eq!(blobs[0], bb_blobs[0]);
    engine.remove_image(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_address_missing_names_the_setting() {
    // Engine 26.1.5's GET /info has no Containerd key: without the flag berthd tries
    // containerd's default socket, which is not this Engine's.
    let env = Env::start(false);
    let engine = env.dockerd.engine().clone();
    let info = engine.client().info().await.unwrap();
    assert!(
        info.containerd.is_none(),
        "Engine 26 reports {:?}",
        info.containerd
    );
    assert_eq!(info.driver.as_deref(), Some("overlayfs"));
    let bb = busybox_image(&engine).await.unwrap();
    let client = env.client().await;
    let def = sh(&llb::image(bb.reference()).state(), "true")
        .marshal()
        .unwrap();
    let r = client
        .build(BuildOptions {
            definition: Some(def),
            output: Output::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let err = r.solve.expect_err("the build must fail");
    assert!(
        err.message().contains("--containerd-worker-addr"),
        "error does not name the flag: {err:?}"
    );
    assert!(
        !err.message().contains("unsupported docker storage driver"),
        "{err:?}"
    );
}

/// SIGKILL at every step of a base image's resolution (`containerdstore::BASE_STEPS`: its
/// lease holding the image, its short-lived view) and of the export into this Engine
/// (`BERTH_FAULT_KILL`), with the base image's lease held: the Engine stays usable and every name it shows runs; the restarted
/// berthd removes its leases and prepared snapshots before serving; the same build then
/// succeeds; and once the images are removed, containerd's GC frees everything the killed and
/// finished exports added (only the base image's snapshots and blobs remain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_each_export_step_leaves_nothing_unusable_or_unfreeable() {
    use layerstore::dockerstore::fault::{CONTAINERD_STEPS, FAULT_ENV};
    use std::os::unix::process::ExitStatusExt;

    let mut env = Env::start(true);
    let engine = env.dockerd.engine().clone();
    let ml = multi_layer_image(&engine).await.unwrap();
    let snaps_base = env.snapshots();
    let content_base = env.content();
    let no_env = ("BERTH_CONTAINERD_ADDRESS", "");
    let mut names = Vec::new();
    // The base image's resolution first (its lease and its short-lived view), then the export.
    for step in containerdstore::BASE_STEPS.iter().chain(CONTAINERD_STEPS) {
        let data = unique_name("k");
        let name = format!("berth-test/ctrd-kill:{data}");
        names.push(name.clone());
        let st = llb::image(ml.reference()).state().file(llb::mkfile(
            "/killdata",
            0o644,
            data.clone(),
            Default::default(),
        ));
        env.berthd.set_env(&[no_env, (FAULT_ENV, step)]);
        let _ = env.berthd.kill();
        env.berthd.restart().unwrap();
        let client = env.client().await;
        let def = st.marshal().unwrap();
        let r = tokio::time::timeout(
            Duration::from_secs(120),
            export_image(&client, &def, std::slice::from_ref(&name), &[]),
        )
        .await
        .expect("the client noticed berthd's death");
        let status = env
            .berthd
            .wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|e| {
                panic!(
                    "{e}: berthd did not die at {step} ({:?})\n{}",
                    r.map(|r| r.solve.map(|s| s.exporter_response)),
                    env.berthd.log_text()
                )
            });
        assert_eq!(status.signal(), Some(9), "{step}: {status:?}");
        assert!(
            env.berthd
                .log_text()
                .contains(&format!("SIGKILL at {step}")),
            "berthd died elsewhere than {step}:\n{}",
            env.berthd.log_text()
        );
        // (a) The Engine answers and a name it shows runs.
        let tags = engine.image_tags().await.unwrap();
        if tags.iter().any(|t| t.ends_with(&data)) {
            let out = engine.run(&name, &["cat", "/killdata"]).await.unwrap();
            assert_eq!(out.assert_success().stdout, data, "{step}");
        }
        // (b) The restarted berthd removed its leases and prepared snapshots before serving.
        env.berthd.set_env(&[no_env]);
        env.berthd.restart().unwrap();
        let leases = env.leases();
        assert!(
            leases.iter().all(|l| !l.starts_with("berth-")),
            "{step}: leases left: {leases:?}"
        );
        let all = env.ctr(&["snapshots", "--snapshotter", "overlayfs", "ls"]);
        assert!(
            !all.contains("berth-extract-") && !all.contains("berth-view-"),
            "{step}: {all}"
        );
        // (c) The same build succeeds and runs.
        let client = env.client().await;
        let r = export_image(&client, &def, std::slice::from_ref(&name), &[])
            .await
            .unwrap();
        response(&r, &env.berthd.log_text());
        let out = engine.run(&name, &["cat", "/killdata"]).await.unwrap();
        assert_eq!(out.assert_success().stdout, data, "{step} rerun");
    }
    for n in &names {
        engine.remove_image(n).await.unwrap();
    }
    env.wait_for("containerd's GC to free every export", || {
        let mut s = env.snapshots();
        s.sort();
        let mut b = snaps_base.clone();
        b.sort();
        s == b && env.content().iter().all(|c| content_base.contains(c))
    });
    drop(ml);
}

/// 8 exports at once into this Engine, sharing the base image and a common layer: all succeed
/// and run, the common layer's snapshot exists once, no prepared snapshot or lease is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_concurrent_exports_share_layers() {
    let env = Env::start(true);
    let engine = env.dockerd.engine().clone();
    let bb = busybox_image(&engine).await.unwrap();
    let snaps_before = env.snapshots();
    let shared = unique_name("shared");
    let mut builds = Vec::new();
    let mut names = Vec::new();
    for i in 0..8 {
        let data = format!("{shared}-{i}");
        let name = format!("berth-test/ctrd-conc:{data}");
        names.push((name.clone(), data.clone()));
        let st = llb::image(bb.reference())
            .state()
            .file(llb::mkfile(
                "/shared",
                0o644,
                shared.clone(),
                Default::default(),
            ))
            .file(llb::mkfile("/data", 0o644, data, Default::default()));
        let def = st.marshal().unwrap();
        let client = env.client().await;
        builds.push(tokio::spawn(async move {
            export_image(&client, &def, &[name], &[]).await
        }));
    }
    let log = env.berthd.log_text();
    for b in builds {
        let r = b.await.unwrap().unwrap();
        response(&r, &log);
    }
    for (name, data) in &names {
        let out = engine.run(name, &["cat", "/data"]).await.unwrap();
        assert_eq!(&out.assert_success().stdout, data);
    }
    // busybox + /shared + 8 × /data: the shared layer's snapshot once.
    let added: Vec<String> = env
        .snapshots()
        .into_iter()
        .filter(|s| !snaps_before.contains(s))
        .collect();
    assert_eq!(added.len(), 1 + 8, "{added:?}");
    let all = env.ctr(&["snapshots", "--snapshotter", "overlayfs", "ls"]);
    assert!(!all.contains("berth-extract-"), "{all}");
    env.wait_for("berth's leases to be deleted", || {
        env.leases().iter().all(|l| !l.starts_with("berth-"))
    });
    for (name, _) in &names {
        engine.remove_image(name).await.unwrap();
    }
}

/// Every file of a tar archive, by path.
fn tar_files(path: &std::path::Path) -> BTreeMap<String, Vec<u8>> {
    use std::io::Read;
    let mut out = BTreeMap::new();
    let mut a = tar::Archive::new(std::fs::File::open(path).expect("open archive"));
    for e in a.entries().expect("tar entries") {
        let mut e = e.expect("tar entry");
        if e.header().entry_type().is_file() {
            let p = e.path().unwrap().display().to_string();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            out.insert(p, data);
        }
    }
    out
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// Checks an OCI image layout archive as an independent reader would (every blob hashes to
/// its name, the manifest's layers to its descriptors, each layer decompresses to the config's
/// diffID) and returns each layer's uncompressed tar, bottom first.
fn checked_layout(path: &std::path::Path) -> Vec<Vec<u8>> {
    use std::io::Read;
    let files = tar_files(path);
    let blob = |digest: &str| -> &Vec<u8> {
        let p = format!("blobs/sha256/{}", digest.strip_prefix("sha256:").unwrap());
        files
            .get(&p)
            .unwrap_or_else(|| panic!("{p} missing from {}", path.display()))
    };
    for (p, data) in &files {
        if let Some(hex) = p.strip_prefix("blobs/sha256/") {
            assert_eq!(sha256_hex(data), format!("sha256:{hex}"), "blob {p}");
        }
    }
    let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let mdesc = &index["manifests"][0];
    let manifest: serde_json::Value =
        serde_json::from_slice(blob(mdesc["digest"].as_str().unwrap())).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(blob(manifest["config"]["digest"].as_str().unwrap())).unwrap();
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), diff_ids.len(), "{manifest}");
    layers
        .iter()
        .zip(diff_ids)
        .map(|(l, diff_id)| {
            let data = blob(l["digest"].as_str().unwrap());
            assert_eq!(l["size"].as_u64(), Some(data.len() as u64), "{l}");
            let mt = l["mediaType"].as_str().unwrap();
            let tar = if mt.ends_with("gzip") {
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(&data[..])
                    .read_to_end(&mut out)
                    .unwrap();
                out
            } else {
                assert!(mt.ends_with(".tar"), "{mt}");
                data.clone()
            };
            assert_eq!(sha256_hex(&tar), diff_id.as_str().unwrap(), "layer {l}");
            tar
        })
        .collect()
}

/// The regular files of a layer tar: path → contents.
fn layer_files(tar: &[u8]) -> BTreeMap<String, Vec<u8>> {
    use std::io::Read;
    let mut out = BTreeMap::new();
    let mut a = tar::Archive::new(tar);
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        if e.header().entry_type().is_file() {
            let p = e.path().unwrap().display().to_string();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            out.insert(p, data);
        }
    }
    out
}

/// `type=docker`, `type=oci` and `type=tar` of a build on a base image of the Engine's store:
/// the base layer's tar comes from containerd's content store (a gzip blob, as `docker import`
/// stores it, decompressed and checked against its diffID); an independent reader finds every
/// blob and diffID right, the docker archive loads into the Engine and runs, and the tarball
/// holds the whole tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_oci_and_tar_outputs_of_a_containerd_store_base() {
    let env = Env::start(true);
    let engine = env.dockerd.engine().clone();
    let bb = busybox_image(&engine).await.unwrap();
    let (bb_diff_ids, bb_blobs) = layers_of(&env, bb.id());
    // The decompression is what is checked: `docker import` stores a gzip blob (`docker load`
    // keeps an archive's uncompressed tars as they are).
    assert_eq!(bb_diff_ids.len(), 1);
    assert_ne!(
        bb_diff_ids[0], bb_blobs[0],
        "base layer blob is not compressed"
    );
    let st = sh(&llb::image(bb.reference()).state(), "echo built > /out");
    let def = st.marshal().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let build = |output: Output| {
        let def = def.clone();
        let env = &env;
        async move {
            let r = env
                .client()
                .await
                .build(BuildOptions {
                    definition: Some(def),
                    output,
                    ..Default::default()
                })
                .await
                .unwrap();
            if let Err(e) = &r.solve {
                panic!("solve failed: {e}\n{}", env.berthd.log_text());
            }
        }
    };
    let name = format!("berth-test/ctrd-out:{}", unique_name("o"));
    let docker_path = dir.path().join("docker.tar");
    build(Output::Docker(
        docker_path.clone(),
        BTreeMap::from([("name".to_string(), name.clone())]),
    ))
    .await;
    let oci_path = dir.path().join("oci.tar");
    build(Output::Oci(oci_path.clone(), BTreeMap::new())).await;
    let tar_path = dir.path().join("fs.tar");
    build(Output::Tar(tar_path.clone())).await;

    for path in [&docker_path, &oci_path] {
        let layers = checked_layout(path);
        assert_eq!(layers.len(), 2, "{}", path.display());
        // The base layer's exact bytes: the diffID of the Engine's image.
        assert_eq!(sha256_hex(&layers[0]), bb_diff_ids[0]);
        let base = layer_files(&layers[0]);
        assert!(base.contains_key("bin/busybox"), "{}", path.display());
        let top = layer_files(&layers[1]);
        assert_eq!(top["out"], b"built\n", "{}", path.display());
    }

    // The docker archive loads into the Engine (as a new image record) and runs.
    let file = tokio::fs::File::open(&docker_path).await.unwrap();
    let body = bollard::body_try_stream(tokio_util::io::ReaderStream::new(file));
    let mut progress = engine.client().import_image(
        bollard::query_parameters::ImportImageOptions {
            quiet: true,
            platform: None,
        },
        body,
        None,
    );
    while let Some(item) = progress.next().await {
        let info = item.expect("docker load");
        assert!(info.error_detail.is_none(), "docker load: {info:?}");
    }
    let out = engine
        .run(&name, &["sh", "-c", "cat /out; wc -l < /etc/passwd"])
        .await
        .unwrap();
    assert_eq!(out.assert_success().stdout, "built\n3\n");
    engine.remove_image(&name).await.unwrap();

    // The tarball is the whole tree: the base's files and the exec's.
    let fs = tar_files(&tar_path);
    assert_eq!(fs["out"], b"built\n");
    assert!(fs.contains_key("bin/busybox"));
    assert!(fs.contains_key("etc/passwd"));
    drop(bb);
}

/// An image pushed to a (host network) registry with berth's registry client: gzip layers.
struct Pushed {
    reference: String,
    manifest_digest: String,
    config_digest: String,
    layer_digests: Vec<String>,
    diff_ids: Vec<String>,
}

/// Pushes `addr/repo:tag` made of `layers` (uncompressed tars, pushed gzip-compressed).
async fn push_image(addr: &str, repo: &str, tag: &str, layers: &[Vec<u8>]) -> Pushed {
    use export_support::{gzip, sha};
    let reference = format!("{addr}/{repo}:{tag}");
    let r = registry::Reference::parse(&reference).unwrap();
    let client = registry::Registry::new(registry::Hosts::new(Default::default()));
    let session = client.session(std::sync::Arc::new(registry::Anonymous));
    let dir = tempfile::tempdir().unwrap();
    let diff_ids: Vec<String> = layers.iter().map(|t| sha(t)).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/busybox", "sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let mut descs = Vec::new();
    let mut layer_digests = Vec::new();
    for (i, tar) in layers.iter().enumerate() {
        let blob = gzip(tar);
        let d = sha(&blob);
        let p = dir.path().join(format!("l{i}"));
        std::fs::write(&p, &blob).unwrap();
        session
            .push_blob(&r, &d, blob.len() as u64, &p, None, None)
            .await
            .unwrap();
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "digest": d,
            "size": blob.len(),
        }));
        layer_digests.push(d);
    }
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
        "layers": descs,
    }))
    .unwrap();
    let manifest_digest = session
        .push_manifest(
            &r,
            tag,
            registry::MEDIA_TYPE_DOCKER_MANIFEST,
            manifest.into(),
        )
        .await
        .unwrap();
    Pushed {
        reference,
        manifest_digest,
        config_digest,
        layer_digests,
        diff_ids,
    }
}

/// An uncompressed layer tar of regular files `(path, content, mode)`, owned by root, with a
/// fixed mtime. (Numeric header fields are all set, as every image builder writes them:
/// berth's tar reader refuses NUL-filled uid fields, which Go's reader reads as 0.)
fn layer_tar(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// A busybox layer unique to `seed` (so no other test's pull provides it).
fn unique_base_layer(seed: &str) -> Vec<u8> {
    let bb = export_support::busybox();
    layer_tar(&[
        ("bin/busybox", &bb, 0o755),
        ("etc/berth-test-image", seed.as_bytes(), 0o644),
    ])
}

fn file_layer(path: &str, text: &str) -> Vec<u8> {
    layer_tar(&[(path, text.as_bytes(), 0o644)])
}

/// Successful GETs of blob `digest` in the registry's log.
fn blob_gets(reg: &Registry, digest: &str) -> usize {
    reg.log_tail()
        .lines()
        .filter(|l| {
            l.contains("GET") && l.contains(&format!("blobs/{digest}")) && l.contains("\" 200 ")
        })
        .count()
}

/// A solve (no export) of `reference` with a file on top: it makes berthd resolve the image.
async fn solve_on(
    env: &Env,
    reference: &str,
    data: &str,
) -> integration::buildkit_client::BuildReport {
    let def = llb::State::from(llb::image(reference))
        .file(llb::mkfile("/data", 0o644, data, Default::default()))
        .marshal()
        .unwrap();
    env.client()
        .await
        .build(BuildOptions {
            definition: Some(def),
            ..Default::default()
        })
        .await
        .unwrap()
}

/// `ctr content ls` line of `digest`.
fn content_line(env: &Env, digest: &str) -> String {
    env.ctr(&["content", "ls"])
        .lines()
        .find(|l| l.starts_with(digest))
        .unwrap_or_else(|| panic!("{digest} not in the content store"))
        .to_string()
}

/// Images berth pulls land in this Engine through its containerd, as Docker's own pull puts
/// them there: the record is named as Docker names it and lists in `docker images` at once
/// under Docker's image ID (the manifest digest), blobs carry Docker's labels, layers are
/// unpacked under their chainIDs, and the image runs. Two concurrent builds download each blob
/// once; a second image sharing the base layer downloads and unpacks only its own layer; no
/// lease is left; `docker image rm` then lets containerd's GC free all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_land_through_containerd_once_and_run() {
    let env = Env::start(true);
    let engine = env.dockerd.engine().clone();
    let reg = Registry::start().unwrap();
    let repo = unique_name("berth-test/ctrd-pull");
    let (hello_a, hello_b) = (unique_name("a"), unique_name("b"));
    let base = unique_base_layer(&repo);
    let a = push_image(
        reg.addr(),
        &repo,
        "a",
        &[base.clone(), file_layer("hello", &hello_a)],
    )
    .await;
    let b = push_image(
        reg.addr(),
        &repo,
        "b",
        &[base, file_layer("hello", &hello_b)],
    )
    .await;
    let snaps_base = env.snapshots();
    let content_base = env.content();

    // Two builds at once: one download per blob.
    let (ra, rb) = tokio::join!(
        solve_on(&env, &a.reference, "1"),
        solve_on(&env, &a.reference, "2")
    );
    for r in [&ra, &rb] {
        if let Err(e) = &r.solve {
            panic!(
                "build failed: {e}\n{}\n{}",
                env.berthd.log_text(),
                reg.log_tail()
            );
        }
    }
    for d in &a.layer_digests {
        assert_eq!(
            blob_gets(&reg, d),
            1,
            "blob {d} fetched once\n{}",
            reg.log_tail()
        );
    }
    // Progress: one status per layer, ending at its size.
    let statuses = [ra.vertex_statuses(), rb.vertex_statuses()].concat();
    for d in &a.layer_digests {
        let last = statuses.iter().rfind(|s| &s.id == d);
        let last = last.unwrap_or_else(|| panic!("no progress for layer {d}: {statuses:?}"));
        assert!(last.total > 0 && last.current == last.total, "{last:?}");
        assert!(last.completed.is_some(), "{last:?}");
    }
    // Layers download in parallel: the second layer's download starts before the first one's
    // (a busybox layer) ends. One after the other, it would start after the first was unpacked.
    let first = |id: &str, started: bool| {
        statuses
            .iter()
            .filter(|s| s.id == id)
            .filter_map(|s| if started { &s.started } else { &s.completed }.as_ref())
            .map(|t| (t.seconds, t.nanos))
            .min()
            .unwrap_or_else(|| panic!("no times for {id}: {statuses:?}"))
    };
    assert!(
        first(&a.layer_digests[1], true) < first(&a.layer_digests[0], false),
        "second layer started after the first ended: {statuses:?}"
    );

    // The record as Docker names a pull; Docker's image ID is the manifest digest.
    let records = env.ctr(&["images", "ls", "-q"]);
    assert!(records.lines().any(|l| l == a.reference), "{records}");
    let inspect = engine.inspect_image(&a.reference).await.unwrap();
    assert_eq!(inspect.id.as_deref(), Some(a.manifest_digest.as_str()));
    let out = engine
        .run(&a.reference, &["/bin/busybox", "cat", "/hello"])
        .await
        .unwrap();
    assert_eq!(out.assert_success().stdout, hello_a);

    // Docker's labels.
    let chains = chain_ids(&a.diff_ids);
    let source = format!("containerd.io/distribution.source.127.0.0.1={repo}");
    for (d, diff_id) in a.layer_digests.iter().zip(&a.diff_ids) {
        let line = content_line(&env, d);
        assert!(line.contains(&source), "{line}");
        assert!(
            line.contains(&format!("containerd.io/uncompressed={diff_id}")),
            "{line}"
        );
    }
    let line = content_line(&env, &a.manifest_digest);
    assert!(
        line.contains(&format!(
            "containerd.io/gc.ref.content.config={}",
            a.config_digest
        )),
        "{line}"
    );
    for (i, d) in a.layer_digests.iter().enumerate() {
        assert!(
            line.contains(&format!("containerd.io/gc.ref.content.l.{i}={d}")),
            "{line}"
        );
    }
    let line = content_line(&env, &a.config_digest);
    assert!(
        line.contains(&format!(
            "containerd.io/gc.ref.snapshot.overlayfs={}",
            chains[1]
        )),
        "{line}"
    );
    let added: Vec<String> = env
        .snapshots()
        .into_iter()
        .filter(|s| !snaps_base.contains(s))
        .collect();
    assert_eq!(added.len(), 2, "{added:?}");
    for c in &chains {
        assert!(added.contains(c), "{c} not in {added:?}");
    }
    let all = env.ctr(&["snapshots", "--snapshotter", "overlayfs", "ls"]);
    assert!(!all.contains("berth-unpack-"), "{all}");
    env.wait_for("berth's leases to be deleted", || {
        env.leases().iter().all(|l| !l.starts_with("berth-"))
    });

    // The second image shares the base layer: only its own layer is fetched and unpacked.
    let r = solve_on(&env, &b.reference, "3").await;
    if let Err(e) = &r.solve {
        panic!("build failed: {e}\n{}", env.berthd.log_text());
    }
    assert_eq!(a.layer_digests[0], b.layer_digests[0]);
    assert_eq!(
        blob_gets(&reg, &b.layer_digests[0]),
        1,
        "{}",
        reg.log_tail()
    );
    assert_eq!(
        blob_gets(&reg, &b.layer_digests[1]),
        1,
        "{}",
        reg.log_tail()
    );
    let added: Vec<String> = env
        .snapshots()
        .into_iter()
        .filter(|s| !snaps_base.contains(s))
        .collect();
    assert_eq!(added.len(), 3, "{added:?}");
    let out = engine
        .run(&b.reference, &["/bin/busybox", "cat", "/hello"])
        .await
        .unwrap();
    assert_eq!(out.assert_success().stdout, hello_b);

    // A third build finds the image in the Engine: nothing more is fetched.
    solve_on(&env, &a.reference, "4").await.solve.unwrap();
    for d in &a.layer_digests {
        assert_eq!(blob_gets(&reg, d), 1, "blob {d} fetched once");
    }

    // `docker image rm` frees all of it.
    engine.remove_image(&a.reference).await.unwrap();
    engine.remove_image(&b.reference).await.unwrap();
    env.wait_for("containerd's GC to free the pulled images", || {
        let mut s = env.snapshots();
        s.sort();
        let mut base = snaps_base.clone();
        base.sort();
        s == base && env.content().iter().all(|c| content_base.contains(c))
    });
}

/// SIGKILL at each step of a pull into containerd (`BERTH_FAULT_KILL`): the next berthd removes
/// the killed pull's lease, prepared snapshots and unfinished blob writes before its first
/// resolution, and containerd's GC then frees everything the pull wrote (an image whose record
/// was created runs, and is freed once removed). The same pull then succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_each_pull_step_leaves_nothing_the_gc_cannot_free() {
    use layerstore::dockerstore::fault::FAULT_ENV;
    use std::os::unix::process::ExitStatusExt;

    let mut env = Env::start(true);
    let engine = env.dockerd.engine().clone();
    let bb = busybox_image(&engine).await.unwrap();
    let reg = Registry::start().unwrap();
    let repo = unique_name("berth-test/ctrd-kill-pull");
    let hello = unique_name("k");
    // Big enough layers that a kill at the first chunk is in the middle of the stream.
    let big = export_support::noise(&repo, 8 << 20);
    let base = layer_tar(&[
        ("bin/busybox", &export_support::busybox(), 0o755),
        ("big", &big, 0o644),
    ]);
    let img = push_image(
        reg.addr(),
        &repo,
        "v1",
        &[base, file_layer("hello", &hello)],
    )
    .await;
    let chains = chain_ids(&img.diff_ids);
    let snaps_base = env.snapshots();
    let content_base = env.content();
    let no_env = ("BERTH_CONTAINERD_ADDRESS", "");
    for step in containerdstore::PULL_STEPS {
        env.berthd.set_env(&[no_env, (FAULT_ENV, step)]);
        let _ = env.berthd.kill();
        env.berthd.restart().unwrap();
        let r = tokio::time::timeout(
            Duration::from_secs(120),
            solve_on(&env, &img.reference, step),
        )
        .await
        .expect("the client noticed berthd's death");
        let status = env
            .berthd
            .wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|e| {
                panic!(
                    "{e}: berthd did not die at {step} ({:?})\n{}",
                    r.solve,
                    env.berthd.log_text()
                )
            });
        assert_eq!(status.signal(), Some(9), "{step}: {status:?}");
        assert!(
            env.berthd
                .log_text()
                .contains(&format!("SIGKILL at {step}")),
            "berthd died elsewhere than {step}:\n{}",
            env.berthd.log_text()
        );
        // What the killed pull left: its lease; mid-layer also an unfinished blob write and a
        // prepared snapshot; from the first committed layer on, that layer's snapshot.
        let leases = env.leases();
        // (A pull writes under the build's base-image lease.)
        assert!(
            leases.iter().any(|l| l.starts_with("berth-base-")),
            "{step}: {leases:?}"
        );
        let all = env.ctr(&["snapshots", "--snapshotter", "overlayfs", "ls"]);
        if *step == "containerd-pull:mid-layer" {
            assert!(all.contains("berth-unpack-"), "{step}: {all}");
            let active = env.ctr(&["content", "active"]);
            assert!(active.contains("berth-pull-"), "{step}: {active}");
        }
        if !["containerd-pull:lease", "containerd-pull:mid-layer"].contains(step) {
            assert!(all.contains(&chains[0]), "{step}: {all}");
        }
        // The next berthd sweeps before its first resolution (here of a local base).
        env.berthd.set_env(&[no_env]);
        env.berthd.restart().unwrap();
        let r = solve_on(&env, bb.reference(), step).await;
        if let Err(e) = &r.solve {
            panic!("{step}: build failed: {e}\n{}", env.berthd.log_text());
        }
        env.wait_for("the killed pull's lease to be deleted", || {
            env.leases().iter().all(|l| !l.starts_with("berth-"))
        });
        let all = env.ctr(&["snapshots", "--snapshotter", "overlayfs", "ls"]);
        assert!(!all.contains("berth-unpack-"), "{step}: {all}");
        let active = env.ctr(&["content", "active"]);
        assert!(!active.contains("berth-pull-"), "{step}: {active}");
        let records = env.ctr(&["images", "ls", "-q"]);
        if records.lines().any(|l| l == img.reference) {
            assert_eq!(*step, "containerd-pull:image", "{records}");
            let out = engine
                .run(&img.reference, &["/bin/busybox", "cat", "/hello"])
                .await
                .unwrap();
            assert_eq!(out.assert_success().stdout, hello, "{step}");
            engine.remove_image(&img.reference).await.unwrap();
        }
        env.wait_for(
            &format!("containerd's GC to free what the pull killed at {step} wrote"),
            || {
                let mut s = env.snapshots();
                s.sort();
                let mut base = snaps_base.clone();
                base.sort();
                s == base && env.content().iter().all(|c| content_base.contains(c))
            },
        );
    }
    // The same pull succeeds.
    let r = solve_on(&env, &img.reference, "done").await;
    if let Err(e) = &r.solve {
        panic!("build failed: {e}\n{}", env.berthd.log_text());
    }
    let out = engine
        .run(&img.reference, &["/bin/busybox", "cat", "/hello"])
        .await
        .unwrap();
    assert_eq!(out.assert_success().stdout, hello);
    engine.remove_image(&img.reference).await.unwrap();
    drop(bb);
}

/// berthd's hold points (`BERTH_FAULT_HOLD`), armed through files in a directory of the test's.
struct Holds {
    dir: tempfile::TempDir,
}

impl Holds {
    fn new() -> Holds {
        Holds {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self) -> String {
        self.dir.path().display().to_string()
    }

    fn arm(&self, step: &str) {
        std::fs::write(self.dir.path().join(step), b"").unwrap();
    }

    /// Waits (≤ 60 s) until berthd holds at `step`.
    async fn reached(&self, step: &str, berthd: &Berthd) {
        let held = self.dir.path().join(format!("{step}.held"));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !held.exists() {
            assert!(
                Instant::now() < deadline,
                "berthd did not reach {step} within 60 s\nberthd log:\n{}",
                berthd.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn release(&self, step: &str) {
        std::fs::remove_file(self.dir.path().join(format!("{step}.held"))).unwrap();
    }
}

/// A build on `reference` copying its `/hello` to `/out` with an exec, exported as `name`,
/// started in the background.
async fn start_copy_build(
    env: &Env,
    reference: &str,
    name: &str,
) -> tokio::task::JoinHandle<anyhow::Result<integration::buildkit_client::BuildReport>> {
    let def = llb::State::from(llb::image(reference))
        .run(RunOpts::args(["/bin/busybox", "cp", "/hello", "/out"]))
        .root()
        .marshal()
        .unwrap();
    let client = env.client().await;
    let names = vec![name.to_string()];
    tokio::spawn(async move { export_image(&client, &def, &names, &[]).await })
}

/// A `docker image prune -a`, with containerd's GC run right after it, in the two windows a
/// build has before it reads a base image of this store:
/// - between the pull (the image record exists, nothing uses it) and the build's first read:
///   the build's lease, taken before the pull, holds the image, so its snapshots survive the
///   prune and the GC and the build succeeds without fetching anything again;
/// - between finding an image the Engine has and holding it: the GC takes it, and the build
///   pulls it again (each blob fetched a second time) instead of failing with "image not
///   found".
/// Both builds' exported images run and show the base's file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_before_the_build_reads_its_base_takes_nothing_it_needs() {
    let holds = Holds::new();
    let hold_env = (layerstore::dockerstore::fault::HOLD_ENV, holds.path());
    let env = Env::start_with_env(true, &[(hold_env.0, hold_env.1.as_str())]);
    let engine = env.dockerd.engine().clone();
    let reg = Registry::start().unwrap();
    let repo = unique_name("berth-test/ctrd-prune");
    let hello = unique_name("p");
    let img = push_image(
        reg.addr(),
        &repo,
        "v1",
        &[unique_base_layer(&repo), file_layer("hello", &hello)],
    )
    .await;
    let chains = chain_ids(&img.diff_ids);

    // 1. Pulled, not read yet.
    let step = "containerd-pull:pulled";
    holds.arm(step);
    let first = unique_name("berth-test/ctrd-prune-out1");
    let build = start_copy_build(&env, &img.reference, &first).await;
    holds.reached(step, &env.berthd).await;
    let records = env.ctr(&["images", "ls", "-q"]);
    assert!(records.lines().any(|l| l == img.reference), "{records}");
    env.prune_all_images().await;
    env.gc();
    let records = env.ctr(&["images", "ls", "-q"]);
    assert!(
        !records.lines().any(|l| l == img.reference),
        "the prune removed the pulled image's record: {records}"
    );
    let snaps = env.snapshots();
    for c in &chains {
        assert!(
            snaps.contains(c),
            "layer {c} collected while the build's lease held it: {snaps:?}"
        );
    }
    // The solve ends and drops its ops before the export starts: the result must still hold
    // the base's layers (the image record is gone), or a GC in that window takes them and the
    // export finds a layer neither Docker nor berth has (seen in CI before the lease moved from
    // the source op to the build's result).
    let export = "containerd-export:start";
    holds.arm(export);
    holds.release(step);
    holds.reached(export, &env.berthd).await;
    // Lets a lease dropped with the ops be deleted (in the background) before the GC runs, so
    // this fails when only the ops held the base.
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.gc();
    let snaps = env.snapshots();
    for c in &chains {
        assert!(
            snaps.contains(c),
            "layer {c} collected between the solve and the export: {snaps:?}"
        );
    }
    holds.release(export);
    let r = build.await.unwrap().expect("build");
    if let Err(e) = &r.solve {
        panic!("build failed: {e}\n{}", env.berthd.log_text());
    }
    for d in &img.layer_digests {
        assert_eq!(blob_gets(&reg, d), 1, "blob {d} fetched once");
    }
    let out = engine
        .run(&first, &["/bin/busybox", "cat", "/out"])
        .await
        .unwrap();
    assert_eq!(out.assert_success().stdout, hello);
    env.wait_for("the build's lease to be deleted", || {
        env.leases().iter().all(|l| !l.starts_with("berth-"))
    });

    // 2. Found in the Engine, not held yet.
    engine.remove_image(&first).await.unwrap();
    solve_on(&env, &img.reference, "pull again")
        .await
        .solve
        .unwrap();
    for d in &img.layer_digests {
        assert_eq!(blob_gets(&reg, d), 2, "blob {d} fetched again");
    }
    let step = "containerd-base:found";
    holds.arm(step);
    let second = unique_name("berth-test/ctrd-prune-out2");
    let build = start_copy_build(&env, &img.reference, &second).await;
    holds.reached(step, &env.berthd).await;
    env.prune_all_images().await;
    env.gc();
    let snaps = env.snapshots();
    assert!(
        !snaps.contains(&chains[1]),
        "the prune and the GC took the unused image: {snaps:?}"
    );
    holds.release(step);
    let r = build.await.unwrap().expect("build");
    if let Err(e) = &r.solve {
        panic!("build failed: {e}\n{}", env.berthd.log_text());
    }
    for d in &img.layer_digests {
        assert_eq!(
            blob_gets(&reg, d),
            3,
            "blob {d} pulled again after the prune"
        );
    }
    let out = engine
        .run(&second, &["/bin/busybox", "cat", "/out"])
        .await
        .unwrap();
    assert_eq!(out.assert_success().stdout, hello);
    engine.remove_image(&second).await.unwrap();
    engine.remove_image(&img.reference).await.unwrap();
}

/// A Dockerfile `FROM --platform=linux/arm64 <reference>` + `COPY`, exported as image `name`.
fn arm64_dockerfile(reference: &str, name: &str) -> (tempfile::TempDir, Output) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!("FROM --platform=linux/arm64 {reference}\nCOPY data /data\n"),
    )
    .unwrap();
    std::fs::write(dir.path().join("data"), b"arm").unwrap();
    let attrs = BTreeMap::from([("name".to_string(), name.to_string())]);
    (dir, Output::Raw("image".into(), attrs))
}

/// A multi-platform image (an index of a runnable linux/amd64 image and a linux/arm64 one made
/// of files only) on this store: a build for the host pulls the index with the amd64 image
/// only (as Docker's pull does); a FileOp-only build for linux/arm64 of the same tag then finds
/// the arm64 manifest missing under the same index and pulls just that platform into it (no
/// amd64 blob fetched again, the record still names the index), and a Dockerfile
/// `FROM --platform=linux/arm64` + `COPY` of it exports an arm64 image whose first layer is
/// the arm64 one. Both runs' exports keep the right layers and
/// `docker image inspect` shows each one's platform.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_platform_builds_pick_the_platform() {
    let env = Env::start(true);
    let engine = env.dockerd.engine().clone();
    let reg = Registry::start().unwrap();
    let repo = unique_name("berth-test/ctrd-multi");
    let arm_layer = layer_tar(&[
        ("platform", b"arm64\n", 0o644),
        ("arm64-only", repo.as_bytes(), 0o644),
    ]);
    let idx = export_support::push_index(
        reg.addr(),
        &repo,
        "multi",
        &[
            (
                "amd64",
                vec![unique_base_layer(&repo), file_layer("platform", "amd64\n")],
            ),
            ("arm64", vec![arm_layer]),
        ],
    )
    .await;
    let (amd, arm) = (&idx.platforms[0], &idx.platforms[1]);
    let (out_amd, out_arm) = (
        unique_name("berth-test/ctrd-multi-amd"),
        unique_name("berth-test/ctrd-multi-arm"),
    );

    // The host's platform: the index with the amd64 image.
    let host = llb::State::from(llb::image(&idx.reference)).file(llb::mkfile(
        "/data",
        0o644,
        "amd",
        Default::default(),
    ));
    let (_, _client) = build_image(&env, &host, &out_amd).await;
    let inspect = engine.inspect_image(&idx.reference).await.unwrap();
    assert_eq!(inspect.id.as_deref(), Some(idx.digest.as_str()));
    let content = env.content();
    assert!(!content.contains(&arm.manifest_digest), "{content:?}");
    let out = engine
        .run(&out_amd, &["/bin/busybox", "cat", "/platform"])
        .await
        .unwrap();
    assert_eq!(out.assert_success().stdout, "amd64\n");
    let i = engine.inspect_image(&out_amd).await.unwrap();
    assert_eq!(i.architecture.as_deref(), Some("amd64"));

    // linux/arm64 of the same tag, through the Dockerfile frontend (its image config, and so
    // the result's platform, comes from the base).
    let (dir, output) = arm64_dockerfile(&idx.reference, &out_arm);
    let r =
        integration::buildkit_client::dockerfile_build(&env.berthd, dir.path(), &[], output).await;
    if let Err(e) = &r.solve {
        panic!("build failed: {e}\n{}", env.berthd.log_text());
    }
    let i = engine.inspect_image(&out_arm).await.unwrap();
    assert_eq!(i.architecture.as_deref(), Some("arm64"), "{i:?}");
    assert_eq!(i.os.as_deref(), Some("linux"));
    let layers = i.root_fs.and_then(|r| r.layers).unwrap_or_default();
    assert_eq!(layers.len(), 2, "{layers:?}");
    assert_eq!(layers[0], arm.diff_ids[0]);
    // The arm64 manifest joined the same index; the record still names the index.
    let inspect = engine.inspect_image(&idx.reference).await.unwrap();
    assert_eq!(inspect.id.as_deref(), Some(idx.digest.as_str()));
    let line = content_line(&env, &idx.digest);
    assert!(line.contains(&arm.manifest_digest), "{line}");
    assert!(line.contains(&amd.manifest_digest), "{line}");
    assert!(env.snapshots().contains(&arm.diff_ids[0]));
    for d in amd.layer_digests.iter().chain(&arm.layer_digests) {
        assert_eq!(
            blob_gets(&reg, d),
            1,
            "blob {d} fetched once\n{}",
            reg.log_tail()
        );
    }
    env.wait_for("the builds' leases to be deleted", || {
        env.leases().iter().all(|l| !l.starts_with("berth-"))
    });
    for name in [&out_amd, &out_arm, &idx.reference] {
        engine.remove_image(name).await.unwrap();
    }
}

/// `--export-cache type=registry,mode=max` of a build on a base image of this store: the base
/// layer's blob comes from containerd's content store (a gzip blob, as `docker import` stores
/// it), so the cache carries every layer; each exported layer blob decompresses to its diffID,
/// the base's among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_cache_export_reads_base_blobs_from_containerd() {
    use protos::moby::buildkit::v1 as control;
    use std::io::Read as _;

    let env = Env::start(true);
    let engine = env.dockerd.engine().clone();
    let bb = busybox_image(&engine).await.unwrap();
    let (bb_diff_ids, _) = layers_of(&env, bb.id());
    let reg = Registry::start().unwrap();
    let cache_ref = format!(
        "{}/{}:cache",
        reg.addr(),
        unique_name("berth-test/ctrd-cache")
    );
    let st = sh(
        &llb::image(bb.reference()).state(),
        &format!("echo {} > /out", unique_name("c")),
    );
    let r = env
        .client()
        .await
        .build(BuildOptions {
            definition: Some(st.marshal().unwrap()),
            cache_exports: vec![control::CacheOptionsEntry {
                r#type: "registry".into(),
                attrs: [("ref", cache_ref.as_str()), ("mode", "max")]
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    if let Err(e) = &r.solve {
        panic!("build failed: {e}\n{}", env.berthd.log_text());
    }

    // The cache's index lists the layer blobs; each decompresses to a diffID.
    let rc = registry::Registry::new(registry::Hosts::new(Default::default()));
    let session = rc.session(std::sync::Arc::new(registry::Anonymous));
    let reference = registry::Reference::parse(&cache_ref).unwrap();
    let index = session.resolve(&reference).await.unwrap();
    let index: serde_json::Value = serde_json::from_slice(&index.bytes).unwrap();
    let mut diff_ids = Vec::new();
    for m in index["manifests"].as_array().unwrap() {
        let media_type = m["mediaType"].as_str().unwrap();
        let Some(compression) = registry::Compression::from_media_type(media_type) else {
            continue;
        };
        let desc: registry::Descriptor = serde_json::from_value(m.clone()).unwrap();
        let mut s = session
            .open_blob(&[], &reference, &desc, None)
            .await
            .unwrap();
        let mut blob = Vec::new();
        while let Some(c) = s.next_chunk().await.unwrap() {
            blob.extend_from_slice(&c);
        }
        let tar = match compression {
            registry::Compression::Gzip => {
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(&blob[..])
                    .read_to_end(&mut out)
                    .unwrap();
                out
            }
            registry::Compression::Uncompressed => blob,
            other => panic!("unexpected {other:?} layer in the cache (default is gzip)"),
        };
        diff_ids.push(sha256_hex(&tar));
    }
    assert_eq!(diff_ids.len(), 2, "{index}");
    assert!(
        diff_ids.contains(&bb_diff_ids[0]),
        "{diff_ids:?} lacks the base {bb_diff_ids:?}"
    );
    drop(bb);
}
