-- A stream is its identity: its ARN and creation time, not the text a worker
-- was started with. The lease key (shard_leases.stream, workers.stream,
-- dead_letters.stream) of a stream is "<ARN>@<creation time, RFC 3339>", so
-- a name and an ARN share leases, and a stream deleted and created again
-- under the same name gets leases of its own; the old ones stay under their
-- old key, kept aside and never read again.
CREATE TABLE ingest.streams (
    -- What shard_leases.stream and workers.stream hold for this stream.
    lease_key      text        PRIMARY KEY,
    name           text        NOT NULL,
    arn            text        NOT NULL,
    -- Kinesis StreamCreationTimestamp.
    created_at     timestamptz NOT NULL,
    first_seen_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (arn, created_at)
);
CREATE INDEX streams_name ON ingest.streams (name, created_at);

-- Where a shard without a checkpoint starts under --start latest or
-- --start <time>, fixed when its lease is first taken: every later owner
-- starts at the same point (AT_TIMESTAMP), so a handoff before the first
-- commit skips nothing. NULL: trim horizon.
ALTER TABLE ingest.shard_leases ADD COLUMN start_at timestamptz;
