//! Shell-word splitting and variable expansion as the Dockerfile frontend does it
//! (`frontend/dockerfile/shell/lex.go` at v0.11.6).
//!
//! [`Lex`] processes single and double quotes, the escape token (`\` or the `# escape=`
//! character) and `$name` / `${name}` / `${name:-word}` / `${name:+word}` / `${name?word}` /
//! `${name:?word}` references against an environment. It is not a shell: there is no command
//! substitution, globbing or arithmetic. The switches ([`Lex::raw_quotes`], [`Lex::raw_escapes`],
//! [`Lex::skip_unset_env`], [`Lex::skip_process_quotes`]) select the variants the parser and the
//! converter use (heredoc detection, progress names, heredoc contents).
//!
//! Differences from Go: input is a Rust string (the Dockerfile was decoded lossily as UTF-8
//! before), and "is a letter"/"is a digit" use Rust's Unicode tables, which agree with Go's
//! for every character in practical Dockerfiles.

use std::collections::{BTreeMap, BTreeSet};

/// An expansion error (`failed to process "…": …`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("failed to process {source_word:?}: {message}")]
pub struct LexError {
    /// The word being processed.
    pub source_word: String,
    /// What is wrong with it.
    pub message: String,
}

/// Go's `unicode.IsSpace`.
pub(crate) fn is_space(c: char) -> bool {
    c.is_whitespace()
}

fn is_letter(c: char) -> bool {
    c.is_alphabetic()
}

fn is_digit(c: char) -> bool {
    c.is_ascii_digit() || (!c.is_ascii() && c.is_numeric())
}

/// The lexer configuration.
#[derive(Debug, Clone, Copy)]
pub struct Lex {
    escape_token: char,
    /// Keep quote characters in the output.
    pub raw_quotes: bool,
    /// Keep escape characters in the output.
    pub raw_escapes: bool,
    /// Treat quotes as ordinary characters.
    pub skip_process_quotes: bool,
    /// Leave references to unset variables as written.
    pub skip_unset_env: bool,
}

/// An environment for expansion: `KEY=value` pairs, later entries win.
pub type Env = BTreeMap<String, String>;

/// Where expansion looks variables up: an [`Env`], or a view of another representation that
/// answers as the `Env` built from it would.
pub trait Lookup {
    /// The value of `name`, if it is set.
    fn lookup(&self, name: &str) -> Option<String>;
}

impl Lookup for Env {
    fn lookup(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// Builds an [`Env`] from `KEY=value` strings (a key without `=` gets an empty value).
pub fn build_envs<S: AsRef<str>>(env: &[S]) -> Env {
    let mut m = Env::new();
    for e in env {
        let e = e.as_ref();
        match e.find('=') {
            None => {
                m.insert(e.to_string(), String::new());
            }
            Some(i) => {
                m.insert(e[..i].to_string(), e[i + 1..].to_string());
            }
        }
    }
    m
}

impl Lex {
    /// A lexer using `escape_token` (`\` or `` ` ``).
    pub fn new(escape_token: char) -> Self {
        Lex {
            escape_token,
            raw_quotes: false,
            raw_escapes: false,
            skip_process_quotes: false,
            skip_unset_env: false,
        }
    }

    /// Expands `word` with `env` (`KEY=value` strings).
    pub fn process_word<S: AsRef<str>>(&self, word: &str, env: &[S]) -> Result<String, LexError> {
        self.process_word_with_map(word, &build_envs(env))
    }

    /// Expands `word` and splits the result into words (after expansion, honouring quotes).
    pub fn process_words<S: AsRef<str>>(
        &self,
        word: &str,
        env: &[S],
    ) -> Result<Vec<String>, LexError> {
        self.process(word, &build_envs(env)).map(|r| r.1)
    }

    /// Expands `word` with a map.
    pub fn process_word_with_map(&self, word: &str, env: &impl Lookup) -> Result<String, LexError> {
        if self.is_literal(word) {
            return Ok(word.to_string());
        }
        let mut sw = ShellWord::new(self, word, env);
        sw.want_words = false;
        sw.process(word).map(|r| r.0)
    }

    /// Splits with a map.
    pub fn process_words_with_map(
        &self,
        word: &str,
        env: &impl Lookup,
    ) -> Result<Vec<String>, LexError> {
        self.process(word, env).map(|r| r.1)
    }

    /// Expands `word` and also returns the names of the variables that were found.
    pub fn process_word_with_matches(
        &self,
        word: &str,
        env: &Env,
    ) -> Result<(String, BTreeSet<String>), LexError> {
        let mut sw = ShellWord::new(self, word, env);
        sw.want_words = false;
        let r = sw.process(word)?;
        Ok((r.0, sw.matches))
    }

    fn process(&self, word: &str, env: &dyn Lookup) -> Result<(String, Vec<String>), LexError> {
        if self.is_literal(word) {
            // what the full scan gives for a word of ordinary characters only
            let words = word.split(is_space).filter(|w| !w.is_empty());
            return Ok((word.to_string(), words.map(String::from).collect()));
        }
        ShellWord::new(self, word, env).process(word)
    }

    /// Whether expanding `word` changes nothing, whatever the environment: no `$`, quote, escape token or leading byte
    /// order mark, so every character is copied as it is (most paths, keys and mount options).
    pub fn is_literal(&self, word: &str) -> bool {
        !word.starts_with('\u{feff}')
            && !word
                .chars()
                .any(|c| matches!(c, '$' | '\'' | '"') || c == self.escape_token)
    }
}

struct ShellWord<'a> {
    /// The word (without a leading byte order mark).
    src: &'a str,
    /// Byte offset of the next character.
    pos: usize,
    /// Whether the top-level scan collects the split words (expansion alone does not).
    want_words: bool,
    envs: &'a dyn Lookup,
    lex: Lex,
    matches: BTreeSet<String>,
}

#[derive(Default)]
struct Words {
    word: String,
    words: Vec<String>,
    in_word: bool,
    /// Nobody reads the words: every `add_*` does nothing.
    off: bool,
}

impl Words {
    fn add_char(&mut self, ch: char) {
        if self.off {
            return;
        }
        if is_space(ch) && self.in_word {
            if !self.word.is_empty() {
                self.words.push(std::mem::take(&mut self.word));
                self.in_word = false;
            }
        } else if !is_space(ch) {
            self.add_raw_char(ch);
        }
    }

    fn add_raw_char(&mut self, ch: char) {
        if self.off {
            return;
        }
        self.word.push(ch);
        self.in_word = true;
    }

    fn add_string(&mut self, s: &str) {
        if self.off {
            return;
        }
        for ch in s.chars() {
            self.add_char(ch);
        }
    }

    fn add_raw_string(&mut self, s: &str) {
        if self.off {
            return;
        }
        self.word.push_str(s);
        self.in_word = true;
    }

    fn get_words(mut self) -> Vec<String> {
        if !self.word.is_empty() {
            self.words.push(std::mem::take(&mut self.word));
        }
        self.words
    }
}

type Msg = String;

impl<'a> ShellWord<'a> {
    fn new(lex: &Lex, word: &'a str, envs: &'a dyn Lookup) -> Self {
        // text/scanner skips a byte order mark at the very start
        let src = word.strip_prefix('\u{feff}').unwrap_or(word);
        ShellWord {
            src,
            pos: 0,
            want_words: true,
            envs,
            lex: *lex,
            matches: BTreeSet::new(),
        }
    }

    fn peek(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if let Some(c) = c {
            self.pos += c.len_utf8();
        }
        c
    }

    fn process(&mut self, source: &str) -> Result<(String, Vec<String>), LexError> {
        self.process_stop_on(None).map_err(|message| LexError {
            source_word: source.to_string(),
            message,
        })
    }

    fn process_stop_on(&mut self, stop: Option<char>) -> Result<(String, Vec<String>), Msg> {
        let mut result = String::new();
        // only the top-level scan's words are ever read
        let mut words = Words {
            off: stop.is_some() || !self.want_words,
            ..Default::default()
        };
        while let Some(ch) = self.peek() {
            if stop == Some(ch) {
                self.next();
                return Ok((result, words.get_words()));
            }
            let special = match ch {
                '$' => true,
                '\'' | '"' => !self.lex.skip_process_quotes,
                _ => false,
            };
            if special {
                let tmp = match ch {
                    '$' => self.process_dollar()?,
                    '\'' => self.process_single_quote()?,
                    _ => self.process_double_quote()?,
                };
                result.push_str(&tmp);
                if ch == '$' {
                    words.add_string(&tmp);
                } else {
                    words.add_raw_string(&tmp);
                }
                continue;
            }
            let mut ch = self.next().expect("peeked");
            if ch == self.lex.escape_token {
                if self.lex.raw_escapes {
                    words.add_raw_char(ch);
                    result.push(ch);
                }
                match self.next() {
                    None => break,
                    Some(c) => {
                        ch = c;
                        words.add_raw_char(ch);
                    }
                }
            } else {
                words.add_char(ch);
            }
            result.push(ch);
        }
        if let Some(stop) = stop {
            return Err(format!(
                "unexpected end of statement while looking for matching {stop}"
            ));
        }
        Ok((result, words.get_words()))
    }

    fn process_single_quote(&mut self) -> Result<String, Msg> {
        let mut result = String::new();
        let ch = self.next().expect("quote");
        if self.lex.raw_quotes {
            result.push(ch);
        }
        loop {
            match self.next() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching single-quote"
                            .into(),
                    )
                }
                Some('\'') => {
                    if self.lex.raw_quotes {
                        result.push('\'');
                    }
                    return Ok(result);
                }
                Some(c) => result.push(c),
            }
        }
    }

    fn process_double_quote(&mut self) -> Result<String, Msg> {
        let mut result = String::new();
        let ch = self.next().expect("quote");
        if self.lex.raw_quotes {
            result.push(ch);
        }
        loop {
            match self.peek() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching double-quote"
                            .into(),
                    )
                }
                Some('"') => {
                    self.next();
                    if self.lex.raw_quotes {
                        result.push('"');
                    }
                    return Ok(result);
                }
                Some('$') => {
                    let v = self.process_dollar()?;
                    result.push_str(&v);
                }
                Some(_) => {
                    let mut ch = self.next().expect("peeked");
                    if ch == self.lex.escape_token {
                        if self.lex.raw_escapes {
                            result.push(ch);
                        }
                        match self.peek() {
                            // an escape at the end of the word is dropped
                            None => continue,
                            Some(c) if c == '"' || c == '$' || c == self.lex.escape_token => {
                                ch = self.next().expect("peeked");
                            }
                            Some(_) => {}
                        }
                    }
                    result.push(ch);
                }
            }
        }
    }

    fn process_dollar(&mut self) -> Result<String, Msg> {
        self.next();
        if self.peek() != Some('{') {
            let name = self.process_name();
            if name.is_empty() {
                return Ok("$".into());
            }
            let (value, found) = self.get_env(&name);
            if !found && self.lex.skip_unset_env {
                return Ok(format!("${name}"));
            }
            return Ok(value);
        }
        self.next();
        match self.peek() {
            None => return Err("syntax error: missing '}'".into()),
            Some('{') | Some('}') | Some(':') => {
                return Err("syntax error: bad substitution".into())
            }
            _ => {}
        }
        let name = self.process_name();
        let ch = self.next();
        match ch {
            Some('}') => {
                let (value, found) = self.get_env(&name);
                if !found && self.lex.skip_unset_env {
                    return Ok(format!("${{{name}}}"));
                }
                Ok(value)
            }
            Some('?') => {
                let word = match self.process_stop_on(Some('}')) {
                    Ok((w, _)) => w,
                    Err(e) => {
                        if self.peek().is_none() {
                            return Err("syntax error: missing '}'".into());
                        }
                        return Err(e);
                    }
                };
                let (value, found) = self.get_env(&name);
                if !found {
                    if self.lex.skip_unset_env {
                        return Ok(format!("${{{name}?{word}}}"));
                    }
                    let message = if word.is_empty() {
                        "is not allowed to be unset".to_string()
                    } else {
                        word
                    };
                    return Err(format!("{name}: {message}"));
                }
                Ok(value)
            }
            Some(':') => {
                let modifier = self.next();
                let word = match self.process_stop_on(Some('}')) {
                    Ok((w, _)) => w,
                    Err(e) => {
                        if self.peek().is_none() {
                            return Err("syntax error: missing '}'".into());
                        }
                        return Err(e);
                    }
                };
                let (mut value, found) = self.get_env(&name);
                let m = modifier.map(String::from).unwrap_or_default();
                match modifier {
                    Some('+') => {
                        if !value.is_empty() {
                            value = word.clone();
                        }
                        if !found && self.lex.skip_unset_env {
                            return Ok(format!("${{{name}:{m}{word}}}"));
                        }
                        Ok(value)
                    }
                    Some('-') => {
                        if value.is_empty() {
                            value = word.clone();
                        }
                        if !found && self.lex.skip_unset_env {
                            return Ok(format!("${{{name}:{m}{word}}}"));
                        }
                        Ok(value)
                    }
                    Some('?') => {
                        if !found {
                            if self.lex.skip_unset_env {
                                return Ok(format!("${{{name}:{m}{word}}}"));
                            }
                            let message = if word.is_empty() {
                                "is not allowed to be unset".to_string()
                            } else {
                                word
                            };
                            return Err(format!("{name}: {message}"));
                        }
                        if value.is_empty() {
                            let message = if word.is_empty() {
                                "is not allowed to be empty".to_string()
                            } else {
                                word
                            };
                            return Err(format!("{name}: {message}"));
                        }
                        Ok(value)
                    }
                    other => Err(format!(
                        "unsupported modifier ({}) in substitution",
                        // Go prints %c of the EOF rune (-1) as U+FFFD
                        other.unwrap_or('\u{fffd}')
                    )),
                }
            }
            _ => Err("missing ':' in substitution".into()),
        }
    }

    fn process_name(&mut self) -> String {
        let mut name = String::new();
        while let Some(ch) = self.peek() {
            if name.is_empty() && is_digit(ch) {
                while let Some(c) = self.peek() {
                    if !is_digit(c) {
                        break;
                    }
                    name.push(c);
                    self.next();
                }
                return name;
            }
            if name.is_empty() && is_special_param(ch) {
                self.next();
                return ch.to_string();
            }
            if !is_letter(ch) && !is_digit(ch) && ch != '_' {
                break;
            }
            name.push(ch);
            self.next();
        }
        name
    }

    fn get_env(&mut self, name: &str) -> (String, bool) {
        match self.envs.lookup(name) {
            Some(v) => {
                self.matches.insert(name.to_string());
                (v, true)
            }
            None => (String::new(), false),
        }
    }
}

fn is_special_param(c: char) -> bool {
    matches!(c, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0')
}

#[cfg(test)]
mod tests;
