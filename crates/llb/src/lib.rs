//! A builder for BuildKit LLB graphs, in the spirit of Go's `client/llb` package.
//!
//! A [`State`] is a filesystem state: [`scratch`], a source ([`local`], [`image`]), or the
//! result of an operation on other states ([`State::file`], [`State::run`], [`merge`],
//! [`diff`]). [`State::marshal`] serializes the graph into a `pb.Definition` whose op digests are
//! sha256 of the exact op bytes, with op metadata and caps like the Go library writes
//! (`llb.md` §10).
//!
//! ```
//! use llb::MkdirOpts;
//! let st = llb::scratch()
//!     .file(llb::mkdir("/app", 0o755, MkdirOpts::default().parents(true))
//!         .mkfile("/app/hello", 0o644, "hi", Default::default()));
//! let def = st.marshal().unwrap();
//! assert_eq!(def.def.len(), 2); // the file op and the terminal op
//! ```
//!
//! Encoding: prost encodes fields in tag order and `protos` uses sorted maps, which is exactly
//! what Go's gogo marshaller produces, so identical graphs get identical digests in both.

mod definition;
mod exec;
mod file;
mod marshal;
mod source;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

pub use exec::{CacheSharing, ExecState, Mount, NetMode, RunOpts, SecurityMode};
pub use file::{
    copy, mkdir, mkfile, rm, ChownOpt, CopyOpts, CopySource, FileAction, MkdirOpts, MkfileOpts,
    RmOpts, UserOpt,
};
pub use protos::pb;
pub use source::{
    git, http, image, local, normalize_ref, oci_layout, Git, Http, Image, Local, OciLayout,
};

/// Errors while building or marshalling a graph.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A state or op is not valid (e.g. exec without a root mount).
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What is invalid.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The target platform of an op (`pb.Platform`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// `amd64`, `arm64`...
    pub architecture: String,
    /// `v8`... or empty.
    pub variant: String,
}

impl Platform {
    /// The host platform, normalized like containerd's `platforms.Normalize(DefaultSpec())`.
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: String::new(),
        }
    }

    pub(crate) fn to_pb(&self) -> pb::Platform {
        pb::Platform {
            architecture: self.architecture.clone(),
            os: self.os.clone(),
            variant: self.variant.clone(),
            os_version: String::new(),
            os_features: vec![],
        }
    }
}

/// Per-op metadata (`pb.OpMetadata`) set through [`State::custom_name`] and friends.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Meta {
    pub ignore_cache: bool,
    /// Source locations of the op (Go `SourceMap.Location`).
    pub locations: Vec<(Arc<SourceMap>, Vec<pb::Range>)>,
    pub description: BTreeMap<String, String>,
    pub caps: BTreeSet<String>,
    pub progress_group: Option<pb::ProgressGroup>,
}

/// One op of the graph, with its input edges.
#[derive(Debug)]
pub(crate) struct Node {
    /// The op without `inputs` (filled at marshal time from `inputs`).
    pub op: pb::Op,
    pub inputs: Vec<Output>,
    pub meta: Meta,
}

/// An output of a node: `(node, output index)`.
#[derive(Debug, Clone)]
pub(crate) struct Output {
    pub node: Arc<Node>,
    pub index: i64,
}

impl PartialEq for Output {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.node, &other.node) && self.index == other.index
    }
}

/// A source file that ops can point into (Go `llb.SourceMap`): a Dockerfile, with the
/// definition that loaded it. Errors of an op with a location carry the file and the ranges.
#[derive(Debug, PartialEq)]
pub struct SourceMap {
    /// File name as the client named it.
    pub filename: String,
    /// Its content.
    pub data: Vec<u8>,
    /// Language (`Dockerfile`), may be empty.
    pub language: String,
    /// The definition that produced the file, if any.
    pub definition: Option<pb::Definition>,
}

/// A filesystem state plus the process defaults (env, cwd, user) that [`State::run`] uses.
#[derive(Debug, Clone)]
pub struct State {
    pub(crate) output: Option<Output>,
    pub(crate) platform: Platform,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) cwd: String,
    pub(crate) user: String,
}

/// The empty filesystem.
pub fn scratch() -> State {
    State {
        output: None,
        platform: Platform::host(),
        env: vec![],
        cwd: String::new(),
        user: String::new(),
    }
}

impl State {
    pub(crate) fn from_output(output: Output, platform: Platform) -> State {
        State {
            output: Some(output),
            ..scratch()
        }
        .with_platform(platform)
    }

    /// True for [`scratch`].
    pub fn is_scratch(&self) -> bool {
        self.output.is_none()
    }

    /// Sets the platform used by ops built on this state (file, exec).
    pub fn with_platform(mut self, platform: Platform) -> State {
        self.platform = platform;
        self
    }

    /// Adds or replaces an environment variable for [`State::run`].
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> State {
        let key = key.into();
        let value = value.into();
        if let Some(e) = self.env.iter_mut().find(|(k, _)| *k == key) {
            e.1 = value;
        } else {
            self.env.push((key, value));
        }
        self
    }

    /// Sets the working directory for [`State::run`] and relative file paths. A relative `dir`
    /// is joined to the current one.
    pub fn dir(mut self, dir: impl Into<String>) -> State {
        let dir = dir.into();
        self.cwd = if dir.starts_with('/') {
            clean(&dir)
        } else {
            clean(&format!("/{}/{}", self.cwd, dir))
        };
        self
    }

    /// Sets the user for [`State::run`].
    pub fn user(mut self, user: impl Into<String>) -> State {
        self.user = user.into();
        self
    }

    /// The working directory (empty: `/`, not set).
    pub fn get_dir(&self) -> &str {
        &self.cwd
    }

    /// Sets `llb.customname` on the op producing this state (shown in progress).
    pub fn custom_name(self, name: impl Into<String>) -> State {
        let name = name.into();
        self.map_meta(|m| {
            m.description.insert("llb.customname".into(), name);
        })
    }

    /// Adds a free-form description entry to the op producing this state.
    pub fn description(self, key: impl Into<String>, value: impl Into<String>) -> State {
        let (k, v) = (key.into(), value.into());
        self.map_meta(|m| {
            m.description.insert(k, v);
        })
    }

    /// Records that the op producing this state comes from `ranges` of `source`.
    pub fn location(self, source: &Arc<SourceMap>, ranges: Vec<pb::Range>) -> State {
        let source = source.clone();
        self.map_meta(|m| m.locations.push((source, ranges)))
    }

    /// The process environment [`State::run`] uses.
    pub fn get_env(&self) -> &[(String, String)] {
        &self.env
    }

    /// The user [`State::run`] uses.
    pub fn get_user(&self) -> &str {
        &self.user
    }

    /// The platform of ops built on this state.
    pub fn get_platform(&self) -> &Platform {
        &self.platform
    }

    /// This state's filesystem with `other`'s process defaults and platform (Go
    /// `State.WithOutput`).
    pub fn with_output_of(mut self, other: &State) -> State {
        self.output = other.output.clone();
        self
    }

    /// Marks the op producing this state as never cached.
    pub fn ignore_cache(self) -> State {
        self.map_meta(|m| m.ignore_cache = true)
    }

    /// Puts the op producing this state in a progress group.
    pub fn progress_group(
        self,
        id: impl Into<String>,
        name: impl Into<String>,
        weak: bool,
    ) -> State {
        let g = pb::ProgressGroup {
            id: id.into(),
            name: name.into(),
            weak,
        };
        self.map_meta(|m| m.progress_group = Some(g))
    }

    /// Rebuilds the producing node with changed metadata (nodes are immutable and shared).
    /// A node nobody else holds is changed in place (its op can be large: an exec's whole
    /// environment); a shared one is copied.
    fn map_meta(mut self, f: impl FnOnce(&mut Meta)) -> State {
        if let Some(out) = &mut self.output {
            if let Some(node) = Arc::get_mut(&mut out.node) {
                f(&mut node.meta);
                return self;
            }
            let mut meta = out.node.meta.clone();
            f(&mut meta);
            let node = Node {
                op: out.node.op.clone(),
                inputs: out.node.inputs.clone(),
                meta,
            };
            out.node = Arc::new(node);
        }
        self
    }

    /// Applies a chain of file actions to this state (a `FileOp`).
    pub fn file(&self, action: FileAction) -> State {
        file::build(self, action)
    }

    /// Runs a process with this state as the root filesystem (an `ExecOp`).
    pub fn run(&self, opts: RunOpts) -> ExecState {
        exec::build(self, opts)
    }

    /// Serializes the graph ending at this state into a `pb.Definition`. Scratch gives an empty
    /// definition.
    pub fn marshal(&self) -> Result<pb::Definition> {
        marshal::marshal(self)
    }
}

/// Stacks `inputs` (later ones win). Scratch inputs are skipped; one remaining input is returned
/// as is, none gives scratch, like the Go client.
pub fn merge(inputs: &[State]) -> State {
    let real: Vec<&State> = inputs.iter().filter(|s| !s.is_scratch()).collect();
    match real.len() {
        0 => scratch(),
        1 => real[0].clone(),
        _ => {
            let outs: Vec<Output> = real.iter().map(|s| s.output.clone().unwrap()).collect();
            let op = pb::Op {
                op: Some(pb::op::Op::Merge(pb::MergeOp {
                    inputs: (0..outs.len() as i64)
                        .map(|i| pb::MergeInput { input: i })
                        .collect(),
                })),
                constraints: Some(pb::WorkerConstraints::default()),
                ..Default::default()
            };
            let node = Node {
                op,
                inputs: outs,
                meta: Meta {
                    caps: ["mergeop".to_string()].into(),
                    ..Default::default()
                },
            };
            State::from_output(
                Output {
                    node: Arc::new(node),
                    index: 0,
                },
                real[0].platform.clone(),
            )
        }
    }
}

/// The changes that turn `lower` into `upper`. With scratch as `lower` this is `upper` itself,
/// like the Go client.
pub fn diff(lower: &State, upper: &State) -> State {
    if lower.is_scratch() {
        return upper.clone();
    }
    let mut inputs = vec![lower.output.clone().unwrap()];
    let upper_idx = match &upper.output {
        None => -1,
        Some(o) => {
            inputs.push(o.clone());
            1
        }
    };
    let op = pb::Op {
        op: Some(pb::op::Op::Diff(pb::DiffOp {
            lower: Some(pb::LowerDiffInput { input: 0 }),
            upper: Some(pb::UpperDiffInput { input: upper_idx }),
        })),
        constraints: Some(pb::WorkerConstraints::default()),
        ..Default::default()
    };
    let node = Node {
        op,
        inputs,
        meta: Meta {
            caps: ["diffop".to_string()].into(),
            ..Default::default()
        },
    };
    State::from_output(
        Output {
            node: Arc::new(node),
            index: 0,
        },
        lower.platform.clone(),
    )
}

/// Go's `path.Clean` for absolute slash paths.
pub(crate) fn clean(p: &str) -> String {
    let mut parts: Vec<&str> = vec![];
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    let mut out = String::from("/");
    out.push_str(&parts.join("/"));
    if !p.starts_with('/') {
        out.remove(0);
        if out.is_empty() {
            out.push('.');
        }
    }
    out
}

#[cfg(test)]
mod tests;
