//! Hostile and unusual input: bad UTF-8, size and depth limits, mangled
//! bytes, many fields, decoder reuse.

use super::*;

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

#[test]
fn mangled_records_never_panic() {
    // Every truncation and many single-byte substitutions of a few records:
    // each must give some Result, and the decoder must stay usable.
    let seeds = [
        r#"{"device":"d\u00e9","house":"h","ts":"2025-11-23T12:13:20.5+02:00","fields":{"a":[1,{"b":"c\n"}],"n":null,"t":true,"x":-1.5e3}}"#,
        r#"{"device":"d","ts":1763900000123456789,"x":18446744073709551615,"y":"é"}"#,
    ];
    let bytes_to_try = [
        b'{', b'}', b'[', b']', b'"', b'\\', b':', b',', b'0', b'-', b'e', b'.', b' ', 0x00, 0xc3,
        0xff,
    ];
    let mut decoder = Decoder::default();
    for seed in seeds {
        let seed = seed.as_bytes();
        for cut in 0..seed.len() {
            let _ = decoder.decode(&seed[..cut], ARRIVAL);
            for &b in &bytes_to_try {
                let mut mangled = seed.to_vec();
                mangled[cut] = b;
                let _ = decoder.decode(&mangled, ARRIVAL);
            }
        }
        assert!(decoder.decode(seed, ARRIVAL).is_ok());
    }
}
