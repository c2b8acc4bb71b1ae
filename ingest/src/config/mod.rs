//! Typed configuration, one struct per component, validated once at start.
//!
//! Values come from flags, then `INGEST_*` environment variables, then an
//! optional TOML file, then defaults that run against the local stack; the
//! binary merges those layers and calls the `validate` functions here, which
//! turn text into typed values and name the bad value when one is wrong.

mod database;
mod duration;
pub mod tls;

pub use database::{DatabaseConfig, LOCAL_DATABASE_URL, redact_password};
pub use duration::{parse_duration, parse_optional_duration};

/// A configuration value that cannot be used, with the setting's name.
#[derive(Debug, thiserror::Error)]
#[error("invalid {setting} {value:?}: {why}")]
pub struct ConfigError {
    /// The flag (and environment variable) the value came from.
    pub setting: String,
    /// The value as given, with any password removed.
    pub value: String,
    /// What is wrong and, where possible, what would be right.
    pub why: String,
}

impl ConfigError {
    /// A bad `value` for `setting`, because `why`.
    pub fn new(setting: &str, value: &str, why: impl Into<String>) -> Self {
        ConfigError {
            setting: setting.to_string(),
            value: value.to_string(),
            why: why.into(),
        }
    }
}
