//! `ShardReader` recovery, through a fault-injecting HTTP proxy in front of
//! the real local Kinesis (kinesalite from `dev/stack`): the proxy answers
//! chosen calls with Kinesis errors (an expired iterator, throttling, ...),
//! or stops listening like an emulator that restarts. Kinesalite's own
//! iterators expire after 5 minutes, too slow to wait for in a test.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ingest::source::kinesis::{
    Fetched, KinesisSource, ReaderOptions, Record, ShardReader, StartPosition,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use tests::START_HINT;

/// The local Kinesis address (host:port), checked to be listening.
fn kinesis_address() -> String {
    let url = std::env::var("AWS_ENDPOINT_URL_KINESIS")
        .unwrap_or_else(|_| panic!("AWS_ENDPOINT_URL_KINESIS is not set: {START_HINT}"));
    let address = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    if let Err(err) = std::net::TcpStream::connect(&address) {
        panic!("no Kinesis at {url} ({err}): {START_HINT}");
    }
    address
}

/// One request the proxy saw.
#[derive(Debug, Clone)]
struct Seen {
    /// When it arrived.
    at: Instant,
    /// The operation, from X-Amz-Target (e.g. `GetRecords`).
    operation: String,
    /// The JSON body.
    body: String,
}

#[derive(Debug, Default)]
struct ProxyState {
    /// Errors to answer instead of forwarding: (operation, status, __type).
    faults: VecDeque<(String, u16, String)>,
    /// Every request, in arrival order.
    seen: Vec<Seen>,
}

/// An HTTP/1.1 proxy to kinesalite that can fail calls and go away.
struct FaultProxy {
    address: SocketAddr,
    upstream: String,
    state: Arc<Mutex<ProxyState>>,
    /// The accept loop; aborting it closes the listener and every connection.
    server: Option<JoinHandle<()>>,
}

impl FaultProxy {
    async fn start() -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut proxy = FaultProxy {
            address: listener.local_addr().unwrap(),
            upstream: kinesis_address(),
            state: Arc::default(),
            server: None,
        };
        proxy.serve(listener);
        proxy
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Answers the next call of `operation` with this error.
    fn fail_next(&self, operation: &str, status: u16, error_type: &str) {
        let fault = (operation.to_owned(), status, error_type.to_owned());
        self.state.lock().unwrap().faults.push_back(fault);
    }

    fn seen(&self, operation: &str) -> Vec<Seen> {
        let state = self.state.lock().unwrap();
        state
            .seen
            .iter()
            .filter(|s| s.operation == operation)
            .cloned()
            .collect()
    }

    /// Stops listening: connections are refused, open ones are closed.
    fn go_down(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }

    /// Listens again on the same port.
    async fn come_up(&mut self) {
        for _ in 0..50 {
            if let Ok(listener) = TcpListener::bind(self.address).await {
                self.serve(listener);
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("cannot listen on {} again", self.address);
    }

    fn serve(&mut self, listener: TcpListener) {
        let (state, upstream) = (self.state.clone(), self.upstream.clone());
        self.server = Some(tokio::spawn(async move {
            // Owned here, so that aborting the accept loop closes them all.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let (client, _) = listener.accept().await.unwrap();
                connections.spawn(proxy_connection(client, upstream.clone(), state.clone()));
            }
        }));
    }
}

/// Reads one HTTP message (head and Content-Length body) from `stream`,
/// keeping extra bytes in `buffer`; None when the peer closed.
async fn read_message(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
            let length = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buffer.len() < end + 4 + length {
                let mut chunk = [0u8; 65536];
                let n = stream.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
                buffer.extend_from_slice(&chunk[..n]);
            }
            let body = buffer[end + 4..end + 4 + length].to_vec();
            buffer.drain(..end + 4 + length);
            return Some((head, body));
        }
        let mut chunk = [0u8; 65536];
        let n = stream.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
        buffer.extend_from_slice(&chunk[..n]);
    }
}

async fn proxy_connection(mut client: TcpStream, upstream: String, state: Arc<Mutex<ProxyState>>) {
    let mut buffer = Vec::new();
    while let Some((head, body)) = read_message(&mut client, &mut buffer).await {
        let operation = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("x-amz-target")
                    .then(|| value.trim().to_owned())
            })
            .and_then(|target| target.split_once('.').map(|(_, op)| op.to_owned()))
            .unwrap_or_default();
        let fault = {
            let mut state = state.lock().unwrap();
            let seen = Seen {
                at: Instant::now(),
                operation: operation.clone(),
                body: String::from_utf8_lossy(&body).into_owned(),
            };
            state.seen.push(seen);
            let position = state.faults.iter().position(|(op, _, _)| *op == operation);
            position.and_then(|i| state.faults.remove(i))
        };
        let response = match fault {
            Some((_, status, error_type)) => {
                let json =
                    format!(r#"{{"__type":"{error_type}","message":"injected by the test"}}"#);
                let reason = if status >= 500 {
                    "Internal Server Error"
                } else {
                    "Bad Request"
                };
                let mut response = format!(
                    "HTTP/1.1 {status} {reason}\r\nx-amzn-RequestId: test\r\n\
                     Content-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\n\r\n",
                    json.len()
                )
                .into_bytes();
                response.extend_from_slice(json.as_bytes());
                response
            }
            None => {
                // One upstream connection per request: simple, and kinesalite
                // closing idle connections cannot matter.
                let Ok(mut server) = TcpStream::connect(&upstream).await else {
                    return;
                };
                let mut request = head.into_bytes();
                request.extend_from_slice(b"\r\n\r\n");
                request.extend_from_slice(&body);
                if server.write_all(&request).await.is_err() {
                    return;
                }
                let Some((head, body)) = read_message(&mut server, &mut Vec::new()).await else {
                    return;
                };
                let mut response = head.into_bytes();
                response.extend_from_slice(b"\r\n\r\n");
                response.extend_from_slice(&body);
                response
            }
        };
        if client.write_all(&response).await.is_err() {
            return;
        }
    }
}

/// A new one-shard stream holding `count` records, a direct source for it,
/// and a source that goes through `proxy`.
async fn stream_with_records(
    test: &str,
    count: usize,
    proxy: &FaultProxy,
) -> (KinesisSource, KinesisSource, Vec<Bytes>) {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let name = format!("test-{test}-{}-{nanos}", std::process::id());
    let direct = KinesisSource::from_env(&name)
        .await
        .unwrap_or_else(|err| panic!("{err}: {START_HINT}"));
    direct.ensure_stream(1).await.unwrap();
    let payloads = put(&direct, 0, count).await;
    let proxied = KinesisSource::from_env_with_endpoint(&name, &proxy.url())
        .await
        .unwrap();
    (direct, proxied, payloads)
}

async fn put(source: &KinesisSource, from: usize, count: usize) -> Vec<Bytes> {
    let records: Vec<(String, Bytes)> = (from..from + count)
        .map(|i| {
            (
                format!("device-{}", i % 7),
                Bytes::from(format!("record {i}")),
            )
        })
        .collect();
    source.put_records(&records).await.unwrap();
    records.into_iter().map(|(_, data)| data).collect()
}

async fn shard_of(source: &KinesisSource) -> String {
    source.list_shards().await.unwrap().remove(0).shard_id
}

async fn next_records(reader: &mut ShardReader) -> Vec<Record> {
    match tokio::time::timeout(Duration::from_secs(60), reader.next()).await {
        Ok(Ok(Fetched::Records { records, .. })) => records,
        other => panic!("expected records, got {other:?}"),
    }
}

fn payloads(records: &[Record]) -> Vec<Bytes> {
    records.iter().map(|r| r.data.clone()).collect()
}

#[tokio::test]
async fn recovers_from_an_expired_iterator_and_throttling_without_loss() {
    let proxy = FaultProxy::start().await;
    let (direct, proxied, expected) = stream_with_records("expired", 500, &proxy).await;
    let options = ReaderOptions {
        max_records_per_call: 100,
        ..ReaderOptions::default()
    };
    let mut reader = proxied
        .shard_reader(
            &shard_of(&direct).await,
            StartPosition::TrimHorizon,
            options,
        )
        .await;

    let mut got = next_records(&mut reader).await;
    got.extend(next_records(&mut reader).await);
    let last = reader.last_sequence().unwrap().to_owned();

    proxy.fail_next("GetRecords", 400, "ExpiredIteratorException");
    proxy.fail_next("GetRecords", 400, "ProvisionedThroughputExceededException");
    proxy.fail_next("GetRecords", 400, "KMSThrottlingException");
    proxy.fail_next("GetRecords", 400, "LimitExceededException");
    proxy.fail_next("GetRecords", 500, "InternalFailureException");
    proxy.fail_next("GetRecords", 503, "ServiceUnavailable");
    while got.len() < expected.len() {
        got.extend(next_records(&mut reader).await);
    }
    assert_eq!(payloads(&got), expected, "every record once, in order");

    // The new iterator starts right after the last record returned.
    let iterators = proxy.seen("GetShardIterator");
    assert_eq!(iterators.len(), 2, "{iterators:?}");
    assert!(
        iterators[0].body.contains("TRIM_HORIZON"),
        "{}",
        iterators[0].body
    );
    assert!(
        iterators[1].body.contains("AFTER_SEQUENCE_NUMBER"),
        "{}",
        iterators[1].body
    );
    assert!(
        iterators[1].body.contains(&last),
        "{} lacks {last}",
        iterators[1].body
    );

    let retries = reader.retries();
    for cause in [
        "expired_iterator",
        "throttled",
        "kms_throttled",
        "limit_exceeded",
    ] {
        assert_eq!(retries.get(cause), 1, "{cause}: {:?}", retries.snapshot());
    }
    assert_eq!(retries.get("service_unavailable"), 2);
    assert_eq!(retries.total(), 6);
    direct.delete_stream().await.unwrap();
}

#[tokio::test]
async fn an_expired_first_iterator_starts_over_at_the_start_position() {
    let proxy = FaultProxy::start().await;
    let (direct, proxied, expected) = stream_with_records("expired-first", 50, &proxy).await;
    let mut reader = proxied
        .shard_reader(
            &shard_of(&direct).await,
            StartPosition::TrimHorizon,
            ReaderOptions::default(),
        )
        .await;
    proxy.fail_next("GetRecords", 400, "ExpiredIteratorException");
    assert_eq!(payloads(&next_records(&mut reader).await), expected);
    let iterators = proxy.seen("GetShardIterator");
    assert_eq!(iterators.len(), 2);
    assert!(
        iterators.iter().all(|s| s.body.contains("TRIM_HORIZON")),
        "{iterators:?}"
    );
    direct.delete_stream().await.unwrap();
}

#[tokio::test]
async fn a_permanent_error_is_returned_and_the_reader_can_go_on() {
    let proxy = FaultProxy::start().await;
    let (direct, proxied, expected) = stream_with_records("permanent", 200, &proxy).await;
    let options = ReaderOptions {
        max_records_per_call: 100,
        ..ReaderOptions::default()
    };
    let mut reader = proxied
        .shard_reader(
            &shard_of(&direct).await,
            StartPosition::TrimHorizon,
            options,
        )
        .await;
    let mut got = next_records(&mut reader).await;

    proxy.fail_next("GetRecords", 400, "AccessDeniedException");
    let err = reader.next().await.unwrap_err();
    assert_eq!(
        (err.cause(), err.is_retriable()),
        ("access_denied", false),
        "{err}"
    );
    assert_eq!(reader.retries().total(), 0);

    got.extend(next_records(&mut reader).await);
    assert_eq!(payloads(&got), expected);
    direct.delete_stream().await.unwrap();
}

#[tokio::test]
async fn survives_the_endpoint_going_away_and_coming_back() {
    let mut proxy = FaultProxy::start().await;
    let (direct, proxied, mut expected) = stream_with_records("restart", 100, &proxy).await;
    let mut reader = proxied
        .shard_reader(
            &shard_of(&direct).await,
            StartPosition::TrimHorizon,
            ReaderOptions::default(),
        )
        .await;
    let mut got = next_records(&mut reader).await;

    proxy.go_down();
    expected.extend(put(&direct, 100, 100).await);
    // Dropping next() while it waits must lose nothing.
    for _ in 0..3 {
        let pending = tokio::time::timeout(Duration::from_secs(1), reader.next()).await;
        assert!(
            pending.is_err(),
            "next() returned while the endpoint is down: {pending:?}"
        );
    }
    assert!(
        reader.retries().get("network") >= 3,
        "{:?}",
        reader.retries().snapshot()
    );
    proxy.come_up().await;

    while got.len() < expected.len() {
        got.extend(next_records(&mut reader).await);
    }
    assert_eq!(payloads(&got), expected, "every record once, in order");
    direct.delete_stream().await.unwrap();
}

#[tokio::test]
async fn calls_are_paced_and_an_idle_shard_is_polled_less_and_less() {
    let proxy = FaultProxy::start().await;
    let (direct, proxied, _) = stream_with_records("pacing", 10, &proxy).await;
    let options = ReaderOptions {
        max_records_per_call: 2,
        min_call_interval: Duration::from_millis(100),
        max_idle_wait: Duration::from_millis(800),
    };
    let mut reader = proxied
        .shard_reader(
            &shard_of(&direct).await,
            StartPosition::TrimHorizon,
            options,
        )
        .await;
    for _ in 0..5 {
        next_records(&mut reader).await;
    }
    // Now idle: waits of 100, 200, 400, 800, 800... ms between empty calls.
    let idle = tokio::time::timeout(Duration::from_secs(4), reader.next()).await;
    assert!(idle.is_err(), "{idle:?}");

    let calls: Vec<Instant> = proxy.seen("GetRecords").iter().map(|s| s.at).collect();
    let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1] - w[0]).collect();
    // The proxy sees arrivals, a few ms off the reader's calls: allow 20 ms.
    for gap in &gaps {
        assert!(
            *gap >= Duration::from_millis(80),
            "calls {gap:?} apart: {gaps:?}"
        );
    }
    // At a fixed 100 ms the idle 4 s would take ~40 calls.
    let idle_calls = calls.len() - 5;
    assert!(
        (4..=10).contains(&idle_calls),
        "{idle_calls} idle calls: {gaps:?}"
    );
    assert!(
        gaps.last().unwrap() >= &Duration::from_millis(700),
        "{gaps:?}"
    );
    direct.delete_stream().await.unwrap();
}
