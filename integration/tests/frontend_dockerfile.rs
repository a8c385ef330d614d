//! `dockerfile.v0` built into berthd, driven as buildx drives it (LLBBridge.Solve with the
//! frontend and its options, result handed back through Return): realistic Dockerfiles
//! (multi-stage with pruning, `.dockerignore` and `<Dockerfile>.dockerignore`, heredocs,
//! `COPY --link`, `RUN --mount` cache/bind/secret/tmpfs, ONBUILD, USER/WORKDIR, ADD of a local
//! archive, build args and labels) land in the system Docker Engine with `--output
//! type=image`; the tests run the images and check their files, config and history. Errors name
//! the Dockerfile line (`errdefs.Source`). Needs root, runc, overlayfs and the system Docker
//! Engine.

use std::collections::BTreeMap;
use std::path::Path;

use integration::buildkit_client::{Berthd, BuildOptions, BuildReport, Output};
use integration::{
    busybox_image, git, require_root, unique_name, BuildxBuilder, DockerEngine, TestImage,
};

fn write(dir: &Path, rel: &str, content: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

/// A `.tar.gz` with `app/one.txt` and `app/sub/two.txt`.
fn archive(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    let gz = flate2_writer(f);
    let mut b = tar::Builder::new(gz);
    for (name, data) in [("app/one.txt", "one\n"), ("app/sub/two.txt", "two\n")] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_bytes()).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap();
}

/// A gzip writer through the system `gzip` (no compression crate in the test deps).
fn flate2_writer(f: std::fs::File) -> GzipPipe {
    let child = std::process::Command::new("gzip")
        .arg("-c")
        .stdin(std::process::Stdio::piped())
        .stdout(f)
        .spawn()
        .expect("run gzip");
    GzipPipe { child }
}

struct GzipPipe {
    child: std::process::Child,
}

impl std::io::Write for GzipPipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.child.stdin.as_mut().unwrap().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.child.stdin.as_mut().unwrap().flush()
    }
}

impl GzipPipe {
    fn finish(mut self) -> std::io::Result<()> {
        drop(self.child.stdin.take());
        let st = self.child.wait()?;
        assert!(st.success(), "gzip failed");
        Ok(())
    }
}

async fn build_dockerfile(
    berthd: &Berthd,
    dir: &Path,
    attrs: &[(&str, &str)],
    image: &str,
    secrets: BTreeMap<String, Vec<u8>>,
) -> BuildReport {
    let client = berthd.client().await.unwrap();
    let mut locals = BTreeMap::new();
    locals.insert("context".to_string(), dir.to_path_buf());
    locals.insert("dockerfile".to_string(), dir.to_path_buf());
    let mut out = BTreeMap::new();
    out.insert("name".to_string(), image.to_string());
    client
        .build(BuildOptions {
            frontend: Some("dockerfile.v0".into()),
            frontend_attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            locals,
            secrets,
            output: Output::Raw("image".into(), out),
            ..Default::default()
        })
        .await
        .unwrap()
}

fn ok(report: &BuildReport, berthd: &Berthd) {
    if let Err(e) = &report.solve {
        panic!("solve failed: {e:?}\n{}", berthd.log_text());
    }
}

async fn config(engine: &DockerEngine, image: &str) -> serde_json::Value {
    let i = engine.inspect_image(image).await.unwrap();
    serde_json::to_value(i.config.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realistic_dockerfiles_build_into_docker() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let tmp = tempfile::tempdir().unwrap();

    // 1. a base with ONBUILD triggers, a WORKDIR and a USER
    let onb_dir = tmp.path().join("onbuild");
    write(
        &onb_dir,
        "Dockerfile",
        &format!(
            "FROM {}\nWORKDIR /srv\nONBUILD COPY trigger.txt ./\nONBUILD RUN cat trigger.txt > /srv/ran\n",
            base.reference()
        ),
    );
    let onb_image = format!("{}:1", unique_name("berth-test/df-onbuild"));
    let r = build_dockerfile(&berthd, &onb_dir, &[], &onb_image, BTreeMap::new()).await;
    ok(&r, &berthd);
    let _onb = TestImage::adopt(&engine, &onb_image).await.unwrap();
    let c = config(&engine, &onb_image).await;
    assert_eq!(
        c["OnBuild"],
        serde_json::json!(["COPY trigger.txt ./", "RUN cat trigger.txt > /srv/ran"])
    );
    assert_eq!(c["WorkingDir"], "/srv");

    // 2. the realistic one
    let dir = tmp.path().join("app");
    write(&dir, "trigger.txt", "triggered\n");
    write(&dir, "src/main.txt", "main\n");
    write(&dir, "src/secret.key", "must not be sent\n");
    write(&dir, "ignored-by-default/x", "x\n");
    write(&dir, ".dockerignore", "ignored-by-default\n");
    write(&dir, "Dockerfile.dockerignore", "src/*.key\n");
    archive(&dir.join("bundle.tar.gz"));
    let dockerfile = format!(
        r#"# syntax=docker/dockerfile:1.5
ARG GREETING=hello
FROM {base} AS build
ARG GREETING
WORKDIR /work
COPY src/ ./src/
RUN --mount=type=cache,target=/cache,id=df-test \
    echo "$GREETING" > /work/greeting && ls /cache > /dev/null && date > /cache/stamp
RUN --mount=type=secret,id=token,required=true cat /run/secrets/token > /work/token-copy
RUN --mount=type=tmpfs,target=/scratch touch /scratch/x && ! test -e /work/x
RUN <<EOF
set -e
echo heredoc-one > /work/heredoc
echo heredoc-two >> /work/heredoc
EOF

FROM {base} AS unused
RUN exit 1

FROM {onb} AS final
ARG GREETING
USER 1000:1000
WORKDIR /home/user/app
COPY --link --from=build /work/greeting /work/heredoc ./
COPY --from=build /work/src /home/user/app/src
COPY --chown=1000:1000 --chmod=640 <<conf.txt /etc/conf.txt
value=${{GREETING:-none}}
conf.txt
ADD bundle.tar.gz /opt/
RUN --mount=type=bind,from=build,source=/work,target=/b cat /b/greeting > /tmp/via-bind
ENV MODE=prod
LABEL org.example.name="berth test" stage=final
EXPOSE 8080/tcp 53/udp
VOLUME /data
STOPSIGNAL SIGINT
HEALTHCHECK --interval=30s CMD test -e /srv/ran
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["cat /home/user/app/greeting"]
"#,
        base = base.reference(),
        onb = onb_image,
    );
    write(&dir, "Dockerfile", &dockerfile);
    let image = format!("{}:1", unique_name("berth-test/df-realistic"));
    let mut secrets = BTreeMap::new();
    secrets.insert("token".to_string(), b"s3cret".to_vec());
    let r = build_dockerfile(
        &berthd,
        &dir,
        &[("build-arg:GREETING", "bonjour"), ("label:extra", "yes")],
        &image,
        secrets,
    )
    .await;
    ok(&r, &berthd);
    let _img = TestImage::adopt(&engine, &image).await.unwrap();

    // the unused stage never ran
    let names: Vec<String> = r.vertices().values().map(|v| v.name.clone()).collect();
    assert!(!names.iter().any(|n| n.contains("exit 1")), "{names:?}");
    assert!(
        names.iter().any(|n| n == "[build 2/7] WORKDIR /work"),
        "{names:?}"
    );

    let out = engine
        .run(
            &image,
            &["cat /home/user/app/greeting /home/user/app/heredoc /tmp/via-bind /etc/conf.txt /opt/app/one.txt /opt/app/sub/two.txt /srv/ran /srv/trigger.txt; ls /home/user/app/src; stat -c '%u:%g %a' /etc/conf.txt; id -u; pwd; test -e /home/user/app/src/secret.key || echo no-key"],
        )
        .await
        .unwrap();
    out.assert_success();
    assert_eq!(
        out.stdout.trim_end(),
        "bonjour\nheredoc-one\nheredoc-two\nbonjour\nvalue=bonjour\none\ntwo\ntriggered\ntriggered\nmain.txt\n1000:1000 640\n1000\n/home/user/app\nno-key"
    );
    let c = config(&engine, &image).await;
    assert_eq!(c["User"], "1000:1000");
    assert_eq!(c["WorkingDir"], "/home/user/app");
    assert_eq!(c["Entrypoint"], serde_json::json!(["/bin/sh", "-c"]));
    assert_eq!(c["Cmd"], serde_json::json!(["cat /home/user/app/greeting"]));
    assert_eq!(c["StopSignal"], "SIGINT");
    assert_eq!(c["OnBuild"], serde_json::Value::Null);
    assert!(c["Env"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("MODE=prod")));
    assert_eq!(c["Labels"]["org.example.name"], "berth test");
    assert_eq!(c["Labels"]["extra"], "yes");
    assert_eq!(
        c["ExposedPorts"],
        serde_json::json!({"53/udp": {}, "8080/tcp": {}})
    );
    assert_eq!(
        c["Healthcheck"]["Test"],
        serde_json::json!(["CMD-SHELL", "test -e /srv/ran"])
    );
    let hist = engine.client().image_history(&image).await.unwrap();
    let created_by: Vec<String> = hist.iter().rev().map(|h| h.created_by.clone()).collect();
    for want in [
        "WORKDIR /srv",
        "COPY trigger.txt ./ # buildkit",
        "RUN /bin/sh -c cat trigger.txt > /srv/ran # buildkit",
        "USER 1000:1000",
        "COPY /work/greeting /work/heredoc ./ # buildkit",
        "ADD bundle.tar.gz /opt/ # buildkit",
        "ENV MODE=prod",
        r#"ENTRYPOINT ["/bin/sh" "-c"]"#,
    ] {
        assert!(
            created_by.iter().any(|c| c == want),
            "{want:?} not in {created_by:#?}"
        );
    }

    // a rebuild is fully cached
    let mut secrets = BTreeMap::new();
    secrets.insert("token".to_string(), b"s3cret".to_vec());
    let r2 = build_dockerfile(
        &berthd,
        &dir,
        &[("build-arg:GREETING", "bonjour"), ("label:extra", "yes")],
        &image,
        secrets,
    )
    .await;
    ok(&r2, &berthd);
    let uncached: Vec<String> = r2
        .vertices()
        .values()
        .filter(|v| !v.cached && v.name.contains("RUN"))
        .map(|v| v.name.clone())
        .collect();
    assert!(uncached.is_empty(), "re-ran {uncached:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_dockerfile_line() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            format!("FROM {}\nRUN true\nRUN exit 3\n", base.reference()),
            3,
            "did not complete successfully: exit code: 3",
        ),
        (
            format!("FROM {}\nNOPE x\n", base.reference()),
            2,
            "unknown instruction: NOPE",
        ),
        (
            "FROM berth-test/does-not-exist:nope\n".to_string(),
            1,
            "berth-test/does-not-exist:nope",
        ),
        (
            format!("FROM {}\nCOPY missing.txt /\n", base.reference()),
            2,
            "missing.txt",
        ),
    ];
    for (df, line, text) in cases {
        write(tmp.path(), "Dockerfile", &df);
        let image = format!("{}:1", unique_name("berth-test/df-error"));
        let r = build_dockerfile(&berthd, tmp.path(), &[], &image, BTreeMap::new()).await;
        let err = r.solve.as_ref().expect_err("build must fail");
        assert!(err.message().contains(text), "{df}: {}", err.message());
        let details = <protos::google::rpc::Status as prost::Message>::decode(err.details())
            .unwrap_or_else(|e| panic!("{df}: no details ({e}): {err:?}"));
        use protos::details::JsonDetail as _;
        let s = details
            .details
            .iter()
            .find_map(|d| protos::errdefs::Source::from_any(d).ok())
            .unwrap_or_else(|| panic!("{df}: no errdefs.Source in {:?}", details.details));
        assert_eq!(s.info.as_ref().unwrap().filename, "Dockerfile");
        assert_eq!(
            s.ranges[0].start.as_ref().unwrap().line,
            line,
            "{df}: {:?}",
            s.ranges
        );
        assert!(!engine.image_exists(&image).await.unwrap());
    }
}

/// `docker buildx build` (0.13.1, remote driver on berthd's unix socket): `--load` (type=docker
/// streamed to the client, loaded by the CLI) and `--output type=image` (straight into the
/// Engine berthd is bound to), with a build arg and a target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buildx_load_and_image_output() {
    use std::process::Command;
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let version = Command::new("docker")
        .args(["buildx", "version"])
        .output()
        .expect("run docker buildx version");
    assert!(
        String::from_utf8_lossy(&version.stdout).contains(" 0.13.1"),
        "docker buildx 0.13.1 is required (bash .ci/trixie-packages.sh installs it)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ctx");
    write(
        &dir,
        "Dockerfile",
        &format!(
            "FROM {} AS base\nARG WHO=nobody\nRUN echo \"hi $WHO\" > /hi\n\nFROM base AS other\nRUN exit 1\n\nFROM base AS final\nCMD [\"cat\", \"/hi\"]\n",
            base.reference()
        ),
    );
    let builder = BuildxBuilder::create("berth-df", berthd.socket());
    for (i, output) in ["--load", "--output=type=image,name={NAME}"]
        .iter()
        .enumerate()
    {
        let name = format!("{}:{i}", unique_name("berth-test/df-buildx"));
        let out = Command::new("docker")
            .args([
                "buildx",
                "build",
                "--builder",
                builder.name(),
                "--progress",
                "plain",
            ])
            .args(["--build-arg", "WHO=buildx", "--target", "final"])
            .arg(output.replace("{NAME}", &name))
            .args(if i == 0 {
                vec!["-t", name.as_str()]
            } else {
                vec![]
            })
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "buildx build {output}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            berthd.log_text()
        );
        let _img = TestImage::adopt(&engine, &name).await.unwrap();
        let run = engine.run(&name, &[]).await.unwrap();
        run.assert_success();
        assert_eq!(run.stdout.trim_end(), "hi buildx");
    }
}

/// Named contexts (`context:NAME=…`): an image name that exists nowhere is mapped to an image
/// of the Engine (`docker-image://`), a stage is replaced by a client directory (`local:`, its
/// `.dockerignore` applied) and none of that stage's instructions run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_contexts_replace_images_and_stages() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let tmp = tempfile::tempdir().unwrap();

    // an image with a marker, to be used under a name nothing else knows
    let src_dir = tmp.path().join("src");
    write(
        &src_dir,
        "Dockerfile",
        &format!(
            "FROM {}\nRUN echo named-image > /marker\n",
            base.reference()
        ),
    );
    let src_image = format!("{}:1", unique_name("berth-test/df-named-src"));
    let r = build_dockerfile(&berthd, &src_dir, &[], &src_image, BTreeMap::new()).await;
    ok(&r, &berthd);
    let _src = TestImage::adopt(&engine, &src_image).await.unwrap();

    let dir = tmp.path().join("app");
    write(
        &dir,
        "Dockerfile",
        "FROM berth-named-nowhere AS img\nRUN cat /marker > /from-img\n\nFROM berth-named-nowhere AS files\nRUN exit 1\n\nFROM berth-named-nowhere\nCOPY --from=img /from-img /\nCOPY --from=files /o* /extra/\n",
    );
    let extra = tmp.path().join("extra");
    write(&extra, "out", "dummy-result\n");
    write(&extra, "out2", "ignored\n");
    write(&extra, ".dockerignore", "out2\n");
    let image = format!("{}:1", unique_name("berth-test/df-named"));
    let client = berthd.client().await.unwrap();
    let mut locals = BTreeMap::new();
    locals.insert("context".to_string(), dir.clone());
    locals.insert("dockerfile".to_string(), dir.clone());
    locals.insert("extradir".to_string(), extra.clone());
    let mut out = BTreeMap::new();
    out.insert("name".to_string(), image.clone());
    let attrs: BTreeMap<String, String> = [
        (
            "context:berth-named-nowhere".to_string(),
            format!("docker-image://{src_image}"),
        ),
        ("context:files".to_string(), "local:extradir".to_string()),
    ]
    .into_iter()
    .collect();
    let r = client
        .build(BuildOptions {
            frontend: Some("dockerfile.v0".into()),
            frontend_attrs: attrs,
            locals,
            output: Output::Raw("image".into(), out),
            ..Default::default()
        })
        .await
        .unwrap();
    ok(&r, &berthd);
    let _img = TestImage::adopt(&engine, &image).await.unwrap();
    let names: Vec<String> = r.vertices().values().map(|v| v.name.clone()).collect();
    assert!(!names.iter().any(|n| n.contains("exit 1")), "{names:?}");
    assert!(
        names
            .iter()
            .any(|n| n == "[context files] load from client"),
        "{names:?}"
    );
    let run = engine
        .run(
            &image,
            &[
                "sh",
                "-c",
                "cat /marker /from-img /extra/out; test -e /extra/out2 || echo no-out2",
            ],
        )
        .await
        .unwrap();
    run.assert_success();
    assert_eq!(
        run.stdout.trim_end(),
        "named-image\nnamed-image\ndummy-result\nno-out2"
    );
}

/// A static file server over `root` (what buildkitd's remote contexts meet in the field: a dumb
/// git HTTP server, an archive or a Dockerfile behind a URL). Records every path asked for.
struct StaticServer {
    url: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl StaticServer {
    async fn start(root: &Path) -> StaticServer {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (root, seen2) = (root.to_path_buf(), seen.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let (root, seen) = (root.clone(), seen2.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match c.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let target = head.split(' ').nth(1).unwrap_or("/");
                    let path = target.split('?').next().unwrap_or("/").to_string();
                    seen.lock().unwrap().push(path.clone());
                    // Test-only server: the served tree is the test's own, `..` is refused.
                    let file = (!path.split('/').any(|c| c == ".."))
                        .then(|| root.join(path.trim_start_matches('/')))
                        .filter(|p| p.is_file());
                    let resp = match file.and_then(|p| std::fs::read(p).ok()) {
                        Some(body) => {
                            let mut r = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            r.extend_from_slice(&body);
                            r
                        }
                        None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
                    };
                    let _ = c.write_all(&resp).await;
                    let _ = c.shutdown().await;
                });
            }
        });
        StaticServer { url, seen, task }
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A build whose context (and Dockerfile) come from a URL, as `docker buildx build
/// http://…` and `buildctl --opt context=…` send it: no local source at all.
async fn build_remote(berthd: &Berthd, attrs: &[(&str, &str)], image: &str) -> BuildReport {
    let client = berthd.client().await.unwrap();
    let mut out = BTreeMap::new();
    out.insert("name".to_string(), image.to_string());
    client
        .build(BuildOptions {
            frontend: Some("dockerfile.v0".into()),
            frontend_attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            output: Output::Raw("image".into(), out),
            ..Default::default()
        })
        .await
        .unwrap()
}

/// Remote build contexts: a git repository over git's dumb HTTP transport (branch, default
/// branch, `#ref:subdir`), a `.tar.gz` archive URL (unpacked into the context) and a URL of a
/// plain Dockerfile; the images run in Docker with the files of the right revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_contexts_git_archive_and_dockerfile_urls() {
    require_root();
    integration::require_tool("git", "git");
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let served = tmp.path().join("served");
    std::fs::create_dir_all(&served).unwrap();

    // git: `first` holds rev one, `main` rev two; `sub/` has a Dockerfile of its own.
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "--quiet", "-b", "main"]).unwrap();
    write(
        &work,
        "Dockerfile",
        &format!(
            "FROM {}\nCOPY rev.txt /rev.txt\nRUN echo fromgit > /foo\n",
            base.reference()
        ),
    );
    write(&work, "rev.txt", "one\n");
    write(
        &work,
        "sub/Dockerfile",
        &format!("FROM {}\nCOPY . /sub/\n", base.reference()),
    );
    write(&work, "sub/in-sub.txt", "in sub\n");
    git(&work, &["add", "."]).unwrap();
    git(&work, &["commit", "--quiet", "-m", "one"]).unwrap();
    git(&work, &["branch", "first"]).unwrap();
    write(&work, "rev.txt", "two\n");
    git(&work, &["commit", "--quiet", "-am", "two"]).unwrap();
    git(
        tmp.path(),
        &[
            "clone",
            "--quiet",
            "--bare",
            work.to_str().unwrap(),
            served.join("repo.git").to_str().unwrap(),
        ],
    )
    .unwrap();
    git(&served.join("repo.git"), &["update-server-info"]).unwrap();

    // an archive whose Dockerfile has another name (`filename` names it), and a bare Dockerfile
    // (`filename` is then ignored: any name works, as with buildkitd)
    let arch = tmp.path().join("arch");
    write(
        &arch,
        "mydockerfile",
        &format!("FROM {}\nCOPY c.txt /c.txt\n", base.reference()),
    );
    write(&arch, "c.txt", "from archive\n");
    let st = std::process::Command::new("tar")
        .arg("-czf")
        .arg(served.join("ctx.tar.gz"))
        .arg("-C")
        .arg(&arch)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    write(
        &served,
        "df",
        &format!("FROM {}\nRUN echo fromurl > /u\n", base.reference()),
    );

    let server = StaticServer::start(&served).await;
    // (label, frontend attributes, command run in the image, its expected output)
    type Case<'a> = (String, Vec<(&'a str, String)>, &'a str, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            "git-branch".into(),
            vec![("context", format!("{}/repo.git#first", server.url))],
            "cat /rev.txt /foo",
            "one\nfromgit",
        ),
        (
            "git-default".into(),
            vec![("context", format!("{}/repo.git", server.url))],
            "cat /rev.txt /foo",
            "two\nfromgit",
        ),
        (
            "git-subdir".into(),
            vec![("context", format!("{}/repo.git#main:sub", server.url))],
            "cat /sub/in-sub.txt; test -e /sub/rev.txt || echo scoped",
            "in sub\nscoped",
        ),
        (
            "archive".into(),
            vec![
                ("context", format!("{}/ctx.tar.gz", server.url)),
                ("filename", "mydockerfile".into()),
            ],
            "cat /c.txt",
            "from archive",
        ),
        (
            "dockerfile-url".into(),
            vec![
                ("context", format!("{}/df", server.url)),
                ("filename", "bogus-name".into()),
            ],
            "cat /u",
            "fromurl",
        ),
    ];
    for (label, attrs, cmd, want) in cases {
        let image = format!(
            "{}:1",
            unique_name(&format!("berth-test/df-remote-{label}"))
        );
        let attrs: Vec<(&str, &str)> = attrs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = build_remote(&berthd, &attrs, &image).await;
        ok(&r, &berthd);
        let _img = TestImage::adopt(&engine, &image).await.unwrap();
        let run = engine.run(&image, &["sh", "-c", cmd]).await.unwrap();
        run.assert_success();
        assert_eq!(run.stdout.trim_end(), want, "case {label}");
    }
    let seen = server.seen.lock().unwrap().clone();
    assert!(
        seen.iter().any(|p| p == "/repo.git/info/refs"),
        "git did not use the HTTP server: {seen:?}"
    );

    // A URL that answers 404 fails the build with an error naming it; nothing is tagged.
    let image = format!("{}:1", unique_name("berth-test/df-remote-missing"));
    let missing = format!("{}/nothing-here.tar.gz", server.url);
    let r = build_remote(&berthd, &[("context", &missing)], &image).await;
    let err = format!("{:?}", r.solve.expect_err("a 404 context must fail"));
    assert!(err.contains("404") || err.contains("nothing-here"), "{err}");
    assert!(engine.inspect_image(&image).await.is_err());
}
