//! LLB cap IDs (`solver/pb/caps.go` names) this worker accepts in `OpMetadata.caps`.
//!
//! A definition requiring any other cap is rejected with `InvalidArgument`. The daemon
//! advertises this list as `LLBCaps`. Exec, image, merge and diff caps are listed because
//! their ops are part of the worker's op registry; an op whose implementation is missing fails
//! with `Unimplemented` when it runs, which is a clearer error than refusing the cap.

/// Supported cap IDs.
pub(crate) const SUPPORTED: &[&str] = &[
    // sources
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
    "source.http",
    "source.http.checksum",
    "source.http.perm",
    "soruce.http.uidgid",
    "source.git",
    "source.git.keepgitdir",
    "source.git.fullurl",
    "source.git.subdir",
    "source.git.httpauth",
    "source.ocilayout",
    // exec
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
    "exec.validexitcode",
    "exec.cgroup",
    "exec.secretenv",
    // file
    "file.base",
    "file.rm.wildcard",
    "file.copy.includeexcludepatterns",
    "file.rm.nofollowsymlink",
    "file.copy.alwaysreplaceexistingdestpaths",
    "file.symlink.create",
    // metadata
    "constraints",
    "platform",
    "meta.ignorecache",
    "meta.description",
    "meta.exportcache",
    // graph ops
    "mergeop",
    "diffop",
];

pub(crate) fn is_supported(cap: &str) -> bool {
    SUPPORTED.contains(&cap)
}
