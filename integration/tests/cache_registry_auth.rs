//! Cache export and import through a registry that wants credentials: Debian's
//! `docker-registry` with `auth: htpasswd` (Basic auth). berthd asks the client's session for
//! the host's credentials (`Auth.Credentials`, as buildctl answers from the Docker config):
//! with the right password the cache is pushed and a second berthd (own root, so no local
//! cache) imports it and runs nothing; with a wrong one the export fails with the registry's
//! 401 named, and the registry holds nothing of that export.
//!
//! Needs root, runc, overlayfs, a Docker Engine and Debian's docker-registry.

use std::collections::BTreeMap;

use integration::buildkit_client::{Berthd, BuildOptions, BuildReport, Output};
use integration::{require_root, unique_name, Registry};
use protos::moby::buildkit::v1 as control;

const USER: &str = "berth";
const PASSWORD: &str = "berth-cache-secret";
/// bcrypt of [`PASSWORD`] (distribution's htpasswd accepts nothing else).
const HTPASSWD: &str = "berth:$2b$10$n0b2qpZ0rEzv7lh.pT6gdufWCfBeyhZ/Fr4ccE9yBWnsEuaCLIgg.\n";

fn entry(kind: &str, attrs: &[(&str, &str)]) -> control::CacheOptionsEntry {
    control::CacheOptionsEntry {
        r#type: kind.to_string(),
        attrs: attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn auth(reg: &Registry, password: &str) -> BTreeMap<String, (String, String)> {
    BTreeMap::from([(
        reg.addr().to_string(),
        (USER.to_string(), password.to_string()),
    )])
}

/// Two file steps on scratch, the second's content unique to this run.
fn definition(marker: &str) -> protos::pb::Definition {
    llb::scratch()
        .file(llb::mkfile("/a", 0o644, "one\n", Default::default()))
        .file(llb::mkfile(
            "/marker",
            0o644,
            format!("{marker}\n"),
            Default::default(),
        ))
        .marshal()
        .unwrap()
}

/// Names of the repositories the registry stores (its filesystem driver's layout).
fn stored_repos(reg: &Registry) -> Vec<String> {
    let root = reg.storage_dir().join("docker/registry/v2/repositories");
    let mut out = vec![];
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.file_name().is_some_and(|n| n == "_manifests") {
                out.push(d.strip_prefix(&root).unwrap().display().to_string());
            } else if p.is_dir() && p.file_name().is_none_or(|n| n != "_layers") {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

fn ok(r: &BuildReport, d: &Berthd) {
    if let Err(e) = &r.solve {
        panic!("build failed: {e}\nberthd log:\n{}", d.log_text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn htpasswd_registry_takes_cache_with_the_sessions_credentials_only() {
    require_root();
    let reg = Registry::start_with_htpasswd(HTPASSWD).unwrap();
    let marker = unique_name("auth");
    let def = definition(&marker);
    let cache_ref = format!("{}/berth-auth/cache:{marker}", reg.addr());

    // Node A exports with the right password.
    let a = Berthd::start(&[]).unwrap();
    let out_a = tempfile::tempdir().unwrap();
    let ra = a
        .client()
        .await
        .unwrap()
        .build(BuildOptions {
            definition: Some(def.clone()),
            output: Output::Local(out_a.path().to_path_buf()),
            cache_exports: vec![entry("registry", &[("ref", &cache_ref), ("mode", "max")])],
            registry_auth: auth(&reg, PASSWORD),
            ..Default::default()
        })
        .await
        .unwrap();
    ok(&ra, &a);
    assert!(
        ra.solve
            .as_ref()
            .unwrap()
            .exporter_response
            .contains_key("cache.manifest"),
        "{:?}",
        ra.solve
    );
    assert_eq!(stored_repos(&reg), vec!["berth-auth/cache".to_string()]);
    // Anonymous clients get nothing: the registry really checks.
    let anon = reg
        .get(&format!("/v2/berth-auth/cache/manifests/{marker}"))
        .unwrap();
    assert_eq!(anon.status, 401);

    // Node B (its own root: no local cache) imports with the right password: every step is
    // CACHED and its output is node A's.
    let b = Berthd::start(&[]).unwrap();
    let out_b = tempfile::tempdir().unwrap();
    let rb = b
        .client()
        .await
        .unwrap()
        .build(BuildOptions {
            definition: Some(def.clone()),
            output: Output::Local(out_b.path().to_path_buf()),
            cache_imports: vec![entry("registry", &[("ref", &cache_ref)])],
            registry_auth: auth(&reg, PASSWORD),
            ..Default::default()
        })
        .await
        .unwrap();
    ok(&rb, &b);
    for v in rb.vertices().values() {
        if !v.name.starts_with("exporting") {
            assert!(v.cached, "{} ran on node B: {:#?}", v.name, rb.vertices());
        }
    }
    assert_eq!(
        std::fs::read_to_string(out_b.path().join("marker")).unwrap(),
        format!("{marker}\n")
    );

    // A wrong password: the export fails naming the registry and its 401, and the registry
    // has no repository of that export (nothing half-written).
    let bad_ref = format!("{}/berth-auth/denied:{marker}", reg.addr());
    let c = Berthd::start(&[]).unwrap();
    let rc = c
        .client()
        .await
        .unwrap()
        .build(BuildOptions {
            definition: Some(definition(&format!("{marker}-c"))),
            cache_exports: vec![entry("registry", &[("ref", &bad_ref)])],
            registry_auth: auth(&reg, "not-the-password"),
            ..Default::default()
        })
        .await
        .unwrap();
    let err = rc
        .solve
        .as_ref()
        .expect_err("export with a wrong password succeeded")
        .message()
        .to_string();
    assert!(
        err.contains(reg.addr()) && err.contains("401") && err.contains("berth-auth/denied"),
        "{err}"
    );
    assert_eq!(stored_repos(&reg), vec!["berth-auth/cache".to_string()]);

    // Importing with a wrong password is skipped (as buildkitd skips an unreadable import):
    // the build succeeds and its steps run.
    let rd = c
        .client()
        .await
        .unwrap()
        .build(BuildOptions {
            definition: Some(def.clone()),
            cache_imports: vec![entry("registry", &[("ref", &cache_ref)])],
            registry_auth: auth(&reg, "not-the-password"),
            ..Default::default()
        })
        .await
        .unwrap();
    ok(&rd, &c);
    assert!(
        rd.vertices()
            .values()
            .any(|v| !v.cached && !v.name.starts_with("exporting")),
        "nothing ran without the cache: {:#?}",
        rd.vertices()
    );
    assert!(
        c.log_text().contains("401"),
        "the skipped import's warning names the 401"
    );
}
