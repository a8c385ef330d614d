//! `--export-cache` / `--import-cache` entries (`CacheOptionsEntry`: a type and attributes), read
//! as buildkitd v0.11.6 reads them (`control/control.go`, `cache/remotecache/{registry,local}`).

use std::collections::BTreeMap;

use registry::Compression;

use crate::s3::S3Config;
use crate::{Error, Result};

/// `mode`: which results go into the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Only the build result's layers (the default; unknown values fall back to it, as
    /// buildkitd does).
    Min,
    /// Every evaluated step's result.
    Max,
}

/// Where an export goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportTarget {
    /// `type=registry,ref=…`.
    Registry {
        /// The reference (tag `latest` when it names none).
        reference: String,
    },
    /// `type=local,dest=…`: the client's content store `local:<dest>` over the session (the
    /// client writes `index.json` under `tag` from the `cache.manifest` response).
    Local {
        /// The directory on the client.
        dest: String,
    },
    /// `type=inline`: records in the exported image's config.
    Inline,
    /// `type=s3`: a bucket (see [`crate::s3`]).
    S3(Box<S3Config>),
}

/// Layer compression of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressionOpts {
    /// `compression` (gzip by default).
    pub compression: Compression,
    /// `compression-level`.
    pub level: Option<i32>,
    /// `force-compression`.
    pub force: bool,
}

/// One parsed `--export-cache`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// Where to.
    pub target: ExportTarget,
    /// `mode`.
    pub mode: Mode,
    /// Compression.
    pub compression: CompressionOpts,
    /// `oci-mediatypes` (default true): OCI index and layer types, else Docker's.
    pub oci: bool,
    /// `ignore-error`: a failed export does not fail the build.
    pub ignore_error: bool,
}

/// Where an import comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportSpec {
    /// `type=registry,ref=…`: a cache index or an image with inline cache.
    Registry {
        /// The reference.
        reference: String,
    },
    /// `type=local,src=…,digest=…`: the client's content store `local:<src>` (the client
    /// resolves `tag` to `digest` from its `index.json`).
    Local {
        /// The directory on the client.
        src: String,
        /// The cache index's digest.
        digest: String,
    },
    /// `type=s3`: the config of the first `name` in a bucket.
    S3(Box<S3Config>),
}

fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "" => Ok(true),
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(Error::invalid(format!(
            "non-bool value {v} specified for {key}"
        ))),
    }
}

/// Reads one `--export-cache` entry.
pub fn parse_export(kind: &str, attrs: &BTreeMap<String, String>) -> Result<ExportSpec> {
    let target = match kind {
        "registry" => {
            let r = attrs.get("ref").map(String::as_str).unwrap_or("");
            if r.is_empty() {
                return Err(Error::invalid(
                    "failed to configure registry cache exporter: ref is required",
                ));
            }
            ExportTarget::Registry {
                reference: r.to_string(),
            }
        }
        "local" => {
            let d = attrs.get("dest").map(String::as_str).unwrap_or("");
            if d.is_empty() {
                return Err(Error::invalid(
                    "failed to configure local cache exporter: dest is required",
                ));
            }
            ExportTarget::Local {
                dest: d.to_string(),
            }
        }
        "inline" => ExportTarget::Inline,
        "s3" => ExportTarget::S3(Box::new(S3Config::from_attrs(attrs)?)),
        other => {
            return Err(Error::invalid(format!("unknown cache exporter: {other:?}")));
        }
    };
    let mode = match attrs.get("mode").map(String::as_str) {
        Some("max") => Mode::Max,
        Some("min") | None => Mode::Min,
        Some(other) => {
            tracing::debug!(mode = other, "skipping invalid cache export mode");
            Mode::Min
        }
    };
    let compression = match attrs.get("compression") {
        None => Compression::Gzip,
        Some(v) => Compression::from_attr(v)
            .ok_or_else(|| Error::invalid(format!("unsupported compression type {v}")))?,
    };
    let force = match attrs.get("force-compression") {
        None => false,
        Some(v) => parse_bool("force-compression", v)?,
    };
    let level = match attrs.get("compression-level") {
        None => None,
        Some(v) => Some(v.parse::<i32>().map_err(|_| {
            Error::invalid(format!(
                "non-integer value {v} specified for compression-level"
            ))
        })?),
    };
    let oci = match attrs.get("oci-mediatypes") {
        None => true,
        Some(v) => parse_bool("oci-mediatypes", v)
            .map_err(|_| Error::invalid(format!("failed to parse oci-mediatypes: {v:?}")))?,
    };
    // buildkitd skips an invalid ignore-error value (false).
    let ignore_error = attrs
        .get("ignore-error")
        .and_then(|v| parse_bool("ignore-error", v).ok())
        .unwrap_or(false);
    Ok(ExportSpec {
        target,
        mode,
        compression: CompressionOpts {
            compression,
            level,
            force,
        },
        oci,
        ignore_error,
    })
}

/// Reads one `--import-cache` entry.
pub fn parse_import(kind: &str, attrs: &BTreeMap<String, String>) -> Result<ImportSpec> {
    match kind {
        "registry" => {
            let r = attrs.get("ref").map(String::as_str).unwrap_or("");
            if r.is_empty() {
                return Err(Error::invalid("registry cache importer requires ref"));
            }
            Ok(ImportSpec::Registry {
                reference: r.to_string(),
            })
        }
        "local" => {
            let digest = attrs.get("digest").cloned().unwrap_or_default();
            if digest.is_empty() {
                return Err(Error::invalid(
                    "local cache importer requires explicit digest",
                ));
            }
            let src = attrs.get("src").cloned().unwrap_or_default();
            if src.is_empty() {
                return Err(Error::invalid("local cache importer requires src"));
            }
            Ok(ImportSpec::Local { src, digest })
        }
        "s3" => Ok(ImportSpec::S3(Box::new(S3Config::from_attrs(attrs)?))),
        other => Err(Error::invalid(format!("unknown cache importer: {other:?}"))),
    }
}

/// The `cache-imports` frontend attribute (JSON list of `{"Type": …, "Attrs": {…}}`, as
/// buildctl and buildx write it for frontends) as `(type, attrs)` pairs.
pub fn parse_frontend_cache_imports(json: &str) -> Result<Vec<(String, BTreeMap<String, String>)>> {
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(rename = "Type", alias = "type", default)]
        kind: String,
        #[serde(rename = "Attrs", alias = "attrs", default)]
        attrs: Option<BTreeMap<String, String>>,
    }
    let entries: Vec<Entry> = serde_json::from_str(json)
        .map_err(|e| Error::invalid(format!("failed to parse cache-imports: {e}")))?;
    Ok(entries
        .into_iter()
        .map(|e| (e.kind, e.attrs.unwrap_or_default()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn export_defaults_and_errors() {
        let s = parse_export("registry", &a(&[("ref", "localhost:5000/c")])).unwrap();
        assert_eq!(s.mode, Mode::Min);
        assert!(s.oci);
        assert!(!s.ignore_error);
        assert_eq!(s.compression.compression, Compression::Gzip);
        let s = parse_export(
            "local",
            &a(&[
                ("dest", "/x"),
                ("mode", "max"),
                ("oci-mediatypes", "false"),
                ("compression", "zstd"),
                ("compression-level", "3"),
                ("force-compression", "true"),
                ("ignore-error", "true"),
            ]),
        )
        .unwrap();
        assert_eq!(s.mode, Mode::Max);
        assert!(!s.oci && s.ignore_error && s.compression.force);
        assert_eq!(s.compression.level, Some(3));
        assert_eq!(s.compression.compression, Compression::Zstd);
        assert!(parse_export("registry", &a(&[]))
            .unwrap_err()
            .to_string()
            .contains("ref"));
        assert!(parse_export("s4", &a(&[]))
            .unwrap_err()
            .to_string()
            .contains("unknown cache exporter: \"s4\""));
        // s3: its bucket is required (the test process has no $AWS_BUCKET).
        let ExportTarget::S3(c) = parse_export(
            "s3",
            &a(&[
                ("bucket", "b"),
                ("region", "us-east-1"),
                ("endpoint_url", "http://fake-url:9000"),
            ]),
        )
        .unwrap()
        .target
        else {
            panic!("not s3")
        };
        assert_eq!(c.bucket, "b");
        assert_eq!(c.endpoint_url.as_deref(), Some("http://fake-url:9000"));
        if std::env::var_os("AWS_BUCKET").is_none() {
            assert_eq!(
                parse_export("s3", &a(&[("region", "r")]))
                    .unwrap_err()
                    .to_string(),
                "bucket ($AWS_BUCKET) not set for s3 cache"
            );
        }
        assert_eq!(
            parse_export("inline", &a(&[("mode", "weird")]))
                .unwrap()
                .mode,
            Mode::Min
        );
    }

    #[test]
    fn import_entries() {
        assert_eq!(
            parse_import("registry", &a(&[("ref", "r/c:t")])).unwrap(),
            ImportSpec::Registry {
                reference: "r/c:t".into()
            }
        );
        assert!(parse_import("local", &a(&[("src", "/d")]))
            .unwrap_err()
            .to_string()
            .contains("explicit digest"));
        let l = parse_frontend_cache_imports(
            r#"[{"Type":"registry","Attrs":{"ref":"localhost:5000/c"}}]"#,
        )
        .unwrap();
        assert_eq!(l[0].0, "registry");
        assert_eq!(l[0].1["ref"], "localhost:5000/c");
    }
}
