//! Running a real `ingest gateway` against the stack's Kinesis emulator (or
//! a proxy in front of it) and Mosquitto; talking CoAP to it with raw
//! datagrams (built with coap-lite) or the real `coap-client-notls`;
//! publishing with the real `mosquitto_pub`; reading the stream back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use ingest::source::kinesis::{Fetched, KinesisSource, ReaderOptions, Record, StartPosition};
use tokio::net::UdpSocket;

use crate::{START_HINT, free_port, http_get, ingest_bin};

/// How long a gateway may take to start answering CoAP.
const START_WITHIN: Duration = Duration::from_secs(30);

/// A running `ingest gateway`, killed when dropped.
#[derive(Debug)]
pub struct GatewayProcess {
    child: Child,
    /// Where it serves CoAP.
    pub coap: SocketAddr,
    /// Where it serves /metrics.
    pub metrics_port: u16,
    /// Its stderr.
    pub log: PathBuf,
}

impl GatewayProcess {
    /// Starts `ingest gateway --stream stream` on free loopback ports with
    /// `args` and extra environment `env` (no INGEST_* variable inherited),
    /// and waits until it answers CoAP.
    pub async fn start(stream: &str, args: &[&str], env: &[(&str, &str)]) -> GatewayProcess {
        assert!(
            std::env::var("AWS_ENDPOINT_URL_KINESIS").is_ok(),
            "AWS_ENDPOINT_URL_KINESIS is not set: {START_HINT}"
        );
        let coap_port = free_udp_port();
        let metrics_port = free_port();
        let log = std::env::temp_dir().join(format!("ingest-gateway-{stream}-{coap_port}.log"));
        let file = std::fs::File::create(&log).expect("the log file");
        let mut command = Command::new(ingest_bin());
        command
            .args(["gateway", "--stream", stream])
            .args(["--coap-bind", &format!("127.0.0.1:{coap_port}")])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(args);
        for (key, _) in std::env::vars() {
            if key.starts_with("INGEST_") {
                command.env_remove(key);
            }
        }
        command
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file));
        let child = command.spawn().expect("ingest gateway starts");
        let mut gateway = GatewayProcess {
            child,
            coap: SocketAddr::from(([127, 0, 0, 1], coap_port)),
            metrics_port,
            log,
        };
        gateway.wait_until_answering().await;
        gateway
    }

    async fn wait_until_answering(&mut self) {
        let peer = CoapPeer::new(self.coap).await;
        let deadline = Instant::now() + START_WITHIN;
        let mut id = 1;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                panic!("ingest gateway exited with {status}:\n{}", self.log_text());
            }
            let ping = request(MessageType::Confirmable, RequestType::Get, "/health", id);
            if peer
                .exchange(&ping, Duration::from_millis(300))
                .await
                .is_some()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ingest gateway did not answer CoAP within {START_WITHIN:?}:\n{}",
                self.log_text()
            );
            id += 1;
        }
    }

    /// The gateway's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The sum of the samples of metric `name` whose labels contain every
    /// one of `labels` (e.g. `reason="too_large"`); 0 when there is none.
    pub fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let (status, body) = http_get(self.metrics_port, "/metrics").expect("/metrics answers");
        assert_eq!(status, 200, "{body}");
        body.lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (metric, rest) = match series.split_once('{') {
                    Some((metric, rest)) => (metric, rest),
                    None => (series, ""),
                };
                (metric == name && labels.iter().all(|label| rest.contains(label)))
                    .then(|| value.parse::<f64>().ok())
                    .flatten()
            })
            .sum()
    }

    /// Waits until metric `name` (with `labels`) reaches `at_least`; returns
    /// its last value. A bound for the test to end, not a speed check.
    pub async fn wait_for_metric(
        &self,
        name: &str,
        labels: &[&str],
        at_least: f64,
        within: Duration,
    ) -> f64 {
        let deadline = Instant::now() + within;
        loop {
            let value = self.metric(name, labels);
            if value >= at_least || Instant::now() >= deadline {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: a crash, nothing acknowledged or answered afterwards.
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
                "ingest gateway did not exit within {within:?} of SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A UDP port on loopback that was free a moment ago.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A CoAP endpoint of the test's own: one UDP socket talking to the gateway.
#[derive(Debug)]
pub struct CoapPeer {
    socket: UdpSocket,
    server: SocketAddr,
}

impl CoapPeer {
    /// A socket on loopback, talking to `server`.
    pub async fn new(server: SocketAddr) -> CoapPeer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("a UDP socket");
        CoapPeer { socket, server }
    }

    /// Sends `packet` as it is.
    pub async fn send(&self, packet: &Packet) {
        let bytes = packet
            .to_bytes_unlimited()
            .expect("the test's packet encodes");
        self.send_bytes(&bytes).await;
    }

    /// Sends raw bytes.
    pub async fn send_bytes(&self, bytes: &[u8]) {
        self.socket
            .send_to(bytes, self.server)
            .await
            .expect("send to the gateway");
    }

    /// The next datagram within `within`, parsed; `None` if none came.
    pub async fn recv(&self, within: Duration) -> Option<Packet> {
        self.recv_bytes(within)
            .await
            .map(|bytes| Packet::from_bytes(&bytes).expect("the gateway sends valid CoAP"))
    }

    /// The next datagram within `within`, as bytes.
    pub async fn recv_bytes(&self, within: Duration) -> Option<Vec<u8>> {
        let mut buffer = vec![0u8; 65_536];
        match tokio::time::timeout(within, self.socket.recv_from(&mut buffer)).await {
            Ok(Ok((length, _))) => Some(buffer[..length].to_vec()),
            _ => None,
        }
    }

    /// Sends `packet` and waits for the first answer.
    pub async fn exchange(&self, packet: &Packet, within: Duration) -> Option<Packet> {
        self.send(packet).await;
        self.recv(within).await
    }

    /// Acknowledges a confirmable message from the gateway (a separate response).
    pub async fn acknowledge(&self, message: &Packet) {
        let mut ack = Packet::new();
        ack.header.set_version(1);
        ack.header.set_type(MessageType::Acknowledgement);
        ack.header.code = MessageClass::Empty;
        ack.header.message_id = message.header.message_id;
        self.send(&ack).await;
    }
}

/// A request to `path` (with an optional `?query`), token = the message id's bytes.
pub fn request(kind: MessageType, method: RequestType, path: &str, message_id: u16) -> Packet {
    let mut packet = Packet::new();
    packet.header.set_version(1);
    packet.header.set_type(kind);
    packet.header.code = MessageClass::Request(method);
    packet.header.message_id = message_id;
    packet.set_token(message_id.to_be_bytes().to_vec());
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        packet.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    for parameter in query.split('&').filter(|s| !s.is_empty()) {
        packet.add_option(CoapOption::UriQuery, parameter.as_bytes().to_vec());
    }
    packet
}

/// A confirmable POST of `payload` to `path`.
pub fn post(path: &str, payload: &[u8], message_id: u16) -> Packet {
    let mut packet = request(
        MessageType::Confirmable,
        RequestType::Post,
        path,
        message_id,
    );
    packet.payload = payload.to_vec();
    packet
}

/// The response code of `packet` as CoAP writes it (`2.04`).
pub fn code(packet: &Packet) -> String {
    packet.header.code.to_string()
}

/// Runs the real `coap-client-notls` with `args`; returns stdout and stderr
/// together (it prints error codes such as `4.00 ...` on stderr).
pub async fn coap_client(args: &[&str]) -> String {
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("coap-client-notls")
            .args(["-B", "60"])
            .args(args)
            .output(),
    )
    .await
    .expect("coap-client-notls finishes within 120 s")
    .unwrap_or_else(|error| {
        panic!("cannot run coap-client-notls (libcoap3-bin, installed by dev/stack up): {error}")
    });
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The stack's broker (INGEST_MQTT_URL) as (host, port), for the
/// Mosquitto command-line clients.
fn mqtt_host_port() -> (String, String) {
    let url = std::env::var("INGEST_MQTT_URL")
        .unwrap_or_else(|_| panic!("INGEST_MQTT_URL is not set: {START_HINT}"));
    let address = url.trim_start_matches("mqtt://");
    let (host, port) = address.rsplit_once(':').expect("host:port");
    (host.to_owned(), port.to_owned())
}

/// Runs the real `mosquitto_pub` against the stack's broker.
pub async fn mosquitto_pub(topic: &str, payload: &str, qos: u8) {
    let (host, port) = mqtt_host_port();
    let output = tokio::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            &host,
            "-p",
            &port,
            "-q",
            &qos.to_string(),
            "-t",
            topic,
            "-m",
            payload,
        ])
        .output()
        .await
        .unwrap_or_else(|error| {
            panic!("cannot run mosquitto_pub (mosquitto-clients, from dev/stack up): {error}")
        });
    assert!(
        output.status.success(),
        "mosquitto_pub to {topic} failed: {}; {START_HINT}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Ends the persistent MQTT session of `client_id` in the stack's broker
/// (a gateway that will not come back): `mosquitto_sub` connects under that
/// id with a clean session, which discards the old one and what it queued,
/// and leaves at once. Otherwise the broker keeps queueing for it.
pub fn end_mqtt_session(client_id: &str) {
    let (host, port) = mqtt_host_port();
    let output = Command::new("mosquitto_sub")
        .args(["-h", &host, "-p", &port, "-i", client_id])
        .args(["-t", "ingest/session-end", "-E", "-W", "10"])
        .output()
        .unwrap_or_else(|error| {
            panic!("cannot run mosquitto_sub (mosquitto-clients, from dev/stack up): {error}")
        });
    assert!(
        output.status.success(),
        "mosquitto_sub ending the session of {client_id} failed: {}; {START_HINT}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs the real `mosquitto_pub` against the stack's broker with `args`
/// (topic, QoS, `-f file`, `-l` ...) and `stdin`; returns its output (its
/// status is for the caller to judge: a broker may refuse a message).
pub async fn mosquitto_pub_with(args: &[&str], stdin: &[u8]) -> std::process::Output {
    use tokio::io::AsyncWriteExt;
    let (host, port) = mqtt_host_port();
    let mut child = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", &host, "-p", &port])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| {
            panic!("cannot run mosquitto_pub (mosquitto-clients, from dev/stack up): {error}")
        });
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin)
        .await
        .expect("write to mosquitto_pub");
    drop(input);
    tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("mosquitto_pub finishes within 120 s")
        .expect("mosquitto_pub runs")
}

/// Every record in the stream, a KPL aggregate's user records each on its
/// own (under the aggregate's sequence number): waits until at least
/// `expected` arrived (failing after `within`), then reads on for `settle`
/// to see any extra.
pub async fn read_stream(
    source: &KinesisSource,
    expected: usize,
    within: Duration,
    settle: Duration,
) -> Vec<Record> {
    let shards = source.list_shards().await.expect("the stream's shards");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut readers = tokio::task::JoinSet::new();
    for shard in &shards {
        let mut reader = source
            .shard_reader(
                &shard.shard_id,
                StartPosition::TrimHorizon,
                ReaderOptions::default(),
            )
            .await;
        let tx = tx.clone();
        readers.spawn(async move {
            while let Ok(Fetched::Records { records, .. }) = reader.next().await {
                if tx.send(user_records(records)).is_err() {
                    return;
                }
            }
        });
    }
    let mut records = Vec::new();
    let deadline = Instant::now() + within;
    let mut settled_at: Option<Instant> = None;
    loop {
        if let Ok(Some(batch)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            records.extend(batch);
        }
        let now = Instant::now();
        if records.len() >= expected {
            let settled = *settled_at.get_or_insert(now + settle);
            if now >= settled {
                readers.abort_all();
                return records;
            }
        } else {
            assert!(
                now < deadline,
                "only {} of {expected} records arrived in the stream within {within:?}: {:?}",
                records.len(),
                records.iter().map(text).collect::<Vec<_>>()
            );
        }
    }
}

/// The records, each aggregate's user records in its place.
pub fn user_records(records: Vec<Record>) -> Vec<Record> {
    records
        .into_iter()
        .flat_map(|record| {
            if !ingest::kpl::is_aggregated(&record.data) {
                return vec![record];
            }
            let users = ingest::kpl::deaggregate(&record.data).expect("a well-formed aggregate");
            users
                .into_iter()
                .map(|user| Record {
                    partition_key: user.partition_key,
                    data: user.data,
                    ..record.clone()
                })
                .collect()
        })
        .collect()
}

/// A record's data as text.
pub fn text(record: &Record) -> String {
    String::from_utf8_lossy(&record.data).into_owned()
}

/// Records by partition key, each key's data texts in stream order.
pub fn by_key(records: &[Record]) -> HashMap<String, Vec<String>> {
    let mut keys: HashMap<String, Vec<String>> = HashMap::new();
    for record in records {
        keys.entry(record.partition_key.clone())
            .or_default()
            .push(text(record));
    }
    keys
}

/// POSTs `payload` (JSON) to `uri` with aiocoap, through `coap_post.py`
/// beside this file in the stack's Python: aiocoap sends anything over
/// 1024 bytes block-wise (RFC 7959 Block1). Returns the final response as
/// `{"code", "size1", "block1": [num, more, szx], "payload"}`.
pub async fn aiocoap_post(uri: &str, payload: &[u8]) -> serde_json::Value {
    let stack = std::env::var("INGEST_STACK_DIR")
        .unwrap_or_else(|_| panic!("INGEST_STACK_DIR is not set: {START_HINT}"));
    let python = PathBuf::from(stack).join("venv/bin/python");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/coap_post.py");
    let file = tempfile_with(payload);
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&python)
            .arg(&script)
            .arg(uri)
            .arg(&file)
            .output(),
    )
    .await
    .expect("coap_post.py finishes within 120 s")
    .unwrap_or_else(|error| panic!("cannot run {}: {error}; {START_HINT}", python.display()));
    let _ = std::fs::remove_file(&file);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "coap_post.py {uri} failed ({}): {}; the stack's venv may lack aiocoap \
         (dev/aws/requirements.txt): {START_HINT}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|error| panic!("coap_post.py printed {stdout:?}: {error}"))
}

/// A file in the temporary folder holding `bytes`, named uniquely.
pub fn tempfile_with(bytes: &[u8]) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("ingest-coap-{}-{n}", std::process::id()));
    std::fs::write(&path, bytes).expect("a temporary file");
    path
}
