//! Preconditions that fail loudly: a test that needs root or a tool panics with a message saying
//! what is missing and how to get it, instead of being skipped.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Panics unless the process runs as root (effective uid 0).
///
/// Every end-to-end test needs root: it talks to dockerd, mounts overlayfs and runs runc.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "this test needs root (effective uid 0, found {}): run the tests as root, \
             e.g. with `bash .ci/run`",
            nix::unistd::geteuid()
        );
    }
}

/// Returns the path of the executable `tool`, or panics naming the Debian package to install.
///
/// `tool` is either an absolute path (checked as is) or a bare name looked up in `PATH` and then in
/// the usual sbin directories (which a non-login root shell may lack).
pub fn require_tool(tool: &str, debian_package: &str) -> PathBuf {
    match find_tool(tool) {
        Some(path) => path,
        None => panic!(
            "required tool `{tool}` not found or not executable: install it with \
             `apt-get install {debian_package}` (`.ci/run` does this)"
        ),
    }
}

/// Looks `tool` up like [`require_tool`] without panicking.
pub(crate) fn find_tool(tool: &str) -> Option<PathBuf> {
    if tool.contains('/') {
        let path = PathBuf::from(tool);
        return is_executable(&path).then_some(path);
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sh_and_rejects_missing() {
        assert!(find_tool("sh").is_some());
        assert!(find_tool("/bin/sh").is_some());
        assert!(find_tool("berth-no-such-tool-xyz").is_none());
        assert!(find_tool("/etc/passwd").is_none(), "not executable");
    }

    #[test]
    #[should_panic(expected = "apt-get install berth-pkg")]
    fn missing_tool_panics_with_package() {
        require_tool("berth-no-such-tool-xyz", "berth-pkg");
    }
}
