//! [`remove_snapshots`]: the one sweep of snapshots a killed berthd left in containerd, shared by
//! the base-image views of this crate and the export's prepared snapshots
//! (`exporter::ContainerdStore`).

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{ListSnapshotsRequest, RemoveSnapshotRequest};
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::{Error, Result};

fn in_namespace<T>(msg: T, namespace: &str) -> Request<T> {
    let mut r = Request::new(msg);
    if let Ok(ns) = namespace.parse() {
        r.metadata_mut().insert("containerd-namespace", ns);
    }
    r
}

fn cd_err(what: String) -> impl FnOnce(tonic::Status) -> Error {
    move |s| Error::Containerd {
        what,
        code: s.code(),
        message: s.message().to_string(),
    }
}

/// Removes every snapshot of `snapshotter` (in `namespace`) labelled `label` = `value` whose key
/// starts with `prefix`, and returns how many it removed. Snapshots removed meanwhile by someone
/// else are not an error. Only active snapshots (views, prepared keys) carry those labels and
/// prefixes; committed snapshots are left to containerd's GC.
pub async fn remove_snapshots(
    channel: &Channel,
    namespace: &str,
    snapshotter: &str,
    (label, value): (&str, &str),
    prefix: &str,
) -> Result<usize> {
    let mut snaps = SnapshotsClient::new(channel.clone());
    let mut stream = snaps
        .list(in_namespace(
            ListSnapshotsRequest {
                snapshotter: snapshotter.to_string(),
                filters: vec![format!("labels.\"{label}\"=={value}")],
            },
            namespace,
        ))
        .await
        .map_err(cd_err("list snapshots".into()))?
        .into_inner();
    let mut keys = Vec::new();
    while let Some(batch) = stream
        .message()
        .await
        .map_err(cd_err("list snapshots".into()))?
    {
        keys.extend(
            batch
                .info
                .into_iter()
                .filter(|i| i.name.starts_with(prefix))
                .map(|i| i.name),
        );
    }
    let mut removed = 0;
    for key in keys {
        match snaps
            .remove(in_namespace(
                RemoveSnapshotRequest {
                    snapshotter: snapshotter.to_string(),
                    key: key.clone(),
                },
                namespace,
            ))
            .await
        {
            Ok(_) => removed += 1,
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(cd_err(format!("remove snapshot {key}"))(s)),
        }
    }
    Ok(removed)
}
