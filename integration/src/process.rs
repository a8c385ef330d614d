//! Child processes and leftover mounts of the daemons this crate starts.
//!
//! Processes are only ever signalled through the PID of a [`Child`] this crate spawned itself;
//! mounts are only ever unmounted when their mount point lies under a temp dir this crate made.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Waits up to `timeout` for `child` to exit.
pub(crate) fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waiting for child process")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Stops `child` with SIGTERM, then SIGKILL after `grace`, and reaps it.
///
/// Returns `Ok(Some(status))` when it exited on its own or on SIGTERM, `Ok(None)` when it had
/// exited before (nothing to do is not an error), and an error when SIGKILL was needed (the process
/// is dead and reaped in that case too).
pub(crate) fn terminate(child: &mut Child, what: &str, grace: Duration) -> Result<ExitStatus> {
    if let Some(status) = child
        .try_wait()
        .with_context(|| format!("polling {what}"))?
    {
        return Ok(status);
    }
    let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
    // The child is not reaped yet (try_wait said so), so the PID still names our process.
    kill(pid, Signal::SIGTERM).with_context(|| format!("sending SIGTERM to {what} (pid {pid})"))?;
    if let Some(status) = wait_timeout(child, grace)? {
        return Ok(status);
    }
    kill(pid, Signal::SIGKILL).with_context(|| format!("sending SIGKILL to {what} (pid {pid})"))?;
    let status = child
        .wait()
        .with_context(|| format!("reaping {what} (pid {pid})"))?;
    bail!("{what} (pid {pid}) ignored SIGTERM for {grace:?} and was killed ({status})")
}

/// Whether a process with this PID exists (a zombie counts as existing).
pub(crate) fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Unmounts (lazily) every mount whose mount point is `root` or lies below it, deepest first.
///
/// Returns the mount points that were unmounted; failures are reported on stderr and skipped,
/// since this runs during cleanup.
pub(crate) fn unmount_under(root: &Path) -> Vec<PathBuf> {
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let mut unmounted = Vec::new();
    // Stacked mounts on one mount point need one pass each; a few passes are plenty.
    for _ in 0..8 {
        let mut points: Vec<PathBuf> = match mount_points() {
            Ok(points) => points
                .into_iter()
                .filter(|p| p.starts_with(&root))
                .collect(),
            Err(err) => {
                eprintln!("integration: reading mountinfo failed: {err:#}");
                break;
            }
        };
        if points.is_empty() {
            break;
        }
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for point in points {
            match nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH) {
                Ok(()) => unmounted.push(point),
                Err(err) => eprintln!("integration: unmounting {} failed: {err}", point.display()),
            }
        }
    }
    unmounted
}

/// Mount points of this process's mount namespace, from `/proc/self/mountinfo`.
fn mount_points() -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .collect())
}

/// Decodes the octal escapes (`\040` for space and so on) the kernel uses in mountinfo paths.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let digit = |b: u8| u32::from(b - b'0');
            let value = digit(bytes[i + 1]) * 64 + digit(bytes[i + 2]) * 8 + digit(bytes[i + 3]);
            out.push(u8::try_from(value).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The last `max` bytes of a log file, for error messages; a note when it cannot be read.
pub(crate) fn log_tail(path: &Path, max: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(max)))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    read().unwrap_or_else(|err| format!("<cannot read {}: {err}>", path.display()))
}

/// Runs `git -C dir args…` with no system or user configuration and a fixed author, as the tests'
/// local repositories need (the machine's git config must not change what a test sees); returns
/// its trimmed stdout, or an error with git's stderr.
pub fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .context("run git")?;
    if !out.status.success() {
        bail!(
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_octal() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain/path"), "/plain/path");
        assert_eq!(unescape_mountinfo("/x\\134y"), "/x\\y");
        assert_eq!(unescape_mountinfo("/trail\\04"), "/trail\\04");
    }

    #[test]
    fn terminate_stops_a_sleeping_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let status = terminate(&mut child, "sleep", Duration::from_secs(5)).unwrap();
        assert!(!status.success());
        assert!(!pid_alive(pid));
    }

    #[test]
    fn terminate_kills_a_child_ignoring_sigterm() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "trap '' TERM; while :; do sleep 0.1; done"])
            .spawn()
            .unwrap();
        // Give the shell time to install its trap.
        std::thread::sleep(Duration::from_millis(200));
        let err = terminate(&mut child, "stubborn sh", Duration::from_millis(300)).unwrap_err();
        assert!(format!("{err}").contains("was killed"), "{err}");
        assert!(child.try_wait().unwrap().is_some());
    }
}
