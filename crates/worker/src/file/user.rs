//! Owner resolution for file actions (`ChownOpt`): ids as given, names looked up in the
//! `/etc/passwd` and `/etc/group` of a state (read inside that state's root).
//!
//! Following buildkitd v0.11.6 (`solver/llbsolver/file/user_linux.go`): a user by id sets both
//! uid and gid to that id; a user by name takes uid and primary gid from passwd; a group then
//! overrides the gid. A name that is not found (or a missing file) resolves to 0, as upstream.

use std::io::Read;

use rustix::fs::{Mode, OFlags};

use super::root::Root;
use crate::error::{Error, Result};

/// A parsed owner spec, with names still unresolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Who {
    Id(u32),
    /// Name and the index of the state whose `/etc` files resolve it.
    Name(String, i64),
}

/// `ChownOpt` in plain form.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Owner {
    pub user: Option<Who>,
    pub group: Option<Who>,
}

impl Owner {
    pub(crate) fn from_pb(c: &protos::pb::ChownOpt) -> Owner {
        let conv = |u: &Option<protos::pb::UserOpt>| -> Option<Who> {
            match u.as_ref()?.user.as_ref()? {
                protos::pb::user_opt::User::ById(id) => Some(Who::Id(*id)),
                protos::pb::user_opt::User::ByName(n) => Some(Who::Name(n.name.clone(), n.input)),
            }
        };
        Owner {
            user: conv(&c.user),
            group: conv(&c.group),
        }
    }
}

fn read_etc(root: &Root, file: &str) -> Result<Option<String>> {
    match root.open_at(file, OFlags::RDONLY, Mode::empty()) {
        Ok(fd) => {
            let mut s = String::new();
            std::fs::File::from(fd)
                .read_to_string(&mut s)
                .map_err(|e| Error::io("read", root.path().join(&file[1..]), e))?;
            Ok(Some(s))
        }
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::ENOTDIR) =>
        {
            Ok(None)
        }
        Err(e) => Err(Error::io("open", root.path().join(&file[1..]), e)),
    }
}

/// Looks `name` up in passwd-format text: `(uid, gid)`.
pub(crate) fn lookup_passwd(text: &str, name: &str) -> Option<(u32, u32)> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() >= 4 && f[0] == name {
            Some((f[2].trim().parse().ok()?, f[3].trim().parse().ok()?))
        } else {
            None
        }
    })
}

/// Looks `name` up in group-format text: gid.
pub(crate) fn lookup_group(text: &str, name: &str) -> Option<u32> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() >= 3 && f[0] == name {
            f[2].trim().parse().ok()
        } else {
            None
        }
    })
}

/// Resolves `owner` to `(uid, gid)`; `roots(i)` gives the root of state index `i`
/// (`None` for scratch).
pub(crate) fn resolve(
    owner: &Owner,
    roots: &dyn Fn(i64) -> Result<Option<Root>>,
) -> Result<(u32, u32)> {
    let (mut uid, mut gid) = (0, 0);
    match &owner.user {
        None => {}
        Some(Who::Id(id)) => {
            uid = *id;
            gid = *id;
        }
        Some(Who::Name(name, input)) => {
            if let Some(root) = roots(*input)? {
                if let Some(text) = read_etc(&root, "/etc/passwd")? {
                    if let Some((u, g)) = lookup_passwd(&text, name) {
                        uid = u;
                        gid = g;
                    } else {
                        tracing::debug!(user = %name, "user not in /etc/passwd; using 0");
                    }
                }
            }
        }
    }
    match &owner.group {
        None => {}
        Some(Who::Id(id)) => gid = *id,
        Some(Who::Name(name, input)) => {
            if let Some(root) = roots(*input)? {
                if let Some(text) = read_etc(&root, "/etc/group")? {
                    if let Some(g) = lookup_group(&text, name) {
                        gid = g;
                    } else {
                        tracing::debug!(group = %name, "group not in /etc/group; using 0");
                    }
                }
            }
        }
    }
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_etc_files() {
        let passwd =
            "root:x:0:0:root:/root:/bin/sh\n# comment\nnobody:x:65534:65533::/:/bin/false\nbad\n";
        assert_eq!(lookup_passwd(passwd, "nobody"), Some((65534, 65533)));
        assert_eq!(lookup_passwd(passwd, "root"), Some((0, 0)));
        assert_eq!(lookup_passwd(passwd, "nob"), None);
        let group = "root:x:0:\nstaff:x:50:alice,bob\n";
        assert_eq!(lookup_group(group, "staff"), Some(50));
        assert_eq!(lookup_group(group, "none"), None);
    }

    #[test]
    fn resolve_names_inside_root() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("etc")).unwrap();
        std::fs::write(d.path().join("etc/passwd"), "app:x:1000:1001::/:/bin/sh\n").unwrap();
        std::fs::write(d.path().join("etc/group"), "devs:x:2000:\n").unwrap();
        let path = d.path().to_path_buf();
        let roots = move |_i: i64| -> Result<Option<Root>> { Ok(Some(Root::open(&path).unwrap())) };
        let o = |user, group| Owner { user, group };
        assert_eq!(
            resolve(&o(Some(Who::Name("app".into(), 0)), None), &roots).unwrap(),
            (1000, 1001)
        );
        assert_eq!(
            resolve(
                &o(
                    Some(Who::Name("app".into(), 0)),
                    Some(Who::Name("devs".into(), 0))
                ),
                &roots
            )
            .unwrap(),
            (1000, 2000)
        );
        assert_eq!(resolve(&o(Some(Who::Id(7)), None), &roots).unwrap(), (7, 7));
        assert_eq!(
            resolve(&o(Some(Who::Id(7)), Some(Who::Id(9))), &roots).unwrap(),
            (7, 9)
        );
        assert_eq!(
            resolve(&o(Some(Who::Name("ghost".into(), 0)), None), &roots).unwrap(),
            (0, 0)
        );
    }
}
