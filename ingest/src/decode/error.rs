//! Why a record could not be decoded.
//!
//! Every rejected record becomes a dead letter whose `reason` column is
//! `"{kind}: {display}"`, so the `Display` text names the offending input
//! precisely enough for a person to fix the device, and [`DecodeError::kind`]
//! is a stable label that metrics and queries can group by.

/// The reason one record was rejected. Nothing here is retryable: the same
/// bytes always give the same error (only `OutsideTimeWindow` also depends on
/// when the record is read), so the caller dead-letters the record.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum DecodeError {
    /// The record is bigger than `DecodeLimits::max_record_bytes`; checked
    /// before anything else so a huge record costs no parsing.
    #[error("record is {size} bytes, more than the {limit}-byte limit")]
    TooLarge {
        /// Size of the rejected record, so an operator can judge the limit.
        size: usize,
        /// The limit in force, so the message is self-explanatory.
        limit: usize,
    },

    /// The record is not valid UTF-8 (JSON must be).
    #[error("record is not valid UTF-8 at byte {at}")]
    InvalidUtf8 {
        /// Offset of the first byte that is not part of valid UTF-8; for a
        /// record cut in the middle of a character, the start of that character.
        at: usize,
    },

    /// The record is not well-formed JSON (or uses a number JSON parsing
    /// cannot represent, such as `1e999` or an integer beyond 64 bits).
    #[error("invalid JSON{}: {message}", .at.map_or_else(String::new, |a| format!(" at byte {a}")))]
    InvalidJson {
        /// Byte offset the parser reported, where it reports a trustworthy
        /// one (structural and number errors); `None` for errors found while
        /// scanning strings, whose position the parser does not give.
        at: Option<usize>,
        /// What the parser expected or found, in words.
        message: String,
    },

    /// The top-level JSON value is not an object (e.g. an array or a number).
    #[error("record is not a JSON object")]
    NotAnObject,

    /// `device` is absent, null or the empty string: a reading that cannot be
    /// attributed to a device is useless.
    #[error("record has no \"device\" (a non-empty string is required)")]
    MissingDevice,

    /// A reserved key (`device`, `house`, `ts`, `fields`) has a value of the
    /// wrong type or shape.
    #[error("\"{key}\" must be {expected}, found {found}")]
    WrongType {
        /// The reserved key whose value is wrong.
        key: &'static str,
        /// What the contract requires, phrased to follow "must be".
        expected: &'static str,
        /// What the record has: a JSON type name, or a description such as
        /// `a string of 300 bytes`.
        found: String,
    },

    /// `ts` is a string but not an RFC 3339 date-time.
    #[error("timestamp {value:?} is not an RFC 3339 date-time (nor is it a number)")]
    BadTimestamp {
        /// The string as received, cut to 64 characters so a dead-letter
        /// reason stays short.
        value: String,
    },

    /// `ts` is a valid time, but outside [2000-01-01, 2100-01-01); this is
    /// how epoch 0, year 1 and year 9999 sentinels and wrong units are caught.
    #[error("timestamp {value} is out of range [2000-01-01, 2100-01-01)")]
    TimestampOutOfRange {
        /// The timestamp as received (string, cut to 64 characters) or the
        /// number as parsed.
        value: String,
    },

    /// A field holds a string spelling a non-finite number ("NaN", "-inf",
    /// ...) or a non-finite number: the device meant to send a number.
    #[error("field {field:?} is not a finite number ({value:?})")]
    NotFinite {
        /// The field's name, so the device's firmware can be fixed.
        field: String,
        /// The offending value as received (cut to 64 characters).
        value: String,
    },

    /// A numeric field's magnitude is over `MAX_SAMPLE_MAGNITUDE` (1e100),
    /// where the hourly aggregates could overflow.
    #[error(
        "field {field:?} is {value:e}, beyond ±1e100, where the hourly aggregates would overflow"
    )]
    ValueOutOfRange {
        /// The field's name, cut to 64 characters.
        field: String,
        /// The value as parsed.
        value: f64,
    },

    /// `ts` is a valid time, but outside the window the consumer accepts
    /// (`--max-row-age` before now, `--max-row-ahead` after it): a device
    /// with a wrong clock would otherwise create a chunk or partition per
    /// day it invents, and rows older than the retention are dropped anyway.
    #[error("timestamp {time} is outside the accepted window [{earliest}, {latest}]")]
    OutsideTimeWindow {
        /// The reading's time, RFC 3339.
        time: String,
        /// The oldest time accepted when the record was read, RFC 3339.
        earliest: String,
        /// The newest time accepted when the record was read, RFC 3339.
        latest: String,
    },

    /// A field name is empty, longer than 256 bytes, or contains NUL (which
    /// PostgreSQL text cannot store).
    #[error("field name {name:?} is invalid: {reason}")]
    InvalidFieldName {
        /// The name, cut to 64 characters.
        name: String,
        /// Which rule it breaks.
        reason: String,
    },

    /// A non-numeric field holds a NUL character (`\u0000`), which a
    /// PostgreSQL `jsonb` column refuses; one such row would fail a whole COPY.
    #[error("field {field:?} holds a NUL character (\\u0000), which the events table cannot store")]
    NulInEvent {
        /// The field's name, cut to 64 characters.
        field: String,
    },

    /// The record carries no field at all; storing nothing would make it vanish.
    #[error("record has no fields: nothing to store")]
    NoFields,

    /// Containers nest deeper than `DecodeLimits::max_depth`.
    #[error("JSON nesting is deeper than the {limit}-level limit (at byte {at})")]
    TooDeep {
        /// The limit in force.
        limit: usize,
        /// Byte offset of the `{` or `[` that went past the limit.
        at: usize,
    },

    /// A KPL aggregate (`crate::kpl`) that cannot be taken apart: its MD5
    /// does not match, its protobuf is malformed, or it holds no record. The
    /// whole aggregate is the dead letter: none of its records can be trusted.
    #[error("{0}")]
    BadAggregate(#[from] crate::kpl::KplError),
}

impl DecodeError {
    /// A short stable snake_case label for metrics and the dead-letter
    /// `reason` column prefix, e.g. "too_large", "invalid_json",
    /// "timestamp_out_of_range". Never changes for a variant, so dashboards
    /// and queries can rely on it.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::InvalidUtf8 { .. } => "invalid_utf8",
            Self::InvalidJson { .. } => "invalid_json",
            Self::NotAnObject => "not_an_object",
            Self::MissingDevice => "missing_device",
            Self::WrongType { .. } => "wrong_type",
            Self::BadTimestamp { .. } => "bad_timestamp",
            Self::TimestampOutOfRange { .. } => "timestamp_out_of_range",
            Self::NotFinite { .. } => "not_finite",
            Self::ValueOutOfRange { .. } => "value_out_of_range",
            Self::OutsideTimeWindow { .. } => "outside_time_window",
            Self::InvalidFieldName { .. } => "invalid_field_name",
            Self::NulInEvent { .. } => "nul_in_event",
            Self::NoFields => "no_fields",
            Self::TooDeep { .. } => "too_deep",
            Self::BadAggregate(_) => "bad_aggregate",
        }
    }
}

/// Cuts `s` to at most 64 characters (not bytes, so UTF-8 stays valid), so
/// that echoing untrusted input into an error keeps the reason short.
pub(crate) fn truncate_for_error(s: &str) -> String {
    const MAX_CHARS: usize = 64;
    match s.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => s[..cut].to_owned(),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_kind() {
        let rows: Vec<(DecodeError, &str, &str)> = vec![
            (
                DecodeError::TooLarge {
                    size: 1_048_576,
                    limit: 262_144,
                },
                "too_large",
                "record is 1048576 bytes, more than the 262144-byte limit",
            ),
            (
                DecodeError::InvalidUtf8 { at: 3 },
                "invalid_utf8",
                "record is not valid UTF-8 at byte 3",
            ),
            (
                DecodeError::InvalidJson {
                    at: Some(17),
                    message: "expected ':'".into(),
                },
                "invalid_json",
                "invalid JSON at byte 17: expected ':'",
            ),
            (
                DecodeError::InvalidJson {
                    at: None,
                    message: "unterminated string".into(),
                },
                "invalid_json",
                "invalid JSON: unterminated string",
            ),
            (
                DecodeError::NotAnObject,
                "not_an_object",
                "record is not a JSON object",
            ),
            (
                DecodeError::MissingDevice,
                "missing_device",
                "record has no \"device\" (a non-empty string is required)",
            ),
            (
                DecodeError::WrongType {
                    key: "device",
                    expected: "a string",
                    found: "number".into(),
                },
                "wrong_type",
                "\"device\" must be a string, found number",
            ),
            (
                DecodeError::BadTimestamp {
                    value: "yesterday".into(),
                },
                "bad_timestamp",
                "timestamp \"yesterday\" is not an RFC 3339 date-time (nor is it a number)",
            ),
            (
                DecodeError::TimestampOutOfRange {
                    value: "9999-12-31T00:00:00Z".into(),
                },
                "timestamp_out_of_range",
                "timestamp 9999-12-31T00:00:00Z is out of range [2000-01-01, 2100-01-01)",
            ),
            (
                DecodeError::NotFinite {
                    field: "temp".into(),
                    value: "NaN".into(),
                },
                "not_finite",
                "field \"temp\" is not a finite number (\"NaN\")",
            ),
            (
                DecodeError::InvalidFieldName {
                    name: String::new(),
                    reason: "it is empty".into(),
                },
                "invalid_field_name",
                "field name \"\" is invalid: it is empty",
            ),
            (
                DecodeError::NoFields,
                "no_fields",
                "record has no fields: nothing to store",
            ),
            (
                DecodeError::TooDeep { limit: 32, at: 40 },
                "too_deep",
                "JSON nesting is deeper than the 32-level limit (at byte 40)",
            ),
            (
                DecodeError::BadAggregate(crate::kpl::KplError::ChecksumMismatch),
                "bad_aggregate",
                "KPL aggregate's MD5 does not match its contents",
            ),
        ];
        for (err, kind, display) in rows {
            assert_eq!(err.kind(), kind, "{err:?}");
            assert_eq!(err.to_string(), display, "{err:?}");
        }
    }

    #[test]
    fn truncation_counts_characters() {
        assert_eq!(truncate_for_error("short"), "short");
        let long = "é".repeat(100);
        let cut = truncate_for_error(&long);
        assert_eq!(cut.chars().count(), 64);
        assert_eq!(cut.len(), 128);
    }
}
