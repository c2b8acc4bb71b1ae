//! `PutRecordBatch` to a Firehose delivery stream, chunked to Firehose's
//! limits, retrying failed entries until all are accepted.

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
        for chunk in chunks(&lines) {
            self.put_chunk(chunk).await;
        }
    }

    /// One call's worth of lines, until every one is accepted.
    async fn put_chunk(&self, lines: &[Bytes]) {
        let mut pending: Vec<Bytes> = lines.to_vec();
        let mut backoff = Backoff::default();
        while !pending.is_empty() {
            let entries: Vec<Record> = pending
                .iter()
                .map(|data| {
                    Record::builder()
                        .data(Blob::new(data.to_vec()))
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
                    let mut accepted_bytes = 0;
                    let mut index = 0;
                    pending.retain(|data| {
                        let keep = failed[index];
                        index += 1;
                        if !keep {
                            accepted_bytes += data.len();
                        }
                        keep
                    });
                    let accepted = failed.len() - pending.len();
                    metrics::counter!(m::ARCHIVE_RECORDS).increment(accepted as u64);
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

/// `lines` cut into runs within Firehose's per-call limits.
fn chunks(lines: &[Bytes]) -> Vec<&[Bytes]> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, line) in lines.iter().enumerate() {
        if i > start
            && (i - start == MAX_RECORDS_PER_CALL || bytes + line.len() > MAX_BYTES_PER_CALL)
        {
            chunks.push(&lines[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += line.len();
    }
    if start < lines.len() {
        chunks.push(&lines[start..]);
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
    fn chunks_keep_to_the_record_and_byte_limits() {
        let small: Vec<Bytes> = (0..1_201).map(|_| Bytes::from_static(b"x\n")).collect();
        let sizes: Vec<usize> = chunks(&small).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [500, 500, 201]);

        let big: Vec<Bytes> = (0..9).map(|_| Bytes::from(vec![b'x'; 1_000_000])).collect();
        let sizes: Vec<usize> = chunks(&big).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [4, 4, 1], "4 MB per call at most");
        assert!(chunks(&[]).is_empty());
    }
}
