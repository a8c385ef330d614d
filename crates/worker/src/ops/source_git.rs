//! `git://` sources: a checkout of one commit through the git CLI
//! (`source/git/gitsource.go` and `source/git/identifier.go` in moby/buildkit v0.11.6).
//!
//! Identifier: `git://<remote>#<ref>[:<subdir>]`. The URL fetched is `git.fullurl` when set
//! (no scheme: `https://` is assumed), else `https://<remote>`. An empty ref is the remote's
//! `HEAD`.
//!
//! Cache key: the commit the ref names, found with `git ls-remote` (a 40-hex ref is taken as a
//! commit without asking), plus subdir and keep-git-dir. So a moved branch re-runs dependents
//! and an unchanged one is cached without fetching.
//!
//! Checkout: a shallow `git fetch --depth 1` of the ref into a private git dir under
//! `<root>/worker/git/tmp`, then `git checkout` into a new layer. Without `git.keepgitdir=true`
//! the layer has no `.git`; with it, the layer gets a `.git` directory of that checkout (its
//! `HEAD` at the commit). `subdir`: the named directory of the checkout becomes the root of the
//! result; it must be a plain relative path naming a directory (not a symlink), so nothing
//! outside the checkout can be reached.
//!
//! Auth: the secret named by `git.authtokensecret` (default `GIT_AUTH_TOKEN`) becomes
//! `Authorization: basic base64(x-access-token:<token>)`, the one named by
//! `git.authheadersecret` (default `GIT_AUTH_HEADER`) is sent verbatim, both only to the
//! repository's URL, as `http.<url>.extraheader` on the command line. SSH remotes, known hosts
//! and ssh socket forwarding are not supported (no session SSH agent yet).
//!
//! [`GitCli`] wraps the `git` binary: every failure carries the command's arguments, exit
//! status and stderr (secrets are never part of the arguments shown).

use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use async_trait::async_trait;
use layerstore::snapshot::{LayerMeta, RecordType, SnapshotOptions};
use protos::pb::op::Op as OpPayload;

use crate::error::{Error, ErrorKind, Result};
use crate::llbsolver::cache::blocking;
use crate::llbsolver::definition::LoadedOp;
use crate::ops::exec::store_err;
use crate::ops::BuildEnv;
use crate::result::Snap;
use crate::solver::{Op, OpContext, Solved};

/// A parsed git source.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GitSpec {
    url: String,
    reference: String,
    subdir: Option<PathBuf>,
    keep_git_dir: bool,
    token_secret: String,
    header_secret: String,
}

fn parse(
    identifier: &str,
    attrs: &std::collections::BTreeMap<String, String>,
) -> std::result::Result<GitSpec, String> {
    let rest = identifier
        .strip_prefix("git://")
        .ok_or_else(|| format!("not a git identifier: {identifier:?}"))?;
    let (remote, fragment) = match rest.split_once('#') {
        Some((r, f)) => (r, f),
        None => (rest, ""),
    };
    let (reference, subdir) = match fragment.split_once(':') {
        Some((r, s)) => (r, s),
        None => (fragment, ""),
    };
    let url = match attrs.get("git.fullurl") {
        Some(u) if u.contains("://") => u.clone(),
        Some(u) if !u.is_empty() => format!("https://{u}"),
        _ => format!("https://{remote}"),
    };
    if remote.is_empty() && !attrs.contains_key("git.fullurl") {
        return Err("empty git remote".into());
    }
    if reference.starts_with('-') || reference.contains(char::is_whitespace) {
        return Err(format!("invalid git ref {reference:?}"));
    }
    let subdir = match subdir.trim_matches('/') {
        "" | "." => None,
        s => {
            let p = PathBuf::from(s);
            if !p.components().all(|c| matches!(c, Component::Normal(_))) {
                return Err(format!(
                    "invalid git subdir {s:?}: must be a plain relative path"
                ));
            }
            Some(p)
        }
    };
    Ok(GitSpec {
        url,
        reference: reference.to_string(),
        subdir,
        keep_git_dir: attrs.get("git.keepgitdir").is_some_and(|v| v == "true"),
        token_secret: attrs
            .get("git.authtokensecret")
            .cloned()
            .unwrap_or_else(|| "GIT_AUTH_TOKEN".into()),
        header_secret: attrs
            .get("git.authheadersecret")
            .cloned()
            .unwrap_or_else(|| "GIT_AUTH_HEADER".into()),
    })
}

/// The solver op for `op`.
pub(crate) fn new(op: &LoadedOp, env: &Arc<BuildEnv>) -> Result<Arc<dyn Op<Snap>>> {
    let OpPayload::Source(s) = op.payload() else {
        return Err(Error::Internal(
            "source_git::new called with another op".into(),
        ));
    };
    let spec = parse(&s.identifier, &s.attrs).map_err(|r| Error::invalid_op(&op.digest, r))?;
    Ok(Arc::new(GitSource {
        spec,
        env: env.clone(),
        resolved: tokio::sync::OnceCell::new(),
    }))
}

struct GitSource {
    spec: GitSpec,
    env: Arc<BuildEnv>,
    /// (commit, auth config args) once resolved in this build.
    resolved: tokio::sync::OnceCell<(String, Vec<String>)>,
}

/// A `git` invocation failed.
#[derive(Debug, thiserror::Error)]
#[error("git {args}: {status}: {stderr}")]
struct GitError {
    /// The arguments (never containing secrets).
    args: String,
    /// Exit status (or spawn failure).
    status: String,
    /// Trimmed stderr.
    stderr: String,
}

/// Typed runner of the `git` binary with a fixed environment: no prompts, no system or user
/// config, protocol `file` allowed (tests and local mirrors).
struct GitCli {
    /// `-c key=value` pairs carrying secrets (not shown in errors).
    secret_config: Vec<String>,
    git_dir: Option<PathBuf>,
    work_tree: Option<PathBuf>,
}

impl GitCli {
    fn run(&self, args: &[&str]) -> std::result::Result<String, GitError> {
        let mut cmd = Command::new("git");
        for c in &self.secret_config {
            cmd.arg("-c").arg(c);
        }
        cmd.args([
            "-c",
            "protocol.file.allow=always",
            "-c",
            "advice.detachedHead=false",
        ]);
        if let Some(d) = &self.git_dir {
            cmd.arg("--git-dir").arg(d);
        }
        if let Some(w) = &self.work_tree {
            cmd.arg("--work-tree").arg(w);
        }
        cmd.args(args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_ASKPASS", "true")
            .stdin(std::process::Stdio::null());
        let shown = args.join(" ");
        let out = cmd.output().map_err(|e| GitError {
            args: shown.clone(),
            status: "could not run git".into(),
            stderr: e.to_string(),
        })?;
        if !out.status.success() {
            return Err(GitError {
                args: shown,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn git_err(kind: ErrorKind, e: GitError) -> Error {
    Error::Op {
        message: e.to_string(),
        kind,
        source: Some(Box::new(e)),
    }
}

/// Picks the commit for `reference` from `git ls-remote` output.
fn pick_ref(ls_remote: &str, reference: &str) -> Option<String> {
    let entries: Vec<(&str, &str)> = ls_remote
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .collect();
    let find = |name: &str| {
        entries
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(c, _)| c.to_string())
    };
    if reference.is_empty() || reference == "HEAD" {
        return find("HEAD");
    }
    let candidates = if reference.starts_with("refs/") {
        vec![reference.to_string()]
    } else {
        vec![
            format!("refs/heads/{reference}"),
            format!("refs/tags/{reference}"),
        ]
    };
    for c in candidates {
        // An annotated tag: the peeled entry names the commit.
        if let Some(sha) = find(&format!("{c}^{{}}")).or_else(|| find(&c)) {
            return Some(sha);
        }
    }
    None
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl GitSource {
    async fn auth_config(&self) -> Result<Vec<String>> {
        let mut cfg = Vec::new();
        if !self.spec.url.starts_with("http") {
            return Ok(cfg);
        }
        if let Some(h) = self
            .env
            .session
            .get_secret(&self.spec.header_secret)
            .await?
        {
            let h = String::from_utf8_lossy(&h).trim().to_string();
            cfg.push(format!(
                "http.{}.extraheader=Authorization: {h}",
                self.spec.url
            ));
        } else if let Some(t) = self.env.session.get_secret(&self.spec.token_secret).await? {
            use base64_lite::encode;
            let t = String::from_utf8_lossy(&t).trim().to_string();
            cfg.push(format!(
                "http.{}.extraheader=Authorization: basic {}",
                self.spec.url,
                encode(format!("x-access-token:{t}").as_bytes())
            ));
        }
        Ok(cfg)
    }

    async fn resolve(&self, ctx: &OpContext) -> Result<&(String, Vec<String>)> {
        self.resolved
            .get_or_try_init(|| async {
                let auth = self.auth_config().await?;
                if is_commit(&self.spec.reference) {
                    return Ok((self.spec.reference.to_ascii_lowercase(), auth));
                }
                let spec = self.spec.clone();
                let auth2 = auth.clone();
                let fut = blocking(move || {
                    let git = GitCli {
                        secret_config: auth2,
                        git_dir: None,
                        work_tree: None,
                    };
                    let out = git
                        .run(&["ls-remote", "--", &spec.url])
                        .map_err(|e| git_err(ErrorKind::Unavailable, e))?;
                    pick_ref(&out, &spec.reference).ok_or_else(|| Error::Op {
                        message: format!(
                            "repository {} does not contain ref {:?}",
                            spec.url, spec.reference
                        ),
                        kind: ErrorKind::NotFound,
                        source: None,
                    })
                });
                let commit = tokio::select! {
                    r = fut => r?,
                    _ = ctx.cancel.cancelled() => return Err(Error::Canceled),
                };
                Ok((commit, auth))
            })
            .await
    }
}

/// Fetches `commit` (via `reference` when it is a name) and checks it out into `dest`.
fn checkout(
    spec: &GitSpec,
    commit: &str,
    auth: &[String],
    tmp_root: &Path,
    dest: &Path,
) -> Result<()> {
    std::fs::create_dir_all(tmp_root).map_err(|e| Error::io("create directory", tmp_root, e))?;
    let tmp = tempdir_in(tmp_root)?;
    let git_dir = tmp.0.join("git");
    let work = tmp.0.join("work");
    std::fs::create_dir(&work).map_err(|e| Error::io("create directory", &work, e))?;
    let bare = GitCli {
        secret_config: auth.to_vec(),
        git_dir: None,
        work_tree: None,
    };
    bare.run(&["init", "--bare", "--quiet", &git_dir.to_string_lossy()])
        .map_err(|e| git_err(ErrorKind::Internal, e))?;
    let git = GitCli {
        secret_config: auth.to_vec(),
        git_dir: Some(git_dir.clone()),
        work_tree: Some(work.clone()),
    };
    let want = if is_commit(&spec.reference) || spec.reference.is_empty() {
        commit.to_string()
    } else {
        spec.reference.clone()
    };
    // A shallow fetch first; servers that cannot serve one (git's "dumb" HTTP transport) get a
    // full fetch, as BuildKit retries.
    let fetch = |what: &str| {
        git.run(&[
            "fetch",
            "--quiet",
            "--depth",
            "1",
            "--no-tags",
            "--",
            &spec.url,
            what,
        ])
        .or_else(|e| {
            let msg = e.to_string();
            if msg.contains("shallow") || msg.contains("--depth") {
                git.run(&["fetch", "--quiet", "--no-tags", "--", &spec.url, what])
            } else {
                Err(e)
            }
        })
    };
    let fetched = fetch(&want);
    if let Err(e) = fetched {
        // Some servers refuse fetching by name after a ref moved or by commit; try the other.
        let alt = if want == commit {
            spec.reference.as_str()
        } else {
            commit
        };
        if alt.is_empty() {
            return Err(git_err(ErrorKind::Unavailable, e));
        }
        fetch(alt).map_err(|_| git_err(ErrorKind::Unavailable, e))?;
    }
    let head = git
        .run(&["rev-parse", "FETCH_HEAD^{commit}"])
        .map_err(|e| git_err(ErrorKind::Internal, e))?;
    if head.trim() != commit {
        return Err(Error::Op {
            message: format!(
                "ref {:?} of {} moved while fetching: expected {commit}, got {}",
                spec.reference,
                spec.url,
                head.trim()
            ),
            kind: ErrorKind::Unavailable,
            source: None,
        });
    }
    git.run(&["checkout", "--quiet", "--force", commit, "--", "."])
        .map_err(|e| git_err(ErrorKind::Internal, e))?;
    // Point HEAD at the commit (detached) for keep-git-dir users.
    git.run(&["update-ref", "--no-deref", "HEAD", commit])
        .map_err(|e| git_err(ErrorKind::Internal, e))?;
    let src = match &spec.subdir {
        None => work.clone(),
        Some(s) => {
            let p = work.join(s);
            // Each component must be a real directory of the checkout (no symlink hops).
            let mut cur = work.clone();
            for c in s.components() {
                cur.push(c);
                let md = std::fs::symlink_metadata(&cur).map_err(|_| Error::PathNotFound {
                    path: s.display().to_string(),
                })?;
                if !md.is_dir() {
                    return Err(Error::InvalidPath {
                        path: s.display().to_string(),
                        reason: "git subdir is not a directory of the checkout".into(),
                    });
                }
            }
            p
        }
    };
    move_children(&src, dest)?;
    if spec.keep_git_dir {
        let dst_git = dest.join(".git");
        std::fs::rename(&git_dir, &dst_git).map_err(|e| Error::io("rename", &dst_git, e))?;
        // A normal (non-bare) repository whose work tree is its parent.
        let g = GitCli {
            secret_config: vec![],
            git_dir: Some(dst_git),
            work_tree: None,
        };
        g.run(&["config", "core.bare", "false"])
            .map_err(|e| git_err(ErrorKind::Internal, e))?;
    }
    Ok(())
}

fn move_children(src: &Path, dest: &Path) -> Result<()> {
    for e in std::fs::read_dir(src).map_err(|e| Error::io("read directory", src, e))? {
        let e = e.map_err(|e| Error::io("read directory", src, e))?;
        let to = dest.join(e.file_name());
        std::fs::rename(e.path(), &to).map_err(|err| Error::io("rename", &to, err))?;
    }
    Ok(())
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir_in(root: &Path) -> Result<TempDir> {
    for i in 0..1000u32 {
        let p = root.join(format!("{}-{}-{i}", std::process::id(), nanos()));
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok(TempDir(p)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io("create directory", &p, e)),
        }
    }
    Err(Error::Internal("no free temporary directory name".into()))
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

/// Minimal standard base64 (only for the auth header; avoids a dependency for 20 lines).
mod base64_lite {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub(super) fn encode(data: &[u8]) -> String {
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

#[async_trait]
impl Op<Snap> for GitSource {
    fn pin(&self) -> Option<String> {
        self.resolved.get().map(|(commit, _)| commit.clone())
    }

    async fn cache_key(&self, ctx: &OpContext, _inputs: &[Solved<Snap>]) -> Result<String> {
        let (commit, _) = self.resolve(ctx).await?;
        let mut h = crate::digest::KeyHasher::new("git");
        h.field(commit.as_bytes())
            .field(
                self.spec
                    .subdir
                    .as_deref()
                    .unwrap_or(Path::new(""))
                    .as_os_str()
                    .as_encoded_bytes(),
            )
            .field(&[self.spec.keep_git_dir as u8]);
        if self.spec.keep_git_dir {
            // The .git dir records the URL.
            h.field(self.spec.url.as_bytes());
        }
        Ok(h.finish())
    }

    async fn exec(&self, ctx: &OpContext, _inputs: &[Solved<Snap>]) -> Result<Vec<Snap>> {
        let (commit, auth) = self.resolve(ctx).await?.clone();
        let spec = self.spec.clone();
        let store = self.env.store.clone();
        let tmp_root = self.env.opts.root.join("worker").join("git").join("tmp");
        let fut = blocking(move || {
            let mut opts =
                SnapshotOptions::new(format!("git snapshot for {}#{}", spec.url, commit));
            opts.record_type = RecordType::GitCheckout;
            let mut failure = None;
            let res = store.add_layer(None, &opts, |dir| {
                if let Err(e) = checkout(&spec, &commit, &auth, &tmp_root, dir) {
                    let msg = e.to_string();
                    failure = Some(e);
                    return Err(layerstore::Error::Io {
                        op: "git checkout",
                        path: dir.to_path_buf(),
                        source: std::io::Error::other(msg),
                    });
                }
                Ok(LayerMeta::default())
            });
            let (id, _) = match res {
                Ok(r) => r,
                Err(e) => {
                    return Err(failure.unwrap_or_else(|| store_err("record git checkout")(e)))
                }
            };
            Snap::acquire(&store, id)
        });
        let snap = tokio::select! {
            r = fut => r?,
            _ = ctx.cancel.cancelled() => return Err(Error::Canceled),
        };
        Ok(vec![snap])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(kv: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn identifiers() {
        let s = parse("git://github.com/moby/buildkit#v0.11.6:docs", &attrs(&[])).unwrap();
        assert_eq!(s.url, "https://github.com/moby/buildkit");
        assert_eq!(s.reference, "v0.11.6");
        assert_eq!(s.subdir, Some(PathBuf::from("docs")));
        let s = parse(
            "git://x/repo.git",
            &attrs(&[
                ("git.fullurl", "file:///srv/repo.git"),
                ("git.keepgitdir", "true"),
            ]),
        )
        .unwrap();
        assert_eq!(s.url, "file:///srv/repo.git");
        assert_eq!(s.reference, "");
        assert_eq!(s.subdir, None);
        assert!(s.keep_git_dir);
        let s = parse("git://h/r", &attrs(&[("git.fullurl", "h.example/r.git")])).unwrap();
        assert_eq!(s.url, "https://h.example/r.git");
        assert!(parse("git://h/r#main:../x", &attrs(&[])).is_err());
        assert!(parse("git://h/r#--upload-pack=x", &attrs(&[])).is_err());
    }

    #[test]
    fn refs() {
        let out = "aaaa\tHEAD\nbbbb\trefs/heads/main\ncccc\trefs/tags/v1\ndddd\trefs/tags/v1^{}\neeee\trefs/tags/v2\n";
        assert_eq!(pick_ref(out, ""), Some("aaaa".into()));
        assert_eq!(pick_ref(out, "main"), Some("bbbb".into()));
        assert_eq!(pick_ref(out, "v1"), Some("dddd".into()));
        assert_eq!(pick_ref(out, "v2"), Some("eeee".into()));
        assert_eq!(pick_ref(out, "refs/heads/main"), Some("bbbb".into()));
        assert_eq!(pick_ref(out, "nope"), None);
    }

    #[test]
    fn base64() {
        assert_eq!(
            base64_lite::encode(b"x-access-token:abc"),
            "eC1hY2Nlc3MtdG9rZW46YWJj"
        );
        assert_eq!(base64_lite::encode(b"a"), "YQ==");
        assert_eq!(base64_lite::encode(b"ab"), "YWI=");
    }
}
