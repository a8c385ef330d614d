//! Test certificates made with `deploy/tls/make-certs.sh` (the script deploy/README.md documents),
//! so tests exercise the same files users make: `DIR/{server,client}/{ca,cert,key}.pem`.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context as _, Result};

/// Runs `deploy/tls/make-certs.sh DIR NAMES…` (needs the openssl CLI).
pub fn make_certs(dir: &Path, names: &[&str]) -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .join("deploy/tls/make-certs.sh");
    let out = Command::new("sh")
        .arg(&script)
        .arg(dir)
        .args(names)
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "make-certs.sh failed (needs the openssl CLI; apt-get install openssl): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
