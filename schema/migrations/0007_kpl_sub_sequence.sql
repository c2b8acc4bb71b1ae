-- KPL aggregated records: one Kinesis record holds many user records, each
-- known by (sequence number, sub-sequence number = its place in the record).
--
-- A batch may end inside an aggregate. checkpoint_sub is then the last user
-- record committed of the record at checkpoint, and the next owner reads
-- that record again (AT_SEQUENCE_NUMBER) skipping user records up to it.
-- NULL: the record at checkpoint is done whole (a plain record, or every
-- user record of an aggregate).
ALTER TABLE ingest.shard_leases ADD COLUMN checkpoint_sub bigint;

-- The user record a dead letter is, within its aggregate; NULL for a plain
-- record and for an aggregate refused whole (bad_aggregate).
ALTER TABLE ingest.dead_letters ADD COLUMN sub_sequence bigint;
