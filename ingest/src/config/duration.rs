//! Durations written the human way: "500ms", "30s", "1 day", "7days".

use std::time::Duration;

use super::ConfigError;

/// Parses a non-zero duration such as "500ms", "30s", "1 day" or "1h 30m".
pub fn parse_duration(setting: &str, value: &str) -> Result<Duration, ConfigError> {
    let duration = humantime::parse_duration(value.trim()).map_err(|error| {
        ConfigError::new(
            setting,
            value,
            format!("{error} (write e.g. 500ms, 30s, 6h, 7days)"),
        )
    })?;
    if duration.is_zero() {
        return Err(ConfigError::new(setting, value, "must be more than zero"));
    }
    Ok(duration)
}

/// Like [`parse_duration`], but "none", "off" or "never" mean no duration.
pub fn parse_optional_duration(
    setting: &str,
    value: &str,
) -> Result<Option<Duration>, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "none" | "off" | "never" => Ok(None),
        _ => parse_duration(setting, value).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let cases: &[(&str, Option<u64>)] = &[
            ("500ms", Some(0)),
            ("30s", Some(30)),
            ("1 day", Some(86_400)),
            ("7days", Some(7 * 86_400)),
            ("1h 30m", Some(5_400)),
            (" 6h ", Some(21_600)),
            ("0s", None),
            ("soon", None),
            ("", None),
            ("-1s", None),
        ];
        for (text, secs) in cases {
            let parsed = parse_duration("--x", text).map(|d| d.as_secs());
            assert_eq!(parsed.ok(), *secs, "{text:?}");
        }
        assert_eq!(
            parse_duration("--x", "500ms").unwrap(),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn optional_durations() {
        assert_eq!(parse_optional_duration("--x", "none").unwrap(), None);
        assert_eq!(parse_optional_duration("--x", "Never").unwrap(), None);
        assert_eq!(
            parse_optional_duration("--x", "2d").unwrap(),
            Some(Duration::from_secs(172_800))
        );
        let error = parse_optional_duration("--retention", "forever").unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("invalid --retention \"forever\""),
            "{error}"
        );
    }
}
