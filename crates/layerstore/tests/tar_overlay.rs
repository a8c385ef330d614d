//! Whiteout semantics against the kernel's overlayfs (needs root and overlayfs).
//!
//! For random lower and upper trees: the read-only overlay mount `lowerdir=upper:lower`
//! shows the same tree as applying `write_layer(upper)` in plain format onto a copy of
//! the lower tree. This proves that our `.wh.` / `.wh..wh..opq` output means what the
//! kernel means, and that the plain-format applier carries deletions out the same way.

mod tar_util;

use std::path::{Path, PathBuf};
use std::process::Command;

use layerstore::tar::{apply_layer, write_layer, ApplyOptions, WhiteoutFormat, WriteOptions};
use proptest::prelude::*;
use tar_util::gen::{build, top_small};
use tar_util::*;

struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH) {
            eprintln!("unmount {}: {e}", self.0.display());
        }
    }
}

fn overlay_ro(upper: &Path, lower: &Path, target: &Path) -> Mounted {
    std::fs::create_dir(target).unwrap();
    let opts = format!("lowerdir={}:{}", upper.display(), lower.display());
    let out = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(target)
        .output()
        .expect("mount(8) must be installed");
    assert!(
        out.status.success(),
        "mount overlay: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Mounted(target.to_owned())
}

/// What a merged view must agree on: directories' mtimes and inode sharing differ by
/// construction (overlay reports the lower dir's mtime; applying touches it).
fn view(root: &Path) -> Vec<(String, String)> {
    snapshot(root)
        .unwrap_or_else(|e| panic!("snapshot {}: {e:#}", root.display()))
        .into_iter()
        .map(|(k, mut n)| {
            if n.kind == "dir" {
                n.mtime = 0;
            }
            n.same_inode_as = None;
            n.nlink = 0;
            n.xattrs.retain(|k, _| !k.starts_with(b"trusted.overlay."));
            (String::from_utf8_lossy(&k).into_owned(), format!("{n:?}"))
        })
        .collect()
}

/// Overlayfs only filters whiteouts out of directories it merges; a whiteout in a
/// directory present in one layer only (or under an opaque one) shows up in readdir and
/// then fails lookup. Remove those (they have nothing to hide) so the mount is a valid
/// reference.
fn prune_unmerged_whiteouts(upper: &Path, lower: &Path) {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::fs::MetadataExt;
    let mut doomed = Vec::new();
    for ent in walkdir::WalkDir::new(upper).min_depth(1) {
        let ent = ent.unwrap();
        let md = ent.path().symlink_metadata().unwrap();
        if !(md.file_type().is_char_device() && md.rdev() == 0) {
            continue;
        }
        let rel = ent.path().strip_prefix(upper).unwrap();
        let mut merged = true;
        let mut prefix = PathBuf::new();
        for c in rel.parent().unwrap().components() {
            prefix.push(c);
            let low = lower.join(&prefix).symlink_metadata();
            let opaque = xattrs(&upper.join(&prefix))
                .unwrap()
                .contains_key(&b"trusted.overlay.opaque"[..]);
            if opaque || !low.map(|m| m.is_dir()).unwrap_or(false) {
                merged = false;
            }
        }
        if !merged {
            doomed.push(ent.path().to_owned());
        }
    }
    for p in doomed {
        std::fs::remove_file(p).unwrap();
    }
}

fn copy_tree(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .args(["-a", "--"])
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn plain_apply_matches_kernel_overlay(lower_t in top_small(), upper_t in top_small()) {
        require_root();
        let work = tempdir();
        let lower = work.path().join("lower");
        let upper = work.path().join("upper");
        std::fs::create_dir(&lower).unwrap();
        std::fs::create_dir(&upper).unwrap();
        build(&lower, &lower_t, &mut Vec::new(), false);
        build(&upper, &upper_t, &mut Vec::new(), true);
        prune_unmerged_whiteouts(&upper, &lower);

        let merged = work.path().join("merged");
        let m = overlay_ro(&upper, &lower, &merged);
        let want = view(&merged);
        drop(m);

        let mut tar = Vec::new();
        write_layer(&upper, &mut tar, None, &WriteOptions::default()).unwrap();
        let flat = work.path().join("flat");
        copy_tree(&lower, &flat);
        let opts = ApplyOptions { whiteouts: WhiteoutFormat::Plain, ..Default::default() };
        apply_layer(&tar[..], &flat, None, &opts).unwrap();
        let got = view(&flat);
        prop_assert_eq!(want, got);
    }
}
