//! `ingest consume` end to end: real processes, the stack's Kinesis emulator
//! and PostgreSQL. Each test has a stream and a database of its own.

use std::time::Duration;

use tests::consumer::{
    ConsumerProcess, create_stream, expected_per_device, per_device, records, wait_for_count,
};
use tests::{TestDb, base_ts};

/// Generous bound for a test's records to land; a bound, not a speed target.
const LAND_WITHIN: Duration = Duration::from_secs(90);
const SAMPLES: &str = "SELECT count(*) FROM telemetry.samples";

async fn owners(client: &tokio_postgres::Client, stream: &str) -> Vec<(Option<String>, i64)> {
    client
        .query(
            "SELECT owner, count(*) FROM ingest.shard_leases WHERE stream IN (SELECT lease_key FROM ingest.streams WHERE name = $1) AND NOT ended
             GROUP BY owner ORDER BY owner NULLS FIRST",
            &[&stream],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Waits until `check` holds on the lease table (bounded), returning the last owners seen.
async fn wait_for_owners(
    client: &tokio_postgres::Client,
    stream: &str,
    check: impl Fn(&[(Option<String>, i64)]) -> bool,
) -> Vec<(Option<String>, i64)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let seen = owners(client, stream).await;
        if check(&seen) || std::time::Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_record_of_a_four_shard_stream_lands_exactly_once() {
    let db = TestDb::migrated("consume_exactly_once").await;
    let client = db.client().await;
    let (stream, source) = create_stream("exactly-once", 4).await;
    let put = records(50, 4_000, base_ts());
    source.put_records(&put).await.expect("records are put");

    let mut worker = ConsumerProcess::start(&db.url, &stream, "w1", &[]);
    let landed = wait_for_count(&client, SAMPLES, put.len() as i64, LAND_WITHIN).await;
    assert_eq!(landed, put.len() as i64, "rows in telemetry.samples");
    assert_eq!(
        per_device(&client).await,
        expected_per_device(&put),
        "rows and sums per series"
    );

    let checkpoints: i64 = client
        .query_one(
            "SELECT count(checkpoint) FROM ingest.shard_leases WHERE stream IN (SELECT lease_key FROM ingest.streams WHERE name = $1)",
            &[&stream],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(checkpoints, 4, "every shard has a checkpoint");

    let status = worker.terminate(Duration::from_secs(30));
    assert!(status.success(), "SIGTERM exit: {status}");
    assert_eq!(
        owners(&client, &stream).await,
        [(None, 4)],
        "leases released on SIGTERM"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn three_workers_share_the_shards_and_a_killed_one_loses_nothing() {
    let db = TestDb::migrated("consume_kill").await;
    let client = db.client().await;
    let (stream, source) = create_stream("kill", 4).await;
    let mut workers: Vec<ConsumerProcess> = ["w1", "w2", "w3"]
        .iter()
        .map(|w| ConsumerProcess::start(&db.url, &stream, w, &[]))
        .collect();

    let balanced = wait_for_owners(&client, &stream, |o| {
        o.len() == 3 && o.iter().all(|(w, _)| w.is_some())
    })
    .await;
    let mut counts: Vec<i64> = balanced.iter().map(|(_, n)| *n).collect();
    counts.sort();
    assert_eq!(
        counts,
        [1, 1, 2],
        "four shards over three workers: {balanced:?}"
    );

    let first = records(60, 3_000, base_ts());
    source.put_records(&first).await.unwrap();
    // Kill a worker while it is busy, then start it again.
    wait_for_count(&client, SAMPLES, 500, LAND_WITHIN).await;
    workers[0].kill();
    let second = records(60, 3_000, base_ts() + 10_000_000);
    source.put_records(&second).await.unwrap();
    workers[0] = ConsumerProcess::start(&db.url, &stream, "w1", &[]);

    let all: Vec<_> = first.into_iter().chain(second).collect();
    let landed = wait_for_count(&client, SAMPLES, all.len() as i64, LAND_WITHIN).await;
    // Let any duplicate that would come show up before judging.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(landed, all.len() as i64);
    assert_eq!(
        per_device(&client).await,
        expected_per_device(&all),
        "zero lost, zero duplicated"
    );
    for worker in &mut workers {
        assert!(worker.is_running(), "{} exited", worker.worker_id);
    }
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_releases_the_leases_and_the_other_worker_takes_over() {
    let db = TestDb::migrated("consume_sigterm").await;
    let client = db.client().await;
    let (stream, source) = create_stream("sigterm", 4).await;
    let mut first = ConsumerProcess::start(&db.url, &stream, "w1", &[]);
    let mut second = ConsumerProcess::start(&db.url, &stream, "w2", &[]);
    let split = wait_for_owners(&client, &stream, |o| {
        o.len() == 2 && o.iter().all(|(w, n)| w.is_some() && *n == 2)
    })
    .await;
    assert_eq!(split, [(Some("w1".into()), 2), (Some("w2".into()), 2)]);

    let before = records(40, 2_000, base_ts());
    source.put_records(&before).await.unwrap();
    wait_for_count(&client, SAMPLES, 200, LAND_WITHIN).await;
    let status = first.terminate(Duration::from_secs(30));
    assert!(status.success(), "w1 exit status after SIGTERM: {status}");

    // Released, not expired: w2 holds all four long before a 3 s lease could lapse twice.
    let taken = wait_for_owners(&client, &stream, |o| o == [(Some("w2".to_string()), 4)]).await;
    assert_eq!(taken, [(Some("w2".into()), 4)]);

    let after = records(40, 2_000, base_ts() + 10_000_000);
    source.put_records(&after).await.unwrap();
    let all: Vec<_> = before.into_iter().chain(after).collect();
    assert_eq!(
        wait_for_count(&client, SAMPLES, all.len() as i64, LAND_WITHIN).await,
        all.len() as i64
    );
    assert_eq!(per_device(&client).await, expected_per_device(&all));
    assert!(second.is_running());
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_records_become_dead_letters_and_good_ones_land() {
    let db = TestDb::migrated("consume_dead_letters").await;
    let client = db.client().await;
    let (stream, source) = create_stream("dead-letters", 1).await;
    let deep = format!(
        r#"{{"device":"d","x":{}1{}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let huge = format!(r#"{{"device":"d","x":"{}"}}"#, "a".repeat(1_000_000));
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("invalid_json", br#"{"device": "d", "x": }"#.to_vec()),
        (
            "invalid_utf8",
            b"{\"device\":\"d\",\"x\":\"caf\xc3".to_vec(),
        ),
        ("wrong_type", br#"{"device": 42, "x": 1}"#.to_vec()),
        ("not_finite", br#"{"device": "d", "x": "NaN"}"#.to_vec()),
        ("invalid_json", br#"{"device": "d", "x": 1e999}"#.to_vec()),
        (
            "timestamp_out_of_range",
            br#"{"device": "d", "ts": "0001-01-01T00:00:00Z", "x": 1}"#.to_vec(),
        ),
        (
            "timestamp_out_of_range",
            br#"{"device": "d", "ts": "9999-12-31T00:00:00Z", "x": 1}"#.to_vec(),
        ),
        ("missing_device", b"{}".to_vec()),
        ("too_large", huge.into_bytes()),
        ("too_deep", deep.into_bytes()),
    ];
    // Good and bad records interleaved, in one shard and so in the same batches.
    let mut put = Vec::new();
    let mut good = Vec::new();
    for (i, (_, raw)) in bad.iter().enumerate() {
        let record = tests::consumer::record("good", base_ts() + i as i64, (i + 1) as f64);
        good.push(record.clone());
        put.push(record);
        put.push(("bad".to_string(), bytes::Bytes::from(raw.clone())));
    }
    source.put_records(&put).await.unwrap();

    let mut worker = ConsumerProcess::start(&db.url, &stream, "w1", &[]);
    let dead = wait_for_count(
        &client,
        "SELECT count(*) FROM ingest.dead_letters",
        bad.len() as i64,
        LAND_WITHIN,
    )
    .await;
    assert_eq!(dead, bad.len() as i64, "dead letters");
    assert_eq!(
        wait_for_count(&client, SAMPLES, good.len() as i64, LAND_WITHIN).await,
        good.len() as i64
    );
    assert_eq!(per_device(&client).await, expected_per_device(&good));

    let letters: Vec<(String, String, Vec<u8>)> = client
        .query("SELECT reason_kind, reason, raw FROM ingest.dead_letters ORDER BY sequence_number::numeric", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    for ((kind, raw), (got_kind, reason, got_raw)) in bad.iter().zip(&letters) {
        assert_eq!(got_kind, kind, "reason: {reason}");
        assert!(!reason.is_empty());
        assert_eq!(got_raw, raw, "the raw bytes are kept whole");
    }
    assert!(worker.is_running(), "bad input stopped the worker");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_shards_owners_checkpoints_and_workers() {
    let db = TestDb::migrated("consume_status").await;
    let client = db.client().await;
    let (stream, source) = create_stream("status", 2).await;
    let put = records(10, 200, base_ts());
    source.put_records(&put).await.unwrap();
    let _worker = ConsumerProcess::start(&db.url, &stream, "status-w1", &[]);
    assert_eq!(
        wait_for_count(&client, SAMPLES, put.len() as i64, LAND_WITHIN).await,
        put.len() as i64
    );

    let output = tests::run_ingest(
        &["status", "--stream", &stream, "--database-url", &db.url],
        &[],
    );
    let (stdout, stderr) = tests::text(&output);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.starts_with(&format!(
            "stream {stream}: 2 shards (2 open, 0 ended), 1 live workers"
        )),
        "{stdout}"
    );
    for shard in ["shardId-000000000000", "shardId-000000000001"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(shard))
            .unwrap_or_else(|| panic!("no {shard} in {stdout}"));
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[1], "status-w1", "owner: {line}");
        assert!(cells[3].contains('…'), "an abbreviated checkpoint: {line}");
        assert_eq!(cells[5], "no", "not ended: {line}");
        assert_eq!(
            cells[6..8],
            ["0", "ms"],
            "kinesalite is never behind: {line}"
        );
    }
    let worker = stdout
        .lines()
        .find(|l| l.starts_with("status-w1"))
        .expect("the worker's row");
    assert!(
        worker.trim_end().ends_with(" 2"),
        "the worker holds 2 leases: {worker}"
    );

    let unknown = tests::run_ingest(
        &[
            "status",
            "--stream",
            "no-such-stream",
            "--database-url",
            &db.url,
        ],
        &[],
    );
    let (stdout, _) = tests::text(&unknown);
    assert!(
        unknown.status.success() && stdout.contains("no consumer has started on this stream yet"),
        "{stdout}"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_health_and_readiness_are_served() {
    let db = TestDb::migrated("consume_metrics").await;
    let client = db.client().await;
    let (stream, source) = create_stream("metrics", 1).await;
    let mut put = records(5, 100, base_ts());
    put.push(("bad".to_string(), bytes::Bytes::from_static(b"{not json")));
    source.put_records(&put).await.unwrap();
    let port = tests::free_port();
    let addr = format!("127.0.0.1:{port}");
    let _worker =
        ConsumerProcess::start(&db.url, &stream, "metrics-w1", &["--metrics-addr", &addr]);
    assert_eq!(
        wait_for_count(&client, SAMPLES, 100, LAND_WITHIN).await,
        100
    );

    // The counters are updated right after the commit the test just saw.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (status, body) = tests::http_get(port, "/metrics").expect("/metrics answers");
        assert_eq!(status, 200);
        if body.contains("ingest_rows_written_total{table=\"samples\"} 100")
            || std::time::Instant::now() > deadline
        {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for expected in [
        "ingest_records_read_total{shard=\"shardId-000000000000\"} 101",
        "ingest_rows_written_total{table=\"samples\"} 100",
        "ingest_rows_written_total{table=\"dead_letters\"} 1",
        "ingest_dead_letters_total{reason=\"invalid_json\"} 1",
        "ingest_millis_behind_latest{shard=\"shardId-000000000000\"} 0",
        "ingest_leases_held 1",
        "ingest_batch_rows_bucket",
        "ingest_batch_commit_seconds_bucket",
        "ingest_batches_total",
        "ingest_series_created_total 5",
    ] {
        assert!(
            body.contains(expected),
            "/metrics lacks {expected:?}:\n{body}"
        );
    }
    assert_eq!(tests::http_get(port, "/healthz").unwrap().0, 200);
    assert_eq!(tests::http_get(port, "/readyz").unwrap().0, 200);
    db.drop().await;
}
