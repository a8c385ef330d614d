//! `docker buildx` (Debian 13's 0.13.1, unpacked by `.ci/trixie-packages.sh`) with a `remote`
//! builder on a berthd under test.

use std::path::Path;
use std::process::Command;

/// A buildx `remote` builder on the berthd listening on `socket`, removed on drop.
pub struct BuildxBuilder(String);

impl BuildxBuilder {
    /// Checks that `docker buildx` is 0.13.1, then creates a builder named after `prefix`.
    pub fn create(prefix: &str, socket: &Path) -> Self {
        let version = Command::new("docker")
            .args(["buildx", "version"])
            .output()
            .expect("run docker buildx version");
        assert!(
            String::from_utf8_lossy(&version.stdout).contains(" 0.13.1"),
            "docker buildx 0.13.1 is required (bash .ci/trixie-packages.sh installs it)"
        );
        let name = crate::unique_name(prefix);
        let created = Command::new("docker")
            .args(["buildx", "create", "--name", &name, "--driver", "remote"])
            .arg(format!("unix://{}", socket.display()))
            .output()
            .expect("run docker buildx create");
        assert!(
            created.status.success(),
            "buildx create: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        BuildxBuilder(name)
    }

    /// The builder's name (`--builder`).
    pub fn name(&self) -> &str {
        &self.0
    }
}

impl Drop for BuildxBuilder {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["buildx", "rm", &self.0])
            .output();
    }
}
