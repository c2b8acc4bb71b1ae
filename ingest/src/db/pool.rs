//! A small pool of connections that can forget them all at once.
//!
//! deadpool's managed pool with our own manager. deadpool-postgres's
//! `Manager::from_connect` would let a connector of ours resolve the Consul
//! name per connection, but its `Connect` must fail with a
//! `tokio_postgres::Error`, which nothing outside tokio-postgres can make: a
//! DNS failure would lose its words and its "retrying may help", and the
//! generation rule below would need a recycle hook besides. Each connection
//! remembers the pool's generation when it was made; `forget_all` moves the
//! generation on, so connections to a server that stopped being the primary
//! are never handed out again, even those in use at that moment. Whatever was
//! learnt from that server (the writers' series ids) is stale from then on:
//! [`Database::generation`] tells its holders.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use deadpool::managed::{self, Metrics, Object, Pool, RecycleError, RecycleResult};
use tokio_postgres::Client;

use super::{ConnectError, connect};
use crate::backoff::Backoff;
use crate::config::DatabaseConfig;
use crate::metrics as m;

/// Connections to the database, made on demand and reused.
#[derive(Clone)]
pub struct Database {
    pool: Pool<Connector>,
    generation: Arc<AtomicU64>,
    /// The URL without its password, for errors.
    pub display: String,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("url", &self.display)
            .finish()
    }
}

/// One pooled connection, with the generation it was made in.
#[derive(Debug)]
pub struct Connection {
    client: Client,
    generation: u64,
}

impl Deref for Connection {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// Makes and checks connections for the pool.
#[derive(Debug)]
pub struct Connector {
    config: DatabaseConfig,
    generation: Arc<AtomicU64>,
}

impl managed::Manager for Connector {
    type Type = Connection;
    type Error = ConnectError;

    async fn create(&self) -> Result<Connection, ConnectError> {
        let generation = self.generation.load(Ordering::Acquire);
        let client = connect(&self.config).await?;
        Ok(Connection { client, generation })
    }

    async fn recycle(
        &self,
        connection: &mut Connection,
        _: &Metrics,
    ) -> RecycleResult<ConnectError> {
        if connection.client.is_closed() {
            // The server went away (a primary stopping closes its idle
            // connections): the next connection may reach another server,
            // so what was learnt from this one is stale, as after forget_all.
            // Once per generation, however many connections find it closed.
            let moved_on = self.generation.compare_exchange(
                connection.generation,
                connection.generation + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            if moved_on.is_ok() {
                metrics::counter!(m::PRIMARY_LOST).increment(1);
            }
            return Err(RecycleError::message("the connection is closed"));
        }
        if connection.generation != self.generation.load(Ordering::Acquire) {
            return Err(RecycleError::message("made before the primary moved"));
        }
        Ok(())
    }
}

impl Database {
    /// A pool of at most `max_connections` connections to `config`.
    pub fn new(config: DatabaseConfig, max_connections: usize) -> Database {
        Database::with_generation(config, max_connections, Arc::new(AtomicU64::new(0)))
    }

    /// Another pool to the same server, for connections with other session
    /// settings (`config`), sharing this pool's generation: a `forget_all`
    /// of either forgets the connections of both.
    pub fn sibling(&self, config: DatabaseConfig, max_connections: usize) -> Database {
        Database::with_generation(config, max_connections, self.generation.clone())
    }

    fn with_generation(
        config: DatabaseConfig,
        max_connections: usize,
        generation: Arc<AtomicU64>,
    ) -> Database {
        let display = config.display.clone();
        let pool = Pool::builder(Connector {
            config,
            generation: generation.clone(),
        })
        .max_size(max_connections)
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .expect("a pool with a runtime and no timeouts builds");
        Database {
            pool,
            generation,
            display,
        }
    }

    /// A connection: a pooled one still good, or a new one (resolving the host again).
    pub async fn get(&self) -> Result<Object<Connector>, ConnectError> {
        self.pool.get().await.map_err(|error| match error {
            managed::PoolError::Backend(error) => error,
            other => ConnectError {
                target: self.display.clone(),
                reason: other.to_string(),
                retriable: true,
            },
        })
    }

    /// A connection, waiting with backoff while the server cannot be reached
    /// (refused, DNS failing, starting up); errors a person must fix return.
    pub async fn get_retrying(&self) -> Result<Object<Connector>, ConnectError> {
        let mut backoff = Backoff::default();
        loop {
            match self.get().await {
                Err(error) if error.retriable => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, retry_in = ?delay, "database unreachable; retrying");
                    metrics::counter!(m::RETRIES, "cause" => "database_unavailable").increment(1);
                    tokio::time::sleep(delay).await;
                }
                result => return result,
            }
        }
    }

    /// Moves on at every [`forget_all`](Self::forget_all): what was read from
    /// the database under an older generation may not hold on the server
    /// that answers now (after a failover with asynchronous replication the
    /// new primary may lack the newest rows and reuse their ids).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Drops every pooled connection, now and as each in use comes back:
    /// the server said it is no longer the primary, or went away.
    pub fn forget_all(&self) {
        metrics::counter!(m::PRIMARY_LOST).increment(1);
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.pool.retain(|_, _| false);
    }
}
