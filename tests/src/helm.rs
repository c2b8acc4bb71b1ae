//! The Helm chart (`helm/ingest`) through real Helm: lint, render, and the
//! schema checks of every rendered object, all done by `helm.py` beside this
//! file in the stack's Python (helm-python-sdk bundles Helm v4 as a library;
//! kubernetes-validate and prometheus-operator's models check the objects).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::START_HINT;

/// The chart's folder.
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../helm/ingest")
}

/// The stack's Python, where dev/stack installed dev/aws/requirements.txt.
fn python() -> PathBuf {
    let stack = std::env::var("INGEST_STACK_DIR")
        .unwrap_or_else(|_| panic!("INGEST_STACK_DIR is not set: {START_HINT}"));
    let python = Path::new(&stack).join("venv/bin/python");
    assert!(
        python.exists(),
        "{} does not exist: {START_HINT} (it installs Helm into the stack's venv)",
        python.display()
    );
    python
}

/// Runs `helm.py` with `args`, `stdin` as its input: (status ok, stdout, stderr).
fn helm_py(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/helm.py");
    let mut child = Command::new(python())
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the stack's python runs");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input
            .write_all(text.as_bytes())
            .expect("helm.py reads its input");
    }
    drop(input);
    let output = child.wait_with_output().expect("helm.py finishes");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.code() != Some(0) && output.status.code() != Some(3) {
        panic!(
            "helm.py {args:?} failed ({}): {stderr}; the stack's venv may lack \
             dev/aws/requirements.txt: {START_HINT}",
            output.status
        );
    }
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr,
    )
}

/// `-f FILE` for each values file.
fn values_args(values: &[&Path]) -> Vec<String> {
    values
        .iter()
        .flat_map(|path| ["-f".to_string(), path.display().to_string()])
        .collect()
}

/// `helm lint --strict` with `values`: Helm's report as JSON
/// (`messages`: severity 1 info, 2 warning, 3 error; `errors`).
pub fn lint(values: &[&Path]) -> Value {
    let chart = chart_dir().display().to_string();
    let mut args = vec!["lint".to_string(), chart];
    args.extend(values_args(values));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_, stdout, _) = helm_py(&args, None);
    serde_json::from_str(&stdout).expect("helm.py lint prints JSON")
}

/// What `helm template` rendered: the objects in template order, and NOTES.txt.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// NOTES.txt as rendered.
    pub notes: String,
    /// (template path, object).
    pub objects: Vec<(String, Value)>,
    /// The JSON helm.py printed, for `validate`.
    json: String,
}

/// Renders the chart as release `release` in `namespace` with `values`
/// (YAML or JSON files, later ones winning), as `helm template` does: the
/// values schema is applied first. `Err` is Helm's message.
pub fn render(release: &str, namespace: &str, values: &[&Path]) -> Result<Rendered, String> {
    let chart = chart_dir().display().to_string();
    let mut args = vec![
        "render".to_string(),
        chart,
        "-r".into(),
        release.into(),
        "-n".into(),
        namespace.into(),
    ];
    args.extend(values_args(values));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, stdout, stderr) = helm_py(&args, None);
    if !ok {
        return Err(stderr.trim().to_string());
    }
    let parsed: Value = serde_json::from_str(&stdout).expect("helm.py render prints JSON");
    let objects = parsed["objects"]
        .as_array()
        .expect("objects")
        .iter()
        .map(|item| {
            (
                item["template"].as_str().expect("template").to_string(),
                item["object"].clone(),
            )
        })
        .collect();
    Ok(Rendered {
        notes: parsed["notes"].as_str().unwrap_or_default().to_string(),
        objects,
        json: stdout,
    })
}

/// The outcome of checking every rendered object against its schema.
#[derive(Debug)]
pub struct Validation {
    /// One line per object that passed, saying against what.
    pub checked: Vec<String>,
    /// One line per object that did not, saying where and why.
    pub errors: Vec<String>,
}

impl Rendered {
    /// Every object against the Kubernetes OpenAPI schemas (strict: unknown
    /// fields refused) of 1.30 and the newest known, and monitoring.coreos.com
    /// objects against prometheus-operator's CRD models.
    pub fn validate(&self) -> Validation {
        let (_, stdout, _) = helm_py(&["validate"], Some(&self.json));
        let report: Value = serde_json::from_str(&stdout).expect("helm.py validate prints JSON");
        let lines = |key: &str| -> Vec<String> {
            report[key]
                .as_array()
                .expect("a list")
                .iter()
                .map(|line| line.as_str().expect("text").to_string())
                .collect()
        };
        Validation {
            checked: lines("checked"),
            errors: lines("errors"),
        }
    }

    /// The objects of `kind`.
    pub fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.objects
            .iter()
            .map(|(_, object)| object)
            .filter(|object| object["kind"] == kind)
            .collect()
    }

    /// The object of `kind` named `name`; panics naming what there is when absent.
    pub fn get(&self, kind: &str, name: &str) -> &Value {
        self.objects
            .iter()
            .map(|(_, object)| object)
            .find(|object| object["kind"] == kind && object["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} rendered; there are {:?}", self.names()))
    }

    /// "Kind/name" of every object.
    pub fn names(&self) -> Vec<String> {
        self.objects
            .iter()
            .map(|(_, o)| format!("{}/{}", o["kind"].as_str().unwrap_or("?"), name_of(o)))
            .collect()
    }
}

/// An object's metadata.name.
pub fn name_of(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or("")
}

/// An annotation of an object, if it has it.
pub fn annotation<'a>(object: &'a Value, key: &str) -> Option<&'a str> {
    object["metadata"]["annotations"][key].as_str()
}

/// The pod spec of a workload (Deployment, StatefulSet, Job) or of a Pod.
pub fn pod_spec(object: &Value) -> &Value {
    match object["kind"].as_str() {
        Some("Pod") => &object["spec"],
        _ => &object["spec"]["template"]["spec"],
    }
}

/// The pod template's labels of a workload.
pub fn pod_labels(object: &Value) -> &Value {
    &object["spec"]["template"]["metadata"]["labels"]
}

/// Whether every `matchLabels` entry of `selector` is among `labels`.
pub fn selects(selector: &Value, labels: &Value) -> bool {
    let wanted = selector["matchLabels"].as_object().expect("matchLabels");
    !wanted.is_empty() && wanted.iter().all(|(key, value)| &labels[key] == value)
}
