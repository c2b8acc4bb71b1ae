//! The coordinator: heartbeats, leases and balance, the shard list, partition
//! maintenance, and the order of a graceful shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::ConsumerConfig;
use super::chunk::{Chunk, Committed};
use super::shard::{ShardStopped, ShardTask};
use super::writer::{Writer, WriterError, WriterEvent};
use crate::archive::Archive;
use crate::batch::{Batch, NewSeriesLimit, SeriesCache};
use crate::db::{self, Database};
use crate::decode::{DEFAULT_MAX_AGE, Decoder, TimeWindow};
use crate::lease::identity::{self, StreamIdentity};
use crate::lease::{FirstStart, HeldLease, LeaseStore, Move, plan};
use crate::metrics as m;
use crate::observe::Readiness;
use crate::sink::postgres::SinkError;
use crate::source::kinesis::{KinesisSource, ShardInfo, SourceError, StartPosition};

/// Why the consumer stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error(transparent)]
    Connect(#[from] db::ConnectError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Writer(#[from] WriterError),
    #[error(transparent)]
    Archive(#[from] crate::archive::ArchiveError),
    #[error("the database has no ingest schema: run `ingest migrate` first")]
    NotMigrated,
    #[error("stream {0:?} does not exist")]
    NoStream(String),
    #[error(
        "the Kinesis endpoint refused the stream's ARN ({0}); it takes stream names only \
         (kinesalite does this): start with --stream <name>"
    )]
    ArnRefused(String),
    #[error(transparent)]
    Leases(#[from] SinkError),
    #[error(
        "stream {0:?} was deleted and created again while this worker read it: restart \
         the worker to read the new stream (the old stream's leases are kept aside)"
    )]
    Recreated(String),
    #[error("{0}")]
    Schema(#[from] schema::SchemaError),
    #[error(
        "a batch was not committed within the shutdown grace period ({}); its records \
         are read again by the shards' next owner",
        humantime::format_duration(*.0)
    )]
    ShutdownGraceOver(Duration),
}

/// Longest a shutdown waits to release its leases (the database may be
/// gone); unreleased leases expire by themselves after `--lease-ttl`.
const RELEASE_WITHIN: Duration = Duration::from_secs(5);

/// A shard this worker reads.
struct Running {
    lease_counter: i64,
    stop: CancellationToken,
}

struct Coordinator {
    config: ConsumerConfig,
    source: KinesisSource,
    /// The stream the leases are keyed by; checked at every shard sync.
    identity: StreamIdentity,
    /// The enhanced fan-out consumer's ARN; None: shards are polled.
    fanout_consumer: Option<String>,
    /// Set when the stream was found created again: the worker stops.
    recreated: bool,
    store: LeaseStore,
    /// The coordinator's connections (lease statements time out on locks);
    /// `forget_all` forgets the writers' too.
    database: Database,
    storage: schema::Storage,
    /// The shard list as last read, for parents and start positions.
    shards: HashMap<String, ShardInfo>,
    running: HashMap<String, Running>,
    /// Which writer each shard is written by.
    assigned: HashMap<String, usize>,
    writer_inputs: Vec<mpsc::Sender<Chunk>>,
    tasks: JoinSet<ShardStopped>,
    /// Read the shard list at the next round (a shard ended: children may be new).
    sync_due: bool,
    last_sync: Instant,
    last_maintenance: Instant,
    /// Set after each round: ready while the database and the stream answer.
    readiness: Arc<Readiness>,
    archive: Option<Archive>,
    /// Readings outside it become dead letters.
    window: TimeWindow,
}

/// The accepted window: `--max-row-age`, else inside the retention by
/// `LATE_ROW_MARGIN` (so that every accepted row reaches the hourly
/// aggregate before its bucket leaves the refresh window), else a year.
fn accepted_window(config: &ConsumerConfig, retention: Option<Duration>) -> TimeWindow {
    let max_age = config.max_row_age.unwrap_or_else(|| match retention {
        Some(retention) => retention.saturating_sub(schema::LATE_ROW_MARGIN),
        None => DEFAULT_MAX_AGE,
    });
    TimeWindow {
        max_age,
        max_ahead: config.max_row_ahead,
    }
}

/// Runs the consumer until `shutdown` is cancelled, then commits what is in
/// flight, releases the leases and returns.
pub async fn run(
    config: ConsumerConfig,
    shutdown: CancellationToken,
    readiness: Arc<Readiness>,
) -> Result<(), ConsumerError> {
    // Until it has started, a worker holds nothing: a shutdown stops it at
    // once, even while it waits for a database or a stream not there yet.
    let (mut coordinator, mut writers, mut events) = tokio::select! {
        () = shutdown.cancelled() => {
            tracing::info!("stopped before it started: nothing was read");
            return Ok(());
        }
        started = start(config, readiness) => started?,
    };
    let mut ticks = tokio::time::interval(coordinator.config.lease_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let outcome = loop {
        tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            _ = ticks.tick() => {
                // A shutdown does not wait for a round (the database may
                // be gone). Each lease statement is atomic: one cut short
                // happened or not, and the release frees whatever this
                // worker holds.
                tokio::select! {
                    () = coordinator.round() => {}
                    () = shutdown.cancelled() => break Ok(()),
                }
                if coordinator.recreated {
                    break Err(ConsumerError::Recreated(coordinator.config.stream.clone()));
                }
            }
            Some(event) = events.recv() => coordinator.on_writer_event(event),
            Some(stopped) = coordinator.tasks.join_next() => {
                if let Ok(stopped) = stopped {
                    coordinator.on_shard_stopped(stopped);
                }
            }
            Some(finished) = writers.join_next() => {
                // A writer only stops early on an error nobody can retry.
                break match finished {
                    Ok(Err(error)) => Err(ConsumerError::from(error)),
                    _ => Ok(()),
                };
            }
        }
    };
    let stopped = coordinator.shut_down(writers).await;
    outcome.and(stopped)
}

/// The writers and their events, started with the coordinator.
type Started = (
    Coordinator,
    JoinSet<Result<(), WriterError>>,
    mpsc::UnboundedReceiver<WriterEvent>,
);

/// Connects to the stream and the database (waiting while they cannot be
/// reached), registers the stream and starts the writers.
async fn start(
    config: ConsumerConfig,
    readiness: Arc<Readiness>,
) -> Result<Started, ConsumerError> {
    let source = match &config.kinesis_endpoint {
        Some(url) => KinesisSource::from_env_with_endpoint(&config.stream, url).await?,
        None => KinesisSource::from_env(&config.stream).await?,
    };
    let identity = stream_identity(&source).await?;
    let fanout_consumer = match &config.fanout_consumer {
        Some(name) => {
            let arn = source.register_consumer(name).await?;
            tracing::info!(consumer = %arn, "reading through enhanced fan-out");
            Some(arn)
        }
        None => None,
    };
    let archive = match &config.archive_delivery_stream {
        Some(name) => Some(Archive::from_env(name).await?),
        None => None,
    };
    // A connection per writer and one spare; the coordinator's own pool
    // adds a lock timeout, so that no lease statement waits on a batch. A
    // third of a lease: locks held by a dead session are freed, and the
    // leases renewed, before a lease lapses.
    let stuck_after = config.lease_ttl / 3;
    let database = Database::new(
        config
            .database
            .clone()
            .with_stuck_session_limits(stuck_after, None),
        config.writers + 1,
    );
    let lease_database = database.sibling(
        config
            .database
            .clone()
            .with_stuck_session_limits(stuck_after, Some(stuck_after)),
        2,
    );
    // Wait for a database that is not there yet (DNS failing, starting up);
    // fail at once on what a person must fix (credentials, no such database).
    let (storage, window) = {
        let client = database.get_retrying().await?;
        let storage = schema::recorded_storage(&client)
            .await?
            .ok_or(ConsumerError::NotMigrated)?;
        let retention = schema::retention(&client).await?;
        (storage, accepted_window(&config, retention))
    };
    tracing::info!(
        max_age = %humantime::format_duration(window.max_age),
        max_ahead = %humantime::format_duration(window.max_ahead),
        "readings outside this window around now become dead letters"
    );
    let lease_key = {
        let mut client = database.get_retrying().await?;
        let registered = identity::register(&mut client, &identity, &config.stream).await?;
        for old_key in &registered.adopted {
            tracing::info!(old_key, lease_key = %registered.lease_key, "adopted the leases of an older version, keyed by the stream's name or ARN");
        }
        for old_key in &registered.kept_aside {
            tracing::warn!(old_key, lease_key = %registered.lease_key, "leases older than the stream (an earlier stream of the same name) are kept aside, not read");
        }
        registered.lease_key
    };
    let store = LeaseStore {
        stream: lease_key.clone(),
        worker: config.worker_id.clone(),
        ttl: config.lease_ttl,
        first_start: match &config.start {
            StartPosition::Latest => FirstStart::Latest,
            StartPosition::AtTimestamp(at) => FirstStart::At(*at),
            StartPosition::TrimHorizon
            | StartPosition::AfterSequence(_)
            | StartPosition::AtSequence(_) => FirstStart::TrimHorizon,
        },
    };

    let (events_tx, events) = mpsc::unbounded_channel();
    let mut writers = JoinSet::new();
    let mut writer_inputs = Vec::new();
    for index in 0..config.writers {
        let (input, chunks) = mpsc::channel(config.queue_chunks);
        writer_inputs.push(input);
        let writer = Writer {
            index,
            stream: lease_key.clone(),
            worker: config.worker_id.clone(),
            database: database.clone(),
            policy: config.flush,
            chunks,
            events: events_tx.clone(),

            batch: Batch::new(),
            pending: Vec::new(),
            cache: SeriesCache::with_capacity(config.series_cache_size),
            new_series_limit: config.max_new_series_per_device.map(NewSeriesLimit::new),
            cache_generation: database.generation(),
            lost: Default::default(),
        };
        writers.spawn(writer.run());
    }
    drop(events_tx);

    let now = Instant::now();
    let coordinator = Coordinator {
        config,
        source,
        identity,
        fanout_consumer,
        recreated: false,
        store,
        database: lease_database,
        storage,
        shards: HashMap::new(),
        running: HashMap::new(),
        assigned: HashMap::new(),
        writer_inputs,
        tasks: JoinSet::new(),
        sync_due: true,
        last_sync: now,
        last_maintenance: now,
        readiness,
        archive,
        window,
    };
    tracing::info!(stream = %coordinator.config.stream, lease_key = %coordinator.store.stream, worker = %coordinator.config.worker_id, "consumer started");
    Ok((coordinator, writers, events))
}

/// The stream's ARN and creation time, from DescribeStreamSummary.
async fn stream_identity(source: &KinesisSource) -> Result<StreamIdentity, ConsumerError> {
    let described = match source.describe_stream().await {
        Ok(described) => described,
        // kinesalite answers a StreamARN with "StreamName should be provided".
        Err(error @ SourceError::InvalidArgument { .. }) if source.stream().starts_with("arn:") => {
            return Err(ConsumerError::ArnRefused(error.to_string()));
        }
        Err(error) => return Err(error.into()),
    };
    let described = described.ok_or_else(|| ConsumerError::NoStream(source.stream().into()))?;
    Ok(StreamIdentity {
        name: described.name,
        arn: described.arn,
        created_at: described.created_at,
    })
}

impl Coordinator {
    /// One round: heartbeat, renew, balance, and now and then the shard list
    /// and partition maintenance. Errors are logged and the next round tries again.
    async fn round(&mut self) {
        let result = self.try_round().await;
        self.readiness.set(result.is_ok());
        if let Err(RoundError::Recreated) = result {
            self.recreated = true;
            return;
        }
        if let Err(error) = result {
            tracing::warn!(%error, "lease round failed; trying again next round");
            metrics::counter!(m::RETRIES, "cause" => "lease_round").increment(1);
            if matches!(&error, RoundError::Sink(e) if e.is_not_primary()) {
                self.database.forget_all();
            }
        }
        metrics::gauge!(m::LEASES_HELD).set(self.running.len() as f64);
    }

    async fn try_round(&mut self) -> Result<(), RoundError> {
        let connection = self.database.get().await?;
        let client: &tokio_postgres::Client = &connection;
        // Renewal first: nothing else in the round may cost the leases.
        self.store.heartbeat(client).await?;
        let held: Vec<HeldLease> = self
            .running
            .iter()
            .map(|(shard_id, r)| HeldLease {
                shard_id: shard_id.clone(),
                counter: r.lease_counter,
                checkpoint: None,
                start_at: None,
                checkpoint_sub: None,
            })
            .collect();
        let still_held = self.store.renew(client, &held).await?;
        for lease in held.iter().filter(|l| !still_held.contains(&l.shard_id)) {
            tracing::info!(shard = %lease.shard_id, "lease no longer ours (taken over or shard ended)");
            self.stop_shard(&lease.shard_id, lease.counter);
        }

        if self.sync_due || self.last_sync.elapsed() >= self.config.shard_sync_interval {
            // A throttled DescribeStreamSummary or ListShards retries with
            // backoff; given no more than one lease interval together they
            // cannot hold up the next renewal.
            let (now, shards) = tokio::time::timeout(self.config.lease_interval, async {
                Ok::<_, RoundError>((
                    self.source.describe_stream().await?,
                    self.source.list_shards().await?,
                ))
            })
            .await
            .map_err(|_| RoundError::ShardListLate)??;
            // The same name may now be another stream: its shards are not ours.
            if let Some(now) = now
                && (now.arn != self.identity.arn || now.created_at != self.identity.created_at)
            {
                return Err(RoundError::Recreated);
            }
            let rows: Vec<(String, Vec<String>)> = shards
                .iter()
                .map(|s| (s.shard_id.clone(), s.parent_shard_ids.clone()))
                .collect();
            let added = self.store.sync_shards(client, &rows).await?;
            if added > 0 {
                tracing::info!(added, "new shards in the lease table");
            }
            let listed: Vec<&str> = shards.iter().map(|s| s.shard_id.as_str()).collect();
            for expired in self.store.end_expired(client, &listed).await? {
                tracing::warn!(
                    shard = %expired.shard_id,
                    checkpoint = ?expired.checkpoint,
                    "Kinesis no longer lists this shard (older than the retention period): \
                     treated as ended, its children are read; its records after the checkpoint are lost"
                );
                metrics::counter!(m::SHARDS_EXPIRED).increment(1);
            }
            self.shards = shards
                .into_iter()
                .map(|s| (s.shard_id.clone(), s))
                .collect();
            self.sync_due = false;
            self.last_sync = Instant::now();
        }

        let fleet = self.store.fleet(client).await?;
        match plan(&self.config.worker_id, self.running.len(), &fleet) {
            Move::Acquire(count) => {
                for lease in self.store.acquire(client, count).await? {
                    self.start_shard(lease);
                }
            }
            Move::Steal(victim) => {
                if let Some(lease) = self.store.steal(client, &victim).await? {
                    tracing::info!(shard = %lease.shard_id, from = %victim, "took a lease to balance the fleet");
                    metrics::counter!(m::LEASE_STEALS).increment(1);
                    self.start_shard(lease);
                }
            }
            Move::Stay => {}
        }

        if self.last_maintenance.elapsed() >= self.config.maintenance_interval {
            schema::maintain(client, self.storage).await?;
            self.last_maintenance = Instant::now();
        }
        Ok(())
    }

    fn start_shard(&mut self, lease: HeldLease) {
        let has_parents = self
            .shards
            .get(&lease.shard_id)
            .is_none_or(|s| !s.parent_shard_ids.is_empty());
        let committed = match (&lease.checkpoint, lease.checkpoint_sub) {
            (Some(sequence), Some(sub_sequence)) => Some(Committed {
                sequence_number: sequence.clone(),
                sub_sequence,
            }),
            _ => None,
        };
        let start = match &lease.checkpoint {
            // Inside a KPL aggregate: read it again, skipping what is committed.
            Some(sequence) if committed.is_some() => StartPosition::AtSequence(sequence.clone()),
            Some(sequence) => StartPosition::AfterSequence(sequence.clone()),
            // A child's first records were written before anyone read it. A
            // shard missing from this worker's (older) list is a new child too.
            None if has_parents => StartPosition::TrimHorizon,
            // Fixed when the lease was first taken: every owner starts there.
            None => match lease.start_at {
                Some(at) => StartPosition::AtTimestamp(at),
                None => self.config.start.clone(),
            },
        };
        let writer = match self.assigned.get(&lease.shard_id) {
            Some(writer) => *writer,
            None => {
                // The writer with the fewest shards being read.
                let mut load = vec![0usize; self.writer_inputs.len()];
                for (shard, index) in &self.assigned {
                    if self.running.contains_key(shard) {
                        load[*index] += 1;
                    }
                }
                let writer = (0..load.len()).min_by_key(|i| load[*i]).unwrap_or(0);
                self.assigned.insert(lease.shard_id.clone(), writer);
                writer
            }
        };
        tracing::info!(shard = %lease.shard_id, lease_counter = lease.counter, ?start, ?committed, writer, "reading shard");
        let stop = CancellationToken::new();
        let task = ShardTask {
            shard_id: lease.shard_id.clone(),
            lease_counter: lease.counter,
            source: self.source.clone(),
            fanout_consumer: self.fanout_consumer.clone(),
            start,
            committed,
            options: self.config.reader.clone(),
            archive: self.archive.clone(),
            decoder: Decoder::new(self.config.decode),
            window: self.window,
            chunks: self.writer_inputs[writer].clone(),
            stop: stop.clone(),
        };
        self.tasks.spawn(task.run());
        self.running.insert(
            lease.shard_id,
            Running {
                lease_counter: lease.counter,
                stop,
            },
        );
    }

    /// Stops reading `shard_id` if it is still read under `lease_counter`.
    fn stop_shard(&mut self, shard_id: &str, lease_counter: i64) {
        if self
            .running
            .get(shard_id)
            .is_some_and(|r| r.lease_counter == lease_counter)
            && let Some(running) = self.running.remove(shard_id)
        {
            running.stop.cancel();
        }
    }

    fn on_writer_event(&mut self, event: WriterEvent) {
        match event {
            WriterEvent::LeaseLost {
                shard_id,
                lease_counter,
            } => self.stop_shard(&shard_id, lease_counter),
            WriterEvent::ShardEnded { shard_id } => {
                if let Some(running) = self.running.remove(&shard_id) {
                    running.stop.cancel();
                }
                // Its children may now be readable, and may be new to the table.
                self.sync_due = true;
            }
        }
    }

    fn on_shard_stopped(&mut self, stopped: ShardStopped) {
        if stopped.error.is_some() {
            // Stop holding a shard we cannot read; after the lease time it is
            // free for any worker (this one included) to try again.
            self.stop_shard(&stopped.shard_id, stopped.lease_counter);
        }
    }

    /// Stop polling, let the writers commit what they hold, release the
    /// leases. A batch not committed within the grace period is given up
    /// (its records are read again by the shards' next owner) and the
    /// worker stops with an error.
    async fn shut_down(
        mut self,
        mut writers: JoinSet<Result<(), WriterError>>,
    ) -> Result<(), ConsumerError> {
        tracing::info!("shutting down: committing what is in flight");
        for running in self.running.values() {
            running.stop.cancel();
        }
        let grace = tokio::time::Instant::now() + self.config.shutdown_grace;
        while tokio::time::timeout_at(grace, self.tasks.join_next())
            .await
            .ok()
            .flatten()
            .is_some()
        {}
        // The writers end once every sender of their channels is gone.
        self.writer_inputs.clear();
        let mut outcome = Ok(());
        loop {
            match tokio::time::timeout_at(grace, writers.join_next()).await {
                Ok(Some(Ok(Err(error)))) => {
                    tracing::error!(%error, "a writer failed while shutting down")
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        "shutdown grace period over; uncommitted records will be read again by the next owner"
                    );
                    writers.abort_all();
                    outcome = Err(ConsumerError::ShutdownGraceOver(self.config.shutdown_grace));
                    break;
                }
            }
        }
        let release = async {
            let client = self.database.get().await.map_err(|e| e.to_string())?;
            self.store
                .release_all(&client)
                .await
                .map_err(|e| e.to_string())
        };
        let released = tokio::time::timeout(RELEASE_WITHIN, release)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {RELEASE_WITHIN:?}")));
        match released {
            Ok(released) => tracing::info!(released, "leases released"),
            Err(error) => {
                tracing::warn!(%error, "could not release the leases; they expire by themselves")
            }
        }
        outcome
    }
}

#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Schema(#[from] schema::SchemaError),
    #[error(transparent)]
    Connect(#[from] db::ConnectError),
    #[error("the stream was deleted and created again")]
    Recreated,
    #[error("the shard list took longer than a lease interval; reading it again next round")]
    ShardListLate,
}
