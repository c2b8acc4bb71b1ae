//! What a shard task hands to its writer: one GetRecords worth of records, decoded.

use bytes::Bytes;

use crate::decode::{DecodeError, Decoder, Micros, Reading, TimeWindow};
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

/// One record, decoded or with the reason it could not be.
#[derive(Debug)]
pub struct Item {
    pub sequence_number: String,
    /// The raw bytes, kept for a dead letter.
    pub raw: Bytes,
    pub decoded: Result<Reading, DecodeError>,
}

/// Decodes `records` in order, refusing readings outside `window` around
/// `now`. Pure CPU work, done on the shard's task so that shards decode in
/// parallel.
pub fn decode_records(
    decoder: &mut Decoder,
    window: TimeWindow,
    now: Micros,
    records: Vec<Record>,
) -> Vec<Item> {
    records
        .into_iter()
        .map(|record| Item {
            decoded: decoder
                .decode(&record.data, record.arrival_micros)
                .and_then(|reading| window.check(reading.time, now).map(|()| reading)),
            sequence_number: record.sequence_number,
            raw: record.data,
        })
        .collect()
}
