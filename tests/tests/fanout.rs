//! Enhanced fan-out on kinesis-mock (INGEST_KINESIS_MOCK_URL; kinesalite has
//! none): a registered consumer, a shard read through SubscribeToShard
//! across subscriptions that end, a closed shard read to its end, and
//! `ingest consume --read-mode efo` loading every record once.

use std::time::Duration;

use bytes::Bytes;
use ingest::source::kinesis::{FanoutReader, Fetched, KinesisSource, StartPosition};
use tests::consumer::{ConsumerProcess, expected_per_device, per_device, records, wait_for_count};
use tests::{START_HINT, base_ts};

/// A bound for records to arrive; not a speed target.
const ARRIVE_WITHIN: Duration = Duration::from_secs(60);
/// A bound for a consumer's records to land; not a speed target.
const LAND_WITHIN: Duration = Duration::from_secs(90);
const SAMPLES: &str = "SELECT count(*) FROM telemetry.samples";

fn kinesis_mock_url() -> String {
    std::env::var("INGEST_KINESIS_MOCK_URL")
        .unwrap_or_else(|_| panic!("INGEST_KINESIS_MOCK_URL is not set: {START_HINT}"))
}

async fn stream(name: &str, shards: u32) -> KinesisSource {
    let url = kinesis_mock_url();
    let name = format!("{name}-{}", std::process::id());
    let source = KinesisSource::from_env_with_endpoint(&name, &url)
        .await
        .expect("a Kinesis client");
    source
        .ensure_stream(shards)
        .await
        .unwrap_or_else(|e| panic!("cannot create {name} in kinesis-mock at {url}: {e}"));
    source
}

fn numbered(from: u32, to: u32) -> Vec<(String, Bytes)> {
    (from..to)
        .map(|i| ("dev-1".to_owned(), Bytes::from(format!("{{\"n\":{i}}}"))))
        .collect()
}

/// Reads until `count` records came (failing after ARRIVE_WITHIN).
async fn read(reader: &mut FanoutReader, count: usize) -> Vec<(String, Bytes)> {
    let mut read = Vec::new();
    while read.len() < count {
        let fetched = tokio::time::timeout(ARRIVE_WITHIN, reader.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {count} records arrived", read.len()))
            .expect("the subscription");
        match fetched {
            Fetched::Records { records, .. } => read.extend(
                records
                    .into_iter()
                    .map(|record| (record.sequence_number, record.data)),
            ),
            Fetched::EndOfShard => panic!("the open shard ended after {} records", read.len()),
        }
    }
    read
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subscribed_shard_gives_every_record_once_in_order_across_resubscriptions() {
    let source = stream("fanout-order", 1).await;
    let consumer = source.register_consumer("ingest-test").await.unwrap();
    // Registering again (another worker) finds the same consumer.
    assert_eq!(
        source.register_consumer("ingest-test").await.unwrap(),
        consumer
    );
    let shard = source.list_shards().await.unwrap()[0].shard_id.clone();
    let mut reader = source
        .fanout_reader(&consumer, &shard, StartPosition::TrimHorizon)
        .with_subscription_lifetime(Duration::from_secs(2));

    // Before the first subscription, and then while subscriptions come and
    // go (each 2 s): each record once, in the order put.
    let mut put = numbered(0, 100);
    source.put_records(&put).await.unwrap();
    let mut got = read(&mut reader, 100).await;
    for round in 1..4 {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let more = numbered(round * 100, round * 100 + 100);
        source.put_records(&more).await.unwrap();
        got.extend(read(&mut reader, 100).await);
        put.extend(more);
    }
    let data: Vec<&Bytes> = got.iter().map(|(_, data)| data).collect();
    let expected: Vec<&Bytes> = put.iter().map(|(_, data)| data).collect();
    assert_eq!(data, expected);
    // Sequence numbers are decimal strings of up to 128 digits.
    let sequences: Vec<(usize, &str)> = got
        .iter()
        .map(|(seq, _)| (seq.len(), seq.as_str()))
        .collect();
    assert!(sequences.is_sorted(), "in sequence order");

    // A reader from a checkpoint (the next owner of the lease) starts
    // right after it.
    drop(reader);
    let mut resumed = source.fanout_reader(
        &consumer,
        &shard,
        StartPosition::AfterSequence(got[349].0.clone()),
    );
    let rest = read(&mut resumed, 50).await;
    assert_eq!(rest, got[350..]);
    source.delete_stream().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_split_shard_is_read_to_its_end_through_its_subscription() {
    let source = stream("fanout-split", 1).await;
    let consumer = source.register_consumer("ingest-test").await.unwrap();
    let parent = source.list_shards().await.unwrap()[0].shard_id.clone();
    let put = numbered(0, 50);
    source.put_records(&put).await.unwrap();
    source.split_shard(&parent).await.unwrap();

    let mut reader = source.fanout_reader(&consumer, &parent, StartPosition::TrimHorizon);
    let got = read(&mut reader, 50).await;
    let data: Vec<&Bytes> = got.iter().map(|(_, data)| data).collect();
    assert_eq!(data, put.iter().map(|(_, data)| data).collect::<Vec<_>>());
    let end = tokio::time::timeout(ARRIVE_WITHIN, reader.next())
        .await
        .expect("the end of the shard within the bound")
        .unwrap();
    assert_eq!(end, Fetched::EndOfShard);
    source.delete_stream().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn consumers_reading_by_fanout_load_every_record_once_across_a_split() {
    let db = tests::TestDb::migrated("fanout_consume").await;
    let client = db.client().await;
    let source = stream("fanout-consume", 2).await;
    let url = kinesis_mock_url();
    let env = [("AWS_ENDPOINT_URL_KINESIS", url.as_str())];
    let efo = [
        "--read-mode",
        "efo",
        "--efo-consumer-name",
        "ingest-consume-test",
    ];
    let _one = ConsumerProcess::start_with_env(&db.url, source.stream(), "efo-1", &efo, &env);
    let _two = ConsumerProcess::start_with_env(&db.url, source.stream(), "efo-2", &efo, &env);

    let first = records(40, 2_000, base_ts());
    source.put_records(&first).await.expect("records are put");
    wait_for_count(&client, SAMPLES, first.len() as i64, LAND_WITHIN).await;
    // A parent read to its end, then its children.
    let parent = source.list_shards().await.unwrap()[0].shard_id.clone();
    source.split_shard(&parent).await.unwrap();
    let second = records(40, 2_000, base_ts() + 10_000);
    source.put_records(&second).await.expect("records are put");
    let all: Vec<_> = first.into_iter().chain(second).collect();
    let landed = wait_for_count(&client, SAMPLES, all.len() as i64, LAND_WITHIN).await;
    // Give a second reading of the same records the time to show up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        per_device(&client).await,
        expected_per_device(&all),
        "rows and sums per series (landed {landed})"
    );
    source.delete_stream().await.unwrap();
    db.drop().await;
}
