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
//! `name:tag`, as buildkitd names the tag it resolved, but only when the frontend resolved that
//! tag: `FROM name:tag@digest` as written stays `name:tag@digest` (BuildKit's
//! `OptimizeImageSources`; for a result whose frontend berthd did not run, always `name:tag`).
//!
//! The image exporters (`image`, `docker`, `oci`) also write it into each image config as
//! `moby.buildkit.buildinfo.v1`, without the frontend options unless `buildinfo-attrs=true`,
//! and not at all with `buildinfo=false` ([`patch_image_configs`]), as v0.11.6's do.
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

/// `resolved`: the references the frontend resolved by tag ([`crate::provenance::Recorder::resolved_tags`]),
/// if known: a `name:tag@digest` source is named `name:tag` only when `name:tag` is among them
/// (else it was written with its digest, and BuildKit keeps it so); unknown: always. A source
/// without a digest that the frontend resolved by tag is pinned to what the tag resolved to
/// (the worker may have used Docker's image in place, whose pin is the image ID).
fn source(s: &ResultSource, resolved: Option<&BTreeMap<String, String>>) -> Option<Source> {
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
                    if named[last..].contains(':') && resolved.is_none_or(|r| r.contains_key(named))
                    {
                        reference = named.to_string();
                    }
                    digest
                }
                None => resolved
                    .and_then(|r| r.get(&reference))
                    .filter(|d| !d.is_empty())
                    .cloned()
                    .unwrap_or_else(|| s.pin.clone()),
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
    resolved: Option<&BTreeMap<String, String>>,
) -> String {
    encode_with(sources, frontend, true, resolved)
}

/// The image config's `moby.buildkit.buildinfo.v1` value (what BuildKit v0.11.6's image and
/// OCI exporters write with their default `buildinfo=true`): the same build information as
/// [`encode`], without the frontend options unless `with_attrs` (`buildinfo-attrs=true`).
pub fn image_config_value(
    sources: &[ResultSource],
    frontend: Option<(&str, &BTreeMap<String, String>)>,
    with_attrs: bool,
    resolved: Option<&BTreeMap<String, String>>,
) -> String {
    encode_with(sources, frontend, with_attrs, resolved)
}

fn encode_with(
    sources: &[ResultSource],
    frontend: Option<(&str, &BTreeMap<String, String>)>,
    with_attrs: bool,
    resolved: Option<&BTreeMap<String, String>>,
) -> String {
    let mut sources: Vec<Source> = sources.iter().filter_map(|s| source(s, resolved)).collect();
    sources.sort_by(|a, b| a.reference.cmp(&b.reference));
    sources.dedup();
    let (frontend, attrs) = match frontend {
        Some((name, opts)) if with_attrs => (name, filter_args(opts)),
        Some((name, _)) => (name, BTreeMap::new()),
        None => ("", BTreeMap::new()),
    };
    let json = serde_json::to_string(&BuildInfo {
        frontend,
        attrs,
        sources,
    })
    .expect("build info serialises");
    base64::engine::general_purpose::STANDARD.encode(exporter::image::go_html_escape(json))
}

/// The sources of the result under `key` (`""` for a single result): what it loaded, plus what
/// its definition reaches (inputs of steps found in an imported cache were never loaded, but
/// BuildKit captures sources from the definition whatever was cached).
pub(crate) fn result_sources(
    result: &crate::jobs::BuildResult,
    key: &str,
    r: &worker::SolvedRef,
) -> Vec<ResultSource> {
    let mut all: Vec<ResultSource> = r.sources().to_vec();
    let def = result.defs.get(key).or_else(|| result.defs.get(""));
    if let Some(def) = def {
        for s in crate::provenance::definition_sources(def).unwrap_or_default() {
            if !all.iter().any(|a| a.identifier == s.identifier) {
                all.push(s);
            }
        }
    }
    all
}

/// The frontend (name and options) that made the result under `key` (`""` for a single
/// result): the one berthd ran for it (also inside a gateway client's Solve, as buildx and
/// buildctl drive it), else the request's `frontend`; none for a direct LLB solve.
pub(crate) fn frontend_of<'a>(
    result: &'a crate::jobs::BuildResult,
    key: &str,
    frontend: Option<(&'a str, &'a BTreeMap<String, String>)>,
) -> Option<(&'a str, &'a BTreeMap<String, String>)> {
    match result.provenance.get(key) {
        Some(c) if c.frontend.is_empty() => None,
        Some(c) => Some((c.frontend.as_str(), &c.opts)),
        None => frontend,
    }
}

/// Sets (or, with `buildinfo=false` or for a result without a filesystem, removes) the build
/// information field of every image config an image, `docker` or `oci` export writes from
/// `metadata` (naming the frontend berthd ran for that result, else the request's): `containerimage.config`, and `containerimage.config/ID` for each platform of a
/// multi-platform result (where the single config, else the platform's default one, is the
/// starting point). `buildinfo` comes from the exporter attributes, else from the
/// `BUILDKIT_BUILDINFO` build argument, as in buildkitd.
pub(crate) fn patch_image_configs(
    metadata: &mut BTreeMap<String, bytes::Bytes>,
    result: &crate::jobs::BuildResult,
    exp_attrs: &BTreeMap<String, String>,
    frontend: Option<(&str, &BTreeMap<String, String>)>,
) -> crate::errors::Result<()> {
    let mut attrs = exp_attrs.clone();
    if !attrs.contains_key("buildinfo") {
        if let Some(v) = frontend
            .and_then(|(_, o)| o.get("build-arg:BUILDKIT_BUILDINFO"))
            .filter(|v| !v.is_empty())
        {
            attrs.insert("buildinfo".into(), v.clone());
        }
    }
    let enabled = crate::export_client::bool_attr(&attrs, "buildinfo", true)?.unwrap_or(true);
    let with_attrs =
        crate::export_client::bool_attr(&attrs, "buildinfo-attrs", false)?.unwrap_or(false);
    let value = |key: &str, fs: &crate::solver::FsRef| match fs {
        crate::solver::FsRef::Solved(r) if enabled => {
            let captured = result.provenance.get(key);
            let fe = frontend_of(result, key, frontend);
            let resolved = captured.map(|c| c.recorder.resolved_tags());
            Some(image_config_value(
                &result_sources(result, key, r),
                fe,
                with_attrs,
                resolved.as_ref(),
            ))
        }
        _ => None,
    };
    let invalid = |e: exporter::Error| crate::errors::Error::invalid(format!("image config: {e}"));
    const CONFIG: &str = "containerimage.config";
    if let Some(fs) = &result.fs {
        let platform = exporter::image::Platform::native();
        let v = value("", fs);
        if v.is_some() || metadata.contains_key(CONFIG) {
            let patched = exporter::image::with_build_info(
                metadata.get(CONFIG).map(|b| &b[..]),
                &platform,
                v.as_deref(),
            )
            .map_err(invalid)?;
            metadata.insert(CONFIG.into(), patched.into());
        }
    }
    if !result.refs.is_empty() {
        let platforms = crate::export_image::parse_platforms(metadata)?;
        for (id, platform) in platforms {
            let Some(fs) = result.refs.get(&id) else {
                continue;
            };
            let key = format!("{CONFIG}/{id}");
            let base = metadata
                .get(&key)
                .or_else(|| metadata.get(CONFIG))
                .map(|b| b.to_vec());
            let v = value(&id, fs);
            if v.is_some() || base.is_some() {
                let patched =
                    exporter::image::with_build_info(base.as_deref(), &platform, v.as_deref())
                        .map_err(invalid)?;
                metadata.insert(key, patched.into());
            }
        }
    }
    Ok(())
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

    #[test]
    fn digested_tag_is_named_by_its_tag_only_when_the_frontend_resolved_the_tag() {
        // Stock v0.11.6: `FROM x:tag` (resolved by tag, LLB `x:tag@d`) is reported as `x:tag`;
        // `FROM x:tag@d` as written is reported as `x:tag@d`.
        let d = format!("sha256:{}", "d".repeat(64));
        let sources = [src(
            &format!("docker-image://localhost:5102/library/busybox:latest@{d}"),
            &[],
        )];
        let by_tag = BTreeMap::from([(
            "localhost:5102/library/busybox:latest".to_string(),
            d.clone(),
        )]);
        let v = decode(&encode(&sources, None, Some(&by_tag)));
        assert_eq!(
            v["sources"][0]["ref"],
            "localhost:5102/library/busybox:latest"
        );
        let by_digest = BTreeMap::new();
        let v = decode(&image_config_value(&sources, None, false, Some(&by_digest)));
        assert_eq!(
            v["sources"][0]["ref"],
            format!("localhost:5102/library/busybox:latest@{d}")
        );
        assert_eq!(v["sources"][0]["pin"], d);
        // Used from Docker in place (not pinned in the definition, the worker's pin is the
        // image ID): reported with the digest the tag resolved to, as stock does.
        let mut local = src("docker-image://localhost:5102/library/busybox:latest", &[]);
        local.pin = format!("sha256:{}", "1".repeat(64));
        let v = decode(&encode(&[local], None, Some(&by_tag)));
        assert_eq!(v["sources"][0]["pin"], d);
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
        assert_eq!(decode(&encode(&[], None, None)), serde_json::json!({}));
    }

    #[test]
    fn image_config_value_is_stocks_bytes() {
        // Stock buildkitd v0.11.6's `moby.buildkit.buildinfo.v1` for `FROM
        // localhost:5102/library/busybox:latest` + COPY through dockerfile.v0 with
        // `build-arg:SOURCE_DATE_EPOCH` (its exporter drops the attrs by default).
        let stock = "eyJmcm9udGVuZCI6ImRvY2tlcmZpbGUudjAiLCJzb3VyY2VzIjpbeyJ0eXBlIjoiZG9ja2VyLWltYWdlIiwicmVmIjoibG9jYWxob3N0OjUxMDIvbGlicmFyeS9idXN5Ym94OmxhdGVzdCIsInBpbiI6InNoYTI1NjpiNDk4ZGMwYmVlOGVkZjMzMTQ2YTY4YWU3OTA2ZjEwYzJiM2I0ODQ5MTBlZmIyODdjYjNjMzY4YjUwM2EyMDk1In1dfQ==";
        let pin = "sha256:b498dc0bee8edf33146a68ae7906f10c2b3b484910efb287cb3c368b503a2095";
        let opts: BTreeMap<String, String> = [
            ("build-arg:SOURCE_DATE_EPOCH", "1700000000"),
            ("filename", "Dockerfile"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let sources = [
            src("local://context", &[]),
            src(
                &format!("docker-image://localhost:5102/library/busybox:latest@{pin}"),
                &[],
            ),
        ];
        assert_eq!(
            image_config_value(&sources, Some(("dockerfile.v0", &opts)), false, None),
            stock
        );
        // FROM scratch only: the frontend alone (stock: {"frontend":"dockerfile.v0"}).
        assert_eq!(
            image_config_value(&sources[..1], Some(("dockerfile.v0", &opts)), false, None),
            "eyJmcm9udGVuZCI6ImRvY2tlcmZpbGUudjAifQ=="
        );
        // buildinfo-attrs=true keeps the filtered options, written as Go escapes them.
        let mut opts = opts;
        opts.insert("build-arg:X".into(), "<a&b>".into());
        let v = decode(&image_config_value(
            &[],
            Some(("dockerfile.v0", &opts)),
            true,
            None,
        ));
        assert_eq!(v["attrs"]["build-arg:X"], "<a&b>");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(image_config_value(
                &[],
                Some(("dockerfile.v0", &opts)),
                true,
                None,
            ))
            .unwrap();
        assert!(
            String::from_utf8(raw)
                .unwrap()
                .contains(r#""\u003ca\u0026b\u003e""#),
            "Go's HTML-safe escaping"
        );
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
        let v = decode(&encode(&[], Some(("dockerfile.v0", &opts)), None));
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
