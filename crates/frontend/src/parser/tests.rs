use super::*;

fn dump(src: &str) -> String {
    let r = parse(src.as_bytes()).unwrap_or_else(|e| panic!("{src:?}: {e}"));
    r.children
        .iter()
        .map(|c| format!("({})", c.dump()))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn instruction_forms() {
    let cases: &[(&str, &str)] = &[
        ("FROM busybox AS base", "(from \"busybox\" \"AS\" \"base\")"),
        ("run echo  hi", "(run \"echo  hi\")"),
        ("RUN [\"a\", \"b c\"]", "(run \"a\" \"b c\")"),
        ("RUN ['a']", "(run \"['a']\")"),
        ("COPY [\"a\", \"/b\"]", "(copy \"a\" \"/b\")"),
        (
            "COPY --chown=1 a  b   /c/",
            "(copy [\"--chown=1\"] \"a\" \"b\" \"/c/\")",
        ),
        ("ENV A B C", "(env \"A\" \"B C\")"),
        (
            "ENV A=1 B=\"2 3\"",
            "(env \"A\" \"1\" \"B\" \"\\\"2 3\\\"\")",
        ),
        ("LABEL a=b", "(label \"a\" \"b\")"),
        ("ARG X Y=z", "(arg \"X\" \"Y=z\")"),
        ("EXPOSE 80 443/tcp", "(expose \"80\" \"443/tcp\")"),
        ("VOLUME /a /b", "(volume \"/a\" \"/b\")"),
        ("USER me:grp", "(user \"me:grp\")"),
        ("WORKDIR /w x", "(workdir \"/w x\")"),
        ("ONBUILD RUN echo x", "(onbuild (run \"echo x\"))"),
        (
            "HEALTHCHECK --interval=5s CMD [\"true\"]",
            "(healthcheck [\"--interval=5s\"] \"CMD\" \"true\")",
        ),
        ("HEALTHCHECK NONE", "(healthcheck \"NONE\")"),
        (
            "SHELL [\"/bin/bash\", \"-c\"]",
            "(shell \"/bin/bash\" \"-c\")",
        ),
        ("FOO bar", "(foo \"\")"),
        ("CMD", "(cmd)"),
    ];
    for (src, want) in cases {
        assert_eq!(dump(src), *want, "{src:?}");
    }
}

#[test]
fn continuations_comments_and_lines() {
    let src =
        "FROM a\n\n# comment \\\nRUN echo 1 \\\n  # inner comment\n  && echo 2\nRUN x \\\n\n  y\n";
    let r = parse(src.as_bytes()).unwrap();
    assert_eq!(r.children.len(), 3);
    assert_eq!(r.children[1].dump(), "run \"echo 1   && echo 2\"");
    assert_eq!((r.children[1].start_line, r.children[1].end_line), (4, 6));
    assert_eq!(r.children[1].prev_comment, vec!["comment \\"]);
    assert_eq!(r.children[2].dump(), "run \"x   y\"");
    assert_eq!(r.warnings.len(), 1);
    assert_eq!(
        r.warnings[0].short,
        "Empty continuation line found in: RUN x   y"
    );
    assert_eq!(r.warnings[0].location, Some(Range::line(9)));
    assert_eq!(r.children[2].location(), to_ranges(7, 9));
}

#[test]
fn escape_directive() {
    let src = "# escape=`\nFROM a\nRUN dir c:\\ `\n  && x\n";
    let r = parse(src.as_bytes()).unwrap();
    assert_eq!(r.escape_token, '`');
    assert_eq!(r.children[1].dump(), "run \"dir c:\\\\   && x\"");
    // a directive after the first instruction is a comment
    let r = parse(b"FROM a\n# escape=`\nRUN x \\\n y\n").unwrap();
    assert_eq!(r.escape_token, '\\');
    let e = parse(b"# escape=x\nFROM a\n").unwrap_err();
    assert_eq!(e.message, "invalid escape token 'x' does not match ` or \\");
    assert_eq!(e.location, vec![Range::line(0)]);
    let e = parse(b"# escape=`\n# escape=\\\nFROM a\n").unwrap_err();
    assert_eq!(e.message, "only one escape parser directive can be used");
}

#[test]
fn double_escape_does_not_continue() {
    let r = parse(b"FROM a\nRUN echo \\\\\nRUN b\n").unwrap();
    assert_eq!(r.children.len(), 3);
}

#[test]
fn heredocs() {
    let src = "FROM a\nRUN <<EOF\necho hi\nEOF\nCOPY <<-\"A\" <<B /dst/\n\tline\n\tA\nb\nB\nRUN [\"x\"] <<EOF\n";
    let r = parse(src.as_bytes()).unwrap();
    let run = &r.children[1];
    assert_eq!(run.heredocs.len(), 1);
    assert_eq!(
        run.heredocs[0],
        Heredoc {
            name: "EOF".into(),
            file_descriptor: 0,
            expand: true,
            chomp: false,
            content: "echo hi\n".into()
        }
    );
    assert_eq!((run.start_line, run.end_line), (2, 4));
    let copy = &r.children[2];
    assert_eq!(copy.heredocs.len(), 2);
    assert_eq!(copy.heredocs[0].name, "A");
    assert!(!copy.heredocs[0].expand && copy.heredocs[0].chomp);
    assert_eq!(copy.heredocs[0].content, "\tline\n");
    assert_eq!(copy.heredocs[1].content, "b\n");
    assert_eq!(copy.end_line, 9);
    // JSON form takes no heredoc
    assert!(r.children[3].heredocs.is_empty());

    let e = parse(b"FROM a\nRUN <<EOF\nno end\n").unwrap_err();
    assert_eq!(e.message, "unterminated heredoc");
    assert_eq!(e.location, to_ranges(2, 3));
    let r = parse(b"FROM a\nONBUILD RUN <<X\nbody\nX\n").unwrap();
    assert_eq!(r.children[1].heredocs[0].content, "body\n");
}

#[test]
fn heredoc_words() {
    type Want<'a> = Option<(&'a str, u32, bool, bool)>;
    let cases: &[(&str, Want<'_>)] = &[
        ("<<EOF", Some(("EOF", 0, true, false))),
        ("<<-EOF", Some(("EOF", 0, true, true))),
        ("3<<EOF", Some(("EOF", 3, true, false))),
        ("<<'EOF'", Some(("EOF", 0, false, false))),
        ("<<\"E\"OF", Some(("EOF", 0, false, false))),
        ("<<\\EOF", Some(("EOF", 0, true, false))),
        ("<<", None),
        ("<<<EOF", None),
        ("x<<EOF", None),
        ("<<A B", None),
    ];
    for (w, want) in cases {
        let got = parse_heredoc(w).unwrap();
        assert_eq!(
            got.as_ref()
                .map(|h| (h.name.as_str(), h.file_descriptor, h.expand, h.chomp)),
            *want,
            "{w:?}"
        );
    }
    assert_eq!(chomp_heredoc_content("\t\ta\n\tb\nc\t\n"), "a\nb\nc\t\n");
}

#[test]
fn errors_and_limits() {
    let e = parse(b"# just a comment\n\n").unwrap_err();
    assert_eq!(e.message, "file with no instructions");
    let e = parse(b"FROM a\nRUN [1]\n").unwrap_err();
    assert_eq!(
        e.message,
        "when using JSON array syntax, arrays must be comprised of strings only"
    );
    assert_eq!(e.location, vec![Range::line(2)]);
    let e = parse(b"FROM a\nENV X\n").unwrap_err();
    assert_eq!(e.message, "ENV must have two arguments");
    let e = parse(b"FROM a\nLABEL a=b c\n").unwrap_err();
    assert_eq!(
        e.message,
        "Syntax error - can't find = in \"c\". Must be of the form: name=value"
    );
    let mut long = b"FROM a\nRUN ".to_vec();
    long.extend(std::iter::repeat_n(b'x', 70_000));
    let e = parse(&long).unwrap_err();
    assert_eq!(
        e.message,
        "dockerfile line greater than max allowed size of 65535"
    );
}

#[test]
fn bom_and_crlf() {
    let r = parse(b"\xef\xbb\xbfFROM a\r\nRUN b \\\r\n c\r\n").unwrap();
    assert_eq!(r.children[0].dump(), "from \"a\"");
    assert_eq!(r.children[1].dump(), "run \"b  c\"");
}

#[test]
fn go_quoting() {
    assert_eq!(go_quote("a\"b\\c\n\t\u{1}é"), "\"a\\\"b\\\\c\\n\\t\\x01é\"");
    assert_eq!(
        go_quote_list(&["a".into(), "b c".into()]),
        "[\"a\" \"b c\"]"
    );
}
