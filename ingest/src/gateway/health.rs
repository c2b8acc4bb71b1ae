//! Whether the gateway can reach its Kinesis stream: what `/health` (CoAP)
//! and `/readyz` (HTTP) answer. Every PutRecords result updates it, and a
//! probe (DescribeStreamSummary) every [`PROBE_INTERVAL`] keeps it current
//! when no traffic flows. Why it is down (AWS's error text, which can name
//! the account and the role) goes to the log only, never to a device.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::observe::Readiness;
use crate::source::kinesis::{KinesisSource, SourceError};

/// How often the stream is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How long one probe may take before it counts as a failure.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The last thing known about the stream's reachability.
#[derive(Debug)]
pub struct KinesisHealth {
    /// True while the last call reached the stream.
    up: AtomicBool,
    /// Whether the current outage is in the log already.
    down_logged: AtomicBool,
    /// Mirrored into `/readyz`.
    readiness: Arc<Readiness>,
}

impl KinesisHealth {
    /// Unknown health starts as down until the first call or probe.
    pub fn new(readiness: Arc<Readiness>) -> Self {
        readiness.set(false);
        Self {
            up: AtomicBool::new(false),
            down_logged: AtomicBool::new(false),
            readiness,
        }
    }

    /// Whether the stream was reachable at the last call.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// A call reached the stream.
    pub fn reached(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            tracing::info!("Kinesis is reachable");
        }
        self.down_logged.store(false, Ordering::Relaxed);
        self.readiness.set(true);
    }

    /// A call failed with `err`; throttling means reachable but busy.
    pub fn failed(&self, err: &SourceError) {
        if matches!(
            err.cause(),
            "throttled" | "kms_throttled" | "limit_exceeded"
        ) {
            return self.reached();
        }
        self.up.store(false, Ordering::Relaxed);
        if !self.down_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %err, "Kinesis is not reachable");
        } else {
            tracing::debug!(error = %err, "Kinesis is still not reachable");
        }
        self.readiness.set(false);
    }
}

/// Probes the stream every [`PROBE_INTERVAL`] until `shutdown`.
pub async fn probe_loop(
    source: KinesisSource,
    health: Arc<KinesisHealth>,
    shutdown: CancellationToken,
) {
    loop {
        match tokio::time::timeout(PROBE_TIMEOUT, source.probe()).await {
            Ok(Ok(())) => health.reached(),
            Ok(Err(err)) => health.failed(&err),
            Err(_) => health.failed(&SourceError::Timeout {
                call: crate::source::kinesis::Call {
                    operation: "DescribeStreamSummary",
                    stream: source.stream().to_owned(),
                    shard: None,
                },
                detail: format!("no answer within {PROBE_TIMEOUT:?}"),
            }),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
    }
}
