//! The process's NATS connection (to `nats_url`, or to the embedded nats-server it starts)
//! and the worker started on the configured lake ([`tally_ingest::Pipeline`]). The
//! embedded server goes down only after the worker drained.
//!
//! Every connection is made as one of Tally's services with its own credential
//! ([`tally_ingest::NatsEndpoint`]); the embedded server makes the credentials at its
//! first start and enforces them.

use anyhow::Context as _;
use tally_ingest::LakeWriter;
pub use tally_ingest::{NatsEndpoint, Pipeline, Service};
use tally_natsd::{NatsServer, ServerOptions};

use crate::config::Config;

/// A NATS connection, with the local server it runs on when Tally started one.
pub struct Nats {
    /// Where the server listens (the embedded one's loopback address, or `nats_url`).
    pub url: String,
    /// The server and this process's credentials, for its other connections.
    pub endpoint: NatsEndpoint,
    pub client: async_nats::Client,
    pub jetstream: async_nats::jetstream::Context,
    /// Copies of each stream and bucket this process creates (`ingest.replicas`).
    pub replicas: usize,
    /// The embedded server, stopped when this is dropped.
    pub server: Option<NatsServer>,
}

impl Nats {
    /// Connects as `service` to `config.nats_url`, or starts the embedded nats-server first.
    pub async fn connect(config: &Config, service: Service) -> anyhow::Result<Nats> {
        let running = || tally_natsd::running(&config.nats_dir());
        let (url, server) = match &config.nats_url {
            Some(url) => (url.clone(), None),
            // Another tally command already runs the embedded server of this data directory.
            None if let Some(url) = running() => {
                tracing::info!(%url, "using the nats-server of the tally already running on this data directory");
                (url, None)
            }
            None => {
                let mut options = ServerOptions::new(config.nats_dir());
                options.binary = config.nats_server.clone();
                options.credentials = config.nats_credentials_dir();
                let server = tokio::task::spawn_blocking(move || NatsServer::start(options))
                    .await?
                    .context("starting the embedded nats-server")?;
                tracing::info!(url = %server.url(), dir = %server.data_dir().display(), "embedded nats-server started");
                (server.url(), Some(server))
            }
        };
        let endpoint = NatsEndpoint {
            url: url.clone(),
            credentials: config.nats_credentials_dir(),
            ca: config.nats_ca.clone(),
        };
        let client = endpoint
            .connect(service, &format!("tally-{}", service.name()))
            .await
            .with_context(|| format!("connecting to NATS at {url}"))?;
        let jetstream = async_nats::jetstream::new(client.clone());
        Ok(Nats {
            url,
            endpoint,
            client,
            jetstream,
            replicas: config.ingest.replicas,
            server,
        })
    }
}

/// Starts an ingest worker with its lake writer on `config`'s lake: over exactly
/// `partitions`, or a fair share of all of them among the live workers when `None`.
pub async fn start(
    config: &Config,
    nats: &Nats,
    partitions: Option<Vec<u16>>,
) -> anyhow::Result<Pipeline> {
    crate::metrics::install();
    let lake = LakeWriter {
        location: config.lake(),
        queue: config.writer_queue,
        concurrency: config.writer_concurrency,
    };
    Ok(Pipeline::start(&nats.endpoint, &config.ingest, lake, partitions).await?)
}
