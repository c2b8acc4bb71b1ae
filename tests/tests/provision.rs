//! `ingest provision` against the stack's emulators (kinesalite for the
//! stream, moto for the IoT topic rule): what it prints, what it made, and
//! that running it again changes nothing. Each test names its own stream
//! and rule.

use std::process::Command;

use ingest::archive::provision::{lifecycle, s3_client};
use ingest::provision::iot::{TopicRuleState, describe_rule};
use ingest::source::kinesis::KinesisSource;

use tests::{START_HINT, run_ingest, text};

/// A name of this test run's own (stream names take dashes, rule names not).
fn unique(test: &str) -> (String, String) {
    let id = format!("{test}_{}", std::process::id());
    (
        format!("prov-{}", id.replace('_', "-")),
        format!("prov_{id}"),
    )
}

fn provision(args: &[&str]) -> (bool, String, String) {
    assert!(
        std::env::var("AWS_ENDPOINT_URL").is_ok()
            && std::env::var("AWS_ENDPOINT_URL_KINESIS").is_ok(),
        "AWS_ENDPOINT_URL and AWS_ENDPOINT_URL_KINESIS are not set: {START_HINT}"
    );
    let mut all = vec!["provision"];
    all.extend_from_slice(args);
    let output = run_ingest(&all, &[]);
    let (stdout, stderr) = text(&output);
    (output.status.success(), stdout, stderr)
}

#[tokio::test]
async fn provisioning_twice_creates_then_finds_the_same() {
    let (stream, rule) = unique("twice");
    let args = ["--stream", &stream, "--shards", "2", "--iot-rule", &rule];

    let (ok, stdout, stderr) = provision(&args);
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with(&format!(
            "stream      {stream}: created; provisioned, 2 open shards"
        )),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with(&format!("topic rule  {rule}: created; ")),
        "{stdout}"
    );
    assert!(
        lines[1].contains(&format!(
            "SELECT *, topic(2) AS device FROM 'devices/+/telemetry' -> Kinesis stream {stream} \
             (partition key ${{topic(2)}}); errors to log group /ingest/iot-rule-errors"
        )),
        "{stdout}"
    );

    let (ok, again, stderr) = provision(&args);
    assert!(ok, "{stderr}");
    assert_eq!(again, stdout.replace(": created;", ": found;"));

    // What the emulators hold, read back independently of the output.
    let source = KinesisSource::from_env(&stream).await.unwrap();
    let description = source.describe_stream().await.unwrap().expect("the stream");
    assert_eq!((description.open_shards, description.on_demand), (2, false));
    assert_eq!(description.status, "ACTIVE");
    let state = describe_rule(&rule).await.unwrap().expect("the rule");
    assert_eq!(
        state,
        TopicRuleState {
            sql: "SELECT *, topic(2) AS device FROM 'devices/+/telemetry'".into(),
            disabled: false,
            kinesis_actions: vec![(
                stream.clone(),
                Some("${topic(2)}".into()),
                "arn:aws:iam::123456789012:role/ingest-iot-to-kinesis".into()
            )],
            error_log_group: Some("/ingest/iot-rule-errors".into()),
        }
    );
    source.delete_stream().await.unwrap();
}

#[tokio::test]
async fn a_rule_that_differs_is_replaced_and_a_stream_is_never_resharded() {
    let (stream, rule) = unique("differs");
    let (ok, _, stderr) = provision(&["--stream", &stream, "--iot-rule", &rule]);
    assert!(ok, "{stderr}");

    let changed = [
        "--stream",
        &stream,
        "--shards",
        "3",
        "--iot-rule",
        &rule,
        "--iot-topic-filter",
        "home/+/+/+/+/data",
        "--iot-partition-key",
        "${topic(3)}",
    ];
    let (ok, stdout, stderr) = provision(&changed);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("1 open shards") && stdout.contains("(--shards 3 not applied"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("topic rule  {rule}: updated; ")),
        "{stdout}"
    );
    let state = describe_rule(&rule).await.unwrap().expect("the rule");
    assert_eq!(
        state.sql,
        "SELECT *, topic(2) AS device FROM 'home/+/+/+/+/data'"
    );
    assert_eq!(state.kinesis_actions[0].1.as_deref(), Some("${topic(3)}"));

    let (ok, stdout, stderr) = provision(&changed);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(&format!("topic rule  {rule}: found; ")),
        "{stdout}"
    );
    let source = KinesisSource::from_env(&stream).await.unwrap();
    assert_eq!(
        source.describe_stream().await.unwrap().unwrap().open_shards,
        1
    );
    source.delete_stream().await.unwrap();
}

#[tokio::test]
async fn what_cannot_be_done_is_said_in_one_line() {
    let (stream, _) = unique("cannot");
    // Kinesalite has no on-demand mode: said, and nothing half-made.
    let (ok, stdout, stderr) =
        provision(&["--stream", &stream, "--on-demand", "--iot-rule", "off"]);
    assert!(!ok, "{stdout}");
    assert!(
        stderr.starts_with(&format!(
            "error: stream {stream}: this Kinesis endpoint does not create on-demand streams"
        )),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let source = KinesisSource::from_env(&stream).await.unwrap();
    assert_eq!(source.describe_stream().await.unwrap(), None);

    // A bad rule name is refused before anything is made.
    let (ok, _, stderr) = provision(&["--stream", &stream, "--iot-rule", "not-valid"]);
    assert!(!ok);
    assert!(
        stderr.contains("letters, digits and underscores"),
        "{stderr}"
    );
    assert_eq!(source.describe_stream().await.unwrap(), None);

    // Against AWS (no emulator endpoint) the rule's role must be given.
    let output = Command::new(tests::ingest_bin())
        .args(["provision", "--stream", &stream])
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_ENDPOINT_URL_IOT")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--iot-role-arn is required against AWS"),
        "{stderr}"
    );

    // --iot-rule off: the stream alone.
    let (ok, stdout, stderr) = provision(&["--stream", &stream, "--iot-rule", "off"]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    source.delete_stream().await.unwrap();
}

#[tokio::test]
async fn the_archive_flags_make_the_bucket_lifecycle_and_delivery_stream_once() {
    let (stream, _) = unique("archive");
    let bucket = format!("{stream}-raw");
    let delivery = format!("{stream}-firehose");
    let args = [
        "--stream",
        &stream,
        "--iot-rule",
        "off",
        "--bucket",
        &bucket,
        "--delivery-stream",
        &delivery,
        "--glacier-after-days",
        "14",
        "--expire-after-days",
        "400",
    ];
    let (ok, stdout, stderr) = provision(&args);
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert_eq!(lines[1], format!("bucket          {bucket}: created"));
    assert_eq!(
        lines[2],
        "lifecycle       created: enabled: objects under raw/ to GLACIER after 14 days, \
         expire after 400 days"
    );
    assert!(
        lines[3].starts_with(&format!(
            "delivery stream {delivery}: created (gzip, to s3://{bucket}/raw/year="
        )) && lines[3].ends_with("buffer 300 s or 5 MiB)"),
        "{stdout}"
    );

    // What S3 holds, read back independently of the output.
    let shared = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let state = lifecycle(&s3_client(&shared), &bucket)
        .await
        .unwrap()
        .expect("a lifecycle rule");
    assert_eq!(
        (state.glacier_after_days, state.expire_after_days),
        (Some(14), Some(400))
    );
    let firehose = aws_sdk_firehose::Client::new(&shared);
    let described = firehose
        .describe_delivery_stream()
        .delivery_stream_name(&delivery)
        .send()
        .await
        .expect("the delivery stream");
    assert_eq!(
        described
            .delivery_stream_description()
            .map(|d| d.delivery_stream_name()),
        Some(delivery.as_str())
    );

    // Again: nothing created, nothing changed.
    let (ok, again, stderr) = provision(&args);
    assert!(ok, "{stderr}");
    let again: Vec<&str> = again.lines().collect();
    assert_eq!(again[1], format!("bucket          {bucket}: exists"));
    assert!(
        again[2].starts_with("lifecycle       unchanged: "),
        "{again:?}"
    );
    assert_eq!(again[3], format!("delivery stream {delivery}: exists"));

    // Only one of the pair is refused before anything is made.
    let (ok, _, stderr) = provision(&["--stream", &stream, "--bucket", &bucket]);
    assert!(!ok);
    assert!(stderr.contains("--delivery-stream"), "{stderr}");

    KinesisSource::from_env(&stream)
        .await
        .unwrap()
        .delete_stream()
        .await
        .unwrap();
}
