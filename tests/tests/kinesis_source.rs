//! `ingest::source::kinesis` against the real local Kinesis (kinesalite from
//! `dev/stack`): each test on a stream of its own, deleted when it passes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ingest::source::kinesis::{
    Fetched, KinesisSource, ReaderOptions, Record, ShardReader, StartPosition,
};

/// How to get the services these tests need.
use tests::START_HINT;

/// The local Kinesis endpoint, checked to be listening.
fn kinesis_endpoint() -> String {
    let url = std::env::var("AWS_ENDPOINT_URL_KINESIS")
        .unwrap_or_else(|_| panic!("AWS_ENDPOINT_URL_KINESIS is not set: {START_HINT}"));
    let address = url.trim_start_matches("http://").trim_end_matches('/');
    if let Err(err) = std::net::TcpStream::connect(address) {
        panic!("no Kinesis at {url} ({err}): {START_HINT}");
    }
    url
}

/// A stream name of its own for one test run.
fn unique_stream(test: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("test-{test}-{}-{nanos}", std::process::id())
}

/// A source for a new stream with `shards` shards, through the standard
/// AWS configuration (which reads AWS_ENDPOINT_URL_KINESIS).
async fn new_stream(test: &str, shards: u32) -> KinesisSource {
    kinesis_endpoint();
    let source = KinesisSource::from_env(&unique_stream(test))
        .await
        .unwrap_or_else(|err| panic!("{err}: {START_HINT}"));
    source.ensure_stream(shards).await.unwrap();
    source
}

/// `count` records over `keys` partition keys; each payload is unique.
fn records(from: usize, count: usize, keys: usize) -> Vec<(String, Bytes)> {
    (from..from + count)
        .map(|i| {
            let key = format!("device-{:03}", i % keys);
            let data = format!("{{\"device\":\"{key}\",\"i\":{i}}}");
            (key, Bytes::from(data))
        })
        .collect()
}

/// Orders decimal sequence numbers (longer than u128) as numbers.
fn sequence_key(sequence: &str) -> (usize, &str) {
    (sequence.len(), sequence)
}

/// Reads until `want` records came back; panics on EndOfShard or after a
/// minute (a lost record must fail the test, not hang it).
async fn read_records(reader: &mut ShardReader, want: usize) -> Vec<Record> {
    let mut got = Vec::new();
    while got.len() < want {
        let fetched = tokio::time::timeout(Duration::from_secs(60), reader.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{}: only {} of {want} records",
                    reader.shard_id(),
                    got.len()
                )
            })
            .unwrap();
        match fetched {
            Fetched::Records { records, .. } => got.extend(records),
            Fetched::EndOfShard => {
                panic!("{}: ended after {} of {want}", reader.shard_id(), got.len())
            }
        }
    }
    got
}

/// Reads until the shard ends, returning every record before the end.
async fn read_to_end(reader: &mut ShardReader) -> Vec<Record> {
    let mut got = Vec::new();
    loop {
        let fetched = tokio::time::timeout(Duration::from_secs(60), reader.next())
            .await
            .unwrap_or_else(|_| panic!("{}: no end after {} records", reader.shard_id(), got.len()))
            .unwrap();
        match fetched {
            Fetched::Records { records, .. } => got.extend(records),
            Fetched::EndOfShard => return got,
        }
    }
}

/// Asserts the shard has nothing more for a while (an idle shard's
/// `next` keeps waiting).
async fn assert_nothing_more(reader: &mut ShardReader) {
    if let Ok(fetched) = tokio::time::timeout(Duration::from_millis(1500), reader.next()).await {
        panic!("{}: unexpected {fetched:?}", reader.shard_id());
    }
}

fn assert_in_sequence_order(shard: &str, records: &[Record]) {
    for pair in records.windows(2) {
        assert!(
            sequence_key(&pair[0].sequence_number) < sequence_key(&pair[1].sequence_number),
            "{shard}: {} before {}",
            pair[0].sequence_number,
            pair[1].sequence_number
        );
    }
}

#[tokio::test]
async fn every_record_comes_back_once_in_order() {
    let source = new_stream("all-records", 4).await;
    let put = records(0, 5_000, 200);
    let sequences = source.put_records(&put).await.unwrap();
    assert_eq!(sequences.len(), put.len());
    let put_by_data: HashMap<&Bytes, (&String, &String)> = put
        .iter()
        .zip(&sequences)
        .map(|((key, data), sequence)| (data, (key, sequence)))
        .collect();

    let shards = source.list_shards().await.unwrap();
    assert_eq!(shards.len(), 4);
    let started = Instant::now();
    let mut readers = tokio::task::JoinSet::new();
    for shard in &shards {
        let mut reader = source
            .shard_reader(
                &shard.shard_id,
                StartPosition::TrimHorizon,
                ReaderOptions::default(),
            )
            .await;
        readers.spawn(async move {
            // Read until the shard stays quiet: an idle `next` keeps waiting.
            let mut got = Vec::new();
            let mut last_batch_at = Instant::now();
            while let Ok(fetched) =
                tokio::time::timeout(Duration::from_millis(1500), reader.next()).await
            {
                match fetched.unwrap() {
                    Fetched::Records { records, .. } => got.extend(records),
                    Fetched::EndOfShard => panic!("an open shard ended"),
                }
                last_batch_at = Instant::now();
            }
            (reader.shard_id().to_owned(), got, last_batch_at)
        });
    }
    let mut seen = HashSet::new();
    let mut keys_by_shard: BTreeMap<String, HashSet<String>> = BTreeMap::new();
    let mut read_for = Duration::ZERO;
    while let Some(done) = readers.join_next().await {
        let (shard, got, last_batch_at) = done.unwrap();
        read_for = read_for.max(last_batch_at - started);
        assert_in_sequence_order(&shard, &got);
        for record in got {
            let (key, sequence) = put_by_data[&record.data];
            assert_eq!(&record.partition_key, key);
            assert_eq!(&record.sequence_number, sequence);
            assert!(
                record.arrival_micros > 1_600_000_000_000_000,
                "{}",
                record.arrival_micros
            );
            assert!(
                seen.insert(record.data),
                "{shard}: a record came back twice"
            );
            keys_by_shard
                .entry(shard.clone())
                .or_default()
                .insert(record.partition_key);
        }
    }
    assert_eq!(seen.len(), put.len(), "records lost");
    let total_keys: usize = keys_by_shard.values().map(HashSet::len).sum();
    assert_eq!(
        total_keys, 200,
        "a partition key was in two shards: {keys_by_shard:?}"
    );
    eprintln!(
        "read {} records from 4 shards in {read_for:?}: {:.0} records/s",
        seen.len(),
        seen.len() as f64 / read_for.as_secs_f64()
    );
    source.delete_stream().await.unwrap();
}

#[tokio::test]
async fn a_new_reader_resumes_after_the_last_sequence() {
    let source = new_stream("resume", 1).await;
    let put = records(0, 1_000, 20);
    source.put_records(&put).await.unwrap();
    let shard = source.list_shards().await.unwrap().remove(0).shard_id;
    let small = ReaderOptions {
        max_records_per_call: 300,
        ..ReaderOptions::default()
    };

    let mut first = source
        .shard_reader(&shard, StartPosition::TrimHorizon, small.clone())
        .await;
    let head = read_records(&mut first, 1).await;
    assert_eq!(head.len(), 300);
    let last = first.last_sequence().unwrap().to_owned();
    assert_eq!(last, head[299].sequence_number);
    drop(first);

    let mut second = source
        .shard_reader(&shard, StartPosition::AfterSequence(last), small)
        .await;
    let started = Instant::now();
    let rest = read_records(&mut second, 700).await;
    let elapsed = started.elapsed();
    let payloads: Vec<_> = head.iter().chain(&rest).map(|r| r.data.clone()).collect();
    let expected: Vec<_> = put.iter().map(|(_, data)| data.clone()).collect();
    assert_eq!(payloads, expected, "the rest, exactly once and in order");
    assert_nothing_more(&mut second).await;
    eprintln!(
        "resumed and read 700 records in {elapsed:?} (300 a call, 200 ms between calls): {:.0} records/s",
        700.0 / elapsed.as_secs_f64()
    );
    source.delete_stream().await.unwrap();
}

#[tokio::test]
async fn a_split_parent_ends_and_its_children_hold_the_rest() {
    let source = new_stream("split", 1).await;
    let before = records(0, 400, 50);
    let before_sequences = source.put_records(&before).await.unwrap();
    let parent = source.list_shards().await.unwrap().remove(0);
    source.split_shard(&parent.shard_id).await.unwrap();
    let after = records(400, 400, 50);
    source.put_records(&after).await.unwrap();

    let shards = source.list_shards().await.unwrap();
    assert_eq!(shards.len(), 3, "{shards:?}");
    let closed = shards
        .iter()
        .find(|s| s.shard_id == parent.shard_id)
        .unwrap();
    assert!(
        closed.ending_sequence.is_some(),
        "the parent is closed: {closed:?}"
    );
    let children: Vec<_> = shards
        .iter()
        .filter(|s| s.shard_id != parent.shard_id)
        .collect();
    for child in &children {
        assert_eq!(child.parent_shard_ids, [parent.shard_id.as_str()]);
        assert!(child.is_open());
    }
    assert_eq!(children[0].starting_hash_key, 0);
    assert_eq!(
        children[0].ending_hash_key + 1,
        children[1].starting_hash_key
    );
    assert_eq!(children[1].ending_hash_key, u128::MAX);

    let mut reader = source
        .shard_reader(
            &parent.shard_id,
            StartPosition::TrimHorizon,
            ReaderOptions::default(),
        )
        .await;
    let parent_records = read_to_end(&mut reader).await;
    let got: Vec<_> = parent_records
        .iter()
        .map(|r| r.sequence_number.clone())
        .collect();
    assert_eq!(
        got, before_sequences,
        "the parent holds exactly the records put before"
    );
    assert_eq!(
        reader.next().await.unwrap(),
        Fetched::EndOfShard,
        "ended stays ended"
    );

    let mut from_children = HashSet::new();
    let mut child_readers = Vec::new();
    for child in &children {
        let reader = source
            .shard_reader(
                &child.shard_id,
                StartPosition::TrimHorizon,
                ReaderOptions::default(),
            )
            .await;
        child_readers.push(reader);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while from_children.len() < after.len() {
        assert!(
            Instant::now() < deadline,
            "children hold {} of 400",
            from_children.len()
        );
        for reader in &mut child_readers {
            if let Ok(fetched) =
                tokio::time::timeout(Duration::from_millis(500), reader.next()).await
            {
                let Fetched::Records { records, .. } = fetched.unwrap() else {
                    panic!("an open child ended");
                };
                assert_in_sequence_order(reader.shard_id(), &records);
                for record in records {
                    assert!(
                        from_children.insert(record.data),
                        "a record came back twice"
                    );
                }
            }
        }
    }
    let expected: HashSet<_> = after.into_iter().map(|(_, data)| data).collect();
    assert_eq!(from_children, expected);
    source.delete_stream().await.unwrap();
}

#[tokio::test]
async fn a_reader_keeps_retrying_while_nothing_listens() {
    kinesis_endpoint();
    // Port 1: nothing listens there, every connection is refused.
    let source =
        KinesisSource::from_env_with_endpoint(&unique_stream("down"), "http://127.0.0.1:1")
            .await
            .unwrap_or_else(|err| panic!("{err}: {START_HINT}"));
    let mut reader = source
        .shard_reader(
            "shardId-000000000000",
            StartPosition::TrimHorizon,
            ReaderOptions::default(),
        )
        .await;
    let waited = tokio::time::timeout(Duration::from_secs(3), reader.next()).await;
    assert!(
        waited.is_err(),
        "next() returned instead of retrying: {waited:?}"
    );
    assert!(
        reader.retries().get("network") >= 3,
        "{:?}",
        reader.retries().snapshot()
    );
    assert_eq!(reader.retries().total(), reader.retries().get("network"));

    // Control-plane calls retry briefly, then say what is wrong.
    let err = tokio::time::timeout(Duration::from_secs(60), source.list_shards())
        .await
        .expect("list_shards gives up")
        .unwrap_err();
    assert_eq!(err.cause(), "network");
    assert!(err.to_string().contains("ListShards"), "{err}");
}

#[tokio::test]
async fn errors_retrying_cannot_fix_are_returned() {
    kinesis_endpoint();
    let source = KinesisSource::from_env(&unique_stream("missing"))
        .await
        .unwrap();
    let err = source.list_shards().await.unwrap_err();
    assert_eq!(
        (err.cause(), err.is_retriable()),
        ("not_found", false),
        "{err}"
    );

    let mut reader = source
        .shard_reader(
            "shardId-000000000000",
            StartPosition::TrimHorizon,
            ReaderOptions::default(),
        )
        .await;
    let err = reader.next().await.unwrap_err();
    assert_eq!(
        (err.cause(), err.is_retriable()),
        ("not_found", false),
        "{err}"
    );
    assert!(err.to_string().contains("shardId-000000000000"), "{err}");

    // A sequence number that is not in the shard: an invalid argument.
    let source = new_stream("bad-sequence", 1).await;
    let shard = source.list_shards().await.unwrap().remove(0).shard_id;
    let bad = StartPosition::AfterSequence("12345".into());
    let mut reader = source
        .shard_reader(&shard, bad, ReaderOptions::default())
        .await;
    let err = reader.next().await.unwrap_err();
    assert_eq!(
        (err.cause(), err.is_retriable()),
        ("invalid_argument", false),
        "{err}"
    );
    source.delete_stream().await.unwrap();
}

#[tokio::test]
async fn ensure_stream_is_idempotent_and_at_timestamp_reads_from_a_time() {
    let source = new_stream("idempotent", 2).await;
    source.ensure_stream(2).await.unwrap();
    assert_eq!(source.list_shards().await.unwrap().len(), 2);

    source.put_records(&records(0, 50, 1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let from = SystemTime::now();
    let later = records(50, 30, 1);
    source.put_records(&later).await.unwrap();
    // One partition key: every record is in the same shard.
    let mut got = Vec::new();
    for shard in source.list_shards().await.unwrap() {
        let mut reader = source
            .shard_reader(
                &shard.shard_id,
                StartPosition::AtTimestamp(from),
                ReaderOptions::default(),
            )
            .await;
        while let Ok(fetched) =
            tokio::time::timeout(Duration::from_millis(1000), reader.next()).await
        {
            if let Fetched::Records { records, .. } = fetched.unwrap() {
                got.extend(records.into_iter().map(|r| r.data));
            }
        }
    }
    let expected: Vec<_> = later.into_iter().map(|(_, data)| data).collect();
    assert_eq!(got, expected);
    source.delete_stream().await.unwrap();
}
