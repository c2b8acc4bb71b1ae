//! Batches: records of many shards, encoded as binary COPY tuples, flushed
//! on rows, bytes or age, whichever comes first. No IO here.
//!
//! - [`copy`]: the binary COPY format.
//! - [`series`]: the cache of series ids.
//! - [`segment`]: one shard's rows and checkpoint within a batch.

pub mod copy;
pub mod segment;
pub mod series;

use std::time::{Duration, Instant};

pub use segment::{
    DeadLetterKey, RecordMark, RecordTuples, SealedSegment, Segment, UnknownSeries,
    encode_dead_letter, missing_series,
};
pub use series::{CacheStats, NewSeriesLimit, SeriesCache, SeriesKey};

/// When a batch is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushPolicy {
    /// Rows (samples + events + dead letters) that make a batch full.
    pub max_rows: usize,
    /// Encoded bytes that make a batch full.
    pub max_bytes: usize,
    /// Age at which a batch is written however small, bounding latency.
    pub max_age: Duration,
    /// Age at which a batch is written once its writer has nothing more
    /// queued: at low load rows wait no longer than this, while under load
    /// (chunks queued) batches still fill up to the limits above.
    pub idle_age: Duration,
}

impl Default for FlushPolicy {
    fn default() -> Self {
        FlushPolicy {
            max_rows: 50_000,
            max_bytes: 8 * 1024 * 1024,
            max_age: Duration::from_millis(500),
            idle_age: Duration::from_millis(100),
        }
    }
}

/// Records of many shards on their way into one transaction.
#[derive(Debug)]
pub struct Batch {
    /// One segment per shard, in the order the shards joined.
    segments: Vec<Segment>,
    /// When the first record arrived, for the age limit.
    opened_at: Option<Instant>,
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

impl Batch {
    pub fn new() -> Self {
        Batch {
            segments: Vec::new(),
            opened_at: None,
        }
    }

    /// The segment of `shard_id` read under lease `lease_counter`, created on
    /// first use. Keyed by both: a lease lost and taken again gives a new
    /// segment, so rows of the old lease can be dropped alone.
    pub fn segment(&mut self, shard_id: &str, lease_counter: i64, now: Instant) -> &mut Segment {
        self.opened_at.get_or_insert(now);
        let index = match self
            .segments
            .iter()
            .position(|s| s.shard_id == shard_id && s.lease_counter == lease_counter)
        {
            Some(index) => index,
            None => {
                self.segments.push(Segment::new(shard_id, lease_counter));
                self.segments.len() - 1
            }
        };
        &mut self.segments[index]
    }

    /// Forgets a shard's rows read under `lease_counter`: that lease was
    /// lost, so its next owner reads them again from the committed checkpoint.
    pub fn drop_lease(&mut self, shard_id: &str, lease_counter: i64) {
        self.segments
            .retain(|s| s.shard_id != shard_id || s.lease_counter != lease_counter);
        if self.segments.is_empty() {
            self.opened_at = None;
        }
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Hands the segments over for writing, leaving an empty batch.
    pub fn take(&mut self) -> Vec<Segment> {
        self.opened_at = None;
        std::mem::take(&mut self.segments)
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Total rows in all tables.
    pub fn rows(&self) -> usize {
        self.segments
            .iter()
            .map(|s| {
                let (a, b, c) = s.rows();
                a + b + c
            })
            .sum()
    }

    pub fn bytes(&self) -> usize {
        self.segments.iter().map(Segment::bytes).sum()
    }

    /// Whether `policy` says to write now.
    pub fn is_due(&self, policy: &FlushPolicy, now: Instant) -> bool {
        match self.opened_at {
            None => false,
            Some(opened) => {
                self.rows() >= policy.max_rows
                    || self.bytes() >= policy.max_bytes
                    || now.duration_since(opened) >= policy.max_age
            }
        }
    }

    /// When the batch is written if nothing more comes meanwhile, if it
    /// holds anything: at its idle age (or its age limit, if sooner).
    pub fn idle_deadline(&self, policy: &FlushPolicy) -> Option<Instant> {
        self.opened_at
            .map(|opened| opened + policy.idle_age.min(policy.max_age))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::DecodeError;

    #[test]
    fn flushes_on_rows_bytes_or_age() {
        let start = Instant::now();
        let policy = FlushPolicy {
            max_rows: 3,
            max_bytes: 1_000,
            max_age: Duration::from_millis(500),
            idle_age: Duration::from_millis(100),
        };
        let mut batch = Batch::new();
        assert!(
            !batch.is_due(&policy, start + Duration::from_secs(10)),
            "an empty batch is never due"
        );

        let dead = |batch: &mut Batch, shard: &str, raw: &[u8]| {
            batch.segment(shard, 1, start).add_dead_letter(
                "s",
                "1",
                None,
                &DecodeError::NoFields,
                raw,
            )
        };
        dead(&mut batch, "a", b"x");
        dead(&mut batch, "b", b"y");
        assert!(!batch.is_due(&policy, start));
        assert!(
            batch.is_due(&policy, start + Duration::from_millis(500)),
            "age"
        );
        assert_eq!(
            batch.idle_deadline(&policy),
            Some(start + Duration::from_millis(100))
        );
        dead(&mut batch, "a", b"z");
        assert!(batch.is_due(&policy, start), "rows");
        assert_eq!(batch.segments().len(), 2, "one segment per shard");

        batch.drop_lease("a", 1);
        assert_eq!(batch.rows(), 1);
        let mut big = Batch::new();
        dead(&mut big, "a", &[0; 2_000]);
        assert!(big.is_due(&policy, start), "bytes");

        assert_eq!(batch.take().len(), 1);
        assert!(batch.is_empty() && batch.idle_deadline(&policy).is_none());
    }
}
