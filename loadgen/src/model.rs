//! The simulated fleet: who each device is, what it measures and when it
//! sends. Everything here follows from the seed and the settings, so the same
//! seed gives the same traffic. No IO.
//!
//! Each field is a sine of time with a per-device velocity (angular speed)
//! and phase, plus Gaussian noise and an optional linear drift, the way
//! building-monitoring simulators model sensors.

use std::f64::consts::TAU;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::message::{Message, Protocol};

/// A field: its name, typical value and swing.
type Field = (&'static str, f64, f64);

/// The kinds of device and what each measures.
/// The first field of a kind sorts first among its fields, and names are
/// unique across kinds, so a device's first field is present in every one of
/// its records and tells the verification which series to count.
const KINDS: [(&str, &[Field]); 4] = [
    (
        "meter",
        &[
            ("current", 6.5, 3.5),
            ("frequency", 50.0, 0.05),
            ("power", 1500.0, 800.0),
            ("voltage", 230.0, 3.0),
        ],
    ),
    (
        "thermostat",
        &[
            ("humidity", 45.0, 8.0),
            ("setpoint", 21.0, 0.5),
            ("temperature", 21.0, 1.5),
        ],
    ),
    (
        "battery",
        &[
            ("battery_power", 0.0, 2500.0),
            ("cell_temperature", 25.0, 4.0),
            ("pack_voltage", 52.0, 1.5),
            ("soc", 60.0, 30.0),
        ],
    ),
    (
        "charger",
        &[
            ("charge_current", 16.0, 10.0),
            ("charge_power", 7000.0, 4000.0),
            ("session_energy", 10.0, 8.0),
        ],
    ),
];

/// What the whole fleet looks like.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetSettings {
    pub devices: u32,
    /// Share of devices on MQTT (the rest on CoAP).
    pub mqtt_share: f64,
    /// MQTT QoS: 0 or 1.
    pub qos: u8,
    /// Share of CoAP devices that send NON instead of CON.
    pub coap_non_share: f64,
    /// Messages per second per device.
    pub rate: f64,
    /// The most fields per record (each device has 1 to this many).
    pub max_fields: usize,
    /// Drift per hour, as a share of a field's swing.
    pub drift: f64,
    pub devices_per_house: u32,
    /// Prefix of device and house ids.
    pub prefix: String,
    pub seed: u64,
    /// Devices start one after the other at this many per second.
    pub connect_rate: f64,
    /// After the last device started, traffic before the window.
    pub warmup: Duration,
    /// The measured window.
    pub duration: Duration,
}

impl FleetSettings {
    /// When device `index` starts (connects), from the run's start.
    pub fn start_of(&self, index: u32) -> Duration {
        Duration::from_secs_f64(f64::from(index) / self.connect_rate)
    }

    /// The measured window, from the run's start: after every device
    /// started and the warm-up.
    pub fn window(&self) -> (Duration, Duration) {
        let begin = self.start_of(self.devices) + self.warmup;
        (begin, begin + self.duration)
    }

    /// Device `index`'s protocol. MQTT devices are exactly
    /// round(devices × --mqtt-share) of them, NON senders that share of the
    /// CoAP ones, both spread evenly.
    pub fn protocol_of(&self, index: u32) -> Protocol {
        if picked(index, self.mqtt_share) {
            Protocol::Mqtt { qos: self.qos }
        } else {
            Protocol::Coap {
                confirmable: !picked(index, self.coap_non_share),
            }
        }
    }

    /// Device `index`, with its traffic from its start to the window's end.
    pub fn device(&self, index: u32, start_unix_ms: i64) -> DeviceModel {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(u64::from(index));
        let (kind, kind_fields) = KINDS[rng.random_range(0..KINDS.len())];
        let count = rng.random_range(1..=self.max_fields.clamp(1, kind_fields.len()));
        let fields = kind_fields[..count]
            .iter()
            .map(|&(name, typical, swing)| {
                let amplitude = swing * rng.random_range(0.5..1.5);
                FieldModel {
                    name,
                    base: typical + swing * rng.random_range(-0.2..0.2),
                    amplitude,
                    // One cycle in 10 minutes to 24 hours.
                    velocity: TAU / rng.random_range(600.0..86_400.0),
                    phase: rng.random_range(0.0..TAU),
                    noise: amplitude * 0.02,
                    drift_per_hour: self.drift * amplitude * rng.random_range(-1.0..1.0),
                }
            })
            .collect();
        // Whole microseconds, as a capture keeps them.
        let interval = Duration::from_micros((1e6 / self.rate).round() as u64);
        let phase = Duration::from_micros(rng.random_range(0..interval.as_micros() as u64));
        let start = self.start_of(index);
        // The first slot at or after the device's start.
        let first_slot = if start > phase {
            ((start - phase).as_secs_f64() / interval.as_secs_f64()).ceil() as u64
        } else {
            0
        };
        let device = format!("{}-{index:06}", self.prefix);
        let house = format!(
            "{}-h{:05}",
            self.prefix,
            index / self.devices_per_house.max(1)
        );
        let protocol = self.protocol_of(index);
        let target = match protocol {
            Protocol::Mqtt { .. } => format!("devices/{device}/telemetry"),
            Protocol::Coap { .. } => format!("/t/{house}/{device}"),
        };
        DeviceModel {
            device,
            house,
            kind,
            protocol,
            target,
            fields,
            interval,
            phase,
            next_slot: first_slot,
            end: self.window().1,
            start_unix_ms,
            rng,
        }
    }
}

/// Whether `index` is among a `share` of indices picked evenly: the
/// integer part of index × share steps up at exactly that share of them.
fn picked(index: u32, share: f64) -> bool {
    (f64::from(index + 1) * share).floor() > (f64::from(index) * share).floor()
}

/// One field's signal.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldModel {
    pub name: &'static str,
    pub base: f64,
    pub amplitude: f64,
    /// Radians per second.
    pub velocity: f64,
    pub phase: f64,
    /// Standard deviation of the noise.
    pub noise: f64,
    pub drift_per_hour: f64,
}

impl FieldModel {
    /// The value at `t` seconds into the run, `gauss` a standard normal draw.
    pub fn value(&self, t: f64, gauss: f64) -> f64 {
        self.base
            + self.amplitude * (self.velocity * t + self.phase).sin()
            + self.drift_per_hour * t / 3600.0
            + self.noise * gauss
    }
}

/// A device and the messages it has yet to send.
#[derive(Debug, Clone)]
pub struct DeviceModel {
    pub device: String,
    pub house: String,
    pub kind: &'static str,
    pub protocol: Protocol,
    /// The MQTT topic or the CoAP path.
    pub target: String,
    pub fields: Vec<FieldModel>,
    interval: Duration,
    /// The first slot's offset within an interval.
    phase: Duration,
    next_slot: u64,
    /// No slot at or after this offset from the run's start.
    end: Duration,
    /// The wall clock at the run's start, for `ts`.
    start_unix_ms: i64,
    /// Draws the noise, in message order.
    rng: ChaCha8Rng,
}

impl DeviceModel {
    /// The field whose series the verification counts.
    pub fn check_metric(&self) -> &'static str {
        self.fields[0].name
    }

    /// How many of its messages are still to come and due in [from, to).
    pub fn due_between(&self, from: Duration, to: Duration) -> u64 {
        let first_at_or_after = |at: Duration| -> u64 {
            if at <= self.phase {
                0
            } else {
                ((at - self.phase).as_secs_f64() / self.interval.as_secs_f64()).ceil() as u64
            }
        };
        let from = first_at_or_after(from).max(self.next_slot);
        let to = first_at_or_after(to.min(self.end));
        to.saturating_sub(from)
    }

    fn record(&mut self, offset: Duration) -> String {
        let t = offset.as_secs_f64();
        let ts = self.start_unix_ms + offset.as_millis() as i64;
        let mut payload = format!(
            r#"{{"device":"{}","house":"{}","ts":{ts},"fields":{{"#,
            self.device, self.house
        );
        for (i, field) in self.fields.iter().enumerate() {
            let gauss = standard_normal(&mut self.rng);
            // Three decimals is what such sensors report.
            let value = (field.value(t, gauss) * 1000.0).round() / 1000.0;
            if i > 0 {
                payload.push(',');
            }
            payload.push_str(&format!(r#""{}":{value}"#, field.name));
        }
        payload.push_str("}}");
        payload
    }
}

impl Iterator for DeviceModel {
    type Item = Message;

    fn next(&mut self) -> Option<Message> {
        let offset = self.phase + self.interval * u32::try_from(self.next_slot).ok()?;
        if offset >= self.end {
            return None;
        }
        self.next_slot += 1;
        let payload = self.record(offset);
        Some(Message {
            offset,
            ts_ms: self.start_unix_ms + offset.as_millis() as i64,
            payload: payload.into_bytes().into(),
        })
    }
}

/// A standard normal draw (Box-Muller), so the noise needs no other crate.
fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> FleetSettings {
        FleetSettings {
            devices: 100,
            mqtt_share: 0.5,
            qos: 1,
            coap_non_share: 0.2,
            rate: 2.0,
            max_fields: 4,
            drift: 0.1,
            devices_per_house: 4,
            prefix: "lg".into(),
            seed: 7,
            connect_rate: 50.0,
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(5),
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_traffic_and_another_seed_other_traffic() {
        let traffic = |seed| {
            let settings = FleetSettings { seed, ..settings() };
            (0..settings.devices)
                .flat_map(|i| settings.device(i, 1_763_900_000_000))
                .map(|m| (m.offset, m.payload))
                .collect::<Vec<_>>()
        };
        assert_eq!(traffic(7), traffic(7));
        assert_ne!(traffic(7), traffic(8));
    }

    #[test]
    fn protocols_are_split_exactly_by_share() {
        let settings = settings();
        let devices: Vec<_> = (0..100).map(|i| settings.device(i, 0)).collect();
        let mqtt = devices
            .iter()
            .filter(|d| matches!(d.protocol, Protocol::Mqtt { qos: 1 }))
            .count();
        let non = devices
            .iter()
            .filter(|d| matches!(d.protocol, Protocol::Coap { confirmable: false }))
            .count();
        assert_eq!((mqtt, non), (50, 10));
        assert_eq!(devices[0].target, "/t/lg-h00000/lg-000000");
        assert_eq!(devices[1].target, "devices/lg-000001/telemetry");
    }

    #[test]
    fn each_device_sends_at_its_rate_from_its_start_to_the_window_end_with_unique_ts() {
        let settings = settings();
        let (_, end) = settings.window();
        for index in [0, 1, 57, 99] {
            let messages: Vec<_> = settings.device(index, 1_000).collect();
            let start = settings.start_of(index);
            assert!(messages[0].offset >= start);
            assert!(messages[0].offset < start + Duration::from_millis(500));
            assert!(messages.last().unwrap().offset < end);
            for pair in messages.windows(2) {
                assert_eq!(pair[1].offset - pair[0].offset, Duration::from_millis(500));
                assert!(pair[1].ts_ms > pair[0].ts_ms);
            }
            // About rate × (end - start) messages, and counted the same
            // without generating them.
            let span = (end - start).as_secs_f64();
            assert!((messages.len() as f64 - span * 2.0).abs() <= 1.0);
            let device = settings.device(index, 1_000);
            assert_eq!(
                device.due_between(Duration::ZERO, end),
                messages.len() as u64
            );
            let (window_start, _) = settings.window();
            let in_window = messages.iter().filter(|m| m.offset >= window_start).count();
            assert_eq!(device.due_between(window_start, end), in_window as u64);
        }
    }

    #[test]
    fn records_are_canonical_json_with_the_check_metric_in_each() {
        let settings = settings();
        for index in 0..20 {
            let device = settings.device(index, 1_763_900_000_000);
            let check = device.check_metric();
            let name = device.device.clone();
            for message in device.take(3) {
                let record: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
                assert_eq!(record["device"], name.as_str());
                assert_eq!(record["ts"], message.ts_ms);
                assert!(record["fields"][check].is_f64(), "{record}");
                let first = record["fields"].as_object().unwrap().keys().next().unwrap();
                assert_eq!(first, check, "the check metric sorts first");
            }
        }
    }

    #[test]
    fn a_signal_follows_its_sine_within_the_noise() {
        let field = FieldModel {
            name: "power",
            base: 100.0,
            amplitude: 10.0,
            velocity: TAU / 600.0,
            phase: 0.0,
            noise: 0.0,
            drift_per_hour: 3600.0,
        };
        assert!((field.value(0.0, 0.0) - 100.0).abs() < 1e-9);
        // A quarter cycle in: the crest, plus 150 s of drift at 1/s.
        assert!((field.value(150.0, 0.0) - 260.0).abs() < 1e-9);
    }
}
