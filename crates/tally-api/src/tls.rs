//! HTTPS for the API: the certificate chain and private key from PEM files (`api.tls_cert`,
//! `api.tls_key`), rustls on the ring provider (TLS 1.2 and 1.3, ALPN `http/1.1`), and a
//! listener that runs each handshake in a task of its own beside the accept loop, so that
//! a slow or failing client holds up no other. A failed handshake is the client's
//! business: it is logged at DEBUG, never above.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client has to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; beyond, accepting waits and the kernel's backlog holds
/// the next connections.
const MAX_HANDSHAKES: usize = 256;

/// Why the TLS settings cannot be used; each names its configuration key and file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// One of the two keys without the other.
    #[error("api.tls_cert and api.tls_key go together: set both, or neither for plain HTTP")]
    Incomplete,
    #[error("{key}: cannot read {}: {source}", path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{key}: {} is not a valid PEM file: {detail}", path.display())]
    Pem {
        key: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("api.tls_cert: {} holds no certificate (PEM `CERTIFICATE` block)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("api.tls_key: {} holds no private key (PEM `PRIVATE KEY` block: PKCS#8, PKCS#1 or SEC1)", path.display())]
    NoKey { path: PathBuf },
    /// rustls refused the pair: an unsupported key, a certificate that does not parse, or a
    /// key that is not the certificate's.
    #[error("api.tls_key: {} cannot serve the certificate in {}: {source}", key.display(), cert.display())]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// Reads the certificate chain (the server's certificate first) and its private key, and
/// makes the server's TLS configuration.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = read_certificates(cert)?;
    let private_key = read_key(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, private_key))
        .map_err(|source| TlsError::Pair {
            cert: cert.to_owned(),
            key: key.to_owned(),
            source,
        })?;
    // axum serves HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.to_owned(),
        source,
    })
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read("api.tls_cert", path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            key: "api.tls_cert",
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("api.tls_key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_owned(),
        },
        e => TlsError::Pem {
            key: "api.tls_key",
            path: path.to_owned(),
            detail: e.to_string(),
        },
    })
}

/// Connections that completed their TLS handshake, for `axum::serve`. Dropping it stops
/// accepting and abandons the handshakes in progress.
pub struct TlsListener {
    local_addr: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    accepting: JoinHandle<()>,
}

impl TlsListener {
    /// Accepts on `listener` and hands over the connections whose handshake succeeded.
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> io::Result<TlsListener> {
        let local_addr = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(16);
        let accepting = tokio::spawn(accept(listener, TlsAcceptor::from(config), tx));
        Ok(TlsListener {
            local_addr,
            ready,
            accepting,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        // The accept loop owns the handshake tasks: they end with it.
        self.accepting.abort();
    }
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept loop ends only when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

/// Accepts TCP connections and runs each handshake in a task of its own (at most
/// [`MAX_HANDSHAKES`] at once), handing the established ones to `ready`.
async fn accept(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let mut handshakes = JoinSet::new();
    loop {
        while handshakes.try_join_next().is_some() {}
        if handshakes.len() >= MAX_HANDSHAKES {
            handshakes.join_next().await;
            continue;
        }
        let (tcp, addr) = match listener.accept().await {
            Ok(connection) => connection,
            Err(e) => {
                accept_failed(e).await;
                continue;
            }
        };
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        handshakes.spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    // Fails only when the server stopped accepting: the connection closes.
                    let _ = ready.send((tls, addr)).await;
                }
                Ok(Err(error)) => tracing::debug!(%addr, %error, "tls handshake failed"),
                Err(_) => tracing::debug!(%addr, "tls handshake timed out"),
            }
        });
    }
}

/// What `axum::serve` does with a failed accept: a connection that went away is nothing;
/// anything else (out of file descriptors) is logged, and accepting pauses a second.
async fn accept_failed(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "api cannot accept connections");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_missing_file_is_named_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = write(dir.path(), "key.pem", "");
        let missing = dir.path().join("nope.pem");
        let e = server_config(&missing, &key).unwrap_err().to_string();
        assert!(e.starts_with("api.tls_cert: cannot read "), "{e}");
        assert!(e.contains("nope.pem"), "{e}");
    }

    #[test]
    fn files_without_pem_blocks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let text = write(dir.path(), "text.pem", "not a certificate\n");
        let e = server_config(&text, &text).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");

        let cert = write(
            dir.path(),
            "cert.pem",
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        );
        let e = server_config(&cert, &text).unwrap_err();
        assert!(matches!(e, TlsError::NoKey { .. }), "{e}");
        assert!(e.to_string().starts_with("api.tls_key: "), "{e}");

        let broken = write(
            dir.path(),
            "broken.pem",
            "-----BEGIN CERTIFICATE-----\nMIIB\n",
        );
        let e = server_config(&broken, &text).unwrap_err();
        assert!(
            matches!(
                e,
                TlsError::Pem {
                    key: "api.tls_cert",
                    ..
                }
            ),
            "{e}"
        );
    }
}
