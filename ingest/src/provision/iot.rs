//! The IoT topic rule step: a rule whose Kinesis action puts the MQTT
//! telemetry of AWS IoT Core into the stream, with an error action (a
//! CloudWatch Logs group) for what the action cannot deliver. The only
//! module that knows AWS IoT types.
//!
//! Idempotent: a missing rule is created; an existing rule equal to the
//! configuration is left alone ("found"); one that differs (other SQL,
//! stream, partition key, role, error action, or disabled) is replaced with
//! the configuration ("updated"), and the output says what differed.

use aws_config::BehaviorVersion;
use aws_sdk_iot::Client;
use aws_sdk_iot::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_iot::types::{
    Action as RuleAction, CloudwatchLogsAction, KinesisAction, TopicRule, TopicRulePayload,
};

use super::{Action, ProvisionError, Step};

/// The IoT SQL version the rule is written for.
pub const SQL_VERSION: &str = "2016-03-23";
/// The rule's description, so a person in the console knows who made it.
const DESCRIPTION: &str = "ingest: MQTT telemetry into Kinesis (made by ingest provision)";

/// The rule as it should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRuleSpec {
    /// The rule's name (letters, digits and underscores).
    pub name: String,
    /// The rule's query, e.g. `SELECT *, topic(2) AS device FROM 'devices/+/telemetry'`.
    pub sql: String,
    /// The stream the Kinesis action puts into.
    pub stream: String,
    /// The partition key template, e.g. `${topic(2)}`: the device.
    pub partition_key: String,
    /// The role IoT assumes to put into the stream and write the error log.
    pub role_arn: String,
    /// The CloudWatch Logs group of the error action.
    pub error_log_group: String,
}

/// A topic rule as AWS reports it, in plain values (for tests and output).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRuleState {
    /// The query.
    pub sql: String,
    /// Whether the rule is disabled.
    pub disabled: bool,
    /// The Kinesis actions: (stream, partition key, role ARN).
    pub kinesis_actions: Vec<(String, Option<String>, String)>,
    /// The error action's log group, if it is a CloudWatch Logs action.
    pub error_log_group: Option<String>,
}

impl TopicRuleSpec {
    /// The SQL the rule gets by default: every message on `filter`, with
    /// the device from the second topic level (as the bridge's default
    /// layout `devices/{device}/telemetry` reads it).
    pub fn default_sql(filter: &str) -> String {
        format!("SELECT *, topic(2) AS device FROM '{filter}'")
    }

    /// Checks what AWS would refuse, with a message that says why.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 128
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !name_ok {
            return Err(format!(
                "rule name {:?}: use 1 to 128 letters, digits and underscores",
                self.name
            ));
        }
        if !self.role_arn.starts_with("arn:") {
            return Err(format!("role {:?} is not an ARN", self.role_arn));
        }
        Ok(())
    }

    fn payload(&self) -> Result<TopicRulePayload, ProvisionError> {
        let invalid = |err: aws_sdk_iot::error::BuildError| self.error("build", err.to_string());
        let kinesis = KinesisAction::builder()
            .stream_name(&self.stream)
            .partition_key(&self.partition_key)
            .role_arn(&self.role_arn)
            .build()
            .map_err(invalid)?;
        let logs = CloudwatchLogsAction::builder()
            .role_arn(&self.role_arn)
            .log_group_name(&self.error_log_group)
            .build()
            .map_err(invalid)?;
        TopicRulePayload::builder()
            .sql(&self.sql)
            .description(DESCRIPTION)
            .aws_iot_sql_version(SQL_VERSION)
            .rule_disabled(false)
            .actions(RuleAction::builder().kinesis(kinesis).build())
            .error_action(RuleAction::builder().cloudwatch_logs(logs).build())
            .build()
            .map_err(invalid)
    }

    /// What the rule should look like when read back.
    fn wanted(&self) -> TopicRuleState {
        TopicRuleState {
            sql: self.sql.clone(),
            disabled: false,
            kinesis_actions: vec![(
                self.stream.clone(),
                Some(self.partition_key.clone()),
                self.role_arn.clone(),
            )],
            error_log_group: Some(self.error_log_group.clone()),
        }
    }

    fn error(&self, operation: &'static str, detail: String) -> ProvisionError {
        ProvisionError::Iot {
            operation,
            rule: self.name.clone(),
            detail,
        }
    }
}

/// The IoT client, from the standard AWS configuration (`AWS_ENDPOINT_URL`
/// or `AWS_ENDPOINT_URL_IOT` point it at an emulator).
async fn client() -> Client {
    let shared = aws_config::load_defaults(BehaviorVersion::latest()).await;
    Client::new(&shared)
}

/// Creates, finds or updates the rule `spec` describes.
pub async fn ensure(spec: &TopicRuleSpec) -> Result<Step, ProvisionError> {
    spec.validate()
        .map_err(|detail| spec.error("validate", detail))?;
    let client = client().await;
    let payload = spec.payload()?;
    let wanted = spec.wanted();
    let action = match read(&client, &spec.name).await? {
        Some(current) if current == wanted => Action::Found,
        Some(current) => {
            tracing::info!(rule = %spec.name, ?current, ?wanted, "replacing the topic rule");
            client
                .replace_topic_rule()
                .rule_name(&spec.name)
                .topic_rule_payload(payload)
                .send()
                .await
                .map_err(|err| spec.error("ReplaceTopicRule", describe(&err)))?;
            Action::Updated
        }
        None => {
            let created = client
                .create_topic_rule()
                .rule_name(&spec.name)
                .topic_rule_payload(payload)
                .send()
                .await;
            match created {
                Ok(_) => Action::Created,
                Err(err) if err.code() == Some("ResourceAlreadyExistsException") => {
                    return Err(spec.error(
                        "CreateTopicRule",
                        "the rule exists but GetTopicRule cannot read it: grant \
                         iot:GetTopicRule, or choose another --iot-rule"
                            .into(),
                    ));
                }
                Err(err) => return Err(spec.error("CreateTopicRule", describe(&err))),
            }
        }
    };
    let now = read(&client, &spec.name).await?.ok_or_else(|| {
        spec.error(
            "GetTopicRule",
            "the rule is gone right after provisioning".into(),
        )
    })?;
    Ok(Step {
        resource: "topic rule",
        name: spec.name.clone(),
        action,
        detail: summary(&now),
    })
}

/// The rule named `name` as AWS reports it, or `None` when there is none.
pub async fn describe_rule(name: &str) -> Result<Option<TopicRuleState>, ProvisionError> {
    read(&client().await, name).await
}

async fn read(client: &Client, name: &str) -> Result<Option<TopicRuleState>, ProvisionError> {
    match client.get_topic_rule().rule_name(name).send().await {
        Ok(output) => Ok(output.rule().map(state)),
        // AWS answers UnauthorizedException for a rule that does not exist;
        // if it does exist, creating it fails and says so.
        Err(err)
            if matches!(
                err.code(),
                Some("ResourceNotFoundException" | "UnauthorizedException")
            ) =>
        {
            Ok(None)
        }
        Err(err) => Err(ProvisionError::Iot {
            operation: "GetTopicRule",
            rule: name.to_owned(),
            detail: describe(&err),
        }),
    }
}

fn state(rule: &TopicRule) -> TopicRuleState {
    TopicRuleState {
        sql: rule.sql().unwrap_or_default().to_owned(),
        disabled: rule.rule_disabled().unwrap_or(false),
        kinesis_actions: rule
            .actions()
            .iter()
            .filter_map(|action| action.kinesis())
            .map(|kinesis| {
                (
                    kinesis.stream_name().to_owned(),
                    kinesis.partition_key().map(str::to_owned),
                    kinesis.role_arn().to_owned(),
                )
            })
            .collect(),
        error_log_group: rule
            .error_action()
            .and_then(|action| action.cloudwatch_logs())
            .map(|logs| logs.log_group_name().to_owned()),
    }
}

fn summary(rule: &TopicRuleState) -> String {
    let actions: Vec<String> = rule
        .kinesis_actions
        .iter()
        .map(|(stream, key, _)| {
            format!(
                "Kinesis stream {stream} (partition key {})",
                key.as_deref().unwrap_or("random")
            )
        })
        .collect();
    format!(
        "{} -> {}; errors to log group {}{}",
        rule.sql,
        actions.join(", "),
        rule.error_log_group.as_deref().unwrap_or("(none)"),
        if rule.disabled { "; DISABLED" } else { "" }
    )
}

fn describe<E, R>(err: &SdkError<E, R>) -> String
where
    E: std::error::Error + ProvideErrorMetadata + 'static,
    R: std::fmt::Debug,
{
    match err.code() {
        Some(code) => format!(
            "{code}: {}. Check the credentials, the region and the role",
            err.message().unwrap_or("no message")
        ),
        None => format!(
            "{}. Check the endpoint (AWS_ENDPOINT_URL) and the network",
            DisplayErrorContext(err)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> TopicRuleSpec {
        TopicRuleSpec {
            name: "ingest_telemetry".into(),
            sql: TopicRuleSpec::default_sql("devices/+/telemetry"),
            stream: "telemetry".into(),
            partition_key: "${topic(2)}".into(),
            role_arn: "arn:aws:iam::123456789012:role/ingest-iot-to-kinesis".into(),
            error_log_group: "/ingest/iot-rule-errors".into(),
        }
    }

    #[test]
    fn the_payload_reads_back_as_wanted() {
        let spec = spec();
        let payload = spec.payload().unwrap();
        let rule = TopicRule::builder()
            .set_sql(Some(payload.sql().to_owned()))
            .set_actions(Some(payload.actions().to_vec()))
            .set_error_action(payload.error_action().cloned())
            .rule_disabled(false)
            .build();
        assert_eq!(state(&rule), spec.wanted());
        assert_eq!(
            summary(&state(&rule)),
            "SELECT *, topic(2) AS device FROM 'devices/+/telemetry' -> Kinesis stream \
             telemetry (partition key ${topic(2)}); errors to log group /ingest/iot-rule-errors"
        );
    }

    #[test]
    fn names_and_roles_are_checked() {
        assert!(spec().validate().is_ok());
        let bad_name = TopicRuleSpec {
            name: "ingest-telemetry".into(),
            ..spec()
        };
        assert!(bad_name.validate().unwrap_err().contains("underscores"));
        let bad_role = TopicRuleSpec {
            role_arn: "ingest".into(),
            ..spec()
        };
        assert!(bad_role.validate().unwrap_err().contains("not an ARN"));
    }
}
