//! A build: LLB (or a frontend), `--local` directories, one exporter, plain progress.
//!
//! Two protocol paths, both stock:
//! - **direct** (buildctl v0.11.6 with LLB on stdin): `Control.Solve` carries the definition and
//!   the exporter in the single-exporter fields;
//! - **gateway** (Go's `client.Build`, used when an image config is given): `Control.Solve`
//!   carries only the exporter, and this client drives `LLBBridge` `Ping`/`Solve`/`Return`
//!   tagged with `buildkit-controlapi-buildid`, returning the result with `containerimage.config`
//!   metadata, which the image exporter turns into the image's config.
//!
//! Around either, a session serves the local directories, `Control.Status` is printed as plain
//! progress on stderr, and the session is closed after the solve. Outputs the daemon keeps
//! (`type=image`, `type=moby`, `type=registry`) are supported; outputs streamed back to the
//! client (`local`, `tar`, `docker`, `oci`) are refused with an error that says so, as this client
//! serves no FileSend.

use crate::connect::{Target, MAX_MESSAGE};
use crate::progress::Printer;
use crate::session::{new_id, Session};
use anyhow::{bail, Context};
use futures::StreamExt;
use protos::moby::buildkit::v1 as control;
use protos::moby::buildkit::v1::frontend as gw;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// What to build and where the result goes.
#[derive(Debug, Default)]
pub struct SolveOptions {
    /// The LLB definition (absent with a frontend).
    pub definition: Option<protos::pb::Definition>,
    /// `--frontend`.
    pub frontend: Option<String>,
    /// `--opt` values (and `no-cache`).
    pub frontend_attrs: BTreeMap<String, String>,
    /// `--local name=dir`.
    pub locals: BTreeMap<String, PathBuf>,
    /// The exporter type and attributes (`--output`), if any.
    pub output: Option<(String, BTreeMap<String, String>)>,
    /// `--allow` entitlements.
    pub entitlements: Vec<String>,
    /// An image config (JSON) for the result: selects the gateway path.
    pub image_config: Option<Vec<u8>>,
    /// Print no progress.
    pub quiet: bool,
}

/// Splits one comma-separated `key=value` list, honouring double quotes around a field the way
/// Go's encoding/csv reads buildctl's `--output` (`"name=a,b",push=true`).
fn csv_fields(s: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                cur.push('"');
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    if quoted {
        bail!("invalid value {s:?}: unterminated quote");
    }
    out.push(cur);
    Ok(out)
}

/// Parses `--output` into the exporter type and its attributes.
pub fn parse_output(s: &str) -> anyhow::Result<(String, BTreeMap<String, String>)> {
    let mut typ = None;
    let mut attrs = BTreeMap::new();
    for f in csv_fields(s)? {
        let (k, v) = f
            .split_once('=')
            .with_context(|| format!("invalid value {f:?} in --output {s:?}: want key=value"))?;
        let k = k.trim().to_lowercase();
        if k == "type" {
            typ = Some(v.to_string());
        } else {
            attrs.insert(k, v.to_string());
        }
    }
    let typ = typ.with_context(|| format!("--output {s:?}: type is required"))?;
    match typ.as_str() {
        "local" | "tar" | "docker" | "oci" => bail!(
            "--output type={typ}: berth's buildctl does not receive outputs; use type=image (or stock buildctl)"
        ),
        _ => Ok((typ, attrs)),
    }
}

/// A request tagged with the build it belongs to.
fn with_build_id<T>(m: T, build_ref: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert("buildkit-controlapi-buildid", build_ref.parse()?);
    Ok(r)
}

/// Runs the build; returns the exporter's response (`containerimage.digest`...).
pub async fn solve(
    target: &Target,
    opts: SolveOptions,
) -> anyhow::Result<BTreeMap<String, String>> {
    if opts.definition.is_none() && opts.frontend.is_none() {
        bail!("nothing to build: give an LLB definition or a frontend");
    }
    let mut locals = opts.locals;
    for (name, dir) in locals.iter_mut() {
        *dir = std::fs::canonicalize(&*dir)
            .with_context(|| format!("--local {name}={}", dir.display()))?;
        if !dir.is_dir() {
            bail!("--local {name}={}: not a directory", dir.display());
        }
    }
    let channel = target.channel().await?;
    let session = Session::open(channel.clone(), locals).await?;
    let build_ref = new_id();
    let client =
        control::control_client::ControlClient::new(crate::connect::traced(channel.clone()))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);

    let mut status_client = client.clone();
    let status_ref = build_ref.clone();
    let quiet = opts.quiet;
    let status = tokio::spawn(async move {
        let mut printer = Printer::default();
        let Ok(stream) = status_client
            .status(control::StatusRequest { r#ref: status_ref })
            .await
        else {
            return;
        };
        let mut stream = stream.into_inner();
        while let Some(Ok(r)) = stream.next().await {
            let text = printer.update(&r);
            if !quiet && !text.is_empty() {
                eprint!("{text}");
            }
        }
    });

    let (exporter, exporter_attrs) = opts.output.unwrap_or_default();
    let gateway = opts.image_config.is_some();
    #[allow(deprecated)]
    let req = control::SolveRequest {
        r#ref: build_ref.clone(),
        definition: if gateway {
            None
        } else {
            opts.definition.clone()
        },
        exporter_deprecated: exporter,
        exporter_attrs_deprecated: exporter_attrs,
        session: session.id.clone(),
        frontend: opts.frontend.clone().unwrap_or_default(),
        frontend_attrs: opts.frontend_attrs.clone(),
        entitlements: opts.entitlements.clone(),
        ..Default::default()
    };
    let mut solve_client = client.clone();
    let solved = tokio::spawn(async move { solve_client.solve(req).await });
    if let (Some(config), Some(definition)) = (opts.image_config, opts.definition) {
        // The gateway's answer is awaited through Control.Solve: a failure here ends the build.
        let mut g = gw::llb_bridge_client::LlbBridgeClient::new(crate::connect::traced(channel))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let result = async {
            g.ping(with_build_id(gw::PingRequest {}, &build_ref)?)
                .await
                .context("LLBBridge.Ping")?;
            let res = g
                .solve(with_build_id(
                    gw::SolveRequest {
                        definition: Some(definition),
                        allow_result_return: true,
                        allow_result_array_ref: true,
                        ..Default::default()
                    },
                    &build_ref,
                )?)
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner()
                .result
                .unwrap_or_default();
            anyhow::Ok(res)
        }
        .await;
        let ret = match result {
            Ok(mut res) => {
                res.metadata
                    .insert("containerimage.config".into(), config.into());
                gw::ReturnRequest {
                    result: Some(res),
                    error: None,
                }
            }
            Err(e) => gw::ReturnRequest {
                result: None,
                error: Some(protos::google::rpc::Status {
                    code: tonic::Code::Unknown as i32,
                    message: format!("{e:#}"),
                    details: vec![],
                }),
            },
        };
        g.r#return(with_build_id(ret, &build_ref)?)
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))
            .context("LLBBridge.Return")?;
    }
    let solved = solved.await.context("solve task")?;
    // buildctl stops waiting for progress a short while after the solve returns.
    if tokio::time::timeout(Duration::from_secs(3), status)
        .await
        .is_err()
    {
        eprintln!("warning: progress did not end within 3 s after the build");
    }
    session.close(Duration::from_secs(5)).await;
    let resp = solved
        .map_err(|s| anyhow::anyhow!("{}", s.message()))
        .context("failed to solve")?
        .into_inner();
    Ok(resp.exporter_response.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs() {
        let (t, a) = parse_output("type=image,\"name=a:1,b:2\",push=false").unwrap();
        assert_eq!(t, "image");
        assert_eq!(a.get("name").unwrap(), "a:1,b:2");
        assert_eq!(a.get("push").unwrap(), "false");
        let (t, a) = parse_output("type=moby,Name=x").unwrap();
        assert_eq!(t, "moby");
        assert_eq!(a.get("name").unwrap(), "x");
        for bad in [
            "name=x",
            "type=local,dest=/tmp/x",
            "type=docker",
            "type=image,noequals",
            "type=image,\"name=x",
        ] {
            assert!(parse_output(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn csv() {
        assert_eq!(csv_fields("a,b").unwrap(), vec!["a", "b"]);
        assert_eq!(csv_fields("\"a,b\",c").unwrap(), vec!["a,b", "c"]);
        assert_eq!(csv_fields("\"a\"\"b\"").unwrap(), vec!["a\"b"]);
    }
}
