-- The consumer fleet's control tables: shard leases with their checkpoints,
-- worker heartbeats, and the dead letters of records that could not be decoded.

CREATE TABLE ingest.shard_leases (
    stream            text        NOT NULL,
    shard_id          text        NOT NULL,
    -- Kinesis parents of this shard (one after a split, two after a merge);
    -- a child is read only once every parent is ended.
    parent_shard_ids  text[]      NOT NULL DEFAULT '{}',
    -- Worker holding the lease, NULL when free.
    owner             text,
    -- Bumped on every change of owner; a checkpoint update names the counter
    -- it was read with, so a worker that lost the lease cannot commit.
    lease_counter     bigint      NOT NULL DEFAULT 0,
    expires_at        timestamptz,
    -- Sequence number of the last record committed to the database.
    checkpoint        text,
    -- The shard was read to its end (closed by a split or merge) and checkpointed.
    ended             boolean     NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, shard_id)
);

CREATE TABLE ingest.workers (
    stream        text        NOT NULL,
    worker_id     text        NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, worker_id)
);

CREATE TABLE ingest.dead_letters (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at      timestamptz NOT NULL DEFAULT now(),
    stream           text        NOT NULL,
    shard_id         text        NOT NULL,
    sequence_number  text        NOT NULL,
    -- Short stable label (invalid_json, missing_device, ...) for counting.
    reason_kind      text        NOT NULL,
    -- The precise human reason, naming the input.
    reason           text        NOT NULL,
    raw              bytea       NOT NULL
);

CREATE INDEX dead_letters_received_at ON ingest.dead_letters (received_at);
CREATE INDEX dead_letters_stream_shard ON ingest.dead_letters (stream, shard_id);
