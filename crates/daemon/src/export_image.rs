//! The `image` exporter (alias `moby`): the result becomes an image in the Docker Engine berthd is
//! bound to, through [`exporter::ImageTarget`] (thin load into a live classic store, direct write
//! into a stopped daemon's data root, or containerd). This module maps attributes, progress and
//! the exporter response the way buildkitd does (`control-api.md` §6.2, §8.3):
//!
//! - attrs: `name` (comma-separated; `*` takes `image.name` from the result metadata),
//!   `source-date-epoch`, `push` (refused: pushing is not available yet), `store`/`unpack`
//!   (accepted, the image is always stored);
//! - progress: a vertex `exporting to image` with the statuses `exporting layers` (bytes of the
//!   layers Docker lacked), `writing image sha256:…` and one `naming to <name>` per name;
//! - response: `containerimage.digest`, `containerimage.config.digest`,
//!   `containerimage.descriptor` and `image.name`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use exporter::{ImageExportRequest, ImageTarget, TargetOptions};
use layerstore::snapshot::SnapshotStore;

use crate::errors::{Error, Result};
use crate::progress::{synthetic_digest, Progress};
use crate::solver::FsRef;

/// Where the image exporter sends images.
#[derive(Debug, Clone)]
pub struct ImageExportOptions {
    /// Docker Engine address (`unix:///…` or `tcp://…`).
    pub docker_host: String,
    /// `--docker-data-root`, if given.
    pub data_root: Option<PathBuf>,
}

/// Names to apply: the `name` attr split on commas; `*` stands for the result's `image.name`.
pub(crate) fn names(
    attrs: &BTreeMap<String, String>,
    metadata: &BTreeMap<String, Bytes>,
) -> Vec<String> {
    let mut out = Vec::new();
    for n in attrs
        .get("name")
        .map(String::as_str)
        .unwrap_or("")
        .split(',')
    {
        let n = n.trim();
        if n == "*" {
            if let Some(v) = metadata.get("image.name") {
                out.extend(
                    String::from_utf8_lossy(v)
                        .split(',')
                        .map(|s| s.trim().to_string()),
                );
            }
        } else if !n.is_empty() {
            out.push(n.to_string());
        }
    }
    out.retain(|n| !n.is_empty());
    out
}

fn truthy(attrs: &BTreeMap<String, String>, key: &str) -> Result<bool> {
    match attrs.get(key).map(String::as_str) {
        None | Some("") | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(v) => Err(Error::invalid(format!(
            "invalid boolean {v:?} for exporter attribute {key}"
        ))),
    }
}

/// Exports `fs` as an image; returns the exporter response.
pub async fn export(
    opts: &ImageExportOptions,
    store: &SnapshotStore,
    session_id: &str,
    progress: &Arc<Progress>,
    attrs: &BTreeMap<String, String>,
    metadata: &BTreeMap<String, Bytes>,
    fs: &FsRef,
) -> Result<BTreeMap<String, String>> {
    if truthy(attrs, "push")? {
        return Err(Error::unimplemented(
            "exporter image: push=true is not supported by berthd yet",
        ));
    }
    let epoch =
        match attrs.get("source-date-epoch").map(String::as_str) {
            None | Some("") => None,
            Some(v) => {
                let secs: i64 = v.parse().map_err(|_| {
                    Error::invalid(format!(
                        "invalid source-date-epoch {v:?}: want seconds since the epoch"
                    ))
                })?;
                Some(chrono::DateTime::from_timestamp(secs, 0).ok_or_else(|| {
                    Error::invalid(format!("source-date-epoch {v} is out of range"))
                })?)
            }
        };
    let names = names(attrs, metadata);
    let chain = match fs {
        FsRef::Scratch => Vec::new(),
        FsRef::Solved(r) => r.chain().layers().to_vec(),
    };
    let config = metadata.get("containerimage.config").map(|b| b.to_vec());

    let vertex = synthetic_digest(&format!("{session_id}-export"));
    progress.vertex_started(&vertex, "exporting to image", &[], None, SystemTime::now());
    let res = async {
        let docker = crate::docker::connect(&opts.docker_host)?;
        let target = ImageTarget::detect(
            docker,
            &TargetOptions {
                data_root: opts.data_root.clone(),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| Error::unavailable(format!("exporter image: {e}")))?;
        tracing::debug!(mode = target.mode(), ?chain, "exporting image");
        let started = SystemTime::now();
        progress.status(&vertex, "exporting layers", "", 0, 0, Some(started), None);
        let result = target
            .export(
                store,
                ImageExportRequest {
                    chain: &chain,
                    config: config.as_deref(),
                    names: names.clone(),
                    epoch,
                },
            )
            .await
            .map_err(|e| Error::unavailable(format!("exporter image ({}): {e}", target.mode())))?;
        let done = SystemTime::now();
        progress.status(
            &vertex,
            "exporting layers",
            "",
            result.bytes_sent as i64,
            result.bytes_sent as i64,
            Some(started),
            Some(done),
        );
        if result.layers_skipped > 0 {
            let id = format!(
                "{} layers already in Docker ({} bytes not sent)",
                result.layers_skipped, result.bytes_skipped
            );
            progress.status(&vertex, &id, "", 0, 0, Some(started), Some(done));
        }
        progress.status(
            &vertex,
            &format!("writing image {}", result.config_digest),
            "",
            0,
            0,
            Some(started),
            Some(done),
        );
        for n in &result.names {
            progress.status(
                &vertex,
                &format!("naming to {n}"),
                "",
                0,
                0,
                Some(done),
                Some(SystemTime::now()),
            );
        }
        let mut response = BTreeMap::new();
        response.insert(
            "containerimage.digest".to_string(),
            result.manifest_digest.clone(),
        );
        response.insert(
            "containerimage.config.digest".to_string(),
            result.config_digest.clone(),
        );
        response.insert(
            "containerimage.descriptor".to_string(),
            result.descriptor.clone(),
        );
        if !result.names.is_empty() {
            response.insert("image.name".to_string(), result.names.join(","));
        }
        Ok::<_, Error>(response)
    }
    .await;
    match &res {
        Ok(_) => progress.vertex_completed(&vertex, false, None, SystemTime::now()),
        Err(e) => progress.vertex_completed(&vertex, false, Some(e.to_string()), SystemTime::now()),
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_and_star_takes_metadata() {
        let mut attrs = BTreeMap::new();
        attrs.insert("name".to_string(), "a:1, b ,*".to_string());
        let mut md = BTreeMap::new();
        md.insert("image.name".to_string(), Bytes::from_static(b"c:2,d"));
        assert_eq!(names(&attrs, &md), ["a:1", "b", "c:2", "d"]);
        assert!(names(&BTreeMap::new(), &md).is_empty());
    }

    #[test]
    fn push_must_be_a_boolean() {
        let mut attrs = BTreeMap::new();
        attrs.insert("push".to_string(), "yes".to_string());
        assert!(truthy(&attrs, "push").is_err());
        attrs.insert("push".to_string(), "false".to_string());
        assert!(!truthy(&attrs, "push").unwrap());
    }
}
