//! A database of the local stack for the sink benchmark: created fresh and
//! migrated, as `ingest migrate` would. Without the stack this panics with
//! how to start it; a benchmark never skips silently.

use std::time::Duration;

use ingest::config::DatabaseConfig;
use tokio_postgres::Client;

/// How to get the database the sink benchmark needs.
pub const START_HINT: &str =
    "start the local stack with `dev/stack up && eval \"$(dev/stack env)\"`";

/// The stack's database, from `DATABASE_URL`; its role may create databases.
pub fn admin() -> DatabaseConfig {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        panic!("DATABASE_URL is not set: the sink benchmark needs PostgreSQL; {START_HINT}")
    });
    DatabaseConfig::validate("DATABASE_URL", &url, Duration::from_secs(5))
        .unwrap_or_else(|error| panic!("{error}; {START_HINT}"))
}

/// Connects, or panics saying how to start the stack.
pub async fn connect(config: &DatabaseConfig) -> Client {
    ingest::db::connect(config)
        .await
        .unwrap_or_else(|error| panic!("{error}; {START_HINT}"))
}

/// Drops and creates database `name` on the stack's server and applies
/// every migration (storage chosen as `ingest migrate` chooses it by
/// default: TimescaleDB on a stack that has it), printing which; returns
/// where it is.
pub async fn fresh(name: &str) -> DatabaseConfig {
    assert!(
        name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
        "{name}: a plain identifier, it is put into SQL as it is"
    );
    let admin = admin();
    let client = connect(&admin).await;
    // Two statements: DROP DATABASE cannot share an implicit transaction.
    for sql in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        client.batch_execute(&sql).await.unwrap_or_else(|error| {
            panic!(
                "cannot create database {name}: {}",
                ingest::db::describe(&error)
            )
        });
    }

    let mut config = admin.clone();
    config.postgres.dbname(name);
    config.display = format!("{} (database {name})", admin.display);
    let mut client = connect(&config).await;
    let report = schema::apply(
        &mut client,
        schema::StorageChoice::Auto,
        &schema::Settings::default(),
    )
    .await
    .unwrap_or_else(|error| panic!("cannot migrate database {name}: {error}"));
    // Figures mean little without the storage they were measured on.
    println!(
        "storage: {} ({})",
        report.plan.storage, report.plan.storage_reason
    );
    config
}

/// Empties the tables a batch writes to, then a CHECKPOINT: each 50,000
/// rows write about 12 MB of WAL, so with the stack's max_wal_size (1 GB)
/// the server would otherwise checkpoint in the middle of some timed
/// writes and not others.
///
/// A hypertable's chunks are emptied, not dropped, as a running deployment
/// has them (one a day): TRUNCATE of the hypertable would drop them, and
/// writers that then create the same chunk at once wait for each other's
/// commits (TimescaleDB holds its chunk-creation lock to the end of the
/// creating transaction), which would time that wait instead of the writes.
pub async fn empty_tables(client: &Client) {
    client
        .batch_execute(
            "DO $$
             DECLARE
                 hypertable bool := false;
                 chunk regclass;
             BEGIN
                 -- Each statement is planned when reached: plain PostgreSQL
                 -- has no timescaledb_information.
                 IF EXISTS (SELECT FROM pg_extension WHERE extname = 'timescaledb') THEN
                     hypertable := EXISTS (SELECT FROM timescaledb_information.hypertables
                                           WHERE hypertable_schema = 'telemetry'
                                             AND hypertable_name = 'samples');
                 END IF;
                 IF hypertable THEN
                     FOR chunk IN SELECT show_chunks('telemetry.samples')
                                  UNION ALL SELECT show_chunks('telemetry.events')
                     LOOP
                         EXECUTE format('TRUNCATE %s', chunk);
                     END LOOP;
                 ELSE
                     TRUNCATE telemetry.samples, telemetry.events;
                 END IF;
             END $$;
             TRUNCATE ingest.dead_letters;
             -- The plain paths' rollup; TimescaleDB's aggregate is only
             -- materialized by its refresh, which no benchmark runs.
             DO $$ BEGIN
                 IF to_regclass('telemetry.samples_1h_state') IS NOT NULL THEN
                     TRUNCATE telemetry.samples_1h_state;
                 END IF;
             END $$;
             CHECKPOINT",
        )
        .await
        .unwrap_or_else(|error| panic!("emptying the tables: {}", ingest::db::describe(&error)));
}
