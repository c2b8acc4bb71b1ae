//! Support for the criterion benchmarks (`benches/*.rs`) and for
//! `dev/measure-backlog`:
//!
//! - [`records`]: realistic telemetry records, canonical and flat, with
//!   varying devices, times and values, and the series they name.
//! - [`database`]: a fresh, migrated database of the local stack for the
//!   sink benchmark, or a panic saying how to start the stack.
//! - [`kinesis`]: a Kinesis stand-in serving pre-generated shards from
//!   memory over the Kinesis HTTP API, for the end-to-end benchmark.
//!
//! The benchmarks themselves:
//!
//! - `benches/decode.rs`: records per second per core through
//!   `Decoder::decode`, alone and followed by `Segment::add_reading` with a
//!   warm `SeriesCache` (the consumer's hot path).
//! - `benches/sink.rs`: rows per second through `write_batch` (binary COPY
//!   and checkpoint update in one transaction) next to a raw binary COPY of
//!   the same bytes into the same table; and N writers at once against N
//!   raw COPY connections.
//! - `benches/ingest.rs`: records and rows per second through the whole
//!   consumer (`ingest::consumer::run`: GetRecords over HTTP, decode,
//!   batch, COPY and checkpoint) from the stand-in into the database, next
//!   to a raw binary COPY of the same rows; and the consumer's CPU per
//!   million records.
//! - `examples/put_backlog.rs`: fills a Kinesis stream with records, for
//!   `dev/measure-backlog`.

pub mod database;
pub mod kinesis;
pub mod records;
