//! The database flags shared by the subcommands that talk to PostgreSQL.

use serde::Deserialize;

use ingest::config::{DatabaseConfig, LOCAL_DATABASE_URL, parse_duration};

/// Where the database is. In the config file: section [database].
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DatabaseArgs {
    /// PostgreSQL URL, e.g. postgres://user:password@host:5432/db. Also read from
    /// DATABASE_URL. [default: the local stack's, postgres://ingest:***@127.0.0.1:15400/ingest]
    #[arg(
        long,
        env = "INGEST_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    #[serde(rename = "url")]
    pub database_url: Option<String>,
    /// How long to wait for the database to accept a connection. [default: 10s]
    #[arg(long, env = "INGEST_CONNECT_TIMEOUT", value_name = "DURATION")]
    pub connect_timeout: Option<String>,
}

impl DatabaseArgs {
    /// Flags and INGEST_* variables, then DATABASE_URL, then the file, then the default.
    pub fn validate(
        self,
        file: DatabaseArgs,
    ) -> Result<DatabaseConfig, ingest::config::ConfigError> {
        let url = self
            .database_url
            .or_else(|| {
                std::env::var("DATABASE_URL")
                    .ok()
                    .filter(|url| !url.is_empty())
            })
            .or(file.database_url)
            .unwrap_or_else(|| LOCAL_DATABASE_URL.to_string());
        let timeout = self
            .connect_timeout
            .or(file.connect_timeout)
            .unwrap_or_else(|| "10s".into());
        let timeout = parse_duration("--connect-timeout", &timeout)?;
        DatabaseConfig::validate("--database-url", &url, timeout)
    }
}
