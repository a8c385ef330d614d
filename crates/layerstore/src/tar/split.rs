//! tar-split records: what Docker keeps next to each layer to rebuild its exact tar bytes.
//!
//! Format (see `shared/spec/docker-store.md` §4.3): a gzip of newline-delimited JSON objects
//! `{"type":1|2,"name":…,"name_raw":<b64>,"size":N,"payload":<b64>|null,"position":i}`.
//! Type 2 ("segment") holds raw tar bytes (headers, PAX records, padding, end blocks);
//! type 1 ("file") names one member, its size and, for size > 0, the CRC-64/ISO (Go's
//! `crc64.ISO` table, i.e. `CRC_64_GO_ISO`) of its content as 8 big-endian bytes.
//!
//! Rule used by both the writer and the applier: before each member, a segment holding every
//! byte since the end of the previous member's data; then the member's file record; after the
//! last member, one segment with the rest of the stream.

use std::io::{self, Write};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use crc::{Crc, Table, CRC_64_GO_ISO};
use flate2::write::GzEncoder;

/// Table-driven (slice-by-16) CRC-64 with Go's ISO parameters.
pub(crate) static CRC64: Crc<u64, Table<16>> = Crc::<u64, Table<16>>::new(&CRC_64_GO_ISO);

/// Streams tar-split records into a gzip sink.
pub(crate) struct TarSplitWriter<'a> {
    gz: GzEncoder<&'a mut dyn Write>,
    position: u64,
    line: Vec<u8>,
}

impl<'a> TarSplitWriter<'a> {
    pub(crate) fn new(sink: &'a mut dyn Write) -> Self {
        TarSplitWriter {
            gz: GzEncoder::new(sink, flate2::Compression::default()),
            position: 0,
            line: Vec::with_capacity(1024),
        }
    }

    /// Records raw tar bytes (skipped when empty).
    pub(crate) fn segment(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.line.clear();
        self.line.extend_from_slice(b"{\"type\":2,\"payload\":\"");
        self.line.extend_from_slice(B64.encode(bytes).as_bytes());
        self.line.extend_from_slice(b"\",\"position\":");
        self.finish_line()
    }

    /// Records one member: its name as read back by a tar reader, its size and content CRC.
    pub(crate) fn file(&mut self, name: &[u8], size: u64, crc: Option<u64>) -> io::Result<()> {
        self.line.clear();
        self.line.extend_from_slice(b"{\"type\":1,");
        match std::str::from_utf8(name) {
            Ok(s) => {
                self.line.extend_from_slice(b"\"name\":");
                serde_json::to_writer(&mut self.line, s).map_err(io::Error::other)?;
            }
            Err(_) => {
                self.line.extend_from_slice(b"\"name_raw\":\"");
                self.line.extend_from_slice(B64.encode(name).as_bytes());
                self.line.push(b'"');
            }
        }
        if size > 0 {
            self.line
                .extend_from_slice(format!(",\"size\":{size}").as_bytes());
        }
        match crc {
            Some(c) if size > 0 => {
                self.line.extend_from_slice(b",\"payload\":\"");
                self.line
                    .extend_from_slice(B64.encode(c.to_be_bytes()).as_bytes());
                self.line.extend_from_slice(b"\",\"position\":");
            }
            _ => self
                .line
                .extend_from_slice(b",\"payload\":null,\"position\":"),
        }
        self.finish_line()
    }

    fn finish_line(&mut self) -> io::Result<()> {
        self.line
            .extend_from_slice(format!("{}}}\n", self.position).as_bytes());
        self.position += 1;
        self.gz.write_all(&self.line)
    }

    /// Ends the gzip stream and flushes the sink.
    pub(crate) fn finish(self) -> io::Result<()> {
        let sink = self.gz.finish()?;
        sink.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc64_matches_go_iso() {
        // Go: crc64.Checksum([]byte("123456789"), crc64.MakeTable(crc64.ISO)) == 0xb90956c775a41001
        assert_eq!(CRC64.checksum(b"123456789"), 0xb909_56c7_75a4_1001);
        let mut d = CRC64.digest();
        d.update(b"1234");
        d.update(b"56789");
        assert_eq!(d.finalize(), 0xb909_56c7_75a4_1001);
    }

    #[test]
    fn records_are_ndjson_in_gzip() {
        let mut out = Vec::new();
        let mut w = TarSplitWriter::new(&mut out);
        w.segment(b"hdr").unwrap();
        w.file(b"a/b", 3, Some(1)).unwrap();
        w.file(b"dir/", 0, None).unwrap();
        w.file(b"bad\xff", 0, None).unwrap();
        w.segment(b"").unwrap();
        w.segment(&[0u8; 4]).unwrap();
        w.finish().unwrap();
        let mut text = String::new();
        io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&out[..]), &mut text).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[0]["type"], 2);
        assert_eq!(lines[0]["payload"], "aGRy");
        assert_eq!(lines[1]["name"], "a/b");
        assert_eq!(lines[1]["size"], 3);
        assert_eq!(lines[1]["payload"], "AAAAAAAAAAE=");
        assert_eq!(lines[2]["payload"], serde_json::Value::Null);
        assert!(lines[2].get("size").is_none());
        assert_eq!(lines[3]["name_raw"], "YmFk/w==");
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(l["position"], i as u64);
        }
    }
}
