//! `tally bench ingest`: end-to-end events/s and publish-to-durable latency, with an
//! optional JetStream-only baseline measured in the same run. `tally bench quota`: the
//! quota engine alone ([`quota`]); `check`: checks over NATS ([`check`]); `recovery`: a
//! worker taking its partitions over ([`recovery`]); `query`: billing and adoption over a
//! generated month ([`query`]); `meters`: a meter query over a generated month of prompts
//! ([`meters`]); `http`: the HTTP API under load ([`http`]); `lake`: the
//! Delta log's commit rate with every partition flushing ([`lake`]).
//!
//! Messages are generated before the clock starts. The clock runs from the first publish
//! to the moment every partition consumer has nothing pending and nothing unacknowledged
//! (so every event is in a durable Parquet file). Latency is measured per message from the
//! moment JetStream stored it (the publisher's acknowledgement) to the worker's ack after
//! the durable write, and reported as p50 / p99 / p999.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tally_node::pipeline::Service;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::stream::{self, SubjectTransform};
use clap::{Args, Subcommand, ValueEnum};
use futures::StreamExt;
use indicatif::ProgressBar;
use serde::Serialize;

use crate::demo::wait_drained;
use crate::workload::{self, OutMessage, Spec};
use tally_ingest::Stats;
use tally_natsd::{NatsCluster, NatsServer};
use tally_node::config::Config;
use tally_node::pipeline::{self, Nats};

pub mod check;
pub mod failover;
pub mod http;
pub mod lake;
pub mod meters;
pub mod query;
pub mod quota;
pub mod recovery;
pub mod secure;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// End-to-end ingest: publish → decode → Parquet → durable ack.
    ///
    /// Example: tally bench ingest --events 3000000 --batch 100 --baseline --format json
    Ingest(IngestBench),
    /// The quota engine alone: decisions/s on one core, bytes per counter.
    ///
    /// Example: tally bench quota --customers 100000 --features 20 --format json
    Quota(quota::QuotaBench),
    /// Entitlement checks over NATS request-reply at a fixed rate: round-trip latency.
    ///
    /// Example: tally bench check --rate 20000 --seconds 10 --format json
    Check(check::CheckBench),
    /// A starting worker taking over partitions with many live counters: from
    /// checkpoints, and replaying the whole lake.
    ///
    /// Example: tally bench recovery --customers 50000 --features 20 --format json
    Recovery(recovery::RecoveryBench),
    /// A cluster losing a machine at default settings: three NATS nodes, two workers on
    /// data directories of their own, the lake on the S3 server; a worker is killed (the
    /// take-over time), then the events stream's leading NATS node (the pause).
    ///
    /// Example: tally bench failover --rate 20000 --seconds 90 --format json
    Failover(failover::FailoverBench),
    /// Billing and adoption over a generated month in the lake: from the monthly rollups,
    /// from the raw events, and (with --duckdb) DuckDB over the same files.
    /// `benches/query.sh` installs DuckDB and runs it in release.
    ///
    /// Example: tally bench query --events 10000000 --dir /var/tmp/tally-query --format json
    Query(query::QueryBench),
    /// A meter query by customer × day over a generated month of prompts with five live
    /// meters: from the meter rollups, from the raw events' JSON, and (with --duckdb)
    /// DuckDB over the same files. `benches/query.sh meters` installs DuckDB and runs it in
    /// release.
    ///
    /// Example: tally bench meters --events 10000000 --dir /var/tmp/tally-meters --format json
    Meters(meters::MetersBench),
    /// The HTTP API under load from this process, with `tally serve` in another: events
    /// ingest (`--mode ingest`) or entitlement checks (`--mode check`).
    ///
    /// Example: tally bench http --mode ingest --rate 1000 --batch 100 --format json
    Http(http::HttpBench),
    /// The lake alone: every partition flushing at once into the Delta tables, on local
    /// disk or the S3-compatible test server (`--s3`): flushes (commits) per second and
    /// each flush's latency.
    ///
    /// Example: tally bench lake --partitions 16 --rows 1000 --seconds 20 --format json
    Lake(lake::LakeBench),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchFormat {
    Table,
    Json,
}

#[derive(Args)]
pub struct IngestBench {
    /// Events to send. With 16 partitions, fewer than 3,000,000 leave each partition less
    /// than one flush, so the run measures the flush deadline more than throughput.
    #[arg(long, default_value_t = 3_000_000)]
    events: u64,
    /// Events per message.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    #[arg(long, default_value_t = 1_000)]
    customers: u32,
    /// Also measure JetStream alone (publish + consume + ack; no decode, no Parquet).
    #[arg(long)]
    baseline: bool,
    /// Send the compact Arrow IPC encoding instead of CloudEvents JSON.
    #[arg(long)]
    arrow: bool,
    /// Accept every valid event without deciding it against entitlements (to measure what
    /// enforcement costs). By default the demo catalogue and customers are loaded and
    /// every event is decided.
    #[arg(long)]
    no_enforce: bool,
    /// Spread event times over the current month (a replay: many date partitions, so many
    /// more files) instead of over today (live traffic).
    #[arg(long)]
    replay_month: bool,
    /// Offer this many events/s instead of publishing as fast as possible: latency at a
    /// sustainable load rather than at saturation (where it is the backlog's age).
    #[arg(long)]
    rate: Option<u64>,
    /// As across hosts: nats-server with TLS only, and the events sent through a
    /// connection authenticated with an `sdk` API key (the auth callout, per-key
    /// permissions), as an application sends them.
    #[arg(long)]
    secure: bool,
    /// `--secure` without TLS: the load authenticated with an `sdk` API key, in plain.
    #[arg(long, conflicts_with = "secure")]
    authenticated: bool,
    /// The lake in a bucket of a local S3-compatible server (s3s-fs on loopback, started
    /// here) instead of on local disk.
    #[arg(long)]
    s3: bool,
    /// NATS as a cluster of three local nodes, every stream and bucket with three
    /// replicas, instead of one server.
    #[arg(long, conflicts_with_all = ["secure", "authenticated", "baseline"])]
    cluster: bool,
    /// Each event's `data` also holds `tokens` and `model`, properties of its own as
    /// OpenMeter users' events have (JSON only).
    #[arg(long, conflicts_with = "arrow")]
    properties: bool,
    /// Define this many meters (at most 5) of the events' type, grouped by model, before
    /// the run: `SUM` and `MAX` and `LATEST` of `$.tokens`, `COUNT`, `UNIQUE_COUNT` of
    /// `$.user`. Each flush then writes their rollups.
    #[arg(long, default_value_t = 0, requires = "properties", value_parser = clap::value_parser!(u8).range(0..=5))]
    meters: u8,
    #[arg(long, value_enum, default_value_t = BenchFormat::Table)]
    format: BenchFormat,
}

#[derive(Debug, Serialize)]
pub struct IngestReport {
    pub encoding: &'static str,
    /// NATS nodes (1, or 3 with `--cluster`) and the replicas of each stream.
    pub nats_nodes: usize,
    pub replicas: usize,
    /// Where the lake was: `local` or `s3` (s3s-fs on loopback).
    pub lake: &'static str,
    /// Whether the events came over TLS with an API key (`--secure`).
    pub secure: bool,
    /// Whether they came with an API key (`--secure` or `--authenticated`).
    pub authenticated: bool,
    /// Whether every event was decided against entitlements.
    pub enforce: bool,
    /// Whether events carried properties of their own (`--properties`).
    pub properties: bool,
    /// Meters live during the run (`--meters`).
    pub meters: u8,
    pub events: u64,
    pub messages: u64,
    pub batch: usize,
    /// Offered load in events/s; `None`: as fast as possible.
    pub rate: Option<u64>,
    pub seconds: f64,
    pub events_per_sec: f64,
    pub latency_ms_p50: u64,
    pub latency_ms_p99: u64,
    pub latency_ms_p999: u64,
    pub latency_ms_max: u64,
    pub baseline_seconds: Option<f64>,
    pub baseline_events_per_sec: Option<f64>,
    /// Tally's events/s over the baseline's.
    pub ratio_to_baseline: Option<f64>,
    /// CPU time per event (user + system, all threads) of this process (publisher and
    /// Tally) and of the embedded nats-server, over the measured run.
    pub cpu_us_per_event: Option<CpuPerEvent>,
    /// The same over the baseline run (publisher and plain consumers; nats-server).
    pub baseline_cpu_us_per_event: Option<CpuPerEvent>,
}

/// The stream of the JetStream-only baseline.
const BASELINE_STREAM: &str = "TALLY_BASELINE";

#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuPerEvent {
    pub this_process: f64,
    pub nats_server: f64,
}

/// CPU seconds a process's threads have run so far, from the scheduler's own account in
/// `/proc/<pid>/task/*/schedstat` (nanoseconds); `None` where that cannot be read.
/// Threads that have already exited are not counted: none of Tally's or nats-server's
/// exit during a run.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        ns += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e9)
}

/// CPU seconds used so far by this process and by the nats-servers it started (the
/// embedded one, or a cluster's nodes).
#[derive(Clone, Copy)]
struct CpuMark(Option<(f64, f64)>);

impl CpuMark {
    fn now(nats: &Nats, cluster: Option<&NatsCluster>) -> CpuMark {
        let servers: Vec<u32> = match cluster {
            Some(cluster) => cluster.nodes().iter().filter_map(NatsServer::pid).collect(),
            None => nats.server.iter().filter_map(NatsServer::pid).collect(),
        };
        let servers = (!servers.is_empty())
            .then(|| servers.into_iter().map(cpu_seconds).sum::<Option<f64>>())
            .flatten();
        CpuMark(cpu_seconds(std::process::id()).zip(servers))
    }

    fn per_event(self, until: CpuMark, events: u64) -> Option<CpuPerEvent> {
        let ((t0, n0), (t1, n1)) = self.0.zip(until.0)?;
        let per = |s: f64| s * 1e6 / events.max(1) as f64;
        Some(CpuPerEvent {
            this_process: per(t1 - t0),
            nats_server: per(n1 - n0),
        })
    }
}

pub async fn run(config: Config, cmd: BenchCmd) -> anyhow::Result<std::process::ExitCode> {
    match cmd {
        BenchCmd::Ingest(args) => ingest(config, args).await,
        BenchCmd::Quota(args) => tokio::task::spawn_blocking(move || quota::run(args)).await?,
        BenchCmd::Check(args) => check::run(config, args).await,
        BenchCmd::Http(args) => http::run(config, args).await,
        BenchCmd::Query(args) => query::run(args).await,
        BenchCmd::Meters(args) => meters::run(args).await,
        BenchCmd::Lake(args) => tokio::task::spawn_blocking(move || lake::run(args)).await?,
        BenchCmd::Failover(args) => failover::run(config, args)
            .await
            .map(|_| std::process::ExitCode::SUCCESS),
        BenchCmd::Recovery(args) => recovery::run(config, args)
            .await
            .map(|_| std::process::ExitCode::SUCCESS),
    }
}

async fn ingest(mut config: Config, args: IngestBench) -> anyhow::Result<std::process::ExitCode> {
    let temp = tempfile::Builder::new().prefix("tally-bench-").tempdir()?;
    if config.nats_url.is_none() {
        config.data_dir = temp.path().to_owned();
    }
    // Live traffic: event times over today so far, one date partition, as a running
    // system sees them (`tally demo` replays a whole month instead).
    let mut spec = if args.replay_month {
        Spec::new(args.events, crate::demo::this_month())
    } else {
        let mut spec = Spec::new(args.events, chrono::Utc::now().date_naive());
        spec.span = workload::Span::Day;
        spec
    };
    spec.batch = args.batch;
    spec.customers = args.customers;
    spec.arrow = args.arrow;
    spec.properties = args.properties;
    let (messages, totals) = workload::generate(&spec);
    let _s3 = if args.s3 {
        let dir = temp.path().join("s3");
        let (server, location) =
            tokio::task::spawn_blocking(move || crate::start_s3(&dir)).await??;
        config.lake_s3 = Some(location);
        Some(server)
    } else {
        None
    };
    let cluster = if args.cluster {
        let dir = temp.path().join("nats-cluster");
        let binary = config.nats_server.clone();
        let cluster =
            tokio::task::spawn_blocking(move || NatsCluster::start(&dir, 3, binary)).await??;
        config.nats_url = Some(cluster.url());
        config.nats_credentials = Some(cluster.credentials().dir().to_owned());
        config.ingest.replicas = 3;
        Some(cluster)
    } else {
        None
    };
    let mut secure = match (args.secure, args.authenticated) {
        (false, false) => None,
        (tls, _) => Some(secure::Secure::start(&mut config, temp.path(), tls).await?),
    };

    let (baseline, baseline_cpu) = if args.baseline {
        // The embedded case gives each run a fresh server of its own, so that neither
        // inherits the other's streams (memory, duplicate-window maps) or file deletions.
        let mut own = config.clone();
        own.data_dir = config.data_dir.join("baseline");
        let nats = Nats::connect(&own, Service::Admin).await?;
        let mark = CpuMark::now(&nats, None);
        let seconds = baseline(&nats, &own, &messages).await?;
        let cpu = mark.per_event(CpuMark::now(&nats, None), totals.events_valid);
        nats.jetstream.delete_stream(BASELINE_STREAM).await.ok();
        (Some(seconds), cpu)
    } else {
        (None, None)
    };
    let nats = Nats::connect(&config, Service::Admin).await?;
    let load = match secure.as_mut() {
        Some(secure) => {
            secure.serve(&config, &nats).await?;
            secure.connect_options()?
        }
        None => secure::operator_options(&config)?,
    };
    let load = async_nats::jetstream::new(
        load.connect(tally_core::subject::server_urls(&nats.url))
            .await?,
    );

    config.ingest.enforce = !args.no_enforce;
    if config.ingest.enforce {
        crate::demo::load_definitions(&nats, &spec, "tally-bench").await?;
    }
    if args.meters > 0 {
        anyhow::ensure!(
            config.ingest.enforce,
            "meters are rolled up by a worker that follows the catalogue: leave out --no-enforce"
        );
        let defs =
            tally_ingest::definitions::Definitions::open(&nats.jetstream, nats.replicas).await?;
        for meter in meters::prompt_meters("usage", "$.user")
            .iter()
            .take(usize::from(args.meters))
        {
            defs.put_meter(meter, "tally-bench", true)
                .await
                .map_err(|e| anyhow::anyhow!("defining meter {}: {e}", meter.slug))?;
        }
    }
    let pipeline = pipeline::start(&config, &nats, None).await?;
    // The clock starts once every partition has been taken over from the lake: a cold
    // start's recovery is not what publish-to-durable latency measures.
    let taken_over = Instant::now();
    while Stats::get(&pipeline.stats.takeovers) < u64::from(config.ingest.partitions) {
        anyhow::ensure!(
            taken_over.elapsed() < Duration::from_secs(120),
            "the worker took over {} of {} partitions in 120 s",
            Stats::get(&pipeline.stats.takeovers),
            config.ingest.partitions
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mark = CpuMark::now(&nats, cluster.as_ref());
    let start = Instant::now();
    match args.rate {
        None => {
            workload::publish(&load, &messages, workload::MAX_ACKS_IN_FLIGHT, |_| {}).await?;
        }
        Some(rate) => publish_paced(&load, &messages, rate).await?,
    }
    wait_drained(
        &nats,
        &tally_store::Lake::open(&config.lake())?,
        config.ingest.partitions,
        &pipeline.stats,
        totals.events_valid,
        &ProgressBar::hidden(),
        &pipeline,
        Duration::from_secs(3600),
    )
    .await?;
    let seconds = start.elapsed().as_secs_f64();
    let cpu = mark.per_event(CpuMark::now(&nats, cluster.as_ref()), totals.events_valid);
    let latency = pipeline
        .stats
        .stored_to_durable_ms
        .lock()
        .map_err(|_| anyhow::anyhow!("latency histogram poisoned"))?
        .clone();
    pipeline.shutdown().await?;
    if let Some(secure) = secure {
        secure.stop().await?;
    }

    let events_per_sec = totals.events_valid as f64 / seconds;
    let report = IngestReport {
        encoding: if args.arrow { "arrow" } else { "json" },
        nats_nodes: cluster.as_ref().map_or(1, |c| c.nodes().len()),
        replicas: config.ingest.replicas,
        lake: if args.s3 { "s3" } else { "local" },
        secure: args.secure,
        authenticated: args.secure || args.authenticated,
        enforce: config.ingest.enforce,
        properties: args.properties,
        meters: args.meters,
        events: totals.events_valid,
        messages: messages.len() as u64,
        batch: args.batch,
        rate: args.rate,
        seconds,
        events_per_sec,
        latency_ms_p50: latency.value_at_quantile(0.5),
        latency_ms_p99: latency.value_at_quantile(0.99),
        latency_ms_p999: latency.value_at_quantile(0.999),
        latency_ms_max: latency.max(),
        baseline_seconds: baseline,
        baseline_events_per_sec: baseline.map(|s| totals.events_valid as f64 / s),
        ratio_to_baseline: baseline.map(|s| s / seconds),
        cpu_us_per_event: cpu,
        baseline_cpu_us_per_event: baseline_cpu,
    };
    match args.format {
        BenchFormat::Json => println!("{}", serde_json::to_string(&report)?),
        BenchFormat::Table => {
            println!(
                "tally ingest ({}): {} events in {} messages ({} per message): {:.2} s, {:.0} events/s",
                report.encoding,
                report.events,
                report.messages,
                report.batch,
                report.seconds,
                report.events_per_sec
            );
            println!(
                "publish-to-durable latency: p50 {} ms, p99 {} ms, p999 {} ms, max {} ms",
                report.latency_ms_p50,
                report.latency_ms_p99,
                report.latency_ms_p999,
                report.latency_ms_max
            );
            if let (Some(s), Some(eps), Some(r)) = (
                report.baseline_seconds,
                report.baseline_events_per_sec,
                report.ratio_to_baseline,
            ) {
                println!(
                    "jetstream alone: {s:.2} s, {eps:.0} events/s; tally reaches {:.0} % of it",
                    r * 100.0
                );
            }
        }
    }
    drop(nats);
    drop(temp);
    Ok(std::process::ExitCode::SUCCESS)
}

/// Publishes in 10 ms slices so that the offered load stays at `rate` events/s.
async fn publish_paced(
    js: &async_nats::jetstream::Context,
    messages: &[OutMessage],
    rate: u64,
) -> anyhow::Result<()> {
    let start = tokio::time::Instant::now();
    let mut sent = 0u64;
    let per_slice = (rate / 100).max(1);
    let mut slice_start = 0;
    let mut slice_events = 0u64;
    for (i, m) in messages.iter().enumerate() {
        slice_events += u64::from(m.events);
        let last = i + 1 == messages.len();
        if slice_events >= per_slice || last {
            let slice = &messages[slice_start..=i];
            workload::publish(js, slice, workload::MAX_ACKS_IN_FLIGHT, |_| {}).await?;
            sent += slice_events;
            (slice_start, slice_events) = (i + 1, 0);
            let due = start + Duration::from_secs_f64(sent as f64 / rate as f64);
            tokio::time::sleep_until(due).await;
        }
    }
    Ok(())
}

/// JetStream alone: the same messages through an equally partitioned stream, consumed by
/// one pull consumer per partition that acknowledges (ack-all) every 1,000 messages or
/// when idle. Returns the seconds from first publish to last ack.
async fn baseline(nats: &Nats, config: &Config, messages: &[OutMessage]) -> anyhow::Result<f64> {
    let js = &nats.jetstream;
    let partitions = config.ingest.partitions;
    let name = BASELINE_STREAM;
    let _ = js.delete_stream(name).await;
    let stream = js
        .create_stream(stream::Config {
            name: name.to_owned(),
            subjects: vec!["baseline.events.*".to_owned()],
            subject_transform: Some(SubjectTransform {
                source: "baseline.events.*".to_owned(),
                destination: format!(
                    "baseline.part.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}"
                ),
            }),
            duplicate_window: Duration::from_secs(config.ingest.duplicate_window_secs),
            ..Default::default()
        })
        .await
        .context("creating the baseline stream")?;
    let consumed = Arc::new(AtomicU64::new(0));
    let total = messages.len() as u64;
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..partitions {
        let consumer: pull::Stream = stream
            .create_consumer(pull::Config {
                durable_name: Some(format!("baseline-{p}")),
                filter_subject: format!("baseline.part.{p}.*"),
                ack_policy: AckPolicy::All,
                max_ack_pending: 100_000,
                ..Default::default()
            })
            .await?
            .stream()
            .max_messages_per_batch(config.ingest.fetch_messages)
            .messages()
            .await?;
        let consumed = consumed.clone();
        tasks.spawn(async move {
            let mut consumer = consumer;
            let mut unacked = 0usize;
            let mut last = None;
            while consumed.load(Ordering::Relaxed) < total {
                match tokio::time::timeout(Duration::from_millis(20), consumer.next()).await {
                    Ok(Some(Ok(msg))) => {
                        last = Some(msg);
                        unacked += 1;
                        if unacked < 1_000 {
                            continue;
                        }
                    }
                    Ok(Some(Err(_)) | None) => break,
                    Err(_) => {}
                }
                if let Some(msg) = last.take() {
                    if msg.double_ack().await.is_ok() {
                        consumed.fetch_add(unacked as u64, Ordering::Relaxed);
                    }
                    unacked = 0;
                }
            }
        });
    }
    let renamed: Vec<OutMessage> = messages
        .iter()
        .map(|m| OutMessage {
            subject: m.subject.replacen("tally.events.", "baseline.events.", 1),
            ..m.clone()
        })
        .collect();
    let start = Instant::now();
    workload::publish(js, &renamed, workload::MAX_ACKS_IN_FLIGHT, |_| {}).await?;
    while tasks.join_next().await.is_some() {}
    let seconds = start.elapsed().as_secs_f64();
    Ok(seconds)
}
