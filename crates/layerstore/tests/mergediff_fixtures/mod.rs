//! Upstream BuildKit's merge/diff test fixtures (`client/mergediff_test.go`: the `fstest` appliers
//! and the `*Contents` trees of `diffOpTestCases`), shared by the layer-store port
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
