//! `FileOp` builder (Go: `llb.Mkdir`, `llb.Mkfile`, `llb.Rm`, `llb.Copy`, `State.File`).
//!
//! A [`FileAction`] is a chain of actions, each applied to the result of the previous one; the
//! first applies to the state given to [`State::file`](crate::State::file). A copy source is a
//! state or another action chain on a state (an intermediate result inside the same op).

use crate::marshal::node_state;
use crate::{clean, pb, Meta, Node, Output, State};

/// A user or group: by numeric id or by name (resolved in the base state's `/etc` files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserOpt {
    /// Numeric id.
    ById(u32),
    /// Name.
    ByName(String),
}

/// Ownership for created or copied files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChownOpt {
    /// The user (for a numeric user without group, the group id is the same number).
    pub user: Option<UserOpt>,
    /// The group.
    pub group: Option<UserOpt>,
}

impl ChownOpt {
    /// `uid:gid` by number.
    pub fn ids(uid: u32, gid: u32) -> Self {
        ChownOpt {
            user: Some(UserOpt::ById(uid)),
            group: Some(UserOpt::ById(gid)),
        }
    }

    /// `user[:group]` by name.
    pub fn names(user: impl Into<String>, group: Option<String>) -> Self {
        ChownOpt {
            user: Some(UserOpt::ByName(user.into())),
            group: group.map(UserOpt::ByName),
        }
    }

    fn to_pb(&self, base: i64) -> pb::ChownOpt {
        let conv = |u: &UserOpt| pb::UserOpt {
            user: Some(match u {
                UserOpt::ById(id) => pb::user_opt::User::ById(*id),
                UserOpt::ByName(n) => pb::user_opt::User::ByName(pb::NamedUserOpt {
                    name: n.clone(),
                    input: base,
                }),
            }),
        };
        pb::ChownOpt {
            user: self.user.as_ref().map(conv),
            group: self.group.as_ref().map(conv),
        }
    }
}

/// Options of a mkdir action.
#[derive(Debug, Clone, Default)]
pub struct MkdirOpts {
    parents: bool,
    owner: Option<ChownOpt>,
    created: Option<i64>,
}

impl MkdirOpts {
    /// Create missing parents.
    pub fn parents(mut self, p: bool) -> Self {
        self.parents = p;
        self
    }
    /// Owner of the created directories.
    pub fn owner(mut self, o: ChownOpt) -> Self {
        self.owner = Some(o);
        self
    }
    /// Timestamp (ns since the epoch) of the created directories.
    pub fn created(mut self, unix_nanos: i64) -> Self {
        self.created = Some(unix_nanos);
        self
    }
}

/// Options of a mkfile action.
#[derive(Debug, Clone, Default)]
pub struct MkfileOpts {
    owner: Option<ChownOpt>,
    created: Option<i64>,
}

impl MkfileOpts {
    /// Owner of the file.
    pub fn owner(mut self, o: ChownOpt) -> Self {
        self.owner = Some(o);
        self
    }
    /// Timestamp (ns since the epoch).
    pub fn created(mut self, unix_nanos: i64) -> Self {
        self.created = Some(unix_nanos);
        self
    }
}

/// Options of an rm action.
#[derive(Debug, Clone, Default)]
pub struct RmOpts {
    allow_not_found: bool,
    allow_wildcard: bool,
}

impl RmOpts {
    /// A missing path is not an error.
    pub fn allow_not_found(mut self, v: bool) -> Self {
        self.allow_not_found = v;
        self
    }
    /// The path may contain `*`, `?`, `[...]`.
    pub fn allow_wildcard(mut self, v: bool) -> Self {
        self.allow_wildcard = v;
        self
    }
}

/// Options of a copy action (Go `CopyInfo`).
#[derive(Debug, Clone, Default)]
pub struct CopyOpts {
    owner: Option<ChownOpt>,
    mode: Option<u32>,
    follow_symlinks: bool,
    dir_contents_only: bool,
    attempt_unpack: bool,
    create_dest_path: bool,
    allow_wildcard: bool,
    allow_empty_wildcard: bool,
    created: Option<i64>,
    include: Vec<String>,
    exclude: Vec<String>,
}

impl CopyOpts {
    /// Owner of copied files (default: keep the source's).
    pub fn owner(mut self, o: ChownOpt) -> Self {
        self.owner = Some(o);
        self
    }
    /// Permission bits for every copied entry.
    pub fn mode(mut self, m: u32) -> Self {
        self.mode = Some(m);
        self
    }
    /// Resolve a symlink at the source path.
    pub fn follow_symlinks(mut self, v: bool) -> Self {
        self.follow_symlinks = v;
        self
    }
    /// Copy a directory's contents rather than the directory.
    pub fn dir_contents_only(mut self, v: bool) -> Self {
        self.dir_contents_only = v;
        self
    }
    /// Extract a tar archive source instead of copying it.
    pub fn attempt_unpack(mut self, v: bool) -> Self {
        self.attempt_unpack = v;
        self
    }
    /// Create missing parents of the destination.
    pub fn create_dest_path(mut self, v: bool) -> Self {
        self.create_dest_path = v;
        self
    }
    /// The source may contain wildcards.
    pub fn allow_wildcard(mut self, v: bool) -> Self {
        self.allow_wildcard = v;
        self
    }
    /// A wildcard matching nothing is not an error.
    pub fn allow_empty_wildcard(mut self, v: bool) -> Self {
        self.allow_empty_wildcard = v;
        self
    }
    /// Timestamp (ns since the epoch) of copied entries.
    pub fn created(mut self, unix_nanos: i64) -> Self {
        self.created = Some(unix_nanos);
        self
    }
    /// Only paths matching these patterns (dockerignore syntax).
    pub fn include<S: Into<String>>(mut self, p: impl IntoIterator<Item = S>) -> Self {
        self.include = p.into_iter().map(Into::into).collect();
        self
    }
    /// Not paths matching these patterns.
    pub fn exclude<S: Into<String>>(mut self, p: impl IntoIterator<Item = S>) -> Self {
        self.exclude = p.into_iter().map(Into::into).collect();
        self
    }
}

/// Where a copy reads from.
#[derive(Debug, Clone)]
pub enum CopySource {
    /// A state (an op input).
    State(State),
    /// An action chain applied to a state, inside the same file op.
    Action(State, Box<FileAction>),
}

impl From<State> for CopySource {
    fn from(s: State) -> Self {
        CopySource::State(s)
    }
}

impl From<&State> for CopySource {
    fn from(s: &State) -> Self {
        CopySource::State(s.clone())
    }
}

#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // few, short-lived values
enum Spec {
    Mkdir(String, u32, MkdirOpts),
    Mkfile(String, u32, Vec<u8>, MkfileOpts),
    Rm(String, RmOpts),
    Copy(CopySource, String, String, CopyOpts),
}

/// A chain of file actions.
#[derive(Debug, Clone)]
pub struct FileAction {
    chain: Vec<Spec>,
}

/// Creates a directory (Go `llb.Mkdir`).
pub fn mkdir(path: impl Into<String>, mode: u32, opts: MkdirOpts) -> FileAction {
    FileAction {
        chain: vec![Spec::Mkdir(path.into(), mode, opts)],
    }
}

/// Writes a file (Go `llb.Mkfile`).
pub fn mkfile(
    path: impl Into<String>,
    mode: u32,
    data: impl Into<Vec<u8>>,
    opts: MkfileOpts,
) -> FileAction {
    FileAction {
        chain: vec![Spec::Mkfile(path.into(), mode, data.into(), opts)],
    }
}

/// Removes a path, recursively (Go `llb.Rm`).
pub fn rm(path: impl Into<String>, opts: RmOpts) -> FileAction {
    FileAction {
        chain: vec![Spec::Rm(path.into(), opts)],
    }
}

/// Copies `src` of `from` to `dest` (Go `llb.Copy`).
pub fn copy(
    from: impl Into<CopySource>,
    src: impl Into<String>,
    dest: impl Into<String>,
    opts: CopyOpts,
) -> FileAction {
    FileAction {
        chain: vec![Spec::Copy(from.into(), src.into(), dest.into(), opts)],
    }
}

impl FileAction {
    /// Then creates a directory.
    pub fn mkdir(mut self, path: impl Into<String>, mode: u32, opts: MkdirOpts) -> Self {
        self.chain.push(Spec::Mkdir(path.into(), mode, opts));
        self
    }

    /// Then writes a file.
    pub fn mkfile(
        mut self,
        path: impl Into<String>,
        mode: u32,
        data: impl Into<Vec<u8>>,
        opts: MkfileOpts,
    ) -> Self {
        self.chain
            .push(Spec::Mkfile(path.into(), mode, data.into(), opts));
        self
    }

    /// Then removes a path.
    pub fn rm(mut self, path: impl Into<String>, opts: RmOpts) -> Self {
        self.chain.push(Spec::Rm(path.into(), opts));
        self
    }

    /// Then copies.
    pub fn copy(
        mut self,
        from: impl Into<CopySource>,
        src: impl Into<String>,
        dest: impl Into<String>,
        opts: CopyOpts,
    ) -> Self {
        self.chain
            .push(Spec::Copy(from.into(), src.into(), dest.into(), opts));
        self
    }
}

/// An index that may be relative to the final input count (action results).
#[derive(Clone, Copy)]
enum Idx {
    Abs(i64),
    Action(usize),
}

struct Flat {
    input: Idx,
    secondary: Idx,
    base: i64,
    cwd: String,
    src_cwd: String,
    spec: Spec,
}

struct Builder {
    inputs: Vec<Output>,
    actions: Vec<Flat>,
    patterns: bool,
}

impl Builder {
    fn add_input(&mut self, st: &State) -> i64 {
        let Some(o) = &st.output else { return -1 };
        if let Some(i) = self.inputs.iter().position(|x| x == o) {
            return i as i64;
        }
        self.inputs.push(o.clone());
        (self.inputs.len() - 1) as i64
    }

    /// Flattens `chain` applied to `state`; returns the index (in `actions`) of its last action.
    fn add_chain(&mut self, state: &State, chain: &[Spec]) -> usize {
        let base = self.add_input(state);
        let mut prev: Option<usize> = None;
        for spec in chain {
            let input = match prev {
                None => Idx::Abs(base),
                Some(p) => Idx::Action(p),
            };
            let (secondary, src_cwd) = match spec {
                Spec::Copy(src, _, _, opts) => {
                    if !opts.include.is_empty() || !opts.exclude.is_empty() {
                        self.patterns = true;
                    }
                    match src {
                        CopySource::State(s) => (Idx::Abs(self.add_input(s)), s.cwd.clone()),
                        CopySource::Action(s, fa) => {
                            let t = self.add_chain(s, &fa.chain);
                            (Idx::Action(t), s.cwd.clone())
                        }
                    }
                }
                _ => (Idx::Abs(-1), String::new()),
            };
            self.actions.push(Flat {
                input,
                secondary,
                base,
                cwd: state.cwd.clone(),
                src_cwd,
                spec: spec.clone(),
            });
            prev = Some(self.actions.len() - 1);
        }
        prev.expect("non-empty chain")
    }
}

fn time(t: Option<i64>) -> i64 {
    t.unwrap_or(-1)
}

/// Go `normalizePath`: relative paths join the state's dir; `keep_slash` keeps a trailing `/`
/// or `/.`.
fn normalize(parent: &str, p: &str, keep_slash: bool) -> String {
    let mut out = if p.starts_with('/') {
        clean(p)
    } else {
        clean(&format!("/{parent}/{p}"))
    };
    if keep_slash {
        if p.ends_with('/') && !out.ends_with('/') {
            out.push('/');
        } else if p.ends_with("/.") {
            if out != "/" {
                out.push('/');
            }
            out.push('.');
        }
    }
    out
}

pub(crate) fn build(state: &State, action: FileAction) -> State {
    let mut b = Builder {
        inputs: vec![],
        actions: vec![],
        patterns: false,
    };
    b.add_chain(state, &action.chain);
    let n_in = b.inputs.len() as i64;
    let resolve = |i: Idx| match i {
        Idx::Abs(x) => x,
        Idx::Action(k) => n_in + k as i64,
    };
    let last = b.actions.len() - 1;
    let mut actions = Vec::with_capacity(b.actions.len());
    for (k, f) in b.actions.iter().enumerate() {
        use pb::file_action::Action;
        let action = match &f.spec {
            Spec::Mkdir(p, mode, o) => Action::Mkdir(pb::FileActionMkDir {
                path: normalize(&f.cwd, p, false),
                mode: (mode & 0o777) as i32,
                make_parents: o.parents,
                owner: o.owner.as_ref().map(|c| c.to_pb(f.base)),
                timestamp: time(o.created),
            }),
            Spec::Mkfile(p, mode, data, o) => Action::Mkfile(pb::FileActionMkFile {
                path: normalize(&f.cwd, p, false),
                mode: (mode & 0o777) as i32,
                data: data.clone().into(),
                owner: o.owner.as_ref().map(|c| c.to_pb(f.base)),
                timestamp: time(o.created),
            }),
            Spec::Rm(p, o) => Action::Rm(pb::FileActionRm {
                path: normalize(&f.cwd, p, false),
                allow_not_found: o.allow_not_found,
                allow_wildcard: o.allow_wildcard,
            }),
            Spec::Copy(_, src, dest, o) => Action::Copy(pb::FileActionCopy {
                src: if src.starts_with('/') {
                    clean(src)
                } else {
                    clean(&format!("/{}/{}", f.src_cwd, src))
                },
                dest: normalize(&f.cwd, dest, true),
                owner: o.owner.as_ref().map(|c| c.to_pb(f.base)),
                mode: o.mode.map(|m| m as i32).unwrap_or(-1),
                follow_symlink: o.follow_symlinks,
                dir_copy_contents: o.dir_contents_only,
                attempt_unpack_docker_compatibility: o.attempt_unpack,
                create_dest_path: o.create_dest_path,
                allow_wildcard: o.allow_wildcard,
                allow_empty_wildcard: o.allow_empty_wildcard,
                timestamp: time(o.created),
                include_patterns: o.include.clone(),
                exclude_patterns: o.exclude.clone(),
                ..Default::default()
            }),
        };
        actions.push(pb::FileAction {
            input: resolve(f.input),
            secondary_input: resolve(f.secondary),
            output: if k == last { 0 } else { -1 },
            action: Some(action),
        });
    }
    let mut caps = vec!["file.base".to_string()];
    if b.patterns {
        caps.push("file.copy.includeexcludepatterns".into());
    }
    let op = pb::Op {
        op: Some(pb::op::Op::File(pb::FileOp { actions })),
        platform: Some(state.platform.to_pb()),
        constraints: Some(pb::WorkerConstraints::default()),
        ..Default::default()
    };
    let node = Node {
        op,
        inputs: b.inputs,
        meta: Meta {
            caps: caps.into_iter().collect(),
            ..Default::default()
        },
    };
    node_state(state, node, 0)
}
