//! Errors of the write path, classified for the retry decision.

use tokio_postgres::error::SqlState;

/// A write failed; the transaction, if any, was rolled back.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A statement failed.
    #[error("{during}: {}", crate::db::describe(.error))]
    Database {
        /// What was being done, e.g. "copying samples".
        during: &'static str,
        /// The client's error; questioned, not matched, by callers.
        error: tokio_postgres::Error,
    },
    /// New series were created by another worker whose transaction stayed
    /// open through three rounds of asking.
    #[error("{count} series are still missing after three rounds of creating them")]
    SeriesStillMissing { count: usize },
    /// Samples name series ids the database lacks: ids learnt from a server
    /// that is no longer the primary (a failover lost the newest series).
    /// Nothing was written; the writer forgets its ids and retries.
    #[error("{missing} series ids of the batch are unknown to the database")]
    UnknownSeries { missing: usize },
    /// The server did not answer in time: treated like a lost connection.
    #[error("{during}: no answer from the database in time")]
    TimedOut { during: &'static str },
}

impl SinkError {
    pub(crate) fn during(during: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SinkError {
        move |error| SinkError::Database { during, error }
    }

    /// Whether the same batch may succeed later, perhaps on another server:
    /// the connection broke, the server is shutting down or is no longer the
    /// primary, or the transaction lost a serialization or deadlock race.
    /// The transaction was rolled back, so retrying writes nothing twice.
    pub fn is_retriable(&self) -> bool {
        let error = match self {
            SinkError::SeriesStillMissing { .. }
            | SinkError::UnknownSeries { .. }
            | SinkError::TimedOut { .. } => return true,
            SinkError::Database { error, .. } => error,
        };
        if error.is_closed() {
            return true;
        }
        match error.code() {
            None => true, // IO errors: refused, reset, timed out.
            Some(code) => {
                *code == SqlState::READ_ONLY_SQL_TRANSACTION
                    || *code == SqlState::T_R_SERIALIZATION_FAILURE
                    || *code == SqlState::T_R_DEADLOCK_DETECTED
                    || *code == SqlState::QUERY_CANCELED
                    // lock_timeout: a session holding the rows may yet end.
                    || *code == SqlState::LOCK_NOT_AVAILABLE
                    // The server ended a session that went quiet inside its
                    // transaction (the network stalled): rolled back.
                    || *code == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT
                    || code.code().starts_with("08") // connection exception
                    || code.code().starts_with("57") // admin shutdown, crash shutdown, cannot connect now
                    || code.code().starts_with("53") // insufficient resources
            }
        }
    }

    /// Whether the server went away or said it is not the primary any more,
    /// so that pooled connections should be dropped and the name resolved again.
    pub fn is_not_primary(&self) -> bool {
        let error = match self {
            SinkError::TimedOut { .. } => return true,
            SinkError::SeriesStillMissing { .. } | SinkError::UnknownSeries { .. } => return false,
            SinkError::Database { error, .. } => error,
        };
        error.is_closed()
            || error.code().is_none_or(|code| {
                *code == SqlState::READ_ONLY_SQL_TRANSACTION
                    || *code == SqlState::ADMIN_SHUTDOWN
                    || *code == SqlState::CRASH_SHUTDOWN
                    || *code == SqlState::CANNOT_CONNECT_NOW
            })
    }

    /// Whether the database refused the rows themselves: a data exception
    /// (class 22: a value out of range, an overflow in an aggregate a
    /// trigger keeps), an integrity constraint (class 23), a limit a row
    /// exceeds (class 54), or an exception a trigger raised (class P0). No
    /// retry can fix these, but the batch's other records may be fine.
    pub fn is_data_error(&self) -> bool {
        let SinkError::Database { error, .. } = self else {
            return false;
        };
        error.code().is_some_and(|code| {
            let class = &code.code()[..2];
            matches!(class, "22" | "23" | "54" | "P0")
        })
    }

    /// The database's own words for a refused record, as a dead letter's
    /// reason: message, detail, SQLSTATE and what was being written.
    pub fn refusal(&self) -> String {
        match self {
            SinkError::Database { during, error } => match error.code() {
                Some(code) => format!(
                    "the database refused the record: {} (SQLSTATE {}, {during})",
                    crate::db::describe(error),
                    code.code()
                ),
                None => format!("the database refused the record: {self}"),
            },
            other => format!("the database refused the record: {other}"),
        }
    }

    /// Whether the server refused samples for series it does not have: ids
    /// learnt from a server that is no longer the primary (a failover lost
    /// the newest series). Retried after the writer forgets its ids.
    pub fn is_unknown_series(&self) -> bool {
        matches!(self, SinkError::UnknownSeries { .. })
    }

    /// A stable label for the retries metric.
    pub fn cause(&self) -> &'static str {
        if self.is_not_primary() {
            "database_unavailable"
        } else if self.is_unknown_series() {
            "unknown_series"
        } else if self.is_retriable() {
            "database_conflict"
        } else {
            "database_error"
        }
    }
}
