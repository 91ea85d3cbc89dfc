//! The table every figure lands in: printed as it fills, and rendered as
//! Markdown for docs/PERFORMANCE.md.

use std::fmt::Write as _;
use std::time::Duration;

pub struct Row {
    pub figure: String,
    pub value: String,
    pub baseline: String,
    pub ratio: String,
    pub target: String,
    pub verdict: Verdict,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// Reported for information: no target.
    Info,
}

impl Verdict {
    pub fn of(met: bool) -> Self {
        if met { Verdict::Met } else { Verdict::Missed }
    }

    fn as_str(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "MISSED",
            Verdict::Info => "",
        }
    }
}

struct Section {
    title: String,
    rows: Vec<Row>,
    notes: Vec<String>,
}

#[derive(Default)]
pub struct Report {
    sections: Vec<Section>,
}

impl Report {
    pub fn section(&mut self, title: &str) {
        println!("\n## {title}");
        println!(
            "{:<58} {:>14} {:>14} {:>7} {:>16} {:>6}",
            "figure", "vtpmd", "baseline", "ratio", "target", ""
        );
        self.sections.push(Section {
            title: title.to_owned(),
            rows: Vec::new(),
            notes: Vec::new(),
        });
    }

    pub fn row(&mut self, row: Row) {
        println!(
            "{:<58} {:>14} {:>14} {:>7} {:>16} {:>6}",
            row.figure,
            row.value,
            row.baseline,
            row.ratio,
            row.target,
            row.verdict.as_str()
        );
        if let Some(section) = self.sections.last_mut() {
            section.rows.push(row);
        }
    }

    /// A figure without a baseline.
    pub fn info(&mut self, figure: &str, value: String) {
        self.row(Row {
            figure: figure.to_owned(),
            value,
            baseline: String::new(),
            ratio: String::new(),
            target: String::new(),
            verdict: Verdict::Info,
        });
    }

    /// A line of explanation under the current section.
    pub fn note(&mut self, text: String) {
        println!("  {text}");
        if let Some(section) = self.sections.last_mut() {
            section.notes.push(text);
        }
    }

    pub fn missed(&self) -> Vec<&str> {
        self.sections
            .iter()
            .flat_map(|s| &s.rows)
            .filter(|r| r.verdict == Verdict::Missed)
            .map(|r| r.figure.as_str())
            .collect()
    }

    pub fn markdown(&self, header: &str) -> String {
        let mut out = String::from(header);
        for Section { title, rows, notes } in &self.sections {
            let _ = writeln!(out, "\n## {title}\n");
            if !rows.is_empty() {
                out.push_str("| figure | vtpmd | baseline | ratio | target | |\n");
                out.push_str("|---|---:|---:|---:|---|---|\n");
                for r in rows {
                    let _ = writeln!(
                        out,
                        "| {} | {} | {} | {} | {} | {} |",
                        r.figure.trim(),
                        r.value,
                        r.baseline,
                        r.ratio,
                        r.target,
                        r.verdict.as_str()
                    );
                }
            }
            if !notes.is_empty() {
                out.push('\n');
                for n in notes {
                    let _ = writeln!(out, "- {n}");
                }
            }
        }
        out
    }
}

pub fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 1.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{:.1} µs", ms * 1e3)
    }
}

pub fn ratio(value: Duration, baseline: Duration) -> f64 {
    value.as_secs_f64() / baseline.as_secs_f64()
}

/// Nearest-rank percentile of the samples, `p` in whole percent.
pub fn percentile(samples: &[Duration], p: usize) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

pub fn median(samples: &[Duration]) -> Duration {
    percentile(samples, 50)
}
