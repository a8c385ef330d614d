//! The berth image as `deploy/README.md` deploys it: built with `make image`, started with the
//! documented `docker run` recipe against the system dockerd, and driven the way users drive a
//! buildkitd container:
//!
//! - docker buildx 0.13.1's `remote` driver on `docker-container://NAME` (buildx execs `buildctl
//!   dial-stdio` in the container): `buildx inspect --bootstrap` and `buildx du`;
//! - `buildctl build` with LLB on stdin inside the container (`docker exec`) and outside it
//!   (berth's buildctl through `docker-container://NAME`, with a `--local` context), each with a
//!   `type=image` result that then runs in the host's Docker;
//! - envd 1.3.6's `docker-container` builder (`context create`, then `bootstrap`, which connects
//!   and lists workers through `buildctl dial-stdio`);
//! - `docker stop`: exit code 0 well within Docker's grace period, the socket removed from the
//!   container's filesystem, the log readable with `docker logs`.
//!
//! CI cost: `make image IMAGE_PROFILE=dev` packages the debug `berthd`/`buildctl` that `make test`
//! builds anyway (a release build of the image profile costs many minutes on 2 cores); the image
//! is then larger than the release image, whose size `make image` prints and checks.
//!
//! Needs root, runc, the system Docker Engine, docker buildx 0.13.1 (`.ci/trixie-packages.sh`)
//! and envd 1.3.6 in `/var/cache/berth/venv` (`.ci/run`).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use integration::buildkit_client::buildctl_binary;
use integration::{
    busybox_image, require_root, require_tool, unique_name, DockerEngine, TestImage,
};
use llb::{CopyOpts, RunOpts};
use prost::Message as _;

const ENVD: &str = "/var/cache/berth/venv/bin/envd";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ has a parent")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd`; panics with its output unless it succeeds; returns stdout + stderr.
#[track_caller]
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let t = text(&out);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{t}",
        out.status
    );
    t
}

/// Runs `cmd` with `input` on stdin; (success, stdout + stderr).
fn run_with_stdin(cmd: &mut Command, input: &[u8]) -> (bool, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), text(&out))
}

fn docker(args: &[&str]) -> Command {
    let mut c = Command::new("docker");
    c.args(args);
    c
}

/// The `docker run` privileges of deploy/README.md: `--privileged`, or, on a host whose
/// capability bounding set lacks some capabilities (where `--privileged` fails), every
/// capability the host has and the same unconfined security options.
fn privileges() -> Vec<String> {
    const NAMES: &[&str] = &[
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .expect("CapBnd in /proc/self/status");
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let missing: Vec<&str> = (0..=last.min(NAMES.len() as u32 - 1))
        .filter(|i| bnd & (1u64 << i) == 0)
        .map(|i| NAMES[i as usize])
        .collect();
    if missing.is_empty() {
        return vec!["--privileged".into()];
    }
    eprintln!("capability bounding set lacks {missing:?}: --cap-add ALL --cap-drop those instead of --privileged");
    let mut v: Vec<String> = [
        "--cap-add",
        "ALL",
        "--security-opt",
        "seccomp=unconfined",
        "--security-opt",
        "apparmor=unconfined",
        "--security-opt",
        "systempaths=unconfined",
        // Only --privileged makes Docker mount the cgroup hierarchy writable; runc needs it.
        "-v",
        "/sys/fs/cgroup:/sys/fs/cgroup",
    ]
    .map(String::from)
    .to_vec();
    for m in missing {
        v.push("--cap-drop".into());
        v.push(m.into());
    }
    v
}

/// Removes what the test made in Docker, in reverse order, whatever happened.
struct Cleanup(Vec<Vec<String>>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for args in self.0.iter().rev() {
            let _ = Command::new("docker").args(args).output();
        }
    }
}

/// `make image` with the given names; returns the size line it printed.
fn make_image(repo: &str, version: &str) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new("make")
        .arg("image")
        .arg(format!("CARGO={cargo}"))
        .arg(format!("IMAGE={repo}"))
        .arg(format!("VERSION={version}"))
        .arg("IMAGE_PROFILE=dev")
        .arg(format!("TARGET_DIR={}", target_dir().display()))
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .output()
        .expect("run make image");
    let t = text(&out);
    assert!(out.status.success(), "make image failed:\n{t}");
    t.lines()
        .find(|l| l.starts_with(&format!("image {repo}:{version} ")))
        .unwrap_or_else(|| panic!("make image printed no size line:\n{t}"))
        .to_string()
}

/// Seconds since `t`, for the log.
fn took(t: Instant) -> String {
    format!("{:.1}s", t.elapsed().as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_image_deployed_as_documented() {
    require_root();
    require_tool("runc", "runc");
    let buildx = run_ok(&mut docker(&["buildx", "version"]));
    assert!(
        buildx.contains(" v0.13.1") || buildx.contains(" 0.13.1"),
        "docker buildx 0.13.1 is required (bash .ci/trixie-packages.sh installs it): {buildx}"
    );
    let envd = require_tool(
        ENVD,
        "python3-venv (then .ci/run installs envd 1.3.6 with pip)",
    );
    let engine = DockerEngine::system().unwrap();
    let mut cleanup = Cleanup(vec![]);

    // 1. make image (IMAGE/VERSION give the test its own names).
    let t = Instant::now();
    let repo = unique_name("berth-test/berth");
    let version = "0.0.0-test";
    let image = format!("{repo}:{version}");
    cleanup
        .0
        .push(vec!["rmi".into(), "-f".into(), image.clone()]);
    cleanup
        .0
        .push(vec!["rmi".into(), "-f".into(), format!("{repo}:latest")]);
    let size_line = make_image(&repo, version);
    eprintln!("{size_line} ({})", took(t));
    let inspect = run_ok(&mut docker(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Entrypoint}} {{.Size}}",
        &format!("{repo}:latest"),
    ]));
    let (entrypoint, size) = inspect.trim().split_once(' ').unwrap();
    assert_eq!(entrypoint, r#"["buildkitd"]"#, "{inspect}");
    let size: u64 = size.parse().unwrap();
    assert!(
        size_line.contains(&format!("({size} bytes)")),
        "make image printed {size_line:?}, Docker says {size} bytes"
    );
    // What the image holds answers --version: buildkitd (berthd), berth's buildctl, runc.
    for (bin, want) in [
        ("buildkitd", "buildkitd github.com/berth-build/berth v"),
        ("buildctl", "buildctl github.com/berth-build/berth v"),
        ("runc", "runc version"),
    ] {
        let v = run_ok(&mut docker(&[
            "run",
            "--rm",
            "--network",
            "none",
            "--entrypoint",
            bin,
            &image,
            "--version",
        ]));
        assert!(v.starts_with(want), "{bin} --version: {v}");
    }

    // 2. docker run, as deploy/README.md documents it (with the test's own names).
    let name = unique_name("berthd");
    let volume = unique_name("berth-root");
    let data_root = run_ok(&mut docker(&["info", "--format", "{{.DockerRootDir}}"]))
        .trim()
        .to_string();
    cleanup.0.push(vec![
        "volume".into(),
        "rm".into(),
        "-f".into(),
        volume.clone(),
    ]);
    cleanup.0.push(vec!["rm".into(), "-f".into(), name.clone()]);
    let mut run = docker(&["run", "-d", "--name", &name]);
    run.args(privileges())
        .arg("-v")
        .arg("/var/run/docker.sock:/var/run/docker.sock")
        .arg("-v")
        .arg(format!("{data_root}:{data_root}:rslave"))
        .arg("-v")
        .arg(format!("{volume}:/var/lib/berth"))
        .arg(&image)
        .arg("--debug");
    run_ok(&mut run);
    let logs = || run_ok(&mut docker(&["logs", &name]));
    let started = Instant::now();
    loop {
        let l = logs();
        if l.contains("listening") {
            break;
        }
        let state = run_ok(&mut docker(&[
            "inspect",
            "--format",
            "{{.State.Status}}",
            &name,
        ]));
        assert!(state.trim() == "running", "berthd container {state}:\n{l}");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "berthd did not listen within 60 s:\n{l}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The socket is in the container's own filesystem (docker diff lists it).
    let diff = run_ok(&mut docker(&["diff", &name]));
    assert!(
        diff.lines().any(|l| l == "A /run/buildkit/buildkitd.sock"),
        "no socket in docker diff:\n{diff}"
    );

    // 3. docker buildx 0.13.1, remote driver on docker-container://NAME.
    let builder = unique_name("berth-buildx");
    let addr = format!("docker-container://{name}");
    run_ok(&mut docker(&[
        "buildx", "create", "--name", &builder, "--driver", "remote", &addr,
    ]));
    cleanup
        .0
        .push(vec!["buildx".into(), "rm".into(), builder.clone()]);
    let t = Instant::now();
    let inspect = run_ok(&mut docker(&["buildx", "inspect", "--bootstrap", &builder]));
    eprintln!("buildx inspect ({}):\n{inspect}", took(t));
    assert!(inspect.contains("Status:           running"), "{inspect}");
    assert!(
        inspect.contains(&format!("Endpoint:         {addr}")),
        "{inspect}"
    );
    assert!(inspect.contains("BuildKit version: v"), "{inspect}");
    let du = run_ok(&mut docker(&["buildx", "du", "--builder", &builder]));
    assert!(du.contains("Total:"), "buildx du: {du}");

    // 4. buildctl inside the container: LLB on stdin, type=image into the host's Docker.
    let base = busybox_image(&engine).await.unwrap();
    let inside = format!("{}:1", unique_name("berth-test/inside"));
    let def = llb::State::from(llb::image(base.reference()))
        .run(RunOpts::shell("echo built inside > /inside.txt"))
        .root()
        .marshal()
        .unwrap()
        .encode_to_vec();
    let t = Instant::now();
    let (ok, out) = run_with_stdin(
        docker(&[
            "exec",
            "-i",
            &name,
            "buildctl",
            "build",
            "--progress",
            "plain",
        ])
        .arg("--output")
        .arg(format!("type=image,name={inside}")),
        &def,
    );
    assert!(
        ok,
        "buildctl build inside the container:\n{out}\n{}",
        logs()
    );
    eprintln!("build inside the container: {}", took(t));
    let built = TestImage::adopt(&engine, &inside).await.unwrap();
    let ran = engine
        .run(built.reference(), &["cat", "/inside.txt"])
        .await
        .unwrap();
    assert_eq!(ran.assert_success().stdout, "built inside\n");

    // 5. berth's buildctl outside, through docker-container://NAME, with a --local context.
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("hello.txt"), "from the client\n").unwrap();
    let outside = format!("{}:1", unique_name("berth-test/outside"));
    let local: llb::State = llb::local("ctx").into();
    let def = llb::image(base.reference())
        .state()
        .file(llb::copy(
            &local,
            "/hello.txt",
            "/hello.txt",
            CopyOpts::default(),
        ))
        .marshal()
        .unwrap()
        .encode_to_vec();
    let buildctl = buildctl_binary().unwrap();
    let t = Instant::now();
    let (ok, out) = run_with_stdin(
        Command::new(&buildctl)
            .args(["--addr", &addr, "build", "--progress", "plain", "--local"])
            .arg(format!("ctx={}", ctx.path().display()))
            .arg("--output")
            .arg(format!("type=image,name={outside}")),
        &def,
    );
    assert!(ok, "buildctl build through {addr}:\n{out}\n{}", logs());
    eprintln!("build from outside: {}", took(t));
    let built_outside = TestImage::adopt(&engine, &outside).await.unwrap();
    let ran = engine
        .run(built_outside.reference(), &["cat", "/hello.txt"])
        .await
        .unwrap();
    assert_eq!(ran.assert_success().stdout, "from the client\n");

    // 6. envd 1.3.6, docker-container builder on the running container.
    let home = tempfile::tempdir().unwrap();
    let envd_cmd = |args: &[&str]| {
        let mut c = Command::new(&envd);
        c.env("HOME", home.path())
            .env("ENVD_ANALYTICS", "false")
            .args(["--buildkitd-image", &image])
            .args(args);
        c
    };
    run_ok(&mut envd_cmd(&[
        "context",
        "create",
        "--name",
        "berth",
        "--builder",
        "docker-container",
        "--builder-address",
        &name,
        "--use",
    ]));
    // `envd bootstrap`'s buildkit stage connects through docker-container://NAME and waits
    // for ListWorkers (over `buildctl dial-stdio`) to succeed before it prints the address.
    // (envd 1.3.6's `prune` cannot be used: it dereferences a nil buildkit config before it
    // looks for the container.)
    let t = Instant::now();
    let booted = run_ok(&mut envd_cmd(&["bootstrap", "--with-autocomplete=false"]));
    eprintln!("envd bootstrap ({}): {booted}", took(t));
    assert!(
        booted.contains(&format!(
            "The buildkit is running at docker-container://{name}"
        )),
        "envd bootstrap: {booted}"
    );

    // 7. docker stop: SIGTERM, exit 0, socket removed, log readable.
    let t = Instant::now();
    run_ok(&mut docker(&["stop", &name]));
    let stop_took = t.elapsed();
    let state = run_ok(&mut docker(&[
        "inspect",
        "--format",
        "{{.State.Status}} {{.State.ExitCode}} {{.State.OOMKilled}}",
        &name,
    ]));
    assert_eq!(
        state.trim(),
        "exited 0 false",
        "after docker stop:\n{}",
        logs()
    );
    assert!(
        stop_took < Duration::from_secs(9),
        "docker stop took {stop_took:?}: berthd ignored SIGTERM until the 10 s grace period?"
    );
    let diff = run_ok(&mut docker(&["diff", &name]));
    assert!(
        !diff.contains("buildkitd.sock"),
        "socket left behind after docker stop:\n{diff}"
    );
    let l = logs();
    assert!(l.contains("SIGTERM: shutting down"), "{l}");
    assert!(l.contains("berthd stopped"), "{l}");
    drop((built, built_outside, base));
    drop(cleanup);
}
