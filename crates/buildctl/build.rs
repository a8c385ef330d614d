//! Records the git revision for `buildctl --version`.
fn main() {
    let rev = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=BERTH_GIT_REV={rev}");
    // Where git keeps them (in a worktree `.git` is a file; naming a path that does not exist
    // would rerun this script, and relink the binary, on every build).
    println!("cargo:rerun-if-changed=build.rs");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    // HEAD, and the ref of the branch it names (not every branch's: other worktrees commit).
    let branch = git(&["symbolic-ref", "-q", "HEAD"]).unwrap_or_default();
    for p in ["HEAD", branch.as_str(), "packed-refs"] {
        if p.is_empty() {
            continue;
        }
        let path = git(&["rev-parse", "--path-format=absolute", "--git-path", p])
            .filter(|s| std::path::Path::new(s).exists());
        if let Some(path) = path {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
