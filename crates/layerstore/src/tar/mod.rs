//! Layer tars: an overlay upperdir → tar (with diffID, size and tar-split in one pass), and
//! a tar (plain, gzip or zstd) → a directory in overlay format.
//!
//! This module owns the byte format of berth's layers:
//! - [`write_layer`] walks a layer directory and streams a deterministic tar (names sorted
//!   bytewise per directory, a directory before its contents, Go `archive/tar` header
//!   layout, hardlinks as links to the first path seen), hashing it (diffID) and writing
//!   Docker's tar-split records as it goes. Nothing but one directory listing per level
//!   and fixed buffers is held in memory.
//! - [`apply_layer`] is its reverse for untrusted input: every path is resolved under the
//!   destination with `openat2(RESOLVE_BENEATH)`, refusals name the entry, limits stop tar
//!   bombs, and the partial result can be removed on error.
//! - [`Digest`] and [`chain_id`] are Docker's content and chain identifiers.
//!
//! Everything here is blocking file I/O: async callers run it under `spawn_blocking`.
//! Verified against real parts by `tests/tar_*.rs`: round trips (property tests), GNU tar
//! both ways, and `docker load`/`docker save` with dockerd's own tar-split compared to ours.
//!
//! Whiteouts (see [`WhiteoutFormat`]): in overlay format a deleted path is a character
//! device 0:0 and an opaque directory carries `trusted.overlay.opaque=y`; in a tar they are
//! `.wh.<name>` and `<dir>/.wh..wh..opq`.

mod apply;
mod digest;
mod header;
mod read;
mod split;
mod write;

pub use apply::{apply_layer, ApplyOptions, ApplyStats, Compression};
pub use digest::{chain_id, chain_ids, Digest};
pub use write::{write_layer, LayerDigest, WriteOptions};

/// Name/value pairs (xattrs, PAX records), in order.
pub(crate) type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// How deletions are represented on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WhiteoutFormat {
    /// overlayfs upperdir: character device 0:0 for a deleted path,
    /// `trusted.overlay.opaque=y` on a directory that hides its lower contents.
    #[default]
    Overlay,
    /// A flat tree: on write, nothing is converted (a char device 0:0 stays a device); on
    /// apply, whiteouts delete the path and an opaque marker empties the directory (which
    /// must come before the directory's own entries, as Docker and [`write_layer`] emit it).
    Plain,
}
