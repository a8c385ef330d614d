//! Parser directives (`# syntax=…`, `# escape=…`) and syntax detection
//! (`frontend/dockerfile/parser/directives.go` at v0.11.6).
//!
//! Directives are only recognised in the leading block of comment lines: the first line that is
//! not a `# key=value` comment with a known key ends the block. A directive may appear once.

use super::{Position, Range};

/// A parsed directive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    /// Lowercased name (`syntax`, `escape`).
    pub name: String,
    /// The value, trimmed.
    pub value: String,
    /// Where it is (1-based line).
    pub location: Vec<Range>,
}

/// The directive scanner: feed it lines in order.
#[derive(Debug, Default, Clone)]
pub struct DirectiveParser {
    line: usize,
    /// `#` or `//`.
    comment: &'static str,
    seen: Vec<String>,
    done: bool,
}

const VALID: &[&str] = &["syntax", "escape"];

/// Go's regexp `\s` (RE2): `[\t\n\f\r ]`.
fn re_space(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\x0c' | '\r' | ' ')
}

/// Matches `^<comment>\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$`; returns (key, value).
fn match_directive<'a>(line: &'a str, comment: &str) -> Option<(&'a str, &'a str)> {
    let rest = line.strip_prefix(comment)?;
    let rest = rest.trim_start_matches(re_space);
    let key_len = rest
        .char_indices()
        .take_while(|(i, c)| {
            if *i == 0 {
                c.is_ascii_alphabetic()
            } else {
                c.is_ascii_alphanumeric()
            }
        })
        .count();
    if key_len == 0 {
        return None;
    }
    let (key, rest) = rest.split_at(key_len);
    let rest = rest.trim_start_matches(re_space).strip_prefix('=')?;
    let value = rest.trim_start_matches(re_space);
    // `.` does not match a newline, and `.+?` needs one character before trailing spaces
    if value.contains('\n') {
        return None;
    }
    let value = value.trim_end_matches(re_space);
    if value.is_empty() {
        return None;
    }
    Some((key, value))
}

impl DirectiveParser {
    /// A parser for `#` comments whose first line is `line + 1`.
    pub fn new() -> Self {
        DirectiveParser {
            comment: "#",
            ..Default::default()
        }
    }

    fn with(comment: &'static str, line: usize) -> Self {
        DirectiveParser {
            comment,
            line,
            ..Default::default()
        }
    }

    /// Looks at the next line; returns the directive it holds, if the directive block is still
    /// open. A repeated directive is an error.
    pub fn parse_line(&mut self, line: &str) -> Result<Option<Directive>, String> {
        self.line += 1;
        if self.done {
            return Ok(None);
        }
        let Some((key, value)) = match_directive(line, self.comment) else {
            self.done = true;
            return Ok(None);
        };
        let k = key.to_ascii_lowercase();
        if !VALID.contains(&k.as_str()) {
            self.done = true;
            return Ok(None);
        }
        if self.seen.contains(&k) {
            return Err(format!("only one {k} parser directive can be used"));
        }
        self.seen.push(k.clone());
        Ok(Some(Directive {
            name: k,
            value: value.to_string(),
            location: vec![Range::line(self.line)],
        }))
    }

    fn parse_all(&mut self, data: &str) -> Vec<Directive> {
        let mut out = vec![];
        for line in data.lines() {
            if self.done {
                break;
            }
            match self.parse_line(line) {
                Ok(Some(d)) => out.push(d),
                Ok(None) => {}
                Err(_) => return out,
            }
        }
        out
    }
}

/// The result of [`detect_syntax`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Syntax {
    /// The frontend image reference (first word of the directive).
    pub image: String,
    /// The whole directive value (`cmdline`).
    pub cmdline: String,
    /// Where the directive is.
    pub location: Vec<Range>,
}

/// Finds a `syntax` directive: `# syntax=…`, else `// syntax=…`, else a JSON document with a
/// `"syntax"` key. A first line starting with `#!` is skipped.
pub fn detect_syntax(data: &str) -> Option<Syntax> {
    let (data, line) = match data.split_once('\n') {
        Some((first, rest)) if first.starts_with("#!") => (rest, 1),
        None if data.starts_with("#!") => ("", 1),
        _ => (data, 0),
    };
    for comment in ["#", "//"] {
        let mut p = DirectiveParser::with(comment, line);
        for d in p.parse_all(data) {
            if d.name == "syntax" {
                let image = d.value.split(' ').next().unwrap_or("").to_string();
                return Some(Syntax {
                    image,
                    cmdline: d.value,
                    location: d.location,
                });
            }
        }
    }
    #[derive(serde::Deserialize)]
    struct J {
        #[serde(default)]
        syntax: String,
    }
    if let Ok(j) = serde_json::from_str::<J>(data) {
        if !j.syntax.is_empty() {
            return Some(Syntax {
                image: j.syntax.clone(),
                cmdline: j.syntax,
                location: vec![Range {
                    start: Position { line, character: 0 },
                    end: Position { line, character: 0 },
                }],
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directive_lines() {
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            (
                "# syntax=docker/dockerfile:1",
                Some(("syntax", "docker/dockerfile:1")),
            ),
            ("#escape = `  ", Some(("escape", "`"))),
            ("# ESCAPE=\\", Some(("escape", "\\"))),
            ("#  x = y", None),
            ("# syntax =", None),
            ("FROM x", None),
            (" # syntax=a", None),
        ];
        for (line, want) in cases {
            let mut p = DirectiveParser::new();
            let got = p.parse_line(line).unwrap();
            assert_eq!(
                got.as_ref().map(|d| (d.name.as_str(), d.value.as_str())),
                *want,
                "{line:?}"
            );
        }
    }

    #[test]
    fn block_ends_at_first_other_line_and_rejects_repeats() {
        let mut p = DirectiveParser::new();
        assert!(p.parse_line("# escape=`").unwrap().is_some());
        assert_eq!(
            p.parse_line("# escape=\\").unwrap_err(),
            "only one escape parser directive can be used"
        );
        let mut p = DirectiveParser::new();
        assert!(p.parse_line("# unknown=1").unwrap().is_none());
        assert!(p.parse_line("# escape=`").unwrap().is_none());
    }

    #[test]
    fn syntax_detection() {
        let s = detect_syntax("# syntax = img:1 --flag\nFROM x\n").unwrap();
        assert_eq!(s.image, "img:1");
        assert_eq!(s.cmdline, "img:1 --flag");
        assert_eq!(s.location, vec![Range::line(1)]);
        let s = detect_syntax("#!/usr/bin/env x\n# syntax=a\n").unwrap();
        assert_eq!((s.image.as_str(), s.location[0].start.line), ("a", 2));
        let s = detect_syntax("// syntax=b\n").unwrap();
        assert_eq!(s.image, "b");
        let s = detect_syntax("{\"syntax\": \"c\"}").unwrap();
        assert_eq!(s.image, "c");
        assert!(detect_syntax("FROM a\n# syntax=b\n").is_none());
        assert!(detect_syntax("# escape=`\n# syntax=d\n").is_some());
    }
}
