//! The gateway's Kinesis producer: records from many concurrent requests
//! batched into PutRecords calls (at most 500 records and 5 MiB each, up to
//! `concurrency` calls in flight), entries that failed retried with backoff,
//! and every submitter told its own record's final outcome.
//!
//! Batching needs no timer: while calls are in flight, new records queue up,
//! and the next free call takes all of them (up to the limits). One device
//! alone gets a call of one record at once; under load calls fill up.
//!
//! A record may carry a deadline (CoAP: the device is waiting): once it has
//! passed, the record is answered [`Outcome::Unavailable`] and never sent,
//! so a device told 5.03 does not also find its record stored, except when
//! the deadline passes while a call with the record is in flight (that call
//! may still write it: at least once, as with any Kinesis producer). A
//! record without a deadline (MQTT QoS 1: the broker keeps it until it is
//! acknowledged) is retried until Kinesis takes it or the gateway stops.
//!
//! What may wait is bounded twice: in records (`queue_records`) and in
//! bytes of keys and data (`queue_bytes`), counted from the moment a record
//! is queued until it is answered, retries and calls in flight included.
//!
//! A record Kinesis could never take (a partition key over 256 characters,
//! more than 1 MiB) is refused before it is queued ([`admission::check`]),
//! so it never shares a call with others. Should Kinesis still refuse a
//! call as a whole (InvalidArgument), its records are sent again in halves,
//! down to the one it refuses alone, which is answered
//! [`Outcome::Unputtable`]: never retried, never in the way of the others.
//!
//! Each device's records reach Kinesis in the order they came: a key's
//! records in a call keep their order (Kinesis numbers a shard's records
//! in the order of the call), and a key's next records wait until the call
//! holding its last ones is settled (several calls are in flight at once,
//! and Kinesis may take a later one first; a record retried goes first
//! again). Without it, a device whose messages queued up (an MQTT session
//! redelivering after a restart, a burst under load) found them out of
//! order in its shard. One case is left, as with any Kinesis producer:
//! Kinesis fails one record of a call and takes a later record of the same
//! key (a partial failure); that is counted in
//! `ingest_gateway_records_reordered_total`. With `aggregate`, a key's
//! records of a call are packed in order into its shard's aggregates, so
//! it needs an aggregate failed and a later one of that shard taken.
//!
//! With `aggregate`, each call's records are packed into KPL aggregates,
//! one group per shard ([`aggregate`]), on a shard map read with
//! ListShards; a record is answered only once the aggregate holding it was
//! accepted, and an aggregate refused is retried, its records packed again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;

use super::admission::{self, RateLimitedLog, Unputtable};
use super::aggregate::{CallPacker, ShardMap};
use super::health::KinesisHealth;
use crate::backoff::Backoff;
use crate::metrics as m;
use crate::source::kinesis::{
    KinesisSource, MAX_BYTES_PER_PUT, MAX_RECORDS_PER_PUT, PutEntry, SourceError,
};

/// Which door a record came in by, for metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// A CoAP request.
    Coap,
    /// An MQTT message from the bridge.
    Mqtt,
}

impl Protocol {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Coap => "coap",
            Protocol::Mqtt => "mqtt",
        }
    }
}

/// One record to put.
#[derive(Debug)]
pub struct Submission {
    /// The partition key: the device id.
    pub key: String,
    /// The record (JSON).
    pub data: Bytes,
    /// When the submitter stops waiting; `None` to retry until stored.
    pub deadline: Option<Instant>,
    /// For metrics.
    pub protocol: Protocol,
}

/// What became of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Kinesis accepted it.
    Stored,
    /// Not stored before its deadline (Kinesis unreachable, throttling, or a
    /// queue too long): the device may send it again later (CoAP 5.03).
    Unavailable(String),
    /// Kinesis refused it for a reason retrying cannot fix (stream deleted,
    /// access denied): someone must act (CoAP 5.00).
    Refused(String),
    /// Kinesis refused this record alone, whatever the others: it can
    /// never be put (MQTT: acknowledged and dropped; CoAP 4.00).
    Unputtable(Unputtable),
}

/// Why a record was not even queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full: overload (CoAP 5.03).
    #[error("the gateway's queue to Kinesis is full")]
    Full,
    /// The producer has stopped: the gateway is shutting down.
    #[error("the gateway is shutting down")]
    Closed,
    /// Kinesis could never take the record: never queued, never retried.
    #[error(transparent)]
    Unputtable(#[from] Unputtable),
}

/// Settings of the producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerConfig {
    /// PutRecords calls in flight at once.
    pub concurrency: usize,
    /// Records waiting for a call before submitters are told "full".
    pub queue_records: usize,
    /// Bytes of keys and data waiting (or in calls) before submitters are
    /// told "full"; at least [`MIN_QUEUE_BYTES`].
    pub queue_bytes: usize,
    /// Pack each call's records into KPL aggregates, one group per shard.
    pub aggregate: bool,
}

/// How often the shard map is read again when no put found it stale.
const SHARD_MAP_EVERY: Duration = Duration::from_secs(60);

/// The least `queue_bytes`: room for the largest record Kinesis takes, so
/// that every record that passes [`admission::check`] can be queued.
pub const MIN_QUEUE_BYTES: usize = 2 * crate::source::kinesis::MAX_RECORD_BYTES;

/// The handle submitters hold; cheap to clone. The producer stops when
/// every handle is dropped and what was queued is answered.
#[derive(Debug, Clone)]
pub struct Producer {
    /// The queue into the producer task.
    tx: mpsc::Sender<Pending>,
    /// The byte budget: one permit per byte of key and data queued.
    budget: Arc<Semaphore>,
}

/// A record waiting in the producer.
#[derive(Debug)]
struct Pending {
    /// (partition key, data), as PutRecords takes them.
    record: (String, Bytes),
    /// Everything else about it.
    meta: Meta,
}

#[derive(Debug)]
struct Meta {
    deadline: Option<Instant>,
    protocol: Protocol,
    reply: oneshot::Sender<Outcome>,
    /// The record's share of the byte budget, given back when it is
    /// answered (dropped with it).
    _bytes: OwnedSemaphorePermit,
}

impl Producer {
    /// Starts the producer task for `source`.
    pub fn start(
        source: KinesisSource,
        config: ProducerConfig,
        health: Arc<KinesisHealth>,
    ) -> (Producer, tokio::task::JoinHandle<()>) {
        let queue_bytes = config.queue_bytes.max(MIN_QUEUE_BYTES);
        let budget = Arc::new(Semaphore::new(queue_bytes));
        let (tx, rx) = mpsc::channel(config.queue_records.max(1));
        let shard_map = config.aggregate.then(|| {
            let (map, updates) = watch::channel(None);
            let stale = Arc::new(Notify::new());
            tokio::spawn(keep_shard_map(source.clone(), map, stale.clone()));
            SharedShardMap { updates, stale }
        });
        let task = tokio::spawn(run(source, rx, config, budget.clone(), health, shard_map));
        (Producer { tx, budget }, task)
    }

    /// Queues `submission` if there is room; the receiver gets its outcome.
    pub fn try_submit(
        &self,
        submission: Submission,
    ) -> Result<oneshot::Receiver<Outcome>, SubmitError> {
        let size = admitted(&submission)?;
        let permit = match self.budget.clone().try_acquire_many_owned(size) {
            Ok(permit) => permit,
            Err(tokio::sync::TryAcquireError::NoPermits) => return Err(SubmitError::Full),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(SubmitError::Closed),
        };
        let (pending, receiver) = pending(submission, permit);
        self.tx.try_send(pending).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => SubmitError::Full,
            mpsc::error::TrySendError::Closed(_) => SubmitError::Closed,
        })?;
        Ok(receiver)
    }

    /// Queues `submission`, waiting for room (records and bytes).
    pub async fn submit(
        &self,
        submission: Submission,
    ) -> Result<oneshot::Receiver<Outcome>, SubmitError> {
        let size = admitted(&submission)?;
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(size)
            .await
            .map_err(|_| SubmitError::Closed)?;
        let (pending, receiver) = pending(submission, permit);
        self.tx
            .send(pending)
            .await
            .map_err(|_| SubmitError::Closed)?;
        Ok(receiver)
    }
}

/// The submission's size in the byte budget, if Kinesis can take it.
fn admitted(submission: &Submission) -> Result<u32, Unputtable> {
    admission::check(&submission.key, &submission.data)?;
    // Within MAX_RECORD_BYTES, so it fits.
    Ok((submission.key.len() + submission.data.len()) as u32)
}

fn pending(
    submission: Submission,
    permit: OwnedSemaphorePermit,
) -> (Pending, oneshot::Receiver<Outcome>) {
    let (reply, receiver) = oneshot::channel();
    let pending = Pending {
        record: (submission.key, submission.data),
        meta: Meta {
            deadline: submission.deadline,
            protocol: submission.protocol,
            reply,
            _bytes: permit,
        },
    };
    (pending, receiver)
}

/// One Kinesis record of a call: a record put plain, or an aggregate of
/// several.
#[derive(Debug)]
struct Entry {
    /// (partition key, data), as PutRecords takes them.
    record: (String, Bytes),
    /// The records in it, in order.
    parts: Vec<Pending>,
    /// The shard an aggregate was packed for; None when put plain.
    shard: Option<String>,
}

impl Entry {
    /// A record put as it is.
    fn plain(part: Pending) -> Entry {
        Entry {
            record: part.record.clone(),
            parts: vec![part],
            shard: None,
        }
    }
}

/// The result of one call, with the records it carried.
type CallResult = (Vec<Entry>, Result<Vec<PutEntry>, SourceError>);

/// The shard map as the task keeping it last read it, and how to tell that
/// task it is stale.
#[derive(Debug)]
struct SharedShardMap {
    updates: watch::Receiver<Option<Arc<ShardMap>>>,
    stale: Arc<Notify>,
}

/// Keeps `map` to the stream's open shards: read at start, every
/// [`SHARD_MAP_EVERY`], and again (at most once a second) when a put found
/// it stale. Ends with the producer.
async fn keep_shard_map(
    source: KinesisSource,
    map: watch::Sender<Option<Arc<ShardMap>>>,
    stale: Arc<Notify>,
) {
    loop {
        let next_read = match source.list_shards().await {
            Ok(shards) => {
                map.send_replace(ShardMap::new(&shards).map(Arc::new));
                SHARD_MAP_EVERY
            }
            Err(error) => {
                // The map held (if any) is most likely still right.
                tracing::warn!(%error, "cannot read the shard map; trying again");
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            () = map.closed() => return,
            () = stale.notified() => {
                tracing::info!("a put landed on another shard than the shard map said: reading it again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            () = tokio::time::sleep(next_read) => {}
        }
    }
}

async fn run(
    source: KinesisSource,
    mut rx: mpsc::Receiver<Pending>,
    config: ProducerConfig,
    budget: Arc<Semaphore>,
    health: Arc<KinesisHealth>,
    shard_map: Option<SharedShardMap>,
) {
    let concurrency = config.concurrency.max(1);
    let queue_bytes = config.queue_bytes.max(MIN_QUEUE_BYTES);
    // Records taken off the channel: enough to fill every call once more
    // (aggregated, a call takes up to 5 MiB of small records).
    let per_call = if config.aggregate {
        MAX_BYTES_PER_PUT / 128
    } else {
        MAX_RECORDS_PER_PUT
    };
    let cap = per_call * concurrency;
    let mut pending: VecDeque<Pending> = VecDeque::new();
    // Parts of a call Kinesis refused as a whole, sent before anything else
    // (halved until the record it refuses is alone).
    let mut isolating: VecDeque<Vec<Pending>> = VecDeque::new();
    let mut calls = FuturesUnordered::new();
    // The partition keys of the records in calls in flight or being
    // isolated: the next records of these keys wait (see the module doc).
    let mut held = KeyHolds::default();
    // Parts being isolated go one call at a time, as they may share keys.
    let mut isolating_in_flight = false;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut pause_until: Option<Instant> = None;
    let mut last_error = String::from("no call has succeeded yet");
    let mut dropped_log = RateLimitedLog::new(Duration::from_secs(10));
    let mut open = true;
    loop {
        while open && pending.len() < cap {
            match rx.try_recv() {
                Ok(record) => pending.push_back(record),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        let now = Instant::now();
        let paused = pause_until.is_some_and(|until| until > now);
        while !paused && calls.len() < concurrency && !(pending.is_empty() && isolating.is_empty())
        {
            // A part being isolated goes plain: the record Kinesis refuses
            // must end up alone in its call.
            let isolated = !isolating.is_empty() && !isolating_in_flight;
            let entries = if isolated {
                // Its keys were held since the refused call: it goes whole
                // (but for records expired), holding them in its call.
                let part = isolating.pop_front().expect("not empty");
                held.release(part.iter().map(|part| part.record.0.as_str()));
                let mut part = VecDeque::from(part);
                take_call(&mut part, &KeyHolds::default(), now, &last_error, None)
            } else {
                let map = shard_map
                    .as_ref()
                    .and_then(|map| map.updates.borrow().clone());
                let entries = take_call(&mut pending, &held, now, &last_error, map.as_deref());
                if entries.is_empty() {
                    // What is left waits for its keys' calls to settle.
                    break;
                }
                entries
            };
            if entries.is_empty() {
                continue;
            }
            held.hold(record_keys(&entries));
            isolating_in_flight |= isolated;
            let source = source.clone();
            calls.push(async move {
                let records: Vec<(String, Bytes)> =
                    entries.iter().map(|entry| entry.record.clone()).collect();
                let started = std::time::Instant::now();
                let result = source.put_records_once(&records).await;
                metrics::histogram!(m::GATEWAY_PUT_SECONDS).record(started.elapsed().as_secs_f64());
                let user_records: usize = entries.iter().map(|entry| entry.parts.len()).sum();
                metrics::histogram!(m::GATEWAY_PUT_BATCH_RECORDS).record(user_records as f64);
                (isolated, (entries, result))
            });
        }
        metrics::gauge!(m::GATEWAY_QUEUE_RECORDS).set((pending.len() + rx.len()) as f64);
        metrics::gauge!(m::GATEWAY_QUEUE_BYTES)
            .set(queue_bytes.saturating_sub(budget.available_permits()) as f64);
        if !open && pending.is_empty() && isolating.is_empty() && calls.is_empty() {
            return;
        }
        tokio::select! {
            Some((isolated, done)) = calls.next(), if !calls.is_empty() => {
                isolating_in_flight &= !isolated;
                held.release(record_keys(&done.0));
                let settled = settle(done, &health, &mut last_error, &mut dropped_log);
                held.hold(settled.halves.iter().flatten().map(|part| part.record.0.as_str()));
                if settled.map_stale
                    && let Some(map) = &shard_map
                {
                    map.stale.notify_one();
                }
                // A refused call's halves go first; no pause for them, as
                // the refusal was about a record, not about Kinesis's state.
                for part in settled.halves.into_iter().rev() {
                    isolating.push_front(part);
                }
                if settled.retry.is_empty() {
                    backoff.reset();
                } else {
                    pause_until = Some(Instant::now() + backoff.next_delay());
                    // Older records go first again.
                    for record in settled.retry.into_iter().rev() {
                        pending.push_front(record);
                    }
                }
            }
            received = rx.recv(), if open && pending.len() < cap => match received {
                Some(record) => pending.push_back(record),
                None => open = false,
            },
            _ = sleep_until(pause_until), if paused => {}
        }
    }
}

async fn sleep_until(until: Option<Instant>) {
    if let Some(until) = until {
        tokio::time::sleep_until(until).await;
    }
}

/// The partition keys of the user records in `entries`.
fn record_keys(entries: &[Entry]) -> impl Iterator<Item = &str> {
    entries
        .iter()
        .flat_map(|entry| &entry.parts)
        .map(|part| part.record.0.as_str())
}

/// The partition keys of the records in calls in flight or being isolated,
/// each counted once per record.
#[derive(Debug, Default)]
struct KeyHolds(HashMap<String, usize>);

impl KeyHolds {
    fn hold<'a>(&mut self, keys: impl Iterator<Item = &'a str>) {
        for key in keys {
            *self.0.entry(key.to_owned()).or_default() += 1;
        }
    }

    fn release<'a>(&mut self, keys: impl Iterator<Item = &'a str>) {
        for key in keys {
            if let Some(count) = self.0.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    self.0.remove(key);
                }
            }
        }
    }

    fn is_held(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }
}

/// Takes the oldest records that fit one call, in their order, but none of
/// a key in `busy` (those wait in their order), answering
/// those whose deadline passed (or whose submitter left) instead of sending
/// them; with a shard map, packed into aggregates, else each put plain.
fn take_call(
    pending: &mut VecDeque<Pending>,
    busy: &KeyHolds,
    now: Instant,
    last_error: &str,
    map: Option<&ShardMap>,
) -> Vec<Entry> {
    let mut taken = Vec::new();
    let mut waiting = Vec::new();
    let mut packer = map.map(CallPacker::new);
    let mut bytes = 0;
    while let Some(next) = pending.pop_front() {
        if next.meta.reply.is_closed() || next.meta.deadline.is_some_and(|d| d <= now) {
            let _ = next.meta.reply.send(Outcome::Unavailable(format!(
                "Kinesis did not take the record in time ({last_error})"
            )));
            metrics::counter!(m::GATEWAY_EXPIRED, "protocol" => next.meta.protocol.label())
                .increment(1);
            continue;
        }
        let (key, data) = &next.record;
        if busy.is_held(key) {
            waiting.push(next);
            continue;
        }
        let fits = match &mut packer {
            Some(packer) => packer.add(key, data),
            None => {
                let size = key.len() + data.len();
                let fits = taken.is_empty()
                    || (taken.len() < MAX_RECORDS_PER_PUT && bytes + size <= MAX_BYTES_PER_PUT);
                bytes += size;
                fits
            }
        };
        if !fits {
            pending.push_front(next);
            break;
        }
        taken.push(next);
    }
    for record in waiting.into_iter().rev() {
        pending.push_front(record);
    }
    let Some(packer) = packer else {
        return taken.into_iter().map(Entry::plain).collect();
    };
    let mut taken: Vec<Option<Pending>> = taken.into_iter().map(Some).collect();
    packer
        .finish()
        .into_iter()
        .map(|packed| Entry {
            record: packed.record,
            parts: packed
                .members
                .iter()
                .map(|&index| taken[index].take().expect("each record in one entry"))
                .collect(),
            shard: packed.shard,
        })
        .collect()
}

/// What is left of a finished call: records to send again after a pause,
/// and the halves of a call Kinesis refused as a whole.
#[derive(Debug, Default)]
struct Settled {
    retry: Vec<Pending>,
    halves: Vec<Vec<Pending>>,
    /// An aggregate landed on another shard than the map said.
    map_stale: bool,
    /// Records taken after an earlier record of their key in the same
    /// call failed.
    reordered: usize,
}

/// Answers the records of a finished call that are done (stored, or refused
/// for good) and returns those to send again, in their order.
fn settle(
    (entries, result): CallResult,
    health: &KinesisHealth,
    last_error: &mut String,
    dropped_log: &mut RateLimitedLog,
) -> Settled {
    let mut settled = Settled::default();
    let retry = &mut settled.retry;
    match result {
        Ok(results) => {
            health.reached();
            let mut first_failure: Option<SourceError> = None;
            // Keys of records failed in this call: a later record of one
            // that Kinesis took went before it (see the module doc).
            let mut failed_keys: HashSet<String> = HashSet::new();
            for (entry, result) in entries.into_iter().zip(results) {
                match result {
                    PutEntry::Accepted { shard_id, .. } => {
                        let reordered = entry
                            .parts
                            .iter()
                            .filter(|part| failed_keys.contains(&part.record.0))
                            .count();
                        if reordered > 0 {
                            settled.reordered += reordered;
                            metrics::counter!(m::GATEWAY_REORDERED).increment(reordered as u64);
                            tracing::warn!(
                                key = %entry.record.0,
                                records = reordered,
                                "Kinesis took records of a key after failing an earlier one of the same call: they are ahead of it in the shard"
                            );
                        }
                        let kind = match &entry.shard {
                            Some(predicted) => {
                                settled.map_stale |= *predicted != shard_id;
                                "aggregate"
                            }
                            None => "plain",
                        };
                        metrics::counter!(m::GATEWAY_KINESIS_RECORDS, "kind" => kind).increment(1);
                        for part in entry.parts {
                            metrics::counter!(m::GATEWAY_RECORDS_PUT, "protocol" => part.meta.protocol.label())
                                .increment(1);
                            let _ = part.meta.reply.send(Outcome::Stored);
                        }
                    }
                    PutEntry::Failed(err) => {
                        metrics::counter!(m::RETRIES, "cause" => err.cause()).increment(1);
                        failed_keys.extend(entry.parts.iter().map(|part| part.record.0.clone()));
                        for part in entry.parts {
                            if err.is_retriable() || part.meta.deadline.is_none() {
                                retry.push(part);
                            } else {
                                let _ = part.meta.reply.send(Outcome::Refused(err.to_string()));
                            }
                        }
                        first_failure.get_or_insert(err);
                    }
                }
            }
            let outcome = if first_failure.is_some() {
                "partial"
            } else {
                "ok"
            };
            metrics::counter!(m::GATEWAY_PUT_CALLS, "outcome" => outcome).increment(1);
            if let Some(err) = first_failure {
                *last_error = err.to_string();
                tracing::warn!(
                    failed = retry.len(),
                    cause = err.cause(),
                    error = %err,
                    "PutRecords entries failed, retrying them"
                );
            }
        }
        // Kinesis refused the call for its arguments: a record it will
        // never take. Halve the call until that record is alone.
        Err(err) if err.is_invalid_argument() => {
            metrics::counter!(m::GATEWAY_PUT_CALLS, "outcome" => "refused").increment(1);
            let mut parts: Vec<Pending> =
                entries.into_iter().flat_map(|entry| entry.parts).collect();
            if parts.len() > 1 {
                let second = parts.split_off(parts.len() / 2);
                settled.halves = vec![parts, second];
            } else if let Some(alone) = parts.pop() {
                let protocol = alone.meta.protocol.label();
                metrics::counter!(m::GATEWAY_REJECTED, "protocol" => protocol, "reason" => Unputtable::Refused.reason())
                    .increment(1);
                if let Some(suppressed) = dropped_log.allow(std::time::Instant::now()) {
                    tracing::error!(
                        key = %alone.record.0,
                        bytes = alone.record.1.len(),
                        error = %err,
                        suppressed,
                        "Kinesis refused a record on its own: dropped, never retried"
                    );
                }
                let _ = alone
                    .meta
                    .reply
                    .send(Outcome::Unputtable(Unputtable::Refused));
            }
        }
        Err(err) => {
            health.failed(&err);
            metrics::counter!(m::GATEWAY_PUT_CALLS, "outcome" => "error").increment(1);
            metrics::counter!(m::RETRIES, "cause" => err.cause()).increment(1);
            let retriable = err.is_retriable();
            for part in entries.into_iter().flat_map(|entry| entry.parts) {
                if retriable || part.meta.deadline.is_none() {
                    retry.push(part);
                } else {
                    let _ = part.meta.reply.send(Outcome::Refused(err.to_string()));
                }
            }
            if retriable {
                tracing::warn!(records = retry.len(), cause = err.cause(), error = %err, "PutRecords failed, retrying");
            } else {
                tracing::error!(cause = err.cause(), error = %err, "PutRecords failed and retrying cannot help");
            }
            *last_error = err.to_string();
        }
    }
    settled
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::Readiness;
    use crate::source::kinesis::Call;

    fn pending(key: &str, budget: &Arc<Semaphore>) -> (Pending, oneshot::Receiver<Outcome>) {
        let permit = budget.clone().try_acquire_many_owned(1).unwrap();
        super::pending(
            Submission {
                key: key.to_owned(),
                data: Bytes::from_static(b"{}"),
                deadline: None,
                protocol: Protocol::Mqtt,
            },
            permit,
        )
    }

    fn refused_call(parts: Vec<Pending>) -> CallResult {
        let entries = parts.into_iter().map(Entry::plain).collect();
        let err = SourceError::InvalidArgument {
            call: Call {
                operation: "PutRecords",
                stream: "s".into(),
                shard: None,
            },
            detail: "ValidationException: partitionKey too long".into(),
        };
        (entries, Err(err))
    }

    #[test]
    fn a_call_refused_as_a_whole_is_halved_down_to_the_record_refused_alone() {
        let health = KinesisHealth::new(Arc::new(Readiness::default()));
        let budget = Arc::new(Semaphore::new(10));
        let mut last_error = String::new();
        let mut log = RateLimitedLog::new(Duration::from_secs(10));
        let mut receivers = Vec::new();
        let mut parts = Vec::new();
        for key in ["a", "b", "c"] {
            let (p, r) = pending(key, &budget);
            parts.push(p);
            receivers.push(r);
        }
        let settled = settle(refused_call(parts), &health, &mut last_error, &mut log);
        assert!(settled.retry.is_empty(), "never retried after a pause");
        let keys: Vec<Vec<&str>> = settled
            .halves
            .iter()
            .map(|half| half.iter().map(|p| p.record.0.as_str()).collect())
            .collect();
        assert_eq!(keys, [vec!["a"], vec!["b", "c"]]);
        assert_eq!(budget.available_permits(), 7, "still held while sent again");

        // Refused alone: answered, never to be put; its bytes are given back.
        let mut halves = settled.halves.into_iter();
        let (alone, rest) = (halves.next().unwrap(), halves.next().unwrap());
        let settled = settle(refused_call(alone), &health, &mut last_error, &mut log);
        assert!(settled.retry.is_empty() && settled.halves.is_empty());
        assert_eq!(
            receivers.remove(0).try_recv(),
            Ok(Outcome::Unputtable(Unputtable::Refused))
        );
        assert_eq!(budget.available_permits(), 8);
        drop(rest);
        assert_eq!(budget.available_permits(), 10);
    }

    #[test]
    fn an_aggregate_answers_all_its_records_alike_and_a_wrong_shard_marks_the_map_stale() {
        let health = KinesisHealth::new(Arc::new(Readiness::default()));
        let budget = Arc::new(Semaphore::new(10));
        let mut last_error = String::new();
        let mut log = RateLimitedLog::new(Duration::from_secs(10));
        let aggregate = |keys: &[&str], budget: &Arc<Semaphore>| {
            let (parts, receivers): (Vec<Pending>, Vec<_>) =
                keys.iter().map(|key| pending(key, budget)).unzip();
            let entry = Entry {
                record: ("a".into(), Bytes::from_static(b"aggregate")),
                parts,
                shard: Some("shardId-000000000001".into()),
            };
            (entry, receivers)
        };
        let accepted = |shard: &str| PutEntry::Accepted {
            shard_id: shard.into(),
            sequence_number: "1".into(),
        };

        // Accepted where the map said: every record stored.
        let (entry, receivers) = aggregate(&["a", "b", "c"], &budget);
        let settled = settle(
            (vec![entry], Ok(vec![accepted("shardId-000000000001")])),
            &health,
            &mut last_error,
            &mut log,
        );
        assert!(!settled.map_stale && settled.retry.is_empty());
        for mut receiver in receivers {
            assert_eq!(receiver.try_recv(), Ok(Outcome::Stored));
        }

        // Accepted elsewhere (the stream was resharded): stored, map stale.
        let (entry, receivers) = aggregate(&["a", "b"], &budget);
        let settled = settle(
            (vec![entry], Ok(vec![accepted("shardId-000000000004")])),
            &health,
            &mut last_error,
            &mut log,
        );
        assert!(settled.map_stale);
        for mut receiver in receivers {
            assert_eq!(receiver.try_recv(), Ok(Outcome::Stored));
        }

        // Throttled: every record of it is sent again, in order, unanswered.
        let (entry, mut receivers) = aggregate(&["a", "b", "c"], &budget);
        let throttled = SourceError::Throttled {
            call: Call {
                operation: "PutRecords",
                stream: "s".into(),
                shard: None,
            },
            detail: "ProvisionedThroughputExceededException".into(),
        };
        let settled = settle(
            (vec![entry], Ok(vec![PutEntry::Failed(throttled)])),
            &health,
            &mut last_error,
            &mut log,
        );
        let keys: Vec<&str> = settled.retry.iter().map(|p| p.record.0.as_str()).collect();
        assert_eq!(keys, ["a", "b", "c"]);
        assert!(receivers.iter_mut().all(|r| r.try_recv().is_err()));
    }

    /// A call takes a device's records in their order, but none while a
    /// call with its earlier ones is in flight: calls in flight at once may
    /// be taken by Kinesis in any order. What waits keeps its order.
    #[test]
    fn a_key_waits_while_a_call_with_its_records_is_in_flight() {
        let budget = Arc::new(Semaphore::new(100));
        // The receivers stay: a record whose submitter left is not sent.
        let (mut pending, _receivers): (VecDeque<Pending>, Vec<_>) =
            ["x", "y", "x", "z", "y", "x", "w", "z"]
                .into_iter()
                .map(|key| pending(key, &budget))
                .unzip();
        let keys = |entries: &[Entry]| -> Vec<String> {
            record_keys(entries).map(str::to_owned).collect()
        };
        let left = |pending: &VecDeque<Pending>| -> Vec<String> {
            pending.iter().map(|p| p.record.0.clone()).collect()
        };
        let now = Instant::now();
        let mut held = KeyHolds::default();
        held.hold(["z"].into_iter());

        let first = take_call(&mut pending, &held, now, "", None);
        assert_eq!(keys(&first), ["x", "y", "x", "y", "x", "w"]);
        assert_eq!(left(&pending), ["z", "z"]);

        // While the first call is in flight, its keys wait too; z is
        // still held by another.
        let (more, _more_receivers): (Vec<Pending>, Vec<_>) = ["w", "y"]
            .into_iter()
            .map(|key| tests::pending(key, &budget))
            .unzip();
        pending.extend(more);
        held.hold(record_keys(&first));
        let second = take_call(&mut pending, &held, now, "", None);
        assert!(second.is_empty(), "every key is busy: {:?}", keys(&second));
        assert_eq!(left(&pending), ["z", "z", "w", "y"]);

        // Once z's call is settled, z goes; w and y wait for the first.
        held.release(["z"].into_iter());
        let third = take_call(&mut pending, &held, now, "", None);
        assert_eq!(keys(&third), ["z", "z"]);
        assert_eq!(left(&pending), ["w", "y"]);
        held.release(record_keys(&first));
        assert!(!held.is_held("x") && !held.is_held("w"));
    }

    /// Kinesis failing one record of a call and taking a later one of the
    /// same key puts the later ahead: retried, and counted.
    #[test]
    fn a_later_record_taken_after_its_keys_failed_one_is_counted_reordered() {
        let health = KinesisHealth::new(Arc::new(Readiness::default()));
        let budget = Arc::new(Semaphore::new(100));
        let (parts, _receivers): (Vec<Pending>, Vec<_>) = ["a", "b", "a", "b"]
            .into_iter()
            .map(|key| pending(key, &budget))
            .unzip();
        let throttled = || {
            PutEntry::Failed(SourceError::Throttled {
                call: Call {
                    operation: "PutRecords",
                    stream: "s".into(),
                    shard: None,
                },
                detail: "ProvisionedThroughputExceededException".into(),
            })
        };
        let accepted = || PutEntry::Accepted {
            shard_id: "shardId-000000000000".into(),
            sequence_number: "1".into(),
        };
        let entries: Vec<Entry> = parts.into_iter().map(Entry::plain).collect();
        let results = vec![throttled(), accepted(), accepted(), throttled()];
        let settled = settle(
            (entries, Ok(results)),
            &health,
            &mut String::new(),
            &mut RateLimitedLog::new(Duration::from_secs(10)),
        );
        let retried: Vec<&str> = settled.retry.iter().map(|p| p.record.0.as_str()).collect();
        assert_eq!(retried, ["a", "b"]);
        // The second "a" went ahead of the first; the second "b" failed too.
        assert_eq!(settled.reordered, 1);
    }

    #[test]
    fn a_record_kinesis_could_never_take_is_not_queued() {
        let budget = Arc::new(Semaphore::new(MIN_QUEUE_BYTES));
        let (tx, _rx) = mpsc::channel(10);
        let producer = Producer { tx, budget };
        let submission = |key: String, size: usize| Submission {
            key,
            data: Bytes::from(vec![b'x'; size]),
            deadline: None,
            protocol: Protocol::Coap,
        };
        let err = producer
            .try_submit(submission("d".repeat(300), 10))
            .unwrap_err();
        assert_eq!(
            err,
            SubmitError::Unputtable(Unputtable::KeyTooLong { chars: 300 })
        );
        let err = producer
            .try_submit(submission("d".into(), 1 << 20))
            .unwrap_err();
        assert!(matches!(
            err,
            SubmitError::Unputtable(Unputtable::TooLarge { .. })
        ));
        // Within the limits but over what is left of the byte budget: full.
        assert!(
            producer
                .try_submit(submission("d".into(), 1_000_000))
                .is_ok()
        );
        assert!(
            producer
                .try_submit(submission("d".into(), 1_000_000))
                .is_ok()
        );
        assert_eq!(
            producer
                .try_submit(submission("d".into(), 1_000_000))
                .unwrap_err(),
            SubmitError::Full
        );
    }
}
