//! SLSA v0.2 provenance of a build result (`attest:provenance` /
//! `build-arg:BUILDKIT_ATTEST_PROVENANCE`), as buildkitd v0.11.6 makes it in its solver
//! (`solver/llbsolver/provenance.go`, `provenance/capture.go`, `provenance/predicate.go`,
//! `provenance/buildconfig.go`, `proc/provenance.go`):
//!
//! - **Capture.** A frontend run in berthd records what it asked for ([`Recorder`]): each
//!   `ResolveImageConfig` (reference, platform, digest) and each definition it solved with its
//!   result. The capture of a platform's result is its own definition plus every other
//!   definition the frontend solved (the Dockerfile's own `local` read, for instance), plus the
//!   resolved images (those resolved for every platform of a multi-platform result only for
//!   this one). Per definition, the ops its terminal reaches give the sources (images with the
//!   digest the worker resolved, `local` names, git URLs with the commit, HTTP URLs with the
//!   content digest, credentials in URLs redacted), the secrets and SSH sockets exec ops mount,
//!   and whether an exec op has network access. A direct LLB solve is captured from its
//!   definition with no frontend.
//! - **Predicate.** `buildType` `https://mobyproject.org/buildkit@v1`; materials (images as
//!   `pkg:docker/…` package URLs, then git, then HTTP); `invocation.configSource` from the
//!   `context` (or `contextkey`) and `filename` options; `parameters` (frontend, the options
//!   that can change the result, secrets, SSH, locals); `vcs:*` options as BuildKit metadata;
//!   completeness and `hermetic` as BuildKit states them. `mode=min` (what buildx asks for by
//!   default) drops build args, labels, secrets and SSH; `mode=max` (the default, also `full`)
//!   adds the build steps (`buildConfig`) and the Dockerfile source (`metadata.…#metadata.source`).
//! - The statement is an in-toto attestation of its platform (`provenance.json`, or
//!   `filename=`), `reason=provenance`, `inline-only` as asked, added after any SBOM.
//!
//! Not done: `metadata.…#metadata.layers` (mode=max: each step's layer descriptors, which
//! buildkitd reads from its cache export; berth has no compressed descriptors before the
//! export), provenance of gateway client builds and of frontend images (`gateway.v0`): asking
//! for it there is an error, not a silently missing attestation.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use prost::Message;
use protos::pb;
use serde_json::{json, Map, Value};

use crate::attestations::{Kind, ResultAttestation};
use crate::errors::{Error, Result};
use crate::jobs::BuildResult;
use crate::solver::FsRef;

const BUILD_TYPE: &str = "https://mobyproject.org/buildkit@v1";
/// `predicateType` of the statement.
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v0.2";

/// The `attest:provenance` options of a request (`None`: not asked for). The value is a CSV of
/// `key=value` fields, as BuildKit's `attestations.Parse` reads it.
pub fn requested(
    frontend_attrs: &BTreeMap<String, String>,
) -> Result<Option<BTreeMap<String, String>>> {
    let mut value = None;
    for (k, v) in frontend_attrs {
        let key = k
            .strip_prefix("attest:")
            .or_else(|| k.strip_prefix("build-arg:BUILDKIT_ATTEST_"));
        if key.is_some_and(|k| k.eq_ignore_ascii_case("provenance")) {
            value = Some(v.clone());
        }
    }
    let Some(v) = value else {
        return Ok(None);
    };
    let mut attrs = BTreeMap::new();
    for field in v.split(',').filter(|f| !f.is_empty()) {
        let (k, val) = field.split_once('=').unwrap_or((field, ""));
        attrs.insert(k.to_string(), val.to_string());
    }
    Ok(Some(attrs))
}

/// A platform as an image source names it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Platform {
    /// `os`.
    pub os: String,
    /// `architecture`.
    pub architecture: String,
    /// `variant`.
    pub variant: String,
}

/// An image a build used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSource {
    /// The reference (normalized).
    pub reference: String,
    /// The platform it was resolved for.
    pub platform: Option<Platform>,
    /// `algorithm:hex`.
    pub digest: String,
}

/// What a frontend run in berthd asked for (module docs).
#[derive(Debug, Default)]
pub struct Recorder {
    images: Mutex<Vec<ImageSource>>,
    solved: Mutex<Vec<(pb::Definition, FsRef)>>,
}

impl Recorder {
    /// A `ResolveImageConfig` answered with `digest`.
    pub fn image(&self, reference: &str, platform: Option<Platform>, digest: &str) {
        if digest.is_empty() {
            return;
        }
        let reference = exporter::normalize_name(reference).unwrap_or_else(|_| reference.into());
        self.images.lock().unwrap().push(ImageSource {
            reference,
            platform,
            digest: digest.to_string(),
        });
    }

    /// A definition solved to `fs`.
    pub fn solved(&self, def: &pb::Definition, fs: &FsRef) {
        self.solved.lock().unwrap().push((def.clone(), fs.clone()));
    }

    /// The references the frontend resolved by tag (normalized, no digest) and the digest each
    /// resolved to (the first one): the images whose digested `name:tag@digest` sources
    /// BuildKit reports as `name:tag` (`OptimizeImageSources`), pinned to what the registry
    /// answered even where the worker used Docker's image in place.
    pub fn resolved_tags(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for i in self.images.lock().unwrap().iter() {
            if !i.reference.contains('@') {
                out.entry(i.reference.clone())
                    .or_insert_with(|| i.digest.clone());
            }
        }
        out
    }
}

/// The frontend side of a result's provenance.
#[derive(Debug)]
pub struct Captured {
    /// The frontend's name (empty for a direct LLB solve).
    pub frontend: String,
    /// Its options as the request gave them.
    pub opts: BTreeMap<String, String>,
    /// The request had frontend inputs (their materials are not captured).
    pub has_inputs: bool,
    /// What the frontend asked for.
    pub recorder: Arc<Recorder>,
}

/// Everything a result was built from (BuildKit's `provenance.Capture`).
#[derive(Debug, Default, Clone, PartialEq)]
struct Capture {
    frontend: String,
    args: BTreeMap<String, String>,
    images: Vec<ImageSource>,
    git: Vec<(String, String)>,
    http: Vec<(String, String)>,
    locals: Vec<String>,
    secrets: Vec<(String, bool)>,
    ssh: Vec<(String, bool)>,
    network_access: bool,
    incomplete_materials: bool,
}

impl Capture {
    fn add_image(&mut self, i: ImageSource) {
        let dup = self.images.iter().any(|v| {
            v.reference == i.reference
                && match (&v.platform, &i.platform) {
                    (None, None) => true,
                    (Some(a), Some(b)) => a == b,
                    _ => false,
                }
        });
        if !dup {
            self.images.push(i);
        }
    }

    fn add_secret(&mut self, id: &str, optional: bool) {
        match self.secrets.iter_mut().find(|(v, _)| v == id) {
            Some(s) => s.1 &= optional,
            None => self.secrets.push((id.to_string(), optional)),
        }
    }

    fn add_ssh(&mut self, id: &str, optional: bool) {
        let id = if id.is_empty() { "default" } else { id };
        match self.ssh.iter_mut().find(|(v, _)| v == id) {
            Some(s) => s.1 &= optional,
            None => self.ssh.push((id.to_string(), optional)),
        }
    }

    fn add_unique(list: &mut Vec<(String, String)>, url: String, pin: String) {
        if !list.iter().any(|(u, _)| *u == url) {
            list.push((url, pin));
        }
    }

    /// The sources and exec facts of the ops `def`'s terminal reaches; pins from `fs`.
    fn add_definition(&mut self, def: &pb::Definition, fs: &FsRef) -> Result<()> {
        let pins: BTreeMap<&str, &str> = match fs {
            FsRef::Solved(r) => r
                .sources()
                .iter()
                .map(|s| (s.identifier.as_str(), s.pin.as_str()))
                .collect(),
            FsRef::Scratch => BTreeMap::new(),
        };
        for op in reachable(def)?.into_values() {
            match op.op {
                Some(pb::op::Op::Source(s)) => {
                    let pin = pins.get(s.identifier.as_str()).copied().unwrap_or("");
                    self.add_source(&s, op.platform.as_ref(), pin);
                }
                Some(pb::op::Op::Exec(e)) => {
                    for m in &e.mounts {
                        if m.mount_type == pb::MountType::Secret as i32 {
                            let s = m.secret_opt.clone().unwrap_or_default();
                            self.add_secret(&s.id, s.optional);
                        }
                        if m.mount_type == pb::MountType::Ssh as i32 {
                            let s = m.ssh_opt.clone().unwrap_or_default();
                            self.add_ssh(&s.id, s.optional);
                        }
                    }
                    for s in &e.secretenv {
                        self.add_secret(&s.id, s.optional);
                    }
                    if e.network != pb::NetMode::None as i32 {
                        self.network_access = true;
                    }
                }
                Some(pb::op::Op::Build(_)) => self.incomplete_materials = true,
                _ => {}
            }
        }
        Ok(())
    }

    fn add_source(&mut self, s: &pb::SourceOp, platform: Option<&pb::Platform>, pin: &str) {
        let Some((scheme, rest)) = s.identifier.split_once("://") else {
            return;
        };
        match scheme {
            "docker-image" => {
                let reference = exporter::normalize_name(rest).unwrap_or_else(|_| rest.into());
                self.add_image(ImageSource {
                    reference,
                    platform: platform.map(|p| Platform {
                        os: p.os.clone(),
                        architecture: p.architecture.clone(),
                        variant: p.variant.clone(),
                    }),
                    digest: pin.to_string(),
                });
            }
            "local" => {
                let name = rest.to_string();
                if !self.locals.contains(&name) {
                    self.locals.push(name);
                }
            }
            "git" => {
                let (remote, reference) = rest.split_once('#').unwrap_or((rest, ""));
                let mut url = s
                    .attrs
                    .get("git.fullurl")
                    .cloned()
                    .unwrap_or_else(|| format!("https://{remote}"));
                if !reference.is_empty() {
                    url = format!("{url}#{reference}");
                }
                let url = crate::buildinfo::redact_credentials(&url);
                Self::add_unique(&mut self.git, url, pin.to_string());
                for key in ["git.authtokensecret", "git.authheadersecret"] {
                    if let Some(id) = s.attrs.get(key).filter(|v| !v.is_empty()) {
                        self.add_secret(id, true);
                    }
                }
                if let Some(id) = s.attrs.get("git.mountsshsock").filter(|v| !v.is_empty()) {
                    self.add_ssh(id, true);
                }
            }
            "http" | "https" => {
                let url = crate::buildinfo::redact_credentials(&s.identifier);
                Self::add_unique(&mut self.http, url, pin.to_string());
            }
            _ => {}
        }
    }

    /// Drops `name@digest` images whose `name:tag` is listed too (`OptimizeImageSources`), then
    /// sorts every list.
    fn finish(&mut self) {
        let name_tag = |r: &str| -> (bool, String) {
            let (named, canonical) = match r.split_once('@') {
                Some((n, _)) => (n, true),
                None => (r, false),
            };
            let last = named.rfind('/').map_or(0, |i| i + 1);
            let tagged = if named[last..].contains(':') {
                named.to_string()
            } else {
                format!("{named}:latest")
            };
            (canonical, tagged)
        };
        let tags: Vec<String> = self
            .images
            .iter()
            .map(|i| name_tag(&i.reference))
            .filter(|(c, _)| !c)
            .map(|(_, t)| t)
            .collect();
        self.images.retain(|i| {
            let (canonical, t) = name_tag(&i.reference);
            !canonical || !tags.contains(&t)
        });
        self.images.sort_by(|a, b| a.reference.cmp(&b.reference));
        self.locals.sort();
        self.git.sort();
        self.http.sort();
        self.secrets.sort();
        self.ssh.sort();
    }
}

/// The ops `def`'s terminal op reaches, by digest.
/// The sources a definition reaches (identifier and attributes, no pin), for results whose
/// inputs came from a cache and so were never loaded: BuildKit captures them from the
/// definition whatever was cached.
pub(crate) fn definition_sources(def: &pb::Definition) -> Result<Vec<worker::ResultSource>> {
    Ok(reachable(def)?
        .into_values()
        .filter_map(|op| match op.op {
            Some(pb::op::Op::Source(s)) => Some(worker::ResultSource {
                identifier: s.identifier,
                attrs: s.attrs.into_iter().collect(),
                pin: String::new(),
            }),
            _ => None,
        })
        .collect())
}

fn reachable(def: &pb::Definition) -> Result<BTreeMap<String, pb::Op>> {
    let bad = |e: String| Error::invalid(format!("provenance: invalid definition: {e}"));
    let mut ops = BTreeMap::new();
    let mut last = None;
    for dt in &def.def {
        let op = pb::Op::decode(&dt[..]).map_err(|e| bad(e.to_string()))?;
        let d = digest_of(dt);
        last = Some(d.clone());
        ops.insert(d, op);
    }
    let mut out = BTreeMap::new();
    let mut todo: Vec<String> = last.into_iter().collect();
    while let Some(d) = todo.pop() {
        if out.contains_key(&d) {
            continue;
        }
        let op = ops
            .get(&d)
            .ok_or_else(|| bad(format!("failed to find input {d}")))?
            .clone();
        todo.extend(op.inputs.iter().map(|i| i.digest.clone()));
        out.insert(d, op);
    }
    Ok(out)
}

fn digest_of(b: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b))
    )
}

/// Whether two definitions are the same build.
fn same(a: &pb::Definition, b: &pb::Definition) -> bool {
    a.def == b.def
}

/// Images resolved for every platform of the result are kept only for platform `current`
/// (BuildKit's `filterImagePlatforms`).
fn filter_image_platforms(
    images: &[ImageSource],
    platforms: &[(String, exporter::image::Platform)],
    current: &exporter::image::Platform,
) -> Vec<ImageSource> {
    let matches = |p: &Platform, q: &exporter::image::Platform| {
        exporter::attestation::format_platform(&exporter::image::Platform {
            os: p.os.clone(),
            architecture: p.architecture.clone(),
            variant: p.variant.clone(),
        }) == exporter::attestation::format_platform(q)
    };
    let everywhere = |r: &str| {
        platforms.iter().all(|(_, q)| {
            images
                .iter()
                .any(|i| i.reference == r && i.platform.as_ref().is_some_and(|p| matches(p, q)))
        })
    };
    images
        .iter()
        .filter(|i| match &i.platform {
            Some(p) if everywhere(&i.reference) => {
                p.os == current.os && p.architecture == current.architecture
            }
            _ => true,
        })
        .cloned()
        .collect()
}

/// Adds a provenance attestation to each platform of `result` (module docs). `started`: when
/// the build began; `invocation`: its ID.
pub fn attach(
    attrs: &BTreeMap<String, String>,
    result: &mut BuildResult,
    platforms: &[(String, exporter::image::Platform)],
    started: chrono::DateTime<chrono::Utc>,
    invocation: &str,
) -> Result<()> {
    let reproducible = match attrs.get("reproducible") {
        None => false,
        Some(v) => parse_bool(v).ok_or_else(|| {
            Error::invalid(format!(
                "failed to parse reproducible flag {v:?}: invalid syntax"
            ))
        })?,
    };
    let max = match attrs.get("mode").map(String::as_str) {
        None | Some("max") | Some("full") => true,
        Some("min") => false,
        Some(v) => return Err(Error::invalid(format!("invalid mode {v:?}"))),
    };
    let inline_only = attrs
        .get("inline-only")
        .and_then(|v| parse_bool(v))
        .unwrap_or(false);
    let filename = attrs
        .get("filename")
        .cloned()
        .unwrap_or_else(|| "provenance.json".into());
    let multi = !result.refs.is_empty();
    for (id, platform) in platforms {
        let fs = if multi {
            result.refs.get(id).cloned()
        } else {
            result.fs.clone()
        };
        let Some(fs) = fs else {
            return Err(Error::invalid(format!("could not find ref {id}")));
        };
        if matches!(fs, FsRef::Scratch) {
            // BuildKit has no ref (and so no provenance) for an empty result.
            continue;
        }
        let key = if multi { id.as_str() } else { "" };
        let Some(captured) = result.provenance.get(key).cloned() else {
            return Err(Error::unimplemented(format!(
                "provenance attestations (attest:provenance) of {id}: the result was not made by a frontend berthd runs itself (a gateway client's own definition, a frontend image), which berthd does not capture yet"
            )));
        };
        let solved = captured.recorder.solved.lock().unwrap().clone();
        let images = captured.recorder.images.lock().unwrap().clone();
        let def = result
            .defs
            .get(key)
            .or_else(|| result.defs.get(id))
            .cloned()
            .ok_or_else(|| {
                Error::unimplemented(format!(
                    "provenance attestations (attest:provenance) of {id}: the result was not built by a frontend berthd runs itself (e.g. a frontend image), which berthd does not capture yet"
                ))
            })?;
        let mut cap = Capture {
            frontend: captured.frontend.clone(),
            args: if captured.frontend.is_empty() {
                BTreeMap::new()
            } else {
                crate::buildinfo::filter_args(&captured.opts)
            },
            incomplete_materials: captured.has_inputs,
            ..Default::default()
        };
        let imgs = if multi {
            filter_image_platforms(&images, platforms, platform)
        } else {
            images.clone()
        };
        // Resolved images first: they carry the registry digest a frontend pinned.
        for i in imgs {
            cap.add_image(i);
        }
        cap.add_definition(&def, &fs)?;
        for (d, f) in &solved {
            if !result.defs.values().any(|r| same(r, d)) {
                cap.add_definition(d, f)?;
            }
        }
        cap.finish();
        let predicate = predicate(cap, &def, max, reproducible, started, invocation, attrs)?;
        let provenance_layers = if max {
            step_layers(&fs, &build_steps(&def)?.1)
        } else {
            vec![]
        };
        result
            .attestations
            .entry(id.clone())
            .or_default()
            .push(ResultAttestation {
                kind: Kind::InToto,
                metadata: BTreeMap::from([
                    ("reason".to_string(), Bytes::from_static(b"provenance")),
                    (
                        crate::attestations::INLINE_ONLY.to_string(),
                        Bytes::from(inline_only.to_string()),
                    ),
                ]),
                fs: None,
                path: filename.clone(),
                predicate_type: PREDICATE_TYPE.to_string(),
                subjects: vec![],
                content: Some(Bytes::from(predicate)),
                provenance_layers,
            });
    }
    Ok(())
}

/// The layers of each build step's result (`step<i>:<output>`, steps numbered by `indexes`),
/// from what the solve of `fs` evaluated; an output the build did not need (a later step was
/// cached) is looked up in the worker's cache by its key.
fn step_layers(
    fs: &FsRef,
    indexes: &BTreeMap<String, usize>,
) -> Vec<(String, Vec<layerstore::snapshot::LayerRef>)> {
    let FsRef::Solved(r) = fs else {
        return vec![];
    };
    let Some(trace) = r.trace() else {
        return vec![];
    };
    let store = r.store();
    let mut out = Vec::new();
    for v in trace.vertices.iter().flatten() {
        let Some(idx) = indexes.get(&v.digest) else {
            continue;
        };
        for (i, o) in v.outputs.iter().enumerate() {
            let chain = match &o.result {
                Some(res) => res.chain().layers().to_vec(),
                None => match store.cache_key(&o.key) {
                    Ok(Some(id)) => match store.info(&id) {
                        Ok(info) => info.chain.layers().to_vec(),
                        Err(_) => continue,
                    },
                    _ => continue,
                },
            };
            out.push((format!("step{idx}:{i}"), chain));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Go's `strconv.ParseBool`.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

fn digest_set(d: &str) -> Value {
    match d.split_once(':') {
        Some((alg, hex)) => json!({ alg: hex }),
        None => json!({}),
    }
}

fn time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// The predicate JSON (fields in the order Go writes them).
fn predicate(
    mut c: Capture,
    def: &pb::Definition,
    max: bool,
    reproducible: bool,
    started: chrono::DateTime<chrono::Utc>,
    invocation: &str,
    attrs: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut materials = Vec::new();
    for i in &c.images {
        let platform = i.platform.as_ref().map(|p| exporter::image::Platform {
            os: p.os.clone(),
            architecture: p.architecture.clone(),
            variant: p.variant.clone(),
        });
        let uri = exporter::attestation::purl(&i.reference, platform.as_ref())
            .map_err(|e| Error::invalid(format!("failed to parse ref {:?}: {e}", i.reference)))?;
        materials.push(json!({"uri": uri, "digest": digest_set(&i.digest)}));
    }
    for (url, commit) in &c.git {
        materials.push(json!({"uri": url, "digest": {"sha1": commit}}));
    }
    for (url, d) in &c.http {
        materials.push(json!({"uri": url, "digest": digest_set(d)}));
    }

    let mut config_source = Map::new();
    let context_key = c
        .args
        .get("contextkey")
        .filter(|v| !v.is_empty())
        .cloned()
        .unwrap_or_else(|| "context".into());
    if let Some(v) = c.args.get(&context_key).filter(|v| !v.is_empty()).cloned() {
        let found = c
            .git
            .iter()
            .find(|(u, _)| *u == v)
            .map(|(_, p)| json!({"sha1": p}))
            .or_else(|| {
                c.http
                    .iter()
                    .find(|(u, _)| *u == v)
                    .map(|(_, d)| digest_set(d))
            });
        config_source.insert(
            "uri".into(),
            crate::buildinfo::redact_credentials(&v).into(),
        );
        if let Some(d) = found {
            config_source.insert("digest".into(), d);
        }
        c.args.remove(&context_key);
    }
    if let Some(v) = c.args.get("filename").filter(|v| !v.is_empty()).cloned() {
        config_source.insert("entryPoint".into(), v.into());
        c.args.remove("filename");
    }
    let mut vcs = BTreeMap::new();
    let vcs_keys: Vec<String> = c
        .args
        .keys()
        .filter(|k| k.starts_with("vcs:"))
        .cloned()
        .collect();
    for k in vcs_keys {
        let mut v = c.args.remove(&k).unwrap_or_default();
        if k == "vcs:source" {
            v = crate::buildinfo::redact_credentials(&v);
        }
        if !v.is_empty() {
            vcs.insert(k["vcs:".len()..].to_string(), v);
        }
    }
    let incomplete = c.incomplete_materials || !c.locals.is_empty();
    let mut parameters_complete = !c.frontend.is_empty();
    let (mut secrets, mut ssh) = (c.secrets.clone(), c.ssh.clone());
    if !max {
        let before = c.args.len();
        c.args
            .retain(|k, _| !k.starts_with("build-arg:") && !k.starts_with("label:"));
        if c.args.len() != before {
            parameters_complete = false;
        }
        secrets.clear();
        ssh.clear();
    }

    let mut parameters = Map::new();
    if !c.frontend.is_empty() {
        parameters.insert("frontend".into(), c.frontend.clone().into());
    }
    if !c.args.is_empty() {
        parameters.insert("args".into(), json!(c.args));
    }
    let id_list = |l: &[(String, bool)]| -> Value {
        l.iter()
            .map(|(id, optional)| {
                let mut m = Map::new();
                m.insert("id".into(), id.clone().into());
                if *optional {
                    m.insert("optional".into(), true.into());
                }
                Value::Object(m)
            })
            .collect()
    };
    if !secrets.is_empty() {
        parameters.insert("secrets".into(), id_list(&secrets));
    }
    if !ssh.is_empty() {
        parameters.insert("ssh".into(), id_list(&ssh));
    }
    if !c.locals.is_empty() {
        parameters.insert(
            "locals".into(),
            c.locals.iter().map(|n| json!({"name": n})).collect(),
        );
    }

    let mut bk_meta = Map::new();
    if !vcs.is_empty() {
        bk_meta.insert("vcs".into(), json!(vcs));
    }
    let mut build_config = None;
    if max {
        let (steps, indexes) = build_steps(def)?;
        if let Some(src) = &def.source {
            if !src.infos.is_empty() {
                let mut infos = Vec::new();
                for si in &src.infos {
                    let mut m = Map::new();
                    if !si.filename.is_empty() {
                        m.insert("filename".into(), si.filename.clone().into());
                    }
                    if !si.data.is_empty() {
                        m.insert(
                            "data".into(),
                            base64::engine::general_purpose::STANDARD
                                .encode(&si.data)
                                .into(),
                        );
                    }
                    if let Some(d) = &si.definition {
                        let (steps, idx) = build_steps(d)?;
                        if !steps.is_empty() {
                            m.insert("llbDefinition".into(), steps.into());
                            m.insert("digestMapping".into(), digest_mapping(&idx));
                        }
                    }
                    infos.push(Value::Object(m));
                }
                let mut locs = Map::new();
                for (k, l) in &src.locations {
                    if let Some(i) = indexes.get(k) {
                        locs.insert(format!("step{i}"), locations_json(l));
                    }
                }
                let mut source = Map::new();
                if !locs.is_empty() {
                    source.insert("locations".into(), Value::Object(locs));
                }
                source.insert("infos".into(), infos.into());
                bk_meta.insert("source".into(), Value::Object(source));
            }
        }
        let mut bc = Map::new();
        if !steps.is_empty() {
            bc.insert("llbDefinition".into(), steps.into());
            bc.insert("digestMapping".into(), digest_mapping(&indexes));
        }
        build_config = Some(Value::Object(bc));
    }

    let mut metadata = Map::new();
    metadata.insert("buildInvocationID".into(), invocation.into());
    metadata.insert("buildStartedOn".into(), time(started).into());
    metadata.insert("buildFinishedOn".into(), time(chrono::Utc::now()).into());
    metadata.insert(
        "completeness".into(),
        json!({
            "parameters": parameters_complete,
            "environment": true,
            "materials": !incomplete,
        }),
    );
    metadata.insert("reproducible".into(), reproducible.into());
    metadata.insert(
        "https://mobyproject.org/buildkit@v1#metadata".into(),
        Value::Object(bk_meta),
    );
    if !incomplete && !c.network_access {
        metadata.insert(
            "https://mobyproject.org/buildkit@v1#hermetic".into(),
            true.into(),
        );
    }

    let mut p = Map::new();
    p.insert(
        "builder".into(),
        json!({"id": attrs.get("builder-id").cloned().unwrap_or_default()}),
    );
    p.insert("buildType".into(), BUILD_TYPE.into());
    if !materials.is_empty() {
        p.insert("materials".into(), materials.into());
    }
    p.insert(
        "invocation".into(),
        json!({
            "configSource": Value::Object(config_source),
            "parameters": Value::Object(parameters),
            "environment": {"platform": exporter::attestation::format_platform(&exporter::image::Platform::native())},
        }),
    );
    if let Some(bc) = build_config {
        p.insert("buildConfig".into(), bc);
    }
    p.insert("metadata".into(), Value::Object(metadata));
    Ok(serde_json::to_vec_pretty(&Value::Object(p)).expect("JSON value serialises"))
}

fn digest_mapping(indexes: &BTreeMap<String, usize>) -> Value {
    indexes
        .iter()
        .map(|(d, i)| (d.clone(), Value::from(format!("step{i}"))))
        .collect::<Map<_, _>>()
        .into()
}

/// The steps of `def`, depth first from its terminal op (which is the last step), each named
/// `step<i>` with its inputs as `step<j>:<output>` (BuildKit's `toBuildSteps`), and the step
/// index of each op digest.
fn build_steps(def: &pb::Definition) -> Result<(Vec<Value>, BTreeMap<String, usize>)> {
    let bad = |e: String| Error::invalid(format!("provenance: invalid definition: {e}"));
    let mut ops = BTreeMap::new();
    let mut last = None;
    for dt in &def.def {
        let op = pb::Op::decode(&dt[..])
            .map_err(|e| bad(format!("failed to parse llb proto op: {e}")))?;
        let d = digest_of(dt);
        last = Some(d.clone());
        ops.insert(d, op);
    }
    let Some(last) = last else {
        return Ok((vec![], BTreeMap::new()));
    };
    let term = &ops[&last];
    if term.op.is_some() {
        return Err(bad("invalid last vertex".into()));
    }
    if term.inputs.len() != 1 {
        return Err(bad(format!(
            "invalid last vertex inputs: {}",
            term.inputs.len()
        )));
    }
    // Post-order walk (inputs first), iterative.
    let mut order: Vec<String> = Vec::new();
    let mut visited = std::collections::BTreeSet::new();
    let mut stack: Vec<(String, bool)> = vec![(last, false)];
    while let Some((d, expanded)) = stack.pop() {
        if expanded {
            order.push(d);
            continue;
        }
        if !visited.insert(d.clone()) {
            continue;
        }
        let op = ops
            .get(&d)
            .ok_or_else(|| bad(format!("failed to find input {d}")))?;
        stack.push((d.clone(), true));
        for i in op.inputs.iter().rev() {
            if !visited.contains(&i.digest) {
                stack.push((i.digest.clone(), false));
            }
        }
    }
    let indexes: BTreeMap<String, usize> = order
        .iter()
        .enumerate()
        .map(|(i, d)| (d.clone(), i))
        .collect();
    let steps = order
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let op = &ops[d];
            let mut m = Map::new();
            m.insert("id".into(), format!("step{i}").into());
            m.insert("op".into(), op_json(op));
            let inputs: Vec<Value> = op
                .inputs
                .iter()
                .map(|inp| format!("step{}:{}", indexes[&inp.digest], inp.index).into())
                .collect();
            if !inputs.is_empty() {
                m.insert("inputs".into(), inputs.into());
            }
            Value::Object(m)
        })
        .collect();
    Ok((steps, indexes))
}

/// A JSON object builder leaving out zero values (Go's `omitempty`).
#[derive(Default)]
struct Obj(Map<String, Value>);

impl Obj {
    fn s(mut self, k: &str, v: &str) -> Self {
        if !v.is_empty() {
            self.0.insert(k.into(), v.into());
        }
        self
    }
    fn i(mut self, k: &str, v: i64) -> Self {
        if v != 0 {
            self.0.insert(k.into(), v.into());
        }
        self
    }
    fn b(mut self, k: &str, v: bool) -> Self {
        if v {
            self.0.insert(k.into(), v.into());
        }
        self
    }
    fn list(mut self, k: &str, v: &[String]) -> Self {
        if !v.is_empty() {
            self.0.insert(k.into(), json!(v));
        }
        self
    }
    fn v(mut self, k: &str, v: Option<Value>) -> Self {
        if let Some(v) = v {
            self.0.insert(k.into(), v);
        }
        self
    }
    /// Always present (no `omitempty`).
    fn always(mut self, k: &str, v: Value) -> Self {
        self.0.insert(k.into(), v);
        self
    }
    fn done(self) -> Value {
        Value::Object(self.0)
    }
}

fn chown_json(o: &Option<pb::ChownOpt>) -> Option<Value> {
    let user = |u: &Option<pb::UserOpt>| -> Option<Value> {
        let u = u.as_ref()?;
        let inner = match &u.user {
            Some(pb::user_opt::User::ByName(n)) => Obj::default().v(
                "byName",
                Some(
                    Obj::default()
                        .s("name", &n.name)
                        .always("input", n.input.into())
                        .done(),
                ),
            ),
            Some(pb::user_opt::User::ById(id)) => Obj::default().i("byID", *id as i64),
            None => Obj::default(),
        };
        Some(json!({"User": inner.done()}))
    };
    let o = o.as_ref()?;
    Some(
        Obj::default()
            .v("user", user(&o.user))
            .v("group", user(&o.group))
            .done(),
    )
}

/// An LLB op as Go's `encoding/json` writes BuildKit's `pb.Op` (inputs left out: the step
/// lists them).
fn op_json(op: &pb::Op) -> Value {
    let payload = match &op.op {
        None => None,
        Some(pb::op::Op::Source(s)) => Some(json!({"source": Obj::default()
            .s("identifier", &s.identifier)
            .v("attrs", (!s.attrs.is_empty()).then(|| json!(s.attrs)))
            .done()})),
        Some(pb::op::Op::Exec(e)) => {
            let meta = e.meta.as_ref().map(|m| {
                Obj::default()
                    .list("args", &m.args)
                    .list("env", &m.env)
                    .s("cwd", &m.cwd)
                    .s("user", &m.user)
                    .v(
                        "proxy_env",
                        m.proxy_env.as_ref().map(|p| {
                            Obj::default()
                                .s("http_proxy", &p.http_proxy)
                                .s("https_proxy", &p.https_proxy)
                                .s("ftp_proxy", &p.ftp_proxy)
                                .s("no_proxy", &p.no_proxy)
                                .s("all_proxy", &p.all_proxy)
                                .done()
                        }),
                    )
                    .v(
                        "extraHosts",
                        (!m.extra_hosts.is_empty()).then(|| {
                            m.extra_hosts
                                .iter()
                                .map(|h| Obj::default().s("Host", &h.host).s("IP", &h.ip).done())
                                .collect()
                        }),
                    )
                    .s("hostname", &m.hostname)
                    .v(
                        "ulimit",
                        (!m.ulimit.is_empty()).then(|| {
                            m.ulimit
                                .iter()
                                .map(|u| {
                                    Obj::default()
                                        .s("Name", &u.name)
                                        .i("Soft", u.soft)
                                        .i("Hard", u.hard)
                                        .done()
                                })
                                .collect()
                        }),
                    )
                    .s("cgroupParent", &m.cgroup_parent)
                    .b("removeMountStubsRecursive", m.remove_mount_stubs_recursive)
                    .done()
            });
            let mounts: Vec<Value> = e
                .mounts
                .iter()
                .map(|m| {
                    let id_opt = |id: &str, uid: u32, gid: u32, mode: u32, optional: bool| {
                        Obj::default()
                            .s("ID", id)
                            .i("uid", uid as i64)
                            .i("gid", gid as i64)
                            .i("mode", mode as i64)
                            .b("optional", optional)
                            .done()
                    };
                    Obj::default()
                        .always("input", m.input.into())
                        .s("selector", &m.selector)
                        .s("dest", &m.dest)
                        .always("output", m.output.into())
                        .b("readonly", m.readonly)
                        .i("mountType", m.mount_type as i64)
                        .v(
                            "TmpfsOpt",
                            m.tmpfs_opt
                                .as_ref()
                                .map(|t| Obj::default().i("size", t.size).done()),
                        )
                        .v(
                            "cacheOpt",
                            m.cache_opt.as_ref().map(|c| {
                                Obj::default()
                                    .s("ID", &c.id)
                                    .i("sharing", c.sharing as i64)
                                    .done()
                            }),
                        )
                        .v(
                            "secretOpt",
                            m.secret_opt
                                .as_ref()
                                .map(|s| id_opt(&s.id, s.uid, s.gid, s.mode, s.optional)),
                        )
                        .v(
                            "SSHOpt",
                            m.ssh_opt
                                .as_ref()
                                .map(|s| id_opt(&s.id, s.uid, s.gid, s.mode, s.optional)),
                        )
                        .s("resultID", &m.result_id)
                        .done()
                })
                .collect();
            let secretenv: Vec<Value> = e
                .secretenv
                .iter()
                .map(|s| {
                    Obj::default()
                        .s("ID", &s.id)
                        .s("name", &s.name)
                        .b("optional", s.optional)
                        .done()
                })
                .collect();
            Some(json!({"exec": Obj::default()
                .v("meta", meta)
                .v("mounts", (!mounts.is_empty()).then(|| mounts.into()))
                .i("network", e.network as i64)
                .i("security", e.security as i64)
                .v("secretenv", (!secretenv.is_empty()).then(|| secretenv.into()))
                .done()}))
        }
        Some(pb::op::Op::File(f)) => {
            let actions: Vec<Value> = f
                .actions
                .iter()
                .map(|a| {
                    let action = match &a.action {
                        Some(pb::file_action::Action::Copy(c)) => Some(json!({"copy": Obj::default()
                            .s("src", &c.src)
                            .s("dest", &c.dest)
                            .v("owner", chown_json(&c.owner))
                            .i("mode", c.mode as i64)
                            .b("followSymlink", c.follow_symlink)
                            .b("dirCopyContents", c.dir_copy_contents)
                            .b("attemptUnpackDockerCompatibility", c.attempt_unpack_docker_compatibility)
                            .b("createDestPath", c.create_dest_path)
                            .b("allowWildcard", c.allow_wildcard)
                            .b("allowEmptyWildcard", c.allow_empty_wildcard)
                            .i("timestamp", c.timestamp)
                            .list("include_patterns", &c.include_patterns)
                            .list("exclude_patterns", &c.exclude_patterns)
                            .done()})),
                        Some(pb::file_action::Action::Mkfile(m)) => Some(json!({"mkfile": Obj::default()
                            .s("path", &m.path)
                            .i("mode", m.mode as i64)
                            .v("data", (!m.data.is_empty()).then(|| base64::engine::general_purpose::STANDARD.encode(&m.data).into()))
                            .v("owner", chown_json(&m.owner))
                            .i("timestamp", m.timestamp)
                            .done()})),
                        Some(pb::file_action::Action::Mkdir(m)) => Some(json!({"mkdir": Obj::default()
                            .s("path", &m.path)
                            .i("mode", m.mode as i64)
                            .b("makeParents", m.make_parents)
                            .v("owner", chown_json(&m.owner))
                            .i("timestamp", m.timestamp)
                            .done()})),
                        Some(pb::file_action::Action::Rm(r)) => Some(json!({"rm": Obj::default()
                            .s("path", &r.path)
                            .b("allowNotFound", r.allow_not_found)
                            .b("allowWildcard", r.allow_wildcard)
                            .done()})),
                        Some(pb::file_action::Action::Symlink(s)) => Some(json!({"symlink": Obj::default()
                            .s("oldpath", &s.oldpath)
                            .s("newpath", &s.newpath)
                            .v("owner", chown_json(&s.owner))
                            .i("timestamp", s.timestamp)
                            .done()})),
                        None => None,
                    };
                    Obj::default()
                        .always("input", a.input.into())
                        .always("secondaryInput", a.secondary_input.into())
                        .always("output", a.output.into())
                        .always("Action", action.unwrap_or(Value::Null))
                        .done()
                })
                .collect();
            Some(json!({"file": Obj::default()
                .v("actions", (!actions.is_empty()).then(|| actions.into()))
                .done()}))
        }
        Some(pb::op::Op::Merge(m)) => Some(json!({"merge": Obj::default()
            .v("inputs", (!m.inputs.is_empty()).then(|| m.inputs.iter().map(|i| json!({"input": i.input})).collect()))
            .done()})),
        Some(pb::op::Op::Diff(d)) => Some(json!({"diff": Obj::default()
            .v("lower", d.lower.as_ref().map(|l| json!({"input": l.input})))
            .v("upper", d.upper.as_ref().map(|u| json!({"input": u.input})))
            .done()})),
        Some(pb::op::Op::Build(b)) => Some(json!({"build": Obj::default()
            .i("builder", b.builder)
            .v("attrs", (!b.attrs.is_empty()).then(|| json!(b.attrs)))
            .done()})),
        Some(pb::op::Op::Passthrough(p)) => Some(json!({"passthrough": Obj::default()
            .s("id", &p.id)
            .done()})),
    };
    Obj::default()
        .always("Op", payload.unwrap_or(Value::Null))
        .v(
            "platform",
            op.platform.as_ref().map(|p| {
                Obj::default()
                    .s("Architecture", &p.architecture)
                    .s("OS", &p.os)
                    .s("Variant", &p.variant)
                    .s("OSVersion", &p.os_version)
                    .list("OSFeatures", &p.os_features)
                    .done()
            }),
        )
        .v(
            "constraints",
            op.constraints
                .as_ref()
                .map(|c| Obj::default().list("filter", &c.filter).done()),
        )
        .done()
}

fn locations_json(l: &pb::Locations) -> Value {
    let pos = |p: &Option<pb::Position>| {
        let p = (*p).unwrap_or_default();
        Obj::default()
            .i("line", p.line as i64)
            .i("character", p.character as i64)
            .done()
    };
    let locs: Vec<Value> = l
        .locations
        .iter()
        .map(|loc| {
            Obj::default()
                .i("sourceIndex", loc.source_index as i64)
                .v(
                    "ranges",
                    (!loc.ranges.is_empty()).then(|| {
                        loc.ranges
                            .iter()
                            .map(|r| json!({"start": pos(&r.start), "end": pos(&r.end)}))
                            .collect()
                    }),
                )
                .done()
        })
        .collect();
    Obj::default()
        .v("locations", (!locs.is_empty()).then(|| locs.into()))
        .done()
}

/// Records into `rec` what an in-process frontend solved (for [`crate::frontends`]).
pub fn record_solved(rec: &Option<Arc<Recorder>>, def: &Option<pb::Definition>, fs: &FsRef) {
    if let (Some(r), Some(d)) = (rec, def) {
        if !d.def.is_empty() {
            r.solved(d, fs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(o: pb::Op) -> Bytes {
        o.encode_to_vec().into()
    }

    fn source(id: &str, attrs: &[(&str, &str)], platform: Option<&str>) -> pb::Op {
        pb::Op {
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: id.into(),
                attrs: attrs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            })),
            platform: platform.map(|p| {
                let (os, arch) = p.split_once('/').unwrap();
                pb::Platform {
                    os: os.into(),
                    architecture: arch.into(),
                    ..Default::default()
                }
            }),
            ..Default::default()
        }
    }

    fn input(b: &Bytes) -> pb::Input {
        pb::Input {
            digest: digest_of(b),
            index: 0,
        }
    }

    /// image + git + http + local sources under an exec with a secret, an SSH socket and no
    /// network, and an op the terminal does not reach.
    fn definition() -> pb::Definition {
        let img = op(source(
            "docker-image://docker.io/library/busybox:latest",
            &[],
            Some("linux/amd64"),
        ));
        let git = op(source(
            "git://example.invalid/repo.git#v1",
            &[
                ("git.fullurl", "https://u:p@example.invalid/repo.git"),
                ("git.authtokensecret", "GIT_AUTH_TOKEN"),
            ],
            None,
        ));
        let http = op(source("https://example.invalid/f.txt", &[], None));
        let local = op(source("local://context", &[("local.session", "s")], None));
        let unused = op(source("local://unused", &[], None));
        let exec = op(pb::Op {
            inputs: vec![input(&img), input(&git), input(&http), input(&local)],
            op: Some(pb::op::Op::Exec(pb::ExecOp {
                meta: Some(pb::Meta {
                    args: vec!["true".into()],
                    ..Default::default()
                }),
                network: pb::NetMode::None as i32,
                mounts: vec![
                    pb::Mount {
                        input: 0,
                        dest: "/".into(),
                        ..Default::default()
                    },
                    pb::Mount {
                        input: -1,
                        dest: "/run/secrets/s".into(),
                        mount_type: pb::MountType::Secret as i32,
                        secret_opt: Some(pb::SecretOpt {
                            id: "s".into(),
                            optional: false,
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    pb::Mount {
                        input: -1,
                        dest: "/ssh".into(),
                        mount_type: pb::MountType::Ssh as i32,
                        ssh_opt: Some(pb::SshOpt {
                            optional: true,
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            })),
            ..Default::default()
        });
        let term = op(pb::Op {
            inputs: vec![input(&exec)],
            ..Default::default()
        });
        pb::Definition {
            def: vec![unused, img, git, http, local, exec, term],
            ..Default::default()
        }
    }

    #[test]
    fn capture_of_a_definition() {
        let mut c = Capture::default();
        c.add_definition(&definition(), &FsRef::Scratch).unwrap();
        c.finish();
        assert_eq!(
            c.images,
            vec![ImageSource {
                reference: "docker.io/library/busybox:latest".into(),
                platform: Some(Platform {
                    os: "linux".into(),
                    architecture: "amd64".into(),
                    variant: String::new(),
                }),
                digest: String::new(),
            }]
        );
        assert_eq!(
            c.git,
            vec![(
                "https://xxxxx:xxxxx@example.invalid/repo.git#v1".to_string(),
                String::new()
            )]
        );
        assert_eq!(
            c.http,
            vec![("https://example.invalid/f.txt".to_string(), String::new())]
        );
        // the unreached local is not a source of this build
        assert_eq!(c.locals, vec!["context".to_string()]);
        assert_eq!(
            c.secrets,
            vec![("GIT_AUTH_TOKEN".into(), true), ("s".into(), false)]
        );
        assert_eq!(c.ssh, vec![("default".into(), true)]);
        assert!(!c.network_access);
    }

    #[test]
    fn predicate_modes() {
        let def = definition();
        let mut c = Capture {
            frontend: "dockerfile.v0".into(),
            args: crate::buildinfo::filter_args(&BTreeMap::from([
                ("build-arg:A".into(), "1".into()),
                ("label:l".into(), "x".into()),
                ("filename".into(), "Dockerfile".into()),
                (
                    "context".into(),
                    "https://u:p@example.invalid/repo.git#v1".into(),
                ),
                ("vcs:revision".into(), "r".into()),
                ("attest:provenance".into(), "mode=max".into()),
                ("platform".into(), "linux/arm64".into()),
            ])),
            ..Default::default()
        };
        // the resolved image: its digest wins over the unpinned source op's
        c.add_image(ImageSource {
            reference: "docker.io/library/busybox:latest".into(),
            platform: Some(Platform {
                os: "linux".into(),
                architecture: "amd64".into(),
                variant: String::new(),
            }),
            digest: "sha256:aaaa".into(),
        });
        c.add_definition(&def, &FsRef::Scratch).unwrap();
        c.finish();
        let started = chrono::Utc::now();
        let json = |max: bool| -> Value {
            serde_json::from_slice(
                &predicate(c.clone(), &def, max, false, started, "id", &BTreeMap::new()).unwrap(),
            )
            .unwrap()
        };
        let p = json(true);
        assert_eq!(
            p["materials"][0],
            json!({"uri": "pkg:docker/busybox@latest?platform=linux%2Famd64", "digest": {"sha256": "aaaa"}})
        );
        assert_eq!(p["materials"].as_array().unwrap().len(), 3);
        // the git context is the config source, with the commit it resolved to
        assert_eq!(
            p["invocation"]["configSource"],
            json!({"uri": "https://xxxxx:xxxxx@example.invalid/repo.git#v1", "digest": {"sha1": ""}, "entryPoint": "Dockerfile"})
        );
        assert_eq!(
            p["invocation"]["parameters"]["args"],
            json!({"build-arg:A": "1", "label:l": "x"})
        );
        assert_eq!(
            p["metadata"]["https://mobyproject.org/buildkit@v1#metadata"]["vcs"],
            json!({"revision": "r"})
        );
        assert_eq!(p["metadata"]["completeness"]["parameters"], true);
        assert_eq!(p["metadata"]["completeness"]["materials"], false);
        // no network, but a local source: not hermetic
        assert!(p["metadata"]
            .get("https://mobyproject.org/buildkit@v1#hermetic")
            .is_none());
        let steps = p["buildConfig"]["llbDefinition"].as_array().unwrap();
        // depth first from the terminal: the four sources, the exec, the terminal
        assert_eq!(steps.len(), 6, "{p}");
        assert_eq!(
            steps[4]["inputs"],
            json!(["step0:0", "step1:0", "step2:0", "step3:0"])
        );
        assert_eq!(steps[4]["op"]["Op"]["exec"]["network"], 2);
        assert_eq!(
            steps[4]["op"]["Op"]["exec"]["mounts"][1]["secretOpt"],
            json!({"ID": "s"})
        );
        assert!(steps[5]["op"]["Op"].is_null());
        assert_eq!(steps[5]["inputs"], json!(["step4:0"]));

        let p = json(false);
        assert_eq!(p["invocation"]["parameters"].get("args"), None, "{p}");
        assert_eq!(p["metadata"]["completeness"]["parameters"], false);
        assert!(p["invocation"]["parameters"].get("secrets").is_none());
        assert!(p.get("buildConfig").is_none());
    }

    #[test]
    fn image_sources_optimized_and_filtered() {
        let img = |r: &str, arch: &str| ImageSource {
            reference: r.into(),
            platform: Some(Platform {
                os: "linux".into(),
                architecture: arch.into(),
                variant: String::new(),
            }),
            digest: "sha256:00".into(),
        };
        let mut c = Capture::default();
        c.add_image(img("docker.io/library/b:latest@sha256:11", "amd64"));
        c.add_image(img("docker.io/library/b:latest", "amd64"));
        c.add_image(img("docker.io/library/a@sha256:22", "amd64"));
        c.add_image(img("docker.io/library/b:latest", "amd64"));
        c.finish();
        let refs: Vec<&str> = c.images.iter().map(|i| i.reference.as_str()).collect();
        assert_eq!(
            refs,
            [
                "docker.io/library/a@sha256:22",
                "docker.io/library/b:latest"
            ]
        );

        let p = |arch: &str| exporter::image::Platform {
            os: "linux".into(),
            architecture: arch.into(),
            variant: String::new(),
        };
        let platforms = vec![("a".to_string(), p("amd64")), ("b".to_string(), p("arm64"))];
        let images = vec![
            img("x", "amd64"),
            img("x", "arm64"),
            img("only-amd64", "amd64"),
        ];
        let got: Vec<String> = filter_image_platforms(&images, &platforms, &p("arm64"))
            .into_iter()
            .map(|i| format!("{}/{}", i.reference, i.platform.unwrap().architecture))
            .collect();
        assert_eq!(got, ["x/arm64", "only-amd64/amd64"]);
    }

    #[test]
    fn attest_attribute() {
        let a = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert_eq!(requested(&BTreeMap::new()).unwrap(), None);
        assert_eq!(
            requested(&a("attest:provenance", "mode=min,inline-only=true")).unwrap(),
            Some(BTreeMap::from([
                ("mode".into(), "min".into()),
                ("inline-only".into(), "true".into())
            ]))
        );
        assert_eq!(
            requested(&a("build-arg:BUILDKIT_ATTEST_PROVENANCE", "")).unwrap(),
            Some(BTreeMap::new())
        );
    }
}
