//! Dockerfile → LLB (`frontend/dockerfile/dockerfile2llb/convert.go` at v0.11.6).
//!
//! Stages become dispatch states; `COPY --from` and `RUN --mount from=` name other stages or
//! images (the latter become extra, unnamed states). Only states the target reaches are
//! resolved (their base image config read through the [`MetaResolver`]) and dispatched, so
//! unused stages cost nothing. Each instruction then changes the state's LLB and its image
//! config exactly as upstream's dispatchers do, including the history entries
//! (`created_by` texts, `empty_layer`, the `buildkit.dockerfile.v0` comment) and the progress
//! names (`[stage 2/5] RUN …`).
//!
//! The build context is a `local` source whose `followpaths` are the context paths every
//! dispatched instruction used; upstream fills it in after dispatching through a mutable
//! output. Here LLB states are immutable, so dispatching runs twice: first a paths-only pass
//! that expands every instruction and tracks the environment but builds no ops (it only learns
//! the paths), then the full pass with the final context (image configs are resolved once).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::image::{HealthConfig, History, Image};
use super::support::{self, clean, join, Platform};
use super::{Error, Located};
use crate::instructions::{self, Command, KeyValuePairOptional, Stage};
use crate::parser::{self, go_quote, go_quote_list, Range};
use crate::shell::{Lex, Lookup};

const EMPTY_IMAGE_NAME: &str = "scratch";
const HISTORY_COMMENT: &str = "buildkit.dockerfile.v0";

/// Reads image configs (`ResolveImageConfig`).
pub trait MetaResolver: Sync {
    /// The digest to pin (may be empty) and the config JSON of `reference`.
    fn resolve_image_config(
        &self,
        reference: &str,
        platform: &Platform,
        resolve_mode: &str,
        log_name: &str,
    ) -> impl std::future::Future<Output = Result<(String, Vec<u8>), Error>> + Send;

    /// What the client mapped `name` (a stage name or a normalized image name) to with a
    /// `context:NAME` option, for `platform`; `None` when it did not.
    fn context_by_name(
        &self,
        name: &str,
        resolve_mode: &str,
        platform: &Platform,
    ) -> impl std::future::Future<Output = Result<Option<super::named::NamedContext>, Error>> + Send;
}

/// What the converter needs besides the Dockerfile.
#[derive(Debug, Clone, Default)]
pub struct ConvertOpt {
    /// `target`.
    pub target: String,
    /// `build-arg:*`.
    pub build_args: BTreeMap<String, String>,
    /// `label:*`.
    pub labels: BTreeMap<String, String>,
    /// The client session.
    pub session_id: String,
    /// The build context state, if not the default `local://context`.
    pub build_context: Option<llb::State>,
    /// `.dockerignore` patterns.
    pub excludes: Vec<String>,
    /// `no-cache`: `Some(empty)` = every stage, `Some(names)` = those stages.
    pub ignore_cache: Option<Vec<String>>,
    /// `BUILDKIT_CACHE_MOUNT_NS`.
    pub cache_id_namespace: String,
    /// `image-resolve-mode` (`default`, `pull`, `local`).
    pub image_resolve_mode: String,
    /// `platform` (first one).
    pub target_platform: Option<Platform>,
    /// Worker platforms.
    pub build_platforms: Vec<Platform>,
    /// Prefix progress names with the platform (multi-platform builds).
    pub prefix_platform: bool,
    /// `add-hosts`.
    pub extra_hosts: Vec<(String, String)>,
    /// `shm-size` in bytes.
    pub shm_size: i64,
    /// `ulimit`.
    pub ulimits: Vec<(String, i64, i64)>,
    /// `force-network-mode`.
    pub force_net_mode: Option<llb::NetMode>,
    /// The local name of the context (`contextkey`, default `context`).
    pub context_local_name: String,
    /// The Dockerfile as a source map for op locations.
    pub source_map: Option<Arc<llb::SourceMap>>,
    /// `hostname`.
    pub hostname: String,
    /// `cgroup-parent`: the cgroup RUN processes get theirs under.
    pub cgroup_parent: String,
    /// `SOURCE_DATE_EPOCH` as RFC 3339.
    pub source_date_epoch: Option<String>,
}

/// The converted build: the target state and its image config.
#[derive(Debug)]
pub struct Converted {
    /// The final state.
    pub state: llb::State,
    /// The image config.
    pub image: Image,
    /// Parser warnings (short text, line).
    pub warnings: Vec<parser::Warning>,
    /// What an SBOM scanner scans besides the final stage.
    pub sbom: SbomTargets,
}

/// What an SBOM scanner scans besides the final stage (`SBOMTargets`): the build context when
/// the final stage has `BUILDKIT_SBOM_SCAN_CONTEXT`, and each stage the final one depends on
/// that has `BUILDKIT_SBOM_SCAN_STAGE` (global or stage `ARG`s, build args overriding them: a
/// boolean, or a comma-separated list of stage names).
#[derive(Debug, Clone, Default)]
pub struct SbomTargets {
    /// By name: `context`, or the stage's name.
    pub extras: BTreeMap<String, llb::State>,
    /// The final stage or one of the extra stages does not use the cache (`no-cache`).
    pub ignore_cache: bool,
}

#[derive(Debug, Clone)]
struct Cmd {
    command: Command,
    /// Stages (indexes) the command reads: `COPY --from`, each `RUN --mount`.
    sources: Vec<usize>,
}

#[derive(Debug, Clone)]
struct DispatchState {
    stage: Stage,
    stage_name: String,
    state: llb::State,
    image: Image,
    platform: Option<Platform>,
    base: Option<usize>,
    deps: BTreeSet<usize>,
    build_args: Vec<KeyValuePairOptional>,
    /// The stage's commands (shared: each pass dispatches a copy of every state).
    commands: Arc<Vec<Cmd>>,
    ctx_paths: BTreeSet<String>,
    ignore_cache: bool,
    cmd_set: bool,
    unregistered: bool,
    /// A stage the client replaced with a named context: nothing of it is dispatched.
    noinit: bool,
    cmd_index: usize,
    cmd_total: usize,
    /// `SOURCE_DATE_EPOCH` for history entries.
    epoch: Option<String>,
}

impl DispatchState {
    fn new(stage: Stage) -> Self {
        DispatchState {
            stage_name: stage.name.clone(),
            stage,
            state: llb::scratch(),
            image: Image::default(),
            platform: None,
            base: None,
            deps: BTreeSet::new(),
            build_args: vec![],
            commands: Arc::default(),
            ctx_paths: BTreeSet::new(),
            ignore_cache: false,
            cmd_set: false,
            unregistered: false,
            noinit: false,
            cmd_index: 0,
            cmd_total: 0,
            epoch: None,
        }
    }

    /// The environment expansion sees: the state's process environment.
    fn env(&self) -> StateEnv<'_> {
        StateEnv(self.state.get_env())
    }
}

/// A process environment as expansion sees it, looked up in place: answers as the map
/// `shell::build_envs` makes of its `KEY=value` strings (a key holding `=` splits at its first
/// `=`, later entries win), without building that map for every instruction.
struct StateEnv<'a>(&'a [(String, String)]);

impl Lookup for StateEnv<'_> {
    fn lookup(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .rev()
            .find_map(|(k, v)| match k.split_once('=') {
                None => (k == name).then(|| v.clone()),
                Some((a, b)) => (a == name).then(|| format!("{b}={v}")),
            })
    }
}

/// Replaces `st` by `f(st)` without cloning it (states carry their whole environment).
fn update(st: &mut llb::State, f: impl FnOnce(llb::State) -> llb::State) {
    let old = std::mem::replace(st, llb::scratch());
    *st = f(old);
}

struct States {
    states: Vec<DispatchState>,
    by_name: BTreeMap<String, usize>,
}

impl States {
    fn add(&mut self, mut ds: DispatchState) -> usize {
        if let Some(&b) = self.by_name.get(&ds.stage.base_name) {
            ds.base = Some(b);
        }
        let i = self.states.len();
        if !ds.stage.name.is_empty() {
            self.by_name.insert(ds.stage.name.to_lowercase(), i);
        }
        self.states.push(ds);
        i
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.by_name.get(&name.to_lowercase()).copied()
    }

    fn reachable(&self, from: usize, to: usize) -> bool {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from];
        while let Some(s) = stack.pop() {
            if s == to {
                return true;
            }
            if !seen.insert(s) {
                continue;
            }
            if let Some(b) = self.states[s].base {
                stack.push(b);
            }
            stack.extend(self.states[s].deps.iter().copied());
        }
        false
    }
}

/// Options that stay the same while dispatching.
struct DispatchOpt<'a> {
    meta_args: Vec<KeyValuePairOptional>,
    build_arg_values: &'a BTreeMap<String, String>,
    shlex: Lex,
    build_context: llb::State,
    opt: &'a ConvertOpt,
    target_platform: Platform,
    proxy_env: Vec<(String, String)>,
    /// The first pass: only the context paths (and the environment and image config they
    /// depend on) are worked out; no LLB op is built. Errors of the parts it skips surface in
    /// the full pass.
    paths_only: bool,
}

fn located(message: impl Into<String>, location: &[Range]) -> Error {
    Error::Dockerfile {
        message: message.into(),
        location: Some(Located::lines(location)),
    }
}

fn plain(message: impl Into<String>) -> Error {
    Error::Dockerfile {
        message: message.into(),
        location: None,
    }
}

fn with_location(e: Error, location: &[Range]) -> Error {
    e.with_lines(location)
}

fn platform_args(build: &Platform, target: &Platform) -> Vec<KeyValuePairOptional> {
    let kv = |k: &str, v: String| KeyValuePairOptional {
        key: k.into(),
        value: Some(v),
        comment: String::new(),
    };
    vec![
        kv("BUILDPLATFORM", build.format()),
        kv("BUILDOS", build.os.clone()),
        kv("BUILDARCH", build.architecture.clone()),
        kv("BUILDVARIANT", build.variant.clone()),
        kv("TARGETPLATFORM", target.format()),
        kv("TARGETOS", target.os.clone()),
        kv("TARGETARCH", target.architecture.clone()),
        kv("TARGETVARIANT", target.variant.clone()),
    ]
}

fn meta_args_map(args: &[KeyValuePairOptional]) -> BTreeMap<String, String> {
    args.iter()
        .map(|a| (a.key.clone(), a.value_string()))
        .collect()
}

/// Docker's reference normalization with `TagNameOnly` (`busybox` →
/// `docker.io/library/busybox:latest`); errors as `reference.ParseNormalizedNamed`.
pub(crate) fn normalize_image_name(name: &str) -> Result<String, String> {
    let valid = !name.is_empty()
        && name == name.trim()
        && !name.contains("//")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/:@+".contains(c));
    let repo = name.split(['@']).next().unwrap_or("");
    let path_part = match repo.rsplit_once(':') {
        Some((a, b)) if !b.contains('/') => a,
        _ => repo,
    };
    let first = path_part.split('/').next().unwrap_or("");
    let has_domain = path_part.contains('/')
        && (first.contains('.') || first.contains(':') || first == "localhost");
    let path_check = if has_domain {
        path_part.split_once('/').map(|x| x.1).unwrap_or("")
    } else {
        path_part
    };
    if !valid || path_check.chars().any(|c| c.is_ascii_uppercase()) || path_check.is_empty() {
        if path_check.chars().any(|c| c.is_ascii_uppercase()) && valid {
            return Err("invalid reference format: repository name must be lowercase".into());
        }
        return Err("invalid reference format".into());
    }
    Ok(llb::normalize_ref(name))
}

/// Converts a Dockerfile.
pub async fn dockerfile_to_llb<R: MetaResolver>(
    dt: &[u8],
    opt: &ConvertOpt,
    resolver: &R,
) -> Result<Converted, Error> {
    if dt.is_empty() {
        return Err(plain("the Dockerfile cannot be empty"));
    }
    let build_platforms = if opt.build_platforms.is_empty() {
        match &opt.target_platform {
            Some(t) => vec![t.clone()],
            None => vec![Platform::host()],
        }
    } else {
        opt.build_platforms.clone()
    };
    let implicit_target = opt.target_platform.is_none();
    let target_platform = opt
        .target_platform
        .clone()
        .unwrap_or_else(|| build_platforms[0].clone());

    let mut opt_meta_args = platform_args(&build_platforms[0], &target_platform);
    for a in &mut opt_meta_args {
        if let Some(v) = opt.build_args.get(&a.key) {
            a.value = Some(v.clone());
        }
    }

    let parsed = parser::parse(dt).map_err(|e| located(e.message, &e.location))?;
    let warnings = parsed.warnings.clone();
    let proxy_env = proxy_env(&opt.build_args);
    let (stages, meta_args) =
        instructions::parse(&parsed.children).map_err(|e| located(e.message, &e.location))?;
    let shlex = Lex::new(parsed.escape_token);

    for cmd in meta_args {
        if let Command::Arg(_, args) = cmd {
            for mut a in args {
                match opt.build_args.get(&a.key) {
                    None => {
                        if let Some(v) = &a.value {
                            let env = meta_args_map(&opt_meta_args);
                            a.value = Some(
                                shlex
                                    .process_word_with_matches(v, &env)
                                    .map(|r| r.0)
                                    .unwrap_or_else(|_| v.clone()),
                            );
                        }
                    }
                    Some(v) => a.value = Some(v.clone()),
                }
                opt_meta_args.push(a);
            }
        }
    }

    let mut all = States {
        states: vec![],
        by_name: BTreeMap::new(),
    };
    for (i, mut st) in stages.into_iter().enumerate() {
        let env = meta_args_map(&opt_meta_args);
        let name = shlex
            .process_word_with_map(&st.base_name, &env)
            .map_err(|e| located(e.to_string(), &st.location))?;
        if name.is_empty() {
            return Err(located(
                format!("base name ({}) should not be blank", st.base_name),
                &st.location,
            ));
        }
        st.base_name = name;
        let commands = std::mem::take(&mut st.commands);
        let mut ds = DispatchState::new(st.clone());
        ds.stage.commands = commands;
        ds.epoch = opt.source_date_epoch.clone();
        if !st.platform.is_empty() {
            let v = shlex
                .process_word_with_map(&st.platform, &env)
                .map_err(|e| {
                    located(
                        format!(
                            "failed to process arguments for platform {}: {e}",
                            st.platform
                        ),
                        &st.location,
                    )
                })?;
            let p = Platform::parse(&v)
                .map_err(|e| located(format!("failed to parse platform {v}: {e}"), &st.location))?;
            ds.platform = Some(p);
        }
        if !st.name.is_empty() {
            let p = ds
                .platform
                .clone()
                .unwrap_or_else(|| target_platform.clone());
            if let Some(nc) = resolver
                .context_by_name(&st.name, &opt.image_resolve_mode, &p)
                .await
                .map_err(|e| e.with_lines(&st.location))?
            {
                ds.noinit = true;
                ds.state = nc.state;
                if let Some(mut img) = nc.image {
                    clamp_times(&mut img, opt.source_date_epoch.as_deref());
                    if !img.architecture.is_empty() && !img.os.is_empty() {
                        ds.platform = Some(Platform {
                            os: img.os.clone(),
                            architecture: img.architecture.clone(),
                            variant: img.variant.clone(),
                        });
                    }
                    ds.image = img;
                }
                all.add(ds);
                continue;
            }
        }
        if st.name.is_empty() {
            ds.stage_name = format!("stage-{i}");
        }
        let mut total = 0;
        if ds.stage.base_name != EMPTY_IMAGE_NAME && !all.by_name.contains_key(&ds.stage.base_name)
        {
            total = 1;
        }
        for c in &ds.stage.commands {
            if matches!(
                c,
                Command::Add(_) | Command::Copy(_) | Command::Run(_) | Command::Workdir(..)
            ) {
                total += 1;
            }
        }
        ds.cmd_total = total;
        if let Some(ic) = &opt.ignore_cache {
            if ic.is_empty() {
                ds.ignore_cache = true;
            } else if !st.name.is_empty() {
                ds.ignore_cache = ic.iter().any(|n| n.eq_ignore_ascii_case(&st.name));
            }
        }
        all.add(ds);
    }
    if all.states.is_empty() {
        return Err(plain("file with no instructions"));
    }

    let target = if opt.target.is_empty() {
        all.states.len() - 1
    } else {
        all.find(&opt.target)
            .ok_or_else(|| plain(format!("target stage {} could not be found", opt.target)))?
    };

    // commands and their sources (stage dependencies)
    let mut i = 0;
    while i < all.states.len() {
        let cmds = std::mem::take(&mut all.states[i].stage.commands);
        let mut out = vec![];
        for c in cmds {
            let cmd = to_command(c, &mut all)?;
            for &s in &cmd.sources {
                all.states[i].deps.insert(s);
            }
            out.push(cmd);
        }
        all.states[i].commands = Arc::new(out);
        i += 1;
    }
    if let Some(name) = circular(&all) {
        return Err(plain(format!(
            "circular dependency detected on stage: {name}"
        )));
    }
    if all.states.len() == 1 {
        all.states[0].stage_name = String::new();
    }
    let all_stage_names: Vec<String> = all
        .states
        .iter()
        .filter(|s| !s.stage_name.is_empty())
        .map(|s| s.stage_name.clone())
        .collect();

    // resolve base images of reachable stages
    for i in 0..all.states.len() {
        let reachable = all.reachable(target, i);
        let d = &mut all.states[i];
        if d.base.is_some() || d.noinit {
            continue;
        }
        if d.stage.base_name == EMPTY_IMAGE_NAME {
            d.state = llb::scratch().with_platform(
                d.platform
                    .clone()
                    .unwrap_or_else(|| target_platform.clone())
                    .to_llb(),
            );
            d.image = Image::empty(
                &target_platform.os,
                &target_platform.architecture,
                &target_platform.variant,
            );
            continue;
        }
        let loc = d.stage.location.clone();
        let orig_name = d.stage.base_name.clone();
        let named = normalize_image_name(&orig_name).map_err(|e| {
            located(
                format!("failed to parse stage name {}: {e}", go_quote(&orig_name)),
                &loc,
            )
        })?;
        let mut platform = d
            .platform
            .clone()
            .unwrap_or_else(|| target_platform.clone());
        d.stage.base_name = named.clone();
        if let Some(nc) = resolver
            .context_by_name(&named, &opt.image_resolve_mode, &platform)
            .await
            .map_err(|e| e.with_lines(&loc))?
        {
            let d = &mut all.states[i];
            d.image = nc.image.unwrap_or_else(|| {
                Image::empty(
                    &target_platform.os,
                    &target_platform.architecture,
                    &target_platform.variant,
                )
            });
            d.state = nc.state.with_platform(platform.to_llb());
            d.platform = Some(platform);
            continue;
        }
        if !reachable {
            continue;
        }
        let mut prefix = "[".to_string();
        if opt.prefix_platform {
            prefix.push_str(&platform.format());
            prefix.push(' ');
        }
        prefix.push_str("internal]");
        let log_name = format!("{prefix} load metadata for {named}");
        let (dgst, config) = match resolver
            .resolve_image_config(&named, &platform, &opt.image_resolve_mode, &log_name)
            .await
        {
            Ok(v) => v,
            Err(e) => {
                let mut options: Vec<String> = all_stage_names.clone();
                options.extend(common_image_names());
                let opts: Vec<&str> = options.iter().map(String::as_str).collect();
                let msg = format!("{orig_name}: {e}");
                let msg = crate::suggest::wrap(msg, &orig_name, &opts, true);
                return Err(e.rewrap(msg).with_lines(&loc));
            }
        };
        let d = &mut all.states[i];
        let mut img: Image = serde_json::from_slice(&config)
            .map_err(|e| located(format!("failed to parse image config: {e}"), &loc))?;
        img.created = None;
        if d.platform.is_none() && implicit_target {
            platform = auto_detect_platform(&img, &platform, &build_platforms);
        }
        let mut reference = named.clone();
        if !dgst.is_empty() {
            reference = match reference.split_once('@') {
                Some((n, _)) => format!("{n}@{dgst}"),
                None => format!("{reference}@{dgst}"),
            };
        }
        d.stage.base_name = reference.clone();
        let mut is_scratch = false;
        if img.rootfs.diff_ids.as_ref().is_none_or(|v| v.is_empty()) {
            is_scratch = img.history.iter().all(|h| h.empty_layer);
        }
        d.image = img;
        if is_scratch {
            d.state = llb::scratch().with_platform(platform.to_llb());
        } else {
            let mut ib = llb::image(&reference).platform(platform.to_llb());
            if !opt.image_resolve_mode.is_empty() && opt.image_resolve_mode != "default" {
                ib = ib.resolve_mode(opt.image_resolve_mode.clone());
            }
            let name = prefix_command(
                d,
                &format!("FROM {reference}"),
                opt.prefix_platform,
                Some(&platform),
            );
            let mut st = ib
                .state()
                .description(
                    "com.docker.dockerfile.v1.command",
                    d.stage.source_code.clone(),
                )
                .custom_name(name);
            if let Some(sm) = &opt.source_map {
                st = st.location(sm, pb_ranges(&d.stage.location));
            }
            d.state = st;
        }
        d.platform = Some(platform);
    }

    // Two passes: the first learns the context paths, the second uses them. A given context
    // needs no paths. The paths-only pass skips checks of the full one; when it fails, the
    // full pass with a stand-in context reports the error a full first pass reports.
    let build_context = match &opt.build_context {
        Some(bc) => bc.clone(),
        None => {
            let first = |paths_only| {
                dispatch_all(
                    &all,
                    target,
                    opt,
                    &opt_meta_args,
                    shlex,
                    &target_platform,
                    &proxy_env,
                    llb::local(ctx_name(opt)).state(),
                    paths_only,
                )
            };
            let paths = match first(true) {
                Ok((_, paths)) => paths,
                Err(_) => first(false)?.1,
            };
            let mut l = llb::local(ctx_name(opt))
                .session_id(opt.session_id.clone())
                .exclude(opt.excludes.clone())
                .shared_key_hint(ctx_name(opt));
            if let Some(paths) = normalize_context_paths(&paths) {
                l = l.follow_paths(paths);
            }
            l.state().custom_name("[internal] load build context")
        }
    };
    let (mut states, _) = dispatch_all(
        &all,
        target,
        opt,
        &opt_meta_args,
        shlex,
        &target_platform,
        &proxy_env,
        build_context.clone(),
        false,
    )?;
    let sbom = sbom_targets(&all, &states, target, &opt_meta_args, build_context);
    let mut t = states.swap_remove(target);
    if !opt.labels.is_empty() {
        let labels = t.image.config.labels.get_or_insert_with(Default::default);
        for (k, v) in &opt.labels {
            labels.insert(k.clone(), v.clone());
        }
    }
    if !implicit_target {
        t.image.os = target_platform.os.clone();
        t.image.architecture = target_platform.architecture.clone();
        t.image.variant = target_platform.variant.clone();
    }
    Ok(Converted {
        state: t.state,
        image: t.image,
        warnings,
        sbom,
    })
}

/// The [`SbomTargets`] of the dispatched `states` for `target`.
fn sbom_targets(
    all: &States,
    states: &[DispatchState],
    target: usize,
    meta_args: &[KeyValuePairOptional],
    build_context: llb::State,
) -> SbomTargets {
    // The last value among the global ARGs and then the stage's own (`isEnabledForStage`).
    let enabled = |d: &DispatchState, key: &str| {
        let value = meta_args
            .iter()
            .chain(&d.build_args)
            .rfind(|a| a.key == key)
            .map(|a| a.value.clone().unwrap_or_default());
        value.is_some_and(|v| match v.as_str() {
            "1" | "t" | "T" | "TRUE" | "true" | "True" => true,
            "0" | "f" | "F" | "FALSE" | "false" | "False" => false,
            list => list.split(',').any(|s| s == d.stage_name),
        })
    };
    let t = &states[target];
    let mut sbom = SbomTargets {
        ignore_cache: t.ignore_cache,
        ..Default::default()
    };
    if enabled(t, "BUILDKIT_SBOM_SCAN_CONTEXT") {
        sbom.extras.insert("context".into(), build_context);
    }
    for (i, d) in states.iter().enumerate() {
        if i == target || d.noinit || !all.reachable(target, i) {
            continue;
        }
        if enabled(d, "BUILDKIT_SBOM_SCAN_STAGE") {
            sbom.extras.insert(d.stage_name.clone(), d.state.clone());
            sbom.ignore_cache |= d.ignore_cache;
        }
    }
    sbom
}

/// Nanoseconds since the epoch of an RFC 3339 time (`Z` or `±hh:mm`, optional fraction).
fn rfc3339_nanos(s: &str) -> Option<i128> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut i = 19;
    let mut frac: i128 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = s.get(start..i)?;
        let padded = format!("{:0<9}", &digits[..digits.len().min(9)]);
        frac = padded.parse().ok()?;
    }
    let offset = match s.get(i..)? {
        "Z" | "z" => 0,
        tz if tz.len() == 6 => {
            let sign = if tz.starts_with('-') { -1 } else { 1 };
            sign * (tz.get(1..3)?.parse::<i64>().ok()? * 3600
                + tz.get(4..6)?.parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    // days from civil (Howard Hinnant's algorithm)
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
    Some(secs as i128 * 1_000_000_000 + frac)
}

/// `clampTimes`: image and history times after `SOURCE_DATE_EPOCH` become it.
pub(crate) fn clamp_times(img: &mut Image, epoch: Option<&str>) {
    let Some(epoch) = epoch else { return };
    let Some(limit) = rfc3339_nanos(epoch) else {
        return;
    };
    let after = |t: &str| rfc3339_nanos(t).is_some_and(|n| n > limit);
    for h in &mut img.history {
        if h.created.as_deref().is_none_or(after) {
            h.created = Some(epoch.to_string());
        }
    }
    if img.created.as_deref().is_some_and(after) {
        img.created = Some(epoch.to_string());
    }
}

fn ctx_name(opt: &ConvertOpt) -> String {
    if opt.context_local_name.is_empty() {
        "context".into()
    } else {
        opt.context_local_name.clone()
    }
}

#[allow(clippy::too_many_arguments)]
fn dispatch_all(
    all: &States,
    target: usize,
    opt: &ConvertOpt,
    meta_args: &[KeyValuePairOptional],
    shlex: Lex,
    target_platform: &Platform,
    proxy_env: &[(String, String)],
    build_context: llb::State,
    paths_only: bool,
) -> Result<(Vec<DispatchState>, BTreeSet<String>), Error> {
    let mut states: Vec<DispatchState> = all.states.clone();
    let mut ctx_paths = BTreeSet::new();
    let dopt = DispatchOpt {
        meta_args: meta_args.to_vec(),
        build_arg_values: &opt.build_args,
        shlex,
        build_context,
        opt,
        target_platform: target_platform.clone(),
        proxy_env: proxy_env.to_vec(),
        paths_only,
    };
    for i in 0..states.len() {
        if !all.reachable(target, i) || states[i].noinit {
            continue;
        }
        if let Some(b) = states[i].base {
            let base = &states[b];
            let (state, platform, image) = (
                base.state.clone(),
                base.platform.clone(),
                base.image.clone(),
            );
            let d = &mut states[i];
            d.state = state;
            d.platform = platform;
            d.image = image;
        }
        let d = &mut states[i];
        if !d
            .image
            .config
            .env
            .iter()
            .any(|e| e.split('=').next() == Some("PATH"))
        {
            let os = d.platform.as_ref().map(|p| p.os.as_str()).unwrap_or("");
            d.image
                .config
                .env
                .push(format!("PATH={}", super::image::default_path(os)));
        }
        for e in &d.image.config.env {
            let (k, v) = e.split_once('=').unwrap_or((e.as_str(), ""));
            update(&mut d.state, |s| s.env(k, v));
        }
        let p = d.platform.as_ref().unwrap_or(target_platform).to_llb();
        update(&mut d.state, |s| s.with_platform(p));
        let loc = d.stage.location.clone();
        if !d.image.config.working_dir.is_empty() {
            let wd = d.image.config.working_dir.clone();
            dispatch_workdir(d, &wd, "", &[], false, &dopt).map_err(|e| with_location(e, &loc))?;
        }
        if !d.image.config.user.is_empty() {
            let u = d.image.config.user.clone();
            update(&mut d.state, |s| s.user(u));
        }
        let triggers = d.image.config.on_build.take().unwrap_or_default();
        for trigger in triggers {
            dispatch_trigger(&mut states, i, &trigger, all, &dopt)
                .map_err(|e| with_location(e, &loc))?;
        }
        let cmds = states[i].commands.clone();
        for cmd in cmds.iter() {
            if paths_only && !affects_context_paths(&cmd.command) {
                continue;
            }
            dispatch(&mut states, i, cmd.clone(), &dopt)
                .map_err(|e| with_location(e, cmd.command.location()))?;
        }
        ctx_paths.extend(states[i].ctx_paths.iter().cloned());
    }
    Ok((states, ctx_paths))
}

fn dispatch_trigger(
    states: &mut [DispatchState],
    i: usize,
    trigger: &str,
    all: &States,
    dopt: &DispatchOpt<'_>,
) -> Result<(), Error> {
    let ast = parser::parse(trigger.as_bytes()).map_err(|e| plain(e.message))?;
    if ast.children.len() != 1 {
        return Err(plain("onbuild trigger should be a single expression"));
    }
    let ic = instructions::parse_command(&ast.children[0]).map_err(|e| plain(e.message))?;
    let mut tmp = States {
        states: all.states.clone(),
        by_name: all.by_name.clone(),
    };
    let cmd = to_command(ic, &mut tmp)?;
    if cmd.sources.iter().any(|&s| s >= states.len()) {
        return Err(plain(
            "ONBUILD trigger refers to an image that is not a stage of this Dockerfile",
        ));
    }
    dispatch(states, i, cmd, dopt)
}

fn to_command(c: Command, all: &mut States) -> Result<Cmd, Error> {
    let mut sources = vec![];
    match &c {
        Command::Copy(cc) if !cc.from.is_empty() => {
            let idx = match cc.from.parse::<i64>() {
                Ok(n) => {
                    if n < 0 || n as usize >= all.states.len() {
                        return Err(plain(format!("invalid stage index {n}")));
                    }
                    n as usize
                }
                Err(_) => match all.find(&cc.from) {
                    Some(i) => i,
                    None => unregistered(all, &cc.from, &cc.meta.location),
                },
            };
            sources.push(idx);
        }
        Command::Run(r) => {
            for m in &r.mounts {
                let from = if m.from.is_empty() {
                    EMPTY_IMAGE_NAME
                } else {
                    m.from.as_str()
                };
                let idx = match all.find(from) {
                    Some(i) => i,
                    None => unregistered(all, from, &[]),
                };
                sources.push(idx);
            }
        }
        _ => {}
    }
    Ok(Cmd {
        command: c,
        sources,
    })
}

fn unregistered(all: &mut States, base: &str, location: &[Range]) -> usize {
    // the same image named twice is one state
    if let Some(i) = all
        .states
        .iter()
        .position(|s| s.unregistered && s.stage.base_name == base)
    {
        return i;
    }
    let mut ds = DispatchState::new(Stage {
        base_name: base.to_string(),
        location: location.to_vec(),
        ..Default::default()
    });
    ds.stage_name = String::new();
    ds.unregistered = true;
    all.add(ds)
}

fn circular(all: &States) -> Option<String> {
    fn visit(
        all: &States,
        s: usize,
        visited: &mut BTreeSet<usize>,
        path: &mut BTreeSet<usize>,
    ) -> bool {
        if !visited.insert(s) {
            return false;
        }
        path.insert(s);
        for &d in &all.states[s].deps {
            if path.contains(&d) || visit(all, d, visited, path) {
                return true;
            }
        }
        path.remove(&s);
        false
    }
    let mut visited = BTreeSet::new();
    for s in 0..all.states.len() {
        let mut path = BTreeSet::new();
        if visit(all, s, &mut visited, &mut path) {
            return Some(all.states[s].stage_name.clone());
        }
    }
    None
}

fn normalize_context_paths(paths: &BTreeSet<String>) -> Option<Vec<String>> {
    let mut out = vec![];
    for p in paths {
        if p == "/" {
            return None;
        }
        out.push(join(&[".", p]));
    }
    out.sort();
    Some(out)
}

fn proxy_env(args: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let mut out = vec![];
    for (k, v) in args {
        let l = k.to_lowercase();
        let key = match l.as_str() {
            "http_proxy" => "HTTP_PROXY",
            "https_proxy" => "HTTPS_PROXY",
            "ftp_proxy" => "FTP_PROXY",
            "no_proxy" => "NO_PROXY",
            "all_proxy" => "ALL_PROXY",
            _ => continue,
        };
        out.push((key.to_string(), v.clone()));
    }
    out
}

fn auto_detect_platform(img: &Image, target: &Platform, supported: &[Platform]) -> Platform {
    if target.os == img.os && target.architecture == img.architecture {
        return target.clone();
    }
    for p in supported {
        if p.os == img.os && p.architecture == img.architecture {
            return p.clone();
        }
    }
    target.clone()
}

fn common_image_names() -> Vec<String> {
    let mut out = vec![];
    for name in [
        "alpine", "busybox", "centos", "debian", "golang", "ubuntu", "fedora",
    ] {
        out.push(name.to_string());
        out.push(format!("docker.io/library{name}"));
        out.push(format!("{name}:latest"));
        out.push(format!("docker.io/library{name}:latest"));
    }
    out
}

fn pb_ranges(r: &[Range]) -> Vec<llb::pb::Range> {
    r.iter()
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

fn prefix_command(
    ds: &mut DispatchState,
    s: &str,
    prefix_platform: bool,
    platform: Option<&Platform>,
) -> String {
    if ds.cmd_total == 0 {
        return s.to_string();
    }
    let mut out = "[".to_string();
    if prefix_platform {
        if let Some(p) = platform {
            out.push_str(&p.format());
            out.push(' ');
        }
    }
    if !ds.stage_name.is_empty() {
        out.push_str(&ds.stage_name);
        out.push(' ');
    }
    ds.cmd_index += 1;
    let width = 1 + (ds.cmd_total as f64).log10() as usize;
    out.push_str(&format!(
        "{:>width$}/{}] ",
        ds.cmd_index,
        ds.cmd_total,
        width = width
    ));
    out + s
}

fn uppercase_cmd(s: &str) -> String {
    match s.split_once(' ') {
        Some((a, b)) => format!("{} {b}", a.to_uppercase()),
        None => s.to_uppercase(),
    }
}

fn process_cmd_env(shlex: &Lex, cmd: &str, env: &impl Lookup) -> String {
    shlex
        .process_word_with_map(cmd, env)
        .unwrap_or_else(|_| cmd.to_string())
}

fn commit_to_history(d: &mut DispatchState, msg: String, with_layer: bool, buildkit: bool) {
    let msg = if buildkit {
        format!("{msg} # buildkit")
    } else {
        msg
    };
    let created = d.epoch.clone();
    d.image.history.push(History {
        created,
        created_by: msg,
        comment: HISTORY_COMMENT.into(),
        empty_layer: !with_layer,
        ..Default::default()
    });
}

fn add_env(env: &mut Vec<String>, k: &str, v: &str) {
    for e in env.iter_mut() {
        let key = e.split_once('=').map(|x| x.0).unwrap_or(e.as_str());
        if key == k {
            *e = format!("{k}={v}");
            return;
        }
    }
    env.push(format!("{k}={v}"));
}

/// Go's `withShell`: the image's `SHELL`, else the default one of its OS (`cmd /S /C` on
/// Windows).
fn with_shell(img: &Image, args: &[String]) -> Vec<String> {
    let mut shell = if img.config.shell.is_empty() && img.os == "windows" {
        ["cmd", "/S", "/C"].map(String::from).to_vec()
    } else if img.config.shell.is_empty() {
        vec!["/bin/sh".to_string(), "-c".to_string()]
    } else {
        img.config.shell.clone()
    };
    shell.push(args.join(" "));
    shell
}

/// Go's `user[:group]` → `ChownOpt` (`llb.WithUser`).
fn chown_opt(s: &str) -> llb::ChownOpt {
    let one = |v: &str| match v.parse::<u32>() {
        Ok(n) => llb::UserOpt::ById(n),
        Err(_) => llb::UserOpt::ByName(v.to_string()),
    };
    let mut parts = s.splitn(2, ':');
    let user = parts.next().map(one);
    let group = parts.next().map(one);
    llb::ChownOpt { user, group }
}

fn dispatch(
    states: &mut [DispatchState],
    i: usize,
    mut cmd: Cmd,
    dopt: &DispatchOpt<'_>,
) -> Result<(), Error> {
    if dopt.paths_only && !affects_context_paths(&cmd.command) {
        return Ok(());
    }
    {
        // The environment is looked up in place (building a map of it for every command, or
        // worse every word, was most of the conversion of a 200-line Dockerfile).
        let env = states[i].env();
        let shlex = dopt.shlex;
        let word = |w: &str| {
            shlex
                .process_word_with_map(w, &env)
                .map_err(|e| e.to_string())
        };
        let mut raw_lex = Lex::new('\\');
        raw_lex.skip_process_quotes = true;
        let raw = |w: &str| {
            raw_lex
                .process_word_with_map(w, &env)
                .map_err(|e| e.to_string())
        };
        cmd.command.expand(&word, &raw).map_err(plain)?;
    }
    let sources = cmd.sources.clone();
    match cmd.command {
        Command::Maintainer(_, m) => {
            let d = &mut states[i];
            d.image.author = m.clone();
            commit_to_history(d, format!("MAINTAINER {m}"), false, false);
        }
        Command::Env(_, kvs) => {
            let d = &mut states[i];
            let mut msg = "ENV".to_string();
            for kv in kvs {
                msg.push_str(&format!(" {kv}"));
                update(&mut d.state, |s| s.env(&kv.key, &kv.value));
                add_env(&mut d.image.config.env, &kv.key, &kv.value);
            }
            commit_to_history(d, msg, false, false);
        }
        Command::Run(r) if dopt.paths_only => run_context_paths(&mut states[i], &r),
        Command::Run(r) => dispatch_run(states, i, r, &sources, dopt)?,
        Command::Workdir(m, p) => {
            let d = &mut states[i];
            dispatch_workdir(d, &p, &m.code, &m.location, true, dopt)?;
        }
        Command::Add(a) => {
            if dopt.paths_only {
                for src in &a.sources.source_paths {
                    if !is_http(src) {
                        states[i].ctx_paths.insert(join(&["/", src]));
                    }
                }
                return Ok(());
            }
            let cfg = CopyConfig {
                params: a.sources.clone(),
                source: dopt.build_context.clone(),
                is_add: true,
                cmd_to_print: a.meta.code.clone(),
                chown: a.chown.clone(),
                chmod: a.chmod.clone(),
                link: a.link,
                checksum: a.checksum.clone(),
                location: a.meta.location.clone(),
            };
            dispatch_copy(&mut states[i], cfg, dopt)?;
            for src in &a.sources.source_paths {
                if !is_http(src) {
                    states[i].ctx_paths.insert(join(&["/", src]));
                }
            }
        }
        Command::Copy(c) => {
            if dopt.paths_only {
                if sources.is_empty() {
                    for src in &c.sources.source_paths {
                        states[i].ctx_paths.insert(join(&["/", src]));
                    }
                }
                return Ok(());
            }
            let source = match sources.first() {
                Some(&s) => states[s].state.clone(),
                None => dopt.build_context.clone(),
            };
            let cfg = CopyConfig {
                params: c.sources.clone(),
                source,
                is_add: false,
                cmd_to_print: c.meta.code.clone(),
                chown: c.chown.clone(),
                chmod: c.chmod.clone(),
                link: c.link,
                checksum: String::new(),
                location: c.meta.location.clone(),
            };
            dispatch_copy(&mut states[i], cfg, dopt)?;
            if sources.is_empty() {
                for src in &c.sources.source_paths {
                    states[i].ctx_paths.insert(join(&["/", src]));
                }
            }
        }
        Command::Label(_, kvs, _) => {
            let d = &mut states[i];
            let mut msg = "LABEL".to_string();
            let labels = d.image.config.labels.get_or_insert_with(Default::default);
            for kv in kvs {
                labels.insert(kv.key.clone(), kv.value.clone());
                msg.push_str(&format!(" {kv}"));
            }
            commit_to_history(d, msg, false, false);
        }
        Command::Onbuild(_, expr) => {
            let d = &mut states[i];
            d.image
                .config
                .on_build
                .get_or_insert_with(Vec::new)
                .push(expr);
        }
        Command::Cmd(_, c) => {
            let d = &mut states[i];
            let args = if c.prepend_shell {
                with_shell(&d.image, &c.cmd_line)
            } else {
                c.cmd_line.clone()
            };
            d.image.config.cmd = args.clone();
            d.image.config.args_escaped = true;
            d.cmd_set = true;
            commit_to_history(d, format!("CMD {}", go_quote_list(&args)), false, false);
        }
        Command::Entrypoint(_, c) => {
            let d = &mut states[i];
            let args = if c.prepend_shell {
                with_shell(&d.image, &c.cmd_line)
            } else {
                c.cmd_line.clone()
            };
            d.image.config.entrypoint = args.clone();
            if !d.cmd_set {
                d.image.config.cmd = vec![];
            }
            commit_to_history(
                d,
                format!("ENTRYPOINT {}", go_quote_list(&args)),
                false,
                false,
            );
        }
        Command::Healthcheck(_, h) => {
            let d = &mut states[i];
            d.image.config.healthcheck = Some(HealthConfig {
                test: h.test.clone(),
                interval: h.interval,
                timeout: h.timeout,
                start_period: h.start_period,
                retries: h.retries,
            });
            let msg = format!(
                "HEALTHCHECK &{{{} {} {} {} {}}}",
                go_quote_list(&h.test),
                go_quote(&support::go_duration(h.interval)),
                go_quote(&support::go_duration(h.timeout)),
                go_quote(&support::go_duration(h.start_period)),
                support::go_quote_rune(h.retries)
            );
            commit_to_history(d, msg, false, false);
        }
        Command::Expose(_, ports) => {
            let mut all_ports = vec![];
            for p in &ports {
                let ps = dopt
                    .shlex
                    .process_words_with_map(p, &states[i].env())
                    .map_err(|e| plain(e.to_string()))?;
                all_ports.extend(ps);
            }
            let ps = support::parse_port_specs(&all_ports).map_err(plain)?;
            let d = &mut states[i];
            let exposed = d
                .image
                .config
                .exposed_ports
                .get_or_insert_with(Default::default);
            for p in &ps {
                exposed.insert(p.clone(), Default::default());
            }
            let items: Vec<String> = ps.iter().map(|p| format!("{p}:{{}}")).collect();
            commit_to_history(d, format!("EXPOSE map[{}]", items.join(" ")), false, false);
        }
        Command::User(_, u) => {
            let d = &mut states[i];
            update(&mut d.state, |s| s.user(u.clone()));
            d.image.config.user = u.clone();
            commit_to_history(d, format!("USER {u}"), false, false);
        }
        Command::Volume(_, vols) => {
            let d = &mut states[i];
            let map = d.image.config.volumes.get_or_insert_with(Default::default);
            for v in &vols {
                if v.is_empty() {
                    return Err(plain("VOLUME specified can not be an empty string"));
                }
                map.insert(v.clone(), Default::default());
            }
            commit_to_history(d, format!("VOLUME [{}]", vols.join(" ")), false, false);
        }
        Command::StopSignal(_, s) => {
            support::parse_signal(&s).map_err(plain)?;
            let d = &mut states[i];
            d.image.config.stop_signal = s.clone();
            commit_to_history(d, format!("STOPSIGNAL {s}"), false, false);
        }
        Command::Shell(_, sh) => {
            let d = &mut states[i];
            d.image.config.shell = sh.clone();
            commit_to_history(d, format!("SHELL [{}]", sh.join(" ")), false, false);
        }
        Command::Arg(_, args) => {
            let d = &mut states[i];
            let mut commit = vec![];
            for arg in args {
                let mut build_arg = arg.clone();
                if let Some(v) = dopt.build_arg_values.get(&arg.key) {
                    build_arg.value = Some(v.clone());
                }
                let mut s = arg.key.clone();
                if let Some(v) = &arg.value {
                    s.push('=');
                    s.push_str(v);
                }
                commit.push(s);
                if build_arg.value.is_none() {
                    for ma in &dopt.meta_args {
                        if ma.key == build_arg.key {
                            build_arg.value = ma.value.clone();
                        }
                    }
                }
                if let Some(v) = &build_arg.value {
                    if build_arg.key != "BUILDKIT_SBOM_SCAN_CONTEXT"
                        && build_arg.key != "BUILDKIT_SBOM_SCAN_STAGE"
                    {
                        update(&mut d.state, |s| s.env(&build_arg.key, v));
                    }
                }
                d.build_args.push(build_arg);
            }
            commit_to_history(d, format!("ARG {}", commit.join(" ")), false, false);
        }
    }
    Ok(())
}

/// Whether the paths-only pass dispatches `c`: it reads the context, or changes what later
/// instructions expand with (the environment) or run (`ONBUILD` triggers of a child stage).
fn affects_context_paths(c: &Command) -> bool {
    matches!(
        c,
        Command::Env(..)
            | Command::Arg(..)
            | Command::Add(_)
            | Command::Copy(_)
            | Command::Run(_)
            | Command::Onbuild(..)
    )
}

fn is_http(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

fn dispatch_workdir(
    d: &mut DispatchState,
    path: &str,
    code: &str,
    location: &[Range],
    commit: bool,
    dopt: &DispatchOpt<'_>,
) -> Result<(), Error> {
    update(&mut d.state, |s| s.dir(path));
    let wd = if path.starts_with('/') {
        path.to_string()
    } else {
        join(&["/", &d.image.config.working_dir, path])
    };
    d.image.config.working_dir = wd.clone();
    if commit && dopt.paths_only {
        return Ok(());
    }
    if commit {
        let mut with_layer = false;
        if wd != "/" {
            let mut mk = llb::MkdirOpts::default().parents(true);
            if !d.image.config.user.is_empty() {
                mk = mk.owner(chown_opt(&d.image.config.user));
            }
            let platform = d
                .platform
                .clone()
                .unwrap_or_else(|| dopt.target_platform.clone());
            let expanded = uppercase_cmd(&process_cmd_env(&dopt.shlex, code, &d.env()));
            let name = prefix_command(d, &expanded, dopt.opt.prefix_platform, Some(&platform));
            let mut st = d
                .state
                .file(llb::mkdir(wd.clone(), 0o755, mk))
                .custom_name(name);
            if let Some(sm) = &dopt.opt.source_map {
                st = st.location(sm, pb_ranges(location));
            }
            if d.ignore_cache {
                st = st.ignore_cache();
            }
            d.state = st;
            with_layer = true;
        }
        commit_to_history(d, format!("WORKDIR {wd}"), with_layer, false);
    }
    Ok(())
}

struct CopyConfig {
    params: instructions::SourcesAndDest,
    source: llb::State,
    is_add: bool,
    cmd_to_print: String,
    chown: String,
    chmod: String,
    link: bool,
    checksum: String,
    location: Vec<Range>,
}

fn dispatch_copy(
    d: &mut DispatchState,
    cfg: CopyConfig,
    dopt: &DispatchOpt<'_>,
) -> Result<(), Error> {
    let dest_path = &cfg.params.dest_path;
    let pp = if dest_path.starts_with('/') {
        dest_path.clone()
    } else {
        join(&[d.state.get_dir(), dest_path])
    };
    let mut dest = join(&["/", &pp]);
    if dest_path == "." || dest_path.is_empty() || dest_path.ends_with('/') {
        dest.push('/');
    }
    let owner = (!cfg.chown.is_empty()).then(|| chown_opt(&cfg.chown));
    let mode = if cfg.chmod.is_empty() {
        None
    } else {
        u32::from_str_radix(&cfg.chmod, 8).ok()
    };
    if !cfg.checksum.is_empty() {
        if !cfg.is_add {
            return Err(plain("checksum can't be specified for COPY"));
        }
        return Err(plain(
            "instruction 'ADD --checksum=<CHECKSUM>' requires the labs channel",
        ));
    }
    let mut msg = if cfg.is_add { "ADD" } else { "COPY" }.to_string();
    let mut action: Option<llb::FileAction> = None;
    let push =
        |a: &mut Option<llb::FileAction>, from: llb::State, src: String, opts: llb::CopyOpts| {
            *a = Some(match a.take() {
                None => llb::copy(from, src, dest.clone(), opts),
                Some(x) => x.copy(from, src, dest.clone(), opts),
            });
        };
    let with_owner = |mut o: llb::CopyOpts| {
        if let Some(m) = mode {
            o = o.mode(m);
        }
        if let Some(ow) = &owner {
            o = o.owner(ow.clone());
        }
        o
    };
    for src in &cfg.params.source_paths {
        msg.push(' ');
        msg.push_str(src);
        if is_git_ref(src) {
            if !cfg.is_add {
                return Err(plain("source can't be a git ref for COPY"));
            }
            return Err(plain("instruction ADD <git ref> requires the labs channel"));
        }
        if is_http(src) {
            if !cfg.is_add {
                return Err(plain("source can't be a URL for COPY"));
            }
            let path = url_path(src);
            let base = path.rsplit('/').find(|s| !s.is_empty()).unwrap_or("");
            let f = if base.is_empty() || base == "." {
                "__unnamed__".to_string()
            } else {
                base.to_string()
            };
            let st = llb::http(src.clone())
                .filename(f.clone())
                .state()
                .description("com.docker.dockerfile.v1.command", String::new());
            push(
                &mut action,
                st,
                f,
                with_owner(llb::CopyOpts::default().create_dest_path(true)),
            );
        } else {
            push(
                &mut action,
                cfg.source.clone(),
                clean(&format!("/{src}")),
                with_owner(
                    llb::CopyOpts::default()
                        .follow_symlinks(true)
                        .dir_contents_only(true)
                        .attempt_unpack(cfg.is_add)
                        .create_dest_path(true)
                        .allow_wildcard(true)
                        .allow_empty_wildcard(true),
                ),
            );
        }
    }
    for sc in &cfg.params.source_contents {
        msg.push_str(&format!(" <<{}", sc.path));
        let st = llb::scratch()
            .file(llb::mkfile(
                sc.path.clone(),
                0o664,
                sc.data.clone().into_bytes(),
                Default::default(),
            ))
            .custom_name("[internal] preparing inline document");
        push(
            &mut action,
            st,
            sc.path.clone(),
            with_owner(llb::CopyOpts::default().create_dest_path(true)),
        );
    }
    msg.push(' ');
    msg.push_str(&cfg.params.dest_path);
    let Some(action) = action else {
        return Err(plain("no sources to copy"));
    };
    let platform = d
        .platform
        .clone()
        .unwrap_or_else(|| dopt.target_platform.clone());
    let name = uppercase_cmd(&process_cmd_env(&dopt.shlex, &cfg.cmd_to_print, &d.env()));
    let decorate = |st: llb::State, name: String| {
        let mut st = st.custom_name(name);
        if let Some(sm) = &dopt.opt.source_map {
            st = st.location(sm, pb_ranges(&cfg.location));
        }
        st
    };
    if cfg.link && cfg.chmod.is_empty() {
        // Upstream's options for the two ops are copied into nil slices (a no-op), so the copy
        // gets only its progress group and the merge only the group and the `LINK` name.
        let _ = prefix_command(d, &name, dopt.opt.prefix_platform, Some(&platform));
        d.cmd_index -= 1;
        let pg_id = progress_group_id(&name, d.cmd_index);
        let pg_name = prefix_command(d, &name, dopt.opt.prefix_platform, Some(&platform));
        d.cmd_index -= 1;
        let copied = llb::scratch()
            .with_platform(platform.to_llb())
            .file(action)
            .progress_group(pg_id.clone(), pg_name.clone(), true);
        let link_name = prefix_command(
            d,
            &format!("LINK {name}"),
            dopt.opt.prefix_platform,
            Some(&platform),
        );
        let merged = llb::merge(&[d.state.clone(), copied])
            .progress_group(pg_id, pg_name, false)
            .custom_name(link_name);
        d.state = d.state.clone().with_output_of(&merged);
    } else {
        let pname = prefix_command(d, &name, dopt.opt.prefix_platform, Some(&platform));
        let mut st = decorate(d.state.file(action), pname);
        if d.ignore_cache {
            st = st.ignore_cache();
        }
        d.state = st;
    }
    commit_to_history(d, msg, true, true);
    Ok(())
}

/// A stable id for a `COPY --link` progress group (upstream uses a random one; a stable id
/// keeps definitions reproducible and changes nothing a client sees).
fn progress_group_id(name: &str, index: usize) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (name, index).hash(&mut h);
    format!("{:016x}", h.finish())
}

fn url_path(u: &str) -> String {
    let rest = u.split_once("://").map(|x| x.1).unwrap_or(u);
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    match rest.find('/') {
        Some(i) => rest[i..].to_string(),
        None => String::new(),
    }
}

/// `gitutil.ParseGitRef` minus what is indistinguishable from a local path.
fn is_git_ref(s: &str) -> bool {
    if s.starts_with("git://") || s.starts_with("git@") || s.starts_with("ssh://") {
        return true;
    }
    if (s.starts_with("https://") || s.starts_with("http://"))
        && (s.contains(".git#") || s.ends_with(".git"))
    {
        return true;
    }
    s.starts_with("github.com/") && !s.contains("..")
}

fn dispatch_run(
    states: &mut [DispatchState],
    i: usize,
    c: instructions::RunCommand,
    sources: &[usize],
    dopt: &DispatchOpt<'_>,
) -> Result<(), Error> {
    let mut custom_name = c.meta.code.clone();
    let mut args = c.cmd.cmd_line.clone();
    let mut opts_mounts: Vec<llb::Mount> = vec![];
    let d_os = states[i].image.os.clone();
    if !c.cmd.files.is_empty() {
        if args.len() != 1 || !c.cmd.prepend_shell {
            return Err(plain(format!(
                "parsing produced an invalid run command: [{}]",
                args.join(" ")
            )));
        }
        if parser::must_parse_heredoc(&args[0]).is_some() {
            let f0 = &c.cmd.files[0];
            let mut data = f0.data.clone();
            if f0.chomp {
                data = parser::chomp_heredoc_content(&data);
            }
            if d_os != "windows" && f0.data.starts_with("#!") {
                let st = llb::scratch()
                    .dir("/")
                    .file(llb::mkfile(
                        f0.name.clone(),
                        0o755,
                        data.into_bytes(),
                        Default::default(),
                    ))
                    .custom_name("[internal] preparing inline document");
                opts_mounts.push(
                    llb::Mount::bind("/dev/pipes/", &st)
                        .selector("/")
                        .readonly(),
                );
                args = vec![join(&["/dev/pipes/", &f0.name])];
            } else {
                args = vec![data];
            }
            custom_name.push_str(&format!(" ({})", summarize_heredoc(&f0.data)));
        } else {
            let mut full = args[0].clone();
            for f in &c.cmd.files {
                full.push('\n');
                full.push_str(&f.data);
                full.push_str(&f.name);
            }
            args = vec![full];
        }
    }
    if c.cmd.prepend_shell {
        args = with_shell(&states[i].image, &args);
    }
    let mut run = llb::RunOpts::args(args.clone());
    for m in opts_mounts {
        run = run.mount(m);
    }
    for (k, v) in &dopt.proxy_env {
        run = run.proxy_env(k, v);
    }
    // mounts
    for (mi, mount) in c.mounts.iter().enumerate() {
        let mut mount = mount.clone();
        if mount.from.is_empty() && mount.mount_type == "cache" {
            mount.from = EMPTY_IMAGE_NAME.into();
        }
        let mut st = if mount.from.is_empty() {
            dopt.build_context.clone()
        } else {
            states[sources[mi]].state.clone()
        };
        match mount.mount_type.as_str() {
            "secret" => {
                let base = |p: &str| {
                    let c = clean(p);
                    c.rsplit('/')
                        .find(|s| !s.is_empty())
                        .unwrap_or("/")
                        .to_string()
                };
                let mut id = if mount.source.is_empty() {
                    mount.cache_id.clone()
                } else {
                    mount.source.clone()
                };
                if id.is_empty() {
                    if mount.target.is_empty() {
                        return Err(plain("one of source, target required"));
                    }
                    id = base(&mount.target);
                }
                let target = if mount.target.is_empty() {
                    format!("/run/secrets/{}", base(&id))
                } else {
                    mount.target.clone()
                };
                let m = llb::Mount::secret(target, id, !mount.required).file_opt(
                    mount.uid.unwrap_or(0) as u32,
                    mount.gid.unwrap_or(0) as u32,
                    mount.mode.unwrap_or(0o400) as u32,
                );
                run = run.mount(m);
                continue;
            }
            "ssh" => {
                if !mount.source.is_empty() {
                    return Err(plain("ssh does not support source"));
                }
                let id = mount.cache_id.clone();
                let m = llb::Mount::ssh(mount.target.clone(), id, !mount.required).file_opt(
                    mount.uid.unwrap_or(0) as u32,
                    mount.gid.unwrap_or(0) as u32,
                    mount.mode.unwrap_or(0o600) as u32,
                );
                run = run.mount(m);
                continue;
            }
            _ => {}
        }
        let mut target = mount.target.clone();
        if !clean(&mount.target).starts_with('/') {
            target = join(&["/", states[i].state.get_dir(), &mount.target]);
        }
        if target == "/" {
            return Err(plain(format!("invalid mount target {}", go_quote(&target))));
        }
        let src = join(&["/", &mount.source]);
        let mut selector = String::new();
        if src != "/" {
            selector = src.clone();
        } else if mount.uid.is_some() || mount.gid.is_some() || mount.mode.is_some() {
            let mut mk = llb::MkdirOpts::default();
            mk = mk.owner(llb::ChownOpt::ids(
                mount.uid.unwrap_or(0) as u32,
                mount.gid.unwrap_or(0) as u32,
            ));
            st = st
                .file(llb::mkdir("/cache", mount.mode.unwrap_or(0o755) as u32, mk))
                .custom_name("[internal] settings cache mount permissions");
            selector = "/cache".into();
        }
        let m = match mount.mount_type.as_str() {
            "tmpfs" => llb::Mount::tmpfs(target, mount.size_limit),
            "cache" => {
                let sharing = match mount.cache_sharing.as_str() {
                    "private" => llb::CacheSharing::Private,
                    "locked" => llb::CacheSharing::Locked,
                    _ => llb::CacheSharing::Shared,
                };
                let id = if mount.cache_id.is_empty() {
                    clean(&mount.target)
                } else {
                    mount.cache_id.clone()
                };
                let mut m = llb::Mount::cache(
                    target,
                    format!("{}/{}", dopt.opt.cache_id_namespace, id),
                    sharing,
                )
                .cache_source(&st);
                if !selector.is_empty() {
                    m = m.selector(selector);
                }
                if mount.read_only {
                    m = m.readonly();
                }
                m
            }
            _ => {
                let mut m = llb::Mount::bind(target, &st);
                if !selector.is_empty() {
                    m = m.selector(selector);
                }
                if mount.read_only {
                    m = m.readonly();
                } else {
                    m = m.no_output();
                }
                m
            }
        };
        run = run.mount(m);
        if mount.from.is_empty() {
            states[i].ctx_paths.insert(join(&["/", &mount.source]));
        }
    }
    let net = match c.network.as_str() {
        "none" => Some(llb::NetMode::None),
        "host" => Some(llb::NetMode::Host),
        _ => None,
    };
    if let Some(n) = net.or(dopt.opt.force_net_mode) {
        run = run.network(n);
    }
    for (name, soft, hard) in &dopt.opt.ulimits {
        run = run.ulimit(name.clone(), *soft, *hard);
    }
    for (h, ip) in &dopt.opt.extra_hosts {
        run = run.extra_host(h.clone(), ip.clone());
    }
    if dopt.opt.shm_size > 0 {
        run = run.mount(llb::Mount::tmpfs("/dev/shm", dopt.opt.shm_size));
    }
    if !dopt.opt.hostname.is_empty() {
        run = run.hostname(dopt.opt.hostname.clone());
    }
    if !dopt.opt.cgroup_parent.is_empty() {
        run = run.cgroup_parent(dopt.opt.cgroup_parent.clone());
    }
    let mut shlex = dopt.shlex;
    shlex.raw_quotes = true;
    shlex.skip_unset_env = true;
    let expanded = uppercase_cmd(&process_cmd_env(&shlex, &custom_name, &states[i].env()));
    let d = &mut states[i];
    let platform = d
        .platform
        .clone()
        .unwrap_or_else(|| dopt.target_platform.clone());
    let name = prefix_command(d, &expanded, dopt.opt.prefix_platform, Some(&platform));
    // the exec state is dropped first: its root is then the only holder of the new op
    let root = d.state.run(run).root();
    let mut root = root
        .description("com.docker.dockerfile.v1.command", c.meta.code.clone())
        .custom_name(name);
    if let Some(sm) = &dopt.opt.source_map {
        root = root.location(sm, pb_ranges(&c.meta.location));
    }
    if d.ignore_cache {
        root = root.ignore_cache();
    }
    d.state = root;
    let msg = format!("RUN {}", run_command_string(&args, &d.build_args, &d.env()));
    commit_to_history(d, msg, true, true);
    Ok(())
}

/// The context paths `RUN` mounts read (the paths-only pass): the sources of the mounts from
/// the context, except secret and ssh mounts (a cache mount without `from` reads scratch).
fn run_context_paths(d: &mut DispatchState, c: &instructions::RunCommand) {
    for m in &c.mounts {
        let from_context = m.from.is_empty() && m.mount_type != "cache";
        if from_context && m.mount_type != "secret" && m.mount_type != "ssh" {
            d.ctx_paths.insert(join(&["/", &m.source]));
        }
    }
}

fn summarize_heredoc(doc: &str) -> String {
    let doc = doc.trim();
    let doc = doc.replace("\r\n", "\n");
    let mut lines = doc.split('\n');
    let first = lines.next().unwrap_or("").to_string();
    if lines.next().is_some() {
        format!("{first}...")
    } else {
        first
    }
}

fn run_command_string(
    args: &[String],
    build_args: &[KeyValuePairOptional],
    env: &impl Lookup,
) -> String {
    let mut tmp: Vec<String> = vec![];
    for a in build_args {
        let v = env.lookup(&a.key).unwrap_or_else(|| a.value_string());
        tmp.push(format!("{}={v}", a.key));
    }
    if !tmp.is_empty() {
        tmp.insert(0, format!("|{}", tmp.len()));
    }
    tmp.extend(args.iter().cloned());
    tmp.join(" ")
}

#[cfg(test)]
mod state_env_tests {
    use super::*;
    use crate::shell::build_envs;

    #[test]
    fn state_env_answers_as_the_built_map() {
        // keys holding `=` (split at the first one) and later entries shadowing earlier ones
        let env: Vec<(String, String)> = [
            ("A", "1"),
            ("B=x", "2"),
            ("B", "3"),
            ("C", ""),
            ("D=", "4"),
            ("A=y", "5"),
            ("E", "a=b"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let strings: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let map = build_envs(&strings);
        for name in ["A", "B", "C", "D", "E", "F", "", "B=x", "A=y"] {
            assert_eq!(StateEnv(&env).lookup(name), map.lookup(name), "{name}");
        }
    }
}
