//! Fills a Kinesis stream with a backlog of telemetry records, for
//! `dev/measure-backlog`: creates the stream if it does not exist, then puts
//! the records (`benches::records`, canonical form, partition key the
//! device) with several PutRecords calls in flight. Times end at now, one
//! reading per device per second before it.
//!
//! ```text
//! put_backlog STREAM RECORDS SHARDS   # create (if missing) and fill
//! put_backlog --delete STREAM         # delete the stream
//! ```
//!
//! AWS endpoint and credentials come from the standard environment
//! (`eval "$(dev/stack env)"` points them at the local kinesalite).

use std::process::ExitCode;
use std::time::Instant;

use bytes::Bytes;
use futures_util::{StreamExt, stream};

use benches::records;
use ingest::source::kinesis::KinesisSource;

/// Records per put_records call: one PutRecords request each.
const PER_CALL: usize = 500;
/// PutRecords calls in flight at once.
const IN_FLIGHT: usize = 8;

const USAGE: &str = "usage: put_backlog STREAM RECORDS SHARDS | put_backlog --delete STREAM";

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [flag, stream] if flag == "--delete" => delete(stream).await,
        [stream, count, shards] => match (count.parse(), shards.parse()) {
            (Ok(count), Ok(shards)) => put(stream, count, shards).await,
            _ => Err(format!("RECORDS and SHARDS are numbers; {USAGE}")),
        },
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn delete(stream: &str) -> Result<(), String> {
    let source = KinesisSource::from_env(stream)
        .await
        .map_err(|e| e.to_string())?;
    source.delete_stream().await.map_err(|e| e.to_string())
}

async fn put(stream: &str, count: usize, shards: u32) -> Result<(), String> {
    let source = KinesisSource::from_env(stream)
        .await
        .map_err(|e| e.to_string())?;
    source
        .ensure_stream(shards)
        .await
        .map_err(|e| e.to_string())?;

    let base_ms = records::now_ms() - (count / records::DEVICES) as i64 * 1_000;
    let started = Instant::now();
    let mut calls = stream::iter((0..count).step_by(PER_CALL))
        .map(|first| {
            let source = &source;
            async move {
                let batch: Vec<(String, Bytes)> = (first..count.min(first + PER_CALL))
                    .map(|i| {
                        let data = Bytes::from(records::canonical(i, base_ms));
                        (records::device(i), data)
                    })
                    .collect();
                source.put_records(&batch).await.map(|put| put.len())
            }
        })
        .buffer_unordered(IN_FLIGHT);
    let (mut done, mut reported) = (0, 0);
    while let Some(put) = calls.next().await {
        done += put.map_err(|e| e.to_string())?;
        if done - reported >= 100_000 {
            reported = done;
            eprintln!(
                "put_backlog: {done} of {count} records ({:.0}/s)",
                done as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "put_backlog: put {done} records into {stream} ({shards} shards) in {seconds:.1} s ({:.0}/s)",
        done as f64 / seconds
    );
    Ok(())
}
