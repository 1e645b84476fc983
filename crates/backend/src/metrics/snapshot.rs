//! What a scrape shows: a [`Snapshot`] of plain figures, which the control thread
//! takes (it owns the exports, iothreads and nodes; nothing here keeps one alive), and
//! its rendering in the text format on the scrape's own thread.

use super::counters::{LoopSample, QueueSample, RequestKind};
use super::exposition::{seconds, Exposition, MetricType};
use blocklayer::stats::{IoKind, IoStats, KindTotals};

/// A sample's value, as text, from a figure.
type Text<T> = fn(&T) -> String;

/// An export's queues (vhost-user-blk) or counter shards (NBD).
pub struct ExportSample {
    pub id: String,
    pub queues: Vec<QueueSample>,
    /// Whether each of `queues` gets `vubd_queue_*` series (vhost-user-blk's rings);
    /// NBD's shards only add up to the export's series.
    pub per_queue: bool,
}

/// An iothread (also the implicit ones of exports that name none, and the main loop
/// of jobs).
pub struct IoThreadSample {
    pub id: String,
    pub counters: LoopSample,
}

/// The kinds `query-blockstats` counts, with the label each has here.
const NODE_KINDS: [(IoKind, &str); 4] = [
    (IoKind::Read, "read"),
    (IoKind::Write, "write"),
    (IoKind::Flush, "flush"),
    (IoKind::Unmap, "unmap"),
];

/// A node's `query-blockstats` figures.
pub struct NodeSample {
    pub name: String,
    pub kinds: [KindTotals; 4],
    pub wr_highest_offset: u64,
}

impl NodeSample {
    /// Sums a node's statistics (as `query-blockstats` does).
    pub fn of(name: &str, stats: &IoStats) -> NodeSample {
        NodeSample {
            name: name.to_string(),
            kinds: NODE_KINDS.map(|(k, _)| stats.totals(k)),
            wr_highest_offset: stats.wr_highest_offset(),
        }
    }
}

/// Everything one scrape shows.
#[derive(Default)]
pub struct Snapshot {
    pub exports: Vec<ExportSample>,
    pub iothreads: Vec<IoThreadSample>,
    pub nodes: Vec<NodeSample>,
}

/// The request families of exports (`prefix` `vubd_export`) and queues
/// (`vubd_queue`): `rows` are the label sets and samples.
fn request_families(
    e: &mut Exposition,
    prefix: &str,
    what: &str,
    rows: &[(Vec<(&str, &str)>, QueueSample)],
) {
    type Field = fn(&QueueSample, usize) -> u64;
    let counters: [(&str, &str, Field); 3] = [
        ("requests_total", "Requests completed", |s, k| {
            s.kinds[k].requests
        }),
        (
            "request_bytes_total",
            "Bytes moved by successful requests",
            |s, k| s.kinds[k].bytes,
        ),
        (
            "request_errors_total",
            "Requests that failed or were invalid",
            |s, k| s.kinds[k].errors,
        ),
    ];
    for (suffix, help, field) in counters {
        let name = format!("{prefix}_{suffix}");
        e.family(
            &name,
            MetricType::Counter,
            &format!("{help}, per {what} and kind."),
        );
        for (labels, s) in rows {
            for kind in RequestKind::ALL {
                let mut l = labels.clone();
                l.push(("kind", kind.name()));
                e.sample(&name, &l, field(s, kind as usize));
            }
        }
    }
    let name = format!("{prefix}_requests_in_flight");
    e.family(
        &name,
        MetricType::Gauge,
        &format!("Requests taken from the rings and not yet completed, per {what}."),
    );
    for (labels, s) in rows {
        e.sample(&name, labels, s.in_flight);
    }
    let name = format!("{prefix}_request_latency_seconds");
    e.family(
        &name,
        MetricType::Histogram,
        &format!(
            "Request latency per {what}, from the iothread pass that took the request to \
             the one that completed it."
        ),
    );
    for (labels, s) in rows {
        e.histogram(&name, labels, &s.latency);
    }
}

impl Snapshot {
    /// The snapshot in the text exposition format.
    pub fn render(&self) -> String {
        let mut e = Exposition::new();
        e.family(
            "vubd_build_info",
            MetricType::Gauge,
            "The vubd version (always 1).",
        );
        e.sample(
            "vubd_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1,
        );

        let mut export_rows = Vec::new();
        let mut queue_rows = Vec::new();
        let queue_names: Vec<Vec<String>> = self
            .exports
            .iter()
            .map(|x| (0..x.queues.len()).map(|q| q.to_string()).collect())
            .collect();
        for (x, names) in self.exports.iter().zip(&queue_names) {
            let mut total = QueueSample::default();
            for (q, name) in x.queues.iter().zip(names) {
                total.add(q);
                if !x.per_queue {
                    continue;
                }
                queue_rows.push((
                    vec![("export", x.id.as_str()), ("queue", name.as_str())],
                    *q,
                ));
            }
            export_rows.push((vec![("export", x.id.as_str())], total));
        }
        request_families(&mut e, "vubd_export", "export", &export_rows);
        request_families(&mut e, "vubd_queue", "queue", &queue_rows);

        let loops: [(&str, MetricType, &str, Text<LoopSample>); 5] = [
            (
                "vubd_iothread_wakeups_total",
                MetricType::Counter,
                "Times the iothread's event loop woke up from epoll.",
                |s| s.wakeups.to_string(),
            ),
            (
                "vubd_iothread_busy_seconds_total",
                MetricType::Counter,
                "Time the iothread spent awake (working and polling).",
                |s| seconds(s.busy_ns).to_string(),
            ),
            (
                "vubd_iothread_poll_seconds_total",
                MetricType::Counter,
                "Time the iothread spent polling after its last work before it slept.",
                |s| seconds(s.poll_ns).to_string(),
            ),
            (
                "vubd_iothread_fixed_buffer_operations_total",
                MetricType::Counter,
                "Reads and writes the iothread's io_uring did from registered guest memory \
                 (pin-guest-memory=on).",
                |s| s.fixed_ops.to_string(),
            ),
            (
                "vubd_iothread_pinned_bytes",
                MetricType::Gauge,
                "Guest memory registered with the iothread's io_uring (pin-guest-memory=on).",
                |s| s.pinned_bytes.to_string(),
            ),
        ];
        for (name, kind, help, value) in loops {
            e.family(name, kind, help);
            for t in &self.iothreads {
                e.sample(name, &[("iothread", &t.id)], value(&t.counters));
            }
        }

        let nodes: [(&str, &str, Text<KindTotals>); 5] = [
            ("vubd_node_operations_total", "Operations completed", |k| {
                k.operations.to_string()
            }),
            (
                "vubd_node_bytes_total",
                "Bytes moved by completed operations",
                |k| k.bytes.to_string(),
            ),
            (
                "vubd_node_time_seconds_total",
                "Total latency of completed operations",
                |k| seconds(k.total_time_ns).to_string(),
            ),
            (
                "vubd_node_failed_operations_total",
                "Operations that failed",
                |k| k.failed.to_string(),
            ),
            (
                "vubd_node_invalid_operations_total",
                "Operations refused as invalid",
                |k| k.invalid.to_string(),
            ),
        ];
        for (name, help, value) in nodes {
            e.family(
                name,
                MetricType::Counter,
                &format!("{help}, per node and kind (query-blockstats)."),
            );
            for n in &self.nodes {
                for (totals, (_, kind)) in n.kinds.iter().zip(NODE_KINDS) {
                    e.sample(name, &[("node", &n.name), ("kind", kind)], value(totals));
                }
            }
        }
        let name = "vubd_node_write_highest_offset_bytes";
        e.family(
            name,
            MetricType::Gauge,
            "The byte after the highest range written, per node (query-blockstats \
             wr_highest_offset).",
        );
        for n in &self.nodes {
            e.sample(name, &[("node", &n.name)], n.wr_highest_offset);
        }
        e.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::counters::QueueCounters;

    #[test]
    fn an_export_is_the_sum_of_its_queues() {
        let (q0, q1) = (QueueCounters::default(), QueueCounters::default());
        q0.record(RequestKind::Read, 4096, true, 0);
        q1.record(RequestKind::Read, 4096, true, 2000);
        q1.record(RequestKind::Flush, 0, false, 0);
        let stats = IoStats::new();
        stats.done(IoStats::start(IoKind::Write, 512), true, 1024);
        let s = Snapshot {
            exports: vec![
                ExportSample {
                    id: "e0".into(),
                    queues: vec![q0.sample(1), q1.sample(0)],
                    per_queue: true,
                },
                // An NBD export: its counters, no queue series.
                ExportSample {
                    id: "nbd0".into(),
                    queues: vec![q1.sample(2)],
                    per_queue: false,
                },
            ],
            iothreads: vec![IoThreadSample {
                id: "io0".into(),
                counters: LoopSample {
                    wakeups: 3,
                    busy_ns: 2_000_000_000,
                    poll_ns: 500_000_000,
                    fixed_ops: 7,
                    pinned_bytes: 1 << 30,
                },
            }],
            nodes: vec![NodeSample::of("n0", &stats)],
        };
        let text = s.render();
        for line in [
            "vubd_export_requests_total{export=\"e0\",kind=\"read\"} 2",
            "vubd_export_request_bytes_total{export=\"e0\",kind=\"read\"} 8192",
            "vubd_export_request_errors_total{export=\"e0\",kind=\"flush\"} 1",
            "vubd_export_requests_in_flight{export=\"e0\"} 1",
            "vubd_export_request_latency_seconds_count{export=\"e0\"} 3",
            "vubd_queue_requests_total{export=\"e0\",queue=\"1\",kind=\"read\"} 1",
            "vubd_queue_request_latency_seconds_bucket{export=\"e0\",queue=\"1\",le=\"+Inf\"} 2",
            "vubd_iothread_wakeups_total{iothread=\"io0\"} 3",
            "vubd_iothread_fixed_buffer_operations_total{iothread=\"io0\"} 7",
            "vubd_iothread_pinned_bytes{iothread=\"io0\"} 1073741824",
            "# TYPE vubd_iothread_pinned_bytes gauge",
            "vubd_iothread_busy_seconds_total{iothread=\"io0\"} 2",
            "vubd_iothread_poll_seconds_total{iothread=\"io0\"} 0.5",
            "vubd_node_operations_total{node=\"n0\",kind=\"write\"} 1",
            "vubd_node_bytes_total{node=\"n0\",kind=\"write\"} 512",
            "vubd_node_write_highest_offset_bytes{node=\"n0\"} 1024",
            "vubd_export_requests_total{export=\"nbd0\",kind=\"read\"} 1",
            "vubd_export_requests_in_flight{export=\"nbd0\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line} in\n{text}");
        }
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("vubd_queue_") && l.contains("nbd0")),
            "{text}"
        );
        // Each family's HELP and TYPE come once, before its samples.
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!(types, helps);
        assert_eq!(types, 1 + 2 * 5 + 5 + 6);
    }
}
