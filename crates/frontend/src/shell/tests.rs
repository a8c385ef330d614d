use super::*;

fn env() -> Vec<&'static str> {
    vec!["PWD=/home", "SHELL=bash", "EMPTY=", "SPACED=a  b ", "E2=x"]
}

#[test]
fn process_word_table() {
    let lex = Lex::new('\\');
    // (input, expected output, or None for an error)
    let cases: &[(&str, Option<&str>)] = &[
        ("plain", Some("plain")),
        ("a'b'c", Some("abc")),
        ("a'bc", None),
        ("a\\'bc", Some("a'bc")),
        ("x\\ty", Some("xty")),
        ("\"x\\ty\"", Some("x\\ty")),
        ("'x\\ty'", Some("x\\ty")),
        ("end\\", Some("end")),
        ("end\\\\", Some("end\\")),
        ("\"open", None),
        ("'open", None),
        ("$.", Some("$.")),
        ("v$1x", Some("vx")),
        ("at$PWD", Some("at/home")),
        ("at\\$PWD", Some("at$PWD")),
        ("\"at\\$PWD\"", Some("at$PWD")),
        ("\"at\\\\$PWD\"", Some("at\\/home")),
        ("${}", None),
        ("x${.}", None),
        ("${unset}y", Some("y")),
        ("${PWD}y", Some("/homey")),
        ("${unset:-dflt}", Some("dflt")),
        ("${EMPTY:-dflt}", Some("dflt")),
        ("${PWD:-dflt}", Some("/home")),
        ("${unset:-${PWD:-n}}", Some("/home")),
        ("${PWD:+alt}", Some("alt")),
        ("${EMPTY:+alt}", Some("")),
        ("${unset:+alt}", Some("")),
        ("${unset:x}", None),
        ("${unset?}", None),
        ("${unset:?}", None),
        ("${EMPTY:?}", None),
        ("${EMPTY?}", Some("")),
        ("${PWD:?must}", Some("/home")),
        ("${PWD", None),
        ("${PWD:-x", None),
        ("$$", Some("")),
        ("'$PWD'", Some("$PWD")),
        ("\"'$PWD'\"", Some("'/home'")),
    ];
    for (input, want) in cases {
        let got = lex.process_word(input, &env());
        match want {
            Some(w) => assert_eq!(got.as_deref(), Ok(*w), "input {input:?}"),
            None => assert!(got.is_err(), "input {input:?} gave {got:?}"),
        }
    }
}

#[test]
fn error_messages() {
    let lex = Lex::new('\\');
    let cases = [
        ("${x:?boom}", "failed to process \"${x:?boom}\": x: boom"),
        (
            "${x?}",
            "failed to process \"${x?}\": x: is not allowed to be unset",
        ),
        (
            "${EMPTY:?}",
            "failed to process \"${EMPTY:?}\": EMPTY: is not allowed to be empty",
        ),
        ("${}", "failed to process \"${}\": syntax error: bad substitution"),
        ("${a", "failed to process \"${a\": missing ':' in substitution"),
        ("${a:-x", "failed to process \"${a:-x\": syntax error: missing '}'"),
        (
            "${a:!b}",
            "failed to process \"${a:!b}\": unsupported modifier (!) in substitution",
        ),
        ("${a#b}", "failed to process \"${a#b}\": missing ':' in substitution"),
        (
            "'x",
            "failed to process \"'x\": unexpected end of statement while looking for matching single-quote",
        ),
    ];
    for (input, msg) in cases {
        let e = lex.process_word(input, &env()).unwrap_err();
        assert_eq!(e.to_string(), msg);
    }
}

#[test]
fn words_split_after_expansion() {
    let lex = Lex::new('\\');
    let cases: &[(&str, &[&str])] = &[
        ("a b", &["a", "b"]),
        ("x${SPACED}y", &["xa", "b", "y"]),
        ("x\"${SPACED}\"y", &["xa  b y"]),
        ("a\\ b", &["a b"]),
        ("a\\\" b", &["a\"", "b"]),
        ("'' x", &["x"]),
        ("  lead", &["lead"]),
    ];
    for (input, want) in cases {
        let got = lex.process_words(input, &env()).unwrap();
        assert_eq!(got, *want, "input {input:?}");
    }
}

#[test]
fn backtick_escape() {
    let lex = Lex::new('`');
    assert_eq!(lex.process_word("a`$PWD", &env()).unwrap(), "a$PWD");
    assert_eq!(lex.process_word("a\\b", &env()).unwrap(), "a\\b");
}

#[test]
fn raw_modes_keep_text() {
    let mut lex = Lex::new('\\');
    lex.raw_quotes = true;
    lex.skip_unset_env = true;
    assert_eq!(
        lex.process_word("'q' \"$PWD\" $nope ${nope:-d} ${nope}", &env())
            .unwrap(),
        "'q' \"/home\" $nope ${nope:-d} ${nope}"
    );
    lex.raw_escapes = true;
    assert_eq!(
        lex.process_words("<<\\EOF", &Vec::<String>::new()).unwrap(),
        vec!["<<\\EOF"]
    );
    let mut lex = Lex::new('\\');
    lex.skip_process_quotes = true;
    assert_eq!(lex.process_word("'$PWD'", &env()).unwrap(), "'/home'");
}

#[test]
fn matches_record_found_names() {
    let lex = Lex::new('\\');
    let envs = build_envs(&env());
    let (w, m) = lex
        .process_word_with_matches("$PWD-${nope}-${E2:-z}", &envs)
        .unwrap();
    assert_eq!(w, "/home--x");
    assert_eq!(m.into_iter().collect::<Vec<_>>(), vec!["E2", "PWD"]);
}

#[test]
fn build_envs_last_wins() {
    let m = build_envs(&["A=1", "B", "A=2=3"]);
    assert_eq!(m["A"], "2=3");
    assert_eq!(m["B"], "");
}

proptest::proptest! {
    /// The shortcut for words without anything to expand, and expansion without collecting the
    /// split words, give what the full scan gives, with every lexer variant, for words of
    /// ordinary characters, (Unicode) spaces, variable names and references and the characters
    /// that make a word not literal.
    #[test]
    fn literal_shortcut_matches_full_scan(
        word in "(PWD|SPACED|EMPTY|[a-zA-Z0-9_/=,.:?+{} \\t\\u{a0}\\u{2003}\\u{feff}`$'\"\\\\-]){0,24}",
        esc in proptest::prop_oneof![proptest::strategy::Just('\\'), proptest::strategy::Just('`')],
        raw_quotes: bool,
        raw_escapes: bool,
        skip_process_quotes: bool,
        skip_unset_env: bool,
    ) {
        let mut lex = Lex::new(esc);
        lex.raw_quotes = raw_quotes;
        lex.raw_escapes = raw_escapes;
        lex.skip_process_quotes = skip_process_quotes;
        lex.skip_unset_env = skip_unset_env;
        let env = build_envs(&env());
        let full = ShellWord::new(&lex, &word, &env).process(&word);
        proptest::prop_assert_eq!(&lex.process(&word, &env), &full);
        proptest::prop_assert_eq!(lex.process_word_with_map(&word, &env), full.map(|r| r.0));
    }
}
