//! The alert rules (helm/ingest/files/alerts.rules.yaml): checked and unit
//! tested by the real `promtool`, each with its annotations and a runbook
//! section.

mod observe;

use std::collections::BTreeSet;
use std::process::Command;

use observe::{
    PROMETHEUS_HINT, PROMETHEUS_OWN, alert_rules, exported_metrics, metric_names, repo, rules_file,
    runbook_queries,
};

fn promtool(args: &[&str]) -> (bool, String) {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(repo().join("helm/ingest/files"))
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}); it comes with Debian's prometheus package: {PROMETHEUS_HINT}")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn promtool_checks_the_rules() {
    let (ok, text) = promtool(&["check", "rules", "alerts.rules.yaml"]);
    assert!(ok, "{text}");
    let rules = alert_rules().len();
    assert!(
        text.contains(&format!("SUCCESS: {rules} rules found")),
        "{text}"
    );
}

#[test]
fn promtool_unit_tests_pass() {
    let (ok, text) = promtool(&["test", "rules", "alerts.test.yaml"]);
    assert!(ok, "{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}

/// Every alert has a case that expects it to fire: a rule without one would
/// pass `promtool test rules` untested.
#[test]
fn every_alert_has_a_unit_test_that_fires_it() {
    let tests = std::fs::read_to_string(repo().join("helm/ingest/files/alerts.test.yaml"))
        .expect("alerts.test.yaml");
    let mut fired = BTreeSet::new();
    let mut current = None;
    for line in tests.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("alertname:") {
            current = Some(name.trim().to_string());
        } else if line.starts_with("- exp_labels:") {
            fired.insert(current.clone().expect("exp_labels after an alertname"));
        }
    }
    let missing: Vec<String> = alert_rules()
        .into_iter()
        .map(|rule| rule.name)
        .filter(|name| !fired.contains(name))
        .collect();
    assert!(
        missing.is_empty(),
        "alerts without a firing unit test: {missing:?}"
    );
}

/// Each alert says what happened (summary, description with its values,
/// a severity) and links its own section of docs/runbook.md, which exists.
#[test]
fn every_alert_has_annotations_and_a_runbook_section() {
    let rules = std::fs::read_to_string(rules_file()).expect("the rules file");
    let runbook = std::fs::read_to_string(repo().join("docs/runbook.md")).expect("docs/runbook.md");
    let headings: BTreeSet<String> = runbook
        .lines()
        .filter_map(|line| line.strip_prefix("## "))
        .map(|heading| heading.trim().to_ascii_lowercase())
        .collect();
    for rule in alert_rules() {
        let start = rules
            .find(&format!("- alert: {}\n", rule.name))
            .expect("the rule");
        let end = rules[start + 1..]
            .find("- alert:")
            .map_or(rules.len(), |i| start + 1 + i);
        let text = &rules[start..end];
        for needle in ["severity:", "summary:", "description:"] {
            assert!(text.contains(needle), "{}: no {needle}", rule.name);
        }
        // The description carries the values: the measured one, or for a
        // target that is down, which one.
        let description =
            &text[text.find("description:").unwrap()..text.find("runbook_url:").unwrap()];
        assert!(
            description.contains("{{ $value") || description.contains("{{ $labels.instance"),
            "{}: the description shows no value",
            rule.name
        );
        let anchor = rule.name.to_ascii_lowercase();
        assert!(
            text.contains(&format!("runbook_url: https://github.com/ingest-rs/ingest/blob/main/docs/runbook.md#{anchor}\n")),
            "{}: runbook_url must point at docs/runbook.md#{anchor}",
            rule.name
        );
        assert!(
            headings.contains(&anchor),
            "docs/runbook.md has no `## {}` section",
            rule.name
        );
        let section_start = runbook
            .find(&format!("## {}", rule.name))
            .expect("the section");
        let section_end = runbook[section_start + 3..]
            .find("\n## ")
            .map_or(runbook.len(), |i| section_start + 3 + i);
        let section = &runbook[section_start..section_end];
        for needle in ["ingest status", "```promql", "What to do"] {
            assert!(
                section.contains(needle),
                "runbook section {}: no {needle}",
                rule.name
            );
        }
    }
}

/// The runbook's queries name only metrics the binaries export.
#[test]
fn every_runbook_query_names_exported_metrics() {
    let exported = exported_metrics();
    for query in runbook_queries() {
        let names = metric_names(&query);
        assert!(!names.is_empty(), "no metric in runbook query {query}");
        for name in names {
            assert!(
                exported.contains(&name) || PROMETHEUS_OWN.contains(&name.as_str()),
                "docs/runbook.md: {name} (in {query}) is not in ingest/src/metrics.rs"
            );
        }
    }
}
