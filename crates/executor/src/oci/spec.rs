//! Generation of the OCI runtime spec (`config.json`) for one build process.
//!
//! Follows BuildKit's `executor/oci/spec.go`, `spec_unix.go` and `mounts.go`, which start from
//! containerd's default Unix spec and adjust it
//! (<https://github.com/moby/buildkit/blob/v0.11.6/executor/oci/spec.go>):
//!
//! * mounts: `/proc`, `/dev` (tmpfs), `/dev/pts`, `/dev/shm`, `/dev/mqueue`, `/sys` (ro),
//!   `/sys/fs/cgroup` (cgroup, ro); containerd's `/run` tmpfs is left out (BuildKit issue 429);
//!   then the read-only binds of `/etc/resolv.conf` and `/etc/hosts`, then the caller's mounts.
//!   A later mount with an already used destination replaces the earlier one in place
//!   (`dedupMounts`).
//! * namespaces: pid, ipc, uts, mount, plus network unless the host's is shared. No cgroup
//!   namespace: the machine runs cgroup v1 with cgroupfs, where runc's default is none.
//! * Docker's default capability set in the bounding, effective and permitted sets;
//!   `noNewPrivileges` false (`WithNewPrivileges`); masked and read-only `/proc`/`/sys` paths;
//!   device cgroup denies everything but runc's default devices.
//! * rlimits only when the caller gives ulimits (BuildKit drops containerd's `nofile` default so
//!   the daemon's limit is inherited).
//! * cgroups path `/<parent>/buildkit/<id>`, or `<slice>:<id>`-style for a systemd parent
//!   ending in `:`; default parent none, giving `/buildkit/<id>` (containerd namespaces the
//!   default path by `buildkit`).
//! * insecure mode: every capability the daemon has in all five sets, no masked/read-only
//!   paths, all devices allowed, writable `/sys` and cgroupfs, and the extra device nodes of
//!   BuildKit's `WithInsecureSpec`.
//!
//! Deviation: no seccomp profile yet (BuildKit applies Docker's default profile when seccomp is
//! available). Until one is added, the sandbox relies on capabilities, namespaces, masked paths
//! and the device cgroup only.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxDevice, LinuxDeviceBuilder,
    LinuxDeviceCgroup, LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxResourcesBuilder, Mount as OciMount, MountBuilder, PosixRlimit,
    PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder,
    UserBuilder,
};

use super::user::ExecUser;
use crate::error::Error;
use crate::types::{NetMode, SecurityMode, Ulimit};

/// Docker's / containerd's default capability set.
pub(crate) const DEFAULT_CAPS: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

const MASKED_PATHS: [&str; 10] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
];

const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Destinations of the default mounts; a caller mount below one of them is nested in it.
pub(crate) const DEFAULT_MOUNT_DESTS: [&str; 3] = ["/proc", "/dev", "/sys"];

/// A mount in runtime-spec terms (destination already resolved inside the rootfs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SpecMount {
    pub dest: PathBuf,
    pub typ: String,
    pub source: PathBuf,
    pub options: Vec<String>,
}

impl SpecMount {
    pub(crate) fn new(
        dest: impl Into<PathBuf>,
        typ: &str,
        source: impl Into<PathBuf>,
        options: &[&str],
    ) -> Self {
        Self {
            dest: dest.into(),
            typ: typ.to_owned(),
            source: source.into(),
            options: options.iter().map(|s| (*s).to_owned()).collect(),
        }
    }
}

/// Everything the spec is generated from; prepared by the executor.
#[derive(Clone, Debug)]
pub(crate) struct SpecInput {
    pub rootfs: PathBuf,
    pub readonly_rootfs: bool,
    pub args: Vec<String>,
    /// Run on a terminal (`process.terminal`).
    pub terminal: bool,
    /// Final environment (default PATH already added).
    pub env: Vec<String>,
    pub cwd: PathBuf,
    pub user: ExecUser,
    pub hostname: String,
    pub network: NetMode,
    pub security: SecurityMode,
    /// resolv.conf, hosts and caller mounts, in application order.
    pub mounts: Vec<SpecMount>,
    pub cgroups_path: String,
    pub ulimits: Vec<Ulimit>,
    /// Capabilities granted in insecure mode (the daemon's bounding set).
    pub insecure_caps: Vec<Capability>,
    /// Extra device nodes in insecure mode.
    pub insecure_devices: Vec<LinuxDevice>,
}

fn spec_err(e: impl std::fmt::Display) -> Error {
    Error::Spec {
        reason: e.to_string(),
    }
}

/// The default mounts for `security`.
pub(crate) fn default_mounts(security: SecurityMode) -> Vec<SpecMount> {
    let insecure = security == SecurityMode::Insecure;
    let sys_opts: &[&str] = if insecure {
        &["nosuid", "noexec", "nodev"]
    } else {
        &["nosuid", "noexec", "nodev", "ro"]
    };
    vec![
        SpecMount::new("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        SpecMount::new(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        SpecMount::new(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        SpecMount::new(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        SpecMount::new(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        SpecMount::new("/sys", "sysfs", "sysfs", sys_opts),
        SpecMount::new("/sys/fs/cgroup", "cgroup", "cgroup", sys_opts),
    ]
}

/// Options of the read-only `/etc/hosts` and `/etc/resolv.conf` binds.
pub(crate) const RO_FILE_BIND: [&str; 5] = ["nosuid", "noexec", "nodev", "rbind", "ro"];

/// Keeps the first position of each destination, with the last mount given for it.
pub(crate) fn dedup_mounts(mounts: Vec<SpecMount>) -> Vec<SpecMount> {
    let mut out: Vec<SpecMount> = Vec::with_capacity(mounts.len());
    for m in mounts {
        match out.iter_mut().find(|o| o.dest == m.dest) {
            Some(slot) => *slot = m,
            None => out.push(m),
        }
    }
    out
}

/// cgroups path for container `id` under `parent` (empty: none).
pub(crate) fn cgroups_path(parent: &str, id: &str) -> String {
    if parent.is_empty() {
        format!("/buildkit/{id}")
    } else if parent.contains(".slice") && parent.ends_with(':') {
        format!("{parent}{id}")
    } else {
        Path::new("/")
            .join(parent.trim_start_matches('/'))
            .join("buildkit")
            .join(id)
            .to_string_lossy()
            .into_owned()
    }
}

/// Parses LLB ulimits into runtime-spec rlimits.
pub(crate) fn rlimits(ulimits: &[Ulimit]) -> Result<Vec<PosixRlimit>, Error> {
    ulimits
        .iter()
        .map(|u| {
            let name = format!("RLIMIT_{}", u.name.to_ascii_uppercase());
            let typ: PosixRlimitType = serde_json::from_value(serde_json::Value::String(name))
                .map_err(|_| crate::error::invalid(format!("unknown ulimit {:?}", u.name)))?;
            if u.soft > u.hard {
                return Err(crate::error::invalid(format!(
                    "ulimit {:?}: soft limit {} exceeds hard limit {}",
                    u.name, u.soft, u.hard
                )));
            }
            PosixRlimitBuilder::default()
                .typ(typ)
                .soft(u.soft)
                .hard(u.hard)
                .build()
                .map_err(spec_err)
        })
        .collect()
}

/// Capabilities of this process' bounding set (the most insecure mode can grant), from the
/// `CapBnd` mask in `/proc/self/status` content.
pub(crate) fn caps_from_mask(mask: u64) -> Vec<Capability> {
    // Capability numbers from <linux/capability.h>.
    const BY_BIT: [Capability; 41] = [
        Capability::Chown,
        Capability::DacOverride,
        Capability::DacReadSearch,
        Capability::Fowner,
        Capability::Fsetid,
        Capability::Kill,
        Capability::Setgid,
        Capability::Setuid,
        Capability::Setpcap,
        Capability::LinuxImmutable,
        Capability::NetBindService,
        Capability::NetBroadcast,
        Capability::NetAdmin,
        Capability::NetRaw,
        Capability::IpcLock,
        Capability::IpcOwner,
        Capability::SysModule,
        Capability::SysRawio,
        Capability::SysChroot,
        Capability::SysPtrace,
        Capability::SysPacct,
        Capability::SysAdmin,
        Capability::SysBoot,
        Capability::SysNice,
        Capability::SysResource,
        Capability::SysTime,
        Capability::SysTtyConfig,
        Capability::Mknod,
        Capability::Lease,
        Capability::AuditWrite,
        Capability::AuditControl,
        Capability::Setfcap,
        Capability::MacOverride,
        Capability::MacAdmin,
        Capability::Syslog,
        Capability::WakeAlarm,
        Capability::BlockSuspend,
        Capability::AuditRead,
        Capability::Perfmon,
        Capability::Bpf,
        Capability::CheckpointRestore,
    ];
    BY_BIT
        .iter()
        .enumerate()
        .filter(|(bit, _)| mask & (1u64 << bit) != 0)
        .map(|(_, c)| *c)
        .collect()
}

/// Parses the `CapBnd:` line of `/proc/self/status`.
pub(crate) fn cap_bnd_mask(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// Device nodes BuildKit adds in insecure mode, plus `loopN` nodes for every loop device on
/// the host and eight more.
pub(crate) fn insecure_devices(host_loop_max: Option<i64>) -> Result<Vec<LinuxDevice>, Error> {
    let dev = |path: String, typ, major, minor| {
        LinuxDeviceBuilder::default()
            .path(path)
            .typ(typ)
            .major(major)
            .minor(minor)
            .build()
            .map_err(spec_err)
    };
    let mut out = vec![
        dev("/dev/kmsg".into(), LinuxDeviceType::C, 1, 11)?,
        dev("/dev/cuse".into(), LinuxDeviceType::C, 10, 203)?,
        dev("/dev/fuse".into(), LinuxDeviceType::C, 10, 229)?,
        dev("/dev/kvm".into(), LinuxDeviceType::C, 10, 232)?,
        dev("/dev/net/tun".into(), LinuxDeviceType::C, 10, 200)?,
        dev("/dev/loop-control".into(), LinuxDeviceType::C, 10, 237)?,
    ];
    let last = host_loop_max.map_or(7, |m| m + 8);
    for i in 0..=last {
        out.push(dev(format!("/dev/loop{i}"), LinuxDeviceType::B, 7, i)?);
    }
    Ok(out)
}

/// Builds the runtime spec.
pub(crate) fn generate(input: &SpecInput) -> Result<Spec, Error> {
    let insecure = input.security == SecurityMode::Insecure;

    let mut all_mounts = default_mounts(input.security);
    all_mounts.extend(input.mounts.iter().cloned());
    let mounts: Vec<OciMount> = dedup_mounts(all_mounts)
        .into_iter()
        .map(|m| {
            MountBuilder::default()
                .destination(m.dest)
                .typ(m.typ)
                .source(m.source)
                .options(m.options)
                .build()
                .map_err(spec_err)
        })
        .collect::<Result<_, _>>()?;

    let mut caps: HashSet<Capability> = DEFAULT_CAPS.into_iter().collect();
    let mut caps_builder = LinuxCapabilitiesBuilder::default();
    if insecure {
        caps.extend(input.insecure_caps.iter().copied());
        caps_builder = caps_builder.inheritable(caps.clone()).ambient(caps.clone());
    } else {
        caps_builder = caps_builder
            .inheritable(HashSet::new())
            .ambient(HashSet::new());
    }
    let capabilities = caps_builder
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .build()
        .map_err(spec_err)?;

    let user = UserBuilder::default()
        .uid(input.user.uid)
        .gid(input.user.gid)
        .additional_gids(input.user.additional_gids.clone())
        .build()
        .map_err(spec_err)?;

    let mut process = ProcessBuilder::default()
        .terminal(input.terminal)
        .user(user)
        .args(input.args.clone())
        .env(input.env.clone())
        .cwd(input.cwd.clone())
        .capabilities(capabilities)
        .no_new_privileges(false)
        .build()
        .map_err(spec_err)?;
    let rl = rlimits(&input.ulimits)?;
    process.set_rlimits(if rl.is_empty() { None } else { Some(rl) });

    let mut ns_types = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ];
    if input.network == NetMode::None {
        ns_types.push(LinuxNamespaceType::Network);
    }
    let namespaces = ns_types
        .into_iter()
        .map(|t| {
            LinuxNamespaceBuilder::default()
                .typ(t)
                .build()
                .map_err(spec_err)
        })
        .collect::<Result<Vec<_>, _>>()?;

    let device_rules: Vec<LinuxDeviceCgroup> = if insecure {
        vec![
            LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .typ(LinuxDeviceType::C)
                .access("rwm")
                .build()
                .map_err(spec_err)?,
            LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .typ(LinuxDeviceType::B)
                .access("rwm")
                .build()
                .map_err(spec_err)?,
        ]
    } else {
        vec![LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()
            .map_err(spec_err)?]
    };
    let resources = LinuxResourcesBuilder::default()
        .devices(device_rules)
        .build()
        .map_err(spec_err)?;

    let (masked, readonly): (Vec<String>, Vec<String>) = if insecure {
        (Vec::new(), Vec::new())
    } else {
        (
            MASKED_PATHS.iter().map(|s| (*s).to_owned()).collect(),
            READONLY_PATHS.iter().map(|s| (*s).to_owned()).collect(),
        )
    };
    let linux = LinuxBuilder::default()
        .cgroups_path(PathBuf::from(&input.cgroups_path))
        .namespaces(namespaces)
        .resources(resources)
        .masked_paths(masked)
        .readonly_paths(readonly)
        .devices(if insecure {
            input.insecure_devices.clone()
        } else {
            Vec::new()
        })
        .build()
        .map_err(spec_err)?;

    let root = RootBuilder::default()
        .path(input.rootfs.clone())
        .readonly(input.readonly_rootfs)
        .build()
        .map_err(spec_err)?;

    let mut spec = SpecBuilder::default()
        .version("1.0.2-dev")
        .root(root)
        .process(process)
        .hostname(input.hostname.clone())
        .mounts(mounts)
        .linux(linux)
        .build()
        .map_err(spec_err)?;
    spec.set_annotations(None);
    spec.set_domainname(None);
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> SpecInput {
        SpecInput {
            terminal: false,
            rootfs: "/r".into(),
            readonly_rootfs: false,
            args: vec!["sh".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            user: ExecUser {
                uid: 1,
                gid: 2,
                additional_gids: vec![2, 3],
            },
            hostname: "h".into(),
            network: NetMode::Sandbox,
            security: SecurityMode::Sandbox,
            mounts: vec![
                SpecMount::new("/etc/hosts", "bind", "/b/hosts", &RO_FILE_BIND),
                SpecMount::new("/dev/shm", "tmpfs", "tmpfs", &["nosuid", "size=1"]),
                SpecMount::new("/data", "bind", "/src", &["rbind"]),
            ],
            cgroups_path: "/buildkit/c1".into(),
            ulimits: vec![],
            insecure_caps: caps_from_mask(u64::MAX),
            insecure_devices: insecure_devices(None).unwrap(),
        }
    }

    fn json(i: &SpecInput) -> serde_json::Value {
        serde_json::to_value(generate(i).unwrap()).unwrap()
    }

    fn namespaces(v: &serde_json::Value) -> Vec<String> {
        v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn namespaces_by_network_mode() {
        for (mode, has_net) in [
            (NetMode::None, true),
            (NetMode::Host, false),
            (NetMode::Sandbox, false),
        ] {
            let mut i = input();
            i.network = mode;
            let ns = namespaces(&json(&i));
            assert_eq!(
                ns.contains(&"network".to_owned()),
                has_net,
                "{mode:?}: {ns:?}"
            );
            for t in ["pid", "ipc", "uts", "mount"] {
                assert!(ns.contains(&t.to_owned()), "{mode:?} lacks {t}");
            }
        }
    }

    #[test]
    fn mounts_defaults_then_caller_with_dedup() {
        let v = json(&input());
        let dests: Vec<&str> = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(
            dests,
            [
                "/proc",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/dev/mqueue",
                "/sys",
                "/sys/fs/cgroup",
                "/etc/hosts",
                "/data"
            ]
        );
        // The caller's /dev/shm replaced the default in place.
        assert_eq!(v["mounts"][3]["options"][1], "size=1");
        assert!(!dests.contains(&"/run"));
    }

    #[test]
    fn sandbox_vs_insecure() {
        let v = json(&input());
        let bounding = v["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert_eq!(bounding.len(), DEFAULT_CAPS.len());
        assert!(!bounding.iter().any(|c| c == "CAP_SYS_ADMIN"));
        assert_eq!(
            v["process"]["capabilities"]["ambient"]
                .as_array()
                .unwrap()
                .len(),
            0
        );
        assert_eq!(
            v["linux"]["maskedPaths"].as_array().unwrap().len(),
            MASKED_PATHS.len()
        );
        assert_eq!(v["linux"]["resources"]["devices"][0]["allow"], false);
        assert!(v["linux"]
            .get("devices")
            .is_none_or(|d| d.as_array().unwrap().is_empty()));
        assert_eq!(
            v["mounts"][5]["options"]
                .as_array()
                .unwrap()
                .last()
                .unwrap(),
            "ro"
        );
        assert_eq!(v["process"]["noNewPrivileges"], false);
        assert!(v["process"].get("rlimits").is_none());
        assert!(v["linux"].get("seccomp").is_none());

        let mut i = input();
        i.security = SecurityMode::Insecure;
        let v = json(&i);
        let bounding = v["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert_eq!(bounding.len(), 41);
        assert!(bounding.iter().any(|c| c == "CAP_SYS_ADMIN"));
        assert_eq!(
            v["process"]["capabilities"]["ambient"]
                .as_array()
                .unwrap()
                .len(),
            41
        );
        assert_eq!(v["linux"]["maskedPaths"].as_array().unwrap().len(), 0);
        assert_eq!(v["linux"]["resources"]["devices"][0]["allow"], true);
        let devs = v["linux"]["devices"].as_array().unwrap();
        assert!(devs.iter().any(|d| d["path"] == "/dev/fuse"));
        assert!(devs.iter().any(|d| d["path"] == "/dev/loop7"));
        assert!(!v["mounts"][5]["options"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o == "ro"));
    }

    #[test]
    fn process_fields() {
        let mut i = input();
        i.readonly_rootfs = true;
        i.ulimits = vec![Ulimit {
            name: "nofile".into(),
            soft: 100,
            hard: 200,
        }];
        let v = json(&i);
        assert_eq!(v["process"]["user"]["uid"], 1);
        assert_eq!(v["process"]["user"]["gid"], 2);
        assert_eq!(
            v["process"]["user"]["additionalGids"],
            serde_json::json!([2, 3])
        );
        assert_eq!(v["process"]["rlimits"][0]["type"], "RLIMIT_NOFILE");
        assert_eq!(v["process"]["rlimits"][0]["soft"], 100);
        assert_eq!(v["root"]["readonly"], true);
        assert_eq!(v["root"]["path"], "/r");
        assert_eq!(v["hostname"], "h");
        assert_eq!(v["linux"]["cgroupsPath"], "/buildkit/c1");
        assert_eq!(v["process"]["terminal"], false);
    }

    #[test]
    fn bad_ulimits_rejected() {
        for (name, soft, hard) in [("nosuchlimit", 1, 1), ("nofile", 5, 1)] {
            let r = rlimits(&[Ulimit {
                name: name.into(),
                soft,
                hard,
            }]);
            assert!(matches!(r, Err(Error::InvalidSpec { .. })), "{name}");
        }
    }

    #[test]
    fn cgroups_path_table() {
        for (parent, want) in [
            ("", "/buildkit/x"),
            ("berth", "/berth/buildkit/x"),
            ("/a/b", "/a/b/buildkit/x"),
            ("system.slice:berth:", "system.slice:berth:x"),
        ] {
            assert_eq!(cgroups_path(parent, "x"), want, "{parent:?}");
        }
    }

    #[test]
    fn cap_mask_parsing() {
        let status = "Name:\tx\nCapBnd:\t000001fffeffffff\nCapAmb:\t0\n";
        let mask = cap_bnd_mask(status).unwrap();
        let caps = caps_from_mask(mask);
        assert_eq!(caps.len(), 40);
        assert!(!caps.contains(&Capability::SysResource));
        assert!(caps.contains(&Capability::CheckpointRestore));
    }
}
