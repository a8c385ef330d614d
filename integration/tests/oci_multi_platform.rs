//! `type=oci` of a multi-platform result (a gateway client returning a ref map with
//! `refs.platforms`), as BuildKit v0.11.6 writes it: an OCI image layout tar whose `index.json`
//! names an image index (one entry per name, with the `annotation-index-descriptor.*`
//! annotations), the index listing one manifest per platform in the frontend's order with its
//! platform and `annotation-manifest-descriptor[…]` annotations, each manifest carrying its
//! `annotation-manifest[…]` annotations, its platform's config and the platform's files; the
//! response names the index. `type=docker` refuses a ref map with buildkitd's words, and a
//! single result with attestations becomes an index of its platform and an attestation manifest.
//! Annotations come both from the result's metadata and the exporter attributes.

use integration::buildkit_client::{
    new_id, with_build_id, Attachables, Berthd, BuildkitClient, Output,
};
use integration::require_root;
use prost::Message;
use protos::moby::buildkit::v1 as control;
use protos::moby::buildkit::v1::frontend as gw;
use protos::pb::{self, file_action::Action, op::Op as OpKind};
use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

/// The frontend's platforms (`ID` = the formatted platform), in its order.
const PLATFORMS: [(&str, &str, &str, &str); 3] = [
    ("linux/amd64", "linux", "amd64", ""),
    ("linux/arm/v7", "linux", "arm", "v7"),
    ("windows/amd64", "windows", "amd64", ""),
];

/// The single result's `/greeting` (JSON: it is also the predicate of its attestation).
const SINGLE: &str = r#"{"single": true}"#;

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn sha256(b: &[u8]) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b))
}

/// A definition making `/greeting` with `data` on scratch.
fn greeting_def(data: &str) -> pb::Definition {
    let op = pb::Op {
        op: Some(OpKind::File(pb::FileOp {
            actions: vec![pb::FileAction {
                input: -1,
                secondary_input: -1,
                output: 0,
                action: Some(Action::Mkfile(pb::FileActionMkFile {
                    path: "/greeting".into(),
                    mode: 0o644,
                    data: data.as_bytes().to_vec().into(),
                    timestamp: -1,
                    ..Default::default()
                })),
            }],
        })),
        ..Default::default()
    }
    .encode_to_vec();
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

async fn solve(c: &BuildkitClient, build_ref: &str, data: &str) -> gw::Ref {
    let res = c
        .gateway()
        .solve(with_build_id(
            gw::SolveRequest {
                definition: Some(greeting_def(data)),
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

/// What the frontend returns.
enum Returned {
    /// A ref map over [`PLATFORMS`] (`/greeting` = `hello <platform>`), a config with a label
    /// for each platform but the last, and these metadata entries.
    Multi(Vec<(String, String)>),
    /// One ref (`/greeting` = [`SINGLE`]), with `true` an attestation of linux/amd64 (that file
    /// of the result as predicate).
    Single(bool),
}

/// A gateway build exported with `exporter` and `attrs` into a file target at `out`.
async fn build(
    c: &BuildkitClient,
    exporter: &str,
    out: &std::path::Path,
    attrs: &[(&str, &str)],
    returned: Returned,
) -> Result<control::SolveResponse, tonic::Status> {
    let mut session = c
        .open_session(Attachables {
            output: Output::Tar(out.to_path_buf()),
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
    let result = match returned {
        Returned::Multi(extra) => {
            let mut refs = BTreeMap::new();
            let mut md = BTreeMap::new();
            let mut platforms = vec![];
            for (i, (id, os, arch, variant)) in PLATFORMS.iter().enumerate() {
                refs.insert(
                    id.to_string(),
                    solve(c, &build_ref, &format!("hello {id}")).await,
                );
                platforms.push(serde_json::json!({"ID": id, "Platform":
                    {"os": os, "architecture": arch, "variant": variant}}));
                if i + 1 < PLATFORMS.len() {
                    let config = serde_json::json!({"os": os, "architecture": arch,
                        "variant": variant, "config": {"Labels": {"target": id}}});
                    md.insert(
                        format!("containerimage.config/{id}"),
                        bytes::Bytes::from(config.to_string()),
                    );
                }
            }
            md.insert(
                "refs.platforms".to_string(),
                bytes::Bytes::from(serde_json::json!({ "Platforms": platforms }).to_string()),
            );
            for (k, v) in extra {
                md.insert(k, bytes::Bytes::from(v));
            }
            gw::Result {
                result: Some(gw::result::Result::Refs(gw::RefMap { refs })),
                metadata: md,
                attestations: Default::default(),
            }
        }
        Returned::Single(attested) => {
            let r = solve(c, &build_ref, SINGLE).await;
            let a = gw::Attestation {
                r#ref: Some(r.clone()),
                path: "/greeting".into(),
                in_toto_predicate_type: "https://example.com/attestations/v1.0".into(),
                ..Default::default()
            };
            gw::Result {
                result: Some(gw::result::Result::Ref(r)),
                metadata: Default::default(),
                attestations: BTreeMap::from([(
                    "linux/amd64".to_string(),
                    gw::Attestations {
                        attestation: vec![a],
                    },
                )])
                .into_iter()
                .filter(|_| attested)
                .collect(),
            }
        }
    };
    c.gateway()
        .r#return(with_build_id(
            gw::ReturnRequest {
                result: Some(result),
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

/// The files of a tar (every entry once: a repeated path fails the test).
fn tar_files(data: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut ar = tar::Archive::new(data);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.header().entry_type().is_dir() {
            continue;
        }
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let mut b = vec![];
        e.read_to_end(&mut b).unwrap();
        assert!(files.insert(path.clone(), b).is_none(), "{path} twice");
    }
    files
}

fn json(files: &BTreeMap<String, Vec<u8>>, digest: &str) -> serde_json::Value {
    let hex = digest.strip_prefix("sha256:").unwrap();
    let b = files
        .get(&format!("blobs/sha256/{hex}"))
        .unwrap_or_else(|| panic!("no blob {digest}"));
    assert_eq!(sha256(b), hex, "blob {digest} does not hash to its name");
    serde_json::from_slice(b).unwrap()
}

fn gunzip(b: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    flate2::read::GzDecoder::new(b)
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn oci_tar_of_a_multi_platform_result_is_an_index_with_annotations() {
    require_root();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.tar");
    let created = "2022-01-23T12:34:56Z";
    let md = vec![
        ("annotation-index.gi".into(), "generic index".into()),
        ("annotation.gd".into(), "generic default".into()),
        (
            "annotation-manifest-descriptor.gmd".into(),
            "generic manifest descriptor".into(),
        ),
        (
            "annotation-manifest[linux/arm/v7].m".into(),
            "arm manifest".into(),
        ),
    ];
    let resp = build(
        &c,
        "oci",
        &out,
        &[
            (
                "name",
                "example.com/berth/multi:v1,example.com/berth/multi:v2",
            ),
            ("annotation-index.gio", "generic index opt"),
            (
                "annotation-index-descriptor.gido",
                "generic index descriptor opt",
            ),
            (
                "annotation-index-descriptor.org.opencontainers.image.created",
                created,
            ),
            ("annotation-manifest.gmo", "generic manifest opt"),
            (
                "annotation-manifest-descriptor[windows/amd64].mdo",
                "windows manifest descriptor opt",
            ),
        ],
        Returned::Multi(md),
    )
    .await
    .unwrap();
    let files = tar_files(&std::fs::read(&out).unwrap());
    assert_eq!(
        files["oci-layout"],
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()
    );

    // index.json: the index, once per name
    let layout: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let entries = layout["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{layout}");
    let digest = entries[0]["digest"].as_str().unwrap().to_string();
    for (e, tag) in entries.iter().zip(["v1", "v2"]) {
        assert_eq!(e["mediaType"], INDEX);
        assert_eq!(e["digest"], digest.as_str());
        let a = &e["annotations"];
        assert_eq!(a["gido"], "generic index descriptor opt");
        assert_eq!(a["org.opencontainers.image.created"], created);
        assert_eq!(a["org.opencontainers.image.ref.name"], tag);
        assert_eq!(
            a["io.containerd.image.name"],
            format!("example.com/berth/multi:{tag}")
        );
    }

    // the response names the index; an index has no config digest
    let r = &resp.exporter_response;
    assert_eq!(r["containerimage.digest"], digest);
    assert!(!r.contains_key("containerimage.config.digest"), "{r:?}");
    assert_eq!(
        r["image.name"],
        "example.com/berth/multi:v1,example.com/berth/multi:v2"
    );
    use base64::Engine as _;
    let desc: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(&r["containerimage.descriptor"])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(desc["digest"], digest.as_str());
    assert_eq!(desc["mediaType"], INDEX);
    assert_eq!(desc["annotations"]["gido"], "generic index descriptor opt");

    // the index: one manifest per platform, in order, with their descriptors' annotations
    let index = json(&files, &digest);
    assert_eq!(index["mediaType"], INDEX);
    assert_eq!(index["annotations"]["gi"], "generic index");
    assert_eq!(index["annotations"]["gio"], "generic index opt");
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), PLATFORMS.len(), "{index}");
    for (i, (m, (id, os, arch, variant))) in manifests.iter().zip(PLATFORMS).enumerate() {
        assert_eq!(m["mediaType"], MANIFEST);
        assert_eq!(m["platform"]["os"], os, "{m}");
        assert_eq!(m["platform"]["architecture"], arch, "{m}");
        assert_eq!(
            m["platform"]["variant"].as_str().unwrap_or(""),
            variant,
            "{m}"
        );
        let a = &m["annotations"];
        assert_eq!(a["gmd"], "generic manifest descriptor", "{m}");
        let windows = (id == "windows/amd64").then_some("windows manifest descriptor opt");
        assert_eq!(a["mdo"].as_str(), windows, "{m}");

        let mfst = json(&files, m["digest"].as_str().unwrap());
        assert_eq!(mfst["mediaType"], MANIFEST);
        let a = &mfst["annotations"];
        assert_eq!(a["gd"], "generic default", "{mfst}");
        assert_eq!(a["gmo"], "generic manifest opt", "{mfst}");
        let arm = (id == "linux/arm/v7").then_some("arm manifest");
        assert_eq!(a["m"].as_str(), arm, "{mfst}");

        // the platform's config: the frontend's (with its label) or the default one
        let config = json(&files, mfst["config"]["digest"].as_str().unwrap());
        assert_eq!(config["os"], os);
        assert_eq!(config["architecture"], arch);
        let label = (i + 1 < PLATFORMS.len()).then_some(id);
        assert_eq!(
            config["config"]["Labels"]["target"].as_str(),
            label,
            "{config}"
        );

        // one gzip layer holding the platform's file
        let layers = mfst["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1, "{mfst}");
        assert_eq!(
            layers[0]["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        let hex = layers[0]["digest"].as_str().unwrap();
        let blob = &files[&format!("blobs/sha256/{}", &hex[7..])];
        assert_eq!(sha256(blob), hex[7..]);
        let tree = tar_files(&gunzip(blob));
        assert_eq!(
            tree.get("greeting")
                .map(|b| String::from_utf8_lossy(b).into_owned()),
            Some(format!("hello {id}")),
            "{:?}",
            tree.keys()
        );
    }

    // Annotations naming a platform the result lacks are refused.
    let e = build(
        &c,
        "oci",
        &out,
        &[("annotation-manifest[linux/s390x].m", "x")],
        Returned::Multi(vec![]),
    )
    .await
    .unwrap_err();
    assert!(
        e.message()
            .contains("invalid annotation: no platform linux/s390x found in source"),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_refuses_a_multi_platform_result_and_oci_indexes_a_single_attested_one() {
    require_root();
    let d = Berthd::start(&[]).unwrap();
    let c = d.client().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.tar");

    let e = build(&c, "docker", &out, &[], Returned::Multi(vec![]))
        .await
        .unwrap_err();
    assert!(
        e.message()
            .contains("docker exporter does not currently support exporting manifest lists"),
        "{e:?}"
    );

    // A single image has no index to annotate (buildkitd's words) ...
    let e = build(
        &c,
        "oci",
        &out,
        &[("annotation-index.x", "y")],
        Returned::Single(false),
    )
    .await
    .unwrap_err();
    assert!(
        e.message()
            .contains("index annotations not supported for single platform export"),
        "{e:?}"
    );
    // ... but one with attestations is an index: its image, then the attestation manifest
    let resp = build(
        &c,
        "oci",
        &out,
        &[
            ("annotation-index.x", "y"),
            ("name", "example.com/berth/single:v1"),
        ],
        Returned::Single(true),
    )
    .await
    .unwrap();
    let files = tar_files(&std::fs::read(&out).unwrap());
    let layout: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let digest = layout["manifests"][0]["digest"].as_str().unwrap();
    assert_eq!(resp.exporter_response["containerimage.digest"], digest);
    let index = json(&files, digest);
    assert_eq!(index["annotations"]["x"], "y");
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 2, "{index}");
    assert_eq!(manifests[0]["platform"]["architecture"], "amd64");
    let image = manifests[0]["digest"].as_str().unwrap();
    let att = &manifests[1];
    assert_eq!(att["platform"]["os"], "unknown");
    assert_eq!(
        att["annotations"]["vnd.docker.reference.digest"], image,
        "{att}"
    );
    assert_eq!(
        att["annotations"]["vnd.docker.reference.type"],
        "attestation-manifest"
    );
    let am = json(&files, att["digest"].as_str().unwrap());
    let layer = &am["layers"][0];
    assert_eq!(layer["mediaType"], "application/vnd.in-toto+json");
    let st = json(&files, layer["digest"].as_str().unwrap());
    assert_eq!(st["predicateType"], "https://example.com/attestations/v1.0");
    // its subject: the image by name (package URL) and manifest digest
    assert_eq!(
        st["subject"][0]["name"], "pkg:docker/example.com/berth/single@v1?platform=linux%2Famd64",
        "{st}"
    );
    assert_eq!(st["subject"][0]["digest"]["sha256"], image[7..], "{st}");
    let mfst = json(&files, image);
    let tree = tar_files(&gunzip(
        &files[&format!(
            "blobs/sha256/{}",
            &mfst["layers"][0]["digest"].as_str().unwrap()[7..]
        )],
    ));
    assert_eq!(tree["greeting"], SINGLE.as_bytes());
    assert_eq!(st["predicate"], serde_json::json!({"single": true}));
}
