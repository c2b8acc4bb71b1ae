//! The consumer's typed configuration.

use std::net::SocketAddr;
use std::time::Duration;

use crate::batch::FlushPolicy;
use crate::config::DatabaseConfig;
use crate::decode::DecodeLimits;
use crate::source::kinesis::{ReaderOptions, StartPosition};

/// Everything `ingest consume` needs, validated.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The Kinesis stream: a name, or an ARN on real AWS.
    pub stream: String,
    /// Where Kinesis calls go; None: where the AWS environment says
    /// (`AWS_ENDPOINT_URL_KINESIS`, else AWS itself).
    pub kinesis_endpoint: Option<String>,
    /// This worker's id in the lease table (default: host name and pid).
    pub worker_id: String,
    pub database: DatabaseConfig,
    /// Where a shard with no checkpoint starts (children of a split or merge
    /// always start at TRIM_HORIZON, or their first records would be skipped).
    pub start: StartPosition,
    pub flush: FlushPolicy,
    /// Concurrent batch transactions, each with its own connection; shards are spread over them.
    pub writers: usize,
    /// Chunks (GetRecords results) queued per writer before shard tasks stop polling.
    pub queue_chunks: usize,
    pub reader: ReaderOptions,
    /// Read through enhanced fan-out as this registered consumer (every
    /// worker registers the same name); None: poll with GetRecords.
    pub fanout_consumer: Option<String>,
    /// Series ids each writer remembers (least recently used forgotten first).
    pub series_cache_size: usize,
    /// New series one device may create per hour; records beyond it become
    /// dead letters. None: no limit.
    pub max_new_series_per_device: Option<usize>,
    pub decode: DecodeLimits,
    /// The oldest reading accepted, as an age; None: the retention in force
    /// less `schema::LATE_ROW_MARGIN`, or a year without retention.
    pub max_row_age: Option<Duration>,
    /// How far ahead of now a reading may be.
    pub max_row_ahead: Duration,
    /// How long a lease lasts without renewal: a dead worker's shards move after this.
    pub lease_ttl: Duration,
    /// How often leases are renewed and the balance checked.
    pub lease_interval: Duration,
    /// How often the shard list is read (new shards after a split or merge).
    pub shard_sync_interval: Duration,
    /// How often partition maintenance runs (plain PostgreSQL storage).
    pub maintenance_interval: Duration,
    /// How long a shutdown may take to commit what is in flight.
    pub shutdown_grace: Duration,
    /// Where /metrics, /healthz and /readyz are served; None: not served.
    pub metrics_addr: Option<SocketAddr>,
    /// The Firehose delivery stream raw records are archived to; None: no archive.
    pub archive_delivery_stream: Option<String>,
}
