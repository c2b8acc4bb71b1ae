//! Running real `ingest consume` processes against the stack's Kinesis
//! emulator and a test database, and putting records for them to read.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ingest::source::kinesis::KinesisSource;
use tokio_postgres::Client;

use crate::{START_HINT, ingest_bin};

/// A stream of its own for one test, named after it and the process, created
/// with `shards` shards in the stack's Kinesis emulator.
pub async fn create_stream(test_name: &str, shards: u32) -> (String, KinesisSource) {
    assert!(
        std::env::var("AWS_ENDPOINT_URL_KINESIS").is_ok(),
        "AWS_ENDPOINT_URL_KINESIS is not set: {START_HINT}"
    );
    let name = format!("{test_name}-{}", std::process::id());
    let source = KinesisSource::from_env(&name)
        .await
        .expect("a Kinesis client from the environment");
    source.ensure_stream(shards).await.unwrap_or_else(|error| {
        panic!("cannot create stream {name} in the Kinesis emulator: {error}; {START_HINT}")
    });
    (name, source)
}

/// The canonical record of `device` at `ts` (epoch ms) with one field `v`.
pub fn record(device: &str, ts: i64, value: f64) -> (String, Bytes) {
    let json = format!(r#"{{"device":"{device}","house":"h","ts":{ts},"fields":{{"v":{value}}}}}"#);
    (device.to_string(), Bytes::from(json))
}

/// `count` records from `devices` devices, with values 1, 2, 3... so that
/// per-series sums tell a lost or doubled record apart.
pub fn records(devices: usize, count: usize, first_ts: i64) -> Vec<(String, Bytes)> {
    (0..count)
        .map(|i| {
            record(
                &format!("dev-{}", i % devices),
                first_ts + i as i64,
                (i + 1) as f64,
            )
        })
        .collect()
}

/// A running `ingest consume`, killed when dropped.
#[derive(Debug)]
pub struct ConsumerProcess {
    pub child: Child,
    pub worker_id: String,
}

impl ConsumerProcess {
    /// Starts a worker with short lease times, so that tests see takeovers quickly.
    pub fn start(
        database_url: &str,
        stream: &str,
        worker_id: &str,
        extra: &[&str],
    ) -> ConsumerProcess {
        Self::spawn(
            database_url,
            stream,
            worker_id,
            extra,
            &[],
            Stdio::inherit(),
        )
    }

    /// Like `start`, with extra environment variables (e.g. another AWS endpoint).
    pub fn start_with_env(
        database_url: &str,
        stream: &str,
        worker_id: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> ConsumerProcess {
        Self::spawn(
            database_url,
            stream,
            worker_id,
            extra,
            env,
            Stdio::inherit(),
        )
    }

    /// Like `start`, with the worker's log written to `log` for the test to read.
    pub fn start_logged(
        database_url: &str,
        stream: &str,
        worker_id: &str,
        extra: &[&str],
        log: &std::path::Path,
    ) -> ConsumerProcess {
        let file = std::fs::File::create(log).expect("the log file");
        Self::spawn(
            database_url,
            stream,
            worker_id,
            extra,
            &[],
            Stdio::from(file),
        )
    }

    fn spawn(
        database_url: &str,
        stream: &str,
        worker_id: &str,
        extra: &[&str],
        env: &[(&str, &str)],
        stderr: Stdio,
    ) -> ConsumerProcess {
        let mut command = Command::new(ingest_bin());
        command.args(["consume", "--stream", stream, "--worker-id", worker_id]);
        if !extra.contains(&"--metrics-addr") {
            command.args(["--metrics-addr", "off"]);
        }
        command
            .args([
                "--lease-ttl",
                "3s",
                "--lease-interval",
                "500ms",
                "--batch-age",
                "200ms",
                "--shard-sync-interval",
                "2s",
            ])
            .args(extra)
            .env("INGEST_DATABASE_URL", database_url)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info,tokio_postgres=warn")
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = command.spawn().expect("ingest consume starts");
        ConsumerProcess {
            child,
            worker_id: worker_id.to_string(),
        }
    }

    /// SIGKILL: no chance to commit or release anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status (bounded wait).
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "ingest consume did not exit within {within:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether it is still running (not exited).
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }
}

impl Drop for ConsumerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `query` (one bigint) until it returns `expected` or `within` passes;
/// returns the last value. A bound for a test to end, not a speed assertion.
pub async fn wait_for_count(client: &Client, query: &str, expected: i64, within: Duration) -> i64 {
    let deadline = Instant::now() + within;
    loop {
        let count: i64 = client
            .query_one(query, &[])
            .await
            .expect("count query")
            .get(0);
        if count >= expected || Instant::now() >= deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Per series: (device, rows, sum of values), for comparing with what was put.
pub async fn per_device(client: &Client) -> Vec<(String, i64, f64)> {
    client
        .query(
            "SELECT device, count(*), sum(value) FROM telemetry.samples_named GROUP BY device ORDER BY device",
            &[],
        )
        .await
        .expect("samples are readable")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}

/// What `per_device` should return for `records` made by [`records`].
pub fn expected_per_device(records: &[(String, Bytes)]) -> Vec<(String, i64, f64)> {
    let mut sums: std::collections::BTreeMap<String, (i64, f64)> = Default::default();
    for (device, data) in records {
        let text = std::str::from_utf8(data).expect("utf-8");
        let value: f64 = text
            .rsplit_once("\"v\":")
            .and_then(|(_, rest)| rest.trim_end_matches('}').parse().ok())
            .expect("a record made by records()");
        let entry = sums.entry(device.clone()).or_default();
        entry.0 += 1;
        entry.1 += value;
    }
    sums.into_iter()
        .map(|(device, (count, sum))| (device, count, sum))
        .collect()
}
