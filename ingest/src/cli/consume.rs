//! `ingest consume`: read a stream's shards into the database, exactly once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tokio_util::sync::CancellationToken;

use ingest::batch::FlushPolicy;
use ingest::config::{ConfigError, parse_duration};
use ingest::consumer::ConsumerConfig;
use ingest::decode::DecodeLimits;
use ingest::source::kinesis::{ReaderOptions, StartPosition};

use super::{ConfigFile, DatabaseArgs};

/// How a worker reads its shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ReadMode {
    /// GetRecords, paced within the shard's read quota.
    Poll,
    /// Enhanced fan-out: SubscribeToShard as a registered consumer.
    Efo,
}

/// Read the shards of a Kinesis stream and load them into the database, exactly
/// once, sharing the shards with every other consumer of the stream.
///
/// Any number of `ingest consume` processes may run on one stream: they split
/// its shards between them through leases in the database, take over a dead
/// worker's shards after --lease-ttl, and rebalance gradually. Each batch of
/// rows commits in one transaction with the checkpoints of its shards, so a
/// crash at any point loses and duplicates nothing. SIGTERM or SIGINT stops
/// polling, commits what is in flight and releases the leases.
/// AWS access and endpoints come from the standard AWS environment
/// (AWS_REGION, AWS_ENDPOINT_URL_KINESIS, credentials chain).
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// The Kinesis stream: a name, or an ARN.
    #[arg(long, env = "INGEST_STREAM")]
    stream: String,
    #[command(flatten)]
    database: DatabaseArgs,
    /// This worker's id in the lease table. [default: host name and pid]
    #[arg(long, env = "INGEST_WORKER_ID")]
    worker_id: Option<String>,
    /// Where to serve /metrics, /healthz and /readyz ("off" for nowhere).
    #[arg(long, env = "INGEST_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    metrics_addr: String,
    /// Where a shard with no checkpoint starts: trim-horizon, latest, or an
    /// RFC 3339 time (AT_TIMESTAMP).
    #[arg(long, env = "INGEST_START", default_value = "trim-horizon")]
    start: String,
    /// Rows that make a batch full.
    #[arg(long, env = "INGEST_BATCH_ROWS", default_value_t = 50_000)]
    batch_rows: usize,
    /// Encoded bytes that make a batch full.
    #[arg(long, env = "INGEST_BATCH_BYTES", default_value_t = 8 * 1024 * 1024)]
    batch_bytes: usize,
    /// Age at which a batch is written however small: the latency bound.
    #[arg(long, env = "INGEST_BATCH_AGE", default_value = "500ms")]
    batch_age: String,
    /// Age at which a batch is written when nothing more is queued for its
    /// writer: the latency at low load. Under load batches still fill.
    #[arg(long, env = "INGEST_BATCH_IDLE_AGE", default_value = "100ms")]
    batch_idle_age: String,
    /// Batch transactions in flight at once, each on its own connection.
    #[arg(long, env = "INGEST_WRITERS", default_value_t = 2)]
    writers: usize,
    /// GetRecords results queued per writer before shards stop polling.
    #[arg(long, env = "INGEST_QUEUE_CHUNKS", default_value_t = 8)]
    queue_chunks: usize,
    /// How shards are read: poll (GetRecords, 5 calls/s per shard shared
    /// by every consumer of the stream) or efo (enhanced fan-out: records
    /// pushed over SubscribeToShard, 2 MB/s per shard of its own; on AWS,
    /// billed per consumer-shard hour).
    #[arg(long, env = "INGEST_READ_MODE", value_enum, default_value_t = ReadMode::Poll)]
    read_mode: ReadMode,
    /// The enhanced fan-out consumer every worker of this fleet registers
    /// and reads as (with --read-mode efo).
    #[arg(long, env = "INGEST_EFO_CONSUMER_NAME", default_value = "ingest")]
    efo_consumer_name: String,
    /// Records asked for per GetRecords call (at most 10000).
    #[arg(long, env = "INGEST_RECORDS_PER_CALL", default_value_t = 10_000)]
    records_per_call: i32,
    /// Series ids each writer keeps in memory; the least recently used are
    /// forgotten first (and read again from the database when next seen).
    #[arg(long, env = "INGEST_SERIES_CACHE_SIZE", default_value_t = ingest::batch::series::DEFAULT_CAPACITY)]
    series_cache_size: usize,
    /// New series one device may create per hour (new field names); its
    /// records naming more become dead letters (series_limit). 0: no limit.
    #[arg(
        long,
        env = "INGEST_MAX_NEW_SERIES_PER_DEVICE",
        default_value_t = 1_000
    )]
    max_new_series_per_device: usize,
    /// Largest record accepted; bigger ones become dead letters.
    #[arg(long, env = "INGEST_MAX_RECORD_BYTES", default_value_t = 256 * 1024)]
    max_record_bytes: usize,
    /// Readings older than this when read become dead letters. [default: the
    /// retention `ingest migrate` set, less 2 hours; 365 days without retention]
    #[arg(long, env = "INGEST_MAX_ROW_AGE", value_name = "DURATION")]
    max_row_age: Option<String>,
    /// Readings further ahead of now than this become dead letters (a device
    /// clock gone wrong would otherwise make a chunk per day it invents).
    #[arg(long, env = "INGEST_MAX_ROW_AHEAD", default_value = "1 day")]
    max_row_ahead: String,
    /// How long a lease lasts unrenewed: a dead worker's shards move after this.
    #[arg(long, env = "INGEST_LEASE_TTL", default_value = "10s")]
    lease_ttl: String,
    /// How often leases are renewed and the balance checked.
    #[arg(long, env = "INGEST_LEASE_INTERVAL", default_value = "2s")]
    lease_interval: String,
    /// How often the shard list is read for new shards.
    #[arg(long, env = "INGEST_SHARD_SYNC_INTERVAL", default_value = "30s")]
    shard_sync_interval: String,
    /// How long a shutdown may take to commit what is in flight.
    #[arg(long, env = "INGEST_SHUTDOWN_GRACE", default_value = "20s")]
    shutdown_grace: String,
    /// Archive every record's raw bytes to this Firehose delivery stream (to
    /// S3, then Glacier). A shard's checkpoint moves only after the archive
    /// and the database both accepted its records. [default: no archive]
    #[arg(long, env = "INGEST_ARCHIVE_DELIVERY_STREAM", value_name = "NAME")]
    archive_delivery_stream: Option<String>,
}

impl ConsumeArgs {
    fn validate(self, file: &ConfigFile) -> Result<ConsumerConfig, ConfigError> {
        let database = self.database.validate(file.database.clone())?;
        let worker_id = self.worker_id.unwrap_or_else(|| {
            let host = hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "worker".into());
            format!("{host}-{}", std::process::id())
        });
        let metrics_addr = match self.metrics_addr.as_str() {
            "off" | "none" => None,
            addr => Some(
                addr.parse::<SocketAddr>()
                    .map_err(|e| ConfigError::new("--metrics-addr", addr, e.to_string()))?,
            ),
        };
        let start = match self.start.as_str() {
            "trim-horizon" | "TRIM_HORIZON" => StartPosition::TrimHorizon,
            "latest" | "LATEST" => StartPosition::Latest,
            time => {
                let micros = ingest::decode::timestamp_from_rfc3339(time).map_err(|e| {
                    ConfigError::new(
                        "--start",
                        time,
                        format!("not trim-horizon, latest or an RFC 3339 time: {e}"),
                    )
                })?;
                StartPosition::AtTimestamp(
                    std::time::UNIX_EPOCH + Duration::from_micros(micros as u64),
                )
            }
        };
        let positive = |name: &str, value: usize| {
            if value == 0 {
                Err(ConfigError::new(name, "0", "must be at least 1"))
            } else {
                Ok(value)
            }
        };
        if !(1..=10_000).contains(&self.records_per_call) {
            return Err(ConfigError::new(
                "--records-per-call",
                &self.records_per_call.to_string(),
                "must be 1 to 10000",
            ));
        }
        let lease_ttl = parse_duration("--lease-ttl", &self.lease_ttl)?;
        let lease_interval = parse_duration("--lease-interval", &self.lease_interval)?;
        if lease_interval * 2 > lease_ttl {
            return Err(ConfigError::new(
                "--lease-interval",
                &self.lease_interval,
                format!(
                    "must be at most half of --lease-ttl ({}), or leases lapse between renewals",
                    self.lease_ttl
                ),
            ));
        }
        Ok(ConsumerConfig {
            stream: self.stream,
            kinesis_endpoint: None,
            worker_id,
            database,
            start,
            flush: FlushPolicy {
                max_rows: positive("--batch-rows", self.batch_rows)?,
                max_bytes: positive("--batch-bytes", self.batch_bytes)?,
                max_age: parse_duration("--batch-age", &self.batch_age)?,
                idle_age: parse_duration("--batch-idle-age", &self.batch_idle_age)?,
            },
            writers: positive("--writers", self.writers)?,
            queue_chunks: positive("--queue-chunks", self.queue_chunks)?,
            reader: ReaderOptions {
                max_records_per_call: self.records_per_call,
                ..ReaderOptions::default()
            },
            fanout_consumer: match self.read_mode {
                ReadMode::Poll => None,
                ReadMode::Efo => Some(self.efo_consumer_name),
            },
            series_cache_size: positive("--series-cache-size", self.series_cache_size)?,
            max_new_series_per_device: Some(self.max_new_series_per_device)
                .filter(|&limit| limit > 0),
            decode: DecodeLimits {
                max_record_bytes: positive("--max-record-bytes", self.max_record_bytes)?,
                ..DecodeLimits::default()
            },
            max_row_age: self
                .max_row_age
                .map(|age| parse_duration("--max-row-age", &age))
                .transpose()?,
            max_row_ahead: parse_duration("--max-row-ahead", &self.max_row_ahead)?,
            lease_ttl,
            lease_interval,
            shard_sync_interval: parse_duration(
                "--shard-sync-interval",
                &self.shard_sync_interval,
            )?,
            maintenance_interval: Duration::from_secs(600),
            shutdown_grace: parse_duration("--shutdown-grace", &self.shutdown_grace)?,
            metrics_addr,
            archive_delivery_stream: self.archive_delivery_stream.filter(|name| !name.is_empty()),
        })
    }
}

pub async fn run(args: ConsumeArgs, file: ConfigFile) -> anyhow::Result<()> {
    let config = args.validate(&file)?;
    let shutdown = CancellationToken::new();
    let readiness = Arc::new(ingest::observe::Readiness::default());
    if let Some(addr) = config.metrics_addr {
        let handle = ingest::observe::install_recorder().map_err(anyhow::Error::msg)?;
        ingest::observe::serve(addr, handle, readiness.clone(), shutdown.clone())
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
    }
    tokio::spawn(stop_on_signal(shutdown.clone()));
    ingest::consumer::run(config, shutdown, readiness).await?;
    tracing::info!("consumer stopped");
    Ok(())
}

/// Cancels `shutdown` on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
pub(super) async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for SIGTERM/SIGINT");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}
