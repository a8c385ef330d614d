//! Direct writes into the data root of a **stopped** dockerd (spec §4).
//!
//! Order per layer (crash-safe, spec §4.1):
//! 1. `<drv>/<cache-id>/` with a `berth-incomplete` marker (made as `berth-staging-<cache-id>` and renamed, so the
//!    marker is there from the first moment), then `diff/`, `link`, `l/<link>`, and for a
//!    non-base layer `work/`, `lower` and the parent's `committed`; the tree; `syncfs`.
//! 2. `layerdb/tmp/write-set-berth-<rand>/` (`diff`, `size`, `cache-id`, `parent`, `tar-split.json.gz`), fsynced,
//!    renamed to `layerdb/sha256/<chainID>`: **the commit point**.
//! 3. The marker is removed.
//!
//! Image configs go to `imagedb/content/sha256/<id>` and tags to `repositories.json`, each via a temp file and
//! rename. [`recover`] deletes what a killed writer left: marked layer dirs no layerdb entry points to (with their
//! `l/` links), `write-set-berth-*` dirs and `.berth-tmp-*` files; a marked dir that *is* referenced only loses its
//! marker. Every step is a fault point ([`super::fault`]), and the crash tests kill the writer at each one.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::Rng;

use super::fault::fault_point;
use super::reader::{read_small, valid_cache_id};
use super::{DockerStore, StorageDriver};
use crate::snapshot::{copy_meta, dir_size, fsync_path, make_whiteout};
use crate::tar::{apply_layer, chain_id, ApplyOptions, Digest};
use crate::{Error, Result};

const INCOMPLETE: &str = "berth-incomplete";
const WRITE_SET_PREFIX: &str = "write-set-berth-";
/// Name of a layer dir before its marker is in place.
const STAGING_PREFIX: &str = "berth-staging-";
/// Temp files of [`replace_file`] (image configs, `repositories.json`).
const TMP_PREFIX: &str = ".berth-tmp-";
/// Docker's layer store refuses chains deeper than this (`layer_store.go` `maxLayerDepth`).
const MAX_DEPTH: usize = 125;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// How to tell that a dockerd is using the data root.
#[derive(Debug, Clone, Default)]
pub struct DaemonCheck {
    /// dockerd's `--pidfile`: a live process with that pid counts as running.
    pub pidfile: Option<PathBuf>,
    /// dockerd's API socket: if it accepts a connection, a daemon runs.
    pub socket: Option<PathBuf>,
}

/// A layer to write.
pub enum LayerSource<'a> {
    /// An uncompressed, gzip or zstd layer tar; the diffID, size and tar-split are computed while applying it. With
    /// `diff_id` given, an existing layer is detected without reading the stream.
    Tar {
        /// The tar stream.
        reader: Box<dyn Read + 'a>,
        /// The expected diffID, if known (checked after applying).
        diff_id: Option<Digest>,
    },
    /// A layer directory in overlay format (e.g. a berth layer) with the digests of its exported tar. Files are
    /// hardlinked when on the same filesystem (layers are immutable on both sides), else copied.
    Dir {
        /// The tree.
        path: &'a Path,
        /// sha256 of its tar.
        diff_id: Digest,
        /// A gzipped tar-split file for that tar (required: `docker save`/`push` need it).
        tar_split_gz: &'a Path,
    },
}

/// What [`OfflineWriter::write_layer`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenLayer {
    /// The layer's chainID.
    pub chain_id: Digest,
    /// Its diffID.
    pub diff_id: Digest,
    /// The graph driver dir name.
    pub cache_id: String,
    /// True if Docker already had it (nothing was written).
    pub existed: bool,
}

/// What [`recover`] cleaned up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoverReport {
    /// Layer dirs deleted (never committed).
    pub removed_layer_dirs: Vec<String>,
    /// Write-set dirs deleted.
    pub removed_write_sets: usize,
    /// Committed layer dirs whose marker was left behind (marker removed).
    pub completed: usize,
    /// Temp files of interrupted image config or `repositories.json` writes deleted.
    pub removed_temp_files: usize,
}

/// Writes into a stopped daemon's data root. Holds an exclusive `flock` on the data root dir while alive.
#[derive(Debug)]
pub struct OfflineWriter {
    store: DockerStore,
    _lock: std::fs::File,
}

/// Why `data_root` looks in use by a running dockerd, if it does.
pub(crate) fn daemon_evidence(data_root: &Path, check: &DaemonCheck) -> Option<String> {
    if let Some(pf) = &check.pidfile {
        if let Ok(Some(text)) = read_small(pf) {
            if let Ok(pid) = text.trim().parse::<u32>() {
                if Path::new(&format!("/proc/{pid}")).exists() {
                    return Some(format!("pid {pid} from {} is alive", pf.display()));
                }
            }
        }
    }
    if let Some(sock) = &check.socket {
        if std::os::unix::net::UnixStream::connect(sock).is_ok() {
            return Some(format!("{} accepts connections", sock.display()));
        }
    }
    let want = std::fs::canonicalize(data_root).unwrap_or_else(|_| data_root.to_path_buf());
    let procs = std::fs::read_dir("/proc").ok()?;
    for p in procs.flatten() {
        let name = p.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let Some(argv0) = args.first() else { continue };
        if Path::new(argv0).file_name().and_then(|n| n.to_str()) != Some("dockerd") {
            continue;
        }
        let root = dockerd_data_root(&args);
        let root = std::fs::canonicalize(&root).unwrap_or(root);
        if root == want {
            return Some(format!(
                "dockerd pid {pid} runs with data root {}",
                root.display()
            ));
        }
    }
    None
}

/// The data root a dockerd command line uses: `--data-root`/`-g`, else `data-root` of its config file, else
/// `/var/lib/docker`.
pub(crate) fn dockerd_data_root(args: &[String]) -> PathBuf {
    let flag = |names: &[&str]| -> Option<String> {
        let mut it = args.iter();
        while let Some(a) = it.next() {
            for n in names {
                if a == n {
                    return it.next().cloned();
                }
                if let Some(v) = a.strip_prefix(&format!("{n}=")) {
                    return Some(v.to_string());
                }
            }
        }
        None
    };
    if let Some(r) = flag(&["--data-root", "--graph", "-g"]) {
        return PathBuf::from(r);
    }
    let cfg = flag(&["--config-file"]).unwrap_or_else(|| "/etc/docker/daemon.json".to_string());
    if let Ok(text) = std::fs::read_to_string(cfg) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            if let Some(r) = v
                .get("data-root")
                .or_else(|| v.get("graph"))
                .and_then(|r| r.as_str())
            {
                return PathBuf::from(r);
            }
        }
    }
    PathBuf::from("/var/lib/docker")
}

/// 26 characters `[A-Z0-9]`, like Docker's link ids.
fn link_id() -> String {
    const C: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::thread_rng();
    (0..26)
        .map(|_| C[rng.gen_range(0..C.len())] as char)
        .collect()
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io_err("create", path))?;
    f.write_all(data).map_err(io_err("write", path))?;
    f.sync_all().map_err(io_err("fsync", path))
}

/// Writes `data` to `path` through a temp file in the same dir and a rename; `step` is the fault
/// point between the two.
fn replace_file(path: &Path, data: &[u8], mode: u32, step: &str) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let tmp = dir.join(format!("{TMP_PREFIX}{}", crate::snapshot::random_token(12)));
    write_file(&tmp, data, mode)?;
    fault_point(step);
    std::fs::rename(&tmp, path).map_err(io_err("rename", path))?;
    fsync_path(dir)
}

fn mkdir(path: &Path, mode: u32) -> Result<()> {
    std::fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(io_err("create dir", path))?;
    // The umask may have cut bits.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("chmod", path))
}

impl OfflineWriter {
    /// Opens `store` for writing. Refuses if a dockerd uses the data root (pidfile, socket, or a `dockerd` process
    /// whose data root is this one), takes an exclusive lock (waiting for another writer, in this process or
    /// another, to finish), and runs [`recover`].
    pub fn open(store: DockerStore, check: &DaemonCheck) -> Result<OfflineWriter> {
        let refuse_if_running =
            |store: &DockerStore| match daemon_evidence(store.data_root(), check) {
                Some(evidence) => Err(Error::DockerDaemonRunning {
                    data_root: store.data_root().to_path_buf(),
                    evidence,
                }),
                None => Ok(()),
            };
        refuse_if_running(&store)?;
        let root = store.data_root();
        let lock = std::fs::File::open(root).map_err(io_err("open", root))?;
        let lock_err = |e: rustix::io::Errno| Error::Io {
            op: "lock data root",
            path: root.to_path_buf(),
            source: e.into(),
        };
        // Concurrent exports serialise here: flock is per open file, so threads of one process wait for each
        // other too. Writers hold the lock for one export only.
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                tracing::debug!(data_root = %root.display(), "waiting for another writer of the data root");
                rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
                    .map_err(lock_err)?;
                // A daemon may have been started while we waited.
                refuse_if_running(&store)?;
            }
            Err(e) => return Err(lock_err(e)),
        }
        let drv = store.driver_dir();
        for (d, mode) in [(drv.clone(), 0o710), (drv.join("l"), 0o700)] {
            if !d.exists() {
                std::fs::create_dir_all(&d).map_err(io_err("create dir", &d))?;
                std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode))
                    .map_err(io_err("chmod", &d))?;
            }
        }
        for d in [
            store.layerdb_dir().join("sha256"),
            store.layerdb_dir().join("tmp"),
            store.image_dir().join("imagedb/content/sha256"),
            store.image_dir().join("imagedb/metadata/sha256"),
        ] {
            std::fs::create_dir_all(&d).map_err(io_err("create dir", &d))?;
        }
        let report = recover(&store)?;
        if report != RecoverReport::default() {
            tracing::info!(?report, data_root = %root.display(), "recovered after an interrupted direct write");
        }
        Ok(OfflineWriter { store, _lock: lock })
    }

    /// The store being written.
    pub fn store(&self) -> &DockerStore {
        &self.store
    }

    /// Writes one layer on top of `parent` (a chainID Docker has, or `None` for a base layer). Skips the write if
    /// the resulting chainID exists already.
    pub fn write_layer(
        &self,
        parent: Option<&Digest>,
        src: LayerSource<'_>,
    ) -> Result<WrittenLayer> {
        let parent_entry = match parent {
            Some(p) => Some(
                self.store
                    .layer(p)?
                    .ok_or_else(|| Error::DockerLayerMissing {
                        chain_id: p.to_string(),
                        data_root: self.store.data_root().to_path_buf(),
                    })?,
            ),
            None => None,
        };
        let known_diff = match &src {
            LayerSource::Tar { diff_id, .. } => *diff_id,
            LayerSource::Dir { diff_id, .. } => Some(*diff_id),
        };
        if let Some(d) = known_diff {
            let cid = chain_id(parent, &d);
            if let Some(e) = self.store.layer(&cid)? {
                return Ok(WrittenLayer {
                    chain_id: cid,
                    diff_id: d,
                    cache_id: e.cache_id,
                    existed: true,
                });
            }
        }
        let drv = self.store.driver_dir();
        // Parent's lower chain, checked before anything is written.
        let lower = match &parent_entry {
            Some(pe) => {
                let pdir = drv.join(&pe.cache_id);
                let plink =
                    read_small(&pdir.join("link"))?.ok_or_else(|| Error::BadDockerStoreFile {
                        path: pdir.join("link"),
                        reason: "missing".into(),
                    })?;
                let mut lower = format!("l/{}", plink.trim());
                if let Some(pl) = read_small(&pdir.join("lower"))? {
                    lower.push(':');
                    lower.push_str(pl.trim());
                }
                if lower.split(':').count() >= MAX_DEPTH {
                    return Err(Error::DockerChainTooDeep { max: MAX_DEPTH });
                }
                Some((pdir, lower))
            }
            None => None,
        };

        // 1. The graph driver dir, marked incomplete until the layerdb entry exists.
        let cache_id = hex::encode(rand::thread_rng().gen::<[u8; 32]>());
        let dir = drv.join(&cache_id);
        // The marker must exist the moment the dir has its final name: made under a temp name, then renamed.
        let staging = drv.join(format!("{STAGING_PREFIX}{cache_id}"));
        mkdir(&staging, 0o710)?;
        write_file(&staging.join(INCOMPLETE), b"", 0o600)?;
        fault_point("offline:layer-staged");
        std::fs::rename(&staging, &dir).map_err(io_err("rename", &dir))?;
        fsync_path(&drv)?;
        let res = self.fill_layer_dir(&dir, lower.as_ref(), src, parent, &cache_id);
        match res {
            Ok(w) => Ok(w),
            Err(e) => {
                self.remove_layer_dir(&dir);
                Err(e)
            }
        }
    }

    fn remove_layer_dir(&self, dir: &Path) {
        if let Some(link) = read_small(&dir.join("link")).ok().flatten() {
            let l = self.store.driver_dir().join("l").join(link.trim());
            let _ = std::fs::remove_file(l);
        }
        if let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "removing failed layer dir (recover() retries)");
        }
    }

    fn fill_layer_dir(
        &self,
        dir: &Path,
        lower: Option<&(PathBuf, String)>,
        src: LayerSource<'_>,
        parent: Option<&Digest>,
        cache_id: &str,
    ) -> Result<WrittenLayer> {
        let drv = self.store.driver_dir();
        let diff = dir.join("diff");
        mkdir(&diff, 0o755)?;
        let link = link_id();
        write_file(&dir.join("link"), link.as_bytes(), 0o644)?;
        let l = drv.join("l").join(&link);
        std::os::unix::fs::symlink(format!("../{cache_id}/diff"), &l)
            .map_err(io_err("symlink", &l))?;
        if let Some((pdir, lower)) = lower {
            mkdir(&dir.join("work"), 0o700)?;
            write_file(&dir.join("lower"), lower.as_bytes(), 0o644)?;
            write_file(&pdir.join("committed"), b"", 0o600)?;
        }
        fault_point("offline:layer-dir");
        // The write-set is prepared next to the tree so the tar-split can be written straight into it.
        let ws = self.store.layerdb_dir().join("tmp").join(format!(
            "{WRITE_SET_PREFIX}{}",
            crate::snapshot::random_token(16)
        ));
        std::fs::create_dir_all(&ws).map_err(io_err("create dir", &ws))?;
        let ts_path = ws.join("tar-split.json.gz");
        let diff_id = match src {
            LayerSource::Tar { reader, diff_id } => {
                let mut ts = std::fs::File::create(&ts_path).map_err(io_err("create", &ts_path))?;
                let stats = apply_layer(reader, &diff, Some(&mut ts), &ApplyOptions::default())?;
                ts.sync_all().map_err(io_err("fsync", &ts_path))?;
                if let Some(want) = diff_id {
                    if want != stats.diff_id {
                        let _ = std::fs::remove_dir_all(&ws);
                        return Err(Error::DigestMismatch {
                            expected: want.to_string(),
                            found: stats.diff_id.to_string(),
                        });
                    }
                }
                // Without a known diffID the existence check happens only now.
                let cid = chain_id(parent, &stats.diff_id);
                if let Some(e) = self.store.layer(&cid)? {
                    let _ = std::fs::remove_dir_all(&ws);
                    self.remove_layer_dir(dir);
                    return Ok(WrittenLayer {
                        chain_id: cid,
                        diff_id: stats.diff_id,
                        cache_id: e.cache_id,
                        existed: true,
                    });
                }
                stats.diff_id
            }
            LayerSource::Dir {
                path,
                diff_id,
                tar_split_gz,
            } => {
                std::fs::copy(tar_split_gz, &ts_path).map_err(io_err("copy", tar_split_gz))?;
                copy_layer_tree(path, &diff)?;
                diff_id
            }
        };
        if self.store.driver() == StorageDriver::FuseOverlayfs {
            overlay_to_aufs(&diff)?;
        }
        let size = dir_size(&diff)?;
        let f = std::fs::File::open(&diff).map_err(io_err("open", &diff))?;
        rustix::fs::syncfs(&f).map_err(|e| Error::Io {
            op: "syncfs",
            path: diff.clone(),
            source: e.into(),
        })?;

        fault_point("offline:layer-tree");
        // 2. The layerdb entry; the rename is the commit point.
        let cid = chain_id(parent, &diff_id);
        write_file(&ws.join("diff"), diff_id.to_string().as_bytes(), 0o644)?;
        write_file(&ws.join("size"), size.to_string().as_bytes(), 0o644)?;
        write_file(&ws.join("cache-id"), cache_id.as_bytes(), 0o644)?;
        if let Some(p) = parent {
            write_file(&ws.join("parent"), p.to_string().as_bytes(), 0o644)?;
        }
        fsync_path(&ws)?;
        fault_point("offline:write-set");
        let dst = self.store.layerdb_dir().join("sha256").join(cid.hex());
        std::fs::rename(&ws, &dst).map_err(io_err("rename write-set", &dst))?;
        fsync_path(&self.store.layerdb_dir().join("sha256"))?;
        fault_point("offline:layer-committed");
        // 3. Committed: drop the marker.
        std::fs::remove_file(dir.join(INCOMPLETE))
            .map_err(io_err("remove", &dir.join(INCOMPLETE)))?;
        fsync_path(dir)?;
        tracing::debug!(chain_id = %cid, cache_id, "layer written into stopped dockerd's store");
        Ok(WrittenLayer {
            chain_id: cid,
            diff_id,
            cache_id: cache_id.to_string(),
            existed: false,
        })
    }

    /// Stores an image config (its layers must be in the layerdb); returns the image ID.
    pub fn write_image(&self, config: &[u8]) -> Result<Digest> {
        fault_point("offline:layers-done");
        let diff_ids = DockerStore::config_diff_ids(config)?;
        self.store.layers_for_diff_ids(&diff_ids)?;
        #[derive(serde::Deserialize)]
        struct H {
            #[serde(default)]
            empty_layer: bool,
        }
        #[derive(serde::Deserialize)]
        struct C {
            #[serde(default)]
            history: Vec<H>,
        }
        let c: C = serde_json::from_slice(config).map_err(|e| Error::BadImageConfig {
            reason: format!("history: {e}"),
        })?;
        let non_empty = c.history.iter().filter(|h| !h.empty_layer).count();
        if non_empty > diff_ids.len() {
            return Err(Error::BadImageConfig {
                reason: format!(
                    "{non_empty} non-empty history entries for {} layers",
                    diff_ids.len()
                ),
            });
        }
        let id = Digest::of(config);
        let path = self
            .store
            .image_dir()
            .join("imagedb/content/sha256")
            .join(id.hex());
        replace_file(&path, config, 0o600, "offline:image-tmp")?;
        fault_point("offline:image");
        Ok(id)
    }

    /// Points `reference` (e.g. `app:1`, `registry:5000/x/y:tag`; default tag `latest`) at `image_id` in
    /// `repositories.json`, replacing any previous target of that tag.
    pub fn tag(&self, reference: &str, image_id: &Digest) -> Result<()> {
        let (repo, full) = familiar_reference(reference)?;
        let path = self.store.image_dir().join("repositories.json");
        let mut doc: serde_json::Value = match read_small(&path)? {
            Some(t) => serde_json::from_str(&t).map_err(|e| Error::BadDockerStoreFile {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            None => serde_json::json!({ "Repositories": {} }),
        };
        let repos = doc
            .get_mut("Repositories")
            .and_then(|r| r.as_object_mut())
            .ok_or_else(|| Error::BadDockerStoreFile {
                path: path.clone(),
                reason: "no Repositories object".into(),
            })?;
        let entry = repos.entry(repo).or_insert_with(|| serde_json::json!({}));
        let obj = entry
            .as_object_mut()
            .ok_or_else(|| Error::BadDockerStoreFile {
                path: path.clone(),
                reason: "repository is not an object".into(),
            })?;
        obj.insert(full, serde_json::Value::String(image_id.to_string()));
        let bytes = serde_json::to_vec(&doc).map_err(|e| Error::BadDockerStoreFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        replace_file(&path, &bytes, 0o600, "offline:tags-tmp")?;
        fault_point("offline:tagged");
        Ok(())
    }
}

/// `(familiar repository, familiar name:tag)` as `repositories.json` keys them.
pub(crate) fn familiar_reference(reference: &str) -> Result<(String, String)> {
    let bad = || Error::InvalidImageReference {
        reference: reference.to_string(),
    };
    if reference.contains('@') || reference.is_empty() {
        return Err(bad());
    }
    let last_slash = reference.rfind('/').map(|i| i + 1).unwrap_or(0);
    let (name, tag) = match reference[last_slash..].rfind(':') {
        Some(i) => (
            &reference[..last_slash + i],
            &reference[last_slash + i + 1..],
        ),
        None => (reference, "latest"),
    };
    let name = name.strip_prefix("docker.io/").unwrap_or(name);
    // Docker's familiar form drops `library/` only for official images (one path component).
    let name = match name.strip_prefix("library/") {
        Some(rest) if !rest.contains('/') => rest,
        _ => name,
    };
    let ok_name = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/:".contains(&b))
        && !name.starts_with('/')
        && !name.ends_with('/');
    let ok_tag = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !tag.starts_with(['.', '-']);
    if !ok_name || !ok_tag {
        return Err(bad());
    }
    Ok((name.to_string(), format!("{name}:{tag}")))
}

/// Copies an overlay-format layer tree (hardlinking files where possible), keeping whiteouts, opaque markers,
/// xattrs, owners, modes and times.
fn copy_layer_tree(src: &Path, dst: &Path) -> Result<()> {
    let mut dirs = vec![];
    for e in walkdir::WalkDir::new(src).min_depth(1) {
        let e = e.map_err(|e| Error::Io {
            op: "walk",
            path: e.path().unwrap_or(src).to_path_buf(),
            source: e
                .into_io_error()
                .unwrap_or_else(|| std::io::Error::other("walk loop")),
        })?;
        let rel = e.path().strip_prefix(src).unwrap_or(e.path());
        let (s, d) = (e.path(), dst.join(rel));
        let md = std::fs::symlink_metadata(s).map_err(io_err("lstat", s))?;
        let ft = md.file_type();
        if ft.is_dir() {
            std::fs::create_dir(&d).map_err(io_err("create dir", &d))?;
            dirs.push((s.to_path_buf(), d, md));
            continue;
        }
        if ft.is_file() {
            if std::fs::hard_link(s, &d).is_ok() {
                continue;
            }
            std::fs::copy(s, &d).map_err(io_err("copy", s))?;
        } else if ft.is_symlink() {
            let t = std::fs::read_link(s).map_err(io_err("readlink", s))?;
            std::os::unix::fs::symlink(t, &d).map_err(io_err("symlink", &d))?;
        } else if ft.is_char_device() && md.rdev() == 0 {
            make_whiteout(&d)?;
        } else {
            let kind = if ft.is_char_device() {
                rustix::fs::FileType::CharacterDevice
            } else if ft.is_block_device() {
                rustix::fs::FileType::BlockDevice
            } else if ft.is_fifo() {
                rustix::fs::FileType::Fifo
            } else {
                rustix::fs::FileType::Socket
            };
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &d,
                kind,
                rustix::fs::Mode::from_raw_mode(md.mode() & 0o7777),
                md.rdev(),
            )
            .map_err(|e| Error::Io {
                op: "mknod",
                path: d.clone(),
                source: e.into(),
            })?;
        }
        copy_meta(s, &md, &d)?;
    }
    // Directory metadata last (children changed their mtimes), deepest first.
    dirs.push((
        src.to_path_buf(),
        dst.to_path_buf(),
        std::fs::symlink_metadata(src).map_err(io_err("lstat", src))?,
    ));
    for (s, d, md) in dirs.iter().rev() {
        copy_meta(s, md, d)?;
        if opaque(s) {
            rustix::fs::lsetxattr(
                d,
                "trusted.overlay.opaque",
                b"y",
                rustix::fs::XattrFlags::empty(),
            )
            .map_err(|e| Error::Io {
                op: "setxattr opaque",
                path: d.clone(),
                source: e.into(),
            })?;
        }
    }
    Ok(())
}

fn opaque(p: &Path) -> bool {
    let mut v = [0u8; 4];
    matches!(rustix::fs::lgetxattr(p, "trusted.overlay.opaque", &mut v), Ok(1) if v[0] == b'y')
}

/// Rewrites overlay whiteouts as AUFS markers in place (what fuse-overlayfs' `ApplyDiff` stores): a char device 0:0
/// `x` becomes an empty file `.wh.x`, an opaque dir loses its xattr and gains `.wh..wh..opq`. Directory mtimes are
/// kept.
fn overlay_to_aufs(diff: &Path) -> Result<()> {
    let mut touched_dirs = std::collections::BTreeMap::new();
    let entries: Vec<_> = walkdir::WalkDir::new(diff)
        .into_iter()
        .filter_map(|e| e.ok())
        .collect();
    for e in entries {
        let p = e.path();
        let md = std::fs::symlink_metadata(p).map_err(io_err("lstat", p))?;
        let parent = p.parent().unwrap_or(diff).to_path_buf();
        if md.file_type().is_char_device() && md.rdev() == 0 {
            if !touched_dirs.contains_key(&parent) {
                touched_dirs.insert(
                    parent.clone(),
                    std::fs::symlink_metadata(&parent).map_err(io_err("lstat", &parent))?,
                );
            }
            let name = p.file_name().unwrap_or_default();
            let marker = parent.join(format!(".wh.{}", name.to_string_lossy()));
            std::fs::remove_file(p).map_err(io_err("remove whiteout", p))?;
            write_file(&marker, b"", 0o600)?;
            let _ = rustix::fs::chownat(
                rustix::fs::CWD,
                &marker,
                Some(rustix::fs::Uid::from_raw(md.uid())),
                Some(rustix::fs::Gid::from_raw(md.gid())),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            );
        } else if md.is_dir() && opaque(p) {
            if !touched_dirs.contains_key(p) {
                touched_dirs.insert(p.to_path_buf(), md.clone());
            }
            rustix::fs::lremovexattr(p, "trusted.overlay.opaque").map_err(|e| Error::Io {
                op: "removexattr",
                path: p.to_path_buf(),
                source: e.into(),
            })?;
            write_file(&p.join(".wh..wh..opq"), b"", 0o600)?;
        }
    }
    for (d, md) in touched_dirs {
        let ts = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: md.atime(),
                tv_nsec: md.atime_nsec() as _,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: md.mtime(),
                tv_nsec: md.mtime_nsec() as _,
            },
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            &d,
            &ts,
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| Error::Io {
            op: "utimensat",
            path: d.clone(),
            source: e.into(),
        })?;
    }
    Ok(())
}

/// Cleans up after a killed [`OfflineWriter`] (it runs this itself on open). Only touches what berth marked.
pub fn recover(store: &DockerStore) -> Result<RecoverReport> {
    let mut report = RecoverReport::default();
    for dir in [
        store.image_dir(),
        store.image_dir().join("imagedb/content/sha256"),
    ] {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                std::fs::remove_file(e.path()).map_err(io_err("remove", &e.path()))?;
                report.removed_temp_files += 1;
            }
        }
    }
    let tmp = store.layerdb_dir().join("tmp");
    if let Ok(rd) = std::fs::read_dir(&tmp) {
        for e in rd.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(WRITE_SET_PREFIX)
            {
                std::fs::remove_dir_all(e.path()).map_err(io_err("remove", &e.path()))?;
                report.removed_write_sets += 1;
            }
        }
    }
    let drv = store.driver_dir();
    let Ok(rd) = std::fs::read_dir(&drv) else {
        return Ok(report);
    };
    let children: Vec<_> = rd.flatten().collect();
    for e in &children {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(STAGING_PREFIX) {
            std::fs::remove_dir_all(e.path()).map_err(io_err("remove", &e.path()))?;
            report.removed_layer_dirs.push(name);
        }
    }
    let marked: Vec<String> = children
        .iter()
        .filter(|e| e.path().join(INCOMPLETE).exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| valid_cache_id(n))
        .collect();
    if marked.is_empty() {
        return Ok(report);
    }
    // Which cache-ids the layerdb points to.
    let mut referenced = std::collections::BTreeSet::new();
    let sha = store.layerdb_dir().join("sha256");
    if let Ok(rd) = std::fs::read_dir(&sha) {
        for e in rd.flatten() {
            if let Ok(Some(c)) = read_small(&e.path().join("cache-id")) {
                referenced.insert(c.trim().to_string());
            }
        }
    }
    for cache_id in marked {
        let dir = drv.join(&cache_id);
        if referenced.contains(&cache_id) {
            std::fs::remove_file(dir.join(INCOMPLETE))
                .map_err(io_err("remove", &dir.join(INCOMPLETE)))?;
            report.completed += 1;
            continue;
        }
        if let Ok(Some(link)) = read_small(&dir.join("link")) {
            let link = link.trim();
            if !link.is_empty() && !link.contains('/') {
                let _ = std::fs::remove_file(drv.join("l").join(link));
            }
        }
        std::fs::remove_dir_all(&dir).map_err(io_err("remove", &dir))?;
        report.removed_layer_dirs.push(cache_id);
    }
    fsync_path(&drv)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn familiar_references() {
        let ok = [
            ("app", ("app", "app:latest")),
            ("app:1.0", ("app", "app:1.0")),
            ("docker.io/library/busybox:x", ("busybox", "busybox:x")),
            ("library/busybox", ("busybox", "busybox:latest")),
            (
                "library/team/app:1",
                ("library/team/app", "library/team/app:1"),
            ),
            (
                "localhost:5000/team/app",
                ("localhost:5000/team/app", "localhost:5000/team/app:latest"),
            ),
            (
                "localhost:5000/team/app:v2",
                ("localhost:5000/team/app", "localhost:5000/team/app:v2"),
            ),
        ];
        for (input, (repo, full)) in ok {
            assert_eq!(
                familiar_reference(input).unwrap(),
                (repo.to_string(), full.to_string()),
                "{input}"
            );
        }
        for bad in ["", "App:1", "a@sha256:00", "a:", "a:-x", "/a"] {
            assert!(familiar_reference(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dockerd_data_root_from_args() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            dockerd_data_root(&a(&["dockerd", "--data-root", "/x"])),
            PathBuf::from("/x")
        );
        assert_eq!(
            dockerd_data_root(&a(&["dockerd", "--data-root=/y", "-H", "unix:///s"])),
            PathBuf::from("/y")
        );
        assert_eq!(
            dockerd_data_root(&a(&["dockerd", "-g", "/z"])),
            PathBuf::from("/z")
        );
    }

    #[test]
    fn link_ids_look_like_dockers() {
        let l = link_id();
        assert_eq!(l.len(), 26);
        assert!(l
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()));
    }
}
