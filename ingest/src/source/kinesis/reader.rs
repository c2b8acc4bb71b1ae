//! [`ShardReader`]: reads one shard in order, paced within the shard's read
//! quota, and recovers by itself from everything retrying can fix.

use std::time::Duration;

use tokio::time::Instant;
use tracing::debug;

use super::client::KinesisSource;
use super::error::SourceError;
use super::record::{Fetched, StartPosition, from_sdk_record};
use super::retry::{RetryCounts, kinesis_backoff, wait_before_retry};
use crate::backoff::Backoff;

/// The most records one GetRecords call may return (a Kinesis limit).
const MAX_RECORDS_PER_CALL: i32 = 10_000;

/// How a [`ShardReader`] polls its shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderOptions {
    /// The Limit of each GetRecords call: bigger batches mean fewer calls
    /// and bigger COPYs. Clamped to 1..=10,000 (the Kinesis maximum).
    pub max_records_per_call: i32,
    /// The least time between two GetRecords calls on this shard: Kinesis
    /// allows 5 calls per second per shard, shared by all its consumers.
    pub min_call_interval: Duration,
    /// The longest wait between calls while the shard has nothing new: the
    /// wait grows from `min_call_interval` up to this and resets on data,
    /// so idle shards cost few calls and busy ones are read at full rate.
    /// Raised to `min_call_interval` if below it.
    pub max_idle_wait: Duration,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        Self {
            max_records_per_call: MAX_RECORDS_PER_CALL,
            min_call_interval: Duration::from_millis(200),
            max_idle_wait: Duration::from_secs(1),
        }
    }
}

/// Where the reader stands in its shard.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Position {
    /// A shard iterator is needed first: at the start, and after the last
    /// one expired.
    NeedIterator,
    /// The iterator for the next GetRecords call.
    At(String),
    /// The shard is closed and was read to its end.
    Ended,
}

/// Reads one shard in order. It remembers the last sequence number it
/// returned, so that after an expired iterator or an error it resumes
/// exactly after it (AFTER_SEQUENCE_NUMBER), never skipping or repeating a
/// record it already returned.
#[derive(Debug)]
pub struct ShardReader {
    /// The stream's client, shared with the other readers.
    source: KinesisSource,
    /// The shard this reader reads.
    shard_id: String,
    /// Where reading started: used again if the first iterator expires
    /// before any record was returned.
    start: StartPosition,
    /// Pacing and batch size, clamped to what Kinesis allows.
    options: ReaderOptions,
    /// Where the next call reads from.
    position: Position,
    /// The sequence number of the last record returned by `next`: the only
    /// safe place to resume from.
    last_sequence: Option<String>,
    /// No GetRecords call before this instant (pacing and idle waits).
    next_call_at: Instant,
    /// The wait after the next empty answer; grows while the shard is idle.
    idle_wait: Duration,
    /// Delays between retries of failed calls.
    backoff: Backoff,
    /// Retries of this reader's calls, by cause.
    retries: RetryCounts,
}

impl ShardReader {
    pub(crate) fn new(
        source: KinesisSource,
        shard_id: &str,
        start: StartPosition,
        mut options: ReaderOptions,
    ) -> Self {
        options.max_records_per_call = options.max_records_per_call.clamp(1, MAX_RECORDS_PER_CALL);
        options.max_idle_wait = options.max_idle_wait.max(options.min_call_interval);
        Self {
            source,
            shard_id: shard_id.to_owned(),
            start,
            idle_wait: options.min_call_interval,
            options,
            position: Position::NeedIterator,
            last_sequence: None,
            next_call_at: Instant::now(),
            backoff: kinesis_backoff(),
            retries: RetryCounts::default(),
        }
    }

    /// The next non-empty batch of records, waiting (with the adaptive idle
    /// wait) while the shard is empty. Returns `Ok(Fetched::EndOfShard)`
    /// once a closed shard has been read to its end, and on every call
    /// after that.
    ///
    /// Never more than one GetRecords call per `min_call_interval`. Retries
    /// by itself, with backoff and jitter up to ~5 s, logging each retry at
    /// warn and counting it in [`retries`](Self::retries): throttling (shard
    /// quota, KMS), LimitExceeded, an expired iterator (a new one is taken
    /// after the last returned record, or at the start position if none
    /// was returned yet), network errors, timeouts, 5xx, and an endpoint
    /// that refuses connections for a while.
    ///
    /// Returns `Err` only for errors retrying cannot fix: the stream or
    /// shard not found (or aged out of retention), access denied, a KMS key
    /// that cannot be used, an invalid argument (a sequence number that is
    /// not in this shard), a broken AWS configuration, or an error this
    /// module does not know. The reader may be called again after one.
    ///
    /// Cancel safe: the reader's position changes only together with the
    /// records being returned, so dropping the future loses nothing; the
    /// next call may fetch the same records again.
    pub async fn next(&mut self) -> Result<Fetched, SourceError> {
        loop {
            let iterator = match &self.position {
                Position::Ended => return Ok(Fetched::EndOfShard),
                Position::At(iterator) => iterator.clone(),
                Position::NeedIterator => {
                    let resume = resume_point(&self.start, self.last_sequence.as_deref());
                    match self.source.shard_iterator(&self.shard_id, &resume).await {
                        Ok(iterator) => {
                            debug!(shard = %self.shard_id, ?resume, "got a shard iterator");
                            self.position = Position::At(iterator);
                            continue;
                        }
                        Err(err) => {
                            self.retry_after(err).await?;
                            continue;
                        }
                    }
                }
            };

            tokio::time::sleep_until(self.next_call_at).await;
            let called_at = Instant::now();
            self.next_call_at = called_at + self.options.min_call_interval;
            let limit = self.options.max_records_per_call;
            let output = match self
                .source
                .get_records(&self.shard_id, &iterator, limit)
                .await
            {
                Ok(output) => output,
                Err(err) => {
                    self.retry_after(err).await?;
                    continue;
                }
            };

            // From here to the return, no await: the records and the new
            // position are taken together, or not at all.
            self.backoff.reset();
            self.position = match output.next_shard_iterator {
                Some(next) => Position::At(next),
                None => Position::Ended,
            };
            let records: Vec<_> = output.records.into_iter().map(from_sdk_record).collect();
            if let Some(last) = records.last() {
                self.last_sequence = Some(last.sequence_number.clone());
                self.idle_wait = self.options.min_call_interval;
                return Ok(Fetched::Records {
                    records,
                    millis_behind_latest: output.millis_behind_latest,
                });
            }
            if self.position == Position::Ended {
                return Ok(Fetched::EndOfShard);
            }
            // Nothing new. Caught up: wait longer each time. Behind: Kinesis
            // can answer empty over gaps in an old shard, so keep going.
            if output.millis_behind_latest.unwrap_or(0) == 0 {
                self.next_call_at = called_at + self.idle_wait;
                self.idle_wait = (self.idle_wait * 2).min(self.options.max_idle_wait);
            }
        }
    }

    /// Handles a failed call: returns the error if retrying cannot fix it;
    /// otherwise counts and logs it, forgets an expired iterator, and waits.
    async fn retry_after(&mut self, err: SourceError) -> Result<(), SourceError> {
        if !err.is_retriable() {
            return Err(err);
        }
        if needs_new_iterator(&err) {
            self.position = Position::NeedIterator;
        }
        let shard = (self.source.stream(), self.shard_id.as_str());
        wait_before_retry(&self.retries, &mut self.backoff, shard, &err).await;
        Ok(())
    }

    /// The shard this reader reads.
    pub fn shard_id(&self) -> &str {
        &self.shard_id
    }

    /// The sequence number of the last record returned: where a new reader
    /// would resume (`StartPosition::AfterSequence`).
    pub fn last_sequence(&self) -> Option<&str> {
        self.last_sequence.as_deref()
    }

    /// Retries of this reader's calls, by cause: for a retries metric.
    pub fn retries(&self) -> &RetryCounts {
        &self.retries
    }
}

/// Where a new iterator must start: right after the last record returned,
/// or, if none was, where reading started.
///
/// For [`StartPosition::Latest`] with nothing returned yet, that is "latest"
/// again at the time of the new iterator; nothing was returned, so the
/// reader still starts at some "now", as asked.
pub(super) fn resume_point(start: &StartPosition, last_sequence: Option<&str>) -> StartPosition {
    match last_sequence {
        Some(sequence) => StartPosition::AfterSequence(sequence.to_owned()),
        None => start.clone(),
    }
}

/// Whether the error makes the current iterator useless. Other retriable
/// errors keep it: an iterator stays valid for 5 minutes, and reusing it
/// re-reads from the same place.
fn needs_new_iterator(err: &SourceError) -> bool {
    matches!(err, SourceError::ExpiredIterator { .. })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::kinesis::error::Call;

    fn call() -> Call {
        Call {
            operation: "GetRecords",
            stream: "s".into(),
            shard: Some("shardId-000000000000".into()),
        }
    }

    #[test]
    fn resumes_after_the_last_returned_record() {
        let cases = [
            (StartPosition::TrimHorizon, None, StartPosition::TrimHorizon),
            (StartPosition::Latest, None, StartPosition::Latest),
            (
                StartPosition::AfterSequence("10".into()),
                None,
                StartPosition::AfterSequence("10".into()),
            ),
            (
                StartPosition::TrimHorizon,
                Some("42"),
                StartPosition::AfterSequence("42".into()),
            ),
            (
                StartPosition::AfterSequence("10".into()),
                Some("42"),
                StartPosition::AfterSequence("42".into()),
            ),
            (
                StartPosition::AtTimestamp(std::time::SystemTime::UNIX_EPOCH),
                Some("7"),
                StartPosition::AfterSequence("7".into()),
            ),
        ];
        for (start, last, expected) in cases {
            assert_eq!(resume_point(&start, last), expected, "{start:?} {last:?}");
        }
    }

    #[test]
    fn only_an_expired_iterator_forces_a_new_one() {
        let expired = SourceError::ExpiredIterator {
            call: call(),
            detail: String::new(),
        };
        let throttled = SourceError::Throttled {
            call: call(),
            detail: String::new(),
        };
        let network = SourceError::Network {
            call: call(),
            detail: String::new(),
        };
        assert!(needs_new_iterator(&expired));
        assert!(!needs_new_iterator(&throttled));
        assert!(!needs_new_iterator(&network));
    }

    #[test]
    fn options_are_clamped_to_what_kinesis_allows() {
        let options = ReaderOptions {
            max_records_per_call: 50_000,
            min_call_interval: Duration::from_millis(500),
            max_idle_wait: Duration::from_millis(100),
        };
        let reader = ShardReader::new(test_source(), "shardId-0", StartPosition::Latest, options);
        assert_eq!(reader.options.max_records_per_call, MAX_RECORDS_PER_CALL);
        assert_eq!(reader.options.max_idle_wait, Duration::from_millis(500));
    }

    /// A source whose client is never called.
    fn test_source() -> KinesisSource {
        KinesisSource::for_tests("s")
    }
}
