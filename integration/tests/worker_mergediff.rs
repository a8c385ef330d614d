//! Upstream's merge/diff cases at the LLB level, through berth's worker with real runc and
//! overlayfs on base images used in place from the system Docker Engine. Needs root, runc and
//! busybox-static.
//!
//! Port of moby/buildkit `client/mergediff_test.go` (`diffOpTestCases`) and the `testMergeOp` part
//! of `client/client_mergeop_test.go`. The same cases run at the snapshot-store level in
//! `crates/layerstore/tests/snapshot_mergediff.rs` (its coverage table lists every upstream case
//! and what it checks); here each case is the LLB graph upstream builds (`llb::scratch().file(..)`,
//! `run(sh -c ..)`, `llb::merge`, `llb::diff`), solved by the worker.
//!
//! Every case is checked three ways:
//! 1. the solved result, mounted read-only, has exactly the expected tree (type, permission bits,
//!    owner when not root, file content, symlink target, hardlink groups; no mtimes, as upstream's
//!    fstest comparison of a local export);
//! 2. what a process sees: one exec per group on the busybox image with every case's result
//!    mounted read-only at `/m/<n>` lists them with `find`/`stat`/`sha256sum` (the worker
//!    materialises merges and diffs for the exec); a few rootfs results are also used as the
//!    root of an exec that lists `/`;
//! 3. laziness (berth-specific): a merge solved on its own adds no layer and its chain is its
//!    inputs' chains concatenated; a diff whose lower is a prefix of its upper (an ancestor)
//!    is exactly the layers between, except that a layer with quiet dirs (dirs an exec only
//!    touched, kept for the exec's own view) is replaced by a hardlinked copy without them that
//!    has the very same tar; any other diff is one new layer.
//!
//! Base images (no registry): upstream's `alpine` is the 3-layer `multi_layer_image` (busybox
//! rootfs, a layer adding `/data`, a layer with a whiteout and an opaque dir); upstream's
//! `busybox()` (busybox plus two FileOps adding `/proc` and `/sys`, which our image already
//! has) is the busybox image plus two FileOps adding `/bb/marker`. Both images share their first
//! layer, so `Diff(busybox image, alpine)` is an ancestor diff; the extra berth case
//! "LazyBlobMerge on the image prefix" checks that it reuses Docker's layers.
//!
//! Ported: all 56 `verifyContents` cases of `diffOpTestCases` (TestDiffOpaqueDirs twice), both
//! `verifyBlobReuse` cases (as layer reuse: the diff's chain is the upper's own top layer, no new
//! layer written) and testMergeOp mergeA-mergeD; plus 3 berth cases (marked "(berth)"). Execs
//! on merges and diffs as upstream has them: runShell on a merge (TestDiffDeleteFilesAfterMerge,
//! mergeD), diffs mounted into an exec (TestDiffHardlinkChangesDoNotPropagateBetweenSnapshots),
//! exec mounts diffed (TestDiffExecRoot/Mount), besides the listing execs above.
//!
//! Not ported: testMissingMaterializedLowerSnapshot (containerd snapshotter specific),
//! testMergeOpCache* (remote cache export/import). Deviation: the blob-reuse cases write fixed
//! content instead of `/dev/urandom` output (upstream uses random bytes to defeat its cache
//! across runs; every test here starts from an empty worker).

mod worker_ops_support;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use integration::{busybox_image, multi_layer_image, DockerEngine, TestImage};
use llb::{Mount, RunOpts, State};
use worker::{LayerRef, SolvedRef};
use worker_ops_support::TestWorker;

/// path (absolute) → description.
type Tree = BTreeMap<String, String>;

// ----- LLB helpers (upstream's File(Mkfile/Mkdir/Rm) and runShell) -----

fn mkfile(s: &State, path: &str, mode: u32, data: &str) -> State {
    s.file(llb::mkfile(path, mode, data, Default::default()))
}

fn mkdir(s: &State, path: &str, mode: u32) -> State {
    s.file(llb::mkdir(path, mode, Default::default()))
}

fn rm(s: &State, path: &str) -> State {
    s.file(llb::rm(path, Default::default()))
}

fn scratch() -> State {
    llb::scratch()
}

/// `runShellExecState(base, cmds...)`.
fn sh_exec(base: &State, cmds: &[&str], mounts: Vec<Mount>) -> llb::ExecState {
    let mut opts = RunOpts::shell(cmds.join(" && "));
    for m in mounts {
        opts = opts.mount(m);
    }
    base.run(opts)
}

/// `runShell(base, cmds...)`.
fn sh(base: &State, cmds: &[&str]) -> State {
    sh_exec(base, cmds, vec![]).root()
}

/// `chainRunShells(base, cmdss...)`.
fn sh_chain(base: &State, cmdss: &[&[&str]]) -> State {
    let mut s = base.clone();
    for cmds in cmdss {
        s = sh(&s, cmds);
    }
    s
}

// ----- Cases -----

/// What produced a case's state, for the laziness checks.
enum Shape {
    Merge(Vec<State>),
    /// `(lower, upper)`
    Diff(Box<(State, State)>),
    Other,
}

/// `llb.Merge(inputs)`.
fn m(inputs: &[State]) -> (State, Shape) {
    (llb::merge(inputs), Shape::Merge(inputs.to_vec()))
}

/// `llb.Diff(lower, upper)`.
fn d(lower: &State, upper: &State) -> (State, Shape) {
    (
        llb::diff(lower, upper),
        Shape::Diff(Box::new((lower.clone(), upper.clone()))),
    )
}

/// A state built another way.
fn o(s: State) -> (State, Shape) {
    (s, Shape::Other)
}

#[path = "../../crates/layerstore/tests/mergediff_fixtures/mod.rs"]
mod mergediff_fixtures;
use mergediff_fixtures::*;

/// Upstream's `contents`: `empty`, `contentsOf(state)`, `apply(...)`, `mergeContents(...)`.
enum Want {
    Empty,
    Of(State),
    Apply(Vec<E>),
    All(Vec<Want>),
}

struct Case {
    name: &'static str,
    state: State,
    shape: Shape,
    want: Want,
    /// Also run an exec with this result as its root and compare what it sees at `/`.
    as_root: bool,
}

fn case(name: &'static str, built: (State, Shape), want: Want) -> Case {
    Case {
        name,
        state: built.0,
        shape: built.1,
        want,
        as_root: false,
    }
}

fn root_case(name: &'static str, built: (State, Shape), want: Want) -> Case {
    Case {
        as_root: true,
        ..case(name, built, want)
    }
}

fn files(list: &[(&'static str, &'static str)]) -> Want {
    Want::Apply(list.iter().map(|(p, c)| File(p, c, 0o644)).collect())
}

// ----- Describing trees -----

fn sha16(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))[..16].to_string()
}

fn file_desc(perm: u32, sha: &str) -> String {
    format!("file {perm:o} sha256:{sha}")
}

fn dev_major(dev: u64) -> u64 {
    ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)
}

fn dev_minor(dev: u64) -> u64 {
    (dev & 0xff) | ((dev >> 12) & !0xff)
}

/// One entry as both sides see it; `inode` only for non-dirs with more than one link.
struct Raw {
    desc: String,
    owner: (u32, u32),
    inode: Option<u64>,
}

/// Appends owners and hardlink groups (a linked file names the smallest path of its group).
fn finish(raw: BTreeMap<String, Raw>) -> Tree {
    let mut first: HashMap<u64, String> = HashMap::new();
    for (p, r) in &raw {
        if let Some(i) = r.inode {
            first.entry(i).or_insert_with(|| p.clone());
        }
    }
    raw.into_iter()
        .map(|(p, r)| {
            let mut desc = r.desc;
            if r.owner != (0, 0) {
                desc.push_str(&format!(" owner={}:{}", r.owner.0, r.owner.1));
            }
            if let Some(i) = r.inode {
                desc.push_str(&format!(" hardlink-of {}", first[&i]));
            }
            (p, desc)
        })
        .collect()
}

fn walk(dir: &Path, rel: &str, out: &mut BTreeMap<String, Raw>) -> Result<()> {
    let mut names = fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<Vec<_>>>()?;
    names.sort();
    for n in names {
        let p = dir.join(&n);
        let r = format!("{rel}/{}", n.to_string_lossy());
        let md = fs::symlink_metadata(&p)?;
        let ft = md.file_type();
        let perm = md.mode() & 0o7777;
        let desc = if ft.is_dir() {
            format!("dir {perm:o}")
        } else if ft.is_file() {
            file_desc(
                perm,
                &sha16(&fs::read(&p).with_context(|| format!("reading {}", p.display()))?),
            )
        } else if ft.is_symlink() {
            format!("symlink -> {}", fs::read_link(&p)?.display())
        } else if ft.is_fifo() {
            format!("fifo {perm:o}")
        } else if ft.is_char_device() {
            format!(
                "chardev {perm:o} {}:{}",
                dev_major(md.rdev()),
                dev_minor(md.rdev())
            )
        } else {
            format!("other {perm:o}")
        };
        let inode = (!ft.is_dir() && md.nlink() > 1).then_some(md.ino());
        out.insert(
            r.clone(),
            Raw {
                desc,
                owner: (md.uid(), md.gid()),
                inode,
            },
        );
        if ft.is_dir() {
            walk(&p, &r, out)?;
        }
    }
    Ok(())
}

/// The tree under `root` (not including `root` itself), as the host sees it.
fn describe(root: &Path) -> Result<Tree> {
    let mut raw = BTreeMap::new();
    walk(root, "", &mut raw)?;
    Ok(finish(raw))
}

/// `busybox stat` format of the listing script (and `sha256sum` for file contents).
const STAT_FMT: &str = "%n|%F|%a|%u:%g|%h|%i|%t:%T|%N";

/// A shell function `l DIR OUT` writing `OUT.stat` and `OUT.sum` for the tree under DIR
/// (not crossing into other mounts).
const LIST_FN: &str = "l() { cd \"$1\"; find . -xdev -exec stat -c 'FMT' {} + > \"$2.stat\"; \
                       find . -xdev -type f -exec sha256sum {} + < /dev/null > \"$2.sum\"; }";

fn list_script(targets: &[(String, String)]) -> String {
    let mut s = format!("set -e; {}", LIST_FN.replace("FMT", STAT_FMT));
    for (dir, out) in targets {
        s.push_str(&format!("; l {dir} {out}"));
    }
    s
}

/// The tree a process listed (the `.stat` and `.sum` files of [`list_script`]).
fn parse_listing(stat: &str, sums: &str) -> Result<Tree> {
    let mut sha: HashMap<String, String> = HashMap::new();
    for l in sums.lines().filter(|l| !l.is_empty()) {
        let (h, p) = l
            .split_once("  ")
            .ok_or_else(|| anyhow!("bad sha256sum line {l:?}"))?;
        if p != "-" {
            sha.insert(p.to_string(), h[..16].to_string());
        }
    }
    let mut raw = BTreeMap::new();
    for l in stat.lines().filter(|l| !l.is_empty()) {
        let f: Vec<&str> = l.splitn(8, '|').collect();
        ensure!(f.len() == 8, "bad stat line {l:?}");
        if f[0] == "." {
            continue;
        }
        let path = f[0]
            .strip_prefix('.')
            .ok_or_else(|| anyhow!("stat path {:?}", f[0]))?
            .to_string();
        let perm = u32::from_str_radix(f[2], 8)?;
        let (uid, gid) = f[3].split_once(':').ok_or_else(|| anyhow!("owner {l:?}"))?;
        let nlink: u64 = f[4].parse()?;
        let ino: u64 = f[5].parse()?;
        let desc = match f[1] {
            "directory" => format!("dir {perm:o}"),
            "regular file" | "regular empty file" => file_desc(
                perm,
                sha.get(f[0])
                    .ok_or_else(|| anyhow!("no sha256sum for {}", f[0]))?,
            ),
            "symbolic link" => {
                let target = f[7]
                    .split_once(" -> '")
                    .and_then(|(_, t)| t.strip_suffix('\''))
                    .ok_or_else(|| anyhow!("symlink {l:?}"))?;
                format!("symlink -> {target}")
            }
            "fifo" => format!("fifo {perm:o}"),
            "character special file" => {
                let (a, b) = f[6].split_once(':').ok_or_else(|| anyhow!("dev {l:?}"))?;
                format!(
                    "chardev {perm:o} {}:{}",
                    u64::from_str_radix(a, 16)?,
                    u64::from_str_radix(b, 16)?
                )
            }
            other => format!("other {perm:o} ({other})"),
        };
        let inode = (f[1] != "directory" && nlink > 1).then_some(ino);
        raw.insert(
            path,
            Raw {
                desc,
                owner: (uid.parse()?, gid.parse()?),
                inode,
            },
        );
    }
    Ok(finish(raw))
}

/// What differs between two trees, one line per path.
fn tree_diff(got: &Tree, want: &Tree) -> String {
    let mut out = vec![];
    for (p, w) in want {
        match got.get(p) {
            None => out.push(format!("  missing {p}: {w}")),
            Some(g) if g != w => out.push(format!("  differs {p}: got {g}, want {w}")),
            _ => {}
        }
    }
    for (p, g) in got {
        if !want.contains_key(p) {
            out.push(format!("  extra   {p}: {g}"));
        }
    }
    out.join("\n")
}

fn apply(es: &[E], into: &mut Tree) {
    for e in es {
        match e {
            Dir(p, m) => {
                into.insert(p.to_string(), format!("dir {m:o}"));
            }
            File(p, c, m) => {
                into.insert(p.to_string(), file_desc(*m, &sha16(c.as_bytes())));
            }
            Fifo(p, m) => {
                into.insert(p.to_string(), format!("fifo {m:o}"));
            }
            Chardev(p, m, a, b) => {
                into.insert(p.to_string(), format!("chardev {m:o} {a}:{b}"));
            }
            Link(old, new) => {
                let base = into.get(*old).cloned().expect("link target first");
                let base = base.split(" hardlink-of ").next().unwrap().to_string();
                let first = std::cmp::min(*old, *new);
                into.insert(old.to_string(), format!("{base} hardlink-of {first}"));
                into.insert(new.to_string(), format!("{base} hardlink-of {first}"));
            }
            RemoveAll(p) => {
                let pre = format!("{p}/");
                into.retain(|k, _| k != p && !k.starts_with(&pre));
            }
        }
    }
}

/// Paths a container runtime puts in a root filesystem (mounts and their stubs), left out when
/// comparing what an exec sees at `/`.
const RUNTIME_PATHS: &[&str] = &[
    "/proc",
    "/sys",
    "/dev",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/hostname",
    "/out",
];

fn without_runtime_paths(t: &Tree) -> Tree {
    t.iter()
        .filter(|(p, _)| {
            !RUNTIME_PATHS
                .iter()
                .any(|r| p.as_str() == *r || p.starts_with(&format!("{r}/")))
        })
        .map(|(p, d)| (p.clone(), d.clone()))
        .collect()
}

// ----- The world: one worker and the two base images -----

struct Ctx {
    w: TestWorker,
    bb: TestImage,
    ml: TestImage,
}

impl Ctx {
    async fn new() -> Result<Ctx> {
        let w = TestWorker::new()?;
        let engine = DockerEngine::system()?;
        let bb = busybox_image(&engine).await?;
        let ml = multi_layer_image(&engine).await?;
        Ok(Ctx { w, bb, ml })
    }

    /// Upstream's `alpine()`.
    fn alpine(&self) -> State {
        llb::image(self.ml.reference()).state()
    }

    /// The busybox image alone.
    fn busybox_image(&self) -> State {
        llb::image(self.bb.reference()).state()
    }

    /// Upstream's `busybox()`: the image plus two FileOp layers.
    fn busybox(&self) -> State {
        let s = mkdir(&self.busybox_image(), "/bb", 0o755);
        mkfile(&s, "/bb/marker", 0o644, "busybox")
    }

    async fn solve(&self, st: &State) -> Result<SolvedRef> {
        let s = worker_ops_support::solve(&self.w.worker, st).await;
        let logs = s.logs();
        s.result.map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(x) = src {
                msg.push_str(&format!(": {x}"));
                src = x.source();
            }
            anyhow!("solve failed: {msg}\nlogs:\n{logs}")
        })
    }

    async fn tree(&self, st: &State) -> Result<Tree> {
        let r = self.solve(st).await?;
        let m = r.mount().await?;
        describe(m.path())
    }

    async fn expected(&self, want: &Want) -> Result<Tree> {
        let mut t = Tree::new();
        let parts: Vec<&Want> = match want {
            Want::All(v) => v.iter().collect(),
            w => vec![w],
        };
        for p in parts {
            match p {
                Want::Empty => {}
                Want::Of(s) => t.extend(self.tree(s).await?),
                Want::Apply(es) => apply(es, &mut t),
                Want::All(_) => bail!("nested Want::All"),
            }
        }
        Ok(t)
    }

    /// Committed berth layers of the worker's store.
    fn layer_count(&self) -> Result<usize> {
        let dir = self.w.root().join("snapshots/layers");
        Ok(match fs::read_dir(&dir) {
            Ok(rd) => rd.count(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        })
    }

    /// Solves the case (its inputs first), checks laziness and the mounted tree against `want`.
    async fn check(&self, c: &Case, want: &Tree) -> Result<()> {
        let inputs: Vec<State> = match &c.shape {
            Shape::Merge(v) => v.clone(),
            Shape::Diff(lu) => vec![lu.0.clone(), lu.1.clone()],
            Shape::Other => vec![],
        };
        let mut chains: Vec<Vec<LayerRef>> = vec![];
        for i in &inputs {
            chains.push(self.solve(i).await?.chain().layers().to_vec());
        }
        let before = self.layer_count()?;
        let r = self.solve(&c.state).await?;
        let added = self.layer_count()? as isize - before as isize;
        let chain = r.chain().layers().to_vec();
        match &c.shape {
            Shape::Merge(_) => {
                ensure!(
                    chain == chains.concat(),
                    "merge chain ({} layers) is not its inputs' chains concatenated ({:?} layers)",
                    chain.len(),
                    chains.iter().map(Vec::len).collect::<Vec<_>>()
                );
                ensure!(added == 0, "merge wrote {added} layers");
            }
            Shape::Diff(..) => {
                let (lc, uc) = (&chains[0], &chains[1]);
                if lc.is_empty() {
                    ensure!(&chain == uc, "diff from scratch is not its upper");
                    ensure!(added == 0, "diff from scratch wrote {added} layers");
                } else if lc == uc {
                    ensure!(chain.is_empty(), "diff of equal chains is not empty");
                    ensure!(added == 0, "empty diff wrote {added} layers");
                } else if uc.starts_with(lc) {
                    let between = &uc[lc.len()..];
                    ensure!(
                        chain.len() == between.len(),
                        "ancestor diff is not the {} layers between",
                        between.len()
                    );
                    let mut copies = 0;
                    for (got, want) in chain.iter().zip(between) {
                        if got != want {
                            ensure!(
                                same_tar(&r, got, want)?,
                                "ancestor diff layer {got:?} is neither {want:?} nor a copy of it"
                            );
                            copies += 1;
                        }
                    }
                    ensure!(added == copies, "ancestor diff wrote {added} layers");
                } else {
                    ensure!(
                        chain.len() == 1 && added == 1,
                        "computed diff: {} layers in the chain, {added} written (want 1, 1)",
                        chain.len()
                    );
                }
            }
            Shape::Other => {}
        }
        let got = {
            let mnt = r.mount().await?;
            describe(mnt.path())?
        };
        ensure!(
            &got == want,
            "mounted result differs from upstream's expected tree:\n{}",
            tree_diff(&got, want)
        );
        Ok(())
    }

    /// One exec on the busybox image with every case's result mounted read-only at `/m/<n>`:
    /// what the process lists must be the expected tree. Returns the failures.
    async fn check_views(&self, cases: &[(&Case, &Tree)]) -> Result<Vec<String>> {
        let mut opts_targets = vec![];
        let mut mounts = vec![];
        for (n, (c, _)) in cases.iter().enumerate() {
            mounts.push(Mount::bind(format!("/m/{n}"), &c.state).readonly());
            opts_targets.push((format!("/m/{n}"), format!("/out/{n}")));
        }
        mounts.push(Mount::bind("/out", &scratch()));
        let mut opts = RunOpts::shell(list_script(&opts_targets));
        for mnt in mounts {
            opts = opts.mount(mnt);
        }
        let out = self
            .solve(&self.busybox_image().run(opts).get_mount("/out").unwrap())
            .await
            .context("listing exec")?;
        let mnt = out.mount().await?;
        let mut failures = vec![];
        for (n, (c, want)) in cases.iter().enumerate() {
            let read = |ext: &str| fs::read_to_string(mnt.path().join(format!("{n}.{ext}")));
            let got = parse_listing(&read("stat")?, &read("sum")?)?;
            if &got != *want {
                failures.push(format!(
                    "{} (seen by a process at /m/{n}):\n{}",
                    c.name,
                    tree_diff(&got, want)
                ));
            }
        }
        Ok(failures)
    }

    /// An exec with the case's result as its root lists `/`.
    async fn check_as_root(&self, c: &Case, want: &Tree) -> Result<()> {
        let opts = RunOpts::shell(list_script(&[("/".into(), "/out/root".into())]))
            .mount(Mount::bind("/out", &scratch()));
        let out = self
            .solve(&c.state.run(opts).get_mount("/out").unwrap())
            .await?;
        let mnt = out.mount().await?;
        let got = parse_listing(
            &fs::read_to_string(mnt.path().join("root.stat"))?,
            &fs::read_to_string(mnt.path().join("root.sum"))?,
        )?;
        let (got, want) = (without_runtime_paths(&got), without_runtime_paths(want));
        ensure!(
            got == want,
            "as the root of an exec:\n{}",
            tree_diff(&got, &want)
        );
        Ok(())
    }
}

/// Runs one group of cases on one worker; reports every failing case, not just the first.
async fn run_group(group: &str, build: fn(&Ctx) -> Vec<Case>) -> Result<()> {
    let t = std::time::Instant::now();
    let ctx = Ctx::new().await?;
    let cases = build(&ctx);
    let mut failures = vec![];
    let mut passed: Vec<(&Case, Tree)> = vec![];
    for c in &cases {
        let res = async {
            let want = ctx.expected(&c.want).await.context("expected tree")?;
            ctx.check(c, &want).await?;
            Ok::<_, anyhow::Error>(want)
        }
        .await;
        match res {
            Ok(want) => passed.push((c, want)),
            Err(e) => failures.push(format!("{}: {e:#}", c.name)),
        }
    }
    let views: Vec<(&Case, &Tree)> = passed.iter().map(|(c, w)| (*c, w)).collect();
    failures.extend(ctx.check_views(&views).await?);
    for (c, want) in &passed {
        if c.as_root {
            if let Err(e) = ctx.check_as_root(c, want).await {
                failures.push(format!("{}: {e:#}", c.name));
            }
        }
    }
    eprintln!(
        "{group}: {} cases in {:?} ({} as exec roots)",
        cases.len(),
        t.elapsed(),
        cases.iter().filter(|c| c.as_root).count()
    );
    ensure!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
    Ok(())
}

// ----- Diffs of identical states, scratch sides, lazy image blobs, exec mounts, hardlinks -----

fn linked_files(c: &Ctx) -> State {
    let run = sh(
        &c.alpine(),
        &[
            "mkdir /dir",
            "touch /dir/1",
            "ln /dir/1 /dir/2",
            "chmod 0600 /dir/2",
        ],
    );
    llb::diff(&c.alpine(), &run)
}

fn linked_contents() -> Want {
    Want::Apply(vec![
        Dir("/dir", 0o755),
        File("/dir/1", "", 0o600),
        Link("/dir/1", "/dir/2"),
    ])
}

/// An exec on alpine touching /root/A and, through a mount of busybox at /mnt, /mnt/B.
fn split_diff_exec(c: &Ctx) -> llb::ExecState {
    sh_exec(
        &c.alpine(),
        &["touch /root/A", "touch /mnt/B"],
        vec![Mount::bind("/mnt", &c.busybox())],
    )
}

fn basics(c: &Ctx) -> Vec<Case> {
    let alpine = c.alpine();
    let busybox = c.busybox();
    let lower_scratch_deletes = {
        let up = mkfile(&scratch(), "/foo", 0o644, "B");
        let up = rm(&up, "/foo");
        mkfile(&up, "/bar", 0o644, "")
    };
    let mnt_b = sh_exec(
        &busybox,
        &["chmod 0777 /A/dir/1"],
        vec![
            Mount::bind("/A", &linked_files(c)),
            Mount::bind("/B", &linked_files(c)),
        ],
    )
    .get_mount("/B")
    .unwrap();
    vec![
        case(
            "TestDiffScratch",
            o(llb::diff(&scratch(), &scratch())),
            Want::Empty,
        ),
        case("TestDiffSelf", d(&alpine, &alpine), Want::Empty),
        case(
            "TestDiffSelfDeletes",
            m(&[alpine.clone(), llb::diff(&alpine, &alpine)]),
            Want::Of(alpine.clone()),
        ),
        case(
            "TestDiffLowerScratch",
            o(llb::diff(&scratch(), &alpine)),
            Want::Of(alpine.clone()),
        ),
        case(
            "TestDiffLowerScratchDeletes",
            m(&[
                mkfile(&scratch(), "/foo", 0o755, "A"),
                llb::diff(&scratch(), &lower_scratch_deletes),
            ]),
            Want::Apply(vec![File("/bar", "", 0o644)]),
        ),
        case(
            "TestDiffUpperScratch",
            m(&[
                alpine.clone(),
                mkfile(&scratch(), "/foo", 0o644, "foo"),
                llb::diff(&alpine, &scratch()),
            ]),
            Want::Apply(vec![File("/foo", "foo", 0o644)]),
        ),
        root_case(
            "TestDiffLazyBlobMerge",
            m(&[busybox.clone(), llb::diff(&busybox, &alpine)]),
            Want::Of(alpine.clone()),
        ),
        // berth: the busybox image is alpine's first layer, so the diff is an ancestor diff
        // (Docker's layers 2 and 3 reused) and the merge is alpine's own chain.
        case(
            "LazyBlobMerge on the image prefix (berth)",
            m(&[c.busybox_image(), llb::diff(&c.busybox_image(), &alpine)]),
            Want::Of(alpine.clone()),
        ),
        case(
            "Diff of an image and its prefix image (berth)",
            d(&c.busybox_image(), &alpine),
            Want::Apply(vec![
                Dir("/data", 0o755),
                Dir("/data/keep", 0o755),
                File("/data/keep/a.txt", "layer3-a\n", 0o644),
                File("/data/keep/b.txt", "layer3-b\n", 0o644),
                Dir("/data/opaque", 0o755),
                File("/data/opaque/new.txt", "layer3-new\n", 0o644),
            ]),
        ),
        case(
            "TestDiffExecRoot",
            d(&alpine, &split_diff_exec(c).root()),
            Want::Apply(vec![Dir("/root", 0o700), File("/root/A", "", 0o644)]),
        ),
        case(
            "TestDiffExecMount",
            d(&busybox, &split_diff_exec(c).get_mount("/mnt").unwrap()),
            Want::Apply(vec![File("/B", "", 0o644)]),
        ),
        case("TestDiffHardlinks", o(linked_files(c)), linked_contents()),
        case(
            "TestDiffHardlinkChangesDoNotPropagateBetweenSnapshots",
            o(mnt_b),
            linked_contents(),
        ),
        // verifyBlobReuse: the diff of one exec layer is that layer (no new one).
        case(
            "TestDiffSingleLayerBlobReuse",
            d(&alpine, &sh(&alpine, &["echo -n reuse > /randomfile"])),
            Want::Apply(vec![File("/randomfile", "reuse", 0o644)]),
        ),
        {
            let mb = llb::merge(&[alpine.clone(), mkfile(&scratch(), "/foo", 0o644, "/foo")]);
            case(
                "TestDiffSingleLayerOnMergeBlobReuse",
                d(&mb, &sh(&mb, &["echo -n reuse > /randomfile"])),
                Want::Apply(vec![File("/randomfile", "reuse", 0o644)]),
            )
        },
    ]
}

#[tokio::test]
async fn upstream_basics() -> Result<()> {
    run_group("basics", basics).await
}

// ----- Basic diff slices over one base (upstream's `base()` in "Basic diff slices") -----

/// Upstream's `base()`: alpine plus one FileOp per entry, in upstream's order (`None`: a dir).
const SLICE_BASE: &[(&str, Option<&str>)] = &[
    ("/shuffleFile1", Some("shuffleFile1")),
    ("/shuffleDir1", None),
    ("/shuffleDir1/shuffleSubdir1", None),
    ("/shuffleDir1/shuffleSubfile1", Some("")),
    ("/shuffleDir1/shuffleSubdir1/shuffleSubfile2", Some("")),
    ("/unmodifiedDir", None),
    ("/unmodifiedDir/chmodSubdir1", None),
    ("/unmodifiedDir/deleteSubdir1", None),
    ("/unmodifiedDir/opaqueDir1", None),
    ("/unmodifiedDir/opaqueDir1/opaqueSubdir1", None),
    ("/unmodifiedDir/overrideSubdir1", None),
    ("/unmodifiedDir/shuffleDir2", None),
    ("/unmodifiedDir/shuffleDir2/shuffleSubdir2", None),
    ("/unmodifiedDir/chmodFile1", Some("chmodFile1")),
    (
        "/unmodifiedDir/modifyContentFile1",
        Some("modifyContentFile1"),
    ),
    ("/unmodifiedDir/deleteFile1", Some("")),
    ("/unmodifiedDir/opaqueDir1/opaqueFile1", Some("")),
    (
        "/unmodifiedDir/opaqueDir1/opaqueSubdir1/opaqueFile2",
        Some(""),
    ),
    ("/unmodifiedDir/overrideFile1", Some("")),
    ("/unmodifiedDir/overrideFile2", Some("")),
    ("/unmodifiedDir/shuffleFile2", Some("shuffleFile2")),
    ("/unmodifiedDir/shuffleDir2/shuffleSubfile3", Some("")),
    (
        "/unmodifiedDir/shuffleDir2/shuffleSubdir2/shuffleSubfile4",
        Some(""),
    ),
    ("/modifyDir", None),
    ("/modifyDir/chmodSubdir2", None),
    ("/modifyDir/deleteSubdir2", None),
    ("/modifyDir/opaqueDir2", None),
    ("/modifyDir/opaqueDir2/opaqueSubdir2", None),
    ("/modifyDir/overrideSubdir2", None),
    ("/modifyDir/shuffleDir3", None),
    ("/modifyDir/shuffleDir3/shuffleSubdir3", None),
    ("/modifyDir/chmodFile2", Some("chmodFile2")),
    ("/modifyDir/modifyContentFile2", Some("modifyContentFile2")),
    ("/modifyDir/deleteFile2", Some("")),
    ("/modifyDir/opaqueDir2/opaqueFile3", Some("")),
    ("/modifyDir/opaqueDir2/opaqueSubdir2/opaqueFile4", Some("")),
    ("/modifyDir/overrideFile3", Some("")),
    ("/modifyDir/overrideFile4", Some("")),
    ("/modifyDir/shuffleFile3", Some("shuffleFile3")),
    ("/modifyDir/shuffleDir3/shuffleSubfile4", Some("")),
    (
        "/modifyDir/shuffleDir3/shuffleSubdir3/shuffleSubfile6",
        Some(""),
    ),
];

fn slice_base(c: &Ctx) -> State {
    let mut s = c.alpine();
    for (p, data) in SLICE_BASE {
        s = match data {
            Some(data) => mkfile(&s, p, 0o644, data),
            None => mkdir(&s, p, 0o755),
        };
    }
    s
}

/// `runShell(base(), baseDiffCmds ++ cmds)`.
fn slice_run(c: &Ctx, cmds: &[&str]) -> State {
    let all: Vec<&str> = BASE_DIFF.iter().chain(cmds).copied().collect();
    sh(&slice_base(c), &all)
}

/// `Diff(base(), runShell(base(), baseDiffCmds ++ cmds))`, expected: base diff + `extra`.
fn slice(c: &Ctx, name: &'static str, cmds: &[&str], extra: Vec<E>) -> Case {
    let mut want = base_diff_contents();
    want.extend(extra);
    case(
        name,
        d(&slice_base(c), &slice_run(c, cmds)),
        Want::Apply(want),
    )
}

/// `Merge(base(), Diff(base(), runShell(base(), baseDiffCmds ++ cmds)))`.
fn slice_merge(c: &Ctx, cmds: &[&str]) -> (State, Shape) {
    let base = slice_base(c);
    m(&[base.clone(), llb::diff(&base, &slice_run(c, cmds))])
}

fn slices(c: &Ctx) -> Vec<Case> {
    let base = slice_base(c);
    let base_plus = |e: Vec<E>| Want::All(vec![Want::Of(base.clone()), Want::Apply(e)]);
    let base_plus_extra = {
        let s = mkdir(&base, "/extradir", 0o755);
        mkfile(&s, "/extradir/extrafile", 0o755, "")
    };
    let extra_content = {
        let s = mkdir(&scratch(), "/unmodifiedDir", 0o755);
        mkfile(&s, "/unmodifiedDir/deleteFile2", 0o644, "foo")
    };
    let rebased = {
        let mut s = base.clone();
        for f in [
            "/unmodifiedDir/opaqueDir1/rebaseFile1",
            "/unmodifiedDir/opaqueDir1/opaqueSubdir1/rebaseFile2",
            "/modifyDir/opaqueDir2/rebaseFile3",
            "/modifyDir/opaqueDir2/opaqueSubdir2/rebaseFile4",
        ] {
            s = mkfile(&s, f, 0o644, "");
        }
        s
    };
    let parent_base = sh(
        &c.alpine(),
        &[
            "mkdir -p /parentdir/dir/subdir",
            "touch /parentdir/dir/A /parentdir/dir/B /parentdir/dir/subdir/C",
        ],
    );
    let mut delete_files = base_diff_contents();
    delete_files.extend([
        RemoveAll("/unmodifiedDir/deleteFile1"),
        RemoveAll("/modifyDir/deleteFile2"),
    ]);
    let mut delete_dirs = base_diff_contents();
    delete_dirs.extend([
        RemoveAll("/unmodifiedDir/deleteSubdir1"),
        RemoveAll("/modifyDir/deleteSubdir2"),
    ]);
    vec![
        slice(c, "TestDiffNewFiles", NEW_FILES, new_file_contents()),
        slice(
            c,
            "TestDiffModifiedFiles",
            MODIFY_FILES,
            modify_file_contents(),
        ),
        slice(c, "TestDiffNewDirs", NEW_DIRS, new_dir_contents()),
        slice(
            c,
            "TestDiffModifiedDirs",
            MODIFY_DIRS,
            modify_dir_contents(),
        ),
        slice(
            c,
            "TestDiffOverrideDirs",
            OVERRIDE_DIRS,
            override_dir_contents(),
        ),
        slice(
            c,
            "TestDiffOverrideFiles",
            OVERRIDE_FILES,
            override_file_contents(),
        ),
        slice(c, "TestDiffDeleteFiles", DELETE_FILES, vec![]),
        root_case(
            "TestDiffDeleteFilesMerge",
            slice_merge(c, DELETE_FILES),
            base_plus(delete_files),
        ),
        slice(c, "TestDiffDeleteDirs", DELETE_DIRS, vec![]),
        case(
            "TestDiffDeleteDirsMerge",
            slice_merge(c, DELETE_DIRS),
            base_plus(delete_dirs),
        ),
        // The dir holding an inapplicable delete shows up (the exporter's behaviour).
        case(
            "TestDiffUnmatchedDelete",
            m(&[
                base.clone(),
                llb::diff(
                    &base_plus_extra,
                    &rm(&base_plus_extra, "/extradir/extrafile"),
                ),
            ]),
            base_plus(vec![Dir("/extradir", 0o755)]),
        ),
        case(
            "TestDiffDeleteFilesAfterMerge",
            d(
                &base,
                &sh(
                    &llb::merge(&[base.clone(), extra_content]),
                    &["rm /unmodifiedDir/deleteFile1 /unmodifiedDir/deleteFile2"],
                ),
            ),
            Want::Apply(vec![Dir("/unmodifiedDir", 0o755)]),
        ),
        slice(c, "TestDiffOpaqueDirs", OPAQUE_DIRS, opaque_dir_contents()),
        // Opaque dirs become explicit whiteouts: files another input adds to the dir survive.
        root_case(
            "TestDiffOpaqueDirsMerge",
            m(&[rebased, llb::diff(&base, &slice_run(c, OPAQUE_DIRS))]),
            Want::All(vec![
                Want::Of(base.clone()),
                Want::Apply(base_diff_contents()),
                Want::Apply(vec![
                    RemoveAll("/unmodifiedDir/opaqueDir1"),
                    RemoveAll("/modifyDir/opaqueDir2"),
                ]),
                Want::Apply(opaque_dir_contents()),
                Want::Apply(vec![
                    File("/unmodifiedDir/opaqueDir1/rebaseFile1", "", 0o644),
                    File("/modifyDir/opaqueDir2/rebaseFile3", "", 0o644),
                ]),
            ]),
        ),
        // Shuffled files are no change (nor is their unmodified dir).
        case(
            "TestDiffShuffleFiles",
            d(&base, &slice_run(c, SHUFFLE_FILES)),
            Want::Apply([base_diff_contents(), vec![RemoveAll("/unmodifiedDir")]].concat()),
        ),
        case(
            "TestDiffShuffleFilesMerge",
            slice_merge(c, SHUFFLE_FILES),
            base_plus(base_diff_contents()),
        ),
        slice(c, "TestDiffFifos", FIFOS, fifo_contents()),
        slice(
            c,
            "TestDiffChardevs",
            CHARDEVS,
            vec![
                Chardev("/unmodifiedDir/null1", 0o644, 1, 3),
                Chardev("/modifyDir/null2", 0o644, 1, 3),
            ],
        ),
        case(
            "TestDiffCombinedSingleLayer",
            d(&base, &sh(&base, &ALL_CMDS.concat())),
            Want::Apply(all_contents()),
        ),
        case(
            "TestDiffCombinedMultiLayer",
            d(&base, &sh_chain(&base, ALL_CMDS)),
            Want::Apply(all_contents()),
        ),
        // The second "TestDiffOpaqueDirs": merged onto busybox with the same dir.
        root_case(
            "TestDiffOpaqueDirs (/parentdir onto busybox)",
            m(&[
                sh(
                    &c.busybox(),
                    &[
                        "mkdir -p /parentdir/dir/subdir",
                        "touch /parentdir/dir/A /parentdir/dir/B /parentdir/dir/D",
                    ],
                ),
                llb::diff(
                    &parent_base,
                    &sh(
                        &parent_base,
                        &[
                            "rm -rf /parentdir/dir",
                            "mkdir /parentdir/dir",
                            "touch /parentdir/dir/E",
                        ],
                    ),
                ),
            ]),
            Want::Of(sh(
                &c.busybox(),
                &[
                    "mkdir -p /parentdir/dir",
                    "touch /parentdir/dir/D",
                    "touch /parentdir/dir/E",
                ],
            )),
        ),
    ]
}

#[tokio::test]
async fn upstream_diff_slices() -> Result<()> {
    run_group("slices", slices).await
}

// ----- Symlinks -----

fn symlinks(c: &Ctx) -> Vec<Case> {
    let alpine = c.alpine();
    let busybox = c.busybox();
    let link_foo_to_bar = llb::diff(&alpine, &sh(&alpine, &["mkdir -p /bar", "ln -s /bar /foo"]));
    let alpine_plus_foo = sh(&alpine, &["mkdir /foo"]);
    let delete_foo = llb::diff(&alpine_plus_foo, &sh(&alpine_plus_foo, &["rm -rf /foo"]));
    let create_foo_file = llb::diff(
        &alpine_plus_foo,
        &sh(&alpine_plus_foo, &["touch /foo/file"]),
    );
    let bb = |cmds: &[&str]| Want::Of(sh(&busybox, cmds));
    let adiff = |cmds: &[&str]| llb::diff(&alpine, &sh(&alpine, cmds));
    vec![
        case(
            "TestDiffDirOverridesSymlink",
            m(&[
                busybox.clone(),
                link_foo_to_bar.clone(),
                create_foo_file.clone(),
            ]),
            bb(&["mkdir /bar", "mkdir /foo", "touch /foo/file"]),
        ),
        case(
            "TestDiffSymlinkOverridesDir",
            m(&[
                busybox.clone(),
                create_foo_file.clone(),
                link_foo_to_bar.clone(),
            ]),
            bb(&["mkdir /bar", "ln -s /bar /foo"]),
        ),
        case(
            "TestDiffSymlinkOverridesSymlink",
            m(&[
                busybox.clone(),
                adiff(&["mkdir /1 /2", "ln -s /1 /a", "ln -s /2 /a/b"]),
                adiff(&["mkdir /3", "ln -s /3 /a"]),
            ]),
            bb(&["mkdir /1 /2 /3", "ln -s /3 /a", "ln -s /2 /1/b"]),
        ),
        case(
            "TestDiffDeleteDoesNotFollowSymlink",
            m(&[busybox.clone(), link_foo_to_bar.clone(), delete_foo]),
            bb(&["mkdir /bar"]),
        ),
        root_case(
            "TestDiffDeleteDoesNotFollowParentSymlink",
            m(&[
                busybox.clone(),
                mkfile(&link_foo_to_bar, "/bar/file", 0o644, ""),
                llb::diff(&create_foo_file, &rm(&create_foo_file, "/foo/file")),
            ]),
            bb(&["mkdir /bar", "touch /bar/file", "mkdir /foo"]),
        ),
        case(
            "TestDiffCircularSymlinks",
            m(&[
                busybox.clone(),
                adiff(&["ln -s /2 /1", "ln -s /1 /2"]),
                mkfile(&scratch(), "/1", 0o644, "foo"),
            ]),
            bb(&["echo -n foo > /1", "ln -s /1 /2"]),
        ),
        case(
            "TestDiffCircularDirSymlink",
            m(&[
                busybox.clone(),
                adiff(&["mkdir /foo", "ln -s ../foo /foo/link"]),
                adiff(&["mkdir -p /foo/link", "touch /foo/link/file"]),
            ]),
            bb(&["mkdir -p /foo/link", "touch /foo/link/file"]),
        ),
        case(
            "TestDiffCircularParentDirSymlinks",
            m(&[
                busybox.clone(),
                adiff(&["ln -s /2 /1", "ln -s /1 /2"]),
                adiff(&["mkdir /1", "echo -n foo > /1/file"]),
            ]),
            bb(&["mkdir /1", "echo -n foo > /1/file", "ln -s /1 /2"]),
        ),
    ]
}

#[tokio::test]
async fn upstream_symlinks() -> Result<()> {
    run_group("symlinks", symlinks).await
}

// ----- Diff+Merge combinations, diffs of diffs, diffs as parents, regressions, testMergeOp -----

fn combos(_: &Ctx) -> Vec<Case> {
    let one = |p: &str| mkfile(&scratch(), p, 0o644, &p[1..]);
    let (a, b, cc) = (one("/A"), one("/B"), one("/C"));
    let delete_c = rm(&cc, "/C");
    let ab = llb::merge(&[a.clone(), b.clone()]);
    let abc = llb::merge(&[a.clone(), b.clone(), cc.clone()]);
    let ab_delete_c = llb::merge(&[a.clone(), b.clone(), delete_c]);
    // abcdae-a
    let nested = llb::merge(&[
        mkfile(&abc, "/D", 0o644, "D"),
        rm(
            &llb::merge(&[a.clone(), mkfile(&scratch(), "/E", 0o644, "E")]),
            "/A",
        ),
    ]);
    // a, ab, abc as one chain of FileOps.
    let c_ab = mkfile(&a, "/B", 0o644, "B");
    let c_abc = mkfile(&c_ab, "/C", 0o644, "C");
    let dir_base = mkdir(&scratch(), "/dir", 0o755);
    vec![
        // berth: a diff of siblings mounted alone is one computed layer; deletions invisible.
        // (Before TestDiffOnlyMerge, which solves the same diff as a merge input.)
        case("Diff of siblings (berth)", d(&a, &b), files(&[("/B", "B")])),
        case(
            "TestDiffOnlyMerge",
            m(&[llb::diff(&a, &b), llb::diff(&b, &a)]),
            Want::Of(a.clone()),
        ),
        case("TestDiffOfMerges", d(&ab, &abc), files(&[("/C", "C")])),
        case(
            "TestDiffOfMergesWithDeletes",
            m(&[abc.clone(), llb::diff(&abc, &ab_delete_c)]),
            files(&[("/A", "A"), ("/B", "B")]),
        ),
        case(
            "TestDiffSingleLayerOnMerge",
            d(&ab_delete_c, &mkfile(&ab_delete_c, "/D", 0o644, "D")),
            files(&[("/D", "D")]),
        ),
        case(
            "TestDiffSingleDeleteLayerOnMerge",
            m(&[ab_delete_c.clone(), llb::diff(&abc, &rm(&abc, "/A"))]),
            files(&[("/B", "B")]),
        ),
        case(
            "TestDiffMultipleLayerOnMerge",
            m(&[
                ab_delete_c.clone(),
                llb::diff(&abc, &rm(&mkfile(&abc, "/D", 0o644, "D"), "/A")),
            ]),
            files(&[("/B", "B"), ("/D", "D")]),
        ),
        case(
            "TestDiffNestedLayeredMerges",
            d(&abc, &mkfile(&nested, "/F", 0o644, "F")),
            files(&[("/D", "D"), ("/E", "E"), ("/F", "F")]),
        ),
        case(
            "TestDiffNestedLayeredMergeDeletes",
            m(&[
                mkfile(&ab, "/D", 0o644, "D"),
                llb::diff(&abc, &rm(&nested, "/D")),
            ]),
            files(&[("/B", "B"), ("/E", "E")]),
        ),
        case(
            "TestDiffOfDiffs",
            d(&llb::diff(&a, &c_ab), &llb::diff(&a, &c_abc)),
            files(&[("/C", "C")]),
        ),
        case(
            "TestDiffOfDiffsWithDeletes",
            m(&[
                c_abc.clone(),
                llb::diff(&llb::diff(&a, &c_abc), &llb::diff(&a, &c_ab)),
            ]),
            files(&[("/A", "A"), ("/B", "B")]),
        ),
        case(
            "TestDiffAsParentSingleLayer",
            o(mkfile(&llb::diff(&a, &c_ab), "/D", 0o644, "D")),
            files(&[("/B", "B"), ("/D", "D")]),
        ),
        case(
            "TestDiffAsParentSingleLayerDelete",
            m(&[c_ab.clone(), rm(&llb::diff(&a, &c_ab), "/B")]),
            files(&[("/A", "A")]),
        ),
        case(
            "TestDiffAsParentMultipleLayers",
            o(mkfile(&llb::diff(&a, &c_abc), "/D", 0o644, "D")),
            files(&[("/B", "B"), ("/C", "C"), ("/D", "D")]),
        ),
        case(
            "TestDiffAsParentMultipleLayerDelete",
            m(&[c_ab.clone(), rm(&llb::diff(&a, &c_abc), "/B")]),
            files(&[("/A", "A"), ("/C", "C")]),
        ),
        case(
            "TestDiffMergeOpaqueRegression",
            m(&[
                mkfile(&dir_base, "/dir/a", 0o644, ""),
                rm(&dir_base, "/dir"),
                mkfile(&dir_base, "/dir/b", 0o644, ""),
            ]),
            Want::Apply(vec![Dir("/dir", 0o755), File("/dir/b", "", 0o644)]),
        ),
        case(
            "TestDiffMergeOpaqueRegressionWithFileOverwrite",
            m(&[
                mkfile(&dir_base, "/dir/a", 0o644, ""),
                mkfile(&scratch(), "/dir", 0o644, ""),
                mkfile(&dir_base, "/dir/b", 0o644, ""),
            ]),
            Want::Apply(vec![Dir("/dir", 0o755), File("/dir/b", "", 0o644)]),
        ),
    ]
}

/// testMergeOp (client_mergeop_test.go).
fn merge_op(c: &Ctx) -> Vec<Case> {
    let state_a = {
        let s = mkfile(&scratch(), "/foo", 0o755, "A");
        let s = mkfile(&s, "/a", 0o755, "A");
        let s = mkdir(&s, "/bar", 0o700);
        mkfile(&s, "/bar/A", 0o755, "A")
    };
    let state_b = {
        let s = rm(&state_a, "/foo");
        let s = mkfile(&s, "/b", 0o755, "B");
        mkfile(&s, "/bar/B", 0o754, "B")
    };
    let state_c = {
        let s = mkfile(&scratch(), "/foo", 0o755, "C");
        let s = mkfile(&s, "/c", 0o755, "C");
        let s = mkdir(&s, "/bar", 0o755);
        mkfile(&s, "/bar/A", 0o400, "C")
    };
    let merge_a = llb::merge(&[state_a.clone(), state_c.clone()]);
    let merge_b = llb::merge(&[state_c.clone(), state_b.clone()]);
    let state_d = mkdir(&scratch(), "/qaz", 0o755);
    let merge_b_contents = || {
        vec![
            File("/a", "A", 0o755),
            File("/b", "B", 0o755),
            File("/c", "C", 0o755),
            Dir("/bar", 0o700),
            File("/bar/A", "A", 0o755),
            File("/bar/B", "B", 0o754),
        ]
    };
    let run_a = sh(
        &llb::merge(&[
            c.alpine(),
            llb::merge(&[merge_a.clone(), merge_b.clone(), state_d.clone()]),
        ]),
        &[
            "rm /a",
            "mkdir /a",
            "mv /b /c /a/",
            "rm -rf /bar",
            "mkdir -m 0755 /bar",
            "echo -n D > /bar/D",
            "rm -rf /qaz",
            "touch /qaz",
        ],
    );
    let state_e = {
        let s = mkfile(&scratch(), "/foo", 0o755, "E");
        let s = mkdir(&s, "/bar", 0o755);
        let s = mkfile(&s, "/bar/A", 0o755, "A");
        mkfile(&s, "/bar/E", 0o755, "")
    };
    let want_d = {
        let s = mkdir(&c.alpine(), "/a", 0o755);
        let s = mkfile(&s, "/a/b", 0o755, "B");
        let s = mkfile(&s, "/a/c", 0o755, "C");
        let s = mkdir(&s, "/bar", 0o755);
        let s = mkfile(&s, "/bar/D", 0o644, "D");
        let s = mkfile(&s, "/bar/E", 0o755, "");
        mkfile(&s, "/qaz", 0o644, "")
    };
    vec![
        case(
            "testMergeOp mergeA",
            m(&[state_a.clone(), state_c.clone()]),
            Want::Apply(vec![
                File("/foo", "C", 0o755),
                File("/c", "C", 0o755),
                Dir("/bar", 0o755),
                File("/bar/A", "C", 0o400),
                File("/a", "A", 0o755),
            ]),
        ),
        case(
            "testMergeOp mergeB",
            m(&[state_c, state_b]),
            Want::Apply(merge_b_contents()),
        ),
        case(
            "testMergeOp mergeC",
            m(&[merge_a, merge_b, state_d]),
            Want::Apply([merge_b_contents(), vec![Dir("/qaz", 0o755)]].concat()),
        ),
        // /foo of stateE is gone: stateB, inside mergeC, deletes it.
        root_case("testMergeOp mergeD", m(&[state_e, run_a]), Want::Of(want_d)),
    ]
}

#[tokio::test]
async fn upstream_combinations_and_merge_op() -> Result<()> {
    run_group("combinations", |c| {
        let mut v = combos(c);
        v.extend(merge_op(c));
        v
    })
    .await
}

/// Whether two berth layers give the same tar bytes.
fn same_tar(r: &SolvedRef, a: &LayerRef, b: &LayerRef) -> Result<bool> {
    let (LayerRef::Berth(a), LayerRef::Berth(b)) = (a, b) else {
        return Ok(false);
    };
    let tar = |id: &layerstore::snapshot::LayerId| -> Result<Vec<u8>> {
        let mut out = vec![];
        let store = r.store();
        layerstore::tar::write_layer(
            &store.layer_path(id).join("diff"),
            &mut out,
            None,
            &store.layer_write_options(id)?,
        )?;
        Ok(out)
    };
    Ok(tar(a)? == tar(b)?)
}
