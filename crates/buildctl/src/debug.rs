//! `buildctl debug workers` and `buildctl debug info`, with stock buildctl's output.
//!
//! `--format` takes Go templates in stock buildctl; this one accepts the template tools use,
//! `{{json .}}`, and emits the JSON Go would (its client types' field names), refusing any other
//! template with an error that says so.

use crate::connect::{Target, MAX_MESSAGE};
use crate::tabwriter::TabWriter;
use anyhow::{bail, Context};
use clap::Subcommand;
use protos::moby::buildkit::v1 as control;
use protos::moby::buildkit::v1::control_client::ControlClient;
use serde_json::json;

/// `buildctl debug …`.
#[derive(Debug, Subcommand)]
pub enum DebugCommand {
    /// list workers
    Workers {
        /// containerd-style filter string slice
        #[arg(long = "filter", short = 'f')]
        filter: Vec<String>,
        /// Verbose output
        #[arg(long, short = 'v')]
        verbose: bool,
        /// Format the output using the given Go template, e.g, '{{json .}}'
        #[arg(long)]
        format: Option<String>,
    },
    /// display internal information
    Info {
        /// Format the output using the given Go template, e.g, '{{json .}}'
        #[arg(long)]
        format: Option<String>,
    },
}

/// Runs one debug command.
pub async fn run(target: &Target, cmd: DebugCommand) -> anyhow::Result<()> {
    let mut c = ControlClient::new(crate::connect::traced(target.channel().await?))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let out = match cmd {
        DebugCommand::Workers {
            filter,
            verbose,
            format,
        } => {
            let workers = c
                .list_workers(control::ListWorkersRequest { filter })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))
                .context("list workers")?
                .into_inner()
                .record;
            match format {
                Some(f) => {
                    json_template(&f)?;
                    format!("{}\n", workers_json(&workers))
                }
                None if verbose => workers_verbose(&workers),
                None => workers_table(&workers),
            }
        }
        DebugCommand::Info { format } => {
            let info = c
                .info(control::InfoRequest {})
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))
                .context("info")?
                .into_inner();
            let v = info.buildkit_version.unwrap_or_default();
            match format {
                Some(f) => {
                    json_template(&f)?;
                    format!("{}\n", json!({ "BuildkitVersion": version_json(&v) }))
                }
                None => {
                    let mut w = TabWriter::new(0, 0, 1, ' ');
                    w.write(&format!(
                        "BuildKit:\t{} {} {}\n",
                        v.package, v.version, v.revision
                    ));
                    w.finish()
                }
            }
        }
    };
    print!("{out}");
    Ok(())
}

fn json_template(f: &str) -> anyhow::Result<()> {
    let compact: String = f.chars().filter(|c| !c.is_whitespace()).collect();
    if compact != "{{json.}}" {
        bail!("--format {f:?}: berth's buildctl supports only the template '{{{{json .}}}}'");
    }
    Ok(())
}

fn platform(p: &protos::pb::Platform) -> String {
    let mut s = format!("{}/{}", p.os, p.architecture);
    if !p.variant.is_empty() {
        s.push('/');
        s.push_str(&p.variant);
    }
    s
}

fn platforms(w: &protos::moby::buildkit::v1::types::WorkerRecord) -> String {
    w.platforms
        .iter()
        .map(platform)
        .collect::<Vec<_>>()
        .join(",")
}

fn workers_table(workers: &[protos::moby::buildkit::v1::types::WorkerRecord]) -> String {
    let mut tw = TabWriter::new(1, 8, 1, '\t');
    tw.write("ID\tPLATFORMS\n");
    for w in workers {
        tw.write(&format!("{}\t{}\n", w.id, platforms(w)));
    }
    tw.finish()
}

fn workers_verbose(workers: &[protos::moby::buildkit::v1::types::WorkerRecord]) -> String {
    let mut tw = TabWriter::new(1, 8, 1, '\t');
    for w in workers {
        let v = w.buildkit_version.clone().unwrap_or_default();
        tw.write(&format!("ID:\t{}\n", w.id));
        tw.write(&format!("Platforms:\t{}\n", platforms(w)));
        tw.write(&format!(
            "BuildKit:\t{} {} {}\n",
            v.package, v.version, v.revision
        ));
        tw.write("Labels:\n");
        for (k, v) in &w.labels {
            tw.write(&format!("\t{k}:\t{v}\n"));
        }
        for (i, rule) in w.gc_policy.iter().enumerate() {
            tw.write(&format!("GC Policy rule#{i}:\n"));
            tw.write(&format!("\tAll:\t{}\n", rule.all));
            if !rule.filters.is_empty() {
                tw.write(&format!("\tFilters:\t{}\n", rule.filters.join(" ")));
            }
            if rule.keep_duration > 0 {
                tw.write(&format!(
                    "\tKeep Duration:\t{}\n",
                    go_duration(rule.keep_duration)
                ));
            }
            if rule.reserved_space > 0 {
                tw.write(&format!("\tKeep Bytes:\t{}\n", bytes(rule.reserved_space)));
            }
        }
        tw.write("\n");
    }
    tw.finish()
}

fn version_json(v: &protos::moby::buildkit::v1::types::BuildkitVersion) -> serde_json::Value {
    json!({ "Package": v.package, "Version": v.version, "Revision": v.revision })
}

fn workers_json(workers: &[protos::moby::buildkit::v1::types::WorkerRecord]) -> serde_json::Value {
    workers
        .iter()
        .map(|w| {
            json!({
                "ID": w.id,
                "Labels": w.labels,
                "Platforms": w.platforms.iter().map(|p| {
                    let mut o = json!({ "architecture": p.architecture, "os": p.os });
                    if !p.variant.is_empty() {
                        o["variant"] = json!(p.variant);
                    }
                    o
                }).collect::<Vec<_>>(),
                "GCPolicy": w.gc_policy.iter().map(|r| json!({
                    "All": r.all,
                    "Filter": r.filters,
                    "KeepDuration": r.keep_duration,
                    "KeepBytes": r.reserved_space,
                })).collect::<Vec<_>>(),
                "BuildkitVersion": version_json(&w.buildkit_version.clone().unwrap_or_default()),
            })
        })
        .collect()
}

/// Go's `time.Duration.String()` for whole nanosecond counts of at least a second.
fn go_duration(ns: i64) -> String {
    let total = ns / 1_000_000_000;
    let (h, m, s) = (total / 3600, (total / 60) % 60, total % 60);
    let frac = ns % 1_000_000_000;
    let secs = if frac == 0 {
        format!("{s}")
    } else {
        let f = format!("{:09}", frac);
        format!("{s}.{}", f.trim_end_matches('0'))
    };
    if h > 0 {
        format!("{h}h{m}m{secs}s")
    } else if m > 0 {
        format!("{m}m{secs}s")
    } else {
        format!("{secs}s")
    }
}

/// Binary units with four significant digits, like buildctl's `%g` of `units.Bytes`.
fn bytes(n: i64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    // Go's %g with four significant digits.
    let int_digits = if v < 1.0 {
        1
    } else {
        (v.log10().floor() as usize) + 1
    };
    let s = format!("{v:.*}", 4usize.saturating_sub(int_digits));
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s}{}", UNITS[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(go_duration(48 * 3600 * 1_000_000_000), "48h0m0s");
        assert_eq!(go_duration(90 * 1_000_000_000), "1m30s");
        assert_eq!(go_duration(1_500_000_000), "1.5s");
        assert_eq!(bytes(512 << 20), "512MiB");
        assert_eq!(bytes(1536), "1.5KiB");
        assert_eq!(bytes(10), "10B");
        assert_eq!(bytes(512_000_000), "488.3MiB");
        assert_eq!(bytes(10_000_000_000), "9.313GiB");
        assert!(json_template("{{json .}}").is_ok());
        assert!(json_template("{{ json . }}").is_ok());
        assert!(json_template("{{.ID}}").is_err());
    }

    #[test]
    fn workers_table_like_stock() {
        let w = protos::moby::buildkit::v1::types::WorkerRecord {
            id: "abcdefghijklmnopqrstuvwxy".into(),
            platforms: vec![
                protos::pb::Platform {
                    os: "linux".into(),
                    architecture: "amd64".into(),
                    ..Default::default()
                },
                protos::pb::Platform {
                    os: "linux".into(),
                    architecture: "arm".into(),
                    variant: "v7".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            workers_table(&[w]),
            "ID\t\t\t\tPLATFORMS\nabcdefghijklmnopqrstuvwxy\tlinux/amd64,linux/arm/v7\n"
        );
    }
}
