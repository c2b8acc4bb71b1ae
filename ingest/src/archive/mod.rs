//! The raw archive: every record's bytes, as read, to a Firehose delivery
//! stream that writes them to S3 (and a lifecycle rule on to Glacier).
//!
//! Only [`firehose`] knows Firehose types. The consumer archives a shard's
//! records before they can reach a writer, so a checkpoint moves only after
//! both the archive and the database accepted its records; the archive is at
//! least once (a crash between the two archives some records again).

pub mod firehose;
pub mod provision;

pub use firehose::{Archive, ArchiveError};
