//! FileOp: runs a chain of file actions on snapshots (`solver/llbsolver/ops/file.go`).
//!
//! Index space of an action's `input`/`secondaryInput`/owner input: `-1` scratch, `< n` op
//! inputs, `n + k` the result of action `k`. Each action writes into a mutable snapshot
//! (layerstore `prepare` + read-write overlay mount) on top of its input. An action result
//! that is consumed exactly once, as the primary input of a later action, is mutated in place;
//! any other result (an output, a copy source, a name-lookup state, or used several times) is
//! committed as its own snapshot first. Failed or canceled runs remove their uncommitted
//! mutable snapshots.
//!
//! Cache key: the op without input digests, plus per input either its cache key or — for an
//! input used only as a copy source — the content checksums of the copied paths (BuildKit's
//! content-based selectors), so unrelated changes elsewhere in the source do not invalidate.
//! A copy's include/exclude patterns apply to its checksum as to the copy: a file they leave
//! out does not change the key.

use std::cell::RefCell;
use std::sync::Arc;

use async_trait::async_trait;
use layerstore::snapshot::{Chain, Mount, SnapshotId, SnapshotOptions, SnapshotStore};
use protos::pb;
use protos::pb::file_action::Action;

use crate::error::{Error, Result};
use crate::file::root::Root;
use crate::file::user::{self, Owner, Who};
use crate::file::{self as fileops, checksum, glob, Attrs};
use crate::llbsolver::cache::blocking;
use crate::llbsolver::definition::LoadedOp;
use crate::ops::{base_key, BuildEnv, ChecksumKey, ChecksumMemo};
use crate::result::Snap;
use crate::solver::{Op, OpContext, Solved};

struct FileOpImpl {
    op: pb::Op,
    file: pb::FileOp,
    name: String,
    store: SnapshotStore,
    shared: Arc<crate::ops::Shared>,
    /// Per input: stock's content record of what the op copies from it (`bkkeys`), set by
    /// [`Op::cache_key`] when berth can compute it.
    stock_content: std::sync::Mutex<Vec<Option<String>>>,
    /// Whether to compute `stock_content` (the build imports or exports a cache:
    /// [`BuildEnv::stock_keys`]).
    stock_keys: bool,
}

/// The solver op for `op`.
pub(crate) fn new(op: &LoadedOp, env: &Arc<BuildEnv>) -> Result<Arc<dyn Op<Snap>>> {
    let Some(pb::op::Op::File(file)) = &op.op.op else {
        return Err(Error::Internal("file::new on a non-file op".into()));
    };
    Ok(Arc::new(FileOpImpl {
        op: op.op.clone(),
        file: file.clone(),
        name: op.name.clone(),
        store: env.store.clone(),
        shared: env.shared.clone(),
        stock_content: std::sync::Mutex::new(vec![None; op.op.inputs.len()]),
        stock_keys: env.stock_keys,
    }))
}

/// Inputs (op-input indices) used only as copy sources, with the copy actions reading them.
fn copy_only_inputs(file: &pb::FileOp, n_in: usize) -> Vec<Option<Vec<usize>>> {
    let mut out: Vec<Option<Vec<usize>>> = vec![Some(vec![]); n_in];
    let taint = |i: i64, out: &mut Vec<Option<Vec<usize>>>| {
        if i >= 0 && (i as usize) < n_in {
            out[i as usize] = None;
        }
    };
    for (k, a) in file.actions.iter().enumerate() {
        taint(a.input, &mut out);
        let mut owner_inputs = vec![];
        let owner = match &a.action {
            Some(Action::Copy(c)) => c.owner.as_ref(),
            Some(Action::Mkdir(m)) => m.owner.as_ref(),
            Some(Action::Mkfile(m)) => m.owner.as_ref(),
            Some(Action::Symlink(s)) => s.owner.as_ref(),
            _ => None,
        };
        if let Some(o) = owner {
            let o = Owner::from_pb(o);
            for w in [o.user, o.group].into_iter().flatten() {
                if let Who::Name(_, i) = w {
                    owner_inputs.push(i);
                }
            }
        }
        for i in owner_inputs {
            taint(i, &mut out);
        }
        if let Some(Action::Copy(_)) = &a.action {
            let s = a.secondary_input;
            if s >= 0 && (s as usize) < n_in {
                if let Some(v) = &mut out[s as usize] {
                    v.push(k);
                }
            }
        }
    }
    out.into_iter()
        .map(|o| o.filter(|v| !v.is_empty()))
        .collect()
}

#[async_trait]
impl Op<Snap> for FileOpImpl {
    async fn cache_key(&self, _ctx: &OpContext, inputs: &[Solved<Snap>]) -> Result<String> {
        let copy_only = copy_only_inputs(&self.file, inputs.len());
        let mut h = crate::digest::KeyHasher::new("berth.fileop.v1");
        h.field(&base_key(&self.op));
        for (i, inp) in inputs.iter().enumerate() {
            match &copy_only[i] {
                None => {
                    h.field(b"key").field(inp.key.as_bytes());
                }
                Some(actions) => {
                    let store = self.store.clone();
                    let snap = inp.result.clone();
                    let copies: Vec<pb::FileActionCopy> = actions
                        .iter()
                        .filter_map(|k| match &self.file.actions[*k].action {
                            Some(Action::Copy(c)) => Some(c.clone()),
                            _ => None,
                        })
                        .collect();
                    if self.stock_keys {
                        let stock = {
                            let (store, snap, copies) =
                                (store.clone(), snap.clone(), copies.clone());
                            blocking(move || Ok(stock_content(&store, &snap, &copies))).await?
                        };
                        if let Some(slot) = self.stock_content.lock().unwrap().get_mut(i) {
                            *slot = stock;
                        }
                    }
                    let sums = match memoized_sums(&self.shared.checksums, snap.id(), &copies) {
                        Some(sums) => sums,
                        None => {
                            let shared = self.shared.clone();
                            blocking(move || copy_sums(&store, &snap, &copies, &shared.checksums))
                                .await?
                        }
                    };
                    h.field(b"content");
                    for s in sums {
                        h.field(s.as_bytes());
                    }
                }
            }
        }
        Ok(h.finish())
    }

    fn key_from_input_keys(&self, input_keys: &[&str]) -> Option<String> {
        // Copy-only inputs are keyed by the content copied: that needs their results.
        if copy_only_inputs(&self.file, input_keys.len())
            .iter()
            .any(Option::is_some)
        {
            return None;
        }
        let mut h = crate::digest::KeyHasher::new("berth.fileop.v1");
        h.field(&base_key(&self.op));
        for k in input_keys {
            h.field(b"key").field(k.as_bytes());
        }
        Some(h.finish())
    }

    fn alias_key(&self, input_keys: &[&str]) -> Option<String> {
        // The definition and every input's key, copy sources included (their content is what
        // those keys produced).
        Some(crate::ops::standard_key_from(
            "berth.fileop.alias.v1",
            &self.op,
            input_keys,
        ))
    }

    fn stock_map(&self) -> Option<crate::bkkeys::StockMap> {
        let n = self.op.inputs.len();
        Some(crate::bkkeys::StockMap {
            digest: crate::bkkeys::file_cache_map(&self.file, n)?,
            selectors: crate::bkkeys::file_selectors(&self.file, n),
            content: self.stock_content.lock().unwrap().clone(),
        })
    }

    async fn exec(&self, ctx: &OpContext, inputs: &[Solved<Snap>]) -> Result<Vec<Snap>> {
        let store = self.store.clone();
        let file = self.file.clone();
        let name = self.name.clone();
        let snaps: Vec<Snap> = inputs.iter().map(|i| i.result.clone()).collect();
        let cancel = ctx.cancel.clone();
        blocking(move || run(&store, &file, &name, &snaps, &|| cancel.is_cancelled())).await
    }
}

/// The paths a copy checksums when they are known without looking into the source (no
/// wildcard to expand).
fn literal_paths(c: &pb::FileActionCopy) -> Option<Vec<String>> {
    if !c.allow_wildcard {
        return Some(vec![c.src.clone()]);
    }
    glob::literal_path(&c.src).map(|p| vec![p])
}

fn checksum_key(snap: &SnapshotId, c: &pb::FileActionCopy, path: &str) -> ChecksumKey {
    ChecksumKey {
        snapshot: snap.clone(),
        path: crate::file::root::clean_abs(path),
        follow: c.follow_symlink,
        include: c.include_patterns.clone(),
        exclude: c.exclude_patterns.clone(),
    }
}

/// The copies' `path\0checksum` list from checksums already known, or `None` when one is not.
fn memoized_sums(
    memo: &ChecksumMemo,
    snap: &SnapshotId,
    copies: &[pb::FileActionCopy],
) -> Option<Vec<String>> {
    let mut sums = vec![];
    for c in copies {
        for p in literal_paths(c)? {
            let sum = memo.get(&checksum_key(snap, c, &p))?;
            sums.push(format!("{p}\0{sum}"));
        }
    }
    Some(sums)
}

/// The copies' `path\0checksum` list, computed on a mount of `snap`; every checksum is
/// recorded in `memo`.
fn copy_sums(
    store: &SnapshotStore,
    snap: &Snap,
    copies: &[pb::FileActionCopy],
    memo: &ChecksumMemo,
) -> Result<Vec<String>> {
    let _span = tracing::debug_span!("file.checksum", copies = copies.len()).entered();
    let m = store
        .mount(snap.id(), None)
        .map_err(Error::store("mount copy source"))?;
    let root = Root::open(m.path()).map_err(|e| Error::io("open", m.path(), e))?;
    let mut sums = vec![];
    for c in copies {
        let matcher = |pats: &[String]| {
            if pats.is_empty() {
                return Ok(None);
            }
            fsutil::patterns::PatternMatcher::new(pats)
                .map(Some)
                .map_err(|e| Error::FileAction {
                    action: "copy",
                    path: c.src.clone(),
                    reason: format!("invalid patterns: {e}"),
                })
        };
        let filter = checksum::Filter {
            include: matcher(&c.include_patterns)?,
            exclude: matcher(&c.exclude_patterns)?,
        };
        let paths = if c.allow_wildcard {
            glob::resolve_wildcards(&root, &c.src, c.follow_symlink)
                .map_err(|e| Error::io("resolve wildcards", m.path(), e))?
        } else {
            vec![c.src.clone()]
        };
        for p in paths {
            let sum = checksum::checksum_filtered(&root, &p, c.follow_symlink, &filter)
                .map_err(|e| Error::io("checksum", m.path(), e))?;
            memo.insert(checksum_key(snap.id(), c, &p), sum.clone());
            sums.push(format!("{p}\0{sum}"));
        }
    }
    Ok(sums)
}

/// Stock's content record ([`crate::bkkeys::content_key`]) of a copy-only input: the
/// checksums of stock's selectors of the copies ([`crate::bkkeys::copy_selectors`]), each a
/// literal path (a file, a directory with everything below it) or a wildcard in the last
/// component. `None` when berth does not reproduce stock's checksum (include/exclude patterns,
/// a symlink on the way or among the matches, a wildcard before the last component, a socket)
/// or the source cannot be read.
fn stock_content(
    store: &SnapshotStore,
    snap: &Snap,
    copies: &[pb::FileActionCopy],
) -> Option<String> {
    let sels = crate::bkkeys::copy_selectors(copies)?;
    let m = store.mount(snap.id(), None).ok()?;
    let mut sums = Vec::with_capacity(sels.len());
    for (path, wildcard) in sels {
        let sum = if wildcard {
            stock_wildcard_checksum(m.path(), &path)?
        } else {
            let p = stock_literal_path(m.path(), &path)?;
            let md = std::fs::symlink_metadata(&p).ok()?;
            if md.file_type().is_symlink() {
                return None;
            }
            stock_entry_checksum(&p, &md)?
        };
        sums.push(sum);
    }
    Some(crate::bkkeys::content_key(&sums))
}

/// `path` (absolute in the source) under `root`, when no component on the way is a symlink
/// (the last one is not checked) and none is `..`.
fn stock_literal_path(root: &std::path::Path, path: &str) -> Option<std::path::PathBuf> {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    if parts.contains(&"..") {
        return None;
    }
    let mut p = root.to_path_buf();
    for (i, part) in parts.iter().enumerate() {
        p.push(part);
        if i + 1 < parts.len() && !std::fs::symlink_metadata(&p).ok()?.file_type().is_dir() {
            return None;
        }
    }
    Some(p)
}

/// Stock's checksum of a wildcard selector whose wildcard is in its last component: the
/// matches in the (literal) parent directory, in name order, as
/// [`crate::bkkeys::wildcard_checksum`] lists them.
fn stock_wildcard_checksum(root: &std::path::Path, path: &str) -> Option<String> {
    use std::os::unix::ffi::OsStrExt as _;
    let (prefix, pattern) = glob::split_wildcards(path);
    let pattern = pattern?;
    if pattern.contains('/') {
        return None;
    }
    let dir = stock_literal_path(root, &prefix)?;
    let md = std::fs::symlink_metadata(&dir).ok()?;
    let mut included = vec![];
    if md.file_type().is_dir() {
        for (name, p) in sorted_entries(&dir)? {
            let name_str = std::str::from_utf8(name.as_bytes()).ok()?;
            if !glob::glob_match(&pattern, name_str).ok()? {
                continue;
            }
            let rel = format!("{}/{name_str}", prefix.trim_end_matches('/'));
            stock_include(&p, &rel, &mut included)?;
        }
    }
    Some(crate::bkkeys::wildcard_checksum(
        &format!("{}/{pattern}", prefix.trim_end_matches('/')),
        &included,
    ))
}

/// Adds what a wildcard match at `p` (`rel` in the source) includes: a file with its checksum,
/// a directory's header and then everything below it. `None` for a symlink (stock follows
/// those; not reproduced).
fn stock_include(
    p: &std::path::Path,
    rel: &str,
    included: &mut Vec<(String, String)>,
) -> Option<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let md = std::fs::symlink_metadata(p).ok()?;
    let ft = md.file_type();
    if ft.is_symlink() {
        return None;
    }
    if ft.is_dir() {
        let header = crate::bkkeys::file_content_checksum(&stock_stat(p, &md)?, &[]);
        included.push((rel.to_string(), header));
        for (name, cp) in sorted_entries(p)? {
            let name = std::str::from_utf8(name.as_bytes()).ok()?;
            stock_include(&cp, &format!("{rel}/{name}"), included)?;
        }
    } else {
        included.push((rel.to_string(), stock_entry_checksum(p, &md)?));
    }
    Some(())
}

/// The entries of directory `dir` sorted by the bytes of their names.
fn sorted_entries(dir: &std::path::Path) -> Option<Vec<(std::ffi::OsString, std::path::PathBuf)>> {
    use std::os::unix::ffi::OsStrExt as _;
    let mut v = vec![];
    for e in std::fs::read_dir(dir).ok()? {
        let e = e.ok()?;
        v.push((e.file_name(), e.path()));
    }
    v.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Some(v)
}

/// Stock's checksum of the entry at `p` (not following it): a regular file's header and data,
/// a directory's [`crate::bkkeys::dir_content_checksum`], the header alone for a symlink, a
/// device or a fifo. `None` for a socket or when something cannot be read.
fn stock_entry_checksum(p: &std::path::Path, md: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::fs::FileTypeExt as _;
    let ft = md.file_type();
    let st = stock_stat(p, md)?;
    if ft.is_dir() {
        let header = crate::bkkeys::file_content_checksum(&st, &[]);
        let mut entries = vec![];
        for (name, cp) in sorted_entries(p)? {
            let cmd = std::fs::symlink_metadata(&cp).ok()?;
            entries.push((name.as_bytes().to_vec(), stock_entry_checksum(&cp, &cmd)?));
        }
        Some(crate::bkkeys::dir_content_checksum(&header, &entries))
    } else if ft.is_file() {
        let mut f = std::fs::File::open(p).ok()?;
        crate::bkkeys::file_content_checksum_from(&st, &mut f).ok()
    } else if ft.is_socket() {
        None
    } else {
        Some(crate::bkkeys::file_content_checksum(&st, &[]))
    }
}

/// What stock's content checksum of the entry at `p` covers besides its data.
fn stock_stat(p: &std::path::Path, md: &std::fs::Metadata) -> Option<crate::bkkeys::EntryStat> {
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::fs::MetadataExt as _;
    let mut xattrs = vec![];
    let mut names = vec![0u8; 64 * 1024];
    let n = rustix::fs::llistxattr(p, &mut names[..]).ok()?;
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cname = std::ffi::CString::new(name).ok()?;
        let mut val = vec![0u8; 64 * 1024];
        let vn = rustix::fs::lgetxattr(p, cname.as_c_str(), &mut val[..]).ok()?;
        val.truncate(vn);
        xattrs.push((String::from_utf8(name.to_vec()).ok()?, val));
    }
    let linkname = if md.file_type().is_symlink() {
        std::str::from_utf8(std::fs::read_link(p).ok()?.as_os_str().as_bytes())
            .ok()?
            .to_string()
    } else {
        String::new()
    };
    let (devmajor, devminor) = if md.file_type().is_dir() {
        (0, 0)
    } else {
        let rdev = md.rdev();
        (u64::from(libc::major(rdev)), u64::from(libc::minor(rdev)))
    };
    Some(crate::bkkeys::EntryStat {
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        size: md.len(),
        linkname,
        devmajor,
        devminor,
        xattrs,
    })
}

/// An uncommitted mutable snapshot; removed on drop unless committed.
///
/// On scratch (no parent) the actions write straight into the snapshot's upper dir instead of
/// through an overlay mount of it: with no lower layer the two views are the same tree (nothing
/// to copy up, hide or merge), and every create through overlayfs costs several times the
/// system time of a plain ext4 create (measured with `cp -a` of a 20 000-file tree: 2.0–2.2 s
/// system time into a plain directory, 5.6–17 s into an overlay upper on an empty lower).
/// containerd's overlay snapshotter does the same for a parentless snapshot (a bind mount of
/// its upper dir), which is what stock buildkitd's FileOp writes into.
struct Mutable {
    store: SnapshotStore,
    id: Option<SnapshotId>,
    mount: Option<Mount>,
    /// The upper dir, used as the root when there is no mount (scratch parent).
    upper: Option<std::path::PathBuf>,
}

impl Mutable {
    fn new(store: &SnapshotStore, parent: Option<&SnapshotId>, desc: &str) -> Result<Mutable> {
        let id = store
            .prepare(parent, &SnapshotOptions::new(desc))
            .map_err(Error::store("prepare snapshot"))?;
        let mut m = Mutable {
            store: store.clone(),
            id: Some(id),
            mount: None,
            upper: None,
        };
        let id = m.id.as_ref().expect("set");
        if parent.is_none() {
            m.upper = Some(
                store
                    .upper_dir(id)
                    .map_err(Error::store("snapshot upper dir"))?,
            );
        } else {
            m.mount = Some(
                store
                    .mount(id, None)
                    .map_err(Error::store("mount snapshot"))?,
            );
        }
        Ok(m)
    }

    fn root(&self) -> Result<Root> {
        let path = match (&self.mount, &self.upper) {
            (Some(m), _) => m.path(),
            (None, Some(u)) => u.as_path(),
            (None, None) => return Err(Error::Internal("mutable snapshot has no root".into())),
        };
        Root::open(path).map_err(|e| Error::io("open", path, e))
    }

    fn commit(mut self) -> Result<Snap> {
        if let Some(m) = self.mount.take() {
            m.unmount().map_err(Error::store("unmount snapshot"))?;
        }
        let id = self.id.take().expect("not yet committed");
        if let Err(e) = self.store.commit(&id) {
            self.id = Some(id);
            return Err(Error::store("commit snapshot")(e));
        }
        Snap::acquire(&self.store, id)
    }
}

impl Drop for Mutable {
    fn drop(&mut self) {
        drop(self.mount.take());
        if let Some(id) = self.id.take() {
            if let Err(e) = self.store.remove(&id) {
                tracing::warn!(snapshot = %id, error = %e, "removing uncommitted snapshot failed");
            }
        }
    }
}

enum St {
    Scratch,
    Committed(Snap),
    Mutable(Mutable),
    /// Moved into its single consumer.
    Taken,
}

fn run(
    store: &SnapshotStore,
    file: &pb::FileOp,
    name: &str,
    inputs: &[Snap],
    cancelled: &dyn Fn() -> bool,
) -> Result<Vec<Snap>> {
    let n_in = inputs.len() as i64;
    let n_act = file.actions.len();
    // How each action result is used: (primary uses, other uses).
    let mut uses = vec![(0usize, 0usize); n_act];
    let action_of = |i: i64| -> Option<usize> { (i >= n_in).then(|| (i - n_in) as usize) };
    for a in &file.actions {
        if let Some(k) = action_of(a.input) {
            uses[k].0 += 1;
        }
        if matches!(a.action, Some(Action::Copy(_))) {
            if let Some(k) = action_of(a.secondary_input) {
                uses[k].1 += 1;
            }
        }
        for i in owner_inputs(a) {
            if let Some(k) = action_of(i) {
                uses[k].1 += 1;
            }
        }
    }
    let mut results: Vec<St> = Vec::with_capacity(n_act);
    let mut outputs: Vec<Option<Snap>> =
        vec![None; file.actions.iter().filter(|a| a.output >= 0).count()];
    for (k, a) in file.actions.iter().enumerate() {
        if cancelled() {
            return Err(Error::Canceled);
        }
        let action = a
            .action
            .as_ref()
            .ok_or_else(|| Error::Internal("validated action has a payload".into()))?;
        // The state this action writes into.
        let target = match a.input {
            -1 => Mutable::new(store, None, name)?,
            i if i < n_in => Mutable::new(store, Some(inputs[i as usize].id()), name)?,
            i => {
                let j = (i - n_in) as usize;
                match std::mem::replace(&mut results[j], St::Taken) {
                    St::Mutable(m) => m,
                    St::Committed(s) => {
                        let m = Mutable::new(store, Some(s.id()), name)?;
                        results[j] = St::Committed(s);
                        m
                    }
                    St::Scratch => Mutable::new(store, None, name)?,
                    St::Taken => {
                        return Err(Error::Internal(format!("action {j} result used twice")))
                    }
                }
            }
        };
        // The action itself; a failure keeps the states for inspection (see `failed`).
        let acted = (|| -> Result<()> {
            let dst = target.root()?;
            // Read-only roots for copy sources and owner lookups; mounts live until the action ends.
            let mounts: RefCell<Vec<Mount>> = RefCell::new(vec![]);
            let ro_root = |i: i64| -> Result<Option<Root>> {
                let snap = match i {
                    -1 => return Ok(None),
                    i if i < n_in => inputs[i as usize].clone(),
                    i => match &results[(i - n_in) as usize] {
                        St::Committed(s) => s.clone(),
                        St::Scratch => return Ok(None),
                        St::Mutable(m) => return m.root().map(Some),
                        St::Taken => {
                            return Err(Error::Internal("reading a consumed action result".into()))
                        }
                    },
                };
                let m = store
                    .mount(snap.id(), None)
                    .map_err(Error::store("mount input"))?;
                let r = Root::open(m.path()).map_err(|e| Error::io("open", m.path(), e))?;
                mounts.borrow_mut().push(m);
                Ok(Some(r))
            };
            let owner_of = |o: &Option<pb::ChownOpt>| -> Result<Option<(u32, u32)>> {
                match o {
                    None => Ok(None),
                    Some(c) => user::resolve(&Owner::from_pb(c), &ro_root).map(Some),
                }
            };
            match action {
                Action::Mkdir(m) => {
                    let attrs = Attrs {
                        owner: owner_of(&m.owner)?,
                        time: Attrs::time_from_pb(m.timestamp),
                    };
                    fileops::mkdir(&dst, m, &attrs)?;
                }
                Action::Mkfile(m) => {
                    let attrs = Attrs {
                        owner: owner_of(&m.owner)?,
                        time: Attrs::time_from_pb(m.timestamp),
                    };
                    fileops::mkfile(&dst, m, &attrs)?;
                }
                Action::Rm(r) => fileops::rm(&dst, r)?,
                Action::Copy(c) => {
                    let owner = owner_of(&c.owner)?;
                    let src = match ro_root(a.secondary_input)? {
                        Some(r) => r,
                        None => {
                            // Copy from scratch: an empty read-only mount.
                            let m = store
                                .mount_chain(&Chain::default(), None)
                                .map_err(Error::store("mount scratch"))?;
                            let r =
                                Root::open(m.path()).map_err(|e| Error::io("open", m.path(), e))?;
                            mounts.borrow_mut().push(m);
                            r
                        }
                    };
                    fileops::copy(&src, &dst, c, owner, cancelled)?;
                }
                Action::Symlink(l) => {
                    let attrs = Attrs {
                        owner: owner_of(&l.owner)?,
                        time: Attrs::time_from_pb(l.timestamp),
                    };
                    fileops::symlink(&dst, l, &attrs)?;
                }
            }
            drop(mounts);
            drop(dst);
            Ok(())
        })();
        if let Err(e) = acted {
            if matches!(e, Error::Canceled) {
                return Err(e);
            }
            return Err(e.with_failure(failed(store, inputs, n_act, k, target, results)));
        }
        let (primary, other) = uses[k];
        let keep_mutable = a.output < 0 && primary == 1 && other == 0;
        let st = if keep_mutable {
            St::Mutable(target)
        } else if a.output < 0 && primary == 0 && other == 0 {
            // Unused intermediate: discard.
            drop(target);
            St::Scratch
        } else {
            St::Committed(target.commit()?)
        };
        if a.output >= 0 {
            if let St::Committed(s) = &st {
                outputs[a.output as usize] = Some(s.clone());
            }
        }
        results.push(st);
    }
    outputs
        .into_iter()
        .enumerate()
        .map(|(i, o)| o.ok_or_else(|| Error::Internal(format!("file op output {i} not produced"))))
        .collect()
}

/// What a file op whose action `k` failed leaves for inspection, as buildkitd's
/// `FileActionError`: the op's inputs, and per action its state (the failed action's as it
/// left it; an earlier action's unless a later action consumed it in place; `None` after `k`).
fn failed(
    store: &SnapshotStore,
    inputs: &[Snap],
    n_act: usize,
    k: usize,
    target: Mutable,
    results: Vec<St>,
) -> crate::error::StepFailure {
    let keep = |m: Mutable| match m.commit() {
        Ok(s) => Some(crate::SolvedRef::of_snap(store, s)),
        Err(e) => {
            tracing::warn!(error = %e, "keeping a failed file action's state failed");
            None
        }
    };
    let mut mounts: Vec<Option<crate::SolvedRef>> = vec![None; n_act];
    for (j, st) in results.into_iter().enumerate() {
        mounts[j] = match st {
            St::Committed(s) => Some(crate::SolvedRef::of_snap(store, s)),
            St::Mutable(m) => keep(m),
            St::Scratch | St::Taken => None,
        };
    }
    mounts[k] = keep(target);
    crate::error::StepFailure {
        inputs: inputs
            .iter()
            .map(|s| Some(crate::SolvedRef::of_snap(store, s.clone())))
            .collect(),
        mounts,
        subject: Some(crate::error::FailedSubject::FileAction(k)),
    }
}

fn owner_inputs(a: &pb::FileAction) -> Vec<i64> {
    let owner = match &a.action {
        Some(Action::Copy(c)) => c.owner.as_ref(),
        Some(Action::Mkdir(m)) => m.owner.as_ref(),
        Some(Action::Mkfile(m)) => m.owner.as_ref(),
        Some(Action::Symlink(s)) => s.owner.as_ref(),
        _ => None,
    };
    let mut v = vec![];
    if let Some(o) = owner {
        let o = Owner::from_pb(o);
        for w in [o.user, o.group].into_iter().flatten() {
            if let Who::Name(_, i) = w {
                v.push(i);
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_only_inputs_detection() {
        let copy = |input, secondary| pb::FileAction {
            input,
            secondary_input: secondary,
            output: -1,
            action: Some(Action::Copy(pb::FileActionCopy {
                src: "/a".into(),
                dest: "/b".into(),
                ..Default::default()
            })),
        };
        // input 0 = base, input 1 = copy source only.
        let f = pb::FileOp {
            actions: vec![copy(0, 1), copy(2, 1)],
        };
        let c = copy_only_inputs(&f, 2);
        assert!(c[0].is_none());
        assert_eq!(c[1], Some(vec![0, 1]));
        // Used as a base too → not content-addressed.
        let f = pb::FileOp {
            actions: vec![copy(1, 1)],
        };
        assert!(copy_only_inputs(&f, 2)[1].is_none());
    }

    /// berth's walk of a real tree gives the checksums of the formulas pinned against stock
    /// (`bkkeys` tests `directory_content_record_matches_stock` and
    /// `wildcard_content_record_matches_stock`, same tree), with the files' own owners.
    #[test]
    fn stock_checksums_of_a_real_tree() {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::write(root.join("hello.txt"), "hi\n").unwrap();
        std::fs::write(root.join("other.txt"), "other\n").unwrap();
        std::fs::write(root.join("notes.md"), "md\n").unwrap();
        std::fs::create_dir_all(root.join("dir/sub")).unwrap();
        std::fs::write(root.join("dir/a"), "a\n").unwrap();
        std::fs::write(root.join("dir/sub/b"), "b\n").unwrap();
        std::os::unix::fs::symlink("a", root.join("dir/link")).unwrap();
        let perm = |p: &str, m: u32| {
            std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(m)).unwrap()
        };
        for f in ["hello.txt", "other.txt", "notes.md", "dir/a", "dir/sub/b"] {
            perm(f, 0o644);
        }
        perm("dir", 0o755);
        perm("dir/sub", 0o750);
        let md = std::fs::metadata(root.join("dir")).unwrap();
        let (uid, gid) = (md.uid(), md.gid());
        let st = |mode: u32, data: &[u8], link: &str| crate::bkkeys::EntryStat {
            mode,
            uid,
            gid,
            size: data.len() as u64,
            linkname: link.into(),
            ..Default::default()
        };
        let sum = |mode: u32, data: &[u8], link: &str| {
            crate::bkkeys::file_content_checksum(&st(mode, data, link), data)
        };
        let sub = crate::bkkeys::dir_content_checksum(
            &sum(libc::S_IFDIR | 0o750, b"", ""),
            &[(b"b".to_vec(), sum(libc::S_IFREG | 0o644, b"b\n", ""))],
        );
        let dir = crate::bkkeys::dir_content_checksum(
            &sum(libc::S_IFDIR | 0o755, b"", ""),
            &[
                (b"a".to_vec(), sum(libc::S_IFREG | 0o644, b"a\n", "")),
                (b"link".to_vec(), sum(libc::S_IFLNK | 0o777, b"", "a")),
                (b"sub".to_vec(), sub),
            ],
        );
        let p = stock_literal_path(root, "/dir/").unwrap();
        assert_eq!(
            stock_entry_checksum(&p, &std::fs::symlink_metadata(&p).unwrap()),
            Some(dir)
        );
        let wild = crate::bkkeys::wildcard_checksum(
            "/*.txt",
            &[
                ("/hello.txt".into(), sum(libc::S_IFREG | 0o644, b"hi\n", "")),
                (
                    "/other.txt".into(),
                    sum(libc::S_IFREG | 0o644, b"other\n", ""),
                ),
            ],
        );
        assert_eq!(stock_wildcard_checksum(root, "/*.txt"), Some(wild));
        // A wildcard matching a directory includes its header and everything below it.
        let d_header = sum(libc::S_IFDIR | 0o755, b"", "");
        let mut included = vec![];
        stock_include(&root.join("dir/sub"), "/dir/sub", &mut included).unwrap();
        assert_eq!(
            included,
            vec![
                ("/dir/sub".to_string(), sum(libc::S_IFDIR | 0o750, b"", "")),
                (
                    "/dir/sub/b".to_string(),
                    sum(libc::S_IFREG | 0o644, b"b\n", "")
                ),
            ]
        );
        assert_ne!(included[0].1, d_header);
        // A symlink among the matches: stock follows it; not reproduced, so no key.
        assert_eq!(stock_wildcard_checksum(root, "/dir/l*"), None);
        // A symlink on the way: no key.
        std::os::unix::fs::symlink("dir", root.join("via")).unwrap();
        assert_eq!(stock_literal_path(root, "/via/a"), None);
    }
}
