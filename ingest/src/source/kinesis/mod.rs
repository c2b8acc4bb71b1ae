//! Kinesis, the pipeline's source: list a stream's shards, read each shard
//! in order, and (for provisioning, the loadgen and tests) create streams,
//! reshard them and put records.
//!
//! The only module of the project that knows AWS Kinesis types: none appears
//! in its public API, so the rest of the pipeline sees [`Record`],
//! [`ShardInfo`] and [`SourceError`] only.
//!
//! - `client.rs`: [`KinesisSource`], built from the standard AWS
//!   configuration; lists shards.
//! - `reader.rs`: [`ShardReader`], one shard in order, paced, self-healing.
//! - `put.rs`: PutRecords in chunks, failed entries retried.
//! - `attempt.rs`: one PutRecords call with each record's outcome, for
//!   producers that retry on their own terms (the gateway); one probe.
//! - `provision.rs`: describe the stream; create it provisioned or
//!   on-demand, idempotently (`ingest provision`).
//! - `admin.rs`: create, delete, split, merge; wait until ACTIVE.
//! - `record.rs`: the plain values ([`Record`], [`ShardInfo`], ...).
//! - `error.rs`, `classify.rs`: [`SourceError`], and which SDK errors map to
//!   which of its kinds (retriable or not).
//! - `fanout.rs`: enhanced fan-out: a registered consumer and
//!   [`FanoutReader`], which subscribes to a shard (SubscribeToShard) instead
//!   of polling it.
//! - `retry.rs`: the retry loop and its counters; delays come from the
//!   crate's [`Backoff`](crate::backoff::Backoff).
//!
//! Retries are ours, not the SDK's (turned off in the client): each one is
//! logged at warn with its cause and counted in a [`RetryCounts`].

mod admin;
mod attempt;
mod classify;
mod client;
mod error;
mod fanout;
mod provision;
mod put;
mod reader;
mod record;
mod retry;

pub use attempt::PutEntry;
pub use client::KinesisSource;
pub use error::{Call, SourceError};
pub use fanout::{FanoutReader, SUBSCRIPTION_LIFETIME};
pub use provision::{EnsuredStream, StreamCapacity, StreamDescription};
pub use put::{MAX_BYTES_PER_PUT, MAX_PARTITION_KEY_CHARS, MAX_RECORD_BYTES, MAX_RECORDS_PER_PUT};
pub use reader::{ReaderOptions, ShardReader};
pub use record::{Fetched, Record, ShardInfo, StartPosition};
pub use retry::RetryCounts;
