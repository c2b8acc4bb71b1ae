//! The record decoder on any bytes: it never panics, an accepted record
//! keeps every promise of the record contract, a refused one has a reason,
//! and decoding again (the decoder reuses its buffers) gives the same answer.
#![no_main]

use ingest::decode::timestamp::{MAX_TIME, MIN_TIME};
use ingest::decode::{DecodeLimits, Decoder, MAX_NAME_BYTES, MAX_SAMPLE_MAGNITUDE};
use libfuzzer_sys::fuzz_target;

/// 2025-11-23: inside the accepted years, so a record without `ts` is kept.
const ARRIVAL: i64 = 1_763_900_000_123_000;

fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::new(DecodeLimits::default());
    let first = decoder.decode(data, ARRIVAL);
    match &first {
        Ok(reading) => {
            assert!(!reading.device.is_empty());
            for id in [&reading.device, &reading.house] {
                assert!(id.len() <= MAX_NAME_BYTES && !id.contains('\0'), "{id:?}");
            }
            assert!(
                (MIN_TIME..MAX_TIME).contains(&reading.time),
                "{}",
                reading.time
            );
            let mut names = Vec::new();
            for sample in &reading.samples {
                assert!(sample.value.is_finite(), "{sample:?}");
                assert!(sample.value.abs() <= MAX_SAMPLE_MAGNITUDE, "{sample:?}");
                names.push(sample.metric.as_str());
            }
            for event in &reading.events {
                serde_json::from_str::<serde_json::Value>(&event.body)
                    .unwrap_or_else(|err| panic!("event body {:?} is not JSON: {err}", event.body));
                names.push(event.kind.as_str());
            }
            for name in &names {
                assert!(
                    !name.is_empty() && name.len() <= MAX_NAME_BYTES && !name.contains('\0'),
                    "{name:?}"
                );
            }
            names.sort_unstable();
            let count = names.len();
            names.dedup();
            assert_eq!(count, names.len(), "one record gave one field twice");
        }
        Err(err) => {
            assert!(!err.kind().is_empty());
            assert!(!err.to_string().is_empty());
        }
    }
    let again = decoder.decode(data, ARRIVAL);
    assert_eq!(
        format!("{first:?}"),
        format!("{again:?}"),
        "a second decode of the same bytes differs"
    );
});
