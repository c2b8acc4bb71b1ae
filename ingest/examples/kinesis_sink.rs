//! A Kinesis stand-in that costs (almost) nothing: it answers PutRecords
//! (every record accepted), DescribeStreamSummary and ListShards (one
//! shard), keeps no records, and remembers the number `"n":` of each record
//! put (of each user record of a KPL aggregate), so that a load run can
//! check that nothing was lost on the way to the Kinesis API.
//!
//! For measuring the gateway's own ceiling on a machine where the emulator
//! (kinesalite, one Node.js thread) is the slower part; it is not Kinesis,
//! and figures taken with it are the gateway's, not the pipeline's.
//!
//! ```text
//! cargo run --release --example kinesis_sink -- 127.0.0.1:25991
//! AWS_ENDPOINT_URL_KINESIS=http://127.0.0.1:25991 ingest gateway --stream sink ...
//! curl 127.0.0.1:25991/numbers    # every n put, one per line
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// How often each number was put.
type Numbers = Arc<Mutex<HashMap<u64, u32>>>;

#[tokio::main]
async fn main() {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:25991".into());
    let numbers: Numbers = Arc::default();
    let app = Router::new()
        .route(
            "/",
            post({
                let numbers = numbers.clone();
                move |headers: HeaderMap, body: Bytes| {
                    std::future::ready(answer(&numbers, &headers, &body))
                }
            }),
        )
        .route(
            "/numbers",
            get(move || {
                let numbers = numbers.lock().unwrap();
                let mut text = String::with_capacity(numbers.len() * 12);
                for (number, count) in numbers.iter() {
                    for _ in 0..*count {
                        text.push_str(&number.to_string());
                        text.push('\n');
                    }
                }
                std::future::ready(text)
            }),
        );
    let listener = tokio::net::TcpListener::bind(&address).await.expect("bind");
    eprintln!("Kinesis stand-in on http://{address}");
    axum::serve(listener, app).await.expect("serve");
}

fn answer(numbers: &Numbers, headers: &HeaderMap, body: &[u8]) -> (StatusCode, String) {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return (
            StatusCode::BAD_REQUEST,
            r#"{"__type":"SerializationException"}"#.into(),
        );
    };
    let stream = request["StreamName"].as_str().unwrap_or("sink");
    match target.rsplit('.').next() {
        Some("PutRecords") => {
            let records = request["Records"].as_array().cloned().unwrap_or_default();
            let mut found = Vec::with_capacity(records.len());
            for record in &records {
                let data = Bytes::from(decode_base64(record["Data"].as_str().unwrap_or_default()));
                let user_records = match ingest::kpl::deaggregate(&data) {
                    Ok(users) => users.into_iter().map(|user| user.data).collect(),
                    Err(_) => vec![data],
                };
                found.extend(user_records.iter().filter_map(|data| number(data)));
            }
            {
                let mut numbers = numbers.lock().unwrap();
                for n in found {
                    *numbers.entry(n).or_default() += 1;
                }
            }
            let results: Vec<Value> = (0..records.len())
                .map(|i| json!({"SequenceNumber": (i + 1).to_string(), "ShardId": "shardId-000000000000"}))
                .collect();
            (
                StatusCode::OK,
                json!({"FailedRecordCount": 0, "Records": results}).to_string(),
            )
        }
        Some("ListShards") => (
            StatusCode::OK,
            json!({"Shards": [{
                "ShardId": "shardId-000000000000",
                "HashKeyRange": {
                    "StartingHashKey": "0",
                    "EndingHashKey": u128::MAX.to_string()
                },
                "SequenceNumberRange": {"StartingSequenceNumber": "1"}
            }]})
            .to_string(),
        ),
        Some("DescribeStreamSummary") => (
            StatusCode::OK,
            json!({"StreamDescriptionSummary": {
                "StreamName": stream,
                "StreamARN": format!("arn:aws:kinesis:us-east-1:000000000000:stream/{stream}"),
                "StreamStatus": "ACTIVE",
                "RetentionPeriodHours": 24,
                "StreamCreationTimestamp": 1_763_900_000.0,
                "EnhancedMonitoring": [],
                "OpenShardCount": 1
            }})
            .to_string(),
        ),
        _ => (
            StatusCode::BAD_REQUEST,
            json!({"__type": "UnknownOperationException", "message": target}).to_string(),
        ),
    }
}

/// The number `"n":` in a record's JSON.
fn number(data: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(data).ok()?;
    let start = text.find("\"n\":")? + 4;
    let digits: String = text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut buffer, mut bits) = (0u32, 0);
    for c in text.bytes().filter_map(value) {
        buffer = (buffer << 6) | u32::from(c);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    out
}
