//! Splitting an instruction line into the instruction word, `--flags` and the rest
//! (`frontend/dockerfile/parser/split_command.go`).

use super::line_parsers::split_ws;

/// Go's `unicode.IsSpace(rune(b))` for one byte: upstream scans flags byte by byte, so the
/// bytes 0x85 and 0xA0 count as spaces even inside a multi-byte character.
fn is_space_byte(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ' | 0x85 | 0xa0)
}

/// `(cmd, flags, args)`.
pub(crate) fn split_command(line: &str) -> (String, Vec<String>, String) {
    let trimmed = line.trim_matches(crate::shell::is_space);
    let parts = split_ws(trimmed, 2);
    let cmd = parts.first().cloned().unwrap_or_default();
    let (args, flags) = match parts.get(1) {
        Some(rest) => extract_builder_flags(rest),
        None => (String::new(), vec![]),
    };
    (
        cmd,
        flags,
        args.trim_matches(crate::shell::is_space).to_string(),
    )
}

#[derive(PartialEq)]
enum Phase {
    Spaces,
    Word,
    Quote,
}

/// Leading words that start with `--` are flags (quotes and backslashes processed); a lone `--`
/// ends them.
fn extract_builder_flags(line: &str) -> (String, Vec<String>) {
    let b = line.as_bytes();
    let mut words: Vec<String> = vec![];
    let mut phase = Phase::Spaces;
    // upstream appends each byte as the rune of the same value (so non-ASCII bytes in flags
    // become Latin-1 characters)
    let mut word = String::new();
    let mut quote = 0u8;
    let mut blank_ok = false;
    let mut pos = 0usize;
    // substring from a byte offset (upstream slices bytes; here the offset may fall inside a
    // character after a 0x85/0xA0 byte was taken as a space)
    let tail = |p: usize| String::from_utf8_lossy(&b[p..]).into_owned();
    while pos <= b.len() {
        let ch = if pos < b.len() { b[pos] } else { 0 };
        if phase == Phase::Spaces {
            if pos == b.len() {
                break;
            }
            if is_space_byte(ch) {
                pos += 1;
                continue;
            }
            if ch != b'-' || pos + 1 == b.len() || b[pos + 1] != b'-' {
                return (tail(pos), words);
            }
            phase = Phase::Word;
        }
        if (phase == Phase::Word || phase == Phase::Quote) && pos == b.len() {
            if word != "--" && (blank_ok || !word.is_empty()) {
                words.push(word.clone());
            }
            break;
        }
        if phase == Phase::Word {
            if is_space_byte(ch) {
                phase = Phase::Spaces;
                if word == "--" {
                    return (tail(pos), words);
                }
                if blank_ok || !word.is_empty() {
                    words.push(word.clone());
                }
                word.clear();
                blank_ok = false;
                pos += 1;
                continue;
            }
            if ch == b'\'' || ch == b'"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
                pos += 1;
                continue;
            }
            let mut c = ch;
            if c == b'\\' {
                if pos + 1 == b.len() {
                    pos += 1;
                    continue;
                }
                pos += 1;
                c = b[pos];
            }
            word.push(c as char);
            pos += 1;
            continue;
        }
        if phase == Phase::Quote {
            if ch == quote {
                phase = Phase::Word;
                pos += 1;
                continue;
            }
            let mut c = ch;
            if c == b'\\' {
                if pos + 1 == b.len() {
                    phase = Phase::Word;
                    pos += 1;
                    continue;
                }
                pos += 1;
                c = b[pos];
            }
            word.push(c as char);
        }
        pos += 1;
    }
    (String::new(), words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_args() {
        let cases: &[(&str, &str, &[&str], &str)] = &[
            ("RUN echo hi", "RUN", &[], "echo hi"),
            (
                "  copy   --from=a  --chown=1:2 src dst ",
                "copy",
                &["--from=a", "--chown=1:2"],
                "src dst",
            ),
            ("COPY --from='a b' x y", "COPY", &["--from=a b"], "x y"),
            ("COPY --link -- --weird y", "COPY", &["--link"], "--weird y"),
            (
                "RUN --mount=type=cache,target=/x\\ y ls",
                "RUN",
                &["--mount=type=cache,target=/x y"],
                "ls",
            ),
            ("COPY --a", "COPY", &["--a"], ""),
            ("RUN -x", "RUN", &[], "-x"),
            ("FROM", "FROM", &[], ""),
        ];
        for (line, cmd, flags, args) in cases {
            let (c, f, a) = split_command(line);
            assert_eq!((c.as_str(), a.as_str()), (*cmd, *args), "{line:?}");
            assert_eq!(f, *flags, "{line:?}");
        }
    }
}
