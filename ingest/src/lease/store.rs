//! The lease SQL. Every change of owner bumps `lease_counter`; a worker's
//! checkpoint update names the counter it holds, so a lease that moved on
//! cannot be written by its old owner (see `sink::postgres::commit`).

use std::time::Duration;

use tokio_postgres::Client;

use super::Fleet;
use crate::sink::postgres::SinkError;

/// A lease this worker holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLease {
    pub shard_id: String,
    /// The counter the lease was taken with: the fence for its checkpoints.
    pub counter: i64,
    /// Where reading resumes (after this sequence number); None: from the start position.
    pub checkpoint: Option<String>,
    /// Set when a batch ended inside the KPL aggregate at `checkpoint`: its
    /// user records up to this one are committed, so reading resumes at it.
    pub checkpoint_sub: Option<i64>,
}

/// Lease operations of one worker on one stream.
#[derive(Debug, Clone)]
pub struct LeaseStore {
    /// The stream (name or ARN) the leases belong to.
    pub stream: String,
    /// This worker's id, written as the owner.
    pub worker: String,
    /// How long a lease lasts without renewal; also how long a silent worker counts as live.
    pub ttl: Duration,
}

/// Readable: not ended, and every parent (that we know of) ended.
const READABLE: &str = "NOT l.ended AND NOT EXISTS (
    SELECT 1 FROM ingest.shard_leases p
    WHERE p.stream = l.stream AND p.shard_id = ANY (l.parent_shard_ids) AND NOT p.ended)";

impl LeaseStore {
    fn ttl_secs(&self) -> f64 {
        self.ttl.as_secs_f64()
    }

    /// Adds shards that are not in the table yet (new stream, split, merge).
    pub async fn sync_shards(
        &self,
        client: &Client,
        shards: &[(String, Vec<String>)],
    ) -> Result<u64, SinkError> {
        let ids: Vec<&str> = shards.iter().map(|(id, _)| id.as_str()).collect();
        // Parents as one text per shard ("a,b"), since arrays of arrays must be rectangular.
        let parents: Vec<String> = shards
            .iter()
            .map(|(_, parents)| parents.join(","))
            .collect();
        client
            .execute(
                "INSERT INTO ingest.shard_leases (stream, shard_id, parent_shard_ids)
                 SELECT $1, id, CASE WHEN parents = '' THEN '{}'::text[] ELSE string_to_array(parents, ',') END
                 FROM unnest($2::text[], $3::text[]) AS s(id, parents)
                 ON CONFLICT (stream, shard_id) DO NOTHING",
                &[&self.stream, &ids, &parents],
            )
            .await
            .map_err(SinkError::during("adding new shards to the lease table"))
    }

    /// Records that this worker is alive.
    pub async fn heartbeat(&self, client: &Client) -> Result<(), SinkError> {
        client
            .execute(
                "INSERT INTO ingest.workers (stream, worker_id) VALUES ($1, $2)
                 ON CONFLICT (stream, worker_id) DO UPDATE SET heartbeat_at = now()",
                &[&self.stream, &self.worker],
            )
            .await
            .map_err(SinkError::during("recording the heartbeat"))?;
        Ok(())
    }

    /// Extends the leases in `held`; returns the shard ids still held (the
    /// others were taken over, or ended and freed by a commit).
    pub async fn renew(
        &self,
        client: &Client,
        held: &[HeldLease],
    ) -> Result<Vec<String>, SinkError> {
        let ids: Vec<&str> = held.iter().map(|l| l.shard_id.as_str()).collect();
        let counters: Vec<i64> = held.iter().map(|l| l.counter).collect();
        let rows = client
            .query(
                "UPDATE ingest.shard_leases l SET expires_at = now() + make_interval(secs => $3)
                 FROM unnest($4::text[], $5::int8[]) AS h(shard_id, counter)
                 WHERE l.stream = $1 AND l.owner = $2 AND l.shard_id = h.shard_id AND l.lease_counter = h.counter
                 RETURNING l.shard_id",
                &[&self.stream, &self.worker, &self.ttl_secs(), &ids, &counters],
            )
            .await
            .map_err(SinkError::during("renewing leases"))?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// The fleet: live workers, readable and free shards, leases per owner.
    pub async fn fleet(&self, client: &Client) -> Result<Fleet, SinkError> {
        let during = SinkError::during("reading the lease table");
        let row = client
            .query_one(
                &format!(
                    "SELECT (SELECT count(*) FROM ingest.workers
                             WHERE stream = $1 AND heartbeat_at > now() - make_interval(secs => $2)),
                            count(*),
                            count(*) FILTER (WHERE l.owner IS NULL OR l.expires_at < now())
                     FROM ingest.shard_leases l WHERE l.stream = $1 AND {READABLE}"
                ),
                &[&self.stream, &self.ttl_secs()],
            )
            .await
            .map_err(during)?;
        let owners = client
            .query(
                &format!(
                    "SELECT l.owner, count(*) FROM ingest.shard_leases l
                     WHERE l.stream = $1 AND l.owner IS NOT NULL AND l.expires_at >= now() AND {READABLE}
                     GROUP BY l.owner"
                ),
                &[&self.stream],
            )
            .await
            .map_err(SinkError::during("reading the lease table"))?;
        Ok(Fleet {
            live_workers: row.get::<_, i64>(0) as usize,
            readable_shards: row.get::<_, i64>(1) as usize,
            free_shards: row.get::<_, i64>(2) as usize,
            held_by: owners
                .iter()
                .map(|r| (r.get(0), r.get::<_, i64>(1) as usize))
                .collect(),
        })
    }

    /// Takes up to `count` free (unowned or expired) readable leases.
    pub async fn acquire(
        &self,
        client: &Client,
        count: usize,
    ) -> Result<Vec<HeldLease>, SinkError> {
        let rows = client
            .query(
                &format!(
                    "WITH free AS (
                         SELECT l.shard_id FROM ingest.shard_leases l
                         WHERE l.stream = $1 AND (l.owner IS NULL OR l.expires_at < now()) AND {READABLE}
                         ORDER BY l.shard_id LIMIT $4
                         FOR UPDATE SKIP LOCKED)
                     UPDATE ingest.shard_leases l
                     SET owner = $2, lease_counter = l.lease_counter + 1,
                         expires_at = now() + make_interval(secs => $3), updated_at = now()
                     FROM free WHERE l.stream = $1 AND l.shard_id = free.shard_id
                     RETURNING l.shard_id, l.lease_counter, l.checkpoint, l.checkpoint_sub"
                ),
                &[&self.stream, &self.worker, &self.ttl_secs(), &(count as i64)],
            )
            .await
            .map_err(SinkError::during("taking free leases"))?;
        Ok(rows.iter().map(held_lease).collect())
    }

    /// Takes one lease from `victim`. Its next commit for that shard fails
    /// the fence, so it stops; this worker resumes from the checkpoint.
    pub async fn steal(
        &self,
        client: &Client,
        victim: &str,
    ) -> Result<Option<HeldLease>, SinkError> {
        let row = client
            .query_opt(
                &format!(
                    "WITH one AS (
                         SELECT l.shard_id FROM ingest.shard_leases l
                         WHERE l.stream = $1 AND l.owner = $4 AND l.expires_at >= now() AND {READABLE}
                         ORDER BY l.shard_id DESC LIMIT 1
                         FOR UPDATE SKIP LOCKED)
                     UPDATE ingest.shard_leases l
                     SET owner = $2, lease_counter = l.lease_counter + 1,
                         expires_at = now() + make_interval(secs => $3), updated_at = now()
                     FROM one WHERE l.stream = $1 AND l.shard_id = one.shard_id
                     RETURNING l.shard_id, l.lease_counter, l.checkpoint, l.checkpoint_sub"
                ),
                &[&self.stream, &self.worker, &self.ttl_secs(), &victim],
            )
            .await
            .map_err(SinkError::during("taking a lease from another worker"))?;
        Ok(row.as_ref().map(held_lease))
    }

    /// Frees this worker's leases and removes its heartbeat, so that the
    /// others take over at once instead of after the lease time.
    pub async fn release_all(&self, client: &Client) -> Result<u64, SinkError> {
        let released = client
            .execute(
                "UPDATE ingest.shard_leases SET owner = NULL, expires_at = NULL, updated_at = now()
                 WHERE stream = $1 AND owner = $2",
                &[&self.stream, &self.worker],
            )
            .await
            .map_err(SinkError::during("releasing leases"))?;
        client
            .execute(
                "DELETE FROM ingest.workers WHERE stream = $1 AND worker_id = $2",
                &[&self.stream, &self.worker],
            )
            .await
            .map_err(SinkError::during("removing the heartbeat"))?;
        Ok(released)
    }
}

fn held_lease(row: &tokio_postgres::Row) -> HeldLease {
    HeldLease {
        shard_id: row.get(0),
        counter: row.get(1),
        checkpoint: row.get(2),
        checkpoint_sub: row.get(3),
    }
}
