//! The subset of `buildkitd.toml` berth understands, merged with command-line flags.
//!
//! Keys keep buildkitd's spelling (`root`, `debug`, `[grpc] address/debugAddress`, `[grpc.tls]`,
//! `[log] format` (buildkitd ≥ v0.13),
//! `[worker.oci] labels/platforms/gc/gckeepstorage/[[gcpolicy]]`, `[registry."host"] mirrors/http/insecure/ca/keypair`,
//! `insecure-entitlements`). Unknown keys are ignored, like buildkitd does for keys of other workers.
//!
//! berth's own keys (buildkitd has no exporter section; it ignores these):
//!
//! ```toml
//! [exporter.docker]
//! thin = true   # type=docker leaves out the layers the bound Docker Engine has (attr thin=false overrides)
//! ```
//!
//! The section is named after the exporter type and the key after its attribute, so the file
//! default and `--output type=docker,thin=…` read the same; `[exporter.<type>]` leaves room for
//! other exporters' defaults without clashing with buildkitd's top-level sections.

use crate::cli::DaemonArgs;
use anyhow::{bail, Context};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Default unix socket, like buildkitd.
pub const DEFAULT_ADDR: &str = "unix:///run/buildkit/buildkitd.sock";
/// Default state directory.
pub const DEFAULT_ROOT: &str = "/var/lib/berth";
/// Default Docker Engine address.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

/// `buildkitd.toml` as parsed.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct FileConfig {
    /// `root`.
    pub root: Option<PathBuf>,
    /// `debug`.
    pub debug: Option<bool>,
    /// `[grpc]`.
    pub grpc: GrpcConfig,
    /// `[worker]`.
    pub worker: WorkerSection,
    /// `[registry."host"]`.
    pub registry: BTreeMap<String, RegistryConfig>,
    /// `insecure-entitlements`.
    #[serde(rename = "insecure-entitlements")]
    pub insecure_entitlements: Vec<String>,
    /// `[exporter]` (berth's).
    pub exporter: ExporterSection,
    /// `[history]`.
    pub history: HistorySection,
    /// `[log]`.
    pub log: LogSection,
}

/// `[log]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct LogSection {
    /// `format`: `text` or `json`.
    pub format: Option<String>,
}

/// `[history]`: when old build records are dropped (buildkitd's keys).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct HistorySection {
    /// `maxAge`, seconds.
    #[serde(rename = "maxAge")]
    pub max_age: Option<i64>,
    /// `maxEntries`.
    #[serde(rename = "maxEntries")]
    pub max_entries: Option<i64>,
}

/// `[exporter]`: defaults of exporter attributes (berth's section).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct ExporterSection {
    /// `[exporter.docker]`.
    pub docker: DockerExporterConfig,
}

/// `[exporter.docker]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct DockerExporterConfig {
    /// `thin`: default of the `thin` attribute of `type=docker`.
    pub thin: Option<bool>,
}

/// `[grpc]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct GrpcConfig {
    /// `address`.
    pub address: Vec<String>,
    /// `debugAddress`.
    #[serde(rename = "debugAddress")]
    pub debug_address: Option<String>,
    /// `gid`.
    pub gid: Option<u32>,
    /// `[grpc.tls]`.
    pub tls: TlsConfig,
}

/// `[grpc.tls]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct TlsConfig {
    /// `cert`.
    pub cert: Option<PathBuf>,
    /// `key`.
    pub key: Option<PathBuf>,
    /// `ca`.
    pub ca: Option<PathBuf>,
}

/// `[worker]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct WorkerSection {
    /// `[worker.oci]`.
    pub oci: OciWorkerConfig,
    /// `[worker.containerd]`.
    pub containerd: ContainerdWorkerConfig,
}

/// `[worker.oci]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct OciWorkerConfig {
    /// `enabled`.
    pub enabled: Option<bool>,
    /// `labels`.
    pub labels: BTreeMap<String, String>,
    /// `platforms`.
    pub platforms: Vec<String>,
    /// `gc`.
    pub gc: Option<bool>,
    /// `gckeepstorage` (bytes).
    pub gckeepstorage: Option<i64>,
    /// `[[worker.oci.gcpolicy]]`.
    pub gcpolicy: Vec<GcPolicyConfig>,
    /// `max-parallelism`.
    #[serde(rename = "max-parallelism")]
    pub max_parallelism: Option<usize>,
}

/// `[worker.containerd]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct ContainerdWorkerConfig {
    /// `enabled`.
    pub enabled: Option<bool>,
    /// `address`: the containerd of the bound Docker Engine when it uses the containerd image
    /// store (`--containerd-worker-addr`).
    pub address: Option<PathBuf>,
    /// `namespace` of that Engine's images (`--containerd-worker-namespace`; default `moby`).
    pub namespace: Option<String>,
}

/// One `[[worker.oci.gcpolicy]]`.
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct GcPolicyConfig {
    /// `all`.
    pub all: bool,
    /// `keepBytes`.
    #[serde(rename = "keepBytes")]
    pub keep_bytes: i64,
    /// `keepDuration` in seconds.
    #[serde(rename = "keepDuration")]
    pub keep_duration: i64,
    /// `filters`.
    pub filters: Vec<String>,
}

/// `[registry."host"]`: `mirrors`, `http`, `insecure`, `ca`, `[[keypair]]` (see the `registry` crate).
pub type RegistryConfig = registry::HostConfig;

/// Effective configuration after merging file and flags.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listening addresses.
    pub addrs: Vec<String>,
    /// State directory.
    pub root: PathBuf,
    /// Debug logging.
    pub debug: bool,
    /// Group for unix sockets.
    pub group: Option<String>,
    /// TLS cert/key/ca for tcp listeners.
    pub tls: TlsConfig,
    /// Docker Engine address.
    pub docker_host: String,
    /// Docker data root, if given.
    pub docker_data_root: Option<PathBuf>,
    /// The bound Engine's containerd, if configured (containerd image store).
    pub containerd: containerdstore::EndpointOptions,
    /// Worker labels from config and `--oci-worker-labels`.
    pub worker_labels: BTreeMap<String, String>,
    /// Extra platforms (after the native one).
    pub platforms: Vec<String>,
    /// Whether GC is enabled.
    pub gc: bool,
    /// GC policies (empty with GC disabled).
    pub gc_policy: Vec<GcPolicyConfig>,
    /// Registry settings, kept for the worker.
    pub registries: BTreeMap<String, RegistryConfig>,
    /// Entitlements the daemon allows.
    pub insecure_entitlements: Vec<String>,
    /// Worker parallelism.
    pub max_parallelism: Option<usize>,
    /// Default of `type=docker`'s `thin` attribute.
    pub docker_thin: bool,
    /// Build history limits.
    pub history: crate::history::HistoryConfig,
    /// `--debugaddr` / `[grpc] debugAddress`: where the debug HTTP server listens, if anywhere.
    pub debug_address: Option<String>,
    /// `--log-format` / `[log] format`.
    pub log_format: telemetry::LogFormat,
}

/// Parses a `buildkitd.toml` text.
pub fn parse_file(text: &str) -> anyhow::Result<FileConfig> {
    toml::from_str(text).context("parse buildkitd.toml")
}

/// buildkitd's default config file, read when `--config` is not given and the file exists.
pub const DEFAULT_CONFIG: &str = "/etc/buildkit/buildkitd.toml";

/// Loads the config file (`--config`, else [`DEFAULT_CONFIG`] if present) and applies flags over
/// it.
pub fn load(args: &DaemonArgs) -> anyhow::Result<Config> {
    let path = args.config.clone().or_else(|| {
        let p = PathBuf::from(DEFAULT_CONFIG);
        p.is_file().then_some(p)
    });
    let file = match &path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("read config {}", p.display()))?;
            parse_file(&text).with_context(|| format!("config {}", p.display()))?
        }
        None => FileConfig::default(),
    };
    merge(file, args)
}

fn merge(file: FileConfig, args: &DaemonArgs) -> anyhow::Result<Config> {
    if args.containerd_worker == Some(true) || file.worker.containerd.enabled == Some(true) {
        bail!("the containerd worker is not supported by berthd; use --containerd-worker=false");
    }
    if args.oci_worker == Some(false) || file.worker.oci.enabled == Some(false) {
        bail!("berthd needs its OCI-style worker; --oci-worker=false leaves no worker");
    }
    let mut labels = file.worker.oci.labels.clone();
    for l in &args.oci_worker_labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("invalid --oci-worker-labels value {l:?}: want key=value"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    let addrs = if !args.addr.is_empty() {
        args.addr.clone()
    } else if !file.grpc.address.is_empty() {
        file.grpc.address.clone()
    } else {
        vec![DEFAULT_ADDR.to_string()]
    };
    let gc = args.oci_worker_gc.or(file.worker.oci.gc).unwrap_or(true);
    let keep = args
        .oci_worker_gc_keepstorage
        .map(|mb| mb * 1_000_000)
        .or(file.worker.oci.gckeepstorage);
    let gc_policy = if !gc {
        vec![]
    } else if !file.worker.oci.gcpolicy.is_empty() {
        file.worker.oci.gcpolicy.clone()
    } else {
        default_gc_policy(keep.unwrap_or(10_000_000_000))
    };
    let mut platforms = file.worker.oci.platforms.clone();
    platforms.extend(args.oci_worker_platform.iter().cloned());
    let mut ents = file.insecure_entitlements.clone();
    ents.extend(args.allow_insecure_entitlement.iter().cloned());
    let tls = TlsConfig {
        cert: args.tlscert.clone().or(file.grpc.tls.cert.clone()),
        key: args.tlskey.clone().or(file.grpc.tls.key.clone()),
        ca: args.tlscacert.clone().or(file.grpc.tls.ca.clone()),
    };
    Ok(Config {
        addrs,
        root: args
            .root
            .clone()
            .or(file.root.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT)),
        debug: args.debug || file.debug.unwrap_or(false),
        group: args.group.clone().or(file.grpc.gid.map(|g| g.to_string())),
        tls,
        docker_host: args
            .docker_host
            .clone()
            .unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_string()),
        docker_data_root: args.docker_data_root.clone(),
        containerd: containerdstore::EndpointOptions {
            address: args
                .containerd_worker_addr
                .clone()
                .or(file.worker.containerd.address.clone())
                .filter(|a| !a.as_os_str().is_empty()),
            namespace: args
                .containerd_worker_namespace
                .clone()
                .or(file.worker.containerd.namespace.clone())
                .filter(|n| !n.is_empty()),
        },
        worker_labels: labels,
        platforms,
        gc,
        gc_policy,
        registries: file.registry.clone(),
        insecure_entitlements: ents,
        max_parallelism: file.worker.oci.max_parallelism,
        docker_thin: file.exporter.docker.thin.unwrap_or(false),
        history: {
            let d = crate::history::HistoryConfig::default();
            crate::history::HistoryConfig {
                max_age: file
                    .history
                    .max_age
                    .filter(|s| *s > 0)
                    .map(|s| std::time::Duration::from_secs(s as u64))
                    .unwrap_or(d.max_age),
                max_entries: file
                    .history
                    .max_entries
                    .filter(|n| *n > 0)
                    .map(|n| n as usize)
                    .unwrap_or(d.max_entries),
            }
        },
        debug_address: args
            .debugaddr
            .clone()
            .or(file.grpc.debug_address.clone())
            .filter(|a| !a.is_empty()),
        log_format: args
            .log_format
            .as_deref()
            .or(file.log.format.as_deref())
            .unwrap_or("text")
            .parse()?,
    })
}

/// buildkitd's default policy shape (`config.DefaultGCPolicy`), keepDuration in seconds.
fn default_gc_policy(keep_bytes: i64) -> Vec<GcPolicyConfig> {
    vec![
        GcPolicyConfig {
            filters: vec![
                "type==source.local".into(),
                "type==exec.cachemount".into(),
                "type==source.git.checkout".into(),
            ],
            keep_duration: 48 * 3600,
            keep_bytes: 512 * 1_000_000,
            all: false,
        },
        GcPolicyConfig {
            keep_duration: 60 * 24 * 3600,
            keep_bytes,
            ..Default::default()
        },
        GcPolicyConfig {
            keep_bytes,
            ..Default::default()
        },
        GcPolicyConfig {
            all: true,
            keep_bytes,
            ..Default::default()
        },
    ]
}

/// Checks that a path exists when given (for TLS files).
pub fn read_file(p: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("read {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(argv: &[&str]) -> DaemonArgs {
        let mut v = vec!["berthd"];
        v.extend_from_slice(argv);
        crate::cli::Cli::try_parse_from(v).unwrap().daemon
    }

    #[test]
    fn parses_buildkitd_toml_subset() {
        let f = parse_file(
            r#"
root = "/var/lib/x"
debug = true
insecure-entitlements = ["network.host", "security.insecure"]
[grpc]
address = ["tcp://0.0.0.0:1234"]
[worker.oci]
labels = { foo = "bar" }
gc = true
[[worker.oci.gcpolicy]]
all = true
keepBytes = 1024
filters = ["type==source.local"]
[registry."docker.io"]
mirrors = ["127.0.0.1:5000"]
[registry."127.0.0.1:5000"]
http = true
ca = ["/etc/ca.pem"]
[[registry."127.0.0.1:5000".keypair]]
key = "/etc/k.pem"
cert = "/etc/c.pem"
[worker.containerd]
snapshotter = "overlayfs"
[exporter.docker]
thin = true
[log]
format = "json"
"#,
        )
        .unwrap();
        assert_eq!(f.registry["docker.io"].mirrors, vec!["127.0.0.1:5000"]);
        assert_eq!(f.registry["127.0.0.1:5000"].http, Some(true));
        assert_eq!(
            f.registry["127.0.0.1:5000"].ca,
            [PathBuf::from("/etc/ca.pem")]
        );
        assert_eq!(
            f.registry["127.0.0.1:5000"].keypair[0].cert,
            PathBuf::from("/etc/c.pem")
        );
        assert_eq!(
            f.insecure_entitlements,
            vec!["network.host", "security.insecure"]
        );
        let c = merge(f, &args(&["--oci-worker-labels=a=b"])).unwrap();
        assert_eq!(c.root, PathBuf::from("/var/lib/x"));
        assert!(c.debug);
        assert_eq!(c.addrs, vec!["tcp://0.0.0.0:1234"]);
        assert_eq!(c.worker_labels.get("foo").map(String::as_str), Some("bar"));
        assert_eq!(c.worker_labels.get("a").map(String::as_str), Some("b"));
        assert_eq!(c.gc_policy.len(), 1);
        assert_eq!(c.gc_policy[0].keep_bytes, 1024);
        assert!(c.docker_thin);
        assert_eq!(c.log_format, telemetry::LogFormat::Json);
        assert_eq!(c.debug_address, None);
        let f = parse_file("[grpc]\ndebugAddress = \"127.0.0.1:6060\"\n").unwrap();
        let c = merge(f.clone(), &args(&[])).unwrap();
        assert_eq!(c.debug_address.as_deref(), Some("127.0.0.1:6060"));
        assert_eq!(c.log_format, telemetry::LogFormat::Text);
        let c = merge(
            f,
            &args(&["--debugaddr", "0.0.0.0:7070", "--log-format", "text"]),
        )
        .unwrap();
        assert_eq!(c.debug_address.as_deref(), Some("0.0.0.0:7070"));
        let e = merge(FileConfig::default(), &args(&["--log-format", "xml"])).unwrap_err();
        assert_eq!(e.to_string(), "unsupported log type \"xml\"");
        assert!(
            !merge(FileConfig::default(), &args(&[]))
                .unwrap()
                .docker_thin
        );
        assert!(parse_file("[exporter.docker]\nthin = \"yes\"\n").is_err());
    }

    #[test]
    fn flags_override_and_validate() {
        let c = merge(FileConfig::default(), &args(&["--oci-worker-gc=false"])).unwrap();
        assert!(c.gc_policy.is_empty());
        assert_eq!(c.addrs, vec![DEFAULT_ADDR]);
        let c = merge(FileConfig::default(), &args(&[])).unwrap();
        assert_eq!(c.gc_policy.len(), 4);
        assert!(merge(FileConfig::default(), &args(&["--containerd-worker=true"])).is_err());
        assert!(merge(
            FileConfig::default(),
            &args(&["--oci-worker-labels=novalue"])
        )
        .is_err());
        assert!(parse_file("root = [").is_err());
    }

    #[test]
    fn containerd_address_from_toml_and_flags() {
        let c = merge(FileConfig::default(), &args(&[])).unwrap();
        assert_eq!(c.containerd, containerdstore::EndpointOptions::default());
        let f = parse_file(
            "[worker.containerd]\naddress = \"/run/docker/containerd/containerd.sock\"\nnamespace = \"moby\"\n",
        )
        .unwrap();
        let c = merge(f.clone(), &args(&[])).unwrap();
        assert_eq!(
            c.containerd.address,
            Some(PathBuf::from("/run/docker/containerd/containerd.sock"))
        );
        assert_eq!(c.containerd.namespace.as_deref(), Some("moby"));
        let c = merge(
            f,
            &args(&[
                "--containerd-worker-addr=/x.sock",
                "--containerd-worker-namespace",
                "other",
            ]),
        )
        .unwrap();
        assert_eq!(c.containerd.address, Some(PathBuf::from("/x.sock")));
        assert_eq!(c.containerd.namespace.as_deref(), Some("other"));
    }
}

/// Configurations for unit tests of other modules.
#[cfg(test)]
pub mod tests_support {
    use super::*;

    /// A config with one custom label and GC disabled.
    pub fn config() -> Config {
        let mut labels = BTreeMap::new();
        labels.insert("custom".to_string(), "yes".to_string());
        Config {
            addrs: vec![],
            root: PathBuf::from("/nonexistent"),
            debug: false,
            group: None,
            tls: TlsConfig::default(),
            docker_host: DEFAULT_DOCKER_HOST.into(),
            docker_data_root: None,
            containerd: Default::default(),
            worker_labels: labels,
            platforms: vec!["linux/arm64".into()],
            gc: false,
            gc_policy: vec![],
            registries: BTreeMap::new(),
            insecure_entitlements: vec![],
            max_parallelism: None,
            docker_thin: false,
            history: Default::default(),
            debug_address: None,
            log_format: telemetry::LogFormat::Text,
        }
    }
}
