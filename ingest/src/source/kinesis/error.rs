//! What can go wrong talking to Kinesis, and which of it retrying can fix.
//!
//! Every SDK error becomes a [`SourceError`] (see `classify.rs`), so that no
//! AWS type leaves this module. Callers question the error (`is_retriable`,
//! `cause`) rather than parse its message.

use std::fmt;

/// The call that failed: named in every message, so that a log line says
/// which stream and shard to look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The Kinesis operation, e.g. `GetRecords`.
    pub operation: &'static str,
    /// The stream name or ARN the source was built with.
    pub stream: String,
    /// The shard, for calls about one shard.
    pub shard: Option<String>,
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on stream {:?}", self.operation, self.stream)?;
        if let Some(shard) = &self.shard {
            write!(f, " shard {shard:?}")?;
        }
        Ok(())
    }
}

/// An error from Kinesis or from reaching it.
///
/// Retriable (the reader and the client retry these by themselves, with
/// backoff): `Throttled`, `KmsThrottled`, `LimitExceeded`, `ExpiredIterator`,
/// `ExpiredNextToken`, `Network`, `Timeout`, `ServiceUnavailable`,
/// `ResourceInUse`. Not retriable (returned at once, someone must act):
/// `NotFound`, `AccessDenied`, `Kms`, `InvalidArgument`, `Config`,
/// `Unexpected`.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// ProvisionedThroughputExceeded or a throttling error: the shard's read
    /// or write quota (or the account's API rate) is used up for now.
    #[error(
        "{call}: throttled by Kinesis ({detail}). Retried with backoff; if it persists, \
         the shards' read or write quota is too small: add shards, or read each with \
         fewer consumers"
    )]
    Throttled {
        /// The call that failed.
        call: Call,
        /// What Kinesis or the transport said.
        detail: String,
    },
    /// KMS throttled the decryption or encryption with the stream's key.
    #[error(
        "{call}: KMS throttled the stream's encryption key ({detail}). Retried with \
         backoff; if it persists, raise the account's KMS request quota"
    )]
    KmsThrottled {
        /// The call that failed.
        call: Call,
        /// What Kinesis or the transport said.
        detail: String,
    },
    /// LimitExceeded: too many control-plane calls, or a shard limit.
    #[error(
        "{call}: a Kinesis limit was exceeded ({detail}). Retried with backoff; if it \
         persists, check the account's shard limit and who else calls this API"
    )]
    LimitExceeded {
        /// The call that failed.
        call: Call,
        /// What Kinesis or the transport said.
        detail: String,
    },
    /// The shard iterator is older than 5 minutes: a new one is needed,
    /// taken after the last record returned.
    #[error(
        "{call}: the shard iterator expired ({detail}). A new iterator is taken after \
         the last record returned; nothing is skipped"
    )]
    ExpiredIterator {
        /// The call that failed.
        call: Call,
        /// What Kinesis or the transport said.
        detail: String,
    },
    /// The ListShards page token is older than 5 minutes: list again.
    #[error("{call}: the ListShards page token expired ({detail}). The listing starts over")]
    ExpiredNextToken {
        /// The call that failed.
        call: Call,
        /// What Kinesis or the transport said.
        detail: String,
    },
    /// Kinesis could not be reached: connection refused or reset, DNS, TLS,
    /// a response cut short. Also a local emulator that is restarting.
    #[error(
        "{call}: could not reach Kinesis ({detail}). Retried with backoff; check the \
         endpoint (AWS_ENDPOINT_URL_KINESIS or AWS_ENDPOINT_URL) and the network"
    )]
    Network {
        /// The call that failed.
        call: Call,
        /// What Kinesis or the transport said.
        detail: String,
    },
    /// The call took longer than its timeout.
    #[error("{call}: timed out ({detail}). Retried with backoff")]
    Timeout {
        /// The call that failed.
        call: Call,
        /// What Kinesis or the transport said.
        detail: String,
    },
    /// InternalFailure or an HTTP 5xx: Kinesis failed on its side.
    #[error("{call}: Kinesis failed internally ({detail}). Retried with backoff")]
    ServiceUnavailable {
        /// The call that failed.
        call: Call,
        /// What Kinesis or the transport said.
        detail: String,
    },
    /// The stream is being created, updated (resharded) or deleted.
    #[error("{call}: the stream is busy ({detail}). Retried until it is ACTIVE again")]
    ResourceInUse {
        /// The call that failed.
        call: Call,
        /// What Kinesis or the transport said.
        detail: String,
    },
    /// The stream or shard does not exist (in this region), or a closed shard
    /// has aged out of the retention period.
    #[error(
        "{call}: not found ({detail}). Check the stream name or ARN and AWS_REGION, \
         or create the stream (`ingest provision`)"
    )]
    NotFound {
        /// The call that failed.
        call: Call,
        /// What Kinesis or the transport said.
        detail: String,
    },
    /// The credentials may not make this call, or are not valid at all.
    #[error(
        "{call}: access denied ({detail}). Grant the role (IRSA in a pod) the Kinesis \
         permission for this stream, or fix the credentials"
    )]
    AccessDenied {
        /// The call that failed.
        call: Call,
        /// What Kinesis or the transport said.
        detail: String,
    },
    /// The stream's KMS key is missing, disabled or not usable by this role.
    #[error(
        "{call}: the stream's KMS key cannot be used ({detail}). Check that the key \
         exists, is enabled, and that the role may use it"
    )]
    Kms {
        /// The call that failed.
        call: Call,
        /// What Kinesis or the transport said.
        detail: String,
    },
    /// Kinesis rejected an argument: a sequence number not in the shard, a bad
    /// shard id or timestamp, a record too large.
    #[error("{call}: Kinesis rejected an argument ({detail}). Fix the input or the checkpoint")]
    InvalidArgument {
        /// The call that failed.
        call: Call,
        /// What Kinesis or the transport said.
        detail: String,
    },
    /// The AWS configuration is unusable: no region, no credentials, a
    /// malformed endpoint.
    #[error("{call}: {detail}. Fix the AWS configuration (AWS_REGION, credentials, endpoint)")]
    Config {
        /// The call that failed.
        call: Call,
        /// What Kinesis or the transport said.
        detail: String,
    },
    /// An error this module does not know; not retried, so it gets seen.
    #[error("{call}: unexpected error from Kinesis ({detail})")]
    Unexpected {
        /// The call that failed.
        call: Call,
        /// What Kinesis or the transport said.
        detail: String,
    },
}

/// Every [`SourceError::cause`] label, in a fixed order (for counters).
pub(crate) const CAUSES: [&str; 15] = [
    "throttled",
    "kms_throttled",
    "limit_exceeded",
    "expired_iterator",
    "expired_next_token",
    "network",
    "timeout",
    "service_unavailable",
    "resource_in_use",
    "not_found",
    "access_denied",
    "kms",
    "invalid_argument",
    "config",
    "unexpected",
];

/// The kinds of [`SourceError`], before the call and detail are attached;
/// the order matches [`CAUSES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Throttled,
    KmsThrottled,
    LimitExceeded,
    ExpiredIterator,
    ExpiredNextToken,
    Network,
    Timeout,
    ServiceUnavailable,
    ResourceInUse,
    NotFound,
    AccessDenied,
    Kms,
    InvalidArgument,
    Config,
    Unexpected,
}

impl Kind {
    /// Builds the error of this kind for `call`.
    pub(crate) fn at(self, call: Call, detail: impl Into<String>) -> SourceError {
        let detail = detail.into();
        match self {
            Kind::Throttled => SourceError::Throttled { call, detail },
            Kind::KmsThrottled => SourceError::KmsThrottled { call, detail },
            Kind::LimitExceeded => SourceError::LimitExceeded { call, detail },
            Kind::ExpiredIterator => SourceError::ExpiredIterator { call, detail },
            Kind::ExpiredNextToken => SourceError::ExpiredNextToken { call, detail },
            Kind::Network => SourceError::Network { call, detail },
            Kind::Timeout => SourceError::Timeout { call, detail },
            Kind::ServiceUnavailable => SourceError::ServiceUnavailable { call, detail },
            Kind::ResourceInUse => SourceError::ResourceInUse { call, detail },
            Kind::NotFound => SourceError::NotFound { call, detail },
            Kind::AccessDenied => SourceError::AccessDenied { call, detail },
            Kind::Kms => SourceError::Kms { call, detail },
            Kind::InvalidArgument => SourceError::InvalidArgument { call, detail },
            Kind::Config => SourceError::Config { call, detail },
            Kind::Unexpected => SourceError::Unexpected { call, detail },
        }
    }
}

impl SourceError {
    pub(crate) fn kind(&self) -> Kind {
        match self {
            SourceError::Throttled { .. } => Kind::Throttled,
            SourceError::KmsThrottled { .. } => Kind::KmsThrottled,
            SourceError::LimitExceeded { .. } => Kind::LimitExceeded,
            SourceError::ExpiredIterator { .. } => Kind::ExpiredIterator,
            SourceError::ExpiredNextToken { .. } => Kind::ExpiredNextToken,
            SourceError::Network { .. } => Kind::Network,
            SourceError::Timeout { .. } => Kind::Timeout,
            SourceError::ServiceUnavailable { .. } => Kind::ServiceUnavailable,
            SourceError::ResourceInUse { .. } => Kind::ResourceInUse,
            SourceError::NotFound { .. } => Kind::NotFound,
            SourceError::AccessDenied { .. } => Kind::AccessDenied,
            SourceError::Kms { .. } => Kind::Kms,
            SourceError::InvalidArgument { .. } => Kind::InvalidArgument,
            SourceError::Config { .. } => Kind::Config,
            SourceError::Unexpected { .. } => Kind::Unexpected,
        }
    }

    /// Whether the same call may succeed later without anyone acting: the
    /// reader and the client retry exactly these.
    pub fn is_retriable(&self) -> bool {
        matches!(
            self.kind(),
            Kind::Throttled
                | Kind::KmsThrottled
                | Kind::LimitExceeded
                | Kind::ExpiredIterator
                | Kind::ExpiredNextToken
                | Kind::Network
                | Kind::Timeout
                | Kind::ServiceUnavailable
                | Kind::ResourceInUse
        )
    }

    /// Whether Kinesis refused the request itself (InvalidArgument or a
    /// validation error): for PutRecords, a record that breaks a limit. No
    /// retry of the same request can succeed.
    pub fn is_invalid_argument(&self) -> bool {
        self.kind() == Kind::InvalidArgument
    }

    /// A stable snake_case label, for a metric's `cause` label and logs.
    pub fn cause(&self) -> &'static str {
        CAUSES[self.kind() as usize]
    }

    /// The call that failed.
    pub fn call(&self) -> &Call {
        match self {
            SourceError::Throttled { call, .. }
            | SourceError::KmsThrottled { call, .. }
            | SourceError::LimitExceeded { call, .. }
            | SourceError::ExpiredIterator { call, .. }
            | SourceError::ExpiredNextToken { call, .. }
            | SourceError::Network { call, .. }
            | SourceError::Timeout { call, .. }
            | SourceError::ServiceUnavailable { call, .. }
            | SourceError::ResourceInUse { call, .. }
            | SourceError::NotFound { call, .. }
            | SourceError::AccessDenied { call, .. }
            | SourceError::Kms { call, .. }
            | SourceError::InvalidArgument { call, .. }
            | SourceError::Config { call, .. }
            | SourceError::Unexpected { call, .. } => call,
        }
    }
}
