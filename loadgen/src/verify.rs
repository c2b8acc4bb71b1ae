//! Did every message land in the database exactly once? Each record's
//! device and `ts` are unique, and every record of a device carries its
//! first field (its check metric), so counting that series' rows at each
//! `ts` tells delivered, lost and duplicated apart. With
//! `track_commit_timestamp` on, each row's commit time gives the end-to-end
//! latency (device time to commit).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::NoTls;

use crate::message::{DeviceOutcome, Fate};
use crate::stats::Percentiles;

/// What the database holds of the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verification {
    /// Messages that must be there: acknowledged, or sent where no
    /// acknowledgement comes.
    pub expected: u64,
    /// Of those, found at least once.
    pub delivered: u64,
    /// Of those, not found.
    pub lost: u64,
    /// Rows beyond the first for one message (any message of the run).
    pub duplicated: u64,
    /// Sent without an acknowledgement (timeouts, lost connections): found.
    pub uncertain_found: u64,
    /// ... and not found.
    pub uncertain_missing: u64,
    /// Refused by the gateway or never sent, yet found (must be 0).
    pub failed_found: u64,
    /// Seconds spent waiting for the rows.
    pub waited_seconds: f64,
    /// Device time to commit, when the server tracks commit timestamps.
    pub end_to_end: Option<Percentiles>,
    /// Why there is no end-to-end latency, if there is none.
    pub note: Option<String>,
}

impl Verification {
    /// Everything expected is there once, and nothing refused is.
    pub fn exact(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.failed_found == 0
    }
}

/// Counting one (device, ts): its rows, and the first commit (epoch ms).
type Found = HashMap<(u32, i64), (i64, Option<i64>)>;

/// Waits up to `within` for every expected row, then compares.
pub async fn verify(
    url: &str,
    outcomes: &[DeviceOutcome],
    within: Duration,
) -> Result<Verification, String> {
    let fail = |what: &str, e: tokio_postgres::Error| {
        let detail = e
            .as_db_error()
            .map_or_else(|| e.to_string(), |db| db.message().to_owned());
        format!("verification: {what}: {detail}")
    };
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| fail("cannot connect to --verify-database-url", e))?;
    tokio::spawn(connection);

    let devices: Vec<&str> = outcomes.iter().map(|o| o.device.as_str()).collect();
    let metrics: Vec<&str> = outcomes.iter().map(|o| o.check_metric.as_str()).collect();
    let all_ts = outcomes
        .iter()
        .flat_map(|o| o.fates.iter().map(|(ts, _)| *ts));
    let (Some(first_ts), Some(last_ts)) = (all_ts.clone().min(), all_ts.max()) else {
        return Err("verification: nothing was sent".into());
    };
    let expected = outcomes
        .iter()
        .flat_map(|o| &o.fates)
        .filter(|(_, fate)| matches!(fate, Fate::Acked | Fate::Unconfirmed))
        .count() as i64;
    let commit_times = client
        .query_one(
            "SELECT current_setting('track_commit_timestamp') = 'on'",
            &[],
        )
        .await
        .map_err(|e| fail("cannot read track_commit_timestamp", e))?
        .get::<_, bool>(0);

    // The run's check series, at the run's times.
    let from = "FROM telemetry.samples x \
                JOIN telemetry.series s ON s.series_id = x.series_id \
                JOIN unnest($1::text[], $2::text[]) AS w(device, metric) \
                  ON s.device = w.device AND s.metric = w.metric \
                WHERE x.time >= to_timestamp($3::float8 / 1000) \
                  AND x.time <= to_timestamp($4::float8 / 1000)";
    let parameters = (&devices, &metrics, first_ts as f64, last_ts as f64);
    let started = Instant::now();
    loop {
        let count: i64 = client
            .query_one(
                &format!("SELECT count(*) {from}"),
                &[&parameters.0, &parameters.1, &parameters.2, &parameters.3],
            )
            .await
            .map_err(|e| fail("cannot count the rows", e))?
            .get(0);
        if count >= expected || started.elapsed() >= within {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let waited_seconds = started.elapsed().as_secs_f64();

    let commit = if commit_times {
        "(extract(epoch FROM min(pg_xact_commit_timestamp(x.xmin))) * 1000)::int8"
    } else {
        "NULL::int8"
    };
    let rows = client
        .query(
            &format!(
                "SELECT w.device, (extract(epoch FROM x.time) * 1000)::int8, count(*), {commit} \
                 {from} GROUP BY 1, 2"
            ),
            &[&parameters.0, &parameters.1, &parameters.2, &parameters.3],
        )
        .await
        .map_err(|e| fail("cannot read the rows", e))?;
    let index: HashMap<&str, u32> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| (*d, i as u32))
        .collect();
    let mut found: Found = HashMap::with_capacity(rows.len());
    for row in rows {
        let device: &str = row.get(0);
        found.insert(
            (index[device], row.get(1)),
            (row.get(2), row.get::<_, Option<i64>>(3)),
        );
    }
    let mut verification = compare(outcomes, &found);
    verification.waited_seconds = waited_seconds;
    if !commit_times {
        verification.note =
            Some("no end-to-end latency: the server's track_commit_timestamp is off".into());
    }
    Ok(verification)
}

/// Compares what was sent with what was found.
fn compare(outcomes: &[DeviceOutcome], found: &Found) -> Verification {
    let mut verification = Verification {
        expected: 0,
        delivered: 0,
        lost: 0,
        duplicated: 0,
        uncertain_found: 0,
        uncertain_missing: 0,
        failed_found: 0,
        waited_seconds: 0.0,
        end_to_end: None,
        note: None,
    };
    let mut latencies = Vec::new();
    for (index, outcome) in outcomes.iter().enumerate() {
        for (ts, fate) in &outcome.fates {
            let rows = found.get(&(index as u32, *ts));
            if let Some((count, _)) = rows {
                verification.duplicated += (*count as u64).saturating_sub(1);
            }
            match fate {
                Fate::Acked | Fate::Unconfirmed => {
                    verification.expected += 1;
                    match rows {
                        Some((_, commit)) => {
                            verification.delivered += 1;
                            if let Some(commit) = commit {
                                latencies.push(commit - ts);
                            }
                        }
                        None => verification.lost += 1,
                    }
                }
                Fate::Uncertain(_) if rows.is_some() => verification.uncertain_found += 1,
                Fate::Uncertain(_) => verification.uncertain_missing += 1,
                Fate::Failed(_) if rows.is_some() => verification.failed_found += 1,
                Fate::Failed(_) => {}
            }
        }
    }
    verification.end_to_end = Percentiles::of_millis(latencies);
    verification
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Protocol;

    #[test]
    fn lost_duplicated_and_uncertain_are_told_apart() {
        let outcome = DeviceOutcome {
            device: "d".into(),
            protocol: Protocol::Coap { confirmable: true },
            check_metric: "power".into(),
            fates: vec![
                (1, Fate::Acked),
                (2, Fate::Acked),
                (3, Fate::Unconfirmed),
                (4, Fate::Uncertain("timeout".into())),
                (5, Fate::Uncertain("timeout".into())),
                (6, Fate::Failed("5.03".into())),
            ],
        };
        let found: Found = [
            ((0, 1), (1, Some(11))),
            ((0, 2), (3, Some(22))),
            ((0, 4), (1, None)),
        ]
        .into_iter()
        .collect();
        let v = compare(&[outcome], &found);
        assert_eq!(
            (v.expected, v.delivered, v.lost, v.duplicated),
            (3, 2, 1, 2)
        );
        assert_eq!(
            (v.uncertain_found, v.uncertain_missing, v.failed_found),
            (1, 1, 0)
        );
        assert!(!v.exact());
        let latency = v.end_to_end.unwrap();
        assert_eq!(latency.count, 2);
        assert!((latency.max_ms - 20.0).abs() < 0.1, "{latency:?}");
    }
}
