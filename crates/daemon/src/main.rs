//! berthd: BuildKit-compatible build daemon.
fn main() {}
