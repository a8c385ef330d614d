//! Records the git revision for `buildctl --version`.
include!("../../tools/git-revision.rs");

fn main() {
    record_git_revision();
}
