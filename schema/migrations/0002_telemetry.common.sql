-- Telemetry tables shared by both storage paths.

CREATE SCHEMA IF NOT EXISTS telemetry;

-- One row per time series. The consumer caches ids and creates missing
-- series in bulk (INSERT ... ON CONFLICT DO NOTHING, then reads the ids).
CREATE TABLE telemetry.series (
    series_id  integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The tenant scope; '' when the record named none, so that the unique
    -- key below treats "no house" as one value.
    house      text NOT NULL DEFAULT '',
    device     text NOT NULL,
    metric     text NOT NULL,
    UNIQUE (house, device, metric)
);
