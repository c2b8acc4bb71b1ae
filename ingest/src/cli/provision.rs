//! `ingest provision`: the AWS side, created or found, idempotently.

use anyhow::Context;
use clap::Args;

use ingest::provision::iot::{self, TopicRuleSpec};
use ingest::provision::{Step, stream};
use ingest::source::kinesis::{KinesisSource, StreamCapacity};

use super::ConfigFile;

/// The IoT rule's role when an emulator stands in for AWS: moto's account,
/// and a role name that says what it is for. Against AWS the role must be
/// given (--iot-role-arn).
const EMULATOR_ROLE_ARN: &str = "arn:aws:iam::123456789012:role/ingest-iot-to-kinesis";

/// Create the AWS side, idempotently: the Kinesis stream and the IoT topic rule
/// that routes MQTT telemetry from AWS IoT Core into it. Prints, for each, what
/// it created, found or updated.
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
            role_arn: role_arn(args.iot_role_arn.clone())?,
            error_log_group: args.iot_error_log_group.clone(),
        }),
    };
    if let Some(rule) = &rule {
        rule.validate()
            .map_err(anyhow::Error::msg)
            .context("invalid --iot-rule or --iot-role-arn")?;
    }

    let source = KinesisSource::from_env(&args.stream).await?;
    report(stream::ensure(&source, capacity).await?);
    if let Some(rule) = &rule {
        report(iot::ensure(rule).await?);
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

fn role_arn(given: Option<String>) -> anyhow::Result<String> {
    if let Some(arn) = given {
        return Ok(arn);
    }
    let emulated = ["AWS_ENDPOINT_URL_IOT", "AWS_ENDPOINT_URL"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
    if emulated {
        Ok(EMULATOR_ROLE_ARN.to_owned())
    } else {
        anyhow::bail!(
            "--iot-role-arn is required against AWS: the role AWS IoT assumes to put into \
             the stream (kinesis:PutRecord) and to write the error log; or --iot-rule off"
        )
    }
}
