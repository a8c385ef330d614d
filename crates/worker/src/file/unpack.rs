//! Archive extraction for copies with `attemptUnpackDockerCompatibility` (Dockerfile `ADD` of a
//! local tar), following buildkitd's `solver/llbsolver/file/unpack.go`: a regular source file
//! that (after decompression) starts with a valid tar header is extracted into the
//! destination directory instead of being copied; anything else is copied as usual.
//!
//! Supported compressions: none, gzip, zstd. bzip2 and xz archives are reported as not
//! implemented rather than silently copied.
//!
//! Safety: the destination is resolved inside the state's root; extraction uses the `tar`
//! crate's `unpack`, which skips entries with `..`, and checks (by canonicalization) that the
//! parent of every entry, and every hard link target, lies inside the destination, so an
//! archive's symlinks cannot redirect writes out of it. Ownership, permissions, mtimes and
//! xattrs from the archive are kept (as Docker's `Untar` does).

use std::io::{self, BufReader, Read};

use rustix::fs::{FileType, Mode, OFlags};

use super::root::{file_type, Root};
use super::{io_to_action, mkdir_all, Attrs};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
    Bzip2,
    Xz,
}

fn detect(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else if head.starts_with(b"BZh") {
        Compression::Bzip2
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Compression::Xz
    } else {
        Compression::None
    }
}

fn open_src(root: &Root, p: &str) -> io::Result<Option<std::fs::File>> {
    let fd = match root.open_at(p, OFlags::RDONLY, Mode::empty()) {
        Ok(fd) => fd,
        Err(_) => return Ok(None),
    };
    if file_type(&rustix::fs::fstat(&fd)?) != FileType::RegularFile {
        return Ok(None);
    }
    Ok(Some(std::fs::File::from(fd)))
}

fn decoder(c: Compression, f: std::fs::File) -> io::Result<Box<dyn Read>> {
    let r = BufReader::new(f);
    Ok(match c {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(r)?),
        Compression::Bzip2 | Compression::Xz => {
            return Err(io::Error::other("unsupported compression"))
        }
    })
}

/// Whether `p` (resolved inside `root`) is a tar archive; `Err` for an archive whose
/// compression berth cannot read.
fn archive_kind(root: &Root, p: &str) -> Result<Option<Compression>> {
    let Some(mut f) = open_src(root, p).map_err(|e| io_to_action("copy", p, e))? else {
        return Ok(None);
    };
    let mut head = [0u8; 8];
    let n = f.read(&mut head).map_err(|e| io_to_action("copy", p, e))?;
    let c = detect(&head[..n]);
    if matches!(c, Compression::Bzip2 | Compression::Xz) {
        return Err(Error::not_implemented(format!(
            "extracting {c:?} archives ({p})"
        )));
    }
    let Some(f) = open_src(root, p).map_err(|e| io_to_action("copy", p, e))? else {
        return Ok(None);
    };
    let Ok(mut r) = decoder(c, f) else {
        return Ok(None);
    };
    let mut block = vec![0u8; 512];
    if r.read_exact(&mut block).is_err() {
        return Ok(None);
    }
    let header = tar::Header::from_byte_slice(&block);
    // A valid header: its checksum matches and it is not the all-zero end marker.
    let ok = block.iter().any(|b| *b != 0)
        && header
            .cksum()
            .is_ok_and(|sum| sum == block_checksum(&block));
    Ok(ok.then_some(c))
}

fn block_checksum(block: &[u8]) -> u32 {
    block
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                *b as u32
            }
        })
        .sum()
}

/// Extracts `src` into directory `dest` if it is an archive. Returns whether it did.
pub(crate) fn unpack(
    src: &Root,
    src_path: &str,
    dst: &Root,
    dest: &str,
    attrs: &Attrs,
) -> Result<bool> {
    let Some(c) = archive_kind(src, src_path)? else {
        return Ok(false);
    };
    mkdir_all(dst, dest, Mode::from_raw_mode(0o755), attrs)?;
    let resolved = dst
        .resolve_existing(dest)
        .map_err(|e| io_to_action("copy", dest, e))?;
    let host_dest = dst.path().join(resolved.trim_start_matches('/'));
    let f = open_src(src, src_path)
        .map_err(|e| io_to_action("copy", src_path, e))?
        .ok_or_else(|| Error::PathNotFound {
            path: src_path.to_string(),
        })?;
    let r = decoder(c, f).map_err(|e| io_to_action("copy", src_path, e))?;
    let mut ar = tar::Archive::new(r);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_preserve_mtime(true);
    ar.set_unpack_xattrs(true);
    ar.set_overwrite(true);
    ar.unpack(&host_dest).map_err(|e| {
        // tar's errors nest the cause; show the whole chain.
        let mut reason = format!("extracting archive: {e}");
        let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        while let Some(c) = cur {
            reason.push_str(&format!(": {c}"));
            cur = c.source();
        }
        Error::FileAction {
            action: "copy",
            path: src_path.to_string(),
            reason,
        }
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_bytes(entries: &[(&str, &[u8])], link: Option<(&str, &str)>) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        if let Some((name, target)) = link {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            h.set_mode(0o777);
            b.append_link(&mut h, name, target).unwrap();
        }
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o640);
            h.set_uid(12);
            h.set_gid(34);
            h.set_mtime(1000);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn extracts_plain_and_gzip_and_skips_non_archives() {
        use std::io::Write;
        use std::os::unix::fs::MetadataExt;
        let s = tempfile::tempdir().unwrap();
        let t = tempfile::tempdir().unwrap();
        let plain = tar_bytes(&[("dir/a.txt", b"A")], None);
        std::fs::write(s.path().join("x.tar"), &plain).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar_bytes(&[("b.txt", b"B")], None)).unwrap();
        std::fs::write(s.path().join("x.tar.gz"), gz.finish().unwrap()).unwrap();
        std::fs::write(s.path().join("notes.txt"), "just text").unwrap();
        let (sr, tr) = (Root::open(s.path()).unwrap(), Root::open(t.path()).unwrap());
        let a = Attrs::default();
        assert!(unpack(&sr, "/x.tar", &tr, "/out", &a).unwrap());
        assert!(unpack(&sr, "/x.tar.gz", &tr, "/out", &a).unwrap());
        assert!(!unpack(&sr, "/notes.txt", &tr, "/out", &a).unwrap());
        assert_eq!(
            std::fs::read_to_string(t.path().join("out/dir/a.txt")).unwrap(),
            "A"
        );
        assert_eq!(
            std::fs::read_to_string(t.path().join("out/b.txt")).unwrap(),
            "B"
        );
        let m = std::fs::metadata(t.path().join("out/dir/a.txt")).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mtime()), (12, 34, 1000));
    }

    #[test]
    fn archive_symlinks_cannot_redirect_writes() {
        let s = tempfile::tempdir().unwrap();
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let evil = tar_bytes(
            &[("esc/pwned", b"x")],
            Some(("esc", outside.path().to_str().unwrap())),
        );
        std::fs::write(s.path().join("evil.tar"), &evil).unwrap();
        let (sr, tr) = (Root::open(s.path()).unwrap(), Root::open(t.path()).unwrap());
        let r = unpack(&sr, "/evil.tar", &tr, "/out", &Attrs::default());
        assert!(r.is_err(), "{r:?}");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }
}
