use super::*;

fn one(src: &str) -> Result<Instruction, String> {
    let r = crate::parser::parse(src.as_bytes()).map_err(|e| e.message)?;
    parse_instruction(&r.children[0]).map_err(|e| e.message)
}

fn cmd(src: &str) -> Command {
    match one(src).unwrap() {
        Instruction::Command(c) => c,
        Instruction::Stage(s) => panic!("stage {s:?}"),
    }
}

#[test]
fn from_stages() {
    let Instruction::Stage(s) = one("FROM --platform=$BUILDPLATFORM golang:1.20 AS Build").unwrap()
    else {
        panic!()
    };
    assert_eq!(s.name, "build");
    assert_eq!(s.base_name, "golang:1.20");
    assert_eq!(s.platform, "$BUILDPLATFORM");
    assert_eq!(
        s.source_code,
        "FROM --platform=$BUILDPLATFORM golang:1.20 AS Build"
    );
    let errs = [
        ("FROM a b", "FROM requires either one or three arguments"),
        (
            "FROM a AS 1x",
            "invalid name for build stage: \"1x\", name can't start with a number or contain symbols",
        ),
        ("FROM --platfom=x a", "unknown flag: platfom (did you mean platform?)"),
    ];
    for (src, msg) in errs {
        assert_eq!(one(src).unwrap_err(), msg, "{src}");
    }
}

#[test]
fn copy_add_flags_and_heredocs() {
    let Command::Copy(c) = cmd("COPY --from=build --chown=1:2 --chmod=755 --link a b /dst/") else {
        panic!()
    };
    assert_eq!(c.from, "build");
    assert_eq!(
        (c.chown.as_str(), c.chmod.as_str(), c.link),
        ("1:2", "755", true)
    );
    assert_eq!(c.sources.source_paths, vec!["a", "b"]);
    assert_eq!(c.sources.dest_path, "/dst/");
    let Command::Copy(c) = cmd("COPY <<A <<-'B' /d\nx $v\nA\n\ty\nB\n") else {
        panic!()
    };
    assert_eq!(
        c.sources.source_contents,
        vec![
            SourceContent {
                path: "A".into(),
                data: "x $v\n".into(),
                expand: true
            },
            SourceContent {
                path: "B".into(),
                data: "y\n".into(),
                expand: false
            },
        ]
    );
    assert_eq!(
        one("COPY a").unwrap_err(),
        "COPY requires at least two arguments, but only one was provided. Destination could not be determined"
    );
    assert_eq!(
        one("COPY a <<EOF\nx\nEOF\n").unwrap_err(),
        "COPY cannot accept a heredoc as a destination"
    );
    assert_eq!(
        one("COPY --keep-git-dir a b").unwrap_err(),
        "unknown flag: keep-git-dir"
    );
    let Command::Add(a) = cmd("ADD --keep-git-dir --checksum=sha256:x u /d") else {
        panic!()
    };
    assert!(a.keep_git_dir);
    assert_eq!(a.checksum, "sha256:x");
}

#[test]
fn run_forms_and_flags() {
    let Command::Run(r) = cmd("RUN --mount=type=cache,target=/c --network=none echo $x") else {
        panic!()
    };
    assert_eq!(r.cmd.cmd_line, vec!["echo $x"]);
    assert!(r.cmd.prepend_shell);
    assert_eq!(r.network, "none");
    assert_eq!(r.mount_values, vec!["type=cache,target=/c"]);
    let mut used = r.flags_used.clone();
    used.sort();
    assert_eq!(used, vec!["mount", "network"]);
    let Command::Run(r) = cmd("RUN [\"a\", \"b\"]") else {
        panic!()
    };
    assert_eq!(r.cmd.cmd_line, vec!["a", "b"]);
    assert!(!r.cmd.prepend_shell);
    assert_eq!(
        one("RUN --network=bridge x").unwrap_err(),
        "invalid network mode \"bridge\""
    );
    assert_eq!(
        one("RUN --security=insecure x").unwrap_err(),
        "unknown flag: security"
    );
    let Command::Run(r) = cmd("RUN <<EOF\necho\nEOF\n") else {
        panic!()
    };
    assert_eq!(r.cmd.cmd_line, vec!["<<EOF"]);
    assert_eq!(r.cmd.files[0].data, "echo\n");
}

#[test]
fn metadata_instructions() {
    assert_eq!(
        cmd("ENV a=1 b=\"x y\""),
        Command::Env(
            Meta {
                code: "ENV a=1 b=\"x y\"".into(),
                name: "ENV".into(),
                location: crate::parser::to_ranges(1, 1)
            },
            vec![
                KeyValuePair {
                    key: "a".into(),
                    value: "1".into()
                },
                KeyValuePair {
                    key: "b".into(),
                    value: "\"x y\"".into()
                }
            ]
        )
    );
    let Command::Expose(_, p) = cmd("EXPOSE 8080 80/udp 443") else {
        panic!()
    };
    assert_eq!(p, vec!["443", "80/udp", "8080"]);
    let Command::Arg(_, a) = cmd("ARG A B=c") else {
        panic!()
    };
    assert_eq!(a[0].value, None);
    assert_eq!(a[1].value.as_deref(), Some("c"));
    let Command::Onbuild(_, e) = cmd("  onbuild   RUN echo hi") else {
        panic!()
    };
    assert_eq!(e, "RUN echo hi");
    let Command::Onbuild(_, e) = cmd("ONBUILD RUN <<EOF\nbody\nEOF\n") else {
        panic!()
    };
    assert_eq!(e, "RUN <<EOF\nbody\nEOF");
    let Command::Shell(_, s) = cmd("SHELL [\"/bin/bash\", \"-c\"]") else {
        panic!()
    };
    assert_eq!(s, vec!["/bin/bash", "-c"]);
    let Command::Healthcheck(_, h) =
        cmd("HEALTHCHECK --interval=5s --retries=3 CMD curl -f http://x/")
    else {
        panic!()
    };
    assert_eq!(
        h,
        HealthConfig {
            test: vec!["CMD-SHELL".into(), "curl -f http://x/".into()],
            interval: 5_000_000_000,
            timeout: 0,
            start_period: 0,
            retries: 3
        }
    );
}

#[test]
fn instruction_errors() {
    let cases = [
        ("FRM a", "unknown instruction: FRM (did you mean FROM?)"),
        ("frmo a", "unknown instruction: frmo (did you mean from?)"),
        ("ENV", "ENV requires at least one argument"),
        ("WORKDIR", "WORKDIR requires exactly one argument"),
        ("USER", "USER requires exactly one argument"),
        (
            "SHELL /bin/sh -c",
            "SHELL requires the arguments to be in JSON form",
        ),
        (
            "ONBUILD ONBUILD RUN x",
            "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed",
        ),
        ("ONBUILD FROM x", "FROM isn't allowed as an ONBUILD trigger"),
        ("HEALTHCHECK NONE x", "HEALTHCHECK NONE takes no arguments"),
        (
            "HEALTHCHECK FOO x",
            "Unknown type \"FOO\" in HEALTHCHECK (try CMD)",
        ),
        ("HEALTHCHECK CMD", "Missing command after HEALTHCHECK CMD"),
        (
            "HEALTHCHECK --interval=1ns CMD x",
            "Interval \"interval\" cannot be less than 1ms",
        ),
        (
            "HEALTHCHECK --retries=-1 CMD x",
            "--retries cannot be negative (-1)",
        ),
        ("ARG =x", "ARG names can not be blank"),
        ("LABEL =x", "LABEL names can not be blank"),
        ("COPY --chown a b", "missing a value on flag: chown"),
        (
            "RUN --mount=type=bind,from=$X x",
            "'from' doesn't support variable expansion, define alias stage instead",
        ),
    ];
    for (src, msg) in cases {
        assert_eq!(one(src).unwrap_err(), msg, "{src}");
    }
}

#[test]
fn stages_and_meta_args() {
    let src = "ARG V=1\n# base the base\nFROM a:$V AS base\nRUN x\nARG Y\nFROM base\nCOPY --from=base / /\n";
    let r = crate::parser::parse(src.as_bytes()).unwrap();
    let (stages, meta) = parse(&r.children).unwrap();
    assert_eq!(meta.len(), 1);
    assert_eq!(stages.len(), 2);
    assert_eq!(stages[0].comment, "the base");
    assert_eq!(stages[0].commands.len(), 2);
    assert_eq!(stages[1].base_name, "base");
    let r = crate::parser::parse(b"FROM a\nFOO x\n").unwrap();
    let e = parse(&r.children).unwrap_err();
    assert_eq!(
        e.message,
        "dockerfile parse error on line 2: unknown instruction: FOO (did you mean FROM?)"
    );
    assert_eq!(e.location, crate::parser::to_ranges(2, 2));
    let r = crate::parser::parse(b"RUN x\n").unwrap();
    assert_eq!(
        parse(&r.children).unwrap_err().message,
        "no build stage in current context"
    );
}

#[test]
fn expansion() {
    let env = crate::shell::build_envs(&["A=1", "D=/dst"]);
    let lex = crate::shell::Lex::new('\\');
    let word = |w: &str| {
        lex.process_word_with_map(w, &env)
            .map_err(|e| e.to_string())
    };
    let mut raw_lex = crate::shell::Lex::new('\\');
    raw_lex.skip_process_quotes = true;
    let raw = |w: &str| {
        raw_lex
            .process_word_with_map(w, &env)
            .map_err(|e| e.to_string())
    };
    let mut c = cmd("COPY --chown=$A --from=$A <<E ${D}\n'$A'\nE\n");
    c.expand(&word, &raw).unwrap();
    let Command::Copy(c) = c else { panic!() };
    assert_eq!(c.chown, "1");
    assert_eq!(c.from, "$A", "--from is not expanded");
    assert_eq!(c.sources.dest_path, "/dst");
    assert_eq!(c.sources.source_contents[0].data, "'1'\n");
    let mut r = cmd("RUN --mount=type=cache,target=$D x");
    r.expand(&word, &raw).unwrap();
    let Command::Run(r) = r else { panic!() };
    assert_eq!(r.mounts[0].target, "/dst");
    assert_eq!(r.mounts[0].mount_type, "cache");
}
