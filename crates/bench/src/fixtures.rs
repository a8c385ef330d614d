//! Fixtures made on this machine: incompressible data from a seeded PRNG, base images streamed
//! straight into `docker load` (never held in RAM, never pulled), and client directories.
//!
//! Every image made here is tagged `berth-bench/...` and every directory lives under the run's
//! own scratch dir, so the cleanup in `main` removes exactly what this run created.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context as _, Result};

/// xorshift64*: fast, seeded, and its output does not compress (which is all a fixture needs).
pub struct Prng(u64);

impl Prng {
    /// A generator for `seed` (any value; zero is remapped).
    pub fn new(seed: u64) -> Self {
        Prng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let v = self.next().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&v[..n]);
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

const BLOCK: u64 = 512;
const FILE_CHUNK: u64 = 64 << 20;

fn padded(n: u64) -> u64 {
    n.div_ceil(BLOCK) * BLOCK
}

fn header(path: &str, size: u64, kind: tar::EntryType, mode: u32) -> Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path)
        .with_context(|| format!("tar path {path}"))?;
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(1_700_000_000);
    h.set_entry_type(kind);
    h.set_cksum();
    Ok(h)
}

/// Writes a zero padding up to the next 512-byte boundary after `n` bytes.
fn pad(out: &mut dyn Write, n: u64) -> std::io::Result<()> {
    let p = (padded(n) - n) as usize;
    out.write_all(&[0u8; BLOCK as usize][..p])
}

/// Writes tar entries holding `bytes` of PRNG data under `data/` in 64 MiB files, then the end
/// of the archive, streaming.
fn write_data_layer(out: &mut dyn Write, bytes: u64, seed: u64) -> Result<()> {
    let mut rng = Prng::new(seed);
    out.write_all(header("data/", 0, tar::EntryType::Directory, 0o755)?.as_bytes())?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut left, mut i) = (bytes, 0);
    while left > 0 {
        let n = left.min(FILE_CHUNK);
        let h = header(
            &format!("data/blob-{i:05}"),
            n,
            tar::EntryType::Regular,
            0o644,
        )?;
        out.write_all(h.as_bytes())?;
        let mut rem = n;
        while rem > 0 {
            let k = rem.min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..k]);
            out.write_all(&buf[..k])?;
            rem -= k as u64;
        }
        pad(out, n)?;
        left -= n;
        i += 1;
    }
    out.write_all(&[0u8; 2 * BLOCK as usize])?;
    Ok(())
}

/// A static busybox layer (`/bin/busybox` of the host, with `sh`, `true` and `cat` links).
pub fn busybox_layer() -> Result<Vec<u8>> {
    let busybox = std::fs::read("/bin/busybox")
        .context("read /bin/busybox (install busybox-static): the base images are made from it")?;
    let mut b = tar::Builder::new(Vec::new());
    b.append(
        &header("bin/", 0, tar::EntryType::Directory, 0o755)?,
        std::io::empty(),
    )?;
    b.append(
        &header(
            "bin/busybox",
            busybox.len() as u64,
            tar::EntryType::Regular,
            0o755,
        )?,
        &busybox[..],
    )?;
    for app in ["sh", "true", "cat"] {
        let mut l = header(&format!("bin/{app}"), 0, tar::EntryType::Symlink, 0o777)?;
        l.set_link_name("busybox")?;
        l.set_cksum();
        b.append(&l, std::io::empty())?;
    }
    b.append(
        &header("tmp/", 0, tar::EntryType::Directory, 0o1777)?,
        std::io::empty(),
    )?;
    Ok(b.into_inner()?)
}

/// The image config every bench image starts from.
pub const BASE_CONFIG: &str =
    r#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Cmd":["/bin/sh"]}}"#;

/// Writes the base image's single layer: busybox, then `data_bytes` of PRNG data.
fn write_base_layer(out: &mut dyn Write, data_bytes: u64, seed: u64) -> Result<()> {
    let bb = busybox_layer()?;
    // The busybox tar without its two end-of-archive blocks.
    out.write_all(&bb[..bb.len() - 2 * BLOCK as usize])?;
    write_data_layer(out, data_bytes, seed)
}

/// Makes a base image `tag` of busybox plus `data_bytes` of incompressible data in one layer by
/// streaming its tar into `docker import` (`POST /images/create?fromSrc=-`): dockerd registers the
/// layer straight from the stream, with no temporary copy. `host` is a `-H` address for a daemon
/// other than the default one. Returns the image ID.
pub fn load_base_image(
    host: Option<&str>,
    tag: &str,
    data_bytes: u64,
    seed: u64,
) -> Result<String> {
    let mut cmd = Command::new("docker");
    if let Some(h) = host {
        cmd.args(["-H", h]);
    }
    let mut child = cmd
        .args(["import", "--change", "ENV PATH=/bin", "-", tag])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run docker import")?;
    let stdin = child.stdin.take().context("docker import stdin")?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, stdin);
    let written = write_base_layer(&mut out, data_bytes, seed).and_then(|()| Ok(out.flush()?));
    drop(out);
    let res = child.wait_with_output()?;
    if !res.status.success() {
        bail!(
            "docker import of {tag} failed: {}",
            String::from_utf8_lossy(&res.stderr).trim()
        );
    }
    written?;
    let id = String::from_utf8_lossy(&res.stdout).trim().to_string();
    ensure!(
        id.starts_with("sha256:"),
        "docker import printed {id:?}, not an image ID"
    );
    Ok(id)
}

/// Writes `bytes` of PRNG data into the single file `path`.
pub fn write_blob(path: &Path, bytes: u64, seed: u64) -> Result<()> {
    let mut f = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?,
    );
    let mut rng = Prng::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..k]);
        f.write_all(&buf[..k])?;
        left -= k as u64;
    }
    f.flush()?;
    Ok(())
}

/// Writes a tree of `files` files totalling about `bytes`, 100 files per directory.
pub fn write_tree(root: &Path, files: u64, bytes: u64, seed: u64) -> Result<()> {
    let per = bytes / files;
    let mut rng = Prng::new(seed);
    let mut buf = vec![0u8; per as usize];
    for i in 0..files {
        let dir = root.join(format!("d{:04}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir_all(&dir)?;
        }
        rng.fill(&mut buf);
        std::fs::write(dir.join(format!("f{i:06}")), &buf)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_layer_is_a_tar_of_busybox_and_the_data() {
        for bytes in [1, 511, 512, 513, FILE_CHUNK + 7] {
            let mut v = Vec::new();
            write_base_layer(&mut v, bytes, 7).unwrap();
            let mut a = tar::Archive::new(&v[..]);
            let (mut data, mut names) = (0, vec![]);
            for e in a.entries().unwrap() {
                let e = e.unwrap();
                let name = e.path().unwrap().to_string_lossy().into_owned();
                if name.starts_with("data/") {
                    data += e.size();
                }
                names.push(name);
            }
            assert_eq!(data, bytes);
            assert!(names.contains(&"bin/busybox".to_string()), "{names:?}");
            assert!(names.contains(&"bin/true".to_string()), "{names:?}");
            assert_eq!(v.len() % 512, 0);
        }
    }

    #[test]
    fn prng_output_is_seeded_and_does_not_repeat() {
        let (mut a, mut b, mut c) = (Prng::new(1), Prng::new(1), Prng::new(2));
        let (mut x, mut y, mut z) = (vec![0u8; 4099], vec![0u8; 4099], vec![0u8; 4099]);
        a.fill(&mut x);
        b.fill(&mut y);
        c.fill(&mut z);
        assert_eq!(x, y);
        assert_ne!(x, z);
        assert_ne!(x[..2048], x[2048..4096]);
    }
}
