//! `chaos` (run by `dev/chaos`): the whole local pipeline under loadgen's
//! load while faults come at random, seeded and logged, then proof that
//! nothing was lost or doubled.
//!
//! The pipeline, all real processes on loopback: a primary PostgreSQL and
//! its streaming standby (TimescaleDB when the stack has it), each behind a
//! fault proxy, found through a Consul name served by dnsmasq; the stack's
//! Kinesis emulator and Mosquitto; a Firehose and S3 emulator (moto) of the
//! run's own, so that stopping it touches nothing else; `ingest gateway`;
//! `--workers` `ingest consume` processes; loadgen (MQTT and CoAP).
//!
//! The faults (each kind at least once, then at random): kill -9 a worker,
//! kill -9 the gateway, SIGTERM a worker, fail the database over (and then
//! rebuild the old primary as the new standby), split or merge shards, stop
//! Firehose for a while (SIGSTOP), stall the database longer than the lease
//! TTL (the proxy holds every byte).
//!
//! The checks: loadgen's own verification (every acknowledged message once);
//! the database against the stream, read independently to its end (every
//! reading of every record there, once, and nothing else); the archive
//! against the stream; each device's order within each shard; every shard
//! drained. Then a table; exit 0 only when every check passed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use ingest::decode::{DecodeLimits, Decoder};
use ingest::source::kinesis::{Fetched, KinesisSource, ReaderOptions, StartPosition};
use md5::Digest;
use tests::failover::{ConsulDns, PgServer, Scratch};
use tests::proxy::TcpProxy;

/// The Consul name of the primary.
const CONSUL_NAME: &str = "master.chaos.service.consul";
/// The workers' lease TTL: a database stall outlasts it.
const LEASE_TTL: Duration = Duration::from_secs(6);
/// What a SIGTERMed worker may take: its grace and the lease release.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(
    about = "The local pipeline under load and faults; exit 0 only if nothing was lost or doubled"
)]
struct Args {
    /// loadgen's measured window; faults come during it.
    #[arg(long, default_value = "150s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// The same seed gives the same faults in the same order. [default: random, printed]
    #[arg(long)]
    seed: Option<u64>,
    /// loadgen's devices (1 message per second each, MQTT and CoAP).
    #[arg(long, default_value_t = 200)]
    devices: u32,
    /// `ingest consume` processes.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// The stream's shards at the start.
    #[arg(long, default_value_t = 4)]
    shards: u32,
    /// Logs, loadgen's report and the fault log go here.
    #[arg(long)]
    run_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillWorker,
    KillGateway,
    TermWorker,
    Failover,
    Reshard,
    StopFirehose,
    StallDatabase,
}

impl Fault {
    const ALL: [Fault; 7] = [
        Fault::KillWorker,
        Fault::KillGateway,
        Fault::TermWorker,
        Fault::Failover,
        Fault::Reshard,
        Fault::StopFirehose,
        Fault::StallDatabase,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::KillWorker => "kill -9 a worker",
            Fault::KillGateway => "kill -9 the gateway",
            Fault::TermWorker => "SIGTERM a worker",
            Fault::Failover => "database failover",
            Fault::Reshard => "split or merge shards",
            Fault::StopFirehose => "Firehose stopped",
            Fault::StallDatabase => "database stalled",
        }
    }
}

/// splitmix64: small, seedable, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.next() % (to - from + 1))
    }
}

/// One of the pipeline's processes, started again after each fault.
struct Service {
    name: String,
    command: Box<dyn Fn() -> Command>,
    child: Option<Child>,
    log: PathBuf,
    pids: Arc<Mutex<HashMap<String, u32>>>,
}

impl Service {
    fn new(
        name: &str,
        run_dir: &Path,
        pids: &Arc<Mutex<HashMap<String, u32>>>,
        command: impl Fn() -> Command + 'static,
    ) -> Service {
        Service {
            name: name.to_string(),
            command: Box::new(command),
            child: None,
            log: run_dir.join(format!("{name}.log")),
            pids: pids.clone(),
        }
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("the log file");
        let child = (self.command)()
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.name));
        self.pids
            .lock()
            .unwrap()
            .insert(self.name.clone(), child.id());
        self.child = Some(child);
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("started").id()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM; the exit status, or None if it did not exit within `within`
    /// (then it is killed).
    fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        signal("TERM", child.id());
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Exited by itself since started (a crash): its status.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal(name: &str, pid: u32) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// The primary and the standby, each behind a fault proxy, and the Consul
/// name that says which is the primary (the proxy in front of it).
struct Database {
    servers: [PgServer; 2],
    proxies: [TcpProxy; 2],
    primary: usize,
    dns: ConsulDns,
    proxy_port: u16,
    _scratch: Scratch,
}

impl Database {
    async fn start(settings: &str) -> Database {
        let scratch = Scratch::new("chaos");
        let port = tests::free_port();
        let hba = "local all all trust\nhost all all 127.0.0.0/8 trust\n\
                   host replication all 127.0.0.0/8 trust\n";
        let primary = PgServer::init(
            scratch.path.join("a"),
            Ipv4Addr::new(127, 0, 0, 2),
            port,
            hba,
            settings,
        );
        let standby = PgServer::standby_of(
            &primary,
            scratch.path.join("b"),
            Ipv4Addr::new(127, 0, 0, 3),
        );
        let proxy_port = tests::free_port();
        let mut proxies = Vec::new();
        for (last, server) in [(4, &primary), (5, &standby)] {
            let address = SocketAddr::from((Ipv4Addr::new(127, 0, 0, last), proxy_port));
            let upstream = format!("{}:{}", server.address, server.port);
            proxies.push(TcpProxy::start_at(address, &upstream).await);
        }
        let proxies: [TcpProxy; 2] = proxies.try_into().expect("two proxies");
        let dns = ConsulDns::start(
            &scratch.path.join("dns"),
            CONSUL_NAME,
            Ipv4Addr::new(127, 0, 0, 4),
            None,
        );
        Database {
            servers: [primary, standby],
            proxies,
            primary: 0,
            dns,
            proxy_port,
            _scratch: scratch,
        }
    }

    /// The workers' URL: the Consul name, through the primary's proxy.
    fn consul_url(&self) -> String {
        format!(
            "postgres://postgres@{CONSUL_NAME}:{}/ingest",
            self.proxy_port
        )
    }

    /// Whichever server takes writes, directly (for the checks).
    fn writable_url(&self) -> String {
        let [a, b] = &self.servers;
        format!(
            "postgres://postgres@{}:{},{}:{}/ingest?target_session_attrs=read-write",
            a.address, a.port, b.address, b.port
        )
    }

    /// Stop the primary, promote the standby, move the Consul name to it.
    fn fail_over(&mut self) {
        let (old, new) = (self.primary, 1 - self.primary);
        self.servers[old].stop();
        self.servers[new].promote();
        self.dns.point_at(
            self.proxies[new]
                .address()
                .ip()
                .to_string()
                .parse()
                .unwrap(),
        );
        self.primary = new;
    }

    /// The failed primary becomes the new primary's standby.
    fn rebuild_standby(&mut self) {
        let (a, b) = self.servers.split_at_mut(1);
        let (primary, standby) = if self.primary == 0 {
            (&a[0], &mut b[0])
        } else {
            (&b[0], &mut a[0])
        };
        standby.rebuild_as_standby_of(primary);
    }
}

/// What the monitor saw: when commits happened, and each process's peak RSS.
#[derive(Default)]
struct Observed {
    commits: Vec<Instant>,
    /// Peak resident set (VmHWM) in KiB by process kind.
    peak_rss_kib: BTreeMap<String, u64>,
}

/// Every 200 ms: did any worker commit a batch (its `ingest_batches_total`
/// grew), and how much memory did each process reach.
fn monitor(
    worker_ports: Vec<u16>,
    pids: Arc<Mutex<HashMap<String, u32>>>,
    observed: Arc<Mutex<Observed>>,
    stop: Arc<AtomicBool>,
) {
    let mut last: HashMap<u16, f64> = HashMap::new();
    while !stop.load(Ordering::SeqCst) {
        let mut committed = false;
        for &port in &worker_ports {
            let Ok((200, body)) = tests::http_get(port, "/metrics") else {
                continue;
            };
            let batches: f64 = body
                .lines()
                .filter(|line| line.starts_with("ingest_batches_total"))
                .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            let before = last.insert(port, batches).unwrap_or(0.0);
            // A restarted worker counts from 0 again.
            if batches > before || (batches < before && batches > 0.0) {
                committed = true;
            }
        }
        let pids: Vec<(String, u32)> = pids
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let mut observed = observed.lock().unwrap();
        if committed {
            observed.commits.push(Instant::now());
        }
        for (name, pid) in pids {
            let kind = name
                .trim_end_matches(|c: char| c.is_ascii_digit())
                .trim_end_matches('-');
            if let Some(kib) = peak_rss_kib(pid) {
                let peak = observed.peak_rss_kib.entry(kind.to_string()).or_default();
                *peak = (*peak).max(kib);
            }
        }
        drop(observed);
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// One injected fault: what, when, and what it hit.
struct Injected {
    fault: Fault,
    at: Instant,
    /// `at` on the wall clock, in epoch microseconds (Kinesis's arrival times).
    wall_micros: i64,
    detail: String,
}

struct Pipeline {
    database: Database,
    gateway: Service,
    workers: Vec<Service>,
    moto: Service,
    source: KinesisSource,
    run_started: Instant,
    log: std::fs::File,
    reshards: usize,
    /// What went wrong on its own: a process that exited by itself, a
    /// worker that overran its SIGTERM bound. Each fails the run.
    findings: Vec<String>,
}

impl Pipeline {
    fn say(&mut self, line: &str) {
        let line = format!("[{:7.1}s] {line}", self.run_started.elapsed().as_secs_f64());
        println!("{line}");
        use std::io::Write as _;
        let _ = writeln!(self.log, "{line}");
    }

    /// Injects `fault`; returns what it hit once everything is running again.
    async fn inject(&mut self, fault: Fault, rng: &mut Rng) -> String {
        match fault {
            Fault::KillWorker => {
                let i = rng.below(self.workers.len());
                let worker = &mut self.workers[i];
                let detail = format!("{} (pid {})", worker.name, worker.pid());
                worker.kill();
                tokio::time::sleep(rng.millis(500, 3000)).await;
                worker.start();
                detail
            }
            Fault::KillGateway => {
                let detail = format!("pid {}", self.gateway.pid());
                self.gateway.kill();
                tokio::time::sleep(rng.millis(500, 3000)).await;
                self.gateway.start();
                detail
            }
            Fault::TermWorker => {
                let i = rng.below(self.workers.len());
                let worker = &mut self.workers[i];
                let name = worker.name.clone();
                let status = tokio::task::block_in_place(|| {
                    worker.terminate(SHUTDOWN_GRACE + Duration::from_secs(10))
                });
                worker.start();
                match status {
                    Some(status) => format!("{name}: exited with {status}"),
                    None => {
                        let finding = format!(
                            "{name} did not exit within its grace and release bound after SIGTERM"
                        );
                        self.findings.push(finding.clone());
                        finding
                    }
                }
            }
            Fault::Failover => {
                let old = self.database.servers[self.database.primary].address;
                tokio::task::block_in_place(|| self.database.fail_over());
                let new = self.database.servers[self.database.primary].address;
                // Patroni rebuilds the failed node as a standby a little later.
                tokio::time::sleep(rng.millis(2000, 6000)).await;
                tokio::task::block_in_place(|| self.database.rebuild_standby());
                format!("{old} -> {new}; {old} rebuilt as the standby")
            }
            Fault::Reshard => {
                let shards = self.source.list_shards().await.expect("the shards");
                let mut open: Vec<_> = shards.into_iter().filter(|s| s.is_open()).collect();
                open.sort_by_key(|s| s.starting_hash_key);
                self.reshards += 1;
                // Alternately split the widest shard and merge the narrowest
                // adjacent pair, so the count stays near the start.
                if self.reshards % 2 == 1 || open.len() < 2 {
                    let widest = open
                        .iter()
                        .max_by_key(|s| s.ending_hash_key - s.starting_hash_key)
                        .expect("an open shard");
                    let id = widest.shard_id.clone();
                    self.source.split_shard(&id).await.expect("the split");
                    format!("split {id}")
                } else {
                    let pair = open
                        .windows(2)
                        .filter(|w| w[0].ending_hash_key + 1 == w[1].starting_hash_key)
                        .min_by_key(|w| w[1].ending_hash_key - w[0].starting_hash_key)
                        .expect("two adjacent open shards");
                    let (lower, upper) = (pair[0].shard_id.clone(), pair[1].shard_id.clone());
                    self.source
                        .merge_shards(&lower, &upper)
                        .await
                        .expect("the merge");
                    format!("merged {lower} and {upper}")
                }
            }
            Fault::StopFirehose => {
                let pause = rng.millis(5000, 12000);
                signal("STOP", self.moto.pid());
                tokio::time::sleep(pause).await;
                signal("CONT", self.moto.pid());
                format!("for {:.1}s", pause.as_secs_f64())
            }
            Fault::StallDatabase => {
                let stall = LEASE_TTL + rng.millis(1000, 4000);
                let proxy = &self.database.proxies[self.database.primary];
                proxy.stall();
                tokio::time::sleep(stall).await;
                proxy.resume();
                format!(
                    "for {:.1}s (lease TTL {}s)",
                    stall.as_secs_f64(),
                    LEASE_TTL.as_secs()
                )
            }
        }
    }

    /// A process that died by itself is a finding: noted, and started again.
    fn restart_crashed(&mut self) {
        let mut crashed = Vec::new();
        for service in self.workers.iter_mut().chain([&mut self.gateway]) {
            if let Some(status) = service.exited() {
                crashed.push(format!("{} exited by itself with {status}", service.name));
                service.start();
            }
        }
        for line in crashed {
            self.say(&format!("FINDING: {line}"));
            self.findings.push(line);
        }
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: {}", tests::START_HINT))
}

fn wait_until(what: &str, within: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ready() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn run_ok(what: &str, command: &mut Command) {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed:\n{}",
        tests::stdio(&output)
    );
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let mut rng = Rng(seed);
    std::fs::create_dir_all(&args.run_dir).expect("the run folder");
    let run_dir = args.run_dir.canonicalize().expect("the run folder");
    println!(
        "chaos: seed {seed}, {} devices, {} workers, {} shards, {:?} of load; logs in {}",
        args.devices,
        args.workers,
        args.shards,
        args.duration,
        run_dir.display()
    );

    // The database: TimescaleDB when the stack's server loads it.
    let stack = tests::connect(&env("DATABASE_URL")).await;
    let libraries: String = stack
        .query_one("SHOW shared_preload_libraries", &[])
        .await
        .expect("the stack's settings")
        .get(0);
    let mut settings = "track_commit_timestamp = on\n".to_string();
    if libraries.contains("timescaledb") {
        settings.push_str(
            "shared_preload_libraries = 'timescaledb'\ntimescaledb.telemetry_level = off\n",
        );
    }
    let database = Database::start(&settings).await;
    let primary_url = format!(
        "postgres://postgres@{}:{}/postgres",
        database.servers[0].address, database.servers[0].port
    );
    tests::connect(&primary_url)
        .await
        .batch_execute("CREATE DATABASE ingest")
        .await
        .expect("the database");
    let consul_url = database.consul_url();
    let consul_dns = database.dns.address();
    println!(
        "chaos: database {} (storage: {})",
        consul_url,
        if libraries.contains("timescaledb") {
            "TimescaleDB"
        } else {
            "PostgreSQL"
        }
    );

    // Firehose and S3 of the run's own.
    let pids = Arc::new(Mutex::new(HashMap::new()));
    let moto_port = tests::free_port();
    let moto_bin = PathBuf::from(env("INGEST_STACK_DIR")).join("venv/bin/moto_server");
    let mut moto = Service::new("moto", &run_dir, &pids, move || {
        let mut command = Command::new(&moto_bin);
        command.args(["-H", "127.0.0.1", "-p", &moto_port.to_string()]);
        command
    });
    moto.start();
    wait_until("moto did not answer", Duration::from_secs(30), || {
        tests::http_get(moto_port, "/").is_ok()
    });
    // The children find it by AWS_ENDPOINT_URL (Kinesis stays the stack's:
    // AWS_ENDPOINT_URL_KINESIS comes first for Kinesis).
    let aws = format!("http://127.0.0.1:{moto_port}");

    let stream = format!("chaos-{}", std::process::id());
    let bucket = format!("chaos-raw-{}", std::process::id());
    let delivery = format!("{stream}-raw");
    let ingest = tests::ingest_bin();
    run_ok(
        "ingest migrate",
        Command::new(&ingest).args([
            "migrate",
            "--database-url",
            &consul_url,
            "--consul-dns",
            &consul_dns,
        ]),
    );
    run_ok(
        "ingest provision",
        Command::new(&ingest)
            .args([
                "provision",
                "--stream",
                &stream,
                "--shards",
                &args.shards.to_string(),
                "--bucket",
                &bucket,
                "--delivery-stream",
                &delivery,
                "--glacier-after-days",
                "30",
                "--archive-buffer-seconds",
                "60",
            ])
            .env("AWS_ENDPOINT_URL", &aws),
    );
    let source = KinesisSource::from_env(&stream)
        .await
        .expect("a Kinesis client");

    // The gateway: CoAP, and the MQTT bridge with a persistent session of
    // the run's own (QoS 1 messages wait in Mosquitto while it is down).
    let coap_port = tests::gateway::free_udp_port();
    let gateway_port = tests::free_port();
    let client_id = format!("chaos-gateway-{}", std::process::id());
    let mqtt_url = env("INGEST_MQTT_URL");
    let (gateway_stream, gateway_ingest, gateway_mqtt, gateway_client_id) = (
        stream.clone(),
        ingest.clone(),
        mqtt_url.clone(),
        client_id.clone(),
    );
    let mut gateway = Service::new("gateway", &run_dir, &pids, move || {
        let mut command = Command::new(&gateway_ingest);
        command
            .args(["gateway", "--stream", &gateway_stream])
            .args(["--coap-bind", &format!("127.0.0.1:{coap_port}")])
            .args([
                "--mqtt-url",
                &gateway_mqtt,
                "--mqtt-topic",
                "devices/+/telemetry",
            ])
            .args(["--mqtt-client-id", &gateway_client_id])
            .args(["--metrics-addr", &format!("127.0.0.1:{gateway_port}")])
            .env("RUST_LOG", "info");
        command
    });
    gateway.start();

    let mut workers = Vec::new();
    let mut worker_ports = Vec::new();
    for i in 1..=args.workers {
        let port = tests::free_port();
        worker_ports.push(port);
        let (stream, ingest, url, dns, delivery, aws) = (
            stream.clone(),
            ingest.clone(),
            consul_url.clone(),
            consul_dns.clone(),
            delivery.clone(),
            aws.clone(),
        );
        let mut worker = Service::new(&format!("consumer-{i}"), &run_dir, &pids, move || {
            let mut command = Command::new(&ingest);
            command
                .args([
                    "consume",
                    "--stream",
                    &stream,
                    "--worker-id",
                    &format!("chaos-{i}"),
                ])
                .args(["--database-url", &url, "--consul-dns", &dns])
                .args(["--archive-delivery-stream", &delivery])
                .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
                .args([
                    "--lease-ttl",
                    &format!("{}s", LEASE_TTL.as_secs()),
                    "--lease-interval",
                    "1s",
                ])
                .args(["--shard-sync-interval", "5s"])
                .args([
                    "--shutdown-grace",
                    &format!("{}s", SHUTDOWN_GRACE.as_secs()),
                ])
                .env("AWS_ENDPOINT_URL", &aws)
                .env("RUST_LOG", "info,tokio_postgres=warn");
            command
        });
        worker.start();
        workers.push(worker);
    }
    wait_until(
        "the gateway's MQTT bridge did not subscribe",
        Duration::from_secs(60),
        || {
            tests::http_get(gateway_port, "/metrics")
                .is_ok_and(|(_, body)| body.contains("ingest_gateway_mqtt_subscribed 1"))
        },
    );
    for &port in &worker_ports {
        wait_until(
            "a worker did not serve /healthz",
            Duration::from_secs(60),
            || tests::http_get(port, "/healthz").is_ok_and(|(status, _)| status == 200),
        );
    }

    let observed = Arc::new(Mutex::new(Observed::default()));
    let stop_monitor = Arc::new(AtomicBool::new(false));
    let monitor_thread = {
        let (ports, pids, observed, stop) = (
            worker_ports.clone(),
            pids.clone(),
            observed.clone(),
            stop_monitor.clone(),
        );
        std::thread::spawn(move || monitor(ports, pids, observed, stop))
    };

    let report_file = run_dir.join("loadgen.json");
    let mut loadgen = Command::new(tests::loadgen_bin())
        .args([
            "--devices",
            &args.devices.to_string(),
            "--protocol",
            "mixed",
        ])
        // Every message is acknowledged: a NON message sent while the
        // gateway is down is lost by design, and nothing could tell.
        .args(["--coap-non-share", "0"])
        .args(["--duration", &format!("{}s", args.duration.as_secs())])
        .args(["--seed", &seed.to_string()])
        .args([
            "--mqtt-url",
            &mqtt_url,
            "--coap-addr",
            &format!("127.0.0.1:{coap_port}"),
        ])
        .args([
            "--verify-database-url",
            &database.writable_url(),
            "--verify-timeout",
            "300s",
        ])
        .arg("--json")
        .arg(&report_file)
        .arg("--quiet")
        .stdout(std::fs::File::create(run_dir.join("loadgen.txt")).unwrap())
        .stderr(std::fs::File::create(run_dir.join("loadgen.log")).unwrap())
        .spawn()
        .expect("loadgen starts");
    pids.lock().unwrap().insert("loadgen".into(), loadgen.id());

    let mut pipeline = Pipeline {
        database,
        gateway,
        workers,
        moto,
        source,
        run_started: Instant::now(),
        log: std::fs::File::create(run_dir.join("faults.log")).unwrap(),
        reshards: 0,
        findings: Vec::new(),
    };

    // Faults from the end of loadgen's warm-up to 15 s before its window
    // ends: every kind once in a shuffled order, then at random (a worker
    // kill three times as likely as the rest).
    let faults_from = pipeline.run_started + Duration::from_secs(8);
    let faults_until = pipeline.run_started + args.duration.saturating_sub(Duration::from_secs(10));
    let mut first_round = Fault::ALL.to_vec();
    for i in (1..first_round.len()).rev() {
        first_round.swap(i, rng.below(i + 1));
    }
    let mut injected: Vec<Injected> = Vec::new();
    tokio::time::sleep_until(faults_from.into()).await;
    while Instant::now() < faults_until {
        let fault = if injected.len() < first_round.len() {
            first_round[injected.len()]
        } else {
            let pick = rng.below(Fault::ALL.len() + 2);
            Fault::ALL.get(pick).copied().unwrap_or(Fault::KillWorker)
        };
        let at = Instant::now();
        let wall_micros = ingest::decode::now_micros();
        pipeline.say(&format!("{} ...", fault.name()));
        let detail = pipeline.inject(fault, &mut rng).await;
        pipeline.say(&format!("{}: {detail}", fault.name()));
        injected.push(Injected {
            fault,
            at,
            wall_micros,
            detail,
        });
        pipeline.restart_crashed();
        tokio::time::sleep(rng.millis(2000, 6000)).await;
    }
    let faults_over = Instant::now();
    pipeline.say(&format!(
        "faults over: {} injected; waiting for loadgen",
        injected.len()
    ));

    let loadgen_status = tokio::task::spawn_blocking(move || loadgen.wait())
        .await
        .expect("the wait")
        .expect("loadgen ran");
    pipeline.restart_crashed();
    pipeline.say(&format!("loadgen exited with {loadgen_status}; checking"));

    let gateway_kills: Vec<i64> = injected
        .iter()
        .filter(|one| one.fault == Fault::KillGateway)
        .map(|one| one.wall_micros)
        .collect();
    let mut checks = check(&pipeline, &report_file, &bucket, &aws, &gateway_kills).await;
    checks.findings = pipeline.findings.clone();
    // The run's gateway is done: its session must not queue on in the
    // stack's broker.
    pipeline.gateway.kill();
    tests::gateway::end_mqtt_session(&client_id);
    stop_monitor.store(true, Ordering::SeqCst);
    let _ = monitor_thread.join();
    let table = table(
        &injected,
        &observed.lock().unwrap(),
        (pipeline.run_started, faults_over),
        &checks,
    );
    println!("{table}");
    std::fs::write(run_dir.join("summary.txt"), &table).expect("the summary");

    let _ = tokio::time::timeout(Duration::from_secs(5), pipeline.source.delete_stream()).await;
    if checks.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// What the checks found.
#[derive(Debug, Default)]
struct Checks {
    sent: u64,
    acked: u64,
    loadgen_lost: u64,
    loadgen_duplicated: u64,
    loadgen_failed_found: u64,
    loadgen_error: Option<String>,
    stream_records: usize,
    stream_duplicates: usize,
    expected_rows: usize,
    missing_rows: usize,
    extra_rows: usize,
    doubled_rows: i64,
    dead_letters: Vec<(String, i64)>,
    archive_missing: usize,
    order_violations: usize,
    /// The first few steps back, described.
    order_examples: Vec<String>,
    resent_after_restart: usize,
    undrained: Vec<String>,
    findings: Vec<String>,
    end_to_end: Option<(f64, f64)>,
}

impl Checks {
    fn passed(&self) -> bool {
        self.findings.is_empty()
            && self.loadgen_error.is_none()
            && self.loadgen_lost == 0
            && self.loadgen_duplicated == 0
            && self.loadgen_failed_found == 0
            && self.missing_rows == 0
            && self.extra_rows == 0
            && self.doubled_rows == 0
            && self.archive_missing == 0
            && self.order_violations == 0
            && self.undrained.is_empty()
    }
}

/// Short ids for the names the check meets (shards, houses, devices,
/// metrics), so that the keys of millions of readings fit in memory.
#[derive(Default)]
struct Names(HashMap<String, u32>);

impl Names {
    fn id(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.0.get(name) {
            return id;
        }
        let id = self.0.len() as u32;
        self.0.insert(name.to_owned(), id);
        id
    }

    fn get(&self, name: &str) -> Option<u32> {
        self.0.get(name).copied()
    }
}

/// What the stream, read to its end, says the database and the archive
/// must hold: kept as ids and digests, not records, so that a long run's
/// tens of millions of readings fit in memory.
#[derive(Default)]
struct StreamFacts {
    names: Names,
    /// The MD5 of each distinct record as an archive line (newlines as
    /// spaces): records that differ only there count as one.
    distinct: HashSet<[u8; 16]>,
    /// Each sample a distinct record carries: (house, device, metric, time).
    expected: HashSet<(u32, u32, u32, i64)>,
    /// Each shard's last sequence number.
    last_of: BTreeMap<String, String>,
    /// Each device's latest reading time so far, per shard.
    latest: HashMap<(u32, u32), i64>,
    /// (shard, device, time) seen: a copy is not a step back.
    seen_in_shard: HashSet<(u32, u32, i64)>,
}

/// The archive line of a record: the record with newlines as spaces.
fn archive_line(data: &[u8]) -> Vec<u8> {
    data.iter()
        .map(|&b| if b == b'\n' { b' ' } else { b })
        .collect()
}

fn digest(line: &[u8]) -> [u8; 16] {
    md5::Md5::digest(line).into()
}

impl StreamFacts {
    /// Takes in one user record read from `shard`.
    fn observe(
        &mut self,
        shard: &str,
        record: &ingest::source::kinesis::Record,
        decoder: &mut Decoder,
        gateway_kills: &[i64],
        checks: &mut Checks,
    ) {
        checks.stream_records += 1;
        self.last_of
            .insert(shard.to_owned(), record.sequence_number.clone());
        if !self.distinct.insert(digest(&archive_line(&record.data))) {
            checks.stream_duplicates += 1;
        }
        let Ok(reading) = decoder.decode(&record.data, ingest::decode::now_micros()) else {
            return;
        };
        let house = self.names.id(&reading.house);
        let device = self.names.id(&reading.device);
        for sample in &reading.samples {
            let metric = self.names.id(&sample.metric);
            self.expected.insert((house, device, metric, reading.time));
        }
        // Each device's readings in time order within a shard. Not a step
        // back: a record put twice (its first copy counts), and a message
        // sent before a gateway kill and put after it (its device sent the
        // next ones meanwhile and retransmitted it to the new gateway).
        let shard_id = self.names.id(shard);
        if !self.seen_in_shard.insert((shard_id, device, reading.time)) {
            return;
        }
        let latest = self.latest.entry((shard_id, device)).or_insert(i64::MIN);
        if reading.time < *latest {
            let resent = gateway_kills
                .iter()
                .any(|&kill| reading.time <= kill && kill <= record.arrival_micros);
            if resent {
                checks.resent_after_restart += 1;
            } else {
                checks.order_violations += 1;
                if checks.order_examples.len() < 5 {
                    checks.order_examples.push(format!(
                        "{} in {shard}: reading of {} (sequence {}, arrived {}) after one of {}",
                        reading.device,
                        reading.time,
                        record.sequence_number,
                        record.arrival_micros,
                        *latest
                    ));
                }
            }
        }
        *latest = reading.time.max(*latest);
    }
}

/// Every record of every shard, KPL aggregates taken apart, read from the
/// start to the end of closed shards and until open ones are quiet, each
/// handed to `each` with its shard as it comes.
async fn read_whole_stream(
    source: &KinesisSource,
    mut each: impl FnMut(&str, &ingest::source::kinesis::Record),
) {
    for shard in source.list_shards().await.expect("the shards") {
        let mut reader = source
            .shard_reader(
                &shard.shard_id,
                StartPosition::TrimHorizon,
                ReaderOptions::default(),
            )
            .await;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), reader.next()).await {
                Ok(Ok(Fetched::Records { records, .. })) => {
                    for record in tests::gateway::user_records(records) {
                        each(&shard.shard_id, &record);
                    }
                }
                Ok(Ok(Fetched::EndOfShard)) | Err(_) => break,
                Ok(Err(error)) => panic!("reading {}: {error}", shard.shard_id),
            }
        }
    }
}

async fn check(
    pipeline: &Pipeline,
    report_file: &Path,
    bucket: &str,
    aws: &str,
    gateway_kills: &[i64],
) -> Checks {
    let mut checks = Checks::default();

    // loadgen's verification: every acknowledged message once.
    match std::fs::read(report_file).map(|b| serde_json::from_slice::<serde_json::Value>(&b)) {
        Ok(Ok(report)) => {
            for protocol in report["protocols"]
                .as_object()
                .into_iter()
                .flat_map(|p| p.values())
            {
                checks.sent += protocol["sent"].as_u64().unwrap_or(0);
                checks.acked += protocol["acked"].as_u64().unwrap_or(0);
            }
            let v = &report["verification"];
            checks.loadgen_lost = v["lost"].as_u64().unwrap_or(0);
            checks.loadgen_duplicated = v["duplicated"].as_u64().unwrap_or(0);
            checks.loadgen_failed_found = v["failed_found"].as_u64().unwrap_or(0);
            if v.is_null() {
                checks.loadgen_error = Some("loadgen did not verify".into());
            }
            if let (Some(p50), Some(p99)) = (
                v["end_to_end"]["p50_ms"].as_f64(),
                v["end_to_end"]["p99_ms"].as_f64(),
            ) {
                checks.end_to_end = Some((p50, p99));
            }
        }
        _ => checks.loadgen_error = Some(format!("no report in {}", report_file.display())),
    }

    // The stream, read independently.
    let mut facts = StreamFacts::default();
    let mut decoder = Decoder::new(DecodeLimits::default());
    read_whole_stream(&pipeline.source, |shard, record| {
        facts.observe(shard, record, &mut decoder, gateway_kills, &mut checks);
    })
    .await;
    let mut client = tests::connect(&pipeline.database.writable_url()).await;

    // Every shard drained: each lease's checkpoint at its shard's last record.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rows = client
            .query(
                "SELECT shard_id, checkpoint, ended FROM ingest.shard_leases",
                &[],
            )
            .await
            .expect("the leases");
        let at: HashMap<String, (Option<String>, bool)> = rows
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        checks.undrained = facts
            .last_of
            .iter()
            .filter(|(shard, last)| {
                !at.get(*shard)
                    .is_some_and(|(checkpoint, ended)| *ended || checkpoint.as_ref() == Some(*last))
            })
            .map(|(shard, _)| shard.clone())
            .collect();
        if checks.undrained.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // The database against the stream: each distinct record's samples
    // once, and nothing else. Read through a cursor, a slice at a time.
    checks.expected_rows = facts.expected.len();
    let mut unseen = std::mem::take(&mut facts.expected);
    let transaction = client.transaction().await.expect("a transaction");
    transaction
        .batch_execute(
            "DECLARE samples NO SCROLL CURSOR FOR \
             SELECT s.house, s.device, s.metric, \
                    (extract(epoch FROM x.time) * 1000000)::int8, count(*) \
             FROM telemetry.samples x JOIN telemetry.series s USING (series_id) \
             GROUP BY 1, 2, 3, 4",
        )
        .await
        .expect("the samples");
    loop {
        let rows = transaction
            .query("FETCH 100000 FROM samples", &[])
            .await
            .expect("the samples");
        if rows.is_empty() {
            break;
        }
        for row in &rows {
            let key = (
                facts.names.get(row.get(0)),
                facts.names.get(row.get(1)),
                facts.names.get(row.get(2)),
                row.get::<_, i64>(3),
            );
            checks.doubled_rows += row.get::<_, i64>(4) - 1;
            let found = match key {
                (Some(house), Some(device), Some(metric), time) => {
                    unseen.remove(&(house, device, metric, time))
                }
                _ => false,
            };
            if !found {
                checks.extra_rows += 1;
            }
        }
    }
    transaction.commit().await.expect("the samples read");
    checks.missing_rows = unseen.len();
    drop(unseen);
    checks.dead_letters = client
        .query(
            "SELECT reason_kind, count(*) FROM ingest.dead_letters GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .expect("the dead letters")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    // The archive: every record read is there (a line each, newlines as spaces).
    let mut unarchived = std::mem::take(&mut facts.distinct);
    tests::archive::for_each_archived_line(bucket, Some(aws), |line| {
        unarchived.remove(&digest(line));
    })
    .await;
    checks.archive_missing = unarchived.len();
    checks
}

/// The summary: faults by kind with the longest time without commits after
/// each, the messages, the checks, and each process's peak memory.
/// `times`: when the run started and when the faults were over (the load
/// goes on a little longer, then stops: no commits after that are expected).
fn table(
    injected: &[Injected],
    observed: &Observed,
    times: (Instant, Instant),
    checks: &Checks,
) -> String {
    let (started, faults_over) = times;
    let mut out = String::new();
    let _ = writeln!(out, "\n== chaos summary");
    let _ = writeln!(
        out,
        "  {:<24} {:>5}  {:>28}",
        "fault", "count", "longest without commits after"
    );
    for fault in Fault::ALL {
        let mut count = 0;
        let mut longest = Duration::ZERO;
        for (i, one) in injected
            .iter()
            .enumerate()
            .filter(|(_, f)| f.fault == fault)
        {
            count += 1;
            // From the fault, commit to commit, until the first commit after
            // the next fault (or the end).
            let until = injected.get(i + 1).map_or(faults_over, |next| next.at);
            let mut previous = one.at;
            loop {
                let next = observed.commits.partition_point(|&c| c <= previous);
                match observed.commits.get(next) {
                    Some(&commit) => {
                        longest = longest.max(commit - previous);
                        if commit > until {
                            break;
                        }
                        previous = commit;
                    }
                    None => {
                        longest = longest.max(faults_over.saturating_duration_since(previous));
                        break;
                    }
                }
            }
        }
        let _ = writeln!(
            out,
            "  {:<24} {count:>5}  {:>27.1}s",
            fault.name(),
            longest.as_secs_f64()
        );
    }
    let _ = writeln!(
        out,
        "  faults in all: {} in the first {:.0}s of the run",
        injected.len(),
        faults_over.duration_since(started).as_secs_f64()
    );
    for one in injected {
        let _ = writeln!(
            out,
            "    +{:6.1}s {}: {}",
            (one.at - started).as_secs_f64(),
            one.fault.name(),
            one.detail
        );
    }
    let _ = writeln!(
        out,
        "  messages: {} sent, {} acknowledged",
        checks.sent, checks.acked
    );
    let _ = writeln!(
        out,
        "  loadgen's verification: {} lost, {} duplicated, {} refused yet found{}",
        checks.loadgen_lost,
        checks.loadgen_duplicated,
        checks.loadgen_failed_found,
        checks
            .loadgen_error
            .as_ref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    );
    if let Some((p50, p99)) = checks.end_to_end {
        let _ = writeln!(
            out,
            "  end to end (device time to commit): p50 {p50:.0} ms, p99 {p99:.0} ms"
        );
    }
    let _ = writeln!(
        out,
        "  the stream: {} user records ({} put twice by the gateway)",
        checks.stream_records, checks.stream_duplicates
    );
    let _ = writeln!(
        out,
        "  the database against the stream: {} readings expected, {} missing, {} not in the stream, {} doubled",
        checks.expected_rows, checks.missing_rows, checks.extra_rows, checks.doubled_rows
    );
    let dead: Vec<String> = checks
        .dead_letters
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    let _ = writeln!(
        out,
        "  dead letters: {}",
        if dead.is_empty() {
            "none".into()
        } else {
            dead.join(", ")
        }
    );
    let _ = writeln!(
        out,
        "  the archive: {} distinct records of the stream missing",
        checks.archive_missing
    );
    let _ = writeln!(
        out,
        "  per-device order within each shard: {} steps back ({} more were messages sent before a gateway kill and put after it)",
        checks.order_violations, checks.resent_after_restart
    );
    for example in &checks.order_examples {
        let _ = writeln!(out, "    step back: {example}");
    }
    let _ = writeln!(
        out,
        "  shards drained: {}",
        if checks.undrained.is_empty() {
            "all".to_string()
        } else {
            format!("NOT {:?}", checks.undrained)
        }
    );
    let _ = writeln!(
        out,
        "  processes: {}",
        if checks.findings.is_empty() {
            "none exited by itself, every SIGTERM within its bound".to_string()
        } else {
            checks.findings.join("; ")
        }
    );
    let peaks: Vec<String> = observed
        .peak_rss_kib
        .iter()
        .map(|(kind, kib)| format!("{kind} {:.0} MiB", *kib as f64 / 1024.0))
        .collect();
    let _ = writeln!(
        out,
        "  peak RSS (the largest process of each kind): {}",
        peaks.join(", ")
    );
    let _ = writeln!(
        out,
        "chaos: {}",
        if checks.passed() {
            "PASSED: nothing lost, nothing doubled"
        } else {
            "FAILED: see above"
        }
    );
    out
}
