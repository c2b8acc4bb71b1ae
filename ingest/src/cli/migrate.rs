//! `ingest migrate`: create or upgrade the schema and apply the storage settings.

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde::Deserialize;

use ingest::config::{ConfigError, parse_duration, parse_optional_duration};
use schema::{Plan, Settings, Storage, StorageChoice};

use super::{ConfigFile, DatabaseArgs};

/// Create or upgrade the database schema, then apply the storage settings.
///
/// Migrations are embedded in this binary and recorded in
/// ingest.schema_migrations; several processes may run this at once (an
/// advisory lock serialises them) and a second run changes nothing. The
/// storage is chosen on the first run: TimescaleDB hypertables when the server
/// has TimescaleDB, else plain PostgreSQL partitions kept by pg_partman when it
/// is installed, else by ingest's own maintenance.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    /// Print what would be done, and change nothing.
    #[arg(long, env = "INGEST_MIGRATE_DRY_RUN")]
    dry_run: bool,
    #[command(flatten)]
    settings: MigrateSettingsArgs,
}

/// Storage settings. In the config file: section [migrate].
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MigrateSettingsArgs {
    /// Storage for a new schema: auto, timescaledb, partman or native (fixed
    /// after the first run). [default: auto]
    #[arg(long, env = "INGEST_STORAGE", value_name = "STORAGE")]
    storage: Option<StorageArg>,
    /// Width of a TimescaleDB chunk or of a new partition. [default: 1 day]
    #[arg(long, env = "INGEST_CHUNK_INTERVAL", value_name = "DURATION")]
    chunk_interval: Option<String>,
    /// Compress chunks older than this (TimescaleDB), or "none". [default: 7 days]
    #[arg(long, env = "INGEST_COMPRESS_AFTER", value_name = "DURATION")]
    compress_after: Option<String>,
    /// Drop samples and events older than this, or "none". [default: none]
    #[arg(long, env = "INGEST_RETENTION", value_name = "DURATION")]
    retention: Option<String>,
    /// Partitions to keep ready ahead of now (plain PostgreSQL). [default: 4]
    #[arg(long, env = "INGEST_PARTITIONS_AHEAD", value_name = "N")]
    partitions_ahead: Option<u32>,
}

#[derive(Debug, Clone, Copy, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum StorageArg {
    Auto,
    Timescaledb,
    Partman,
    Native,
}

impl MigrateSettingsArgs {
    fn validate(self, file: MigrateSettingsArgs) -> Result<(StorageChoice, Settings), ConfigError> {
        let defaults = Settings::default();
        let storage = match self.storage.or(file.storage).unwrap_or(StorageArg::Auto) {
            StorageArg::Auto => StorageChoice::Auto,
            StorageArg::Timescaledb => StorageChoice::Only(Storage::TimescaleDb),
            StorageArg::Partman => StorageChoice::Only(Storage::Partman),
            StorageArg::Native => StorageChoice::Only(Storage::Native),
        };
        let chunk_interval = match self.chunk_interval.or(file.chunk_interval) {
            Some(text) => parse_duration("--chunk-interval", &text)?,
            None => defaults.chunk_interval,
        };
        if chunk_interval.as_secs() < 60 || chunk_interval.subsec_nanos() != 0 {
            return Err(ConfigError::new(
                "--chunk-interval",
                &humantime::format_duration(chunk_interval).to_string(),
                "must be whole seconds, at least 1 minute",
            ));
        }
        let compress_after = match self.compress_after.or(file.compress_after) {
            Some(text) => parse_optional_duration("--compress-after", &text)?,
            None => defaults.compress_after,
        };
        let retention = match self.retention.or(file.retention) {
            Some(text) => parse_optional_duration("--retention", &text)?,
            None => defaults.retention,
        };
        if let Some(retention) = retention
            && retention < schema::MIN_RETENTION
        {
            return Err(ConfigError::new(
                "--retention",
                &humantime::format_duration(retention).to_string(),
                "must be at least 1 day: the hourly aggregate is refreshed back to the retention, \
                 and late rows are accepted up to 2 hours inside it",
            ));
        }
        let partitions_ahead = self
            .partitions_ahead
            .or(file.partitions_ahead)
            .unwrap_or(defaults.partitions_ahead);
        if partitions_ahead == 0 {
            return Err(ConfigError::new(
                "--partitions-ahead",
                "0",
                "must be at least 1",
            ));
        }
        Ok((
            storage,
            Settings {
                chunk_interval,
                compress_after,
                retention,
                partitions_ahead,
            },
        ))
    }
}

pub async fn run(args: MigrateArgs, file: ConfigFile) -> anyhow::Result<()> {
    let database = args.database.validate(file.database)?;
    let (storage, settings) = args.settings.validate(file.migrate)?;
    let mut client = ingest::db::connect(&database).await?;
    println!("database  {}", database.display);

    if args.dry_run {
        let plan = schema::plan(&client, storage)
            .await
            .context("cannot plan the migration")?;
        print_storage(&plan);
        for applied in &plan.applied {
            println!(
                "applied   {:>3}  {}  (at {})",
                applied.version, applied.name, applied.applied_at
            );
        }
        for migration in &plan.pending {
            println!("would run {:>3}  {}", migration.version, migration.name);
        }
        if plan.pending.is_empty() {
            println!("the schema is up to date");
        }
        println!("would set {}", describe_settings(plan.storage, &settings));
        println!("dry run: nothing was changed");
        return Ok(());
    }

    let report = schema::apply(&mut client, storage, &settings)
        .await
        .context("migration failed; nothing of the failed step was kept")?;
    print_storage(&report.plan);
    let already = report.plan.applied.len();
    for migration in &report.plan.pending {
        println!("applied   {:>3}  {}", migration.version, migration.name);
    }
    println!(
        "schema    up to date at version {} ({} applied now, {already} before)",
        schema::MIGRATIONS.len(),
        report.plan.pending.len(),
    );
    println!("settings  {}", report.settings.join("; "));
    Ok(())
}

fn print_storage(plan: &Plan) {
    println!("storage   {} ({})", plan.storage, plan.storage_reason);
}

fn describe_settings(storage: Storage, settings: &Settings) -> String {
    let interval = schema::sql_interval(settings.chunk_interval);
    let retention = settings.retention.map_or("no retention".to_string(), |r| {
        format!("retention {}", schema::sql_interval(r))
    });
    match storage {
        Storage::TimescaleDb => {
            let compression = settings
                .compress_after
                .map_or("no compression".to_string(), |c| {
                    format!("compression after {}", schema::sql_interval(c))
                });
            format!("chunk interval {interval}; {compression}; {retention}")
        }
        Storage::Partman | Storage::Native => format!(
            "partitions of {interval}, {} ahead; {retention}",
            settings.partitions_ahead
        ),
    }
}
