//! Every metric name, in one place, with what it counts. Prometheus
//! conventions: `ingest_` prefix, `_total` for counters, units in the name.

/// Records received from Kinesis. Labels: shard.
pub const RECORDS_READ: &str = "ingest_records_read_total";
/// Bytes of record data received from Kinesis.
pub const RECORD_BYTES_READ: &str = "ingest_record_bytes_read_total";
/// Rows committed. Labels: table (samples, events, dead_letters).
pub const ROWS_WRITTEN: &str = "ingest_rows_written_total";
/// Encoded COPY bytes committed.
pub const COPY_BYTES_WRITTEN: &str = "ingest_copy_bytes_written_total";
/// Batches committed.
pub const BATCHES: &str = "ingest_batches_total";
/// Rows per committed batch (histogram).
pub const BATCH_ROWS: &str = "ingest_batch_rows";
/// Time to write and commit one batch, retries excluded (histogram).
pub const BATCH_COMMIT_SECONDS: &str = "ingest_batch_commit_seconds";
/// Records that became dead letters. Labels: reason.
pub const DEAD_LETTERS: &str = "ingest_dead_letters_total";
/// How far behind the tip of its shard the last read was. Labels: shard.
pub const MILLIS_BEHIND_LATEST: &str = "ingest_millis_behind_latest";
/// Leases this worker holds.
pub const LEASES_HELD: &str = "ingest_leases_held";
/// Leases this worker took from another live worker.
pub const LEASE_STEALS: &str = "ingest_lease_steals_total";
/// Leases this worker lost to another.
pub const LEASES_LOST: &str = "ingest_leases_lost_total";
/// Retried operations. Labels: cause (throttled, expired_iterator, network,
/// database_unavailable, ...).
pub const RETRIES: &str = "ingest_retries_total";
/// New series created.
pub const SERIES_CREATED: &str = "ingest_series_created_total";
/// Failed lookups of the database's Consul name (each is retried).
pub const DNS_FAILURES: &str = "ingest_dns_failures_total";
/// Times the pooled connections were dropped because the primary moved or went away.
pub const PRIMARY_LOST: &str = "ingest_database_primary_lost_total";
/// Records accepted by the Firehose archive.
pub const ARCHIVE_RECORDS: &str = "ingest_archive_records_total";
/// Bytes accepted by the Firehose archive.
pub const ARCHIVE_BYTES: &str = "ingest_archive_bytes_total";
/// Records too large for a Firehose record, not archived (kept as dead letters).
pub const ARCHIVE_SKIPPED: &str = "ingest_archive_skipped_total";
