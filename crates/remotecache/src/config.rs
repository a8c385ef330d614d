//! BuildKit's cache config (`application/vnd.buildkit.cacheconfig.v0`, BuildKit v0.11.6
//! `cache/remotecache/v1/spec.go`): a list of layers, each naming its blob and its parent layer
//! (so one index names a whole chain), and a list of records: a cache key digest, the records it
//! is derived from (`inputs`: per input, alternatives of `{selector, link}`), and its results (a
//! layer index whose parent chain is the result, or `chains` of explicit layer indexes, as the
//! inline cache writes them).
//!
//! The JSON matches Go's `encoding/json` output for those types: `omitempty` fields left out when
//! zero (so a `parent` of 0 is absent and reads back as 0; no parent is -1), `createdAt` always
//! written (Go does not omit a zero `time.Time`) in RFC 3339 with trailing zeros of the fraction
//! cut.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Media type of the cache config blob.
pub const CACHE_CONFIG_MEDIA_TYPE: &str = "application/vnd.buildkit.cacheconfig.v0";
/// Annotation of a layer descriptor: its diffID.
pub const ANNOTATION_UNCOMPRESSED: &str = "containerd.io/uncompressed";
/// Annotation of a layer descriptor: when the layer was made.
pub const ANNOTATION_CREATED_AT: &str = "buildkit/createdat";
/// Selector of berth's alias links: a record whose digest is a vertex's cache key links with
/// this selector to the record whose digest is that vertex's alias key (its definition and its
/// inputs' keys, for a vertex keyed by input content), so an importer finds the vertex's key
/// from the alias without checksumming the inputs. Not a path: BuildKit matches no selector of
/// its own against it.
pub const ALIAS_SELECTOR: &str = "berth.alias.v1";
/// Image config field holding the inline cache (the records, base64 as Go writes `[]byte`).
pub const INLINE_CACHE_FIELD: &str = "moby.buildkit.cache.v0";

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// The whole config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheConfig {
    /// Layers: blob + parent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<CacheLayer>,
    /// Records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<CacheRecord>,
}

/// One layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheLayer {
    /// Blob digest.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub blob: String,
    /// Index of the parent layer, -1 for none.
    #[serde(rename = "parent", default, skip_serializing_if = "is_zero")]
    pub parent_index: i64,
    /// Optional annotations (written by some backends instead of descriptor annotations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<LayerAnnotations>,
}

/// `annotations` of a [`CacheLayer`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerAnnotations {
    /// Media type.
    #[serde(
        rename = "mediaType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub media_type: String,
    /// diffID.
    #[serde(rename = "diffID", default, skip_serializing_if = "String::is_empty")]
    pub diff_id: String,
    /// Blob size.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: i64,
    /// Creation time.
    #[serde(rename = "createdAt", default, with = "gotime")]
    pub created_at: Option<DateTime<Utc>>,
}

/// One record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheRecord {
    /// Results: the top layer of each result chain.
    #[serde(rename = "layers", default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<CacheResult>,
    /// Results as explicit layer lists.
    #[serde(rename = "chains", default, skip_serializing_if = "Vec::is_empty")]
    pub chained_results: Vec<ChainedResult>,
    /// The cache key.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    /// Per input of the op: the records it may come from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<Vec<CacheInput>>,
}

/// A result: the layer at the top of its chain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheResult {
    /// Layer index.
    #[serde(rename = "layer")]
    pub layer_index: i64,
    /// When the result was made.
    #[serde(rename = "createdAt", default, with = "gotime")]
    pub created_at: Option<DateTime<Utc>>,
}

/// A result listing its layers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainedResult {
    /// Layer indexes, bottom first.
    #[serde(rename = "layers", default)]
    pub layer_indexes: Vec<i64>,
    /// When the result was made.
    #[serde(rename = "createdAt", default, with = "gotime")]
    pub created_at: Option<DateTime<Utc>>,
}

/// A link to the record an input came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheInput {
    /// Selector (a path for content-based inputs), empty for the whole input.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    /// Record index.
    #[serde(rename = "link")]
    pub link_index: i64,
}

impl CacheConfig {
    /// The layers of the chain whose top is `idx`, bottom first. Fails on an index out of range
    /// or a loop.
    pub fn chain(&self, idx: i64) -> Result<Vec<usize>, String> {
        let mut out = vec![];
        let mut cur = idx;
        while cur != -1 {
            let i = usize::try_from(cur)
                .ok()
                .filter(|i| *i < self.layers.len())
                .ok_or_else(|| format!("invalid layer index {cur}"))?;
            if out.contains(&i) || out.len() > self.layers.len() {
                return Err("invalid looping layer".into());
            }
            out.push(i);
            cur = self.layers[i].parent_index;
        }
        out.reverse();
        Ok(out)
    }
}

/// Go's `time.Time` in JSON: RFC 3339 with nanoseconds, trailing zeros cut; the zero time is
/// `0001-01-01T00:00:00Z` (read back as `None`).
mod gotime {
    use super::*;

    const ZERO: &str = "0001-01-01T00:00:00Z";

    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            None => s.serialize_str(ZERO),
            Some(t) => s.serialize_str(&format(t)),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        match s.as_deref() {
            None | Some("") | Some(ZERO) => Ok(None),
            Some(s) => DateTime::parse_from_rfc3339(s)
                .map(|t| Some(t.with_timezone(&Utc)))
                .map_err(serde::de::Error::custom),
        }
    }

    pub fn format(t: &DateTime<Utc>) -> String {
        let s = t.to_rfc3339_opts(SecondsFormat::Nanos, true);
        // "….123000000Z" → "….123Z"; "….000000000Z" → "…Z"
        match s.rsplit_once('.') {
            Some((head, frac)) => {
                let digits = frac.trim_end_matches('Z').trim_end_matches('0');
                if digits.is_empty() {
                    format!("{head}Z")
                } else {
                    format!("{head}.{digits}Z")
                }
            }
            None => s,
        }
    }
}

/// A time as Go's `time.Time` marshals it (for annotations).
pub fn go_time(t: &DateTime<Utc>) -> String {
    gotime::format(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_json_shape() {
        let c = CacheConfig {
            layers: vec![
                CacheLayer {
                    blob: "sha256:aa".into(),
                    parent_index: -1,
                    annotations: None,
                },
                CacheLayer {
                    blob: "sha256:bb".into(),
                    parent_index: 0,
                    annotations: None,
                },
            ],
            records: vec![
                CacheRecord {
                    digest: "sha256:k0".into(),
                    ..Default::default()
                },
                CacheRecord {
                    digest: "sha256:k1".into(),
                    results: vec![CacheResult {
                        layer_index: 1,
                        created_at: None,
                    }],
                    inputs: vec![vec![CacheInput {
                        selector: String::new(),
                        link_index: 0,
                    }]],
                    ..Default::default()
                },
            ],
        };
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(
            j,
            r#"{"layers":[{"blob":"sha256:aa","parent":-1},{"blob":"sha256:bb"}],"records":[{"digest":"sha256:k0"},{"layers":[{"layer":1,"createdAt":"0001-01-01T00:00:00Z"}],"digest":"sha256:k1","inputs":[[{"link":0}]]}]}"#
        );
        let back: CacheConfig = serde_json::from_str(&j).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.chain(1).unwrap(), vec![0, 1]);
    }

    #[test]
    fn loops_and_ranges_are_errors() {
        let c: CacheConfig =
            serde_json::from_str(r#"{"layers":[{"blob":"a","parent":1},{"blob":"b"}]}"#).unwrap();
        assert!(c.chain(0).unwrap_err().contains("loop"));
        assert!(c.chain(5).unwrap_err().contains("invalid layer index 5"));
    }

    #[test]
    fn times_as_go_writes_them() {
        let t = DateTime::parse_from_rfc3339("2023-04-05T06:07:08.120Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(go_time(&t), "2023-04-05T06:07:08.12Z");
        let t = DateTime::parse_from_rfc3339("2023-04-05T06:07:08Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(go_time(&t), "2023-04-05T06:07:08Z");
    }
}
