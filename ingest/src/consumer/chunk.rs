//! What a shard task hands to its writer: one GetRecords worth of records,
//! decoded, KPL aggregates taken apart into their user records.

use bytes::Bytes;

use crate::decode::{DecodeError, Decoder, Micros, Reading, TimeWindow};
use crate::kpl;
use crate::source::kinesis::Record;

/// Records of one shard, in sequence order, read under one lease.
#[derive(Debug)]
pub struct Chunk {
    pub shard_id: String,
    /// The lease counter they were read under; the writer fences with it.
    pub lease_counter: i64,
    pub items: Vec<Item>,
    /// The shard was read to its end: after these items there are no more.
    pub end_of_shard: bool,
    /// How far behind the shard's tip this read was, when Kinesis said.
    pub millis_behind_latest: Option<i64>,
}

/// One record (or one user record of a KPL aggregate), decoded or with the
/// reason it could not be.
#[derive(Debug)]
pub struct Item {
    pub sequence_number: String,
    /// The user record's place in its aggregate; None for a plain record
    /// and for an aggregate refused whole.
    pub sub_sequence: Option<i64>,
    /// The last item of its Kinesis record: after it the record is done.
    pub ends_record: bool,
    /// The raw bytes, kept for a dead letter.
    pub raw: Bytes,
    pub decoded: Result<Reading, DecodeError>,
}

impl Item {
    /// The checkpoint's sub-sequence once this item is committed: None when
    /// its Kinesis record is done whole.
    pub fn checkpoint_sub(&self) -> Option<i64> {
        if self.ends_record {
            None
        } else {
            self.sub_sequence
        }
    }
}

/// User records already committed by an earlier lease: those of the
/// aggregate at `sequence_number` up to `sub_sequence`, to be skipped when
/// the aggregate is read again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub sequence_number: String,
    pub sub_sequence: i64,
}

/// Decodes `records` in order, refusing readings outside `window` around
/// `now`. A KPL aggregate gives one item per user record (skipping those
/// `committed` names); one whose MD5 or protobuf is bad is one dead letter.
/// Pure CPU work, done on the shard's task so that shards decode in parallel.
pub fn decode_records(
    decoder: &mut Decoder,
    window: TimeWindow,
    now: Micros,
    records: Vec<Record>,
    committed: Option<&Committed>,
) -> Vec<Item> {
    let mut items = Vec::with_capacity(records.len());
    for record in records {
        let mut decode = |data: &Bytes| {
            decoder
                .decode(data, record.arrival_micros)
                .and_then(|reading| window.check(reading.time, now).map(|()| reading))
        };
        if !kpl::is_aggregated(&record.data) {
            items.push(Item {
                decoded: decode(&record.data),
                sequence_number: record.sequence_number,
                sub_sequence: None,
                ends_record: true,
                raw: record.data,
            });
            continue;
        }
        let user_records = match kpl::deaggregate(&record.data) {
            Ok(user_records) => user_records,
            Err(error) => {
                items.push(Item {
                    decoded: Err(error.into()),
                    sequence_number: record.sequence_number,
                    sub_sequence: None,
                    ends_record: true,
                    raw: record.data,
                });
                continue;
            }
        };
        let skip_through = committed
            .filter(|c| c.sequence_number == record.sequence_number)
            .map(|c| c.sub_sequence);
        let last = user_records.len() - 1;
        for (sub, user_record) in user_records.into_iter().enumerate() {
            if skip_through.is_some_and(|through| sub as i64 <= through) {
                continue;
            }
            items.push(Item {
                decoded: decode(&user_record.data),
                sequence_number: record.sequence_number.clone(),
                sub_sequence: Some(sub as i64),
                ends_record: sub == last,
                raw: user_record.data,
            });
        }
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::DecodeLimits;

    fn record(sequence: &str, data: Bytes) -> Record {
        Record {
            sequence_number: sequence.into(),
            partition_key: "k".into(),
            data,
            arrival_micros: now(),
        }
    }

    fn now() -> Micros {
        crate::decode::now_micros()
    }

    fn aggregate(bodies: &[&str]) -> Bytes {
        let mut aggregator = kpl::Aggregator::default();
        for body in bodies {
            assert!(aggregator.add("k", body.as_bytes()).unwrap().is_none());
        }
        aggregator.finish().unwrap().data
    }

    /// (sequence, sub, ends_record, checkpoint_sub, dead letter kind)
    type Summary = (String, Option<i64>, bool, Option<i64>, &'static str);

    fn summary(items: &[Item]) -> Vec<Summary> {
        items
            .iter()
            .map(|i| {
                (
                    i.sequence_number.clone(),
                    i.sub_sequence,
                    i.ends_record,
                    i.checkpoint_sub(),
                    i.decoded.as_ref().err().map_or("", DecodeError::kind),
                )
            })
            .collect()
    }

    #[test]
    fn aggregates_become_one_item_per_user_record() {
        let good = r#"{"device":"d","v":1}"#;
        let mut bad = aggregate(&[good]).to_vec();
        let at = bad.len() - 1;
        bad[at] ^= 1;
        let records = vec![
            record("1", Bytes::from_static(br#"{"device":"d","v":0}"#)),
            record("2", aggregate(&[good, "not json", good])),
            record("3", Bytes::from(bad)),
        ];
        let mut decoder = Decoder::new(DecodeLimits::default());
        let items = decode_records(&mut decoder, TimeWindow::default(), now(), records, None);
        let s = |x: &str| x.to_string();
        assert_eq!(
            summary(&items),
            [
                (s("1"), None, true, None, ""),
                (s("2"), Some(0), false, Some(0), ""),
                (s("2"), Some(1), false, Some(1), "invalid_json"),
                (s("2"), Some(2), true, None, ""),
                (s("3"), None, true, None, "bad_aggregate"),
            ]
        );
        assert_eq!(&items[2].raw[..], b"not json", "the user record's bytes");
    }

    #[test]
    fn committed_user_records_are_skipped_only_in_their_aggregate() {
        let body = r#"{"device":"d","v":1}"#;
        let records = vec![
            record("5", aggregate(&[body, body, body])),
            record("6", aggregate(&[body, body])),
        ];
        let committed = Committed {
            sequence_number: "5".into(),
            sub_sequence: 1,
        };
        let mut decoder = Decoder::new(DecodeLimits::default());
        let items = decode_records(
            &mut decoder,
            TimeWindow::default(),
            now(),
            records,
            Some(&committed),
        );
        let s = |x: &str| x.to_string();
        assert_eq!(
            summary(&items),
            [
                (s("5"), Some(2), true, None, ""),
                (s("6"), Some(0), false, Some(0), ""),
                (s("6"), Some(1), true, None, ""),
            ]
        );
    }
}
