//! The Kubernetes manifest in `deploy/kubernetes/` checked offline with `kubernetes-validate`
//! (PyPI; it ships the Kubernetes JSON schemas, so no cluster and no network are needed),
//! strictly (unknown fields are errors), and for the mounts `deploy/README.md` says berthd needs.
//! A copy with a misspelt field must fail, so the linter is known to be checking.
//!
//! `.ci/run` installs the linter into `/var/cache/berth/venv`; `BERTH_KUBERNETES_VALIDATE` may
//! name another copy. A missing linter fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ has a parent")
        .to_path_buf()
}

fn linter() -> PathBuf {
    if let Some(p) = std::env::var_os("BERTH_KUBERNETES_VALIDATE") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from("/var/cache/berth/venv/bin/kubernetes-validate");
    if venv.exists() {
        return venv;
    }
    panic!(
        "kubernetes-validate not found at {} (.ci/run installs it: python3 -m venv \
         /var/cache/berth/venv && /var/cache/berth/venv/bin/pip install kubernetes-validate)",
        venv.display()
    );
}

fn validate(file: &Path) -> (bool, String) {
    let out = Command::new(linter())
        .arg("--strict")
        .arg(file)
        .output()
        .expect("run kubernetes-validate");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn daemonset_manifest_validates_and_mounts_what_berthd_needs() {
    let manifest = workspace_root().join("deploy/kubernetes/berthd-daemonset.yaml");
    let (ok, text) = validate(&manifest);
    assert!(ok, "{} does not validate:\n{text}", manifest.display());
    for kind in [
        "namespace/berth",
        "configmap/berthd-config",
        "daemonset/berthd",
    ] {
        assert!(
            text.contains(&format!("passed for resource {kind}")),
            "{kind} not validated:\n{text}"
        );
    }

    let yaml = std::fs::read_to_string(&manifest).unwrap();
    for needed in [
        "path: /var/run/docker.sock",
        "type: Socket",
        "mountPath: /var/lib/docker\n",
        "mountPropagation: HostToContainer",
        "mountPath: /var/lib/berth",
        "privileged: true",
        "command: [\"buildctl\", \"debug\", \"workers\"]",
        "mountPath: /etc/buildkit/buildkitd.toml",
    ] {
        assert!(yaml.contains(needed), "manifest lacks {needed:?}");
    }

    // The linter rejects a misspelt field in strict mode.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        yaml.replacen("mountPropagation:", "mountPropagaton:", 1),
    )
    .unwrap();
    let (ok, text) = validate(&broken);
    assert!(!ok, "a misspelt field passed validation:\n{text}");
}
