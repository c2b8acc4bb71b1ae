//! Connecting to PostgreSQL: timeouts, and errors on one line that name the
//! target (without its password) and the problem.

use tokio_postgres::{Client, NoTls};

use crate::config::DatabaseConfig;

pub use schema::error::describe;

/// Could not open a connection.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {target}: {reason}")]
pub struct ConnectError {
    /// The database URL without its password.
    pub target: String,
    /// The server's or the network's reason, on one line.
    pub reason: String,
    /// Whether trying again later may help (refused, reset, timed out,
    /// server starting or shutting down), as opposed to bad credentials.
    pub retriable: bool,
}

/// Opens one connection and drives it on the runtime until the client is dropped.
pub async fn connect(config: &DatabaseConfig) -> Result<Client, ConnectError> {
    let (client, connection) = config.postgres.connect(NoTls).await.map_err(|error| {
        let retriable = match error.code() {
            // 28: invalid authorization, 3D: no such database, 42: no permission.
            Some(code) => !["28", "3D", "42"].contains(&&code.code()[..2]),
            None => true,
        };
        ConnectError {
            target: config.display.clone(),
            reason: describe(&error),
            retriable,
        }
    })?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(error = %describe(&error), "database connection closed");
        }
    });
    Ok(client)
}
