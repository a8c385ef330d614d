//! Plain progress lines from `Control.Status`, in the shape of buildctl's `--progress=plain`:
//! `#N name` when a vertex starts, its log lines, then `#N DONE 1.2s`, `#N CACHED` or
//! `#N ERROR: …`. Vertices are numbered in the order they first start.

use protos::moby::buildkit::v1 as control;
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

/// Turns status updates into text lines.
#[derive(Debug, Default)]
pub struct Printer {
    numbers: HashMap<String, usize>,
    names: HashMap<String, String>,
    finished: HashSet<String>,
    statuses_done: HashSet<(String, String)>,
}

fn seconds(a: &prost_types::Timestamp, b: &prost_types::Timestamp) -> f64 {
    ((b.seconds - a.seconds) as f64 + (b.nanos - a.nanos) as f64 / 1e9).max(0.0)
}

impl Printer {
    fn number(&mut self, digest: &str) -> usize {
        let next = self.numbers.len() + 1;
        *self.numbers.entry(digest.to_string()).or_insert(next)
    }

    /// The text for one status update.
    pub fn update(&mut self, r: &control::StatusResponse) -> String {
        let mut out = String::new();
        for v in &r.vertexes {
            if v.started.is_none() && !v.cached && v.error.is_empty() {
                continue;
            }
            let known = self.numbers.contains_key(&v.digest);
            let n = self.number(&v.digest);
            if !known {
                let _ = writeln!(out, "#{n} {}", v.name);
                self.names.insert(v.digest.clone(), v.name.clone());
            }
            if self.finished.contains(&v.digest) {
                continue;
            }
            if !v.error.is_empty() {
                let _ = writeln!(out, "#{n} ERROR: {}", v.error);
                self.finished.insert(v.digest.clone());
            } else if v.cached {
                let _ = writeln!(out, "#{n} CACHED");
                self.finished.insert(v.digest.clone());
            } else if let (Some(s), Some(c)) = (&v.started, &v.completed) {
                let _ = writeln!(out, "#{n} DONE {:.1}s", seconds(s, c));
                self.finished.insert(v.digest.clone());
            }
        }
        for s in &r.statuses {
            if s.completed.is_none() {
                continue;
            }
            if !self.statuses_done.insert((s.vertex.clone(), s.id.clone())) {
                continue;
            }
            let n = self.number(&s.vertex);
            let amount = if s.total > 0 {
                format!(" {}/{}", s.current, s.total)
            } else if s.current > 0 {
                format!(" {}", s.current)
            } else {
                String::new()
            };
            let _ = writeln!(out, "#{n} {}{amount} done", s.id);
        }
        for l in &r.logs {
            let n = self.number(&l.vertex);
            for line in String::from_utf8_lossy(&l.msg).lines() {
                let _ = writeln!(out, "#{n} {line}");
            }
        }
        for w in &r.warnings {
            let n = self.number(&w.vertex);
            let _ = writeln!(out, "#{n} WARN: {}", String::from_utf8_lossy(&w.short));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: i64, n: i32) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp {
            seconds: s,
            nanos: n,
        })
    }

    #[test]
    fn numbers_and_outcomes() {
        let mut p = Printer::default();
        let v = |d: &str, name: &str| control::Vertex {
            digest: d.into(),
            name: name.into(),
            ..Default::default()
        };
        let mut a = v("sha256:a", "[1/2] exec");
        a.started = ts(10, 0);
        let out = p.update(&control::StatusResponse {
            vertexes: vec![a.clone(), v("sha256:b", "not started")],
            logs: vec![control::VertexLog {
                vertex: "sha256:a".into(),
                stream: 1,
                msg: "hello\nworld\n".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        assert_eq!(out, "#1 [1/2] exec\n#1 hello\n#1 world\n");
        a.completed = ts(11, 500_000_000);
        let mut c = v("sha256:c", "base");
        c.cached = true;
        let mut e = v("sha256:e", "bad");
        e.started = ts(12, 0);
        e.error = "exit code 1".into();
        let out = p.update(&control::StatusResponse {
            vertexes: vec![a.clone(), c, e],
            ..Default::default()
        });
        assert_eq!(
            out,
            "#1 DONE 1.5s\n#2 base\n#2 CACHED\n#3 bad\n#3 ERROR: exit code 1\n"
        );
        // Repeated updates of finished vertices print nothing.
        let out = p.update(&control::StatusResponse {
            vertexes: vec![a],
            ..Default::default()
        });
        assert_eq!(out, "");
    }
}
