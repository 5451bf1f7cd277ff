//! TLS for the link: rustls client configs trusting given CA certificates, with the ring provider
//! named explicitly (the only provider in the graph; two would panic at the first handshake).

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::CertificateDer;

use crate::error::LinkError;

/// CA bundle used for TLS when no `ca_file` is given.
pub(crate) const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A rustls client config trusting the certificates in the PEM file at `ca_file`, with the ring
/// provider given explicitly (no process-wide default provider is needed).
pub fn tls_config(ca_file: &Path) -> Result<rustls::ClientConfig, LinkError> {
    let err = |reason: String| LinkError::CaFile {
        path: ca_file.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(ca_file).map_err(|e| err(e.to_string()))?;
    client_config(certs).map_err(|e| match e {
        ConfigError::Ca(reason) => err(reason),
        ConfigError::Tls(reason) => LinkError::Tls(reason),
    })
}

/// Like [`tls_config`], with the CA certificate(s) given as PEM text.
pub fn tls_config_pem(pem: &[u8]) -> Result<rustls::ClientConfig, LinkError> {
    client_config(CertificateDer::pem_slice_iter(pem)).map_err(|e| match e {
        ConfigError::Ca(reason) => LinkError::CaPem(reason),
        ConfigError::Tls(reason) => LinkError::Tls(reason),
    })
}

/// Why [`client_config`] failed; the callers turn it into the [`LinkError`] naming the source.
enum ConfigError {
    /// A CA certificate is malformed, or none was found.
    Ca(String),
    /// rustls refused the configuration.
    Tls(String),
}

fn client_config<'a>(
    certs: impl Iterator<Item = Result<CertificateDer<'a>, pem::Error>>,
) -> Result<rustls::ClientConfig, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        let cert = cert.map_err(|e| ConfigError::Ca(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| ConfigError::Ca(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(ConfigError::Ca("no certificate found".into()));
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::Tls(e.to_string()))
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}
