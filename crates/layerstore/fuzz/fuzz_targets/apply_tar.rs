//! Applies arbitrary bytes as a layer tar into a sandbox and checks that nothing outside the
//! destination was created, changed or removed. Errors are expected; panics, hangs and
//! escapes are bugs.
#![no_main]

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use layerstore::tar::{apply_layer, ApplyOptions, WhiteoutFormat};
use libfuzzer_sys::fuzz_target;

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Owner, mode and times of a path, not following symlinks.
fn meta(p: &Path) -> (u32, u32, u32, i64, i64, u64) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid(), m.mode(), m.mtime(), m.ctime(), m.nlink())
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the whiteout format; the rest is the stream.
    let (mode, tar) = match data.split_first() {
        Some((m, rest)) => (*m, rest),
        None => (0, data),
    };
    let sandbox = tempfile::Builder::new()
        .prefix("berth-fuzz-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let outside = sandbox.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("sentinel"), b"sentinel").unwrap();
    let before = (meta(&outside), meta(&outside.join("sentinel")));
    let dest = sandbox.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    // A symlink out of the destination, as a lower layer might hold.
    std::os::unix::fs::symlink(&outside, dest.join("escape")).unwrap();

    let opts = ApplyOptions {
        whiteouts: if mode & 1 == 0 {
            WhiteoutFormat::Overlay
        } else {
            WhiteoutFormat::Plain
        },
        max_entries: 2000,
        max_depth: 64,
        max_size: 64 << 20,
        remove_on_error: mode & 2 != 0,
        skip_digest: false,
    };
    // Record tar-split too, so that path of the reader is exercised.
    let mut split = Vec::new();
    let _ = apply_layer(tar, &dest, Some(&mut split), &opts);

    let top = listing(sandbox.path());
    assert!(
        top == ["dest", "outside"] || top == ["outside"],
        "sandbox top level changed: {top:?}"
    );
    assert_eq!(listing(&outside), ["sentinel"], "outside dir changed");
    assert_eq!(
        std::fs::read(outside.join("sentinel")).unwrap(),
        b"sentinel"
    );
    let after = (meta(&outside), meta(&outside.join("sentinel")));
    assert_eq!(before, after, "outside dir or sentinel metadata changed");
});
