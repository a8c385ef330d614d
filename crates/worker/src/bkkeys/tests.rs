//! Golden digests from a real stock export (2026-12-07, stock buildkitd v0.11.6 from
//! /work/anchors/bin, `--root /tmp/interop/bkroot --addr unix:///tmp/interop/bk.sock`, config
//! `[registry."127.0.0.1:5000"] http = true`):
//!
//! - base `127.0.0.1:5000/interop/bb:v1`: one layer (static busybox + `sh`, `dd`, `echo`
//!   symlinks), config `Env: ["PATH=/bin"]`, manifest `sha256:75afd3e5…38f9`, diffID
//!   `sha256:2be2a834…87ab`;
//! - context: a `Dockerfile` (mode 0644, uid/gid 0, 131 bytes) of
//!   `FROM 127.0.0.1:5000/interop/bb:v1` / `RUN dd if=/dev/urandom of=/a bs=1M count=4
//!   2>/dev/null && echo one > /one` / `RUN echo two > /two` / `COPY Dockerfile /df`;
//! - `buildctl build --frontend dockerfile.v0 --local context=. --local dockerfile=.
//!   --export-cache type=registry,ref=127.0.0.1:5000/interop/cache:stock1,mode=max`.
//!
//! The exported cache config had six records, each reproduced below: the two image-source
//! records, RUN 1 (linking to both), RUN 2, the content record of the copied file, and COPY
//! (slot 0 → RUN 2, slot 1 → the content record).

use protos::pb;
use protos::pb::file_action::Action;

use super::*;

const MANIFEST: &str = "sha256:75afd3e5424c49fb8bb6671731d5e600b34defa78a91c1a2a04c0629247a38f9";
const DIFF_ID: &str = "sha256:2be2a834f560010132da1f9ac780d969b2e6993e55091b2da34ff71edd8e87ab";
const DOCKERFILE: &str = "FROM 127.0.0.1:5000/interop/bb:v1
RUN dd if=/dev/urandom of=/a bs=1M count=4 2>/dev/null && echo one > /one
RUN echo two > /two
COPY Dockerfile /df
";

fn linux_amd64() -> pb::Platform {
    pb::Platform {
        os: "linux".into(),
        architecture: "amd64".into(),
        ..Default::default()
    }
}

/// A Dockerfile `RUN` as the dockerfile frontend writes it: `/bin/sh -c`, the base image's
/// environment, cwd `/`, one rw root mount of input 0.
fn run(cmd: &str) -> pb::ExecOp {
    pb::ExecOp {
        meta: Some(pb::Meta {
            args: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            remove_mount_stubs_recursive: true,
            ..Default::default()
        }),
        mounts: vec![pb::Mount {
            input: 0,
            dest: "/".into(),
            output: 0,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn copy_dockerfile() -> pb::FileOp {
    pb::FileOp {
        actions: vec![pb::FileAction {
            input: 0,
            secondary_input: 1,
            output: 0,
            action: Some(Action::Copy(pb::FileActionCopy {
                src: "/Dockerfile".into(),
                dest: "/df".into(),
                mode: -1,
                follow_symlink: true,
                dir_copy_contents: true,
                create_dest_path: true,
                allow_wildcard: true,
                allow_empty_wildcard: true,
                timestamp: -1,
                ..Default::default()
            })),
        }],
    }
}

#[test]
fn image_source_records_match_stock() {
    let by_manifest = image_manifest_key(MANIFEST, "linux", "amd64", "", None);
    assert_eq!(
        root_key(&source_key(&by_manifest).unwrap(), 0),
        "sha256:47d425c3a51eed124700d97146c0b54071c8b73495eae05714b3fa950ee7db48"
    );
    let by_config = image_config_key(&[DIFF_ID.to_string()], None).unwrap();
    assert_eq!(by_config, DIFF_ID, "the ChainID of one layer is its diffID");
    assert_eq!(
        root_key(&source_key(&by_config).unwrap(), 0),
        "sha256:46aef56ca724ae4f4ffad53284525f512fe75ae8bc6638a84861144bcef78e56"
    );
}

#[test]
fn dockerfile_runs_match_stock() {
    let p = linux_amd64();
    let run1 = run("dd if=/dev/urandom of=/a bs=1M count=4 2>/dev/null && echo one > /one");
    assert_eq!(
        root_key(&exec_cache_map(&run1, Some(&p)).unwrap(), 0),
        "sha256:64e6ee8fbdefdb27a56653894df4fa506d14068dc32cf5b713fd29b2c6ebf45b"
    );
    let run2 = run("echo two > /two");
    assert_eq!(
        root_key(&exec_cache_map(&run2, Some(&p)).unwrap(), 0),
        "sha256:294a35e4fbfd1744611325ef5402c1bce4ec386bf0c194e7e58db44e76872ebd"
    );
    // No platform on the op: stock uses its host's (linux/amd64 on this machine).
    if host_arch() == "amd64" {
        assert_eq!(exec_cache_map(&run2, None), exec_cache_map(&run2, Some(&p)));
    }
}

#[test]
fn dockerfile_copy_matches_stock() {
    assert_eq!(
        root_key(&file_cache_map(&copy_dockerfile(), 2).unwrap(), 0),
        "sha256:c3683cc92effcfcc5db999181ced1d8dbb770872159f6ffd5373c24a86f88457"
    );
}

#[test]
fn copied_file_content_record_matches_stock() {
    let st = EntryStat {
        mode: libc::S_IFREG | 0o644,
        size: DOCKERFILE.len() as u64,
        ..Default::default()
    };
    let sum = file_content_checksum(&st, DOCKERFILE.as_bytes());
    assert_eq!(
        content_key(&[sum]),
        "sha256:9fcafc423f99ff9fb0877f5ff70d29e0cf7d79b222e455dcde1e48edf49128ee"
    );
}

#[test]
fn non_default_mounts_are_part_of_the_key() {
    let p = linux_amd64();
    let base = run("true");
    let mut ro = base.clone();
    ro.mounts[0].readonly = true;
    let mut with_selector = base.clone();
    with_selector.mounts[0].selector = "/x".into();
    let mut extra = base.clone();
    extra.mounts.push(pb::Mount {
        input: 1,
        dest: "/src".into(),
        output: -1,
        readonly: true,
        ..Default::default()
    });
    let k = |e: &pb::ExecOp| exec_cache_map(e, Some(&p)).unwrap();
    assert_ne!(k(&base), k(&ro));
    assert_ne!(k(&base), k(&extra));
    // Stock clears selectors before hashing (they go into the links instead).
    assert_eq!(k(&base), k(&with_selector));
}

#[test]
fn cleared_fields_do_not_change_the_key() {
    let p = linux_amd64();
    let base = run("true");
    let mut proxied = base.clone();
    let meta = proxied.meta.as_mut().unwrap();
    meta.proxy_env = Some(pb::ProxyEnv {
        http_proxy: "http://proxy".into(),
        ..Default::default()
    });
    let mut h1 = base.clone();
    h1.meta.as_mut().unwrap().extra_hosts = vec![pb::HostIp {
        host: "h".into(),
        ip: "10.0.0.1".into(),
    }];
    let mut h2 = h1.clone();
    h2.meta.as_mut().unwrap().extra_hosts[0].ip = "10.0.0.2".into();
    let k = |e: &pb::ExecOp| exec_cache_map(e, Some(&p)).unwrap();
    assert_eq!(k(&base), k(&proxied));
    assert_eq!(k(&h1), k(&h2));
    assert_ne!(k(&base), k(&h1));
}

#[test]
fn fields_stock_lacks_have_no_key() {
    let mut e = run("true");
    e.meta.as_mut().unwrap().valid_exit_codes = vec![0, 1];
    assert_eq!(exec_cache_map(&e, None), None);
    let mut f = copy_dockerfile();
    if let Some(Action::Copy(c)) = &mut f.actions[0].action {
        c.mode_str = "u+x".into();
    }
    assert_eq!(file_cache_map(&f, 2), None);
}

#[test]
fn session_sources_have_no_key() {
    assert_eq!(source_key("session:abc"), None);
    assert!(source_key("local://context").is_some());
}

#[test]
fn go_json_escapes_like_go_1_19() {
    let cases = [
        ("a<b>&c", r#""a\u003cb\u003e\u0026c""#),
        ("q\"\\", r#""q\"\\""#),
        ("\n\r\t", r#""\n\r\t""#),
        ("\u{8}\u{c}\u{1}", r#""\u0008\u000c\u0001""#),
        ("\u{2028}\u{2029}é", "\"\\u2028\\u2029é\""),
    ];
    for (input, want) in cases {
        let mut out = String::new();
        go_string(&mut out, input);
        assert_eq!(out, want, "{input:?}");
    }
}

#[test]
fn go_json_objects_and_arrays() {
    let mut j = GoJson::default();
    j.begin();
    j.key("a").int(1);
    j.key("b").array(&[1i64, 2], |j, i| {
        j.int(*i);
    });
    j.key("c");
    j.begin();
    j.str_omit("empty", "");
    j.bool_omit("t", true);
    j.end();
    j.end();
    assert_eq!(j.0, r#"{"a":1,"b":[1,2],"c":{"t":true}}"#);
}

#[test]
fn path_base_like_go() {
    for (p, want) in [
        ("", "."),
        ("/", "/"),
        ("///", "/"),
        ("/Dockerfile", "Dockerfile"),
        ("a/b/", "b"),
        ("dir/*.txt", "*.txt"),
        ("x", "x"),
    ] {
        assert_eq!(go_path_base(p), want, "{p:?}");
    }
}

#[test]
fn default_index_chains() {
    assert!(default_indexes(&[[0, 1, 0]]));
    assert!(default_indexes(&[[0, -1, -1], [2, 1, 0]]));
    assert!(!default_indexes(&[]));
    assert!(!default_indexes(&[[1, 0, 0]]));
    assert!(!default_indexes(&[[0, 1, -1], [2, 1, 0], [1, -1, 0]]));
}

#[test]
fn config_key_is_the_chain_id() {
    let a = "sha256:aaaa".to_string();
    let b = "sha256:bbbb".to_string();
    let chain = image_config_key(&[a.clone(), b.clone()], None).unwrap();
    assert_eq!(chain, sha256_digest(format!("{a} {b}").as_bytes()));
    assert_eq!(image_config_key(&[a.clone(), b], Some(1)), Some(a));
    assert_eq!(image_config_key(&[], None), None);
}

#[test]
fn tarsum_header_fields() {
    let st = EntryStat {
        mode: libc::S_IFLNK | 0o755,
        uid: 1,
        gid: 2,
        size: 9,
        linkname: "target".into(),
        xattrs: vec![
            ("user.b".into(), b"2".to_vec()),
            ("security.selinux".into(), b"x".to_vec()),
            ("security.capability".into(), b"c".to_vec()),
            ("user.a".into(), b"1".to_vec()),
        ],
        ..Default::default()
    };
    assert_eq!(
        String::from_utf8(tarsum_header(&st)).unwrap(),
        "namemode511uid1gid2size0typeflag2linknametargetunamegnamedevmajor0devminor0\
         security.capabilitycuser.a1user.b2"
    );
}

/// The context of a second stock export (2026-12-08, stock buildkitd v0.11.6,
/// `--export-cache type=registry,mode=max` through `dockerfile.v0`, Dockerfile `… COPY
/// hello.txt /hello.txt` / `COPY dir/ /dst/` / `COPY *.txt /dst/`), every entry owned by 0:0:
/// `hello.txt` (`hi\n`), `other.txt` (`other\n`), `notes.md` (`md\n`), all 0644; `dir/`
/// 0755 with `a` (`a\n`, 0644), `link -> a`, and `sub/` 0750 with `b` (`b\n`, 0644).
fn entry(mode: u32, data: &[u8]) -> String {
    let st = EntryStat {
        mode,
        size: data.len() as u64,
        ..Default::default()
    };
    file_content_checksum(&st, data)
}

fn dir_header(perm: u32) -> String {
    entry(libc::S_IFDIR | perm, b"")
}

/// `COPY dir/ /dst/`: stock's content record of the context (`sha256:3d2ee6e8…`) is that of
/// the directory checksum: its header, then each child by name, a subdirectory recursively
/// and a symlink by its target.
#[test]
fn directory_content_record_matches_stock() {
    let link = file_content_checksum(
        &EntryStat {
            mode: libc::S_IFLNK | 0o777,
            linkname: "a".into(),
            ..Default::default()
        },
        b"",
    );
    let sub = dir_content_checksum(
        &dir_header(0o750),
        &[(b"b".to_vec(), entry(libc::S_IFREG | 0o644, b"b\n"))],
    );
    let dir = dir_content_checksum(
        &dir_header(0o755),
        &[
            (b"a".to_vec(), entry(libc::S_IFREG | 0o644, b"a\n")),
            (b"link".to_vec(), link),
            (b"sub".to_vec(), sub),
        ],
    );
    assert_eq!(
        content_key(&[dir]),
        "sha256:3d2ee6e829ee8a097484d920768e12b059658597ad3aaf45509e44ef4dfb032c"
    );
}

/// `COPY *.txt /dst/`: the wildcard takes `hello.txt` and `other.txt` (not `notes.md`);
/// stock's content record (`sha256:01a05812…`) hashes each match's base name and checksum.
#[test]
fn wildcard_content_record_matches_stock() {
    let included = [
        (
            "/hello.txt".to_string(),
            entry(libc::S_IFREG | 0o644, b"hi\n"),
        ),
        (
            "/other.txt".to_string(),
            entry(libc::S_IFREG | 0o644, b"other\n"),
        ),
    ];
    assert_eq!(
        content_key(&[wildcard_checksum("/*.txt", &included)]),
        "sha256:01a05812237b5e313cb4326896220874379c5fccea24bf977fcceda9d4812fcd"
    );
    // No match: the digest of nothing; one match named like the pattern: its own checksum.
    assert_eq!(wildcard_checksum("/*.none", &[]), sha256_digest(b""));
    let one = [included[0].clone()];
    assert_eq!(wildcard_checksum("/hello.txt", &one), one[0].1);
}

/// The same file checksum whether the data comes as bytes or from a reader.
#[test]
fn file_checksum_from_reader() {
    let st = EntryStat {
        mode: libc::S_IFREG | 0o600,
        size: 5,
        ..Default::default()
    };
    assert_eq!(
        file_content_checksum_from(&st, &mut &b"hello"[..]).unwrap(),
        file_content_checksum(&st, b"hello")
    );
}

fn copy(src: &str, wildcard: bool) -> pb::FileActionCopy {
    pb::FileActionCopy {
        src: src.into(),
        follow_symlink: true,
        allow_wildcard: wildcard,
        ..Default::default()
    }
}

/// Stock's selectors of an input: literal paths deduplicated (a path below another one
/// dropped), wildcards kept, all sorted by path; patterns or mixed symlink following: none.
#[test]
fn copy_selectors_like_stock() {
    assert_eq!(
        copy_selectors(&[
            copy("/b", true),
            copy("/a/x", true),
            copy("/*.txt", true),
            copy("/a", true),
            copy("/b", true),
        ]),
        Some(vec![
            ("/*.txt".to_string(), true),
            ("/a".to_string(), false),
            ("/b".to_string(), false),
        ])
    );
    // A wildcard character without allow_wildcard is a literal name.
    assert_eq!(
        copy_selectors(&[copy("/a*", false)]),
        Some(vec![("/a*".to_string(), false)])
    );
    let mut patterned = copy("/a", true);
    patterned.include_patterns = vec!["x".into()];
    assert_eq!(copy_selectors(&[patterned]), None);
    let mut nofollow = copy("/b", true);
    nofollow.follow_symlink = false;
    assert_eq!(copy_selectors(&[copy("/a", true), nofollow]), None);
}
