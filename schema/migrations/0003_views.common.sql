-- Samples with their names, for people and Grafana.
CREATE VIEW telemetry.samples_named AS
SELECT s.time, se.house, se.device, se.metric, s.value
FROM telemetry.samples s
JOIN telemetry.series se USING (series_id);
