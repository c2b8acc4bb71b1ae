//! Records per second per core on the consumer's CPU path, for a typical
//! record (four numeric fields, canonical and flat form):
//!
//! - `decode/<form>`: `Decoder::decode` alone.
//! - `decode_add_reading/<form>`: decode, then `Segment::add_reading` with a
//!   warm `SeriesCache`: the record as binary COPY tuples.
//! - `consumer_path/<form>`: what a shard task and its writer do with one
//!   GetRecords result: `decode_records`, `missing_series` (none missing),
//!   `add_reading` and `advance` per record, then `seal`.
//!
//! Criterion runs on one thread, so these are per core. Each iteration
//! handles [`RECORDS`] distinct records (1,000 devices, varying times and
//! values) into a new segment, as a batch would.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

use benches::records::{self, METRICS};
use ingest::batch::{Segment, SeriesCache, missing_series};
use ingest::consumer::decode_records;
use ingest::decode::{Decoder, TimeWindow};
use ingest::source::kinesis::Record;

/// Records per iteration: one full GetRecords result.
const RECORDS: usize = 10_000;

/// The records' first time, 2025-11-23T12:13:20.000Z, and their arrival time.
const BASE_MS: i64 = 1_763_900_000_000;
const ARRIVAL_MICROS: i64 = BASE_MS * 1_000;

type Form = (&'static str, fn(usize, i64) -> Vec<u8>);
const FORMS: [Form; 2] = [("canonical", records::canonical), ("flat", records::flat)];

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    group
        .throughput(Throughput::Elements(RECORDS as u64))
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    for (form, make) in FORMS {
        let raw = generate(form, make);
        let bytes: usize = raw.iter().map(Vec::len).sum();
        eprintln!(
            "{form}: {RECORDS} records per iteration, {} bytes each on average, e.g. {}",
            bytes / RECORDS,
            String::from_utf8_lossy(&raw[42])
        );
        group.bench_function(BenchmarkId::from_parameter(form), |b| {
            let mut decoder = Decoder::default();
            b.iter(|| {
                for record in &raw {
                    let _ = black_box(decoder.decode(black_box(record), ARRIVAL_MICROS));
                }
            });
        });
    }
    group.finish();
}

fn decode_add_reading(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_add_reading");
    group
        .throughput(Throughput::Elements(RECORDS as u64))
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    for (form, make) in FORMS {
        let raw = generate(form, make);
        group.bench_function(BenchmarkId::from_parameter(form), |b| {
            let mut decoder = Decoder::default();
            let mut cache = warm_cache();
            b.iter(|| {
                let mut segment = Segment::new("shardId-000000000000", 1);
                for record in &raw {
                    let reading = decoder
                        .decode(black_box(record), ARRIVAL_MICROS)
                        .expect("checked when generated");
                    segment
                        .add_reading(&reading, &mut cache)
                        .expect("the cache is warm");
                }
                black_box(segment.seal())
            });
        });
    }
    group.finish();
}

fn consumer_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("consumer_path");
    group
        .throughput(Throughput::Elements(RECORDS as u64))
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    for (form, make) in FORMS {
        // As the source hands them over: a sequence number of Kinesis' 56
        // digits, the partition key, the bytes, the arrival time.
        let fetched: Vec<Record> = generate(form, make)
            .into_iter()
            .enumerate()
            .map(|(i, data)| Record {
                sequence_number: format!("{:056}", 49_600_000_000_000_000_000u128 + i as u128),
                partition_key: records::device(i),
                data: Bytes::from(data),
                arrival_micros: ARRIVAL_MICROS,
            })
            .collect();
        group.bench_function(BenchmarkId::from_parameter(form), |b| {
            let mut decoder = Decoder::default();
            let mut cache = warm_cache();
            b.iter_batched(
                || fetched.clone(),
                |fetched| {
                    // Read as they arrive: the accepted window is checked too.
                    let items = decode_records(
                        &mut decoder,
                        TimeWindow::default(),
                        ARRIVAL_MICROS,
                        fetched,
                        None,
                    );
                    let readings = items.iter().filter_map(|item| item.decoded.as_ref().ok());
                    assert!(missing_series(readings, &mut cache).is_empty());
                    let mut segment = Segment::new("shardId-000000000000", 1);
                    for item in &items {
                        let reading = item.decoded.as_ref().expect("checked when generated");
                        segment
                            .add_reading(reading, &mut cache)
                            .expect("the cache is warm");
                        segment.advance(&item.sequence_number, None, true, &item.raw);
                    }
                    black_box(segment.seal())
                },
                BatchSize::LargeInput,
            );
        });
    }
    group.finish();
}

/// [`RECORDS`] records of one form, each checked to decode to four samples
/// so that no benchmark measures an error path.
fn generate(form: &str, make: fn(usize, i64) -> Vec<u8>) -> Vec<Vec<u8>> {
    let raw: Vec<Vec<u8>> = (0..RECORDS).map(|i| make(i, BASE_MS)).collect();
    let mut decoder = Decoder::default();
    for record in &raw {
        let reading = decoder
            .decode(record, ARRIVAL_MICROS)
            .unwrap_or_else(|e| panic!("a generated {form} record does not decode: {e}"));
        assert_eq!(reading.samples.len(), METRICS.len());
    }
    raw
}

/// A cache that knows every series the records name, as a worker's does
/// after its first batches.
fn warm_cache() -> SeriesCache {
    let mut cache = SeriesCache::default();
    for (id, key) in records::series_keys().iter().enumerate() {
        cache.insert(key, i32::try_from(id).expect("few series") + 1);
    }
    cache
}

criterion_group!(benches, decode, decode_add_reading, consumer_path);
criterion_main!(benches);
