//! A batch the database refused for its data, written again record by record.
//!
//! Like bisect-on-error in AWS Lambda's Kinesis event source, but inside one
//! transaction: the checkpoints move first, as in [`write_batch`](super::write_batch),
//! then the records are copied in halves, each half under a savepoint. A half
//! the database refuses (a data error) is rolled back to its savepoint and
//! split again, until the refused records stand alone; each of those becomes
//! a dead letter carrying the database's error text. Good records, dead
//! letters and checkpoints commit together, so every record of the batch is
//! either rows or a dead letter, once; a crash before the commit leaves
//! nothing, and the batch is read again from the old checkpoints.
//!
//! Records are tried in sequence order, so the outcome is the one a
//! record-by-record insert would have: a record refused only because of an
//! earlier one of the batch (two samples that together overflow an
//! aggregate) is the later one.

use std::collections::VecDeque;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use tokio_postgres::Client;

use super::SinkError;
use super::commit::{
    COPY_DEAD_LETTERS, COPY_EVENTS, COPY_SAMPLES, Outcome, check_series, copy_in, move_checkpoints,
    unmoved,
};
use crate::batch::{DeadLetterKey, SealedSegment, encode_dead_letter};

/// `reason_kind` of a record the database refused.
pub const DATABASE_REFUSED: &str = "database_refused";

/// A record the database refused, committed as a dead letter instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub shard_id: String,
    pub sequence_number: String,
    /// The database's error text.
    pub reason: String,
    /// Rows the record would have written: (samples, events, dead letters).
    pub rows: (usize, usize, usize),
}

/// Writes `segments` as [`write_batch`](super::write_batch) does, except
/// that records the database refuses become dead letters. A data error
/// outside the records' own COPYs (the checkpoint update, the dead letters
/// of refused records) is returned: those do not depend on one record.
pub async fn write_batch_bisecting(
    client: &mut Client,
    stream: &str,
    owner: &str,
    segments: &[SealedSegment],
) -> Result<(Outcome, Vec<Refused>), SinkError> {
    let transaction = client
        .transaction()
        .await
        .map_err(SinkError::during("beginning the batch"))?;
    // A deferred constraint would otherwise refuse the rows only at COMMIT,
    // where no record can be told from another.
    transaction
        .batch_execute("SET CONSTRAINTS ALL IMMEDIATE")
        .await
        .map_err(SinkError::during("making constraints immediate"))?;
    let lost = move_checkpoints(&transaction, stream, owner, segments).await?;
    if !lost.is_empty() {
        let outcome = unmoved(transaction, stream, owner, segments, lost).await?;
        return Ok((outcome, Vec::new()));
    }
    check_series(&transaction, segments).await?;

    // Records are numbered across the batch, segment after segment.
    let records: Vec<(usize, usize)> = segments
        .iter()
        .enumerate()
        .flat_map(|(s, segment)| (0..segment.marks.len()).map(move |r| (s, r)))
        .collect();
    let mut refused = Vec::new();
    let mut letters = BytesMut::new();
    let mut pending: VecDeque<Range<usize>> = VecDeque::new();
    pending.push_back(0..records.len());
    while let Some(range) = pending.pop_front() {
        if range.is_empty() {
            continue;
        }
        transaction
            .batch_execute("SAVEPOINT records")
            .await
            .map_err(SinkError::during("setting a savepoint"))?;
        match copy_records(&transaction, segments, &records, range.clone()).await {
            Ok(()) => transaction
                .batch_execute("RELEASE SAVEPOINT records")
                .await
                .map_err(SinkError::during("releasing a savepoint"))?,
            Err(error) if error.is_data_error() => {
                transaction
                    .batch_execute("ROLLBACK TO SAVEPOINT records")
                    .await
                    .map_err(SinkError::during("rolling back to a savepoint"))?;
                if range.len() == 1 {
                    let (s, r) = records[range.start];
                    let segment = &segments[s];
                    let mark = &segment.marks[r];
                    let reason = error.refusal();
                    encode_dead_letter(
                        &mut letters,
                        DeadLetterKey {
                            stream,
                            shard_id: &segment.shard_id,
                            sequence_number: &mark.sequence_number,
                            sub_sequence: mark.sub_sequence,
                        },
                        DATABASE_REFUSED,
                        &reason,
                        &mark.raw,
                    );
                    refused.push(Refused {
                        shard_id: segment.shard_id.clone(),
                        sequence_number: mark.sequence_number.clone(),
                        reason,
                        rows: segment.tuples(r..r + 1).rows,
                    });
                } else {
                    // Halves, first half first: records keep their order.
                    let middle = range.start + range.len() / 2;
                    pending.push_front(middle..range.end);
                    pending.push_front(range.start..middle);
                }
            }
            Err(error) => return Err(error),
        }
    }

    let letters = if refused.is_empty() {
        Vec::new()
    } else {
        vec![letters.freeze()]
    };
    copy_in(
        &transaction,
        COPY_DEAD_LETTERS,
        letters,
        "copying the dead letters of refused records",
    )
    .await?;
    transaction
        .commit()
        .await
        .map_err(SinkError::during("committing the batch"))?;
    Ok((Outcome::Committed, refused))
}

/// Copies records `range` (numbered as in `records`) into the three tables.
async fn copy_records(
    transaction: &tokio_postgres::Transaction<'_>,
    segments: &[SealedSegment],
    records: &[(usize, usize)],
    range: Range<usize>,
) -> Result<(), SinkError> {
    let (mut samples, mut events, mut dead_letters) = (Vec::new(), Vec::new(), Vec::new());
    let push = |buffers: &mut Vec<Bytes>, bytes: Bytes| {
        if !bytes.is_empty() {
            buffers.push(bytes);
        }
    };
    // The range's records of each segment are consecutive.
    let mut start = range.start;
    while start < range.end {
        let (s, first) = records[start];
        let count = records[start..range.end]
            .iter()
            .take_while(|(segment, _)| *segment == s)
            .count();
        let tuples = segments[s].tuples(first..first + count);
        push(&mut samples, tuples.samples);
        push(&mut events, tuples.events);
        push(&mut dead_letters, tuples.dead_letters);
        start += count;
    }
    copy_in(transaction, COPY_SAMPLES, samples, "copying samples").await?;
    copy_in(transaction, COPY_EVENTS, events, "copying events").await?;
    copy_in(
        transaction,
        COPY_DEAD_LETTERS,
        dead_letters,
        "copying dead letters",
    )
    .await
}
