//! Connecting to PostgreSQL: Consul names resolved for every new connection,
//! timeouts, one-line errors that name the target (never its password), and
//! a pool whose connections can all be dropped at once when the primary moved.

mod pool;
pub mod resolve;

use tokio_postgres::{Client, NoTls};

use crate::config::DatabaseConfig;

pub use pool::{Connection, Database};
pub use schema::error::describe;

/// Could not open a connection.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {target}: {reason}")]
pub struct ConnectError {
    /// The database URL without its password.
    pub target: String,
    /// The server's, the network's or the DNS's reason, on one line.
    pub reason: String,
    /// Whether trying again later may help (refused, reset, timed out, DNS
    /// failure, server starting or shutting down), as opposed to bad
    /// credentials or a missing database.
    pub retriable: bool,
}

/// Opens one connection and drives it on the runtime until the client is
/// dropped. A `.consul` host is resolved first (see [`resolve`]); the name
/// stays the connection's host, so TLS verifies the name, not the address.
pub async fn connect(config: &DatabaseConfig) -> Result<Client, ConnectError> {
    let mut postgres = config.postgres.clone();
    if let (Some(server), Some(tokio_postgres::config::Host::Tcp(host))) =
        (config.consul_dns, config.postgres.get_hosts().first())
        && resolve::is_consul_name(host)
    {
        let default_port = config.postgres.get_ports().first().copied().unwrap_or(5432);
        let (address, port) =
            resolve::resolve(host, server, default_port)
                .await
                .map_err(|error| {
                    metrics::counter!(crate::metrics::DNS_FAILURES).increment(1);
                    ConnectError {
                        target: config.display.clone(),
                        reason: error.to_string(),
                        retriable: true,
                    }
                })?;
        postgres = at_address(&config.postgres, host, address, port);
        tracing::debug!(%host, %address, port, "resolved the database through Consul");
    }
    let failed = |error: tokio_postgres::Error| {
        let retriable = match error.code() {
            // 28: invalid authorization, 3D: no such database, 42: no permission.
            Some(code) => !["28", "3D", "42"].contains(&&code.code()[..2]),
            // A certificate that does not verify will not verify next time either.
            None => !describe(&error).contains("certificate"),
        };
        ConnectError {
            target: config.display.clone(),
            reason: describe(&error),
            retriable,
        }
    };
    let client = match &config.tls {
        None => {
            let (client, connection) = postgres.connect(NoTls).await.map_err(failed)?;
            tokio::spawn(drive(connection));
            client
        }
        Some(tls) => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
            let (client, connection) = postgres.connect(tls).await.map_err(failed)?;
            tokio::spawn(drive(connection));
            client
        }
    };
    Ok(client)
}

/// Drives a connection until its client is dropped or it breaks.
async fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(error) = connection.await {
        tracing::debug!(error = %describe(&error), "database connection closed");
    }
}

/// `base` pointed at `address:port`, keeping `host` as the server's name (for
/// TLS). Built afresh: tokio-postgres can add ports to a config but not
/// replace them, and the URL may carry one.
fn at_address(
    base: &tokio_postgres::Config,
    host: &str,
    address: std::net::IpAddr,
    port: u16,
) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config.host(host).hostaddr(address).port(port);
    if let Some(user) = base.get_user() {
        config.user(user);
    }
    if let Some(password) = base.get_password() {
        config.password(password);
    }
    if let Some(dbname) = base.get_dbname() {
        config.dbname(dbname);
    }
    if let Some(options) = base.get_options() {
        config.options(options);
    }
    if let Some(name) = base.get_application_name() {
        config.application_name(name);
    }
    if let Some(timeout) = base.get_connect_timeout() {
        config.connect_timeout(*timeout);
    }
    if let Some(timeout) = base.get_tcp_user_timeout() {
        config.tcp_user_timeout(*timeout);
    }
    config
        .ssl_mode(base.get_ssl_mode())
        .keepalives(base.get_keepalives())
        .keepalives_idle(base.get_keepalives_idle());
    config
}
