//! The values the rest of the pipeline sees: records, shards, positions.
//! Plain data: the conversions from the SDK's types are here too, so that
//! those types stop at this module.

use std::time::SystemTime;

use bytes::Bytes;

/// One Kinesis record as the rest of the pipeline sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record's position in its shard: the checkpoint after it, and the
    /// dead letter's reference. Compare as numbers, never as strings.
    pub sequence_number: String,
    /// The key the producer chose (the device); it picked the shard.
    pub partition_key: String,
    /// The payload, as the producer sent it.
    pub data: Bytes,
    /// ApproximateArrivalTimestamp, microseconds since the Unix epoch: the
    /// sample time of a record that carries none.
    pub arrival_micros: i64,
}

/// A shard as ListShards describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    /// The shard's id, e.g. `shardId-000000000003`.
    pub shard_id: String,
    /// The parent and, after a merge, the adjacent parent: the shards that
    /// must be read to their end before this one, to keep per-key order.
    pub parent_shard_ids: Vec<String>,
    /// The sequence number of the shard's first record.
    pub starting_sequence: String,
    /// Some when the shard is closed (after a split or merge): its last
    /// possible sequence number. Such a shard gets no new records.
    pub ending_sequence: Option<String>,
    /// The lowest partition-key hash the shard holds (128-bit MD5 space):
    /// where a split or a merge happens.
    pub starting_hash_key: u128,
    /// The highest partition-key hash the shard holds.
    pub ending_hash_key: u128,
}

impl ShardInfo {
    /// Whether the shard still gets new records.
    pub fn is_open(&self) -> bool {
        self.ending_sequence.is_none()
    }
}

/// Where to start reading a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartPosition {
    /// Just after this sequence number: resuming from a checkpoint.
    AfterSequence(String),
    /// At this sequence number: resuming inside a KPL aggregate, part of
    /// whose user records were committed.
    AtSequence(String),
    /// The oldest record still retained: a new shard, or a first run.
    TrimHorizon,
    /// Only records put from now on.
    Latest,
    /// The first record that arrived at or after this time: replays.
    AtTimestamp(SystemTime),
}

/// What [`ShardReader::next`](super::ShardReader::next) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// One or more records, in sequence order.
    Records {
        /// The records, never empty.
        records: Vec<Record>,
        /// How far the reader is behind the shard's newest record, as
        /// Kinesis reports it: the consumer's lag metric.
        millis_behind_latest: Option<i64>,
    },
    /// The shard is closed and every record in it has been returned: its
    /// children may be read now.
    EndOfShard,
}

/// Converts a record from GetRecords. A record without an arrival time
/// (Kinesis always sets it) is taken to arrive now, its best estimate.
pub(crate) fn from_sdk_record(record: aws_sdk_kinesis::types::Record) -> Record {
    let arrival_micros = match record.approximate_arrival_timestamp {
        Some(at) => at.secs() * 1_000_000 + i64::from(at.subsec_nanos() / 1_000),
        None => micros_since_epoch(SystemTime::now()),
    };
    Record {
        sequence_number: record.sequence_number,
        partition_key: record.partition_key.unwrap_or_default(),
        data: Bytes::from(record.data.into_inner()),
        arrival_micros,
    }
}

/// Converts a shard from ListShards. Hash keys are decimal in the API.
pub(crate) fn from_sdk_shard(shard: aws_sdk_kinesis::types::Shard) -> ShardInfo {
    let (starting_hash_key, ending_hash_key) = match &shard.hash_key_range {
        Some(range) => (
            range.starting_hash_key.parse().unwrap_or(0),
            range.ending_hash_key.parse().unwrap_or(u128::MAX),
        ),
        None => (0, u128::MAX),
    };
    let (starting_sequence, ending_sequence) = match shard.sequence_number_range {
        Some(range) => (range.starting_sequence_number, range.ending_sequence_number),
        None => (String::new(), None),
    };
    ShardInfo {
        shard_id: shard.shard_id,
        parent_shard_ids: shard
            .parent_shard_id
            .into_iter()
            .chain(shard.adjacent_parent_shard_id)
            .collect(),
        starting_sequence,
        ending_sequence,
        starting_hash_key,
        ending_hash_key,
    }
}

fn micros_since_epoch(at: SystemTime) -> i64 {
    match at.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(since) => since.as_micros() as i64,
        Err(before) => -(before.duration().as_micros() as i64),
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_kinesis::primitives::{Blob, DateTime};
    use aws_sdk_kinesis::types::{HashKeyRange, SequenceNumberRange, Shard};

    use super::*;

    #[test]
    fn record_arrival_is_in_microseconds() {
        let record = aws_sdk_kinesis::types::Record::builder()
            .sequence_number("49590338271490256608559692538361571095921575989136588898")
            .partition_key("egauge-A")
            .data(Blob::new(b"{}".to_vec()))
            .approximate_arrival_timestamp(DateTime::from_millis(1_763_900_000_123))
            .build()
            .unwrap();
        let record = from_sdk_record(record);
        assert_eq!(record.arrival_micros, 1_763_900_000_123_000);
        assert_eq!(record.partition_key, "egauge-A");
        assert_eq!(&record.data[..], b"{}");
    }

    #[test]
    fn shard_lists_both_parents_and_its_hash_range() {
        let shard = Shard::builder()
            .shard_id("shardId-000000000004")
            .parent_shard_id("shardId-000000000001")
            .adjacent_parent_shard_id("shardId-000000000002")
            .hash_key_range(
                HashKeyRange::builder()
                    .starting_hash_key("0")
                    .ending_hash_key("340282366920938463463374607431768211455")
                    .build()
                    .unwrap(),
            )
            .sequence_number_range(
                SequenceNumberRange::builder()
                    .starting_sequence_number("1")
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        let info = from_sdk_shard(shard);
        assert_eq!(
            info.parent_shard_ids,
            ["shardId-000000000001", "shardId-000000000002"]
        );
        assert_eq!(
            (info.starting_hash_key, info.ending_hash_key),
            (0, u128::MAX)
        );
        assert!(info.is_open());
    }
}
