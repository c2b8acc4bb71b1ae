//! The MQTT bridge: what an AWS IoT rule with a Kinesis action does, for a
//! broker of our own (Mosquitto locally). It subscribes to the configured
//! filters, turns each message into a record (topic levels by
//! [`TopicLayout`], payload by [`record::build`]) and puts it into Kinesis
//! with the device as partition key.
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
//! rule does: the consumer keeps it as a dead letter with its reason.

use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS, SubscribeFilter};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::layout::{TopicLayout, map_topic};
use crate::backoff::Backoff;
use crate::gateway::producer::{Outcome, Producer, Protocol, Submission};
use crate::gateway::record::{self, Conflict, Payload};
use crate::metrics as m;

/// The largest MQTT packet read: MQTT's own limit. Refusing bigger ones at
/// the connection would drop it, and the broker would deliver the same
/// message again forever; they are read and refused one by one instead.
const MAX_PACKET_BYTES: usize = 268_435_455;
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
    /// Larger payloads are refused (the decoder's limit).
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
        .set_max_packet_size(MAX_PACKET_BYTES, 64 * 1024);
    if let Some(credentials) = &settings.credentials {
        options.set_credentials(&credentials.user, &credentials.password);
    }
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    let (messages, received) = mpsc::unbounded_channel();
    let stop_forwarding = CancellationToken::new();
    let mut forwarder = tokio::spawn(forward(
        received,
        client.clone(),
        producer,
        settings.clone(),
        stop_forwarding.clone(),
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
                let _ = messages.send(publish);
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

/// Turns messages into records, queues them, and acknowledges each QoS 1
/// message once its record is stored, in arrival order.
async fn forward(
    mut received: mpsc::UnboundedReceiver<Publish>,
    client: AsyncClient,
    producer: Producer,
    settings: MqttSettings,
    stop: CancellationToken,
) {
    // Messages waiting for their outcome, in arrival order: (message, stored).
    let mut waiting = FuturesOrdered::new();
    let mut stopping = false;
    loop {
        metrics::gauge!(m::GATEWAY_MQTT_UNACKED).set(waiting.len() as f64);
        if stopping && waiting.is_empty() {
            return;
        }
        tokio::select! {
            biased;
            Some((publish, stored)) = waiting.next(), if !waiting.is_empty() => {
                let publish: Publish = publish;
                if stored && publish.qos != QoS::AtMostOnce {
                    if client.ack(&publish).await.is_err() {
                        return;
                    }
                    metrics::counter!(m::GATEWAY_MQTT_ACKED).increment(1);
                }
            }
            _ = stop.cancelled(), if !stopping => stopping = true,
            message = received.recv(), if !stopping => match message {
                Some(publish) => {
                    let outcome = handle(&publish, &producer, &settings).await;
                    waiting.push_back(async move {
                        let stored = match outcome {
                            Handled::Done => true,
                            Handled::Waiting(receiver) => {
                                matches!(receiver.await, Ok(Outcome::Stored))
                            }
                            Handled::Lost => false,
                        };
                        (publish, stored)
                    });
                }
                None => stopping = true,
            },
        }
    }
}

/// What became of a message when it was handed on.
enum Handled {
    /// Nothing more to wait for: acknowledge it (refused, or QoS 0 queued).
    Done,
    /// Its record is queued: acknowledge it once stored.
    Waiting(tokio::sync::oneshot::Receiver<Outcome>),
    /// Not queued (shutting down): leave it with the broker.
    Lost,
}

async fn handle(publish: &Publish, producer: &Producer, settings: &MqttSettings) -> Handled {
    let refuse = |reason: &'static str, detail: &dyn std::fmt::Display| {
        metrics::counter!(m::GATEWAY_REJECTED, "protocol" => "mqtt", "reason" => reason)
            .increment(1);
        tracing::warn!(topic = %publish.topic, %detail, "MQTT message dropped");
        Handled::Done
    };
    let Some(mapped) = map_topic(&settings.layouts, &publish.topic) else {
        return refuse("unmatched_topic", &"no topic layout matches");
    };
    if publish.payload.len() > settings.max_payload_bytes {
        let detail = format!(
            "the payload is {} bytes, more than the {}-byte limit",
            publish.payload.len(),
            settings.max_payload_bytes
        );
        return refuse("too_large", &detail);
    }
    let arrival_millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let payload = match mapped.name {
        Some(name) => Payload::Value {
            name,
            raw: &publish.payload,
        },
        None => Payload::Object(&publish.payload),
    };
    let record = match record::build(
        mapped.origin,
        payload,
        arrival_millis,
        Conflict::OriginWins,
        "topic",
    ) {
        Ok(record) => record,
        Err(err) => return refuse("bad_payload", &err),
    };
    let submission = Submission {
        key: mapped.origin.device.to_owned(),
        data: record.into(),
        deadline: None,
        protocol: Protocol::Mqtt,
    };
    if publish.qos == QoS::AtMostOnce {
        // Kept waiting like the others (a record whose receiver is gone is
        // never sent), but never waited for room.
        return match producer.try_submit(submission) {
            Ok(receiver) => Handled::Waiting(receiver),
            Err(err) => refuse("overloaded", &err),
        };
    }
    match producer.submit(submission).await {
        Ok(receiver) => Handled::Waiting(receiver),
        Err(_) => Handled::Lost,
    }
}
