//! Source ops: `local://` and `docker-image://` (Go: `llb.Local`, `llb.Image`).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::{pb, Meta, Node, Output, Platform, State};

fn source_state(
    identifier: String,
    attrs: BTreeMap<String, String>,
    caps: &[&str],
    platform: Option<Platform>,
) -> State {
    let op = pb::Op {
        op: Some(pb::op::Op::Source(pb::SourceOp { identifier, attrs })),
        platform: platform.as_ref().map(|p| p.to_pb()),
        constraints: Some(pb::WorkerConstraints::default()),
        ..Default::default()
    };
    let node = Node {
        op,
        inputs: vec![],
        meta: Meta {
            caps: caps.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        },
    };
    State::from_output(
        Output {
            node: Arc::new(node),
            index: 0,
        },
        platform.unwrap_or_else(Platform::host),
    )
}

/// Builder for a `local://NAME` source; turn it into a [`State`] with [`Local::state`] or `into()`.
#[derive(Debug, Clone)]
pub struct Local {
    name: String,
    session_id: Option<String>,
    include: Vec<String>,
    exclude: Vec<String>,
    follow: Vec<String>,
    shared_key_hint: Option<String>,
    differ: Option<(String, bool)>,
    unique_id: String,
}

/// A client directory transferred through the session (`local://NAME`).
pub fn local(name: impl Into<String>) -> Local {
    Local {
        name: name.into(),
        session_id: None,
        include: vec![],
        exclude: vec![],
        follow: vec![],
        shared_key_hint: None,
        differ: None,
        unique_id: default_unique_id(),
    }
}

/// A per-machine id, as Go's `LocalUniqueID` default (here: derived from the hostname).
fn default_unique_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let h = <sha2::Sha256 as sha2::Digest>::digest(host.trim().as_bytes());
    hex::encode(&h[..16])
}

impl Local {
    /// `local.session`: the session that serves the directory.
    pub fn session_id(mut self, id: impl Into<String>) -> Self {
        self.session_id = Some(id.into());
        self
    }

    /// `local.includepattern`.
    pub fn include<S: Into<String>>(mut self, patterns: impl IntoIterator<Item = S>) -> Self {
        self.include = patterns.into_iter().map(Into::into).collect();
        self
    }

    /// `local.excludepatterns`.
    pub fn exclude<S: Into<String>>(mut self, patterns: impl IntoIterator<Item = S>) -> Self {
        self.exclude = patterns.into_iter().map(Into::into).collect();
        self
    }

    /// `local.followpaths`.
    pub fn follow_paths<S: Into<String>>(mut self, paths: impl IntoIterator<Item = S>) -> Self {
        self.follow = paths.into_iter().map(Into::into).collect();
        self
    }

    /// `local.sharedkeyhint`.
    pub fn shared_key_hint(mut self, hint: impl Into<String>) -> Self {
        self.shared_key_hint = Some(hint.into());
        self
    }

    /// `local.differ` (`metadata` or `none`); `required` adds the cap.
    pub fn differ(mut self, differ: impl Into<String>, required: bool) -> Self {
        self.differ = Some((differ.into(), required));
        self
    }

    /// `local.unique` (used when no session id is set; only affects the digest).
    pub fn unique_id(mut self, id: impl Into<String>) -> Self {
        self.unique_id = id.into();
        self
    }

    /// The source state.
    pub fn state(self) -> State {
        let json = |v: &Vec<String>| serde_json::to_string(v).expect("strings serialize");
        let mut attrs = BTreeMap::new();
        let mut caps = vec!["source.local"];
        if let Some(s) = &self.session_id {
            attrs.insert("local.session".into(), s.clone());
            caps.push("source.local.sessionid");
        } else {
            attrs.insert("local.unique".into(), self.unique_id.clone());
            caps.push("source.local.unique");
        }
        if !self.include.is_empty() {
            attrs.insert("local.includepattern".into(), json(&self.include));
            caps.push("source.local.includepatterns");
        }
        if !self.follow.is_empty() {
            attrs.insert("local.followpaths".into(), json(&self.follow));
            caps.push("source.local.followpaths");
        }
        if !self.exclude.is_empty() {
            attrs.insert("local.excludepatterns".into(), json(&self.exclude));
            caps.push("source.local.excludepatterns");
        }
        if let Some(h) = &self.shared_key_hint {
            attrs.insert("local.sharedkeyhint".into(), h.clone());
            caps.push("source.local.sharedkeyhint");
        }
        if let Some((d, required)) = &self.differ {
            attrs.insert("local.differ".into(), d.clone());
            if *required {
                caps.push("source.local.differ");
            }
        }
        // Local sources are not platform specific: no Op.platform.
        source_state(format!("local://{}", self.name), attrs, &caps, None)
    }
}

impl From<Local> for State {
    fn from(l: Local) -> State {
        l.state()
    }
}

/// Builder for a `docker-image://REF` source.
#[derive(Debug, Clone)]
pub struct Image {
    reference: String,
    resolve_mode: Option<String>,
    layer_limit: Option<i64>,
    record_type: Option<String>,
    platform: Platform,
}

/// A container image; `reference` is normalized like Docker's (`alpine` →
/// `docker.io/library/alpine:latest`).
pub fn image(reference: impl AsRef<str>) -> Image {
    Image {
        reference: normalize_ref(reference.as_ref()),
        resolve_mode: None,
        layer_limit: None,
        record_type: None,
        platform: Platform::host(),
    }
}

impl Image {
    /// `image.resolvemode` (`default`, `pull`, `local`).
    pub fn resolve_mode(mut self, mode: impl Into<String>) -> Self {
        self.resolve_mode = Some(mode.into());
        self
    }

    /// `image.layerlimit`.
    pub fn layer_limit(mut self, n: i64) -> Self {
        self.layer_limit = Some(n);
        self
    }

    /// `image.recordtype`.
    pub fn record_type(mut self, t: impl Into<String>) -> Self {
        self.record_type = Some(t.into());
        self
    }

    /// The platform to use.
    pub fn platform(mut self, p: Platform) -> Self {
        self.platform = p;
        self
    }

    /// The source state.
    pub fn state(self) -> State {
        let mut attrs = BTreeMap::new();
        let mut caps = vec!["source.image"];
        if let Some(m) = &self.resolve_mode {
            attrs.insert("image.resolvemode".into(), m.clone());
            if m == "pull" {
                caps.push("source.image.resolvemode");
            }
        }
        if let Some(t) = &self.record_type {
            attrs.insert("image.recordtype".into(), t.clone());
        }
        if let Some(n) = self.layer_limit {
            attrs.insert("image.layerlimit".into(), n.to_string());
            caps.push("source.image.layerlimit");
        }
        source_state(
            format!("docker-image://{}", self.reference),
            attrs,
            &caps,
            Some(self.platform),
        )
    }
}

impl From<Image> for State {
    fn from(i: Image) -> State {
        i.state()
    }
}

/// Docker reference normalization: default domain `docker.io`, `library/` for official images,
/// `:latest` when there is neither tag nor digest.
pub(crate) fn normalize_ref(r: &str) -> String {
    let (name_part, digest) = match r.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (r, None),
    };
    let (mut name, tag) = match name_part.rfind(':') {
        Some(i) if !name_part[i + 1..].contains('/') => {
            (name_part[..i].to_string(), Some(&name_part[i + 1..]))
        }
        _ => (name_part.to_string(), None),
    };
    let first = name.split('/').next().unwrap_or("");
    let has_domain =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    if !has_domain {
        if !name.contains('/') {
            name = format!("library/{name}");
        }
        name = format!("docker.io/{name}");
    } else if let Some(rest) = name.strip_prefix("index.docker.io/") {
        name = format!("docker.io/{rest}");
    }
    let mut out = name;
    match (tag, digest) {
        (Some(t), _) => {
            out.push(':');
            out.push_str(t);
        }
        (None, None) => out.push_str(":latest"),
        (None, Some(_)) => {}
    }
    if let Some(d) = digest {
        out.push('@');
        out.push_str(d);
    }
    out
}
