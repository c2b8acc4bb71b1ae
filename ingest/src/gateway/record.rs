//! Building the Kinesis record (DESIGN.md, "The record") from what a device
//! sent and where it sent it: the CoAP path or the MQTT topic names the
//! device (and the house), the payload carries the fields and maybe `ts`.
//!
//! Pure: no IO, no clock (the caller passes the arrival time). The payload's
//! members are copied byte for byte (numbers keep their spelling); only
//! `device`, `house` and a missing or null `ts` are written by the gateway,
//! first, so every record reads `{"device":...,"house":...,"ts":...,...}`.

use std::fmt::Write as _;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Where a message came from: the ids its path or topic names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin<'a> {
    /// The device id (the partition key): always named by the path or topic.
    pub device: &'a str,
    /// The house id, when the path or topic names one.
    pub house: Option<&'a str>,
    /// The reading's time as the topic spells it (epoch number or RFC 3339),
    /// when the topic carries one.
    pub ts: Option<&'a str>,
}

/// What the payload holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload<'a> {
    /// A JSON object: a record in canonical or flat form, maybe without
    /// `device`, `house` and `ts`.
    Object(&'a [u8]),
    /// One value of the field `name`: JSON (`1.5`, `true`, `"on"`, `{...}`),
    /// or else text, which becomes a JSON string.
    Value {
        /// The field's name (from the topic).
        name: &'a str,
        /// The payload as sent.
        raw: &'a [u8],
    },
}

/// What to do when the payload names a different device or house than the
/// path or topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// Refuse the message (CoAP: the device hears why, with 4.00).
    Reject,
    /// The path or topic wins, as in an IoT rule's `SELECT *, topic(2) AS
    /// device` (the MQTT bridge).
    OriginWins,
}

/// Why no record could be built from a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The payload is not valid UTF-8.
    #[error("the payload is not valid UTF-8 (at byte {at})")]
    NotUtf8 {
        /// Offset of the first invalid byte.
        at: usize,
    },
    /// The payload is not JSON, or not an object where one is needed.
    #[error("the payload is not a JSON object: {detail}")]
    NotAnObject {
        /// What the parser said, or what was found instead.
        detail: String,
    },
    /// The payload names another device or house than the path or topic.
    #[error("the payload's \"{key}\" is {found} but the {origin} names {expected:?}")]
    Conflict {
        /// `device` or `house`.
        key: &'static str,
        /// The payload's value, as JSON.
        found: String,
        /// The path's or topic's value.
        expected: String,
        /// `path` or `topic`, for the message.
        origin: &'static str,
    },
}

/// Builds the record for a message that arrived at `arrival_millis` (epoch
/// milliseconds, the `ts` written when the payload and origin have none).
///
/// The record is JSON text; whether the consumer can decode it is checked
/// separately (the CoAP server runs the consumer's decoder on it).
pub fn build(
    origin: Origin<'_>,
    payload: Payload<'_>,
    arrival_millis: i64,
    conflict: Conflict,
    origin_name: &'static str,
) -> Result<Vec<u8>, RecordError> {
    let mut out = String::with_capacity(payload_len(&payload) + 96);
    out.push_str("{\"device\":");
    push_json_string(&mut out, origin.device);
    if let Some(house) = origin.house {
        out.push_str(",\"house\":");
        push_json_string(&mut out, house);
    }
    match payload {
        Payload::Object(raw) => {
            let text = utf8(raw)?;
            let members = parse_object(text)?;
            // The reserved keys, last occurrence winning as in the decoder.
            let last = |key: &str| members.iter().rev().find(|(k, _)| k == key);
            check(
                "device",
                last("device"),
                Some(origin.device),
                conflict,
                origin_name,
            )?;
            check("house", last("house"), origin.house, conflict, origin_name)?;
            let payload_ts = last("ts").filter(|(_, v)| v.get() != "null");
            write_ts(&mut out, origin.ts, payload_ts.is_some(), arrival_millis);
            for (key, value) in &members {
                let ours = match key.as_str() {
                    "device" => true,
                    "house" => origin.house.is_some(),
                    // A null ts is replaced by ours; a real one is kept.
                    "ts" => origin.ts.is_some() || payload_ts.is_none(),
                    _ => false,
                };
                if !ours {
                    out.push(',');
                    push_json_string(&mut out, key);
                    out.push(':');
                    out.push_str(value.get());
                }
            }
        }
        Payload::Value { name, raw } => {
            let text = utf8(raw)?;
            write_ts(&mut out, origin.ts, false, arrival_millis);
            out.push_str(",\"fields\":{");
            push_json_string(&mut out, name);
            out.push(':');
            match serde_json::from_str::<&RawValue>(text) {
                Ok(value) => out.push_str(value.get()),
                Err(_) => push_json_string(&mut out, text),
            }
            out.push('}');
        }
    }
    out.push('}');
    Ok(out.into_bytes())
}

fn payload_len(payload: &Payload<'_>) -> usize {
    match payload {
        Payload::Object(raw) | Payload::Value { raw, .. } => raw.len(),
    }
}

fn utf8(raw: &[u8]) -> Result<&str, RecordError> {
    std::str::from_utf8(raw).map_err(|err| RecordError::NotUtf8 {
        at: err.valid_up_to(),
    })
}

/// Writes `"ts":...` unless the payload keeps its own: the origin's (from
/// the topic), else the arrival time.
fn write_ts(out: &mut String, origin_ts: Option<&str>, payload_has_ts: bool, arrival_millis: i64) {
    match origin_ts {
        Some(ts) => {
            out.push_str(",\"ts\":");
            // An epoch number stays a number; anything else (RFC 3339) is a
            // string, for the decoder to judge.
            let numeric = !ts.is_empty() && ts.bytes().all(|b| b.is_ascii_digit() || b == b'.');
            match (ts.parse::<i64>(), ts.parse::<f64>()) {
                (Ok(n), _) if numeric => _ = write!(out, "{n}"),
                (_, Ok(f)) if numeric && f.is_finite() => _ = write!(out, "{f}"),
                _ => push_json_string(out, ts),
            }
        }
        None if payload_has_ts => {}
        None => {
            let _ = write!(out, ",\"ts\":{arrival_millis}");
        }
    }
}

/// Checks a reserved key of the payload against the origin's value.
fn check(
    key: &'static str,
    member: Option<&(String, &RawValue)>,
    expected: Option<&str>,
    conflict: Conflict,
    origin: &'static str,
) -> Result<(), RecordError> {
    let (Some((_, value)), Some(expected), Conflict::Reject) = (member, expected, conflict) else {
        return Ok(());
    };
    let same = serde_json::from_str::<&str>(value.get()).is_ok_and(|found| found == expected)
        || serde_json::from_str::<String>(value.get()).is_ok_and(|found| found == expected);
    if same {
        Ok(())
    } else {
        Err(RecordError::Conflict {
            key,
            found: truncate(value.get()),
            expected: expected.to_owned(),
            origin,
        })
    }
}

/// The members of a JSON object, in document order, duplicates kept, each
/// value as its original text.
fn parse_object(text: &str) -> Result<Vec<(String, &RawValue)>, RecordError> {
    struct Members;
    impl<'de> Visitor<'de> for Members {
        type Value = Vec<(String, &'de RawValue)>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
            while let Some(member) = map.next_entry::<String, &'de RawValue>()? {
                members.push(member);
            }
            Ok(members)
        }
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let members = (&mut deserializer)
        .deserialize_map(Members)
        .and_then(|members| deserializer.end().map(|()| members))
        .map_err(|err| RecordError::NotAnObject {
            detail: err.to_string(),
        })?;
    Ok(members)
}

/// Appends `s` as a JSON string literal.
pub(crate) fn push_json_string(out: &mut String, s: &str) {
    // Serializing a &str cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

/// At most 64 characters of `s`, for messages.
fn truncate(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_763_900_000_123;

    fn origin<'a>(device: &'a str, house: Option<&'a str>) -> Origin<'a> {
        Origin {
            device,
            house,
            ts: None,
        }
    }

    fn object(
        origin: Origin<'_>,
        payload: &str,
        conflict: Conflict,
    ) -> Result<String, RecordError> {
        build(
            origin,
            Payload::Object(payload.as_bytes()),
            T,
            conflict,
            "path",
        )
        .map(|bytes| String::from_utf8(bytes).unwrap())
    }

    #[test]
    fn objects_get_device_house_and_arrival_time() {
        // (origin device, origin house, payload, expected record)
        let cases: &[(&str, Option<&str>, &str, &str)] = &[
            (
                "d1",
                Some("h1"),
                r#"{"fields":{"power":1.5}}"#,
                r#"{"device":"d1","house":"h1","ts":1763900000123,"fields":{"power":1.5}}"#,
            ),
            (
                "d1",
                None,
                r#" { "power" : 1.50e0 , "on": true } "#,
                r#"{"device":"d1","ts":1763900000123,"power":1.50e0,"on":true}"#,
            ),
            (
                "d1",
                None,
                r#"{"house":"h9","ts":"2025-11-23T12:00:00Z","v":1}"#,
                r#"{"device":"d1","house":"h9","ts":"2025-11-23T12:00:00Z","v":1}"#,
            ),
            (
                "d1",
                Some("h1"),
                r#"{"device":"d1","house":"h1","ts":1763900000,"v":1}"#,
                r#"{"device":"d1","house":"h1","ts":1763900000,"v":1}"#,
            ),
            (
                "d1",
                None,
                r#"{"ts":null,"v":1}"#,
                r#"{"device":"d1","ts":1763900000123,"v":1}"#,
            ),
            (
                "dev \"q\"",
                None,
                r#"{"a\"b":[1,{"c":null}]}"#,
                r#"{"device":"dev \"q\"","ts":1763900000123,"a\"b":[1,{"c":null}]}"#,
            ),
            ("d1", None, "{}", r#"{"device":"d1","ts":1763900000123}"#),
        ];
        for (device, house, payload, expected) in cases {
            let got = object(origin(device, *house), payload, Conflict::Reject);
            assert_eq!(got.as_deref(), Ok(*expected), "payload {payload}");
        }
    }

    #[test]
    fn conflicts_are_refused_or_overridden() {
        let payload = r#"{"device":"other","house":"h2","v":1}"#;
        let err = object(origin("d1", Some("h1")), payload, Conflict::Reject).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"the payload's "device" is "other" but the path names "d1""#
        );
        let err = object(
            origin("d1", Some("h1")),
            r#"{"house":7,"v":1}"#,
            Conflict::Reject,
        )
        .unwrap_err();
        assert!(
            matches!(err, RecordError::Conflict { key: "house", .. }),
            "{err}"
        );
        let got = object(origin("d1", Some("h1")), payload, Conflict::OriginWins).unwrap();
        assert_eq!(
            got,
            r#"{"device":"d1","house":"h1","ts":1763900000123,"v":1}"#
        );
        // Without a house in the origin, the payload's house is kept.
        let got = object(origin("d1", None), payload, Conflict::OriginWins).unwrap();
        assert_eq!(
            got,
            r#"{"device":"d1","ts":1763900000123,"house":"h2","v":1}"#
        );
    }

    #[test]
    fn payloads_that_are_not_objects() {
        let cases = ["[1,2]", "1.5", "", "{\"a\":1", "{\"a\":1} x", "null"];
        for payload in cases {
            let err = object(origin("d1", None), payload, Conflict::Reject).unwrap_err();
            assert!(
                matches!(err, RecordError::NotAnObject { .. }),
                "{payload}: {err}"
            );
        }
        let err = build(
            origin("d1", None),
            Payload::Object(b"{\"a\":\xff}"),
            T,
            Conflict::Reject,
            "path",
        )
        .unwrap_err();
        assert_eq!(err, RecordError::NotUtf8 { at: 5 });
    }

    #[test]
    fn single_values_become_one_field() {
        let with_ts = |ts| Origin {
            device: "egauge-A",
            house: Some("h42"),
            ts: Some(ts),
        };
        // (topic ts, payload, expected record)
        let cases: &[(&str, &str, &str)] = &[
            (
                "1763900000",
                "1.5",
                r#"{"device":"egauge-A","house":"h42","ts":1763900000,"fields":{"Battery":1.5}}"#,
            ),
            (
                "2025-11-23T12:00:00Z",
                " true ",
                r#"{"device":"egauge-A","house":"h42","ts":"2025-11-23T12:00:00Z","fields":{"Battery":true}}"#,
            ),
            (
                "1763900000.5",
                "charging",
                r#"{"device":"egauge-A","house":"h42","ts":1763900000.5,"fields":{"Battery":"charging"}}"#,
            ),
            (
                "0001763900000",
                r#"{"state":"on"}"#,
                r#"{"device":"egauge-A","house":"h42","ts":1763900000,"fields":{"Battery":{"state":"on"}}}"#,
            ),
        ];
        for (ts, payload, expected) in cases {
            let got = build(
                with_ts(ts),
                Payload::Value {
                    name: "Battery",
                    raw: payload.as_bytes(),
                },
                T,
                Conflict::OriginWins,
                "topic",
            )
            .map(|bytes| String::from_utf8(bytes).unwrap());
            assert_eq!(got.as_deref(), Ok(*expected), "payload {payload}");
        }
    }
}
