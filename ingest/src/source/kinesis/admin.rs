//! Stream administration, for `ingest provision`, the loadgen and tests:
//! create, delete, split and merge, each waiting until the stream is ACTIVE.

use std::time::Duration;

use aws_sdk_kinesis::types::StreamStatus;

use super::classify::from_sdk;
use super::client::{CONTROL_PLANE_RETRIES, KinesisSource};
use super::error::{Kind, SourceError};
use super::retry::{Patience, retrying};

/// How long a stream may stay CREATING or UPDATING: AWS takes up to a few
/// minutes; longer means something is wrong on its side.
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(300);
/// The first pause between two status checks; it doubles up to 2 s, so an
/// emulator's instant transitions cost little and AWS's slow ones few calls.
const FIRST_STATUS_POLL: Duration = Duration::from_millis(50);

impl KinesisSource {
    /// Creates the stream with `shards` shards and waits until it is ACTIVE.
    /// Idempotent: an existing stream is fine and kept as it is, whatever
    /// its shard count. Given an ARN, creates the stream its name part names.
    pub async fn ensure_stream(&self, shards: u32) -> Result<(), SourceError> {
        let call = || self.call("CreateStream", None);
        let shard_count = i32::try_from(shards)
            .ok()
            .filter(|count| *count > 0)
            .ok_or_else(|| {
                Kind::InvalidArgument.at(call(), format!("shard count {shards}: must be 1 or more"))
            })?;
        let name = self
            .stream()
            .rsplit_once(":stream/")
            .map_or(self.stream(), |(_, name)| name);
        let created = retrying(
            self.retries(),
            Patience::Retries(CONTROL_PLANE_RETRIES),
            || async {
                match self
                    .client()
                    .create_stream()
                    .stream_name(name)
                    .shard_count(shard_count)
                    .send()
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(err) => match from_sdk(call(), err) {
                        // ResourceInUse from CreateStream: the stream exists.
                        SourceError::ResourceInUse { .. } => Ok(()),
                        err => Err(err),
                    },
                }
            },
        );
        created.await?;
        self.wait_until_active().await
    }

    /// Deletes the stream (and its enhanced fan-out consumers), without
    /// waiting for it to be gone. A stream that does not exist is fine.
    pub async fn delete_stream(&self) -> Result<(), SourceError> {
        let deleted = retrying(
            self.retries(),
            Patience::Retries(CONTROL_PLANE_RETRIES),
            || async {
                let (name, arn) = self.stream_name_or_arn();
                let request = self
                    .client()
                    .delete_stream()
                    .set_stream_name(name)
                    .set_stream_arn(arn);
                match request.enforce_consumer_deletion(true).send().await {
                    Ok(_) => Ok(()),
                    Err(err) => match from_sdk(self.call("DeleteStream", None), err) {
                        SourceError::NotFound { .. } => Ok(()),
                        err => Err(err),
                    },
                }
            },
        );
        deleted.await
    }

    /// Splits an open shard in the middle of its hash-key range into two
    /// children, and waits until the stream is ACTIVE again: the shard is
    /// then closed, and new records go to the children.
    pub async fn split_shard(&self, shard_id: &str) -> Result<(), SourceError> {
        let shards = self.list_shards().await?;
        let call = || self.call("SplitShard", Some(shard_id));
        let shard = shards
            .iter()
            .find(|shard| shard.shard_id == shard_id && shard.is_open())
            .ok_or_else(|| Kind::NotFound.at(call(), "no open shard with this id"))?;
        if shard.ending_hash_key <= shard.starting_hash_key {
            return Err(
                Kind::InvalidArgument.at(call(), "the shard's hash-key range is a single key")
            );
        }
        // The upper child starts just above the middle: two equal halves.
        let middle =
            shard.starting_hash_key + (shard.ending_hash_key - shard.starting_hash_key) / 2 + 1;
        retrying(
            self.retries(),
            Patience::Retries(CONTROL_PLANE_RETRIES),
            || {
                let (name, arn) = self.stream_name_or_arn();
                let request = self
                    .client()
                    .split_shard()
                    .set_stream_name(name)
                    .set_stream_arn(arn)
                    .shard_to_split(shard_id)
                    .new_starting_hash_key(middle.to_string());
                async move {
                    request
                        .send()
                        .await
                        .map(|_| ())
                        .map_err(|err| from_sdk(call(), err))
                }
            },
        )
        .await?;
        self.wait_until_active().await
    }

    /// Merges two open shards with adjacent hash-key ranges into one child,
    /// and waits until the stream is ACTIVE again.
    pub async fn merge_shards(
        &self,
        shard_id: &str,
        adjacent_shard_id: &str,
    ) -> Result<(), SourceError> {
        let call = || self.call("MergeShards", Some(shard_id));
        retrying(
            self.retries(),
            Patience::Retries(CONTROL_PLANE_RETRIES),
            || {
                let (name, arn) = self.stream_name_or_arn();
                let request = self
                    .client()
                    .merge_shards()
                    .set_stream_name(name)
                    .set_stream_arn(arn)
                    .shard_to_merge(shard_id)
                    .adjacent_shard_to_merge(adjacent_shard_id);
                async move {
                    request
                        .send()
                        .await
                        .map(|_| ())
                        .map_err(|err| from_sdk(call(), err))
                }
            },
        )
        .await?;
        self.wait_until_active().await
    }

    /// Polls the stream's status until it is ACTIVE, for at most
    /// [`ACTIVE_TIMEOUT`].
    pub(super) async fn wait_until_active(&self) -> Result<(), SourceError> {
        let call = || self.call("DescribeStreamSummary", None);
        let deadline = tokio::time::Instant::now() + ACTIVE_TIMEOUT;
        let mut pause = FIRST_STATUS_POLL;
        loop {
            let status = retrying(
                self.retries(),
                Patience::Retries(CONTROL_PLANE_RETRIES),
                || {
                    let (name, arn) = self.stream_name_or_arn();
                    let request = self
                        .client()
                        .describe_stream_summary()
                        .set_stream_name(name)
                        .set_stream_arn(arn);
                    async move {
                        let output = request.send().await.map_err(|err| from_sdk(call(), err))?;
                        Ok(output
                            .stream_description_summary
                            .map(|summary| summary.stream_status))
                    }
                },
            )
            .await?;
            if status == Some(StreamStatus::Active) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let status = status.as_ref().map_or("unknown", StreamStatus::as_str);
                let detail = format!("still {status} after {ACTIVE_TIMEOUT:?}, expected ACTIVE");
                return Err(Kind::ResourceInUse.at(call(), detail));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }
}
