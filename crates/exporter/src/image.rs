//! Image config assembly: the JSON document whose sha256 is the Docker image ID.
//!
//! Follows the rules of BuildKit's image exporter (`exporter/containerimage/writer.go` at v0.11.6:
//! `defaultImageConfig`, `patchImageConfig`, `normalizeLayersAndHistory`), restated here:
//!
//! - The starting document is the frontend's `containerimage.config` metadata, or a default config
//!   (`architecture`/`os`/`variant` of the platform, `config.WorkingDir = "/"`, a default `PATH`).
//! - `rootfs` is replaced by `{"type":"layers","diff_ids":[...]}` for the exported layer chain.
//! - History: entries that claim more layers than exist are turned into empty-layer entries from
//!   the top; missing entries are appended from the layers' own metadata (description and creation
//!   time, comment `buildkit.exporter.image.v0`); entries without a time inherit one.
//! - `SOURCE_DATE_EPOCH` clamps every history time and `created` to the epoch.
//! - `moby.buildkit.buildinfo.v1` (build information, base64) is set or removed by the caller
//!   before ([`with_build_info`]), as upstream's exporter does from the result's metadata.
//! - The top-level object is written with its keys sorted and its values kept as they came, which is
//!   what Go's `json.Marshal(map[string]json.RawMessage)` produces, so the same inputs give the same
//!   bytes (and so the same image ID) as upstream.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest as _, Sha256};

use crate::{Error, Result};

/// Comment BuildKit puts on history entries it synthesises for layers.
pub const HISTORY_COMMENT: &str = "buildkit.exporter.image.v0";

/// The default `PATH` of a Linux image config.
pub const DEFAULT_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A target platform, as in an image config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// `os`, e.g. `linux`.
    pub os: String,
    /// `architecture` in OCI/Go terms, e.g. `amd64`.
    pub architecture: String,
    /// `variant`, e.g. `v8`; empty for none.
    pub variant: String,
}

impl Platform {
    /// The platform berthd runs on.
    pub fn native() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: if architecture == "arm64" {
                "v8".into()
            } else {
                String::new()
            },
        }
    }
}

/// What the exporter knows about one layer of the result, bottom to top.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// `sha256:<hex>` of the uncompressed layer tar.
    pub diff_id: String,
    /// What created the layer (shown by `docker history`).
    pub description: String,
    /// When the layer was created.
    pub created: Option<DateTime<Utc>>,
}

/// One `history` entry, with Go's field order and `omitempty` rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// Creation time.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "go_time_opt")]
    pub created: Option<DateTime<Utc>>,
    /// The command that created the layer.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub created_by: String,
    /// Author.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub author: String,
    /// Free-form comment.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub comment: String,
    /// True when the step created no layer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
}

/// `rootfs`, with Go's field order.
#[derive(Serialize)]
struct RootFs<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    diff_ids: Vec<&'a str>,
}

/// A finished image config and its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageConfig {
    /// The exact bytes; the image ID is their sha256.
    pub bytes: Vec<u8>,
    /// `sha256:<hex>` of `bytes` (Docker's image ID, the config digest).
    pub digest: String,
}

/// Inputs of [`build_config`].
#[derive(Debug, Clone)]
pub struct ConfigInput<'a> {
    /// The frontend's `containerimage.config`, if any.
    pub base: Option<&'a [u8]>,
    /// The exported layers, bottom to top.
    pub layers: &'a [LayerInfo],
    /// `SOURCE_DATE_EPOCH`, if set.
    pub epoch: Option<DateTime<Utc>>,
    /// Platform used for a default config.
    pub platform: &'a Platform,
    /// Time used for layers without a creation time (normally now).
    pub now: DateTime<Utc>,
}

/// Builds the image config for an export.
pub fn build_config(input: &ConfigInput<'_>) -> Result<ImageConfig> {
    let base = match input.base {
        Some(b) if !b.is_empty() => b.to_vec(),
        _ => default_config(input.platform)?,
    };
    let mut doc: BTreeMap<String, Box<RawValue>> =
        serde_json::from_slice(&base).map_err(|source| Error::ImageConfig {
            what: "parse containerimage.config",
            source,
        })?;

    let history = match doc.get("history") {
        Some(raw) if raw.get() != "null" => serde_json::from_str::<Vec<History>>(raw.get())
            .map_err(|source| Error::ImageConfig {
                what: "parse history of containerimage.config",
                source,
            })?,
        _ => Vec::new(),
    };
    let mut history = normalize_history(history, input.layers, input.now);

    let rootfs = RootFs {
        kind: "layers",
        diff_ids: input.layers.iter().map(|l| l.diff_id.as_str()).collect(),
    };
    doc.insert("rootfs".into(), to_raw(&rootfs)?);

    if let Some(epoch) = input.epoch {
        for h in &mut history {
            if h.created.is_none_or(|c| c > epoch) {
                h.created = Some(epoch);
            }
        }
    }
    doc.insert("history".into(), to_raw(&history)?);

    if let (Some(raw), Some(epoch)) = (doc.get("created"), input.epoch) {
        let created: Option<DateTime<Utc>> =
            serde_json::from_str(raw.get()).map_err(|source| Error::ImageConfig {
                what: "parse created time of containerimage.config",
                source,
            })?;
        if created.is_some_and(|c| c > epoch) {
            doc.insert("created".into(), to_raw(&go_time(&epoch))?);
        }
    }
    if !doc.contains_key("created") {
        let last = history.iter().rev().find_map(|h| h.created);
        let value = match last {
            Some(t) => serde_json::Value::String(go_time(&t)),
            None => serde_json::Value::Null,
        };
        doc.insert("created".into(), to_raw(&value)?);
    }
    // `moby.buildkit.buildinfo.v1` stays as the caller left it ([`with_build_info`]).

    let bytes = serde_json::to_vec(&doc).map_err(|source| Error::ImageConfig {
        what: "encode image config",
        source,
    })?;
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    Ok(ImageConfig { bytes, digest })
}

/// The image config field holding build information (`binfotypes.ImageConfigField`).
pub const BUILD_INFO_FIELD: &str = "moby.buildkit.buildinfo.v1";

/// `config` (or, when there is none, the default config of `platform`) with its build
/// information field set to `value` (base64 of the build information JSON) or, for `None`,
/// removed, as BuildKit v0.11.6's image exporter patches every config it writes. The other
/// fields keep their bytes; the top-level keys come out sorted, as [`build_config`] writes them.
pub fn with_build_info(
    config: Option<&[u8]>,
    platform: &Platform,
    value: Option<&str>,
) -> Result<Vec<u8>> {
    let base = match config {
        Some(b) if !b.is_empty() => b.to_vec(),
        _ => default_config(platform)?,
    };
    let mut doc: BTreeMap<String, Box<RawValue>> =
        serde_json::from_slice(&base).map_err(|source| Error::ImageConfig {
            what: "parse containerimage.config",
            source,
        })?;
    match value {
        Some(v) => {
            doc.insert(BUILD_INFO_FIELD.into(), to_raw(&v)?);
        }
        None => {
            doc.remove(BUILD_INFO_FIELD);
        }
    }
    serde_json::to_vec(&doc).map_err(|source| Error::ImageConfig {
        what: "encode image config",
        source,
    })
}

/// The config BuildKit starts from when the frontend gave none.
pub fn default_config(platform: &Platform) -> Result<Vec<u8>> {
    let mut img = serde_json::json!({
        "architecture": platform.architecture,
        "os": platform.os,
        "config": { "Env": [DEFAULT_PATH_ENV], "WorkingDir": "/" },
        "rootfs": { "type": "layers", "diff_ids": null },
    });
    if !platform.variant.is_empty() {
        img["variant"] = serde_json::Value::String(platform.variant.clone());
    }
    serde_json::to_vec(&img).map_err(|source| Error::ImageConfig {
        what: "encode default image config",
        source,
    })
}

fn normalize_history(
    mut history: Vec<History>,
    layers: &[LayerInfo],
    now: DateTime<Utc>,
) -> Vec<History> {
    let layer_entries = history.iter().filter(|h| !h.empty_layer).count();
    if layer_entries > layers.len() {
        // More layer entries than layers: mark the surplus as empty, counting from the bottom.
        let mut seen = 0;
        for h in &mut history {
            if seen >= layers.len() {
                h.empty_layer = true;
            }
            if !h.empty_layer {
                seen += 1;
            }
        }
    } else {
        for layer in &layers[layer_entries..] {
            history.push(History {
                created: Some(layer.created.unwrap_or(now)),
                created_by: layer.description.clone(),
                comment: HISTORY_COMMENT.into(),
                ..History::default()
            });
        }
    }
    let mut index = 0;
    for h in &mut history {
        if !h.empty_layer {
            if h.created.is_none() {
                h.created = Some(layers[index].created.unwrap_or(now));
            }
            index += 1;
        }
    }
    // Entries still without a time take the first time that follows a gap, else the last one seen.
    let mut fill = None;
    let mut gap = false;
    for h in &history {
        match h.created {
            Some(t) => {
                fill = Some(t);
                if gap {
                    break;
                }
            }
            None => gap = true,
        }
    }
    gap = false;
    for h in &mut history {
        match h.created {
            Some(t) => {
                if gap {
                    fill = Some(t);
                }
            }
            None => {
                gap = true;
                h.created = fill;
            }
        }
    }
    history
}

fn to_raw<T: Serialize>(value: &T) -> Result<Box<RawValue>> {
    let err = |source| Error::ImageConfig {
        what: "encode image config field",
        source,
    };
    let text = serde_json::to_string(value).map_err(err)?;
    RawValue::from_string(go_html_escape(text)).map_err(err)
}

/// Go's `json.Marshal` escapes `<`, `>`, `&`, U+2028 and U+2029 in strings (so that the same
/// history gives the same config bytes, and image ID, as upstream). Outside strings these
/// characters cannot occur in JSON, so replacing them in the whole text is exact. Also used for
/// the buildinfo JSON the daemon writes into image configs.
pub fn go_html_escape(text: String) -> String {
    if !text.contains(['<', '>', '&', '\u{2028}', '\u{2029}']) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

/// Formats a time as Go's `time.RFC3339Nano` does (fraction without trailing zeros).
pub fn go_time(t: &DateTime<Utc>) -> String {
    let s = t.to_rfc3339_opts(SecondsFormat::Nanos, true);
    // s = "YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ"
    let (main, _) = s.split_at(s.len() - 1);
    let trimmed = main.trim_end_matches('0').trim_end_matches('.');
    format!("{trimmed}Z")
}

mod go_time_opt {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        t: &Option<DateTime<Utc>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&super::go_time(t)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<DateTime<Utc>>, D::Error> {
        Option::<DateTime<Utc>>::deserialize(d)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn build_info_is_set_replaced_or_removed_and_kept_by_build_config() {
        let p = Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: String::new(),
        };
        // No config: the default one gets the field.
        let with = with_build_info(None, &p, Some("e30=")).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&with).unwrap();
        assert_eq!(v[BUILD_INFO_FIELD], "e30=");
        assert_eq!(v["architecture"], "amd64");
        // A base image's value is replaced, other bytes kept, keys sorted.
        let base = br#"{"os":"linux","architecture":"amd64","moby.buildkit.buildinfo.v1":"old","config":{"Cmd":["a & b"]}}"#;
        let replaced = with_build_info(Some(base), &p, Some("bmV3")).unwrap();
        assert_eq!(
            std::str::from_utf8(&replaced).unwrap(),
            r#"{"architecture":"amd64","config":{"Cmd":["a & b"]},"moby.buildkit.buildinfo.v1":"bmV3","os":"linux"}"#
        );
        // buildinfo=false removes it.
        let removed = with_build_info(Some(base), &p, None).unwrap();
        assert!(!std::str::from_utf8(&removed).unwrap().contains("buildinfo"));
        // build_config keeps what the caller set.
        let cfg = build_config(&ConfigInput {
            base: Some(&replaced),
            layers: &[],
            epoch: None,
            platform: &p,
            now: Utc::now(),
        })
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&cfg.bytes).unwrap();
        assert_eq!(v[BUILD_INFO_FIELD], "bmV3");
    }

    use super::*;
    use chrono::TimeZone;

    fn layer(n: u8, t: Option<i64>) -> LayerInfo {
        LayerInfo {
            diff_id: format!("sha256:{}", hex::encode([n; 32])),
            description: format!("layer {n}"),
            created: t.map(|s| Utc.timestamp_opt(s, 0).unwrap()),
        }
    }

    fn input<'a>(
        base: Option<&'a [u8]>,
        layers: &'a [LayerInfo],
        p: &'a Platform,
    ) -> ConfigInput<'a> {
        ConfigInput {
            base,
            layers,
            epoch: None,
            platform: p,
            now: Utc.timestamp_opt(1_700_000_000, 0).unwrap(),
        }
    }

    #[test]
    fn go_time_trims_fraction_like_rfc3339nano() {
        let cases = [
            (Utc.timestamp_opt(0, 0).unwrap(), "1970-01-01T00:00:00Z"),
            (
                Utc.timestamp_opt(1, 500_000_000).unwrap(),
                "1970-01-01T00:00:01.5Z",
            ),
            (
                Utc.timestamp_opt(1, 123_456_789).unwrap(),
                "1970-01-01T00:00:01.123456789Z",
            ),
            (
                Utc.timestamp_opt(1, 1_000).unwrap(),
                "1970-01-01T00:00:01.000001Z",
            ),
        ];
        for (t, want) in cases {
            assert_eq!(go_time(&t), want);
        }
    }

    #[test]
    fn default_config_gets_rootfs_history_and_sorted_keys() {
        let p = Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: String::new(),
        };
        let layers = [layer(1, Some(10)), layer(2, None)];
        let cfg = build_config(&input(None, &layers, &p)).unwrap();
        let text = String::from_utf8(cfg.bytes.clone()).unwrap();
        assert_eq!(
            text,
            format!(
                concat!(
                    r#"{{"architecture":"amd64","config":{{"Env":["{}"],"WorkingDir":"/"}},"#,
                    r#""created":"2023-11-14T22:13:20Z","#,
                    r#""history":[{{"created":"1970-01-01T00:00:10Z","created_by":"layer 1","comment":"buildkit.exporter.image.v0"}},"#,
                    r#"{{"created":"2023-11-14T22:13:20Z","created_by":"layer 2","comment":"buildkit.exporter.image.v0"}}],"#,
                    r#""os":"linux","rootfs":{{"type":"layers","diff_ids":["{}","{}"]}}}}"#
                ),
                DEFAULT_PATH_ENV, layers[0].diff_id, layers[1].diff_id
            )
        );
        assert_eq!(
            cfg.digest,
            format!("sha256:{}", hex::encode(Sha256::digest(&cfg.bytes)))
        );
    }

    #[test]
    fn base_history_is_kept_and_extended_and_surplus_marked_empty() {
        let p = Platform::native();
        let base = br#"{"os":"linux","history":[{"created_by":"base","created":"2020-01-01T00:00:00Z"},{"created_by":"ENV A=1","empty_layer":true}],"created":"2020-01-01T00:00:00Z","config":{"Env":["A=1"]}}"#;
        let layers = [layer(1, Some(5)), layer(2, Some(6))];
        let cfg = build_config(&input(Some(base), &layers, &p)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&cfg.bytes).unwrap();
        let h = v["history"].as_array().unwrap();
        assert_eq!(h.len(), 3);
        assert_eq!(h[0]["created_by"], "base");
        assert_eq!(h[1]["empty_layer"], true);
        assert_eq!(h[2]["created_by"], "layer 2");
        assert_eq!(
            v["created"], "2020-01-01T00:00:00Z",
            "frontend's created is kept without an epoch"
        );
        assert_eq!(v["config"]["Env"][0], "A=1");

        // Three layer entries but one layer: the surplus become empty layers.
        let one = [layer(1, Some(5))];
        let base3 = br#"{"history":[{"created_by":"a"},{"created_by":"b"},{"created_by":"c"}]}"#;
        let cfg = build_config(&input(Some(base3), &one, &p)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&cfg.bytes).unwrap();
        let flags: Vec<bool> = v["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["empty_layer"] == true)
            .collect();
        assert_eq!(flags, [false, true, true]);
    }

    #[test]
    fn source_date_epoch_clamps_history_and_created() {
        let p = Platform::native();
        let base = br#"{"created":"2030-01-01T00:00:00Z","history":[{"created_by":"old","created":"1999-01-01T00:00:00Z"}]}"#;
        let layers = [layer(1, None), layer(2, Some(2_000_000_000))];
        let mut inp = input(Some(base), &layers, &p);
        inp.epoch = Some(Utc.timestamp_opt(1_000_000_000, 0).unwrap());
        let cfg = build_config(&inp).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&cfg.bytes).unwrap();
        assert_eq!(v["created"], "2001-09-09T01:46:40Z");
        let times: Vec<&str> = v["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["created"].as_str().unwrap())
            .collect();
        assert_eq!(times, ["1999-01-01T00:00:00Z", "2001-09-09T01:46:40Z"]);
    }

    #[test]
    fn malformed_base_config_is_an_error_naming_it() {
        let p = Platform::native();
        let err = build_config(&input(Some(b"{not json"), &[], &p)).unwrap_err();
        assert!(err.to_string().contains("containerimage.config"), "{err}");
    }
}
