//! Captured traffic: `loadgen record` writes generated messages to a JSON
//! Lines file, in time order; `loadgen replay` reads it back into devices.
//!
//! One line per message:
//! `{"offset_us":1500,"device":"lg-000001","protocol":"mqtt","qos":1,
//!   "target":"devices/lg-000001/telemetry","payload":"{...}"}`
//! (`"protocol":"coap","confirmable":true` for CoAP). The payload is sent as
//! it is, so a replay sends exactly what was recorded.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::{BufRead, Write};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::message::{DeviceTraffic, Message, Protocol};
use crate::model::DeviceModel;

/// One captured message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapturedMessage {
    pub offset_us: u64,
    pub device: String,
    #[serde(flatten)]
    pub protocol: Protocol,
    pub target: String,
    pub payload: String,
}

/// Writes every device's messages, merged in time order (ties in device
/// order); returns how many.
pub fn record(devices: Vec<DeviceModel>, out: &mut impl Write) -> std::io::Result<u64> {
    let mut devices: Vec<_> = devices
        .into_iter()
        .map(|d| (d.device.clone(), d.protocol, d.target.clone(), d.peekable()))
        .collect();
    let mut next: BinaryHeap<Reverse<(Duration, usize)>> = devices
        .iter_mut()
        .enumerate()
        .filter_map(|(i, (_, _, _, messages))| messages.peek().map(|m| Reverse((m.offset, i))))
        .collect();
    let mut written = 0;
    while let Some(Reverse((_, index))) = next.pop() {
        let (device, protocol, target, messages) = &mut devices[index];
        let message = messages.next().expect("peeked");
        let line = CapturedMessage {
            offset_us: message.offset.as_micros() as u64,
            device: device.clone(),
            protocol: *protocol,
            target: target.clone(),
            payload: String::from_utf8(message.payload.to_vec()).expect("JSON is UTF-8"),
        };
        serde_json::to_writer(&mut *out, &line)?;
        out.write_all(b"\n")?;
        written += 1;
        if let Some(following) = messages.peek() {
            next.push(Reverse((following.offset, index)));
        }
    }
    out.flush()?;
    Ok(written)
}

/// The fields of a payload loadgen needs: `ts` (epoch ms) and the first
/// field's name.
#[derive(Deserialize)]
struct PayloadKeys {
    ts: i64,
    fields: std::collections::BTreeMap<String, serde::de::IgnoredAny>,
}

/// A capture read back: one traffic per device, in order of first message.
#[derive(Debug)]
pub struct Capture {
    pub devices: Vec<DeviceTraffic>,
    pub messages: u64,
    /// Messages by protocol name.
    pub per_protocol: std::collections::BTreeMap<&'static str, u64>,
    /// The last message's offset.
    pub span: Duration,
}

/// Reads a capture; a bad line is named with its number.
pub fn read(input: impl BufRead, name: &str) -> Result<Capture, String> {
    struct Device {
        protocol: Protocol,
        target: String,
        check_metric: String,
        messages: Vec<Message>,
    }
    let mut order: Vec<String> = Vec::new();
    let mut devices: HashMap<String, Device> = HashMap::new();
    let mut span = Duration::ZERO;
    let mut count = 0;
    let mut per_protocol = std::collections::BTreeMap::new();
    for (number, line) in input.lines().enumerate() {
        let at = |why: String| format!("{name}:{}: {why}", number + 1);
        let line = line.map_err(|e| at(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let captured: CapturedMessage =
            serde_json::from_str(&line).map_err(|e| at(format!("not a captured message: {e}")))?;
        let keys: PayloadKeys = serde_json::from_str(&captured.payload)
            .map_err(|e| at(format!("the payload has no numeric ts and fields: {e}")))?;
        let check_metric = keys
            .fields
            .keys()
            .next()
            .ok_or_else(|| at("the payload has no fields".into()))?
            .clone();
        let offset = Duration::from_micros(captured.offset_us);
        span = span.max(offset);
        let device = devices.entry(captured.device.clone()).or_insert_with(|| {
            order.push(captured.device.clone());
            Device {
                protocol: captured.protocol,
                target: captured.target.clone(),
                check_metric,
                messages: Vec::new(),
            }
        });
        if device.protocol != captured.protocol || device.target != captured.target {
            return Err(at(format!(
                "device {} changes its protocol or target",
                captured.device
            )));
        }
        if device.messages.last().is_some_and(|m| m.offset > offset) {
            return Err(at("lines are not in time order".into()));
        }
        device.messages.push(Message {
            offset,
            ts_ms: keys.ts,
            payload: captured.payload.into_bytes().into(),
        });
        count += 1;
        *per_protocol.entry(captured.protocol.name()).or_default() += 1;
    }
    let devices = order
        .into_iter()
        .map(|name| {
            let device = devices.remove(&name).expect("recorded");
            DeviceTraffic {
                // Connect when the first message is due: the recording
                // already spread the devices' starts.
                start: device.messages[0].offset,
                device: name,
                protocol: device.protocol,
                target: device.target,
                check_metric: device.check_metric,
                messages: Box::new(device.messages.into_iter()),
            }
        })
        .collect();
    Ok(Capture {
        devices,
        messages: count,
        per_protocol,
        span,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FleetSettings;

    fn settings() -> FleetSettings {
        FleetSettings {
            devices: 12,
            mqtt_share: 0.5,
            qos: 1,
            coap_non_share: 0.5,
            rate: 4.0,
            max_fields: 3,
            drift: 0.0,
            devices_per_house: 4,
            prefix: "cap".into(),
            seed: 3,
            connect_rate: 100.0,
            warmup: Duration::ZERO,
            duration: Duration::from_secs(2),
        }
    }

    #[test]
    fn a_capture_reads_back_into_the_same_devices_and_messages() {
        let settings = settings();
        let models: Vec<_> = (0..12)
            .map(|i| settings.device(i, 1_763_900_000_000))
            .collect();
        let expected: Vec<(String, Vec<Message>)> = models
            .iter()
            .map(|m| (m.device.clone(), m.clone().collect()))
            .collect();
        let mut file = Vec::new();
        let written = record(models, &mut file).unwrap();
        assert_eq!(
            written,
            expected.iter().map(|(_, m)| m.len() as u64).sum::<u64>()
        );

        // In time order.
        let offsets: Vec<u64> = String::from_utf8(file.clone())
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<CapturedMessage>(l)
                    .unwrap()
                    .offset_us
            })
            .collect();
        assert!(offsets.windows(2).all(|w| w[0] <= w[1]));

        let capture = read(file.as_slice(), "test").unwrap();
        assert_eq!(capture.messages, written);
        let mut got: Vec<(String, Vec<Message>)> = capture
            .devices
            .into_iter()
            .map(|d| (d.device, d.messages.collect()))
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, expected);
    }

    #[test]
    fn a_bad_line_is_named_with_its_number() {
        let input = b"{\"offset_us\":1,\"device\":\"d\",\"protocol\":\"mqtt\",\"qos\":1,\"target\":\"t\",\"payload\":\"{\\\"ts\\\":1,\\\"fields\\\":{\\\"a\\\":1}}\"}\nnot json\n";
        let error = read(&input[..], "traffic.jsonl").unwrap_err();
        assert!(
            error.starts_with("traffic.jsonl:2: not a captured message"),
            "{error}"
        );
    }
}
