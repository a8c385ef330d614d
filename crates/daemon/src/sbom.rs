//! SBOM scanning of a build result (`attest:sbom` / `build-arg:BUILDKIT_ATTEST_SBOM` frontend
//! attributes), as buildkitd v0.11.6's control-level SBOM processor does
//! (`solver/llbsolver/proc/sbom.go`, `frontend/attestations/sbom/sbom.go`):
//!
//! - the attribute is a CSV of `key=value`; `generator` names the scanner image (default
//!   `docker/buildkit-syft-scanner:stable-1`, `:latest` added to a name without tag);
//! - a result that already carries an SPDX attestation is left alone;
//! - for each platform of the result, the scanner runs as an exec op: its image as rootfs, its
//!   entrypoint + cmd, env and working dir, `/tmp` a tmpfs, the platform's result read-only at
//!   `/run/src/core/sbom` (`BUILDKIT_SCAN_SOURCE`) and an empty `/run/out/`
//!   (`BUILDKIT_SCAN_DESTINATION`), whose content becomes a bundle attestation (SPDX,
//!   `reason=sbom`, `sbom-core=sbom`) of that platform. `no-cache` (empty) runs it uncached.
//!
//! The scanned result enters the op through its definition (the one the frontend's `Return`
//! carried with the ref), so the solve finds it in the cache.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use protos::moby::buildkit::v1::frontend as gw;
use protos::pb;

use crate::attestations::{Kind, ResultAttestation};
use crate::errors::{Error, Result};
use crate::jobs::{BuildResult, Job};
use crate::solver::{Backend, SolveCtx};

const DEFAULT_GENERATOR: &str = "docker/buildkit-syft-scanner:stable-1";
const PREDICATE_SPDX: &str = "https://spdx.dev/Document";
const SRC: &str = "/run/src/core/sbom";
const OUT: &str = "/run/out/";

/// The scanner image the frontend attributes ask for, if any.
pub fn generator(frontend_attrs: &BTreeMap<String, String>) -> Result<Option<String>> {
    let mut value = None;
    for (k, v) in frontend_attrs {
        let key = k
            .strip_prefix("attest:")
            .or_else(|| k.strip_prefix("build-arg:BUILDKIT_ATTEST_"));
        if key.is_some_and(|k| k.eq_ignore_ascii_case("sbom")) {
            value = Some(v.clone());
        }
    }
    let Some(v) = value else {
        return Ok(None);
    };
    let mut gen = DEFAULT_GENERATOR.to_string();
    for field in v.split(',').filter(|f| !f.is_empty()) {
        let (k, val) = field.split_once('=').unwrap_or((field, ""));
        if k == "generator" {
            gen = val.to_string();
        }
    }
    if gen.is_empty() {
        return Err(Error::invalid("sbom generator cannot be empty"));
    }
    let name = exporter::normalize_name(&gen)
        .map_err(|e| Error::invalid(format!("failed to parse sbom generator {gen}: {e}")))?;
    Ok(Some(name))
}

/// The scanner image's config: what runs.
#[derive(Debug, Default, serde::Deserialize)]
struct ScannerConfig {
    #[serde(default, rename = "Entrypoint")]
    entrypoint: Option<Vec<String>>,
    #[serde(default, rename = "Cmd")]
    cmd: Option<Vec<String>>,
    #[serde(default, rename = "Env")]
    env: Option<Vec<String>>,
    #[serde(default, rename = "WorkingDir")]
    working_dir: String,
}

#[derive(Debug, Default, serde::Deserialize)]
struct Image {
    #[serde(default)]
    config: ScannerConfig,
}

/// Adds an SBOM bundle attestation per platform of `result` made by `generator` (module docs).
/// `platforms`: the result's platforms (ID, platform), `no_cache`: run the scanner uncached.
#[allow(clippy::too_many_arguments)]
pub async fn scan(
    backend: &Arc<Backend>,
    docker: &crate::docker::Docker,
    job: &Arc<Job>,
    ctx: &SolveCtx,
    generator: &str,
    no_cache: bool,
    platforms: &[(String, exporter::image::Platform)],
    result: &mut BuildResult,
) -> Result<()> {
    let has_sbom = result
        .attestations
        .values()
        .flatten()
        .any(|a| a.predicate_type == PREDICATE_SPDX);
    if has_sbom {
        return Ok(());
    }
    let (_, cfg) = crate::gateway::resolve_config(
        backend,
        docker,
        job,
        &gw::ResolveImageConfigRequest {
            r#ref: generator.to_string(),
            ..Default::default()
        },
    )
    .await?;
    let img: Image = serde_json::from_slice(&cfg)
        .map_err(|e| Error::invalid(format!("sbom generator {generator}: image config: {e}")))?;
    let cfg = img.config;
    let mut args = cfg.entrypoint.unwrap_or_default();
    args.extend(cfg.cmd.unwrap_or_default());
    if args.is_empty() {
        return Err(Error::invalid(format!(
            "scanner {generator} does not have cmd"
        )));
    }
    let mut env = cfg.env.unwrap_or_default();
    env.push(format!("BUILDKIT_SCAN_DESTINATION={OUT}"));
    env.push(format!("BUILDKIT_SCAN_SOURCE={SRC}"));
    for (id, platform) in platforms {
        let Some(def) = result.defs.get(id).or_else(|| result.defs.get("")) else {
            return Err(Error::unimplemented(format!(
                "sbom scan of {id}: the result's ref carries no definition"
            )));
        };
        let def = scan_definition(
            def,
            generator,
            id,
            platform,
            &args,
            &env,
            &cfg.working_dir,
            no_cache,
        )?;
        let out = backend.solve(Some(def), ctx).await?;
        result
            .attestations
            .entry(id.clone())
            .or_default()
            .push(ResultAttestation {
                kind: Kind::Bundle,
                metadata: BTreeMap::from([
                    ("reason".to_string(), Bytes::from_static(b"sbom")),
                    ("sbom-core".to_string(), Bytes::from_static(b"sbom")),
                ]),
                fs: Some(out),
                path: String::new(),
                predicate_type: PREDICATE_SPDX.to_string(),
                subjects: vec![],
                content: None,
                provenance_layers: vec![],
            });
    }
    Ok(())
}

fn op_digest(b: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b))
    )
}

/// The definition running the scanner over the result of `scanned` (its terminal op's input).
#[allow(clippy::too_many_arguments)]
fn scan_definition(
    scanned: &pb::Definition,
    generator: &str,
    id: &str,
    platform: &exporter::image::Platform,
    args: &[String],
    env: &[String],
    cwd: &str,
    no_cache: bool,
) -> Result<pb::Definition> {
    // The scanned result: the input of the definition's last (terminal) op.
    let mut ops: Vec<Bytes> = scanned.def.clone();
    let last = ops
        .pop()
        .ok_or_else(|| Error::invalid(format!("sbom scan of {id}: empty definition")))?;
    let term = pb::Op::decode(&last[..])
        .map_err(|e| Error::invalid(format!("sbom scan of {id}: bad definition: {e}")))?;
    let src_input = term.inputs.first().cloned();
    let pb_platform = pb::Platform {
        architecture: platform.architecture.clone(),
        os: platform.os.clone(),
        variant: platform.variant.clone(),
        ..Default::default()
    };
    let image = pb::Op {
        op: Some(pb::op::Op::Source(pb::SourceOp {
            identifier: format!("docker-image://{generator}"),
            attrs: Default::default(),
        })),
        platform: Some(pb_platform.clone()),
        ..Default::default()
    }
    .encode_to_vec();
    let image_digest = op_digest(&image);
    let mut inputs = vec![pb::Input {
        digest: image_digest,
        index: 0,
    }];
    let src_index = match src_input {
        Some(i) => {
            inputs.push(i);
            1
        }
        None => -1, // a scratch result
    };
    let mount = |input: i64, dest: &str, output: i64, readonly: bool| pb::Mount {
        input,
        dest: dest.to_string(),
        output,
        readonly,
        ..Default::default()
    };
    let exec = pb::Op {
        inputs,
        op: Some(pb::op::Op::Exec(pb::ExecOp {
            meta: Some(pb::Meta {
                args: args.to_vec(),
                env: env.to_vec(),
                cwd: if cwd.is_empty() {
                    "/".into()
                } else {
                    cwd.into()
                },
                // As upstream's LLB client marshals every ExecOp (the scanner run included).
                remove_mount_stubs_recursive: true,
                ..Default::default()
            }),
            mounts: vec![
                mount(0, "/", -1, false),
                pb::Mount {
                    mount_type: pb::MountType::Tmpfs as i32,
                    tmpfs_opt: Some(pb::TmpfsOpt::default()),
                    ..mount(-1, "/tmp", -1, false)
                },
                mount(src_index, SRC, -1, true),
                mount(-1, OUT, 0, false),
            ],
            ..Default::default()
        })),
        platform: Some(pb_platform),
        ..Default::default()
    }
    .encode_to_vec();
    let exec_digest = op_digest(&exec);
    let term = pb::Op {
        inputs: vec![pb::Input {
            digest: exec_digest.clone(),
            index: 0,
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let mut metadata = scanned.metadata.clone();
    metadata.insert(
        exec_digest,
        pb::OpMetadata {
            ignore_cache: no_cache,
            description: BTreeMap::from([(
                "llb.customname".to_string(),
                format!("[{id}] generating sbom using {generator}"),
            )]),
            ..Default::default()
        },
    );
    ops.push(image.into());
    ops.push(exec.into());
    ops.push(term.into());
    Ok(pb::Definition {
        def: ops,
        metadata,
        source: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_attribute() {
        let attrs = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert_eq!(generator(&BTreeMap::new()).unwrap(), None);
        assert_eq!(
            generator(&attrs("attest:sbom", "generator=localhost:5000/s")).unwrap(),
            Some("localhost:5000/s:latest".into())
        );
        assert_eq!(
            generator(&attrs("build-arg:BUILDKIT_ATTEST_SBOM", "")).unwrap(),
            Some("docker.io/docker/buildkit-syft-scanner:stable-1".into())
        );
        let e = generator(&attrs("attest:sbom", "generator=")).unwrap_err();
        assert!(
            e.to_string().contains("sbom generator cannot be empty"),
            "{e}"
        );
    }
}
