//! The dashboards and alerts against the stack's real Prometheus, scraping a
//! real gateway and real consumers under load from the real loadgen, with
//! the faults that some panels and alerts need caused for real: dead
//! letters, a record too large to archive, a delivery stream that does not
//! exist, a table locked under a worker, a Consul DNS server that does not
//! answer, the database turned read-only under the workers (a demoted
//! primary), a gateway with no Kinesis and no broker, a steal, killed
//! processes.
//!
//! Every PromQL expression of every panel must return data over the test's
//! span, every alert's expression must parse and evaluate, and those of
//! the alerts whose fault the test causes must return data. Every metric a
//! panel or an alert names must have series scraped from this test's
//! processes.

mod observe;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use ingest::archive::provision::{ArchiveSpec, provision};
use ingest::source::kinesis::KinesisSource;
use observe::{
    PROMETHEUS_HINT, Prometheus, alert_rules, expand_promql, metric_names, panel_queries,
    runbook_queries,
};
use tests::consumer::{ConsumerProcess, create_stream, records, wait_for_count};
use tests::gateway::{CoapPeer, GatewayProcess, code, free_udp_port, request};
use tests::{START_HINT, TestDb, free_port, loadgen_bin};

/// The test's label on its targets, to find its own series.
const TEST_LABEL: &str = "prometheus_live";

/// Alerts whose fault this test causes; their expressions must return data.
/// The other two cannot be caused here: kinesalite reports MillisBehindLatest
/// 0 for every open shard, however far behind (IngestShardFallingBehind), and
/// fewer leases than held steadily for 5 minutes takes longer than a test
/// should (IngestShardUnowned). Their expressions are still evaluated, their
/// metrics must be scraped, and promtool's unit tests cover their firing.
const CAUSED: &[&str] = &[
    "IngestRecordsReadButNotCommitted",
    "IngestWorkerDown",
    "IngestDeadLettersRising",
    "IngestArchiveFailing",
    "IngestDatabasePrimaryLostRepeatedly",
    "IngestDnsFailures",
    "IngestGatewayDown",
    "IngestGatewayAnswering503",
    "IngestGatewayKinesisUnreachable",
    "IngestMqttBridgeUnsubscribed",
];

/// File-based discovery entries written for Prometheus; removed when dropped.
struct Targets {
    files: Vec<PathBuf>,
}

impl Targets {
    fn new() -> Targets {
        Targets { files: Vec::new() }
    }

    /// Tells Prometheus to scrape `ports` on loopback as `kind`
    /// ("consumer" or "gateway", the stack's two jobs).
    fn add(&mut self, kind: &str, name: &str, ports: &[u16]) {
        let dir = PathBuf::from(
            std::env::var("INGEST_PROMETHEUS_TARGETS").unwrap_or_else(|_| {
                panic!("INGEST_PROMETHEUS_TARGETS is not set: {PROMETHEUS_HINT}")
            }),
        );
        let targets: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let json = serde_json::json!([{ "targets": targets, "labels": { "test": TEST_LABEL } }]);
        let file = dir.join(format!("{kind}-{name}-{}.json", std::process::id()));
        // Written aside and renamed, so Prometheus never reads half a file.
        let aside = dir.join(format!(".{kind}-{name}.tmp"));
        std::fs::write(&aside, json.to_string()).expect("the targets file");
        std::fs::rename(&aside, &file).expect("the targets file in place");
        self.files.push(file);
    }
}

impl Drop for Targets {
    fn drop(&mut self) {
        for file in &self.files {
            let _ = std::fs::remove_file(file);
        }
    }
}

fn mqtt_url() -> String {
    std::env::var("INGEST_MQTT_URL")
        .unwrap_or_else(|_| panic!("INGEST_MQTT_URL is not set: {START_HINT}"))
}

/// Waits until `expr` returns a non-empty vector; fails with `what` after `within`.
async fn wait_for(prometheus: &Prometheus, expr: &str, what: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        match prometheus.query(expr) {
            Ok(result) if !result.is_empty() => return,
            Ok(_) => {}
            Err(error) => panic!("{expr}: {error}"),
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {within:?} ({expr} stayed empty)"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn scraped(metric: &str) -> String {
    format!("{metric}{{test=\"{TEST_LABEL}\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panels_and_alerts_answer_from_a_real_prometheus() {
    let prometheus = Prometheus::from_env();
    let started = SystemTime::now();
    let mut targets = Targets::new();
    let db = TestDb::migrated("prometheus_live").await;
    let (stream, source) = create_stream("prometheus-live", 2).await;
    let unique = format!("prometheus-live-{}", std::process::id());
    let archive = ArchiveSpec {
        bucket: format!("ingest-test-{unique}"),
        delivery_stream: format!("raw-{unique}"),
        role_arn: "arn:aws:iam::123456789012:role/ingest-firehose".into(),
        glacier_after_days: 30,
        expire_after_days: None,
        buffer_seconds: 60,
        buffer_mib: 5,
    };
    provision(&archive)
        .await
        .unwrap_or_else(|e| panic!("{e}; {START_HINT}"));

    // The pipeline: a gateway with its MQTT bridge, a first worker (a
    // second comes later and steals a lease), both archiving.
    let gateway = GatewayProcess::start(
        &stream,
        &[
            "--mqtt-url",
            &mqtt_url(),
            "--mqtt-topic",
            "devices/+/telemetry",
            "--mqtt-client-id",
            &unique,
        ],
        &[],
    )
    .await;
    let (port_1, port_2) = (free_port(), free_port());
    let worker = |port: u16, id: &str| {
        ConsumerProcess::start(
            &db.url,
            &stream,
            id,
            &[
                "--metrics-addr",
                &format!("127.0.0.1:{port}"),
                "--archive-delivery-stream",
                &archive.delivery_stream,
            ],
        )
    };
    let _worker_1 = worker(port_1, "live-1");

    // A gateway with no Kinesis and no broker behind it: 5.03, failing
    // PutRecords calls, an unsubscribed bridge.
    let nowhere = |port: u16| format!("127.0.0.1:{port}");
    let mut broken_gateway = GatewayProcess::start(
        &stream,
        &[
            "--mqtt-url",
            &format!("mqtt://{}", nowhere(free_port())),
            "--mqtt-topic",
            "devices/+/telemetry",
            "--mqtt-client-id",
            &format!("{unique}-broken"),
            "--put-timeout",
            "1s",
        ],
        &[(
            "AWS_ENDPOINT_URL_KINESIS",
            &format!("http://{}", nowhere(free_port())),
        )],
    )
    .await;

    // A worker whose delivery stream does not exist (it reads, cannot
    // archive, so commits nothing), on a stream of its own.
    let (stuck_stream, stuck_source) = create_stream("prometheus-live-stuck", 1).await;
    stuck_source
        .put_records(&records(2, 20, now_ms()))
        .await
        .expect("records put");
    let stuck_port = free_port();
    let _stuck_worker = ConsumerProcess::start(
        &db.url,
        &stuck_stream,
        "live-stuck",
        &[
            "--metrics-addr",
            &nowhere(stuck_port),
            "--archive-delivery-stream",
            &format!("missing-{unique}"),
        ],
    );

    // A worker whose writes wait on a lock (a stuck transaction): it reads,
    // queues, commits nothing. In a database of its own.
    let locked_db = TestDb::migrated("prometheus_live_locked").await;
    let (locked_stream, locked_source) = create_stream("prometheus-live-locked", 1).await;
    let locked_port = free_port();
    let mut locked_worker = ConsumerProcess::start(
        &locked_db.url,
        &locked_stream,
        "live-locked",
        &[
            "--metrics-addr",
            &nowhere(locked_port),
            "--queue-chunks",
            "256",
        ],
    );

    // A worker that finds the database through a Consul DNS server that
    // does not answer.
    let dns_port = free_port();
    let pg = db.url.split_once('@').expect("user@host").1;
    let pg_port = pg
        .split_once(':')
        .expect("host:port")
        .1
        .split_once('/')
        .expect("port/db")
        .0;
    let consul_url = format!(
        "postgres://ingest:ingest@master.tsdb.service.consul:{pg_port}/{}",
        db.name
    );
    let _dns_worker = ConsumerProcess::start(
        &consul_url,
        &stream,
        "live-dns",
        &[
            "--metrics-addr",
            &nowhere(dns_port),
            "--consul-dns",
            &nowhere(free_udp_port()),
        ],
    );

    targets.add(
        "consumer",
        "live",
        &[port_1, port_2, stuck_port, locked_port, dns_port],
    );
    targets.add(
        "gateway",
        "live",
        &[gateway.metrics_port, broken_gateway.metrics_port],
    );
    wait_for(
        &prometheus,
        &format!("{} == 1", scraped("ingest_gateway_mqtt_subscribed")),
        "Prometheus did not scrape the gateway's subscribed bridge",
        Duration::from_secs(60),
    )
    .await;

    // The locked worker holds its lease; then its table is locked.
    wait_for(
        &prometheus,
        &format!("ingest_leases_held{{instance=\"127.0.0.1:{locked_port}\"}} > 0"),
        "the locked worker took no lease",
        Duration::from_secs(60),
    )
    .await;
    let lock = tests::connect(&locked_db.url).await;
    lock.batch_execute("BEGIN; LOCK TABLE telemetry.samples IN SHARE MODE")
        .await
        .expect("the lock");

    // Load: loadgen over MQTT and CoAP; the second worker joins meanwhile.
    let loadgen = Command::new(loadgen_bin())
        .args([
            "--devices",
            "100",
            "--protocol",
            "mixed",
            "--duration",
            "25s",
            "--warmup",
            "1s",
        ])
        .args(["--prefix", &format!("live{}", std::process::id())])
        .args([
            "--mqtt-url",
            &mqtt_url(),
            "--coap-addr",
            &gateway.coap.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("loadgen starts");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut worker_2 = worker(port_2, "live-2");

    // Requests the gateways refuse: an unknown path, and records the broken
    // one cannot put (5.03), spread over seconds so that rates see them.
    let peer = CoapPeer::new(gateway.coap).await;
    let broken_peer = CoapPeer::new(broken_gateway.coap).await;
    for id in 0..6u16 {
        let missing = request(
            coap_lite::MessageType::Confirmable,
            coap_lite::RequestType::Get,
            "/nothing",
            40_000 + id,
        );
        let answer = peer
            .exchange(&missing, Duration::from_secs(5))
            .await
            .expect("an answer");
        assert_eq!(code(&answer), "4.04");
        // Non-confirmable: answered once, 5.03 when --put-timeout passed.
        let mut put = request(
            coap_lite::MessageType::NonConfirmable,
            coap_lite::RequestType::Post,
            "/t/h/live-broken",
            41_000 + id,
        );
        put.payload = format!(r#"{{"fields":{{"v":{id}}}}}"#).into_bytes();
        let answer = broken_peer
            .exchange(&put, Duration::from_secs(10))
            .await
            .expect("an answer");
        assert_eq!(code(&answer), "5.03", "{}", broken_gateway.log_text());
        locked_source
            .put_records(&records(2, 10, now_ms()))
            .await
            .expect("records put");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    // Dead letters: one, then (once Prometheus saw its counter) twenty.
    put_raw(&source, 1, b"not json").await;
    wait_for(
        &prometheus,
        &scraped("ingest_dead_letters_total"),
        "no dead letter was scraped",
        Duration::from_secs(60),
    )
    .await;
    put_raw(&source, 20, b"not json").await;
    // A record Kinesis takes but Firehose would not (over 1,000 KiB): not
    // archived, and a dead letter.
    put_raw(&source, 1, &vec![b' '; 1_030_000]).await;

    // The database stops being a primary under the workers for 8 s (read
    // only, as a demoted server is), then is one again.
    let admin = tests::connect(&tests::admin_url()).await;
    let kick = format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{}' AND pid <> pg_backend_pid()",
        db.name
    );
    for setting in [
        "SET default_transaction_read_only = on",
        "RESET default_transaction_read_only",
    ] {
        admin
            .batch_execute(&format!("ALTER DATABASE {} {setting}; {kick}", db.name))
            .await
            .expect("the database's setting changed and its sessions ended");
        tokio::time::sleep(Duration::from_secs(8)).await;
    }

    let output = tokio::task::spawn_blocking(move || loadgen.wait_with_output())
        .await
        .unwrap()
        .expect("loadgen ran");
    assert!(
        output.status.success(),
        "loadgen failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let client = db.client().await;
    wait_for_count(
        &client,
        "SELECT count(*) FROM ingest.dead_letters",
        22,
        Duration::from_secs(60),
    )
    .await;

    // Down: a worker and the broken gateway, their targets left in place.
    worker_2.kill();
    broken_gateway.kill();
    wait_for(
        &prometheus,
        &format!("up{{test=\"{TEST_LABEL}\", job=\"ingest-gateway\"}} == 0"),
        "Prometheus did not see the gateway go down",
        Duration::from_secs(30),
    )
    .await;
    wait_for(
        &prometheus,
        &format!("up{{test=\"{TEST_LABEL}\", job=\"ingest-consumer\"}} == 0"),
        "Prometheus did not see the worker go down",
        Duration::from_secs(30),
    )
    .await;
    // A few scrapes more, so the last evaluation step sees them down.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let ended = SystemTime::now();
    let step = Duration::from_secs(2);

    // Every panel's expression returns data.
    let mut failures = Vec::new();
    let queries = panel_queries("prometheus");
    assert!(queries.len() >= 25, "{queries:?}");
    for query in &queries {
        let expr = expand_promql(&query.text, "30s");
        match prometheus.query_range(&expr, started, ended, step) {
            Err(error) => failures.push(format!("{}: {error}\n  {expr}", query.place)),
            Ok(series) if series.is_empty() => {
                failures.push(format!("{}: no data\n  {expr}", query.place))
            }
            Ok(_) => {}
        }
    }

    // Every alert's expression evaluates; those of the faults caused return data.
    let rules = alert_rules();
    let names: BTreeSet<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    for caused in CAUSED {
        assert!(names.contains(caused), "{caused} is not in the rules file");
    }
    for rule in &rules {
        match prometheus.query_range(&rule.expr, started, ended, step) {
            Err(error) => failures.push(format!("alert {}: {error}", rule.name)),
            Ok(series) if series.is_empty() && CAUSED.contains(&rule.name.as_str()) => failures
                .push(format!(
                    "alert {}: no data though its fault was caused\n  {}",
                    rule.name, rule.expr
                )),
            Ok(_) => {}
        }
    }

    // The runbook's queries evaluate (data or not: most need a fault).
    for query in runbook_queries() {
        if let Err(error) = prometheus.query(&query) {
            failures.push(format!("docs/runbook.md: {query}: {error}"));
        }
    }

    // Every metric named anywhere was scraped from this test's processes.
    let mut used: BTreeMap<String, String> = BTreeMap::new();
    for query in &queries {
        for name in metric_names(&query.text) {
            used.entry(name).or_insert(query.place.clone());
        }
    }
    for rule in &rules {
        for name in metric_names(&rule.expr) {
            used.entry(name).or_insert(format!("alert {}", rule.name));
        }
    }
    for (name, place) in &used {
        let expr = format!("count({})", scraped(name));
        match prometheus.query_range(&expr, started, ended, step) {
            Ok(series) if !series.is_empty() => {}
            other => failures.push(format!(
                "{name} (in {place}) was never scraped from this test's processes: {other:?}"
            )),
        }
    }

    drop(targets);
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    source.delete_stream().await.ok();
    stuck_source.delete_stream().await.ok();
    locked_source.delete_stream().await.ok();
    drop(lock);
    locked_worker.kill();
    locked_db.drop().await;
    db.drop().await;
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn put_raw(source: &KinesisSource, count: usize, data: &[u8]) {
    let batch: Vec<(String, Bytes)> = (0..count)
        .map(|i| (format!("raw-{i}"), Bytes::copy_from_slice(data)))
        .collect();
    source.put_records(&batch).await.expect("records put");
}
