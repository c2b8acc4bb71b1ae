//! Signing CoAP requests as a device with a key does, written from the
//! README's "Signing CoAP requests" alone (a second implementation of the
//! gateway's scheme, checked against the README's worked example).

use std::collections::HashMap;
use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// Keys by CoAP path, `/t/<house>/<device>`.
pub type CoapKeys = HashMap<String, Vec<u8>>;

/// The query options of a signed POST to `path` (`/t/<house>/<device>`):
/// `time=...`, `nonce=...`, `sig=...`.
pub fn query(key: &[u8], path: &str, time: i64, nonce: &str, payload: &[u8]) -> [String; 3] {
    let payload_hash = hex(&Sha256::digest(payload));
    let canonical = format!("ingest-hmac-sha256-v1\nPOST\n{path}\n{time}\n{nonce}\n{payload_hash}");
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
    mac.update(canonical.as_bytes());
    let signature = hex(&mac.finalize().into_bytes());
    [
        format!("time={time}"),
        format!("nonce={nonce}"),
        format!("sig={signature}"),
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a gateway keys file (`<house>/<device> <secret>` lines, `hex:`
/// secrets, `#` comments).
pub fn read_keys(path: &Path) -> Result<CoapKeys, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut keys = CoapKeys::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || {
            format!(
                "{} line {}: expected `<house>/<device> <secret>`",
                path.display(),
                number + 1
            )
        };
        let (id, secret) = line.split_once(char::is_whitespace).ok_or_else(bad)?;
        id.split_once('/').ok_or_else(bad)?;
        // While a key is rotated a line holds two secrets: either signs.
        let secret = secret.split_whitespace().next().ok_or_else(bad)?;
        let secret = match secret.strip_prefix("hex:") {
            Some(hex) => (0..hex.len())
                .step_by(2)
                .map(|i| {
                    hex.get(i..i + 2)
                        .and_then(|b| u8::from_str_radix(b, 16).ok())
                })
                .collect::<Option<Vec<u8>>>()
                .ok_or_else(bad)?,
            None => secret.as_bytes().to_vec(),
        };
        keys.insert(format!("/t/{id}"), secret);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_the_readme_example() {
        let readme = include_str!("../../README.md");
        let [time, nonce, sig] = query(b"s3cret", "/t/h1/d1", 1_764_513_000, "42", br#"{"v":1.5}"#);
        let uri = format!("URI:       coap://gateway/t/h1/d1?{time}&{nonce}&{sig}\n");
        assert!(readme.contains(&uri), "README.md lacks {uri:?}");
    }

    #[test]
    fn reads_the_gateways_keys_file() {
        let path = std::env::temp_dir().join(format!("loadgen-keys-{}", std::process::id()));
        std::fs::write(&path, "# keys\nh1/d1 old new\nh1/d2 hex:00ff\n").unwrap();
        let keys = read_keys(&path);
        std::fs::write(&path, "d1 s3cret\n").unwrap();
        let bad = read_keys(&path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        let keys = keys.unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys["/t/h1/d1"], b"old");
        assert_eq!(keys["/t/h1/d2"], [0x00, 0xff]);
        assert!(
            bad.ends_with("line 1: expected `<house>/<device> <secret>`"),
            "{bad}"
        );
    }
}
