//! The bridge's forwarder: each message handed over by the event loop
//! becomes a record (or is refused), is queued for Kinesis, and QoS 1
//! messages are acknowledged once their record is stored, in arrival order.
//! Waiting for room in the producer's queue never stops acknowledgements.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesOrdered, FuturesUnordered};
use rumqttc::{AsyncClient, Publish, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::bridge::{DROP_LOG_EVERY, MAX_WAITING, MqttSettings};
use super::layout::map_topic;
use crate::gateway::admission::{self, RateLimitedLog};
use crate::gateway::producer::{Outcome, Producer, Protocol, Submission, SubmitError};
use crate::gateway::record::{self, Conflict, Payload};
use crate::metrics as m;

/// Turns messages into records, queues them, and acknowledges each QoS 1
/// message once its record is stored (or can never be), in arrival order.
/// Waiting for room in the producer's queue never stops acknowledgements.
pub(super) async fn forward(
    mut received: mpsc::Receiver<Publish>,
    client: AsyncClient,
    producer: Producer,
    settings: MqttSettings,
    stop: CancellationToken,
    busy: Arc<AtomicUsize>,
) {
    // Messages waiting for their outcome, in arrival order: (ack, stored).
    let mut waiting = FuturesOrdered::new();
    // The one message waiting for room in the producer's queue (at most
    // one: the next is not taken before it is queued, to keep the order).
    let mut admitting: FuturesUnordered<BoxFuture<'static, (Publish, Handled)>> =
        FuturesUnordered::new();
    let mut drop_log = RateLimitedLog::new(DROP_LOG_EVERY);
    let mut stopping = false;
    loop {
        let unacked = waiting.len() + admitting.len();
        busy.store(unacked, Ordering::Release);
        metrics::gauge!(m::GATEWAY_MQTT_UNACKED).set(unacked as f64);
        if stopping && waiting.is_empty() && admitting.is_empty() {
            return;
        }
        tokio::select! {
            biased;
            Some((ack, stored)) = waiting.next(), if !waiting.is_empty() => {
                let ack: Publish = ack;
                if stored && ack.qos != QoS::AtMostOnce {
                    if client.ack(&ack).await.is_err() {
                        return;
                    }
                    metrics::counter!(m::GATEWAY_MQTT_ACKED).increment(1);
                }
            }
            Some((ack, handled)) = admitting.next(), if !admitting.is_empty() => {
                waiting.push_back(outcome_of(ack, handled));
            }
            _ = stop.cancelled(), if !stopping => stopping = true,
            message = received.recv(),
                if !stopping && admitting.is_empty() && waiting.len() < MAX_WAITING =>
            match message {
                Some(publish) => {
                    let ack = ack_of(&publish);
                    match prepare(&publish, &settings, &mut drop_log) {
                        Prepared::Done => waiting.push_back(outcome_of(ack, Handled::Done)),
                        Prepared::Submit(submission) if publish.qos == QoS::AtMostOnce => {
                            // Kept waiting like the others (a record whose
                            // receiver is gone is never sent), but never
                            // waited for room.
                            let handled = match producer.try_submit(submission) {
                                Ok(receiver) => Handled::Waiting(receiver),
                                Err(err) => {
                                    dropped(&publish, "overloaded", &err, &mut drop_log);
                                    Handled::Done
                                }
                            };
                            waiting.push_back(outcome_of(ack, handled));
                        }
                        Prepared::Submit(submission) => {
                            let producer = producer.clone();
                            admitting.push(Box::pin(async move {
                                let handled = match producer.submit(submission).await {
                                    Ok(receiver) => Handled::Waiting(receiver),
                                    // Checked before: cannot happen.
                                    Err(SubmitError::Unputtable(_)) => Handled::Done,
                                    Err(_) => Handled::Lost,
                                };
                                (ack, handled)
                            }));
                        }
                    }
                }
                None => stopping = true,
            },
        }
    }
}

/// What acknowledging `publish` needs (its packet id and QoS), without the
/// payload: messages waiting for their turn hold no payload.
fn ack_of(publish: &Publish) -> Publish {
    let mut ack = Publish::new("", publish.qos, Vec::new());
    ack.pkid = publish.pkid;
    ack
}

/// Resolves to the ack and whether the message is done with (stored, or
/// never to be stored), for the in-order acknowledgement.
fn outcome_of(ack: Publish, handled: Handled) -> BoxFuture<'static, (Publish, bool)> {
    Box::pin(async move {
        let done = match handled {
            Handled::Done => true,
            Handled::Waiting(receiver) => {
                matches!(receiver.await, Ok(Outcome::Stored | Outcome::Unputtable(_)))
            }
            Handled::Lost => false,
        };
        (ack, done)
    })
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

/// A message turned into its record, or refused.
enum Prepared {
    /// Refused (logged and counted): acknowledge it, put nothing.
    Done,
    /// The record to queue.
    Submit(Submission),
}

/// Counts a dropped message by `reason` and logs it (rate-limited).
fn dropped(
    publish: &Publish,
    reason: &'static str,
    detail: &dyn std::fmt::Display,
    log: &mut RateLimitedLog,
) {
    metrics::counter!(m::GATEWAY_REJECTED, "protocol" => "mqtt", "reason" => reason).increment(1);
    if let Some(suppressed) = log.allow(std::time::Instant::now()) {
        // A topic can be 64 KiB: the log line shows its start.
        let topic: String = publish.topic.chars().take(200).collect();
        tracing::warn!(%topic, reason, %detail, suppressed, "MQTT message dropped");
    }
}

fn prepare(publish: &Publish, settings: &MqttSettings, log: &mut RateLimitedLog) -> Prepared {
    let mut refuse = |reason: &'static str, detail: &dyn std::fmt::Display| {
        dropped(publish, reason, detail, log);
        Prepared::Done
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
    let key = mapped.origin.device;
    // One that Kinesis could never take would fail every call it shares,
    // and be retried forever ahead of every later message.
    if let Err(unputtable) = admission::check(key, &record) {
        return refuse(unputtable.reason(), &unputtable);
    }
    Prepared::Submit(Submission {
        key: key.to_owned(),
        data: record.into(),
        deadline: None,
        protocol: Protocol::Mqtt,
    })
}
