//! Wildcards for copy and rm sources: Go's `filepath.Match` syntax (`*`, `?`, `[...]`, `\`
//! escapes; `*` never matches `/`), and the expansion used by fsutil's `ResolveWildcards`: the
//! path is split at the first component with a wildcard, the fixed prefix is resolved in the
//! root and the rest is matched against paths below it (a matched directory is not descended).

use std::io;

use rustix::fs::{Dir, FileType};

use super::root::{clean_abs, Root};

/// Whether `name` contains a wildcard character (unescaped `*`, `?` or `[`).
pub(crate) fn has_wildcards(name: &str) -> bool {
    let b = name.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'*' | b'?' | b'[' => return true,
            _ => {}
        }
        i += 1;
    }
    false
}

/// Go's `filepath.Match`. Err for a malformed pattern.
pub(crate) fn glob_match(pattern: &str, name: &str) -> Result<bool, String> {
    fn class(p: &[u8], c: char) -> Result<(bool, usize), String> {
        // p starts after '['; returns (matched, bytes consumed including ']').
        let s = std::str::from_utf8(p).map_err(|_| "bad pattern")?;
        let mut chars = s.char_indices().peekable();
        let mut negate = false;
        if let Some(&(_, '^')) = chars.peek() {
            negate = true;
            chars.next();
        }
        let mut matched = false;
        let mut first = true;
        loop {
            let Some((i, ch)) = chars.next() else {
                return Err("syntax error in pattern".into());
            };
            if ch == ']' && !first {
                return Ok((matched != negate, i + 1));
            }
            first = false;
            let lo = if ch == '\\' {
                chars.next().ok_or("syntax error in pattern")?.1
            } else {
                ch
            };
            let mut hi = lo;
            if let Some(&(_, '-')) = chars.peek() {
                let mut look = chars.clone();
                look.next();
                if let Some(&(_, h)) = look.peek() {
                    if h != ']' {
                        chars.next();
                        let (_, h) = chars.next().expect("peeked");
                        hi = if h == '\\' {
                            chars.next().ok_or("syntax error in pattern")?.1
                        } else {
                            h
                        };
                    }
                }
            }
            if lo <= c && c <= hi {
                matched = true;
            }
        }
    }
    fn rec(p: &[u8], n: &str) -> Result<bool, String> {
        if p.is_empty() {
            return Ok(n.is_empty());
        }
        match p[0] {
            b'*' => {
                let rest = &p[1..];
                // Try every split that does not consume '/'.
                let mut idx = 0;
                loop {
                    if rec(rest, &n[idx..])? {
                        return Ok(true);
                    }
                    let Some(c) = n[idx..].chars().next() else {
                        return Ok(false);
                    };
                    if c == '/' {
                        return Ok(false);
                    }
                    idx += c.len_utf8();
                }
            }
            b'?' => {
                let Some(c) = n.chars().next() else {
                    return Ok(false);
                };
                if c == '/' {
                    return Ok(false);
                }
                rec(&p[1..], &n[c.len_utf8()..])
            }
            b'[' => {
                let Some(c) = n.chars().next() else {
                    // Still validate the class syntax.
                    class(&p[1..], '\0')?;
                    return Ok(false);
                };
                let (m, used) = class(&p[1..], c)?;
                if !m || c == '/' {
                    return Ok(false);
                }
                rec(&p[1 + used..], &n[c.len_utf8()..])
            }
            b'\\' => {
                if p.len() < 2 {
                    return Err("syntax error in pattern".into());
                }
                let s = std::str::from_utf8(&p[1..]).map_err(|_| "bad pattern")?;
                let pc = s.chars().next().expect("non-empty");
                let Some(c) = n.chars().next() else {
                    return Ok(false);
                };
                if c != pc {
                    return Ok(false);
                }
                rec(&p[1 + pc.len_utf8()..], &n[c.len_utf8()..])
            }
            _ => {
                let s = std::str::from_utf8(p).map_err(|_| "bad pattern")?;
                let pc = s.chars().next().expect("non-empty");
                let Some(c) = n.chars().next() else {
                    return Ok(false);
                };
                if c != pc {
                    return Ok(false);
                }
                rec(&p[pc.len_utf8()..], &n[c.len_utf8()..])
            }
        }
    }
    rec(pattern.as_bytes(), name)
}

/// Splits a clean absolute path at the first component containing a wildcard.
pub(crate) fn split_wildcards(p: &str) -> (String, Option<String>) {
    let c = clean_abs(p);
    let comps: Vec<&str> = c.split('/').filter(|s| !s.is_empty()).collect();
    match comps.iter().position(|s| has_wildcards(s)) {
        None => (c, None),
        Some(i) => (clean_abs(&comps[..i].join("/")), Some(comps[i..].join("/"))),
    }
}

/// `src` as [`resolve_wildcards`] returns it when it has no wildcard (without looking at the
/// tree), or `None` when it has one.
pub(crate) fn literal_path(src: &str) -> Option<String> {
    match split_wildcards(src) {
        (p, None) => Some(p),
        _ => None,
    }
}

/// Expands `src` (absolute inside `root`) into the in-root paths it matches, sorted like a Go
/// `filepath.Walk` (lexical, parents before children). A path without wildcards is returned as
/// is. `follow` resolves symlinks in the fixed prefix.
pub(crate) fn resolve_wildcards(root: &Root, src: &str, follow: bool) -> io::Result<Vec<String>> {
    let (prefix, pattern) = split_wildcards(src);
    let Some(pattern) = pattern else {
        return Ok(vec![prefix]);
    };
    let _ = follow; // the prefix directory is always resolved inside the root
    let base = match root.resolve_existing(&prefix) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    let depth = pattern.split('/').count();
    let mut out = vec![];
    walk(root, &base, "", depth, &pattern, &mut out)?;
    Ok(out)
}

fn walk(
    root: &Root,
    base: &str,
    rel: &str,
    depth_left: usize,
    pattern: &str,
    out: &mut Vec<String>,
) -> io::Result<()> {
    if depth_left == 0 {
        return Ok(());
    }
    let dir_path = if rel.is_empty() {
        base.to_string()
    } else {
        format!("{}/{rel}", base.trim_end_matches('/'))
    };
    let fd = match root.open_dir(&dir_path) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut entries = vec![];
    for ent in Dir::read_from(&fd)? {
        let ent = ent?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if name == "." || name == ".." {
            continue;
        }
        entries.push((name, ent.file_type()));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, ft) in entries {
        let r = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let matched = glob_match(pattern, &r).map_err(io::Error::other)?;
        let full = clean_abs(&format!("{base}/{r}"));
        if matched {
            out.push(full);
            continue;
        }
        let is_dir = match ft {
            FileType::Unknown => {
                rustix::fs::statat(&fd, name.as_str(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                    .map(|st| super::root::file_type(&st) == FileType::Directory)
                    .unwrap_or(false)
            }
            ft => ft == FileType::Directory,
        };
        if is_dir {
            walk(root, base, &r, depth_left - 1, pattern, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_match_table() {
        for (p, n, want) in [
            ("abc", "abc", true),
            ("*", "abc", true),
            ("*c", "abc", true),
            ("a*", "a", true),
            ("a*", "ab/c", false),
            ("a*/b", "abc/b", true),
            ("a*/b", "a/c/b", false),
            ("a?c", "abc", true),
            ("a?c", "a/c", false),
            ("[abc]", "b", true),
            ("[^abc]", "b", false),
            ("[a-c]x", "bx", true),
            ("[!a]", "!", true),
            ("a\\*b", "a*b", true),
            ("a\\*b", "axb", false),
            ("*.txt", "foo.txt", true),
            ("*.txt", "dir/foo.txt", false),
        ] {
            assert_eq!(glob_match(p, n), Ok(want), "{p} vs {n}");
        }
        assert!(glob_match("[", "a").is_err());
        assert!(glob_match("[a-", "a").is_err());
    }

    #[test]
    fn split_at_first_wildcard() {
        assert_eq!(
            split_wildcards("/a/b*/c"),
            ("/a".into(), Some("b*/c".into()))
        );
        assert_eq!(split_wildcards("/a/b"), ("/a/b".into(), None));
        assert_eq!(
            split_wildcards("/*.txt"),
            ("/".into(), Some("*.txt".into()))
        );
    }

    #[test]
    fn resolves_matches_inside_root() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("src/sub")).unwrap();
        for f in ["src/a.txt", "src/b.txt", "src/c.md", "src/sub/d.txt"] {
            std::fs::write(r.join(f), "x").unwrap();
        }
        let root = Root::open(r).unwrap();
        assert_eq!(
            resolve_wildcards(&root, "/src/*.txt", false).unwrap(),
            vec!["/src/a.txt", "/src/b.txt"]
        );
        assert_eq!(
            resolve_wildcards(&root, "/src/*/*.txt", false).unwrap(),
            vec!["/src/sub/d.txt"]
        );
        assert_eq!(
            resolve_wildcards(&root, "/s*", false).unwrap(),
            vec!["/src"]
        );
        assert!(resolve_wildcards(&root, "/nope/*", false)
            .unwrap()
            .is_empty());
    }
}
