//! `ingest gateway`: CoAP devices and an MQTT broker into the Kinesis stream.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tokio_util::sync::CancellationToken;

use ingest::config::{ConfigError, parse_duration};
use ingest::decode::DecodeLimits;
use ingest::gateway::GatewayConfig;
use ingest::gateway::auth::{AuthPolicy, AuthSettings};
use ingest::gateway::mqtt::{Credentials, MqttSettings, TopicLayout};
use ingest::gateway::producer::MIN_QUEUE_BYTES;

use super::ConfigFile;

/// The most a CoAP payload may be: one UDP datagram, less the CoAP header.
const MAX_COAP_PAYLOAD: usize = 65_000;

/// Take telemetry from CoAP devices and from an MQTT broker and put it into the
/// Kinesis stream, in the record format the consumers read.
///
/// CoAP (UDP): devices POST JSON or CBOR (Content-Format 60) to /t/{device} or
/// /t/{house}/{device}. A confirmable request gets 2.04 once Kinesis took the
/// record, 4.xx saying what is wrong with it, or 5.03 with Max-Age when Kinesis
/// did not take it within --put-timeout or the queue is full. Retransmissions
/// are answered again and never put twice. GET /health says whether Kinesis is
/// reachable, GET /.well-known/core lists the resources.
///
/// MQTT (with --mqtt-topic): subscribes with a persistent session, maps each
/// topic to device, house, field and time by --mqtt-layout, and acknowledges a
/// QoS 1 message only once Kinesis took its record.
///
/// With --auth-keys, a (house, device) that has a key must sign its requests:
/// ?time=<unix seconds>&nonce=<unique>&sig=<hex HMAC-SHA256> over the method,
/// path, time, nonce and payload (see the README). AWS access and endpoints come from the standard AWS
/// environment (AWS_REGION, AWS_ENDPOINT_URL_KINESIS, credentials chain).
/// SIGTERM or SIGINT stops taking requests and answers those in flight.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// The Kinesis stream: a name, or an ARN.
    #[arg(long, env = "INGEST_STREAM")]
    stream: String,
    /// UDP address to serve CoAP on.
    #[arg(long, env = "INGEST_COAP_BIND", default_value = "0.0.0.0:5683")]
    coap_bind: String,
    /// The MQTT broker: mqtt://[user[:password]@]host[:port] (port 1883 by default).
    #[arg(long, env = "INGEST_MQTT_URL", hide_env_values = true)]
    mqtt_url: Option<MqttUrl>,
    /// Topic filter to subscribe to, e.g. devices/+/telemetry; repeat it, or
    /// separate with commas in the variable. None: no MQTT bridge.
    #[arg(long = "mqtt-topic", env = "INGEST_MQTT_TOPICS", value_delimiter = ',')]
    mqtt_topics: Vec<String>,
    /// How topic levels map to the record, first match wins: levels {device},
    /// {house}, {name} (the payload is that field's value), {ts}, + (any), a|b
    /// (one of). [default: devices/{device}/telemetry and
    /// +/{house}/{device}/{name}/{ts}/data|event]
    #[arg(
        long = "mqtt-layout",
        env = "INGEST_MQTT_LAYOUTS",
        value_delimiter = ','
    )]
    mqtt_layouts: Vec<String>,
    /// MQTT client id, required with --mqtt-topic: the broker keeps the
    /// unacknowledged messages of this id's session, so it must survive
    /// restarts and differ between replicas (a StatefulSet's pod name).
    #[arg(long, env = "INGEST_MQTT_CLIENT_ID")]
    mqtt_client_id: Option<String>,
    /// Subscribe as a shared subscription, $share/<group>/<filter>, so that
    /// gateways in the same group split the messages instead of each taking
    /// every one (Mosquitto, AWS IoT Core).
    #[arg(long, env = "INGEST_MQTT_SHARE_GROUP")]
    mqtt_share_group: Option<String>,
    /// Where to serve /metrics, /healthz and /readyz ("off" for nowhere).
    #[arg(long, env = "INGEST_METRICS_ADDR", default_value = "127.0.0.1:9465")]
    metrics_addr: String,
    /// Device keys, one per (house, device): a file of `<house>/<device> <secret>`
    /// lines, or a folder with a file per key named `<house>.<device>` (a mounted
    /// Kubernetes secret). `hex:` before a secret means hex. Others must not be
    /// able to read them; they are read again when they change.
    #[arg(long, env = "INGEST_AUTH_KEYS", value_name = "PATH")]
    auth_keys: Option<PathBuf>,
    /// Refuse (4.01) requests of a (house, device) that has no key; without it,
    /// only those with a key must sign.
    #[arg(long, env = "INGEST_REQUIRE_AUTH", requires = "auth_keys")]
    require_auth: bool,
    /// How far a signed request's time may be from the gateway's clock.
    #[arg(long, env = "INGEST_SIGNATURE_WINDOW", default_value = "60s")]
    signature_window: String,
    /// Signatures remembered to refuse replays (52 MB at 1,000,000); when all
    /// are within the window, signed requests get 5.03 until some expire.
    #[arg(long, env = "INGEST_REPLAY_CAPACITY", default_value_t = 1_000_000)]
    replay_capacity: usize,
    /// Largest CoAP payload accepted (4.13 above it); at most 65000, one datagram.
    #[arg(long, env = "INGEST_MAX_PAYLOAD_BYTES", default_value_t = 16 * 1024)]
    max_payload_bytes: usize,
    /// How long a CoAP request waits for Kinesis before it gets 5.03.
    #[arg(long, env = "INGEST_PUT_TIMEOUT", default_value = "10s")]
    put_timeout: String,
    /// Records queued for Kinesis before CoAP requests get 5.03 (overload).
    #[arg(long, env = "INGEST_QUEUE_RECORDS", default_value_t = 50_000)]
    queue_records: usize,
    /// Bytes of records (keys and data) queued for Kinesis, calls in flight
    /// included, before CoAP requests get 5.03 and the MQTT bridge stops taking
    /// messages; at least 2 MiB (2097152), room for the largest record.
    #[arg(long, env = "INGEST_QUEUE_BYTES", default_value_t = 64 * 1024 * 1024)]
    queue_bytes: usize,
    /// PutRecords calls in flight at once.
    #[arg(long, env = "INGEST_PUT_CONCURRENCY", default_value_t = 4)]
    put_concurrency: usize,
    /// Pack the records bound for one shard into KPL aggregated records (the
    /// consumer, the KCL and aws-kinesis-agg take them apart): a shard takes
    /// 1,000 records/s but 1 MB/s, so small readings go many times further.
    /// "false" puts one Kinesis record per message, as IoT Core's rule does.
    #[arg(long, env = "INGEST_AGGREGATE", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    aggregate: bool,
    /// CoAP exchanges remembered to recognise retransmissions (about 270 bytes
    /// each, measured); they are kept 247 s unless more arrive in that time.
    #[arg(long, env = "INGEST_EXCHANGE_CAPACITY", default_value_t = 1_000_000)]
    exchange_capacity: usize,
    /// Separate CoAP responses (answers after an empty ACK) resent until the
    /// client acknowledges them, at once; more are sent once and not resent.
    #[arg(long, env = "INGEST_MAX_SEPARATE_RESPONSES", default_value_t = 10_000)]
    max_separate_responses: usize,
    /// How long a shutdown may take to answer what is in flight.
    #[arg(long, env = "INGEST_SHUTDOWN_GRACE", default_value = "10s")]
    shutdown_grace: String,
}

impl GatewayArgs {
    fn validate(self) -> Result<GatewayConfig, ConfigError> {
        let coap_bind = self
            .coap_bind
            .parse::<SocketAddr>()
            .map_err(|e| ConfigError::new("--coap-bind", &self.coap_bind, e.to_string()))?;
        let metrics_addr = match self.metrics_addr.as_str() {
            "off" | "none" => None,
            addr => Some(
                addr.parse::<SocketAddr>()
                    .map_err(|e| ConfigError::new("--metrics-addr", addr, e.to_string()))?,
            ),
        };
        if !(1..=MAX_COAP_PAYLOAD).contains(&self.max_payload_bytes) {
            return Err(ConfigError::new(
                "--max-payload-bytes",
                &self.max_payload_bytes.to_string(),
                format!("must be 1 to {MAX_COAP_PAYLOAD}: a CoAP message is one datagram"),
            ));
        }
        let put_timeout = parse_duration("--put-timeout", &self.put_timeout)?;
        if put_timeout.as_millis() < 100 || put_timeout.as_secs() > 90 {
            return Err(ConfigError::new(
                "--put-timeout",
                &self.put_timeout,
                "must be 100ms to 90s: a CoAP client stops waiting after about 93 s",
            ));
        }
        let positive = |name: &str, value: usize| {
            if value == 0 {
                Err(ConfigError::new(name, "0", "must be at least 1"))
            } else {
                Ok(value)
            }
        };
        let window = parse_duration("--signature-window", &self.signature_window)?;
        if window.is_zero() || window.as_secs() > 3_600 {
            return Err(ConfigError::new(
                "--signature-window",
                &self.signature_window,
                "must be 1s to 1h",
            ));
        }
        let auth_settings = AuthSettings {
            require: self.require_auth,
            window,
            replay_capacity: positive("--replay-capacity", self.replay_capacity)?,
        };
        let auth = match &self.auth_keys {
            Some(path) => AuthPolicy::load(path, auth_settings).map_err(|e| {
                ConfigError::new("--auth-keys", &path.display().to_string(), e.reason)
            })?,
            None => AuthPolicy::open(),
        };
        let mqtt = mqtt_settings(
            self.mqtt_url.as_ref().map(|url| url.0.as_str()),
            self.mqtt_topics,
            self.mqtt_layouts,
            self.mqtt_client_id,
            self.mqtt_share_group,
        )?;
        Ok(GatewayConfig {
            stream: self.stream,
            coap_bind,
            max_payload_bytes: self.max_payload_bytes,
            put_timeout,
            queue_records: positive("--queue-records", self.queue_records)?,
            queue_bytes: if self.queue_bytes < MIN_QUEUE_BYTES {
                return Err(ConfigError::new(
                    "--queue-bytes",
                    &self.queue_bytes.to_string(),
                    format!(
                        "must be at least {MIN_QUEUE_BYTES}: room for the largest record \
                         Kinesis takes (1 MiB), twice"
                    ),
                ));
            } else {
                self.queue_bytes
            },
            put_concurrency: positive("--put-concurrency", self.put_concurrency)?,
            aggregate: self.aggregate,
            exchange_capacity: positive("--exchange-capacity", self.exchange_capacity)?,
            max_separate_responses: positive(
                "--max-separate-responses",
                self.max_separate_responses,
            )?,
            auth,
            mqtt,
            metrics_addr,
            shutdown_grace: parse_duration("--shutdown-grace", &self.shutdown_grace)?,
        })
    }
}

fn mqtt_settings(
    url: Option<&str>,
    topics: Vec<String>,
    layouts: Vec<String>,
    client_id: Option<String>,
    share_group: Option<String>,
) -> Result<Option<MqttSettings>, ConfigError> {
    let topics: Vec<String> = topics.into_iter().filter(|t| !t.is_empty()).collect();
    if topics.is_empty() {
        return Ok(None);
    }
    let Some(url) = url else {
        return Err(ConfigError::new(
            "--mqtt-url",
            "",
            "is required with --mqtt-topic: which broker to subscribe at",
        ));
    };
    let (host, port, credentials) = parse_mqtt_url(url)?;
    for topic in &topics {
        if !valid_filter(topic) {
            return Err(ConfigError::new(
                "--mqtt-topic",
                topic,
                "not an MQTT topic filter (+ and # stand alone in a level, # only last)",
            ));
        }
    }
    let layouts = if layouts.is_empty() {
        TopicLayout::defaults()
    } else {
        layouts
            .iter()
            .map(|text| {
                text.parse::<TopicLayout>()
                    .map_err(|e| ConfigError::new("--mqtt-layout", text, e))
            })
            .collect::<Result<_, _>>()?
    };
    // No default from the host name: a rescheduled pod gets a new one and
    // orphans the session holding its unacknowledged messages.
    let client_id = client_id.filter(|id| !id.is_empty()).ok_or_else(|| {
        ConfigError::new(
            "--mqtt-client-id",
            "",
            "is required with --mqtt-topic: a stable id per gateway (the broker keeps \
             its unacknowledged messages), e.g. a StatefulSet's pod name",
        )
    })?;
    let share_group = share_group.filter(|group| !group.is_empty());
    if let Some(group) = &share_group {
        if group.contains(['/', '+', '#']) {
            return Err(ConfigError::new(
                "--mqtt-share-group",
                group,
                "a share group name has no /, + or #",
            ));
        }
        if let Some(topic) = topics.iter().find(|topic| topic.starts_with("$share/")) {
            return Err(ConfigError::new(
                "--mqtt-topic",
                topic,
                "is already shared: give the plain filter with --mqtt-share-group",
            ));
        }
    }
    Ok(Some(MqttSettings {
        host,
        port,
        credentials,
        client_id,
        filters: topics,
        share_group,
        layouts,
        max_payload_bytes: DecodeLimits::default().max_record_bytes,
    }))
}

type BrokerAddress = (String, u16, Option<Credentials>);

/// `--mqtt-url`, whose password `Debug` hides.
#[derive(Clone)]
struct MqttUrl(String);

impl std::str::FromStr for MqttUrl {
    type Err = std::convert::Infallible;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        Ok(Self(url.to_owned()))
    }
}

impl std::fmt::Debug for MqttUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", hide_password(&self.0))
    }
}

/// `mqtt://[user[:password]@]host[:port]` (or `tcp://`, or no scheme).
fn parse_mqtt_url(url: &str) -> Result<BrokerAddress, ConfigError> {
    let shown = hide_password(url);
    let bad = |reason: &str| ConfigError::new("--mqtt-url", &shown, reason);
    let rest = match url.split_once("://") {
        Some(("mqtt" | "tcp", rest)) => rest,
        Some(("mqtts" | "ssl" | "wss" | "ws", _)) => {
            return Err(bad("only plain mqtt:// is supported by the bridge for now"));
        }
        Some(_) => return Err(bad("the scheme must be mqtt://")),
        None => url,
    };
    let rest = rest.trim_end_matches('/');
    let (credentials, address) = match rest.rsplit_once('@') {
        Some((user_info, address)) => {
            let (user, password) = user_info.split_once(':').unwrap_or((user_info, ""));
            let credentials = Credentials {
                user: user.to_owned(),
                password: password.to_owned(),
            };
            (Some(credentials), address)
        }
        None => (None, rest),
    };
    let (host, port) = match address.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .map_err(|_| bad("the port is not a number from 1 to 65535"))?,
        ),
        None => (address, 1883),
    };
    if host.is_empty() || address.contains('/') {
        return Err(bad("expected mqtt://host[:port]"));
    }
    Ok((host.to_owned(), port, credentials))
}

/// `url` with its password, if any, shown as `***`.
fn hide_password(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let Some(at) = url[start..].rfind('@') else {
        return url.to_owned();
    };
    match url[start..start + at].split_once(':') {
        Some((user, _)) => format!("{}{user}:***{}", &url[..start], &url[start + at..]),
        None => url.to_owned(),
    }
}

fn valid_filter(filter: &str) -> bool {
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == levels.len() - 1,
        "+" => true,
        other => !other.contains(['+', '#']),
    })
}

pub async fn run(args: GatewayArgs, _file: ConfigFile) -> anyhow::Result<()> {
    let config = args.validate()?;
    let shutdown = CancellationToken::new();
    let readiness = Arc::new(ingest::observe::Readiness::default());
    if let Some(addr) = config.metrics_addr {
        let handle = ingest::observe::install_recorder().map_err(anyhow::Error::msg)?;
        ingest::observe::serve(addr, handle, readiness.clone(), shutdown.clone())
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
    }
    tokio::spawn(super::consume::stop_on_signal(shutdown.clone()));
    ingest::gateway::run(config, shutdown, readiness).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_urls() {
        let ok = [
            ("mqtt://127.0.0.1:15402", ("127.0.0.1", 15402, None)),
            ("tcp://broker", ("broker", 1883, None)),
            ("broker:1884", ("broker", 1884, None)),
            ("mqtt://u:p@broker:1", ("broker", 1, Some(("u", "p")))),
        ];
        for (url, (host, port, credentials)) in ok {
            let (h, p, c) = parse_mqtt_url(url).unwrap();
            assert_eq!((h.as_str(), p), (host, port), "{url}");
            assert_eq!(
                c.as_ref().map(|c| (c.user.as_str(), c.password.as_str())),
                credentials,
                "{url}"
            );
        }
        for url in [
            "mqtts://broker",
            "http://broker",
            "mqtt://broker:x",
            "mqtt://:1",
        ] {
            assert!(parse_mqtt_url(url).is_err(), "{url}");
        }
        let err = parse_mqtt_url("mqtt://user:secret@broker:x").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn no_debug_output_shows_the_broker_password() {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            gateway: GatewayArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from([
            "gateway",
            "--stream",
            "s",
            "--mqtt-url",
            "mqtt://bridge:hunter2@broker:1883",
            "--mqtt-topic",
            "devices/+/telemetry",
            "--mqtt-client-id",
            "gateway-0",
        ])
        .unwrap();
        let args = format!("{cli:?}");
        let config = format!("{:?}", cli.gateway.validate().unwrap());
        for debug in [args, config] {
            assert!(!debug.contains("hunter2"), "{debug}");
            assert!(debug.contains("bridge"), "{debug}");
        }
    }

    #[test]
    fn topic_filters() {
        for filter in [
            "devices/+/telemetry",
            "#",
            "home/#",
            "$share/g/devices/+/telemetry",
        ] {
            assert!(valid_filter(filter), "{filter}");
        }
        for filter in ["a/#/b", "a/b+", "a#"] {
            assert!(!valid_filter(filter), "{filter}");
        }
    }

    #[test]
    fn mqtt_needs_a_client_id_and_shares_by_group() {
        let settings = |client_id: Option<&str>, group: Option<&str>, topic: &str| {
            mqtt_settings(
                Some("mqtt://broker"),
                vec![topic.to_owned()],
                vec![],
                client_id.map(str::to_owned),
                group.map(str::to_owned),
            )
        };
        let err = settings(None, None, "devices/+/telemetry").unwrap_err();
        assert!(err.to_string().contains("--mqtt-client-id"), "{err}");
        let unshared = settings(Some("gw-0"), None, "devices/+/telemetry")
            .unwrap()
            .unwrap();
        assert_eq!(unshared.subscriptions(), ["devices/+/telemetry"]);
        let shared = settings(Some("gw-0"), Some("ingest"), "devices/+/telemetry")
            .unwrap()
            .unwrap();
        assert_eq!(
            shared.subscriptions(),
            ["$share/ingest/devices/+/telemetry"]
        );
        assert!(settings(Some("gw-0"), Some("a/b"), "devices/+/telemetry").is_err());
        let twice = settings(Some("gw-0"), Some("g"), "$share/g/devices/+/telemetry");
        assert!(twice.is_err());
    }
}
