//! `ingest migrate` against the stack's real PostgreSQL: each test on a
//! database of its own.

use tests::{TestDb, run_ingest, text, with_credentials};

/// Runs `ingest migrate` on `db` with extra flags; returns (ok, stdout, stderr).
fn migrate(db: &TestDb, flags: &[&str]) -> (bool, String, String) {
    let mut args = vec!["migrate", "--database-url", &db.url];
    args.extend_from_slice(flags);
    let output = run_ingest(&args, &[]);
    let (stdout, stderr) = text(&output);
    (output.status.success(), stdout, stderr)
}

async fn applied_versions(db: &TestDb) -> Vec<i32> {
    db.client()
        .await
        .query(
            "SELECT version FROM ingest.schema_migrations ORDER BY version",
            &[],
        )
        .await
        .expect("schema_migrations is readable")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

fn all_versions() -> Vec<i32> {
    schema::MIGRATIONS.iter().map(|m| m.version).collect()
}

/// The first run on each storage path applies every migration; a second
/// changes nothing in the catalog, nor in the storage's own configuration
/// (TimescaleDB's jobs, pg_partman's part_config, the native settings).
mod migrates_an_empty_database_and_a_second_run_changes_nothing {
    #[tokio::test]
    async fn timescaledb() {
        super::migrate_twice("timescaledb").await;
    }
    #[tokio::test]
    async fn partman() {
        super::migrate_twice("partman").await;
    }
    #[tokio::test]
    async fn native() {
        super::migrate_twice("native").await;
    }
}

async fn migrate_twice(storage: &str) {
    let db = TestDb::create(&format!("migrate_twice_{storage}")).await;

    let (ok, stdout, stderr) = migrate(&db, &["--storage", storage]);
    assert!(ok, "first run failed: {stdout}{stderr}");
    assert!(stdout.contains(&format!("storage   {storage}")), "{stdout}");
    let count = schema::MIGRATIONS.len();
    assert!(
        stdout.contains(&format!("({count} applied now, 0 before)")),
        "{stdout}"
    );
    assert_eq!(applied_versions(&db).await, all_versions());

    let catalog_before = catalog_snapshot(&db, storage).await;
    let (ok, stdout, stderr) = migrate(&db, &[]);
    assert!(ok, "second run failed: {stdout}{stderr}");
    assert!(
        stdout.contains(&format!("(0 applied now, {count} before)")),
        "{stdout}"
    );
    assert!(
        stdout.contains("chosen when the schema was created"),
        "{stdout}"
    );
    assert_eq!(applied_versions(&db).await, all_versions());
    assert_eq!(
        catalog_snapshot(&db, storage).await,
        catalog_before,
        "the second run changed the catalog"
    );
    db.drop().await;
}

/// Every relation, function and trigger of the project's schemas, by name,
/// and the storage's own configuration.
async fn catalog_snapshot(db: &TestDb, storage: &str) -> Vec<String> {
    let configuration = match storage {
        "timescaledb" => {
            "SELECT 'job ' || job_id || ' ' || proc_name || ' ' || hypertable_name || ' '
                    || schedule_interval || ' ' || config::text
             FROM timescaledb_information.jobs WHERE hypertable_schema = 'telemetry'"
        }
        "partman" => {
            "SELECT 'partman ' || parent_table || ' ' || premake || ' ' || coalesce(retention, '-')
             FROM partman.part_config"
        }
        _ => {
            "SELECT 'native ' || parent || ' ' || width || ' ' || premake || ' '
                    || coalesce(retention::text, '-')
             FROM ingest.partition_settings"
        }
    };
    db.client()
        .await
        .query(
            &format!(
                "SELECT n.nspname || '.' || c.relname || ':' || c.relkind::text
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname IN ('ingest', 'telemetry', 'partman')
                 UNION ALL
                 SELECT 'function ' || p.oid::regprocedure::text FROM pg_proc p
                 JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname IN ('ingest', 'telemetry')
                 UNION ALL
                 SELECT 'trigger ' || tgname FROM pg_trigger WHERE NOT tgisinternal
                 UNION ALL
                 {configuration}
                 ORDER BY 1"
            ),
            &[],
        )
        .await
        .expect("catalog is readable")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn two_migrations_at_once_apply_each_migration_once() {
    let db = TestDb::create("migrate_concurrent").await;
    let spawn = || {
        let url = db.url.clone();
        std::thread::spawn(move || run_ingest(&["migrate", "--database-url", &url], &[]))
    };
    let (first, second) = (spawn(), spawn());
    for output in [first.join().unwrap(), second.join().unwrap()] {
        let (stdout, stderr) = text(&output);
        assert!(
            output.status.success(),
            "a concurrent run failed: {stdout}{stderr}"
        );
    }
    // Each version is a primary key: a double apply would have failed one
    // run, and the rows show each migration once.
    assert_eq!(applied_versions(&db).await, all_versions());
    db.drop().await;
}

#[tokio::test]
async fn dry_run_prints_the_plan_and_changes_nothing() {
    let db = TestDb::create("migrate_dry_run").await;
    let (ok, stdout, stderr) = migrate(&db, &["--dry-run"]);
    assert!(ok, "{stdout}{stderr}");
    for migration in schema::MIGRATIONS {
        assert!(
            stdout.contains(&format!(
                "would run {:>3}  {}",
                migration.version, migration.name
            )),
            "{stdout}"
        );
    }
    assert!(stdout.contains("dry run: nothing was changed"), "{stdout}");
    let exists: bool = db
        .client()
        .await
        .query_one("SELECT to_regnamespace('ingest') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!exists, "a dry run created the ingest schema");

    // After a real run, the dry run says there is nothing to do.
    assert!(migrate(&db, &[]).0);
    let (ok, stdout, _) = migrate(&db, &["--dry-run"]);
    assert!(
        ok && stdout.contains("the schema is up to date") && !stdout.contains("would run"),
        "{stdout}"
    );
    db.drop().await;
}

/// The plain-PostgreSQL path with the built-in maintenance, checked from the
/// catalog and by using it: partitioned tables, partitions ahead, the rollup.
#[tokio::test]
async fn native_partitions_are_made_ahead_and_the_rollup_follows_inserts() {
    let db = TestDb::create("migrate_native").await;
    let (ok, stdout, stderr) = migrate(&db, &["--storage", "native", "--partitions-ahead", "3"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("storage   native"), "{stdout}");
    let client = db.client().await;

    for table in ["samples", "events"] {
        let kind: i8 = client
            .query_one(
                "SELECT c.relkind::\"char\" FROM pg_class c WHERE c.oid = $1::text::regclass",
                &[&format!("telemetry.{table}")],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            kind as u8, b'p',
            "telemetry.{table} is not a partitioned table"
        );
        // Partitions from the catalog itself, not from our own bookkeeping.
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE bound LIKE 'FOR VALUES FROM%'),
                        count(*) FILTER (WHERE bound = 'DEFAULT'),
                        count(*) FILTER (WHERE bound LIKE 'FOR VALUES FROM%'
                                           AND substring(bound from 'FROM \\(''([^'']+)''')::timestamptz > now())
                 FROM (SELECT pg_get_expr(c.relpartbound, c.oid) AS bound
                       FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                       WHERE i.inhparent = $1::text::regclass) parts",
                &[&format!("telemetry.{table}")],
            )
            .await
            .unwrap();
        let (ranges, defaults, ahead): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(defaults, 1, "telemetry.{table} has no default partition");
        assert!(
            ahead >= 3,
            "telemetry.{table} has {ahead} partitions ahead of now, wanted 3"
        );
        assert_eq!(
            ranges, 5,
            "telemetry.{table}: one behind, the current one and 3 ahead"
        );
    }

    // The hourly rollup is kept by the insert itself, over two statements.
    client
        .batch_execute(
            "INSERT INTO telemetry.series (house, device, metric) VALUES ('h1', 'd1', 'power');
             INSERT INTO telemetry.samples
             SELECT date_trunc('hour', now()) + make_interval(secs => g), 1, g FROM generate_series(1, 10) g;
             INSERT INTO telemetry.samples VALUES (date_trunc('hour', now()) + interval '20 minutes', 1, -5);",
        )
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT avg, min, max, count FROM telemetry.samples_1h
             WHERE series_id = 1 AND bucket = date_trunc('hour', now())",
            &[],
        )
        .await
        .unwrap();
    let (avg, min, max, count): (f64, f64, f64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!((min, max, count), (-5.0, 10.0, 11));
    assert!((avg - 50.0 / 11.0).abs() < 1e-9, "avg {avg}");

    let named: i64 = client
        .query_one(
            "SELECT count(*) FROM telemetry.samples_named WHERE device = 'd1' AND metric = 'power'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(named, 11);
    db.drop().await;
}

#[tokio::test]
async fn native_maintenance_moves_early_rows_and_drops_expired_partitions() {
    let db = TestDb::create("migrate_native_retention").await;
    let (ok, stdout, stderr) = migrate(&db, &["--storage", "native", "--retention", "3 days"]);
    assert!(ok, "{stdout}{stderr}");
    let client = db.client().await;
    // A row ten days ahead lands in the default partition, then moves into
    // its own partition once maintenance reaches that day.
    client
        .batch_execute(
            "INSERT INTO telemetry.series (device, metric) VALUES ('d', 'm');
             INSERT INTO telemetry.samples VALUES (now() + interval '10 days', 1, 42);",
        )
        .await
        .unwrap();
    let in_default: i64 = client
        .query_one("SELECT count(*) FROM telemetry.samples_default", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_default, 1);

    let actions: Vec<(String, String)> = client
        .query(
            "SELECT action, partition FROM ingest.maintain_partitions(now() + interval '8 days')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert!(
        actions.iter().any(|(action, _)| action == "created"),
        "{actions:?}"
    );
    assert!(
        actions.iter().any(|(action, _)| action == "dropped"),
        "{actions:?}"
    );
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM telemetry.samples_default),
                    (SELECT count(*) FROM telemetry.samples),
                    (SELECT count(*) FROM ingest.partitions
                     WHERE parent = 'telemetry.samples' AND upper <= now() + interval '5 days')",
            &[],
        )
        .await
        .unwrap();
    let (in_default, total, expired_left): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        (in_default, total),
        (0, 1),
        "the row left the default partition and was not lost"
    );
    assert_eq!(expired_left, 0, "partitions past retention remain");
    db.drop().await;
}

#[tokio::test]
async fn partman_keeps_partitions_when_it_is_installed() {
    let db = TestDb::create("migrate_partman").await;
    let (ok, stdout, stderr) = migrate(&db, &["--storage", "partman", "--retention", "30 days"]);
    assert!(
        ok,
        "pg_partman must be installed on the stack's server (dev/stack installs postgresql-15-partman): {stdout}{stderr}"
    );
    assert!(stdout.contains("storage   partman"), "{stdout}");
    let client = db.client().await;
    let rows = client
        .query(
            "SELECT parent_table, partition_interval, premake, retention FROM partman.part_config ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let config: Vec<(String, String, i32, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        config,
        vec![
            (
                "telemetry.events".into(),
                "1 day".into(),
                4,
                Some("30 days".into())
            ),
            (
                "telemetry.samples".into(),
                "1 day".into(),
                4,
                Some("30 days".into())
            ),
        ]
    );
    let ahead: i64 = client
        .query_one(
            "SELECT count(*) FROM partman.show_partitions('telemetry.samples') p,
                    partman.show_partition_info(p.partition_schemaname || '.' || p.partition_tablename) i
             WHERE i.child_start_time > now()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ahead >= 4, "{ahead} partitions ahead of now");
    db.drop().await;
}

#[tokio::test]
async fn the_storage_cannot_change_after_the_first_run() {
    let db = TestDb::create("migrate_storage_fixed").await;
    assert!(migrate(&db, &["--storage", "native"]).0);
    let (ok, _, stderr) = migrate(&db, &["--storage", "partman"]);
    assert!(!ok);
    assert!(
        stderr.contains("created for storage 'native', not 'partman'"),
        "{stderr}"
    );
    db.drop().await;
}

#[tokio::test]
async fn an_edited_migration_is_refused() {
    let db = TestDb::create("migrate_checksum").await;
    assert!(migrate(&db, &[]).0);
    db.client()
        .await
        .execute(
            "UPDATE ingest.schema_migrations SET checksum = 'edited' WHERE version = 2",
            &[],
        )
        .await
        .unwrap();
    let (ok, _, stderr) = migrate(&db, &[]);
    assert!(!ok);
    assert!(
        stderr.contains("migration 2 (telemetry tables) was changed after it was applied"),
        "{stderr}"
    );
    db.drop().await;
}

/// A failing run prints exactly one line on stderr, starting "error: ",
/// and never panics.
fn assert_one_line_error(ok: bool, stdout: &str, stderr: &str, expected: &str) {
    assert!(!ok, "it succeeded: {stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains(expected),
        "wanted {expected:?} in {stderr}"
    );
}

#[tokio::test]
async fn an_unreachable_database_fails_fast_with_one_line() {
    // Port 1 on loopback: nothing listens there.
    let output = run_ingest(
        &[
            "migrate",
            "--database-url",
            "postgres://ingest:pw@127.0.0.1:1/none",
        ],
        &[],
    );
    let (stdout, stderr) = text(&output);
    assert_one_line_error(
        output.status.success(),
        &stdout,
        &stderr,
        "cannot connect to postgres://ingest:***@127.0.0.1:1/none",
    );
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert!(
        !stderr.contains("pw@"),
        "the password was printed: {stderr}"
    );
}

#[tokio::test]
async fn a_wrong_password_fails_with_one_line() {
    let db = TestDb::create("migrate_wrong_password").await;
    let url = with_credentials(&db.url, "ingest", "not-the-password");
    let output = run_ingest(&["migrate", "--database-url", &url], &[]);
    let (stdout, stderr) = text(&output);
    assert_one_line_error(
        output.status.success(),
        &stdout,
        &stderr,
        "password authentication failed for user \"ingest\"",
    );
    assert!(
        !stderr.contains("not-the-password"),
        "the password was printed: {stderr}"
    );
    db.drop().await;
}

#[tokio::test]
async fn a_database_without_permissions_fails_with_one_line() {
    let db = TestDb::create("migrate_no_permission").await;
    let admin = db.client().await;
    admin
        .batch_execute(
            "DO $$ BEGIN
                 IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ingest_test_noperm') THEN
                     CREATE ROLE ingest_test_noperm LOGIN PASSWORD 'noperm';
                 END IF;
             END $$;",
        )
        .await
        .unwrap();
    let url = with_credentials(&db.url, "ingest_test_noperm", "noperm");
    let output = run_ingest(&["migrate", "--database-url", &url], &[]);
    let (stdout, stderr) = text(&output);
    assert_one_line_error(
        output.status.success(),
        &stdout,
        &stderr,
        &format!("permission denied for database {}", db.name),
    );
    db.drop().await;
}

#[tokio::test]
async fn flags_win_over_environment_which_wins_over_the_config_file() {
    let db = TestDb::create("migrate_config_layers").await;
    let dir = std::env::temp_dir().join(format!("ingest-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ingest.toml");
    // The file names a database that does not exist and a storage; the
    // environment overrides the database, the flag overrides the storage.
    std::fs::write(
        &file,
        "[database]\nurl = \"postgres://ingest:x@127.0.0.1:1/nowhere\"\n[migrate]\nstorage = \"partman\"\npartitions-ahead = 2\n",
    )
    .unwrap();
    let file_arg = file.to_str().unwrap();
    let output = run_ingest(
        &["migrate", "--config", file_arg, "--storage", "native"],
        &[("INGEST_DATABASE_URL", &db.url)],
    );
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("storage   native (asked for)"), "{stdout}");
    assert!(
        stdout.contains("2 ahead"),
        "the file's partitions-ahead was not used: {stdout}"
    );

    // A bad value in the file is named, with the file.
    std::fs::write(&file, "[migrate]\nchunk-intervall = \"1 day\"\n").unwrap();
    let output = run_ingest(
        &["migrate", "--config", file_arg],
        &[("INGEST_DATABASE_URL", &db.url)],
    );
    let (stdout, stderr) = text(&output);
    assert_one_line_error(
        output.status.success(),
        &stdout,
        &stderr,
        "invalid config file",
    );
    assert!(stderr.contains("chunk-intervall"), "{stderr}");

    // A bad flag value is named too.
    let output = run_ingest(
        &["migrate", "--chunk-interval", "soon"],
        &[("INGEST_DATABASE_URL", &db.url)],
    );
    let (stdout, stderr) = text(&output);
    assert_one_line_error(
        output.status.success(),
        &stdout,
        &stderr,
        "invalid --chunk-interval \"soon\"",
    );
    std::fs::remove_dir_all(&dir).unwrap();
    db.drop().await;
}

#[tokio::test]
async fn the_database_url_falls_back_to_database_url() {
    let db = TestDb::create("migrate_database_url_env").await;
    let output = run_ingest(&["migrate", "--dry-run"], &[("DATABASE_URL", &db.url)]);
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains(&format!("/{}", db.name)), "{stdout}");
    db.drop().await;
}

#[tokio::test]
async fn gateway_and_provision_name_what_they_need() {
    // Built since issue #4 (tests/tests/gateway.rs and provision.rs test
    // them); here only that they refuse to run without a stream, and help.
    for command in ["gateway", "provision"] {
        let output = run_ingest(&[command], &[]);
        let (stdout, stderr) = text(&output);
        assert!(
            !output.status.success(),
            "ingest {command} ran without a stream: {stdout}"
        );
        assert!(stderr.contains("--stream"), "{stderr}");
        let help = run_ingest(&[command, "--help"], &[]);
        assert!(
            help.status.success() && !help.stdout.is_empty(),
            "ingest {command} --help"
        );
    }
}

/// The TimescaleDB path on the stack's server: the version is reported;
/// hypertables, compression, retention and the continuous aggregate's
/// refresh are in place; the refresh goes back to the retention (so it never
/// reaches dropped chunks) or over all history without one; a retention
/// under a day is refused before anything changes.
#[tokio::test]
async fn timescaledb_creates_hypertables_policies_and_the_aggregate() {
    let db = TestDb::create("migrate_timescaledb").await;
    for run in 0..2 {
        let (ok, stdout, stderr) =
            migrate(&db, &["--storage", "timescaledb", "--retention", "90 days"]);
        assert!(ok, "run {run}: {stdout}{stderr}");
        assert!(stdout.contains("storage   timescaledb ("), "{stdout}");
        assert!(
            stdout.contains("TimescaleDB 2."),
            "the version is reported: {stdout}"
        );
        assert!(
            stdout.contains("samples_1h refreshed every 15 minutes back to 90 days"),
            "{stdout}"
        );
    }
    let client = db.client().await;
    let hypertables: Vec<String> = client
        .query(
            "SELECT hypertable_name::text FROM timescaledb_information.hypertables ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(hypertables, ["events", "samples"]);
    let jobs = || async {
        client
            .query(
                "SELECT proc_name || ' ' || hypertable_name || ' '
                        || coalesce(config ->> 'drop_after', config ->> 'compress_after',
                                    config ->> 'start_offset', 'unbounded')
                 FROM timescaledb_information.jobs
                 WHERE hypertable_schema = 'telemetry' ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        jobs().await,
        [
            "policy_compression samples 7 days",
            "policy_refresh_continuous_aggregate samples_1h 90 days",
            "policy_retention events 90 days",
            "policy_retention samples 90 days",
        ]
    );

    let (ok, stdout, stderr) = migrate(&db, &["--retention", "none"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("samples_1h refreshed every 15 minutes over all history"),
        "{stdout}"
    );
    assert_eq!(
        jobs().await,
        [
            "policy_compression samples 7 days",
            "policy_refresh_continuous_aggregate samples_1h unbounded",
        ]
    );

    let (ok, stdout, stderr) = migrate(&db, &["--retention", "12h"]);
    assert_one_line_error(ok, &stdout, &stderr, "--retention");
    assert!(stderr.contains("must be at least 1 day"), "{stderr}");
    db.drop().await;
}

#[tokio::test]
async fn the_password_comes_from_a_file_or_the_environment_and_is_never_shown() {
    let db = TestDb::create("migrate_password_sources").await;
    let without_password = with_credentials(&db.url, "ingest", "wrong-in-url");
    let file = std::env::temp_dir().join(format!("ingest-password-{}", std::process::id()));
    // A mounted Kubernetes secret ends with a newline; it is not part of the password.
    std::fs::write(&file, "ingest\n").unwrap();
    let output = run_ingest(
        &[
            "migrate",
            "--dry-run",
            "--database-url",
            &without_password,
            "--database-password-file",
            file.to_str().unwrap(),
        ],
        &[],
    );
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "from a file: {stdout}{stderr}");
    assert!(
        !stdout.contains("wrong-in-url") && !stdout.contains(":ingest@"),
        "{stdout}"
    );

    let output = run_ingest(
        &["migrate", "--dry-run", "--database-url", &without_password],
        &[("INGEST_DATABASE_PASSWORD", "ingest")],
    );
    let (stdout, stderr) = text(&output);
    assert!(
        output.status.success(),
        "from the environment: {stdout}{stderr}"
    );

    std::fs::write(&file, "not-it\n").unwrap();
    let output = run_ingest(
        &[
            "migrate",
            "--dry-run",
            "--database-url",
            &without_password,
            "--database-password-file",
            file.to_str().unwrap(),
        ],
        &[],
    );
    let (stdout, stderr) = text(&output);
    assert_one_line_error(
        output.status.success(),
        &stdout,
        &stderr,
        "password authentication failed",
    );
    assert!(!stderr.contains("not-it"), "{stderr}");
    std::fs::remove_file(&file).unwrap();
    db.drop().await;
}
