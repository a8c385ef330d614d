//! Resolution of the process user (`user[:group]`) against the rootfs' `/etc/passwd` and
//! `/etc/group`.
//!
//! Follows BuildKit's `executor/oci/user.go` (`GetUser`, `ParseUIDGID`) and the lookup rules of
//! runc's `libcontainer/user.GetExecUser` that it calls:
//! <https://github.com/moby/buildkit/blob/v0.11.6/executor/oci/user.go>.
//!
//! * `""` means root; if the lookup fails for the default user, root (0:0) is used anyway.
//! * `"uid:gid"` with both parts numeric (or `root`) is taken as is, without reading any file
//!   and without supplementary groups.
//! * Otherwise the user part matches a passwd entry by name or by uid. No match is an error for
//!   a name and falls back to the number itself for a numeric uid (group 0).
//! * An explicit group matches a group entry by name or gid (same fallback rule); without one,
//!   the supplementary groups are every group listing the user's name as a member.
//! * The primary gid is always first in the additional gids (containerd's
//!   `ensureAdditionalGids`).
//!
//! The files are opened with in-root resolution (`pathrs`), so a hostile `/etc` symlink cannot
//! make the daemon read a host file. Parsing is separate from I/O and unit-tested.

use std::io::Read;

use pathrs::flags::OpenFlags;

use crate::error::Error;

/// Upper bound on the size of `/etc/passwd` and `/etc/group` we read (hostile images).
const MAX_USER_FILE: u64 = 16 << 20;

/// The resolved identity of the process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ExecUser {
    pub uid: u32,
    pub gid: u32,
    /// Primary gid first, then supplementary groups.
    pub additional_gids: Vec<u32>,
}

#[derive(Debug, PartialEq, Eq)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
}

#[derive(Debug, PartialEq, Eq)]
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// Resolves `user` inside `root`.
pub(crate) fn resolve(root: &pathrs::Root, user: &str) -> Result<ExecUser, Error> {
    let (spec, is_default) = if user.is_empty() {
        ("0", true)
    } else {
        (user, false)
    };
    if let Some((uid, gid)) = parse_uid_gid(spec) {
        return Ok(with_primary(uid, gid, Vec::new()));
    }
    let passwd = read_user_file(root, "/etc/passwd")?;
    let group = read_user_file(root, "/etc/group")?;
    match lookup(spec, &passwd, &group) {
        Ok(u) => Ok(u),
        Err(_) if is_default => Ok(with_primary(0, 0, Vec::new())),
        Err(reason) => Err(Error::User {
            user: user.to_owned(),
            reason,
        }),
    }
}

fn with_primary(uid: u32, gid: u32, mut sgids: Vec<u32>) -> ExecUser {
    if !sgids.contains(&gid) {
        sgids.insert(0, gid);
    }
    ExecUser {
        uid,
        gid,
        additional_gids: sgids,
    }
}

/// Fast path: both parts present and numeric (`root` counts as 0).
fn parse_uid_gid(spec: &str) -> Option<(u32, u32)> {
    let (u, g) = spec.split_once(':')?;
    Some((parse_id(u)?, parse_id(g)?))
}

fn parse_id(s: &str) -> Option<u32> {
    if s == "root" {
        return Some(0);
    }
    s.parse().ok()
}

/// Reads a user database file; a missing file reads as empty.
fn read_user_file(root: &pathrs::Root, path: &str) -> Result<String, Error> {
    let in_root_err = |op, e: std::io::Error| Error::InRoot {
        path: path.into(),
        op,
        source: e,
    };
    let handle = match root.resolve(path) {
        Ok(h) => h,
        Err(e) => {
            let e = crate::stubs::pathrs_io(e);
            if e.kind() == std::io::ErrorKind::NotFound {
                return Ok(String::new());
            }
            return Err(in_root_err("resolve", e));
        }
    };
    let file = handle
        .reopen(OpenFlags::O_RDONLY)
        .map_err(|e| in_root_err("open", crate::stubs::pathrs_io(e)))?;
    let mut buf = Vec::new();
    file.take(MAX_USER_FILE)
        .read_to_end(&mut buf)
        .map_err(|e| in_root_err("read", e))?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn parse_passwd(content: &str) -> Vec<PasswdEntry> {
    content
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_owned(),
                uid: f[2].trim().parse().ok()?,
                gid: f[3].trim().parse().ok()?,
            })
        })
        .collect()
}

fn parse_group(content: &str) -> Vec<GroupEntry> {
    content
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 3 {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_owned(),
                gid: f[2].trim().parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// The lookup proper, on file contents. Errors are human-readable reasons.
fn lookup(spec: &str, passwd: &str, group: &str) -> Result<ExecUser, String> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let users = parse_passwd(passwd);
    let groups = parse_group(group);

    let numeric_uid: Option<u32> = user_part.parse().ok();
    let entry = users
        .iter()
        .find(|e| e.name == user_part || Some(e.uid) == numeric_uid);
    let (uid, mut gid, name) = match (entry, numeric_uid) {
        (Some(e), _) => (e.uid, e.gid, Some(e.name.as_str())),
        (None, Some(n)) => (n, 0, None),
        (None, None) => return Err(format!("no user {user_part:?} in /etc/passwd")),
    };

    let mut sgids = Vec::new();
    match group_part {
        Some(g) if !g.is_empty() => {
            let numeric_gid: Option<u32> = g.parse().ok();
            match groups
                .iter()
                .find(|e| e.name == g || Some(e.gid) == numeric_gid)
            {
                Some(e) => gid = e.gid,
                None => match numeric_gid {
                    Some(n) => gid = n,
                    None => return Err(format!("no group {g:?} in /etc/group")),
                },
            }
        }
        _ => {
            if let Some(name) = name {
                for g in &groups {
                    if g.members.iter().any(|m| m == name) && !sgids.contains(&g.gid) {
                        sgids.push(g.gid);
                    }
                }
            }
        }
    }
    Ok(with_primary(uid, gid, sgids))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # comment\n\
        daemon:x:1:1::/:/bin/false\n\
        alice:x:1000:1000:Alice:/home/alice:/bin/sh\n\
        broken line\n\
        bob:x:1001:100::/home/bob:/bin/sh\n";
    const GROUP: &str = "root:x:0:\n\
        users:x:100:\n\
        alice:x:1000:\n\
        wheel:x:10:alice,bob\n\
        docker:x:999: bob , alice\n";

    #[test]
    fn fast_path_table() {
        let cases = [
            ("0:0", Some((0, 0))),
            ("1000:1000", Some((1000, 1000))),
            ("root:root", Some((0, 0))),
            ("5:root", Some((5, 0))),
            ("1000", None),
            ("alice:1", None),
            ("1:staff", None),
            ("", None),
        ];
        for (input, want) in cases {
            assert_eq!(parse_uid_gid(input), want, "input {input:?}");
        }
    }

    #[test]
    fn lookup_table() {
        type Want = Result<(u32, u32, &'static [u32]), &'static str>;
        let cases: &[(&str, Want)] = &[
            ("alice", Ok((1000, 1000, &[1000, 10, 999]))),
            ("1000", Ok((1000, 1000, &[1000, 10, 999]))),
            ("bob", Ok((1001, 100, &[100, 10, 999]))),
            ("alice:users", Ok((1000, 100, &[100]))),
            ("alice:10", Ok((1000, 10, &[10]))),
            ("alice:4242", Ok((1000, 4242, &[4242]))),
            ("4242", Ok((4242, 0, &[0]))),
            ("4242:users", Ok((4242, 100, &[100]))),
            ("daemon", Ok((1, 1, &[1]))),
            ("root", Ok((0, 0, &[0]))),
            ("nobody", Err("no user \"nobody\"")),
            ("alice:nogroup", Err("no group \"nogroup\"")),
        ];
        for (input, want) in cases {
            let got = lookup(input, PASSWD, GROUP);
            match (want, got) {
                (Ok((uid, gid, sgids)), Ok(u)) => {
                    assert_eq!(
                        (u.uid, u.gid, u.additional_gids.as_slice()),
                        (*uid, *gid, *sgids),
                        "input {input:?}"
                    );
                }
                (Err(needle), Err(msg)) => {
                    assert!(msg.contains(needle), "input {input:?}: {msg}")
                }
                (want, got) => panic!("input {input:?}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn missing_files_resolve_numbers_only() {
        assert_eq!(lookup("7", "", "").unwrap().uid, 7);
        assert!(lookup("alice", "", "").is_err());
    }

    #[test]
    fn resolve_reads_files_inside_root_only() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(
            outside.path().join("passwd"),
            "mallory:x:4000:4000::/:/bin/sh\n",
        )
        .unwrap();
        // /etc is an absolute symlink to a host directory holding a passwd file: in-root
        // resolution must look for <root>/<outside>/passwd instead, which does not exist.
        std::os::unix::fs::symlink(outside.path(), dir.path().join("etc")).unwrap();
        let root = pathrs::Root::open(dir.path()).unwrap();
        let err = resolve(&root, "mallory").unwrap_err();
        assert!(matches!(err, Error::User { .. }), "{err}");
        // The default user still works without any passwd file.
        assert_eq!(resolve(&root, "").unwrap().uid, 0);
    }
}
