//! A stream's identity: its ARN and creation time, whatever text `--stream`
//! named it by. Leases are keyed by it, so a fleet started with the name and
//! one started with the ARN share one lease set, and a stream deleted and
//! created again under the same name starts with leases of its own (the old
//! ones stay under their old key: kept aside, never read again).
//!
//! Upgrade: before migration 0006 leases were keyed by the literal flag. The
//! first worker of the new version adopts those rows (see [`register`]) when
//! they were made for this stream, not an older one of the same name.

use std::time::SystemTime;

use tokio_postgres::Client;

use crate::sink::postgres::SinkError;

/// The stream as Kinesis describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamIdentity {
    pub name: String,
    pub arn: String,
    /// Kinesis StreamCreationTimestamp.
    pub created_at: SystemTime,
}

impl StreamIdentity {
    /// What the lease table's `stream` column holds for this stream:
    /// `<ARN>@<creation time>`, readable in `ingest status`.
    pub fn lease_key(&self) -> String {
        format!(
            "{}@{}",
            self.arn,
            humantime::format_rfc3339_millis(self.created_at)
        )
    }
}

/// What [`register`] did with lease rows keyed the old way.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Registered {
    /// The lease key of the stream.
    pub lease_key: String,
    /// Old keys (the literal name or ARN) whose rows became this stream's.
    pub adopted: Vec<String>,
    /// Old keys whose rows are older than the stream: an earlier stream of
    /// the same name. Left as they are.
    pub kept_aside: Vec<String>,
}

/// Records the stream in `ingest.streams` and, the first time, adopts the
/// lease rows that older versions keyed by the literal `--stream` text
/// (`given`, the name or the ARN). A key's rows are adopted only if every
/// one was made after the stream was created; otherwise they belong to an
/// older stream of that name and stay where they are. If both the name and
/// the ARN had rows (two fleets read the stream), each shard takes the
/// furthest checkpoint of the two: both wrote everything up to their own.
pub async fn register(
    client: &mut Client,
    identity: &StreamIdentity,
    given: &str,
) -> Result<Registered, SinkError> {
    let during = || SinkError::during("registering the stream's identity");
    let key = identity.lease_key();
    let transaction = client.transaction().await.map_err(during())?;
    // One registering worker at a time, so two never adopt the same rows.
    transaction
        .execute(
            "SELECT pg_advisory_xact_lock(hashtext('ingest.streams'))",
            &[],
        )
        .await
        .map_err(during())?;
    transaction
        .execute(
            "INSERT INTO ingest.streams (lease_key, name, arn, created_at)
             VALUES ($1, $2, $3, $4) ON CONFLICT (lease_key) DO NOTHING",
            &[&key, &identity.name, &identity.arn, &identity.created_at],
        )
        .await
        .map_err(during())?;
    let mut registered = Registered {
        lease_key: key.clone(),
        ..Registered::default()
    };
    let has_leases = transaction
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM ingest.shard_leases WHERE stream = $1)",
            &[&key],
        )
        .await
        .map_err(during())?
        .get::<_, bool>(0);
    if !has_leases {
        let mut old_keys = vec![identity.name.clone(), identity.arn.clone()];
        if !old_keys.iter().any(|k| k == given) {
            old_keys.push(given.to_owned());
        }
        let rows = transaction
            .query(
                "SELECT stream, min(created_at) >= $2 FROM ingest.shard_leases
                 WHERE stream = ANY ($1) GROUP BY stream ORDER BY stream",
                &[&old_keys, &identity.created_at],
            )
            .await
            .map_err(during())?;
        for row in rows {
            let old_key: String = row.get(0);
            if row.get::<_, bool>(1) {
                registered.adopted.push(old_key);
            } else {
                registered.kept_aside.push(old_key);
            }
        }
        if !registered.adopted.is_empty() {
            transaction
                .execute(
                    "INSERT INTO ingest.shard_leases
                         (stream, shard_id, parent_shard_ids, lease_counter, checkpoint, ended,
                          created_at, millis_behind_latest, start_at)
                     SELECT DISTINCT ON (shard_id) $1, shard_id, parent_shard_ids, lease_counter,
                            checkpoint, ended, created_at, millis_behind_latest, start_at
                     FROM ingest.shard_leases WHERE stream = ANY ($2)
                     ORDER BY shard_id, ended DESC, checkpoint::numeric DESC NULLS LAST",
                    &[&key, &registered.adopted],
                )
                .await
                .map_err(during())?;
            for table in ["shard_leases", "workers"] {
                transaction
                    .execute(
                        &format!("DELETE FROM ingest.{table} WHERE stream = ANY ($1)"),
                        &[&registered.adopted],
                    )
                    .await
                    .map_err(during())?;
            }
        }
    }
    transaction.commit().await.map_err(during())?;
    Ok(registered)
}

/// The lease key for what a person typed (`ingest status --stream`): the
/// newest stream of that name, ARN or key in `ingest.streams`; else the text
/// itself (leases of a version before migration 0006).
pub async fn resolve(client: &Client, stream: &str) -> Result<String, SinkError> {
    let row = client
        .query_opt(
            "SELECT lease_key FROM ingest.streams
             WHERE lease_key = $1 OR name = $1 OR arn = $1
             ORDER BY created_at DESC LIMIT 1",
            &[&stream],
        )
        .await
        .map_err(SinkError::during("reading the streams"))?;
    Ok(row.map_or_else(|| stream.to_owned(), |row| row.get(0)))
}

/// The other lease keys of streams with the same name: older streams whose
/// leases are kept aside.
pub async fn kept_aside(client: &Client, lease_key: &str) -> Result<Vec<String>, SinkError> {
    let rows = client
        .query(
            "SELECT o.lease_key FROM ingest.streams s JOIN ingest.streams o
                 ON o.name = s.name AND o.lease_key <> s.lease_key
             WHERE s.lease_key = $1 ORDER BY o.created_at",
            &[&lease_key],
        )
        .await
        .map_err(SinkError::during("reading the streams"))?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_key_is_the_arn_and_the_creation_time() {
        let identity = StreamIdentity {
            name: "telemetry".into(),
            arn: "arn:aws:kinesis:us-east-1:000000000000:stream/telemetry".into(),
            created_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_500_000_123),
        };
        assert_eq!(
            identity.lease_key(),
            "arn:aws:kinesis:us-east-1:000000000000:stream/telemetry@2025-11-30T10:53:20.123Z"
        );
    }
}
