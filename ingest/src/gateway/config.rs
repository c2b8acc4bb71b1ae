//! The gateway's typed configuration, validated by the binary once at start.

use std::net::SocketAddr;
use std::time::Duration;

use super::auth::AuthPolicy;
use super::mqtt::MqttSettings;

/// Everything `ingest gateway` needs.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The Kinesis stream (name or ARN) records go to.
    pub stream: String,
    /// Where CoAP is served (UDP).
    pub coap_bind: SocketAddr,
    /// Larger CoAP payloads get 4.13 (with Size1 saying the limit). A CoAP
    /// message must fit one datagram, block-wise transfer is not supported.
    pub max_payload_bytes: usize,
    /// How long a CoAP request waits for Kinesis before 5.03.
    pub put_timeout: Duration,
    /// Records queued for Kinesis before CoAP requests get 5.03 (overload).
    pub queue_records: usize,
    /// Bytes (keys and data) queued for Kinesis before CoAP requests get
    /// 5.03 and the MQTT bridge stops taking messages (backpressure).
    pub queue_bytes: usize,
    /// PutRecords calls in flight at once.
    pub put_concurrency: usize,
    /// Pack records into KPL aggregates, one group per shard.
    pub aggregate: bool,
    /// CoAP exchanges remembered for deduplication (memory bound).
    pub exchange_capacity: usize,
    /// Separate CoAP responses retransmitted until acknowledged at once;
    /// beyond it a separate response is sent once, not retransmitted.
    pub max_separate_responses: usize,
    /// Per-device signatures.
    pub auth: AuthPolicy,
    /// The MQTT bridge, when topics to subscribe to are configured.
    pub mqtt: Option<MqttSettings>,
    /// Where /metrics, /healthz and /readyz are served, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// How long a shutdown may take to answer what is in flight.
    pub shutdown_grace: Duration,
}
