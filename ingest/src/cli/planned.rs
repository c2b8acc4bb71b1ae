//! Subcommands whose help is written but whose work is not built yet. They
//! say so and fail, rather than pretend.

use clap::Args;

/// Take telemetry from CoAP devices and from an MQTT broker and put it into the
/// Kinesis stream. (Not built yet.)
#[derive(Debug, Args)]
pub struct GatewayArgs {}

/// Create the AWS side, idempotently: the Kinesis stream, the IoT topic rule, the
/// Firehose delivery stream and its S3 bucket with a Glacier lifecycle. (Not built yet.)
#[derive(Debug, Args)]
pub struct ProvisionArgs {}

pub fn not_built(command: &str, issue: u32) -> anyhow::Result<()> {
    anyhow::bail!(
        "`ingest {command}` is not built yet (tracked in issue #{issue}); nothing was done"
    )
}
