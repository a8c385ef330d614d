//! Interim solver: runs `local://` sources and FileOps (mkdir, mkfile, rm, copy) inside the daemon.
//!
//! **The worker crate's LLB solver replaces this module.** It exists so the daemon's end-to-end
//! path (session, FileSync, FileOp, exporters, progress) works before the worker is wired in; it
//! runs ops one after the other, has no cache and copies whole trees between steps.
//!
//! Layout: local sources are received incrementally into `<root>/interim/local/<key>` (key =
//! sha256 of name, shared-key hint and the session's shared key), then copied into a new snapshot
//! of the layer store (record type `source.local`). FileOp actions run in work directories under
//! `<root>/tmp` and each op output becomes a committed snapshot. Every snapshot is added to the
//! job's lease. Paths from the definition are resolved inside their root with
//! `openat2(RESOLVE_IN_ROOT)`; nothing is written outside it.

use crate::definition::Loaded;
use crate::errors::{Error, Result};
use crate::session::calls::{sync_local, LocalSyncRequest};
use crate::solver::{Backend, FsRef, SolveCtx};
use fsutil::walk::{walk, MapResult, WalkOptions};
use layerstore::snapshot::{RecordType, SnapshotOptions};
use protos::pb::{self, file_action::Action, op::Op as OpKind};
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Per-daemon state of the interim solver.
#[derive(Default)]
pub struct InterimState {
    local_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Solves a loaded definition.
pub async fn solve(backend: &Arc<Backend>, def: Loaded, ctx: &SolveCtx) -> Result<FsRef> {
    let mut results: HashMap<String, Vec<FsRef>> = HashMap::new();
    for d in &def.order {
        let lop = &def.ops[d];
        let inputs: Vec<FsRef> = lop
            .op
            .inputs
            .iter()
            .map(|i| results[&i.digest][i.index as usize].clone())
            .collect();
        let start = SystemTime::now();
        let group = lop.meta.as_ref().and_then(|m| m.progress_group.clone());
        ctx.progress
            .vertex_started(d, &lop.name, &lop.inputs, group, start);
        let res = match &lop.op.op {
            Some(OpKind::Source(s)) => run_source(backend, d, s, ctx).await.map(|r| vec![r]),
            Some(OpKind::File(f)) => run_file(backend, f, inputs, ctx).await,
            Some(OpKind::Exec(_)) => Err(Error::unimplemented(
                "exec ops are not supported by berthd's interim solver",
            )),
            Some(OpKind::Merge(_)) | Some(OpKind::Diff(_)) => Err(Error::unimplemented(
                "merge/diff ops are not supported by berthd's interim solver",
            )),
            _ => Err(Error::unimplemented(
                "op not supported by berthd's interim solver",
            )),
        };
        match res {
            Ok(outs) => {
                ctx.progress
                    .vertex_completed(d, false, None, SystemTime::now());
                results.insert(d.clone(), outs);
            }
            Err(e) => {
                let msg = if ctx.cancel.is_cancelled() {
                    "context canceled".to_string()
                } else {
                    e.to_string()
                };
                ctx.progress
                    .vertex_completed(d, false, Some(msg), SystemTime::now());
                return Err(e.context(&lop.name));
            }
        }
    }
    let (d, i) = &def.result;
    Ok(results[d][*i as usize].clone())
}

fn json_list(attrs: &std::collections::BTreeMap<String, String>, key: &str) -> Result<Vec<String>> {
    match attrs.get(key) {
        None => Ok(vec![]),
        Some(v) if v.is_empty() => Ok(vec![]),
        Some(v) => serde_json::from_str(v)
            .map_err(|e| Error::invalid(format!("invalid {key} attribute {v:?}: {e}"))),
    }
}

async fn run_source(
    backend: &Arc<Backend>,
    vertex: &str,
    s: &pb::SourceOp,
    ctx: &SolveCtx,
) -> Result<FsRef> {
    let Some(name) = s.identifier.strip_prefix("local://") else {
        let scheme = s.identifier.split("://").next().unwrap_or_default();
        return Err(Error::unimplemented(format!(
            "{scheme} sources are not supported by berthd's interim solver"
        )));
    };
    let session_id = s
        .attrs
        .get("local.session")
        .cloned()
        .unwrap_or_else(|| ctx.session_id.clone());
    let session = backend.sessions.get(&session_id).await?;
    let req = LocalSyncRequest {
        name: name.to_string(),
        include_patterns: json_list(&s.attrs, "local.includepattern")?,
        exclude_patterns: json_list(&s.attrs, "local.excludepatterns")?,
        follow_paths: json_list(&s.attrs, "local.followpaths")?,
        differ_none: s.attrs.get("local.differ").is_some_and(|v| v == "none"),
    };
    use sha2::Digest;
    let key = hex::encode(sha2::Sha256::digest(format!(
        "{name}:{}:{}",
        s.attrs
            .get("local.sharedkeyhint")
            .cloned()
            .unwrap_or_default(),
        session.shared_key
    )));
    let dest = backend.root.join("interim").join("local").join(&key);
    let lock = backend
        .interim
        .local_locks
        .lock()
        .unwrap()
        .entry(key.clone())
        .or_default()
        .clone();
    let _guard = lock.lock().await;
    let status_id = format!("transferring {name}:");
    let started = SystemTime::now();
    let progress = {
        let p = ctx.progress.clone();
        let v = vertex.to_string();
        let id = status_id.clone();
        Arc::new(move |n: u64, last: bool| {
            p.status(
                &v,
                &id,
                "transferring",
                n as i64,
                0,
                Some(started),
                last.then(SystemTime::now),
            );
        }) as fsutil::receive::ProgressFn
    };
    let stats = sync_local(&session, &req, dest.clone(), Some(progress)).await?;
    tracing::debug!(
        name,
        files = stats.files_requested,
        bytes = stats.bytes_written,
        "local source received"
    );
    let opts = SnapshotOptions {
        description: format!("local source for {name}"),
        record_type: RecordType::LocalSource,
    };
    snapshot_from_dir(backend, dest, opts, ctx).await
}

/// Copies `dir` into a new committed snapshot leased by the job.
async fn snapshot_from_dir(
    backend: &Arc<Backend>,
    dir: PathBuf,
    opts: SnapshotOptions,
    ctx: &SolveCtx,
) -> Result<FsRef> {
    let store = backend.store.clone();
    let lease = ctx.lease.clone();
    tokio::task::spawn_blocking(move || -> Result<FsRef> {
        let id = store
            .prepare(None, &opts)
            .map_err(|e| Error::layerstore("prepare snapshot", e))?;
        let upper = store
            .upper_dir(&id)
            .map_err(|e| Error::layerstore("snapshot upper dir", e))?;
        copy_tree(&dir, &upper, &WalkOptions::default(), &Overrides::default())?;
        lease
            .add(&id)
            .map_err(|e| Error::layerstore("lease snapshot", e))?;
        store
            .commit(&id)
            .map_err(|e| Error::layerstore("commit snapshot", e))?;
        Ok(FsRef::Snapshot(id))
    })
    .await
    .map_err(|e| Error::internal(format!("snapshot task: {e}")))?
}

async fn run_file(
    backend: &Arc<Backend>,
    f: &pb::FileOp,
    inputs: Vec<FsRef>,
    ctx: &SolveCtx,
) -> Result<Vec<FsRef>> {
    // Materialize the op inputs as readable views.
    let mut views = Vec::new();
    for r in &inputs {
        views.push(backend.view(r).await?);
    }
    let input_paths: Vec<PathBuf> = views.iter().map(|v| v.path().to_path_buf()).collect();
    let tmp = backend.tmp_dir()?;
    let actions = f.actions.clone();
    let work = tempfile::Builder::new()
        .prefix("fileop-")
        .tempdir_in(&tmp)
        .map_err(|e| Error::internal(format!("create work dir: {e}")))?;
    let work_path = work.path().to_path_buf();
    let outputs = tokio::task::spawn_blocking(move || -> Result<Vec<(i64, PathBuf)>> {
        let n = input_paths.len() as i64;
        let mut action_dirs: Vec<PathBuf> = Vec::new();
        let empty = work_path.join("empty");
        std::fs::create_dir(&empty)
            .map_err(|e| Error::internal(format!("create {}: {e}", empty.display())))?;
        let pick = |idx: i64, action_dirs: &Vec<PathBuf>| -> PathBuf {
            if idx < 0 {
                empty.clone()
            } else if idx < n {
                input_paths[idx as usize].clone()
            } else {
                action_dirs[(idx - n) as usize].clone()
            }
        };
        let mut outs = Vec::new();
        for (k, a) in actions.iter().enumerate() {
            let dir = work_path.join(format!("a{k}"));
            std::fs::create_dir(&dir)
                .map_err(|e| Error::internal(format!("create {}: {e}", dir.display())))?;
            copy_tree(
                &pick(a.input, &action_dirs),
                &dir,
                &WalkOptions::default(),
                &Overrides::default(),
            )?;
            let secondary = pick(a.secondary_input, &action_dirs);
            apply_action(
                &dir,
                &secondary,
                a.secondary_input >= 0,
                a.action.as_ref().expect("validated"),
            )?;
            if a.output >= 0 {
                outs.push((a.output, dir.clone()));
            }
            action_dirs.push(dir);
        }
        outs.sort_by_key(|(o, _)| *o);
        Ok(outs)
    })
    .await
    .map_err(|e| Error::internal(format!("file op task: {e}")))??;
    let mut refs = Vec::new();
    for (_, dir) in outputs {
        refs.push(
            snapshot_from_dir(backend, dir, SnapshotOptions::new("file op result"), ctx).await?,
        );
    }
    drop(views);
    drop(work);
    Ok(refs)
}

#[derive(Default)]
struct Overrides {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    mtime_ns: Option<i64>,
}

fn owner_of(o: &Option<pb::ChownOpt>) -> Result<(Option<u32>, Option<u32>)> {
    let Some(o) = o else { return Ok((None, None)) };
    let one = |u: &Option<pb::UserOpt>| -> Result<Option<u32>> {
        match u.as_ref().and_then(|u| u.user.as_ref()) {
            None => Ok(None),
            Some(pb::user_opt::User::ById(id)) => Ok(Some(*id)),
            Some(pb::user_opt::User::ByName(n)) if n.name == "root" => Ok(Some(0)),
            Some(pb::user_opt::User::ByName(n)) => Err(Error::unimplemented(format!(
                "user name {:?} in chown is not supported by berthd's interim solver",
                n.name
            ))),
        }
    };
    let uid = one(&o.user)?;
    let gid = one(&o.group)?.or(uid);
    Ok((uid, gid))
}

fn ts_or_now(t: i64) -> i64 {
    if t < 0 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0)
    } else {
        t
    }
}

fn apply_action(root: &Path, secondary: &Path, has_secondary: bool, a: &Action) -> Result<()> {
    match a {
        Action::Mkdir(m) => {
            let (uid, gid) = owner_of(&m.owner)?;
            let rel = clean_rel(&m.path)?;
            if rel.is_empty() {
                return Ok(());
            }
            let t = ts_or_now(m.timestamp);
            let parts: Vec<&str> = rel.split('/').collect();
            for i in 0..parts.len() {
                let last = i + 1 == parts.len();
                let sub = parts[..=i].join("/");
                let (pfd, name) = open_parent(root, &sub)?;
                match rustix::fs::statat(&pfd, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(_) => {
                        if last {
                            return Ok(());
                        }
                        continue;
                    }
                    Err(rustix::io::Errno::NOENT) => {}
                    Err(e) => return Err(io_err("stat", &sub, e)),
                }
                if !last && !m.make_parents {
                    return Err(Error::not_found(format!(
                        "mkdir {}: parent directory does not exist",
                        m.path
                    )));
                }
                rustix::fs::mkdirat(
                    &pfd,
                    name.as_str(),
                    Mode::from_raw_mode(m.mode as u32 & 0o7777),
                )
                .map_err(|e| io_err("mkdir", &sub, e))?;
                set_meta(
                    &pfd,
                    &name,
                    Some(m.mode as u32 & 0o7777),
                    uid,
                    gid,
                    Some(t),
                    &sub,
                )?;
            }
            Ok(())
        }
        Action::Mkfile(m) => {
            let (uid, gid) = owner_of(&m.owner)?;
            let rel = clean_rel(&m.path)?;
            if rel.is_empty() {
                return Err(Error::invalid("mkfile: path is the root directory"));
            }
            let (pfd, name) = open_parent(root, &rel)?;
            let fd = rustix::fs::openat(
                &pfd,
                name.as_str(),
                OFlags::CREATE
                    | OFlags::TRUNC
                    | OFlags::WRONLY
                    | OFlags::NOFOLLOW
                    | OFlags::CLOEXEC,
                Mode::from_raw_mode(m.mode as u32 & 0o7777),
            )
            .map_err(|e| io_err("mkfile", &rel, e))?;
            let mut f = std::fs::File::from(fd);
            use std::io::Write;
            f.write_all(&m.data)
                .map_err(|e| Error::internal(format!("write {rel}: {e}")))?;
            drop(f);
            set_meta(
                &pfd,
                &name,
                Some(m.mode as u32 & 0o7777),
                uid,
                gid,
                Some(ts_or_now(m.timestamp)),
                &rel,
            )
        }
        Action::Rm(r) => {
            let rel = clean_rel(&r.path)?;
            let targets = if r.allow_wildcard {
                glob_in(root, &rel)?
            } else {
                vec![rel.clone()]
            };
            if targets.is_empty() && !r.allow_not_found {
                return Err(Error::not_found(format!(
                    "rm {}: no such file or directory",
                    r.path
                )));
            }
            for t in targets {
                if t.is_empty() {
                    return Err(Error::invalid("rm: refusing to remove the root directory"));
                }
                let (pfd, name) = open_parent(root, &t)?;
                match rustix::fs::statat(&pfd, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
                    Err(rustix::io::Errno::NOENT) if r.allow_not_found => continue,
                    Err(rustix::io::Errno::NOENT) => {
                        return Err(Error::not_found(format!(
                            "rm {}: no such file or directory",
                            r.path
                        )))
                    }
                    Err(e) => return Err(io_err("stat", &t, e)),
                    Ok(st) => {
                        if rustix::fs::FileType::from_raw_mode(st.st_mode)
                            == rustix::fs::FileType::Directory
                        {
                            std::fs::remove_dir_all(proc_path(&pfd, &name))
                                .map_err(|e| Error::internal(format!("rm {t}: {e}")))?;
                        } else {
                            rustix::fs::unlinkat(&pfd, name.as_str(), AtFlags::empty())
                                .map_err(|e| io_err("rm", &t, e))?;
                        }
                    }
                }
            }
            Ok(())
        }
        Action::Copy(c) => {
            if !has_secondary {
                return Err(Error::invalid(format!("copy {}: no source input", c.src)));
            }
            copy_action(root, secondary, c)
        }
        Action::Symlink(_) => Err(Error::unimplemented(
            "symlink file action is not supported by berthd's interim solver",
        )),
    }
}

fn copy_action(dest_root: &Path, src_root: &Path, c: &pb::FileActionCopy) -> Result<()> {
    let (uid, gid) = owner_of(&c.owner)?;
    let ov = Overrides {
        mode: (c.mode >= 0).then_some(c.mode as u32 & 0o7777),
        uid,
        gid,
        mtime_ns: (c.timestamp >= 0).then_some(c.timestamp),
    };
    let src_rel = clean_rel(&c.src)?;
    let sources = if c.allow_wildcard && src_rel.contains(['*', '?', '[']) {
        let m = glob_in(src_root, &src_rel)?;
        if m.is_empty() && !c.allow_empty_wildcard {
            return Err(Error::not_found(format!(
                "copy {}: no source files were specified",
                c.src
            )));
        }
        m
    } else {
        vec![src_rel]
    };
    let dest_into_dir = c.dest.ends_with('/') || c.dest.ends_with("/.");
    let dest_rel = clean_rel(&c.dest)?;
    for s in sources {
        // resolve the source (inside its root)
        let src_full = resolved_path(src_root, &s, c.follow_symlink)?;
        let md = std::fs::symlink_metadata(&src_full)
            .map_err(|_| Error::not_found(format!("copy {}: {} not found", c.src, s)))?;
        let base = s.rsplit('/').next().unwrap_or("").to_string();
        // destination existence
        let dest_exists_dir = !dest_rel.is_empty() && {
            let (pfd, name) = open_parent(dest_root, &dest_rel).ok().unzip();
            match (pfd, name) {
                (Some(pfd), Some(name)) => {
                    rustix::fs::statat(&pfd, name.as_str(), AtFlags::empty())
                        .map(|st| {
                            rustix::fs::FileType::from_raw_mode(st.st_mode)
                                == rustix::fs::FileType::Directory
                        })
                        .unwrap_or(false)
                }
                _ => false,
            }
        } || dest_rel.is_empty();
        let target_rel = if md.is_dir() {
            if !c.dir_copy_contents && dest_exists_dir && !base.is_empty() {
                join_rel(&dest_rel, &base)
            } else {
                dest_rel.clone()
            }
        } else if dest_into_dir || dest_exists_dir {
            join_rel(&dest_rel, &base)
        } else {
            dest_rel.clone()
        };
        // parent of target
        if let Some((parent, _)) = target_rel.rsplit_once('/') {
            ensure_dir(dest_root, parent, c.create_dest_path || dest_into_dir)?;
        }
        if md.is_dir() {
            if !target_rel.is_empty() {
                ensure_dir(dest_root, &target_rel, true)?;
            }
            let (target_full, _keep) = dir_path(dest_root, &target_rel)?;
            let opts = WalkOptions {
                include_patterns: c.include_patterns.clone(),
                exclude_patterns: c.exclude_patterns.clone(),
                follow_paths: vec![],
            };
            copy_tree(&src_full, &target_full, &opts, &ov)?;
            if let Some(m) = ov.mode {
                std::fs::set_permissions(
                    &target_full,
                    std::os::unix::fs::PermissionsExt::from_mode(m),
                )
                .map_err(|e| Error::internal(format!("chmod {target_rel}: {e}")))?;
            }
        } else {
            if target_rel.is_empty() {
                return Err(Error::invalid(format!(
                    "copy {}: cannot replace the root directory with a file",
                    c.src
                )));
            }
            let (pfd, name) = open_parent(dest_root, &target_rel)?;
            if let Ok(st) = rustix::fs::statat(&pfd, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
                if rustix::fs::FileType::from_raw_mode(st.st_mode)
                    == rustix::fs::FileType::Directory
                {
                    return Err(Error::invalid(format!(
                        "copy {}: cannot overwrite directory {target_rel} with a file",
                        c.src
                    )));
                }
                rustix::fs::unlinkat(&pfd, name.as_str(), AtFlags::empty())
                    .map_err(|e| io_err("unlink", &target_rel, e))?;
            }
            copy_entry(&src_full, &md, &pfd, &name, &target_rel)?;
            let mode = ov.mode.or((!md.file_type().is_symlink())
                .then(|| std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o7777));
            let (u, g) = (
                ov.uid.or(Some(std::os::unix::fs::MetadataExt::uid(&md))),
                ov.gid.or(Some(std::os::unix::fs::MetadataExt::gid(&md))),
            );
            let mtime = ov.mtime_ns.unwrap_or_else(|| {
                std::os::unix::fs::MetadataExt::mtime(&md) * 1_000_000_000
                    + std::os::unix::fs::MetadataExt::mtime_nsec(&md)
            });
            let mode = if md.file_type().is_symlink() {
                None
            } else {
                mode
            };
            set_meta(&pfd, &name, mode, u, g, Some(mtime), &target_rel)?;
        }
    }
    Ok(())
}

fn join_rel(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_string()
    } else {
        format!("{a}/{b}")
    }
}

/// Cleans an absolute-in-root path into a relative one (`""` = the root); `..` cannot escape.
fn clean_rel(p: &str) -> Result<String> {
    if p.contains('\0') {
        return Err(Error::invalid(format!("path {p:?} contains NUL")));
    }
    let c = fsutil::patterns::go_clean(&format!("/{p}"));
    Ok(c.trim_start_matches('/').to_string())
}

fn io_err(op: &str, path: &str, e: rustix::io::Errno) -> Error {
    match e {
        rustix::io::Errno::NOENT => {
            Error::not_found(format!("{op} {path}: no such file or directory"))
        }
        rustix::io::Errno::NOTDIR => Error::invalid(format!("{op} {path}: not a directory")),
        rustix::io::Errno::EXIST => Error::invalid(format!("{op} {path}: file exists")),
        e => Error::internal(format!("{op} {path}: {e}")),
    }
}

fn open_root_dir(root: &Path, rel: &str) -> Result<OwnedFd> {
    let rfd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::internal(format!("open {}: {e}", root.display())))?;
    let rel = if rel.is_empty() { "." } else { rel };
    rustix::fs::openat2(
        &rfd,
        rel,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| io_err("open", rel, e))
}

fn open_parent(root: &Path, rel: &str) -> Result<(OwnedFd, String)> {
    let (dir, name) = match rel.rsplit_once('/') {
        Some((d, n)) => (d, n),
        None => ("", rel),
    };
    Ok((open_root_dir(root, dir)?, name.to_string()))
}

fn proc_path(fd: &OwnedFd, name: &str) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}/{}", fd.as_raw_fd(), name))
}

/// A path to a directory resolved inside the root (through `/proc/self/fd`), valid while the fd lives.
fn dir_path(root: &Path, rel: &str) -> Result<(PathBuf, OwnedFd)> {
    use std::os::fd::AsRawFd;
    let fd = open_root_dir(root, rel)?;
    Ok((
        PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
        fd,
    ))
}

/// Resolves `rel` inside `root` to a real path (following the final symlink only if asked).
fn resolved_path(root: &Path, rel: &str, follow: bool) -> Result<PathBuf> {
    let (pfd, name) = open_parent(root, rel)?;
    if name.is_empty() {
        return std::fs::canonicalize(root)
            .map_err(|e| Error::internal(format!("resolve {}: {e}", root.display())));
    }
    if follow {
        let fd = rustix::fs::openat2(
            &pfd,
            name.as_str(),
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| io_err("open", rel, e))?;
        use std::os::fd::AsRawFd;
        let p = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|e| Error::internal(format!("resolve {rel}: {e}")))?;
        Ok(p)
    } else {
        let parent =
            std::fs::read_link(proc_path(&pfd, "").to_string_lossy().trim_end_matches('/'))
                .map_err(|e| Error::internal(format!("resolve {rel}: {e}")))?;
        Ok(parent.join(name))
    }
}

fn ensure_dir(root: &Path, rel: &str, create: bool) -> Result<()> {
    let mut cur = String::new();
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        cur = join_rel(&cur, part);
        let (pfd, name) = open_parent(root, &cur)?;
        match rustix::fs::statat(&pfd, name.as_str(), AtFlags::empty()) {
            Ok(st)
                if rustix::fs::FileType::from_raw_mode(st.st_mode)
                    == rustix::fs::FileType::Directory => {}
            Ok(_) => return Err(Error::invalid(format!("{cur} is not a directory"))),
            Err(rustix::io::Errno::NOENT) if create => {
                rustix::fs::mkdirat(&pfd, name.as_str(), Mode::from_raw_mode(0o755))
                    .map_err(|e| io_err("mkdir", &cur, e))?;
            }
            Err(e) => return Err(io_err("stat", &cur, e)),
        }
    }
    Ok(())
}

fn glob_in(root: &Path, rel: &str) -> Result<Vec<String>> {
    let (dir, pat) = match rel.rsplit_once('/') {
        Some((d, p)) => (d.to_string(), p.to_string()),
        None => (String::new(), rel.to_string()),
    };
    let m = fsutil::patterns::PatternMatcher::new(&[pat.as_str()])
        .map_err(|e| Error::invalid(e.to_string()))?;
    let (dpath, _fd) = match dir_path(root, &dir) {
        Ok(x) => x,
        Err(Error::NotFound { .. }) => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for ent in
        std::fs::read_dir(&dpath).map_err(|e| Error::internal(format!("readdir {dir}: {e}")))?
    {
        let ent = ent.map_err(|e| Error::internal(format!("readdir {dir}: {e}")))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if m.matches_or_parent_matches(&name).unwrap_or(false) {
            out.push(join_rel(&dir, &name));
        }
    }
    out.sort();
    Ok(out)
}

fn copy_entry(
    src: &Path,
    md: &std::fs::Metadata,
    pfd: &OwnedFd,
    name: &str,
    shown: &str,
) -> Result<()> {
    let ft = md.file_type();
    if ft.is_symlink() {
        let target = std::fs::read_link(src)
            .map_err(|e| Error::internal(format!("readlink {}: {e}", src.display())))?;
        rustix::fs::symlinkat(target.as_os_str(), pfd, name)
            .map_err(|e| io_err("symlink", shown, e))
    } else if ft.is_file() {
        let fd = rustix::fs::openat(
            pfd,
            name,
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| io_err("create", shown, e))?;
        let mut out = std::fs::File::from(fd);
        let mut inp = std::fs::File::open(src)
            .map_err(|e| Error::internal(format!("open {}: {e}", src.display())))?;
        std::io::copy(&mut inp, &mut out)
            .map_err(|e| Error::internal(format!("copy {shown}: {e}")))?;
        Ok(())
    } else if ft.is_dir() {
        rustix::fs::mkdirat(pfd, name, Mode::from_raw_mode(0o755))
            .map_err(|e| io_err("mkdir", shown, e))
    } else {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let kind = if ft.is_fifo() {
            rustix::fs::FileType::Fifo
        } else if ft.is_char_device() {
            rustix::fs::FileType::CharacterDevice
        } else if ft.is_block_device() {
            rustix::fs::FileType::BlockDevice
        } else {
            return Ok(());
        };
        rustix::fs::mknodat(pfd, name, kind, Mode::from_raw_mode(0o600), md.rdev())
            .map_err(|e| io_err("mknod", shown, e))
    }
}

fn set_meta(
    pfd: &OwnedFd,
    name: &str,
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    mtime_ns: Option<i64>,
    shown: &str,
) -> Result<()> {
    if uid.is_some() || gid.is_some() {
        rustix::fs::chownat(
            pfd,
            name,
            uid.map(rustix::fs::Uid::from_raw),
            gid.map(rustix::fs::Gid::from_raw),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io_err("chown", shown, e))?;
    }
    if let Some(m) = mode {
        rustix::fs::chmodat(pfd, name, Mode::from_raw_mode(m), AtFlags::empty())
            .map_err(|e| io_err("chmod", shown, e))?;
    }
    if let Some(t) = mtime_ns {
        let ts = Timespec {
            tv_sec: t.div_euclid(1_000_000_000),
            tv_nsec: t.rem_euclid(1_000_000_000) as _,
        };
        rustix::fs::utimensat(
            pfd,
            name,
            &Timestamps {
                last_access: ts,
                last_modification: ts,
            },
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io_err("utimes", shown, e))?;
    }
    Ok(())
}

/// Copies the contents of `src` into the existing directory `dst` (metadata and hardlinks kept,
/// overrides applied to every copied entry).
fn copy_tree(src: &Path, dst: &Path, opts: &WalkOptions, ov: &Overrides) -> Result<()> {
    let mut stats = Vec::new();
    walk(src, opts, &mut |_| MapResult::Keep, &mut |st| {
        stats.push(st);
        Ok(())
    })
    .map_err(|e| Error::fsutil(format!("walk {}", src.display()), e))?;
    let mut dirs = Vec::new();
    for st in &stats {
        let (pfd, name) = open_parent(dst, &st.path)?;
        if st.is_hardlink() {
            let (ofd, oname) = open_parent(dst, &st.linkname)?;
            rustix::fs::linkat(&ofd, oname.as_str(), &pfd, name.as_str(), AtFlags::empty())
                .map_err(|e| io_err("link", &st.path, e))?;
            continue;
        }
        let full = src.join(&st.path);
        let md = std::fs::symlink_metadata(&full)
            .map_err(|e| Error::internal(format!("lstat {}: {e}", full.display())))?;
        match rustix::fs::statat(&pfd, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(ex)
                if md.is_dir()
                    && rustix::fs::FileType::from_raw_mode(ex.st_mode)
                        == rustix::fs::FileType::Directory => {}
            Ok(ex) => {
                if rustix::fs::FileType::from_raw_mode(ex.st_mode)
                    == rustix::fs::FileType::Directory
                {
                    std::fs::remove_dir_all(proc_path(&pfd, &name))
                        .map_err(|e| Error::internal(format!("replace {}: {e}", st.path)))?;
                } else {
                    rustix::fs::unlinkat(&pfd, name.as_str(), AtFlags::empty())
                        .map_err(|e| io_err("unlink", &st.path, e))?;
                }
                copy_entry(&full, &md, &pfd, &name, &st.path)?;
            }
            Err(_) => copy_entry(&full, &md, &pfd, &name, &st.path)?,
        }
        let is_link = md.file_type().is_symlink();
        let mode = if is_link {
            None
        } else {
            Some(
                ov.mode
                    .unwrap_or(fsutil::filemode::posix_perm_from_go_mode(st.mode)),
            )
        };
        let mtime = ov.mtime_ns.unwrap_or(st.mod_time);
        set_meta(
            &pfd,
            &name,
            mode,
            Some(ov.uid.unwrap_or(st.uid)),
            Some(ov.gid.unwrap_or(st.gid)),
            if md.is_dir() { None } else { Some(mtime) },
            &st.path,
        )?;
        if md.is_dir() {
            dirs.push((st.path.clone(), mtime));
        }
    }
    for (p, t) in dirs.iter().rev() {
        let (pfd, name) = open_parent(dst, p)?;
        set_meta(&pfd, &name, None, None, None, Some(*t), p)?;
    }
    Ok(())
}
