//! Hostile and broken tars (needs root). Each case checks that the error names the entry,
//! that nothing was written outside the destination, and that the partial destination is
//! gone when `remove_on_error` is set.

mod tar_util;

use std::io::Write;
use std::path::Path;

use layerstore::tar::{apply_layer, write_layer, ApplyOptions, WhiteoutFormat, WriteOptions};
use layerstore::Error;
use tar_util::*;

/// A sandbox: `outside/` holds a sentinel that must stay untouched, `dest/` is applied to.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        require_root();
        let dir = tempdir();
        std::fs::create_dir(dir.path().join("outside")).unwrap();
        std::fs::write(dir.path().join("outside/secret"), b"secret").unwrap();
        Sandbox { dir }
    }
    fn dest(&self) -> std::path::PathBuf {
        self.dir.path().join("dest")
    }
    /// Asserts the sandbox holds exactly `outside/secret` (unchanged) and nothing else,
    /// i.e. the failed apply left nothing behind anywhere.
    fn assert_clean(&self) {
        let mut names: Vec<String> = walkdir::WalkDir::new(self.dir.path())
            .min_depth(1)
            .into_iter()
            .map(|e| {
                e.unwrap()
                    .path()
                    .strip_prefix(self.dir.path())
                    .unwrap()
                    .display()
                    .to_string()
            })
            .collect();
        names.sort();
        assert_eq!(names, ["outside", "outside/secret"]);
        assert_eq!(
            std::fs::read(self.dir.path().join("outside/secret")).unwrap(),
            b"secret"
        );
    }
    fn apply(&self, tar: &[u8], opts: &ApplyOptions) -> Error {
        apply_layer(tar, &self.dest(), None, opts).expect_err("apply must fail")
    }
}

fn strict() -> ApplyOptions {
    ApplyOptions {
        remove_on_error: true,
        ..Default::default()
    }
}

fn assert_names(err: &Error, entry: &str) {
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("{entry:?}")),
        "error {msg:?} should name entry {entry:?}"
    );
}

#[test]
fn dotdot_escape_is_rejected() {
    let sb = Sandbox::new();
    for name in ["../outside/evil", "a/../../outside/evil", "ok/.."] {
        let tar = raw_tar(&[
            raw_member(b"ok/", b'5', b"", b""),
            raw_member(name.as_bytes(), b'0', b"", b"pwned"),
        ]);
        let err = sb.apply(&tar, &strict());
        assert!(matches!(err, Error::TarEntryRejected { .. }), "{err}");
        assert_names(&err, name);
        sb.assert_clean();
    }
}

#[test]
fn absolute_path_is_rejected() {
    let sb = Sandbox::new();
    let abs = format!("{}/outside/evil", sb.dir.path().display());
    let tar = raw_tar(&[raw_member(abs.as_bytes(), b'0', b"", b"pwned")]);
    let err = sb.apply(&tar, &strict());
    assert!(err.to_string().contains("absolute"), "{err}");
    assert_names(&err, &abs);
    sb.assert_clean();
}

#[test]
fn write_through_symlinked_parent_is_rejected() {
    let sb = Sandbox::new();
    let outside = sb.dir.path().join("outside");
    for (link, target) in [
        ("up", "../outside".to_string()),
        ("abs", outside.display().to_string()),
        ("dots", "a/../../outside".to_string()),
    ] {
        let evil = format!("{link}/evil");
        let tar = raw_tar(&[
            raw_member(link.as_bytes(), b'2', target.as_bytes(), b""),
            raw_member(evil.as_bytes(), b'0', b"", b"pwned"),
        ]);
        let err = sb.apply(&tar, &strict());
        let msg = err.to_string();
        assert!(
            msg.contains("outside the root") || msg.contains("dangling symlink"),
            "{msg}"
        );
        assert_names(&err, &evil);
        sb.assert_clean();
    }
}

#[test]
fn symlink_already_in_dest_is_not_followed() {
    // Applying onto an existing tree (plain format) that contains an escaping symlink.
    let sb = Sandbox::new();
    std::fs::create_dir(sb.dest()).unwrap();
    std::os::unix::fs::symlink(sb.dir.path().join("outside"), sb.dest().join("lnk")).unwrap();
    let tar = raw_tar(&[raw_member(b"lnk/secret", b'0', b"", b"overwritten")]);
    let opts = ApplyOptions {
        whiteouts: WhiteoutFormat::Plain,
        remove_on_error: true,
        ..Default::default()
    };
    let err = sb.apply(&tar, &opts);
    assert_names(&err, "lnk/secret");
    sb.assert_clean();
}

#[test]
fn hardlink_to_outside_is_rejected() {
    let sb = Sandbox::new();
    let abs = sb.dir.path().join("outside/secret").display().to_string();
    for target in ["../outside/secret", abs.as_str()] {
        let tar = raw_tar(&[raw_member(b"h", b'1', target.as_bytes(), b"")]);
        let err = sb.apply(&tar, &strict());
        assert!(err.to_string().contains("hardlink target"), "{err}");
        assert_names(&err, "h");
        sb.assert_clean();
    }
    // Through a symlinked directory inside the tar.
    let tar = raw_tar(&[
        raw_member(b"up", b'2', b"../outside", b""),
        raw_member(b"h", b'1', b"up/secret", b""),
    ]);
    let err = sb.apply(&tar, &strict());
    assert!(err.to_string().contains("outside the root"), "{err}");
    assert_names(&err, "h");
    sb.assert_clean();
    // A hardlink to a symlink that points outside links the symlink itself, not the target.
    let tar = raw_tar(&[
        raw_member(b"s", b'2', b"../outside/secret", b""),
        raw_member(b"h", b'1', b"s", b""),
    ]);
    apply_layer(&tar[..], &sb.dest(), None, &strict()).unwrap();
    let md = std::fs::symlink_metadata(sb.dest().join("h")).unwrap();
    assert!(md.file_type().is_symlink());
    std::fs::remove_dir_all(sb.dest()).unwrap();
    sb.assert_clean();
}

#[test]
fn escaping_whiteouts_are_rejected() {
    let sb = Sandbox::new();
    for (name, want) in [
        ("a/.wh...", "whiteout"),
        (".wh...", "whiteout"),
        ("../.wh.outside", "'..'"),
        ("a/.wh..", "whiteout"),
    ] {
        let tar = raw_tar(&[
            raw_member(b"a/", b'5', b"", b""),
            raw_member(name.as_bytes(), b'0', b"", b""),
        ]);
        for mode in [WhiteoutFormat::Overlay, WhiteoutFormat::Plain] {
            let opts = ApplyOptions {
                whiteouts: mode,
                remove_on_error: true,
                ..Default::default()
            };
            let err = sb.apply(&tar, &opts);
            assert!(err.to_string().contains(want), "{name}: {err}");
            assert_names(&err, name);
            sb.assert_clean();
        }
    }
    // A whiteout under a symlink to outside must not delete the sentinel (plain format).
    let tar = raw_tar(&[
        raw_member(b"up", b'2', b"../outside", b""),
        raw_member(b"up/.wh.secret", b'0', b"", b""),
    ]);
    let opts = ApplyOptions {
        whiteouts: WhiteoutFormat::Plain,
        remove_on_error: true,
        ..Default::default()
    };
    let err = sb.apply(&tar, &opts);
    assert_names(&err, "up/.wh.secret");
    sb.assert_clean();
}

fn good_tar() -> Vec<u8> {
    let work = tempdir();
    std::fs::create_dir(work.path().join("d")).unwrap();
    std::fs::write(work.path().join("d/big"), vec![7u8; 100_000]).unwrap();
    std::fs::write(work.path().join("d/small"), b"small").unwrap();
    let mut out = Vec::new();
    write_layer(work.path(), &mut out, None, &WriteOptions::default()).unwrap();
    out
}

#[test]
fn truncated_tar_names_the_entry() {
    let sb = Sandbox::new();
    let tar = good_tar();
    // Inside the content of d/big (headers: d/ at 0, d/big at 512, content from 1024).
    let err = sb.apply(&tar[..1024 + 50_000], &strict());
    assert!(matches!(err, Error::CorruptTar { .. }), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
    assert_names(&err, "d/big");
    sb.assert_clean();
    // Inside a header block.
    let err = sb.apply(&tar[..700], &strict());
    assert!(err.to_string().contains("partial header"), "{err}");
    sb.assert_clean();
    // No end-of-archive marker: the last complete entry is named.
    let end = tar.len() - 1024;
    let err = sb.apply(&tar[..end], &strict());
    assert!(err.to_string().contains("no end-of-archive"), "{err}");
    assert_names(&err, "d/small");
    sb.assert_clean();
    // Truncated gzip stream.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let err = sb.apply(&gz[..gz.len() / 2], &strict());
    assert!(
        matches!(err, Error::CorruptTar { .. } | Error::TarRead { .. }),
        "{err}"
    );
    sb.assert_clean();
}

#[test]
fn corrupt_header_is_reported() {
    let sb = Sandbox::new();
    let mut tar = good_tar();
    tar[512 + 10] ^= 0x55; // inside d/big's name: checksum no longer matches
    let err = sb.apply(&tar, &strict());
    assert!(err.to_string().contains("checksum"), "{err}");
    assert_names(&err, "d/"); // the last good entry
    sb.assert_clean();
    // Garbage that is not a tar at all.
    let err = sb.apply(&[0x42u8; 4096], &strict());
    assert!(matches!(err, Error::CorruptTar { .. }), "{err}");
    sb.assert_clean();
    // A PAX header claiming a huge size must not be buffered.
    let mut pax = raw_member(b"PaxHeaders.0/x", b'x', b"", b"");
    let mut h = tar::Header::from_byte_slice(&pax[..512]).clone();
    h.set_size(1 << 40);
    h.set_cksum();
    pax[..512].copy_from_slice(h.as_bytes());
    let err = sb.apply(&raw_tar(&[pax]), &strict());
    assert!(err.to_string().contains("extension header"), "{err}");
    sb.assert_clean();
}

#[test]
fn tar_bomb_hits_entry_limit() {
    let sb = Sandbox::new();
    let members: Vec<Vec<u8>> = (0..2000)
        .map(|i| raw_member(format!("f{i}").as_bytes(), b'0', b"", b"x"))
        .collect();
    let tar = raw_tar(&members);
    let opts = ApplyOptions {
        max_entries: 1000,
        remove_on_error: true,
        ..Default::default()
    };
    let err = sb.apply(&tar, &opts);
    assert!(matches!(err, Error::TarLimit { .. }), "{err}");
    assert!(err.to_string().contains("max_entries"), "{err}");
    assert_names(&err, "f1000");
    sb.assert_clean();
    // Under the limit it applies.
    let ok = apply_layer(
        &tar[..],
        &sb.dest(),
        None,
        &ApplyOptions {
            max_entries: 2000,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ok.entries, 2000);
    std::fs::remove_dir_all(sb.dest()).unwrap();
}

#[test]
fn deep_path_hits_depth_limit() {
    let sb = Sandbox::new();
    let deep = vec!["d"; 40].join("/");
    let tar = raw_tar(&[raw_member(deep.as_bytes(), b'0', b"", b"x")]);
    let opts = ApplyOptions {
        max_depth: 32,
        remove_on_error: true,
        ..Default::default()
    };
    let err = sb.apply(&tar, &opts);
    assert!(err.to_string().contains("max_depth"), "{err}");
    assert_names(&err, &deep);
    sb.assert_clean();
}

#[test]
fn without_remove_on_error_the_partial_tree_stays() {
    let sb = Sandbox::new();
    let tar = raw_tar(&[
        raw_member(b"first", b'0', b"", b"1"),
        raw_member(b"../evil", b'0', b"", b"x"),
    ]);
    let err = apply_layer(&tar[..], &sb.dest(), None, &ApplyOptions::default()).unwrap_err();
    assert_names(&err, "../evil");
    assert_eq!(std::fs::read(sb.dest().join("first")).unwrap(), b"1");
    std::fs::remove_dir_all(sb.dest()).unwrap();
    sb.assert_clean();
}

#[test]
fn unsupported_entry_type_is_rejected() {
    let sb = Sandbox::new();
    let tar = raw_tar(&[raw_member(b"sparse", b'S', b"", b"")]);
    let err = sb.apply(&tar, &strict());
    assert!(err.to_string().contains("unsupported entry type"), "{err}");
    assert_names(&err, "sparse");
    sb.assert_clean();
}

#[allow(dead_code)]
fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

#[test]
fn writer_refuses_upperdirs_that_depend_on_lower_layers() {
    require_root();
    for (rel, xattr) in [
        ("moved", "trusted.overlay.redirect"),
        ("meta", "trusted.overlay.metacopy"),
    ] {
        let work = tempdir();
        let p = work.path().join(rel);
        if rel == "moved" {
            std::fs::create_dir(&p).unwrap();
        } else {
            std::fs::write(&p, b"").unwrap();
        }
        setxattr(&p, xattr, b"/somewhere");
        let err = write_layer(work.path(), std::io::sink(), None, &WriteOptions::default())
            .expect_err("must refuse");
        let msg = err.to_string();
        assert!(matches!(err, Error::OverlayFeature { .. }), "{msg}");
        assert!(msg.contains(rel) && msg.contains(xattr), "{msg}");
    }
}

#[test]
fn endless_extension_headers_are_bounded() {
    let sb = Sandbox::new();
    let g = raw_member(b"pax_global_header", b'g', b"", &vec![b'a'; 900_000]);
    let members: Vec<Vec<u8>> = std::iter::repeat_n(g, 8).collect();
    let err = sb.apply(&raw_tar(&members), &strict());
    assert!(err.to_string().contains("extension headers"), "{err}");
    sb.assert_clean();
}

#[test]
fn decompression_bomb_hits_size_limit() {
    let sb = Sandbox::new();
    let big = raw_member(b"zeros", b'0', b"", &vec![0u8; 64 << 20]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&raw_tar(&[big])).unwrap();
    let gz = gz.finish().unwrap();
    assert!(gz.len() < 1 << 20, "the bomb is small compressed");
    let opts = ApplyOptions {
        max_size: 8 << 20,
        remove_on_error: true,
        ..Default::default()
    };
    let err = sb.apply(&gz, &opts);
    assert!(err.to_string().contains("max_size"), "{err}");
    assert_names(&err, "zeros");
    sb.assert_clean();
}
