//! A Tally process's parts, as `tally serve`, `tally worker`, `tally api` and the tools in
//! `tally-workbench` assemble them:
//!
//! - [`config`]: the configuration (defaults < file < `TALLY_*` variables);
//! - [`pipeline`]: the NATS connection (to `nats_url`, or to the embedded nats-server it
//!   starts under the data directory) and an ingest worker on the configured lake;
//! - [`api`]: the HTTP API server, with the first admin key made at the first start;
//! - [`metrics`]: the Prometheus recorder the API serves on `/metrics`;
//! - [`output`]: how commands print rows for people and scripts.

pub mod api;
pub mod config;
pub mod metrics;
pub mod output;
pub mod pipeline;

use anyhow::Context as _;

/// The definitions as they are now, from NATS (the embedded server of the data directory
/// when no URL is set), for the reports.
pub async fn definitions(config: &config::Config) -> anyhow::Result<tally_reports::Definitions> {
    let nats = pipeline::Nats::connect(config, pipeline::Service::Admin).await?;
    let buckets =
        tally_ingest::definitions::Definitions::open(&nats.jetstream, nats.replicas).await?;
    tally_reports::Definitions::load(&buckets)
        .await
        .context("reading the plans and customers")
}
