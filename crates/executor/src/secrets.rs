//! Private tmpfs holding the secret files of one run.
//!
//! Owns: `<bundle>/secrets`, a tmpfs (`nodev,nosuid,noexec,mode=0711`) mounted on first use
//! and unmounted (lazily, `MNT_DETACH`) when the [`SecretStore`] is dropped, so secret bytes never
//! reach a disk and never outlive the run. Each secret is a file named by its index, created
//! 0600 then given the requested owner and mode, and bind-mounted read-only into the container
//! (BuildKit's `secretMountInstance` in `solver/llbsolver/mounts/mount.go`).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::Error;

pub(crate) struct SecretStore {
    dir: PathBuf,
    mounted: bool,
    next: usize,
}

impl SecretStore {
    pub(crate) fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            mounted: false,
            next: 0,
        }
    }

    fn err(path: &Path, op: &'static str, source: std::io::Error) -> Error {
        Error::Secret {
            path: path.to_owned(),
            op,
            source,
        }
    }

    fn ensure_mounted(&mut self) -> Result<(), Error> {
        if self.mounted {
            return Ok(());
        }
        std::fs::create_dir(&self.dir).map_err(|e| Self::err(&self.dir, "create directory", e))?;
        mount(
            Some("tmpfs"),
            &self.dir,
            Some("tmpfs"),
            MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("mode=0711"),
        )
        .map_err(|e| Self::err(&self.dir, "mount tmpfs", e.into()))?;
        self.mounted = true;
        Ok(())
    }

    /// Writes one secret and returns its host path.
    pub(crate) fn add(
        &mut self,
        data: &[u8],
        uid: u32,
        gid: u32,
        mode: u32,
    ) -> Result<PathBuf, Error> {
        self.ensure_mounted()?;
        let path = self.dir.join(self.next.to_string());
        self.next += 1;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Self::err(&path, "create file", e))?;
        f.write_all(data)
            .map_err(|e| Self::err(&path, "write", e))?;
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
            .map_err(|e| Self::err(&path, "chown", e))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))
            .map_err(|e| Self::err(&path, "chmod", e))?;
        Ok(path)
    }

    /// Unmounts the tmpfs (lazily); idempotent.
    pub(crate) fn unmount(&mut self) {
        if self.mounted {
            self.mounted = false;
            if let Err(e) = umount2(&self.dir, MntFlags::MNT_DETACH) {
                tracing::warn!(path = %self.dir.display(), error = %e, "failed to unmount secret tmpfs");
            }
        }
    }
}

impl Drop for SecretStore {
    fn drop(&mut self) {
        self.unmount();
    }
}
