//! KPL aggregated records made and read by an implementation independent of
//! ingest's: AWS's `aws-kinesis-agg` from PyPI, run by `kpl_agg.py` beside
//! this file in the stack's Python.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use bytes::Bytes;
use serde_json::{Value, json};

use crate::START_HINT;

/// Aggregates `records` (partition key, data) with `aws-kinesis-agg`'s
/// `RecordAggregator`, into aggregates of at most `max_size` bytes (None:
/// its default, 1 MiB). Returns the aggregated records (partition key,
/// data) in order.
pub fn aggregate(records: &[(String, Bytes)], max_size: Option<usize>) -> Vec<(String, Bytes)> {
    let input: Vec<Value> = records
        .iter()
        .map(|(key, data)| json!([key, hex(data)]))
        .collect();
    let mut args = vec!["aggregate".to_string()];
    args.extend(max_size.map(|size| size.to_string()));
    rows(run(&args, &Value::Array(input).to_string()))
        .map(|row| (text(&row[0]), Bytes::from(unhex(&text(&row[1])))))
        .collect()
}

/// The user records `aws-kinesis-agg`'s deaggregator finds in `data`:
/// (partition key, sub-sequence number, data).
pub fn deaggregate(data: &[u8]) -> Vec<(String, Option<i64>, Bytes)> {
    rows(run(&["deaggregate".to_string()], &hex(data)))
        .map(|row| {
            (
                text(&row[0]),
                row[1].as_i64(),
                Bytes::from(unhex(&text(&row[2]))),
            )
        })
        .collect()
}

/// The rows of the JSON array of arrays `kpl_agg.py` printed.
fn rows(value: Value) -> impl Iterator<Item = Vec<Value>> {
    let Value::Array(rows) = value else {
        panic!("kpl_agg.py prints an array: {value}")
    };
    rows.into_iter().map(|row| match row {
        Value::Array(row) => row,
        other => panic!("kpl_agg.py prints arrays of arrays: {other}"),
    })
}

fn text(value: &Value) -> String {
    value
        .as_str()
        .unwrap_or_else(|| panic!("a string from kpl_agg.py: {value}"))
        .to_string()
}

fn run(args: &[String], input: &str) -> Value {
    let stack = std::env::var("INGEST_STACK_DIR")
        .unwrap_or_else(|_| panic!("INGEST_STACK_DIR is not set: {START_HINT}"));
    let python = Path::new(&stack).join("venv/bin/python");
    assert!(
        python.exists(),
        "{} does not exist: {START_HINT} (it installs aws-kinesis-agg into the stack's venv)",
        python.display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/kpl_agg.py");
    let mut child = Command::new(python)
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the stack's python runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("kpl_agg.py reads its input");
    let output = child.wait_with_output().expect("kpl_agg.py finishes");
    assert!(
        output.status.success(),
        "kpl_agg.py {args:?} failed ({}): {}; the stack's venv may lack aws-kinesis-agg: {START_HINT}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("kpl_agg.py prints JSON")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex from kpl_agg.py"))
        .collect()
}
