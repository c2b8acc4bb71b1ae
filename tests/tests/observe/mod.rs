//! What the dashboard, alert and Prometheus tests share: reading the
//! dashboards and the rules file, the metric names the binaries define,
//! Grafana's SQL macros, and a small client for the stack's Prometheus.
//!
//! Not every test file uses every helper.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// How to get Prometheus and promtool (Debian's `prometheus` package).
pub const PROMETHEUS_HINT: &str = "start the local stack, which installs and runs Prometheus: `dev/stack up && eval \"$(dev/stack env)\"`";

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository")
        .to_path_buf()
}

/// Each dashboard of the chart: (file name, JSON model).
pub fn dashboards() -> Vec<(String, Value)> {
    let dir = repo().join("helm/ingest/dashboards");
    let mut found: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("a readable dashboard");
            let model = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, model)
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        found.len() >= 2,
        "expected pipeline.json and fleet.json in {}",
        dir.display()
    );
    found
}

/// Every panel of a dashboard, those inside collapsed rows included.
pub fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        all.push(panel);
        if let Some(inner) = panel["panels"].as_array() {
            all.extend(inner.iter());
        }
    }
    all
}

/// A query of a panel.
#[derive(Debug, Clone)]
pub struct PanelQuery {
    /// "<dashboard file> / <panel title> / <refId>", for messages.
    pub place: String,
    /// The PromQL expression or the SQL text, as written in the dashboard.
    pub text: String,
    /// For SQL: "time_series" or "table".
    pub format: String,
}

/// The PromQL (`prometheus`) or SQL (`grafana-postgresql-datasource`) queries of every panel.
pub fn panel_queries(kind: &str) -> Vec<PanelQuery> {
    let mut queries = Vec::new();
    for (file, dashboard) in dashboards() {
        for panel in panels(&dashboard) {
            if panel["datasource"]["type"] != kind {
                continue;
            }
            for target in panel["targets"].as_array().expect("a panel's targets") {
                let text = match kind {
                    "prometheus" => target["expr"].as_str(),
                    _ => target["rawSql"].as_str(),
                }
                .unwrap_or_else(|| {
                    panic!("{file}: a target of \"{}\" has no query", panel["title"])
                });
                queries.push(PanelQuery {
                    place: format!(
                        "{file} / {} / {}",
                        panel["title"].as_str().unwrap_or("?"),
                        target["refId"].as_str().unwrap_or("?")
                    ),
                    text: text.to_string(),
                    format: target["format"].as_str().unwrap_or("").to_string(),
                });
            }
        }
    }
    queries
}

/// The template variables of the dashboard in `file` that are SQL queries: (name, SQL).
pub fn sql_variables(file: &str) -> Vec<(String, String)> {
    let (_, dashboard) = dashboards()
        .into_iter()
        .find(|(name, _)| name == file)
        .unwrap_or_else(|| panic!("no dashboard {file}"));
    dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            (
                v["name"].as_str().expect("a name").to_string(),
                v["query"].as_str().expect("a query").to_string(),
            )
        })
        .collect()
}

/// An alerting rule of helm/ingest/files/alerts.rules.yaml.
#[derive(Debug, Clone)]
pub struct AlertRule {
    pub name: String,
    pub expr: String,
}

/// The rules file's path.
pub fn rules_file() -> PathBuf {
    repo().join("helm/ingest/files/alerts.rules.yaml")
}

/// The alerts and their expressions. The file keeps to two forms of
/// `expr:` (one line, or a `|` block); anything else fails here, not later.
pub fn alert_rules() -> Vec<AlertRule> {
    let text = std::fs::read_to_string(rules_file()).expect("the rules file");
    let lines: Vec<&str> = text.lines().collect();
    let mut rules = Vec::new();
    let mut name: Option<String> = None;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim_start();
        if let Some(rest) = line.strip_prefix("- alert:") {
            name = Some(rest.trim().to_string());
        } else if let Some(rest) = line.strip_prefix("expr:") {
            let rule = name.take().expect("expr: follows an `- alert:`");
            let rest = rest.trim();
            let expr = if rest == "|" {
                let indent = |l: &str| l.len() - l.trim_start().len();
                let own = indent(lines[i]);
                let mut block = Vec::new();
                while i + 1 < lines.len() && indent(lines[i + 1]) > own {
                    i += 1;
                    block.push(lines[i].trim());
                }
                block.join("\n")
            } else {
                assert!(
                    !rest.starts_with(['>', '\'', '"']),
                    "{rule}: write expr on one line or as a `|` block"
                );
                rest.to_string()
            };
            rules.push(AlertRule { name: rule, expr });
        }
        i += 1;
    }
    assert!(!rules.is_empty(), "no alerts in {}", rules_file().display());
    rules
}

/// The metric names the binaries export, read from ingest/src/metrics.rs;
/// a histogram (its doc says so) also as its `_bucket`, `_sum` and `_count` series.
pub fn exported_metrics() -> BTreeSet<String> {
    let path = repo().join("ingest/src/metrics.rs");
    let text = std::fs::read_to_string(&path).expect("ingest/src/metrics.rs");
    let mut names = BTreeSet::new();
    let mut doc = String::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(comment) = line.strip_prefix("///") {
            doc.push_str(comment);
        } else if line.starts_with("pub const") {
            let name = line
                .split('"')
                .nth(1)
                .unwrap_or_else(|| panic!("a metric constant with a string: {line}"));
            names.insert(name.to_string());
            if doc.contains("(histogram)") {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            doc.clear();
        }
    }
    assert!(
        names.len() > 20,
        "too few metrics read from {}",
        path.display()
    );
    names
}

/// Series Prometheus makes itself for every target.
pub const PROMETHEUS_OWN: &[&str] = &["up"];

const PROMQL_KEYWORDS: &[&str] = &["and", "or", "unless", "offset", "bool", "inf", "nan"];

/// Followed by a label list in parentheses (optional after group_left/right).
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Aggregation operators: followed by `(` or by `by`/`without`.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

/// The metric names an expression selects: every identifier outside label
/// matchers, strings, ranges and grouping clauses that is neither a
/// function (followed by `(`) nor a keyword.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    // Blank out "...", {...} and [...] so that label names, values and
    // durations are not read as metric names.
    let mut plain = String::with_capacity(expr.len());
    let mut closing: Option<char> = None;
    for c in expr.chars() {
        match closing {
            Some(end) => {
                if c == end {
                    closing = None;
                }
                plain.push(' ');
            }
            None => {
                closing = match c {
                    '"' => Some('"'),
                    '{' => Some('}'),
                    '[' => Some(']'),
                    _ => None,
                };
                plain.push(if closing.is_some() { ' ' } else { c });
            }
        }
    }
    let chars: Vec<char> = plain.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() || c == '.' {
            // a number, or a duration after offset: its letters too
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let lower = word.to_ascii_lowercase();
            let next = (i..chars.len()).find(|&j| !chars[j].is_whitespace());
            let opens = next.is_some_and(|j| chars[j] == '(');
            if GROUPING.contains(&lower.as_str()) {
                // its label list, if any, names labels, not metrics
                if let (true, Some(open)) = (opens, next) {
                    let close = (open..chars.len()).find(|&j| chars[j] == ')');
                    i = close.map_or(chars.len(), |j| j + 1);
                }
            } else if !opens
                && !PROMQL_KEYWORDS.contains(&lower.as_str())
                && !AGGREGATIONS.contains(&lower.as_str())
            {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Grafana's built-in variables in a PromQL panel, with a test's values.
pub fn expand_promql(expr: &str, rate_interval: &str) -> String {
    let expanded = expr
        .replace("$__rate_interval", rate_interval)
        .replace("$__interval", rate_interval);
    assert!(
        !expanded.contains('$'),
        "an unknown variable is left in {expanded}"
    );
    expanded
}

/// A time as Grafana writes it into SQL macros: RFC 3339 in UTC.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A panel's SQL as Grafana's PostgreSQL data source sends it: template
/// variables replaced by their (single) values, then the macros expanded
/// as Grafana does (`$__timeFilter(c)` is `c BETWEEN 'from' AND 'to'`,
/// `$__timeGroup(c, '1m')` is `floor(extract(epoch from c)/60)*60`, or
/// `time_bucket('60s',c)` with the data source's TimescaleDB option on,
/// `$__timeGroupAlias` adds `AS "time"`, `$__timeFrom()`/`$__timeTo()` are
/// the quoted times). Anything left starting with `$` fails.
pub fn expand_grafana_sql(
    sql: &str,
    from: SystemTime,
    to: SystemTime,
    interval: Duration,
    vars: &BTreeMap<String, String>,
    timescaledb: bool,
) -> String {
    let (from, to) = (rfc3339(from), rfc3339(to));
    let mut text = sql.replace("$__interval", &format!("'{}s'", interval.as_secs()));
    text = text
        .replace("$__timeFrom()", &format!("'{from}'"))
        .replace("$__timeTo()", &format!("'{to}'"));
    // Longest names first, so `$device` is not taken for a prefix of another.
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort_by_key(|name| std::cmp::Reverse(name.len()));
    for name in names {
        text = text.replace(&format!("${name}"), &vars[name]);
    }
    for macro_name in ["$__timeGroupAlias", "$__timeGroup", "$__timeFilter"] {
        while let Some(start) = text.find(&format!("{macro_name}(")) {
            let open = start + macro_name.len();
            let close = open
                + text[open..]
                    .find(')')
                    .expect("a macro's closing parenthesis");
            let args: Vec<&str> = text[open + 1..close].split(',').map(str::trim).collect();
            let expansion = match macro_name {
                "$__timeFilter" => format!("{} BETWEEN '{from}' AND '{to}'", args[0]),
                _ => {
                    let seconds =
                        parse_interval(args.get(1).expect("$__timeGroup(column, interval)"));
                    let group = if timescaledb {
                        format!("time_bucket('{seconds}s',{})", args[0])
                    } else {
                        format!("floor(extract(epoch from {})/{seconds})*{seconds}", args[0])
                    };
                    if macro_name == "$__timeGroupAlias" {
                        format!("{group} AS \"time\"")
                    } else {
                        group
                    }
                }
            };
            text.replace_range(start..=close, &expansion);
        }
    }
    assert!(
        !text.contains('$'),
        "a variable or macro is left unexpanded in:\n{text}"
    );
    text
}

/// '1m', 30s, '1h' as seconds.
fn parse_interval(text: &str) -> u64 {
    let text = text.trim_matches('\'');
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let number: u64 = number
        .parse()
        .unwrap_or_else(|_| panic!("an interval: {text}"));
    number
        * match unit {
            "s" | "" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            other => panic!("an interval unit Grafana knows: {other}"),
        }
}

/// The stack's Prometheus, over its HTTP API.
#[derive(Debug, Clone)]
pub struct Prometheus {
    host: String,
    port: u16,
}

impl Prometheus {
    /// The one `dev/stack env` names (INGEST_PROMETHEUS_URL); fails the test
    /// with how to start it when it is not set or not answering.
    pub fn from_env() -> Prometheus {
        let url = std::env::var("INGEST_PROMETHEUS_URL")
            .unwrap_or_else(|_| panic!("INGEST_PROMETHEUS_URL is not set: {PROMETHEUS_HINT}"));
        let rest = url
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("INGEST_PROMETHEUS_URL={url}: expected http://host:port"));
        let (host, port) = rest
            .trim_end_matches('/')
            .rsplit_once(':')
            .expect("host:port");
        let prometheus = Prometheus {
            host: host.to_string(),
            port: port.parse().expect("a port"),
        };
        match prometheus.get("/-/ready") {
            Ok((200, _)) => prometheus,
            other => panic!("Prometheus at {url} is not ready ({other:?}): {PROMETHEUS_HINT}"),
        }
    }

    /// An HTTP/1.0 GET (so no chunked answer): (status, body).
    fn get(&self, path_and_query: &str) -> std::io::Result<(u16, String)> {
        tests::http_get_at(&self.host, self.port, path_and_query)
    }

    /// An API call's `data`, or Prometheus's error text.
    pub fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let query: Vec<String> = params
            .iter()
            .map(|(key, value)| format!("{}={}", encode(key), encode(value)))
            .collect();
        let (status, body) = self
            .get(&format!("{path}?{}", query.join("&")))
            .map_err(|e| format!("cannot reach Prometheus: {e}; {PROMETHEUS_HINT}"))?;
        let answer: Value = serde_json::from_str(&body)
            .map_err(|e| format!("HTTP {status}, not JSON ({e}): {body}"))?;
        if answer["status"] != "success" {
            return Err(format!("{}: {}", answer["errorType"], answer["error"]));
        }
        Ok(answer["data"].clone())
    }

    /// The series of `expr` over [start, end] every `step`.
    pub fn query_range(
        &self,
        expr: &str,
        start: SystemTime,
        end: SystemTime,
        step: Duration,
    ) -> Result<Vec<Value>, String> {
        let secs = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .expect("after 1970")
                .as_secs()
                .to_string()
        };
        let data = self.api(
            "/api/v1/query_range",
            &[
                ("query", expr),
                ("start", &secs(start)),
                ("end", &secs(end)),
                ("step", &format!("{}s", step.as_secs().max(1))),
            ],
        )?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// The instant vector of `expr` now.
    pub fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.api("/api/v1/query", &[("query", expr)])?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }
}

/// Percent-encoding for a URL's query.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The PromQL of docs/runbook.md: every line of its ```promql blocks.
pub fn runbook_queries() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("docs/runbook.md")).expect("docs/runbook.md");
    let mut queries = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        match line.trim() {
            "```promql" => inside = true,
            "```" => inside = false,
            query if inside && !query.is_empty() => queries.push(query.to_string()),
            _ => {}
        }
    }
    assert!(queries.len() >= 12, "too few runbook queries: {queries:?}");
    queries
}
