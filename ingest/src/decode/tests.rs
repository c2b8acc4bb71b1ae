//! Table-driven tests of [`Decoder::decode`] over the whole record contract.

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
fn invalid_utf8_reports_the_offset() {
    let cut = "{\"device\":\"d\",\"x\":\"é\"}".as_bytes();
    let e_at = cut.iter().position(|&b| b == 0xc3).unwrap();
    // A record cut in the middle of "é": the lone lead byte.
    assert_eq!(
        decode(&cut[..e_at + 1]),
        Err(DecodeError::InvalidUtf8 { at: e_at })
    );
    // Cut there and then closed, so only the UTF-8 is wrong.
    let mut patched = cut[..e_at + 1].to_vec();
    patched.extend_from_slice(b"\"}");
    assert_eq!(decode(&patched), Err(DecodeError::InvalidUtf8 { at: e_at }));
    assert_eq!(
        decode(b"{\"device\":\"\xff\"}"),
        Err(DecodeError::InvalidUtf8 { at: 11 })
    );
}

#[test]
fn size_limit_is_checked_first() {
    // 1 MiB of invalid UTF-8: TooLarge wins, nothing is parsed.
    let big = vec![0xff_u8; 1 << 20];
    assert_eq!(
        decode(&big),
        Err(DecodeError::TooLarge {
            size: 1_048_576,
            limit: 262_144
        })
    );
    // Exactly at the limit is accepted.
    let head = r#"{"device":"d","x":1,"pad":""#;
    let pad = 256 * 1024 - head.len() - 2;
    let at_limit = format!("{head}{}\"}}", "p".repeat(pad));
    assert_eq!(at_limit.len(), 256 * 1024);
    let reading = decode(at_limit.as_bytes()).expect("a record at the limit decodes");
    assert_eq!(reading.events[0].body.len(), pad + 2);
}

#[test]
fn nesting_limit_without_stack_overflow() {
    // 100,000 opening brackets, bare and inside a field, closed or not.
    let open = "[".repeat(100_000);
    let closed = format!("{open}{}", "]".repeat(100_000));
    let prefix = r#"{"device":"d","x":"#;
    let limit = 32;
    let rows = [
        (open.clone(), 32),
        (closed.clone(), 32),
        (format!("{prefix}{open}"), prefix.len() + 31),
        (format!("{prefix}{closed}}}"), prefix.len() + 31),
    ];
    for (input, at) in rows {
        assert_eq!(
            decode(input.as_bytes()),
            Err(DecodeError::TooDeep { limit, at })
        );
    }
    // Exactly 32 levels (the record's object is one) is accepted.
    let ok32 = format!("{prefix}{}{}}}", "[".repeat(31), "]".repeat(31));
    let reading = decode(ok32.as_bytes()).expect("32 levels decode");
    assert_eq!(
        reading.events[0].body,
        format!("{}{}", "[".repeat(31), "]".repeat(31))
    );
    let deep33 = format!("{prefix}{}{}}}", "[".repeat(32), "]".repeat(32));
    assert_eq!(
        decode(deep33.as_bytes()),
        Err(DecodeError::TooDeep {
            limit,
            at: prefix.len() + 31
        })
    );
}

#[test]
fn huge_nesting_allowed_by_limits_decodes_on_a_small_stack() {
    // With the limit lifted, parsing and re-serializing 100,000 levels must
    // still not recurse: run it on a 256 KiB stack to prove it.
    let worker = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(|| {
            let limits = DecodeLimits {
                max_record_bytes: 1 << 20,
                max_depth: 200_000,
            };
            let nested = format!("{}1{}", "[{\"a\":".repeat(50_000), "}]".repeat(50_000));
            let input = format!(r#"{{"device":"d","x":{nested}}}"#);
            let reading = Decoder::new(limits)
                .decode(input.as_bytes(), ARRIVAL)
                .expect("decodes");
            reading.events[0].body == nested
        });
    assert!(worker.expect("spawn").join().expect("no stack overflow"));
}

#[test]
fn many_fields_with_duplicates() {
    // Over the pairwise threshold, duplicates are found with a hash map.
    let mut input = String::from(r#"{"device":"d""#);
    for i in 0..100 {
        input.push_str(&format!(r#","f{}":{i}"#, i % 50));
    }
    input.push('}');
    let reading = decode(input.as_bytes()).expect("decodes");
    let expected: Vec<Sample> = (50..100)
        .map(|i| Sample {
            metric: format!("f{}", i % 50),
            value: f64::from(i),
        })
        .collect();
    assert_eq!(reading.samples, expected);
}

#[test]
fn decoder_reuse_keeps_records_apart() {
    let mut decoder = Decoder::default();
    let long = format!(r#"{{"device":"long","s":"{}","x":1}}"#, "y".repeat(5000));
    assert!(decoder.decode(long.as_bytes(), ARRIVAL).is_ok());
    assert!(decoder.decode(b"{\"device\":", ARRIVAL).is_err());
    assert_eq!(
        decoder.decode(br#"{"device":"d","x":1}"#, ARRIVAL),
        ok("d", "", ARRIVAL, &[("x", 1.0)], &[])
    );
    assert_eq!(
        decoder.decode(br#"{"device":"e","y":"\u0041"}"#, ARRIVAL),
        ok("e", "", ARRIVAL, &[], &[("y", r#""A""#)])
    );
}

#[test]
fn decoder_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<Decoder>();
}
