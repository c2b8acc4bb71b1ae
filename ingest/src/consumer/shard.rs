//! A shard task: reads one leased shard in order, decodes, and hands chunks
//! to its writer, waiting (and so not polling) while the writer is full.

use std::collections::HashMap;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::chunk::{Chunk, Committed, decode_records};
use crate::archive::Archive;
use crate::decode::{Decoder, TimeWindow, now_micros};
use crate::metrics as m;
use crate::source::kinesis::{
    FanoutReader, Fetched, KinesisSource, ReaderOptions, RetryCounts, ShardReader, SourceError,
    StartPosition,
};

/// What a shard task tells the coordinator when it stops by itself.
#[derive(Debug)]
pub struct ShardStopped {
    pub shard_id: String,
    pub lease_counter: i64,
    /// Why, when it was an error retrying could not fix.
    pub error: Option<String>,
}

pub struct ShardTask {
    pub shard_id: String,
    pub lease_counter: i64,
    pub source: KinesisSource,
    /// Read through enhanced fan-out as this consumer (ARN); None: poll.
    pub fanout_consumer: Option<String>,
    /// Where reading starts: after the checkpoint, at it (inside a KPL
    /// aggregate), or the start position.
    pub start: StartPosition,
    /// User records of the aggregate at the checkpoint already committed.
    pub committed: Option<Committed>,
    pub options: ReaderOptions,
    /// Where raw records go before they may reach the writer (and so before
    /// their checkpoint can move); None: no archive.
    pub archive: Option<Archive>,
    pub decoder: Decoder,
    /// Readings outside it become dead letters.
    pub window: TimeWindow,
    pub chunks: mpsc::Sender<Chunk>,
    /// Cancelled when the lease is lost or the worker shuts down.
    pub stop: CancellationToken,
}

impl ShardTask {
    pub async fn run(mut self) -> ShardStopped {
        let reader = match &self.fanout_consumer {
            Some(consumer) => Reader::Fanout(Box::new(self.source.fanout_reader(
                consumer,
                &self.shard_id,
                self.start.clone(),
            ))),
            None => Reader::Poll(Box::new(
                self.source
                    .shard_reader(&self.shard_id, self.start.clone(), self.options.clone())
                    .await,
            )),
        };
        let error = self.read(reader).await.err();
        if let Some(error) = &error {
            tracing::error!(shard = %self.shard_id, %error, "stopped reading the shard");
        }
        ShardStopped {
            shard_id: self.shard_id,
            lease_counter: self.lease_counter,
            error,
        }
    }

    async fn read(&mut self, mut reader: Reader) -> Result<(), String> {
        let mut retries_reported = HashMap::new();
        loop {
            let fetched = tokio::select! {
                () = self.stop.cancelled() => return Ok(()),
                fetched = reader.next() => fetched,
            };
            report_retries(&reader, &mut retries_reported);
            let fetched = fetched.map_err(|e| e.to_string())?;
            let chunk = match fetched {
                Fetched::Records {
                    records,
                    millis_behind_latest,
                } => {
                    let bytes: usize = records.iter().map(|r| r.data.len()).sum();
                    metrics::counter!(m::RECORDS_READ, "shard" => self.shard_id.clone())
                        .increment(records.len() as u64);
                    metrics::counter!(m::RECORD_BYTES_READ).increment(bytes as u64);
                    if let Some(behind) = millis_behind_latest {
                        metrics::gauge!(m::MILLIS_BEHIND_LATEST, "shard" => self.shard_id.clone())
                            .set(behind as f64);
                    }
                    let items = decode_records(
                        &mut self.decoder,
                        self.window,
                        now_micros(),
                        records,
                        self.committed.as_ref(),
                    );
                    if let Some(archive) = &self.archive {
                        // User records, not aggregates: one JSON document per
                        // line, as Firehose itself de-aggregates KPL records.
                        let raw: Vec<Bytes> = items.iter().map(|item| item.raw.clone()).collect();
                        tokio::select! {
                            () = self.stop.cancelled() => return Ok(()),
                            () = archive.put(&raw) => {}
                        }
                    }
                    Chunk {
                        shard_id: self.shard_id.clone(),
                        lease_counter: self.lease_counter,
                        items,
                        end_of_shard: false,
                        millis_behind_latest,
                    }
                }
                Fetched::EndOfShard => Chunk {
                    shard_id: self.shard_id.clone(),
                    lease_counter: self.lease_counter,
                    items: Vec::new(),
                    end_of_shard: true,
                    millis_behind_latest: Some(0),
                },
            };
            let end = chunk.end_of_shard;
            tokio::select! {
                () = self.stop.cancelled() => return Ok(()),
                sent = self.chunks.send(chunk) => if sent.is_err() { return Ok(()) },
            }
            if end {
                tracing::info!(shard = %self.shard_id, "read the shard to its end");
                return Ok(());
            }
        }
    }
}

/// A shard polled or subscribed to: the same records either way. (Boxed:
/// the two differ much in size.)
enum Reader {
    Poll(Box<ShardReader>),
    Fanout(Box<FanoutReader>),
}

impl Reader {
    async fn next(&mut self) -> Result<Fetched, SourceError> {
        match self {
            Reader::Poll(reader) => reader.next().await,
            Reader::Fanout(reader) => reader.next().await,
        }
    }

    fn retries(&self) -> &RetryCounts {
        match self {
            Reader::Poll(reader) => reader.retries(),
            Reader::Fanout(reader) => reader.retries(),
        }
    }
}

/// Adds the reader's retries since the last report to `ingest_retries_total`
/// (the reader keeps running totals per cause).
fn report_retries(reader: &Reader, reported: &mut HashMap<&'static str, u64>) {
    for (cause, total) in reader.retries().snapshot() {
        let before = reported.insert(cause, total).unwrap_or(0);
        if total > before {
            metrics::counter!(m::RETRIES, "cause" => cause).increment(total - before);
        }
    }
}
