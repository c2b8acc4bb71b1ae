//! Tests of [`Decoder::decode`](super::Decoder::decode): the record contract
//! as tables of (input, expected result), and robustness against hostile input.

mod contract;
mod robustness;

use super::*;

/// Arrival time passed with every record: 2025-01-01T00:00:00Z.
const ARRIVAL: Micros = 1_735_689_600_000_000;
/// 2025-11-23T12:13:20Z, the `ts` most rows use.
const T: Micros = 1_763_900_000_000_000;

fn decode(input: &[u8]) -> Result<Reading, DecodeError> {
    Decoder::default().decode(input, ARRIVAL)
}

fn ok(
    device: &str,
    house: &str,
    time: Micros,
    samples: &[(&str, f64)],
    events: &[(&str, &str)],
) -> Result<Reading, DecodeError> {
    Ok(Reading {
        device: device.to_owned(),
        house: house.to_owned(),
        time,
        samples: samples
            .iter()
            .map(|&(m, v)| Sample {
                metric: m.to_owned(),
                value: v,
            })
            .collect(),
        events: events
            .iter()
            .map(|&(k, b)| Event {
                kind: k.to_owned(),
                body: b.to_owned(),
            })
            .collect(),
    })
}

fn json_err(at: Option<usize>, message: &str) -> Result<Reading, DecodeError> {
    Err(DecodeError::InvalidJson {
        at,
        message: message.to_owned(),
    })
}

fn wrong(key: &'static str, expected: &'static str, found: &str) -> Result<Reading, DecodeError> {
    Err(DecodeError::WrongType {
        key,
        expected,
        found: found.to_owned(),
    })
}

fn out_of_range(value: &str) -> Result<Reading, DecodeError> {
    Err(DecodeError::TimestampOutOfRange {
        value: value.to_owned(),
    })
}

fn not_finite(field: &str, value: &str) -> Result<Reading, DecodeError> {
    Err(DecodeError::NotFinite {
        field: field.to_owned(),
        value: value.to_owned(),
    })
}

fn bad_name(name: &str, reason: &str) -> Result<Reading, DecodeError> {
    Err(DecodeError::InvalidFieldName {
        name: name.to_owned(),
        reason: reason.to_owned(),
    })
}

fn run(rows: Vec<(&str, Result<Reading, DecodeError>)>) {
    for (input, expected) in rows {
        assert_eq!(decode(input.as_bytes()), expected, "input: {input}");
    }
}
