//! The end-of-run report: per protocol what was sent, acknowledged and
//! failed (by reason), the rate achieved against the target, and latency
//! percentiles; then the verification. Printed for people, or written as
//! JSON for benchmarks.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::message::{Fate, Protocol};
use crate::run::RunResult;
use crate::stats::Percentiles;
use crate::verify::Verification;

/// One protocol's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProtocolReport {
    pub devices: u64,
    /// Put on the wire (acknowledged, unconfirmed or uncertain).
    pub sent: u64,
    pub acked: u64,
    /// Sent where no acknowledgement comes (QoS 0, NON unanswered).
    pub unconfirmed: u64,
    /// Sent, then no acknowledgement: by reason.
    pub uncertain: BTreeMap<String, u64>,
    /// Not sent, or refused: by reason.
    pub failed: BTreeMap<String, u64>,
    /// Messages per second due in the window, and sent in it.
    pub target_rate: f64,
    pub achieved_rate: f64,
    /// Acknowledgement latency of messages due in the window.
    pub ack_latency: Option<Percentiles>,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// What ran, in words ("10000 devices, ...").
    pub description: String,
    pub window_seconds: f64,
    pub elapsed_seconds: f64,
    pub protocols: BTreeMap<&'static str, ProtocolReport>,
    pub target_rate: f64,
    pub achieved_rate: f64,
    /// loadgen's own CPU use in the window, in cores (1.0: one core busy).
    pub loadgen_cores: Option<f64>,
    pub verification: Option<Verification>,
}

impl Report {
    /// Gathers the figures; `due_in_window` is how many messages of each
    /// protocol were due in the measured window.
    pub fn new(
        description: String,
        result: &RunResult,
        due_in_window: &BTreeMap<&'static str, u64>,
    ) -> Report {
        let window_seconds = result.context.clock.window_seconds();
        let rate = |count: u64| {
            if window_seconds > 0.0 {
                count as f64 / window_seconds
            } else {
                0.0
            }
        };
        let mut protocols: BTreeMap<&'static str, ProtocolReport> = BTreeMap::new();
        for outcome in &result.outcomes {
            let name = outcome.protocol.name();
            let entry = protocols.entry(name).or_insert_with(|| {
                let stats = result.context.stats.of(outcome.protocol);
                ProtocolReport {
                    devices: 0,
                    sent: 0,
                    acked: 0,
                    unconfirmed: 0,
                    uncertain: BTreeMap::new(),
                    failed: BTreeMap::new(),
                    target_rate: rate(due_in_window.get(name).copied().unwrap_or(0)),
                    achieved_rate: rate(stats.sent_in_window.load(Ordering::Relaxed)),
                    ack_latency: stats.latency(),
                }
            });
            entry.devices += 1;
            for (_, fate) in &outcome.fates {
                match fate {
                    Fate::Acked => {
                        entry.sent += 1;
                        entry.acked += 1;
                    }
                    Fate::Unconfirmed => {
                        entry.sent += 1;
                        entry.unconfirmed += 1;
                    }
                    Fate::Uncertain(reason) => {
                        entry.sent += 1;
                        *entry.uncertain.entry(reason.clone()).or_default() += 1;
                    }
                    Fate::Failed(reason) => *entry.failed.entry(reason.clone()).or_default() += 1,
                }
            }
        }
        let target_rate = protocols.values().map(|p| p.target_rate).sum();
        let achieved_rate = protocols.values().map(|p| p.achieved_rate).sum();
        Report {
            description,
            window_seconds,
            elapsed_seconds: result.elapsed.as_secs_f64(),
            protocols,
            target_rate,
            achieved_rate,
            loadgen_cores: *result.context.window_cores.lock().expect("not poisoned"),
            verification: None,
        }
    }

    /// Messages that failed or stayed uncertain.
    pub fn errors(&self) -> u64 {
        self.protocols
            .values()
            .map(|p| p.failed.values().sum::<u64>() + p.uncertain.values().sum::<u64>())
            .sum()
    }

    /// Whether the run did what it should: nothing failed, and the
    /// verification (if any) found everything exactly once.
    pub fn clean(&self) -> bool {
        self.errors() == 0 && self.verification.as_ref().is_none_or(Verification::exact)
    }

    /// The report for people.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "loadgen: {}", self.description);
        let _ = writeln!(
            out,
            "ran {:.1} s; measured window {:.1} s: {} msg/s achieved of {} targeted ({:+.2}%)",
            self.elapsed_seconds,
            self.window_seconds,
            thousands(self.achieved_rate.round() as u64),
            thousands(self.target_rate.round() as u64),
            if self.target_rate > 0.0 {
                (self.achieved_rate / self.target_rate - 1.0) * 100.0
            } else {
                0.0
            }
        );
        if let Some(cores) = self.loadgen_cores {
            let _ = writeln!(
                out,
                "loadgen itself used {:.0}% of one core in the window",
                cores * 100.0
            );
        }
        let _ = writeln!(
            out,
            "\n{:<6}{:>8}{:>12}{:>12}{:>12}{:>9}{:>11}   ack latency ms: p50 / p90 / p99 / max",
            "", "devices", "sent", "acked", "no-ack", "errors", "msg/s"
        );
        for (name, p) in &self.protocols {
            let errors = p.failed.values().sum::<u64>() + p.uncertain.values().sum::<u64>();
            let latency = p.ack_latency.map_or_else(
                || "-".to_owned(),
                |l| {
                    format!(
                        "{:.1} / {:.1} / {:.1} / {:.1}",
                        l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
                    )
                },
            );
            let _ = writeln!(
                out,
                "{name:<6}{:>8}{:>12}{:>12}{:>12}{:>9}{:>11}   {latency}",
                thousands(p.devices),
                thousands(p.sent),
                thousands(p.acked),
                thousands(p.unconfirmed),
                thousands(errors),
                thousands(p.achieved_rate.round() as u64),
            );
            for (reason, count) in &p.failed {
                let _ = writeln!(out, "      failed: {} × {reason}", thousands(*count));
            }
            for (reason, count) in &p.uncertain {
                let _ = writeln!(
                    out,
                    "      no acknowledgement (may have landed): {} × {reason}",
                    thousands(*count)
                );
            }
        }
        if let Some(v) = &self.verification {
            let _ = writeln!(
                out,
                "\nin the database (waited {:.1} s): {} of {} expected delivered, {} lost, {} duplicated{}",
                v.waited_seconds,
                thousands(v.delivered),
                thousands(v.expected),
                thousands(v.lost),
                thousands(v.duplicated),
                if v.exact() { ": exactly once" } else { "" }
            );
            if v.uncertain_found + v.uncertain_missing > 0 {
                let _ = writeln!(
                    out,
                    "unacknowledged messages: {} landed, {} did not",
                    thousands(v.uncertain_found),
                    thousands(v.uncertain_missing)
                );
            }
            if v.failed_found > 0 {
                let _ = writeln!(
                    out,
                    "refused messages that landed anyway: {}",
                    thousands(v.failed_found)
                );
            }
            match (&v.end_to_end, &v.note) {
                (Some(l), _) => {
                    let _ = writeln!(
                        out,
                        "end to end (device time to commit) ms: p50 {:.0} / p90 {:.0} / p99 {:.0} / max {:.0}",
                        l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
                    );
                }
                (None, Some(note)) => {
                    let _ = writeln!(out, "{note}");
                }
                (None, None) => {}
            }
        }
        out
    }
}

/// 1234567 as "1,234,567".
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// "5,000 MQTT QoS 1 + 5,000 CoAP CON" for a set of protocols.
pub fn describe_mix(counts: &BTreeMap<Protocol, u64>) -> String {
    counts
        .iter()
        .map(|(protocol, n)| format!("{} {protocol}", thousands(*n)))
        .collect::<Vec<_>>()
        .join(" + ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
