//! MQTT topic layouts and messages, as the bridge handles them: a layout
//! from any text either parses or says why; a topic it matches names a
//! non-empty device taken from the topic; and a message it maps becomes a
//! JSON record whose device is the topic's (the topic wins, as in an IoT
//! rule's `SELECT *, topic(2) AS device`).
//!
//! Input: the layout, a NUL, the topic, a NUL, the payload.
#![no_main]

use ingest::gateway::mqtt::{TopicLayout, map_topic};
use ingest::gateway::record::{self, Conflict, Payload};
use libfuzzer_sys::fuzz_target;

const ARRIVAL_MILLIS: i64 = 1_763_900_000_123;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == 0);
    let (Some(layout), Some(topic), Some(payload)) = (parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let (Ok(layout), Ok(topic)) = (std::str::from_utf8(layout), std::str::from_utf8(topic)) else {
        return;
    };
    let layout: TopicLayout = match layout.parse() {
        Ok(layout) => layout,
        Err(reason) => {
            let reason: String = reason;
            assert!(!reason.is_empty());
            return;
        }
    };
    let layouts = [layout];
    let Some(mapped) = map_topic(&layouts, topic) else {
        return;
    };
    let origin = mapped.origin;
    assert!(
        !origin.device.is_empty(),
        "{topic:?} mapped to an empty device"
    );
    for id in [Some(origin.device), origin.house, origin.ts, mapped.name]
        .into_iter()
        .flatten()
    {
        assert!(
            topic.split('/').any(|level| level == id),
            "{id:?} is not a level of {topic:?}"
        );
    }
    let payload = match mapped.name {
        Some(name) => Payload::Value { name, raw: payload },
        None => Payload::Object(payload),
    };
    let Ok(built) = record::build(
        origin,
        payload,
        ARRIVAL_MILLIS,
        Conflict::OriginWins,
        "topic",
    ) else {
        return;
    };
    // Each field as raw JSON, not a serde_json::Value: with this crate's
    // arbitrary_precision a Value takes an object whose one key is
    // "$serde_json::private::Number" for a number, and a topic may name
    // exactly that field. Raw values are still checked to be JSON.
    type Fields = std::collections::HashMap<String, Box<serde_json::value::RawValue>>;
    let json: Fields = serde_json::from_slice(&built).unwrap_or_else(|err| {
        panic!(
            "the record {:?} is not JSON: {err}",
            String::from_utf8_lossy(&built)
        )
    });
    let text = |key: &str| {
        json.get(key)
            .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
    };
    assert_eq!(text("device").as_deref(), Some(origin.device));
    if let Some(house) = origin.house {
        assert_eq!(text("house").as_deref(), Some(house));
    }
});
