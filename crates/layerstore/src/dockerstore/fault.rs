//! Fault injection for crash-safety tests of every write berth makes into a Docker store.
//!
//! Each export mode marks its steps with [`fault_point`]. When the process was started with
//! `BERTH_FAULT_KILL=<step>` in its environment (a test-only knob), reaching that step makes the
//! process send itself `SIGKILL` — a real `kill -9`: no destructors, no flush, exactly what an OOM
//! kill or a power cut does to the writer. Without the variable a fault point costs one load of an
//! already initialised `OnceLock`.
//!
//! Step names are `<mode>:<step>`; [`STEPS`] lists them per mode in the order they are reached.
//!
//! Hold points ([`hold_point`], [`HOLD_STEPS`]) are the gentle sibling: with
//! `BERTH_FAULT_HOLD=<dir>` a build waits at an armed step until the test releases it, so an
//! integration test can act on Docker (prune, remove the base) at an exact phase of a build.

use std::sync::OnceLock;

/// The environment variable naming the step at which the process kills itself.
pub const FAULT_ENV: &str = "BERTH_FAULT_KILL";

/// Steps of the classic-store thin load into a live dockerd (`crates/exporter/src/docker_load.rs`).
pub const LIVE_STEPS: &[&str] = &[
    // Layer digests known, nothing sent yet.
    "live:before-load",
    // The load request is streaming: the manifest and part of the layer tars are with dockerd.
    "live:mid-load",
    // dockerd registered the image; no tag applied yet.
    "live:loaded",
    // The first name is tagged, the others not yet.
    "live:tagged-first",
    // Every name tagged; the exporter response not yet sent.
    "live:tagged",
];

/// Steps of the direct write into a stopped dockerd's data root (`writer.rs`).
pub const OFFLINE_STEPS: &[&str] = &[
    // `overlay2/berth-staging-<id>/` exists, marker inside, not renamed yet.
    "offline:layer-staged",
    // The marked layer dir exists with `diff/`, `link`, `l/<link>`; the tree is not copied yet.
    "offline:layer-dir",
    // The tree and the tar-split are written; the layerdb write-set is not complete.
    "offline:layer-tree",
    // The write-set is complete and fsynced in `layerdb/tmp`, not renamed yet.
    "offline:write-set",
    // Renamed into `layerdb/sha256/<chainID>` (committed); the marker is still there.
    "offline:layer-committed",
    // Every layer committed; the image config not written.
    "offline:layers-done",
    // The image config's temp file is written, not renamed into `imagedb/content` yet.
    "offline:image-tmp",
    // The image config is in imagedb; no tag written.
    "offline:image",
    // `repositories.json`'s temp file is written, not renamed yet.
    "offline:tags-tmp",
    // Tags written.
    "offline:tagged",
];

/// Steps of the export into a containerd image store (`crates/exporter/src/containerd.rs`).
/// After the lease, the new layers' snapshots, their tar blobs and the config and manifest are
/// written concurrently (config and manifest once the first snapshot is prepared), so when one
/// of the middle steps is reached the others may be done or under way; only the image record
/// waits for all of them.
pub const CONTAINERD_STEPS: &[&str] = &[
    // The export lease exists; nothing else.
    "containerd:lease",
    // A snapshot is prepared for a new layer; nothing written into it.
    "containerd:snapshot-prepared",
    // The layer's files are in the prepared snapshot; not committed.
    "containerd:snapshot-written",
    // The snapshot is committed under its chainID.
    "containerd:snapshot-committed",
    // The config blob is in the content store.
    "containerd:config",
    // The new layers' tar blobs are in the content store.
    "containerd:layer-blobs",
    // The manifest blob is in the content store; no image record.
    "containerd:manifest",
    // The image record exists; the lease not yet deleted.
    "containerd:image",
];

/// Every step of every mode.
pub const STEPS: &[&[&str]] = &[LIVE_STEPS, OFFLINE_STEPS, CONTAINERD_STEPS];

fn armed() -> Option<&'static str> {
    static STEP: OnceLock<Option<String>> = OnceLock::new();
    STEP.get_or_init(|| std::env::var(FAULT_ENV).ok().filter(|s| !s.is_empty()))
        .as_deref()
}

/// Marks `step`; kills the process with `SIGKILL` if `BERTH_FAULT_KILL` names it.
#[inline]
pub fn fault_point(step: &str) {
    if let Some(armed) = armed() {
        if armed == step {
            kill_self(step);
        }
    }
}

#[cold]
fn kill_self(step: &str) -> ! {
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "{FAULT_ENV}: killing process {} with SIGKILL at {step}",
        std::process::id()
    );
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    // SIGKILL cannot be caught; the process is gone before this line.
    loop {
        std::thread::park();
    }
}

/// The environment variable naming a directory of armed hold points (a test-only knob, like
/// [`FAULT_ENV`]): see [`hold_point`].
pub const HOLD_ENV: &str = "BERTH_FAULT_HOLD";

/// Longest a hold point holds: a test that armed it and died must not hang the process.
pub const HOLD_MAX: std::time::Duration = std::time::Duration::from_secs(120);

/// Hold points in the order a build with an exec on a base image used in place reaches them
/// (`pin.rs`, `crates/worker/src/ops/source_image.rs`, `ops/exec.rs`,
/// `crates/exporter/src/docker_load.rs`, `crates/exporter/src/containerd.rs`).
pub const HOLD_STEPS: &[&str] = &[
    // A pin container is created, not started yet (`docker container prune` removes it).
    "pin:created",
    // The base image is resolved and its pin runs; none of its layers read yet.
    "base:pinned",
    // An exec's process ended; its mounts (base layers as lower dirs) are still in place and
    // its output is not committed yet.
    "exec:before-commit",
    // The live export is about to send the image to dockerd.
    "live:before-load",
    // dockerd registered the exported image; it is not tagged yet.
    "live:loaded",
    // Containerd image store (`source_image.rs`): a pull wrote the image and its record under
    // the build's lease; the build has not read it yet.
    "containerd-pull:pulled",
    // Containerd image store: the Engine has the image and the build's lease exists, holding
    // nothing of it yet.
    "containerd-base:found",
    // Containerd image store (`crates/exporter/src/containerd.rs`): the build's solve is over
    // and its ops are dropped; the export has not started (the result alone holds the bases).
    "containerd-export:start",
];

fn hold_dir() -> Option<&'static std::path::Path> {
    static DIR: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        std::env::var_os(HOLD_ENV)
            .filter(|s| !s.is_empty())
            .map(Into::into)
    })
    .as_deref()
}

/// Marks hold point `step`. When the process was started with `BERTH_FAULT_HOLD=<dir>` and the
/// file `<dir>/<step>` exists (the test armed the step), renames it to `<dir>/<step>.held` (so
/// one arrival holds, the next ones pass) and waits until that file is removed (the test
/// released it) or [`HOLD_MAX`] passed. Lets a test act on Docker at an exact phase of a build
/// without sleeps. Without the variable it costs one load of an initialised `OnceLock`.
pub async fn hold_point(step: &str) {
    let Some(dir) = hold_dir() else {
        return;
    };
    let held = dir.join(format!("{step}.held"));
    if std::fs::rename(dir.join(step), &held).is_err() {
        return;
    }
    tracing::warn!(
        step,
        "{HOLD_ENV}: holding until {} is removed",
        held.display()
    );
    let deadline = std::time::Instant::now() + HOLD_MAX;
    while held.exists() {
        if std::time::Instant::now() >= deadline {
            tracing::warn!(
                step,
                "{HOLD_ENV}: not released within {HOLD_MAX:?}; going on"
            );
            let _ = std::fs::remove_file(&held);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_are_unique_and_prefixed_by_mode() {
        let mut seen = std::collections::BTreeSet::new();
        for (mode, steps) in ["live:", "offline:", "containerd:"].iter().zip(STEPS) {
            for s in *steps {
                assert!(s.starts_with(mode), "{s}");
                assert!(seen.insert(*s), "duplicate {s}");
            }
        }
    }

    #[tokio::test]
    async fn unarmed_hold_point_returns() {
        // The test process never sets the variable.
        hold_point("base:pinned").await;
    }

    #[test]
    fn unarmed_fault_point_returns() {
        // The test process never sets the variable to a real step.
        fault_point("live:not-a-step");
    }
}
