//! The JSON layer over simd-json: wording its errors for dead letters, and
//! re-serializing parsed values as compact JSON text for event bodies.
//!
//! Everything here walks simd-json's flat tape with loops, never recursion,
//! so no input can overflow the stack whatever `max_depth` is configured.

use simd_json::{ErrorType, Node, StaticNode};

use super::error::{DecodeError, truncate_for_error};

/// Maps a simd-json error to [`DecodeError`]. `len` is the record's length,
/// used as the position of an unexpected end of input.
///
/// simd-json's positions are only trusted where it takes them from the
/// structural index (a byte offset into the record); errors found inside a
/// string carry an offset relative to the string and errors from its first
/// pass carry none, so those get `at: None` rather than a wrong number.
pub(crate) fn parse_error(err: &simd_json::Error, len: usize, max_depth: usize) -> DecodeError {
    let idx = err.index();
    let ch = err.character();
    let found = ch.map_or_else(String::new, |c| format!(", found {c:?}"));
    let (at, message) = match err.error() {
        ErrorType::DepthLimitExceeded => {
            return DecodeError::TooDeep {
                limit: max_depth,
                at: idx,
            };
        }
        ErrorType::ExpectedObjectColon => (
            Some(idx),
            format!("expected ':' after an object key{found}"),
        ),
        ErrorType::ExpectedObjectKey => (Some(idx), format!("expected a string key{found}")),
        ErrorType::ExpectedObjectContent => (
            Some(idx),
            format!("expected a string key, ',' or '}}' in an object{found}"),
        ),
        ErrorType::ExpectedArrayContent => (
            Some(idx),
            format!("expected a value, ',' or ']' in an array{found}"),
        ),
        ErrorType::ExpectedTrue | ErrorType::ExpectedFalse | ErrorType::ExpectedNull => (
            Some(idx),
            "invalid literal (expected true, false or null)".to_owned(),
        ),
        ErrorType::InvalidNumber | ErrorType::InvalidExponent => (
            Some(idx),
            "invalid number (malformed, an integer beyond 64 bits, or beyond f64 range)".to_owned(),
        ),
        ErrorType::TrailingData => (Some(idx), "trailing data after the JSON value".to_owned()),
        // Raised by the second pass for a character that fits no grammar
        // rule, including extra data after the top-level value.
        ErrorType::InternalError => (
            Some(idx),
            format!("unexpected character or trailing data{found}"),
        ),
        ErrorType::Syntax if ch.is_some() => (Some(len), "unexpected end of input".to_owned()),
        ErrorType::Syntax => (
            None,
            "unterminated string or unescaped control character in a string".to_owned(),
        ),
        ErrorType::Eof => (None, "empty input".to_owned()),
        ErrorType::InvalidEscape => (None, "invalid escape sequence in a string".to_owned()),
        ErrorType::InvalidUnicodeEscape | ErrorType::InvalidUnicodeCodepoint => {
            (None, "invalid \\u escape in a string".to_owned())
        }
        ErrorType::InvalidUtf8 => (None, "invalid UTF-8".to_owned()),
        other => (ch.map(|_| idx), format!("{other:?}")),
    };
    DecodeError::InvalidJson { at, message }
}

/// The error for a tape that breaks simd-json's own invariants; unreachable
/// in practice, but returned instead of panicking.
pub(crate) fn malformed_tape() -> DecodeError {
    DecodeError::InvalidJson {
        at: None,
        message: "internal error: malformed parse tape".to_owned(),
    }
}

/// Number of tape nodes `node` occupies, itself and its descendants included.
pub(crate) fn span(node: &Node<'_>) -> usize {
    match node {
        Node::Object { count, .. } | Node::Array { count, .. } => count + 1,
        Node::String(_) | Node::Static(_) => 1,
    }
}

/// The JSON type name of `node`, for "found ..." in errors.
pub(crate) fn type_name(node: &Node<'_>) -> &'static str {
    match node {
        Node::String(_) => "string",
        Node::Object { .. } => "object",
        Node::Array { .. } => "array",
        Node::Static(StaticNode::Null) => "null",
        Node::Static(StaticNode::Bool(_)) => "boolean",
        Node::Static(_) => "number",
    }
}

/// One open container while writing: members left to write, and whether it
/// is an object (members are key/value pairs) or an array.
struct Open {
    /// Members not yet completely written.
    left: usize,
    /// Whether members are key/value pairs, and the closer is `}`.
    object: bool,
}

/// Appends `nodes[0]` (with its descendants) to `out` as compact JSON.
///
/// `field` names the field being written, for the [`DecodeError::NotFinite`]
/// raised if a non-finite float is found (JSON cannot carry one; simd-json
/// rejects such numbers today, this guards against a parser that does not).
pub(crate) fn write_compact(
    nodes: &[Node<'_>],
    field: &str,
    out: &mut String,
) -> Result<(), DecodeError> {
    let mut stack: Vec<Open> = Vec::new();
    let mut i = 0;
    loop {
        // Write one value; containers open here and are closed below.
        match *nodes.get(i).ok_or_else(malformed_tape)? {
            Node::Static(s) => write_static(s, field, out)?,
            Node::String(s) => write_string(s, out),
            Node::Array { len, .. } => {
                out.push('[');
                if len > 0 {
                    stack.push(Open {
                        left: len,
                        object: false,
                    });
                    i += 1;
                    continue;
                }
                out.push(']');
            }
            Node::Object { len, .. } => {
                out.push('{');
                if len > 0 {
                    stack.push(Open {
                        left: len,
                        object: true,
                    });
                    i = write_key(nodes, i + 1, out)?;
                    continue;
                }
                out.push('}');
            }
        }
        i += 1;
        // A value is complete: close finished containers, then start the next member.
        loop {
            let Some(top) = stack.last_mut() else {
                return Ok(());
            };
            top.left -= 1;
            if top.left == 0 {
                out.push(if top.object { '}' } else { ']' });
                stack.pop();
                continue;
            }
            out.push(',');
            if top.object {
                i = write_key(nodes, i, out)?;
            }
            break;
        }
    }
}

/// Writes the object key at `nodes[i]` and a colon; returns the index of its value.
fn write_key(nodes: &[Node<'_>], i: usize, out: &mut String) -> Result<usize, DecodeError> {
    let Some(Node::String(key)) = nodes.get(i) else {
        return Err(malformed_tape());
    };
    write_string(key, out);
    out.push(':');
    Ok(i + 1)
}

fn write_static(s: StaticNode, field: &str, out: &mut String) -> Result<(), DecodeError> {
    use std::fmt::Write as _;
    // Writing to a String cannot fail, so the fmt results are ignored.
    match s {
        StaticNode::Null => out.push_str("null"),
        StaticNode::Bool(b) => out.push_str(if b { "true" } else { "false" }),
        StaticNode::I64(n) => _ = write!(out, "{n}"),
        StaticNode::U64(n) => _ = write!(out, "{n}"),
        StaticNode::F64(f) if !f.is_finite() => {
            return Err(DecodeError::NotFinite {
                field: truncate_for_error(field),
                value: format!("{f}"),
            });
        }
        // Debug, unlike Display, switches to exponent form for very large and
        // small magnitudes and always keeps a '.' or 'e': valid JSON, round-trips.
        StaticNode::F64(f) => _ = write!(out, "{f:?}"),
    }
    Ok(())
}

/// Appends `s` as a JSON string literal, escaping only what JSON requires.
pub(crate) fn write_string(s: &str, out: &mut String) {
    out.reserve(s.len() + 2);
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        // Every byte matched above is ASCII, so `i` is a char boundary.
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compact(json: &str) -> Result<String, DecodeError> {
        let mut bytes = json.as_bytes().to_vec();
        let tape = simd_json::to_tape(&mut bytes).expect("test input is valid JSON");
        let mut out = String::new();
        write_compact(&tape.0, "f", &mut out).map(|()| out)
    }

    #[test]
    fn round_trips_compactly() {
        let rows = [
            ("null", "null"),
            ("true", "true"),
            (" [ ] ", "[]"),
            ("{ }", "{}"),
            ("-12", "-12"),
            ("18446744073709551615", "18446744073709551615"),
            ("1.5", "1.5"),
            ("1.0", "1.0"),
            ("1e300", "1e300"),
            ("-2.5e-7", "-2.5e-7"),
            (r#""a\"b\\c\n\t\u0001é""#, r#""a\"b\\c\n\t\u0001é""#),
            (
                r#"[1, [2, [3, []]], {"a": {"b": null}}, "x"]"#,
                r#"[1,[2,[3,[]]],{"a":{"b":null}},"x"]"#,
            ),
            (
                r#"{"k": [], "l": {}, "m": [{}], "n": 1}"#,
                r#"{"k":[],"l":{},"m":[{}],"n":1}"#,
            ),
            (r#"{"a\u0000": "\b\f\r"}"#, r#"{"a\u0000":"\b\f\r"}"#),
        ];
        for (input, expected) in rows {
            assert_eq!(compact(input).as_deref(), Ok(expected), "input {input}");
        }
    }

    #[test]
    fn non_finite_float_is_refused() {
        let nodes = [
            Node::Array { len: 1, count: 1 },
            Node::Static(StaticNode::F64(f64::INFINITY)),
        ];
        let mut out = String::new();
        assert_eq!(
            write_compact(&nodes, "x", &mut out),
            Err(DecodeError::NotFinite {
                field: "x".into(),
                value: "inf".into()
            })
        );
    }

    #[test]
    fn malformed_tape_is_an_error_not_a_panic() {
        let nodes = [
            Node::Array { len: 2, count: 2 },
            Node::Static(StaticNode::Null),
        ];
        assert_eq!(
            write_compact(&nodes, "x", &mut String::new()),
            Err(malformed_tape())
        );
        let nodes = [
            Node::Object { len: 1, count: 2 },
            Node::Static(StaticNode::Null),
        ];
        assert_eq!(
            write_compact(&nodes, "x", &mut String::new()),
            Err(malformed_tape())
        );
    }
}
