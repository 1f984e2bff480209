//! DICOM over TLS (PS3.15 Annex B): the server side, configured from PEM files.
//!
//! The listener terminates TLS itself with rustls (through `tokio-rustls`, the same
//! stack `dicom-ul`'s `async-tls` feature uses) because it reads PDUs with its own
//! bounded [`Connection`](crate::association::Connection), not with `dicom-ul`'s
//! association types. A hospital network usually wants both directions authenticated:
//! when a client CA bundle is given, every peer must present a certificate signed by
//! one of those CAs, otherwise the handshake fails before any PDU is read.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// Where the TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// The server's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to; `None` accepts
    /// clients without a certificate.
    pub client_ca: Option<PathBuf>,
}

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file is missing, unreadable or holds nothing usable.
    #[error("cannot read {what} from {path}: {detail}")]
    Pem {
        /// What was expected (certificate, private key, client CA).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The parser's message.
        detail: String,
    },
    /// rustls refused the combination (e.g. the key does not match the certificate).
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

pub(crate) fn pem_error(what: &'static str, path: &Path, detail: impl ToString) -> TlsError {
    TlsError::Pem {
        what,
        path: path.to_owned(),
        detail: detail.to_string(),
    }
}

/// The certificates of a PEM file; none is an error.
pub(crate) fn certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, path, e))?;
    if certs.is_empty() {
        return Err(pem_error(what, path, "no CERTIFICATE block"));
    }
    Ok(certs)
}

/// The rustls server configuration for `files`.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates("certificate", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| pem_error("private key", &files.key, e))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates("client CA", path)? {
                roots.add(ca).map_err(|e| pem_error("client CA", path, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_named() {
        let files = TlsFiles {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            client_ca: None,
        };
        let err = server_config(&files).unwrap_err().to_string();
        assert!(
            err.contains("certificate") && err.contains("/nonexistent/cert.pem"),
            "{err}"
        );
    }
}
