//! The `dockerfile.v0` frontend as a gateway client (`frontend/dockerfile/builder/build.go` at
//! v0.11.6).
//!
//! [`build`] talks to the daemon only through a [`Bridge`] (solve a definition or another
//! frontend, read a file of a result, resolve an image config, warn): it loads the Dockerfile
//! and the `.dockerignore` files from the client's `dockerfile` and `context` locals, forwards
//! to `gateway.v0` when a `# syntax=` directive or `BUILDKIT_SYNTAX` names another frontend
//! image, else converts the Dockerfile ([`convert`]) and solves the result. The result carries
//! `containerimage.config` (the image config, Go JSON) and `refs.platforms`.
//!
//! Errors that concern Dockerfile lines carry them ([`Located`]); [`build`] attaches the
//! Dockerfile itself so that the daemon can send `errdefs.Source` as buildkitd does.

pub mod convert;
pub mod image;
pub mod named;
pub mod sbom;
pub mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use crate::parser::{self, Range};
pub use convert::{dockerfile_to_llb, ConvertOpt, Converted, MetaResolver};
pub use image::Image;
pub use support::Platform;

/// The error a [`Bridge`] call failed with (the daemon's own error, boxed; it gets it back by
/// downcasting).
pub type BridgeError = Box<dyn std::error::Error + Send + Sync>;

/// Where in the Dockerfile an error is.
#[derive(Debug, Clone)]
pub struct Located {
    /// The lines.
    pub ranges: Vec<Range>,
    /// The Dockerfile (set by [`build`]).
    pub source: Option<Arc<llb::SourceMap>>,
}

impl Located {
    pub(crate) fn lines(r: &[Range]) -> Self {
        Located {
            ranges: r.to_vec(),
            source: None,
        }
    }

    /// The ranges as LLB ranges.
    pub fn pb_ranges(&self) -> Vec<llb::pb::Range> {
        self.ranges
            .iter()
            .map(|l| llb::pb::Range {
                start: Some(llb::pb::Position {
                    line: l.start.line as i32,
                    character: l.start.character as i32,
                }),
                end: Some(llb::pb::Position {
                    line: l.end.line as i32,
                    character: l.end.character as i32,
                }),
            })
            .collect()
    }
}

/// A frontend error.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The Dockerfile or an option is wrong.
    Dockerfile {
        /// What is wrong.
        message: String,
        /// Where.
        location: Option<Located>,
    },
    /// A daemon call failed.
    Bridge {
        /// The message to show (the cause's, maybe with context in front).
        message: String,
        /// The cause.
        source: BridgeError,
        /// Where.
        location: Option<Located>,
    },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Dockerfile { message, .. } | Error::Bridge { message, .. } => {
                f.write_str(message)
            }
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// A daemon error, with `context` in front unless empty.
    pub fn bridge(context: &str, source: BridgeError) -> Self {
        let message = if context.is_empty() {
            source.to_string()
        } else {
            format!("{context}: {source}")
        };
        Error::Bridge {
            message,
            source,
            location: None,
        }
    }

    fn location_mut(&mut self) -> &mut Option<Located> {
        match self {
            Error::Dockerfile { location, .. } | Error::Bridge { location, .. } => location,
        }
    }

    /// Where in the Dockerfile.
    pub fn location(&self) -> Option<&Located> {
        match self {
            Error::Dockerfile { location, .. } | Error::Bridge { location, .. } => {
                location.as_ref()
            }
        }
    }

    /// The daemon error this came from, if any.
    pub fn bridge_source(&self) -> Option<&BridgeError> {
        match self {
            Error::Bridge { source, .. } => Some(source),
            _ => None,
        }
    }

    /// Adds lines (`parser.WithLocation`: appended to those already there).
    pub(crate) fn with_lines(mut self, r: &[Range]) -> Self {
        let loc = self.location_mut();
        match loc {
            Some(l) => l.ranges.extend_from_slice(r),
            None => *loc = Some(Located::lines(r)),
        }
        self
    }

    /// Same error, new message.
    pub(crate) fn rewrap(self, msg: String) -> Self {
        match self {
            Error::Dockerfile { location, .. } => Error::Dockerfile {
                message: msg,
                location,
            },
            Error::Bridge {
                source, location, ..
            } => Error::Bridge {
                message: msg,
                source,
                location,
            },
        }
    }

    fn with_source(mut self, sm: &Arc<llb::SourceMap>) -> Self {
        if let Some(l) = self.location_mut() {
            if l.source.is_none() {
                l.source = Some(sm.clone());
            }
        }
        self
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::Dockerfile {
        message: msg.into(),
        location: None,
    }
}

/// A solve request to the daemon.
#[derive(Debug, Clone, Default)]
pub struct SolveRequest {
    /// The definition (empty when `frontend` is set).
    pub definition: Option<llb::pb::Definition>,
    /// Another frontend (`gateway.v0`).
    pub frontend: String,
    /// Its options.
    pub frontend_opt: BTreeMap<String, String>,
    /// Its inputs.
    pub frontend_inputs: BTreeMap<String, llb::pb::Definition>,
    /// `cache-imports`, as `(type, attrs)`.
    pub cache_imports: Vec<(String, BTreeMap<String, String>)>,
}

/// What a solve returned.
#[derive(Debug, Clone)]
pub struct BuildResult<R> {
    /// The result (`None`: nothing, or a multi-platform result in `refs`).
    pub r#ref: Option<R>,
    /// A multi-platform result: one ref per platform ID (`linux/amd64`), their platforms in
    /// the `refs.platforms` metadata. Empty for a single result.
    pub refs: BTreeMap<String, R>,
    /// The definitions the results were solved from, by the key in `refs` (`""` for `ref`):
    /// a gateway client turns a result back into LLB with them (`Ref.ToState`).
    pub defs: BTreeMap<String, llb::pb::Definition>,
    /// Metadata.
    pub metadata: BTreeMap<String, Vec<u8>>,
    /// Attestations by platform ID (the frontend's SBOMs, [`sbom`]).
    pub attestations: BTreeMap<String, Vec<Attestation<R>>>,
}

/// What an [`Attestation`] holds (gateway `AttestationKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttestationKind {
    /// One in-toto statement whose predicate is the file at `path`.
    InToto,
    /// A directory of in-toto statements at `path`.
    Bundle,
}

/// An attestation of a result (gateway `Attestation`).
#[derive(Debug, Clone)]
pub struct Attestation<R> {
    /// In-toto or bundle.
    pub kind: AttestationKind,
    /// The result holding its files.
    pub r#ref: Option<R>,
    /// The file or directory in `ref`.
    pub path: String,
    /// Its metadata (`reason`, `sbom-core`).
    pub metadata: BTreeMap<String, Vec<u8>>,
    /// The in-toto predicate type.
    pub predicate_type: String,
}

/// The build's options as the daemon got them.
#[derive(Debug, Clone, Default)]
pub struct BuildOpts {
    /// Frontend options.
    pub opts: BTreeMap<String, String>,
    /// The client's session.
    pub session_id: String,
    /// Frontend inputs (named definitions).
    pub inputs: BTreeMap<String, llb::pb::Definition>,
    /// The worker's platforms (first = default build platform).
    pub worker_platforms: Vec<Platform>,
}

/// A warning about the Dockerfile.
#[derive(Debug, Clone)]
pub struct Warning {
    /// The vertex it belongs to (the Dockerfile load).
    pub vertex: String,
    /// One line.
    pub short: String,
    /// More lines.
    pub detail: Vec<Vec<u8>>,
    /// A link.
    pub url: String,
    /// The Dockerfile and the line.
    pub location: Option<(llb::pb::SourceInfo, Vec<llb::pb::Range>)>,
}

/// What the frontend needs from the daemon (an in-process `LLBBridge`).
pub trait Bridge: Sync {
    /// A solved result.
    type Ref: Clone + Send + Sync;

    /// The build's options.
    fn build_opts(&self) -> &BuildOpts;

    /// Solves a definition or runs another frontend.
    fn solve(
        &self,
        req: SolveRequest,
    ) -> impl Future<Output = Result<BuildResult<Self::Ref>, BridgeError>> + Send;

    /// Reads a file of a result (missing file: error).
    fn read_file(
        &self,
        r: &Self::Ref,
        path: &str,
    ) -> impl Future<Output = Result<Vec<u8>, BridgeError>> + Send;

    /// The first `len` bytes of a file of a result (missing file: error).
    fn read_file_head(
        &self,
        r: &Self::Ref,
        path: &str,
        len: usize,
    ) -> impl Future<Output = Result<Vec<u8>, BridgeError>> + Send {
        async move {
            let mut v = self.read_file(r, path).await?;
            v.truncate(len);
            Ok(v)
        }
    }

    /// `ResolveImageConfig`: the digest to pin (empty: do not pin) and the config JSON.
    fn resolve_image_config(
        &self,
        reference: &str,
        platform: &Platform,
        resolve_mode: &str,
        log_name: &str,
    ) -> impl Future<Output = Result<(String, Vec<u8>), BridgeError>> + Send;

    /// `ResolveImageConfig` with `ResolverType` OCI layout: the config of image `reference`
    /// (`name@sha256:…`) of the OCI layout the client serves as content store `oci:<store_id>`
    /// (in session `session_id`), for `platform`; returns the root digest and the config JSON.
    fn resolve_oci_layout_config(
        &self,
        reference: &str,
        platform: &Platform,
        session_id: &str,
        store_id: &str,
        log_name: &str,
    ) -> impl Future<Output = Result<(String, Vec<u8>), BridgeError>> + Send {
        let _ = (platform, session_id, store_id, log_name);
        let msg = format!(
            "oci-layout reference {reference:?}: this frontend host cannot read OCI layouts"
        );
        async move { Err(msg.into()) }
    }

    /// Shows a warning.
    fn warn(&self, w: Warning) -> impl Future<Output = ()> + Send;
}

struct Resolver<'a, B>(&'a B);

impl<B: Bridge> MetaResolver for Resolver<'_, B> {
    async fn resolve_image_config(
        &self,
        reference: &str,
        platform: &Platform,
        resolve_mode: &str,
        log_name: &str,
    ) -> Result<(String, Vec<u8>), Error> {
        self.0
            .resolve_image_config(reference, platform, resolve_mode, log_name)
            .await
            .map_err(|e| Error::bridge("", e))
    }

    async fn context_by_name(
        &self,
        name: &str,
        resolve_mode: &str,
        platform: &Platform,
    ) -> Result<Option<named::NamedContext>, Error> {
        named::context_by_name(self.0, name, resolve_mode, platform).await
    }
}

/// Whether a `# syntax=` image is the frontend built in here (dockerfile 1.5): then the
/// build continues here instead of running the image.
pub fn is_builtin_syntax(image: &str) -> bool {
    let r = llb::normalize_ref(image.trim());
    let Some(tag) = r
        .strip_prefix("docker.io/docker/dockerfile:")
        .or_else(|| r.strip_prefix("docker.io/docker/dockerfile-upstream:"))
    else {
        return false;
    };
    if tag.contains('@') {
        return false;
    }
    matches!(tag, "1" | "1.0" | "1.1" | "1.2" | "1.3" | "1.4" | "1.5")
        || tag
            .strip_prefix("1.5.")
            .is_some_and(|p| p.parse::<u32>().is_ok())
}

const DEFAULT_DOCKERFILE: &str = "Dockerfile";

/// The target platforms of a build: `platform` (comma-separated; `[None]` = the default) and
/// whether the result is a map by platform (several platforms, or `multi-platform=true`).
fn target_platforms(
    opts: &BTreeMap<String, String>,
) -> Result<(Vec<Option<Platform>>, bool), Error> {
    let mut targets = vec![None];
    if let Some(p) = opts.get("platform").filter(|p| !p.is_empty()) {
        targets = p
            .split(',')
            .map(|s| Platform::parse(s.trim()).map(Some))
            .collect::<Result<_, _>>()
            .map_err(invalid)?;
    }
    let mut export_map = targets.len() > 1;
    let multi = opts
        .get("build-arg:BUILDKIT_MULTI_PLATFORM")
        .filter(|v| !v.is_empty())
        .or(opts.get("multi-platform"))
        .filter(|v| !v.is_empty());
    if let Some(v) = multi {
        match crate::instructions::parse_bool_go(v) {
            Some(b) => {
                if !b && export_map {
                    return Err(invalid(
                        "returning multiple target platforms is not allowed",
                    ));
                }
                export_map = b;
            }
            None => return Err(invalid(format!("invalid boolean value {v}"))),
        }
    }
    Ok((targets, export_map))
}

/// Options parsed from the frontend opts (the target platform is the first one).
fn parse_opts(b: &BuildOpts) -> Result<ConvertOpt, Error> {
    let opts = &b.opts;
    let mut c = ConvertOpt {
        target: opts.get("target").cloned().unwrap_or_default(),
        session_id: b.session_id.clone(),
        cache_id_namespace: opts
            .get("build-arg:BUILDKIT_CACHE_MOUNT_NS")
            .cloned()
            .unwrap_or_default(),
        context_local_name: opts
            .get("contextkey")
            .cloned()
            .unwrap_or_else(|| "context".into()),
        build_platforms: if b.worker_platforms.is_empty() {
            vec![Platform::host()]
        } else {
            vec![b.worker_platforms[0].clone()]
        },
        ..Default::default()
    };
    for (k, v) in opts {
        if let Some(a) = k.strip_prefix("build-arg:") {
            c.build_args.insert(a.to_string(), v.clone());
        } else if let Some(l) = k.strip_prefix("label:") {
            c.labels.insert(l.to_string(), v.clone());
        }
    }
    let (targets, export_map) = target_platforms(opts)?;
    c.target_platform = targets[0].clone();
    c.prefix_platform = export_map;
    c.image_resolve_mode = match opts.get("image-resolve-mode").map(String::as_str) {
        None | Some("") | Some("default") => "default".into(),
        Some("pull") => "pull".into(),
        Some("local") => "local".into(),
        Some(v) => return Err(invalid(format!("invalid image-resolve-mode: {v}"))),
    };
    if let Some(v) = opts.get("add-hosts").filter(|v| !v.is_empty()) {
        for field in crate::instructions::csv_fields(v)
            .map_err(|e| invalid(format!("failed to parse additional hosts: {e}")))?
        {
            let Some((h, ip)) = field.split_once('=') else {
                return Err(invalid(format!(
                    "failed to parse additional hosts: invalid key-value pair {field}"
                )));
            };
            if ip.parse::<std::net::IpAddr>().is_err() {
                return Err(invalid(format!(
                    "failed to parse additional hosts: failed to parse IP {ip}"
                )));
            }
            c.extra_hosts.push((h.to_string(), ip.to_string()));
        }
    }
    if let Some(v) = opts.get("shm-size").filter(|v| !v.is_empty()) {
        c.shm_size = crate::instructions::ram_in_bytes_go(v)
            .map_err(|e| invalid(format!("failed to parse shm size: {e}")))?;
    }
    if let Some(v) = opts.get("ulimit").filter(|v| !v.is_empty()) {
        for field in crate::instructions::csv_fields(v)
            .map_err(|e| invalid(format!("failed to parse ulimit: {e}")))?
        {
            c.ulimits.push(
                parse_ulimit(&field)
                    .map_err(|e| invalid(format!("failed to parse ulimit: {e}")))?,
            );
        }
    }
    c.force_net_mode = match opts.get("force-network-mode").map(String::as_str) {
        None | Some("") => None,
        Some("none") => Some(llb::NetMode::None),
        Some("host") => Some(llb::NetMode::Host),
        Some("sandbox") => Some(llb::NetMode::Sandbox),
        Some(v) => return Err(invalid(format!("invalid netmode {v}"))),
    };
    if let Some(v) = opts.get("no-cache") {
        c.ignore_cache = Some(if v.is_empty() {
            vec![]
        } else {
            v.split(',').map(str::to_string).collect()
        });
    }
    c.hostname = opts
        .get("build-arg:BUILDKIT_SANDBOX_HOSTNAME")
        .filter(|v| !v.is_empty())
        .or(opts.get("hostname"))
        .cloned()
        .unwrap_or_default();
    c.cgroup_parent = opts.get("cgroup-parent").cloned().unwrap_or_default();
    if let Some(v) = opts
        .get("build-arg:SOURCE_DATE_EPOCH")
        .filter(|v| !v.is_empty())
    {
        let secs: i64 = v
            .parse()
            .map_err(|_| invalid(format!("invalid SOURCE_DATE_EPOCH: {v}")))?;
        c.source_date_epoch = Some(rfc3339(secs));
    }
    Ok(c)
}

/// `units.ParseUlimit`: `name=soft[:hard]`.
fn parse_ulimit(s: &str) -> Result<(String, i64, i64), String> {
    const NAMES: &[&str] = &[
        "core",
        "cpu",
        "data",
        "fsize",
        "locks",
        "memlock",
        "msgqueue",
        "nice",
        "nofile",
        "nproc",
        "rss",
        "rtprio",
        "rttime",
        "sigpending",
        "stack",
    ];
    let (name, v) = s
        .split_once('=')
        .ok_or_else(|| format!("invalid ulimit argument: {s}"))?;
    if !NAMES.contains(&name) {
        return Err(format!("invalid ulimit type: {name}"));
    }
    let (soft, hard) = match v.split_once(':') {
        Some((a, b)) => (a, b),
        None => (v, v),
    };
    let soft: i64 = soft
        .parse()
        .map_err(|_| format!("invalid ulimit soft value {soft}"))?;
    let hard: i64 = hard
        .parse()
        .map_err(|_| format!("invalid ulimit hard value {hard}"))?;
    if soft > hard {
        return Err(format!(
            "ulimit soft limit must be less than or equal to hard limit: {soft} > {hard}"
        ));
    }
    Ok((name.to_string(), soft, hard))
}

/// `time.Unix(secs, 0).UTC()` as Go's JSON writes it.
fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // civil from days (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// The digest of a definition's head vertex (`Definition.Head`).
fn head_digest(def: &llb::pb::Definition) -> String {
    use prost::Message as _;
    def.def
        .last()
        .and_then(|b| llb::pb::Op::decode(b.as_ref()).ok())
        .and_then(|op| op.inputs.first().map(|i| i.digest.clone()))
        .unwrap_or_default()
}

/// Runs the Dockerfile frontend.
pub async fn build<B: Bridge>(bridge: &B) -> Result<BuildResult<B::Ref>, Error> {
    let bo = bridge.build_opts().clone();
    let opts = &bo.opts;
    if opts
        .get("override-copy-image")
        .is_some_and(|v| !v.is_empty())
    {
        return Err(invalid(
            "support for \"override-copy-image\" was removed in BuildKit 0.11",
        ));
    }
    if let Some(v) = opts.get("build-arg:BUILDKIT_DISABLE_FILEOP") {
        if crate::instructions::parse_bool_go(v) == Some(true) {
            return Err(invalid(
                "support for \"build-arg:BUILDKIT_DISABLE_FILEOP\" was removed in BuildKit 0.11",
            ));
        }
    }
    // Every input must be a definition (`c.Inputs()` turns them all into states first).
    for def in bo.inputs.values() {
        if def.def.is_empty() {
            return Err(invalid(
                "failed to get frontend inputs: invalid nil input definition to definition op",
            ));
        }
    }
    let local_ctx = opts
        .get("contextkey")
        .cloned()
        .unwrap_or_else(|| "context".into());
    let (force_local_df, local_df) = match opts.get("dockerfilekey") {
        Some(v) => (true, v.clone()),
        None => (false, "dockerfile".to_string()),
    };
    let ctx_opt = opts.get(&local_ctx).cloned().unwrap_or_default();
    let keep_git = opts
        .get("build-arg:BUILDKIT_CONTEXT_KEEP_GIT_DIR")
        .and_then(|v| crate::instructions::parse_bool_go(v))
        .unwrap_or(false);
    let mut filename = opts.get("filename").cloned().unwrap_or_default();
    if filename.is_empty() {
        filename = DEFAULT_DOCKERFILE.into();
    }
    let mut filenames = vec![filename.clone(), format!("{filename}.dockerignore")];
    let base = filename.rsplit('/').next().unwrap_or(&filename).to_string();
    let dir = support::clean(&match filename.rfind('/') {
        Some(i) => filename[..i].to_string(),
        None => ".".to_string(),
    });
    let lower = support::join(&[&dir, "dockerfile"]);
    if base == DEFAULT_DOCKERFILE {
        filenames.push(lower.clone());
    }
    // A remote context (git repository, URL of an archive or of a Dockerfile) or the
    // `context` frontend input is the build context; a remote one also holds the Dockerfile
    // unless a local one is forced.
    let mut src: Option<llb::State> = None;
    let mut build_context: Option<llb::State> = None;
    let mut not_local_ctx = false;
    if let Some((remote, commit)) = support::git_ref(&ctx_opt) {
        let mut g = llb::git(remote, commit);
        if keep_git {
            g = g.keep_git_dir();
        }
        let st = g
            .state()
            .custom_name(format!("[internal] load git source {ctx_opt}"));
        if !force_local_df {
            src = Some(st.clone());
        }
        build_context = Some(st);
    } else if ctx_opt.starts_with("http://") || ctx_opt.starts_with("https://") {
        let http_ctx = llb::http(ctx_opt.clone())
            .filename("context")
            .state()
            .custom_name("[internal] load remote build context");
        let def = http_ctx
            .marshal()
            .map_err(|e| invalid(format!("failed to marshal httpcontext: {e}")))?;
        let r = bridge
            .solve(SolveRequest {
                definition: Some(def),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::bridge("failed to resolve httpcontext", e))?;
        let r = r
            .r#ref
            .ok_or_else(|| invalid("failed to resolve httpcontext: no result"))?;
        let head = bridge
            .read_file_head(&r, "context", 1024)
            .await
            .map_err(|e| Error::bridge("failed to read downloaded context", e))?;
        if support::is_archive(&head) {
            let bc = llb::scratch().file(llb::copy(
                &http_ctx,
                "/context",
                "/",
                llb::CopyOpts::default().attempt_unpack(true),
            ));
            if !force_local_df {
                src = Some(bc.clone());
            }
            build_context = Some(bc);
        } else {
            filename = "context".into();
            if !force_local_df {
                src = Some(http_ctx.clone());
            }
            build_context = Some(http_ctx);
            not_local_ctx = true;
        }
    } else if let Some(def) = bo.inputs.get("context") {
        build_context = Some(
            llb::State::from_definition(def)
                .map_err(|e| invalid(format!("failed to get frontend inputs: {e}")))?,
        );
        not_local_ctx = true;
    }
    if let (Some(bc), Some(sub)) = (&build_context, opts.get("contextsubdir")) {
        build_context = Some(llb::scratch().file(llb::copy(
            bc,
            sub.clone(),
            "/",
            llb::CopyOpts::default().dir_contents_only(true),
        )));
    }
    let src_def = match (src, bo.inputs.get("dockerfile"), force_local_df) {
        (Some(st), _, _) => st
            .marshal()
            .map_err(|e| invalid(format!("failed to marshal local source: {e}")))?,
        (None, Some(def), false) => def.clone(),
        _ => llb::local(local_df.clone())
            .follow_paths(filenames)
            .session_id(bo.session_id.clone())
            .shared_key_hint(local_df.clone())
            .differ("none", false)
            .state()
            .custom_name(format!("[internal] load build definition from {filename}"))
            .marshal()
            .map_err(|e| invalid(format!("failed to marshal local source: {e}")))?,
    };
    let def_vertex = head_digest(&src_def);

    let solved = bridge
        .solve(SolveRequest {
            definition: Some(src_def.clone()),
            ..Default::default()
        })
        .await
        .map_err(|e| Error::bridge("failed to resolve dockerfile", e))?;
    let df_ref = solved
        .r#ref
        .ok_or_else(|| invalid("failed to resolve dockerfile: no result"))?;
    let dt = match bridge.read_file(&df_ref, &filename).await {
        Ok(d) => d,
        Err(e) => {
            let fallback = if filename.rsplit('/').next() == Some(DEFAULT_DOCKERFILE) {
                bridge.read_file(&df_ref, &lower).await.ok()
            } else {
                None
            };
            match fallback {
                Some(d) => d,
                None => return Err(Error::bridge("failed to read dockerfile", e)),
            }
        }
    };
    let source_map = Arc::new(llb::SourceMap {
        filename: filename.clone(),
        data: dt.clone(),
        language: String::new(),
        definition: Some(src_def.clone()),
    });
    let mut dockerignore = bridge
        .read_file(&df_ref, &format!("{filename}.dockerignore"))
        .await
        .ok();
    if dockerignore.is_none() && !not_local_ctx {
        let st = build_context.clone().unwrap_or_else(|| {
            llb::local(local_ctx.clone())
                .session_id(bo.session_id.clone())
                .follow_paths([".dockerignore"])
                .shared_key_hint(format!("{local_ctx}-.dockerignore"))
                .differ("none", false)
                .state()
                .custom_name("[internal] load .dockerignore")
        });
        let def = st
            .marshal()
            .map_err(|e| invalid(format!("failed to marshal local source: {e}")))?;
        let r = bridge
            .solve(SolveRequest {
                definition: Some(def),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::bridge("", e))?;
        if let Some(r) = r.r#ref {
            dockerignore = bridge.read_file(&r, ".dockerignore").await.ok();
        }
    }
    let excludes = dockerignore
        .map(|d| support::read_dockerignore(&d))
        .unwrap_or_default();

    // a frontend image named by the Dockerfile or by BUILDKIT_SYNTAX
    if !opts.contains_key("cmdline") {
        let text = String::from_utf8_lossy(&dt).into_owned();
        let syntax = if let Some(cmdline) = opts.get("build-arg:BUILDKIT_SYNTAX") {
            let image = cmdline.trim().split(' ').next().unwrap_or("").to_string();
            Some((image, cmdline.clone(), None))
        } else {
            parser::detect_syntax(&text).map(|s| (s.image, s.cmdline, Some(s.location)))
        };
        if let Some((image, cmdline, loc)) = syntax {
            if !is_builtin_syntax(&image) {
                let mut fopts = opts.clone();
                fopts.insert("cmdline".into(), cmdline.clone());
                fopts.insert("source".into(), image.clone());
                let r = bridge
                    .solve(SolveRequest {
                        frontend: "gateway.v0".into(),
                        frontend_opt: fopts,
                        frontend_inputs: bo.inputs.clone(),
                        ..Default::default()
                    })
                    .await;
                return r.map_err(|e| match loc {
                    None => Error::bridge(
                        &format!("failed with build-arg:BUILDKIT_SYNTAX = {cmdline}"),
                        e,
                    ),
                    Some(loc) => Error::bridge("", e)
                        .with_lines(&loc)
                        .with_source(&source_map),
                });
            }
        }
    }
    if let Some(req) = opts.get("requestid") {
        return Err(invalid(format!("unsupported request {req}")));
    }
    let scanner = match sbom::requested(opts)?.get("sbom") {
        Some(attrs) => {
            let generator = attrs.get("generator").map(String::as_str).unwrap_or("");
            let host = bo
                .worker_platforms
                .first()
                .cloned()
                .unwrap_or_else(Platform::host);
            Some(sbom::Scanner::new(bridge, generator, &host).await?)
        }
        None => None,
    };

    let mut copt = parse_opts(&bo)?;
    copt.excludes = excludes;
    copt.source_map = Some(source_map.clone());
    copt.build_context = build_context;
    let (targets, export_map) = target_platforms(opts)?;
    let cache_imports = cache_imports(opts)?;
    // Every platform converts and solves at once; only the first one shows the Dockerfile's
    // warnings (they are the same for all).
    let built = futures::future::try_join_all(targets.iter().enumerate().map(|(i, tp)| {
        let mut copt = copt.clone();
        copt.target_platform = tp.clone();
        let cache_imports = cache_imports.clone();
        let (filename, dt, src_def, def_vertex) = (&filename, &dt, &src_def, &def_vertex);
        let source_map = &source_map;
        async move {
            let converted = dockerfile_to_llb(dt, &copt, &Resolver(bridge))
                .await
                .map_err(|e| e.with_source(source_map))?;
            if i == 0 {
                for w in &converted.warnings {
                    let location = w.location.map(|r| {
                        (
                            llb::pb::SourceInfo {
                                filename: filename.clone(),
                                data: dt.clone().into(),
                                definition: Some(src_def.clone()),
                                language: String::new(),
                            },
                            Located::lines(&[r]).pb_ranges(),
                        )
                    });
                    bridge
                        .warn(Warning {
                            vertex: def_vertex.clone(),
                            short: w.short.clone(),
                            detail: w.detail.iter().map(|d| d.clone().into_bytes()).collect(),
                            url: w.url.clone(),
                            location,
                        })
                        .await;
                }
            }
            let def = converted
                .state
                .marshal()
                .map_err(|e| invalid(format!("failed to marshal LLB definition: {e}")))?;
            let res = bridge
                .solve(SolveRequest {
                    definition: Some(def.clone()),
                    cache_imports,
                    ..Default::default()
                })
                .await
                .map_err(|e| Error::bridge("", e))?;
            let p = tp.clone().unwrap_or_else(Platform::host);
            let scan = (converted.state, converted.sbom);
            Ok::<_, Error>((p, converted.image.to_go_json(), res.r#ref, def, scan))
        }
    }))
    .await?;
    let mut metadata = BTreeMap::new();
    let mut refs = BTreeMap::new();
    let mut defs = BTreeMap::new();
    let mut single = None;
    let mut platforms = vec![];
    let mut attestations = BTreeMap::new();
    for (p, config, r, def, (core, targets)) in built {
        let id = p.format();
        if let Some(scanner) = &scanner {
            let def = scanner.definition(&id, &core, &targets)?;
            let res = bridge
                .solve(SolveRequest {
                    definition: Some(def),
                    ..Default::default()
                })
                .await
                .map_err(|e| Error::bridge("", e))?;
            attestations.insert(id.clone(), vec![sbom::attestation(res.r#ref)]);
        }
        if export_map {
            metadata.insert(format!("containerimage.config/{id}"), config);
            if let Some(r) = r {
                refs.insert(id.clone(), r);
            }
            defs.insert(id.clone(), def);
        } else {
            metadata.insert("containerimage.config".to_string(), config);
            single = r;
            defs.insert(String::new(), def);
        }
        platforms.push(serde_json::json!({
            "ID": id,
            "Platform": platform_json(&p),
        }));
    }
    metadata.insert(
        "refs.platforms".to_string(),
        serde_json::to_vec(&serde_json::json!({ "Platforms": platforms })).expect("json"),
    );
    Ok(BuildResult {
        r#ref: single,
        refs,
        defs,
        metadata,
        attestations,
    })
}

/// A cache to import: its type and attributes.
type CacheImport = (String, BTreeMap<String, String>);

/// The caches to import (`cache-imports` JSON, and the older `cache-from` list of registry
/// references).
fn cache_imports(opts: &BTreeMap<String, String>) -> Result<Vec<CacheImport>, Error> {
    let mut cache_imports = vec![];
    if let Some(s) = opts.get("cache-imports").filter(|s| !s.is_empty()) {
        #[derive(serde::Deserialize)]
        struct Entry {
            #[serde(rename = "Type", default)]
            typ: String,
            #[serde(rename = "Attrs", default)]
            attrs: Option<BTreeMap<String, String>>,
        }
        let entries: Vec<Entry> = serde_json::from_str(s).map_err(|e| {
            invalid(format!(
                "failed to unmarshal cache-imports ({}): {e}",
                crate::parser::go_quote(s)
            ))
        })?;
        for e in entries {
            cache_imports.push((e.typ, e.attrs.unwrap_or_default()));
        }
    }
    if let Some(s) = opts.get("cache-from").filter(|s| !s.is_empty()) {
        for r in s.split(',') {
            cache_imports.push((
                "registry".into(),
                [("ref".to_string(), r.to_string())].into(),
            ));
        }
    }
    Ok(cache_imports)
}

fn platform_json(p: &Platform) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("architecture".into(), p.architecture.clone().into());
    m.insert("os".into(), p.os.clone().into());
    if !p.variant.is_empty() {
        m.insert("variant".into(), p.variant.clone().into());
    }
    serde_json::Value::Object(m)
}

#[cfg(test)]
mod tests;
