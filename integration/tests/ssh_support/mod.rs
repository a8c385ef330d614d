//! Shared helpers of the SSH forwarding tests: a real `ssh-agent` holding a fresh key, and a
//! directory with the host's `ssh-add` plus the shared libraries it needs, for use inside a
//! busybox container (`/tools`, run through the copied dynamic loader).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

/// The command line running the copied `ssh-add` when the tools dir is mounted at `/tools`.
pub const SSH_ADD: &str = "/tools/lib/ld.so --library-path /tools/lib /tools/ssh-add";

/// A private `ssh-agent` (killed by PID on drop) with one ed25519 key.
pub struct Agent {
    child: Child,
    _dir: tempfile::TempDir,
    /// The agent's socket.
    pub sock: PathBuf,
    /// The key's comment (unique per agent).
    pub comment: String,
    /// `ssh-add -l` on the host.
    pub listing: String,
}

impl Agent {
    pub fn start() -> Result<Agent> {
        integration::require_tool("ssh-agent", "openssh-client");
        integration::require_tool("ssh-add", "openssh-client");
        integration::require_tool("ssh-keygen", "openssh-client");
        let dir = tempfile::Builder::new().prefix("berth-ssh-").tempdir()?;
        let sock = dir.path().join("agent.sock");
        let key = dir.path().join("id_ed25519");
        let comment = integration::unique_name("berth-ssh-key");
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", &comment, "-f"])
            .arg(&key))?;
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting ssh-agent")?;
        let mut agent = Agent {
            child,
            _dir: dir,
            sock,
            comment,
            listing: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !agent.sock.exists() {
            if Instant::now() > deadline {
                bail!("ssh-agent did not create {}", agent.sock.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        run(Command::new("ssh-add")
            .env("SSH_AUTH_SOCK", &agent.sock)
            .arg("-q")
            .arg(&key))?;
        agent.listing = run(Command::new("ssh-add")
            .env("SSH_AUTH_SOCK", &agent.sock)
            .arg("-l"))?;
        if !agent.listing.contains(&agent.comment) {
            bail!("host ssh-add -l does not list the key: {}", agent.listing);
        }
        Ok(agent)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fills `dest` with `ssh-add` and its libraries (`lib/`, the loader as `lib/ld.so`), as
/// listed by `ldd`.
pub fn tools_dir(dest: &Path) -> Result<()> {
    let ssh_add = PathBuf::from("/usr/bin/ssh-add");
    let lib = dest.join("lib");
    std::fs::create_dir_all(&lib)?;
    std::fs::copy(&ssh_add, dest.join("ssh-add")).context("copying ssh-add")?;
    let ldd = run(Command::new("ldd").arg(&ssh_add))?;
    let mut loader = false;
    for line in ldd.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if !path.starts_with('/') {
            continue; // linux-vdso
        }
        let name = Path::new(path).file_name().unwrap();
        let target = if name.to_string_lossy().starts_with("ld-linux") {
            loader = true;
            lib.join("ld.so")
        } else {
            lib.join(name)
        };
        std::fs::copy(path, &target).with_context(|| format!("copying {path}"))?;
    }
    if !loader {
        bail!("ldd named no dynamic loader for ssh-add:\n{ldd}");
    }
    Ok(())
}
