//! loadgen's `/metrics` (`--metrics-addr`) as the stack's real Prometheus
//! scrapes it: the real loadgen sends over the real broker and gateway, a
//! file-based discovery entry names it (job `ingest-loadgen`, dev/stack's),
//! and what Prometheus stored at the end is what loadgen's report says.

mod observe;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use observe::{PROMETHEUS_HINT, Prometheus};
use serde_json::Value;
use tests::consumer::create_stream;
use tests::gateway::GatewayProcess;
use tests::{START_HINT, free_port, run_loadgen, stdio};

/// A discovery entry in the stack's targets folder; removed when dropped.
struct TargetFile(PathBuf);

impl TargetFile {
    /// Tells Prometheus to scrape 127.0.0.1:`port` as job ingest-loadgen,
    /// labelled `test`.
    fn write(test: &str, port: u16) -> TargetFile {
        let dir = PathBuf::from(
            std::env::var("INGEST_PROMETHEUS_TARGETS").unwrap_or_else(|_| {
                panic!("INGEST_PROMETHEUS_TARGETS is not set: {PROMETHEUS_HINT}")
            }),
        );
        let json = serde_json::json!([{
            "targets": [format!("127.0.0.1:{port}")],
            "labels": { "test": test },
        }]);
        // Written aside and renamed, so Prometheus never reads half a file.
        let aside = dir.join(format!(".loadgen-{test}.tmp"));
        let file = dir.join(format!("loadgen-{test}.json"));
        std::fs::write(&aside, json.to_string()).expect("the targets file");
        std::fs::rename(&aside, &file).expect("the targets file in place");
        TargetFile(file)
    }
}

impl Drop for TargetFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The last value Prometheus stored of each series of `expr` (a selector),
/// summed by protocol. Range selectors skip the staleness markers written
/// when loadgen exits, so the final scrape's values are found.
fn last_by_protocol(prometheus: &Prometheus, expr: &str) -> BTreeMap<String, f64> {
    let query = format!("sum by (protocol) (last_over_time({expr}[5m]))");
    prometheus
        .query(&query)
        .unwrap_or_else(|e| panic!("{query}: {e}"))
        .iter()
        .map(|sample| {
            let protocol = sample["metric"]["protocol"].as_str().unwrap_or("");
            let value = sample["value"][1].as_str().expect("a value");
            (protocol.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_counts_loadgen_reports() {
    let prometheus = Prometheus::from_env();
    let mqtt_url = std::env::var("INGEST_MQTT_URL")
        .unwrap_or_else(|_| panic!("INGEST_MQTT_URL is not set: {START_HINT}"));
    let test = format!("loadgen_metrics_{}", std::process::id());
    let (stream, source) = create_stream("loadgen-metrics", 1).await;
    let gateway = GatewayProcess::start(&stream, &[], &[]).await;
    let port = free_port();
    let _target = TargetFile::write(&test, port);
    let json = std::env::temp_dir().join(format!("{test}.json"));

    let output = run_loadgen(
        &[
            "--devices",
            "40",
            "--protocol",
            "mixed",
            "--rate",
            "2",
            "--duration",
            "6s",
            "--warmup",
            "1s",
            "--seed",
            "14",
            "--prefix",
            &format!("lgm{}", std::process::id()),
            "--mqtt-url",
            &mqtt_url,
            "--coap-addr",
            &gateway.coap.to_string(),
            "--json",
            json.to_str().unwrap(),
            "--quiet",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
            "--metrics-wait",
            "30s",
        ],
        Duration::from_secs(180),
    );
    assert!(output.status.success(), "{}", stdio(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("nothing scraped"),
        "Prometheus did not scrape loadgen's last counts; is `loadgen-*.json` \
         in dev/stack's Prometheus configuration? (`dev/stack up` reloads it)\n{}",
        stdio(&output)
    );
    let report: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON report")).expect("JSON");
    std::fs::remove_file(&json).ok();

    // What the report says, per protocol; a clean run, so every message
    // sent is acknowledged or unconfirmed.
    let figure = |name: &str| -> BTreeMap<String, f64> {
        ["mqtt", "coap"]
            .iter()
            .map(|p| {
                let value = report["protocols"][p][name].as_u64();
                let value = value.unwrap_or_else(|| panic!("{p}.{name} in {report:#}"));
                (p.to_string(), value as f64)
            })
            .collect()
    };
    for protocol in ["mqtt", "coap"] {
        let figures = &report["protocols"][protocol];
        assert_eq!(figures["failed"], serde_json::json!({}), "{report:#}");
        assert_eq!(figures["uncertain"], serde_json::json!({}), "{report:#}");
    }
    let acked = figure("acked");
    assert!(acked.values().all(|&n| n >= 100.0), "{report:#}");
    let expected = [
        ("loadgen_messages_sent_total", figure("sent")),
        ("loadgen_messages_acked_total", acked.clone()),
        ("loadgen_messages_unconfirmed_total", figure("unconfirmed")),
        // Every acknowledgement is observed once.
        ("loadgen_ack_latency_seconds_count", acked),
    ];

    // The last scrape reached Prometheus's database just before loadgen
    // exited; wait for it to be queryable.
    let own = format!("{{job=\"ingest-loadgen\", test=\"{test}\"}}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let scraped: Vec<(&str, BTreeMap<String, f64>)> = expected
            .iter()
            .map(|(name, _)| {
                (
                    *name,
                    last_by_protocol(&prometheus, &format!("{name}{own}")),
                )
            })
            .collect();
        let wanted: Vec<(&str, BTreeMap<String, f64>)> = expected
            .iter()
            .map(|(name, figures)| (*name, figures.clone()))
            .collect();
        if scraped == wanted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus's last values of loadgen's metrics (job ingest-loadgen) are not \
             the report's within 20 s:\nscraped {scraped:#?}\nreported {wanted:#?}\n{}",
            stdio(&output)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Nothing failed, so no failure series; the process's own CPU and memory.
    for failures in [
        "loadgen_messages_failed_total",
        "loadgen_messages_uncertain_total",
    ] {
        let found = last_by_protocol(&prometheus, &format!("{failures}{own}"));
        assert!(found.values().all(|&n| n == 0.0), "{failures}: {found:?}");
    }
    for (metric, floor) in [
        ("process_resident_memory_bytes", 1_000_000.0),
        ("process_cpu_seconds_total", 0.0),
    ] {
        let found = last_by_protocol(&prometheus, &format!("{metric}{own}"));
        let value = found.get("").copied();
        assert!(
            value.is_some_and(|v| v >= floor),
            "{metric}{own}: {found:?}"
        );
    }

    drop(gateway);
    source.delete_stream().await.unwrap();
}

#[test]
fn a_metrics_address_in_use_is_one_line_and_a_failure() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let output = run_loadgen(
        &["--devices", "1", "--metrics-addr", &addr],
        Duration::from_secs(30),
    );
    assert_eq!(output.status.code(), Some(1), "{}", stdio(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("error: cannot serve metrics on {addr}: ")),
        "{stderr}"
    );
    assert!(output.stdout.is_empty(), "{}", stdio(&output));
}
