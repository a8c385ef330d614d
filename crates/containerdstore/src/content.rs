//! Where containerd keeps a blob on disk, found from one of its snapshot directories.
//!
//! A base image used in place already hands berth the snapshot directories of the Engine's
//! `overlayfs` snapshotter (`<root>/io.containerd.snapshotter.v1.overlayfs/snapshots/<n>/fs`);
//! the content store of the same containerd lives next to it
//! (`<root>/io.containerd.content.v1.content/blobs/<algorithm>/<hex>`), both under containerd's
//! `root`. Outputs that need a base layer's tar stream its blob from there: a plain file read,
//! no gRPC round trip per chunk, and the base image's lease keeps the file until the build ends.

use std::path::{Path, PathBuf};

/// containerd's directory of the built-in overlayfs snapshotter, under its root.
const SNAPSHOTTER_DIR: &str = "io.containerd.snapshotter.v1.overlayfs";
/// containerd's directory of the built-in content store, under its root.
const CONTENT_DIR: &str = "io.containerd.content.v1.content";

/// The file of blob `digest` (`sha256:<64 hex>`) in the content store of the containerd whose
/// overlayfs snapshot directory is `snapshot_fs` (`…/snapshots/<n>/fs`). `None` when the
/// directory is not laid out that way or the digest is not a well-formed sha256 digest (it is
/// joined to a path, so nothing else is accepted).
pub fn content_blob_path(snapshot_fs: &Path, digest: &str) -> Option<PathBuf> {
    let hex = digest.strip_prefix("sha256:")?;
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    if snapshot_fs.file_name()? != "fs" {
        return None;
    }
    let snapshots = snapshot_fs.parent()?.parent()?;
    if snapshots.file_name()? != "snapshots" {
        return None;
    }
    let plugin = snapshots.parent()?;
    if plugin.file_name()? != SNAPSHOTTER_DIR {
        return None;
    }
    Some(
        plugin
            .parent()?
            .join(CONTENT_DIR)
            .join("blobs")
            .join("sha256")
            .join(hex),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_next_to_the_snapshotter() {
        let hex = "ab".repeat(32);
        let fs =
            Path::new("/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/12/fs");
        assert_eq!(
            content_blob_path(fs, &format!("sha256:{hex}")),
            Some(PathBuf::from(format!(
                "/var/lib/containerd/io.containerd.content.v1.content/blobs/sha256/{hex}"
            )))
        );
        // Digests are joined to a path: only sha256 with 64 lowercase hex digits.
        assert_eq!(content_blob_path(fs, "sha256:../../etc/passwd"), None);
        assert_eq!(content_blob_path(fs, &format!("sha512:{hex}")), None);
        assert_eq!(
            content_blob_path(fs, &format!("sha256:{}", "AB".repeat(32))),
            None
        );
        // Not an overlayfs snapshot directory.
        let other = Path::new("/var/lib/docker/overlay2/abc/diff");
        assert_eq!(content_blob_path(other, &format!("sha256:{hex}")), None);
    }
}
