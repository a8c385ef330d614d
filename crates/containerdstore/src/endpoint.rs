//! Detection of the containerd image store and of its containerd's address (module docs of the
//! crate).

use std::fmt;
use std::path::PathBuf;

/// containerd's default socket.
pub const DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";
/// The namespace Docker keeps its images and containers in.
pub const DEFAULT_NAMESPACE: &str = "moby";
/// `DriverStatus` entry of an Engine on the containerd image store.
const DRIVER_TYPE: &str = "io.containerd.snapshotter.v1";

/// berthd's own settings for the Engine's containerd (`--containerd-worker-addr`,
/// `--containerd-worker-namespace`, `[worker.containerd] address`/`namespace`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointOptions {
    /// The containerd socket, if configured.
    pub address: Option<PathBuf>,
    /// The namespace, if configured.
    pub namespace: Option<String>,
}

/// Where an [`Endpoint`]'s address came from (named in errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressSource {
    /// berthd's flag or buildkitd.toml.
    Configured,
    /// `Containerd.Address` of the Engine's `GET /info`.
    Engine,
    /// Neither: containerd's default socket.
    Default,
}

impl fmt::Display for AddressSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressSource::Configured => "configured for berthd",
            AddressSource::Engine => "reported by the Engine's GET /info",
            AddressSource::Default => {
                "containerd's default socket; the Engine's GET /info does not report its containerd"
            }
        })
    }
}

/// The containerd image store of one Engine: socket, namespace and snapshotter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// containerd's gRPC socket.
    pub address: PathBuf,
    /// Where [`Endpoint::address`] came from.
    pub address_source: AddressSource,
    /// The namespace the Engine's images are in (`moby`).
    pub namespace: String,
    /// The Engine's snapshotter (`GET /info` `Driver`, `overlayfs`).
    pub snapshotter: String,
}

impl Endpoint {
    /// The Engine's containerd image store, or `None` for an Engine on a classic graph driver.
    pub fn detect(info: &bollard::models::SystemInfo, opts: &EndpointOptions) -> Option<Endpoint> {
        let containerd_store = info
            .driver_status
            .iter()
            .flatten()
            .any(|kv| kv.len() == 2 && kv[0] == "driver-type" && kv[1] == DRIVER_TYPE);
        if !containerd_store {
            return None;
        }
        let reported = info.containerd.as_ref();
        let (address, address_source) = match (
            &opts.address,
            reported
                .and_then(|c| c.address.as_deref())
                .filter(|a| !a.is_empty()),
        ) {
            (Some(a), _) => (a.clone(), AddressSource::Configured),
            (None, Some(a)) => (PathBuf::from(a), AddressSource::Engine),
            (None, None) => (PathBuf::from(DEFAULT_ADDRESS), AddressSource::Default),
        };
        let namespace = opts
            .namespace
            .clone()
            .or_else(|| {
                reported
                    .and_then(|c| c.namespaces.as_ref())
                    .and_then(|n| n.containers.clone())
                    .filter(|n| !n.is_empty())
            })
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
        Some(Endpoint {
            address,
            address_source,
            namespace,
            snapshotter: info
                .driver
                .clone()
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| "overlayfs".into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{ContainerdInfo, ContainerdInfoNamespaces, SystemInfo};

    fn info(containerd_store: bool, reported: Option<(&str, &str)>) -> SystemInfo {
        SystemInfo {
            driver: Some(
                if containerd_store {
                    "overlayfs"
                } else {
                    "overlay2"
                }
                .into(),
            ),
            driver_status: Some(if containerd_store {
                vec![vec!["driver-type".into(), DRIVER_TYPE.into()]]
            } else {
                vec![vec!["Backing Filesystem".into(), "extfs".into()]]
            }),
            containerd: reported.map(|(a, n)| ContainerdInfo {
                address: Some(a.into()),
                namespaces: Some(ContainerdInfoNamespaces {
                    containers: Some(n.into()),
                    plugins: Some("plugins.moby".into()),
                }),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn detection_table() {
        let none = EndpointOptions::default();
        let configured = EndpointOptions {
            address: Some("/x/c.sock".into()),
            namespace: Some("ns".into()),
        };
        // Classic graph driver: no containerd store, whatever is configured.
        assert_eq!(Endpoint::detect(&info(false, None), &configured), None);
        // Engine 26 (no Containerd key): default socket and namespace.
        let e = Endpoint::detect(&info(true, None), &none).unwrap();
        assert_eq!(e.address, PathBuf::from(DEFAULT_ADDRESS));
        assert_eq!(e.address_source, AddressSource::Default);
        assert_eq!(
            (e.namespace.as_str(), e.snapshotter.as_str()),
            ("moby", "overlayfs")
        );
        // Engine 27+: what it reports.
        let e =
            Endpoint::detect(&info(true, Some(("/run/docker/c.sock", "moby2"))), &none).unwrap();
        assert_eq!(e.address, PathBuf::from("/run/docker/c.sock"));
        assert_eq!(e.address_source, AddressSource::Engine);
        assert_eq!(e.namespace, "moby2");
        // Configuration wins over both.
        let e = Endpoint::detect(
            &info(true, Some(("/run/docker/c.sock", "moby2"))),
            &configured,
        )
        .unwrap();
        assert_eq!(e.address, PathBuf::from("/x/c.sock"));
        assert_eq!(e.address_source, AddressSource::Configured);
        assert_eq!(e.namespace, "ns");
    }
}
