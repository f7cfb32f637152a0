//! `tally bench check`: entitlement checks over NATS request-reply at a fixed offered
//! rate, with their round-trip latency.
//!
//! Starts the embedded nats-server and a worker with the demo catalogue and customers,
//! then sends `--rate` checks a second for `--seconds` (random customers by the demo's
//! power law, random features), each timed from the request to its reply on loopback.

use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tally_ingest::checks::{CheckRequest, check};

use super::BenchFormat;
use crate::config::Config;
use crate::pipeline::{Nats, Pipeline};
use crate::workload::{self, PowerLaw, Spec};

#[derive(Args)]
pub struct CheckBench {
    /// Checks offered per second.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 1_000)]
    customers: u32,
    /// Requests in flight at most (the senders).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, value_enum, default_value_t = BenchFormat::Table)]
    format: BenchFormat,
}

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub offered_per_sec: u64,
    pub checks: u64,
    pub failures: u64,
    pub seconds: f64,
    pub checks_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

pub async fn run(mut config: Config, args: CheckBench) -> anyhow::Result<std::process::ExitCode> {
    let temp = tempfile::Builder::new()
        .prefix("tally-bench-check-")
        .tempdir()?;
    if config.nats_url.is_none() {
        config.data_dir = temp.path().to_owned();
    }
    let mut spec = Spec::new(0, chrono::Utc::now().date_naive());
    spec.customers = args.customers;
    let nats = Nats::connect(&config).await?;
    crate::demo::load_definitions(&nats, &spec, "tally-bench").await?;
    config.ingest.enforce = true;
    let pipeline = Pipeline::start(&config, &nats, None).await?;

    let features = workload::features(20);
    let total = args.rate * args.seconds;
    let senders = args.concurrency.max(1) as u64;
    let interval = Duration::from_secs_f64(senders as f64 / args.rate.max(1) as f64);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..senders {
        let client = nats.client.clone();
        let partitions = config.ingest.partitions;
        let weights = PowerLaw::new(args.customers.max(1) as usize, 0.9);
        tasks.spawn(async move {
            let mut rng = SmallRng::seed_from_u64(s);
            let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut failures = 0u64;
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for _ in 0..total / senders {
                ticks.tick().await;
                let request = CheckRequest {
                    customer: workload::customer_id(weights.pick(&mut rng) as u32),
                    feature: features[rng.random_range(0..features.len())].to_owned(),
                    quantity: 1.0,
                    time: None,
                    region: None,
                    user: None,
                };
                let sent = Instant::now();
                match check(&client, partitions, &request, Duration::from_secs(5)).await {
                    Ok(_) => latency.saturating_record(sent.elapsed().as_micros() as u64),
                    Err(_) => failures += 1,
                }
            }
            anyhow::Ok((latency, failures))
        });
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut failures = 0;
    while let Some(done) = tasks.join_next().await {
        let (h, f) = done??;
        latency.add(&h)?;
        failures += f;
    }
    let seconds = start.elapsed().as_secs_f64();
    pipeline.shutdown().await?;

    let report = CheckReport {
        offered_per_sec: args.rate,
        checks: latency.len(),
        failures,
        seconds,
        checks_per_sec: latency.len() as f64 / seconds,
        p50_us: latency.value_at_quantile(0.5),
        p99_us: latency.value_at_quantile(0.99),
        p999_us: latency.value_at_quantile(0.999),
        max_us: latency.max(),
    };
    match args.format {
        BenchFormat::Json => println!("{}", serde_json::to_string(&report)?),
        BenchFormat::Table => println!(
            "checks: {} answered ({} failed) in {:.2} s, {:.0}/s (offered {}/s); round trip p50 {} µs, p99 {} µs, p999 {} µs, max {} µs",
            report.checks,
            report.failures,
            report.seconds,
            report.checks_per_sec,
            report.offered_per_sec,
            report.p50_us,
            report.p99_us,
            report.p999_us,
            report.max_us
        ),
    }
    Ok(std::process::ExitCode::SUCCESS)
}
