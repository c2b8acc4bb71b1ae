//! The MQTT bridge: what an AWS IoT rule with a Kinesis action does, for a
//! broker of our own (Mosquitto locally). It subscribes to the configured
//! filters, turns each message into a record (topic levels by
//! [`TopicLayout`], payload by
//! [`record::build`](crate::gateway::record::build)) and puts it into
//! Kinesis with the device as partition key.
//!
//! QoS 1 messages are acknowledged to the broker only after Kinesis took
//! their record, in the order they arrived (MQTT 3.1.1 §4.6), with a
//! persistent session (clean session off, a configured client id): a message
//! not acknowledged when the gateway dies or Kinesis is down stays with the
//! broker, which delivers it again. So the bridge is at least once: a
//! message whose record was put but whose acknowledgement was lost is put
//! again. QoS 0 messages are put if the queue has room and dropped (and
//! counted) if not: at most once, as QoS 0 promises.
//!
//! A message that cannot become a record (no layout matches its topic, a
//! payload that is not a JSON object where one is needed, or larger than
//! the decoder takes) is acknowledged and dropped, logged with its topic
//! and counted, as an IoT rule's error action would. A record that is built
//! but would not decode (a NaN, a bad `ts`) is put all the same, as an IoT
//! rule does: the consumer keeps it as a dead letter with its reason. A
//! record Kinesis could never take (a device id over 256 characters, more
//! than 1 MiB once encoded) is acknowledged and dropped the same way, never
//! queued: one such message must not stop the messages behind it.
//!
//! Memory is bounded, and the rumqttc event loop is never blocked (it must
//! keep sending acknowledgements and pings): packets are read up to
//! `max_payload_bytes` plus the largest topic (the broker's
//! `message_size_limit` must match, or an oversized message is redelivered
//! forever); messages are handed to the forwarder over a bounded channel
//! without waiting; when it is full, QoS 0 messages are dropped and counted
//! and QoS 1 messages are held until there is room, at most [`MAX_HELD`]
//! messages and [`MAX_HELD_BYTES`] (a broker's in-flight window,
//! `max_inflight_messages`, would bound them, but Mosquitto 2.0 was seen
//! to send far more after a Kinesis outage). A QoS 1 message beyond that is
//! left unacknowledged with the broker (deferred, counted) and, once the
//! bridge is idle again, the bridge reconnects so that the broker delivers
//! it again (persistent session). The forwarder (`forward.rs`) waits for
//! room in the producer's queue (records and bytes) while it keeps
//! acknowledging, and holds at most [`MAX_WAITING`] messages waiting for
//! their in-order acknowledgement, without their payloads.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS, SubscribeFilter};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::forward::forward;
use super::layout::TopicLayout;
use crate::backoff::Backoff;
use crate::gateway::admission::RateLimitedLog;
use crate::gateway::producer::Producer;
use crate::metrics as m;

/// What a PUBLISH packet carries besides its payload, at most: the topic
/// (up to 65,535 bytes and its length) and the packet id. A packet's
/// remaining length may be the payload limit plus this.
const PUBLISH_OVERHEAD_BYTES: usize = 65_535 + 2 + 2;
/// Messages handed from the event loop to the forwarder without waiting.
pub const HANDOVER_CAPACITY: usize = 256;
/// Messages waiting for their in-order acknowledgement, at most: more are
/// not taken from the handover until some are acknowledged.
pub const MAX_WAITING: usize = 10_000;
/// QoS 1 messages the event loop holds when the handover is full, at most.
pub const MAX_HELD: usize = 10_000;
/// Bytes (payloads and topics) the event loop holds, at most.
pub const MAX_HELD_BYTES: usize = 32 * 1024 * 1024;
/// How often a bridge that deferred messages checks whether it is idle.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// The least time between two log lines about dropped messages.
pub(super) const DROP_LOG_EVERY: Duration = Duration::from_secs(10);
/// How often the broker hears from an idle bridge.
const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// The bridge's settings.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    /// The broker's host.
    pub host: String,
    /// The broker's port.
    pub port: u16,
    /// User name and password, if the broker wants them.
    pub credentials: Option<Credentials>,
    /// The client id: fixed, so the broker keeps the session (and the
    /// messages not acknowledged) across restarts.
    pub client_id: String,
    /// The topic filters subscribed to (QoS 1).
    pub filters: Vec<String>,
    /// With a group, each filter is subscribed as `$share/<group>/<filter>`:
    /// the broker gives each message to one gateway of the group.
    pub share_group: Option<String>,
    /// How topics map to records.
    pub layouts: Vec<TopicLayout>,
    /// Larger payloads are refused (the decoder's limit); packets are read
    /// up to this plus the topic, so the broker must refuse larger messages
    /// (Mosquitto's `message_size_limit`).
    pub max_payload_bytes: usize,
}

/// A broker login. `Debug` shows the user, never the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub user: String,
    /// The password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"***")
            .finish()
    }
}

impl MqttSettings {
    /// The filters as subscribed: shared ones when there is a group.
    pub fn subscriptions(&self) -> Vec<String> {
        self.filters
            .iter()
            .map(|filter| match &self.share_group {
                Some(group) => format!("$share/{group}/{filter}"),
                None => filter.clone(),
            })
            .collect()
    }
}

/// Runs the bridge until `shutdown`, then acknowledges what Kinesis took
/// within `grace` and disconnects. Never fails: a broker that cannot be
/// reached is retried with backoff, and logged.
pub async fn run(
    settings: MqttSettings,
    producer: Producer,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let mut options = MqttOptions::new(&settings.client_id, &settings.host, settings.port);
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(KEEP_ALIVE)
        .set_max_packet_size(
            settings.max_payload_bytes + PUBLISH_OVERHEAD_BYTES,
            64 * 1024,
        );
    if let Some(credentials) = &settings.credentials {
        options.set_credentials(&credentials.user, &credentials.password);
    }
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    let (messages, received) = mpsc::channel(HANDOVER_CAPACITY);
    // QoS 1 messages that found the handover full, oldest first.
    let mut held: VecDeque<Publish> = VecDeque::new();
    let mut held_bytes = 0;
    metrics::gauge!(m::GATEWAY_MQTT_HELD).set(0.0);
    // QoS 1 messages left with the broker since the last (re)connection,
    // and how many idle checks in a row found the bridge idle.
    let mut deferred = 0u64;
    let mut idle_checks = 0;
    let mut idle_tick = tokio::time::interval(IDLE_CHECK);
    let mut drop_log = RateLimitedLog::new(DROP_LOG_EVERY);
    let stop_forwarding = CancellationToken::new();
    // Messages the forwarder has taken and not acknowledged yet.
    let busy = Arc::new(AtomicUsize::new(0));
    let mut forwarder = tokio::spawn(forward(
        received,
        client.clone(),
        producer,
        settings.clone(),
        stop_forwarding.clone(),
        busy.clone(),
    ));
    let subscriptions = settings.subscriptions();
    let filters: Vec<SubscribeFilter> = subscriptions
        .iter()
        .map(|filter| SubscribeFilter::new(filter.clone(), QoS::AtLeastOnce))
        .collect();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut connected = false;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = messages.reserve(), if !held.is_empty() => {
                if let (Ok(permit), Some(publish)) = (permit, held.pop_front()) {
                    held_bytes -= publish.payload.len() + publish.topic.len();
                    permit.send(publish);
                }
                metrics::gauge!(m::GATEWAY_MQTT_HELD).set(held.len() as f64);
                continue;
            }
            _ = idle_tick.tick(), if deferred > 0 => {
                let idle = held.is_empty()
                    && messages.capacity() == HANDOVER_CAPACITY
                    && busy.load(Ordering::Acquire) == 0;
                idle_checks = if idle { idle_checks + 1 } else { 0 };
                // Twice in a row: the last acknowledgements are written.
                if idle_checks >= 2 {
                    tracing::info!(
                        deferred,
                        "MQTT bridge idle again: reconnecting so that the broker delivers \
                         the messages left with it"
                    );
                    deferred = 0;
                    idle_checks = 0;
                    // Drops the connection; the next poll connects again.
                    eventloop.clean();
                }
                continue;
            }
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                connected = true;
                backoff.reset();
                tracing::info!(
                    broker = %format!("{}:{}", settings.host, settings.port),
                    client_id = %settings.client_id,
                    session_present = ack.session_present,
                    filters = ?subscriptions,
                    "MQTT bridge connected"
                );
                if let Err(error) = client.try_subscribe_many(filters.clone()) {
                    tracing::error!(%error, "cannot subscribe");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let mut refused = false;
                for (filter, code) in subscriptions.iter().zip(&ack.return_codes) {
                    if *code == rumqttc::SubscribeReasonCode::Failure {
                        refused = true;
                        tracing::error!(%filter, "the broker refused the subscription");
                    }
                }
                if !refused {
                    tracing::info!(filters = ?subscriptions, "MQTT bridge subscribed");
                    metrics::gauge!(m::GATEWAY_MQTT_SUBSCRIBED).set(1.0);
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let qos = match publish.qos {
                    QoS::AtMostOnce => "0",
                    QoS::AtLeastOnce => "1",
                    QoS::ExactlyOnce => "2",
                };
                metrics::counter!(m::GATEWAY_MQTT_MESSAGES, "qos" => qos).increment(1);
                // Never waits: the event loop must go on being polled.
                let full = if held.is_empty() {
                    match messages.try_send(publish) {
                        Ok(()) => None,
                        Err(mpsc::error::TrySendError::Full(publish)) => Some(publish),
                        Err(mpsc::error::TrySendError::Closed(_)) => None,
                    }
                } else {
                    Some(publish)
                };
                if let Some(publish) = full {
                    if publish.qos == QoS::AtMostOnce {
                        metrics::counter!(m::GATEWAY_REJECTED, "protocol" => "mqtt", "reason" => "overloaded")
                            .increment(1);
                        if let Some(suppressed) = drop_log.allow(std::time::Instant::now()) {
                            tracing::warn!(topic = %publish.topic, suppressed, "MQTT QoS 0 message dropped: the bridge is full");
                        }
                    } else if held.len() < MAX_HELD
                        && held_bytes + publish.payload.len() + publish.topic.len()
                            <= MAX_HELD_BYTES
                    {
                        held_bytes += publish.payload.len() + publish.topic.len();
                        held.push_back(publish);
                        metrics::gauge!(m::GATEWAY_MQTT_HELD).set(held.len() as f64);
                    } else {
                        // Not acknowledged: the broker keeps it and delivers
                        // it again after the reconnection once idle.
                        deferred += 1;
                        metrics::counter!(m::GATEWAY_MQTT_DEFERRED).increment(1);
                        if let Some(suppressed) = drop_log.allow(std::time::Instant::now()) {
                            tracing::warn!(
                                suppressed,
                                "MQTT bridge full: a QoS 1 message is left with the broker until the bridge is idle"
                            );
                        }
                    }
                }
            }
            Ok(_) => {}
            Err(error) => {
                metrics::counter!(m::GATEWAY_MQTT_CONNECTION_ERRORS).increment(1);
                metrics::gauge!(m::GATEWAY_MQTT_SUBSCRIBED).set(0.0);
                let delay = backoff.next_delay();
                if connected {
                    tracing::warn!(%error, "MQTT connection lost; reconnecting");
                } else {
                    tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "cannot reach the MQTT broker");
                }
                connected = false;
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }

    // Stop taking messages; acknowledge those Kinesis takes within the
    // grace period (the event loop must run to send the acks), leave the
    // rest with the broker, and say goodbye.
    stop_forwarding.cancel();
    drop(messages);
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        tokio::select! {
            _ = &mut forwarder => break,
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!("MQTT messages still waiting for Kinesis at shutdown stay with the broker");
                forwarder.abort();
                break;
            }
            event = eventloop.poll(), if connected => if event.is_err() { connected = false },
        }
    }
    if connected && client.try_disconnect().is_ok() {
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Ok(event)) = tokio::time::timeout_at(until, eventloop.poll()).await {
            if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    }
    tracing::info!("MQTT bridge stopped");
}
