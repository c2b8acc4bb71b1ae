//! The MQTT bridge: a broker's messages into Kinesis, as an AWS IoT rule's
//! Kinesis action would put them.
//!
//! - `layout.rs`: which topic levels name the device, house, field, time.
//! - `bridge.rs`: the rumqttc client and its event loop, never blocked.
//! - `forward.rs`: messages to records, in-order acknowledgements.

mod bridge;
mod forward;
mod layout;

pub use bridge::{Credentials, MqttSettings, run};
pub use layout::{DEFAULT_LAYOUTS, Mapped, TopicLayout, map_topic};
