//! Planning and applying migrations.
//!
//! `apply` holds a session advisory lock for the whole run, so that pods
//! starting at once apply each migration exactly once: the others wait, then
//! find nothing left to do. Each migration runs in its own transaction
//! together with its row in `ingest.schema_migrations`, so a failed one
//! leaves nothing half-done.

use tokio_postgres::Client;

use crate::SchemaError;
use crate::migration::{MIGRATIONS, Migration};
use crate::storage::{self, Settings, Storage, StorageChoice};

/// Key of the advisory lock taken by `apply` ("ingest" in ASCII).
const MIGRATION_LOCK: i64 = 0x696e_6765_7374;

/// A migration recorded as applied.
#[derive(Debug, Clone)]
pub struct Applied {
    /// Its version.
    pub version: i32,
    /// Its name when it was applied.
    pub name: String,
    /// When it was applied, as the server printed it.
    pub applied_at: String,
}

/// What `apply` would do.
#[derive(Debug)]
pub struct Plan {
    /// The storage path in use, or that would be chosen.
    pub storage: Storage,
    /// Why that storage, in words.
    pub storage_reason: String,
    /// Migrations already applied, oldest first.
    pub applied: Vec<Applied>,
    /// Migrations still to apply, in order.
    pub pending: Vec<&'static Migration>,
}

/// What `apply` did.
#[derive(Debug)]
pub struct Report {
    /// The plan it carried out.
    pub plan: Plan,
    /// The storage settings in force, in words.
    pub settings: Vec<String>,
}

/// The storage recorded by the first migration run, or None before it.
pub async fn recorded_storage(client: &Client) -> Result<Option<Storage>, SchemaError> {
    Ok(applied_rows(client).await?.first().map(|row| row.storage))
}

struct AppliedRow {
    applied: Applied,
    storage: Storage,
    checksum: String,
}

async fn applied_rows(client: &Client) -> Result<Vec<AppliedRow>, SchemaError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('ingest.schema_migrations') IS NOT NULL",
            &[],
        )
        .await
        .map_err(SchemaError::database(
            "looking for ingest.schema_migrations",
        ))?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT version, name, storage, checksum, applied_at::text
             FROM ingest.schema_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(SchemaError::database("reading ingest.schema_migrations"))?;
    rows.into_iter()
        .map(|row| {
            let storage_name: String = row.get(2);
            let storage =
                Storage::from_name(&storage_name).ok_or_else(|| SchemaError::StorageMismatch {
                    existing: storage_name.clone(),
                    requested: "one this binary knows".to_string(),
                })?;
            Ok(AppliedRow {
                applied: Applied {
                    version: row.get(0),
                    name: row.get(1),
                    applied_at: row.get(4),
                },
                storage,
                checksum: row.get(3),
            })
        })
        .collect()
}

/// Reads what is applied, checks it against the embedded migrations and
/// says what `apply` would do. Changes nothing.
pub async fn plan(client: &Client, choice: StorageChoice) -> Result<Plan, SchemaError> {
    let rows = applied_rows(client).await?;
    let (storage, storage_reason) = match rows.first() {
        Some(first) => {
            if let StorageChoice::Only(requested) = choice
                && requested != first.storage
            {
                return Err(SchemaError::StorageMismatch {
                    existing: first.storage.name().to_string(),
                    requested: requested.name().to_string(),
                });
            }
            let reason = match storage::timescaledb_version(client, first.storage).await? {
                Some(version) => {
                    format!("chosen when the schema was created; TimescaleDB {version}")
                }
                None => "chosen when the schema was created".to_string(),
            };
            (first.storage, reason)
        }
        None => storage::choose(client, choice).await?,
    };

    for row in &rows {
        let version = row.applied.version;
        let migration = MIGRATIONS
            .iter()
            .find(|m| m.version == version)
            .ok_or(SchemaError::UnknownVersion { version })?;
        let expected: String = client
            .query_one("SELECT md5($1)", &[&migration.sql(storage)])
            .await
            .map_err(SchemaError::database("checking migration checksums"))?
            .get(0);
        if expected != row.checksum {
            return Err(SchemaError::ChecksumMismatch {
                version,
                name: row.applied.name.clone(),
            });
        }
    }

    let last_applied = rows.last().map_or(0, |row| row.applied.version);
    Ok(Plan {
        storage,
        storage_reason,
        applied: rows.into_iter().map(|row| row.applied).collect(),
        pending: MIGRATIONS
            .iter()
            .filter(|m| m.version > last_applied)
            .collect(),
    })
}

/// Applies every pending migration, then the storage settings, under the
/// migration lock. Safe to run from several processes at once, and a second
/// run changes nothing.
pub async fn apply(
    client: &mut Client,
    choice: StorageChoice,
    settings: &Settings,
) -> Result<Report, SchemaError> {
    let got_lock: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(SchemaError::database("taking the migration lock"))?
        .get(0);
    if !got_lock {
        tracing::info!("another migration is running; waiting for it to finish");
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(SchemaError::database("waiting for the migration lock"))?;
    }
    let result = apply_locked(client, choice, settings).await;
    // The lock goes with the session anyway; unlocking keeps a pooled
    // connection clean. Its own failure would hide the real outcome.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result
}

async fn apply_locked(
    client: &mut Client,
    choice: StorageChoice,
    settings: &Settings,
) -> Result<Report, SchemaError> {
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS ingest;
             CREATE TABLE IF NOT EXISTS ingest.schema_migrations (
                 version     integer     PRIMARY KEY,
                 name        text        NOT NULL,
                 -- The storage path the schema was created for; fixed from then on.
                 storage     text        NOT NULL,
                 -- md5 of the SQL that ran, to catch edited migrations.
                 checksum    text        NOT NULL,
                 applied_at  timestamptz NOT NULL DEFAULT now()
             );",
        )
        .await
        .map_err(SchemaError::database("creating ingest.schema_migrations"))?;

    let plan = plan(client, choice).await?;
    for migration in &plan.pending {
        let during = format!(
            "applying migration {} ({})",
            migration.version, migration.name
        );
        let sql = migration.sql(plan.storage);
        let transaction = client
            .transaction()
            .await
            .map_err(SchemaError::database(during.clone()))?;
        transaction
            .batch_execute(&sql)
            .await
            .map_err(SchemaError::database(during.clone()))?;
        transaction
            .execute(
                "INSERT INTO ingest.schema_migrations (version, name, storage, checksum)
                 VALUES ($1, $2, $3, md5($4))",
                &[
                    &migration.version,
                    &migration.name,
                    &plan.storage.name(),
                    &sql,
                ],
            )
            .await
            .map_err(SchemaError::database(during.clone()))?;
        transaction
            .commit()
            .await
            .map_err(SchemaError::database(during))?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applied migration"
        );
    }

    let settings = storage::apply_settings(client, plan.storage, settings).await?;
    Ok(Report { plan, settings })
}
