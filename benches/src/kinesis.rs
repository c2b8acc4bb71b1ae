//! A Kinesis stand-in for the end-to-end benchmark: a stream of shards
//! generated beforehand and served from memory over the real Kinesis HTTP
//! API (JSON 1.1: ListShards, DescribeStreamSummary, GetShardIterator,
//! GetRecords), so that `ingest consume` runs its own code paths, SDK
//! included, against a source that costs almost nothing. Any stream name
//! is the same stream; each name has its own ARN and creation time (a
//! hash of the name), so a new name is a new stream to the consumer
//! (fresh leases).
//!
//! Each record's JSON (base64 data and all) is built once, at start; a
//! GetRecords answer joins the prepared pieces. The server runs on a
//! thread of its own, whose CPU time [`StandIn::cpu`] reports, so that
//! the benchmark can tell the consumer's CPU from the stand-in's.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::Engine;
use serde_json::{Value, json};

/// The stand-in's stream: per shard, each record's JSON in the GetRecords
/// answer, in order.
#[derive(Debug)]
struct Stream {
    shards: Vec<Vec<String>>,
}

/// A running stand-in.
#[derive(Debug)]
pub struct StandIn {
    /// Where it listens, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    /// Each shard's last sequence number.
    pub last_sequences: Vec<String>,
    /// /proc path of the server thread's stat file.
    thread_stat: String,
}

/// The sequence number of record `index` of shard `shard`: increasing
/// within a shard, compared as numbers.
pub fn sequence_number(shard: usize, index: usize) -> String {
    format!(
        "{}",
        49_600_000_000_000_000_000u128 + (shard as u128) * 1_000_000_000_000 + index as u128
    )
}

fn position_of(shard: usize, sequence: &str) -> Option<usize> {
    let number: u128 = sequence.parse().ok()?;
    let index =
        number.checked_sub(49_600_000_000_000_000_000u128 + (shard as u128) * 1_000_000_000_000)?;
    usize::try_from(index).ok()
}

/// The id of shard `shard`.
pub fn shard_id(shard: usize) -> String {
    format!("shardId-{shard:012}")
}

impl StandIn {
    /// Starts serving `shards` (per shard, (partition key, data) in order)
    /// on a loopback port of its own.
    pub fn start(shards: Vec<Vec<(String, Vec<u8>)>>) -> StandIn {
        let arrival = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs_f64();
        let last_sequences = shards
            .iter()
            .enumerate()
            .map(|(shard, records)| sequence_number(shard, records.len().saturating_sub(1)))
            .collect();
        let stream = Arc::new(Stream {
            shards: shards
                .into_iter()
                .enumerate()
                .map(|(shard, records)| {
                    records
                        .into_iter()
                        .enumerate()
                        .map(|(index, (key, data))| {
                            json!({
                                "SequenceNumber": sequence_number(shard, index),
                                "ApproximateArrivalTimestamp": arrival,
                                "Data": base64::engine::general_purpose::STANDARD.encode(&data),
                                "PartitionKey": key,
                            })
                            .to_string()
                        })
                        .collect()
                })
                .collect(),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("kinesis-stand-in".into())
            .spawn(move || {
                let thread_stat = std::fs::read_link("/proc/thread-self")
                    .map(|path| format!("{}/stat", path.display()))
                    .unwrap_or_default();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the stand-in");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                        .await
                        .expect("a loopback port");
                    let address = listener.local_addr().expect("its address");
                    let app = Router::new().route(
                        "/",
                        post(move |headers: HeaderMap, body: Bytes| {
                            std::future::ready(answer(&stream, &headers, &body))
                        }),
                    );
                    ready_tx
                        .send((format!("http://{address}"), thread_stat))
                        .expect("the benchmark waits");
                    axum::serve(listener, app).await.expect("serve");
                });
            })
            .expect("the stand-in's thread");
        let (url, thread_stat) = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the stand-in listens");
        StandIn {
            url,
            last_sequences,
            thread_stat,
        }
    }

    /// CPU time the server thread used so far.
    pub fn cpu(&self) -> Duration {
        thread_cpu(&self.thread_stat)
    }
}

/// CPU time (user and system) in a /proc stat file, of a process or thread.
pub fn thread_cpu(stat_path: &str) -> Duration {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the
    // 14th field of the line, stime the 15th, in clock ticks (100 a second).
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// CPU time this whole process used so far.
pub fn process_cpu() -> Duration {
    thread_cpu("/proc/self/stat")
}

fn answer(stream: &Stream, headers: &HeaderMap, body: &[u8]) -> (StatusCode, String) {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return error("SerializationException", "not JSON");
    };
    let shard_index = |request: &Value| {
        request["ShardId"]
            .as_str()
            .and_then(|id| id.strip_prefix("shardId-"))
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n < stream.shards.len())
    };
    match target.rsplit('.').next() {
        Some("DescribeStreamSummary") => {
            let name = request["StreamName"].as_str().unwrap_or("bench");
            // The same name, the same stream: one creation time per name.
            let mut hasher = DefaultHasher::new();
            name.hash(&mut hasher);
            let created = 1_700_000_000.0 + (hasher.finish() % 60_000_000) as f64;
            ok(json!({"StreamDescriptionSummary": {
                "StreamName": name,
                "StreamARN": format!("arn:aws:kinesis:us-east-1:000000000000:stream/{name}"),
                "StreamStatus": "ACTIVE",
                "RetentionPeriodHours": 24,
                "StreamCreationTimestamp": created,
                "EnhancedMonitoring": [],
                "OpenShardCount": stream.shards.len()
            }}))
        }
        Some("ListShards") => {
            let width = u128::MAX / stream.shards.len() as u128;
            let shards: Vec<Value> = (0..stream.shards.len())
                .map(|shard| {
                    let start = width * shard as u128 + shard as u128;
                    let end = if shard + 1 == stream.shards.len() {
                        u128::MAX
                    } else {
                        width * (shard as u128 + 1) + shard as u128
                    };
                    json!({
                        "ShardId": shard_id(shard),
                        "HashKeyRange": {"StartingHashKey": start.to_string(), "EndingHashKey": end.to_string()},
                        "SequenceNumberRange": {"StartingSequenceNumber": sequence_number(shard, 0)}
                    })
                })
                .collect();
            ok(json!({"Shards": shards}))
        }
        Some("GetShardIterator") => {
            let Some(shard) = shard_index(&request) else {
                return error("ResourceNotFoundException", "no such shard");
            };
            let sequence = request["StartingSequenceNumber"]
                .as_str()
                .unwrap_or_default();
            let position = match request["ShardIteratorType"].as_str() {
                Some("TRIM_HORIZON") => Some(0),
                Some("LATEST") => Some(stream.shards[shard].len()),
                Some("AT_SEQUENCE_NUMBER") => position_of(shard, sequence),
                Some("AFTER_SEQUENCE_NUMBER") => position_of(shard, sequence).map(|p| p + 1),
                _ => None,
            };
            match position {
                Some(position) => ok(json!({"ShardIterator": format!("{shard}:{position}")})),
                None => error(
                    "InvalidArgumentException",
                    "iterator type or sequence number",
                ),
            }
        }
        Some("GetRecords") => {
            let iterator = request["ShardIterator"].as_str().unwrap_or_default();
            let Some((shard, position)) = iterator
                .split_once(':')
                .and_then(|(s, p)| Some((s.parse::<usize>().ok()?, p.parse::<usize>().ok()?)))
                .filter(|(shard, _)| *shard < stream.shards.len())
            else {
                return error(
                    "InvalidArgumentException",
                    "not a shard iterator of this stand-in",
                );
            };
            let limit = request["Limit"].as_u64().unwrap_or(10_000) as usize;
            let records = &stream.shards[shard];
            let end = (position + limit).min(records.len());
            let position = position.min(end);
            let mut body = String::with_capacity(
                64 + records[position..end]
                    .iter()
                    .map(|r| r.len() + 1)
                    .sum::<usize>(),
            );
            body.push_str(r#"{"Records":["#);
            for (i, record) in records[position..end].iter().enumerate() {
                if i > 0 {
                    body.push(',');
                }
                body.push_str(record);
            }
            body.push_str(&format!(
                r#"],"NextShardIterator":"{shard}:{end}","MillisBehindLatest":0}}"#
            ));
            (StatusCode::OK, body)
        }
        _ => error("UnknownOperationException", target),
    }
}

fn ok(body: Value) -> (StatusCode, String) {
    (StatusCode::OK, body.to_string())
}

fn error(kind: &str, message: &str) -> (StatusCode, String) {
    (
        StatusCode::BAD_REQUEST,
        json!({"__type": kind, "message": message}).to_string(),
    )
}
