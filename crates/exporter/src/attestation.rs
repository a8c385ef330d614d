//! In-toto attestations of a build result, as BuildKit v0.11.6 exports them
//! (`exporter/attestation/make.go`, `exporter/containerimage/writer.go`, `util/purl/image.go`).
//!
//! A frontend returns, per platform, attestations whose predicate is a file of a result (the
//! daemon reads it and un-bundles bundle directories into single statements); this module turns
//! them into in-toto statements and, for image exports, into the attestation manifest that an
//! index lists beside the platform's image:
//!
//! - a statement is `{"_type":"https://in-toto.io/Statement/v0.1","predicateType":…,"subject":[…],
//!   "predicate":…}`, written as Go's `encoding/json` writes it (compact, `<>&` escaped; the
//!   predicate file compacted, an empty file is `null`), indented by two spaces for the local and
//!   tar exporters;
//! - subjects: a `self` subject stands for the exported artefact (its default subjects: for an
//!   image, each name as a `pkg:docker/…` package URL with the platform and the image manifest's
//!   digest; for local/tar, each regular file with its sha256), named additionally by its own
//!   name when it has one; a `raw` subject is copied (`_` when unnamed). No subjects = one `self`;
//! - the attestation manifest: one `application/vnd.in-toto+json` layer per statement (annotated
//!   with `in-toto.io/predicate-type`), a config of platform `unknown/unknown` whose diffIDs are
//!   the layers' digests, listed in the index with platform `unknown/unknown` and the annotations
//!   `vnd.docker.reference.type=attestation-manifest`, `vnd.docker.reference.digest=<image>`.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::image::Platform;
use crate::{Error, Result};

/// `_type` of every statement (`intoto.StatementInTotoV01`).
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v0.1";
/// Media type of a statement layer.
pub const MEDIA_TYPE_IN_TOTO: &str = "application/vnd.in-toto+json";
/// Index descriptor annotation: what the manifest is.
pub const REFERENCE_TYPE: &str = "vnd.docker.reference.type";
/// Index descriptor annotation: the image manifest the attestations are about.
pub const REFERENCE_DIGEST: &str = "vnd.docker.reference.digest";
/// [`REFERENCE_TYPE`] of an attestation manifest.
pub const ATTESTATION_MANIFEST: &str = "attestation-manifest";
/// Layer annotation naming a statement's predicate type.
pub const PREDICATE_TYPE_ANNOTATION: &str = "in-toto.io/predicate-type";

/// A subject of an attestation as the frontend gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// `InTotoSubjectKindSelf`: the exported artefact (its default subjects), also under
    /// `name` when set.
    Own {
        /// An extra name for each default subject.
        name: String,
    },
    /// `InTotoSubjectKindRaw`: exactly this name (`_` when empty) and these digests
    /// (`algorithm:hex`).
    Raw {
        /// The subject's name.
        name: String,
        /// Its digests.
        digests: Vec<String>,
    },
}

/// One in-toto attestation, its predicate read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attestation {
    /// The file it came from in its result (local/tar name it by its base name).
    pub path: String,
    /// `predicateType`.
    pub predicate_type: String,
    /// Subjects (none = one [`Subject::Own`]).
    pub subjects: Vec<Subject>,
    /// The predicate file's bytes (JSON; empty = `null`).
    pub predicate: Vec<u8>,
    /// The result's core SBOM (`sbom-core` metadata naming its file): an SPDX one gets, for
    /// each file it lists, the layer of the image that holds the file ([`supplement_spdx`]).
    pub sbom_core: bool,
    /// A `mode=max` SLSA provenance's build steps (`step<i>:<output>`) with the layers of each
    /// step's result: a push lists, for the steps whose layers all have a blob, their
    /// descriptors ([`supplement_provenance`]).
    pub provenance_layers: Vec<(String, Vec<layerstore::snapshot::LayerRef>)>,
}

/// Key of BuildKit's metadata in a provenance predicate's `metadata`.
const BUILDKIT_METADATA: &str = "https://mobyproject.org/buildkit@v1#metadata";

/// A provenance predicate with `layers` (in its BuildKit metadata) set to the descriptors of
/// each step of `steps` whose layers `find` all knows (BuildKit's provenance `addLayers`:
/// `step<i>:<output>` → the list of layer chains of that step's result). `None` when no step
/// qualifies or the predicate is not a JSON object.
pub fn supplement_provenance(
    predicate: &[u8],
    steps: &[(String, Vec<layerstore::snapshot::LayerRef>)],
    find: &dyn Fn(&layerstore::snapshot::LayerRef) -> Option<serde_json::Value>,
) -> Option<Vec<u8>> {
    let mut layers = serde_json::Map::new();
    for (step, chain) in steps {
        if chain.is_empty() {
            continue;
        }
        let descs: Option<Vec<serde_json::Value>> = chain.iter().map(find).collect();
        if let Some(d) = descs {
            layers.insert(step.clone(), serde_json::json!([d]));
        }
    }
    if layers.is_empty() {
        return None;
    }
    let Ok(serde_json::Value::Object(mut pred)) = serde_json::from_slice(predicate) else {
        return None;
    };
    let meta = pred
        .entry("metadata")
        .or_insert_with(|| serde_json::json!({}))
        .as_object_mut()?
        .entry(BUILDKIT_METADATA)
        .or_insert_with(|| serde_json::json!({}))
        .as_object_mut()?;
    meta.insert("layers".into(), serde_json::Value::Object(layers));
    Some(serde_json::to_vec_pretty(&pred).expect("JSON value serialises"))
}

/// `predicateType` of SPDX SBOMs.
pub const PREDICATE_SPDX: &str = "https://spdx.dev/Document";

/// An SPDX document whose `files` without `comment` get `layerID: <digest>` of the layer `find`
/// names for their `fileName`, and a `Tool: berth-<version>` creator (BuildKit's
/// `supplementSBOM`). `None` when it is not an SPDX JSON document (left as it is).
pub fn supplement_spdx(
    predicate: &[u8],
    find: &mut dyn FnMut(&str) -> Result<Option<String>>,
) -> Result<Option<Vec<u8>>> {
    let Ok(serde_json::Value::Object(mut doc)) = serde_json::from_slice(predicate) else {
        return Ok(None);
    };
    if let Some(serde_json::Value::Array(files)) = doc.get_mut("files") {
        for f in files.iter_mut() {
            let Some(f) = f.as_object_mut() else { continue };
            if f.get("comment")
                .and_then(|c| c.as_str())
                .is_some_and(|c| !c.is_empty())
            {
                continue;
            }
            let Some(name) = f.get("fileName").and_then(|n| n.as_str()) else {
                continue;
            };
            if let Some(layer) = find(name)? {
                f.insert("comment".into(), format!("layerID: {layer}").into());
            }
        }
    }
    let info = doc
        .entry("creationInfo")
        .or_insert_with(|| serde_json::json!({}));
    if let Some(info) = info.as_object_mut() {
        let creators = info
            .entry("creators")
            .or_insert_with(|| serde_json::json!([]));
        if let Some(c) = creators.as_array_mut() {
            c.push(format!("Tool: berth-{}", env!("CARGO_PKG_VERSION")).into());
        }
    }
    Ok(Some(
        serde_json::to_vec(&doc).expect("JSON value serialises"),
    ))
}

/// A subject the exported artefact stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultSubject {
    /// Its name (a package URL for images, a path for files).
    pub name: String,
    /// Its digest, `algorithm:hex`.
    pub digest: String,
}

/// The statement of `att` as Go's `json.Marshal` writes it.
pub fn statement(att: &Attestation, defaults: &[DefaultSubject]) -> Result<Vec<u8>> {
    let bad = |reason: String| Error::InvalidAttestation {
        path: att.path.clone(),
        reason,
    };
    let predicate = if att.predicate.is_empty() {
        b"null".to_vec()
    } else {
        serde_json::from_slice::<serde::de::IgnoredAny>(&att.predicate)
            .map_err(|e| bad(format!("predicate is not JSON: {e}")))?;
        compact(&att.predicate)
    };
    let own = [Subject::Own {
        name: String::new(),
    }];
    let subjects = if att.subjects.is_empty() {
        &own[..]
    } else {
        &att.subjects[..]
    };
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for s in subjects {
        match s {
            Subject::Own { name } => {
                for d in defaults {
                    out.push((d.name.clone(), vec![d.digest.clone()]));
                    if !name.is_empty() && name != "_" {
                        out.push((name.clone(), vec![d.digest.clone()]));
                    }
                }
            }
            Subject::Raw { name, digests } => {
                let name = if name.is_empty() { "_" } else { name };
                out.push((name.to_string(), digests.clone()));
            }
        }
    }
    let mut w = Vec::with_capacity(256 + predicate.len());
    w.extend_from_slice(b"{\"_type\":");
    go_string(&mut w, STATEMENT_TYPE);
    w.extend_from_slice(b",\"predicateType\":");
    go_string(&mut w, &att.predicate_type);
    w.extend_from_slice(b",\"subject\":[");
    for (i, (name, digests)) in out.iter().enumerate() {
        if i > 0 {
            w.push(b',');
        }
        w.extend_from_slice(b"{\"name\":");
        go_string(&mut w, name);
        w.extend_from_slice(b",\"digest\":{");
        // Go writes a map's keys sorted; a later digest of one algorithm wins.
        let map: BTreeMap<&str, &str> = digests
            .iter()
            .map(|d| d.split_once(':').unwrap_or(("", d.as_str())))
            .collect();
        for (j, (alg, hex)) in map.iter().enumerate() {
            if j > 0 {
                w.push(b',');
            }
            go_string(&mut w, alg);
            w.push(b':');
            go_string(&mut w, hex);
        }
        w.extend_from_slice(b"}}");
    }
    w.extend_from_slice(b"],\"predicate\":");
    w.extend_from_slice(&predicate);
    w.push(b'}');
    Ok(w)
}

/// A JSON string as Go's encoder writes it (HTML characters and U+2028/U+2029 escaped).
fn go_string(w: &mut Vec<u8>, s: &str) {
    w.push(b'"');
    for c in s.chars() {
        match c {
            '"' => w.extend_from_slice(b"\\\""),
            '\\' => w.extend_from_slice(b"\\\\"),
            '\n' => w.extend_from_slice(b"\\n"),
            '\r' => w.extend_from_slice(b"\\r"),
            '\t' => w.extend_from_slice(b"\\t"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                w.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes())
            }
            c if (c as u32) < 0x20 => {
                w.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes())
            }
            c => {
                let mut b = [0u8; 4];
                w.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
    w.push(b'"');
}

/// Valid JSON without insignificant whitespace, HTML characters in strings escaped (Go's
/// `json.Compact` with HTML escaping, as `json.Marshal` applies to a `json.RawMessage`).
fn compact(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len());
    let mut in_str = false;
    let mut esc = false;
    let mut i = 0;
    while i < src.len() {
        let c = src[i];
        if in_str {
            if esc {
                esc = false;
                out.push(c);
            } else if c == b'\\' {
                esc = true;
                out.push(c);
            } else if c == b'"' {
                in_str = false;
                out.push(c);
            } else if c == b'<' || c == b'>' || c == b'&' {
                out.extend_from_slice(format!("\\u{:04x}", c).as_bytes());
            } else if c == 0xE2
                && i + 2 < src.len()
                && src[i + 1] == 0x80
                && (src[i + 2] == 0xA8 || src[i + 2] == 0xA9)
            {
                out.extend_from_slice(if src[i + 2] == 0xA8 {
                    b"\\u2028"
                } else {
                    b"\\u2029"
                });
                i += 2;
            } else {
                out.push(c);
            }
        } else if c == b'"' {
            in_str = true;
            out.push(c);
        } else if !matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
            out.push(c);
        }
        i += 1;
    }
    out
}

/// Compact JSON indented as Go's `json.MarshalIndent(v, "", "  ")` writes it.
pub fn indent(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len() * 2);
    let mut depth = 0usize;
    let mut in_str = false;
    let mut esc = false;
    let newline = |out: &mut Vec<u8>, depth: usize| {
        out.push(b'\n');
        for _ in 0..depth {
            out.extend_from_slice(b"  ");
        }
    };
    let mut i = 0;
    while i < src.len() {
        let c = src[i];
        if in_str {
            out.push(c);
            if esc {
                esc = false;
            } else if c == b'\\' {
                esc = true;
            } else if c == b'"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        match c {
            b'"' => {
                in_str = true;
                out.push(c);
            }
            b'{' | b'[' => {
                out.push(c);
                let close = if c == b'{' { b'}' } else { b']' };
                if src.get(i + 1) == Some(&close) {
                    out.push(close);
                    i += 1;
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            b',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            b':' => out.extend_from_slice(b": "),
            _ => out.push(c),
        }
        i += 1;
    }
    out
}

/// The package URL of image `name` on `platform` (BuildKit's `purl.RefToPURL`):
/// `localhost:5000/a/b:v1` on linux/amd64 → `pkg:docker/localhost%3A5000/a/b@v1?platform=linux%2Famd64`.
pub fn purl(name: &str, platform: Option<&Platform>) -> Result<String> {
    let normalized = crate::oci::normalize_name(name)?;
    let (rest, digest) = match normalized.split_once('@') {
        Some((r, d)) => (r.to_string(), Some(d.to_string())),
        None => (normalized.clone(), None),
    };
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (repo, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest.as_str(), None),
    };
    let familiar = crate::oci::familiar_name(repo);
    let (ns, base) = match familiar.rsplit_once('/') {
        Some((ns, b)) => (Some(ns), b),
        None => (None, familiar.as_str()),
    };
    let mut out = String::from("pkg:docker/");
    if let Some(ns) = ns {
        for seg in ns.split('/') {
            out.push_str(&escape(seg, false));
            out.push('/');
        }
    }
    out.push_str(&escape(base, false));
    if let Some(t) = tag {
        out.push('@');
        out.push_str(&escape(t, true));
    }
    let mut q = Vec::new();
    if let Some(d) = digest {
        q.push(format!("digest={}", escape(&d, true)));
    }
    if let Some(p) = platform {
        q.push(format!("platform={}", escape(&format_platform(p), true)));
    }
    if !q.is_empty() {
        out.push('?');
        out.push_str(&q.join("&"));
    }
    Ok(out)
}

/// `os/arch[/variant]` of a platform normalized as containerd's `platforms.Normalize` does
/// (arm64's `v8` and amd64's `v1` dropped, arm without variant is `v7`).
pub fn format_platform(p: &Platform) -> String {
    let variant = match (p.architecture.as_str(), p.variant.as_str()) {
        ("arm64", "v8" | "8") | ("amd64", "v1" | "1") => "",
        ("arm", "") => "v7",
        (_, v) => v,
    };
    if variant.is_empty() {
        format!("{}/{}", p.os, p.architecture)
    } else {
        format!("{}/{}/{variant}", p.os, p.architecture)
    }
}

/// Go's `url.PathEscape` (`path = true`) or `url.QueryEscape`.
fn escape(s: &str, path: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let keep = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (path && matches!(b, b'$' | b'&' | b'+' | b':' | b'=' | b'@'));
        if keep {
            out.push(b as char);
        } else if b == b' ' && !path {
            out.push('+');
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An attestation manifest ready to push or write: its JSON, digest and blobs.
#[derive(Debug, Clone)]
pub struct AttestationManifest {
    /// The manifest JSON.
    pub manifest: Vec<u8>,
    /// Its digest.
    pub digest: String,
    /// Its media type.
    pub media_type: &'static str,
    /// The config JSON.
    pub config: Vec<u8>,
    /// One statement per layer, in manifest order.
    pub layers: Vec<Vec<u8>>,
}

#[derive(Serialize)]
struct Desc<'a> {
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    digest: String,
    size: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<&'static str, &'a str>,
}

#[derive(Serialize)]
struct Manifest<'a> {
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    config: Desc<'a>,
    layers: Vec<Desc<'a>>,
}

#[derive(Serialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<String>,
}

#[derive(Serialize)]
struct Config {
    architecture: &'static str,
    os: &'static str,
    config: BTreeMap<String, String>,
    rootfs: RootFs,
}

/// The attestation manifest over `statements` (each with its predicate type): OCI media
/// types with `oci`, else Docker's.
pub fn attestation_manifest(statements: &[(String, Vec<u8>)], oci: bool) -> AttestationManifest {
    let digests: Vec<String> = statements.iter().map(|(_, b)| sha256(b)).collect();
    let config = serde_json::to_vec(&Config {
        architecture: "unknown",
        os: "unknown",
        config: BTreeMap::new(),
        rootfs: RootFs {
            kind: "layers",
            diff_ids: digests.clone(),
        },
    })
    .expect("config serialises");
    let (media_type, config_type) = if oci {
        (
            registry::MEDIA_TYPE_OCI_MANIFEST,
            "application/vnd.oci.image.config.v1+json",
        )
    } else {
        (
            registry::MEDIA_TYPE_DOCKER_MANIFEST,
            "application/vnd.docker.container.image.v1+json",
        )
    };
    let manifest = serde_json::to_vec_pretty(&Manifest {
        media_type,
        schema_version: 2,
        config: Desc {
            media_type: config_type,
            digest: sha256(&config),
            size: config.len() as u64,
            annotations: BTreeMap::new(),
        },
        layers: statements
            .iter()
            .zip(&digests)
            .map(|((pt, b), d)| Desc {
                media_type: MEDIA_TYPE_IN_TOTO,
                digest: d.clone(),
                size: b.len() as u64,
                annotations: BTreeMap::from([(PREDICATE_TYPE_ANNOTATION, pt.as_str())]),
            })
            .collect(),
    })
    .expect("manifest serialises");
    AttestationManifest {
        digest: sha256(&manifest),
        manifest,
        media_type,
        config,
        layers: statements.iter().map(|(_, b)| b.clone()).collect(),
    }
}

fn sha256(b: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn platform(os: &str, arch: &str, variant: &str) -> Platform {
        Platform {
            os: os.into(),
            architecture: arch.into(),
            variant: variant.into(),
        }
    }

    #[test]
    fn package_urls() {
        // The cases of BuildKit's util/purl tests, and a registry with a port.
        let d = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let amd64 = platform("linux", "amd64", "");
        let cases: &[(&str, Option<&Platform>, String)] = &[
            ("alpine", None, "pkg:docker/alpine@latest".into()),
            ("library/alpine:3.15", None, "pkg:docker/alpine@3.15".into()),
            ("docker.io/library/alpine:latest", None, "pkg:docker/alpine@latest".into()),
            (
                &*Box::leak(format!("docker.io/library/alpine:latest@{d}").into_boxed_str()),
                None,
                format!("pkg:docker/alpine@latest?digest={d}"),
            ),
            (
                &*Box::leak(format!("docker.io/library/alpine@{d}").into_boxed_str()),
                None,
                format!("pkg:docker/alpine?digest={d}"),
            ),
            ("user/test:v2", None, "pkg:docker/user/test@v2".into()),
            ("ghcr.io/foo/bar:v2", None, "pkg:docker/ghcr.io/foo/bar@v2".into()),
            ("ghcr.io/foo/bar", None, "pkg:docker/ghcr.io/foo/bar@latest".into()),
            (
                "busybox",
                Some(&amd64),
                "pkg:docker/busybox@latest?platform=linux%2Famd64".into(),
            ),
            (
                "localhost:5000/buildkit/testattestationsfoo:latest",
                Some(&amd64),
                "pkg:docker/localhost%3A5000/buildkit/testattestationsfoo@latest?platform=linux%2Famd64"
                    .into(),
            ),
        ];
        for (name, p, want) in cases {
            assert_eq!(&purl(name, *p).unwrap(), want, "{name}");
        }
        let arm = platform("linux", "arm64", "v8");
        assert_eq!(
            purl("busybox", Some(&arm)).unwrap(),
            "pkg:docker/busybox@latest?platform=linux%2Farm64"
        );
        assert!(purl("inv:al:id", None).is_err());
    }

    #[test]
    fn statements_as_go_writes_them() {
        let defaults = [
            DefaultSubject {
                name: "a".into(),
                digest: "sha256:aa".into(),
            },
            DefaultSubject {
                name: "b".into(),
                digest: "sha256:bb".into(),
            },
        ];
        let att = |subjects: Vec<Subject>, predicate: &[u8]| Attestation {
            path: "/p.json".into(),
            predicate_type: "https://example.com/t".into(),
            subjects,
            predicate: predicate.to_vec(),
            sbom_core: false,
            provenance_layers: vec![],
        };
        let head = "{\"_type\":\"https://in-toto.io/Statement/v0.1\",\"predicateType\":\"https://example.com/t\",";
        let cases: Vec<(Attestation, String)> = vec![
            (
                att(vec![], b"{\"success\": true,\n \"x\": \"<a & b>\"}"),
                format!("{head}\"subject\":[{{\"name\":\"a\",\"digest\":{{\"sha256\":\"aa\"}}}},{{\"name\":\"b\",\"digest\":{{\"sha256\":\"bb\"}}}}],\"predicate\":{{\"success\":true,\"x\":\"\\u003ca \\u0026 b\\u003e\"}}}}"),
            ),
            (
                att(
                    vec![Subject::Raw {
                        name: "/attestation.json".into(),
                        digests: vec!["sha256:cc".into()],
                    }],
                    b"",
                ),
                format!("{head}\"subject\":[{{\"name\":\"/attestation.json\",\"digest\":{{\"sha256\":\"cc\"}}}}],\"predicate\":null}}"),
            ),
            (
                att(
                    vec![
                        Subject::Own { name: "n".into() },
                        Subject::Raw {
                            name: String::new(),
                            digests: vec![],
                        },
                    ],
                    b"[1, 2]",
                ),
                format!("{head}\"subject\":[{{\"name\":\"a\",\"digest\":{{\"sha256\":\"aa\"}}}},{{\"name\":\"n\",\"digest\":{{\"sha256\":\"aa\"}}}},{{\"name\":\"b\",\"digest\":{{\"sha256\":\"bb\"}}}},{{\"name\":\"n\",\"digest\":{{\"sha256\":\"bb\"}}}},{{\"name\":\"_\",\"digest\":{{}}}}],\"predicate\":[1,2]}}"),
            ),
        ];
        for (a, want) in cases {
            let got = statement(&a, &defaults).unwrap();
            assert_eq!(String::from_utf8(got.clone()).unwrap(), want);
            serde_json::from_slice::<serde_json::Value>(&got).unwrap();
        }
        let e = statement(&att(vec![], b"{nope"), &defaults).unwrap_err();
        assert!(e.to_string().contains("/p.json"), "{e}");
    }

    #[test]
    fn spdx_files_get_their_layer() {
        let doc = br#"{"SPDXID":"DOCUMENT","files":[{"fileName":"/foo"},{"fileName":"/bar"},{"fileName":"/c","comment":"kept"}]}"#;
        let mut asked = vec![];
        let out = supplement_spdx(doc, &mut |n| {
            asked.push(n.to_string());
            Ok((n == "/foo").then(|| "sha256:ab".to_string()))
        })
        .unwrap()
        .unwrap();
        assert_eq!(asked, ["/foo", "/bar"]);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["files"][0]["comment"], "layerID: sha256:ab");
        assert!(v["files"][1].get("comment").is_none());
        assert_eq!(v["files"][2]["comment"], "kept");
        assert_eq!(v["SPDXID"], "DOCUMENT");
        assert!(v["creationInfo"]["creators"][0]
            .as_str()
            .unwrap()
            .starts_with("Tool: berth-"));
        assert!(supplement_spdx(b"[1]", &mut |_| Ok(None))
            .unwrap()
            .is_none());
    }

    #[test]
    fn indent_like_go() {
        let src = br#"{"a":[],"b":{},"c":[1,{"d":"x,:{"}],"e":null}"#;
        let want = "{\n  \"a\": [],\n  \"b\": {},\n  \"c\": [\n    1,\n    {\n      \"d\": \"x,:{\"\n    }\n  ],\n  \"e\": null\n}";
        assert_eq!(String::from_utf8(indent(src)).unwrap(), want);
    }

    #[test]
    fn attestation_manifest_lists_statements_as_layers() {
        let s = vec![("https://example.com/t".to_string(), b"{}".to_vec())];
        let m = attestation_manifest(&s, true);
        let v: serde_json::Value = serde_json::from_slice(&m.manifest).unwrap();
        assert_eq!(v["mediaType"], registry::MEDIA_TYPE_OCI_MANIFEST);
        assert_eq!(v["layers"][0]["mediaType"], MEDIA_TYPE_IN_TOTO);
        assert_eq!(v["layers"][0]["digest"], sha256(b"{}"));
        assert_eq!(
            v["layers"][0]["annotations"][PREDICATE_TYPE_ANNOTATION],
            "https://example.com/t"
        );
        assert_eq!(v["config"]["digest"], sha256(&m.config));
        let c: serde_json::Value = serde_json::from_slice(&m.config).unwrap();
        assert_eq!(c["os"], "unknown");
        assert_eq!(c["architecture"], "unknown");
        assert_eq!(c["rootfs"]["diff_ids"][0], sha256(b"{}"));
        assert_eq!(m.digest, sha256(&m.manifest));
    }

    #[test]
    fn provenance_gets_the_layers_of_steps_with_blobs() {
        use layerstore::snapshot::{DockerLayer, LayerRef, WhiteoutFormat};
        let layer = |n: &str| {
            LayerRef::Docker(DockerLayer {
                chain_id: format!("sha256:c{n}"),
                diff_id: format!("sha256:d{n}"),
                diff_dir: format!("/d/{n}").into(),
                whiteouts: WhiteoutFormat::Overlay,
                blob: None,
            })
        };
        let find = |r: &LayerRef| match r {
            LayerRef::Docker(d) if d.diff_id != "sha256:d3" => {
                Some(serde_json::json!({"digest": d.diff_id.replace("sha256:d", "sha256:b")}))
            }
            _ => None,
        };
        let steps = vec![
            ("step0:0".to_string(), vec![layer("1")]),
            ("step1:0".to_string(), vec![layer("1"), layer("2")]),
            // a layer without a blob: the step is left out
            ("step2:0".to_string(), vec![layer("1"), layer("3")]),
            ("step3:0".to_string(), vec![]),
        ];
        let pred =
            br#"{"metadata":{"https://mobyproject.org/buildkit@v1#metadata":{"vcs":{"a":"b"}}}}"#;
        let out = supplement_provenance(pred, &steps, &find).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["metadata"][BUILDKIT_METADATA],
            serde_json::json!({"vcs": {"a": "b"}, "layers": {
                "step0:0": [[{"digest": "sha256:b1"}]],
                "step1:0": [[{"digest": "sha256:b1"}, {"digest": "sha256:b2"}]],
            }})
        );
        assert!(supplement_provenance(pred, &steps[2..], &find).is_none());
        assert!(supplement_provenance(b"not json", &steps, &find).is_none());
    }
}
