-- Plain PostgreSQL: samples and events are range-partitioned by time. The
-- partitions themselves are created ahead and dropped for retention by
-- pg_partman or by ingest.maintain_partitions() (0003); the default partitions
-- catch rows outside the partitions that exist, so an insert never fails.

CREATE TABLE telemetry.samples (
    time       timestamptz NOT NULL,
    series_id  integer     NOT NULL,
    value      float8      NOT NULL
) PARTITION BY RANGE (time);

CREATE INDEX samples_series_time ON telemetry.samples (series_id, time DESC);
CREATE INDEX samples_time ON telemetry.samples (time DESC);

CREATE TABLE telemetry.events (
    time    timestamptz NOT NULL,
    house   text        NOT NULL DEFAULT '',
    device  text        NOT NULL,
    kind    text        NOT NULL,
    body    jsonb       NOT NULL
) PARTITION BY RANGE (time);

CREATE INDEX events_device_time ON telemetry.events (device, time DESC);

-- Hourly rollup, kept exact and current by a statement trigger: each COPY
-- adds its rows' sums, counts and extremes to their hour, so no refresh job
-- ever rescans the samples.
CREATE TABLE telemetry.samples_1h_state (
    bucket     timestamptz NOT NULL,
    series_id  integer     NOT NULL,
    count      bigint      NOT NULL,
    sum        float8      NOT NULL,
    min        float8      NOT NULL,
    max        float8      NOT NULL,
    PRIMARY KEY (bucket, series_id)
);

CREATE FUNCTION telemetry.samples_1h_add() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Ordered by key so that concurrent batches lock rows in the same order
    -- and can wait for each other but never deadlock.
    INSERT INTO telemetry.samples_1h_state AS s (bucket, series_id, count, sum, min, max)
    SELECT date_bin('1 hour', time, TIMESTAMPTZ '2000-01-01 00:00:00+00'), series_id,
           count(*), sum(value), min(value), max(value)
    FROM new_rows
    GROUP BY 1, 2
    ORDER BY 1, 2
    ON CONFLICT (bucket, series_id) DO UPDATE
    SET count = s.count + excluded.count,
        sum   = s.sum + excluded.sum,
        min   = least(s.min, excluded.min),
        max   = greatest(s.max, excluded.max);
    RETURN NULL;
END;
$$;

CREATE TRIGGER samples_1h_add
AFTER INSERT ON telemetry.samples
REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION telemetry.samples_1h_add();

CREATE VIEW telemetry.samples_1h AS
SELECT bucket, series_id, sum / count AS avg, min, max, count
FROM telemetry.samples_1h_state;
