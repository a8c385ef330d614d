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

/// Docker reference normalization (`reference.ParseNormalizedNamed` + `TagNameOnly`): default domain `docker.io`, `library/` for official images,
/// `:latest` when there is neither tag nor digest.
pub fn normalize_ref(r: &str) -> String {
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

/// Builder for a `git://` source (Go `llb.Git`).
#[derive(Debug, Clone)]
pub struct Git {
    remote: String,
    reference: String,
    keep_git_dir: bool,
    auth_token_secret: Option<String>,
    auth_header_secret: Option<String>,
    known_ssh_hosts: Option<String>,
    mount_ssh_sock: Option<String>,
}

/// A git repository at `reference` (branch, tag or commit; empty for the default branch).
/// `remote` may be `https://…`, `http://…`, `ssh://…`, `git@host:path` or a bare `host/path`
/// (https assumed).
pub fn git(remote: impl Into<String>, reference: impl Into<String>) -> Git {
    Git {
        remote: remote.into(),
        reference: reference.into(),
        keep_git_dir: false,
        auth_token_secret: None,
        auth_header_secret: None,
        known_ssh_hosts: None,
        mount_ssh_sock: None,
    }
}

impl Git {
    /// Keep the `.git` directory.
    pub fn keep_git_dir(mut self) -> Self {
        self.keep_git_dir = true;
        self
    }
    /// Secret holding an auth token (adds the `source.git.httpauth` cap).
    pub fn auth_token_secret(mut self, id: impl Into<String>) -> Self {
        self.auth_token_secret = Some(id.into());
        self
    }
    /// Secret holding an auth header (adds the `source.git.httpauth` cap).
    pub fn auth_header_secret(mut self, id: impl Into<String>) -> Self {
        self.auth_header_secret = Some(id.into());
        self
    }
    /// `known_hosts` content for ssh remotes.
    pub fn known_ssh_hosts(mut self, hosts: impl Into<String>) -> Self {
        self.known_ssh_hosts = Some(hosts.into());
        self
    }
    /// SSH agent id for ssh remotes (default `default`).
    pub fn mount_ssh_sock(mut self, id: impl Into<String>) -> Self {
        self.mount_ssh_sock = Some(id.into());
        self
    }

    /// The source state.
    pub fn state(self) -> State {
        let mut url = self.remote.split('#').next().unwrap_or("").to_string();
        let mut remote = self.remote.clone();
        let mut ssh = false;
        let is_scp_like = {
            // user@host:path
            let (user, rest) = remote.split_once('@').unwrap_or(("", ""));
            !user.is_empty()
                && user
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                && rest
                    .split_once(':')
                    .is_some_and(|(host, _)| !host.is_empty() && !host.contains('/'))
        };
        let mut known = true;
        if let Some(r) = remote
            .strip_prefix("http://")
            .or(remote.strip_prefix("https://"))
        {
            remote = r.to_string();
        } else if let Some(r) = remote.strip_prefix("ssh://") {
            remote = r.to_string();
            ssh = true;
        } else if let Some(r) = remote.strip_prefix("git://") {
            remote = r.to_string();
        } else if is_scp_like {
            ssh = true;
            if let Some((host, path)) = remote.split_once(':') {
                remote = format!("{host}/{path}");
            }
        } else {
            known = false;
        }
        if !known {
            url = format!("https://{url}");
        }
        let mut id = remote;
        if !self.reference.is_empty() {
            id.push('#');
            id.push_str(&self.reference);
        }
        let mut attrs = BTreeMap::new();
        let mut caps = vec!["source.git"];
        if self.keep_git_dir {
            attrs.insert("git.keepgitdir".into(), "true".into());
            caps.push("source.git.keepgitdir");
        }
        if !url.is_empty() {
            attrs.insert("git.fullurl".into(), url);
            caps.push("source.git.fullurl");
        }
        let auth_cap = self.auth_token_secret.is_some() || self.auth_header_secret.is_some();
        attrs.insert(
            "git.authtokensecret".into(),
            self.auth_token_secret
                .unwrap_or_else(|| "GIT_AUTH_TOKEN".into()),
        );
        attrs.insert(
            "git.authheadersecret".into(),
            self.auth_header_secret
                .unwrap_or_else(|| "GIT_AUTH_HEADER".into()),
        );
        if auth_cap {
            caps.push("source.git.httpauth");
        }
        if ssh {
            if let Some(h) = self.known_ssh_hosts {
                attrs.insert("git.knownsshhosts".into(), h);
            }
            caps.push("source.git.knownsshhosts");
            attrs.insert(
                "git.mountsshsock".into(),
                self.mount_ssh_sock.unwrap_or_else(|| "default".into()),
            );
            caps.push("source.git.mountsshsock");
        }
        source_state(format!("git://{id}"), attrs, &caps, None)
    }
}

impl From<Git> for State {
    fn from(g: Git) -> State {
        g.state()
    }
}

/// Builder for an `http(s)://` source (Go `llb.HTTP`).
#[derive(Debug, Clone)]
pub struct Http {
    url: String,
    checksum: Option<String>,
    filename: Option<String>,
    perm: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
}

/// A file downloaded from `url`.
pub fn http(url: impl Into<String>) -> Http {
    Http {
        url: url.into(),
        checksum: None,
        filename: None,
        perm: None,
        uid: None,
        gid: None,
    }
}

impl Http {
    /// Expected `sha256:…` digest of the content.
    pub fn checksum(mut self, digest: impl Into<String>) -> Self {
        self.checksum = Some(digest.into());
        self
    }
    /// File name in the result.
    pub fn filename(mut self, name: impl Into<String>) -> Self {
        self.filename = Some(name.into());
        self
    }
    /// Permission bits.
    pub fn perm(mut self, perm: u32) -> Self {
        self.perm = Some(perm);
        self
    }
    /// Owner.
    pub fn chown(mut self, uid: u32, gid: u32) -> Self {
        self.uid = Some(uid);
        self.gid = Some(gid);
        self
    }

    /// The source state.
    pub fn state(self) -> State {
        let mut attrs = BTreeMap::new();
        let mut caps = vec!["source.http"];
        if let Some(c) = self.checksum {
            attrs.insert("http.checksum".into(), c);
            caps.push("source.http.checksum");
        }
        if let Some(f) = self.filename {
            attrs.insert("http.filename".into(), f);
        }
        if let Some(p) = self.perm.filter(|p| *p != 0) {
            attrs.insert("http.perm".into(), format!("0{p:o}"));
            caps.push("source.http.perm");
        }
        if let Some(u) = self.uid.filter(|u| *u != 0) {
            attrs.insert("http.uid".into(), u.to_string());
            caps.push("soruce.http.uidgid");
        }
        if let Some(g) = self.gid.filter(|g| *g != 0) {
            attrs.insert("http.gid".into(), g.to_string());
            caps.push("soruce.http.uidgid");
        }
        source_state(self.url, attrs, &caps, None)
    }
}

impl From<Http> for State {
    fn from(h: Http) -> State {
        h.state()
    }
}

/// Builder for an `oci-layout://` source (Go `llb.OCILayout`).
#[derive(Debug, Clone)]
pub struct OciLayout {
    reference: String,
    session_id: Option<String>,
    store_id: Option<String>,
    layer_limit: Option<i64>,
    platform: Platform,
}

/// An image of an OCI layout the client serves as a content store; `reference` is
/// `name@sha256:…` (the digest of an index or a manifest in the store).
pub fn oci_layout(reference: impl Into<String>) -> OciLayout {
    OciLayout {
        reference: reference.into(),
        session_id: None,
        store_id: None,
        layer_limit: None,
        platform: Platform::host(),
    }
}

impl OciLayout {
    /// `oci.session` and `oci.store` (Go `llb.OCIStore`; an empty session means the build's).
    pub fn store(mut self, session_id: impl Into<String>, store_id: impl Into<String>) -> Self {
        self.session_id = Some(session_id.into()).filter(|s| !s.is_empty());
        self.store_id = Some(store_id.into()).filter(|s| !s.is_empty());
        self
    }

    /// `oci.layerlimit`.
    pub fn layer_limit(mut self, n: i64) -> Self {
        self.layer_limit = Some(n);
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
        if let Some(s) = self.session_id {
            attrs.insert("oci.session".into(), s);
        }
        if let Some(s) = self.store_id {
            attrs.insert("oci.store".into(), s);
        }
        if let Some(n) = self.layer_limit {
            attrs.insert("oci.layerlimit".into(), n.to_string());
        }
        source_state(
            format!("oci-layout://{}", self.reference),
            attrs,
            &["source.ocilayout"],
            Some(self.platform),
        )
    }
}

impl From<OciLayout> for State {
    fn from(o: OciLayout) -> State {
        o.state()
    }
}
