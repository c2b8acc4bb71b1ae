//! What each storage path must do with real data, on all three paths
//! (timescaledb, partman, native), and what only TimescaleDB does
//! (compression, the continuous aggregate's refresh, background jobs).
//!
//! Test names carry their storage, so `dev/test` can leave out the
//! TimescaleDB ones, saying so, on a stack without TimescaleDB. Run alone,
//! a TimescaleDB test on such a stack fails saying how to get it.

use std::time::Duration;

use bytes::Bytes;
use tokio_postgres::Client;

use tests::consumer::{ConsumerProcess, create_stream, record, wait_for_count};
use tests::{TestDb, base_ts, now_ms, run_ingest, text};

/// Generous bound for a test's records to land; a bound, not a speed target.
const LAND_WITHIN: Duration = Duration::from_secs(90);
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

/// Runs one scenario on each storage path, as `<scenario>::<storage>`.
macro_rules! on_every_storage {
    ($scenario:ident) => {
        mod $scenario {
            #[tokio::test(flavor = "multi_thread")]
            async fn timescaledb() {
                super::$scenario("timescaledb").await;
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn partman() {
                super::$scenario("partman").await;
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn native() {
                super::$scenario("native").await;
            }
        }
    };
}

/// A database of its own, migrated by the real `ingest migrate` onto
/// `storage` with extra flags.
async fn migrated(test_name: &str, storage: &str, flags: &[&str]) -> TestDb {
    let db = TestDb::create(&format!("{test_name}_{storage}")).await;
    let mut args = vec!["migrate", "--database-url", &db.url, "--storage", storage];
    args.extend_from_slice(flags);
    let output = run_ingest(&args, &[]);
    let (stdout, stderr) = text(&output);
    assert!(
        output.status.success(),
        "ingest migrate --storage {storage} failed (TimescaleDB comes with `dev/stack up` \
         when INGEST_TIMESCALEDB_SOURCE names its source; see the README): {stdout}{stderr}"
    );
    db
}

/// The (text, count) rows of `sql`.
async fn counts(client: &Client, sql: &str) -> Vec<(String, i64)> {
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|error| panic!("{sql}: {}", ingest::db::describe(&error)))
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Buckets where `telemetry.samples_1h` differs from the hourly aggregation
/// of `telemetry.samples` itself (missing on either side, or other values).
async fn aggregate_mismatches(client: &Client) -> Vec<String> {
    client
        .query(
            "WITH truth AS (
                 SELECT date_bin('1 hour', time, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket,
                        series_id, avg(value) AS avg, min(value) AS min, max(value) AS max,
                        count(*) AS count
                 FROM telemetry.samples GROUP BY 1, 2
             )
             SELECT coalesce(t.bucket, a.bucket)::text || ' series ' || coalesce(t.series_id, a.series_id)
                    || ': samples say ' || coalesce(t.count::text || ' rows avg ' || t.avg, 'nothing')
                    || ', samples_1h says ' || coalesce(a.count::text || ' rows avg ' || a.avg, 'nothing')
             FROM truth t FULL JOIN telemetry.samples_1h a USING (bucket, series_id)
             WHERE t.count IS DISTINCT FROM a.count OR t.min IS DISTINCT FROM a.min
                OR t.max IS DISTINCT FROM a.max OR abs(t.avg - a.avg) > 1e-9 * greatest(1, abs(t.avg))
                OR a.avg IS NULL OR t.avg IS NULL
             ORDER BY 1 LIMIT 20",
            &[],
        )
        .await
        .expect("samples_1h and samples are readable")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Runs the TimescaleDB policy job `proc_name` now, in this session. The
/// database's own scheduler starts the same job soon after the migration, so
/// its schedule is paused first, and a run it already started is waited out:
/// a second refresh of the same window is refused while one is running, and
/// a compression that finds its chunk compressed under it by the
/// scheduler's run fails ("already compressed"). Run again, the job finds
/// its work done; a failure of its own repeats until the deadline.
async fn run_job(client: &Client, proc_name: &str, table: &str) {
    let job: i32 = client
        .query_one(
            "SELECT job_id FROM timescaledb_information.jobs
             WHERE proc_name = $1 AND hypertable_name = $2",
            &[&proc_name, &table],
        )
        .await
        .unwrap_or_else(|error| panic!("no {proc_name} job on {table}: {error}"))
        .get(0);
    client
        .execute("SELECT alter_job($1, scheduled => false)", &[&job])
        .await
        .unwrap_or_else(|error| panic!("pausing {proc_name} ({job}): {error}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let error = match client.batch_execute(&format!("CALL run_job({job})")).await {
            Ok(()) => return,
            Err(error) => ingest::db::describe(&error),
        };
        let scheduler_run_in_progress =
            error.contains("concurrent refresh") || error.contains("columnstore policy failure");
        if !scheduler_run_in_progress || std::time::Instant::now() > deadline {
            panic!("{proc_name} ({job}) failed: {error}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Brings `samples_1h` up to date the way production does: on TimescaleDB
/// its refresh policy runs; on the plain paths the insert trigger already
/// did it.
async fn refresh_aggregate(client: &Client, storage: &str) {
    if storage == "timescaledb" {
        run_job(client, "policy_refresh_continuous_aggregate", "samples_1h").await;
    }
}

// ---------------------------------------------------------------------------

on_every_storage!(hostile_values_and_times_become_dead_letters);

/// Readings that would overflow the hourly aggregates (two 1e308 in one
/// hour), and readings outside the accepted window, arrive in one shard
/// among good ones: every good one lands once, each bad one is a dead letter
/// with its reason, the worker keeps running, and the aggregate stays
/// readable and exact. The window comes from the retention (40 days, less the
/// 2-hour margin) and a day ahead; readings 10 minutes inside each edge land,
/// 10 minutes outside do not.
async fn hostile_values_and_times_become_dead_letters(storage: &str) {
    let db = migrated("storage_hostile", storage, &["--retention", "40 days"]).await;
    let client = db.client().await;
    let (stream, source) = create_stream(&format!("hostile-{storage}"), 1).await;

    let now = now_ms();
    let oldest = now - 40 * DAY_MS + 2 * HOUR_MS;
    let newest = now + DAY_MS;
    let edge = |ts: i64| record("edge", ts, 1.0);
    let huge = |ts: i64| {
        let json = format!(r#"{{"device":"huge","house":"h","ts":{ts},"fields":{{"v":1e308}}}}"#);
        ("huge".to_string(), Bytes::from(json))
    };
    let mut put = Vec::new();
    let mut good = 0;
    for i in 0..200 {
        put.push(record("good", base_ts() + i, (i + 1) as f64));
        good += 1;
        match i {
            50 => put.push(huge(base_ts() + 1_000)),
            51 => put.push(huge(base_ts() + 2_000)),
            100 => put.push(edge(oldest + 10 * 60_000)),
            101 => put.push(edge(oldest - 10 * 60_000)),
            150 => put.push(edge(newest - 10 * 60_000)),
            151 => put.push(edge(newest + 10 * 60_000)),
            _ => {}
        }
    }
    source.put_records(&put).await.unwrap();
    let mut worker = ConsumerProcess::start(&db.url, &stream, "w1", &[]);

    let expected_rows = good + 2;
    assert_eq!(
        wait_for_count(
            &client,
            "SELECT count(*) FROM telemetry.samples",
            expected_rows,
            LAND_WITHIN
        )
        .await,
        expected_rows
    );
    assert_eq!(
        wait_for_count(
            &client,
            "SELECT count(*) FROM ingest.dead_letters",
            4,
            LAND_WITHIN
        )
        .await,
        4
    );
    assert_eq!(
        counts(
            &client,
            "SELECT reason_kind, count(*) FROM ingest.dead_letters GROUP BY 1 ORDER BY 1"
        )
        .await,
        [
            ("outside_time_window".to_string(), 2),
            ("value_out_of_range".to_string(), 2)
        ]
    );
    let reasons: Vec<String> = client
        .query(
            "SELECT reason FROM ingest.dead_letters ORDER BY sequence_number::numeric",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        reasons[0].contains("\"v\" is 1e308"),
        "the reason names the field and value: {reasons:?}"
    );
    assert!(
        reasons[2].contains("outside the accepted window"),
        "{reasons:?}"
    );
    assert_eq!(
        counts(
            &client,
            "SELECT device, count(*) FROM telemetry.samples_named GROUP BY 1 ORDER BY 1"
        )
        .await,
        [("edge".to_string(), 2), ("good".to_string(), good)]
    );
    assert!(worker.is_running(), "hostile input stopped the worker");

    refresh_aggregate(&client, storage).await;
    assert_eq!(aggregate_mismatches(&client).await, Vec::<String>::new());
    db.drop().await;
}

on_every_storage!(samples_1h_is_exact_for_rows_days_late);

/// Rows for the last hours, the aggregate brought up to date, then rows from
/// five days ago (an outage, a replay) and from 2 hours ago: after the next
/// refresh, `samples_1h` equals the hourly aggregation of `samples` for
/// every bucket.
async fn samples_1h_is_exact_for_rows_days_late(storage: &str) {
    let db = migrated("storage_late_rows", storage, &[]).await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO telemetry.series (house, device, metric) VALUES ('h', 'd1', 'v'), ('h', 'd2', 'v');
             INSERT INTO telemetry.samples
             SELECT now() - make_interval(mins => g * 7), 1 + g % 2, g FROM generate_series(1, 60) g;",
        )
        .await
        .unwrap();
    refresh_aggregate(&client, storage).await;
    assert_eq!(aggregate_mismatches(&client).await, Vec::<String>::new());

    client
        .batch_execute(
            "INSERT INTO telemetry.samples
             SELECT now() - interval '5 days' - make_interval(mins => g * 6), 1 + g % 2, -g
             FROM generate_series(1, 100) g;
             INSERT INTO telemetry.samples
             SELECT now() - interval '2 hours' - make_interval(secs => g), 1, 1000 + g
             FROM generate_series(1, 10) g;",
        )
        .await
        .unwrap();
    refresh_aggregate(&client, storage).await;
    assert_eq!(aggregate_mismatches(&client).await, Vec::<String>::new());
    let late_buckets: i64 = client
        .query_one(
            "SELECT count(*) FROM telemetry.samples_1h WHERE bucket < now() - interval '4 days'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        late_buckets >= 10,
        "only {late_buckets} buckets of the late rows"
    );
    db.drop().await;
}

on_every_storage!(resolving_known_series_again_burns_no_ids);

/// A cold cache (a restart, a new writer) resolves series that exist: no
/// identity value is taken, so the 32-bit `series_id` cannot run out by
/// restarts.
async fn resolving_known_series_again_burns_no_ids(storage: &str) {
    let db = migrated("storage_series_ids", storage, &[]).await;
    let client = db.client().await;
    let keys: Vec<ingest::batch::SeriesKey> = (0..500)
        .map(|i| ingest::batch::SeriesKey {
            house: "h".into(),
            device: format!("d{}", i / 5),
            metric: format!("m{}", i % 5),
        })
        .collect();
    let last_value = || async {
        client
            .query_one(
                "SELECT coalesce(last_value, 0) FROM pg_sequences
                 WHERE schemaname = 'telemetry' AND sequencename = 'series_series_id_seq'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let mut first = ingest::batch::SeriesCache::default();
    ingest::sink::postgres::resolve_series(&client, &keys, &mut first)
        .await
        .unwrap();
    assert_eq!(last_value().await, 500, "500 new series take 500 ids");
    for _ in 0..3 {
        let mut cold = ingest::batch::SeriesCache::default();
        ingest::sink::postgres::resolve_series(&client, &keys, &mut cold)
            .await
            .unwrap();
        for key in &keys {
            assert_eq!(
                cold.get(&key.house, &key.device, &key.metric),
                first.get(&key.house, &key.device, &key.metric),
                "{key:?} resolved to another id"
            );
        }
    }
    assert_eq!(
        last_value().await,
        500,
        "re-resolving burned identity values"
    );
    db.drop().await;
}

// ---------------------------------------------------------------------------
// TimescaleDB only

/// With compression after a day and the policy run, chunks older than that
/// are compressed; `samples_named` returns exactly the values written; late
/// rows the real consumer COPYs into a compressed chunk land exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn timescaledb_compressed_chunks_keep_values_and_take_late_rows() {
    let db = migrated(
        "storage_compression",
        "timescaledb",
        &["--compress-after", "1 day"],
    )
    .await;
    let client = db.client().await;
    let (stream, source) = create_stream("compression", 1).await;
    // Three days ago: well past the compression age, inside every window.
    let start = base_ts() - DAY_MS;
    let first: Vec<(String, Bytes)> = (0..300)
        .map(|i| record(&format!("c{}", i % 3), start + i * 1_000, i as f64 + 0.25))
        .collect();
    source.put_records(&first).await.unwrap();
    let mut worker = ConsumerProcess::start(&db.url, &stream, "w1", &[]);
    assert_eq!(
        wait_for_count(
            &client,
            "SELECT count(*) FROM telemetry.samples",
            300,
            LAND_WITHIN
        )
        .await,
        300
    );

    run_job(&client, "policy_compression", "samples").await;
    let (chunks, compressed): (i64, i64) = {
        let row = client
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE is_compressed)
                 FROM timescaledb_information.chunks WHERE hypertable_name = 'samples'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(
        compressed >= 1 && compressed == chunks,
        "{compressed} of {chunks} chunks compressed"
    );

    // Late rows into the compressed chunk, through the consumer's COPY.
    let late: Vec<(String, Bytes)> = (0..300)
        .map(|i| record(&format!("c{}", i % 3), start + 500 + i * 1_000, -(i as f64)))
        .collect();
    source.put_records(&late).await.unwrap();
    assert_eq!(
        wait_for_count(
            &client,
            "SELECT count(*) FROM telemetry.samples",
            600,
            LAND_WITHIN
        )
        .await,
        600
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stored: Vec<(String, i64, f64)> = client
        .query(
            "SELECT device, (extract(epoch FROM time) * 1000)::bigint, value
             FROM telemetry.samples_named ORDER BY 2, 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let mut expected: Vec<(String, i64, f64)> = first
        .iter()
        .chain(&late)
        .map(|(device, data)| {
            let json: serde_json::Value = serde_json::from_slice(data).unwrap();
            (
                device.clone(),
                json["ts"].as_i64().unwrap(),
                json["fields"]["v"].as_f64().unwrap(),
            )
        })
        .collect();
    expected.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    assert_eq!(stored, expected, "exactly the values written, each once");
    assert!(worker.is_running());
    db.drop().await;
}

/// The background scheduler itself (not a call in this session) runs the
/// compression, retention and refresh jobs, and each succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn timescaledb_background_jobs_succeed() {
    let db = migrated("storage_jobs", "timescaledb", &["--retention", "30 days"]).await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO telemetry.series (device, metric) VALUES ('d', 'v');
             INSERT INTO telemetry.samples
             SELECT now() - make_interval(hours => g), 1, g FROM generate_series(1, 24 * 10) g;
             SELECT alter_job(job_id, next_start => now())
             FROM timescaledb_information.jobs WHERE hypertable_schema = 'telemetry';",
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let states = loop {
        let states: Vec<(String, String, Option<String>)> = client
            .query(
                "SELECT j.proc_name, j.hypertable_name::text, s.last_run_status
                 FROM timescaledb_information.jobs j
                 JOIN timescaledb_information.job_stats s USING (job_id)
                 WHERE j.hypertable_schema = 'telemetry' ORDER BY 1, 2",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect();
        let finished = states.len() == 4 && states.iter().all(|(_, _, status)| status.is_some());
        if finished || std::time::Instant::now() > deadline {
            break states;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let success = |proc: &str, table: &str| {
        (
            proc.to_string(),
            table.to_string(),
            Some("Success".to_string()),
        )
    };
    assert_eq!(
        states,
        [
            success("policy_compression", "samples"),
            success("policy_refresh_continuous_aggregate", "samples_1h"),
            success("policy_retention", "events"),
            success("policy_retention", "samples"),
        ],
        "the scheduler ran every job (is timescaledb.max_background_workers high enough?)"
    );
    db.drop().await;
}
