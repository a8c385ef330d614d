//! `local://NAME` sources: the client directory, received through the session
//! (`source/local/local.go`, `session.md` §4.3).
//!
//! Cache-key phase: the directory is synced through [`SessionProvider::sync_local`] into a
//! persistent per-(name, shared key hint) directory under `<root>/worker/local/` (so a re-sync
//! only transfers changes; the receiver keeps the listing it applied in `<dir>.listing` and
//! diffs the next listing against it, so a re-sync that changes nothing makes no system call
//! per entry), and its content checksum (paths, modes, owners, contents; no
//! times) becomes the key together with the name and filters — not the session id or
//! `local.unique`, which change between invocations. The checksum keeps a digest cache next to
//! the directory (`<dir>.digests`, see [`DigestCache`]), so a re-sync reads only the files the
//! receiver rewrote, and the checksum itself (`<dir>.sum`): when the receiver reports that the
//! sync changed nothing (every entry had the client's size, mtime in ns, mode, owner and link
//! target, and nothing was deleted), the key reuses it and the receiver's walk is the only pass
//! over the tree. The sum file is removed before a sync and written after the checksum, and the
//! digest cache is trusted only when the sum file was there, so a sync that fails half-way
//! leaves nothing stale. A new snapshot of the tree gets the checksum recorded for copies from
//! it (`ChecksumMemo`). Exec phase (cache miss only): the synced
//! tree becomes a new committed snapshot (record type `source.local`) whose regular files are
//! hard links to the synced ones: the receiver never writes into an existing file (it writes a
//! new file and renames it over the old one), so later syncs cannot change the snapshot, and a
//! re-sync with one changed file costs one file, not a copy of the whole context.
//!
//! The sync directory is locked from the sync until the copy is done (or the build no longer
//! needs it), so concurrent builds of the same name cannot interleave.

use std::ffi::CStr;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use layerstore::snapshot::{LayerMeta, RecordType, SnapshotOptions, SnapshotStore};
use protos::pb;
use rustix::fs::{
    chmodat, chownat, linkat, mkdirat, mknodat, readlinkat, statat, symlinkat, utimensat, AtFlags,
    Dir, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid,
};

use crate::error::{Error, Result};
use crate::file::checksum::{checksum_cached, DigestCache};
use crate::file::root::Root;
use crate::llbsolver::cache::blocking;
use crate::llbsolver::definition::{json_list_attr, LoadedOp};
use crate::ops::{BuildEnv, Shared};
use crate::progress::ProgressEvent;
use crate::result::Snap;
use crate::session::{LocalDiffer, LocalSync, SessionProvider, TransferProgress};
use crate::solver::{Op, OpContext, Solved};

struct LocalSource {
    req: LocalSync,
    dir: PathBuf,
    lock_key: String,
    shared: Arc<Shared>,
    session: Arc<dyn SessionProvider>,
    store: SnapshotStore,
    guard: Mutex<Option<tokio::sync::OwnedMutexGuard<()>>>,
    /// The synced tree's checksum, set by the cache key (and given to the snapshot made of it).
    sum: Mutex<Option<String>>,
}

/// The solver op for `op`.
pub(crate) fn new(op: &LoadedOp, env: &Arc<BuildEnv>) -> Result<Arc<dyn Op<Snap>>> {
    let Some(pb::op::Op::Source(src)) = &op.op.op else {
        return Err(Error::Internal(
            "source_local::new on a non-source op".into(),
        ));
    };
    let name = src
        .identifier
        .strip_prefix("local://")
        .ok_or_else(|| Error::invalid_op(&op.digest, "not a local source"))?
        .to_string();
    let mut req = LocalSync::new(name.clone());
    // `local.session` may be `prefix:ID`; the prefix only renames the source.
    req.session_id = src
        .attrs
        .get("local.session")
        .map(|s| s.rsplit(':').next().unwrap_or(s).to_string())
        .filter(|s| !s.is_empty());
    req.include_patterns = json_list_attr(&src.attrs, "local.includepattern");
    req.exclude_patterns = json_list_attr(&src.attrs, "local.excludepatterns");
    req.follow_paths = json_list_attr(&src.attrs, "local.followpaths");
    req.shared_key_hint = src.attrs.get("local.sharedkeyhint").cloned();
    req.differ = match src.attrs.get("local.differ").map(String::as_str) {
        Some("none") => LocalDiffer::None,
        _ => LocalDiffer::Metadata,
    };
    let lock_key = format!(
        "{}:{}",
        name,
        req.shared_key_hint.clone().unwrap_or_default()
    );
    let dir = env
        .shared
        .local_root
        .join(&crate::digest::sha256_hex(lock_key.as_bytes())[..32]);
    req.receive_state = Some(receive_state_path(&dir));
    Ok(Arc::new(LocalSource {
        req,
        dir,
        lock_key,
        shared: env.shared.clone(),
        session: env.session.clone(),
        store: env.store.clone(),
        guard: Mutex::new(None),
        sum: Mutex::new(None),
    }))
}

#[async_trait]
impl Op<Snap> for LocalSource {
    async fn cache_key(&self, ctx: &OpContext, _inputs: &[Solved<Snap>]) -> Result<String> {
        let guard = self.shared.local_lock(&self.lock_key).lock_owned().await;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| Error::io("create directory", &self.dir, e))?;
        // The checksum the last successful cache key left, true of the tree as it left it (and
        // the digest cache beside it is trusted only then). Dropped until the sync below and
        // the checksum after it have both succeeded.
        let sum_path = sum_path(&self.dir);
        let last_sum = read_sum(&sum_path);
        match std::fs::remove_file(&sum_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", &sum_path, e)),
        }
        let id = format!("transferring {}:", self.req.name);
        let started = SystemTime::now();
        let (progress, vertex, id2) = (ctx.progress.clone(), ctx.vertex.clone(), id.clone());
        let reporter = TransferProgress::new(move |bytes| {
            progress.send(ProgressEvent::VertexStatus {
                vertex: vertex.clone(),
                id: id2.clone(),
                name: "transferring".into(),
                current: bytes as i64,
                total: 0,
                timestamp: SystemTime::now(),
                started: Some(started),
                completed: None,
            })
        });
        let res = self
            .session
            .sync_local(&self.req, &self.dir, &reporter)
            .await;
        let bytes = res.as_ref().map(|s| s.bytes).unwrap_or(0);
        ctx.progress.send(ProgressEvent::VertexStatus {
            vertex: ctx.vertex.clone(),
            id,
            name: "transferring".into(),
            current: bytes as i64,
            total: 0,
            timestamp: SystemTime::now(),
            started: Some(started),
            completed: Some(SystemTime::now()),
        });
        let synced = res?;
        let dir = self.dir.clone();
        let sum = blocking(move || {
            let span = tracing::debug_span!(
                "local.checksum",
                reused = tracing::field::Empty,
                files_read = tracing::field::Empty,
                bytes_read = tracing::field::Empty
            );
            let _entered = span.enter();
            let sum = match last_sum {
                // The sync changed nothing in a tree whose checksum is known: the receiver's
                // walk was the only one this build needs.
                Some(sum) if synced.unchanged => {
                    span.record("reused", true);
                    sum
                }
                last_sum => {
                    span.record("reused", false);
                    let cache_path = digest_cache_path(&dir);
                    let mut cache = if last_sum.is_some() {
                        DigestCache::load(&cache_path)
                    } else {
                        DigestCache::default()
                    };
                    let root = Root::open(&dir).map_err(|e| Error::io("open", &dir, e))?;
                    let sum = checksum_cached(&root, "/", false, &mut Some(&mut cache))
                        .map_err(|e| Error::io("checksum", &dir, e))?;
                    span.record("files_read", cache.files_read);
                    span.record("bytes_read", cache.bytes_read);
                    // Without the cache file the next checksum reads everything again: still
                    // correct.
                    if let Err(e) = cache.save(&cache_path) {
                        tracing::warn!(path = %cache_path.display(), error = %e, "cannot save digest cache");
                    }
                    sum
                }
            };
            // Without the sum file the next build checksums the tree again: still correct.
            if let Err(e) = write_sum(&sum_path, &sum) {
                tracing::warn!(path = %sum_path.display(), error = %e, "cannot save checksum");
            }
            Ok::<_, Error>(sum)
        })
        .await?;
        *self.sum.lock().unwrap() = Some(sum.clone());
        *self.guard.lock().unwrap() = Some(guard);
        let mut h = crate::digest::KeyHasher::new("berth.local.v1");
        h.field(self.req.name.as_bytes());
        for list in [
            &self.req.include_patterns,
            &self.req.exclude_patterns,
            &self.req.follow_paths,
        ] {
            h.field(list.join("\0").as_bytes());
        }
        h.field(sum.as_bytes());
        Ok(h.finish())
    }

    async fn exec(&self, ctx: &OpContext, _inputs: &[Solved<Snap>]) -> Result<Vec<Snap>> {
        let store = self.store.clone();
        let dir = self.dir.clone();
        let desc = format!("local source for {}", self.req.name);
        let cancel = ctx.cancel.clone();
        let res = blocking(move || {
            let _span = tracing::debug_span!("local.snapshot").entered();
            let src = open_dir_fd(&dir).map_err(|e| Error::io("open", &dir, e))?;
            let opts = SnapshotOptions {
                description: desc,
                record_type: RecordType::LocalSource,
            };
            let mut failure = None;
            let added = store.add_layer(None, &opts, |diff| {
                let run = || -> io::Result<()> {
                    let dst = open_dir_fd(diff)?;
                    link_tree(&src, &dst, &|| cancel.is_cancelled())?;
                    let st = rustix::fs::fstat(&src)?;
                    copy_meta(&src, c".", &dst, c".", &st)
                };
                match run() {
                    Ok(()) => Ok(LayerMeta::default()),
                    Err(e) => {
                        let err = if cancel.is_cancelled() {
                            Error::Canceled
                        } else {
                            Error::io("link local source into", diff, e)
                        };
                        failure = Some(err);
                        Err(layerstore::Error::Io {
                            op: "link local source",
                            path: diff.to_path_buf(),
                            source: std::io::Error::other("link failed"),
                        })
                    }
                }
            });
            let (id, _layer) = match added {
                Ok(x) => x,
                Err(e) => return Err(failure.unwrap_or_else(|| Error::store("add layer")(e))),
            };
            Snap::acquire(&store, id)
        })
        .await;
        // The synced directory may change again now.
        self.guard.lock().unwrap().take();
        let snap = res?;
        // The snapshot holds the synced tree: a copy from it has the checksum the cache key
        // computed, without mounting it and reading it again.
        if let Some(sum) = self.sum.lock().unwrap().as_deref() {
            self.shared.checksums.insert_root(snap.id(), sum);
        }
        Ok(vec![snap])
    }
}

/// Where the digest cache of sync directory `dir` lives (next to it, outside the synced tree).
fn digest_cache_path(dir: &Path) -> PathBuf {
    dir.with_extension("digests")
}

/// Where the receiver keeps the listing it applied to sync directory `dir` (next to it): a no-op
/// re-sync compares the client's listing with it instead of walking the directory.
fn receive_state_path(dir: &Path) -> PathBuf {
    dir.with_extension("listing")
}

/// Where the checksum of sync directory `dir` lives while it is known to be true of the tree.
fn sum_path(dir: &Path) -> PathBuf {
    dir.with_extension("sum")
}

const SUM_MAGIC: &str = "berth.localsum.v1 ";

/// The checksum in `path`, if the file is there and whole.
fn read_sum(path: &Path) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let sum = s.strip_prefix(SUM_MAGIC)?.strip_suffix('\n')?;
    (!sum.is_empty() && !sum.contains(char::is_whitespace)).then(|| sum.to_string())
}

/// Writes `sum` to `path` (temporary file + rename: a reader sees the old state or the new).
fn write_sum(path: &Path, sum: &str) -> io::Result<()> {
    let tmp = path.with_extension("sum.tmp");
    std::fs::write(&tmp, format!("{SUM_MAGIC}{sum}\n"))?;
    std::fs::rename(&tmp, path)
}

fn open_dir_fd(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

fn open_sub_dir(dir: &OwnedFd, name: &CStr) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Recreates the tree below `src` in the empty directory `dst`: directories, symlinks, devices
/// and fifos with their owner, mode, times and xattrs; regular files as hard links to the source
/// (copied when a link is impossible: another filesystem, the link limit). Never follows a
/// symlink: every step is an `*at` call on an opened directory with `O_NOFOLLOW`.
fn link_tree(src: &OwnedFd, dst: &OwnedFd, cancelled: &dyn Fn() -> bool) -> io::Result<()> {
    if cancelled() {
        return Err(io::Error::other("canceled"));
    }
    let mut names = vec![];
    for ent in Dir::read_from(src)? {
        let ent = ent?;
        let n = ent.file_name();
        if n != c"." && n != c".." {
            names.push(n.to_owned());
        }
    }
    for name in &names {
        let name = name.as_c_str();
        let st = statat(src, name, AtFlags::SYMLINK_NOFOLLOW)?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                mkdirat(dst, name, Mode::from_raw_mode(0o700))?;
                let (s, d) = (open_sub_dir(src, name)?, open_sub_dir(dst, name)?);
                link_tree(&s, &d, cancelled)?;
                copy_meta(src, name, dst, name, &st)?;
            }
            FileType::RegularFile if linkat(src, name, dst, name, AtFlags::empty()).is_err() => {
                copy_file(src, name, dst, name)?;
                copy_meta(src, name, dst, name, &st)?;
            }
            FileType::RegularFile => {}
            FileType::Symlink => {
                let target = readlinkat(src, name, vec![])?;
                symlinkat(target.as_c_str(), dst, name)?;
                copy_meta(src, name, dst, name, &st)?;
            }
            ft @ (FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo) => {
                mknodat(
                    dst,
                    name,
                    ft,
                    Mode::from_raw_mode(st.st_mode & 0o7777),
                    st.st_rdev,
                )?;
                copy_meta(src, name, dst, name, &st)?;
            }
            // The receiver never creates sockets.
            _ => {}
        }
    }
    Ok(())
}

fn copy_file(src: &OwnedFd, sname: &CStr, dst: &OwnedFd, dname: &CStr) -> io::Result<()> {
    let from = rustix::fs::openat(
        src,
        sname,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let to = rustix::fs::openat(
        dst,
        dname,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    io::copy(&mut std::fs::File::from(from), &mut std::fs::File::from(to))?;
    Ok(())
}

/// Owner, xattrs, permission bits (not for symlinks) and times of `sname` onto `dname`.
fn copy_meta(
    src: &OwnedFd,
    sname: &CStr,
    dst: &OwnedFd,
    dname: &CStr,
    st: &rustix::fs::Stat,
) -> io::Result<()> {
    let is_link = FileType::from_raw_mode(st.st_mode) == FileType::Symlink;
    chownat(
        dst,
        dname,
        Some(Uid::from_raw(st.st_uid)),
        Some(Gid::from_raw(st.st_gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    copy_xattrs(src, sname, dst, dname)?;
    if !is_link {
        chmodat(
            dst,
            dname,
            Mode::from_raw_mode(st.st_mode & 0o7777),
            AtFlags::empty(),
        )?;
    }
    let ts = |s, ns| Timespec {
        tv_sec: s,
        tv_nsec: ns as _,
    };
    utimensat(
        dst,
        dname,
        &Timestamps {
            last_access: ts(st.st_atime, st.st_atime_nsec),
            last_modification: ts(st.st_mtime, st.st_mtime_nsec),
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

fn proc_path(dir: &OwnedFd, name: &CStr) -> PathBuf {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    // `…/fd/N/.` for the directory itself: the l*xattr calls must not act on the magic link.
    PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()))
        .join(std::ffi::OsStr::from_bytes(name.to_bytes()))
}

fn copy_xattrs(src: &OwnedFd, sname: &CStr, dst: &OwnedFd, dname: &CStr) -> io::Result<()> {
    let (sp, dp) = (proc_path(src, sname), proc_path(dst, dname));
    let mut list = vec![0u8; 4096];
    let n = loop {
        match rustix::fs::llistxattr(&sp, &mut list) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) => list.resize(list.len() * 4, 0),
            Err(rustix::io::Errno::NOTSUP) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    };
    for key in list[..n].split(|b| *b == 0).filter(|k| !k.is_empty()) {
        let key = std::ffi::CString::new(key).map_err(io::Error::other)?;
        let mut val = vec![0u8; 4096];
        let len = loop {
            match rustix::fs::lgetxattr(&sp, key.as_c_str(), &mut val) {
                Ok(n) => break n,
                Err(rustix::io::Errno::RANGE) => val.resize(val.len() * 4, 0),
                Err(e) => return Err(e.into()),
            }
        };
        match rustix::fs::lsetxattr(
            &dp,
            key.as_c_str(),
            &val[..len],
            rustix::fs::XattrFlags::empty(),
        ) {
            Ok(()) | Err(rustix::io::Errno::NOTSUP) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
