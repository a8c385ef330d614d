//! Build information (`containerimage.buildinfo`, deprecated in BuildKit but still in v0.11.6's
//! Solve response): the sources a result was built from, as base64 of JSON
//! `{"sources":[{"type":…,"ref":…,"pin":…}]}` sorted by `ref` (BuildKit's
//! `util/buildinfo/types.BuildInfo`). Images are named as BuildKit normalizes them
//! (`docker.io/library/busybox:latest`); local sources are not listed, as in BuildKit.
//!
//! A build through a frontend also names it (`frontend`) and carries the frontend options that
//! can change the result (`attrs`: BuildKit's provenance `FilterArgs`: host-specific options,
//! `attest:*` and `cache-imports` left out, credentials in context URLs redacted).
//!
//! `pin` of an image is the digest the reference pins, else the one the worker resolved it to:
//! the digest of what the reference names in its registry (as buildkitd reports it), or, for
//! an image only Docker has (no registry knows it), Docker's image ID. A `name:tag@digest`
//! reference (what the Dockerfile frontend makes of a `FROM name:tag` it resolved) is named
//! `name:tag`, as buildkitd names the tag it resolved.
//!
//! Limits: for git and HTTP sources `pin` is given only when the definition pins the source
//! (`http.checksum`); buildkitd also reports the commit and content digest it resolved.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::Serialize;
use worker::ResultSource;

/// The response key.
pub const KEY: &str = "containerimage.buildinfo";

#[derive(Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
struct Source {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "ref")]
    reference: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pin: String,
}

#[derive(Debug, Serialize)]
struct BuildInfo<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    frontend: &'a str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    attrs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    sources: Vec<Source>,
}

/// `user:password@` of a URL replaced by `xxxxx:xxxxx@` (Go `urlutil.RedactCredentials`).
pub(crate) fn redact_credentials(s: &str) -> String {
    let Some((scheme, rest)) = s.split_once("://") else {
        return s.to_string();
    };
    let host_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..host_end].rfind('@') {
        Some(at) => {
            let user = &rest[..at];
            let masked = if user.contains(':') {
                "xxxxx:xxxxx"
            } else {
                "xxxxx"
            };
            format!("{scheme}://{masked}@{}", &rest[at + 1..])
        }
        None => s.to_string(),
    }
}

/// The frontend options kept in build information (provenance `FilterArgs`).
pub(crate) fn filter_args(opts: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    const HOST_SPECIFIC: &[&str] = &[
        "cgroup-parent",
        "image-resolve-mode",
        "platform",
        "cache-imports",
    ];
    let context_key = opts
        .get("contextkey")
        .filter(|v| !v.is_empty())
        .map(String::as_str)
        .unwrap_or("context");
    opts.iter()
        .filter(|(k, _)| !HOST_SPECIFIC.contains(&k.as_str()) && !k.starts_with("attest:"))
        .map(|(k, v)| {
            if k == context_key || k.starts_with("context:") {
                (k.clone(), redact_credentials(v))
            } else {
                (k.clone(), v.clone())
            }
        })
        .collect()
}

fn source(s: &ResultSource) -> Option<Source> {
    let (scheme, rest) = s.identifier.split_once("://")?;
    match scheme {
        "docker-image" => {
            let mut reference = exporter::normalize_name(rest).unwrap_or_else(|_| rest.to_string());
            let pin = match reference.split_once('@') {
                Some((named, digest)) => {
                    let digest = digest.to_string();
                    // `name:tag@digest` is what a frontend makes of `name:tag` once it resolved
                    // it; buildkitd names the tag it resolved (its `OptimizeImageSources`).
                    let last = named.rfind('/').map_or(0, |i| i + 1);
                    if named[last..].contains(':') {
                        reference = named.to_string();
                    }
                    digest
                }
                None => s.pin.clone(),
            };
            Some(Source {
                kind: "docker-image",
                reference,
                pin,
            })
        }
        "git" => {
            let url = s
                .attrs
                .get("git.fullurl")
                .cloned()
                .unwrap_or_else(|| format!("https://{rest}"));
            Some(Source {
                kind: "git",
                reference: url,
                pin: String::new(),
            })
        }
        "http" | "https" => Some(Source {
            kind: "http",
            reference: s.identifier.clone(),
            pin: s.attrs.get("http.checksum").cloned().unwrap_or_default(),
        }),
        _ => None,
    }
}

/// The `containerimage.buildinfo` value for a result built from `sources`, by `frontend` (name
/// and options) if one made it.
pub fn encode(
    sources: &[ResultSource],
    frontend: Option<(&str, &BTreeMap<String, String>)>,
) -> String {
    let mut sources: Vec<Source> = sources.iter().filter_map(source).collect();
    sources.sort_by(|a, b| a.reference.cmp(&b.reference));
    sources.dedup();
    let (frontend, attrs) = match frontend {
        Some((name, opts)) => (name, filter_args(opts)),
        None => ("", BTreeMap::new()),
    };
    let json = serde_json::to_vec(&BuildInfo {
        frontend,
        attrs,
        sources,
    })
    .expect("build info serialises");
    base64::engine::general_purpose::STANDARD.encode(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(id: &str, attrs: &[(&str, &str)]) -> ResultSource {
        ResultSource {
            identifier: id.to_string(),
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            pin: String::new(),
        }
    }

    #[test]
    fn image_pins_are_the_resolved_digests() {
        let d = format!("sha256:{}", "d".repeat(64));
        let w = format!("sha256:{}", "e".repeat(64));
        let mut resolved = src("docker-image://docker.io/library/busybox:latest", &[]);
        resolved.pin = w.clone();
        let v = decode(&encode(
            &[
                resolved,
                src(&format!("docker-image://alpine:3.18@{d}"), &[]),
                src("docker-image://scratchy", &[]),
            ],
            None,
        ));
        assert_eq!(
            v,
            serde_json::json!({"sources": [
                {"type": "docker-image", "ref": "docker.io/library/alpine:3.18", "pin": d},
                {"type": "docker-image", "ref": "docker.io/library/busybox:latest", "pin": w},
                {"type": "docker-image", "ref": "docker.io/library/scratchy:latest"},
            ]})
        );
    }

    fn decode(s: &str) -> serde_json::Value {
        let b = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
        serde_json::from_slice(&b).unwrap()
    }

    #[test]
    fn sources_are_normalized_sorted_and_local_ones_left_out() {
        let d = format!("sha256:{}", "a".repeat(64));
        let v = decode(&encode(
            &[
                src("local://context", &[]),
                src("docker-image://busybox:latest", &[]),
                src(&format!("docker-image://alpine@{d}"), &[]),
                src("https://example.com/f", &[("http.checksum", "sha256:abc")]),
                src(
                    "git://github.com/moby/buildkit#v1",
                    &[("git.fullurl", "https://github.com/moby/buildkit#v1")],
                ),
            ],
            None,
        ));
        assert_eq!(
            v,
            serde_json::json!({"sources": [
                {"type": "docker-image", "ref": format!("docker.io/library/alpine@{d}"), "pin": d},
                {"type": "docker-image", "ref": "docker.io/library/busybox:latest"},
                {"type": "http", "ref": "https://example.com/f", "pin": "sha256:abc"},
                {"type": "git", "ref": "https://github.com/moby/buildkit#v1"},
            ]})
        );
        assert_eq!(decode(&encode(&[], None)), serde_json::json!({}));
    }

    #[test]
    fn frontend_and_filtered_attrs() {
        let opts: BTreeMap<String, String> = [
            ("build-arg:foo", "bar"),
            ("platform", "linux/amd64"),
            ("attest:provenance", "mode=max"),
            ("context", "https://user:secret@example.com/repo.git"),
            ("context:base", "docker-image://alpine"),
            ("filename", "Dockerfile"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let v = decode(&encode(&[], Some(("dockerfile.v0", &opts))));
        assert_eq!(
            v,
            serde_json::json!({
                "frontend": "dockerfile.v0",
                "attrs": {
                    "build-arg:foo": "bar",
                    "context": "https://xxxxx:xxxxx@example.com/repo.git",
                    "context:base": "docker-image://alpine",
                    "filename": "Dockerfile",
                },
            })
        );
    }
}
