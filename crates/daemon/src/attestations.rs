//! Attestations of a build result (`Result.attestations` of a gateway `Return`, per platform
//! key), as BuildKit v0.11.6 takes them (`frontend/gateway/gateway.go`,
//! `exporter/attestation/unbundle.go`, `make.go`):
//!
//! - [`from_wire`] keeps each attestation with its ref looked up in the job (a ref is needed:
//!   the predicate, or a bundle's statements, are files of it);
//! - [`resolve`] reads what the exporters write: an in-toto attestation's predicate is the file
//!   at its path; a bundle is a directory of in-toto statements, each becoming one attestation
//!   with raw subjects (none: the exported artefact) and a predicate type that must match the
//!   bundle's when the bundle names one. Frontends may not set SLSA provenance themselves.
//!
//! Paths are resolved inside the ref's root ([`crate::fsread`], `RESOLVE_IN_ROOT`).

use std::collections::BTreeMap;

use bytes::Bytes;
use exporter::attestation::{Attestation, Subject};
use protos::moby::buildkit::v1::frontend as gw;

use crate::errors::{Error, Result};
use crate::jobs::Job;
use crate::solver::{Backend, FsRef};

/// Metadata key of an attestation only for inline use (`result.AttestationInlineOnlyKey`).
pub const INLINE_ONLY: &str = "inline-only";
/// Predicate types only berthd itself may produce.
const PROVENANCE_PREFIX: &str = "https://slsa.dev/provenance/";

/// What an attestation holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One in-toto statement whose predicate is the file at `path`.
    InToto,
    /// A directory of in-toto statements at `path`.
    Bundle,
}

/// An attestation of a result, its ref resolved.
#[derive(Debug, Clone)]
pub struct ResultAttestation {
    /// In-toto or bundle.
    pub kind: Kind,
    /// Its metadata (`reason`, `sbom-core`, `inline-only`).
    pub metadata: BTreeMap<String, Bytes>,
    /// The result holding its files.
    pub fs: Option<FsRef>,
    /// The file (in-toto) or directory (bundle) in `fs`.
    pub path: String,
    /// `inTotoPredicateType` (for a bundle: the type every statement must have, if set).
    pub predicate_type: String,
    /// Its subjects.
    pub subjects: Vec<Subject>,
    /// berthd's own predicate (provenance, [`crate::provenance`]), used as is: no file read.
    pub content: Option<Bytes>,
    /// With `content` of a `mode=max` provenance: each build step's layers
    /// ([`exporter::attestation::Attestation::provenance_layers`]).
    pub provenance_layers: Vec<(String, Vec<layerstore::snapshot::LayerRef>)>,
}

/// Attestations by platform key.
pub type Attestations = BTreeMap<String, Vec<ResultAttestation>>;

/// The attestations of a `Return`'s result, refs looked up in `job` (and solved if they were
/// lazy).
pub async fn from_wire(
    backend: &std::sync::Arc<Backend>,
    job: &Job,
    wire: BTreeMap<String, gw::Attestations>,
) -> Result<Attestations> {
    let mut out = Attestations::new();
    for (key, atts) in wire {
        for a in atts.attestation {
            let kind = match gw::AttestationKind::try_from(a.kind) {
                Ok(gw::AttestationKind::InToto) => Kind::InToto,
                Ok(gw::AttestationKind::Bundle) => Kind::Bundle,
                Err(_) => {
                    return Err(Error::invalid(format!(
                        "unknown attestation kind {}",
                        a.kind
                    )))
                }
            };
            let fs = match &a.r#ref {
                None => None,
                Some(r) if r.id.is_empty() => Some(FsRef::Scratch),
                Some(r) => Some(job.get_ref(backend, &r.id).await?),
            };
            let subjects = a
                .in_toto_subjects
                .into_iter()
                .map(|s| match gw::InTotoSubjectKind::try_from(s.kind) {
                    Ok(gw::InTotoSubjectKind::Self_) => Ok(Subject::Own { name: s.name }),
                    Ok(gw::InTotoSubjectKind::Raw) => Ok(Subject::Raw {
                        name: s.name,
                        digests: s.digest,
                    }),
                    Err(_) => Err(Error::invalid(format!(
                        "unknown attestation subject type {}",
                        s.kind
                    ))),
                })
                .collect::<Result<Vec<_>>>()?;
            out.entry(key.clone()).or_default().push(ResultAttestation {
                kind,
                metadata: a.metadata,
                fs,
                path: a.path,
                predicate_type: a.in_toto_predicate_type,
                subjects,
                content: None,
                provenance_layers: vec![],
            });
        }
    }
    Ok(out)
}

/// The attestations of a frontend result as an `LLBBridge.Solve` answer carries them, each ref
/// added to `job` (a gateway client such as buildx returns them with the result). berthd's own
/// predicates (`content`, provenance) are not frontend attestations and are left out.
pub fn to_wire(job: &Job, atts: &Attestations) -> BTreeMap<String, gw::Attestations> {
    atts.iter()
        .map(|(key, list)| {
            let attestation = list
                .iter()
                .filter(|a| a.content.is_none())
                .map(|a| gw::Attestation {
                    kind: match a.kind {
                        Kind::InToto => gw::AttestationKind::InToto,
                        Kind::Bundle => gw::AttestationKind::Bundle,
                    } as i32,
                    metadata: a.metadata.clone(),
                    r#ref: a.fs.clone().map(|fs| gw::Ref {
                        id: job.add_ref(fs),
                        def: None,
                    }),
                    path: a.path.clone(),
                    in_toto_predicate_type: a.predicate_type.clone(),
                    in_toto_subjects: a
                        .subjects
                        .iter()
                        .map(|s| match s {
                            Subject::Own { name } => gw::InTotoSubject {
                                kind: gw::InTotoSubjectKind::Self_ as i32,
                                name: name.clone(),
                                digest: vec![],
                            },
                            Subject::Raw { name, digests } => gw::InTotoSubject {
                                kind: gw::InTotoSubjectKind::Raw as i32,
                                name: name.clone(),
                                digest: digests.clone(),
                            },
                        })
                        .collect(),
                })
                .collect();
            (key.clone(), gw::Attestations { attestation })
        })
        .collect()
}

/// Whether an attestation is only for inline use (left out of local and tar exports).
pub fn inline_only(a: &ResultAttestation) -> bool {
    a.metadata.get(INLINE_ONLY).map(|v| v.as_ref()) == Some(b"true")
}

fn validate(a: &ResultAttestation) -> Result<()> {
    if a.content.is_some() {
        return Ok(());
    }
    if a.kind != Kind::Bundle && a.path.is_empty() {
        return Err(Error::invalid("attestation does not have set path"));
    }
    if a.fs.is_none() {
        return Err(Error::invalid(
            "attestation does not have available content",
        ));
    }
    Ok(())
}

/// Un-bundles `atts` and reads every predicate (module docs). SBOM core attestations
/// (`sbom-core` naming the file) come first, as in BuildKit.
pub async fn resolve(backend: &Backend, atts: &[ResultAttestation]) -> Result<Vec<Attestation>> {
    for a in atts {
        validate(a)?;
    }
    let mut core = Vec::new();
    let mut rest = Vec::new();
    for a in atts {
        if let Some(predicate) = &a.content {
            rest.push(Attestation {
                path: a.path.clone(),
                predicate_type: a.predicate_type.clone(),
                subjects: a.subjects.clone(),
                predicate: predicate.to_vec(),
                sbom_core: false,
                provenance_layers: a.provenance_layers.clone(),
            });
            continue;
        }
        let fs = a.fs.as_ref().expect("validated");
        let view = backend.view(fs).await?;
        match a.kind {
            Kind::InToto => {
                if a.predicate_type.starts_with(PROVENANCE_PREFIX) {
                    return Err(Error::invalid(
                        "frontend may not set provenance attestations",
                    ));
                }
                let predicate = crate::fsread::read_file(view.path(), &a.path, 0, 0)
                    .await
                    .map_err(|e| Error::invalid(format!("cannot read in-toto attestation: {e}")))?;
                let mut att = Attestation {
                    path: a.path.clone(),
                    predicate_type: a.predicate_type.clone(),
                    subjects: a.subjects.clone(),
                    predicate,
                    sbom_core: false,
                    provenance_layers: vec![],
                };
                att.sbom_core = is_core(a, &att.path);
                if att.sbom_core {
                    core.push(att);
                } else {
                    rest.push(att);
                }
            }
            Kind::Bundle => {
                for mut att in unbundle(view.path(), a).await? {
                    att.sbom_core = is_core(a, &att.path);
                    if att.predicate_type.starts_with(PROVENANCE_PREFIX) {
                        return Err(Error::invalid(
                            "frontend may not bundle provenance attestations",
                        ));
                    }
                    if att.sbom_core {
                        core.push(att);
                    } else {
                        rest.push(att);
                    }
                }
            }
        }
    }
    core.extend(rest);
    Ok(core)
}

/// An SBOM core attestation: its `sbom-core` metadata names the file (before its first `.`).
fn is_core(a: &ResultAttestation, path: &str) -> bool {
    let Some(name) = a.metadata.get("sbom-core") else {
        return false;
    };
    let base = path.rsplit('/').next().unwrap_or(path);
    base.split('.').next().unwrap_or(base).as_bytes() == name.as_ref()
}

/// The statements of bundle `a` (a directory of its result at `root`), in name order.
async fn unbundle(root: &std::path::Path, a: &ResultAttestation) -> Result<Vec<Attestation>> {
    let entries = crate::fsread::read_dir(root, &a.path, "").await?;
    let mut out = Vec::new();
    for st in entries {
        let p = format!("{}/{}", a.path.trim_end_matches('/'), st.path);
        let dt = crate::fsread::read_file(root, &p, 0, 0).await?;
        let stmt: serde_json::Value = serde_json::from_slice(&dt)
            .map_err(|e| Error::invalid(format!("cannot decode in-toto statement: {e}")))?;
        let predicate_type = stmt
            .get("predicateType")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        if !a.predicate_type.is_empty() && predicate_type != a.predicate_type {
            return Err(Error::invalid(format!(
                "bundle entry {predicate_type} does not match required predicate type {}",
                a.predicate_type
            )));
        }
        let predicate =
            serde_json::to_vec(stmt.get("predicate").unwrap_or(&serde_json::Value::Null))
                .expect("JSON value serialises");
        let mut subjects = Vec::new();
        if let Some(list) = stmt.get("subject").and_then(|v| v.as_array()) {
            for s in list {
                let name = s.get("name").and_then(|v| v.as_str()).unwrap_or_default();
                let digests = s
                    .get("digest")
                    .and_then(|v| v.as_object())
                    .map(|m| {
                        m.iter()
                            .map(|(alg, hex)| format!("{alg}:{}", hex.as_str().unwrap_or_default()))
                            .collect()
                    })
                    .unwrap_or_default();
                subjects.push(Subject::Raw {
                    name: name.to_string(),
                    digests,
                });
            }
        }
        out.push(Attestation {
            path: p,
            predicate_type,
            subjects,
            predicate,
            sbom_core: false,
            provenance_layers: vec![],
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn att(meta: &[(&str, &str)]) -> ResultAttestation {
        ResultAttestation {
            kind: Kind::InToto,
            metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), Bytes::from(v.to_string())))
                .collect(),
            fs: Some(FsRef::Scratch),
            path: "/sbom.spdx.json".into(),
            predicate_type: String::new(),
            subjects: vec![],
            content: None,
            provenance_layers: vec![],
        }
    }

    #[test]
    fn core_and_inline_only() {
        assert!(is_core(&att(&[("sbom-core", "sbom")]), "/sbom.spdx.json"));
        assert!(!is_core(&att(&[("sbom-core", "other")]), "/sbom.spdx.json"));
        assert!(!is_core(&att(&[]), "/sbom.spdx.json"));
        assert!(inline_only(&att(&[("inline-only", "true")])));
        assert!(!inline_only(&att(&[("inline-only", "false")])));
    }

    #[test]
    fn validation() {
        let mut a = att(&[]);
        a.path.clear();
        assert!(validate(&a).unwrap_err().to_string().contains("path"));
        a.kind = Kind::Bundle;
        assert!(validate(&a).is_ok());
        a.fs = None;
        assert!(validate(&a)
            .unwrap_err()
            .to_string()
            .contains("available content"));
    }
}
