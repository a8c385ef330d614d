//! Image references, normalised the way Docker and BuildKit do (`docker/distribution/reference`'s
//! `ParseNormalizedNamed`): a first path component is a registry host only when it contains `.`
//! or `:` or is `localhost`; otherwise the image is on Docker Hub (`docker.io`), where a
//! one-component name gets `library/`. `index.docker.io` is `docker.io`. A reference with neither
//! tag nor digest means `:latest`.

use std::fmt;

use crate::{Error, Result};

/// Docker Hub's canonical domain in references.
pub const DOCKER_HUB_DOMAIN: &str = "docker.io";
/// The host Docker Hub's registry API is served from.
pub const DOCKER_HUB_HOST: &str = "registry-1.docker.io";

/// A normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    domain: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

fn invalid(reference: &str, reason: impl Into<String>) -> Error {
    Error::InvalidReference {
        reference: reference.to_string(),
        reason: reason.into(),
    }
}

/// Checks a `sha256:<64 hex>` digest (the only algorithm berth accepts).
pub fn check_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

impl Reference {
    /// Parses and normalises `s` (`busybox`, `docker.io/library/busybox:latest`,
    /// `localhost:5000/a/b@sha256:…`, `name:tag@sha256:…`).
    pub fn parse(s: &str) -> Result<Self> {
        if s.is_empty() {
            return Err(invalid(s, "empty"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                if !check_digest(d) {
                    return Err(invalid(s, format!("invalid digest {d:?}")));
                }
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let (n, t) = rest.split_at(last_slash + i);
                (n, Some(t[1..].to_string()))
            }
            None => (rest, None),
        };
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                && !t.starts_with(['.', '-']);
            if !ok {
                return Err(invalid(s, format!("invalid tag {t:?}")));
            }
        }
        let (domain, path) = match name.split_once('/') {
            Some((first, p))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), p.to_string())
            }
            _ => (DOCKER_HUB_DOMAIN.to_string(), name.to_string()),
        };
        let domain = if domain == "index.docker.io" {
            DOCKER_HUB_DOMAIN.to_string()
        } else {
            domain
        };
        if domain
            .bytes()
            .any(|b| !(b.is_ascii_alphanumeric() || b".-:[]".contains(&b)))
        {
            return Err(invalid(s, format!("invalid registry host {domain:?}")));
        }
        let repository = if domain == DOCKER_HUB_DOMAIN && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let comp_ok = |c: &str| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.as_bytes()[0].is_ascii_alphanumeric()
                && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
        };
        if repository.is_empty() || !repository.split('/').all(comp_ok) {
            return Err(invalid(
                s,
                "repository name must be lowercase letters, digits and separators (._-/)",
            ));
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(Reference {
            domain,
            repository,
            tag,
            digest,
        })
    }

    /// The registry domain (`docker.io`, `localhost:5000`).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The repository path (`library/busybox`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if any.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if any.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// What to ask the registry's manifest endpoint for: the digest if any, else the tag.
    pub fn object(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// `domain/repository` (`docker.io/library/busybox`).
    pub fn name(&self) -> String {
        format!("{}/{}", self.domain, self.repository)
    }

    /// The same repository with `digest` instead of tag and digest.
    pub fn with_digest(&self, digest: &str) -> Reference {
        Reference {
            domain: self.domain.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest.to_string()),
        }
    }

    /// The same repository with `tag` only.
    pub fn with_tag(&self, tag: &str) -> Reference {
        Reference {
            domain: self.domain.clone(),
            repository: self.repository.clone(),
            tag: Some(tag.to_string()),
            digest: None,
        }
    }

    /// The shortest form Docker shows (`busybox:latest`, `user/app:v1`,
    /// `localhost:5000/app:v1`), as `docker images` and `docker tag` use it.
    pub fn familiar(&self) -> String {
        let name = if self.domain == DOCKER_HUB_DOMAIN {
            self.repository
                .strip_prefix("library/")
                .filter(|r| !r.contains('/'))
                .unwrap_or(&self.repository)
                .to_string()
        } else {
            self.name()
        };
        let mut s = name;
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(d);
        }
        s
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Reference::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_docker() {
        let d = format!("sha256:{}", "a".repeat(64));
        let cases = [
            (
                "busybox",
                "docker.io/library/busybox:latest",
                "busybox:latest",
            ),
            ("busybox:1", "docker.io/library/busybox:1", "busybox:1"),
            (
                "docker.io/library/busybox:latest",
                "docker.io/library/busybox:latest",
                "busybox:latest",
            ),
            (
                "index.docker.io/user/app",
                "docker.io/user/app:latest",
                "user/app:latest",
            ),
            ("user/app:v1", "docker.io/user/app:v1", "user/app:v1"),
            (
                "localhost/app",
                "localhost/app:latest",
                "localhost/app:latest",
            ),
            (
                "localhost:5000/a/b:c",
                "localhost:5000/a/b:c",
                "localhost:5000/a/b:c",
            ),
            (
                "127.0.0.1:5000/x",
                "127.0.0.1:5000/x:latest",
                "127.0.0.1:5000/x:latest",
            ),
            ("ghcr.io/o/r", "ghcr.io/o/r:latest", "ghcr.io/o/r:latest"),
        ];
        for (input, full, familiar) in cases {
            let r = Reference::parse(input).unwrap();
            assert_eq!(r.to_string(), full, "{input}");
            assert_eq!(r.familiar(), familiar, "{input}");
        }
        let r = Reference::parse(&format!("alpine@{d}")).unwrap();
        assert_eq!(r.tag(), None);
        assert_eq!(r.object(), d);
        assert_eq!(r.to_string(), format!("docker.io/library/alpine@{d}"));
        let r = Reference::parse(&format!("alpine:3@{d}")).unwrap();
        assert_eq!(r.tag(), Some("3"));
        assert_eq!(r.object(), d);
    }

    #[test]
    fn rejects_bad_references() {
        for bad in [
            "",
            "Busybox",
            "busybox:",
            "busybox@sha256:00",
            "a//b",
            "-a/b",
            "localhost:5000/",
            "bad host!/x",
            "x:-tag",
        ] {
            let e = Reference::parse(bad).unwrap_err();
            assert!(e.to_string().contains("invalid reference"), "{bad}: {e}");
        }
    }
}
