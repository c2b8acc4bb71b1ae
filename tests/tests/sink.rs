//! The batch -> COPY -> checkpoint transaction against the real PostgreSQL.

use std::time::Instant;

use ingest::batch::{Batch, SeriesCache, missing_series};
use ingest::decode::{DecodeLimits, Decoder};
use ingest::sink::postgres::{Outcome, resolve_series, write_batch};
use tests::TestDb;

async fn add_lease(client: &tokio_postgres::Client, shard: &str, owner: &str, counter: i64) {
    client
        .execute(
            "INSERT INTO ingest.shard_leases (stream, shard_id, owner, lease_counter, expires_at)
             VALUES ('s', $1, $2, $3, now() + interval '1 minute')",
            &[&shard, &owner, &counter],
        )
        .await
        .unwrap();
}

/// Decodes `records` of `shard` into `batch`, creating their series.
async fn add(
    batch: &mut Batch,
    cache: &mut SeriesCache,
    client: &tokio_postgres::Client,
    shard: &str,
    counter: i64,
    records: &[(&str, &str)],
) {
    let mut decoder = Decoder::new(DecodeLimits::default());
    let decoded: Vec<_> = records
        .iter()
        .map(|(_, raw)| decoder.decode(raw.as_bytes(), 1_763_900_000_000_000))
        .collect();
    let missing = missing_series(decoded.iter().filter_map(|r| r.as_ref().ok()), cache);
    resolve_series(client, &missing, cache).await.unwrap();
    let segment = batch.segment(shard, counter, Instant::now());
    for ((seq, raw), result) in records.iter().zip(&decoded) {
        match result {
            Ok(reading) => segment.add_reading(reading, cache).unwrap(),
            Err(error) => segment.add_dead_letter("s", seq, None, error, raw.as_bytes()),
        }
        segment.advance(
            seq,
            None,
            true,
            &bytes::Bytes::copy_from_slice(raw.as_bytes()),
        );
    }
}

#[tokio::test]
async fn a_batch_commits_rows_and_checkpoints_together() {
    let db = TestDb::migrated("sink_commit").await;
    let mut client = db.client().await;
    add_lease(&client, "shard-a", "w1", 3).await;
    add_lease(&client, "shard-b", "w1", 1).await;

    let mut batch = Batch::new();
    let mut cache = SeriesCache::default();
    add(&mut batch, &mut cache, &client, "shard-a", 3, &[
        ("10", r#"{"device":"d1","house":"h","ts":1763900000,"fields":{"p":1.5,"q":2,"on":true,"mode":"eco"}}"#),
        ("11", r#"{"device":"d1","house":"h","ts":1763900001,"fields":{"p":2.5}}"#),
    ])
    .await;
    add(&mut batch, &mut cache, &client, "shard-b", 1, &[
        ("7", r#"{"device":"d2","ts":"2025-11-23T12:00:00Z","temp":-3.25,"tags":["a",{"b":null}]}"#),
        ("8", r#"{"device":"d2","temp":"NaN"}"#),
    ])
    .await;
    let segments: Vec<_> = batch.take().into_iter().map(|s| s.seal()).collect();
    assert_eq!(
        write_batch(&mut client, "s", "w1", &segments)
            .await
            .unwrap(),
        Outcome::Committed
    );

    let rows: Vec<String> = client
        .query(
            "SELECT device || ' ' || metric || ' ' || value || ' ' || to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')
             FROM telemetry.samples_named ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        rows,
        [
            "d1 on 1 2025-11-23 12:13:20",
            "d1 p 1.5 2025-11-23 12:13:20",
            "d1 p 2.5 2025-11-23 12:13:21",
            "d1 q 2 2025-11-23 12:13:20",
            "d2 temp -3.25 2025-11-23 12:00:00",
        ]
    );
    let events: Vec<String> = client
        .query("SELECT house || '/' || device || ' ' || kind || ' ' || body::text FROM telemetry.events ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        events,
        [r#"/d2 tags ["a", {"b": null}]"#, r#"h/d1 mode "eco""#]
    );
    let dead = client
        .query_one(
            "SELECT shard_id, sequence_number, reason_kind, reason, raw FROM ingest.dead_letters",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            dead.get::<_, String>(0),
            dead.get::<_, String>(1),
            dead.get::<_, String>(2)
        ),
        ("shard-b".into(), "8".into(), "not_finite".into())
    );
    assert!(
        dead.get::<_, String>(3).contains("\"temp\""),
        "{}",
        dead.get::<_, String>(3)
    );
    assert_eq!(
        dead.get::<_, Vec<u8>>(4),
        br#"{"device":"d2","temp":"NaN"}"#
    );
    let checkpoints: Vec<(String, Option<String>)> = client
        .query(
            "SELECT shard_id, checkpoint FROM ingest.shard_leases ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        checkpoints,
        [
            ("shard-a".into(), Some("11".into())),
            ("shard-b".into(), Some("8".into()))
        ]
    );
    db.drop().await;
}

#[tokio::test]
async fn a_lost_lease_writes_nothing_and_names_the_shard() {
    let db = TestDb::migrated("sink_fencing").await;
    let mut client = db.client().await;
    add_lease(&client, "shard-a", "w1", 1).await;
    add_lease(&client, "shard-b", "w1", 1).await;
    // Another worker took shard-b over: its counter moved on.
    client.execute("UPDATE ingest.shard_leases SET owner = 'w2', lease_counter = 2 WHERE shard_id = 'shard-b'", &[]).await.unwrap();

    let mut batch = Batch::new();
    let mut cache = SeriesCache::default();
    add(
        &mut batch,
        &mut cache,
        &client,
        "shard-a",
        1,
        &[("5", r#"{"device":"d","x":1}"#)],
    )
    .await;
    add(
        &mut batch,
        &mut cache,
        &client,
        "shard-b",
        1,
        &[("9", r#"{"device":"e","x":2}"#)],
    )
    .await;
    let segments: Vec<_> = batch.take().into_iter().map(|s| s.seal()).collect();
    assert_eq!(
        write_batch(&mut client, "s", "w1", &segments)
            .await
            .unwrap(),
        Outcome::LeasesLost(vec!["shard-b".into()])
    );
    let (samples, checkpoints): (i64, i64) = {
        let row = client
            .query_one("SELECT (SELECT count(*) FROM telemetry.samples), (SELECT count(checkpoint) FROM ingest.shard_leases)", &[])
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(
        (samples, checkpoints),
        (0, 0),
        "a batch with a lost lease wrote something"
    );

    // The rest of the batch goes through on its own.
    let rest: Vec<_> = segments
        .into_iter()
        .filter(|s| s.shard_id == "shard-a")
        .collect();
    assert_eq!(
        write_batch(&mut client, "s", "w1", &rest).await.unwrap(),
        Outcome::Committed
    );
    // The same segment again (a retry after a COMMIT whose answer was lost)
    // writes nothing, and says the batch is in, not that the lease is lost.
    assert_eq!(
        write_batch(&mut client, "s", "w1", &rest).await.unwrap(),
        Outcome::AlreadyCommitted
    );
    let samples: i64 = client
        .query_one("SELECT count(*) FROM telemetry.samples", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(samples, 1);
    db.drop().await;
}

#[tokio::test]
async fn a_batch_naming_a_series_the_database_lacks_is_refused_whole() {
    let db = TestDb::migrated("sink_unknown_series").await;
    let mut client = db.client().await;
    add_lease(&client, "shard-a", "w1", 1).await;
    let mut batch = Batch::new();
    let mut cache = SeriesCache::default();
    add(
        &mut batch,
        &mut cache,
        &client,
        "shard-a",
        1,
        &[("5", r#"{"device":"d","x":1}"#)],
    )
    .await;
    // An id learnt from a server that is no longer the primary.
    let stale = ingest::batch::SeriesKey {
        house: String::new(),
        device: "gone".into(),
        metric: "x".into(),
    };
    cache.insert(&stale, 4242);
    add(
        &mut batch,
        &mut cache,
        &client,
        "shard-a",
        1,
        &[("6", r#"{"device":"gone","x":2}"#)],
    )
    .await;
    let segments: Vec<_> = batch.take().into_iter().map(|s| s.seal()).collect();
    let error = write_batch(&mut client, "s", "w1", &segments)
        .await
        .expect_err("series 4242 does not exist");
    assert!(error.is_unknown_series(), "{error}");
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM telemetry.samples), (SELECT count(checkpoint) FROM ingest.shard_leases)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (0, 0),
        "nothing of the batch was written"
    );
    db.drop().await;
}
