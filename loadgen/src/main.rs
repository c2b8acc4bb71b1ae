//! `loadgen`: simulated devices over MQTT and CoAP. Not built yet (issue #5).

use clap::Parser;

/// Simulate IoT devices that send telemetry over MQTT and CoAP, and report
/// what was sent, acknowledged and delivered. (Not built yet: issue #5.)
#[derive(Debug, Parser)]
#[command(name = "loadgen", version)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("loadgen is not built yet (tracked in issue #5); nothing was sent")
}
