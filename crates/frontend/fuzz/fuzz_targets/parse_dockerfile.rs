//! Parses arbitrary bytes as a Dockerfile, types its instructions and expands every word with
//! the shell lexer. Errors are expected; panics and hangs are bugs.
#![no_main]

use frontend::{instructions, parser, shell};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(r) = parser::parse(data) else { return };
    let env = shell::build_envs(&["A=1", "B="]);
    let lex = shell::Lex::new(r.escape_token);
    for n in &r.children {
        let _ = lex.process_words_with_map(&n.original, &env);
        let _ = lex.process_word_with_map(&n.original, &env);
    }
    let _ = instructions::parse(&r.children);
});
