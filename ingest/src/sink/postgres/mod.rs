//! Writing batches into PostgreSQL: one transaction per batch holding the
//! binary COPY of its samples, events and dead letters and the fenced
//! checkpoint update of every shard in it.
//!
//! - [`series`]: creating and reading series ids in bulk.
//! - [`commit`]: the batch transaction.
//! - [`error`]: what failed, and whether retrying may help.

pub mod commit;
pub mod error;
pub mod series;

pub use commit::{Outcome, write_batch};
pub use error::SinkError;
pub use series::resolve_series;
