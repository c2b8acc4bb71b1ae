//! Decoding one Kinesis record (one UTF-8 JSON object) into a [`Reading`],
//! or into a precise [`DecodeError`] that is stored as a dead letter.
//!
//! Pure: no IO, no clock (the caller passes the arrival time). Never panics,
//! never recurses on input structure, and never drops data silently: every
//! field of an accepted record is either a [`Sample`] or an [`Event`].
//!
//! # The record contract
//! ```json
//! {"device": "egauge-A", "house": "h42", "ts": 1763900000123, "fields": {"Battery": 1.5, "EV": -3.2}}
//! ```
//! - `device`: required non-empty string (≤ 256 bytes, no NUL).
//! - `house`: optional string (≤ 256 bytes, no NUL); absent or null is `""`.
//! - `ts`: epoch seconds / ms / µs / ns told apart by magnitude, or an
//!   RFC 3339 string; absent or null is the arrival time. Must fall in
//!   [2000-01-01, 2100-01-01). See [`timestamp`]. The consumer also
//!   dead-letters readings outside its accepted window around now
//!   ([`TimeWindow`]: the retention, or a year, before; a day ahead).
//! - `fields`: an object whose members are the fields. Numbers and booleans
//!   (1/0) become samples; strings, arrays, objects and null become events
//!   whose body is compact JSON; a string spelling NaN or infinity is an error,
//!   and so is a number beyond ±1e100 ([`MAX_SAMPLE_MAGNITUDE`]), where the
//!   hourly aggregates would overflow.
//! - Flat form (an AWS IoT rule's `SELECT *, topic(3) AS device`): every
//!   top-level key other than `device`, `house`, `ts` and `fields` is a field.
//!
//! # Decisions the contract leaves open
//! - Both forms at once: top-level keys beside a `fields` object are fields
//!   too, so nothing in a record is ignored. `fields` is always reserved, and
//!   must be an object if present (`null` included: WrongType).
//! - Duplicate names: the last in document order wins, for reserved keys and
//!   fields alike; the members of `fields` count as standing where the
//!   `fields` key stands. Earlier duplicates are dropped so one record never
//!   yields two rows for one (device, metric, time).
//! - Ids and field names containing NUL are rejected: PostgreSQL text cannot
//!   hold NUL, and one such row would fail a whole COPY batch.
//! - A device id over 256 bytes is `WrongType` (the error set has no other
//!   fitting variant); a field name over 256 bytes is `InvalidFieldName`.
//! - Numeric strings in `ts` (e.g. `"1763900000"`) are not accepted: the
//!   contract says a number or RFC 3339.
//! - The NaN/infinity check applies to a field's own value, not to strings
//!   nested inside an array or object event (those are data, kept as JSON).
//! - What simd-json 0.19 does (default features), and so what callers see:
//!   `1e999` and integers beyond 64 bits (e.g. 30 digits) are `InvalidJson`
//!   ("invalid number"), never infinity or a rounded float; `1e-999` is 0.0;
//!   u64/i64 extremes are accepted (as f64 samples, rounded beyond 2^53).
//!   Nesting depth is enforced by the parser itself without recursion.

mod error;
mod json;
mod record;
pub mod timestamp;
mod window;

#[cfg(test)]
mod tests;

pub use error::DecodeError;
pub use record::{
    DecodeLimits, Decoder, Event, MAX_NAME_BYTES, MAX_SAMPLE_MAGNITUDE, Reading, Sample,
};
pub use timestamp::{
    Micros, now_micros, timestamp_from_integer, timestamp_from_number, timestamp_from_rfc3339,
};
pub use window::{DEFAULT_MAX_AGE, DEFAULT_MAX_AHEAD, TimeWindow};
