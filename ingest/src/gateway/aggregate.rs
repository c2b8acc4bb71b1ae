//! KPL aggregation for the producer: the user records of one PutRecords
//! call packed into aggregated Kinesis records ([`crate::kpl`]), one group
//! per shard, so that every user record lands on the shard its own
//! partition key maps to and one device's records keep their shard.
//!
//! Why: a shard takes 1,000 records/s but 1 MB/s, so small readings
//! aggregated carry many times more per shard (and per emulator call).
//!
//! An aggregate takes the partition key of its first user record, so
//! Kinesis routes it by that key's hash: into the shard the [`ShardMap`]
//! predicted for the whole group. The map is read with ListShards; a put
//! answered from another shard (the stream was resharded since) marks it
//! stale, and the producer reads it again. Until it has a map, or for a
//! record too large for an aggregate, the producer puts records plain.
//! No IO here.

use std::collections::HashMap;

use bytes::Bytes;
use md5::{Digest, Md5};

use crate::kpl::Aggregator;
use crate::source::kinesis::{MAX_BYTES_PER_PUT, MAX_RECORDS_PER_PUT, ShardInfo};

/// Bytes an aggregate adds to its user records at most: per user record,
/// its key once more (in the aggregate's key table) and the protobuf tags
/// and lengths; per aggregate, the magic, the MD5 and its own partition key.
const RECORD_OVERHEAD: usize = 24;
/// The largest aggregate made: the KPL's default AggregationMaxSize
/// (51,200 bytes), not Kinesis's 1 MiB, so that one aggregate stays a
/// small part of a GetRecords answer and of a batch.
pub const MAX_AGGREGATE_BYTES: usize = 51_200;
const AGGREGATE_OVERHEAD: usize = 4 + 16 + 256 + 8;

/// The stream's open shards, by the partition-key hashes they take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMap {
    /// (starting hash key, shard id), sorted by starting hash key.
    starts: Vec<(u128, String)>,
}

impl ShardMap {
    /// The map of the open shards among `shards`; None if none is open.
    pub fn new(shards: &[ShardInfo]) -> Option<ShardMap> {
        let mut starts: Vec<(u128, String)> = shards
            .iter()
            .filter(|shard| shard.is_open())
            .map(|shard| (shard.starting_hash_key, shard.shard_id.clone()))
            .collect();
        starts.sort();
        (!starts.is_empty()).then_some(ShardMap { starts })
    }

    /// The shard Kinesis puts a record with this partition key into: the
    /// open shard whose hash range holds the key's MD5.
    pub fn shard_of(&self, partition_key: &str) -> &str {
        let hash = u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into());
        let index = self.starts.partition_point(|(start, _)| *start <= hash);
        // The first open shard starts at 0, so index >= 1.
        &self.starts[index.saturating_sub(1)].1
    }
}

/// One Kinesis record of a call: an aggregate, or a user record put plain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// (partition key, data), as PutRecords takes it.
    pub record: (String, Bytes),
    /// The indexes of its user records among those added, in order.
    pub members: Vec<usize>,
    /// The shard the map predicts (None when put plain).
    pub shard: Option<String>,
}

/// Packs the user records of one call, within its limits: at most 500
/// Kinesis records and 5 MiB, each record at most 1 MiB. Within a shard,
/// the call's Kinesis records keep the order the user records were added.
#[derive(Debug)]
pub struct CallPacker<'a> {
    map: &'a ShardMap,
    /// Aggregates being filled, by shard.
    open: HashMap<&'a str, Group>,
    /// Kinesis records finished, in order.
    done: Vec<Packed>,
    /// An upper bound of the call's bytes so far.
    bytes: usize,
    added: usize,
}

/// The user records of one shard being packed.
#[derive(Debug)]
struct Group {
    aggregator: Aggregator,
    /// Their indexes among those added.
    members: Vec<usize>,
    /// The first of them, put plain if it stays alone.
    first: (String, Bytes),
}

impl Group {
    /// The group as one Kinesis record: plain when it holds one user
    /// record (an aggregate of one only adds bytes), else an aggregate.
    fn packed(mut self, shard: &str) -> Option<Packed> {
        let aggregate = self.aggregator.finish()?;
        Some(if self.members.len() == 1 {
            Packed {
                record: self.first,
                members: self.members,
                shard: None,
            }
        } else {
            packed(aggregate.partition_key, aggregate.data, self.members, shard)
        })
    }
}

impl<'a> CallPacker<'a> {
    pub fn new(map: &'a ShardMap) -> CallPacker<'a> {
        CallPacker {
            map,
            open: HashMap::new(),
            done: Vec::new(),
            bytes: 0,
            added: 0,
        }
    }

    /// Adds the next user record if the call still has room for it
    /// (whatever the packing); false when the call is full.
    pub fn add(&mut self, key: &str, data: &Bytes) -> bool {
        let size = key.len() * 2 + data.len() + RECORD_OVERHEAD + AGGREGATE_OVERHEAD;
        // Each record may start a Kinesis record, plain or aggregated.
        let records = self.done.len() + self.open.len();
        if self.added > 0
            && (self.bytes + size > MAX_BYTES_PER_PUT || records >= MAX_RECORDS_PER_PUT)
        {
            return false;
        }
        let index = self.added;
        self.added += 1;
        // The aggregate's own overhead counts once, when it starts.
        self.bytes += size - AGGREGATE_OVERHEAD;
        let shard = self.map.shard_of(key);
        if !self.open.contains_key(shard) {
            self.bytes += AGGREGATE_OVERHEAD;
        }
        let group = self.open.entry(shard).or_insert_with(|| Group {
            aggregator: Aggregator::new(MAX_AGGREGATE_BYTES),
            members: Vec::new(),
            first: (key.to_owned(), data.clone()),
        });
        match group.aggregator.add(key, data) {
            Ok(None) => group.members.push(index),
            Ok(Some(full)) => {
                self.bytes += AGGREGATE_OVERHEAD;
                let full_members = std::mem::replace(&mut group.members, vec![index]);
                group.first = (key.to_owned(), data.clone());
                self.done
                    .push(packed(full.partition_key, full.data, full_members, shard));
            }
            // Too large for any aggregate: put on its own, after the
            // shard's records added before it.
            Err(_) => {
                let earlier = self
                    .open
                    .remove(shard)
                    .and_then(|group| group.packed(shard));
                self.done.extend(earlier);
                self.done.push(Packed {
                    record: (key.to_owned(), data.clone()),
                    members: vec![index],
                    shard: None,
                });
            }
        }
        true
    }

    /// The call's Kinesis records.
    pub fn finish(mut self) -> Vec<Packed> {
        let mut open: Vec<(&str, Group)> = self.open.drain().collect();
        // In the order of their first user records, for a stable call.
        open.sort_by_key(|(_, group)| group.members.first().copied());
        for (shard, group) in open {
            self.done.extend(group.packed(shard));
        }
        self.done
    }
}

fn packed(partition_key: String, data: Bytes, members: Vec<usize>, shard: &str) -> Packed {
    Packed {
        record: (partition_key, data),
        members,
        shard: Some(shard.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kpl;
    use crate::source::kinesis::MAX_RECORD_BYTES;

    fn shard(id: &str, start: u128, end: u128, open: bool) -> ShardInfo {
        ShardInfo {
            shard_id: id.into(),
            parent_shard_ids: Vec::new(),
            starting_sequence: "0".into(),
            ending_sequence: (!open).then(|| "1".into()),
            starting_hash_key: start,
            ending_hash_key: end,
        }
    }

    /// Four open shards splitting the hash space evenly, and a closed one.
    fn four_shards() -> ShardMap {
        let quarter = u128::MAX / 4 + 1;
        let mut shards: Vec<ShardInfo> = (0..4u128)
            .map(|i| {
                let end = if i == 3 {
                    u128::MAX
                } else {
                    (i + 1) * quarter - 1
                };
                shard(&format!("shardId-{i}"), i * quarter, end, true)
            })
            .collect();
        shards.push(shard("shardId-closed", 0, u128::MAX, false));
        ShardMap::new(&shards).unwrap()
    }

    #[test]
    fn a_key_maps_to_the_open_shard_holding_its_md5() {
        let map = four_shards();
        // MD5("dev-1") = 1a6f..., "c" = 4a8a..., "b" = 92eb..., "dev-3" = e10e...:
        // one in each quarter.
        for (key, expected) in [
            ("dev-1", "shardId-0"),
            ("c", "shardId-1"),
            ("b", "shardId-2"),
            ("dev-3", "shardId-3"),
        ] {
            let hash = u128::from_be_bytes(Md5::digest(key.as_bytes()).into());
            assert_eq!(map.shard_of(key), expected, "{key}: {hash:032x}");
        }
        assert_eq!(ShardMap::new(&[shard("s", 0, u128::MAX, false)]), None);
    }

    #[test]
    fn a_call_is_one_aggregate_per_shard_in_order_and_every_record_is_in_one() {
        let map = four_shards();
        let records: Vec<(String, Bytes)> = (0..1_000)
            .map(|i| {
                (
                    format!("dev-{}", i % 37),
                    Bytes::from(format!(r#"{{"i":{i}}}"#)),
                )
            })
            .collect();
        let mut packer = CallPacker::new(&map);
        for (key, data) in &records {
            assert!(packer.add(key, data));
        }
        let packed = packer.finish();
        assert!(packed.len() <= 4, "{} Kinesis records", packed.len());
        let mut seen: Vec<usize> = Vec::new();
        for kinesis_record in &packed {
            let shard = kinesis_record.shard.as_deref().unwrap();
            assert_eq!(map.shard_of(&kinesis_record.record.0), shard);
            let users = kpl::deaggregate(&kinesis_record.record.1).unwrap();
            assert_eq!(users.len(), kinesis_record.members.len());
            for (user, &index) in users.iter().zip(&kinesis_record.members) {
                assert_eq!(user.partition_key, records[index].0);
                assert_eq!(user.data, records[index].1);
                assert_eq!(map.shard_of(&user.partition_key), shard);
            }
            assert!(kinesis_record.members.is_sorted(), "order kept");
            seen.extend(&kinesis_record.members);
        }
        seen.sort();
        assert_eq!(seen, (0..records.len()).collect::<Vec<_>>());
    }

    #[test]
    fn a_call_stays_within_the_put_limits_and_large_records_go_plain() {
        let map = four_shards();
        let mut packer = CallPacker::new(&map);
        let big = Bytes::from(vec![b'x'; MAX_RECORD_BYTES - 10]);
        assert!(packer.add("dev-1", &big), "the first record always fits");
        let small = Bytes::from(vec![b'y'; 10_000]);
        let mut added = 1;
        while packer.add(&format!("dev-{added}"), &small) {
            added += 1;
        }
        let packed = packer.finish();
        let bytes: usize = packed
            .iter()
            .map(|p| p.record.0.len() + p.record.1.len())
            .sum();
        assert!(bytes <= MAX_BYTES_PER_PUT, "{bytes} bytes in one call");
        assert!(
            bytes > MAX_BYTES_PER_PUT - 300_000,
            "the call was filled: {bytes}"
        );
        assert!(
            packed
                .iter()
                .all(|p| p.record.0.len() + p.record.1.len() <= MAX_RECORD_BYTES)
        );
        assert!(
            packed
                .iter()
                .filter(|p| p.shard.is_some())
                .all(|p| p.record.0.len() + p.record.1.len() <= MAX_AGGREGATE_BYTES),
            "aggregates stay within the KPL's size"
        );
        let big_one = packed.iter().find(|p| p.members == [0]).unwrap();
        assert_eq!(big_one.shard, None, "the near-1 MiB record is put plain");
        assert_eq!(packed.iter().map(|p| p.members.len()).sum::<usize>(), added);
    }

    #[test]
    fn a_record_alone_in_its_shard_goes_plain_and_a_large_one_keeps_its_place() {
        let map = four_shards();
        let mut packer = CallPacker::new(&map);
        // "dev-1" and "dev-2" share shard 0; "c" is alone in shard 1.
        let small = Bytes::from_static(b"{}");
        let big = Bytes::from(vec![b'x'; MAX_RECORD_BYTES - 10]);
        for (key, data) in [
            ("dev-1", &small),
            ("c", &small),
            ("dev-2", &big),
            ("dev-1", &small),
        ] {
            assert!(packer.add(key, data));
        }
        let packed = packer.finish();
        let summary: Vec<(&str, Vec<usize>, bool)> = packed
            .iter()
            .map(|p| (p.record.0.as_str(), p.members.clone(), p.shard.is_some()))
            .collect();
        assert_eq!(
            summary,
            [
                // dev-1's first record, plain, before the large one of its shard.
                ("dev-1", vec![0], false),
                ("dev-2", vec![2], false),
                ("c", vec![1], false),
                ("dev-1", vec![3], false),
            ]
        );
        assert_eq!(
            packed[0].record.1, small,
            "a plain record is the record itself"
        );
    }

    #[test]
    fn small_readings_fill_most_of_a_call() {
        let map = four_shards();
        let mut packer = CallPacker::new(&map);
        let reading = Bytes::from(vec![b'x'; 150]);
        let mut added = 0;
        while packer.add(&format!("dev-{}", added % 10_000), &reading) {
            added += 1;
        }
        let packed = packer.finish();
        let bytes: usize = packed
            .iter()
            .map(|p| p.record.0.len() + p.record.1.len())
            .sum();
        assert!(bytes <= MAX_BYTES_PER_PUT, "{bytes} bytes in one call");
        assert!(
            bytes >= MAX_BYTES_PER_PUT * 3 / 4,
            "{added} readings in {bytes} bytes: the bound wastes a quarter of the call"
        );
    }

    #[test]
    fn a_call_holds_at_most_500_kinesis_records() {
        // More shards than a call has room for: one aggregate each.
        let shards: Vec<ShardInfo> = (0..1_000u128)
            .map(|i| {
                shard(
                    &format!("s{i}"),
                    i << 118,
                    ((i + 1) << 118).wrapping_sub(1),
                    true,
                )
            })
            .collect();
        let map = ShardMap::new(&shards).unwrap();
        let mut packer = CallPacker::new(&map);
        let mut added = 0;
        while packer.add(&format!("dev-{added}"), &Bytes::from_static(b"{}")) {
            added += 1;
        }
        let packed = packer.finish();
        assert!(packed.len() <= MAX_RECORDS_PER_PUT);
        assert_eq!(packed.iter().map(|p| p.members.len()).sum::<usize>(), added);
    }
}
