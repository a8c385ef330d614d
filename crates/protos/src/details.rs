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
//! `pb.SourceInfo.definition` (the LLB of the source file, when the frontend
//! gave one) is carried in Go's JSON form of `pb.Definition`.
//!
//! `errdefs.Solve` is the exception: BuildKit marshals it with `jsonpb`
//! (proto3 JSON: lowerCamelCase names, 64-bit integers as strings, enum
//! names), because it holds a whole `pb.Op`. [`solve_to_any`] and
//! [`solve_from_any`] do that through the descriptors of
//! [`crate::FILE_DESCRIPTOR_SET`].

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

/// `errdefs.Solve` as BuildKit puts it into `Status.details` (jsonpb JSON).
pub fn solve_to_any(s: &errdefs::Solve) -> Any {
    use prost::Message as _;
    let desc = pool()
        .get_message_by_name("errdefs.Solve")
        .expect("errdefs.Solve in the descriptor set");
    let dynamic = prost_reflect::DynamicMessage::decode(desc, s.encode_to_vec().as_slice())
        .expect("a message decodes under its own descriptor");
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::new(&mut out);
    dynamic
        .serialize_with_options(&mut ser, &prost_reflect::SerializeOptions::new())
        .expect("proto JSON serializes");
    Any {
        type_url: type_urls::ERRDEFS_SOLVE.to_string(),
        value: out,
    }
}

/// Reads an `errdefs.Solve` detail back (jsonpb JSON).
pub fn solve_from_any(any: &Any) -> Result<errdefs::Solve, DetailError> {
    use prost::Message as _;
    if any.type_url != type_urls::ERRDEFS_SOLVE {
        return Err(DetailError::WrongType {
            expected: type_urls::ERRDEFS_SOLVE,
            found: any.type_url.clone(),
        });
    }
    let desc = pool()
        .get_message_by_name("errdefs.Solve")
        .expect("errdefs.Solve in the descriptor set");
    let mut de = serde_json::Deserializer::from_slice(&any.value);
    let dynamic = prost_reflect::DynamicMessage::deserialize(desc, &mut de).map_err(|source| {
        DetailError::Json {
            type_url: type_urls::ERRDEFS_SOLVE,
            source,
        }
    })?;
    errdefs::Solve::decode(dynamic.encode_to_vec().as_slice()).map_err(|e| DetailError::Json {
        type_url: type_urls::ERRDEFS_SOLVE,
        source: serde::de::Error::custom(e),
    })
}

fn pool() -> &'static prost_reflect::DescriptorPool {
    static POOL: std::sync::OnceLock<prost_reflect::DescriptorPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        prost_reflect::DescriptorPool::decode(crate::FILE_DESCRIPTOR_SET)
            .expect("the generated descriptor set decodes")
    })
}

/// serde adapter: a list of `bytes::Bytes` as base64 strings (Go's `[][]byte` JSON).
pub(crate) mod base64_list {
    use base64::Engine as _;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(data: &[Bytes], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            data.iter()
                .map(|d| base64::engine::general_purpose::STANDARD.encode(d)),
        )
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Bytes>, D::Error> {
        let list = Option::<Vec<Option<String>>>::deserialize(d)?.unwrap_or_default();
        list.into_iter()
            .map(|t| {
                base64::engine::general_purpose::STANDARD
                    .decode(t.unwrap_or_default())
                    .map(Bytes::from)
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
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
        let def = info.definition.as_ref().expect("definition carried");
        assert_eq!(def.def, [Bytes::from_static(&[0, 1])]);
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
    fn source_definition_is_go_json() {
        let mut metadata = std::collections::BTreeMap::new();
        metadata.insert(
            "sha256:aa".to_string(),
            pb::OpMetadata {
                caps: [("file.base".to_string(), true)].into(),
                export_cache: Some(pb::ExportCache { value: true }),
                ..Default::default()
            },
        );
        let src = errdefs::Source {
            info: Some(pb::SourceInfo {
                filename: "bar".into(),
                data: Bytes::from_static(b"bardata"),
                definition: Some(pb::Definition {
                    def: vec![Bytes::from_static(b"\x01\x02")],
                    metadata,
                    source: Some(pb::Source {
                        locations: [(
                            "sha256:aa".to_string(),
                            pb::Locations {
                                locations: vec![pb::Location {
                                    source_index: 1,
                                    ranges: vec![],
                                }],
                            },
                        )]
                        .into(),
                        infos: vec![],
                    }),
                }),
                language: String::new(),
            }),
            ranges: vec![],
        };
        let json: serde_json::Value = serde_json::from_slice(&src.to_any().value).unwrap();
        let d = &json["info"]["definition"];
        assert_eq!(d["def"], serde_json::json!(["AQI="]));
        assert_eq!(d["metadata"]["sha256:aa"]["caps"]["file.base"], true);
        assert_eq!(d["metadata"]["sha256:aa"]["export_cache"]["Value"], true);
        assert_eq!(
            d["Source"]["locations"]["sha256:aa"]["locations"][0]["sourceIndex"],
            1
        );
        assert!(json["info"].get("language").is_none());
        let back = errdefs::Source::from_any(&src.to_any()).unwrap();
        assert_eq!(back, src);
    }

    #[test]
    fn solve_detail_is_jsonpb() {
        let op = pb::Op {
            inputs: vec![pb::Input {
                digest: "sha256:bb".into(),
                index: 0,
            }],
            op: Some(pb::op::Op::Exec(pb::ExecOp {
                meta: Some(pb::Meta {
                    args: vec!["sh".into()],
                    proxy_env: Some(Default::default()),
                    ..Default::default()
                }),
                mounts: vec![pb::Mount {
                    input: 0,
                    dest: "/".into(),
                    output: 0,
                    mount_type: pb::MountType::Bind as i32,
                    ..Default::default()
                }],
                network: pb::NetMode::None as i32,
                ..Default::default()
            })),
            ..Default::default()
        };
        let solve = errdefs::Solve {
            input_i_ds: vec!["in1".into()],
            mount_i_ds: vec!["m1".into(), "m2".into()],
            op: Some(op),
            subject: Some(errdefs::solve::Subject::File(errdefs::FileAction {
                index: 2,
            })),
            description: Default::default(),
        };
        let any = solve_to_any(&solve);
        assert_eq!(any.type_url, "github.com/moby/buildkit/errdefs.Solve+json");
        let json: serde_json::Value = serde_json::from_slice(&any.value).unwrap();
        assert_eq!(json["inputIDs"], serde_json::json!(["in1"]));
        assert_eq!(json["mountIDs"], serde_json::json!(["m1", "m2"]));
        assert_eq!(json["file"]["index"], "2", "int64 as a string: {json}");
        assert_eq!(json["op"]["exec"]["network"], "NONE", "{json}");
        assert_eq!(
            json["op"]["exec"]["meta"]["proxyEnv"],
            serde_json::json!({})
        );
        assert_eq!(json["op"]["inputs"][0]["digest"], "sha256:bb");
        assert_eq!(solve_from_any(&any).unwrap(), solve);
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
