//! Every metric name, in one place, with what it counts. Prometheus
//! conventions: `ingest_` prefix, `_total` for counters, units in the name.

/// CPU time this process used, user and system, in seconds (from /proc at
/// each scrape, by metrics-process; every binary with a metrics endpoint).
pub const PROCESS_CPU_SECONDS: &str = "process_cpu_seconds_total";
/// This process's resident memory in bytes (metrics-process, as above).
pub const PROCESS_RESIDENT_MEMORY: &str = "process_resident_memory_bytes";

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
/// Shards treated as ended because Kinesis no longer lists them (a parent
/// older than the retention period, after an outage): its unread records
/// are lost to the retention.
pub const SHARDS_EXPIRED: &str = "ingest_shards_expired_total";
/// Retried operations. Labels: cause (throttled, expired_iterator, network,
/// database_unavailable, database_conflict, unknown_series, ...).
pub const RETRIES: &str = "ingest_retries_total";
/// New series created.
pub const SERIES_CREATED: &str = "ingest_series_created_total";
/// Series looked up in a writer's cache as chunks arrive. Labels: result
/// (hit, miss: read or created in the database). The hit rate is
/// hit / (hit + miss).
pub const SERIES_CACHE_LOOKUPS: &str = "ingest_series_cache_lookups_total";
/// Series forgotten by a writer's cache to stay within --series-cache-size.
pub const SERIES_CACHE_EVICTIONS: &str = "ingest_series_cache_evictions_total";
/// Series a writer's cache holds. Labels: writer.
pub const SERIES_CACHE_SERIES: &str = "ingest_series_cache_series";
/// Batches the database refused for some of their rows, written again
/// record by record (the refused records as dead letters, reason
/// database_refused).
pub const BATCHES_BISECTED: &str = "ingest_batches_bisected_total";
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
/// CoAP requests answered. Labels: code (2.04, 4.00, 5.03, ...).
pub const GATEWAY_COAP_REQUESTS: &str = "ingest_gateway_coap_requests_total";
/// CoAP retransmissions recognised (answered again, never put twice).
pub const GATEWAY_COAP_DUPLICATES: &str = "ingest_gateway_coap_duplicates_total";
/// CoAP answers sent as separate responses (after an empty ACK).
pub const GATEWAY_COAP_SEPARATE: &str = "ingest_gateway_coap_separate_responses_total";
/// Separate CoAP responses being resent until acknowledged (at most
/// `--max-separate-responses`).
pub const GATEWAY_COAP_SEPARATE_PENDING: &str = "ingest_gateway_coap_separate_responses_pending";
/// Separate CoAP responses sent once and not resent, because
/// `--max-separate-responses` were being resent already.
pub const GATEWAY_COAP_UNTRACKED: &str = "ingest_gateway_coap_separate_responses_untracked_total";
/// CoAP exchanges remembered for deduplication.
pub const GATEWAY_COAP_EXCHANGES: &str = "ingest_gateway_coap_exchanges";
/// Messages the gateway did not put. Labels: protocol (coap, mqtt), reason
/// (not_found, method_not_allowed, bad_option, malformed, too_large,
/// unsupported_format, unauthorized, bad_payload, overloaded, unavailable,
/// refused, shutting_down, unmatched_topic; records Kinesis can never take:
/// key_too_long, record_too_large, refused_alone).
pub const GATEWAY_REJECTED: &str = "ingest_gateway_rejected_total";
/// Records Kinesis accepted from the gateway. Labels: protocol.
pub const GATEWAY_RECORDS_PUT: &str = "ingest_gateway_records_put_total";
/// Records answered "unavailable" because their deadline passed before a
/// call took them. Labels: protocol.
pub const GATEWAY_EXPIRED: &str = "ingest_gateway_records_expired_total";
/// Records Kinesis took after failing an earlier record of the same key in
/// the same call (a partial failure): ahead of that record in the shard.
pub const GATEWAY_REORDERED: &str = "ingest_gateway_records_reordered_total";
/// PutRecords calls. Labels: outcome (ok, partial, error, refused: a record
/// Kinesis will not take, whose call is then sent again in halves).
pub const GATEWAY_PUT_CALLS: &str = "ingest_gateway_put_calls_total";
/// Time of one PutRecords call (histogram).
pub const GATEWAY_PUT_SECONDS: &str = "ingest_gateway_put_seconds";
/// Records per PutRecords call, counted before aggregation (histogram).
pub const GATEWAY_PUT_BATCH_RECORDS: &str = "ingest_gateway_put_batch_records";
/// Kinesis records the gateway put and Kinesis accepted. Labels: kind
/// (aggregate: a KPL aggregate of the records of one shard; plain).
pub const GATEWAY_KINESIS_RECORDS: &str = "ingest_gateway_kinesis_records_total";
/// Records waiting for a PutRecords call.
pub const GATEWAY_QUEUE_RECORDS: &str = "ingest_gateway_queue_records";
/// Bytes (keys and data) of the records queued or in PutRecords calls,
/// bounded by `--queue-bytes`.
pub const GATEWAY_QUEUE_BYTES: &str = "ingest_gateway_queue_bytes";
/// MQTT messages received. Labels: qos.
pub const GATEWAY_MQTT_MESSAGES: &str = "ingest_gateway_mqtt_messages_total";
/// MQTT messages acknowledged to the broker after Kinesis took them.
pub const GATEWAY_MQTT_ACKED: &str = "ingest_gateway_mqtt_acked_total";
/// MQTT messages received and not acknowledged yet.
pub const GATEWAY_MQTT_UNACKED: &str = "ingest_gateway_mqtt_unacked";
/// MQTT QoS 1 messages held by the event loop because the handover to the
/// forwarder was full (bounded by the broker's in-flight window).
pub const GATEWAY_MQTT_HELD: &str = "ingest_gateway_mqtt_held";
/// MQTT QoS 1 messages left unacknowledged with the broker because the
/// bridge held `MAX_HELD` already; delivered again after the bridge, idle
/// again, reconnects.
pub const GATEWAY_MQTT_DEFERRED: &str = "ingest_gateway_mqtt_deferred_total";
/// 1 while the MQTT bridge is connected and its subscriptions acknowledged.
pub const GATEWAY_MQTT_SUBSCRIBED: &str = "ingest_gateway_mqtt_subscribed";
/// MQTT connection failures (each is retried).
pub const GATEWAY_MQTT_CONNECTION_ERRORS: &str = "ingest_gateway_mqtt_connection_errors_total";
