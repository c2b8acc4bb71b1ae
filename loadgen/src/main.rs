//! `loadgen`: simulated devices over MQTT and CoAP; `loadgen record` and
//! `loadgen replay` for captured traffic. The report goes to stdout; the
//! progress bar and errors to stderr.
//!
//! Exit status: 0 when every message was sent and acknowledged (and, with
//! --verify-database-url, found in the database exactly once); 2 when the
//! run finished but something failed, was lost or was duplicated; 1 when it
//! could not run.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand, ValueEnum};

use loadgen::capture;
use loadgen::endpoint::Endpoint;
use loadgen::message::{DeviceTraffic, Protocol};
use loadgen::model::FleetSettings;
use loadgen::net::{self, MqttTarget};
use loadgen::report::{Report, describe_mix, thousands};
use loadgen::run::{self, RunOptions, Targets};
use loadgen::stats::Clock;
use loadgen::verify;

/// Simulate IoT devices sending telemetry over MQTT and CoAP, and report
/// what was sent, acknowledged and (with --verify-database-url) delivered.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    fleet: FleetArgs,
    #[command(flatten)]
    targets: TargetArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write the traffic a run would send to a file, without sending it.
    Record {
        #[command(flatten)]
        fleet: FleetArgs,
        /// The capture file (JSON Lines).
        #[arg(long)]
        out: PathBuf,
    },
    /// Send a capture again, at its recorded pacing times --speed.
    Replay {
        /// The capture file written by `loadgen record`.
        file: PathBuf,
        /// How much faster than recorded (2: twice as fast).
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        #[command(flatten)]
        targets: TargetArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProtocolChoice {
    Mqtt,
    Coap,
    Mixed,
}

/// Who the devices are and what they send.
#[derive(Debug, Args)]
struct FleetArgs {
    /// How many devices.
    #[arg(long, default_value_t = 100)]
    devices: u32,
    /// Which protocol the devices use.
    #[arg(long, value_enum, default_value = "mixed")]
    protocol: ProtocolChoice,
    /// With --protocol mixed: the share of devices on MQTT.
    #[arg(long, default_value_t = 0.5)]
    mqtt_share: f64,
    /// MQTT QoS: 0 or 1.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// The share of CoAP devices that send NON instead of CON.
    #[arg(long, default_value_t = 0.2)]
    coap_non_share: f64,
    /// Messages per second per device.
    #[arg(long, default_value_t = 1.0, conflicts_with = "total_rate")]
    rate: f64,
    /// Messages per second of the whole fleet, instead of --rate.
    #[arg(long)]
    total_rate: Option<f64>,
    /// The most fields per record (each device has 1 to this many).
    #[arg(long, default_value_t = 4)]
    fields: usize,
    /// Drift per hour, as a share of each field's swing.
    #[arg(long, default_value_t = 0.0)]
    drift: f64,
    /// Devices per house.
    #[arg(long, default_value_t = 4)]
    devices_per_house: u32,
    /// Device ids are <prefix>-000042, houses <prefix>-h00010.
    #[arg(long, default_value = "lg")]
    prefix: String,
    /// The same seed sends the same traffic. [default: random, printed]
    #[arg(long)]
    seed: Option<u64>,
    /// Devices connect at most this many per second (the ramp-up).
    #[arg(long, default_value_t = 2000.0)]
    connect_rate: f64,
    /// Traffic after the last device connected, before the measured window.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// The measured window.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
}

/// Where the devices send to.
#[derive(Debug, Args)]
struct TargetArgs {
    /// The MQTT broker.
    #[arg(
        long,
        env = "LOADGEN_MQTT_URL",
        default_value = "mqtt://127.0.0.1:1883"
    )]
    mqtt_url: String,
    /// The CoAP gateway (`ingest gateway`).
    #[arg(long, env = "LOADGEN_COAP_ADDR", default_value = "127.0.0.1:5683")]
    coap_addr: String,
    /// The gateway's keys file (`<house>/<device> <secret>` lines): CoAP
    /// devices that have a key sign their requests.
    #[arg(long, env = "LOADGEN_COAP_KEYS")]
    coap_keys: Option<PathBuf>,
    /// Source addresses to spread sockets over. [default: the system's; on
    /// loopback 127.0.0.1, .2, ... when one address has too few ports]
    #[arg(long, value_delimiter = ',')]
    source_addrs: Vec<IpAddr>,
    /// How long an MQTT PUBACK may take.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    ack_timeout: Duration,
    /// After the last message is due, how long answers are waited for.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    drain: Duration,
}

/// What is reported, and where.
#[derive(Debug, Args)]
struct OutputArgs {
    /// Wait for the rows in this database and count delivered, lost and
    /// duplicated messages.
    #[arg(long, env = "LOADGEN_VERIFY_DATABASE_URL")]
    verify_database_url: Option<String>,
    /// How long to wait for the rows.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    verify_timeout: Duration,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No progress bar (there is none when stderr is not a terminal).
    #[arg(long)]
    quiet: bool,
    /// Serve /metrics (Prometheus text) on this address while running.
    /// [default: off]
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// With --metrics-addr: after the report, how long to wait for a last
    /// scrape, so that the final counts reach Prometheus (0s: not at all).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    metrics_wait: Duration,
}

impl FleetArgs {
    fn settings(&self) -> Result<FleetSettings, String> {
        if self.devices == 0 {
            return Err("--devices must be at least 1".into());
        }
        let share = |name: &str, value: f64| {
            if (0.0..=1.0).contains(&value) {
                Ok(value)
            } else {
                Err(format!("{name} must be between 0 and 1, not {value}"))
            }
        };
        let rate = match self.total_rate {
            Some(total) => total / f64::from(self.devices),
            None => self.rate,
        };
        if !(rate > 0.0 && rate <= 1000.0) {
            return Err(format!(
                "the rate per device must be above 0 and at most 1000/s (ts is in ms), not {rate}"
            ));
        }
        if self.connect_rate.is_nan() || self.connect_rate <= 0.0 {
            return Err("--connect-rate must be above 0".into());
        }
        if self.fields == 0 {
            return Err("--fields must be at least 1".into());
        }
        Ok(FleetSettings {
            devices: self.devices,
            mqtt_share: match self.protocol {
                ProtocolChoice::Mqtt => 1.0,
                ProtocolChoice::Coap => 0.0,
                ProtocolChoice::Mixed => share("--mqtt-share", self.mqtt_share)?,
            },
            qos: self.qos,
            coap_non_share: share("--coap-non-share", self.coap_non_share)?,
            rate,
            max_fields: self.fields,
            drift: self.drift,
            devices_per_house: self.devices_per_house.max(1),
            prefix: self.prefix.clone(),
            seed: self.seed.unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
                    % 1_000_000
            }),
            connect_rate: self.connect_rate,
            warmup: self.warmup,
            duration: self.duration,
        })
    }
}

impl TargetArgs {
    /// Only the targets some device uses are parsed and probed.
    fn targets(&self, mqtt: bool, coap: bool) -> Result<Targets, String> {
        Ok(Targets {
            mqtt: if mqtt {
                Some(self.mqtt_url.parse::<MqttTarget>()?)
            } else {
                None
            },
            coap: if coap {
                Some(net::resolve(&self.coap_addr).map_err(|e| format!("--coap-addr: {e}"))?)
            } else {
                None
            },
            source_addresses: self.source_addrs.clone(),
            coap_keys: match (&self.coap_keys, coap) {
                (Some(path), true) => Arc::new(loadgen::sign::read_keys(path)?),
                _ => Arc::default(),
            },
        })
    }
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
}

fn mix(devices: &[DeviceTraffic]) -> BTreeMap<Protocol, u64> {
    let mut counts = BTreeMap::new();
    for device in devices {
        *counts.entry(device.protocol).or_default() += 1;
    }
    counts
}

/// Generated traffic, sent.
async fn run_fleet(
    fleet: FleetArgs,
    target_args: TargetArgs,
    output: OutputArgs,
) -> Result<Report, String> {
    let settings = fleet.settings()?;
    let mqtt_devices = (0..settings.devices)
        .filter(|&i| matches!(settings.protocol_of(i), Protocol::Mqtt { .. }))
        .count();
    let coap_devices = settings.devices as usize - mqtt_devices;
    let mut targets = target_args.targets(mqtt_devices > 0, coap_devices > 0)?;
    run::preflight(mqtt_devices, coap_devices, &mut targets).await?;

    let start_unix_ms = now_unix_ms();
    let start = Instant::now();
    let window = settings.window();
    let mut due_in_window: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut total = 0;
    let devices: Vec<DeviceTraffic> = (0..settings.devices)
        .map(|index| {
            let model = settings.device(index, start_unix_ms);
            *due_in_window.entry(model.protocol.name()).or_default() +=
                model.due_between(window.0, window.1);
            total += model.due_between(Duration::ZERO, window.1);
            DeviceTraffic {
                device: model.device.clone(),
                protocol: model.protocol,
                target: model.target.clone(),
                check_metric: model.check_metric().to_owned(),
                start: settings.start_of(index),
                messages: Box::new(model),
            }
        })
        .collect();
    let description = format!(
        "{} devices ({}), {} msg/s each, 1 to {} fields, seed {}; connected at {}/s, {} s warm-up",
        thousands(u64::from(settings.devices)),
        describe_mix(&mix(&devices)),
        settings.rate,
        settings.max_fields,
        settings.seed,
        settings.connect_rate,
        settings.warmup.as_secs_f64(),
    );
    eprintln!(
        "loadgen: starting {} devices over {:.1} s; {} s warm-up, then {} s measured",
        settings.devices,
        window.0.saturating_sub(settings.warmup).as_secs_f64(),
        settings.warmup.as_secs_f64(),
        settings.duration.as_secs_f64()
    );
    let options = RunOptions {
        clock: Clock {
            start,
            speed: 1.0,
            window,
        },
        last_due: window.1,
        drain: target_args.drain,
        ack_timeout: target_args.ack_timeout,
        messages: total,
        progress: !output.quiet,
    };
    finish(
        description,
        devices,
        &targets,
        options,
        &due_in_window,
        &output,
    )
    .await
}

/// A capture, sent again.
async fn replay(
    file: PathBuf,
    speed: f64,
    target_args: TargetArgs,
    output: OutputArgs,
) -> Result<Report, String> {
    if speed.is_nan() || speed <= 0.0 {
        return Err(format!("--speed must be above 0, not {speed}"));
    }
    let name = file.display().to_string();
    let reader = std::fs::File::open(&file).map_err(|e| format!("cannot open {name}: {e}"))?;
    let capture = capture::read(std::io::BufReader::new(reader), &name)?;
    if capture.messages == 0 {
        return Err(format!("{name} holds no messages"));
    }
    let counts = mix(&capture.devices);
    let mqtt_devices: u64 = counts
        .iter()
        .filter(|(p, _)| matches!(p, Protocol::Mqtt { .. }))
        .map(|(_, n)| n)
        .sum();
    let coap_devices = capture.devices.len() as u64 - mqtt_devices;
    let mut targets = target_args.targets(mqtt_devices > 0, coap_devices > 0)?;
    run::preflight(mqtt_devices as usize, coap_devices as usize, &mut targets).await?;

    // The whole capture is measured.
    let due_in_window = capture.per_protocol.clone();
    let description = format!(
        "replay of {name}: {} messages of {} devices ({}) at {speed}x speed",
        thousands(capture.messages),
        thousands(capture.devices.len() as u64),
        describe_mix(&counts),
    );
    eprintln!("loadgen: replaying {name} at {speed}x");
    let end = capture.span + Duration::from_micros(1);
    let options = RunOptions {
        clock: Clock {
            start: Instant::now(),
            speed,
            window: (Duration::ZERO, end),
        },
        last_due: end,
        drain: target_args.drain,
        ack_timeout: target_args.ack_timeout,
        messages: capture.messages,
        progress: !output.quiet,
    };
    finish(
        description,
        capture.devices,
        &targets,
        options,
        &due_in_window,
        &output,
    )
    .await
}

/// Runs the devices, verifies, reports.
async fn finish(
    description: String,
    devices: Vec<DeviceTraffic>,
    targets: &Targets,
    options: RunOptions,
    due_in_window: &BTreeMap<&'static str, u64>,
    output: &OutputArgs,
) -> Result<Report, String> {
    let result = run::run(devices, targets, options).await;
    let mut report = Report::new(description, &result, due_in_window);
    if let Some(url) = &output.verify_database_url {
        eprintln!(
            "loadgen: waiting up to {} s for the rows in the database",
            output.verify_timeout.as_secs()
        );
        report.verification =
            Some(verify::verify(url, &result.outcomes, output.verify_timeout).await?);
    }
    print!("{}", report.render());
    if let Some(path) = &output.json {
        let json = serde_json::to_string_pretty(&report).expect("a report serializes");
        std::fs::write(path, json + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(report)
}

/// Runs `run` with /metrics served (with --metrics-addr) from before its
/// preflight to one last scrape after its report.
async fn with_metrics(
    addr: Option<SocketAddr>,
    wait: Duration,
    run: impl Future<Output = Result<Report, String>>,
) -> Result<Report, String> {
    let endpoint = match addr {
        Some(addr) => Some(Endpoint::start(addr).await?),
        None => None,
    };
    let report = run.await?;
    if let Some(endpoint) = endpoint {
        endpoint.finish(wait).await;
    }
    Ok(report)
}

/// Writes what a run would send.
fn record(fleet: FleetArgs, out: PathBuf) -> Result<(), String> {
    let settings = fleet.settings()?;
    let start_unix_ms = now_unix_ms();
    let devices = (0..settings.devices)
        .map(|index| settings.device(index, start_unix_ms))
        .collect();
    let name = out.display().to_string();
    let file = std::fs::File::create(&out).map_err(|e| format!("cannot create {name}: {e}"))?;
    let written = capture::record(devices, &mut std::io::BufWriter::new(file))
        .map_err(|e| format!("cannot write {name}: {e}"))?;
    eprintln!(
        "loadgen: recorded {} messages of {} devices (seed {}) to {name}",
        thousands(written),
        thousands(u64::from(settings.devices)),
        settings.seed
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let result = match cli.command {
        Some(Command::Record { fleet, out }) => record(fleet, out).map(|()| None),
        Some(Command::Replay {
            file,
            speed,
            targets,
            output,
        }) => runtime
            .block_on(with_metrics(
                output.metrics_addr,
                output.metrics_wait,
                replay(file, speed, targets, output),
            ))
            .map(Some),
        None => runtime
            .block_on(with_metrics(
                cli.output.metrics_addr,
                cli.output.metrics_wait,
                run_fleet(cli.fleet, cli.targets, cli.output),
            ))
            .map(Some),
    };
    match result {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(report)) if report.clean() => ExitCode::SUCCESS,
        Ok(Some(_)) => ExitCode::from(2),
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
