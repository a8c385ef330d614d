//! "did you mean …?" hints on errors (`util/suggest` at v0.11.6): the closest option within an
//! edit distance of 2 is appended to the message.

/// Levenshtein distance over characters.
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn match_case(val: &str, orig: &str) -> String {
    if orig == orig.to_lowercase() {
        val.to_lowercase()
    } else if orig == orig.to_uppercase() {
        val.to_uppercase()
    } else {
        val.to_string()
    }
}

/// `message` with ` (did you mean X?)` when an option is close to `val`. Options are tried in
/// sorted order (upstream iterates maps, so ties there are arbitrary); an exact match means the
/// error is unrelated to the value and adds nothing.
pub(crate) fn wrap(message: String, val: &str, options: &[&str], case_sensitive: bool) -> String {
    let v = if case_sensitive {
        val.to_string()
    } else {
        val.to_lowercase()
    };
    let mut sorted: Vec<&str> = options.to_vec();
    sorted.sort_unstable();
    let mut best: Option<String> = None;
    let mut min = 3;
    for opt in sorted {
        let o = if case_sensitive {
            opt.to_string()
        } else {
            opt.to_lowercase()
        };
        if v == o {
            return message;
        }
        let d = distance(&v, &o);
        if d < min {
            best = Some(if case_sensitive {
                o
            } else {
                match_case(&o, val)
            });
            min = d;
        }
    }
    match best {
        Some(m) => format!("{message} (did you mean {m}?)"),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        let opts = ["RUN", "COPY", "FROM"];
        assert_eq!(
            wrap("unknown instruction: RUNN".into(), "RUNN", &opts, false),
            "unknown instruction: RUNN (did you mean RUN?)"
        );
        assert_eq!(
            wrap("x".into(), "cpy", &opts, false),
            "x (did you mean copy?)"
        );
        assert_eq!(wrap("x".into(), "zzzzzz", &opts, false), "x");
        assert_eq!(wrap("x".into(), "run", &opts, false), "x");
        assert_eq!(distance("kitten", "sitting"), 3);
    }
}
