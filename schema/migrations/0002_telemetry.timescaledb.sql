-- TimescaleDB: samples and events are hypertables. The chunk interval,
-- compression and retention policies are applied after the migrations from
-- `ingest migrate`'s settings, so they can change without a new migration.

CREATE EXTENSION IF NOT EXISTS timescaledb;

CREATE TABLE telemetry.samples (
    time       timestamptz NOT NULL,
    series_id  integer     NOT NULL,
    value      float8      NOT NULL
);

SELECT create_hypertable('telemetry.samples', by_range('time', INTERVAL '1 day'));

CREATE INDEX samples_series_time ON telemetry.samples (series_id, time DESC);

ALTER TABLE telemetry.samples SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'series_id',
    timescaledb.compress_orderby = 'time DESC'
);

CREATE TABLE telemetry.events (
    time    timestamptz NOT NULL,
    house   text        NOT NULL DEFAULT '',
    device  text        NOT NULL,
    kind    text        NOT NULL,
    body    jsonb       NOT NULL
);

SELECT create_hypertable('telemetry.events', by_range('time', INTERVAL '1 day'));

CREATE INDEX events_device_time ON telemetry.events (device, time DESC);

-- Created WITH NO DATA so that it may run inside the migration's
-- transaction; the refresh policy (applied with the settings) fills it.
CREATE MATERIALIZED VIEW telemetry.samples_1h
WITH (timescaledb.continuous) AS
SELECT time_bucket(INTERVAL '1 hour', time) AS bucket,
       series_id,
       avg(value) AS avg,
       min(value) AS min,
       max(value) AS max,
       count(*)   AS count
FROM telemetry.samples
GROUP BY bucket, series_id
WITH NO DATA;

-- Real-time aggregation: queries see the newest hour too, not only what the
-- refresh policy has materialized.
ALTER MATERIALIZED VIEW telemetry.samples_1h SET (timescaledb.materialized_only = false);
