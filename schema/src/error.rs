//! Errors of planning and applying migrations.

/// Why planning or applying the schema failed.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// A statement failed; `during` names what was being done.
    /// (The PostgreSQL error is in the message, not a `source`, so that a
    /// printed chain does not say it twice.)
    #[error("{during}: {}", describe(.error))]
    Database {
        during: String,
        error: tokio_postgres::Error,
    },
    /// An applied migration's SQL differs from the one embedded in this binary.
    #[error(
        "migration {version} ({name}) was changed after it was applied: its checksum in ingest.schema_migrations differs from this binary's"
    )]
    ChecksumMismatch { version: i32, name: String },
    /// The database holds migrations this binary does not know: it is older than the schema.
    #[error(
        "the database has migration {version}, which this binary does not know: run a newer ingest"
    )]
    UnknownVersion { version: i32 },
    /// The storage path asked for is not the one the schema was created with.
    #[error(
        "the schema was created for storage '{existing}', not '{requested}': storage cannot change after the first migration"
    )]
    StorageMismatch { existing: String, requested: String },
    /// The storage path asked for cannot be used on this server.
    #[error("storage '{storage}' is not available: {why}")]
    StorageUnavailable { storage: String, why: String },
}

impl SchemaError {
    /// Whether trying again later may succeed (the server went away or a
    /// conflicting transaction got in the way); false for errors a person must fix.
    pub fn is_retriable(&self) -> bool {
        match self {
            SchemaError::Database { error, .. } => {
                error.is_closed()
                    || error.code().is_some_and(|code| {
                        let class = &code.code()[..2];
                        // 08: connection exception, 40: transaction rollback
                        // (serialization, deadlock), 57: operator intervention.
                        class == "08" || class == "40" || class == "57"
                    })
            }
            _ => false,
        }
    }

    pub(crate) fn database(
        during: impl Into<String>,
    ) -> impl FnOnce(tokio_postgres::Error) -> Self {
        let during = during.into();
        move |error| SchemaError::Database { during, error }
    }
}

/// One line for a PostgreSQL error: the server's message with its detail and
/// hint when the server sent one, else the client's description.
pub fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => {
            let mut line = db.message().to_string();
            if let Some(detail) = db.detail() {
                line.push_str(&format!(" ({detail})"));
            }
            if let Some(hint) = db.hint() {
                line.push_str(&format!("; hint: {hint}"));
            }
            line
        }
        None => {
            // The client error's own text plus its cause (io error, ...), on one line.
            let mut line = error.to_string();
            let mut source = std::error::Error::source(error);
            while let Some(cause) = source {
                let cause_text = cause.to_string();
                if !line.contains(&cause_text) {
                    line.push_str(": ");
                    line.push_str(&cause_text);
                }
                source = cause.source();
            }
            line.replace('\n', " ")
        }
    }
}
