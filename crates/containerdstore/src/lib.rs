//! The Docker Engine's **containerd image store** (Engine 24+ with `"features":
//! {"containerd-snapshotter": true}`, the default on fresh Engine 29 installs), as berth's worker
//! and daemon read it.
//!
//! This crate owns:
//! - [`Endpoint::detect`]: whether the Engine berthd is bound to keeps its images in containerd
//!   (`GET /info` reports `DriverStatus` `driver-type` = `io.containerd.snapshotter.v1`), and
//!   where that containerd listens: berthd's configuration (`--containerd-worker-addr`,
//!   `[worker.containerd] address`), else `Containerd.Address` of `GET /info` (Engine 27+; Engine
//!   26.1.5 does not report it), else containerd's default socket. The namespace likewise
//!   (configured, `Containerd.Namespaces.Containers`, `moby`).
//! - [`Client`]: a connection to that containerd, whose failure names the setting to fix.
//! - [`Client::base_image`]: a Docker image used in place as a build's base. Docker's image ID on
//!   this store is the digest of the image's manifest or index; the index is narrowed to the
//!   build's platform, the config read from containerd's content store, and the layers'
//!   snapshots (named by chainID in the Engine's snapshotter) turned into read-only lower
//!   directories through one short-lived view. A [`BaseLease`] (a containerd lease holding the
//!   image's content and its top snapshot, and so every parent snapshot, each added before it
//!   is read) keeps all of it from
//!   containerd's garbage collector, even when the image is removed from Docker meanwhile,
//!   until the build drops it. Nothing is pulled, unpacked or copied.
//! - [`Client::pull`]: an image resolved in a registry written into containerd as Docker's own
//!   pull writes it (blobs streamed into the content store with Docker's labels, layers unpacked
//!   under their chainIDs, three downloads at a time, the image record named as Docker names
//!   it), under the build's [`BaseLease`] ([`Client::lease`], taken before the pull and handed
//!   on to [`Client::base_image`]), so no prune can take the image between its pull and its
//!   use, and a killed pull leaves nothing containerd's GC cannot free.
//! - [`Client::read_blob`]: a blob of the content store (`ResolveImageConfig`).
//! - [`content_blob_path`]: where a base layer's blob is on disk, for outputs that need its tar.
//! - [`remove_snapshots`]: removes a killed berthd's active snapshots (views, prepared keys).
//! - [`Client::remove_leftovers`]: the leases and views a killed berthd left (they also expire
//!   on their own: [`LEASE_EXPIRY`]).
//!
//! Only the `overlayfs` snapshotter is supported: its snapshot directories are overlay upper
//! dirs (kernel whiteout format) that berth's own overlay mounts can stack. The view is removed
//! right after its mounts were read: the lease alone pins the committed snapshots.
//!
//! Verified against Docker 26.1.5 with containerd 1.7.24 (integration test `containerd_store`):
//! a view of a one-layer image is a read-only `bind` mount of `snapshots/<n>/fs`, a view of
//! several layers an `overlay` mount with only `lowerdir=` (top first).

mod content;
mod endpoint;
mod image;
mod pull;
mod snapshots;

pub use content::content_blob_path;
pub use endpoint::{AddressSource, Endpoint, EndpointOptions, DEFAULT_ADDRESS, DEFAULT_NAMESPACE};
pub use image::{BaseImage, BaseLease, Client, Leftovers, BASE_STEPS, LEASE_EXPIRY, OWNER_LABEL};
pub use pull::{record_name, PullProgress, Pulled, MAX_DOWNLOADS, PULL_STEPS};
pub use snapshots::remove_snapshots;

/// What went wrong talking to the Engine's containerd.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket cannot be reached; the message names what to set.
    #[error(
        "the Docker Engine keeps its images in containerd (containerd image store), but its containerd \
         is not reachable at {address} ({source_kind}): {message}; set --containerd-worker-addr \
         (or `address` under [worker.containerd] in buildkitd.toml) to the socket that Engine's \
         dockerd uses (its --containerd flag or \"containerd\" in daemon.json)"
    )]
    Unreachable {
        /// The socket tried.
        address: String,
        /// Where that address came from.
        source_kind: AddressSource,
        /// The connection error.
        message: String,
    },
    /// A containerd call failed.
    #[error("containerd {what}: {code:?}: {message}")]
    Containerd {
        /// The call and its object.
        what: String,
        /// gRPC code.
        code: tonic::Code,
        /// containerd's message.
        message: String,
    },
    /// The image is not in containerd's store (or not under this namespace).
    #[error(
        "image {image} not found in containerd at {address} (namespace {namespace}); if that is \
         not the Docker Engine's containerd, set --containerd-worker-addr (or `address` under \
         [worker.containerd] in buildkitd.toml) to the socket its dockerd uses"
    )]
    ImageNotFound {
        /// The image (Docker image ID = manifest or index digest).
        image: String,
        /// The containerd socket.
        address: String,
        /// The namespace.
        namespace: String,
    },
    /// The image's layers are not unpacked in the snapshotter.
    #[error("layer {chain_id} of image {image} is not unpacked in containerd's {snapshotter} snapshotter")]
    NotUnpacked {
        /// The image.
        image: String,
        /// The missing chainID.
        chain_id: String,
        /// The snapshotter.
        snapshotter: String,
    },
    /// The Engine's snapshotter is not one berth can use in place.
    #[error("the Docker Engine's containerd snapshotter {snapshotter:?} is not supported (berth needs overlayfs)")]
    UnsupportedSnapshotter {
        /// Its name.
        snapshotter: String,
    },
    /// A manifest, index or config that is not what it claims.
    #[error("image {image}: {message}")]
    BadImage {
        /// The image or blob.
        image: String,
        /// What is wrong.
        message: String,
    },
    /// A pull into containerd failed (registry, verification, unpacking).
    #[error("pull {reference} into containerd: {message}")]
    Pull {
        /// The reference pulled.
        reference: String,
        /// What failed.
        message: String,
    },
    /// No manifest of the index matches the platform.
    #[error("image {image} has no manifest for platform {platform}")]
    NoPlatform {
        /// The image.
        image: String,
        /// `os/arch[/variant]`.
        platform: String,
    },
}

impl Error {
    /// True when the error means "no such image/blob".
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::ImageNotFound { .. })
            || matches!(self, Error::Containerd { code, .. } if *code == tonic::Code::NotFound)
    }
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
