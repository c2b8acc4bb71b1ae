-- How far behind the tip of its shard the last committed batch was read
-- (Kinesis MillisBehindLatest), for `ingest status` and dashboards.
ALTER TABLE ingest.shard_leases ADD COLUMN millis_behind_latest bigint;
