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

/// What an earlier report contributes when only some scenario groups ran (`--only`): its result
/// rows for the scenarios this run did not measure, and where those rows came from, so one
/// `docs/benchmarks.md` can hold every scenario without anyone editing it by hand.
#[derive(Debug, Default, PartialEq)]
pub struct Earlier {
    /// `(scenario, table line)` for the scenarios not run now, in the earlier report's order.
    pub rows: Vec<(u32, String)>,
    /// The earlier report's provenance lines (its `## Runs` entries, or its machine section's
    /// `run:`/commit/load lines for a report written before carrying over existed).
    pub runs: Vec<String>,
    /// The earlier headline line, when scenario 1 is among the carried-over rows.
    pub headline: Option<String>,
    /// `(scenario, text)` of the earlier `### Scenario N…` sections below the results table
    /// (e.g. scenario 9's per-phase breakdown) for the scenarios not run now.
    pub sections: Vec<(u32, String)>,
}

/// The scenario a report section is about, from its heading (`### Scenario 9: …`).
pub fn section_scenario(text: &str) -> Option<u32> {
    let rest = text.strip_prefix("### Scenario ")?;
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}

/// This run's `sections` and the `earlier` ones, ordered by scenario.
pub fn merged_sections(sections: &[String], earlier: &Earlier) -> Vec<String> {
    let mut all: Vec<(u32, String)> = sections
        .iter()
        .map(|s| (section_scenario(s).unwrap_or(u32::MAX), s.clone()))
        .collect();
    all.extend(earlier.sections.iter().cloned());
    all.sort_by_key(|(n, _)| *n);
    all.into_iter().map(|(_, s)| s).collect()
}

/// The scenario number of a Results table line (`| 7 | …`), if it is one.
fn row_scenario(line: &str) -> Option<u32> {
    let rest = line.strip_prefix("| ")?;
    let (n, _) = rest.split_once(" |")?;
    n.trim().parse().ok()
}

/// A `## Runs` entry (`- scenarios [a, b]: what run`) with the scenarios in `ran` left out, or
/// `None` when none of its scenarios is carried over.
fn carried_run(line: &str, ran: &[u32]) -> Option<String> {
    let rest = line.strip_prefix("- scenarios [")?;
    let (list, what) = rest.split_once("]: ")?;
    let kept: Vec<u32> = list
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .filter(|n| !ran.contains(n))
        .collect();
    (!kept.is_empty()).then(|| format!("- scenarios {kept:?}: {what}"))
}

/// One `## Runs` entry for scenarios measured in one run.
pub fn run_entry(scenarios: &[u32], what: &str) -> String {
    format!("- scenarios {scenarios:?}: {what}")
}

/// Reads the rows and provenance of `old` (an earlier report) for every scenario not in `ran`.
pub fn earlier(old: &str, ran: &[u32]) -> Earlier {
    let mut e = Earlier::default();
    let mut section = "";
    let mut machine_run = vec![];
    // The `### Scenario N` section being read (below the results table), if it is carried over.
    let mut open: Option<(u32, String)> = None;
    for line in old.lines() {
        if line.starts_with("## ") || line.starts_with("### ") {
            e.sections.extend(open.take());
            if let Some(n) = section_scenario(line).filter(|n| !ran.contains(n)) {
                open = Some((n, String::new()));
            }
        }
        if let Some((_, text)) = &mut open {
            text.push_str(line);
            text.push('\n');
            continue;
        }
        if let Some(h) = line.strip_prefix("## ") {
            section = match h {
                "Machine" => "machine",
                "Runs" => "runs",
                "Results" => "results",
                _ => "",
            };
            continue;
        }
        match section {
            "results" => {
                if let Some(n) = row_scenario(line) {
                    if !ran.contains(&n) {
                        e.rows.push((n, line.to_string()));
                    }
                }
            }
            "runs" => {
                if let Some(r) = carried_run(line, ran) {
                    e.runs.push(r)
                }
            }
            "machine"
                if line.starts_with("- run:")
                    || line.starts_with("- berth commit")
                    || line.starts_with("- load average") =>
            {
                machine_run.push(line.trim_start_matches("- ").to_string())
            }
            "" if line.starts_with("**Headline") => e.headline = Some(line.to_string()),
            _ => {}
        }
    }
    e.sections.extend(open.take());
    if e.runs.is_empty() && !machine_run.is_empty() {
        let mut kept: Vec<u32> = e.rows.iter().map(|(n, _)| *n).collect();
        kept.dedup();
        e.runs
            .push(format!("- scenarios {kept:?}: {}", machine_run.join("; ")));
    }
    if !e.rows.iter().any(|(n, _)| *n == 1) {
        e.headline = None;
    }
    e
}

/// The table of this run's `rows` merged with `earlier` rows, ordered by scenario (this run's
/// rows first within a scenario that both hold, which `earlier` never does).
pub fn merged_table(rows: &[Row], earlier: &Earlier) -> String {
    let fresh = table(rows);
    let mut lines = fresh.lines();
    let mut s = String::new();
    for _ in 0..2 {
        if let Some(h) = lines.next() {
            let _ = writeln!(s, "{h}");
        }
    }
    let mut all: Vec<(u32, String)> = lines
        .filter_map(|l| Some((row_scenario(l)?, l.to_string())))
        .collect();
    all.extend(earlier.rows.iter().cloned());
    all.sort_by_key(|(n, _)| *n);
    for (_, l) in all {
        let _ = writeln!(s, "{l}");
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

    #[test]
    fn earlier_rows_are_carried_over_for_scenarios_not_run() {
        let old = "# Benchmarks\n\n**Headline (scenario 1…):** x\n\n## Machine\n\n- cores: 2\n\
                   - berth commit (x): abc\n- run: 2026-11-28 06:30 UTC, total 1 min\n\
                   - load average (1 min) at start 1.9, at end 2.1: …\n\n## Results\n\n\
                   | # | case | n | min | median | max | ratio (of medians) | notes |\n\
                   |---|---|---|---|---|---|---|---|\n\
                   | 1 | one | 3 | 1 ms | **1 ms** | 1 ms |  |  |\n\
                   | 7 | old seven | 3 | 1 ms | **1 ms** | 1 ms |  |  |\n\
                   | 8 | eight | 3 | 1 ms | **1 ms** | 1 ms |  |  |\n\n## Not measured yet\n";
        let e = earlier(old, &[7]);
        assert_eq!(
            e.rows.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            vec![1, 8],
            "{e:?}"
        );
        assert_eq!(e.headline.as_deref(), Some("**Headline (scenario 1…):** x"));
        assert_eq!(e.runs.len(), 1);
        assert!(
            e.runs[0].starts_with("- scenarios [1, 8]: berth commit (x): abc; run: 2026-11-28"),
            "{:?}",
            e.runs
        );
        let now = vec![Row {
            scenario: 7,
            case: "new seven".into(),
            samples: vec![0.5],
            unit: Unit::Secs,
            ratio: String::new(),
            note: String::new(),
        }];
        let t = merged_table(&now, &e);
        let cases: Vec<&str> = t
            .lines()
            .skip(2)
            .map(|l| l.split(" | ").nth(1).unwrap())
            .collect();
        assert_eq!(cases, vec!["one", "new seven", "eight"], "{t}");
        // A report with its own `## Runs` section passes those entries on unchanged, and no
        // headline survives when scenario 1 is re-run.
        let with_runs = "## Runs\n\n- scenarios [7, 8]: r1\n- scenarios [1]: r0\n\n## Results\n\n| 8 | e | 1 | 1 ms | **1 ms** | 1 ms |  |  |\n| 1 | o | 1 | 1 ms | **1 ms** | 1 ms |  |  |\n";
        let e = earlier(with_runs, &[1, 7]);
        assert_eq!(e.runs, vec![run_entry(&[8], "r1")]);
        assert_eq!(e.headline, None);
    }

    #[test]
    fn earlier_sections_are_carried_over_for_scenarios_not_run() {
        let old = "## Results\n\n| 9 | x | 1 | 1 ms | **1 ms** | 1 ms |  |  |\n\n\
                   ### Scenario 9: phases\n\n| span | n |\n|---|---|\n| `solve` | 7 |\n\n\
                   ### Scenario 10: other\n\ntext\n\n## Not measured yet\n\n- x\n";
        let e = earlier(old, &[10]);
        assert_eq!(
            e.sections,
            vec![(
                9,
                "### Scenario 9: phases\n\n| span | n |\n|---|---|\n| `solve` | 7 |\n\n"
                    .to_string()
            )]
        );
        assert_eq!(
            e.rows.len(),
            1,
            "the table row before the section is kept: {e:?}"
        );
        let merged = merged_sections(&["### Scenario 10: new\n".to_string()], &e);
        assert_eq!(
            merged
                .iter()
                .map(|s| section_scenario(s))
                .collect::<Vec<_>>(),
            vec![Some(9), Some(10)]
        );
        // Re-running 9 drops its old section.
        assert!(earlier(old, &[9, 10]).sections.is_empty());
    }
}
