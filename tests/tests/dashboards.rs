//! The Grafana dashboards in helm/ingest/dashboards: valid models, only
//! metrics the binaries export, and every SQL panel run on the real schema
//! (with Grafana's macros expanded as Grafana does) after the real consumer
//! loaded data.

mod observe;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use observe::{
    PROMETHEUS_OWN, alert_rules, dashboards, expand_grafana_sql, exported_metrics, metric_names,
    panel_queries, panels, sql_variables,
};
use tests::TestDb;
use tests::consumer::{ConsumerProcess, create_stream, records, wait_for_count};

/// The oldest schema version this JSON is written for (Grafana 10.3+).
const MIN_SCHEMA_VERSION: u64 = 39;

#[test]
fn dashboards_are_valid_grafana_models() {
    for (file, dashboard) in dashboards() {
        let schema = dashboard["schemaVersion"].as_u64();
        assert!(
            schema.is_some_and(|v| v >= MIN_SCHEMA_VERSION),
            "{file}: schemaVersion {schema:?}, expected >= {MIN_SCHEMA_VERSION}"
        );
        for key in ["uid", "title"] {
            assert!(
                dashboard[key].as_str().is_some_and(|v| !v.is_empty()),
                "{file}: no {key}"
            );
        }
        assert!(
            dashboard["id"].is_null(),
            "{file}: id must be null (Grafana assigns it)"
        );

        // Exactly one datasource variable, and every panel and target uses it.
        let variables = dashboard["templating"]["list"]
            .as_array()
            .expect("templating.list");
        let sources: Vec<_> = variables
            .iter()
            .filter(|v| v["type"] == "datasource")
            .collect();
        assert_eq!(sources.len(), 1, "{file}: expected one datasource variable");
        let source_var = format!("${{{}}}", sources[0]["name"].as_str().expect("a name"));
        let source_kind = sources[0]["query"].as_str().expect("the datasource type");
        for variable in variables.iter().filter(|v| v["type"] == "query") {
            assert_eq!(
                variable["datasource"]["uid"], source_var,
                "{file}: variable {} uses a hard-coded datasource",
                variable["name"]
            );
        }

        let mut ids = BTreeSet::new();
        for panel in panels(&dashboard) {
            let title = panel["title"].as_str().unwrap_or_default();
            assert!(
                !title.is_empty(),
                "{file}: a panel without a title: {panel}"
            );
            let id = panel["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{file}: {title}: no id"));
            assert!(ids.insert(id), "{file}: panel id {id} is used twice");
            let grid = &panel["gridPos"];
            let (x, w, h) = (grid["x"].as_u64(), grid["w"].as_u64(), grid["h"].as_u64());
            assert!(
                matches!((x, w, h), (Some(x), Some(w), Some(h)) if w > 0 && h > 0 && x + w <= 24),
                "{file}: {title}: gridPos {grid} is outside Grafana's 24 columns"
            );
            if panel["type"] == "row" {
                continue;
            }
            assert!(
                panel["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{file}: {title}: no description"
            );
            let targets = panel["targets"]
                .as_array()
                .unwrap_or_else(|| panic!("{file}: {title}: no targets"));
            assert!(!targets.is_empty(), "{file}: {title}: no targets");
            for source in std::iter::once(&panel["datasource"])
                .chain(targets.iter().map(|t| &t["datasource"]))
            {
                assert_eq!(
                    source["uid"], source_var,
                    "{file}: {title}: a hard-coded datasource uid"
                );
                assert_eq!(
                    source["type"], source_kind,
                    "{file}: {title}: another datasource type"
                );
            }
            let mut refs = BTreeSet::new();
            for target in targets {
                assert!(
                    refs.insert(target["refId"].to_string()),
                    "{file}: {title}: refId used twice"
                );
            }
        }
    }
}

#[test]
fn every_metric_a_panel_or_an_alert_uses_is_one_the_binaries_export() {
    let exported = exported_metrics();
    let mut used: BTreeMap<String, String> = BTreeMap::new();
    for query in panel_queries("prometheus") {
        let names = metric_names(&query.text);
        assert!(
            !names.is_empty(),
            "{}: no metric in {}",
            query.place,
            query.text
        );
        for name in names {
            used.entry(name).or_insert(query.place.clone());
        }
    }
    for rule in alert_rules() {
        for name in metric_names(&rule.expr) {
            used.entry(name).or_insert(format!("alert {}", rule.name));
        }
    }
    let unknown: Vec<String> = used
        .iter()
        .filter(|(name, _)| !exported.contains(*name) && !PROMETHEUS_OWN.contains(&name.as_str()))
        .map(|(name, place)| format!("{name} (in {place})"))
        .collect();
    assert!(
        unknown.is_empty(),
        "metrics no binary exports (ingest/src/metrics.rs): {unknown:#?}"
    );
    // The reader of expressions must see the names, or this test proves nothing.
    assert!(
        used.contains_key("ingest_gateway_put_seconds_bucket"),
        "{used:?}"
    );
    assert!(used.contains_key("up"), "{used:?}");
}

#[test]
fn the_metric_name_reader_sees_names_and_nothing_else() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le, shard) (rate(a_bucket{cause="x", b="y"}[5m]))) / on (instance) group_left b_total offset 1h > bool 0 unless max_over_time(c[1h:1m])"#,
    );
    let expected: BTreeSet<String> = ["a_bucket", "b_total", "c"].map(String::from).into();
    assert_eq!(names, expected);
}

/// Loads samples (recent and a day old) and dead letters through the real
/// consumer, then runs every SQL variable and panel query with Grafana's
/// macros expanded, over a short range (raw samples) and a long one (the
/// hourly rollup), and checks each returns rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sql_panel_returns_rows_on_the_real_schema() {
    let db = TestDb::migrated("dashboards_sql").await;
    let (stream, source) = create_stream("dashboards-sql", 1).await;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // 600 readings of 6 devices 5 minutes ago, 300 more a day ago,
    // and three records the decoder refuses.
    let mut batch = records(6, 600, now_ms - 300_000);
    batch.extend(records(6, 300, now_ms - 86_400_000));
    for bad in ["not json", "{\"ts\": 1}", "[1, 2]"] {
        batch.push(("bad".to_string(), Bytes::from(bad)));
    }
    source.put_records(&batch).await.expect("records put");

    let mut consumer = ConsumerProcess::start(&db.url, &stream, "dashboards-sql", &[]);
    let client = db.client().await;
    let samples = wait_for_count(
        &client,
        "SELECT count(*) FROM telemetry.samples",
        900,
        Duration::from_secs(60),
    )
    .await;
    let dead = wait_for_count(
        &client,
        "SELECT count(*) FROM ingest.dead_letters",
        3,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        (samples, dead),
        (900, 3),
        "the consumer did not load the data"
    );
    consumer.terminate(Duration::from_secs(30));

    // Grafana's TimescaleDB option changes $__timeGroup; the queries must
    // run both ways where the server has TimescaleDB.
    let storage: String = client
        .query_one("SELECT storage FROM ingest.schema_migrations LIMIT 1", &[])
        .await
        .expect("the storage")
        .get(0);
    let modes: &[bool] = if storage == "timescaledb" {
        &[false, true]
    } else {
        &[false]
    };
    println!("storage {storage}: macros expanded with Grafana's TimescaleDB option {modes:?}");

    // Variables in order, each taking the first value its query offers.
    let mut vars = BTreeMap::new();
    let to = SystemTime::now() + Duration::from_secs(60);
    for (name, sql) in sql_variables("fleet.json") {
        let text = expand_grafana_sql(
            &sql,
            to - Duration::from_secs(3600),
            to,
            Duration::from_secs(60),
            &vars,
            false,
        );
        let rows = client
            .simple_query(&text)
            .await
            .unwrap_or_else(|e| panic!("variable {name} fails: {e}\n{text}"));
        let first = rows
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
                _ => None,
            })
            .unwrap_or_else(|| panic!("variable {name} offers no value:\n{text}"));
        vars.insert(name, first);
    }
    assert_eq!(vars.get("house").map(String::as_str), Some("h"), "{vars:?}");

    let queries = panel_queries("grafana-postgresql-datasource");
    assert!(queries.len() >= 5, "{queries:?}");
    let ranges = [
        // Ten minutes: shorter than an hour, so an hourly bucket that began
        // before the range must still be found.
        (
            "the last 10 minutes",
            Duration::from_secs(600),
            Duration::from_secs(10),
        ),
        (
            "the last 2 days",
            Duration::from_secs(2 * 86_400),
            Duration::from_secs(3600),
        ),
    ];
    let mut failures = Vec::new();
    for query in &queries {
        for (range, width, interval) in ranges {
            for &timescaledb in modes {
                let range = format!(
                    "{range}{}",
                    if timescaledb {
                        " (TimescaleDB option)"
                    } else {
                        ""
                    }
                );
                let sql =
                    expand_grafana_sql(&query.text, to - width, to, interval, &vars, timescaledb);
                match client.simple_query(&sql).await {
                    Err(e) => failures.push(format!("{} over {range}: {e}\n{sql}", query.place)),
                    Ok(messages) => {
                        let rows: Vec<_> = messages
                            .iter()
                            .filter_map(|m| match m {
                                tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
                                _ => None,
                            })
                            .collect();
                        if rows.is_empty() {
                            failures.push(format!("{} over {range}: no rows\n{sql}", query.place));
                        } else if query.format == "time_series"
                            && rows[0].columns().iter().all(|c| c.name() != "time")
                        {
                            failures.push(format!(
                                "{}: a time series needs a `time` column\n{sql}",
                                query.place
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "SQL panels that failed:\n{}",
        failures.join("\n\n")
    );
    source.delete_stream().await.ok();
    db.drop().await;
}
