//! Per-device authentication of CoAP telemetry (the scheme is written out for
//! firmware authors in the README, "Signing CoAP requests").
//!
//! A key belongs to one (house, device): a signed request must name both in
//! its path, `/t/{house}/{device}`, so a device's key can neither write into
//! another house nor sign for another device. The signature is the hex
//! HMAC-SHA256, with that key, of the canonical string
//!
//! ```text
//! ingest-hmac-sha256-v1 \n METHOD \n /t/{house}/{device} \n TIME \n NONCE \n hex SHA-256 of the payload
//! ```
//!
//! (six lines joined by `\n`, no newline at the end), carried with its time
//! and nonce in the query: `?time=<unix seconds>&nonce=<1-64 of A-Z a-z 0-9 . _ ~ ->&sig=<hex>`.
//! A time further than the window from the gateway's clock is refused, and
//! so is a signature already taken within the window: a captured request
//! can be neither replayed nor moved to another path, method or payload.
//!
//! Keys come from `--auth-keys PATH`, either
//! - a file with one key a line: `<house>/<device> <secret>` (blank lines
//!   and lines starting with `#` are skipped), or
//! - a folder with one file per key, named `<house>.<device>` (split at the
//!   first dot), holding the secret: a Kubernetes secret mounted as a volume
//!   (its `..data` entries skipped).
//!
//! A secret is its text's UTF-8 bytes (no white space), or with a `hex:`
//! prefix the bytes the hex spells (binary keys). A line or file may hold a
//! second secret after the first: while a key is rotated, both sign.
//! A key file that every user of the machine may read is refused. The keys
//! are read again when the files change ([`watch`]): Kubernetes updates a
//! mounted secret in place by swapping its `..data` link.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// The first line of the canonical string: the scheme and its version.
pub const SCHEME: &str = "ingest-hmac-sha256-v1";
/// The query parameter that carries the signing time (Unix seconds).
pub const TIME_PARAMETER: &str = "time";
/// The query parameter that carries the nonce.
pub const NONCE_PARAMETER: &str = "nonce";
/// The query parameter that carries the signature.
pub const SIGNATURE_PARAMETER: &str = "sig";
/// How far a request's time may be from the gateway's clock, by default.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
/// Signatures remembered to refuse replays, by default: a hash table of
/// 2^21 buckets of 25 bytes (52 MB) when full.
pub const DEFAULT_REPLAY_CAPACITY: usize = 1_000_000;
/// How often the key files are checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);
/// The longest nonce.
const MAX_NONCE: usize = 64;

/// (house, device): what a key belongs to.
type KeyId = (String, String);
/// A key's secrets: one, or two while it is rotated (either signs).
type Secrets = Vec<Vec<u8>>;

/// Who must sign, and how strictly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthSettings {
    /// Whether a request without a key is refused (else it may be unsigned).
    pub require: bool,
    /// How far a request's time may be from the gateway's clock.
    pub window: Duration,
    /// Signatures remembered at most; when they are all within the window,
    /// new signed requests get 5.03 until some expire.
    pub replay_capacity: usize,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            require: false,
            window: DEFAULT_WINDOW,
            replay_capacity: DEFAULT_REPLAY_CAPACITY,
        }
    }
}

/// The keys, and the gateway's memory of the signatures it took. Cheap to
/// clone: clones share the keys and the memory.
#[derive(Clone, Default)]
pub struct AuthPolicy {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    keys: RwLock<Arc<Keys>>,
    /// Where the keys were read from, to read them again when they change.
    source: Option<PathBuf>,
    /// What the files looked like when last read.
    stamp: Mutex<Stamp>,
    settings: AuthSettings,
    seen: Mutex<SeenSignatures>,
}

#[derive(Default)]
struct Keys {
    by_id: HashMap<KeyId, Secrets>,
    /// Devices that have a key in some house: they must always sign.
    devices: HashSet<String>,
}

impl Keys {
    fn new(by_id: HashMap<KeyId, Secrets>) -> Self {
        let devices = by_id.keys().map(|(_, device)| device.clone()).collect();
        Self { by_id, devices }
    }
}

/// What a request says about itself, for [`AuthPolicy::check`].
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    /// `POST`.
    pub method: &'a str,
    /// The house, when the path names one.
    pub house: Option<&'a str>,
    /// The device the path names.
    pub device: &'a str,
    /// The payload as sent (before any CBOR translation).
    pub payload: &'a [u8],
    /// The query's `time`, `nonce` and `sig`.
    pub time: Option<&'a str>,
    pub nonce: Option<&'a str>,
    pub signature: Option<&'a str>,
}

/// How a request passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// Its key's signature, fresh and first seen.
    Signed,
    /// No key applies and none is required.
    Unsigned,
}

/// Why a request was not taken. Every kind but [`Denied::ReplayCacheFull`]
/// gets the same 4.01 with no text, so that an attacker cannot tell which
/// devices have keys; the kind goes to the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// Authentication is required and no key belongs to the path's (house,
    /// device), or the device has a key and the path names no house.
    #[error("no key belongs to this house and device")]
    UnknownDevice,
    /// A key applies and `time`, `nonce` or `sig` is missing or malformed.
    #[error("time, nonce or sig is missing or malformed")]
    MissingSignature,
    /// The signature is not the HMAC of the canonical string with the key.
    #[error("the signature does not match")]
    BadSignature,
    /// The time is further from the gateway's clock than the window.
    #[error("the signing time is outside the window")]
    Stale,
    /// The same signature was taken already.
    #[error("the signature was used already")]
    Replayed,
    /// The memory of taken signatures is full (5.03, not 4.01).
    #[error("too many signatures within the window to remember")]
    ReplayCacheFull,
}

/// A key file or folder that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("--auth-keys {path}: {reason}")]
pub struct KeysError {
    /// The path given.
    pub path: String,
    /// What is wrong, naming the line or file (never the secret).
    pub reason: String,
}

impl std::fmt::Debug for AuthPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never reach output: only how many there are.
        f.debug_struct("AuthPolicy")
            .field("keys", &self.keys())
            .field("source", &self.inner.source)
            .field("settings", &self.inner.settings)
            .finish()
    }
}

impl AuthPolicy {
    /// No authentication: every request is accepted, a signature ignored.
    pub fn open() -> Self {
        Self::default()
    }

    /// Keys given in memory, by (house, device).
    pub fn new(keys: HashMap<KeyId, Vec<u8>>, settings: AuthSettings) -> Self {
        let keys = keys.into_iter().map(|(id, key)| (id, vec![key])).collect();
        Self::build(Keys::new(keys), None, Stamp::default(), settings)
    }

    /// Reads the keys at `path` (a file or a folder, see the module docs).
    pub fn load(path: &Path, settings: AuthSettings) -> Result<Self, KeysError> {
        let stamp = stamp(path);
        let keys = read_keys(path)?;
        Ok(Self::build(keys, Some(path.to_owned()), stamp, settings))
    }

    #[cfg(test)]
    fn new_with_secrets(keys: HashMap<KeyId, Secrets>, settings: AuthSettings) -> Self {
        Self::build(Keys::new(keys), None, Stamp::default(), settings)
    }

    fn build(keys: Keys, source: Option<PathBuf>, stamp: Stamp, settings: AuthSettings) -> Self {
        Self {
            inner: Arc::new(Inner {
                keys: RwLock::new(Arc::new(keys)),
                source,
                stamp: Mutex::new(stamp),
                settings,
                seen: Mutex::default(),
            }),
        }
    }

    /// How many keys there are.
    pub fn keys(&self) -> usize {
        self.current().by_id.len()
    }

    /// Whether every request must be signed.
    pub fn is_required(&self) -> bool {
        self.inner.settings.require
    }

    fn current(&self) -> Arc<Keys> {
        self.inner
            .keys
            .read()
            .map(|keys| Arc::clone(&keys))
            .unwrap_or_default()
    }

    /// Checks `claim` at `now` (Unix seconds).
    pub fn check(&self, claim: &Claim<'_>, now: i64) -> Result<Verified, Denied> {
        let keys = self.current();
        let secrets = claim
            .house
            .and_then(|house| keys.by_id.get(&(house.to_owned(), claim.device.to_owned())));
        let Some(secrets) = secrets else {
            // A device with a key must name its house: else the payload
            // could name any house for it.
            return if self.inner.settings.require
                || (claim.house.is_none() && keys.devices.contains(claim.device))
            {
                Err(Denied::UnknownDevice)
            } else {
                Ok(Verified::Unsigned)
            };
        };
        let house = claim.house.unwrap_or_default();
        let (Some(time), Some(nonce), Some(signature)) = (claim.time, claim.nonce, claim.signature)
        else {
            return Err(Denied::MissingSignature);
        };
        let seconds = parse_time(time).ok_or(Denied::MissingSignature)?;
        if !valid_nonce(nonce) {
            return Err(Denied::MissingSignature);
        }
        let tag = decode_hex(signature).ok_or(Denied::BadSignature)?;
        let text = canonical(
            claim.method,
            house,
            claim.device,
            seconds,
            nonce,
            claim.payload,
        );
        let signed_with = |key: &Vec<u8>| {
            let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(key) else {
                return false;
            };
            mac.update(text.as_bytes());
            // Constant-time comparison.
            mac.verify_slice(&tag).is_ok()
        };
        if !secrets.iter().any(signed_with) {
            return Err(Denied::BadSignature);
        }
        let window = i64::try_from(self.inner.settings.window.as_secs()).unwrap_or(i64::MAX);
        if seconds.abs_diff(now) > window.unsigned_abs() {
            return Err(Denied::Stale);
        }
        // Past `time + window` the time check refuses it anyway.
        let expires = seconds.saturating_add(window);
        let mut seen = self
            .inner
            .seen
            .lock()
            .map_err(|_| Denied::ReplayCacheFull)?;
        seen.insert(&tag, expires, now, self.inner.settings.replay_capacity)?;
        Ok(Verified::Signed)
    }

    /// Reads the keys again if their files changed since the last read. A
    /// change that cannot be read (a half-written file, a bad line) keeps
    /// the keys in use and is logged; the next change is tried again.
    pub fn reload_if_changed(&self) {
        let Some(path) = &self.inner.source else {
            return;
        };
        let now = stamp(path);
        {
            let Ok(mut last) = self.inner.stamp.lock() else {
                return;
            };
            if *last == now {
                return;
            }
            *last = now;
        }
        match read_keys(path) {
            Ok(keys) => {
                let count = keys.by_id.len();
                if let Ok(mut current) = self.inner.keys.write() {
                    *current = Arc::new(keys);
                }
                tracing::info!(keys = count, path = %path.display(), "device keys reloaded");
            }
            Err(error) => {
                tracing::error!(%error, "device keys changed but cannot be read: the old keys stay in use");
            }
        }
    }
}

/// Reads the keys again whenever their files change, until `shutdown`.
pub async fn watch(policy: AuthPolicy, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RELOAD_INTERVAL) => {}
        }
        // Reading files blocks: off the async workers.
        let policy = policy.clone();
        let _ = tokio::task::spawn_blocking(move || policy.reload_if_changed()).await;
    }
}

/// The canonical string a device signs (see the module docs).
pub fn canonical(
    method: &str,
    house: &str,
    device: &str,
    time: i64,
    nonce: &str,
    payload: &[u8],
) -> String {
    let payload_hash = hex(&Sha256::digest(payload));
    format!("{SCHEME}\n{method}\n/t/{house}/{device}\n{time}\n{nonce}\n{payload_hash}")
}

/// The hex signature of a request: what a device puts in `sig`.
pub fn sign(
    key: &[u8],
    method: &str,
    house: &str,
    device: &str,
    time: i64,
    nonce: &str,
    payload: &[u8],
) -> String {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(canonical(method, house, device, time, nonce, payload).as_bytes());
    hex(&mac.finalize().into_bytes())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decimal Unix seconds, no sign, no leading `+`.
fn parse_time(text: &str) -> Option<i64> {
    if text.is_empty() || text.len() > 12 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn valid_nonce(nonce: &str) -> bool {
    (1..=MAX_NONCE).contains(&nonce.len())
        && nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
}

/// The signatures taken, each until its time leaves the window.
#[derive(Default)]
struct SeenSignatures {
    /// The first 16 bytes of each tag (enough to never collide by chance),
    /// and when it may be forgotten (Unix seconds).
    expiry: HashMap<[u8; 16], i64>,
    /// When expired entries were last dropped.
    pruned_at: i64,
}

impl SeenSignatures {
    fn insert(
        &mut self,
        tag: &[u8],
        expires: i64,
        now: i64,
        capacity: usize,
    ) -> Result<(), Denied> {
        let mut id = [0u8; 16];
        let n = tag.len().min(16);
        id[..n].copy_from_slice(&tag[..n]);
        if self.expiry.contains_key(&id) {
            return Err(Denied::Replayed);
        }
        // Dropping the expired is a pass over all: at most once a second,
        // once half full.
        if self.expiry.len() >= capacity / 2 && now > self.pruned_at {
            self.expiry.retain(|_, expires| *expires >= now);
            self.pruned_at = now;
        }
        if self.expiry.len() >= capacity {
            return Err(Denied::ReplayCacheFull);
        }
        self.expiry.insert(id, expires);
        Ok(())
    }
}

/// What identifies the key files' current content: each file's inode,
/// modification time and length (following Kubernetes' links).
type Stamp = Vec<(String, u64, i64, i64, u64)>;

fn stamp(path: &Path) -> Stamp {
    let of = |name: String, file: &Path| {
        std::fs::metadata(file)
            .ok()
            .map(|m| (name, m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
    };
    if path.is_dir() {
        let mut files: Stamp = std::fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                of(
                    entry.file_name().to_string_lossy().into_owned(),
                    &entry.path(),
                )
            })
            .collect();
        files.sort();
        files
    } else {
        of(String::new(), path).into_iter().collect()
    }
}

fn read_keys(path: &Path) -> Result<Keys, KeysError> {
    let error = |reason: String| KeysError {
        path: path.display().to_string(),
        reason,
    };
    let keys = if path.is_dir() {
        read_folder(path).map_err(error)?
    } else {
        let text = read_private(path).map_err(error)?;
        parse_lines(&text).map_err(error)?
    };
    if keys.is_empty() {
        return Err(error("holds no keys".into()));
    }
    Ok(Keys::new(keys))
}

/// A file's text, refused if every user may read it.
fn read_private(file: &Path) -> Result<String, String> {
    let mode = std::fs::metadata(file).map_err(|e| e.to_string())?.mode();
    if mode & 0o004 != 0 {
        return Err(format!(
            "every user may read it (mode {:o}): chmod o-r it",
            mode & 0o777
        ));
    }
    std::fs::read_to_string(file).map_err(|e| e.to_string())
}

/// `<house>/<device> <secret> [<next secret>]` lines.
fn parse_lines(text: &str) -> Result<HashMap<KeyId, Secrets>, String> {
    let mut keys = HashMap::new();
    for (number, line) in text.lines().enumerate() {
        let number = number + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((id, secret)) = line.split_once(char::is_whitespace) else {
            return Err(format!(
                "line {number}: expected `<house>/<device> <secret>`"
            ));
        };
        let id = key_id(id, '/').ok_or_else(|| {
            format!("line {number}: `{id}` is not <house>/<device> (each non-empty, no other /)")
        })?;
        let secret = parse_secrets(secret)
            .map_err(|reason| format!("line {number} ({}/{}): {reason}", id.0, id.1))?;
        if let Some((house, device)) = keys.insert(id.clone(), secret).map(|_| id) {
            return Err(format!("line {number}: {house}/{device} has a key already"));
        }
    }
    Ok(keys)
}

/// `<house><separator><device>`: both non-empty, neither holding a `/`.
fn key_id(text: &str, separator: char) -> Option<KeyId> {
    let (house, device) = text.split_once(separator)?;
    let fine = |id: &str| !id.is_empty() && !id.contains('/');
    (fine(house) && fine(device)).then(|| (house.to_owned(), device.to_owned()))
}

/// One file per key, named `<house>.<device>`, as Kubernetes mounts a secret.
fn read_folder(path: &Path) -> Result<HashMap<KeyId, Secrets>, String> {
    let mut keys = HashMap::new();
    let entries = std::fs::read_dir(path).map_err(|e| e.to_string())?;
    for entry in entries {
        let entry = entry.map_err(|e| e.to_string())?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Kubernetes keeps the real files under `..data` and links to them.
        if name.starts_with('.') {
            continue;
        }
        let file = entry.path();
        // `is_file` follows the links Kubernetes makes.
        if !file.is_file() {
            continue;
        }
        let id = key_id(&name, '.')
            .ok_or_else(|| format!("{name}: a key file is named <house>.<device>"))?;
        let text = read_private(&file).map_err(|reason| format!("{name}: {reason}"))?;
        let secret = parse_secrets(&text).map_err(|reason| format!("{name}: {reason}"))?;
        keys.insert(id, secret);
    }
    Ok(keys)
}

/// One secret, or two separated by white space (the second is the next key,
/// while a key is rotated).
fn parse_secrets(text: &str) -> Result<Secrets, String> {
    let secrets: Vec<&str> = text.split_whitespace().collect();
    if secrets.len() > 2 {
        return Err("more than two secrets (the key and the next one)".into());
    }
    if secrets.is_empty() {
        return Err("the secret is empty".into());
    }
    secrets.into_iter().map(parse_secret).collect()
}

fn parse_secret(secret: &str) -> Result<Vec<u8>, String> {
    let bytes = match secret.strip_prefix("hex:") {
        Some(hex) => {
            decode_hex(hex).ok_or("the hex: secret is not an even number of hex digits")?
        }
        None => secret.as_bytes().to_vec(),
    };
    if bytes.is_empty() {
        return Err("the secret is empty".into());
    }
    Ok(bytes)
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    // Digits only: `u8::from_str_radix` alone would take "+f" as 0x0f, so
    // two spellings of one signature would both verify.
    if !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn hex_is_digits_only() {
        assert_eq!(decode_hex("0fA0"), Some(vec![0x0f, 0xa0]));
        assert_eq!(decode_hex("+f"), None);
        assert_eq!(decode_hex("-1"), None);
        assert_eq!(decode_hex("0g"), None);
        assert_eq!(decode_hex("abc"), None);
    }

    const NOW: i64 = 1_764_513_000;

    fn settings(require: bool) -> AuthSettings {
        AuthSettings {
            require,
            ..AuthSettings::default()
        }
    }

    fn policy(require: bool) -> AuthPolicy {
        let keys = parse_lines("# keys\n\nh1/d1 s3cret\nh1/d2   hex:00ff10\n").unwrap();
        AuthPolicy::new_with_secrets(keys, settings(require))
    }

    /// A private temporary folder of this test's own.
    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ingest-auth-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_private(file: &Path, text: &str) {
        std::fs::write(file, text).unwrap();
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// The README's worked example, line for line: a firmware author
    /// implements the scheme from it, so it must be exactly what the
    /// gateway computes.
    #[test]
    fn the_readme_example_is_what_the_gateway_computes() {
        let readme = include_str!("../../../README.md");
        let payload = br#"{"v":1.5}"#;
        let text = canonical("POST", "h1", "d1", NOW, "42", payload);
        let signature = sign(b"s3cret", "POST", "h1", "d1", NOW, "42", payload);
        let example = format!(
            "key:       s3cret\n\
             method:    POST\n\
             path:      /t/h1/d1\n\
             time:      {NOW}\n\
             nonce:     42\n\
             payload:   {{\"v\":1.5}}\n\
             \n\
             canonical string (6 lines, joined by \\n, no \\n at the end):\n\
             {text}\n\
             \n\
             sig:       {signature}\n\
             URI:       coap://gateway/t/h1/d1?time={NOW}&nonce=42&sig={signature}\n"
        );
        assert!(
            readme.contains(&example),
            "README.md's worked example must read:\n{example}"
        );
        // Known answers from another implementation (sha256sum and
        // `openssl dgst -sha256 -hmac s3cret`), as the README shows.
        assert!(
            text.ends_with("\nbac0a59f70ca83519d7b8fdb79bf10017ee999c4ffb744d96a1966bc01e2f30b"),
            "{text}"
        );
        assert_eq!(
            signature,
            "d05c906d85bd35dbf86194199954e64a0918499b3a0ae2787492f2b115faed01"
        );
    }

    fn claim<'a>(
        house: Option<&'a str>,
        device: &'a str,
        payload: &'a [u8],
        time: &'a str,
        nonce: &'a str,
        signature: Option<&'a str>,
    ) -> Claim<'a> {
        Claim {
            method: "POST",
            house,
            device,
            payload,
            time: Some(time),
            nonce: Some(nonce),
            signature,
        }
    }

    #[test]
    fn signatures_bind_method_house_device_time_nonce_and_payload() {
        let payload = br#"{"v":1}"#;
        let t = NOW.to_string();
        let good = sign(b"s3cret", "POST", "h1", "d1", NOW, "n1", payload);
        let upper = sign(b"s3cret", "POST", "h1", "d1", NOW, "n2", payload).to_uppercase();
        let put = sign(b"s3cret", "PUT", "h1", "d1", NOW, "n3", payload);
        let other_house = sign(b"s3cret", "POST", "h2", "d1", NOW, "n4", payload);
        let other_key = sign(&[0x00, 0xff, 0x10], "POST", "h1", "d1", NOW, "n5", payload);
        let d2 = sign(&[0x00, 0xff, 0x10], "POST", "h1", "d2", NOW, "n6", payload);
        let old = NOW - 61;
        let stale = sign(b"s3cret", "POST", "h1", "d1", old, "n7", payload);
        let old = old.to_string();
        let soon = NOW + 60;
        let edge = sign(b"s3cret", "POST", "h1", "d1", soon, "n8", payload);
        let soon = soon.to_string();
        let p = policy(false);
        // (claim, expected), checked in order against one policy.
        let cases: Vec<(Claim<'_>, Result<Verified, Denied>)> = vec![
            (
                claim(Some("h1"), "d1", payload, &t, "n1", Some(&good)),
                Ok(Verified::Signed),
            ),
            // The same request again: a replay.
            (
                claim(Some("h1"), "d1", payload, &t, "n1", Some(&good)),
                Err(Denied::Replayed),
            ),
            (
                claim(Some("h1"), "d1", payload, &t, "n2", Some(&upper)),
                Ok(Verified::Signed),
            ),
            // Moved to another nonce, time, payload, house or method.
            (
                claim(Some("h1"), "d1", payload, &t, "n9", Some(&good)),
                Err(Denied::BadSignature),
            ),
            (
                claim(Some("h1"), "d1", payload, &soon, "n1", Some(&good)),
                Err(Denied::BadSignature),
            ),
            (
                claim(Some("h1"), "d1", b"{\"v\":2}", &t, "n1", Some(&good)),
                Err(Denied::BadSignature),
            ),
            (
                claim(Some("h1"), "d1", payload, &t, "n3", Some(&put)),
                Err(Denied::BadSignature),
            ),
            (
                claim(Some("h1"), "d1", payload, &t, "n4", Some(&other_house)),
                Err(Denied::BadSignature),
            ),
            (
                claim(Some("h1"), "d1", payload, &t, "n5", Some(&other_key)),
                Err(Denied::BadSignature),
            ),
            (
                claim(Some("h1"), "d2", payload, &t, "n6", Some(&d2)),
                Ok(Verified::Signed),
            ),
            // d1's key is for h1 only: h2/d1 is another, unkeyed device.
            (
                claim(Some("h2"), "d1", payload, &t, "n4", Some(&other_house)),
                Ok(Verified::Unsigned),
            ),
            // Without the house, d1 could name any house in its payload.
            (
                claim(None, "d1", payload, &t, "n1", Some(&good)),
                Err(Denied::UnknownDevice),
            ),
            (
                claim(None, "d3", payload, &t, "n1", None),
                Ok(Verified::Unsigned),
            ),
            (
                claim(Some("h1"), "d1", payload, &old, "n7", Some(&stale)),
                Err(Denied::Stale),
            ),
            (
                claim(Some("h1"), "d1", payload, &soon, "n8", Some(&edge)),
                Ok(Verified::Signed),
            ),
            (
                claim(Some("h1"), "d1", payload, &t, "n1", None),
                Err(Denied::MissingSignature),
            ),
            (
                claim(Some("h1"), "d1", payload, "-1", "n1", Some(&good)),
                Err(Denied::MissingSignature),
            ),
            (
                claim(Some("h1"), "d1", payload, &t, "a b", Some(&good)),
                Err(Denied::MissingSignature),
            ),
            (
                claim(Some("h1"), "d1", payload, &t, "", Some(&good)),
                Err(Denied::MissingSignature),
            ),
            (
                claim(Some("h1"), "d1", payload, &t, "n1", Some("zz")),
                Err(Denied::BadSignature),
            ),
            (
                claim(Some("h1"), "d1", payload, &t, "n1", Some("abc")),
                Err(Denied::BadSignature),
            ),
        ];
        for (i, (claim, expected)) in cases.into_iter().enumerate() {
            assert_eq!(p.check(&claim, NOW), expected, "case {i}: {claim:?}");
        }
        let mut missing = claim(Some("h1"), "d1", payload, &t, "n1", Some(&good));
        missing.time = None;
        assert_eq!(p.check(&missing, NOW), Err(Denied::MissingSignature));

        let required = policy(true);
        let unknown = claim(Some("h2"), "d1", payload, &t, "n1", None);
        assert_eq!(required.check(&unknown, NOW), Err(Denied::UnknownDevice));
        assert_eq!(
            AuthPolicy::open().check(&unknown, NOW),
            Ok(Verified::Unsigned)
        );
    }

    #[test]
    fn while_a_key_is_rotated_both_secrets_sign() {
        let keys = parse_lines("h1/d1 old hex:6e6577\n").unwrap();
        let p = AuthPolicy::new_with_secrets(keys, settings(true));
        let payload = b"{}";
        let t = NOW.to_string();
        for (key, nonce, expected) in [
            (&b"old"[..], "a", Ok(Verified::Signed)),
            (b"new", "b", Ok(Verified::Signed)),
            (b"other", "c", Err(Denied::BadSignature)),
        ] {
            let signature = sign(key, "POST", "h1", "d1", NOW, nonce, payload);
            let claim = claim(Some("h1"), "d1", payload, &t, nonce, Some(&signature));
            assert_eq!(p.check(&claim, NOW), expected, "{nonce}");
        }
    }

    #[test]
    fn the_replay_memory_is_bounded() {
        let keys = parse_lines("h1/d1 k\n").unwrap();
        let p = AuthPolicy::new_with_secrets(
            keys,
            AuthSettings {
                replay_capacity: 4,
                window: Duration::from_secs(10),
                ..settings(true)
            },
        );
        let payload = b"{}";
        let send = |time: i64, nonce: &str, now: i64| {
            let signature = sign(b"k", "POST", "h1", "d1", time, nonce, payload);
            let time = time.to_string();
            p.check(
                &claim(Some("h1"), "d1", payload, &time, nonce, Some(&signature)),
                now,
            )
        };
        for nonce in ["a", "b", "c", "d"] {
            assert_eq!(send(NOW, nonce, NOW), Ok(Verified::Signed));
        }
        // Full of signatures still within the window: refused, not forgotten.
        assert_eq!(send(NOW, "e", NOW), Err(Denied::ReplayCacheFull));
        assert_eq!(send(NOW, "a", NOW + 5), Err(Denied::Replayed));
        // Once they expire (time + window), there is room again.
        assert_eq!(send(NOW + 11, "e", NOW + 11), Ok(Verified::Signed));
        assert_eq!(p.inner.seen.lock().unwrap().expiry.len(), 1);
    }

    #[test]
    fn key_files_are_validated_without_showing_secrets() {
        let cases = [
            ("h1/d1\n", "line 1: expected"),
            ("d1 s3cret\n", "line 1: `d1` is not <house>/<device>"),
            ("h1/ s3cret\n", "line 1: `h1/` is not"),
            ("h1/d1/x s3cret\n", "line 1: `h1/d1/x` is not"),
            ("h1/d1 a\nh1/d1 b\n", "line 2: h1/d1 has a key already"),
            ("h1/d1 hex:abc\n", "line 1 (h1/d1): the hex: secret"),
            ("h1/d1 hex:\n", "line 1 (h1/d1): the secret is empty"),
            ("h1/d1 a b c\n", "line 1 (h1/d1): more than two secrets"),
        ];
        for (text, expected) in cases {
            let err = parse_lines(text).unwrap_err();
            assert!(err.starts_with(expected), "{text:?}: {err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
        let debug = format!("{:?}", policy(true));
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(!debug.contains("255"), "{debug}");
        assert!(debug.contains("keys: 2"), "{debug}");
    }

    #[test]
    fn key_files_others_may_read_are_refused() {
        let dir = temp("mode");
        let file = dir.join("keys");
        std::fs::write(&file, "h1/d1 s3cret\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = AuthPolicy::load(&file, settings(true)).unwrap_err();
        assert!(
            err.reason.contains("every user may read it (mode 644)"),
            "{err}"
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(AuthPolicy::load(&file, settings(true)).unwrap().keys(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A mounted Kubernetes secret: files linked from `..data`, which an
    /// update replaces by swapping the `..data` link.
    #[test]
    fn kubernetes_secret_folders_are_read_and_reloaded() {
        let dir = temp("k8s");
        let version = |name: &str, secret: &str| {
            let data = dir.join(name);
            std::fs::create_dir_all(&data).unwrap();
            write_private(&data.join("h1.d1"), secret);
            let link = dir.join("..data_tmp");
            std::os::unix::fs::symlink(name, &link).unwrap();
            std::fs::rename(&link, dir.join("..data")).unwrap();
        };
        version("..2026_01", "s3cret\n");
        let file_link = dir.join("h1.d1");
        std::os::unix::fs::symlink("..data/h1.d1", &file_link).unwrap();
        let policy = AuthPolicy::load(&dir, settings(true)).unwrap();
        assert_eq!(policy.keys(), 1);
        let payload = b"{}";
        let t = NOW.to_string();
        let signed_with = |key: &[u8], nonce: &str| {
            let signature = sign(key, "POST", "h1", "d1", NOW, nonce, payload);
            policy.check(
                &claim(Some("h1"), "d1", payload, &t, nonce, Some(&signature)),
                NOW,
            )
        };
        assert_eq!(signed_with(b"s3cret", "a"), Ok(Verified::Signed));

        // Unchanged: nothing read. Rotated: the new key, and only it.
        policy.reload_if_changed();
        version("..2026_02", "n3w\n");
        policy.reload_if_changed();
        assert_eq!(signed_with(b"n3w", "b"), Ok(Verified::Signed));
        assert_eq!(signed_with(b"s3cret", "c"), Err(Denied::BadSignature));

        // A broken update keeps the keys in use.
        version("..2026_03", "hex:x\n");
        policy.reload_if_changed();
        assert_eq!(signed_with(b"n3w", "d"), Ok(Verified::Signed));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
