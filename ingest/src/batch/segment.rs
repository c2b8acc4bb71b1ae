//! The rows one shard contributes to a batch, and the checkpoint they move.

use std::collections::{BTreeSet, HashSet};

use bytes::{Bytes, BytesMut};

use super::copy::TupleWriter;
use super::series::{SeriesCache, SeriesKey};
use crate::decode::{DecodeError, Reading};

/// One shard's part of a batch: encoded COPY tuples for each table, and the
/// sequence number its checkpoint moves to when the batch commits.
#[derive(Debug)]
pub struct Segment {
    /// The shard whose records these are.
    pub shard_id: String,
    /// The lease counter the worker holds the shard with; the checkpoint
    /// update is fenced by it.
    pub lease_counter: i64,
    /// Sequence number of the last record in this segment: the new checkpoint.
    pub last_sequence: Option<String>,
    /// When the segment ends inside a KPL aggregate: the last user record
    /// of it in the segment (the checkpoint's sub-sequence). None: the
    /// record at `last_sequence` is done whole.
    pub last_sub_sequence: Option<i64>,
    /// The shard was read to its end: the lease is marked ended on commit.
    pub ended: bool,
    /// How far behind the shard's tip the latest records were read.
    pub millis_behind_latest: Option<i64>,
    /// Records taken in (good and dead).
    pub records: usize,
    /// Where each record's tuples end, so that a batch the database refuses
    /// can be split record by record.
    marks: Vec<RecordMark>,
    /// Tuples for telemetry.samples (time, series_id, value).
    samples: BytesMut,
    sample_rows: usize,
    /// The series ids the samples name, checked in the batch's transaction.
    series_ids: HashSet<i32>,
    /// Tuples for telemetry.events (time, house, device, kind, body).
    events: BytesMut,
    event_rows: usize,
    /// Tuples for ingest.dead_letters (stream, shard_id, sequence_number,
    /// sub_sequence, reason_kind, reason, raw).
    dead_letters: BytesMut,
    dead_letter_rows: usize,
}

/// One record of a segment: its sequence number, its raw bytes (for a dead
/// letter, should the database refuse its rows) and where its tuples end.
#[derive(Debug, Clone)]
pub struct RecordMark {
    pub sequence_number: String,
    /// The user record's place in its KPL aggregate; None for a plain record.
    pub sub_sequence: Option<i64>,
    pub raw: Bytes,
    /// Bytes of (samples, events, dead letters) tuples up to and with this record.
    ends: [usize; 3],
    /// Rows of (samples, events, dead letters) up to and with this record.
    rows: [usize; 3],
}

/// A reading named a series the cache does not know: resolve it first.
#[derive(Debug, thiserror::Error)]
#[error("series ({}, {}, {}) has no id yet", .0.house, .0.device, .0.metric)]
pub struct UnknownSeries(pub SeriesKey);

impl Segment {
    pub fn new(shard_id: &str, lease_counter: i64) -> Self {
        Segment {
            shard_id: shard_id.to_string(),
            lease_counter,
            last_sequence: None,
            last_sub_sequence: None,
            ended: false,
            millis_behind_latest: None,
            records: 0,
            marks: Vec::new(),
            samples: BytesMut::new(),
            sample_rows: 0,
            series_ids: HashSet::new(),
            events: BytesMut::new(),
            event_rows: 0,
            dead_letters: BytesMut::new(),
            dead_letter_rows: 0,
        }
    }

    /// Encodes a decoded record. Every series it names must be in `cache`.
    pub fn add_reading(
        &mut self,
        reading: &Reading,
        cache: &mut SeriesCache,
    ) -> Result<(), UnknownSeries> {
        // Look every id up before writing, so a missing one leaves no half-written record.
        let mut ids = Vec::with_capacity(reading.samples.len());
        for sample in &reading.samples {
            match cache.get(&reading.house, &reading.device, &sample.metric) {
                Some(id) => ids.push(id),
                None => {
                    return Err(UnknownSeries(SeriesKey {
                        house: reading.house.clone(),
                        device: reading.device.clone(),
                        metric: sample.metric.clone(),
                    }));
                }
            }
        }
        for (sample, id) in reading.samples.iter().zip(ids) {
            TupleWriter::start(&mut self.samples, 3)
                .timestamptz(reading.time)
                .int4(id)
                .float8(sample.value);
            self.series_ids.insert(id);
        }
        self.sample_rows += reading.samples.len();
        for event in &reading.events {
            TupleWriter::start(&mut self.events, 5)
                .timestamptz(reading.time)
                .text(&reading.house)
                .text(&reading.device)
                .text(&event.kind)
                .jsonb(&event.body);
        }
        self.event_rows += reading.events.len();
        Ok(())
    }

    /// Encodes a record that could not be decoded, with its reason;
    /// `sub_sequence` names a user record inside a KPL aggregate.
    pub fn add_dead_letter(
        &mut self,
        stream: &str,
        sequence_number: &str,
        sub_sequence: Option<i64>,
        error: &DecodeError,
        raw: &[u8],
    ) {
        self.add_refused(
            stream,
            sequence_number,
            sub_sequence,
            error.kind(),
            &error.to_string(),
            raw,
        );
    }

    /// Encodes a record refused for a reason other than its decoding (e.g. a
    /// device over its new-series limit): `kind` is the short label.
    pub fn add_refused(
        &mut self,
        stream: &str,
        sequence_number: &str,
        sub_sequence: Option<i64>,
        kind: &str,
        reason: &str,
        raw: &[u8],
    ) {
        encode_dead_letter(
            &mut self.dead_letters,
            DeadLetterKey {
                stream,
                shard_id: &self.shard_id,
                sequence_number,
                sub_sequence,
            },
            kind,
            reason,
            raw,
        );
        self.dead_letter_rows += 1;
    }

    /// Moves the segment's checkpoint to the record just added (whose bytes
    /// were `raw`) and marks where its tuples end. `sub_sequence` names a
    /// user record of a KPL aggregate; the checkpoint keeps it unless the
    /// record `ends_record` (then the Kinesis record is done whole).
    pub fn advance(
        &mut self,
        sequence_number: &str,
        sub_sequence: Option<i64>,
        ends_record: bool,
        raw: &Bytes,
    ) {
        self.records += 1;
        self.last_sequence = Some(sequence_number.to_string());
        self.last_sub_sequence = if ends_record { None } else { sub_sequence };
        self.marks.push(RecordMark {
            sequence_number: sequence_number.to_string(),
            sub_sequence,
            raw: raw.clone(),
            ends: [
                self.samples.len(),
                self.events.len(),
                self.dead_letters.len(),
            ],
            rows: [self.sample_rows, self.event_rows, self.dead_letter_rows],
        });
    }

    /// Rows in each table: (samples, events, dead letters).
    pub fn rows(&self) -> (usize, usize, usize) {
        (self.sample_rows, self.event_rows, self.dead_letter_rows)
    }

    /// Encoded size, for the flush policy.
    pub fn bytes(&self) -> usize {
        self.samples.len() + self.events.len() + self.dead_letters.len()
    }

    /// Ends the segment: its tuples frozen, so that a retried transaction
    /// resends them without copying.
    pub fn seal(self) -> SealedSegment {
        let rows = self.rows();
        SealedSegment {
            shard_id: self.shard_id,
            lease_counter: self.lease_counter,
            last_sequence: self.last_sequence,
            last_sub_sequence: self.last_sub_sequence,
            ended: self.ended,
            millis_behind_latest: self.millis_behind_latest,
            records: self.records,
            rows,
            marks: self.marks,
            samples: self.samples.freeze(),
            series_ids: self.series_ids.into_iter().collect(),
            events: self.events.freeze(),
            dead_letters: self.dead_letters.freeze(),
        }
    }
}

/// A segment ready to be written: its tuples can no longer grow.
#[derive(Debug, Clone)]
pub struct SealedSegment {
    /// The shard whose records these are.
    pub shard_id: String,
    /// The lease counter the checkpoint update is fenced by.
    pub lease_counter: i64,
    /// The new checkpoint; None when the segment only marks the end of the shard.
    pub last_sequence: Option<String>,
    /// The checkpoint's sub-sequence: set when it is inside a KPL aggregate.
    pub last_sub_sequence: Option<i64>,
    /// Mark the lease ended on commit.
    pub ended: bool,
    /// Recorded with the checkpoint, for `ingest status`.
    pub millis_behind_latest: Option<i64>,
    /// Records in the segment.
    pub records: usize,
    /// Rows in (samples, events, dead letters).
    pub rows: (usize, usize, usize),
    /// Tuples for telemetry.samples.
    pub samples: Bytes,
    /// Every series id the samples name, each once.
    pub series_ids: Vec<i32>,
    /// Tuples for telemetry.events.
    pub events: Bytes,
    /// Tuples for ingest.dead_letters.
    pub dead_letters: Bytes,
    /// The records, in sequence order, and where their tuples end.
    pub marks: Vec<RecordMark>,
}

/// The tuples of some consecutive records of a segment, one buffer per table.
#[derive(Debug, Clone, Default)]
pub struct RecordTuples {
    pub samples: Bytes,
    pub events: Bytes,
    pub dead_letters: Bytes,
    /// Rows in (samples, events, dead letters).
    pub rows: (usize, usize, usize),
}

impl SealedSegment {
    /// The tuples of records `range` (indexes into `marks`), sliced
    /// from the segment's buffers without copying.
    pub fn tuples(&self, range: std::ops::Range<usize>) -> RecordTuples {
        let before = |i: usize| -> ([usize; 3], [usize; 3]) {
            match i.checked_sub(1) {
                Some(previous) => (self.marks[previous].ends, self.marks[previous].rows),
                None => ([0; 3], [0; 3]),
            }
        };
        let (start, rows_before) = before(range.start);
        let (end, rows_through) = before(range.end);
        RecordTuples {
            samples: self.samples.slice(start[0]..end[0]),
            events: self.events.slice(start[1]..end[1]),
            dead_letters: self.dead_letters.slice(start[2]..end[2]),
            rows: (
                rows_through[0] - rows_before[0],
                rows_through[1] - rows_before[1],
                rows_through[2] - rows_before[2],
            ),
        }
    }
}

/// Which record a dead letter is: the shard's record and, for a user record
/// of a KPL aggregate, its sub-sequence.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetterKey<'a> {
    pub stream: &'a str,
    pub shard_id: &'a str,
    pub sequence_number: &'a str,
    pub sub_sequence: Option<i64>,
}

/// Appends one ingest.dead_letters tuple (stream, shard_id, sequence_number,
/// sub_sequence, reason_kind, reason, raw) to `buf`.
pub fn encode_dead_letter(
    buf: &mut BytesMut,
    key: DeadLetterKey<'_>,
    kind: &str,
    reason: &str,
    raw: &[u8],
) {
    TupleWriter::start(buf, 7)
        .text(key.stream)
        .text(key.shard_id)
        .text(key.sequence_number)
        .nullable_int8(key.sub_sequence)
        .text(kind)
        .text(reason)
        .bytea(raw);
}

/// The series named by `readings` that `cache` does not know, each once, in
/// key order (so concurrent workers create them in the same order).
pub fn missing_series<'a>(
    readings: impl IntoIterator<Item = &'a Reading>,
    cache: &mut SeriesCache,
) -> Vec<SeriesKey> {
    let mut missing = BTreeSet::new();
    for reading in readings {
        for sample in &reading.samples {
            if cache
                .lookup(&reading.house, &reading.device, &sample.metric)
                .is_none()
            {
                missing.insert(SeriesKey {
                    house: reading.house.clone(),
                    device: reading.device.clone(),
                    metric: sample.metric.clone(),
                });
            }
        }
    }
    missing.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Event, Sample};

    fn reading(device: &str, metrics: &[&str]) -> Reading {
        Reading {
            device: device.into(),
            house: "h".into(),
            time: 1_763_900_000_000_000,
            samples: metrics
                .iter()
                .map(|m| Sample {
                    metric: (*m).into(),
                    value: 1.0,
                })
                .collect(),
            events: vec![Event {
                kind: "state".into(),
                body: "\"on\"".into(),
            }],
        }
    }

    #[test]
    fn a_reading_with_an_unknown_series_writes_nothing() {
        let mut cache = SeriesCache::default();
        let mut segment = Segment::new("shard-0", 1);
        let r = reading("d1", &["a", "b"]);
        assert_eq!(missing_series([&r, &r], &mut cache).len(), 2);
        let key = SeriesKey {
            house: "h".into(),
            device: "d1".into(),
            metric: "a".into(),
        };
        cache.insert(&key, 10);
        assert!(segment.add_reading(&r, &mut cache).is_err());
        assert_eq!((segment.rows(), segment.bytes()), ((0, 0, 0), 0));

        cache.insert(
            &SeriesKey {
                metric: "b".into(),
                ..key
            },
            11,
        );
        assert!(missing_series([&r], &mut cache).is_empty());
        segment.add_reading(&r, &mut cache).unwrap();
        segment.advance("42", None, true, &Bytes::from_static(b"raw"));
        assert_eq!(segment.rows(), (2, 1, 0));
        assert_eq!(segment.last_sequence.as_deref(), Some("42"));
        // Two samples of 2 + 3 * 4 + 8 + 4 + 8 bytes.
        let sealed = segment.seal();
        assert_eq!(sealed.samples.len(), 2 * 34);
        assert!(!sealed.events.is_empty() && sealed.dead_letters.is_empty());
        assert_eq!((sealed.rows, sealed.records), ((2, 1, 0), 1));
    }

    #[test]
    fn a_range_of_records_gives_exactly_their_tuples() {
        let mut cache = SeriesCache::default();
        for (metric, id) in [("a", 1), ("b", 2)] {
            let key = SeriesKey {
                house: "h".into(),
                device: "d1".into(),
                metric: metric.into(),
            };
            cache.insert(&key, id);
        }
        let mut segment = Segment::new("shard-0", 1);
        segment
            .add_reading(&reading("d1", &["a"]), &mut cache)
            .unwrap();
        segment.advance("1", None, true, &Bytes::from_static(b"one"));
        segment.add_dead_letter("s", "2", None, &DecodeError::NoFields, b"two");
        segment.advance("2", None, true, &Bytes::from_static(b"two"));
        segment
            .add_reading(&reading("d1", &["a", "b"]), &mut cache)
            .unwrap();
        segment.advance("3", None, true, &Bytes::from_static(b"three"));
        let sealed = segment.seal();

        let marks: Vec<(&str, &[u8])> = sealed
            .marks
            .iter()
            .map(|m| (m.sequence_number.as_str(), &m.raw[..]))
            .collect();
        assert_eq!(marks, [("1", &b"one"[..]), ("2", b"two"), ("3", b"three")]);
        let all = sealed.tuples(0..3);
        assert_eq!(all.rows, sealed.rows);
        assert_eq!(
            (all.samples, all.events, all.dead_letters),
            (
                sealed.samples.clone(),
                sealed.events.clone(),
                sealed.dead_letters.clone()
            )
        );
        let second = sealed.tuples(1..2);
        assert_eq!(second.rows, (0, 0, 1));
        assert_eq!(second.dead_letters, sealed.dead_letters);
        assert!(second.samples.is_empty() && second.events.is_empty());
        let third = sealed.tuples(2..3);
        assert_eq!(third.rows, (2, 1, 0));
        assert_eq!(third.samples, sealed.samples.slice(34..));
        let first = sealed.tuples(0..1);
        assert_eq!(first.rows, (1, 1, 0));
        let mut joined = first.events.to_vec();
        joined.extend_from_slice(&third.events);
        assert_eq!(joined, sealed.events.to_vec(), "ranges meet exactly");
        assert_eq!(sealed.tuples(1..1).rows, (0, 0, 0));
    }

    #[test]
    fn missing_series_are_sorted_and_unique() {
        let mut cache = SeriesCache::default();
        let keys = missing_series(
            [&reading("d2", &["z", "a"]), &reading("d1", &["a"])],
            &mut cache,
        );
        let names: Vec<String> = keys
            .iter()
            .map(|k| format!("{}.{}", k.device, k.metric))
            .collect();
        assert_eq!(names, ["d1.a", "d2.a", "d2.z"]);
    }
}
