//! The accepted time window: how old, or how far ahead of now, a reading may
//! be when it is read. Outside it a record is a dead letter with the reason.
//!
//! Why: every distinct day a device invents gets its own chunk or partition
//! (a clock stuck in 2099 made one per reading), thousands of them slow every
//! query and can exhaust the lock table inside one COPY; and rows older than
//! the retention would be dropped again, after reaching the aggregates.

use std::time::Duration;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::error::DecodeError;
use super::timestamp::Micros;

/// The oldest age accepted when there is no retention: one year.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(365 * 24 * 3600);

/// How far ahead of now a reading may be by default: clocks drift, and
/// time zones get confused, but not by more than a day.
pub const DEFAULT_MAX_AHEAD: Duration = Duration::from_secs(24 * 3600);

/// Readings from `max_age` before now to `max_ahead` after it are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    pub max_age: Duration,
    pub max_ahead: Duration,
}

impl Default for TimeWindow {
    fn default() -> Self {
        TimeWindow {
            max_age: DEFAULT_MAX_AGE,
            max_ahead: DEFAULT_MAX_AHEAD,
        }
    }
}

impl TimeWindow {
    /// Whether a reading taken at `time` is accepted when read at `now`.
    ///
    /// # Errors
    /// [`DecodeError::OutsideTimeWindow`] naming the time and the window.
    pub fn check(&self, time: Micros, now: Micros) -> Result<(), DecodeError> {
        let earliest = now.saturating_sub(micros(self.max_age));
        let latest = now.saturating_add(micros(self.max_ahead));
        if (earliest..=latest).contains(&time) {
            return Ok(());
        }
        Err(DecodeError::OutsideTimeWindow {
            time: rfc3339(time),
            earliest: rfc3339(earliest),
            latest: rfc3339(latest),
        })
    }
}

fn micros(duration: Duration) -> Micros {
    Micros::try_from(duration.as_micros()).unwrap_or(Micros::MAX)
}

/// `micros` as RFC 3339 in UTC, or the number itself when it is no date.
fn rfc3339(micros: Micros) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .ok()
        .and_then(|time| time.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{micros} µs since the epoch"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Micros = 3_600_000_000;
    /// 2026-11-30T12:00:00Z
    const NOW: Micros = 1_796_040_000_000_000;

    #[test]
    fn both_edges_are_inside_and_one_microsecond_beyond_is_not() {
        let window = TimeWindow {
            max_age: Duration::from_secs(48 * 3600),
            max_ahead: Duration::from_secs(24 * 3600),
        };
        for inside in [NOW - 48 * HOUR, NOW, NOW + 24 * HOUR] {
            assert_eq!(window.check(inside, NOW), Ok(()), "{inside}");
        }
        for outside in [NOW - 48 * HOUR - 1, NOW + 24 * HOUR + 1] {
            assert!(window.check(outside, NOW).is_err(), "{outside}");
        }
    }

    #[test]
    fn the_reason_names_the_time_and_the_window() {
        let error = TimeWindow::default()
            .check(4_070_908_800_000_000, NOW)
            .unwrap_err();
        assert_eq!(error.kind(), "outside_time_window");
        assert_eq!(
            error.to_string(),
            "timestamp 2099-01-01T00:00:00Z is outside the accepted window \
             [2025-11-30T12:00:00Z, 2026-12-01T12:00:00Z]"
        );
    }
}
