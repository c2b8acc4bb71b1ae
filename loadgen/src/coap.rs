//! One CoAP device: its own UDP socket (its own endpoint, so its message ids
//! are its own), POSTing each record to the gateway on time.
//!
//! CON follows RFC 7252: one exchange outstanding at a time (NSTART 1),
//! retransmitted after ACK_TIMEOUT × a random factor, doubling, at most
//! MAX_RETRANSMIT times; an empty ACK means the answer comes as a separate
//! response, which is acknowledged. NON is sent without waiting; the
//! gateway's NON answer, when it comes, counts as its acknowledgement.
//! Messages are encoded and decoded by coap-lite.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::net::UdpSocket;
use tokio::time::sleep_until;

use crate::message::{DeviceOutcome, DeviceTraffic, Fate, Protocol};
use crate::metrics;
use crate::run::Context;
use crate::sign;

const ACK_TIMEOUT: Duration = Duration::from_secs(2);
const ACK_RANDOM_FACTOR: f64 = 1.5;
const MAX_RETRANSMIT: u32 = 4;
/// How long a separate response, or a NON's answer, is waited for.
const ANSWER_WAIT: Duration = Duration::from_secs(30);

/// Message ids advance with the clock, 250 a second, wrapping after 262 s:
/// longer than EXCHANGE_LIFETIME (247 s), during which the gateway takes a
/// repeated (endpoint, id) for a retransmission. So a device that gets a
/// port another device used a moment ago (a run after a run) never repeats
/// one of its ids, at up to 250 messages a second per device.
const IDS_PER_SECOND: u128 = 250;

fn clock_message_id(now: SystemTime) -> u16 {
    let millis = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    (millis * IDS_PER_SECOND / 1000 % 65_536) as u16
}

/// The id after `previous`: the clock's, unless that is not ahead of it.
fn next_message_id(previous: u16, now: SystemTime) -> u16 {
    let clock = clock_message_id(now);
    let ahead = clock.wrapping_sub(previous);
    if ahead != 0 && ahead < 32_768 {
        clock
    } else {
        previous.wrapping_add(1)
    }
}

/// A POST of `payload` to `path`, signed with `key` if there is one (the
/// token, unique within the device's run, is the nonce).
fn post(
    path: &str,
    payload: &[u8],
    kind: MessageType,
    message_id: u16,
    token: u32,
    key: Option<&[u8]>,
) -> Vec<u8> {
    let mut packet = request(path, kind, RequestType::Post, message_id, token);
    if let Some(key) = key {
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        for parameter in sign::query(key, path, time, &format!("{token:08x}"), payload) {
            packet.add_option(CoapOption::UriQuery, parameter.into_bytes());
        }
    }
    packet.payload = payload.to_vec();
    packet
        .to_bytes()
        .expect("a record within CoAP's size limits")
}

fn request(
    path: &str,
    kind: MessageType,
    method: RequestType,
    message_id: u16,
    token: u32,
) -> Packet {
    let mut packet = Packet::new();
    packet.header.set_version(1);
    packet.header.set_type(kind);
    packet.header.code = MessageClass::Request(method);
    packet.header.message_id = message_id;
    packet.set_token(token.to_be_bytes().to_vec());
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        packet.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    packet
}

/// An empty ACK of `message_id`.
fn empty_ack(message_id: u16) -> Vec<u8> {
    let mut packet = Packet::new();
    packet.header.set_version(1);
    packet.header.set_type(MessageType::Acknowledgement);
    packet.header.code = MessageClass::Empty;
    packet.header.message_id = message_id;
    packet.to_bytes().expect("an empty ACK")
}

async fn socket(gateway: SocketAddr, source: Option<IpAddr>) -> std::io::Result<UdpSocket> {
    let local = match (source, gateway) {
        (Some(source), _) => SocketAddr::new(source, 0),
        (None, SocketAddr::V4(_)) => SocketAddr::from(([0, 0, 0, 0], 0)),
        (None, SocketAddr::V6(_)) => SocketAddr::from(([0u16; 8], 0)),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(gateway).await?;
    Ok(socket)
}

/// Checks that the gateway answers (GET /health): one line saying why not.
pub async fn probe(gateway: SocketAddr) -> Result<(), String> {
    let fail = |why: String| format!("cannot reach the CoAP gateway at {gateway}: {why}");
    let socket = socket(gateway, None)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let mut last_error = "no answer".to_owned();
    let mut buffer = [0u8; 1500];
    // Four tries over about 5 s.
    for (attempt, wait_ms) in [1000u64, 1000, 1000, 2000].into_iter().enumerate() {
        let id = 0x4000 + attempt as u16;
        let ping = request(
            "/health",
            MessageType::Confirmable,
            RequestType::Get,
            id,
            id.into(),
        );
        let ping = ping.to_bytes().expect("a GET");
        if let Err(e) = socket.send(&ping).await {
            last_error = e.to_string();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
        loop {
            match tokio::time::timeout_at(deadline, socket.recv(&mut buffer)).await {
                Err(_) => break,
                Ok(Err(e)) => {
                    last_error = e.to_string();
                    // ICMP port unreachable: wait out the try, then resend.
                    sleep_until(deadline).await;
                    break;
                }
                Ok(Ok(n)) => match Packet::from_bytes(&buffer[..n]) {
                    Ok(answer) if answer.header.message_id == id => return Ok(()),
                    _ => {}
                },
            }
        }
    }
    Err(fail(format!("{last_error} after 4 tries in 5 s")))
}

/// The CON exchange in progress.
struct Exchange {
    message_id: u16,
    token: u32,
    ts_ms: i64,
    bytes: Vec<u8>,
    first_sent: Instant,
    /// When to retransmit, or (after an empty ACK) stop waiting.
    next_timer: Instant,
    timeout: Duration,
    retransmissions: u32,
    /// An empty ACK came: the answer is a separate response.
    separate: bool,
    in_window: bool,
}

/// A NON waiting for the gateway's answer.
struct NonWaiting {
    token: u32,
    ts_ms: i64,
    sent_at: Instant,
    in_window: bool,
}

/// What an answer says.
fn fate_of(answer: &Packet) -> Fate {
    match answer.header.code {
        MessageClass::Response(
            ResponseType::Changed | ResponseType::Created | ResponseType::Content,
        ) => Fate::Acked,
        code => {
            let diagnostic = String::from_utf8_lossy(&answer.payload);
            let diagnostic = diagnostic.split(':').next().unwrap_or_default().trim();
            Fate::Failed(if diagnostic.is_empty() {
                format!("{code}")
            } else {
                format!("{code} {diagnostic}")
            })
        }
    }
}

/// Runs one device until its messages are sent and answered, or the
/// context's deadline.
pub async fn run(
    traffic: DeviceTraffic,
    gateway: SocketAddr,
    source: Option<IpAddr>,
    key: Option<Vec<u8>>,
    context: &Context,
) -> DeviceOutcome {
    let Protocol::Coap { confirmable } = traffic.protocol else {
        unreachable!("a CoAP device")
    };
    let stats = context.stats.of(traffic.protocol);
    let mut fates = Vec::new();
    let mut messages = traffic.messages.peekable();
    let outcome = |fates| DeviceOutcome {
        device: traffic.device.clone(),
        protocol: traffic.protocol,
        check_metric: traffic.check_metric.clone(),
        fates,
    };
    let socket = match socket(gateway, source).await {
        Ok(socket) => socket,
        Err(error) => {
            let reason = format!("cannot open a UDP socket: {error}");
            for message in messages {
                fates.push((message.ts_ms, Fate::Failed(reason.clone())));
                stats.errors.fetch_add(1, Ordering::Relaxed);
                metrics::failed("coap", "no_socket");
            }
            return outcome(fates);
        }
    };
    // Retransmission jitter and tokens: random, not part of the traffic.
    let mut rng = ChaCha8Rng::from_os_rng();
    let mut message_id: u16 = clock_message_id(SystemTime::now()).wrapping_sub(1);
    let mut token: u32 = rng.random();
    let mut exchange: Option<Exchange> = None;
    let mut non_waiting: VecDeque<NonWaiting> = VecDeque::new();
    let mut last_error: Option<String> = None;
    let mut buffer = [0u8; 1500];

    loop {
        // NSTART 1: the next CON waits for the outstanding one.
        let due = match (&exchange, messages.peek()) {
            (None, Some(next)) => Some(context.clock.due(next.offset)),
            _ => None,
        };
        if due.is_none()
            && exchange.is_none()
            && non_waiting.is_empty()
            && messages.peek().is_none()
        {
            break;
        }
        let timer = exchange
            .as_ref()
            .map(|e| e.next_timer.min(context.deadline));
        let non_expiry = non_waiting
            .front()
            .map(|n| (n.sent_at + ANSWER_WAIT).min(context.deadline));
        let far = context.deadline + Duration::from_secs(3600);
        tokio::select! {
            () = sleep_until(due.unwrap_or(far).into()), if due.is_some() => {
                let message = messages.next().expect("peeked");
                message_id = next_message_id(message_id, SystemTime::now());
                token = token.wrapping_add(1);
                let kind = if confirmable { MessageType::Confirmable } else { MessageType::NonConfirmable };
                let bytes = post(&traffic.target, &message.payload, kind, message_id, token, key.as_deref());
                let now = Instant::now();
                if let Err(error) = socket.send(&bytes).await {
                    last_error = Some(error.to_string());
                }
                stats.sent.fetch_add(1, Ordering::Relaxed);
                metrics::sent("coap");
                stats.in_flight.fetch_add(1, Ordering::Relaxed);
                if context.clock.now_in_window(now) {
                    stats.sent_in_window.fetch_add(1, Ordering::Relaxed);
                }
                let in_window = context.clock.in_window(message.offset);
                if confirmable {
                    let timeout = ACK_TIMEOUT.mul_f64(rng.random_range(1.0..ACK_RANDOM_FACTOR));
                    exchange = Some(Exchange {
                        message_id,
                        token,
                        ts_ms: message.ts_ms,
                        bytes,
                        first_sent: now,
                        next_timer: now + timeout,
                        timeout,
                        retransmissions: 0,
                        separate: false,
                        in_window,
                    });
                } else {
                    non_waiting.push_back(NonWaiting { token, ts_ms: message.ts_ms, sent_at: now, in_window });
                }
            }
            received = socket.recv(&mut buffer) => {
                let answer = match received {
                    Ok(n) => match Packet::from_bytes(&buffer[..n]) {
                        Ok(answer) => answer,
                        Err(_) => continue,
                    },
                    Err(error) => {
                        // ICMP unreachable; the retransmissions go on.
                        last_error = Some(error.to_string());
                        continue;
                    }
                };
                let kind = answer.header.get_type();
                if kind == MessageType::Confirmable {
                    // A separate response (or a duplicate of one): acknowledge.
                    let _ = socket.send(&empty_ack(answer.header.message_id)).await;
                }
                let answer_token = <[u8; 4]>::try_from(answer.get_token()).map(u32::from_be_bytes).ok();
                let finished = match &mut exchange {
                    Some(current) if kind == MessageType::Acknowledgement && answer.header.message_id == current.message_id => {
                        if answer.header.code == MessageClass::Empty {
                            current.separate = true;
                            current.next_timer = current.first_sent + ANSWER_WAIT;
                            None
                        } else {
                            Some((current.ts_ms, current.first_sent, current.in_window, fate_of(&answer)))
                        }
                    }
                    Some(current) if kind == MessageType::Reset && answer.header.message_id == current.message_id => {
                        Some((current.ts_ms, current.first_sent, current.in_window, Fate::Failed("reset by the gateway".into())))
                    }
                    Some(current) if kind != MessageType::Acknowledgement && current.separate && answer_token == Some(current.token) => {
                        Some((current.ts_ms, current.first_sent, current.in_window, fate_of(&answer)))
                    }
                    _ => None,
                };
                if let Some(finished) = finished {
                    exchange = None;
                    settle(&mut fates, stats, finished);
                } else if kind == MessageType::NonConfirmable
                    && let Some(position) = non_waiting.iter().position(|n| Some(n.token) == answer_token)
                {
                    let answered = non_waiting.remove(position).expect("found");
                    settle(&mut fates, stats, (answered.ts_ms, answered.sent_at, answered.in_window, fate_of(&answer)));
                }
            }
            () = sleep_until(timer.unwrap_or(far).into()), if timer.is_some() => {
                let current = exchange.as_mut().expect("an exchange");
                let now = Instant::now();
                if current.separate || current.retransmissions == MAX_RETRANSMIT || now >= context.deadline {
                    let why = if current.separate {
                        format!("no separate response within {ANSWER_WAIT:?}")
                    } else if current.retransmissions < MAX_RETRANSMIT {
                        "no answer before the run's end (--drain)".to_owned()
                    } else {
                        format!("no answer after {} retransmissions", current.retransmissions)
                    };
                    let why = match &last_error {
                        Some(error) => format!("{why} ({error})"),
                        None => why,
                    };
                    let finished = (current.ts_ms, current.first_sent, current.in_window, Fate::Uncertain(why));
                    exchange = None;
                    settle(&mut fates, stats, finished);
                } else {
                    if let Err(error) = socket.send(&current.bytes).await {
                        last_error = Some(error.to_string());
                    }
                    current.retransmissions += 1;
                    current.timeout *= 2;
                    current.next_timer = now + current.timeout;
                }
            }
            () = sleep_until(non_expiry.unwrap_or(far).into()), if non_expiry.is_some() => {
                // A NON without an answer may well have landed: unconfirmed.
                let unanswered = non_waiting.pop_front().expect("a NON");
                stats.in_flight.fetch_sub(1, Ordering::Relaxed);
                fates.push((unanswered.ts_ms, Fate::Unconfirmed));
                metrics::unconfirmed("coap");
            }
        }
    }
    outcome(fates)
}

/// Counts a message's end: (ts, first sent, in the window, fate).
fn settle(
    fates: &mut Vec<(i64, Fate)>,
    stats: &crate::stats::ProtocolStats,
    (ts_ms, first_sent, in_window, fate): (i64, Instant, bool, Fate),
) {
    stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    match fate {
        Fate::Acked => {
            stats.acked.fetch_add(1, Ordering::Relaxed);
            metrics::acked("coap", first_sent.elapsed());
            if in_window {
                stats.record_latency(first_sent.elapsed());
            }
        }
        // An error response or a reset: the gateway refused it.
        Fate::Failed(_) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            metrics::failed("coap", "refused");
        }
        // No answer, or no separate response, in time (an unconfirmed NON
        // is not settled here).
        Fate::Uncertain(_) | Fate::Unconfirmed => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            metrics::uncertain("coap", "no_answer");
        }
    }
    fates.push((ts_ms, fate));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_follow_the_clock_and_never_repeat_within_a_device() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_763_900_000);
        let first = clock_message_id(t0);
        // One a second: the clock's id, 250 on each time.
        let next = next_message_id(first, t0 + Duration::from_secs(1));
        assert_eq!(next, first.wrapping_add(250));
        // Faster than the clock: one more each time.
        let burst = next_message_id(next, t0 + Duration::from_secs(1));
        assert_eq!(burst, next.wrapping_add(1));
        // A device starting 10 s after another one used the same port for
        // 10 s at 100 messages a second starts beyond every id it used.
        let mut id = clock_message_id(t0).wrapping_sub(1);
        let mut used = std::collections::HashSet::new();
        for i in 0..1000u64 {
            id = next_message_id(id, t0 + Duration::from_millis(i * 10));
            assert!(used.insert(id), "an id repeated");
        }
        let later = next_message_id(
            clock_message_id(t0 + Duration::from_secs(20)).wrapping_sub(1),
            t0 + Duration::from_secs(20),
        );
        assert!(!used.contains(&later));
    }
}
