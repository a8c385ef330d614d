//! Attestations returned by a gateway client (in-toto statements with self and raw subjects,
//! bundles) and exported by berthd as BuildKit v0.11.6 does: pushed with a multi-platform image,
//! one attestation manifest per platform in the index (platform `unknown/unknown`, the
//! `vnd.docker.reference.*` annotations, one in-toto layer per statement whose default subjects
//! are the image names as package URLs with the platform manifest's digest). Checked against a
//! real registry with berth's registry client and plain HTTP reads of the blobs.

use integration::buildkit_client::{
    new_id, with_build_id, Attachables, Berthd, BuildkitClient, Output,
};
use integration::require_root;
use prost::Message;
use protos::moby::buildkit::v1 as control;
use protos::moby::buildkit::v1::frontend as gw;
use protos::pb::{self, file_action::Action, op::Op as OpKind};
use std::collections::BTreeMap;
use std::time::Duration;

const PLATFORMS: [&str; 2] = ["linux/amd64", "linux/arm64"];
const SUCCESS: &str = r#"{"success": true}"#;

fn sha256(b: &[u8]) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b))
}

/// A file op making each `(path, data)` on scratch (`path` ending in `/` is a directory).
fn files_op(files: &[(&str, &str)]) -> Vec<u8> {
    let actions = files
        .iter()
        .enumerate()
        .map(|(i, (path, data))| pb::FileAction {
            // no op inputs: index i-1 is the previous action's result
            input: i as i64 - 1,
            secondary_input: -1,
            output: if i + 1 == files.len() { 0 } else { -1 },
            action: Some(match path.strip_suffix('/') {
                Some(dir) => Action::Mkdir(pb::FileActionMkDir {
                    path: dir.into(),
                    mode: 0o700,
                    timestamp: -1,
                    ..Default::default()
                }),
                None => Action::Mkfile(pb::FileActionMkFile {
                    path: path.to_string(),
                    mode: 0o600,
                    data: data.as_bytes().to_vec().into(),
                    timestamp: -1,
                    ..Default::default()
                }),
            }),
        })
        .collect();
    pb::Op {
        op: Some(OpKind::File(pb::FileOp { actions })),
        ..Default::default()
    }
    .encode_to_vec()
}

fn definition_of(op: Vec<u8>) -> pb::Definition {
    let term = pb::Op {
        inputs: vec![pb::Input {
            digest: format!("sha256:{}", sha256(&op)),
            index: 0,
        }],
        ..Default::default()
    };
    pb::Definition {
        def: vec![op.into(), term.encode_to_vec().into()],
        ..Default::default()
    }
}

/// Solves `files` in the build and returns its ref.
async fn solve(c: &BuildkitClient, build_ref: &str, files: &[(&str, &str)]) -> gw::Ref {
    let res = c
        .gateway()
        .solve(with_build_id(
            gw::SolveRequest {
                definition: Some(definition_of(files_op(files))),
                allow_result_return: true,
                allow_result_array_ref: true,
                ..Default::default()
            },
            build_ref,
        ))
        .await
        .unwrap()
        .into_inner();
    let Some(gw::result::Result::Ref(r)) = res.result.and_then(|r| r.result) else {
        panic!("expected a ref result");
    };
    r
}

/// What the frontend attaches to each platform.
#[derive(Clone, Copy)]
enum Attach {
    /// The attestations of BuildKit's TestExportAttestations: a self subject, and a raw one
    /// with an empty predicate file.
    InToto,
    /// A bundle directory with one statement without subjects.
    Bundle,
    /// An in-toto attestation without a ref.
    NoRef,
    /// A frontend-made SLSA provenance.
    Provenance,
    /// A predicate file that is not JSON.
    NotJson,
    /// The core SPDX SBOM (`sbom-core`), listing `/greeting` and a missing `/bar`.
    Spdx,
}

/// A gateway build returning a ref map over [`PLATFORMS`] (`/greeting` = `hello <p>!`) with
/// attestations, exported with `type=image` and `attrs`.
async fn build(
    c: &BuildkitClient,
    attrs: &[(&str, &str)],
    attach: Attach,
) -> std::result::Result<control::SolveResponse, tonic::Status> {
    build_to(c, "image", Output::None, attrs, attach).await
}

/// [`build`] exported with `exporter` into the session's `output`.
async fn build_to(
    c: &BuildkitClient,
    exporter: &str,
    output: Output,
    attrs: &[(&str, &str)],
    attach: Attach,
) -> std::result::Result<control::SolveResponse, tonic::Status> {
    let mut session = c
        .open_session(Attachables {
            output,
            ..Default::default()
        })
        .await
        .unwrap();
    let build_ref = new_id();
    let mut ctl = c.control();
    let (sid, br) = (session.id.clone(), build_ref.clone());
    let attrs = attrs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let exporter = exporter.to_string();
    let solve_task = tokio::spawn(async move {
        ctl.solve(control::SolveRequest {
            r#ref: br,
            session: sid,
            exporter_deprecated: exporter,
            exporter_attrs_deprecated: attrs,
            ..Default::default()
        })
        .await
    });
    let mut refs = BTreeMap::new();
    let mut atts = BTreeMap::new();
    let mut platforms = vec![];
    for p in PLATFORMS {
        let greeting = format!("hello {p}!");
        refs.insert(
            p.to_string(),
            solve(c, &build_ref, &[("/greeting", &greeting)]).await,
        );
        let (os, arch) = p.split_once('/').unwrap();
        platforms.push(serde_json::json!({"ID": p, "Platform": {"os": os, "architecture": arch}}));
        let intoto = |r: Option<gw::Ref>, path: &str, pt: &str, subjects| gw::Attestation {
            kind: gw::AttestationKind::InToto as i32,
            r#ref: r,
            path: path.into(),
            in_toto_predicate_type: pt.into(),
            in_toto_subjects: subjects,
            ..Default::default()
        };
        let list = match attach {
            Attach::InToto => {
                let r = solve(
                    c,
                    &build_ref,
                    &[("/attestation.json", SUCCESS), ("/attestation2.json", "")],
                )
                .await;
                vec![
                    intoto(
                        Some(r.clone()),
                        "/attestation.json",
                        "https://example.com/attestations/v1.0",
                        vec![gw::InTotoSubject {
                            kind: gw::InTotoSubjectKind::Self_ as i32,
                            ..Default::default()
                        }],
                    ),
                    intoto(
                        Some(r),
                        "/attestation2.json",
                        "https://example.com/attestations2/v1.0",
                        vec![gw::InTotoSubject {
                            kind: gw::InTotoSubjectKind::Raw as i32,
                            name: "/attestation.json".into(),
                            digest: vec![format!("sha256:{}", sha256(SUCCESS.as_bytes()))],
                        }],
                    ),
                ]
            }
            Attach::Bundle => {
                let stmt = r#"{"_type":"https://in-toto.io/Statement/v0.1","predicateType":"https://example.com/attestations/v1.0","subject":null,"predicate":{"foo":"1"}}"#;
                let r = solve(
                    c,
                    &build_ref,
                    &[("/bundle/", ""), ("/bundle/attestation.json", stmt)],
                )
                .await;
                vec![gw::Attestation {
                    kind: gw::AttestationKind::Bundle as i32,
                    r#ref: Some(r),
                    path: "/bundle".into(),
                    ..Default::default()
                }]
            }
            Attach::NoRef => vec![intoto(None, "/a.json", "https://example.com/a", vec![])],
            Attach::Spdx => {
                let doc = r#"{"SPDXID":"DOCUMENT","files":[{"SPDXID":"SPDXRef-File-g","fileName":"/greeting"},{"SPDXID":"SPDXRef-File-bar","fileName":"/bar"}]}"#;
                let r = solve(c, &build_ref, &[("/result.spdx", doc)]).await;
                let mut a = intoto(Some(r), "/result.spdx", "https://spdx.dev/Document", vec![]);
                a.metadata
                    .insert("sbom-core".into(), bytes::Bytes::from_static(b"result"));
                vec![a]
            }
            Attach::Provenance | Attach::NotJson => {
                let r = solve(c, &build_ref, &[("/a.json", "{not json")]).await;
                let pt = match attach {
                    Attach::Provenance => "https://slsa.dev/provenance/v0.2",
                    _ => "https://example.com/a",
                };
                vec![intoto(Some(r), "/a.json", pt, vec![])]
            }
        };
        atts.insert(p.to_string(), gw::Attestations { attestation: list });
    }
    let mut md = BTreeMap::new();
    md.insert(
        "refs.platforms".to_string(),
        bytes::Bytes::from(serde_json::json!({ "Platforms": platforms }).to_string()),
    );
    c.gateway()
        .r#return(with_build_id(
            gw::ReturnRequest {
                result: Some(gw::Result {
                    result: Some(gw::result::Result::Refs(gw::RefMap { refs })),
                    metadata: md,
                    attestations: atts,
                }),
                ..Default::default()
            },
            &build_ref,
        ))
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(120), solve_task)
        .await
        .unwrap()
        .unwrap();
    assert!(session.close(Duration::from_secs(5)).await);
    r.map(|r| r.into_inner())
}

async fn fetch(reference: &str) -> registry::Fetched {
    let client = registry::Registry::new(registry::Hosts::new(Default::default()));
    let s = client.session(std::sync::Arc::new(registry::Anonymous));
    s.resolve(&registry::Reference::parse(reference).unwrap())
        .await
        .unwrap()
}

fn blob(addr: &str, repo: &str, digest: &str) -> Vec<u8> {
    let r = integration::http_get(addr, &format!("/v2/{repo}/blobs/{digest}")).unwrap();
    assert_eq!(r.status, 200, "blob {digest}");
    assert_eq!(format!("sha256:{}", sha256(&r.body)), digest);
    r.body
}

/// The pushed index: per platform, the image manifest's digest and the statements of its
/// attestation manifest (checked for the attestation manifest's shape on the way).
async fn pushed(addr: &str, repo: &str, name: &str) -> Vec<(String, Vec<serde_json::Value>)> {
    let index = fetch(name).await;
    assert_eq!(index.media_type, registry::MEDIA_TYPE_OCI_INDEX);
    let idx: serde_json::Value = serde_json::from_slice(&index.bytes).unwrap();
    let manifests = idx["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 2 * PLATFORMS.len(), "{idx}");
    let mut out = vec![];
    for (i, p) in PLATFORMS.iter().enumerate() {
        let img = &manifests[i];
        let (os, arch) = p.split_once('/').unwrap();
        assert_eq!(img["platform"]["os"], os);
        assert_eq!(img["platform"]["architecture"], arch);
        let img_digest = img["digest"].as_str().unwrap().to_string();
        let att = &manifests[PLATFORMS.len() + i];
        assert_eq!(att["mediaType"], registry::MEDIA_TYPE_OCI_MANIFEST);
        assert_eq!(att["platform"]["os"], "unknown", "{att}");
        assert_eq!(att["platform"]["architecture"], "unknown", "{att}");
        assert_eq!(
            att["annotations"]["vnd.docker.reference.type"],
            "attestation-manifest"
        );
        assert_eq!(
            att["annotations"]["vnd.docker.reference.digest"],
            img_digest.as_str()
        );
        let m = fetch(&format!(
            "{addr}/{repo}@{}",
            att["digest"].as_str().unwrap()
        ))
        .await;
        let mf: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap();
        let cfg = blob(addr, repo, mf["config"]["digest"].as_str().unwrap());
        let cfg: serde_json::Value = serde_json::from_slice(&cfg).unwrap();
        assert_eq!(cfg["os"], "unknown");
        assert_eq!(cfg["architecture"], "unknown");
        assert!(cfg.get("history").is_none(), "{cfg}");
        let layers = mf["layers"].as_array().unwrap();
        let diff_ids = cfg["rootfs"]["diff_ids"].as_array().unwrap();
        assert_eq!(layers.len(), diff_ids.len());
        let mut stmts = vec![];
        for (l, d) in layers.iter().zip(diff_ids) {
            assert_eq!(l["mediaType"], "application/vnd.in-toto+json");
            assert_eq!(&l["digest"], d);
            let st = blob(addr, repo, l["digest"].as_str().unwrap());
            let st: serde_json::Value = serde_json::from_slice(&st).unwrap();
            assert_eq!(
                l["annotations"]["in-toto.io/predicate-type"],
                st["predicateType"]
            );
            assert_eq!(st["_type"], "https://in-toto.io/Statement/v0.1");
            stmts.push(st);
        }
        out.push((img_digest, stmts));
    }
    out
}

/// The package URL BuildKit names an image by (`pkg:docker/<escaped namespace>/<name>@<tag>`
/// with the platform), for `<addr>/berth-test/<repo>:v1`.
fn purl(addr: &str, repo: &str, platform: &str) -> String {
    format!(
        "pkg:docker/{}/berth-test/{repo}@v1?platform={}",
        addr.replace(':', "%3A"),
        platform.replace('/', "%2F")
    )
}

/// TestExportAttestations' image case: two names, two platforms, a self-subject statement
/// (one subject per name, with the platform manifest's digest) and a raw-subject one with an
/// empty predicate (`null`). TestAttestationBundle: a bundle's statement without subjects
/// gets the image as subject.
#[tokio::test(flavor = "multi_thread")]
async fn attestations_are_pushed_as_attestation_manifests() {
    require_root();
    let reg = integration::Registry::start().unwrap();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let addr = reg.addr();

    let foo = format!("{addr}/berth-test/attfoo:v1");
    let bar = format!("{addr}/berth-test/attbar:v1");
    let names = format!("{foo},{bar}");
    let resp = build(&c, &[("name", &names), ("push", "true")], Attach::InToto)
        .await
        .unwrap();
    assert_eq!(
        resp.exporter_response["containerimage.digest"],
        fetch(&foo).await.digest
    );
    for (repo, name) in [("attfoo", &foo), ("attbar", &bar)] {
        let got = pushed(addr, &format!("berth-test/{repo}"), name).await;
        for ((img, stmts), p) in got.iter().zip(PLATFORMS) {
            assert_eq!(stmts.len(), 2);
            let hex = img.strip_prefix("sha256:").unwrap();
            assert_eq!(
                stmts[0]["predicateType"],
                "https://example.com/attestations/v1.0"
            );
            assert_eq!(stmts[0]["predicate"], serde_json::json!({"success": true}));
            assert_eq!(
                stmts[0]["subject"],
                serde_json::json!([
                    {"name": purl(addr, "attfoo", p), "digest": {"sha256": hex}},
                    {"name": purl(addr, "attbar", p), "digest": {"sha256": hex}},
                ])
            );
            assert_eq!(
                stmts[1]["predicateType"],
                "https://example.com/attestations2/v1.0"
            );
            assert!(stmts[1]["predicate"].is_null(), "{}", stmts[1]);
            assert_eq!(
                stmts[1]["subject"],
                serde_json::json!([{"name": "/attestation.json",
                    "digest": {"sha256": sha256(SUCCESS.as_bytes())}}])
            );
        }
    }

    let bundled = format!("{addr}/berth-test/attbundle:v1");
    build(&c, &[("name", &bundled), ("push", "true")], Attach::Bundle)
        .await
        .unwrap();
    let got = pushed(addr, "berth-test/attbundle", &bundled).await;
    for ((img, stmts), p) in got.iter().zip(PLATFORMS) {
        assert_eq!(stmts.len(), 1);
        assert_eq!(stmts[0]["predicate"], serde_json::json!({"foo": "1"}));
        assert_eq!(
            stmts[0]["subject"],
            serde_json::json!([{"name": purl(addr, "attbundle", p),
                "digest": {"sha256": img.strip_prefix("sha256:").unwrap()}}])
        );
    }
}

/// Attestations berth cannot export fail the build with BuildKit's words, and nothing is
/// pushed under the name.
#[tokio::test(flavor = "multi_thread")]
async fn bad_attestations_fail_the_build() {
    require_root();
    let reg = integration::Registry::start().unwrap();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let name = format!("{}/berth-test/attbad:v1", reg.addr());
    for (attach, want) in [
        (Attach::NoRef, "attestation does not have available content"),
        (
            Attach::Provenance,
            "frontend may not set provenance attestations",
        ),
        (Attach::NotJson, "predicate is not JSON"),
    ] {
        let e = build(&c, &[("name", &name), ("push", "true")], attach)
            .await
            .unwrap_err();
        assert!(e.message().contains(want), "{want}: {e:?}");
    }
    let r = integration::http_get(reg.addr(), "/v2/berth-test/attbad/manifests/v1").unwrap();
    assert_eq!(r.status, 404);
}

/// TestExportAttestations' local and tar cases: a directory per platform with its files and
/// the statements (`attestation-prefix` + base name, indented JSON, mode 0600) whose self
/// subject is each regular file of the platform's result with its sha256.
#[tokio::test(flavor = "multi_thread")]
async fn local_and_tar_outputs_carry_statements_per_platform() {
    require_root();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let check = |p: &str, files: &BTreeMap<String, Vec<u8>>| {
        let dir = p.replace('/', "_");
        let greeting = format!("hello {p}!");
        assert_eq!(files[&format!("{dir}/greeting")], greeting.as_bytes());
        let raw = &files[&format!("{dir}/test.attestation.json")];
        assert!(
            raw.starts_with(b"{\n  \"_type\": "),
            "{}",
            String::from_utf8_lossy(raw)
        );
        let st: serde_json::Value = serde_json::from_slice(raw).unwrap();
        assert_eq!(st["_type"], "https://in-toto.io/Statement/v0.1");
        assert_eq!(st["predicate"], serde_json::json!({"success": true}));
        assert_eq!(
            st["subject"],
            serde_json::json!([{"name": "greeting",
                "digest": {"sha256": sha256(greeting.as_bytes())}}])
        );
        let st2: serde_json::Value =
            serde_json::from_slice(&files[&format!("{dir}/test.attestation2.json")]).unwrap();
        assert!(st2["predicate"].is_null());
        assert_eq!(st2["subject"][0]["name"], "/attestation.json");
        assert_eq!(files.len(), 3 * PLATFORMS.len(), "{:?}", files.keys());
    };

    let out = tmp.path().join("local");
    build_to(
        &c,
        "local",
        Output::Local(out.clone()),
        &[("attestation-prefix", "test.")],
        Attach::InToto,
    )
    .await
    .unwrap();
    let mut files = BTreeMap::new();
    for p in PLATFORMS {
        let dir = p.replace('/', "_");
        for e in std::fs::read_dir(out.join(&dir)).unwrap() {
            let e = e.unwrap();
            let name = format!("{dir}/{}", e.file_name().to_string_lossy());
            files.insert(name, std::fs::read(e.path()).unwrap());
        }
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(out.join(&dir).join("test.attestation.json"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
    for p in PLATFORMS {
        check(p, &files);
    }

    let tar_path = tmp.path().join("out.tar");
    build_to(
        &c,
        "tar",
        Output::Tar(tar_path.clone()),
        &[("attestation-prefix", "test.")],
        Attach::InToto,
    )
    .await
    .unwrap();
    let mut files = BTreeMap::new();
    let mut dirs = vec![];
    let mut ar = tar::Archive::new(std::fs::File::open(&tar_path).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        if e.header().entry_type().is_dir() {
            dirs.push(path);
            continue;
        }
        let mut b = vec![];
        std::io::Read::read_to_end(&mut e, &mut b).unwrap();
        files.insert(path, b);
    }
    assert_eq!(dirs, ["linux_amd64/", "linux_arm64/"]);
    for p in PLATFORMS {
        check(p, &files);
    }
}

/// A gateway build returning one ref (of `def`) with `metadata`, exported with `type=image`,
/// `attrs` and the frontend attributes `fe_attrs`.
async fn build_single(
    c: &BuildkitClient,
    attrs: &[(&str, &str)],
    fe_attrs: &[(&str, &str)],
    def: pb::Definition,
    metadata: &[(&str, String)],
) -> std::result::Result<control::SolveResponse, tonic::Status> {
    build_single_to(
        c,
        "image",
        Output::None,
        attrs,
        fe_attrs,
        def,
        metadata,
        None,
    )
    .await
}

/// [`build_single`] exported with `exporter` into `output`; with `attest`, the result's file at
/// that path is an in-toto attestation (self subject) of platform linux/amd64.
#[allow(clippy::too_many_arguments)]
async fn build_single_to(
    c: &BuildkitClient,
    exporter: &str,
    output: Output,
    attrs: &[(&str, &str)],
    fe_attrs: &[(&str, &str)],
    def: pb::Definition,
    metadata: &[(&str, String)],
    attest: Option<&str>,
) -> std::result::Result<control::SolveResponse, tonic::Status> {
    let mut session = c
        .open_session(Attachables {
            output,
            ..Default::default()
        })
        .await
        .unwrap();
    let exporter = exporter.to_string();
    let build_ref = new_id();
    let mut ctl = c.control();
    let (sid, br) = (session.id.clone(), build_ref.clone());
    let map = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let (attrs, fe_attrs) = (map(attrs), map(fe_attrs));
    let solve_task = tokio::spawn(async move {
        ctl.solve(control::SolveRequest {
            r#ref: br,
            session: sid,
            exporter_deprecated: exporter,
            exporter_attrs_deprecated: attrs,
            frontend_attrs: fe_attrs,
            ..Default::default()
        })
        .await
    });
    let res = c
        .gateway()
        .solve(with_build_id(
            gw::SolveRequest {
                definition: Some(def),
                allow_result_return: true,
                allow_result_array_ref: true,
                ..Default::default()
            },
            &build_ref,
        ))
        .await
        .unwrap()
        .into_inner();
    let Some(gw::result::Result::Ref(r)) = res.result.and_then(|r| r.result) else {
        panic!("expected a ref result");
    };
    let attestations = attest
        .map(|path| {
            let a = gw::Attestation {
                r#ref: Some(r.clone()),
                path: path.into(),
                in_toto_predicate_type: "https://example.com/attestations/v1.0".into(),
                ..Default::default()
            };
            BTreeMap::from([(
                "linux/amd64".to_string(),
                gw::Attestations {
                    attestation: vec![a],
                },
            )])
        })
        .unwrap_or_default();
    c.gateway()
        .r#return(with_build_id(
            gw::ReturnRequest {
                result: Some(gw::Result {
                    result: Some(gw::result::Result::Ref(r)),
                    metadata: metadata
                        .iter()
                        .map(|(k, v)| (k.to_string(), bytes::Bytes::from(v.clone())))
                        .collect(),
                    attestations,
                }),
                ..Default::default()
            },
            &build_ref,
        ))
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(180), solve_task)
        .await
        .unwrap()
        .unwrap();
    assert!(session.close(Duration::from_secs(5)).await);
    r.map(|r| r.into_inner())
}

/// TestSBOMScanSingleRef: `attest:sbom=generator=IMAGE` on a single result runs the scanner
/// image (built and pushed here from busybox, its Cmd writing a statement that lists
/// `$BUILDKIT_SCAN_SOURCE`) over the result; the pushed image becomes an index of the platform
/// image and an attestation manifest holding the scanner's SPDX statement, whose subject is
/// the image. An empty generator is refused.
#[tokio::test(flavor = "multi_thread")]
async fn sbom_scan_runs_the_generator_over_a_single_result() {
    require_root();
    let engine = integration::DockerEngine::system().unwrap();
    let busybox = integration::busybox_image(&engine).await.unwrap();
    let reg = integration::Registry::start().unwrap();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let addr = reg.addr();

    let scanner = format!("{addr}/berth-test/scanner:v1");
    let image_op = pb::Op {
        op: Some(OpKind::Source(pb::SourceOp {
            identifier: format!("docker-image://{}", busybox.reference()),
            attrs: Default::default(),
        })),
        ..Default::default()
    }
    .encode_to_vec();
    let cmd = r#"echo "{\"_type\":\"https://in-toto.io/Statement/v0.1\",\"predicateType\":\"https://spdx.dev/Document\",\"predicate\":{\"name\":\"fallback\",\"files\":\"$(ls $BUILDKIT_SCAN_SOURCE)\"}}" > $BUILDKIT_SCAN_DESTINATION/spdx.json"#;
    let cfg = serde_json::json!({"architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh", "-c", cmd]}});
    build_single(
        &c,
        &[("name", &scanner), ("push", "true")],
        &[],
        definition_of(image_op),
        &[("containerimage.config", cfg.to_string())],
    )
    .await
    .unwrap();

    let target = format!("{addr}/berth-test/scanned:v1");
    let platforms = serde_json::json!({"Platforms": [{"ID": "linux/amd64", "Platform": {"os": "linux", "architecture": "amd64"}}]});
    let greeting = definition_of(files_op(&[("/greeting", "hello world!")]));
    build_single(
        &c,
        &[("name", &target), ("push", "true")],
        &[("attest:sbom", &format!("generator={scanner}"))],
        greeting.clone(),
        &[("refs.platforms", platforms.to_string())],
    )
    .await
    .unwrap();
    let index = fetch(&target).await;
    assert_eq!(index.media_type, registry::MEDIA_TYPE_OCI_INDEX);
    let idx: serde_json::Value = serde_json::from_slice(&index.bytes).unwrap();
    let manifests = idx["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 2, "{idx}");
    assert_eq!(manifests[0]["platform"]["architecture"], "amd64");
    let img = manifests[0]["digest"].as_str().unwrap();
    let att = &manifests[1];
    assert_eq!(att["platform"]["os"], "unknown");
    assert_eq!(att["annotations"]["vnd.docker.reference.digest"], img);
    let m = fetch(&format!(
        "{addr}/berth-test/scanned@{}",
        att["digest"].as_str().unwrap()
    ))
    .await;
    let mf: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap();
    let layers = mf["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{mf}");
    let st = blob(
        addr,
        "berth-test/scanned",
        layers[0]["digest"].as_str().unwrap(),
    );
    let st: serde_json::Value = serde_json::from_slice(&st).unwrap();
    assert_eq!(st["predicateType"], "https://spdx.dev/Document");
    assert_eq!(
        st["predicate"],
        serde_json::json!({"name": "fallback", "files": "greeting"})
    );
    assert_eq!(
        st["subject"],
        serde_json::json!([{"name": format!("pkg:docker/{}/berth-test/scanned@v1?platform=linux%2Famd64",
            addr.replace(':', "%3A")),
            "digest": {"sha256": img.strip_prefix("sha256:").unwrap()}}])
    );

    let e = build_single(
        &c,
        &[("name", &target), ("push", "true")],
        &[("attest:sbom", "generator=")],
        greeting,
        &[],
    )
    .await
    .unwrap_err();
    assert!(
        e.message().contains("sbom generator cannot be empty"),
        "{e:?}"
    );
}

/// TestSBOMSupplements: the core SPDX SBOM of a result gets, for each file it lists that the
/// image has, `layerID: <digest of the pushed layer holding it>`; a file the image lacks keeps
/// no comment.
#[tokio::test(flavor = "multi_thread")]
async fn core_sbom_files_get_the_layer_holding_them() {
    require_root();
    let reg = integration::Registry::start().unwrap();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let addr = reg.addr();
    let name = format!("{addr}/berth-test/attsbom:v1");
    build(&c, &[("name", &name), ("push", "true")], Attach::Spdx)
        .await
        .unwrap();
    let got = pushed(addr, "berth-test/attsbom", &name).await;
    for (img, stmts) in got {
        let m = fetch(&format!("{addr}/berth-test/attsbom@{img}")).await;
        let mf: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap();
        let layer = mf["layers"][0]["digest"].as_str().unwrap();
        assert_eq!(stmts.len(), 1);
        let doc = &stmts[0]["predicate"];
        assert_eq!(doc["SPDXID"], "DOCUMENT");
        assert_eq!(doc["files"][0]["fileName"], "/greeting");
        assert_eq!(
            doc["files"][0]["comment"],
            format!("layerID: {layer}").as_str()
        );
        assert!(doc["files"][1].get("comment").is_none(), "{doc}");
    }
}

/// A single result with an attestation of its platform, exported with `type=local`: the
/// statement lies beside the result's files (no platform directory), its self subjects being
/// those files, as buildkitd's local exporter writes a result that is not a ref map.
#[tokio::test(flavor = "multi_thread")]
async fn local_output_of_a_single_result_carries_its_statement() {
    require_root();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("local");
    let platforms = serde_json::json!({"Platforms": [{"ID": "linux/amd64",
        "Platform": {"os": "linux", "architecture": "amd64"}}]});
    build_single_to(
        &c,
        "local",
        Output::Local(out.clone()),
        &[("attestation-prefix", "att.")],
        &[],
        definition_of(files_op(&[
            ("/greeting", "hello world!"),
            ("/att.json", SUCCESS),
        ])),
        &[("refs.platforms", platforms.to_string())],
        Some("/att.json"),
    )
    .await
    .unwrap();
    // into Docker's image store, which holds no index: the image alone, the same image as
    // without the attestation (buildkitd's image exporter would store an index in containerd)
    let engine = integration::DockerEngine::system().unwrap();
    let name = format!("{}:v1", integration::unique_name("berth-test/attsingle"));
    let mut ids = vec![];
    for attest in [Some("/att.json"), None] {
        let r = build_single_to(
            &c,
            "image",
            Output::None,
            &[("name", name.as_str())],
            &[],
            definition_of(files_op(&[("/att.json", SUCCESS)])),
            &[("refs.platforms", platforms.to_string())],
            attest,
        )
        .await
        .unwrap_or_else(|e| panic!("image export: {e:?}\n{}", d.log_text()));
        let _img = integration::TestImage::adopt(&engine, &name).await.unwrap();
        let id = engine.inspect_image(&name).await.unwrap().id.unwrap();
        assert_eq!(
            r.exporter_response.get("containerimage.config.digest"),
            Some(&id)
        );
        ids.push(id);
    }
    assert_eq!(ids[0], ids[1]);
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["att.att.json", "att.json", "greeting"]);
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("att.att.json")).unwrap()).unwrap();
    assert_eq!(st["predicate"], serde_json::json!({"success": true}));
    assert_eq!(
        st["subject"],
        serde_json::json!([
            {"name": "att.json", "digest": {"sha256": sha256(SUCCESS.as_bytes())}},
            {"name": "greeting", "digest": {"sha256": sha256(b"hello world!")}},
        ])
    );
}
