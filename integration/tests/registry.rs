//! The local registry accepts a push from the system dockerd and lists the pushed repository and
//! tag over its HTTP API; stopping it ends the process and closes the port.

use std::path::Path;

use integration::{busybox_image, http_get, require_root, unique_name, DockerEngine, Registry};

#[tokio::test]
async fn registry_receives_push_from_system_dockerd() {
    require_root();
    let mut registry = Registry::start().expect("start registry");
    let addr = registry.addr().to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert_eq!(
        registry.catalog().unwrap(),
        Vec::<String>::new(),
        "fresh storage"
    );
    assert_eq!(
        registry
            .get("/v2/")
            .unwrap()
            .header("Docker-Distribution-Api-Version"),
        Some("registry/2.0")
    );

    let engine = DockerEngine::system().expect("system dockerd socket");
    let image = busybox_image(&engine).await.expect("import busybox");
    let repo = format!("berth-test/{}", unique_name("push"));
    let tag = "v1";
    let remote = image
        .tag_as(&format!("{addr}/{repo}:{tag}"))
        .await
        .expect("tag for the local registry");
    engine
        .push(remote.reference())
        .await
        .expect("push to local registry");

    assert_eq!(registry.catalog().unwrap(), vec![repo.clone()]);
    assert_eq!(registry.tags(&repo).unwrap(), vec![tag.to_string()]);
    let missing = registry.get("/v2/berth-test/not-there/tags/list").unwrap();
    assert_eq!(missing.status, 404, "{}", missing.text());
    assert!(
        registry
            .storage_dir()
            .join("docker/registry/v2/repositories")
            .join(&repo)
            .is_dir(),
        "blobs stored under the registry's own storage dir"
    );

    let pid = registry.pid().unwrap();
    registry.stop().expect("registry stops on SIGTERM");
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(
        http_get(&addr, "/v2/").is_err(),
        "port still answers after stop"
    );
}
