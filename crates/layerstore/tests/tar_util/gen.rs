//! Random trees for property tests.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
pub enum Leaf {
    File {
        data: Vec<u8>,
        mode: u32,
        xattr: Option<Vec<u8>>,
    },
    Symlink(Vec<u8>),
    Fifo(u32),
    Chardev(u32, u32),
    Whiteout,
    /// Hardlink to the n-th file, symlink, fifo or device created before it (a file if
    /// there is none).
    Hardlink(usize),
}

#[derive(Debug, Clone)]
pub enum Tree {
    Leaf(Leaf, Meta),
    Dir(BTreeMap<Vec<u8>, Tree>, Meta, bool),
}

#[derive(Debug, Clone)]
pub struct Meta {
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => "[a-z0-9_.-]{1,12}".prop_map(|s| s.into_bytes()),
        1 => (101usize..=250).prop_map(|n| {
            let mut v = vec![b'L'; n];
            v[n / 2] = b'-';
            v
        }),
        1 => prop::collection::vec(1u8..=255, 1..16),
        1 => Just("ünïcödé".as_bytes().to_vec()),
    ]
    .prop_filter("valid single component", |n| {
        !n.contains(&b'/') && n != b"." && n != b".." && !n.starts_with(b".wh.") && n.len() <= 255
    })
}

fn meta() -> impl Strategy<Value = Meta> {
    (
        prop_oneof![Just(0u32), 1u32..70_000, Just(3_000_000u32)],
        prop_oneof![Just(0u32), 1u32..70_000],
        prop_oneof![
            4 => 0i64..4_000_000_000,
            1 => Just(0i64),
            1 => Just(9_000_000_000i64), // beyond the 11-digit octal field: PAX mtime
        ],
    )
        .prop_map(|(uid, gid, mtime)| Meta { uid, gid, mtime })
}

fn leaf() -> impl Strategy<Value = Leaf> {
    prop_oneof![
        6 => (
            prop_oneof![
                3 => prop::collection::vec(any::<u8>(), 0..600),
                1 => (512usize..70_000).prop_map(|n| (0..n).map(|i| (i * 7 % 251) as u8).collect()),
            ],
            0u32..0o10000,
            prop::option::of(prop::collection::vec(any::<u8>(), 0..40)),
        )
            .prop_map(|(data, mode, xattr)| Leaf::File { data, mode, xattr }),
        2 => prop_oneof![
            "[a-z./]{1,30}".prop_map(|s| s.into_bytes()),
            Just(b"/abs/target".to_vec()),
            Just(vec![b't'; 150]),
            Just(b"../../../etc/passwd".to_vec()),
        ]
        .prop_map(Leaf::Symlink),
        1 => (0u32..0o1000).prop_map(Leaf::Fifo),
        1 => (1u32..300, 0u32..300).prop_map(|(a, b)| Leaf::Chardev(a, b)),
        1 => Just(Leaf::Whiteout),
        2 => (0usize..8).prop_map(Leaf::Hardlink),
    ]
}

fn tree(names: BoxedStrategy<Vec<u8>>) -> impl Strategy<Value = Tree> {
    let l = (leaf(), meta()).prop_map(|(l, m)| Tree::Leaf(l, m));
    l.prop_recursive(3, 40, 6, move |inner| {
        (
            prop::collection::btree_map(names.clone(), inner, 0..6),
            meta(),
            any::<bool>(),
        )
            .prop_map(|(c, m, opaque)| Tree::Dir(c, m, opaque))
    })
}

/// Random trees with names of every kind (long, non-UTF-8, ...).
pub fn top() -> impl Strategy<Value = BTreeMap<Vec<u8>, Tree>> {
    prop::collection::btree_map(name(), tree(name().boxed()), 1..8)
}

/// Random trees over a handful of names, so that two trees overlap a lot.
pub fn top_small() -> impl Strategy<Value = BTreeMap<Vec<u8>, Tree>> {
    let names = || {
        prop::sample::select(vec![
            b"a".to_vec(),
            b"b".to_vec(),
            b"c".to_vec(),
            b"d".to_vec(),
        ])
        .boxed()
    };
    prop::collection::btree_map(names(), tree(names()), 1..5)
}

/// Creates the tree; directories get their mtime after their children.
/// With `overlay` false, whiteouts become fifos and opaque markers are left out (a plain
/// tree).
pub fn build(
    dir: &Path,
    children: &BTreeMap<Vec<u8>, Tree>,
    files: &mut Vec<std::path::PathBuf>,
    overlay: bool,
) {
    use rustix::fs::FileType;
    for (n, t) in children {
        let p = path(dir, n);
        match t {
            Tree::Dir(c, m, opaque) => {
                std::fs::create_dir(&p).unwrap();
                build(&p, c, files, overlay);
                chown(&p, m.uid, m.gid);
                chmod(&p, 0o755);
                if *opaque && overlay {
                    setxattr(&p, "trusted.overlay.opaque", b"y");
                }
                set_times(&p, m.mtime);
            }
            Tree::Leaf(l, m) => {
                match l {
                    Leaf::File { data, mode, xattr } => {
                        std::fs::write(&p, data).unwrap();
                        chown(&p, m.uid, m.gid);
                        chmod(&p, *mode);
                        if let Some(x) = xattr {
                            setxattr(&p, "user.random", x);
                        }
                        files.push(p.clone());
                    }
                    Leaf::Symlink(t) => {
                        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(t), &p).unwrap();
                        chown(&p, m.uid, m.gid);
                        files.push(p.clone());
                    }
                    Leaf::Fifo(mode) => {
                        mknod(&p, FileType::Fifo, *mode, 0);
                        chown(&p, m.uid, m.gid);
                        chmod(&p, *mode);
                        files.push(p.clone());
                    }
                    Leaf::Chardev(a, b) => {
                        mknod(
                            &p,
                            FileType::CharacterDevice,
                            0o600,
                            rustix::fs::makedev(*a, *b),
                        );
                        chown(&p, m.uid, m.gid);
                        files.push(p.clone());
                    }
                    Leaf::Whiteout if !overlay => {
                        mknod(&p, FileType::Fifo, 0o644, 0);
                        chown(&p, m.uid, m.gid);
                    }
                    Leaf::Whiteout => {
                        mknod(&p, FileType::CharacterDevice, 0, 0);
                        chown(&p, m.uid, m.gid);
                    }
                    Leaf::Hardlink(i) => {
                        if files.is_empty() {
                            std::fs::write(&p, b"stand-in").unwrap();
                            chown(&p, m.uid, m.gid);
                            files.push(p.clone());
                        } else {
                            let target = files[i % files.len()].clone();
                            std::fs::hard_link(&target, &p).unwrap();
                            // The inode's times belong to the first name; keep them.
                            continue;
                        }
                    }
                }
                set_times(&p, m.mtime);
            }
        }
    }
}
