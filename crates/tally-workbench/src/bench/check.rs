//! `tally bench check`: entitlement checks over NATS request-reply at a fixed offered
//! rate, with their round-trip latency.
//!
//! Starts the embedded nats-server and a worker with the demo catalogue and customers,
//! then sends `--rate` checks a second for `--seconds` (random customers by the demo's
//! power law, random features), each timed from the request to its reply on loopback.
//!
//! The checks come from a client of their own, as an application's would: a second NATS
//! connection on a runtime and thread apart from the worker's. Each check leaves at its own
//! moment (`i / rate` after the start, however many are still waiting for a reply), so the
//! latency is that of an open load, not of a fixed number of senders that wait their turn;
//! a thread sleeping to each moment spreads them within the millisecond that tokio's timer
//! would send them together in.

use std::time::{Duration, Instant};
use tally_node::pipeline::Service;

use clap::Args;
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tally_ingest::checks::{CheckRequest, check};

use super::BenchFormat;
use crate::workload::{self, PowerLaw, Spec};
use tally_node::config::Config;
use tally_node::pipeline::{self, Nats};

#[derive(Args)]
pub struct CheckBench {
    /// Checks offered per second.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 1_000)]
    customers: u32,
    /// As across hosts: nats-server with TLS only, the checks asked through a connection
    /// authenticated with an `sdk` API key, as an application asks them.
    #[arg(long)]
    secure: bool,
    /// `--secure` without TLS: the load authenticated with an `sdk` API key, in plain.
    #[arg(long, conflicts_with = "secure")]
    authenticated: bool,
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
    let mut secure = match (args.secure, args.authenticated) {
        (false, false) => None,
        (tls, _) => Some(super::secure::Secure::start(&mut config, temp.path(), tls).await?),
    };
    let nats = Nats::connect(&config, Service::Admin).await?;
    let connect = match secure.as_mut() {
        Some(secure) => {
            secure.serve(&config, &nats).await?;
            secure.connect_options()?
        }
        None => super::secure::operator_options(&config)?,
    };
    crate::demo::load_definitions(&nats, &spec, "tally-bench").await?;
    config.ingest.enforce = true;
    let pipeline = pipeline::start(&config, &nats, None).await?;

    let offer = Offer {
        url: nats.url.clone(),
        connect,
        partitions: config.ingest.partitions,
        rate: args.rate.max(1),
        total: args.rate * args.seconds,
        customers: args.customers.max(1),
    };
    let start = Instant::now();
    let (latency, failures) = tokio::task::spawn_blocking(move || offer.run()).await??;
    let seconds = start.elapsed().as_secs_f64();
    pipeline.shutdown().await?;
    if let Some(secure) = secure {
        secure.stop().await?;
    }

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

/// The load generator's part: what to offer, and where.
struct Offer {
    url: String,
    connect: async_nats::ConnectOptions,
    partitions: u16,
    rate: u64,
    total: u64,
    customers: u32,
}

impl Offer {
    /// Sends every check at its moment and waits for the last reply: the round trips and
    /// how many failed.
    fn run(self) -> anyhow::Result<(Histogram<u64>, u64)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = runtime.block_on(
            self.connect
                .connect(tally_core::subject::server_urls(&self.url)),
        )?;
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Option<u64>>();
        let handle = runtime.handle().clone();
        // The runtime runs the connection and the requests on a thread of its own while
        // this one paces.
        let receiver = std::thread::spawn(move || {
            runtime.block_on(async move {
                let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
                let mut failures = 0u64;
                while let Some(done) = done_rx.recv().await {
                    match done {
                        Some(us) => latency.saturating_record(us),
                        None => failures += 1,
                    }
                }
                anyhow::Ok((latency, failures))
            })
        });
        let features = workload::features(20);
        let weights = PowerLaw::new(self.customers as usize, 0.9);
        let mut rng = SmallRng::seed_from_u64(7);
        let start = Instant::now();
        for i in 0..self.total {
            let due = start + Duration::from_secs_f64(i as f64 / self.rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let request = CheckRequest {
                customer: workload::customer_id(weights.pick(&mut rng) as u32),
                feature: features[rng.random_range(0..features.len())].to_owned(),
                quantity: 1.0,
                time: None,
                region: None,
                user: None,
            };
            let (client, done, partitions) = (client.clone(), done_tx.clone(), self.partitions);
            handle.spawn(async move {
                let sent = Instant::now();
                let answer = check(&client, partitions, &request, Duration::from_secs(5)).await;
                let _ = done.send(answer.ok().map(|_| sent.elapsed().as_micros() as u64));
            });
        }
        drop(done_tx);
        receiver
            .join()
            .map_err(|_| anyhow::anyhow!("the load generator's runtime panicked"))?
    }
}
