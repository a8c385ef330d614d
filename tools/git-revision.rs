// Shared by the build scripts of `daemon` and `buildctl` (`include!`d: a build script cannot
// depend on a workspace crate without building it for the host first, which this is too small
// to justify).

/// Runs `git ARGS` and returns its trimmed stdout, if it succeeded.
fn git(args: &[&str]) -> Option<String> {
    std::process::Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Sets `BERTH_GIT_REV` (12 hex digits of HEAD, or `unknown`) and reruns the build script when
/// HEAD moves.
fn record_git_revision() {
    let rev = git(&["rev-parse", "--short=12", "HEAD"])
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=BERTH_GIT_REV={rev}");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../../tools/git-revision.rs");
    // Where git keeps them (in a worktree `.git` is a file; naming a path that does not exist
    // would rerun this script, and relink the binary, on every build): HEAD, and the ref of the
    // branch it names (not every branch's: other worktrees commit).
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
