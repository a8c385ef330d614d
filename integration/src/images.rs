//! Base images made without any registry: a busybox rootfs imported with
//! `POST /images/create?fromSrc=-`, and a multi-layer image loaded with `POST /images/load`.
//!
//! The busybox rootfs: `/bin/busybox` (Debian's `busybox-static`), one symlink per applet at the
//! place `busybox --list-full` names (`/bin/sh`, `/usr/bin/wc`, ...), `/etc/passwd` and
//! `/etc/group` with `root` (0), `user` (1000) and `nobody` (65534), `/tmp` (1777), `/root`,
//! `/home/user` (owned by 1000). The image's `Cmd` is `/bin/sh`, `PATH` the usual default.
//!
//! The multi-layer image has the same busybox rootfs as its first layer (byte-identical tar, so
//! the same diffID as [`busybox_image`]'s layer) and two layers written here as tars (see
//! [`MULTI_LAYER_FILES`] and [`MULTI_LAYER_ABSENT`] for the resulting tree): layer 2 adds files
//! and directories, layer 3 modifies a lower file, deletes one with a whiteout
//! (`.wh.removed.txt`) and replaces a directory with an opaque one (`.wh..wh..opq`).
//!
//! Why layers are written rather than committed from containers: `docker commit` on the system
//! daemon's fuse-overlayfs driver (20.10) drops the deletion inside a directory that was removed
//! and re-created when the same parent also holds another whiteout (the committed layer then
//! still shows the old file). Writing the tars makes the layers exact and identical on every
//! storage driver; each image still gets a unique ID (its config carries a unique label).

use std::collections::BTreeSet;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use bollard::query_parameters::{CreateImageOptions, ImportImageOptions};
use futures::StreamExt as _;

use crate::engine::{split_reference, DockerEngine};

/// Where Debian's `busybox-static` installs the static binary.
const BUSYBOX: &str = "/bin/busybox";
/// Fixed mtime for every entry of the rootfs tar (2023-11-14), so its content is reproducible.
const MTIME: u64 = 1_700_000_000;
/// `PATH` set in the images (Docker's own default for containers without one).
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
user:x:1000:1000:user:/home/user:/bin/sh\n\
nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n";

/// Files of a [`multi_layer_image`] and their exact contents (absolute paths in the image).
///
/// `/data/keep/a.txt` is written in layer 2 and rewritten in layer 3; `/data/keep/b.txt` and
/// `/data/opaque/new.txt` come from layer 3.
pub const MULTI_LAYER_FILES: &[(&str, &str)] = &[
    ("/data/keep/a.txt", "layer3-a\n"),
    ("/data/keep/b.txt", "layer3-b\n"),
    ("/data/opaque/new.txt", "layer3-new\n"),
];

/// Paths that exist in layer 2 of a [`multi_layer_image`] but not in the final image:
/// a file deleted in layer 3 (whiteout) and a file of a directory that layer 3 deleted and
/// re-created (opaque directory).
pub const MULTI_LAYER_ABSENT: &[&str] = &["/data/removed.txt", "/data/opaque/old.txt"];

/// An image this test created (or adopted); dropping it removes its reference from its engine.
///
/// Only the one reference is removed (with `force`), never other tags of the same image ID, so
/// an image with several [`TestImage`] tags disappears when the last of them is dropped. Removal
/// failures (e.g. the engine was stopped) are reported on stderr, not raised.
#[derive(Debug)]
pub struct TestImage {
    engine: DockerEngine,
    reference: String,
    id: String,
}

impl TestImage {
    /// Takes ownership of an existing `reference` on `engine`: it is removed on drop.
    pub async fn adopt(engine: &DockerEngine, reference: &str) -> Result<Self> {
        let id = engine
            .inspect_image(reference)
            .await?
            .id
            .ok_or_else(|| anyhow!("image {reference} has no Id"))?;
        Ok(Self {
            engine: engine.clone(),
            reference: reference.to_string(),
            id,
        })
    }

    /// The reference (`repo:tag`) this image was created under.
    pub fn reference(&self) -> &str {
        &self.reference
    }

    /// The image ID (`sha256:...`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The engine the image lives on.
    pub fn engine(&self) -> &DockerEngine {
        &self.engine
    }

    /// Adds the tag `target` (`repo:tag`) to this image; the returned [`TestImage`] owns it.
    pub async fn tag_as(&self, target: &str) -> Result<TestImage> {
        self.engine.tag(&self.id, target).await?;
        Ok(TestImage {
            engine: self.engine.clone(),
            reference: target.to_string(),
            id: self.id.clone(),
        })
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        if !self.engine.socket().exists() {
            // Engine gone (a stopped private dockerd): nothing to talk to.
            return;
        }
        let socket = self.engine.socket().to_path_buf();
        let reference = self.reference.clone();
        // A fresh runtime on its own thread: Drop may run inside (or outside) any runtime, and
        // must not block the test's runtime on its own I/O.
        let outcome = std::thread::spawn(move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                DockerEngine::connect(socket)?
                    .remove_image(&reference)
                    .await
            })
        })
        .join();
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("integration: dropping image {}: {err:#}", self.reference),
            Err(_) => eprintln!(
                "integration: dropping image {}: thread panicked",
                self.reference
            ),
        }
    }
}

/// Imports a fresh busybox base image into `engine` as `berth-test/busybox:<unique>`.
///
/// Needs `/bin/busybox` from Debian's `busybox-static` (panics naming the package otherwise).
pub async fn busybox_image(engine: &DockerEngine) -> Result<TestImage> {
    let busybox = crate::require_tool(BUSYBOX, "busybox-static");
    let tar = tokio::task::spawn_blocking(move || rootfs_tar(&busybox))
        .await
        .context("rootfs builder panicked")??;
    let reference = format!("berth-test/busybox:{}", crate::unique_name("base"));
    import(engine, tar, &reference).await?;
    TestImage::adopt(engine, &reference).await
}

/// Imports an image holding one dynamically linked program into `engine` as
/// `berth-test/<name>:<unique>`: the program at `/bin/<name>` (its `Entrypoint`) with the
/// shared libraries `ldd` lists for it at their host paths, and `labels` in its config.
/// Used for `gateway.v0` frontend images built from a test binary.
pub async fn program_image(
    engine: &DockerEngine,
    program: &Path,
    name: &str,
    labels: &[(&str, &str)],
) -> Result<TestImage> {
    let program = program.to_path_buf();
    let target = format!("bin/{name}");
    let tar = tokio::task::spawn_blocking(move || program_tar(&program, &target))
        .await
        .context("program image builder panicked")??;
    let reference = format!("berth-test/{name}:{}", crate::unique_name("prog"));
    let mut changes = vec![
        format!(r#"ENTRYPOINT ["/bin/{name}"]"#),
        format!("ENV {PATH_ENV}"),
    ];
    for (k, v) in labels {
        changes.push(format!("LABEL {k}={v:?}"));
    }
    import_with(engine, tar, &reference, changes).await?;
    TestImage::adopt(engine, &reference).await
}

/// The shared libraries (and the loader) `ldd` names for `program`, as absolute host paths.
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let out = std::process::Command::new("ldd")
        .arg(program)
        .output()
        .context("running ldd")?;
    if !out.status.success() {
        bail!(
            "ldd {}: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or `/lib64/ld-linux… (0x…)`
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// The tar of [`program_image`]: `target` and the libraries, every parent directory first.
fn program_tar(program: &Path, target: &str) -> Result<std::fs::File> {
    let mut files: Vec<(PathBuf, PathBuf)> = vec![(program.to_path_buf(), PathBuf::from(target))];
    for lib in shared_libraries(program)? {
        let inside = lib.strip_prefix("/").unwrap_or(&lib).to_path_buf();
        files.push((lib, inside));
    }
    let mut dirs = BTreeSet::new();
    for (_, inside) in &files {
        let mut parent = inside.parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(dir.to_path_buf());
            parent = dir.parent();
        }
    }
    let file = tempfile::tempfile().context("creating temp file for program tar")?;
    let mut builder = tar::Builder::new(file);
    for dir in &dirs {
        let mut h = header(tar::EntryType::Directory, 0o755, 0, 0);
        builder.append_data(&mut h, dir, std::io::empty())?;
    }
    for (host, inside) in &files {
        // libraries are often symlinks on the host: the image gets the file they name
        let f = std::fs::File::open(host).with_context(|| format!("opening {}", host.display()))?;
        let size = f.metadata()?.len();
        let mut h = header(tar::EntryType::Regular, 0o755, 0, size);
        builder.append_data(&mut h, inside, f)?;
    }
    let mut file = builder.into_inner().context("finishing program tar")?;
    file.seek(SeekFrom::Start(0))?;
    Ok(file)
}

/// Loads a 3-layer image into `engine` as `berth-test/multi-layer:<unique>`: the busybox rootfs
/// (same diffID as [`busybox_image`]'s layer) plus two layers whose result is described by
/// [`MULTI_LAYER_FILES`] and [`MULTI_LAYER_ABSENT`].
pub async fn multi_layer_image(engine: &DockerEngine) -> Result<TestImage> {
    let busybox = crate::require_tool(BUSYBOX, "busybox-static");
    let reference = format!("berth-test/multi-layer:{}", crate::unique_name("ml"));
    let archive_ref = reference.clone();
    let archive = tokio::task::spawn_blocking(move || -> Result<std::fs::File> {
        let layers = [rootfs_tar(&busybox)?, layer2_tar()?, layer3_tar()?];
        save_archive(layers, &archive_ref)
    })
    .await
    .context("image archive builder panicked")??;
    let file = tokio::fs::File::from_std(archive);
    let body = bollard::body_try_stream(tokio_util::io::ReaderStream::new(file));
    let mut progress = engine.client().import_image(
        ImportImageOptions {
            quiet: true,
            platform: None,
        },
        body,
        None,
    );
    while let Some(item) = progress.next().await {
        let info = item.with_context(|| format!("loading {reference}"))?;
        if let Some(message) = info.error_detail.and_then(|d| d.message) {
            bail!("loading {reference}: {message}");
        }
    }
    TestImage::adopt(engine, &reference).await
}

/// Layer 2: `/data/keep/a.txt`, `/data/removed.txt`, `/data/opaque/old.txt`.
fn layer2_tar() -> Result<std::fs::File> {
    layer_tar(&[
        Entry::Dir("data"),
        Entry::Dir("data/keep"),
        Entry::File("data/keep/a.txt", "layer2-a\n"),
        Entry::File("data/removed.txt", "layer2-removed\n"),
        Entry::Dir("data/opaque"),
        Entry::File("data/opaque/old.txt", "layer2-old\n"),
    ])
}

/// Layer 3: rewrites `a.txt`, adds `b.txt`, whites out `removed.txt`, makes `opaque/` opaque.
fn layer3_tar() -> Result<std::fs::File> {
    layer_tar(&[
        Entry::Dir("data"),
        Entry::File("data/.wh.removed.txt", ""),
        Entry::Dir("data/keep"),
        Entry::File("data/keep/a.txt", "layer3-a\n"),
        Entry::File("data/keep/b.txt", "layer3-b\n"),
        Entry::Dir("data/opaque"),
        Entry::File("data/opaque/.wh..wh..opq", ""),
        Entry::File("data/opaque/new.txt", "layer3-new\n"),
    ])
}

enum Entry {
    Dir(&'static str),
    File(&'static str, &'static str),
}

fn layer_tar(entries: &[Entry]) -> Result<std::fs::File> {
    let file = tempfile::tempfile().context("creating temp file for layer tar")?;
    let mut builder = tar::Builder::new(file);
    for entry in entries {
        match entry {
            Entry::Dir(path) => {
                let mut h = header(tar::EntryType::Directory, 0o755, 0, 0);
                builder.append_data(&mut h, path, std::io::empty())?;
            }
            Entry::File(path, text) => {
                let mut h = header(tar::EntryType::Regular, 0o644, 0, text.len() as u64);
                builder.append_data(&mut h, path, text.as_bytes())?;
            }
        }
    }
    let mut file = builder.into_inner().context("finishing layer tar")?;
    file.seek(SeekFrom::Start(0))?;
    Ok(file)
}

/// sha256 of a file's content from its current position, as `sha256:<hex>`; rewinds it after.
fn file_digest(file: &mut std::fs::File) -> Result<String> {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(file, &mut hasher).context("hashing layer tar")?;
    file.seek(SeekFrom::Start(0))?;
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// Writes a `docker save` archive (manifest.json, config, one `layer.tar` per layer) holding one
/// image tagged `reference`, into a temp file rewound for reading.
fn save_archive(layers: [std::fs::File; 3], reference: &str) -> Result<std::fs::File> {
    let mut diff_ids = Vec::new();
    let mut layers = layers;
    for layer in &mut layers {
        diff_ids.push(file_digest(layer)?);
    }
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let created = "2023-11-14T22:13:20Z";
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "created": created,
        "config": {
            "Cmd": ["/bin/sh"],
            "Env": [PATH_ENV],
            "Labels": {"berth.test.image": reference},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": created, "created_by": "berth-test: busybox rootfs"},
            {"created": created, "created_by": "berth-test: add /data files"},
            {"created": created, "created_by": "berth-test: modify, whiteout, opaque dir"},
        ],
    });
    let config = serde_json::to_vec(&config)?;
    let config_name = {
        use sha2::Digest as _;
        format!("{}.json", hex::encode(sha2::Sha256::digest(&config)))
    };
    let layer_paths: Vec<String> = (0..layers.len())
        .map(|i| format!("layer{i}/layer.tar"))
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name,
        "RepoTags": [reference],
        "Layers": layer_paths,
    }]))?;

    let file = tempfile::tempfile().context("creating temp file for image archive")?;
    let mut builder = tar::Builder::new(file);
    for (layer, path) in layers.into_iter().zip(&layer_paths) {
        let dir = path.trim_end_matches("/layer.tar");
        let mut h = header(tar::EntryType::Directory, 0o755, 0, 0);
        builder.append_data(&mut h, dir, std::io::empty())?;
        let size = layer.metadata()?.len();
        let mut h = header(tar::EntryType::Regular, 0o644, 0, size);
        builder.append_data(&mut h, path, layer)?;
    }
    for (name, data) in [
        (config_name.as_str(), &config),
        ("manifest.json", &manifest),
    ] {
        let mut h = header(tar::EntryType::Regular, 0o644, 0, data.len() as u64);
        builder.append_data(&mut h, name, data.as_slice())?;
    }
    let mut file = builder.into_inner().context("finishing image archive")?;
    file.seek(SeekFrom::Start(0))?;
    Ok(file)
}

/// Streams the tar file `tar` into `POST /images/create?fromSrc=-` as `reference`, with the
/// busybox image's `Cmd` and `PATH`.
async fn import(engine: &DockerEngine, tar: std::fs::File, reference: &str) -> Result<()> {
    let changes = vec![r#"CMD ["/bin/sh"]"#.to_string(), format!("ENV {PATH_ENV}")];
    import_with(engine, tar, reference, changes).await
}

/// Streams the tar file `tar` into `POST /images/create?fromSrc=-` as `reference`, applying
/// the Dockerfile instructions `changes` to its config.
async fn import_with(
    engine: &DockerEngine,
    tar: std::fs::File,
    reference: &str,
    changes: Vec<String>,
) -> Result<()> {
    let (repo, tag) = split_reference(reference)?;
    let file = tokio::fs::File::from_std(tar);
    let body = bollard::body_try_stream(tokio_util::io::ReaderStream::new(file));
    let options = CreateImageOptions {
        from_src: Some("-".to_string()),
        repo: Some(repo.to_string()),
        tag: Some(tag.to_string()),
        changes,
        ..Default::default()
    };
    let mut progress = engine
        .client()
        .create_image(Some(options), Some(body), None);
    while let Some(item) = progress.next().await {
        let info = item.with_context(|| format!("importing {reference}"))?;
        if let Some(message) = info.error_detail.and_then(|d| d.message) {
            bail!("importing {reference}: {message}");
        }
    }
    Ok(())
}

/// Writes the busybox rootfs as a tar into an anonymous temp file, rewound for reading.
fn rootfs_tar(busybox: &Path) -> Result<std::fs::File> {
    let applets = applet_paths(busybox)?;
    let mut dirs: BTreeSet<PathBuf> = [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "etc",
        "tmp",
        "root",
        "home",
        "home/user",
        "proc",
        "sys",
        "dev",
        "var",
        "var/tmp",
    ]
    .into_iter()
    .map(PathBuf::from)
    .collect();
    for applet in &applets {
        let mut parent = applet.parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(dir.to_path_buf());
            parent = dir.parent();
        }
    }

    let file = tempfile::tempfile().context("creating temp file for rootfs tar")?;
    let mut builder = tar::Builder::new(file);
    // BTreeSet order puts every parent before its children.
    for dir in &dirs {
        let (mode, owner) = match dir.to_str() {
            Some("tmp") | Some("var/tmp") => (0o1777, 0),
            Some("root") => (0o700, 0),
            Some("home/user") => (0o755, 1000),
            _ => (0o755, 0),
        };
        let mut header = header(tar::EntryType::Directory, mode, owner, 0);
        builder.append_data(&mut header, dir, std::io::empty())?;
    }
    let binary =
        std::fs::File::open(busybox).with_context(|| format!("opening {}", busybox.display()))?;
    let size = binary.metadata()?.len();
    let mut h = header(tar::EntryType::Regular, 0o755, 0, size);
    builder.append_data(&mut h, "bin/busybox", binary)?;
    for (path, text) in [("etc/passwd", PASSWD), ("etc/group", GROUP)] {
        let mut h = header(tar::EntryType::Regular, 0o644, 0, text.len() as u64);
        builder.append_data(&mut h, path, text.as_bytes())?;
    }
    for applet in applets
        .iter()
        .filter(|a| a.as_path() != Path::new("bin/busybox"))
    {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0);
        builder.append_link(&mut h, applet, "/bin/busybox")?;
    }
    let mut file = builder.into_inner().context("finishing rootfs tar")?;
    file.seek(SeekFrom::Start(0))?;
    Ok(file)
}

fn header(kind: tar::EntryType, mode: u32, owner: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(owner);
    h.set_gid(owner);
    h.set_mtime(MTIME);
    h.set_size(size);
    h
}

/// Relative install paths of every applet (`bin/sh`, `usr/bin/wc`, ...), from
/// `busybox --list-full`.
fn applet_paths(busybox: &Path) -> Result<Vec<PathBuf>> {
    let out = std::process::Command::new(busybox)
        .arg("--list-full")
        .output()
        .with_context(|| format!("running {} --list-full", busybox.display()))?;
    if !out.status.success() {
        bail!(
            "{} --list-full failed ({}): {}",
            busybox.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8(out.stdout).context("applet list is not UTF-8")?;
    let paths: BTreeSet<PathBuf> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| PathBuf::from(l.trim_start_matches('/')))
        .collect();
    for needed in ["bin/sh", "bin/ls", "bin/cat"] {
        if !paths.contains(Path::new(needed)) {
            bail!("{} lists no {needed} applet", busybox.display());
        }
    }
    Ok(paths.into_iter().collect())
}
