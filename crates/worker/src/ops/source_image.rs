//! `docker-image://` sources: base images used in place from the Docker Engine
//! (`source/containerimage/pull.go` in moby/buildkit v0.11.6, with Docker's store instead of
//! containerd's content store).
//!
//! Resolution (`image.resolvemode`):
//! * `default`: use the image if the Engine has it (`GET /images/{ref}/json`), else pull it;
//! * `pull`: always resolve the reference in its registry first (gets a newer image behind a
//!   moved tag; downloads nothing when the Engine already has that image ID);
//! * `local`: only what the Engine has; missing is a `NotFound` error.
//!
//! Pulls go through berth's registry client (`registry` crate: buildkitd.toml's mirrors, TLS and
//! auth, the session's credentials and tokens) and register the image in the Engine once
//! ([`super::image_pull`]: thin load of verified blobs, one download for concurrent builds,
//! per-layer progress), then tag it as the reference, as `docker pull` would. Each pulled
//! layer's registry descriptor is recorded in the blob cache (pushes keep foreign and
//! uncompressed layers as they were); for an image Docker already had, the descriptors are
//! looked up once, bounded by [`LEARN_TIMEOUT`], when berth has none (failures ignored).
//!
//! The image is then pinned by ID for the rest of the build (a running pin container shared by
//! the builds that use the image, see [`layerstore::dockerstore::pin_image`], labelled with
//! instance `worker:<root>`; the build's result holds the pin until it is dropped, i.e. after
//! the export, and pins left by a crashed process are removed on the first image resolution of
//! the next one) and its layer directories are read from Docker's layerdb. The result is a
//! committed snapshot whose chain *is* those directories: nothing is pulled into berth, nothing
//! copied. When the build ends (either way) [`BaseImages::check`] makes sure those directories
//! are all still there; if the pin could not hold (removed by force, dockerd restarted, then
//! the image deleted) the build fails with an error naming the image and what removed it.
//! The pin is created and started in the background
//! ([`layerstore::dockerstore::pin_image_in_background`]): the build's steps read the layers
//! meanwhile, and what they make is kept (cached, handed to later steps) only once
//! [`BaseImages::confirm`] says the layers were there all along; a build whose result is read
//! (exported) ends its solve once the pins run. A build whose result nothing reads (no export,
//! or only the image exporter's load into this Docker) neither waits nor pins at once: its pin
//! is made only once it has used the base for [`PIN_DELAY`] (`BERTH_PIN_DELAY_MS`), so short
//! builds make none. A prune may take the image before its pin runs
//! (between the lookup and the pin's creation, or the created pin container and then the image
//! in one `docker system prune`): if that is known before the layers are read, the image is
//! resolved again (pulled, if it can be), once for all the builds that share the base's vertex
//! (they hold the same pin; see `ImageSource::live_layers`); otherwise what was made from it is
//! dropped and the build runs again (`llbsolver::solve_traced`). A pull whose untagged image a
//! prune deletes before the tag is loaded again.
//! `image.layerlimit` keeps only the first N layers.
//!
//! Cache key: the image ID plus the layer directories. The image ID makes a re-tag to a different
//! image re-run every dependent step; the directories make a removed and re-pulled image (same
//! ID, new cache-ids) a miss instead of a cached snapshot whose lower dirs no longer exist.
//! Progress: a `resolve <ref>` status on the vertex.
//!
//! Stopped daemon (`WorkerOptions::docker_data_root` set and the Engine at `docker_host` not
//! answering): the image is resolved from that data root alone, as dockerd would resolve it
//! ([`layerstore::dockerstore::resolve_offline_image`]: `repositories.json`, full IDs, unique ID
//! prefixes), into the same chain of Docker's own layer dirs. A missing image (`default`) or
//! any image with `pull` is pulled by berth straight into that data root
//! ([`super::image_pull::pull_into_data_root`] through `OfflineWriter`); `local` never pulls.
//! Resolution alone writes nothing to the data root. What keeps the
//! layers alive: with no daemon nothing deletes layer dirs (berth's offline writer only ever
//! adds committed layers, its recovery removes only its own unfinished dirs), so no pin is
//! needed; if dockerd is started while the build runs, a watcher notices the Engine answering
//! (polled every [`OFFLINE_WATCH`]) and pins the image by ID through the API at once, like a
//! live resolution, until the build ends. Until it answers, a daemon cannot take `docker rmi`
//! requests. (Writes behind a running daemon are prevented where they happen: the offline
//! exporter refuses a data root a dockerd uses.)
//!
//! Containerd image store (the Engine's `GET /info` reports `driver-type`
//! `io.containerd.snapshotter.v1`, see [`containerdstore::Endpoint::detect`]): the image ID
//! from the Engine (pulls as above) is the manifest or index digest; [`containerdstore::Client::
//! base_image`] narrows it to the op's platform, reads the config from containerd's content
//! store and returns the layers' `overlayfs` snapshot dirs (chainIDs) as the chain, with a lease
//! that holds the image's content and snapshots until the build's graph is dropped (instead of a
//! pin container). The lease is taken before the image is pulled (the pull writes under it) or,
//! for an image the Engine has, before any of it is read (each blob and the top snapshot added
//! before they are looked at), so there is no window for a prune: an image removed between the
//! lookup and its lease, or an index without the op's platform's content, is pulled (again).
//! On the classic store, an image of another platform under the tag is pulled for the op's
//! platform (the tag moves, as with `docker pull --platform`). Leases a killed berthd left are
//! deleted on the first resolution of the next one (and expire after a day).
//!
//! Not carried yet: the image config (the result type has no place for it; the exporter and
//! frontend read it from the Engine, or the stopped data root, by image ID).

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bollard::Docker;
use layerstore::dockerstore::{self, DockerStore, Pin, StorageDriver};
use layerstore::snapshot::{Chain, SnapshotOptions};
use protos::pb::op::Op as OpPayload;

use crate::error::{Error, ErrorKind, Result};
use crate::llbsolver::cache::blocking;
use crate::llbsolver::definition::LoadedOp;
use crate::ops::{image_pull, BuildEnv};
use crate::progress::ProgressEvent;
use crate::result::Snap;
use crate::solver::{Op, OpContext, Solved};

/// Docker API version berth speaks (Docker 20.10's; newer engines accept it).
const API_VERSION: bollard::ClientVersion = bollard::ClientVersion {
    major_version: 1,
    minor_version: 41,
};
/// Timeout of Engine API requests in seconds (pulls of large images take long).
const API_TIMEOUT_SECS: u64 = 3600;
/// How long a `/_ping` may take before the Engine counts as not answering.
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// Longest look at the registry for the layer descriptors of an image Docker already has.
const LEARN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// Longest wait at the end of a solve for a new pin container to run before the result is handed
/// on (an export reads the layers; the start takes 0.3-0.5 s on an idle host, seconds on a loaded
/// one); after it, the build goes on with the created container's weaker protection and the
/// end-of-build check.
const PIN_START_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a build whose result nothing reads, or that is only loaded into this Docker, uses a
/// base image before its pin container is made (see [`dockerstore::pin_image_after`]): a build
/// that ends sooner makes none, so Docker's work of creating and starting a container (about
/// 0.1 s of CPU on the host, which the build would compete with) is spent only on builds long
/// enough for it not to matter. Until the pin runs, every step's result is confirmed before it
/// is kept ([`BaseImages::confirm`]), so a shorter build is as safe as the pin's own start
/// window. Longer than a cached rebuild with an image export takes on an idle host; short
/// next to a prune timer. `BERTH_PIN_DELAY_MS` overrides it (0: pin every build at once).
const PIN_DELAY: std::time::Duration = std::time::Duration::from_millis(250);
/// The environment variable that overrides [`PIN_DELAY`] (milliseconds).
const PIN_DELAY_ENV: &str = "BERTH_PIN_DELAY_MS";

/// [`PIN_DELAY`], or `BERTH_PIN_DELAY_MS` when it is set to a number of milliseconds.
pub(crate) fn pin_delay() -> std::time::Duration {
    static DELAY: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| match std::env::var(PIN_DELAY_ENV) {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(ms) => std::time::Duration::from_millis(ms),
            Err(_) => {
                tracing::warn!(value = %v, "{PIN_DELAY_ENV} is not a number of milliseconds; using {PIN_DELAY:?}");
                PIN_DELAY
            }
        },
        Err(_) => PIN_DELAY,
    })
}
/// How often an offline-resolved build checks whether dockerd has been started (to pin).
const OFFLINE_WATCH: std::time::Duration = std::time::Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResolveMode {
    Default,
    Pull,
    Local,
}

/// The solver op for `op`.
pub(crate) fn new(op: &LoadedOp, env: &Arc<BuildEnv>) -> Result<Arc<dyn Op<Snap>>> {
    let OpPayload::Source(s) = op.payload() else {
        return Err(Error::Internal(
            "source_image::new called with another op".into(),
        ));
    };
    let reference = s
        .identifier
        .strip_prefix("docker-image://")
        .unwrap_or_default()
        .to_string();
    let mode = match s.attrs.get("image.resolvemode").map(String::as_str) {
        None | Some("") | Some("default") => ResolveMode::Default,
        Some("pull") => ResolveMode::Pull,
        Some("local") => ResolveMode::Local,
        Some(other) => {
            return Err(Error::invalid_op(
                &op.digest,
                format!("invalid image.resolvemode {other:?}"),
            ))
        }
    };
    let layer_limit = match s.attrs.get("image.layerlimit") {
        None => None,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                return Err(Error::invalid_op(
                    &op.digest,
                    format!("invalid layer limit {v}: image.layerlimit must be an integer > 0"),
                ))
            }
        },
    };
    let platform = op.op.platform.as_ref().map(|p| {
        let mut s = format!("{}/{}", p.os, p.architecture);
        if !p.variant.is_empty() {
            s.push('/');
            s.push_str(&p.variant);
        }
        s
    });
    Ok(Arc::new(ImageSource {
        reference,
        mode,
        layer_limit,
        platform,
        env: env.clone(),
        resolved: tokio::sync::OnceCell::new(),
        manifest: std::sync::OnceLock::new(),
    }))
}

/// The digest among Docker's repository digests of an image (`name@sha256:…`) that belongs to
/// `reference`'s repository.
fn repo_digest(reference: &str, repo_digests: Option<&[String]>) -> Option<String> {
    let want = registry::Reference::parse(reference).ok()?.name();
    repo_digests?.iter().find_map(|rd| {
        let r = registry::Reference::parse(rd).ok()?;
        let d = r.digest()?;
        (r.name() == want).then(|| d.to_string())
    })
}

/// The base images a build uses in place from the live Docker Engine, each with its pin (see
/// [`layerstore::dockerstore::Pin`]), and the containerd leases of the bases it uses from the
/// Engine's containerd image store; shared by the build's ops and its result, so the bases stay
/// held until the result is exported and dropped, not only while the source op lives (a
/// `docker image prune` between the solve and the export could otherwise let containerd's GC take
/// the layers the result is made of).
#[derive(Default)]
pub(crate) struct BaseImages {
    held: std::sync::Mutex<Vec<HeldBase>>,
    leases: std::sync::Mutex<Vec<Arc<containerdstore::BaseLease>>>,
}

struct HeldBase {
    reference: String,
    layer_dirs: Vec<std::path::PathBuf>,
    pin: Pin,
    /// The image's record in Docker's imagedb (`imagedb/content/sha256/<id>`).
    record: std::path::PathBuf,
}

/// A base as it stands now (see [`BaseImages::current`]): reference, layer dirs, pin, and the
/// image's imagedb record (`None` for a base resolved again).
type Current = (
    String,
    Vec<std::path::PathBuf>,
    Pin,
    Option<std::path::PathBuf>,
);

impl BaseImages {
    fn add(
        &self,
        reference: &str,
        image: &dockerstore::BaseImage,
        pin: Pin,
        record: std::path::PathBuf,
    ) {
        self.held.lock().unwrap().push(HeldBase {
            reference: reference.to_string(),
            layer_dirs: image.layer_dirs.clone(),
            pin,
            record,
        });
    }

    /// Holds a containerd-store base's lease for as long as the build's result lives.
    fn add_lease(&self, lease: Arc<containerdstore::BaseLease>) {
        let mut leases = self.leases.lock().unwrap();
        if !leases.iter().any(|l| l.id() == lease.id()) {
            leases.push(lease);
        }
    }

    /// The bases held, each as it stands now: a base that was resolved again (by this build or
    /// by another one whose work on the same base vertex this build shares, see
    /// `ImageSource::live_layers`) as the image and pin resolved again.
    fn current(&self) -> Vec<Current> {
        self.held
            .lock()
            .unwrap()
            .iter()
            .map(|h| match h.pin.latest() {
                (pin, Some(image)) => (h.reference.clone(), image.layer_dirs, pin, None),
                (pin, None) => (
                    h.reference.clone(),
                    h.layer_dirs.clone(),
                    pin,
                    Some(h.record.clone()),
                ),
            })
            .collect()
    }

    /// Waits until each base's pin runs (bounded by [`PIN_START_WAIT`]).
    pub(crate) async fn wait_running(&self) {
        let pins: Vec<Pin> = self.current().into_iter().map(|(_, _, p, _)| p).collect();
        for p in pins {
            if !p.wait_running(PIN_START_WAIT).await {
                tracing::warn!(
                    image = p.image(),
                    "pin container not running; the image is protected by a created container only"
                );
            }
        }
    }

    /// Before anything a step made from the bases is kept (saved in berth's cache, handed to the
    /// steps after it): makes sure every base's layers were there all along, since the step may
    /// have read them before the base's pin ran (pins start in the background, see
    /// [`dockerstore::pin_image_in_background`]). No Docker round trip: once a pin holds (it
    /// runs and was never lost) nothing could delete the image without force since the pin was
    /// created; before, the image's record in Docker's imagedb tells, as dockerd deletes an
    /// image's record before it releases (deletes) its layers (`image/store.go` `Delete` in moby
    /// v20.10): record there now, so no deletion had begun when the step read the layers. The
    /// layer dirs, named at random by Docker when it stores a layer, being there too shows they
    /// are the ones that were read (an image deleted and stored again has new ones). Otherwise
    /// asks dockerd ([`Pin::check`]). A base that went gives the error naming it (the build is
    /// then run again if the pin had not run yet, see [`BaseImages::lost_before_pinned`]).
    pub(crate) async fn confirm(&self) -> Result<()> {
        for (reference, dirs, pin, record) in self.current() {
            let dirs_there = || dirs.iter().all(|d| d.is_dir());
            if pin.holding() && dirs_there() {
                continue;
            }
            // Record first, dirs after (the order dockerd deletes them in, reversed).
            if record.is_some_and(|r| r.is_file()) && dirs_there() {
                continue;
            }
            pin.check(&reference, &dirs).await.map_err(lost_err)?;
        }
        Ok(())
    }

    /// A base whose layers are gone although no container of its pin ever ran (a routine
    /// cleanup in the window between the base's resolution and its pin's start, where berth's
    /// steps already read it): its reference and the error naming it. Nothing the build made
    /// from it was kept ([`BaseImages::confirm`]), so the build can run again, resolving the
    /// base again (pulling it if it can).
    pub(crate) async fn lost_before_pinned(&self) -> Option<(String, Error)> {
        for (reference, dirs, pin, _) in self.current() {
            if pin.ever_ran() {
                continue;
            }
            if let Err(e) = pin.check(&reference, &dirs).await {
                return Some((reference, lost_err(e)));
            }
        }
        None
    }

    /// Whether a base with this reference was resolved (and pinned) in this build.
    pub(crate) fn has(&self, reference: &str) -> bool {
        self.held
            .lock()
            .unwrap()
            .iter()
            .any(|h| h.reference == reference)
    }

    /// Checks that every base still has all its layers; the first that does not gives the error
    /// (naming the image and what removed it).
    pub(crate) async fn check(&self) -> Result<()> {
        for (reference, dirs, pin, _) in self.current() {
            pin.check(&reference, &dirs).await.map_err(lost_err)?;
        }
        Ok(())
    }
}

struct ImageSource {
    reference: String,
    mode: ResolveMode,
    layer_limit: Option<usize>,
    /// `os/arch[/variant]` for pulls.
    platform: Option<String>,
    env: Arc<BuildEnv>,
    /// Resolved once per build (cache key and exec share it); holds the pin.
    resolved: tokio::sync::OnceCell<Resolved>,
    /// The digest the reference resolves to in its registry (the index's for a multi-platform
    /// image, as buildkitd pins image sources), when known: from the pull, Docker's repository
    /// digests of the image, or one bounded registry lookup ([`ImageSource::learn_sources`]).
    manifest: std::sync::OnceLock<String>,
}

struct Resolved {
    /// Docker's image ID (config digest on the classic store, manifest or index digest on the
    /// containerd store).
    id: String,
    chain: Chain,
    hold: Hold,
}

/// What keeps the base image's layers from being deleted while the build runs.
enum Hold {
    /// A pin container in the live Engine, and the image it pins.
    Live {
        pin: Pin,
        image: Box<dockerstore::BaseImage>,
    },
    /// Resolved from a stopped daemon's data root: pins through the API if dockerd starts.
    Offline { _watch: OfflineWatch },
    /// A containerd lease on the Engine's containerd image store.
    Containerd {
        lease: Arc<containerdstore::BaseLease>,
    },
}

/// Why [`ImageSource::resolve_containerd`] failed.
enum ContainerdResolve {
    /// The image, or its content for the op's platform, is not in the store (removed since the
    /// lookup, or an index of which another platform was pulled): pulling it may help.
    Missing(Error),
    /// Anything else.
    Failed(Error),
}

/// What [`ImageSource::resolve_live`] found.
enum Live {
    /// The image in Docker's classic store, pinned.
    Pinned(dockerstore::BaseImage, Pin, std::path::PathBuf),
    /// The Engine uses the containerd image store: resolved there.
    Containerd(Resolved),
}

/// Watches a stopped daemon's Engine address; once it answers, pins the image there. Dropping it
/// stops the watch and releases the pin.
struct OfflineWatch {
    task: tokio::task::JoinHandle<()>,
    pin: Arc<std::sync::Mutex<Option<Pin>>>,
}

impl OfflineWatch {
    fn start(
        docker: Option<Docker>,
        docker_host: Option<String>,
        image_id: String,
        instance: String,
        build: String,
    ) -> Self {
        let pin: Arc<std::sync::Mutex<Option<Pin>>> = Default::default();
        let slot = pin.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(OFFLINE_WATCH).await;
                let Some(docker) = answering_engine(docker.as_ref(), docker_host.as_deref()).await
                else {
                    continue;
                };
                tracing::warn!(image = %image_id, "dockerd started while a build uses its stopped data root: pinning the base image");
                remove_stale_pins_once(&docker, &instance).await;
                match dockerstore::pin_image(&docker, &image_id, &instance, &build).await {
                    Ok(p) => *slot.lock().unwrap() = Some(p),
                    Err(e) => {
                        tracing::warn!(image = %image_id, error = %e, "pinning the base image in the started dockerd failed")
                    }
                }
                return;
            }
        });
        OfflineWatch { task, pin }
    }
}

impl Drop for OfflineWatch {
    fn drop(&mut self) {
        self.task.abort();
        let pin = self.pin.lock().unwrap().take();
        drop(pin);
    }
}

/// A client for `docker_host` if its Engine answers `/_ping` (within [`PING_TIMEOUT`]).
pub(crate) async fn answering_engine(
    client: Option<&Docker>,
    docker_host: Option<&str>,
) -> Option<Docker> {
    let docker = connect(client, docker_host).ok()?;
    match tokio::time::timeout(PING_TIMEOUT, docker.ping()).await {
        Ok(Ok(_)) => Some(docker),
        _ => None,
    }
}

fn engine_err(what: String, e: bollard::errors::Error) -> Error {
    let kind = match &e {
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        } => ErrorKind::NotFound,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 401 | 403,
            ..
        } => ErrorKind::PermissionDenied,
        bollard::errors::Error::DockerResponseServerError { .. } => ErrorKind::Internal,
        _ => ErrorKind::Unavailable,
    };
    Error::Op {
        message: format!("{what}: {e}"),
        kind,
        source: Some(Box::new(e)),
    }
}

fn containerd_err(e: containerdstore::Error) -> Error {
    let kind = match &e {
        containerdstore::Error::Unreachable { .. } => ErrorKind::Unavailable,
        e if e.is_not_found() => ErrorKind::NotFound,
        containerdstore::Error::NoPlatform { .. } => ErrorKind::NotFound,
        containerdstore::Error::UnsupportedSnapshotter { .. } => ErrorKind::Unimplemented,
        _ => ErrorKind::Internal,
    };
    Error::Op {
        message: e.to_string(),
        kind,
        source: Some(Box::new(e)),
    }
}

/// On the first containerd-store resolution of a worker root in this process, removes the
/// leases and views a previous process left for it; every build waits for this first.
async fn remove_containerd_leftovers_once(client: &containerdstore::Client, instance: &str) {
    type Cell = Arc<tokio::sync::OnceCell<()>>;
    static DONE: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, Cell>>> =
        std::sync::OnceLock::new();
    let key = format!("{}|{instance}", client.endpoint().address.display());
    let cell = DONE
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .entry(key)
        .or_default()
        .clone();
    cell.get_or_init(|| async {
        match client.remove_leftovers(instance).await {
            Ok(l) if l.leases + l.views + l.unpacks + l.ingests == 0 => {}
            Ok(l) => tracing::info!(instance, leases = l.leases, views = l.views, unpacks = l.unpacks, ingests = l.ingests, "base-image and pull leftovers of a previous berthd removed"),
            Err(e) => tracing::warn!(instance, error = %e, "removing base-image leases of a previous berthd failed"),
        }
    })
    .await;
}

/// A base image's layers gone ([`layerstore::Error::BaseImageLost`]).
fn lost_err(e: layerstore::Error) -> Error {
    Error::Op {
        message: e.to_string(),
        kind: ErrorKind::FailedPrecondition,
        source: None,
    }
}

fn store_err(what: String, e: layerstore::Error) -> Error {
    Error::Op {
        message: format!("{what}: {e}"),
        kind: ErrorKind::Internal,
        source: Some(Box::new(e)),
    }
}

/// Connects to the worker's Docker Engine (no I/O yet): the client the daemon gave
/// (`WorkerOptions::docker`), else one for `docker_host`.
pub(crate) fn connect(client: Option<&Docker>, docker_host: Option<&str>) -> Result<Docker> {
    if let Some(c) = client {
        return Ok(c.clone());
    }
    let r = match docker_host {
        Some(h) if h.starts_with("unix://") || h.starts_with('/') => {
            Docker::connect_with_unix(h, API_TIMEOUT_SECS, &API_VERSION)
        }
        Some(h) if h.starts_with("tcp://") || h.starts_with("http://") => {
            Docker::connect_with_http(
                &h.replacen("tcp://", "http://", 1),
                API_TIMEOUT_SECS,
                &API_VERSION,
            )
        }
        Some(h) => {
            return Err(Error::Op {
                message: format!("unsupported docker host {h:?}"),
                kind: ErrorKind::InvalidArgument,
                source: None,
            })
        }
        None => Docker::connect_with_unix("/var/run/docker.sock", API_TIMEOUT_SECS, &API_VERSION),
    };
    r.map_err(|e| engine_err("connect to the Docker Engine".into(), e))
}

/// On the first use of a worker root in this process, removes the pins a previous process left
/// for it (a crash between pin and release); every build waits for this before pinning.
async fn remove_stale_pins_once(docker: &Docker, instance: &str) {
    type Cell = Arc<tokio::sync::OnceCell<()>>;
    static DONE: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, Cell>>> =
        std::sync::OnceLock::new();
    let cell = DONE
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .entry(instance.to_string())
        .or_default()
        .clone();
    cell.get_or_init(|| async {
        match dockerstore::remove_stale_pins(docker, instance).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(instance, removed = n, "stale image pins removed"),
            Err(e) => tracing::warn!(instance, error = %e, "removing stale image pins failed"),
        }
    })
    .await;
}

impl ImageSource {
    fn status(&self, ctx: &OpContext, started: SystemTime, completed: Option<SystemTime>) {
        let id = format!("resolve {}", self.reference);
        ctx.progress.send(ProgressEvent::VertexStatus {
            vertex: ctx.vertex.clone(),
            id: id.clone(),
            name: id,
            current: 0,
            total: 0,
            timestamp: SystemTime::now(),
            started: Some(started),
            completed,
        });
    }

    async fn resolve(&self, ctx: &OpContext) -> Result<&Resolved> {
        self.resolved
            .get_or_try_init(|| async {
                let started = SystemTime::now();
                self.status(ctx, started, None);
                let r = tokio::select! {
                    r = self.resolve_now(ctx) => r,
                    _ = ctx.cancel.cancelled() => Err(Error::Canceled),
                };
                self.status(ctx, started, Some(SystemTime::now()));
                r
            })
            .await
    }

    async fn resolve_now(&self, ctx: &OpContext) -> Result<Resolved> {
        let docker = match &self.env.opts.docker_data_root {
            // With a data root configured, a daemon that does not answer means "stopped".
            Some(root) => match answering_engine(
                self.env.opts.docker.as_ref(),
                self.env.opts.docker_host.as_deref(),
            )
            .await
            {
                Some(d) => d,
                None => return self.resolve_offline(root, ctx).await,
            },
            None => connect(
                self.env.opts.docker.as_ref(),
                self.env.opts.docker_host.as_deref(),
            )?,
        };
        let (image, pin, record) = match self.resolve_live(&docker, ctx).await? {
            Live::Pinned(image, pin, record) => (image, pin, record),
            Live::Containerd(r) => {
                if let Hold::Containerd { lease } = &r.hold {
                    self.env.bases.add_lease(lease.clone());
                }
                return Ok(r);
            }
        };
        let chain = self.limit(image.chain())?;
        self.env
            .bases
            .add(&self.reference, &image, pin.clone(), record);
        tracing::debug!(reference = %self.reference, id = %image.id, layers = chain.0.len(), "image resolved in place");
        Ok(Resolved {
            id: image.id.to_string(),
            chain,
            hold: Hold::Live {
                pin,
                image: Box::new(image),
            },
        })
    }

    /// Resolution through the live Engine: the image (pulled if need be) pinned by ID, or the
    /// containerd store's resolution when the Engine uses that store.
    async fn resolve_live(&self, docker: &Docker, ctx: &OpContext) -> Result<Live> {
        // A prune may delete the image (unused until pinned) between the lookup and the pin's
        // creation: then resolve again (pulling it again if it can be pulled).
        let mut attempt = 0;
        // Set when the image the Engine has is not usable for this op (another platform on the
        // classic store, its platform's content missing or the image removed on the containerd
        // store): pull it (`image.resolvemode=default`).
        let mut force_pull = false;
        loop {
            attempt += 1;
            // `docker info` (tens of ms on a busy Engine) runs alongside the lookup. The lookup
            // gives the image ID, the found image's `os/architecture` (none when pulled), and on
            // the containerd store the lease a pull wrote under.
            let lookup = async {
                Ok(
                    match (self.mode, docker.inspect_image(&self.reference).await) {
                        (ResolveMode::Pull, _) => self.pull(docker, ctx).await?,
                        (ResolveMode::Default, Ok(_)) if force_pull => {
                            self.pull(docker, ctx).await?
                        }
                        (mode, Ok(i)) => {
                            let id = i.id.unwrap_or_default();
                            if let Some(d) = repo_digest(&self.reference, i.repo_digests.as_deref())
                            {
                                let _ = self.manifest.set(d);
                            }
                            if mode == ResolveMode::Default {
                                self.learn_sources(
                                    &id,
                                    i.root_fs.and_then(|r| r.layers).unwrap_or_default(),
                                )
                                .await;
                            }
                            let found = format!(
                                "{}/{}",
                                i.os.unwrap_or_default(),
                                i.architecture.unwrap_or_default()
                            );
                            (id, Some(found), None)
                        }
                        (
                            ResolveMode::Default,
                            Err(bollard::errors::Error::DockerResponseServerError {
                                status_code: 404,
                                ..
                            }),
                        ) => self.pull(docker, ctx).await?,
                        (
                            _,
                            Err(bollard::errors::Error::DockerResponseServerError {
                                status_code: 404,
                                ..
                            }),
                        ) => {
                            return Err(Error::Op {
                                message: format!(
                                "image {} not found in the Docker Engine (image.resolvemode=local)",
                                self.reference
                            ),
                                kind: ErrorKind::NotFound,
                                source: None,
                            })
                        }
                        (_, Err(e)) => {
                            return Err(engine_err(format!("inspect image {}", self.reference), e))
                        }
                    },
                )
            };
            let (found, info) = tokio::join!(lookup, docker.info());
            // From here on the image ID, so a concurrent re-tag cannot mix two images.
            let (id, found_platform, pull_lease): (String, Option<String>, _) = found?;
            let info = info.map_err(|e| engine_err("docker info".into(), e))?;
            let instance = format!("worker:{}", self.env.opts.root.display());
            if let Some(endpoint) =
                containerdstore::Endpoint::detect(&info, &self.env.opts.containerd)
            {
                match self
                    .resolve_containerd(&endpoint, &id, &instance, pull_lease)
                    .await
                {
                    Ok(r) => return Ok(Live::Containerd(r)),
                    Err(ContainerdResolve::Missing(e))
                        if attempt < 3 && self.mode != ResolveMode::Local =>
                    {
                        tracing::warn!(reference = %self.reference, %id, error = %e, "image (or its content for this platform) not in the containerd store; pulling it");
                        force_pull = true;
                        continue;
                    }
                    Err(ContainerdResolve::Missing(e) | ContainerdResolve::Failed(e)) => {
                        return Err(e)
                    }
                }
            }
            // The classic store keeps one image per tag: one of another platform is pulled
            // (and the tag moved to it, as `docker pull --platform` does).
            if let (Some(want), Some(found)) = (self.platform.as_deref(), found_platform) {
                let want_os_arch = want.splitn(3, '/').take(2).collect::<Vec<_>>().join("/");
                // An image without os or architecture in its config is taken as it is.
                let known = !found.starts_with('/') && !found.ends_with('/');
                if known && found != want_os_arch {
                    if self.mode == ResolveMode::Local || attempt >= 3 {
                        return Err(Error::Op {
                            message: format!(
                                "image {} in the Docker Engine is {found}, not {want_os_arch}{}",
                                self.reference,
                                if self.mode == ResolveMode::Local {
                                    " (image.resolvemode=local)"
                                } else {
                                    ""
                                }
                            ),
                            kind: ErrorKind::NotFound,
                            source: None,
                        });
                    }
                    tracing::info!(reference = %self.reference, %found, want = %want_os_arch, "the Engine's image is of another platform; pulling");
                    force_pull = true;
                    continue;
                }
            }
            remove_stale_pins_once(docker, &instance).await;
            let driver = StorageDriver::from_name(info.driver.as_deref().unwrap_or_default())
                .map_err(|e| store_err("docker storage driver".into(), e))?;
            let data_root = info
                .docker_root_dir
                .clone()
                .unwrap_or_else(|| "/var/lib/docker".into());
            let store = DockerStore::new(data_root, driver);
            // The pin is created and started in the background: neither is on the build's
            // path. Until it runs, what the steps make from the layers is confirmed before it
            // is kept (`BaseImages::confirm`).
            let pin = dockerstore::pin_image_after(
                docker,
                &id,
                &instance,
                &self.reference,
                self.env.pin_delay,
            );
            let image = dockerstore::resolve_base_image(docker, &store, &id).await;
            let pinned = match (pin, image) {
                (Err(e), _) => Err((e, "pin image")),
                (_, Err(e)) => Err((e, "resolve image")),
                (Ok(pin), Ok(image)) if image.layer_dirs.iter().all(|d| d.is_dir()) => {
                    Ok((image, pin))
                }
                (Ok(_), Ok(_)) if attempt < 3 => {
                    tracing::warn!(reference = %self.reference, %id, "image deleted and stored again while it was pinned (a prune and a pull?); resolving it again");
                    continue;
                }
                (Ok(_), Ok(image)) => {
                    return Err(Error::Op {
                        message: format!(
                            "resolve image {}: the layer directories of {} vanished while it was pinned, three times",
                            self.reference, image.id
                        ),
                        kind: ErrorKind::Unavailable,
                        source: None,
                    })
                }
            };
            match pinned {
                Ok((image, pin)) => {
                    let record = store
                        .image_dir()
                        .join("imagedb/content/sha256")
                        .join(image.id.hex());
                    return Ok(Live::Pinned(image, pin, record));
                }
                Err((e, _)) if attempt < 3 && dockerstore::is_image_missing(&e) => {
                    tracing::warn!(reference = %self.reference, %id, "image deleted before it could be pinned (a prune?); resolving it again");
                }
                Err((e, what)) => return Err(store_err(format!("{what} {}", self.reference), e)),
            }
        }
    }

    /// Resolution on the Engine's containerd image store (`containerdstore`): the layers'
    /// snapshots are the lower dirs, a lease holds them and the image's content for the build.
    /// `lease`: the one a pull of the image just wrote under (it holds the image already);
    /// otherwise a new one is taken before the image is read. An image removed since the
    /// lookup, or whose content for this platform is not there, is [`ContainerdResolve::Missing`].
    async fn resolve_containerd(
        &self,
        endpoint: &containerdstore::Endpoint,
        id: &str,
        instance: &str,
        lease: Option<containerdstore::BaseLease>,
    ) -> std::result::Result<Resolved, ContainerdResolve> {
        let failed = |e| ContainerdResolve::Failed(containerd_err(e));
        let client = containerdstore::Client::connect(endpoint)
            .await
            .map_err(failed)?;
        remove_containerd_leftovers_once(&client, instance).await;
        let lease = match lease {
            Some(l) => l,
            None => {
                let lease = client.lease(instance).await.map_err(failed)?;
                // Test hook: the image was found and the lease taken, nothing of it held yet.
                dockerstore::fault::hold_point("containerd-base:found").await;
                lease
            }
        };
        let p = match self.platform.as_deref() {
            Some(p) => {
                let mut it = p.splitn(3, '/');
                (
                    it.next().unwrap_or_default().to_string(),
                    it.next().unwrap_or_default().to_string(),
                    it.next().unwrap_or_default().to_string(),
                )
            }
            None => {
                let d = &self.env.opts.default_platform;
                (d.os.clone(), d.architecture.clone(), d.variant.clone())
            }
        };
        let (image, lease) = client
            .base_image(id, (&p.0, &p.1, &p.2), lease)
            .await
            .map_err(|e| match e {
                e if e.is_not_found()
                    || matches!(e, containerdstore::Error::NotUnpacked { .. }) =>
                {
                    ContainerdResolve::Missing(containerd_err(e))
                }
                e => ContainerdResolve::Failed(containerd_err(e)),
            })?;
        let chain = self
            .limit(image.chain())
            .map_err(ContainerdResolve::Failed)?;
        tracing::debug!(reference = %self.reference, id = %image.id, layers = chain.0.len(), lease = lease.id(), "image resolved in place from the containerd image store");
        Ok(Resolved {
            id: image.id,
            chain,
            hold: Hold::Containerd {
                lease: Arc::new(lease),
            },
        })
    }

    /// Resolution from a stopped daemon's data root (module docs).
    async fn resolve_offline(&self, root: &std::path::Path, ctx: &OpContext) -> Result<Resolved> {
        let in_root = |e: Error, why: &str| {
            match e {
            Error::Op {
                message,
                kind,
                source,
            } => Error::Op {
                message: format!(
                    "{message} ({why}; the Docker Engine does not answer, berthd writes into its stopped Docker data root {})",
                    root.display()
                ),
                kind,
                source,
            },
            e => e,
        }
        };
        if self.mode == ResolveMode::Pull {
            self.pull_offline(root, ctx)
                .await
                .map_err(|e| in_root(e, "image.resolvemode=pull"))?;
        }
        let store = DockerStore::new(root, dockerstore::offline_driver(root));
        let reference = self.reference.clone();
        let lookup = {
            let (store, reference) = (store.clone(), reference.clone());
            blocking(
                move || match dockerstore::resolve_offline_image(&store, &reference) {
                    Ok(_) => Ok(true),
                    Err(layerstore::Error::DockerImageNotFound { .. }) => Ok(false),
                    Err(_) => Ok(true),
                },
            )
        };
        if self.mode == ResolveMode::Default && !lookup.await? {
            self.pull_offline(root, ctx)
                .await
                .map_err(|e| in_root(e, "image not in the Docker data root"))?;
        }
        let image = blocking(move || {
            dockerstore::resolve_offline_image(&store, &reference).map_err(|e| {
                let kind = match &e {
                    layerstore::Error::DockerImageNotFound { .. } => ErrorKind::NotFound,
                    layerstore::Error::InvalidImageReference { .. }
                    | layerstore::Error::AmbiguousImageId { .. } => ErrorKind::InvalidArgument,
                    _ => ErrorKind::Internal,
                };
                Error::Op {
                    message: format!("resolve image {reference} offline: {e}"),
                    kind,
                    source: Some(Box::new(e)),
                }
            })
        })
        .await?;
        let chain = self.limit(image.chain())?;
        tracing::debug!(reference = %self.reference, id = %image.id, layers = chain.0.len(), data_root = %root.display(), "image resolved in place from a stopped daemon's data root");
        let id = image.id.to_string();
        let hold = Hold::Offline {
            _watch: OfflineWatch::start(
                self.env.opts.docker.clone(),
                self.env.opts.docker_host.clone(),
                image.id.to_string(),
                format!("worker:{}", self.env.opts.root.display()),
                self.reference.clone(),
            ),
        };
        Ok(Resolved { id, chain, hold })
    }

    /// Applies `image.layerlimit`.
    fn limit(&self, mut chain: Chain) -> Result<Chain> {
        if let Some(n) = self.layer_limit {
            if n > chain.0.len() {
                return Err(Error::Op {
                    message: format!(
                        "image.layerlimit {n} exceeds the {} layers of {}",
                        chain.0.len(),
                        self.reference
                    ),
                    kind: ErrorKind::InvalidArgument,
                    source: None,
                });
            }
            chain.0.truncate(n);
        }
        Ok(chain)
    }

    /// Resolves the reference with berth's registry client for the op's platform.
    async fn resolve_remote(&self) -> Result<(registry::Session, registry::Image)> {
        let r = registry::Reference::parse(&self.reference).map_err(image_pull::registry_err)?;
        let platform = self
            .platform
            .as_deref()
            .and_then(registry::Platform::parse)
            .unwrap_or_else(registry::Platform::native);
        let session = self
            .env
            .opts
            .registry
            .session(Arc::new(image_pull::SessionAuth(self.env.session.clone())));
        tracing::info!(reference = %r, %platform, "resolving image in its registry");
        let img = session
            .resolve_image(&r, &platform)
            .await
            .map_err(image_pull::registry_err)?;
        Ok((session, img))
    }

    /// For an image found in Docker whose layers berth has no registry descriptors for (it was
    /// not pulled by this berth root), or whose registry digest is not known (Docker has no
    /// repository digest of it: built, loaded or imported there): one quick, bounded look at
    /// the registry, so a later push can keep foreign and uncompressed layers as they were, and
    /// build information can name the digest the reference resolves to, as buildkitd's does.
    /// Recorded only when the registry's image is this image ID; failures (offline, no such
    /// registry) are ignored, and each (reference, image ID) is tried once per process (the
    /// digest found is remembered for the process's later builds).
    async fn learn_sources(&self, id: &str, diff_ids: Vec<String>) {
        static MANIFESTS: std::sync::OnceLock<
            std::sync::Mutex<std::collections::HashMap<String, String>>,
        > = std::sync::OnceLock::new();
        let key = format!("{}|{id}", self.reference);
        let manifests = MANIFESTS.get_or_init(Default::default);
        if self.manifest.get().is_none() {
            if let Some(d) = manifests.lock().unwrap().get(&key) {
                let _ = self.manifest.set(d.clone());
            }
        }
        let cache = self.env.opts.blobs.as_ref();
        let need_sources = cache.is_some_and(|c| !diff_ids.iter().all(|d| c.source(d).is_some()));
        if !need_sources && self.manifest.get().is_some() {
            return;
        }
        static TRIED: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<String>>> =
            std::sync::OnceLock::new();
        if !TRIED
            .get_or_init(Default::default)
            .lock()
            .unwrap()
            .insert(key.clone())
        {
            return;
        }
        match tokio::time::timeout(LEARN_TIMEOUT, self.resolve_remote()).await {
            Ok(Ok((_, img))) if img.config_digest() == id => {
                if need_sources {
                    image_pull::record_sources(cache, &img);
                }
                manifests.lock().unwrap().insert(key, img.digest.clone());
                let _ = self.manifest.set(img.digest.clone());
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(reference = %self.reference, error = %e, "no registry descriptors for a local image")
            }
            Err(_) => {
                tracing::debug!(reference = %self.reference, "registry lookup for a local image timed out")
            }
        }
    }

    /// Pulls the image into the live Engine unless it has it (module `image_pull`); returns
    /// the image ID, no platform (nothing was inspected), and on the containerd store the
    /// lease the pull wrote under.
    async fn pull(
        &self,
        docker: &Docker,
        ctx: &OpContext,
    ) -> Result<(String, Option<String>, Option<containerdstore::BaseLease>)> {
        let (session, img) = self.resolve_remote().await?;
        let info = docker
            .info()
            .await
            .map_err(|e| engine_err("docker info".into(), e))?;
        if let Some(endpoint) = containerdstore::Endpoint::detect(&info, &self.env.opts.containerd)
        {
            let (id, lease) = self.pull_containerd(&endpoint, &session, &img, ctx).await?;
            return Ok((id, None, Some(lease)));
        }
        let id = img.config_digest().to_string();
        let _ = self.manifest.set(img.digest.clone());
        let host = self
            .env
            .opts
            .docker_host
            .clone()
            .unwrap_or_else(|| "unix:///var/run/docker.sock".into());
        let lock = image_pull::pull_lock(&host, &id);
        let _held = lock.lock().await;
        let progress = image_pull::PullProgress {
            sink: ctx.progress.clone(),
            vertex: ctx.vertex.clone(),
        };
        // Loaded untagged, the image is unused until tagged (and pinned): a prune in between
        // deletes it. Then load it again, a few times.
        let mut attempt = 0;
        loop {
            attempt += 1;
            if docker.inspect_image(&id).await.is_err() {
                let info = docker
                    .info()
                    .await
                    .map_err(|e| engine_err("docker info".into(), e))?;
                let layerdb = match (info.docker_root_dir, info.driver) {
                    (Some(root), Some(driver)) => Some(
                        std::path::PathBuf::from(root)
                            .join("image")
                            .join(driver)
                            .join("layerdb"),
                    )
                    .filter(|p| p.is_dir()),
                    _ => None,
                };
                let tmp = self.env.opts.root.join("tmp");
                std::fs::create_dir_all(&tmp).map_err(|e| Error::Op {
                    message: format!("create {}: {e}", tmp.display()),
                    kind: ErrorKind::Internal,
                    source: None,
                })?;
                tracing::info!(reference = %img.reference, %id, "pulling image into the Docker Engine");
                image_pull::pull_into_engine(docker, &session, &img, layerdb, &tmp, &progress)
                    .await?;
                image_pull::record_sources(self.env.opts.blobs.as_ref(), &img);
            }
            match image_pull::tag_in_engine(docker, &img).await {
                Ok(()) => return Ok((id, None, None)),
                Err(e)
                    if attempt < 3
                        && matches!(
                            docker.inspect_image(&id).await,
                            Err(bollard::errors::Error::DockerResponseServerError {
                                status_code: 404,
                                ..
                            })
                        ) =>
                {
                    tracing::warn!(reference = %img.reference, error = %e, "pulled image deleted before it was tagged (a prune?); loading it again");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Pulls the image straight into the Engine's containerd image store
    /// ([`containerdstore::Client::pull`]): only missing blobs are fetched and missing layers
    /// unpacked; concurrent builds of the same image wait for one pull. Returns Docker's image
    /// ID on that store (the digest the reference points at) and the build's base-image lease,
    /// taken before the pull and holding the image from then on (no prune can take it before
    /// the build reads it).
    async fn pull_containerd(
        &self,
        endpoint: &containerdstore::Endpoint,
        session: &registry::Session,
        img: &registry::Image,
        ctx: &OpContext,
    ) -> Result<(String, containerdstore::BaseLease)> {
        let client = containerdstore::Client::connect(endpoint)
            .await
            .map_err(containerd_err)?;
        let instance = format!("worker:{}", self.env.opts.root.display());
        remove_containerd_leftovers_once(&client, &instance).await;
        let lease = client.lease(&instance).await.map_err(containerd_err)?;
        let place = format!("{}|{}", endpoint.address.display(), endpoint.namespace);
        let lock = image_pull::pull_lock(&place, &img.digest);
        let _held = lock.lock().await;
        let progress = image_pull::PullProgress {
            sink: ctx.progress.clone(),
            vertex: ctx.vertex.clone(),
        };
        tracing::info!(reference = %img.reference, id = %img.digest, "pulling image into the Engine's containerd");
        let pulled = client
            .pull(session, img, &lease, &progress)
            .await
            .map_err(containerd_err)?;
        tracing::info!(reference = %img.reference, id = %pulled.id, record = %pulled.name, fetched = pulled.fetched.len(), unpacked = pulled.unpacked.len(), skipped = pulled.skipped.len(), "image pulled into the Engine's containerd");
        image_pull::record_sources(self.env.opts.blobs.as_ref(), img);
        // Test hook: the image is pulled and its record exists; the build has not read it yet.
        dockerstore::fault::hold_point("containerd-pull:pulled").await;
        Ok((pulled.id, lease))
    }

    /// Pulls the image into a stopped daemon's data root unless it has it.
    async fn pull_offline(&self, root: &std::path::Path, ctx: &OpContext) -> Result<()> {
        let (session, img) = self.resolve_remote().await?;
        let id = img.config_digest().to_string();
        let _ = self.manifest.set(img.digest.clone());
        let lock = image_pull::pull_lock(&root.display().to_string(), &id);
        let _held = lock.lock().await;
        let progress = image_pull::PullProgress {
            sink: ctx.progress.clone(),
            vertex: ctx.vertex.clone(),
        };
        let root = root.to_path_buf();
        let blobs = self.env.opts.blobs.clone();
        let handle = tokio::runtime::Handle::current();
        blocking(move || {
            let store = DockerStore::new(&root, dockerstore::offline_driver(&root));
            let writer = dockerstore::OfflineWriter::open(store, &Default::default())
                .map_err(|e| store_err(format!("open Docker data root {}", root.display()), e))?;
            image_pull::pull_into_data_root(&writer, &session, &img, &progress, handle)?;
            image_pull::record_sources(blobs.as_ref(), &img);
            Ok(())
        })
        .await
    }
}

impl ImageSource {
    /// Before the layers of a base used in place are first read. The pin is not waited for: it
    /// starts while the steps after this one run, and [`BaseImages::confirm`] checks what they
    /// made before it is kept. Only a pin already known lost (its creation found the image gone,
    /// or `docker container prune` took the created container and the `image prune` of the same
    /// `docker system prune` the image) is acted on: no layer was read yet, so this returns the
    /// image resolved again (a pull, if it can be pulled), which replaces the lost one for every
    /// build that holds the same pin. Concurrent builds of the same base share one execution of
    /// this vertex; the others find the replacement through the pin ([`BaseImages::current`])
    /// and use it too. `None`: the resolved image stands.
    async fn live_layers(
        &self,
        ctx: &OpContext,
        pin: &Pin,
        image: &dockerstore::BaseImage,
    ) -> Result<Option<dockerstore::BaseImage>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (current, again) = pin.latest();
            let dirs = again.as_ref().unwrap_or(image).layer_dirs.clone();
            // Not waiting for the pin to run: the steps after this one read the layers while it
            // starts, and what they make is confirmed before it is kept. Only a pin already
            // known lost is looked at here.
            if !current.lost() {
                return Ok(again);
            }
            if ctx.cancel.is_cancelled() {
                return Err(Error::Canceled);
            }
            let Err(lost) = current.check(&self.reference, &dirs).await else {
                tracing::warn!(reference = %self.reference, "pin container not running; the image is protected by a created container only");
                return Ok(again);
            };
            if attempt > 3 {
                return Err(lost_err(lost));
            }
            // The replacement is kept by `current`; the next round uses it.
            let _ = current
                .resolve_again(|| async {
                    tracing::warn!(reference = %self.reference, id = %image.id, "base image deleted before its pin ran (a prune?); resolving it again");
                    let docker = connect(
                        self.env.opts.docker.as_ref(),
                        self.env.opts.docker_host.as_deref(),
                    )?;
                    match self.resolve_live(&docker, ctx).await {
                        Ok(Live::Pinned(image, pin, _)) => Ok((pin, image)),
                        Ok(Live::Containerd(_)) => Err(Error::Op {
                            message: format!(
                                "{lost} (the Docker Engine uses the containerd image store now)"
                            ),
                            kind: ErrorKind::FailedPrecondition,
                            source: None,
                        }),
                        Err(e) => {
                            tracing::warn!(reference = %self.reference, error = %e, "resolving the base image again failed");
                            Err(lost_err(lost))
                        }
                    }
                })
                .await?;
        }
    }
}

#[async_trait]
impl Op<Snap> for ImageSource {
    fn pin(&self) -> Option<String> {
        // The digest the reference pins, else the one it resolved to in its registry, else the
        // image the worker resolved it to.
        match self.reference.rsplit_once('@') {
            Some((_, digest)) => Some(digest.to_string()),
            None => self
                .manifest
                .get()
                .cloned()
                .or_else(|| self.resolved.get().map(|r| r.id.clone())),
        }
    }

    async fn cache_key(&self, ctx: &OpContext, _inputs: &[Solved<Snap>]) -> Result<String> {
        let r = self.resolve(ctx).await?;
        // The image ID and the layers used (a layer limit may cut the chain): the same on every
        // node, so caches exported by one berthd match on another. Where Docker keeps the layers
        // is not part of it: a cached result whose Docker layers are gone is a miss when loaded
        // (`llbsolver::cache`).
        let mut h = crate::digest::KeyHasher::new("docker-image");
        h.field(r.id.as_bytes());
        h.field(&(r.chain.0.len() as u64).to_le_bytes());
        Ok(h.finish())
    }

    fn stock_map(&self) -> Option<crate::bkkeys::StockMap> {
        // Stock keys output 0 both by the manifest and by the config's ChainID of the diffIDs
        // (cut to the layer limit, as the resolved chain is); records of either match a stock
        // export's links. The ChainID is Docker's chainID of the top layer, known here without
        // the manifest.
        let r = self.resolved.get()?;
        let diff_ids = r
            .chain
            .layers()
            .iter()
            .map(|l| match l {
                layerstore::snapshot::LayerRef::Docker(d) => Some(d.diff_id.clone()),
                layerstore::snapshot::LayerRef::Berth(_) => None,
            })
            .collect::<Option<Vec<String>>>()?;
        let key = crate::bkkeys::image_config_key(&diff_ids, None)?;
        Some(crate::bkkeys::StockMap {
            digest: crate::bkkeys::source_key(&key)?,
            selectors: vec![],
            content: vec![],
        })
    }

    async fn exec(&self, ctx: &OpContext, _inputs: &[Solved<Snap>]) -> Result<Vec<Snap>> {
        let r = self.resolve(ctx).await?;
        let (mut chain, mut id) = (r.chain.clone(), r.id.clone());
        if let Hold::Live { pin, image } = &r.hold {
            if let Some(again) = self.live_layers(ctx, pin, image).await? {
                (chain, id) = (self.limit(again.chain())?, again.id.to_string());
            }
        }
        dockerstore::fault::hold_point("base:pinned").await;
        let store = self.env.store.clone();
        let desc = format!("docker-image://{} ({id})", self.reference);
        let snap = blocking(move || {
            let id = store
                .create_from_chain(chain, &[], &SnapshotOptions::new(desc))
                .map_err(crate::ops::exec::store_err("record image snapshot"))?;
            Snap::acquire(&store, id)
        })
        .await?;
        Ok(vec![snap])
    }
}

#[cfg(test)]
mod tests {
    use crate::session::registry_host;

    #[test]
    fn repo_digest_of_the_reference_repository() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let digests = vec![
            format!("localhost:5000/busybox@{a}"),
            format!("busybox@{b}"),
        ];
        for r in [
            "busybox",
            "busybox:latest",
            "docker.io/library/busybox:1.36",
        ] {
            assert_eq!(
                super::repo_digest(r, Some(&digests)),
                Some(b.clone()),
                "{r}"
            );
        }
        assert_eq!(
            super::repo_digest("localhost:5000/busybox:x", Some(&digests)),
            Some(a.clone())
        );
        assert_eq!(super::repo_digest("alpine", Some(&digests)), None);
        assert_eq!(super::repo_digest("busybox", None), None);
        assert_eq!(super::repo_digest("busybox", Some(&[])), None);
    }

    #[test]
    fn registry_hosts() {
        for (r, h) in [
            ("docker.io/library/alpine:latest", "registry-1.docker.io"),
            ("alpine", "registry-1.docker.io"),
            ("library/alpine:3", "registry-1.docker.io"),
            ("127.0.0.1:5000/a/b:c", "127.0.0.1:5000"),
            ("localhost/x", "localhost"),
            ("ghcr.io/o/r@sha256:ab", "ghcr.io"),
        ] {
            assert_eq!(registry_host(r), h, "{r}");
        }
    }
}
