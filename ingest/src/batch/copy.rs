//! PostgreSQL's binary COPY format, written straight into `bytes` buffers.
//!
//! A COPY stream is a header, tuples, and a trailer. Tuples are written
//! per shard segment and the header and trailer are added when the batch is
//! sent, so a batch can drop one shard's tuples (a lost lease) and send the
//! rest without re-encoding anything.

use bytes::{BufMut, Bytes, BytesMut};

use crate::decode::Micros;

/// Signature, flags (none) and header-extension length (none).
pub const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// A tuple whose field count is -1 ends the data.
pub const TRAILER: &[u8] = &[0xff, 0xff];

/// Microseconds between the Unix epoch and PostgreSQL's, 2000-01-01.
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// The header, as a shared buffer.
pub fn header() -> Bytes {
    Bytes::from_static(HEADER)
}

/// The trailer, as a shared buffer.
pub fn trailer() -> Bytes {
    Bytes::from_static(TRAILER)
}

/// Appends binary COPY tuples to a buffer, one typed field at a time.
#[derive(Debug)]
pub struct TupleWriter<'a> {
    buf: &'a mut BytesMut,
}

impl<'a> TupleWriter<'a> {
    /// Starts a tuple of `fields` fields in `buf`; the caller writes exactly
    /// that many fields next.
    pub fn start(buf: &'a mut BytesMut, fields: i16) -> Self {
        buf.put_i16(fields);
        TupleWriter { buf }
    }

    pub fn timestamptz(&mut self, unix_micros: Micros) -> &mut Self {
        self.buf.put_i32(8);
        self.buf.put_i64(unix_micros - POSTGRES_EPOCH_MICROS);
        self
    }

    pub fn int4(&mut self, value: i32) -> &mut Self {
        self.buf.put_i32(4);
        self.buf.put_i32(value);
        self
    }

    /// An `int8` value, or NULL (length -1, no bytes).
    pub fn nullable_int8(&mut self, value: Option<i64>) -> &mut Self {
        match value {
            Some(value) => {
                self.buf.put_i32(8);
                self.buf.put_i64(value);
            }
            None => self.buf.put_i32(-1),
        }
        self
    }

    pub fn float8(&mut self, value: f64) -> &mut Self {
        self.buf.put_i32(8);
        self.buf.put_f64(value);
        self
    }

    pub fn text(&mut self, value: &str) -> &mut Self {
        self.bytea(value.as_bytes())
    }

    pub fn bytea(&mut self, value: &[u8]) -> &mut Self {
        self.buf.put_i32(field_len(value.len()));
        self.buf.put_slice(value);
        self
    }

    /// A `jsonb` value: format version 1, then the JSON text.
    pub fn jsonb(&mut self, json: &str) -> &mut Self {
        self.buf.put_i32(field_len(json.len() + 1));
        self.buf.put_u8(1);
        self.buf.put_slice(json.as_bytes());
        self
    }
}

/// A field's length as the format's i32. Records are limited far below 2 GiB
/// by the decoder, so a longer field is a bug, not an input.
fn field_len(len: usize) -> i32 {
    i32::try_from(len).expect("a COPY field longer than 2 GiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_trailer_are_the_documented_bytes() {
        assert_eq!(HEADER.len(), 19);
        assert_eq!(&HEADER[..11], b"PGCOPY\n\xff\r\n\0");
        assert_eq!(TRAILER, (-1i16).to_be_bytes());
    }

    #[test]
    fn fields_are_length_prefixed_big_endian() {
        let mut buf = BytesMut::new();
        TupleWriter::start(&mut buf, 3)
            .timestamptz(POSTGRES_EPOCH_MICROS + 1)
            .int4(7)
            .float8(1.5);
        let mut expected = vec![0, 3];
        expected.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1]);
        expected.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 7]);
        expected.extend_from_slice(&[0, 0, 0, 8]);
        expected.extend_from_slice(&1.5f64.to_be_bytes());
        assert_eq!(&buf[..], &expected[..]);

        let mut buf = BytesMut::new();
        TupleWriter::start(&mut buf, 2)
            .nullable_int8(Some(258))
            .nullable_int8(None);
        assert_eq!(
            &buf[..],
            &[
                0, 2, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 1, 2, 0xff, 0xff, 0xff, 0xff
            ]
        );

        let mut buf = BytesMut::new();
        TupleWriter::start(&mut buf, 2).text("hé").jsonb("{}");
        assert_eq!(
            &buf[..],
            &[
                0, 2, 0, 0, 0, 3, b'h', 0xc3, 0xa9, 0, 0, 0, 3, 1, b'{', b'}'
            ]
        );
    }
}
