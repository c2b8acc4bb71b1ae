-- TimescaleDB creates chunks on demand and drops them by its retention
-- policy: there is nothing to maintain by hand.
SELECT 1;
