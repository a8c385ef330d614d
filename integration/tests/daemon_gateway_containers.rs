//! Gateway containers through berthd's LLBBridge (`NewContainer`, `ExecProcess`,
//! `ReleaseContainer`) with real runc: piped stdin/stdout between processes, exit codes and
//! buildkitd's wording, a TTY with resizes, signals to the first and to an exec'd process,
//! exec'd processes killed with the first one, release killing what runs, and containers
//! released when the build ends. The upstream client tests `TestClientGatewayContainer*` are
//! the specification; they cannot run in CI, this test can.

use integration::buildkit_client::{new_id, with_build_id, Attachables, Berthd};
use integration::{busybox_image, require_root, DockerEngine};
use protos::moby::buildkit::v1 as control;
use protos::moby::buildkit::v1::frontend as gw;
use protos::pb;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use gw::exec_message::Input;

/// One `ExecProcess` stream, its responses routed by process id.
struct Exec {
    tx: mpsc::Sender<gw::ExecMessage>,
    routes: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<gw::ExecMessage>>>>,
    errors: Arc<Mutex<Vec<tonic::Status>>>,
}

/// What a process produced.
#[derive(Debug, Default)]
struct Outcome {
    stdout: Vec<u8>,
    exit: Option<gw::ExitMessage>,
    done: bool,
}

impl Exec {
    async fn open(
        g: &mut gw::llb_bridge_client::LlbBridgeClient<tonic::transport::Channel>,
        build: &str,
    ) -> Exec {
        let (tx, rx) = mpsc::channel(64);
        let resp = g
            .exec_process(with_build_id(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                build,
            ))
            .await
            .unwrap();
        let mut inbound = resp.into_inner();
        let routes: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<gw::ExecMessage>>>> =
            Default::default();
        let errors: Arc<Mutex<Vec<tonic::Status>>> = Default::default();
        let (r, e) = (routes.clone(), errors.clone());
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(m)) => {
                        if let Some(t) = r.lock().unwrap().get(&m.process_id) {
                            let _ = t.send(m);
                        }
                    }
                    Ok(None) => return,
                    Err(st) => {
                        e.lock().unwrap().push(st);
                        return;
                    }
                }
            }
        });
        Exec { tx, routes, errors }
    }

    /// Starts a process and waits for `Started`; returns its message receiver.
    async fn start(
        &self,
        container: &str,
        pid: &str,
        meta: pb::Meta,
        tty: bool,
        fds: &[u32],
    ) -> mpsc::UnboundedReceiver<gw::ExecMessage> {
        let (t, mut r) = mpsc::unbounded_channel();
        self.routes.lock().unwrap().insert(pid.to_string(), t);
        self.send(
            pid,
            Input::Init(gw::InitMessage {
                container_id: container.to_string(),
                meta: Some(meta),
                fds: fds.to_vec(),
                tty,
                ..Default::default()
            }),
        )
        .await;
        let m = tokio::time::timeout(Duration::from_secs(20), r.recv())
            .await
            .expect("Started in time")
            .unwrap_or_else(|| panic!("no Started for {pid}: {:?}", self.errors.lock().unwrap()));
        assert!(
            matches!(m.input, Some(Input::Started(_))),
            "first message of {pid}: {m:?}"
        );
        r
    }

    async fn send(&self, pid: &str, input: Input) {
        self.tx
            .send(gw::ExecMessage {
                process_id: pid.to_string(),
                input: Some(input),
            })
            .await
            .unwrap();
    }

    async fn stdin(&self, pid: &str, data: &[u8], eof: bool) {
        self.send(
            pid,
            Input::File(gw::FdMessage {
                fd: 0,
                eof,
                data: data.to_vec().into(),
            }),
        )
        .await;
    }
}

fn args(a: &[&str]) -> pb::Meta {
    pb::Meta {
        args: a.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Reads a process' messages until `Done` (bounded by `limit`).
async fn finish(r: &mut mpsc::UnboundedReceiver<gw::ExecMessage>, limit: Duration) -> Outcome {
    let mut o = Outcome::default();
    let deadline = tokio::time::Instant::now() + limit;
    while !o.done {
        let m = tokio::time::timeout_at(deadline, r.recv())
            .await
            .unwrap_or_else(|_| panic!("process did not finish in {limit:?}: {o:?}"))
            .expect("stream open until Done");
        match m.input {
            Some(Input::File(f)) => o.stdout.extend_from_slice(&f.data),
            Some(Input::Exit(e)) => o.exit = Some(e),
            Some(Input::Done(_)) => {
                assert!(o.exit.is_some(), "Done before Exit");
                o.done = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    o
}

/// Sends `cmd` to a terminal until its output shows `want` (as upstream's `SendExpect`: the
/// size runc gives the container's terminal may arrive after the shell's first read).
async fn send_expect(
    ex: &Exec,
    pid: &str,
    r: &mut mpsc::UnboundedReceiver<gw::ExecMessage>,
    cmd: &str,
    want: &str,
) -> String {
    let mut seen = String::new();
    for _ in 0..30 {
        ex.stdin(pid, format!("{cmd}\n").as_bytes(), false).await;
        let until = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(m) = tokio::time::timeout_at(until, r.recv()).await {
            match m.expect("process still reporting").input {
                Some(Input::File(f)) => seen.push_str(&String::from_utf8_lossy(&f.data)),
                other => panic!("unexpected {other:?} waiting for {want:?}; output {seen:?}"),
            }
            if seen.contains(want) {
                return seen;
            }
        }
    }
    panic!("no {want:?} in terminal output: {seen:?}");
}

fn exit_detail_code(e: &gw::ExitMessage) -> Option<u64> {
    let st = e.error.as_ref()?;
    let d = st
        .details
        .iter()
        .find(|d| d.type_url == protos::type_urls::GATEWAY_EXIT_MESSAGE)?;
    serde_json::from_slice::<serde_json::Value>(&d.value).ok()?["Code"].as_u64()
}

fn runc_containers(root: &std::path::Path) -> String {
    let out = std::process::Command::new("runc")
        .arg("--root")
        .arg(root.join("worker/executor/runc"))
        .args(["list", "-q"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "runc list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_processes_and_release() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let image = busybox_image(&engine).await.unwrap();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let mut session = c.open_session(Attachables::default()).await.unwrap();
    let build = new_id();
    let mut ctl = c.control();
    let (sid, br) = (session.id.clone(), build.clone());
    let solve = tokio::spawn(async move {
        ctl.solve(control::SolveRequest {
            r#ref: br,
            session: sid,
            ..Default::default()
        })
        .await
    });
    let mut g = c.gateway();
    let pong = g
        .ping(with_build_id(gw::PingRequest {}, &build))
        .await
        .unwrap()
        .into_inner();
    for cap in [
        "gateway.exec",
        "gateway.exec.extrahosts",
        "gateway.exec.signals",
    ] {
        assert!(
            pong.frontend_api_caps.iter().any(|c| c.id == cap),
            "cap {cap} advertised"
        );
    }
    let def = llb::State::from(llb::image(image.reference()))
        .marshal()
        .unwrap();
    let res = g
        .solve(with_build_id(
            gw::SolveRequest {
                definition: Some(def),
                allow_result_return: true,
                allow_result_array_ref: true,
                ..Default::default()
            },
            &build,
        ))
        .await
        .unwrap()
        .into_inner();
    let Some(gw::result::Result::Ref(rootfs)) = res.result.and_then(|r| r.result) else {
        panic!("expected a ref");
    };
    let new_container = |id: &str, extra: Vec<pb::Mount>| gw::NewContainerRequest {
        container_id: id.to_string(),
        mounts: [
            vec![pb::Mount {
                dest: "/".into(),
                mount_type: pb::MountType::Bind as i32,
                result_id: rootfs.id.clone(),
                ..Default::default()
            }],
            extra,
        ]
        .concat(),
        extra_hosts: vec![pb::HostIp {
            host: "some.host".into(),
            ip: "169.254.11.22".into(),
        }],
        ..Default::default()
    };
    g.new_container(with_build_id(
        new_container(
            "c1",
            vec![pb::Mount {
                dest: "/tmpfs".into(),
                mount_type: pb::MountType::Tmpfs as i32,
                ..Default::default()
            }],
        ),
        &build,
    ))
    .await
    .unwrap();
    let dup = g
        .new_container(with_build_id(new_container("c1", vec![]), &build))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), tonic::Code::AlreadyExists, "{dup:?}");
    assert_eq!(dup.message(), "Container c1 already exists");

    let ex = Exec::open(&mut g, &build).await;
    // the first process runs the container; the others exec into it
    let mut pid1 = ex
        .start("c1", "c1:p1", args(&["sleep", "30"]), false, &[])
        .await;

    // `echo testing | cat | cat > /tmp/test && cat /tmp/test`, as upstream's ExecPipe
    let mut p2 = ex
        .start("c1", "c1:p2", args(&["cat"]), false, &[0, 1])
        .await;
    let mut p3 = ex
        .start(
            "c1",
            "c1:p3",
            args(&["sh", "-c", "cat > /tmp/test"]),
            false,
            &[0],
        )
        .await;
    ex.stdin("c1:p2", b"testing", true).await;
    let o2 = finish(&mut p2, Duration::from_secs(20)).await;
    assert_eq!(o2.exit.as_ref().unwrap().code, 0, "{o2:?}");
    ex.stdin("c1:p3", &o2.stdout, true).await;
    let o3 = finish(&mut p3, Duration::from_secs(20)).await;
    assert_eq!(o3.exit.unwrap().code, 0);
    let mut p4 = ex
        .start("c1", "c1:p4", args(&["cat", "/tmp/test"]), false, &[1])
        .await;
    let o4 = finish(&mut p4, Duration::from_secs(20)).await;
    assert_eq!(String::from_utf8_lossy(&o4.stdout), "testing");

    // default PATH, extra hosts, the tmpfs mount and the working directory
    let mut p = ex
        .start(
            "c1",
            "c1:env",
            args(&[
                "sh",
                "-c",
                "echo -n $PATH; grep -q '169.254.11.22\tsome.host' /etc/hosts && test -w /tmpfs && pwd",
            ]),
            false,
            &[1],
        )
        .await;
    let o = finish(&mut p, Duration::from_secs(20)).await;
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin/\n"
    );

    // a non-zero exit: code, buildkitd's wording, ExitMessage detail
    let mut p = ex
        .start("c1", "c1:fail", args(&["sh", "-c", "exit 99"]), false, &[])
        .await;
    let o = finish(&mut p, Duration::from_secs(20)).await;
    let exit = o.exit.unwrap();
    assert_eq!(exit.code, 99);
    let st = exit.error.as_ref().expect("status for a non-zero exit");
    assert_eq!(st.message, "exit code: 99");
    assert_eq!(st.code, tonic::Code::Unknown as i32);
    assert_eq!(exit_detail_code(&exit), Some(99));

    // a TTY: resizes reach the process, its exit code comes back
    let mut meta = args(&["sh"]);
    meta.env = vec!["PS1=% ".into()];
    let mut tty = ex.start("c1", "c1:tty", meta, true, &[0, 1, 2]).await;
    ex.send(
        "c1:tty",
        Input::Resize(gw::ResizeMessage { rows: 40, cols: 80 }),
    )
    .await;
    send_expect(&ex, "c1:tty", &mut tty, "stty size", "40 80").await;
    send_expect(&ex, "c1:tty", &mut tty, "echo TERM=$TERM", "TERM=xterm").await;
    ex.send(
        "c1:tty",
        Input::Resize(gw::ResizeMessage {
            rows: 60,
            cols: 100,
        }),
    )
    .await;
    send_expect(&ex, "c1:tty", &mut tty, "stty size", "60 100").await;
    ex.stdin("c1:tty", b"exit 7\n", false).await;
    let o = finish(&mut tty, Duration::from_secs(20)).await;
    assert_eq!(o.exit.unwrap().code, 7);

    // a signal to an exec'd process
    let mut sig = ex
        .start(
            "c1",
            "c1:sig",
            args(&[
                "sh",
                "-c",
                "trap 'kill $(jobs -p); exit 111' INT; sleep 10 & wait",
            ]),
            false,
            &[],
        )
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    ex.send(
        "c1:sig",
        Input::Signal(gw::SignalMessage { name: "INT".into() }),
    )
    .await;
    let o = finish(&mut sig, Duration::from_secs(8)).await;
    assert_eq!(o.exit.unwrap().code, 111);

    // release kills the first process: "exit code: 137: context canceled", and says so
    let started = Instant::now();
    let rel = g
        .release_container(with_build_id(
            gw::ReleaseContainerRequest {
                container_id: "c1".into(),
            },
            &build,
        ))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(rel.code(), tonic::Code::Unknown, "{rel:?}");
    let o = finish(&mut pid1, Duration::from_secs(10)).await;
    let exit = o.exit.unwrap();
    assert_eq!(exit.code, 137);
    let st = exit.error.unwrap();
    assert_eq!(st.message, "exit code: 137: context canceled");
    assert_eq!(st.code, tonic::Code::Cancelled as i32);
    // the first error in completion order is the failed `exit 99`
    assert_eq!(rel.message(), "exit code: 99");
    let gone = g
        .release_container(with_build_id(
            gw::ReleaseContainerRequest {
                container_id: "c1".into(),
            },
            &build,
        ))
        .await
        .unwrap_err();
    assert_eq!(gone.message(), "container details for c1 not found");

    // a signal to the first process; then exec'd processes die with the first one (137)
    g.new_container(with_build_id(new_container("c2", vec![]), &build))
        .await
        .unwrap();
    let mut p1 = ex
        .start(
            "c2",
            "c2:p1",
            args(&[
                "sh",
                "-c",
                "trap 'kill $(jobs -p); exit 99' HUP; sleep 10 & wait",
            ]),
            false,
            &[],
        )
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    ex.send(
        "c2:p1",
        Input::Signal(gw::SignalMessage { name: "HUP".into() }),
    )
    .await;
    assert_eq!(
        finish(&mut p1, Duration::from_secs(8))
            .await
            .exit
            .unwrap()
            .code,
        99
    );
    g.new_container(with_build_id(new_container("c3", vec![]), &build))
        .await
        .unwrap();
    let started = Instant::now();
    let mut p1 = ex
        .start("c3", "c3:p1", args(&["sleep", "1"]), false, &[])
        .await;
    let mut p2 = ex
        .start("c3", "c3:p2", args(&["sleep", "10"]), false, &[])
        .await;
    let o = finish(&mut p2, Duration::from_secs(9)).await;
    let exit = o.exit.unwrap();
    assert_eq!(exit.code, 137, "{exit:?}");
    assert_eq!(exit.error.unwrap().message, "exit code: 137");
    assert!(started.elapsed() > Duration::from_secs(1));
    assert_eq!(
        finish(&mut p1, Duration::from_secs(5))
            .await
            .exit
            .unwrap()
            .code,
        0
    );
    // exec into a container whose first process is gone fails, with a status
    let mut late = ex.start("c3", "c3:late", args(&["true"]), false, &[]).await;
    let exit = finish(&mut late, Duration::from_secs(5))
        .await
        .exit
        .unwrap();
    assert_eq!(exit.code, 255, "{exit:?}");
    assert!(
        exit.error.unwrap().message.contains("is not running"),
        "wording"
    );
    // unknown container and unknown process
    let ghost = ex.start_err("ghost", "g:1").await;
    assert_eq!(ghost.code(), tonic::Code::NotFound, "{ghost:?}");

    // a container left running goes with the build, which does not wait for its process
    let mut g2 = c.gateway();
    g2.new_container(with_build_id(new_container("c4", vec![]), &build))
        .await
        .unwrap();
    let ex2 = Exec::open(&mut g2, &build).await;
    let mut long = ex2
        .start("c4", "c4:p1", args(&["sleep", "60"]), false, &[])
        .await;
    // runc creates the container shortly after it was started
    let deadline = Instant::now() + Duration::from_secs(10);
    while runc_containers(d.root()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "container c4 never appeared in runc"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    g.r#return(with_build_id(gw::ReturnRequest::default(), &build))
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(20), solve)
        .await
        .unwrap()
        .unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
    let o = finish(&mut long, Duration::from_secs(10)).await;
    assert_eq!(o.exit.unwrap().code, 137);
    assert_eq!(runc_containers(d.root()), "", "no container left in runc");
    assert!(session.close(Duration::from_secs(5)).await);
    drop(image);
}

impl Exec {
    /// Sends an Init for a container that does not exist: the stream ends with that error.
    async fn start_err(&self, container: &str, pid: &str) -> tonic::Status {
        self.send(
            pid,
            Input::Init(gw::InitMessage {
                container_id: container.to_string(),
                meta: Some(args(&["true"])),
                ..Default::default()
            }),
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(e) = self.errors.lock().unwrap().first() {
                return e.clone();
            }
            assert!(Instant::now() < deadline, "stream did not fail");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
