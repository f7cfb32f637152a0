//! `tally compact`: merges the lake's small files into large ones now, as the workers do
//! every `ingest.compact_every_secs`. The rules (what is settled, when a date is closed,
//! why no query sees a row twice or misses one) are `tally_store::compact`'s.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;
use tally_core::Fence;
use tally_store::{CompactOptions, Compacted, Lake};

use tally_node::config::{Config, parse_partitions};
use tally_node::output::Format;

#[derive(Debug, Args)]
pub struct CompactArgs {
    /// Only these partitions, e.g. `0-7` or `0-3,8`; default: every partition in the lake.
    #[arg(long)]
    pub partitions: Option<String>,
    /// Rows a compacted file holds at most.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(2..))]
    pub target_rows: u64,
    /// How long the files a compacted file replaces stay on disk for queries planned
    /// before it appeared, in seconds; those older than this are removed by this run.
    #[arg(long, default_value_t = 900)]
    pub retain_secs: u64,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// What one run did, per partition and in all.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub partitions: usize,
    /// Partitions with no checkpoint yet: nothing of theirs is settled.
    pub unsettled: Vec<u16>,
    pub merged: usize,
    pub written: usize,
    pub rows: u64,
    /// Monthly rollups written for closed months.
    pub monthly: usize,
    pub removed: usize,
}

/// Compacts `config`'s lake once.
pub async fn run(config: &Config, args: CompactArgs) -> anyhow::Result<ExitCode> {
    let lake = Lake::open(&config.lake())?;
    let only = args
        .partitions
        .as_deref()
        .map(|spec| parse_partitions(spec, config.ingest.partitions))
        .transpose()?;
    let options = CompactOptions {
        target_rows: args.target_rows,
        retain: Duration::from_secs(args.retain_secs),
        ..CompactOptions::default()
    };
    let report = tokio::task::spawn_blocking(move || compact(&lake, only, &options))
        .await
        .context("compaction panicked")??;
    match args.format {
        Format::Table => {
            println!(
                "{} partitions: {} files merged into {} ({} rows), {} monthly rollups written; \
                 {} superseded files removed",
                report.partitions,
                report.merged,
                report.written,
                report.rows,
                report.monthly,
                report.removed
            );
            if !report.unsettled.is_empty() {
                println!(
                    "not compacted, no checkpoint yet (a running worker writes one within \
                     ingest.checkpoint_secs): partitions {:?}",
                    report.unsettled
                );
            }
        }
        Format::Json => println!("{}", serde_json::to_string(&report)?),
        Format::Csv => {
            println!("partitions,unsettled,merged,written,rows,monthly,removed");
            let unsettled: Vec<String> = report.unsettled.iter().map(u16::to_string).collect();
            println!(
                "{},{},{},{},{},{},{}",
                report.partitions,
                unsettled.join(" "),
                report.merged,
                report.written,
                report.rows,
                report.monthly,
                report.removed
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Compacts each partition (of `only`, or all) up to its settled sequence.
pub fn compact(
    lake: &Lake,
    only: Option<Vec<u16>>,
    options: &CompactOptions,
) -> anyhow::Result<Report> {
    let Some(_lock) = lake.lock_compaction()? else {
        anyhow::bail!(
            "another compaction is running on {} (a worker's, or another tally compact); \
             try again when it ends",
            lake.storage().url()
        );
    };
    let partitions = match only {
        Some(list) => list,
        None => lake.partitions()?.into_iter().collect(),
    };
    let mut report = Report {
        partitions: partitions.len(),
        ..Report::default()
    };
    let mut done = Compacted::default();
    for p in partitions {
        let Some(settled) = lake.settled_seq(p)? else {
            report.unsettled.push(p);
            continue;
        };
        // No fence: compaction touches settled sequences only, which no writer touches.
        done += lake
            .compact(p, settled, &Fence::open(), options, SystemTime::now())
            .with_context(|| format!("compacting partition {p}"))?;
    }
    done.removed += lake
        .vacuum(options.retain, SystemTime::now())
        .context("removing files no snapshot needs")?;
    report.merged = done.merged;
    report.written = done.written;
    report.rows = done.rows;
    report.monthly = done.monthly;
    report.removed = done.removed;
    Ok(report)
}
