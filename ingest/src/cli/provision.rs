//! `ingest provision`: the AWS side, created or found, idempotently.

use anyhow::Context;
use clap::Args;

use ingest::archive::{self, provision::ArchiveSpec};
use ingest::provision::iot::{self, TopicRuleSpec};
use ingest::provision::{Step, stream};
use ingest::source::kinesis::{KinesisSource, StreamCapacity};

use super::ConfigFile;

/// The IoT rule's role when an emulator stands in for AWS: moto's account,
/// and a role name that says what it is for. Against AWS the role must be
/// given (--iot-role-arn).
const EMULATOR_ROLE_ARN: &str = "arn:aws:iam::123456789012:role/ingest-iot-to-kinesis";
/// The same for the role Firehose assumes to write the bucket.
const EMULATOR_FIREHOSE_ROLE_ARN: &str = "arn:aws:iam::123456789012:role/ingest-firehose-to-s3";

/// Create the AWS side, idempotently: the Kinesis stream, the IoT topic rule
/// that routes MQTT telemetry from AWS IoT Core into it and, with --bucket and
/// --delivery-stream, the raw archive (S3 bucket, its GLACIER lifecycle, the
/// Firehose delivery stream). Prints, for each, what it created, found or
/// updated; the lifecycle as read back from S3.
///
/// Running it again changes nothing. An existing stream keeps its shards (a
/// different --shards is reported, not applied); an existing topic rule that
/// differs from the flags is replaced. AWS access and endpoints come from the
/// standard AWS environment (AWS_REGION, AWS_ENDPOINT_URL_KINESIS,
/// AWS_ENDPOINT_URL for IoT, credentials chain).
#[derive(Debug, Args)]
pub struct ProvisionArgs {
    /// The Kinesis stream: a name, or an ARN.
    #[arg(long, env = "INGEST_STREAM")]
    stream: String,
    /// Shards of a new provisioned stream. [default: 1, unless --on-demand]
    #[arg(long, env = "INGEST_SHARDS", conflicts_with = "on_demand")]
    shards: Option<u32>,
    /// Create the stream in on-demand mode (Kinesis scales its shards).
    #[arg(long, env = "INGEST_ON_DEMAND")]
    on_demand: bool,
    /// The IoT topic rule's name (letters, digits, underscores); "off" to skip it.
    #[arg(long, env = "INGEST_IOT_RULE", default_value = "ingest_telemetry")]
    iot_rule: String,
    /// The MQTT topic filter the rule takes messages from.
    #[arg(
        long,
        env = "INGEST_IOT_TOPIC_FILTER",
        default_value = "devices/+/telemetry"
    )]
    iot_topic_filter: String,
    /// The rule's whole query, instead of
    /// SELECT *, topic(2) AS device FROM '<--iot-topic-filter>'.
    #[arg(long, env = "INGEST_IOT_SQL")]
    iot_sql: Option<String>,
    /// The Kinesis action's partition key (a substitution template).
    #[arg(long, env = "INGEST_IOT_PARTITION_KEY", default_value = "${topic(2)}")]
    iot_partition_key: String,
    /// The role IoT assumes to put into the stream and to write the error log.
    /// [default with an emulator (AWS_ENDPOINT_URL set): a role in moto's account]
    #[arg(long, env = "INGEST_IOT_ROLE_ARN")]
    iot_role_arn: Option<String>,
    /// The CloudWatch Logs group of the rule's error action.
    #[arg(
        long,
        env = "INGEST_IOT_ERROR_LOG_GROUP",
        default_value = "/ingest/iot-rule-errors"
    )]
    iot_error_log_group: String,
    /// The raw archive's S3 bucket (with --delivery-stream).
    #[arg(long, env = "INGEST_BUCKET", requires = "delivery_stream")]
    bucket: Option<String>,
    /// The raw archive's Firehose delivery stream, writing gzip objects to
    /// --bucket under raw/year=/month=/day=/hour=/ (with --bucket).
    #[arg(long, env = "INGEST_DELIVERY_STREAM", requires = "bucket")]
    delivery_stream: Option<String>,
    /// Days after which archived objects move to GLACIER.
    #[arg(long, env = "INGEST_GLACIER_AFTER_DAYS", default_value_t = 30,
          value_parser = clap::value_parser!(i32).range(0..))]
    glacier_after_days: i32,
    /// Days after which archived objects are deleted. [default: never]
    #[arg(long, env = "INGEST_EXPIRE_AFTER_DAYS",
          value_parser = clap::value_parser!(i32).range(1..))]
    expire_after_days: Option<i32>,
    /// Firehose delivers a buffer after this many seconds (60 to 900) ...
    #[arg(long, env = "INGEST_ARCHIVE_BUFFER_SECONDS", default_value_t = 300,
          value_parser = clap::value_parser!(i32).range(0..=900))]
    archive_buffer_seconds: i32,
    /// ... or this many MiB (1 to 128), whichever comes first.
    #[arg(long, env = "INGEST_ARCHIVE_BUFFER_MIB", default_value_t = 5,
          value_parser = clap::value_parser!(i32).range(1..=128))]
    archive_buffer_mib: i32,
    /// The role Firehose assumes to write the bucket.
    /// [default with an emulator (AWS_ENDPOINT_URL set): a role in moto's account]
    #[arg(long, env = "INGEST_FIREHOSE_ROLE_ARN")]
    firehose_role_arn: Option<String>,
}

pub async fn run(args: ProvisionArgs, _file: ConfigFile) -> anyhow::Result<()> {
    let capacity = if args.on_demand {
        StreamCapacity::OnDemand
    } else {
        StreamCapacity::Provisioned {
            shards: args.shards.unwrap_or(1),
        }
    };
    let rule = match args.iot_rule.as_str() {
        "off" | "none" => None,
        name => Some(TopicRuleSpec {
            name: name.to_owned(),
            sql: args
                .iot_sql
                .clone()
                .unwrap_or_else(|| TopicRuleSpec::default_sql(&args.iot_topic_filter)),
            stream: stream_name(&args.stream).to_owned(),
            partition_key: args.iot_partition_key.clone(),
            role_arn: role_arn(
                args.iot_role_arn.clone(),
                EMULATOR_ROLE_ARN,
                "--iot-role-arn is required against AWS: the role AWS IoT assumes to put into \
                 the stream (kinesis:PutRecord) and to write the error log; or --iot-rule off",
            )?,
            error_log_group: args.iot_error_log_group.clone(),
        }),
    };
    if let Some(rule) = &rule {
        rule.validate()
            .map_err(anyhow::Error::msg)
            .context("invalid --iot-rule or --iot-role-arn")?;
    }
    let archive = match (&args.bucket, &args.delivery_stream) {
        (Some(bucket), Some(delivery_stream)) => Some(ArchiveSpec {
            bucket: bucket.clone(),
            delivery_stream: delivery_stream.clone(),
            role_arn: role_arn(
                args.firehose_role_arn.clone(),
                EMULATOR_FIREHOSE_ROLE_ARN,
                "--firehose-role-arn is required against AWS: the role Firehose assumes to \
                 write the bucket (s3:PutObject and friends)",
            )?,
            glacier_after_days: args.glacier_after_days,
            expire_after_days: args.expire_after_days,
            buffer_seconds: args.archive_buffer_seconds,
            buffer_mib: args.archive_buffer_mib,
        }),
        _ => None,
    };

    let source = KinesisSource::from_env(&args.stream).await?;
    report(stream::ensure(&source, capacity).await?);
    if let Some(rule) = &rule {
        report(iot::ensure(rule).await?);
    }
    if let Some(archive) = &archive {
        for line in archive::provision::provision(archive).await? {
            println!("{line}");
        }
    }
    Ok(())
}

fn report(step: Step) {
    println!("{step}");
}

/// The stream's name, also when given as an ARN (the IoT action wants the name).
fn stream_name(stream: &str) -> &str {
    stream
        .rsplit_once(":stream/")
        .map_or(stream, |(_, name)| name)
}

/// The given role, or against an emulator a stand-in one; against AWS a role
/// must be given, and `required` says which and why.
fn role_arn(given: Option<String>, emulated_role: &str, required: &str) -> anyhow::Result<String> {
    if let Some(arn) = given {
        return Ok(arn);
    }
    let emulated = ["AWS_ENDPOINT_URL_IOT", "AWS_ENDPOINT_URL"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
    if emulated {
        Ok(emulated_role.to_owned())
    } else {
        anyhow::bail!("{required}")
    }
}
