//! berth's registry client: the OCI distribution protocol configured the way buildkitd.toml
//! configures BuildKit's resolver (`[registry."host"]` mirrors, `http`, `insecure`, `ca`,
//! `keypair`; localhost as plain HTTP; docker.io normalisation), authenticated with the client
//! session's credentials or tokens, with verified streaming blob fetches and pushes.
//!
//! Modules:
//! - [`reference`]: image references normalised like Docker's.
//! - `hosts`: endpoints of a registry domain from the host config, and their HTTP clients.
//! - `auth`: challenges, the [`AuthProvider`] the caller implements over its session, tokens.
//! - `client`: [`Registry`] / [`Session`]: resolve (with platform choice), blob streams, push.
//! - `platform`: [`Platform`] and index matching.
//! - `blobs`: the compressed-blob cache keyed by (diffID, compression) and readers that
//!   decompress and verify layers on the fly.
#![forbid(unsafe_code)]

mod auth;
mod blobs;
mod client;
mod error;
mod hosts;
mod platform;
pub mod reference;

pub use auth::{Anonymous, AuthProvider, Credentials, StaticCredentials, Token, TokenRequest};
pub use blobs::{
    BlobCache, BlockingBlob, CachedBlob, Compression, LayerSourceRecord, LayerVerifier,
};
pub use client::{
    network_reason, BlobStream, Descriptor, Fetched, Image, IndexPlatform, Manifest, ProgressFn,
    PushedBlob, Registry, Session, ATTEMPTS, MAX_MANIFEST_SIZE, MEDIA_TYPE_DOCKER_LIST,
    MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST, RESUMES,
};
pub use error::{BoxError, Error, ErrorKind, Result};
pub use hosts::{is_localhost, Capability, Endpoint, HostConfig, Hosts, KeyPair};
pub use platform::Platform;
pub use reference::Reference;
