//! `openat2` with the retry its scoped resolution needs.
//!
//! With `RESOLVE_IN_ROOT` or `RESOLVE_BENEATH`, the kernel fails a lookup with `EAGAIN` when a
//! rename or mount anywhere on the system raced with a `..` step of the walk (it cannot then prove
//! the walk stayed inside the root). Such a failure is transient: the call is simply repeated.
//! On a build machine, where overlay mounts come and go all the time, it is not rare.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// How many times a lookup is retried after `EAGAIN` before the error is returned.
const RETRIES: usize = 256;

/// `openat2(dirfd, path, flags, mode, resolve)`, retried while the kernel answers `EAGAIN`.
pub fn openat2_retry<Fd: AsFd, P: AsRef<Path>>(
    dirfd: Fd,
    path: P,
    flags: OFlags,
    mode: Mode,
    resolve: ResolveFlags,
) -> Result<OwnedFd, Errno> {
    let path = path.as_ref();
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(dirfd.as_fd(), path, flags, mode, resolve) {
            Err(Errno::AGAIN) if tries < RETRIES => tries += 1,
            other => return other,
        }
    }
}
