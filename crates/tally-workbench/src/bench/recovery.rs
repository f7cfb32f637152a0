//! `tally bench recovery`: how long a starting worker takes to take its partitions over
//! when they hold many live counters.
//!
//! On the embedded nats-server, `--customers` customers (on a plan with every feature
//! metered) each use `--features` features once, so the partitions hold customers ×
//! features live counters; a worker ingests that and stops cleanly (every partition
//! checkpoints). Then two starts are timed, from the call that starts the worker to the
//! moment every partition is taken over and pulling:
//!
//! 1. **from checkpoints**: the normal case, a restart or a take-over from a worker that
//!    checkpointed within `checkpoint_secs`;
//! 2. **from the lake alone**: the checkpoints deleted, so every row is replayed (the
//!    worst case: a partition that never checkpointed).
//!
//! Both include loading the customers' definitions from the key-value buckets.

use std::time::{Duration, Instant};
use tally_node::pipeline::Service;

use clap::Args;
use indicatif::ProgressBar;
use serde::Serialize;
use tally_ingest::Stats;

use super::BenchFormat;
use crate::demo::{entitle_unlimited, wait_drained};
use crate::workload::{self, OutMessage};
use tally_node::config::Config;
use tally_node::pipeline::{self, Nats};

#[derive(Args)]
pub struct RecoveryBench {
    /// Customers, each using every feature once.
    #[arg(long, default_value_t = 50_000)]
    customers: u32,
    /// Features per customer (at most 24).
    #[arg(long, default_value_t = 20)]
    features: u32,
    #[arg(long, value_enum, default_value_t = BenchFormat::Table)]
    format: BenchFormat,
}

#[derive(Debug, Serialize)]
pub struct RecoveryReport {
    pub customers: u32,
    pub features: u32,
    /// Counters the partitions' checkpoints held.
    pub counters: u64,
    /// Rows in the lake.
    pub rows: u64,
    /// Start to every partition taken over, from checkpoints.
    pub from_checkpoints_ms: u64,
    /// Start to every partition taken over, replaying every row of the lake.
    pub from_lake_ms: u64,
    pub rows_replayed: u64,
}

pub async fn run(mut config: Config, args: RecoveryBench) -> anyhow::Result<RecoveryReport> {
    let temp = tempfile::Builder::new()
        .prefix("tally-bench-recovery-")
        .tempdir()?;
    config.data_dir = temp.path().to_owned();
    config.nats_url = None;
    config.ingest.enforce = true;
    let nats = Nats::connect(&config, Service::Admin).await?;
    entitle_unlimited(&nats, args.customers, "tally-bench").await?;
    let features = workload::features(args.features);
    let messages = messages(args.customers, features);
    let rows = u64::from(args.customers) * features.len() as u64;

    let pipeline = pipeline::start(&config, &nats, None).await?;
    workload::publish(
        &nats.jetstream,
        &messages,
        workload::MAX_ACKS_IN_FLIGHT,
        |_| {},
    )
    .await?;
    drop(messages);
    wait_drained(
        &nats,
        &tally_store::Lake::open(&config.lake())?,
        config.ingest.partitions,
        &pipeline.stats,
        rows,
        &ProgressBar::hidden(),
        &pipeline,
        Duration::from_secs(1800),
    )
    .await?;
    pipeline.shutdown().await?;

    let partitions = u64::from(config.ingest.partitions);
    let (from_checkpoints, stats) = time_take_over(&config, &nats, partitions).await?;
    let counters = Stats::get(&stats.counters_restored);
    anyhow::ensure!(
        counters == rows,
        "the checkpoints held {counters} counters, not {rows}"
    );
    std::fs::remove_dir_all(config.lake_dir().join("checkpoints"))?;
    let (from_lake, stats) = time_take_over(&config, &nats, partitions).await?;
    let rows_replayed = Stats::get(&stats.replayed);
    anyhow::ensure!(
        rows_replayed == rows,
        "{rows_replayed} rows replayed, not {rows}"
    );
    let report = RecoveryReport {
        customers: args.customers,
        features: features.len() as u32,
        counters,
        rows,
        from_checkpoints_ms: from_checkpoints.as_millis() as u64,
        from_lake_ms: from_lake.as_millis() as u64,
        rows_replayed,
    };
    match args.format {
        BenchFormat::Json => println!("{}", serde_json::to_string(&report)?),
        BenchFormat::Table => println!(
            "take-over of {} counters ({} rows in the lake): {} ms from checkpoints, {} ms replaying the lake",
            report.counters, report.rows, report.from_checkpoints_ms, report.from_lake_ms
        ),
    }
    Ok(report)
}

/// Starts a worker and times it until every partition is taken over; stops it again.
async fn time_take_over(
    config: &Config,
    nats: &Nats,
    partitions: u64,
) -> anyhow::Result<(Duration, std::sync::Arc<Stats>)> {
    let started = Instant::now();
    let pipeline = pipeline::start(config, nats, None).await?;
    while Stats::get(&pipeline.stats.takeovers) < partitions {
        anyhow::ensure!(!pipeline.is_finished(), "the worker stopped while starting");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    let stats = pipeline.stats.clone();
    pipeline.shutdown().await?;
    Ok((took, stats))
}

/// One message per customer with one event per feature.
fn messages(customers: u32, features: &[&str]) -> Vec<OutMessage> {
    let now = chrono::Utc::now().to_rfc3339();
    (0..customers)
        .map(|c| {
            let customer = workload::customer_id(c);
            let events: Vec<serde_json::Value> = features
                .iter()
                .enumerate()
                .map(|(f, feature)| {
                    serde_json::json!({
                        "specversion": "1.0",
                        "id": format!("{customer}-{f}"),
                        "source": "tally-bench",
                        "type": "usage",
                        "subject": customer,
                        "time": now,
                        "data": {"feature": feature, "quantity": 1},
                    })
                })
                .collect();
            OutMessage {
                subject: tally_core::subject::events_subject(&customer),
                msg_id: format!("{customer}-all"),
                payload: serde_json::to_vec(&events).unwrap_or_default().into(),
                events: features.len() as u32,
                arrow: false,
            }
        })
        .collect()
}
