//! Test certificates, made at run time with rcgen: a private CA, and a server certificate
//! it signed for `localhost` and `127.0.0.1`, written as PEM files (the API and
//! nats-server read files) in a temporary directory removed on drop.
//!
//! Their validity runs from 1975 to 4096 (rcgen's default): no test depends on today.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A private CA and a server certificate it signed, as files.
pub struct TestCerts {
    pub dir: tempfile::TempDir,
    /// `ca.pem`: the CA's certificate, what clients trust.
    pub ca: PathBuf,
    /// `server.pem`: the server's certificate (for `localhost`, `127.0.0.1`).
    pub cert: PathBuf,
    /// `server-key.pem`: its private key (PKCS#8).
    pub key: PathBuf,
}

impl TestCerts {
    /// A new CA (its own key) and a server certificate signed by it.
    pub fn new() -> TestCerts {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Tally test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        TestCerts {
            ca: write("ca.pem", ca_cert.pem()),
            cert: write("server.pem", cert.pem()),
            key: write("server-key.pem", key.serialize_pem()),
            dir,
        }
    }

    /// The CA's certificate as PEM text.
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(&self.ca).unwrap()
    }
}
