//! Where a Tally process connects to NATS, and as whom.
//!
//! Every connection of a Tally process is made as one of its [`Service`]s, with that
//! service's nkey from the deployment's credentials directory (see `tally_natsd::auth`):
//! the server knows each service's permissions, and refuses anyone it does not know.

use std::path::PathBuf;
use std::time::Duration;

use tally_natsd::{Credentials, Service};

use crate::{Error, Result};

/// A NATS deployment as a Tally process reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsEndpoint {
    /// Server URLs, comma-separated (`nats://…`, or `tls://…` for TLS).
    pub url: String,
    /// The credentials directory: `<service>.nk` for each service this process runs.
    pub credentials: PathBuf,
    /// A CA certificate (PEM) trusted for the servers' TLS certificates.
    pub ca: Option<PathBuf>,
}

impl NatsEndpoint {
    /// How a connection as `service` is made. A process started while its server is down
    /// (a worker restarted during a NATS restart) waits for it instead of failing: the
    /// first connection is retried as a dropped one would be.
    pub fn options(&self, service: Service, name: &str) -> Result<async_nats::ConnectOptions> {
        let seed = Credentials::open(&self.credentials)
            .seed(service)
            .map_err(|e| Error::Credentials(e.to_string()))?;
        let mut options = async_nats::ConnectOptions::with_nkey(seed)
            .name(name)
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5));
        if let Some(ca) = &self.ca {
            tally_natsd::tls::install_provider();
            options = options.require_tls(true).add_root_certificates(ca.clone());
        }
        Ok(options)
    }

    /// Connects as `service`.
    pub async fn connect(&self, service: Service, name: &str) -> Result<async_nats::Client> {
        self.options(service, name)?
            .connect(tally_core::subject::server_urls(&self.url))
            .await
            .map_err(|e| Error::nats("connecting", e))
    }
}
