//! SSH agent mounts through the worker with real runc, overlayfs and a real `ssh-agent`: the
//! host's `ssh-add` runs inside a busybox container and lists the key of the agent the session
//! forwards. Needs root, runc, busybox-static and openssh-client.

mod ssh_support;
mod worker_ops_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use integration::{busybox_image, DockerEngine};
use llb::{Mount, RunOpts};
use ssh_support::{tools_dir, Agent, SSH_ADD};
use worker::{ErrorKind, LocalSync, SessionProvider, SshAgentConn, TransferProgress};
use worker_ops_support::*;

/// A session with local directories (copied with `cp -a`) and SSH agents (id → socket),
/// answering like buildctl's agent provider.
struct SshSession {
    locals: HashMap<String, PathBuf>,
    agents: HashMap<String, PathBuf>,
}

fn agent_id(id: &str) -> &str {
    if id.is_empty() {
        "default"
    } else {
        id
    }
}

#[async_trait::async_trait]
impl SessionProvider for SshSession {
    async fn sync_local(
        &self,
        req: &LocalSync,
        dest: &Path,
        _progress: &TransferProgress,
    ) -> worker::Result<worker::SyncStats> {
        let src = self.locals.get(&req.name).ok_or_else(|| {
            worker::Error::session(ErrorKind::NotFound, format!("no local {}", req.name), None)
        })?;
        let st = std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", src.display()))
            .arg(dest)
            .status()
            .map_err(|e| worker::Error::session(ErrorKind::Internal, e.to_string(), None))?;
        assert!(st.success(), "cp -a failed");
        Ok(worker::SyncStats::changed(0))
    }

    async fn check_ssh_agent(&self, id: &str) -> worker::Result<()> {
        let id = agent_id(id);
        if self.agents.contains_key(id) {
            Ok(())
        } else {
            Err(worker::Error::session(
                ErrorKind::Internal,
                format!("unset ssh forward key {id}"),
                None,
            ))
        }
    }

    async fn forward_ssh_agent(&self, id: &str) -> worker::Result<SshAgentConn> {
        let sock = self.agents.get(agent_id(id)).ok_or_else(|| {
            worker::Error::session(ErrorKind::NotFound, format!("no agent {id}"), None)
        })?;
        let conn = tokio::net::UnixStream::connect(sock)
            .await
            .map_err(|e| worker::Error::session(ErrorKind::Unavailable, e.to_string(), None))?;
        Ok(Box::new(conn))
    }
}

async fn base() -> Result<(integration::TestImage, llb::State)> {
    let engine = DockerEngine::system()?;
    let img = busybox_image(&engine).await?;
    let st = llb::image(img.reference()).state();
    Ok((img, st))
}

/// Two agents at once, the default target with `SSH_AUTH_SOCK`, a custom target with its
/// owner and mode, a missing optional agent skipped; nothing of it left in the layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_agent_forwarded_into_exec() -> Result<()> {
    let w = TestWorker::new()?;
    let (_img, base) = base().await?;
    let a = Agent::start()?;
    let b = Agent::start()?;
    let tools = tempfile::tempdir()?;
    tools_dir(tools.path())?;
    let session = Arc::new(SshSession {
        locals: HashMap::from([("tools".to_string(), tools.path().to_path_buf())]),
        agents: HashMap::from([
            ("default".to_string(), a.sock.clone()),
            ("work".to_string(), b.sock.clone()),
        ]),
    });
    let script = format!(
        "{SSH_ADD} -l > /list-default 2>&1; \
         SSH_AUTH_SOCK=/run/work.sock {SSH_ADD} -l > /list-work 2>&1; \
         echo \"$SSH_AUTH_SOCK\" > /sock-env; \
         stat -c '%u:%g %a %F' /run/buildkit/ssh_agent.0 /run/work.sock > /perm; \
         test -e /run/missing.sock || touch /no-optional"
    );
    let tools_st = llb::local("tools").state();
    let run = base.run(
        RunOpts::shell(script)
            .mount(Mount::bind("/tools", &tools_st).readonly())
            .mount(Mount::ssh("", "", false))
            .mount(Mount::ssh("/run/work.sock", "work", false).file_opt(1000, 1001, 0o640))
            .mount(Mount::ssh("/run/missing.sock", "nope", true)),
    );
    let s = solve_with(&w.worker, &run.root(), session, CancellationToken::new()).await;
    let r = s.ok();
    let list_default = read(r, "/list-default").await?.unwrap();
    let list_work = read(r, "/list-work").await?.unwrap();
    // The container's ssh-add sees exactly what the host's sees, per agent.
    assert_eq!(list_default, a.listing, "default agent from inside");
    assert_eq!(list_work, b.listing, "work agent from inside");
    assert!(list_default.contains(&a.comment) && !list_default.contains(&b.comment));
    assert_eq!(
        read(r, "/sock-env").await?.unwrap().trim(),
        "/run/buildkit/ssh_agent.0"
    );
    let perm = read(r, "/perm").await?.unwrap();
    let lines: Vec<&str> = perm.lines().collect();
    assert_eq!(lines, ["0:0 600 socket", "1000:1001 640 socket"], "{perm}");
    assert!(read(r, "/no-optional").await?.is_some());
    // No socket (or mount stub) in the result, no socket dir left on the host.
    assert_eq!(read(r, "/run/buildkit/ssh_agent.0").await?, None);
    assert_eq!(read(r, "/run/work.sock").await?, None);
    let ssh_dirs = w.root().join("worker/ssh");
    let left: Vec<_> = std::fs::read_dir(&ssh_dirs)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "socket dirs left: {left:?}");
    Ok(())
}

/// A required agent the client does not have fails the exec with the id in the message, both
/// for a session without SSH forwarding and for an unknown id; nothing runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_ssh_agent_fails_unless_optional() -> Result<()> {
    let w = TestWorker::new()?;
    let (_img, base) = base().await?;
    let run = |id: &str, optional: bool| {
        base.run(RunOpts::shell("touch /ran").mount(Mount::ssh("/run/a.sock", id, optional)))
            .root()
    };
    // Session without SSH forwarding at all.
    let s = solve(&w.worker, &run("deploy", false)).await;
    let e = s.result.as_ref().expect_err("must fail");
    let msg = e.to_string();
    assert!(
        msg.contains("no SSH key \"deploy\" forwarded from the client")
            && msg.contains("/run/a.sock"),
        "{msg}"
    );
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(!s.completed().iter().any(|(n, _)| n.contains("touch /ran")));

    // Session with other agents: the client's answer is the cause.
    let a = Agent::start()?;
    let session = Arc::new(SshSession {
        locals: HashMap::new(),
        agents: HashMap::from([("default".to_string(), a.sock.clone())]),
    });
    let s = solve_with(
        &w.worker,
        &run("deploy", false),
        session.clone(),
        CancellationToken::new(),
    )
    .await;
    let msg = s.result.as_ref().expect_err("must fail").to_string();
    assert!(msg.contains("unset ssh forward key deploy"), "{msg}");

    // Optional: the exec runs without the socket.
    let s = solve_with(
        &w.worker,
        &run("deploy", true),
        session,
        CancellationToken::new(),
    )
    .await;
    let r = s.ok();
    assert!(read(r, "/ran").await?.is_some());
    Ok(())
}
