//! TLS to PostgreSQL with libpq's `sslmode=verify-full` semantics: the chain
//! must lead to a trusted CA and the certificate must name the host in the
//! URL (a Consul name stays the name checked, whatever address it resolved to).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::ConfigError;

/// A client configuration trusting the CAs in `ca_file`, or the system's
/// trusted CAs when None. Read and checked once, at start.
pub fn verify_full(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let shown = path.display().to_string();
            let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect())
                .map_err(|e| {
                    ConfigError::new(
                        "--database-ca-file",
                        &shown,
                        format!("cannot read PEM certificates: {e}"),
                    )
                })?;
            if certificates.is_empty() {
                return Err(ConfigError::new(
                    "--database-ca-file",
                    &shown,
                    "holds no certificate",
                ));
            }
            for certificate in certificates {
                roots.add(certificate).map_err(|e| {
                    ConfigError::new(
                        "--database-ca-file",
                        &shown,
                        format!("not a CA certificate: {e}"),
                    )
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for certificate in found.certs {
                // A malformed system certificate is skipped, as libpq would.
                let _ = roots.add(certificate);
            }
            if roots.is_empty() {
                return Err(ConfigError::new(
                    "--database-tls",
                    "verify-full",
                    "the system has no trusted CA certificates: give --database-ca-file",
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::new("--database-tls", "verify-full", e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
