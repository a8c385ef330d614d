//! Which endpoints serve a registry domain, and how to talk to each: buildkitd.toml's
//! `[registry."host"]` (`mirrors`, `http`, `insecure`, `ca`, `keypair`), following
//! `util/resolver/resolver.go` (`NewRegistryConfig`, `fillInsecureOpts`) of BuildKit v0.11.6:
//!
//! - the endpoints of a domain are its mirrors, in order (pull and resolve only), then the domain
//!   itself (`docker.io` is served by `registry-1.docker.io`; pull, resolve and push);
//! - each endpoint is plain HTTP when its own config says `http = true`, or when `http` is unset
//!   and it is a localhost address (`localhost`, `127.0.0.1`, `::1`, any port); with
//!   `insecure = true` an HTTPS endpoint that skips certificate verification follows (after the
//!   HTTP one, if any); otherwise HTTPS verified against the system roots plus `ca`, presenting
//!   `keypair` client certificates;
//! - a domain with no config gets the same defaults (localhost plain HTTP, others HTTPS).
//!
//! A mirror's config is `[registry."<mirror>"]` (the mirror string as written, else its host).
//! A mirror may carry a path (`mirror.example/proxy`): requests go to `<path>/v2/…`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;

use crate::reference::{DOCKER_HUB_DOMAIN, DOCKER_HUB_HOST};
use crate::{Error, Result};

/// `[registry."host"]` of buildkitd.toml.
#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct HostConfig {
    /// `mirrors`: hosts (optionally with a path) tried before this one for pulls.
    pub mirrors: Vec<String>,
    /// `http`: plain HTTP (default: only for localhost).
    pub http: Option<bool>,
    /// `insecure`: HTTPS without certificate verification.
    pub insecure: Option<bool>,
    /// `ca`: PEM files of extra root certificates.
    pub ca: Vec<PathBuf>,
    /// `[[registry."host".keypair]]`: client certificates.
    pub keypair: Vec<KeyPair>,
}

/// One `[[registry."host".keypair]]`.
#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct KeyPair {
    /// `key`: PEM private key file.
    pub key: PathBuf,
    /// `cert`: PEM certificate file.
    pub cert: PathBuf,
}

/// What an endpoint may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// Resolve tags and pull blobs (mirrors).
    Pull,
    /// Also push (the domain's own host).
    PullPush,
}

/// One way of reaching a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host[:port]`, also the name credentials are asked for.
    pub host: String,
    /// Path prefix before `/v2` (empty, or `/proxy` for a mirror with a path).
    pub prefix: String,
    /// Plain HTTP instead of HTTPS.
    pub plain_http: bool,
    /// HTTPS without certificate verification.
    pub skip_verify: bool,
    /// What the endpoint may be used for.
    pub capability: Capability,
    /// The config key its TLS settings come from.
    pub(crate) config_key: Option<String>,
}

impl Endpoint {
    /// `scheme://host<prefix>/v2`.
    pub fn base_url(&self) -> String {
        let scheme = if self.plain_http { "http" } else { "https" };
        format!("{scheme}://{}{}/v2", self.host, self.prefix)
    }
}

/// True for the addresses containerd's `MatchLocalhost` treats as local (plain HTTP default).
pub fn is_localhost(host: &str) -> bool {
    let h = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else if host == "::1" {
        host
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    matches!(h, "localhost" | "127.0.0.1" | "::1")
}

/// The registry configuration and the HTTP clients built from it (one per TLS setting).
pub struct Hosts {
    configs: BTreeMap<String, HostConfig>,
    clients: Mutex<HashMap<(Option<String>, bool), reqwest::Client>>,
}

impl std::fmt::Debug for Hosts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hosts")
            .field("configs", &self.configs)
            .finish()
    }
}

impl Hosts {
    /// Hosts from `[registry."host"]` sections (keys are domains or mirror strings).
    pub fn new(configs: BTreeMap<String, HostConfig>) -> Self {
        Hosts {
            configs,
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn fill(&self, target: &str, key: Option<&str>, capability: Capability) -> Vec<Endpoint> {
        let (host, prefix) = match target.split_once('/') {
            Some((h, p)) => (h.to_string(), format!("/{}", p.trim_end_matches('/'))),
            None => (target.to_string(), String::new()),
        };
        let key = key
            .filter(|k| self.configs.contains_key(*k))
            .map(str::to_string)
            .or_else(|| self.configs.contains_key(&host).then(|| host.clone()));
        let cfg = key.as_ref().and_then(|k| self.configs.get(k));
        let http = cfg.and_then(|c| c.http);
        let insecure = cfg.and_then(|c| c.insecure).unwrap_or(false);
        let ep = |plain_http, skip_verify| Endpoint {
            host: host.clone(),
            prefix: prefix.clone(),
            plain_http,
            skip_verify,
            capability,
            config_key: key.clone(),
        };
        let mut out = Vec::new();
        if http == Some(true) || (http.is_none() && is_localhost(&host)) {
            out.push(ep(true, false));
        }
        if insecure {
            out.push(ep(false, true));
        }
        if out.is_empty() {
            out.push(ep(false, false));
        }
        out
    }

    /// The endpoints for `domain` (a reference's domain), in the order to try them.
    pub fn endpoints(&self, domain: &str) -> Vec<Endpoint> {
        let mut out = Vec::new();
        let cfg = self.configs.get(domain);
        if let Some(c) = cfg {
            for m in &c.mirrors {
                let m = m.trim();
                let (m, forced_http) = match m.strip_prefix("http://") {
                    Some(rest) => (rest, true),
                    None => (m.strip_prefix("https://").unwrap_or(m), false),
                };
                let mut eps = self.fill(m, Some(m), Capability::Pull);
                if forced_http {
                    eps.retain(|e| e.plain_http);
                    if eps.is_empty() {
                        let mut e = self.fill(m, Some(m), Capability::Pull).remove(0);
                        e.plain_http = true;
                        eps.push(e);
                    }
                }
                out.extend(eps);
            }
        }
        let host = if domain == DOCKER_HUB_DOMAIN {
            DOCKER_HUB_HOST
        } else {
            domain
        };
        let key = cfg.map(|_| domain);
        out.extend(self.fill(host, key, Capability::PullPush));
        out
    }

    /// The HTTP client for `ep` (built once per TLS setting).
    pub(crate) fn client(&self, ep: &Endpoint) -> Result<reqwest::Client> {
        let k = (ep.config_key.clone(), ep.skip_verify);
        if let Some(c) = self.clients.lock().unwrap().get(&k) {
            return Ok(c.clone());
        }
        let cfg = ep.config_key.as_ref().and_then(|k| self.configs.get(k));
        let c = build_client(&ep.host, cfg, ep.skip_verify)?;
        self.clients.lock().unwrap().insert(k, c.clone());
        Ok(c)
    }
}

/// Time to establish a TCP (and TLS) connection, as buildkitd's dialer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest silence while reading a response before the request fails (and may be retried).
const READ_TIMEOUT: Duration = Duration::from_secs(120);

fn build_client(
    host: &str,
    cfg: Option<&HostConfig>,
    skip_verify: bool,
) -> Result<reqwest::Client> {
    let config_err = |what: String, e: Option<crate::error::BoxError>| Error::Config {
        host: host.to_string(),
        what,
        source: e,
    };
    // HTTP/1.1 only: buildkitd disables HTTP/2 for registries (flow control slows pushes).
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .http1_only()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::limited(10))
        .danger_accept_invalid_certs(skip_verify);
    if let Some(c) = cfg {
        for ca in &c.ca {
            let pem = std::fs::read(ca)
                .map_err(|e| config_err(format!("read ca {}", ca.display()), Some(e.into())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| config_err(format!("parse ca {}", ca.display()), Some(e.into())))?;
            if certs.is_empty() {
                return Err(config_err(
                    format!("ca {} holds no certificate", ca.display()),
                    None,
                ));
            }
            for cert in certs {
                b = b.add_root_certificate(cert);
            }
        }
        if c.keypair.len() > 1 {
            tracing::warn!(
                host,
                "several keypairs configured; berth presents the first"
            );
        }
        if let Some(kp) = c.keypair.first() {
            let mut pem = std::fs::read(&kp.cert).map_err(|e| {
                config_err(
                    format!("read keypair cert {}", kp.cert.display()),
                    Some(e.into()),
                )
            })?;
            pem.push(b'\n');
            pem.extend(std::fs::read(&kp.key).map_err(|e| {
                config_err(
                    format!("read keypair key {}", kp.key.display()),
                    Some(e.into()),
                )
            })?);
            let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
                config_err(
                    format!("load keypair {}", kp.cert.display()),
                    Some(e.into()),
                )
            })?;
            b = b.identity(id);
        }
    }
    b.build()
        .map_err(|e| config_err("build HTTP client".into(), Some(e.into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(toml_like: &[(&str, HostConfig)]) -> Hosts {
        Hosts::new(
            toml_like
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    }

    fn urls(h: &Hosts, domain: &str) -> Vec<(String, bool, bool)> {
        h.endpoints(domain)
            .into_iter()
            .map(|e| {
                (
                    e.base_url(),
                    e.skip_verify,
                    e.capability == Capability::PullPush,
                )
            })
            .collect()
    }

    #[test]
    fn defaults_without_config() {
        let h = hosts(&[]);
        assert_eq!(
            urls(&h, "docker.io"),
            [("https://registry-1.docker.io/v2".into(), false, true)]
        );
        assert_eq!(
            urls(&h, "localhost:5000"),
            [("http://localhost:5000/v2".into(), false, true)]
        );
        assert_eq!(
            urls(&h, "127.0.0.1:5000"),
            [("http://127.0.0.1:5000/v2".into(), false, true)]
        );
        assert_eq!(
            urls(&h, "[::1]:5000"),
            [("http://[::1]:5000/v2".into(), false, true)]
        );
        assert_eq!(
            urls(&h, "ghcr.io"),
            [("https://ghcr.io/v2".into(), false, true)]
        );
    }

    #[test]
    fn mirrors_then_upstream_with_insecure_opts() {
        let h = hosts(&[
            (
                "docker.io",
                HostConfig {
                    mirrors: vec!["localhost:5555".into(), "mirror.example/proxy".into()],
                    ..Default::default()
                },
            ),
            (
                "mirror.example/proxy",
                HostConfig {
                    insecure: Some(true),
                    http: Some(true),
                    ..Default::default()
                },
            ),
            (
                "reg.example:5000",
                HostConfig {
                    insecure: Some(true),
                    ..Default::default()
                },
            ),
            (
                "localhost:6000",
                HostConfig {
                    http: Some(false),
                    ..Default::default()
                },
            ),
        ]);
        assert_eq!(
            urls(&h, "docker.io"),
            [
                ("http://localhost:5555/v2".into(), false, false),
                ("http://mirror.example/proxy/v2".into(), false, false),
                ("https://mirror.example/proxy/v2".into(), true, false),
                ("https://registry-1.docker.io/v2".into(), false, true),
            ]
        );
        assert_eq!(
            urls(&h, "reg.example:5000"),
            [("https://reg.example:5000/v2".into(), true, true)]
        );
        assert_eq!(
            urls(&h, "localhost:6000"),
            [("https://localhost:6000/v2".into(), false, true)],
            "http = false overrides the localhost default"
        );
    }

    #[test]
    fn bad_tls_files_are_config_errors() {
        let h = hosts(&[(
            "reg.example",
            HostConfig {
                ca: vec!["/nonexistent/ca.pem".into()],
                ..Default::default()
            },
        )]);
        let ep = h.endpoints("reg.example").remove(0);
        let e = h.client(&ep).unwrap_err();
        assert!(e.to_string().contains("read ca /nonexistent/ca.pem"), "{e}");
    }
}
