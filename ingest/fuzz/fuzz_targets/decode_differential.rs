//! simd-json (the decoder's parser) against serde_json on the same bytes:
//! both accept or both reject, and the values agree. Numbers are compared
//! with Rust's own correctly rounded parsing of serde_json's literal.
//!
//! One difference is the decoder's documented choice (decode/mod.rs):
//! simd-json refuses an integer beyond 64 bits and a float beyond f64,
//! which serde_json keeps as a literal. Nothing else may differ.
//!
//! Then the decoder itself: what it accepts serde_json accepts, and each
//! sample's value is the value its field has in the record.
#![no_main]

use ingest::decode::{DecodeLimits, Decoder};
use libfuzzer_sys::fuzz_target;
use serde_json::Value as Reference;
use simd_json::{OwnedValue as Simd, StaticNode};

const ARRIVAL: i64 = 1_763_900_000_123_000;

fuzz_target!(|data: &[u8]| {
    let reference = serde_json::from_slice::<Reference>(data);
    let mut scratch = data.to_vec();
    let simd = simd_json::to_owned_value(&mut scratch);
    match (&simd, &reference) {
        (Ok(simd), Ok(reference)) => {
            if let Err(difference) = same(simd, reference, "$") {
                panic!("simd-json and serde_json read different values: {difference}");
            }
        }
        (Err(_), Err(_)) => {}
        (Ok(simd), Err(err)) => {
            // serde_json stops at 128 levels; simd-json goes deeper.
            if !err.to_string().contains("recursion limit") {
                panic!("only simd-json accepted it (as {simd:?}); serde_json: {err}");
            }
        }
        (Err(err), Ok(reference)) => {
            if !has_number_beyond_64_bits(data) {
                panic!("only serde_json accepted it (as {reference}); simd-json: {err}");
            }
        }
    }

    let mut decoder = Decoder::new(DecodeLimits::default());
    match decoder.decode(data, ARRIVAL) {
        Ok(reading) => {
            let record = match &reference {
                Ok(Reference::Object(record)) => record,
                other => panic!("the decoder accepted what serde_json reads as {other:?}"),
            };
            let nested = record.get("fields").and_then(Reference::as_object);
            let candidates = |name: &str| {
                [record.get(name), nested.and_then(|fields| fields.get(name))]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
            };
            for sample in &reading.samples {
                let found = candidates(&sample.metric).into_iter().any(|value| {
                    number_of(value).is_some_and(|n| n == sample.value)
                        || value
                            .as_bool()
                            .is_some_and(|b| f64::from(u8::from(b)) == sample.value)
                });
                assert!(found, "sample {sample:?} is not a value of the record");
            }
            for event in &reading.events {
                assert!(
                    !candidates(&event.kind).is_empty(),
                    "event {event:?} names no field of the record"
                );
            }
        }
        Err(err) if err.kind() == "invalid_json" => {
            if let Ok(reference) = &reference {
                assert!(
                    has_number_beyond_64_bits(data),
                    "the decoder says {err} but serde_json reads {reference}"
                );
            }
        }
        Err(_) => {}
    }
});

/// Whether `simd` and `reference` are the same JSON value; where not, the
/// path of the first difference.
fn same(simd: &Simd, reference: &Reference, path: &str) -> Result<(), String> {
    let differ = || {
        Err(format!(
            "at {path}: simd-json {simd:?}, serde_json {reference}"
        ))
    };
    match (simd, reference) {
        (Simd::Static(StaticNode::Null), Reference::Null) => Ok(()),
        (Simd::Static(StaticNode::Bool(a)), Reference::Bool(b)) if a == b => Ok(()),
        (Simd::Static(number), Reference::Number(literal)) => {
            let literal = literal.to_string();
            let integer = !literal.contains(['.', 'e', 'E']);
            let agrees = match *number {
                StaticNode::I64(n) => integer && literal.parse::<i64>() == Ok(n),
                StaticNode::U64(n) => integer && literal.parse::<u64>() == Ok(n),
                StaticNode::F64(n) => literal
                    .parse::<f64>()
                    .is_ok_and(|parsed| parsed.to_bits() == n.to_bits()),
                _ => false,
            };
            if agrees { Ok(()) } else { differ() }
        }
        (Simd::String(a), Reference::String(b)) if a == b => Ok(()),
        (Simd::Array(a), Reference::Array(b)) if a.len() == b.len() => {
            for (i, (a, b)) in a.iter().zip(b).enumerate() {
                same(a, b, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        (Simd::Object(a), Reference::Object(b)) => {
            // simd-json's object keeps every member of a key given twice,
            // serde_json's only the last (the decoder picks the last itself,
            // from the tape). So: the same keys, and serde_json's value is
            // one of simd-json's for it (the only one for a key given once).
            let keys: std::collections::BTreeSet<&str> = a.keys().map(String::as_str).collect();
            if keys.len() != b.len() {
                return differ();
            }
            for (key, b) in b {
                let mut differences = Vec::new();
                let mut found = false;
                for (_, a) in a.iter().filter(|(k, _)| *k == key) {
                    match same(a, b, &format!("{path}.{key}")) {
                        Ok(()) => found = true,
                        Err(difference) => differences.push(difference),
                    }
                }
                if !found {
                    return Err(differences
                        .pop()
                        .unwrap_or_else(|| format!("at {path}: simd-json has no key {key:?}")));
                }
            }
            Ok(())
        }
        _ => differ(),
    }
}

/// A number as f64, parsed from serde_json's literal.
fn number_of(value: &Reference) -> Option<f64> {
    match value {
        Reference::Number(literal) => literal.to_string().parse().ok(),
        _ => None,
    }
}

/// Whether the JSON text `data` (which serde_json accepted) spells an
/// integer beyond 64 bits or a number beyond f64 anywhere, a member later
/// replaced by a duplicate key included: the literals are read off the text.
fn has_number_beyond_64_bits(data: &[u8]) -> bool {
    let mut in_string = false;
    let mut escaped = false;
    let mut i = 0;
    while i < data.len() {
        let b = data[i];
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            i += 1;
        } else if b == b'"' {
            in_string = true;
            i += 1;
        } else if b == b'-' || b.is_ascii_digit() {
            let end = data[i..]
                .iter()
                .position(|c| !matches!(c, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'))
                .map_or(data.len(), |n| i + n);
            let literal = std::str::from_utf8(&data[i..end]).unwrap_or("");
            let beyond = if literal.contains(['.', 'e', 'E']) {
                literal.parse::<f64>().map_or(true, f64::is_infinite)
            } else {
                literal.parse::<i64>().is_err() && literal.parse::<u64>().is_err()
            };
            if beyond {
                return true;
            }
            i = end;
        } else {
            i += 1;
        }
    }
    false
}
