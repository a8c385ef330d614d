//! Typed error details in `google.rpc.Status.details`, as BuildKit encodes them.
//!
//! BuildKit registers its detail messages with Go's `typeurl` under
//! `github.com/moby/buildkit/<pkg>.<Name>+json` and stores the Go
//! `encoding/json` form of the struct in the `Any` value, not protobuf bytes.
//! Keys are the proto field names (`digest`, `inputIDs`, `Name`...), `bytes`
//! fields are base64 strings and empty fields are omitted; missing keys decode
//! as defaults here. buildctl uses `errdefs.Source` to print the failing
//! Dockerfile lines and `errdefs.Vertex` to name the failing step.
//!
//! `pb.SourceInfo.definition` is neither written nor read (BuildKit fills it
//! with the LLB of the source file; clients print without it).

use crate::{errdefs, stack, type_urls};
use prost_types::Any;
use serde::{de::DeserializeOwned, Serialize};

/// A detail message with BuildKit's JSON `Any` encoding.
pub trait JsonDetail: Serialize + DeserializeOwned {
    /// The `Any.type_url` BuildKit registers for this message.
    const TYPE_URL: &'static str;

    /// Wraps `self` as BuildKit would put it into `Status.details`.
    fn to_any(&self) -> Any {
        Any {
            type_url: Self::TYPE_URL.to_string(),
            // These are plain structs with string keys: serializing cannot fail.
            value: serde_json::to_vec(self).expect("detail message serializes to JSON"),
        }
    }

    /// Reads a detail of this type back; fails on another type URL or bad JSON.
    fn from_any(any: &Any) -> Result<Self, DetailError> {
        if any.type_url != Self::TYPE_URL {
            return Err(DetailError::WrongType {
                expected: Self::TYPE_URL,
                found: any.type_url.clone(),
            });
        }
        serde_json::from_slice(&any.value).map_err(|source| DetailError::Json {
            type_url: Self::TYPE_URL,
            source,
        })
    }
}

/// Why a `google.protobuf.Any` could not be read as a [`JsonDetail`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DetailError {
    /// The detail has another type URL.
    #[error("error detail has type {found}, expected {expected}")]
    WrongType {
        /// The URL of the requested type.
        expected: &'static str,
        /// The URL found in the detail.
        found: String,
    },
    /// The value is not the JSON form of the message.
    #[error("invalid JSON in error detail {type_url}")]
    Json {
        /// The URL of the requested type.
        type_url: &'static str,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

macro_rules! json_detail {
    ($($ty:ty => $url:expr),* $(,)?) => {
        $(impl JsonDetail for $ty {
            const TYPE_URL: &'static str = $url;
        })*
    };
}

json_detail! {
    errdefs::Vertex => type_urls::ERRDEFS_VERTEX,
    errdefs::Source => type_urls::ERRDEFS_SOURCE,
    errdefs::Frontend => type_urls::ERRDEFS_FRONTEND,
    errdefs::FrontendCap => type_urls::ERRDEFS_FRONTEND_CAP,
    errdefs::Subrequest => type_urls::ERRDEFS_SUBREQUEST,
    errdefs::CompatibilityFeature => type_urls::ERRDEFS_COMPATIBILITY_FEATURE,
    stack::Stack => type_urls::STACK,
}

/// serde adapter: `bytes::Bytes` as a standard base64 string (Go's `[]byte` JSON).
pub(crate) mod base64 {
    use base64::Engine as _;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(data: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(data))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        // Go writes `null` for a nil slice.
        let text = Option::<String>::deserialize(d)?.unwrap_or_default();
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map(Bytes::from)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;
    use bytes::Bytes;

    #[test]
    fn source_detail_reads_go_json() {
        // The shape Go's encoding/json gives errdefs.Source (omitempty fields
        // absent, []byte as base64, Position non-nullable in v0.11).
        let go = r#"{"info":{"filename":"Dockerfile","data":"RlJPTSBzY3JhdGNoClJVTiBmYWxzZQo=",
            "definition":{"def":["AAE="]}},
            "ranges":[{"start":{"line":2},"end":{"line":2,"character":9}}]}"#;
        let any = Any {
            type_url: "github.com/moby/buildkit/errdefs.Source+json".into(),
            value: go.as_bytes().to_vec(),
        };
        let src = errdefs::Source::from_any(&any).unwrap();
        let info = src.info.as_ref().unwrap();
        assert_eq!(info.filename, "Dockerfile");
        assert_eq!(info.data, Bytes::from_static(b"FROM scratch\nRUN false\n"));
        assert_eq!(info.definition, None);
        assert_eq!(
            src.ranges,
            [pb::Range {
                start: Some(pb::Position {
                    line: 2,
                    character: 0
                }),
                end: Some(pb::Position {
                    line: 2,
                    character: 9
                }),
            }]
        );
    }

    #[test]
    fn details_write_proto_field_names() {
        let v = errdefs::Vertex {
            digest: "sha256:ab".into(),
        }
        .to_any();
        assert_eq!(v.type_url, "github.com/moby/buildkit/errdefs.Vertex+json");
        assert_eq!(v.value, br#"{"digest":"sha256:ab"}"#);

        let st = stack::Stack {
            frames: vec![stack::Frame {
                name: "main".into(),
                file: "a.go".into(),
                line: 3,
            }],
            cmdline: vec!["berthd".into()],
            pid: 1,
            version: "v".into(),
            revision: "r".into(),
        };
        let json: serde_json::Value = serde_json::from_slice(&st.to_any().value).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"frames":[{"Name":"main","File":"a.go","Line":3}],
                "cmdline":["berthd"],"pid":1,"version":"v","revision":"r"})
        );
        let src = errdefs::Source {
            info: Some(pb::SourceInfo {
                filename: "Dockerfile".into(),
                data: Bytes::from_static(b"FROM scratch\n"),
                ..Default::default()
            }),
            ranges: vec![],
        };
        let json: serde_json::Value = serde_json::from_slice(&src.to_any().value).unwrap();
        assert_eq!(json["info"]["data"], "RlJPTSBzY3JhdGNoCg==");
        assert!(json["info"].get("definition").is_none());
    }

    #[test]
    fn wrong_type_or_bad_json_is_an_error() {
        let any = errdefs::Vertex { digest: "d".into() }.to_any();
        assert!(matches!(
            errdefs::Source::from_any(&any),
            Err(DetailError::WrongType { .. })
        ));
        let bad = Any {
            type_url: type_urls::ERRDEFS_VERTEX.into(),
            value: b"\x08\x01".to_vec(), // protobuf bytes, not JSON
        };
        assert!(matches!(
            errdefs::Vertex::from_any(&bad),
            Err(DetailError::Json { .. })
        ));
    }
}
