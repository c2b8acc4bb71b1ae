//! `PutRecordBatch` to a Firehose delivery stream, chunked to Firehose's
//! limits, retrying failed entries until all are accepted.
//!
//! Lines are packed into Firehose records of up to 1,000 KiB: Firehose
//! writes records to S3 back to back, so the objects hold the same lines
//! either way, but it bills each record as at least 5 KB and a call takes
//! at most 500 records, so one 150-byte message per record would cost 30
//! times as much and take many more calls.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_firehose::Client;
use aws_sdk_firehose::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_firehose::primitives::Blob;
use aws_sdk_firehose::types::Record;
use bytes::Bytes;

use crate::backoff::Backoff;
use crate::metrics as m;

/// Records per PutRecordBatch call, at most.
const MAX_RECORDS_PER_CALL: usize = 500;
/// Bytes per PutRecordBatch call, at most.
const MAX_BYTES_PER_CALL: usize = 4 * 1024 * 1024;
/// Bytes per Firehose record, at most (1,000 KiB).
pub const MAX_RECORD_BYTES: usize = 1_000 * 1024;

/// Could not set the archive up.
#[derive(Debug, thiserror::Error)]
#[error("archive to delivery stream {delivery_stream}: {reason}")]
pub struct ArchiveError {
    pub delivery_stream: String,
    pub reason: String,
}

/// A delivery stream to archive raw records to.
#[derive(Debug, Clone)]
pub struct Archive {
    client: Client,
    delivery_stream: String,
}

impl Archive {
    /// The archive on `delivery_stream`, with the standard AWS configuration
    /// (`AWS_ENDPOINT_URL_FIREHOSE` or `AWS_ENDPOINT_URL` for an emulator).
    /// Fails fast without a region or credentials.
    pub async fn from_env(delivery_stream: &str) -> Result<Archive, ArchiveError> {
        let error = |reason: String| ArchiveError {
            delivery_stream: delivery_stream.to_string(),
            reason,
        };
        let shared = aws_config::load_defaults(BehaviorVersion::latest()).await;
        if shared.region().is_none() {
            return Err(error("no AWS region is configured (set AWS_REGION)".into()));
        }
        if let Some(credentials) = shared.credentials_provider() {
            use aws_credential_types::provider::ProvideCredentials;
            credentials
                .provide_credentials()
                .await
                .map_err(|e| error(format!("no AWS credentials: {}", DisplayErrorContext(&e))))?;
        }
        // Our retries, not the SDK's, so that each is logged and counted.
        let config = aws_sdk_firehose::config::Builder::from(&shared)
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_attempt_timeout(Duration::from_secs(30))
                    .build(),
            )
            .build();
        Ok(Archive {
            client: Client::from_conf(config),
            delivery_stream: delivery_stream.to_string(),
        })
    }

    pub fn delivery_stream(&self) -> &str {
        &self.delivery_stream
    }

    /// Archives `records`, each as one line: its bytes and a newline, so
    /// that an object splits back into records. A newline inside a record is
    /// written as a space (in JSON it can only be whitespace). Returns once
    /// every record was accepted, retrying throttling and outages with
    /// backoff for as long as it takes: the caller's shard waits, nothing is
    /// dropped. A record over Firehose's 1,000 KiB limit cannot be archived;
    /// it is counted and logged (its bytes are kept whole in the dead letters,
    /// since the decoder refuses records that large).
    pub async fn put(&self, records: &[Bytes]) {
        let mut lines = Vec::with_capacity(records.len());
        for record in records {
            if record.len() + 1 > MAX_RECORD_BYTES {
                metrics::counter!(m::ARCHIVE_SKIPPED).increment(1);
                tracing::warn!(
                    bytes = record.len(),
                    "record too large for Firehose; not archived"
                );
                continue;
            }
            lines.push(line(record));
        }
        let packed = pack(&lines);
        for chunk in chunks(&packed) {
            self.put_chunk(chunk).await;
        }
    }

    /// One call's worth of packed records, until every one is accepted.
    async fn put_chunk(&self, records: &[Packed]) {
        let mut pending: Vec<Packed> = records.to_vec();
        let mut backoff = Backoff::default();
        while !pending.is_empty() {
            let entries: Vec<Record> = pending
                .iter()
                .map(|packed| {
                    Record::builder()
                        .data(Blob::new(packed.data.to_vec()))
                        .build()
                        .expect("data is set")
                })
                .collect();
            let sent = self
                .client
                .put_record_batch()
                .delivery_stream_name(&self.delivery_stream)
                .set_records(Some(entries))
                .send()
                .await;
            let cause = match sent {
                Ok(output) => {
                    let responses = output.request_responses();
                    let errors: Vec<Option<&str>> =
                        responses.iter().map(|r| r.error_code()).collect();
                    let failed = failed_entries(pending.len(), output.failed_put_count(), &errors);
                    let (mut accepted_lines, mut accepted_bytes) = (0, 0);
                    let mut index = 0;
                    pending.retain(|packed| {
                        let keep = failed[index];
                        index += 1;
                        if !keep {
                            accepted_lines += packed.lines;
                            accepted_bytes += packed.data.len();
                        }
                        keep
                    });
                    metrics::counter!(m::ARCHIVE_RECORDS).increment(accepted_lines as u64);
                    metrics::counter!(m::ARCHIVE_BYTES).increment(accepted_bytes as u64);
                    if pending.is_empty() {
                        return;
                    }
                    let first_error = errors.iter().flatten().next().unwrap_or(&"unknown");
                    format!(
                        "{} entries failed ({first_error}; FailedPutCount {})",
                        pending.len(),
                        output.failed_put_count()
                    )
                }
                Err(error) => match error.code() {
                    Some(code) => format!("{code}: {}", error.message().unwrap_or_default()),
                    None => DisplayErrorContext(&error).to_string(),
                },
            };
            let delay = backoff.next_delay();
            tracing::warn!(delivery_stream = %self.delivery_stream, %cause, retry_in = ?delay, "archive not accepted; retrying");
            metrics::counter!(m::RETRIES, "cause" => "archive").increment(1);
            tokio::time::sleep(delay).await;
        }
    }
}

/// One Firehose record: whole lines, back to back.
#[derive(Debug, Clone, PartialEq)]
struct Packed {
    data: Bytes,
    /// The lines (user records) in it.
    lines: usize,
}

/// `lines` packed in order into records of at most [`MAX_RECORD_BYTES`]
/// (each line fits in one: longer ones were left out before).
fn pack(lines: &[Bytes]) -> Vec<Packed> {
    let mut packed = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    let mut close = |start: usize, end: usize, bytes: usize| {
        let mut data = Vec::with_capacity(bytes);
        for line in &lines[start..end] {
            data.extend_from_slice(line);
        }
        packed.push(Packed {
            data: Bytes::from(data),
            lines: end - start,
        });
    };
    for (i, line) in lines.iter().enumerate() {
        if i > start && bytes + line.len() > MAX_RECORD_BYTES {
            close(start, i, bytes);
            (start, bytes) = (i, 0);
        }
        bytes += line.len();
    }
    if start < lines.len() {
        close(start, lines.len(), bytes);
    }
    packed
}

/// Which of the `sent` entries failed, from PutRecordBatch's answer. The
/// per-record responses decide, in order, one per entry sent: they name each
/// failure, while `FailedPutCount` is only a total (and one that disagrees
/// with them, or exceeds what was sent, is not trusted). Without one response
/// per entry the count alone can say only whether some failed, not which:
/// then every entry is resent (the archive is at least once, never lossy).
fn failed_entries(sent: usize, failed_put_count: i32, errors: &[Option<&str>]) -> Vec<bool> {
    if errors.len() == sent {
        return errors.iter().map(Option::is_some).collect();
    }
    let any_failed = failed_put_count != 0 || errors.iter().any(Option::is_some);
    vec![any_failed; sent]
}

/// A record as one archive line: newlines inside become spaces, one ends it.
fn line(record: &Bytes) -> Bytes {
    let mut line = Vec::with_capacity(record.len() + 1);
    line.extend(record.iter().map(|&b| if b == b'\n' { b' ' } else { b }));
    line.push(b'\n');
    Bytes::from(line)
}

/// `records` cut into runs within Firehose's per-call limits.
fn chunks(records: &[Packed]) -> Vec<&[Packed]> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, record) in records.iter().enumerate() {
        let len = record.data.len();
        if i > start && (i - start == MAX_RECORDS_PER_CALL || bytes + len > MAX_BYTES_PER_CALL) {
            chunks.push(&records[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += len;
    }
    if start < records.len() {
        chunks.push(&records[start..]);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_end_in_one_newline_and_hold_none_inside() {
        assert_eq!(
            line(&Bytes::from_static(b"{\"a\":\n1}")),
            Bytes::from_static(b"{\"a\": 1}\n")
        );
    }

    #[test]
    fn the_per_record_responses_decide_which_entries_failed() {
        let ok = None;
        let throttled = Some("ServiceUnavailableException");
        // A count larger than what was sent (an emulator's, or a wrong one):
        // no underflow, the responses say which one failed.
        assert_eq!(
            failed_entries(3, 7, &[ok, throttled, ok]),
            [false, true, false]
        );
        // A count of 0 with a failure in the responses: the failure is resent.
        assert_eq!(failed_entries(2, 0, &[throttled, ok]), [true, false]);
        assert_eq!(failed_entries(2, 0, &[ok, ok]), [false, false]);
        // No response per entry: which failed is unknown, so all are resent.
        assert_eq!(failed_entries(3, 1, &[]), [true, true, true]);
        assert_eq!(failed_entries(2, 5, &[throttled]), [true, true]);
        assert_eq!(failed_entries(2, 0, &[]), [false, false]);
        assert_eq!(failed_entries(2, -1, &[ok, ok]), [false, false]);
    }

    #[test]
    fn lines_are_packed_whole_and_in_order_within_the_record_limit() {
        let lines: Vec<Bytes> = (0..3_000)
            .map(|i| Bytes::from(format!("{{\"n\":{i}}}\n")))
            .collect();
        let packed = pack(&lines);
        assert_eq!(packed.len(), 1, "30 KB is one record");
        assert_eq!(packed[0].lines, 3_000);
        assert_eq!(packed[0].data, lines.concat());

        // 600 KB lines: one per record, since two would pass 1,000 KiB.
        let big: Vec<Bytes> = (0..3).map(|_| Bytes::from(vec![b'x'; 600_000])).collect();
        let packed = pack(&big);
        assert_eq!(
            packed.iter().map(|p| p.lines).collect::<Vec<_>>(),
            [1, 1, 1]
        );
        // A record fills up to exactly the limit, and no further.
        let exact = vec![
            Bytes::from(vec![b'a'; MAX_RECORD_BYTES - 10]),
            Bytes::from(vec![b'b'; 10]),
            Bytes::from(vec![b'c'; 1]),
        ];
        let packed = pack(&exact);
        assert_eq!(packed.iter().map(|p| p.lines).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(packed[0].data.len(), MAX_RECORD_BYTES);
        assert_eq!(
            packed
                .iter()
                .map(|p| p.data.clone())
                .collect::<Vec<_>>()
                .concat(),
            exact.concat(),
            "the same bytes in the same order"
        );
        assert!(pack(&[]).is_empty());
    }

    #[test]
    fn chunks_keep_to_the_record_and_byte_limits() {
        let record = |len: usize| Packed {
            data: Bytes::from(vec![b'x'; len]),
            lines: 1,
        };
        let small: Vec<Packed> = (0..1_201).map(|_| record(2)).collect();
        let sizes: Vec<usize> = chunks(&small).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [500, 500, 201]);

        let big: Vec<Packed> = (0..9).map(|_| record(1_000_000)).collect();
        let sizes: Vec<usize> = chunks(&big).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [4, 4, 1], "4 MB per call at most");
        assert!(chunks(&[]).is_empty());
    }
}
