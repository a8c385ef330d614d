//! `RUN --mount=…` parsing (`frontend/dockerfile/instructions/commands_runmount.go`).
//!
//! A mount is a CSV record of `key=value` fields (and a few bare keys). It is parsed twice, as
//! upstream does: once when the Dockerfile is parsed, where only `from` is read (variables are
//! not allowed there), and again when the instruction runs, with variables expanded.

use super::gofmt::{parse_bool, parse_uint};

/// `bind`.
pub const MOUNT_TYPE_BIND: &str = "bind";
/// `cache`.
pub const MOUNT_TYPE_CACHE: &str = "cache";
/// `tmpfs`.
pub const MOUNT_TYPE_TMPFS: &str = "tmpfs";
/// `secret`.
pub const MOUNT_TYPE_SECRET: &str = "secret";
/// `ssh`.
pub const MOUNT_TYPE_SSH: &str = "ssh";

const MOUNT_TYPES: &[&str] = &["bind", "cache", "tmpfs", "secret", "ssh"];

/// One `--mount`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mount {
    /// `bind` (default), `cache`, `tmpfs`, `secret`, `ssh`.
    pub mount_type: String,
    /// Stage or image to mount from.
    pub from: String,
    /// Path in the source.
    pub source: String,
    /// Mount point.
    pub target: String,
    /// Read-only.
    pub read_only: bool,
    /// tmpfs size in bytes.
    pub size_limit: i64,
    /// `id` (cache id, secret id, ssh id).
    pub cache_id: String,
    /// `shared`, `private` or `locked`.
    pub cache_sharing: String,
    /// Secret/ssh must be present.
    pub required: bool,
    /// File mode.
    pub mode: Option<u64>,
    /// Owner.
    pub uid: Option<u64>,
    /// Group.
    pub gid: Option<u64>,
}

/// Reads one CSV record the way Go's `encoding/csv` does (comma separated, `"` quoting).
pub(crate) fn csv_record(value: &str) -> Result<Vec<String>, String> {
    if value.is_empty() {
        return Err("EOF".into());
    }
    let line = value.split_once('\n').map(|(a, _)| a).unwrap_or(value);
    let line = line.strip_suffix('\r').unwrap_or(line);
    let b: Vec<char> = line.chars().collect();
    let mut fields = vec![];
    let mut i = 0usize;
    loop {
        let mut field = String::new();
        if b.get(i) == Some(&'"') {
            // quoted field
            let start_col = i;
            i += 1;
            loop {
                match b.get(i) {
                    None => {
                        return Err(format!(
                            "parse error on line 1, column {}: extraneous or missing \" in quoted-field",
                            b.len() + 1
                        ))
                    }
                    Some('"') => {
                        if b.get(i + 1) == Some(&'"') {
                            field.push('"');
                            i += 2;
                        } else if b.get(i + 1).is_none() || b.get(i + 1) == Some(&',') {
                            i += 1;
                            break;
                        } else {
                            let _ = start_col;
                            return Err(format!(
                                "parse error on line 1, column {}: extraneous or missing \" in quoted-field",
                                i + 2
                            ));
                        }
                    }
                    Some(c) => {
                        field.push(*c);
                        i += 1;
                    }
                }
            }
        } else {
            while let Some(c) = b.get(i) {
                if *c == ',' {
                    break;
                }
                if *c == '"' {
                    return Err(format!(
                        "parse error on line 1, column {}: bare \" in non-quoted field",
                        i + 1
                    ));
                }
                field.push(*c);
                i += 1;
            }
        }
        fields.push(field);
        if b.get(i) == Some(&',') {
            i += 1;
            continue;
        }
        return Ok(fields);
    }
}

/// Go's `units.RAMInBytes`: `64m`, `1.5g`, `100kb`… with binary multipliers.
pub(crate) fn ram_in_bytes(s: &str) -> Result<i64, String> {
    let bad = || format!("invalid size: '{s}'");
    let num_end = s
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_digit() || *c == '.'))
        .map(|(i, _)| i)
        .unwrap_or(s.len());
    let (num, rest) = s.split_at(num_end);
    // ^(\d+(\.\d+)*)
    if num.is_empty()
        || !num
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
    {
        return Err(bad());
    }
    let rest = rest.strip_prefix(' ').unwrap_or(rest);
    let mut chars = rest.chars().peekable();
    let mut mult: f64 = 1.0;
    if let Some(c) = chars.peek().copied() {
        let m = match c.to_ascii_lowercase() {
            'k' => Some(1024f64),
            'm' => Some(1024f64.powi(2)),
            'g' => Some(1024f64.powi(3)),
            't' => Some(1024f64.powi(4)),
            'p' => Some(1024f64.powi(5)),
            _ => None,
        };
        if let Some(m) = m {
            mult = m;
            chars.next();
        }
    }
    if matches!(chars.peek(), Some('i') | Some('I')) {
        chars.next();
    }
    if matches!(chars.peek(), Some('b') | Some('B')) {
        chars.next();
    }
    if chars.next().is_some() {
        return Err(bad());
    }
    let n: f64 = num.parse().map_err(|_| bad())?;
    Ok((n * mult) as i64)
}

fn unexpected_key(key: &str, field: &str) -> String {
    let all = [
        "type",
        "from",
        "source",
        "target",
        "readonly",
        "id",
        "sharing",
        "required",
        "mode",
        "uid",
        "gid",
        "src",
        "dst",
        "ro",
        "rw",
        "readwrite",
    ];
    crate::suggest::wrap(
        format!("unexpected key '{key}' in '{field}'"),
        key,
        &all,
        true,
    )
}

/// A word expander (variables → values).
pub type Expander<'a> = &'a dyn Fn(&str) -> Result<String, String>;

/// Parses one mount; `expand` is `None` for the parse-time pass.
pub fn parse_mount(value: &str, expand: Option<Expander<'_>>) -> Result<Mount, String> {
    let fields = csv_record(value).map_err(|e| format!("failed to parse csv mounts: {e}"))?;
    let mut m = Mount {
        mount_type: MOUNT_TYPE_BIND.into(),
        ..Default::default()
    };
    let mut ro_auto = true;
    for field in &fields {
        let (key_raw, val) = match field.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (field.as_str(), None),
        };
        let key = key_raw.to_lowercase();
        let Some(val) = val else {
            if expand.is_none() {
                continue;
            }
            match key.as_str() {
                "readonly" | "ro" => {
                    m.read_only = true;
                    ro_auto = false;
                    continue;
                }
                "readwrite" | "rw" => {
                    m.read_only = false;
                    ro_auto = false;
                    continue;
                }
                "required" => {
                    if m.mount_type == "secret" || m.mount_type == "ssh" {
                        m.required = true;
                        continue;
                    }
                    return Err(format!(
                        "unexpected key '{key}' for mount type '{}'",
                        m.mount_type
                    ));
                }
                _ => return Err(format!("invalid field '{field}' must be a key=value pair")),
            }
        };
        let value = match expand {
            Some(f) => f(val)?,
            None if key == "from" => {
                // `\$.`: a dollar followed by any character
                let mut it = val.chars();
                while let Some(c) = it.next() {
                    if c == '$' && it.clone().next().is_some() {
                        return Err(format!(
                            "'{key}' doesn't support variable expansion, define alias stage instead"
                        ));
                    }
                }
                val.to_string()
            }
            None => continue,
        };
        let invalid = || format!("invalid value for {key}: {value}");
        match key.as_str() {
            "type" => {
                let t = value.to_lowercase();
                if !MOUNT_TYPES.contains(&t.as_str()) {
                    return Err(crate::suggest::wrap(
                        format!("unsupported mount type {}", crate::parser::go_quote(&value)),
                        &value,
                        MOUNT_TYPES,
                        true,
                    ));
                }
                m.mount_type = t;
            }
            "from" => m.from = value,
            "source" | "src" => m.source = value,
            "target" | "dst" | "destination" => m.target = value,
            "readonly" | "ro" => {
                m.read_only = parse_bool(&value).ok_or_else(invalid)?;
                ro_auto = false;
            }
            "readwrite" | "rw" => {
                m.read_only = !parse_bool(&value).ok_or_else(invalid)?;
                ro_auto = false;
            }
            "required" => {
                if m.mount_type == "secret" || m.mount_type == "ssh" {
                    m.required = parse_bool(&value).ok_or_else(invalid)?;
                } else {
                    return Err(format!(
                        "unexpected key '{key}' for mount type '{}'",
                        m.mount_type
                    ));
                }
            }
            "size" => {
                if m.mount_type == "tmpfs" {
                    m.size_limit = ram_in_bytes(&value).map_err(|_| invalid())?;
                } else {
                    return Err(format!(
                        "unexpected key '{key}' for mount type '{}'",
                        m.mount_type
                    ));
                }
            }
            "id" => m.cache_id = value,
            "sharing" => {
                let s = value.to_lowercase();
                if !matches!(s.as_str(), "shared" | "private" | "locked") {
                    return Err(format!(
                        "unsupported sharing value {}",
                        crate::parser::go_quote(&value)
                    ));
                }
                m.cache_sharing = s;
            }
            "mode" => {
                m.mode = Some(
                    parse_uint(&value, 8, 32)
                        .ok_or_else(|| format!("invalid value {value} for mode"))?,
                );
            }
            "uid" => {
                m.uid = Some(
                    parse_uint(&value, 10, 32)
                        .ok_or_else(|| format!("invalid value {value} for uid"))?,
                );
            }
            "gid" => {
                m.gid = Some(
                    parse_uint(&value, 10, 32)
                        .ok_or_else(|| format!("invalid value {value} for gid"))?,
                );
            }
            _ => return Err(unexpected_key(&key, field)),
        }
    }
    let file_info_allowed = matches!(m.mount_type.as_str(), "secret" | "ssh" | "cache");
    let q = crate::parser::go_quote(&m.mount_type);
    if m.mode.is_some() && !file_info_allowed {
        return Err(format!("mode not allowed for {q} type mounts"));
    }
    if m.uid.is_some() && !file_info_allowed {
        return Err(format!("uid not allowed for {q} type mounts"));
    }
    if m.gid.is_some() && !file_info_allowed {
        return Err(format!("gid not allowed for {q} type mounts"));
    }
    if ro_auto {
        m.read_only = !(m.mount_type == MOUNT_TYPE_CACHE || m.mount_type == MOUNT_TYPE_TMPFS);
    }
    if !m.cache_sharing.is_empty() && m.mount_type != MOUNT_TYPE_CACHE {
        return Err(format!(
            "invalid cache sharing set for {} mount",
            m.mount_type
        ));
    }
    if m.mount_type == MOUNT_TYPE_SECRET {
        if !m.from.is_empty() {
            return Err("secret mount should not have a from".into());
        }
        if !m.cache_sharing.is_empty() {
            return Err("secret mount should not define sharing".into());
        }
        if m.source.is_empty() && m.target.is_empty() && m.cache_id.is_empty() {
            return Err("invalid secret mount. one of source, target required".into());
        }
        if !m.source.is_empty() && !m.cache_id.is_empty() {
            return Err("both source and id can't be set".into());
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(v: &str) -> Result<Mount, String> {
        let id = |s: &str| -> Result<String, String> { Ok(s.to_string()) };
        parse_mount(v, Some(&id))
    }

    #[test]
    fn mounts() {
        let m = full("type=cache,target=/root/.cache,id=x,sharing=LOCKED,mode=0700,uid=1,gid=2")
            .unwrap();
        assert_eq!(
            m,
            Mount {
                mount_type: "cache".into(),
                target: "/root/.cache".into(),
                cache_id: "x".into(),
                cache_sharing: "locked".into(),
                mode: Some(0o700),
                uid: Some(1),
                gid: Some(2),
                ..Default::default()
            }
        );
        let m = full("target=/src,from=build,source=/out,rw").unwrap();
        assert_eq!(m.mount_type, "bind");
        assert!(!m.read_only);
        assert!(full("target=/src").unwrap().read_only);
        assert!(!full("type=tmpfs,target=/t,size=64m").unwrap().read_only);
        assert_eq!(
            full("type=tmpfs,dst=/t,size=64m").unwrap().size_limit,
            64 << 20
        );
        let m = full("type=secret,id=s,required").unwrap();
        assert!(m.required && m.read_only);
        let m = full("\"type=bind,x\",target=/a");
        assert!(m.is_err());
    }

    #[test]
    fn parse_time_pass_reads_only_from() {
        let m = parse_mount("type=cache,from=stage,target=/x,ro", None).unwrap();
        assert_eq!(m.mount_type, "bind");
        assert_eq!(m.from, "stage");
        assert!(m.target.is_empty());
        assert_eq!(
            parse_mount("from=$X", None).unwrap_err(),
            "'from' doesn't support variable expansion, define alias stage instead"
        );
    }

    #[test]
    fn errors() {
        let cases = [
            ("type=foo", "unsupported mount type \"foo\""),
            (
                "type=cahce",
                "unsupported mount type \"cahce\" (did you mean cache?)",
            ),
            (
                "target=/a,foo=b",
                "unexpected key 'foo' in 'foo=b' (did you mean from?)",
            ),
            ("target=/a,zzz=b", "unexpected key 'zzz' in 'zzz=b'"),
            (
                "target=/a,tagret=b",
                "unexpected key 'tagret' in 'tagret=b' (did you mean target?)",
            ),
            ("target", "invalid field 'target' must be a key=value pair"),
            (
                "type=bind,required",
                "unexpected key 'required' for mount type 'bind'",
            ),
            (
                "type=bind,mode=0700",
                "mode not allowed for \"bind\" type mounts",
            ),
            ("type=cache,mode=9", "invalid value 9 for mode"),
            (
                "type=secret",
                "invalid secret mount. one of source, target required",
            ),
            ("type=secret,id=a,src=b", "both source and id can't be set"),
            (
                "type=bind,sharing=shared",
                "invalid cache sharing set for bind mount",
            ),
            ("type=cache,sharing=x", "unsupported sharing value \"x\""),
            ("type=tmpfs,size=lots", "invalid value for size: lots"),
            ("ro=maybe", "invalid value for ro: maybe"),
            ("", "failed to parse csv mounts: EOF"),
        ];
        for (v, msg) in cases {
            assert_eq!(full(v).unwrap_err(), msg, "{v:?}");
        }
    }

    #[test]
    fn csv() {
        assert_eq!(csv_record("a,\"b,c\",d").unwrap(), vec!["a", "b,c", "d"]);
        assert_eq!(csv_record("\"a\"\"b\"").unwrap(), vec!["a\"b"]);
        assert_eq!(csv_record("a,").unwrap(), vec!["a", ""]);
        assert!(csv_record("a\"b").is_err());
    }

    #[test]
    fn ram() {
        for (s, n) in [
            ("100", 100),
            ("1k", 1024),
            ("1KiB", 1024),
            ("1.5m", 1572864),
            ("2 GB", 2 << 30),
        ] {
            assert_eq!(ram_in_bytes(s).unwrap(), n, "{s}");
        }
        assert!(ram_in_bytes("x").is_err());
        assert!(ram_in_bytes("1q").is_err());
    }
}
