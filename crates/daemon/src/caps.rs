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
];

/// Caps of the exporters that are not worker ops, advertised with the worker's LLB caps.
pub const EXPORTER_CAPS: &[&str] = &["exporter.sourcedateepoch"];

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
