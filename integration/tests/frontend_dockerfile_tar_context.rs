//! A build context sent as a tar stream through the client's session (`docker buildx build -
//! < context.tar`: buildx serves the tar with its session's `Upload/Pull` and names it
//! `http://buildkit-session/<id>` in the `context` option, as BuildKit's `uploadprovider`
//! does). berthd must fetch it through the session, not the network, and only once: the client
//! hands each upload out a single time, while the frontend reads the Dockerfile from it before
//! it solves the build on it.

use std::io::Write as _;
use std::process::{Command, Stdio};

use integration::buildkit_client::Berthd;
use integration::{
    busybox_image, require_root, unique_name, BuildxBuilder, DockerEngine, TestImage,
};
use sha2::Digest as _;

/// A tar of `files` (path, content), mode 0644, owned by 0:0.
fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Runs `docker buildx build` on `builder` with `args`, the tar on stdin.
fn buildx_build(builder: &str, args: &[&str], stdin: &[u8]) -> std::process::Output {
    let mut child = Command::new("docker")
        .args([
            "buildx",
            "build",
            "--builder",
            builder,
            "--progress",
            "plain",
        ])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run docker buildx build");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tar_context_through_the_session() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let base = busybox_image(&engine).await.unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let builder = BuildxBuilder::create("berth-tarctx", berthd.socket());

    // 8 MiB of pseudo-random bytes (several session messages and flow-control windows), checked
    // inside the build.
    let mut big = vec![0u8; 8 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in big.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let big_sum = hex::encode(sha2::Sha256::digest(&big));
    let dockerfile = format!(
        "FROM {}\nCOPY foo big /\nRUN test \"$(sha256sum /big | cut -d' ' -f1)\" = {big_sum}\nCMD [\"cat\", \"/foo\"]\n",
        base.reference()
    );
    let ctx = tar_of(&[
        ("Dockerfile", dockerfile.as_bytes()),
        ("foo", b"contents from the tar"),
        ("big", &big),
    ]);

    let name = format!("{}:1", unique_name("berth-test/df-tarctx"));
    let out = buildx_build(
        builder.name(),
        &["--output", &format!("type=image,name={name}"), "-"],
        &ctx,
    );
    assert!(
        out.status.success(),
        "buildx build - < tar: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        berthd.log_text()
    );
    let _img = TestImage::adopt(&engine, &name).await.unwrap();
    let run = engine.run(&name, &[]).await.unwrap();
    run.assert_success();
    assert_eq!(run.stdout, "contents from the tar");
    // The session, not the network: no HTTP connection to `buildkit-session` was tried.
    let log = berthd.log_text();
    assert!(
        !log.contains("starting new connection: http://buildkit-session"),
        "berthd went to the network for the session's upload:\n{log}"
    );

    // The Dockerfile of the tar stays the one used; a second build with another tar (the same
    // upload URL scheme, a new id) does not reuse the first upload.
    let dockerfile2 = format!(
        "FROM {}\nCOPY foo /\nCMD [\"cat\", \"/foo\"]\n",
        base.reference()
    );
    let ctx2 = tar_of(&[
        ("Dockerfile", dockerfile2.as_bytes()),
        ("foo", b"second tar"),
    ]);
    let name2 = format!("{}:2", unique_name("berth-test/df-tarctx"));
    let out = buildx_build(
        builder.name(),
        &["--output", &format!("type=image,name={name2}"), "-"],
        &ctx2,
    );
    assert!(
        out.status.success(),
        "second buildx build - < tar: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        berthd.log_text()
    );
    let _img2 = TestImage::adopt(&engine, &name2).await.unwrap();
    let run = engine.run(&name2, &[]).await.unwrap();
    run.assert_success();
    assert_eq!(run.stdout, "second tar");
}
