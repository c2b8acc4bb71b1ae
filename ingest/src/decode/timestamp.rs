//! Turning a record's `ts` into [`Micros`], the pipeline's one time unit.
//!
//! Devices send epoch numbers in whatever unit their firmware likes, so the
//! unit is told apart by magnitude; anything outside [2000, 2100) is rejected
//! because in practice it is a wrong unit, an unset clock (0) or a sentinel
//! (year 1, year 9999), never a real measurement.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::error::{DecodeError, truncate_for_error};

/// Microseconds since the Unix epoch, UTC.
pub type Micros = i64;

/// 2000-01-01T00:00:00Z, the earliest instant accepted (inclusive).
pub const MIN_TIME: Micros = 946_684_800_000_000;

/// 2100-01-01T00:00:00Z, the first instant no longer accepted (exclusive).
pub const MAX_TIME: Micros = 4_102_444_800_000_000;

/// The wall clock as [`Micros`], for the callers that stamp arrivals or
/// check the accepted window; decoding itself never reads the clock.
#[must_use]
pub fn now_micros() -> Micros {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            Micros::try_from(since.as_micros()).unwrap_or(Micros::MAX)
        })
}

/// |ts| below this is seconds.
const SECONDS_BELOW: f64 = 1e11;
/// |ts| below this (and not seconds) is milliseconds.
const MILLIS_BELOW: f64 = 1e14;
/// |ts| below this (and not milliseconds) is microseconds; above, nanoseconds.
const MICROS_BELOW: f64 = 1e17;

/// Converts an epoch number in seconds, milliseconds, microseconds or
/// nanoseconds (told apart by magnitude: |v| < 1e11 s, < 1e14 ms, < 1e17 µs,
/// else ns) to microseconds, flooring sub-microsecond parts.
///
/// A value within one float ulp of a whole microsecond is taken as that
/// microsecond, so that `1763900000.123456` (whose nearest f64 is a hair
/// below) gives `…123456` and not `…123455`; below that resolution a float
/// carries no real information anyway. Integers should go through
/// [`timestamp_from_integer`], which is exact.
///
/// # Errors
/// [`DecodeError::BadTimestamp`] for NaN; [`DecodeError::TimestampOutOfRange`]
/// for infinities and instants outside [2000-01-01, 2100-01-01).
pub fn timestamp_from_number(v: f64) -> Result<Micros, DecodeError> {
    if v.is_nan() {
        return Err(DecodeError::BadTimestamp {
            value: "NaN".to_owned(),
        });
    }
    let out_of_range = || DecodeError::TimestampOutOfRange {
        value: format!("{v:?}"),
    };
    let magnitude = v.abs();
    let micros = if magnitude < SECONDS_BELOW {
        v * 1e6
    } else if magnitude < MILLIS_BELOW {
        v * 1e3
    } else if magnitude < MICROS_BELOW {
        v
    } else {
        v / 1e3
    };
    // Range-check in float first so the cast below cannot saturate or wrap.
    if !(micros > MIN_TIME as f64 - 2.0 && micros < MAX_TIME as f64 + 2.0) {
        return Err(out_of_range());
    }
    let nearest = micros.round();
    let ulp = f64::from_bits(micros.abs().to_bits() + 1) - micros.abs();
    let whole = if (micros - nearest).abs() < ulp {
        nearest
    } else {
        micros.floor()
    };
    // In range by the check above, so the cast is exact.
    check_range(whole as Micros).map_err(|_| out_of_range())
}

/// Converts an integer epoch timestamp (unit told apart by magnitude exactly
/// as in [`timestamp_from_number`]) to microseconds, exactly, flooring
/// nanoseconds. Exists because a nanosecond timestamp does not fit an f64's
/// 53-bit mantissa.
///
/// # Errors
/// [`DecodeError::TimestampOutOfRange`] outside [2000-01-01, 2100-01-01).
pub fn timestamp_from_integer(v: i64) -> Result<Micros, DecodeError> {
    let magnitude = v.unsigned_abs();
    // |v| bounds each product: < 1e11 * 1e6 = 1e17 and < 1e14 * 1e3, so no overflow.
    let micros = if magnitude < 100_000_000_000 {
        v * 1_000_000
    } else if magnitude < 100_000_000_000_000 {
        v * 1_000
    } else if magnitude < 100_000_000_000_000_000 {
        v
    } else {
        v.div_euclid(1_000)
    };
    check_range(micros).map_err(|_| DecodeError::TimestampOutOfRange {
        value: v.to_string(),
    })
}

/// Parses an RFC 3339 date-time (`2025-11-23T12:00:00.123Z`, any offset such
/// as `+02:00`, up to nanosecond fractions) to microseconds, flooring
/// sub-microsecond digits.
///
/// # Errors
/// [`DecodeError::BadTimestamp`] if `s` is not RFC 3339;
/// [`DecodeError::TimestampOutOfRange`] outside [2000-01-01, 2100-01-01).
pub fn timestamp_from_rfc3339(s: &str) -> Result<Micros, DecodeError> {
    let parsed = OffsetDateTime::parse(s, &Rfc3339).map_err(|_| DecodeError::BadTimestamp {
        value: truncate_for_error(s),
    })?;
    let out_of_range = || DecodeError::TimestampOutOfRange {
        value: truncate_for_error(s),
    };
    let micros = Micros::try_from(parsed.unix_timestamp_nanos().div_euclid(1_000))
        .map_err(|_| out_of_range())?;
    check_range(micros).map_err(|_| out_of_range())
}

/// Accepts `t` only inside [`MIN_TIME`, `MAX_TIME`).
fn check_range(t: Micros) -> Result<Micros, ()> {
    if (MIN_TIME..MAX_TIME).contains(&t) {
        Ok(t)
    } else {
        Err(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2025-11-23T12:13:20Z, the reference instant of these tests.
    const T: Micros = 1_763_900_000_000_000;

    fn out_of_range(v: &str) -> Result<Micros, DecodeError> {
        Err(DecodeError::TimestampOutOfRange {
            value: v.to_owned(),
        })
    }

    #[test]
    fn numbers() {
        let rows: Vec<(f64, Result<Micros, DecodeError>)> = vec![
            (1_763_900_000.0, Ok(T)),
            (1_763_900_000.5, Ok(T + 500_000)),
            (1_763_900_000.123456, Ok(T + 123_456)),
            (1_763_900_000_123.456_3, Ok(T + 123_456)),
            (1_763_900_000_123.0, Ok(T + 123_000)),
            (1_763_900_000_123.5, Ok(T + 123_500)),
            (1_763_900_000_123_456.0, Ok(T + 123_456)),
            (1_763_900_000_123_456.8, Ok(T + 123_456)),
            (1.7639e18, Ok(T)),
            (946_684_800.0, Ok(MIN_TIME)),
            (946_684_799.999_999, out_of_range("946684799.999999")),
            (4_102_444_800.0, out_of_range("4102444800.0")),
            (4_102_444_799.999_999, Ok(MAX_TIME - 1)),
            (0.0, out_of_range("0.0")),
            (-1_763_900_000.0, out_of_range("-1763900000.0")),
            (-62_135_596_800.0, out_of_range("-62135596800.0")),
            (253_402_214_400.0, out_of_range("253402214400.0")),
            (f64::INFINITY, out_of_range("inf")),
            (f64::NEG_INFINITY, out_of_range("-inf")),
            (f64::MAX, out_of_range("1.7976931348623157e308")),
            (
                f64::NAN,
                Err(DecodeError::BadTimestamp {
                    value: "NaN".into(),
                }),
            ),
        ];
        for (input, expected) in rows {
            assert_eq!(timestamp_from_number(input), expected, "input {input:?}");
        }
    }

    #[test]
    fn integers() {
        let rows: Vec<(i64, Result<Micros, DecodeError>)> = vec![
            (1_763_900_000, Ok(T)),
            (1_763_900_000_123, Ok(T + 123_000)),
            (1_763_900_000_123_456, Ok(T + 123_456)),
            (1_763_900_000_123_456_789, Ok(T + 123_456)),
            (1_763_900_000_123_456_999, Ok(T + 123_456)),
            (946_684_800, Ok(MIN_TIME)),
            (946_684_799, out_of_range("946684799")),
            (4_102_444_800_000, out_of_range("4102444800000")),
            (0, out_of_range("0")),
            (-1, out_of_range("-1")),
            (i64::MAX, out_of_range("9223372036854775807")),
            (i64::MIN, out_of_range("-9223372036854775808")),
            (-62_135_596_800, out_of_range("-62135596800")),
        ];
        for (input, expected) in rows {
            assert_eq!(timestamp_from_integer(input), expected, "input {input}");
        }
    }

    #[test]
    fn rfc3339() {
        let bad = |v: &str| {
            Err(DecodeError::BadTimestamp {
                value: v.to_owned(),
            })
        };
        let rows: Vec<(&str, Result<Micros, DecodeError>)> = vec![
            ("2025-11-23T12:13:20Z", Ok(T)),
            ("2025-11-23T12:13:20.123Z", Ok(T + 123_000)),
            ("2025-11-23T12:13:20.123456789Z", Ok(T + 123_456)),
            ("2025-11-23T14:13:20+02:00", Ok(T)),
            ("2025-11-23T07:13:20.5-05:00", Ok(T + 500_000)),
            ("2025-11-23t12:13:20z", Ok(T)),
            ("2000-01-01T00:00:00Z", Ok(MIN_TIME)),
            (
                "1999-12-31T23:59:59.999999Z",
                out_of_range("1999-12-31T23:59:59.999999Z"),
            ),
            ("2100-01-01T00:00:00Z", out_of_range("2100-01-01T00:00:00Z")),
            ("0001-01-01T00:00:00Z", out_of_range("0001-01-01T00:00:00Z")),
            ("9999-12-31T00:00:00Z", out_of_range("9999-12-31T00:00:00Z")),
            ("2025-11-23", bad("2025-11-23")),
            ("2025-11-23T12:13:20", bad("2025-11-23T12:13:20")),
            ("1763900000", bad("1763900000")),
            ("", bad("")),
            ("2025-13-01T00:00:00Z", bad("2025-13-01T00:00:00Z")),
        ];
        for (input, expected) in rows {
            assert_eq!(timestamp_from_rfc3339(input), expected, "input {input:?}");
        }
    }

    #[test]
    fn bad_string_is_truncated() {
        let long = "x".repeat(1000);
        let Err(DecodeError::BadTimestamp { value }) = timestamp_from_rfc3339(&long) else {
            panic!("expected BadTimestamp");
        };
        assert_eq!(value.len(), 64);
    }
}
