-- Plain PostgreSQL without pg_partman: the project's own partition
-- maintenance. `ingest migrate` and the consumer call
-- ingest.maintain_partitions() now and then; it creates the partitions ahead
-- of time and drops those past retention. Default partitions catch any row
-- outside the partitions that exist, so an insert never fails.

CREATE TABLE ingest.partition_settings (
    parent      text     PRIMARY KEY,   -- 'telemetry.samples'
    -- Width of new partitions; a change applies to partitions made from then on.
    width       interval NOT NULL,
    -- How many partitions to keep ready ahead of now.
    premake     integer  NOT NULL CHECK (premake >= 1),
    -- Partitions wholly older than this are dropped; NULL keeps everything.
    retention   interval
);

-- Every partition made by maintain_partitions, with its bounds, so that the
-- next one starts where the last one ends.
CREATE TABLE ingest.partitions (
    partition  text        PRIMARY KEY,   -- quoted where needed, as format('%I.%I') makes it
    parent     text        NOT NULL REFERENCES ingest.partition_settings,
    lower      timestamptz NOT NULL,
    upper      timestamptz NOT NULL
);

CREATE FUNCTION ingest.maintain_partitions(at timestamptz DEFAULT now())
RETURNS TABLE (action text, partition text)
LANGUAGE plpgsql AS $$
DECLARE
    s        ingest.partition_settings;
    p        ingest.partitions;
    lo       timestamptz;
    hi       timestamptz;
    name     text;
    parent_schema text;
    parent_name   text;
BEGIN
    -- Partition names and bins are in UTC whatever the session says.
    SET LOCAL TimeZone = 'UTC';
    FOR s IN SELECT * FROM ingest.partition_settings ORDER BY parent LOOP
        parent_schema := split_part(s.parent, '.', 1);
        parent_name := split_part(s.parent, '.', 2);
        EXECUTE format('CREATE TABLE IF NOT EXISTS %I.%I PARTITION OF %I.%I DEFAULT',
                       parent_schema, parent_name || '_default', parent_schema, parent_name);

        SELECT max(upper) INTO lo FROM ingest.partitions WHERE parent = s.parent;
        IF lo IS NULL THEN
            -- First run: begin one partition behind now, so that slightly
            -- late data does not land in the default partition.
            lo := date_bin(s.width, at, TIMESTAMPTZ '2000-01-01 00:00:00+00') - s.width;
        END IF;
        WHILE lo < at + s.width * s.premake LOOP
            hi := lo + s.width;
            name := parent_name || '_p' || to_char(lo, 'YYYYMMDD_HH24MISS');
            EXECUTE format('CREATE TABLE %I.%I (LIKE %I.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                           parent_schema, name, parent_schema, parent_name);
            -- Rows that reached the default partition before this partition
            -- existed move into it; ATTACH would refuse them otherwise.
            EXECUTE format('WITH moved AS (DELETE FROM %I.%I WHERE time >= $1 AND time < $2 RETURNING *) '
                           'INSERT INTO %I.%I SELECT * FROM moved',
                           parent_schema, parent_name || '_default', parent_schema, name)
                USING lo, hi;
            EXECUTE format('ALTER TABLE %I.%I ATTACH PARTITION %I.%I FOR VALUES FROM (%L) TO (%L)',
                           parent_schema, parent_name, parent_schema, name, lo, hi);
            INSERT INTO ingest.partitions VALUES (format('%I.%I', parent_schema, name), s.parent, lo, hi);
            action := 'created'; partition := format('%I.%I', parent_schema, name);
            RETURN NEXT;
            lo := hi;
        END LOOP;

        IF s.retention IS NOT NULL THEN
            FOR p IN SELECT * FROM ingest.partitions
                     WHERE parent = s.parent AND upper <= at - s.retention
                     ORDER BY lower LOOP
                EXECUTE format('DROP TABLE %s', p.partition);
                DELETE FROM ingest.partitions WHERE ingest.partitions.partition = p.partition;
                action := 'dropped'; partition := p.partition;
                RETURN NEXT;
            END LOOP;
            EXECUTE format('DELETE FROM %I.%I WHERE time < $1', parent_schema, parent_name || '_default')
                USING at - s.retention;
        END IF;
    END LOOP;
END;
$$;
