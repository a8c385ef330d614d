//! Small rules the converter borrows from Go libraries: `.dockerignore` reading
//! (`frontend/dockerfile/dockerignore`), containerd's platform strings, `path.Clean`/`path.Join`,
//! `nat.ParsePortSpecs`, `signal.ParseSignal`, and the `fmt` verbs upstream uses in history
//! entries.

use crate::parser::go_quote;

/// `dockerignore.ReadAll`: patterns, cleaned, with `!` kept.
pub fn read_dockerignore(data: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(data);
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut out = vec![];
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.starts_with('#') {
            continue;
        }
        let mut pattern = line.trim();
        if pattern.is_empty() {
            continue;
        }
        let invert = pattern.starts_with('!');
        if invert {
            pattern = pattern[1..].trim();
        }
        let mut p = String::new();
        if !pattern.is_empty() {
            p = clean(pattern);
            if p.len() > 1 && p.starts_with('/') {
                p.remove(0);
            }
        }
        if invert {
            p.insert(0, '!');
        }
        out.push(p);
    }
    out
}

/// A build context that names a git repository (`gitutil.ParseGitRef`): the remote and the
/// `commit[:subdir]` to check out. `http(s)://` URLs count only when the path ends in `.git`
/// (before any `#fragment`); `git://`, `ssh://`, `user@host:path` and `github.com/…` always.
pub fn git_ref(s: &str) -> Option<(String, String)> {
    let scp_like = || {
        let Some((user, rest)) = s.split_once('@') else {
            return false;
        };
        !user.is_empty()
            && !user.contains('/')
            && rest
                .split_once(':')
                .is_some_and(|(host, _)| !host.is_empty() && !host.contains('/'))
    };
    let ok = if s.starts_with("github.com/") || s.starts_with("git://") || s.starts_with("ssh://") {
        true
    } else if s.starts_with("http://") || s.starts_with("https://") {
        let path = s.split('#').next().unwrap_or("");
        path.ends_with(".git") && !s.ends_with('#')
    } else {
        !s.contains("://") && scp_like()
    };
    if !ok {
        return None;
    }
    let (remote, fragment) = s.split_once('#').unwrap_or((s, ""));
    if remote.is_empty() {
        return None;
    }
    Some((remote.to_string(), fragment.to_string()))
}

/// Whether the start of a downloaded context is an archive (bzip2, gzip, xz, or a tar header
/// with a valid checksum), as the builtin frontend decides.
pub fn is_archive(head: &[u8]) -> bool {
    const MAGIC: [&[u8]; 3] = [
        &[0x42, 0x5A, 0x68],
        &[0x1F, 0x8B, 0x08],
        &[0xFD, 0x37, 0x7A, 0x58, 0x5A, 0x00],
    ];
    if MAGIC.iter().any(|m| head.starts_with(m)) {
        return true;
    }
    if head.len() < 512 || head[..512].iter().all(|&b| b == 0) {
        return false;
    }
    let field = &head[148..156];
    let text: String = field
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as char)
        .collect();
    let Ok(want) = u64::from_str_radix(text.trim(), 8) else {
        return false;
    };
    let sum: u64 = head[..512]
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                b as u64
            }
        })
        .sum();
    sum == want
}

/// Go's `path.Clean`.
pub fn clean(p: &str) -> String {
    if p.is_empty() {
        return ".".into();
    }
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = vec![];
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            c => parts.push(c),
        }
    }
    let body = parts.join("/");
    match (rooted, body.is_empty()) {
        (true, _) => format!("/{body}"),
        (false, true) => ".".into(),
        (false, false) => body,
    }
}

/// Go's `path.Join`.
pub fn join(parts: &[&str]) -> String {
    let nonempty: Vec<&str> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    if nonempty.is_empty() {
        return String::new();
    }
    clean(&nonempty.join("/"))
}

/// An OCI platform.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Platform {
    /// OS.
    pub os: String,
    /// Architecture.
    pub architecture: String,
    /// Variant.
    pub variant: String,
}

impl Platform {
    /// containerd's `platforms.DefaultSpec()` (normalized) for this host.
    pub fn host() -> Platform {
        let p = llb::Platform::host();
        Platform {
            os: p.os,
            architecture: p.architecture,
            variant: p.variant,
        }
    }

    /// `platforms.Format`.
    pub fn format(&self) -> String {
        let mut s = if self.os.is_empty() {
            "unknown".to_string()
        } else {
            self.os.clone()
        };
        for part in [&self.architecture, &self.variant] {
            if !part.is_empty() {
                s.push('/');
                s.push_str(part);
            }
        }
        s
    }

    /// As the LLB builder's platform.
    pub fn to_llb(&self) -> llb::Platform {
        llb::Platform {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            variant: self.variant.clone(),
        }
    }

    /// `platforms.Parse` followed by `Normalize`.
    pub fn parse(s: &str) -> Result<Platform, String> {
        if s.contains('*') {
            return Err(format!("{}: invalid platform specifier", go_quote(s)));
        }
        let parts: Vec<&str> = s.split('/').collect();
        let host = Platform::host();
        let bad = || {
            format!(
                "{}: unknown operating system or architecture: invalid argument",
                go_quote(s)
            )
        };
        let is_os = |p: &str| {
            matches!(
                p.to_lowercase().as_str(),
                "linux"
                    | "windows"
                    | "darwin"
                    | "freebsd"
                    | "netbsd"
                    | "openbsd"
                    | "solaris"
                    | "illumos"
                    | "android"
                    | "ios"
                    | "js"
                    | "aix"
                    | "plan9"
                    | "dragonfly"
                    | "macos"
            )
        };
        let p = match parts.as_slice() {
            [one] => {
                if is_os(one) {
                    Platform {
                        os: one.to_lowercase(),
                        architecture: host.architecture.clone(),
                        variant: host.variant.clone(),
                    }
                } else {
                    let (a, v) = normalize_arch(one, "");
                    if a.is_empty() {
                        return Err(bad());
                    }
                    Platform {
                        os: host.os.clone(),
                        architecture: a,
                        variant: v,
                    }
                }
            }
            [os, arch] => {
                let (a, v) = normalize_arch(arch, "");
                Platform {
                    os: os.to_lowercase(),
                    architecture: a,
                    variant: v,
                }
            }
            [os, arch, variant] => {
                let (a, v) = normalize_arch(arch, variant);
                Platform {
                    os: os.to_lowercase(),
                    architecture: a,
                    variant: v,
                }
            }
            _ => {
                return Err(format!(
                    "{}: cannot parse platform specifier: invalid argument",
                    go_quote(s)
                ))
            }
        };
        if p.os.is_empty() || p.architecture.is_empty() {
            return Err(bad());
        }
        Ok(Platform {
            os: if p.os == "macos" {
                "darwin".into()
            } else {
                p.os
            },
            ..p
        })
    }
}

/// containerd's `normalizeArch`.
fn normalize_arch(arch: &str, variant: &str) -> (String, String) {
    let arch = arch.to_lowercase();
    let variant = variant.to_lowercase();
    match arch.as_str() {
        "i386" => ("386".into(), String::new()),
        "x86_64" | "x86-64" | "amd64" => {
            let v = if variant == "v1" {
                String::new()
            } else {
                variant
            };
            ("amd64".into(), v)
        }
        "aarch64" | "arm64" => {
            let v = if variant == "8" || variant == "v8" {
                String::new()
            } else {
                variant
            };
            ("arm64".into(), v)
        }
        "armhf" => ("arm".into(), "v7".into()),
        "armel" => ("arm".into(), "v6".into()),
        "arm" => {
            let v = match variant.as_str() {
                "" | "7" => "v7".to_string(),
                "5" | "6" | "8" => format!("v{variant}"),
                _ => variant,
            };
            ("arm".into(), v)
        }
        _ => (arch, variant),
    }
}

/// Go's `time.Duration.String()`.
pub fn go_duration(ns: i64) -> String {
    if ns == 0 {
        return "0s".into();
    }
    let neg = ns < 0;
    let u = ns.unsigned_abs();
    let mut s = if u < 1_000 {
        format!("{u}ns")
    } else if u < 1_000_000 {
        format!("{}µs", frac(u, 1_000))
    } else if u < 1_000_000_000 {
        format!("{}ms", frac(u, 1_000_000))
    } else {
        let secs_total = u / 1_000_000_000;
        let rem_ns = u % 1_000_000_000;
        let h = secs_total / 3600;
        let m = (secs_total % 3600) / 60;
        let sec = secs_total % 60;
        let secs = frac(sec * 1_000_000_000 + rem_ns, 1_000_000_000);
        let mut out = String::new();
        if h > 0 {
            out.push_str(&format!("{h}h"));
        }
        if h > 0 || m > 0 {
            out.push_str(&format!("{m}m"));
        }
        out.push_str(&format!("{secs}s"));
        out
    };
    if neg {
        s.insert(0, '-');
    }
    s
}

fn frac(v: u64, unit: u64) -> String {
    let whole = v / unit;
    let rem = v % unit;
    if rem == 0 {
        return whole.to_string();
    }
    let width = unit.to_string().len() - 1;
    let f = format!("{rem:0width$}");
    format!("{whole}.{}", f.trim_end_matches('0'))
}

/// Go's `%q` of an int (`strconv.QuoteRune`).
pub fn go_quote_rune(v: i64) -> String {
    match u32::try_from(v).ok().and_then(char::from_u32) {
        Some('\'') => "'\\''".into(),
        Some('\\') => "'\\\\'".into(),
        Some(c) if !c.is_control() && (c == ' ' || !c.is_whitespace()) => format!("'{c}'"),
        Some(c) => {
            let q = go_quote(&c.to_string());
            format!("'{}'", &q[1..q.len() - 1])
        }
        None => "'\u{fffd}'".into(),
    }
}

/// `nat.ParsePortSpecs` keys: `80` → `80/tcp`, ranges expanded, `ip:host:container` forms
/// reduced to the container port.
pub fn parse_port_specs(ports: &[String]) -> Result<Vec<String>, String> {
    let mut out = std::collections::BTreeSet::new();
    for raw in ports {
        // strip ip and host port: the container part is the last colon-separated field
        let (spec, proto) = match raw.rsplit_once('/') {
            Some((s, p)) => (s, p.to_string()),
            None => (raw.as_str(), "tcp".to_string()),
        };
        if proto.is_empty() {
            return Err(format!("invalid proto: {proto}"));
        }
        let container = spec.rsplit(':').next().unwrap_or(spec);
        if container.is_empty() {
            return Err(format!("no port specified: {raw}<empty>"));
        }
        let (start, end) = match container.split_once('-') {
            Some((a, b)) => (a, b),
            None => (container, container),
        };
        let parse = |p: &str| -> Result<u32, String> {
            p.parse::<u32>()
                .ok()
                .filter(|v| *v <= 65535)
                .ok_or_else(|| format!("invalid containerPort: {container}"))
        };
        let (s, e) = (parse(start)?, parse(end)?);
        if e < s {
            return Err(format!("invalid containerPort: {container}"));
        }
        for p in s..=e {
            out.insert(format!("{p}/{}", proto.to_lowercase()));
        }
    }
    Ok(out.into_iter().collect())
}

/// `signal.ParseSignal`: a number or a known name (with or without `SIG`).
pub fn parse_signal(s: &str) -> Result<(), String> {
    const NAMES: &[&str] = &[
        "ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT",
        "KILL", "PIPE", "POLL", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM",
        "TRAP", "TSTP", "TTIN", "TTOU", "UNUSED", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU",
        "XFSZ", "RTMIN", "RTMAX",
    ];
    if let Ok(n) = s.parse::<i64>() {
        if n == 0 {
            return Err(format!("Invalid signal: {s}"));
        }
        return Ok(());
    }
    let name = s.to_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    let rt = |p: &str| {
        name.strip_prefix(p)
            .and_then(|r| r.strip_prefix(['+', '-']))
            .is_some_and(|n| n.parse::<u32>().is_ok())
    };
    if NAMES.contains(&name) || rt("RTMIN") || rt("RTMAX") {
        Ok(())
    } else {
        Err(format!("Invalid signal: {s}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_refs_and_archives() {
        assert_eq!(
            git_ref("http://127.0.0.1:1/.git#first"),
            Some(("http://127.0.0.1:1/.git".into(), "first".into()))
        );
        assert_eq!(
            git_ref("https://github.com/moby/buildkit.git#v1:sub"),
            Some((
                "https://github.com/moby/buildkit.git".into(),
                "v1:sub".into()
            ))
        );
        assert_eq!(
            git_ref("git@github.com:moby/buildkit"),
            Some(("git@github.com:moby/buildkit".into(), String::new()))
        );
        assert_eq!(git_ref("http://127.0.0.1:1/df"), None);
        assert_eq!(git_ref("context"), None);
        assert_eq!(git_ref(""), None);
        assert!(is_archive(&[0x1F, 0x8B, 0x08, 0, 0]));
        let mut tar = vec![0u8; 1024];
        tar[..3].copy_from_slice(b"foo");
        tar[100..107].copy_from_slice(b"000644\0");
        tar[156] = b'0';
        tar[257..263].copy_from_slice(b"ustar\0");
        let sum: u32 = tar[..512].iter().map(|&b| b as u32).sum::<u32>() + 8 * 32;
        let field = format!("{sum:06o}\0 ");
        tar[148..156].copy_from_slice(field.as_bytes());
        assert!(is_archive(&tar));
        tar[0] = b'g';
        assert!(!is_archive(&tar), "bad checksum");
        assert!(!is_archive(b"FROM scratch\nCOPY foo bar\n"));
        assert!(!is_archive(&[0u8; 1024]));
    }

    #[test]
    fn dockerignore_lines() {
        let got = read_dockerignore(b"\xef\xbb\xbf# c\n/a/../b\n  !  /c/d/  \n\n*.log\r\n!\n");
        assert_eq!(got, vec!["b", "!c/d", "*.log", "!"]);
    }

    #[test]
    fn paths() {
        assert_eq!(clean("/a/./b/../c/"), "/a/c");
        assert_eq!(clean("a/../../b"), "../b");
        assert_eq!(join(&["/", "", "x/", "y"]), "/x/y");
        assert_eq!(join(&["", ""]), "");
    }

    #[test]
    fn platforms() {
        let p = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!(p.format(), "linux/arm64");
        assert_eq!(
            Platform::parse("linux/arm").unwrap().format(),
            "linux/arm/v7"
        );
        assert_eq!(
            Platform::parse("linux/x86_64").unwrap().format(),
            "linux/amd64"
        );
        assert!(Platform::parse("a/b/c/d").is_err());
    }

    #[test]
    fn durations_and_runes() {
        assert_eq!(go_duration(0), "0s");
        assert_eq!(go_duration(5_000_000_000), "5s");
        assert_eq!(go_duration(90_000_000_000), "1m30s");
        assert_eq!(go_duration(1_500_000), "1.5ms");
        assert_eq!(go_duration(3_600_000_000_000), "1h0m0s");
        assert_eq!(go_quote_rune(0), "'\\x00'");
        assert_eq!(go_quote_rune(3), "'\\x03'");
        assert_eq!(go_quote_rune(97), "'a'");
    }

    #[test]
    fn ports_and_signals() {
        assert_eq!(
            parse_port_specs(&["80".into(), "53/udp".into(), "8000-8001".into()]).unwrap(),
            vec!["53/udp", "80/tcp", "8000/tcp", "8001/tcp"]
        );
        assert!(parse_port_specs(&["x".into()]).is_err());
        assert!(parse_signal("SIGKILL").is_ok());
        assert!(parse_signal("term").is_ok());
        assert!(parse_signal("9").is_ok());
        assert!(parse_signal("NOPE").is_err());
    }
}
