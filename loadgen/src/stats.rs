//! Live counters shared by every device task, for the progress bar and the
//! report: what was sent and acknowledged, per protocol, and how fast.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Latencies are kept in microseconds, up to an hour, to 3 significant digits.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// One protocol's counters.
#[derive(Debug)]
pub struct ProtocolStats {
    pub sent: AtomicU64,
    /// Sent within the measured window (by the time it was sent).
    pub sent_in_window: AtomicU64,
    pub acked: AtomicU64,
    /// Failed or uncertain.
    pub errors: AtomicU64,
    pub in_flight: AtomicI64,
    /// Acknowledgement latency of messages due within the window.
    latency: Mutex<Histogram<u64>>,
}

impl Default for ProtocolStats {
    fn default() -> Self {
        ProtocolStats {
            sent: AtomicU64::new(0),
            sent_in_window: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            latency: Mutex::new(latency_histogram()),
        }
    }
}

impl ProtocolStats {
    pub fn record_latency(&self, latency: Duration) {
        let micros = (latency.as_micros() as u64).clamp(1, 3_600_000_000);
        self.latency
            .lock()
            .expect("no panics while holding the lock")
            .saturating_record(micros);
    }

    /// Latency percentiles, or None when nothing was acknowledged.
    pub fn latency(&self) -> Option<Percentiles> {
        let histogram = self
            .latency
            .lock()
            .expect("no panics while holding the lock");
        Percentiles::of(&histogram)
    }
}

/// Percentiles of a latency histogram, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(histogram: &Histogram<u64>) -> Option<Percentiles> {
        if histogram.is_empty() {
            return None;
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Some(Percentiles {
            count: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p90_ms: ms(histogram.value_at_quantile(0.90)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            max_ms: ms(histogram.max()),
        })
    }

    /// Percentiles of `latencies_ms` (may be negative: clamped to 0).
    pub fn of_millis(latencies_ms: impl IntoIterator<Item = i64>) -> Option<Percentiles> {
        let mut histogram = latency_histogram();
        for ms in latencies_ms {
            histogram.saturating_record((ms.max(0) as u64 * 1000).max(1));
        }
        Percentiles::of(&histogram)
    }
}

/// The run's clock: when it started, how fast time runs (replay speed), and
/// the measured window.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub start: Instant,
    /// Offsets are divided by this (replay --speed; 1 otherwise).
    pub speed: f64,
    /// The measured window, as offsets from the start (before `speed`).
    pub window: (Duration, Duration),
}

impl Clock {
    /// When something due at `offset` is due.
    pub fn due(&self, offset: Duration) -> Instant {
        self.start + offset.div_f64(self.speed)
    }

    /// Whether a message due at `offset` is in the measured window.
    pub fn in_window(&self, offset: Duration) -> bool {
        offset >= self.window.0 && offset < self.window.1
    }

    /// Whether `now` is within the measured window.
    pub fn now_in_window(&self, now: Instant) -> bool {
        now >= self.due(self.window.0) && now < self.due(self.window.1)
    }

    /// The window's length in real time.
    pub fn window_seconds(&self) -> f64 {
        (self.window.1 - self.window.0).as_secs_f64() / self.speed
    }
}

/// Counters for both protocols.
#[derive(Debug, Default)]
pub struct Stats {
    pub mqtt: ProtocolStats,
    pub coap: ProtocolStats,
}

impl Stats {
    pub fn of(&self, protocol: crate::message::Protocol) -> &ProtocolStats {
        match protocol {
            crate::message::Protocol::Mqtt { .. } => &self.mqtt,
            crate::message::Protocol::Coap { .. } => &self.coap,
        }
    }

    /// Totals over both protocols: (sent, acked, errors, in flight).
    pub fn totals(&self) -> (u64, u64, u64, i64) {
        let both = [&self.mqtt, &self.coap];
        (
            both.iter().map(|s| s.sent.load(Ordering::Relaxed)).sum(),
            both.iter().map(|s| s.acked.load(Ordering::Relaxed)).sum(),
            both.iter().map(|s| s.errors.load(Ordering::Relaxed)).sum(),
            both.iter()
                .map(|s| s.in_flight.load(Ordering::Relaxed))
                .sum(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_in_milliseconds() {
        let p = Percentiles::of_millis((1..=100).map(|ms| ms as i64)).unwrap();
        assert_eq!(p.count, 100);
        assert!((p.p50_ms - 50.0).abs() < 0.1, "{p:?}");
        assert!((p.p99_ms - 99.0).abs() < 0.1, "{p:?}");
        assert!((p.max_ms - 100.0).abs() < 0.1, "{p:?}");
        assert_eq!(Percentiles::of_millis([]), None);
    }

    #[test]
    fn the_clock_scales_offsets_by_the_speed() {
        let start = Instant::now();
        let clock = Clock {
            start,
            speed: 4.0,
            window: (Duration::from_secs(4), Duration::from_secs(12)),
        };
        assert_eq!(
            clock.due(Duration::from_secs(8)),
            start + Duration::from_secs(2)
        );
        assert!((clock.window_seconds() - 2.0).abs() < 1e-9);
        assert!(clock.in_window(Duration::from_secs(4)));
        assert!(!clock.in_window(Duration::from_secs(12)));
    }
}
