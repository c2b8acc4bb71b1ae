//! What a device sends and what became of it: the types every part of
//! loadgen shares. No IO.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// How a device talks to the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "protocol", rename_all = "lowercase")]
pub enum Protocol {
    /// Its own MQTT connection, publishing at this QoS (0 or 1).
    Mqtt { qos: u8 },
    /// CoAP POSTs, confirmable (CON) or not (NON).
    Coap { confirmable: bool },
}

impl Protocol {
    /// The report's name for this protocol: "mqtt" or "coap".
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Mqtt { .. } => "mqtt",
            Protocol::Coap { .. } => "coap",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Mqtt { qos } => write!(f, "MQTT QoS {qos}"),
            Protocol::Coap { confirmable: true } => write!(f, "CoAP CON"),
            Protocol::Coap { confirmable: false } => write!(f, "CoAP NON"),
        }
    }
}

/// One message of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// When it is due, from the run's start.
    pub offset: Duration,
    /// The record's `ts` (epoch milliseconds): with the device, what the
    /// verification looks for.
    pub ts_ms: i64,
    /// The JSON record.
    pub payload: Bytes,
}

/// A device and its traffic, generated or replayed.
pub struct DeviceTraffic {
    pub device: String,
    pub protocol: Protocol,
    /// The MQTT topic or the CoAP path.
    pub target: String,
    /// The field present in every record of the device (see `verify`).
    pub check_metric: String,
    /// When it connects, from the run's start.
    pub start: Duration,
    /// Its messages in time order.
    pub messages: Box<dyn Iterator<Item = Message> + Send>,
}

impl fmt::Debug for DeviceTraffic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceTraffic")
            .field("device", &self.device)
            .field("protocol", &self.protocol)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// What became of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// The broker (PUBACK) or the gateway (2.04, after Kinesis took it)
    /// acknowledged it.
    Acked,
    /// Sent where no acknowledgement comes (QoS 0; NON without an answer).
    Unconfirmed,
    /// Sent, but no acknowledgement came (timeout, connection lost): it may
    /// or may not have landed.
    Uncertain(String),
    /// Not sent, or refused by the gateway: it must not land.
    Failed(String),
}

/// The fates of one device's messages, by `ts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceOutcome {
    pub device: String,
    pub protocol: Protocol,
    pub check_metric: String,
    pub fates: Vec<(i64, Fate)>,
}
