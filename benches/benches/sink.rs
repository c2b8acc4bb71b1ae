//! Rows per second into `telemetry.samples` of a migrated database:
//!
//! - `sink/write_batch`: the consumer's write path, `write_batch` with
//!   sealed segments of four shards: the fenced checkpoint update and the
//!   binary COPY in one transaction.
//! - `sink/raw_copy`: the same pre-encoded tuples, with the same header and
//!   trailer, sent by tokio-postgres `copy_in` in one autocommit COPY: no
//!   transaction block, no checkpoint. The ceiling the sink is held to.
//!
//! - `sink/side_by_side` (printed, not a criterion benchmark): [`PAIRS`]
//!   pairs of the two, run alternately, and the ratio of their medians;
//!   and the time of a write_batch without rows: the sink's cost per batch
//!   above the COPY.
//!
//! Both write [`ROWS`] rows per iteration into the same table of the same
//! database in the same run; before each iteration (not timed) the tables
//! are truncated and the checkpoints cleared, so every iteration writes into
//! the same state and the table never grows. Needs the local stack's
//! PostgreSQL (DATABASE_URL); without it this panics saying how to start it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use futures_util::SinkExt;
use tokio_postgres::Client;

use benches::{database, records};
use ingest::batch::{SealedSegment, Segment, SeriesCache, copy};
use ingest::decode::Decoder;
use ingest::sink::postgres::{Outcome, resolve_series, write_batch};

/// Rows per batch: the consumer's default `--batch-rows`.
const ROWS: usize = 50_000;
/// Shards in the batch, one segment each.
const SHARDS: usize = 4;
/// The lease table's stream and owner the checkpoints are fenced with.
const STREAM: &str = "bench";
const OWNER: &str = "bench-worker";

const COPY_SAMPLES: &str =
    "COPY telemetry.samples (time, series_id, value) FROM STDIN (FORMAT binary)";

fn sink(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let (mut client, segments) = runtime.block_on(prepare());

    let mut group = c.benchmark_group("sink");
    group
        .throughput(Throughput::Elements(ROWS as u64))
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10));
    group.bench_function("write_batch", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let mut took = Duration::ZERO;
                for _ in 0..iters {
                    reset(&client).await;
                    let started = Instant::now();
                    write(&mut client, &segments).await;
                    took += started.elapsed();
                }
                took
            })
        });
    });
    group.bench_function("raw_copy", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let mut took = Duration::ZERO;
                for _ in 0..iters {
                    reset(&client).await;
                    let started = Instant::now();
                    let rows = raw_copy(&client, &segments).await;
                    took += started.elapsed();
                    assert_eq!(rows, ROWS as u64);
                }
                took
            })
        });
    });
    group.finish();

    // Criterion measures the two one after the other, ten seconds each; on a
    // small shared machine a checkpoint or another process can fall into one
    // and not the other. Pairs run side by side see the same conditions.
    let pairs = if std::env::args().any(|arg| arg == "--bench") {
        PAIRS
    } else {
        1 // `cargo test`: a smoke test.
    };
    runtime.block_on(side_by_side(&mut client, &segments, pairs));
}

/// Pairs of (write_batch, raw_copy) for the side-by-side ratio.
const PAIRS: usize = 15;

/// Runs `pairs` pairs of write_batch and raw_copy, alternating which goes
/// first, and prints the median rows per second of each and their ratio;
/// then the median time of a write_batch of the same segments without their
/// rows (BEGIN, checkpoint update, COMMIT): the sink's cost per batch above
/// the COPY, commit included.
async fn side_by_side(client: &mut Client, segments: &[SealedSegment], pairs: usize) {
    let (mut sink, mut raw, mut empty) = (Vec::new(), Vec::new(), Vec::new());
    let no_rows: Vec<SealedSegment> = segments
        .iter()
        .map(|segment| SealedSegment {
            rows: (0, 0, 0),
            samples: Bytes::new(),
            ..segment.clone()
        })
        .collect();
    for pair in 0..pairs {
        for sink_now in [pair % 2 == 0, pair % 2 == 1] {
            reset(client).await;
            let started = Instant::now();
            if sink_now {
                write(client, segments).await;
                sink.push(started.elapsed());
            } else {
                assert_eq!(raw_copy(client, segments).await, ROWS as u64);
                raw.push(started.elapsed());
            }
        }
        reset(client).await;
        let started = Instant::now();
        write(client, &no_rows).await;
        empty.push(started.elapsed());
    }
    let (sink, raw, empty) = (median(sink), median(raw), median(empty));
    let rate = |took: Duration| ROWS as f64 / took.as_secs_f64();
    println!(
        "sink/side_by_side      {pairs} pairs, medians: write_batch {:.0} rows/s ({sink:.1?}), \
         raw_copy {:.0} rows/s ({raw:.1?}), ratio {:.3}; \
         write_batch without rows {empty:.2?}",
        rate(sink),
        rate(raw),
        rate(sink) / rate(raw),
    );
}

/// write_batch, which must commit.
async fn write(client: &mut Client, segments: &[SealedSegment]) {
    let outcome = write_batch(client, STREAM, OWNER, segments)
        .await
        .unwrap_or_else(|error| panic!("write_batch: {error}"));
    assert_eq!(outcome, Outcome::Committed);
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// A fresh migrated database `bench_sink` with the records' series and four
/// leases held by [`OWNER`]; returns a connection to it and one batch of
/// [`ROWS`] sample rows, encoded by the consumer's own code. Checks once
/// that both ways of writing store every row.
async fn prepare() -> (Client, Vec<SealedSegment>) {
    let config = database::fresh("bench_sink").await;
    let mut client = database::connect(&config).await;
    let mut cache = SeriesCache::default();
    resolve_series(&client, &records::series_keys(), &mut cache)
        .await
        .unwrap_or_else(|error| panic!("creating the series: {error}"));
    let shard_ids: Vec<String> = (0..SHARDS).map(|n| format!("shardId-{n:012}")).collect();
    client
        .execute(
            "INSERT INTO ingest.shard_leases (stream, shard_id, owner, lease_counter, expires_at)
             SELECT $1, shard_id, $2, 1, now() + interval '1 day' FROM unnest($3::text[]) AS shard_id",
            &[&STREAM, &OWNER, &shard_ids],
        )
        .await
        .unwrap_or_else(|error| panic!("creating the leases: {}", ingest::db::describe(&error)));

    // Records of the last minute, so that rows land in real partitions.
    let base_ms = records::now_ms() - 60_000;
    let mut decoder = Decoder::default();
    let mut segments: Vec<Segment> = shard_ids.iter().map(|id| Segment::new(id, 1)).collect();
    for i in 0..ROWS / records::METRICS.len() {
        let raw = Bytes::from(records::canonical(i, base_ms));
        let reading = decoder
            .decode(&raw, base_ms * 1_000)
            .expect("generated records decode");
        let segment = &mut segments[i % SHARDS];
        segment
            .add_reading(&reading, &mut cache)
            .expect("every series was resolved");
        segment.advance(
            &format!("{:056}", 49_600_000_000u64 + i as u64),
            None,
            true,
            &raw,
        );
    }
    let segments: Vec<SealedSegment> = segments.into_iter().map(Segment::seal).collect();
    assert_eq!(segments.iter().map(|s| s.rows.0).sum::<usize>(), ROWS);

    reset(&client).await;
    write(&mut client, &segments).await;
    assert_eq!(stored(&client).await, (ROWS as i64, SHARDS as i64));
    reset(&client).await;
    assert_eq!(raw_copy(&client, &segments).await, ROWS as u64);
    assert_eq!(stored(&client).await, (ROWS as i64, 0));
    (client, segments)
}

/// Empties the tables the batch writes to and clears the checkpoints, so
/// that the next write starts from the same state as every other. Then a
/// CHECKPOINT: each batch writes about 12 MB of WAL, so with the stack's
/// max_wal_size (1 GB) the server would checkpoint every eighty batches or
/// so, in the middle of some timed writes and not others.
async fn reset(client: &Client) {
    client
        .batch_execute(
            "TRUNCATE telemetry.samples, telemetry.events, ingest.dead_letters;
             -- The plain paths' rollup; TimescaleDB's aggregate is only
             -- materialized by its refresh, which the benchmark never runs.
             DO $$ BEGIN
                 IF to_regclass('telemetry.samples_1h_state') IS NOT NULL THEN
                     TRUNCATE telemetry.samples_1h_state;
                 END IF;
             END $$;
             UPDATE ingest.shard_leases SET checkpoint = NULL;
             CHECKPOINT",
        )
        .await
        .unwrap_or_else(|error| panic!("resetting the tables: {}", ingest::db::describe(&error)));
}

/// One binary COPY of the segments' sample tuples, framed as write_batch
/// frames them: the header, each segment's buffer, the trailer. Returns
/// the rows the server says it copied.
async fn raw_copy(client: &Client, segments: &[SealedSegment]) -> u64 {
    try_raw_copy(client, segments)
        .await
        .unwrap_or_else(|error| panic!("raw COPY: {}", ingest::db::describe(&error)))
}

async fn try_raw_copy(
    client: &Client,
    segments: &[SealedSegment],
) -> Result<u64, tokio_postgres::Error> {
    let sink = client.copy_in::<_, Bytes>(COPY_SAMPLES).await?;
    futures_util::pin_mut!(sink);
    sink.feed(copy::header()).await?;
    for segment in segments {
        sink.feed(segment.samples.clone()).await?;
    }
    sink.feed(copy::trailer()).await?;
    sink.finish().await
}

/// Sample rows stored, and shards whose checkpoint is set.
async fn stored(client: &Client) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM telemetry.samples),
                    (SELECT count(*) FROM ingest.shard_leases WHERE checkpoint IS NOT NULL)",
            &[],
        )
        .await
        .unwrap_or_else(|error| panic!("counting rows: {}", ingest::db::describe(&error)));
    (row.get(0), row.get(1))
}

criterion_group!(benches, sink);
criterion_main!(benches);
