//! Writing batches into PostgreSQL: one transaction per batch holding the
//! binary COPY of its samples, events and dead letters and the fenced
//! checkpoint update of every shard in it.
//!
//! - [`series`]: creating and reading series ids in bulk.
//! - [`commit`]: the batch transaction.
//! - [`bisect`]: the batch again, record by record, when the database refused
//!   some of its rows: those records become dead letters.
//! - [`error`]: what failed, and whether retrying may help.

pub mod bisect;
pub mod commit;
pub mod error;
pub mod series;

pub use bisect::{DATABASE_REFUSED, Refused, write_batch_bisecting};
pub use commit::{Outcome, write_batch};
pub use error::SinkError;
pub use series::{lookup_series, resolve_series};
