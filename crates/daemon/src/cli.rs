//! Command line: buildkitd's flag names (so BuildKit's own test harness can run berthd as
//! `buildkitd`), plus berth's Docker flags. Subcommands are reserved for `debug` and `dial-stdio`.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Package name reported by `--version`, `Info` and worker records.
pub const PACKAGE: &str = "github.com/berth-build/berth";
/// Version reported by `--version`, `Info` and worker records.
pub const VERSION: &str = concat!("v", env!("CARGO_PKG_VERSION"));
/// Git revision berthd was built from.
pub const REVISION: &str = env!("BERTH_GIT_REV");

/// `berthd`: a BuildKit-compatible build daemon on Docker's image store.
#[derive(Debug, Parser)]
#[command(name = "berthd", disable_version_flag = true)]
pub struct Cli {
    /// Print the version (`berthd <package> <version> <revision>`) and exit.
    #[arg(long, short = 'v')]
    pub version: bool,

    /// Daemon options.
    #[command(flatten)]
    pub daemon: DaemonArgs,

    /// Subcommand (none: run the daemon).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Debugging helpers: `debug workers` lists the daemon's workers.
    Debug {
        /// What to show (`workers`).
        what: Vec<String>,
    },
    /// Proxy stdin/stdout to the daemon socket.
    DialStdio,
}

/// Options of the daemon itself. Names follow buildkitd.
#[derive(Debug, Clone, Args)]
pub struct DaemonArgs {
    /// Listening address (`unix:///path` or `tcp://host:port`); repeatable.
    #[arg(long = "addr")]
    pub addr: Vec<String>,
    /// State directory.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Path to a buildkitd.toml configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Enable debug logging.
    #[arg(long)]
    pub debug: bool,
    /// Enable trace logging.
    #[arg(long)]
    pub trace: bool,
    /// Log formatter: `json` or `text` (buildkitd's `--log-format`).
    #[arg(long = "log-format")]
    pub log_format: Option<String>,
    /// Debugging address (e.g. `0.0.0.0:6060`): Prometheus metrics at `/metrics`, `/healthz`
    /// and `/debug/state` (buildkitd's `--debugaddr`).
    #[arg(long = "debugaddr")]
    pub debugaddr: Option<String>,
    /// Group (name or gid) owning the unix sockets.
    #[arg(long)]
    pub group: Option<String>,
    /// TLS certificate for tcp listeners.
    #[arg(long)]
    pub tlscert: Option<PathBuf>,
    /// TLS key for tcp listeners.
    #[arg(long)]
    pub tlskey: Option<PathBuf>,
    /// CA certificate used to verify clients of tcp listeners.
    #[arg(long)]
    pub tlscacert: Option<PathBuf>,
    /// Docker Engine API address.
    #[arg(long = "docker-host", env = "DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// Docker's data root (default: asked from the Engine with GET /info).
    #[arg(long = "docker-data-root")]
    pub docker_data_root: Option<PathBuf>,

    // ---- buildkitd worker flags, accepted for compatibility ----
    /// Enable the OCI worker (berth always has exactly one worker).
    #[arg(long = "oci-worker", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub oci_worker: Option<bool>,
    /// Enable the containerd worker (not supported; must be false if given).
    #[arg(long = "containerd-worker", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub containerd_worker: Option<bool>,
    /// The containerd socket of the Docker Engine berthd is bound to, when that Engine keeps
    /// its images in containerd (containerd image store) and its `GET /info` does not report it
    /// (Engine < 27); the socket dockerd was given with `--containerd` (default:
    /// `/run/containerd/containerd.sock`). buildkitd's flag name.
    #[arg(long = "containerd-worker-addr")]
    pub containerd_worker_addr: Option<PathBuf>,
    /// The containerd namespace of that Engine's images (default: what `GET /info` reports,
    /// else `moby`). buildkitd's flag name.
    #[arg(long = "containerd-worker-namespace")]
    pub containerd_worker_namespace: Option<String>,
    /// Enable garbage collection of the worker's cache.
    #[arg(long = "oci-worker-gc", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub oci_worker_gc: Option<bool>,
    /// GC keep-storage in MB.
    #[arg(long = "oci-worker-gc-keepstorage")]
    pub oci_worker_gc_keepstorage: Option<i64>,
    /// Extra worker labels `k=v`; repeatable.
    #[arg(long = "oci-worker-labels")]
    pub oci_worker_labels: Vec<String>,
    /// Snapshotter name (ignored: berth uses its Docker-backed store).
    #[arg(long = "oci-worker-snapshotter")]
    pub oci_worker_snapshotter: Option<String>,
    /// Platforms the worker advertises (after the native one); repeatable.
    #[arg(long = "oci-worker-platform")]
    pub oci_worker_platform: Vec<String>,
    /// Network mode for execs (`host`, `cni`, `auto`).
    #[arg(long = "oci-worker-net")]
    pub oci_worker_net: Option<String>,
    /// Maximum parallelism of the worker.
    #[arg(long = "oci-max-parallelism")]
    pub oci_max_parallelism: Option<String>,
    /// Allowed insecure entitlements (`network.host`, `security.insecure`); repeatable.
    #[arg(long = "allow-insecure-entitlement")]
    pub allow_insecure_entitlement: Vec<String>,

    // ---- other buildkitd v0.11.6 flags: accepted so deploy tooling that passes them starts
    // berthd; each one set is named in a warning at start (see `ignored_flags`) ----
    /// Rootless mode (berthd needs root: `true` is refused).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub rootless: Option<bool>,
    /// OCI runtime binary (berthd runs `runc` from PATH).
    #[arg(long = "oci-worker-binary")]
    pub oci_worker_binary: Option<String>,
    /// Disable the process sandbox (berthd always sandboxes).
    #[arg(long = "oci-worker-no-process-sandbox")]
    pub oci_worker_no_process_sandbox: bool,
    /// AppArmor profile for execs (not applied by berthd).
    #[arg(long = "oci-worker-apparmor-profile")]
    pub oci_worker_apparmor_profile: Option<String>,
    /// SELinux labelling for execs (not applied by berthd).
    #[arg(long = "oci-worker-selinux")]
    pub oci_worker_selinux: bool,
    /// CNI config path (berthd has no CNI networking).
    #[arg(long = "oci-cni-config-path")]
    pub oci_cni_config_path: Option<String>,
    /// CNI binary dir (berthd has no CNI networking).
    #[arg(long = "oci-cni-binary-dir")]
    pub oci_cni_binary_dir: Option<String>,
    /// CNI pool size (berthd has no CNI networking).
    #[arg(long = "oci-cni-pool-size")]
    pub oci_cni_pool_size: Option<String>,
}

impl DaemonArgs {
    /// buildkitd flags given on the command line that berthd accepts but does not act on.
    pub fn ignored_flags(&self) -> Vec<&'static str> {
        let set = [
            ("--oci-worker-binary", self.oci_worker_binary.is_some()),
            (
                "--oci-worker-no-process-sandbox",
                self.oci_worker_no_process_sandbox,
            ),
            (
                "--oci-worker-apparmor-profile",
                self.oci_worker_apparmor_profile.is_some(),
            ),
            ("--oci-worker-selinux", self.oci_worker_selinux),
            (
                "--oci-worker-snapshotter",
                self.oci_worker_snapshotter.is_some(),
            ),
            ("--oci-cni-config-path", self.oci_cni_config_path.is_some()),
            ("--oci-cni-binary-dir", self.oci_cni_binary_dir.is_some()),
            ("--oci-cni-pool-size", self.oci_cni_pool_size.is_some()),
        ];
        set.into_iter()
            .filter(|(_, on)| *on)
            .map(|(n, _)| n)
            .collect()
    }
}

/// The program name for `--version`: `buildkitd` when run under that name (the berth image
/// installs berthd as `buildkitd`; buildx's docker-container driver reads the third field of
/// `buildkitd --version`), else `berthd`.
pub fn program_name(argv0: Option<&std::ffi::OsStr>) -> &'static str {
    let base = argv0
        .map(std::path::Path::new)
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str());
    if base == Some("buildkitd") {
        "buildkitd"
    } else {
        "berthd"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_buildkit_harness_command_line() {
        // Exactly what BuildKit's integration sandbox runs (both flag forms).
        let cli = Cli::try_parse_from([
            "buildkitd",
            "--oci-worker=true",
            "--containerd-worker=false",
            "--oci-worker-gc=false",
            "--oci-worker-labels=org.mobyproject.buildkit.worker.sandbox=true",
            "--config=/tmp/bk.toml",
            "--root",
            "/tmp/root",
            "--addr",
            "unix:///tmp/x/buildkitd.sock",
            "--debug",
            "--debugaddr",
            "127.0.0.1:6060",
            "--log-format=json",
        ])
        .unwrap();
        let d = cli.daemon;
        assert_eq!(d.debugaddr.as_deref(), Some("127.0.0.1:6060"));
        assert_eq!(d.log_format.as_deref(), Some("json"));
        assert_eq!(d.oci_worker, Some(true));
        assert_eq!(d.containerd_worker, Some(false));
        assert_eq!(d.oci_worker_gc, Some(false));
        assert_eq!(
            d.oci_worker_labels,
            vec!["org.mobyproject.buildkit.worker.sandbox=true"]
        );
        assert_eq!(d.config, Some(PathBuf::from("/tmp/bk.toml")));
        assert_eq!(d.root, Some(PathBuf::from("/tmp/root")));
        assert_eq!(d.addr, vec!["unix:///tmp/x/buildkitd.sock"]);
        assert!(d.debug);

        let cli = Cli::try_parse_from([
            "berthd",
            "--addr=tcp://0.0.0.0:1234",
            "--addr",
            "unix:///a",
            "--oci-worker",
        ])
        .unwrap();
        assert_eq!(cli.daemon.addr, vec!["tcp://0.0.0.0:1234", "unix:///a"]);
        assert_eq!(cli.daemon.oci_worker, Some(true));
        assert!(Cli::try_parse_from(["berthd", "--no-such-flag"]).is_err());

        // Flags deploy tooling passes to stock buildkitd are accepted and reported.
        let cli = Cli::try_parse_from([
            "buildkitd",
            "--allow-insecure-entitlement=network.host",
            "--oci-worker-no-process-sandbox",
            "--debugaddr=0.0.0.0:6060",
            "--rootless=false",
            "--oci-worker-snapshotter=overlayfs",
        ])
        .unwrap();
        assert_eq!(
            cli.daemon.ignored_flags(),
            vec![
                "--oci-worker-no-process-sandbox",
                "--oci-worker-snapshotter"
            ]
        );
        assert_eq!(cli.daemon.debugaddr.as_deref(), Some("0.0.0.0:6060"));
        assert_eq!(cli.daemon.rootless, Some(false));
        assert_eq!(
            program_name(Some("/usr/bin/buildkitd".as_ref())),
            "buildkitd"
        );
        assert_eq!(
            program_name(Some("./target/release/berthd".as_ref())),
            "berthd"
        );
        assert_eq!(program_name(None), "berthd");
        assert!(
            Cli::try_parse_from(["berthd", "--version"])
                .unwrap()
                .version
        );
    }
}
