//! Running a fleet: check the targets answer, start each device on its own
//! task at its start time, show progress, and collect what became of every
//! message.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::message::{DeviceOutcome, DeviceTraffic, Protocol};
use crate::net::{self, MqttTarget};
use crate::sign::CoapKeys;
use crate::stats::{Clock, Stats};
use crate::{coap, mqtt};

/// What every device task shares.
#[derive(Debug)]
pub struct Context {
    pub clock: Clock,
    pub stats: Stats,
    /// After this, a device stops waiting: what is unacknowledged is
    /// uncertain, and a device that cannot connect fails what is left.
    pub deadline: Instant,
    /// How long an MQTT PUBACK may take.
    pub ack_timeout: Duration,
    /// loadgen's own CPU use during the measured window, in cores.
    pub window_cores: std::sync::Mutex<Option<f64>>,
}

/// This process's CPU time so far (user and system), from /proc/self/stat
/// (fields 14 and 15, in clock ticks of 1/100 s on Linux).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Where devices send to.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    pub mqtt: Option<MqttTarget>,
    pub coap: Option<SocketAddr>,
    /// Source addresses to spread sockets over (see `net`).
    pub source_addresses: Vec<IpAddr>,
    /// Keys of the CoAP devices that sign, by path.
    pub coap_keys: Arc<CoapKeys>,
}

/// How a run goes.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub clock: Clock,
    /// Offset of the last message due (before the clock's speed).
    pub last_due: Duration,
    /// How long after the last message is due acknowledgements are waited for.
    pub drain: Duration,
    pub ack_timeout: Duration,
    /// The progress bar's length: the messages to send.
    pub messages: u64,
    /// Draw a progress bar (indicatif draws it on a terminal only).
    pub progress: bool,
}

/// Everything that happened.
#[derive(Debug)]
pub struct RunResult {
    pub outcomes: Vec<DeviceOutcome>,
    pub context: Arc<Context>,
    /// From the run's start to the last device's end.
    pub elapsed: Duration,
}

/// Checks what the devices need: the targets given and answering, and
/// descriptors for one socket each. Each failure is one line.
pub async fn preflight(
    mqtt_devices: usize,
    coap_devices: usize,
    targets: &mut Targets,
) -> Result<(), String> {
    if mqtt_devices > 0 {
        let target = targets
            .mqtt
            .as_ref()
            .ok_or("MQTT devices need --mqtt-url (or --protocol coap)")?;
        mqtt::probe(target.address, &target.url).await?;
    }
    if coap_devices > 0 {
        let target = targets
            .coap
            .ok_or("CoAP devices need --coap-addr (or --protocol mqtt)")?;
        coap::probe(target).await?;
    }
    let target_ip = targets
        .mqtt
        .as_ref()
        .map(|t| t.address.ip())
        .or(targets.coap.map(|a| a.ip()))
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    targets.source_addresses = net::source_addresses(
        &targets.source_addresses,
        mqtt_devices.max(coap_devices),
        target_ip,
    )?;
    net::ensure_descriptors((mqtt_devices + coap_devices) as u64 + 256)
}

/// Runs every device to its end.
pub async fn run(devices: Vec<DeviceTraffic>, targets: &Targets, options: RunOptions) -> RunResult {
    let clock = options.clock;
    let context = Arc::new(Context {
        clock,
        stats: Stats::default(),
        deadline: clock.due(options.last_due) + options.drain,
        ack_timeout: options.ack_timeout,
        window_cores: std::sync::Mutex::new(None),
    });
    let cpu_meter = {
        let context = Arc::clone(&context);
        tokio::spawn(async move {
            let (from, to) = context.clock.window;
            tokio::time::sleep_until(context.clock.due(from).into()).await;
            let (Some(before), started) = (cpu_seconds(), Instant::now()) else {
                return;
            };
            tokio::time::sleep_until(context.clock.due(to).into()).await;
            if let Some(after) = cpu_seconds() {
                *context.window_cores.lock().expect("not poisoned") =
                    Some((after - before) / started.elapsed().as_secs_f64());
            }
        })
    };
    let progress = progress_bar(options.progress, options.messages);
    let ticker = {
        let context = Arc::clone(&context);
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let mut previous = (Instant::now(), 0);
            loop {
                tick.tick().await;
                let (sent, acked, errors, in_flight) = context.stats.totals();
                let now = Instant::now();
                let rate = (sent - previous.1) as f64 / (now - previous.0).as_secs_f64();
                previous = (now, sent);
                progress.set_position(sent);
                progress.set_message(format!(
                    "{rate:>8.0}/s  acked {acked}  errors {errors}  in flight {in_flight}"
                ));
            }
        })
    };

    let mut tasks = tokio::task::JoinSet::new();
    for (index, traffic) in devices.into_iter().enumerate() {
        let context = Arc::clone(&context);
        let source = net::source_for(&targets.source_addresses, index);
        let mqtt = targets.mqtt.as_ref().map(|t| t.address);
        let coap = targets.coap;
        let key = targets.coap_keys.get(&traffic.target).cloned();
        tasks.spawn(async move {
            tokio::time::sleep_until(context.clock.due(traffic.start).into()).await;
            match traffic.protocol {
                Protocol::Mqtt { .. } => {
                    mqtt::run(traffic, mqtt.expect("checked"), source, &context).await
                }
                Protocol::Coap { .. } => {
                    coap::run(traffic, coap.expect("checked"), source, key, &context).await
                }
            }
        });
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    while let Some(outcome) = tasks.join_next().await {
        outcomes.push(outcome.expect("a device task does not panic"));
    }
    ticker.abort();
    cpu_meter.abort();
    progress.finish_and_clear();
    RunResult {
        outcomes,
        elapsed: clock.start.elapsed(),
        context,
    }
}

/// A bar drawn on stderr only when it is a terminal (indicatif hides it
/// otherwise), and never with `--quiet`.
fn progress_bar(show: bool, length: u64) -> ProgressBar {
    let target = if show {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(length), target);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar
}
