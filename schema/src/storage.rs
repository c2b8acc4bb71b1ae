//! The storage paths, how one is chosen, and the settings applied on each.
//!
//! The chunk interval, compression and retention are not baked into the
//! migrations: they are applied after every migration run, idempotently, so
//! a user changes them by running `ingest migrate` with new values.

use std::fmt;
use std::time::Duration;

use tokio_postgres::Client;

use crate::SchemaError;

/// Where samples and events live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// Hypertables, compression, continuous aggregate (TimescaleDB installed).
    TimescaleDb,
    /// Plain PostgreSQL range partitions managed by pg_partman.
    Partman,
    /// Plain PostgreSQL range partitions managed by `ingest.maintain_partitions()`.
    Native,
}

impl Storage {
    /// The name recorded in `ingest.schema_migrations` and accepted by `--storage`.
    pub fn name(self) -> &'static str {
        match self {
            Storage::TimescaleDb => "timescaledb",
            Storage::Partman => "partman",
            Storage::Native => "native",
        }
    }

    /// The storage with this recorded name.
    pub fn from_name(name: &str) -> Option<Storage> {
        [Storage::TimescaleDb, Storage::Partman, Storage::Native]
            .into_iter()
            .find(|storage| storage.name() == name)
    }
}

impl fmt::Display for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StorageChoice {
    /// TimescaleDB when the server has it, else pg_partman when it can be
    /// used, else the built-in partition maintenance.
    #[default]
    Auto,
    /// Exactly this one, or an error saying why it cannot be.
    Only(Storage),
}

/// The knobs of the storage, applied after every migration run.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Width of a TimescaleDB chunk or of a new partition.
    pub chunk_interval: Duration,
    /// Compress chunks older than this (TimescaleDB only); None: never.
    pub compress_after: Option<Duration>,
    /// Drop data older than this; None: keep everything.
    pub retention: Option<Duration>,
    /// Partitions kept ready ahead of now (plain PostgreSQL only).
    pub partitions_ahead: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            chunk_interval: Duration::from_secs(24 * 3600),
            compress_after: Some(Duration::from_secs(7 * 24 * 3600)),
            retention: None,
            partitions_ahead: 4,
        }
    }
}

/// The oldest TimescaleDB the migrations run on: `by_range` dimensions
/// (`create_hypertable(..., by_range(...))`) came with 2.13.
pub const MIN_TIMESCALEDB: (u32, u32) = (2, 13);

/// How long before the retention's edge the consumer stops accepting late
/// rows by default: the hourly aggregate is refreshed back to the retention
/// every 15 minutes, so a row accepted this far inside it is always in some
/// refresh's window (an hour's bucket, a refresh period and slack).
pub const LATE_ROW_MARGIN: Duration = Duration::from_secs(2 * 3600);

/// The shortest retention accepted: the refresh window of the hourly
/// aggregate ends an hour before now and must hold whole buckets, and late
/// rows need room inside it ([`LATE_ROW_MARGIN`]).
pub const MIN_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// What the server offers, read from its catalog.
#[derive(Debug)]
struct Capabilities {
    timescaledb_available: bool,
    timescaledb_preloaded: bool,
    /// The installed version, else the one CREATE EXTENSION would install.
    timescaledb_version: Option<String>,
    partman_available: bool,
    partman_installed: bool,
    superuser: bool,
}

async fn capabilities(client: &Client) -> Result<Capabilities, SchemaError> {
    let row = client
        .query_one(
            "SELECT
                 exists(SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'),
                 current_setting('shared_preload_libraries') LIKE '%timescaledb%',
                 coalesce((SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'),
                          (SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb')),
                 exists(SELECT 1 FROM pg_available_extensions WHERE name = 'pg_partman'),
                 exists(SELECT 1 FROM pg_extension WHERE extname = 'pg_partman'),
                 (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
            &[],
        )
        .await
        .map_err(SchemaError::database("reading the server's extensions"))?;
    Ok(Capabilities {
        timescaledb_available: row.get(0),
        timescaledb_preloaded: row.get(1),
        timescaledb_version: row.get(2),
        partman_available: row.get(3),
        partman_installed: row.get(4),
        superuser: row.get(5),
    })
}

/// Whether TimescaleDB `version` ("2.28.3") is at least [`MIN_TIMESCALEDB`].
fn timescaledb_is_recent(version: &str) -> bool {
    let mut parts = version
        .split(['.', '-'])
        .map(|part| part.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= MIN_TIMESCALEDB
}

/// The TimescaleDB version a schema on `storage` runs on, for reports; None
/// on the plain paths.
pub(crate) async fn timescaledb_version(
    client: &Client,
    storage: Storage,
) -> Result<Option<String>, SchemaError> {
    if storage != Storage::TimescaleDb {
        return Ok(None);
    }
    Ok(capabilities(client).await?.timescaledb_version)
}

/// Picks the storage for a database with no schema yet, with the reason in words.
pub(crate) async fn choose(
    client: &Client,
    choice: StorageChoice,
) -> Result<(Storage, String), SchemaError> {
    let caps = capabilities(client).await?;
    let version = caps.timescaledb_version.clone().unwrap_or_default();
    let timescaledb = if !caps.timescaledb_available {
        Err("the timescaledb extension is not installed on the server".to_string())
    } else if !caps.timescaledb_preloaded {
        Err("timescaledb is installed but not in shared_preload_libraries".to_string())
    } else if !timescaledb_is_recent(&version) {
        // Refused even when asked for "auto": a server that preloads
        // TimescaleDB was meant to store the data in it.
        let (major, minor) = MIN_TIMESCALEDB;
        return Err(SchemaError::StorageUnavailable {
            storage: Storage::TimescaleDb.name().to_string(),
            why: format!(
                "the server has TimescaleDB {version}, older than {major}.{minor}, which the schema needs (by_range dimensions); upgrade TimescaleDB"
            ),
        });
    } else {
        Ok(())
    };
    let partman = if caps.partman_installed {
        Ok(())
    } else if !caps.partman_available {
        Err("the pg_partman extension is not installed on the server".to_string())
    } else if !caps.superuser {
        Err("creating the pg_partman extension needs a superuser".to_string())
    } else {
        Ok(())
    };
    let unavailable = |storage: Storage, why: String| SchemaError::StorageUnavailable {
        storage: storage.name().to_string(),
        why,
    };
    match choice {
        StorageChoice::Only(Storage::TimescaleDb) => timescaledb
            .map(|()| {
                (
                    Storage::TimescaleDb,
                    format!("asked for; TimescaleDB {version}"),
                )
            })
            .map_err(|why| unavailable(Storage::TimescaleDb, why)),
        StorageChoice::Only(Storage::Partman) => partman
            .map(|()| (Storage::Partman, "asked for".to_string()))
            .map_err(|why| unavailable(Storage::Partman, why)),
        StorageChoice::Only(Storage::Native) => Ok((Storage::Native, "asked for".to_string())),
        StorageChoice::Auto => Ok(match (timescaledb, partman) {
            (Ok(()), _) => (
                Storage::TimescaleDb,
                format!("TimescaleDB {version} is available"),
            ),
            (Err(no_tsdb), Ok(())) => (
                Storage::Partman,
                format!("{no_tsdb}; pg_partman is available"),
            ),
            (Err(no_tsdb), Err(no_partman)) => {
                (Storage::Native, format!("{no_tsdb}; {no_partman}"))
            }
        }),
    }
}

/// The tables whose partitions or chunks the settings govern.
const TIME_TABLES: [&str; 2] = ["telemetry.samples", "telemetry.events"];

/// Applies `settings` for `storage`, idempotently; returns what it did, in words.
pub(crate) async fn apply_settings(
    client: &Client,
    storage: Storage,
    settings: &Settings,
) -> Result<Vec<String>, SchemaError> {
    match storage {
        Storage::TimescaleDb => apply_timescaledb(client, settings).await,
        Storage::Partman => apply_partman(client, settings).await,
        Storage::Native => apply_native(client, settings).await,
    }
}

async fn apply_timescaledb(
    client: &Client,
    settings: &Settings,
) -> Result<Vec<String>, SchemaError> {
    let mut done = Vec::new();
    let chunk = sql_interval(settings.chunk_interval);
    for table in TIME_TABLES {
        client
            .execute(
                "SELECT set_chunk_time_interval($1::text::regclass, $2::text::interval)",
                &[&table, &chunk],
            )
            .await
            .map_err(SchemaError::database(format!(
                "setting the chunk interval of {table}"
            )))?;
    }
    done.push(format!("chunk interval {chunk}"));

    // A policy is replaced only when its setting changed, so that a second
    // run with the same settings changes nothing.
    let compression = settings.compress_after.map(sql_interval);
    replace_policy(
        client,
        "policy_compression",
        "samples",
        "compress_after",
        compression
            .as_deref()
            .map_or(Job::Absent, |after| Job::With(Some(after))),
        "SELECT add_compression_policy('telemetry.samples', compress_after => $1::text::interval)",
        "SELECT remove_compression_policy('telemetry.samples', if_exists => true)",
    )
    .await?;
    done.push(match &compression {
        Some(after) => format!("compression after {after}"),
        None => "no compression".to_string(),
    });

    let retention = settings.retention.map(sql_interval);
    for table in ["samples", "events"] {
        replace_policy(
            client,
            "policy_retention",
            table,
            "drop_after",
            retention
                .as_deref()
                .map_or(Job::Absent, |after| Job::With(Some(after))),
            &format!(
                "SELECT add_retention_policy('telemetry.{table}', drop_after => $1::text::interval)"
            ),
            &format!("SELECT remove_retention_policy('telemetry.{table}', if_exists => true)"),
        )
        .await?;
    }
    done.push(match &retention {
        Some(after) => format!("retention {after}"),
        None => "no retention".to_string(),
    });

    // The refresh goes back to the retention, or over all history without
    // one: late rows of any accepted age reach the aggregate (a refresh only
    // recomputes the buckets late rows invalidated), and it never reaches
    // chunks the retention drops, which would erase their aggregates.
    replace_policy(
        client,
        "policy_refresh_continuous_aggregate",
        "samples_1h",
        "start_offset",
        Job::With(retention.as_deref()),
        "SELECT add_continuous_aggregate_policy('telemetry.samples_1h',
             start_offset => $1::text::interval, end_offset => INTERVAL '1 hour',
             schedule_interval => INTERVAL '15 minutes')",
        "SELECT remove_continuous_aggregate_policy('telemetry.samples_1h', if_exists => true)",
    )
    .await?;
    done.push(match &retention {
        Some(after) => format!("samples_1h refreshed every 15 minutes back to {after}"),
        None => "samples_1h refreshed every 15 minutes over all history".to_string(),
    });
    Ok(done)
}

/// What a TimescaleDB policy job should be.
#[derive(Debug, Clone, Copy)]
enum Job<'a> {
    /// No such job.
    Absent,
    /// A job whose config `key` is this interval (None: null, "unbounded").
    With(Option<&'a str>),
}

/// Makes the TimescaleDB job `proc_name` on `table` be `wanted`, touching it
/// only when it differs, so that a second run with the same settings
/// changes nothing.
#[allow(clippy::too_many_arguments)]
async fn replace_policy(
    client: &Client,
    proc_name: &str,
    table: &str,
    key: &str,
    wanted: Job<'_>,
    add_sql: &str,
    remove_sql: &str,
) -> Result<(), SchemaError> {
    let during = format!("setting {proc_name} on telemetry.{table}");
    let wanted_value = match wanted {
        Job::Absent => None,
        Job::With(value) => value,
    };
    // (the job's value is null, it equals the wanted interval), per job.
    let current: Option<(bool, bool)> = client
        .query_opt(
            "SELECT config ->> $3 IS NULL,
                    coalesce((config ->> $3)::interval = $4::text::interval, false)
             FROM timescaledb_information.jobs
             WHERE proc_name = $1 AND hypertable_schema = 'telemetry' AND hypertable_name = $2",
            &[&proc_name, &table, &key, &wanted_value],
        )
        .await
        .map_err(SchemaError::database(during.clone()))?
        .map(|row| (row.get(0), row.get(1)));
    let up_to_date = match (current, wanted) {
        (None, Job::Absent) => true,
        (Some((is_null, _)), Job::With(None)) => is_null,
        (Some((_, same)), Job::With(Some(_))) => same,
        _ => false,
    };
    if up_to_date {
        return Ok(());
    }
    client
        .execute(remove_sql, &[])
        .await
        .map_err(SchemaError::database(during.clone()))?;
    if let Job::With(value) = wanted {
        client
            .execute(add_sql, &[&value])
            .await
            .map_err(SchemaError::database(during))?;
    }
    Ok(())
}

async fn apply_partman(client: &Client, settings: &Settings) -> Result<Vec<String>, SchemaError> {
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS partman;
             CREATE EXTENSION IF NOT EXISTS pg_partman SCHEMA partman;",
        )
        .await
        .map_err(SchemaError::database("creating the pg_partman extension"))?;
    let width = sql_interval(settings.chunk_interval);
    let premake = settings.partitions_ahead as i32;
    let retention = settings.retention.map(sql_interval);
    for table in TIME_TABLES {
        let during = format!("handing {table} to pg_partman");
        let managed: bool = client
            .query_one(
                "SELECT exists(SELECT 1 FROM partman.part_config WHERE parent_table = $1)",
                &[&table],
            )
            .await
            .map_err(SchemaError::database(during.clone()))?
            .get(0);
        if !managed {
            client
                .execute(
                    "SELECT partman.create_parent(p_parent_table => $1, p_control => 'time',
                         p_type => 'native', p_interval => $2, p_premake => $3)",
                    &[&table, &width, &premake],
                )
                .await
                .map_err(SchemaError::database(during.clone()))?;
        }
        // The width of existing sets is fixed by pg_partman; premake and
        // retention follow the settings.
        client
            .execute(
                "UPDATE partman.part_config
                 SET premake = $2, retention = $3, retention_keep_table = false,
                     infinite_time_partitions = true
                 WHERE parent_table = $1
                   AND (premake, retention, retention_keep_table, infinite_time_partitions)
                       IS DISTINCT FROM ($2, $3, false, true)",
                &[&table, &premake, &retention],
            )
            .await
            .map_err(SchemaError::database(during))?;
    }
    maintain(client, Storage::Partman).await?;
    Ok(vec![
        format!("pg_partman partitions of {width}, {premake} ahead"),
        match &retention {
            Some(after) => format!("retention {after}"),
            None => "no retention".to_string(),
        },
    ])
}

async fn apply_native(client: &Client, settings: &Settings) -> Result<Vec<String>, SchemaError> {
    let width = sql_interval(settings.chunk_interval);
    let premake = settings.partitions_ahead as i32;
    let retention = settings.retention.map(sql_interval);
    for table in TIME_TABLES {
        client
            .execute(
                "INSERT INTO ingest.partition_settings (parent, width, premake, retention)
                 VALUES ($1, $2::text::interval, $3, $4::text::interval)
                 ON CONFLICT (parent) DO UPDATE
                 SET width = excluded.width, premake = excluded.premake, retention = excluded.retention
                 WHERE (ingest.partition_settings.width, ingest.partition_settings.premake,
                        ingest.partition_settings.retention)
                       IS DISTINCT FROM (excluded.width, excluded.premake, excluded.retention)",
                &[&table, &width, &premake, &retention],
            )
            .await
            .map_err(SchemaError::database(format!("recording the partition settings of {table}")))?;
    }
    maintain(client, Storage::Native).await?;
    Ok(vec![
        format!("built-in partitions of {width}, {premake} ahead"),
        match &retention {
            Some(after) => format!("retention {after}"),
            None => "no retention".to_string(),
        },
    ])
}

/// The retention in force, as the last `ingest migrate` set it (None: data
/// is kept forever, or there is no schema yet). The consumer derives the
/// oldest row it accepts from it.
pub async fn retention(client: &Client) -> Result<Option<Duration>, SchemaError> {
    let sql = match crate::runner::recorded_storage(client).await? {
        None => return Ok(None),
        Some(Storage::TimescaleDb) => {
            "SELECT extract(epoch FROM (config ->> 'drop_after')::interval)::float8
             FROM timescaledb_information.jobs
             WHERE proc_name = 'policy_retention'
               AND hypertable_schema = 'telemetry' AND hypertable_name = 'samples'"
        }
        Some(Storage::Partman) => {
            "SELECT extract(epoch FROM retention::interval)::float8
             FROM partman.part_config WHERE parent_table = 'telemetry.samples'"
        }
        Some(Storage::Native) => {
            "SELECT extract(epoch FROM retention)::float8
             FROM ingest.partition_settings WHERE parent = 'telemetry.samples'"
        }
    };
    let seconds: Option<f64> = client
        .query_opt(sql, &[])
        .await
        .map_err(SchemaError::database("reading the retention"))?
        .and_then(|row| row.get(0));
    Ok(seconds
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64))
}

/// Creates partitions ahead and drops expired ones; nothing to do on
/// TimescaleDB, whose background jobs do it. Cheap when there is nothing to do.
pub async fn maintain(client: &Client, storage: Storage) -> Result<(), SchemaError> {
    let sql = match storage {
        Storage::TimescaleDb => return Ok(()),
        Storage::Partman => "SELECT partman.run_maintenance(p_analyze => false)",
        Storage::Native => "SELECT count(*) FROM ingest.maintain_partitions()",
    };
    client
        .execute(sql, &[])
        .await
        .map_err(SchemaError::database("maintaining partitions"))?;
    Ok(())
}

/// A duration as PostgreSQL interval text in its largest whole unit
/// ("1 day", "6 hours", "90 seconds"), which pg_partman also understands.
pub fn sql_interval(duration: Duration) -> String {
    let secs = duration.as_secs();
    for (unit, size) in [("day", 86_400), ("hour", 3_600), ("minute", 60)] {
        if secs >= size && secs.is_multiple_of(size) {
            let count = secs / size;
            return format!("{count} {unit}{}", if count == 1 { "" } else { "s" });
        }
    }
    format!("{secs} second{}", if secs == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_use_their_largest_whole_unit() {
        let cases = [
            (86_400, "1 day"),
            (7 * 86_400, "7 days"),
            (3_600, "1 hour"),
            (6 * 3_600, "6 hours"),
            (90 * 60, "90 minutes"),
            (90, "90 seconds"),
            (1, "1 second"),
        ];
        for (secs, expected) in cases {
            assert_eq!(
                sql_interval(Duration::from_secs(secs)),
                expected,
                "{secs} s"
            );
        }
    }

    #[test]
    fn extension_versions_are_compared_by_number() {
        for (version, recent) in [
            ("2.28.3", true),
            ("2.13.0", true),
            ("2.13.0-dev", true),
            ("3.0.0", true),
            ("2.12.2", false),
            ("2.9.1", false),
            ("1.7.5", false),
            ("", false),
        ] {
            assert_eq!(timescaledb_is_recent(version), recent, "{version}");
        }
    }

    #[test]
    fn storage_names_round_trip() {
        for storage in [Storage::TimescaleDb, Storage::Partman, Storage::Native] {
            assert_eq!(Storage::from_name(storage.name()), Some(storage));
        }
        assert_eq!(Storage::from_name("mysql"), None);
    }
}
