//! Telemetry records as an eGauge meter behind an AWS IoT rule sends them:
//! one house, one device, a millisecond timestamp and four numeric fields.
//!
//! Record `i` is a pure function of `i` and the base time, so benchmarks
//! and the backlog generator produce the same data on every run, while
//! devices, times and values vary from record to record as they do in a
//! real stream (no parser or cache sees the same bytes twice in a row).

use ingest::batch::SeriesKey;

/// Distinct devices the records cycle through (one house each); at most
/// 1,000, so that one round of devices fits in one second of [`time_ms`].
pub const DEVICES: usize = 1_000;

/// The numeric fields every record carries, in record order.
pub const METRICS: [&str; 4] = ["Battery", "EV", "Grid", "Solar"];

/// A record's time, as Unix milliseconds, when `base_ms` is the first.
/// Each device reports once a second; consecutive records are different
/// devices in the same second.
pub fn time_ms(i: usize, base_ms: i64) -> i64 {
    base_ms + (i / DEVICES) as i64 * 1_000 + (i % DEVICES) as i64
}

/// The device of record `i`, e.g. `egauge-00042`.
pub fn device(i: usize) -> String {
    format!("egauge-{:05}", i % DEVICES)
}

/// The house of record `i`, e.g. `h-0042`.
pub fn house(i: usize) -> String {
    format!("h-{:04}", i % DEVICES)
}

/// Four readings in kW with three decimals, varying with `i`.
fn values(i: usize) -> [String; 4] {
    let wobble = |salt: usize, range: i64| {
        // A cheap deterministic hash: distinct values, no rand dependency.
        let h = (i.wrapping_mul(2_654_435_761) ^ salt.wrapping_mul(40_503)) % 100_003;
        let thousandths = (h as i64 % (2 * range)) - range;
        format!("{:.3}", thousandths as f64 / 1_000.0)
    };
    [
        wobble(1, 5_000),
        wobble(2, 11_000),
        wobble(3, 9_000),
        wobble(4, 8_000),
    ]
}

/// Record `i` in the canonical form:
/// `{"device":"egauge-00042","house":"h-0042","ts":1763900000123,"fields":{"Battery":1.5,...}}`.
pub fn canonical(i: usize, base_ms: i64) -> Vec<u8> {
    let [battery, ev, grid, solar] = values(i);
    format!(
        r#"{{"device":"{}","house":"{}","ts":{},"fields":{{"Battery":{battery},"EV":{ev},"Grid":{grid},"Solar":{solar}}}}}"#,
        device(i),
        house(i),
        time_ms(i, base_ms),
    )
    .into_bytes()
}

/// Record `i` in the flat form (an AWS IoT rule's `SELECT *, topic(3) AS device`):
/// `{"device":"egauge-00042","house":"h-0042","ts":1763900000123,"Battery":1.5,...}`.
pub fn flat(i: usize, base_ms: i64) -> Vec<u8> {
    let [battery, ev, grid, solar] = values(i);
    format!(
        r#"{{"device":"{}","house":"{}","ts":{},"Battery":{battery},"EV":{ev},"Grid":{grid},"Solar":{solar}}}"#,
        device(i),
        house(i),
        time_ms(i, base_ms),
    )
    .into_bytes()
}

/// Every series the records name: [`DEVICES`] x [`METRICS`], sorted.
pub fn series_keys() -> Vec<SeriesKey> {
    let mut keys: Vec<SeriesKey> = (0..DEVICES)
        .flat_map(|i| {
            METRICS.iter().map(move |metric| SeriesKey {
                house: house(i),
                device: device(i),
                metric: (*metric).to_string(),
            })
        })
        .collect();
    keys.sort();
    keys
}

/// Now as Unix milliseconds, so that generated rows land in the partitions
/// that exist (one interval behind now to a few ahead), not the default one.
pub fn now_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970");
    i64::try_from(since_epoch.as_millis()).expect("a time before the year 292278994")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ingest::decode::Decoder;

    #[test]
    fn both_forms_decode_to_the_same_four_samples() {
        let mut decoder = Decoder::default();
        for i in [0, 1, 999, 1_000, 123_456] {
            let canonical = decoder.decode(&canonical(i, 1_763_900_000_000), 0).unwrap();
            let flat = decoder.decode(&flat(i, 1_763_900_000_000), 0).unwrap();
            assert_eq!(canonical, flat, "record {i}");
            let metrics: Vec<&str> = canonical
                .samples
                .iter()
                .map(|s| s.metric.as_str())
                .collect();
            assert_eq!(metrics, METRICS);
            assert_eq!((canonical.device, canonical.house), (device(i), house(i)));
        }
        let example = String::from_utf8(canonical(42, 1_763_900_000_000)).unwrap();
        assert!(
            example.starts_with(r#"{"device":"egauge-00042","house":"h-0042","ts":1763900000042,"fields":{"Battery":"#),
            "{example}"
        );
    }

    #[test]
    fn series_keys_cover_every_record() {
        let keys = series_keys();
        assert_eq!(keys.len(), DEVICES * METRICS.len());
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
    }
}
