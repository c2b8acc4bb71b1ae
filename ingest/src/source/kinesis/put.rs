//! Writing records: PutRecords in chunks within the Kinesis limits, with
//! failed entries retried until every record is accepted.

use std::ops::Range;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use bytes::Bytes;
use tracing::warn;

use super::classify::{from_sdk, kind_of_code};
use super::client::KinesisSource;
use super::error::{Kind, SourceError};
use super::retry::{Patience, kinesis_backoff, retrying};

/// The most records one PutRecords call takes (a Kinesis limit).
pub const MAX_RECORDS_PER_PUT: usize = 500;
/// The most bytes (keys and data) one PutRecords call takes (a Kinesis limit).
pub const MAX_BYTES_PER_PUT: usize = 5 * 1024 * 1024;
/// The most bytes of one record: its data plus its partition key (UTF-8),
/// a Kinesis limit.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
/// The longest partition key, in characters (a Kinesis limit; counted here
/// in UTF-16 code units, as the emulators do, which is never fewer).
pub const MAX_PARTITION_KEY_CHARS: usize = 256;

impl KinesisSource {
    /// Puts `records` (partition key, data) with PutRecords, in chunks of at
    /// most 500 records and 5 MiB, and returns the sequence number of each
    /// record, in input order.
    ///
    /// Entries that Kinesis rejects (throttled, internal failure) and calls
    /// that fail with a retriable error are retried with backoff until all
    /// are accepted, however long that takes: wrap the call in a timeout to
    /// bound it. Returns `Err` only for errors retrying cannot fix (stream
    /// not found, access denied, a record too large: InvalidArgument); the
    /// chunks before the failing one are then already written.
    ///
    /// As with any Kinesis producer: a retried entry lands after the entries
    /// accepted before it, so one partition key's records keep their order
    /// only if none of them is retried; and a call that failed in transit
    /// may have been written, so a record can land twice (at least once).
    pub async fn put_records(
        &self,
        records: &[(String, Bytes)],
    ) -> Result<Vec<String>, SourceError> {
        let sizes: Vec<usize> = records
            .iter()
            .map(|(key, data)| key.len() + data.len())
            .collect();
        let mut sequence_numbers = Vec::with_capacity(records.len());
        for chunk in chunks(&sizes) {
            sequence_numbers.extend(self.put_chunk(&records[chunk]).await?);
        }
        Ok(sequence_numbers)
    }

    /// Puts one chunk (within the limits), retrying failed entries.
    async fn put_chunk(&self, chunk: &[(String, Bytes)]) -> Result<Vec<String>, SourceError> {
        let mut sequence_numbers: Vec<Option<String>> = vec![None; chunk.len()];
        // Indexes into `chunk` of the records not accepted yet.
        let mut pending: Vec<usize> = (0..chunk.len()).collect();
        let mut backoff = kinesis_backoff();
        loop {
            let entries = pending
                .iter()
                .map(|&i| {
                    PutRecordsRequestEntry::builder()
                        .partition_key(&chunk[i].0)
                        .data(Blob::new(chunk[i].1.to_vec()))
                        .build()
                        .map_err(|err| {
                            Kind::InvalidArgument.at(self.call("PutRecords", None), err.to_string())
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let output = retrying(self.retries(), Patience::Forever, || {
                let (name, arn) = self.stream_name_or_arn();
                let request = self
                    .client()
                    .put_records()
                    .set_stream_name(name)
                    .set_stream_arn(arn)
                    .set_records(Some(entries.clone()));
                async move {
                    request
                        .send()
                        .await
                        .map_err(|err| from_sdk(self.call("PutRecords", None), err))
                }
            })
            .await?;
            if output.records.len() != pending.len() {
                let detail = format!(
                    "{} results for {} records",
                    output.records.len(),
                    pending.len()
                );
                return Err(Kind::Unexpected.at(self.call("PutRecords", None), detail));
            }

            let mut failed = Vec::new();
            let mut first_failure = None;
            for (&i, result) in pending.iter().zip(output.records) {
                match (result.sequence_number, result.error_code) {
                    (Some(sequence), None) => sequence_numbers[i] = Some(sequence),
                    (_, code) => {
                        failed.push(i);
                        first_failure.get_or_insert((code, result.error_message));
                    }
                }
            }
            let Some((code, message)) = first_failure else {
                return Ok(sequence_numbers.into_iter().flatten().collect());
            };

            // Entries fail with ProvisionedThroughputExceeded or
            // InternalFailure, both worth retrying; anything else is not.
            let code = code.unwrap_or_default();
            let kind = kind_of_code(&code).unwrap_or(Kind::Unexpected);
            let detail = format!(
                "{} of {} records were not accepted, the first with {code}: {}",
                failed.len(),
                pending.len(),
                message.unwrap_or_default()
            );
            let err = kind.at(self.call("PutRecords", None), detail);
            if !err.is_retriable() {
                return Err(err);
            }
            self.retries().record(&err);
            let delay = backoff.next_delay();
            warn!(
                stream = %self.stream(),
                cause = err.cause(),
                retry_in_ms = delay.as_millis() as u64,
                error = %err,
                "PutRecords entries failed, retrying them"
            );
            tokio::time::sleep(delay).await;
            pending = failed;
        }
    }
}

/// Splits records of these sizes into consecutive chunks of at most 500
/// records and 5 MiB. A record larger than 5 MiB gets a chunk of its own,
/// for Kinesis to reject with a clear message.
fn chunks(sizes: &[usize]) -> Vec<Range<usize>> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, &size) in sizes.iter().enumerate() {
        let full = i - start == MAX_RECORDS_PER_PUT || bytes + size > MAX_BYTES_PER_PUT;
        if full && i > start {
            chunks.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < sizes.len() {
        chunks.push(start..sizes.len());
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    #[test]
    fn chunks_respect_the_record_and_byte_limits() {
        // (record sizes, expected chunks as (start, end) index pairs)
        type Case = (Vec<usize>, Vec<(usize, usize)>);
        let cases: Vec<Case> = vec![
            (vec![], vec![]),
            (vec![10; 3], vec![(0, 3)]),
            (vec![10; 500], vec![(0, 500)]),
            (vec![10; 1201], vec![(0, 500), (500, 1000), (1000, 1201)]),
            (vec![MIB; 12], vec![(0, 5), (5, 10), (10, 12)]),
            (vec![MIB, 4 * MIB, 1], vec![(0, 2), (2, 3)]),
            (vec![1, 6 * MIB, 1], vec![(0, 1), (1, 2), (2, 3)]),
        ];
        for (sizes, expected) in cases {
            let got: Vec<_> = chunks(&sizes).iter().map(|r| (r.start, r.end)).collect();
            assert_eq!(got, expected, "{} sizes", sizes.len());
        }
    }
}
