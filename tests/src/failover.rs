//! A Patroni-like cluster on loopback for failover tests: a primary and a
//! streaming standby (pg_basebackup), each a real PostgreSQL 15 on its own
//! loopback address, and a real dnsmasq answering a Consul name with the
//! current primary. Everything lives under one temporary folder and is
//! stopped when dropped.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Runs a PostgreSQL program as the `postgres` user; panics with its output on failure.
fn pg(program: &str, args: &[&str]) {
    let output = Command::new("runuser")
        .args(["-u", "postgres", "--", &format!("{PG_BIN}/{program}")])
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} (PostgreSQL 15 comes with `dev/stack up`): {e}")
        });
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// One PostgreSQL server of the pair.
#[derive(Debug)]
pub struct PgServer {
    pub dir: PathBuf,
    pub address: Ipv4Addr,
    pub port: u16,
    running: bool,
}

impl PgServer {
    /// A URL for the `postgres` role (trust auth on loopback) to `database` on this server.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@{}:{}/{database}",
            self.address, self.port
        )
    }

    fn start(&mut self) {
        let log = self.dir.with_extension("log");
        pg(
            "pg_ctl",
            &[
                "-D",
                self.dir.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        self.running = true;
    }

    /// A clean stop: the standby receives everything the primary committed.
    pub fn stop(&mut self) {
        pg(
            "pg_ctl",
            &["-D", self.dir.to_str().unwrap(), "-m", "fast", "-w", "stop"],
        );
        self.running = false;
    }

    /// Makes a standby the primary and waits until it accepts writes.
    pub fn promote(&mut self) {
        pg(
            "pg_ctl",
            &["-D", self.dir.to_str().unwrap(), "-w", "promote"],
        );
    }

    /// Settings that both servers get (the standby copies them with the data).
    fn configure(&self, extra: &str) {
        // Sockets outside the data folder, so the standby's copy has no stale lock.
        let sockets = self.dir.with_extension("sockets");
        std::fs::create_dir_all(&sockets).unwrap();
        let chown = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&sockets)
            .status()
            .unwrap();
        assert!(chown.success(), "chown postgres {}", sockets.display());
        let conf = format!(
            "listen_addresses = '{}'\nport = {}\nunix_socket_directories = '{}'\n\
             wal_level = replica\nmax_wal_senders = 5\nhot_standby = on\nfsync = off\n\
             shared_buffers = 32MB\nmax_connections = 50\n{extra}",
            self.address,
            self.port,
            sockets.display()
        );
        // Later lines win, so this overrides what initdb or the copy wrote.
        let file = self.dir.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&file).unwrap_or_default();
        text.push_str(&conf);
        std::fs::write(&file, text).expect("write the configuration");
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop_quietly();
    }
}

impl PgServer {
    /// A new server in `dir` (created), on `address:port`, with `hba` as its
    /// pg_hba.conf and `extra` settings, started.
    pub fn init(dir: PathBuf, address: Ipv4Addr, port: u16, hba: &str, extra: &str) -> PgServer {
        let mut server = PgServer {
            dir,
            address,
            port,
            running: false,
        };
        pg(
            "initdb",
            &[
                "-D",
                server.dir.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
            ],
        );
        std::fs::write(server.dir.join("pg_hba.conf"), hba).unwrap();
        server.configure(extra);
        server.start();
        server
    }
}

/// A folder for servers run as `postgres`, removed when dropped.
#[derive(Debug)]
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(test_name: &str) -> Scratch {
        let path = std::env::temp_dir().join(format!("ingest-{test_name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        let chown = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(chown.success(), "chown postgres {}", path.display());
        Scratch { path }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A primary, its standby, and the DNS that says which is which. (Fields
/// drop in order: the servers stop before their folder goes.)
#[derive(Debug)]
pub struct FailoverCluster {
    pub primary: PgServer,
    pub standby: PgServer,
    pub dns: ConsulDns,
    /// Held for its Drop: the folder goes after the servers stop.
    _scratch: Scratch,
}

impl FailoverCluster {
    /// Starts a primary on 127.0.0.2 and a standby on 127.0.0.3 (same port),
    /// and a DNS answering `name` with the primary.
    pub fn start(test_name: &str, name: &str) -> FailoverCluster {
        let scratch = Scratch::new(test_name);
        let port = crate::free_port();
        let primary = PgServer::init(
            scratch.path.join("primary"),
            Ipv4Addr::new(127, 0, 0, 2),
            port,
            "local all all trust\nhost all all 127.0.0.0/8 trust\nhost replication all 127.0.0.0/8 trust\n",
            "",
        );
        let standby = PgServer::standby_of(
            &primary,
            scratch.path.join("standby"),
            Ipv4Addr::new(127, 0, 0, 3),
        );

        let dns = ConsulDns::start(&scratch.path.join("dns"), name, primary.address, None);
        FailoverCluster {
            primary,
            standby,
            dns,
            _scratch: scratch,
        }
    }

    /// What a Patroni failover does: stop the primary, promote the standby,
    /// point the Consul name at it. Returns when the new primary takes writes.
    pub fn fail_over(&mut self) {
        self.primary.stop();
        self.standby.promote();
        self.dns.point_at(self.standby.address);
    }
}

impl PgServer {
    /// A streaming standby of `primary` (a copy by pg_basebackup) in `dir`,
    /// on `address` and the primary's port, started.
    pub fn standby_of(primary: &PgServer, dir: PathBuf, address: Ipv4Addr) -> PgServer {
        let mut standby = PgServer {
            dir,
            address,
            port: primary.port,
            running: false,
        };
        pg(
            "pg_basebackup",
            &[
                "-h",
                &primary.address.to_string(),
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
                "-D",
                standby.dir.to_str().unwrap(),
                "-R",
                "-X",
                "stream",
                // An immediate checkpoint: a spread one can take minutes.
                "--checkpoint=fast",
            ],
        );
        standby.configure("");
        standby.start();
        standby
    }

    /// What Patroni does with a failed primary: its data is replaced by a
    /// fresh copy of `primary`'s, and it runs again as that one's standby.
    pub fn rebuild_as_standby_of(&mut self, primary: &PgServer) {
        self.stop_quietly();
        std::fs::remove_dir_all(&self.dir).expect("remove the old data");
        *self = PgServer::standby_of(primary, self.dir.clone(), self.address);
    }

    fn stop_quietly(&mut self) {
        if self.running {
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--", &format!("{PG_BIN}/pg_ctl"), "-D"])
                .arg(&self.dir)
                .args(["-m", "immediate", "-w", "stop"])
                .output();
            self.running = false;
        }
    }
}

/// A real dnsmasq answering one Consul name, with TTL 0 as Consul does.
#[derive(Debug)]
pub struct ConsulDns {
    pub port: u16,
    name: String,
    hosts_file: PathBuf,
    child: Child,
}

impl ConsulDns {
    /// Answers `name` with `address` on 127.0.0.1:`port` (a free port when None).
    pub fn start(dir: &Path, name: &str, address: Ipv4Addr, port: Option<u16>) -> ConsulDns {
        let hosts = dir.join("hosts");
        std::fs::create_dir_all(&hosts).unwrap();
        let hosts_file = hosts.join("consul");
        std::fs::write(&hosts_file, format!("{address} {name}\n")).unwrap();
        let port = port.unwrap_or_else(crate::free_port);
        let child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
                "--bind-interfaces",
            ])
            .args([
                "--listen-address=127.0.0.1",
                "--local-ttl=0",
                "--user=root",
                "--local=/consul/",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--hostsdir={}", hosts.display()))
            .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start dnsmasq (dev/stack up installs it): {e}"));
        let dns = ConsulDns {
            port,
            name: name.to_string(),
            hosts_file,
            child,
        };
        dns.wait_for(address);
        dns
    }

    /// Repoints the name. The file is rewritten in place: dnsmasq watches the
    /// folder and re-reads it.
    pub fn point_at(&self, address: Ipv4Addr) {
        std::fs::write(&self.hosts_file, format!("{address} {}\n", self.name)).unwrap();
        self.wait_for(address);
    }

    /// Waits until `dig` gets `address` for the name.
    fn wait_for(&self, address: Ipv4Addr) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let answer = Command::new("dig")
                .args([
                    "+short",
                    "+time=1",
                    "+tries=1",
                    "-p",
                    &self.port.to_string(),
                    "@127.0.0.1",
                    &self.name,
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            if answer == address.to_string() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "dnsmasq never answered {} with {address} (last: {answer:?})",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// "127.0.0.1:port", for --consul-dns.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for ConsulDns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
