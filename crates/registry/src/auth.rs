//! Registry authentication as BuildKit does it (`util/resolver/authorizer.go`,
//! `session/auth/auth.go` at v0.11.6), with the client's session as the source of secrets:
//!
//! - a request is first sent with what is cached for its host and scope; a `401` carries a
//!   `WWW-Authenticate` challenge;
//! - `Basic`: the session's credentials for the host ([`AuthProvider::credentials`]);
//! - `Bearer realm=…,service=…`: a token for the request's scopes, first from the session itself
//!   ([`AuthProvider::fetch_token`], BuildKit's `Auth.FetchToken`: the client fetches the token
//!   and the secret never reaches the daemon), else fetched here with the session's
//!   credentials — `GET realm?service=&scope=` with Basic auth for a user/password, the OAuth2
//!   `POST realm` refresh-token grant for an identity token (empty user name), anonymous
//!   `GET` without credentials;
//! - tokens are cached per host and scope set until they expire.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use serde::Deserialize;

use crate::error::BoxError;
use crate::Error;

/// Credentials for a registry host.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name; empty means `secret` is an identity (refresh) token.
    pub username: String,
    /// Password or identity token.
    pub secret: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// What a bearer challenge asks for (BuildKit's `FetchTokenRequest`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// The registry host.
    pub host: String,
    /// The token server.
    pub realm: String,
    /// The `service` parameter.
    pub service: String,
    /// Scopes (`repository:library/busybox:pull`).
    pub scopes: Vec<String>,
}

/// A bearer token and how long it lives.
#[derive(Clone)]
pub struct Token {
    /// The token.
    pub token: String,
    /// Lifetime in seconds (`None`: the registry default of 60 s).
    pub expires_in: Option<u64>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// Where secrets come from (the client's session `Auth` service).
#[async_trait]
pub trait AuthProvider: Send + Sync {
    /// Credentials for `host`, `None` for anonymous.
    async fn credentials(&self, host: &str) -> std::result::Result<Option<Credentials>, BoxError>;

    /// A token fetched by the client itself; `Ok(None)` when the client does not offer this
    /// (then the token is fetched here with [`AuthProvider::credentials`]).
    async fn fetch_token(
        &self,
        req: &TokenRequest,
    ) -> std::result::Result<Option<Token>, BoxError> {
        let _ = req;
        Ok(None)
    }
}

/// No credentials at all.
#[derive(Debug, Default, Clone, Copy)]
pub struct Anonymous;

#[async_trait]
impl AuthProvider for Anonymous {
    async fn credentials(&self, _host: &str) -> std::result::Result<Option<Credentials>, BoxError> {
        Ok(None)
    }
}

/// Fixed credentials for every host (tests, tools).
#[derive(Debug, Clone)]
pub struct StaticCredentials(pub Credentials);

#[async_trait]
impl AuthProvider for StaticCredentials {
    async fn credentials(&self, _host: &str) -> std::result::Result<Option<Credentials>, BoxError> {
        Ok(Some(self.0.clone()))
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer { realm: String, service: String },
}

/// Parses the first Basic or Bearer challenge of a `WWW-Authenticate` value.
pub(crate) fn parse_challenge(v: &str) -> Option<Challenge> {
    let v = v.trim();
    let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
    let params = parse_params(rest);
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if scheme.eq_ignore_ascii_case("bearer") {
        let realm = params.get("realm")?.clone();
        return Some(Challenge::Bearer {
            realm,
            service: params.get("service").cloned().unwrap_or_default(),
        });
    }
    None
}

fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i] == b' ' || b[i] == b',') {
            i += 1;
        }
        let ks = i;
        while i < b.len() && b[i] != b'=' && b[i] != b',' {
            i += 1;
        }
        let key = s[ks..i].trim().to_ascii_lowercase();
        if i >= b.len() || b[i] != b'=' {
            continue;
        }
        i += 1;
        let mut val = String::new();
        if i < b.len() && b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                let ch_len = s[i..].chars().next().map_or(1, char::len_utf8);
                val.push_str(&s[i..i + ch_len]);
                i += ch_len;
            }
            i += 1;
        } else {
            let vs = i;
            while i < b.len() && b[i] != b',' {
                i += 1;
            }
            val = s[vs..i].trim().to_string();
        }
        out.insert(key, val);
    }
    out
}

/// `Authorization` header values cached per (host, scope set).
#[derive(Default)]
pub(crate) struct TokenCache {
    entries: HashMap<(String, String), (String, Option<Instant>)>,
}

impl TokenCache {
    pub(crate) fn get(&self, host: &str, scopes: &str) -> Option<String> {
        let (v, until) = self.entries.get(&(host.to_string(), scopes.to_string()))?;
        match until {
            Some(t) if *t <= Instant::now() => None,
            _ => Some(v.clone()),
        }
    }

    pub(crate) fn put(&mut self, host: &str, scopes: &str, value: String, ttl: Option<Duration>) {
        let until = ttl.map(|t| Instant::now() + t);
        self.entries
            .insert((host.to_string(), scopes.to_string()), (value, until));
    }
}

pub(crate) fn basic_header(c: &Credentials) -> String {
    let raw = format!("{}:{}", c.username, c.secret);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: String,
    #[serde(default)]
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// The client id BuildKit sends in OAuth requests.
const CLIENT_ID: &str = "buildkit-client";

/// What went wrong fetching a token: the status and message, for [`Error::Unauthorized`].
pub(crate) struct TokenFailure {
    pub(crate) status: u16,
    pub(crate) message: String,
    pub(crate) network: Option<BoxError>,
}

/// Fetches a token from `req.realm` with `creds` (see module docs). Returns the header value and
/// its lifetime.
pub(crate) async fn fetch_token(
    client: &reqwest::Client,
    req: &TokenRequest,
    creds: Option<&Credentials>,
) -> std::result::Result<(String, Option<Duration>), TokenFailure> {
    let resp = match creds {
        Some(c) if c.username.is_empty() => {
            let mut form = vec![
                ("grant_type", "refresh_token".to_string()),
                ("refresh_token", c.secret.clone()),
                ("client_id", CLIENT_ID.to_string()),
                ("service", req.service.clone()),
            ];
            if !req.scopes.is_empty() {
                form.push(("scope", req.scopes.join(" ")));
            }
            client.post(&req.realm).form(&form).send().await
        }
        _ => {
            let mut q: Vec<(&str, String)> = Vec::new();
            if !req.service.is_empty() {
                q.push(("service", req.service.clone()));
            }
            for s in &req.scopes {
                q.push(("scope", s.clone()));
            }
            let mut rb = client.get(&req.realm).query(&q);
            if let Some(c) = creds {
                rb = rb.basic_auth(&c.username, Some(&c.secret));
            }
            rb.send().await
        }
    };
    let resp = resp.map_err(|e| TokenFailure {
        status: 0,
        message: format!("token server {}: {e}", req.realm),
        network: Some(e.into()),
    })?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| TokenFailure {
        status: status.as_u16(),
        message: format!("token server {}: {e}", req.realm),
        network: Some(e.into()),
    })?;
    if !status.is_success() {
        return Err(TokenFailure {
            status: status.as_u16(),
            message: format!(
                "token server {} answered {}: {}",
                req.realm,
                status.as_u16(),
                String::from_utf8_lossy(&body[..body.len().min(300)]).trim()
            ),
            network: None,
        });
    }
    let t: TokenResponse = serde_json::from_slice(&body).map_err(|e| TokenFailure {
        status: status.as_u16(),
        message: format!("token server {}: invalid response: {e}", req.realm),
        network: None,
    })?;
    let token = if t.token.is_empty() {
        t.access_token
    } else {
        t.token
    };
    if token.is_empty() {
        return Err(TokenFailure {
            status: status.as_u16(),
            message: format!("token server {} returned no token", req.realm),
            network: None,
        });
    }
    Ok((format!("Bearer {token}"), Some(ttl(t.expires_in))))
}

/// Cache lifetime for a token: its `expires_in` (default 60 s) less a margin.
pub(crate) fn ttl(expires_in: Option<u64>) -> Duration {
    let secs = expires_in.filter(|s| *s > 0).unwrap_or(60);
    Duration::from_secs(secs.saturating_sub(10).max(1))
}

pub(crate) fn auth_err(host: &str, e: BoxError) -> Error {
    Error::Auth {
        host: host.to_string(),
        source: e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: "registry.docker.io".into()
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(r#"bearer realm="http://127.0.0.1:1/t""#),
            Some(Challenge::Bearer {
                realm: "http://127.0.0.1:1/t".into(),
                service: String::new()
            })
        );
        assert_eq!(
            parse_challenge("Bearer service=x"),
            None,
            "bearer needs a realm"
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
        let p = parse_params(r#"realm="a\"b", x=y ,z="""#);
        assert_eq!(p["realm"], "a\"b");
        assert_eq!(p["x"], "y");
        assert_eq!(p["z"], "");
    }

    #[test]
    fn token_cache_expires() {
        let mut c = TokenCache::default();
        c.put("h", "s", "Bearer t".into(), Some(Duration::from_secs(60)));
        assert_eq!(c.get("h", "s").as_deref(), Some("Bearer t"));
        assert_eq!(c.get("h", "other"), None);
        c.put("h", "s", "Bearer t".into(), Some(Duration::ZERO));
        assert_eq!(c.get("h", "s"), None);
        assert_eq!(ttl(None), Duration::from_secs(50));
        assert_eq!(ttl(Some(5)), Duration::from_secs(1));
    }
}
