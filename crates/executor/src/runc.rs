//! Typed client for the runc binary.
//!
//! Owns: the runc state directory given as `--root` (no one else may run runc against it).
//! Every runc invocation goes through here, via `tokio::process` (no `fork` on a runtime
//! thread). Management commands (`kill`, `delete`, `list`) are bounded by a timeout and fail
//! with [`Error::Runc`] carrying the exit status and standard error.
//! Modelled on `containerd/rust-extensions` `crates/runc` (argument building, error carrying
//! status and stderr), reduced to the subcommands the executor uses.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::process::Command;

use crate::error::Error;

/// Bound on a management command; runc answers these in milliseconds.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// One entry of `runc list --format json`.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct ContainerEntry {
    pub id: String,
    #[serde(default)]
    pub pid: i64,
    #[serde(default)]
    pub status: String,
}

/// The part of `runc state <id>` the executor reads.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct ContainerState {
    #[serde(default)]
    pub status: String,
}

#[derive(Clone, Debug)]
pub(crate) struct Runc {
    program: PathBuf,
    root: PathBuf,
}

impl Runc {
    pub(crate) fn new(program: PathBuf, root: PathBuf) -> Self {
        Self { program, root }
    }

    pub(crate) fn program(&self) -> &Path {
        &self.program
    }

    fn base(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.arg("--root").arg(&self.root).stdin(Stdio::null());
        c
    }

    /// `runc --log <log> --log-format json run --bundle <bundle> <id>`, in its own process
    /// group, killed if dropped. The caller sets the standard streams.
    pub(crate) fn run_command(&self, bundle: &Path, log: &Path, id: &str) -> Command {
        let mut c = self.base();
        c.arg("--log")
            .arg(log)
            .args(["--log-format", "json", "run", "--bundle"])
            .arg(bundle)
            .arg(id)
            .process_group(0)
            .kill_on_drop(true);
        c
    }

    /// `runc --log <log> --log-format json exec --process <process> --pid-file <pid_file>
    /// <id>`, in its own process group, killed if dropped. The caller sets the streams.
    pub(crate) fn exec_command(
        &self,
        process: &Path,
        pid_file: &Path,
        log: &Path,
        id: &str,
    ) -> Command {
        let mut c = self.base();
        c.arg("--log")
            .arg(log)
            .args(["--log-format", "json", "exec", "--process"])
            .arg(process)
            .arg("--pid-file")
            .arg(pid_file)
            .arg(id)
            .process_group(0)
            .kill_on_drop(true);
        c
    }

    /// `runc state <id>`: `None` when runc knows no such container.
    pub(crate) async fn state(&self, id: &str) -> Result<Option<ContainerState>, Error> {
        match self.output(&["state", id]).await {
            Ok(out) => serde_json::from_slice(&out)
                .map(Some)
                .map_err(|e| Error::Runc {
                    command: format!("state {id}"),
                    status: "unparsable output".into(),
                    stderr: e.to_string(),
                }),
            Err(Error::Runc { stderr, .. }) if stderr.contains("does not exist") => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn output<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Vec<u8>, Error> {
        let command = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        let child = self
            .base()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::Spawn {
                program: self.program.clone(),
                source: e,
            })?;
        let out = match tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output()).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                return Err(Error::Runc {
                    command,
                    status: "wait failed".into(),
                    stderr: e.to_string(),
                })
            }
            Err(_) => {
                return Err(Error::Runc {
                    command,
                    status: format!("timed out after {COMMAND_TIMEOUT:?}"),
                    stderr: String::new(),
                })
            }
        };
        if !out.status.success() {
            return Err(Error::Runc {
                command,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(out.stdout)
    }

    /// `runc kill <id> <signal>`.
    pub(crate) async fn kill(&self, id: &str, signal: &str) -> Result<(), Error> {
        self.output(&["kill", id, signal]).await.map(drop)
    }

    /// `runc delete --force <id>`: kills the container if it still runs, removes its state.
    pub(crate) async fn delete_force(&self, id: &str) -> Result<(), Error> {
        self.output(&["delete", "--force", id]).await.map(drop)
    }

    /// `runc list --format json`.
    pub(crate) async fn list(&self) -> Result<Vec<ContainerEntry>, Error> {
        let out = self.output(&["list", "--format", "json"]).await?;
        // runc prints `null` when there are no containers.
        let v: Option<Vec<ContainerEntry>> =
            serde_json::from_slice(&out).map_err(|e| Error::Runc {
                command: "list --format json".into(),
                status: "unparsable output".into(),
                stderr: e.to_string(),
            })?;
        Ok(v.unwrap_or_default())
    }
}

/// The error messages of a runc `--log-format json` log (levels error and fatal).
pub(crate) fn log_errors(log: &[u8]) -> Vec<String> {
    #[derive(Deserialize)]
    struct Line {
        #[serde(default)]
        level: String,
        #[serde(default)]
        msg: String,
    }
    log.split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice::<Line>(l).ok())
        .filter(|l| l.level == "error" || l.level == "fatal")
        .map(|l| l.msg)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_errors_picks_error_lines() {
        let log = br#"{"level":"warning","msg":"w","time":"t"}
{"level":"error","msg":"runc run failed: exec: \"x\": not found","time":"t"}
not json
{"level":"fatal","msg":"boom"}
"#;
        assert_eq!(
            log_errors(log),
            vec!["runc run failed: exec: \"x\": not found", "boom"]
        );
        assert!(log_errors(b"").is_empty());
    }
}
