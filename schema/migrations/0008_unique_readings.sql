-- A reading is one value per (series, time), an event one per (house,
-- device, kind, time): the database refuses a second. Kinesis and the
-- gateway deliver at least once (a gateway killed after Kinesis took a
-- record but before the device heard so gets the message again, from
-- Mosquitto's session or the device's retransmission, and puts it again);
-- with these indexes the copy the consumer reads later is refused, and the
-- consumer's bisection keeps it as a dead letter (reason_kind
-- database_refused, the key in its reason) instead of a second row.
--
-- The unique indexes replace the plain ones on the same leading columns.
-- TimescaleDB checks them against compressed chunks too, for chunks
-- compressed after this migration; a chunk compressed before it is checked
-- once it is decompressed and compressed again.

DO $$
DECLARE
    doubled bigint;
BEGIN
    SELECT count(*) INTO doubled
    FROM (SELECT 1 FROM telemetry.samples GROUP BY series_id, time HAVING count(*) > 1) d;
    IF doubled > 0 THEN
        RAISE EXCEPTION 'telemetry.samples holds % (series_id, time) pairs more than once', doubled
            USING HINT = 'Keep one row of each (docs/runbook.md, "Migration 8 finds doubled readings"), then run ingest migrate again.';
    END IF;
    SELECT count(*) INTO doubled
    FROM (SELECT 1 FROM telemetry.events GROUP BY house, device, kind, time HAVING count(*) > 1) d;
    IF doubled > 0 THEN
        RAISE EXCEPTION 'telemetry.events holds % (house, device, kind, time) events more than once', doubled
            USING HINT = 'Keep one row of each (docs/runbook.md, "Migration 8 finds doubled readings"), then run ingest migrate again.';
    END IF;
END
$$;

CREATE UNIQUE INDEX samples_series_time_unique ON telemetry.samples (series_id, time DESC);
DROP INDEX telemetry.samples_series_time;

CREATE UNIQUE INDEX events_device_time_unique ON telemetry.events (device, time DESC, house, kind);
DROP INDEX telemetry.events_device_time;
