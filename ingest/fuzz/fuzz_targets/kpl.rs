//! KPL aggregates: taking any bytes apart never panics and never yields an
//! empty aggregate; and what the gateway's `Aggregator` packs, the
//! de-aggregator gives back exactly, in order, each aggregate within its
//! size limit (data and partition key, as Kinesis counts a record).
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use ingest::kpl::{self, Aggregator};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Records {
    /// The aggregate limit: from 64 bytes up, small enough that inputs fill several.
    max_bytes: u16,
    records: Vec<(String, Vec<u8>)>,
}

fuzz_target!(|data: &[u8]| {
    let raw = Bytes::copy_from_slice(data);
    if let Ok(records) = kpl::deaggregate(&raw) {
        assert!(!records.is_empty());
    }

    let Ok(input) = Records::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let max_bytes = 64 + usize::from(input.max_bytes);
    let mut aggregator = Aggregator::new(max_bytes);
    let mut packed = Vec::new();
    let mut expected = Vec::new();
    for (key, data) in &input.records {
        match aggregator.add(key, data) {
            Ok(full) => {
                packed.extend(full);
                expected.push((key, data));
            }
            Err(too_large) => assert!(too_large.size >= key.len() + data.len()),
        }
    }
    packed.extend(aggregator.finish());
    assert!(aggregator.is_empty());

    let mut unpacked = Vec::new();
    for aggregate in &packed {
        assert!(
            aggregate.data.len() + aggregate.partition_key.len() <= max_bytes,
            "an aggregate of {} bytes over the {max_bytes}-byte limit",
            aggregate.data.len() + aggregate.partition_key.len()
        );
        let records = kpl::deaggregate(&aggregate.data)
            .unwrap_or_else(|err| panic!("an aggregate made here does not come apart: {err}"));
        assert_eq!(records.len(), aggregate.records);
        assert_eq!(records[0].partition_key, aggregate.partition_key);
        unpacked.extend(records);
    }
    assert_eq!(unpacked.len(), expected.len());
    for (record, (key, data)) in unpacked.iter().zip(expected) {
        assert_eq!(&record.partition_key, key);
        assert_eq!(&record.data[..], &data[..]);
    }
});
