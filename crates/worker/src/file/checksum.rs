//! Content checksums of paths inside a root, for cache keys (BuildKit's `contenthash` idea).
//!
//! The checksum covers, for the entry and everything below it (sorted by name): the relative
//! path, file type, permission and special mode bits, uid, gid, symlink target, device numbers
//! and the sha256 of regular file contents. Timestamps are not included (as upstream), so an
//! unchanged tree re-synced with new mtimes keeps its key. Symlinks below the top are not
//! followed.

use std::io::{self, Read};
use std::os::fd::OwnedFd;

use rustix::fs::{openat, readlinkat, statat, AtFlags, Dir, FileType, Mode, OFlags};
use sha2::{Digest, Sha256};

use super::root::{file_type, split, Root};
use crate::digest::KeyHasher;

/// Checksum of `p` in `root` (`follow`: resolve a symlink at `p` inside the root). A missing
/// path has a checksum too (so that creating it changes the key).
pub(crate) fn checksum(root: &Root, p: &str, follow: bool) -> io::Result<String> {
    let mut h = KeyHasher::new("berth.contenthash.v1");
    let resolved = if follow {
        match root.resolve_existing(p) {
            Ok(r) => Some(r),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        }
    } else {
        Some(super::root::clean_abs(p))
    };
    let Some(resolved) = resolved else {
        h.field(b"missing");
        return Ok(h.finish());
    };
    let (dir, name): (OwnedFd, Vec<u8>) = match split(&resolved) {
        None => (root.open_dir("/")?, b".".to_vec()),
        Some((parent, name)) => match root.open_dir(&parent) {
            Ok(d) => (d, name.into_bytes()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                h.field(b"missing");
                return Ok(h.finish());
            }
            Err(e) => return Err(e),
        },
    };
    match statat(&dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
        Err(rustix::io::Errno::NOENT) => {
            h.field(b"missing");
            return Ok(h.finish());
        }
        Err(e) => return Err(e.into()),
        Ok(_) => {}
    }
    entry(&mut h, &dir, &name, b"")?;
    Ok(h.finish())
}

fn entry(h: &mut KeyHasher, dir: &OwnedFd, name: &[u8], rel: &[u8]) -> io::Result<()> {
    let st = statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    let ft = file_type(&st);
    h.field(rel);
    h.field(&[ft as u8]);
    h.field(&(st.st_mode & 0o7777).to_le_bytes());
    h.field(&st.st_uid.to_le_bytes());
    h.field(&st.st_gid.to_le_bytes());
    match ft {
        FileType::RegularFile => {
            let fd = openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let mut f = std::fs::File::from(fd);
            let mut sha = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                sha.update(&buf[..n]);
            }
            h.field(&sha.finalize());
        }
        FileType::Symlink => {
            let t = readlinkat(dir, name, vec![])?;
            h.field(t.as_bytes());
        }
        FileType::CharacterDevice | FileType::BlockDevice => {
            h.field(&st.st_rdev.to_le_bytes());
        }
        FileType::Directory => {
            let sub = openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let mut names = vec![];
            for ent in Dir::read_from(&sub)? {
                let ent = ent?;
                let n = ent.file_name().to_bytes();
                if n != b"." && n != b".." {
                    names.push(n.to_vec());
                }
            }
            names.sort();
            h.field(b"dir-begin");
            for n in names {
                let mut r = rel.to_vec();
                if !r.is_empty() {
                    r.push(b'/');
                }
                r.extend_from_slice(&n);
                entry(h, &sub, &n, &r)?;
            }
            h.field(b"dir-end");
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_changes_change_the_checksum_and_mtime_does_not() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("a/b")).unwrap();
        std::fs::write(r.join("a/b/f"), "one").unwrap();
        std::fs::write(r.join("other"), "x").unwrap();
        let root = Root::open(r).unwrap();
        let c1 = checksum(&root, "/a", false).unwrap();
        let all1 = checksum(&root, "/", false).unwrap();
        // Touch: same content, new mtime.
        let f = std::fs::File::options()
            .write(true)
            .open(r.join("a/b/f"))
            .unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(checksum(&root, "/a", false).unwrap(), c1);
        // Unrelated change outside /a.
        std::fs::write(r.join("other"), "y").unwrap();
        assert_eq!(checksum(&root, "/a", false).unwrap(), c1);
        assert_ne!(checksum(&root, "/", false).unwrap(), all1);
        // Content change inside.
        std::fs::write(r.join("a/b/f"), "two").unwrap();
        assert_ne!(checksum(&root, "/a", false).unwrap(), c1);
        // Missing path.
        let m1 = checksum(&root, "/missing", false).unwrap();
        std::fs::write(r.join("missing"), "").unwrap();
        assert_ne!(checksum(&root, "/missing", false).unwrap(), m1);
    }
}
