//! Every metric loadgen exports with `--metrics-addr`, in one place, with
//! what it counts, and the calls that count them: made where `stats`
//! counts, so the totals at the end of a run are the report's. Prometheus
//! conventions: `loadgen_` prefix, `_total` for counters, units in the name.
//! Every message metric has a `protocol` label (mqtt, coap).
//!
//! Without `--metrics-addr` no recorder is installed and these calls do
//! nothing.

use std::time::Duration;

/// CPU time this process used, user and system, in seconds (from /proc at
/// each scrape, by metrics-process, as `ingest` exports it).
pub const PROCESS_CPU_SECONDS: &str = "process_cpu_seconds_total";
/// This process's resident memory in bytes (metrics-process, as above).
pub const PROCESS_RESIDENT_MEMORY: &str = "process_resident_memory_bytes";

/// Messages put on the wire (counted when sent, so a refused CoAP message
/// counts here and in `loadgen_messages_failed_total`).
pub const MESSAGES_SENT: &str = "loadgen_messages_sent_total";
/// Messages acknowledged: a PUBACK from the broker, or a 2.xx from the
/// gateway (the report's "acked").
pub const MESSAGES_ACKED: &str = "loadgen_messages_acked_total";
/// Messages sent where no acknowledgement comes: QoS 0, a NON without an
/// answer (the report's "no-ack").
pub const MESSAGES_UNCONFIRMED: &str = "loadgen_messages_unconfirmed_total";
/// Messages not sent, or refused: they must not land. Labels: reason
/// (cannot_connect, no_socket, refused).
pub const MESSAGES_FAILED: &str = "loadgen_messages_failed_total";
/// Messages sent without an acknowledgement: they may or may not have
/// landed. Labels: reason (ack_timeout, connection_lost, no_answer).
pub const MESSAGES_UNCERTAIN: &str = "loadgen_messages_uncertain_total";
/// From a message's (first) send to its acknowledgement, every acknowledged
/// message (histogram; the report's percentiles cover the measured window).
pub const ACK_LATENCY_SECONDS: &str = "loadgen_ack_latency_seconds";

/// The histogram's buckets, in seconds: a loopback PUBACK to a CoAP
/// exchange that waited for its retransmissions.
pub const ACK_LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The protocols' message counters at 0, so that they exist (and rates
/// start) before the first message.
pub fn register() {
    for protocol in ["mqtt", "coap"] {
        for name in [MESSAGES_SENT, MESSAGES_ACKED, MESSAGES_UNCONFIRMED] {
            metrics::counter!(name, "protocol" => protocol).absolute(0);
        }
    }
}

/// A message put on the wire.
pub fn sent(protocol: &'static str) {
    metrics::counter!(MESSAGES_SENT, "protocol" => protocol).increment(1);
}

/// A message acknowledged `latency` after it was (first) sent.
pub fn acked(protocol: &'static str, latency: Duration) {
    metrics::counter!(MESSAGES_ACKED, "protocol" => protocol).increment(1);
    metrics::histogram!(ACK_LATENCY_SECONDS, "protocol" => protocol).record(latency.as_secs_f64());
}

/// A message sent where no acknowledgement comes.
pub fn unconfirmed(protocol: &'static str) {
    metrics::counter!(MESSAGES_UNCONFIRMED, "protocol" => protocol).increment(1);
}

/// A message not sent, or refused.
pub fn failed(protocol: &'static str, reason: &'static str) {
    metrics::counter!(MESSAGES_FAILED, "protocol" => protocol, "reason" => reason).increment(1);
}

/// A message sent that no acknowledgement came for.
pub fn uncertain(protocol: &'static str, reason: &'static str) {
    metrics::counter!(MESSAGES_UNCERTAIN, "protocol" => protocol, "reason" => reason).increment(1);
}
