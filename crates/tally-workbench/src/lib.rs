//! Tally's proving ground, run by `tally demo`, `tally chaos` and `tally bench`:
//!
//! - [`workload`]: a realistic month of usage (a few large customers and a long tail,
//!   malformed events and duplicates at set rates) and its publisher;
//! - [`demo`]: the whole pipeline on the embedded default, checked against an
//!   independent replay, with the month's invoices, overage and adoption;
//! - [`chaos`]: the fault suite (workers killed, nats-server restarted, the lake refusing
//!   writes) and the exactness check after it;
//! - [`bench`]: the benchmarks of ingest, the quota engine, checks, recovery, queries and
//!   HTTP, whose figures BENCHMARKS.md records.

pub mod bench;
pub mod chaos;
pub mod demo;
pub mod workload;

/// Starts a local S3-compatible server (`s3s-fs`, see `scripts/install-s3.sh`) under `dir`
/// and returns it with the lake's location in its bucket (prefix `lake`).
pub fn start_s3(
    dir: &std::path::Path,
) -> anyhow::Result<(tally_s3d::S3Server, tally_store::S3Location)> {
    use anyhow::Context as _;
    let server = tally_s3d::S3Server::start(tally_s3d::ServerOptions::new(dir))
        .context("starting the S3 server (scripts/install-s3.sh installs s3s-fs)")?;
    let location = tally_store::S3Location {
        bucket: server.bucket().to_owned(),
        prefix: "lake".to_owned(),
        endpoint: Some(server.endpoint()),
        region: server.region().to_owned(),
        access_key_id: server.access_key().to_owned(),
        secret_access_key: server.secret_key().to_owned(),
    };
    Ok((server, location))
}
