//! The image's root filesystem, staged in a directory that becomes the build's `--local`.
//!
//! Contents, and nothing else:
//! - `/usr/bin/buildkitd`: berthd under buildkitd's name (tools run `buildkitd …`), stripped;
//!   `/usr/bin/berthd` is a symlink to it;
//! - `/usr/bin/buildctl`: berth's buildctl (dial-stdio, debug, build), stripped;
//! - `/usr/bin/runc`: the host's runc binary (berthd's executor runs `runc` from `PATH`);
//! - `/usr/bin/cp`: the host's coreutils `cp` (the worker seeds cache mounts with `cp -a`);
//! - the shared libraries these load, at the paths the dynamic loader resolved on the build
//!   machine (glibc's `libc.so.6`, `libm`, `libgcc_s`, the loader itself, `libseccomp` for
//!   Debian's runc, libacl/libattr/libselinux/libpcre2 for cp), found with `ldd` (glibc's loader
//!   lists them: no guessing);
//! - `/etc/passwd` and `/etc/group` with root and nobody (group names for `--group`), empty
//!   `/tmp` (1777), `/run`, `/root`, `/etc/buildkit` (where `buildkitd.toml` is read from by
//!   default) and `/var/lib/berth` (berthd's default root, a volume).
//!
//! Every entry gets the same modification time (`SOURCE_DATE_EPOCH`), so identical binaries
//! give an identical layer.

use anyhow::{bail, Context};
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One binary to install.
#[derive(Debug, Clone)]
pub struct Binary {
    /// Where it is on this machine.
    pub source: PathBuf,
    /// Its path in the image (absolute).
    pub dest: &'static str,
    /// Strip symbols and debug info.
    pub strip: bool,
}

/// Files the staged tree holds, for the build's summary.
#[derive(Debug, Default)]
pub struct Staged {
    /// Image paths of the binaries.
    pub binaries: Vec<String>,
    /// Image paths of the shared libraries.
    pub libraries: Vec<String>,
}

/// The shared objects `ldd` lists for `binary` (absolute paths; the vDSO has none).
pub fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("run ldd (glibc's libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static binary: "not a dynamic executable" on stderr.
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("not a dynamic executable") || text.contains("statically linked") {
            return Ok(vec![]);
        }
        bail!("ldd {}: {}", binary.display(), err.trim());
    }
    parse_ldd(&text).with_context(|| format!("ldd {}", binary.display()))
}

/// Parses ldd's listing: `name => /path (0x…)`, `/path (0x…)`, `linux-vdso.so.1 (0x…)`.
fn parse_ldd(text: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not found") {
            bail!("missing library: {line}");
        }
        if line.contains("statically linked") {
            continue;
        }
        let target = match line.split_once("=>") {
            Some((_, rhs)) => rhs.trim(),
            None => line,
        };
        let path = target.split_whitespace().next().unwrap_or_default();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

fn inside(root: &Path, image_path: &str) -> PathBuf {
    root.join(image_path.trim_start_matches('/'))
}

fn copy_file(src: &Path, dest: &Path, strip: bool) -> anyhow::Result<()> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    let mode = std::fs::metadata(src)
        .with_context(|| format!("stat {}", src.display()))?
        .permissions()
        .mode()
        & 0o7777;
    if strip {
        // binutils' strip (present wherever cargo can link).
        let out = Command::new("strip")
            .arg("--strip-all")
            .arg("-o")
            .arg(dest)
            .arg(src)
            .output()
            .context("run strip (binutils)")?;
        if !out.status.success() {
            bail!(
                "strip {}: {}",
                src.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    } else {
        std::fs::copy(src, dest)
            .with_context(|| format!("copy {} to {}", src.display(), dest.display()))?;
    }
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", dest.display()))?;
    Ok(())
}

fn write(root: &Path, image_path: &str, text: &str, mode: u32) -> anyhow::Result<()> {
    let p = inside(root, image_path);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&p, text).with_context(|| format!("write {}", p.display()))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn dir(root: &Path, image_path: &str, mode: u32) -> anyhow::Result<()> {
    let p = inside(root, image_path);
    std::fs::create_dir_all(&p).with_context(|| format!("create {}", p.display()))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Sets every entry's times to `epoch` (symlinks themselves, not their targets).
fn clamp_times(root: &Path, epoch: i64) -> anyhow::Result<()> {
    use rustix::fs::{utimensat, AtFlags, Timespec, Timestamps, CWD};
    let t = Timespec {
        tv_sec: epoch,
        tv_nsec: 0,
    };
    let times = Timestamps {
        last_access: t,
        last_modification: t,
    };
    let mut stack = vec![root.to_path_buf()];
    let mut all = vec![];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let e = e?;
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            }
            all.push(e.path());
        }
    }
    // Setting an entry's times does not touch its directory's mtime: any order works.
    all.push(root.to_path_buf());
    for p in all {
        utimensat(CWD, &p, &times, AtFlags::SYMLINK_NOFOLLOW)
            .with_context(|| format!("set times of {}", p.display()))?;
    }
    Ok(())
}

/// Stages the tree in `root` (which must not exist yet).
pub fn stage(root: &Path, binaries: &[Binary], epoch: i64) -> anyhow::Result<Staged> {
    std::fs::create_dir(root).with_context(|| format!("create {}", root.display()))?;
    let mut staged = Staged::default();
    let mut libs = BTreeSet::new();
    for b in binaries {
        copy_file(&b.source, &inside(root, b.dest), b.strip)?;
        staged.binaries.push(b.dest.to_string());
        libs.extend(shared_libraries(&b.source)?);
    }
    for lib in &libs {
        let image_path = lib.to_str().context("library path is not UTF-8")?;
        // The real file behind the loader's path (Debian's are symlinks to versioned names).
        copy_file(
            &std::fs::canonicalize(lib)?,
            &inside(root, image_path),
            false,
        )?;
        staged.libraries.push(image_path.to_string());
    }
    std::os::unix::fs::symlink("buildkitd", inside(root, "/usr/bin/berthd"))
        .context("symlink /usr/bin/berthd")?;
    write(
        root,
        "/etc/passwd",
        "root:x:0:0:root:/root:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        0o644,
    )?;
    write(root, "/etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644)?;
    for (d, mode) in [
        ("/tmp", 0o1777),
        ("/run", 0o755),
        ("/root", 0o700),
        ("/etc/buildkit", 0o755),
        ("/var/lib/berth", 0o711),
    ] {
        dir(root, d, mode)?;
    }
    clamp_times(root, epoch)?;
    Ok(staged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ldd_listing() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibseccomp.so.2 => /lib/x86_64-linux-gnu/libseccomp.so.2 (0x00007f71)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f71)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f71)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libseccomp.so.2"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
    }
}
