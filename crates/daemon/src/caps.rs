//! Capabilities advertised by `LLBBridge.Ping` (`control-api.md` §9, `llb.md` §10).
//!
//! Only what berth implements (or implements this cycle) is listed: advertising a cap makes the
//! client use it, and omitting one makes it refuse LLB that needs it.

use protos::moby::buildkit::v1::apicaps::ApiCap;

/// Frontend API caps (`FrontendAPICaps`).
pub const FRONTEND_CAPS: &[&str] = &[
    "solve.base",
    "resolveimage",
    "resolveimage.resolvemode",
    "readfile",
    "return",
    "returnmap",
    "readdir",
    "statfile",
    "importcaches",
    "proto.refarray",
    // `Solve` answers a definition's ref with that definition (`Ref.ToState`).
    "reference.output",
    "frontend.inputs",
    "gateway.solve.metadata",
    "gateway.warnings",
    "gateway.exec",
    "gateway.exec.extrahosts",
    "gateway.exec.signals",
    "gateway.evaluate",
    // A `Return`'s result may carry attestations ([`crate::attestations::from_wire`]).
    "reference.attestations",
];

/// Caps of the exporters that are not worker ops, advertised with the worker's LLB caps.
///
/// `exporter.image.attestations`: every exporter takes a result with attestations as
/// buildkitd v0.11.6 does, as far as its target holds them (a pushed image and `oci`/`docker`
/// archives carry them in an index; Docker's image store holds no index, so `image` without
/// push registers the image alone). buildx 0.13.1 sends `--sbom`/`--provenance` only with it,
/// and then asks for a provenance (`mode=min,inline-only=true`) on every build.
/// `exporter.image.annotations` is not advertised: the `docker` exporter does not write them.
pub const EXPORTER_CAPS: &[&str] = &["exporter.sourcedateepoch", "exporter.image.attestations"];

fn to_caps(ids: &[&str]) -> Vec<ApiCap> {
    ids.iter()
        .map(|id| ApiCap {
            id: id.to_string(),
            enabled: true,
            ..Default::default()
        })
        .collect()
}

/// `PongResponse.FrontendAPICaps`.
pub fn frontend_caps() -> Vec<ApiCap> {
    to_caps(FRONTEND_CAPS)
}

/// `PongResponse.LLBCaps`: what the worker executes, plus exporter caps.
pub fn llb_caps() -> Vec<ApiCap> {
    let mut ids: Vec<&str> = crate::solver::Backend::llb_caps().to_vec();
    ids.extend_from_slice(EXPORTER_CAPS);
    to_caps(&ids)
}
