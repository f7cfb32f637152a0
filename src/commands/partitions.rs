//! `tally partitions`: the events stream's partition count, and growing it on a running
//! system. How a growth keeps every event once: `tally_ingest::topology::grow`.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use tally_core::access::Service;
use tally_node::config::Config;
use tally_node::output::Format;
use tally_node::pipeline::Nats;

#[derive(Debug, Subcommand)]
pub enum PartitionsCmd {
    /// The partition count now, and the counts before it with the last stream sequence
    /// stored under each.
    ///
    /// Example: tally partitions show --format json
    Show(ShowArgs),
    /// Grow the partition count while Tally runs (16 → 64): workers start their
    /// partitions again on the new count within seconds, and each new partition starts
    /// from its parent's state. A growth that stopped half-way leaves the partitions
    /// waiting for the new count: run it again.
    ///
    /// Example: tally partitions grow --to 64
    Grow(GrowArgs),
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct GrowArgs {
    /// The new partition count: the count the events stream was made with times a power
    /// of two (16 → 32, 64, … 1024), larger than the count now.
    #[arg(long)]
    pub to: u16,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

pub async fn run(config: &Config, cmd: PartitionsCmd) -> anyhow::Result<ExitCode> {
    let nats = Nats::connect(config, Service::Admin).await?;
    let (partitions, format) = match cmd {
        PartitionsCmd::Show(args) => {
            let partitions =
                tally_ingest::topology::ensure_streams(&nats.jetstream, &config.ingest)
                    .await
                    .context("reading the events stream")?;
            (partitions, args.format)
        }
        PartitionsCmd::Grow(args) => {
            tally_ingest::topology::ensure_streams(&nats.jetstream, &config.ingest)
                .await
                .context("reading the events stream")?;
            let partitions = tally_ingest::topology::grow(&nats.jetstream, args.to)
                .await
                .context("growing the partitions")?;
            (partitions, args.format)
        }
    };
    match format {
        Format::Json => println!(
            "{}",
            serde_json::json!({
                "partitions": partitions.current(),
                "history": partitions.to_string(),
            })
        ),
        Format::Csv => println!(
            "partitions,history\n{},{}",
            partitions.current(),
            partitions
        ),
        Format::Table => println!(
            "{} partitions (history {partitions}: each count with the last sequence stored under it)",
            partitions.current()
        ),
    }
    Ok(ExitCode::SUCCESS)
}
