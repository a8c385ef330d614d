//! Tree → tar → tree round trips on a real filesystem (needs root).
//!
//! Proves: every feature a layer carries survives write + apply; re-tarring the applied tree
//! gives the same bytes (determinism); the diffID is the tar's sha256; the tar-split from
//! both the writer and the applier rebuilds the exact tar from the extracted files (what
//! `docker save` does); gzip and zstd inputs are detected.

mod tar_util;

use std::io::Write;
use std::path::Path;

use layerstore::tar::{
    apply_layer, write_layer, ApplyOptions, Compression, WhiteoutFormat, WriteOptions,
};
use proptest::prelude::*;
use tar_util::gen::{build, top};
use tar_util::*;

struct Outcome {
    tar: Vec<u8>,
    split: Vec<u8>,
}

fn tar_of(dir: &Path, whiteouts: WhiteoutFormat) -> Outcome {
    let mut tar = Vec::new();
    let mut split = Vec::new();
    let d = write_layer(
        dir,
        &mut tar,
        Some(&mut split),
        &WriteOptions {
            whiteouts,
            ..Default::default()
        },
    )
    .unwrap();
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

/// `skip_digest` (exports copying a layer whose diffID is known) changes nothing but the
/// digest: the writer gives the same bytes, the applier the same tree, both report the size,
/// and the digest they report is all zeros.
#[test]
fn skip_digest_writes_and_applies_the_same() {
    require_root();
    let work = tempdir();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    rich_tree(&src, true, b"s");
    let hashed = tar_of(&src, WhiteoutFormat::Overlay);
    let mut tar = Vec::new();
    let d = write_layer(
        &src,
        &mut tar,
        None,
        &WriteOptions {
            whiteouts: WhiteoutFormat::Overlay,
            skip_digest: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(tar == hashed.tar, "same bytes without the digest");
    assert_eq!(d.size, tar.len() as u64);
    let zeros = format!("sha256:{}", "0".repeat(64));
    assert_eq!(d.diff_id.to_string(), zeros);

    let dst = work.path().join("applied");
    let opts = ApplyOptions {
        skip_digest: true,
        ..Default::default()
    };
    let stats = apply_layer(&tar[..], &dst, None, &opts).unwrap();
    assert_eq!(stats.size, tar.len() as u64);
    assert_eq!(stats.diff_id.to_string(), zeros);
    assert_same_tree(&snapshot(&src).unwrap(), &snapshot(&dst).unwrap());
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_round_trip(t in top()) {
        require_root();
        let work = tempdir();
        let src = work.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let mut files = Vec::new();
        build(&src, &t, &mut files, true);
        round_trip(&src, work.path(), WhiteoutFormat::Overlay);
    }
}
