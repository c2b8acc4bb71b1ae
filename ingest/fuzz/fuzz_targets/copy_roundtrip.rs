//! The binary COPY encoder's round trip: records (split on 0xFF, a byte no
//! JSON holds) are decoded and encoded as the sink does it, into a shard's
//! segment (samples, events, dead letters); the tuples are then read back
//! with postgres-types, the Rust driver's implementation of PostgreSQL's
//! binary receive formats, and must hold exactly what was encoded. Each
//! record's own slice of the tuples (what a refused batch is split into)
//! must read back alone too.
#![no_main]

use std::time::SystemTime;

use bytes::Bytes;
use ingest::batch::segment::{SealedSegment, Segment};
use ingest::batch::series::{SeriesCache, SeriesKey};
use ingest::decode::{DecodeLimits, Decoder, Reading};
use libfuzzer_sys::fuzz_target;
use postgres_types::{FromSql, Type};

const ARRIVAL: i64 = 1_763_900_000_123_000;
const STREAM: &str = "telemetry";

/// A row as read back, one value per column.
#[derive(Debug, PartialEq)]
enum Column {
    Time(i64),
    Int4(i32),
    Int8(Option<i64>),
    Float8(u64),
    Text(String),
    Bytea(Vec<u8>),
    Jsonb(serde_json::Value),
}

fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::new(DecodeLimits::default());
    let mut cache = SeriesCache::with_capacity(1024);
    let mut segment = Segment::new("shardId-000000000001", 7);
    let mut expected = [Vec::new(), Vec::new(), Vec::new()];
    let mut next_id = 1;
    for (i, raw) in data.split(|&b| b == 0xff).take(64).enumerate() {
        let sequence = format!("4959{i:020}");
        let sub_sequence = (i % 3 == 1).then_some(i as i64);
        match decoder.decode(raw, ARRIVAL) {
            Ok(reading) => {
                for sample in &reading.samples {
                    if cache
                        .lookup(&reading.house, &reading.device, &sample.metric)
                        .is_none()
                    {
                        let key = SeriesKey {
                            house: reading.house.clone(),
                            device: reading.device.clone(),
                            metric: sample.metric.clone(),
                        };
                        cache.insert(&key, next_id);
                        next_id += 1;
                    }
                }
                segment
                    .add_reading(&reading, &mut cache)
                    .expect("every series is cached");
                expect_reading(&reading, &mut cache, &mut expected);
            }
            Err(err) => {
                segment.add_dead_letter(STREAM, &sequence, sub_sequence, &err, raw);
                expected[2].push(vec![
                    Column::Text(STREAM.into()),
                    Column::Text("shardId-000000000001".into()),
                    Column::Text(sequence.clone()),
                    Column::Int8(sub_sequence),
                    Column::Text(err.kind().into()),
                    Column::Text(err.to_string()),
                    Column::Bytea(raw.to_vec()),
                ]);
            }
        }
        segment.advance(&sequence, sub_sequence, true, &Bytes::copy_from_slice(raw));
    }
    let sealed = segment.seal();
    let columns = [
        &[Type::TIMESTAMPTZ, Type::INT4, Type::FLOAT8][..],
        &[
            Type::TIMESTAMPTZ,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::JSONB,
        ][..],
        &[
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::INT8,
            Type::TEXT,
            Type::TEXT,
            Type::BYTEA,
        ][..],
    ];
    let tables = [&sealed.samples, &sealed.events, &sealed.dead_letters];
    for ((tuples, types), expected) in tables.into_iter().zip(columns).zip(&expected) {
        assert_eq!(&read_copy(tuples, types), expected);
    }
    assert_eq!(
        sealed.rows,
        (expected[0].len(), expected[1].len(), expected[2].len())
    );
    check_record_slices(&sealed, columns);
});

/// The rows `reading` should have become.
fn expect_reading(
    reading: &Reading,
    cache: &mut SeriesCache,
    expected: &mut [Vec<Vec<Column>>; 3],
) {
    for sample in &reading.samples {
        let id = cache
            .get(&reading.house, &reading.device, &sample.metric)
            .expect("cached");
        expected[0].push(vec![
            Column::Time(reading.time),
            Column::Int4(id),
            Column::Float8(sample.value.to_bits()),
        ]);
    }
    for event in &reading.events {
        let body = serde_json::from_str(&event.body)
            .unwrap_or_else(|err| panic!("event body {:?} is not JSON: {err}", event.body));
        expected[1].push(vec![
            Column::Time(reading.time),
            Column::Text(reading.house.clone()),
            Column::Text(reading.device.clone()),
            Column::Text(event.kind.clone()),
            Column::Jsonb(body),
        ]);
    }
}

/// Each record's slice of the tuples reads back as that record's rows, and
/// the slices together are the whole.
fn check_record_slices(sealed: &SealedSegment, columns: [&[Type]; 3]) {
    let mut rows = (0, 0, 0);
    for i in 0..sealed.marks.len() {
        let one = sealed.tuples(i..i + 1);
        let tables = [&one.samples, &one.events, &one.dead_letters];
        let counts: Vec<usize> = tables
            .iter()
            .zip(columns)
            .map(|(tuples, types)| read_copy(tuples, types).len())
            .collect();
        assert_eq!((counts[0], counts[1], counts[2]), one.rows);
        rows = (
            rows.0 + one.rows.0,
            rows.1 + one.rows.1,
            rows.2 + one.rows.2,
        );
    }
    assert_eq!(rows, sealed.rows);
    let all = sealed.tuples(0..sealed.marks.len());
    assert_eq!(all.samples, sealed.samples);
    assert_eq!(all.events, sealed.events);
    assert_eq!(all.dead_letters, sealed.dead_letters);
}

/// Reads a COPY stream's tuples (header and trailer added here, as the sink
/// adds them), each field with postgres-types' binary decoding of its type.
fn read_copy(tuples: &[u8], types: &[Type]) -> Vec<Vec<Column>> {
    let mut stream = ingest::batch::copy::HEADER.to_vec();
    stream.extend_from_slice(tuples);
    stream.extend_from_slice(ingest::batch::copy::TRAILER);
    let mut rest = &stream[ingest::batch::copy::HEADER.len()..];
    let mut take = |n: usize| -> &[u8] {
        assert!(rest.len() >= n, "the COPY stream ends inside a tuple");
        let (head, tail) = rest.split_at(n);
        rest = tail;
        head
    };
    let mut rows = Vec::new();
    loop {
        let fields = i16::from_be_bytes(take(2).try_into().unwrap());
        if fields == -1 {
            break;
        }
        assert_eq!(
            usize::try_from(fields).ok(),
            Some(types.len()),
            "a tuple's field count"
        );
        let mut row = Vec::new();
        for ty in types {
            let len = i32::from_be_bytes(take(4).try_into().unwrap());
            let raw = (len >= 0).then(|| take(len as usize));
            row.push(column(ty, raw));
        }
        rows.push(row);
    }
    assert!(rest.is_empty(), "bytes after the trailer");
    rows
}

fn column(ty: &Type, raw: Option<&[u8]>) -> Column {
    fn read<'a, T: FromSql<'a>>(ty: &Type, raw: Option<&'a [u8]>) -> T {
        T::from_sql_nullable(ty, raw)
            .unwrap_or_else(|err| panic!("a {ty} field does not read back: {err}"))
    }
    match *ty {
        Type::TIMESTAMPTZ => {
            let time: SystemTime = read(ty, raw);
            let micros = match time.duration_since(SystemTime::UNIX_EPOCH) {
                Ok(after) => after.as_micros() as i64,
                Err(before) => -(before.duration().as_micros() as i64),
            };
            Column::Time(micros)
        }
        Type::INT4 => Column::Int4(read(ty, raw)),
        Type::INT8 => Column::Int8(read(ty, raw)),
        Type::FLOAT8 => Column::Float8(read::<f64>(ty, raw).to_bits()),
        Type::TEXT => Column::Text(read(ty, raw)),
        Type::BYTEA => Column::Bytea(read(ty, raw)),
        Type::JSONB => Column::Jsonb(read(ty, raw)),
        _ => unreachable!("no column has type {ty}"),
    }
}
