//! What `ingest status` shows: the lease table and the workers, as the
//! database sees them now. Reads only; needs no AWS access.

use tokio_postgres::Client;

use crate::sink::postgres::SinkError;

/// One shard's lease.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardStatus {
    pub shard_id: String,
    pub parent_shard_ids: Vec<String>,
    /// The worker holding an unexpired lease; None when free or expired.
    pub owner: Option<String>,
    pub lease_counter: i64,
    pub checkpoint: Option<String>,
    pub ended: bool,
    /// Kinesis MillisBehindLatest of the last committed read.
    pub millis_behind_latest: Option<i64>,
    /// Seconds since the checkpoint last moved.
    pub seconds_since_commit: f64,
}

/// One worker's heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerStatus {
    pub worker_id: String,
    pub seconds_since_heartbeat: f64,
    pub seconds_since_start: f64,
    /// Unexpired leases it holds.
    pub leases: i64,
}

/// The shards of `stream`, ordered by id.
pub async fn shards(client: &Client, stream: &str) -> Result<Vec<ShardStatus>, SinkError> {
    let rows = client
        .query(
            "SELECT shard_id, parent_shard_ids,
                    CASE WHEN expires_at >= now() THEN owner END,
                    lease_counter, checkpoint, ended, millis_behind_latest,
                    extract(epoch FROM now() - updated_at)::float8
             FROM ingest.shard_leases WHERE stream = $1 ORDER BY shard_id",
            &[&stream],
        )
        .await
        .map_err(SinkError::during("reading the lease table"))?;
    Ok(rows
        .iter()
        .map(|row| ShardStatus {
            shard_id: row.get(0),
            parent_shard_ids: row.get(1),
            owner: row.get(2),
            lease_counter: row.get(3),
            checkpoint: row.get(4),
            ended: row.get(5),
            millis_behind_latest: row.get(6),
            seconds_since_commit: row.get(7),
        })
        .collect())
}

/// The workers of `stream` that sent a heartbeat in the last hour, newest first.
pub async fn workers(client: &Client, stream: &str) -> Result<Vec<WorkerStatus>, SinkError> {
    let rows = client
        .query(
            "SELECT w.worker_id,
                    extract(epoch FROM now() - w.heartbeat_at)::float8,
                    extract(epoch FROM now() - w.started_at)::float8,
                    (SELECT count(*) FROM ingest.shard_leases l
                     WHERE l.stream = w.stream AND l.owner = w.worker_id AND l.expires_at >= now())
             FROM ingest.workers w
             WHERE w.stream = $1 AND w.heartbeat_at > now() - interval '1 hour'
             ORDER BY w.heartbeat_at DESC, w.worker_id",
            &[&stream],
        )
        .await
        .map_err(SinkError::during("reading the workers"))?;
    Ok(rows
        .iter()
        .map(|row| WorkerStatus {
            worker_id: row.get(0),
            seconds_since_heartbeat: row.get(1),
            seconds_since_start: row.get(2),
            leases: row.get(3),
        })
        .collect())
}
