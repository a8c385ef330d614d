//! berth-bench (in progress).
fn main() {}
