//! What the producer admits: a record Kinesis can take (its limits checked
//! before the record is queued, so that one record that can never be put
//! never shares a PutRecords call with others), and a log line for records
//! dropped that a flood of them cannot multiply. No IO.

use std::time::{Duration, Instant};

use crate::source::kinesis::{MAX_PARTITION_KEY_CHARS, MAX_RECORD_BYTES};

/// Why Kinesis could never take a record. Sending it again cannot help: it
/// is answered (CoAP 4.xx) or acknowledged and dropped (MQTT), and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unputtable {
    /// The partition key (the device id) is empty.
    #[error("the device id is empty: Kinesis needs a partition key of 1 to 256 characters")]
    EmptyKey,
    /// The partition key is longer than Kinesis takes.
    #[error(
        "the device id is {chars} characters long: Kinesis takes partition keys of at most \
         {MAX_PARTITION_KEY_CHARS}"
    )]
    KeyTooLong {
        /// Its length, in UTF-16 code units.
        chars: usize,
    },
    /// Data and key together are larger than one Kinesis record.
    #[error(
        "the record is {bytes} bytes after encoding: Kinesis takes at most {MAX_RECORD_BYTES} \
         bytes of data and partition key"
    )]
    TooLarge {
        /// Data and key, in bytes.
        bytes: usize,
    },
    /// Kinesis refused the record when it was sent alone (a limit this
    /// check does not know).
    #[error("Kinesis refused the record on its own")]
    Refused,
}

impl Unputtable {
    /// The `reason` label of the rejected-messages metric.
    pub fn reason(self) -> &'static str {
        match self {
            Unputtable::EmptyKey | Unputtable::KeyTooLong { .. } => "key_too_long",
            Unputtable::TooLarge { .. } => "record_too_large",
            Unputtable::Refused => "refused_alone",
        }
    }
}

/// Checks `key` and `data` against Kinesis's limits for one record.
pub fn check(key: &str, data: &[u8]) -> Result<(), Unputtable> {
    if key.is_empty() {
        return Err(Unputtable::EmptyKey);
    }
    // Counting stops early: a key of many megabytes is not walked whole.
    let chars = key.encode_utf16().take(MAX_PARTITION_KEY_CHARS + 1).count();
    if chars > MAX_PARTITION_KEY_CHARS {
        return Err(Unputtable::KeyTooLong {
            chars: key.encode_utf16().count(),
        });
    }
    let bytes = key.len() + data.len();
    if bytes > MAX_RECORD_BYTES {
        return Err(Unputtable::TooLarge { bytes });
    }
    Ok(())
}

/// A warning written at most once per interval, with how many were left
/// out meanwhile: a device sending nothing but bad messages fills no disk.
#[derive(Debug)]
pub struct RateLimitedLog {
    /// The least time between two lines.
    every: Duration,
    /// When the last line was written.
    last: Option<Instant>,
    /// Lines left out since.
    suppressed: u64,
}

impl RateLimitedLog {
    /// At most one line per `every`.
    pub fn new(every: Duration) -> RateLimitedLog {
        RateLimitedLog {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(lines left out since the last one)` when a line may be written
    /// now, `None` when it is to be left out.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|last| now < last + self.every) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_within_and_beyond_kinesis_limits() {
        let cases: &[(String, usize, Result<(), Unputtable>)] = &[
            ("d".into(), 10, Ok(())),
            ("".into(), 10, Err(Unputtable::EmptyKey)),
            ("d".repeat(256), 10, Ok(())),
            (
                "d".repeat(257),
                10,
                Err(Unputtable::KeyTooLong { chars: 257 }),
            ),
            (
                "d".repeat(300),
                10,
                Err(Unputtable::KeyTooLong { chars: 300 }),
            ),
            // 128 characters outside the BMP are 256 UTF-16 units: the most.
            ("😀".repeat(128), 10, Ok(())),
            (
                "😀".repeat(129),
                10,
                Err(Unputtable::KeyTooLong { chars: 258 }),
            ),
            ("d".into(), MAX_RECORD_BYTES - 1, Ok(())),
            (
                "d".into(),
                MAX_RECORD_BYTES,
                Err(Unputtable::TooLarge {
                    bytes: MAX_RECORD_BYTES + 1,
                }),
            ),
        ];
        for (key, size, expected) in cases {
            let data = vec![b'x'; *size];
            assert_eq!(&check(key, &data), expected, "key of {} bytes", key.len());
        }
        assert_eq!(
            Unputtable::KeyTooLong { chars: 300 }.reason(),
            "key_too_long"
        );
        assert_eq!(
            Unputtable::TooLarge { bytes: 1 }.reason(),
            "record_too_large"
        );
    }

    #[test]
    fn the_log_is_written_once_per_interval_and_says_how_many_were_left_out() {
        let start = Instant::now();
        let mut log = RateLimitedLog::new(Duration::from_secs(10));
        let at = |s: u64| start + Duration::from_secs(s);
        assert_eq!(log.allow(at(0)), Some(0));
        assert_eq!(log.allow(at(1)), None);
        assert_eq!(log.allow(at(9)), None);
        assert_eq!(log.allow(at(10)), Some(2));
        assert_eq!(log.allow(at(12)), None);
        assert_eq!(log.allow(at(25)), Some(1));
    }
}
