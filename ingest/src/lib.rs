//! ingest: IoT telemetry from Kinesis into TimescaleDB, exactly once.
//!
//! The data's path: source (Kinesis shards) -> decode (record bytes to
//! samples and events) -> batch (binary COPY buffers) -> sink (one
//! PostgreSQL transaction with the shard checkpoints). Around it:
//!
//! - [`config`]: the typed, validated configuration of each command.
//! - [`db`]: connecting to PostgreSQL with timeouts and one-line errors.
//! - [`decode`]: one Kinesis record's bytes to a [`decode::Reading`] or a
//!   precise reason for its dead letter. No IO.
//! - [`kpl`]: KPL aggregation: user records out of (and into) one Kinesis
//!   record. No IO.
//! - [`gateway`]: `ingest gateway`, CoAP and MQTT telemetry into Kinesis.
//! - [`provision`]: `ingest provision`, the AWS side, idempotently.
//!
//! The `ingest` binary (src/main.rs and src/cli/) parses flags, environment
//! and the config file into these types; only it knows clap.

pub mod archive;
pub mod backoff;
pub mod batch;
pub mod config;
pub mod consumer;
pub mod db;
pub mod decode;
pub mod gateway;
pub mod kpl;
pub mod lease;
pub mod metrics;
pub mod observe;
pub mod provision;
pub mod sink;
pub mod source;
