//! Shard leases: which worker reads which shard, fenced by a counter.
//!
//! - [`balance`]: how many shards a worker should hold and when to take one
//!   from another worker. Pure.
//! - [`identity`]: a stream is its ARN and creation time; the lease key.
//! - [`status`]: what `ingest status` shows.
//! - [`store`]: the SQL on `ingest.shard_leases` and `ingest.workers`. All
//!   time comparisons use the database's clock, so workers' clocks may differ.

pub mod balance;
pub mod identity;
pub mod status;
pub mod store;

pub use balance::{Fleet, Move, plan, target};
pub use store::{ExpiredShard, FirstStart, HeldLease, LeaseStore};
