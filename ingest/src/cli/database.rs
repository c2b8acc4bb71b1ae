//! The database flags shared by the subcommands that talk to PostgreSQL.

use serde::Deserialize;

use ingest::config::{
    ConfigError, DatabaseConfig, LOCAL_DATABASE_URL, parse_duration, redact_password,
};

/// Where the database is. In the config file: section [database].
#[derive(Default, Clone, clap::Args, Deserialize)]
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
    /// DNS server that resolves a database host ending in .consul (A and SRV
    /// records), again for every new connection. [default: 127.0.0.1:8600]
    #[arg(long, env = "INGEST_CONSUL_DNS", value_name = "ADDR")]
    pub consul_dns: Option<String>,
    /// File holding the database password (e.g. a mounted Kubernetes secret);
    /// INGEST_DATABASE_PASSWORD works too. Either wins over a password in the URL.
    #[arg(long, env = "INGEST_DATABASE_PASSWORD_FILE", value_name = "FILE")]
    pub database_password_file: Option<std::path::PathBuf>,
    /// TLS to the database: disable, or verify-full (TLS required, the
    /// certificate must chain to a trusted CA and name the URL's host).
    /// [default: disable]
    #[arg(long, env = "INGEST_DATABASE_TLS", value_name = "MODE")]
    pub database_tls: Option<TlsMode>,
    /// PEM file of the CA(s) to trust with --database-tls verify-full
    /// [default: the system's trusted CAs]
    #[arg(long, env = "INGEST_DATABASE_CA_FILE", value_name = "FILE")]
    pub database_ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for DatabaseArgs {
    // By hand, so that a password in the URL never reaches `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseArgs")
            .field(
                "database_url",
                &self.database_url.as_deref().map(redact_password),
            )
            .field("connect_timeout", &self.connect_timeout)
            .field("consul_dns", &self.consul_dns)
            .field("database_password_file", &self.database_password_file)
            .field("database_tls", &self.database_tls)
            .field("database_ca_file", &self.database_ca_file)
            .finish()
    }
}

/// How the connection to the database is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    Disable,
    VerifyFull,
}

impl DatabaseArgs {
    /// Flags and INGEST_* variables, then DATABASE_URL, then the file, then the default.
    pub fn validate(self, file: DatabaseArgs) -> Result<DatabaseConfig, ConfigError> {
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
        let consul_dns = self
            .consul_dns
            .or(file.consul_dns)
            .unwrap_or_else(|| "127.0.0.1:8600".into());
        let consul_dns = consul_dns.parse().map_err(|e: std::net::AddrParseError| {
            ConfigError::new("--consul-dns", &consul_dns, e.to_string())
        })?;
        let mut config =
            DatabaseConfig::validate("--database-url", &url, timeout)?.with_consul_dns(consul_dns);
        if let Some(path) = self.database_password_file.or(file.database_password_file) {
            let password = std::fs::read_to_string(&path).map_err(|e| {
                ConfigError::new(
                    "--database-password-file",
                    &path.display().to_string(),
                    e.to_string(),
                )
            })?;
            config = config.with_password(password.trim_end_matches(['\n', '\r']));
        } else if let Ok(password) = std::env::var("INGEST_DATABASE_PASSWORD") {
            config = config.with_password(&password);
        }
        if self.database_tls.or(file.database_tls) == Some(TlsMode::VerifyFull) {
            let ca_file = self.database_ca_file.or(file.database_ca_file);
            config = config.with_tls(ingest::config::tls::verify_full(ca_file.as_deref())?);
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_password() {
        let args = DatabaseArgs {
            database_url: Some("postgres://ingest:hunter2@db:5432/ingest".into()),
            ..DatabaseArgs::default()
        };
        let debug = format!("{args:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(
            debug.contains("postgres://ingest:***@db:5432/ingest"),
            "{debug}"
        );
    }
}
