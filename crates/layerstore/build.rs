//! Builds berth's pin process (`pause/berth-pause.rs`, see its docs) for the target, into
//! `$OUT_DIR/berth-pause`; `dockerstore::pin` embeds it with `include_bytes!`.
//!
//! A separate `rustc` call because the program is `#![no_std]` with its own entry point and link
//! line (no C runtime, static, no build ID), which a Cargo target of this workspace cannot have.
//! It needs what building berth needs anyway: rustc and the target's linker driver (`cc`, or
//! the linker Cargo was configured with, which Cargo passes as `RUSTC_LINKER`).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=pause/berth-pause.rs");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("berth-pause");
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let target = std::env::var("TARGET").expect("TARGET");
    let mut cmd = Command::new(rustc);
    cmd.args([
        "--edition",
        "2021",
        "--crate-type",
        "bin",
        "--crate-name",
        "berth_pause",
    ])
    .args(["--target", &target])
    .args([
        "-C",
        "panic=abort",
        "-C",
        "opt-level=s",
        "-C",
        "strip=symbols",
    ])
    .args([
        "-C",
        "relocation-model=static",
        "-C",
        "target-feature=+crt-static",
    ])
    .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib"])
    .args([
        "-C",
        "link-arg=-static",
        "-C",
        "link-arg=-Wl,--build-id=none",
    ]);
    if let Ok(linker) = std::env::var("RUSTC_LINKER") {
        cmd.arg("-C").arg(format!("linker={linker}"));
    }
    cmd.arg("-o").arg(&out).arg("pause/berth-pause.rs");
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("run rustc for the pin process: {e}"));
    assert!(
        status.success(),
        "building the pin process (pause/berth-pause.rs) failed: {status}"
    );
    let len = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    assert!(len > 0, "the pin process {} is empty", out.display());
}
