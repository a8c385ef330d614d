//! Overlay mounts of layer stacks, as RAII guards.
//!
//! Two ways to pass a long stack of lower dirs to the kernel (see the module doc of [`crate::snapshot`]):
//! - [`MountMethod::NewApi`]: `fsopen`/`fsconfig(lowerdir+)`/`fsmount`/`move_mount`, one lower dir per call.
//! - [`MountMethod::ShortLinks`]: `mount(2)` with `lowerdir=l/<a>:l/<b>…` relative to the store dir, done on a
//!   dedicated thread that unshares its fs context (`CLONE_FS`) before `chdir`, so no other thread sees the chdir.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::mount::{
    fsconfig_create, fsconfig_set_string, fsmount, fsopen, move_mount, FsMountFlags, FsOpenFlags,
    MountAttrFlags, MountFlags, MoveMountFlags, UnmountFlags,
};

use crate::{Error, Result};

/// How overlay mounts are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountMethod {
    /// Probe the kernel at open: [`MountMethod::NewApi`] if `lowerdir+` works, else [`MountMethod::ShortLinks`].
    Auto,
    /// New mount API with one `lowerdir+` per layer (Linux ≥ 6.8). No limit on the number of layers but overlay's
    /// own (500).
    NewApi,
    /// `mount(2)` with short relative link names; limited by the 4096-byte option page.
    ShortLinks,
}

/// Overlay features set explicitly on every mount: no inode index (lower dirs are shared between mounts), and no
/// redirect or metacopy xattrs in upper dirs (they are committed as layers and exported as plain trees).
const MOUNT_FEATURES: &[(&str, &str)] = &[
    ("index", "off"),
    ("redirect_dir", "off"),
    ("metacopy", "off"),
];

/// Most lower dirs the short-link path stacks (`l/<12 chars>:` is 15 bytes; the option page also holds the
/// upper/work dirs and feature flags).
pub(crate) const SHORT_LINKS_MAX_STACK: usize = 240;

/// Overlayfs' own limit on stacked lower layers (`OVL_MAX_STACK`).
pub(crate) const OVL_MAX_STACK: usize = 500;

/// What to mount: lower dirs top → bottom, optional upper/work.
#[derive(Debug, Clone)]
pub(crate) struct OverlaySpec {
    /// Absolute lower dirs, topmost first.
    pub lowers: Vec<PathBuf>,
    /// Names of the same lowers relative to the store dir (`l/<id>`), for [`MountMethod::ShortLinks`].
    pub short_lowers: Vec<String>,
    /// `(upperdir, workdir)` for a read-write mount.
    pub upper: Option<(PathBuf, PathBuf)>,
}

/// Probes whether the running kernel accepts `lowerdir+`.
pub(crate) fn probe_new_api(some_dir: &Path) -> bool {
    let Ok(fs) = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC) else {
        return false;
    };
    fsconfig_set_string(fs.as_fd(), "lowerdir+", some_dir).is_ok()
}

pub(crate) fn mount_overlay(
    method: MountMethod,
    store_dir: &Path,
    spec: &OverlaySpec,
    target: &Path,
) -> Result<()> {
    if spec.lowers.len() > OVL_MAX_STACK {
        return Err(Error::TooManyLayers {
            layers: spec.lowers.len(),
            max: OVL_MAX_STACK,
        });
    }
    let res = match method {
        MountMethod::NewApi | MountMethod::Auto => mount_new_api(spec, target),
        MountMethod::ShortLinks => mount_short_links(store_dir, spec, target)?,
    };
    res.map_err(|e| Error::Mount {
        target: target.to_path_buf(),
        layers: spec.lowers.len(),
        source: e.into(),
    })
}

fn mount_new_api(spec: &OverlaySpec, target: &Path) -> rustix::io::Result<()> {
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)?;
    let fd = fs.as_fd();
    fsconfig_set_string(fd, "source", "berth")?;
    for l in &spec.lowers {
        fsconfig_set_string(fd, "lowerdir+", l.as_path())?;
    }
    let mut attrs = MountAttrFlags::empty();
    if let Some((upper, work)) = &spec.upper {
        fsconfig_set_string(fd, "upperdir", upper.as_path())?;
        fsconfig_set_string(fd, "workdir", work.as_path())?;
    } else {
        attrs |= MountAttrFlags::MOUNT_ATTR_RDONLY;
    }
    // Upper dirs become layers: they must stay plain (no redirect or metacopy xattrs), whatever the module defaults.
    for (k, v) in MOUNT_FEATURES {
        fsconfig_set_string(fd, *k, *v)?;
    }
    fsconfig_create(fd)?;
    let mnt = fsmount(fd, FsMountFlags::FSMOUNT_CLOEXEC, attrs)?;
    move_mount(
        mnt.as_fd(),
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
}

fn mount_short_links(
    store_dir: &Path,
    spec: &OverlaySpec,
    target: &Path,
) -> Result<rustix::io::Result<()>> {
    let features: Vec<String> = MOUNT_FEATURES
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut data = format!(
        "{},lowerdir={}",
        features.join(","),
        spec.short_lowers.join(":")
    );
    if let Some((upper, work)) = &spec.upper {
        let rel = |p: &Path| p.strip_prefix(store_dir).unwrap_or(p).display().to_string();
        data.push_str(&format!(",upperdir={},workdir={}", rel(upper), rel(work)));
    }
    // The kernel copies one page of options; the terminating NUL must fit too.
    if data.len() >= 4096 {
        return Err(Error::MountOptionsTooLong {
            len: data.len(),
            layers: spec.lowers.len(),
        });
    }
    let flags = if spec.upper.is_some() {
        MountFlags::empty()
    } else {
        MountFlags::RDONLY
    };
    let store_dir = store_dir.to_path_buf();
    let target = target.to_path_buf();
    let handle = std::thread::spawn(move || -> rustix::io::Result<()> {
        // This thread gets its own cwd; the rest of the process keeps its own.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)
            .map_err(|e| rustix::io::Errno::from_raw_os_error(e as i32))?;
        rustix::process::chdir(&store_dir)?;
        let data = std::ffi::CString::new(data).map_err(|_| rustix::io::Errno::INVAL)?;
        rustix::mount::mount("berth", &target, "overlay", flags, data.as_c_str())
    });
    Ok(handle.join().unwrap_or(Err(rustix::io::Errno::IO)))
}

/// Unmounts `target` (lazily if busy).
pub(crate) fn unmount(target: &Path) -> Result<()> {
    match rustix::mount::unmount(target, UnmountFlags::empty()) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::BUSY) => rustix::mount::unmount(target, UnmountFlags::DETACH)
            .map_err(|e| Error::Unmount {
                target: target.to_path_buf(),
                source: e.into(),
            }),
        Err(e) => Err(Error::Unmount {
            target: target.to_path_buf(),
            source: e.into(),
        }),
    }
}

/// Mount points at or below `dir`, deepest first, from `/proc/self/mountinfo`.
pub(crate) fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        op: "read",
        path: path.into(),
        source,
    })?;
    let mut found: Vec<PathBuf> = parse_mountinfo_targets(&text)
        .into_iter()
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

/// The mount point field (5th) of each mountinfo line, with octal escapes (`\040`) decoded.
pub(crate) fn parse_mountinfo_targets(text: &str) -> Vec<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    text.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| {
            let b = field.as_bytes();
            let mut out = Vec::with_capacity(b.len());
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'\\'
                    && i + 3 < b.len()
                    && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
                {
                    out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
                    i += 4;
                } else {
                    out.push(b[i]);
                    i += 1;
                }
            }
            PathBuf::from(std::ffi::OsString::from_vec(out))
        })
        .collect()
}

/// A mounted overlay. Unmounts in `Drop` (logging, never panicking); [`Mount::unmount`] reports the error instead.
#[must_use = "the overlay is unmounted when the guard is dropped"]
pub struct Mount {
    pub(crate) target: PathBuf,
    /// Remove the (empty) mount point dir after unmounting: it was created by the store.
    pub(crate) remove_dir: bool,
    pub(crate) mounted: bool,
    /// Called once after unmount (drops the in-use count of the snapshot).
    pub(crate) on_release: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mount")
            .field("target", &self.target)
            .field("mounted", &self.mounted)
            .finish()
    }
}

impl Mount {
    /// Where the overlay is mounted.
    pub fn path(&self) -> &Path {
        &self.target
    }

    /// Unmounts now and reports failure.
    pub fn unmount(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        if self.mounted {
            unmount(&self.target)?;
            self.mounted = false;
            if self.remove_dir {
                if let Err(e) = std::fs::remove_dir(&self.target) {
                    tracing::warn!(target = %self.target.display(), error = %e, "removing mount point failed");
                }
            }
        }
        if let Some(f) = self.on_release.take() {
            f();
        }
        Ok(())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::error!(target = %self.target.display(), error = %e, "unmounting snapshot failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_targets_decode_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 0:5 / /var/lib/berth/snapshots/mounts/3 rw - overlay berth rw,lowerdir=x\n";
        let got = parse_mountinfo_targets(text);
        assert_eq!(
            got,
            vec![
                PathBuf::from("/mnt/a b"),
                PathBuf::from("/var/lib/berth/snapshots/mounts/3")
            ]
        );
    }
}
