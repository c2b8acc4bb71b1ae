//! The CoAP server: one UDP socket, one receive loop, a task per request
//! that waits for Kinesis, and the message layer of RFC 7252 written out:
//! piggybacked or separate responses, deduplication, retransmission of
//! separate confirmable responses until the client acknowledges them.
//!
//! A request's life:
//!
//! 1. The receive loop reads the datagram, answers a duplicate from the
//!    exchange cache, and otherwise routes and checks the request; anything
//!    wrong is answered at once (4.xx).
//! 2. A block of a block-wise upload (Block1) other than the last is held
//!    and answered 2.31 Continue (`block.rs`); the last one completes the
//!    payload, which goes on as if it had come in one datagram.
//! 3. A telemetry record is queued for the producer (queue full: 5.03).
//! 4. Its task waits up to [`PIGGYBACK_WINDOW`] for Kinesis: the answer
//!    then rides on the ACK. Longer, and a CON gets an empty ACK now and the
//!    answer later as a confirmable response of its own, resent with
//!    exponential backoff until the client acknowledges it.
//! 5. The answer is 2.04 once Kinesis took the record, 5.03 with Max-Age
//!    when it did not by `--put-timeout`.
//!
//! At most `--max-separate-responses` separate responses are resent at
//! once (each may wait ~93 s for a peer that never acknowledges, a spoofed
//! source); beyond that bound a separate response is sent once, as a
//! client that lost it retransmits its request and gets it again from the
//! exchange cache.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use coap_lite::{MessageClass, MessageType, Packet, ResponseType};
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::block::{Block, Progress, Uploads};
use super::exchange::{Exchanges, Key, State, Token};
use super::message::{self, FORMAT_TEXT, Reply, Request};
use super::resource::{self, Route, TelemetryRules};
use crate::decode::{DecodeLimits, Decoder, now_micros};
use crate::gateway::admission::Unputtable;
use crate::gateway::auth::{AuthPolicy, SIGNATURE_PARAMETER};
use crate::gateway::health::KinesisHealth;
use crate::gateway::producer::{Outcome, Producer, Protocol, Submission, SubmitError};
use crate::metrics as m;

/// How long a confirmable request waits for Kinesis before it gets an empty
/// ACK and its answer separately: half of ACK_TIMEOUT (2 s), so the client
/// does not retransmit a request that is being handled.
pub const PIGGYBACK_WINDOW: Duration = Duration::from_secs(1);
/// RFC 7252 ACK_TIMEOUT: the first wait for the ACK of a separate response.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// RFC 7252 MAX_RETRANSMIT: resends of a separate response before giving up.
const MAX_RETRANSMIT: u32 = 4;
/// Max-Age of a 5.03 because Kinesis did not take the record: seconds
/// before the device should try again.
const RETRY_AFTER_UNAVAILABLE: u32 = 5;
/// Max-Age of a 5.03 because the queue is full: a short pause is enough.
const RETRY_AFTER_FULL: u32 = 1;
/// The largest datagram read: the most UDP carries over IPv4.
const DATAGRAM_BUFFER: usize = 65_536;

/// What the CoAP server needs.
#[derive(Debug)]
pub struct CoapSettings {
    /// Larger payloads get 4.13.
    pub max_payload_bytes: usize,
    /// How long a request waits for Kinesis before 5.03.
    pub put_timeout: Duration,
    /// Who must sign.
    pub auth: AuthPolicy,
    /// The exchange cache's capacity.
    pub exchange_capacity: usize,
    /// Separate responses resent until acknowledged, at once.
    pub max_separate_responses: usize,
}

/// Everything the receive loop and the request tasks share.
#[derive(Debug)]
struct Server {
    socket: UdpSocket,
    settings: CoapSettings,
    health: Arc<KinesisHealth>,
    /// Recent exchanges, for deduplication.
    exchanges: Mutex<Exchanges>,
    /// Block-wise uploads being reassembled (RFC 7959 Block1).
    uploads: Mutex<Uploads>,
    /// Separate confirmable responses waiting for their ACK, by (client,
    /// our message id): the receive loop tells the sender it came.
    awaiting_ack: Mutex<std::collections::HashMap<Key, oneshot::Sender<()>>>,
    /// Message ids of our own confirmable and non-confirmable messages.
    next_message_id: AtomicU16,
    /// Separate responses being resent until acknowledged (bounded by
    /// `max_separate_responses`).
    separate_in_flight: AtomicUsize,
    /// Whether the exchange cache has filled up before EXCHANGE_LIFETIME
    /// (said once in the log).
    capacity_reached: AtomicBool,
}

/// The parts of a request its answer needs.
#[derive(Debug, Clone)]
struct ReplyTo {
    peer: SocketAddr,
    message_id: u16,
    token: Vec<u8>,
    confirmable: bool,
    /// The No-Response option's value (0 when absent).
    no_response: u32,
    /// The request's datagram size: no error answer is larger.
    request_bytes: usize,
    /// The last block of a block-wise upload: its answer echoes it.
    last_block: Option<Block>,
    /// Whether the exchange is remembered (its answer is kept for
    /// retransmissions); if not, the answer is sent and forgotten.
    remembered: bool,
}

/// Serves CoAP on `socket` until `shutdown`, then waits (at most `grace`)
/// for the requests in flight to be answered. The producer handle is
/// dropped when the receive loop ends, so the producer can finish.
pub async fn serve(
    socket: UdpSocket,
    settings: CoapSettings,
    producer: Producer,
    health: Arc<KinesisHealth>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let now = std::time::Instant::now();
    let exchanges = Exchanges::new(
        super::exchange::EXCHANGE_LIFETIME,
        settings.exchange_capacity,
        now,
    );
    let server = Arc::new(Server {
        socket,
        settings,
        health,
        exchanges: Mutex::new(exchanges),
        uploads: Mutex::default(),
        awaiting_ack: Mutex::default(),
        next_message_id: AtomicU16::new(seed_message_id()),
        separate_in_flight: AtomicUsize::new(0),
        capacity_reached: AtomicBool::new(false),
    });
    metrics::gauge!(m::GATEWAY_COAP_SEPARATE_PENDING).set(0.0);
    let mut decoder = Decoder::new(DecodeLimits::default());
    let mut buffer = vec![0u8; DATAGRAM_BUFFER];
    // The tasks of requests waiting for Kinesis.
    let mut requests = JoinSet::new();
    loop {
        let received = tokio::select! {
            _ = shutdown.cancelled() => break,
            received = server.socket.recv_from(&mut buffer) => received,
        };
        match received {
            Ok((length, peer)) => {
                server.datagram(
                    &buffer[..length],
                    peer,
                    &mut decoder,
                    &producer,
                    &mut requests,
                );
            }
            // E.g. an ICMP error for an earlier send: nothing to do but go on.
            Err(error) => tracing::debug!(%error, "CoAP receive error"),
        }
        while requests.try_join_next().is_some() {}
    }
    drop(producer);
    let in_flight = requests.len();
    let answered = tokio::time::timeout(grace, async {
        while requests.join_next().await.is_some() {}
    });
    if answered.await.is_err() {
        tracing::warn!(
            in_flight,
            "CoAP requests still waiting for Kinesis at shutdown were not answered"
        );
    }
}

/// A random start for our message ids, so a restarted gateway does not
/// reuse the ids its predecessor used moments ago.
fn seed_message_id() -> u16 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u16)
}

impl Server {
    fn datagram(
        self: &Arc<Self>,
        bytes: &[u8],
        peer: SocketAddr,
        decoder: &mut Decoder,
        producer: &Producer,
        requests: &mut JoinSet<()>,
    ) {
        // Too short for a header, or another CoAP version: silently ignored
        // (RFC 7252 §3, §4.2).
        if bytes.len() < 4 || bytes[0] >> 6 != 1 {
            return rejected("malformed");
        }
        let confirmable = (bytes[0] >> 4) & 0b11 == 0;
        let message_id = u16::from_be_bytes([bytes[2], bytes[3]]);
        let packet = match Packet::from_bytes(bytes) {
            Ok(packet) => packet,
            Err(_) => {
                // A confirmable message that cannot be parsed is rejected
                // with a reset; anything else is ignored.
                if confirmable {
                    self.send(&message::reset(message_id), peer);
                }
                return rejected("malformed");
            }
        };
        // A payload marker with no payload is a message format error too.
        if message::bare_payload_marker(bytes, &packet) {
            if confirmable {
                self.send(&message::reset(message_id), peer);
            }
            return rejected("malformed");
        }
        match packet.header.get_type() {
            MessageType::Acknowledgement | MessageType::Reset => {
                // The ACK (or refusal) of one of our separate responses.
                let waiter = self
                    .awaiting_ack
                    .lock()
                    .ok()
                    .and_then(|mut waiting| waiting.remove(&(peer, message_id)));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(());
                }
                return;
            }
            MessageType::Confirmable | MessageType::NonConfirmable => {}
        }
        // Class 0 is a request, with a method we may not know (0.08 to 0.31,
        // answered 4.05); an empty CON is a ping, answered with a reset;
        // responses and reserved classes are not for a server.
        let request_code = match packet.header.code {
            MessageClass::Request(_) => true,
            MessageClass::Reserved(code) => code >> 5 == 0,
            _ => false,
        };
        if !request_code {
            if confirmable {
                self.send(&message::reset(message_id), peer);
            }
            return;
        }

        let key = (peer, message_id);
        let exchange_token = Token::new(packet.get_token());
        // Only a lookup: an exchange is remembered (below) only if its
        // request changed something, so that a flood of junk or refused
        // requests does not push out the exchanges that need remembering.
        let seen = match self.exchanges.lock() {
            Ok(mut exchanges) => {
                let seen = exchanges.seen(&key, exchange_token);
                if seen == Some(State::InFlight { acked: false }) && confirmable {
                    exchanges.acknowledge(&key, exchange_token);
                }
                seen
            }
            Err(_) => None,
        };
        if let Some(state) = seen {
            metrics::counter!(m::GATEWAY_COAP_DUPLICATES).increment(1);
            match state {
                State::Answered(Some(datagram)) => self.send(&datagram, peer),
                State::Answered(None) => {}
                // Still waiting for Kinesis: an empty ACK stops the client's
                // retransmissions; the answer follows separately.
                State::InFlight { .. } if confirmable => {
                    self.send(&message::empty_ack(message_id), peer)
                }
                State::InFlight { .. } => {}
            }
            return;
        }

        let token = packet.get_token().to_vec();
        let request = match Request::from_packet(packet) {
            Ok(request) => request,
            Err(unreadable) => {
                rejected("bad_option");
                let to = ReplyTo {
                    peer,
                    message_id,
                    token,
                    confirmable,
                    no_response: 0,
                    request_bytes: bytes.len(),
                    last_block: None,
                    remembered: false,
                };
                return self.answer(&to, Reply::error(unreadable.code, unreadable.reason));
            }
        };
        let handled = self.handle(&request, peer, decoder, producer);
        // What a retransmission must not do again: queue a record, move a
        // block-wise upload on, or use a signature that was taken. The rest
        // (4.04, a refused payload, /health ...) is answered alike again.
        let signed = request.query_value(SIGNATURE_PARAMETER).is_some();
        let remembered = match &handled {
            Err(_) => true,
            Ok(reply) => {
                request.block1.is_some() || (signed && reply.code != ResponseType::Unauthorized)
            }
        };
        if remembered {
            self.remember(key, exchange_token);
        }
        let to = ReplyTo {
            peer,
            message_id,
            token,
            confirmable,
            no_response: request.no_response,
            request_bytes: bytes.len(),
            last_block: request.block1.filter(|block| !block.more),
            remembered,
        };
        match handled {
            Ok(reply) => self.answer(&to, reply),
            Err(receiver) => {
                let server = Arc::clone(self);
                let deadline = Instant::now() + self.settings.put_timeout;
                requests.spawn(async move { server.wait_and_answer(to, receiver, deadline).await });
            }
        }
    }

    /// Remembers the exchange `key` (a new one, in flight), for its
    /// retransmissions.
    fn remember(&self, key: Key, token: Token) {
        let Ok(mut exchanges) = self.exchanges.lock() else {
            return;
        };
        exchanges.begin(key, token, std::time::Instant::now());
        metrics::gauge!(m::GATEWAY_COAP_EXCHANGES).set(exchanges.len() as f64);
        if exchanges.early_rotations() > 0 && !self.capacity_reached.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                capacity = self.settings.exchange_capacity,
                "the CoAP exchange cache filled up within EXCHANGE_LIFETIME (247 s): \
                 retransmissions are recognised for a shorter time; raise \
                 --exchange-capacity"
            );
        }
    }

    /// Answers now (`Ok`), or queues the record and returns the receiver of
    /// its outcome (`Err`).
    fn handle(
        &self,
        request: &Request,
        peer: SocketAddr,
        decoder: &mut Decoder,
        producer: &Producer,
    ) -> Result<Reply, oneshot::Receiver<Outcome>> {
        let route = match resource::route(request) {
            Ok(route) => route,
            Err(reply) => {
                let reason = match reply.code {
                    ResponseType::NotFound => "not_found",
                    ResponseType::NotAcceptable => "not_acceptable",
                    _ => "method_not_allowed",
                };
                rejected(reason);
                return Ok(reply);
            }
        };
        let (house, device) = match route {
            Route::WellKnownCore => return Ok(resource::well_known_core()),
            Route::Health => return Ok(self.health_reply()),
            Route::Telemetry { house, device } => (house, device),
        };
        let assembled;
        let request = match request.block1 {
            None => request,
            Some(block) => match self.upload_block(request, block, peer) {
                Ok(Progress::Continue(reply)) => return Ok(reply),
                Ok(Progress::Complete(body)) => {
                    assembled = Request {
                        payload: body,
                        ..request.clone()
                    };
                    &assembled
                }
                Err((reason, reply)) => {
                    rejected(reason);
                    return Ok(reply);
                }
            },
        };
        let rules = TelemetryRules {
            max_payload_bytes: self.settings.max_payload_bytes,
            auth: &self.settings.auth,
        };
        let (key, data) =
            match resource::telemetry(request, house, device, &rules, decoder, now_micros()) {
                Ok(record) => record,
                Err((reason, reply)) => {
                    rejected(reason);
                    return Ok(reply);
                }
            };
        let submission = Submission {
            key,
            data,
            deadline: Some(Instant::now() + self.settings.put_timeout),
            protocol: Protocol::Coap,
        };
        match producer.try_submit(submission) {
            Ok(receiver) => Err(receiver),
            Err(SubmitError::Unputtable(unputtable)) => {
                rejected(unputtable.reason());
                Ok(unputtable_reply(unputtable))
            }
            Err(err) => {
                rejected(match err {
                    SubmitError::Closed => "shutting_down",
                    _ => "overloaded",
                });
                let retry_after = match err {
                    SubmitError::Closed => RETRY_AFTER_UNAVAILABLE,
                    _ => RETRY_AFTER_FULL,
                };
                Ok(unavailable(err.to_string(), retry_after))
            }
        }
    }

    /// Takes one block of a block-wise telemetry upload.
    fn upload_block(
        &self,
        request: &Request,
        block: Block,
        peer: SocketAddr,
    ) -> Result<Progress, super::block::Refusal> {
        let key = (peer, request.path.clone(), request.query.clone());
        let Ok(mut uploads) = self.uploads.lock() else {
            return Err((
                "unavailable",
                unavailable("the upload state is unusable", RETRY_AFTER_UNAVAILABLE),
            ));
        };
        uploads.receive(
            key,
            block,
            request.size1,
            &request.payload,
            self.settings.max_payload_bytes,
            std::time::Instant::now(),
        )
    }

    fn health_reply(&self) -> Reply {
        if self.health.is_up() {
            // Short, and nothing about the stream or the account: anyone
            // may ask, from any (spoofed) address.
            Reply {
                payload: b"ok".to_vec(),
                content_format: Some(FORMAT_TEXT),
                // Always fresh: a proxy must not answer from a cache.
                max_age: Some(0),
                ..Reply::empty(ResponseType::Content)
            }
        } else {
            // Why is in the log (KinesisHealth): AWS's text names accounts.
            unavailable("Kinesis is not reachable", RETRY_AFTER_UNAVAILABLE)
        }
    }

    async fn wait_and_answer(
        self: Arc<Self>,
        to: ReplyTo,
        mut receiver: oneshot::Receiver<Outcome>,
        deadline: Instant,
    ) {
        let outcome = match tokio::time::timeout(PIGGYBACK_WINDOW, &mut receiver).await {
            Ok(outcome) => outcome.ok(),
            Err(_) => {
                let key = (to.peer, to.message_id);
                let token = Token::new(&to.token);
                let acknowledge = to.confirmable
                    && self
                        .exchanges
                        .lock()
                        .is_ok_and(|mut exchanges| exchanges.acknowledge(&key, token));
                if acknowledge {
                    self.send(&message::empty_ack(to.message_id), to.peer);
                }
                tokio::time::timeout_at(deadline, receiver)
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
        };
        let reply = match outcome {
            Some(Outcome::Stored) => Reply::empty(ResponseType::Changed),
            Some(Outcome::Unavailable(reason)) => {
                rejected("unavailable");
                tracing::debug!(%reason, "CoAP record not stored in time");
                unavailable(
                    "Kinesis did not take the record in time",
                    RETRY_AFTER_UNAVAILABLE,
                )
            }
            // Counted by the producer, which found it out.
            Some(Outcome::Unputtable(unputtable)) => unputtable_reply(unputtable),
            Some(Outcome::Refused(reason)) => {
                rejected("refused");
                tracing::warn!(%reason, "Kinesis refused a CoAP record");
                Reply::error(
                    ResponseType::InternalServerError,
                    "Kinesis refused the record",
                )
            }
            None => {
                rejected("unavailable");
                unavailable(
                    "Kinesis did not take the record in time",
                    RETRY_AFTER_UNAVAILABLE,
                )
            }
        };
        self.answer(&to, reply);
    }

    /// Sends `reply` the way the exchange needs (piggybacked on the ACK,
    /// separately after an empty ACK, or as NON), remembers it for
    /// retransmissions, and counts it.
    fn answer(self: &Arc<Self>, to: &ReplyTo, mut reply: Reply) {
        // The answer to the last block of an upload names that block.
        reply.block1 = reply.block1.or(to.last_block);
        let reply = no_larger_than(reply, to.request_bytes, &to.token);
        metrics::counter!(m::GATEWAY_COAP_REQUESTS, "code" => reply.code_text()).increment(1);
        let suppressed = message::suppresses(to.no_response, reply.code);
        let key = (to.peer, to.message_id);
        let piggybacked = to.confirmable.then(|| {
            Bytes::from(reply.encode(MessageType::Acknowledgement, to.message_id, &to.token))
        });
        let own_id = || self.next_message_id.fetch_add(1, Ordering::Relaxed);
        let non = (!to.confirmable && !suppressed)
            .then(|| Bytes::from(reply.encode(MessageType::NonConfirmable, own_id(), &to.token)));
        // What a retransmission of the request will get: decided with the
        // exchange locked, so that it agrees with what is sent now.
        let acked = if !to.remembered {
            Some(false)
        } else {
            self.exchanges
                .lock()
                .map(|mut exchanges| {
                    exchanges.answer(key, Token::new(&to.token), |acked| {
                        match (&piggybacked, acked) {
                            (Some(_), true) => Some(Bytes::from(message::empty_ack(to.message_id))),
                            (Some(datagram), false) => Some(datagram.clone()),
                            (None, _) => non.clone(),
                        }
                    })
                })
                .unwrap_or(Some(false))
        };
        let Some(acked) = acked else {
            // A new request with this message id (another token) took the
            // exchange's place: this answer's client is gone, and an ACK
            // with its id would stop the new request's retransmissions.
            tracing::debug!(peer = %to.peer, id = to.message_id, "answer to a superseded CoAP exchange not sent");
            return;
        };
        if to.confirmable && acked {
            // The client has its empty ACK: the answer is a confirmable
            // message of its own (No-Response may suppress it).
            if !suppressed {
                metrics::counter!(m::GATEWAY_COAP_SEPARATE).increment(1);
                let id = own_id();
                let datagram = reply.encode(MessageType::Confirmable, id, &to.token);
                match SeparateSlot::take(self) {
                    Some(slot) => {
                        tokio::spawn(
                            Arc::clone(self).deliver_separately(to.peer, id, datagram, slot),
                        );
                    }
                    None => {
                        // Over the bound: sent once, never resent.
                        metrics::counter!(m::GATEWAY_COAP_UNTRACKED).increment(1);
                        self.send(&datagram, to.peer);
                    }
                }
            }
        } else if let Some(datagram) = piggybacked {
            // A confirmable request is always acknowledged; No-Response
            // suppresses only the response, so it gets an empty ACK then.
            if suppressed {
                self.send(&message::empty_ack(to.message_id), to.peer);
            } else {
                self.send(&datagram, to.peer);
            }
        } else if let Some(datagram) = non {
            self.send(&datagram, to.peer);
        }
    }

    /// Sends a separate confirmable response until the client acknowledges
    /// (or resets) it, at most MAX_RETRANSMIT times more, waiting ACK_TIMEOUT
    /// (times a random factor up to 1.5) and doubling.
    async fn deliver_separately(
        self: Arc<Self>,
        peer: SocketAddr,
        id: u16,
        datagram: Vec<u8>,
        _slot: SeparateSlot,
    ) {
        let (tx, mut rx) = oneshot::channel();
        if let Ok(mut waiting) = self.awaiting_ack.lock() {
            waiting.insert((peer, id), tx);
        }
        let jitter = 1.0 + f64::from(id % 500) / 1_000.0;
        let mut wait = ACK_TIMEOUT.mul_f64(jitter);
        for _ in 0..=MAX_RETRANSMIT {
            self.send(&datagram, peer);
            if tokio::time::timeout(wait, &mut rx).await.is_ok() {
                return;
            }
            wait *= 2;
        }
        if let Ok(mut waiting) = self.awaiting_ack.lock() {
            waiting.remove(&(peer, id));
        }
        tracing::debug!(%peer, "a separate CoAP response was never acknowledged");
    }

    fn send(&self, datagram: &[u8], peer: SocketAddr) {
        // UDP: a full socket buffer drops the datagram, as the network
        // might; the client retransmits.
        if let Err(error) = self.socket.try_send_to(datagram, peer) {
            tracing::debug!(%error, %peer, "CoAP send failed");
        }
    }
}

/// `reply` with its diagnostic text cut so that an error answer is no larger
/// than the request: whoever spoofs a source address gets no more bytes sent
/// to it than were sent (RFC 7252 §11.3, amplification). Signed requests are
/// large enough for the whole text; the rest get what fits.
fn no_larger_than(mut reply: Reply, request_bytes: usize, token: &[u8]) -> Reply {
    let class = u8::from(MessageClass::Response(reply.code)) >> 5;
    if class < 4 || reply.payload.is_empty() {
        return reply;
    }
    let text = std::mem::take(&mut reply.payload);
    let bare = reply.encode(MessageType::Acknowledgement, 0, token).len();
    // One more byte for the payload marker.
    let room = request_bytes.saturating_sub(bare + 1);
    if room > 0 {
        let mut cut = room.min(text.len());
        while cut > 0 && std::str::from_utf8(&text[..cut]).is_err() {
            cut -= 1;
        }
        reply.payload = text;
        reply.payload.truncate(cut);
    }
    reply
}

/// One of the `max_separate_responses` places for a separate response
/// being resent; given back when dropped.
#[derive(Debug)]
struct SeparateSlot(Arc<Server>);

impl SeparateSlot {
    /// A place, if one is free.
    fn take(server: &Arc<Server>) -> Option<SeparateSlot> {
        let limit = server.settings.max_separate_responses;
        let taken =
            server
                .separate_in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < limit).then_some(n + 1)
                });
        let now = match taken {
            Ok(before) => before + 1,
            Err(_) => return None,
        };
        metrics::gauge!(m::GATEWAY_COAP_SEPARATE_PENDING).set(now as f64);
        Some(SeparateSlot(Arc::clone(server)))
    }
}

impl Drop for SeparateSlot {
    fn drop(&mut self) {
        let before = self.0.separate_in_flight.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!(m::GATEWAY_COAP_SEPARATE_PENDING).set((before - 1) as f64);
    }
}

/// The answer to a record Kinesis can never take: the request is at fault.
fn unputtable_reply(unputtable: Unputtable) -> Reply {
    let code = match unputtable {
        Unputtable::TooLarge { .. } => ResponseType::RequestEntityTooLarge,
        _ => ResponseType::BadRequest,
    };
    Reply::error(code, unputtable.to_string())
}

/// A 5.03 with Max-Age: try again in `seconds`.
fn unavailable(reason: impl Into<String>, seconds: u32) -> Reply {
    Reply {
        max_age: Some(seconds),
        ..Reply::error(ResponseType::ServiceUnavailable, reason)
    }
}

fn rejected(reason: &'static str) {
    metrics::counter!(m::GATEWAY_REJECTED, "protocol" => "coap", "reason" => reason).increment(1);
}
