//! The batch transaction: fenced checkpoints, binary COPY, commit.
//!
//! The checkpoint update runs first: if a lease was lost, nothing has been
//! copied yet and the rollback is cheap. Its row locks are held until commit,
//! so a worker taking the lease over waits for this commit and then reads
//! the checkpoint it made. Either the rows and their checkpoints commit
//! together, or neither does.

use bytes::Bytes;
use futures_util::SinkExt;
use tokio_postgres::Client;
use tokio_postgres::types::Type;

use super::SinkError;
use crate::batch::{SealedSegment, copy};

pub(super) const COPY_SAMPLES: &str =
    "COPY telemetry.samples (time, series_id, value) FROM STDIN (FORMAT binary)";
pub(super) const COPY_EVENTS: &str =
    "COPY telemetry.events (time, house, device, kind, body) FROM STDIN (FORMAT binary)";
pub(super) const COPY_DEAD_LETTERS: &str = "COPY ingest.dead_letters \
     (stream, shard_id, sequence_number, sub_sequence, reason_kind, reason, raw) \
     FROM STDIN (FORMAT binary)";

/// How a batch ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Rows and checkpoints are committed.
    Committed,
    /// These shards' leases are no longer this worker's (or their checkpoint
    /// would move backwards): nothing was written. Drop them and retry the rest.
    LeasesLost(Vec<String>),
    /// An earlier attempt of this very batch committed, though its client
    /// never heard so (the connection died after COMMIT was sent): its
    /// checkpoints are already where this batch would move them, under the
    /// same leases. Nothing was written twice; the leases are still ours.
    AlreadyCommitted,
}

/// Writes `segments` in one transaction as worker `owner` of `stream`.
///
/// Its statements give their parameter types (`query_typed`), so each is
/// one round trip, not a prepare and an execute: with writers busy on every
/// core each round trip waits to be scheduled, and a batch has few to spare.
pub async fn write_batch(
    client: &mut Client,
    stream: &str,
    owner: &str,
    segments: &[SealedSegment],
) -> Result<Outcome, SinkError> {
    let transaction = client
        .transaction()
        .await
        .map_err(SinkError::during("beginning the batch"))?;

    let lost = move_checkpoints(&transaction, stream, owner, segments).await?;
    if !lost.is_empty() {
        return unmoved(transaction, stream, owner, segments, lost).await;
    }
    check_series(&transaction, segments).await?;

    let samples = segments
        .iter()
        .filter(|s| s.rows.0 > 0)
        .map(|s| s.samples.clone())
        .collect();
    let events = segments
        .iter()
        .filter(|s| s.rows.1 > 0)
        .map(|s| s.events.clone())
        .collect();
    let dead_letters = segments
        .iter()
        .filter(|s| s.rows.2 > 0)
        .map(|s| s.dead_letters.clone())
        .collect();
    copy_in(&transaction, COPY_SAMPLES, samples, "copying samples").await?;
    copy_in(&transaction, COPY_EVENTS, events, "copying events").await?;
    copy_in(
        &transaction,
        COPY_DEAD_LETTERS,
        dead_letters,
        "copying dead letters",
    )
    .await?;

    transaction
        .commit()
        .await
        .map_err(SinkError::during("committing the batch"))?;
    Ok(Outcome::Committed)
}

/// The fenced checkpoint update of every segment, the batch transaction's
/// first statement; returns the shards whose lease is no longer this
/// worker's (or whose checkpoint would move backwards), nothing when all moved.
pub(super) async fn move_checkpoints(
    transaction: &tokio_postgres::Transaction<'_>,
    stream: &str,
    owner: &str,
    segments: &[SealedSegment],
) -> Result<Vec<String>, SinkError> {
    let shard_ids: Vec<&str> = segments.iter().map(|s| s.shard_id.as_str()).collect();
    let counters: Vec<i64> = segments.iter().map(|s| s.lease_counter).collect();
    let sequences: Vec<Option<&str>> = segments
        .iter()
        .map(|s| s.last_sequence.as_deref())
        .collect();
    let subs: Vec<Option<i64>> = segments.iter().map(|s| s.last_sub_sequence).collect();
    let ended: Vec<bool> = segments.iter().map(|s| s.ended).collect();
    let behind: Vec<Option<i64>> = segments.iter().map(|s| s.millis_behind_latest).collect();
    let moved = transaction
        .query_typed(
            "UPDATE ingest.shard_leases l
             SET checkpoint = coalesce(v.seq, l.checkpoint),
                 checkpoint_sub = CASE WHEN v.seq IS NULL THEN l.checkpoint_sub ELSE v.sub END,
                 ended = l.ended OR v.ended,
                 millis_behind_latest = coalesce(v.behind, l.millis_behind_latest),
                 -- An ended shard has nothing more to read: free its lease.
                 owner = CASE WHEN v.ended THEN NULL ELSE l.owner END,
                 expires_at = CASE WHEN v.ended THEN NULL ELSE l.expires_at END,
                 updated_at = now()
             FROM unnest($3::text[], $4::int8[], $5::text[], $6::bool[], $7::int8[], $8::int8[])
                  AS v(shard_id, counter, seq, ended, behind, sub)
             WHERE l.stream = $1 AND l.shard_id = v.shard_id
               AND l.owner = $2 AND l.lease_counter = v.counter
               -- Forwards only, by (sequence, sub-sequence); a NULL sub-sequence
               -- (the record done whole) comes after all of its user records.
               AND (v.seq IS NULL OR l.checkpoint IS NULL
                    OR (l.checkpoint::numeric, coalesce(l.checkpoint_sub, 9223372036854775807))
                     < (v.seq::numeric, coalesce(v.sub, 9223372036854775807)))
             RETURNING l.shard_id",
            &[
                (&stream, Type::TEXT),
                (&owner, Type::TEXT),
                (&shard_ids, Type::TEXT_ARRAY),
                (&counters, Type::INT8_ARRAY),
                (&sequences, Type::TEXT_ARRAY),
                (&ended, Type::BOOL_ARRAY),
                (&behind, Type::INT8_ARRAY),
                (&subs, Type::INT8_ARRAY),
            ],
        )
        .await
        .map_err(SinkError::during("moving checkpoints"))?;
    let moved: Vec<String> = moved.iter().map(|row| row.get(0)).collect();
    Ok(shard_ids
        .iter()
        .filter(|id| !moved.iter().any(|m| m == *id))
        .map(|id| id.to_string())
        .collect())
}

/// Makes sure every series id the batch's samples name exists, in the
/// batch's transaction: one query per batch, where a foreign key would cost
/// a lookup and a row lock per sample (measured: 2.7 times slower COPY).
/// Ids come from the writer's cache; after a failover with asynchronous
/// replication the new primary may lack the newest series, and may give
/// their ids to others, so a stale id must never reach a COPY. Series rows
/// are never deleted, so what exists now exists at COMMIT.
pub(super) async fn check_series(
    transaction: &tokio_postgres::Transaction<'_>,
    segments: &[SealedSegment],
) -> Result<(), SinkError> {
    let mut ids: Vec<i32> = segments
        .iter()
        .flat_map(|s| s.series_ids.iter().copied())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Ok(());
    }
    let found: i64 = transaction
        .query_typed_one(
            "SELECT count(*) FROM telemetry.series WHERE series_id = ANY($1)",
            &[(&ids, Type::INT4_ARRAY)],
        )
        .await
        .map_err(SinkError::during("checking the batch's series"))?
        .get(0);
    let missing = ids.len() - found as usize;
    if missing > 0 {
        return Err(SinkError::UnknownSeries { missing });
    }
    Ok(())
}

/// Rolls back a batch whose checkpoints did not all move and says why: an
/// earlier attempt of it committed, or the shards in `lost` are no longer
/// this worker's.
pub(super) async fn unmoved(
    transaction: tokio_postgres::Transaction<'_>,
    stream: &str,
    owner: &str,
    segments: &[SealedSegment],
    lost: Vec<String>,
) -> Result<Outcome, SinkError> {
    let outcome = if already_committed(&transaction, stream, owner, segments, &lost).await? {
        Outcome::AlreadyCommitted
    } else {
        Outcome::LeasesLost(lost)
    };
    transaction.rollback().await.map_err(SinkError::during(
        "rolling back a batch that moved no checkpoint",
    ))?;
    Ok(outcome)
}

/// Whether an earlier attempt of this batch committed, judged by the
/// segments whose checkpoint update found nothing to move. Only this writer
/// commits under these counters, one batch after the other, and a reader
/// starts after the checkpoint its lease found: a checkpoint already at a
/// segment's last sequence under the same lease (still ours, or freed by the
/// commit that ended the shard) means this batch committed before. It
/// committed all or nothing, so one such shard says so for the whole batch.
async fn already_committed(
    transaction: &tokio_postgres::Transaction<'_>,
    stream: &str,
    owner: &str,
    segments: &[SealedSegment],
    unmoved: &[String],
) -> Result<bool, SinkError> {
    let unmoved: Vec<&SealedSegment> = segments
        .iter()
        .filter(|s| unmoved.contains(&s.shard_id))
        .collect();
    let shard_ids: Vec<&str> = unmoved.iter().map(|s| s.shard_id.as_str()).collect();
    let counters: Vec<i64> = unmoved.iter().map(|s| s.lease_counter).collect();
    let sequences: Vec<Option<&str>> = unmoved.iter().map(|s| s.last_sequence.as_deref()).collect();
    let subs: Vec<Option<i64>> = unmoved.iter().map(|s| s.last_sub_sequence).collect();
    let found = transaction
        .query_opt(
            "SELECT 1 FROM ingest.shard_leases l
             JOIN unnest($3::text[], $4::int8[], $5::text[], $6::int8[]) AS v(shard_id, counter, seq, sub)
               ON l.shard_id = v.shard_id AND l.lease_counter = v.counter
             WHERE l.stream = $1 AND (l.owner = $2 OR l.ended) AND v.seq IS NOT NULL
               AND l.checkpoint IS NOT NULL
               AND (l.checkpoint::numeric, coalesce(l.checkpoint_sub, 9223372036854775807))
                >= (v.seq::numeric, coalesce(v.sub, 9223372036854775807))
             LIMIT 1",
            &[&stream, &owner, &shard_ids, &counters, &sequences, &subs],
        )
        .await
        .map_err(SinkError::during(
            "looking for an earlier commit of the batch",
        ))?;
    Ok(found.is_some())
}

/// One COPY of the given tuple buffers, framed by the header and trailer;
/// nothing is sent when there are no tuples.
pub(super) async fn copy_in(
    transaction: &tokio_postgres::Transaction<'_>,
    statement: &str,
    // A Vec, not an iterator: an iterator of borrowing closures held across
    // the awaits below would keep the future from being Send.
    tuples: Vec<Bytes>,
    during: &'static str,
) -> Result<(), SinkError> {
    if tuples.is_empty() {
        return Ok(());
    }
    let sink = transaction
        .copy_in(statement)
        .await
        .map_err(SinkError::during(during))?;
    futures_util::pin_mut!(sink);
    sink.feed(copy::header())
        .await
        .map_err(SinkError::during(during))?;
    for chunk in tuples {
        sink.feed(chunk).await.map_err(SinkError::during(during))?;
    }
    sink.feed(copy::trailer())
        .await
        .map_err(SinkError::during(during))?;
    // Without finish() the server aborts the COPY: all or nothing.
    sink.finish().await.map_err(SinkError::during(during))?;
    Ok(())
}
