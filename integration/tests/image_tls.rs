//! berthd's `tcp://` listener with mutual TLS, set up as `deploy/README.md` documents: certificates
//! from `deploy/tls/make-certs.sh`, the listener from buildkitd's flags (`--addr tcp://…
//! --tlscert --tlskey --tlscacert`) or from `buildkitd.toml` (`[grpc] address`, `[grpc.tls]
//! cert/key/ca`). Clients: berth's buildctl (`--tlsdir`, `--tlscacert/--tlscert/--tlskey`) and
//! docker buildx 0.13.1's remote driver (`--driver-opt cacert=…,cert=…,key=…`).
//!
//! Checked: clients with the client certificate get the worker list; a client without a
//! certificate, with one from another CA, or expecting another server name is refused; SIGTERM
//! stops berthd with exit 0 and removes its unix socket.

use integration::buildkit_client::{berthd_binary, buildctl_binary, Berthd};
use integration::{require_root, unique_name};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// berth's buildctl (built with the cargo that runs the tests).
fn buildctl() -> PathBuf {
    buildctl_binary().expect("build berth's buildctl")
}

fn make_certs(dir: &Path) {
    integration::make_certs(dir, &["localhost", "127.0.0.1"]).expect("make certificates");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs buildctl `args` against `addr`; (success, stdout + stderr).
fn client(bin: &Path, addr: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin)
        .arg("--addr")
        .arg(addr)
        .arg("--timeout")
        .arg("10")
        .args(args)
        .output()
        .expect("run buildctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn check_mutual_tls(bin: &Path, addr: &str, certs: &Path, other_ca: &Path) {
    let client_dir = certs.join("client");
    let (ok, text) = client(
        bin,
        addr,
        &["--tlsdir", client_dir.to_str().unwrap(), "debug", "workers"],
    );
    assert!(ok, "buildctl --tlsdir against {addr}: {text}");
    assert!(text.starts_with("ID"), "{text}");
    let (ok, text) = client(
        bin,
        addr,
        &[
            "--tlscacert",
            client_dir.join("ca.pem").to_str().unwrap(),
            "--tlscert",
            client_dir.join("cert.pem").to_str().unwrap(),
            "--tlskey",
            client_dir.join("key.pem").to_str().unwrap(),
            "debug",
            "info",
        ],
    );
    assert!(ok, "buildctl --tlscacert/--tlscert/--tlskey: {text}");
    assert!(text.starts_with("BuildKit: "), "{text}");

    // Refused: no client certificate, a certificate from another CA, another server name.
    let (ok, text) = client(
        bin,
        addr,
        &[
            "--tlscacert",
            client_dir.join("ca.pem").to_str().unwrap(),
            "debug",
            "workers",
        ],
    );
    assert!(!ok, "a client without a certificate was served: {text}");
    let (ok, text) = client(
        bin,
        addr,
        &[
            "--tlscacert",
            client_dir.join("ca.pem").to_str().unwrap(),
            "--tlscert",
            other_ca.join("client/cert.pem").to_str().unwrap(),
            "--tlskey",
            other_ca.join("client/key.pem").to_str().unwrap(),
            "debug",
            "workers",
        ],
    );
    assert!(
        !ok,
        "a client certificate of another CA was accepted: {text}"
    );
    let (ok, text) = client(
        bin,
        addr,
        &[
            "--tlsdir",
            client_dir.to_str().unwrap(),
            "--tlsservername",
            "not-berthd.example",
            "debug",
            "workers",
        ],
    );
    assert!(!ok, "a wrong server name was accepted: {text}");
    // Plain gRPC to a TLS listener does not get through either.
    let (ok, text) = client(bin, addr, &["debug", "workers"]);
    assert!(!ok, "plaintext was served on the TLS listener: {text}");
}

#[test]
fn tcp_listener_with_mutual_tls_from_flags_and_toml() {
    require_root();
    let bin = buildctl();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let other = dir.path().join("other");
    make_certs(&certs);
    make_certs(&other);
    let server = certs.join("server");

    // buildkitd's flags
    let port = free_port();
    let addr = format!("tcp://127.0.0.1:{port}");
    let mut daemon = Berthd::start(&[
        "--addr",
        &addr,
        "--tlscert",
        server.join("cert.pem").to_str().unwrap(),
        "--tlskey",
        server.join("key.pem").to_str().unwrap(),
        "--tlscacert",
        server.join("ca.pem").to_str().unwrap(),
    ])
    .expect("start berthd with a TLS listener");
    std::thread::sleep(Duration::from_millis(200));
    check_mutual_tls(&bin, &addr, &certs, &other);
    // The name in the certificate, as a DNS name.
    let (ok, text) = client(
        &bin,
        &format!("tcp://localhost:{port}"),
        &[
            "--tlsdir",
            certs.join("client").to_str().unwrap(),
            "debug",
            "workers",
        ],
    );
    assert!(ok, "tcp://localhost: {text}");

    // docker buildx 0.13.1's remote driver with the client certificate
    let buildx = Command::new("docker")
        .args(["buildx", "version"])
        .output()
        .expect("run docker buildx version");
    assert!(
        String::from_utf8_lossy(&buildx.stdout).contains(" 0.13.1"),
        "docker buildx 0.13.1 is required (bash .ci/trixie-packages.sh installs it)"
    );
    let builder = unique_name("berth-tls");
    let client_dir = certs.join("client");
    let opts = format!(
        "cacert={},cert={},key={}",
        client_dir.join("ca.pem").display(),
        client_dir.join("cert.pem").display(),
        client_dir.join("key.pem").display()
    );
    let created = Command::new("docker")
        .args(["buildx", "create", "--name", &builder, "--driver", "remote"])
        .args(["--driver-opt", &opts, &addr])
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "buildx create: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    let inspect = Command::new("docker")
        .args(["buildx", "inspect", "--bootstrap", &builder])
        .output()
        .unwrap();
    let _ = Command::new("docker")
        .args(["buildx", "rm", &builder])
        .output();
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        inspect.status.success() && text.contains("Status:           running"),
        "buildx inspect over mutual TLS: {text}{}",
        String::from_utf8_lossy(&inspect.stderr)
    );

    // SIGTERM: exit 0, unix socket removed.
    let socket = daemon.socket().to_path_buf();
    let st = daemon
        .terminate(Duration::from_secs(15))
        .expect("terminate berthd");
    assert!(st.success(), "berthd exited with {st} on SIGTERM");
    assert!(!socket.exists(), "{} left behind", socket.display());

    // The same listener from buildkitd.toml keys (the flags' --addr would override
    // `[grpc] address`, so berthd is started here with the config file only).
    let port = free_port();
    let addr = format!("tcp://127.0.0.1:{port}");
    let socket = dir.path().join("toml.sock");
    let toml = dir.path().join("buildkitd.toml");
    std::fs::write(
        &toml,
        format!(
            "root = \"{}\"\n\n[grpc]\naddress = [\"unix://{}\", \"{addr}\"]\n\n\
             [grpc.tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
            dir.path().join("toml-root").display(),
            socket.display(),
            server.join("cert.pem").display(),
            server.join("key.pem").display(),
            server.join("ca.pem").display()
        ),
    )
    .unwrap();
    let log = dir.path().join("toml.log");
    let mut child = Command::new(berthd_binary().expect("berthd binary"))
        .arg("--config")
        .arg(&toml)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start berthd with buildkitd.toml");
    let started = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "berthd exited ({st}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "berthd did not listen: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    check_mutual_tls(&bin, &addr, &certs, &other);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let stopping = std::time::Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if stopping.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("berthd did not exit within 15 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success(), "berthd exited with {st} on SIGTERM");
    assert!(!socket.exists(), "{} left behind", socket.display());
}
