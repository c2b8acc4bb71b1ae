//! `ingest provision`: the AWS side, created or found, idempotently.
//!
//! Provisioning is a list of steps, each of which makes one resource what
//! the configuration says (or finds it so) and reports a [`Step`]:
//!
//! 1. [`stream`]: the Kinesis stream (provisioned shards or on-demand).
//! 2. [`iot`]: the IoT topic rule with a Kinesis action into that stream.
//!
//! A new resource (the archive's delivery stream and bucket) is one more
//! module with one more function returning a [`Step`], and one more call in
//! the binary. Each step runs against AWS or an emulator alike; endpoints
//! come from the standard AWS environment.

pub mod iot;
pub mod stream;

use std::fmt;

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The resource did not exist and was created.
    Created,
    /// The resource existed as configured: nothing was changed.
    Found,
    /// The resource existed and was changed to the configuration.
    Updated,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Created => "created",
            Action::Found => "found",
            Action::Updated => "updated",
        })
    }
}

/// One resource's report: one line of `ingest provision`'s output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The kind of resource, e.g. `stream`, `topic rule`.
    pub resource: &'static str,
    /// Its name.
    pub name: String,
    /// What was done.
    pub action: Action,
    /// The resource as it is now (and any note for a person).
    pub detail: String,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<11} {}: {}; {}",
            self.resource, self.name, self.action, self.detail
        )
    }
}

/// Why provisioning stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The Kinesis step failed.
    #[error(transparent)]
    Kinesis(#[from] crate::source::kinesis::SourceError),
    /// The endpoint cannot make what was asked for.
    #[error("{0}")]
    Unsupported(String),
    /// An AWS IoT call failed.
    #[error("{operation} of topic rule {rule:?}: {detail}")]
    Iot {
        /// The IoT operation, e.g. `CreateTopicRule`.
        operation: &'static str,
        /// The rule's name.
        rule: String,
        /// What AWS (or the emulator) said, and what to do.
        detail: String,
    },
}
