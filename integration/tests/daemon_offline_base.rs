//! Builds FROM a base image of a **stopped** dockerd, through berthd bound to its data root
//! (`--docker-data-root`, the Docker socket dead): the base is resolved from the data root alone
//! (by tag, by full ID, by a short ID prefix; ResolveImageConfig too), used in place, and the
//! result is written into the same data root with `--output type=image`. After dockerd starts
//! again the new images run with the base's files and the build's, and the base layers were not
//! written a second time (no new overlay2 dirs or layerdb entries for them). Resolution alone
//! leaves the data root byte-for-byte unchanged; a missing image and `resolvemode=pull` (pulled by berth into
//! the data root; Docker Hub is unreachable here) fail
//! with clear errors. Needs root, runc, overlayfs, dockerd and containerd.

mod export_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use export_support::{docker, export_image, offline_leftovers, response};
use integration::buildkit_client::{new_id, with_build_id, Attachables, Berthd, BuildkitClient};
use integration::{
    multi_layer_image, require_root, unique_name, PrivateDockerd, MULTI_LAYER_ABSENT,
    MULTI_LAYER_FILES,
};
use llb::RunOpts;
use prost::Message;
use protos::moby::buildkit::v1 as control;
use protos::moby::buildkit::v1::frontend as gw;
use sha2::Digest as _;

/// Every file under `dir` (recursively) with the sha256 of its contents; dirs and other files
/// by type. Symlinks are not followed.
fn tree(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let md = p.symlink_metadata().unwrap();
            if md.is_dir() {
                out.insert(rel, "dir".into());
                walk(root, &p, out);
            } else if md.is_file() {
                out.insert(
                    rel,
                    hex::encode(sha2::Sha256::digest(std::fs::read(&p).unwrap())),
                );
            } else {
                out.insert(rel, format!("{:?}", md.file_type()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// What resolution must never change: the image metadata (`repositories.json`, imagedb,
/// layerdb) and the list of overlay2 dirs.
fn store_state(root: &Path) -> (BTreeMap<String, String>, BTreeSet<String>) {
    (tree(&root.join("image/overlay2")), overlay_dirs(root))
}

fn overlay_dirs(root: &Path) -> BTreeSet<String> {
    std::fs::read_dir(root.join("overlay2"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "l")
        .collect()
}

fn layerdb_entries(root: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(root.join("image/overlay2/layerdb/sha256"))
        .unwrap()
        .flatten()
        .map(|e| {
            let cache = std::fs::read_to_string(e.path().join("cache-id")).unwrap();
            (format!("sha256:{}", e.file_name().to_string_lossy()), cache)
        })
        .collect()
}

fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let d: Vec<layerstore::Digest> = diff_ids.iter().map(|s| s.parse().unwrap()).collect();
    layerstore::tar::chain_ids(&d)
        .iter()
        .map(|c| c.to_string())
        .collect()
}

fn rootfs_layers(host: &str, image: &str) -> Vec<String> {
    let out = docker(
        Some(host),
        &[
            "image",
            "inspect",
            "--format",
            "{{json .RootFS.Layers}}",
            image,
        ],
    );
    serde_json::from_str(out.trim()).unwrap()
}

/// `def` with every `docker-image://<from>` source renamed to `docker-image://<to>` (op digests
/// and references recomputed): LLB naming an image by ID, which the llb crate's normalising
/// `image()` cannot express.
fn rename_image(def: &protos::pb::Definition, from: &str, to: &str) -> protos::pb::Definition {
    let digest = |b: &[u8]| format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)));
    let mut renamed: BTreeMap<String, String> = BTreeMap::new();
    let mut out = protos::pb::Definition {
        source: def.source.clone(),
        ..Default::default()
    };
    for bytes in &def.def {
        let mut op = protos::pb::Op::decode(bytes.as_ref()).unwrap();
        for i in &mut op.inputs {
            if let Some(n) = renamed.get(&i.digest) {
                i.digest = n.clone();
            }
        }
        if let Some(protos::pb::op::Op::Source(s)) = &mut op.op {
            if s.identifier == format!("docker-image://{from}") {
                s.identifier = format!("docker-image://{to}");
            }
        }
        let new = op.encode_to_vec();
        let (old_d, new_d) = (digest(bytes), digest(&new));
        if let Some(m) = def.metadata.get(&old_d) {
            out.metadata.insert(new_d.clone(), m.clone());
        }
        renamed.insert(old_d, new_d);
        out.def.push(new.into());
    }
    out
}

/// The base's files, the build's files, and the base's deletions still in effect.
fn check_runs(host: &str, image: &str, marker: &str) {
    let mut script = String::new();
    for (path, _) in MULTI_LAYER_FILES {
        script.push_str(&format!("cat {path}; "));
    }
    script.push_str("cat /ran /copied /added; ");
    for path in MULTI_LAYER_ABSENT {
        script.push_str(&format!("test ! -e {path} && echo absent; "));
    }
    let out = docker(
        Some(host),
        &[
            "run",
            "--rm",
            "--network",
            "none",
            image,
            "/bin/busybox",
            "sh",
            "-c",
            &script,
        ],
    );
    let mut want: String = MULTI_LAYER_FILES.iter().map(|(_, c)| *c).collect();
    want.push_str(&format!("ran {marker}\nlayer3-a\nadded {marker}"));
    want.push_str(&"absent\n".repeat(MULTI_LAYER_ABSENT.len()));
    assert_eq!(out, want, "{image}");
}

/// LLB: the base, an exec, a file op.
fn build_def(base_ref: &str, marker: &str) -> protos::pb::Definition {
    llb::State::from(llb::image(base_ref))
        .run(RunOpts::shell(format!(
            "echo 'ran {marker}' > /ran && cat /data/keep/a.txt > /copied"
        )))
        .root()
        .file(llb::mkfile(
            "/added",
            0o644,
            format!("added {marker}"),
            Default::default(),
        ))
        .marshal()
        .unwrap()
}

/// ResolveImageConfig through the gateway of a build with no definition.
async fn resolve_config(
    client: &BuildkitClient,
    reference: &str,
) -> Result<gw::ResolveImageConfigResponse, tonic::Status> {
    let mut session = client.open_session(Attachables::default()).await.unwrap();
    let build_ref = new_id();
    let (mut ctl, sid, br) = (client.control(), session.id.clone(), build_ref.clone());
    let solve = tokio::spawn(async move {
        ctl.solve(control::SolveRequest {
            r#ref: br,
            session: sid,
            ..Default::default()
        })
        .await
    });
    let mut g = client.gateway();
    let r = g
        .resolve_image_config(with_build_id(
            gw::ResolveImageConfigRequest {
                r#ref: reference.to_string(),
                ..Default::default()
            },
            &build_ref,
        ))
        .await
        .map(|r| r.into_inner());
    g.r#return(with_build_id(gw::ReturnRequest::default(), &build_ref))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), solve)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    session.close(Duration::from_secs(5)).await;
    r
}

async fn build_error(berthd: &Berthd, def: &protos::pb::Definition) -> String {
    let client = berthd.client().await.unwrap();
    let r = export_image(&client, def, &[], &[]).await.unwrap();
    match r.solve {
        Ok(_) => panic!("build succeeded"),
        Err(e) => e.message().to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_from_a_stopped_daemons_base_in_place() {
    require_root();
    let mut dockerd = PrivateDockerd::new(Default::default()).unwrap();
    let host = dockerd.engine().host();
    let base = multi_layer_image(dockerd.engine()).await.unwrap();
    // A short Docker Hub style name too (`offbase-…:v1` is `docker.io/library/offbase-…:v1`).
    let short = base
        .tag_as(&format!("{}:v1", unique_name("offbase")))
        .await
        .unwrap();
    let base_id = base.id().to_string();
    let base_layers = rootfs_layers(&host, base.reference());
    let base_chain = chain_ids(&base_layers);
    assert_eq!(base_layers.len(), 3);
    let root = dockerd.data_root();
    dockerd.stop().unwrap();
    let layerdb_before = layerdb_entries(&root);
    let before = store_state(&root);
    for c in &base_chain {
        assert!(layerdb_before.contains_key(c), "{c}");
    }

    let berthd = Berthd::start(&[
        "--docker-host",
        &host,
        "--docker-data-root",
        &root.display().to_string(),
    ])
    .unwrap();
    let client = berthd.client().await.unwrap();

    // ResolveImageConfig offline: the imagedb config, by name, full ID and short ID.
    let config_path = root
        .join("image/overlay2/imagedb/content/sha256")
        .join(base_id.trim_start_matches("sha256:"));
    let config = std::fs::read(&config_path).unwrap();
    for r in [
        base.reference(),
        short.reference(),
        &base_id,
        &base_id["sha256:".len().."sha256:".len() + 12],
    ] {
        let got = resolve_config(&client, r)
            .await
            .unwrap_or_else(|e| panic!("ResolveImageConfig {r}: {e:?}\n{}", berthd.log_text()));
        assert_eq!(got.config.as_ref(), config.as_slice(), "{r}");
        // `docker import`/`load` records no repository digest: the image ID is reported.
        assert_eq!(got.digest, base_id, "{r}");
    }
    let missing = resolve_config(&client, "berth-test/not-here:nope")
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    assert!(
        missing.message().contains("stopped Docker data root"),
        "{missing:?}"
    );

    // A build that only resolves and runs (no export) leaves the data root as it was.
    let marker = unique_name("m");
    let def_tag = build_def(short.reference(), &marker);
    export_support::solve_only(&client, &def_tag).await;
    assert_eq!(
        store_state(&root),
        before,
        "resolution changed the data root"
    );

    // Missing image and resolvemode=pull: clear errors, nothing written.
    let err = build_error(
        &berthd,
        &llb::State::from(llb::image("berth-test/not-here:nope"))
            .marshal()
            .unwrap(),
    )
    .await;
    // (berth pulls missing images into the stopped data root itself; Docker Hub is not
    // reachable here, so the pull fails naming the registry.)
    assert!(
        err.contains("docker.io/berth-test/not-here:nope")
            && err.contains(&format!("stopped Docker data root {}", root.display()))
            && err.contains("unreachable"),
        "{err}"
    );
    let err = build_error(
        &berthd,
        &llb::image(short.reference())
            .resolve_mode("pull")
            .state()
            .marshal()
            .unwrap(),
    )
    .await;
    assert!(
        err.contains("image.resolvemode=pull") && err.contains("unreachable"),
        "{err}"
    );
    assert_eq!(
        store_state(&root),
        before,
        "failed resolutions changed the data root"
    );

    // Export by tag, and by ID (another marker, so other new layers).
    let out_tag = format!("{}:tag", unique_name("berth-test/offline-base"));
    let r = export_image(&client, &def_tag, std::slice::from_ref(&out_tag), &[])
        .await
        .unwrap();
    response(&r, &berthd.log_text());
    let marker_id = unique_name("m");
    let normalized = llb_reference(short.reference());
    let def_id = rename_image(
        &build_def(short.reference(), &marker_id),
        &normalized,
        &base_id,
    );
    let out_id = format!("{}:id", unique_name("berth-test/offline-base"));
    let r = export_image(&client, &def_id, std::slice::from_ref(&out_id), &[])
        .await
        .unwrap();
    response(&r, &berthd.log_text());

    // Base layers kept as they were, every new dir is a new layerdb entry (nothing orphaned).
    let layerdb_after = layerdb_entries(&root);
    for c in &base_chain {
        assert_eq!(
            layerdb_after.get(c),
            layerdb_before.get(c),
            "base layer {c} changed"
        );
    }
    let new_entries: BTreeSet<_> = layerdb_after
        .keys()
        .filter(|k| !layerdb_before.contains_key(*k))
        .cloned()
        .collect();
    let new_dirs: BTreeSet<_> = overlay_dirs(&root).difference(&before.1).cloned().collect();
    let new_caches: BTreeSet<_> = new_entries
        .iter()
        .map(|c| layerdb_after[c].clone())
        .collect();
    assert_eq!(new_dirs, new_caches, "overlay2 dirs vs new layerdb entries");
    assert!(
        offline_leftovers(&root).is_empty(),
        "{:?}",
        offline_leftovers(&root)
    );
    drop(berthd);

    dockerd.start().unwrap();
    let mut built_chains = BTreeSet::new();
    for (image, marker) in [(&out_tag, &marker), (&out_id, &marker_id)] {
        let layers = rootfs_layers(&host, image);
        assert_eq!(layers[..3], base_layers[..], "{image}: base layers");
        assert_eq!(layers.len(), 5, "{image}: base + exec + file");
        let chain = chain_ids(&layers);
        assert_eq!(chain[..3], base_chain[..]);
        built_chains.extend(chain[3..].iter().cloned());
        check_runs(&host, image, marker);
    }
    // Exactly the two new layers of each build were written; none of the base's.
    assert_eq!(new_entries, built_chains, "new layerdb entries");
    eprintln!(
        "base layers {}, new layerdb entries {}, new overlay2 dirs {}",
        base_chain.len(),
        new_entries.len(),
        new_dirs.len()
    );
}

/// The reference as the llb crate writes it into the source op (`docker.io/library/x:tag`).
fn llb_reference(r: &str) -> String {
    let def = llb::image(r).state().marshal().unwrap();
    for b in &def.def {
        let op = protos::pb::Op::decode(b.as_ref()).unwrap();
        if let Some(protos::pb::op::Op::Source(s)) = op.op {
            return s.identifier["docker-image://".len()..].to_string();
        }
    }
    panic!("no source op")
}
