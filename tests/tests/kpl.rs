//! KPL aggregated records end to end: aggregates made by AWS's own
//! `aws-kinesis-agg` (PyPI, in the stack's venv), put into the stack's
//! Kinesis emulator, read by real `ingest consume` processes.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ingest::source::kinesis::{Fetched, ReaderOptions, StartPosition};
use md5::Digest;
use tests::consumer::{
    ConsumerProcess, create_stream, expected_per_device, per_device, records, wait_for_count,
};
use tests::gateway::{CoapPeer, GatewayProcess, code, post};
use tests::{TestDb, base_ts, kpl};

/// Generous bound for a test's records to land; a bound, not a speed target.
const LAND_WITHIN: Duration = Duration::from_secs(90);
const SAMPLES: &str = "SELECT count(*) FROM telemetry.samples";
const DEAD_LETTERS: &str = "SELECT count(*) FROM ingest.dead_letters";

/// The lease's (checkpoint, checkpoint_sub) of the stream's only shard.
async fn checkpoint(
    client: &tokio_postgres::Client,
    stream: &str,
) -> (Option<String>, Option<i64>) {
    let row = client
        .query_one(
            "SELECT checkpoint, checkpoint_sub FROM ingest.shard_leases \
             WHERE stream IN (SELECT lease_key FROM ingest.streams WHERE name = $1)",
            &[&stream],
        )
        .await
        .expect("the shard's lease");
    (row.get(0), row.get(1))
}

async fn count(client: &tokio_postgres::Client, query: &str) -> i64 {
    client.query_one(query, &[]).await.unwrap().get(0)
}

/// 1,200 user records in one Kinesis record, one of them not JSON; a plain
/// record before it and an aggregate with a broken MD5 after it. Batches of
/// 5 rows commit inside the aggregate; the worker is killed (SIGKILL) between
/// two of those commits and another takes over: every user record lands
/// exactly once, the bad one and the broken aggregate are dead letters.
#[tokio::test(flavor = "multi_thread")]
async fn aggregated_records_land_once_each_across_a_kill_inside_an_aggregate() {
    let db = TestDb::migrated("kpl_kill").await;
    let client = db.client().await;
    let (stream, source) = create_stream("kpl-kill", 1).await;

    let mut user = records(20, 1_200, base_ts());
    let not_json = Bytes::from_static(br#"{"device":"dev-0","v":"#);
    user[700].1 = not_json.clone();
    let aggregated = kpl::aggregate(&user, None);
    assert_eq!(
        aggregated.len(),
        1,
        "aws-kinesis-agg packs all 1,200 into one record"
    );

    let mut broken = kpl::aggregate(&records(2, 3, base_ts() + 5_000), None).remove(0);
    let mut bytes = broken.1.to_vec();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    broken.1 = Bytes::from(bytes);

    let plain = tests::consumer::record("plain", base_ts(), 7.0);
    let put = vec![plain.clone(), aggregated[0].clone(), broken.clone()];
    let sequences = source.put_records(&put).await.expect("records are put");

    let mut good: Vec<(String, Bytes)> = user
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 700)
        .map(|(_, r)| r.clone())
        .collect();
    good.push(plain);

    let flags = ["--batch-rows", "5"];
    let mut first = ConsumerProcess::start(&db.url, &stream, "w1", &flags);
    // Kill it between two commits inside the aggregate.
    let deadline = Instant::now() + LAND_WITHIN;
    while count(&client, SAMPLES).await < 300 {
        assert!(
            Instant::now() < deadline,
            "the first worker committed nothing"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill();
    // One snapshot: a commit sent just before the kill may still land.
    let row = client
        .query_one(
            "SELECT checkpoint, checkpoint_sub,
                    (SELECT count(*) FROM telemetry.samples),
                    (SELECT count(*) FROM ingest.dead_letters)
             FROM ingest.shard_leases \
             WHERE stream IN (SELECT lease_key FROM ingest.streams WHERE name = $1)",
            &[&stream],
        )
        .await
        .unwrap();
    let (at, sub, landed, dead_so_far): (Option<String>, Option<i64>, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        at.as_deref(),
        Some(sequences[1].as_str()),
        "checkpoint at the aggregate"
    );
    let sub = sub.expect("the checkpoint holds a sub-sequence inside the aggregate");
    assert!(
        landed < good.len() as i64 && sub < 1_199,
        "killed inside the aggregate: {landed} rows, sub-sequence {sub}"
    );
    // The plain record and user records 0..=sub: samples, or the dead letter (700).
    assert_eq!(
        landed + dead_so_far,
        1 + sub + 1,
        "rows match the committed sub-sequence"
    );

    let mut second = ConsumerProcess::start(&db.url, &stream, "w2", &flags);
    let landed = wait_for_count(&client, SAMPLES, good.len() as i64, LAND_WITHIN).await;
    let dead = wait_for_count(&client, DEAD_LETTERS, 2, LAND_WITHIN).await;
    // Let any duplicate that would come show up before judging.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!((landed, dead), (good.len() as i64, 2));
    assert_eq!(
        per_device(&client).await,
        expected_per_device(&good),
        "every user record once: rows and sums per series"
    );

    let letters: Vec<(String, Option<i64>, String, Vec<u8>)> = client
        .query(
            "SELECT sequence_number, sub_sequence, reason_kind, raw FROM ingest.dead_letters
             ORDER BY sequence_number::numeric, sub_sequence",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        letters,
        [
            (
                sequences[1].clone(),
                Some(700),
                "invalid_json".to_string(),
                not_json.to_vec()
            ),
            (
                sequences[2].clone(),
                None,
                "bad_aggregate".to_string(),
                broken.1.to_vec()
            ),
        ]
    );
    assert_eq!(
        checkpoint(&client, &stream).await,
        (Some(sequences[2].clone()), None),
        "the checkpoint ends after the last record, whole"
    );
    assert!(second.is_running(), "the second worker exited");
    db.drop().await;
}

/// The other direction, for producers of ours (the gateway, later): what
/// `ingest::kpl::Aggregator` packs, AWS's deaggregator reads back whole, in
/// order, with each user record's sub-sequence number.
#[test]
fn aws_kinesis_agg_reads_our_aggregates() {
    let user = records(7, 500, base_ts());
    let mut aggregator = ingest::kpl::Aggregator::new(16 * 1024);
    let mut aggregates = Vec::new();
    for (key, data) in &user {
        aggregates.extend(aggregator.add(key, data).expect("fits"));
    }
    aggregates.extend(aggregator.finish());
    assert!(aggregates.len() > 1, "16 KiB aggregates: more than one");
    let mut read = Vec::new();
    for aggregate in &aggregates {
        assert!(aggregate.data.len() + aggregate.partition_key.len() <= 16 * 1024);
        let users = kpl::deaggregate(&aggregate.data);
        let subs: Vec<Option<i64>> = users.iter().map(|u| u.1).collect();
        let expected: Vec<Option<i64>> = (0..aggregate.records as i64).map(Some).collect();
        assert_eq!(subs, expected, "sub-sequence numbers");
        read.extend(users.into_iter().map(|(key, _, data)| (key, data)));
    }
    assert_eq!(read, user);
}

/// Sends `packet` and waits for its final answer, a piggybacked one or a
/// separate response (acknowledged); returns its code.
async fn post_until_answered(peer: &CoapPeer, packet: &coap_lite::Packet) -> String {
    let answer = peer
        .exchange(packet, Duration::from_secs(5))
        .await
        .expect("the gateway answers within 5 s");
    if answer.header.code != coap_lite::MessageClass::Empty {
        return code(&answer);
    }
    let separate = peer
        .recv(Duration::from_secs(30))
        .await
        .expect("the separate response within 30 s");
    peer.acknowledge(&separate).await;
    code(&separate)
}

/// The gateway packs what it puts into KPL aggregates, one per shard and
/// call: AWS's own deaggregator reads every user record back, each from
/// the shard its partition key maps to, each device's in the order sent;
/// and `ingest consume` loads every one exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn the_gateways_aggregates_are_read_by_aws_kinesis_agg_and_land_once_each() {
    const DEVICES: usize = 40;
    const PER_DEVICE: usize = 25;
    let db = TestDb::migrated("kpl_gateway").await;
    let client = db.client().await;
    let (stream, source) = create_stream("kpl-gateway", 4).await;
    let gateway = GatewayProcess::start(&stream, &["--aggregate", "true"], &[]).await;

    // Every device sends its readings one after the other, all at once.
    let mut devices = tokio::task::JoinSet::new();
    for device in 0..DEVICES {
        let coap = gateway.coap;
        devices.spawn(async move {
            let peer = CoapPeer::new(coap).await;
            let mut sent = Vec::new();
            for i in 0..PER_DEVICE {
                let key = format!("dev-{device}");
                let payload = format!(r#"{{"ts":{},"v":{}}}"#, base_ts() + i as i64, i + 1);
                let request = post(&format!("/t/h1/{key}"), payload.as_bytes(), i as u16 + 1);
                assert_eq!(post_until_answered(&peer, &request).await, "2.04");
                sent.push((key, Bytes::from(payload)));
            }
            sent
        });
    }
    let mut sent = Vec::new();
    while let Some(device) = devices.join_next().await {
        sent.extend(device.expect("a device's task"));
    }

    // Read what Kinesis holds, record by record, aggregates whole.
    let shards = source.list_shards().await.expect("the shards");
    let mut user_records = Vec::new();
    let mut kinesis_records = 0;
    for shard in &shards {
        let mut reader = source
            .shard_reader(
                &shard.shard_id,
                StartPosition::TrimHorizon,
                ReaderOptions::default(),
            )
            .await;
        while let Ok(fetched) = tokio::time::timeout(Duration::from_secs(3), reader.next()).await {
            let Fetched::Records { records, .. } = fetched.expect("the test's reader reads") else {
                break;
            };
            for record in records {
                kinesis_records += 1;
                let users = if ingest::kpl::is_aggregated(&record.data) {
                    kpl::deaggregate(&record.data)
                        .into_iter()
                        .map(|(key, _, data)| (key, data))
                        .collect()
                } else {
                    vec![(record.partition_key.clone(), record.data.clone())]
                };
                for (key, data) in users {
                    let hash = u128::from_be_bytes(md5::Md5::digest(key.as_bytes()).into());
                    assert!(
                        (shard.starting_hash_key..=shard.ending_hash_key).contains(&hash),
                        "{key} in {}, not the shard its key maps to",
                        shard.shard_id
                    );
                    user_records.push((key, data));
                }
            }
        }
    }
    assert_eq!(
        user_records.len(),
        DEVICES * PER_DEVICE,
        "user records in the stream"
    );
    assert!(
        kinesis_records < user_records.len(),
        "{kinesis_records} Kinesis records for {} user records: nothing was aggregated",
        user_records.len()
    );
    // Each device's readings once each, in the order sent (values 1, 2, ...).
    for device in 0..DEVICES {
        let key = format!("dev-{device}");
        let values: Vec<i64> = user_records
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, data)| {
                let record: serde_json::Value = serde_json::from_slice(data).unwrap();
                record["v"].as_i64().expect("the reading")
            })
            .collect();
        assert_eq!(values, (1..=PER_DEVICE as i64).collect::<Vec<_>>(), "{key}");
    }

    let worker = ConsumerProcess::start(&db.url, &stream, "w1", &[]);
    let landed = wait_for_count(&client, SAMPLES, sent.len() as i64, LAND_WITHIN).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        (landed, count(&client, SAMPLES).await),
        (sent.len() as i64, sent.len() as i64)
    );
    assert_eq!(per_device(&client).await, expected_per_device(&sent));
    assert_eq!(count(&client, DEAD_LETTERS).await, 0);
    drop(worker);
    drop(gateway);
    source.delete_stream().await.unwrap();
    db.drop().await;
}
