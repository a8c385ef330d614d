//! Depth-first directory walk with include/exclude/follow-path filtering, as the fsutil sender does it.
//!
//! Order: each directory's entries sorted bytewise by name, a directory before its contents, the
//! root itself not reported (Go `filepath.Walk` order). Include and exclude patterns use
//! [`PatternMatcher`]; a directory that matches no include pattern is still descended into when
//! an include pattern could match below it, and parent directories of reported entries are
//! reported (once, just before their first reported child) even when they do not match
//! themselves. Follows `tonistiigi/fsutil` `walker.go` and `followlinks.go`.

use crate::patterns::{go_clean, MatchInfo, Pattern, PatternMatcher};
use crate::stat::{mkstat, InodeMap, Stat};
use crate::Error;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Filters for a walk.
#[derive(Debug, Clone, Default)]
pub struct WalkOptions {
    /// Keep only paths matching these patterns (plus the parents needed to reach them).
    pub include_patterns: Vec<String>,
    /// Drop paths matching these patterns.
    pub exclude_patterns: Vec<String>,
    /// Symlinks at these paths are resolved; their targets are added to the include set.
    pub follow_paths: Vec<String>,
}

/// What the per-entry map function decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapResult {
    /// Keep the (possibly rewritten) entry.
    Keep,
    /// Drop this entry but continue.
    Exclude,
    /// Drop this entry and, for a directory, everything below it.
    SkipDir,
}

/// Walks `root` and calls `f` for every kept entry in send order.
///
/// `map` may rewrite a stat (e.g. uid/gid) and decide to drop it.
pub fn walk(
    root: &Path,
    opts: &WalkOptions,
    map: &mut dyn FnMut(&mut Stat) -> MapResult,
    f: &mut dyn FnMut(Stat) -> Result<(), Error>,
) -> Result<(), Error> {
    let md = std::fs::metadata(root).map_err(|source| Error::Io {
        op: "stat",
        path: root.to_path_buf(),
        source,
    })?;
    if !md.is_dir() {
        return Err(Error::NotADirectory {
            path: root.to_path_buf(),
        });
    }
    let root = std::fs::canonicalize(root).map_err(|source| Error::Io {
        op: "resolve",
        path: root.to_path_buf(),
        source,
    })?;

    let mut include = opts.include_patterns.clone();
    if !opts.follow_paths.is_empty() {
        let targets = follow_links(&root, &opts.follow_paths)?;
        if let Some(targets) = targets {
            include.extend(targets);
            include.sort();
            include = dedupe_paths(&include).unwrap_or_default();
        }
    }
    let special = |p: &Pattern| {
        p.without_trailing_glob()
            .contains(['*', '[', ']', '?', '^', '\\'])
    };
    let include_m = if include.is_empty() {
        None
    } else {
        Some(PatternMatcher::new(&include)?)
    };
    let only_prefix_includes = include_m
        .as_ref()
        .is_none_or(|m| !m.patterns().iter().any(|p| !p.is_exclusion() && special(p)));
    let exclude_m = if opts.exclude_patterns.is_empty() {
        None
    } else {
        Some(PatternMatcher::new(&opts.exclude_patterns)?)
    };
    let only_prefix_exclude_exceptions = exclude_m
        .as_ref()
        .is_none_or(|m| !m.patterns().iter().any(|p| p.is_exclusion() && special(p)));

    let mut w = Walker {
        include_m,
        exclude_m,
        only_prefix_includes,
        only_prefix_exclude_exceptions,
        seen: InodeMap::default(),
        map,
        f,
    };
    let mut parents = Vec::new();
    w.walk_dir(&root, "", &mut parents)
}

struct PendingDir {
    full: PathBuf,
    rel: String,
    include_info: MatchInfo,
    exclude_info: MatchInfo,
    called: bool,
}

struct Walker<'a> {
    include_m: Option<PatternMatcher>,
    exclude_m: Option<PatternMatcher>,
    only_prefix_includes: bool,
    only_prefix_exclude_exceptions: bool,
    seen: InodeMap,
    map: &'a mut dyn FnMut(&mut Stat) -> MapResult,
    f: &'a mut dyn FnMut(Stat) -> Result<(), Error>,
}

impl Walker<'_> {
    fn walk_dir(
        &mut self,
        dir: &Path,
        rel_dir: &str,
        parents: &mut Vec<PendingDir>,
    ) -> Result<(), Error> {
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(Error::Io {
                    op: "readdir",
                    path: dir.to_path_buf(),
                    source,
                })
            }
        };
        let mut names = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|source| Error::Io {
                op: "readdir",
                path: dir.to_path_buf(),
                source,
            })?;
            names.push(ent.file_name());
        }
        names.sort_by(|a, b| {
            use std::os::unix::ffi::OsStrExt;
            a.as_bytes().cmp(b.as_bytes())
        });
        for name in names {
            let name_s = name.to_string_lossy().into_owned();
            let rel = if rel_dir.is_empty() {
                name_s
            } else {
                format!("{rel_dir}/{name_s}")
            };
            let full = dir.join(&name);
            let is_dir = match std::fs::symlink_metadata(&full) {
                Ok(md) => md.is_dir(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(Error::Io {
                        op: "lstat",
                        path: full,
                        source,
                    })
                }
            };
            match self.visit(&full, &rel, is_dir, parents)? {
                Visit::Descend(pending) => {
                    parents.push(pending);
                    self.walk_dir(&full, &rel, parents)?;
                    parents.pop();
                }
                Visit::Skip => {}
            }
        }
        Ok(())
    }

    fn visit(
        &mut self,
        full: &Path,
        rel: &str,
        is_dir: bool,
        parents: &mut [PendingDir],
    ) -> Result<Visit, Error> {
        let mut pending = PendingDir {
            full: full.to_path_buf(),
            rel: rel.to_string(),
            include_info: MatchInfo::default(),
            exclude_info: MatchInfo::default(),
            called: false,
        };
        let mut skip = false;
        if let Some(m) = &self.include_m {
            let parent_info = parents
                .last()
                .map(|p| p.include_info.clone())
                .unwrap_or_default();
            let (matched, info) = m.matches_using_parent_results(rel, &parent_info)?;
            pending.include_info = info;
            if !matched {
                if is_dir && self.only_prefix_includes {
                    let dir_slash = format!("{rel}/");
                    let may_match_below =
                        m.patterns().iter().filter(|p| !p.is_exclusion()).any(|p| {
                            format!("{}/", p.without_trailing_glob()).starts_with(&dir_slash)
                        });
                    if !may_match_below {
                        return Ok(Visit::Skip);
                    }
                }
                skip = true;
            }
        }
        if let Some(m) = &self.exclude_m {
            let parent_info = parents
                .last()
                .map(|p| p.exclude_info.clone())
                .unwrap_or_default();
            let (matched, info) = m.matches_using_parent_results(rel, &parent_info)?;
            pending.exclude_info = info;
            if matched {
                if is_dir && self.only_prefix_exclude_exceptions {
                    if !m.has_exclusions() {
                        return Ok(Visit::Skip);
                    }
                    let dir_slash = format!("{rel}/");
                    let exception_below =
                        m.patterns().iter().filter(|p| p.is_exclusion()).any(|p| {
                            format!("{}/", p.without_trailing_glob()).starts_with(&dir_slash)
                        });
                    if !exception_below {
                        return Ok(Visit::Skip);
                    }
                }
                skip = true;
            }
        }
        if !skip {
            let mut st = mkstat(full, rel, Some(&mut self.seen))?;
            match (self.map)(&mut st) {
                MapResult::SkipDir => return Ok(Visit::Skip),
                MapResult::Exclude => {
                    return Ok(if is_dir {
                        Visit::Descend(pending)
                    } else {
                        Visit::Skip
                    });
                }
                MapResult::Keep => {}
            }
            for parent in parents.iter_mut() {
                if parent.called {
                    continue;
                }
                let mut pst = mkstat(&parent.full, &parent.rel, Some(&mut self.seen))?;
                match (self.map)(&mut pst) {
                    MapResult::SkipDir | MapResult::Exclude => continue,
                    MapResult::Keep => {}
                }
                (self.f)(pst)?;
                parent.called = true;
            }
            (self.f)(st)?;
            pending.called = true;
        }
        Ok(if is_dir {
            Visit::Descend(pending)
        } else {
            Visit::Skip
        })
    }
}

enum Visit {
    Descend(PendingDir),
    Skip,
}

/// Resolves symlinks named by `paths` (relative to `root`) into the set of paths to include.
/// `None` means "no filter" (one of the paths is the root).
fn follow_links(root: &Path, paths: &[String]) -> Result<Option<Vec<String>>, Error> {
    let mut resolved = BTreeSet::new();
    for p in paths {
        append_follow(root, p, &mut resolved, 0)?;
    }
    let list: Vec<String> = resolved.into_iter().collect();
    Ok(dedupe_paths(&list))
}

fn append_follow(
    root: &Path,
    p: &str,
    resolved: &mut BTreeSet<String>,
    depth: usize,
) -> Result<(), Error> {
    if depth > 255 {
        return Err(Error::Protocol {
            message: format!("too many levels of symbolic links resolving {p}"),
        });
    }
    let mut rest = go_clean(p);
    if rest.starts_with('/') {
        rest = go_clean(rest.trim_start_matches('/'));
    }
    let mut current = String::from(".");
    loop {
        let (head, tail) = match rest.split_once('/') {
            Some((h, t)) => (h.to_string(), t.to_string()),
            None => (rest.clone(), String::new()),
        };
        current = if current == "." {
            head
        } else {
            format!("{current}/{head}")
        };
        let targets = read_symlink(root, &current, true)?;
        rest = tail;
        if (rest.is_empty() || targets.is_some()) && resolved.contains(&current) {
            return Ok(());
        }
        if let Some(targets) = targets {
            resolved.insert(current.clone());
            for t in targets {
                let joined = if rest.is_empty() {
                    t
                } else {
                    format!("{t}/{rest}")
                };
                append_follow(root, &joined, resolved, depth + 1)?;
            }
            return Ok(());
        }
        if rest.is_empty() {
            resolved.insert(current);
            return Ok(());
        }
    }
}

fn read_symlink(root: &Path, p: &str, allow_wildcard: bool) -> Result<Option<Vec<String>>, Error> {
    let real = root.join(p);
    let (dir, base) = match p.rsplit_once('/') {
        Some((d, b)) => (d.to_string(), b.to_string()),
        None => (".".to_string(), p.to_string()),
    };
    if allow_wildcard && contains_wildcards(&base) {
        let m = PatternMatcher::new(&[base.as_str()])?;
        let rd = match std::fs::read_dir(real.parent().unwrap_or(root)) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(Error::Io {
                    op: "readdir",
                    path: real,
                    source,
                })
            }
        };
        let mut out = Vec::new();
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for name in names {
            if m.patterns()[0].as_str().is_empty() || !m.matches_or_parent_matches(&name)? {
                continue;
            }
            let child = if dir == "." {
                name
            } else {
                format!("{dir}/{name}")
            };
            if let Some(t) = read_symlink(root, &child, false)? {
                out.extend(t);
            }
        }
        return Ok(if out.is_empty() { None } else { Some(out) });
    }
    let md = match std::fs::symlink_metadata(&real) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::Io {
                op: "lstat",
                path: real,
                source,
            })
        }
    };
    if !md.file_type().is_symlink() {
        return Ok(None);
    }
    let link = std::fs::read_link(&real).map_err(|source| Error::Io {
        op: "readlink",
        path: real.clone(),
        source,
    })?;
    let link = go_clean(&link.to_string_lossy());
    if link.starts_with('/') {
        return Ok(Some(vec![link]));
    }
    let joined = if dir == "." {
        link
    } else {
        format!("{dir}/{link}")
    };
    Ok(Some(vec![go_clean(&format!("/{joined}"))]))
}

fn contains_wildcards(name: &str) -> bool {
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

/// Drops paths covered by an earlier parent (input sorted); `None` when one is the root (no filter).
fn dedupe_paths(sorted: &[String]) -> Option<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for s in sorted {
        if s == "." {
            return None;
        }
        if let Some(last) = out.last() {
            if s.starts_with(&format!("{last}/")) {
                continue;
            }
        }
        out.push(s.clone());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("a/b")).unwrap();
        fs::create_dir_all(r.join("c")).unwrap();
        fs::create_dir_all(r.join("node_modules/x")).unwrap();
        fs::write(r.join("a/b/f.txt"), "1").unwrap();
        fs::write(r.join("a/g.md"), "2").unwrap();
        fs::write(r.join("a-b"), "3").unwrap();
        fs::write(r.join("c/h.txt"), "4").unwrap();
        fs::write(r.join("node_modules/x/i.js"), "5").unwrap();
        fs::write(r.join("README.md"), "6").unwrap();
        std::os::unix::fs::symlink("c/h.txt", r.join("link")).unwrap();
        fs::hard_link(r.join("a/g.md"), r.join("c/hard.md")).unwrap();
        d
    }

    fn list(root: &Path, opts: WalkOptions) -> Vec<String> {
        let mut out = Vec::new();
        walk(root, &opts, &mut |_| MapResult::Keep, &mut |st| {
            out.push(st.path);
            Ok(())
        })
        .unwrap();
        out
    }

    fn opts(inc: &[&str], exc: &[&str], follow: &[&str]) -> WalkOptions {
        WalkOptions {
            include_patterns: inc.iter().map(|s| s.to_string()).collect(),
            exclude_patterns: exc.iter().map(|s| s.to_string()).collect(),
            follow_paths: follow.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn order_and_filters() {
        let d = tree();
        let r = d.path();
        let all = list(r, WalkOptions::default());
        assert_eq!(
            all,
            [
                "README.md",
                "a",
                "a/b",
                "a/b/f.txt",
                "a/g.md",
                "a-b",
                "c",
                "c/h.txt",
                "c/hard.md",
                "link",
                "node_modules",
                "node_modules/x",
                "node_modules/x/i.js"
            ]
        );
        type Case<'a> = (&'a [&'a str], &'a [&'a str], &'a [&'a str], &'a [&'a str]);
        let cases: &[Case<'_>] = &[
            (&["*.txt"], &[], &[], &[]),
            (
                &["**/*.txt"],
                &[],
                &[],
                &["a", "a/b", "a/b/f.txt", "c", "c/h.txt"],
            ),
            (&["a/b"], &[], &[], &["a", "a/b", "a/b/f.txt"]),
            (
                &[],
                &["node_modules"],
                &[],
                &[
                    "README.md",
                    "a",
                    "a/b",
                    "a/b/f.txt",
                    "a/g.md",
                    "a-b",
                    "c",
                    "c/h.txt",
                    "c/hard.md",
                    "link",
                ],
            ),
            (&[], &["*", "!a/g.md"], &[], &["a", "a/g.md"]),
            (
                &[],
                &["**/*.md", "a-b", "link", "node_modules", "c"],
                &[],
                &["a", "a/b", "a/b/f.txt"],
            ),
            (
                &["a", "c"],
                &["**/*.md"],
                &[],
                &["a", "a/b", "a/b/f.txt", "c", "c/h.txt"],
            ),
            (
                &["README.md"],
                &[],
                &["link"],
                &["README.md", "c", "c/h.txt", "link"],
            ),
        ];
        for (inc, exc, follow, want) in cases {
            let got = list(r, opts(inc, exc, follow));
            assert_eq!(
                &got, want,
                "include {inc:?} exclude {exc:?} follow {follow:?}"
            );
        }
    }

    #[test]
    fn hardlink_and_symlink_stats() {
        let d = tree();
        let mut stats = Vec::new();
        walk(
            d.path(),
            &WalkOptions::default(),
            &mut |_| MapResult::Keep,
            &mut |st| {
                stats.push(st);
                Ok(())
            },
        )
        .unwrap();
        let get = |p: &str| stats.iter().find(|s| s.path == p).unwrap().clone();
        let first = get("a/g.md");
        let hl = get("c/hard.md");
        assert_eq!(first.linkname, "");
        assert_eq!(first.size, 1);
        assert_eq!(hl.linkname, "a/g.md");
        assert_eq!(hl.size, 0);
        assert!(hl.is_hardlink());
        let l = get("link");
        assert_eq!(l.linkname, "c/h.txt");
        assert_eq!(
            l.mode & crate::filemode::MODE_SYMLINK,
            crate::filemode::MODE_SYMLINK
        );
        assert_eq!(l.size, 7);
        assert!(get("a").is_dir());
        assert_eq!(get("a").size, 0);
    }

    #[test]
    fn map_rewrites_and_skips() {
        let d = tree();
        let mut out = Vec::new();
        walk(
            d.path(),
            &WalkOptions::default(),
            &mut |st| {
                st.uid = 4242;
                if st.path == "node_modules" {
                    MapResult::SkipDir
                } else {
                    MapResult::Keep
                }
            },
            &mut |st| {
                out.push((st.path, st.uid));
                Ok(())
            },
        )
        .unwrap();
        assert!(out.iter().all(|(_, uid)| *uid == 4242));
        assert!(!out.iter().any(|(p, _)| p.starts_with("node_modules")));
    }

    #[test]
    fn not_a_directory() {
        let d = tree();
        let err = walk(
            &d.path().join("README.md"),
            &WalkOptions::default(),
            &mut |_| MapResult::Keep,
            &mut |_| Ok(()),
        )
        .unwrap_err();
        assert!(matches!(err, Error::NotADirectory { .. }), "{err}");
    }
}
