//! The one worker berthd reports (`ListWorkers`, `Ping.Workers`), with its persisted id.

use crate::cli::{PACKAGE, REVISION, VERSION};
use crate::config::Config;
use crate::errors::Result;
use crate::filters::{Adaptor, Filters};
use protos::moby::buildkit::v1::types::{BuildkitVersion, GcPolicy, WorkerRecord};
use protos::pb::Platform;
use rand::Rng;
use std::path::Path;

/// Label prefix for well-known worker labels.
pub const LABEL_PREFIX: &str = "org.mobyproject.buildkit.worker.";
/// berth's snapshotter name (layers on overlayfs next to Docker's own store).
pub const SNAPSHOTTER: &str = "berth-docker";

/// Reads the worker id from `<root>/workerid`, creating it (25 random base36 chars) on first use.
pub fn load_or_create_id(root: &Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let p = root.join("workerid");
    match std::fs::read_to_string(&p) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("read {}", p.display())),
    }
    let id = new_id();
    let tmp = root.join(".workerid.tmp");
    std::fs::write(&tmp, &id).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &p).with_context(|| format!("rename to {}", p.display()))?;
    Ok(id)
}

/// A 25-character base36 random id (like BuildKit's `identity.NewID`).
pub fn new_id() -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::thread_rng();
    (0..25)
        .map(|_| ALPHABET[rng.gen_range(0..36)] as char)
        .collect()
}

/// The native platform in GOARCH naming.
pub fn native_platform() -> Platform {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    Platform {
        architecture: arch.to_string(),
        os: "linux".to_string(),
        variant: if arch == "arm64" {
            "v8".into()
        } else {
            String::new()
        },
        ..Default::default()
    }
}

fn parse_platform(s: &str) -> Option<Platform> {
    let parts: Vec<&str> = s.split('/').collect();
    match parts.as_slice() {
        [os, arch] => Some(Platform {
            os: os.to_string(),
            architecture: arch.to_string(),
            ..Default::default()
        }),
        [os, arch, variant] => Some(Platform {
            os: os.to_string(),
            architecture: arch.to_string(),
            variant: variant.to_string(),
            ..Default::default()
        }),
        _ => None,
    }
}

/// Builds the worker record.
pub fn record(cfg: &Config, id: &str) -> WorkerRecord {
    let mut labels = cfg.worker_labels.clone();
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    for (k, v) in [
        ("executor", "oci".to_string()),
        ("snapshotter", SNAPSHOTTER.to_string()),
        ("hostname", hostname),
        ("network", "host".to_string()),
        ("oci.process-mode", "sandbox".to_string()),
        ("selinux.enabled", "false".to_string()),
    ] {
        labels.entry(format!("{LABEL_PREFIX}{k}")).or_insert(v);
    }
    let native = native_platform();
    let mut platforms = vec![native.clone()];
    for p in &cfg.platforms {
        if let Some(p) = parse_platform(p) {
            if p != native && !platforms.contains(&p) {
                platforms.push(p);
            }
        }
    }
    let gc_policy = cfg
        .gc_policy
        .iter()
        .map(|g| GcPolicy {
            all: g.all,
            keep_duration: g.keep_duration.saturating_mul(1_000_000_000),
            reserved_space: g.keep_bytes,
            filters: g.filters.clone(),
            ..Default::default()
        })
        .collect();
    WorkerRecord {
        id: id.to_string(),
        labels,
        platforms,
        gc_policy,
        buildkit_version: Some(version()),
        ..Default::default()
    }
}

/// berth's version record.
pub fn version() -> BuildkitVersion {
    BuildkitVersion {
        package: PACKAGE.to_string(),
        version: VERSION.to_string(),
        revision: REVISION.to_string(),
        ..Default::default()
    }
}

struct WorkerAdaptor<'a>(&'a WorkerRecord);

impl Adaptor for WorkerAdaptor<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        match path.first().map(String::as_str) {
            Some("id") if path.len() == 1 => Some(self.0.id.clone()),
            Some("labels") if path.len() > 1 => self.0.labels.get(&path[1..].join(".")).cloned(),
            _ => None,
        }
    }
}

/// The workers matching `filters`.
pub fn list(rec: &WorkerRecord, filters: &[String]) -> Result<Vec<WorkerRecord>> {
    let f = Filters::parse(filters)?;
    Ok(if f.matches(&WorkerAdaptor(rec)) {
        vec![rec.clone()]
    } else {
        vec![]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_persists_and_has_buildkit_shape() {
        let d = tempfile::tempdir().unwrap();
        let a = load_or_create_id(d.path()).unwrap();
        assert_eq!(a.len(), 25);
        assert!(a
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()));
        assert_eq!(load_or_create_id(d.path()).unwrap(), a);
    }

    #[test]
    fn record_and_filters() {
        let cfg = crate::config::tests_support::config();
        let r = record(&cfg, "w1");
        assert_eq!(r.labels[&format!("{LABEL_PREFIX}executor")], "oci");
        assert_eq!(r.labels["custom"], "yes");
        assert_eq!(r.platforms[0], native_platform());
        let cases: &[(&[&str], usize)] = &[
            (&[], 1),
            (&["id==w1"], 1),
            (&["id==w2"], 0),
            (
                &[r#"labels."org.mobyproject.buildkit.worker.executor"==oci"#],
                1,
            ),
            (&["labels.custom==no"], 0),
        ];
        for (f, n) in cases {
            let f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
            assert_eq!(list(&r, &f).unwrap().len(), *n, "{f:?}");
        }
    }
}
