//! [`PrivateContainerd`]: a throwaway containerd (the machine's binary) with its own root, state
//! and socket, for tests of berth's containerd image-store export and for `ctr` checks of what it
//! wrote. The CRI plugin is disabled; nothing is shared with the system containerd.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A private containerd; stopped (and anything it left mounted under its root unmounted) when
/// dropped.
pub struct PrivateContainerd {
    child: Child,
    dir: tempfile::TempDir,
}

impl PrivateContainerd {
    /// Starts it under a fresh directory in `/var/tmp` and waits until `ctr version` answers.
    /// Panics with containerd's log if it does not answer within 20 s.
    pub fn start() -> PrivateContainerd {
        crate::require_tool("containerd", "containerd");
        crate::require_tool("ctr", "containerd");
        let dir = tempfile::Builder::new()
            .prefix("berth-ctrd-")
            .tempdir_in("/var/tmp")
            .expect("creating the private containerd's directory");
        let d = dir.path();
        let cfg = format!(
            "version = 2\nroot = \"{r}/root\"\nstate = \"{r}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{r}/c.sock\"\n[ttrpc]\n  address = \"{r}/c.sock.ttrpc\"\n",
            r = d.display()
        );
        std::fs::write(d.join("config.toml"), cfg).expect("writing containerd's config");
        let log = std::fs::File::create(d.join("containerd.log")).expect("creating containerd.log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let c = PrivateContainerd { child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.ctr(&["version"]).0 {
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    /// Its gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// `ctr --namespace moby ARGS` against it: (success, stdout + stderr).
    pub fn ctr(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", "moby"])
            .args(args)
            .output()
            .expect("running ctr");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// `ctr ARGS` that must succeed; its output. Panics with the output and containerd's log.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let (ok, out) = self.ctr(args);
        assert!(ok, "ctr {args:?}: {out}\n{}", self.log());
        out
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Unmount anything a task left under its root (deepest first) before the dir goes.
        if let Ok(m) = std::fs::read_to_string("/proc/self/mountinfo") {
            let root = self.dir.path().to_string_lossy().into_owned();
            for line in m.lines().rev() {
                if let Some(target) = line.split(' ').nth(4) {
                    if target.starts_with(&root) {
                        let _ = Command::new("umount").arg("-l").arg(target).status();
                    }
                }
            }
        }
    }
}
