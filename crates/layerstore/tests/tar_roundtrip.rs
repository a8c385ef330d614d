//! Tree → tar → tree round trips on a real filesystem (needs root).
//!
//! Proves: every feature a layer carries survives write + apply; re-tarring the applied tree
//! gives the same bytes (determinism); the diffID is the tar's sha256; the tar-split from
//! both the writer and the applier rebuilds the exact tar from the extracted files (what
//! `docker save` does); gzip and zstd inputs are detected.

mod tar_util;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use layerstore::tar::{
    apply_layer, write_layer, ApplyOptions, Compression, WhiteoutFormat, WriteOptions,
};
use proptest::prelude::*;
use tar_util::*;

struct Outcome {
    tar: Vec<u8>,
    split: Vec<u8>,
}

fn tar_of(dir: &Path, whiteouts: WhiteoutFormat) -> Outcome {
    let mut tar = Vec::new();
    let mut split = Vec::new();
    let d = write_layer(dir, &mut tar, Some(&mut split), &WriteOptions { whiteouts }).unwrap();
    assert_eq!(d.size, tar.len() as u64);
    assert_eq!(
        d.diff_id.to_string(),
        sha256(&tar),
        "diffID is sha256 of the tar"
    );
    Outcome { tar, split }
}

/// The full cycle on one tree; returns the tar for further checks.
fn round_trip(src: &Path, work: &Path, whiteouts: WhiteoutFormat) -> Vec<u8> {
    let first = tar_of(src, whiteouts);
    let dst = work.join("applied");
    let mut apply_split = Vec::new();
    let opts = ApplyOptions {
        whiteouts,
        ..Default::default()
    };
    let stats = apply_layer(&first.tar[..], &dst, Some(&mut apply_split), &opts).unwrap();
    assert_eq!(stats.diff_id.to_string(), sha256(&first.tar));
    assert_eq!(stats.size, first.tar.len() as u64);
    assert_eq!(stats.compression, Compression::None);

    assert_same_tree(&snapshot(src).unwrap(), &snapshot(&dst).unwrap());

    let second = tar_of(&dst, whiteouts);
    assert!(
        second.tar == first.tar,
        "re-tar of the applied tree gives identical bytes"
    );
    assert_eq!(
        decode_tar_split(&second.split).unwrap(),
        decode_tar_split(&first.split).unwrap()
    );
    assert!(
        reassemble(&first.split, &dst).unwrap() == first.tar,
        "writer tar-split + files rebuild the tar"
    );
    assert_eq!(
        decode_tar_split(&apply_split).unwrap(),
        decode_tar_split(&first.split).unwrap(),
        "applier records the same tar-split as the writer"
    );
    std::fs::remove_dir_all(&dst).unwrap();
    first.tar
}

#[test]
fn rich_tree_round_trips_overlay() {
    require_root();
    let work = tempdir();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    rich_tree(&src, true, b"n");
    let tar = round_trip(&src, work.path(), WhiteoutFormat::Overlay);

    // The whiteout and opaque marker are in the tar as Docker writes them.
    let names: Vec<Vec<u8>> = tar::Archive::new(&tar[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path_bytes().into_owned())
        .collect();
    assert!(names.contains(&b"etc/.wh.gone".to_vec()), "{names:?}");
    assert!(names.contains(&b"opq/.wh..wh..opq".to_vec()));
    let opq_pos = names.iter().position(|n| n == b"opq/").unwrap();
    assert_eq!(names[opq_pos + 1], b"opq/.wh..wh..opq");
    assert!(!names.contains(&b"etc/gone".to_vec()));
}

#[test]
fn plain_format_keeps_devices_as_devices() {
    require_root();
    let work = tempdir();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    rich_tree(&src, false, b"n");
    let gone = src.join("etc/gone");
    mknod(&gone, rustix::fs::FileType::CharacterDevice, 0, 0);
    set_times(&gone, 1_500_000_000);
    set_times(&src.join("etc"), 1_500_000_000);
    let tar = round_trip(&src, work.path(), WhiteoutFormat::Plain);
    let mut found = false;
    for e in tar::Archive::new(&tar[..]).entries().unwrap() {
        let e = e.unwrap();
        if &*e.path_bytes() == b"etc/gone" {
            assert_eq!(e.header().entry_type(), tar::EntryType::Char);
            found = true;
        }
        assert!(!e.path_bytes().ends_with(b".wh..wh..opq"));
    }
    assert!(found);
}

#[test]
fn same_tree_gives_same_bytes_across_copies() {
    require_root();
    let a = tempdir();
    let b = tempdir();
    rich_tree(a.path(), true, b"same");
    rich_tree(b.path(), true, b"same");
    let ta = tar_of(a.path(), WhiteoutFormat::Overlay);
    let tb = tar_of(b.path(), WhiteoutFormat::Overlay);
    assert!(
        ta.tar == tb.tar,
        "two identical trees (different inodes) give identical tars"
    );
}

#[test]
fn compressed_inputs_are_detected() {
    require_root();
    let work = tempdir();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    rich_tree(&src, true, b"z");
    let plain = tar_of(&src, WhiteoutFormat::Overlay).tar;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&plain).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&plain[..], 3).unwrap();
    for (bytes, want) in [(gz, Compression::Gzip), (zst, Compression::Zstd)] {
        let dst = work.path().join(format!("{want:?}"));
        let st = apply_layer(&bytes[..], &dst, None, &ApplyOptions::default()).unwrap();
        assert_eq!(st.compression, want);
        assert_eq!(
            st.diff_id.to_string(),
            sha256(&plain),
            "diffID of the uncompressed tar"
        );
        assert_same_tree(&snapshot(&src).unwrap(), &snapshot(&dst).unwrap());
    }
}

// ---- random trees ----

#[derive(Debug, Clone)]
enum Leaf {
    File {
        data: Vec<u8>,
        mode: u32,
        xattr: Option<Vec<u8>>,
    },
    Symlink(Vec<u8>),
    Fifo(u32),
    Chardev(u32, u32),
    Whiteout,
    /// Hardlink to the n-th regular file created before it (a file if there is none).
    Hardlink(usize),
}

#[derive(Debug, Clone)]
enum Tree {
    Leaf(Leaf, Meta),
    Dir(BTreeMap<Vec<u8>, Tree>, Meta, bool),
}

#[derive(Debug, Clone)]
struct Meta {
    uid: u32,
    gid: u32,
    mtime: i64,
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

fn tree() -> impl Strategy<Value = Tree> {
    let l = (leaf(), meta()).prop_map(|(l, m)| Tree::Leaf(l, m));
    l.prop_recursive(3, 40, 6, |inner| {
        (
            prop::collection::btree_map(name(), inner, 0..6),
            meta(),
            any::<bool>(),
        )
            .prop_map(|(c, m, opaque)| Tree::Dir(c, m, opaque))
    })
}

fn top() -> impl Strategy<Value = BTreeMap<Vec<u8>, Tree>> {
    prop::collection::btree_map(name(), tree(), 1..8)
}

/// Creates the tree; directories get their mtime after their children.
fn build(dir: &Path, children: &BTreeMap<Vec<u8>, Tree>, files: &mut Vec<std::path::PathBuf>) {
    use rustix::fs::FileType;
    for (n, t) in children {
        let p = path(dir, n);
        match t {
            Tree::Dir(c, m, opaque) => {
                std::fs::create_dir(&p).unwrap();
                build(&p, c, files);
                chown(&p, m.uid, m.gid);
                chmod(&p, 0o755);
                if *opaque {
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
                    }
                    Leaf::Fifo(mode) => {
                        mknod(&p, FileType::Fifo, *mode, 0);
                        chown(&p, m.uid, m.gid);
                        chmod(&p, *mode);
                    }
                    Leaf::Chardev(a, b) => {
                        mknod(
                            &p,
                            FileType::CharacterDevice,
                            0o600,
                            rustix::fs::makedev(*a, *b),
                        );
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

use std::os::unix::ffi::OsStrExt;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_round_trip(t in top()) {
        require_root();
        let work = tempdir();
        let src = work.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let mut files = Vec::new();
        build(&src, &t, &mut files);
        round_trip(&src, work.path(), WhiteoutFormat::Overlay);
    }
}
