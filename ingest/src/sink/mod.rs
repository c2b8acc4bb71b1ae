//! Where batches go. Only [`postgres`] knows tokio-postgres's write path.

pub mod postgres;
