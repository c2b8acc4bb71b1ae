//! Creating the archive's AWS side, idempotently: the S3 bucket, its
//! lifecycle (GLACIER after N days, optional expiry), and the Firehose
//! delivery stream that writes gzip objects under date/hour prefixes.

use aws_config::BehaviorVersion;
use aws_sdk_firehose::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_firehose::types::{
    BufferingHints, CompressionFormat, DeliveryStreamType, ExtendedS3DestinationConfiguration,
};
use aws_sdk_s3::types::{
    BucketLifecycleConfiguration, ExpirationStatus, LifecycleExpiration, LifecycleRule,
    LifecycleRuleFilter, Transition, TransitionStorageClass,
};

use super::ArchiveError;

/// Where raw objects go, by arrival hour (Hive-style, for Athena and replay).
pub const RAW_PREFIX: &str =
    "raw/year=!{timestamp:yyyy}/month=!{timestamp:MM}/day=!{timestamp:dd}/hour=!{timestamp:HH}/";
/// Where Firehose puts what it could not deliver.
pub const ERROR_PREFIX: &str = "errors/!{firehose:error-output-type}/year=!{timestamp:yyyy}/month=!{timestamp:MM}/day=!{timestamp:dd}/";
/// The id of our lifecycle rule in the bucket.
const RULE_ID: &str = "ingest-raw-to-glacier";

/// What the archive needs on AWS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveSpec {
    pub bucket: String,
    pub delivery_stream: String,
    /// The role Firehose assumes to write the bucket.
    pub role_arn: String,
    pub glacier_after_days: i32,
    pub expire_after_days: Option<i32>,
    /// Firehose buffering: whichever comes first.
    pub buffer_seconds: i32,
    pub buffer_mib: i32,
}

/// The bucket's lifecycle rule as S3 reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleState {
    pub enabled: bool,
    pub prefix: Option<String>,
    pub glacier_after_days: Option<i32>,
    pub expire_after_days: Option<i32>,
}

/// Creates what is missing and fixes a lifecycle that differs; returns a
/// line per resource saying what it found or did, the lifecycle read back.
pub async fn provision(spec: &ArchiveSpec) -> Result<Vec<String>, ArchiveError> {
    let error = |reason: String| ArchiveError {
        delivery_stream: spec.delivery_stream.clone(),
        reason,
    };
    let shared = aws_config::load_defaults(BehaviorVersion::latest()).await;
    let s3 = s3_client(&shared);
    let firehose = aws_sdk_firehose::Client::new(&shared);
    let mut report = Vec::new();

    let exists = s3.head_bucket().bucket(&spec.bucket).send().await.is_ok();
    if exists {
        report.push(format!("bucket          {}: exists", spec.bucket));
    } else {
        s3.create_bucket()
            .bucket(&spec.bucket)
            .send()
            .await
            .map_err(|e| {
                error(format!(
                    "cannot create bucket {}: {}",
                    spec.bucket,
                    DisplayErrorContext(&e)
                ))
            })?;
        report.push(format!("bucket          {}: created", spec.bucket));
    }

    let wanted = LifecycleState {
        enabled: true,
        prefix: Some("raw/".into()),
        glacier_after_days: Some(spec.glacier_after_days),
        expire_after_days: spec.expire_after_days,
    };
    let current = lifecycle(&s3, &spec.bucket).await.map_err(error)?;
    let action = if current.as_ref() == Some(&wanted) {
        "unchanged"
    } else {
        let mut rule = LifecycleRule::builder()
            .id(RULE_ID)
            .status(ExpirationStatus::Enabled)
            .filter(LifecycleRuleFilter::builder().prefix("raw/").build())
            .transitions(
                Transition::builder()
                    .days(spec.glacier_after_days)
                    .storage_class(TransitionStorageClass::Glacier)
                    .build(),
            );
        if let Some(days) = spec.expire_after_days {
            rule = rule.expiration(LifecycleExpiration::builder().days(days).build());
        }
        let configuration = BucketLifecycleConfiguration::builder()
            .rules(rule.build().map_err(|e| error(e.to_string()))?)
            .build()
            .map_err(|e| error(e.to_string()))?;
        s3.put_bucket_lifecycle_configuration()
            .bucket(&spec.bucket)
            .lifecycle_configuration(configuration)
            .send()
            .await
            .map_err(|e| {
                error(format!(
                    "cannot set the lifecycle of {}: {}",
                    spec.bucket,
                    DisplayErrorContext(&e)
                ))
            })?;
        if current.is_some() {
            "updated"
        } else {
            "created"
        }
    };
    let read_back = lifecycle(&s3, &spec.bucket).await.map_err(error)?;
    report.push(format!(
        "lifecycle       {action}: {}",
        describe(read_back.as_ref())
    ));

    match firehose
        .describe_delivery_stream()
        .delivery_stream_name(&spec.delivery_stream)
        .send()
        .await
    {
        Ok(_) => report.push(format!("delivery stream {}: exists", spec.delivery_stream)),
        Err(e) if e.code() == Some("ResourceNotFoundException") => {
            let destination = ExtendedS3DestinationConfiguration::builder()
                .role_arn(&spec.role_arn)
                .bucket_arn(format!("arn:aws:s3:::{}", spec.bucket))
                .prefix(RAW_PREFIX)
                .error_output_prefix(ERROR_PREFIX)
                .compression_format(CompressionFormat::Gzip)
                .buffering_hints(
                    BufferingHints::builder()
                        .interval_in_seconds(spec.buffer_seconds)
                        .size_in_mbs(spec.buffer_mib)
                        .build(),
                )
                .build()
                .map_err(|e| error(e.to_string()))?;
            firehose
                .create_delivery_stream()
                .delivery_stream_name(&spec.delivery_stream)
                .delivery_stream_type(DeliveryStreamType::DirectPut)
                .extended_s3_destination_configuration(destination)
                .send()
                .await
                .map_err(|e| {
                    error(format!(
                        "cannot create the delivery stream: {}",
                        DisplayErrorContext(&e)
                    ))
                })?;
            report.push(format!(
                "delivery stream {}: created (gzip, to s3://{}/{RAW_PREFIX}, buffer {} s or {} MiB)",
                spec.delivery_stream, spec.bucket, spec.buffer_seconds, spec.buffer_mib
            ));
        }
        Err(e) => {
            return Err(error(format!(
                "cannot describe the delivery stream: {}",
                DisplayErrorContext(&e)
            )));
        }
    }
    Ok(report)
}

/// An S3 client; path-style addressing when an endpoint is configured (an
/// emulator has no per-bucket host names).
pub fn s3_client(shared: &aws_config::SdkConfig) -> aws_sdk_s3::Client {
    let emulated = std::env::var_os("AWS_ENDPOINT_URL").is_some()
        || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some();
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(shared)
            .force_path_style(emulated)
            .build(),
    )
}

/// Our rule in `bucket`'s lifecycle, or None when the bucket has none.
pub async fn lifecycle(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
) -> Result<Option<LifecycleState>, String> {
    let output = match s3
        .get_bucket_lifecycle_configuration()
        .bucket(bucket)
        .send()
        .await
    {
        Ok(output) => output,
        Err(e) if e.code() == Some("NoSuchLifecycleConfiguration") => return Ok(None),
        Err(e) => {
            return Err(format!(
                "cannot read the lifecycle of {bucket}: {}",
                DisplayErrorContext(&e)
            ));
        }
    };
    Ok(output
        .rules()
        .iter()
        .find(|rule| rule.id() == Some(RULE_ID))
        .map(|rule| LifecycleState {
            enabled: rule.status() == &ExpirationStatus::Enabled,
            prefix: rule.filter().and_then(|f| f.prefix()).map(str::to_string),
            glacier_after_days: rule
                .transitions()
                .iter()
                .find(|t| t.storage_class() == Some(&TransitionStorageClass::Glacier))
                .and_then(|t| t.days()),
            expire_after_days: rule.expiration().and_then(|e| e.days()),
        }))
}

fn describe(state: Option<&LifecycleState>) -> String {
    match state {
        None => "none".into(),
        Some(state) => format!(
            "{} objects under {} to GLACIER after {} days, {}",
            if state.enabled {
                "enabled:"
            } else {
                "DISABLED:"
            },
            state.prefix.as_deref().unwrap_or("(all)"),
            state
                .glacier_after_days
                .map_or("?".into(), |d| d.to_string()),
            state
                .expire_after_days
                .map_or("never expire".into(), |d| format!("expire after {d} days")),
        ),
    }
}
