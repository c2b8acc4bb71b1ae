//! A writer: takes chunks of the shards assigned to it, batches them and
//! commits each batch in one transaction, retrying what may succeed later.

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::chunk::Chunk;
use crate::backoff::Backoff;
use crate::batch::{
    Batch, FlushPolicy, NewSeriesLimit, SealedSegment, SeriesCache, SeriesKey, missing_series,
};
use crate::db::{self, Database};
use crate::metrics as m;
use crate::sink::postgres::{
    DATABASE_REFUSED, Outcome, Refused, SinkError, lookup_series, resolve_series, write_batch,
    write_batch_bisecting,
};

/// What a writer tells the coordinator.
#[derive(Debug)]
pub enum WriterEvent {
    /// A commit found this lease taken over: stop reading the shard.
    LeaseLost {
        shard_id: String,
        lease_counter: i64,
    },
    /// A commit marked the shard ended (and freed its lease).
    ShardEnded { shard_id: String },
}

/// Why a writer stopped for good: only errors a person must fix.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error(transparent)]
    Connect(#[from] db::ConnectError),
    #[error("writer {index}: {error}")]
    Sink { index: usize, error: SinkError },
}

pub struct Writer {
    /// Position among the writers, for logs.
    pub index: usize,
    pub stream: String,
    pub worker: String,
    /// The pool this writer takes a connection from for each operation.
    pub database: Database,
    pub policy: FlushPolicy,
    pub chunks: mpsc::Receiver<Chunk>,
    pub events: mpsc::UnboundedSender<WriterEvent>,

    pub batch: Batch,
    /// The chunks the batch was encoded from, kept until it commits: after a
    /// failover the batch is encoded again with ids from the new primary.
    pub pending: Vec<Chunk>,
    pub cache: SeriesCache,
    /// The pool's generation the cache's ids (and the batch's) were read in.
    pub cache_generation: u64,
    /// New series a device may create per hour; None: no limit.
    pub new_series_limit: Option<NewSeriesLimit>,
    /// Leases found lost: chunks read under them are dropped.
    pub lost: HashSet<(String, i64)>,
}

/// Whether a chunk is encoded for the first time (its dead letters are
/// counted, and the batch may end inside it) or again after a failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    New,
    Again,
}

/// Longest a batch transaction may take before its connection is given up
/// for lost (a primary that vanished without closing its sockets).
const BATCH_TIMEOUT: Duration = Duration::from_secs(60);
/// The same for a batch written record by record, which takes a few round
/// trips per refused record and level of halving.
const BISECT_TIMEOUT: Duration = Duration::from_secs(600);

impl Writer {
    /// Runs until every sender of its channel is gone, then commits what is left.
    ///
    /// A batch is written when full or at its age limit; and when nothing
    /// more is queued once it is `idle_age` old: chunks waiting are always
    /// taken first (`biased`), so the timer only fires on an idle writer.
    /// At low load a row waits about `idle_age` (a transaction per
    /// GetRecords result at most); under load a batch fills while the last
    /// one commits.
    pub async fn run(mut self) -> Result<(), WriterError> {
        loop {
            let deadline = self.batch.idle_deadline(&self.policy);
            // Evaluated even when disabled, so it must not be None.
            let wake = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                chunk = self.chunks.recv() => match chunk {
                    Some(chunk) => {
                        self.add(chunk).await?;
                        if self.batch.is_due(&self.policy, Instant::now()) {
                            self.flush().await?;
                        }
                    }
                    None => {
                        self.flush().await?;
                        return Ok(());
                    }
                },
                () = tokio::time::sleep_until(wake.into()), if deadline.is_some() => self.flush().await?,
            }
        }
    }

    /// Puts a chunk into the batch, creating its new series first.
    async fn add(&mut self, mut chunk: Chunk) -> Result<(), WriterError> {
        self.forget_stale_series().await?;
        if self
            .lost
            .contains(&(chunk.shard_id.clone(), chunk.lease_counter))
        {
            return Ok(());
        }
        // Two leases of one shard must never share a batch: the fenced
        // update names shards, so it could not tell which lease failed and
        // the batch would be retried forever. Counters only grow, so the
        // older lease is the lost one: drop its rows (its reader was stopped
        // when the newer lease was taken).
        let other = self
            .batch
            .segments()
            .iter()
            .find(|s| s.shard_id == chunk.shard_id && s.lease_counter != chunk.lease_counter)
            .map(|s| s.lease_counter);
        if let Some(other) = other {
            let older = other.min(chunk.lease_counter);
            self.lost.insert((chunk.shard_id.clone(), older));
            if older == chunk.lease_counter {
                return Ok(());
            }
            self.batch.drop_lease(&chunk.shard_id, older);
            self.pending
                .retain(|c| c.shard_id != chunk.shard_id || c.lease_counter != older);
        }
        let lease = (chunk.shard_id.clone(), chunk.lease_counter);
        // A batch may end inside a chunk, and so inside a KPL aggregate (the
        // checkpoint then holds the sub-sequence): its limits hold however
        // many user records one Kinesis record carries. The part encoded
        // joins the batch's pending chunks and is committed; the rest goes on.
        while let Some(split) = self.encode(&chunk, Encoding::New).await? {
            let rest = chunk.items.split_off(split);
            let head = Chunk {
                shard_id: chunk.shard_id.clone(),
                lease_counter: chunk.lease_counter,
                items: std::mem::replace(&mut chunk.items, rest),
                end_of_shard: false,
                millis_behind_latest: None,
            };
            self.pending.push(head);
            self.flush().await?;
            if self.lost.contains(&lease) {
                return Ok(());
            }
        }
        self.pending.push(chunk);
        Ok(())
    }

    /// Encodes a chunk into the batch, resolving its series first. A new
    /// chunk stops where the batch becomes due before its last item: the
    /// index of the first item not encoded. A chunk encoded again (after the
    /// series ids were forgotten) is encoded whole, as it was before.
    async fn encode(
        &mut self,
        chunk: &Chunk,
        encoding: Encoding,
    ) -> Result<Option<usize>, WriterError> {
        let refused = self.resolve_series_of(chunk).await?;
        let mut split = None;
        for (index, (item, refused)) in chunk.items.iter().zip(&refused).enumerate() {
            let segment = self
                .batch
                .segment(&chunk.shard_id, chunk.lease_counter, Instant::now());
            match (&item.decoded, refused) {
                (Ok(_), Some(reason)) => {
                    if encoding == Encoding::New {
                        metrics::counter!(m::DEAD_LETTERS, "reason" => SERIES_LIMIT).increment(1);
                        tracing::debug!(shard = %chunk.shard_id, sequence = %item.sequence_number, sub_sequence = ?item.sub_sequence, %reason, "dead letter");
                    }
                    segment.add_refused(
                        &self.stream,
                        &item.sequence_number,
                        item.sub_sequence,
                        SERIES_LIMIT,
                        reason,
                        &item.raw,
                    );
                }
                (Ok(reading), None) => segment
                    .add_reading(reading, &mut self.cache)
                    .expect("every series of the chunk was just resolved"),
                (Err(error), _) => {
                    if encoding == Encoding::New {
                        metrics::counter!(m::DEAD_LETTERS, "reason" => error.kind()).increment(1);
                        tracing::debug!(shard = %chunk.shard_id, sequence = %item.sequence_number, sub_sequence = ?item.sub_sequence, %error, "dead letter");
                    }
                    segment.add_dead_letter(
                        &self.stream,
                        &item.sequence_number,
                        item.sub_sequence,
                        error,
                        &item.raw,
                    );
                }
            }
            segment.advance(
                &item.sequence_number,
                item.sub_sequence,
                item.ends_record,
                &item.raw,
            );
            if encoding == Encoding::New
                && index + 1 < chunk.items.len()
                && self.batch.is_due(&self.policy, Instant::now())
            {
                split = Some(index + 1);
                break;
            }
        }
        if split.is_none() {
            let segment = self
                .batch
                .segment(&chunk.shard_id, chunk.lease_counter, Instant::now());
            segment.ended |= chunk.end_of_shard;
            if chunk.millis_behind_latest.is_some() {
                segment.millis_behind_latest = chunk.millis_behind_latest;
            }
        }
        // Only now: the chunk's series had to stay in the cache until encoded.
        self.cache.trim();
        let stats = self.cache.take_stats();
        metrics::counter!(m::SERIES_CACHE_LOOKUPS, "result" => "hit").increment(stats.hits);
        metrics::counter!(m::SERIES_CACHE_LOOKUPS, "result" => "miss").increment(stats.misses);
        metrics::counter!(m::SERIES_CACHE_EVICTIONS).increment(stats.evictions);
        metrics::gauge!(m::SERIES_CACHE_SERIES, "writer" => self.index.to_string())
            .set(self.cache.len() as f64);
        Ok(split)
    }

    /// Forgets every series id once the pool forgot its connections (the
    /// primary moved: the new one may lack the newest series, or have given
    /// their ids to others), and encodes the batch again from its chunks.
    /// Returns whether it did.
    async fn forget_stale_series(&mut self) -> Result<bool, WriterError> {
        let generation = self.database.generation();
        if generation == self.cache_generation {
            return Ok(false);
        }
        tracing::info!(
            writer = self.index,
            series = self.cache.len(),
            "the database connections were renewed: forgetting the series ids"
        );
        self.cache.clear();
        self.cache_generation = generation;
        self.batch = Batch::new();
        for chunk in std::mem::take(&mut self.pending) {
            self.encode(&chunk, Encoding::Again).await?;
            self.pending.push(chunk);
        }
        Ok(true)
    }

    /// Puts the id of every series the chunk's readings name into the
    /// cache, reading known ones and creating new ones, except for records
    /// whose device is over its new-series limit: for each item, the reason
    /// it is refused, if it is.
    async fn resolve_series_of(
        &mut self,
        chunk: &Chunk,
    ) -> Result<Vec<Option<String>>, WriterError> {
        let mut refused = vec![None; chunk.items.len()];
        let readings = chunk
            .items
            .iter()
            .filter_map(|item| item.decoded.as_ref().ok());
        let missing = missing_series(readings, &mut self.cache);
        if missing.is_empty() {
            return Ok(refused);
        }
        let create: Vec<SeriesKey> = if self.new_series_limit.is_none() {
            missing
        } else {
            // Series the table has are not new: read them first.
            let mut backoff = Backoff::default();
            loop {
                let connection = self.database.get_retrying().await?;
                match lookup_series(&connection, &missing, &mut self.cache).await {
                    Ok(()) => break,
                    Err(error) => self.retry_or_fail(error, &mut backoff).await?,
                }
            }
            let hour = hours_since_epoch();
            let limit = self.new_series_limit.as_mut().expect("checked above");
            let absent: BTreeSet<&SeriesKey> = missing
                .iter()
                .filter(|k| self.cache.get(&k.house, &k.device, &k.metric).is_none())
                .collect();
            let devices: HashSet<(&str, &str)> = absent
                .iter()
                .map(|k| (k.house.as_str(), k.device.as_str()))
                .collect();
            let mut create: BTreeSet<SeriesKey> = BTreeSet::new();
            for (item, refused) in chunk.items.iter().zip(&mut refused) {
                let Ok(reading) = &item.decoded else { continue };
                if !devices.contains(&(reading.house.as_str(), reading.device.as_str())) {
                    continue;
                }
                let mut new: Vec<SeriesKey> = reading
                    .samples
                    .iter()
                    .map(|sample| SeriesKey {
                        house: reading.house.clone(),
                        device: reading.device.clone(),
                        metric: sample.metric.clone(),
                    })
                    .filter(|key| absent.contains(key) && !create.contains(key))
                    .collect();
                new.sort();
                new.dedup();
                if new.is_empty() {
                    continue;
                }
                if limit.try_take(&reading.house, &reading.device, new.len(), hour) {
                    create.extend(new);
                } else {
                    *refused = Some(format!(
                        "device {:?} (house {:?}) may create {} new series an hour \
                             (--max-new-series-per-device) and this record names {} more, e.g. {:?}",
                        reading.device,
                        reading.house,
                        limit.per_hour(),
                        new.len(),
                        new[0].metric.chars().take(64).collect::<String>(),
                    ));
                }
            }
            create.into_iter().collect()
        };
        if !create.is_empty() {
            let mut backoff = Backoff::default();
            loop {
                let connection = self.database.get_retrying().await?;
                match resolve_series(&connection, &create, &mut self.cache).await {
                    Ok(()) => break,
                    Err(error) => self.retry_or_fail(error, &mut backoff).await?,
                }
            }
            metrics::counter!(m::SERIES_CREATED).increment(create.len() as u64);
        }
        Ok(refused)
    }

    /// Commits the batch; on lost leases drops those shards and commits the
    /// rest; on errors that may pass, retries the same bytes until they do,
    /// or bytes encoded again when the series ids went stale meanwhile; when
    /// the database refuses some rows, writes the batch again record by
    /// record, the refused records as dead letters.
    async fn flush(&mut self) -> Result<(), WriterError> {
        let mut segments: Vec<SealedSegment> =
            self.batch.take().into_iter().map(|s| s.seal()).collect();
        let mut backoff = Backoff::default();
        // Once refused, the batch is bisected on every retry: the same rows
        // would be refused again.
        let mut bisecting = false;
        while !segments.is_empty() {
            if self.forget_stale_series().await? {
                segments = self.batch.take().into_iter().map(|s| s.seal()).collect();
                continue;
            }
            let started = Instant::now();
            let mut connection = self.database.get_retrying().await?;
            let write = async {
                if bisecting {
                    write_batch_bisecting(&mut connection, &self.stream, &self.worker, &segments)
                        .await
                } else {
                    write_batch(&mut connection, &self.stream, &self.worker, &segments)
                        .await
                        .map(|outcome| (outcome, Vec::new()))
                }
            };
            let timeout = if bisecting {
                BISECT_TIMEOUT
            } else {
                BATCH_TIMEOUT
            };
            let written =
                tokio::time::timeout(timeout, write)
                    .await
                    .unwrap_or(Err(SinkError::TimedOut {
                        during: "writing the batch",
                    }));
            drop(connection);
            match written {
                Ok((outcome @ (Outcome::Committed | Outcome::AlreadyCommitted), refused)) => {
                    if outcome == Outcome::AlreadyCommitted {
                        tracing::info!(
                            writer = self.index,
                            "the batch had committed before its connection was lost; reading on"
                        );
                    }
                    record_commit(&segments, &refused, started.elapsed());
                    for segment in segments.iter().filter(|s| s.ended) {
                        let _ = self.events.send(WriterEvent::ShardEnded {
                            shard_id: segment.shard_id.clone(),
                        });
                    }
                    self.pending.clear();
                    return Ok(());
                }
                Ok((Outcome::LeasesLost(lost), _)) => {
                    for shard_id in lost {
                        let counters: Vec<i64> = segments
                            .iter()
                            .filter(|s| s.shard_id == shard_id)
                            .map(|s| s.lease_counter)
                            .collect();
                        segments.retain(|s| s.shard_id != shard_id);
                        self.pending.retain(|c| c.shard_id != shard_id);
                        for lease_counter in counters {
                            tracing::info!(shard = %shard_id, lease_counter, "lease lost to another worker; dropping its rows");
                            metrics::counter!(m::LEASES_LOST).increment(1);
                            self.lost.insert((shard_id.clone(), lease_counter));
                            let _ = self.events.send(WriterEvent::LeaseLost {
                                shard_id: shard_id.clone(),
                                lease_counter,
                            });
                        }
                    }
                }
                Err(error) if error.is_unknown_series() => {
                    // Ids from a server that stopped being the primary, in a
                    // batch encoded before the pool noticed: encode it again.
                    self.cache_generation = u64::MAX;
                    let delay = backoff.next_delay();
                    tracing::warn!(writer = self.index, %error, retry_in = ?delay, "series ids unknown to the database; resolving them again");
                    metrics::counter!(m::RETRIES, "cause" => error.cause()).increment(1);
                    tokio::time::sleep(delay).await;
                }
                Err(error) if error.is_data_error() && !bisecting => {
                    tracing::warn!(writer = self.index, %error, "the database refused rows of the batch; writing it record by record");
                    metrics::counter!(m::BATCHES_BISECTED).increment(1);
                    bisecting = true;
                }
                Err(error) => self.retry_or_fail(error, &mut backoff).await?,
            }
        }
        // Every lease of the batch was lost.
        self.pending.clear();
        Ok(())
    }

    /// Waits before a retry, dropping the connection when it is gone or the
    /// server is no longer the primary; errors nobody can retry end the writer.
    async fn retry_or_fail(
        &mut self,
        error: SinkError,
        backoff: &mut Backoff,
    ) -> Result<(), WriterError> {
        if !error.is_retriable() {
            return Err(WriterError::Sink {
                index: self.index,
                error,
            });
        }
        if error.is_not_primary() {
            // Every connection may point at the old primary: resolve anew.
            self.database.forget_all();
        }
        let delay = backoff.next_delay();
        tracing::warn!(writer = self.index, %error, retry_in = ?delay, "batch not written; retrying");
        metrics::counter!(m::RETRIES, "cause" => error.cause()).increment(1);
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

/// `reason_kind` of a record whose device is over its new-series limit.
pub const SERIES_LIMIT: &str = "series_limit";

/// The clock hour the new-series limit counts in.
fn hours_since_epoch() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() / 3600)
}

fn record_commit(segments: &[SealedSegment], refused: &[Refused], took: Duration) {
    let (mut samples, mut events, mut dead, mut bytes) = (0, 0, 0, 0);
    for segment in segments {
        samples += segment.rows.0;
        events += segment.rows.1;
        dead += segment.rows.2;
        bytes += segment.samples.len() + segment.events.len() + segment.dead_letters.len();
    }
    // A refused record's rows were not written; its dead letter was.
    for record in refused {
        samples -= record.rows.0;
        events -= record.rows.1;
        dead = dead - record.rows.2 + 1;
        tracing::warn!(shard = %record.shard_id, sequence = %record.sequence_number, reason = %record.reason, "dead letter: refused by the database");
    }
    if !refused.is_empty() {
        metrics::counter!(m::DEAD_LETTERS, "reason" => DATABASE_REFUSED)
            .increment(refused.len() as u64);
    }
    metrics::counter!(m::ROWS_WRITTEN, "table" => "samples").increment(samples as u64);
    metrics::counter!(m::ROWS_WRITTEN, "table" => "events").increment(events as u64);
    metrics::counter!(m::ROWS_WRITTEN, "table" => "dead_letters").increment(dead as u64);
    metrics::counter!(m::COPY_BYTES_WRITTEN).increment(bytes as u64);
    metrics::counter!(m::BATCHES).increment(1);
    metrics::histogram!(m::BATCH_ROWS).record((samples + events + dead) as f64);
    metrics::histogram!(m::BATCH_COMMIT_SECONDS).record(took.as_secs_f64());
}
