//! Classification of AWS SDK errors into [`SourceError`] kinds.
//!
//! By what failed: building the request (configuration), sending it
//! (network, timeout), or the service's answer (by error type, then error
//! code, then HTTP status).

use std::fmt;

use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::operation::get_records::GetRecordsError;
use aws_sdk_kinesis::operation::get_shard_iterator::GetShardIteratorError;
use aws_sdk_kinesis::types::error::SubscribeToShardEventStreamError;

use super::error::{Call, Kind, SourceError};

/// Typed classification of an operation's modelled errors, where the SDK
/// models them: the compiler then checks the names that matter most to the
/// reader. `None` falls back to the error code ([`kind_of_code`]).
pub(crate) trait TypedKind {
    fn typed_kind(&self) -> Option<Kind>;
}

impl TypedKind for GetRecordsError {
    fn typed_kind(&self) -> Option<Kind> {
        Some(match self {
            Self::ProvisionedThroughputExceededException(_) => Kind::Throttled,
            Self::KmsThrottlingException(_) => Kind::KmsThrottled,
            Self::ExpiredIteratorException(_) => Kind::ExpiredIterator,
            Self::InternalFailureException(_) => Kind::ServiceUnavailable,
            Self::ResourceNotFoundException(_) => Kind::NotFound,
            Self::AccessDeniedException(_) => Kind::AccessDenied,
            Self::InvalidArgumentException(_) | Self::DryRunOperationException(_) => {
                Kind::InvalidArgument
            }
            Self::KmsAccessDeniedException(_)
            | Self::KmsDisabledException(_)
            | Self::KmsInvalidStateException(_)
            | Self::KmsNotFoundException(_)
            | Self::KmsOptInRequired(_) => Kind::Kms,
            // LimitExceededException is not modelled for GetRecords in this
            // SDK version but documented by AWS: its code is matched below.
            _ => return None,
        })
    }
}

impl TypedKind for GetShardIteratorError {
    fn typed_kind(&self) -> Option<Kind> {
        Some(match self {
            Self::ProvisionedThroughputExceededException(_) => Kind::Throttled,
            Self::InternalFailureException(_) => Kind::ServiceUnavailable,
            Self::ResourceNotFoundException(_) => Kind::NotFound,
            Self::AccessDeniedException(_) => Kind::AccessDenied,
            Self::InvalidArgumentException(_) | Self::DryRunOperationException(_) => {
                Kind::InvalidArgument
            }
            _ => return None,
        })
    }
}

/// An error event inside SubscribeToShard's event stream: named by its
/// event's exception type, which is all an emulator may send (kinesis-mock
/// puts no error code in the payload).
impl TypedKind for SubscribeToShardEventStreamError {
    fn typed_kind(&self) -> Option<Kind> {
        Some(match self {
            Self::ResourceInUseException(_) => Kind::ResourceInUse,
            Self::ResourceNotFoundException(_) => Kind::NotFound,
            Self::InternalFailureException(_) => Kind::ServiceUnavailable,
            Self::KmsThrottlingException(_) => Kind::KmsThrottled,
            Self::KmsAccessDeniedException(_)
            | Self::KmsDisabledException(_)
            | Self::KmsInvalidStateException(_)
            | Self::KmsNotFoundException(_)
            | Self::KmsOptInRequired(_) => Kind::Kms,
            _ => return None,
        })
    }
}

/// The other operations are classified by error code alone.
macro_rules! by_code_only {
    ($($error:ty),* $(,)?) => {
        $(impl TypedKind for $error {
            fn typed_kind(&self) -> Option<Kind> {
                None
            }
        })*
    };
}

by_code_only!(
    aws_sdk_kinesis::operation::list_shards::ListShardsError,
    aws_sdk_kinesis::operation::put_records::PutRecordsError,
    aws_sdk_kinesis::operation::create_stream::CreateStreamError,
    aws_sdk_kinesis::operation::delete_stream::DeleteStreamError,
    aws_sdk_kinesis::operation::describe_stream_summary::DescribeStreamSummaryError,
    aws_sdk_kinesis::operation::split_shard::SplitShardError,
    aws_sdk_kinesis::operation::merge_shards::MergeShardsError,
    aws_sdk_kinesis::operation::register_stream_consumer::RegisterStreamConsumerError,
    aws_sdk_kinesis::operation::describe_stream_consumer::DescribeStreamConsumerError,
    aws_sdk_kinesis::operation::subscribe_to_shard::SubscribeToShardError,
);

/// The kind of a Kinesis error code (the `__type` on the wire), for the codes
/// this module knows; the same names appear as `error_code` of failed
/// PutRecords entries.
pub(crate) fn kind_of_code(code: &str) -> Option<Kind> {
    Some(match code {
        "ProvisionedThroughputExceededException"
        | "ThrottlingException"
        | "Throttling"
        | "TooManyRequestsException"
        | "RequestLimitExceeded" => Kind::Throttled,
        "KMSThrottlingException" => Kind::KmsThrottled,
        "LimitExceededException" => Kind::LimitExceeded,
        "ExpiredIteratorException" => Kind::ExpiredIterator,
        "ExpiredNextTokenException" => Kind::ExpiredNextToken,
        "InternalFailureException"
        | "InternalFailure"
        | "ServiceUnavailable"
        | "ServiceUnavailableException" => Kind::ServiceUnavailable,
        "ResourceInUseException" => Kind::ResourceInUse,
        "ResourceNotFoundException" => Kind::NotFound,
        "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "IncompleteSignature"
        | "MissingAuthenticationTokenException"
        | "ExpiredTokenException" => Kind::AccessDenied,
        "KMSAccessDeniedException"
        | "KMSDisabledException"
        | "KMSInvalidStateException"
        | "KMSNotFoundException"
        | "KMSOptInRequired" => Kind::Kms,
        "InvalidArgumentException"
        | "ValidationException"
        | "SerializationException"
        | "DryRunOperationException" => Kind::InvalidArgument,
        _ => return None,
    })
}

/// The kind of an error that only has an HTTP status: 5xx and 429 are worth
/// retrying, anything else is not understood and is not retried.
pub(crate) fn kind_of_status(status: u16) -> Kind {
    match status {
        429 => Kind::Throttled,
        500..=599 => Kind::ServiceUnavailable,
        _ => Kind::Unexpected,
    }
}

/// The kind of any SDK error, by what failed: building the request (config),
/// sending it (network, timeout), or the service's answer (by error type).
pub(crate) fn kind_of_sdk_error<E, R>(err: &SdkError<E, R>) -> Kind
where
    E: ProvideErrorMetadata + TypedKind,
    R: HttpStatus,
{
    match err {
        SdkError::ConstructionFailure(_) => Kind::Config,
        SdkError::TimeoutError(_) => Kind::Timeout,
        SdkError::DispatchFailure(failure) if failure.is_timeout() => Kind::Timeout,
        // A malformed request or endpoint: sending it again cannot help.
        SdkError::DispatchFailure(failure) if failure.is_user() => Kind::Config,
        // IO errors, and "other" ones such as credentials that could not be
        // fetched this time (IRSA's STS call): worth retrying.
        SdkError::DispatchFailure(_) => Kind::Network,
        // An unparseable answer is most often a connection cut mid-response.
        SdkError::ResponseError(_) => Kind::Network,
        SdkError::ServiceError(service) => kind_of_service_error(service.err())
            .unwrap_or_else(|| kind_of_status(service.raw().status_code())),
        _ => Kind::Unexpected,
    }
}

/// The kind of a service's error by its type, then its code; `None` when
/// neither is known (the caller falls back to what else it has).
pub(crate) fn kind_of_service_error<E: ProvideErrorMetadata + TypedKind>(
    error: &E,
) -> Option<Kind> {
    error
        .typed_kind()
        .or_else(|| error.code().and_then(kind_of_code))
}

/// A response's HTTP status; a trait so that tests need no real response.
pub(crate) trait HttpStatus {
    fn status_code(&self) -> u16;
}

impl HttpStatus for aws_sdk_kinesis::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

/// Converts an SDK error into a [`SourceError`] for `call`, keeping the whole
/// chain of causes in the detail (the SDK's own Display is one word).
pub(crate) fn from_sdk<E, R>(call: Call, err: SdkError<E, R>) -> SourceError
where
    E: ProvideErrorMetadata + TypedKind + std::error::Error + 'static,
    R: HttpStatus + fmt::Debug,
{
    let kind = kind_of_sdk_error(&err);
    let detail = match &err {
        SdkError::ServiceError(service) => {
            let error = service.err();
            let code = error.code().unwrap_or("no error code");
            match error.message() {
                Some(message) => format!("{code}: {message}"),
                None => code.to_owned(),
            }
        }
        _ => DisplayErrorContext(&err).to_string(),
    };
    kind.at(call, detail)
}

#[cfg(test)]
mod tests {
    use aws_sdk_kinesis::error::{ConnectorError, ErrorMetadata};
    use aws_sdk_kinesis::operation::list_shards::ListShardsError;
    use aws_sdk_kinesis::types::error as modelled;

    use super::*;

    /// A response that only has a status, which is all classification reads.
    #[derive(Debug)]
    struct Status(u16);

    impl HttpStatus for Status {
        fn status_code(&self) -> u16 {
            self.0
        }
    }

    fn call() -> Call {
        Call {
            operation: "GetRecords",
            stream: "telemetry".into(),
            shard: Some("shardId-000000000001".into()),
        }
    }

    fn service<E>(error: E, status: u16) -> SdkError<E, Status> {
        SdkError::service_error(error, Status(status))
    }

    /// A GetRecords error the SDK does not model, as it arrives: code only.
    fn unmodelled(code: &str) -> GetRecordsError {
        GetRecordsError::generic(ErrorMetadata::builder().code(code).message("m").build())
    }

    /// A modelled GetRecords error, as the SDK builds it from a response.
    macro_rules! modelled {
        ($name:ident) => {
            GetRecordsError::$name(modelled::$name::builder().build())
        };
    }

    #[test]
    fn get_records_errors_by_type() {
        let cases: Vec<(GetRecordsError, &str, bool)> = vec![
            (
                modelled!(ProvisionedThroughputExceededException),
                "throttled",
                true,
            ),
            (modelled!(KmsThrottlingException), "kms_throttled", true),
            (
                modelled!(ExpiredIteratorException),
                "expired_iterator",
                true,
            ),
            (
                modelled!(InternalFailureException),
                "service_unavailable",
                true,
            ),
            (modelled!(ResourceNotFoundException), "not_found", false),
            (modelled!(AccessDeniedException), "access_denied", false),
            (
                modelled!(InvalidArgumentException),
                "invalid_argument",
                false,
            ),
            (modelled!(KmsDisabledException), "kms", false),
            (modelled!(KmsAccessDeniedException), "kms", false),
            (unmodelled("LimitExceededException"), "limit_exceeded", true),
            (unmodelled("ThrottlingException"), "throttled", true),
        ];
        for (error, cause, retriable) in cases {
            let err = from_sdk(call(), service(error, 400));
            assert_eq!(
                (err.cause(), err.is_retriable()),
                (cause, retriable),
                "{err}"
            );
        }
    }

    #[test]
    fn list_shards_errors_by_code() {
        let cases = [
            ("ResourceInUseException", "resource_in_use", true),
            ("ExpiredNextTokenException", "expired_next_token", true),
            ("LimitExceededException", "limit_exceeded", true),
            ("ResourceNotFoundException", "not_found", false),
            ("UnrecognizedClientException", "access_denied", false),
        ];
        for (code, cause, retriable) in cases {
            let error = ListShardsError::generic(ErrorMetadata::builder().code(code).build());
            let err = from_sdk(call(), service(error, 400));
            assert_eq!(
                (err.cause(), err.is_retriable()),
                (cause, retriable),
                "{code}"
            );
        }
    }

    #[test]
    fn unknown_codes_fall_back_to_the_status() {
        let cases = [
            (503, "service_unavailable", true),
            (500, "service_unavailable", true),
            (429, "throttled", true),
            (400, "unexpected", false),
        ];
        for (status, cause, retriable) in cases {
            let err = from_sdk(call(), service(unmodelled("SomethingNewException"), status));
            assert_eq!(
                (err.cause(), err.is_retriable()),
                (cause, retriable),
                "{status}"
            );
        }
    }

    #[test]
    fn transport_errors() {
        type E = SdkError<GetRecordsError, Status>;
        let cases: Vec<(E, &str, bool)> = vec![
            (
                SdkError::dispatch_failure(ConnectorError::io("connection refused".into())),
                "network",
                true,
            ),
            (
                SdkError::dispatch_failure(ConnectorError::timeout("connect timeout".into())),
                "timeout",
                true,
            ),
            (
                SdkError::dispatch_failure(ConnectorError::other("no credentials".into(), None)),
                "network",
                true,
            ),
            (
                SdkError::dispatch_failure(ConnectorError::user("bad uri".into())),
                "config",
                false,
            ),
            (SdkError::timeout_error("attempt timeout"), "timeout", true),
            (
                SdkError::response_error("truncated", Status(200)),
                "network",
                true,
            ),
            (SdkError::construction_failure("no region"), "config", false),
        ];
        for (error, cause, retriable) in cases {
            let err = from_sdk(call(), error);
            assert_eq!(
                (err.cause(), err.is_retriable()),
                (cause, retriable),
                "{err}"
            );
        }
    }

    #[test]
    fn messages_name_the_stream_shard_and_cause() {
        let err = from_sdk(
            call(),
            SdkError::<GetRecordsError, Status>::dispatch_failure(ConnectorError::io(
                "connection refused".into(),
            )),
        );
        let message = err.to_string();
        for part in [
            "GetRecords",
            "\"telemetry\"",
            "shardId-000000000001",
            "connection refused",
        ] {
            assert!(message.contains(part), "{message:?} lacks {part:?}");
        }
        let err = from_sdk(
            call(),
            service(unmodelled("ResourceNotFoundException"), 400),
        );
        assert!(
            err.to_string().contains("ResourceNotFoundException: m"),
            "{err}"
        );
    }

    #[test]
    fn every_cause_label_is_distinct_snake_case() {
        let unique: std::collections::HashSet<_> = super::super::error::CAUSES.iter().collect();
        assert_eq!(unique.len(), super::super::error::CAUSES.len());
        for cause in super::super::error::CAUSES {
            assert!(
                cause.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{cause}"
            );
        }
    }
}
