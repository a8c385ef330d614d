//! dockerignore-style path patterns with the semantics of `moby/patternmatcher`.
//!
//! A pattern list is evaluated in order; a pattern starting with `!` is an exception that re-includes
//! what earlier patterns matched. The last matching pattern wins. Patterns are cleaned like Go's
//! `filepath.Clean` before use. Supported syntax: `*` (any run of non-`/`), `?` (one non-`/`),
//! `[...]` classes, `\` escapes and `**` (any number of path elements, including none).
//!
//! Matching is translated into one of four strategies, exactly as upstream does: exact string,
//! prefix (`foo/**`), suffix (`**/foo`) or a regular expression. The matcher is pure logic; the
//! walker in [`crate::walk`] applies it to a directory tree.

use crate::Error;
use regex::Regex;

/// One compiled pattern.
#[derive(Debug, Clone)]
pub struct Pattern {
    cleaned: String,
    exclusion: bool,
    kind: MatchKind,
}

#[derive(Debug, Clone)]
enum MatchKind {
    Exact,
    Prefix,
    Suffix,
    Regexp(Regex),
    /// The pattern's regular expression did not compile: it never matches and matching reports an error.
    Bad,
}

impl Pattern {
    /// The cleaned pattern text, without the leading `!`.
    pub fn as_str(&self) -> &str {
        &self.cleaned
    }

    /// Whether this is an exception (`!pattern`).
    pub fn is_exclusion(&self) -> bool {
        self.exclusion
    }

    fn matches(&self, path: &str) -> Result<bool, Error> {
        Ok(match &self.kind {
            MatchKind::Exact => path == self.cleaned,
            MatchKind::Prefix => path.starts_with(&self.cleaned[..self.cleaned.len() - 2]),
            MatchKind::Suffix => {
                let suffix = &self.cleaned[2..];
                if path.ends_with(suffix) {
                    true
                } else {
                    // `**/foo` also matches `foo` itself.
                    suffix.starts_with('/') && path == &suffix[1..]
                }
            }
            MatchKind::Regexp(re) => re.is_match(path),
            MatchKind::Bad => {
                return Err(Error::InvalidPattern {
                    pattern: self.cleaned.clone(),
                    reason: "syntax error in pattern".into(),
                })
            }
        })
    }

    /// The pattern without a trailing `/**` or `/*` (used to decide whether a directory can be skipped).
    pub(crate) fn without_trailing_glob(&self) -> &str {
        let p = self.cleaned.as_str();
        let p = p.strip_suffix("/**").unwrap_or(p);
        p.strip_suffix("/*").unwrap_or(p)
    }
}

/// Per-directory match state handed from a directory to its children (upstream `MatchInfo`).
#[derive(Debug, Clone, Default)]
pub struct MatchInfo {
    parent_matched: Vec<bool>,
}

/// An ordered list of patterns.
#[derive(Debug, Clone, Default)]
pub struct PatternMatcher {
    patterns: Vec<Pattern>,
    exclusions: bool,
}

impl PatternMatcher {
    /// Compiles a pattern list. Blank entries are ignored; `!` alone and malformed globs are errors.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, Error> {
        let mut out = PatternMatcher::default();
        for raw in patterns {
            let trimmed = raw.as_ref().trim();
            if trimmed.is_empty() {
                continue;
            }
            let mut p = go_clean(trimmed);
            let mut exclusion = false;
            if let Some(rest) = p.strip_prefix('!') {
                if rest.is_empty() {
                    return Err(Error::InvalidPattern {
                        pattern: raw.as_ref().to_string(),
                        reason: "illegal exclusion pattern: \"!\"".into(),
                    });
                }
                exclusion = true;
                out.exclusions = true;
                p = rest.to_string();
            }
            if let Err(reason) = validate_glob(&p) {
                return Err(Error::InvalidPattern {
                    pattern: raw.as_ref().to_string(),
                    reason: reason.into(),
                });
            }
            let kind = compile(&p);
            out.patterns.push(Pattern {
                cleaned: p,
                exclusion,
                kind,
            });
        }
        Ok(out)
    }

    /// The compiled patterns in order.
    pub fn patterns(&self) -> &[Pattern] {
        &self.patterns
    }

    /// Whether any pattern is an exception (`!`).
    pub fn has_exclusions(&self) -> bool {
        self.exclusions
    }

    /// Whether no pattern was given.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether `path` (slash-separated, relative) or one of its parent directories matches,
    /// taking exceptions into account (upstream `MatchesOrParentMatches`).
    pub fn matches_or_parent_matches(&self, path: &str) -> Result<bool, Error> {
        let (m, _) = self.matches_using_parent_results(path, &MatchInfo::default())?;
        Ok(m)
    }

    /// Matches `path` reusing the results of its parent directory (upstream `MatchesUsingParentResults`).
    ///
    /// Pass `MatchInfo::default()` when the parent's results are unknown; the parent directories of
    /// `path` are then checked directly.
    pub fn matches_using_parent_results(
        &self,
        path: &str,
        parent: &MatchInfo,
    ) -> Result<(bool, MatchInfo), Error> {
        let parent_matched = &parent.parent_matched;
        if !parent_matched.is_empty() && parent_matched.len() != self.patterns.len() {
            return Err(Error::InvalidPattern {
                pattern: String::new(),
                reason: "wrong number of values in parent match info".into(),
            });
        }
        let mut matched = false;
        let mut info = MatchInfo {
            parent_matched: vec![false; self.patterns.len()],
        };
        for (i, pattern) in self.patterns.iter().enumerate() {
            let mut m = !parent_matched.is_empty() && parent_matched[i];
            if !m {
                if pattern.exclusion != matched {
                    continue;
                }
                m = pattern.matches(path)?;
                if !m && parent_matched.is_empty() {
                    if let Some((parent_path, _)) = path.rsplit_once('/') {
                        let mut end = 0;
                        for elem in parent_path.split('/') {
                            end += elem.len();
                            if pattern.matches(&parent_path[..end]).unwrap_or(false) {
                                m = true;
                                break;
                            }
                            end += 1;
                        }
                    }
                }
            }
            info.parent_matched[i] = m;
            if m {
                matched = !pattern.exclusion;
            }
        }
        Ok((matched, info))
    }
}

/// Go's `filepath.Clean` for slash-separated paths.
pub fn go_clean(path: &str) -> String {
    if path.is_empty() {
        return ".".into();
    }
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for elem in path.split('/') {
        match elem {
            "" | "." => {}
            ".." => {
                if matches!(parts.last(), Some(last) if *last != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            e => parts.push(e),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

/// Checks the glob syntax the way Go's `filepath.Match` does (bad classes, dangling escapes).
fn validate_glob(p: &str) -> Result<(), &'static str> {
    let chars: Vec<char> = p.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => {
                if i + 1 >= chars.len() {
                    return Err("dangling escape at end of pattern");
                }
                i += 2;
            }
            '[' => {
                i += 1;
                if i < chars.len() && chars[i] == '^' {
                    i += 1;
                }
                let mut nrange = 0;
                loop {
                    if i < chars.len() && chars[i] == ']' && nrange > 0 {
                        i += 1;
                        break;
                    }
                    // low end of the range
                    i = class_char(&chars, i)?;
                    if i < chars.len() && chars[i] == '-' {
                        i = class_char(&chars, i + 1)?;
                    }
                    nrange += 1;
                }
            }
            _ => i += 1,
        }
    }
    Ok(())
}

fn class_char(chars: &[char], i: usize) -> Result<usize, &'static str> {
    match chars.get(i) {
        None => Err("unterminated character class"),
        Some('-') | Some(']') => Err("bad character range"),
        Some('\\') => {
            if i + 1 >= chars.len() {
                Err("dangling escape in character class")
            } else {
                Ok(i + 2)
            }
        }
        Some(_) => Ok(i + 1),
    }
}

fn should_escape(c: char) -> bool {
    ".+()|{}$".contains(c)
}

fn compile(pattern: &str) -> MatchKind {
    #[derive(PartialEq)]
    enum Detected {
        Exact,
        Prefix,
        Suffix,
        Regexp,
    }
    let mut re = String::from("^");
    let mut detected = Detected::Exact;
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    let mut first = true;
    while i < chars.len() {
        let ch = chars[i];
        i += 1;
        if ch == '*' {
            if chars.get(i) == Some(&'*') {
                i += 1;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                if i >= chars.len() {
                    if detected == Detected::Exact {
                        detected = Detected::Prefix;
                    } else {
                        re.push_str(".*");
                        detected = Detected::Regexp;
                    }
                } else {
                    re.push_str("(.*/)?");
                    detected = Detected::Regexp;
                }
                if first {
                    detected = Detected::Suffix;
                }
            } else {
                re.push_str("[^/]*");
                detected = Detected::Regexp;
            }
        } else if ch == '?' {
            re.push_str("[^/]");
            detected = Detected::Regexp;
        } else if should_escape(ch) {
            re.push('\\');
            re.push(ch);
        } else if ch == '\\' {
            if i < chars.len() {
                re.push('\\');
                re.push(chars[i]);
                i += 1;
                detected = Detected::Regexp;
            } else {
                re.push('\\');
            }
        } else if ch == '[' || ch == ']' {
            re.push(ch);
            detected = Detected::Regexp;
        } else {
            re.push(ch);
        }
        first = false;
    }
    match detected {
        Detected::Exact => MatchKind::Exact,
        Detected::Prefix => MatchKind::Prefix,
        Detected::Suffix => MatchKind::Suffix,
        Detected::Regexp => {
            re.push('$');
            match Regex::new(&re) {
                Ok(r) => MatchKind::Regexp(r),
                Err(_) => MatchKind::Bad,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(patterns: &[&str], path: &str) -> bool {
        PatternMatcher::new(patterns)
            .unwrap()
            .matches_or_parent_matches(path)
            .unwrap()
    }

    #[test]
    fn table() {
        // (patterns, path, expected) — cases follow upstream's documented behaviour.
        let cases: &[(&[&str], &str, bool)] = &[
            (&["**"], "file", true),
            (&["**"], "file/", true),
            (&["**/"], "file", true),
            (&["**/"], "file/", true),
            (&["**/**"], "file", true),
            (&["dir/**"], "dir/file", true),
            (&["dir/**"], "dir/file/", true),
            (&["dir/**"], "dir/dir2/file", true),
            (&["dir/**"], "dir/dir2/file/", true),
            (&["**/dir"], "dir", true),
            (&["**/dir"], "dir/file", true),
            (&["**/dir2/*"], "dir/dir2/file", true),
            (&["**/dir2/*"], "dir/dir2/file/", true),
            (&["**/dir2/**"], "dir/dir2/dir3/file", true),
            (&["**/dir2/**"], "dir/dir2/dir3/file/", true),
            (&["**file"], "file", true),
            (&["**file"], "dir/file", true),
            (&["**/file"], "dir/file", true),
            (&["**file"], "dir/dir/file", true),
            (&["**/file"], "dir/dir/file", true),
            (&["**/file*"], "dir/dir/file", true),
            (&["**/file*"], "dir/dir/file.txt", true),
            (&["**/file*txt"], "dir/dir/file.txt", true),
            (&["**/file*.txt"], "dir/dir/file.txt", true),
            (&["**/file*.txt*"], "dir/dir/file.txt", true),
            (&["**/**/*.txt"], "dir/dir/file.txt", true),
            (&["**/**/*.txt2"], "dir/dir/file.txt", false),
            (&["**/*.txt"], "file.txt", true),
            (&["**/**/*.txt"], "file.txt", true),
            (&["a**/*.txt"], "a/file.txt", true),
            (&["a**/*.txt"], "a/dir/file.txt", true),
            (&["a**/*.txt"], "a/dir/dir/file.txt", true),
            (&["a/*.txt"], "a/dir/file.txt", false),
            (&["a/*.txt"], "a/file.txt", true),
            (&["a/*.txt**"], "a/file.txt", true),
            (&["a[b-d]e"], "ae", false),
            (&["a[b-d]e"], "ace", true),
            (&["a[b-d]e"], "aae", false),
            (&["a[^b-d]e"], "aze", true),
            (&[".*"], ".foo", true),
            (&[".*"], "foo", false),
            (&["abc.def"], "abcdef", false),
            (&["abc.def"], "abc.def", true),
            (&["abc.def"], "abcZdef", false),
            (&["abc?def"], "abcZdef", true),
            (&["abc?def"], "abcdef", false),
            (&["a\\\\"], "a\\", true),
            (&["**/foo/bar"], "foo/bar", true),
            (&["**/foo/bar"], "dir/foo/bar", true),
            (&["**/foo/bar"], "dir/dir2/foo/bar", true),
            (&["abc/**"], "abc", false),
            (&["abc/**"], "abc/def", true),
            (&["abc/**"], "abc/def/ghi", true),
            (&["**/.foo"], ".foo", true),
            (&["**/.foo"], "bar.foo", false),
            (&["a(b)c/def"], "a(b)c/def", true),
            (&["a(b)c/def"], "a(b)c/xyz", false),
            (&["a.|)$(}+{bc"], "a.|)$(}+{bc", true),
            (
                &["dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl"],
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                true,
            ),
            (
                &["dist/*.whl"],
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                true,
            ),
            // parent directory matching and exceptions
            (&["docs"], "docs/README.md", true),
            (&["docs", "!docs/README.md"], "docs/README.md", false),
            (&["docs", "!docs/README.md"], "docs/other.md", true),
            (&["*.md", "!README.md"], "README.md", false),
            (&["*.md", "!README.md", "README.md"], "README.md", true),
            (&["./foo/"], "foo", true),
            (&["foo//bar/../baz"], "foo/baz", true),
            (&["  foo  "], "foo", true),
            (&[""], "foo", false),
            (&["foo"], "foobar", false),
        ];
        for (pats, path, want) in cases {
            assert_eq!(m(pats, path), *want, "patterns {pats:?} path {path:?}");
        }
    }

    #[test]
    fn invalid_patterns() {
        for bad in ["!", "[", "a[", "[]", "[a-]", "\\", "a[\\"] {
            assert!(
                PatternMatcher::new(&[bad]).is_err(),
                "pattern {bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn clean_table() {
        let cases = [
            ("", "."),
            (".", "."),
            ("./a", "a"),
            ("a//b", "a/b"),
            ("a/b/..", "a"),
            ("../a", "../a"),
            ("/../a", "/a"),
            ("a/", "a"),
            ("/", "/"),
            ("a/../..", ".."),
        ];
        for (input, want) in cases {
            assert_eq!(go_clean(input), want, "clean {input:?}");
        }
    }

    #[test]
    fn parent_results_match_direct() {
        let pm = PatternMatcher::new(&["a/b", "!a/b/c*", "**/*.log"]).unwrap();
        let (root_m, root_info) = pm
            .matches_using_parent_results("a", &MatchInfo::default())
            .unwrap();
        assert!(!root_m);
        let (ab, ab_info) = pm.matches_using_parent_results("a/b", &root_info).unwrap();
        assert!(ab);
        let (abc, _) = pm
            .matches_using_parent_results("a/b/cat", &ab_info)
            .unwrap();
        assert!(!abc);
        let (abd, _) = pm
            .matches_using_parent_results("a/b/dog", &ab_info)
            .unwrap();
        assert!(abd);
        for p in ["a/b/cat", "a/b/dog", "x/y.log", "a"] {
            let direct = pm.matches_or_parent_matches(p).unwrap();
            let (via, _) = pm
                .matches_using_parent_results(p, &MatchInfo::default())
                .unwrap();
            assert_eq!(direct, via, "{p}");
        }
    }
}
