//! The raw archive: consumer -> Firehose -> S3, against the stack's moto
//! server (Firehose delivers to S3 at once there) and Kinesis emulator.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ingest::archive::provision::{ArchiveSpec, lifecycle, provision, s3_client};
use tests::consumer::{
    ConsumerProcess, create_stream, expected_per_device, per_device, records, wait_for_count,
};
use tests::proxy::TcpProxy;
use tests::{TestDb, base_ts};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

const SAMPLES: &str = "SELECT count(*) FROM telemetry.samples";
const LAND_WITHIN: Duration = Duration::from_secs(90);

fn spec(name: &str) -> ArchiveSpec {
    let unique = format!("{name}-{}", std::process::id());
    ArchiveSpec {
        bucket: format!("ingest-test-{unique}"),
        delivery_stream: format!("raw-{unique}"),
        role_arn: "arn:aws:iam::123456789012:role/ingest-firehose".into(),
        glacier_after_days: 30,
        expire_after_days: Some(365),
        buffer_seconds: 60,
        buffer_mib: 5,
    }
}

async fn provisioned(name: &str) -> ArchiveSpec {
    assert!(
        std::env::var("AWS_ENDPOINT_URL").is_ok(),
        "AWS_ENDPOINT_URL is not set: {}",
        tests::START_HINT
    );
    let spec = spec(name);
    provision(&spec)
        .await
        .unwrap_or_else(|e| panic!("{e}; {}", tests::START_HINT));
    spec
}

/// What the archive should hold for `put`: each record once, newlines as spaces.
fn expected_lines(put: &[(String, Bytes)]) -> BTreeMap<Vec<u8>, usize> {
    let mut lines = BTreeMap::new();
    for (_, data) in put {
        let line: Vec<u8> = data
            .iter()
            .map(|&b| if b == b'\n' { b' ' } else { b })
            .collect();
        *lines.entry(line).or_default() += 1;
    }
    lines
}

/// Waits (bounded) until the archive holds at least `expected`'s records.
async fn wait_for_archive(
    bucket: &str,
    expected: &BTreeMap<Vec<u8>, usize>,
) -> BTreeMap<Vec<u8>, usize> {
    let deadline = Instant::now() + LAND_WITHIN;
    loop {
        let lines = tests::archive::archived_lines(bucket, None).await;
        if expected.keys().all(|line| lines.contains_key(line)) || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_archive_holds_every_record_put_into_the_stream() {
    let spec = provisioned("archive-all").await;
    let db = TestDb::migrated("archive_all").await;
    let (stream, source) = create_stream("archive-all", 2).await;
    let mut put = records(20, 1_500, base_ts());
    // A pretty-printed record (newlines as whitespace) and an undecodable one are archived too.
    put.push((
        "pretty".into(),
        Bytes::from_static(b"{\n  \"device\": \"pretty\",\n  \"v\": 1\n}"),
    ));
    put.push(("bad".into(), Bytes::from_static(b"not json at all")));
    source.put_records(&put).await.unwrap();

    let _worker = ConsumerProcess::start(
        &db.url,
        &stream,
        "archive-w1",
        &["--archive-delivery-stream", &spec.delivery_stream],
    );
    let client = db.client().await;
    let good = put.len() as i64 - 1;
    assert_eq!(
        wait_for_count(&client, SAMPLES, good, LAND_WITHIN).await,
        good
    );

    let expected = expected_lines(&put);
    let archived = wait_for_archive(&spec.bucket, &expected).await;
    let missing: Vec<_> = expected
        .keys()
        .filter(|line| !archived.contains_key(*line))
        .collect();
    assert!(
        missing.is_empty(),
        "{} records missing from the archive",
        missing.len()
    );
    let unexpected = archived
        .keys()
        .filter(|line| !expected.contains_key(*line))
        .count();
    assert_eq!(
        unexpected, 0,
        "the archive holds records that were never put"
    );
    let duplicates: usize = archived.values().map(|n| n - 1).sum();
    // At least once: duplicates are allowed, and reported.
    println!(
        "archive: {} records, {duplicates} duplicates",
        expected.len()
    );
    db.drop().await;
}

#[tokio::test]
async fn provisioning_sets_the_glacier_lifecycle_and_a_second_run_changes_nothing() {
    let spec = spec("provision-twice");
    let first = provision(&spec)
        .await
        .unwrap_or_else(|e| panic!("{e}; {}", tests::START_HINT));
    assert!(
        first
            .iter()
            .any(|l| l.contains(&format!("bucket          {}: created", spec.bucket))),
        "{first:?}"
    );
    assert!(
        first
            .iter()
            .any(|l| l.starts_with("lifecycle       created")),
        "{first:?}"
    );
    assert!(
        first.iter().any(|l| l.contains(": created (gzip")),
        "{first:?}"
    );

    let shared = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let state = lifecycle(&s3_client(&shared), &spec.bucket)
        .await
        .unwrap()
        .expect("a lifecycle rule");
    assert!(state.enabled);
    assert_eq!(state.prefix.as_deref(), Some("raw/"));
    assert_eq!(
        (state.glacier_after_days, state.expire_after_days),
        (Some(30), Some(365))
    );

    let second = provision(&spec).await.unwrap();
    assert!(second[0].ends_with(": exists"), "{second:?}");
    assert!(
        second[1].starts_with("lifecycle       unchanged"),
        "{second:?}"
    );
    assert!(second[2].ends_with(": exists"), "{second:?}");

    // A changed setting is applied, and read back.
    let changed = ArchiveSpec {
        glacier_after_days: 7,
        expire_after_days: None,
        ..spec
    };
    let third = provision(&changed).await.unwrap();
    assert!(
        third[1].starts_with("lifecycle       updated")
            && third[1].contains("after 7 days, never expire"),
        "{third:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unavailable_archive_holds_the_checkpoints_and_everything_lands_once_it_is_back() {
    let spec = provisioned("archive-outage").await;
    let db = TestDb::migrated("archive_outage").await;
    let (stream, source) = create_stream("archive-outage", 1).await;
    let moto = std::env::var("AWS_ENDPOINT_URL").unwrap();
    let proxy = TcpProxy::start(&tests::proxy::host_port(&moto)).await;
    let firehose_url = format!("http://{}", proxy.address());
    proxy.cut().await;

    let put = records(10, 500, base_ts());
    source.put_records(&put).await.unwrap();
    let _worker = ConsumerProcess::start_with_env(
        &db.url,
        &stream,
        "outage-w1",
        &["--archive-delivery-stream", &spec.delivery_stream],
        &[("AWS_ENDPOINT_URL_FIREHOSE", &firehose_url)],
    );
    let client = db.client().await;
    // Give it time to read, fail to archive and retry: nothing may move.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM telemetry.samples),
                    (SELECT count(*) FROM ingest.shard_leases WHERE checkpoint IS NOT NULL),
                    (SELECT count(*) FROM ingest.shard_leases WHERE owner = 'outage-w1')",
            &[],
        )
        .await
        .unwrap();
    let (rows, checkpoints, owned): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(owned, 1, "the worker holds the shard");
    assert_eq!(
        (rows, checkpoints),
        (0, 0),
        "rows or a checkpoint moved while the archive was down"
    );

    proxy.restore().await;
    assert_eq!(
        wait_for_count(&client, SAMPLES, put.len() as i64, LAND_WITHIN).await,
        put.len() as i64
    );
    assert_eq!(per_device(&client).await, expected_per_device(&put));
    let expected = expected_lines(&put);
    let archived = wait_for_archive(&spec.bucket, &expected).await;
    assert!(
        expected.keys().all(|line| archived.contains_key(line)),
        "records missing from the archive"
    );
    db.drop().await;
}

/// KPL aggregates (made by AWS's `aws-kinesis-agg`) are archived as their
/// user records, one line each, as Firehose itself de-aggregates them.
#[tokio::test(flavor = "multi_thread")]
async fn kpl_aggregates_are_archived_as_their_user_records() {
    let spec = provisioned("archive-kpl").await;
    let db = TestDb::migrated("archive_kpl").await;
    let (stream, source) = create_stream("archive-kpl", 1).await;
    let user = records(10, 300, base_ts());
    let aggregated = tests::kpl::aggregate(&user, Some(8 * 1024));
    assert!(aggregated.len() > 1, "several aggregates");
    source.put_records(&aggregated).await.unwrap();
    let _worker = ConsumerProcess::start(
        &db.url,
        &stream,
        "kpl-w1",
        &["--archive-delivery-stream", &spec.delivery_stream],
    );
    let client = db.client().await;
    assert_eq!(
        wait_for_count(&client, SAMPLES, user.len() as i64, LAND_WITHIN).await,
        user.len() as i64
    );
    let expected = expected_lines(&user);
    let archived = wait_for_archive(&spec.bucket, &expected).await;
    assert_eq!(archived, expected, "each user record once, as a line");
    db.drop().await;
}

/// A stand-in Firehose endpoint that answers the first PutRecordBatch with
/// its first entry failed and a FailedPutCount larger than the entries sent
/// (no real Firehose does; a broken emulator or proxy may), and accepts
/// everything after. Returns its address and the entries it accepted.
async fn firehose_overcounting_failures() -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let (kept, calls_seen) = (accepted.clone(), calls.clone());
    tokio::spawn(async move {
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            let (accepted, calls) = (kept.clone(), calls_seen.clone());
            tokio::spawn(async move {
                let mut socket = tokio::io::BufReader::new(socket);
                while let Some(body) = read_request(&mut socket).await {
                    let request: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    let entries: Vec<Vec<u8>> = request["Records"]
                        .as_array()
                        .map(|records| {
                            records
                                .iter()
                                .map(|r| base64_decode(r["Data"].as_str().unwrap()))
                                .collect()
                        })
                        .unwrap_or_default();
                    let first_call = calls.fetch_add(1, Ordering::SeqCst) == 0;
                    let responses: Vec<serde_json::Value> = entries
                        .iter()
                        .enumerate()
                        .map(|(i, _)| {
                            if first_call && i == 0 {
                                serde_json::json!({"ErrorCode": "ServiceUnavailableException",
                                                   "ErrorMessage": "slow down"})
                            } else {
                                serde_json::json!({"RecordId": format!("r{i}")})
                            }
                        })
                        .collect();
                    let failed = if first_call { 3 * entries.len() + 1 } else { 0 };
                    {
                        let mut accepted = accepted.lock().unwrap();
                        let skip = usize::from(first_call);
                        accepted.extend(entries.into_iter().skip(skip));
                    }
                    let answer = serde_json::json!({
                        "FailedPutCount": failed,
                        "Encrypted": false,
                        "RequestResponses": responses,
                    })
                    .to_string();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\n\
                         x-amzn-RequestId: stub\r\nContent-Length: {}\r\n\r\n",
                        answer.len()
                    );
                    let stream = socket.get_mut();
                    stream.write_all(head.as_bytes()).await.unwrap();
                    stream.write_all(answer.as_bytes()).await.unwrap();
                }
            });
        }
    });
    (address, accepted)
}

/// One HTTP/1.1 request's body (by Content-Length), None at end of stream.
async fn read_request(socket: &mut tokio::io::BufReader<tokio::net::TcpStream>) -> Option<Vec<u8>> {
    let mut length = 0;
    loop {
        let mut line = String::new();
        if socket.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length];
    socket.read_exact(&mut body).await.ok()?;
    Some(body)
}

fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut bits, mut count) = (0u32, 0);
    for &c in text.as_bytes().iter().filter(|&&c| c != b'=') {
        let value = ALPHABET.iter().position(|&a| a == c).expect("base64") as u32;
        bits = (bits << 6) | value;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    out
}

/// PutRecordBatch answered with a FailedPutCount over the entries sent: the
/// consumer trusts the per-record responses, resends the one failed entry,
/// and neither panics nor loses or doubles a line.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_put_count_larger_than_the_batch_resends_only_the_failed_entry() {
    let db = TestDb::migrated("archive_overcount").await;
    let (stream, source) = create_stream("archive-overcount", 1).await;
    let (firehose, accepted) = firehose_overcounting_failures().await;
    // Lines are packed into Firehose records of up to 1,000 KiB: 250
    // records padded to 5 KB (JSON whitespace) make a call of 2 entries.
    let put: Vec<(String, Bytes)> = records(5, 250, base_ts())
        .into_iter()
        .map(|(key, data)| {
            let padded = [&data[..1], &[b' '; 5_000][..], &data[1..]].concat();
            (key, Bytes::from(padded))
        })
        .collect();
    source.put_records(&put).await.unwrap();
    let mut worker = ConsumerProcess::start_with_env(
        &db.url,
        &stream,
        "overcount-w1",
        &["--archive-delivery-stream", "raw-stub"],
        &[("AWS_ENDPOINT_URL_FIREHOSE", &firehose)],
    );
    let client = db.client().await;
    assert_eq!(
        wait_for_count(&client, SAMPLES, put.len() as i64, LAND_WITHIN).await,
        put.len() as i64,
        "rows land"
    );
    let accepted = accepted.lock().unwrap().clone();
    assert!(
        accepted.len() >= 2,
        "one call's entries, the failed one resent: {} entries accepted",
        accepted.len()
    );
    let mut lines = BTreeMap::new();
    for entry in accepted.iter() {
        assert!(entry.ends_with(b"\n"), "an entry holds whole lines");
        for line in entry[..entry.len() - 1].split(|&b| b == b'\n') {
            *lines.entry(line.to_vec()).or_default() += 1;
        }
    }
    assert_eq!(lines, expected_lines(&put), "each record accepted once");
    assert!(worker.is_running(), "the worker exited");
    db.drop().await;
}
