//! Picking the manifest of one platform out of an index (manifest list), as containerd's
//! `platforms.Only` matcher does for a single platform: same OS and architecture, and the same
//! variant after normalisation (`arm64` ≡ `arm64/v8`, `arm` ≡ `arm/v7`, `amd64` ≡ `amd64/v1`);
//! a request without variant takes the first entry of that OS and architecture whose variant
//! normalises to the default.

use std::fmt;

/// `os/architecture[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// `amd64`, `arm64`, … (Go names).
    pub architecture: String,
    /// `v8`, `v7`, … or empty.
    pub variant: String,
}

impl Platform {
    /// The platform berthd runs on.
    pub fn native() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            other => other,
        };
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: String::new(),
        }
    }

    /// Parses `os/arch[/variant]`.
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.split('/');
        let os = it.next().filter(|s| !s.is_empty())?;
        let architecture = it.next().filter(|s| !s.is_empty())?;
        let variant = it.next().unwrap_or("");
        if it.next().is_some() {
            return None;
        }
        Some(Platform {
            os: os.to_string(),
            architecture: architecture.to_string(),
            variant: variant.to_string(),
        })
    }

    fn normalized_variant(&self) -> &str {
        match (self.architecture.as_str(), self.variant.as_str()) {
            ("arm64", "") | ("arm64", "8") => "v8",
            ("arm", "") | ("arm", "7") => "v7",
            ("amd64", "") => "v1",
            (_, v) => v,
        }
    }

    /// Whether an index entry of platform `other` serves this platform.
    pub fn matches(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && self.normalized_variant() == other.normalized_variant()
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if !self.variant.is_empty() {
            write!(f, "/{}", self.variant)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching() {
        let p = |s| Platform::parse(s).unwrap();
        assert!(p("linux/amd64").matches(&p("linux/amd64")));
        assert!(p("linux/arm64").matches(&p("linux/arm64/v8")));
        assert!(p("linux/arm/v7").matches(&p("linux/arm")));
        assert!(!p("linux/arm/v6").matches(&p("linux/arm")));
        assert!(!p("linux/amd64").matches(&p("windows/amd64")));
        assert!(!p("linux/amd64").matches(&p("linux/arm64")));
        assert_eq!(Platform::parse("linux"), None);
        assert_eq!(p("linux/arm/v7").to_string(), "linux/arm/v7");
    }
}
