//! Docker's classic on-disk image store (`overlay2` and `fuse-overlayfs` graph drivers), as recorded in
//! `shared/spec/docker-store.md`.
//!
//! This module owns every access berth makes to a Docker data root:
//! - [`DockerStore`] reads `image/<driver>/layerdb` and `imagedb` and maps layers to their `diff/` dirs. Reading never
//!   writes, so it is safe while dockerd runs.
//! - [`resolve_base_image`] turns an image reference into the layer dirs berth mounts in place (through the live
//!   Engine API plus the reader), and [`pin_image`] keeps Docker (`docker rmi`, prunes) from deleting them while a build uses them: a
//!   running pin container per image (module `pin`).
//! - [`resolve_offline_image`] does the same for a **stopped** dockerd from its data root alone (`repositories.json`,
//!   image IDs and ID prefixes as dockerd resolves them), reading only.
//! - [`fault`]: the `BERTH_FAULT_KILL` fault-injection points of every export mode (crash tests).
//! - [`OfflineWriter`] writes layers, image configs and tags into the data root of a **stopped** dockerd (never a
//!   running one: a running dockerd does not pick such entries up and they block later loads of the same layers).
//!
//! # Layout (under the data root; `<drv>` is `overlay2` or `fuse-overlayfs`)
//!
//! ```text
//! <drv>/<cache-id>/{diff/, link, lower, work/, committed}     layer dirs; l/<link> -> ../<cache-id>/diff
//! image/<drv>/layerdb/sha256/<chainID>/{diff,size,cache-id,parent,tar-split.json.gz}
//! image/<drv>/imagedb/content/sha256/<imageID>                 config bytes (imageID = sha256 of them)
//! image/<drv>/repositories.json                               tags
//! ```
//!
//! # Whiteouts: overlay2 vs fuse-overlayfs
//!
//! Both drivers use the same directory layout, but they store deletions differently. dockerd 20.10's `overlay2`
//! applies layer tars in overlay format (char device 0:0, `trusted.overlay.opaque=y`). Its `fuse-overlayfs` driver
//! applies them in **AUFS format**: the `.wh.<name>` and `.wh..wh..opq` marker files of the tar are kept as regular
//! files (moby `v20.10.24:daemon/graphdriver/fuse-overlayfs/fuseoverlayfs.go`, `ApplyDiff` with
//! `archive.AUFSWhiteoutFormat`), which the fuse-overlayfs binary understands and kernel overlayfs does not. So a
//! fuse-overlayfs layer dir used as a kernel-overlay lowerdir would show the markers and not hide what they delete.
//! [`StorageDriver::whiteout_format`] reports this, and the snapshot store stacks generated adapter layers around such
//! layers ([`crate::snapshot::WhiteoutFormat::Aufs`]). The offline writer writes each driver's own format.
pub mod fault;
mod live;
mod offline;
mod pin;
mod reader;
mod writer;

pub use fault::fault_point;
pub use live::{resolve_base_image, BaseImage};
pub use offline::{offline_driver, resolve_offline_image};
pub use pin::{
    is_image_missing, pin_image, pin_image_after, pin_image_in_background, pins_held,
    remove_stale_pins, stop_pinning, Pin, PIN_ABOUT_LABEL, PIN_BUILD_LABEL, PIN_IMAGE_LABEL,
    PIN_LABEL, PIN_PID_LABEL,
};
pub use reader::{DockerStore, LayerEntry};
pub use writer::{recover, DaemonCheck, LayerSource, OfflineWriter, RecoverReport, WrittenLayer};

use crate::snapshot::WhiteoutFormat;
use crate::{Error, Result};

/// The graph drivers whose layout berth reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDriver {
    /// `overlay2`: overlay-format whiteouts.
    Overlay2,
    /// `fuse-overlayfs`: the same layout, AUFS-format whiteouts.
    FuseOverlayfs,
}

impl StorageDriver {
    /// The driver's name as dockerd spells it (also the directory name).
    pub fn name(self) -> &'static str {
        match self {
            StorageDriver::Overlay2 => "overlay2",
            StorageDriver::FuseOverlayfs => "fuse-overlayfs",
        }
    }

    /// Parses dockerd's driver name (`docker info` `Driver`).
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "overlay2" => Ok(StorageDriver::Overlay2),
            "fuse-overlayfs" => Ok(StorageDriver::FuseOverlayfs),
            other => Err(Error::UnsupportedStorageDriver {
                driver: other.to_string(),
            }),
        }
    }

    /// How this driver stores deletions in its `diff/` dirs.
    pub fn whiteout_format(self) -> WhiteoutFormat {
        match self {
            StorageDriver::Overlay2 => WhiteoutFormat::Overlay,
            StorageDriver::FuseOverlayfs => WhiteoutFormat::Aufs,
        }
    }
}
