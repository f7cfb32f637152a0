//! A private certificate authority and a server certificate signed by it, for TLS between
//! a deployment's hosts when it has no CA of its own (`tally nats init --tls-host`), and
//! for tests, which make theirs at run time.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

use crate::{Error, Result};

/// Makes ring the process's rustls provider, unless one is installed already. async-nats
/// builds its TLS configuration with the process's provider, and rustls has none when it
/// links two (the lake's object-store client links aws-lc-rs beside Tally's ring): every
/// NATS connection over TLS goes through a function that calls this first.
pub fn install_provider() {
    // An error only says a provider is installed already, which is all this wants.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The files [`make`] writes: the CA's certificate (what clients trust) and the server's
/// certificate and key. The CA's key is not kept: nothing else is ever signed with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificates {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes a CA and a certificate for `hosts` (names or IP addresses) signed by it, in
/// `dir`: `ca.pem`, `server.pem` and `server-key.pem` (0600). Files already there are kept.
pub fn make(dir: &Path, hosts: &[String]) -> Result<Certificates> {
    let files = Certificates {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
    };
    if files.ca.is_file() && files.cert.is_file() && files.key.is_file() {
        return Ok(files);
    }
    let fail = |e: rcgen::Error| Error::Key {
        path: dir.to_owned(),
        message: format!("making a certificate: {e}"),
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Tally deployment CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().map_err(fail)?).map_err(fail)?;
    let mut server = CertificateParams::new(hosts.to_vec()).map_err(fail)?;
    server.distinguished_name.push(
        DnType::CommonName,
        hosts.first().map_or("tally", String::as_str),
    );
    let key = KeyPair::generate().map_err(fail)?;
    let cert = server.signed_by(&key, &ca).map_err(fail)?;
    fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_owned(),
        source,
    })?;
    crate::auth::write_secret(&files.key, &key.serialize_pem())?;
    crate::auth::write_public(&files.cert, &cert.pem())?;
    crate::auth::write_public(&files.ca, &ca.pem())?;
    Ok(files)
}
