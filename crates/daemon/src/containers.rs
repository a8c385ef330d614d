//! The gRPC side of gateway containers: `LLBBridge.NewContainer`, `ReleaseContainer` and the
//! `ExecProcess` stream, adapted to the `gateway` crate (which owns containers and processes).
//!
//! `ExecProcess` follows buildkitd's message order per process (`frontend/gateway/gateway.go`,
//! v0.11.6): `Init` → `Started`; then `File` output chunks and one `File{EOF}` per requested
//! output fd, `Exit` (code, and for a non-zero code a status whose details carry
//! `gatewayapi.ExitMessage`), and `Done` last. Input: `File` on fd 0 (EOF closes stdin),
//! `Resize`, `Signal` (names without `SIG`, as moby's signal map). A protocol error ends the
//! stream with that error; processes keep running until their container is released (at the
//! latest when the build ends).

use crate::errors::{Error, Result};
use crate::jobs::Job;
use crate::solver::{Backend, FsRef};
use bytes::Bytes;
use protos::moby::buildkit::v1::frontend as gw;
use protos::pb;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;
use tonic::Status;

/// A gateway crate error as the daemon reports it; process failures carry `ExitMessage`.
pub fn gateway_error(e: gateway::Error) -> Error {
    use gateway::ErrorKind as K;
    let message = e.to_string();
    let base = match e.kind() {
        K::AlreadyExists => Error::Remote {
            code: tonic::Code::AlreadyExists,
            message,
        },
        K::NotFound => Error::not_found(message),
        K::InvalidArgument => Error::invalid(message),
        K::PermissionDenied => Error::PermissionDenied { what: message },
        K::Canceled => Error::Remote {
            code: tonic::Code::Cancelled,
            message,
        },
        K::Unknown => Error::failed(message),
        K::Unimplemented => Error::unimplemented(message),
        _ => Error::internal(message),
    };
    match &e {
        gateway::Error::Process(p) => base.with_details(vec![exit_detail(p.code())]),
        _ => base,
    }
}

/// `gatewayapi.ExitMessage` as buildkitd puts it into error details (Go JSON of the struct).
fn exit_detail(code: u32) -> prost_types::Any {
    prost_types::Any {
        type_url: protos::type_urls::GATEWAY_EXIT_MESSAGE.to_string(),
        value: serde_json::json!({ "Code": code }).to_string().into_bytes(),
    }
}

/// `NewContainer`.
pub async fn new_container(
    backend: &Arc<Backend>,
    job: &Arc<Job>,
    r: gw::NewContainerRequest,
) -> Result<()> {
    let mut mounts = Vec::with_capacity(r.mounts.len());
    for m in r.mounts {
        let result = if m.result_id.is_empty() {
            None
        } else {
            match job.get_ref(backend, &m.result_id).await {
                Ok(FsRef::Solved(s)) => Some(s),
                Ok(FsRef::Scratch) => None,
                Err(e @ Error::NotFound { .. }) => {
                    return Err(Error::not_found(format!(
                        "failed to find ref {} for {:?} mount: {e}",
                        m.result_id, m.dest
                    )))
                }
                // A lazy ref whose solve failed: that failure, with its details.
                Err(e) => return Err(e),
            }
        };
        let mount = pb::Mount {
            dest: m.dest,
            selector: m.selector,
            readonly: m.readonly,
            mount_type: m.mount_type,
            cache_opt: m.cache_opt,
            secret_opt: m.secret_opt,
            ssh_opt: m.ssh_opt,
            ..Default::default()
        };
        mounts.push(gateway::ContainerMount { mount, result });
    }
    let network = match pb::NetMode::try_from(r.network) {
        Ok(pb::NetMode::Unset) => gateway::NetMode::Sandbox,
        Ok(pb::NetMode::Host) => gateway::NetMode::Host,
        Ok(pb::NetMode::None) => gateway::NetMode::None,
        Err(_) => {
            return Err(Error::invalid(format!(
                "unknown network mode {}",
                r.network
            )))
        }
    };
    let mut extra_hosts = Vec::new();
    for h in &r.extra_hosts {
        let ip =
            h.ip.parse()
                .map_err(|_| Error::invalid(format!("failed to parse IP {}", h.ip)))?;
        extra_hosts.push(gateway::HostIp {
            host: h.host.clone(),
            ip,
        });
    }
    let allowed = &backend.worker().options().allowed_entitlements;
    let entitlements: Vec<String> = job
        .entitlements
        .iter()
        .filter(|e| allowed.contains(e))
        .cloned()
        .collect();
    let session = Arc::new(crate::session::provider::JobSession::new(
        backend.sessions.clone(),
        job.session_id.clone(),
    ));
    let req = gateway::NewContainer {
        id: r.container_id,
        mounts,
        network,
        extra_hosts,
        platform_os: r.platform.map(|p| p.os).unwrap_or_default(),
    };
    let c = gateway::Container::new(backend.worker(), req, session, entitlements, &job.cancel)
        .await
        .map_err(gateway_error)?;
    job.containers.insert(c).await.map_err(gateway_error)
}

/// `ReleaseContainer`.
pub async fn release_container(job: &Arc<Job>, id: &str) -> Result<()> {
    job.containers.release(id).await.map_err(gateway_error)
}

type Out = mpsc::Sender<std::result::Result<gw::ExecMessage, Status>>;

/// The input side of one process.
struct ProcInput {
    stdin: Option<mpsc::Sender<Bytes>>,
    resize: mpsc::Sender<gateway::WinSize>,
    signal: mpsc::Sender<i32>,
}

fn msg(pid: &str, input: gw::exec_message::Input) -> gw::ExecMessage {
    gw::ExecMessage {
        process_id: pid.to_string(),
        input: Some(input),
    }
}

/// Serves one `ExecProcess` stream until the client closes it, it breaks, or the build ends.
pub async fn exec_session(job: Arc<Job>, mut inbound: tonic::Streaming<gw::ExecMessage>, out: Out) {
    let mut procs: HashMap<String, ProcInput> = HashMap::new();
    loop {
        let m = tokio::select! {
            m = inbound.message() => m,
            _ = job.ended.cancelled() => return,
        };
        let m = match m {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => return,
        };
        if let Err(st) = handle(&job, &mut procs, m, &out).await {
            let _ = out.send(Err(st)).await;
            return;
        }
    }
}

async fn handle(
    job: &Arc<Job>,
    procs: &mut HashMap<String, ProcInput>,
    m: gw::ExecMessage,
    out: &Out,
) -> std::result::Result<(), Status> {
    use gw::exec_message::Input;
    let pid = m.process_id;
    if pid.is_empty() {
        return Err(Status::invalid_argument("ProcessID required"));
    }
    let not_found = || Status::not_found(format!("IO for process {pid:?} not found"));
    match m.input {
        Some(Input::File(f)) => {
            let p = procs.get_mut(&pid).ok_or_else(not_found)?;
            if f.fd != 0 {
                return Err(Status::out_of_range(format!(
                    "fd {} unavailable to write",
                    f.fd
                )));
            }
            let Some(tx) = &p.stdin else {
                return Err(Status::out_of_range("fd 0 unavailable to write"));
            };
            if !f.data.is_empty() {
                // a process that exited no longer reads: its input is dropped
                let _ = tx.send(f.data).await;
            }
            if f.eof {
                p.stdin = None;
            }
        }
        Some(Input::Resize(r)) => {
            let p = procs.get(&pid).ok_or_else(not_found)?;
            let _ = p
                .resize
                .send(gateway::WinSize {
                    rows: r.rows,
                    cols: r.cols,
                })
                .await;
        }
        Some(Input::Signal(s)) => {
            let p = procs.get(&pid).ok_or_else(not_found)?;
            let sig = signal_number(&s.name)
                .ok_or_else(|| Status::invalid_argument(format!("Unknown signal {}", s.name)))?;
            let _ = p.signal.send(sig).await;
        }
        Some(Input::Init(init)) => {
            if procs.contains_key(&pid) {
                return Err(Status::already_exists(format!(
                    "Process {pid} already exists"
                )));
            }
            let ctr = job
                .containers
                .get(&init.container_id)
                .map_err(|e| Status::from(gateway_error(e)))?;
            let meta = init.meta.unwrap_or_default();
            let (stdin_tx, stdin_rx) = if init.fds.contains(&0) {
                let (t, r) = mpsc::channel(16);
                (Some(t), Some(r))
            } else {
                (None, None)
            };
            let (stdout_tx, stdout_rx) = output_channel(init.fds.contains(&1));
            let (stderr_tx, stderr_rx) = output_channel(init.fds.contains(&2));
            let security = match pb::SecurityMode::try_from(init.security) {
                Ok(pb::SecurityMode::Insecure) => gateway::SecurityMode::Insecure,
                _ => gateway::SecurityMode::Sandbox,
            };
            let req = gateway::StartRequest {
                args: meta.args,
                env: meta.env,
                user: meta.user,
                cwd: meta.cwd,
                tty: init.tty,
                security,
                remove_mount_stubs_recursive: meta.remove_mount_stubs_recursive,
                stdin: stdin_rx,
                stdout: stdout_tx,
                stderr: stderr_tx,
            };
            let proc = ctr
                .start(req)
                .await
                .map_err(|e| Status::from(gateway_error(e)))?;
            let (resize, signal) = proc.controls();
            procs.insert(
                pid.clone(),
                ProcInput {
                    stdin: stdin_tx,
                    resize,
                    signal,
                },
            );
            out.send(Ok(msg(&pid, Input::Started(gw::StartedMessage {}))))
                .await
                .map_err(|_| Status::cancelled("exec stream closed"))?;
            tokio::spawn(report(pid, proc, stdout_rx, stderr_rx, out.clone()));
        }
        _ => {}
    }
    Ok(())
}

fn output_channel(wanted: bool) -> (Option<mpsc::Sender<Bytes>>, Option<mpsc::Receiver<Bytes>>) {
    if wanted {
        let (t, r) = mpsc::channel(16);
        (Some(t), Some(r))
    } else {
        (None, None)
    }
}

/// Sends a process' output, its exit, then `Done`.
async fn report(
    pid: String,
    proc: gateway::Process,
    stdout: Option<mpsc::Receiver<Bytes>>,
    stderr: Option<mpsc::Receiver<Bytes>>,
    out: Out,
) {
    use gw::exec_message::Input;
    let pump = |fd: u32, rx: Option<mpsc::Receiver<Bytes>>| {
        let out = out.clone();
        let pid = pid.clone();
        async move {
            let Some(mut rx) = rx else { return };
            while let Some(data) = rx.recv().await {
                let m = msg(
                    &pid,
                    Input::File(gw::FdMessage {
                        fd,
                        eof: false,
                        data,
                    }),
                );
                if out.send(Ok(m)).await.is_err() {
                    // client gone: keep draining so the process is not blocked
                    while rx.recv().await.is_some() {}
                    return;
                }
            }
            let eof = msg(
                &pid,
                Input::File(gw::FdMessage {
                    fd,
                    eof: true,
                    data: Bytes::new(),
                }),
            );
            let _ = out.send(Ok(eof)).await;
        }
    };
    let exit = async {
        let res = proc.wait().await;
        let exit = match res {
            Ok(()) => gw::ExitMessage {
                code: 0,
                error: None,
            },
            Err(e) => {
                let code = e.code();
                let st = gateway_error(gateway::Error::Process(e)).rpc_status();
                gw::ExitMessage {
                    code,
                    error: Some(st),
                }
            }
        };
        let _ = out.send(Ok(msg(&pid, Input::Exit(exit)))).await;
    };
    tokio::join!(pump(1, stdout), pump(2, stderr), exit);
    let _ = out
        .send(Ok(msg(&pid, Input::Done(gw::DoneMessage {}))))
        .await;
}

/// A signal number from its name as moby's `signal.SignalMap` spells it (`HUP`, `INT`,
/// `KILL`...; `SIG` prefix tolerated).
fn signal_number(name: &str) -> Option<i32> {
    let name = name.strip_prefix("SIG").unwrap_or(name);
    name.parse::<nix::sys::signal::Signal>()
        .ok()
        .or_else(|| format!("SIG{name}").parse().ok())
        .map(|s| s as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names() {
        assert_eq!(signal_number("HUP"), Some(1));
        assert_eq!(signal_number("INT"), Some(2));
        assert_eq!(signal_number("KILL"), Some(9));
        assert_eq!(signal_number("SIGTERM"), Some(15));
        assert_eq!(signal_number("WINCH"), Some(28));
        assert_eq!(signal_number("BOGUS"), None);
    }

    #[test]
    fn process_errors_carry_exit_message() {
        let e = gateway_error(gateway::Error::Process(gateway::ProcessError::Exit {
            code: 137,
            canceled: true,
        }));
        assert_eq!(e.code(), tonic::Code::Cancelled);
        assert_eq!(e.to_string(), "exit code: 137: context canceled");
        let d = e.details();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].type_url, protos::type_urls::GATEWAY_EXIT_MESSAGE);
        assert_eq!(d[0].value, br#"{"Code":137}"#);
        let e = gateway_error(gateway::Error::Process(gateway::ProcessError::Exit {
            code: 99,
            canceled: false,
        }));
        assert_eq!(e.code(), tonic::Code::Unknown);
    }
}
