//! Content checksums of paths inside a root, for cache keys (BuildKit's `contenthash` idea).
//!
//! The checksum covers, for the entry and everything below it (sorted by name): the relative
//! path, file type, permission and special mode bits, uid, gid, symlink target, device numbers
//! and the sha256 of regular file contents. Timestamps are not included (as upstream), so an
//! unchanged tree re-synced with new mtimes keeps its key. Symlinks below the top are not
//! followed.
//!
//! [`DigestCache`] lets a caller that checksums the same directory again (the persistent sync
//! directory of a `local://` source) skip re-reading files: a regular file's content digest is
//! reused when its path and stat (device, inode, size, mtime in ns, mode, uid, gid) are what they
//! were at the last checksum. BuildKit's contenthash keeps per-path digests the same way and only
//! rehashes what the fsutil receiver reports as changed; the receiver decides "unchanged" from
//! size, mtime, mode, owner and link target, so a content change that keeps size and mtime is
//! missed upstream too. Here it is caught whenever the file was rewritten, since berth's receiver
//! always writes a new inode and renames it into place.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;

use fsutil::patterns::{MatchInfo, PatternMatcher};
use rustix::fs::{openat, readlinkat, statat, AtFlags, Dir, FileType, Mode, OFlags};
use sha2::{Digest, Sha256};

use super::root::{file_type, split, Root};
use crate::digest::KeyHasher;

/// The stat fields a cached content digest is valid for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatKey([u64; 7]);

impl StatKey {
    fn of(st: &rustix::fs::Stat) -> Self {
        StatKey([
            st.st_dev,
            st.st_ino,
            st.st_size as u64,
            st.st_mtime as u64,
            st.st_mtime_nsec,
            st.st_mode as u64,
            ((st.st_uid as u64) << 32) | st.st_gid as u64,
        ])
    }
}

/// Relative path → (stat it was computed for, content sha256).
type Digests = HashMap<Vec<u8>, (StatKey, [u8; 32])>;

/// Content digests of regular files by relative path, valid while the file's stat is unchanged.
#[derive(Debug, Default)]
pub(crate) struct DigestCache {
    /// Digests from the previous checksum (looked up).
    old: Digests,
    /// Digests of this checksum (what [`DigestCache::save`] writes).
    new: Digests,
    /// Regular files whose content was read by checksums with this cache.
    pub(crate) files_read: u64,
    /// Content bytes read by checksums with this cache.
    pub(crate) bytes_read: u64,
}

const CACHE_MAGIC: &[u8] = b"berth.digestcache.v1\n";

impl DigestCache {
    /// Loads the cache written by [`DigestCache::save`]; a missing or unreadable file gives an
    /// empty cache (every file is read again).
    pub(crate) fn load(path: &Path) -> Self {
        let mut c = DigestCache::default();
        if let Ok(data) = std::fs::read(path) {
            if let Some(old) = Self::parse(&data) {
                c.old = old;
            }
        }
        c
    }

    fn parse(data: &[u8]) -> Option<Digests> {
        let mut rest = data.strip_prefix(CACHE_MAGIC)?;
        let mut take = |n: usize| -> Option<&[u8]> {
            let (a, b) = rest.split_at_checked(n)?;
            rest = b;
            Some(a)
        };
        let count = u64::from_le_bytes(take(8)?.try_into().ok()?);
        let mut m = HashMap::new();
        for _ in 0..count {
            let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
            let path = take(len)?.to_vec();
            let mut key = [0u64; 7];
            for k in &mut key {
                *k = u64::from_le_bytes(take(8)?.try_into().ok()?);
            }
            let digest: [u8; 32] = take(32)?.try_into().ok()?;
            m.insert(path, (StatKey(key), digest));
        }
        take(0)?;
        Some(m)
    }

    /// Writes the digests of the last checksum to `path` (atomically: temporary file + rename).
    pub(crate) fn save(&self, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension("tmp");
        let mut w = io::BufWriter::new(std::fs::File::create(&tmp)?);
        w.write_all(CACHE_MAGIC)?;
        w.write_all(&(self.new.len() as u64).to_le_bytes())?;
        for (p, (key, digest)) in &self.new {
            w.write_all(&(p.len() as u32).to_le_bytes())?;
            w.write_all(p)?;
            for k in key.0 {
                w.write_all(&k.to_le_bytes())?;
            }
            w.write_all(digest)?;
        }
        w.into_inner().map_err(|e| e.into_error())?;
        std::fs::rename(&tmp, path)
    }
}

/// Checksum of `p` in `root` (`follow`: resolve a symlink at `p` inside the root). A missing
/// path has a checksum too (so that creating it changes the key).
pub(crate) fn checksum(root: &Root, p: &str, follow: bool) -> io::Result<String> {
    checksum_cached(root, p, follow, &mut None)
}

/// Include/exclude patterns of a copy (dockerignore syntax, on paths relative to the copied
/// source), applied as the copy applies them: an entry below the top counts only if it matches
/// the include patterns (when there are any) and not the exclude patterns; a directory that
/// does not count itself is still looked into, unless it is excluded with no exception
/// pattern that could bring something below it back.
#[derive(Debug, Default)]
pub(crate) struct Filter {
    pub(crate) include: Option<PatternMatcher>,
    pub(crate) exclude: Option<PatternMatcher>,
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.include.is_none() && self.exclude.is_none()
    }
}

/// [`checksum`] of only what a copy with `filter` reads from `p`: a file the patterns leave out
/// does not change it (BuildKit's contenthash with `IncludePatterns`/`ExcludePatterns`).
pub(crate) fn checksum_filtered(
    root: &Root,
    p: &str,
    follow: bool,
    filter: &Filter,
) -> io::Result<String> {
    if filter.is_empty() {
        return checksum(root, p, follow);
    }
    checksum_impl(root, p, follow, &mut None, Some(filter))
}

/// [`checksum`] reusing (and refilling) `cache` for regular files whose stat is unchanged.
pub(crate) fn checksum_cached(
    root: &Root,
    p: &str,
    follow: bool,
    cache: &mut Option<&mut DigestCache>,
) -> io::Result<String> {
    checksum_impl(root, p, follow, cache, None)
}

fn checksum_impl(
    root: &Root,
    p: &str,
    follow: bool,
    cache: &mut Option<&mut DigestCache>,
    filter: Option<&Filter>,
) -> io::Result<String> {
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
    let top = Matched {
        filter,
        inc: MatchInfo::default(),
        exc: MatchInfo::default(),
    };
    entry(&mut h, &dir, &name, b"", cache, &top)?;
    Ok(h.finish())
}

/// The filter and the pattern results of an entry's parent.
struct Matched<'f> {
    filter: Option<&'f Filter>,
    inc: MatchInfo,
    exc: MatchInfo,
}

impl<'f> Matched<'f> {
    /// Whether `rel` counts, and the pattern results its children start from.
    fn child(&self, rel: &[u8]) -> io::Result<(bool, Matched<'f>)> {
        let mut out = Matched {
            filter: self.filter,
            inc: MatchInfo::default(),
            exc: MatchInfo::default(),
        };
        let Some(f) = self.filter.filter(|_| !rel.is_empty()) else {
            return Ok((true, out));
        };
        let rel = String::from_utf8_lossy(rel);
        let pat_err = |e: fsutil::Error| io::Error::other(format!("copy patterns: {e}"));
        let mut counts = true;
        if let Some(m) = &f.include {
            let (ok, info) = m
                .matches_using_parent_results(&rel, &self.inc)
                .map_err(pat_err)?;
            counts = ok;
            out.inc = info;
        }
        if let Some(m) = &f.exclude {
            let (ex, info) = m
                .matches_using_parent_results(&rel, &self.exc)
                .map_err(pat_err)?;
            counts &= !ex;
            out.exc = info;
        }
        Ok((counts, out))
    }

    /// A directory that does not count and under which nothing can count again.
    fn skips_dir(&self, counts: bool) -> bool {
        self.filter.is_some_and(|f| {
            !counts
                && f.include.is_none()
                && f.exclude.as_ref().is_some_and(|m| !m.has_exclusions())
        })
    }
}

fn entry(
    h: &mut KeyHasher,
    dir: &OwnedFd,
    name: &[u8],
    rel: &[u8],
    cache: &mut Option<&mut DigestCache>,
    parent: &Matched<'_>,
) -> io::Result<()> {
    let st = statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    let ft = file_type(&st);
    let (counts, here) = parent.child(rel)?;
    if !counts {
        if ft == FileType::Directory && !here.skips_dir(false) {
            let sub = openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            children(h, &sub, rel, cache, &here)?;
        }
        return Ok(());
    }
    h.field(rel);
    h.field(&[ft as u8]);
    h.field(&(st.st_mode & 0o7777).to_le_bytes());
    h.field(&st.st_uid.to_le_bytes());
    h.field(&st.st_gid.to_le_bytes());
    match ft {
        FileType::RegularFile => {
            let key = StatKey::of(&st);
            if let Some(c) = cache.as_deref_mut() {
                if let Some((k, d)) = c.old.get(rel) {
                    if *k == key {
                        h.field(d);
                        c.new.insert(rel.to_vec(), (key, *d));
                        return Ok(());
                    }
                }
            }
            let fd = openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let mut f = std::fs::File::from(fd);
            let mut sha = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                sha.update(&buf[..n]);
            }
            let d: [u8; 32] = sha.finalize().into();
            h.field(&d);
            if let Some(c) = cache.as_deref_mut() {
                c.files_read += 1;
                c.bytes_read += total;
                // The digest is only reusable if the file did not change while it was read.
                if StatKey::of(&rustix::fs::fstat(&f)?) == key {
                    c.new.insert(rel.to_vec(), (key, d));
                }
            }
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
            h.field(b"dir-begin");
            children(h, &sub, rel, cache, &here)?;
            h.field(b"dir-end");
        }
        _ => {}
    }
    Ok(())
}

/// The entries of the open directory `sub` (at `rel`), sorted by name.
fn children(
    h: &mut KeyHasher,
    sub: &OwnedFd,
    rel: &[u8],
    cache: &mut Option<&mut DigestCache>,
    here: &Matched<'_>,
) -> io::Result<()> {
    let mut names = vec![];
    for ent in Dir::read_from(sub)? {
        let ent = ent?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    names.sort();
    for n in names {
        let mut r = rel.to_vec();
        if !r.is_empty() {
            r.push(b'/');
        }
        r.extend_from_slice(&n);
        entry(h, sub, &n, &r, cache, here)?;
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

    /// Per (include, exclude, file changed): whether the filtered checksum of `/` changes.
    #[test]
    fn filtered_checksum_follows_the_copy_patterns() {
        let pm = |p: &[&str]| (!p.is_empty()).then(|| PatternMatcher::new(p).unwrap());
        let cases: &[(&[&str], &[&str], &str, bool)] = &[
            (&["sub/*"], &["sub/bar"], "myfile", false),
            (&["sub/*"], &["sub/bar"], "sub/bar", false),
            (&["sub/*"], &["sub/bar"], "sub/foo", true),
            (&[], &["sub"], "sub/foo", false),
            (&[], &["sub", "!sub/foo"], "sub/foo", true),
            (&[], &["sub", "!sub/foo"], "sub/bar", false),
            (&["*.txt"], &[], "sub/foo", false),
            (&["*.txt"], &[], "a.txt", true),
            (&[], &[], "myfile", true),
        ];
        for (inc, exc, change, changes) in cases {
            let d = tempfile::tempdir().unwrap();
            let r = d.path();
            std::fs::create_dir(r.join("sub")).unwrap();
            for f in ["myfile", "a.txt", "sub/foo", "sub/bar"] {
                std::fs::write(r.join(f), f).unwrap();
            }
            let root = Root::open(r).unwrap();
            let filter = Filter {
                include: pm(inc),
                exclude: pm(exc),
            };
            let before = checksum_filtered(&root, "/", false, &filter).unwrap();
            std::fs::write(r.join(change), "changed").unwrap();
            let after = checksum_filtered(&root, "/", false, &filter).unwrap();
            assert_eq!(before != after, *changes, "{inc:?} {exc:?} {change}");
        }
    }

    #[test]
    fn digest_cache_reuses_unchanged_files_and_rereads_changed_ones() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path().join("tree");
        std::fs::create_dir_all(r.join("a")).unwrap();
        std::fs::write(r.join("a/f"), "one").unwrap();
        std::fs::write(r.join("g"), "two").unwrap();
        let root = Root::open(&r).unwrap();
        let plain = checksum(&root, "/", false).unwrap();
        let file = d.path().join("digests");

        let mut c = DigestCache::load(&file);
        assert_eq!(
            checksum_cached(&root, "/", false, &mut Some(&mut c)).unwrap(),
            plain
        );
        assert_eq!((c.files_read, c.bytes_read), (2, 6));
        c.save(&file).unwrap();

        // Reloaded: nothing is read and the checksum is the same.
        let mut c = DigestCache::load(&file);
        assert_eq!(
            checksum_cached(&root, "/", false, &mut Some(&mut c)).unwrap(),
            plain
        );
        assert_eq!(c.files_read, 0);
        c.save(&file).unwrap();

        // Same size, new content, new inode (as the receiver writes): re-read, new checksum.
        std::fs::write(r.join("a/f.new"), "ONE").unwrap();
        std::fs::rename(r.join("a/f.new"), r.join("a/f")).unwrap();
        let mut c = DigestCache::load(&file);
        let changed = checksum_cached(&root, "/", false, &mut Some(&mut c)).unwrap();
        assert_ne!(changed, plain);
        assert_eq!(changed, checksum(&root, "/", false).unwrap());
        assert_eq!(c.files_read, 1);

        // A corrupt cache file is ignored (everything is read again).
        std::fs::write(&file, b"berth.digestcache.v1\n\x05").unwrap();
        let mut c = DigestCache::load(&file);
        assert_eq!(
            checksum_cached(&root, "/", false, &mut Some(&mut c)).unwrap(),
            changed
        );
        assert_eq!(c.files_read, 2);
    }
}
