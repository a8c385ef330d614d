//! Prints the path of a protoc binary, for `PROTOC=$(cargo run -q -p vendored-protoc)`.
//!
//! `containerd-client`'s build script compiles containerd's `.proto` files with `protoc` (through
//! prost-build, which reads `$PROTOC` first and falls back to `protoc` on `PATH`). berth's own
//! protos are compiled with protox and need none. A fresh machine has no protoc, so the Makefile
//! points `PROTOC` at the binary Google publishes inside the `protoc-bin-vendored` crates on
//! crates.io: nothing but cargo is needed. This crate depends on nothing else, so it builds in
//! seconds before the rest of the workspace.

fn main() {
    match protoc_bin_vendored::protoc_bin_path() {
        Ok(p) => println!("{}", p.display()),
        Err(e) => {
            eprintln!("vendored-protoc: no vendored protoc for this platform: {e}");
            std::process::exit(1);
        }
    }
}
