//! Conversion between [`Packet`]/[`Stat`] and the generated `fsutil.types` wire messages.

use crate::{packet_type, Error, Packet, Stat};
use bytes::Bytes;
use protos::fsutil::types as wire;

impl From<Stat> for wire::Stat {
    fn from(s: Stat) -> Self {
        wire::Stat {
            path: s.path,
            mode: s.mode,
            uid: s.uid,
            gid: s.gid,
            size: s.size,
            mod_time: s.mod_time,
            linkname: s.linkname,
            devmajor: s.devmajor,
            devminor: s.devminor,
            xattrs: s
                .xattrs
                .into_iter()
                .map(|(k, v)| (k, Bytes::from(v)))
                .collect(),
        }
    }
}

impl From<wire::Stat> for Stat {
    fn from(s: wire::Stat) -> Self {
        Stat {
            path: s.path,
            mode: s.mode,
            uid: s.uid,
            gid: s.gid,
            size: s.size,
            mod_time: s.mod_time,
            linkname: s.linkname,
            devmajor: s.devmajor,
            devminor: s.devminor,
            xattrs: s.xattrs.into_iter().map(|(k, v)| (k, v.to_vec())).collect(),
        }
    }
}

impl From<Packet> for wire::Packet {
    fn from(p: Packet) -> Self {
        let mut w = wire::Packet::default();
        match p {
            Packet::Stat(st) => {
                w.r#type = packet_type::STAT;
                w.stat = st.map(Into::into);
            }
            Packet::Req { id } => {
                w.r#type = packet_type::REQ;
                w.id = id;
            }
            Packet::Data { id, data } => {
                w.r#type = packet_type::DATA;
                w.id = id;
                w.data = data;
            }
            Packet::Fin => w.r#type = packet_type::FIN,
            Packet::Err(msg) => {
                w.r#type = packet_type::ERR;
                w.data = Bytes::from(msg.into_bytes());
            }
        }
        w
    }
}

impl TryFrom<wire::Packet> for Packet {
    type Error = Error;

    fn try_from(w: wire::Packet) -> Result<Self, Error> {
        Ok(match w.r#type {
            packet_type::STAT => Packet::Stat(w.stat.map(Into::into)),
            packet_type::REQ => Packet::Req { id: w.id },
            packet_type::DATA => Packet::Data {
                id: w.id,
                data: w.data,
            },
            packet_type::FIN => Packet::Fin,
            packet_type::ERR => Packet::Err(String::from_utf8_lossy(&w.data).into_owned()),
            other => return Err(Error::protocol(format!("unknown packet type {other}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn packet_roundtrip_and_wire_bytes() {
        let st = Stat {
            path: "a/b".into(),
            mode: crate::filemode::MODE_DIR | 0o755,
            mod_time: 5,
            ..Default::default()
        };
        for p in [
            Packet::Stat(Some(st.clone())),
            Packet::Stat(None),
            Packet::Req { id: 3 },
            Packet::Data {
                id: 3,
                data: Bytes::from_static(b"xyz"),
            },
            Packet::Data {
                id: 3,
                data: Bytes::new(),
            },
            Packet::Fin,
            Packet::Err("bad".into()),
        ] {
            let w: wire::Packet = p.clone().into();
            let back =
                Packet::try_from(wire::Packet::decode(w.encode_to_vec().as_slice()).unwrap())
                    .unwrap();
            assert_eq!(back, p);
        }
        // PACKET_REQ id=7 is field 1 varint 1, field 3 varint 7.
        let w: wire::Packet = Packet::Req { id: 7 }.into();
        assert_eq!(w.encode_to_vec(), vec![0x08, 0x01, 0x18, 0x07]);
        // An empty STAT (end of listing) is the empty message: type 0 is the default.
        let w: wire::Packet = Packet::Stat(None).into();
        assert!(w.encode_to_vec().is_empty());
        assert!(Packet::try_from(wire::Packet {
            r#type: 9,
            ..Default::default()
        })
        .is_err());
    }
}
