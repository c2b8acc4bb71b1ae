//! The record contract, row by row: what is accepted and what each rejection says.

use super::*;

#[test]
fn accepted_records() {
    run(vec![
        (
            r#"{"device": "egauge-A", "house": "h42", "ts": 1763900000123, "fields": {"Battery": 1.5, "EV": -3.2}}"#,
            ok(
                "egauge-A",
                "h42",
                T + 123_000,
                &[("Battery", 1.5), ("EV", -3.2)],
                &[],
            ),
        ),
        // Flat form, as an AWS IoT rule `SELECT *, topic(3) AS device` makes it.
        (
            r#"{"Battery":1.5,"EV":-3,"ts":1763900000,"device":"d"}"#,
            ok("d", "", T, &[("Battery", 1.5), ("EV", -3.0)], &[]),
        ),
        (
            r#"{"device":"d","house":null,"ts":1763900000,"x":1}"#,
            ok("d", "", T, &[("x", 1.0)], &[]),
        ),
        (
            r#"{"device":"d","house":"","ts":1763900000,"x":1}"#,
            ok("d", "", T, &[("x", 1.0)], &[]),
        ),
        // A backslash before "u0000" is text, not NUL: jsonb takes it.
        (
            r#"{"device":"d","ts":1763900000,"path":"C:\\u0000"}"#,
            ok("d", "", T, &[], &[("path", r#""C:\\u0000""#)]),
        ),
        // The largest magnitudes a sample may have.
        (
            r#"{"device":"d","ts":1763900000,"big":1e100,"small":-1e100}"#,
            ok("d", "", T, &[("big", 1e100), ("small", -1e100)], &[]),
        ),
        // Timestamps in every unit.
        (
            r#"{"device":"d","ts":1763900000.5,"x":1}"#,
            ok("d", "", T + 500_000, &[("x", 1.0)], &[]),
        ),
        (
            r#"{"device":"d","ts":1763900000.123456,"x":1}"#,
            ok("d", "", T + 123_456, &[("x", 1.0)], &[]),
        ),
        (
            r#"{"device":"d","ts":1763900000123456,"x":1}"#,
            ok("d", "", T + 123_456, &[("x", 1.0)], &[]),
        ),
        (
            r#"{"device":"d","ts":1763900000123456789,"x":1}"#,
            ok("d", "", T + 123_456, &[("x", 1.0)], &[]),
        ),
        (
            r#"{"device":"d","ts":1.7639e18,"x":1}"#,
            ok("d", "", T, &[("x", 1.0)], &[]),
        ),
        (
            r#"{"device":"d","ts":"2025-11-23T12:13:20.123Z","x":1}"#,
            ok("d", "", T + 123_000, &[("x", 1.0)], &[]),
        ),
        (
            r#"{"device":"d","ts":"2025-11-23T14:13:20+02:00","x":1}"#,
            ok("d", "", T, &[("x", 1.0)], &[]),
        ),
        (
            r#"{"device":"d","x":1}"#,
            ok("d", "", ARRIVAL, &[("x", 1.0)], &[]),
        ),
        (
            r#"{"device":"d","ts":null,"x":1}"#,
            ok("d", "", ARRIVAL, &[("x", 1.0)], &[]),
        ),
        // Value kinds.
        (
            r#"{"device":"d","fields":{"on":true,"off":false}}"#,
            ok("d", "", ARRIVAL, &[("on", 1.0), ("off", 0.0)], &[]),
        ),
        (
            r#"{"device":"d","fields":{"s":"on","a":[1, "a", null, 2.5],"o":{"b": {"c": []}},"n":null}}"#,
            ok(
                "d",
                "",
                ARRIVAL,
                &[],
                &[
                    ("s", r#""on""#),
                    ("a", r#"[1,"a",null,2.5]"#),
                    ("o", r#"{"b":{"c":[]}}"#),
                    ("n", "null"),
                ],
            ),
        ),
        (
            r#"{"device":"d","s":"say \"hi\"\n","e":"","z":"NaNa"}"#,
            ok(
                "d",
                "",
                ARRIVAL,
                &[],
                &[
                    ("s", r#""say \"hi\"\n""#),
                    ("e", r#""""#),
                    ("z", r#""NaNa""#),
                ],
            ),
        ),
        (
            r#"{"device":"d","x":-0,"y":18446744073709551615,"z":1e-999}"#,
            ok(
                "d",
                "",
                ARRIVAL,
                &[("x", 0.0), ("y", 1.8446744073709552e19), ("z", 0.0)],
                &[],
            ),
        ),
        // Escaped and non-ASCII ids and names survive.
        (
            r#"{"device":"caf\u00e9-é","°C":21.5}"#,
            ok("café-é", "", ARRIVAL, &[("°C", 21.5)], &[]),
        ),
        // Both forms at once: nothing is ignored; `fields` members stand where `fields` stands.
        (
            r#"{"device":"d","a":1,"fields":{"b":2},"c":"x"}"#,
            ok(
                "d",
                "",
                ARRIVAL,
                &[("a", 1.0), ("b", 2.0)],
                &[("c", r#""x""#)],
            ),
        ),
        // Duplicates: last in document order wins.
        (
            r#"{"device":"d","x":1,"x":2}"#,
            ok("d", "", ARRIVAL, &[("x", 2.0)], &[]),
        ),
        (
            r#"{"device":"d","x":1,"x":"two"}"#,
            ok("d", "", ARRIVAL, &[], &[("x", r#""two""#)]),
        ),
        (
            r#"{"device":"a","device":"b","x":1}"#,
            ok("b", "", ARRIVAL, &[("x", 1.0)], &[]),
        ),
        (
            r#"{"device":"d","x":1,"fields":{"x":2}}"#,
            ok("d", "", ARRIVAL, &[("x", 2.0)], &[]),
        ),
        (
            r#"{"device":"d","fields":{"x":2},"x":1}"#,
            ok("d", "", ARRIVAL, &[("x", 1.0)], &[]),
        ),
        (
            r#"{"device":"d","fields":{"x":1},"fields":{"y":2}}"#,
            ok("d", "", ARRIVAL, &[("y", 2.0)], &[]),
        ),
        // Inside `fields`, reserved words are ordinary names.
        (
            r#"{"device":"d","fields":{"device":1,"ts":2}}"#,
            ok("d", "", ARRIVAL, &[("device", 1.0), ("ts", 2.0)], &[]),
        ),
    ]);
}

#[test]
fn rejected_records() {
    let long = "n".repeat(257);
    let flat_long_name = format!(r#"{{"device":"d","{long}":1}}"#);
    let long_device = format!(r#"{{"device":"{long}","x":1}}"#);
    run(vec![
        // Syntax, with the parser's byte offsets.
        (
            r#"{"device" "d","x":1}"#,
            json_err(Some(10), "expected ':' after an object key, found '\"'"),
        ),
        (
            r#"{"device":"d","x":1"#,
            json_err(Some(19), "unexpected end of input"),
        ),
        (
            r#"{"device":"d","x":1}}"#,
            json_err(Some(19), "unexpected character or trailing data, found '}'"),
        ),
        (
            r#"{"device":"d","x":01}"#,
            json_err(
                Some(19),
                "invalid number (malformed, an integer beyond 64 bits, or beyond f64 range)",
            ),
        ),
        (
            r#"{"device":"d","x":"abc}"#,
            json_err(
                None,
                "unterminated string or unescaped control character in a string",
            ),
        ),
        (
            r#"{"device":"d","x":"\q"}"#,
            json_err(None, "invalid escape sequence in a string"),
        ),
        ("", json_err(None, "empty input")),
        // Numbers simd-json refuses rather than turning into infinity or a rounded float.
        (
            r#"{"device":"d","x":1e999}"#,
            json_err(
                Some(18),
                "invalid number (malformed, an integer beyond 64 bits, or beyond f64 range)",
            ),
        ),
        (
            r#"{"device":"d","x":[1e999]}"#,
            json_err(
                Some(19),
                "invalid number (malformed, an integer beyond 64 bits, or beyond f64 range)",
            ),
        ),
        (
            r#"{"device":"d","x":123456789012345678901234567890}"#,
            json_err(
                Some(38),
                "invalid number (malformed, an integer beyond 64 bits, or beyond f64 range)",
            ),
        ),
        // Shape.
        ("[1]", Err(DecodeError::NotAnObject)),
        (r#""x""#, Err(DecodeError::NotAnObject)),
        ("12", Err(DecodeError::NotAnObject)),
        ("null", Err(DecodeError::NotAnObject)),
        ("{}", Err(DecodeError::MissingDevice)),
        (r#"{"x":1}"#, Err(DecodeError::MissingDevice)),
        (r#"{"device":null,"x":1}"#, Err(DecodeError::MissingDevice)),
        (r#"{"device":"","x":1}"#, Err(DecodeError::MissingDevice)),
        (
            r#"{"device":7,"x":1}"#,
            wrong("device", "a string", "number"),
        ),
        (
            r#"{"device":"d","house":1,"x":1}"#,
            wrong("house", "a string", "number"),
        ),
        (
            r#"{"device":"d","fields":[1]}"#,
            wrong("fields", "an object", "array"),
        ),
        (
            r#"{"device":"d","fields":null,"x":1}"#,
            wrong("fields", "an object", "null"),
        ),
        (
            r#"{"device":"d","ts":true,"x":1}"#,
            wrong("ts", "a number or an RFC 3339 string", "boolean"),
        ),
        (
            &long_device,
            wrong(
                "device",
                "a string of at most 256 bytes",
                "a string of 257 bytes",
            ),
        ),
        (
            r#"{"device":"a\u0000b","x":1}"#,
            wrong(
                "device",
                "a string without NUL characters",
                "a string containing NUL",
            ),
        ),
        (r#"{"device":"d"}"#, Err(DecodeError::NoFields)),
        (r#"{"device":"d","fields":{}}"#, Err(DecodeError::NoFields)),
        (
            r#"{"device":"d","house":"h","ts":1763900000}"#,
            Err(DecodeError::NoFields),
        ),
        // Field names.
        (r#"{"device":"d","":1}"#, bad_name("", "it is empty")),
        (
            r#"{"device":"d","fields":{"":"x"}}"#,
            bad_name("", "it is empty"),
        ),
        (
            &flat_long_name,
            bad_name(&long[..64], "it is 257 bytes, more than 256"),
        ),
        (
            r#"{"device":"d","a\u0000":1}"#,
            bad_name(
                "a\0",
                "it contains a NUL character, which PostgreSQL text cannot store",
            ),
        ),
        // jsonb refuses NUL, so an event holding one is a dead letter, not a failed COPY.
        (
            r#"{"device":"d","note":"a\u0000b"}"#,
            Err(DecodeError::NulInEvent {
                field: "note".to_owned(),
            }),
        ),
        (
            r#"{"device":"d","fields":{"tags":["x","\u0000"]}}"#,
            Err(DecodeError::NulInEvent {
                field: "tags".to_owned(),
            }),
        ),
        // Beyond ±1e100 the hourly aggregates could overflow.
        (
            r#"{"device":"d","x":1.5e100}"#,
            Err(DecodeError::ValueOutOfRange {
                field: "x".to_owned(),
                value: 1.5e100,
            }),
        ),
        (
            r#"{"device":"d","fields":{"y":-1e308}}"#,
            Err(DecodeError::ValueOutOfRange {
                field: "y".to_owned(),
                value: -1e308,
            }),
        ),
        // Non-finite spellings.
        (r#"{"device":"d","temp":"NaN"}"#, not_finite("temp", "NaN")),
        (
            r#"{"device":"d","fields":{"t":"-Infinity"}}"#,
            not_finite("t", "-Infinity"),
        ),
        (r#"{"device":"d","t":"inf"}"#, not_finite("t", "inf")),
        (r#"{"device":"d","t":"+INF"}"#, not_finite("t", "+INF")),
        (r#"{"device":"d","t":"nAn"}"#, not_finite("t", "nAn")),
        // Timestamps: unparseable, zero, year 1 and year 9999 in every spelling.
        (
            r#"{"device":"d","ts":"yesterday","x":1}"#,
            Err(DecodeError::BadTimestamp {
                value: "yesterday".to_owned(),
            }),
        ),
        (
            r#"{"device":"d","ts":"1763900000","x":1}"#,
            Err(DecodeError::BadTimestamp {
                value: "1763900000".to_owned(),
            }),
        ),
        (r#"{"device":"d","ts":0,"x":1}"#, out_of_range("0")),
        (r#"{"device":"d","ts":0.0,"x":1}"#, out_of_range("0.0")),
        (
            r#"{"device":"d","ts":"0001-01-01T00:00:00Z","x":1}"#,
            out_of_range("0001-01-01T00:00:00Z"),
        ),
        (
            r#"{"device":"d","ts":"9999-12-31T00:00:00Z","x":1}"#,
            out_of_range("9999-12-31T00:00:00Z"),
        ),
        (
            r#"{"device":"d","ts":-62135596800,"x":1}"#,
            out_of_range("-62135596800"),
        ),
        (
            r#"{"device":"d","ts":-62135596800000,"x":1}"#,
            out_of_range("-62135596800000"),
        ),
        (
            r#"{"device":"d","ts":253402214400,"x":1}"#,
            out_of_range("253402214400"),
        ),
        (
            r#"{"device":"d","ts":253402214400000,"x":1}"#,
            out_of_range("253402214400000"),
        ),
        (
            r#"{"device":"d","ts":253402214400000000,"x":1}"#,
            out_of_range("253402214400000000"),
        ),
        (
            r#"{"device":"d","ts":18446744073709551615,"x":1}"#,
            out_of_range("18446744073709551615"),
        ),
        (r#"{"device":"d","ts":1e300,"x":1}"#, out_of_range("1e300")),
    ]);
}

#[test]
fn reasons_read_well_end_to_end() {
    let rows = [
        (
            r#"{"device" "d","x":1}"#,
            "invalid_json",
            "invalid JSON at byte 10: expected ':' after an object key, found '\"'",
        ),
        (
            r#"{"device":7,"x":1}"#,
            "wrong_type",
            "\"device\" must be a string, found number",
        ),
        (
            r#"{"device":"d","temp":"NaN"}"#,
            "not_finite",
            "field \"temp\" is not a finite number (\"NaN\")",
        ),
        (
            r#"{"device":"d","ts":"9999-12-31T00:00:00Z","x":1}"#,
            "timestamp_out_of_range",
            "timestamp 9999-12-31T00:00:00Z is out of range [2000-01-01, 2100-01-01)",
        ),
    ];
    for (input, kind, reason) in rows {
        let err = decode(input.as_bytes()).expect_err(input);
        assert_eq!(
            (err.kind(), err.to_string().as_str()),
            (kind, reason),
            "input: {input}"
        );
    }
}
