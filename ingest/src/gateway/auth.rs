//! Per-device authentication of CoAP telemetry: an HMAC-SHA256 of the
//! payload with the device's own key, in hex, in the query (`?sig=<hex>`).
//!
//! Keys come from `--auth-keys PATH`, either
//! - a file with one device a line: `<device> <secret>` (blank lines and
//!   lines starting with `#` are skipped), or
//! - a folder with one file per device, named after it, holding the secret:
//!   a Kubernetes secret mounted as a volume (its `..data` entries skipped).
//!
//! A secret is its text's UTF-8 bytes, or with a `hex:` prefix the bytes
//! the hex spells (binary keys); surrounding whitespace is not part of it.
//! Keys are read once at start. The signature covers the payload bytes as
//! sent (before any CBOR translation); the key is looked up by the device
//! the path names, so one device's key cannot sign for another.

use std::collections::HashMap;
use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The query parameter that carries the signature.
pub const SIGNATURE_PARAMETER: &str = "sig";

/// Who must sign.
#[derive(Clone, Default)]
pub struct AuthPolicy {
    /// Each device's secret; empty when no key file was given.
    keys: HashMap<String, Vec<u8>>,
    /// Whether a device without a key is refused (else it may send unsigned).
    require: bool,
}

/// Why a request was not authenticated (the CoAP answer is 4.01).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// Authentication is required and the device has no key.
    #[error("device is not known to the gateway (no key)")]
    UnknownDevice,
    /// The device has a key and the request carries no signature.
    #[error("missing signature: add ?sig=<hex HMAC-SHA256 of the payload>")]
    MissingSignature,
    /// The signature is not hex, or not the payload's HMAC with the key.
    #[error("the signature does not match the payload")]
    BadSignature,
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
            .field("devices_with_keys", &self.keys.len())
            .field("require", &self.require)
            .finish()
    }
}

impl AuthPolicy {
    /// No authentication: every request is accepted, a signature ignored.
    pub fn open() -> Self {
        Self::default()
    }

    /// Devices in `keys` must sign; others may send unsigned unless
    /// `require` is set.
    pub fn new(keys: HashMap<String, Vec<u8>>, require: bool) -> Self {
        Self { keys, require }
    }

    /// Reads the keys at `path` (a file or a folder, see the module docs).
    pub fn load(path: &Path, require: bool) -> Result<Self, KeysError> {
        let error = |reason: String| KeysError {
            path: path.display().to_string(),
            reason,
        };
        let keys = if path.is_dir() {
            read_folder(path).map_err(error)?
        } else {
            let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
            parse_lines(&text).map_err(error)?
        };
        if keys.is_empty() {
            return Err(error("holds no keys".into()));
        }
        Ok(Self::new(keys, require))
    }

    /// How many devices have keys.
    pub fn devices(&self) -> usize {
        self.keys.len()
    }

    /// Whether every device must sign.
    pub fn is_required(&self) -> bool {
        self.require
    }

    /// Checks the request of `device` with `payload` and the hex `signature`
    /// from its query, if any.
    pub fn check(
        &self,
        device: &str,
        payload: &[u8],
        signature: Option<&str>,
    ) -> Result<(), Denied> {
        let Some(key) = self.keys.get(device) else {
            return if self.require {
                Err(Denied::UnknownDevice)
            } else {
                Ok(())
            };
        };
        let signature = signature.ok_or(Denied::MissingSignature)?;
        let tag = decode_hex(signature).ok_or(Denied::BadSignature)?;
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(key).map_err(|_| Denied::BadSignature)?;
        mac.update(payload);
        // Constant-time comparison.
        mac.verify_slice(&tag).map_err(|_| Denied::BadSignature)
    }
}

/// The hex HMAC-SHA256 of `payload` with `key`: what a device sends.
pub fn sign(key: &[u8], payload: &[u8]) -> String {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(payload);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `<device> <secret>` lines.
fn parse_lines(text: &str) -> Result<HashMap<String, Vec<u8>>, String> {
    let mut keys = HashMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((device, secret)) = line.split_once(char::is_whitespace) else {
            return Err(format!("line {}: expected `<device> <secret>`", number + 1));
        };
        let secret = parse_secret(secret.trim())
            .map_err(|reason| format!("line {} ({device}): {reason}", number + 1))?;
        if keys.insert(device.to_owned(), secret).is_some() {
            return Err(format!(
                "line {}: device {device} has a key already",
                number + 1
            ));
        }
    }
    Ok(keys)
}

/// One file per device, as Kubernetes mounts a secret.
fn read_folder(path: &Path) -> Result<HashMap<String, Vec<u8>>, String> {
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
        let text = std::fs::read_to_string(&file).map_err(|e| format!("{name}: {e}"))?;
        let secret = parse_secret(text.trim()).map_err(|reason| format!("{name}: {reason}"))?;
        keys.insert(name, secret);
    }
    Ok(keys)
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
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(require: bool) -> AuthPolicy {
        let keys = parse_lines("# devices\n\nd1 s3cret\nd2   hex:00ff10\n").unwrap();
        AuthPolicy::new(keys, require)
    }

    #[test]
    fn signatures_are_checked_per_device() {
        let payload = br#"{"v":1}"#;
        let good = sign(b"s3cret", payload);
        let upper = good.to_uppercase();
        let other = sign(&[0x00, 0xff, 0x10], payload);
        // (policy requires, device, signature, expected)
        type Case<'a> = (bool, &'a str, Option<&'a str>, Result<(), Denied>);
        let cases: Vec<Case<'_>> = vec![
            (false, "d1", Some(&good), Ok(())),
            (false, "d1", Some(&upper), Ok(())),
            (false, "d1", None, Err(Denied::MissingSignature)),
            (false, "d1", Some(&other), Err(Denied::BadSignature)),
            (false, "d1", Some("zz"), Err(Denied::BadSignature)),
            (false, "d1", Some("abc"), Err(Denied::BadSignature)),
            (false, "d2", Some(&other), Ok(())),
            (false, "d3", None, Ok(())),
            (false, "d3", Some(&good), Ok(())),
            (true, "d3", None, Err(Denied::UnknownDevice)),
            (true, "d3", Some(&good), Err(Denied::UnknownDevice)),
            (true, "d1", Some(&good), Ok(())),
        ];
        for (require, device, signature, expected) in cases {
            assert_eq!(
                policy(require).check(device, payload, signature),
                expected,
                "{device} {signature:?} require={require}"
            );
        }
        assert_eq!(AuthPolicy::open().check("any", payload, None), Ok(()));
    }

    #[test]
    fn key_files_are_validated_without_showing_secrets() {
        let cases = [
            ("d1\n", "line 1: expected"),
            ("d1 a\nd1 b\n", "line 2: device d1 has a key already"),
            ("d1 hex:abc\n", "line 1 (d1): the hex: secret"),
            ("d1 hex:\n", "line 1 (d1): the secret is empty"),
        ];
        for (text, expected) in cases {
            let err = parse_lines(text).unwrap_err();
            assert!(err.starts_with(expected), "{text:?}: {err}");
        }
        let debug = format!("{:?}", policy(true));
        assert!(!debug.contains("s3cret"), "{debug}");
    }

    #[test]
    fn kubernetes_secret_folders() {
        let dir = std::env::temp_dir().join(format!("ingest-auth-{}", std::process::id()));
        let data = dir.join("..data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("d1"), "s3cret\n").unwrap();
        std::os::unix::fs::symlink("..data/d1", dir.join("d1")).unwrap();
        let policy = AuthPolicy::load(&dir, true).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(policy.devices(), 1);
        let payload = b"{}";
        assert_eq!(
            policy.check("d1", payload, Some(&sign(b"s3cret", payload))),
            Ok(())
        );
    }
}
