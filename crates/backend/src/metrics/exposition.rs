//! Prometheus's text exposition format, version 0.0.4: metric families, each with one
//! `# HELP` and one `# TYPE` line followed by all of its samples.

use super::counters::{bucket_bound_ns, Histogram};
use std::fmt::Write;

/// The `Content-Type` of a scrape's answer.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
}

impl MetricType {
    fn name(self) -> &'static str {
        match self {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
            MetricType::Histogram => "histogram",
        }
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape_label(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Nanoseconds as seconds (a float sample value).
pub fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// The text of a scrape, built family by family.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Self {
        Exposition::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines. `help` is plain text on one
    /// line.
    pub fn family(&mut self, name: &str, kind: MetricType, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.name());
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_label(v, &mut self.out);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// The samples of a latency histogram in seconds: cumulative `_bucket{le=..}`
    /// lines ending with `+Inf`, then `_sum` and `_count`.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (i, n) in h.buckets.iter().enumerate() {
            cumulative += n;
            let le = if i + 1 == h.buckets.len() {
                "+Inf".to_string()
            } else {
                seconds(bucket_bound_ns(i)).to_string()
            };
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, cumulative);
        }
        self.sample(&format!("{name}_sum"), labels, seconds(h.sum_ns));
        self.sample(&format!("{name}_count"), labels, cumulative);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::counters::BUCKETS;

    #[test]
    fn families_samples_and_escaping() {
        let mut e = Exposition::new();
        e.family("vubd_x_total", MetricType::Counter, "Things.\nMore");
        e.sample("vubd_x_total", &[("export", "a\"b\\c\nd"), ("q", "0")], 7);
        e.sample("vubd_x_total", &[], 1.5);
        assert_eq!(
            e.finish(),
            "# HELP vubd_x_total Things.\\nMore\n# TYPE vubd_x_total counter\n\
             vubd_x_total{export=\"a\\\"b\\\\c\\nd\",q=\"0\"} 7\nvubd_x_total 1.5\n"
        );
    }

    #[test]
    fn histograms_are_cumulative_and_end_with_inf() {
        let mut h = Histogram::default();
        h.buckets[0] = 2;
        h.buckets[3] = 1;
        h.buckets[BUCKETS] = 4;
        h.sum_ns = 1_500_000_000;
        let mut e = Exposition::new();
        e.histogram("lat_seconds", &[("export", "e")], &h);
        let text = e.finish();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), BUCKETS + 3);
        assert_eq!(
            lines[0],
            "lat_seconds_bucket{export=\"e\",le=\"0.000001024\"} 2"
        );
        assert_eq!(
            lines[3],
            "lat_seconds_bucket{export=\"e\",le=\"0.000008192\"} 3"
        );
        assert_eq!(
            lines[BUCKETS],
            "lat_seconds_bucket{export=\"e\",le=\"+Inf\"} 7"
        );
        assert_eq!(lines[BUCKETS + 1], "lat_seconds_sum{export=\"e\"} 1.5");
        assert_eq!(lines[BUCKETS + 2], "lat_seconds_count{export=\"e\"} 7");
    }
}
