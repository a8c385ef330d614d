//! Typed Dockerfile instructions and stages (`frontend/dockerfile/instructions` at v0.11.6).
//!
//! [`parse`] turns parser nodes into stages (each starting with `FROM`) and the meta `ARG`s that
//! precede the first stage. Flags are checked per instruction; values that may contain variables
//! are kept as written and expanded later, when the converter runs the instruction
//! ([`Command::expand`]). Labs-only flags of the dockerfile 1.5 syntax (`RUN --security`,
//! `ADD --checksum` use, `ADD <git url>`) are not enabled, as in upstream's stable build.

mod bflag;
pub(crate) mod gofmt;
pub mod runmount;

pub use runmount::{parse_mount, Mount};

pub(crate) use gofmt::parse_bool as parse_bool_go;
pub(crate) use runmount::csv_record as csv_fields;
pub(crate) use runmount::ram_in_bytes as ram_in_bytes_go;

use crate::parser::{self, go_quote, Heredoc, Node, ParseError, Range};
use bflag::BFlags;

/// An instruction's source text, name and lines (upstream's `withNameAndCode`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// The instruction line, trimmed (what upstream prints and stores in LLB descriptions).
    pub code: String,
    /// The instruction word as written.
    pub name: String,
    /// Its lines.
    pub location: Vec<Range>,
}

/// A `key=value` pair.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyValuePair {
    /// Key.
    pub key: String,
    /// Value.
    pub value: String,
}

impl std::fmt::Display for KeyValuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// An `ARG` entry: a name and maybe a default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyValuePairOptional {
    /// Name.
    pub key: String,
    /// Default, if given.
    pub value: Option<String>,
    /// Doc comment (`# NAME text` above the instruction).
    pub comment: String,
}

impl KeyValuePairOptional {
    /// The value or `""`.
    pub fn value_string(&self) -> String {
        self.value.clone().unwrap_or_default()
    }
}

/// An inline (heredoc) source of `COPY`/`ADD`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceContent {
    /// The heredoc name (the file name).
    pub path: String,
    /// The content.
    pub data: String,
    /// Whether variables in it are expanded.
    pub expand: bool,
}

/// Sources and destination of `COPY`/`ADD`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourcesAndDest {
    /// Destination.
    pub dest_path: String,
    /// Path (or URL) sources.
    pub source_paths: Vec<String>,
    /// Heredoc sources.
    pub source_contents: Vec<SourceContent>,
}

/// A heredoc body used by `RUN`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShellInlineFile {
    /// Heredoc name.
    pub name: String,
    /// Body.
    pub data: String,
    /// `<<-`.
    pub chomp: bool,
}

/// A command line that may be run through the shell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShellDependantCmdLine {
    /// The arguments (one joined string in shell form).
    pub cmd_line: Vec<String>,
    /// Heredocs.
    pub files: Vec<ShellInlineFile>,
    /// Shell form: the shell is prepended.
    pub prepend_shell: bool,
}

/// `HEALTHCHECK` settings (durations in nanoseconds).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthConfig {
    /// `["NONE"]`, `["CMD", args…]` or `["CMD-SHELL", cmd]`.
    pub test: Vec<String>,
    /// Interval.
    pub interval: i64,
    /// Timeout.
    pub timeout: i64,
    /// Start period.
    pub start_period: i64,
    /// Retries.
    pub retries: i64,
}

/// `RUN`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunCommand {
    /// Source.
    pub meta: Meta,
    /// What to run.
    pub cmd: ShellDependantCmdLine,
    /// Flags that were given.
    pub flags_used: Vec<String>,
    /// Raw `--mount` values.
    pub mount_values: Vec<String>,
    /// Mounts as parsed so far (only `from` before expansion).
    pub mounts: Vec<Mount>,
    /// `default`, `none` or `host`.
    pub network: String,
}

/// `COPY`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyCommand {
    /// Source.
    pub meta: Meta,
    /// What to copy.
    pub sources: SourcesAndDest,
    /// `--from`.
    pub from: String,
    /// `--chown`.
    pub chown: String,
    /// `--chmod`.
    pub chmod: String,
    /// `--link`.
    pub link: bool,
}

/// `ADD`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddCommand {
    /// Source.
    pub meta: Meta,
    /// What to add.
    pub sources: SourcesAndDest,
    /// `--chown`.
    pub chown: String,
    /// `--chmod`.
    pub chmod: String,
    /// `--link`.
    pub link: bool,
    /// `--keep-git-dir`.
    pub keep_git_dir: bool,
    /// `--checksum`.
    pub checksum: String,
}

/// A non-`FROM` instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Command {
    /// `ENV`.
    Env(Meta, Vec<KeyValuePair>),
    /// `MAINTAINER`.
    Maintainer(Meta, String),
    /// `LABEL` (`bool`: values are taken as they are, for labels from build options).
    Label(Meta, Vec<KeyValuePair>, bool),
    /// `ADD`.
    Add(AddCommand),
    /// `COPY`.
    Copy(CopyCommand),
    /// `ONBUILD`: the trigger expression.
    Onbuild(Meta, String),
    /// `WORKDIR`.
    Workdir(Meta, String),
    /// `RUN`.
    Run(RunCommand),
    /// `CMD`.
    Cmd(Meta, ShellDependantCmdLine),
    /// `HEALTHCHECK`.
    Healthcheck(Meta, HealthConfig),
    /// `ENTRYPOINT`.
    Entrypoint(Meta, ShellDependantCmdLine),
    /// `EXPOSE`.
    Expose(Meta, Vec<String>),
    /// `USER`.
    User(Meta, String),
    /// `VOLUME`.
    Volume(Meta, Vec<String>),
    /// `STOPSIGNAL`.
    StopSignal(Meta, String),
    /// `ARG`.
    Arg(Meta, Vec<KeyValuePairOptional>),
    /// `SHELL`.
    Shell(Meta, Vec<String>),
}

impl Command {
    /// The instruction's source, name and lines.
    pub fn meta(&self) -> &Meta {
        match self {
            Command::Env(m, _)
            | Command::Maintainer(m, _)
            | Command::Label(m, _, _)
            | Command::Onbuild(m, _)
            | Command::Workdir(m, _)
            | Command::Cmd(m, _)
            | Command::Healthcheck(m, _)
            | Command::Entrypoint(m, _)
            | Command::Expose(m, _)
            | Command::User(m, _)
            | Command::Volume(m, _)
            | Command::StopSignal(m, _)
            | Command::Arg(m, _)
            | Command::Shell(m, _) => m,
            Command::Add(c) => &c.meta,
            Command::Copy(c) => &c.meta,
            Command::Run(c) => &c.meta,
        }
    }

    /// Its lines.
    pub fn location(&self) -> &[Range] {
        &self.meta().location
    }

    /// Expands variables in the values upstream expands (`SupportsSingleWordExpansion`), then
    /// in heredoc contents marked for expansion (`SupportsSingleWordExpansionRaw`, with
    /// `raw` as expander).
    pub fn expand(
        &mut self,
        word: &dyn Fn(&str) -> Result<String, String>,
        raw: &dyn Fn(&str) -> Result<String, String>,
    ) -> Result<(), String> {
        fn kvps(
            v: &mut [KeyValuePair],
            f: &dyn Fn(&str) -> Result<String, String>,
        ) -> Result<(), String> {
            for kv in v {
                kv.key = f(&kv.key)?;
                kv.value = f(&kv.value)?;
            }
            Ok(())
        }
        fn sources(
            s: &mut SourcesAndDest,
            f: &dyn Fn(&str) -> Result<String, String>,
        ) -> Result<(), String> {
            for p in &mut s.source_paths {
                *p = f(p)?;
            }
            s.dest_path = f(&s.dest_path)?;
            Ok(())
        }
        fn contents(
            s: &mut SourcesAndDest,
            f: &dyn Fn(&str) -> Result<String, String>,
        ) -> Result<(), String> {
            for c in &mut s.source_contents {
                if c.expand {
                    c.data = f(&c.data)?;
                }
            }
            Ok(())
        }
        match self {
            Command::Env(_, v) => kvps(v, word),
            Command::Label(_, v, no_expand) => {
                if *no_expand {
                    Ok(())
                } else {
                    kvps(v, word)
                }
            }
            Command::Add(c) => {
                c.chown = word(&c.chown)?;
                c.checksum = word(&c.checksum)?;
                sources(&mut c.sources, word)?;
                contents(&mut c.sources, raw)
            }
            Command::Copy(c) => {
                c.chown = word(&c.chown)?;
                sources(&mut c.sources, word)?;
                contents(&mut c.sources, raw)
            }
            Command::Workdir(_, p) | Command::User(_, p) | Command::StopSignal(_, p) => {
                *p = word(p)?;
                Ok(())
            }
            Command::Volume(_, v) => {
                for x in v.iter_mut() {
                    *x = word(x)?;
                }
                Ok(())
            }
            Command::Arg(_, args) => {
                for a in args.iter_mut() {
                    a.key = word(&a.key)?;
                    if let Some(v) = &a.value {
                        a.value = Some(word(v)?);
                    }
                }
                Ok(())
            }
            Command::Run(r) => {
                let mut mounts = vec![];
                for v in &r.mount_values {
                    mounts.push(parse_mount(v, Some(word))?);
                }
                r.mounts = mounts;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// A build stage: a `FROM` and the instructions after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stage {
    /// `AS` name, lowercased (empty if none).
    pub name: String,
    /// Instructions.
    pub commands: Vec<Command>,
    /// The image or stage after `FROM`, as written.
    pub base_name: String,
    /// `--platform`.
    pub platform: String,
    /// Doc comment.
    pub comment: String,
    /// The `FROM` line.
    pub source_code: String,
    /// Its lines.
    pub location: Vec<Range>,
}

/// A parsed instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    /// `FROM`.
    Stage(Stage),
    /// Anything else.
    Command(Command),
}

/// The instruction names, for suggestions.
const ALL_INSTRUCTIONS: &[&str] = &[
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

struct Request<'a> {
    command: &'a str,
    args: Vec<String>,
    heredocs: &'a [Heredoc],
    json: bool,
    flags: BFlags,
    original: &'a str,
    location: Vec<Range>,
    comments: &'a [String],
}

impl Request<'_> {
    fn meta(&self) -> Meta {
        Meta {
            code: self.original.trim().to_string(),
            name: self.command.to_string(),
            location: self.location.clone(),
        }
    }
}

fn node_args(node: &Node) -> Vec<String> {
    let mut out = vec![];
    for arg in &node.next {
        if arg.children.is_empty() {
            out.push(arg.value.clone());
        } else if arg.children.len() == 1 {
            out.push(arg.children[0].value.clone());
            out.extend(node_args(&arg.children[0]));
        }
    }
    out
}

fn err_at_least_one(cmd: &str) -> String {
    format!("{cmd} requires at least one argument")
}

fn err_exactly_one(cmd: &str) -> String {
    format!("{cmd} requires exactly one argument")
}

fn err_no_destination(cmd: &str) -> String {
    format!("{cmd} requires at least two arguments, but only one was provided. Destination could not be determined")
}

/// Converts one parser node into an instruction. Errors carry the node's lines.
pub fn parse_instruction(node: &Node) -> Result<Instruction, ParseError> {
    let req = Request {
        command: &node.value,
        args: node_args(node),
        heredocs: &node.heredocs,
        json: node.json,
        flags: BFlags::new(node.flags.clone()),
        original: &node.original,
        location: node.location(),
        comments: &node.prev_comment,
    };
    parse_request(req).map_err(|message| ParseError {
        message,
        location: node.location(),
    })
}

/// Like [`parse_instruction`] but `FROM` is an error (ONBUILD triggers).
pub fn parse_command(node: &Node) -> Result<Command, ParseError> {
    match parse_instruction(node)? {
        Instruction::Command(c) => Ok(c),
        Instruction::Stage(_) => Err(ParseError {
            message: "*instructions.Stage is not a command type".into(),
            location: node.location(),
        }),
    }
}

fn parse_request(mut req: Request<'_>) -> Result<Instruction, String> {
    let lower = req.command.to_ascii_lowercase();
    let cmd = match lower.as_str() {
        "env" => {
            req.flags.parse()?;
            Command::Env(req.meta(), parse_kvps(&req.args, "ENV")?)
        }
        "maintainer" => {
            if req.args.len() != 1 {
                return Err(err_exactly_one("MAINTAINER"));
            }
            req.flags.parse()?;
            Command::Maintainer(req.meta(), req.args[0].clone())
        }
        "label" => {
            req.flags.parse()?;
            Command::Label(req.meta(), parse_kvps(&req.args, "LABEL")?, false)
        }
        "add" => {
            if req.args.len() < 2 {
                return Err(err_no_destination("ADD"));
            }
            req.flags.add_string("chown", "");
            req.flags.add_string("chmod", "");
            req.flags.add_bool("link", false);
            req.flags.add_bool("keep-git-dir", false);
            req.flags.add_string("checksum", "");
            req.flags.parse()?;
            let sources = parse_sources_and_dest(&req, "ADD")?;
            Command::Add(AddCommand {
                meta: req.meta(),
                sources,
                chown: req.flags.value("chown"),
                chmod: req.flags.value("chmod"),
                link: req.flags.is_true("link"),
                keep_git_dir: req.flags.is_true("keep-git-dir"),
                checksum: req.flags.value("checksum"),
            })
        }
        "copy" => {
            if req.args.len() < 2 {
                return Err(err_no_destination("COPY"));
            }
            req.flags.add_string("chown", "");
            req.flags.add_string("from", "");
            req.flags.add_string("chmod", "");
            req.flags.add_bool("link", false);
            req.flags.parse()?;
            let sources = parse_sources_and_dest(&req, "COPY")?;
            Command::Copy(CopyCommand {
                meta: req.meta(),
                sources,
                from: req.flags.value("from"),
                chown: req.flags.value("chown"),
                chmod: req.flags.value("chmod"),
                link: req.flags.is_true("link"),
            })
        }
        "from" => return parse_from(req).map(Instruction::Stage),
        "onbuild" => {
            if req.args.is_empty() {
                return Err(err_at_least_one("ONBUILD"));
            }
            req.flags.parse()?;
            let trigger = req.args[0].trim().to_uppercase();
            match trigger.as_str() {
                "ONBUILD" => {
                    return Err("Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed".into())
                }
                "MAINTAINER" | "FROM" => {
                    return Err(format!("{trigger} isn't allowed as an ONBUILD trigger"))
                }
                _ => {}
            }
            let mut original = strip_onbuild_prefix(req.original);
            for h in req.heredocs {
                original.push('\n');
                original.push_str(&h.content);
                original.push_str(&h.name);
            }
            Command::Onbuild(req.meta(), original)
        }
        "workdir" => {
            if req.args.len() != 1 {
                return Err(err_exactly_one("WORKDIR"));
            }
            req.flags.parse()?;
            Command::Workdir(req.meta(), req.args[0].clone())
        }
        "run" => {
            req.flags.add_strings("mount");
            req.flags.add_string("network", "default");
            req.flags.parse()?;
            let flags_used = req.flags.used();
            let cmd = shell_dependent(&req, false);
            let mount_values = req.flags.values("mount");
            let mut mounts = vec![];
            for v in &mount_values {
                mounts.push(parse_mount(v, None)?);
            }
            let network = req.flags.value("network");
            if !matches!(network.as_str(), "default" | "none" | "host") {
                return Err(format!("invalid network mode {}", go_quote(&network)));
            }
            Command::Run(RunCommand {
                meta: req.meta(),
                cmd,
                flags_used,
                mount_values,
                mounts,
                network,
            })
        }
        "cmd" => {
            req.flags.parse()?;
            Command::Cmd(req.meta(), shell_dependent(&req, false))
        }
        "healthcheck" => return parse_healthcheck(req).map(Instruction::Command),
        "entrypoint" => {
            req.flags.parse()?;
            Command::Entrypoint(req.meta(), shell_dependent(&req, true))
        }
        "expose" => {
            if req.args.is_empty() {
                return Err(err_at_least_one("EXPOSE"));
            }
            req.flags.parse()?;
            let mut ports = req.args.clone();
            ports.sort();
            Command::Expose(req.meta(), ports)
        }
        "user" => {
            if req.args.len() != 1 {
                return Err(err_exactly_one("USER"));
            }
            req.flags.parse()?;
            Command::User(req.meta(), req.args[0].clone())
        }
        "volume" => {
            if req.args.is_empty() {
                return Err(err_at_least_one("VOLUME"));
            }
            req.flags.parse()?;
            let mut vols = vec![];
            for v in &req.args {
                let v = v.trim_matches(crate::shell::is_space);
                if v.is_empty() {
                    return Err("VOLUME specified can not be an empty string".into());
                }
                vols.push(v.to_string());
            }
            Command::Volume(req.meta(), vols)
        }
        "stopsignal" => {
            if req.args.len() != 1 {
                return Err(err_exactly_one("STOPSIGNAL"));
            }
            Command::StopSignal(req.meta(), req.args[0].clone())
        }
        "arg" => {
            if req.args.is_empty() {
                return Err(err_at_least_one("ARG"));
            }
            let mut pairs = vec![];
            for a in &req.args {
                let mut kv = KeyValuePairOptional::default();
                match a.split_once('=') {
                    Some((k, v)) => {
                        if k.is_empty() {
                            return Err("ARG names can not be blank".into());
                        }
                        kv.key = k.to_string();
                        kv.value = Some(v.to_string());
                    }
                    None => kv.key = a.clone(),
                }
                kv.comment = get_comment(req.comments, &kv.key);
                pairs.push(kv);
            }
            Command::Arg(req.meta(), pairs)
        }
        "shell" => {
            req.flags.parse()?;
            let shell = handle_json_args(&req.args, req.json);
            if shell.is_empty() {
                return Err(err_at_least_one("SHELL"));
            }
            if !req.json {
                return Err("SHELL requires the arguments to be in JSON form".into());
            }
            Command::Shell(req.meta(), shell)
        }
        _ => {
            return Err(crate::suggest::wrap(
                format!("unknown instruction: {}", req.command),
                req.command,
                ALL_INSTRUCTIONS,
                false,
            ))
        }
    };
    Ok(Instruction::Command(cmd))
}

/// `(?i)^\s*ONBUILD\s*` removed.
fn strip_onbuild_prefix(s: &str) -> String {
    let is_re_space = |c: char| matches!(c, '\t' | '\n' | '\x0c' | '\r' | ' ');
    let t = s.trim_start_matches(is_re_space);
    if t.len() >= 7 && t[..7].eq_ignore_ascii_case("onbuild") {
        t[7..].trim_start_matches(is_re_space).to_string()
    } else {
        s.to_string()
    }
}

fn parse_kvps(args: &[String], cmd: &str) -> Result<Vec<KeyValuePair>, String> {
    if args.is_empty() {
        return Err(err_at_least_one(cmd));
    }
    if !args.len().is_multiple_of(2) {
        return Err(format!("Bad input to {cmd}, too many arguments"));
    }
    let mut out = vec![];
    for p in args.chunks(2) {
        if p[0].is_empty() {
            return Err(format!("{cmd} names can not be blank"));
        }
        out.push(KeyValuePair {
            key: p[0].clone(),
            value: p[1].clone(),
        });
    }
    Ok(out)
}

fn parse_sources_and_dest(req: &Request<'_>, cmd: &str) -> Result<SourcesAndDest, String> {
    let (srcs, dest) = req.args.split_at(req.args.len() - 1);
    let dest = dest[0].clone();
    if parser::must_parse_heredoc(&dest).is_some() {
        return Err(format!("{cmd} cannot accept a heredoc as a destination"));
    }
    let mut out = SourcesAndDest {
        dest_path: dest,
        ..Default::default()
    };
    for src in srcs {
        if let Some(h) = parser::must_parse_heredoc(src) {
            // the last heredoc of that name wins, as in upstream's lookup map
            let content = req
                .heredocs
                .iter()
                .rev()
                .find(|x| x.name == h.name)
                .map(|x| x.content.clone())
                .unwrap_or_default();
            let content = if h.chomp {
                parser::chomp_heredoc_content(&content)
            } else {
                content
            };
            out.source_contents.push(SourceContent {
                data: content,
                path: h.name,
                expand: h.expand,
            });
        } else {
            out.source_paths.push(src.clone());
        }
    }
    Ok(out)
}

fn handle_json_args(args: &[String], json: bool) -> Vec<String> {
    if args.is_empty() {
        return vec![];
    }
    if json {
        return args.to_vec();
    }
    vec![args.join(" ")]
}

fn shell_dependent(req: &Request<'_>, _empty_as_nil: bool) -> ShellDependantCmdLine {
    ShellDependantCmdLine {
        cmd_line: handle_json_args(&req.args, req.json),
        files: req
            .heredocs
            .iter()
            .map(|h| ShellInlineFile {
                name: h.name.clone(),
                data: h.content.clone(),
                chomp: h.chomp,
            })
            .collect(),
        prepend_shell: !req.json,
    }
}

fn parse_from(mut req: Request<'_>) -> Result<Stage, String> {
    let name = parse_build_stage_name(&req.args)?;
    req.flags.add_string("platform", "");
    req.flags.parse()?;
    Ok(Stage {
        base_name: req.args[0].clone(),
        comment: get_comment(req.comments, &name),
        name,
        commands: vec![],
        platform: req.flags.value("platform"),
        source_code: req.original.trim().to_string(),
        location: req.location.clone(),
    })
}

fn parse_build_stage_name(args: &[String]) -> Result<String, String> {
    if args.len() == 3 && args[1].eq_ignore_ascii_case("as") {
        let name = args[2].to_lowercase();
        let mut chars = name.chars();
        let ok = chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' || c == '.'
            });
        if !ok {
            return Err(format!(
                "invalid name for build stage: {}, name can't start with a number or contain symbols",
                go_quote(&args[2])
            ));
        }
        return Ok(name);
    }
    if args.len() != 1 {
        return Err("FROM requires either one or three arguments".into());
    }
    Ok(String::new())
}

fn parse_opt_interval(name: &str, value: &str) -> Result<i64, String> {
    if value.is_empty() {
        return Ok(0);
    }
    let d = gofmt::parse_duration(value)?;
    if d == 0 {
        return Ok(0);
    }
    // container.MinimumDuration: 1ms
    if d < 1_000_000 {
        return Err(format!(
            "Interval {} cannot be less than 1ms",
            go_quote(name)
        ));
    }
    Ok(d)
}

fn parse_healthcheck(mut req: Request<'_>) -> Result<Command, String> {
    if req.args.is_empty() {
        return Err(err_at_least_one("HEALTHCHECK"));
    }
    let typ = req.args[0].to_uppercase();
    let args = req.args[1..].to_vec();
    if typ == "NONE" {
        if !args.is_empty() {
            return Err("HEALTHCHECK NONE takes no arguments".into());
        }
        return Ok(Command::Healthcheck(
            req.meta(),
            HealthConfig {
                test: vec![typ],
                ..Default::default()
            },
        ));
    }
    req.flags.add_string("interval", "");
    req.flags.add_string("timeout", "");
    req.flags.add_string("start-period", "");
    req.flags.add_string("retries", "");
    req.flags.parse()?;
    let mut hc = HealthConfig::default();
    match typ.as_str() {
        "CMD" => {
            let cmd = handle_json_args(&args, req.json);
            if cmd.is_empty() {
                return Err("Missing command after HEALTHCHECK CMD".into());
            }
            let t = if req.json { "CMD" } else { "CMD-SHELL" };
            hc.test = std::iter::once(t.to_string()).chain(cmd).collect();
        }
        _ => {
            return Err(format!(
                "Unknown type {} in HEALTHCHECK (try CMD)",
                go_quote(&typ)
            ))
        }
    }
    hc.interval = parse_opt_interval("interval", &req.flags.value("interval"))?;
    hc.timeout = parse_opt_interval("timeout", &req.flags.value("timeout"))?;
    hc.start_period = parse_opt_interval("start-period", &req.flags.value("start-period"))?;
    let retries = req.flags.value("retries");
    if !retries.is_empty() {
        let r = gofmt::parse_int(&retries, 32).ok_or_else(|| {
            format!(
                "strconv.ParseInt: parsing {}: invalid syntax",
                go_quote(&retries)
            )
        })?;
        if r < 0 {
            return Err(format!("--retries cannot be negative ({r})"));
        }
        hc.retries = r;
    }
    Ok(Command::Healthcheck(req.meta(), hc))
}

fn get_comment(comments: &[String], name: &str) -> String {
    if name.is_empty() {
        return String::new();
    }
    let prefix = format!("{name} ");
    for line in comments {
        if let Some(rest) = line.strip_prefix(&prefix) {
            return rest.to_string();
        }
    }
    String::new()
}

/// The stages and the meta `ARG`s (those before the first `FROM`) of a parsed Dockerfile.
pub fn parse(nodes: &[Node]) -> Result<(Vec<Stage>, Vec<Command>), ParseError> {
    let mut stages: Vec<Stage> = vec![];
    let mut meta_args: Vec<Command> = vec![];
    for n in nodes {
        let inst = parse_instruction(n).map_err(|e| ParseError {
            message: format!(
                "dockerfile parse error on line {}: {}",
                n.start_line, e.message
            ),
            location: e.location,
        })?;
        match inst {
            Instruction::Command(c @ Command::Arg(..)) if stages.is_empty() => meta_args.push(c),
            Instruction::Stage(s) => stages.push(s),
            Instruction::Command(c) => match stages.last_mut() {
                Some(s) => s.commands.push(c),
                None => {
                    return Err(ParseError {
                        message: "no build stage in current context".into(),
                        location: n.location(),
                    })
                }
            },
        }
    }
    Ok((stages, meta_args))
}

#[cfg(test)]
mod tests;
