//! Upstream BuildKit's merge/diff test fixtures (`client/mergediff_test.go`: the `fstest` appliers,
//! the `runShell` scripts and the `*Contents` trees of `diffOpTestCases`), shared by the layer-store port
//! (`crates/layerstore/tests/snapshot_mergediff.rs`) and the LLB-level port through the worker
//! (`integration/tests/worker_mergediff.rs`, which includes this file by path).

/// One piece of an expected tree (upstream's fstest appliers).
#[derive(Clone)]
pub enum E {
    /// `fstest.CreateDir`
    Dir(&'static str, u32),
    /// `fstest.CreateFile`
    File(&'static str, &'static str, u32),
    /// `fstest.Link(old, new)`: a hardlink `new` of the earlier file `old`.
    Link(&'static str, &'static str),
    /// `mkfifo`
    Fifo(&'static str, u32),
    /// `mkchardev`
    Chardev(&'static str, u32, u32, u32),
    /// `fstest.Remove` / `fstest.RemoveAll`
    RemoveAll(&'static str),
}

pub use E::*;

pub fn base_diff_contents() -> Vec<E> {
    vec![Dir("/unmodifiedDir", 0o755), Dir("/modifyDir", 0o700)]
}

pub fn new_file_contents() -> Vec<E> {
    vec![
        Dir("/newdir1", 0o755),
        File("/newdir1/newfile1", "", 0o644),
        File("/unmodifiedDir/newfile2", "", 0o644),
        File("/modifyDir/newfile3", "", 0o644),
    ]
}

pub fn modify_file_contents() -> Vec<E> {
    vec![
        File("/unmodifiedDir/chmodFile1", "chmodFile1", 0o444),
        File(
            "/unmodifiedDir/modifyContentFile1",
            "modifyContentFile0",
            0o644,
        ),
        File("/modifyDir/chmodFile2", "chmodFile2", 0o440),
        File("/modifyDir/modifyContentFile2", "modifyContentFile0", 0o644),
    ]
}

pub fn new_dir_contents() -> Vec<E> {
    vec![
        Dir("/newdir2", 0o755),
        Dir("/newdir2/newsubdir1", 0o755),
        Dir("/unmodifiedDir/newsubdir2", 0o755),
        Dir("/modifyDir/newsubdir3", 0o755),
    ]
}

pub fn modify_dir_contents() -> Vec<E> {
    vec![
        Dir("/unmodifiedDir/chmodSubdir1", 0o700),
        Dir("/modifyDir/chmodSubdir2", 0o770),
    ]
}

pub fn override_dir_contents() -> Vec<E> {
    vec![
        File("/unmodifiedDir/overrideSubdir1", "overrideSubdir1", 0o644),
        File("/modifyDir/overrideSubdir2", "overrideSubdir2", 0o644),
    ]
}

pub fn override_file_contents() -> Vec<E> {
    vec![
        Dir("/unmodifiedDir/overrideFile1", 0o700),
        Dir("/unmodifiedDir/overrideFile2", 0o750),
        Dir("/unmodifiedDir/overrideFile2/newsubdir4", 0o770),
        File("/unmodifiedDir/overrideFile2/newfile4", "", 0o644),
        File(
            "/unmodifiedDir/overrideFile2/newsubdir4/newfile5",
            "",
            0o644,
        ),
        Dir("/modifyDir/overrideFile3", 0o700),
        Dir("/modifyDir/overrideFile4", 0o750),
        Dir("/modifyDir/overrideFile4/newsubdir5", 0o770),
        File("/modifyDir/overrideFile4/newfile6", "", 0o644),
        File("/modifyDir/overrideFile4/newsubdir5/newfile7", "", 0o644),
    ]
}

pub fn opaque_dir_contents() -> Vec<E> {
    vec![
        Dir("/unmodifiedDir/opaqueDir1", 0o755),
        Dir("/unmodifiedDir/opaqueDir1/newOpaqueSubdir1", 0o755),
        File("/unmodifiedDir/opaqueDir1/newOpaqueFile1", "", 0o644),
        File(
            "/unmodifiedDir/opaqueDir1/newOpaqueSubdir1/newOpaqueFile2",
            "",
            0o644,
        ),
        Dir("/modifyDir/opaqueDir2", 0o755),
        Dir("/modifyDir/opaqueDir2/newOpaqueSubdir2", 0o755),
        File("/modifyDir/opaqueDir2/newOpaqueFile3", "", 0o644),
        File(
            "/modifyDir/opaqueDir2/newOpaqueSubdir2/newOpaqueFile4",
            "",
            0o644,
        ),
    ]
}

pub fn fifo_contents() -> Vec<E> {
    vec![
        Fifo("/unmodifiedDir/fifo1", 0o644),
        Fifo("/modifyDir/fifo2", 0o644),
    ]
}

pub fn all_contents() -> Vec<E> {
    [
        base_diff_contents(),
        new_file_contents(),
        modify_file_contents(),
        new_dir_contents(),
        modify_dir_contents(),
        override_dir_contents(),
        override_file_contents(),
        opaque_dir_contents(),
        fifo_contents(),
    ]
    .concat()
}

/// Upstream's `runShell` scripts of `diffOpTestCases` (one layer each).
pub const BASE_DIFF: &[&str] = &["chmod 0700 /modifyDir"];

pub const NEW_FILES: &[&str] = &[
    "mkdir /newdir1",
    "touch /newdir1/newfile1",
    "touch /unmodifiedDir/newfile2",
    "touch /modifyDir/newfile3",
];

pub const MODIFY_FILES: &[&str] = &[
    "chmod 0444 /unmodifiedDir/chmodFile1",
    "echo -n modifyContentFile0 > /unmodifiedDir/modifyContentFile1",
    "chmod 0440 /modifyDir/chmodFile2",
    "echo -n modifyContentFile0 > /modifyDir/modifyContentFile2",
];

pub const NEW_DIRS: &[&str] = &[
    "mkdir -p /newdir2/newsubdir1",
    "mkdir /unmodifiedDir/newsubdir2",
    "mkdir /modifyDir/newsubdir3",
];

pub const MODIFY_DIRS: &[&str] = &[
    "chmod 0700 /unmodifiedDir/chmodSubdir1",
    "chmod 0770 /modifyDir/chmodSubdir2",
];

pub const OVERRIDE_DIRS: &[&str] = &[
    "rm -rf /unmodifiedDir/overrideSubdir1",
    "echo -n overrideSubdir1 > /unmodifiedDir/overrideSubdir1",
    "rm -rf /modifyDir/overrideSubdir2",
    "echo -n overrideSubdir2 > /modifyDir/overrideSubdir2",
];

pub const OVERRIDE_FILES: &[&str] = &[
    "rm /unmodifiedDir/overrideFile1",
    "mkdir -m 0700 /unmodifiedDir/overrideFile1",
    "rm /unmodifiedDir/overrideFile2",
    "mkdir -m 0750 /unmodifiedDir/overrideFile2",
    "mkdir -m 0770 /unmodifiedDir/overrideFile2/newsubdir4",
    "touch /unmodifiedDir/overrideFile2/newfile4",
    "touch /unmodifiedDir/overrideFile2/newsubdir4/newfile5",
    "rm /modifyDir/overrideFile3",
    "mkdir -m 0700 /modifyDir/overrideFile3",
    "rm /modifyDir/overrideFile4",
    "mkdir -m 0750 /modifyDir/overrideFile4",
    "mkdir -m 0770 /modifyDir/overrideFile4/newsubdir5",
    "touch /modifyDir/overrideFile4/newfile6",
    "touch /modifyDir/overrideFile4/newsubdir5/newfile7",
];

pub const DELETE_FILES: &[&str] = &["rm /unmodifiedDir/deleteFile1", "rm /modifyDir/deleteFile2"];

pub const DELETE_DIRS: &[&str] = &[
    "rm -rf /unmodifiedDir/deleteSubdir1",
    "rm -rf /modifyDir/deleteSubdir2",
];

pub const OPAQUE_DIRS: &[&str] = &[
    "rm -rf /unmodifiedDir/opaqueDir1",
    "mkdir -p /unmodifiedDir/opaqueDir1/newOpaqueSubdir1",
    "touch /unmodifiedDir/opaqueDir1/newOpaqueFile1",
    "touch /unmodifiedDir/opaqueDir1/newOpaqueSubdir1/newOpaqueFile2",
    "rm -rf /modifyDir/opaqueDir2",
    "mkdir -p /modifyDir/opaqueDir2/newOpaqueSubdir2",
    "touch /modifyDir/opaqueDir2/newOpaqueFile3",
    "touch /modifyDir/opaqueDir2/newOpaqueSubdir2/newOpaqueFile4",
];

pub const SHUFFLE_FILES: &[&str] = &[
    "mv /shuffleFile1 /shuffleFile1tmp",
    "mv /shuffleFile1tmp /shuffleFile1",
    "mv /unmodifiedDir/shuffleFile2 /unmodifiedDir/shuffleFile2tmp",
    "mv /unmodifiedDir/shuffleFile2tmp /unmodifiedDir/shuffleFile2",
    "mv /modifyDir/shuffleFile3 /modifyDir/shuffleFile3tmp",
    "mv /modifyDir/shuffleFile3tmp /modifyDir/shuffleFile3",
];

pub const FIFOS: &[&str] = &["mknod /unmodifiedDir/fifo1 p", "mknod /modifyDir/fifo2 p"];

pub const CHARDEVS: &[&str] = &[
    "mknod /unmodifiedDir/null1 c 1 3",
    "mknod /modifyDir/null2 c 1 3",
];

/// Upstream's `allCmds` (every slice but the chardevs, in order).
pub const ALL_CMDS: &[&[&str]] = &[
    BASE_DIFF,
    NEW_FILES,
    MODIFY_FILES,
    NEW_DIRS,
    MODIFY_DIRS,
    OVERRIDE_DIRS,
    OVERRIDE_FILES,
    DELETE_FILES,
    DELETE_DIRS,
    OPAQUE_DIRS,
    SHUFFLE_FILES,
    FIFOS,
];
