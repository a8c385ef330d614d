//! Pins: what keeps a base image, used in place from Docker's classic store, from being deleted
//! while berth builds use it.
//!
//! # Mechanism
//!
//! A pin is a **running** container of the image: Docker never removes an image a running
//! container uses, not even with `docker rmi -f` ("image is being used by running container",
//! which cannot be forced), and its routine cleanups (`docker system prune -af`, `docker
//! container prune`, `docker image prune -a`) remove only stopped containers and then unused
//! images. (A created, never-started container, berth's earlier pin, is exactly what `container
//! prune` removes first.)
//!
//! The container runs berth's own pin process (`pause/berth-pause.rs`, built by `build.rs` and
//! embedded here): a static ELF of about a kilobyte that sleeps in `ppoll` until SIGTERM/SIGINT
//! or end-of-file on its stdin, so it needs nothing from the image (works on `scratch`-like
//! images), costs no CPU and ~8 KiB of memory, and `docker stop` ends it at once.
//!
//! A pin dies with the berthd that made it, without that berthd's help: the container is created
//! with `OpenStdin` + `StdinOnce` and its supervisor (below) attaches to its stdin before
//! starting it and holds the attach while it runs. When berthd exits in any way (a SIGKILL, a
//! crash, the OOM killer), the kernel closes its connection to dockerd, dockerd closes the
//! container's stdin (`StdinOnce`: its one attached client left), the pin process sees
//! end-of-file and exits, and `AutoRemove` removes the container: nothing is left in `docker ps
//! -a`, also for a `--root` that is never used again. A container that was only created when
//! berthd died stays (not running, which `docker container prune` removes) until the next
//! berthd on the same root sweeps it ([`remove_stale_pins`]).
//!
//! The pin process gets into the container at `/.berth-pin` in one of two ways:
//! * **bind-mounted** read-only from `<worker root>/pin-program-<sha256 prefix>`, a file berthd
//!   writes once per process ([`pause_file`]): nothing to do between create and start. It needs
//!   dockerd to see berthd's root at the same path (the usual case: berthd reads Docker's layer
//!   directories in place anyway). When it does not (berthd in a container, a remote Engine),
//!   dockerd refuses the create ("bind source path does not exist"), or, for a different file at
//!   that path, the start; berth then switches to
//! * **uploaded** into the created container with `PUT /containers/{id}/archive` (in the
//!   container's own writable layer, removed with it), for the rest of the process. The upload
//!   mounts the container's root filesystem once more (100-300 ms with fuse-overlayfs on a busy
//!   host) on the pin's critical path, and it keeps the root filesystem writable (Docker refuses
//!   archive uploads into a read-only rootfs); nothing in the container writes to it.
//!
//! Everything else is switched off: network `none`, all capabilities dropped,
//! `no-new-privileges`, user `65534:65534` (numeric: no `/etc/passwd` needed), log driver
//! `none`, the image's health check disabled, no restart policy, no init, stop signal SIGTERM.
//! (An image's `VOLUME`s still get anonymous volumes, as for any container of it; they are
//! removed with the pin.)
//!
//! # Recognising pins
//!
//! Name `berth-pin-<image id prefix>-<random>`, command `/.berth-pin --berthd-root <root>
//! --berthd-pid <pid>`, and labels [`PIN_LABEL`] (the berth instance, `worker:<root>`),
//! [`PIN_IMAGE_LABEL`], [`PIN_PID_LABEL`], [`PIN_BUILD_LABEL`] (the build that created it) and
//! [`PIN_ABOUT_LABEL`] (a sentence for people).
//!
//! # Lifetime and sharing
//!
//! One pin container per (berth instance, image ID), shared by every build of this process that
//! uses the image and counted by [`Pin`] handles: the first [`pin_image`] creates it; when the
//! last handle is dropped it stays [`LINGER`] (back-to-back builds of the same base reuse the
//! running container instead of each paying for a new one on their critical path) and is then
//! removed in the background ([`Pin::release`] removes it at once and waits for its supervisor,
//! //! so nothing it was making is left; a released supervisor also drops its stdin attach).
//! [`pin_image`] returns once the container is created: from then on `docker rmi` and
//! `docker image prune` already refuse the image. The attach, upload and start (0.3-0.5 s on an
//! idle host, seconds on a loaded one) run in a supervisor task; a created container is what
//! `docker container prune` removes. Pins that a crashed process had only created are removed
//! by [`remove_stale_pins`] (berthd calls it at start and, after [`stop_pinning`], at stop).
//!
//! Builds use [`pin_image_in_background`], which creates the container in the background too:
//! no Docker round trip of the pin is on the build's path. Its steps read the base while the pin
//! is created and started, so nothing they make is kept before [`Pin::holding`] (the pin runs
//! and none of its containers was ever lost: nothing could delete the image without force since
//! its creation) or [`Pin::check`] says the layers were there all along; a build whose base
//! went before its pin ran ([`Pin::ever_ran`]) is run again on the base resolved again (the
//! worker's `llbsolver`). What reads a build's result afterwards (an export) waits for
//! [`Pin::wait_running`] first.
//!
//! Builds whose result nothing reads (no export) or is only loaded into this Docker (the
//! `image` exporter's thin load, which takes Docker's own references on the base's layers) use
//! [`pin_image_after`] with a short delay instead: the container is created only if the build
//! still uses the image by then (or something waits for the pin to run), so a short build (a
//! cached rebuild, a quick step) makes none, and Docker's work of creating and starting one
//! never competes with it. Its steps are confirmed as above, for the whole build.
//!
//! # When a pin does not hold
//!
//! The supervisor waits on the running pin (`POST /containers/{id}/wait`, a long poll, no
//! polling) and records what ended it: a stop (exit code 143, SIGTERM: `docker stop` or a
//! dockerd shutdown), a kill (137: `docker kill`, `docker rm -f`), a removal, a broken connection
//! to dockerd (dockerd stopped or restarted). As long as builds still hold it and the image is
//! still there it pins the image again with a new container, so a container prune that hits
//! the short window before the start, or a dockerd restart, costs nothing.
//!
//! Until its first container runs, an image's pin is a created container, which `docker
//! container prune` removes; the `image prune` of the same `docker system prune` may then delete
//! the image before the supervisor pins it again (it gives up: [`Pin::given_up`]). A build that
//! learns this before reading the layers resolves the image again (pulling it if it can); one
//! whose steps read them already drops what they made and runs again (see above); likewise when
//! the image vanishes between the caller's lookup and the pin's creation, or while dockerd
//! creates the pin container ([`is_image_missing`]). That resolution runs once per lost pin ([`Pin::resolve_again`]): the
//! builds that hold the same pin (they share the work of the base's vertex, so only one of them
//! sees the loss) find the new image and pin with [`Pin::latest`].
//!
//! Whether the build's layers survived is checked with [`Pin::check`] (the worker calls it when
//! a build ends, successfully or not, and the daemon when an export fails): the image must
//! still exist with the same ID and every layer directory the build mounted must still be there
//! (a deleted and re-loaded image has new directories). If not, the error is
//! [`Error::BaseImageLost`], naming the image and what the supervisor saw remove its pin,
//! instead of whatever `ENOENT` the layer store ran into.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bollard::errors::Error as DockerError;
use bollard::Docker;
use futures::StreamExt as _;

use crate::{Error, Result};

/// Label on pin containers: the berth instance that made them (`worker:<root>`).
pub const PIN_LABEL: &str = "dev.berth.pin";
/// Label on pin containers: the build that created the pin (later builds may share it).
pub const PIN_BUILD_LABEL: &str = "dev.berth.pin.build";
/// Label on pin containers: the image ID they keep.
pub const PIN_IMAGE_LABEL: &str = "dev.berth.pin.image";
/// Label on pin containers: the process ID of the berthd that made them.
pub const PIN_PID_LABEL: &str = "dev.berth.pin.pid";
/// Label on pin containers: what they are, for people reading `docker inspect`.
pub const PIN_ABOUT_LABEL: &str = "dev.berth.pin.about";

/// The pin process, built by `build.rs` from `pause/berth-pause.rs`.
const PAUSE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/berth-pause"));
/// Where the pin process is uploaded in the container.
const PAUSE_PATH: &str = "/.berth-pin";
/// How long to wait before asking a dockerd that dropped the connection again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);
/// How many pins in a row may be lost before the supervisor gives up re-pinning (a loop of
/// someone removing them as fast as berth makes them).
const MAX_REPINS: usize = 20;
/// How long a pin stays after its last build dropped it, so that back-to-back builds of the same
/// base (an edit-build loop, a CI job's steps) reuse the running container instead of each
/// paying for a new one. [`Pin::release`] does not linger.
const LINGER: Duration = Duration::from_secs(3);
/// Longest wait in [`Pin::release`] for the supervisor to end: it ends at its next step once it
/// sees the pin released, i.e. when its in-flight Docker request returns (a create, a start, the
/// long poll that the container's removal ends).
const SUPERVISOR_END: Duration = Duration::from_secs(30);

/// Whether pin containers get the pin process through a read-only bind mount of a file berthd
/// writes under its root (no upload on the pin's critical path; module docs). Cleared for the
/// rest of the process when dockerd does not see that file (berthd in a container, a remote
/// Engine): pins then get it uploaded.
static BIND_PAUSE: AtomicBool = AtomicBool::new(true);

/// Pin containers alive in this process.
static PINS_HELD: AtomicUsize = AtomicUsize::new(0);
/// Set by [`stop_pinning`]: no new pin containers (berthd is stopping).
static STOPPING: AtomicBool = AtomicBool::new(false);

/// How many pin containers this process holds now (for metrics and debugging).
pub fn pins_held() -> usize {
    PINS_HELD.load(Ordering::Relaxed)
}

/// Stops making pin containers in this process (new [`pin_image`] calls fail, supervisors stop
/// re-pinning); call when berthd stops, before [`remove_stale_pins`].
pub fn stop_pinning() {
    STOPPING.store(true, Ordering::SeqCst);
}

fn api_err(op: &'static str) -> impl FnOnce(DockerError) -> Error {
    move |source| Error::DockerApi {
        op,
        source: Box::new(source),
    }
}

fn is_404(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// "container is marked for removal and cannot be started" (409): a prune is removing it.
fn is_being_removed(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError { status_code: 409, message }
            if message.contains("marked for removal")
    )
}

/// An error that means dockerd did not answer at all (stopped, restarting), as opposed to an
/// answer.
fn is_unreachable(e: &DockerError) -> bool {
    !matches!(
        e,
        DockerError::DockerResponseServerError { .. }
            | DockerError::DockerContainerWaitError { .. }
    )
}

/// Whether `e`, from [`pin_image`] or [`super::resolve_base_image`], means the image is not in
/// Docker (any more): deleted, e.g. by a prune, between the caller's lookup and the pin's
/// creation, or with the created pin. The caller may resolve the reference again.
pub fn is_image_missing(e: &Error) -> bool {
    matches!(
        e,
        Error::DockerApi { op: "create pin container" | "inspect image", source } if is_404(source)
    )
}

/// Keeps an image from being deleted while a build uses it: a handle on the shared pin container
/// of that image (module docs). Cheap to clone; the container is removed [`LINGER`] after the
/// last handle of the process for that image goes (at once with [`Pin::release`]).
#[derive(Debug, Clone)]
#[must_use = "the pin is released when dropped"]
pub struct Pin {
    lease: Arc<Lease>,
}

/// One [`pin_image`] call's hold on the shared pin; when it goes, the pin lingers (see [`LINGER`]).
#[derive(Debug)]
struct Lease {
    /// `None` only while being released.
    shared: Option<Arc<Shared>>,
}

impl Lease {
    fn new(shared: Arc<Shared>) -> Arc<Lease> {
        Arc::new(Lease {
            shared: Some(shared),
        })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        // A pin without a container yet (a delayed one, see [`pin_image_after`]) has nothing
        // to reuse: it goes at once, and its creation with it.
        let keep = !STOPPING.load(Ordering::SeqCst)
            && !shared.state.lock().unwrap().given_up
            && shared.ready.get().is_some();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if keep => {
                rt.spawn(async move {
                    tokio::time::sleep(LINGER).await;
                    drop(shared);
                });
            }
            _ => drop(shared),
        }
    }
}

/// What identifies a pin container in this process.
type Key = (String, String);

fn registry() -> &'static Mutex<HashMap<Key, Weak<Shared>>> {
    static R: std::sync::OnceLock<Mutex<HashMap<Key, Weak<Shared>>>> = std::sync::OnceLock::new();
    R.get_or_init(Default::default)
}

/// The one pin of an image in this process.
#[derive(Debug)]
struct Shared {
    cfg: Arc<Config>,
    state: Arc<Mutex<State>>,
    /// Set once the first container exists.
    ready: tokio::sync::OnceCell<()>,
    /// Set once [`pin_image_in_background`] started creating the first container.
    creating: AtomicBool,
    /// `false` while a pin container is being started; `true` once it runs or the supervisor
    /// stopped trying.
    settled: Arc<tokio::sync::watch::Sender<bool>>,
    supervisor: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Set when the image was resolved again because this pin was lost before any layer was
    /// read: the pin and image every build that holds this pin uses instead (see
    /// [`Pin::resolve_again`]).
    replacement: tokio::sync::OnceCell<(Pin, super::BaseImage)>,
    /// Wakes a delayed first creation ([`pin_image_after`]) at once.
    start_now: Arc<tokio::sync::Notify>,
}

/// How to make (another) pin container of the image.
#[derive(Debug)]
struct Config {
    docker: Docker,
    key: Key,
    image: String,
    build_id: String,
}

#[derive(Debug, Default)]
struct State {
    /// The current pin container: (ID, name).
    container: Option<(String, String)>,
    /// Whether it is known to run.
    running: bool,
    /// Whether a container of this pin ever ran.
    ever_ran: bool,
    /// What happened to earlier pin containers of this image, oldest first.
    events: Vec<String>,
    /// Set when the pin cannot be kept any more (image gone, too many losses).
    given_up: bool,
    /// Set when the last handle went: the releaser removes `container`, the supervisor must
    /// not make another one (and removes one it made meanwhile).
    released: bool,
}

/// Pins `image` (an image ID; a reference works but is resolved by dockerd at creation) for
/// `build_id` of berth instance `instance`: reuses this process's pin of the image or creates
/// one. Returns once the container exists; it is started in the background (module docs).
pub async fn pin_image(
    docker: &Docker,
    image: &str,
    instance: &str,
    build_id: &str,
) -> Result<Pin> {
    let shared = shared_pin(docker, image, instance, build_id)?;
    create_first(&shared).await?;
    Ok(Pin {
        lease: Lease::new(shared),
    })
}

/// [`pin_image`] without waiting for anything: the pin container is created (and started) in the
/// background, so neither round trip is on the caller's path. Until its container exists the
/// image is not protected at all, and until it runs only from `docker rmi` and image prunes:
/// a caller that reads the image's layers meanwhile must make sure nothing it made from them is
/// used before [`Pin::holding`] (or [`Pin::check`]) says the layers were there all along. A
/// failed creation gives the pin up ([`Pin::given_up`]; the event says why).
pub fn pin_image_in_background(
    docker: &Docker,
    image: &str,
    instance: &str,
    build_id: &str,
) -> Result<Pin> {
    pin_image_after(docker, image, instance, build_id, Duration::ZERO)
}

/// [`pin_image_in_background`], but the pin container is created only once `delay` has passed
/// and some handle on the pin is still held (a build still uses the image), or at once when
/// something needs it to run ([`Pin::wait_running`], a later call without delay). A build that
/// ends within `delay` never makes a pin container: none of Docker's work of creating and
/// starting one competes with it. Until the pin runs, the caller's checks stand in for it
/// exactly as with [`pin_image_in_background`] (module docs).
pub fn pin_image_after(
    docker: &Docker,
    image: &str,
    instance: &str,
    build_id: &str,
    delay: Duration,
) -> Result<Pin> {
    let shared = shared_pin(docker, image, instance, build_id)?;
    if shared.ready.get().is_none() && shared.creating.swap(true, Ordering::SeqCst) {
        // Already under way, perhaps waiting out another build's delay.
        if delay.is_zero() {
            shared.start_now.notify_one();
        }
    } else if shared.ready.get().is_none() {
        let weak = Arc::downgrade(&shared);
        let start_now = shared.start_now.clone();
        tokio::spawn(async move {
            if !delay.is_zero() {
                // Not holding the pin meanwhile: when every build let go of it, it is gone and
                // nothing is made.
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = start_now.notified() => {}
                }
            }
            // Holds the pin until the container exists: a build that let go meanwhile still
            // gets it removed (the last handle's drop removes it).
            let Some(s) = weak.upgrade() else {
                return;
            };
            if let Err(e) = create_first(&s).await {
                let what = if is_image_missing(&e) {
                    format!(
                        "image {} was deleted from Docker before its pin container was created",
                        s.cfg.image
                    )
                } else {
                    format!(
                        "creating a pin container of image {} failed: {e}",
                        s.cfg.image
                    )
                };
                tracing::warn!(image = %s.cfg.image, error = %e, "pinning in the background failed");
                {
                    let mut st = s.state.lock().unwrap();
                    st.events.push(what);
                    give_up(&mut st);
                }
                s.settled.send_replace(true);
            }
        });
    }
    Ok(Pin {
        lease: Lease::new(shared),
    })
}

/// This process's live pin of `image` for `instance`, or a new one (no container yet).
fn shared_pin(docker: &Docker, image: &str, instance: &str, build_id: &str) -> Result<Arc<Shared>> {
    if STOPPING.load(Ordering::SeqCst) {
        return Err(Error::DockerStoreMismatch {
            what: format!("not pinning image {image}: berthd is stopping"),
        });
    }
    let key = (instance.to_string(), image.to_string());
    let mut reg = registry().lock().unwrap();
    let live = reg
        .get(&key)
        .and_then(Weak::upgrade)
        .filter(|s| !s.state.lock().unwrap().given_up);
    Ok(match live {
        Some(s) => s,
        None => {
            let s = Arc::new(Shared {
                cfg: Arc::new(Config {
                    docker: docker.clone(),
                    key: key.clone(),
                    image: image.to_string(),
                    build_id: build_id.to_string(),
                }),
                state: Default::default(),
                ready: tokio::sync::OnceCell::new(),
                creating: AtomicBool::new(false),
                settled: Arc::new(tokio::sync::watch::Sender::new(false)),
                supervisor: Mutex::new(None),
                replacement: tokio::sync::OnceCell::new(),
                start_now: Arc::new(tokio::sync::Notify::new()),
            });
            reg.insert(key, Arc::downgrade(&s));
            s
        }
    })
}

/// Creates the pin's first container (once; callers share it) and starts its supervisor.
async fn create_first(shared: &Arc<Shared>) -> Result<()> {
    shared
        .ready
        .get_or_try_init(|| async {
            let made = match create(&shared.cfg).await {
                Ok(c) => c,
                Err(e) => return Err(missing_or(&shared.cfg, e).await),
            };
            PINS_HELD.fetch_add(1, Ordering::Relaxed);
            shared.state.lock().unwrap().container = Some((made.id.clone(), made.name.clone()));
            let task = tokio::spawn(supervise(
                shared.cfg.clone(),
                shared.state.clone(),
                SettledOnExit(shared.settled.clone()),
                Arc::downgrade(shared),
                made,
            ));
            *shared.supervisor.lock().unwrap() = Some(task);
            Ok::<_, Error>(())
        })
        .await?;
    Ok(())
}

/// `e`, a failed create, unless the image is gone: a prune deleted it just before (404) or
/// while dockerd created the container (whatever dockerd answers then). Then the `inspect
/// image` 404, which [`is_image_missing`] recognises: the caller resolves the image again.
async fn missing_or(cfg: &Config, e: Error) -> Error {
    match cfg.docker.inspect_image(&cfg.image).await {
        Err(gone) if is_404(&gone) => api_err("inspect image")(gone),
        _ => e,
    }
}

/// A pin container made by [`create`]: ID, name, and whether the pin process is bind-mounted
/// (else [`start`] uploads it).
struct Made {
    id: String,
    name: String,
    bound: bool,
}

/// The file berthd bind-mounts into pin containers as the pin process: `<root>/pin-program-<sha256
/// prefix>` under the instance's root (`worker:<root>`), written once per process; `None` when
/// the instance names no absolute root or the file cannot be written (pins upload it then).
fn pause_file(instance: &str) -> Option<PathBuf> {
    use sha2::Digest as _;
    static WRITTEN: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    let root = std::path::Path::new(instance.strip_prefix("worker:")?);
    if !root.is_absolute() {
        return None;
    }
    let sum = hex::encode(sha2::Sha256::digest(PAUSE));
    let path = root.join(format!("pin-program-{}", &sum[..16]));
    let mut written = WRITTEN.lock().unwrap();
    if written.contains(&path) {
        return Some(path);
    }
    // Written whole under a temporary name and renamed: dockerd never sees a partial file. An
    // existing file is rewritten (it may have been changed).
    let write = || -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::create_dir_all(root)?;
        let tmp = root.join(format!(".pin-program-{}", crate::snapshot::random_token(8)));
        let r = std::fs::write(&tmp, PAUSE)
            .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o555)))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r
    };
    match write() {
        Ok(()) => {
            written.push(path.clone());
            Some(path)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "writing the pin program failed; pins get it uploaded");
            None
        }
    }
}

/// dockerd refused a bind mount because its source does not exist on its host.
fn is_missing_bind_source(e: &Error) -> bool {
    matches!(
        e,
        Error::DockerApi { op: "create pin container", source } if matches!(
            source.as_ref(),
            DockerError::DockerResponseServerError { status_code: 400, message }
                if message.contains("bind source path does not exist")
        )
    )
}

/// Creates a pin container of `cfg.image` (not started), with the pin process bind-mounted when
/// dockerd sees berthd's file ([`BIND_PAUSE`]), else to be uploaded by [`start`].
async fn create(cfg: &Config) -> Result<Made> {
    let bind = if BIND_PAUSE.load(Ordering::Relaxed) {
        pause_file(&cfg.key.0)
    } else {
        None
    };
    if let Some(file) = bind {
        match create_with(cfg, Some(&file)).await {
            Err(e) if is_missing_bind_source(&e) => {
                tracing::info!(path = %file.display(), "dockerd does not see berthd's root at the same path; pins get the pin program uploaded");
                BIND_PAUSE.store(false, Ordering::Relaxed);
            }
            r => return r,
        }
    }
    create_with(cfg, None).await
}

async fn create_with(cfg: &Config, bind: Option<&std::path::Path>) -> Result<Made> {
    let (instance, image) = (&cfg.key.0, &cfg.image);
    let short = image
        .trim_start_matches("sha256:")
        .chars()
        .take(12)
        .collect::<String>();
    let name = format!(
        "berth-pin-{}-{}",
        sanitize(&short),
        crate::snapshot::random_token(8)
    );
    let pid = std::process::id().to_string();
    let root = instance.strip_prefix("worker:").unwrap_or(instance);
    let labels = HashMap::from([
        (PIN_LABEL.to_string(), instance.to_string()),
        (PIN_BUILD_LABEL.to_string(), cfg.build_id.clone()),
        (PIN_IMAGE_LABEL.to_string(), image.to_string()),
        (PIN_PID_LABEL.to_string(), pid.clone()),
        (
            PIN_ABOUT_LABEL.to_string(),
            "berth keeps this image from being deleted while its builds use it in place; \
             berthd removes this container when they end (safe to prune around)"
                .to_string(),
        ),
    ]);
    let body = bollard::models::ContainerCreateBody {
        image: Some(image.to_string()),
        entrypoint: Some(vec![PAUSE_PATH.to_string()]),
        cmd: Some(vec![
            "--berthd-root".to_string(),
            root.to_string(),
            "--berthd-pid".to_string(),
            pid,
        ]),
        labels: Some(labels),
        working_dir: Some("/".to_string()),
        user: Some("65534:65534".to_string()),
        // berthd holds the pin's stdin open through an attach: when berthd goes (also killed),
        // dockerd closes it and the pin process exits (module docs).
        open_stdin: Some(true),
        stdin_once: Some(true),
        attach_stdin: Some(true),
        network_disabled: Some(true),
        stop_signal: Some("SIGTERM".to_string()),
        healthcheck: Some(bollard::models::HealthConfig {
            test: Some(vec!["NONE".to_string()]),
            ..Default::default()
        }),
        host_config: Some(bollard::models::HostConfig {
            network_mode: Some("none".to_string()),
            cap_drop: Some(vec!["ALL".to_string()]),
            security_opt: Some(vec!["no-new-privileges".to_string()]),
            log_config: Some(bollard::models::HostConfigLogConfig {
                typ: Some("none".to_string()),
                config: None,
            }),
            init: Some(false),
            cpu_shares: Some(2),
            mounts: bind.map(|file| {
                vec![bollard::models::Mount {
                    target: Some(PAUSE_PATH.to_string()),
                    source: Some(file.display().to_string()),
                    typ: Some(bollard::models::MountTypeEnum::BIND),
                    read_only: Some(true),
                    ..Default::default()
                }]
            }),
            // An exited pin (its berthd gone, stopped) leaves nothing in `docker ps -a`.
            auto_remove: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };
    let opts = bollard::query_parameters::CreateContainerOptions {
        name: Some(name.clone()),
        platform: String::new(),
    };
    let resp = cfg
        .docker
        .create_container(Some(opts), body)
        .await
        .map_err(api_err("create pin container"))?;
    tracing::debug!(container = %resp.id, %name, image, build_id = %cfg.build_id, bound = bind.is_some(), "image pinned");
    Ok(Made {
        id: resp.id,
        name,
        bound: bind.is_some(),
    })
}

/// The tar uploaded into a pin container: the pin process at [`PAUSE_PATH`].
fn pause_tar() -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_size(PAUSE.len() as u64);
    h.set_mode(0o555);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    let mut b = tar::Builder::new(Vec::new());
    let name = PAUSE_PATH.trim_start_matches('/');
    b.append_data(&mut h, name, PAUSE)
        .expect("in-memory tar cannot fail");
    b.into_inner().expect("in-memory tar cannot fail")
}

/// berthd's attach to a running pin container's stdin: the pin lives while it is held
/// (dropping it, or berthd's exit, closes the container's stdin and the pin process exits).
type StdinHold = bollard::container::AttachContainerResults;

/// Attaches to the container's stdin (the [`StdinHold`]) and, unless it is `bound`, uploads the
/// pin process, both at once, then starts the container. The attach comes first so that a pin
/// never runs without one: a container started before it would outlive a berthd killed in
/// between.
async fn start(
    docker: &Docker,
    id: &str,
    bound: bool,
) -> std::result::Result<StdinHold, DockerError> {
    let attach = bollard::query_parameters::AttachContainerOptions {
        stdin: true,
        stream: true,
        ..Default::default()
    };
    let upload = bollard::query_parameters::UploadToContainerOptions {
        path: "/".to_string(),
        ..Default::default()
    };
    let upload = async {
        if bound {
            return Ok(());
        }
        docker
            .upload_to_container(
                id,
                Some(upload),
                bollard::body_full(bytes::Bytes::from(pause_tar())),
            )
            .await
    };
    let (hold, uploaded) = tokio::join!(docker.attach_container(id, Some(attach)), upload);
    let hold = hold?;
    uploaded?;
    docker
        .start_container(id, None::<bollard::query_parameters::StartContainerOptions>)
        .await?;
    Ok(hold)
}

/// How a pin container ended, in words for the build error.
fn describe_exit(name: &str, code: i64) -> String {
    match code {
        137 => format!("pin container {name} was killed (SIGKILL: docker kill or docker rm -f)"),
        143 => format!(
            "pin container {name} was stopped (SIGTERM: docker stop, or dockerd shutting down)"
        ),
        130 => format!("pin container {name} was interrupted (SIGINT)"),
        0 => format!("pin container {name} exited: its stdin closed (berthd's attach to it ended)"),
        c => format!("pin container {name} exited with code {c}"),
    }
}

/// Marks the pin settled when the supervisor ends (returns or is aborted): nobody waits for a
/// start that will not come.
struct SettledOnExit(Arc<tokio::sync::watch::Sender<bool>>);

impl Drop for SettledOnExit {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

/// Starts the pin container `id`, waits for it to stop, records why, and pins again while
/// builds hold the pin and the image exists (module docs). Ends when the [`Shared`] is dropped
/// (the last handle went: `released`), when the image is gone, or after [`MAX_REPINS`] losses.
async fn supervise(
    cfg: Arc<Config>,
    state: Arc<Mutex<State>>,
    settled: SettledOnExit,
    owner: Weak<Shared>,
    made: Made,
) {
    let (mut id, mut bound) = (made.id, made.bound);
    let docker = &cfg.docker;
    let name_of = |state: &Mutex<State>| {
        state
            .lock()
            .unwrap()
            .container
            .as_ref()
            .map(|c| c.1.clone())
            .unwrap_or_default()
    };
    for attempt in 0..MAX_REPINS {
        if attempt > 1 {
            // Lost again and again: do not race whoever removes them in a tight loop.
            tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
        }
        let name = name_of(&state);
        super::fault::hold_point("pin:created").await;
        let started = std::time::Instant::now();
        let r = start(docker, &id, bound).await;
        if released(&state) {
            return;
        }
        let event = match r {
            Ok(hold) => {
                {
                    let mut st = state.lock().unwrap();
                    st.running = true;
                    st.ever_ran = true;
                }
                settled.0.send_replace(true);
                tracing::debug!(container = %id, took_ms = started.elapsed().as_millis() as u64, "pin container started");
                let event = wait_stopped(docker, &id, &name).await;
                drop(hold);
                if released(&state) {
                    return;
                }
                event
            }
            Err(e) if is_404(&e) || is_being_removed(&e) => {
                format!("pin container {name} was removed before it started (docker container prune or docker rm)")
            }
            Err(e) if is_unreachable(&e) => format!(
                "dockerd did not answer while starting pin container {name} ({e}); it stopped or restarted"
            ),
            Err(e) if bound => {
                // dockerd's host has a different file at that path: upload from now on.
                BIND_PAUSE.store(false, Ordering::Relaxed);
                tracing::warn!(image = %cfg.image, container = %id, error = %e, "starting a pin container with the bind-mounted pin program failed; pinning again with it uploaded");
                format!("pin container {name} could not be started with the bind-mounted pin program ({e})")
            }
            Err(e) => {
                // Not going to change by trying again; the created container still keeps the
                // image from `docker rmi` and image prunes, and is removed with the pin.
                tracing::warn!(image = %cfg.image, container = %id, error = %e, "starting the pin container failed; the image is pinned by a created container only");
                let mut st = state.lock().unwrap();
                st.events
                    .push(format!("pin container {name} could not be started: {e}"));
                return;
            }
        };
        tracing::warn!(image = %cfg.image, container = %id, what = %event, "image pin lost");
        {
            let mut st = state.lock().unwrap();
            st.running = false;
            st.events.push(event);
        }
        // The lost container is removed by whoever removed it, or now (stopped, still there).
        let _ = remove_container(docker, &id).await;
        // Pin again if builds still hold the pin and the image is still there.
        if owner.strong_count() == 0 || STOPPING.load(Ordering::SeqCst) || released(&state) {
            return;
        }
        let image_there = loop {
            match docker.inspect_image(&cfg.image).await {
                Ok(_) => break true,
                Err(e) if is_404(&e) => break false,
                Err(e) if is_unreachable(&e) => tokio::time::sleep(RECONNECT_PAUSE).await,
                Err(_) => break false,
            }
            if owner.strong_count() == 0 || STOPPING.load(Ordering::SeqCst) {
                return;
            }
        };
        if !image_there {
            let mut st = state.lock().unwrap();
            st.events
                .push(format!("image {} was then deleted from Docker", cfg.image));
            give_up(&mut st);
            return;
        }
        if released(&state) {
            return;
        }
        match create(&cfg).await {
            Ok(Made {
                id: new_id,
                name: new_name,
                bound: new_bound,
            }) => {
                bound = new_bound;
                let released = {
                    let mut st = state.lock().unwrap();
                    if !st.released {
                        st.container = Some((new_id.clone(), new_name));
                    }
                    st.released
                };
                if released {
                    let _ = remove_container(docker, &new_id).await;
                    return;
                }
                tracing::info!(image = %cfg.image, container = %new_id, "image pinned again");
                settled.0.send_replace(false);
                id = new_id;
            }
            Err(e) => {
                let mut st = state.lock().unwrap();
                st.events
                    .push(format!("pinning image {} again failed: {e}", cfg.image));
                give_up(&mut st);
                return;
            }
        }
    }
    let mut st = state.lock().unwrap();
    st.events.push(format!(
        "gave up after {MAX_REPINS} pin containers were lost"
    ));
    give_up(&mut st);
}

/// Whether the last handle went (see [`State::released`]).
fn released(state: &Mutex<State>) -> bool {
    state.lock().unwrap().released
}

/// No more pin containers for this image (the current one is gone).
fn give_up(st: &mut State) {
    st.given_up = true;
    if st.container.take().is_some() {
        PINS_HELD.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Waits until the running pin container `id` stops (long poll; reconnects when the client
/// times out); returns what ended it.
async fn wait_stopped(docker: &Docker, id: &str, name: &str) -> String {
    loop {
        let opts = bollard::query_parameters::WaitContainerOptions {
            condition: "not-running".to_string(),
        };
        let mut s = docker.wait_container(id, Some(opts));
        let r = s.next().await;
        drop(s);
        let removed = |what: String| async move {
            match docker
                .inspect_container(
                    id,
                    None::<bollard::query_parameters::InspectContainerOptions>,
                )
                .await
            {
                Err(e) if is_404(&e) => format!("{what}, and removed"),
                _ => what,
            }
        };
        match r {
            Some(Ok(resp)) => return removed(describe_exit(name, resp.status_code)).await,
            Some(Err(DockerError::DockerContainerWaitError { code, .. })) => {
                return removed(describe_exit(name, code)).await
            }
            Some(Err(e)) if is_404(&e) => {
                return format!("pin container {name} was removed (docker rm -f)")
            }
            Some(Err(DockerError::RequestTimeoutError)) => continue,
            Some(Err(e)) if is_unreachable(&e) => {
                return format!(
                    "the connection to dockerd broke while it ran pin container {name} ({e}): dockerd stopped or restarted"
                )
            }
            Some(Err(e)) => return format!("waiting on pin container {name} failed: {e}"),
            None => {
                return format!(
                    "the connection to dockerd ended while it ran pin container {name}: dockerd stopped or restarted"
                )
            }
        }
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect()
}

async fn remove_container(docker: &Docker, id: &str) -> Result<()> {
    let opts = bollard::query_parameters::RemoveContainerOptions {
        v: true,
        force: true,
        link: false,
    };
    match docker.remove_container(id, Some(opts)).await {
        Ok(()) => Ok(()),
        Err(e) if is_404(&e) => Ok(()),
        Err(e) => Err(api_err("remove pin container")(e)),
    }
}

impl Pin {
    /// The current pin container's ID (empty if the pin was given up).
    pub fn container_id(&self) -> String {
        self.shared()
            .state
            .lock()
            .unwrap()
            .container
            .as_ref()
            .map(|c| c.0.clone())
            .unwrap_or_default()
    }

    /// The image ID (or reference) pinned.
    pub fn image(&self) -> &str {
        &self.shared().cfg.image
    }

    /// Whether the pin stopped trying: its container is gone and the image was deleted (or too
    /// many containers were lost). Callers that have not read the image's layers yet may
    /// resolve the image again.
    pub fn given_up(&self) -> bool {
        self.shared().state.lock().unwrap().given_up
    }

    /// Whether `self` and `other` are handles on the same pin.
    pub fn same_pin(&self, other: &Pin) -> bool {
        Arc::ptr_eq(self.shared(), other.shared())
    }

    /// Whether the current pin container is known to run (its start may still be under way).
    pub fn is_running(&self) -> bool {
        self.shared().state.lock().unwrap().running
    }

    /// Whether the pin's first container runs and no container of it was ever lost: since that
    /// container's creation, the image could not have been deleted without force.
    pub fn holding(&self) -> bool {
        let st = self.shared().state.lock().unwrap();
        st.running && st.events.is_empty() && !st.given_up
    }

    /// Whether a container of this pin ever ran (a pin lost before that was lost to a routine
    /// cleanup, e.g. `docker container prune`, not only to a forced removal).
    pub fn ever_ran(&self) -> bool {
        self.shared().state.lock().unwrap().ever_ran
    }

    /// Waits (at most `timeout`) until the pin container runs, or the pin stopped trying; returns
    /// whether it runs. Until then only a created container keeps the image, which `docker
    /// container prune` removes: callers wait before the image's layers are first read.
    pub async fn wait_running(&self, timeout: Duration) -> bool {
        // Whoever waits needs it now: a delayed creation starts at once.
        self.shared().start_now.notify_one();
        let mut rx = self.shared().settled.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|s| *s)).await;
        self.is_running()
    }

    /// Releases this handle; if it was the last one, removes the pin container (no lingering)
    /// and waits (at most [`SUPERVISOR_END`]) until its supervisor ended, having removed any
    /// container it was making meanwhile, before returning.
    pub async fn release(self) -> Result<()> {
        let Ok(mut lease) = Arc::try_unwrap(self.lease) else {
            return Ok(());
        };
        let Some(Ok(shared)) = lease.shared.take().map(Arc::try_unwrap) else {
            return Ok(());
        };
        let (docker, id, supervisor) = shared.take_for_removal();
        let removed = match id {
            Some(id) => remove_container(&docker, &id).await,
            None => Ok(()),
        };
        if let Some(task) = supervisor {
            if tokio::time::timeout(SUPERVISOR_END, task).await.is_err() {
                tracing::warn!(image = %shared.cfg.image, "the pin's supervisor did not end within {SUPERVISOR_END:?} of its release; a container it makes is removed by remove_stale_pins");
            }
        }
        removed
    }

    fn shared(&self) -> &Arc<Shared> {
        self.lease
            .shared
            .as_ref()
            .expect("a lease has its pin until dropped")
    }

    /// Resolves the image again with `resolve` (which pins the new image), once for every build
    /// that holds this pin: a build that finds the pin lost before any layer was read calls it;
    /// the builds that share its work (the same base vertex) find the result with
    /// [`Pin::latest`]. The new pin is held as long as this one.
    pub async fn resolve_again<E, F, Fut>(
        &self,
        resolve: F,
    ) -> std::result::Result<(Pin, super::BaseImage), E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<(Pin, super::BaseImage), E>>,
    {
        self.shared()
            .replacement
            .get_or_try_init(resolve)
            .await
            .cloned()
    }

    /// The pin (and image) that stands for this one now: itself, or the end of the chain of
    /// [`Pin::resolve_again`] results.
    pub fn latest(&self) -> (Pin, Option<super::BaseImage>) {
        let (mut pin, mut image) = (self.clone(), None);
        while let Some((p, i)) = pin.shared().replacement.get().cloned() {
            (pin, image) = (p, Some(i));
        }
        (pin, image)
    }

    /// Whether the pin was lost at least once and does not run now (a new container may be
    /// under way, or it gave up): the image may be gone.
    pub fn lost(&self) -> bool {
        let st = self.shared().state.lock().unwrap();
        st.given_up || (!st.running && !st.events.is_empty())
    }

    /// Checks that the layers a build mounted from the pinned image are all still there: the
    /// image exists with this ID and every dir of `layer_dirs` exists. Otherwise returns
    /// [`Error::BaseImageLost`] naming `reference` and what removed the pin.
    pub async fn check(&self, reference: &str, layer_dirs: &[PathBuf]) -> Result<()> {
        let cfg = &self.shared().cfg;
        let dirs_ok = layer_dirs.iter().all(|d| d.is_dir());
        let image = cfg.docker.inspect_image(&cfg.image).await;
        let why_image = match (&image, dirs_ok) {
            (Ok(i), true) if i.id.as_deref() == Some(cfg.image.as_str()) => return Ok(()),
            // A reference pinned (not an ID): the dirs decide.
            (Ok(_), true) if !cfg.image.starts_with("sha256:") => return Ok(()),
            // dockerd does not answer (restarting?): the layers are there, that is what counts.
            (Err(e), true) if is_unreachable(e) => return Ok(()),
            (Err(e), _) if is_404(e) => "the image was deleted from Docker".to_string(),
            (Err(e), _) if is_unreachable(e) => {
                format!("its layer directories are gone and dockerd does not answer ({e})")
            }
            (Err(e), _) => format!("inspecting the image failed ({e})"),
            (Ok(_), _) => "its layer directories are gone (the image was deleted and loaded again)"
                .to_string(),
        };
        let (pin_events, current) = {
            let st = self.shared().state.lock().unwrap();
            (st.events.clone(), st.container.clone())
        };
        let cause = if pin_events.is_empty() {
            // The supervisor has not seen it yet: ask dockerd about the pin container itself.
            let pin = match &current {
                Some((id, name)) => match cfg
                    .docker
                    .inspect_container(
                        id,
                        None::<bollard::query_parameters::InspectContainerOptions>,
                    )
                    .await
                {
                    Err(e) if is_404(&e) => {
                        format!("pin container {name} was removed (docker rm -f)")
                    }
                    Ok(c) if c.state.as_ref().and_then(|s| s.running) != Some(true) => {
                        describe_exit(name, c.state.and_then(|s| s.exit_code).unwrap_or(-1))
                    }
                    Ok(_) => format!("pin container {name} is running"),
                    Err(e) => format!("pin container {name} could not be inspected ({e})"),
                },
                None if self.shared().ready.get().is_none() => {
                    "the image had no pin container yet (a build is pinned once it outlives the pin delay)".to_string()
                }
                None => "the image had no pin container".to_string(),
            };
            format!("{pin}; {why_image}")
        } else {
            format!("{}; {why_image}", pin_events.join("; "))
        };
        // Later builds must not reuse this pin.
        self.shared().state.lock().unwrap().given_up = true;
        Err(Error::BaseImageLost {
            reference: reference.to_string(),
            image: cfg.image.clone(),
            cause,
        })
    }
}

impl Shared {
    /// Marks the pin released and takes the current container for removal and the supervisor
    /// (to wait for, or to leave running).
    #[allow(clippy::type_complexity)]
    fn take_for_removal(&self) -> (Docker, Option<String>, Option<tokio::task::JoinHandle<()>>) {
        // Not aborted: it may be between creating a container and recording it. It sees
        // `released` at its next step, removes what it made and ends (a long poll on the
        // container ends with the container's removal).
        let supervisor = self.supervisor.lock().unwrap().take();
        let id = {
            let mut st = self.state.lock().unwrap();
            st.released = true;
            st.container.take().map(|c| c.0)
        };
        if id.is_some() {
            PINS_HELD.fetch_sub(1, Ordering::Relaxed);
        }
        let mut reg = registry().lock().unwrap();
        if reg
            .get(&self.cfg.key)
            .is_some_and(|w| w.strong_count() == 0)
        {
            reg.remove(&self.cfg.key);
        }
        (self.cfg.docker.clone(), id, supervisor)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let (docker, id, _supervisor) = self.take_for_removal();
        let Some(id) = id else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            // In the background: releasing is not on the build's critical path. If the runtime
            // shuts down first, berthd's sweep at stop (or at the next start) removes it.
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(e) = remove_container(&docker, &id).await {
                        tracing::warn!(container = %id, error = %e, "removing a released pin failed (remove_stale_pins retries)");
                    }
                });
            }
            Err(_) => {
                let r = std::thread::scope(|s| {
                    s.spawn(|| {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .map_err(|e| Error::Io {
                                op: "start runtime for pin removal",
                                path: Default::default(),
                                source: e,
                            })?;
                        rt.block_on(remove_container(&docker, &id))
                    })
                    .join()
                    .unwrap_or_else(|_| {
                        Err(Error::DockerStoreMismatch {
                            what: "pin removal thread panicked".into(),
                        })
                    })
                });
                if let Err(e) = r {
                    tracing::warn!(container = %id, error = %e, "removing a dropped pin failed (remove_stale_pins retries)");
                }
            }
        }
    }
}

/// Removes every pin container of berth instance `instance` (berthd calls it at start and at
/// stop); returns how many.
pub async fn remove_stale_pins(docker: &Docker, instance: &str) -> Result<usize> {
    let filters = HashMap::from([("label".to_string(), vec![format!("{PIN_LABEL}={instance}")])]);
    let opts = bollard::query_parameters::ListContainersOptions {
        all: true,
        filters: Some(filters),
        ..Default::default()
    };
    let list = docker
        .list_containers(Some(opts))
        .await
        .map_err(api_err("list pin containers"))?;
    let mut n = 0;
    for c in list {
        // The filter is applied by dockerd; check the label again so nothing else is ever removed.
        let ours = c
            .labels
            .as_ref()
            .and_then(|l| l.get(PIN_LABEL))
            .is_some_and(|v| v == instance);
        if let (true, Some(id)) = (ours, c.id) {
            remove_container(docker, &id).await?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_is_a_static_elf_for_this_arch() {
        assert!(
            PAUSE.len() > 64 && PAUSE.len() < 64 * 1024,
            "{}",
            PAUSE.len()
        );
        assert_eq!(&PAUSE[..4], b"\x7fELF");
        // ET_EXEC (static, not PIE) and no PT_INTERP: runs without a loader in any image.
        assert_eq!(u16::from_le_bytes([PAUSE[16], PAUSE[17]]), 2);
        let machine = u16::from_le_bytes([PAUSE[18], PAUSE[19]]);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(machine, 62);
        #[cfg(target_arch = "aarch64")]
        assert_eq!(machine, 183);
        let phoff = u64::from_le_bytes(PAUSE[32..40].try_into().unwrap()) as usize;
        let phentsize = u16::from_le_bytes([PAUSE[54], PAUSE[55]]) as usize;
        let phnum = u16::from_le_bytes([PAUSE[56], PAUSE[57]]) as usize;
        for i in 0..phnum {
            let off = phoff + i * phentsize;
            let p_type = u32::from_le_bytes(PAUSE[off..off + 4].try_into().unwrap());
            assert_ne!(p_type, 3, "PT_INTERP present: not static");
        }
    }

    #[test]
    fn pause_tar_holds_the_program_executable() {
        let tar = pause_tar();
        let mut a = tar::Archive::new(&tar[..]);
        let mut entries = a.entries().unwrap();
        let mut e = entries.next().unwrap().unwrap();
        assert_eq!(e.path().unwrap().to_str(), Some(".berth-pin"));
        assert_eq!(e.header().mode().unwrap(), 0o555);
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut body).unwrap();
        assert_eq!(body, PAUSE);
        assert!(entries.next().is_none());
    }

    #[test]
    fn exit_codes_name_their_cause() {
        for (code, want) in [
            (137, "docker rm -f"),
            (143, "docker stop"),
            (130, "SIGINT"),
            (3, "code 3"),
        ] {
            let d = describe_exit("berth-pin-x", code);
            assert!(d.contains(want) && d.contains("berth-pin-x"), "{d}");
        }
    }
}
