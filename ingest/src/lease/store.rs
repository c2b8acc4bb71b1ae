//! The lease SQL. Every change of owner bumps `lease_counter`; a worker's
//! checkpoint update names the counter it holds, so a lease that moved on
//! cannot be written by its old owner (see `sink::postgres::commit`).

use std::time::{Duration, SystemTime};

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
    /// Where a shard without a checkpoint starts (AT_TIMESTAMP), fixed when
    /// its lease was first taken; None: trim horizon.
    pub start_at: Option<SystemTime>,
}

/// Where a shard without a checkpoint or parents starts, as `--start` asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstStart {
    TrimHorizon,
    /// `latest`: the time the lease is first taken (the database's clock).
    Latest,
    At(SystemTime),
}

/// A shard that Kinesis no longer lists (it aged out of the retention
/// period) and that the lease table had not seen to its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredShard {
    pub shard_id: String,
    pub checkpoint: Option<String>,
}

/// Lease operations of one worker on one stream.
#[derive(Debug, Clone)]
pub struct LeaseStore {
    /// The stream's lease key (see [`super::identity`]).
    pub stream: String,
    /// This worker's id, written as the owner.
    pub worker: String,
    /// How long a lease lasts without renewal; also how long a silent worker counts as live.
    pub ttl: Duration,
    /// Recorded on a shard's lease when it is first taken.
    pub first_start: FirstStart,
}

/// Sets `start_at` once, on a shard with no checkpoint and no parents; $5:
/// latest (now), $6: a time (or NULL: trim horizon).
const FIRST_START: &str = "start_at = COALESCE(l.start_at, CASE
    WHEN l.checkpoint IS NOT NULL OR cardinality(l.parent_shard_ids) > 0 THEN NULL
    WHEN $5 THEN now() ELSE $6::timestamptz END)";

/// Readable: not ended, and every parent (that we know of) ended.
const READABLE: &str = "NOT l.ended AND NOT EXISTS (
    SELECT 1 FROM ingest.shard_leases p
    WHERE p.stream = l.stream AND p.shard_id = ANY (l.parent_shard_ids) AND NOT p.ended)";

impl LeaseStore {
    fn ttl_secs(&self) -> f64 {
        self.ttl.as_secs_f64()
    }

    /// The parameters $5 and $6 of [`FIRST_START`].
    fn first_start(&self) -> (bool, Option<SystemTime>) {
        match self.first_start {
            FirstStart::TrimHorizon => (false, None),
            FirstStart::Latest => (true, None),
            FirstStart::At(at) => (false, Some(at)),
        }
    }

    /// Ends the shards Kinesis no longer lists (`listed` is every shard it
    /// does): after an outage longer than the retention period a parent may
    /// be gone, and its children must still be read. Its unread records are
    /// lost to the retention, not to us. Bumps the counter, so that a worker
    /// still holding such a lease stops. An empty listing ends nothing.
    pub async fn end_expired(
        &self,
        client: &Client,
        listed: &[&str],
    ) -> Result<Vec<ExpiredShard>, SinkError> {
        if listed.is_empty() {
            return Ok(Vec::new());
        }
        let rows = client
            .query(
                "UPDATE ingest.shard_leases
                 SET ended = true, owner = NULL, expires_at = NULL,
                     lease_counter = lease_counter + 1, updated_at = now()
                 WHERE stream = $1 AND NOT ended AND NOT (shard_id = ANY ($2))
                 RETURNING shard_id, checkpoint",
                &[&self.stream, &listed],
            )
            .await
            .map_err(SinkError::during("ending shards Kinesis no longer lists"))?;
        Ok(rows
            .iter()
            .map(|row| ExpiredShard {
                shard_id: row.get(0),
                checkpoint: row.get(1),
            })
            .collect())
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
    ///
    /// First every lease whose row no batch holds locked, at once (`SKIP
    /// LOCKED`): a batch whose connection died before COMMIT holds its rows
    /// until the server ends its session, and the other leases must not wait
    /// for it. Then the rows that were locked, waiting for their batches to
    /// commit, at most the session's `lock_timeout` (an error: the next round
    /// tries again, by when the server has ended a stuck session).
    pub async fn renew(
        &self,
        client: &Client,
        held: &[HeldLease],
    ) -> Result<Vec<String>, SinkError> {
        let ids: Vec<&str> = held.iter().map(|l| l.shard_id.as_str()).collect();
        let counters: Vec<i64> = held.iter().map(|l| l.counter).collect();
        let rows = client
            .query(
                "WITH mine AS (
                     SELECT l.shard_id, l.lease_counter FROM ingest.shard_leases l
                     JOIN unnest($4::text[], $5::int8[]) AS h(shard_id, counter)
                       ON l.shard_id = h.shard_id AND l.lease_counter = h.counter
                     WHERE l.stream = $1 AND l.owner = $2
                 ), unlocked AS (
                     SELECT l.shard_id FROM ingest.shard_leases l JOIN mine USING (shard_id, lease_counter)
                     WHERE l.stream = $1 AND l.owner = $2
                     FOR UPDATE OF l SKIP LOCKED
                 ), renewed AS (
                     UPDATE ingest.shard_leases l SET expires_at = now() + make_interval(secs => $3)
                     FROM unlocked WHERE l.stream = $1 AND l.shard_id = unlocked.shard_id
                     RETURNING l.shard_id
                 )
                 SELECT shard_id, shard_id IN (SELECT shard_id FROM renewed) FROM mine",
                &[&self.stream, &self.worker, &self.ttl_secs(), &ids, &counters],
            )
            .await
            .map_err(SinkError::during("renewing leases"))?;
        let mut still_held: Vec<String> = Vec::new();
        let mut locked: Vec<HeldLease> = Vec::new();
        for row in &rows {
            let shard_id: String = row.get(0);
            if row.get::<_, bool>(1) {
                still_held.push(shard_id);
            } else if let Some(lease) = held.iter().find(|l| l.shard_id == shard_id) {
                locked.push(lease.clone());
            }
        }
        if locked.is_empty() {
            return Ok(still_held);
        }
        let ids: Vec<&str> = locked.iter().map(|l| l.shard_id.as_str()).collect();
        let counters: Vec<i64> = locked.iter().map(|l| l.counter).collect();
        let rows = client
            .query(
                "UPDATE ingest.shard_leases l SET expires_at = now() + make_interval(secs => $3)
                 FROM unnest($4::text[], $5::int8[]) AS h(shard_id, counter)
                 WHERE l.stream = $1 AND l.owner = $2 AND l.shard_id = h.shard_id AND l.lease_counter = h.counter
                 RETURNING l.shard_id",
                &[&self.stream, &self.worker, &self.ttl_secs(), &ids, &counters],
            )
            .await
            .map_err(SinkError::during("renewing leases a batch held"))?;
        still_held.extend(rows.iter().map(|row| row.get::<_, String>(0)));
        Ok(still_held)
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
        let (latest, at) = self.first_start();
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
                         expires_at = now() + make_interval(secs => $3), updated_at = now(),
                         {FIRST_START}
                     FROM free WHERE l.stream = $1 AND l.shard_id = free.shard_id
                     RETURNING l.shard_id, l.lease_counter, l.checkpoint, l.checkpoint_sub, l.start_at"
                ),
                &[
                    &self.stream,
                    &self.worker,
                    &self.ttl_secs(),
                    &(count as i64),
                    &latest,
                    &at,
                ],
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
        let (latest, at) = self.first_start();
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
                         expires_at = now() + make_interval(secs => $3), updated_at = now(),
                         {FIRST_START}
                     FROM one WHERE l.stream = $1 AND l.shard_id = one.shard_id
                     RETURNING l.shard_id, l.lease_counter, l.checkpoint, l.checkpoint_sub, l.start_at"
                ),
                &[
                    &self.stream,
                    &self.worker,
                    &self.ttl_secs(),
                    &victim,
                    &latest,
                    &at,
                ],
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
        start_at: row.get(4),
    }
}
