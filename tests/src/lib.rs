//! Test support: the real local services, one fresh database per test, and
//! the `ingest` binary.
//!
//! Nothing here mocks a service. A test that cannot reach one fails with a
//! message saying how to start it (`dev/stack up`); it never passes by skipping.

pub mod archive;
pub mod consumer;
pub mod failover;
pub mod gateway;
pub mod helm;
pub mod kinesis_retention;
pub mod kpl;
pub mod pod;
pub mod proxy;

use std::path::PathBuf;
use std::process::{Command, Output};

use tokio_postgres::{Client, NoTls};

/// How to get the services these tests need.
pub const START_HINT: &str = "start the local stack with `dev/stack up && eval \"$(dev/stack env)\"`, or run every test with `dev/test`";

/// A base time for test records, in epoch milliseconds: midnight UTC two
/// days ago, the same for the whole test process. Recent, because the
/// consumer dead-letters readings older than its accepted window (a year
/// without retention) and TimescaleDB compresses chunks older than 7 days in
/// the background; a whole day back, so that tests adding hours to it stay
/// in the past.
pub fn base_ts() -> i64 {
    static BASE: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| {
        const DAY_MS: i64 = 86_400_000;
        (now_ms() / DAY_MS - 2) * DAY_MS
    })
}

/// The wall clock in epoch milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is past 1970")
        .as_millis() as i64
}

/// The URL of the stack's database, whose role may create databases and roles.
pub fn admin_url() -> String {
    std::env::var("INGEST_TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| panic!("DATABASE_URL is not set: {START_HINT}"))
}

/// Connects to `url`, failing the test with a hint when the server is not there.
pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|error| {
            panic!("cannot connect to the test database: {error}; {START_HINT}")
        });
    tokio::spawn(connection);
    client
}

/// A database of its own for one test, created empty; named after the test so
/// that a rerun replaces what a failed run left behind.
#[derive(Debug)]
pub struct TestDb {
    /// The database's name.
    pub name: String,
    /// A URL for it, as the admin role.
    pub url: String,
}

impl TestDb {
    pub async fn create(test_name: &str) -> TestDb {
        let name = format!("test_{test_name}");
        let admin = connect(&admin_url()).await;
        drop_database(&admin, &name).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "cannot create database {name}: {}",
                    ingest::db::describe(&error)
                )
            });
        let url = with_database(&admin_url(), &name);
        TestDb { name, url }
    }

    /// A new database with the schema applied by the real `ingest migrate`.
    pub async fn migrated(test_name: &str) -> TestDb {
        let db = TestDb::create(test_name).await;
        let output = run_ingest(&["migrate", "--database-url", &db.url], &[]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        db
    }

    /// A client connected to this database as the admin role.
    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// Drops the database; a test calls it when it passed.
    pub async fn drop(self) {
        let admin = connect(&admin_url()).await;
        drop_database(&admin, &self.name).await;
    }
}

/// Drops database `name` if it exists, ending its sessions. A session may
/// take longer to end than DROP DATABASE waits (5 s), for example one of
/// TimescaleDB's background jobs in the middle of a chunk: then it tries again.
async fn drop_database(admin: &Client, name: &str) {
    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
    let mut tries = 0;
    loop {
        match admin.batch_execute(&sql).await {
            Ok(()) => return,
            Err(error)
                if tries < 5
                    && error.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) =>
            {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(error) => panic!(
                "cannot drop database {name}: {}",
                ingest::db::describe(&error)
            ),
        }
    }
}

/// `url` with its database name replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    format!("{base}/{database}{query}")
}

/// `url` with its user and password replaced.
pub fn with_credentials(url: &str, user: &str, password: &str) -> String {
    let scheme_end = url.find("://").expect("a URL") + 3;
    let rest = &url[scheme_end..];
    let host_start = rest.find('@').map_or(0, |at| at + 1);
    format!(
        "{}{user}:{password}@{}",
        &url[..scheme_end],
        &rest[host_start..]
    )
}

/// The `ingest` binary next to this test's executable. `dev/test` builds it
/// first; a bare `cargo test` needs `cargo build --bins` before it.
pub fn ingest_bin() -> PathBuf {
    workspace_bin("ingest")
}

/// The `loadgen` binary built next to the tests.
pub fn loadgen_bin() -> PathBuf {
    workspace_bin("loadgen")
}

/// Runs loadgen to its end, failing the test if it runs past `within`.
pub fn run_loadgen(args: &[&str], within: std::time::Duration) -> Output {
    use std::process::Stdio;
    let mut child = Command::new(loadgen_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("loadgen starts");
    let deadline = std::time::Instant::now() + within;
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().ok();
            panic!("loadgen {args:?} still ran after {within:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().expect("its output")
}

/// A process's stdout and stderr, labelled, for a failure message.
pub fn stdio(output: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A binary of the workspace, from the test's own target directory.
fn workspace_bin(name: &str) -> PathBuf {
    let test_exe = std::env::current_exe().expect("the test's own path");
    let mut dir = test_exe.parent().expect("a directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} does not exist: run `cargo build --bins` first (dev/test does)",
        bin.display()
    );
    bin
}

/// Runs `ingest` with `args` and the given extra environment, with no
/// INGEST_* or DATABASE_URL variables inherited, so that a test says exactly
/// what the command sees.
pub fn run_ingest(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(ingest_bin());
    command.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("INGEST_") || key == "DATABASE_URL" {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    command.output().expect("ingest runs")
}

/// The output's stdout and stderr as text, for assertions and failure messages.
pub fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A port on loopback that was free a moment ago, for a server under test.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A plain HTTP GET on loopback: (status code, body). Enough for the
/// health and metrics endpoints, without an HTTP client dependency.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    http_get_at("127.0.0.1", port, path)
}

/// An HTTP/1.0 GET (so the answer is never chunked) from `host:port`:
/// (status code, body).
pub fn http_get_at(host: &str, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect((host, port))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_string();
    Ok((status, body))
}
