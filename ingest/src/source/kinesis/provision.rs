//! The stream as `ingest provision` sees it: described, or created with a
//! given capacity (provisioned shards or on-demand), idempotently.

use std::time::SystemTime;

use aws_sdk_kinesis::types::{StreamMode, StreamModeDetails};

use super::classify::from_sdk;
use super::client::{CONTROL_PLANE_RETRIES, KinesisSource};
use super::error::{Kind, SourceError};
use super::retry::{Patience, retrying};

/// How a stream's write capacity is bought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamCapacity {
    /// A fixed number of shards, each 1 MB/s or 1,000 records/s of writes.
    Provisioned {
        /// The shard count asked for.
        shards: u32,
    },
    /// Kinesis scales the shards with the traffic (AWS starts with 4).
    OnDemand,
}

/// A stream as DescribeStreamSummary reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamDescription {
    /// The stream's name.
    pub name: String,
    /// The stream's ARN: what IAM policies and the IoT rule refer to.
    pub arn: String,
    /// ACTIVE, CREATING, UPDATING or DELETING.
    pub status: String,
    /// The capacity mode; an emulator that does not report one is provisioned.
    pub on_demand: bool,
    /// Shards that take writes now.
    pub open_shards: u32,
    /// How long records are kept.
    pub retention_hours: u32,
    /// When the stream was created: with the ARN, what tells a stream from
    /// an older one of the same name.
    pub created_at: SystemTime,
}

/// What [`KinesisSource::ensure_stream_with`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnsuredStream {
    /// True when this call created the stream; false when it existed.
    pub created: bool,
    /// The stream as it is now (ACTIVE).
    pub description: StreamDescription,
}

impl KinesisSource {
    /// The stream's description, or `None` when it does not exist.
    pub async fn describe_stream(&self) -> Result<Option<StreamDescription>, SourceError> {
        let call = || self.call("DescribeStreamSummary", None);
        let described = retrying(
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
                    match request.send().await {
                        Ok(output) => Ok(output.stream_description_summary),
                        Err(err) => match from_sdk(call(), err) {
                            SourceError::NotFound { .. } => Ok(None),
                            err => Err(err),
                        },
                    }
                }
            },
        )
        .await?;
        Ok(described.map(|summary| StreamDescription {
            on_demand: summary
                .stream_mode_details()
                .is_some_and(|details| details.stream_mode() == &StreamMode::OnDemand),
            open_shards: u32::try_from(summary.open_shard_count()).unwrap_or(0),
            retention_hours: u32::try_from(summary.retention_period_hours()).unwrap_or(0),
            status: summary.stream_status().as_str().to_owned(),
            created_at: SystemTime::try_from(summary.stream_creation_timestamp)
                .unwrap_or(SystemTime::UNIX_EPOCH),
            name: summary.stream_name,
            arn: summary.stream_arn,
        }))
    }

    /// Creates the stream with `capacity` unless it exists, waits until it
    /// is ACTIVE, and describes it. An existing stream is left as it is,
    /// whatever its capacity: resharding is a decision for a person
    /// (UpdateShardCount), not a side effect of provisioning.
    ///
    /// Given an ARN, creates the stream its name part names.
    pub async fn ensure_stream_with(
        &self,
        capacity: StreamCapacity,
    ) -> Result<EnsuredStream, SourceError> {
        let call = || self.call("CreateStream", None);
        let created = match self.describe_stream().await? {
            Some(_) => false,
            None => {
                let name = self
                    .stream()
                    .rsplit_once(":stream/")
                    .map_or(self.stream(), |(_, name)| name);
                let shard_count = match capacity {
                    StreamCapacity::Provisioned { shards } => Some(
                        i32::try_from(shards)
                            .ok()
                            .filter(|count| *count > 0)
                            .ok_or_else(|| {
                                Kind::InvalidArgument
                                    .at(call(), format!("shard count {shards}: must be 1 or more"))
                            })?,
                    ),
                    StreamCapacity::OnDemand => None,
                };
                // Provisioned is the default mode: the details are sent only
                // for on-demand, so that emulators that know no modes work.
                let details = match capacity {
                    StreamCapacity::Provisioned { .. } => None,
                    StreamCapacity::OnDemand => Some(
                        StreamModeDetails::builder()
                            .stream_mode(StreamMode::OnDemand)
                            .build()
                            .map_err(|err| Kind::InvalidArgument.at(call(), err.to_string()))?,
                    ),
                };
                retrying(
                    self.retries(),
                    Patience::Retries(CONTROL_PLANE_RETRIES),
                    || {
                        let request = self
                            .client()
                            .create_stream()
                            .stream_name(name)
                            .set_shard_count(shard_count)
                            .set_stream_mode_details(details.clone());
                        async move {
                            match request.send().await {
                                Ok(_) => Ok(true),
                                Err(err) => match from_sdk(call(), err) {
                                    // Someone else created it a moment ago.
                                    SourceError::ResourceInUse { .. } => Ok(false),
                                    err => Err(err),
                                },
                            }
                        }
                    },
                )
                .await?
            }
        };
        self.wait_until_active().await?;
        let description = self.describe_stream().await?.ok_or_else(|| {
            Kind::NotFound.at(
                self.call("DescribeStreamSummary", None),
                "the stream was deleted while it was being provisioned",
            )
        })?;
        Ok(EnsuredStream {
            created,
            description,
        })
    }
}
