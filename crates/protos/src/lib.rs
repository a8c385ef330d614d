//! BuildKit-compatible wire types for berth.
//!
//! This crate owns the protobuf messages and gRPC services berth speaks: the
//! BuildKit control API, LLB, the frontend gateway, the session services a
//! client exposes (file sync, auth, secrets, ssh, health...) and the error
//! details BuildKit attaches to statuses. Nothing else lives here; domain crates
//! convert to their own types at the edge.
//!
//! # Where the definitions come from
//!
//! The `.proto` text under `crates/protos/proto/` is berth's own. It keeps
//! upstream's package, message, field, enum and service names and every field
//! number, so the bytes on the wire are the same as BuildKit's (checked against
//! `moby/buildkit` v0.11.6 and master, including fields only newer clients send).
//! gogoproto options are dropped; they never changed the wire format.
//!
//! | Rust module | proto package | upstream file |
//! |---|---|---|
//! | [`moby::buildkit::v1`] | `moby.buildkit.v1` | `api/services/control/control.proto` |
//! | [`moby::buildkit::v1::types`] | `moby.buildkit.v1.types` | `api/types/worker.proto` |
//! | [`moby::buildkit::v1::frontend`] | `moby.buildkit.v1.frontend` | `frontend/gateway/pb/gateway.proto` |
//! | [`moby::buildkit::v1::apicaps`] | `moby.buildkit.v1.apicaps` | `util/apicaps/pb/caps.proto` |
//! | [`moby::buildkit::v1::sourcepolicy`] | `moby.buildkit.v1.sourcepolicy` | `sourcepolicy/pb/policy.proto` |
//! | [`moby::buildkit::v1::sourcepolicy::policysession`] | `moby.buildkit.v1.sourcepolicy.policysession` | `sourcepolicy/policysession/policysession.proto` (master only) |
//! | [`moby::buildkit::secrets::v1`] | `moby.buildkit.secrets.v1` | `session/secrets/secrets.proto` |
//! | [`moby::filesync::v1`] | `moby.filesync.v1` | `session/filesync/filesync.proto` and `session/auth/auth.proto` |
//! | [`moby::sshforward::v1`] | `moby.sshforward.v1` | `session/sshforward/ssh.proto` |
//! | [`moby::upload::v1`] | `moby.upload.v1` | `session/upload/upload.proto` |
//! | [`moby::exporter::v1`] | `moby.exporter.v1` | `session/exporter/exporter.proto` (master only) |
//! | [`pb`] | `pb` | `solver/pb/ops.proto` (LLB) |
//! | [`fsutil::types`] | `fsutil.types` | `tonistiigi/fsutil` `types/wire.proto`, `types/stat.proto` |
//! | [`errdefs`] | `errdefs` | `solver/errdefs/errdefs.proto` |
//! | [`stack`] | `stack` | `util/stack/stack.proto` |
//! | [`google::rpc`] | `google.rpc` | googleapis `google/rpc/status.proto` |
//! | [`grpc::health::v1`] | `grpc.health.v1` | grpc `health/v1/health.proto` |
//!
//! Field names follow upstream master (e.g. `SolveRequest.ExporterDeprecated`,
//! which v0.11.6 calls `Exporter`); only names changed, never numbers.
//!
//! # Generated code
//!
//! `build.rs` compiles the files with `protox` (no system `protoc`) and
//! generates code into `OUT_DIR` with `tonic-prost-build`:
//! * every service has a client (`<service>_client::<Service>Client`) and a
//!   server (`<service>_server::{<Service>, <Service>Server}`);
//! * server traits have default methods answering `UNIMPLEMENTED`, and their
//!   streaming responses are [`tonic::codegen::BoxStream`];
//! * maps are [`std::collections::BTreeMap`] (sorted, hence deterministic
//!   encoding, like Go's stable marshaler that LLB digests rely on);
//! * `bytes` fields are [`bytes::Bytes`];
//! * `google.protobuf.*` types are [`prost_types`].
//!
//! # Re-encoding is not byte-exact
//!
//! Decoding then encoding a Go-written message gives the same *values* but not
//! always the same *bytes*: Go writes most control-API maps in random order
//! (we sort), and writes map entries whose key or value is the default
//! explicitly (prost omits them). An op's identity is therefore always the
//! digest of the bytes found in `pb::Definition::def`, never of a re-encoding.
//!
//! # Tests
//!
//! `src/wire_tests.rs` pins bytes of the fields peers depend on and compares
//! the whole schema with listings of upstream's names and numbers
//! (`src/testdata/upstream-*.listing`, master and v0.11.6).
//!
//! # Error details
//!
//! BuildKit puts [`errdefs`] and [`stack`] messages into
//! [`google::rpc::Status::details`] with type URLs of the form
//! `github.com/moby/buildkit/errdefs.Vertex+json` (see [`type_urls`]), and the
//! `Any` value is the **JSON** encoding of the Go struct, not protobuf.
//! [`details::JsonDetail`] reads and writes that form.
//!
//! # Method paths
//!
//! [`methods`] lists the gRPC paths of the services a client attaches to its
//! session, as they appear in the session's exposed-method headers.

/// Includes one generated file from `OUT_DIR`; lints are silenced by the
/// `#[allow]` on each package module.
macro_rules! generated {
    ($file:literal) => {
        include!(concat!(env!("OUT_DIR"), "/", $file));
    };
}

/// Packages under `moby.*`.
pub mod moby {
    /// Packages under `moby.buildkit.*`.
    pub mod buildkit {
        /// `moby.buildkit.v1`: the Control service (`control_server::Control`,
        /// `control_client::ControlClient`) and its messages.
        #[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
        pub mod v1 {
            generated!("moby.buildkit.v1.rs");

            /// `moby.buildkit.v1.types`: worker records, GC policies, versions.
            pub mod types {
                generated!("moby.buildkit.v1.types.rs");
            }

            /// `moby.buildkit.v1.frontend`: the `LLBBridge` gateway service.
            pub mod frontend {
                generated!("moby.buildkit.v1.frontend.rs");
            }

            /// `moby.buildkit.v1.apicaps`: the `APICap` capability record.
            pub mod apicaps {
                generated!("moby.buildkit.v1.apicaps.rs");
            }

            /// `moby.buildkit.v1.sourcepolicy`: source policy rules.
            pub mod sourcepolicy {
                generated!("moby.buildkit.v1.sourcepolicy.rs");

                /// `moby.buildkit.v1.sourcepolicy.policysession`: client-side
                /// policy verification (newer clients).
                pub mod policysession {
                    generated!("moby.buildkit.v1.sourcepolicy.policysession.rs");
                }
            }
        }

        /// Packages under `moby.buildkit.secrets`.
        pub mod secrets {
            /// `moby.buildkit.secrets.v1`: the session `Secrets` service.
            #[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
            pub mod v1 {
                generated!("moby.buildkit.secrets.v1.rs");
            }
        }
    }

    /// Packages under `moby.filesync`.
    pub mod filesync {
        /// `moby.filesync.v1`: session services `FileSync`, `FileSend` and
        /// `Auth` (upstream declares auth in this package too).
        #[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
        pub mod v1 {
            generated!("moby.filesync.v1.rs");
        }
    }

    /// Packages under `moby.sshforward`.
    pub mod sshforward {
        /// `moby.sshforward.v1`: the session `SSH` agent-forwarding service.
        #[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
        pub mod v1 {
            generated!("moby.sshforward.v1.rs");
        }
    }

    /// Packages under `moby.upload`.
    pub mod upload {
        /// `moby.upload.v1`: the session `Upload` service.
        #[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
        pub mod v1 {
            generated!("moby.upload.v1.rs");
        }
    }

    /// Packages under `moby.exporter`.
    pub mod exporter {
        /// `moby.exporter.v1`: the session `Exporter` service (newer clients).
        #[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
        pub mod v1 {
            generated!("moby.exporter.v1.rs");
        }
    }
}

/// `pb`: LLB — `Definition`, `Op` and every op, mount and file action.
#[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
pub mod pb {
    generated!("pb.rs");
}

/// Packages under `fsutil`.
pub mod fsutil {
    /// `fsutil.types`: `Packet` frames of the DiffCopy protocol and `Stat`.
    #[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
    pub mod types {
        generated!("fsutil.types.rs");
    }
}

/// `errdefs`: typed error details BuildKit attaches to failed solves.
#[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
pub mod errdefs {
    generated!("errdefs.rs");
}

/// `stack`: stack traces attached to BuildKit errors.
#[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
pub mod stack {
    generated!("stack.rs");
}

/// Packages under `google`.
pub mod google {
    /// `google.rpc`: the rich gRPC error `Status`.
    #[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
    pub mod rpc {
        generated!("google.rpc.rs");
    }
}

/// Packages under `grpc`.
pub mod grpc {
    /// Packages under `grpc.health`.
    pub mod health {
        /// `grpc.health.v1`: the standard `Health` service.
        #[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
        pub mod v1 {
            generated!("grpc.health.v1.rs");
        }
    }
}

/// Type URLs BuildKit uses for typed error details in
/// [`google::rpc::Status::details`]. The payload under each is JSON.
pub mod type_urls {
    /// [`crate::errdefs::Vertex`].
    pub const ERRDEFS_VERTEX: &str = "github.com/moby/buildkit/errdefs.Vertex+json";
    /// [`crate::errdefs::Source`].
    pub const ERRDEFS_SOURCE: &str = "github.com/moby/buildkit/errdefs.Source+json";
    /// [`crate::errdefs::FrontendCap`].
    pub const ERRDEFS_FRONTEND_CAP: &str = "github.com/moby/buildkit/errdefs.FrontendCap+json";
    /// [`crate::errdefs::Subrequest`].
    pub const ERRDEFS_SUBREQUEST: &str = "github.com/moby/buildkit/errdefs.Subrequest+json";
    /// [`crate::errdefs::Solve`].
    pub const ERRDEFS_SOLVE: &str = "github.com/moby/buildkit/errdefs.Solve+json";
    /// [`crate::errdefs::Frontend`] (newer daemons).
    pub const ERRDEFS_FRONTEND: &str = "github.com/moby/buildkit/errdefs.Frontend+json";
    /// [`crate::errdefs::CompatibilityFeature`] (newer daemons).
    pub const ERRDEFS_COMPATIBILITY_FEATURE: &str =
        "github.com/moby/buildkit/errdefs.CompatibilityFeature+json";
    /// [`crate::stack::Stack`].
    pub const STACK: &str = "github.com/moby/buildkit/stack.Stack+json";
    /// [`crate::moby::buildkit::v1::frontend::ExitMessage`] (container exit codes).
    pub const GATEWAY_EXIT_MESSAGE: &str = "github.com/moby/buildkit/gatewayapi.ExitMessage+json";
}

/// Full gRPC method paths (`/package.Service/Method`) of the services a
/// client may attach to its session.
pub mod methods {
    /// `grpc.health.v1.Health/Check`.
    pub const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
    /// `grpc.health.v1.Health/Watch`.
    pub const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";
    /// `moby.filesync.v1.Auth/Credentials`.
    pub const AUTH_CREDENTIALS: &str = "/moby.filesync.v1.Auth/Credentials";
    /// `moby.filesync.v1.Auth/FetchToken`.
    pub const AUTH_FETCH_TOKEN: &str = "/moby.filesync.v1.Auth/FetchToken";
    /// `moby.filesync.v1.Auth/GetTokenAuthority`.
    pub const AUTH_GET_TOKEN_AUTHORITY: &str = "/moby.filesync.v1.Auth/GetTokenAuthority";
    /// `moby.filesync.v1.Auth/VerifyTokenAuthority`.
    pub const AUTH_VERIFY_TOKEN_AUTHORITY: &str = "/moby.filesync.v1.Auth/VerifyTokenAuthority";
    /// `moby.filesync.v1.FileSync/DiffCopy` (local sources, fsutil packets).
    pub const FILESYNC_DIFF_COPY: &str = "/moby.filesync.v1.FileSync/DiffCopy";
    /// `moby.filesync.v1.FileSync/TarStream`.
    pub const FILESYNC_TAR_STREAM: &str = "/moby.filesync.v1.FileSync/TarStream";
    /// `moby.filesync.v1.FileSend/DiffCopy` (exporter output to the client).
    pub const FILESEND_DIFF_COPY: &str = "/moby.filesync.v1.FileSend/DiffCopy";
    /// `moby.buildkit.secrets.v1.Secrets/GetSecret`.
    pub const SECRETS_GET_SECRET: &str = "/moby.buildkit.secrets.v1.Secrets/GetSecret";
    /// `moby.sshforward.v1.SSH/CheckAgent`.
    pub const SSH_CHECK_AGENT: &str = "/moby.sshforward.v1.SSH/CheckAgent";
    /// `moby.sshforward.v1.SSH/ForwardAgent`.
    pub const SSH_FORWARD_AGENT: &str = "/moby.sshforward.v1.SSH/ForwardAgent";
    /// `moby.upload.v1.Upload/Pull`.
    pub const UPLOAD_PULL: &str = "/moby.upload.v1.Upload/Pull";
    /// `moby.exporter.v1.Exporter/FindExporters` (newer clients).
    pub const EXPORTER_FIND_EXPORTERS: &str = "/moby.exporter.v1.Exporter/FindExporters";
    /// `moby.exporter.v1.Exporter/FinalizeExport` (newer clients).
    pub const EXPORTER_FINALIZE_EXPORT: &str = "/moby.exporter.v1.Exporter/FinalizeExport";
    /// `moby.buildkit.v1.sourcepolicy.policysession.PolicyVerifier/CheckPolicy` (newer clients).
    pub const POLICY_CHECK_POLICY: &str =
        "/moby.buildkit.v1.sourcepolicy.policysession.PolicyVerifier/CheckPolicy";
    /// Every path above. (The content-store attachable,
    /// `containerd.services.content.v1.Content`, is containerd's API and not
    /// defined here; `containerd-client` has it.)
    pub const ALL: &[&str] = &[
        HEALTH_CHECK,
        HEALTH_WATCH,
        AUTH_CREDENTIALS,
        AUTH_FETCH_TOKEN,
        AUTH_GET_TOKEN_AUTHORITY,
        AUTH_VERIFY_TOKEN_AUTHORITY,
        FILESYNC_DIFF_COPY,
        FILESYNC_TAR_STREAM,
        FILESEND_DIFF_COPY,
        SECRETS_GET_SECRET,
        SSH_CHECK_AGENT,
        SSH_FORWARD_AGENT,
        UPLOAD_PULL,
        EXPORTER_FIND_EXPORTERS,
        EXPORTER_FINALIZE_EXPORT,
        POLICY_CHECK_POLICY,
    ];
}

pub mod details;

/// The encoded `google.protobuf.FileDescriptorSet` of every file in `proto/`
/// (plus the well-known types they import), for reflection and tests.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/berth_descriptor_set.bin"));

pub use bytes;
pub use prost;
pub use prost_types;
pub use tonic;

#[cfg(test)]
mod schema_listing;
#[cfg(test)]
mod wire_tests;
