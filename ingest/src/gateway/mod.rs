//! `ingest gateway`: telemetry from CoAP devices and from an MQTT broker
//! into the Kinesis stream, in the record format of DESIGN.md.
//!
//! ```text
//! CoAP/UDP --> coap::server --\
//!                              +--> producer --PutRecords--> Kinesis
//! MQTT broker --> mqtt::bridge /      ^
//!                                     health (probe + call results) --> /health, /readyz
//! ```
//!
//! - [`record`]: a message (origin ids + payload) to the record's JSON.
//! - [`cbor`]: CBOR payloads to JSON.
//! - [`auth`]: HMAC-SHA256 signatures per (house, device), fresh and used once.
//! - [`admission`]: Kinesis's limits for one record, checked before it is queued.
//! - [`producer`]: batching into PutRecords, retries, each record's outcome.
//! - [`aggregate`]: a call's records packed into KPL aggregates, one group per shard.
//! - [`health`]: whether Kinesis is reachable.
//! - [`coap`], [`mqtt`]: the two doors.
//!
//! Only `source::kinesis` knows Kinesis types; `record`, `cbor`,
//! `mqtt::layout` and CoAP's message, resource and exchange layers do no IO;
//! `auth` reads its key files only (at start, and when they change).

pub mod admission;
pub mod aggregate;
pub mod auth;
pub mod cbor;
pub mod coap;
mod config;
pub mod health;
pub mod mqtt;
pub mod producer;
pub mod record;

use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

pub use config::GatewayConfig;

use crate::observe::Readiness;
use crate::source::kinesis::{KinesisSource, SourceError};
use health::KinesisHealth;
use producer::{Producer, ProducerConfig};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Kinesis refused in a way no retry fixes (no such stream, access
    /// denied, no credentials).
    #[error(transparent)]
    Kinesis(#[from] SourceError),
    /// The CoAP address cannot be bound.
    #[error("cannot listen for CoAP on {addr}: {source}. Is another gateway running there?")]
    Bind {
        /// The address of `--coap-bind`.
        addr: std::net::SocketAddr,
        /// What the system said.
        source: std::io::Error,
    },
}

/// The socket buffers asked for (the kernel caps them at
/// `net.core.rmem_max` / `wmem_max`): a burst of requests from many devices
/// must not overflow the default ~200 KiB, or datagrams are dropped and
/// devices retransmit after ACK_TIMEOUT.
const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Binds the CoAP socket with large buffers (best effort).
fn bind_udp(addr: std::net::SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    for (what, set) in [
        (
            "receive",
            Socket::set_recv_buffer_size as fn(&Socket, usize) -> std::io::Result<()>,
        ),
        ("send", Socket::set_send_buffer_size),
    ] {
        if let Err(error) = set(&socket, SOCKET_BUFFER_BYTES) {
            tracing::warn!(%error, "cannot enlarge the CoAP socket's {what} buffer");
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Runs the gateway until `shutdown`, then answers what is in flight (within
/// the configured grace) and returns. `readiness` follows Kinesis's
/// reachability, for `/readyz`.
pub async fn run(
    config: GatewayConfig,
    shutdown: CancellationToken,
    readiness: Arc<Readiness>,
) -> Result<(), GatewayError> {
    let source = KinesisSource::from_env(&config.stream).await?;
    let health = Arc::new(KinesisHealth::new(readiness));
    // Fail fast on what only a person can fix; an unreachable endpoint is
    // not that (it may come up), and is reported by /health meanwhile.
    match tokio::time::timeout(health::PROBE_INTERVAL * 3, source.probe()).await {
        Ok(Ok(())) => health.reached(),
        Ok(Err(err)) if err.is_retriable() => health.failed(&err),
        Ok(Err(err)) => return Err(err.into()),
        // No answer yet: /health says so until the probe loop gets one.
        Err(_) => {}
    }
    let socket = bind_udp(config.coap_bind).map_err(|source| GatewayError::Bind {
        addr: config.coap_bind,
        source,
    })?;
    let coap_addr = socket.local_addr().ok();
    let (producer, producer_task) = Producer::start(
        source.clone(),
        ProducerConfig {
            concurrency: config.put_concurrency,
            queue_records: config.queue_records,
            queue_bytes: config.queue_bytes,
            aggregate: config.aggregate,
        },
        health.clone(),
    );
    tracing::info!(
        stream = %config.stream,
        coap = ?coap_addr,
        mqtt = ?config.mqtt.as_ref().map(|m| format!("{}:{} {:?}", m.host, m.port, m.filters)),
        auth = ?config.auth,
        "gateway started"
    );
    let probe = tokio::spawn(health::probe_loop(source, health.clone(), shutdown.clone()));
    // A rotated key (a Kubernetes secret updated in place) takes effect
    // without a restart.
    let keys = tokio::spawn(auth::watch(config.auth.clone(), shutdown.clone()));
    let mqtt = config.mqtt.clone().map(|settings| {
        tokio::spawn(mqtt::run(
            settings,
            producer.clone(),
            shutdown.clone(),
            config.shutdown_grace,
        ))
    });
    let settings = coap::CoapSettings {
        max_payload_bytes: config.max_payload_bytes,
        put_timeout: config.put_timeout,
        auth: config.auth.clone(),
        exchange_capacity: config.exchange_capacity,
        max_separate_responses: config.max_separate_responses,
    };
    let coap = coap::serve(
        socket,
        settings,
        producer,
        health,
        shutdown.clone(),
        config.shutdown_grace,
    );
    // Both doors end after `shutdown`, each answering what it has in
    // flight; then the producer has no handle left and ends too.
    let mqtt_done = async {
        if let Some(mqtt) = mqtt {
            let _ = mqtt.await;
        }
    };
    tokio::join!(coap, mqtt_done);
    let _ = tokio::time::timeout(config.shutdown_grace, producer_task).await;
    let _ = probe.await;
    let _ = keys.await;
    tracing::info!("gateway stopped");
    Ok(())
}
