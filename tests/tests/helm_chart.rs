//! The Helm chart (`helm/ingest`), with real Helm (helm-python-sdk, in the
//! stack's venv): lint, render with the defaults and with everything on,
//! every object valid for Kubernetes 1.30+ and the monitoring CRDs, the
//! values schema refusing wrong values with Helm's messages, and the chart
//! running the real thing: the rendered hook Jobs, consumers, gateway and
//! `helm test` pod started as the kubelet would start them, against the
//! local stack, with records going through the gateway into the database.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tests::helm::{self, Rendered, annotation, name_of, pod_labels, pod_spec, selects};
use tests::pod::{self, Secrets};
use tests::{START_HINT, TestDb, consumer, gateway, http_get, text, with_database};

const NAMESPACE: &str = "telemetry";

fn all_on_values() -> PathBuf {
    helm::chart_dir().join("ci/all-on-values.yaml")
}

/// A scratch folder of this test's own, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ingest-helm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    dir
}

/// `values` written as a values file (JSON is YAML).
fn values_file(dir: &Path, values: &Value) -> PathBuf {
    let path = dir.join("values.json");
    std::fs::write(&path, serde_json::to_string_pretty(values).unwrap()).expect("values file");
    path
}

fn render_ok(release: &str, values: &[&Path]) -> Rendered {
    helm::render(release, NAMESPACE, values)
        .unwrap_or_else(|error| panic!("helm template: {error}"))
}

/// A `key = "value"` line's value in a TOML or YAML file's `section`.
fn field(path: &Path, section: &str, key: &str) -> String {
    let text = std::fs::read_to_string(path).expect("the file");
    let mut in_section = section.is_empty();
    for line in text.lines() {
        if line.starts_with('[') {
            in_section = line.trim() == section;
        } else if in_section && let Some(rest) = line.strip_prefix(key) {
            let rest = rest.trim_start();
            if let Some(value) = rest.strip_prefix('=').or_else(|| rest.strip_prefix(':')) {
                return value.trim().trim_matches('"').to_string();
            }
        }
    }
    panic!("no {key} in {section} of {}", path.display())
}

#[test]
fn the_charts_app_version_is_the_crates_version() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let crate_version = field(&root.join("Cargo.toml"), "[workspace.package]", "version");
    let app_version = field(&helm::chart_dir().join("Chart.yaml"), "", "appVersion");
    assert_eq!(app_version, crate_version, "Chart.yaml appVersion");
    let output = tests::run_ingest(&["--version"], &[]);
    assert_eq!(text(&output).0.trim(), format!("ingest {crate_version}"));
}

#[test]
fn helm_lint_strict_passes_with_the_defaults_and_with_everything_on() {
    for values in [vec![], vec![all_on_values()]] {
        let values: Vec<&Path> = values.iter().map(PathBuf::as_path).collect();
        let report = helm::lint(&values);
        assert_eq!(report["total_charts_linted"], 1, "{report}");
        assert_eq!(report["errors"], json!([]), "{report}");
        // Info (1) is advice such as "icon is recommended"; --strict fails on
        // warnings (2) and errors (3).
        let serious: Vec<&Value> = report["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter(|m| m["severity"].as_i64().unwrap_or(3) >= 2)
            .collect();
        assert!(
            serious.is_empty(),
            "helm lint --strict {values:?}: {serious:?}"
        );
    }
}

/// Checks every object rendered is valid, labelled, and its pods hardened.
fn check_rendered(rendered: &Rendered, release: &str) {
    let validation = rendered.validate();
    assert!(
        validation.errors.is_empty(),
        "invalid objects:\n{}",
        validation.errors.join("\n")
    );
    assert_eq!(validation.checked.len(), rendered.objects.len());
    println!("{}", validation.checked.join("\n"));

    for (template, object) in &rendered.objects {
        let labels = &object["metadata"]["labels"];
        for key in [
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/component",
            "helm.sh/chart",
        ] {
            assert!(labels[key].is_string(), "{template}: no label {key}");
        }
        assert_eq!(labels["app.kubernetes.io/instance"], release);
        let kind = object["kind"].as_str().unwrap_or_default();
        if !["Deployment", "StatefulSet", "Job", "Pod"].contains(&kind) {
            continue;
        }
        let spec = pod_spec(object);
        let name = name_of(object);
        assert_eq!(spec["automountServiceAccountToken"], false, "{name}");
        let pod_security = &spec["securityContext"];
        assert_eq!(pod_security["runAsNonRoot"], true, "{name}");
        assert_eq!(
            pod_security["seccompProfile"]["type"], "RuntimeDefault",
            "{name}"
        );
        for container in spec["containers"].as_array().expect("containers") {
            let security = &container["securityContext"];
            assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(security["capabilities"]["drop"], json!(["ALL"]), "{name}");
            assert_eq!(container["command"], json!(["ingest"]), "{name}");
            assert!(container["resources"]["requests"].is_object(), "{name}");
        }
        if kind == "Deployment" || kind == "StatefulSet" {
            // The kubelet waits longer than the process's own shutdown grace.
            let container = &spec["containers"][0];
            let grace = container["args"]
                .as_array()
                .unwrap()
                .iter()
                .find_map(|a| a.as_str()?.strip_prefix("--shutdown-grace="))
                .and_then(|g| g.strip_suffix('s')?.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{name}: no --shutdown-grace=<N>s"));
            let period = spec["terminationGracePeriodSeconds"]
                .as_u64()
                .expect("grace");
            assert!(
                period > grace,
                "{name}: terminationGracePeriodSeconds {period} <= {grace}"
            );
            for probe in ["livenessProbe", "readinessProbe"] {
                assert!(container[probe]["httpGet"].is_object(), "{name}: {probe}");
            }
            let spread = spec["topologySpreadConstraints"]
                .as_array()
                .expect("spread");
            assert!(
                spread
                    .iter()
                    .any(|c| c["topologyKey"] == "topology.kubernetes.io/zone"
                        && selects(&c["labelSelector"], pod_labels(object))),
                "{name}: no zone spread over its own pods"
            );
        }
    }

    // Every selector selects the pods it is for.
    for kind in ["PodDisruptionBudget", "NetworkPolicy", "PodMonitor"] {
        for object in rendered.of_kind(kind) {
            let selector = match kind {
                "NetworkPolicy" => &object["spec"]["podSelector"],
                _ => &object["spec"]["selector"],
            };
            let component = object["metadata"]["labels"]["app.kubernetes.io/component"].clone();
            let selected = rendered.objects.iter().any(|(_, o)| {
                let labels = match o["kind"].as_str() {
                    Some("Pod") => &o["metadata"]["labels"],
                    Some("Deployment" | "StatefulSet" | "Job") => pod_labels(o),
                    _ => return false,
                };
                labels["app.kubernetes.io/component"] == component && selects(selector, labels)
            });
            assert!(
                selected,
                "{kind} {} selects no pod of the chart",
                name_of(object)
            );
        }
    }
}

/// The objects the defaults must make, and how.
#[test]
fn the_defaults_render_a_valid_hardened_release() {
    let rendered = render_ok("prod", &[]);
    check_rendered(&rendered, "prod");
    let consumers = rendered.get("Deployment", "prod-ingest-consumer");
    assert_eq!(consumers["spec"]["replicas"], 2);
    let gateways = rendered.get("Deployment", "prod-ingest-gateway");
    assert_eq!(gateways["spec"]["replicas"], 2);

    let service = rendered.get("Service", "prod-ingest-gateway");
    assert_eq!(service["spec"]["type"], "LoadBalancer");
    assert_eq!(service["spec"]["externalTrafficPolicy"], "Local");
    assert_eq!(service["spec"]["sessionAffinity"], "ClientIP");
    assert_eq!(
        service["spec"]["ports"],
        json!([{"name": "coap", "port": 5683, "targetPort": "coap", "protocol": "UDP"}])
    );
    for (key, value) in [
        (
            "service.beta.kubernetes.io/aws-load-balancer-type",
            "external",
        ),
        (
            "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type",
            "ip",
        ),
        (
            "service.beta.kubernetes.io/aws-load-balancer-healthcheck-path",
            "/readyz",
        ),
    ] {
        assert_eq!(annotation(service, key), Some(value), "{key}");
    }
    let gateway_ports = &pod_spec(gateways)["containers"][0]["ports"];
    assert!(
        gateway_ports
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "coap" && p["protocol"] == "UDP" && p["containerPort"] == 5683),
        "{gateway_ports}"
    );
    assert_eq!(
        annotation(
            service,
            "service.beta.kubernetes.io/aws-load-balancer-healthcheck-port"
        ),
        gateway_ports
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "metrics")
            .map(|p| p["containerPort"].to_string())
            .as_deref(),
        "the NLB health check goes to the gateway's metrics port"
    );

    let migrate = rendered.get("Job", "prod-ingest-migrate");
    assert_eq!(
        annotation(migrate, "helm.sh/hook"),
        Some("pre-install,pre-upgrade")
    );
    assert!(annotation(migrate, "helm.sh/hook-delete-policy").is_some());
    // Its ServiceAccount is a hook of an earlier weight: pre-install hooks run
    // before the release's other objects exist.
    let account = rendered.get("ServiceAccount", "prod-ingest-migrate");
    assert_eq!(
        annotation(account, "helm.sh/hook"),
        Some("pre-install,pre-upgrade")
    );
    let weight = |o: &Value| -> i64 {
        annotation(o, "helm.sh/hook-weight")
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(weight(account) < weight(migrate));
    assert_eq!(
        pod_spec(migrate)["serviceAccountName"],
        "prod-ingest-migrate"
    );

    let test = rendered.get("Pod", "prod-ingest-test-status");
    assert_eq!(annotation(test, "helm.sh/hook"), Some("test"));
    assert_eq!(pod_spec(test)["containers"][0]["args"][0], "status");

    // Off by default: provisioning, autoscaling, monitoring.
    for kind in [
        "HorizontalPodAutoscaler",
        "PodMonitor",
        "PrometheusRule",
        "ConfigMap",
        "StatefulSet",
    ] {
        assert!(
            rendered.of_kind(kind).is_empty(),
            "{kind} rendered by default"
        );
    }
    assert!(
        !rendered
            .names()
            .contains(&"Job/prod-ingest-provision".to_string())
    );
    assert!(
        rendered.notes.contains("helm test prod"),
        "{}",
        rendered.notes
    );

    // A release named after the chart is not named twice (the README's names).
    let ingest = render_ok("ingest", &[]);
    for (kind, name) in [
        ("Deployment", "ingest-consumer"),
        ("Deployment", "ingest-gateway"),
        ("Service", "ingest-gateway"),
        ("Job", "ingest-migrate"),
        ("ServiceAccount", "ingest-consumer"),
    ] {
        ingest.get(kind, name);
    }
}

#[test]
fn everything_on_renders_valid_objects_with_monitoring_from_the_files() {
    let rendered = render_ok("prod", &[&all_on_values()]);
    check_rendered(&rendered, "prod");

    // The HPA's maximum defaults to the shard count.
    let hpa = rendered.get("HorizontalPodAutoscaler", "prod-ingest-consumer");
    assert_eq!(hpa["spec"]["maxReplicas"], 8);
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        "prod-ingest-consumer"
    );
    assert!(rendered.get("Deployment", "prod-ingest-consumer")["spec"]["replicas"].is_null());

    // The MQTT bridge makes the gateway a StatefulSet whose client ids are
    // its pod names, sharing one subscription so that replicas split the
    // messages.
    let gateway = rendered.get("StatefulSet", "prod-ingest-gateway");
    assert_eq!(
        gateway["spec"]["serviceName"],
        "prod-ingest-gateway-headless"
    );
    let args = pod_spec(gateway)["containers"][0]["args"]
        .as_array()
        .unwrap()
        .clone();
    for arg in [
        "--mqtt-client-id=$(POD_NAME)",
        "--mqtt-share-group=ingest",
        "--mqtt-topic=devices/+/telemetry",
    ] {
        assert!(args.contains(&json!(arg)), "{arg} not in {args:?}");
    }

    // IRSA: each component its own role.
    for component in ["consumer", "gateway", "provision"] {
        let account = rendered.get("ServiceAccount", &format!("prod-ingest-{component}"));
        assert_eq!(
            annotation(account, "eks.amazonaws.com/role-arn"),
            Some(format!("arn:aws:iam::123456789012:role/ingest-{component}").as_str())
        );
    }
    // Provisioning runs before the migration.
    let weight = |name: &str| -> i64 {
        annotation(rendered.get("Job", name), "helm.sh/hook-weight")
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(weight("prod-ingest-provision") < weight("prod-ingest-migrate"));

    // The PodMonitors name the jobs the alerts and dashboards use.
    for component in ["consumer", "gateway"] {
        let monitor = rendered.get("PodMonitor", &format!("prod-ingest-{component}"));
        let relabel = &monitor["spec"]["podMetricsEndpoints"][0]["relabelings"][0];
        assert_eq!(relabel["targetLabel"], "job");
        assert_eq!(relabel["replacement"], format!("ingest-{component}"));
    }

    // The alerts and dashboards are the files issue 14 writes, whatever
    // they hold: a PrometheusRule when the rules file exists, one ConfigMap
    // per dashboard.
    let rules_file = helm::chart_dir().join("files/alerts.rules.yaml");
    let rules = rendered.of_kind("PrometheusRule");
    if rules_file.exists() {
        assert_eq!(rules.len(), 1, "{:?}", rendered.names());
        let text = std::fs::read_to_string(&rules_file).unwrap();
        let alerts = text.matches("- alert:").count();
        let rendered_alerts: usize = rules[0]["spec"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                g["rules"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|r| r["alert"].is_string())
                    .count()
            })
            .sum();
        assert_eq!(
            rendered_alerts,
            alerts,
            "every alert of {}",
            rules_file.display()
        );
    }
    let dashboards: Vec<PathBuf> = std::fs::read_dir(helm::chart_dir().join("dashboards"))
        .map(|entries| {
            entries
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .collect()
        })
        .unwrap_or_default();
    let config_maps = rendered.of_kind("ConfigMap");
    assert_eq!(
        config_maps.len(),
        dashboards.len(),
        "one ConfigMap per dashboard"
    );
    for path in &dashboards {
        let file = path.file_name().unwrap().to_str().unwrap();
        let map = config_maps
            .iter()
            .find(|m| m["data"][file].is_string())
            .unwrap_or_else(|| panic!("no ConfigMap holds {file}"));
        assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], "1");
        let content = std::fs::read_to_string(path).unwrap();
        assert_eq!(
            map["data"][file].as_str().unwrap().trim_end(),
            content.trim_end(),
            "{file} is carried unchanged"
        );
    }
}

/// The PrometheusRule is made from the rules file; without the file, Helm
/// refuses to make it and says which file is missing.
#[test]
fn the_prometheus_rule_comes_from_the_rules_file() {
    let dir = scratch("rule-switch");
    let values = values_file(
        &dir,
        &json!({"monitoring": {"prometheusRule": {"enabled": true}}}),
    );
    let result = helm::render("prod", NAMESPACE, &[&values]);
    if helm::chart_dir().join("files/alerts.rules.yaml").exists() {
        assert_eq!(result.expect("renders").of_kind("PrometheusRule").len(), 1);
    } else {
        assert!(result.unwrap_err().contains("files/alerts.rules.yaml"));
    }
}

#[test]
fn the_values_schema_refuses_wrong_values_with_helms_message() {
    let dir = scratch("schema");
    let cases = [
        (
            json!({"consumer": {"replica": 3}}),
            "at '/consumer': additional properties 'replica' not allowed",
        ),
        (
            json!({"consumer": {"replicas": "three"}}),
            "at '/consumer/replicas': got string, want integer",
        ),
        (
            json!({"gateway": {"replicas": -1}}),
            "at '/gateway/replicas': minimum: got -1, want 0",
        ),
        (
            json!({"consumer": {"batchBytes": "8MiB"}}),
            "at '/consumer/batchBytes': got string, want integer",
        ),
        (
            json!({"databse": {"url": "postgres://x@y/z"}}),
            "additional properties 'databse' not allowed",
        ),
        (
            // A password belongs in the Secret, never in values.
            json!({"database": {"url": "postgres://ingest:secret@db/ingest"}}),
            "at '/database/url'",
        ),
        (
            json!({"database": {"tls": "verify-ca"}}),
            "at '/database/tls'",
        ),
        (
            json!({"consumer": {"readMode": "fanout"}}),
            "at '/consumer/readMode'",
        ),
    ];
    for (values, message) in cases {
        let path = values_file(&dir, &values);
        let error = helm::render("prod", NAMESPACE, &[&path])
            .map(|_| ())
            .expect_err(&format!("{values} was accepted"));
        assert!(
            error.contains("values don't meet the specifications of the schema(s)")
                && error.contains(message),
            "{values}: {error}"
        );
    }
}

/// The gateway's and provisioning's IAM policies: one resource per
/// statement, no wildcard, exactly the calls the binary makes.
#[test]
fn the_gateway_and_provision_policies_are_least_privilege() {
    let expected: [(&str, &[&str]); 2] = [
        (
            "gateway",
            &[
                "kinesis:DescribeStreamSummary on stream/${STREAM_NAME}",
                // The shard map of --aggregate.
                "kinesis:ListShards on stream/${STREAM_NAME}",
                "kinesis:PutRecords on stream/${STREAM_NAME}",
            ],
        ),
        (
            "provision",
            &[
                "firehose:CreateDeliveryStream on deliverystream/${DELIVERY_STREAM_NAME}",
                "firehose:DescribeDeliveryStream on deliverystream/${DELIVERY_STREAM_NAME}",
                "iam:PassRole on role/${FIREHOSE_ROLE_NAME}",
                "iam:PassRole on role/${IOT_ROLE_NAME}",
                "iot:CreateTopicRule on rule/${IOT_RULE_NAME}",
                "iot:GetTopicRule on rule/${IOT_RULE_NAME}",
                "iot:ReplaceTopicRule on rule/${IOT_RULE_NAME}",
                "kinesis:CreateStream on stream/${STREAM_NAME}",
                "kinesis:DescribeStreamSummary on stream/${STREAM_NAME}",
                "s3:CreateBucket on ${ARCHIVE_BUCKET}",
                "s3:GetLifecycleConfiguration on ${ARCHIVE_BUCKET}",
                "s3:ListBucket on ${ARCHIVE_BUCKET}",
                "s3:PutLifecycleConfiguration on ${ARCHIVE_BUCKET}",
            ],
        ),
    ];
    for (component, wanted) in expected {
        let path = helm::chart_dir().join(format!("files/{component}-iam-policy.json"));
        let policy: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("the policy")).unwrap();
        let mut granted = Vec::new();
        for statement in policy["Statement"].as_array().expect("statements") {
            assert_eq!(statement["Effect"], "Allow");
            let resource = statement["Resource"].as_str().expect("one resource");
            assert!(!resource.contains('*'), "{component}: wildcard {resource}");
            for action in statement["Action"].as_array().expect("actions") {
                let action = action.as_str().unwrap();
                assert!(!action.contains('*'), "{component}: wildcard {action}");
                if action == "iam:PassRole" {
                    assert!(
                        statement["Condition"]["StringEquals"]["iam:PassedToService"].is_string(),
                        "{component}: PassRole to any service"
                    );
                }
                granted.push(format!(
                    "{action} on {}",
                    resource.rsplit(':').next().unwrap()
                ));
            }
        }
        granted.sort();
        assert_eq!(granted, wanted, "{component}");
    }
}

/// Values pointing at the local stack, as an operator's would point at AWS.
struct LocalRelease {
    release: String,
    stream: String,
    db: TestDb,
    dir: PathBuf,
    values: PathBuf,
    secrets: Secrets,
    /// What the cluster gives a pod besides the chart (IRSA's credentials).
    outside: Vec<(String, String)>,
}

const DEVICE: &str = "helm-coap";
const DEVICE_KEY: &str = "helm-device-secret";

impl LocalRelease {
    /// A release named `release` (plus the pid), on a database and stream named `name`.
    async fn new(name: &str, release: &str) -> LocalRelease {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: {START_HINT}"))
        };
        let db = TestDb::create(name).await;
        let pid = std::process::id();
        let release = format!("{release}{pid}");
        let stream = format!("{name}-{pid}");
        // The primary by its Consul name, the password only in the Secret.
        let consul_url = with_database(&var("INGEST_CONSUL_DATABASE_URL"), &db.name);
        let (scheme, rest) = consul_url.split_once("://").unwrap();
        let (user_info, host) = rest.split_once('@').unwrap();
        let (user, password) = user_info.split_once(':').unwrap();
        let dir = scratch(name);
        let values = values_file(
            &dir,
            &json!({
                "aws": {"region": var("AWS_REGION")},
                "env": [
                    {"name": "AWS_ENDPOINT_URL", "value": var("AWS_ENDPOINT_URL")},
                    {"name": "AWS_ENDPOINT_URL_KINESIS", "value": var("AWS_ENDPOINT_URL_KINESIS")},
                    {"name": "AWS_EC2_METADATA_DISABLED", "value": "true"},
                ],
                "stream": {"name": stream, "shards": 2},
                "database": {
                    "url": format!("{scheme}://{user}@{host}"),
                    "consulDns": var("INGEST_CONSUL_DNS"),
                    "tls": "disable",
                    "existingSecret": "ingest-database",
                },
                "archive": {
                    "enabled": true,
                    "deliveryStream": format!("{stream}-raw"),
                    // S3 names take no underscore.
                    "bucket": format!("{}-raw", stream.replace('_', "-")),
                },
                "consumer": {
                    "replicas": 2,
                    "leaseTtl": "4s",
                    "leaseInterval": "1s",
                    "batchAge": "200ms",
                    "shardSyncInterval": "2s",
                },
                "gateway": {
                    "replicas": 1,
                    "deviceKeys": {"existingSecret": "ingest-device-keys", "required": true},
                    "mqtt": {
                        "enabled": true,
                        "url": var("INGEST_MQTT_URL"),
                        "topics": [format!("devices/{stream}/+/telemetry")],
                        "layouts": [format!("devices/{stream}/{{device}}/telemetry")],
                    },
                },
                "migrate": {"chunkInterval": "12 hours", "retention": "400 days"},
                "provision": {"enabled": true, "iotRule": format!("helm_{pid}")},
            }),
        );
        let mut secrets = Secrets::new();
        secrets.insert(
            "ingest-database".into(),
            BTreeMap::from([("password".into(), format!("{password}\n"))]),
        );
        secrets.insert(
            "ingest-device-keys".into(),
            BTreeMap::from([(format!("h1.{DEVICE}"), DEVICE_KEY.into())]),
        );
        let outside = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
            .iter()
            .map(|name| (name.to_string(), var(name)))
            .collect();
        LocalRelease {
            release,
            stream,
            db,
            dir,
            values,
            secrets,
            outside,
        }
    }

    fn outside(&self) -> Vec<(&str, &str)> {
        self.outside
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    fn render(&self) -> Rendered {
        render_ok(&self.release, &[&self.values])
    }

    /// Container `container` of `object`'s pod, as pod `pod_name`.
    fn prepare(&self, object: &Value, container: &str, pod_name: &str) -> pod::PreparedContainer {
        pod::prepare(
            pod_spec(object),
            container,
            pod_name,
            NAMESPACE,
            &self.secrets,
            &self.dir,
        )
        .unwrap_or_else(|error| panic!("{pod_name}: {error}"))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chart_runs_the_real_thing() {
    let local = LocalRelease::new("helm_chart", "hc").await;
    let rendered = local.render();
    let validation = rendered.validate();
    assert!(validation.errors.is_empty(), "{:?}", validation.errors);
    let outside = local.outside();
    let fullname = format!("{}-ingest", local.release);

    // The hooks, as Helm runs them on install: by weight, each to its end.
    let mut hooks: Vec<&Value> = rendered
        .of_kind("Job")
        .into_iter()
        .filter(|job| annotation(job, "helm.sh/hook").is_some_and(|h| h.contains("pre-install")))
        .collect();
    hooks.sort_by_key(|job| {
        annotation(job, "helm.sh/hook-weight")
            .unwrap_or("0")
            .parse::<i64>()
            .unwrap()
    });
    let names: Vec<&str> = hooks.iter().map(|job| name_of(job)).collect();
    assert_eq!(
        names,
        [
            format!("{fullname}-provision"),
            format!("{fullname}-migrate")
        ]
    );
    let mut outputs = Vec::new();
    for job in hooks {
        let container = pod_spec(job)["containers"][0]["name"].as_str().unwrap();
        let prepared = local.prepare(job, container, &format!("{}-x1", name_of(job)));
        let (ok, output) = prepared
            .run_to_end(&outside, Duration::from_secs(180))
            .unwrap_or_else(|error| panic!("{error}"));
        println!("--- {}:\n{output}", name_of(job));
        assert!(ok, "the hook Job {} failed:\n{output}", name_of(job));
        outputs.push(output);
    }
    // Created, or found if a run with the same pid made it before.
    let stream_line = format!("stream      {}: ", local.stream);
    assert!(
        ["created", "found"]
            .iter()
            .any(|word| outputs[0].contains(&format!("{stream_line}{word}"))),
        "{}",
        outputs[0]
    );
    let migrated = &outputs[1];
    assert!(migrated.contains("schema    up to date"), "{migrated}");
    assert!(
        migrated.contains("12 hours") && migrated.contains("retention 400 days"),
        "{migrated}"
    );
    let client = local.db.client().await;
    let applied: i64 = client
        .query_one("SELECT count(*) FROM ingest.schema_migrations", &[])
        .await
        .expect("the migration table")
        .get(0);
    assert_eq!(applied, schema::MIGRATIONS.len() as i64);

    // The consumers and the gateway, as many as the workloads ask for.
    let consumers = rendered.get("Deployment", &format!("{fullname}-consumer"));
    let gateways = rendered.get("StatefulSet", &format!("{fullname}-gateway"));
    let mut running = Vec::new();
    for (workload, container) in [(consumers, "consumer"), (gateways, "gateway")] {
        for i in 0..workload["spec"]["replicas"].as_u64().unwrap() {
            let pod_name = format!("{}-{i}", name_of(workload));
            let prepared = local.prepare(workload, container, &pod_name);
            running.push(prepared.start(&outside).unwrap_or_else(|e| panic!("{e}")));
        }
    }
    assert_eq!(running.len(), 3);
    for container in &mut running {
        for probe in ["readinessProbe", "livenessProbe"] {
            container
                .wait_for_probe(probe, Duration::from_secs(60))
                .unwrap_or_else(|error| panic!("{error}"));
        }
    }
    let gateway = running.last().expect("the gateway");
    let metrics = gateway.prepared.port("metrics").expect("metrics port").host;
    let coap = gateway.prepared.port("coap").expect("coap port");
    assert_eq!(coap.protocol, "UDP");
    // The Service's target is that port.
    let service = rendered.get("Service", &format!("{fullname}-gateway"));
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"],
        coap.name.as_str()
    );
    wait_for_metric(metrics, "ingest_gateway_mqtt_subscribed 1").await;

    // Records through the gateway: CoAP signed with the mounted key, one
    // unsigned (refused: keys are required), and one over MQTT.
    let peer = gateway::CoapPeer::new(([127, 0, 0, 1], coap.host).into()).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for i in 0..5u16 {
        let payload = format!(
            r#"{{"ts":{},"fields":{{"v":{}}}}}"#,
            now + u64::from(i),
            i + 1
        );
        let time = (now / 1000) as i64;
        let nonce = format!("n{i}");
        let signature = ingest::gateway::auth::sign(
            DEVICE_KEY.as_bytes(),
            "POST",
            "h1",
            DEVICE,
            time,
            &nonce,
            payload.as_bytes(),
        );
        let request = gateway::post(
            &format!("/t/h1/{DEVICE}?time={time}&nonce={nonce}&sig={signature}"),
            payload.as_bytes(),
            100 + i,
        );
        let answer = peer
            .exchange(&request, Duration::from_secs(15))
            .await
            .expect("an answer");
        assert_eq!(
            gateway::code(&answer),
            "2.04",
            "{}",
            String::from_utf8_lossy(&answer.payload)
        );
    }
    let unsigned = gateway::post("/t/h1/helm-stranger", br#"{"fields":{"v":1}}"#, 200);
    let answer = peer
        .exchange(&unsigned, Duration::from_secs(15))
        .await
        .expect("an answer");
    assert_eq!(gateway::code(&answer), "4.01");
    gateway::mosquitto_pub(
        &format!("devices/{}/helm-mqtt/telemetry", local.stream),
        &format!(r#"{{"ts":{now},"fields":{{"v":7}}}}"#),
        1,
    )
    .await;

    let rows = consumer::wait_for_count(
        &client,
        "SELECT count(*) FROM telemetry.samples_named WHERE device IN ('helm-coap', 'helm-mqtt')",
        6,
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(rows, 6, "rows in the database");
    assert_eq!(
        consumer::per_device(&client).await,
        [
            ("helm-coap".to_string(), 5, 15.0),
            ("helm-mqtt".to_string(), 1, 7.0)
        ]
    );

    // `helm test`: the test pod's `ingest status` sees both workers.
    let test = rendered.get("Pod", &format!("{fullname}-test-status"));
    let (ok, status) = local
        .prepare(test, "status", name_of(test))
        .run_to_end(&outside, Duration::from_secs(60))
        .unwrap_or_else(|error| panic!("{error}"));
    println!("--- helm test:\n{status}");
    assert!(ok, "{status}");
    assert!(
        status.contains("2 shards") && status.contains("2 live workers"),
        "{status}"
    );
    assert!(
        status.contains(&format!("{fullname}-consumer-0")),
        "{status}"
    );

    // Stopped as the kubelet stops them: SIGTERM, exit within the grace.
    for (container, workload) in running.iter_mut().zip([consumers, consumers, gateways]) {
        let grace = pod_spec(workload)["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap();
        let status = container
            .terminate(Duration::from_secs(grace))
            .unwrap_or_else(|error| panic!("{error}"));
        assert!(
            status.success(),
            "{}: {status}\n{}",
            container.prepared.pod_name,
            container.log_text()
        );
    }
    drop(running);
    local.db.drop().await;
}

async fn wait_for_metric(port: u16, line: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let body = http_get(port, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default();
        if body.lines().any(|l| l == line) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no `{line}` in /metrics:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The harness refuses what a cluster would refuse: a flag the binary does
/// not know, a probe at a path nothing serves, a file on no mount.
#[tokio::test(flavor = "multi_thread")]
async fn a_broken_rendering_fails_the_run() {
    let local = LocalRelease::new("helm_broken", "hb").await;
    // The gateway's stream, so that it starts (provisioning does not run here).
    let (stream, _) = consumer::create_stream("helm_broken", 1).await;
    assert_eq!(stream, local.stream);
    let rendered = local.render();
    let outside = local.outside();
    let fullname = format!("{}-ingest", local.release);
    let gateway = rendered
        .get("StatefulSet", &format!("{fullname}-gateway"))
        .clone();
    let consumer = rendered
        .get("Deployment", &format!("{fullname}-consumer"))
        .clone();

    let mut unknown_flag = gateway.clone();
    unknown_flag["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array_mut()
        .unwrap()
        .push(json!("--coap-port=5683"));
    let mut started = local
        .prepare(&unknown_flag, "gateway", "unknown-flag-0")
        .start(&outside)
        .expect("it starts");
    let error = started
        .wait_for_probe("readinessProbe", Duration::from_secs(30))
        .expect_err("an unknown flag");
    assert!(error.contains("--coap-port"), "{error}");

    let mut wrong_path = gateway.clone();
    wrong_path["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["path"] =
        json!("/health");
    let mut started = local
        .prepare(&wrong_path, "gateway", "wrong-path-0")
        .start(&outside)
        .expect("it starts");
    let error = started
        .wait_for_probe("livenessProbe", Duration::from_secs(30))
        .expect_err("a wrong probe path");
    assert!(error.contains("404"), "{error}");

    let mut wrong_port = consumer.clone();
    wrong_port["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] =
        json!("http");
    let mut started = local
        .prepare(&wrong_port, "consumer", "wrong-port-0")
        .start(&outside)
        .expect("it starts");
    let error = started
        .wait_for_probe("readinessProbe", Duration::from_secs(30))
        .expect_err("an undeclared port");
    assert!(error.contains("does not declare"), "{error}");

    let mut no_mount = consumer.clone();
    no_mount["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = json!([]);
    let error = pod::prepare(
        pod_spec(&no_mount),
        "consumer",
        "no-mount-0",
        NAMESPACE,
        &local.secrets,
        &local.dir,
    )
    .expect_err("a password file on no mount");
    assert!(error.contains("/etc/ingest/database/password"), "{error}");

    let mut unknown_env = consumer.clone();
    unknown_env["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "INGEST_BATCH_SIZE", "value": "10"}));
    let error = pod::prepare(
        pod_spec(&unknown_env),
        "consumer",
        "unknown-env-0",
        NAMESPACE,
        &local.secrets,
        &local.dir,
    )
    .expect_err("an unknown variable");
    assert!(error.contains("INGEST_BATCH_SIZE"), "{error}");

    let mut missing_secret = local.secrets.clone();
    missing_secret.remove("ingest-device-keys");
    let error = pod::prepare(
        pod_spec(&gateway),
        "gateway",
        "no-secret-0",
        NAMESPACE,
        &missing_secret,
        &local.dir,
    )
    .expect_err("a Secret that does not exist");
    assert!(error.contains("ingest-device-keys"), "{error}");
    local.db.drop().await;
}
