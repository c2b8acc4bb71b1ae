//! loadgen: simulated IoT devices that send telemetry over MQTT and CoAP,
//! for benchmarks and the demo.
//!
//! The path of a run: `model` (who the devices are and what they send,
//! from the seed) or `capture` (recorded traffic) -> `run` (one task per
//! device: `mqtt` or `coap`, counting into `stats`) -> `verify` (what the
//! database holds) -> `report`. With `--metrics-addr`, `endpoint` serves
//! the counters of `metrics` (counted where `stats` counts) to Prometheus.

pub mod capture;
pub mod coap;
pub mod endpoint;
pub mod message;
pub mod metrics;
pub mod model;
pub mod mqtt;
pub mod net;
pub mod report;
pub mod run;
pub mod sign;
pub mod stats;
pub mod verify;
