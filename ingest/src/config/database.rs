//! Where the database is and how long to wait for it.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use super::ConfigError;

/// The database of the local stack (`dev/stack up`), the default everywhere.
pub const LOCAL_DATABASE_URL: &str = "postgres://ingest:ingest@127.0.0.1:15400/ingest";

/// A validated database target.
#[derive(Clone)]
pub struct DatabaseConfig {
    /// Connection settings parsed from the URL (host, port, user, password, database).
    pub postgres: tokio_postgres::Config,
    /// The URL with its password hidden: what logs and errors show.
    pub display: String,
    /// How long to wait for the server to accept a connection.
    pub connect_timeout: Duration,
    /// The Consul DNS server that resolves a `.consul` host.
    pub consul_dns: Option<SocketAddr>,
    /// TLS with certificate and host name verification; None: no TLS.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for DatabaseConfig {
    // By hand, so that the password never reaches a log through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &self.display)
            .field("connect_timeout", &self.connect_timeout)
            .field("consul_dns", &self.consul_dns)
            .field("tls", &self.tls.as_ref().map(|_| "verify-full"))
            .finish()
    }
}

impl DatabaseConfig {
    /// Parses `url` (a `postgres://` URL or `key=value` pairs) given as `setting`.
    pub fn validate(
        setting: &str,
        url: &str,
        connect_timeout: Duration,
    ) -> Result<Self, ConfigError> {
        let display = redact_password(url);
        let mut postgres = tokio_postgres::Config::from_str(url).map_err(|error| {
            ConfigError::new(setting, &display, format!("not a PostgreSQL URL: {error}"))
        })?;
        if postgres.get_hosts().is_empty() {
            return Err(ConfigError::new(setting, &display, "names no host"));
        }
        if postgres.get_user().is_none() {
            return Err(ConfigError::new(setting, &display, "names no user"));
        }
        postgres.connect_timeout(connect_timeout);
        postgres.application_name("ingest");
        // A primary that vanishes without closing its sockets is noticed
        // within a minute instead of the kernel's two hours.
        postgres.keepalives_idle(Duration::from_secs(15));
        postgres.tcp_user_timeout(Duration::from_secs(30));
        Ok(DatabaseConfig {
            postgres,
            display,
            connect_timeout,
            consul_dns: None,
            tls: None,
        })
    }

    /// Connects with TLS only, verifying the server's certificate with `tls`.
    pub fn with_tls(mut self, tls: Arc<rustls::ClientConfig>) -> Self {
        self.postgres
            .ssl_mode(tokio_postgres::config::SslMode::Require);
        self.tls = Some(tls);
        self
    }

    /// Resolves `.consul` hosts through the DNS server at `server`.
    pub fn with_consul_dns(mut self, server: SocketAddr) -> Self {
        self.consul_dns = Some(server);
        self
    }

    /// Server-side limits for the consumer's sessions, sent as startup
    /// options. A session idle inside a transaction for `idle_in_transaction`
    /// is ended by the server: its client is gone (a connection that died
    /// before COMMIT reached the server would otherwise hold its rows' locks
    /// until TCP gives up, hours later, or forever behind a silent peer). With
    /// `lock`, a statement waits at most that long for a lock, then fails with
    /// SQLSTATE 55P03 (for the lease statements, which must never stall the
    /// renewals behind them).
    pub fn with_stuck_session_limits(
        mut self,
        idle_in_transaction: Duration,
        lock: Option<Duration>,
    ) -> Self {
        let mut limits = format!(
            "-c idle_in_transaction_session_timeout={}",
            idle_in_transaction.as_millis().max(1)
        );
        if let Some(lock) = lock {
            limits.push_str(&format!(" -c lock_timeout={}", lock.as_millis().max(1)));
        }
        let options = match self.postgres.get_options() {
            Some(options) if !options.is_empty() => format!("{options} {limits}"),
            _ => limits,
        };
        self.postgres.options(&options);
        self
    }

    /// Uses `password` instead of any password in the URL (from the
    /// environment or a mounted secret file, so that it never sits in a URL).
    pub fn with_password(mut self, password: &str) -> Self {
        self.postgres.password(password);
        self
    }
}

/// `url` with the password replaced by `***`, in URL and in key=value form.
pub fn redact_password(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            let user_info = &rest[..at];
            if let Some(colon) = user_info.find(':') {
                return format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &user_info[..colon],
                    &rest[at..]
                );
            }
        }
        return url.to_string();
    }
    url.split_whitespace()
        .map(|pair| {
            if pair.starts_with("password=") {
                "password=***"
            } else {
                pair
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stuck_session_limits_are_added_to_the_options() {
        let config = DatabaseConfig::validate(
            "--database-url",
            "postgres://u@h/db?options=-c%20search_path%3Dx",
            Duration::from_secs(5),
        )
        .unwrap()
        .with_stuck_session_limits(Duration::from_secs(1), Some(Duration::from_millis(1500)));
        assert_eq!(
            config.postgres.get_options(),
            Some(
                "-c search_path=x -c idle_in_transaction_session_timeout=1000 -c lock_timeout=1500"
            )
        );
    }

    #[test]
    fn passwords_are_hidden() {
        let cases = [
            (
                "postgres://u:secret@h:5432/db",
                "postgres://u:***@h:5432/db",
            ),
            ("postgres://u:p@ss@h/db", "postgres://u:***@h/db"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            ("postgres://h/db?user=u", "postgres://h/db?user=u"),
            (
                "host=h user=u password=secret dbname=d",
                "host=h user=u password=*** dbname=d",
            ),
        ];
        for (url, shown) in cases {
            assert_eq!(redact_password(url), shown);
        }
    }

    #[test]
    fn validation_names_the_setting_and_hides_the_password() {
        let timeout = Duration::from_secs(5);
        let error = DatabaseConfig::validate(
            "--database-url",
            "postgres://u:secret@h:notaport/db",
            timeout,
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.starts_with("invalid --database-url \"postgres://u:***@h:notaport/db\""),
            "{error}"
        );
        assert!(!error.contains("secret"), "{error}");

        let error =
            DatabaseConfig::validate("--database-url", "postgres:///db", timeout).unwrap_err();
        assert!(error.to_string().contains("names no"), "{error}");

        let config =
            DatabaseConfig::validate("--database-url", LOCAL_DATABASE_URL, timeout).unwrap();
        assert_eq!(config.postgres.get_dbname(), Some("ingest"));
        assert!(!format!("{config:?}").contains(":ingest@"), "{config:?}");
    }
}
