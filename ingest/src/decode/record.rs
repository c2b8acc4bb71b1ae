//! One Kinesis record's bytes to one [`Reading`]: the [`Decoder`] and the
//! types it produces.

use std::collections::HashMap;

use simd_json::{Buffers, INPUT_PADDING, Node, StaticNode, Tape, fill_tape_padded};

use super::error::{DecodeError, truncate_for_error};
use super::json::{malformed_tape, parse_error, span, type_name, write_compact};
use super::timestamp::{
    Micros, timestamp_from_integer, timestamp_from_number, timestamp_from_rfc3339,
};

/// Longest device id, house id or field name accepted, in bytes: longer ones
/// are firmware bugs, and they become index keys in the database.
pub const MAX_NAME_BYTES: usize = 256;

/// Largest magnitude a sample may have. The hourly aggregates sum values
/// and (for avg) squared deviations in float8: two readings of 1e308 in one
/// hour would overflow them, and PostgreSQL then refuses the whole COPY (or
/// every query of that hour). Under 1e100 no realistic count of readings can
/// overflow, and no physical quantity a device reports comes near it.
pub const MAX_SAMPLE_MAGNITUDE: f64 = 1e100;

/// Up to this many fields, duplicates are found by comparing every pair
/// (no allocation); above it, with a hash map (bounded time on hostile input).
const PAIRWISE_DEDUP_MAX: usize = 32;

/// Bounds on what one record may cost to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Larger records are rejected before parsing, bounding memory and time
    /// per record (Kinesis itself allows 1 MiB). Default 256 KiB.
    pub max_record_bytes: usize,
    /// Deepest nesting of objects and arrays accepted, the record's own
    /// object counting as 1. Bounds the parser's stack. Default 32.
    pub max_depth: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_record_bytes: 256 * 1024,
            max_depth: 32,
        }
    }
}

/// Everything one record says: where and when, and its fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Device id, non-empty: the series key the data is stored under.
    pub device: String,
    /// House (site) id, `""` when the record has none, so grouping by house
    /// never meets a NULL.
    pub house: String,
    /// When the reading was taken (or arrived, if the record has no `ts`).
    pub time: Micros,
    /// Numeric and boolean fields, in record order: the bulk of the data.
    pub samples: Vec<Sample>,
    /// Non-numeric fields, in record order, kept as JSON so nothing is lost.
    pub events: Vec<Event>,
}

/// One numeric field of a reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The field's name, e.g. `"Battery"`.
    pub metric: String,
    /// Always finite; booleans are 1.0 / 0.0. Integers beyond 2^53 are rounded.
    pub value: f64,
}

/// One non-numeric field of a reading (string, array, object or null).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The field's name.
    pub kind: String,
    /// The field's value as compact JSON text, e.g. `"\"on\""`, `[1,2]`, `null`.
    pub body: String,
}

/// Decodes records one at a time, reusing its buffers so a hot loop
/// allocates only what the returned [`Reading`] owns. One per worker: it is
/// `Send` but decoding needs `&mut self`.
pub struct Decoder {
    /// The limits every record is checked against.
    limits: DecodeLimits,
    /// simd-json's working memory, kept between records.
    buffers: Buffers,
    /// Mutable padded copy of the record: simd-json parses in place.
    scratch: Vec<u8>,
    /// The parse tape's allocation, kept empty between records.
    tape: Tape<'static>,
    /// Tape indices of the current record's field keys, in document order.
    fields: Vec<usize>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new(DecodeLimits::default())
    }
}

impl Decoder {
    /// A decoder enforcing `limits`.
    #[must_use]
    pub fn new(limits: DecodeLimits) -> Self {
        Self {
            limits,
            buffers: Buffers::with_max_depth(1024, limits.max_depth),
            scratch: Vec::with_capacity(1024 + INPUT_PADDING),
            tape: Tape(Vec::new()),
            fields: Vec::new(),
        }
    }

    /// The limits this decoder enforces.
    #[must_use]
    pub fn limits(&self) -> DecodeLimits {
        self.limits
    }

    /// Decodes one record. `arrival` (the record's arrival time, e.g. the
    /// Kinesis approximate arrival timestamp) is used when the record has no
    /// `ts` or a null one; it is trusted, not range-checked.
    ///
    /// # Errors
    /// A [`DecodeError`] saying precisely why the record is unusable; the
    /// caller dead-letters it. Never panics.
    pub fn decode(&mut self, raw: &[u8], arrival: Micros) -> Result<Reading, DecodeError> {
        let limit = self.limits.max_record_bytes;
        if raw.len() > limit {
            return Err(DecodeError::TooLarge {
                size: raw.len(),
                limit,
            });
        }
        // simd-json validates UTF-8 too, but without saying where it fails.
        if let Err(e) = std::str::from_utf8(raw) {
            return Err(DecodeError::InvalidUtf8 {
                at: e.valid_up_to(),
            });
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(raw);
        self.scratch.resize(raw.len() + INPUT_PADDING, b' ');

        let mut tape = std::mem::replace(&mut self.tape, Tape(Vec::new())).reset();
        // The parser enforces max_depth itself, iteratively (checked with
        // 100,000-deep input), reporting where the limit was crossed.
        let result =
            match fill_tape_padded(&mut self.scratch, raw.len(), &mut self.buffers, &mut tape) {
                Ok(()) => build(&tape.0, arrival, &mut self.fields),
                Err(e) => Err(parse_error(&e, raw.len(), self.limits.max_depth)),
            };
        self.tape = tape.reset();
        result
    }
}

/// Builds the reading from a parsed tape; `fields` is scratch space.
fn build(
    tape: &[Node<'_>],
    arrival: Micros,
    fields: &mut Vec<usize>,
) -> Result<Reading, DecodeError> {
    let Some(&Node::Object { len, .. }) = tape.first() else {
        return Err(DecodeError::NotAnObject);
    };
    // One pass over the top level: reserved keys (last occurrence wins) and
    // every other key, which is a field in both the flat and canonical forms.
    let (mut device, mut house, mut ts, mut fields_obj) = (None, None, None, None);
    let mut fields_pos = 0;
    fields.clear();
    let mut i = 1;
    for _ in 0..len {
        let Some(&Node::String(key)) = tape.get(i) else {
            return Err(malformed_tape());
        };
        let node = tape.get(i + 1).ok_or_else(malformed_tape)?;
        match key {
            "device" => device = Some(node),
            "house" => house = Some(node),
            "ts" => ts = Some(node),
            "fields" => {
                fields_obj = Some(i + 1);
                fields_pos = fields.len();
            }
            _ => fields.push(i),
        }
        i += 1 + span(node);
    }

    let device = device_id(device)?;
    let house = house_id(house)?;
    let time = time_of(ts, arrival)?;
    if let Some(at) = fields_obj {
        insert_members(tape, at, fields_pos, fields)?;
    }
    drop_overridden(tape, fields);

    let mut reading = Reading {
        device,
        house,
        time,
        samples: Vec::with_capacity(fields.len()),
        events: Vec::new(),
    };
    for &k in fields.iter() {
        add_field(tape, k, &mut reading)?;
    }
    if reading.samples.is_empty() && reading.events.is_empty() {
        return Err(DecodeError::NoFields);
    }
    Ok(reading)
}

fn device_id(node: Option<&Node<'_>>) -> Result<String, DecodeError> {
    match node {
        None | Some(Node::Static(StaticNode::Null) | Node::String("")) => {
            Err(DecodeError::MissingDevice)
        }
        Some(Node::String(s)) => id("device", s),
        Some(other) => Err(wrong_type("device", "a string", other)),
    }
}

fn house_id(node: Option<&Node<'_>>) -> Result<String, DecodeError> {
    match node {
        None | Some(Node::Static(StaticNode::Null)) => Ok(String::new()),
        Some(Node::String(s)) => id("house", s),
        Some(other) => Err(wrong_type("house", "a string", other)),
    }
}

/// The reading's time from `ts`, or `arrival` if it is absent or null.
fn time_of(ts: Option<&Node<'_>>, arrival: Micros) -> Result<Micros, DecodeError> {
    match ts {
        None | Some(Node::Static(StaticNode::Null)) => Ok(arrival),
        Some(Node::Static(StaticNode::I64(n))) => timestamp_from_integer(*n),
        Some(Node::Static(StaticNode::U64(n))) => match i64::try_from(*n) {
            Ok(n) => timestamp_from_integer(n),
            // Beyond i64 is past the year 2262 in any unit.
            Err(_) => Err(DecodeError::TimestampOutOfRange {
                value: n.to_string(),
            }),
        },
        Some(Node::Static(StaticNode::F64(f))) => timestamp_from_number(*f),
        Some(Node::String(s)) => timestamp_from_rfc3339(s),
        Some(other) => Err(wrong_type("ts", "a number or an RFC 3339 string", other)),
    }
}

/// Inserts the member keys of the `fields` object at tape index `at` into
/// `fields` at position `pos`: the members take the `fields` key's place in
/// document order, so "last one wins" means the same thing in every form.
fn insert_members(
    tape: &[Node<'_>],
    at: usize,
    pos: usize,
    fields: &mut Vec<usize>,
) -> Result<(), DecodeError> {
    let node = tape.get(at).ok_or_else(malformed_tape)?;
    let &Node::Object { len, .. } = node else {
        return Err(wrong_type("fields", "an object", node));
    };
    let before = fields.len();
    let mut k = at + 1;
    for _ in 0..len {
        fields.push(k);
        k += 1 + span(tape.get(k + 1).ok_or_else(malformed_tape)?);
    }
    let members = fields.len() - before;
    fields[pos..].rotate_right(members);
    Ok(())
}

/// Adds the field whose key is at tape index `k` to `reading`, as a sample
/// (numbers, booleans) or an event (anything else, as compact JSON).
fn add_field(tape: &[Node<'_>], k: usize, reading: &mut Reading) -> Result<(), DecodeError> {
    let name = key_at(tape, k)?;
    check_field_name(name)?;
    let value = tape.get(k + 1).ok_or_else(malformed_tape)?;
    let number = match *value {
        // Precision beyond 2^53 is lost; these are measurements, not ids.
        #[allow(clippy::cast_precision_loss)]
        Node::Static(StaticNode::I64(n)) => n as f64,
        #[allow(clippy::cast_precision_loss)]
        Node::Static(StaticNode::U64(n)) => n as f64,
        Node::Static(StaticNode::F64(f)) => f,
        Node::Static(StaticNode::Bool(b)) => f64::from(u8::from(b)),
        Node::String(s) if spells_non_finite(s) => {
            return Err(DecodeError::NotFinite {
                field: name.to_owned(),
                value: truncate_for_error(s),
            });
        }
        _ => {
            let nodes = tape
                .get(k + 1..k + 1 + span(value))
                .ok_or_else(malformed_tape)?;
            // A NUL in any string (or key) of the value, not the text
            // `\u0000` in the output: an escaped backslash before "u0000"
            // is text that jsonb stores.
            let holds_nul = nodes
                .iter()
                .any(|node| matches!(node, Node::String(s) if s.contains('\0')));
            if holds_nul {
                return Err(DecodeError::NulInEvent {
                    field: truncate_for_error(name),
                });
            }
            let mut body = String::new();
            write_compact(nodes, name, &mut body)?;
            reading.events.push(Event {
                kind: name.to_owned(),
                body,
            });
            return Ok(());
        }
    };
    if !number.is_finite() {
        return Err(DecodeError::NotFinite {
            field: name.to_owned(),
            value: number.to_string(),
        });
    }
    if number.abs() > MAX_SAMPLE_MAGNITUDE {
        return Err(DecodeError::ValueOutOfRange {
            field: truncate_for_error(name),
            value: number,
        });
    }
    reading.samples.push(Sample {
        metric: name.to_owned(),
        value: number,
    });
    Ok(())
}

/// The key string at tape index `k`.
fn key_at<'a>(tape: &[Node<'a>], k: usize) -> Result<&'a str, DecodeError> {
    match tape.get(k) {
        Some(&Node::String(s)) => Ok(s),
        _ => Err(malformed_tape()),
    }
}

/// Removes every field that a later field of the same name overrides, so a
/// record never yields two values for one (device, metric, time), which
/// would break a unique index and with it the whole COPY batch.
fn drop_overridden(tape: &[Node<'_>], fields: &mut Vec<usize>) {
    let key = |k: usize| key_at(tape, k).unwrap_or("");
    let n = fields.len();
    if n <= PAIRWISE_DEDUP_MAX {
        let mut kept = 0;
        for r in 0..n {
            let name = key(fields[r]);
            if !fields[r + 1..].iter().any(|&later| key(later) == name) {
                fields[kept] = fields[r];
                kept += 1;
            }
        }
        fields.truncate(kept);
    } else {
        let mut last: HashMap<&str, usize> = HashMap::with_capacity(n);
        for (pos, &k) in fields.iter().enumerate() {
            last.insert(key(k), pos);
        }
        if last.len() < n {
            let mut pos = 0;
            fields.retain(|&k| {
                pos += 1;
                last.get(key(k)) == Some(&(pos - 1))
            });
        }
    }
}

/// Validates a device or house id (non-empty is checked by the caller, as
/// its error differs) and copies it out.
fn id(key: &'static str, s: &str) -> Result<String, DecodeError> {
    if s.len() > MAX_NAME_BYTES {
        return Err(DecodeError::WrongType {
            key,
            expected: "a string of at most 256 bytes",
            found: format!("a string of {} bytes", s.len()),
        });
    }
    if s.contains('\0') {
        return Err(DecodeError::WrongType {
            key,
            expected: "a string without NUL characters",
            found: "a string containing NUL".to_owned(),
        });
    }
    Ok(s.to_owned())
}

fn check_field_name(name: &str) -> Result<(), DecodeError> {
    let reason = if name.is_empty() {
        "it is empty".to_owned()
    } else if name.len() > MAX_NAME_BYTES {
        format!("it is {} bytes, more than {MAX_NAME_BYTES}", name.len())
    } else if name.contains('\0') {
        "it contains a NUL character, which PostgreSQL text cannot store".to_owned()
    } else {
        return Ok(());
    };
    Err(DecodeError::InvalidFieldName {
        name: truncate_for_error(name),
        reason,
    })
}

fn wrong_type(key: &'static str, expected: &'static str, found: &Node<'_>) -> DecodeError {
    DecodeError::WrongType {
        key,
        expected,
        found: type_name(found).to_owned(),
    }
}

/// True for "NaN", "Infinity", "inf" in any case, optionally signed: a device
/// that printed a float it should not have sent.
fn spells_non_finite(s: &str) -> bool {
    let word = s.strip_prefix(['+', '-']).unwrap_or(s);
    ["nan", "inf", "infinity"]
        .iter()
        .any(|w| word.eq_ignore_ascii_case(w))
}
