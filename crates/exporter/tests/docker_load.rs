//! Thin load against the machine's real Docker Engine (classic store): only missing layers travel,
//! the image runs at once, tags come through the API, and a wrong presence hint is recovered.
//! Needs root and a Docker Engine on /var/run/docker.sock (or DOCKER_HOST).

use std::io::Write;
use std::process::Command;
use std::sync::Arc;

use exporter::image::{build_config, ConfigInput, LayerInfo, Platform};
use exporter::{DockerEngine, ExportLayer, LayerSource};
use sha2::{Digest, Sha256};

struct MemLayer(Vec<u8>);
impl LayerSource for MemLayer {
    fn write_tar(&self, out: &mut dyn Write) -> std::io::Result<()> {
        out.write_all(&self.0)
    }
}

fn tar_of(files: &[(&str, &[u8], u32)], symlinks: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_mtime(1);
        b.append_data(&mut h, path, *data).unwrap();
    }
    for (path, target) in symlinks {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, path, target).unwrap();
    }
    b.into_inner().unwrap()
}

fn export_layer(bytes: Vec<u8>, with_source: bool) -> ExportLayer {
    ExportLayer {
        diff_id: format!("sha256:{}", hex::encode(Sha256::digest(&bytes))),
        size: bytes.len() as u64,
        source: with_source.then(|| Arc::new(MemLayer(bytes)) as Arc<dyn LayerSource>),
    }
}

fn config_for(layers: &[ExportLayer], cmd: &str) -> exporter::image::ImageConfig {
    let infos: Vec<LayerInfo> = layers
        .iter()
        .map(|l| LayerInfo {
            diff_id: l.diff_id.clone(),
            description: "test".into(),
            created: None,
        })
        .collect();
    let base = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["/bin/sh","-c","{cmd}"]}}}}"#
    );
    build_config(&ConfigInput {
        base: Some(base.as_bytes()),
        layers: &infos,
        epoch: None,
        platform: &Platform::native(),
        now: chrono::Utc::now(),
    })
    .unwrap()
}

fn docker(args: &[&str]) -> (bool, String) {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI must be installed");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

struct Cleanup(Vec<String>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        for id in &self.0 {
            let _ = Command::new("docker").args(["rmi", "-f", id]).output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thin_load_sends_only_missing_layers_and_image_runs() {
    let client = bollard::Docker::connect_with_local_defaults().expect("docker socket");
    let engine = DockerEngine::new(client, None);
    let unique = format!("{}-{}", std::process::id(), rand_suffix());
    let busybox =
        std::fs::read("/bin/busybox").expect("busybox-static must be installed (/bin/busybox)");

    // Base: busybox, loaded in full once (as if it were already in Docker).
    let base = export_layer(
        tar_of(
            &[("bin/busybox", &busybox, 0o755)],
            &[("bin/sh", "busybox"), ("bin/cat", "busybox")],
        ),
        true,
    );
    let base_cfg = config_for(std::slice::from_ref(&base), "true");
    let mut cleanup = Cleanup(vec![]);
    let r = engine
        .load_thin(&base_cfg, std::slice::from_ref(&base), &[false])
        .await
        .unwrap();
    cleanup.0.push(base_cfg.digest.clone());
    assert_eq!(r.sent.layers_sent, vec![base.diff_id.clone()]);

    // New image on top: the base layer has NO source; only the new layer may travel.
    let marker = format!("made by berth {unique}\n");
    let top = export_layer(
        tar_of(&[("etc/marker", marker.as_bytes(), 0o644)], &[]),
        true,
    );
    let layers = vec![
        ExportLayer {
            source: None,
            ..base.clone()
        },
        top.clone(),
    ];
    let cfg = config_for(&layers, "cat /etc/marker");
    let r = engine
        .load_thin(&cfg, &layers, &[true, false])
        .await
        .unwrap();
    cleanup.0.push(cfg.digest.clone());
    assert_eq!(r.image_id, cfg.digest);
    assert_eq!(
        r.sent.layers_sent,
        vec![top.diff_id.clone()],
        "only the new layer travels"
    );
    assert_eq!(r.sent.layer_bytes_sent, top.size);
    assert_eq!((r.layers_skipped, r.bytes_skipped), (1, base.size));
    assert!(
        r.sent.archive_bytes < base.size,
        "archive must not carry the base"
    );

    // Tag through the API and run at once.
    let name = format!("berth-test/exporter:{unique}");
    engine
        .tag(&cfg.digest, std::slice::from_ref(&name))
        .await
        .unwrap();
    cleanup.0.push(name.clone());
    let (ok, out) = docker(&["run", "--rm", "--network", "none", &name]);
    assert!(ok, "docker run failed: {out}");
    assert_eq!(out, marker);

    // `docker image inspect` reports our diffIDs in order.
    let (ok, out) = docker(&["image", "inspect", "-f", "{{json .RootFS.Layers}}", &name]);
    assert!(ok, "{out}");
    let got: Vec<String> = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(got, vec![base.diff_id.clone(), top.diff_id.clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_presence_hint_is_retried_with_the_layer() {
    let client = bollard::Docker::connect_with_local_defaults().expect("docker socket");
    let engine = DockerEngine::new(client, None);
    let unique = format!("{}-{}", std::process::id(), rand_suffix());
    let data = format!("never loaded before {unique}");
    let l = export_layer(tar_of(&[("f", data.as_bytes(), 0o644)], &[]), true);
    let cfg = config_for(std::slice::from_ref(&l), "true");
    let _cleanup = Cleanup(vec![cfg.digest.clone()]);
    // Claim Docker has it: the first load fails on the missing tar, the retry carries it.
    let r = engine
        .load_thin(&cfg, std::slice::from_ref(&l), &[true])
        .await
        .unwrap();
    assert_eq!(r.attempts, 2);
    assert_eq!(r.sent.layers_sent, vec![l.diff_id.clone()]);
    let (ok, out) = docker(&["image", "inspect", &cfg.digest]);
    assert!(ok, "{out}");

    // A layer Docker lacks and berth has no copy of: a clear error naming the load.
    let orphan = export_layer(
        tar_of(&[("g", format!("orphan {unique}").as_bytes(), 0o644)], &[]),
        false,
    );
    let cfg2 = config_for(std::slice::from_ref(&orphan), "true");
    let err = engine
        .load_thin(&cfg2, std::slice::from_ref(&orphan), &[true])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("docker load"), "{err}");
    let (ok, _) = docker(&["image", "inspect", &cfg2.digest]);
    assert!(!ok, "no image may be left behind by a failed load");
}

fn rand_suffix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:x}", t & 0xffff_ffff)
}
