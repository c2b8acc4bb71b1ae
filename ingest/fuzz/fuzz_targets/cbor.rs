//! CBOR payloads to JSON (CoAP Content-Format 60): nothing panics, and what
//! is translated is valid JSON holding the same values as the CBOR item,
//! read independently with ciborium. Floats must read back bit for bit.
#![no_main]

use ciborium::Value as Cbor;
use ingest::gateway::cbor::{self, MAX_DEPTH};
use libfuzzer_sys::fuzz_target;
use serde_json::Value as Json;

fuzz_target!(|data: &[u8]| {
    let Ok(json) = cbor::to_json(data) else {
        return;
    };
    let translated: Json = serde_json::from_str(&json)
        .unwrap_or_else(|err| panic!("the translation {json:?} is not JSON: {err}"));
    let item: Cbor = ciborium::de::from_reader_with_recursion_limit(data, MAX_DEPTH + 2)
        .unwrap_or_else(|err| panic!("translated what ciborium cannot read: {err}"));
    if let Err(difference) = same(&item, &translated, "$") {
        panic!("CBOR and its JSON differ: {difference} (JSON {json})");
    }
});

fn same(item: &Cbor, json: &Json, path: &str) -> Result<(), String> {
    let differ = || Err(format!("at {path}: CBOR {item:?}, JSON {json}"));
    match (item, json) {
        (Cbor::Tag(_, inner), _) => same(inner, json, path),
        (Cbor::Null, Json::Null) => Ok(()),
        (Cbor::Bool(a), Json::Bool(b)) if a == b => Ok(()),
        (Cbor::Text(a), Json::String(b)) if a == b => Ok(()),
        (Cbor::Integer(n), Json::Number(literal)) => {
            let n = i128::from(*n);
            if literal.to_string().parse::<i128>() == Ok(n) {
                Ok(())
            } else {
                differ()
            }
        }
        (Cbor::Float(f), Json::Number(literal)) => {
            let parsed = literal.to_string().parse::<f64>();
            if parsed.is_ok_and(|p| p.to_bits() == f.to_bits()) {
                Ok(())
            } else {
                differ()
            }
        }
        (Cbor::Array(a), Json::Array(b)) if a.len() == b.len() => {
            for (i, (a, b)) in a.iter().zip(b).enumerate() {
                same(a, b, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        (Cbor::Map(members), Json::Object(object)) => {
            // A key given twice: the JSON object keeps the last, as the
            // decoder does.
            for (i, (key, value)) in members.iter().enumerate() {
                let Cbor::Text(key) = key else {
                    return Err(format!("at {path}: a non-text key was translated"));
                };
                let later = members[i + 1..]
                    .iter()
                    .any(|(k, _)| matches!(k, Cbor::Text(k) if k == key));
                if later {
                    continue;
                }
                let Some(b) = object.get(key) else {
                    return Err(format!("at {path}: JSON lacks key {key:?}"));
                };
                same(value, b, &format!("{path}.{key}"))?;
            }
            Ok(())
        }
        _ => differ(),
    }
}
