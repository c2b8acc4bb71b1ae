//! [`KinesisSource`]: one stream, reached through the standard AWS
//! configuration; builds the SDK client and lists shards. Writing is in
//! `put.rs`, stream administration in `admin.rs`, reading in `reader.rs`.

use std::sync::Arc;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::config::ProvideCredentials;
use aws_sdk_kinesis::config::retry::RetryConfig;
use aws_sdk_kinesis::config::timeout::TimeoutConfig;
use aws_sdk_kinesis::error::DisplayErrorContext;
use aws_sdk_kinesis::operation::get_records::GetRecordsOutput;
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::ShardIteratorType;

use super::classify::from_sdk;
use super::error::{Call, Kind, SourceError};
use super::reader::{ReaderOptions, ShardReader};
use super::record::{ShardInfo, StartPosition, from_sdk_shard};
use super::retry::{Patience, RetryCounts, retrying};

/// Retries of a control-plane call (list, create, describe) before its error
/// is returned: about 15 to 30 s of backoff, enough for a stream that is
/// being created or an emulator that is restarting.
pub(crate) const CONTROL_PLANE_RETRIES: u32 = 10;
/// How long to wait for a TCP connection: a dead endpoint is seen quickly.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one attempt of one call may take: a half-open connection must
/// not hang a reader forever; a 10 MB GetRecords takes far less.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// One Kinesis stream: the SDK client, and the stream's name or ARN.
///
/// Cheap to clone (the client is shared), so that every shard reader holds
/// its own. Retries are done here, not by the SDK (its retries are turned
/// off), so that each one is logged with its cause and counted.
#[derive(Debug, Clone)]
pub struct KinesisSource {
    /// The SDK client; it holds the connection pool and the credentials.
    client: Client,
    /// The stream name or ARN, as given; names the stream in every error.
    stream: Arc<str>,
    /// Retries of this source's own calls (list, put, administration).
    retries: Arc<RetryCounts>,
}

impl KinesisSource {
    /// A source for `stream` (a name, or an ARN starting with `arn:`), with
    /// the standard AWS configuration: environment, profile, IRSA in a pod;
    /// `AWS_ENDPOINT_URL_KINESIS` or `AWS_ENDPOINT_URL` point it at an
    /// emulator.
    ///
    /// Fails fast, with a [`SourceError::Config`], when there is no region
    /// or no credentials can be loaded. Does not check that the stream
    /// exists ([`ensure_stream`](Self::ensure_stream) may create it).
    pub async fn from_env(stream: &str) -> Result<Self, SourceError> {
        Self::connect(stream, None).await
    }

    /// Like [`from_env`](Self::from_env), but sends every call to
    /// `endpoint_url`, whatever the environment says: for a configured
    /// endpoint, and for tests that put a fault injector in between.
    pub async fn from_env_with_endpoint(
        stream: &str,
        endpoint_url: &str,
    ) -> Result<Self, SourceError> {
        Self::connect(stream, Some(endpoint_url)).await
    }

    async fn connect(stream: &str, endpoint_url: Option<&str>) -> Result<Self, SourceError> {
        let call = Call {
            operation: "configure",
            stream: stream.to_owned(),
            shard: None,
        };
        if stream.trim().is_empty() {
            return Err(Kind::Config.at(call, "the stream name is empty"));
        }
        let shared = aws_config::load_defaults(BehaviorVersion::latest()).await;
        if shared.region().is_none() {
            return Err(Kind::Config.at(call, "no AWS region is configured (set AWS_REGION)"));
        }
        // Loading credentials once here turns a missing role or key into an
        // error at start, instead of readers that retry forever.
        let Some(credentials) = shared.credentials_provider() else {
            return Err(Kind::Config.at(call, "no AWS credentials provider is configured"));
        };
        if let Err(err) = credentials.provide_credentials().await {
            let detail = format!("no AWS credentials: {}", DisplayErrorContext(&err));
            return Err(Kind::Config.at(call, detail));
        }
        let ours = TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .operation_attempt_timeout(ATTEMPT_TIMEOUT);
        let timeouts = match shared.timeout_config() {
            Some(configured) => configured.to_builder().take_unset_from(ours).build(),
            None => ours.build(),
        };
        let mut config = aws_sdk_kinesis::config::Builder::from(&shared)
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts);
        if let Some(url) = endpoint_url {
            config = config.endpoint_url(url);
        }
        Ok(Self {
            client: Client::from_conf(config.build()),
            stream: stream.into(),
            retries: Arc::default(),
        })
    }

    /// The stream name or ARN this source reads.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Retries of this source's own calls, by cause (readers count theirs).
    pub fn retries(&self) -> &RetryCounts {
        &self.retries
    }

    /// Every shard of the stream, open and closed (within retention), over
    /// all ListShards pages. Retries briefly through throttling, a stream
    /// that is being created or resharded, and network errors.
    pub async fn list_shards(&self) -> Result<Vec<ShardInfo>, SourceError> {
        retrying(
            &self.retries,
            Patience::Retries(CONTROL_PLANE_RETRIES),
            || self.list_shards_once(),
        )
        .await
    }

    /// One full listing; an expired page token fails it, and the retry
    /// starts over from the first page.
    async fn list_shards_once(&self) -> Result<Vec<ShardInfo>, SourceError> {
        let mut shards = Vec::new();
        let mut next_token: Option<String> = None;
        loop {
            let request = self.client.list_shards();
            // With a page token the stream must not be named again.
            let request = match next_token.take() {
                Some(token) => request.next_token(token),
                None => {
                    let (name, arn) = self.stream_name_or_arn();
                    request.set_stream_name(name).set_stream_arn(arn)
                }
            };
            let page = request
                .send()
                .await
                .map_err(|err| from_sdk(self.call("ListShards", None), err))?;
            shards.extend(
                page.shards
                    .unwrap_or_default()
                    .into_iter()
                    .map(from_sdk_shard),
            );
            match page.next_token {
                Some(token) => next_token = Some(token),
                None => return Ok(shards),
            }
        }
    }

    /// A reader of one shard from `start`. Makes no call yet: the first
    /// [`ShardReader::next`] does.
    pub async fn shard_reader(
        &self,
        shard_id: &str,
        start: StartPosition,
        options: ReaderOptions,
    ) -> ShardReader {
        ShardReader::new(self.clone(), shard_id, start, options)
    }

    /// One GetShardIterator call, no retry: the reader decides.
    pub(crate) async fn shard_iterator(
        &self,
        shard_id: &str,
        position: &StartPosition,
    ) -> Result<String, SourceError> {
        let (name, arn) = self.stream_name_or_arn();
        let request = self
            .client
            .get_shard_iterator()
            .set_stream_name(name)
            .set_stream_arn(arn)
            .shard_id(shard_id);
        let request = match position {
            StartPosition::AtSequence(sequence) => request
                .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
                .starting_sequence_number(sequence),
            StartPosition::AfterSequence(sequence) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(sequence),
            StartPosition::TrimHorizon => {
                request.shard_iterator_type(ShardIteratorType::TrimHorizon)
            }
            StartPosition::Latest => request.shard_iterator_type(ShardIteratorType::Latest),
            StartPosition::AtTimestamp(at) => request
                .shard_iterator_type(ShardIteratorType::AtTimestamp)
                .timestamp(DateTime::from(*at)),
        };
        let call = || self.call("GetShardIterator", Some(shard_id));
        let output = request.send().await.map_err(|err| from_sdk(call(), err))?;
        // Kinesis always returns an iterator; a missing one is not understood,
        // and guessing "end of shard" could skip records.
        output
            .shard_iterator
            .ok_or_else(|| Kind::Unexpected.at(call(), "the response has no shard iterator"))
    }

    /// One GetRecords call, no retry: the reader decides.
    pub(crate) async fn get_records(
        &self,
        shard_id: &str,
        iterator: &str,
        limit: i32,
    ) -> Result<GetRecordsOutput, SourceError> {
        self.client
            .get_records()
            .shard_iterator(iterator)
            .limit(limit)
            .send()
            .await
            .map_err(|err| from_sdk(self.call("GetRecords", Some(shard_id)), err))
    }

    /// The SDK's two ways to name a stream: (StreamName, StreamARN).
    pub(crate) fn stream_name_or_arn(&self) -> (Option<String>, Option<String>) {
        if self.stream.starts_with("arn:") {
            (None, Some(self.stream.to_string()))
        } else {
            (Some(self.stream.to_string()), None)
        }
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// A source whose client works offline: for unit tests that never call.
    #[cfg(test)]
    pub(crate) fn for_tests(stream: &str) -> Self {
        let config = aws_sdk_kinesis::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(aws_sdk_kinesis::config::Region::new("us-east-1"))
            .build();
        Self {
            client: Client::from_conf(config),
            stream: stream.into(),
            retries: Arc::default(),
        }
    }

    /// The call context for an error message.
    pub(crate) fn call(&self, operation: &'static str, shard_id: Option<&str>) -> Call {
        Call {
            operation,
            stream: self.stream.to_string(),
            shard: shard_id.map(str::to_owned),
        }
    }
}
