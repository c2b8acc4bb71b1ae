//! The consumer's IAM policy (for IRSA) grants exactly what `ingest consume`
//! calls, on its one stream and its one delivery stream.

#[test]
fn the_consumer_policy_is_least_privilege() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../helm/ingest/files/consumer-iam-policy.json"
    );
    let text = std::fs::read_to_string(path).expect("the policy file");
    let policy: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let statements = policy["Statement"].as_array().expect("statements");
    let mut granted = Vec::new();
    for statement in statements {
        assert_eq!(statement["Effect"], "Allow");
        let resource = statement["Resource"]
            .as_str()
            .expect("one resource per statement, never a list or *");
        assert!(!resource.contains('*'), "a wildcard resource: {resource}");
        for action in statement["Action"].as_array().expect("actions") {
            let action = action.as_str().unwrap();
            assert!(!action.contains('*'), "a wildcard action: {action}");
            granted.push(format!(
                "{action} on {}",
                resource.rsplit(':').next().unwrap()
            ));
        }
    }
    granted.sort();
    assert_eq!(
        granted,
        [
            "firehose:PutRecordBatch on deliverystream/${DELIVERY_STREAM_NAME}",
            "kinesis:DescribeStreamSummary on stream/${STREAM_NAME}",
            "kinesis:GetRecords on stream/${STREAM_NAME}",
            "kinesis:GetShardIterator on stream/${STREAM_NAME}",
            "kinesis:ListShards on stream/${STREAM_NAME}",
        ]
    );
}
