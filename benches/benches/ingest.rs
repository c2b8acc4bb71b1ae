//! Ingest throughput end to end: the whole consumer, `ingest::consumer::run`
//! as `ingest consume` runs it (leases, GetRecords over HTTP through the AWS
//! SDK, decode, batches, binary COPY and checkpoints, two writers), reading
//! [`SHARDS`] shards of pre-generated records from a Kinesis stand-in that
//! serves them from memory ([`benches::kinesis`]) into the stack's database.
//!
//! - `ingest/consume`: every record of the stream read and committed, from
//!   the consumer's start to the last shard's checkpoint at its last record.
//! - `ingest/raw_copy`: the same rows, encoded beforehand by the consumer's
//!   own code, sent in COPYs of the consumer's batch size (50,000 rows), on
//!   as many connections at once as the consumer has writers: the ceiling.
//! - `ingest/side_by_side` (printed): [`PAIRS`] pairs of the two, run
//!   alternately, the ratio of their medians, and the consumer's CPU time
//!   per million records (the process's, less the stand-in's thread).
//!
//! Every run reads a stream of a new name (fresh leases, from TRIM_HORIZON)
//! into emptied tables. Needs the local stack's PostgreSQL (DATABASE_URL)
//! and an AWS region and credentials in the environment (`dev/stack env`
//! sets both); without them this panics saying how to start the stack.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use futures_util::SinkExt;
use futures_util::future::join_all;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use benches::database::{self, START_HINT};
use benches::kinesis::{self, StandIn};
use benches::records;
use ingest::batch::{FlushPolicy, Segment, SeriesCache, copy};
use ingest::config::DatabaseConfig;
use ingest::consumer::ConsumerConfig;
use ingest::decode::{DecodeLimits, Decoder};
use ingest::observe::Readiness;
use ingest::sink::postgres::resolve_series;
use ingest::source::kinesis::{ReaderOptions, StartPosition};

/// Shards of the stream.
const SHARDS: usize = 4;
/// Records in each shard; each record is four rows.
const RECORDS_PER_SHARD: usize = 100_000;
const RECORDS: usize = SHARDS * RECORDS_PER_SHARD;
const ROWS: usize = RECORDS * records::METRICS.len();
/// The consumer's writers (its default `--writers`), and the raw COPYs at once.
const WRITERS: usize = 2;
/// Pairs for the side-by-side ratio.
const PAIRS: usize = 15;

const COPY_SAMPLES: &str =
    "COPY telemetry.samples (time, series_id, value) FROM STDIN (FORMAT binary)";

struct Bench {
    config: DatabaseConfig,
    client: Client,
    stand_in: StandIn,
    /// Per raw COPY connection: its share of the rows, encoded, in COPYs
    /// of the consumer's batch size.
    raw: Vec<(Client, Vec<Bytes>)>,
    /// Streams read so far (each run reads a new one).
    runs: AtomicUsize,
}

fn ingest(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let bench = runtime.block_on(prepare());

    let mut group = c.benchmark_group("ingest");
    group
        .throughput(Throughput::Elements(RECORDS as u64))
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(30));
    group.bench_function("consume", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let mut took = Duration::ZERO;
                for _ in 0..iters {
                    took += consume(&bench).await.0;
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
                    took += raw_copy(&bench).await;
                }
                took
            })
        });
    });
    group.finish();

    let pairs = if std::env::args().any(|arg| arg == "--bench") {
        PAIRS
    } else {
        1 // `cargo test`: a smoke test.
    };
    runtime.block_on(side_by_side(&bench, pairs));
}

/// Runs `pairs` pairs of consume and raw_copy, alternating which goes
/// first, and prints the medians, their ratio and the consumer's CPU.
async fn side_by_side(bench: &Bench, pairs: usize) {
    let (mut consumed, mut raw, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    for pair in 0..pairs {
        for consume_now in [pair % 2 == 0, pair % 2 == 1] {
            if consume_now {
                let (took, used) = consume(bench).await;
                consumed.push(took);
                cpu.push(used);
            } else {
                raw.push(raw_copy(bench).await);
            }
        }
    }
    let (consumed, raw, cpu) = (median(consumed), median(raw), median(cpu));
    let rows = |took: Duration| ROWS as f64 / took.as_secs_f64();
    println!(
        "ingest/side_by_side    {pairs} pairs, {SHARDS} shards, {RECORDS} records, {ROWS} rows, \
         medians: consume {:.0} records/s = {:.0} rows/s ({consumed:.2?}), \
         raw_copy x{WRITERS} {:.0} rows/s ({raw:.2?}), ratio {:.3}; \
         consumer CPU {:.2} s per million records ({:.0}% of the run)",
        RECORDS as f64 / consumed.as_secs_f64(),
        rows(consumed),
        rows(raw),
        rows(consumed) / rows(raw),
        cpu.as_secs_f64() * 1e6 / RECORDS as f64,
        100.0 * cpu.as_secs_f64() / consumed.as_secs_f64(),
    );
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// One whole run of the consumer over a stream of a new name: from its
/// start until every shard's checkpoint is at the shard's last record.
/// Returns the time and the consumer's CPU time (the process's, less the
/// stand-in's thread).
async fn consume(bench: &Bench) -> (Duration, Duration) {
    database::empty_tables(&bench.client).await;
    let run = bench.runs.fetch_add(1, Ordering::Relaxed);
    let stream = format!("bench-{run}");
    let shutdown = CancellationToken::new();
    let (cpu_before, stand_in_before) = (kinesis::process_cpu(), bench.stand_in.cpu());
    let started = Instant::now();
    let consumer = tokio::spawn(ingest::consumer::run(
        consumer_config(&bench.config, &bench.stand_in, &stream),
        shutdown.clone(),
        Arc::new(Readiness::default()),
    ));
    let deadline = started + Duration::from_secs(600);
    while !all_read(&bench.client, &stream, &bench.stand_in.last_sequences).await {
        assert!(
            Instant::now() < deadline,
            "the consumer did not read {stream} within 600 s"
        );
        if consumer.is_finished() {
            match consumer.await {
                Ok(Err(error)) => panic!("the consumer stopped: {error}; {START_HINT}"),
                other => panic!("the consumer stopped: {other:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    let used = (kinesis::process_cpu() - cpu_before)
        .saturating_sub(bench.stand_in.cpu() - stand_in_before);
    shutdown.cancel();
    consumer
        .await
        .expect("the consumer's task")
        .unwrap_or_else(|error| panic!("the consumer stopped with {error}"));
    let rows: i64 = bench
        .client
        .query_one("SELECT count(*) FROM telemetry.samples", &[])
        .await
        .expect("counting rows")
        .get(0);
    assert_eq!(rows, ROWS as i64, "rows after reading {stream}");
    (took, used)
}

/// Whether every shard of `stream` is checkpointed at its last record.
async fn all_read(client: &Client, stream: &str, last: &[String]) -> bool {
    let rows = client
        .query(
            "SELECT shard_id, checkpoint FROM ingest.shard_leases
             WHERE stream IN (SELECT lease_key FROM ingest.streams WHERE name = $1)",
            &[&stream],
        )
        .await
        .unwrap_or_else(|error| panic!("reading the leases: {}", ingest::db::describe(&error)));
    let at_end = rows
        .iter()
        .filter(|row| {
            let shard: String = row.get(0);
            let checkpoint: Option<String> = row.get(1);
            (0..SHARDS)
                .any(|i| kinesis::shard_id(i) == shard && checkpoint.as_ref() == Some(&last[i]))
        })
        .count();
    at_end == SHARDS
}

/// `ingest consume`'s defaults, reading `stream` from the stand-in.
fn consumer_config(database: &DatabaseConfig, stand_in: &StandIn, stream: &str) -> ConsumerConfig {
    ConsumerConfig {
        fanout_consumer: None,
        stream: stream.to_owned(),
        kinesis_endpoint: Some(stand_in.url.clone()),
        worker_id: format!("{stream}-worker"),
        database: database.clone(),
        start: StartPosition::TrimHorizon,
        flush: FlushPolicy::default(),
        writers: WRITERS,
        queue_chunks: 8,
        reader: ReaderOptions::default(),
        series_cache_size: ingest::batch::series::DEFAULT_CAPACITY,
        max_new_series_per_device: Some(1_000),
        decode: DecodeLimits::default(),
        max_row_age: None,
        max_row_ahead: Duration::from_secs(86_400),
        lease_ttl: Duration::from_secs(10),
        lease_interval: Duration::from_secs(2),
        shard_sync_interval: Duration::from_secs(30),
        maintenance_interval: Duration::from_secs(600),
        shutdown_grace: Duration::from_secs(20),
        metrics_addr: None,
        archive_delivery_stream: None,
    }
}

/// The same rows by [`WRITERS`] raw binary COPYs at once, into emptied tables.
async fn raw_copy(bench: &Bench) -> Duration {
    database::empty_tables(&bench.client).await;
    let started = Instant::now();
    let copied = join_all(
        bench
            .raw
            .iter()
            .map(|(client, tuples)| copy_all(client, tuples)),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(copied.iter().sum::<u64>(), ROWS as u64);
    took
}

/// One COPY after the other, on one connection.
async fn copy_all(client: &Client, copies: &[Bytes]) -> u64 {
    let mut rows = 0;
    for tuples in copies {
        let result: Result<u64, tokio_postgres::Error> = async {
            let sink = client.copy_in::<_, Bytes>(COPY_SAMPLES).await?;
            futures_util::pin_mut!(sink);
            sink.feed(copy::header()).await?;
            sink.feed(tuples.clone()).await?;
            sink.feed(copy::trailer()).await?;
            sink.finish().await
        }
        .await;
        rows += result.unwrap_or_else(|error| panic!("raw COPY: {}", ingest::db::describe(&error)));
    }
    rows
}

/// A fresh database `bench_ingest` with the records' series, the stand-in
/// serving the records (record i in shard i % SHARDS, so each device keeps
/// one shard), and the raw COPYs' tuples, encoded by the consumer's code.
async fn prepare() -> Bench {
    let config = database::fresh("bench_ingest").await;
    let client = database::connect(&config).await;
    let mut cache = SeriesCache::default();
    resolve_series(&client, &records::series_keys(), &mut cache)
        .await
        .unwrap_or_else(|error| panic!("creating the series: {error}"));

    // Records of the last minutes, inside the accepted window.
    let base_ms = records::now_ms() - 600_000;
    let mut shards: Vec<Vec<(String, Vec<u8>)>> = (0..SHARDS)
        .map(|_| Vec::with_capacity(RECORDS_PER_SHARD))
        .collect();
    let mut decoder = Decoder::default();
    // Connection w copies records i with i % WRITERS == w, a COPY per
    // batch of the consumer's size.
    let batch_records = FlushPolicy::default().max_rows / records::METRICS.len();
    let mut raw: Vec<Vec<Segment>> = (0..WRITERS).map(|_| Vec::new()).collect();
    for i in 0..RECORDS {
        let data = records::canonical(i, base_ms);
        let reading = decoder
            .decode(&data, base_ms * 1_000)
            .expect("generated records decode");
        let copies = &mut raw[i % WRITERS];
        if (i / WRITERS).is_multiple_of(batch_records) {
            copies.push(Segment::new(&kinesis::shard_id(i % WRITERS), 1));
        }
        copies
            .last_mut()
            .expect("a segment")
            .add_reading(&reading, &mut cache)
            .expect("every series was resolved");
        shards[i % SHARDS].push((records::device(i), data));
    }
    let mut connections = Vec::new();
    for copies in raw {
        let copies = copies.into_iter().map(|s| s.seal().samples).collect();
        connections.push((database::connect(&config).await, copies));
    }
    Bench {
        stand_in: StandIn::start(shards),
        config,
        client,
        raw: connections,
        runs: AtomicUsize::new(0),
    }
}

criterion_group!(benches, ingest);
criterion_main!(benches);
