//! Base images of a **stopped** dockerd, resolved from its data root alone (no Engine API).
//!
//! [`resolve_offline_image`] finds an image the way dockerd 20.10's `ImageService.GetImage` does
//! (`v20.10.24:daemon/images/image.go`, `reference/store.go`, `image/store.go` `Search`):
//! 1. a full ID (`sha256:<64 hex>` or the bare 64 hex digits) names an `imagedb` entry;
//! 2. otherwise the reference is normalised (`busybox` → `docker.io/library/busybox:latest`;
//!    `name:tag@digest` looks up by digest only) and looked up in `repositories.json` under its
//!    familiar name (`busybox`, `busybox:latest`, `name@sha256:…`);
//! 3. failing that, the string is taken as a unique ID prefix (`3f57`, `sha256:3f57`), as
//!    `docker image inspect` accepts; a prefix of several images is an error.
//!
//! The result is the same [`BaseImage`] the live path returns (imagedb config → diffIDs →
//! chainIDs → layerdb `cache-id` → `<driver>/<cache-id>/diff`, through [`DockerStore`]), so
//! snapshots, `ResolveImageConfig` and the exporter treat it exactly like a live image.
//!
//! Reading only: nothing here creates, locks or rewrites a file of the data root, so it is safe
//! whether or not a daemon has started meanwhile. Keeping the layers alive is the caller's job
//! (no daemon, nothing deletes them; see the worker's image source for a daemon started
//! mid-build).

use std::path::Path;

use super::live::BaseImage;
use super::reader::read_small;
use super::{DockerStore, StorageDriver};
use crate::tar::{chain_ids, Digest};
use crate::{Error, Result};

/// The storage driver of a stopped daemon's data root: the one whose `image/<driver>/layerdb`
/// exists (`overlay2` when neither or both do).
pub fn offline_driver(data_root: &Path) -> StorageDriver {
    if data_root.join("image/fuse-overlayfs/layerdb").is_dir()
        && !data_root.join("image/overlay2/layerdb").is_dir()
    {
        StorageDriver::FuseOverlayfs
    } else {
        StorageDriver::Overlay2
    }
}

/// A reference as dockerd parses it (`reference.ParseAnyReference`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Parsed {
    /// A full image ID.
    Id(Digest),
    /// A name: `(familiar name, familiar reference)` as `repositories.json` keys it.
    Named(String, String),
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// One path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'a'..=b'z' | b'0'..=b'9' => i += 1,
            b'.' => i += 1,
            b'_' if b.get(i + 1) == Some(&b'_') => i += 2,
            b'_' => i += 1,
            b'-' => {
                while b.get(i) == Some(&b'-') {
                    i += 1;
                }
                if !b.get(i).is_some_and(u8::is_ascii_alphanumeric) {
                    return false;
                }
                continue;
            }
            _ => return false,
        }
        // A separator must be followed by an alphanumeric.
        if matches!(b[i - 1], b'.' | b'_' | b'-')
            && !b.get(i).is_some_and(u8::is_ascii_alphanumeric)
        {
            return false;
        }
    }
    true
}

fn valid_domain(d: &str) -> bool {
    let (host, port) = match d.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    let host_ok = !host.is_empty()
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    host_ok && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn valid_digest(d: &str) -> bool {
    match d.split_once(':') {
        Some((alg, hex)) => {
            !alg.is_empty()
                && alg
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && hex.len() >= 32
                && is_hex(hex)
        }
        None => false,
    }
}

/// Parses `reference` as dockerd does: a full ID, or a normalised name with its familiar forms.
fn parse(reference: &str) -> Result<Parsed> {
    let invalid = || Error::InvalidImageReference {
        reference: reference.to_string(),
    };
    if reference.len() == 64 && is_hex(reference) {
        return Ok(Parsed::Id(format!("sha256:{reference}").parse()?));
    }
    if let Some(hex) = reference.strip_prefix("sha256:") {
        if hex.len() == 64 && is_hex(hex) {
            return Ok(Parsed::Id(reference.parse()?));
        }
    }
    let (rest, digest) = match reference.split_once('@') {
        Some((n, d)) if valid_digest(d) => (n, Some(d)),
        Some(_) => return Err(invalid()),
        None => (reference, None),
    };
    let (name, tag) = match rest.rfind(':') {
        Some(i) if !rest[i + 1..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if tag.is_some_and(|t| !valid_tag(t)) {
        return Err(invalid());
    }
    // splitDockerDomain
    let (mut domain, mut path) = match name.split_once('/') {
        Some((d, p)) if d.contains('.') || d.contains(':') || d == "localhost" => {
            (d.to_string(), p.to_string())
        }
        _ => ("docker.io".to_string(), name.to_string()),
    };
    if domain == "index.docker.io" {
        domain = "docker.io".into();
    }
    if domain == "docker.io" && !path.contains('/') {
        path = format!("library/{path}");
    }
    if !valid_domain(&domain) || !path.split('/').all(valid_component) {
        return Err(invalid());
    }
    if path.len() + domain.len() + 1 > 255 {
        return Err(invalid());
    }
    // FamiliarName: docker.io and a lone library/ are implied.
    let familiar = if domain == "docker.io" {
        match path.strip_prefix("library/") {
            Some(r) if !r.contains('/') => r.to_string(),
            _ => path.clone(),
        }
    } else {
        format!("{domain}/{path}")
    };
    // A digest wins over a tag; no tag and no digest means `latest`.
    let full = match (digest, tag) {
        (Some(d), _) => format!("{familiar}@{d}"),
        (None, Some(t)) => format!("{familiar}:{t}"),
        (None, None) => format!("{familiar}:latest"),
    };
    Ok(Parsed::Named(familiar, full))
}

impl DockerStore {
    fn repositories(&self) -> Result<serde_json::Map<String, serde_json::Value>> {
        let path = self.image_dir().join("repositories.json");
        let Some(text) = read_small(&path)? else {
            return Ok(Default::default());
        };
        let doc: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::BadDockerStoreFile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        match doc.get("Repositories") {
            Some(serde_json::Value::Object(m)) => Ok(m.clone()),
            None | Some(serde_json::Value::Null) => Ok(Default::default()),
            Some(_) => Err(Error::BadDockerStoreFile {
                path,
                reason: "Repositories is not an object".into(),
            }),
        }
    }

    fn has_image(&self, id: &Digest) -> bool {
        self.image_dir()
            .join("imagedb/content/sha256")
            .join(id.hex())
            .is_file()
    }

    /// The IDs of imagedb entries starting with `prefix` (hex digits).
    fn ids_with_prefix(&self, prefix: &str) -> Result<Vec<Digest>> {
        let dir = self.image_dir().join("imagedb/content/sha256");
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(source) => {
                return Err(Error::Io {
                    op: "read dir",
                    path: dir,
                    source,
                })
            }
        };
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(|source| Error::Io {
                op: "read dir",
                path: dir.clone(),
                source,
            })?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.len() == 64 && is_hex(name) && name.starts_with(prefix) {
                out.push(format!("sha256:{name}").parse()?);
            }
        }
        Ok(out)
    }

    /// The image ID `reference` names in this (stopped daemon's) data root, resolved as dockerd
    /// does (module docs); `None` if it names no image. Reads only.
    pub fn lookup_image(&self, reference: &str) -> Result<Option<Digest>> {
        let named = match parse(reference) {
            Ok(Parsed::Id(id)) => return Ok(self.has_image(&id).then_some(id)),
            Ok(Parsed::Named(name, full)) => Some((name, full)),
            // Not a valid name: may still be an ID prefix (dockerd searches the raw string).
            Err(_) => None,
        };
        if let Some((name, full)) = &named {
            let repos = self.repositories()?;
            let hit = repos
                .get(name)
                .and_then(|r| r.get(full))
                .and_then(|v| v.as_str());
            if let Some(id) = hit {
                let id: Digest = id.parse().map_err(|_| Error::BadDockerStoreFile {
                    path: self.image_dir().join("repositories.json"),
                    reason: format!("{full} points to {id:?}, not an image ID"),
                })?;
                if self.has_image(&id) {
                    return Ok(Some(id));
                }
            }
        }
        let prefix = reference.strip_prefix("sha256:").unwrap_or(reference);
        if !is_hex(prefix) {
            return match named {
                Some(_) => Ok(None),
                None => Err(Error::InvalidImageReference {
                    reference: reference.to_string(),
                }),
            };
        }
        let mut ids = self.ids_with_prefix(prefix)?;
        match ids.len() {
            0 => Ok(None),
            1 => Ok(ids.pop()),
            _ => Err(Error::AmbiguousImageId {
                prefix: reference.to_string(),
                data_root: self.data_root().to_path_buf(),
            }),
        }
    }

    /// The repository digests (`name@sha256:…` keys of `repositories.json`) pointing at `id`,
    /// as `docker image inspect` reports them in `RepoDigests`.
    pub fn repo_digests(&self, id: &Digest) -> Result<Vec<String>> {
        let want = id.to_string();
        let mut out = Vec::new();
        for (_, refs) in self.repositories()? {
            let Some(refs) = refs.as_object() else {
                continue;
            };
            for (r, target) in refs {
                if r.contains('@') && target.as_str() == Some(want.as_str()) {
                    out.push(r.clone());
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Resolves `reference` (a name, a full ID or a unique ID prefix) in the data root of a stopped
/// dockerd and maps its layers to their directories: the [`BaseImage`] the live
/// [`super::resolve_base_image`] would return. A missing image is
/// [`Error::DockerImageNotFound`]. Reads only.
pub fn resolve_offline_image(store: &DockerStore, reference: &str) -> Result<BaseImage> {
    let id = store
        .lookup_image(reference)?
        .ok_or_else(|| Error::DockerImageNotFound {
            reference: reference.to_string(),
            data_root: store.data_root().to_path_buf(),
        })?;
    let config = store.image_config(&id)?;
    let diff_ids = DockerStore::config_diff_ids(&config)?;
    let entries = store.layers_for_diff_ids(&diff_ids)?;
    Ok(BaseImage {
        id,
        chain_ids: chain_ids(&diff_ids),
        diff_ids,
        layer_dirs: entries.into_iter().map(|e| e.diff_dir).collect(),
        config,
        driver: store.driver(),
    })
}

#[cfg(test)]
mod tests {
    use super::{parse, Parsed};

    fn named(r: &str) -> (String, String) {
        match parse(r).unwrap_or_else(|e| panic!("{r}: {e}")) {
            Parsed::Named(n, f) => (n, f),
            Parsed::Id(id) => panic!("{r}: parsed as id {id}"),
        }
    }

    #[test]
    fn familiar_names_as_dockerd_keys_them() {
        let d = "sha256:".to_string() + &"ab".repeat(32);
        for (r, name, full) in [
            ("busybox", "busybox", "busybox:latest"),
            ("busybox:1.36", "busybox", "busybox:1.36"),
            (
                "docker.io/library/busybox:latest",
                "busybox",
                "busybox:latest",
            ),
            (
                "index.docker.io/library/busybox",
                "busybox",
                "busybox:latest",
            ),
            ("library/busybox", "busybox", "busybox:latest"),
            ("docker.io/foo/bar:x", "foo/bar", "foo/bar:x"),
            ("docker.io/library/a/b", "library/a/b", "library/a/b:latest"),
            ("localhost/x", "localhost/x", "localhost/x:latest"),
            (
                "127.0.0.1:5000/a/b:c",
                "127.0.0.1:5000/a/b",
                "127.0.0.1:5000/a/b:c",
            ),
            (
                "berth-test/busybox:base-1",
                "berth-test/busybox",
                "berth-test/busybox:base-1",
            ),
            ("a__b.c-d", "a__b.c-d", "a__b.c-d:latest"),
        ] {
            assert_eq!(named(r), (name.to_string(), full.to_string()), "{r}");
        }
        // A digest wins over a tag.
        assert_eq!(
            named(&format!("busybox:1@{d}")),
            ("busybox".into(), format!("busybox@{d}"))
        );
        assert_eq!(
            named(&format!("docker.io/library/busybox@{d}")),
            ("busybox".into(), format!("busybox@{d}"))
        );
    }

    #[test]
    fn ids_and_bad_names() {
        let hex = "0123456789abcdef".repeat(4);
        let id: crate::tar::Digest = format!("sha256:{hex}").parse().unwrap();
        assert_eq!(parse(&hex).unwrap(), Parsed::Id(id));
        assert_eq!(parse(&format!("sha256:{hex}")).unwrap(), Parsed::Id(id));
        // Short prefixes are names to dockerd's parser (then searched as IDs).
        assert!(matches!(parse("0123ab").unwrap(), Parsed::Named(..)));
        for bad in [
            "",
            "Busybox",
            "a//b",
            "a/",
            "-a",
            "a-",
            "a:",
            "a:-x",
            "a@sha256:xyz",
            "a@",
            "a b",
            "a..b",
            "a___b",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
