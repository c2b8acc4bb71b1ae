//! A stream's life as Kinesis lives it, end to end with real `ingest consume`
//! processes: named by its name or its ARN, deleted and created again, read
//! from `latest` across a handoff, and resharded long enough ago that the
//! parent aged out of the retention period.
//!
//! The ARN tests run on kinesis-mock (INGEST_KINESIS_MOCK_URL): kinesalite
//! takes stream names only.

use std::time::{Duration, Instant};

use ingest::source::kinesis::KinesisSource;
use tests::consumer::{
    ConsumerProcess, create_stream, expected_per_device, per_device, records, wait_for_count,
};
use tests::kinesis_retention::RetentionProxy;
use tests::{START_HINT, TestDb, base_ts};
use tokio_postgres::Client;

/// Generous bound for a test's records to land; a bound, not a speed target.
const LAND_WITHIN: Duration = Duration::from_secs(90);
const SAMPLES: &str = "SELECT count(*) FROM telemetry.samples";

/// The lease rows of every stream, as (lease key, shard, checkpoint, ended).
async fn leases(client: &Client) -> Vec<(String, String, Option<String>, bool)> {
    client
        .query(
            "SELECT stream, shard_id, checkpoint, ended FROM ingest.shard_leases ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// The lease keys registered for the stream `name`, oldest first.
async fn lease_keys(client: &Client, name: &str) -> Vec<String> {
    client
        .query(
            "SELECT lease_key FROM ingest.streams WHERE name = $1 ORDER BY created_at",
            &[&name],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Waits (bounded) until `worker` holds the lease of `shard` of stream `name`.
async fn wait_for_owner(client: &Client, name: &str, shard: &str, worker: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let owner: Option<String> = client
            .query_opt(
                "SELECT owner FROM ingest.shard_leases
                 WHERE stream IN (SELECT lease_key FROM ingest.streams WHERE name = $1)
                   AND shard_id = $2 AND expires_at > now()",
                &[&name, &shard],
            )
            .await
            .unwrap()
            .and_then(|r| r.get(0));
        if owner.as_deref() == Some(worker) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{worker} never took {shard} (owner {owner:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The stack's kinesis-mock, which takes stream ARNs.
fn kinesis_mock_url() -> String {
    std::env::var("INGEST_KINESIS_MOCK_URL")
        .unwrap_or_else(|_| panic!("INGEST_KINESIS_MOCK_URL is not set: {START_HINT}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_by_name_and_a_fleet_by_arn_share_one_lease_set() {
    let db = TestDb::migrated("identity_name_arn").await;
    let client = db.client().await;
    let url = kinesis_mock_url();
    let name = format!("name-arn-{}", std::process::id());
    let source = KinesisSource::from_env_with_endpoint(&name, &url)
        .await
        .expect("a Kinesis client");
    source
        .ensure_stream(2)
        .await
        .unwrap_or_else(|e| panic!("cannot create {name} in kinesis-mock at {url}: {e}"));
    let arn = source
        .describe_stream()
        .await
        .unwrap()
        .expect("the stream")
        .arn;
    assert!(arn.starts_with("arn:"), "{arn}");

    let env = [("AWS_ENDPOINT_URL_KINESIS", url.as_str())];
    let _by_name = ConsumerProcess::start_with_env(&db.url, &name, "by-name", &[], &env);
    let _by_arn = ConsumerProcess::start_with_env(&db.url, &arn, "by-arn", &[], &env);
    let put = records(40, 2_000, base_ts());
    source.put_records(&put).await.expect("records are put");

    let landed = wait_for_count(&client, SAMPLES, put.len() as i64, LAND_WITHIN).await;
    // Give a second reading of the same records the time to show up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        per_device(&client).await,
        expected_per_device(&put),
        "rows and sums per series (landed {landed})"
    );
    let keys = lease_keys(&client, &name).await;
    assert_eq!(
        keys.len(),
        1,
        "one identity for the name and the ARN: {keys:?}"
    );
    assert!(keys[0].starts_with(&format!("{arn}@")), "{keys:?}");
    let rows = leases(&client).await;
    assert_eq!(rows.len(), 2, "one lease set of two shards: {rows:?}");
    assert!(rows.iter().all(|(key, ..)| *key == keys[0]), "{rows:?}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_arn_against_an_emulator_that_refuses_arns_fails_on_one_line() {
    let db = TestDb::migrated("identity_arn_refused").await;
    let (name, _source) = create_stream("arn-refused", 1).await;
    let arn = format!("arn:aws:kinesis:us-east-1:000000000000:stream/{name}");
    let log = std::env::temp_dir().join(format!("arn-refused-{}.log", std::process::id()));
    let mut worker = ConsumerProcess::start_logged(&db.url, &arn, "arn-w1", &[], &log);
    let deadline = Instant::now() + Duration::from_secs(60);
    while worker.is_running() {
        assert!(
            Instant::now() < deadline,
            "ingest consume --stream <ARN> against kinesalite still runs after 60 s: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = worker.child.wait().unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{status}: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("refused the stream's ARN") && errors[0].contains("--stream <name>"),
        "{stderr}"
    );
    std::fs::remove_file(&log).ok();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recreated_stream_starts_fresh_and_its_old_leases_are_kept_aside() {
    let db = TestDb::migrated("identity_recreated").await;
    let client = db.client().await;
    let (name, source) = create_stream("recreated", 1).await;
    let first = land_and_stop(&db, &client, &name, &source).await;
    let old = leases(&client).await;
    assert_eq!(old.len(), 1, "{old:?}");
    assert!(
        old[0].2.is_some(),
        "a checkpoint in the old stream: {old:?}"
    );

    // The same name, another stream: sequence numbers start over.
    recreate(&source).await;
    let second = records(10, 200, base_ts() + 10_000_000);
    source.put_records(&second).await.unwrap();
    let log = std::env::temp_dir().join(format!("recreated-{}.log", std::process::id()));
    let mut worker = ConsumerProcess::start_logged(&db.url, &name, "w2", &[], &log);

    let all: Vec<_> = first.iter().cloned().chain(second).collect();
    let landed = wait_for_count(&client, SAMPLES, all.len() as i64, LAND_WITHIN).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        per_device(&client).await,
        expected_per_device(&all),
        "every record of both streams once (landed {landed})"
    );
    let keys = lease_keys(&client, &name).await;
    assert_eq!(keys.len(), 2, "two streams of one name: {keys:?}");
    let rows = leases(&client).await;
    assert!(
        rows.contains(&old[0]),
        "the old stream's lease is kept aside as it was: {old:?} in {rows:?}"
    );
    assert!(
        rows.iter()
            .any(|(key, shard, checkpoint, _)| *key == keys[1]
                && shard == "shardId-000000000000"
                && checkpoint.is_some()),
        "the new stream has a lease of its own: {rows:?}"
    );

    let output = tests::run_ingest(
        &["status", "--stream", &name, "--database-url", &db.url],
        &[],
    );
    let (stdout, stderr) = tests::text(&output);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("lease key {}", keys[1]))
            && stdout.contains(&format!(
                "kept aside: the leases of an older stream of the same name, {}",
                keys[0]
            )),
        "{stdout}"
    );

    // Created again while w2 reads it (no records in the new one): w2 sees
    // another stream under the name at its next shard sync, and stops.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    recreate(&source).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while worker.is_running() {
        assert!(
            Instant::now() < deadline,
            "w2 still runs on a recreated stream: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(!worker.child.wait().unwrap().success(), "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("error:") && l.contains("deleted and created again")),
        "{stderr}"
    );
    std::fs::remove_file(&log).ok();
    db.drop().await;
}

/// Puts 300 records into `name`, has one worker land them all, and stops it
/// with SIGTERM: a stream read to its checkpoint. Returns the records.
async fn land_and_stop(
    db: &TestDb,
    client: &Client,
    name: &str,
    source: &KinesisSource,
) -> Vec<(String, bytes::Bytes)> {
    let first = records(10, 300, base_ts());
    source.put_records(&first).await.unwrap();
    let mut worker = ConsumerProcess::start(&db.url, name, "w1", &[]);
    assert_eq!(
        wait_for_count(client, SAMPLES, first.len() as i64, LAND_WITHIN).await,
        first.len() as i64
    );
    assert!(worker.terminate(Duration::from_secs(30)).success());
    first
}

/// Deletes the stream, waits until it is gone, and creates it again with
/// one shard, in a later second than the old one (see below).
async fn recreate(source: &KinesisSource) {
    source.delete_stream().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while source.describe_stream().await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the stream is never deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // kinesalite stamps creation times in whole seconds, so a stream made
    // again within the same second would have the old one's identity (on
    // AWS, deleting and creating a stream take far longer than a second).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    source.ensure_stream(1).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_keyed_by_the_name_before_the_upgrade_are_adopted_without_reading_twice() {
    let db = TestDb::migrated("identity_upgrade").await;
    let client = db.client().await;
    let (name, source) = create_stream("upgrade", 1).await;
    let first = land_and_stop(&db, &client, &name, &source).await;
    // As a version before migration 0006 left it: keyed by the name.
    client
        .batch_execute(&format!(
            "UPDATE ingest.shard_leases SET stream = '{name}';
             DELETE FROM ingest.streams;"
        ))
        .await
        .unwrap();

    let second = records(10, 200, base_ts() + 10_000_000);
    source.put_records(&second).await.unwrap();
    let _worker = ConsumerProcess::start(&db.url, &name, "w2", &[]);
    let all: Vec<_> = first.iter().cloned().chain(second).collect();
    let landed = wait_for_count(&client, SAMPLES, all.len() as i64, LAND_WITHIN).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        per_device(&client).await,
        expected_per_device(&all),
        "nothing read twice (landed {landed})"
    );
    let keys = lease_keys(&client, &name).await;
    let rows = leases(&client).await;
    assert_eq!(rows.len(), 1, "the old row moved to the identity: {rows:?}");
    assert_eq!(rows[0].0, keys[0], "{rows:?}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handoff_before_the_first_commit_keeps_the_latest_start_point() {
    let db = TestDb::migrated("start_latest_handoff").await;
    let client = db.client().await;
    let (name, source) = create_stream("latest-handoff", 1).await;
    let shard = "shardId-000000000000";
    // Before any worker: `latest` leaves these out.
    let before = records(10, 100, base_ts());
    source.put_records(&before).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;

    let mut w1 = ConsumerProcess::start(&db.url, &name, "w1", &["--start", "latest"]);
    wait_for_owner(&client, &name, shard, "w1").await;
    assert!(w1.terminate(Duration::from_secs(30)).success());
    let checkpoint: Option<String> = client
        .query_one("SELECT checkpoint FROM ingest.shard_leases", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(checkpoint, None, "no commit before the handoff");

    // Between the owners: the next owner must read these.
    let between = records(10, 200, base_ts() + 10_000_000);
    source.put_records(&between).await.unwrap();
    let _w2 = ConsumerProcess::start(&db.url, &name, "w2", &["--start", "latest"]);
    wait_for_owner(&client, &name, shard, "w2").await;
    let after = records(10, 100, base_ts() + 20_000_000);
    source.put_records(&after).await.unwrap();

    let expected: Vec<_> = between.into_iter().chain(after).collect();
    let landed = wait_for_count(&client, SAMPLES, expected.len() as i64, LAND_WITHIN).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        per_device(&client).await,
        expected_per_device(&expected),
        "what came after the first owner took the lease, once; nothing before (landed {landed})"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parent_past_the_retention_period_is_ended_and_its_children_are_read() {
    let db = TestDb::migrated("expired_parent").await;
    let client = db.client().await;
    let (name, source) = create_stream("expired-parent", 1).await;
    let parent = "shardId-000000000000";
    let first = records(10, 200, base_ts());
    source.put_records(&first).await.unwrap();
    let mut worker = ConsumerProcess::start(&db.url, &name, "w1", &[]);
    assert_eq!(
        wait_for_count(&client, SAMPLES, first.len() as i64, LAND_WITHIN).await,
        first.len() as i64
    );
    assert!(worker.terminate(Duration::from_secs(30)).success());

    // The outage: a reshard, records in the children, and the parent ages out.
    source.split_shard(parent).await.unwrap();
    let children = records(10, 300, base_ts() + 10_000_000);
    source.put_records(&children).await.unwrap();
    let kinesis = std::env::var("AWS_ENDPOINT_URL_KINESIS")
        .unwrap_or_else(|_| panic!("AWS_ENDPOINT_URL_KINESIS is not set: {START_HINT}"));
    let proxy = RetentionProxy::start(&kinesis).await;
    proxy.expire(parent);

    let port = tests::free_port();
    let addr = format!("127.0.0.1:{port}");
    let _worker = ConsumerProcess::start_with_env(
        &db.url,
        &name,
        "w2",
        &["--metrics-addr", &addr],
        &[("AWS_ENDPOINT_URL_KINESIS", &proxy.url())],
    );
    let all: Vec<_> = first.into_iter().chain(children).collect();
    let landed = wait_for_count(&client, SAMPLES, all.len() as i64, LAND_WITHIN).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        per_device(&client).await,
        expected_per_device(&all),
        "the children's records once (landed {landed})"
    );
    let rows = leases(&client).await;
    assert!(
        rows.iter()
            .any(|(_, shard, _, ended)| shard == parent && *ended),
        "the parent is ended: {rows:?}"
    );
    let (status, body) = tests::http_get(port, "/metrics").expect("/metrics answers");
    assert_eq!(status, 200);
    assert!(
        body.lines().any(|l| l == "ingest_shards_expired_total 1"),
        "{body}"
    );
    db.drop().await;
}
