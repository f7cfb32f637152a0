//! Wiring: NATS (external or embedded) → ingest worker → bounded channel → lake writer.
//!
//! Shutdown is ordered: cancel stops the pulls, each partition seals and sends its open
//! batch, the writer makes it durable, the batch is acknowledged, and only then does the
//! writer stop and the embedded nats-server go down.

use std::sync::Arc;

use anyhow::Context as _;
use tally_core::FlushRequest;
use tally_ingest::ownership::Assignment;
use tally_ingest::{Stats, run_worker};
use tally_natsd::{NatsServer, ServerOptions};
use tally_store::{Lake, WriterStats, run_writer};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// A NATS connection, with the local server it runs on when Tally started one.
pub struct Nats {
    /// Where the server listens (the embedded one's loopback address, or `nats_url`).
    pub url: String,
    pub client: async_nats::Client,
    pub jetstream: async_nats::jetstream::Context,
    /// The embedded server, stopped when this is dropped.
    pub server: Option<NatsServer>,
}

impl Nats {
    /// Connects to `config.nats_url`, or starts the embedded nats-server first.
    pub async fn connect(config: &Config) -> anyhow::Result<Nats> {
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
                let server = tokio::task::spawn_blocking(move || NatsServer::start(options))
                    .await?
                    .context("starting the embedded nats-server")?;
                tracing::info!(url = %server.url(), dir = %server.data_dir().display(), "embedded nats-server started");
                (server.url(), Some(server))
            }
        };
        let client = connect_options("tally")
            .connect(&url)
            .await
            .with_context(|| format!("connecting to NATS at {url}"))?;
        let jetstream = async_nats::jetstream::new(client.clone());
        Ok(Nats {
            url,
            client,
            jetstream,
            server,
        })
    }
}

/// How every connection of a Tally process is made. A process started while its server is
/// down (a worker restarted during a NATS restart) waits for it instead of failing: the
/// first connection is retried as a dropped one would be.
pub fn connect_options(name: &str) -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(std::time::Duration::from_secs(5))
}

/// A running ingest worker and its lake writer.
pub struct Pipeline {
    /// Checks this worker answers in-process, for an API served beside it.
    pub local_checks: Option<tally_ingest::checks::LocalChecks>,
    pub stats: Arc<Stats>,
    pub writer_stats: Arc<WriterStats>,
    cancel: CancellationToken,
    worker: JoinHandle<tally_ingest::Result<()>>,
    writer: JoinHandle<()>,
}

impl Pipeline {
    /// Starts a worker over exactly `partitions`, or over a fair share of all of them
    /// among the live workers when `None` (all of them when it is the only one).
    pub async fn start(
        config: &Config,
        nats: &Nats,
        partitions: Option<Vec<u16>>,
    ) -> anyhow::Result<Pipeline> {
        crate::metrics::install();
        let lake = Arc::new(Lake::new(config.lake_dir()));
        let (flush_tx, flush_rx) = mpsc::channel::<FlushRequest>(config.writer_queue);
        let cancel = CancellationToken::new();
        let writer_stats = Arc::new(WriterStats::default());
        let writer = tokio::spawn(run_writer(
            lake.clone(),
            flush_rx,
            config.writer_concurrency,
            writer_stats.clone(),
            cancel.clone(),
        ));
        let stats = Arc::new(Stats::default());
        let assignment = match partitions {
            Some(list) => Assignment::Fixed(list),
            None => Assignment::Shared,
        };
        // Create the streams before returning, so publishers can start at once.
        tally_ingest::topology::ensure_streams(&nats.jetstream, &config.ingest).await?;
        tally_ingest::topology::ensure_consumers(
            &nats.jetstream,
            &config.ingest,
            &assignment.candidates(config.ingest.partitions),
        )
        .await?;
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let leases = connect_options("tally-leases")
            .connect(&nats.url)
            .await
            .with_context(|| format!("connecting to NATS at {} for the leases", nats.url))?;
        let responder =
            tally_ingest::checks::Responder::start(&nats.url, connect_options("tally-checks"))
                .await
                .with_context(|| format!("connecting to NATS at {} for the checks", nats.url))?;
        let mut worker = tokio::spawn(run_worker(
            nats.jetstream.clone(),
            async_nats::jetstream::new(leases),
            responder,
            config.ingest.clone(),
            assignment,
            lake,
            flush_tx,
            stats.clone(),
            cancel.clone(),
            ready_tx,
        ));
        // Return once the entitlements are loaded and checks are answered, or with the
        // worker's error.
        let Ok(local_checks) = ready.await else {
            let failed = (&mut worker).await.context("ingest worker panicked")?;
            failed.context("starting the ingest worker")?;
            anyhow::bail!("the ingest worker stopped while starting");
        };
        Ok(Pipeline {
            local_checks,
            stats,
            writer_stats,
            cancel,
            worker,
            writer,
        })
    }

    /// The token that stops this pipeline; cancelled too when a partition fails.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Whether the worker stopped by itself (it failed).
    pub fn is_finished(&self) -> bool {
        self.worker.is_finished()
    }

    /// Drains and stops: every open batch is made durable and acknowledged first.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.cancel.cancel();
        let worker = self.worker.await.context("ingest worker panicked")?;
        // The worker dropped its channel senders; the writer finishes what it holds.
        self.writer.await.context("lake writer panicked")?;
        worker.context("ingest worker failed")?;
        Ok(())
    }
}
