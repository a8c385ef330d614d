//! Builder tests: structure of the marshalled definitions, digests, caps.

use super::*;
use prost::Message;
use sha2::Digest as _;

fn decode(def: &pb::Definition) -> Vec<(String, pb::Op)> {
    def.def
        .iter()
        .map(|b| {
            (
                format!("sha256:{}", hex::encode(sha2::Sha256::digest(b))),
                pb::Op::decode(b.as_ref()).unwrap(),
            )
        })
        .collect()
}

fn caps(def: &pb::Definition, dgst: &str) -> Vec<String> {
    def.metadata[dgst].caps.keys().cloned().collect()
}

#[test]
fn scratch_marshals_to_empty_definition() {
    let def = scratch().marshal().unwrap();
    assert!(def.def.is_empty());
    assert!(def.metadata.is_empty());
}

#[test]
fn local_source_definition() {
    let st: State = local("context")
        .include(["*.rs"])
        .shared_key_hint("ctx")
        .into();
    let def = st.custom_name("load context").marshal().unwrap();
    let ops = decode(&def);
    assert_eq!(ops.len(), 2);
    let (d0, op0) = &ops[0];
    let Some(pb::op::Op::Source(src)) = &op0.op else {
        panic!("not a source: {op0:?}")
    };
    assert_eq!(src.identifier, "local://context");
    assert_eq!(src.attrs["local.includepattern"], r#"["*.rs"]"#);
    assert_eq!(src.attrs["local.sharedkeyhint"], "ctx");
    assert!(src.attrs.contains_key("local.unique"));
    assert!(op0.platform.is_none(), "local sources have no platform");
    assert_eq!(
        caps(&def, d0),
        vec![
            "source.local",
            "source.local.includepatterns",
            "source.local.sharedkeyhint",
            "source.local.unique"
        ]
    );
    assert_eq!(
        def.metadata[d0].description["llb.customname"],
        "load context"
    );
    // Terminal: no payload, points at op 0, caps constraints+platform+meta.description.
    let (dt, term) = &ops[1];
    assert!(term.op.is_none());
    assert_eq!(term.inputs[0].digest, *d0);
    assert_eq!(
        caps(&def, dt),
        vec!["constraints", "meta.description", "platform"]
    );
}

#[test]
fn digests_are_stable_and_content_addressed() {
    let a = local("x").unique_id("u").state().marshal().unwrap();
    let b = local("x").unique_id("u").state().marshal().unwrap();
    assert_eq!(a.def, b.def);
    let c = local("y").unique_id("u").state().marshal().unwrap();
    assert_ne!(a.def[0], c.def[0]);
}

#[test]
fn file_op_chain_and_copy_indices() {
    let ctx: State = local("ctx").unique_id("u").into();
    let base = image("busybox").state();
    let st = base.dir("/work").file(
        mkdir("sub", 0o755, MkdirOpts::default().parents(true))
            .mkfile("sub/f", 0o600, "data", MkfileOpts::default())
            .copy(&ctx, "src/", "dst/", CopyOpts::default().include(["*.go"]))
            .rm("old", RmOpts::default().allow_not_found(true)),
    );
    let def = st.marshal().unwrap();
    let ops = decode(&def);
    // image, local, file, terminal
    assert_eq!(ops.len(), 4);
    let (fd, fop) = &ops[2];
    let Some(pb::op::Op::File(f)) = &fop.op else {
        panic!()
    };
    assert_eq!(fop.inputs.len(), 2, "image and local inputs");
    let a = &f.actions;
    assert_eq!(a.len(), 4);
    assert_eq!((a[0].input, a[0].secondary_input, a[0].output), (0, -1, -1));
    assert_eq!((a[1].input, a[1].output), (2, -1)); // 2 inputs + action 0
    assert_eq!((a[2].input, a[2].secondary_input), (3, 1));
    assert_eq!((a[3].input, a[3].output), (4, 0));
    use pb::file_action::Action;
    match &a[0].action {
        Some(Action::Mkdir(m)) => {
            assert_eq!(m.path, "/work/sub");
            assert!(m.make_parents);
            assert_eq!(m.mode, 0o755);
            assert_eq!(m.timestamp, -1);
        }
        x => panic!("{x:?}"),
    }
    match &a[2].action {
        Some(Action::Copy(c)) => {
            assert_eq!(c.src, "/src");
            assert_eq!(c.dest, "/work/dst/");
            assert_eq!(c.mode, -1);
            assert_eq!(c.include_patterns, vec!["*.go"]);
        }
        x => panic!("{x:?}"),
    }
    assert_eq!(
        caps(&def, fd),
        vec!["file.base", "file.copy.includeexcludepatterns"]
    );
    assert!(fop.platform.is_some());
    // Image ref normalized.
    let Some(pb::op::Op::Source(s)) = &ops[0].1.op else {
        panic!()
    };
    assert_eq!(
        s.identifier,
        "docker-image://docker.io/library/busybox:latest"
    );
}

#[test]
fn copy_from_action_chain_is_flattened() {
    let a = scratch();
    let src_chain = mkfile("/x", 0o644, "x", MkfileOpts::default());
    let st = scratch().file(copy(
        CopySource::Action(a, Box::new(src_chain)),
        "/x",
        "/y",
        CopyOpts::default(),
    ));
    let ops = decode(&st.marshal().unwrap());
    let Some(pb::op::Op::File(f)) = &ops[0].1.op else {
        panic!()
    };
    assert_eq!(ops[0].1.inputs.len(), 0);
    // action 0 = mkfile on scratch; action 1 = copy from action 0 onto scratch.
    assert_eq!((f.actions[0].input, f.actions[0].output), (-1, -1));
    assert_eq!(
        (
            f.actions[1].input,
            f.actions[1].secondary_input,
            f.actions[1].output
        ),
        (-1, 0, 0)
    );
}

#[test]
fn owner_by_name_refers_to_base_input() {
    let base = image("alpine").state();
    let st = base.file(mkdir(
        "/d",
        0o700,
        MkdirOpts::default().owner(ChownOpt::names("nobody", Some("nogroup".into()))),
    ));
    let ops = decode(&st.marshal().unwrap());
    let Some(pb::op::Op::File(f)) = &ops[1].1.op else {
        panic!()
    };
    let Some(pb::file_action::Action::Mkdir(m)) = &f.actions[0].action else {
        panic!()
    };
    let owner = m.owner.as_ref().unwrap();
    match &owner.user.as_ref().unwrap().user {
        Some(pb::user_opt::User::ByName(n)) => {
            assert_eq!(n.name, "nobody");
            assert_eq!(n.input, 0);
        }
        x => panic!("{x:?}"),
    }
}

#[test]
fn exec_outputs_and_caps() {
    let base = image("busybox").state();
    let data = scratch();
    let run = base.run(
        RunOpts::shell("echo hi > /out/x")
            .mount(Mount::bind("/out", &data))
            .mount(Mount::cache("/cache", "c1", CacheSharing::Locked))
            .mount(Mount::secret("/run/secrets/s", "s", false)),
    );
    let out = run.get_mount("/out").unwrap();
    let def = merge(&[run.root(), out]).marshal().unwrap();
    let ops = decode(&def);
    let (ed, eop) = ops
        .iter()
        .find(|(_, o)| matches!(o.op, Some(pb::op::Op::Exec(_))))
        .unwrap();
    let Some(pb::op::Op::Exec(e)) = &eop.op else {
        panic!()
    };
    assert_eq!(
        e.meta.as_ref().unwrap().args,
        vec!["/bin/sh", "-c", "echo hi > /out/x"]
    );
    let outs: Vec<(String, i64, i64)> = e
        .mounts
        .iter()
        .map(|m| (m.dest.clone(), m.input, m.output))
        .collect();
    assert_eq!(
        outs,
        vec![
            ("/".into(), 0, 0),
            ("/out".into(), -1, 1),
            ("/cache".into(), -1, -1),
            ("/run/secrets/s".into(), 0, 0),
        ]
    );
    assert_eq!(
        caps(&def, ed),
        vec![
            "exec.meta.base",
            "exec.mount.bind",
            "exec.mount.cache",
            "exec.mount.cache.sharing",
            "exec.mount.secret"
        ]
    );
    // merge of root (output 0) and /out (output 1)
    let (md, mop) = ops
        .iter()
        .find(|(_, o)| matches!(o.op, Some(pb::op::Op::Merge(_))))
        .unwrap();
    assert_eq!(mop.inputs.len(), 2);
    assert_eq!(mop.inputs[0].index, 0);
    assert_eq!(mop.inputs[1].index, 1);
    assert!(mop.platform.is_none());
    assert_eq!(caps(&def, md), vec!["mergeop"]);
}

#[test]
fn merge_and_diff_shortcuts() {
    let a = local("a").unique_id("u").state();
    assert!(merge(&[]).is_scratch());
    assert!(merge(&[scratch(), scratch()]).is_scratch());
    let one = merge(&[scratch(), a.clone()]);
    assert_eq!(one.marshal().unwrap().def, a.marshal().unwrap().def);
    let d = diff(&scratch(), &a);
    assert_eq!(d.marshal().unwrap().def, a.marshal().unwrap().def);
    let b = local("b").unique_id("u").state();
    let def = diff(&a, &b).marshal().unwrap();
    let ops = decode(&def);
    let (dd, dop) = &ops[2];
    let Some(pb::op::Op::Diff(x)) = &dop.op else {
        panic!()
    };
    assert_eq!(x.lower.as_ref().unwrap().input, 0);
    assert_eq!(x.upper.as_ref().unwrap().input, 1);
    assert_eq!(caps(&def, dd), vec!["diffop"]);
}

#[test]
fn ignore_cache_sets_terminal_cap() {
    let st = local("a").state().ignore_cache();
    let def = st.marshal().unwrap();
    let ops = decode(&def);
    assert!(def.metadata[&ops[0].0].ignore_cache);
    assert!(caps(&def, &ops[1].0).contains(&"meta.ignorecache".to_string()));
}

#[test]
fn shared_inputs_are_emitted_once() {
    let a = local("a").unique_id("u").state();
    let st = a.file(copy(&a, "/x", "/y", CopyOpts::default()));
    let def = st.marshal().unwrap();
    let ops = decode(&def);
    assert_eq!(ops.len(), 3);
    assert_eq!(
        ops[1].1.inputs.len(),
        1,
        "same state deduplicated as one input"
    );
}

#[test]
fn normalize_refs() {
    use crate::source::normalize_ref;
    for (i, o) in [
        ("alpine", "docker.io/library/alpine:latest"),
        ("alpine:3.18", "docker.io/library/alpine:3.18"),
        ("user/img", "docker.io/user/img:latest"),
        ("localhost:5000/img", "localhost:5000/img:latest"),
        ("127.0.0.1:5000/a/b:t", "127.0.0.1:5000/a/b:t"),
        (
            "busybox@sha256:abcd",
            "docker.io/library/busybox@sha256:abcd",
        ),
    ] {
        assert_eq!(normalize_ref(i), o, "{i}");
    }
}

#[test]
fn paths_follow_state_dir() {
    let st = scratch().dir("/a").dir("b/../c");
    assert_eq!(st.get_dir(), "/a/c");
    assert_eq!(clean("/x/../../y/./z/"), "/y/z");
}

fn source_of(st: &State) -> (pb::SourceOp, Vec<String>) {
    let def = st.marshal().unwrap();
    let ops = decode(&def);
    let Some(pb::op::Op::Source(s)) = &ops[0].1.op else {
        panic!()
    };
    assert!(ops[0].1.platform.is_none());
    (s.clone(), caps(&def, &ops[0].0))
}

#[test]
fn git_sources() {
    let (s, c) = source_of(&git("https://github.com/moby/buildkit.git", "v0.11.6").state());
    assert_eq!(s.identifier, "git://github.com/moby/buildkit.git#v0.11.6");
    assert_eq!(
        s.attrs["git.fullurl"],
        "https://github.com/moby/buildkit.git"
    );
    assert_eq!(s.attrs["git.authtokensecret"], "GIT_AUTH_TOKEN");
    assert_eq!(c, vec!["source.git", "source.git.fullurl"]);
    let (s, c) = source_of(&git("github.com/a/b", "").keep_git_dir().state());
    assert_eq!(s.identifier, "git://github.com/a/b");
    assert_eq!(s.attrs["git.fullurl"], "https://github.com/a/b");
    assert_eq!(s.attrs["git.keepgitdir"], "true");
    assert!(c.contains(&"source.git.keepgitdir".to_string()));
    let (s, c) = source_of(&git("git@github.com:a/b.git", "main").state());
    assert_eq!(s.identifier, "git://git@github.com/a/b.git#main");
    assert_eq!(s.attrs["git.mountsshsock"], "default");
    assert!(c.contains(&"source.git.mountsshsock".to_string()));
}

#[test]
fn http_sources() {
    let (s, c) = source_of(
        &http("https://example.com/f.tgz")
            .checksum("sha256:abc")
            .filename("x")
            .perm(0o755)
            .chown(1, 2)
            .state(),
    );
    assert_eq!(s.identifier, "https://example.com/f.tgz");
    assert_eq!(s.attrs["http.perm"], "0755");
    assert_eq!(s.attrs["http.uid"], "1");
    assert_eq!(s.attrs["http.gid"], "2");
    assert_eq!(s.attrs["http.filename"], "x");
    assert_eq!(
        c,
        vec![
            "soruce.http.uidgid",
            "source.http",
            "source.http.checksum",
            "source.http.perm"
        ]
    );
}

#[test]
fn definitions_read_back_into_states() {
    let base = image("busybox").state().custom_name("base");
    let run = base.run(RunOpts::shell("echo hi > /out/x").mount(Mount::bind("/out", &scratch())));
    let out = run.get_mount("/out").unwrap();
    let def = out.marshal().unwrap();
    let st = State::from_definition(&def).unwrap();
    // Same ops, digests and metadata once marshalled again.
    let again = st.marshal().unwrap();
    assert_eq!(again.def, def.def);
    assert_eq!(again.metadata, def.metadata);
    // New ops build on it.
    let copied = scratch().file(copy(&st, "/x", "/y", CopyOpts::default()));
    let ops = decode(&copied.marshal().unwrap());
    let head = &def.def[def.def.len() - 2];
    let head_dgst = format!("sha256:{}", hex::encode(sha2::Sha256::digest(head)));
    assert!(ops.iter().any(|(_, op)| op
        .inputs
        .iter()
        .any(|i| i.digest == head_dgst && i.index == 1)));
    // What a client sends for a nil definition is refused.
    let e = State::from_definition(&pb::Definition::default()).unwrap_err();
    assert!(
        e.to_string()
            .contains("invalid nil input definition to definition op"),
        "{e}"
    );
}

#[test]
fn metadata_of_a_shared_node_is_copied_not_changed() {
    // `base` and `named` share the image op until `named` gets a name: the name must not show
    // on `base`, whether the node was shared (copied) or not (changed in place).
    let base = image("busybox").state();
    let named = base.clone().custom_name("one");
    let desc = |st: &State| {
        let def = st.marshal().unwrap();
        let (dgst, _) = decode(&def).into_iter().next().unwrap();
        def.metadata[&dgst].description.clone()
    };
    assert!(desc(&base).is_empty());
    assert_eq!(desc(&named)["llb.customname"], "one");
    // unshared: the same result as building the node with the name from the start
    let alone = image("busybox").state().custom_name("one");
    assert_eq!(alone.marshal().unwrap(), named.marshal().unwrap());
    drop(base);
    let renamed = named.custom_name("two");
    assert_eq!(desc(&renamed)["llb.customname"], "two");
}
