//! Per-instruction argument parsing (`frontend/dockerfile/parser/line_parsers.go`): each
//! instruction has a rule that turns the text after its flags into argument nodes.

use super::split_command::split_command;
use super::{Directives, Node};
use crate::shell::is_space;

const NOT_STRING_ARRAY: &str =
    "when using JSON array syntax, arrays must be comprised of strings only";

/// Go's `[\t\v\f\r ]+` split with a limit (`n < 0`: no limit). Empty input gives `[""]`.
pub(crate) fn split_ws(s: &str, n: isize) -> Vec<String> {
    let is_ws = |c: char| matches!(c, '\t' | '\x0b' | '\x0c' | '\r' | ' ');
    let mut out = vec![];
    let mut rest = s;
    loop {
        if n >= 0 && out.len() as isize == n - 1 {
            out.push(rest.to_string());
            return out;
        }
        match rest.find(is_ws) {
            None => {
                out.push(rest.to_string());
                return out;
            }
            Some(i) => {
                out.push(rest[..i].to_string());
                let after = &rest[i..];
                let skip = after.len() - after.trim_start_matches(is_ws).len();
                rest = &after[skip..];
            }
        }
    }
}

fn arg(v: impl Into<String>) -> Node {
    Node {
        value: v.into(),
        ..Default::default()
    }
}

type Parsed = (Vec<Node>, bool);

/// Creates the node for one (continuation-joined) instruction line.
pub(crate) fn new_node_from_line(
    line: &str,
    d: &Directives,
    comments: Vec<String>,
) -> Result<Node, String> {
    let (cmd, flags, args) = split_command(line);
    let (next, json) = match cmd.to_ascii_lowercase().as_str() {
        "add" | "copy" | "volume" => parse_maybe_json_to_list(&args)?,
        "arg" => (parse_name_or_name_val(&args, d), false),
        "cmd" | "entrypoint" | "run" | "shell" => parse_maybe_json(&args)?,
        "env" => (parse_name_val(&args, "ENV", d)?, false),
        "label" => (parse_name_val(&args, "LABEL", d)?, false),
        "expose" | "from" => (parse_strings_whitespace_delimited(&args), false),
        "healthcheck" => parse_health_config(&args)?,
        "maintainer" | "stopsignal" | "user" | "workdir" => (parse_string(&args), false),
        "onbuild" => (parse_sub_command(&args, d)?, false),
        // unknown instructions keep one empty argument; the instruction parser rejects them
        _ => (vec![arg("")], false),
    };
    Ok(Node {
        value: cmd,
        original: line.to_string(),
        flags,
        next,
        json,
        prev_comment: comments,
        ..Default::default()
    })
}

fn parse_sub_command(rest: &str, d: &Directives) -> Result<Vec<Node>, String> {
    if rest.is_empty() {
        return Ok(vec![]);
    }
    let child = new_node_from_line(rest, d, vec![])?;
    Ok(vec![Node {
        children: vec![child],
        ..Default::default()
    }])
}

#[derive(PartialEq, Clone, Copy)]
enum Phase {
    Spaces,
    Word,
    Quote,
}

/// Splits into words on whitespace, keeping quotes and escapes in the words (they are removed
/// later by expansion).
pub(crate) fn parse_words(rest: &str, escape: char) -> Vec<String> {
    let chars: Vec<char> = rest.chars().collect();
    let mut words = vec![];
    let mut phase = Phase::Spaces;
    let mut word = String::new();
    let mut quote = '\0';
    let mut blank_ok = false;
    let mut pos = 0usize;
    let n = chars.len();
    while pos <= n {
        let mut ch = if pos < n { chars[pos] } else { '\0' };
        if phase == Phase::Spaces {
            if pos == n {
                break;
            }
            if is_space(ch) {
                pos += 1;
                continue;
            }
            phase = Phase::Word;
        }
        if (phase == Phase::Word || phase == Phase::Quote) && pos == n {
            if blank_ok || !word.is_empty() {
                words.push(word.clone());
            }
            break;
        }
        if phase == Phase::Word {
            if is_space(ch) {
                phase = Phase::Spaces;
                if blank_ok || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                word.clear();
                blank_ok = false;
                pos += 1;
                continue;
            }
            if ch == '\'' || ch == '"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
            }
            if ch == escape {
                if pos + 1 == n {
                    pos += 1;
                    continue;
                }
                word.push(ch);
                pos += 1;
                ch = chars[pos];
            }
            word.push(ch);
            pos += 1;
            continue;
        }
        // in a quote
        if ch == quote {
            phase = Phase::Word;
        }
        if ch == escape && quote != '\'' {
            if pos + 1 == n {
                phase = Phase::Word;
                pos += 1;
                continue;
            }
            pos += 1;
            word.push(ch);
            ch = chars[pos];
        }
        word.push(ch);
        pos += 1;
    }
    words
}

/// `ENV`/`LABEL`: `key value` (old form, one pair) or `key=value …`.
fn parse_name_val(rest: &str, key: &str, d: &Directives) -> Result<Vec<Node>, String> {
    let words = parse_words(rest, d.escape_token);
    if words.is_empty() {
        return Ok(vec![]);
    }
    if !words[0].contains('=') {
        let parts = split_ws(rest, 2);
        if parts.len() < 2 {
            return Err(format!("{key} must have two arguments"));
        }
        return Ok(vec![arg(parts[0].clone()), arg(parts[1].clone())]);
    }
    let mut out = vec![];
    for w in words {
        let Some((k, v)) = w.split_once('=') else {
            return Err(format!(
                "Syntax error - can't find = in {}. Must be of the form: name=value",
                super::go_quote(&w)
            ));
        };
        out.push(arg(k));
        out.push(arg(v));
    }
    Ok(out)
}

fn parse_name_or_name_val(rest: &str, d: &Directives) -> Vec<Node> {
    parse_words(rest, d.escape_token)
        .into_iter()
        .map(arg)
        .collect()
}

fn parse_strings_whitespace_delimited(rest: &str) -> Vec<Node> {
    if rest.is_empty() {
        return vec![];
    }
    split_ws(rest, -1).into_iter().map(arg).collect()
}

fn parse_string(rest: &str) -> Vec<Node> {
    if rest.is_empty() {
        return vec![];
    }
    vec![arg(rest)]
}

enum JsonErr {
    NotStringArray,
    Other,
}

/// A JSON array of strings at the start of `rest` (anything after the array is ignored, as Go's
/// decoder reads only the first value).
fn parse_json(rest: &str) -> Result<Vec<Node>, JsonErr> {
    let rest = rest.trim_start_matches(is_space);
    if !rest.starts_with('[') {
        return Err(JsonErr::Other);
    }
    let mut it = serde_json::Deserializer::from_str(rest).into_iter::<serde_json::Value>();
    let v = match it.next() {
        Some(Ok(v)) => v,
        _ => return Err(JsonErr::Other),
    };
    let serde_json::Value::Array(items) = v else {
        return Err(JsonErr::Other);
    };
    let mut out = vec![];
    for i in items {
        match i {
            serde_json::Value::String(s) => out.push(arg(s)),
            _ => return Err(JsonErr::NotStringArray),
        }
    }
    Ok(out)
}

fn parse_maybe_json(rest: &str) -> Result<Parsed, String> {
    if rest.is_empty() {
        return Ok((vec![], false));
    }
    match parse_json(rest) {
        Ok(n) => Ok((n, true)),
        Err(JsonErr::NotStringArray) => Err(NOT_STRING_ARRAY.into()),
        Err(JsonErr::Other) => Ok((vec![arg(rest)], false)),
    }
}

fn parse_maybe_json_to_list(rest: &str) -> Result<Parsed, String> {
    match parse_json(rest) {
        Ok(n) => Ok((n, true)),
        Err(JsonErr::NotStringArray) => Err(NOT_STRING_ARRAY.into()),
        Err(JsonErr::Other) => Ok((parse_strings_whitespace_delimited(rest), false)),
    }
}

/// `HEALTHCHECK TYPE rest`: the type word, then `rest` as for `CMD`.
fn parse_health_config(rest: &str) -> Result<Parsed, String> {
    let b = rest.as_bytes();
    // upstream tests bytes with unicode.IsSpace
    let sp = |x: u8| matches!(x, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ' | 0x85 | 0xa0);
    let sep = b.iter().position(|x| sp(*x)).unwrap_or(b.len());
    if sep == 0 {
        return Ok((vec![], false));
    }
    let next = sep + b[sep..].iter().take_while(|x| sp(**x)).count();
    let typ = String::from_utf8_lossy(&b[..sep]).into_owned();
    let cmd_text = String::from_utf8_lossy(&b[next..]).into_owned();
    let (cmd, json) = parse_maybe_json(&cmd_text)?;
    let mut out = vec![arg(typ)];
    out.extend(cmd);
    Ok((out, json))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words() {
        let cases: &[(&str, &[&str])] = &[
            ("foo", &["foo"]),
            ("foo bar", &["foo", "bar"]),
            ("foo\\ bar", &["foo\\ bar"]),
            ("foo=bar", &["foo=bar"]),
            ("foo bar 'abc xyz'", &["foo", "bar", "'abc xyz'"]),
            (
                "foo=\"bar baz\" x='' y=",
                &["foo=\"bar baz\"", "x=''", "y="],
            ),
            ("a \"b\\\" c\" d", &["a", "\"b\\\" c\"", "d"]),
            ("x\\", &["x"]),
        ];
        for (input, want) in cases {
            assert_eq!(parse_words(input, '\\'), *want, "{input:?}");
        }
    }

    #[test]
    fn whitespace_split() {
        assert_eq!(split_ws("a  b\tc", -1), vec!["a", "b", "c"]);
        assert_eq!(split_ws("a  b c", 2), vec!["a", "b c"]);
        assert_eq!(split_ws("", -1), vec![""]);
    }

    #[test]
    fn json_prefix_and_errors() {
        let n = parse_json("  [\"a\", \"b\"] trailing").ok().unwrap();
        assert_eq!(n.len(), 2);
        assert!(matches!(parse_json("[1]"), Err(JsonErr::NotStringArray)));
        assert!(matches!(parse_json("['a']"), Err(JsonErr::Other)));
        assert!(matches!(parse_json("echo"), Err(JsonErr::Other)));
        assert_eq!(parse_json("[]").ok().unwrap().len(), 0);
    }
}
