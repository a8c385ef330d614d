//! berth's BuildKit client, behind the `buildctl` binary shipped next to `buildkitd` (berthd) in
//! the berth image, and used by `make image` to build that image through berthd.
//!
//! Tools exec `buildctl` inside a buildkitd container and expect stock behaviour: docker buildx's
//! `docker-container://` connection helper and envd's `docker-container` builder run
//! `docker exec -i <container> buildctl dial-stdio` and speak gRPC over the pipe; buildx's
//! docker-container driver polls `buildctl debug workers` until it succeeds. The binary keeps
//! stock buildctl v0.11.6's global flags (`--addr`, `BUILDKIT_HOST`, `--tls*`, `--timeout`), its
//! command names and its output formats for those commands, and adds a `build` that sends LLB
//! from stdin with `--local` directories to outputs the daemon keeps.
//!
//! Modules: [`connect`] (addresses, TLS, gRPC channels), [`dialstdio`], [`debug`] (`workers`,
//! `info`), [`solve`] (a build with plain progress), [`session`] (the client side of a BuildKit
//! session: FileSync for `--local`), [`progress`] (plain progress lines), and Go's tabwriter
//! layout for the tables.
#![forbid(unsafe_code)]

pub mod connect;
pub mod debug;
pub mod dialstdio;
pub mod progress;
pub mod session;
pub mod solve;
mod tabwriter;

pub use connect::{Target, TlsFlags};
pub use solve::{solve, SolveOptions};
