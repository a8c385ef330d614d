//! `buildctl`: berth's BuildKit client (see the library's docs for what it keeps of stock
//! buildctl). Wiring only: flags, then one command.

use anyhow::Context;
use buildctl::{connect, debug, dialstdio, solve};
use clap::{Args, Parser, Subcommand};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::time::Duration;

/// Package reported by `--version`.
const PACKAGE: &str = "github.com/berth-build/berth";
/// Version reported by `--version`.
const VERSION: &str = concat!("v", env!("CARGO_PKG_VERSION"));
/// Git revision this binary was built from.
const REVISION: &str = env!("BERTH_GIT_REV");
/// buildkitd's default address (`appdefaults.Address` for root).
const DEFAULT_ADDR: &str = "unix:///run/buildkit/buildkitd.sock";

/// build utility (berth's buildctl)
#[derive(Debug, Parser)]
#[command(name = "buildctl", disable_version_flag = true)]
struct Cli {
    /// print the version
    #[arg(long, short = 'v')]
    version: bool,

    #[command(flatten)]
    global: Global,

    #[command(subcommand)]
    command: Option<Command>,
}

/// Global flags (stock buildctl's names and defaults).
#[derive(Debug, Clone, Args)]
struct Global {
    /// enable debug output in logs
    #[arg(long, global = true)]
    debug: bool,
    /// buildkitd address
    #[arg(long, env = "BUILDKIT_HOST", default_value = DEFAULT_ADDR, global = true)]
    addr: String,
    /// buildkitd server name for certificate validation
    #[arg(long, global = true)]
    tlsservername: Option<String>,
    /// CA certificate for validation
    #[arg(long, global = true)]
    tlscacert: Option<PathBuf>,
    /// client certificate
    #[arg(long, global = true)]
    tlscert: Option<PathBuf>,
    /// client key
    #[arg(long, global = true)]
    tlskey: Option<PathBuf>,
    /// directory containing CA certificate, client certificate, and client key
    #[arg(long, global = true)]
    tlsdir: Option<PathBuf>,
    /// timeout backend connection after value seconds
    #[arg(long, default_value_t = 5, global = true)]
    timeout: u64,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// build
    Build(BuildArgs),
    /// debug utilities
    Debug {
        #[command(subcommand)]
        what: debug::DebugCommand,
    },
    /// Proxy the stdio stream to the daemon connection. Should not be invoked manually.
    #[command(name = "dial-stdio", hide = true)]
    DialStdio,
}

/// `buildctl build` flags (stock names).
#[derive(Debug, Args)]
struct BuildArgs {
    /// Define exports for build result, e.g. --output type=image,name=docker.io/username/image,push=true
    #[arg(long, short = 'o')]
    output: Option<String>,
    /// Set type of progress (auto, plain, tty, quiet, rawjson). Use plain to show container output
    #[arg(long, default_value = "auto")]
    progress: String,
    /// Allow build to access specified directory as a local source, e.g. --local context=.
    #[arg(long)]
    local: Vec<String>,
    /// Define frontend used for build
    #[arg(long)]
    frontend: Option<String>,
    /// Define custom options for frontend, e.g. --opt target=foo --opt build-arg:foo=bar
    #[arg(long)]
    opt: Vec<String>,
    /// Disable cache for all the vertices
    #[arg(long = "no-cache")]
    no_cache: bool,
    /// Allow extra privileged entitlement, e.g. network.host, security.insecure
    #[arg(long)]
    allow: Vec<String>,
    /// Output build metadata (e.g., image digest) to a file as JSON
    #[arg(long = "metadata-file")]
    metadata_file: Option<PathBuf>,
}

fn key_values(what: &str, items: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|i| {
            i.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("invalid {what} {i:?}: want key=value"))
        })
        .collect()
}

async fn build(target: &connect::Target, args: BuildArgs) -> anyhow::Result<()> {
    let definition = match &args.frontend {
        Some(_) => None,
        None => {
            if std::io::stdin().is_terminal() {
                anyhow::bail!("please specify --frontend or pipe LLB definition to stdin");
            }
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("read LLB definition from stdin")?;
            Some(
                <protos::pb::Definition as prost::Message>::decode(buf.as_slice())
                    .context("parse LLB definition from stdin")?,
            )
        }
    };
    let mut frontend_attrs = key_values("--opt", &args.opt)?;
    if args.no_cache {
        frontend_attrs.insert("no-cache".into(), String::new());
    }
    let opts = solve::SolveOptions {
        definition,
        frontend: args.frontend,
        frontend_attrs,
        locals: key_values("--local", &args.local)?
            .into_iter()
            .map(|(k, v)| (k, PathBuf::from(v)))
            .collect(),
        output: args
            .output
            .as_deref()
            .map(solve::parse_output)
            .transpose()?,
        entitlements: args.allow,
        image_config: None,
        quiet: args.progress == "quiet",
    };
    let response = solve::solve(target, opts).await?;
    if let Some(path) = &args.metadata_file {
        std::fs::write(path, serde_json::to_vec_pretty(&response)?)
            .with_context(|| format!("write metadata file {}", path.display()))?;
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    if cli.version {
        println!("buildctl {PACKAGE} {VERSION} {REVISION}");
        return;
    }
    let Some(command) = cli.command else {
        // Stock buildctl prints its help and exits 0 without a command.
        let _ = <Cli as clap::CommandFactory>::command().print_help();
        return;
    };
    let debug = cli.global.debug;
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => fail(debug, anyhow::Error::new(e).context("start tokio runtime")),
    };
    let g = cli.global;
    let res = rt.block_on(async {
        let tls = connect::TlsFlags {
            server_name: g.tlsservername,
            ca: g.tlscacert,
            cert: g.tlscert,
            key: g.tlskey,
            dir: g.tlsdir,
        };
        let target = connect::Target::new(&g.addr, &tls, Duration::from_secs(g.timeout))?;
        match command {
            Command::DialStdio => dialstdio::run(&target).await,
            Command::Debug { what } => debug::run(&target, what).await,
            Command::Build(args) => build(&target, args).await,
        }
    });
    // Do not wait for a blocked stdin reader (dial-stdio returns while stdin may stay open).
    rt.shutdown_background();
    if let Err(e) = res {
        fail(debug, e);
    }
}

/// Prints `error: …` like stock buildctl and exits 1.
fn fail(debug: bool, e: anyhow::Error) -> ! {
    if debug {
        eprintln!("error: {e:?}");
    } else {
        eprintln!("error: {e:#}");
    }
    std::process::exit(1)
}
