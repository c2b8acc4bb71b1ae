//! The real `loadgen` binary against the real pipeline: Mosquitto, `ingest
//! gateway` (CoAP and its MQTT bridge), kinesalite and `ingest consume` into
//! PostgreSQL. Each test's devices have their own prefix, so tests that
//! share the broker count only their own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tests::consumer::{ConsumerProcess, create_stream};
use tests::gateway::{GatewayProcess, free_udp_port, read_stream};
use tests::{START_HINT, TestDb, free_port, run_loadgen, stdio};

/// A prefix of this test run's own (device ids are <prefix>-000042).
fn prefix(test: &str) -> String {
    format!("lg{test}{}", std::process::id())
}

fn mqtt_url() -> String {
    std::env::var("INGEST_MQTT_URL")
        .unwrap_or_else(|_| panic!("INGEST_MQTT_URL is not set: {START_HINT}"))
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("loadgen-{}-{name}", std::process::id()))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("the JSON report")).expect("JSON")
}

/// A gateway with its MQTT bridge subscribed to loadgen's topics, ready.
async fn gateway_with_bridge(stream: &str, name: &str) -> GatewayProcess {
    let gateway = GatewayProcess::start(
        stream,
        &[
            "--mqtt-url",
            &mqtt_url(),
            "--mqtt-topic",
            "devices/+/telemetry",
            "--mqtt-client-id",
            &format!("{name}-gateway"),
        ],
        &[],
    )
    .await;
    let subscribed = gateway
        .wait_for_metric(
            "ingest_gateway_mqtt_subscribed",
            &[],
            1.0,
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(
        subscribed,
        1.0,
        "the gateway's MQTT bridge did not subscribe within 30 s:\n{}",
        gateway.log_text()
    );
    gateway
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_mixed_run_lands_every_record_exactly_once() {
    let name = prefix("small");
    let db = TestDb::migrated("loadgen_small").await;
    let (stream, source) = create_stream("loadgen-small", 2).await;
    let gateway = gateway_with_bridge(&stream, &name).await;
    let mut consumer = ConsumerProcess::start(&db.url, &stream, "loadgen-small", &[]);
    let json = scratch("small.json");
    let coap = gateway.coap.to_string();

    let output = run_loadgen(
        &[
            "--devices",
            "200",
            "--protocol",
            "mixed",
            "--duration",
            "10s",
            "--warmup",
            "1s",
            "--seed",
            "11",
            "--prefix",
            &name,
            "--mqtt-url",
            &mqtt_url(),
            "--coap-addr",
            &coap,
            "--verify-database-url",
            &db.url,
            "--json",
            json.to_str().unwrap(),
        ],
        Duration::from_secs(300),
    );
    assert!(output.status.success(), "{}", stdio(&output));
    let report = read_json(&json);

    // Both protocols sent and had every message acknowledged.
    let mut sent = 0;
    for protocol in ["mqtt", "coap"] {
        let figures = &report["protocols"][protocol];
        assert_eq!(figures["devices"], 100, "{report:#}");
        let protocol_sent = figures["sent"].as_u64().unwrap();
        assert!(protocol_sent >= 1000, "{report:#}");
        assert_eq!(figures["failed"], serde_json::json!({}), "{report:#}");
        assert_eq!(figures["uncertain"], serde_json::json!({}), "{report:#}");
        sent += protocol_sent;
    }
    let verification = &report["verification"];
    assert_eq!(verification["expected"].as_u64(), Some(sent), "{report:#}");
    assert_eq!(verification["delivered"].as_u64(), Some(sent), "{report:#}");
    assert_eq!(verification["lost"], 0, "{report:#}");
    assert_eq!(verification["duplicated"], 0, "{report:#}");

    // Independently of loadgen: one row per (device, ts) of the check
    // metric... and as many distinct records as were sent, none twice.
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT count(DISTINCT (device, time)), count(*) FILTER (WHERE n > 1)
             FROM (SELECT device, time, metric, count(*) AS n
                   FROM telemetry.samples_named WHERE device LIKE $1 || '-%'
                   GROUP BY 1, 2, 3) per_sample",
            &[&name],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0) as u64, sent);
    assert_eq!(row.get::<_, i64>(1), 0, "a sample landed twice");

    consumer.terminate(Duration::from_secs(30));
    drop(gateway);
    source.delete_stream().await.unwrap();
    std::fs::remove_file(json).ok();
    db.drop().await;
}

/// loadgen signs as the README says (its own implementation of the scheme):
/// a gateway that requires signatures takes every message of its devices,
/// and refuses those of a device whose key loadgen does not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_coap_devices_are_taken_by_a_gateway_that_requires_keys() {
    use std::os::unix::fs::PermissionsExt;
    let name = prefix("signed");
    let (stream, source) = create_stream("loadgen-signed", 1).await;
    // Four devices, one per house; the gateway knows all four keys, loadgen
    // only the first three.
    let keys: Vec<String> = (0..4)
        .map(|i| format!("{name}-h{i:05}/{name}-{i:06} secret-{i}\n"))
        .collect();
    let gateway_keys = scratch("gateway-keys");
    std::fs::write(&gateway_keys, keys.concat()).unwrap();
    std::fs::set_permissions(&gateway_keys, std::fs::Permissions::from_mode(0o600)).unwrap();
    let loadgen_keys = scratch("loadgen-keys");
    std::fs::write(&loadgen_keys, keys[..3].concat()).unwrap();
    let gateway = GatewayProcess::start(
        &stream,
        &[
            "--auth-keys",
            gateway_keys.to_str().unwrap(),
            "--require-auth",
        ],
        &[],
    )
    .await;
    let json = scratch("signed.json");
    let output = run_loadgen(
        &[
            "--devices",
            "4",
            "--devices-per-house",
            "1",
            "--protocol",
            "coap",
            "--coap-non-share",
            "0",
            "--rate",
            "5",
            "--duration",
            "4s",
            "--warmup",
            "1s",
            "--seed",
            "5",
            "--prefix",
            &name,
            "--coap-addr",
            &gateway.coap.to_string(),
            "--coap-keys",
            loadgen_keys.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    let report = read_json(&json);
    let coap = &report["protocols"]["coap"];
    // The unsigned fourth device's messages fail with 4.01, so loadgen
    // reports failure; every other message is acknowledged.
    assert!(!output.status.success(), "{}", stdio(&output));
    let failed = coap["failed"].as_object().expect("failures").clone();
    assert_eq!(failed.keys().collect::<Vec<_>>(), ["4.01"], "{report:#}");
    let refused = failed["4.01"].as_u64().unwrap();
    let acked = coap["acked"].as_u64().unwrap();
    // The fourth device's share, and the other three's.
    assert!(refused >= 10 && refused * 2 < acked, "{report:#}");
    assert_eq!(coap["uncertain"], serde_json::json!({}), "{report:#}");

    let records = read_stream(
        &source,
        acked as usize,
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(records.len() as u64, acked, "{report:#}");
    let mut devices: Vec<&str> = records.iter().map(|r| r.partition_key.as_str()).collect();
    devices.sort();
    devices.dedup();
    let expected: Vec<String> = (0..3).map(|i| format!("{name}-{i:06}")).collect();
    assert_eq!(devices, expected);
    drop(gateway);
    source.delete_stream().await.unwrap();
    for file in [gateway_keys, loadgen_keys, json] {
        std::fs::remove_file(file).ok();
    }
}

/// The record fields a replayed message must keep: a recorded payload, or a
/// record the gateway put into the stream.
fn identity(record: &Value) -> (String, String, i64, String) {
    (
        record["device"].as_str().unwrap_or_default().to_owned(),
        record["house"].as_str().unwrap_or_default().to_owned(),
        record["ts"].as_i64().unwrap_or_default(),
        record["fields"].to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_sends_exactly_what_was_recorded() {
    let name = prefix("replay");
    let capture = scratch("traffic.jsonl");
    let again = scratch("traffic-again.jsonl");
    let record = |out: &Path| {
        run_loadgen(
            &[
                "record",
                "--devices",
                "20",
                "--duration",
                "3s",
                "--warmup",
                "0s",
                "--rate",
                "2",
                "--seed",
                "5",
                "--prefix",
                &name,
                "--out",
                out.to_str().unwrap(),
            ],
            Duration::from_secs(60),
        )
    };
    let output = record(&capture);
    assert!(output.status.success(), "{}", stdio(&output));
    let recorded_text = std::fs::read_to_string(&capture).unwrap();
    let recorded: Vec<Value> = recorded_text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert!(recorded.len() >= 100, "{} messages", recorded.len());
    let protocols: BTreeMap<String, usize> =
        recorded.iter().fold(BTreeMap::new(), |mut counts, line| {
            *counts
                .entry(line["protocol"].as_str().unwrap().to_owned())
                .or_default() += 1;
            counts
        });
    assert_eq!(protocols.len(), 2, "both protocols: {protocols:?}");

    // The same seed records the same traffic; only the start time moves ts.
    let output = record(&again);
    assert!(output.status.success(), "{}", stdio(&output));
    let recorded_again: Vec<Value> = std::fs::read_to_string(&again)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let without_ts = |line: &Value| {
        let mut payload: Value = serde_json::from_str(line["payload"].as_str().unwrap()).unwrap();
        payload["ts"] = Value::Null;
        (
            line["offset_us"].clone(),
            line["device"].clone(),
            line["target"].clone(),
            payload,
        )
    };
    assert_eq!(
        recorded.iter().map(without_ts).collect::<Vec<_>>(),
        recorded_again.iter().map(without_ts).collect::<Vec<_>>()
    );

    // Replayed through the real broker and gateway into the stream.
    let (stream, source) = create_stream("loadgen-replay", 1).await;
    let gateway = gateway_with_bridge(&stream, &name).await;
    let json = scratch("replay.json");
    let output = run_loadgen(
        &[
            "replay",
            capture.to_str().unwrap(),
            "--speed",
            "4",
            "--mqtt-url",
            &mqtt_url(),
            "--coap-addr",
            &gateway.coap.to_string(),
            "--json",
            json.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    assert!(output.status.success(), "{}", stdio(&output));
    let report = read_json(&json);
    let sent: u64 = ["mqtt", "coap"]
        .iter()
        .map(|p| report["protocols"][p]["acked"].as_u64().unwrap())
        .sum();
    assert_eq!(sent, recorded.len() as u64, "{report:#}");

    let mut expected: Vec<_> = recorded
        .iter()
        .map(|line| identity(&serde_json::from_str(line["payload"].as_str().unwrap()).unwrap()))
        .collect();
    let mut replayed: Vec<_> = read_stream(
        &source,
        recorded.len(),
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
    .await
    .iter()
    .map(|record| identity(&serde_json::from_slice(&record.data).unwrap()))
    .filter(|(device, ..)| device.starts_with(&name))
    .collect();
    expected.sort();
    replayed.sort();
    assert_eq!(replayed, expected);

    drop(gateway);
    source.delete_stream().await.unwrap();
    for file in [capture, again, json] {
        std::fs::remove_file(file).ok();
    }
}

/// Runs loadgen against something unreachable: it must stop within 30 s
/// with exit status 1, nothing on stdout, and one line on stderr that starts
/// with `error`.
fn assert_fails_in_one_line(args: &[&str], error: &str) {
    let output = run_loadgen(args, Duration::from_secs(30));
    assert_eq!(output.status.code(), Some(1), "{}", stdio(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with(error), "{stderr}");
    assert!(output.stdout.is_empty(), "{}", stdio(&output));
}

#[test]
fn an_unreachable_broker_or_gateway_is_one_line_and_a_failure() {
    let closed_tcp = free_port();
    let broker = format!("mqtt://127.0.0.1:{closed_tcp}");
    assert_fails_in_one_line(
        &[
            "--devices",
            "10",
            "--protocol",
            "mqtt",
            "--mqtt-url",
            &broker,
        ],
        &format!("error: cannot reach the MQTT broker at {broker}: "),
    );
    let closed_udp = free_udp_port();
    let gateway = format!("127.0.0.1:{closed_udp}");
    assert_fails_in_one_line(
        &[
            "--devices",
            "10",
            "--protocol",
            "coap",
            "--coap-addr",
            &gateway,
        ],
        &format!("error: cannot reach the CoAP gateway at {gateway}: "),
    );
}
