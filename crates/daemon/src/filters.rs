//! containerd-style filter expressions, as BuildKit uses them for workers, disk usage and prune.
//!
//! A request carries a list of filter strings; a record matches when **any** string matches. A
//! string is a comma-separated list of selectors that must **all** match. A selector is a field
//! path (`id`, `labels."org.mobyproject.buildkit.worker.executor"`, `type`) optionally followed by
//! an operator (`==`, `!=`, `~=` regular expression) and a value (bare or double-quoted). Without
//! an operator the selector tests that the field is present (used for `inuse`, `mutable`...).

use crate::errors::{Error, Result};

/// Something filters can be evaluated against.
pub trait Adaptor {
    /// The value of the field at `path`, or `None` if absent.
    fn field(&self, path: &[String]) -> Option<String>;
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
    Re(regex::Regex),
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// A parsed filter list.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    any_of: Vec<Vec<Selector>>,
}

impl Filters {
    /// Parses the request's filter strings (empty list matches everything).
    pub fn parse(filters: &[String]) -> Result<Self> {
        let mut any_of = Vec::new();
        for f in filters {
            if f.trim().is_empty() {
                continue;
            }
            any_of.push(
                parse_one(f).map_err(|e| Error::invalid(format!("invalid filter {f:?}: {e}")))?,
            );
        }
        Ok(Filters { any_of })
    }

    /// Whether `a` matches.
    pub fn matches(&self, a: &dyn Adaptor) -> bool {
        if self.any_of.is_empty() {
            return true;
        }
        self.any_of.iter().any(|all| {
            all.iter().all(|s| {
                let v = a.field(&s.path);
                match (&s.op, v) {
                    (Op::Present, v) => v.is_some(),
                    (Op::Eq(want), Some(v)) => &v == want,
                    (Op::Ne(want), Some(v)) => &v != want,
                    (Op::Ne(_), None) => true,
                    (Op::Re(re), Some(v)) => re.is_match(&v),
                    _ => false,
                }
            })
        })
    }

    /// Whether no filter was given.
    pub fn is_empty(&self) -> bool {
        self.any_of.is_empty()
    }
}

fn parse_one(s: &str) -> std::result::Result<Vec<Selector>, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    loop {
        skip_ws(&chars, &mut i);
        // field path
        let mut path = Vec::new();
        loop {
            skip_ws(&chars, &mut i);
            let part = if chars.get(i) == Some(&'"') {
                quoted(&chars, &mut i)?
            } else {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '-')
                {
                    i += 1;
                }
                if start == i {
                    return Err(format!("expected field name at position {i}"));
                }
                chars[start..i].iter().collect()
            };
            path.push(part);
            if chars.get(i) == Some(&'.') {
                i += 1;
                continue;
            }
            break;
        }
        skip_ws(&chars, &mut i);
        let op = if i + 1 < chars.len()
            && matches!(
                (chars[i], chars[i + 1]),
                ('=', '=') | ('!', '=') | ('~', '=')
            ) {
            let kind = chars[i];
            i += 2;
            skip_ws(&chars, &mut i);
            let value = if chars.get(i) == Some(&'"') {
                quoted(&chars, &mut i)?
            } else {
                let start = i;
                while i < chars.len() && chars[i] != ',' {
                    i += 1;
                }
                chars[start..i]
                    .iter()
                    .collect::<String>()
                    .trim_end()
                    .to_string()
            };
            match kind {
                '=' => Op::Eq(value),
                '!' => Op::Ne(value),
                _ => Op::Re(
                    regex::Regex::new(&value)
                        .map_err(|e| format!("bad regular expression: {e}"))?,
                ),
            }
        } else {
            Op::Present
        };
        out.push(Selector { path, op });
        skip_ws(&chars, &mut i);
        match chars.get(i) {
            None => break,
            Some(',') => i += 1,
            Some(c) => return Err(format!("unexpected {c:?} at position {i}")),
        }
    }
    Ok(out)
}

fn skip_ws(chars: &[char], i: &mut usize) {
    while *i < chars.len() && chars[*i].is_whitespace() {
        *i += 1;
    }
}

fn quoted(chars: &[char], i: &mut usize) -> std::result::Result<String, String> {
    *i += 1;
    let mut s = String::new();
    while *i < chars.len() {
        match chars[*i] {
            '"' => {
                *i += 1;
                return Ok(s);
            }
            '\\' if *i + 1 < chars.len() => {
                s.push(chars[*i + 1]);
                *i += 2;
            }
            c => {
                s.push(c);
                *i += 1;
            }
        }
    }
    Err("unterminated quote".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Rec {
        id: String,
        labels: BTreeMap<String, String>,
        inuse: bool,
    }

    impl Adaptor for Rec {
        fn field(&self, path: &[String]) -> Option<String> {
            match path.first().map(String::as_str) {
                Some("id") => Some(self.id.clone()),
                Some("labels") => self.labels.get(&path[1..].join(".")).cloned(),
                Some("inuse") => self.inuse.then(String::new),
                _ => None,
            }
        }
    }

    #[test]
    fn table() {
        let r = Rec {
            id: "abc".into(),
            labels: [(
                "org.mobyproject.buildkit.worker.executor".to_string(),
                "oci".to_string(),
            )]
            .into_iter()
            .collect(),
            inuse: true,
        };
        let cases: &[(&[&str], bool)] = &[
            (&[], true),
            (&["id==abc"], true),
            (&["id==abd"], false),
            (&["id!=abd"], true),
            (&["id~=^a.c$"], true),
            (
                &[r#"labels."org.mobyproject.buildkit.worker.executor"==oci"#],
                true,
            ),
            (
                &[r#"labels."org.mobyproject.buildkit.worker.executor"==containerd"#],
                false,
            ),
            (
                &["labels.org.mobyproject.buildkit.worker.executor==oci"],
                true,
            ),
            (&["id==x", "id==abc"], true),
            (&["id==abc,inuse"], true),
            (&["id==abc,nosuch"], false),
            (&[r#"id=="abc""#], true),
        ];
        for (f, want) in cases {
            let f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
            assert_eq!(Filters::parse(&f).unwrap().matches(&r), *want, "{f:?}");
        }
        for bad in ["id==\"x", "==x", "id~=(", "id==a b,"] {
            assert!(Filters::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }
}
