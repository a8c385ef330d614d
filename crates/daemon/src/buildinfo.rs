//! Build information (`containerimage.buildinfo`, deprecated in BuildKit but still in v0.11.6's
//! Solve response): the sources a result was built from, as base64 of JSON
//! `{"sources":[{"type":…,"ref":…,"pin":…}]}` sorted by `ref` (BuildKit's
//! `util/buildinfo/types.BuildInfo`). Images are named as BuildKit normalizes them
//! (`docker.io/library/busybox:latest`); local sources are not listed, as in BuildKit.
//!
//! Limits: `pin` is given only when the definition itself pins the source (an image digest,
//! `http.checksum`); buildkitd also reports the pins it resolved (manifest digest, git commit,
//! content digest). `frontend` and `attrs` are left out.

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
struct BuildInfo {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    sources: Vec<Source>,
}

fn source(s: &ResultSource) -> Option<Source> {
    let (scheme, rest) = s.identifier.split_once("://")?;
    match scheme {
        "docker-image" => {
            let reference = exporter::normalize_name(rest).unwrap_or_else(|_| rest.to_string());
            let pin = rest
                .split_once('@')
                .map(|(_, d)| d.to_string())
                .unwrap_or_default();
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

/// The `containerimage.buildinfo` value for a result built from `sources`.
pub fn encode(sources: &[ResultSource]) -> String {
    let mut sources: Vec<Source> = sources.iter().filter_map(source).collect();
    sources.sort_by(|a, b| a.reference.cmp(&b.reference));
    sources.dedup();
    let json = serde_json::to_vec(&BuildInfo { sources }).expect("build info serialises");
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
        }
    }

    fn decode(s: &str) -> serde_json::Value {
        let b = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
        serde_json::from_slice(&b).unwrap()
    }

    #[test]
    fn sources_are_normalized_sorted_and_local_ones_left_out() {
        let d = format!("sha256:{}", "a".repeat(64));
        let v = decode(&encode(&[
            src("local://context", &[]),
            src("docker-image://busybox:latest", &[]),
            src(&format!("docker-image://alpine@{d}"), &[]),
            src("https://example.com/f", &[("http.checksum", "sha256:abc")]),
            src(
                "git://github.com/moby/buildkit#v1",
                &[("git.fullurl", "https://github.com/moby/buildkit#v1")],
            ),
        ]));
        assert_eq!(
            v,
            serde_json::json!({"sources": [
                {"type": "docker-image", "ref": format!("docker.io/library/alpine@{d}"), "pin": d},
                {"type": "docker-image", "ref": "docker.io/library/busybox:latest"},
                {"type": "http", "ref": "https://example.com/f", "pin": "sha256:abc"},
                {"type": "git", "ref": "https://github.com/moby/buildkit#v1"},
            ]})
        );
        assert_eq!(decode(&encode(&[])), serde_json::json!({}));
    }
}
