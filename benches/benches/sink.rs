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
//! - `sink/parallel` (printed): a worker with `--writers N` against N raw
//!   binary COPY connections, for N = 1, 2, 4: N write_batch transactions
//!   at once, each on its own connection and its own shards (as a worker
//!   assigns them), against N raw COPYs at once of the same tuples, in
//!   alternating pairs, and the ratio of their medians.
//!
//! Both write [`ROWS`] rows per iteration into the same table of the same
//! database in the same run; before each iteration (not timed) the tables
//! are emptied (a hypertable keeps its chunks, as a running deployment
//! does) and the checkpoints cleared, so every iteration writes into the
//! same state and the table never grows. Needs the local stack's
//! PostgreSQL (DATABASE_URL); without it this panics saying how to start it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use futures_util::SinkExt;
use futures_util::future::join_all;
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
    let Prepared {
        mut client,
        segments,
        mut parallel,
    } = runtime.block_on(prepare());

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
    for (clients, batches) in &mut parallel {
        runtime.block_on(parallel_side_by_side(
            clients,
            batches,
            pairs.min(PARALLEL_PAIRS),
        ));
    }
}

/// Writers compared with as many raw COPY connections.
const WRITERS: [usize; 3] = [1, 2, 4];
/// Pairs for each of them.
const PARALLEL_PAIRS: usize = 11;

/// Runs `pairs` pairs of (N write_batch at once, N raw COPYs at once), one
/// connection and one batch each, and prints the medians and their ratio.
async fn parallel_side_by_side(
    clients: &mut [Client],
    batches: &[Vec<SealedSegment>],
    pairs: usize,
) {
    let writers = clients.len();
    let (mut sink, mut raw) = (Vec::new(), Vec::new());
    for pair in 0..pairs {
        for sink_now in [pair % 2 == 0, pair % 2 == 1] {
            reset(&clients[0]).await;
            let started = Instant::now();
            if sink_now {
                join_all(clients.iter_mut().zip(batches).map(|(c, b)| write(c, b))).await;
                sink.push(started.elapsed());
            } else {
                let rows = join_all(clients.iter().zip(batches).map(|(c, b)| raw_copy(c, b))).await;
                assert_eq!(rows, vec![ROWS as u64; writers]);
                raw.push(started.elapsed());
            }
        }
    }
    let (sink, raw) = (median(sink), median(raw));
    let rate = |took: Duration| (writers * ROWS) as f64 / took.as_secs_f64();
    println!(
        "sink/parallel          {writers} writers, {pairs} pairs, medians: write_batch x{writers} {:.0} rows/s \
         ({sink:.1?}), raw_copy x{writers} {:.0} rows/s ({raw:.1?}), ratio {:.3}",
        rate(sink),
        rate(raw),
        rate(sink) / rate(raw),
    );
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

/// What the benchmarks write with: a connection and one batch of [`ROWS`]
/// rows over the four shards; and for each of [`WRITERS`], that many
/// connections with a batch of [`ROWS`] rows each, over shards of its own.
struct Prepared {
    client: Client,
    segments: Vec<SealedSegment>,
    parallel: Vec<(Vec<Client>, Vec<Vec<SealedSegment>>)>,
}

/// A fresh migrated database `bench_sink` with the records' series and four
/// leases held by [`OWNER`], and the batches, encoded by the consumer's own
/// code. Checks once that both ways of writing store every row.
async fn prepare() -> Prepared {
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
    let segments = encode(0, &shard_ids, base_ms, &mut cache);
    reset(&client).await;
    write(&mut client, &segments).await;
    assert_eq!(stored(&client).await, (ROWS as i64, SHARDS as i64));
    reset(&client).await;
    assert_eq!(raw_copy(&client, &segments).await, ROWS as u64);
    assert_eq!(stored(&client).await, (ROWS as i64, 0));

    // Writer k of N writes shards k, k + N, ...; records of its own.
    let mut parallel = Vec::new();
    for writers in WRITERS {
        let mut clients = Vec::new();
        let mut batches = Vec::new();
        for writer in 0..writers {
            clients.push(database::connect(&config).await);
            let shards: Vec<String> = shard_ids
                .iter()
                .skip(writer)
                .step_by(writers)
                .cloned()
                .collect();
            batches.push(encode(
                writer * RECORDS_PER_BATCH,
                &shards,
                base_ms,
                &mut cache,
            ));
        }
        parallel.push((clients, batches));
    }
    Prepared {
        client,
        segments,
        parallel,
    }
}

/// Records in a batch of [`ROWS`] rows.
const RECORDS_PER_BATCH: usize = ROWS / records::METRICS.len();

/// A batch of records `first..` (one per [`RECORDS_PER_BATCH`]), record i
/// into `shards[i % shards.len()]`, sealed.
fn encode(
    first: usize,
    shards: &[String],
    base_ms: i64,
    cache: &mut SeriesCache,
) -> Vec<SealedSegment> {
    let mut decoder = Decoder::default();
    let mut segments: Vec<Segment> = shards.iter().map(|id| Segment::new(id, 1)).collect();
    for i in first..first + RECORDS_PER_BATCH {
        let raw = Bytes::from(records::canonical(i, base_ms));
        let reading = decoder
            .decode(&raw, base_ms * 1_000)
            .expect("generated records decode");
        let segment = &mut segments[i % shards.len()];
        segment
            .add_reading(&reading, cache)
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
    segments
}

/// Empties the tables the batch writes to and clears the checkpoints, so
/// that the next write starts from the same state as every other.
async fn reset(client: &Client) {
    database::empty_tables(client).await;
    client
        .batch_execute("UPDATE ingest.shard_leases SET checkpoint = NULL")
        .await
        .unwrap_or_else(|error| {
            panic!("clearing the checkpoints: {}", ingest::db::describe(&error))
        });
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
