//! Series ids in bulk: one round trip creates what is missing and reads every id.

use tokio_postgres::Client;

use super::SinkError;
use crate::batch::{SeriesCache, SeriesKey};

/// Creates the series in `keys` that do not exist and records every id in
/// `cache`. Runs outside the batch transaction, so that batches of different
/// workers never wait on each other's new series. Safe when several workers
/// create the same series at once: ON CONFLICT DO NOTHING, and keys arrive
/// sorted so concurrent inserts take the unique index's locks in one order.
///
/// Only keys the table lacks are inserted: an INSERT takes an identity value
/// even when ON CONFLICT then skips the row, so inserting every key of a
/// cold cache would burn one id of the 32-bit column per known series on
/// every restart. Only a series two workers create at the same moment still
/// costs one.
pub async fn resolve_series(
    client: &Client,
    keys: &[SeriesKey],
    cache: &mut SeriesCache,
) -> Result<(), SinkError> {
    let mut wanted: Vec<&SeriesKey> = keys.iter().collect();
    // A series another worker created after this statement's snapshot is
    // neither inserted (conflict) nor seen (snapshot): ask again for those.
    for _ in 0..3 {
        let houses: Vec<&str> = wanted.iter().map(|k| k.house.as_str()).collect();
        let devices: Vec<&str> = wanted.iter().map(|k| k.device.as_str()).collect();
        let metrics: Vec<&str> = wanted.iter().map(|k| k.metric.as_str()).collect();
        let rows = client
            .query(
                "WITH wanted AS (
                     SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS w(house, device, metric)
                 ), existing AS (
                     SELECT s.series_id, s.house, s.device, s.metric
                     FROM telemetry.series s JOIN wanted USING (house, device, metric)
                 ), created AS (
                     INSERT INTO telemetry.series (house, device, metric)
                     SELECT house, device, metric FROM wanted
                     WHERE (house, device, metric) NOT IN (SELECT house, device, metric FROM existing)
                     ORDER BY house, device, metric
                     ON CONFLICT (house, device, metric) DO NOTHING
                     RETURNING series_id, house, device, metric
                 )
                 SELECT series_id, house, device, metric FROM created
                 UNION ALL
                 SELECT series_id, house, device, metric FROM existing",
                &[&houses, &devices, &metrics],
            )
            .await
            .map_err(SinkError::during("creating series"))?;
        for row in &rows {
            let key = SeriesKey {
                house: row.get(1),
                device: row.get(2),
                metric: row.get(3),
            };
            cache.insert(&key, row.get(0));
        }
        wanted.retain(|k| cache.get(&k.house, &k.device, &k.metric).is_none());
        if wanted.is_empty() {
            return Ok(());
        }
    }
    // Three rounds cannot all miss a committed row; reaching here means a
    // concurrent transaction holds the new series uncommitted for long.
    Err(SinkError::SeriesStillMissing {
        count: wanted.len(),
    })
}

/// Records in `cache` the ids of the series in `keys` that the table has,
/// creating none: what is left unknown is new, for the new-series limit.
pub async fn lookup_series(
    client: &Client,
    keys: &[SeriesKey],
    cache: &mut SeriesCache,
) -> Result<(), SinkError> {
    let houses: Vec<&str> = keys.iter().map(|k| k.house.as_str()).collect();
    let devices: Vec<&str> = keys.iter().map(|k| k.device.as_str()).collect();
    let metrics: Vec<&str> = keys.iter().map(|k| k.metric.as_str()).collect();
    let rows = client
        .query(
            "SELECT s.series_id, s.house, s.device, s.metric
             FROM telemetry.series s
             JOIN unnest($1::text[], $2::text[], $3::text[]) AS w(house, device, metric)
               USING (house, device, metric)",
            &[&houses, &devices, &metrics],
        )
        .await
        .map_err(SinkError::during("reading series"))?;
    for row in &rows {
        let key = SeriesKey {
            house: row.get(1),
            device: row.get(2),
            metric: row.get(3),
        };
        cache.insert(&key, row.get(0));
    }
    Ok(())
}
