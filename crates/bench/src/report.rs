//! Samples, their summary (min / median / max) and the Markdown report.

use std::fmt::Write as _;
use std::time::Duration;

/// What a row's samples are.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Wall-clock seconds.
    Secs,
    /// Bytes (memory).
    Bytes,
}

/// One measured case.
pub struct Row {
    /// Scenario number.
    pub scenario: u32,
    /// What was measured in this row.
    pub case: String,
    /// The measured values (warm-up excluded).
    pub samples: Vec<f64>,
    /// Unit of the samples.
    pub unit: Unit,
    /// A ratio or comparison, already phrased.
    pub ratio: String,
    /// Counts and other facts of the runs.
    pub note: String,
}

/// Median of `v` (mean of the middle two for an even count); 0 when empty.
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// Seconds of `d`.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn fmt(v: f64, unit: Unit) -> String {
    match unit {
        Unit::Secs if v < 1.0 => format!("{:.0} ms", v * 1000.0),
        Unit::Secs => format!("{v:.2} s"),
        Unit::Bytes => format!("{:.1} MiB", v / (1u64 << 20) as f64),
    }
}

/// `a / b` phrased as a ratio.
pub fn ratio(label: &str, a: f64, b: f64) -> String {
    if b <= 0.0 {
        return format!("{label}: n/a");
    }
    format!("{label} = {:.1}×", a / b)
}

/// The Markdown table of `rows`.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str("| # | case | n | min | median | max | ratio (of medians) | notes |\n");
    s.push_str("|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        if r.samples.is_empty() {
            let _ = writeln!(
                s,
                "| {} | {} | 0 | — | — | — | — | {} |",
                r.scenario, r.case, r.note
            );
            continue;
        }
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | **{}** | {} | {} | {} |",
            r.scenario,
            r.case,
            r.samples.len(),
            fmt(min(&r.samples), r.unit),
            fmt(median(&r.samples), r.unit),
            fmt(max(&r.samples), r.unit),
            r.ratio,
            r.note
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        for (v, m) in [
            (vec![], 0.0),
            (vec![3.0], 3.0),
            (vec![3.0, 1.0], 2.0),
            (vec![5.0, 1.0, 3.0], 3.0),
            (vec![4.0, 1.0, 3.0, 10.0], 3.5),
        ] {
            assert_eq!(median(&v), m, "{v:?}");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(fmt(0.0123, Unit::Secs), "12 ms");
        assert_eq!(fmt(2.5, Unit::Secs), "2.50 s");
        assert_eq!(fmt((3u64 << 20) as f64, Unit::Bytes), "3.0 MiB");
        assert_eq!(ratio("x", 10.0, 4.0), "x = 2.5×");
        assert_eq!(ratio("x", 1.0, 0.0), "x: n/a");
    }
}
