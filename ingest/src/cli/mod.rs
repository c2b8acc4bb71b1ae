//! The command line: global flags, the subcommands, the config file, and
//! how their layers merge (flag > `INGEST_*` environment > file > default).

mod consume;
mod database;
mod gateway;
mod migrate;
mod provision;
mod status;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use serde::Deserialize;

pub use database::DatabaseArgs;

/// IoT telemetry from Kinesis into TimescaleDB, exactly once.
///
/// Every flag can also be set with the environment variable shown in its
/// help, or in the TOML file given by --config (sections [database],
/// [migrate]; keys are the flag names without dashes in front). Flags win
/// over the environment, which wins over the file.
#[derive(Debug, Parser)]
#[command(name = "ingest", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every subcommand takes.
#[derive(Debug, clap::Args)]
pub struct GlobalArgs {
    /// TOML file with settings for the subcommands (flags and environment win over it).
    #[arg(long, global = true, env = "INGEST_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format on stderr: text for people, json for a log pipeline in a pod.
    /// The level comes from RUST_LOG (default: info).
    #[arg(long, global = true, env = "INGEST_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Migrate(migrate::MigrateArgs),
    Consume(consume::ConsumeArgs),
    Gateway(gateway::GatewayArgs),
    Provision(provision::ProvisionArgs),
    Status(status::StatusArgs),
}

/// The optional TOML config file: one section per component.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    #[serde(default)]
    pub database: DatabaseArgs,
    #[serde(default)]
    pub migrate: migrate::MigrateSettingsArgs,
}

impl ConfigFile {
    fn load(path: Option<&Path>) -> anyhow::Result<ConfigFile> {
        let Some(path) = path else {
            return Ok(ConfigFile::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        toml::from_str(&text)
            .map_err(|error| anyhow::anyhow!("{}", error.to_string().replace('\n', " ")))
            .with_context(|| format!("invalid config file {}", path.display()))
    }
}

pub fn init_logging(format: LogFormat) {
    // The server's NOTICEs (e.g. "schema already exists, skipping") arrive as
    // tokio_postgres info events: noise unless asked for with RUST_LOG.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tokio_postgres=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // When stderr is gone (a closed pipe), the default reports that with
        // eprintln!, which panics, and a task that logs (the signal
        // handler) dies before it acts: lose the log line, not the process.
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let file = ConfigFile::load(cli.global.config.as_deref())?;
    match cli.command {
        Command::Migrate(args) => migrate::run(args, file).await,
        Command::Consume(args) => consume::run(args, file).await,
        Command::Gateway(args) => gateway::run(args, file).await,
        Command::Provision(args) => provision::run(args, file).await,
        Command::Status(args) => status::run(args, file).await,
    }
}
