//! A CoAP load client for `ingest gateway`: how many requests per second it
//! sustains into Kinesis with zero loss.
//!
//! Many UDP sockets (distinct endpoints, as devices are), each keeping a
//! window of confirmable POSTs in flight and retransmitting like a CoAP
//! client (ACK_TIMEOUT 2 s, doubling, 4 times). Every request carries a
//! unique number; at the end the stream is read back and every request
//! answered 2.04 must be there (loss), once (duplicates are counted).
//!
//! ```text
//! cargo run --release --example coap_load -- \
//!     --target 127.0.0.1:5683 --stream bench --sockets 256 --window 8 --seconds 30
//! ```
//!
//! A socket sends at most 65,535 requests: a CoAP endpoint must not reuse a
//! message id within EXCHANGE_LIFETIME (247 s), and the gateway would
//! rightly answer a reused one from its cache without a put.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use ingest::source::kinesis::{Fetched, KinesisSource, ReaderOptions, StartPosition};
use tokio::net::UdpSocket;

#[derive(Debug, Clone)]
struct Options {
    target: SocketAddr,
    stream: Option<String>,
    sink: Option<String>,
    sockets: usize,
    window: usize,
    seconds: u64,
    verify_within: u64,
}

fn options() -> Options {
    let mut options = Options {
        target: "127.0.0.1:5683".parse().unwrap(),
        stream: None,
        sink: None,
        sockets: 256,
        window: 8,
        seconds: 30,
        verify_within: 300,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let value = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--target" => options.target = value.parse().expect("--target host:port"),
            "--stream" => options.stream = Some(value),
            "--verify-sink" => options.sink = Some(value),
            "--sockets" => options.sockets = value.parse().expect("--sockets N"),
            "--window" => options.window = value.parse().expect("--window N"),
            "--seconds" => options.seconds = value.parse().expect("--seconds N"),
            "--verify-within" => options.verify_within = value.parse().expect("--verify-within N"),
            other => panic!("unknown option {other}"),
        }
    }
    options
}

/// Counters shared by the sockets.
#[derive(Debug, Default)]
struct Totals {
    sent: AtomicU64,
    retransmitted: AtomicU64,
    changed: AtomicU64,
    unavailable: AtomicU64,
    other: AtomicU64,
    gave_up: AtomicU64,
}

/// One device-like endpoint: what it sent, what came back.
struct Outcome {
    /// Numbers of the requests answered 2.04.
    stored: Vec<u64>,
    /// Microseconds from first send to the answer, of every 2.04.
    latencies: Vec<u32>,
}

#[tokio::main]
async fn main() {
    let options = options();
    let totals = Arc::new(Totals::default());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut sockets = Vec::new();
    for socket in 0..options.sockets {
        sockets.push(tokio::spawn(device(
            socket as u64,
            options.clone(),
            totals.clone(),
            stop.clone(),
        )));
    }
    let progress = {
        let totals = totals.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let changed = totals.changed.load(Ordering::Relaxed);
                eprintln!(
                    "{:>5.1} s: {} answered 2.04 ({}/s over the last 5 s)",
                    started.elapsed().as_secs_f64(),
                    changed,
                    (changed - last) / 5
                );
                last = changed;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(options.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let sending_time = started.elapsed();
    let mut stored = Vec::new();
    let mut latencies = Vec::new();
    for socket in sockets {
        let outcome = socket.await.expect("a socket task");
        stored.extend(outcome.stored);
        latencies.extend(outcome.latencies);
    }
    progress.abort();
    let changed = totals.changed.load(Ordering::Relaxed);
    latencies.sort_unstable();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |&us| f64::from(us) / 1000.0)
    };
    println!(
        "sockets {} x window {}, {:.1} s of sending",
        options.sockets,
        options.window,
        sending_time.as_secs_f64()
    );
    println!(
        "sent {} (+{} retransmissions), answered 2.04 {}, 5.03 {}, other {}, never answered {}",
        totals.sent.load(Ordering::Relaxed),
        totals.retransmitted.load(Ordering::Relaxed),
        changed,
        totals.unavailable.load(Ordering::Relaxed),
        totals.other.load(Ordering::Relaxed),
        totals.gave_up.load(Ordering::Relaxed),
    );
    println!(
        "rate {:.0} requests/s answered 2.04; latency ms p50 {:.1} p90 {:.1} p99 {:.1} max {:.1}",
        changed as f64 / sending_time.as_secs_f64(),
        percentile(0.5),
        percentile(0.9),
        percentile(0.99),
        percentile(1.0),
    );
    if let Some(stream) = &options.stream {
        verify(stream, &stored, Duration::from_secs(options.verify_within)).await;
    }
    if let Some(sink) = &options.sink {
        verify_sink(sink, &stored);
    }
}

/// Asks the `kinesis_sink` stand-in which numbers it was given.
fn verify_sink(address: &str, stored: &[u64]) {
    use std::io::{Read, Write};
    let mut connection = std::net::TcpStream::connect(address).expect("the sink");
    write!(
        connection,
        "GET /numbers HTTP/1.1\r\nHost: sink\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    connection.read_to_string(&mut response).unwrap();
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    let mut seen: HashMap<u64, u32> = HashMap::new();
    for line in body.lines() {
        if let Ok(n) = line.trim().parse::<u64>() {
            *seen.entry(n).or_default() += 1;
        }
    }
    let lost = stored.iter().filter(|n| !seen.contains_key(n)).count();
    let duplicated = seen.values().filter(|&&count| count > 1).count();
    println!(
        "sink {address}: {} records put ({} distinct); of {} answered 2.04: {lost} lost; {duplicated} duplicated",
        seen.values().map(|&c| u64::from(c)).sum::<u64>(),
        seen.len(),
        stored.len()
    );
}

async fn device(
    socket_id: u64,
    options: Options,
    totals: Arc<Totals>,
    stop: Arc<AtomicBool>,
) -> Outcome {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("a UDP socket");
    let device = format!("load-{socket_id:04}");
    let path = format!("t/bench/{device}");
    // message id -> (request number, datagram, first sent, last sent, sends)
    let mut in_flight: HashMap<u16, (u64, Vec<u8>, Instant, Instant, u32)> = HashMap::new();
    let mut next_id: u32 = 1;
    let mut outcome = Outcome {
        stored: Vec::new(),
        latencies: Vec::new(),
    };
    let mut buffer = vec![0u8; 2048];
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        while !stopping && in_flight.len() < options.window && next_id <= u32::from(u16::MAX) {
            let id = next_id as u16;
            let number = (socket_id << 32) | u64::from(next_id);
            next_id += 1;
            let datagram = request(&path, id, number);
            let _ = socket.send_to(&datagram, options.target).await;
            totals.sent.fetch_add(1, Ordering::Relaxed);
            let now = Instant::now();
            in_flight.insert(id, (number, datagram, now, now, 1));
        }
        if in_flight.is_empty() && (stopping || next_id > u32::from(u16::MAX)) {
            return outcome;
        }
        let received =
            tokio::time::timeout(Duration::from_millis(200), socket.recv_from(&mut buffer)).await;
        if let Ok(Ok((length, _))) = received {
            let Ok(packet) = Packet::from_bytes(&buffer[..length]) else {
                continue;
            };
            let id = packet.header.message_id;
            match (packet.header.get_type(), packet.header.code) {
                // An empty ACK: the answer comes separately; keep waiting
                // (and stop retransmitting).
                (MessageType::Acknowledgement, MessageClass::Empty) => {
                    if let Some(entry) = in_flight.get_mut(&id) {
                        entry.4 = u32::MAX;
                    }
                }
                (kind, MessageClass::Response(_)) => {
                    if kind == MessageType::Confirmable {
                        let mut ack = Packet::new();
                        ack.header.set_type(MessageType::Acknowledgement);
                        ack.header.message_id = id;
                        let _ = socket
                            .send_to(&ack.to_bytes().unwrap(), options.target)
                            .await;
                    }
                    // Piggybacked answers carry our id; separate ones our token.
                    let id = if kind == MessageType::Acknowledgement {
                        id
                    } else {
                        u16::from_be_bytes(packet.get_token().try_into().unwrap_or([0, 0]))
                    };
                    let Some((number, _, first, _, _)) = in_flight.remove(&id) else {
                        continue;
                    };
                    match packet.header.code.to_string().as_str() {
                        "2.04" => {
                            totals.changed.fetch_add(1, Ordering::Relaxed);
                            outcome.stored.push(number);
                            outcome.latencies.push(first.elapsed().as_micros() as u32);
                        }
                        "5.03" => _ = totals.unavailable.fetch_add(1, Ordering::Relaxed),
                        _ => _ = totals.other.fetch_add(1, Ordering::Relaxed),
                    }
                }
                _ => {}
            }
        }
        // Retransmit what waited ACK_TIMEOUT (doubling), give up after 4.
        let now = Instant::now();
        let mut dropped = Vec::new();
        for (id, (_, datagram, _, last, sends)) in in_flight.iter_mut() {
            if *sends == u32::MAX {
                continue;
            }
            let wait = Duration::from_secs(2) * 2u32.pow(*sends - 1);
            if now.duration_since(*last) >= wait {
                if *sends > 4 {
                    dropped.push(*id);
                    continue;
                }
                let _ = socket.send_to(datagram, options.target).await;
                totals.retransmitted.fetch_add(1, Ordering::Relaxed);
                *last = now;
                *sends += 1;
            }
        }
        for id in dropped {
            in_flight.remove(&id);
            totals.gave_up.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn request(path: &str, id: u16, number: u64) -> Vec<u8> {
    let mut packet = Packet::new();
    packet.header.set_version(1);
    packet.header.set_type(MessageType::Confirmable);
    packet.header.code = MessageClass::Request(RequestType::Post);
    packet.header.message_id = id;
    packet.set_token(id.to_be_bytes().to_vec());
    for segment in path.split('/') {
        packet.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    packet.payload = format!(r#"{{"fields":{{"n":{number},"power":1.5}}}}"#).into_bytes();
    packet.to_bytes().expect("a small request")
}

/// Reads the stream back: every request answered 2.04 must be there.
async fn verify(stream: &str, stored: &[u64], within: Duration) {
    let source = KinesisSource::from_env(stream)
        .await
        .expect("Kinesis from the environment");
    let shards = source.list_shards().await.expect("the shards");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for shard in shards {
        let mut reader = source
            .shard_reader(
                &shard.shard_id,
                StartPosition::TrimHorizon,
                ReaderOptions::default(),
            )
            .await;
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok(Fetched::Records { records, .. }) = reader.next().await {
                let numbers: Vec<u64> = records
                    .iter()
                    .flat_map(|record| match ingest::kpl::deaggregate(&record.data) {
                        Ok(users) => users.into_iter().map(|user| user.data).collect(),
                        Err(_) => vec![record.data.clone()],
                    })
                    .filter_map(|data| {
                        let text = std::str::from_utf8(&data).ok()?;
                        let start = text.find("\"n\":")? + 4;
                        let end = start + text[start..].find(',')?;
                        text[start..end].parse().ok()
                    })
                    .collect();
                if tx.send(numbers).is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let started = Instant::now();
    let mut seen: HashMap<u64, u32> = HashMap::with_capacity(stored.len());
    let mut idle_since = Instant::now();
    while started.elapsed() < within {
        match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            Ok(Some(numbers)) => {
                for number in numbers {
                    *seen.entry(number).or_default() += 1;
                }
                idle_since = Instant::now();
            }
            Ok(None) => break,
            Err(_) if idle_since.elapsed() > Duration::from_secs(5) => break,
            Err(_) => {}
        }
    }
    let lost = stored.iter().filter(|n| !seen.contains_key(n)).count();
    let duplicated = seen.values().filter(|&&count| count > 1).count();
    println!(
        "stream {stream}: {} records ({} distinct); of {} answered 2.04: {lost} lost; {duplicated} duplicated; read back in {:.1} s",
        seen.values().map(|&c| u64::from(c)).sum::<u64>(),
        seen.len(),
        stored.len(),
        started.elapsed().as_secs_f64()
    );
}
