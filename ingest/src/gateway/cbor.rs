//! CBOR payloads (CoAP Content-Format 60) to JSON text, so that every
//! Kinesis record is JSON as DESIGN.md says ("later also CBOR": until the
//! consumer reads CBOR, the gateway translates).
//!
//! The mapping: integers, finite floats, text, booleans, null, arrays and
//! maps with text keys map to their JSON counterparts; a tag is replaced by
//! the value it tags (tag 1, epoch time, is a number; tag 0 an RFC 3339
//! string: both are what `ts` takes). Refused, because JSON has no faithful
//! spelling for them: byte strings (bignums included), non-text map keys,
//! NaN and infinities, nesting deeper than [`MAX_DEPTH`], and trailing bytes.

use std::fmt::Write as _;

use ciborium::Value;

use super::record::push_json_string;

/// Deepest nesting accepted, like the decoder's default `max_depth`.
pub const MAX_DEPTH: usize = 32;

/// Why a CBOR payload cannot become JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the CBOR payload {0}")]
pub struct CborError(String);

/// Translates one CBOR data item, the whole of `bytes`, to JSON text.
pub fn to_json(bytes: &[u8]) -> Result<String, CborError> {
    let mut reader = bytes;
    let value: Value = ciborium::de::from_reader_with_recursion_limit(&mut reader, MAX_DEPTH)
        .map_err(|err| CborError(format!("is not valid CBOR: {err}")))?;
    if !reader.is_empty() {
        return Err(CborError(format!(
            "has {} bytes after its first data item",
            reader.len()
        )));
    }
    let mut out = String::with_capacity(bytes.len() * 2);
    write_value(&value, &mut out, 0)?;
    Ok(out)
}

fn write_value(value: &Value, out: &mut String, depth: usize) -> Result<(), CborError> {
    if depth > MAX_DEPTH {
        return Err(CborError(format!("is nested deeper than {MAX_DEPTH}")));
    }
    match value {
        Value::Integer(n) => _ = write!(out, "{}", i128::from(*n)),
        Value::Float(f) if f.is_finite() => {
            // Debug always keeps a '.' or an exponent: valid JSON that reads
            // back as the same float.
            _ = write!(out, "{f:?}");
        }
        Value::Float(f) => return Err(CborError(format!("holds a non-finite number ({f})"))),
        Value::Text(text) => push_json_string(out, text),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Null => out.push_str("null"),
        Value::Tag(_, inner) => write_value(inner, out, depth + 1)?,
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(item, out, depth + 1)?;
            }
            out.push(']');
        }
        Value::Map(members) => {
            out.push('{');
            for (i, (key, item)) in members.iter().enumerate() {
                let Value::Text(key) = key else {
                    return Err(CborError("has a map key that is not text".into()));
                };
                if i > 0 {
                    out.push(',');
                }
                push_json_string(out, key);
                out.push(':');
                write_value(item, out, depth + 1)?;
            }
            out.push('}');
        }
        Value::Bytes(_) => {
            return Err(CborError(
                "holds a byte string (or a bignum), which JSON cannot carry; send text".into(),
            ));
        }
        _ => return Err(CborError("holds a CBOR value with no JSON form".into())),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cbor(value: &Value) -> Vec<u8> {
        let mut bytes = Vec::new();
        ciborium::ser::into_writer(value, &mut bytes).unwrap();
        bytes
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    #[test]
    fn translates_what_json_can_say() {
        let record = Value::Map(vec![
            (
                text("ts"),
                Value::Tag(1, Box::new(Value::Integer(1_763_900_000.into()))),
            ),
            (
                text("fields"),
                Value::Map(vec![
                    (text("power"), Value::Float(1.5)),
                    (text("on"), Value::Bool(true)),
                    (text("count"), Value::Integer((-3).into())),
                    (text("big"), Value::Integer(u64::MAX.into())),
                    (text("note"), text("a \"b\"")),
                    (
                        text("list"),
                        Value::Array(vec![Value::Null, Value::Float(2.0)]),
                    ),
                ]),
            ),
        ]);
        assert_eq!(
            to_json(&cbor(&record)).unwrap(),
            r#"{"ts":1763900000,"fields":{"power":1.5,"on":true,"count":-3,"big":18446744073709551615,"note":"a \"b\"","list":[null,2.0]}}"#
        );
    }

    #[test]
    fn refuses_what_json_cannot_say() {
        let cases = [
            (
                Value::Map(vec![(text("a"), Value::Bytes(vec![1]))]),
                "byte string",
            ),
            (
                Value::Map(vec![(Value::Integer(1.into()), Value::Null)]),
                "not text",
            ),
            (Value::Float(f64::NAN), "non-finite"),
            (Value::Float(f64::INFINITY), "non-finite"),
        ];
        for (value, expected) in cases {
            let err = to_json(&cbor(&value)).unwrap_err().to_string();
            assert!(err.contains(expected), "{value:?}: {err}");
        }
        let mut deep = Value::Null;
        for _ in 0..100 {
            deep = Value::Array(vec![deep]);
        }
        assert!(to_json(&cbor(&deep)).is_err());
        let mut two = cbor(&Value::Null);
        two.extend(cbor(&Value::Null));
        assert!(
            to_json(&two)
                .unwrap_err()
                .to_string()
                .contains("after its first")
        );
        assert!(
            to_json(&[0xff, 0x00])
                .unwrap_err()
                .to_string()
                .contains("not valid CBOR")
        );
        assert!(to_json(&[]).is_err());
    }
}
