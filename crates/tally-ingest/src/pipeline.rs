//! A running worker and its lake writer: NATS → ingest worker → bounded channel → lake.
//!
//! The worker decides and seals batches; the writer ([`tally_store::run_writer`]) makes
//! each durable as a Parquet file, and only then are its messages acknowledged. Shutdown
//! is ordered: cancel stops the pulls, each partition seals and sends its open batch, the
//! writer makes it durable, the batch is acknowledged, and only then does the writer
//! stop.

use std::sync::Arc;

use tally_core::FlushRequest;
use tally_store::{Lake, WriterStats, run_writer};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::checks::{LocalChecks, Responder};
use crate::ownership::Assignment;
use crate::{Error, IngestConfig, NatsEndpoint, Result, Service, Stats, run_worker};

/// Where the worker's batches go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LakeWriter {
    /// Where the lake is.
    pub location: tally_store::Location,
    /// Sealed batches waiting for the writer, across all partitions.
    pub queue: usize,
    /// Parquet files encoded (and fsynced) at once.
    pub concurrency: usize,
}

/// A running ingest worker and its lake writer.
pub struct Pipeline {
    /// Checks this worker answers in-process, for an API served beside it.
    pub local_checks: Option<LocalChecks>,
    pub stats: Arc<Stats>,
    pub writer_stats: Arc<WriterStats>,
    cancel: CancellationToken,
    worker: JoinHandle<Result<()>>,
    writer: JoinHandle<()>,
}

impl Pipeline {
    /// Starts a worker over exactly `partitions`, or over a fair share of all of them
    /// among the live workers when `None` (all of them when it is the only one). `js` is
    /// the process's connection to the server at `url`; the leases and the checks get
    /// connections of their own.
    pub async fn start(
        nats: &NatsEndpoint,
        ingest: &IngestConfig,
        lake: LakeWriter,
        partitions: Option<Vec<u16>>,
    ) -> Result<Pipeline> {
        let (flush_tx, flush_rx) = mpsc::channel::<FlushRequest>(lake.queue);
        let cancel = CancellationToken::new();
        let writer_stats = Arc::new(WriterStats::default());
        let store = Arc::new(Lake::open(&lake.location).map_err(|e| Error::Store(e.to_string()))?);
        let writer = tokio::spawn(run_writer(
            store.clone(),
            flush_rx,
            lake.concurrency,
            writer_stats.clone(),
            cancel.clone(),
        ));
        let stats = Arc::new(Stats::default());
        let assignment = match partitions {
            Some(list) => Assignment::Fixed(list),
            None => Assignment::Shared,
        };
        let js = async_nats::jetstream::new(nats.connect(Service::Worker, "tally-worker").await?);
        let js = &js;
        // Create the streams before returning, so publishers can start at once.
        let partitions = crate::topology::ensure_streams(js, ingest).await?;
        let candidates = assignment.candidates(partitions.current());
        crate::topology::ensure_consumers(js, ingest, &partitions, &candidates).await?;
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let leases = nats.connect(Service::Worker, "tally-leases").await?;
        let responder =
            Responder::start(&nats.url, nats.options(Service::Worker, "tally-checks")?).await?;
        let mut worker = tokio::spawn(run_worker(
            js.clone(),
            async_nats::jetstream::new(leases),
            responder,
            ingest.clone(),
            assignment,
            store,
            flush_tx,
            stats.clone(),
            cancel.clone(),
            ready_tx,
        ));
        // Return once the entitlements are loaded and checks are answered, or with the
        // worker's error.
        let Ok(local_checks) = ready.await else {
            return Err(match (&mut worker).await {
                Ok(Err(e)) => e,
                Ok(Ok(())) => Error::Stopped("the ingest worker stopped while starting".into()),
                Err(e) => Error::Stopped(format!("the ingest worker panicked: {e}")),
            });
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
    pub async fn shutdown(self) -> Result<()> {
        self.cancel.cancel();
        let worker = self
            .worker
            .await
            .map_err(|e| Error::Stopped(format!("the ingest worker panicked: {e}")))?;
        // The worker dropped its channel senders; the writer finishes what it holds.
        self.writer
            .await
            .map_err(|e| Error::Stopped(format!("the lake writer panicked: {e}")))?;
        worker
    }
}
