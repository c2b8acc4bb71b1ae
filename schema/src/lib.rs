//! The ingest database schema: versioned SQL migrations embedded in the
//! binary, and the runner that applies them.
//!
//! - [`migration`]: the list of migrations and their SQL, per storage path.
//! - [`storage`]: the two storage paths (TimescaleDB, plain PostgreSQL with
//!   pg_partman or with the project's own partition maintenance), how one is
//!   chosen, and the settings (chunk interval, compression, retention) applied
//!   after every migration run.
//! - [`runner`]: plan and apply under an advisory lock, so that several pods
//!   starting at once are safe, and a second run changes nothing.
//! - [`error`]: what can go wrong, and whether trying again may help.

pub mod error;
pub mod migration;
pub mod runner;
pub mod storage;

pub use error::SchemaError;
pub use migration::{MIGRATIONS, Migration};
pub use runner::{Applied, Plan, Report, apply, plan, recorded_storage};
pub use storage::{
    LATE_ROW_MARGIN, MIN_RETENTION, MIN_TIMESCALEDB, Settings, Storage, StorageChoice, maintain,
    retention, sql_interval,
};
