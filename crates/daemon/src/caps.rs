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
    "frontend.inputs",
    "gateway.solve.metadata",
    "gateway.warnings",
];

/// LLB caps (`LLBCaps`): the ops and attributes the worker executes.
pub const LLB_CAPS: &[&str] = &[
    "source.image",
    "source.image.resolvemode",
    "source.image.layerlimit",
    "source.local",
    "source.local.unique",
    "source.local.sessionid",
    "source.local.includepatterns",
    "source.local.followpaths",
    "source.local.excludepatterns",
    "source.local.sharedkeyhint",
    "source.local.differ",
    "source.git",
    "source.git.keepgitdir",
    "source.git.fullurl",
    "source.git.httpauth",
    "source.git.knownsshhosts",
    "source.git.mountsshsock",
    "source.git.subdir",
    "source.http",
    "source.http.checksum",
    "source.http.perm",
    "soruce.http.uidgid",
    "exec.meta.base",
    "exec.meta.cgroup.parent",
    "exec.meta.network",
    "exec.meta.proxyenv",
    "exec.meta.security",
    "exec.meta.security.devices.v1",
    "exec.meta.setsdefaultpath",
    "exec.meta.ulimit",
    "exec.meta.removemountstubs.recursive",
    "exec.mount.bind",
    "exec.mount.bind.readwrite-nooutput",
    "exec.mount.cache",
    "exec.mount.cache.sharing",
    "exec.mount.selector",
    "exec.mount.tmpfs",
    "exec.mount.tmpfs.size",
    "exec.mount.secret",
    "exec.mount.ssh",
    "exec.cgroup",
    "exec.secretenv",
    "file.base",
    "file.rm.wildcard",
    "file.copy.includeexcludepatterns",
    "file.rm.nofollowsymlink",
    "constraints",
    "platform",
    "meta.ignorecache",
    "meta.description",
    "meta.exportcache",
    "mergeop",
    "diffop",
    "exporter.sourcedateepoch",
];

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

/// `PongResponse.LLBCaps`.
pub fn llb_caps() -> Vec<ApiCap> {
    to_caps(LLB_CAPS)
}

/// Whether an LLB cap is supported.
pub fn llb_cap_supported(id: &str) -> bool {
    LLB_CAPS.contains(&id)
}
