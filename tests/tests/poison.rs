//! Records the database refuses, and devices that invent series, end to end
//! through the real `ingest consume`: no poison pill stops a worker, every
//! good record lands once, every refused one is a dead letter with the
//! reason, and the series cache stays within its bounds.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_postgres::Client;

use tests::consumer::{
    ConsumerProcess, create_stream, expected_per_device, per_device, records, wait_for_count,
};
use tests::{TestDb, base_ts, run_ingest, stdio};

/// Generous bound for a test's records to land; a bound, not a speed target.
const LAND_WITHIN: Duration = Duration::from_secs(120);
const SAMPLES: &str = "SELECT count(*) FROM telemetry.samples";
const DEAD_LETTERS: &str = "SELECT count(*) FROM ingest.dead_letters";

/// A database migrated by the real `ingest migrate` with `--storage native`:
/// its hourly aggregate is kept by a trigger on every insert, so an overflow
/// there refuses the insert.
async fn native_db(test_name: &str) -> TestDb {
    let db = TestDb::create(test_name).await;
    let output = run_ingest(
        &["migrate", "--database-url", &db.url, "--storage", "native"],
        &[],
    );
    assert!(output.status.success(), "{}", stdio(&output));
    db
}

/// Makes the database refuse two kinds of record, as a real one may:
/// - device `overflow`'s field `v` in the hour of `base_ts()`: its hourly
///   count is at the bigint maximum, so one more sample overflows it
///   (SQLSTATE 22003, raised by the aggregate's trigger);
/// - any event whose body is `"poison"`: a check constraint (SQLSTATE 23514).
async fn make_the_database_refuse(client: &Client) {
    client
        .batch_execute(&format!(
            "ALTER TABLE telemetry.events ADD CONSTRAINT no_poison CHECK (body <> '\"poison\"'::jsonb);
             INSERT INTO telemetry.series (house, device, metric) VALUES ('h', 'overflow', 'v');
             INSERT INTO telemetry.samples_1h_state (bucket, series_id, count, sum, min, max)
             SELECT date_bin('1 hour', to_timestamp({ts} / 1000.0), TIMESTAMPTZ '2000-01-01 00:00:00+00'),
                    series_id, 9223372036854775807, 0, 0, 0
             FROM telemetry.series WHERE device = 'overflow'",
            ts = base_ts()
        ))
        .await
        .expect("the test's constraint and aggregate row");
}

/// The records of the poison tests: `good` from `records()` (values 1, 2,
/// 3..., so sums show a lost or doubled one), with three the database
/// refuses among them; returns (all, good, refused).
type Put = Vec<(String, Bytes)>;
fn poisoned_records() -> (Put, Put, Put) {
    let good = records(4, 300, base_ts());
    let refused: Put = vec![
        // Two samples, one of which overflows: the whole record is refused.
        (
            "overflow".into(),
            Bytes::from(format!(
                r#"{{"device":"overflow","house":"h","ts":{},"fields":{{"w":5,"v":1}}}}"#,
                base_ts() + 10
            )),
        ),
        // A sample and an event the constraint rejects.
        (
            "poisoner".into(),
            Bytes::from(format!(
                r#"{{"device":"poisoner","house":"h","ts":{},"fields":{{"v":7,"state":"poison"}}}}"#,
                base_ts() + 20
            )),
        ),
        (
            "overflow".into(),
            Bytes::from(format!(
                r#"{{"device":"overflow","house":"h","ts":{},"fields":{{"v":2}}}}"#,
                base_ts() + 30
            )),
        ),
    ];
    let mut all = good.clone();
    // Spread through the good ones: first, in the middle, last.
    all.insert(0, refused[0].clone());
    all.insert(150, refused[1].clone());
    all.push(refused[2].clone());
    (all, good, refused)
}

/// Dead letters: (reason_kind, reason, raw), in sequence order.
async fn dead_letters(client: &Client) -> Vec<(String, String, Vec<u8>)> {
    client
        .query(
            "SELECT reason_kind, reason, raw FROM ingest.dead_letters ORDER BY sequence_number::numeric",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Checks that exactly the good records landed and each refused record is
/// one dead letter carrying the database's reason.
async fn assert_refused_as_dead_letters(client: &Client, good: &Put, refused: &Put) {
    assert_eq!(
        wait_for_count(client, DEAD_LETTERS, refused.len() as i64, LAND_WITHIN).await,
        refused.len() as i64,
        "dead letters"
    );
    assert_eq!(
        wait_for_count(client, SAMPLES, good.len() as i64, LAND_WITHIN).await,
        good.len() as i64,
        "samples"
    );
    // Anything doubled would show after a pause.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(per_device(client).await, expected_per_device(good));
    let events: i64 = client
        .query_one("SELECT count(*) FROM telemetry.events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(events, 0, "the refused record's event");
    let letters = dead_letters(client).await;
    assert_eq!(letters.len(), refused.len(), "dead letters after a pause");
    // Matched by their raw bytes: the shards' sequence numbers do not say
    // in which order the records were put.
    let expected_reasons = ["bigint out of range", "no_poison", "bigint out of range"];
    for ((_, put), expected) in refused.iter().zip(expected_reasons) {
        let (kind, reason, _) = letters
            .iter()
            .find(|(_, _, raw)| raw == &put.to_vec())
            .unwrap_or_else(|| panic!("no dead letter keeps {put:?} whole: {letters:?}"));
        assert_eq!(kind, "database_refused", "{reason}");
        assert!(reason.contains(expected), "{reason:?} names {expected:?}");
        assert!(reason.contains("SQLSTATE"), "{reason}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn records_the_database_refuses_become_dead_letters_and_the_rest_lands_once() {
    let db = native_db("poison_refused").await;
    let client = db.client().await;
    make_the_database_refuse(&client).await;
    // Two shards, one writer: both shards' records share each batch, so the
    // halving crosses from one shard's records to the other's.
    let (stream, source) = create_stream("poison", 2).await;
    let (all, good, refused) = poisoned_records();
    let sequences = source.put_records(&all).await.unwrap();

    let port = tests::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut worker = ConsumerProcess::start(
        &db.url,
        &stream,
        "w1",
        &["--writers", "1", "--metrics-addr", &addr],
    );
    assert_refused_as_dead_letters(&client, &good, &refused).await;

    // Every checkpoint moved past all it read: nothing is read again.
    // The last record put is refused: its shard's checkpoint is past it.
    let last = sequences.last().unwrap();
    let checkpoints: Vec<String> = client
        .query(
            "SELECT checkpoint FROM ingest.shard_leases WHERE stream IN (SELECT lease_key FROM ingest.streams WHERE name = $1) AND checkpoint IS NOT NULL",
            &[&stream],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        checkpoints.contains(last),
        "a checkpoint at the last record put ({last}): {checkpoints:?}"
    );
    let body =
        metrics_once_they_show(port, "ingest_rows_written_total{table=\"samples\"} 300").await;
    for expected in [
        "ingest_dead_letters_total{reason=\"database_refused\"} 3",
        "ingest_rows_written_total{table=\"samples\"} 300",
        "ingest_rows_written_total{table=\"dead_letters\"} 3",
        "ingest_batches_bisected_total",
    ] {
        assert!(
            body.contains(expected),
            "/metrics lacks {expected:?}:\n{body}"
        );
    }
    assert!(worker.is_running(), "a refused record stopped the worker");
    drop(worker);
    source.delete_stream().await.unwrap();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_while_it_bisects_loses_and_doubles_nothing() {
    let db = native_db("poison_killed").await;
    let client = db.client().await;
    make_the_database_refuse(&client).await;
    let (stream, source) = create_stream("poison-kill", 1).await;
    let (all, good, refused) = poisoned_records();
    source.put_records(&all).await.unwrap();

    // Hold the bisecting transaction at its last step, the dead letters of
    // the refused records (a lock on the table stops their COPY), then kill
    // the worker there: its good rows are copied but not committed.
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE ingest.dead_letters IN SHARE MODE")
        .await
        .unwrap();
    let mut first = ConsumerProcess::start(&db.url, &stream, "w1", &[]);
    let waiting = wait_for_count(
        &client,
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'
           AND query LIKE 'COPY ingest.dead_letters%'",
        1,
        LAND_WITHIN,
    )
    .await;
    assert_eq!(waiting, 1, "the bisecting batch waits on its dead letters");
    assert!(first.is_running());
    first.kill();
    lock.rollback().await.unwrap();
    assert_eq!(
        (
            wait_for_count(&client, SAMPLES, 0, Duration::ZERO).await,
            wait_for_count(&client, DEAD_LETTERS, 0, Duration::ZERO).await
        ),
        (0, 0),
        "nothing of the killed batch committed"
    );

    // The next owner takes the lease when it lapses and writes it all once.
    let mut second = ConsumerProcess::start(&db.url, &stream, "w2", &[]);
    assert_refused_as_dead_letters(&client, &good, &refused).await;
    assert!(second.is_running(), "a refused record stopped the worker");
    drop(second);
    source.delete_stream().await.unwrap();
    db.drop().await;
}

/// A record of `device` at `ts` whose field names are `fields` (value 1 each).
fn record_with_fields(device: &str, ts: i64, fields: &[String]) -> (String, Bytes) {
    let members: Vec<String> = fields.iter().map(|f| format!(r#""{f}":1"#)).collect();
    let json = format!(
        r#"{{"device":"{device}","house":"h","ts":{ts},"fields":{{{}}}}}"#,
        members.join(",")
    );
    (device.to_string(), Bytes::from(json))
}

/// The worker's /metrics once they show `line` (counters are updated right
/// after the commit the test saw), or after 10 s.
async fn metrics_once_they_show(port: u16, line: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = tests::http_get(port, "/metrics").expect("/metrics answers");
        assert_eq!(status, 200);
        if body.contains(line) || Instant::now() > deadline {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One value of a Prometheus text exposition, by its full series name.
fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_inventing_series_is_capped_and_the_cache_stays_bounded() {
    // The limit counts per clock hour: do not start just before one turns.
    let seconds_into_hour = (tests::now_ms() / 1000) % 3600;
    if seconds_into_hour > 3540 {
        tokio::time::sleep(Duration::from_secs((3610 - seconds_into_hour) as u64)).await;
    }
    let db = TestDb::migrated("poison_series_limit").await;
    let client = db.client().await;
    let (stream, source) = create_stream("series-limit", 1).await;
    // Twelve well-behaved devices with one field each, and a device that
    // puts a counter into its field names: one new series per record.
    let mut good = records(12, 240, base_ts());
    let mut put = good.clone();
    let inventor = |i: usize| {
        record_with_fields(
            "inventor",
            base_ts() + 1_000 + i as i64,
            &[format!("count_{i}")],
        )
    };
    let inventions: Put = (0..20).map(inventor).collect();
    for (i, record) in inventions.iter().enumerate() {
        put.insert(i * 12, record.clone());
    }
    // A record with two new names after the limit is reached, and one
    // naming only series it already has: that one is not new, so it lands.
    put.push(record_with_fields(
        "inventor",
        base_ts() + 2_000,
        &["count_98".into(), "count_99".into()],
    ));
    put.push(record_with_fields(
        "inventor",
        base_ts() + 2_001,
        &["count_0".into(), "count_1".into()],
    ));
    // The well-behaved devices again, after the cache has had to forget.
    let again = records(12, 24, base_ts() + 10_000);
    put.extend(again.clone());
    good.extend(again);
    source.put_records(&put).await.unwrap();

    let port = tests::free_port();
    let addr = format!("127.0.0.1:{port}");
    // --records-per-call 50: several chunks, so the cache is trimmed between
    // them and lookups after the first chunk can hit.
    let mut worker = ConsumerProcess::start(
        &db.url,
        &stream,
        "w1",
        &[
            "--writers",
            "1",
            "--records-per-call",
            "50",
            "--series-cache-size",
            "8",
            "--max-new-series-per-device",
            "5",
            "--metrics-addr",
            &addr,
        ],
    );
    // 5 inventions land, 15 and the two-name record do not.
    let refused = 15 + 1;
    assert_eq!(
        wait_for_count(&client, DEAD_LETTERS, refused, LAND_WITHIN).await,
        refused,
        "dead letters"
    );
    let rows = good.len() as i64 + 5 + 2;
    assert_eq!(
        wait_for_count(&client, SAMPLES, rows, LAND_WITHIN).await,
        rows,
        "samples"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        wait_for_count(&client, SAMPLES, 0, Duration::ZERO).await,
        rows,
        "samples after a pause"
    );
    let good_only: Vec<(String, i64, f64)> = per_device(&client)
        .await
        .into_iter()
        .filter(|(device, _, _)| device != "inventor")
        .collect();
    assert_eq!(good_only, expected_per_device(&good));

    let series: Vec<String> = client
        .query(
            "SELECT metric FROM telemetry.series WHERE device = 'inventor' ORDER BY metric",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        series,
        ["count_0", "count_1", "count_2", "count_3", "count_4"],
        "the inventor's first five series, and no more"
    );
    let letters = dead_letters(&client).await;
    for (kind, reason, raw) in &letters {
        assert_eq!(kind, "series_limit", "{reason}");
        assert!(
            reason.contains("inventor") && reason.contains("5 new series an hour"),
            "{reason}"
        );
        assert!(String::from_utf8_lossy(raw).contains("\"inventor\""));
    }
    let expected_raw: Vec<Vec<u8>> = inventions[5..]
        .iter()
        .chain(
            put.iter()
                .filter(|(_, raw)| raw.windows(8).any(|w| w == b"count_98")),
        )
        .map(|(_, raw)| raw.to_vec())
        .collect();
    let got_raw: Vec<Vec<u8>> = letters.into_iter().map(|(_, _, raw)| raw).collect();
    assert_eq!(got_raw, expected_raw, "the refused records, in order");

    // The cache holds at most its size; it forgot some, and found others.
    let body = metrics_once_they_show(
        port,
        "ingest_dead_letters_total{reason=\"series_limit\"} 16",
    )
    .await;
    let held = metric(&body, "ingest_series_cache_series{writer=\"0\"}")
        .unwrap_or_else(|| panic!("no cache size in:\n{body}"));
    assert!(held <= 8.0, "the cache holds {held} series, over 8");
    let hits = metric(&body, "ingest_series_cache_lookups_total{result=\"hit\"}").unwrap_or(0.0);
    let misses = metric(&body, "ingest_series_cache_lookups_total{result=\"miss\"}").unwrap_or(0.0);
    let evictions = metric(&body, "ingest_series_cache_evictions_total").unwrap_or(0.0);
    assert!(
        hits > 0.0 && misses >= 17.0 && evictions > 0.0,
        "hits {hits}, misses {misses}, evictions {evictions}:\n{body}"
    );
    assert!(
        body.contains("ingest_dead_letters_total{reason=\"series_limit\"} 16"),
        "{body}"
    );
    assert!(worker.is_running(), "the inventor stopped the worker");
    drop(worker);
    source.delete_stream().await.unwrap();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reading_put_twice_lands_once_and_its_copy_is_a_dead_letter() {
    let db = TestDb::migrated("poison_put_twice").await;
    let client = db.client().await;
    let (stream, source) = create_stream("put-twice", 2).await;
    // What a gateway killed between Kinesis's answer and its own does: the
    // message comes again and is put again.
    let good = records(4, 100, base_ts());
    let event = (
        "switch".to_string(),
        Bytes::from(format!(
            r#"{{"device":"switch","ts":{},"fields":{{"state":"on"}}}}"#,
            base_ts()
        )),
    );
    let mut all = good.clone();
    all.extend([
        good[10].clone(),
        good[11].clone(),
        event.clone(),
        event.clone(),
    ]);
    source.put_records(&all).await.unwrap();
    let mut worker = ConsumerProcess::start(&db.url, &stream, "w1", &[]);
    assert_eq!(
        wait_for_count(&client, DEAD_LETTERS, 3, LAND_WITHIN).await,
        3,
        "the copies in the first batches are dead letters"
    );
    // And a copy that comes after the first was committed long ago.
    source.put_records(&good[..1]).await.unwrap();
    assert_eq!(
        wait_for_count(&client, DEAD_LETTERS, 4, LAND_WITHIN).await,
        4,
        "the late copy is a dead letter"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(per_device(&client).await, expected_per_device(&good));
    let events: i64 = client
        .query_one("SELECT count(*) FROM telemetry.events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(events, 1, "the event once");
    let letters = dead_letters(&client).await;
    assert_eq!(letters.len(), 4, "{letters:?}");
    for (kind, reason, raw) in &letters {
        assert_eq!(kind, "database_refused", "{reason}");
        assert!(reason.contains("duplicate key"), "{reason}");
        let copies = [&good[0].1, &good[10].1, &good[11].1, &event.1];
        assert!(
            copies.iter().any(|c| c.as_ref() == raw.as_slice()),
            "{raw:?}"
        );
    }
    assert!(worker.is_running(), "a copy stopped the worker");
    drop(worker);
    source.delete_stream().await.unwrap();
    db.drop().await;
}
