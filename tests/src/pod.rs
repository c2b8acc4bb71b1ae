//! Running a container of a rendered pod as a local process, the way the
//! kubelet would run it, so that a chart is tested by what it makes the
//! binary do rather than by what its YAML looks like.
//!
//! From the pod spec it takes the container's command, args and env; env
//! from `value`, `fieldRef` (metadata.name, metadata.namespace) and
//! `secretKeyRef`, and `$(VAR)` references in args and env expanded as the
//! kubelet does. Secret volumes are written under a scratch root in the
//! kubelet's layout (a timestamped folder, `..data`, one link per key) and
//! the mount paths in args and env are moved there; every absolute path the
//! container is given must lie on one of its mounts. Each declared container
//! port gets a free loopback port, and `0.0.0.0:<containerPort>` in args and
//! env becomes `127.0.0.1:<that port>`: a process that binds elsewhere is
//! not found by its probes. Probes are HTTP GETs at the rendered path on the
//! named port.
//!
//! Functions return `Err` with what is wrong instead of panicking, so a test
//! can also show that a broken pod is refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::gateway::free_udp_port;
use crate::{free_port, http_get, ingest_bin};

/// Secrets the pods may use: name -> key -> content. The ones the README
/// tells an operator to create.
pub type Secrets = BTreeMap<String, BTreeMap<String, String>>;

/// A container port as the pod declares it, and where it is on loopback.
#[derive(Debug, Clone)]
pub struct Port {
    /// Its name in the pod spec.
    pub name: String,
    /// containerPort.
    pub container: u16,
    /// TCP or UDP.
    pub protocol: String,
    /// The loopback port standing for it.
    pub host: u16,
}

/// One container of a rendered pod, prepared to run here.
#[derive(Debug)]
pub struct PreparedContainer {
    /// The pod's name (what `fieldRef: metadata.name` gives).
    pub pod_name: String,
    /// The container's name.
    pub container_name: String,
    /// The program and its arguments, as they will run.
    pub argv: Vec<String>,
    /// The environment, as it will be (nothing else is inherited but `outside`).
    pub env: BTreeMap<String, String>,
    /// Its declared ports.
    pub ports: Vec<Port>,
    /// The container spec, for its probes.
    pub spec: Value,
    /// Where its volumes are.
    pub root: PathBuf,
}

/// Prepares container `container_name` of `pod_spec` as pod `pod_name` in
/// `namespace`: volumes written under `root`, paths and ports moved.
pub fn prepare(
    pod_spec: &Value,
    container_name: &str,
    pod_name: &str,
    namespace: &str,
    secrets: &Secrets,
    root: &Path,
) -> Result<PreparedContainer, String> {
    let containers = pod_spec["containers"].as_array().ok_or("no containers")?;
    let container = containers
        .iter()
        .find(|c| c["name"] == container_name)
        .ok_or_else(|| format!("no container {container_name}"))?;
    let root = root.join(pod_name);

    // Volumes: secrets written as the kubelet writes them; mounts to move.
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let volume_name = mount["name"]
            .as_str()
            .ok_or("a volumeMount without a name")?;
        let mount_path = mount["mountPath"]
            .as_str()
            .ok_or("a volumeMount without a mountPath")?;
        let volume = pod_spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == volume_name)
            .ok_or_else(|| format!("volumeMount {volume_name} names no volume of the pod"))?;
        let local = root.join(mount_path.trim_start_matches('/'));
        write_secret_volume(volume, secrets, &local)?;
        mounts.push((mount_path.to_string(), local));
    }

    let ports = container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|port| {
            let protocol = port["protocol"].as_str().unwrap_or("TCP").to_string();
            Port {
                name: port["name"].as_str().unwrap_or_default().to_string(),
                container: port["containerPort"].as_u64().expect("containerPort") as u16,
                host: if protocol == "UDP" {
                    free_udp_port()
                } else {
                    free_port()
                },
                protocol,
            }
        })
        .collect::<Vec<_>>();
    // What the binary takes as a file or folder (its help says FILE or PATH),
    // and which INGEST_* variables it knows.
    let subcommand = container["args"][0].as_str().unwrap_or_default();
    let help = Help::of(subcommand)?;
    // A pod's value as it means here: its ports moved and, for a path, its
    // mount moved; a path on no mount is an error, as it would be in the pod.
    let localize = |value: &str, is_path: bool| -> Result<String, String> {
        let mut value = value.to_string();
        for port in &ports {
            value = value.replace(
                &format!("0.0.0.0:{}", port.container),
                &format!("127.0.0.1:{}", port.host),
            );
        }
        if !is_path {
            return Ok(value);
        }
        let (mount_path, local) = mounts
            .iter()
            .find(|(mount_path, _)| {
                value == *mount_path || value.starts_with(&format!("{mount_path}/"))
            })
            .ok_or_else(|| {
                format!(
                    "{container_name} is given the path {value}, which is on none of its \
                     volume mounts {:?}",
                    mounts.iter().map(|(m, _)| m).collect::<Vec<_>>()
                )
            })?;
        Ok(format!("{}{}", local.display(), &value[mount_path.len()..]))
    };

    // The environment, in order, each value able to refer to earlier ones.
    let mut env = BTreeMap::new();
    for variable in container["env"].as_array().into_iter().flatten() {
        let name = variable["name"]
            .as_str()
            .ok_or("an env entry without a name")?;
        if name.starts_with("INGEST_") && !help.env.contains_key(name) {
            return Err(format!(
                "env {name}: `ingest {subcommand}` knows no such variable (see its --help)"
            ));
        }
        let raw = if let Some(value) = variable.get("value") {
            value.as_str().unwrap_or_default().to_string()
        } else if let Some(field) = variable["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            match field {
                "metadata.name" => pod_name.to_string(),
                "metadata.namespace" => namespace.to_string(),
                other => return Err(format!("env {name}: fieldRef {other} is not simulated")),
            }
        } else if let Some(reference) = variable["valueFrom"].get("secretKeyRef") {
            let secret = reference["name"].as_str().unwrap_or_default();
            let key = reference["key"].as_str().unwrap_or_default();
            secrets
                .get(secret)
                .and_then(|keys| keys.get(key))
                .ok_or_else(|| format!("env {name}: Secret {secret} has no key {key}"))?
                .clone()
        } else {
            return Err(format!("env {name}: neither a value nor a known valueFrom"));
        };
        let is_path = help
            .env
            .get(name)
            .is_some_and(|flag| help.paths.contains(flag));
        let value = localize(&expand(&raw, &env), is_path)?;
        env.insert(name.to_string(), value);
    }

    let command: Vec<String> = strings(&container["command"]);
    if command != ["ingest"] {
        return Err(format!(
            "{container_name}'s command is {command:?}: the image's binary is `ingest`"
        ));
    }
    let mut argv = vec![ingest_bin().display().to_string()];
    let mut next_is_path = false;
    for arg in strings(&container["args"]) {
        let arg = expand(&arg, &env);
        let localized = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                format!("{flag}={}", localize(value, help.paths.contains(flag))?)
            }
            _ => localize(&arg, next_is_path)?,
        };
        next_is_path = help.paths.contains(arg.as_str());
        argv.push(localized);
    }
    Ok(PreparedContainer {
        pod_name: pod_name.to_string(),
        container_name: container_name.to_string(),
        argv,
        env,
        ports,
        spec: container.clone(),
        root,
    })
}

/// Writes a secret volume at `local` as the kubelet does: the files in a
/// timestamped folder, `..data` linking to it, one link per file.
fn write_secret_volume(volume: &Value, secrets: &Secrets, local: &Path) -> Result<(), String> {
    let name = volume["name"].as_str().unwrap_or_default();
    let secret_name = volume["secret"]["secretName"]
        .as_str()
        .ok_or_else(|| format!("volume {name} is not a Secret volume (not simulated)"))?;
    let keys = secrets
        .get(secret_name)
        .ok_or_else(|| format!("volume {name}: no Secret {secret_name} exists"))?;
    let files: Vec<(String, String)> = match volume["secret"]["items"].as_array() {
        Some(items) => items
            .iter()
            .map(|item| {
                let key = item["key"].as_str().unwrap_or_default();
                let content = keys.get(key).ok_or_else(|| {
                    format!("volume {name}: Secret {secret_name} has no key {key}")
                })?;
                Ok((
                    item["path"].as_str().unwrap_or(key).to_string(),
                    content.clone(),
                ))
            })
            .collect::<Result<_, String>>()?,
        None => keys.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    };
    let _ = std::fs::remove_dir_all(local);
    let stamp = local.join("..2026_01_01_00_00_00.000000001");
    std::fs::create_dir_all(&stamp).map_err(|e| format!("{}: {e}", stamp.display()))?;
    std::os::unix::fs::symlink("..2026_01_01_00_00_00.000000001", local.join("..data"))
        .map_err(|e| e.to_string())?;
    // The files' mode, as the kubelet sets it (0644 unless the volume says).
    let mode = volume["secret"]["defaultMode"].as_u64().unwrap_or(0o644) as u32;
    for (path, content) in files {
        std::fs::write(stamp.join(&path), content).map_err(|e| e.to_string())?;
        std::fs::set_permissions(
            stamp.join(&path),
            std::os::unix::fs::PermissionsExt::from_mode(mode),
        )
        .map_err(|e| e.to_string())?;
        std::os::unix::fs::symlink(format!("..data/{path}"), local.join(&path))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// What `ingest <subcommand> --help` says about its flags.
#[derive(Debug, Default)]
struct Help {
    /// Flags whose value is a file or folder (value name FILE or PATH).
    paths: std::collections::BTreeSet<String>,
    /// INGEST_* variable -> its flag.
    env: BTreeMap<String, String>,
}

impl Help {
    fn of(subcommand: &str) -> Result<Help, String> {
        let output = Command::new(ingest_bin())
            .args([subcommand, "--help"])
            .output()
            .map_err(|e| e.to_string())?;
        if !output.status.success() {
            return Err(format!(
                "`ingest {subcommand} --help` failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let mut help = Help::default();
        let mut flag = String::new();
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let line = line.trim();
            // "-s, --long <VALUE>" or "--long <VALUE>" starts a flag's entry.
            let entry = line.split_once(", --").map_or(line, |(_, long)| long);
            if let Some(rest) = entry.strip_prefix("--") {
                let mut words = rest.split_whitespace();
                flag = format!("--{}", words.next().unwrap_or_default());
                if matches!(words.next(), Some("<FILE>" | "<PATH>")) {
                    help.paths.insert(flag.clone());
                }
            }
            if let Some((_, rest)) = line.split_once("[env: ") {
                // `[env: NAME=value]`, or `[env: NAME]` when values are hidden.
                let name = rest.split(['=', ']']).next().unwrap_or_default();
                help.env.insert(name.to_string(), flag.clone());
            }
        }
        Ok(help)
    }
}

/// `$(VAR)` replaced by earlier variables, as the kubelet expands args and env.
fn expand(text: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = text.to_string();
    for (name, value) in env {
        out = out.replace(&format!("$({name})"), value);
    }
    out
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v.as_str().expect("a string").to_string())
        .collect()
}

/// A running container; killed when dropped.
#[derive(Debug)]
pub struct RunningContainer {
    /// What runs.
    pub prepared: PreparedContainer,
    child: Child,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

impl PreparedContainer {
    /// The loopback port standing for the declared port `name`.
    pub fn port(&self, name: &str) -> Option<&Port> {
        self.ports.iter().find(|port| port.name == name)
    }

    /// Starts it with its own environment plus `outside` (what the cluster
    /// gives a pod besides the chart: IRSA's credentials, say).
    pub fn start(self, outside: &[(&str, &str)]) -> Result<RunningContainer, String> {
        let log = self.root.join(format!("{}.log", self.container_name));
        std::fs::create_dir_all(&self.root).map_err(|e| e.to_string())?;
        let file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let child = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .env_clear()
            .envs(&self.env)
            .envs(outside.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().map_err(|e| e.to_string())?)
            .stderr(file)
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", self.argv))?;
        Ok(RunningContainer {
            prepared: self,
            child,
            log,
        })
    }

    /// Runs it to its end, as a Job's pod: (success, output).
    pub fn run_to_end(
        self,
        outside: &[(&str, &str)],
        within: Duration,
    ) -> Result<(bool, String), String> {
        let mut running = self.start(outside)?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = running.child.try_wait().map_err(|e| e.to_string())? {
                return Ok((status.success(), running.log_text()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not finish within {within:?}:\n{}",
                    running.prepared.pod_name,
                    running.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl RunningContainer {
    /// Its output so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until its `probe` ("livenessProbe", "readinessProbe") answers
    /// 200. A 404 fails at once (a wrong path never becomes right), as does
    /// the process exiting; other answers are waited out until `within`.
    pub fn wait_for_probe(&mut self, probe: &str, within: Duration) -> Result<(), String> {
        let get = &self.prepared.spec[probe]["httpGet"];
        let path = get["path"]
            .as_str()
            .ok_or_else(|| format!("{} has no {probe} httpGet", self.prepared.container_name))?
            .to_string();
        let port = match &get["port"] {
            Value::String(name) => self.prepared.port(name).map(|p| p.host).ok_or_else(|| {
                format!("{probe} names port {name}, which the container does not declare")
            })?,
            Value::Number(number) => {
                let number = number.as_u64().unwrap_or_default() as u16;
                self.prepared
                    .ports
                    .iter()
                    .find(|p| p.container == number)
                    .map(|p| p.host)
                    .ok_or_else(|| format!("{probe} port {number} is not declared"))?
            }
            other => {
                return Err(format!(
                    "{probe} port {other} is neither a name nor a number"
                ));
            }
        };
        let deadline = Instant::now() + within;
        let mut last;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!(
                    "{} exited with {status} before its {probe} passed:\n{}",
                    self.prepared.pod_name,
                    self.log_text()
                ));
            }
            match http_get(port, &path) {
                Ok((200, _)) => return Ok(()),
                Ok((404, body)) => {
                    return Err(format!(
                        "{probe} GET {path}: 404 from {} ({body})",
                        self.prepared.pod_name
                    ));
                }
                Ok((code, body)) => last = format!("{code} {body}"),
                Err(error) => last = error.to_string(),
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} {probe} GET {path} did not pass within {within:?}: {last}\n{}",
                    self.prepared.pod_name,
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGTERM, as the kubelet stops a pod; the exit status, or `Err` if it
    /// is still running after `grace` (when the kubelet would SIGKILL it).
    pub fn terminate(&mut self, grace: Duration) -> Result<std::process::ExitStatus, String> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err("kill -TERM failed".into());
        }
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} still runs {grace:?} after SIGTERM:\n{}",
                    self.prepared.pod_name,
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RunningContainer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
