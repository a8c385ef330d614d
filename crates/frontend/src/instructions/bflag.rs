//! Instruction flags (`--name[=value]`) (`frontend/dockerfile/instructions/bflag.go`).
//!
//! An instruction declares the flags it accepts, then [`BFlags::parse`] checks the words the
//! parser found: unknown flags (with a suggestion), repeats of single-valued flags, missing
//! values and non-boolean values of boolean flags are errors.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlagType {
    Bool,
    String,
    Strings,
}

#[derive(Debug, Clone)]
struct Flag {
    kind: FlagType,
    value: String,
    values: Vec<String>,
}

/// Declared flags and the words to check against them.
#[derive(Debug, Clone, Default)]
pub(crate) struct BFlags {
    args: Vec<String>,
    flags: BTreeMap<String, Flag>,
    used: Vec<String>,
}

impl BFlags {
    pub(crate) fn new(args: Vec<String>) -> Self {
        BFlags {
            args,
            ..Default::default()
        }
    }

    pub(crate) fn add_bool(&mut self, name: &str, default: bool) {
        self.flags.insert(
            name.into(),
            Flag {
                kind: FlagType::Bool,
                value: default.to_string(),
                values: vec![],
            },
        );
    }

    pub(crate) fn add_string(&mut self, name: &str, default: &str) {
        self.flags.insert(
            name.into(),
            Flag {
                kind: FlagType::String,
                value: default.into(),
                values: vec![],
            },
        );
    }

    pub(crate) fn add_strings(&mut self, name: &str) {
        self.flags.insert(
            name.into(),
            Flag {
                kind: FlagType::Strings,
                value: String::new(),
                values: vec![],
            },
        );
    }

    /// The value of a declared string or bool flag.
    pub(crate) fn value(&self, name: &str) -> String {
        self.flags
            .get(name)
            .map(|f| f.value.clone())
            .unwrap_or_default()
    }

    /// Whether a declared bool flag is true.
    pub(crate) fn is_true(&self, name: &str) -> bool {
        self.value(name) == "true"
    }

    /// All values of a declared multi-value flag.
    pub(crate) fn values(&self, name: &str) -> Vec<String> {
        self.flags
            .get(name)
            .map(|f| f.values.clone())
            .unwrap_or_default()
    }

    /// Flags that were given.
    pub(crate) fn used(&self) -> Vec<String> {
        self.used.clone()
    }

    /// Checks the words against the declarations and records the values.
    pub(crate) fn parse(&mut self) -> Result<(), String> {
        for arg in self.args.clone() {
            let Some(rest) = arg.strip_prefix("--") else {
                return Err(format!("arg should start with -- : {arg}"));
            };
            if rest.is_empty() {
                return Ok(());
            }
            let (name, value, has_eq) = match rest.find('=') {
                Some(i) => (&rest[..i], &rest[i + 1..], true),
                None => (rest, "", false),
            };
            let Some(flag) = self.flags.get_mut(name) else {
                let names: Vec<&str> = self.flags.keys().map(String::as_str).collect();
                return Err(crate::suggest::wrap(
                    format!("unknown flag: {name}"),
                    name,
                    &names,
                    true,
                ));
            };
            if self.used.iter().any(|u| u == name) && flag.kind != FlagType::Strings {
                return Err(format!("duplicate flag specified: {name}"));
            }
            if !self.used.iter().any(|u| u == name) {
                self.used.push(name.to_string());
            }
            match flag.kind {
                FlagType::Bool => {
                    if has_eq && value.is_empty() {
                        return Err(format!("missing a value on flag: {name}"));
                    }
                    let lower = value.to_lowercase();
                    if lower.is_empty() {
                        flag.value = "true".into();
                    } else if lower == "true" || lower == "false" {
                        flag.value = lower;
                    } else {
                        return Err(format!(
                            "expecting boolean value for flag {name}, not: {value}"
                        ));
                    }
                }
                FlagType::String => {
                    if !has_eq {
                        return Err(format!("missing a value on flag: {name}"));
                    }
                    flag.value = value.to_string();
                }
                FlagType::Strings => {
                    if !has_eq {
                        return Err(format!("missing a value on flag: {name}"));
                    }
                    flag.values.push(value.to_string());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> BFlags {
        let mut f = BFlags::new(args.iter().map(|s| s.to_string()).collect());
        f.add_bool("link", false);
        f.add_string("from", "");
        f.add_strings("mount");
        f
    }

    #[test]
    fn parsing() {
        let mut f = flags(&["--link", "--from=a", "--mount=x", "--mount=y"]);
        f.parse().unwrap();
        assert!(f.is_true("link"));
        assert_eq!(f.value("from"), "a");
        assert_eq!(f.values("mount"), vec!["x", "y"]);
        let mut f = flags(&["--link=FALSE"]);
        f.parse().unwrap();
        assert!(!f.is_true("link"));
    }

    #[test]
    fn errors() {
        let cases: &[(&[&str], &str)] = &[
            (&["--frm=a"], "unknown flag: frm (did you mean from?)"),
            (&["--nope"], "unknown flag: nope"),
            (&["--from=a", "--from=b"], "duplicate flag specified: from"),
            (&["--from"], "missing a value on flag: from"),
            (&["--link="], "missing a value on flag: link"),
            (
                &["--link=yes"],
                "expecting boolean value for flag link, not: yes",
            ),
            (&["-x"], "arg should start with -- : -x"),
        ];
        for (args, msg) in cases {
            assert_eq!(flags(args).parse().unwrap_err(), *msg, "{args:?}");
        }
    }
}
