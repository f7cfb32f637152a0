//! HTTPS for the HTTP transport: rustls on the ring provider, trusting the system's root
//! certificates and, for an API whose certificate a private CA signed, that CA.
//!
//! Every client gets its own rustls configuration (`reqwest`'s preconfigured TLS): the SDK
//! neither needs nor installs a process-wide crypto provider, and a host without root
//! certificates still gets a client (for `http://`, or a CA of its own).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::error::{Error, Result};

/// A CA certificate to trust beside the system's roots, for an API whose certificate a
/// private CA signed (`api.tls_cert` on the server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaCertificate {
    /// A PEM file of one or more certificates, read when a client is made.
    File(PathBuf),
    /// The PEM text itself.
    Pem(Vec<u8>),
}

impl CaCertificate {
    /// The CA certificate(s) in this PEM file.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self::File(path.into())
    }

    /// The CA certificate(s) in this PEM text.
    pub fn pem(pem: impl Into<Vec<u8>>) -> Self {
        Self::Pem(pem.into())
    }

    /// Adds the certificate(s) to `roots`; an error names the file.
    fn add_to(&self, roots: &mut RootCertStore) -> Result<()> {
        let (what, pem) = match self {
            Self::File(path) => {
                let what = format!("CA certificate {}", path.display());
                let pem = std::fs::read(path)
                    .map_err(|e| Error::Options(format!("{what}: cannot read it: {e}")))?;
                (what, pem)
            }
            Self::Pem(pem) => ("CA certificate".to_owned(), pem.clone()),
        };
        let certificates = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Options(format!("{what}: not valid PEM: {e}")))?;
        if certificates.is_empty() {
            return Err(Error::Options(format!(
                "{what}: no PEM `CERTIFICATE` block in it"
            )));
        }
        for certificate in certificates {
            roots
                .add(certificate)
                .map_err(|e| Error::Options(format!("{what}: not a usable CA certificate: {e}")))?;
        }
        Ok(())
    }
}

/// The system's root certificates, read once per process (what a client trusts without
/// a [`CaCertificate`]).
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            tracing::debug!(%error, "a system root certificate could not be read");
        }
        found.certs
    })
}

/// A `reqwest` client builder ready for Tally's API over `http://` or `https://`:
/// Makes ring the process's rustls provider, unless one is installed already: async-nats
/// builds its TLS configuration with the process's provider, and rustls has none when an
/// application links a second one (aws-lc-rs, which many HTTP clients turn on).
pub(crate) fn install_provider() {
    // An error only says a provider is installed already, which is all this wants.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// TLS 1.2 or 1.3 with rustls on ring, trusting the system's roots and `ca`. The SDK's
/// HTTP transport uses it; so can anything else that talks to the API (set timeouts or
/// pools on it, but not `reqwest`'s own TLS options, which this configuration replaces).
pub fn http_client(ca: Option<&CaCertificate>) -> Result<reqwest::ClientBuilder> {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(system_roots().iter().cloned());
    if let Some(ca) = ca {
        ca.add_to(&mut roots)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Options(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // This build of reqwest speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(reqwest::Client::builder().tls_backend_preconfigured(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_that_is_not_pem_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "hello\n").unwrap();
        let e = http_client(Some(&CaCertificate::file(&path)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ca.pem") && e.contains("no PEM"), "{e}");

        let missing = CaCertificate::file(dir.path().join("missing.pem"));
        let e = http_client(Some(&missing)).unwrap_err().to_string();
        assert!(e.contains("missing.pem: cannot read it"), "{e}");
    }

    #[test]
    fn a_client_builds_without_a_ca() {
        http_client(None).unwrap().build().unwrap();
    }
}
