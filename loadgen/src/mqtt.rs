//! One MQTT device: its own TCP connection to the broker, publishing its
//! messages on time at QoS 0 or 1 and counting PUBACKs.
//!
//! Packets are encoded and decoded by rumqttc's MQTT 3.1.1 codec; the
//! connection is ours because rumqttc cannot bind a source address, which
//! more than ~28,000 connections need (see `net`). A device that loses its
//! connection reconnects with backoff and sends what fell due meanwhile.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::sleep_until;

use crate::message::{DeviceOutcome, DeviceTraffic, Fate, Protocol};
use crate::metrics;
use crate::run::Context;

/// Seconds without a packet before the broker may drop us; we ping at half.
const KEEP_ALIVE: u16 = 60;
/// How long connecting (TCP and CONNACK) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_PACKET_BYTES: usize = 256 * 1024;

/// A connection after CONNACK.
struct Connection {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    /// Bytes read and not yet decoded.
    buffer: BytesMut,
}

/// Connects from `source` (when given) and waits for a successful CONNACK.
async fn connect(
    broker: SocketAddr,
    source: Option<IpAddr>,
    client_id: &str,
) -> Result<Connection, String> {
    let attempt = async {
        let socket = if broker.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| format!("cannot open a socket: {e}"))?;
        if let Some(source) = source {
            socket
                .bind(SocketAddr::new(source, 0))
                .map_err(|e| format!("cannot bind {source}: {e}"))?;
        }
        socket.set_nodelay(true).ok();
        let stream = socket.connect(broker).await.map_err(|e| e.to_string())?;
        let (reader, mut writer) = stream.into_split();
        let mut connect = Connect::new(client_id);
        connect.keep_alive = KEEP_ALIVE;
        let mut bytes = BytesMut::new();
        Packet::Connect(connect)
            .write(&mut bytes, MAX_PACKET_BYTES)
            .map_err(|e| e.to_string())?;
        writer.write_all(&bytes).await.map_err(|e| e.to_string())?;
        let mut connection = Connection {
            reader,
            writer,
            buffer: BytesMut::with_capacity(256),
        };
        match connection.read_packet().await? {
            Packet::ConnAck(ack)
                if ack.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success =>
            {
                Ok(connection)
            }
            Packet::ConnAck(ack) => {
                Err(format!("the broker refused the connection: {:?}", ack.code))
            }
            other => Err(format!("expected CONNACK, got {other:?}")),
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no CONNACK within {CONNECT_TIMEOUT:?}")))
}

impl Connection {
    /// The next whole packet. Cancel-safe: bytes read stay in the buffer.
    async fn read_packet(&mut self) -> Result<Packet, String> {
        loop {
            match Packet::read(&mut self.buffer, MAX_PACKET_BYTES) {
                Ok(packet) => return Ok(packet),
                Err(CodecError::InsufficientBytes(_)) => {}
                Err(e) => return Err(format!("bad packet from the broker: {e}")),
            }
            match self.reader.read_buf(&mut self.buffer).await {
                Ok(0) => return Err("the broker closed the connection".into()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    async fn send(&mut self, packet: Packet) -> Result<(), String> {
        let mut bytes = BytesMut::with_capacity(packet.size() + 8);
        packet
            .write(&mut bytes, MAX_PACKET_BYTES)
            .map_err(|e| e.to_string())?;
        self.writer
            .write_all(&bytes)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Checks that the broker accepts a connection: one line saying why not.
pub async fn probe(broker: SocketAddr, url: &str) -> Result<(), String> {
    connect(
        broker,
        None,
        &format!("loadgen-probe-{}", std::process::id()),
    )
    .await
    .map(drop)
    .map_err(|e| format!("cannot reach the MQTT broker at {url}: {e}"))
}

/// A QoS 1 message waiting for its PUBACK.
struct InFlight {
    pkid: u16,
    ts_ms: i64,
    sent_at: Instant,
    in_window: bool,
}

/// Runs one device until its messages are sent and acknowledged, or the
/// context's deadline.
pub async fn run(
    traffic: DeviceTraffic,
    broker: SocketAddr,
    source: Option<IpAddr>,
    context: &Context,
) -> DeviceOutcome {
    let Protocol::Mqtt { qos } = traffic.protocol else {
        unreachable!("an MQTT device")
    };
    let qos = if qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let stats = context.stats.of(traffic.protocol);
    let protocol = traffic.protocol.name();
    let mut fates = Vec::new();
    let mut messages = traffic.messages.peekable();
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut next_pkid: u16 = 1;
    let mut backoff = Duration::from_millis(100);

    'connection: loop {
        if messages.peek().is_none() {
            break;
        }
        let mut connection = match connect(broker, source, &traffic.device).await {
            Ok(connection) => connection,
            Err(error) => {
                if Instant::now() + backoff >= context.deadline {
                    let reason = format!("cannot connect: {error}");
                    for message in messages.by_ref() {
                        fates.push((message.ts_ms, Fate::Failed(reason.clone())));
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                        metrics::failed(protocol, "cannot_connect");
                    }
                    break;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let mut last_sent = Instant::now();

        loop {
            let due = messages.peek().map(|m| context.clock.due(m.offset));
            if due.is_none() && in_flight.is_empty() {
                break 'connection;
            }
            let ack_deadline = in_flight
                .front()
                .map(|oldest| (oldest.sent_at + context.ack_timeout).min(context.deadline));
            let ping_at = last_sent + Duration::from_secs(u64::from(KEEP_ALIVE / 2));
            let lost = tokio::select! {
                () = sleep_until(due.unwrap_or(context.deadline).into()), if due.is_some() => {
                    let message = messages.next().expect("peeked");
                    let mut publish = Publish::from_bytes(&traffic.target, qos, message.payload);
                    if qos == QoS::AtLeastOnce {
                        publish.pkid = next_pkid;
                        next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                    }
                    let pkid = publish.pkid;
                    let now = Instant::now();
                    let result = connection.send(Packet::Publish(publish)).await;
                    last_sent = now;
                    stats.sent.fetch_add(1, Ordering::Relaxed);
                    metrics::sent(protocol);
                    if context.clock.now_in_window(now) {
                        stats.sent_in_window.fetch_add(1, Ordering::Relaxed);
                    }
                    match (&result, qos) {
                        (Err(error), _) => {
                            fates.push((message.ts_ms, Fate::Uncertain(format!("connection lost: {error}"))));
                            stats.errors.fetch_add(1, Ordering::Relaxed);
                            metrics::uncertain(protocol, "connection_lost");
                        }
                        (Ok(()), QoS::AtMostOnce) => {
                            fates.push((message.ts_ms, Fate::Unconfirmed));
                            metrics::unconfirmed(protocol);
                        }
                        (Ok(()), _) => {
                            stats.in_flight.fetch_add(1, Ordering::Relaxed);
                            in_flight.push_back(InFlight {
                                pkid,
                                ts_ms: message.ts_ms,
                                sent_at: now,
                                in_window: context.clock.in_window(message.offset),
                            });
                        }
                    }
                    result.err()
                }
                packet = connection.read_packet() => match packet {
                    Ok(Packet::PubAck(ack)) => {
                        if let Some(position) = in_flight.iter().position(|m| m.pkid == ack.pkid) {
                            let acked = in_flight.remove(position).expect("found");
                            stats.in_flight.fetch_sub(1, Ordering::Relaxed);
                            stats.acked.fetch_add(1, Ordering::Relaxed);
                            metrics::acked(protocol, acked.sent_at.elapsed());
                            if acked.in_window {
                                stats.record_latency(acked.sent_at.elapsed());
                            }
                            fates.push((acked.ts_ms, Fate::Acked));
                        }
                        None
                    }
                    Ok(_) => None,
                    Err(error) => Some(error),
                },
                () = sleep_until(ack_deadline.unwrap_or(context.deadline).into()), if ack_deadline.is_some() => {
                    let oldest = in_flight.pop_front().expect("an oldest");
                    stats.in_flight.fetch_sub(1, Ordering::Relaxed);
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    metrics::uncertain(protocol, "ack_timeout");
                    fates.push((oldest.ts_ms, Fate::Uncertain(format!("no PUBACK within {:?}", context.ack_timeout))));
                    None
                }
                () = sleep_until(ping_at.into()) => {
                    last_sent = Instant::now();
                    connection.send(Packet::PingReq).await.err()
                }
            };
            if let Some(error) = lost {
                // What was in flight may or may not have reached the broker.
                for lost in in_flight.drain(..) {
                    stats.in_flight.fetch_sub(1, Ordering::Relaxed);
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    metrics::uncertain(protocol, "connection_lost");
                    fates.push((
                        lost.ts_ms,
                        Fate::Uncertain(format!("connection lost before PUBACK: {error}")),
                    ));
                }
                continue 'connection;
            }
        }
    }
    DeviceOutcome {
        device: traffic.device,
        protocol: traffic.protocol,
        check_metric: traffic.check_metric,
        fates,
    }
}
