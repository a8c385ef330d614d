//! Property tests: the parser, the instruction layer and the shell lexer never panic, whatever
//! the input (the same checks as the `parse_dockerfile` fuzz target, on stable).

use frontend::{instructions, parser, shell};
use proptest::prelude::*;

fn dockerfile_like() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        Just("FROM a AS b".to_string()),
        Just("RUN echo \\".to_string()),
        Just("COPY <<EOF /x".to_string()),
        Just("EOF".to_string()),
        Just("# escape=`".to_string()),
        Just("ONBUILD RUN <<-X".to_string()),
        Just("\tX".to_string()),
        Just("ENV a=\"b c\" d=${e:-f}".to_string()),
        Just("RUN --mount=type=secret,id=\"x,y\" [\"a\"]".to_string()),
        "[ -~\\t`\\\\\"'$<{}=,]{0,40}",
    ];
    proptest::collection::vec(line, 0..12).prop_map(|v| v.join("\n"))
}

proptest! {
    #[test]
    fn never_panics(src in dockerfile_like(), bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        for data in [src.as_bytes(), &bytes[..]] {
            if let Ok(r) = parser::parse(data) {
                let env = shell::build_envs(&["A=1"]);
                let lex = shell::Lex::new(r.escape_token);
                for n in &r.children {
                    let _ = lex.process_words_with_map(&n.original, &env);
                }
                let _ = instructions::parse(&r.children);
            }
        }
    }
}
