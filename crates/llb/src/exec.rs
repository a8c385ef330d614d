//! `ExecOp` builder (Go: `State.Run`).

use std::sync::Arc;

use crate::{pb, Meta, Node, Output, State};

/// `pb.NetMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetMode {
    /// Sandboxed network (default).
    #[default]
    Sandbox,
    /// Host network (needs the `network.host` entitlement).
    Host,
    /// Loopback only.
    None,
}

/// `pb.SecurityMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SecurityMode {
    /// Default sandbox.
    #[default]
    Sandbox,
    /// Privileged (needs `security.insecure`).
    Insecure,
}

/// `pb.CacheSharingOpt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheSharing {
    /// Concurrent use.
    #[default]
    Shared,
    /// A new instance when busy.
    Private,
    /// Wait for the other user.
    Locked,
}

#[derive(Debug, Clone)]
enum MountKind {
    Bind {
        source: State,
        selector: String,
        readonly: bool,
        no_output: bool,
    },
    Cache {
        id: String,
        sharing: CacheSharing,
        source: Option<State>,
        selector: String,
        readonly: bool,
    },
    Tmpfs {
        size: i64,
    },
    Secret {
        id: String,
        uid: u32,
        gid: u32,
        mode: u32,
        optional: bool,
    },
    Ssh {
        id: String,
        uid: u32,
        gid: u32,
        mode: u32,
        optional: bool,
    },
}

/// An extra mount of a process.
#[derive(Debug, Clone)]
pub struct Mount {
    dest: String,
    kind: MountKind,
}

impl Mount {
    /// `source` mounted at `dest`, writable, producing an output.
    pub fn bind(dest: impl Into<String>, source: &State) -> Self {
        Mount {
            dest: dest.into(),
            kind: MountKind::Bind {
                source: source.clone(),
                selector: String::new(),
                readonly: false,
                no_output: false,
            },
        }
    }

    /// Mount only `selector` (a path inside the source).
    pub fn selector(mut self, sel: impl Into<String>) -> Self {
        if let MountKind::Bind { selector, .. } | MountKind::Cache { selector, .. } = &mut self.kind
        {
            *selector = sel.into();
        }
        self
    }

    /// Read-only (no output).
    pub fn readonly(mut self) -> Self {
        if let MountKind::Bind { readonly, .. } | MountKind::Cache { readonly, .. } = &mut self.kind
        {
            *readonly = true;
        }
        self
    }

    /// Seeds a cache mount from `source` when the cache is first created (Go: `AddMount`
    /// with a source state and `AsPersistentCacheDir`).
    pub fn cache_source(mut self, st: &State) -> Self {
        if let MountKind::Cache { source, .. } = &mut self.kind {
            *source = (!st.is_scratch()).then(|| st.clone());
        }
        self
    }

    /// Writable but discarded (no output).
    pub fn no_output(mut self) -> Self {
        if let MountKind::Bind { no_output, .. } = &mut self.kind {
            *no_output = true;
        }
        self
    }

    /// A persistent cache directory `id`.
    pub fn cache(dest: impl Into<String>, id: impl Into<String>, sharing: CacheSharing) -> Self {
        Mount {
            dest: dest.into(),
            kind: MountKind::Cache {
                id: id.into(),
                sharing,
                source: None,
                selector: String::new(),
                readonly: false,
            },
        }
    }

    /// A tmpfs (`size` bytes, 0 = default).
    pub fn tmpfs(dest: impl Into<String>, size: i64) -> Self {
        Mount {
            dest: dest.into(),
            kind: MountKind::Tmpfs { size },
        }
    }

    /// A secret file (mode 0400 root-owned, like the Go client's default).
    pub fn secret(dest: impl Into<String>, id: impl Into<String>, optional: bool) -> Self {
        Mount {
            dest: dest.into(),
            kind: MountKind::Secret {
                id: id.into(),
                uid: 0,
                gid: 0,
                mode: 0o400,
                optional,
            },
        }
    }

    /// Owner and permission bits of a secret file or SSH socket mount (Go `SecretFileOpt`,
    /// `SSHSocketOpt`); ignored for other mounts.
    pub fn file_opt(mut self, owner_uid: u32, owner_gid: u32, file_mode: u32) -> Self {
        if let MountKind::Secret { uid, gid, mode, .. } | MountKind::Ssh { uid, gid, mode, .. } =
            &mut self.kind
        {
            *uid = owner_uid;
            *gid = owner_gid;
            *mode = file_mode;
        }
        self
    }

    /// An SSH agent socket (`dest` empty: `/run/buildkit/ssh_agent.<n>`).
    pub fn ssh(dest: impl Into<String>, id: impl Into<String>, optional: bool) -> Self {
        Mount {
            dest: dest.into(),
            kind: MountKind::Ssh {
                id: id.into(),
                uid: 0,
                gid: 0,
                mode: 0o600,
                optional,
            },
        }
    }
}

/// What to run (Go `RunOption`s).
#[derive(Debug, Clone, Default)]
pub struct RunOpts {
    args: Vec<String>,
    mounts: Vec<Mount>,
    network: NetMode,
    security: SecurityMode,
    readonly_root: bool,
    hostname: String,
    cgroup_parent: String,
    secret_env: Vec<(String, String, bool)>,
    valid_exit_codes: Vec<i32>,
    extra_hosts: Vec<(String, String)>,
    ulimits: Vec<(String, i64, i64)>,
    proxy_env: Option<pb::ProxyEnv>,
}

impl RunOpts {
    /// The argv.
    pub fn args<S: Into<String>>(args: impl IntoIterator<Item = S>) -> Self {
        RunOpts {
            args: args.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    /// `sh -c <script>`.
    pub fn shell(script: impl Into<String>) -> Self {
        RunOpts::args(["/bin/sh".to_string(), "-c".to_string(), script.into()])
    }

    /// Adds a mount.
    pub fn mount(mut self, m: Mount) -> Self {
        self.mounts.push(m);
        self
    }

    /// Network mode.
    pub fn network(mut self, n: NetMode) -> Self {
        self.network = n;
        self
    }

    /// Security mode.
    pub fn security(mut self, s: SecurityMode) -> Self {
        self.security = s;
        self
    }

    /// Read-only root filesystem (no root output).
    pub fn readonly_root(mut self) -> Self {
        self.readonly_root = true;
        self
    }

    /// Hostname.
    pub fn hostname(mut self, h: impl Into<String>) -> Self {
        self.hostname = h.into();
        self
    }

    /// The cgroup the process's cgroup is created under (Go `WithCgroupParent`).
    pub fn cgroup_parent(mut self, p: impl Into<String>) -> Self {
        self.cgroup_parent = p.into();
        self
    }

    /// Exit codes that count as success (Go `ValidExitCodes`; default: only 0).
    pub fn valid_exit_codes(mut self, codes: impl IntoIterator<Item = i32>) -> Self {
        self.valid_exit_codes = codes.into_iter().collect();
        self
    }

    /// An extra `/etc/hosts` entry (Go `AddExtraHost`).
    pub fn extra_host(mut self, host: impl Into<String>, ip: impl Into<String>) -> Self {
        self.extra_hosts.push((host.into(), ip.into()));
        self
    }

    /// A resource limit such as `nofile` (Go `AddUlimit`).
    pub fn ulimit(mut self, name: impl Into<String>, soft: i64, hard: i64) -> Self {
        self.ulimits.push((name.into(), soft, hard));
        self
    }

    /// A proxy variable (`HTTP_PROXY`, `HTTPS_PROXY`, `FTP_PROXY`, `NO_PROXY`, `ALL_PROXY`)
    /// given to the process without being part of the cache key (Go `WithProxy`).
    pub fn proxy_env(mut self, key: &str, value: impl Into<String>) -> Self {
        let p = self.proxy_env.get_or_insert_with(Default::default);
        let v = value.into();
        match key {
            "HTTP_PROXY" => p.http_proxy = v,
            "HTTPS_PROXY" => p.https_proxy = v,
            "FTP_PROXY" => p.ftp_proxy = v,
            "NO_PROXY" => p.no_proxy = v,
            "ALL_PROXY" => p.all_proxy = v,
            _ => {}
        }
        self
    }

    /// Environment variable `name` from secret `id`.
    pub fn secret_env(
        mut self,
        id: impl Into<String>,
        name: impl Into<String>,
        optional: bool,
    ) -> Self {
        self.secret_env.push((id.into(), name.into(), optional));
        self
    }
}

/// The result of [`State::run`]: the root and the outputs of writable mounts.
#[derive(Debug, Clone)]
pub struct ExecState {
    base: State,
    node: Arc<Node>,
    /// `(dest, output index)` of every mount with an output.
    outputs: Vec<(String, i64)>,
}

impl ExecState {
    /// The root filesystem after the run (scratch if the root was read-only).
    pub fn root(&self) -> State {
        self.get_mount("/").unwrap_or_else(|| {
            let mut s = self.base.clone();
            s.output = None;
            s
        })
    }

    /// The state of the writable mount at `dest` after the run.
    pub fn get_mount(&self, dest: &str) -> Option<State> {
        self.outputs.iter().find(|(d, _)| d == dest).map(|(_, i)| {
            let mut s = self.base.clone();
            s.output = Some(Output {
                node: self.node.clone(),
                index: *i,
            });
            s
        })
    }
}

pub(crate) fn build(base: &State, opts: RunOpts) -> ExecState {
    let mut caps: Vec<&str> = vec!["exec.meta.base"];
    let mut inputs: Vec<Output> = vec![];
    let mut add_input = |s: &State| -> i64 {
        match &s.output {
            None => -1,
            Some(o) => {
                if let Some(i) = inputs.iter().position(|x| x == o) {
                    i as i64
                } else {
                    inputs.push(o.clone());
                    (inputs.len() - 1) as i64
                }
            }
        }
    };
    let mut mounts = vec![];
    let mut outputs = vec![];
    let mut next_out = 0i64;
    let mut secrets = vec![];
    let mut sshs = vec![];
    let root = Mount {
        dest: "/".into(),
        kind: MountKind::Bind {
            source: base.clone(),
            selector: String::new(),
            readonly: opts.readonly_root,
            no_output: false,
        },
    };
    for m in std::iter::once(root).chain(opts.mounts) {
        match m.kind {
            MountKind::Bind {
                source,
                selector,
                readonly,
                no_output,
            } => {
                let input = add_input(&source);
                let output = if !no_output && !readonly {
                    next_out += 1;
                    outputs.push((m.dest.clone(), next_out - 1));
                    next_out - 1
                } else {
                    -1
                };
                if !selector.is_empty() {
                    caps.push("exec.mount.selector");
                }
                caps.push("exec.mount.bind");
                mounts.push(pb::Mount {
                    input,
                    selector,
                    dest: m.dest,
                    output,
                    readonly,
                    ..Default::default()
                });
            }
            MountKind::Cache {
                id,
                sharing,
                source,
                selector,
                readonly,
            } => {
                let input = source.as_ref().map(&mut add_input).unwrap_or(-1);
                caps.push("exec.mount.cache");
                caps.push("exec.mount.cache.sharing");
                if !selector.is_empty() {
                    caps.push("exec.mount.selector");
                }
                mounts.push(pb::Mount {
                    input,
                    selector,
                    readonly,
                    dest: m.dest,
                    output: -1,
                    mount_type: pb::MountType::Cache as i32,
                    cache_opt: Some(pb::CacheOpt {
                        id,
                        sharing: match sharing {
                            CacheSharing::Shared => pb::CacheSharingOpt::Shared,
                            CacheSharing::Private => pb::CacheSharingOpt::Private,
                            CacheSharing::Locked => pb::CacheSharingOpt::Locked,
                        } as i32,
                    }),
                    ..Default::default()
                });
            }
            MountKind::Tmpfs { size } => {
                caps.push("exec.mount.tmpfs");
                if size > 0 {
                    caps.push("exec.mount.tmpfs.size");
                }
                mounts.push(pb::Mount {
                    input: -1,
                    dest: m.dest,
                    output: -1,
                    mount_type: pb::MountType::Tmpfs as i32,
                    tmpfs_opt: Some(pb::TmpfsOpt { size }),
                    ..Default::default()
                });
            }
            MountKind::Secret {
                id,
                uid,
                gid,
                mode,
                optional,
            } => secrets.push(pb::Mount {
                dest: m.dest,
                mount_type: pb::MountType::Secret as i32,
                secret_opt: Some(pb::SecretOpt {
                    id,
                    uid,
                    gid,
                    mode,
                    optional,
                }),
                ..Default::default()
            }),
            MountKind::Ssh {
                id,
                uid,
                gid,
                mode,
                optional,
            } => sshs.push((m.dest, id, uid, gid, mode, optional)),
        }
    }
    // Secret and ssh mounts come last, with input/output left at 0 like the Go client.
    if !secrets.is_empty() || !opts.secret_env.is_empty() {
        caps.push("exec.mount.secret");
    }
    if !opts.secret_env.is_empty() {
        caps.push("exec.secretenv");
    }
    mounts.extend(secrets);
    let mut env: Vec<String> = base.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    for (i, (dest, id, uid, gid, mode, optional)) in sshs.into_iter().enumerate() {
        caps.push("exec.mount.ssh");
        let dest = if dest.is_empty() {
            format!("/run/buildkit/ssh_agent.{i}")
        } else {
            dest
        };
        if i == 0 && !base.env.iter().any(|(k, _)| k == "SSH_AUTH_SOCK") {
            env.push(format!("SSH_AUTH_SOCK={dest}"));
        }
        mounts.push(pb::Mount {
            dest,
            mount_type: pb::MountType::Ssh as i32,
            ssh_opt: Some(pb::SshOpt {
                id,
                uid,
                gid,
                mode,
                optional,
            }),
            ..Default::default()
        });
    }
    if opts.network != NetMode::Sandbox {
        caps.push("exec.meta.network");
    }
    if opts.security != SecurityMode::Sandbox {
        caps.push("exec.meta.security");
    }
    if !opts.ulimits.is_empty() {
        caps.push("exec.meta.ulimit");
    }
    if !opts.valid_exit_codes.is_empty() {
        caps.push("exec.validexitcode");
    }
    if opts.proxy_env.is_some() {
        caps.push("exec.meta.proxyenv");
    }
    let exec = pb::ExecOp {
        meta: Some(pb::Meta {
            args: opts.args,
            env,
            // BuildKit's LLB client starts every state at `/` (`NewState(…).Dir("/")`) and
            // always writes the directory; an op digest (and stock's cache key of it) needs the
            // same bytes.
            cwd: if base.cwd.is_empty() {
                "/".to_string()
            } else {
                base.cwd.clone()
            },
            user: base.user.clone(),
            hostname: opts.hostname,
            cgroup_parent: opts.cgroup_parent,
            // As BuildKit's LLB client always sets it (v0.11.6 `client/llb/exec.go`; no cap): the
            // op's digest, and BuildKit's own cache key of it, then match stock's.
            remove_mount_stubs_recursive: true,
            proxy_env: opts.proxy_env,
            valid_exit_codes: opts.valid_exit_codes,
            extra_hosts: opts
                .extra_hosts
                .into_iter()
                .map(|(host, ip)| pb::HostIp { host, ip })
                .collect(),
            ulimit: opts
                .ulimits
                .into_iter()
                .map(|(name, soft, hard)| pb::Ulimit { name, soft, hard })
                .collect(),
        }),
        mounts,
        network: match opts.network {
            NetMode::Sandbox => pb::NetMode::Unset,
            NetMode::Host => pb::NetMode::Host,
            NetMode::None => pb::NetMode::None,
        } as i32,
        security: match opts.security {
            SecurityMode::Sandbox => pb::SecurityMode::Sandbox,
            SecurityMode::Insecure => pb::SecurityMode::Insecure,
        } as i32,
        secretenv: opts
            .secret_env
            .into_iter()
            .map(|(id, name, optional)| pb::SecretEnv { id, name, optional })
            .collect(),
        ..Default::default()
    };
    let op = pb::Op {
        op: Some(pb::op::Op::Exec(exec)),
        platform: Some(base.platform.to_pb()),
        constraints: Some(pb::WorkerConstraints::default()),
        ..Default::default()
    };
    let node = Arc::new(Node {
        op,
        inputs,
        meta: Meta {
            caps: caps.into_iter().map(String::from).collect(),
            ..Default::default()
        },
    });
    ExecState {
        base: base.clone(),
        node,
        outputs,
    }
}
