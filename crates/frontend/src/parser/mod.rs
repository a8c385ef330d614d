//! The Dockerfile parser: bytes → a list of instruction nodes with their source lines
//! (`frontend/dockerfile/parser` at v0.11.6).
//!
//! Rules it follows (all from upstream): parser directives only in the leading comment block;
//! the escape token (`\` or `` ` ``) at the end of a line continues it (comment lines and blank
//! lines inside a continuation are skipped, the latter with a warning); `#` starts a comment only
//! at the start of a line; `RUN`/`COPY`/`ADD` (also under `ONBUILD`) in shell form may start
//! heredocs whose bodies follow the instruction line; each instruction's arguments are split by
//! a per-instruction rule (JSON array or shell string, whitespace-separated words, `key=value`
//! pairs…). Lines are 1-based; a node covers its first to last line, heredoc bodies included.
//!
//! Lines longer than 64 KiB are refused, as upstream's line scanner does. Input is decoded as
//! UTF-8 (invalid sequences become U+FFFD) before parsing.

mod directives;
mod line_parsers;
mod split_command;

pub use directives::{detect_syntax, Directive, DirectiveParser, Syntax};

use crate::shell::Lex;

/// A position in the Dockerfile (1-based line; character is always 0 here, as upstream).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// Line number.
    pub line: usize,
    /// Column (unused: 0).
    pub character: usize,
}

/// A range of the Dockerfile.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Range {
    /// Start.
    pub start: Position,
    /// End.
    pub end: Position,
}

impl Range {
    /// The whole line `n`.
    pub fn line(n: usize) -> Self {
        Range {
            start: Position {
                line: n,
                character: 0,
            },
            end: Position {
                line: n,
                character: 0,
            },
        }
    }
}

/// One range per line from `start` to `end` (`end < start` means just `start`).
pub fn to_ranges(start: usize, end: usize) -> Vec<Range> {
    let end = end.max(start);
    (start..=end).map(Range::line).collect()
}

/// An error with the Dockerfile lines it concerns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParseError {
    /// The message.
    pub message: String,
    /// The lines.
    pub location: Vec<Range>,
}

impl ParseError {
    pub(crate) fn at(message: impl Into<String>, start: usize, end: usize) -> Self {
        ParseError {
            message: message.into(),
            location: to_ranges(start, end),
        }
    }
}

/// A heredoc attached to an instruction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Heredoc {
    /// The terminator word (quotes removed).
    pub name: String,
    /// The file descriptor number before `<<` (0 if none).
    pub file_descriptor: u32,
    /// Whether variables in the body are expanded (the word was not quoted).
    pub expand: bool,
    /// `<<-`: leading tabs are stripped.
    pub chomp: bool,
    /// The body, each line with its newline.
    pub content: String,
}

/// A node of the tree: an instruction (top level) or one of its argument words.
///
/// For an instruction, `value` is the instruction word as written and `next` its arguments in
/// order; an `ONBUILD` instruction has a single argument node whose `children` hold the trigger
/// instruction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// The word.
    pub value: String,
    /// Arguments (instructions only).
    pub next: Vec<Node>,
    /// Sub-instructions (`ONBUILD`).
    pub children: Vec<Node>,
    /// Heredocs (instructions only).
    pub heredocs: Vec<Heredoc>,
    /// The arguments were given as a JSON array.
    pub json: bool,
    /// The instruction line after continuation joining, before argument parsing.
    pub original: String,
    /// `--flag[=value]` words before the arguments.
    pub flags: Vec<String>,
    /// First line (1-based).
    pub start_line: usize,
    /// Last line.
    pub end_line: usize,
    /// Comment lines directly above the instruction.
    pub prev_comment: Vec<String>,
}

impl Node {
    /// The node's lines, one range each.
    pub fn location(&self) -> Vec<Range> {
        to_ranges(self.start_line, self.end_line)
    }

    fn can_contain_heredoc(&self) -> bool {
        let mut node = self;
        if node.value.eq_ignore_ascii_case("onbuild") {
            if let Some(c) = self.next.first().and_then(|n| n.children.first()) {
                node = c;
            }
        }
        let v = node.value.to_ascii_lowercase();
        if !matches!(v.as_str(), "add" | "copy" | "run") {
            return false;
        }
        !node.json
    }

    /// Upstream's debugging dump: `(cmd ["--flags"] "arg" "arg")` per instruction line.
    pub fn dump(&self) -> String {
        let mut s = self.value.to_lowercase();
        if !self.flags.is_empty() {
            s.push_str(&format!(" {}", go_quote_list(&self.flags)));
        }
        for c in &self.children {
            s.push('(');
            s.push_str(&c.dump());
            s.push_str(")\n");
        }
        for n in &self.next {
            if !n.children.is_empty() {
                s.push(' ');
                s.push_str(&n.dump());
            } else {
                s.push(' ');
                s.push_str(&go_quote(&n.value));
            }
        }
        s.trim().to_string()
    }
}

/// Go's `strconv.Quote`.
pub(crate) fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\x07' => out.push_str("\\a"),
            '\x08' => out.push_str("\\b"),
            '\x0c' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x0b' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if is_go_printable(c) => out.push(c),
            c if (c as u32) < 0x10000 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push('"');
    out
}

fn is_go_printable(c: char) -> bool {
    // close to Go's unicode.IsPrint for what Dockerfiles contain: no controls, no
    // non-ASCII whitespace other than U+0020
    !c.is_control() && (c == ' ' || !c.is_whitespace()) && c != '\u{feff}' && c != '\u{fffd}'
        || c == '\u{fffd}'
}

/// Go's `fmt.Sprintf("%q", []string)`: `["a" "b"]`.
pub(crate) fn go_quote_list(v: &[String]) -> String {
    let parts: Vec<String> = v.iter().map(|s| go_quote(s)).collect();
    format!("[{}]", parts.join(" "))
}

/// A warning found while parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// One-line text.
    pub short: String,
    /// Detail lines.
    pub detail: Vec<String>,
    /// A link.
    pub url: String,
    /// Where.
    pub location: Option<Range>,
}

/// The result of [`parse`].
#[derive(Debug, Clone)]
pub struct ParseResult {
    /// The instructions.
    pub children: Vec<Node>,
    /// The escape token in effect.
    pub escape_token: char,
    /// Warnings (empty continuation lines).
    pub warnings: Vec<Warning>,
}

/// The escape token and line-continuation rule.
#[derive(Debug, Clone)]
pub(crate) struct Directives {
    pub(crate) parser: DirectiveParser,
    pub(crate) escape_token: char,
}

impl Directives {
    fn new() -> Self {
        Directives {
            parser: DirectiveParser::new(),
            escape_token: '\\',
        }
    }

    fn set_escape_token(&mut self, s: &str) -> Result<(), String> {
        if s != "`" && s != "\\" {
            return Err(format!("invalid escape token '{s}' does not match ` or \\"));
        }
        self.escape_token = s.chars().next().expect("non-empty");
        Ok(())
    }

    fn possible_parser_directive(&mut self, line: &str) -> Result<(), String> {
        if let Some(d) = self.parser.parse_line(line)? {
            if d.name == "escape" {
                self.set_escape_token(&d.value)?;
            }
        }
        Ok(())
    }

    /// Upstream's continuation regex `([^E])E[ \t]*$|^E[ \t]*$`: strips the escape token (and
    /// trailing blanks) at the end of `line`; returns whether the line is complete.
    fn trim_continuation(&self, line: &str) -> (String, bool) {
        let e = self.escape_token;
        let body = line.trim_end_matches([' ', '\t']);
        let Some(before) = body.strip_suffix(e) else {
            return (line.to_string(), true);
        };
        match before.chars().last() {
            None => (String::new(), false),
            Some(c) if c == e => (line.to_string(), true),
            Some(_) => (before.to_string(), false),
        }
    }
}

/// `trimNewline`: strips trailing `\r` and `\n`.
fn trim_newline(s: &str) -> &str {
    s.trim_end_matches(['\r', '\n'])
}

fn trim_leading_whitespace(s: &str) -> &str {
    s.trim_start_matches(crate::shell::is_space)
}

fn is_comment(line: &str) -> bool {
    trim_leading_whitespace(trim_newline(line)).starts_with('#')
}

fn is_empty_continuation_line(line: &str) -> bool {
    trim_leading_whitespace(trim_newline(line)).is_empty()
}

/// `^#.*$` removed: a line starting with `#` becomes empty.
fn trim_comments(s: &str) -> &str {
    if s.starts_with('#') {
        ""
    } else {
        s
    }
}

fn process_line<'a>(
    d: &mut Directives,
    token: &'a str,
    strip_left: bool,
) -> Result<&'a str, String> {
    let mut t = trim_newline(token);
    if strip_left {
        t = trim_leading_whitespace(t);
    }
    d.possible_parser_directive(t)?;
    Ok(trim_comments(t))
}

/// Longest line the scanner accepts (Go's `bufio.MaxScanTokenSize`).
const MAX_LINE: usize = 64 * 1024;

/// Splits into lines keeping their `\n`.
struct Lines<'a> {
    data: &'a str,
}

impl<'a> Lines<'a> {
    fn next_line(&mut self) -> Result<Option<&'a str>, String> {
        if self.data.is_empty() {
            return Ok(None);
        }
        let (line, rest) = match self.data.find('\n') {
            Some(i) => (&self.data[..=i], &self.data[i + 1..]),
            None => (self.data, ""),
        };
        let too_long = if line.ends_with('\n') {
            line.len() > MAX_LINE
        } else {
            line.len() >= MAX_LINE
        };
        if too_long {
            return Err(format!(
                "dockerfile line greater than max allowed size of {}",
                MAX_LINE - 1
            ));
        }
        self.data = rest;
        Ok(Some(line))
    }
}

fn scan<'a>(lines: &mut Lines<'a>, current_line: usize) -> Result<Option<&'a str>, ParseError> {
    lines
        .next_line()
        .map_err(|e| ParseError::at(e, current_line, 0))
}

/// Parses a Dockerfile.
pub fn parse(data: &[u8]) -> Result<ParseResult, ParseError> {
    let text = String::from_utf8_lossy(data);
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    parse_str(text)
}

fn parse_str(text: &str) -> Result<ParseResult, ParseError> {
    let mut d = Directives::new();
    let mut current_line = 0usize;
    let mut children: Vec<Node> = vec![];
    let mut warnings = vec![];
    let mut comments: Vec<String> = vec![];
    let mut lines = Lines { data: text };

    while let Some(raw) = scan(&mut lines, current_line)? {
        if is_comment(raw) {
            let comment = raw.get(1..).unwrap_or("").trim().to_string();
            if comment.is_empty() {
                comments.clear();
            } else {
                comments.push(comment);
            }
        }
        let processed =
            process_line(&mut d, raw, true).map_err(|e| ParseError::at(e, current_line, 0))?;
        current_line += 1;
        let start_line = current_line;
        let (mut line, mut end_of_line) = d.trim_continuation(processed);
        if end_of_line && line.is_empty() {
            continue;
        }
        let mut has_empty_continuation = false;
        while !end_of_line {
            let Some(raw) = scan(&mut lines, current_line)? else {
                break;
            };
            let processed =
                process_line(&mut d, raw, false).map_err(|e| ParseError::at(e, current_line, 0))?;
            current_line += 1;
            if is_comment(raw) {
                continue;
            }
            if is_empty_continuation_line(processed) {
                has_empty_continuation = true;
                continue;
            }
            let (cont, eol) = d.trim_continuation(processed);
            end_of_line = eol;
            line.push_str(&cont);
        }
        if has_empty_continuation {
            warnings.push(Warning {
                short: format!("Empty continuation line found in: {line}"),
                detail: vec![
                    "Empty continuation lines will become errors in a future release".into(),
                ],
                url: "https://github.com/moby/moby/pull/33719".into(),
                location: Some(Range::line(current_line)),
            });
        }

        let mut child = line_parsers::new_node_from_line(&line, &d, std::mem::take(&mut comments))
            .map_err(|e| ParseError::at(e, start_line, current_line))?;

        if child.can_contain_heredoc() {
            let heredocs = heredocs_from_line(&line)
                .map_err(|e| ParseError::at(e, start_line, current_line))?;
            for mut heredoc in heredocs {
                let mut terminated = false;
                while let Some(raw) = scan(&mut lines, current_line)? {
                    current_line += 1;
                    let mut possible = trim_newline(raw);
                    if heredoc.chomp {
                        possible = possible.trim_start_matches('\t');
                    }
                    if possible == heredoc.name {
                        terminated = true;
                        break;
                    }
                    heredoc.content.push_str(raw);
                }
                if !terminated {
                    return Err(ParseError::at(
                        "unterminated heredoc",
                        start_line,
                        current_line,
                    ));
                }
                child.heredocs.push(heredoc);
            }
        }
        child.start_line = start_line;
        child.end_line = current_line;
        children.push(child);
        comments.clear();
    }
    if children.is_empty() {
        return Err(ParseError::at("file with no instructions", current_line, 0));
    }
    Ok(ParseResult {
        children,
        escape_token: d.escape_token,
        warnings,
    })
}

/// Parses a heredoc word (`[n]<<[-]WORD`); `None` if `src` is not one.
pub fn parse_heredoc(src: &str) -> Result<Option<Heredoc>, String> {
    // ^(\d*)<<(-?)([^<]*)$
    let digits = src.chars().take_while(|c| c.is_ascii_digit()).count();
    let (fd, rest) = src.split_at(digits);
    let Some(rest) = rest.strip_prefix("<<") else {
        return Ok(None);
    };
    let (chomp, rest) = match rest.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, rest),
    };
    if rest.contains('<') || rest.is_empty() {
        return Ok(None);
    }
    let mut lex = Lex::new('\\');
    lex.skip_unset_env = true;
    let empty: [&str; 0] = [];
    let words = lex.process_words(rest, &empty).map_err(|e| e.to_string())?;
    if words.len() != 1 {
        return Ok(None);
    }
    lex.raw_quotes = true;
    let words_raw = lex.process_words(rest, &empty).map_err(|e| e.to_string())?;
    if words_raw.len() != words.len() {
        return Err(format!(
            "internal lexing of heredoc produced inconsistent results: {rest}"
        ));
    }
    let quotes = |w: &str| w.matches(['\'', '"']).count();
    let word = words[0].clone();
    let expand = quotes(&word) == quotes(&words_raw[0]);
    Ok(Some(Heredoc {
        name: word,
        file_descriptor: fd.parse().unwrap_or(0),
        expand,
        chomp,
        content: String::new(),
    }))
}

/// [`parse_heredoc`] ignoring errors.
pub fn must_parse_heredoc(src: &str) -> Option<Heredoc> {
    parse_heredoc(src).ok().flatten()
}

fn heredocs_from_line(line: &str) -> Result<Vec<Heredoc>, String> {
    // The lexer below only splits at whitespace and keeps every other character (raw quotes,
    // raw escapes, unset variables as written), so a word can hold `<<` only if the line does.
    if !line.contains("<<") {
        return Ok(vec![]);
    }
    let mut lex = Lex::new('\\');
    lex.raw_quotes = true;
    lex.raw_escapes = true;
    lex.skip_unset_env = true;
    let empty: [&str; 0] = [];
    let words = lex.process_words(line, &empty).unwrap_or_default();
    let mut docs = vec![];
    for w in words {
        if let Some(h) = parse_heredoc(&w)? {
            docs.push(h);
        }
    }
    Ok(docs)
}

/// Removes leading tabs from every line (`<<-`).
pub fn chomp_heredoc_content(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    for (i, l) in src.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(l.trim_start_matches('\t'));
    }
    out
}

#[cfg(test)]
mod tests;
