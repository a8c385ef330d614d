//! berth's layer store: filesystem state kept on overlayfs next to Docker's own store.
//!
//! Modules:
//! - [`tar`]: layer tars (overlay upperdir → tar with diffID and tar-split in one pass; tar → directory).
//! - [`dockerstore`]: Docker's classic on-disk store (overlay2 / fuse-overlayfs dirs, layerdb, imagedb).
//! - [`snapshot`]: immutable layers and mutable overlay snapshots under berth's root, leases, GC.
#![deny(unsafe_code)]

pub mod dockerstore;
mod error;
mod resolve;
pub mod snapshot;
pub mod tar;

pub use error::{Error, Result};
pub use resolve::openat2_retry;
pub use tar::{chain_id, Digest};
