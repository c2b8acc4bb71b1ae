-- A sample always names a series that exists. The consumer caches series
-- ids; after a failover with asynchronous replication the new primary may
-- lack the newest series, and without this key a sample could point at an
-- id nobody has. (The consumer also forgets its ids when its connections
-- are renewed, so that an id the new primary gave to another series is
-- never used either.) The check is one index probe per row into
-- telemetry.series's primary key, measured by `cargo bench --bench sink`.
-- On the partitioned paths the key is cloned onto every partition, on
-- TimescaleDB onto every chunk.
ALTER TABLE telemetry.samples
    ADD CONSTRAINT samples_series_id_fkey
    FOREIGN KEY (series_id) REFERENCES telemetry.series (series_id);
