//! `ingest consume`: the shards of a stream into the database, exactly once.
//!
//! Tasks, and what flows between them:
//!
//! ```text
//! coordinator --(leases: start/stop)--> shard task per held shard
//! shard task: ShardReader -> decode -> Chunk --(bounded channel)--> writer
//! writer (N, each its own connection): Chunk -> series ids -> Batch -> one transaction
//! writer --(lost leases, ended shards)--> coordinator
//! ```
//!
//! Each shard is read by one task and written by one writer, so its batches
//! commit in sequence order; the bounded channels stop a shard's polling when
//! its writer falls behind. See ARCHITECTURE.md for the invariants.

mod chunk;
mod config;
mod coordinator;
mod shard;
mod writer;

pub use chunk::{Chunk, Committed, Item, decode_records};
pub use config::ConsumerConfig;
pub use coordinator::run;
