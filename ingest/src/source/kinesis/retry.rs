//! Retrying: the counters callers export as metrics, and the one retry loop
//! every client operation shares (the reader has its own, because it must
//! also renew its iterator).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tracing::warn;

use super::error::{CAUSES, SourceError};
use crate::backoff::Backoff;

/// The first retry's delay: short, because most throttling clears within a
/// second.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
/// The longest delay between retries: a reader comes back within ~5 s of
/// Kinesis (or an emulator) recovering.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// The delays between retries of Kinesis calls: 100 ms doubling to 5 s, with
/// jitter so that the readers of many shards do not retry in lockstep.
pub(crate) fn kinesis_backoff() -> Backoff {
    Backoff::new(FIRST_RETRY_DELAY, MAX_RETRY_DELAY)
}

/// A shard reader's wait before it tries again after `err` (retriable):
/// counted in `retries`, logged with its cause, then the backoff's delay.
/// `shard`: (stream, shard id), for the log.
pub(crate) async fn wait_before_retry(
    retries: &RetryCounts,
    backoff: &mut Backoff,
    (stream, shard): (&str, &str),
    err: &SourceError,
) {
    retries.record(err);
    let delay = backoff.next_delay();
    warn!(
        stream,
        shard,
        cause = err.cause(),
        retry_in_ms = delay.as_millis() as u64,
        error = %err,
        "Kinesis read failed, retrying"
    );
    tokio::time::sleep(delay).await;
}

/// How many calls were retried, by cause ([`SourceError::cause`]).
///
/// Kept by every [`ShardReader`](super::ShardReader) and
/// [`KinesisSource`](super::KinesisSource), so that the metrics module can
/// export `..._retries_total{cause=..}` without this module knowing about
/// metrics. Counters only grow.
#[derive(Debug, Default)]
pub struct RetryCounts {
    /// One counter per entry of `CAUSES`, in its order.
    counts: [AtomicU64; CAUSES.len()],
}

impl RetryCounts {
    /// The number of retries with this cause (0 for an unknown label).
    pub fn get(&self, cause: &str) -> u64 {
        CAUSES
            .iter()
            .position(|known| *known == cause)
            .map_or(0, |i| self.counts[i].load(Ordering::Relaxed))
    }

    /// The number of retries of any cause.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Every cause with its count, zeros included, in a fixed order.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        CAUSES
            .iter()
            .zip(&self.counts)
            .map(|(cause, count)| (*cause, count.load(Ordering::Relaxed)))
            .collect()
    }

    /// Counts one retry because of `err`.
    pub(crate) fn record(&self, err: &SourceError) {
        if let Some(i) = CAUSES.iter().position(|known| *known == err.cause()) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// How long a client operation keeps retrying retriable errors.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Patience {
    /// Until it succeeds or fails for good: writes that must land.
    Forever,
    /// At most this many retries (about 35 s at 8): control-plane calls, whose
    /// callers are starting up and should hear about a dead endpoint.
    Retries(u32),
}

/// Runs `attempt` until it succeeds, fails with an error retrying cannot fix,
/// or `patience` runs out; waits with backoff and jitter between attempts,
/// logs each retry at warn with its cause, and counts it in `counts`.
pub(crate) async fn retrying<T, F, Fut>(
    counts: &RetryCounts,
    patience: Patience,
    mut attempt: F,
) -> Result<T, SourceError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, SourceError>>,
{
    let mut backoff = kinesis_backoff();
    let mut retries = 0u32;
    loop {
        let err = match attempt().await {
            Ok(value) => return Ok(value),
            Err(err) => err,
        };
        let gave_up = match patience {
            Patience::Forever => false,
            Patience::Retries(max) => retries >= max,
        };
        if !err.is_retriable() || gave_up {
            return Err(err);
        }
        retries += 1;
        counts.record(&err);
        let delay = backoff.next_delay();
        warn!(
            operation = err.call().operation,
            stream = %err.call().stream,
            cause = err.cause(),
            retry_in_ms = delay.as_millis() as u64,
            error = %err,
            "Kinesis call failed, retrying"
        );
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::source::kinesis::error::Call;

    fn failure(kind: fn(Call, String) -> SourceError) -> SourceError {
        let call = Call {
            operation: "ListShards",
            stream: "s".into(),
            shard: None,
        };
        kind(call, "injected".into())
    }

    fn throttled(call: Call, detail: String) -> SourceError {
        SourceError::Throttled { call, detail }
    }

    fn not_found(call: Call, detail: String) -> SourceError {
        SourceError::NotFound { call, detail }
    }

    #[tokio::test]
    async fn retries_retriable_errors_and_counts_them() {
        let counts = RetryCounts::default();
        let calls = Cell::new(0);
        let result = retrying(&counts, Patience::Forever, || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                if n < 4 {
                    Err(failure(throttled))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(result.unwrap(), 4);
        assert_eq!(counts.get("throttled"), 3);
        assert_eq!(counts.total(), 3);
    }

    #[tokio::test]
    async fn returns_errors_retrying_cannot_fix_at_once() {
        let counts = RetryCounts::default();
        let calls = Cell::new(0);
        let result: Result<(), _> = retrying(&counts, Patience::Forever, || {
            calls.set(calls.get() + 1);
            async { Err(failure(not_found)) }
        })
        .await;
        assert_eq!(result.unwrap_err().cause(), "not_found");
        assert_eq!((calls.get(), counts.total()), (1, 0));
    }

    #[tokio::test]
    async fn gives_up_after_the_allowed_retries() {
        let counts = RetryCounts::default();
        let calls = Cell::new(0);
        let result: Result<(), _> = retrying(&counts, Patience::Retries(3), || {
            calls.set(calls.get() + 1);
            async { Err(failure(throttled)) }
        })
        .await;
        assert_eq!(result.unwrap_err().cause(), "throttled");
        assert_eq!((calls.get(), counts.get("throttled")), (4, 3));
    }

    #[test]
    fn snapshot_lists_every_cause() {
        let counts = RetryCounts::default();
        counts.record(&failure(throttled));
        let snapshot = counts.snapshot();
        assert_eq!(snapshot.len(), CAUSES.len());
        assert!(snapshot.contains(&("throttled", 1)));
        assert_eq!(counts.get("no_such_cause"), 0);
    }
}
