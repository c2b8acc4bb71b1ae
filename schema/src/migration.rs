//! The migrations, in order, with their SQL embedded at build time.
//!
//! Each migration has SQL common to both storage paths and SQL for one path
//! (`postgres` or `timescaledb`); the runner applies common SQL first. A new
//! migration is a new file in `schema/migrations/` and one entry here; an
//! applied migration is never edited (its checksum is checked).

use crate::storage::Storage;

/// One versioned step of the schema.
#[derive(Debug)]
pub struct Migration {
    /// Position in the sequence, recorded in `ingest.schema_migrations`.
    pub version: i32,
    /// Short name, for people reading the plan.
    pub name: &'static str,
    /// SQL run on either storage path.
    common: &'static str,
    /// SQL run only on plain PostgreSQL (pg_partman or native partitions).
    postgres: &'static str,
    /// SQL run only with TimescaleDB.
    timescaledb: &'static str,
}

impl Migration {
    /// The SQL this migration runs for `storage`.
    pub fn sql(&self, storage: Storage) -> String {
        let path_sql = match storage {
            Storage::TimescaleDb => self.timescaledb,
            Storage::Partman | Storage::Native => self.postgres,
        };
        format!("{}\n{}", self.common, path_sql)
    }
}

/// All migrations, oldest first.
pub static MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "control tables",
        common: include_str!("../migrations/0001_control.sql"),
        postgres: "",
        timescaledb: "",
    },
    Migration {
        version: 2,
        name: "telemetry tables",
        common: include_str!("../migrations/0002_telemetry.common.sql"),
        postgres: include_str!("../migrations/0002_telemetry.postgres.sql"),
        timescaledb: include_str!("../migrations/0002_telemetry.timescaledb.sql"),
    },
    Migration {
        version: 3,
        name: "named samples view",
        common: include_str!("../migrations/0003_views.common.sql"),
        postgres: "",
        timescaledb: "",
    },
    Migration {
        version: 4,
        name: "partition maintenance",
        common: "",
        postgres: include_str!("../migrations/0004_partitions.postgres.sql"),
        timescaledb: include_str!("../migrations/0004_partitions.timescaledb.sql"),
    },
    Migration {
        version: 5,
        name: "lease lag",
        common: include_str!("../migrations/0005_lease_lag.sql"),
        postgres: "",
        timescaledb: "",
    },
    Migration {
        version: 6,
        name: "stream identity and start points",
        common: include_str!("../migrations/0006_stream_identity.sql"),
        postgres: "",
        timescaledb: "",
    },
    Migration {
        version: 7,
        name: "kpl sub-sequence",
        common: include_str!("../migrations/0007_kpl_sub_sequence.sql"),
        postgres: "",
        timescaledb: "",
    },
    Migration {
        version: 8,
        name: "one row per reading",
        common: include_str!("../migrations/0008_unique_readings.sql"),
        postgres: "",
        timescaledb: "",
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_consecutive_from_one() {
        let versions: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
        let expected: Vec<i32> = (1..=MIGRATIONS.len() as i32).collect();
        assert_eq!(versions, expected);
    }

    #[test]
    fn every_migration_has_sql_for_every_storage() {
        for migration in MIGRATIONS {
            for storage in [Storage::TimescaleDb, Storage::Partman, Storage::Native] {
                assert!(
                    !migration.sql(storage).trim().is_empty(),
                    "migration {} has no SQL for {storage:?}",
                    migration.version
                );
            }
        }
    }

    #[test]
    fn only_the_hypertable_path_mentions_the_extension() {
        for migration in MIGRATIONS {
            assert!(!migration.sql(Storage::Native).contains("timescaledb"));
            assert!(!migration.sql(Storage::Native).contains("create_hypertable"));
        }
        let all: String = MIGRATIONS
            .iter()
            .map(|m| m.sql(Storage::TimescaleDb))
            .collect();
        assert!(all.contains("create_hypertable('telemetry.samples'"));
        assert!(all.contains("timescaledb.continuous"));
    }
}
