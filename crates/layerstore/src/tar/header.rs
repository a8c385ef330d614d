//! Tar header blocks laid out the way Go's `archive/tar` writes them for Docker.
//!
//! Docker builds layer tars with Go's writer, which picks USTAR when a header fits (splitting
//! a long ASCII name into the 155-byte prefix and 100-byte name fields) and PAX otherwise:
//! names that are too long or not ASCII, xattrs (`SCHILY.xattr.<name>`), numbers too big for
//! their octal field. We follow those choices, field formats (zero-padded octal, NUL end,
//! `"%06o\0 "` checksum) and the PAX header naming (`dir/PaxHeaders.0/base`, records sorted by
//! key) so our layers look like Docker's own. Exact equality with Docker is not required —
//! the tar-split we write describes whatever bytes we emit — but familiar output keeps
//! every tar reader happy. `tar::Header` supplies the block layout.

use super::Xattrs;
/// One member as it goes into the tar.
pub(crate) struct HeaderSpec<'a> {
    /// Full member name; directories end in `/`.
    pub name: &'a [u8],
    /// Tar typeflag (`b'0'`, `b'1'`, `b'2'`, `b'3'`, `b'4'`, `b'5'`, `b'6'`).
    pub typeflag: u8,
    /// Permission bits plus setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Seconds since the epoch.
    pub mtime: i64,
    pub size: u64,
    pub linkname: &'a [u8],
    pub devmajor: u32,
    pub devminor: u32,
    /// Extended attributes, sorted by name.
    pub xattrs: &'a [(Vec<u8>, Vec<u8>)],
}

const NAME_SIZE: usize = 100;
const PREFIX_SIZE: usize = 155;

/// Appends the header blocks for `spec` (an optional PAX header with its padded data, then
/// the main header) to `out`.
pub(crate) fn encode(spec: &HeaderSpec<'_>, out: &mut Vec<u8>) {
    let mut pax: Xattrs = Vec::new();
    let mut ustar_ok = true;

    let name_long = spec.name.len() > NAME_SIZE;
    if !is_ascii(spec.name) || name_long {
        if split_ustar_path(spec.name).is_none() {
            ustar_ok = false;
        }
        pax.push((b"path".to_vec(), spec.name.to_vec()));
    }
    if !is_ascii(spec.linkname) || spec.linkname.len() > NAME_SIZE {
        ustar_ok = false;
        pax.push((b"linkpath".to_vec(), spec.linkname.to_vec()));
    }
    let mut num = |key: &str, v: u64, field: usize| {
        if !fits_octal(field, v as i64) || v > i64::MAX as u64 {
            ustar_ok = false;
            pax.push((key.as_bytes().to_vec(), v.to_string().into_bytes()));
        }
    };
    num("uid", spec.uid, 8);
    num("gid", spec.gid, 8);
    num("size", spec.size, 12);
    if !fits_octal(12, spec.mtime) {
        ustar_ok = false;
        pax.push((b"mtime".to_vec(), spec.mtime.to_string().into_bytes()));
    }
    for (k, v) in spec.xattrs {
        ustar_ok = false;
        let mut key = b"SCHILY.xattr.".to_vec();
        key.extend_from_slice(k);
        pax.push((key, v.clone()));
    }

    if ustar_ok {
        let mut blk = tar::Header::new_ustar();
        let (prefix, name) = split_ustar_path(spec.name).unwrap_or((&[][..], spec.name));
        fill_main(&mut blk, spec, name, &|b, v| format_octal(b, v));
        format_string(
            &mut blk.as_ustar_mut().unwrap_or_else(|| unreachable!()).prefix,
            prefix,
        );
        set_ustar_magic_and_checksum(&mut blk);
        out.extend_from_slice(blk.as_bytes());
        return;
    }

    // PAX extended header member.
    pax.sort_by(|a, b| a.0.cmp(&b.0));
    let mut data = Vec::new();
    for (k, v) in &pax {
        format_pax_record(k, v, &mut data);
    }
    let pax_name = pax_header_name(spec.name);
    let mut xblk = tar::Header::new_ustar();
    {
        let v7 = xblk.as_old_mut();
        v7.linkflag[0] = b'x';
        let mut n: Vec<u8> = to_ascii(&pax_name);
        n.truncate(NAME_SIZE);
        while n.last() == Some(&b'/') {
            n.pop();
        }
        format_string(&mut v7.name, &n);
        format_octal(&mut v7.mode, 0);
        format_octal(&mut v7.uid, 0);
        format_octal(&mut v7.gid, 0);
        format_octal(&mut v7.size, data.len() as i64);
        format_octal(&mut v7.mtime, 0);
    }
    set_ustar_magic_and_checksum(&mut xblk);
    out.extend_from_slice(xblk.as_bytes());
    out.extend_from_slice(&data);
    out.resize(out.len() + padding(data.len() as u64), 0);

    // Main header: ASCII-only, truncated names; numbers that do not fit become 0.
    let mut blk = tar::Header::new_ustar();
    let name = to_ascii(spec.name);
    fill_main(&mut blk, spec, &name, &|b, v| {
        format_octal(b, if fits_octal(b.len(), v) { v } else { 0 })
    });
    set_ustar_magic_and_checksum(&mut blk);
    out.extend_from_slice(blk.as_bytes());
}

/// Bytes of zero padding after `size` bytes of member data.
pub(crate) fn padding(size: u64) -> usize {
    ((512 - (size % 512)) % 512) as usize
}

type NumFmt<'a> = &'a dyn Fn(&mut [u8], i64);

fn fill_main(blk: &mut tar::Header, spec: &HeaderSpec<'_>, name: &[u8], num: NumFmt<'_>) {
    let link = to_ascii(spec.linkname);
    {
        let v7 = blk.as_old_mut();
        v7.linkflag[0] = spec.typeflag;
        format_string(&mut v7.name, name);
        format_string(&mut v7.linkname, &link);
        num(&mut v7.mode, spec.mode as i64);
        num(&mut v7.uid, spec.uid.min(i64::MAX as u64) as i64);
        num(&mut v7.gid, spec.gid.min(i64::MAX as u64) as i64);
        num(&mut v7.size, spec.size.min(i64::MAX as u64) as i64);
        num(&mut v7.mtime, spec.mtime);
    }
    // The USTAR view shares the first 257 bytes with the V7 view.
    let u = blk.as_ustar_mut().unwrap_or_else(|| unreachable!());
    format_string(&mut u.uname, b"");
    format_string(&mut u.gname, b"");
    num(&mut u.dev_major, spec.devmajor as i64);
    num(&mut u.dev_minor, spec.devminor as i64);
}

fn set_ustar_magic_and_checksum(blk: &mut tar::Header) {
    {
        let bytes = blk.as_mut_bytes();
        bytes[257..263].copy_from_slice(b"ustar\0");
        bytes[263..265].copy_from_slice(b"00");
        bytes[148..156].fill(b' ');
    }
    let sum: u64 = blk.as_bytes().iter().map(|&b| b as u64).sum();
    let v7 = blk.as_old_mut();
    format_octal(&mut v7.cksum[..7], sum as i64);
    v7.cksum[7] = b' ';
}

fn is_ascii(b: &[u8]) -> bool {
    b.iter().all(|&c| c < 0x80)
}

fn to_ascii(b: &[u8]) -> Vec<u8> {
    b.iter().copied().filter(|&c| c < 0x80 && c != 0).collect()
}

fn fits_octal(field: usize, x: i64) -> bool {
    let bits = (field as u32 - 1) * 3;
    x >= 0 && (field >= 22 || x < (1i64 << bits))
}

fn format_octal(b: &mut [u8], x: i64) {
    let x = if fits_octal(b.len(), x) { x } else { 0 };
    let s = format!("{:0width$o}", x, width = b.len() - 1);
    format_string(b, s.as_bytes());
}

/// Copies `s` into the field (truncating), NUL-terminating when shorter. Like Go, a name cut
/// at the field end does not keep a trailing slash (some readers would see a directory).
fn format_string(b: &mut [u8], s: &[u8]) {
    let n = s.len().min(b.len());
    b[..n].copy_from_slice(&s[..n]);
    if s.len() < b.len() {
        b[s.len()] = 0;
    }
    if s.len() > b.len() && b[b.len() - 1] == b'/' {
        let mut end = b.len() - 1;
        while end > 0 && s[end - 1] == b'/' {
            end -= 1;
        }
        b[end] = 0;
    }
}

/// Splits a long ASCII name into USTAR prefix and name fields, as Go does.
fn split_ustar_path(name: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut length = name.len();
    if length <= NAME_SIZE || !is_ascii(name) {
        return None;
    } else if length > PREFIX_SIZE + 1 {
        length = PREFIX_SIZE + 1;
    } else if name[length - 1] == b'/' {
        length -= 1;
    }
    let i = name[..length].iter().rposition(|&c| c == b'/')?;
    let nlen = name.len() - i - 1;
    if i == 0 || nlen > NAME_SIZE || nlen == 0 || i > PREFIX_SIZE {
        return None;
    }
    Some((&name[..i], &name[i + 1..]))
}

/// `dir/PaxHeaders.0/base` (Go's `path.Join(path.Split(name))` with the marker in between).
fn pax_header_name(name: &[u8]) -> Vec<u8> {
    let (dir, file) = match name.iter().rposition(|&c| c == b'/') {
        Some(i) => (&name[..=i], &name[i + 1..]),
        None => (&[][..], name),
    };
    let mut parts: Vec<&[u8]> = dir
        .split(|&c| c == b'/')
        .filter(|p| !p.is_empty())
        .collect();
    parts.push(b"PaxHeaders.0");
    if !file.is_empty() {
        parts.push(file);
    }
    parts.join(&b'/')
}

/// `"<len> <key>=<value>\n"` where `len` counts the whole record including itself.
fn format_pax_record(k: &[u8], v: &[u8], out: &mut Vec<u8>) {
    let base = k.len() + v.len() + 3;
    let mut size = base + base.to_string().len();
    if size.to_string().len() + base != size {
        size = base + size.to_string().len();
    }
    out.extend_from_slice(size.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(k);
    out.push(b'=');
    out.extend_from_slice(v);
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &[u8]) -> HeaderSpec<'_> {
        HeaderSpec {
            name,
            typeflag: b'0',
            mode: 0o644,
            uid: 1000,
            gid: 1000,
            mtime: 1_700_000_000,
            size: 5,
            linkname: b"",
            devmajor: 0,
            devminor: 0,
            xattrs: &[],
        }
    }

    fn parse(bytes: &[u8]) -> Vec<(Vec<u8>, u64)> {
        let mut ar = tar::Archive::new(bytes);
        ar.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path_bytes().into_owned(), e.size())
            })
            .collect()
    }

    fn with_data(hdr: Vec<u8>, size: usize) -> Vec<u8> {
        let mut v = hdr;
        v.extend(std::iter::repeat_n(b'x', size));
        v.resize(v.len() + padding(size as u64), 0);
        v.extend([0u8; 1024]);
        v
    }

    #[test]
    fn short_name_is_single_ustar_block() {
        let mut out = Vec::new();
        encode(&spec(b"etc/hosts"), &mut out);
        assert_eq!(out.len(), 512);
        assert_eq!(&out[257..265], b"ustar\x0000");
        assert_eq!(&out[100..108], b"0000644\0");
        assert_eq!(&out[124..136], b"00000000005\0");
        assert_eq!(out[155], b' ');
        let h = tar::Header::from_byte_slice(&out);
        assert_eq!(h.cksum().unwrap(), {
            let mut c = out.clone();
            c[148..156].fill(b' ');
            c.iter().map(|&b| b as u32).sum::<u32>()
        });
        assert_eq!(parse(&with_data(out, 5)), vec![(b"etc/hosts".to_vec(), 5)]);
    }

    #[test]
    fn long_ascii_name_uses_prefix_split() {
        let name = format!("{}/{}", "d".repeat(120), "f".repeat(90));
        let mut out = Vec::new();
        encode(&spec(name.as_bytes()), &mut out);
        assert_eq!(out.len(), 512, "fits USTAR prefix/name");
        assert_eq!(parse(&with_data(out, 5)), vec![(name.into_bytes(), 5)]);
    }

    #[test]
    fn unsplittable_or_non_ascii_names_use_pax() {
        for name in [
            "x".repeat(300).into_bytes(),
            b"caf\xc3\xa9".to_vec(),
            b"bad\xff\xfename".to_vec(),
        ] {
            let mut out = Vec::new();
            encode(&spec(&name), &mut out);
            assert_eq!(out[156], b'x', "pax header first");
            assert_eq!(parse(&with_data(out, 5)), vec![(name.clone(), 5)]);
        }
    }

    #[test]
    fn xattrs_and_big_numbers_go_to_pax() {
        let x = vec![(b"user.k".to_vec(), b"v\0\xff".to_vec())];
        let mut s = spec(b"f");
        s.xattrs = &x;
        s.uid = 1 << 40;
        s.mtime = -5;
        let mut out = Vec::new();
        encode(&s, &mut out);
        let bytes = with_data(out, 5);
        let mut ar = tar::Archive::new(&bytes[..]);
        let mut e = ar.entries().unwrap().next().unwrap().unwrap();
        let recs: Vec<(String, Vec<u8>)> = e
            .pax_extensions()
            .unwrap()
            .unwrap()
            .map(|r| {
                let r = r.unwrap();
                (r.key().unwrap().to_owned(), r.value_bytes().to_vec())
            })
            .collect();
        assert_eq!(
            recs,
            vec![
                ("SCHILY.xattr.user.k".to_owned(), b"v\0\xff".to_vec()),
                ("mtime".to_owned(), b"-5".to_vec()),
                ("uid".to_owned(), (1u64 << 40).to_string().into_bytes()),
            ]
        );
        assert_eq!(e.header().uid().unwrap(), 1 << 40);
    }

    #[test]
    fn pax_record_length_counts_itself() {
        for vlen in [0usize, 1, 5, 6, 7, 90, 95, 96, 97, 990, 995, 996] {
            let mut out = Vec::new();
            let v = vec![b'a'; vlen];
            format_pax_record(b"path", &v, &mut out);
            let sp = out.iter().position(|&c| c == b' ').unwrap();
            let n: usize = std::str::from_utf8(&out[..sp]).unwrap().parse().unwrap();
            assert_eq!(n, out.len(), "value len {vlen}");
        }
    }

    #[test]
    fn pax_header_names() {
        assert_eq!(pax_header_name(b"a/b/c"), b"a/b/PaxHeaders.0/c");
        assert_eq!(pax_header_name(b"c"), b"PaxHeaders.0/c");
        assert_eq!(pax_header_name(b"a/b/"), b"a/b/PaxHeaders.0");
    }
}
