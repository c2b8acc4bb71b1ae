//! Enhanced fan-out: a registered stream consumer has each shard's records
//! pushed to it over an event stream (SubscribeToShard), with 2 MB/s per
//! shard of its own, instead of polling GetRecords (5 calls/s per shard,
//! shared by every consumer), so records arrive as soon as they are put.
//!
//! A subscription lasts at most 5 minutes; the reader subscribes again
//! after the last record it returned, as it does after an error, so that
//! nothing is skipped or returned twice. Leases and checkpoints are the
//! same as for polling: only how records are fetched differs.
//!
//! A closed shard's last event names its child shards; a subscription that
//! never does (kinesis-mock's) would keep the children unread, so a
//! caught-up reader also asks every 10 s, with one GetRecords after its
//! last record, whether the shard ended.

use std::fmt;
use std::time::Duration;

use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::primitives::event_stream::EventReceiver;
use aws_sdk_kinesis::types::error::SubscribeToShardEventStreamError;
use aws_sdk_kinesis::types::{
    ConsumerStatus, ShardIteratorType, StartingPosition, SubscribeToShardEventStream,
};
use tokio::time::Instant;
use tracing::debug;

use super::classify::{from_sdk, kind_of_service_error};
use super::client::{CONTROL_PLANE_RETRIES, KinesisSource};
use super::error::{Kind, SourceError};
use super::reader::resume_point;
use super::record::{Fetched, StartPosition, from_sdk_record};
use super::retry::{Patience, RetryCounts, kinesis_backoff, retrying, wait_before_retry};
use crate::backoff::Backoff;

/// Kinesis ends a subscription after 5 minutes; the reader ends its own
/// then too, should the service not.
pub const SUBSCRIPTION_LIFETIME: Duration = Duration::from_secs(300);

/// How often a caught-up subscription asks whether its shard ended (see
/// [`FanoutReader::read_to_end`]).
const END_CHECK_EVERY: Duration = Duration::from_secs(10);

/// How long a new consumer may take to become ACTIVE.
const REGISTER_WITHIN: Duration = Duration::from_secs(60);

type Events = EventReceiver<SubscribeToShardEventStream, SubscribeToShardEventStreamError>;

impl KinesisSource {
    /// Registers `name` as an enhanced fan-out consumer of the stream, or
    /// finds it registered already (every worker registers the same name),
    /// and waits until it is ACTIVE; returns its ARN. Each call is retried
    /// through throttling (RegisterStreamConsumer allows 5 a second per
    /// account, shared by a whole fleet starting at once) and network
    /// errors; a consumer being deleted is registered again once it is gone.
    pub async fn register_consumer(&self, name: &str) -> Result<String, SourceError> {
        let stream_arn = self.stream_arn().await?;
        let deadline = Instant::now() + REGISTER_WITHIN;
        let mut registered = false;
        loop {
            if !registered {
                self.register_once(&stream_arn, name).await?;
                registered = true;
            }
            match self.consumer_status(&stream_arn, name).await? {
                Some((ConsumerStatus::Active, arn)) => return Ok(arn),
                // Gone, or going: register it again once it is gone.
                None | Some((ConsumerStatus::Deleting, _)) => registered = false,
                Some(_) => {}
            }
            if Instant::now() > deadline {
                return Err(Kind::Unexpected.at(
                    self.call("RegisterStreamConsumer", None),
                    format!("the consumer {name} is not ACTIVE after {REGISTER_WITHIN:?}"),
                ));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// RegisterStreamConsumer, retried; a consumer of that name existing
    /// already (ResourceInUse) is success.
    async fn register_once(&self, stream_arn: &str, name: &str) -> Result<(), SourceError> {
        retrying(
            self.retries(),
            Patience::Retries(CONTROL_PLANE_RETRIES),
            || async {
                match self
                    .client()
                    .register_stream_consumer()
                    .stream_arn(stream_arn)
                    .consumer_name(name)
                    .send()
                    .await
                {
                    Ok(_) => debug!(consumer = name, "registered the fan-out consumer"),
                    Err(err) if is_resource_in_use(&err) => {
                        debug!(
                            consumer = name,
                            "the fan-out consumer is registered already"
                        )
                    }
                    Err(err) => {
                        return Err(from_sdk(self.call("RegisterStreamConsumer", None), err));
                    }
                }
                Ok(())
            },
        )
        .await
    }

    /// The consumer's status and ARN (DescribeStreamConsumer, retried), or
    /// `None` when no consumer of that name is registered.
    async fn consumer_status(
        &self,
        stream_arn: &str,
        name: &str,
    ) -> Result<Option<(ConsumerStatus, String)>, SourceError> {
        let described = retrying(
            self.retries(),
            Patience::Retries(CONTROL_PLANE_RETRIES),
            || async {
                self.client()
                    .describe_stream_consumer()
                    .stream_arn(stream_arn)
                    .consumer_name(name)
                    .send()
                    .await
                    .map_err(|err| from_sdk(self.call("DescribeStreamConsumer", None), err))
            },
        )
        .await;
        match described {
            Ok(described) => Ok(described
                .consumer_description
                .map(|consumer| (consumer.consumer_status, consumer.consumer_arn))),
            Err(err) if err.kind() == Kind::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// The stream's ARN: as given, or from DescribeStreamSummary.
    async fn stream_arn(&self) -> Result<String, SourceError> {
        if let (None, Some(arn)) = self.stream_name_or_arn() {
            return Ok(arn);
        }
        let summary = retrying(
            self.retries(),
            Patience::Retries(CONTROL_PLANE_RETRIES),
            || async {
                self.client()
                    .describe_stream_summary()
                    .stream_name(self.stream())
                    .send()
                    .await
                    .map_err(|err| from_sdk(self.call("DescribeStreamSummary", None), err))
            },
        )
        .await?;
        summary
            .stream_description_summary
            .map(|summary| summary.stream_arn)
            .ok_or_else(|| {
                Kind::Unexpected.at(
                    self.call("DescribeStreamSummary", None),
                    "the response has no stream description",
                )
            })
    }

    /// A fan-out reader of one shard from `start`, as `consumer_arn`.
    /// Makes no call yet: the first [`FanoutReader::next`] subscribes.
    pub fn fanout_reader(
        &self,
        consumer_arn: &str,
        shard_id: &str,
        start: StartPosition,
    ) -> FanoutReader {
        FanoutReader {
            source: self.clone(),
            consumer_arn: consumer_arn.to_owned(),
            shard_id: shard_id.to_owned(),
            start,
            lifetime: SUBSCRIPTION_LIFETIME,
            subscription: None,
            last_sequence: None,
            ended: false,
            end_check_at: Instant::now(),
            backoff: kinesis_backoff(),
            retries: RetryCounts::default(),
        }
    }

    /// One SubscribeToShard call, no retry: the reader decides.
    async fn subscribe(
        &self,
        consumer_arn: &str,
        shard_id: &str,
        position: &StartPosition,
    ) -> Result<Events, SourceError> {
        let starting = StartingPosition::builder();
        let starting = match position {
            StartPosition::AtSequence(sequence) => starting
                .r#type(ShardIteratorType::AtSequenceNumber)
                .sequence_number(sequence),
            StartPosition::AfterSequence(sequence) => starting
                .r#type(ShardIteratorType::AfterSequenceNumber)
                .sequence_number(sequence),
            StartPosition::TrimHorizon => starting.r#type(ShardIteratorType::TrimHorizon),
            StartPosition::Latest => starting.r#type(ShardIteratorType::Latest),
            StartPosition::AtTimestamp(at) => starting
                .r#type(ShardIteratorType::AtTimestamp)
                .timestamp(DateTime::from(*at)),
        };
        let call = || self.call("SubscribeToShard", Some(shard_id));
        let starting = starting
            .build()
            .map_err(|err| Kind::Config.at(call(), err.to_string()))?;
        let output = self
            .client()
            .subscribe_to_shard()
            .consumer_arn(consumer_arn)
            .shard_id(shard_id)
            .starting_position(starting)
            .send()
            .await
            .map_err(|err| from_sdk(call(), err))?;
        Ok(output.event_stream)
    }
}

/// Whether registering failed because the consumer exists already.
fn is_resource_in_use<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> bool {
    err.as_service_error()
        .and_then(ProvideErrorMetadata::code)
        .is_some_and(|code| code == "ResourceInUseException")
}

/// Converts an error of an open event stream: an error event by its type,
/// then its code (an unknown one: the service's trouble, worth subscribing
/// again for); anything else (the connection cut, a frame that does not
/// parse) a network error.
fn from_event_error<R>(
    call: super::error::Call,
    err: SdkError<SubscribeToShardEventStreamError, R>,
) -> SourceError
where
    R: fmt::Debug,
{
    let kind = match &err {
        SdkError::ServiceError(service) => {
            kind_of_service_error(service.err()).unwrap_or(Kind::ServiceUnavailable)
        }
        _ => Kind::Network,
    };
    let detail = aws_sdk_kinesis::error::DisplayErrorContext(&err).to_string();
    kind.at(call, detail)
}

/// Reads one shard in order through enhanced fan-out, with the same
/// contract as [`ShardReader`](super::ShardReader): resumes after the last
/// record it returned, retries what retrying can fix, and returns
/// `Fetched::EndOfShard` once a closed shard was read to its end.
#[derive(Debug)]
pub struct FanoutReader {
    source: KinesisSource,
    consumer_arn: String,
    shard_id: String,
    /// Where reading started: used again until a record was returned.
    start: StartPosition,
    /// When the reader subscribes again, should Kinesis not end it first.
    lifetime: Duration,
    /// The open subscription, and when it ends.
    subscription: Option<(Events, Instant)>,
    /// The sequence number of the last record returned by `next`.
    last_sequence: Option<String>,
    /// The shard is closed and was read to its end.
    ended: bool,
    /// No end check before this.
    end_check_at: Instant,
    backoff: Backoff,
    retries: RetryCounts,
}

impl FanoutReader {
    /// Subscribes again after `lifetime` rather than after 5 minutes: for
    /// tests of the resubscription.
    pub fn with_subscription_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// The next non-empty batch of records, waiting for the shard to have
    /// some. Cancel safe in the way the shard task needs: a future dropped
    /// while waiting loses nothing the reader returned.
    pub async fn next(&mut self) -> Result<Fetched, SourceError> {
        loop {
            if self.ended {
                return Ok(Fetched::EndOfShard);
            }
            let Some((events, ends_at)) = &mut self.subscription else {
                let resume = resume_point(&self.start, self.last_sequence.as_deref());
                match self
                    .source
                    .subscribe(&self.consumer_arn, &self.shard_id, &resume)
                    .await
                {
                    Ok(events) => {
                        debug!(shard = %self.shard_id, ?resume, "subscribed to the shard");
                        self.subscription = Some((events, Instant::now() + self.lifetime));
                    }
                    Err(err) => self.retry_after(err).await?,
                }
                continue;
            };
            let received = match tokio::time::timeout_at(*ends_at, events.recv()).await {
                Ok(received) => received,
                // Its time is up: a new subscription from where it stands.
                Err(_) => {
                    self.subscription = None;
                    continue;
                }
            };
            let event = match received {
                Ok(Some(SubscribeToShardEventStream::SubscribeToShardEvent(event))) => event,
                Ok(Some(other)) => {
                    debug!(shard = %self.shard_id, ?other, "an event of an unknown kind, skipped");
                    continue;
                }
                // Kinesis ended the subscription (after 5 minutes).
                Ok(None) => {
                    self.subscription = None;
                    continue;
                }
                Err(err) => {
                    self.subscription = None;
                    let call = self.source.call("SubscribeToShard", Some(&self.shard_id));
                    self.retry_after(from_event_error(call, err)).await?;
                    continue;
                }
            };
            // From here to the return, no await: the records and the new
            // position are taken together, or not at all.
            self.backoff.reset();
            // Child shards come only with the shard's last event.
            self.ended = event
                .child_shards
                .as_ref()
                .is_some_and(|children| !children.is_empty());
            let records: Vec<_> = event.records.into_iter().map(from_sdk_record).collect();
            if let Some(last) = records.last() {
                self.last_sequence = Some(last.sequence_number.clone());
                return Ok(Fetched::Records {
                    records,
                    millis_behind_latest: Some(event.millis_behind_latest),
                });
            }
            if !self.ended && event.millis_behind_latest == 0 && self.end_check_at <= Instant::now()
            {
                self.end_check_at = Instant::now() + END_CHECK_EVERY;
                self.ended = self.read_to_end().await;
            }
        }
    }

    /// Whether the shard is closed and every record was returned, asked
    /// with one GetRecords after the last record: for a subscription that
    /// never sends the child shards (kinesis-mock). Any error: not known,
    /// so not ended (asked again later).
    async fn read_to_end(&self) -> bool {
        let resume = resume_point(&self.start, self.last_sequence.as_deref());
        let Ok(iterator) = self.source.shard_iterator(&self.shard_id, &resume).await else {
            return false;
        };
        match self.source.get_records(&self.shard_id, &iterator, 1).await {
            Ok(output) => output.records.is_empty() && output.next_shard_iterator.is_none(),
            Err(_) => false,
        }
    }

    /// Returns the error if retrying cannot fix it; otherwise counts and
    /// logs it and waits.
    async fn retry_after(&mut self, err: SourceError) -> Result<(), SourceError> {
        if !err.is_retriable() {
            return Err(err);
        }
        let shard = (self.source.stream(), self.shard_id.as_str());
        wait_before_retry(&self.retries, &mut self.backoff, shard, &err).await;
        Ok(())
    }

    /// Retries of this reader's calls, by cause: for a retries metric.
    pub fn retries(&self) -> &RetryCounts {
        &self.retries
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_kinesis::error::ErrorMetadata;
    use aws_sdk_kinesis::types::error as modelled;

    use super::*;
    use crate::source::kinesis::error::Call;

    fn call() -> Call {
        Call {
            operation: "SubscribeToShard",
            stream: "telemetry".into(),
            shard: Some("shardId-000000000001".into()),
        }
    }

    fn cause(error: SubscribeToShardEventStreamError) -> &'static str {
        from_event_error(call(), SdkError::service_error(error, ())).cause()
    }

    #[test]
    fn an_error_event_is_known_by_its_type_when_it_has_no_code() {
        // kinesis-mock's answer while another subscription to the shard is
        // still open: the event's type, and no code in its payload.
        let in_use = SubscribeToShardEventStreamError::ResourceInUseException(
            modelled::ResourceInUseException::builder().build(),
        );
        assert_eq!(cause(in_use), "resource_in_use");
        let not_found = SubscribeToShardEventStreamError::ResourceNotFoundException(
            modelled::ResourceNotFoundException::builder().build(),
        );
        assert_eq!(cause(not_found), "not_found");
    }

    #[test]
    fn an_unknown_error_event_is_known_by_its_code_or_else_worth_retrying() {
        let throttled = SubscribeToShardEventStreamError::generic(
            ErrorMetadata::builder()
                .code("LimitExceededException")
                .build(),
        );
        assert_eq!(cause(throttled), "limit_exceeded");
        let unknown = SubscribeToShardEventStreamError::generic(ErrorMetadata::builder().build());
        let err = from_event_error(call(), SdkError::service_error(unknown, ()));
        assert_eq!(err.cause(), "service_unavailable");
        assert!(err.is_retriable());
    }
}
