//! A streaming tar reader for untrusted layer tars.
//!
//! Written here rather than using `tar::Archive` because the applier needs (a) the exact raw
//! bytes around each member to emit tar-split records, (b) hard caps on the metadata a
//! hostile stream can make us buffer (PAX and GNU long-name members are read into memory),
//! and (c) Go's reading rules, which decide what Docker sees: header-only types (links,
//! devices, dirs, fifos) carry no data whatever their size field says, PAX `path`,
//! `linkpath`, `size`, `uid`, `gid`, `mtime` and `SCHILY.xattr.*` override the header.
//! `tar::Header` decodes the fixed fields (octal and base-256 numbers, USTAR prefix).

use super::Xattrs;
use std::io::{self, Read};

use super::digest::HashingReader;
use super::header::padding;
use super::split::{TarSplitWriter, CRC64};
use crate::{Error, Result};

/// Largest PAX or GNU long-name member we accept (they are held in memory).
const MAX_META: u64 = 1 << 20;
/// Largest run of bytes after the end-of-archive marker we accept.
const MAX_TRAILER: u64 = 1 << 20;

/// One member, with every extension applied.
#[derive(Debug, Default)]
pub(crate) struct RawEntry {
    pub name: Vec<u8>,
    pub link: Vec<u8>,
    pub typeflag: u8,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: i64,
    /// Bytes of content that follow the header.
    pub size: u64,
    pub devmajor: u32,
    pub devminor: u32,
    pub xattrs: Xattrs,
}

impl RawEntry {
    pub(crate) fn display_name(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

pub(crate) struct TarReader<'a, R> {
    r: HashingReader<R>,
    split: Option<TarSplitWriter<'a>>,
    /// Raw bytes since the end of the last member's data.
    seg: Vec<u8>,
    /// Name of the member being read (for errors and its tar-split record).
    cur: Vec<u8>,
    /// Size recorded for the current member and the content bytes still unread.
    cur_size: u64,
    /// Content bytes that follow the current header (0 for header-only types).
    cur_content: u64,
    remaining: u64,
    crc: crc::Digest<'static, u64, crc::Table<16>>,
    in_entry: bool,
    done: bool,
    /// Most uncompressed bytes accepted.
    max_size: u64,
}

impl<'a, R: Read> TarReader<'a, R> {
    pub(crate) fn new(r: R, split: Option<TarSplitWriter<'a>>, max_size: u64) -> Self {
        Self::with_reader(HashingReader::new(r), split, max_size)
    }

    /// A reader that counts but does not hash (its [`TarReader::digest`] is all zeros).
    pub(crate) fn unhashed(r: R, split: Option<TarSplitWriter<'a>>, max_size: u64) -> Self {
        Self::with_reader(HashingReader::counting(r), split, max_size)
    }

    fn with_reader(r: HashingReader<R>, split: Option<TarSplitWriter<'a>>, max_size: u64) -> Self {
        TarReader {
            max_size,
            r,
            split,
            seg: Vec::with_capacity(4096),
            cur: Vec::new(),
            cur_size: 0,
            cur_content: 0,
            remaining: 0,
            crc: CRC64.digest(),
            in_entry: false,
            done: false,
        }
    }

    fn corrupt(&self, reason: impl Into<String>) -> Error {
        Error::CorruptTar {
            entry: String::from_utf8_lossy(&self.cur).into_owned(),
            offset: self.r.pos,
            reason: reason.into(),
        }
    }

    fn read_err(&self, e: io::Error) -> Error {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            return self.corrupt("truncated: unexpected end of stream");
        }
        Error::TarRead {
            entry: String::from_utf8_lossy(&self.cur).into_owned(),
            offset: self.r.pos,
            source: e,
        }
    }

    /// Reads exactly `buf.len()` bytes of raw tar (headers, padding) into the segment.
    fn raw(&mut self, n: usize) -> Result<&[u8]> {
        let start = self.seg.len();
        self.seg.resize(start + n, 0);
        if let Err(e) = self.r.read_exact(&mut self.seg[start..]) {
            return Err(self.read_err(e));
        }
        Ok(&self.seg[start..])
    }

    /// Reads a metadata member's content (PAX records, GNU long names) into memory.
    fn meta(&mut self, size: u64) -> Result<Vec<u8>> {
        if size > MAX_META {
            return Err(self.corrupt(format!(
                "extension header of {size} bytes exceeds {MAX_META}"
            )));
        }
        let n = size as usize;
        let data = self.raw(n + padding(size))?[..n].to_vec();
        Ok(data)
    }

    /// Advances to the next member, skipping what is left of the current one.
    pub(crate) fn next_entry(&mut self) -> Result<Option<RawEntry>> {
        self.end_entry()?;
        if self.done {
            return Ok(None);
        }
        let mut pax: Xattrs = Vec::new();
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        loop {
            let start = self.seg.len();
            let first = self.fill_block()?;
            if !first {
                // Clean end of stream with no end-of-archive marker.
                return Err(self.corrupt("truncated: no end-of-archive marker"));
            }
            let block: [u8; 512] = self.seg[start..start + 512]
                .try_into()
                .unwrap_or([0u8; 512]);
            if block.iter().all(|&b| b == 0) {
                self.finish_stream()?;
                return Ok(None);
            }
            let hdr = tar::Header::from_byte_slice(&block);
            if !checksum_ok(&block) {
                return Err(self.corrupt("header checksum mismatch"));
            }
            let typeflag = block[156];
            let mut size = go_numeric(&block, SIZE_FIELD, hdr.entry_size())
                .ok_or_else(|| self.corrupt("invalid size field"))?;
            match typeflag {
                b'x' | b'g' | b'L' | b'K' => {
                    let data = self.meta(size)?;
                    match typeflag {
                        b'x' => pax = parse_pax(&data).map_err(|r| self.corrupt(r))?,
                        b'L' => long_name = Some(trim_nul(data)),
                        b'K' => long_link = Some(trim_nul(data)),
                        _ => {} // global PAX headers carry nothing Docker uses
                    }
                    if self.seg.len() as u64 > MAX_META * 4 {
                        return Err(self.corrupt("too many consecutive extension headers"));
                    }
                    continue;
                }
                _ => {}
            }
            let mut e = RawEntry {
                typeflag,
                name: long_name
                    .take()
                    .unwrap_or_else(|| hdr.path_bytes().into_owned()),
                link: long_link
                    .take()
                    .unwrap_or_else(|| hdr.link_name_bytes().unwrap_or_default().into_owned()),
                ..Default::default()
            };
            self.cur = e.name.clone();
            e.mode = go_numeric(&block, MODE_FIELD, hdr.mode().map(u64::from))
                .ok_or_else(|| self.corrupt("invalid mode field"))? as u32
                & 0o7777;
            e.uid = go_numeric(&block, UID_FIELD, hdr.uid())
                .ok_or_else(|| self.corrupt("invalid uid field"))?;
            e.gid = go_numeric(&block, GID_FIELD, hdr.gid())
                .ok_or_else(|| self.corrupt("invalid gid field"))?;
            e.mtime = go_numeric(&block, MTIME_FIELD, hdr.mtime())
                .ok_or_else(|| self.corrupt("invalid mtime field"))? as i64;
            if matches!(typeflag, b'3' | b'4') {
                e.devmajor = hdr
                    .device_major()
                    .map_err(|_| self.corrupt("invalid devmajor field"))?
                    .unwrap_or(0);
                e.devminor = hdr
                    .device_minor()
                    .map_err(|_| self.corrupt("invalid devminor field"))?
                    .unwrap_or(0);
            }
            for (k, v) in pax {
                let num = || -> Result<u64> {
                    std::str::from_utf8(&v)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| self.corrupt("invalid numeric PAX record"))
                };
                match &k[..] {
                    b"path" => e.name = v.clone(),
                    b"linkpath" => e.link = v.clone(),
                    b"size" => size = num()?,
                    b"uid" => e.uid = num()?,
                    b"gid" => e.gid = num()?,
                    b"mtime" => {
                        e.mtime =
                            parse_pax_time(&v).ok_or_else(|| self.corrupt("invalid PAX mtime"))?
                    }
                    _ => {
                        if let Some(x) = k.strip_prefix(b"SCHILY.xattr.") {
                            e.xattrs.push((x.to_vec(), v));
                        }
                    }
                }
            }
            self.cur = e.name.clone();
            self.cur_size = size;
            // Go reads no content for header-only types, whatever the size field says.
            e.size = if matches!(typeflag, b'1' | b'2' | b'3' | b'4' | b'5' | b'6') {
                0
            } else {
                size
            };
            self.remaining = e.size;
            self.cur_content = e.size;
            self.crc = CRC64.digest();
            self.in_entry = true;
            if let Some(s) = &mut self.split {
                s.segment(&self.seg)
                    .map_err(|e| Error::TarOutput { source: e })?;
            }
            self.seg.clear();
            return Ok(Some(e));
        }
    }

    /// Reads one 512-byte block into the segment; false on a clean end of stream.
    fn fill_block(&mut self) -> Result<bool> {
        let start = self.seg.len();
        self.seg.resize(start + 512, 0);
        let mut got = 0;
        while got < 512 {
            match self.r.read(&mut self.seg[start + got..start + 512]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.read_err(e)),
            }
        }
        if got == 0 {
            self.seg.truncate(start);
            return Ok(false);
        }
        if got < 512 {
            return Err(self.corrupt("truncated: partial header block"));
        }
        Ok(true)
    }

    /// Reads content of the current member.
    pub(crate) fn read_data(&mut self, buf: &mut [u8]) -> Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = self.remaining.min(buf.len() as u64) as usize;
        loop {
            match self.r.read(&mut buf[..want]) {
                Ok(0) => return Err(self.corrupt("truncated: member content cut short")),
                Ok(n) => {
                    if self.r.pos > self.max_size {
                        return Err(Error::TarLimit {
                            entry: String::from_utf8_lossy(&self.cur).into_owned(),
                            limit: "max_size",
                            max: self.max_size,
                        });
                    }
                    if self.split.is_some() {
                        self.crc.update(&buf[..n]);
                    }
                    self.remaining -= n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.read_err(e)),
            }
        }
    }

    /// Skips unread content and padding, and records the member for tar-split.
    fn end_entry(&mut self) -> Result<()> {
        if !self.in_entry {
            return Ok(());
        }
        let mut scratch = [0u8; 8192];
        while self.remaining > 0 {
            self.read_data(&mut scratch)?;
        }
        let pad = padding(self.cur_content);
        self.raw(pad)?;
        if let Some(s) = &mut self.split {
            let crc = std::mem::replace(&mut self.crc, CRC64.digest()).finalize();
            s.file(&self.cur, self.cur_size, Some(crc))
                .map_err(|e| Error::TarOutput { source: e })?;
        }
        self.in_entry = false;
        Ok(())
    }

    /// After the first zero block: keep the rest of the stream (second zero block, record
    /// padding) in the final segment.
    fn finish_stream(&mut self) -> Result<()> {
        let mut buf = [0u8; 8192];
        let mut extra = 0u64;
        loop {
            let n = match self.r.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.read_err(e)),
            };
            if n == 0 {
                break;
            }
            extra += n as u64;
            if extra > MAX_TRAILER {
                return Err(self.corrupt(format!(
                    "more than {MAX_TRAILER} bytes after the end-of-archive marker"
                )));
            }
            self.seg.extend_from_slice(&buf[..n]);
        }
        if let Some(mut s) = self.split.take() {
            s.segment(&self.seg)
                .map_err(|e| Error::TarOutput { source: e })?;
            s.finish().map_err(|e| Error::TarOutput { source: e })?;
        }
        self.seg.clear();
        self.done = true;
        Ok(())
    }

    /// (sha256, length) of every byte read so far.
    pub(crate) fn digest(self) -> (super::Digest, u64) {
        (super::digest::finish(self.r.hash), self.r.pos)
    }

    /// Whether the end-of-archive marker was reached.
    #[allow(dead_code)]
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }
}

fn checksum_ok(block: &[u8; 512]) -> bool {
    let field = &block[148..156];
    let digits: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&c| c == b' ' || c == 0)
        .take_while(|c| c.is_ascii_digit())
        .collect();
    let Some(stored) = std::str::from_utf8(&digits)
        .ok()
        .and_then(|s| i64::from_str_radix(s, 8).ok())
    else {
        return false;
    };
    let (mut unsigned, mut signed) = (0i64, 0i64);
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += b as i64;
        signed += b as i8 as i64;
    }
    stored == unsigned || stored == signed
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// Parses `"<len> <key>=<value>\n"` records.
fn parse_pax(mut data: &[u8]) -> std::result::Result<Xattrs, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let sp = data
            .iter()
            .position(|&c| c == b' ')
            .ok_or("invalid PAX record: no length")?;
        let len: usize = std::str::from_utf8(&data[..sp])
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .ok_or("invalid PAX record length")?;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err("invalid PAX record length".into());
        }
        let rec = &data[sp + 1..len - 1];
        let eq = rec
            .iter()
            .position(|&c| c == b'=')
            .ok_or("invalid PAX record: no '='")?;
        out.push((rec[..eq].to_vec(), rec[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(out)
}

/// PAX times are decimal seconds with an optional fraction; we keep whole seconds.
fn parse_pax_time(v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?;
    let int = s.split('.').next()?;
    if int.is_empty() || int == "-" {
        return None;
    }
    int.parse().ok()
}

/// Byte ranges of the ustar header's numeric fields that [`go_numeric`] reads.
const MODE_FIELD: std::ops::Range<usize> = 100..108;
const UID_FIELD: std::ops::Range<usize> = 108..116;
const GID_FIELD: std::ops::Range<usize> = 116..124;
const SIZE_FIELD: std::ops::Range<usize> = 124..136;
const MTIME_FIELD: std::ops::Range<usize> = 136..148;

/// A numeric header field as Go's `archive/tar` (what dockerd and buildkitd read layers with)
/// reads it: a field of only NULs and spaces is 0 (writers such as some hand-made or minimal
/// tools leave uid/gid empty), anything else as the `tar` crate parses it (octal or GNU
/// base-256). `None` for a field neither accepts.
fn go_numeric(
    block: &[u8; 512],
    field: std::ops::Range<usize>,
    parsed: std::io::Result<u64>,
) -> Option<u64> {
    if block[field].iter().all(|&b| b == 0 || b == b' ') {
        return Some(0);
    }
    parsed.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_parse() {
        let recs = parse_pax(b"11 path=ab\n20 SCHILY.xattr.k=\x00\n").unwrap();
        assert_eq!(recs[0], (b"path".to_vec(), b"ab".to_vec()));
        assert_eq!(recs[1], (b"SCHILY.xattr.k".to_vec(), b"\0".to_vec()));
        for bad in [
            &b"5 a=b\n"[..],
            b"x path=a\n",
            b"99 path=a\n",
            b"9 patha\n\n",
            b"10 path=ab",
        ] {
            assert!(
                parse_pax(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time(b"1700000000.123"), Some(1_700_000_000));
        assert_eq!(parse_pax_time(b"-5"), Some(-5));
        assert_eq!(parse_pax_time(b"x"), None);
        assert_eq!(parse_pax_time(b""), None);
    }

    /// One regular-file member with `content`, its uid/gid/mtime fields blank as `blank`
    /// leaves them, and a valid checksum; then the end-of-archive marker.
    fn tar_with_blank_fields(content: &[u8], blank: u8) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.set_path("f").unwrap();
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        let raw = h.as_mut_bytes();
        for f in [UID_FIELD, GID_FIELD, MTIME_FIELD] {
            raw[f].fill(blank);
        }
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(content);
        out.resize(512 + content.len().div_ceil(512) * 512 + 1024, 0);
        out
    }

    #[test]
    fn blank_numeric_fields_read_as_zero_like_go() {
        for blank in [0u8, b' '] {
            let tar = tar_with_blank_fields(b"hello", blank);
            let mut r = TarReader::new(&tar[..], None, u64::MAX);
            let e = r.next_entry().unwrap().expect("one member");
            assert_eq!((e.uid, e.gid, e.mtime, e.mode, e.size), (0, 0, 0, 0o644, 5));
            let mut buf = [0u8; 16];
            let n = r.read_data(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"hello");
            assert!(r.next_entry().unwrap().is_none());
        }
    }

    #[test]
    fn garbage_numeric_field_is_still_refused() {
        let mut tar = tar_with_blank_fields(b"x", 0);
        tar[UID_FIELD.start] = b'z';
        let h = tar::Header::from_byte_slice(&tar[..512]);
        let mut h = h.clone();
        h.set_cksum();
        tar[..512].copy_from_slice(h.as_bytes());
        let err = TarReader::new(&tar[..], None, u64::MAX)
            .next_entry()
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid uid field"), "{err}");
    }
}
