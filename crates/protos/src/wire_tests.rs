//! Wire-compatibility tests: exact bytes for the fields peers depend on, the
//! whole schema against listings taken from upstream BuildKit, and generated
//! clients/servers talking to each other over real TCP.

use crate::fsutil::types::{packet::PacketType, Packet, Stat};
use crate::moby::buildkit::v1 as control;
use crate::pb;
use bytes::Bytes;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};

fn enc(m: &impl Message) -> Vec<u8> {
    m.encode_to_vec()
}

#[test]
fn solve_request_newer_fields_use_upstream_tags() {
    let req = control::SolveRequest {
        exporters: vec![control::Exporter {
            r#type: "local".into(),
            attrs: BTreeMap::new(),
        }],
        ..Default::default()
    };
    // tag 13, wire type 2 => 13<<3|2 = 0x6a; inner Exporter.Type tag 1 => 0x0a.
    assert_eq!(enc(&req), [0x6a, 7, 0x0a, 5, b'l', b'o', b'c', b'a', b'l']);

    let cases: Vec<(control::SolveRequest, Vec<u8>)> = vec![
        (
            control::SolveRequest {
                enable_session_exporter: true,
                ..Default::default()
            },
            vec![0x70, 1], // 14<<3|0
        ),
        (
            control::SolveRequest {
                source_policy_session: "p".into(),
                ..Default::default()
            },
            vec![0x7a, 1, b'p'], // 15<<3|2
        ),
        (
            control::SolveRequest {
                compatibility_version: 2,
                ..Default::default()
            },
            vec![0x80, 0x01, 2], // 16<<3|0 = 128 -> two-byte varint key
        ),
        (
            control::SolveRequest {
                proxy_network: true,
                ..Default::default()
            },
            vec![0x88, 0x01, 1], // 17<<3|0 = 136
        ),
        (
            control::SolveRequest {
                exporter_deprecated: "image".into(),
                ..Default::default()
            },
            vec![0x1a, 5, b'i', b'm', b'a', b'g', b'e'], // field 3 ("Exporter" in v0.11)
        ),
    ];
    for (msg, want) in cases {
        assert_eq!(enc(&msg), want, "{msg:?}");
        assert_eq!(control::SolveRequest::decode(&want[..]).unwrap(), msg);
    }
}

#[test]
fn prune_request_keep_storage_fields() {
    // What a newer buildctl sends for `--keep-storage 1000 --free-storage 7`:
    // maxUsedSpace (5) and minFreeSpace (6). Field 4 is v0.11's keepBytes.
    let wire = [0x20, 3, 0x28, 0xe8, 0x07, 0x30, 7];
    let req = control::PruneRequest::decode(&wire[..]).unwrap();
    assert_eq!(req.reserved_space, 3);
    assert_eq!(req.max_used_space, 1000);
    assert_eq!(req.min_free_space, 7);
    assert_eq!(enc(&req), wire);
}

#[test]
fn packet_type_is_varint_while_bytes_message_data_is_length_delimited() {
    let p = Packet {
        r#type: PacketType::PacketData as i32,
        stat: None,
        id: 7,
        data: Bytes::from_static(b"ab"),
    };
    // type: tag 1 varint; ID: tag 3 varint; data: tag 4 bytes.
    assert_eq!(enc(&p), [0x08, 2, 0x18, 7, 0x22, 2, b'a', b'b']);
    assert_eq!(PacketType::PacketFin as i32, 3);
    assert_eq!(PacketType::PacketErr as i32, 4);

    let m = crate::moby::filesync::v1::BytesMessage {
        data: Bytes::from_static(b"ab"),
    };
    assert_eq!(enc(&m), [0x0a, 2, b'a', b'b']);
    // A BytesMessage frame does not decode as a DATA packet: tag 1 has the
    // wrong wire type for Packet.type, so prost must reject it.
    assert!(Packet::decode(&enc(&m)[..]).is_err());
}

#[test]
fn stat_fields_match_fsutil() {
    let dir_mode: u32 = (1 << 31) | 0o755; // Go os.ModeDir | 0755
    let st = Stat {
        path: "d".into(),
        mode: dir_mode,
        uid: 1,
        gid: 2,
        size: 3,
        mod_time: 4,
        linkname: "l".into(),
        devmajor: 5,
        devminor: 6,
        xattrs: BTreeMap::from([("k".to_string(), Bytes::from_static(b"v"))]),
    };
    let mut want = vec![0x0a, 1, b'd'];
    want.push(0x10); // mode: tag 2 varint, 0x800001ed
    want.extend([0xed, 0x83, 0x80, 0x80, 0x08]);
    want.extend([0x18, 1, 0x20, 2, 0x28, 3, 0x30, 4]);
    want.extend([0x3a, 1, b'l', 0x40, 5, 0x48, 6]);
    // xattrs: tag 10 map entry {key=1:"k", value=2:"v"}
    want.extend([0x52, 6, 0x0a, 1, b'k', 0x12, 1, b'v']);
    assert_eq!(enc(&st), want);
    assert_eq!(Stat::decode(&want[..]).unwrap(), st);
}

#[test]
fn op_oneof_numbers() {
    use pb::op::Op as O;
    let cases: Vec<(O, u8)> = vec![
        (O::Exec(pb::ExecOp::default()), 2),
        (O::Source(pb::SourceOp::default()), 3),
        (O::File(pb::FileOp::default()), 4),
        (O::Build(pb::BuildOp::default()), 5),
        (O::Merge(pb::MergeOp::default()), 6),
        (O::Diff(pb::DiffOp::default()), 7),
        (O::Passthrough(pb::PassthroughOp::default()), 8),
    ];
    for (op, field) in cases {
        let bytes = enc(&pb::Op {
            op: Some(op.clone()),
            ..Default::default()
        });
        // An empty oneof member is still present: key + zero length.
        assert_eq!(bytes, [field << 3 | 2, 0], "{op:?}");
    }
    let with_platform = pb::Op {
        inputs: vec![pb::Input {
            digest: "d".into(),
            index: 0,
        }],
        op: Some(O::Source(pb::SourceOp {
            identifier: "i".into(),
            ..Default::default()
        })),
        platform: Some(pb::Platform {
            os: "linux".into(),
            ..Default::default()
        }),
        constraints: Some(pb::WorkerConstraints::default()),
    };
    // Field order on the wire is by number, oneof included (as Go writes it):
    // inputs = 1, source = 3, platform = 10 (OS = field 2 inside), constraints = 11.
    assert_eq!(
        enc(&with_platform),
        [
            0x0a, 3, 0x0a, 1, b'd', // inputs
            0x1a, 3, 0x0a, 1, b'i', // source.identifier
            0x52, 7, 0x12, 5, b'l', b'i', b'n', b'u', b'x', // platform
            0x5a, 0, // constraints
        ]
    );
}

#[test]
fn file_action_oneof_numbers() {
    use pb::file_action::Action as A;
    let cases: Vec<(A, u8)> = vec![
        (A::Copy(pb::FileActionCopy::default()), 4),
        (A::Mkfile(pb::FileActionMkFile::default()), 5),
        (A::Mkdir(pb::FileActionMkDir::default()), 6),
        (A::Rm(pb::FileActionRm::default()), 7),
        (A::Symlink(pb::FileActionSymlink::default()), 8),
    ];
    for (action, field) in cases {
        let bytes = enc(&pb::FileAction {
            action: Some(action.clone()),
            ..Default::default()
        });
        assert_eq!(bytes, [field << 3 | 2, 0], "{action:?}");
    }
    // FileOp.actions is field 2 (field 1 is unused upstream).
    let op = pb::FileOp {
        actions: vec![pb::FileAction::default()],
    };
    assert_eq!(enc(&op), [0x12, 0]);
    // Negative indexes (-1 = scratch) are 10-byte varints, as Go writes them.
    let scratch = pb::FileAction {
        input: -1,
        ..Default::default()
    };
    assert_eq!(enc(&scratch).len(), 1 + 10);
}

#[test]
fn copy_action_newer_fields() {
    let c = pb::FileActionCopy {
        always_replace_existing_dest_paths: true,
        mode_str: "u+x".into(),
        required_paths: vec!["a".into()],
        ..Default::default()
    };
    assert_eq!(
        enc(&c),
        [0x70, 1, 0x7a, 3, b'u', b'+', b'x', 0x82, 0x01, 1, b'a']
    );
}

#[test]
fn definition_metadata_is_sorted_by_digest() {
    let mut def = pb::Definition::default();
    for key in ["sha256:b", "sha256:a"] {
        def.metadata.insert(
            key.into(),
            pb::OpMetadata {
                ignore_cache: true,
                ..Default::default()
            },
        );
    }
    let bytes = enc(&def);
    let a = bytes.windows(8).position(|w| w == b"sha256:a").unwrap();
    let b = bytes.windows(8).position(|w| w == b"sha256:b").unwrap();
    assert!(a < b, "map entries must be written in key order");
    assert_eq!(pb::Definition::decode(&bytes[..]).unwrap(), def);
}

#[test]
fn gateway_result_and_exec_oneofs() {
    use crate::moby::buildkit::v1::frontend::{self as gw, exec_message::Input, result};
    let r = gw::Result {
        result: Some(result::Result::Ref(gw::Ref {
            id: "x".into(),
            def: None,
        })),
        metadata: BTreeMap::from([("k".to_string(), Bytes::from_static(b"v"))]),
        ..Default::default()
    };
    assert_eq!(
        enc(&r),
        [0x1a, 3, 0x0a, 1, b'x', 0x52, 6, 0x0a, 1, b'k', 0x12, 1, b'v']
    );
    let refs = gw::Result {
        result: Some(result::Result::Refs(gw::RefMap::default())),
        ..Default::default()
    };
    assert_eq!(enc(&refs), [0x22, 0]);

    let frames: Vec<(Input, u8)> = vec![
        (Input::Init(gw::InitMessage::default()), 2),
        (Input::File(gw::FdMessage::default()), 3),
        (Input::Resize(gw::ResizeMessage::default()), 4),
        (Input::Started(gw::StartedMessage::default()), 5),
        (Input::Exit(gw::ExitMessage::default()), 6),
        (Input::Done(gw::DoneMessage::default()), 7),
        (Input::Signal(gw::SignalMessage::default()), 8),
    ];
    for (input, field) in frames {
        let m = gw::ExecMessage {
            process_id: String::new(),
            input: Some(input.clone()),
        };
        assert_eq!(enc(&m), [field << 3 | 2, 0], "{input:?}");
    }
}

#[test]
fn rpc_status_details_round_trip() {
    let detail = prost_types::Any {
        type_url: crate::type_urls::ERRDEFS_VERTEX.into(),
        value: br#"{"digest":"sha256:x"}"#.to_vec(),
    };
    let st = crate::google::rpc::Status {
        code: 2,
        message: "boom".into(),
        details: vec![detail.clone()],
    };
    let bytes = enc(&st);
    assert_eq!(&bytes[..2], [0x08, 2]);
    assert_eq!(&bytes[2..8], [0x12, 4, b'b', b'o', b'o', b'm']);
    assert_eq!(bytes[8], 0x1a); // details: tag 3, length-delimited
    let back = crate::google::rpc::Status::decode(&bytes[..]).unwrap();
    assert_eq!(back.details, vec![detail]);
}

#[test]
fn vertex_timestamps_are_messages() {
    let v = control::Vertex {
        digest: "d".into(),
        started: Some(prost_types::Timestamp {
            seconds: 1,
            nanos: 2,
        }),
        ..Default::default()
    };
    assert_eq!(enc(&v), [0x0a, 1, b'd', 0x2a, 4, 0x08, 1, 0x10, 2]);
}

#[test]
fn service_names_are_upstream() {
    use tonic::server::NamedService;
    type Control = control::control_server::ControlServer<()>;
    type Bridge = crate::moby::buildkit::v1::frontend::llb_bridge_server::LlbBridgeServer<()>;
    type FileSync = crate::moby::filesync::v1::file_sync_server::FileSyncServer<()>;
    type FileSend = crate::moby::filesync::v1::file_send_server::FileSendServer<()>;
    type Auth = crate::moby::filesync::v1::auth_server::AuthServer<()>;
    type Secrets = crate::moby::buildkit::secrets::v1::secrets_server::SecretsServer<()>;
    type Ssh = crate::moby::sshforward::v1::ssh_server::SshServer<()>;
    type Health = crate::grpc::health::v1::health_server::HealthServer<()>;
    assert_eq!(Control::NAME, "moby.buildkit.v1.Control");
    assert_eq!(Bridge::NAME, "moby.buildkit.v1.frontend.LLBBridge");
    assert_eq!(FileSync::NAME, "moby.filesync.v1.FileSync");
    assert_eq!(FileSend::NAME, "moby.filesync.v1.FileSend");
    assert_eq!(Auth::NAME, "moby.filesync.v1.Auth");
    assert_eq!(Secrets::NAME, "moby.buildkit.secrets.v1.Secrets");
    assert_eq!(Ssh::NAME, "moby.sshforward.v1.SSH");
    assert_eq!(Health::NAME, "grpc.health.v1.Health");
}

#[test]
fn session_method_paths_exist() {
    let ours = our_listing();
    for path in crate::methods::ALL {
        let (service, method) = path[1..].rsplit_once('/').unwrap();
        let prefix = format!("method\t.{service}\t{method}\t");
        assert!(
            ours.iter().any(|l| l.starts_with(&prefix)),
            "{path} is not a method of our schema"
        );
    }
    assert_eq!(crate::methods::ALL.len(), 16);
}

fn our_listing() -> BTreeSet<String> {
    let fds = prost_types::FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).unwrap();
    crate::schema_listing::listing(&fds)
}

fn golden(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Drops the field-name column, for comparing against releases that used
/// other names for the same numbers.
fn without_field_names(lines: &BTreeSet<String>) -> BTreeSet<String> {
    lines
        .iter()
        .map(|l| {
            let mut cols: Vec<&str> = l.split('\t').collect();
            if cols[0] == "field" {
                cols.remove(3);
            }
            cols.join("\t")
        })
        .collect()
}

#[test]
fn schema_equals_upstream_master() {
    let ours = our_listing();
    let up = golden(include_str!("testdata/upstream-master.listing"));
    assert!(up.len() > 800, "golden listing looks truncated");
    let missing: Vec<_> = up.difference(&ours).collect();
    assert!(
        missing.is_empty(),
        "upstream facts we lack or differ on: {missing:#?}"
    );
    // Everything we add beyond BuildKit's own files is the googleapis Status
    // and the standard health service.
    let extra: Vec<_> = ours
        .difference(&up)
        .filter(|l| {
            let name = l.split('\t').nth(1).unwrap_or("");
            !name.starts_with(".google.rpc.") && !name.starts_with(".grpc.health.v1.")
        })
        .collect();
    assert!(extra.is_empty(), "facts not in upstream: {extra:#?}");
}

#[test]
fn schema_is_wire_compatible_with_v0_11_6() {
    let ours = without_field_names(&our_listing());
    let up = without_field_names(&golden(include_str!("testdata/upstream-v0.11.6.listing")));
    assert!(up.len() > 600, "golden listing looks truncated");
    let missing: Vec<_> = up.difference(&ours).collect();
    assert!(missing.is_empty(), "v0.11.6 facts we lack: {missing:#?}");
}

mod rpc {
    //! Generated client and server stubs over a real TCP connection.
    use crate::fsutil::types::{packet::PacketType, Packet};
    use crate::moby::buildkit::v1::control_server::{Control, ControlServer};
    use crate::moby::buildkit::v1::{self as control, control_client::ControlClient};
    use crate::moby::filesync::v1::file_sync_client::FileSyncClient;
    use crate::moby::filesync::v1::file_sync_server::{FileSync, FileSyncServer};
    use tokio_stream::StreamExt;
    use tonic::codegen::BoxStream;
    use tonic::{Request, Response, Status, Streaming};

    struct Daemon;

    #[tonic::async_trait]
    impl Control for Daemon {
        async fn list_workers(
            &self,
            req: Request<control::ListWorkersRequest>,
        ) -> Result<Response<control::ListWorkersResponse>, Status> {
            let record = crate::moby::buildkit::v1::types::WorkerRecord {
                id: req.into_inner().filter.join(","),
                ..Default::default()
            };
            Ok(Response::new(control::ListWorkersResponse {
                record: vec![record],
            }))
        }

        async fn status(
            &self,
            req: Request<control::StatusRequest>,
        ) -> Result<Response<BoxStream<control::StatusResponse>>, Status> {
            let r = req.into_inner().r#ref;
            let updates = (0..3).map(move |i| {
                Ok(control::StatusResponse {
                    vertexes: vec![control::Vertex {
                        digest: format!("{r}-{i}"),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
            });
            Ok(Response::new(Box::pin(tokio_stream::iter(updates))))
        }
    }

    struct Client;

    #[tonic::async_trait]
    impl FileSync for Client {
        async fn diff_copy(
            &self,
            req: Request<Streaming<Packet>>,
        ) -> Result<Response<BoxStream<Packet>>, Status> {
            // Answer each packet with a REQ for the same ID.
            let out = req.into_inner().map(|p| {
                p.map(|p| Packet {
                    r#type: PacketType::PacketReq as i32,
                    id: p.id,
                    ..Default::default()
                })
            });
            Ok(Response::new(Box::pin(out)))
        }
    }

    #[tokio::test]
    async fn generated_stubs_talk_over_tcp() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ControlServer::new(Daemon))
                .add_service(FileSyncServer::new(Client))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();

        let mut ctl = ControlClient::new(channel.clone());
        let workers = ctl
            .list_workers(control::ListWorkersRequest {
                filter: vec!["id==w1".into()],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(workers.record[0].id, "id==w1");

        let mut status = ctl
            .status(control::StatusRequest {
                r#ref: "job".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut digests = Vec::new();
        while let Some(msg) = status.message().await.unwrap() {
            digests.push(msg.vertexes[0].digest.clone());
        }
        assert_eq!(digests, ["job-0", "job-1", "job-2"]);

        // Not implemented by `Daemon`: the default stub must say so.
        let err = ctl.info(control::InfoRequest {}).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented);
        let err = ctl
            .update_build_history(control::UpdateBuildHistoryRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented);

        let mut fs = FileSyncClient::new(channel);
        let sent = (1..=3).map(|id| Packet {
            r#type: PacketType::PacketStat as i32,
            id,
            ..Default::default()
        });
        let mut replies = fs
            .diff_copy(tokio_stream::iter(sent))
            .await
            .unwrap()
            .into_inner();
        let mut ids = Vec::new();
        while let Some(p) = replies.message().await.unwrap() {
            assert_eq!(p.r#type, PacketType::PacketReq as i32);
            ids.push(p.id);
        }
        assert_eq!(ids, [1, 2, 3]);
        server.abort();
    }
}
