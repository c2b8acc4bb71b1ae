//! Topic layouts: which levels of an MQTT topic name the device, the house,
//! the field and the time, the way an AWS IoT rule reads them with
//! `topic(n)`. No IO.
//!
//! A layout is a topic pattern, level by level:
//!
//! | level        | matches                         | gives                      |
//! |--------------|---------------------------------|----------------------------|
//! | `{device}`   | any level                       | the device (required)      |
//! | `{house}`    | any level                       | the house                  |
//! | `{name}`     | any level                       | the field: payload is one value |
//! | `{ts}`       | any level                       | the time (epoch or RFC 3339) |
//! | `+`          | any level                       | nothing                    |
//! | `a\|b`       | `a` or `b`                      | nothing                    |
//! | anything else| itself                          | nothing                    |
//!
//! A topic matches a layout with as many levels whose every level matches.
//! Without `{name}`, the payload is a JSON record (canonical or flat); with
//! it, the payload is the one value of that field. The defaults:
//!
//! - `devices/{device}/telemetry`: `devices/egauge-A/telemetry` with
//!   `{"fields":{"power":1.5}}` is `{"device":"egauge-A","ts":<arrival>,
//!   "fields":{"power":1.5}}`.
//! - `+/{house}/{device}/{name}/{ts}/data|event`: the home-energy layout;
//!   `home/h42/egauge-A/Battery/1763900000/data` with `1.5` is
//!   `{"device":"egauge-A","house":"h42","ts":1763900000,"fields":{"Battery":1.5}}`.
//!   The first level (any prefix) and the last (`data` or `event`) only
//!   select; a payload that is not JSON (`charging`) is a JSON string (an
//!   event), and so is a `data` payload that happens to be text.

use std::fmt;
use std::str::FromStr;

use crate::gateway::record::Origin;

/// The layouts used when none is configured.
pub const DEFAULT_LAYOUTS: [&str; 2] = [
    "devices/{device}/telemetry",
    "+/{house}/{device}/{name}/{ts}/data|event",
];

/// One level of a layout.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Device,
    House,
    Name,
    Ts,
    Any,
    OneOf(Vec<String>),
}

/// A parsed topic layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicLayout {
    /// As written, for messages.
    text: String,
    /// One entry per topic level.
    levels: Vec<Level>,
}

/// What a topic says about its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapped<'a> {
    /// Device, house and time.
    pub origin: Origin<'a>,
    /// The field, when the payload is one value.
    pub name: Option<&'a str>,
}

impl FromStr for TopicLayout {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut levels = Vec::new();
        let mut seen = Vec::new();
        for level in text.split('/') {
            let parsed = match level {
                "{device}" => Level::Device,
                "{house}" => Level::House,
                "{name}" => Level::Name,
                "{ts}" => Level::Ts,
                "+" => Level::Any,
                "#" => {
                    return Err(
                        "`#` is not supported: a layout has a fixed number of levels".into(),
                    );
                }
                "" => return Err("empty level".into()),
                other if other.contains(['{', '}', '+', '#']) => {
                    return Err(format!(
                        "level {other:?}: placeholders are {{device}}, {{house}}, {{name}} and {{ts}}"
                    ));
                }
                other => Level::OneOf(other.split('|').map(str::to_owned).collect()),
            };
            if matches!(
                parsed,
                Level::Device | Level::House | Level::Name | Level::Ts
            ) {
                if seen.contains(&level) {
                    return Err(format!("{level} appears twice"));
                }
                seen.push(level);
            }
            levels.push(parsed);
        }
        if !levels.contains(&Level::Device) {
            return Err("a layout needs a {device} level".into());
        }
        Ok(TopicLayout {
            text: text.to_owned(),
            levels,
        })
    }
}

impl fmt::Display for TopicLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl TopicLayout {
    /// The default layouts.
    pub fn defaults() -> Vec<TopicLayout> {
        DEFAULT_LAYOUTS
            .iter()
            .map(|text| text.parse().expect("the default layouts parse"))
            .collect()
    }

    /// What `topic` says, if it has this layout.
    pub fn matches<'a>(&self, topic: &'a str) -> Option<Mapped<'a>> {
        let mut mapped = Mapped {
            origin: Origin {
                device: "",
                house: None,
                ts: None,
            },
            name: None,
        };
        let mut levels = topic.split('/');
        for level in &self.levels {
            let value = levels.next()?;
            match level {
                Level::Device => mapped.origin.device = value,
                Level::House => mapped.origin.house = Some(value),
                Level::Name => mapped.name = Some(value),
                Level::Ts => mapped.origin.ts = Some(value),
                Level::Any => {}
                Level::OneOf(options) => {
                    if !options.iter().any(|option| option == value) {
                        return None;
                    }
                }
            }
        }
        let placeholders_filled = !mapped.origin.device.is_empty()
            && mapped.origin.house.is_none_or(|h| !h.is_empty())
            && mapped.name.is_none_or(|n| !n.is_empty())
            && mapped.origin.ts.is_none_or(|t| !t.is_empty());
        (levels.next().is_none() && placeholders_filled).then_some(mapped)
    }
}

/// What the first of `layouts` that `topic` has says about it.
pub fn map_topic<'a>(layouts: &[TopicLayout], topic: &'a str) -> Option<Mapped<'a>> {
    layouts.iter().find_map(|layout| layout.matches(topic))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped<'a>(
        device: &'a str,
        house: Option<&'a str>,
        ts: Option<&'a str>,
        name: Option<&'a str>,
    ) -> Option<Mapped<'a>> {
        Some(Mapped {
            origin: Origin { device, house, ts },
            name,
        })
    }

    #[test]
    fn default_layouts() {
        let layouts = TopicLayout::defaults();
        let cases = [
            (
                "devices/egauge-A/telemetry",
                mapped("egauge-A", None, None, None),
            ),
            (
                "home/h42/egauge-A/Battery/1763900000/data",
                mapped("egauge-A", Some("h42"), Some("1763900000"), Some("Battery")),
            ),
            (
                "x/h1/d1/door/2025-11-23T12:00:00Z/event",
                mapped("d1", Some("h1"), Some("2025-11-23T12:00:00Z"), Some("door")),
            ),
            ("home/h42/egauge-A/Battery/1763900000/other", None),
            ("home/h42/egauge-A/Battery/1763900000/data/extra", None),
            ("home/h42/egauge-A/Battery/data", None),
            ("devices//telemetry", None),
            ("devices/d1/telemetry/x", None),
            ("devices/d1", None),
            ("home/h42//Battery/1/data", None),
        ];
        for (topic, expected) in cases {
            assert_eq!(map_topic(&layouts, topic), expected, "{topic}");
        }
    }

    #[test]
    fn custom_layouts_and_their_errors() {
        let layout: TopicLayout = "site/{house}/meter/{device}".parse().unwrap();
        assert_eq!(
            layout.matches("site/h1/meter/m7"),
            mapped("m7", Some("h1"), None, None)
        );
        assert_eq!(layout.matches("site/h1/sensor/m7"), None);
        assert_eq!(layout.to_string(), "site/{house}/meter/{device}");
        let errors = [
            ("devices/+/telemetry", "needs a {device}"),
            ("a/{device}/#", "`#` is not supported"),
            ("a/{device}/{device}", "appears twice"),
            ("a/{dev}", "placeholders are"),
            ("a//{device}", "empty level"),
        ];
        for (text, expected) in errors {
            let err = text.parse::<TopicLayout>().unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}
