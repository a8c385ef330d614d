//! Cross-checks against GNU tar (needs root and `tar` on PATH).
//!
//! Proves the format is valid for an independent implementation in both directions:
//! GNU tar lists and extracts our layers to the same tree, and our applier reads GNU tar's
//! own archives (GNU long names, POSIX/PAX with xattrs) to the same tree, recording a
//! tar-split that rebuilds them byte for byte.

mod tar_util;

use std::path::Path;
use std::process::Command;

use layerstore::tar::{apply_layer, write_layer, ApplyOptions, WhiteoutFormat, WriteOptions};
use tar_util::*;

fn gnu_tar(args: &[&str]) -> std::process::Output {
    let out = Command::new("tar")
        .args(args)
        .output()
        .expect("GNU tar must be installed for this test (apt-get install tar)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "tar {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn plain_tree(root: &Path) {
    rich_tree(root, false, b"gnu");
}

#[test]
fn gnu_tar_lists_and_extracts_our_layer() {
    require_root();
    let work = tempdir();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    plain_tree(&src);
    let tar_path = work.path().join("layer.tar");
    let f = std::fs::File::create(&tar_path).unwrap();
    let d = write_layer(
        &src,
        f,
        None,
        &WriteOptions {
            whiteouts: WhiteoutFormat::Plain,
            ..Default::default()
        },
    )
    .unwrap();

    let list = gnu_tar(&["-tvf", tar_path.to_str().unwrap()]);
    let lines = String::from_utf8_lossy(&list.stdout).lines().count() as u64;
    assert_eq!(lines, d.entries, "GNU tar sees every member");

    let out = work.path().join("gnu-extracted");
    std::fs::create_dir(&out).unwrap();
    gnu_tar(&[
        "--xattrs",
        "--xattrs-include=*",
        "--numeric-owner",
        "-xpf",
        tar_path.to_str().unwrap(),
        "-C",
        out.to_str().unwrap(),
    ]);
    assert_same_tree(&snapshot(&src).unwrap(), &snapshot(&out).unwrap());
}

#[test]
fn we_apply_gnu_tar_archives() {
    require_root();
    let work = tempdir();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    plain_tree(&src);
    for (fmt, extra) in [
        ("gnu", &[][..]),
        ("posix", &["--xattrs", "--xattrs-include=*"][..]),
    ] {
        let tar_path = work.path().join(format!("{fmt}.tar"));
        let mut args = vec!["--format", fmt, "--numeric-owner"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[
            "-cf",
            tar_path.to_str().unwrap(),
            "-C",
            src.to_str().unwrap(),
            ".",
        ]);
        gnu_tar(&args);
        let dst = work.path().join(format!("applied-{fmt}"));
        let bytes = std::fs::read(&tar_path).unwrap();
        let mut split = Vec::new();
        let st = apply_layer(
            &bytes[..],
            &dst,
            Some(&mut split),
            &ApplyOptions {
                whiteouts: WhiteoutFormat::Plain,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("apply GNU tar {fmt} archive: {e}"));
        assert_eq!(st.diff_id.to_string(), sha256(&bytes));
        // The applier's tar-split rebuilds GNU tar's exact bytes (record padding included).
        assert!(
            reassemble(&split, &dst).unwrap() == bytes,
            "tar-split of a GNU {fmt} archive reassembles it"
        );
        let mut want = snapshot(&src).unwrap();
        let got = snapshot(&dst).unwrap();
        if fmt == "gnu" {
            // The GNU format carries no xattrs.
            for n in want.values_mut() {
                n.xattrs.clear();
            }
            let mut got = got;
            for n in got.values_mut() {
                n.xattrs.clear();
            }
            assert_same_tree(&want, &got);
        } else {
            assert_same_tree(&want, &got);
        }
    }
}
