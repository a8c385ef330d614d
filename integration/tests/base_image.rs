//! The registry-free base images work on the system Docker Engine: the busybox image runs shell
//! commands as root and as other users, and the multi-layer image has the layers and the tree
//! (added, modified, whited-out and opaque paths) that `integration`'s docs promise.

use integration::{
    busybox_image, multi_layer_image, require_root, DockerEngine, RunOptions, MULTI_LAYER_ABSENT,
    MULTI_LAYER_FILES,
};

fn system_engine() -> DockerEngine {
    require_root();
    DockerEngine::system().expect("system Docker Engine socket")
}

#[tokio::test]
async fn busybox_image_runs_on_system_dockerd() {
    let engine = system_engine();
    engine.ping().await.expect("system dockerd answers /_ping");
    let image = busybox_image(&engine).await.expect("import busybox image");
    assert!(image.reference().starts_with("berth-test/busybox:"));
    assert!(image.id().starts_with("sha256:"), "{}", image.id());

    let out = engine
        .run(image.reference(), &["/bin/sh", "-c", "echo hello; id -u"])
        .await
        .expect("run busybox");
    out.assert_success();
    assert_eq!(out.stdout, "hello\n0\n");

    // Default Cmd is /bin/sh, PATH is set, applets resolve, users from /etc/passwd work.
    let opts = RunOptions {
        user: Some("user".into()),
        ..Default::default()
    };
    let out = engine
        .run_with(
            image.reference(),
            &[
                "sh",
                "-c",
                "id -un; id -u; ls -ld /tmp | cut -c1-10; echo $HOME; false",
            ],
            &opts,
        )
        .await
        .expect("run as user");
    assert_eq!(
        out.exit_code, 1,
        "false must make the shell exit 1: {out:?}"
    );
    assert_eq!(out.stdout, "user\n1000\ndrwxrwxrwt\n/home/user\n");

    let out = engine
        .run(image.reference(), &["sh", "-c", "echo oops >&2; exit 7"])
        .await
        .expect("run failing command");
    assert_eq!(
        (out.exit_code, out.stdout.as_str(), out.stderr.as_str()),
        (7, "", "oops\n")
    );

    let inspect = engine.inspect_image(image.reference()).await.unwrap();
    let cmd = inspect.config.and_then(|c| c.cmd).unwrap_or_default();
    assert_eq!(cmd, vec!["/bin/sh".to_string()]);

    // Dropping the TestImage removes its tag.
    let reference = image.reference().to_string();
    drop(image);
    assert!(
        !engine.image_exists(&reference).await.unwrap(),
        "{reference} not removed"
    );
}

#[tokio::test]
async fn multi_layer_image_has_layers_and_whiteouts() {
    let engine = system_engine();
    let base = busybox_image(&engine).await.expect("import busybox image");
    let image = multi_layer_image(&engine)
        .await
        .expect("load multi-layer image");

    let base_layers = engine.image_layers(base.reference()).await.unwrap();
    let layers = engine.image_layers(image.reference()).await.unwrap();
    assert_eq!(base_layers.len(), 1, "{base_layers:?}");
    assert_eq!(layers.len(), 3, "want 3 layers, got {layers:?}");
    assert_eq!(
        layers[0], base_layers[0],
        "lowest layer is the busybox rootfs"
    );
    let mut unique = layers.clone();
    unique.dedup();
    assert_eq!(unique.len(), layers.len(), "layers differ: {layers:?}");

    let mut script = String::new();
    for (path, _) in MULTI_LAYER_FILES {
        script.push_str(&format!("echo \"== {path}\"; cat {path}; "));
    }
    for path in MULTI_LAYER_ABSENT {
        script.push_str(&format!(
            "if test -e {path}; then echo \"present {path}\"; fi; "
        ));
    }
    script.push_str("echo \"== ls\"; ls /data/opaque");
    let out = engine
        .run(image.reference(), &["sh", "-c", &script])
        .await
        .expect("run multi-layer image");
    out.assert_success();
    let mut expected = String::new();
    for (path, content) in MULTI_LAYER_FILES {
        expected.push_str(&format!("== {path}\n{content}"));
    }
    expected.push_str("== ls\nnew.txt\n");
    assert_eq!(out.stdout, expected);

    // The base image shares the lowest layer but has no /data.
    let out = engine
        .run(base.reference(), &["sh", "-c", "test -e /data; echo rc=$?"])
        .await
        .unwrap();
    assert_eq!(out.stdout, "rc=1\n", "{out:?}");

    // Two loads give distinct images (unique config label) that share layers.
    let again = multi_layer_image(&engine).await.expect("second load");
    assert_ne!(again.id(), image.id());
    assert_eq!(
        engine.image_layers(again.reference()).await.unwrap(),
        layers
    );
}
