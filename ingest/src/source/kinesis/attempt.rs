//! One PutRecords call and what became of each of its records, for producers
//! that decide themselves what to retry and for how long (the gateway answers
//! a device within its deadline; `put_records` in `put.rs` retries forever),
//! and one DescribeStreamSummary call that says whether the stream can be
//! reached now (the gateway's health).

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, StreamStatus};
use bytes::Bytes;

use super::classify::{from_sdk, kind_of_code};
use super::client::KinesisSource;
use super::error::{Kind, SourceError};
use super::put::{MAX_BYTES_PER_PUT, MAX_RECORDS_PER_PUT};

/// What Kinesis did with one record of a PutRecords call.
#[derive(Debug)]
pub enum PutEntry {
    /// Written: the record's shard and its sequence number there.
    Accepted {
        /// The shard the partition key hashed to.
        shard_id: String,
        /// The record's position in that shard.
        sequence_number: String,
    },
    /// Not written; the error says whether sending it again may succeed
    /// (throttling and internal failures may, others will not).
    Failed(SourceError),
}

impl KinesisSource {
    /// Puts `records` (partition key, data) with exactly one PutRecords call,
    /// no retry, and returns the outcome of each record in input order.
    ///
    /// `Err` when the call as a whole failed (no record is known to be
    /// written, although a call cut off in transit may have written some):
    /// the error says whether retrying may help. The records must fit one
    /// call: at most [`MAX_RECORDS_PER_PUT`] records and
    /// [`MAX_BYTES_PER_PUT`] bytes of keys and data, or the call is refused
    /// here with `InvalidArgument`.
    pub async fn put_records_once(
        &self,
        records: &[(String, Bytes)],
    ) -> Result<Vec<PutEntry>, SourceError> {
        let call = || self.call("PutRecords", None);
        let bytes: usize = records
            .iter()
            .map(|(key, data)| key.len() + data.len())
            .sum();
        if records.is_empty() || records.len() > MAX_RECORDS_PER_PUT || bytes > MAX_BYTES_PER_PUT {
            let detail = format!(
                "{} records of {bytes} bytes: one call takes 1 to {MAX_RECORDS_PER_PUT} \
                 records of at most {MAX_BYTES_PER_PUT} bytes",
                records.len()
            );
            return Err(Kind::InvalidArgument.at(call(), detail));
        }
        let entries = records
            .iter()
            .map(|(key, data)| {
                PutRecordsRequestEntry::builder()
                    .partition_key(key)
                    .data(Blob::new(data.to_vec()))
                    .build()
                    .map_err(|err| Kind::InvalidArgument.at(call(), err.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (name, arn) = self.stream_name_or_arn();
        let output = self
            .client()
            .put_records()
            .set_stream_name(name)
            .set_stream_arn(arn)
            .set_records(Some(entries))
            .send()
            .await
            .map_err(|err| from_sdk(call(), err))?;
        if output.records.len() != records.len() {
            let detail = format!(
                "{} results for {} records",
                output.records.len(),
                records.len()
            );
            return Err(Kind::Unexpected.at(call(), detail));
        }
        Ok(output
            .records
            .into_iter()
            .map(|result| match (result.sequence_number, result.shard_id) {
                (Some(sequence_number), Some(shard_id)) if result.error_code.is_none() => {
                    PutEntry::Accepted {
                        shard_id,
                        sequence_number,
                    }
                }
                _ => {
                    let code = result.error_code.unwrap_or_default();
                    let kind = kind_of_code(&code).unwrap_or(Kind::Unexpected);
                    let message = result.error_message.unwrap_or_default();
                    PutEntry::Failed(kind.at(call(), format!("{code}: {message}")))
                }
            })
            .collect())
    }

    /// One DescribeStreamSummary call, no retry: `Ok` when the stream can be
    /// reached and is ACTIVE or UPDATING (both take writes), else why not.
    pub async fn probe(&self) -> Result<(), SourceError> {
        let call = || self.call("DescribeStreamSummary", None);
        let (name, arn) = self.stream_name_or_arn();
        let output = self
            .client()
            .describe_stream_summary()
            .set_stream_name(name)
            .set_stream_arn(arn)
            .send()
            .await
            .map_err(|err| from_sdk(call(), err))?;
        let status = output
            .stream_description_summary
            .map(|summary| summary.stream_status);
        match status {
            Some(StreamStatus::Active | StreamStatus::Updating) => Ok(()),
            other => {
                let status = other.as_ref().map_or("unknown", StreamStatus::as_str);
                Err(Kind::ResourceInUse.at(call(), format!("the stream is {status}")))
            }
        }
    }
}
