//! Records the git revision for `berthd --version` and the worker's BuildkitVersion.
include!("../../tools/git-revision.rs");

fn main() {
    record_git_revision();
}
