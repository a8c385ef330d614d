//! berthd as a library: every part of the daemon, wired together by `main.rs`.
//!
//! | module | owns |
//! |---|---|
//! | [`attestations`] | Attestations of a build result (gateway `Result.attestations`). |
//! | [`buildinfo`] | `containerimage.buildinfo` in the Solve response. |
//! | [`caps`] | Capabilities advertised by `LLBBridge.Ping`. |
//! | [`cli`] | Command line. |
//! | [`config`] | `buildkitd.toml` and flags. |
//! | [`control`] | The Control service. |
//! | [`docker`] | The Docker Engine client. |
//! | [`errors`] | Errors and their gRPC codes. |
//! | [`export_client`] | Exporters streaming to the client. |
//! | [`filters`] | containerd-style filters. |
//! | [`frontends`] | Frontends run in berthd (`dockerfile.v0`) and the dispatch by name. |
//! | [`fsread`] | Gateway file reads. |
//! | [`gateway`] | The LLBBridge service. |
//! | [`history`] | Build history records. |
//! | [`jobs`] | Jobs by build ref. |
//! | [`listener`] | Listening sockets. |
//! | [`observe`] | Build metrics and the debug state (`telemetry`'s daemon side). |
//! | [`progress`] | Progress and the Status stream. |
//! | [`sbom`] | SBOM scanning of a result (`attest:sbom`). |
//! | [`session`] | Client sessions. |
//! | [`solver`] | The solve backend. |
//! | [`workers`] | The worker record. |

#![forbid(unsafe_code)]

pub mod attestations;
pub mod buildinfo;
pub mod cache;
pub mod caps;
pub mod cli;
pub mod config;
pub mod containers;
pub mod control;
pub mod docker;
pub mod errors;
pub mod export_client;
pub mod export_image;
pub mod filters;
pub mod frontends;
pub mod fsread;
pub mod gateway;
pub mod history;
pub mod jobs;
pub mod listener;
pub mod observe;
pub mod progress;
pub mod provenance;
pub mod sbom;
pub mod session;
pub mod solver;
pub mod workers;
