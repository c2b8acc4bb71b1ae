//! The consumer's IAM policies (for IRSA) grant exactly what `ingest
//! consume` calls, on its one stream, its one delivery stream and, for
//! enhanced fan-out, its one registered consumer.

/// What a policy file grants, as "action on resource" with the resource
/// after the account id; asserts one resource per statement and no
/// wildcard but the consumer ARN's creation time.
fn granted(file: &str) -> Vec<String> {
    let path = format!("{}/../helm/ingest/files/{file}", env!("CARGO_MANIFEST_DIR"));
    granted_by(&std::fs::read_to_string(&path).expect("the policy file"))
}

fn granted_by(text: &str) -> Vec<String> {
    let policy: serde_json::Value = serde_json::from_str(text).expect("valid JSON");
    let mut granted = Vec::new();
    for statement in policy["Statement"].as_array().expect("statements") {
        assert_eq!(statement["Effect"], "Allow");
        let resource = statement["Resource"]
            .as_str()
            .expect("one resource per statement, never a list or *");
        let (_, resource) = resource
            .split_once(":${AWS_REGION}:${AWS_ACCOUNT_ID}:")
            .expect("a resource of this region and account");
        // A registered consumer's ARN ends in its creation time, which no
        // policy written before it can know: the one wildcard allowed.
        let fixed = resource
            .strip_suffix("/consumer/${EFO_CONSUMER_NAME}:*")
            .unwrap_or(resource);
        assert!(!fixed.contains('*'), "a wildcard resource: {resource}");
        for action in statement["Action"].as_array().expect("actions") {
            let action = action.as_str().unwrap();
            assert!(!action.contains('*'), "a wildcard action: {action}");
            granted.push(format!("{action} on {resource}"));
        }
    }
    granted.sort();
    granted
}

#[test]
fn the_consumer_policy_is_least_privilege() {
    assert_eq!(
        granted("consumer-iam-policy.json"),
        [
            "firehose:PutRecordBatch on deliverystream/${DELIVERY_STREAM_NAME}",
            "kinesis:DescribeStreamSummary on stream/${STREAM_NAME}",
            "kinesis:GetRecords on stream/${STREAM_NAME}",
            "kinesis:GetShardIterator on stream/${STREAM_NAME}",
            "kinesis:ListShards on stream/${STREAM_NAME}",
        ]
    );
}

/// `--read-mode efo` adds these to the consumer's policy: it registers the
/// consumer on the stream, then describes it and subscribes as it.
#[test]
fn the_fanout_policy_adds_only_the_registered_consumer() {
    assert_eq!(
        granted("consumer-fanout-iam-policy.json"),
        [
            "kinesis:DescribeStreamConsumer on stream/${STREAM_NAME}/consumer/${EFO_CONSUMER_NAME}:*",
            "kinesis:RegisterStreamConsumer on stream/${STREAM_NAME}",
            "kinesis:SubscribeToShard on stream/${STREAM_NAME}/consumer/${EFO_CONSUMER_NAME}:*",
        ]
    );
}

/// A wildcard anywhere else is refused, the creation time's included
/// when it is not the last part.
#[test]
fn a_wildcard_elsewhere_is_refused() {
    for resource in [
        "arn:aws:kinesis:${AWS_REGION}:${AWS_ACCOUNT_ID}:stream/*",
        "arn:aws:kinesis:${AWS_REGION}:${AWS_ACCOUNT_ID}:stream/${STREAM_NAME}/consumer/*:*",
    ] {
        let policy = serde_json::json!({"Statement": [{
            "Effect": "Allow",
            "Action": ["kinesis:SubscribeToShard"],
            "Resource": resource,
        }]});
        let refused = std::panic::catch_unwind(|| granted_by(&policy.to_string()));
        assert!(refused.is_err(), "{resource} was accepted");
    }
}
