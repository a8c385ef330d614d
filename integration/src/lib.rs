//! Test support for berth's end-to-end tests: real Docker Engines, base images made without any
//! registry, and a local registry.
//!
//! What this crate owns:
//! - [`DockerEngine`]: a connection to one Docker Engine (the system one on `/var/run/docker.sock`
//!   or `DOCKER_HOST`, or a [`PrivateDockerd`]) with the few calls tests need: run a container to
//!   completion ([`DockerEngine::run`]), inspect, tag, push and remove images.
//! - [`PrivateDockerd`]: a throwaway dockerd (and its own containerd) on temporary data/exec roots,
//!   which tests may stop, modify on disk and start again. It never touches the system daemon.
//! - [`busybox_image`] and [`multi_layer_image`]: base images built from Debian's `busybox-static`
//!   and imported with `POST /images/create?fromSrc=-`; no registry is ever contacted. Each is a
//!   [`TestImage`] that removes its own tag when dropped.
//! - [`PrivateContainerd`]: a throwaway containerd on its own socket, with `ctr` helpers.
//! - [`Registry`]: Debian's `docker-registry` on a free 127.0.0.1 port with temporary storage.
//! - [`require_root`] and [`require_tool`]: precondition checks that panic with a clear message.
//!   Nothing here skips silently: a test that cannot run fails.
//!
//! Lifecycles (start/stop of processes) are synchronous so that they also run in `Drop`, even when
//! a test panics; Engine API calls are async (bollard) and need a tokio runtime
//! (`#[tokio::test]`). Every name this crate makes (image tags, containers, temp dirs) comes from
//! [`unique_name`], so tests running in parallel, in one process or several, never collide.
//!
//! Errors are `anyhow` (this is test code); each names the daemon, image or path concerned.
//!
//! ```no_run
//! use integration::{busybox_image, require_root, DockerEngine, PrivateDockerd, Registry};
//!
//! # async fn example() -> anyhow::Result<()> {
//! require_root();
//! // The system daemon: import a base image, run it, inspect it.
//! let engine = DockerEngine::system()?;
//! let image = busybox_image(&engine).await?; // removed again when `image` drops
//! let out = engine.run(image.reference(), &["sh", "-c", "echo hi"]).await?;
//! assert_eq!(out.assert_success().stdout, "hi\n");
//!
//! // A daemon of our own, stopped, edited on disk and restarted.
//! let mut daemon = PrivateDockerd::new(Default::default())?;
//! let private_image = busybox_image(daemon.engine()).await?;
//! daemon.stop()?;
//! let _layerdb = daemon.data_root().join("image/overlay2/layerdb");
//! daemon.start()?;
//!
//! // A registry on 127.0.0.1.
//! let registry = Registry::start()?;
//! let pushed = image.tag_as(&format!("{}/demo/busybox:v1", registry.addr())).await?;
//! engine.push(pushed.reference()).await?;
//! assert_eq!(registry.tags("demo/busybox")?, ["v1"]);
//! # drop(private_image);
//! # Ok(())
//! # }
//! ```

pub mod buildkit_client;
mod buildx;
mod certs;
mod containerd;
mod engine;
mod http;
mod images;
mod moto;
mod precheck;
mod private_dockerd;
mod process;
mod registry;

pub use bollard;
pub use buildx::BuildxBuilder;
pub use certs::make_certs;
pub use containerd::PrivateContainerd;
pub use engine::{DockerEngine, Output, RunOptions, MIN_API_VERSION};
pub use http::{http_get, HttpResponse};
pub use images::{
    busybox_image, multi_layer_image, program_image, TestImage, MULTI_LAYER_ABSENT,
    MULTI_LAYER_FILES,
};
pub use moto::MotoS3;
pub use precheck::{require_root, require_tool};
pub use private_dockerd::{PrivateDockerd, PrivateDockerdOptions, TRIXIE_ROOT};
pub use process::git;
pub use registry::Registry;

/// Every regular file of the tar archive at `path`, by its path in the archive (tests read
/// exported archives with it).
pub fn tar_files(path: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    use std::io::Read;
    let mut out = std::collections::BTreeMap::new();
    let mut ar = tar::Archive::new(std::fs::File::open(path).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let p = e.path().unwrap().to_string_lossy().into_owned();
        let mut v = Vec::new();
        e.read_to_end(&mut v).unwrap();
        out.insert(p, v);
    }
    out
}

/// A name unique to this process and call: `<prefix>-<pid>-<8 random hex digits>`.
///
/// Lowercase ASCII only when `prefix` is, so it is valid as a Docker repository path component,
/// tag, container name or file name.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

#[cfg(test)]
mod tests {
    use super::unique_name;

    #[test]
    fn unique_names_differ_and_carry_pid() {
        let a = unique_name("x");
        let b = unique_name("x");
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("x-{}-", std::process::id())), "{a}");
        assert_eq!(a.len(), b.len());
    }
}
